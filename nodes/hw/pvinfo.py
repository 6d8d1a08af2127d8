"""The PV info page a GVT-g vGPU exposes at MMIO 0x78000 (i915_pvinfo.h struct vgt_if)."""
from __future__ import annotations

BASE = 0x78000
SIZE = 0x1000
MAGIC = 0x4776544776544776          # "vGTvGTvG", little endian
VERSION_MAJOR = 1
VERSION_MINOR = 0

# Offsets inside the page
MAGIC_OFF = 0x00                    # u64
VERSION_MAJOR_OFF = 0x08            # u16
VERSION_MINOR_OFF = 0x0A            # u16
VGT_ID = 0x0C
VGT_CAPS = 0x10
AVAIL_MAPPABLE_BASE = 0x40
AVAIL_MAPPABLE_SIZE = 0x44
AVAIL_NONMAPPABLE_BASE = 0x48
AVAIL_NONMAPPABLE_SIZE = 0x4C
AVAIL_FENCE_NUM = 0x50
DISPLAY_READY = 0x804
RSV5 = 0x808                        # rsv5[4]: a guest write here means it wants resources
RSV5_SIZE = 0x10
G2V_NOTIFY = 0x818
CURSOR_X_HOT = 0x830
CURSOR_Y_HOT = 0x834
PDP0_LO = 0x838                     # pdp[4] lo/hi pairs, up to 0x857
PDPS = 4
EXECLIST_DESC_LO = 0x858
EXECLIST_DESC_HI = 0x85C

CAPS_FULL_PPGTT = 1 << 2
CAPS_HWSP_EMULATION = 1 << 3
CAPS_HUGE_GTT = 1 << 4
CAPS = CAPS_FULL_PPGTT | CAPS_HWSP_EMULATION | CAPS_HUGE_GTT

# g2v_notify values
G2V_PPGTT_L3_CREATE = 2
G2V_PPGTT_L3_DESTROY = 3
G2V_PPGTT_L4_CREATE = 4
G2V_PPGTT_L4_DESTROY = 5

# Fields whose guest writes land (pvinfo_mmio_write); a write of any size at these exact offsets
# is stored. Writes anywhere else are ignored, and writes to rsv5 send the vGPU to failsafe.
GUEST_WRITABLE = frozenset({DISPLAY_READY, G2V_NOTIFY, CURSOR_X_HOT, CURSOR_Y_HOT,
                            *range(PDP0_LO, PDP0_LO + 8 * PDPS, 4),
                            EXECLIST_DESC_LO, EXECLIST_DESC_HI})

