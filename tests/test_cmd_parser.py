"""The command parser, rule by rule, each test named after the kernel function whose rule it
follows (gvt/cmd_parser.c, scheduler.c): real mediator, hypervisor and gpu cores on the
in-memory network, a guest's objects made by hand (tests/gpuwork.py), and the exact commands
each rule is about. Every rule test shows what lands (or does not) in memory and registers."""
from __future__ import annotations

import struct

import pytest

from gpuwork import HandGuest, csb_entries, seqno_store
from harness import started_bench
from nodes.hw import PAGE_SIZE, bar0, cmd, gtt, lrc, regs
from nodes.mediator import cmd_parser, handlers
from nodes.mediator.translate import get_translator

SEQ = lrc.HWS_SEQNO_INDEX


@pytest.fixture(params=["c", "python"])
def bench(request):
    yield from started_bench(translate=get_translator(request.param))


@pytest.fixture
def hg(bench):
    return HandGuest(bench, 1)


def seqno(hg, engine="rcs"):
    return hg.u32(hg.hwsp_gpa(engine) + 4 * SEQ)


def refused(res, code):
    return res["n_errors"] == 1 and res["errors"][0].startswith(code), res["errors"]


def failsafe(hg):
    return hg.vgpu.failsafe


# ---- a workload the parser accepts runs, and its events are raised --------------------------------
def test_an_elsp_submission_ending_in_an_8_byte_write_runs_once(bench, hg):
    # an 8-byte write is two dword writes (the port, and the register after it); the port's
    # hook submits, and its scheduler work runs as a task, answered call by call
    res = hg.submit(seqno_store(hg, 9), qword_last=True)
    assert res["n_errors"] == 0, res["errors"]
    assert seqno(hg) == 9 and failsafe(hg) is None
    assert hg.vgpu.workloads["completed"] == 1
    assert bench.net.engines["mediator"].internal_errors == []


def test_a_clean_ring_runs_and_its_user_interrupt_is_raised_by_the_mediator(bench, hg):
    res = hg.submit(seqno_store(hg, 7) + [cmd.MI_USER_INTERRUPT.header()])
    assert res["n_errors"] == 0
    assert seqno(hg) == 7 and failsafe(hg) is None
    # the parser patched the command to MI_NOOP (cmd_handler_mi_user_interrupt): the gpu ran none
    assert bench.gpu.engines["rcs"].user_irqs == 0
    iir = hg.vgpu.vregs[regs.gt_iir(0)]
    assert iir & regs.GT_USER_INTERRUPT and iir & regs.GT_CONTEXT_SWITCH
    assert hg.ring_head() == hg.ctx().tail


# ---- command_scan / cmd_parser_exec: unknown commands and lengths ---------------------------------
def test_command_scan_refuses_an_unknown_command_ebadrqc_and_the_vgpu_enters_failsafe(bench, hg):
    res = hg.submit([0x1F800000, 0] + seqno_store(hg, 1))     # MI opcode 0x3f: no such command
    assert refused(res, "EBADRQC") and "unknown command 0x1f800000" in res["errors"][0]
    assert failsafe(hg) == handlers.FAILSAFE_GUEST_ERR
    assert seqno(hg) == 0 and not hg.vgpu.queues["rcs"]
    assert bench.mediator.vgpus[2].failsafe is None            # other vGPUs are untouched


def test_command_scan_refuses_a_render_command_on_the_blitter(bench, hg):
    pc = [cmd.PIPE_CONTROL.header(cmd.LEN_PIPE_CONTROL), 0, 0, 0, 0, 0]
    res = hg.submit(pc + seqno_store(hg, 1, "bcs"), engine="bcs")
    assert refused(res, "EBADRQC") and failsafe(hg) == handlers.FAILSAFE_GUEST_ERR


@pytest.mark.parametrize("name", ["MI_SEMAPHORE_WAIT", "MI_STORE_DATA_INDEX", "MI_UPDATE_GTT",
                                  "MI_CLFLUSH", "MI_REPORT_PERF_COUNT", "MI_OP_2E",
                                  "MI_CONDITIONAL_BATCH_BUFFER_END"])
def test_unexpected_cmd_is_ebadrqc(bench, hg, name):
    c = cmd.BY_NAME[name]
    n = c.fixed or 4
    res = hg.submit([c.header(n)] + [0] * (n - 1))
    assert refused(res, "EBADRQC") and f"unexpected {name}" in res["errors"][0]
    assert failsafe(hg) == handlers.FAILSAFE_GUEST_ERR


def test_gvt_check_valid_cmd_length_refuses_a_wrong_fixed_length_efault(bench, hg):
    lrr = cmd.MI_LOAD_REGISTER_REG
    res = hg.submit([lrr.header(4), 0x2000 + regs.RING_MI_MODE, 0x2000 + regs.RING_MI_MODE, 0])
    assert refused(res, "EFAULT") and "one valid length is 3" in res["errors"][0]


def test_a_command_running_past_the_ring_tail_is_refused(bench, hg):
    c = hg.ctx()
    res = hg.submit([cmd.MI_STORE_DATA_IMM.header(6)] + [0] * 1)   # 2 of its 6 dwords in the ring
    assert refused(res, "EFAULT") and "past the ring tail" in res["errors"][0]
    assert c.tail


# ---- cmd_reg_handler: registers in commands ------------------------------------------------------
def test_cmd_reg_handler_lri_of_another_vgpus_fence_is_ebadrqc_and_the_fence_is_untouched(bench, hg):
    """The audit's reproduction: an LRI in vGPU 1's ring that names vGPU 2's physical fence.
    Fences are not F_CMD_ACCESS; the workload never reaches the gpu."""
    v2 = bench.mediator.vgpus[2]
    fence = regs.fence_lo(v2.part.fence_base)
    before = bench.gpu.regs.get(fence, 0)
    res = hg.submit(cmd.lri((fence, 0xDEAD0001)) + seqno_store(hg, 1))
    assert refused(res, "EBADRQC") and "F_CMD_ACCESS" in res["errors"][0]
    assert bench.gpu.regs.get(fence, 0) == before and failsafe(hg) == handlers.FAILSAFE_GUEST_ERR
    assert v2.failsafe is None


def test_cmd_reg_handler_lri_outside_the_mmio_range_is_efault(bench, hg):
    res = hg.submit(cmd.lri((bar0.MMIO_SIZE, 1)))
    assert refused(res, "EFAULT") and "outside the MMIO range" in res["errors"][0]


def test_cmd_reg_handler_lri_of_a_cmd_access_register_goes_to_the_gpu(bench, hg):
    mi_mode = regs.ring("rcs", regs.RING_MI_MODE)
    res = hg.submit(cmd.lri((mi_mode, 0x00010001)) + seqno_store(hg, 2))
    assert res["n_errors"] == 0 and seqno(hg) == 2
    assert bench.gpu.regs[mi_mode] == 0x00010001
    assert mi_mode not in hg.vgpu.vregs or hg.vgpu.vregs[mi_mode] != 0x00010001  # vregs unchanged


def test_cmd_reg_handler_gfx_mode_by_lri_is_patched_as_the_trapped_write_is(bench, hg):
    """F_CMD_WRITE_PATCH: the value goes through ring_mode_mmio_write: bit 0's masked enable is
    stripped from the command the gpu runs, the vGPU goes to failsafe, the vreg keeps its value."""
    mode = regs.ring("rcs", regs.RING_MODE)
    vreg = hg.vgpu.vregs[mode]
    val = regs.masked_enable(regs.GFX_MODE_BIT0 | regs.GFX_MODE_RUN_LIST_ENABLE)
    res = hg.submit(cmd.lri((mode, val)) + seqno_store(hg, 3))
    assert res["n_errors"] == 0                 # the kernel accepts and patches it
    assert failsafe(hg) == handlers.FAILSAFE_UNSUPPORTED_GUEST
    assert hg.vgpu.vregs[mode] == vreg
    # failsafe: the workload is queued but never dispatched, and fails
    assert not hg.vgpu.queues["rcs"] and hg.vgpu.workloads["failed"] == 1


def test_cmd_reg_handler_gfx_mode_patch_reaches_the_gpu_without_bit0(bench):
    """The patched value (bit 0 stripped) is what the gpu stores, seen on a vGPU that is not
    sent to failsafe by the write (PPGTT enable only)."""
    b = bench
    hg = HandGuest(b, 1)
    mode = regs.ring("rcs", regs.RING_MODE)
    res = hg.submit(cmd.lri((mode, regs.masked_enable(regs.GFX_MODE_PPGTT_ENABLE))) + seqno_store(hg, 4))
    assert res["n_errors"] == 0 and seqno(hg) == 4
    assert b.gpu.regs[mode] == regs.masked_enable(regs.GFX_MODE_PPGTT_ENABLE)


def test_force_nonpriv_write_keeps_the_slot_when_the_register_is_off_the_whitelist(bench, hg):
    slot = regs.ring("rcs", regs.RING_FORCE_TO_NONPRIV)
    fence = regs.fence_lo(0)
    res = hg.submit(cmd.lri((slot, fence), (slot + 4, 0x2340)) + seqno_store(hg, 5))
    assert res["n_errors"] == 0 and seqno(hg) == 5
    assert bench.gpu.regs.get(slot, 0) == 0                   # patched to the vreg's value (0)
    assert bench.gpu.regs[slot + 4] == 0x2340                 # CL_PRIMITIVES_COUNT is whitelisted


@pytest.mark.parametrize("kind", ["srm", "lrm"])
def test_cmd_reg_handler_srm_and_lrm_name_only_l3sqcreg4_and_0x21f0(bench, hg, kind):
    c = cmd.MI_STORE_REGISTER_MEM if kind == "srm" else cmd.MI_LOAD_REGISTER_MEM
    va = hg.data_va(0)
    res = hg.submit([c.header(4), regs.ring("rcs", regs.RING_MI_MODE), va & 0xFFFFFFFF, 0])
    assert refused(res, "EPERM") and failsafe(hg) is None     # EPERM: refused, not unhealthy
    hg.skip()
    res = hg.submit([c.header(4), regs.L3SQCREG4, va & 0xFFFFFFFF, 0] + seqno_store(hg, 6))
    assert res["n_errors"] == 0 and seqno(hg) == 6


def test_cmd_reg_handler_lrr_is_eperm_on_gen9(bench, hg):
    r = regs.ring("rcs", regs.RING_MI_MODE)
    res = hg.submit([cmd.MI_LOAD_REGISTER_REG.header(3), r, r])
    assert refused(res, "EPERM")


def test_cmd_reg_handler_lri_of_the_mocs_updates_the_vreg(bench, hg):
    res = hg.submit(cmd.lri((0xC800, 0x3B)) + seqno_store(hg, 8))
    assert res["n_errors"] == 0 and hg.vgpu.vregs[0xC800] == 0x3B and bench.gpu.regs[0xC800] == 0x3B


def test_cmd_pdp_mmio_update_handler_loads_the_shadow_root_of_a_guest_ppgtt(bench, hg):
    """An LRI of PDP0 with the guest's PML4 is patched with the shadow root; the gpu's live PDP
    is the shadow's, never the guest-physical one."""
    pml4 = hg.pml4 << 12
    udw, ldw = regs.ring("rcs", regs.pdp_udw(0)), regs.ring("rcs", regs.pdp_ldw(0))
    va = hg.data_va(1, 8)
    ring = cmd.lri((udw, pml4 >> 32), (ldw, pml4 & 0xFFFFFFFF)) + cmd.store_dword(va, 0x5A5A) + \
        seqno_store(hg, 9)
    res = hg.submit(ring)
    assert res["n_errors"] == 0 and seqno(hg) == 9
    assert hg.u32(hg.data_gpa(1, 8)) == 0x5A5A                 # the store went through the shadow
    assert bench.gpu.regs[ldw] == hg.mm.shadow_pdps()[0] & 0xFFFFFFFF != pml4 & 0xFFFFFFFF


def test_cmd_pdp_mmio_update_handler_refuses_a_root_that_is_no_ppgtt_of_the_vgpu(bench, hg):
    udw, ldw = regs.ring("rcs", regs.pdp_udw(0)), regs.ring("rcs", regs.pdp_ldw(0))
    res = hg.submit(cmd.lri((udw, 0), (ldw, 0x1234000)))
    assert refused(res, "EINVAL") and failsafe(hg) is None


# ---- cmd_address_audit: GGTT addresses in commands ----------------------------------------------
def test_cmd_address_audit_store_into_host_gm_is_efault(bench, hg):
    """The audit's reproduction: MI_STORE_DATA_IMM with the GGTT bit into host GM, where the
    mediator's own shadow page tables are mapped. Refused; the pool is untouched."""
    v = hg.vgpu
    some_table = next(iter(v.ppgtt.tables.values()))
    target = bench.mediator.pool.gm_of(some_table.mfn)
    before = bytes(bench.mediator.pool.page(some_table.mfn))
    res = hg.submit(cmd.store_dword(target, 0x0BADC0DE, ggtt=True))
    assert refused(res, "EFAULT") and "malicious MI_STORE_DATA_IMM" in res["errors"][0]
    assert bytes(bench.mediator.pool.page(some_table.mfn)) == before
    assert failsafe(hg) == handlers.FAILSAFE_GUEST_ERR
    assert bench.net.call("launcher", "mediator", "POOL_CHECK")["violations"] == 0


def test_cmd_address_audit_store_into_another_vgpus_partition_is_efault(bench, hg):
    other = bench.mediator.vgpus[2].part.aperture_base
    res = hg.submit(cmd.store_dword(other, 1, ggtt=True))
    assert refused(res, "EFAULT")


def test_cmd_address_audit_covers_the_whole_qword_of_a_store(bench, hg):
    """The last dword of the aperture and one past it: a qword store there is refused."""
    p = hg.vgpu.part
    last = p.aperture_base + p.aperture_size - 4
    c = cmd.MI_STORE_DATA_IMM
    res = hg.submit([c.header(cmd.LEN_STORE_QWORD, cmd.USE_GGTT | cmd.STORE_QWORD),
                     last, 0, 1, 2])
    assert refused(res, "EFAULT")


@pytest.mark.parametrize("make", [
    lambda a: cmd.atomic(a, "inc", ggtt=True),
    lambda a: [cmd.MI_STORE_REGISTER_MEM.header(4, cmd.USE_GGTT), regs.L3SQCREG4, a, 0],
    lambda a: [cmd.MI_LOAD_REGISTER_MEM.header(4, cmd.USE_GGTT), regs.L3SQCREG4, a, 0],
    lambda a: [cmd.MI_FLUSH_DW.header(cmd.LEN_FLUSH_DW, 1 << cmd.FLUSH_DW_OP_SHIFT),
               a | cmd.FLUSH_DW_USE_GGTT, 0, 7],
    lambda a: [cmd.PIPE_CONTROL.header(cmd.LEN_PIPE_CONTROL), cmd.PC_GLOBAL_GTT | 1 << cmd.PC_POST_SYNC_SHIFT,
               a, 0, 7, 0],
], ids=["MI_ATOMIC", "SRM", "LRM", "MI_FLUSH_DW", "PIPE_CONTROL"])
def test_cmd_address_audit_of_every_ggtt_addressed_command(bench, hg, make):
    host = bench.mediator.pool.gm_of(bench.mediator.vgpus[2].scratch.page[3])
    res = hg.submit(make(host))
    assert refused(res, "EFAULT") and "malicious" in res["errors"][0]
    assert not any(bench.mediator.pool.page(bench.mediator.vgpus[2].scratch.page[3]))


def test_ggtt_addressed_commands_inside_the_partition_run(bench, hg):
    """The same commands at the vGPU's own status page pass the audit and land."""
    hws = hg.hwsp_gm()
    ring = cmd.atomic(hws + 0x100, "inc", ggtt=True) + \
        [cmd.MI_FLUSH_DW.header(cmd.LEN_FLUSH_DW, 1 << cmd.FLUSH_DW_OP_SHIFT),
         (hws + 0x108) | cmd.FLUSH_DW_USE_GGTT, 0, 0x77] + \
        [cmd.PIPE_CONTROL.header(cmd.LEN_PIPE_CONTROL), cmd.PC_GLOBAL_GTT | 1 << cmd.PC_POST_SYNC_SHIFT,
         hws + 0x110, 0, 0x88, 0] + seqno_store(hg, 10)
    res = hg.submit(ring)
    assert res["n_errors"] == 0 and seqno(hg) == 10
    g = hg.hwsp_gpa()
    assert (hg.u32(g + 0x100), hg.u32(g + 0x108), hg.u32(g + 0x110)) == (1, 0x77, 0x88)


def test_pipe_control_store_data_index_is_patched_to_the_status_page(bench, hg):
    ring = [cmd.PIPE_CONTROL.header(cmd.LEN_PIPE_CONTROL),
            cmd.PC_GLOBAL_GTT | cmd.PC_STORE_DATA_INDEX | 1 << cmd.PC_POST_SYNC_SHIFT, 0x120, 0,
            0x99, 0] + seqno_store(hg, 11)
    res = hg.submit(ring)
    assert res["n_errors"] == 0 and seqno(hg) == 11
    assert hg.u32(hg.hwsp_gpa() + 0x120) == 0x99


def test_store_data_index_past_the_status_page_is_efault(bench, hg):
    ring = [cmd.MI_FLUSH_DW.header(cmd.LEN_FLUSH_DW, cmd.FLUSH_DW_STORE_INDEX | 1 << cmd.FLUSH_DW_OP_SHIFT),
            0x1000 | cmd.FLUSH_DW_USE_GGTT, 0, 1]
    res = hg.submit(ring)
    assert refused(res, "EFAULT") and "past the page" in res["errors"][0]


# ---- cmd_handler_mi_batch_buffer_start ------------------------------------------------------------
def test_a_privileged_batch_is_scanned_copied_and_its_user_interrupt_found(bench, hg):
    """A batch from the GGTT is privileged: read, scanned (its MI_USER_INTERRUPT becomes the
    mediator's event), copied to the host pool, and the ring's batch start retargeted at the
    copy; the guest's own batch page is not what the gpu runs."""
    hws = hg.hwsp_gm()
    words = cmd.store_dword(hws + 0x200, 0xC0FFEE, ggtt=True) + \
        [cmd.MI_USER_INTERRUPT.header(), cmd.MI_BATCH_BUFFER_END.header()]
    hg.put_batch(3, words)
    gm = hg.batch_ggtt(3)
    res = hg.submit(cmd.bb_start(gm, ppgtt=False) + seqno_store(hg, 12))
    assert res["n_errors"] == 0 and seqno(hg) == 12
    assert hg.u32(hg.hwsp_gpa() + 0x200) == 0xC0FFEE
    assert hg.vgpu.vregs[regs.gt_iir(0)] & regs.GT_USER_INTERRUPT
    assert bench.gpu.engines["rcs"].user_irqs == 0             # patched out of the copy too


def test_a_privileged_batch_with_a_bad_command_is_refused(bench, hg):
    hg.put_batch(4, cmd.lri((regs.fence_lo(0), 1)) + [cmd.MI_BATCH_BUFFER_END.header()])
    res = hg.submit(cmd.bb_start(hg.batch_ggtt(4), ppgtt=False))
    assert refused(res, "EBADRQC") and "batch GM" in res["errors"][0]


def test_a_batch_start_outside_the_vgpus_gm_is_efault(bench, hg):
    res = hg.submit(cmd.bb_start(bench.mediator.vgpus[2].part.hidden_base, ppgtt=False))
    assert refused(res, "EFAULT") and failsafe(hg) == handlers.FAILSAFE_GUEST_ERR


def test_a_second_level_batch_straight_from_the_ring_is_efault(bench, hg):
    hg.put_batch(5, [cmd.MI_BATCH_BUFFER_END.header()])
    res = hg.submit(cmd.bb_start(hg.batch_ggtt(5), ppgtt=False, second_level=True))
    assert refused(res, "EFAULT") and "second-level batch straight from the ring" in res["errors"][0]


def test_a_batch_start_in_a_second_level_batch_is_efault(bench, hg):
    inner = hg.batch_ggtt(6)
    hg.put_batch(6, cmd.bb_start(inner, ppgtt=False) + [cmd.MI_BATCH_BUFFER_END.header()])
    hg.put_batch(7, cmd.bb_start(inner, ppgtt=False, second_level=True) + [cmd.MI_BATCH_BUFFER_END.header()])
    res = hg.submit(cmd.bb_start(hg.batch_ggtt(7), ppgtt=False))
    assert refused(res, "EFAULT") and "in a second-level batch" in res["errors"][0]


def test_second_level_and_chained_privileged_batches_are_followed(bench, hg):
    hws = hg.hwsp_gm()
    g8, g9, g10 = hg.batch_ggtt(8), hg.batch_ggtt(9), hg.batch_ggtt(10)
    hg.put_batch(10, cmd.store_dword(hws + 0x300, 3, ggtt=True) + [cmd.MI_BATCH_BUFFER_END.header()])
    hg.put_batch(9, cmd.store_dword(hws + 0x304, 2, ggtt=True) + [cmd.MI_BATCH_BUFFER_END.header()])
    # batch 8: a second-level batch (9), then a store, then a chain to 10 (batch 8 ends there)
    hg.put_batch(8, cmd.bb_start(g9, ppgtt=False, second_level=True)
                 + cmd.store_dword(hws + 0x308, 1, ggtt=True) + cmd.bb_start(g10, ppgtt=False)
                 + cmd.store_dword(hws + 0x30C, 0xBAD, ggtt=True))
    res = hg.submit(cmd.bb_start(g8, ppgtt=False) + seqno_store(hg, 13))
    assert res["n_errors"] == 0 and seqno(hg) == 13
    g = hg.hwsp_gpa()
    assert [hg.u32(g + 0x300 + 4 * k) for k in range(4)] == [3, 2, 1, 0]


def test_a_privileged_batch_chaining_to_itself_is_bounded_e2big(bench, hg):
    gm = hg.batch_ggtt(11)
    hg.put_batch(11, cmd.bb_start(gm, ppgtt=False))
    res = hg.submit(cmd.bb_start(gm, ppgtt=False))
    assert refused(res, "E2BIG") and failsafe(hg) is None


def test_a_non_privileged_batch_is_not_copied_and_runs_in_place(bench, hg):
    """batch_buffer_needs_scan: a PPGTT batch is neither scanned nor copied; the gpu reads the
    guest's page, through the shadow PPGTT, when it runs it."""
    words = cmd.store_dword(hg.data_va(2), 0x1111) + [cmd.MI_BATCH_BUFFER_END.header()]
    va = hg.put_batch(12, words)
    used = bench.mediator.pool.used[1]
    res = hg.submit(cmd.bb_start(va, ppgtt=True) + seqno_store(hg, 14), run=False)
    assert res["n_errors"] == 0
    w = hg.vgpu.queues["rcs"][0]
    assert not w.ring.batches                                  # nothing to place but the ring
    bench.net.run()
    assert seqno(hg) == 14 and hg.u32(hg.data_gpa(2)) == 0x1111
    assert bench.mediator.pool.used[1] == used                 # every shadow page came back


def test_a_non_privileged_batch_with_a_ggtt_store_faults_that_context_only(bench, hg):
    """Hardware keeps a non-privileged batch from the GGTT: the context stops, the workload
    fails with the gpu's reason, no CSB reaches the guest, nothing is written; the vGPU is not
    sent to failsafe (the kernel never scanned the batch)."""
    v2 = bench.mediator.vgpus[2]
    target = v2.part.aperture_base
    va = hg.put_batch(13, cmd.store_dword(target, 0x0BADC0DE, ggtt=True) + [cmd.MI_BATCH_BUFFER_END.header()])
    before = csb_entries(hg.vgpu)
    res = hg.submit(cmd.bb_start(va, ppgtt=True) + seqno_store(hg, 15))
    assert res["n_errors"] == 0 and seqno(hg) == 0
    reasons = list(hg.vgpu.fail_reasons)
    assert any("privilege violation" in r and "GGTT" in r for r in reasons), reasons
    assert failsafe(hg) is None and hg.vgpu.workloads["failed"] == 1
    # schedule-in was emulated (idle_to_active) but no completion came for it
    after = csb_entries(hg.vgpu)
    assert [e for e in after if e not in before] == [(lrc.CSB_IDLE_TO_ACTIVE, 0)]


def test_a_non_privileged_batch_lri_of_a_privileged_register_faults(bench, hg):
    fence = regs.fence_lo(bench.mediator.vgpus[2].part.fence_base)
    va = hg.put_batch(14, cmd.lri((fence, 0xFFFF)) + [cmd.MI_BATCH_BUFFER_END.header()])
    hg.submit(cmd.bb_start(va, ppgtt=True))
    assert bench.gpu.regs.get(fence, 0) == 0
    assert any("privilege violation: MI_LOAD_REGISTER_IMM" in r for r in hg.vgpu.fail_reasons)


def test_a_non_privileged_batch_may_write_a_register_force_to_nonpriv_names(bench, hg):
    """The engine's FORCE_TO_NONPRIV slots (set by a privileged LRI, itself audited) open a
    register to non-privileged batches."""
    slot = regs.ring("rcs", regs.RING_FORCE_TO_NONPRIV)
    va = hg.put_batch(15, cmd.lri((0x2340, 0x42)) + [cmd.MI_BATCH_BUFFER_END.header()])
    res = hg.submit(cmd.lri((slot, 0x2340)) + cmd.bb_start(va, ppgtt=True) + seqno_store(hg, 16))
    assert res["n_errors"] == 0 and seqno(hg) == 16 and bench.gpu.regs[0x2340] == 0x42


# ---- prepare_workload: schedule-in comes after shadowing --------------------------------------------
def test_a_workload_refused_by_the_scan_gets_no_csb_entry(bench, hg):
    """The audit's finding: schedule-in was emulated before shadowing, so a guest whose batch
    started outside its GM got an idle_to_active for a context that never ran."""
    before = csb_entries(hg.vgpu)
    hg.submit(cmd.bb_start(bench.mediator.vgpus[2].part.aperture_base, ppgtt=False))
    assert csb_entries(hg.vgpu) == before


def test_a_scan_at_dispatch_fails_the_workload_and_sends_the_vgpu_to_failsafe(bench, hg):
    """Only the first workload of a queue is scanned at the ELSP write (intel_vgpu_create_workload);
    a second one is scanned when it is dispatched: its error fails it there (no CSB), drops the
    engine's queue, and EFAULT sends the vGPU to failsafe (workload_thread)."""
    long = hg.put_batch(16, [cmd.MI_NOOP.header()] * 8 + [cmd.MI_BATCH_BUFFER_END.header()])
    first = hg.submit(cmd.bb_start(long, ppgtt=True) + seqno_store(hg, 17), run=False)
    assert first["n_errors"] == 0 and len(hg.vgpu.queues["rcs"]) == 1
    second = hg.submit(cmd.store_dword(bench.mediator.pool.gm_of(1), 1, ggtt=True), k=1, run=False)
    assert second["n_errors"] == 0                              # created, not scanned yet
    bench.net.run()
    assert seqno(hg) == 17
    assert failsafe(hg) == handlers.FAILSAFE_GUEST_ERR
    assert any(r.startswith("shadowing failed: EFAULT") for r in hg.vgpu.fail_reasons)


def test_an_lri_whose_pairs_do_not_fill_it_is_refused(bench, hg):
    res = hg.submit([cmd.MI_LOAD_REGISTER_IMM.header(4), regs.ring("rcs", regs.RING_MI_MODE), 0, 0])
    assert refused(res, "EFAULT") and "pairs do not fill it" in res["errors"][0]


def test_a_status_page_index_store_before_the_guest_set_its_status_page(bench):
    hg = HandGuest(bench, 1, engines=("rcs",))
    hg.vgpu.hws_pga.clear()
    ring = [cmd.MI_FLUSH_DW.header(cmd.LEN_FLUSH_DW, cmd.FLUSH_DW_STORE_INDEX | 1 << cmd.FLUSH_DW_OP_SHIFT),
            0x40 | cmd.FLUSH_DW_USE_GGTT, 0, 1]
    res = hg.submit(ring)
    assert refused(res, "EFAULT") and "never set rcs's RING_HWS_PGA" in res["errors"][0]


def test_the_parser_table_covers_every_rule_and_every_command_it_names():
    assert {c.rule for c in cmd.TABLE if c.rule} <= cmd_parser.RULES
    for c in cmd.TABLE:
        assert cmd.lookup(c.header(c.fixed or None) if not c.const_len else c.header(), next(iter(c.engines))) is c
    assert struct.pack("<I", cmd.MI_BATCH_BUFFER_START.header(cmd.LEN_BB_START)) == \
        struct.pack("<I", 0x18800001)                          # MI_BATCH_BUFFER_START_GEN8
    assert PAGE_SIZE and gtt


def test_a_workload_failed_outside_an_engine_interrupt_is_counted_with_its_latency(bench, hg):
    """workloads_total{stage=mediator} counted only the workloads an ENGINE_IRQ ended, and failed
    ones got a latency of 0: a failure at dispatch is counted where it happens, with its time."""
    from nodes.metrics import WORKLOAD_LATENCY, WORKLOADS
    long = hg.put_batch(16, [cmd.MI_NOOP.header()] * 8 + [cmd.MI_BATCH_BUFFER_END.header()])
    hg.submit(cmd.bb_start(long, ppgtt=True) + seqno_store(hg, 1), run=False)
    hg.submit([0x1F800000, 0], k=1, run=False)          # scanned at dispatch: EBADRQC
    bench.net.now += 5_000_000
    bench.net.run()
    st = bench.mediator.stats
    assert st.families[WORKLOADS].values[(1, "rcs", "mediator", "failed")] == 1
    assert st.families[WORKLOADS].values[(1, "rcs", "mediator", "completed")] == 1
    h = st.families[WORKLOAD_LATENCY].values[(1, "rcs", "mediator")]
    assert h.n == 2 and h.summary_us()["p50_us"] > 1000
