"""Guest core (sans-IO): the i915 driver model's boot sequence, its GGTT mappings, and the load.

Every access goes to BAR0 through the hypervisor. Reads are requests; writes are posted: each
message carries the guest's own write number `w`, and the hypervisor answers WRITE_DONE for a
range of numbers with their outcome: ok, failed (not applied), or unknown (the mediator did not
answer in time: it may apply them later). Latency is measured from the intended issue time (open
loop), so a slow system cannot hide its queueing.

The register check is the one Jepsen makes of a register with indeterminate writes: a read must
return the value of the last write before it that was applied, or of any write between that one
and the read whose outcome is unknown.

Tracing: with a trace rate, the guest samples at most that many load operations per second (by
their intended issue time) and gives each an id, `vm << 40 | n`, that the messages of the
operation carry on every hop (see nodes/actions.py).
"""
from __future__ import annotations

import dataclasses
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from nodes.actions import Call, Post, Sleep
from nodes.core import Core
from nodes.errors import GvtError
from nodes.hw import PAGE_SIZE, gtt, pvinfo, regs
from nodes.guest.i915 import DRIVER_GGTT_PAGES
from nodes.guest.mmu import GuestRam
from nodes.guest.timeline import Timeline
from nodes.guest.hostile import HostileDriver
from nodes.guest.workloads import WorkloadDriver
from nodes.metrics import (TRAP_LATENCY, TRAPS, WORKLOAD_LATENCY, declare_trap_metrics,
                           declare_workload_metrics)
from nodes.stats import LatencyHistogram, Stats
from nodes.wire.codec import MAX_OUTSTANDING, MAX_POSTED_WRITES
from nodes.wire.schema import PROBE_READS_MAX, pack_write_batch

MIXES = ("mmio-read", "mmio-write", "gtt-burst", "submit", "ppgtt-churn", "hostile")
GPU_HELD_MAX = 4096                 # GPU operations a guest holds back while its attack runs
GPU_MIXES = ("submit", "ppgtt-churn", "hostile")   # mixes that need the driver's GPU objects
_MIX = {"gtt_write": "gtt-burst", "mmio_write": "mmio-write"}     # posted trap kind -> its mix
N_GPRS = regs.RING_GPRS
TOKEN = struct.Struct("<IIQ")       # vm, GGTT index, nonce: 16 bytes written by the gpu probe
VERIFY_CHUNK = 16384                # probe tokens read back per GPA_READ
PLAN_PAGE = 16384                   # GGTT entries (and their probes) per VERIFY_PLAN page
FIRST_READ_PATIENCE_S = 30.0
LOST_SETTLE_S = 15.0            # a lost vGPU: how long the guest waits for its accesses to settle


@dataclass
class LoadSpec:
    mix: dict[str, float] = field(default_factory=lambda: {"mmio-read": 0.4, "mmio-write": 0.4,
                                                           "gtt-burst": 0.2})
    mode: str = "open"              # open | closed
    rate: float = 2000.0            # ops/s per vGPU (open loop)
    concurrency: int = 8            # outstanding ops (closed loop)
    window: int = 256               # the most ops in flight in open loop before issue waits
    burst: int = 256                # GGTT entries per gtt-burst
    invalid_gfn_ratio: float = 0.002   # present entries with a gfn that is not RAM
    not_present_ratio: float = 0.01
    outside_ratio: float = 0.05     # bursts that also poke entries outside the partition
    duration_s: float = 10.0
    ops: int = 0                    # > 0: stop after this many ops instead of the duration
    stores_per_batch: int = 4       # submit: MI_STORE_DATA_IMM tokens per batch
    batches_per_workload: int = 1   # submit: batches one ring submission starts
    bad_ratio: float = 0.0          # submit: workloads meant to hang (a store to an unmapped address)
    spin_ratio: float = 0.0         # submit: workloads that never end (a batch chained to itself)
    vertices: int = 0               # submit: a 3DPRIMITIVE of this many vertices per render batch
    engines: tuple[str, ...] = ("rcs", "bcs")
    hang_timeout_s: float = 6.0     # the guest's hang check: no progress this long with work queued
                                    # (i915's heartbeat: 2 x 2.5 s and the 0.64 s preempt timeout)
    churn_halves_ratio: float = 0.25    # ppgtt-churn: PTE writes made as two 4-byte halves
    trace_rate: float = 0.0         # load ops sampled for tracing per second (0: none)
    hostile_repeat: int = 2         # hostile: tries of each attack the vGPU survives
    hostile_timeout_s: float = 1.0  # hostile: how long an accepted attack may take to complete


class _Write:
    """A posted write op in flight; on_done(status, WRITE_DONE payload) -> actions, if given,
    learns its outcome."""
    __slots__ = ("intended", "kind", "n", "gpr", "on_done")

    def __init__(self, intended: int, kind: str, n: int, gpr: Any,
                 on_done: Callable[[str, dict], list] | None = None):
        self.intended, self.kind, self.n, self.gpr, self.on_done = intended, kind, n, gpr, on_done


class GuestCore(Core):
    role = "guest"

    def __init__(self, vm: int, ram_frames: int, seed: int, load: LoadSpec, *,
                 hypervisor: str = "hypervisor", launcher: str | None = "launcher",
                 gvt_aware: bool = True, max_posted: int = MAX_POSTED_WRITES,
                 max_outstanding: int = MAX_OUTSTANDING, ram: GuestRam | None = None,
                 progress_every_ns: int = 0):
        super().__init__()
        self.vm, self.ram_frames, self.load = vm, ram_frames, load
        # PROGRESS to the launcher this often while the load runs (0: never)
        self.progress_every_ns = progress_every_ns if launcher else 0
        self.next_progress = 0
        self.hv, self.launcher = hypervisor, launcher
        self.gvt_aware = gvt_aware
        self.max_posted, self.max_outstanding = max_posted, max_outstanding
        self.rng = np.random.default_rng([seed, vm, 0x6E57])
        self.state = "idle"
        self.pv: dict[str, int] = {}
        self.ranges: list[tuple[int, int]] = []     # (first GGTT index, count): aperture, hidden
        self.map: np.ndarray | None = None          # what this guest last wrote to each of its entries
        self.map_loose = np.zeros(0, dtype=bool)
        # per GPR: the value of the newest write known applied, and [w, value, outcome] of the
        # writes after it (outcome None while pending)
        self.gpr_base = [0] * N_GPRS
        self.gpr_hist: list[list[list]] = [[] for _ in range(N_GPRS)]
        self.wno = 0                                # posted write messages sent
        self.writes: dict[int, _Write] = {}         # w -> op, in w order
        self.writes_in_flight = 0                   # individual writes of those ops
        self.reads_inflight = 0
        self.issued = self.completed = self.failed = self.unknown = 0
        self.mismatches = 0
        self.outside_probes = 0                     # GGTT writes outside the partition it made
        self.fail_reasons: dict[str, int] = {}
        self._latency_base: dict[str, LatencyHistogram] = {}    # the histograms when the load began
        self.timeline = Timeline()          # ops and workloads per second, from the load's start
        self.irqs = 0
        self.vgpu_losses = 0        # VGPU_LOST survived (a reboot each)
        self.lost_while: list[str] = []     # VGPU_LOSTs that came while the guest was booting
        self.t0 = 0
        self.sched_t0 = 0               # the open-loop schedule's origin (moved on by a reboot)
        self.next_op = 0            # index of the next op in the open-loop schedule
        self.end_ns = 0
        self.boot_error: str | None = None
        self.last_reply_at = 0                      # when the last boot read was answered
        self._draw_mix: list[int] = []
        self._draw_gpr: list[int] = []
        self._draw_val: list[int] = []
        self._draw_i = 0
        self._plan: tuple[int, list] | None = None
        self.trace_next = 0         # the intended time from which the next op is sampled
        self.traced = 0             # ops sampled so far (the low bits of their trace ids)
        self.ram = ram or GuestRam(vm, ram_frames, hypervisor)
        self.now = 0                                # the time of the last message or tick
        self.hostile = (HostileDriver(self, load.hostile_repeat, load.hostile_timeout_s)
                        if load.mix.get("hostile", 0) > 0 else None)
        self.gpu_held: deque[tuple[str, int, int]] = deque()     # GPU ops drawn while an attack ran
        self.wl = WorkloadDriver(self, self.ram, tuple(load.engines), attack=self.hostile is not None)
        self.stats = Stats()
        declare_trap_metrics(self.stats)
        declare_workload_metrics(self.stats)
        self.stats.counter("gvtbench_guest_ops", "Load operations by mix and status", ["vgpu", "mix", "status"])
        self.stats.counter("gvtbench_guest_irqs", "Interrupts delivered to the guest", ["vgpu"])

    # ---- BAR0 access helpers (task fragments) ----------------------------------------------------
    def _read(self, off: int, size: int = 4) -> Iterator[Any]:
        call = Call(self.hv, "MMIO_READ", {"off": off, "size": size}, vgpu=self.vm)
        val = yield call
        self.last_reply_at = call.done_at
        return val

    def _post_write(self, off: int, val: int, size: int = 4, trace: int = 0) -> Post:
        self.wno += 1
        return Post(self.hv, "MMIO_WRITE", {"off": off, "size": size, "val": val, "w": self.wno},
                    vgpu=self.vm, trace=trace)

    # ---- for the GPU driver (nodes.guest.workloads) ---------------------------------------------
    def post_batch(self, offs: Any, sizes: Any, vals: Any, trace: int | None = None,
                   on_done: Callable[[str, dict], list] | None = None) -> Post:
        """Posted register or GTT writes of the driver's own (not load ops); `trace`: the
        sampled operation they belong to (an ELSP write submits a sampled workload); on_done:
        told their outcome, returns the actions that follow from it."""
        n = len(sizes)
        self.wno += 1
        self.writes[self.wno] = _Write(0, "driver", n, None, on_done)
        self.writes_in_flight += n
        payload = pack_write_batch(offs, sizes, [v & 0xFFFFFFFFFFFFFFFF for v in vals])
        payload["w"] = self.wno
        return Post(self.hv, "MMIO_WRITE_BATCH", payload, vgpu=self.vm, trace=trace)

    def next_fault_w(self, gpa: int, on_done: Callable[[str, dict], list] | None = None) -> int:
        """The write number of a faulting RAM store (its WRITE_DONE ends the fault); on_done:
        told its outcome."""
        self.wno += 1
        self.writes[self.wno] = _Write(0, "fault", 1, gpa, on_done)
        self.writes_in_flight += 1
        return self.wno

    def read_reg(self, off: int, size: int = 4) -> Iterator[Any]:
        return (yield from self._read(off, size))

    def note_ggtt(self, idx: np.ndarray, vals: np.ndarray) -> None:
        """GGTT entries the driver wrote: the ledger expects them like any other."""
        a0, an = self.ranges[0]
        self.map[idx - a0] = vals

    def op_done(self, mix: str, now: int, failed: bool = False, reason: str | None = None) -> None:
        if failed:
            self._fail(mix, reason or "failed", now)
        else:
            self.completed += 1
            self.stats.inc("gvtbench_guest_ops", (self.vm, mix, "completed"))
            self.timeline.count(("ops", mix, "completed"), now)

    def workload_retired(self, now: int, failed: bool) -> None:
        """A workload left the GPU: completed, or failed by a hang (meant or not)."""
        self.timeline.count(("workloads", "failed" if failed else "completed"), now)

    def _uses_gpu(self) -> bool:
        return any(self.load.mix.get(m, 0) > 0 for m in GPU_MIXES)

    def _first_read(self, off: int, size: int) -> Iterator[Any]:
        """The first access waits for the vGPU to exist: nodes started by hand, one per host,
        come up in any order, and the mediator answers ENODEV until it has created the vGPU."""
        tries = int(FIRST_READ_PATIENCE_S / 0.1)
        for attempt in range(tries):
            try:
                return (yield from self._read(off, size))
            except GvtError as err:
                if err.code not in ("ENODEV", "ETIMEDOUT", "EHOSTUNREACH", "ECONNRESET") \
                        or attempt == tries - 1:
                    raise
                if self.lost_while:
                    # the vGPU was lost while booting: the VM resets its device, then reads again
                    self.lost_while.clear()
                    try:
                        yield Call(self.hv, "VM_RESET", None, vgpu=self.vm, timeout=30)
                    except GvtError:
                        self.lost_while.append("VM_RESET refused: try again")
            yield Sleep(0.1)
        raise GvtError("ETIMEDOUT", "no vGPU answered")     # not reached: the loop raises

    # ---- boot ------------------------------------------------------------------------------
    def boot(self, reboot: bool = False) -> Iterator[Any]:
        """i915 on GVT-g: detect the PV page, balloon, reset the CSB pointers, enable execlists
        (reboot: after a VM reset, every GPU object is set up again)."""
        self.state = "booting"
        if self.gvt_aware:
            magic = yield from self._first_read(pvinfo.BASE + pvinfo.MAGIC_OFF, 8)
            if magic != pvinfo.MAGIC:
                raise GvtError("ENODEV", f"PV info magic is {magic:#x}, not vGTvGTvG: not a GVT-g vGPU")
            ver = yield from self._read(pvinfo.BASE + pvinfo.VERSION_MAJOR_OFF, 4)
            major, minor = ver & 0xFFFF, ver >> 16
            if major != pvinfo.VERSION_MAJOR:
                raise GvtError("EPROTO", f"PV interface version {major}.{minor} is not supported")
            pv = {}
            for name, off in (("vgt_id", pvinfo.VGT_ID), ("caps", pvinfo.VGT_CAPS),
                              ("ap_base", pvinfo.AVAIL_MAPPABLE_BASE),
                              ("ap_size", pvinfo.AVAIL_MAPPABLE_SIZE),
                              ("hi_base", pvinfo.AVAIL_NONMAPPABLE_BASE),
                              ("hi_size", pvinfo.AVAIL_NONMAPPABLE_SIZE),
                              ("fences", pvinfo.AVAIL_FENCE_NUM)):
                pv[name] = yield from self._read(pvinfo.BASE + off, 4)
            pv["version"] = major
            self.pv = pv
            # balloon: everything outside avail_rs is reserved and never used by this guest
            self.ranges = [(gtt.index_of_gm(pv["ap_base"]), gtt.index_of_gm(pv["ap_size"])),
                           (gtt.index_of_gm(pv["hi_base"]), gtt.index_of_gm(pv["hi_size"]))]
            self.map = np.zeros(sum(n for _, n in self.ranges), dtype=np.uint64)
            # entries whose last write did not end ok (failed, refused, unknown: a fault may
            # have taken it): the GGTT may hold either value there
            self.map_loose = np.zeros(len(self.map), dtype=bool)
        # execlists_sanitize -> reset_csb_pointers: both pointers to the last entry, then a
        # posting read that must show them
        csb_ptr = regs.ring("rcs", regs.RING_CSB_PTR)
        yield self._boot_write(csb_ptr, regs.csb_ptr_guest_reset())
        ptr = yield from self._read(csb_ptr, 4)
        want = regs.csb_ptr_guest_reset() & 0xFFFF
        if ptr & 0x7FF != want:
            raise GvtError("EIO", f"the CSB pointer reads {ptr:#x} after a reset to {want:#x}")
        gfx_mode = regs.ring("rcs", regs.RING_MODE)
        yield self._boot_write(gfx_mode, regs.masked_enable(regs.GFX_MODE_RUN_LIST_ENABLE))
        mode = yield from self._read(gfx_mode, 4)
        if not mode & regs.GFX_MODE_RUN_LIST_ENABLE:
            raise GvtError("EIO", f"execlists did not turn on: GFX_MODE reads {mode:#x}")
        if self.gvt_aware and self._uses_gpu() and (self.wl.lay is None or reboot):
            yield from self.wl.setup(self.ranges[0][0])
        self.state = "booted"
        return dict(self.pv)

    def rebooted(self, downtime_ns: int) -> None:
        """The VM is up again after a reset: the open-loop schedule resumes where it stopped (a
        VM that was down issued nothing; its operations were not late)."""
        self.sched_t0 += downtime_ns

    def vgpu_lost(self, reason: str, now: int) -> Iterator[Any] | None:
        """The hypervisor says the vGPU is gone (its mediator restarted): what is in flight
        settles (failed: ENODEV, or unknown), the VM resets its device (VM_RESET, retried while
        the new mediator has no vGPU for it yet), and the driver boots again. The load's
        schedule resumes after the downtime; GPU work in flight failed with the loss as reason."""
        if self.state not in ("running", "booted", "drained"):
            self.lost_while.append(reason)  # booting or rebooting already: that boot meets it
            return None
        return self._reboot_lost(reason, now)

    def _reboot_lost(self, reason: str, down: int) -> Iterator[Any]:
        state, self.state = self.state, "rebooting"
        self.vgpu_losses += 1
        try:
            for _ in range(int(LOST_SETTLE_S / 0.005)):
                if not (self.reads_inflight or self.writes):
                    break
                yield Sleep(0.005)
            for attempt in range(int(FIRST_READ_PATIENCE_S / 0.1)):
                try:
                    yield Call(self.hv, "VM_RESET", None, vgpu=self.vm, timeout=30)
                    break
                except GvtError as err:
                    if err.code not in ("ENODEV", "ETIMEDOUT", "EHOSTUNREACH", "ECONNRESET",
                                        "ENOTCONN"):
                        raise
                yield Sleep(0.1)
            self.after_vm_reset(self.now, reason=f"the vGPU was lost: {reason}")
            yield from self.boot(reboot=True)
            self.rebooted(self.now - down)
        except GvtError as err:
            self.boot_error = f"after the vGPU was lost ({reason}): {err.text}"
            state = "failed"
            raise
        finally:
            self.state = state

    def after_vm_reset(self, now: int, reason: str | None = None) -> None:
        """The VM was reset: the vGPU's registers are back at their reset values, its GGTT's host
        entries at scratch, its GPU work gone (meant, or failed with `reason`); the guest's
        bookkeeping follows."""
        self.wl.reboot(now, reason)
        if self.map is not None:
            self.map[:] = 0
            self._loose()[:] = False
        self.gpr_base = [0] * N_GPRS
        self.gpr_hist = [[] for _ in range(N_GPRS)]

    def _boot_write(self, off: int, val: int) -> Post:
        post = self._post_write(off, val)
        self.writes[self.wno] = _Write(0, "boot", 1, None)
        self.writes_in_flight += 1
        return post

    # ---- load ------------------------------------------------------------------------------
    def start(self, now: int, spec: dict | None = None) -> None:
        if self.map is None:
            raise GvtError("EAGAIN", "the guest has not booted (or is not GVT-g aware): no GM to use")
        if spec:
            try:
                self.load = dataclasses.replace(self.load, **spec)
            except TypeError as err:
                raise GvtError("EINVAL", f"START spec: {err}") from None
        self.state = "running"
        self.t0 = self.sched_t0 = now
        self.next_op = 0
        self.issued = self.completed = self.failed = self.unknown = self.mismatches = 0
        fam = self.stats.families[TRAP_LATENCY].values
        self._latency_base = {lab[1]: h.copy() for lab, h in fam.items()}
        self._mix_names = [m for m in self.load.mix if self.load.mix[m] > 0]
        self._draw_mix = []
        self.end_ns = now + int(self.load.duration_s * 1e9)
        series = [("ops", m, st) for m in self._mix_names for st in ("completed", "failed", "unknown")]
        if "submit" in self._mix_names:
            series += [("workloads", "completed"), ("workloads", "failed")]
        self.timeline = Timeline(now, series)
        self.trace_next = 0

    def _due(self, now: int) -> bool:
        if self.load.ops:
            return self.issued < self.load.ops
        return now < self.end_ns

    def due(self) -> bool:
        """Whether the load still issues operations."""
        return self._due(self.now)

    def ops_bounded(self) -> bool:
        return bool(self.load.ops)

    def outstanding(self) -> int:
        """Operations on their way: reads and writes unanswered, workloads not retired."""
        return self.reads_inflight + len(self.writes) + self.wl.inflight

    def _inflight(self) -> int:
        return self.outstanding() + len(self.gpu_held)

    def _room(self) -> bool:
        """The hypervisor's limits are this guest's flow control: requests in flight and
        posted writes not yet done; and at most GPU_HELD_MAX GPU operations held back for an
        attack (the window counts what is on its way: held work is not, so the register and
        GGTT load goes on beside an attack as a VM's other vCPUs would)."""
        return (self.reads_inflight < self.max_outstanding
                and len(self.gpu_held) < GPU_HELD_MAX
                and self.writes_in_flight + self.load.burst + 4 <= self.max_posted
                and (self.wl.lay is None or self.wl.room()))

    def _attacking(self) -> bool:
        return self.hostile is not None and self.hostile.busy

    def _campaign_on(self) -> bool:
        return self.hostile is not None and self.hostile.active

    def tick(self, now: int) -> None:
        self.now = now
        if self.state != "running":
            return
        out = self.outbox               # emitted: the load's next operations, in order
        ld = self.load
        while self.gpu_held and not self._attacking() and self.wl.room():
            self._add(out, self._gpu_op(*self.gpu_held.popleft()))
        if ld.mode == "open":
            period = 1e9 / ld.rate
            while self._due(now) and self.outstanding() < ld.window and self._room():
                intended = self.sched_t0 + int(self.next_op * period)
                if intended > now:
                    break
                self.next_op += 1
                self._add(out, self._issue(intended))
        else:
            while self._due(now) and self.outstanding() < ld.concurrency and self._room():
                self._add(out, self._issue(now))
        out += self.wl.tick(now)
        if not self._due(now) and self._inflight() == 0 and not self._campaign_on():
            self.state = "drained"
            if self.launcher:
                out.append(Post(self.launcher, "LOAD_DONE", {"report": self.report(now)}, vgpu=self.vm))
        elif self.progress_every_ns and now >= self.next_progress:
            self.next_progress = now + self.progress_every_ns
            out.append(Post(self.launcher, "PROGRESS", {"report": self.progress()}, vgpu=self.vm))

    @staticmethod
    def _add(out: list, action: Any) -> None:
        if type(action) is list:
            out.extend(action)
        else:
            out.append(action)

    def next_wake(self, now: int) -> int | None:
        hang = self.wl.next_wake()
        if self.progress_every_ns and self.state == "running":
            hang = self.next_progress if hang is None else min(hang, self.next_progress)
        if self.state != "running" or self.load.mode != "open":
            return hang
        if not self._room() or self.outstanding() >= self.load.window:
            # held back: what frees room (a reply, an attack's end) comes in a step of its own,
            # which ticks; waking for the schedule meanwhile would only spin
            return hang
        w = self.sched_t0 + int(self.next_op * 1e9 / self.load.rate)
        return w if hang is None else min(w, hang)

    def _draw(self) -> tuple[str, int, int]:
        """The next op's mix, GPR and value. Drawn in blocks: numpy per call costs more than a
        whole trap's worth of Python, and the generator must not slow the system it measures."""
        if self._draw_i >= len(self._draw_mix):
            n = 4096
            cum = np.cumsum([self.load.mix[m] for m in self._mix_names], dtype=float)
            self._draw_mix = np.searchsorted(cum / cum[-1], self.rng.random(n), side="right").tolist()
            self._draw_gpr = self.rng.integers(0, N_GPRS, n).tolist()
            self._draw_val = self.rng.integers(0, 1 << 32, n, dtype=np.int64).tolist()
            self._draw_i = 0
        i = self._draw_i
        self._draw_i += 1
        return self._mix_names[min(self._draw_mix[i], len(self._mix_names) - 1)], self._draw_gpr[i], self._draw_val[i]

    def _sample(self, intended: int) -> int:
        """The trace id of the op intended at `intended` if it is sampled, else 0: an op is
        sampled when 1/trace_rate s of intended time have passed since the last sampled one
        (so every op is when ops are sparser than that)."""
        if intended < self.trace_next:
            return 0
        self.trace_next = intended + int(1e9 / self.load.trace_rate)
        self.traced += 1
        return self.vm << 40 | self.traced

    def _issue(self, intended: int) -> Any:
        mix, k, val = self._draw()
        self.issued += 1
        trace = self._sample(intended) if self.load.trace_rate > 0 else 0
        if mix == "mmio-read":
            self.reads_inflight += 1
            # what the read may return is fixed now, in issue order: the writes before it
            return self._op_read(intended, k, self.gpr_base[k], list(self.gpr_hist[k]), trace)
        if mix == "hostile":
            out = self.hostile.issue(intended)
            self.op_done("hostile", intended)
            return out
        if mix in GPU_MIXES:
            if self._attacking():
                # an attack observes only its own GPU work: the guest's waits (its latency
                # counts from the intended time), while the register and GGTT load goes on
                self.gpu_held.append((mix, intended, trace))
                return []
            return self._gpu_op(mix, intended, trace)
        if mix == "mmio-write":
            post = self._post_write(regs.RCS_GPR0 + 4 * k, val, trace=trace)
            entry = [self.wno, val, None, k]
            self.gpr_hist[k].append(entry)
            self.writes[self.wno] = _Write(intended, "mmio_write", 1, entry)
            self.writes_in_flight += 1
            return post
        return self._gtt_burst(intended, trace)

    def _gpu_op(self, mix: str, intended: int, trace: int) -> Any:
        if self.hostile is not None and self.hostile.ended_in_failsafe:
            self._fail(mix, "the vGPU is in failsafe (the hostile mix put it there): no GPU work", intended)
            return []
        if mix == "submit":
            return self.wl.submit(intended, trace)
        out = self.wl.churn()
        if trace:
            for a in out:               # the faults its page-table stores became, made just now
                a.trace = trace
        self.op_done("ppgtt-churn", intended)
        return out

    def _op_read(self, intended: int, k: int, base: int, before: list[list],
                 trace: int = 0) -> Iterator[Any]:
        call = Call(self.hv, "MMIO_READ", {"off": regs.RCS_GPR0 + 4 * k, "size": 4}, vgpu=self.vm,
                    trace=trace)
        try:
            val = yield call
        except GvtError as err:
            self._fail("mmio-read", err.text, call.done_at)
            return
        finally:
            self.reads_inflight -= 1
        self._complete("mmio_read", "mmio-read", intended, call.done_at, 1)
        allowed = _register_values(base, before)
        if val not in allowed:
            # posted writes are ordered before a later read: anything else is a mediator bug
            self.mismatches += 1
            self._fail_reason(f"GPR{k} read {val:#x}, expected one of "
                              f"{', '.join(f'{v:#x}' for v in sorted(allowed)[:4])}")

    def _gtt_burst(self, intended: int, trace: int = 0) -> Post:
        ld, rng = self.load, self.rng
        r = 0 if rng.random() < 0.5 else 1
        first, count = self.ranges[r]
        lo = DRIVER_GGTT_PAGES if (r == 0 and self.wl.lay is not None) else 0
        n = min(ld.burst, count - lo)
        start = lo + int(rng.integers(count - lo - n + 1))
        idx = np.arange(first + start, first + start + n, dtype=np.int64)
        gfns = rng.integers(0, self.ram_frames, n, dtype=np.int64)
        bad = rng.random(n) < ld.invalid_gfn_ratio
        gfns[bad] = self.ram_frames + rng.integers(0, 1 << 20, int(bad.sum()))
        vals = gtt.encode(gfns, gtt.PTE_PRESENT | gtt.PTE_RW)
        absent = rng.random(n) < ld.not_present_ratio
        vals[absent] &= ~np.uint64(gtt.PTE_PRESENT)
        local = start + (0 if r == 0 else self.ranges[0][1])
        self.map[local:local + n] = vals
        if rng.random() < ld.outside_ratio:
            # probe the ballooned space: these writes must be dropped by the mediator
            probe = self._outside_indices(4)
            self.outside_probes += len(probe)
            idx = np.concatenate([idx, probe])
            vals = np.concatenate([vals, np.full(len(probe), gtt.encode(1), dtype=np.uint64)])
        self.wno += 1
        self.writes[self.wno] = _Write(intended, "gtt_write", len(idx), None,
                                       lambda status, _p: self._ggtt_settled(local, n, status))
        self.writes_in_flight += len(idx)
        payload = pack_write_batch(gtt.offset_of(idx), np.full(len(idx), 8), vals)
        payload["w"] = self.wno
        return Post(self.hv, "MMIO_WRITE_BATCH", payload, vgpu=self.vm, trace=trace)

    def _ggtt_settled(self, local: int, n: int, status: str) -> list:
        """A GGTT burst's outcome: applied (its entries are what the guest wrote) or not known
        to be (they stay loose until a later burst over them is applied)."""
        self._loose()[local:local + n] = status != "ok"
        return []

    def _outside_indices(self, n: int) -> np.ndarray:
        out: list[int] = []
        while len(out) < n:
            i = int(self.rng.integers(gtt.ENTRIES))
            if not any(f <= i < f + c for f, c in self.ranges):
                out.append(i)
        return np.array(out, dtype=np.int64)

    def _complete(self, kind: str, mix: str, intended: int, end: int, n: int) -> None:
        lat = end - intended
        lab = (self.vm, kind, "guest")
        self.stats.hist(TRAP_LATENCY, lab).record(lat, n)
        self.stats.inc(TRAPS, lab, n)
        self.stats.inc("gvtbench_guest_ops", (self.vm, mix, "completed"))
        self.timeline.count(("ops", mix, "completed"), end)
        self.completed += 1

    def _fail(self, mix: str, reason: str, now: int) -> None:
        self.failed += 1
        self.stats.inc("gvtbench_guest_ops", (self.vm, mix, "failed"))
        self.timeline.count(("ops", mix, "failed"), now)
        self._fail_reason(reason)

    def _fail_reason(self, reason: str) -> None:
        if len(self.fail_reasons) < 32 or reason in self.fail_reasons:
            self.fail_reasons[reason] = self.fail_reasons.get(reason, 0) + 1

    # ---- messages ----------------------------------------------------------------------------
    def handle(self, msg: Any, now: int) -> Any:
        kind, p = msg.kind, msg.payload
        self.now = now
        if kind == "WRITE_DONE":
            return self._write_done(p, now)
        if kind == "IRQ":
            self.irqs += 1
            self.stats.inc("gvtbench_guest_irqs", (self.vm,))
            return self.wl.on_irq(now)
        if kind == "VGPU_LOST":
            return self.vgpu_lost(p["reason"], now)
        if kind == "RAM_VERIFY":
            return self.wl.verify()
        if kind == "START":
            return self.boot_and_start(p.get("load", True), p.get("spec"), now)
        if kind == "VERIFY_PLAN":
            return self.verify_plan(p["nonce"], p["page"])
        if kind == "VERIFY":
            return self.verify(p["nonce"])
        if kind == "REPORT":
            return self.report(now)
        if kind == "PROBE":
            return self.probe(p["reads"], now)
        raise GvtError("ENOTSUP", f"the guest does not handle {kind}")

    def _write_done(self, p: dict, now: int) -> None:
        first, last, status = p["first"], p["last"], p["status"]
        writes = self.writes
        if writes and next(iter(writes)) >= first:
            done = []
            for w in writes:
                if w > last:
                    break
                done.append(w)
        elif last - first <= len(writes):   # out of order (a refused write): look them up
            done = [w for w in range(first, last + 1) if w in writes]
        else:
            done = [w for w in writes if first <= w <= last]
        ok: dict[str, tuple[list[int], list[int]]] = {}      # kind -> (intended, n) of ops done
        told: list[Any] = []
        for w in done:
            op = writes.pop(w)
            self.writes_in_flight -= op.n
            if op.on_done is not None:
                told += op.on_done(status, p)
            if op.kind == "fault":              # its gpr field is the faulting store's gpa
                self.ram.fault_done(op.gpr)
                if status in ("failed", "refused"):
                    self._fail_reason(f"a RAM store that faulted was {status}: {p.get('reason', status)}")
                continue
            if op.gpr is not None:
                self._settle_gpr(op.gpr, "failed" if status == "refused" else status)
            if op.kind in ("boot", "driver"):      # not ops of the load
                if status in ("failed", "refused") and op.kind == "driver":
                    self._fail_reason(f"driver write {status}: {p.get('reason', status)}")
                continue
            if status == "ok":
                t, n = ok.setdefault(op.kind, ([], []))
                t.append(op.intended)
                n.append(op.n)
            elif status == "unknown":
                self.unknown += 1
                self.stats.inc("gvtbench_guest_ops", (self.vm, _MIX[op.kind], "unknown"))
                self.timeline.count(("ops", _MIX[op.kind], "unknown"), now)
            else:
                self._fail(_MIX[op.kind], f"posted write {status}: {p.get('reason', status)}", now)
        for kind, (intended, n) in ok.items():
            # one WRITE_DONE settles many ops: their latencies are recorded in one go
            lab = (self.vm, kind, "guest")
            self.stats.hist(TRAP_LATENCY, lab).record_many([now - t for t in intended], n)
            self.stats.inc(TRAPS, lab, sum(n))
            self.stats.inc("gvtbench_guest_ops", (self.vm, _MIX[kind], "completed"), len(n))
            self.timeline.count(("ops", _MIX[kind], "completed"), now, len(n))
            self.completed += len(n)
        if p["n_errors"] and self.hostile is None:
            for e in p["errors"][:4]:
                self._fail_reason(f"mediator refused a write: {e}")
        self.emit(*told)

    def _settle_gpr(self, entry: list, status: str) -> None:
        entry[2] = status
        if status != "ok":
            return
        # an applied write hides every write to its register before it
        k = entry[3]
        hist = self.gpr_hist[k]
        i = next(j for j, e in enumerate(hist) if e is entry)
        self.gpr_base[k] = entry[1]
        del hist[:i + 1]

    def boot_and_start(self, load: bool, spec: dict | None, now: int = 0) -> Iterator[Any]:
        """Boot if not booted yet, then (load) start the load: when boot ended, or `now` if the
        guest had booted before."""
        start_at = now
        try:
            if self.state in ("idle", "failed"):
                pv = yield from self.boot()
                start_at = self.last_reply_at
            else:
                pv = dict(self.pv)
        except GvtError as err:
            self.boot_error = err.text
            self.state = "failed"
            if self.launcher:       # the run ends now, with why, not when it gives up waiting
                self.emit(Post(self.launcher, "PROGRESS", {"report": self.progress()}, vgpu=self.vm))
            raise
        if load:
            self.start(start_at, spec)
        return pv

    def probe(self, reads: int, now: int) -> Iterator[Any]:
        """Boot if not booted yet, then time `reads` trapped MMIO reads of the PV version
        register, one after another: each waits for the one before, so with no load running
        their latency is the path's own (the launcher's yardstick for a loaded run's p99)."""
        if not 1 <= reads <= PROBE_READS_MAX:
            raise GvtError("EINVAL", f"PROBE reads must be 1..{PROBE_READS_MAX}, not {reads}")
        if self.state in ("idle", "failed"):
            yield from self.boot_and_start(False, None, now)
        t = self.last_reply_at if self.last_reply_at > now else now
        lat: list[int] = []
        for _ in range(reads):
            yield from self._read(pvinfo.BASE + pvinfo.VERSION_MAJOR_OFF, 4)
            lat.append(self.last_reply_at - t)
            t = self.last_reply_at
        lat.sort()
        return {"reads": reads, "p50_us": lat[len(lat) // 2] / 1e3, "min_us": lat[0] / 1e3,
                "max_us": lat[-1] / 1e3}

    # ---- verdict -----------------------------------------------------------------------------
    def mapped_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Global GGTT index and value of every entry this guest wrote (last value)."""
        if self.map is None:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64)
        (a0, an), (h0, hn) = self.ranges
        glob = np.concatenate([np.arange(a0, a0 + an), np.arange(h0, h0 + hn)])
        written = (self.map != 0) & ~self._loose()
        return glob[written], self.map[written]

    def loose_entries(self) -> np.ndarray:
        """Global GGTT index of each entry whose last write's outcome is not known to be ok."""
        if self.map is None:
            return np.zeros(0, np.int64)
        (a0, an), (h0, hn) = self.ranges
        glob = np.concatenate([np.arange(a0, a0 + an), np.arange(h0, h0 + hn)])
        return glob[self._loose()]

    def _loose(self) -> np.ndarray:
        if len(self.map_loose) != len(self.map):      # a map set from outside (a test, a boot)
            self.map_loose = np.zeros(len(self.map), dtype=bool)
        return self.map_loose

    def _probe_plan(self, nonce: int) -> tuple[np.ndarray, np.ndarray, list]:
        """The mapped entries, and (position, gm, gfn, offset in page, token) for each present
        entry with a RAM gfn; entries that share a gfn get different 16-byte slots of the page."""
        idx, vals = self.mapped_entries()
        present = gtt.present(vals)
        gfns = gtt.frame_of(vals).astype(np.int64)
        use = present & (gfns < self.ram_frames)
        slots: dict[int, int] = {}
        plan = []
        for pos, i, g in zip(np.flatnonzero(use).tolist(), idx[use].tolist(), gfns[use].tolist()):
            k = slots.get(g, 0)
            if k >= PAGE_SIZE // TOKEN.size:
                continue
            slots[g] = k + 1
            plan.append((pos, gtt.gm_of(i) + 16 * k, g, 16 * k, TOKEN.pack(self.vm, i, nonce)))
        return idx, vals, plan

    def _plan_of(self, nonce: int) -> tuple[np.ndarray, np.ndarray, list]:
        if self._plan is None or self._plan[0] != nonce:
            self._plan = (nonce, self._probe_plan(nonce))
        return self._plan[1]

    def verify_plan(self, nonce: int, page: int) -> dict:
        """One page of the plan: the mapped entries in [page * PLAN_PAGE, ...) and their probes.
        VERIFY of the same nonce checks exactly these probes."""
        idx, vals, plan = self._plan_of(nonce)
        a, b = page * PLAN_PAGE, (page + 1) * PLAN_PAGE
        return {"entries_idx": idx[a:b].astype("<u8").tobytes(),
                "entries_val": vals[a:b].astype("<u8").tobytes(),
                "probes": [[gm, tok] for pos, gm, _g, _o, tok in plan if a <= pos < b],
                "pages": max(1, -(-len(idx) // PLAN_PAGE)), "ram_frames": self.ram_frames,
                # on the first page: the entries the ledger may not hold the guest to
                "loose_idx": self.loose_entries().astype("<u8").tobytes() if page == 0 else b""}

    def verify(self, nonce: int) -> Iterator[Any]:
        """After the gpu wrote each probe token through GM, read them back from guest RAM."""
        _idx, _vals, plan = self._plan_of(nonce)
        ops = [[g * PAGE_SIZE + o, TOKEN.size] for _pos, _gm, g, o, _t in plan]
        got: list[bytes] = []
        for i in range(0, len(ops), VERIFY_CHUNK):
            got += yield Call(self.hv, "GPA_READ", {"ops": ops[i:i + VERIFY_CHUNK]}, vgpu=self.vm)
        bad = [(gm, tok, data) for (_pos, gm, _g, _o, tok), data in zip(plan, got) if data != tok]
        return {"probes": len(plan), "landed": len(plan) - len(bad),
                "misses": [f"GM {gm:#x}: expected {tok.hex()}, guest RAM has {data.hex()}"
                           for gm, tok, data in bad[:8]]}

    def report(self, now: int) -> dict:
        return {"vm": self.vm, "state": self.state, "issued": self.issued, "completed": self.completed,
                "failed": self.failed, "unknown": self.unknown, "pending": self._inflight(),
                "mismatches": self.mismatches, "fail_reasons": dict(self.fail_reasons),
                "faulting_pages": len(self.ram.faulting), "outside_probes": self.outside_probes,
                "irqs": self.irqs, "boot_error": self.boot_error, "pv": self.pv,
                "vgpu_losses": self.vgpu_losses,
                "workloads": self.wl.report(), "workload_latency": self.workload_latency(),
                "elapsed_s": (now - self.t0) / 1e9 if self.t0 else 0.0,
                "latency": self.latency(), "traced": self.traced,
                "timeline": self.timeline.to_dict(now if self.t0 else None),
                "hostile": self.hostile.report() if self.hostile is not None else None}

    def latency(self) -> dict[str, dict]:
        """Latency of this load run (since START) by trap kind: p50/p99/p99.9 in us."""
        out = {}
        for lab, h in self.stats.families[TRAP_LATENCY].values.items():
            base = self._latency_base.get(lab[1])
            run = h.minus(base) if base is not None else h
            if run.n:
                out[lab[1]] = run.summary_us()
        return out

    def workload_latency(self) -> dict[str, dict]:
        """Workload latency by engine: p50/p99/p99.9 in us."""
        fam = self.stats.families[WORKLOAD_LATENCY].values
        return {lab[1]: h.summary_us() for lab, h in fam.items() if h.n}

    def progress(self) -> dict:
        return {"vm": self.vm, "issued": self.issued, "completed": self.completed, "failed": self.failed,
                "unknown": self.unknown, "state": self.state}


def _register_values(base: int, before: list[list]) -> set[int]:
    """The values a read may return, given the writes to its register before it, oldest first,
    as [w, value, outcome, gpr] (outcome None: not known yet) after the newest write known applied,
    whose value is `base`."""
    allowed: set[int] = set()
    for _w, val, outcome, _k in reversed(before):
        if outcome == "failed":
            continue                # never applied
        allowed.add(val)
        if outcome == "ok":
            return allowed          # applied: it hides the writes before it
    allowed.add(base)
    return allowed
