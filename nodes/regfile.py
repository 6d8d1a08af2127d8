"""A sparse 32-bit register file, accessed with 1, 2, 4 or 8 byte naturally aligned accesses."""
from __future__ import annotations


def read_dwords(regs: dict[int, int], off: int, size: int) -> int:
    base = off & ~3
    if size == 8:
        return regs.get(base, 0) | (regs.get(base + 4, 0) << 32)
    shift = (off & 3) * 8
    return (regs.get(base, 0) >> shift) & ((1 << (size * 8)) - 1)


def write_dwords(regs: dict[int, int], off: int, size: int, val: int) -> None:
    base = off & ~3
    if size == 8:
        regs[base] = val & 0xFFFFFFFF
        regs[base + 4] = (val >> 32) & 0xFFFFFFFF
        return
    shift = (off & 3) * 8
    mask = ((1 << (size * 8)) - 1) << shift
    regs[base] = (regs.get(base, 0) & ~mask) | ((val << shift) & mask)
