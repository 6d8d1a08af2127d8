"""Workloads (gvt/scheduler.c): a context the guest submitted through the ELSP becomes a workload;
it is shadowed (its PPGTT, its ring and batches copied to the host pool, a shadow context that
points at them), dispatched to the physical engine, and completed when the GPU says so: the ring
head goes back into the guest's context, the virtual CSB and interrupts are emulated, and every
shadow resource is released.

A workload's life: created at the ELSP write (the guest context is read then: intel_vgpu_create_
workload) and queued on its vGPU's engine queue, where it stays until it completes; dispatched
when the policy picks it for an idle engine; completed (or failed) by the engine's interrupt.
Only the queue head of a vGPU's engine runs, and each physical engine runs one workload at a time.

A workload keeps the trace id of the ELSP write that made it (vgpu.trace, the message being
emulated), so its dispatch, which may come long after, and the gpu's execution of it are stages
of the same sampled operation.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from nodes.actions import Post, Spawn
from nodes.errors import GvtError
from nodes.hw import PAGE_SIZE, lrc, mi, regs
from nodes.mediator import execlist, interrupt
from nodes.mediator.dma import HostPool
from nodes.mediator.sched_policy import RoundRobin
from nodes.wire.schema import pack_write_batch

if TYPE_CHECKING:
    from nodes.mediator.ppgtt import PpgttMm
    from nodes.mediator.vgpu import VGpu

QUEUE_MAX = 64                      # workloads a vGPU may have queued on one engine
STATUSES = ("completed", "failed")


@dataclass(eq=False)
class Workload:
    id: int                         # the shadow context id the GPU reports
    vgpu: VGpu
    engine: str
    desc: lrc.Descriptor
    schedule_in: tuple[lrc.Descriptor, lrc.Descriptor] | None
    head: int
    tail: int
    start: int
    ctl: int
    created_ns: int
    mm: PpgttMm | None = None
    state: str = "queued"           # queued, running, done
    shadow_pages: list[list[int]] = field(default_factory=list)     # runs of host pool pages
    events: set[int] = field(default_factory=set)
    trace: int = 0                  # the sampled operation that submitted it (0: none)


class WorkloadScheduler:
    def __init__(self, pool: HostPool, gpu: str, engines: tuple[str, ...] = tuple(regs.ENGINES)):
        self.pool, self.gpu = pool, gpu
        self.policy = RoundRobin()
        self.inflight: dict[str, Workload | None] = {e: None for e in engines}
        self.vgpus: dict[int, VGpu] = {}
        self.next_id = 1
        self.done: list[tuple[int, str, str, int]] = []     # (vgpu, engine, status, latency ns)

    # ---- submission (the ELSP hook) ---------------------------------------------------------------
    def submit(self, vgpu: VGpu, engine: str, elems: tuple[lrc.Descriptor, lrc.Descriptor],
               now: int) -> Iterator[Any]:
        execlist.check_submission(vgpu, engine, elems)
        if len(vgpu.queues[engine]) + 2 > QUEUE_MAX:
            # GVT-g queues without a bound; a guest that submits faster than its work retires
            # would make the mediator hold any number of workloads
            raise GvtError("EBUSY", f"vGPU {vgpu.id} {engine}: {len(vgpu.queues[engine])} workloads "
                           f"queued already, the bound is {QUEUE_MAX}")
        for i, d in enumerate(elems):
            if d.valid:
                w = yield from self._create(vgpu, engine, d, elems if i == 0 else None, now)
                vgpu.queues[engine].append(w)
                vgpu.workloads["submitted"] += 1
        yield from self.kick(vgpu.id)

    def _create(self, vgpu: VGpu, engine: str, d: lrc.Descriptor,
                schedule_in: tuple | None, now: int) -> Iterator[Any]:
        raw = yield from vgpu.mem.read_gm(d.lrca + lrc.LRC_STATE_PN * PAGE_SIZE, 4 * lrc.CTX_STATE_DWORDS)
        st = struct.unpack(f"<{lrc.CTX_STATE_DWORDS}I", raw)
        head, tail = st[lrc.CTX_RING_HEAD] & lrc.RING_HEAD_OFF_MASK, st[lrc.CTX_RING_TAIL] & lrc.RING_TAIL_OFF_MASK
        for last in reversed(vgpu.queues[engine]):
            if last.desc.same_context(d):
                head = last.tail            # lite restore: it goes on from the last one's tail
                break
        start, ctl = st[lrc.CTX_RING_START], st[lrc.CTX_RING_CTL]
        size = lrc.ring_size(ctl)
        if not ctl & lrc.RING_CTL_VALID:
            raise GvtError("EINVAL", f"vGPU {vgpu.id} {engine}: the context's ring is not valid "
                           f"(RING_CTL {ctl:#x})")
        if not vgpu.ggtt.range_valid(start, size):
            raise GvtError("EINVAL", f"vGPU {vgpu.id} {engine}: ring at GM {start:#x} (+{size:#x}) is "
                           f"outside the vGPU's graphics memory")
        if head >= size or tail >= size:
            raise GvtError("EINVAL", f"vGPU {vgpu.id} {engine}: ring head {head:#x} / tail {tail:#x} "
                           f"past the ring's {size:#x} bytes")
        mode = d.addressing
        if mode not in (lrc.ADDRESSING_LEGACY_32B, lrc.ADDRESSING_LEGACY_64B):
            raise GvtError("EINVAL", f"vGPU {vgpu.id} {engine}: addressing mode {mode} is not a "
                           f"PPGTT mode GVT-g shadows")
        pdps = [lrc.pdp(list(st), n) for n in range(4)]
        w = Workload(self.next_id, vgpu, engine, d, schedule_in, head, tail, start, ctl, now,
                     trace=vgpu.trace)
        self.next_id = self.next_id % 0xFFFFFFFF + 1
        w.mm = yield from vgpu.ppgtt.get_mm(mode, pdps)
        return w

    # ---- dispatch ---------------------------------------------------------------------------------------
    def kick(self, lane: int | None = None) -> Iterator[Any]:
        """Give every idle engine the workload the policy picks, dispatched in its vGPU's lane (in
        order with that vGPU's trapped accesses): right here when the caller holds that lane
        already, else as a task queued in it."""
        for engine, cur in self.inflight.items():
            if cur is not None:
                continue
            w = self.policy.pick(engine, self.vgpus.values())
            if w is None:
                continue
            w.state = "running"
            self.inflight[engine] = w
            if w.vgpu.id == lane:
                yield from self._dispatch(w)
            else:
                yield Spawn(self._dispatch(w), lane=w.vgpu.id, trace=w.trace,
                            span=f"dispatch {engine}", vgpu=w.vgpu.id)

    def _dispatch(self, w: Workload) -> Iterator[Any]:
        vgpu = w.vgpu
        try:
            if w.state != "running":
                return                      # an engine reset took it meanwhile
            yield from vgpu.ppgtt.flush_post_shadow(vgpu.mem.read)
            if w.schedule_in is not None:
                yield from execlist.schedule_in(vgpu, vgpu.execlists[w.engine], w.schedule_in)
            lrca = yield from self._shadow(w)
        except GvtError as err:
            yield from self._complete(w, False, f"shadowing failed: {err}")
            return
        pd = lrc.descriptor(lrca, w.id, w.desc.addressing)
        elsp = regs.ring(w.engine, regs.RING_ELSP)
        yield Post(self.gpu, "MMIO_WRITE_BATCH",
                   pack_write_batch([elsp] * 4, [4] * 4, lrc.elsp_dwords(pd)), vgpu=vgpu.id,
                   trace=w.trace)

    def _shadow(self, w: Workload) -> Iterator[Any]:
        """intel_gvt_scan_and_shadow_workload + populate_shadow_context: ring copy, batch copies
        (MI_BATCH_BUFFER_START retargeted at them), the shadow context. Returns its GGTT address."""
        vgpu = w.vgpu
        size = lrc.ring_size(w.ctl)
        if w.tail >= w.head:
            ring = yield from vgpu.mem.read_gm(w.start + w.head, w.tail - w.head)
        else:
            ring = (yield from vgpu.mem.read_gm(w.start + w.head, size - w.head)) + \
                   (yield from vgpu.mem.read_gm(w.start, w.tail))
        cmds = list(struct.unpack(f"<{len(ring) // 4}I", ring))
        i = 0
        while i < len(cmds):
            dw = cmds[i]
            op = mi.opcode_of(dw)
            n = mi.length_of(dw)
            if op == mi.MI_USER_INTERRUPT:
                w.events.add(regs.GT_USER_INTERRUPT)
            elif op == mi.MI_BATCH_BUFFER_START and i + 2 < len(cmds):
                addr = cmds[i + 1] | cmds[i + 2] << 32
                batch = yield from self._read_batch(w, addr, bool(dw & mi.MI_BATCH_PPGTT))
                gm = self._place(w, batch, "batch")
                cmds[i] = dw & ~mi.MI_BATCH_PPGTT
                cmds[i + 1], cmds[i + 2] = gm & 0xFFFFFFFF, gm >> 32
            i += n
        body = struct.pack(f"<{len(cmds)}I", *cmds)
        ring_gm = self._place(w, body, "ring", min_pages=1)
        ring_pages = max(1, -(-len(body) // PAGE_SIZE))
        image = bytearray((yield from vgpu.mem.read_gm(w.desc.lrca, lrc.LRC_PAGES * PAGE_SIZE)))
        state = lrc.LRC_STATE_PN * PAGE_SIZE
        regs_ = {lrc.CTX_RING_HEAD: 0, lrc.CTX_RING_TAIL: len(body), lrc.CTX_RING_START: ring_gm,
                 lrc.CTX_RING_CTL: lrc.ring_ctl(ring_pages * PAGE_SIZE)}
        for n, root in enumerate(w.mm.shadow_pdps() if w.mm else []):
            regs_[lrc.CTX_PDP_UDW[n]] = root >> 32
            regs_[lrc.CTX_PDP_LDW[n]] = root & 0xFFFFFFFF
        for dwi, v in regs_.items():
            struct.pack_into("<I", image, state + 4 * dwi, v)
        return self._place(w, bytes(image), "context")

    def _read_batch(self, w: Workload, addr: int, ppgtt: bool) -> Iterator[Any]:
        """The batch at addr, up to and with its MI_BATCH_BUFFER_END, read page by page through
        the guest's PPGTT (or GGTT)."""
        vgpu = w.vgpu
        out = bytearray()
        at, scanned = addr, 0
        while len(out) < mi.BATCH_MAX:
            n = PAGE_SIZE - (at & (PAGE_SIZE - 1))
            if ppgtt:
                chunk = yield from vgpu.mem.read(vgpu.ppgtt.guest_walk(w.mm, at), n)
            else:
                chunk = yield from vgpu.mem.read_gm(at, n)
            out += chunk
            end, scanned = mi.batch_end(out, scanned)
            if end is not None:
                return bytes(out[:end])
            at += n
        raise GvtError("E2BIG", f"batch at {addr:#x} has no MI_BATCH_BUFFER_END in {mi.BATCH_MAX} bytes")

    def _place(self, w: Workload, data: bytes, what: str, min_pages: int = 1) -> int:
        """Copy data to fresh contiguous host pool pages owned by the workload; their GM address."""
        pages = max(min_pages, -(-len(data) // PAGE_SIZE))
        mfns = self.pool.alloc_run(pages, f"vgpu{w.vgpu.id} {w.engine} shadow {what}")
        w.shadow_pages.append(mfns)
        for k, m in enumerate(mfns):
            self.pool.write(m, 0, data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE])
        return self.pool.gm_of(mfns[0])

    # ---- completion --------------------------------------------------------------------------------------
    def on_engine_irq(self, engine: str, csb: list, faults: list, now: int) -> Iterator[Any]:
        """The engine's interrupt: its CSB entries and any context it had to give up on."""
        w = self.inflight.get(engine)
        if w is None:
            return
        for ctx_id, addr, reason in faults:
            if ctx_id == w.id:
                yield from self._complete(w, False, f"GPU hang at {addr:#x}: {reason}", now)
                return
        for lo, hi in csb:
            if hi == w.id and lo & lrc.CSB_CONTEXT_COMPLETE:
                yield from self._complete(w, True, "", now)
                return

    def lane_of(self, engine: str) -> int | None:
        w = self.inflight.get(engine)
        return w.vgpu.id if w is not None else None

    def _complete(self, w: Workload, ok: bool, reason: str, now: int = 0) -> Iterator[Any]:
        vgpu = w.vgpu
        if self.inflight.get(w.engine) is w:
            self.inflight[w.engine] = None
        if w.state == "done":
            return
        w.state = "done"
        q = vgpu.queues[w.engine]
        if w in q:
            q.remove(w)
        try:
            if ok:
                yield from vgpu.mem.write_gm(w.desc.lrca + lrc.LRC_STATE_PN * PAGE_SIZE + 4 * lrc.CTX_RING_HEAD,
                                             struct.pack("<I", w.tail))
                for ev in sorted(w.events):
                    for a in interrupt.trigger_event(vgpu, w.engine, ev):
                        yield a
                if not (q and q[0].desc.same_context(w.desc)):      # else a lite restore follows
                    yield from execlist.schedule_out(vgpu, vgpu.execlists[w.engine], w.desc)
                self._count(w, "completed", now)
            else:
                # a hang: no completion reaches the guest, and its queued work goes too
                # (complete_execlist_workload -> clean_workloads)
                self._fail(w, reason, now)
                for other in list(q):
                    q.remove(other)
                    other.state = "done"
                    self._fail(other, f"dropped after an earlier workload on {w.engine} failed", now)
                    yield from self._release(other)
        finally:
            yield from self._release(w)
            yield from self.kick(vgpu.id)

    def _fail(self, w: Workload, reason: str, now: int) -> None:
        w.vgpu.fail_reasons[reason] = w.vgpu.fail_reasons.get(reason, 0) + 1
        self._count(w, "failed", now)

    def _count(self, w: Workload, status: str, now: int) -> None:
        w.vgpu.workloads[status] += 1
        self.done.append((w.vgpu.id, w.engine, status, max(0, now - w.created_ns)))

    def _release(self, w: Workload) -> Iterator[Any]:
        for run in w.shadow_pages:
            self.pool.release_run(run)
        w.shadow_pages = []
        if w.mm is not None:
            mm, w.mm = w.mm, None
            yield from w.vgpu.ppgtt.put_mm(mm)

    def reset_engine(self, vgpu: VGpu, engine: str, reason: str, now: int = 0) -> Iterator[Any]:
        """An engine reset of the vGPU: its queued workloads fail with the reason; one the GPU is
        running is abandoned (its interrupt will find nothing)."""
        q = vgpu.queues[engine]
        for w in list(q):
            q.remove(w)
            if self.inflight.get(engine) is w:
                self.inflight[engine] = None
            w.state = "done"
            self._fail(w, reason, now)
            yield from self._release(w)
        yield from self.kick(vgpu.id)

