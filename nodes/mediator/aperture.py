"""vGPU types and the partitioning of graphics memory and fences among vGPUs (gvt/vgpu.c)."""
from __future__ import annotations

from dataclasses import dataclass

from nodes import hw
from nodes.errors import GvtError


@dataclass(frozen=True)
class Partition:
    aperture_base: int      # GM address; the vGPU's share of the CPU-mappable ("low") GM
    aperture_size: int
    hidden_base: int        # its share of the hidden ("high") GM
    hidden_size: int
    fence_base: int
    fence_num: int

    def contains_gm(self, gm: int) -> bool:
        return (self.aperture_base <= gm < self.aperture_base + self.aperture_size
                or self.hidden_base <= gm < self.hidden_base + self.hidden_size)

    def to_wire(self) -> dict:
        return {"aperture_base": self.aperture_base, "aperture_size": self.aperture_size,
                "hidden_base": self.hidden_base, "hidden_size": self.hidden_size,
                "fence_base": self.fence_base, "fence_num": self.fence_num}


class GmAllocator:
    """First-fit allocation of aperture and hidden GM and of fences, after the host's share."""

    def __init__(self, aperture_size: int, gm_size: int = hw.GM_SIZE):
        if aperture_size <= hw.HOST_LOW_GM or aperture_size % hw.MiB:
            raise GvtError("EINVAL", f"aperture of {aperture_size} bytes leaves nothing for vGPUs "
                           f"after the host's {hw.HOST_LOW_GM >> 20} MiB")
        self.aperture_size = aperture_size
        self.gm_size = gm_size
        self.low_free = [(hw.HOST_LOW_GM, aperture_size - hw.HOST_LOW_GM)]
        self.high_free = [(aperture_size + hw.HOST_HIGH_GM, gm_size - aperture_size - hw.HOST_HIGH_GM)]
        self.fences_free = [(hw.HOST_FENCES, hw.TOTAL_FENCES - hw.HOST_FENCES)]

    @staticmethod
    def _take(free: list[tuple[int, int]], size: int) -> int | None:
        for i, (base, length) in enumerate(free):
            if length >= size:
                free[i] = (base + size, length - size)
                return base
        return None

    @staticmethod
    def _give(free: list[tuple[int, int]], base: int, size: int) -> None:
        free.append((base, size))
        free.sort()
        merged: list[tuple[int, int]] = []
        for b, l in free:
            if merged and merged[-1][0] + merged[-1][1] == b:
                merged[-1] = (merged[-1][0], merged[-1][1] + l)
            elif l:
                merged.append((b, l))
        free[:] = merged

    def available(self, vgpu_type: str) -> int:
        low, high, fences, _ = type_info(vgpu_type)
        return min(sum(l for _, l in self.low_free) // low,
                   sum(l for _, l in self.high_free) // high,
                   sum(l for _, l in self.fences_free) // fences)

    def allocate(self, vgpu_type: str) -> Partition:
        low, high, fences, _ = type_info(vgpu_type)
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


def type_info(vgpu_type: str) -> tuple[int, int, int, int]:
    try:
        return hw.VGPU_TYPES[vgpu_type]
    except KeyError:
        raise GvtError("EINVAL", f"unknown vGPU type {vgpu_type!r}; known: "
                       f"{', '.join(hw.VGPU_TYPES)}") from None
