"""PPGTT shadowing (the PPGTT half of gvt/gtt.c): a guest's 4-level (or legacy 3-level) page
tables get shadow tables in the host pool whose entries hold machine frames, and the GPU walks
only those.

Rules, as the kernel has them:
1. every guest table page a shadow is built from is pinned and write-protected (page tracking)
   before it is read, so no later guest write goes unseen
2. a leaf table is translated whole (512 entries) by the translator; a present entry whose gfn
   is not guest RAM, and every non-present entry, point at the scratch page with present cleared,
   so a GPU access there faults instead of landing somewhere (GVT-FACTS: an invalid gfn is an
   error for the workload that uses it)
3. a non-present upper-level entry points at the next level's scratch table, present cleared
4. a 2 MiB entry is shadowed as a 2 MiB entry only where its 512 machine frames are contiguous
   and aligned; otherwise it is split into a shadow page table of 4 KiB entries
   (is_2MB_gtt_possible / split_2MB_gtt_entry)
5. a tracked 8-byte write replaces the entry's shadow: what the old entry held is released (a
   child table whose last reference goes is freed and untracked, a data page unpinned), the new
   one shadowed
6. a tracked 4-byte write drops the entry's shadow and points it at scratch; the entry is shadowed
   again from guest memory, whole, before the vGPU's next workload runs (post_shadow /
   intel_vgpu_flush_post_shadow)
7. shadows are shared: one guest table used by several PPGTTs has one shadow, freed with its
   last user
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from nodes.errors import GvtError
from nodes.hw import PAGE_SHIFT, PAGE_SIZE, lrc
from nodes.mediator.dma import HostPool
from nodes.mediator.page_track import PageTrack
from nodes.mediator.translate import CACHE_INVALID
from nodes.memory import Fabric

PPGTT_RESULTS = ("ok", "invalid", "huge_2m", "split_2m")     # what shadowing an entry can give

if TYPE_CHECKING:
    from nodes.mediator.pins import GfnPins

U64 = np.uint64
N = lrc.ENTRIES_PER_TABLE
PT = 3                                  # the leaf level
_Q = struct.Struct("<Q")
FLAGS_MASK = ~lrc.ADDR_MASK & 0xFFFFFFFFFFFFFFFF


class ShadowTable:
    __slots__ = ("gfn", "level", "mfn", "guest", "shadowed", "children", "held", "refs", "split",
                 "post_shadow")

    def __init__(self, gfn: int, level: int, mfn: int, split: bool = False):
        self.gfn, self.level, self.mfn, self.split = gfn, level, mfn, split
        self.guest = np.zeros(N, dtype=U64)         # the guest's entries, as last written
        self.shadowed = np.zeros(N, dtype=U64)      # the guest entry each shadow entry reflects
        self.children: dict[int, ShadowTable] = {}  # index -> child shadow (upper levels)
        self.held = np.full(N, -1, dtype=np.int64)  # index -> gfn pinned for it (leaf)
        self.refs = 0
        self.post_shadow: set[int] = set()


class PpgttMm:
    """One guest PPGTT (intel_vgpu_mm of type PPGTT): its roots and their shadows."""
    __slots__ = ("key", "level", "roots", "refs")

    def __init__(self, key: tuple, level: int, roots: list[ShadowTable]):
        self.key, self.level, self.roots, self.refs = key, level, roots, 0

    def shadow_pdps(self) -> list[int]:
        """What the shadow context's PDP registers hold: machine addresses of the shadow roots."""
        return [t.mfn << PAGE_SHIFT for t in self.roots]


class Ppgtt:
    """The PPGTT shadows of one vGPU."""

    def __init__(self, vgpu: int, pool: HostPool, fabric: Fabric, pins: GfnPins, track: PageTrack,
                 translate: Callable[..., tuple[int, int, int, int]], scratch: list[int]):
        self.vgpu, self.pool, self.fabric, self.pins = vgpu, pool, fabric, pins
        self.track, self.translate = track, translate
        self.scratch = scratch                      # level -> scratch table (or page) of that level
        self.tables: dict[tuple[int, int], ShadowTable] = {}
        self.by_gfn: dict[int, list[ShadowTable]] = {}
        self.mms: dict[tuple, PpgttMm] = {}
        self.counts = {"tracked_writes": 0, **{r: 0 for r in PPGTT_RESULTS}}
        self.pages = 0                              # host pool pages the shadows hold

    # ---- PPGTTs ------------------------------------------------------------------------------
    def get_mm(self, addressing: int, pdps: list[int]) -> Iterator[Any]:
        """The shadow of the PPGTT whose roots the context gives (intel_vgpu_get_ppgtt_mm,
        created on first use); one more reference to it."""
        if addressing == lrc.ADDRESSING_LEGACY_64B:
            level, roots = 0, [pdps[0]]
        elif addressing == lrc.ADDRESSING_LEGACY_32B:
            level, roots = 2, list(pdps[:4])
        else:
            raise GvtError("EINVAL", f"addressing mode {addressing} is not a PPGTT mode (1: legacy "
                           f"32-bit, 3: legacy 64-bit)")
        key = (level, *roots)
        mm = self.mms.get(key)
        if mm is None:
            pending: list[ShadowTable] = []
            for r in roots:
                if r & (PAGE_SIZE - 1):
                    raise GvtError("EINVAL", f"PPGTT root {r:#x} is not a page-aligned guest address")
            tables = [self._ref(r >> PAGE_SHIFT, level, pending) for r in roots]
            try:
                yield from self._populate(pending)
            except GvtError:
                for t in tables:
                    yield from self._unref(t)
                raise
            mm = self.mms[key] = PpgttMm(key, level, tables)
        mm.refs += 1
        return mm

    def put_mm(self, mm: PpgttMm) -> Iterator[Any]:
        mm.refs -= 1
        if mm.refs <= 0 and self.mms.get(mm.key) is mm:
            del self.mms[mm.key]
            for t in mm.roots:
                yield from self._unref(t)

    def destroy_all(self) -> Iterator[Any]:
        for mm in list(self.mms.values()):
            mm.refs = 1
            yield from self.put_mm(mm)

    def find_mm(self, addressing: int, pdps: list[int]) -> PpgttMm | None:
        level = 0 if addressing == lrc.ADDRESSING_LEGACY_64B else 2
        roots = [pdps[0]] if level == 0 else list(pdps[:4])
        return self.mms.get((level, *roots))

    # ---- building shadows ----------------------------------------------------------------------
    def _ref(self, gfn: int, level: int, pending: list[ShadowTable]) -> ShadowTable:
        t = self.tables.get((gfn, level))
        if t is None:
            t = ShadowTable(gfn, level, self.pool.alloc(f"vgpu{self.vgpu} ppgtt {lrc.LEVEL_NAMES[level]}"))
            self.pages += 1
            self.tables[(gfn, level)] = t
            self.by_gfn.setdefault(gfn, []).append(t)
            pending.append(t)
        t.refs += 1
        return t

    def _populate(self, pending: list[ShadowTable]) -> Iterator[Any]:
        """Shadow new tables level by level: track and pin each level's pages, read them, shadow
        their entries (which finds the next level's tables)."""
        while pending:
            batch, pending[:] = list(pending), []
            gfns = [t.gfn for t in batch]
            outside = [g for g in gfns if not 0 <= g < len(self.pins.cache)]
            if outside:
                raise GvtError("EFAULT", f"PPGTT table at gfn {outside[0]:#x} is not guest RAM")
            yield from self.track.enable(gfns, self.on_write)
            arr = np.array(gfns, dtype=np.int64)
            yield from self.pins.fetch(arr)
            mfns = self.pins.cache[arr]
            bad = [g for g, m in zip(gfns, mfns.tolist()) if m in (0, CACHE_INVALID)]
            if bad:
                raise GvtError("EFAULT", f"PPGTT table at gfn {bad[0]:#x} is not guest RAM")
            self.pins.hold(arr)
            raw = yield from self.fabric.read_many([(int(m), 0, PAGE_SIZE) for m in mfns])
            for t, page in zip(batch, raw):
                t.guest[:] = np.frombuffer(page, dtype="<u8")
                yield from self._shadow_range(t, np.arange(N), pending)

    def _shadow_range(self, t: ShadowTable, idx: np.ndarray, pending: list[ShadowTable]) -> Iterator[Any]:
        """Shadow entries idx of table t from t.guest (their old shadows already released)."""
        vals = t.guest[idx]
        if t.level == PT:
            out = yield from self._translate_leaf(vals)
            held = np.where(_present(vals) & ((out & U64(lrc.PTE_PRESENT)) != 0),
                            _frame(vals).astype(np.int64), -1)
            self.pins.hold(held[held >= 0])
            t.held[idx] = held
        else:
            out = np.empty(len(idx), dtype=U64)
            scratch = U64(self.scratch[t.level + 1] << PAGE_SHIFT)
            for k, (i, v) in enumerate(zip(idx.tolist(), vals.tolist())):
                if not v & lrc.PTE_PRESENT:
                    out[k] = scratch
                elif t.level == 2 and v & lrc.PDE_PS_2M:
                    out[k] = yield from self._shadow_2m(t, i, v)
                else:
                    child = self._ref(lrc.frame_of(v), t.level + 1, pending)
                    t.children[i] = child
                    out[k] = (child.mfn << PAGE_SHIFT) | (v & FLAGS_MASK)
        t.shadowed[idx] = vals
        self._store(t, idx, out)

    def _translate_leaf(self, vals: np.ndarray) -> Iterator[Any]:
        """Guest PTEs -> shadow PTEs (rule 2), pinning the data pages the cache does not have."""
        vals = np.ascontiguousarray(vals, dtype=U64)
        n = len(vals)
        out, missing = np.empty(n, dtype=U64), np.empty(n, dtype=U64)
        _ok, _scr, _np, n_miss = self.translate(vals, self.pins.cache, self.pool.scratch_mfn, out, missing)
        if n_miss:
            yield from self.pins.fetch(missing[:n_miss].astype(np.int64))
            _ok, _scr, _np, n_miss = self.translate(vals, self.pins.cache, self.pool.scratch_mfn,
                                                    out, missing)
            if n_miss:
                raise GvtError("EIO", "gfns still missing after GFN_PIN")
        gfn = _frame(vals).astype(np.int64)
        present = _present(vals)
        ok = (gfn >= 0) & (gfn < len(self.pins.cache))
        cached = self.pins.cache[np.where(ok, gfn, 0)]
        invalid = present & (~ok | (cached == U64(CACHE_INVALID)))
        self.counts["ok"] += int((present & ~invalid).sum())
        if invalid.any():
            self.counts["invalid"] += int(invalid.sum())
            out[invalid] &= ~U64(lrc.PTE_PRESENT)
        return out

    def _shadow_2m(self, t: ShadowTable, i: int, v: int) -> Iterator[Any]:
        """Rule 4: a 2 MiB guest entry at index i of PD t."""
        gfn0 = (v & lrc.ADDR_2M_MASK) >> PAGE_SHIFT
        flags = v & FLAGS_MASK & ~lrc.PDE_PS_2M
        ptes = np.array([lrc.entry(gfn0 + k, flags) for k in range(N)], dtype=U64)
        out = yield from self._translate_leaf(ptes)
        frames = _frame(out).astype(np.int64)
        if (out & U64(lrc.PTE_PRESENT)).all() and frames[0] % N == 0 and \
                np.array_equal(frames, frames[0] + np.arange(N)):
            self.counts["huge_2m"] += 1
            gfns = np.arange(gfn0, gfn0 + N, dtype=np.int64)
            self.pins.hold(gfns)
            split = ShadowTable(gfn0, PT, 0, split=True)    # holds the pins, no page
            split.held[:] = gfns
            t.children[i] = split
            return (int(frames[0]) << PAGE_SHIFT) | (v & FLAGS_MASK)
        self.counts["split_2m"] += 1
        split = ShadowTable(gfn0, PT, self.pool.alloc(f"vgpu{self.vgpu} ppgtt split 2M"), split=True)
        self.pages += 1
        split.guest[:] = ptes
        split.shadowed[:] = ptes
        held = np.where((out & U64(lrc.PTE_PRESENT)) != 0, _frame(ptes).astype(np.int64), -1)
        self.pins.hold(held[held >= 0])
        split.held[:] = held
        split.refs = 1
        self._store(split, np.arange(N), out)
        t.children[i] = split
        return (split.mfn << PAGE_SHIFT) | flags

    def _store(self, t: ShadowTable, idx: np.ndarray, out: np.ndarray) -> None:
        if len(idx) == N:
            self.pool.write(t.mfn, 0, out.astype("<u8").tobytes())
            return
        page = self.pool.page(t.mfn)
        for i, e in zip(idx.tolist(), out.tolist()):
            page[i * 8:i * 8 + 8] = _Q.pack(e)

    # ---- releasing shadows ---------------------------------------------------------------------
    def _release_entry(self, t: ShadowTable, i: int) -> Iterator[Any]:
        """What shadow entry i of t holds goes (rule 5)."""
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
        t.refs -= 1
        if t.refs > 0:
            return
        for i in list(t.children):
            yield from self._unref(t.children.pop(i))
        held = t.held[t.held >= 0]
        t.held[:] = -1
        if t.split:
            if t.mfn:
                self.pool.release(t.mfn)
                self.pages -= 1
            yield from self._unpin(held.tolist())
            return
        del self.tables[(t.gfn, t.level)]
        users = self.by_gfn[t.gfn]
        users.remove(t)
        if not users:
            del self.by_gfn[t.gfn]
            yield from self.track.disable([t.gfn])
        self.pool.release(t.mfn)
        self.pages -= 1
        yield from self._unpin([*held.tolist(), t.gfn])

    def _unpin(self, gfns: list[int]) -> Iterator[Any]:
        if gfns:
            arr = np.array(gfns, dtype=np.int64)
            self.pins.release(arr)
            post = self.pins.settle(arr)
            if post is not None:
                yield post

    # ---- guest writes to its tables --------------------------------------------------------------
    def on_write(self, gpa: int, data: bytes) -> Iterator[Any]:
        """A tracked write to a guest table page (ppgtt_handle_guest_write_page_table_bytes)."""
        self.counts["tracked_writes"] += 1
        gfn, off = gpa >> PAGE_SHIFT, gpa & (PAGE_SIZE - 1)
        i = off >> 3
        for t in list(self.by_gfn.get(gfn, ())):
            if self.tables.get((t.gfn, t.level)) is not t:
                continue                    # freed by an earlier table's update
            yield from self._release_entry(t, i)
            if len(data) == 8:
                t.guest[i] = _Q.unpack(data)[0]
                t.post_shadow.discard(i)
                pending: list[ShadowTable] = []
                yield from self._shadow_range(t, np.array([i]), pending)
                yield from self._populate(pending)
            else:                           # rule 6: half an entry
                cur = int(t.guest[i])
                shift = (off & 4) * 8
                t.guest[i] = (cur & ~(0xFFFFFFFF << shift)) | (int.from_bytes(data, "little") << shift)
                scratch = self.pool.scratch_mfn if t.level == PT else self.scratch[t.level + 1]
                self._store(t, np.array([i]), np.array([scratch << PAGE_SHIFT], dtype=U64))
                t.post_shadow.add(i)

    def flush_post_shadow(self, read: Callable[[int, int], Iterator[Any]]) -> Iterator[Any]:
        """Entries left half-written are shadowed whole from guest memory (rule 6); `read` reads
        guest physical memory."""
        for t in [t for t in self.tables.values() if t.post_shadow]:
            for i in sorted(t.post_shadow):
                raw = yield from read((t.gfn << PAGE_SHIFT) + 8 * i, 8)
                t.guest[i] = _Q.unpack(raw)[0]
                pending: list[ShadowTable] = []
                yield from self._shadow_range(t, np.array([i]), pending)
                yield from self._populate(pending)
            t.post_shadow.clear()

    # ---- lookups -------------------------------------------------------------------------------
    def guest_walk(self, mm: PpgttMm, va: int) -> int:
        """The guest physical address a PPGTT address maps to, by the guest's own entries (the
        command scan reads batches this way); EFAULT where nothing is mapped."""
        if mm.level == 0:
            t = mm.roots[0]
        else:
            t = mm.roots[(va >> 30) & 3]
        level = mm.level
        while True:
            i = lrc.level_index(va, level)
            e = int(t.guest[i])
            if not e & lrc.PTE_PRESENT:
                raise GvtError("EFAULT", f"PPGTT address {va:#x} is not mapped "
                               f"({lrc.LEVEL_NAMES[level]} entry {i} not present)")
            if level == PT:
                return (lrc.frame_of(e) << PAGE_SHIFT) | (va & (PAGE_SIZE - 1))
            if level == 2 and e & lrc.PDE_PS_2M:
                return (e & lrc.ADDR_2M_MASK) | (va & (lrc.HUGE_2M - 1))
            t = t.children[i]
            level += 1

    def shadow_pages(self) -> int:
        return self.pages


def _present(vals: np.ndarray) -> np.ndarray:
    return (vals & U64(lrc.PTE_PRESENT)) != 0


def _frame(vals: np.ndarray) -> np.ndarray:
    return (vals & U64(lrc.ADDR_MASK)) >> U64(PAGE_SHIFT)
