"""Guest PTE -> host PTE translation for a batch of GGTT entries.

The mediator keeps a per-vGPU cache indexed by gfn: 0 means "not pinned yet", all ones means
"pinning failed", anything else is the mfn. For each guest entry e at index i:

* not present: out[i] = the scratch page alone, no flag bits (the kernel builds the host entry
  of a not-present guest entry from zero)
* present, gfn outside the cache or cached invalid: flags kept (present too), scratch page
* present, cache miss: out[i] = 0 and the gfn is appended to `missing`; the caller pins the
  missing gfns, fills the cache and calls again
* present, cached: flags kept, address replaced by the mfn

Every argument except scratch_mfn is a C-contiguous buffer of 64-bit words (numpy uint64 arrays
in practice); `out` and `missing` need at least len(guest) entries and must be writable. Only
out[:len(guest)] and missing[:n_missing] are meaningful afterwards. `out` may be `guest` itself
(in-place translation); any other overlap between the buffers is rejected, because the result
would then depend on the order in which entries are visited.

Three implementations give identical results: C (the default), a pure-Python twin (fallback and
reference, forced with GVTBENCH_PURE=1) and numpy (for benchmark comparison).
"""
from __future__ import annotations

import operator
import os
from typing import Any, Callable

import numpy as np

from nodes.hw.gtt import ADDR_MASK as PTE_ADDR_MASK, PAGE_SHIFT, PTE_PRESENT

CACHE_MISS = 0                      # cache[gfn] == 0: gfn not pinned yet
CACHE_INVALID = 0xFFFFFFFFFFFFFFFF  # cache[gfn]: pin failed, gfn invalid

# The largest frame number whose address still fits in bits 45:12 of an entry.
MAX_MFN = PTE_ADDR_MASK >> PAGE_SHIFT

Counts = tuple[int, int, int, int]
Translator = Callable[[Any, Any, int, Any, Any], Counts]

__all__ = [
    "CACHE_MISS", "CACHE_INVALID", "MAX_MFN", "TRANSLATOR", "get_translator",
    "translate_entries", "translate_entries_python", "translate_entries_numpy",
]


# ---- argument checks shared by the Python and numpy versions (the C one mirrors them) --------
def _words(obj: Any, name: str, writable: bool) -> memoryview:
    """`obj` as a flat memoryview of uint64, with the same errors the C version raises."""
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(f"{name}: expected a buffer of 64-bit words (e.g. a numpy uint64 array), "
                        f"got {type(obj).__name__}") from None
    if mv.itemsize != 8:
        raise ValueError(f"{name}: itemsize must be 8 (uint64), got {mv.itemsize}")
    if not mv.c_contiguous:
        raise ValueError(f"{name}: buffer must be C-contiguous")
    if writable and mv.readonly:
        raise ValueError(f"{name}: buffer is read-only, it must be writable")
    # Going through bytes flattens any shape and lets any 8-byte format be read as raw words.
    return mv.cast("B").cast("Q")


def _span(mv: memoryview, count: int) -> tuple[int, int]:
    """[start, end) byte addresses of the first `count` words of `mv`."""
    start = np.frombuffer(mv, dtype=np.uint8).__array_interface__["data"][0] if mv.nbytes else 0
    return start, start + 8 * count


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[1] > a[0] and b[1] > b[0] and a[0] < b[1] and b[0] < a[1]


def _check(guest: Any, cache: Any, scratch_mfn: Any, out: Any, missing: Any
           ) -> tuple[memoryview, memoryview, int, memoryview, memoryview]:
    try:
        scratch = operator.index(scratch_mfn)
    except TypeError:
        raise TypeError(f"scratch_mfn: expected an int, got {type(scratch_mfn).__name__}") from None
    if not 0 <= scratch <= MAX_MFN:
        raise ValueError(f"scratch_mfn: must be in 0..{MAX_MFN:#x} so it fits PTE bits 45:12")
    g = _words(guest, "guest", False)
    c = _words(cache, "cache", False)
    o = _words(out, "out", True)
    m = _words(missing, "missing", True)
    n = len(g)
    if len(o) < n:
        raise ValueError(f"out: has {len(o)} entries, needs at least len(guest) = {n}")
    if len(m) < n:
        raise ValueError(f"missing: has {len(m)} entries, needs at least len(guest) = {n}")
    gs, cs, os_, ms = _span(g, n), _span(c, len(c)), _span(o, n), _span(m, n)
    if os_[0] != gs[0] and _overlap(os_, gs):
        raise ValueError("out: overlaps guest (only out and guest being the very same buffer "
                         "is allowed)")
    if _overlap(os_, cs):
        raise ValueError("out: overlaps cache")
    if _overlap(ms, gs) or _overlap(ms, cs) or _overlap(ms, os_):
        raise ValueError("missing: overlaps guest, cache or out")
    return g, c, scratch, o, m


# ---- pure Python twin --------------------------------------------------------------------------
def translate_entries_python(guest: Any, cache: Any, scratch_mfn: int, out: Any,
                             missing: Any) -> Counts:
    """Reference implementation: one plain loop over Python ints. Returns
    (n_ok, n_scratch, n_not_present, n_missing)."""
    g, c, scratch, o, m = _check(guest, cache, scratch_mfn, out, missing)
    # Locals, because attribute and global lookups dominate a loop this small.
    addr_mask = PTE_ADDR_MASK
    flag_mask = 0xFFFFFFFFFFFFFFFF & ~PTE_ADDR_MASK
    scratch_addr = scratch << PAGE_SHIFT
    ncache = len(c)
    invalid = CACHE_INVALID
    n_ok = n_scratch = n_not_present = n_missing = 0
    for i, e in enumerate(g):
        if not e & PTE_PRESENT:
            o[i] = scratch_addr
            n_not_present += 1
            continue
        gfn = (e & addr_mask) >> PAGE_SHIFT
        v = c[gfn] if gfn < ncache else invalid
        if v == invalid:
            o[i] = (e & flag_mask) | scratch_addr
            n_scratch += 1
        elif v == CACHE_MISS:
            m[n_missing] = gfn
            n_missing += 1
            o[i] = 0
        else:
            o[i] = (e & flag_mask) | ((v << PAGE_SHIFT) & addr_mask)
            n_ok += 1
    return n_ok, n_scratch, n_not_present, n_missing


# ---- numpy -------------------------------------------------------------------------------------
_U = np.uint64
_ADDR = _U(PTE_ADDR_MASK)
_FLAGS = _U(0xFFFFFFFFFFFFFFFF & ~PTE_ADDR_MASK)
_SHIFT = _U(PAGE_SHIFT)
_INVALID = _U(CACHE_INVALID)


def translate_entries_numpy(guest: Any, cache: Any, scratch_mfn: int, out: Any,
                            missing: Any) -> Counts:
    """Vectorized version: whole-array passes instead of a loop. Returns
    (n_ok, n_scratch, n_not_present, n_missing)."""
    gm, cm, scratch, om, mm = _check(guest, cache, scratch_mfn, out, missing)
    g = np.frombuffer(gm, dtype=_U)
    c = np.frombuffer(cm, dtype=_U)
    n = len(g)
    present = (g & _U(PTE_PRESENT)).astype(bool)
    gfn = (g & _ADDR) >> _SHIFT
    in_range = gfn < _U(len(c))
    if len(c):
        # Clamp the index so the gather stays in bounds, then overrule the clamped lookups.
        v = np.where(in_range, c[np.where(in_range, gfn, _U(0))], _INVALID)
    else:
        v = np.full(n, _INVALID, dtype=_U)
    use_scratch = ~present | (v == _INVALID)
    miss = present & (v == _U(CACHE_MISS))
    res = np.where(present, g & _FLAGS, _U(0)) | np.where(use_scratch, _U(scratch << PAGE_SHIFT),
                                                         (v << _SHIFT) & _ADDR)
    res[miss] = 0
    # The result is complete before anything is stored, so out may be guest itself.
    np.frombuffer(om, dtype=_U)[:n] = res
    missed = gfn[miss]
    np.frombuffer(mm, dtype=_U)[:len(missed)] = missed
    n_not_present = n - int(np.count_nonzero(present))
    n_scratch = int(np.count_nonzero(use_scratch)) - n_not_present
    n_missing = len(missed)
    return n - n_scratch - n_not_present - n_missing, n_scratch, n_not_present, n_missing


# ---- selection ---------------------------------------------------------------------------------
try:
    from nodes.mediator import _ctranslate
except ImportError as exc:          # not built: `pip install -e .` builds it
    _ctranslate = None
    _C_IMPORT_ERROR: str = str(exc)
else:
    _C_IMPORT_ERROR = ""

translate_entries_c: Translator | None = (
    _ctranslate.translate_entries if _ctranslate is not None else None)

if translate_entries_c is not None and os.environ.get("GVTBENCH_PURE") != "1":
    TRANSLATOR: str = "c"
    translate_entries: Translator = translate_entries_c
else:
    TRANSLATOR = "python"
    translate_entries = translate_entries_python


def get_translator(name: str) -> Translator:
    """The implementation called `name`: "c", "python" or "numpy"."""
    if name == "c":
        if translate_entries_c is None:
            raise RuntimeError("the C translator nodes.mediator._ctranslate is not built "
                               f"({_C_IMPORT_ERROR}); run `pip install -e .`")
        return translate_entries_c
    if name == "python":
        return translate_entries_python
    if name == "numpy":
        return translate_entries_numpy
    raise ValueError(f"unknown translator {name!r}; expected 'c', 'python' or 'numpy'")
