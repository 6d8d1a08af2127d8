"""The mediator's memory: the host pool it owns (shadow page tables, shadow contexts, rings and
batches, scratch pages) and its access to guest memory (kvmgt's intel_gvt_read_gpa / write_gpa
and intel_vgpu_gma_to_gpa).

Guest memory is reached the way kvmgt reaches it, through pinned pages: a gfn the vGPU's GGTT or
PPGTT shadow maps is pinned already and its machine frame is in the pin cache; any other gfn is
pinned for the access (GFN_PIN) and released right after. Bytes move through the memory fabric
(a mapped region, or DMA messages to the region's owner).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from nodes.errors import GvtError
from nodes.hw import PAGE_SHIFT, PAGE_SIZE, gtt
from nodes.memory import Fabric, Region
from nodes.mediator.translate import CACHE_INVALID

if TYPE_CHECKING:
    from nodes.mediator.vgpu import VGpu


FREE_RUN = "free"


class QuotaExceeded(GvtError):
    """A vGPU's shadow pages are at its quota: ENOMEM for that vGPU alone."""


class HostPool:
    """Pages of the host pool. Frame 0 is the GGTT scratch page; the rest are handed out and
    taken back zeroed, so a pool page that is not in use holds nothing (the ledger checks it).
    Host GM page k maps pool frame k (the mediator sets those GGTT entries at start), so every
    pool page also has a GGTT address the GPU can use.

    Pages taken for a vGPU (its shadow tables, rings, contexts, batches) count against that
    vGPU's quota: a vGPU at its quota gets ENOMEM for itself, and the others keep theirs."""

    def __init__(self, region: Region, fabric: Fabric):
        self.region, self.fabric = region, fabric
        self.scratch_mfn = region.base_mfn
        self.free: list[int] = list(range(region.end_mfn - 1, region.base_mfn, -1))
        self.owner: dict[int, str] = {region.base_mfn: "scratch"}    # mfn -> what it holds
        self.runs: dict[int, list[int]] = {}    # length -> first pages of free runs kept whole
        self.vgpu_of: dict[int, int] = {}       # mfn -> the vGPU whose quota it counts against
        self.used: dict[int, int] = {}          # vGPU -> pages it holds
        self.quota: dict[int, int] = {}         # vGPU -> the most it may hold

    def room(self, vgpu: int) -> int:
        """Pages vGPU may still take under its quota."""
        return self.quota.get(vgpu, self.region.frames) - self.used.get(vgpu, 0)

    def _charge(self, vgpu: int, n: int, what: str) -> None:
        if vgpu and n > self.room(vgpu):
            raise QuotaExceeded("ENOMEM", f"vGPU {vgpu} holds {self.used.get(vgpu, 0)} host pool "
                                f"pages, its quota is {self.quota.get(vgpu)}: no {n} more for {what}")

    def alloc(self, what: str, vgpu: int = 0) -> int:
        self._charge(vgpu, 1, what)
        if not self.free:
            raise GvtError("ENOMEM", f"the host pool ({self.region.frames} pages) is full: no page "
                           f"for {what}")
        mfn = self.free.pop()
        self.owner[mfn] = what
        if vgpu:
            self.vgpu_of[mfn] = vgpu
            self.used[vgpu] = self.used.get(vgpu, 0) + 1
        return mfn

    def alloc_run(self, n: int, what: str, vgpu: int = 0) -> list[int]:
        """n pages that are contiguous in the pool (and so in host GM). Runs given back are kept
        by length and handed out again first (shadow contexts are two pages, every workload)."""
        if n == 1:
            return [self.alloc(what, vgpu)]
        self._charge(vgpu, n, what)
        kept = self.runs.get(n)
        if kept:
            first = kept.pop()
            mfns = list(range(first, first + n))
        else:
            free = sorted(self.free)
            run, mfns = 1, []
            for k in range(1, len(free)):
                run = run + 1 if free[k] == free[k - 1] + 1 else 1
                if run == n:
                    mfns = free[k - n + 1:k + 1]
                    break
            if not mfns:
                raise GvtError("ENOMEM", f"the host pool has no {n} contiguous free pages for {what}")
            taken = set(mfns)
            self.free = [m for m in self.free if m not in taken]
        for m in mfns:
            self.owner[m] = what
            if vgpu:
                self.vgpu_of[m] = vgpu
        if vgpu:
            self.used[vgpu] = self.used.get(vgpu, 0) + n
        return mfns

    def _uncharge(self, mfn: int) -> None:
        vgpu = self.vgpu_of.pop(mfn, 0)
        if vgpu:
            self.used[vgpu] -= 1

    def release_run(self, mfns: list[int]) -> None:
        """Give back what alloc_run gave, zeroed, for the next run of its length. Giving back a
        page that is not in use is the mediator's own bug (an internal error)."""
        if len(mfns) == 1:
            self.release(mfns[0])
            return
        for m in mfns:
            if self.owner.get(m, FREE_RUN) == FREE_RUN:
                raise RuntimeError(f"host pool page {m:#x} given back, but it is not in use")
        for m in mfns:
            self.page(m)[:] = bytes(PAGE_SIZE)
            self.owner[m] = FREE_RUN
            self._uncharge(m)
        self.runs.setdefault(len(mfns), []).append(mfns[0])

    def release(self, mfn: int) -> None:
        if self.owner.get(mfn, FREE_RUN) == FREE_RUN:
            raise RuntimeError(f"host pool page {mfn:#x} given back, but it is not in use")
        del self.owner[mfn]
        self._uncharge(mfn)
        self.page(mfn)[:] = bytes(PAGE_SIZE)
        self.free.append(mfn)

    def page(self, mfn: int) -> memoryview:
        view = self.fabric.local_view(mfn)
        if view is None or not self.region.base_mfn <= mfn < self.region.end_mfn:
            raise GvtError("EFAULT", f"mfn {mfn:#x} is not a host pool page")
        return view

    def write(self, mfn: int, off: int, data: bytes) -> None:
        self.page(mfn)[off:off + len(data)] = data

    def gm_of(self, mfn: int) -> int:
        """The GGTT address of a pool page."""
        return (mfn - self.region.base_mfn) << PAGE_SHIFT

    def mfn_of_gm(self, gm: int) -> int:
        return self.region.base_mfn + (gm >> PAGE_SHIFT)

    def ggtt_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(GGTT index, entry) of the host's mapping of the pool."""
        idx = np.arange(self.region.frames, dtype=np.int64)
        mfns = np.arange(self.region.base_mfn, self.region.end_mfn, dtype=np.uint64)
        return idx, gtt.encode(mfns, gtt.PTE_PRESENT | gtt.PTE_RW)

    def in_use(self) -> int:
        return sum(1 for w in self.owner.values() if w != FREE_RUN)

    def is_free(self, mfn: int) -> bool:
        return self.owner.get(mfn, FREE_RUN) == FREE_RUN


class GuestMemory:
    """One vGPU's access to its guest's memory."""

    def __init__(self, vgpu: VGpu, fabric: Fabric):
        self.vgpu, self.fabric = vgpu, fabric

    def gm_to_gpa(self, gm: int) -> int:
        """intel_vgpu_gma_to_gpa on the GGTT: the guest entry's frame, EFAULT where the address is
        outside the vGPU's share or its entry is not present."""
        loc = self.vgpu.ggtt.local1(gtt.index_of_gm(gm))
        if loc < 0:
            raise GvtError("EFAULT", f"GM {gm:#x} is outside vGPU {self.vgpu.id}'s graphics memory")
        e = int(self.vgpu.ggtt.vggtt[loc])
        if not e & gtt.PTE_PRESENT:
            raise GvtError("EFAULT", f"GM {gm:#x} has no present GGTT entry in vGPU {self.vgpu.id}")
        return gtt.frame_of(e) << PAGE_SHIFT | (gm & (PAGE_SIZE - 1))

    def _mfns(self, gfns: list[int]) -> Iterator[Any]:
        """Machine frames of gfns, pinning for the access those nobody holds. Returns (mfns,
        gfns pinned only for this access)."""
        pins = self.vgpu.pins
        cache = pins.cache
        for g in gfns:
            if not 0 <= g < len(cache):
                raise GvtError("EFAULT", f"gfn {g:#x} is not guest RAM of VM {self.vgpu.id}")
        missing = [g for g in set(gfns) if cache[g] == 0]
        if missing:
            yield from pins.fetch(np.array(missing, dtype=np.int64))
        out = []
        for g in gfns:
            m = int(cache[g])
            if m == 0 or m == CACHE_INVALID:
                raise GvtError("EFAULT", f"gfn {g:#x} is not guest RAM of VM {self.vgpu.id}")
            out.append(m)
        return out, missing

    def read(self, gpa: int, n: int) -> Iterator[Any]:
        """n bytes at gpa (any length; split at page boundaries)."""
        pieces = _split(gpa, n)
        mfns, temp = yield from self._mfns([g for g, _o, _n in pieces])
        got = yield from self.fabric.read_many([(m, o, k) for m, (_g, o, k) in zip(mfns, pieces)])
        yield from self._settle(temp)
        return b"".join(got)

    def write(self, gpa: int, data: bytes) -> Iterator[Any]:
        pieces = _split(gpa, len(data))
        mfns, temp = yield from self._mfns([g for g, _o, _n in pieces])
        ops, at = [], 0
        for m, (_g, o, k) in zip(mfns, pieces):
            ops.append((m, o, data[at:at + k]))
            at += k
        yield from self.fabric.write_many(ops)
        yield from self._settle(temp)

    def read_gm(self, gm: int, n: int) -> Iterator[Any]:
        """n bytes at a GGTT address of the guest (pieces may sit on unrelated gfns)."""
        out = []
        for a, k in _split_gm(gm, n):
            out.append((yield from self.read(self.gm_to_gpa(a), k)))
        return b"".join(out)

    def write_gm(self, gm: int, data: bytes) -> Iterator[Any]:
        at = 0
        for a, k in _split_gm(gm, len(data)):
            yield from self.write(self.gm_to_gpa(a), data[at:at + k])
            at += k

    def _settle(self, temp: list[int]) -> Iterator[Any]:
        if temp:
            unpin = self.vgpu.pins.settle(np.array(temp, dtype=np.int64))
            if unpin is not None:
                yield unpin


def _split(gpa: int, n: int) -> list[tuple[int, int, int]]:
    """(gfn, offset, length) pieces of a guest physical range."""
    out = []
    while n > 0:
        off = gpa & (PAGE_SIZE - 1)
        k = min(n, PAGE_SIZE - off)
        out.append((gpa >> PAGE_SHIFT, off, k))
        gpa += k
        n -= k
    return out


def _split_gm(gm: int, n: int) -> list[tuple[int, int]]:
    out = []
    while n > 0:
        k = min(n, PAGE_SIZE - (gm & (PAGE_SIZE - 1)))
        out.append((gm, k))
        gm += k
        n -= k
    return out
