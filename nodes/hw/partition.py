"""vGPU types and the host's share of graphics memory and fences (gvt/vgpu.c, gvt/gvt.h)."""
from __future__ import annotations

from typing import NamedTuple

MiB = 1 << 20

HOST_LOW_GM = 128 * MiB
HOST_HIGH_GM = 384 * MiB
TOTAL_FENCES = 32                   # Gen9's fence registers
HOST_FENCES = 4
# A simulated GPU may have more: its fence registers run from FENCE_BASE up to GFX_FLSH_CNTL
# (regs.py), room for 512. A vGPU still sees at most the 16 that GVT-g traps (regs.FENCE_SLOTS).
MAX_SIM_FENCES = 512
GVT_MAX_VGPU = 8                    # ids 0..7; id 0 is the idle vGPU, so 7 real ones upstream


class VgpuType(NamedTuple):
    """What a vGPU of a type gets (gvt/vgpu.c intel_gvt_init_vgpu_types): bytes of aperture
    ("low") GM, bytes of hidden ("high") GM, fence registers, and its scheduling weight."""
    low_gm: int
    high_gm: int
    fences: int
    weight: int


# upstream's table (GVTg_V5_8 ... GVTg_V5_1): the default; a config may add its own types
VGPU_TYPES: dict[str, VgpuType] = {
    "_8": VgpuType(64 * MiB, 384 * MiB, 4, 2),
    "_4": VgpuType(128 * MiB, 512 * MiB, 4, 4),
    "_2": VgpuType(256 * MiB, 1024 * MiB, 4, 8),
    "_1": VgpuType(512 * MiB, 2048 * MiB, 4, 16),
}
