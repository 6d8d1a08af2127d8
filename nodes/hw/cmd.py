"""The command streamer's commands: one table (gvt/cmd_parser.c cmd_info[], the bit layouts of
gt/intel_gpu_commands.h) that the guest builds its rings and batches from, the mediator's command
parser audits with, and the simulated gpu executes.

A command's first dword names it: the client in bits 31:29 (0 MI, 2 2D, 3 3D/media), and an
opcode whose width depends on the client (the kernel's decode_info: the top 9 bits for MI, 10
for 2D, 16 for 3D). Which clients an engine decodes is fixed too (render: MI and 3D, blitter: MI
and 2D, video and video enhancement: MI and their own 3D-type media commands). The length is
constant (F_LEN_CONST) or in the low bits of the first dword as dwords - 2 (F_LEN_VAR), and some
variable-length commands have one valid length only (F_LEN_VAR_FIXED).

The table holds every MI command of cmd_info[] that gen9 has, PIPE_CONTROL and 3DPRIMITIVE; 3D state,
media and blitter commands are not modelled (the parser refuses them as unknown, as it refuses
a command that is in no table). `rule` names what the parser does with a command (see
nodes/mediator/cmd_parser.py); `run` says whether the simulated gpu executes it ("exec"), or
decodes it and models no effect ("nop"), or cannot run it ("hang": it stops the context).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

CLIENT_MI, CLIENT_2D, CLIENT_3D = 0, 2, 3
OP_LEN = {CLIENT_MI: 9, CLIENT_2D: 10, CLIENT_3D: 16}       # bits of the opcode, by client
ENGINES = ("rcs", "vcs", "vecs", "bcs")
# the clients each engine decodes (ring_decode_info)
ENGINE_CLIENTS: dict[str, frozenset[int]] = {
    "rcs": frozenset({CLIENT_MI, CLIENT_3D}), "bcs": frozenset({CLIENT_MI, CLIENT_2D}),
    "vcs": frozenset({CLIENT_MI, CLIENT_3D}), "vecs": frozenset({CLIENT_MI, CLIENT_3D}),
}
ALL = frozenset(ENGINES)
RCS = frozenset({"rcs"})

# ---- flag bits of the first dword (and of PIPE_CONTROL's second) --------------------------------
USE_GGTT = 1 << 22                  # MI_STORE_DATA_IMM, MI_ATOMIC, MI_LOAD/STORE_REGISTER_MEM
STORE_QWORD = 1 << 21               # MI_STORE_DATA_IMM: two dwords of data
BB_SECOND_LEVEL = 1 << 22           # MI_BATCH_BUFFER_START: a second-level batch (returns here)
BB_PPGTT = 1 << 8                   # MI_BATCH_BUFFER_START: the batch is in the PPGTT, non-privileged
ATOMIC_OP_SHIFT = 8                 # MI_ATOMIC: the operation in bits 15:8
ATOMIC_OP_MASK = 0xFF << ATOMIC_OP_SHIFT
ATOMIC_SIZE_SHIFT = 19              # MI_ATOMIC: data size, bits 20:19 (0 dword, 1 qword, 2 oword)
ATOMIC_INLINE_DATA = 1 << 18        # MI_ATOMIC: operands follow the address
ATOMIC_OPS = {"move": 0x04, "inc": 0x05, "dec": 0x06, "add": 0x07, "sub": 0x08, "and": 0x01,
              "or": 0x02, "xor": 0x03}
FLUSH_DW_STORE_INDEX = 1 << 21      # MI_FLUSH_DW: the address is an offset in the status page
FLUSH_DW_OP_SHIFT = 14              # MI_FLUSH_DW: post-sync operation, bits 15:14 (1: store)
FLUSH_DW_NOTIFY = 1 << 8
FLUSH_DW_USE_GGTT = 1 << 2          # in MI_FLUSH_DW's second dword
PC_GLOBAL_GTT = 1 << 24             # PIPE_CONTROL dword 1 (PIPE_CONTROL_GLOBAL_GTT_IVB)
PC_MMIO_WRITE = 1 << 23             # PIPE_CONTROL dword 1: the post-sync write goes to a register
PC_STORE_DATA_INDEX = 1 << 21       # PIPE_CONTROL dword 1
PC_POST_SYNC_SHIFT = 14             # PIPE_CONTROL dword 1, bits 15:14: 1 write imm, 2 depth, 3 time
PC_NOTIFY = 1 << 8                  # PIPE_CONTROL dword 1
REG_MASK = 0x7FFFFC                 # a register offset in a command: bits 22:2 (cmd_reg)
ADDR_LO_MASK = 0xFFFFFFFC           # a graphics address's low dword: bits 31:2 (cmd_gma)
ADDR_HI_MASK = 0xFFFF               # its high dword: bits 15:0 (48-bit addresses)

BATCH_MAX = 64 * 1024               # the longest batch the parser and the gpu follow, in bytes


# eq=False: each command is one object of TABLE, its identity what tells it (a dict keyed by
# commands hashes by it, not by a tuple of every field)
@dataclass(frozen=True, slots=True, eq=False)
class Cmd:
    name: str
    client: int
    opcode: int                 # the top OP_LEN[client] bits of the first dword
    const_len: int = 0          # F_LEN_CONST: always this many dwords; 0: from the length field
    len_bits: int = 8           # F_LEN_VAR: width of the length field (dwords - 2)
    fixed: int = 0              # F_LEN_VAR_FIXED: the only valid length in dwords (0: any)
    engines: frozenset[str] = ALL
    addr: tuple[int, ...] = ()  # dwords that hold the low half of a graphics address (ADDR_FIX)
    rule: str = ""              # what the parser does (nodes.mediator.cmd_parser.RULES)
    run: str = "nop"            # exec, nop or hang: what the simulated gpu does with it

    def length(self, dw0: int) -> int:
        """The command's length in dwords, from its first dword."""
        if self.const_len:
            return self.const_len
        return (dw0 & ((1 << self.len_bits) - 1)) + 2

    def header(self, length: int | None = None, flags: int = 0) -> int:
        """The first dword of this command, `length` dwords long, with flag bits set."""
        shift = 32 - OP_LEN[self.client]
        dw = self.opcode << shift | flags
        if not self.const_len:
            n = length if length is not None else (self.fixed or 2)
            if not 2 <= n < (1 << self.len_bits) + 2:
                raise ValueError(f"{self.name} cannot be {n} dwords long")
            dw |= n - 2
        return dw & 0xFFFFFFFF


def _mi(name: str, op: int, **kw: object) -> Cmd:
    return Cmd(name, CLIENT_MI, op, **kw)      # type: ignore[arg-type]


# Lengths: F_LEN_CONST commands name const_len; the others have an 8-bit length field unless said.
TABLE: tuple[Cmd, ...] = (
    _mi("MI_NOOP", 0x00, const_len=1),
    _mi("MI_SET_PREDICATE", 0x01, const_len=1),
    _mi("MI_USER_INTERRUPT", 0x02, const_len=1, rule="user_interrupt", run="exec"),
    _mi("MI_WAIT_FOR_EVENT", 0x03, const_len=1, engines=frozenset({"rcs", "bcs"})),
    _mi("MI_FLUSH", 0x04, const_len=1),
    _mi("MI_ARB_CHECK", 0x05, const_len=1),
    _mi("MI_RS_CONTROL", 0x06, const_len=1, engines=RCS),
    _mi("MI_REPORT_HEAD", 0x07, const_len=1),
    _mi("MI_ARB_ON_OFF", 0x08, const_len=1),
    _mi("MI_URB_ATOMIC_ALLOC", 0x09, const_len=1, engines=RCS),
    _mi("MI_BATCH_BUFFER_END", 0x0A, const_len=1, rule="bb_end", run="exec"),
    _mi("MI_SUSPEND_FLUSH", 0x0B, const_len=1),
    _mi("MI_PREDICATE", 0x0C, const_len=1, engines=RCS),
    _mi("MI_TOPOLOGY_FILTER", 0x0D, const_len=1),
    _mi("MI_SET_APPID", 0x0E, const_len=1),
    _mi("MI_RS_CONTEXT", 0x0F, const_len=1, engines=RCS),
    _mi("MI_LOAD_SCAN_LINES_INCL", 0x12, const_len=2, engines=frozenset({"rcs", "bcs"})),
    _mi("MI_SEMAPHORE_MBOX", 0x16, fixed=3),
    _mi("MI_URB_CLEAR", 0x19, fixed=2, engines=RCS),
    _mi("MI_MATH", 0x1A),
    _mi("MI_SEMAPHORE_SIGNAL", 0x1B, fixed=2),
    _mi("MI_SEMAPHORE_WAIT", 0x1C, fixed=4, addr=(2,), rule="unexpected", run="hang"),
    _mi("MI_STORE_DATA_IMM", 0x20, len_bits=10, addr=(1,), rule="store_data_imm", run="exec"),
    _mi("MI_STORE_DATA_INDEX", 0x21, rule="unexpected", run="hang"),
    _mi("MI_LOAD_REGISTER_IMM", 0x22, rule="lri", run="exec"),
    _mi("MI_UPDATE_GTT", 0x23, len_bits=10, rule="unexpected", run="hang"),
    _mi("MI_STORE_REGISTER_MEM", 0x24, fixed=4, addr=(2,), rule="srm", run="exec"),
    _mi("MI_FLUSH_DW", 0x26, len_bits=6, rule="flush_dw", run="exec"),
    _mi("MI_CLFLUSH", 0x27, len_bits=10, addr=(1,), rule="unexpected", run="hang"),
    _mi("MI_REPORT_PERF_COUNT", 0x28, len_bits=6, fixed=4, addr=(1,), rule="unexpected", run="hang"),
    _mi("MI_LOAD_REGISTER_MEM", 0x29, fixed=4, addr=(2,), rule="lrm", run="exec"),
    _mi("MI_LOAD_REGISTER_REG", 0x2A, fixed=3, rule="lrr", run="exec"),
    _mi("MI_RS_STORE_DATA_IMM", 0x2B, fixed=4, engines=RCS, run="hang"),
    _mi("MI_LOAD_URB_MEM", 0x2C, fixed=4, engines=RCS, addr=(2,), run="hang"),
    _mi("MI_STORE_URM_MEM", 0x2D, engines=RCS, addr=(2,), run="hang"),
    _mi("MI_OP_2E", 0x2E, fixed=5, addr=(1, 2), rule="unexpected", run="hang"),
    _mi("MI_ATOMIC", 0x2F, addr=(1,), rule="atomic", run="exec"),
    _mi("MI_BATCH_BUFFER_START", 0x31, rule="bb_start", run="exec"),
    _mi("MI_CONDITIONAL_BATCH_BUFFER_END", 0x36, fixed=4, addr=(2,), rule="unexpected", run="hang"),
    Cmd("PIPE_CONTROL", CLIENT_3D, 0x7A00, engines=RCS, addr=(2,), rule="pipe_control", run="exec"),
    # draws nothing in the simulated gpu; it takes time by its size (nodes.gpu.cost)
    Cmd("3DPRIMITIVE", CLIENT_3D, 0x7B00, fixed=7, engines=RCS, run="exec"),
)
BY_NAME: dict[str, Cmd] = {c.name: c for c in TABLE}
_BY_OPCODE: dict[int, Cmd] = {c.opcode: c for c in TABLE}

MI_NOOP = BY_NAME["MI_NOOP"]
MI_USER_INTERRUPT = BY_NAME["MI_USER_INTERRUPT"]
MI_BATCH_BUFFER_END = BY_NAME["MI_BATCH_BUFFER_END"]
MI_BATCH_BUFFER_START = BY_NAME["MI_BATCH_BUFFER_START"]
MI_STORE_DATA_IMM = BY_NAME["MI_STORE_DATA_IMM"]
MI_LOAD_REGISTER_IMM = BY_NAME["MI_LOAD_REGISTER_IMM"]
MI_LOAD_REGISTER_REG = BY_NAME["MI_LOAD_REGISTER_REG"]
MI_LOAD_REGISTER_MEM = BY_NAME["MI_LOAD_REGISTER_MEM"]
MI_STORE_REGISTER_MEM = BY_NAME["MI_STORE_REGISTER_MEM"]
MI_ATOMIC = BY_NAME["MI_ATOMIC"]
MI_FLUSH_DW = BY_NAME["MI_FLUSH_DW"]
PIPE_CONTROL = BY_NAME["PIPE_CONTROL"]
PRIMITIVE_3D = BY_NAME["3DPRIMITIVE"]
LEN_3DPRIMITIVE = 7                 # header, topology, vertex count, start vertex, instance count,
                                    # start instance, base vertex

# gen8+ lengths as i915 emits them
LEN_STORE_DWORD = 4                 # header, address lo, address hi, value
LEN_STORE_QWORD = 5
LEN_ATOMIC = 3                      # header, address lo, address hi
LEN_ATOMIC_INLINE = 11              # and eight dwords of operands
LEN_BB_START = 3                    # header, address lo, address hi
LEN_PIPE_CONTROL = 6                # header, flags, address lo, address hi, data lo, data hi
LEN_FLUSH_DW = 4                    # header, address lo | flags, address hi, data


class UnknownCommand(Exception):
    """A dword that is no command of the engine (the kernel's -EBADRQC)."""

    def __init__(self, dword: int, engine: str):
        super().__init__(f"unknown command {dword:#010x} on {engine}")
        self.dword, self.engine = dword, engine


def lookup(dw0: int, engine: str) -> Cmd | None:
    """The command a first dword names on an engine (get_cmd_info), or None."""
    client = dw0 >> 29
    if client not in ENGINE_CLIENTS[engine]:
        return None
    c = _BY_OPCODE.get(dw0 >> (32 - OP_LEN[client]))
    if c is None or engine not in c.engines:
        return None
    return c


def address(words: tuple[int, ...] | list[int], i: int) -> int:
    """The 48-bit graphics address in dwords i (low) and i + 1 (high) of a command."""
    return (words[i] & ADDR_LO_MASK) | (words[i + 1] & ADDR_HI_MASK) << 32


def batch_extent(buf: bytes | bytearray, engine: str, i: int = 0) -> tuple[int | None, int]:
    """Walk the commands of a batch from dword i (find_bb_size): (its length in bytes, through
    the MI_BATCH_BUFFER_END or the chained MI_BATCH_BUFFER_START that ends it, if that command
    lies whole in buf, else None; the dword to go on from once more of the batch is read).
    Raises UnknownCommand for a dword that is no command of the engine."""
    n = len(buf) // 4
    words = struct.unpack_from(f"<{n}I", buf)
    while i < n:
        dw = words[i]
        c = lookup(dw, engine)
        if c is None:
            raise UnknownCommand(dw, engine)
        ln = c.length(dw)
        if c is MI_BATCH_BUFFER_END or (c is MI_BATCH_BUFFER_START and not dw & BB_SECOND_LEVEL):
            if i + ln <= n:
                return 4 * (i + ln), i
            return None, i
        i += ln
    return None, i


def encode(*dwords: int) -> bytes:
    return struct.pack(f"<{len(dwords)}I", *(d & 0xFFFFFFFF for d in dwords))


# ---- builders (what the guest's i915 emits) ----------------------------------------------------
def store_dword(addr: int, value: int, ggtt: bool = False) -> list[int]:
    return [MI_STORE_DATA_IMM.header(LEN_STORE_DWORD, USE_GGTT if ggtt else 0),
            addr & 0xFFFFFFFF, addr >> 32, value]


def atomic(addr: int, op: str = "inc", ggtt: bool = False, operand: int | None = None) -> list[int]:
    flags = ATOMIC_OPS[op] << ATOMIC_OP_SHIFT | (USE_GGTT if ggtt else 0)
    if operand is None:
        return [MI_ATOMIC.header(LEN_ATOMIC, flags), addr & 0xFFFFFFFF, addr >> 32]
    return [MI_ATOMIC.header(LEN_ATOMIC_INLINE, flags | ATOMIC_INLINE_DATA), addr & 0xFFFFFFFF,
            addr >> 32, operand, 0, 0, 0, 0, 0, 0, 0]


def bb_start(addr: int, ppgtt: bool = True, second_level: bool = False) -> list[int]:
    flags = (BB_PPGTT if ppgtt else 0) | (BB_SECOND_LEVEL if second_level else 0)
    return [MI_BATCH_BUFFER_START.header(LEN_BB_START, flags), addr & 0xFFFFFFFF, addr >> 32]


def primitive(vertices: int, instances: int = 1) -> list[int]:
    """3DPRIMITIVE: `vertices` per instance, `instances` of them (a point list)."""
    return [PRIMITIVE_3D.header(LEN_3DPRIMITIVE), 1, vertices & 0xFFFFFFFF, 0,
            instances & 0xFFFFFFFF, 0, 0]


def lri(*pairs: tuple[int, int]) -> list[int]:
    out = [MI_LOAD_REGISTER_IMM.header(1 + 2 * len(pairs))]
    for reg, val in pairs:
        out += [reg & REG_MASK, val]
    return out
