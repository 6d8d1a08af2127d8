"""PPGTT shadowing (the PPGTT half of gvt/gtt.c): a guest's 4-level (or legacy 3-level) page
tables get shadow tables in the host pool whose entries hold machine frames, and the GPU walks
only those.

Rules, as the kernel has them:
1. a guest table page is pinned and write-protected (page tracking) before it is read, so no
   later guest write goes unseen; a table already shadowed for that gfn and level is found and
   referenced, not built again (intel_vgpu_find_spt_by_gfn)
2. a child table is populated before the entry that points at it is linked
   (ppgtt_populate_spt_by_guest_entry), so the live tree never points at a half-built table
3. a leaf table is translated whole (512 entries) by the translator; an entry that was never
   present stays zero (the GPU faults there); a present entry whose gfn is not guest RAM points
   at the vGPU's scratch page (ppgtt_populate_spt: is_valid_gfn)
4. a 2 MiB entry is shadowed as a 2 MiB entry only where its 512 machine frames are contiguous
   and aligned, else split into a 4 KiB table (is_2MB_gtt_possible / split_2MB_gtt_entry); a
   64 KiB (IPS) table, when the guest enabled 64 KiB pages, has each 64 KiB entry split into 16
   4 KiB ones (split_64KB_gtt_entry); a 1 GiB PDP entry is refused (EINVAL)
5. a tracked 8-byte write adds the new entry before it removes the old one
   (ppgtt_handle_guest_write_page_table): the new child is found or built and linked, then what
   the old entry held is released; a write of the value the entry has changes nothing; a new
   entry that cannot be shadowed (a leaf whose gfn is not guest RAM: ENXIO, a table that is not
   RAM: EINVAL) leaves the old shadow in place and fails the write
6. a removed entry points at the scratch of its level, and so does a half-written (4-byte) one
   until it is shadowed whole before the vGPU's next workload (post_shadow,
   intel_vgpu_flush_post_shadow)
7. what a shadow takes it gives back exactly: a failure releases what that operation took and
   nothing else, pins never go below zero, and no pool page returns to the free list while a
   live shadow entry points at it (a table is freed only once nothing references it)
8. PPGTTs (intel_vgpu_mm): a workload and each G2V create hold a reference; a workload that
   runs pins it. Under its quota of pool pages, a vGPU's PPGTTs that no running workload pins
   lose their shadow, least recently used first (reclaim_one_ppgtt_mm), and get it back when a
   workload pins them again. A full GT reset drops every shadow (intel_vgpu_invalidate_ppgtt).

Scratch: in the kernel's mode ("kernel", the default) the vGPU's scratch tree is present
(alloc_scratch_pages), so removed and half-written entries, and RAM-less leaves, absorb GPU
accesses into the vGPU's own scratch page. In the strict mode ("fault") every shadow entry
that does not map guest RAM is not present, so a stray GPU access faults and shows.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from nodes.errors import GvtError
from nodes.hw import PAGE_SHIFT, PAGE_SIZE, lrc
from nodes.mediator.dma import HostPool, QuotaExceeded
from nodes.mediator.page_track import PageTrack
from nodes.mediator.translate import CACHE_INVALID
from nodes.memory import Fabric

PPGTT_RESULTS = ("ok", "invalid", "huge_2m", "split_2m", "split_64k")  # what shadowing an entry gives
SCRATCH_MODES = ("kernel", "fault")
MAX_MMS = 128                   # PPGTTs a vGPU may have (the kernel has no bound but memory)

if TYPE_CHECKING:
    from nodes.mediator.pins import GfnPins

U64 = np.uint64
N = lrc.ENTRIES_PER_TABLE
PT = 3                                  # the leaf level
IPS_STRIDE = 16                         # 4 KiB entries a 64 KiB entry stands for
_Q = struct.Struct("<Q")
FLAGS_MASK = ~lrc.ADDR_MASK & 0xFFFFFFFFFFFFFFFF


class Scratch:
    """A vGPU's scratch tree (alloc_scratch_pages): page[level] is what an entry of a table of
    that level points at when it maps nothing: page[3] the data page, page[2] a PT, page[1] a
    PD, page[0] a PDP. In the kernel's mode each table's entries point at the next, present."""

    def __init__(self, pool: HostPool, vgpu: int, mode: str):
        if mode not in SCRATCH_MODES:
            raise GvtError("EINVAL", f"scratch mode {mode!r}: one of {', '.join(SCRATCH_MODES)}")
        self.mode = mode
        self.page = [0, 0, 0, 0]
        for level in (3, 2, 1, 0):
            mfn = self.page[level] = pool.alloc(f"vgpu{vgpu} ppgtt scratch {lrc.LEVEL_NAMES[level]}")
            if level < 3 and mode == "kernel":
                e = (self.page[level + 1] << PAGE_SHIFT) | lrc.PTE_PRESENT | lrc.PTE_RW
                pool.write(mfn, 0, np.full(N, e, dtype="<u8").tobytes())

    def entry(self, level: int, old: int) -> int:
        """What a removed (or half-written) entry of a table of `level` becomes: the scratch of
        that level with the old shadow entry's flags, present only in the kernel's mode."""
        e = (self.page[level] << PAGE_SHIFT) | (old & FLAGS_MASK & ~lrc.PDE_PS_2M)
        return e if self.mode == "kernel" else e & ~lrc.PTE_PRESENT

    def expected(self, level: int) -> bytes:
        """What scratch table `level` (0..2) must hold (the ledger's check)."""
        if self.mode != "kernel":
            return bytes(PAGE_SIZE)
        e = (self.page[level + 1] << PAGE_SHIFT) | lrc.PTE_PRESENT | lrc.PTE_RW
        return np.full(N, e, dtype="<u8").tobytes()

    def release(self, pool: HostPool) -> None:
        for m in self.page:
            pool.release(m)


class ShadowTable:
    __slots__ = ("gfn", "level", "mfn", "ips", "guest", "shadowed", "children", "held", "refs",
                 "split", "post_shadow")

    def __init__(self, gfn: int, level: int, mfn: int, split: bool = False, ips: bool = False):
        self.gfn, self.level, self.mfn, self.split, self.ips = gfn, level, mfn, split, ips
        self.guest = np.zeros(N, dtype=U64)         # the guest's entries, as last written
        self.shadowed = np.zeros(N, dtype=U64)      # the guest entry each shadow entry reflects
        self.children: dict[int, ShadowTable] = {}  # index -> child shadow (upper levels)
        self.held = np.full(N, -1, dtype=np.int64)  # index -> gfn pinned for it (leaf)
        self.refs = 0
        self.post_shadow: set[int] = set()


class PpgttMm:
    """One guest PPGTT (intel_vgpu_mm of type PPGTT): its root pointers and, while shadowed,
    their shadow tables. refs: workloads and G2V creates that hold it; pins: workloads running
    on it (those it may not be reclaimed from)."""
    __slots__ = ("key", "level", "root_gfns", "roots", "refs", "pins", "shadowed", "used")

    def __init__(self, key: tuple, level: int, root_gfns: list[int]):
        self.key, self.level, self.root_gfns = key, level, root_gfns
        self.roots: list[ShadowTable | None] = []
        self.refs = self.pins = 0
        self.shadowed = False
        self.used = 0                               # LRU stamp

    def shadow_pdps(self) -> list[int]:
        """What the shadow context's PDP registers hold: machine addresses of the shadow roots
        (0 for a root that is not present)."""
        return [t.mfn << PAGE_SHIFT if t is not None else 0 for t in self.roots]


class Ppgtt:
    """The PPGTT shadows of one vGPU."""

    def __init__(self, vgpu: int, pool: HostPool, fabric: Fabric, pins: GfnPins, track: PageTrack,
                 translate: Callable[..., tuple[int, int, int, int]], scratch: Scratch,
                 ips_enabled: Callable[[], bool] = lambda: False):
        self.vgpu, self.pool, self.fabric, self.pins = vgpu, pool, fabric, pins
        self.track, self.translate = track, translate
        self.scratch = scratch
        self.ips_enabled = ips_enabled
        self.tables: dict[tuple[int, int], ShadowTable] = {}
        self.by_gfn: dict[int, list[ShadowTable]] = {}
        self.mms: dict[tuple, PpgttMm] = {}
        self.counts = {"tracked_writes": 0, "reclaimed": 0, **{r: 0 for r in PPGTT_RESULTS}}
        self.pages = 0                              # host pool pages the shadows hold
        self._clock = 0

    # ---- PPGTTs ------------------------------------------------------------------------------
    def _key(self, addressing: int, pdps: list[int]) -> tuple[tuple, int, list[int]]:
        if addressing == lrc.ADDRESSING_LEGACY_64B:
            level, roots = 0, [pdps[0]]
        elif addressing == lrc.ADDRESSING_LEGACY_32B:
            level, roots = 2, list(pdps[:4])
        else:
            raise GvtError("EINVAL", f"addressing mode {addressing} is not a PPGTT mode (1: legacy "
                           f"32-bit, 3: legacy 64-bit)")
        for r in roots:
            if r & (PAGE_SIZE - 1):
                raise GvtError("EINVAL", f"PPGTT root {r:#x} is not a page-aligned guest address")
        return (level, *roots), level, roots

    def get_mm(self, addressing: int, pdps: list[int]) -> Iterator[Any]:
        """The PPGTT whose roots the context gives (intel_vgpu_get_ppgtt_mm, created and
        shadowed on first use); one more reference to it."""
        key, level, roots = self._key(addressing, pdps)
        mm = self.mms.get(key)
        if mm is None:
            if len(self.mms) >= MAX_MMS:
                raise GvtError("ENOSPC", f"vGPU {self.vgpu} has {MAX_MMS} PPGTTs, the most the "
                               f"mediator keeps for one vGPU")
            mm = PpgttMm(key, level, [r >> PAGE_SHIFT for r in roots])
            yield from self.shadow_mm(mm)
            self.mms[key] = mm
        mm.refs += 1
        return mm

    def put_mm(self, mm: PpgttMm) -> Iterator[Any]:
        if mm.refs <= 0:
            raise RuntimeError(f"vGPU {self.vgpu}: a PPGTT reference released twice")
        mm.refs -= 1
        if mm.refs == 0 and self.mms.get(mm.key) is mm:
            del self.mms[mm.key]
            yield from self.invalidate(mm)

    def pin_mm(self, mm: PpgttMm) -> Iterator[Any]:
        """A workload runs on it (intel_vgpu_pin_mm): shadowed again if it was reclaimed."""
        if not mm.shadowed:
            yield from self.shadow_mm(mm)
        mm.pins += 1
        self._clock += 1
        mm.used = self._clock

    def unpin_mm(self, mm: PpgttMm) -> None:
        if mm.pins <= 0:
            raise RuntimeError(f"vGPU {self.vgpu}: a PPGTT unpinned more often than pinned")
        mm.pins -= 1

    def shadow_mm(self, mm: PpgttMm) -> Iterator[Any]:
        """Build the shadow of every present root (a root pointer of 0 is not present); at the
        quota, this vGPU's other PPGTTs not in use lose their shadow first, and the whole build
        is tried once more."""
        for attempt in (0, 1):
            try:
                roots: list[ShadowTable | None] = []
                try:
                    for g in mm.root_gfns:
                        roots.append((yield from self._get_table(g, mm.level)) if g else None)
                except GvtError:
                    for t in reversed(roots):
                        if t is not None:
                            yield from self._unref(t)
                    raise
                mm.roots, mm.shadowed = roots, True
                self._clock += 1
                mm.used = self._clock
                return
            except QuotaExceeded:
                if attempt or not (yield from self.reclaim(keep=mm)):
                    raise

    def invalidate(self, mm: PpgttMm) -> Iterator[Any]:
        """Drop the shadow of a PPGTT (invalidate_ppgtt_mm); the PPGTT itself stays."""
        if mm.pins:
            raise RuntimeError(f"vGPU {self.vgpu}: the shadow of a PPGTT a running workload pins "
                               f"was to be dropped")
        roots, mm.roots, mm.shadowed = mm.roots, [], False
        for t in roots:
            if t is not None:
                yield from self._unref(t)

    def reclaim(self, keep: PpgttMm | None = None, pages: int = 0) -> Iterator[Any]:
        """Drop the shadows of this vGPU's PPGTTs that no running workload pins, least recently
        used first, until `pages` pages are free under the quota (all of them for 0). Returns
        whether any shadow was dropped."""
        victims = sorted((m for m in self.mms.values() if m.shadowed and not m.pins and m is not keep),
                         key=lambda m: m.used)
        dropped = False
        for m in victims:
            if pages and self.pool.room(self.vgpu) >= pages:
                break
            yield from self.invalidate(m)
            self.counts["reclaimed"] += 1
            dropped = True
        return dropped

    def invalidate_all(self) -> Iterator[Any]:
        """A full GT reset (intel_vgpu_invalidate_ppgtt): every PPGTT loses its shadow."""
        for mm in list(self.mms.values()):
            if mm.shadowed:
                yield from self.invalidate(mm)

    def destroy_all(self) -> Iterator[Any]:
        """A device-model reset (intel_vgpu_destroy_all_ppgtt_mm): every PPGTT goes. The reset
        has released every workload first, so no running workload pins one."""
        for mm in list(self.mms.values()):
            del self.mms[mm.key]
            mm.refs = 0
            if mm.shadowed:
                yield from self.invalidate(mm)

    def find_mm(self, addressing: int, pdps: list[int]) -> PpgttMm | None:
        try:
            key, _level, _roots = self._key(addressing, pdps)
        except GvtError:
            return None
        return self.mms.get(key)

    # ---- building shadows ----------------------------------------------------------------------
    def _get_table(self, gfn: int, level: int, ips: bool = False) -> Iterator[Any]:
        """The shadow of the guest table at gfn (ppgtt_populate_spt_by_guest_entry): found and
        referenced, or built whole (tracked, pinned, read, its entries shadowed) before anyone
        links it. A failure gives back what this call took."""
        t = self.tables.get((gfn, level))
        if t is not None:
            if level == PT and t.ips != ips:
                yield from self._reshadow_ips(t, ips)      # "reshadow PDE since ips changed"
            t.refs += 1
            return t
        if not 0 <= gfn < len(self.pins.cache):
            raise GvtError("EINVAL", f"PPGTT {lrc.LEVEL_NAMES[level]} table at gfn {gfn:#x} is not "
                           f"guest RAM (its page cannot be tracked)")
        mfn = self._alloc(f"vgpu{self.vgpu} ppgtt {lrc.LEVEL_NAMES[level]}")
        t = ShadowTable(gfn, level, mfn, ips=ips)
        arr = np.array([gfn], dtype=np.int64)
        tracked = pinned = False
        try:
            yield from self.pins.fetch(arr)
            if int(self.pins.cache[gfn]) in (0, CACHE_INVALID):
                raise GvtError("EINVAL", f"PPGTT {lrc.LEVEL_NAMES[level]} table at gfn {gfn:#x} "
                               f"is not guest RAM")
            self.pins.hold(arr)
            pinned = True
            tracked = yield from self.track.enable([gfn], self.on_write)
            raw = yield from self.fabric.read(int(self.pins.cache[gfn]), 0, PAGE_SIZE)
            t.guest[:] = np.frombuffer(raw, dtype="<u8")
            self.tables[(gfn, level)] = t
            self.by_gfn.setdefault(gfn, []).append(t)
            try:
                yield from self._populate(t)
            except BaseException:
                self._unlist(t)
                raise
        except BaseException:
            if tracked:
                yield from self.track.disable([gfn])
            self._free(mfn)
            if pinned:
                yield from self._unpin([gfn])
            else:
                post = self.pins.settle(arr)
                if post is not None:
                    yield post
            raise
        t.refs = 1
        return t

    def _populate(self, t: ShadowTable) -> Iterator[Any]:
        """Every present entry of a new table (ppgtt_populate_spt); on a failure the entries
        shadowed so far are released."""
        if t.level == PT:
            yield from self._shadow_leaves(t, np.arange(N))
            return
        out = np.zeros(N, dtype=U64)
        done: list[int] = []
        try:
            for i in np.flatnonzero(_present(t.guest)).tolist():
                out[i] = yield from self._shadow_upper(t, i, int(t.guest[i]))
                done.append(i)
        except BaseException:
            for i in reversed(done):
                yield from self._release_entry(t, i)
            raise
        t.shadowed[:] = t.guest
        self._store(t, np.arange(N), out)

    def _shadow_upper(self, t: ShadowTable, i: int, v: int) -> Iterator[Any]:
        """The shadow of a present upper-level entry: its child found or built (it is linked by
        the caller once this returns), or a 2 MiB page; t.children[i] is set."""
        if t.level == 1 and v & lrc.PDE_PS_2M:
            raise GvtError("EINVAL", f"vGPU {self.vgpu}: a 1 GiB page in PDP entry {i} of the table "
                           f"at gfn {t.gfn:#x}: GVT-g does not shadow 1 GiB pages")
        if t.level == 2 and v & lrc.PDE_PS_2M:
            return (yield from self._shadow_2m(t, i, v))
        ips = t.level == 2 and bool(v & lrc.PDE_IPS_64K) and self.ips_enabled()
        child = yield from self._get_table(lrc.frame_of(v), t.level + 1, ips)
        t.children[i] = child
        # the shadow PDE never has IPS: 64 KiB pages are always split (ppgtt_generate_shadow_entry)
        return (child.mfn << PAGE_SHIFT) | (v & FLAGS_MASK & ~lrc.PDE_IPS_64K)

    def _leaf_view(self, t: ShadowTable, vals: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """The 4 KiB entries a leaf table's entries idx stand for: in a 64 KiB (IPS) table each
        first-of-16 entry maps 16 pages, and the other 15 are not looked at."""
        if not t.ips:
            return vals
        out = np.zeros(len(idx), dtype=U64)
        for k, i in enumerate(idx.tolist()):
            e = int(t.guest[i - i % IPS_STRIDE])
            if e & lrc.PTE_PRESENT:
                out[k] = lrc.entry(lrc.frame_of(e) + i % IPS_STRIDE, e & FLAGS_MASK & ~lrc.PDE_IPS_64K)
        return out

    def _shadow_leaves(self, t: ShadowTable, idx: np.ndarray) -> Iterator[Any]:
        """Shadow leaf entries idx of t from t.guest, pinning their pages (rule 3). All of them or,
        if the pins cannot be had, none: nothing is held then."""
        vals = self._leaf_view(t, t.guest[idx], idx)
        out = yield from self._translate_leaf(vals)
        if t.ips:
            self.counts["split_64k"] += int(np.count_nonzero(_present(vals[::IPS_STRIDE])))
        ok = _present(vals) & ((out & U64(lrc.PTE_PRESENT)) != 0) & \
            (_frame(out) != U64(self.scratch.page[PT]))
        held = np.where(ok, _frame(vals).astype(np.int64), -1)
        self.pins.hold(held[held >= 0])
        t.held[idx] = held
        t.shadowed[idx] = t.guest[idx]
        self._store(t, idx, out)

    def _translate_leaf(self, vals: np.ndarray) -> Iterator[Any]:
        """Guest PTEs -> shadow PTEs, pinning the data pages the cache does not have. A present
        entry whose gfn is not guest RAM maps the scratch page (not present in the fault mode);
        a never-present entry stays zero."""
        vals = np.ascontiguousarray(vals, dtype=U64)
        n = len(vals)
        out, missing = np.empty(n, dtype=U64), np.empty(n, dtype=U64)
        scratch = self.scratch.page[PT]
        _ok, _scr, _np, n_miss = self.translate(vals, self.pins.cache, scratch, out, missing)
        if n_miss:
            yield from self.pins.fetch(missing[:n_miss].astype(np.int64))
            _ok, _scr, _np, n_miss = self.translate(vals, self.pins.cache, scratch, out, missing)
            if n_miss:
                raise GvtError("EIO", "gfns still missing after GFN_PIN")
        present = _present(vals)
        gfn = _frame(vals).astype(np.int64)
        inside = (gfn >= 0) & (gfn < len(self.pins.cache))
        cached = self.pins.cache[np.where(inside, gfn, 0)]
        invalid = present & (~inside | (cached == U64(CACHE_INVALID)))
        self.counts["ok"] += int((present & ~invalid).sum())
        out[~present] = 0
        if invalid.any():
            self.counts["invalid"] += int(invalid.sum())
            if self.scratch.mode != "kernel":
                out[invalid] &= ~U64(lrc.PTE_PRESENT)
        return out

    def _shadow_2m(self, t: ShadowTable, i: int, v: int) -> Iterator[Any]:
        """Rule 4: a 2 MiB guest entry at index i of PD t. Its first frame must be guest RAM
        (is_2MB_gtt_possible: EINVAL otherwise)."""
        gfn0 = (v & lrc.ADDR_2M_MASK) >> PAGE_SHIFT
        if not 0 <= gfn0 < len(self.pins.cache) or gfn0 + N > len(self.pins.cache):
            raise GvtError("EINVAL", f"vGPU {self.vgpu}: the 2 MiB page at gfn {gfn0:#x} (PD entry "
                           f"{i}) is not guest RAM")
        flags = v & FLAGS_MASK & ~lrc.PDE_PS_2M
        ptes = np.array([lrc.entry(gfn0 + k, flags) for k in range(N)], dtype=U64)
        gfns = np.arange(gfn0, gfn0 + N, dtype=np.int64)
        yield from self.pins.fetch(gfns)
        mfns = self.pins.cache[gfns]
        if (mfns == U64(CACHE_INVALID)).any():
            yield from self._settle(gfns)
            raise GvtError("EINVAL", f"vGPU {self.vgpu}: the 2 MiB page at gfn {gfn0:#x} is not all "
                           f"guest RAM")
        frames = mfns.astype(np.int64)
        if frames[0] % N == 0 and np.array_equal(frames, frames[0] + np.arange(N)):
            self.counts["huge_2m"] += 1
            self.pins.hold(gfns)
            huge = ShadowTable(gfn0, PT, 0, split=True)    # holds the pins, no page
            huge.held[:] = gfns
            huge.refs = 1
            t.children[i] = huge
            return (int(frames[0]) << PAGE_SHIFT) | (v & FLAGS_MASK)
        try:
            mfn = self._alloc(f"vgpu{self.vgpu} ppgtt split 2M")
        except GvtError:
            yield from self._settle(gfns)
            raise
        self.counts["split_2m"] += 1
        split = ShadowTable(gfn0, PT, mfn, split=True)
        split.guest[:] = ptes
        split.shadowed[:] = ptes
        out = yield from self._translate_leaf(ptes)
        split.held[:] = gfns
        self.pins.hold(gfns)
        split.refs = 1
        self._store(split, np.arange(N), out)
        t.children[i] = split
        return (split.mfn << PAGE_SHIFT) | flags

    def _reshadow_ips(self, t: ShadowTable, ips: bool) -> Iterator[Any]:
        """A PT shared by PDEs that disagree on IPS takes the newest's view (the kernel clears
        and populates it again)."""
        held = t.held[t.held >= 0]
        t.held[:] = -1
        t.ips = ips
        yield from self._shadow_leaves(t, np.arange(N))
        yield from self._unpin(held.tolist())

    def _alloc(self, what: str) -> int:
        mfn = self.pool.alloc(what, self.vgpu)
        self.pages += 1
        return mfn

    def _free(self, mfn: int) -> None:
        self.pool.release(mfn)
        self.pages -= 1

    def _store(self, t: ShadowTable, idx: np.ndarray, out: np.ndarray) -> None:
        if len(idx) == N:
            self.pool.write(t.mfn, 0, out.astype("<u8").tobytes())
            return
        page = self.pool.page(t.mfn)
        for i, e in zip(idx.tolist(), out.tolist()):
            page[i * 8:i * 8 + 8] = _Q.pack(e)

    def _shadow_entry_value(self, t: ShadowTable, i: int) -> int:
        return _Q.unpack_from(self.pool.page(t.mfn), 8 * i)[0]

    # ---- releasing shadows ---------------------------------------------------------------------
    def _release_entry(self, t: ShadowTable, i: int) -> Iterator[Any]:
        """What shadow entry i of t holds goes (the entry itself is the caller's to rewrite)."""
        if t.level == PT:
            g = int(t.held[i])
            if g >= 0:
                t.held[i] = -1
                yield from self._unpin([g])
        else:
            child = t.children.pop(i, None)
            if child is not None:
                yield from self._unref(child)
        t.shadowed[i] = 0

    def _unref(self, t: ShadowTable) -> Iterator[Any]:
        if t.refs <= 0:
            raise RuntimeError(f"vGPU {self.vgpu}: shadow table of gfn {t.gfn:#x} released more "
                               f"often than referenced")
        t.refs -= 1
        if t.refs > 0:
            return
        for i in list(t.children):
            yield from self._unref(t.children.pop(i))
        held = t.held[t.held >= 0]
        t.held[:] = -1
        if t.split:
            if t.mfn:
                self._free(t.mfn)
            yield from self._unpin(held.tolist())
            return
        if self._unlist(t):
            yield from self.track.disable([t.gfn])
        self._free(t.mfn)
        yield from self._unpin([*held.tolist(), t.gfn])

    def _unlist(self, t: ShadowTable) -> bool:
        """t is no longer the shadow of its guest table; whether no other shadow (of another
        level) has that guest page either."""
        del self.tables[(t.gfn, t.level)]
        users = self.by_gfn[t.gfn]
        users.remove(t)
        if users:
            return False
        del self.by_gfn[t.gfn]
        return True

    def _unpin(self, gfns: list[int]) -> Iterator[Any]:
        if gfns:
            arr = np.array(gfns, dtype=np.int64)
            self.pins.release(arr)
            yield from self._settle(arr)

    def _settle(self, gfns: np.ndarray) -> Iterator[Any]:
        post = self.pins.settle(gfns)
        if post is not None:
            yield post

    # ---- guest writes to its tables --------------------------------------------------------------
    def on_write(self, gpa: int, data: bytes) -> Iterator[Any]:
        """A tracked write to a guest table page (ppgtt_handle_guest_write_page_table_bytes)."""
        self.counts["tracked_writes"] += 1
        gfn, off = gpa >> PAGE_SHIFT, gpa & (PAGE_SIZE - 1)
        i = off >> 3
        failure: GvtError | None = None
        for t in list(self.by_gfn.get(gfn, ())):
            if self.tables.get((t.gfn, t.level)) is not t:
                continue                    # freed by an earlier table's update
            try:
                if len(data) == 8:
                    yield from self._write_entry(t, i, _Q.unpack(data)[0])
                else:
                    yield from self._write_half(t, i, off, data)
            except GvtError as err:
                failure = failure or err
        if failure is not None:
            raise failure

    def _write_entry(self, t: ShadowTable, i: int, new: int) -> Iterator[Any]:
        """Rule 5: add the new entry, link it, then release the old one."""
        old_guest = int(t.guest[i])
        t.guest[i] = new
        if new == old_guest and i not in t.post_shadow:
            return                          # its own value: nothing changes
        if t.ips:
            yield from self._write_ips(t, i)
            return
        old_se = self._shadow_entry_value(t, i)
        if t.level == PT:
            if new & lrc.PTE_PRESENT:
                yield from self._check_ram(lrc.frame_of(new), t, i)
            old_pin = int(t.held[i])
            t.held[i] = -1
            try:
                yield from self._shadow_leaves(t, np.array([i]))
            except GvtError:
                t.held[i] = old_pin         # the old shadow stays as it was
                raise
            if not new & lrc.PTE_PRESENT:
                self._store(t, np.array([i]), np.array([self.scratch.entry(PT, old_se)], dtype=U64))
            t.post_shadow.discard(i)
            if old_pin >= 0:
                yield from self._unpin([old_pin])
            return
        old_child = t.children.pop(i, None)
        if new & lrc.PTE_PRESENT:
            try:
                se = yield from self._shadow_upper(t, i, new)
            except GvtError:
                if old_child is not None:
                    t.children[i] = old_child
                raise
        else:
            se = self.scratch.entry(t.level, old_se)
        self._store(t, np.array([i]), np.array([se], dtype=U64))
        t.shadowed[i] = new if new & lrc.PTE_PRESENT else 0
        t.post_shadow.discard(i)
        if old_child is not None:
            yield from self._unref(old_child)

    def _check_ram(self, gfn: int, t: ShadowTable, i: int) -> Iterator[Any]:
        """A new leaf entry must map guest RAM: the kernel maps the page for DMA when it adds the
        entry (ppgtt_populate_shadow_entry), and that fails (ENXIO) for a gfn that is not RAM;
        the old shadow entry stays. (A table's first population maps such an entry to scratch.)"""
        ok = 0 <= gfn < len(self.pins.cache)
        if ok:
            yield from self.pins.fetch(np.array([gfn], dtype=np.int64))
            ok = int(self.pins.cache[gfn]) not in (0, CACHE_INVALID)
        if not ok:
            raise GvtError("ENXIO", f"vGPU {self.vgpu}: PT entry {i} of the table at gfn {t.gfn:#x} "
                           f"maps gfn {gfn:#x}, which is not guest RAM")

    def _write_ips(self, t: ShadowTable, i: int) -> Iterator[Any]:
        """A write to a 64 KiB table: only the first entry of each 16 maps anything; its 16
        shadow entries are rebuilt, the old pins released after."""
        first = i - i % IPS_STRIDE
        if i != first:
            return                          # hardware does not look at the other 15
        idx = np.arange(first, first + IPS_STRIDE)
        old = t.held[idx].copy()
        t.held[idx] = -1
        try:
            yield from self._shadow_leaves(t, idx)
        except GvtError:
            t.held[idx] = old
            raise
        yield from self._unpin(old[old >= 0].tolist())

    def _write_half(self, t: ShadowTable, i: int, off: int, data: bytes) -> Iterator[Any]:
        """Rule 6: half an entry. The entry points at its level's scratch first, then what it
        held goes; it is shadowed whole before the next workload."""
        cur = int(t.guest[i])
        shift = (off & 4) * 8
        t.guest[i] = (cur & ~(0xFFFFFFFF << shift)) | (int.from_bytes(data, "little") << shift)
        if i in t.post_shadow:
            return
        old_se = self._shadow_entry_value(t, i)
        self._store(t, np.array([i]), np.array([self.scratch.entry(t.level, old_se)], dtype=U64))
        t.post_shadow.add(i)
        yield from self._release_entry(t, i)

    def flush_post_shadow(self, read: Callable[[int, int], Iterator[Any]]) -> Iterator[Any]:
        """Entries left half-written are shadowed whole from guest memory (rule 6); `read` reads
        guest physical memory."""
        for t in [t for t in self.tables.values() if t.post_shadow]:
            for i in sorted(t.post_shadow):
                if self.tables.get((t.gfn, t.level)) is not t:
                    break
                raw = yield from read((t.gfn << PAGE_SHIFT) + 8 * i, 8)
                yield from self._write_entry(t, i, _Q.unpack(raw)[0])
                t.post_shadow.discard(i)

    def resync(self, read: Callable[[int, int], Iterator[Any]]) -> Iterator[Any]:
        """Every shadowed table against its guest page: an entry the guest changed by a tracked
        write this mediator never emulated (the hypervisor gave it up) is shadowed again, as a
        post-shadow entry is. Returns how many entries changed."""
        changed = 0
        for t in list(self.tables.values()):
            if self.tables.get((t.gfn, t.level)) is not t:
                continue
            raw = yield from read(t.gfn << PAGE_SHIFT, PAGE_SIZE)
            now = np.frombuffer(raw, dtype="<u8").astype(U64)
            for i in np.flatnonzero(now != t.guest).tolist():
                t.post_shadow.add(i)
                changed += 1
        yield from self.flush_post_shadow(read)
        return changed

    # ---- lookups -------------------------------------------------------------------------------
    def guest_walk(self, mm: PpgttMm, va: int) -> int:
        """The guest physical address a PPGTT address maps to, by the guest's own entries;
        EFAULT where nothing is mapped."""
        if not mm.shadowed:
            raise GvtError("EFAULT", "the PPGTT has no shadow")
        t = mm.roots[0] if mm.level == 0 else mm.roots[(va >> 30) & 3]
        level = mm.level
        while True:
            if t is None:
                raise GvtError("EFAULT", f"PPGTT address {va:#x}: its root is not present")
            i = lrc.level_index(va, level)
            e = int(t.guest[i])
            if not e & lrc.PTE_PRESENT:
                raise GvtError("EFAULT", f"PPGTT address {va:#x} is not mapped "
                               f"({lrc.LEVEL_NAMES[level]} entry {i} not present)")
            if level == PT:
                return (lrc.frame_of(e) << PAGE_SHIFT) | (va & (PAGE_SIZE - 1))
            if level == 2 and e & lrc.PDE_PS_2M:
                return (e & lrc.ADDR_2M_MASK) | (va & (lrc.HUGE_2M - 1))
            t = t.children.get(i)
            level += 1

    def shadow_pages(self) -> int:
        return self.pages


def _present(vals: np.ndarray) -> np.ndarray:
    return (vals & U64(lrc.PTE_PRESENT)) != 0


def _frame(vals: np.ndarray) -> np.ndarray:
    return (vals & U64(lrc.ADDR_MASK)) >> U64(PAGE_SHIFT)
