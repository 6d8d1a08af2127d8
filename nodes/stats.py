"""Plain counters and log-bucket histograms kept by the sans-IO cores.

The cores never touch prometheus-client: they count into a Stats object, and the runtime exposes
it through a collector on scrape. Histograms keep 100 buckets per decade (2.3% wide), so
percentiles are accurate to about 1% and histograms from many nodes merge exactly.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

import numpy as np

PER_DECADE = 100
# Prometheus bucket edges, 1 us .. 1 s in quarter decades; each is an edge of the fine buckets.
PROM_EDGES_S = [float(f"{10 ** (k / 4) * 1e-6:.6g}") for k in range(0, 25)]
_PROM_EDGE_IDX = [round(math.log10(e * 1e9) * PER_DECADE) for e in PROM_EDGES_S]


class LogHistogram:
    """Latency samples in ns, bucketed by 10**(k/100) ns (upper-inclusive)."""

    __slots__ = ("counts", "n", "total_ns")

    def __init__(self) -> None:
        self.counts: dict[int, int] = defaultdict(int)
        self.n = 0
        self.total_ns = 0

    def record(self, ns: int, n: int = 1) -> None:
        """Record `n` samples of `ns` (n > 1: the accesses of one batch shared its latency)."""
        if ns < 1:
            ns = 1
        self.counts[math.ceil(math.log10(ns) * PER_DECADE - 1e-9)] += n
        self.n += n
        self.total_ns += ns * n

    def record_many(self, ns: Any, weights: Any = None) -> None:
        """record() for a sequence of latencies (each `weights[i]` samples of `ns[i]`)."""
        if len(ns) < 32:            # numpy's overhead is worth it only for many samples
            for i, v in enumerate(ns):
                self.record(int(v), 1 if weights is None else int(weights[i]))
            return
        v = np.maximum(np.asarray(ns, dtype=np.float64), 1.0)
        keys = np.ceil(np.log10(v) * PER_DECADE - 1e-9).astype(np.int64)
        uniq, inv = np.unique(keys, return_inverse=True)
        if weights is None:
            counts = np.bincount(inv)
            n, total = len(v), int(v.sum())
        else:
            w = np.asarray(weights, dtype=np.int64)
            counts = np.bincount(inv, weights=w).astype(np.int64)
            n, total = int(w.sum()), int((v * w).sum())
        for k, c in zip(uniq.tolist(), counts.tolist()):
            self.counts[k] += c
        self.n += n
        self.total_ns += total

    def merge(self, other: "LogHistogram") -> None:
        for k, c in other.counts.items():
            self.counts[k] += c
        self.n += other.n
        self.total_ns += other.total_ns

    def minus(self, base: "LogHistogram") -> "LogHistogram":
        """The samples recorded since `base` was a copy of this histogram."""
        h = LogHistogram()
        for k, c in self.counts.items():
            d = c - base.counts.get(k, 0)
            if d:
                h.counts[k] = d
        h.n = self.n - base.n
        h.total_ns = self.total_ns - base.total_ns
        return h

    def copy(self) -> "LogHistogram":
        return LogHistogram.from_dict(self.to_dict())

    def quantile_ns(self, q: float) -> float:
        """The q-quantile, as the geometric middle of the bucket that holds it (nan if empty)."""
        if self.n == 0:
            return float("nan")
        rank = q * self.n
        seen = 0
        for k in sorted(self.counts):
            seen += self.counts[k]
            if seen >= rank:
                return 10 ** ((k - 0.5) / PER_DECADE)
        return 10 ** ((max(self.counts) - 0.5) / PER_DECADE)

    def prom_buckets(self) -> list[tuple[str, int]]:
        """Cumulative counts at the standard edges, plus +Inf, for a Prometheus histogram."""
        items = sorted(dict(self.counts).items())
        out, seen, i = [], 0, 0
        for edge_s, edge_idx in zip(PROM_EDGES_S, _PROM_EDGE_IDX):
            while i < len(items) and items[i][0] <= edge_idx:
                seen += items[i][1]
                i += 1
            out.append((repr(edge_s), seen))
        out.append(("+Inf", self.n))
        return out

    def to_dict(self) -> dict:
        return {"n": self.n, "total_ns": self.total_ns, "buckets": dict(self.counts)}

    @classmethod
    def from_dict(cls, d: dict) -> "LogHistogram":
        h = cls()
        for k, c in d["buckets"].items():
            h.counts[int(k)] += c
        h.n = d["n"]
        h.total_ns = d["total_ns"]
        return h

    def summary_us(self) -> dict:
        return {"count": self.n,
                "p50_us": _us(self.quantile_ns(0.5)),
                "p99_us": _us(self.quantile_ns(0.99)),
                "p999_us": _us(self.quantile_ns(0.999))}


def _us(ns: float) -> float | None:
    return None if math.isnan(ns) else round(ns / 1000.0, 2)


class Family:
    __slots__ = ("name", "help", "labels", "type", "values")

    def __init__(self, name: str, help: str, labels: tuple[str, ...], type: str):
        self.name, self.help, self.labels, self.type = name, help, labels, type
        self.values: dict[tuple, object] = {}


class Stats:
    """Named metric families of one node; label values are tuples in declaration order."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Family:
        return self._declare(name, help, tuple(labels), "counter")

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Family:
        return self._declare(name, help, tuple(labels), "gauge")

    def histogram(self, name: str, help: str, labels: Iterable[str] = ()) -> Family:
        return self._declare(name, help, tuple(labels), "histogram")

    def _declare(self, name: str, help: str, labels: tuple[str, ...], type: str) -> Family:
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = Family(name, help, labels, type)
        return fam

    def inc(self, name: str, labels: tuple = (), n: int = 1) -> None:
        vals = self.families[name].values
        vals[labels] = vals.get(labels, 0) + n

    def set(self, name: str, labels: tuple, value: float) -> None:
        self.families[name].values[labels] = value

    def hist(self, name: str, labels: tuple = ()) -> LogHistogram:
        vals = self.families[name].values
        h = vals.get(labels)
        if h is None:
            h = vals[labels] = LogHistogram()
        return h

    def get(self, name: str, labels: tuple = (), default: int = 0):
        return self.families[name].values.get(labels, default)

    def total(self, name: str) -> int:
        return sum(self.families[name].values.values())

    def snapshot(self) -> dict:
        """A msgpack-able copy for STATS replies and result files."""
        out = {}
        for fam in list(self.families.values()):
            rows = []
            for labels, v in list(fam.values.items()):
                rows.append([list(labels), v.to_dict() if isinstance(v, LogHistogram) else v])
            out[fam.name] = {"type": fam.type, "labels": list(fam.labels), "rows": rows}
        return out


def hist_from_snapshot(snap: dict, name: str, **match) -> LogHistogram:
    """Merge the histogram rows of family `name` whose labels match the given values."""
    fam = snap.get(name)
    merged = LogHistogram()
    if not fam:
        return merged
    names = fam["labels"]
    for labels, v in fam["rows"]:
        lab = dict(zip(names, labels))
        if all(str(lab.get(k)) == str(val) for k, val in match.items()):
            merged.merge(LogHistogram.from_dict(v))
    return merged


def counter_from_snapshot(snap: dict, name: str, **match) -> int:
    fam = snap.get(name)
    if not fam:
        return 0
    names = fam["labels"]
    total = 0
    for labels, v in fam["rows"]:
        lab = dict(zip(names, labels))
        if all(str(lab.get(k)) == str(val) for k, val in match.items()):
            total += v
    return total
