"""Execlist emulation (gvt/execlist.c). So far the state an engine reset restores: the CSB
pointer, read pointer 0 and write pointer 7 ("nothing written yet", init_vgpu_execlist). The ELSP
write sequence, running and pending slots and CSB updates come with workload submission."""
from __future__ import annotations

from typing import TYPE_CHECKING

from nodes.hw import regs

if TYPE_CHECKING:
    from nodes.mediator.vgpu import VGpu

_PTRS = regs.CSB_PTR_WRITE_MASK | regs.CSB_PTR_WRITE_MASK << regs.CSB_PTR_READ_SHIFT


def reset_engine(vgpu: VGpu, engine: str) -> None:
    off = regs.ring(engine, regs.RING_CSB_PTR)
    vgpu.vregs[off] = (vgpu.vregs.get(off, 0) & ~_PTRS) | regs.CSB_PTR_RESET
