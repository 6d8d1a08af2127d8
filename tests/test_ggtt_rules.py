"""GGTT write emulation, rule by rule, as the kernel's gtt.c has it (emulate_ggtt_mmio_write,
intel_vgpu_reset_ggtt, failsafe_emulate_mmio_rw), against the real hypervisor and gpu cores.

Every test runs once per translator (C and the pure-Python twin): the rules are the mediator's,
the translator is how it applies them.
"""
from __future__ import annotations

import numpy as np
import pytest

from harness import Bench, make_bench, started_bench
from nodes.hw import MiB, PAGE_SHIFT, gtt
from nodes.mediator.core import GFN_HOLE_FRAMES
from nodes.mediator.translate import get_translator

RAM_FRAMES = 16384                                  # each VM's RAM in the bench layout
FLAGS = gtt.PTE_PRESENT | gtt.PTE_RW | 0x0C0        # a present entry with some flag bits 11:1
HIGH_FLAG = 1 << 52                                 # a flag bit above the address (bits 63:46)


@pytest.fixture(params=["c", "python"])
def bench(request):
    """The bench, once with each translator."""
    yield from started_bench(translate=get_translator(request.param))


def scratch_alone(b: Bench) -> int:
    """The scratch frame and nothing else: a not-present or half-written entry's host entry."""
    return gtt.encode(b.mediator.scratch_mfn, 0)


def reset_entry(b: Bench) -> int:
    """Scratch page, present: every entry of a new vGPU (intel_vgpu_reset_ggtt)."""
    return gtt.encode(b.mediator.scratch_mfn, gtt.PTE_PRESENT)


def mapped(b: Bench, vm: int, gfn: int, flags: int = FLAGS) -> int:
    """The host entry a present guest entry (gfn, flags) must become."""
    return gtt.encode(int(b.p2m(vm)[gfn]), flags)


def ggtt(b: Bench, vgpu: int):
    return b.mediator.vgpus[vgpu].ggtt


def test_bench_partitions_are_what_the_facts_give(bench):
    # host keeps 128 MiB low and 384 MiB high; first fit hands the next ranges out in order
    p1, p2 = bench.mediator.vgpus[1].part, bench.mediator.vgpus[2].part
    assert (p1.aperture_base, p1.aperture_size) == (128 * MiB, 64 * MiB)
    assert (p1.hidden_base, p1.hidden_size) == (1024 * MiB + 384 * MiB, 384 * MiB)
    assert (p2.aperture_base, p2.hidden_base) == (192 * MiB, 1792 * MiB)
    assert bench.mediator.scratch_mfn == bench.layout.host.base_mfn


# ---- 1. only aligned 4- and 8-byte accesses; nothing past BAR0 --------------------------------------
def test_rule1_narrow_or_misaligned_gtt_writes_are_refused(bench):
    i = bench.ap_index(1, 8)
    phys = bench.gpu.ggtt.copy()
    res = bench.trap_writes(1, [(gtt.offset_of(i), 2, 0xFFFF), (gtt.offset_of(i) + 2, 4, 1),
                                (gtt.offset_of(i), 1, 1), (gtt.offset_of(i) + 4, 8, 5)])
    assert res["n_errors"] == 4 and res["n"] == 4
    assert np.array_equal(bench.gpu.ggtt, phys)
    assert bench.ggtt_read(1, i) == 0


@pytest.mark.parametrize("size", [4, 8])
def test_rule1_gtt_write_past_bar0_is_efault(bench, size):
    """Past the end of BAR0 is a fault for 8-byte writes as for 4-byte ones, never 'dropped'."""
    dropped = ggtt(bench, 1).counts["dropped"]
    res = bench.trap_write(1, 16 * MiB, size, 1)
    assert res["n_errors"] == 1 and "EFAULT" in res["errors"][0]
    assert ggtt(bench, 1).counts["dropped"] == dropped


# ---- 2. writes outside the partition are dropped -------------------------------------------------
@pytest.mark.parametrize("where", ["host_low", "below_aperture", "past_aperture", "other_vgpu",
                                   "past_hidden", "host_high"])
def test_rule2_write_outside_partition_is_dropped(bench, where):
    idx = {
        "host_low": 5,
        "below_aperture": bench.ap_index(1, -1),
        "past_aperture": bench.ap_index(1, 64 * MiB >> PAGE_SHIFT),     # vGPU 2's first page
        "other_vgpu": bench.hi_index(2, 7),
        "past_hidden": bench.hi_index(1, 384 * MiB >> PAGE_SHIFT),
        "host_high": (1024 * MiB >> PAGE_SHIFT) + 3,
    }[where]
    before = bench.phys(idx)
    dropped = ggtt(bench, 1).counts["dropped"]
    bench.ggtt_write(1, idx, gtt.encode(10, FLAGS))
    assert bench.phys(idx) == before
    assert ggtt(bench, 1).counts["dropped"] == dropped + 1
    assert bench.ggtt_read(1, idx) == 0
    assert bench.trap_read(1, gtt.offset_of(idx) + 4, 4) == 0
    bench.ggtt_write_half(1, idx, False, gtt.encode(10, FLAGS) & 0xFFFFFFFF)
    assert bench.phys(idx) == before
    assert ggtt(bench, 1).counts["dropped"] == dropped + 2
    assert not bench.calls_of("GFN_PIN")


def test_rule2_read_of_another_vgpus_entry_returns_0(bench):
    idx = bench.ap_index(2, 3)
    bench.ggtt_write(2, idx, gtt.encode(42, FLAGS))
    assert bench.ggtt_read(2, idx) == gtt.encode(42, FLAGS)
    assert bench.ggtt_read(1, idx) == 0
    assert bench.phys(idx) == mapped(bench, 2, 42)


def test_rule2_partition_edges_are_inside(bench):
    n_ap, n_hi = 64 * MiB >> PAGE_SHIFT, 384 * MiB >> PAGE_SHIFT
    edges = [bench.ap_index(1), bench.ap_index(1, n_ap - 1), bench.hi_index(1),
             bench.hi_index(1, n_hi - 1)]
    for k, idx in enumerate(edges):
        bench.ggtt_write(1, idx, gtt.encode(100 + k, FLAGS))
        assert bench.phys(idx) == mapped(bench, 1, 100 + k)
    assert ggtt(bench, 1).counts["dropped"] == 0


# ---- 3. half writes ---------------------------------------------------------------------------
@pytest.mark.parametrize("high_first", [False, True], ids=["low_then_high", "high_then_low"])
def test_rule3_half_writes_scratch_until_both_halves(bench, high_first):
    g = 4321
    i = bench.hi_index(1, 33)
    entry = gtt.encode(g, FLAGS) | HIGH_FLAG
    halves = [(False, entry & 0xFFFFFFFF), (True, entry >> 32)]
    if high_first:
        halves.reverse()
    first, second = halves

    bench.ggtt_write_half(1, i, *first)
    assert bench.phys(i) == scratch_alone(bench)
    assert not bench.calls_of("GFN_PIN")
    # the guest entry holds just the half written
    assert bench.ggtt_read(1, i) == first[1] << (32 if first[0] else 0)

    bench.ggtt_write_half(1, i, *second)
    assert bench.phys(i) == mapped(bench, 1, g) | HIGH_FLAG
    assert bench.pinned_gfns_in_calls() == [g]
    assert bench.ggtt_read(1, i) == entry


def test_rule3_half_write_builds_the_entry_from_zero(bench):
    """emulate_ggtt_mmio_write starts the entry at 0: a half write over a mapped entry leaves
    the other half of the guest entry 0, not the old value's half."""
    g = 99
    i = bench.ap_index(1, 40)
    bench.ggtt_write(1, i, gtt.encode(g, FLAGS) | HIGH_FLAG)
    bench.ggtt_write_half(1, i, False, gtt.encode(g + 1, FLAGS) & 0xFFFFFFFF)
    assert bench.ggtt_read(1, i) == gtt.encode(g + 1, FLAGS) & 0xFFFFFFFF      # high half 0
    assert bench.phys(i) == scratch_alone(bench)
    assert bench.hv.vms[1].pins[g] == 0                     # the old mapping let go of its pin
    bench.ggtt_write_half(1, i, True, 0)
    assert bench.phys(i) == mapped(bench, 1, g + 1)         # no HIGH_FLAG from the old entry


def test_rule3_same_half_again_replaces_the_pending_half_only(bench):
    i = bench.ap_index(1, 41)
    bench.ggtt_write_half(1, i, False, gtt.encode(7, FLAGS) & 0xFFFFFFFF)
    writes = len(bench.posts_of("MMIO_WRITE_BATCH"))
    bench.ggtt_write_half(1, i, False, gtt.encode(8, FLAGS) & 0xFFFFFFFF)
    assert len(bench.posts_of("MMIO_WRITE_BATCH")) == writes      # the host entry is left alone
    assert bench.ggtt_read(1, i) == gtt.encode(8, FLAGS) & 0xFFFFFFFF
    bench.ggtt_write_half(1, i, True, 0)
    assert bench.phys(i) == mapped(bench, 1, 8)


def test_rule3_a_whole_write_does_not_end_a_pending_half(bench):
    """An 8-byte write leaves the partial-entry list alone, so a later write of the other half
    is merged with the stale pending half, as in the kernel."""
    i = bench.ap_index(1, 42)
    bench.ggtt_write_half(1, i, False, gtt.encode(11, FLAGS) & 0xFFFFFFFF)
    bench.ggtt_write(1, i, gtt.encode(12, FLAGS))
    assert bench.phys(i) == mapped(bench, 1, 12)
    bench.ggtt_write_half(1, i, True, HIGH_FLAG >> 32)
    assert bench.phys(i) == mapped(bench, 1, 11) | HIGH_FLAG
    assert bench.ggtt_read(1, i) == gtt.encode(11, FLAGS) | HIGH_FLAG


# ---- 4. present entries: gfn -> mfn through a pin ------------------------------------------------
def test_rule4_present_entry_maps_through_p2m_and_pins_once(bench):
    g = 1234
    i, j = bench.ap_index(1, 10), bench.hi_index(1, 20)
    entry = gtt.encode(g, FLAGS)
    bench.ggtt_write(1, i, entry)
    want = mapped(bench, 1, g)
    assert bench.phys(i) == want
    assert want & ~gtt.ADDR_MASK == FLAGS                    # same flag bits, present kept
    assert gtt.frame_of(want) != g                           # the p2m is not the identity
    assert bench.pinned_gfns_in_calls() == [g]
    assert bench.hv.vms[1].pins[g] == 1
    assert bench.ggtt_read(1, i) == entry                    # the guest reads what it wrote
    bench.ggtt_write(1, j, gtt.encode(g, gtt.PTE_PRESENT))   # same gfn: from the cache
    assert bench.phys(j) == mapped(bench, 1, g, gtt.PTE_PRESENT)
    assert len(bench.calls_of("GFN_PIN")) == 1
    assert bench.hv.vms[1].pins[g] == 1
    bench.ggtt_write(1, i + 1, gtt.encode(g + 1, FLAGS))
    assert bench.pinned_gfns_in_calls() == [g, g + 1]


def test_rule4_one_batch_with_repeated_gfn_pins_it_once(bench):
    g = 777
    base = bench.ap_index(1, 100)
    bench.trap_writes(1, [(gtt.offset_of(base + k), 8, gtt.encode(g, FLAGS)) for k in range(5)])
    assert bench.pinned_gfns_in_calls() == [g]
    assert bench.hv.vms[1].pins[g] == 1
    assert [bench.phys(base + k) for k in range(5)] == [mapped(bench, 1, g)] * 5


def test_rule4_high_flag_bits_are_kept(bench):
    i = bench.ap_index(1, 11)
    bench.ggtt_write(1, i, gtt.encode(55, FLAGS) | HIGH_FLAG)
    assert bench.phys(i) == mapped(bench, 1, 55) | HIGH_FLAG


def test_rule4_later_write_in_one_batch_wins(bench):
    i = bench.ap_index(1, 12)
    bench.trap_writes(1, [(gtt.offset_of(i), 8, gtt.encode(60, FLAGS)),
                          (gtt.offset_of(i), 8, gtt.encode(61, FLAGS))])
    assert bench.phys(i) == mapped(bench, 1, 61)
    assert bench.ggtt_read(1, i) == gtt.encode(61, FLAGS)
    assert bench.hv.vms[1].pins[60] == 0
    assert bench.mediator.vgpus[1].pins.count() == 1
    bench.ggtt_write(1, i, 0)
    assert not bench.hv.vms[1].pins.any()
    assert bench.mediator.vgpus[1].pins.count() == 0


@pytest.mark.parametrize("gfn", [RAM_FRAMES, RAM_FRAMES + 17, RAM_FRAMES + GFN_HOLE_FRAMES - 1])
def test_rule4_failed_pin_gives_scratch_present(bench, gfn):
    i = bench.ap_index(1, 50)
    bench.ggtt_write(1, i, gtt.encode(gfn, FLAGS))
    assert bench.phys(i) == gtt.encode(bench.mediator.scratch_mfn, FLAGS)  # flags, present kept
    assert bench.pinned_gfns_in_calls() == [gfn]                    # the pin was tried...
    assert not bench.hv.vms[1].pins.any()                          # ...and failed
    assert bench.mediator.vgpus[1].pins.count() == 0
    bench.ggtt_write(1, i + 1, gtt.encode(gfn, FLAGS))             # remembered: no new call
    assert len(bench.calls_of("GFN_PIN")) == 1
    bench.trap_writes(1, [(gtt.offset_of(i), 8, 0), (gtt.offset_of(i + 1), 8, 0)])
    assert not bench.posts_of("GFN_UNPIN")                          # nothing to unpin


@pytest.mark.parametrize("gfn", [RAM_FRAMES + GFN_HOLE_FRAMES, 1 << 20, gtt.MAX_FRAME])
def test_rule4_gfn_far_beyond_ram_is_scratch_present_without_a_call(bench, gfn):
    i = bench.hi_index(1, 51)
    bench.ggtt_write(1, i, gtt.encode(gfn, FLAGS))
    assert bench.phys(i) == gtt.encode(bench.mediator.scratch_mfn, FLAGS)
    assert not bench.calls_of("GFN_PIN")


def test_rule4_pin_timeout_leaves_the_virtual_ggtt_and_the_shadow_unchanged(bench):
    """The guest entry is set only once the shadow update can no longer fail: a GFN_PIN that
    times out fails the access with both copies as they were."""
    i = bench.ap_index(1, 52)
    bench.ggtt_write(1, i, gtt.encode(5, FLAGS))
    before_phys, before_virt = bench.phys(i), bench.ggtt_read(1, i)
    bench.net.lose = lambda src, dst, env: env.kind == "REPLY" and src == "hypervisor"
    res = bench.trap_write(1, gtt.offset_of(i), 8, gtt.encode(6, FLAGS))
    bench.net.lose = None
    assert res["n_errors"] == 1 and "ETIMEDOUT" in res["errors"][0]
    assert bench.phys(i) == before_phys
    assert bench.ggtt_read(1, i) == before_virt


# ---- 5. not present ---------------------------------------------------------------------------
def test_rule5_not_present_entry_is_the_scratch_frame_alone(bench):
    """The host entry of a not-present guest entry is built from zero: the scratch frame, no
    guest flag bits, nothing in bits 63:46."""
    i = bench.ap_index(1, 60)
    before = ggtt(bench, 1).counts["not_present"]
    bench.ggtt_write(1, i, gtt.encode(300, FLAGS & ~gtt.PTE_PRESENT) | HIGH_FLAG)
    assert bench.phys(i) == scratch_alone(bench)
    assert not bench.calls_of("GFN_PIN")
    assert ggtt(bench, 1).counts["not_present"] == before + 1


# ---- 6. unpin, then flush ------------------------------------------------------------------------
def test_rule6_unmapping_unpins(bench):
    g = 2000
    i = bench.ap_index(1, 70)
    bench.ggtt_write(1, i, gtt.encode(g, FLAGS))
    assert bench.hv.vms[1].pins[g] == 1
    bench.ggtt_write(1, i, gtt.encode(g, 0))
    assert bench.unpinned_gfns_in_posts() == [g]
    assert bench.hv.vms[1].pins[g] == 0
    assert bench.mediator.vgpus[1].pins.count() == 0
    bench.ggtt_write(1, i, gtt.encode(g, FLAGS))
    assert bench.pinned_gfns_in_calls() == [g, g]
    assert bench.hv.vms[1].pins[g] == 1


def test_rule6_remapping_to_another_gfn_unpins_the_old_one(bench):
    i = bench.ap_index(1, 71)
    bench.ggtt_write(1, i, gtt.encode(10, FLAGS))
    bench.ggtt_write(1, i, gtt.encode(11, FLAGS))
    assert bench.unpinned_gfns_in_posts() == [10]
    assert bench.hv.vms[1].pins[10] == 0 and bench.hv.vms[1].pins[11] == 1


def test_rule6_shared_gfn_unpinned_only_after_last_entry(bench):
    g = 2001
    i, j = bench.ap_index(1, 80), bench.hi_index(1, 80)
    bench.ggtt_write(1, i, gtt.encode(g, FLAGS))
    bench.ggtt_write(1, j, gtt.encode(g, FLAGS))
    bench.ggtt_write(1, i, 0)
    assert not bench.posts_of("GFN_UNPIN")
    assert bench.phys(j) == mapped(bench, 1, g)
    bench.ggtt_write(1, j, 0)
    assert bench.unpinned_gfns_in_posts() == [g]
    assert bench.hv.vms[1].pins[g] == 0


def test_rule6_every_committed_batch_flushes(bench):
    f0 = bench.gpu.ggtt_flushes
    i = bench.ap_index(1, 90)
    bench.ggtt_write(1, i, gtt.encode(5, FLAGS))
    assert bench.gpu.ggtt_flushes == f0 + 1
    last = bench.net.sent("MMIO_WRITE", "mediator", "gpu")[-1]
    assert (last.payload["off"], last.payload["size"]) == (0x101008, 4)
    bench.trap_writes(1, [(gtt.offset_of(i + k), 8, gtt.encode(6 + k, FLAGS)) for k in range(4)])
    assert bench.gpu.ggtt_flushes == f0 + 2                 # one batch, one flush
    bench.clear_log()
    bench.ggtt_write(1, i, 0)                               # unmap: host entry, unpin, flush
    kinds = [e.kind for _s, _d, e in bench.net.log if e.kind != "REPLY"]
    assert kinds[-3:] == ["MMIO_WRITE_BATCH", "GFN_UNPIN", "MMIO_WRITE"]
    assert bench.gpu.ggtt_flushes == f0 + 3
    bench.ggtt_write_half(1, i, False, 1)                   # a half write commits scratch
    assert bench.gpu.ggtt_flushes == f0 + 4


# ---- 7. a new vGPU's partition is all scratch, present ---------------------------------------------
@pytest.mark.parametrize("translator", ["c", "python"])
def test_rule7_new_vgpu_partition_is_scratch_present(translator):
    b = make_bench(translate=get_translator(translator))
    try:
        b.setup([(1, "_8")])
        part = b.mediator.vgpus[1].part
        ap = slice(part.aperture_base >> 12, (part.aperture_base + part.aperture_size) >> 12)
        hi = slice(part.hidden_base >> 12, (part.hidden_base + part.hidden_size) >> 12)
        for s in (ap, hi):
            seg = b.gpu.ggtt[s]
            assert len(seg) and (seg == np.uint64(reset_entry(b))).all()
        g = b.mediator.vgpus[1].ggtt
        assert not g.vggtt.any()
        assert b.ggtt_read(1, ap.start) == 0 and b.ggtt_read(1, hi.stop - 1) == 0
        assert (g.mapped_gfn == -1).all() and not b.calls_of("GFN_PIN")
        outside = np.ones(gtt.ENTRIES, dtype=bool)
        outside[ap] = outside[hi] = False
        # the host maps its pool at the start of its own GM (shadow contexts, rings, batches)
        host_idx, host_vals = b.mediator.pool.ggtt_entries()
        assert (b.gpu.ggtt[host_idx] == host_vals).all()
        outside[host_idx] = False
        assert not b.gpu.ggtt[outside].any()
        assert b.gpu.ggtt_flushes >= 1 and b.calls_of("SYNC")
    finally:
        b.close()


# ---- 8. failsafe: the virtual GGTT only ---------------------------------------------------------
def _failsafe(b: Bench, vgpu: int = 1) -> None:
    b.mediator.vgpus[vgpu].enter_failsafe("unsupported_guest")


def test_rule8_failsafe_writes_change_only_the_virtual_ggtt(bench):
    _failsafe(bench)
    i, j = bench.ap_index(1, 5), bench.hi_index(1, 5)
    entry = gtt.encode(321, FLAGS)
    bench.ggtt_write(1, i, entry)
    bench.ggtt_write_half(1, j, False, entry & 0xFFFFFFFF)
    bench.ggtt_write_half(1, j, True, entry >> 32)
    for idx in (i, j):
        assert bench.phys(idx) == reset_entry(bench)        # physical stays scratch
        assert bench.ggtt_read(1, idx) == entry             # the virtual GGTT changed
    assert not bench.calls_of("GFN_PIN") and not bench.hv.vms[1].pins.any()
    assert bench.mediator.vgpus[2].failsafe is None


def test_rule8_failsafe_half_write_copies_into_the_entry(bench):
    """In failsafe an access is a plain copy into the virtual entry: the other half is kept."""
    i = bench.ap_index(1, 6)
    bench.ggtt_write(1, i, gtt.encode(5, FLAGS) | HIGH_FLAG)
    _failsafe(bench)
    bench.ggtt_write_half(1, i, False, 0x1234)
    assert bench.ggtt_read(1, i) == HIGH_FLAG | 0x1234


def test_rule8_failsafe_virtual_ggtt_spans_the_whole_ggtt(bench):
    """The kernel's virtual GGTT covers every entry: outside the partition a failsafe write is
    kept (and read back), and the physical GGTT never changes."""
    _failsafe(bench)
    idx = bench.ap_index(2, 3)                             # vGPU 2's entry
    before = bench.phys(idx)
    bench.ggtt_write(1, idx, gtt.encode(9, FLAGS))
    assert bench.ggtt_read(1, idx) == gtt.encode(9, FLAGS)
    assert bench.phys(idx) == before
    assert bench.ggtt_read(2, idx) == 0                     # vGPU 2's own view is untouched
