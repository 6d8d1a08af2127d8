"""Counts of a guest's load per time interval, for throughput over time (sans-IO: every count
comes with the time the core was given).

Memory is bounded: a timeline holds at most `max_bins` intervals. When an event falls past the
last one, adjacent intervals are summed in pairs and the interval doubles, so a long run is still
covered from its start to its end, only more coarsely (2048 bins: 1 s intervals for runs up to
34 minutes, 2 s up to 68 minutes, and so on).
"""
from __future__ import annotations

from typing import Iterable

MAX_BINS = 2048
SECOND_NS = 1_000_000_000


class Timeline:
    """Named series of counts per interval since `t0` (ns). A series name is a tuple of strings;
    to_dict() nests them: ("ops", "submit", "completed") -> out["ops"]["submit"]["completed"]."""

    __slots__ = ("t0", "interval_ns", "max_bins", "series", "bins")

    def __init__(self, t0: int = 0, names: Iterable[tuple[str, ...]] = (), *,
                 interval_ns: int = SECOND_NS, max_bins: int = MAX_BINS):
        if interval_ns <= 0 or max_bins < 2:
            raise ValueError(f"a timeline needs an interval > 0 and at least 2 bins, got "
                             f"{interval_ns} ns and {max_bins}")
        self.t0, self.interval_ns, self.max_bins = t0, interval_ns, max_bins
        # declared up front, so a series with nothing in it still shows as zeros
        self.series: dict[tuple[str, ...], list[int]] = {n: [] for n in names}
        self.bins = 0

    def _bin(self, now: int) -> int:
        # an event stamped before t0 (an op's intended time rounds below the load's start) goes
        # in the first interval rather than nowhere
        i = max(0, (now - self.t0) // self.interval_ns)
        while i >= self.max_bins:
            self._coarsen()
            i = max(0, (now - self.t0) // self.interval_ns)
        return i

    def _coarsen(self) -> None:
        for s in self.series.values():
            if len(s) % 2:
                s.append(0)
            s[:] = [s[k] + s[k + 1] for k in range(0, len(s), 2)]
        self.interval_ns *= 2
        self.bins = (self.bins + 1) // 2

    def count(self, name: tuple[str, ...], now: int, n: int = 1) -> None:
        """Add `n` events of series `name` at time `now`."""
        i = self._bin(now)
        s = self.series.get(name)
        if s is None:
            s = self.series[name] = []
        if len(s) <= i:
            s.extend([0] * (i + 1 - len(s)))
        s[i] += n
        if i >= self.bins:
            self.bins = i + 1

    def to_dict(self, now: int | None = None) -> dict:
        """The counts as nested dicts of equal-length lists, covering t0 to `now` (or to the last
        event): {"interval_s", "t0_ns", "bins", <the series>}."""
        last = self._bin(now) if now is not None else -1      # may coarsen: take it first
        bins = max(self.bins, last + 1)
        out: dict = {"interval_s": self.interval_ns / SECOND_NS, "t0_ns": self.t0, "bins": bins}
        for name, s in self.series.items():
            d = out
            for part in name[:-1]:
                d = d.setdefault(part, {})
            d[name[-1]] = s + [0] * (bins - len(s))
        return out
