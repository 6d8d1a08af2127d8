"""Which vGPU owns the GPU, and for how long (gvt/sched_policy.c). A policy is an ops table, as
the kernel's intel_gvt_sched_policy_ops: init, clean, init_vgpu, clean_vgpu, start_schedule,
stop_schedule, and schedule (intel_gvt_schedule, run at each tick of the policy's timer and when
the scheduler asks for it: a workload queued, or one completed while a switch waits).

TimeSlice (the default, tbs_sched_*): the whole GPU belongs to one vGPU at a time.
- A 1 ms timer (GVT_DEFAULT_TIME_SLICE). The owner is charged the time it has owned the GPU
  since it was last charged (vgpu_update_timeslice), busy or not, as the kernel charges it.
- Every 100 ms (GVT_TS_BALANCE_PERIOD_MS) gvt_balance_timeslice: at stage 0 of every 10 each
  vGPU on the run queue gets 100 ms x weight / total weight afresh (what was left or owed is
  forgotten); at the other stages that much is added to what it has, so a debt (a vGPU that
  overran its slice because a switch waits for its work in flight) is paid back.
- find_busy_vgpu: the first vGPU of the LRU run queue with work queued and time left; a vGPU
  started less than 2 s ago (GVT_SCHED_VGPU_PRI_TIME) goes first whatever its time, and stays at
  the queue's head meanwhile. The chosen one moves to the tail. Nobody busy: the idle vGPU.
- try_to_schedule_next_vgpu: the switch happens only once no workload of the owner is in
  flight on any engine; until then the owner gets nothing more dispatched (need_reschedule).

RoundRobin (`policy = "round_robin"`, the bench's earlier one): no ownership; each idle engine
runs the head of the next vGPU's queue after the one it served last. Weights are ignored.

A vGPU takes part only while it is scheduled (the guest enabled execlists, and no reset stopped
it since: intel_vgpu_start_schedule / intel_vgpu_stop_schedule) and not in failsafe.

Times are the mediator's monotonic ns, passed in; this module reads no clock.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Protocol

if TYPE_CHECKING:
    from nodes.mediator.scheduler import WorkloadScheduler, Workload
    from nodes.mediator.vgpu import VGpu

GVT_DEFAULT_TIME_SLICE_NS = 1_000_000
GVT_TS_BALANCE_PERIOD_NS = 100_000_000
GVT_TS_BALANCE_STAGE_NUM = 10
GVT_SCHED_VGPU_PRI_TIME_NS = 2_000_000_000
POLICIES = ("timeslice", "round_robin")


class IdleVgpu:
    """The kernel's idle vGPU (id 0): owns the GPU when nobody has work; it has no workloads and
    is never charged time."""
    id = 0
    weight = 0

    def __repr__(self) -> str:
        return "idle vGPU"


IDLE = IdleVgpu()


def has_pending_workload(vgpu: VGpu) -> bool:
    """vgpu_has_pending_workload: a workload on any engine's queue not yet taken by the GPU."""
    return any(q and q[0].state == "queued" for q in vgpu.queues.values())


def schedulable(vgpu: VGpu) -> bool:
    return vgpu.sched_active and vgpu.failsafe is None


class SchedPolicy(Protocol):
    """intel_gvt_sched_policy_ops, plus what the bench's scheduler asks of a policy."""
    name: str
    whole_gpu: bool          # one vGPU owns every engine at a time (switch when none in flight)

    def init(self, sched: WorkloadScheduler, now: int) -> None: ...
    def clean(self) -> None: ...
    def init_vgpu(self, vgpu: VGpu) -> None: ...
    def clean_vgpu(self, vgpu: VGpu) -> None: ...
    def start_schedule(self, vgpu: VGpu, now: int) -> None: ...
    def stop_schedule(self, vgpu: VGpu) -> None: ...
    def schedule(self, now: int, timer: bool) -> None: ...
    def pick(self, engine: str, vgpus: Iterable[VGpu]) -> Workload | None: ...
    def next_tick(self) -> int | None: ...
    def shares(self) -> dict[int, dict]: ...


class VgpuSchedData:
    """struct vgpu_sched_data."""
    __slots__ = ("vgpu", "weight", "active", "pri_sched", "pri_time", "sched_in_time",
                 "sched_time", "left_ts", "allocated_ts")

    def __init__(self, vgpu: VGpu) -> None:
        self.vgpu = vgpu
        self.weight = vgpu.weight
        self.active = False
        self.pri_sched = False
        self.pri_time = 0
        self.sched_in_time = 0
        self.sched_time = 0         # ns it has owned the GPU, all told
        self.left_ts = 0            # ns of its slice left; negative: a debt
        self.allocated_ts = 0


class TimeSlice:
    name = "timeslice"
    whole_gpu = True

    def __init__(self, period_ns: int = GVT_DEFAULT_TIME_SLICE_NS,
                 balance_ns: int = GVT_TS_BALANCE_PERIOD_NS,
                 pri_time_ns: int = GVT_SCHED_VGPU_PRI_TIME_NS) -> None:
        self.period, self.balance_period, self.pri_time_ns = period_ns, balance_ns, pri_time_ns
        self.sched: WorkloadScheduler | None = None
        self.data: dict[int, VgpuSchedData] = {}
        self.runq: list[VgpuSchedData] = []     # lru_runq_head: least recently chosen first
        self.expire_time = 0
        self.stage_check = 0
        self.timer: int | None = None           # the hrtimer's next expiry (None: not started)
        self.balances = 0

    # ---- the ops table ---------------------------------------------------------------------
    def init(self, sched: WorkloadScheduler, now: int) -> None:         # tbs_sched_init
        self.sched = sched

    def clean(self) -> None:                                            # tbs_sched_clean
        self.timer = None

    def init_vgpu(self, vgpu: VGpu) -> None:                            # tbs_sched_init_vgpu
        self.data[vgpu.id] = VgpuSchedData(vgpu)

    def clean_vgpu(self, vgpu: VGpu) -> None:                           # tbs_sched_clean_vgpu
        d = self.data.pop(vgpu.id, None)
        if d is not None and d.active:
            self.runq.remove(d)
        if not self.data:
            self.timer = None

    def start_schedule(self, vgpu: VGpu, now: int) -> None:            # tbs_sched_start_schedule
        d = self.data[vgpu.id]
        if d.active:                            # on the run queue already
            return
        # a new vGPU goes first for a while (the kernel's start-up boost), from the queue's head
        d.pri_time = now + self.pri_time_ns
        d.pri_sched = self.pri_time_ns > 0
        self.runq.insert(0, d)
        if self.timer is None:
            self.timer = now + self.period
        d.active = True

    def stop_schedule(self, vgpu: VGpu) -> None:                        # tbs_sched_stop_schedule
        d = self.data.get(vgpu.id)
        if d is None:
            return
        if d.active:
            self.runq.remove(d)
        d.active = False
        sched = self.sched
        if sched.next_vgpu is vgpu:
            sched.next_vgpu = None
        if sched.current_vgpu is vgpu:
            # stop dispatching its work; the GPU has no owner until the next schedule
            self.update_timeslice(vgpu, sched.now)
            sched.need_reschedule = True
            sched.current_vgpu = None

    # ---- intel_gvt_schedule ------------------------------------------------------------------
    def schedule(self, now: int, timer: bool) -> None:
        """`timer`: the 1 ms timer fired (INTEL_GVT_REQUEST_SCHED), so the balance may be due;
        else an event asked for a schedule (INTEL_GVT_REQUEST_EVENT_SCHED)."""
        if timer:
            if now >= self.expire_time:
                # a timer that slept while nobody had work makes up the balances it missed
                # (a stage-0 reset among them forgets what came before, so ten do it all)
                missed = 1 + (now - self.expire_time) // self.balance_period if self.expire_time else 1
                for _ in range(min(missed, GVT_TS_BALANCE_STAGE_NUM)):
                    self.balance_timeslice()
                self.expire_time = now + self.balance_period
            # hrtimer_add_expires_ns: the next expiry one period on (a tick that came late
            # does not make the ones after it come early)
            self.timer = max((self.timer or now) + self.period, now + 1)
        self.update_timeslice(self.sched.current_vgpu, now)
        self.sched_func(now)

    def update_timeslice(self, vgpu: VGpu | IdleVgpu | None, now: int) -> None:
        """vgpu_update_timeslice: charge the owner the time since it was last charged."""
        if vgpu is None or vgpu is IDLE:
            return
        d = self.data.get(vgpu.id)
        if d is None:
            return
        delta = now - d.sched_in_time
        d.sched_time += delta
        d.left_ts -= delta
        d.sched_in_time = now

    def balance_timeslice(self) -> None:
        """gvt_balance_timeslice."""
        stage = self.stage_check % GVT_TS_BALANCE_STAGE_NUM
        self.stage_check += 1
        self.balances += 1
        if stage == 0:
            total = sum(d.weight for d in self.runq)
            for d in self.runq:
                # the kernel divides first, then multiplies (ktime_divns, then * weight)
                d.allocated_ts = self.balance_period // total * d.weight if total else 0
                d.left_ts = d.allocated_ts
        else:
            for d in self.runq:
                d.left_ts += d.allocated_ts

    def find_busy_vgpu(self, now: int) -> VgpuSchedData | None:
        for d in self.runq:
            if not has_pending_workload(d.vgpu) or not schedulable(d.vgpu):
                continue
            if d.pri_sched:
                if now < d.pri_time:
                    return d
                d.pri_sched = False
            if d.left_ts > 0:
                return d
        return None

    def sched_func(self, now: int) -> None:
        """tbs_sched_func."""
        sched = self.sched
        if self.runq and sched.next_vgpu is None:
            d = self.find_busy_vgpu(now)
            if d is not None:
                sched.next_vgpu = d.vgpu
                if not d.pri_sched:
                    self.runq.remove(d)         # the one chosen goes to the LRU tail
                    self.runq.append(d)
            else:
                sched.next_vgpu = IDLE
        if sched.next_vgpu is not None:
            self.try_to_schedule_next_vgpu(now)

    def try_to_schedule_next_vgpu(self, now: int) -> None:
        sched = self.sched
        if sched.next_vgpu is sched.current_vgpu:
            sched.next_vgpu = None              # it keeps the GPU; chosen again next time
            return
        sched.need_reschedule = True            # nothing more of the owner's is dispatched
        if any(w is not None for w in sched.inflight.values()):
            return                              # a workload of the owner still runs
        self.update_timeslice(sched.current_vgpu, now)
        nxt = sched.next_vgpu
        if nxt is not IDLE:
            self.data[nxt.id].sched_in_time = now
        sched.switch_to(nxt)
        sched.next_vgpu = None
        sched.need_reschedule = False

    # ---- what the scheduler asks ---------------------------------------------------------------
    def pick(self, engine: str, vgpus: Iterable[VGpu]) -> Workload | None:
        """pick_next_workload: the owner's next workload for this engine, unless a switch waits."""
        sched = self.sched
        cur = sched.current_vgpu
        if sched.need_reschedule or cur is None or cur is IDLE or not schedulable(cur):
            return None
        q = cur.queues[engine]
        return q[0] if q and q[0].state == "queued" else None

    def next_tick(self) -> int | None:
        return self.timer

    def shares(self) -> dict[int, dict]:
        total_w = sum(d.weight for d in self.data.values()) or 1
        total_t = sum(d.sched_time for d in self.data.values()) or 1
        return {vid: {"weight_share": d.weight / total_w, "gpu_share": d.sched_time / total_t,
                      "gpu_ns": d.sched_time, "left_ns": d.left_ts}
                for vid, d in sorted(self.data.items())}


class RoundRobin:
    name = "round_robin"
    whole_gpu = False

    def __init__(self) -> None:
        self.last: dict[str, int] = {}      # engine -> the vGPU it served last
        self.sched: WorkloadScheduler | None = None

    def init(self, sched: WorkloadScheduler, now: int) -> None:
        self.sched = sched

    def clean(self) -> None:
        return None

    def init_vgpu(self, vgpu: VGpu) -> None:
        return None

    def clean_vgpu(self, vgpu: VGpu) -> None:
        return None

    def start_schedule(self, vgpu: VGpu, now: int) -> None:
        return None

    def stop_schedule(self, vgpu: VGpu) -> None:
        return None

    def schedule(self, now: int, timer: bool) -> None:
        return None

    def next_tick(self) -> int | None:
        return None

    def pick(self, engine: str, vgpus: Iterable[VGpu]) -> Workload | None:
        """The head of the next vGPU's queue after the one this engine served last that has one
        waiting."""
        ready = [v for v in vgpus if schedulable(v) and v.queues[engine]
                 and v.queues[engine][0].state == "queued"]
        if not ready:
            return None
        ready.sort(key=lambda v: v.id)
        last = self.last.get(engine, -1)
        nxt = next((v for v in ready if v.id > last), ready[0])
        self.last[engine] = nxt.id
        return nxt.queues[engine][0]

    def shares(self) -> dict[int, dict]:
        return {}


def make_policy(name: str, start_boost_ns: int | None = None) -> SchedPolicy:
    if name == "timeslice":
        return TimeSlice(pri_time_ns=GVT_SCHED_VGPU_PRI_TIME_NS if start_boost_ns is None
                         else start_boost_ns)
    if name == "round_robin":
        return RoundRobin()
    raise ValueError(f"scheduler policy {name!r}: one of {', '.join(POLICIES)}")
