"""Command streamer opcodes shared by the guest (which writes them), the mediator's command parser
and the gpu (which executes them). MI commands keep their opcode in bits 28:23 and their length
(dwords - 2) in the low bits (gt/intel_gpu_commands.h)."""
from __future__ import annotations

import struct

MI_CLIENT = 0x0                     # bits 31:29
OPCODE_SHIFT = 23
OPCODE_MASK = 0x3F

MI_NOOP = 0x00
MI_USER_INTERRUPT = 0x02
MI_ARB_CHECK = 0x05
MI_BATCH_BUFFER_END = 0x0A
MI_STORE_DATA_IMM = 0x20
MI_LOAD_REGISTER_IMM = 0x22
MI_ATOMIC = 0x2F
MI_BATCH_BUFFER_START = 0x31

# Flag bits of the first dword (gen8)
MI_USE_GGTT = 1 << 22               # MI_STORE_DATA_IMM / MI_ATOMIC: the address is in the GGTT
MI_STORE_QWORD = 1 << 21            # MI_STORE_DATA_IMM: store two dwords
MI_BATCH_PPGTT = 1 << 8             # MI_BATCH_BUFFER_START: the batch is in the PPGTT
MI_ATOMIC_OP_SHIFT = 8
MI_ATOMIC_OP_MASK = 0xFF << MI_ATOMIC_OP_SHIFT
MI_ATOMIC_INC = 0x05 << MI_ATOMIC_OP_SHIFT
MI_ATOMIC_INLINE_DATA = 1 << 18

# Whole commands' lengths in dwords, as i915 emits them on gen8
LEN_STORE_DWORD = 4                 # header, address lo, address hi, value
LEN_ATOMIC = 3                      # header, address lo, address hi
LEN_BB_START = 3                    # header, address lo, address hi

BATCH_MAX = 64 * 1024               # the longest batch the bench follows (mediator scan and gpu)

PIPE_CONTROL = 0x7A000000           # a 3D command (client 3)


def mi(opcode: int, length: int = 0) -> int:
    """The first dword of an MI command: opcode in 28:23, dword length minus 2 in the low bits."""
    return (opcode & OPCODE_MASK) << OPCODE_SHIFT | length


def length_of(dword: int) -> int:
    """A command's length in dwords from its first dword (MI: dword length + 2; one-dword MI
    commands, opcodes below 0x10, have no length field)."""
    op = opcode_of(dword)
    if op is not None and op < 0x10:
        return 1
    return (dword & 0xFF) + 2


def opcode_of(dword: int) -> int | None:
    """The MI opcode of a command's first dword, or None if it is not an MI command."""
    if dword >> 29 != MI_CLIENT:
        return None
    return (dword >> OPCODE_SHIFT) & OPCODE_MASK


def batch_end(buf: bytes | bytearray, i: int = 0) -> tuple[int | None, int]:
    """Scan the commands of a batch from dword i for its MI_BATCH_BUFFER_END: (the batch's length
    in bytes, with that command) if it is in buf, else (None, the dword to go on from once more of
    the batch has been read)."""
    n = len(buf) // 4
    words = struct.unpack_from(f"<{n}I", buf)
    while i < n:
        dw = words[i]
        if opcode_of(dw) == MI_BATCH_BUFFER_END:
            return 4 * (i + 1), i
        i += length_of(dw)
    return None, i
