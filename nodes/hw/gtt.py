"""The GGTT: entry format (gen8 PTE) and the arithmetic between BAR0 offsets, entry indices and
graphics memory addresses. Every helper takes an int or a numpy array.

Entry (gt/intel_gtt.h gen8_ggtt_pte_encode, gvt/gtt.c ADDR_4K_MASK): bit 0 present, bit 1 RW,
address bits 45:12. Index i maps graphics memory address i * 4096.
"""
from __future__ import annotations

from typing import TypeVar

import numpy as np

from nodes.hw import bar0

PAGE_SHIFT = 12
ENTRY_SIZE = 8
ENTRY_SHIFT = 3
ENTRIES = (bar0.SIZE - bar0.GTT_OFFSET) // ENTRY_SIZE     # 1M entries: 4 GiB of GM
GM_SIZE = ENTRIES << PAGE_SHIFT

PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
ADDR_MASK = ((1 << 46) - 1) & ~((1 << PAGE_SHIFT) - 1)    # bits 45:12
MAX_FRAME = ADDR_MASK >> PAGE_SHIFT

N = TypeVar("N", int, np.ndarray)


def encode(frame: N, flags: int = PTE_PRESENT) -> N:
    """An entry that points at page frame `frame`, with `flags` in the other bits."""
    if isinstance(frame, np.ndarray):
        return ((frame.astype(np.uint64) << np.uint64(PAGE_SHIFT)) & np.uint64(ADDR_MASK)) | np.uint64(flags)
    return ((frame << PAGE_SHIFT) & ADDR_MASK) | flags


def frame_of(entry: N) -> N:
    if isinstance(entry, np.ndarray):
        return (entry & np.uint64(ADDR_MASK)) >> np.uint64(PAGE_SHIFT)
    return (entry & ADDR_MASK) >> PAGE_SHIFT


def present(entry: N) -> N:
    if isinstance(entry, np.ndarray):
        return (entry & np.uint64(PTE_PRESENT)) != 0
    return bool(entry & PTE_PRESENT)


def index_of(off: N) -> N:
    """BAR0 offset in the GTT window -> the index of the entry it falls in."""
    return (off - bar0.GTT_OFFSET) >> ENTRY_SHIFT


def offset_of(index: N) -> N:
    """Entry index -> BAR0 offset of its first byte."""
    return bar0.GTT_OFFSET + (index << ENTRY_SHIFT)


def index_of_gm(gm: N) -> N:
    return gm >> PAGE_SHIFT


def gm_of(index: N) -> N:
    return index << PAGE_SHIFT


def half(off: int) -> int:
    """Which half of its entry a 4-byte access at BAR0 offset `off` touches: 0 (low) or 4."""
    return off & 4


def bytes_of(entry: int, off: int, size: int) -> int:
    """The `size` bytes of `entry` that an access at BAR0 offset `off` reads."""
    return (entry >> ((off & (ENTRY_SIZE - 1)) * 8)) & ((1 << (8 * size)) - 1)


def with_bytes(entry: int, off: int, size: int, val: int) -> int:
    """`entry` after an access at BAR0 offset `off` wrote `size` bytes of `val` into it."""
    shift = (off & (ENTRY_SIZE - 1)) * 8
    mask = ((1 << (8 * size)) - 1) << shift
    return (entry & ~mask & 0xFFFFFFFFFFFFFFFF) | ((val << shift) & mask)
