#!/usr/bin/env bash
# Before/after timing on a machine whose speed drifts: the older tree and this one run the
# same benchmark row at the same moment, one per core (taskset), then with the cores swapped,
# ROUNDS times in all. Each side runs slower than alone (they share the memory system), but a
# slow phase of the machine hits both.
#
#   git worktree add /tmp/before <commit>
#   benchmarks/ab.sh /tmp/before des-2048-decode 2
#
# A change that uses the second core (work on a thread beside the main one) cannot show on
# one core: `serial` as a fourth argument runs the two trees one after the other instead,
# each on every core, the first of each round alternating.
#
# Rows (timed by each tree's own benchmarks/run.py, as --targets times them):
#   des-2048-decode  des-256-prefill  process-256-prefill  process-mixtral  points  serving
set -euo pipefail
before=$(cd "${1:?older tree}" && pwd)
row=${2:?row}
rounds=${3:-2}
now=$(cd "$(dirname "$0")/.." && pwd)
S=scenarios

case "$row" in
  des-2048-decode) code="run._des_in_process('$S/deepseek-v3-2048xh800-decode.yaml', {'sim.fidelity': 'des'})[0]" ;;
  des-256-prefill) code="run._des_in_process('$S/deepseek-v3-256xh800-prefill.yaml', {'sim.fidelity': 'des'})[0]" ;;
  process-256-prefill) code="run._process_s(['run', '$S/deepseek-v3-256xh800-prefill.yaml'], 3)" ;;
  process-mixtral) code="run._process_s(['run', '$S/mixtral-8x7b-8xh100-decode.yaml'], 5)" ;;
  points) code="'mixtral %.2f ms, deepseek-v3 256 %.2f ms' % (1e3 * run._analytic_points('$S/mixtral-8x7b-8xh100-decode.yaml', {}, 40), 1e3 * run._analytic_points('$S/deepseek-v3-256xh800-prefill.yaml', {}, 20))" ;;
  serving) code="run._serving_point_s('$S/mixtral-8x7b-8xh100-serve.yaml', 5)" ;;
  *) echo "error: unknown row '$row'" >&2; exit 2 ;;
esac

mode=${4:-paired}
case "$mode" in paired | serial) ;; *) echo "error: unknown mode '$mode' (paired | serial)" >&2; exit 2 ;; esac
side() {  # side NAME TREE CORES
  (cd "$2" && PYTHONPATH="$2" taskset -c "$3" python -c "
import sys; sys.path.insert(0, 'benchmarks'); import run
print('$1', $code, flush=True)")
}

every=$(seq -s, 0 $(($(nproc) - 1)))
for ((k = 0; k < rounds; k++)); do
  a=$((k % 2)); b=$((1 - a))
  if [ "$mode" = serial ]; then
    if [ $a = 0 ]; then side before "$before" "$every"; side now "$now" "$every"
    else side now "$now" "$every"; side before "$before" "$every"; fi
  else
    side before "$before" "$a" &
    side now "$now" "$b" &
    wait
  fi
done
