"""The time-slice scheduler (gvt/sched_policy.c) and the engine MMIO context switch
(gvt/mmio_context.c), sans-IO: each test is named after the kernel function whose rule it checks.
The policy runs on the real WorkloadScheduler with stand-in vGPUs (what the policy reads of a
vGPU: id, weight, its engine queues, whether it is scheduled); the MMIO switch runs on the real
mediator and gpu cores over the in-memory network."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from gpuwork import HandGuest, seqno_store
from harness import started_bench
from nodes.hw import cmd, lrc, regs
from nodes.mediator import mmio_context
from nodes.mediator.sched_policy import (GVT_SCHED_VGPU_PRI_TIME_NS, IDLE, RoundRobin, TimeSlice,
                                         make_policy)
from nodes.mediator.scheduler import WorkloadScheduler

MS = 1_000_000


def vgpu(vid: int, weight: int, work: int = 0):
    q = [SimpleNamespace(state="queued") for _ in range(work)]
    return SimpleNamespace(id=vid, weight=weight, queues={"rcs": q, "bcs": []}, sched_active=True,
                           failsafe=None)


def setup(*vgpus, start: int = 0, boost: bool = False):
    sched = WorkloadScheduler(None, "gpu", engines=("rcs", "bcs"))
    pol = sched.policy
    assert isinstance(pol, TimeSlice)
    for v in reversed(vgpus):   # each started one goes to the run queue's head (list_add)
        sched.add_vgpu(v)
        pol.start_schedule(v, start)
        if not boost:
            pol.data[v.id].pri_sched = False
    return sched, pol


def test_the_time_slice_policy_is_the_default_and_round_robin_an_option():
    assert isinstance(WorkloadScheduler(None, "gpu").policy, TimeSlice)
    assert isinstance(make_policy("round_robin"), RoundRobin)
    with pytest.raises(ValueError, match="one of timeslice, round_robin"):
        make_policy("fifo")


def test_gvt_balance_timeslice_gives_each_vgpu_100ms_times_its_weight_share():
    _, pol = setup(vgpu(1, 2), vgpu(2, 4), vgpu(3, 8), vgpu(4, 16))
    pol.balance_timeslice()                     # stage 0
    # ktime_divns(100 ms, total) * weight: the division first, as the kernel does it
    assert [pol.data[i].allocated_ts for i in (1, 2, 3, 4)] == [100 * MS // 30 * w for w in (2, 4, 8, 16)]
    assert all(d.left_ts == d.allocated_ts for d in pol.data.values())


def test_gvt_balance_timeslice_carries_the_debt_and_forgets_it_at_stage_zero():
    _, pol = setup(vgpu(1, 1), vgpu(2, 1))
    pol.balance_timeslice()                     # stage 0: 50 ms each
    d = pol.data[1]
    d.left_ts = -30 * MS                        # overran its slice by 30 ms
    pol.balance_timeslice()                     # stage 1: the debt is paid from the new slice
    assert d.left_ts == 20 * MS
    for _ in range(8):                          # stages 2..9
        pol.balance_timeslice()
    d.left_ts = -70 * MS
    pol.balance_timeslice()                     # stage 0 again: allocated afresh, debt forgotten
    assert d.left_ts == 50 * MS


def test_vgpu_update_timeslice_charges_the_owner_for_ownership_time():
    sched, pol = setup(vgpu(1, 1, work=1), vgpu(2, 1))
    pol.schedule(0, timer=True)
    assert sched.current_vgpu.id == 1
    left = pol.data[1].left_ts
    pol.schedule(3 * MS, timer=False)
    assert pol.data[1].sched_time == 3 * MS and pol.data[1].left_ts == left - 3 * MS
    assert pol.data[2].sched_time == 0          # the others are charged nothing


def test_find_busy_vgpu_takes_the_least_recently_run_with_work_and_time_left():
    a, b, c = vgpu(1, 1, work=1), vgpu(2, 1, work=1), vgpu(3, 1)
    sched, pol = setup(a, b, c)
    pol.balance_timeslice()
    assert pol.find_busy_vgpu(0).vgpu is a      # the queue's head, which has work
    pol.sched_func(0)
    assert sched.current_vgpu is a and [d.vgpu.id for d in pol.runq] == [2, 3, 1]  # a to the tail
    pol.data[2].left_ts = 0                     # b has work but no time left
    assert pol.find_busy_vgpu(0).vgpu is a
    a.queues["rcs"].clear()
    assert pol.find_busy_vgpu(0) is None        # c has time but no work


def test_tbs_sched_func_gives_the_idle_vgpu_the_gpu_when_nobody_has_work():
    a = vgpu(1, 1, work=1)
    sched, pol = setup(a, vgpu(2, 1))
    pol.schedule(0, timer=True)
    assert sched.current_vgpu is a
    a.queues["rcs"].clear()
    pol.schedule(1 * MS, timer=True)
    assert sched.current_vgpu is IDLE
    assert pol.data[1].sched_time == 1 * MS     # charged up to the switch; the idle vGPU never


def test_tbs_sched_start_schedule_puts_a_new_vgpu_first_for_two_seconds():
    old = vgpu(1, 1, work=1)
    sched, pol = setup(old)
    pol.balance_timeslice()
    new = vgpu(2, 1, work=1)
    sched.add_vgpu(new)
    pol.start_schedule(new, 0)
    pol.data[2].left_ts = -10 * MS              # out of time: the boost still picks it
    assert pol.runq[0].vgpu is new and pol.find_busy_vgpu(1 * MS).vgpu is new
    pol.sched_func(1 * MS)
    assert pol.runq[0].vgpu is new              # a boosted vGPU stays at the head
    # past GVT_SCHED_VGPU_PRI_TIME the boost ends, and its (negative) slice counts again
    assert pol.find_busy_vgpu(GVT_SCHED_VGPU_PRI_TIME_NS + 1).vgpu is old
    assert not pol.data[2].pri_sched


def test_try_to_schedule_next_vgpu_waits_until_nothing_of_the_owner_is_in_flight():
    a, b = vgpu(1, 1, work=2), vgpu(2, 1, work=1)
    sched, pol = setup(a, b)
    pol.schedule(0, timer=True)
    assert sched.current_vgpu is a
    sched.inflight["bcs"] = SimpleNamespace(vgpu=a)     # a's workload runs on another engine
    pol.schedule(1 * MS, timer=True)            # b is next, but a's work is in flight
    assert sched.next_vgpu is b and sched.current_vgpu is a and sched.need_reschedule
    assert pol.pick("rcs", sched.vgpus.values()) is None    # a gets nothing more meanwhile
    sched.inflight["bcs"] = None                # its interrupt came: the switch happens
    pol.schedule(2 * MS, timer=False)
    assert sched.current_vgpu is b and not sched.need_reschedule and sched.switches == 2
    assert pol.pick("rcs", sched.vgpus.values()) is b.queues["rcs"][0]
    assert pol.data[1].sched_time == 2 * MS     # a paid for the wait too


def test_intel_vgpu_stop_schedule_takes_the_gpu_from_its_owner():
    a = vgpu(1, 1, work=1)
    sched, pol = setup(a, vgpu(2, 1, work=1))
    pol.schedule(0, timer=True)
    assert sched.current_vgpu is a
    pol.stop_schedule(a)
    assert sched.current_vgpu is None and sched.need_reschedule and pol.data[1] not in pol.runq


def test_tbs_timer_fn_fires_every_millisecond_while_a_vgpu_has_work_queued():
    a = vgpu(1, 1)
    sched, pol = setup(a, vgpu(2, 1))
    assert pol.next_tick() is not None and sched.next_tick() is None     # nothing queued: asleep
    a.queues["rcs"].append(SimpleNamespace(state="queued"))
    sched.queued += 1                           # as submit() counts what it queues
    t = sched.next_tick()
    assert t is not None
    pol.schedule(t, timer=True)                 # what on_timer runs before it dispatches
    assert sched.next_tick() == t + MS and sched.current_vgpu is a
    a.sched_active = False                      # a vGPU not scheduled has nothing to time
    assert sched.next_tick() is None


def test_the_shares_follow_the_weights_when_every_vgpu_is_saturated():
    """Driven tick by tick, each workload 0.3 ms of GPU, every vGPU always busy: over 2 s (after
    the start-up boost) each vGPU's ownership share is its weight share."""
    vs = [vgpu(i + 1, w, work=1) for i, w in enumerate((2, 4, 8, 16))]
    sched, pol = setup(*vs)
    now = 0
    running = None
    while now < 2000 * MS:
        pol.schedule(now, timer=now % MS == 0)
        cur = sched.current_vgpu
        if running is None and cur not in (None, IDLE) and not sched.need_reschedule:
            running = cur
            sched.inflight["rcs"] = SimpleNamespace(vgpu=cur)
        now += 300_000 if running is not None else 100_000
        if running is not None:
            sched.inflight["rcs"] = None
            running = None
            pol.schedule(now, timer=False)       # complete_current_workload asks for a schedule
    pol.schedule(now, timer=False)
    for vid, sh in pol.shares().items():
        assert abs(sh["gpu_share"] - sh["weight_share"]) < 0.05, (vid, sh)


# ---- intel_gvt_switch_mmio over the real cores --------------------------------------------------
@pytest.fixture
def bench():
    yield from started_bench()


def test_intel_gvt_switch_mmio_keeps_one_vgpus_register_from_another(bench):
    """vGPU 1's commands write CACHE_MODE_1 (a masked register on the list); when vGPU 2 runs
    next, the gpu holds vGPU 2's value, vGPU 1's is saved in its vreg (mask half cleared), and
    it comes back when vGPU 1 runs again."""
    b = bench
    hg1, hg2 = HandGuest(b, 1), HandGuest(b, 2)
    reg = 0x7004
    assert any(m.reg == reg and m.mask for m in mmio_context.BY_ENGINE["rcs"])
    res = hg1.submit(cmd.lri((reg, 0xFFFF0000 | 0x5A)) + seqno_store(hg1, 1))
    assert res["n_errors"] == 0
    assert b.gpu.regs.get(reg, 0) & 0xFFFF == 0x5A
    res = hg2.submit(seqno_store(hg2, 1))
    assert res["n_errors"] == 0
    v1, v2 = b.mediator.vgpus[1], b.mediator.vgpus[2]
    assert v1.vregs[reg] == 0x5A                # saved from the gpu, the mask half cleared
    assert b.gpu.regs.get(reg, 0) & 0xFFFF == v2.vregs.get(reg, 0) & 0xFFFF == 0
    res = hg1.submit(seqno_store(hg1, 2), k=0)
    assert res["n_errors"] == 0 and b.gpu.regs[reg] & 0xFFFF == 0x5A
    sched = b.mediator.scheduler
    assert sched.mmio.switches >= 3 and not sched.mmio.save_failures
    assert sched.engine_owner["rcs"] is v1


# ---- the gpu's cost model and the host's hang detection --------------------------------------------
def _bench(**kw):
    gen = started_bench(**kw)
    return gen, next(gen)


def test_a_workload_takes_its_cost_in_virtual_time_on_the_gpu():
    """nodes.gpu.cost: a 3DPRIMITIVE of V vertices keeps the engine busy V x vertex_ns: the
    workload's completion comes that much after its dispatch."""
    gen, b = _bench()
    try:
        hg = HandGuest(b, 1)
        vertex_ns = b.gpu.cost.vertex_ns
        assert vertex_ns > 0
        t0 = b.net.now
        va = hg.put_batch(0, cmd.primitive(5_000_000) + [cmd.MI_BATCH_BUFFER_END.header()])
        res = hg.submit(cmd.bb_start(va) + seqno_store(hg, 7))
        assert res["n_errors"] == 0 and hg.u32(hg.hwsp_gpa() + 4 * lrc.HWS_SEQNO_INDEX) == 7
        took = b.net.now - t0
        assert took >= 5_000_000 * vertex_ns        # 10 ms of GPU at the default cost
        assert b.gpu.engines["rcs"].busy_ns >= 5_000_000 * vertex_ns
        assert b.mediator.vgpus[1].engine_ns["rcs"] >= 5_000_000 * vertex_ns
    finally:
        gen.close()


def test_complete_current_workload_fails_a_never_ending_workload_after_the_host_resets_its_engine():
    """A batch that chains to itself spins until its engine is reset; the host's hang detection
    (HOST_HANG_TIMEOUT) resets it, the workload fails with the hang as its reason and no
    completion, and the other vGPU's work runs after it."""
    gen, b = _bench(hang_timeout_ns=50 * MS)
    try:
        hg1, hg2 = HandGuest(b, 1), HandGuest(b, 2)
        va = hg1.put_batch(0, [])
        hg1.put_batch(0, cmd.bb_start(va))          # a batch whose one command starts itself
        res = hg1.submit(cmd.bb_start(va) + seqno_store(hg1, 1))
        assert res["n_errors"] == 0
        v1 = b.mediator.vgpus[1]
        assert v1.workloads["failed"] == 1 and v1.workloads["completed"] == 0
        assert any("GPU hang: the host reset rcs" in r for r in v1.fail_reasons), v1.fail_reasons
        assert b.mediator.scheduler.host_resets == 1 and b.gpu.engines["rcs"].spins == 1
        res = hg2.submit(seqno_store(hg2, 5))
        assert res["n_errors"] == 0 and b.mediator.vgpus[2].workloads["completed"] == 1
    finally:
        gen.close()


def test_switch_mmio_keeps_a_guests_mmio_write_made_while_it_owned_the_engine(bench):
    """vGPU 1 turns execlists off (GFX_MODE, by MMIO) while it still owns the render engine; the
    save at the switch to vGPU 2 finds the register as the restore left it, so the vreg keeps
    the guest's write and vGPU 1's next ELSP is refused (the hostile elsp-before-execlists)."""
    b = bench
    hg1, hg2 = HandGuest(b, 1), HandGuest(b, 2)
    assert hg1.submit(seqno_store(hg1, 1))["n_errors"] == 0
    mode = regs.ring("rcs", regs.RING_MODE)
    b.trap_write(1, mode, 4, regs.masked_disable(regs.GFX_MODE_RUN_LIST_ENABLE))
    b.net.run()
    assert hg2.submit(seqno_store(hg2, 1))["n_errors"] == 0     # the switch: vGPU 1 saved
    assert b.mediator.scheduler.engine_owner["rcs"] is b.mediator.vgpus[2]
    assert not b.mediator.vgpus[1].vregs[mode] & regs.GFX_MODE_RUN_LIST_ENABLE
    res = hg1.submit(seqno_store(hg1, 2), run=False)
    assert res["n_errors"] == 1 and "before the guest enabled execlists" in res["errors"][0]
