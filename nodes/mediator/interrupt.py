"""Interrupt virtualization (gvt/interrupt.c, gen8 layout): the virtual IIR, IMR, IER and master
registers, the events that set IIR bits, and their propagation to an MSI.

An event sets its IIR bit only where IMR does not mask it; a GT bank with a bit set in both IIR
and IER reports through its bit in the master register; an MSI goes to the guest (INJECT_MSI via
the hypervisor) when the master register has its enable bit (31) and any reporting bit set
(propagate_event, update_upstream_irq, gen8_check_pending_irq). A guest write to IIR (write 1 to
clear), IMR, IER or the master register is checked for a pending interrupt the same way.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nodes.actions import Post
from nodes.hw import regs

if TYPE_CHECKING:
    from nodes.mediator.vgpu import VGpu

Actions = list[Any]


def trigger_event(vgpu: VGpu, engine: str, event: int) -> Actions:
    """intel_vgpu_trigger_virtual_event: an engine's event sets its IIR bit unless IMR masks it
    (propagate_event); the pending check runs either way (check_pending_irq)."""
    bank, bit = regs.engine_event(engine, event)
    vgpu.irq_events += 1
    if not vgpu.vregs.get(regs.gt_imr(bank), 0xFFFFFFFF) & bit:
        iir = regs.gt_iir(bank)
        vgpu.vregs[iir] = vgpu.vregs.get(iir, 0) | bit
        _update_upstream(vgpu, bank)
    return check_pending(vgpu)


def _update_upstream(vgpu: VGpu, bank: int) -> None:
    """update_upstream_irq: each half of the bank whose IIR & IER has a bit sets its master bit
    (gen8_irq_map), the others clear theirs."""
    pending = vgpu.vregs.get(regs.gt_iir(bank), 0) & vgpu.vregs.get(regs.gt_ier(bank), 0)
    m = vgpu.vregs.get(regs.MASTER_IRQ, 0)
    for b, bits, master in regs.GT_MASTER_MAP:
        if b == bank:
            m = (m | master) if pending & bits else (m & ~master)
    vgpu.vregs[regs.MASTER_IRQ] = m


def check_pending(vgpu: VGpu) -> Actions:
    """gen8_check_pending_irq: with the master enable set, the banks with a pending interrupt
    report upstream, and an MSI goes out if any master bit is set."""
    m = vgpu.vregs.get(regs.MASTER_IRQ, 0)
    if not m & regs.MASTER_IRQ_CONTROL:
        return []
    for bank in range(regs.GT_IRQ_BANKS):
        if vgpu.vregs.get(regs.gt_iir(bank), 0) & vgpu.vregs.get(regs.gt_ier(bank), 0):
            _update_upstream(vgpu, bank)
    if not vgpu.vregs.get(regs.MASTER_IRQ, 0) & ~regs.MASTER_IRQ_CONTROL:
        return []
    vgpu.msi_injected += 1
    return [Post(vgpu.hypervisor, "INJECT_MSI", {}, vgpu=vgpu.id)]


def _bank_of(off: int) -> int | None:
    for bank in range(regs.GT_IRQ_BANKS):
        if regs.gt_isr(bank) <= off <= regs.gt_ier(bank):
            return bank
    return None


def iir_write(vgpu: VGpu, off: int, data: int) -> Actions:
    """IIR bits are write-1-to-clear (intel_vgpu_reg_iir_handler); the bank's master bit follows."""
    vgpu.vregs[off] = vgpu.vregs.get(off, 0) & ~data
    bank = _bank_of(off)
    if bank is not None:
        _update_upstream(vgpu, bank)
    return []


def imr_write(vgpu: VGpu, off: int, data: int) -> Actions:
    vgpu.vregs[off] = data
    return check_pending(vgpu)


def ier_write(vgpu: VGpu, off: int, data: int) -> Actions:
    vgpu.vregs[off] = data
    bank = _bank_of(off)
    if bank is not None:
        _update_upstream(vgpu, bank)
    return check_pending(vgpu)


def master_irq_write(vgpu: VGpu, off: int, data: int) -> Actions:
    """Only the master enable, bit 31, is the guest's to write (intel_vgpu_reg_master_irq_handler);
    the other bits report pending interrupts and keep their value. Enabling it with one pending
    sends the MSI."""
    keep = vgpu.vregs.get(off, 0) & ~regs.MASTER_IRQ_CONTROL
    vgpu.vregs[off] = keep | (data & regs.MASTER_IRQ_CONTROL)
    return check_pending(vgpu)
