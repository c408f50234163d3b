"""What the engines record: per-device time per phase (waits included) and timeline slices;
monitoring by wrapping, outside the device and network models."""

from __future__ import annotations

from dataclasses import dataclass, field
from heapq import heappop, heappush

import numpy as np
import simpy
from simpy.events import NORMAL, Timeout

from moesim.plan.graph import COMM_PHASES, COMPUTE_PHASES


def failure_copy(event: simpy.Event) -> BaseException:
    """The exception of a failed ``event``, copied as simpy copies it for whoever raises it
    (its cause the original, whose traceback other waiters keep)."""
    exc = type(event._value)(*event._value.args)
    exc.__cause__ = event._value
    return exc


class CountingEnvironment(simpy.Environment):
    """A simpy environment that counts processed events (monitoring by wrapping ``step``).

    ``run()`` to the end processes events in one loop, what ``step`` does inlined (one
    Python call less per event; ``step`` runs the same loop for one event), with the same
    count: every ``step`` call, the one that finds the queue empty included. ``now`` is a
    plain attribute, set with simpy's ``_now`` as each event is taken off the queue, instead
    of simpy's property: the engine and the network read the clock about four times an
    event."""

    now: float = 0.0  # shadows simpy's read-only property: an instance attribute from here

    def __init__(self) -> None:
        super().__init__()
        self.now = self._now
        self.events_processed = 0

    def timeout(self, delay: float, value=None) -> Timeout:
        """simpy's ``Timeout``, made and scheduled here: simpy binds ``env.timeout`` to its
        environment's own class only, so on a subclass each access went through a
        descriptor; the same event, scheduled the same way."""
        if delay < 0:
            raise ValueError(f"Negative delay {delay}")
        event = object.__new__(Timeout)
        event.env, event.callbacks, event._value, event._delay, event._ok = (
            self,
            [],
            value,
            delay,
            True,
        )
        heappush(self._queue, (self._now + delay, NORMAL, next(self._eid), event))
        return event

    def event(self) -> simpy.Event:
        """simpy's ``Event`` (pending), without the descriptor of ``env.event``."""
        return simpy.Event(self)

    def step(self) -> None:
        """simpy's ``step``, with the clock kept in ``now`` too (``run(until)`` steps)."""
        if not self._queue:
            self.events_processed += 1
            raise simpy.core.EmptySchedule()
        self._process(1)

    def run(self, until=None):
        if until is not None:
            return super().run(until)
        self._process(None)
        return None

    def _process(self, limit: int | None) -> None:
        """Process up to ``limit`` events (None: until the queue is empty, counting the
        step that finds it so), what simpy's ``step`` does for each, inlined."""
        queue = self._queue
        n = 0
        try:
            while queue and n != limit:
                n += 1
                self._now, _, _, event = heappop(queue)
                self.now = self._now
                callbacks, event.callbacks = event.callbacks, None
                for callback in callbacks:
                    callback(event)
                if not event._ok and not hasattr(event, "_defused"):
                    raise failure_copy(event)  # as simpy's step raises
            if limit is None:
                n += 1  # the step that finds the queue empty
        finally:
            self.events_processed += n


@dataclass
class Recorder:
    """Per-device time per phase (waits included) and the slices of the device timelines."""

    n_devices: int
    keep_slices: bool
    phase_s: dict[str, np.ndarray] = field(default_factory=dict)
    finish_s: np.ndarray | None = None
    slices: list[tuple[int, str, float, float, int]] = field(default_factory=list)
    pim_slices: list[tuple[int, str, float, float, int]] = field(default_factory=list)
    # collectives in flight per device: (devices, issue times, completion times), in the
    # order recorded; single devices gather in the three lists of `_one` until an array comes
    comm: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    _one: tuple[list[int], list[float], list[float]] = field(
        default_factory=lambda: ([], [], []), repr=False
    )

    def __post_init__(self) -> None:
        self.phase_s = {p: np.zeros(self.n_devices) for p in COMPUTE_PHASES + COMM_PHASES}
        self.finish_s = np.zeros(self.n_devices)
        self._every = np.arange(self.n_devices)  # the devices of `in_flight_all`, read-only
        self._every.flags.writeable = False

    def add(self, g: int, phase: str, start: float, end: float, layer: int) -> None:
        self.phase_s[phase][g] += end - start
        if self.keep_slices and end > start:
            self.slices.append((g, phase, start, end, layer))

    def in_flight(self, devices, start, end) -> None:
        """Collectives in flight on ``devices`` from ``start`` to ``end`` (arrays or scalars)."""
        if np.ndim(devices) == 0 and np.ndim(start) == 0 and np.ndim(end) == 0:
            self.in_flight_one(int(devices), float(start), float(end))
            return
        self._gather_one()
        devices = np.atleast_1d(devices)
        start, end = np.asarray(start, float), np.asarray(end, float)
        if start.shape != devices.shape:
            start = np.broadcast_to(start, devices.shape)
        if end.shape != devices.shape:
            end = np.broadcast_to(end, devices.shape)
        self.comm.append((devices, start, end))

    def in_flight_all(self, start: np.ndarray, end: np.ndarray) -> None:
        """A collective in flight on every device, device ``g`` from ``start[g]`` to
        ``end[g]`` (:meth:`in_flight` over all devices, without its checks)."""
        self._gather_one()
        self.comm.append((self._every, start, end))

    def in_flight_one(self, g: int, start: float, end: float) -> None:
        """A collective in flight on device ``g`` from ``start`` to ``end``."""
        one = self._one
        one[0].append(g)
        one[1].append(start)
        one[2].append(end)

    def part_records(self, devices: np.ndarray) -> dict:
        """What this recorder holds of ``devices`` (the part it recorded): their phase times
        and finish times, the slices and the collectives in flight, in recording order."""
        self._gather_one()
        return {
            "phase_s": {phase: seconds[devices] for phase, seconds in self.phase_s.items()},
            "finish_s": self.finish_s[devices],
            "slices": self.slices,
            "pim_slices": self.pim_slices,
            "comm": self.comm,
        }

    def add_part(self, devices: np.ndarray, records: dict) -> None:
        """Take in a part's :meth:`part_records` (its devices recorded nowhere else): their
        numbers as they were, its slices and collectives after those already here."""
        self._gather_one()
        for phase, seconds in records["phase_s"].items():
            self.phase_s[phase][devices] = seconds
        self.finish_s[devices] = records["finish_s"]
        self.slices += records["slices"]
        self.pim_slices += records["pim_slices"]
        self.comm += records["comm"]

    def _gather_one(self) -> None:
        """Move the single-device intervals recorded so far into ``comm`` (order kept)."""
        g, start, end = self._one
        if g:
            self.comm.append(
                (np.array(g, dtype=np.int64), np.array(start, float), np.array(end, float))
            )
            self._one = ([], [], [])

    def _interval_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, ends)`` as ``[device, interval]`` tables in recording order, padded
        with +inf starts and -inf ends."""
        n, every = self.n_devices, np.arange(self.n_devices)
        if all(
            c[0] is self._every or (len(c[0]) == n and np.array_equal(c[0], every))
            for c in self.comm
        ):
            # every collective on every device (the analytic engine's inference steps)
            return np.stack([c[1] for c in self.comm], 1), np.stack([c[2] for c in self.comm], 1)
        g = np.concatenate([c[0] for c in self.comm])
        counts = np.bincount(g, minlength=n)
        by_device = np.argsort(g.astype(np.int16) if n < 1 << 15 else g, kind="stable")
        col = np.empty(len(g), dtype=np.int64)
        col[by_device] = np.arange(len(g)) - np.repeat(np.cumsum(counts) - counts, counts)
        shape = (n, int(counts.max()))
        starts, ends = np.full(shape, np.inf), np.full(shape, -np.inf)
        starts[g, col] = np.concatenate([c[1] for c in self.comm])
        ends[g, col] = np.concatenate([c[2] for c in self.comm])
        return starts, ends

    def comm_busy_s(self) -> np.ndarray:
        """Per device, the time at least one of its collectives was in flight (the union of
        their intervals: sorted by start, each adds what reaches past the ones before).

        The intervals go into ``[device, interval]`` tables in the order they were recorded
        (padding starts at +inf and ends at -inf, so it adds nothing), each row is sorted by
        start (stable: ties keep that order), and a row's additions run in order from 0
        (``np.add.accumulate``), as a loop over each device's sorted intervals would."""
        self._gather_one()
        n = self.n_devices
        if not self.comm:
            return np.zeros(n)
        starts, ends = self._interval_tables()
        if not (starts[:, 1:] >= starts[:, :-1]).all():  # usually recorded in start order
            order = np.argsort(starts, axis=1, kind="stable")
            starts = np.take_along_axis(starts, order, axis=1)
            ends = np.take_along_axis(ends, order, axis=1)
        reach = np.maximum.accumulate(ends, axis=1)  # the latest end so far in each row
        before = np.concatenate([np.full((n, 1), -np.inf), reach[:, :-1]], axis=1)
        added = np.maximum(0.0, ends - np.maximum(starts, before))
        return np.add.accumulate(added, axis=1)[:, -1]
