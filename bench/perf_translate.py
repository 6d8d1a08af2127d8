"""How fast the GGTT entry translators are: C vs numpy vs pure Python on the same realistic data.

    python -c "from bench.perf_translate import run_translate, format_translate; \
print(format_translate(run_translate()))"
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np

from nodes.hw.gtt import ADDR_MASK as PTE_ADDR_MASK, PAGE_SHIFT, PTE_PRESENT
from nodes.mediator.translate import CACHE_INVALID, get_translator

CACHE_GFNS = 262144          # 1 GiB of guest memory in 4 KiB pages
INVALID_FRACTION = 0.02      # gfns whose pin failed
NOT_PRESENT_FRACTION = 0.05
OUT_OF_RANGE_FRACTION = 0.05  # present entries whose gfn is beyond the cache
PYTHON_MAX_ENTRIES = 100_000  # the pure-Python twin is timed on at most this many entries


def make_data(entries: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """(guest, cache, scratch_mfn): a fully pinned cache (no misses) and a guest GGTT range."""
    rng = np.random.default_rng(seed)
    # Distinct nonzero mfns spread over 16 GiB of host memory, as a shuffled pin history would.
    cache = (rng.permutation(4 * CACHE_GFNS)[:CACHE_GFNS] + 1).astype(np.uint64)
    cache[rng.random(CACHE_GFNS) < INVALID_FRACTION] = np.uint64(CACHE_INVALID)

    gfn = rng.integers(0, CACHE_GFNS, entries, dtype=np.uint64)
    far = rng.random(entries) < OUT_OF_RANGE_FRACTION
    gfn[far] = rng.integers(CACHE_GFNS, 1 << 34, int(far.sum()), dtype=np.uint64)
    # Random flag bits 11:1 (cache level, RW, ...) so the flag-preserving paths are exercised.
    flags = rng.integers(0, 1 << 11, entries, dtype=np.uint64) << np.uint64(1)
    present = (rng.random(entries) >= NOT_PRESENT_FRACTION).astype(np.uint64)
    guest = ((gfn << np.uint64(PAGE_SHIFT)) & np.uint64(PTE_ADDR_MASK)) | flags
    guest |= present * np.uint64(PTE_PRESENT)
    scratch_mfn = int(rng.integers(1, 1 << 20))
    return guest, cache, scratch_mfn


def _time_once(fn: Callable[..., Any], guest: np.ndarray, cache: np.ndarray, scratch: int,
               out: np.ndarray, missing: np.ndarray) -> tuple[float, tuple[int, int, int, int]]:
    t0 = time.perf_counter()
    counts = fn(guest, cache, scratch, out, missing)
    return time.perf_counter() - t0, counts


def run_translate(entries: int = 1_000_000, repeats: int = 7, seed: int = 1) -> dict:
    """Median time of each translator over `entries` guest entries (see module docstring)."""
    if entries < 1 or repeats < 1:
        raise ValueError("entries and repeats must be >= 1")
    try:
        impls = {name: get_translator(name) for name in ("c", "numpy", "python")}
    except RuntimeError as exc:
        raise RuntimeError(f"the C translator is not available, run `pip install -e .` first "
                           f"({exc})") from exc
    guest, cache, scratch = make_data(entries, seed)
    py_n = min(entries, PYTHON_MAX_ENTRIES)
    inputs = {"c": guest, "numpy": guest, "python": guest[:py_n]}
    outs = {name: np.zeros(len(inputs[name]), dtype=np.uint64) for name in impls}
    missing = {name: np.zeros(len(inputs[name]), dtype=np.uint64) for name in impls}
    times: dict[str, list[float]] = {name: [] for name in impls}
    counts: dict[str, tuple[int, int, int, int]] = {}

    # Round-robin, so a noisy neighbour or a frequency change hits every implementation alike.
    for _ in range(repeats):
        for name, fn in impls.items():
            dt, counts[name] = _time_once(fn, inputs[name], cache, scratch, outs[name],
                                          missing[name])
            times[name].append(dt)

    # Same results, or the timings compare different work.
    if counts["c"] != counts["numpy"] or not np.array_equal(outs["c"], outs["numpy"]):
        raise RuntimeError(f"c and numpy disagree: counts {counts['c']} vs {counts['numpy']}")
    c_head = impls["c"](guest[:py_n], cache, scratch, np.zeros(py_n, np.uint64),
                        np.zeros(py_n, np.uint64))
    if c_head != counts["python"] or not np.array_equal(outs["c"][:py_n], outs["python"]):
        raise RuntimeError(f"c and python disagree on the first {py_n} entries: "
                           f"counts {c_head} vs {counts['python']}")
    if counts["c"][3]:
        raise RuntimeError("benchmark data produced cache misses; the timings would be off")

    c_s = statistics.median(times["c"])
    numpy_s = statistics.median(times["numpy"])
    # The twin is linear in the number of entries: scale the timed slice up to `entries`.
    python_s = statistics.median(times["python"]) * entries / py_n
    n_ok, n_scratch, n_not_present, _ = counts["c"]
    return {
        "entries": entries,
        "repeats": repeats,
        "c_s": c_s,
        "numpy_s": numpy_s,
        "python_s": python_s,
        "c_vs_python": python_s / c_s,
        "c_vs_numpy": numpy_s / c_s,
        "numpy_vs_python": python_s / numpy_s,
        "python_entries_timed": py_n,
        "c_entries_per_s": entries / c_s,
        "n_ok": n_ok,
        "n_scratch": n_scratch,
        "n_not_present": n_not_present,
    }


def format_translate(result: dict) -> str:
    """A few lines for a terminal."""
    r = result
    py_note = ("" if r["python_entries_timed"] == r["entries"]
               else f" (timed on {r['python_entries_timed']:,}, scaled linearly)")
    return "\n".join([
        f"GGTT translate, {r['entries']:,} entries, median of {r['repeats']} runs",
        f"  c       {r['c_s'] * 1e3:10.3f} ms   {r['c_entries_per_s'] / 1e6:8.1f} M entries/s",
        f"  numpy   {r['numpy_s'] * 1e3:10.3f} ms",
        f"  python  {r['python_s'] * 1e3:10.3f} ms{py_note}",
        f"  speed-up: c vs python {r['c_vs_python']:.1f}x, c vs numpy {r['c_vs_numpy']:.1f}x, "
        f"numpy vs python {r['numpy_vs_python']:.1f}x",
    ])


if __name__ == "__main__":
    print(format_translate(run_translate()))
