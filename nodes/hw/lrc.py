"""Execlist submission facts: the context descriptor, the logical ring context (LRC) image, the
hardware status page, context status buffer entries and the PPGTT entry layout
(gt/intel_lrc.c, gt/intel_lrc_reg.h, gt/intel_engine_types.h, gvt/execlist.h, gvt/gtt.c).
"""
from __future__ import annotations

from dataclasses import dataclass

from nodes.hw import PAGE_SHIFT, PAGE_SIZE

# ---- context descriptor (the two dwords an ELSP element takes) -----------------------------------
DESC_VALID = 1 << 0
DESC_FORCE_PD_RESTORE = 1 << 1
DESC_FORCE_RESTORE = 1 << 2
DESC_ADDRESSING_SHIFT = 3               # bits 4:3
DESC_ADDRESSING_MASK = 0x3 << DESC_ADDRESSING_SHIFT
ADDRESSING_LEGACY_32B = 1               # 3-level PPGTT, four PDPs in the context
ADDRESSING_LEGACY_64B = 3               # 4-level PPGTT: PDP0 holds the PML4
DESC_PRIVILEGE = 1 << 8                 # GVT-g refuses an element without it
DESC_LRCA_MASK = 0xFFFFF000             # bits 31:12: GGTT address of the context

ELSP_DWORDS = 4                         # element 1 hi, element 1 lo, element 0 hi, element 0 lo


@dataclass(frozen=True, slots=True)
class Descriptor:
    lo: int
    hi: int                             # the context id

    @property
    def valid(self) -> bool:
        return bool(self.lo & DESC_VALID)

    @property
    def privileged(self) -> bool:
        return bool(self.lo & DESC_PRIVILEGE)

    @property
    def addressing(self) -> int:
        return (self.lo & DESC_ADDRESSING_MASK) >> DESC_ADDRESSING_SHIFT

    @property
    def lrca(self) -> int:
        return self.lo & DESC_LRCA_MASK

    @property
    def ctx_id(self) -> int:
        return self.hi

    def same_context(self, other: "Descriptor | None") -> bool:
        """execlist.c same_context: the same context id and LRCA."""
        return other is not None and self.hi == other.hi and self.lrca == other.lrca


def descriptor(lrca: int, ctx_id: int, addressing: int = ADDRESSING_LEGACY_64B) -> Descriptor:
    """What i915 puts in an ELSP element for a context at GGTT address `lrca`."""
    if lrca & ~DESC_LRCA_MASK:
        raise ValueError(f"LRCA {lrca:#x} is not a page-aligned 32-bit GGTT address")
    return Descriptor(lrca | addressing << DESC_ADDRESSING_SHIFT | DESC_PRIVILEGE | DESC_VALID,
                      ctx_id & 0xFFFFFFFF)


class ElspPort:
    """The ELSP register's write sequence (handlers.c elsp_mmio_write; the hardware's too): the
    n-th dword of a submission lands in dword 3 - n, so element 1 (hi, lo) comes first and
    element 0 (hi, lo) last; the fourth write submits."""

    def __init__(self) -> None:
        self.elsp = [0, 0, 0, 0]
        self.index = 0

    def elsp_write(self, data: int) -> tuple[Descriptor, Descriptor] | None:
        """One ELSP dword; (element 0, element 1) once the fourth has come."""
        self.elsp[3 - self.index] = data & 0xFFFFFFFF
        fire = self.index == 3
        self.index = (self.index + 1) & 3
        if not fire:
            return None
        d = self.elsp
        return Descriptor(d[0], d[1]), Descriptor(d[2], d[3])


def elsp_dwords(elem0: Descriptor, elem1: Descriptor | None = None) -> list[int]:
    """The four ELSP writes, in the order i915 makes them."""
    e1 = elem1 or Descriptor(0, 0)
    return [e1.hi, e1.lo, elem0.hi, elem0.lo]


# ---- the LRC image -------------------------------------------------------------------------------
# Page 0 is the per-process HWSP; the register state starts at LRCA + 1 page (LRC_STATE_PN). It is
# a list of MI_LOAD_REGISTER_IMM (offset, value) pairs; these are the dword indices of the values.
LRC_STATE_PN = 1
LRC_PAGES = 2
CTX_CONTEXT_CONTROL = 0x02 + 1
CTX_RING_HEAD = 0x04 + 1
CTX_RING_TAIL = 0x06 + 1
CTX_RING_START = 0x08 + 1
CTX_RING_CTL = 0x0A + 1
CTX_BB_HEAD_U = 0x0C + 1
CTX_BB_HEAD_L = 0x0E + 1
CTX_PDP_UDW = {3: 0x24 + 1, 2: 0x28 + 1, 1: 0x2C + 1, 0: 0x30 + 1}
CTX_PDP_LDW = {3: 0x26 + 1, 2: 0x2A + 1, 1: 0x2E + 1, 0: 0x32 + 1}
CTX_STATE_DWORDS = 0x34                 # the part of the state page the bench reads and writes

RING_HEAD_OFF_MASK = 0x001FFFFC        # the byte offset bits of a context's RING_HEAD
RING_TAIL_OFF_MASK = 0x001FFFF8        # RING_TAIL: qword aligned
RING_CTL_VALID = 1 << 0
RING_CTL_SIZE_MASK = 0x1FF000            # (pages - 1) << 12


def ring_ctl(size: int) -> int:
    """RING_CTL of a ring buffer of `size` bytes (a multiple of 4 KiB): size - 4 KiB, valid."""
    return ((size - PAGE_SIZE) & RING_CTL_SIZE_MASK) | RING_CTL_VALID


def ring_size(ctl: int) -> int:
    return (ctl & RING_CTL_SIZE_MASK) + PAGE_SIZE


def pdp(state: list[int], n: int) -> int:
    return state[CTX_PDP_UDW[n]] << 32 | state[CTX_PDP_LDW[n]]


# ---- hardware status page (gt/intel_engine_types.h I915_HWS_CSB_*) ---------------------------------
HWS_CSB_BUF0_INDEX = 0x10               # dword: the CSB copy, 6 entries x 2 dwords
HWS_CSB_WRITE_INDEX = 0x1F              # dword: the CSB write pointer copy
HWS_SEQNO_INDEX = 0x30                  # dword where the bench's rings store their seqno (I915_GEM_HWS_SEQNO)

# ---- context status buffer entry (execlist.h execlist_context_status_format) ----------------------
CSB_IDLE_TO_ACTIVE = 1 << 0
CSB_PREEMPTED = 1 << 1
CSB_ELEMENT_SWITCH = 1 << 2
CSB_ACTIVE_TO_IDLE = 1 << 3
CSB_CONTEXT_COMPLETE = 1 << 4
CSB_LITE_RESTORE = 1 << 15

# ---- EXECLIST_STATUS low dword (execlist.h execlist_status_format) --------------------------------
EL_STATUS_CURRENT_POINTER = 1 << 0
EL_STATUS_WRITE_POINTER = 1 << 1
EL_STATUS_QUEUE_FULL = 1 << 2
EL_STATUS_0_VALID = 1 << 4
EL_STATUS_1_VALID = 1 << 5
EL_STATUS_0_ACTIVE = 1 << 14
EL_STATUS_1_ACTIVE = 1 << 15

# ---- PPGTT entries (gen8, gvt/gtt.c) ---------------------------------------------------------------
PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
PDE_PS_2M = 1 << 7                      # a PD entry that maps a 2 MiB page
PDE_IPS_64K = 1 << 11
ADDR_MASK = ((1 << 46) - 1) & ~((1 << PAGE_SHIFT) - 1)   # bits 45:12
ADDR_2M_MASK = ((1 << 46) - 1) & ~((1 << 21) - 1)        # bits 45:21
ENTRIES_PER_TABLE = 512
LEVELS = 4                               # PML4, PDP, PD, PT
LEVEL_NAMES = ("pml4", "pdp", "pd", "pt")
LEVEL_SHIFT = (39, 30, 21, 12)           # the VA bits each level indexes
HUGE_2M = 1 << 21
VA_BITS = 48


def level_index(va: int, level: int) -> int:
    """The entry of table level `level` (0 = PML4 .. 3 = PT) that address `va` uses."""
    return (va >> LEVEL_SHIFT[level]) & (ENTRIES_PER_TABLE - 1)


def entry(frame: int, flags: int = PTE_PRESENT | PTE_RW) -> int:
    return ((frame << PAGE_SHIFT) & ADDR_MASK) | flags


def frame_of(e: int) -> int:
    return (e & ADDR_MASK) >> PAGE_SHIFT
