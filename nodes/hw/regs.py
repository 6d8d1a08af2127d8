"""Registers GVT-g emulates, their offsets and bits (i915_reg.h, gt/intel_engine_regs.h,
gt/intel_gt_regs.h, gvt/handlers.c, gvt/interrupt.c, gvt/execlist.c)."""
from __future__ import annotations

# --- Engines: MMIO base of each ring (i915_reg.h) ---------------------------------------------
ENGINES: dict[str, int] = {
    "rcs": 0x02000,     # render
    "vcs": 0x12000,     # video (GEN6_BSD_RING_BASE)
    "vecs": 0x1A000,    # video enhancement (VEBOX_RING_BASE)
    "bcs": 0x22000,     # blitter
}

# Per-ring register offsets, relative to the ring's base.
RING_TAIL = 0x30
RING_HEAD = 0x34
RING_START = 0x38
RING_CTL = 0x3C
RING_HWS_PGA = 0x80
RING_NOPID = 0x94                   # a register with no effect: unused FORCE_TO_NONPRIV slots name it
RING_MI_MODE = 0x9C                 # masked
RING_IMR = 0xA8
RING_INSTPM = 0xC0                  # masked
RING_ELSP = 0x230
RING_EXECLIST_STATUS = 0x234        # 8 bytes, read-only
RING_EXECLIST_STATUS_SIZE = 8
RING_MODE = 0x29C                   # GFX_MODE on gen8+, masked
RING_CSB = 0x370                    # context status buffer: 6 entries x 8 bytes, read-only
RING_CSB_ENTRIES = 6
RING_CSB_SIZE = RING_CSB_ENTRIES * 8
RING_CSB_PTR = 0x3A0                # masked: write pointer 2:0, read pointer 10:8
RING_GPR0 = 0x600                   # CS_GPR: 16 x 64-bit general purpose registers
RING_GPRS = 16
RING_PDP0 = 0x270                   # PDP n: low dword at 0x270 + 8n, high dword 4 above it
RING_PDPS = 4
RING_FORCE_TO_NONPRIV = 0x4D0       # 12 slots: registers a non-privileged batch may access
RING_FORCE_TO_NONPRIV_SLOTS = 12
FORCE_TO_NONPRIV_ADDR_MASK = 0x3FFFFFC  # bits 25:2 of a slot: the register's offset
RING_TIMESTAMP = 0x358
RING_CSFE_CHICKEN1 = 0xD4           # masked
CSFE_CHICKEN1_FORBIDDEN = (1 << 3, 1 << 4)  # bits a guest may not enable (csfe_chicken1_mmio_write)
PS_DEPTH_COUNT = 0x2350             # the render engine's depth count (a PIPE_CONTROL post-sync)


def pdp_ldw(n: int) -> int:
    return RING_PDP0 + 8 * n


def pdp_udw(n: int) -> int:
    return RING_PDP0 + 8 * n + 4

# RING_MODE bits (all masked)
GFX_MODE_BIT0 = 1 << 0              # a guest may not enable it (handlers.c ring_mode_mmio_write)
GFX_MODE_PPGTT_ENABLE = 1 << 9
GFX_MODE_RUN_LIST_ENABLE = 1 << 15  # execlists

# CSB pointer (execlist.c): after an execlist reset the write pointer is 7 ("nothing written")
# and the read pointer 0; each new entry moves the write pointer on by one, modulo 6.
CSB_PTR_WRITE_MASK = 0x7
CSB_PTR_READ_SHIFT = 8
CSB_PTR_RESET = 0x7


def csb_ptr_guest_reset(entries: int = RING_CSB_ENTRIES) -> int:
    """What i915's reset_csb_pointers writes: both pointers to the last entry, mask bits set."""
    last = entries - 1
    return 0xFFFF << 16 | last << CSB_PTR_READ_SHIFT | last


def ring(engine: str, rel: int) -> int:
    return ENGINES[engine] + rel


# --- Interrupts (gen8 layout, interrupt.c) ----------------------------------------------------
MASTER_IRQ = 0x44200                # GEN8_MASTER_IRQ
MASTER_IRQ_CONTROL = 1 << 31        # the only bit a guest may write
GT_IRQ_BANKS = 4


def gt_isr(bank: int) -> int:
    return 0x44300 + 0x10 * bank


def gt_imr(bank: int) -> int:
    return 0x44304 + 0x10 * bank


def gt_iir(bank: int) -> int:
    return 0x44308 + 0x10 * bank


def gt_ier(bank: int) -> int:
    return 0x4430C + 0x10 * bank


# GT interrupt events (gen8 GT IIR layout, interrupt.c init_events): each engine owns 16 bits of
# a GT bank; the user interrupt is bit 0 and the context switch bit 8 of its half.
GT_USER_INTERRUPT = 1 << 0
GT_PIPE_NOTIFY = 1 << 4             # PIPE_CONTROL notify on the render engine, MI_FLUSH_DW on others
GT_CONTEXT_SWITCH = 1 << 8
# engine -> (GT bank, shift of its half in the bank)
ENGINE_IRQ: dict[str, tuple[int, int]] = {"rcs": (0, 0), "bcs": (0, 16), "vcs": (1, 0), "vecs": (3, 0)}
# (GT bank, IIR bits) -> the master IRQ bit they report through (interrupt.c gen8_irq_map: each
# half of GT0 and GT1 has its own bit, GT2 and GT3 their low half)
GT_MASTER_MAP: tuple[tuple[int, int, int], ...] = (
    (0, 0x0000FFFF, 1 << 0), (0, 0xFFFF0000, 1 << 1),
    (1, 0x0000FFFF, 1 << 2), (1, 0xFFFF0000, 1 << 3),
    (2, 0x0000FFFF, 1 << 4), (3, 0x0000FFFF, 1 << 6),
)


def engine_event(engine: str, event: int) -> tuple[int, int]:
    """(GT bank, IIR bit) of an engine's event (GT_USER_INTERRUPT or GT_CONTEXT_SWITCH)."""
    bank, shift = ENGINE_IRQ[engine]
    return bank, event << shift


# IIR/IMR/IER triples of the display engine and the PCU (each at ISR + 4 / + 8 / + 0xc)
DE_PIPE_ISR = (0x44400, 0x44410, 0x44420)
DE_PORT_ISR = 0x44440
DE_MISC_ISR = 0x44460
PCU_ISR = 0x444E0
IRQ_ISRS = tuple(gt_isr(b) for b in range(GT_IRQ_BANKS)) + DE_PIPE_ISR + (
    DE_PORT_ISR, DE_MISC_ISR, PCU_ISR)
IMR_OFF, IIR_OFF, IER_OFF = 4, 8, 0xC

# --- Reset (handlers.c gdrst_mmio_write) ------------------------------------------------------
GDRST = 0x941C
GRDOM_FULL = 1 << 0
GRDOM_RENDER = 1 << 1
GRDOM_MEDIA = 1 << 2
GRDOM_BLT = 1 << 3
GRDOM_VECS = 1 << 4
GRDOM_GUC = 1 << 5
GRDOM_ENGINES: dict[int, str] = {GRDOM_RENDER: "rcs", GRDOM_MEDIA: "vcs", GRDOM_BLT: "bcs",
                                 GRDOM_VECS: "vecs"}
# A GT reset restores the engine registers below this offset; interrupt and display registers
# above it keep their values (mmio.c intel_vgpu_reset_mmio, GVT_GEN8_MMIO_RESET_OFFSET).
MMIO_RESET_LIMIT = 0x44200

# --- Fences (handlers.c fence_mmio_*, aperture_gm.c) ------------------------------------------
FENCE_BASE = 0x100000               # FENCE_REG_GEN6_LO(0); fence i: lo at +8i, hi at +8i + 4
FENCE_STRIDE = 8
FENCE_SLOTS = 16                    # the range GVT-g traps as fences (0x80 bytes)


def fence_lo(i: int) -> int:
    return FENCE_BASE + FENCE_STRIDE * i


# --- Force-wake (handlers.c mul_force_wake_write): request register -> its ack register -------
FORCEWAKE_ACK: dict[int, int] = {
    0xA278: 0x0D84,                 # FORCEWAKE_RENDER_GEN9 -> FORCEWAKE_ACK_RENDER_GEN9
    0xA270: 0x0D88,                 # FORCEWAKE_MEDIA_GEN9 -> FORCEWAKE_ACK_MEDIA_GEN9
    0xA188: 0x130044,               # FORCEWAKE_GT_GEN9 (FORCEWAKE_MT) -> FORCEWAKE_ACK_GT_GEN9
}
FORCEWAKE_KERNEL = 1 << 0

GUC_STATUS = 0xC000
# GAMW_ECO_DEV_RW_IA (gen9): the 64 KiB page (IPS) enable of the PPGTT, all four bits or none
GAMW_ECO_DEV_RW_IA = 0x4080
GAMW_ECO_ENABLE_64K_IPS_FIELD = 0xF
L3SQCREG4 = 0xB118                  # GEN8_L3SQCREG4
GS_MIA_IN_RESET = 1 << 0

# --- Other -------------------------------------------------------------------------------------
GFX_FLSH_CNTL = 0x101008            # a write flushes the GGTT TLBs
# A register with no side effects that a guest may use freely: a GPR of the render ring.
RCS_GPR0 = ENGINES["rcs"] + RING_GPR0


# --- Masked registers --------------------------------------------------------------------------
def masked_enable(bits: int) -> int:
    return (bits << 16) | bits


def masked_disable(bits: int) -> int:
    return bits << 16


def masked_bits_enabled(data: int, bits: int) -> bool:
    """The kernel's IS_MASKED_BITS_ENABLED: the bits and their mask bits are all set."""
    return (data & masked_enable(bits)) == masked_enable(bits)


def masked_update(old: int, written: int) -> int:
    """A masked register after a write (handlers.c intel_vgpu_mmio_reg_rw): bits 31:16 of the
    written value select which of bits 15:0 change; bits 31:16 of the register keep their value."""
    mask = (written >> 16) & 0xFFFF
    return (old & ~mask & 0xFFFFFFFF) | (written & mask)
