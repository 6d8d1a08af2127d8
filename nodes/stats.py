"""Plain counters and latency histograms kept by the sans-IO cores.

The cores never touch prometheus-client: they count into a Stats object, and the runtime exposes
it through a collector on scrape. Latencies are HdrHistograms (the `hdrhistogram` package): 1 ns
to 1 h at 2 significant figures (values within 1%), so results carry the standard compressed
encoding that HdrHistogram's tools merge and plot, and histograms from many nodes merge exactly.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
from hdrh.histogram import HdrHistogram

LOWEST_NS = 1
HIGHEST_NS = 3600 * 10**9
SIGNIFICANT_FIGURES = 2
# Prometheus bucket edges, 1 us .. 1 s in quarter decades.
PROM_EDGES_S = [float(f"{10 ** (k / 4) * 1e-6:.6g}") for k in range(0, 25)]
_PENDING_MAX = 4096         # samples buffered before they are folded into the counts in one go


def _new_hdr() -> HdrHistogram:
    return HdrHistogram(LOWEST_NS, HIGHEST_NS, SIGNIFICANT_FIGURES)


class _Layout:
    """The counts-array geometry every histogram here shares, for vectorized recording and for
    the Prometheus edges (each edge maps to the last count index whose values start at or below
    it, so a bucket straddling an edge counts in full: an error within the 1% precision)."""

    def __init__(self) -> None:
        h = _new_hdr()
        self.unit_magnitude = h.unit_magnitude
        self.half_magnitude = h.sub_bucket_half_count_magnitude
        self.half_count = h.sub_bucket_half_count
        self.mask = h.sub_bucket_mask
        self.counts_len = h.counts_len
        lowest = np.array([h.get_value_from_index(i) for i in range(h.counts_len)], dtype=np.int64)
        edges_ns = np.array([round(e * 1e9) for e in PROM_EDGES_S], dtype=np.int64)
        self.edge_index = np.searchsorted(lowest, edges_ns, side="right") - 1

    def indices(self, ns: np.ndarray) -> np.ndarray:
        """HdrHistogram's counts index of each value (its _counts_index_for, over an array)."""
        # bit_length(v | mask): values stay below 2**53, so frexp on float64 is exact
        _, bits = np.frexp((ns | self.mask).astype(np.float64))
        bucket = bits.astype(np.int64) - self.unit_magnitude - (self.half_magnitude + 1)
        sub = ns >> (bucket + self.unit_magnitude)
        return ((bucket + 1) << self.half_magnitude) + sub - self.half_count


_LAYOUT = _Layout()


class LatencyHistogram:
    """Latency samples in ns. record() only appends (it sits on every trap's path); the samples
    are folded into the HdrHistogram's counts with numpy when many are pending or on a read."""

    __slots__ = ("hdr", "_counts", "_pv", "_pw", "_n", "_total_ns")

    def __init__(self, hdr: HdrHistogram | None = None, total_ns: int = 0) -> None:
        self.hdr = hdr if hdr is not None else _new_hdr()
        self._counts = np.ctypeslib.as_array(self.hdr.counts)     # a view: writes land in hdr
        self._pv: list[int] = []
        self._pw: list[int] = []
        self._n = self.hdr.get_total_count()
        self._total_ns = total_ns

    def record(self, ns: int, n: int = 1) -> None:
        """Record `n` samples of `ns` (n > 1: the accesses of one batch shared its latency)."""
        self._pv.append(ns)
        self._pw.append(n)
        if len(self._pv) >= _PENDING_MAX:
            self._fold()

    def record_many(self, ns: Any, weights: Any = None) -> None:
        """record() for a sequence of latencies (each `weights[i]` samples of `ns[i]`)."""
        if len(ns) < _PENDING_MAX:      # a fold costs one pass over the counts: batch them
            self._pv.extend(ns)
            self._pw.extend([1] * len(ns) if weights is None else weights)
            if len(self._pv) >= _PENDING_MAX:
                self._fold()
            return
        w = np.ones(len(ns), dtype=np.int64) if weights is None else np.asarray(weights, dtype=np.int64)
        self._add(np.asarray(ns, dtype=np.int64), w)

    def _fold(self) -> None:
        if self._pv:
            v, w = np.asarray(self._pv, dtype=np.int64), np.asarray(self._pw, dtype=np.int64)
            self._pv, self._pw = [], []
            self._add(v, w)

    def _add(self, v: np.ndarray, w: np.ndarray) -> None:
        v = np.clip(v, LOWEST_NS, HIGHEST_NS)
        self._counts += np.bincount(_LAYOUT.indices(v), weights=w,
                                    minlength=_LAYOUT.counts_len).astype(np.uint64)
        h = self.hdr
        added = int(w.sum())
        h.total_count += added
        h.min_value = min(h.min_value, int(v.min()))
        h.max_value = max(h.max_value, int(v.max()))
        self._n += added
        self._total_ns += int((v * w).sum())

    @property
    def n(self) -> int:
        return self._n + sum(self._pw)

    @property
    def total_ns(self) -> int:
        self._fold()
        return self._total_ns

    def merge(self, other: "LatencyHistogram") -> None:
        self._fold()
        other._fold()
        if other._n:
            self.hdr.add(other.hdr)
        self._n += other._n
        self._total_ns += other._total_ns

    def minus(self, base: "LatencyHistogram") -> "LatencyHistogram":
        """The samples recorded since `base` was a copy of this histogram."""
        self._fold()
        base._fold()
        out = LatencyHistogram()
        diff = self._counts - base._counts
        out._counts += diff
        nz = np.flatnonzero(diff)
        added = int(diff.sum())
        out.hdr.set_internal_tacking_values(int(nz[0]) if len(nz) else -1,
                                            int(nz[-1]) if len(nz) else -1, added)
        out._n = added
        out._total_ns = self._total_ns - base._total_ns
        return out

    def copy(self) -> "LatencyHistogram":
        return LatencyHistogram.from_dict(self.to_dict())

    def quantile_ns(self, q: float) -> float:
        """The q-quantile (HdrHistogram's value at that percentile; nan if empty)."""
        self._fold()
        if self._n == 0:
            return float("nan")
        return float(self.hdr.get_value_at_percentile(q * 100.0))

    def prom_buckets(self) -> list[tuple[str, int]]:
        """Cumulative counts at the standard edges, plus +Inf, for a Prometheus histogram."""
        self._fold()
        cum = np.cumsum(self._counts)
        at = [int(cum[i]) if i >= 0 else 0 for i in _LAYOUT.edge_index.tolist()]
        return [(repr(e), c) for e, c in zip(PROM_EDGES_S, at)] + [("+Inf", self._n)]

    def encode(self) -> str:
        """HdrHistogram's compressed V2 encoding, base64 (what its tools read)."""
        self._fold()
        return self.hdr.encode().decode("ascii")

    def to_dict(self) -> dict:
        return {"n": self.n, "total_ns": self.total_ns, "hdr": self.encode()}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyHistogram":
        """Inverse of to_dict; a malformed encoding raises ValueError naming it."""
        try:
            hdr = HdrHistogram.decode(d["hdr"])
        except Exception as err:        # hdrh raises TypeError, zlib.error, its own cookie errors
            raise ValueError(f"not an HdrHistogram encoding: {err}") from err
        if (hdr.get_lowest_equivalent_value(LOWEST_NS), hdr.significant_figures,
                hdr.highest_trackable_value) != (LOWEST_NS, SIGNIFICANT_FIGURES, HIGHEST_NS):
            merged = _new_hdr()     # another geometry: re-record into ours
            merged.add(hdr)
            hdr = merged
        return cls(hdr, int(d.get("total_ns", 0)))

    def summary_us(self) -> dict:
        """Count and percentiles in us, with the histogram itself (ns) for other tools."""
        return {"count": self.n,
                "p50_us": _us(self.quantile_ns(0.5)),
                "p99_us": _us(self.quantile_ns(0.99)),
                "p999_us": _us(self.quantile_ns(0.999)),
                "hdr": self.encode()}


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

    def hist(self, name: str, labels: tuple = ()) -> LatencyHistogram:
        vals = self.families[name].values
        h = vals.get(labels)
        if h is None:
            h = vals[labels] = LatencyHistogram()
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
                rows.append([list(labels), v.to_dict() if isinstance(v, LatencyHistogram) else v])
            out[fam.name] = {"type": fam.type, "labels": list(fam.labels), "rows": rows}
        return out


def hist_from_snapshot(snap: dict, name: str, **match) -> LatencyHistogram:
    """Merge the histogram rows of family `name` whose labels match the given values."""
    fam = snap.get(name)
    merged = LatencyHistogram()
    if not fam:
        return merged
    names = fam["labels"]
    for labels, v in fam["rows"]:
        lab = dict(zip(names, labels))
        if all(str(lab.get(k)) == str(val) for k, val in match.items()):
            merged.merge(LatencyHistogram.from_dict(v))
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
