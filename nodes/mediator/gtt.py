"""GGTT write emulation and the vGPU's shadow in the physical GGTT (gvt/gtt.c).

Rules (GVT-FACTS, emulate_ggtt_mmio_write):
1. only 4- or 8-byte aligned accesses; index = (offset - 8 MiB) >> 3
2. an entry outside the vGPU's aperture/hidden ranges: writes dropped, reads 0
3. a 4-byte half is kept in the virtual GGTT; until its other half arrives the host entry is the
   scratch page, not present
4. present: gfn -> mfn through the hypervisor (GFN_PIN, cached per vGPU); if that fails the host
   entry points at scratch but stays present
5. not present: scratch, present cleared; the old mapping is unpinned, then the GGTT is flushed
The translation of a batch runs in the C translator (pure-Python twin as fallback).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from nodes import hw
from nodes.errors import GvtError
from nodes.mediator.translate import CACHE_INVALID, translate_entries
from nodes.mediator.vgpu import Partition
from nodes.runtime import Call, Post

U64 = np.uint64
_ADDR = U64(hw.PTE_ADDR_MASK)
_INVALID = U64(CACHE_INVALID)


class GgttShadow:
    """One vGPU's virtual GGTT (what the guest wrote) and its host entries (what the GPU sees)."""

    def __init__(self, vgpu: int, part: Partition, cache_gfns: int, scratch_mfn: int,
                 hypervisor: str = "hypervisor", gpu: str = "gpu",
                 translate: Callable[..., tuple[int, int, int, int]] = translate_entries):
        self.vgpu = vgpu
        self.ap_base = part.aperture_base >> hw.PAGE_SHIFT
        self.ap_n = part.aperture_size >> hw.PAGE_SHIFT
        self.hi_base = part.hidden_base >> hw.PAGE_SHIFT
        self.hi_n = part.hidden_size >> hw.PAGE_SHIFT
        n = self.ap_n + self.hi_n
        self.scratch_mfn = scratch_mfn
        self.scratch_entry = hw.pte_encode(scratch_mfn, 0)
        self.vggtt = np.zeros(n, dtype=U64)
        # a new vGPU's host entries: the scratch page, present (kernel: intel_vgpu_reset_ggtt)
        self.reset_entry = hw.pte_encode(scratch_mfn, hw.PTE_PRESENT)
        self.host = np.full(n, self.reset_entry, dtype=U64)
        self.mapped_gfn = np.full(n, -1, dtype=np.int64)      # the gfn this entry holds pinned
        self.cache = np.zeros(cache_gfns, dtype=U64)          # gfn -> mfn (0: not pinned)
        self.pins = np.zeros(cache_gfns, dtype=np.int64)      # entries holding each gfn
        self.partial: dict[int, int] = {}                     # local index -> the half written
        self.hypervisor, self.gpu = hypervisor, gpu
        self.translate = translate
        self.counts = {"ok": 0, "scratch": 0, "not_present": 0, "dropped": 0, "partial": 0}
        self.pin_calls = 0

    # ---- index spaces ------------------------------------------------------------------------
    def local(self, idx: np.ndarray) -> np.ndarray:
        """Global GGTT index -> index into this vGPU's arrays, -1 outside its partition."""
        idx = idx.astype(np.int64, copy=False)
        loc = np.full(idx.shape, -1, dtype=np.int64)
        a = (idx >= self.ap_base) & (idx < self.ap_base + self.ap_n)
        loc[a] = idx[a] - self.ap_base
        h = (idx >= self.hi_base) & (idx < self.hi_base + self.hi_n)
        loc[h] = idx[h] - self.hi_base + self.ap_n
        return loc

    def global_index(self, loc: np.ndarray) -> np.ndarray:
        loc = loc.astype(np.int64, copy=False)
        return np.where(loc < self.ap_n, loc + self.ap_base, loc - self.ap_n + self.hi_base)

    def local1(self, idx: int) -> int:
        if self.ap_base <= idx < self.ap_base + self.ap_n:
            return idx - self.ap_base
        if self.hi_base <= idx < self.hi_base + self.hi_n:
            return idx - self.hi_base + self.ap_n
        return -1

    def all_global(self) -> np.ndarray:
        return self.global_index(np.arange(len(self.vggtt)))

    # ---- guest accesses ----------------------------------------------------------------------
    def read(self, off: int, size: int) -> int:
        _check(off, size)
        loc = self.local1((off - hw.GTT_OFFSET) >> 3)
        if loc < 0:
            return 0
        e = int(self.vggtt[loc])
        return e if size == 8 else (e >> ((off & 4) * 8)) & 0xFFFFFFFF

    def write_entries(self, idx: np.ndarray, vals: np.ndarray, shadow: bool = True) -> Iterator[Any]:
        """Full 8-byte entry writes (a task fragment). With shadow=False (failsafe) only the
        virtual GGTT changes."""
        loc = self.local(idx)
        inside = loc >= 0
        self.counts["dropped"] += int(len(loc) - np.count_nonzero(inside))
        loc, vals = loc[inside], vals[inside].astype(U64, copy=False)
        if len(loc) == 0:
            return 0
        if len(loc) > 1:        # a later write to the same entry in one batch wins
            rev = loc[::-1]
            uniq, first = np.unique(rev, return_index=True)
            if len(uniq) != len(loc):
                keep = len(loc) - 1 - first
                loc, vals = uniq, vals[keep]
        self.vggtt[loc] = vals
        if self.partial:
            for l in loc.tolist():
                self.partial.pop(l, None)
        if not shadow:
            return 0
        yield from self._shadow(loc, vals)
        return len(loc)

    def write_half(self, off: int, val: int, shadow: bool = True) -> Iterator[Any]:
        """A 4-byte write to one half of an entry."""
        _check(off, 4)
        loc = self.local1((off - hw.GTT_OFFSET) >> 3)
        if loc < 0:
            self.counts["dropped"] += 1
            return 0
        half = off & 4
        shift = half * 8
        old = int(self.vggtt[loc])
        new = (old & ~(0xFFFFFFFF << shift)) | ((val & 0xFFFFFFFF) << shift)
        self.vggtt[loc] = new
        if not shadow:
            return 0
        other = self.partial.get(loc)
        if other is not None and other != half:
            del self.partial[loc]           # both halves are in: the entry is whole again
            yield from self._shadow(np.array([loc], dtype=np.int64), np.array([new], dtype=U64))
        else:
            self.partial[loc] = half
            self.counts["partial"] += 1
            yield from self._scratch(np.array([loc], dtype=np.int64))
        return 1

    # ---- the shadow --------------------------------------------------------------------------
    def _shadow(self, loc: np.ndarray, vals: np.ndarray) -> Iterator[Any]:
        n = len(vals)
        out = np.empty(n, dtype=U64)
        missing = np.empty(n, dtype=U64)
        ok, scratch, not_present, n_miss = self.translate(vals, self.cache, self.scratch_mfn, out, missing)
        if n_miss:
            gfns = np.unique(missing[:n_miss])
            self.pin_calls += 1
            reply = yield Call(self.hypervisor, "GFN_PIN", {"gfns": gfns.tobytes()}, vgpu=self.vgpu)
            mfns = _u64(reply, "mfns")
            if len(mfns) != len(gfns):
                raise GvtError("EPROTO", f"GFN_PIN answered {len(mfns)} mfns for {len(gfns)} gfns")
            self.cache[gfns.astype(np.int64)] = np.where(mfns == 0, _INVALID, mfns)
            ok, scratch, not_present, n_miss = self.translate(vals, self.cache, self.scratch_mfn, out, missing)
            if n_miss:
                raise GvtError("EIO", "gfns still missing after GFN_PIN")
        self.counts["ok"] += ok
        self.counts["scratch"] += scratch
        self.counts["not_present"] += not_present
        # which entries now hold a pin: present, in the cache range, and pinned successfully
        gfn = ((vals & _ADDR) >> U64(hw.PAGE_SHIFT)).astype(np.int64)
        holds = ((vals & U64(hw.PTE_PRESENT)) != 0) & (gfn < len(self.cache))
        gfn_c = np.where(holds, gfn, 0)
        holds &= self.cache[gfn_c] != _INVALID
        new_gfn = np.where(holds, gfn, -1)
        yield from self._commit(loc, out, new_gfn)

    def _scratch(self, loc: np.ndarray, entry: int | None = None) -> Iterator[Any]:
        out = np.full(len(loc), self.scratch_entry if entry is None else entry, dtype=U64)
        yield from self._commit(loc, out, np.full(len(loc), -1, dtype=np.int64))

    def _commit(self, loc: np.ndarray, out: np.ndarray, new_gfn: np.ndarray) -> Iterator[Any]:
        old_gfn = self.mapped_gfn[loc]
        old = old_gfn[old_gfn >= 0]
        new = new_gfn[new_gfn >= 0]
        if len(new):
            np.add.at(self.pins, new, 1)
        if len(old):
            np.subtract.at(self.pins, old, 1)
        self.mapped_gfn[loc] = new_gfn
        self.host[loc] = out
        gidx = self.global_index(loc)
        yield Post(self.gpu, "MMIO_WRITE_BATCH",
                   {"off": (gidx * 8 + hw.GTT_OFFSET).astype("<u8").tobytes(),
                    "val": out.astype("<u8").tobytes()}, vgpu=self.vgpu)
        if len(old):
            cand = np.unique(old)
            gone = cand[self.pins[cand] == 0]
            if len(gone):
                self.cache[gone] = 0
                yield Post(self.hypervisor, "GFN_UNPIN", {"gfns": gone.astype("<u8").tobytes()},
                           vgpu=self.vgpu)
        yield Post(self.gpu, "MMIO_WRITE", {"off": hw.GFX_FLSH_CNTL, "size": 4, "val": 1}, vgpu=self.vgpu)

    def scratch_all(self) -> Iterator[Any]:
        """Point every entry of the partition at the scratch page, present (a new vGPU, a reset)."""
        loc = np.arange(len(self.vggtt), dtype=np.int64)
        self.vggtt[:] = 0
        self.partial.clear()
        yield from self._scratch(loc, self.reset_entry)

    def pinned_gfns(self) -> int:
        return int(np.count_nonzero(self.pins))


def _check(off: int, size: int) -> None:
    if size not in (4, 8) or off % size:
        raise GvtError("EINVAL", f"GTT access of {size} bytes at {off:#x}: only aligned 4- or 8-byte "
                       f"accesses reach the GGTT")
    if not hw.GTT_OFFSET <= off < hw.BAR0_SIZE:
        raise GvtError("EFAULT", f"offset {off:#x} is outside the GTT window")


def _u64(reply: Any, field: str) -> np.ndarray:
    if not isinstance(reply, dict) or not isinstance(reply.get(field), bytes) or len(reply[field]) % 8:
        raise GvtError("EPROTO", f"reply lacks {field!r} as packed u64 values")
    return np.frombuffer(reply[field], dtype="<u8").astype(U64)
