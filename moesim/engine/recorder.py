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

    def __post_init__(self) -> None:
        self.phase_s = {p: np.zeros(self.n_devices) for p in COMPUTE_PHASES + COMM_PHASES}
        self.finish_s = np.zeros(self.n_devices)

    def add(self, g: int, phase: str, start: float, end: float, layer: int) -> None:
        self.phase_s[phase][g] += end - start
        if self.keep_slices and end > start:
            self.slices.append((g, phase, start, end, layer))
