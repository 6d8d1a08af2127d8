"""Hardware facts of a gen8+ Intel GPU as GVT-g sees it: defined here once, used by every role.

Sources: drivers/gpu/drm/i915/gvt/ (gvt.c, vgpu.c, gtt.c, handlers.c, execlist.c) and
drivers/gpu/drm/i915/i915_pvinfo.h, gt/intel_gtt.h in the Linux kernel.
"""
from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# --- BAR0 (GTTMMADR) -------------------------------------------------------------------------
BAR0_SIZE = 16 * MiB
MMIO_SIZE = 2 * MiB            # registers live below this
GTT_OFFSET = 8 * MiB           # GGTT entries are reachable from here
GTT_ENTRY_SIZE = 8
GGTT_ENTRIES = (BAR0_SIZE - GTT_OFFSET) // GTT_ENTRY_SIZE   # 1M entries = 4 GiB of GM
GM_SIZE = GGTT_ENTRIES * PAGE_SIZE

# --- GGTT / PPGTT entry format (gen8) ---------------------------------------------------------
PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
PTE_ADDR_MASK = ((1 << 46) - 1) & ~((1 << PAGE_SHIFT) - 1)   # bits 45:12


def pte_encode(frame: int, flags: int = PTE_PRESENT) -> int:
    """A gen8 entry that points at page frame `frame`."""
    return ((frame << PAGE_SHIFT) & PTE_ADDR_MASK) | flags


def pte_frame(entry: int) -> int:
    return (entry & PTE_ADDR_MASK) >> PAGE_SHIFT


# --- vGPU partitioning (gvt/vgpu.c, gvt/gvt.h) ------------------------------------------------
HOST_LOW_GM = 128 * MiB
HOST_HIGH_GM = 384 * MiB
TOTAL_FENCES = 32
HOST_FENCES = 4
GVT_MAX_VGPU = 8               # including the idle vGPU 0, so 7 real ones upstream

# name: (low GM, high GM, fences, weight)
VGPU_TYPES: dict[str, tuple[int, int, int, int]] = {
    "_8": (64 * MiB, 384 * MiB, 4, 2),
    "_4": (128 * MiB, 512 * MiB, 4, 4),
    "_2": (256 * MiB, 1024 * MiB, 4, 8),
    "_1": (512 * MiB, 2048 * MiB, 4, 16),
}

# --- PV info page (i915_pvinfo.h) -------------------------------------------------------------
PVINFO_BASE = 0x78000
PVINFO_SIZE = 0x1000
PV_MAGIC = 0x4776544776544776          # "vGTvGTvG" little endian
PV_MAGIC_OFF = 0x00
PV_VERSION_MAJOR_OFF = 0x08             # u16
PV_VERSION_MINOR_OFF = 0x0A             # u16
PV_VGT_ID_OFF = 0x0C
PV_CAPS_OFF = 0x10
PV_VERSION_MAJOR = 1
PV_VERSION_MINOR = 0
VGT_CAPS_FULL_PPGTT = 1 << 2
VGT_CAPS_HWSP_EMULATION = 1 << 3
VGT_CAPS_HUGE_GTT = 1 << 4
PV_AVAIL_MAPPABLE_BASE = 0x40
PV_AVAIL_MAPPABLE_SIZE = 0x44
PV_AVAIL_NONMAPPABLE_BASE = 0x48
PV_AVAIL_NONMAPPABLE_SIZE = 0x4C
PV_AVAIL_FENCE_NUM = 0x50
PV_DISPLAY_READY = 0x804
PV_G2V_NOTIFY = 0x818
PV_PDP0_LO = 0x838                      # pdp[4] lo/hi pairs up to 0x854
PV_EXECLIST_DESC_LO = 0x858
PV_EXECLIST_DESC_HI = 0x85C
G2V_PPGTT_L3_CREATE = 2
G2V_PPGTT_L3_DESTROY = 3
G2V_PPGTT_L4_CREATE = 4
G2V_PPGTT_L4_DESTROY = 5

# --- Engines and execlists --------------------------------------------------------------------
RCS_BASE = 0x2000
BCS_BASE = 0x22000
VCS_BASE = 0x12000
VECS_BASE = 0x1A000
RING_TAIL = 0x30
RING_HEAD = 0x34
RING_START = 0x38
RING_CTL = 0x3C
RING_ELSP = 0x230
RING_EXECLIST_STATUS = 0x234
RING_CSB = 0x370
RING_CSB_ENTRIES = 6
RING_CSB_PTR = 0x3A0
RING_GFX_MODE = 0x29C
GFX_MODE_PPGTT_ENABLE = 1 << 9          # masked bit
GFX_MODE_RUN_LIST_ENABLE = 1 << 15      # masked bit: execlists
CSB_PTR_RESET = 0x7                     # write pointer 7, read pointer 0

# --- Other registers --------------------------------------------------------------------------
GDRST = 0x941C
GFX_FLSH_CNTL = 0x101008                # a write flushes the GGTT TLBs
GT0_IMR = 0x44304
GT0_IIR = 0x44308
GT0_IER = 0x4430C
MASTER_IRQ = 0x44200
# A register with no side effects that guests may use freely: a general purpose register of
# the render ring (CS_GPR0, RCS base + 0x600, 16 x 64-bit).
RCS_GPR0 = RCS_BASE + 0x600


def masked_write(old: int, data: int) -> int:
    """A masked register write: bits 31:16 select which of bits 15:0 change."""
    mask = data >> 16
    return (old & ~mask & 0xFFFF) | (data & mask & 0xFFFF)


def masked_enable(bits: int) -> int:
    return (bits << 16) | bits


def masked_disable(bits: int) -> int:
    return bits << 16

# --- Reset values and register attributes shared by the gpu model and the mediator's vregs ----
# offset: (reset value, read-only bit mask, masked register?)
REG_ATTRS: dict[int, tuple[int, int, bool]] = {
    RCS_BASE + RING_GFX_MODE: (0, 0, True),
    RCS_BASE + RING_EXECLIST_STATUS: (0, 0xFFFFFFFF, False),
    RCS_BASE + RING_EXECLIST_STATUS + 4: (0, 0xFFFFFFFF, False),
    RCS_BASE + RING_CSB_PTR: (CSB_PTR_RESET, 0x7, True),   # hardware owns the write pointer
    GT0_IIR: (0, 0, False),
    GT0_IMR: (0xFFFFFFFF, 0, False),
    GT0_IER: (0, 0, False),
    MASTER_IRQ: (0, 0, False),
    GDRST: (0, 0, False),
}
for _i in range(RING_CSB_ENTRIES * 2):      # the CSB is written by hardware only
    REG_ATTRS[RCS_BASE + RING_CSB + 4 * _i] = (0, 0xFFFFFFFF, False)

# Trap kinds, by what a guest access touched.
TRAP_KINDS = ("mmio_read", "mmio_write", "gtt_read", "gtt_write")


def trap_kind(offset: int, is_write: bool) -> str:
    if offset >= GTT_OFFSET:
        return "gtt_write" if is_write else "gtt_read"
    return "mmio_write" if is_write else "mmio_read"
