"""What the engines record: per-device time per phase (waits included) and timeline slices;
monitoring by wrapping, outside the device and network models."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy

from moesim.plan.graph import COMM_PHASES, COMPUTE_PHASES


class CountingEnvironment(simpy.Environment):
    """A simpy environment that counts processed events (monitoring by wrapping ``step``)."""

    def __init__(self) -> None:
        super().__init__()
        self.events_processed = 0

    def step(self) -> None:
        self.events_processed += 1
        super().step()


@dataclass
class Recorder:
    """Per-device time per phase (waits included) and the slices of the device timelines."""

    n_devices: int
    keep_slices: bool
    phase_s: dict[str, np.ndarray] = field(default_factory=dict)
    finish_s: np.ndarray | None = None
    slices: list[tuple[int, str, float, float, int]] = field(default_factory=list)
    pim_slices: list[tuple[int, str, float, float, int]] = field(default_factory=list)
    # collectives in flight per device: (devices, issue times, completion times)
    comm: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.phase_s = {p: np.zeros(self.n_devices) for p in COMPUTE_PHASES + COMM_PHASES}
        self.finish_s = np.zeros(self.n_devices)

    def add(self, g: int, phase: str, start: float, end: float, layer: int) -> None:
        self.phase_s[phase][g] += end - start
        if self.keep_slices and end > start:
            self.slices.append((g, phase, start, end, layer))

    def in_flight(self, devices, start, end) -> None:
        """Collectives in flight on ``devices`` from ``start`` to ``end`` (arrays or scalars)."""
        self.comm.append((np.atleast_1d(devices), np.atleast_1d(start), np.atleast_1d(end)))

    def comm_busy_s(self) -> np.ndarray:
        """Per device, the time at least one of its collectives was in flight (the union of
        their intervals: sorted by start, each adds what reaches past the ones before)."""
        busy = np.zeros(self.n_devices)
        if not self.comm:
            return busy
        g = np.concatenate([c[0] for c in self.comm])
        start = np.concatenate([np.broadcast_to(c[1], c[0].shape) for c in self.comm])
        end = np.concatenate([np.broadcast_to(c[2], c[0].shape) for c in self.comm])
        order = np.lexsort((start, g))
        g, start, end = g[order], start[order], end[order]
        first = np.r_[True, g[1:] != g[:-1]]
        reach = end.copy()  # the latest end so far within each device's run
        for dev_start in np.flatnonzero(first):  # per device (runs of g): running maximum
            stop = np.searchsorted(g, g[dev_start], side="right")
            reach[dev_start:stop] = np.maximum.accumulate(end[dev_start:stop])
        before = np.r_[-np.inf, reach[:-1]]
        before[first] = -np.inf
        np.add.at(busy, g, np.maximum(0.0, end - np.maximum(start, before)))
        return busy
