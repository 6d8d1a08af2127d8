"""Command streamer opcodes shared by the guest (which writes them), the mediator's command parser
and the gpu (which executes them). MI commands keep their opcode in bits 28:23 and their length
(dwords - 2) in the low bits (gt/intel_gpu_commands.h)."""
from __future__ import annotations

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

PIPE_CONTROL = 0x7A000000           # a 3D command (client 3)


def mi(opcode: int, length: int = 0) -> int:
    """The first dword of an MI command: opcode in 28:23, dword length minus 2 in the low bits."""
    return (opcode & OPCODE_MASK) << OPCODE_SHIFT | length


def opcode_of(dword: int) -> int | None:
    """The MI opcode of a command's first dword, or None if it is not an MI command."""
    if dword >> 29 != MI_CLIENT:
        return None
    return (dword >> OPCODE_SHIFT) & OPCODE_MASK
