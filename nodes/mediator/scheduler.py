"""Workloads (gvt/scheduler.c, execlist.c): a context the guest submitted through the ELSP becomes a
workload; it is scanned and shadowed (its PPGTT, its ring and privileged batches copied to the
host pool, a shadow context that points at them), dispatched to the physical engine, and
completed when the GPU says so: the ring head goes back into the guest's context, the virtual
CSB and interrupts are emulated, and every shadow resource is released.

A workload's life (WORKLOAD_TRANSITIONS below):
- created at the ELSP write (intel_vgpu_create_workload): the guest context is read, its ring
  and PPGTT checked and the PPGTT shadowed; if it is the first of its engine's queue it is also
  scanned now (intel_gvt_scan_and_shadow_workload), else when it is dispatched. An error refuses
  the ELSP write; EBADRQC and EFAULT from the scan send the vGPU to failsafe (GUEST_ERR).
- queued on its vGPU's engine queue until the policy picks it for an idle physical engine;
- dispatching: in its vGPU's lane, scanned if not yet, its PPGTT pinned (and shadowed again if
  it was reclaimed), half-written entries shadowed whole, the shadow ring and context placed,
  and only then schedule-in emulated (prepare_workload: emulation comes last). An error fails it
  without a CSB (and the vGPU's other work on that engine: clean_workloads), failsafe as above;
- running: the shadow ELSP went to the gpu. Nothing it uses is released before the gpu reports
  it (ENGINE_IRQ), whatever happens to the vGPU meanwhile;
- reported: the gpu is done with it (completed, or hung); the guest-visible completion runs
  in the vGPU's lane (context head, events, schedule-out), then its shadow resources go.

Each physical engine runs one workload at a time. A vGPU is scheduled only once the guest has
enabled execlists (intel_vgpu_start_schedule); a reset stops scheduling it, waits until the gpu
has reported every workload of it that runs (intel_gvt_wait_vgpu_idle), fails its other work on
the engines reset with the reset as the reason, and only then releases their shadows.

Counting: every workload that ends is counted where it ends (workloads_total and the latency
histogram, stage mediator), completed or failed, at the time it ended.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from nodes.actions import Event, Now, Post, Signal, Spawn, Wait
from nodes.core import Ctx
from nodes.errors import GvtError
from nodes.hw import PAGE_SIZE, cmd, lrc, regs
from nodes.mediator import cmd_parser, execlist, interrupt
from nodes.mediator.dma import HostPool, QuotaExceeded
from nodes.mediator.mmio_context import MmioContext
from nodes.mediator.sched_policy import IDLE, has_pending_workload, make_policy, schedulable
from nodes.metrics import (CMD_SCAN_SECONDS, GPU_BUSY_SECONDS, HOST_RESETS,
                           SCHED_LATENCY, WORKLOAD_LATENCY, WORKLOADS)
from nodes.wire.schema import pack_write_batch

if TYPE_CHECKING:
    from nodes.mediator.ppgtt import PpgttMm
    from nodes.mediator.vgpu import VGpu

# The host's hang detection (i915's heartbeat): a request not retired within two heartbeat
# intervals (CONFIG_DRM_I915_HEARTBEAT_INTERVAL, 2500 ms), the second at top priority, then the
# preemption timeout (CONFIG_DRM_I915_PREEMPT_TIMEOUT, 640 ms), has its engine reset; the GVT
# workload ends with -EIO (no completion reaches the guest).
HOST_HANG_TIMEOUT_NS = 2 * 2_500_000_000 + 640_000_000
QUEUE_MAX = 64                      # workloads a vGPU may have queued on one engine
FAIL_REASONS_MAX = 32              # distinct failure reasons a vGPU keeps (past it: "(other reasons)")
STATUSES = ("completed", "failed")

# (state, event) -> state. A workload in another state meeting an event is the mediator's bug.
WORKLOAD_TRANSITIONS: dict[tuple[str, str], str] = {
    ("queued", "pick"): "dispatching",
    ("queued", "fail"): "done",              # dropped: a reset, failsafe, an earlier hang
    ("dispatching", "send"): "running",
    ("dispatching", "fail"): "done",         # its shadowing failed, or a reset came first
    ("running", "report"): "reported",
    ("reported", "complete"): "done",
    ("reported", "fail"): "done",            # a hang, a reset, failsafe
}
WORKLOAD_STATES = ("queued", "dispatching", "running", "reported", "done")


def _to(w: "Workload", event: str) -> None:
    nxt = WORKLOAD_TRANSITIONS.get((w.state, event))
    if nxt is None:
        raise RuntimeError(f"workload {w.id} of vGPU {w.vgpu.id}: event {event!r} in state "
                           f"{w.state!r}")
    w.state = nxt


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
    state: str = "queued"
    ring: cmd_parser.Buffer | None = None   # the scanned ring segment (None: not scanned yet)
    events: set[int] = field(default_factory=set)
    lri_mms: list = field(default_factory=list)     # PPGTTs its PDP LRIs load (refs held)
    pinned: list = field(default_factory=list)      # PPGTTs pinned while it runs
    shadow_pages: list[list[int]] = field(default_factory=list)     # runs of host pool pages
    gpu_fault: tuple[int, str] | None = None        # (address, reason) of its hang, if it hung
    trace: int = 0                  # the sampled operation that submitted it (0: none)
    queued_ns: int = 0              # when it was queued, and sent to the gpu (the mediator's clock)
    sent_ns: int = 0


class WorkloadScheduler:
    """intel_gvt_workload_scheduler: the engines' current workloads, the vGPU that owns the GPU
    (current_vgpu) and the one chosen next, whether a switch waits for the owner's work in
    flight (need_reschedule), each engine's MMIO owner, and the policy (sched_policy)."""

    def __init__(self, pool: HostPool, gpu: str, engines: tuple[str, ...] = tuple(regs.ENGINES),
                 policy: str = "timeslice", hang_timeout_ns: int | None = HOST_HANG_TIMEOUT_NS,
                 start_boost_ns: int | None = None):
        self.pool, self.gpu = pool, gpu
        self.hang_timeout_ns = hang_timeout_ns
        self.host_resets = 0                # engines the host's hang detection reset
        self.inflight: dict[str, Workload | None] = {e: None for e in engines}
        self.vgpus: dict[int, VGpu] = {}
        self.current_vgpu: Any = None       # a VGpu, IDLE, or None (nobody yet / stopped)
        self.next_vgpu: Any = None
        self.need_reschedule = False
        self.engine_owner: dict[str, VGpu | None] = {e: None for e in engines}
        self.mmio = MmioContext(gpu)
        self.switches = 0                   # vGPU switches (the owner changed)
        self.queued = 0                     # workloads in state queued, all vGPUs (next_tick asks
                                            # on every tick of the mediator: nothing to walk then)
        self.policy = make_policy(policy, start_boost_ns)
        self.policy.init(self, 0)
        self.next_id = 1
        self.now = 0                # the time of the message or tick being handled
        self.gpu_down: str | None = None    # why the gpu is unreachable: nothing is dispatched
        self.gpu_resets = 0                 # gpu restarts recovered from
        # each restore of the gpu: when it was done and when a workload first completed after
        # it (ns, the shell's clock): how long a gpu restart keeps the vGPUs' work from ending
        self.restores: list[dict] = []

    def add_vgpu(self, vgpu: VGpu) -> None:
        self.vgpus[vgpu.id] = vgpu
        self.policy.init_vgpu(vgpu)

    def switch_to(self, vgpu: Any) -> None:
        """The policy's switch: `vgpu` (or IDLE) owns the GPU from now on."""
        self.current_vgpu = vgpu
        self.switches += 1

    def next_tick(self) -> int | None:
        """When the policy's timer fires next (None: it has nothing to decide). The timer runs
        while a vGPU has work queued; with none, no choice can change before the next
        submission or interrupt, which schedule at once, and what the owner is charged meanwhile
        is charged then (vgpu_update_timeslice counts from when it was last charged; balance
        periods that went by are made up)."""
        t = self.policy.next_tick()
        if t is None or not self.queued or not any(schedulable(v) and has_pending_workload(v)
                                for v in self.vgpus.values()):
            return None
        return t

    def hang_due(self) -> int | None:
        """When the oldest workload on the gpu is due for the host's hang check."""
        if not self.hang_timeout_ns:
            return None                     # no host hang detection
        sent = [w.sent_ns for w in self.inflight.values() if w is not None and w.state == "running"]
        return min(sent) + self.hang_timeout_ns if sent else None

    def hang_check(self, now: int) -> Iterator[Any]:
        """The host's hang detection: an engine whose workload has run past the timeout is reset
        (GDRST of that engine), and the workload ends as a hang, its vGPU's other work on that
        engine with it (complete_current_workload, -EIO)."""
        self.now = now
        bit = {e: b for b, e in regs.GRDOM_ENGINES.items()}
        for engine, w in list(self.inflight.items()):
            if w is None or w.state != "running" or now - w.sent_ns < self.hang_timeout_ns:
                continue
            self.host_resets += 1
            w.vgpu.stats.inc(HOST_RESETS, (w.vgpu.id, engine))
            yield Post(self.gpu, "MMIO_WRITE", {"off": regs.GDRST, "size": 4, "val": bit[engine]},
                       vgpu=w.vgpu.id)
            self.engine_owner[engine] = None    # its registers are the reset's now
            yield from self.on_engine_irq(engine, [], [[w.id, -1, (
                f"GPU hang: the host reset {engine} after {(now - w.sent_ns) / 1e9:.2f} s "
                f"without the workload's completion")]])

    def on_timer(self, now: int) -> Iterator[Any]:
        """The policy's timer (INTEL_GVT_REQUEST_SCHED), then dispatch to what is idle."""
        self.now = now
        self.policy.schedule(now, timer=True)
        yield from self._dispatch_idle(None)

    # ---- submission (the ELSP hook: intel_vgpu_submit_execlist) ----------------------------------
    def submit(self, vgpu: VGpu, engine: str, elems: tuple[lrc.Descriptor, lrc.Descriptor],
               ctx: Ctx) -> Iterator[Any]:
        if not vgpu.vregs.get(regs.ring(engine, regs.RING_MODE), 0) & regs.GFX_MODE_RUN_LIST_ENABLE:
            raise GvtError("EINVAL", f"vGPU {vgpu.id} {engine}: an ELSP submission before the guest "
                           f"enabled execlists on the engine (GFX_MODE run list)")
        execlist.check_submission(vgpu, engine, elems)
        if len(vgpu.queues[engine]) + 2 > QUEUE_MAX:
            # GVT-g queues without a bound; a guest that submits faster than its work retires
            # would make the mediator hold any number of workloads
            raise GvtError("EBUSY", f"vGPU {vgpu.id} {engine}: {len(vgpu.queues[engine])} workloads "
                           f"queued already, the bound is {QUEUE_MAX}")
        for i, d in enumerate(elems):
            if d.valid:
                w = yield from self._create(vgpu, engine, d, elems if i == 0 else None, ctx)
                w.queued_ns = self.now
                vgpu.queues[engine].append(w)
                self.queued += 1
                vgpu.workloads["submitted"] += 1
        # intel_vgpu_queue_workload: queued, and the scheduler told (intel_gvt_kick_schedule);
        # the dispatch is its own task in the vGPU's lane, after this trapped ELSP write
        yield from self.kick()

    def _create(self, vgpu: VGpu, engine: str, d: lrc.Descriptor,
                schedule_in: tuple | None, ctx: Ctx) -> Iterator[Any]:
        try:
            raw = yield from vgpu.mem.read_gm(d.lrca + lrc.LRC_STATE_PN * PAGE_SIZE,
                                              4 * lrc.CTX_STATE_DWORDS)
        except GvtError as err:
            raise GvtError("EINVAL", f"vGPU {vgpu.id} {engine}: invalid guest context LRCA "
                           f"{d.lrca:#x}: {err.text}") from None
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
        if start & (PAGE_SIZE - 1) or not vgpu.ggtt.range_valid(start, size):
            raise GvtError("EINVAL", f"vGPU {vgpu.id} {engine}: ring at GM {start:#x} (+{size:#x}) is "
                           f"outside the vGPU's graphics memory or not page aligned")
        if head >= size or tail >= size:
            raise GvtError("EINVAL", f"vGPU {vgpu.id} {engine}: ring head {head:#x} / tail {tail:#x} "
                           f"past the ring's {size:#x} bytes")
        mode = d.addressing
        if mode not in (lrc.ADDRESSING_LEGACY_32B, lrc.ADDRESSING_LEGACY_64B):
            raise GvtError("EINVAL", f"vGPU {vgpu.id} {engine}: addressing mode {mode} is not a "
                           f"PPGTT mode GVT-g shadows")
        pdps = [lrc.pdp(list(st), n) for n in range(4)]
        w = Workload(self.next_id, vgpu, engine, d, schedule_in, head, tail, start, ctl, ctx.now,
                     trace=ctx.trace)
        self.next_id = self.next_id % 0xFFFFFFFF + 1
        w.mm = yield from vgpu.ppgtt.get_mm(mode, pdps)
        if not vgpu.queues[engine]:
            # only the first of the queue is scanned at once (intel_vgpu_create_workload)
            try:
                yield from self._scan(w)
            except GvtError as err:
                self._failsafe_if_unhealthy(vgpu, err)
                yield from self._release(w)
                raise
        return w

    def _failsafe_if_unhealthy(self, vgpu: VGpu, err: GvtError) -> None:
        vgpu.count_refusal(err.code)
        if err.code in cmd_parser.UNHEALTHY:
            vgpu.enter_failsafe(vgpu.FAILSAFE_GUEST_ERR)

    def _scan(self, w: Workload) -> Iterator[Any]:
        """The ring segment's copy, scanned (the privileged batches read, scanned, kept)."""
        vgpu = w.vgpu
        size = lrc.ring_size(w.ctl)
        if w.tail >= w.head:
            ring = yield from vgpu.mem.read_gm(w.start + w.head, w.tail - w.head)
        else:
            ring = (yield from vgpu.mem.read_gm(w.start + w.head, size - w.head)) + \
                   (yield from vgpu.mem.read_gm(w.start, w.tail))
        s = cmd_parser.Scan(vgpu, w.engine, w.mm)
        t0 = yield Now()
        try:
            w.ring = yield from cmd_parser.scan_ring(s, ring, w.start, w.head, size)
        finally:
            w.lri_mms += s.lri_mms          # held even when the scan failed, released with it
            vgpu.commands_scanned += s.commands
        took = (yield Now()) - t0
        vgpu.scans += 1
        vgpu.scan_ns += took
        vgpu.stats.hist(CMD_SCAN_SECONDS, (vgpu.id,)).record(took)
        w.events = s.events

    # ---- dispatch ---------------------------------------------------------------------------------------
    def kick(self, lane: int | None = None) -> Iterator[Any]:
        """Something changed (work queued, a workload done, a vGPU started): the policy
        schedules (INTEL_GVT_REQUEST_EVENT_SCHED), then every idle engine gets the workload the
        policy picks, dispatched in its vGPU's lane (in order with that vGPU's trapped
        accesses): right here when the caller holds that lane already, else as a task queued in
        it. A vGPU that entered failsafe since has its queued work failed first, in its lane."""
        self.policy.schedule(self.now, timer=False)
        yield from self._dispatch_idle(lane)

    def _dispatch_idle(self, lane: int | None) -> Iterator[Any]:
        for v in self.vgpus.values():
            if v.failsafe_pending:
                v.failsafe_pending = False
                if v.id == lane:
                    yield from self.on_failsafe(v)
                else:
                    yield Spawn(self.on_failsafe(v), lane=v.id)
        for engine, cur in self.inflight.items():
            if cur is not None or self.gpu_down is not None:
                continue
            w = self.policy.pick(engine, self.vgpus.values())
            if w is None:
                continue
            _to(w, "pick")
            self.queued -= 1
            self.inflight[engine] = w
            if w.vgpu.id == lane:
                yield from self._dispatch(w)
            else:
                yield Spawn(self._dispatch(w), lane=w.vgpu.id, trace=w.trace,
                            span=f"dispatch {engine}", vgpu=w.vgpu.id)

    def _dispatch(self, w: Workload) -> Iterator[Any]:
        vgpu = w.vgpu
        if w.state != "dispatching":
            return                          # a reset or failsafe took it meanwhile
        try:
            if w.ring is None:
                yield from self._scan(w)
            for mm in (w.mm, *w.lri_mms):
                yield from vgpu.ppgtt.pin_mm(mm)
                w.pinned.append(mm)
            yield from vgpu.ppgtt.flush_post_shadow(vgpu.mem.read)
            lrca = yield from self._populate_context(w)
            if w.state != "dispatching":
                raise GvtError("ECANCELED", "a reset came while the workload was shadowed")
            if w.schedule_in is not None:
                yield from execlist.schedule_in(vgpu, vgpu.execlists[w.engine], w.schedule_in)
            owner = self.engine_owner[w.engine]
            if owner is not vgpu:
                # shadow_context_status_change: the engine runs another vGPU's context now
                yield from self.mmio.switch(owner, vgpu, w.engine)
                self.engine_owner[w.engine] = vgpu
        except GvtError as err:
            if w.state == "dispatching":
                self._free_engine(w)
                self._failsafe_if_unhealthy(vgpu, err)
                yield from self._fail(w, f"shadowing failed: {err}", drop_engine=True)
            yield from self.kick(vgpu.id)
            return
        _to(w, "send")
        w.sent_ns = yield Now()
        vgpu.stats.hist(SCHED_LATENCY, (vgpu.id,)).record(max(0, w.sent_ns - w.queued_ns))
        vgpu.running += 1
        pd = lrc.descriptor(lrca, w.id, w.desc.addressing)
        elsp = regs.ring(w.engine, regs.RING_ELSP)
        yield Post(self.gpu, "MMIO_WRITE_BATCH",
                   pack_write_batch([elsp] * 4, [4] * 4, lrc.elsp_dwords(pd)), vgpu=vgpu.id,
                   trace=w.trace)

    def _populate_context(self, w: Workload) -> Iterator[Any]:
        """populate_shadow_context + prepare_shadow_batch_buffer: the scanned batches and ring
        placed in the host pool (each batch start retargeted at its copy, PDP loads at the shadow
        roots), then the shadow context. Returns its GGTT address."""
        vgpu = w.vgpu
        body = yield from self._place_tree(w, w.ring)
        ring_pages = max(1, -(-len(body) // PAGE_SIZE))
        ring_gm = yield from self._place(w, body, "ring")
        image = bytearray((yield from vgpu.mem.read_gm(w.desc.lrca, lrc.LRC_PAGES * PAGE_SIZE)))
        state = lrc.LRC_STATE_PN * PAGE_SIZE
        regs_ = {lrc.CTX_RING_HEAD: 0, lrc.CTX_RING_TAIL: len(body), lrc.CTX_RING_START: ring_gm,
                 lrc.CTX_RING_CTL: lrc.ring_ctl(ring_pages * PAGE_SIZE)}
        for n, root in enumerate(w.mm.shadow_pdps()):
            regs_[lrc.CTX_PDP_UDW[n]] = root >> 32
            regs_[lrc.CTX_PDP_LDW[n]] = root & 0xFFFFFFFF
        for dwi, v in regs_.items():
            struct.pack_into("<I", image, state + 4 * dwi, v)
        return (yield from self._place(w, bytes(image), "context"))

    def _place_tree(self, w: Workload, buf: cmd_parser.Buffer) -> Iterator[Any]:
        """A scanned buffer's bytes, with its batches placed first and its sites patched."""
        words = buf.words
        for i, sub in buf.batches:
            gm = yield from self._place(w, (yield from self._place_tree(w, sub)), "batch")
            words[i] &= ~cmd.BB_PPGTT       # the copy is in the GGTT (privileged, as scanned)
            words[i + 1], words[i + 2] = gm & 0xFFFFFFFF, gm >> 32
        for i, mm in buf.pdp_sites:
            root = mm.shadow_pdps()[0]
            words[i], words[i + 2] = root >> 32, root & 0xFFFFFFFF
        return buf.data()

    def _place(self, w: Workload, data: bytes, what: str) -> Iterator[Any]:
        """Copy data to fresh contiguous host pool pages charged to the workload's vGPU (this
        vGPU's PPGTTs not in use give theirs back first if it is at its quota)."""
        pages = max(1, -(-len(data) // PAGE_SIZE))
        tag = f"vgpu{w.vgpu.id} {w.engine} shadow {what}"
        try:
            mfns = self.pool.alloc_run(pages, tag, w.vgpu.id)
        except QuotaExceeded:
            yield from w.vgpu.ppgtt.reclaim(pages=pages)
            mfns = self.pool.alloc_run(pages, tag, w.vgpu.id)
        w.shadow_pages.append(mfns)
        for k, m in enumerate(mfns):
            self.pool.write(m, 0, data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE])
        return self.pool.gm_of(mfns[0])

    def _free_engine(self, w: Workload) -> None:
        if self.inflight.get(w.engine) is w:
            self.inflight[w.engine] = None

    # ---- completion ----------------------------------------------------------------------------------------
    def on_engine_irq(self, engine: str, csb: list, faults: list) -> Iterator[Any]:
        """The engine's interrupt, handled at once (in no lane: a reset holding the vGPU's lane
        waits for it): the gpu is done with its workload, the physical engine is free, and the
        guest-visible completion is queued in the vGPU's lane."""
        w = self.inflight.get(engine)
        if w is None or w.state != "running":
            return
        for ctx_id, addr, reason in faults:
            if ctx_id == w.id:
                w.gpu_fault = (addr, reason)
                break
        else:
            if not any(hi == w.id and lo & lrc.CSB_CONTEXT_COMPLETE for lo, hi in csb):
                return                      # not its end yet
        _to(w, "report")
        self.inflight[engine] = None
        vgpu = w.vgpu
        busy = max(0, self.now - w.sent_ns)
        vgpu.engine_ns[engine] = vgpu.engine_ns.get(engine, 0) + busy
        vgpu.stats.inc(GPU_BUSY_SECONDS, (vgpu.id, engine), busy / 1e9)
        vgpu.running -= 1
        if not vgpu.running:
            for ev in vgpu.idle_waiters:
                yield Signal(ev)
            vgpu.idle_waiters.clear()
        yield Spawn(self._complete(w), lane=vgpu.id, trace=w.trace, span=f"complete {engine}",
                    vgpu=vgpu.id)
        yield from self.kick()

    def _complete(self, w: Workload) -> Iterator[Any]:
        """complete_current_workload + complete_execlist_workload, in the vGPU's lane."""
        if w.state != "reported":
            return                          # a reset failed it already
        vgpu = w.vgpu
        if w.gpu_fault is not None:
            # a hang (or the gpu reset under it): no completion reaches the guest, which sees a
            # vGPU hang, and its queued work on that engine goes (complete_current_workload)
            addr, reason = w.gpu_fault
            yield from self._fail(w, reason if addr < 0 else f"GPU hang at {addr:#x}: {reason}",
                                  drop_engine=True)
        elif vgpu.failsafe is not None:
            yield from self._fail(w, f"vGPU in failsafe ({vgpu.failsafe})")
        else:
            q = vgpu.queues[w.engine]
            q.remove(w)                     # the next in the queue decides about a lite restore
            _to(w, "complete")
            self._count(w, "completed")
            if self.restores and self.restores[-1]["first_completion_ns"] is None:
                self.restores[-1]["first_completion_ns"] = self.now
            try:
                yield from vgpu.mem.write_gm(w.desc.lrca + lrc.LRC_STATE_PN * PAGE_SIZE +
                                             4 * lrc.CTX_RING_HEAD, struct.pack("<I", w.tail))
            except GvtError:
                pass                        # the guest unmapped its context: nothing to update
            try:
                for ev in sorted(w.events):
                    for a in interrupt.trigger_event(vgpu, w.engine, ev):
                        yield a
                if not (q and q[0].desc.same_context(w.desc)):      # else a lite restore follows
                    try:
                        yield from execlist.schedule_out(vgpu, vgpu.execlists[w.engine], w.desc)
                    except GvtError:
                        # the guest's execlist no longer runs this context: after a GPU reset
                        # failed a workload without a CSB (the kernel's -EIO path), until the
                        # guest resets the engine. The kernel logs it (gvt_vgpu_err) and goes
                        # on; so does this, counting it for the ledger
                        vgpu.execlist_errors += 1
            finally:
                yield from self._release(w)
        yield from self.kick(vgpu.id)

    def _fail(self, w: Workload, reason: str, drop_engine: bool = False) -> Iterator[Any]:
        """w ends failed and gives its shadows back; with drop_engine its vGPU's other queued
        work on that engine goes too (clean_workloads)."""
        vgpu = w.vgpu
        q = vgpu.queues[w.engine]
        if w in q:
            q.remove(w)
        if w.state == "queued":
            self.queued -= 1
        _to(w, "fail")
        # a guest chooses what its reasons say (addresses, dwords): keep a bounded set of them
        if len(vgpu.fail_reasons) >= FAIL_REASONS_MAX and reason not in vgpu.fail_reasons:
            reason = "(other reasons)"
        vgpu.fail_reasons[reason] = vgpu.fail_reasons.get(reason, 0) + 1
        self._count(w, "failed")
        yield from self._release(w)
        if drop_engine:
            yield from self.drop(vgpu, [w.engine], f"dropped after an earlier workload on "
                                 f"{w.engine} failed")

    def drop(self, vgpu: VGpu, engines: list[str], reason: str) -> Iterator[Any]:
        """Fail the vGPU's workloads on these engines that the gpu is not running: queued, being
        dispatched, or reported and not yet completed (a reported one stays at the head of its
        queue until its completion: a lite restore's head is its tail)."""
        for e in engines:
            for w in list(vgpu.queues[e]):
                if w.state in ("queued", "dispatching", "reported"):
                    self._free_engine(w)
                    yield from self._fail(w, reason)

    def _count(self, w: Workload, status: str) -> None:
        vgpu = w.vgpu
        vgpu.workloads[status] += 1
        lab = (vgpu.id, w.engine, "mediator")
        vgpu.stats.hist(WORKLOAD_LATENCY, lab).record(max(0, self.now - w.created_ns))
        vgpu.stats.inc(WORKLOADS, (vgpu.id, w.engine, "mediator", status))

    def _release(self, w: Workload) -> Iterator[Any]:
        for run in w.shadow_pages:
            self.pool.release_run(run)
        w.shadow_pages = []
        ppgtt = w.vgpu.ppgtt
        for mm in w.pinned:
            ppgtt.unpin_mm(mm)
        w.pinned = []
        for mm in w.lri_mms:
            yield from ppgtt.put_mm(mm)
        w.lri_mms = []
        if w.mm is not None:
            mm, w.mm = w.mm, None
            yield from ppgtt.put_mm(mm)

    def note_restore(self, now: int) -> None:
        if len(self.restores) < 64:
            self.restores.append({"restored_ns": now, "first_completion_ns": None})

    def gpu_reset(self, reason: str) -> Iterator[Any]:
        """The physical gpu was reset under its workloads (it restarted): each one it was running
        ends as a hang would, with the reset as its reason: the kernel gives the guest no
        context-switch interrupt for a workload whose request died with -EIO, so the guest sees
        a vGPU hang and resets the engine itself."""
        self.gpu_resets += 1
        for e in self.engine_owner:         # its registers start over: nobody's are loaded
            self.engine_owner[e] = None
        for engine, w in self.inflight.items():
            if w is not None and w.state == "running":
                yield from self.on_engine_irq(engine, [], [[w.id, -1, f"GPU reset: {reason}"]])

    # ---- resets and failsafe -----------------------------------------------------------------------------
    def reset(self, vgpu: VGpu, engines: list[str], reason: str) -> Iterator[Any]:
        """intel_gvt_reset_vgpu_locked's submission part: stop scheduling the vGPU, wait until the
        gpu has reported every workload of it that runs, then fail its work on `engines` (the
        reset is the reason) and reset their execlists. Scheduling starts again when the guest
        enables execlists."""
        vgpu.sched_active = False
        self.policy.stop_schedule(vgpu)     # intel_vgpu_stop_schedule
        for e in engines:
            for w in list(vgpu.queues[e]):
                if w.state == "dispatching":
                    self._free_engine(w)
                    yield from self._fail(w, reason)
        while vgpu.running:
            ev = Event(f"vgpu{vgpu.id} idle")
            vgpu.idle_waiters.append(ev)
            yield Wait(ev)
        yield from self.drop(vgpu, engines, reason)
        for e in engines:
            execlist.reset_engine(vgpu, e)
        for e, owner in self.engine_owner.items():
            if owner is vgpu and self.inflight[e] is None:  # the host takes its engines back
                self.engine_owner[e] = None
                yield from self.mmio.switch(vgpu, None, e)

    def on_failsafe(self, vgpu: VGpu) -> Iterator[Any]:
        """A vGPU that entered failsafe runs nothing more: its queued work fails with the reason
        (what the gpu runs still ends as the gpu reports it)."""
        yield from self.drop(vgpu, list(vgpu.queues), f"vGPU entered failsafe ({vgpu.failsafe})")

    def start(self, vgpu: VGpu) -> Iterator[Any]:
        """intel_vgpu_start_schedule: the guest enabled execlists."""
        if vgpu.failsafe is None and not vgpu.sched_active:
            vgpu.sched_active = True
            self.policy.start_schedule(vgpu, self.now)
            yield from self.kick(vgpu.id)
