"""``moesim run``: simulate one step of a scenario and print or write its summary."""

from __future__ import annotations

import argparse
import gc
import json
import threading
from pathlib import Path

from moesim.cli.common import (
    PROCESS,
    add_set_argument,
    fmt_s,
    non_negative_int,
    out_dir,
    parse_overrides,
)
from moesim.config.errors import ScenarioError

NAME = "run"

RUN_HELP = """\
Simulate one step of a scenario with the discrete-event engine and print step time,
tokens/s, the time breakdown of the slowest device, the busiest device and link, routing
imbalance and memory. With --out DIR it also writes:
  summary.json  step_time_s, tokens_per_s, breakdown_s, routing, devices, links, resolved scenario
  devices.csv   one row per device: seconds per phase (compute and waits), utilization, memory
  links.csv     one row per link: bytes carried, busy seconds, utilization
  routing.csv   one row per MoE layer: load imbalance, drops, cross-node pairs
  expert_load.csv  tokens per (MoE layer, expert group, expert)
  trace.json    Chrome trace events, one track per device and per link (open in Perfetto)
A bad scenario exits with code 2 and one line: error: FILE: field.path: reason.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``moesim run``."""
    p = subparsers.add_parser(
        NAME,
        help="simulate one step of a scenario YAML",
        description=RUN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", type=Path, help="scenario YAML file (see scenarios/)")
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write summary.json, devices.csv, links.csv, routing.csv, trace.json",
    )
    add_set_argument(p)
    p.add_argument("--seed", type=non_negative_int, help="override sim.seed")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--no-trace",
        action="store_true",
        help="with --out, record no timelines (faster; trace.json holds only the track "
        "names); without --out none are recorded, as nothing writes them",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing, no progress bar")
    return p


def print_summary(summary: dict) -> None:
    s = summary
    step = s["step_time_s"]
    print(f"scenario          {s['scenario']}  ({s['devices']} devices, {s['links']} links)")
    print(f"step time         {fmt_s(step)}")
    print(f"tokens/s          {s['tokens_per_s']:,.0f}  ({s['tokens']:,} tokens per step)")
    if "mfu" in s and "mfu_peak" in s:
        print(f"mfu               {s['mfu']:.1%} of {s['mfu_peak']} per device")
    print(f"breakdown         (timeline of {s['critical_device']}, the last device to finish)")
    for phase, sec in s["breakdown_s"].items():
        if sec > 0:
            share = sec / step if step else 0
            bar = "#" * round(share * 40)
            print(f"  {phase:<15} {fmt_s(sec):>12}  {share:6.1%}  {bar}".rstrip())
    bd, bl, r = s["busiest_device"], s["busiest_link"], s["routing"]
    print(
        f"busiest device    {bd['device']}: compute {fmt_s(bd['compute_busy_s'])}, "
        f"utilization {bd['utilization']:.1%}"
    )
    if bl:
        print(
            f"busiest link      {bl['link']}: {bl['bytes_carried'] / 1e6:,.1f} MB, "
            f"utilization {bl['utilization']:.1%}"
        )
    print(
        f"routing           expert max/mean load {r['max_over_mean_load']:.3f} (worst layer "
        f"{r['max_over_mean_load_worst_layer']:.3f}), device max/mean "
        f"{r['device_max_over_mean_load']:.3f}, drop rate {r['drop_rate']:.2%}, "
        f"cross-node {r['cross_node_fraction']:.1%}"
    )
    if s.get("overlapped_comm_s") is not None:  # inference: what compute hides
        a2a = s["breakdown_s"]["dispatch"] + s["breakdown_s"]["combine"]
        print(
            f"communication     exposed {fmt_s(s['exposed_comm_s'])} (all-to-all "
            f"{a2a / step if step else 0:.1%} of the step), overlapped "
            f"{fmt_s(s['overlapped_comm_s'])}; {s['tokens_per_s'] / s['devices']:,.0f} "
            "tokens/s per device"
        )
    if "tpot_s" in s:
        mtp = s.get("mtp")
        extra = f" ({mtp['tokens_per_step']:.2f} tokens per sequence per step)" if mtp else ""
        print(f"tpot              {fmt_s(s['tpot_s'])}{extra}")
    mem = s["memory"]
    print(
        f"memory            {mem['max_used_bytes'] / 1e9:.1f} of "
        f"{mem['capacity_bytes'] / 1e9:.1f} GB on the fullest device"
    )
    train = s.get("train")
    if train:
        parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in train["memory_bytes"].items())
        print(
            f"training          MFU {train['mfu']:.1%} (HFU {train['hfu']:.1%}), compute "
            f"{fmt_s(train['compute_s'])}, exposed communication "
            f"{fmt_s(train['exposed_comm_s'])}, "
            + (
                f"waiting for other stages {fmt_s(train['pipeline_wait_s'])}, "
                if train.get("pipeline_wait_s")
                else ""
            )
            + f"{train['micro_batches']} micro-batches"
        )
        print(f"  memory (GB)     {parts}")
    pim = s.get("pim")
    if pim:
        threshold = pim["token_threshold"]
        print(
            f"pim               {pim['units_per_gpu']} x {pim['device']} per GPU, policy "
            f"{pim['policy']}"
            + (f" (at most {threshold} tokens)" if threshold is not None else "")
            + f", busy {fmt_s(pim['max_busy_s'])}, {pim['max_used_bytes'] / 1e9:.1f} of "
            f"{pim['capacity_bytes'] / 1e9:.1f} GB"
        )
    energy = s.get("energy_j")
    if energy:
        total = energy["total"]
        top = sorted(energy["breakdown"].items(), key=lambda kv: -kv[1])[:3]
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in top) if total > 0 else ""
        print(
            f"energy            {total:.3f} J per step, {energy['per_token']:.4f} J "
            f"per token ({shares})"
        )
    print(f"simulated in      {s['sim']['wall_s']:.2f} s wall, {s['sim']['events']:,} events")
    for warning in s.get("warnings", []):
        print(f"warning           {warning}")


def run(args: argparse.Namespace) -> int:
    from moesim.config.scenario import load_scenario
    from moesim.plan.limits import check_size
    from moesim.results.collect import write_outputs
    from moesim.studies.simulate import simulate

    overrides = parse_overrides(args.set)
    if args.seed is not None:
        overrides["sim.seed"] = args.seed
    if args.no_trace or args.out is None:
        overrides["sim.trace"] = False  # timelines are written only to --out: record none
    scenario = load_scenario(args.scenario, overrides)
    if PROCESS["ends_after_command"] and scenario.workload.phase != "serve":
        # one run, then os._exit: the objects the run makes (modules, numba's registries,
        # the plan, the engine's records) live to its end and make little cyclic garbage,
        # so the collector's passes only rescan a growing heap: on the 256-GPU prefill,
        # 2-3 full passes and ~300 young ones, 100-140 ms (260-280 ms with --out;
        # docs/speed.md). The engine runs without it anyway; a compile turns it on
        # (KernelLoad).
        gc.disable()
    kernels = None
    try:
        check_size(scenario)
        if args.out:
            out_dir(args.out)
        kernels = KernelLoad.start_for(scenario, announce=not args.quiet)
        result = simulate(scenario, progress=not args.quiet, before_engine=kernels and kernels.wait)
    except ScenarioError as err:
        err.file = err.file or str(args.scenario)
        raise
    finally:
        if kernels is not None:  # no thread outlives the command
            kernels.thread.join()
    if scenario.workload.phase == "serve":
        return _serve_outputs(result, args)
    if args.json:
        print(
            json.dumps(
                {k: v for k, v in result.summary.items() if k != "scenario_resolved"}, indent=2
            )
        )
    elif not args.quiet:
        print_summary(result.summary)
    if args.out:
        out = write_outputs(result, args.out)
        if not args.quiet:
            print(
                f"wrote             {out}/summary.json devices.csv links.csv routing.csv "
                "trace.json (open trace.json in https://ui.perfetto.dev)"
            )
    return 0


class KernelLoad:
    """The network's compiled kernels (:func:`moesim.network.fluid.warm_up`: importing numba,
    loading each kernel from its on-disk cache, ~1 s) loaded on a daemon thread while the
    main thread builds the plan. Both are mostly Python, which holds the GIL, so the load
    runs beside the plan's routing draws (``Generator.multinomial`` releases it) and little
    else: 0.78-0.90 s for the two against 0.85-0.96 s one after the other on the 256-GPU
    prefill (docs/speed.md). :meth:`wait` joins the thread before the engine
    starts: the engine then finds every kernel loaded (``fluid._compiled`` marks itself
    loaded before its import finishes, so it must not be called while the thread is still
    inside it), and the run is the one a main-thread load gives. Where the kernels are not
    cached yet, the load compiles them with the cyclic garbage collector on (and puts it back
    as it found it): numba's compiler makes cyclic garbage, 90 MB more at the peak of a
    256-GPU run with the collector off."""

    def __init__(self, announce: bool = False) -> None:
        self.error: BaseException | None = None
        self.announce = announce
        self.thread = threading.Thread(target=self._load, name="moesim-kernels", daemon=True)

    def _load(self) -> None:
        from moesim.network import fluid

        try:
            cold = fluid.kernels_cold(quiet=not self.announce)
            collecting = gc.isenabled()
            if cold:  # numba's compiler makes cyclic garbage: +90 MB uncollected (256 GPUs)
                gc.enable()
            try:
                fluid.warm_up()
            finally:
                if cold and not collecting:
                    gc.disable()
        except BaseException as err:  # raised in the main thread by wait()
            self.error = err

    @classmethod
    def start_for(cls, scenario, announce: bool = False) -> KernelLoad | None:
        """A started load where the engine will use the compiled kernels (a discrete-event
        run on at least ``COMPILED_MIN_DEVICES`` devices); None elsewhere: small networks
        run the numpy kernels and pay nothing. ``announce``: say so on stderr when the
        kernels are not in numba's cache yet (:data:`moesim.network.fluid.COMPILING`)."""
        from moesim.network.fluid import COMPILED_MIN_DEVICES

        if scenario.workload.phase == "serve" or scenario.sim.fidelity != "des":
            return None
        if scenario.cluster.n_devices < COMPILED_MIN_DEVICES:
            return None
        load = cls(announce)
        load.thread.start()
        return load

    def wait(self) -> None:
        """Join the load; re-raise here what it raised."""
        self.thread.join()
        if self.error is not None:
            raise self.error


def _serve_outputs(result, args: argparse.Namespace) -> int:
    """Print and write a serving run (``workload.phase: serve``)."""
    from moesim.serving.output import print_serving_summary, write_serving_outputs

    summary = {k: v for k, v in result.summary.items() if k != "scenario_resolved"}
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        print_serving_summary(summary)
    if args.out:
        out = write_serving_outputs(result, args.out)
        if not args.quiet:
            print(f"wrote             {out}/summary.json requests.csv iterations.csv kv_cache.png")
    return 0
