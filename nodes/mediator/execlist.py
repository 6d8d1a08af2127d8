"""Execlist emulation (gvt/execlist.c, handlers.c elsp_mmio_write): the ELSP write sequence, the
virtual execlist slots (running, pending), EXECLIST_STATUS, and the context status buffer with its
pointer and its copy in the guest's hardware status page.

- ELSP takes four dword writes; the n-th write goes to dword 3 - n, so element 1 (hi, lo) comes
  first and element 0 (hi, lo) last; the fourth submits. Element 0 must be valid, and every valid
  element must have the privilege bit (intel_vgpu_submit_execlist).
- Schedule-in, when the workload of element 0 reaches the GPU: with nothing running the bundle
  runs (CSB idle_to_active); a bundle whose element 0 is the running context (lite restore) takes
  over with CSB lite_restore | preempted; otherwise it waits in the pending slot.
- Schedule-out, when a workload completes (and the next queued one is not the same context): an
  element 0 followed by a valid element 1 gives context_complete | element_switch; the last element
  gives context_complete | active_to_idle, and if a bundle was pending it starts with an
  idle_to_active after it.
- Each CSB entry advances the write pointer (7 after reset, then 0..5 round), is copied to the
  status page (entries at dword 0x10, pointer at dword 0x1f) and raises the context-switch event.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from nodes.errors import GvtError
from nodes.hw import lrc, regs
from nodes.mediator import interrupt

if TYPE_CHECKING:
    from nodes.mediator.vgpu import VGpu

_PTRS = regs.CSB_PTR_WRITE_MASK | regs.CSB_PTR_WRITE_MASK << regs.CSB_PTR_READ_SHIFT
_NONE = lrc.Descriptor(0, 0)


@dataclass
class Slot:
    index: int
    ctx: list[lrc.Descriptor] = field(default_factory=lambda: [_NONE, _NONE])


class Execlist(lrc.ElspPort):
    """One engine's execlist state of a vGPU (struct intel_vgpu_execlist)."""

    def __init__(self, engine: str):
        super().__init__()
        self.engine = engine
        self.slots = [Slot(0), Slot(1)]
        self.running: Slot | None = None
        self.pending: Slot | None = None
        self.running_ctx: lrc.Descriptor | None = None
        self.csb_entries = 0
        self.context_switches = 0


def check_submission(vgpu: VGpu, engine: str, elems: tuple[lrc.Descriptor, lrc.Descriptor]) -> None:
    """intel_vgpu_submit_execlist's checks (EINVAL with the descriptors)."""
    e0, e1 = elems
    what = f"desc0 {e0.hi:08x} {e0.lo:08x} desc1 {e1.hi:08x} {e1.lo:08x}"
    if not e0.valid:
        raise GvtError("EINVAL", f"vGPU {vgpu.id} {engine}: invalid ELSP submission, element 0 is "
                       f"not valid ({what})")
    for e in elems:
        if e.valid and not e.privileged:
            raise GvtError("EINVAL", f"vGPU {vgpu.id} {engine}: ELSP element without the privilege "
                           f"bit ({what})")


def _status(vgpu: VGpu, el: Execlist) -> None:
    """EXECLIST_STATUS (emulate_execlist_status)."""
    off = regs.ring(el.engine, regs.RING_EXECLIST_STATUS)
    lo = 0
    if el.running is not None:
        if el.running.index:
            lo |= lrc.EL_STATUS_CURRENT_POINTER | lrc.EL_STATUS_1_VALID | lrc.EL_STATUS_1_ACTIVE
        else:
            lo |= lrc.EL_STATUS_WRITE_POINTER | lrc.EL_STATUS_0_VALID | lrc.EL_STATUS_0_ACTIVE
    if el.pending is not None:
        lo |= lrc.EL_STATUS_QUEUE_FULL
    vgpu.vregs[off] = lo
    vgpu.vregs[off + 4] = el.running_ctx.ctx_id if el.running_ctx is not None else 0


def _next_slot(el: Execlist) -> Slot:
    if el.pending is not None:
        raise GvtError("EBUSY", f"{el.engine}: virtual execlist slots are full")
    if el.running is None:
        return el.slots[0]
    return el.slots[1 - el.running.index]


def _switch_slot(el: Execlist) -> None:
    el.running, el.pending = el.pending, None
    el.running_ctx = el.running.ctx[0] if (el.running_ctx is not None and el.running) else None


def schedule_in(vgpu: VGpu, el: Execlist, elems: tuple[lrc.Descriptor, lrc.Descriptor]) -> Iterator[Any]:
    slot = _next_slot(el)
    slot.ctx = [elems[0], elems[1]]
    running = el.running
    if running is None:
        el.running, el.pending, el.running_ctx = slot, None, slot.ctx[0]
        _status(vgpu, el)
        yield from csb_update(vgpu, el, lrc.CSB_IDLE_TO_ACTIVE, 0)
        return
    ctx0, ctx1 = running.ctx
    if (ctx1.valid and ctx1.same_context(slot.ctx[0]) and not ctx0.same_context(el.running_ctx)) \
            or (not ctx1.valid and ctx0.same_context(slot.ctx[0])):
        el.pending = slot
        _switch_slot(el)
        _status(vgpu, el)
        yield from csb_update(vgpu, el, lrc.CSB_LITE_RESTORE | lrc.CSB_PREEMPTED, elems[0].ctx_id)
    else:
        el.pending = slot
        _status(vgpu, el)


def schedule_out(vgpu: VGpu, el: Execlist, desc: lrc.Descriptor) -> Iterator[Any]:
    running = el.running
    if running is None or not desc.same_context(el.running_ctx):
        raise GvtError("EINVAL", f"vGPU {vgpu.id} {el.engine}: schedule-out of context "
                       f"{desc.ctx_id:#x}, which is not the running one")
    ctx0, ctx1 = running.ctx
    el.context_switches += 1
    if ctx1.valid and ctx0.same_context(desc):
        el.running_ctx = ctx1
        _status(vgpu, el)
        yield from csb_update(vgpu, el, lrc.CSB_CONTEXT_COMPLETE | lrc.CSB_ELEMENT_SWITCH, desc.ctx_id)
        return
    if (not ctx1.valid and ctx0.same_context(desc)) or (ctx1.valid and ctx1.same_context(desc)):
        pending = el.pending
        _switch_slot(el)
        _status(vgpu, el)
        status = lrc.CSB_CONTEXT_COMPLETE | lrc.CSB_ACTIVE_TO_IDLE
        if pending is None:
            yield from csb_update(vgpu, el, status, desc.ctx_id)
        else:
            yield from csb_update(vgpu, el, status, desc.ctx_id, interrupt_later=True)
            yield from csb_update(vgpu, el, lrc.CSB_IDLE_TO_ACTIVE, 0)
        return
    raise GvtError("EINVAL", f"vGPU {vgpu.id} {el.engine}: schedule-out of {desc.ctx_id:#x} "
                   f"matches neither element")


def csb_update(vgpu: VGpu, el: Execlist, status: int, ctx_id: int,
               interrupt_later: bool = False) -> Iterator[Any]:
    """emulate_csb_update: the next CSB entry, the pointer, the status page copy, the event."""
    ptr_off = regs.ring(el.engine, regs.RING_CSB_PTR)
    ptr = vgpu.vregs.get(ptr_off, regs.CSB_PTR_RESET)
    wp = ptr & regs.CSB_PTR_WRITE_MASK
    wp = 0 if wp == regs.CSB_PTR_RESET else (wp + 1) % regs.RING_CSB_ENTRIES
    entry = regs.ring(el.engine, regs.RING_CSB) + 8 * wp
    vgpu.vregs[entry] = status
    vgpu.vregs[entry + 4] = ctx_id
    vgpu.vregs[ptr_off] = (ptr & ~regs.CSB_PTR_WRITE_MASK) | wp
    el.csb_entries += 1
    hwsp = vgpu.hws_pga.get(el.engine)
    if hwsp is not None:
        try:
            yield from vgpu.mem.write_gm(hwsp + 4 * lrc.HWS_CSB_BUF0_INDEX + 8 * wp,
                                         struct.pack("<II", status, ctx_id))
            yield from vgpu.mem.write_gm(hwsp + 4 * lrc.HWS_CSB_WRITE_INDEX, struct.pack("<I", wp))
        except GvtError:
            pass                    # the kernel skips the copy where the page does not translate
    if not interrupt_later:
        for a in interrupt.trigger_event(vgpu, el.engine, regs.GT_CONTEXT_SWITCH):
            yield a


def reset_engine(vgpu: VGpu, engine: str) -> None:
    """init_vgpu_execlist: slots empty, CSB read pointer 0 and write pointer 7."""
    vgpu.execlists[engine] = Execlist(engine)
    off = regs.ring(engine, regs.RING_CSB_PTR)
    vgpu.vregs[off] = (vgpu.vregs.get(off, 0) & ~_PTRS) | regs.CSB_PTR_RESET
