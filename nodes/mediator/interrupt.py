"""Interrupt register virtualization (gvt/interrupt.c): what a guest's writes do to the virtual
IIR, IMR, IER and master registers. Events that set IIR bits, and the propagation of unmasked,
enabled events to an MSI, come with workloads."""
from __future__ import annotations

from typing import TYPE_CHECKING

from nodes.hw import regs

if TYPE_CHECKING:
    from nodes.mediator.vgpu import VGpu


def iir_write(vgpu: VGpu, off: int, data: int) -> None:
    """IIR bits are write-1-to-clear (intel_vgpu_reg_iir_handler)."""
    vgpu.vregs[off] = vgpu.vregs.get(off, 0) & ~data


def master_irq_write(vgpu: VGpu, off: int, data: int) -> None:
    """Only the master enable, bit 31, is the guest's to write (intel_vgpu_reg_master_irq_handler);
    the other bits report pending interrupts and keep their value."""
    keep = vgpu.vregs.get(off, 0) & ~regs.MASTER_IRQ_CONTROL
    vgpu.vregs[off] = keep | (data & regs.MASTER_IRQ_CONTROL)
