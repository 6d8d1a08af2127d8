"""BAR0 (GTTMMADR) and the one decode of an access to it (gvt.c init_device_info, mmio.c).

16 MiB: registers in the first 2 MiB, the GGTT entries from 8 MiB on, nothing in between.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from nodes.errors import GvtError

SIZE = 16 << 20
MMIO_SIZE = 2 << 20
GTT_OFFSET = 8 << 20

Space = Literal["mmio", "gtt"]
ACCESS_SIZES = (1, 2, 4, 8)


def decode(off: int, size: int) -> Space:
    """Which part of BAR0 a naturally aligned access of `size` bytes at `off` touches.

    Raises EINVAL for a size that is not 1, 2, 4 or 8 or a misaligned access, and EFAULT for an
    access past the end of BAR0 or into the hole between the registers and the GTT window.
    """
    if size not in ACCESS_SIZES or off % size:
        raise GvtError("EINVAL", f"BAR0 access of {size} bytes at {off:#x} is not a naturally "
                       f"aligned 1, 2, 4 or 8 byte access")
    if off < 0 or off + size > SIZE:
        raise GvtError("EFAULT", f"BAR0 offset {off:#x} is outside the {SIZE >> 20} MiB BAR")
    if off >= GTT_OFFSET:
        return "gtt"
    if off + size <= MMIO_SIZE:
        return "mmio"
    raise GvtError("EFAULT", f"BAR0 offset {off:#x} is in the hole between the registers "
                   f"(below {MMIO_SIZE:#x}) and the GTT window (from {GTT_OFFSET:#x})")


def in_gtt(off: int) -> bool:
    """Whether an offset (already decoded as valid) is in the GTT window."""
    return off >= GTT_OFFSET


# Codes of decode_many, one per access.
MMIO, GTT, BAD = 0, 1, -1


def decode_many(offs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """decode() for arrays of accesses: MMIO, GTT or BAD per access (BAD: call decode() on it
    for the reason)."""
    offs = offs.astype(np.int64, copy=False)
    sizes = sizes.astype(np.int64, copy=False)
    good_size = (sizes == 1) | (sizes == 2) | (sizes == 4) | (sizes == 8)
    aligned = good_size & ((offs & (np.maximum(sizes, 1) - 1)) == 0)
    end = offs + sizes
    out = np.full(len(offs), BAD, dtype=np.int8)
    out[aligned & (offs >= GTT_OFFSET) & (end <= SIZE)] = GTT
    out[aligned & (offs >= 0) & (end <= MMIO_SIZE)] = MMIO
    return out


def trap_kind(space: Space, is_write: bool) -> str:
    """The trap kind a guest access is counted under: mmio_read, mmio_write, gtt_read, gtt_write."""
    return f"{space}_{'write' if is_write else 'read'}"


TRAP_KINDS = ("mmio_read", "mmio_write", "gtt_read", "gtt_write")
