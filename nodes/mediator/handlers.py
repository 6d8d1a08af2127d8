"""MMIO emulation of one vGPU: virtual registers and the PV info page (gvt/handlers.c).

Every access hits the vGPU's vregs. Registers with attributes in nodes.hw.REG_ATTRS get them
(read-only bits keep their old value, masked registers take bits 31:16 as a write enable);
everything else is a plain read/write vreg, as GVT-g's default MMIO handler does.
"""
from __future__ import annotations

from nodes import hw
from nodes.errors import GvtError
from nodes.mediator.vgpu import Partition
from nodes.regfile import read_dwords, write_dwords

FAILSAFE_UNSUPPORTED_GUEST = "unsupported_guest"
FAILSAFE_GUEST_ERR = "guest_error"
FAILSAFE_INSUFFICIENT_RESOURCE = "insufficient_resource"

# PV info fields the guest may write; the rest of the page is read-only to it.
_PV_WRITABLE = {hw.PV_DISPLAY_READY, hw.PV_G2V_NOTIFY, hw.PV_EXECLIST_DESC_LO, hw.PV_EXECLIST_DESC_HI,
                *range(hw.PV_PDP0_LO, hw.PV_PDP0_LO + 32, 4)}
VGT_CAPS = hw.VGT_CAPS_FULL_PPGTT | hw.VGT_CAPS_HWSP_EMULATION | hw.VGT_CAPS_HUGE_GTT


class VRegs:
    def __init__(self, vgpu_id: int, part: Partition):
        self.vgpu_id = vgpu_id
        self.part = part
        self.regs: dict[int, int] = {}
        self.pv_notified = False        # set once the guest has read the PV info page
        self.failsafe: str | None = None
        self.engine_resets = 0
        self.g2v_notifications: list[int] = []
        self.reset()

    def reset(self) -> None:
        """Device-model reset: vregs to their reset values, PV state and failsafe cleared."""
        self.regs = {off: attrs[0] for off, attrs in hw.REG_ATTRS.items()}
        p = self.part
        pv = {hw.PV_MAGIC_OFF: hw.PV_MAGIC & 0xFFFFFFFF, hw.PV_MAGIC_OFF + 4: hw.PV_MAGIC >> 32,
              hw.PV_VERSION_MAJOR_OFF: hw.PV_VERSION_MAJOR | (hw.PV_VERSION_MINOR << 16),
              hw.PV_VGT_ID_OFF: self.vgpu_id, hw.PV_CAPS_OFF: VGT_CAPS,
              hw.PV_AVAIL_MAPPABLE_BASE: p.aperture_base, hw.PV_AVAIL_MAPPABLE_SIZE: p.aperture_size,
              hw.PV_AVAIL_NONMAPPABLE_BASE: p.hidden_base,
              hw.PV_AVAIL_NONMAPPABLE_SIZE: p.hidden_size, hw.PV_AVAIL_FENCE_NUM: p.fence_num}
        for off, val in pv.items():
            self.regs[hw.PVINFO_BASE + off] = val
        self.pv_notified = False
        self.failsafe = None

    def read(self, off: int, size: int) -> int:
        _check(off, size)
        if hw.PVINFO_BASE <= off < hw.PVINFO_BASE + hw.PVINFO_SIZE:
            self.pv_notified = True
        return read_dwords(self.regs, off, size)

    def write(self, off: int, size: int, val: int) -> None:
        _check(off, size)
        if size == 8:
            self.write(off, 4, val & 0xFFFFFFFF)
            self.write(off + 4, 4, val >> 32)
            return
        if hw.PVINFO_BASE <= off < hw.PVINFO_BASE + hw.PVINFO_SIZE:
            self._pv_write(off - hw.PVINFO_BASE, size, val)
            return
        base = off & ~3
        attrs = hw.REG_ATTRS.get(base)
        if attrs is None:
            write_dwords(self.regs, off, size, val)
            return
        if size != 4:
            raise GvtError("EINVAL", f"register {base:#x} takes only 4-byte writes")
        _reset, ro_mask, masked = attrs
        old = self.regs.get(base, 0)
        new = hw.masked_write(old, val) if masked else val & 0xFFFFFFFF
        if base == hw.RCS_BASE + hw.RING_GFX_MODE:
            self._gfx_mode_write(val)
        elif base == hw.GDRST:
            # the engines of this vGPU are reset at once; hardware clears the request bits
            self.engine_resets += 1
            new = 0
        self.regs[base] = (new & ~ro_mask) | (old & ro_mask)

    def _gfx_mode_write(self, val: int) -> None:
        enables = val & (val >> 16)     # masked: a bit is set only where its mask bit is set
        wants = enables & (hw.GFX_MODE_PPGTT_ENABLE | hw.GFX_MODE_RUN_LIST_ENABLE)
        if wants and not self.pv_notified and self.failsafe is None:
            # a guest that never looked at the PV page is not a GVT-g aware i915
            self.failsafe = FAILSAFE_UNSUPPORTED_GUEST

    def _pv_write(self, rel: int, size: int, val: int) -> None:
        if size != 4 or (rel & ~3) not in _PV_WRITABLE:
            return      # read-only PV fields ignore guest writes
        self.regs[hw.PVINFO_BASE + rel] = val & 0xFFFFFFFF
        if rel == hw.PV_G2V_NOTIFY:
            self.g2v_notifications.append(val)

    def execlists_enabled(self) -> bool:
        return bool(self.regs.get(hw.RCS_BASE + hw.RING_GFX_MODE, 0) & hw.GFX_MODE_RUN_LIST_ENABLE)


def _check(off: int, size: int) -> None:
    if size not in (1, 2, 4, 8) or off % size:
        raise GvtError("EINVAL", f"MMIO access of {size} bytes at {off:#x} is not naturally aligned")
    if not 0 <= off < hw.MMIO_SIZE:
        raise GvtError("EFAULT", f"MMIO offset {off:#x} is outside the 2 MiB register range")
