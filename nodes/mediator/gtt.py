"""GGTT write emulation and the vGPU's shadow in the physical GGTT (gvt/gtt.c).

Rules (emulate_ggtt_mmio_write, intel_vgpu_reset_ggtt):
1. only aligned 4- or 8-byte accesses reach the GGTT
2. an entry outside the vGPU's aperture/hidden ranges: writes are dropped, reads return 0
3. a 4-byte write builds an entry from zero with only that half; the first half of an entry is
   kept pending (the guest entry holds just that half, the host entry is the scratch page alone,
   not present) until the other half comes and the two make the entry; a repeat of the same half
   replaces the pending half and leaves the host entry alone; an 8-byte write does not end a
   pending half
4. a present entry: gfn -> mfn through a pin at the hypervisor; where the pin fails the host entry
   is the guest's with the scratch frame, flags and present bit kept
5. a not-present entry: the host entry is the scratch frame alone
6. order: pin the new page, set the guest entry, release the old host entry's pin, set the host
   entry, flush the GGTT. A GFN_PIN that is refused or times out fails the access before anything
   changed, so the virtual GGTT never runs ahead of the shadow.
In failsafe the guest's accesses only copy to and from the virtual GGTT, which spans the whole
GGTT as the kernel's does (failsafe_emulate_mmio_rw).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from nodes.actions import Post
from nodes.errors import GvtError
from nodes.hw import gtt, regs
from nodes.mediator.aperture import Partition
from nodes.mediator.pins import GfnPins
from nodes.mediator.translate import translate_entries
from nodes.wire.schema import pack_write_batch

U64 = np.uint64
POST_ENTRIES = 32768        # host entries per MMIO_WRITE_BATCH: well inside a frame


class GgttShadow:
    """One vGPU's virtual GGTT (what the guest wrote) and its host entries (what the GPU sees)."""

    def __init__(self, vgpu: int, part: Partition, pins: GfnPins, scratch_mfn: int, gpu: str,
                 translate: Callable[..., tuple[int, int, int, int]] = translate_entries):
        self.vgpu = vgpu
        self.ap_base, self.ap_n = gtt.index_of_gm(part.aperture_base), gtt.index_of_gm(part.aperture_size)
        self.hi_base, self.hi_n = gtt.index_of_gm(part.hidden_base), gtt.index_of_gm(part.hidden_size)
        n = self.ap_n + self.hi_n
        self.pins, self.scratch_mfn, self.gpu, self.translate = pins, scratch_mfn, gpu, translate
        self.scratch_entry = gtt.encode(scratch_mfn, 0)                 # scratch alone
        self.reset_entry = gtt.encode(scratch_mfn, gtt.PTE_PRESENT)     # a new vGPU's entries
        self.vggtt = np.zeros(n, dtype=U64)
        self.host = np.full(n, self.reset_entry, dtype=U64)
        self.mapped_gfn = np.full(n, -1, dtype=np.int64)    # the gfn each host entry holds pinned
        self.partial: dict[int, tuple[int, int]] = {}       # local index -> (half, pending entry)
        self.outside: np.ndarray | None = None              # failsafe writes outside the partition
        self.counts = {"ok": 0, "scratch": 0, "not_present": 0, "dropped": 0, "partial": 0}

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

    def local1(self, idx: int) -> int:
        if self.ap_base <= idx < self.ap_base + self.ap_n:
            return idx - self.ap_base
        if self.hi_base <= idx < self.hi_base + self.hi_n:
            return idx - self.hi_base + self.ap_n
        return -1

    def range_valid(self, gm: int, size: int) -> bool:
        """intel_gvt_ggtt_validate_range: [gm, gm + size) lies inside the aperture or the hidden
        share of this vGPU."""
        first, last = gtt.index_of_gm(gm), gtt.index_of_gm(gm + max(size, 1) - 1)
        a, h = self.local1(first), self.local1(last)
        return a >= 0 and h >= 0 and (a < self.ap_n) == (h < self.ap_n) and h - a == last - first

    def global_index(self, loc: np.ndarray) -> np.ndarray:
        loc = loc.astype(np.int64, copy=False)
        return np.where(loc < self.ap_n, loc + self.ap_base, loc - self.ap_n + self.hi_base)

    # ---- guest accesses (not failsafe) ---------------------------------------------------------
    def read(self, off: int, size: int) -> int:
        _check_size(off, size)
        loc = self.local1(gtt.index_of(off))
        if loc < 0:
            return 0
        return gtt.bytes_of(int(self.vggtt[loc]), off, size)

    def write(self, off: int, size: int, val: int) -> Iterator[Any]:
        """One guest write to the GTT window (rule 1: aligned 4 or 8 bytes only)."""
        _check_size(off, size)
        if size == 8:
            return self.write_entries(np.array([gtt.index_of(off)]), np.array([val], dtype=U64))
        return self.write_half(off, val)

    def write_entries(self, idx: np.ndarray, vals: np.ndarray) -> Iterator[Any]:
        """Aligned 8-byte writes of whole entries, in guest order (a task fragment)."""
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
                loc, vals = uniq, vals[len(loc) - 1 - first]
        yield from self._update(loc, vals)
        return len(loc)

    def write_half(self, off: int, dword: int) -> Iterator[Any]:
        """A 4-byte write to one half of an entry (rule 3)."""
        loc = self.local1(gtt.index_of(off))
        if loc < 0:
            self.counts["dropped"] += 1
            return 0
        half = gtt.half(off)
        entry = gtt.with_bytes(0, off, 4, dword)        # built from zero: only this half
        pending = self.partial.get(loc)
        if pending is not None and pending[0] != half:
            # the other half is in: together they make the entry
            entry = gtt.with_bytes(entry, pending[0], 4, gtt.bytes_of(pending[1], pending[0], 4))
            yield from self._update(np.array([loc], dtype=np.int64), np.array([entry], dtype=U64))
            del self.partial[loc]
            return 1
        self.partial[loc] = (half, entry)
        self.vggtt[loc] = entry
        if pending is None:     # the first half: the host entry is scratch until the entry is whole
            self.counts["partial"] += 1
            yield from self._set_host(np.array([loc], dtype=np.int64),
                                      np.array([self.scratch_entry], dtype=U64),
                                      np.array([-1], dtype=np.int64))
        return 1

    # ---- failsafe accesses: the virtual GGTT only ---------------------------------------------
    def read_virtual(self, off: int, size: int) -> int:
        idx = gtt.index_of(off)
        loc = self.local1(idx)
        if loc >= 0:
            e = int(self.vggtt[loc])
        else:
            e = int(self.outside[idx]) if self.outside is not None else 0
        return gtt.bytes_of(e, off, size)

    def write_virtual(self, off: int, size: int, val: int) -> None:
        idx = gtt.index_of(off)
        loc = self.local1(idx)
        if loc >= 0:
            arr, i = self.vggtt, loc
        else:
            if self.outside is None:
                self.outside = np.zeros(gtt.ENTRIES, dtype=U64)
            arr, i = self.outside, idx
        arr[i] = gtt.with_bytes(int(arr[i]), off, size, val)

    # ---- the shadow ----------------------------------------------------------------------------
    def _update(self, loc: np.ndarray, vals: np.ndarray) -> Iterator[Any]:
        n = len(vals)
        out = np.empty(n, dtype=U64)
        missing = np.empty(n, dtype=U64)
        ok, scratch, not_present, n_miss = self.translate(vals, self.pins.cache, self.scratch_mfn,
                                                          out, missing)
        fetched = missing[:n_miss].astype(np.int64)
        if n_miss:
            yield from self.pins.fetch(fetched)     # may raise: nothing has changed yet
            ok, scratch, not_present, n_miss = self.translate(vals, self.pins.cache,
                                                              self.scratch_mfn, out, missing)
            if n_miss:
                raise GvtError("EIO", "gfns still missing after GFN_PIN")
        # from here on nothing can fail
        self.counts["ok"] += ok
        self.counts["scratch"] += scratch
        self.counts["not_present"] += not_present
        self.vggtt[loc] = vals
        gfn = gtt.frame_of(vals).astype(np.int64)
        holds = gtt.present(vals) & self.pins.pinned(gfn)
        yield from self._set_host(loc, out, np.where(holds, gfn, -1), fetched)

    def _set_host(self, loc: np.ndarray, out: np.ndarray, new_gfn: np.ndarray,
                  fetched: np.ndarray | None = None) -> Iterator[Any]:
        old = self.mapped_gfn[loc]
        old = old[old >= 0]
        self.pins.hold(new_gfn[new_gfn >= 0])
        self.pins.release(old)
        self.mapped_gfn[loc] = new_gfn
        self.host[loc] = out
        for post in self._host_posts(self.global_index(loc), out):
            yield post
        unpin = self.pins.settle(old if fetched is None else np.concatenate([old, fetched]))
        if unpin is not None:
            yield unpin
        yield Post(self.gpu, "MMIO_WRITE", {"off": regs.GFX_FLSH_CNTL, "size": 4, "val": 1}, vgpu=self.vgpu)

    def _host_posts(self, gidx: np.ndarray, vals: np.ndarray) -> Iterator[Post]:
        for a in range(0, len(gidx), POST_ENTRIES):
            g = gidx[a:a + POST_ENTRIES]
            yield Post(self.gpu, "MMIO_WRITE_BATCH",
                       pack_write_batch(gtt.offset_of(g), np.full(len(g), 8), vals[a:a + POST_ENTRIES]),
                       vgpu=self.vgpu)

    def rewrite(self) -> Iterator[Post]:
        """Every host entry of the partition, as the shadow has it, to the gpu again (a gpu that
        restarted has an empty GGTT)."""
        loc = np.arange(len(self.host), dtype=np.int64)
        yield from self._host_posts(self.global_index(loc), self.host)

    def reset(self) -> Iterator[Any]:
        """Every host entry of the partition to the scratch page, present, releasing the pins they
        held (a new vGPU; intel_vgpu_reset_ggtt on a device-model reset). The virtual GGTT and any
        pending half stay as they are, as in the kernel."""
        loc = np.arange(len(self.vggtt), dtype=np.int64)
        yield from self._set_host(loc, np.full(len(loc), self.reset_entry, dtype=U64),
                                  np.full(len(loc), -1, dtype=np.int64))


def _check_size(off: int, size: int) -> None:
    if size not in (4, 8) or off % size:
        raise GvtError("EINVAL", f"GTT access of {size} bytes at {off:#x}: only aligned 4- or 8-byte "
                       f"accesses reach the GGTT")
