"""vGPU types and the host's share of graphics memory and fences (gvt/vgpu.c, gvt/gvt.h)."""
from __future__ import annotations

MiB = 1 << 20

HOST_LOW_GM = 128 * MiB
HOST_HIGH_GM = 384 * MiB
TOTAL_FENCES = 32
HOST_FENCES = 4
GVT_MAX_VGPU = 8                    # ids 0..7; id 0 is the idle vGPU, so 7 real ones upstream

# name: (low GM, high GM, fences, weight)
VGPU_TYPES: dict[str, tuple[int, int, int, int]] = {
    "_8": (64 * MiB, 384 * MiB, 4, 2),
    "_4": (128 * MiB, 512 * MiB, 4, 4),
    "_2": (256 * MiB, 1024 * MiB, 4, 8),
    "_1": (512 * MiB, 2048 * MiB, 4, 16),
}
