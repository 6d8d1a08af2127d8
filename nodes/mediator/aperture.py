"""Graphics memory and fences of vGPUs (gvt/aperture_gm.c): each vGPU gets a contiguous share of
the CPU-mappable (aperture, "low") GM, of the hidden ("high") GM and of the fence registers,
after the host's share; its fence i is physical fence fence_base + i."""
from __future__ import annotations

from dataclasses import dataclass

from nodes.actions import Post
from nodes.errors import GvtError
from nodes.hw import gtt, partition, regs


@dataclass(frozen=True)
class Partition:
    aperture_base: int      # GM address of the vGPU's aperture share
    aperture_size: int
    hidden_base: int        # GM address of its hidden share
    hidden_size: int
    fence_base: int         # first physical fence register
    fence_num: int

    def to_wire(self) -> dict:
        return {"aperture_base": self.aperture_base, "aperture_size": self.aperture_size,
                "hidden_base": self.hidden_base, "hidden_size": self.hidden_size,
                "fence_base": self.fence_base, "fence_num": self.fence_num}


Free = list[tuple[int, int]]        # (base, length) runs, sorted


class GmAllocator:
    """First-fit allocation of aperture GM, hidden GM and fences, after the host's share.

    available() counts the vGPUs of a type that allocate() can really place: whole shares that
    fit in free runs, not the free total (the kernel counts the total, so fragmentation can make
    it promise a vGPU that creation then fails to place)."""

    def __init__(self, aperture_size: int, gm_size: int = gtt.GM_SIZE, *,
                 fences: int = partition.TOTAL_FENCES,
                 types: dict[str, partition.VgpuType] | None = None):
        if aperture_size <= partition.HOST_LOW_GM or aperture_size % (1 << 20):
            raise GvtError("EINVAL", f"an aperture of {aperture_size} bytes leaves nothing for "
                           f"vGPUs after the host's {partition.HOST_LOW_GM >> 20} MiB")
        if not partition.HOST_FENCES < fences <= partition.MAX_SIM_FENCES:
            raise GvtError("EINVAL", f"{fences} fence registers: a GPU has more than the host's "
                           f"{partition.HOST_FENCES} and at most {partition.MAX_SIM_FENCES}")
        self.aperture_size = aperture_size
        self.gm_size = gm_size
        self.fences = fences
        self.types = dict(partition.VGPU_TYPES if types is None else types)
        self.low_free: Free = [(partition.HOST_LOW_GM, aperture_size - partition.HOST_LOW_GM)]
        self.high_free: Free = [(aperture_size + partition.HOST_HIGH_GM,
                                 gm_size - aperture_size - partition.HOST_HIGH_GM)]
        self.fences_free: Free = [(partition.HOST_FENCES, fences - partition.HOST_FENCES)]

    def type_info(self, vgpu_type: str) -> partition.VgpuType:
        """What a vGPU of this type gets (EINVAL for a type this GPU does not offer)."""
        try:
            return self.types[vgpu_type]
        except KeyError:
            raise GvtError("EINVAL", f"unknown vGPU type {vgpu_type!r}; known: "
                           f"{', '.join(self.types)}") from None

    @staticmethod
    def _fits(free: Free, size: int) -> int:
        return sum(length // size for _base, length in free)

    @staticmethod
    def _take(free: Free, size: int) -> int | None:
        for i, (base, length) in enumerate(free):
            if length >= size:
                free[i] = (base + size, length - size)
                return base
        return None

    @staticmethod
    def _give(free: Free, base: int, size: int) -> None:
        free.append((base, size))
        free.sort()
        merged: Free = []
        for b, n in free:
            if merged and merged[-1][0] + merged[-1][1] == b:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            elif n:
                merged.append((b, n))
        free[:] = merged

    def available(self, vgpu_type: str) -> int:
        """How many more vGPUs of the type fit: the kernel's rule, the minimum over aperture,
        hidden GM and fences (counted in whole shares of free runs)."""
        low, high, fences, _ = self.type_info(vgpu_type)
        return min(self._fits(self.low_free, low), self._fits(self.high_free, high),
                   self._fits(self.fences_free, fences))

    def allocate(self, vgpu_type: str) -> Partition:
        low, high, fences, _ = self.type_info(vgpu_type)
        a = self._take(self.low_free, low)
        if a is None:
            raise GvtError("ENOSPC", f"no {low >> 20} MiB of aperture left for a vGPU of type {vgpu_type}")
        h = self._take(self.high_free, high)
        if h is None:
            self._give(self.low_free, a, low)
            raise GvtError("ENOSPC", f"no {high >> 20} MiB of hidden GM left for a vGPU of type {vgpu_type}")
        f = self._take(self.fences_free, fences)
        if f is None:
            self._give(self.low_free, a, low)
            self._give(self.high_free, h, high)
            raise GvtError("ENOSPC", f"no {fences} fences left for a vGPU of type {vgpu_type}")
        return Partition(a, low, h, high, f, fences)

    def release(self, p: Partition) -> None:
        self._give(self.low_free, p.aperture_base, p.aperture_size)
        self._give(self.high_free, p.hidden_base, p.hidden_size)
        self._give(self.fences_free, p.fence_base, p.fence_num)


def write_fence(part: Partition, fence: int, value: int, gpu: str, vgpu: int) -> list[Post]:
    """The physical register writes that load the vGPU's fence `fence` with `value`
    (intel_vgpu_write_fence): low dword 0 first, so the fence is off while it changes, then the
    high dword, then the low one. Posts on one link arrive in order, so no posting read is needed."""
    lo = regs.fence_lo(part.fence_base + fence)
    return [Post(gpu, "MMIO_WRITE", {"off": lo, "size": 4, "val": 0}, vgpu=vgpu),
            Post(gpu, "MMIO_WRITE", {"off": lo + 4, "size": 4, "val": value >> 32}, vgpu=vgpu),
            Post(gpu, "MMIO_WRITE", {"off": lo, "size": 4, "val": value & 0xFFFFFFFF}, vgpu=vgpu)]
