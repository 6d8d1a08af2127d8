"""The mediator core, message by message, against a real hypervisor core and a real simulated GPU.

Rules come from ../shared/GVT-FACTS.md ("vGPU partitioning", "PV info page", "GGTT write
emulation"). Each test checks one rule and must fail if that rule breaks.
"""
from __future__ import annotations

import numpy as np
import pytest

from harness import Bench, gtt_off, make_bench, pack_writes
from nodes import hw
from nodes.errors import GvtError
from nodes.mediator.core import GFN_HOLE_FRAMES, MediatorCore
from nodes.mediator.translate import get_translator
from nodes.mediator.vgpu import GmAllocator

MiB = hw.MiB
RAM_FRAMES = 16384                                  # each VM's RAM in the bench layout
FLAGS = hw.PTE_PRESENT | hw.PTE_RW | 0x0C0          # a present entry with some flag bits 11:1
HIGH_FLAG = 1 << 52                                 # a flag bit above the address (bits 63:46)
GFX_MODE = hw.RCS_BASE + hw.RING_GFX_MODE
EXECLIST_STATUS = hw.RCS_BASE + hw.RING_EXECLIST_STATUS
CSB_PTR = hw.RCS_BASE + hw.RING_CSB_PTR


# ---- fixtures and helpers ----------------------------------------------------------------------
@pytest.fixture
def bench():
    b = make_bench()
    b.setup([(1, "_8"), (2, "_8")])
    b.calls.clear()
    b.posts.clear()
    yield b
    b.close()


def ap_index(b: Bench, vgpu: int, k: int = 0) -> int:
    """GGTT index of the k-th page of the vGPU's aperture share."""
    return (b.mediator.vgpus[vgpu].part.aperture_base >> hw.PAGE_SHIFT) + k


def hi_index(b: Bench, vgpu: int, k: int = 0) -> int:
    return (b.mediator.vgpus[vgpu].part.hidden_base >> hw.PAGE_SHIFT) + k


def scratch_entry(b: Bench) -> int:
    """Scratch page, not present: a half-written or not-present entry."""
    return hw.pte_encode(b.mediator.scratch_mfn, 0)


def reset_entry(b: Bench) -> int:
    """Scratch page, present: every entry of a new vGPU (kernel intel_vgpu_reset_ggtt does
    set_pfn(scratch_mfn) + set_present)."""
    return hw.pte_encode(b.mediator.scratch_mfn, hw.PTE_PRESENT)


def mapped(b: Bench, vm: int, gfn: int, flags: int = FLAGS) -> int:
    """The host entry a present guest entry (gfn, flags) must become."""
    return hw.pte_encode(int(b.p2m(vm)[gfn]), flags)


def is_scratch(entry: int, b: Bench) -> bool:
    return hw.pte_frame(entry) == b.mediator.scratch_mfn


def test_bench_partitions_are_what_the_facts_give(bench):
    # host keeps 128 MiB low and 384 MiB high; first fit hands the next ranges out in order
    p1, p2 = bench.mediator.vgpus[1].part, bench.mediator.vgpus[2].part
    assert (p1.aperture_base, p1.aperture_size) == (128 * MiB, 64 * MiB)
    assert (p1.hidden_base, p1.hidden_size) == (1024 * MiB + 384 * MiB, 384 * MiB)
    assert (p2.aperture_base, p2.hidden_base) == (192 * MiB, 1792 * MiB)
    assert bench.mediator.scratch_mfn == bench.layout.host.base_mfn


# ---- 1. writes outside the partition are dropped -------------------------------------------------
@pytest.mark.parametrize("where", ["host_low", "below_aperture", "past_aperture", "other_vgpu",
                                   "past_hidden", "host_high"])
def test_write_outside_partition_is_dropped(bench, where):
    idx = {
        "host_low": 5,
        "below_aperture": ap_index(bench, 1, -1),
        "past_aperture": ap_index(bench, 1, 64 * MiB >> hw.PAGE_SHIFT),     # vGPU 2's first page
        "other_vgpu": hi_index(bench, 2, 7),
        "past_hidden": hi_index(bench, 1, 384 * MiB >> hw.PAGE_SHIFT),
        "host_high": (1024 * MiB >> hw.PAGE_SHIFT) + 3,
    }[where]
    before = bench.phys(idx)
    dropped = bench.mediator.vgpus[1].ggtt.counts["dropped"]
    bench.ggtt_write(1, idx, hw.pte_encode(10, FLAGS))
    assert bench.phys(idx) == before
    assert bench.mediator.vgpus[1].ggtt.counts["dropped"] == dropped + 1
    assert bench.ggtt_read(1, idx) == 0
    assert bench.trap_read(1, gtt_off(idx) + 4, 4) == 0
    # 4-byte halves are dropped the same way
    bench.ggtt_write_half(1, idx, False, hw.pte_encode(10, FLAGS) & 0xFFFFFFFF)
    assert bench.phys(idx) == before
    assert bench.mediator.vgpus[1].ggtt.counts["dropped"] == dropped + 2
    assert not bench.calls_of("GFN_PIN")


def test_read_of_another_vgpus_entry_returns_0(bench):
    idx = ap_index(bench, 2, 3)
    bench.ggtt_write(2, idx, hw.pte_encode(42, FLAGS))
    assert bench.ggtt_read(2, idx) == hw.pte_encode(42, FLAGS)
    assert bench.ggtt_read(1, idx) == 0
    assert bench.phys(idx) == mapped(bench, 2, 42)


def test_partition_edges_are_inside(bench):
    n_ap, n_hi = 64 * MiB >> hw.PAGE_SHIFT, 384 * MiB >> hw.PAGE_SHIFT
    edges = [ap_index(bench, 1), ap_index(bench, 1, n_ap - 1), hi_index(bench, 1),
             hi_index(bench, 1, n_hi - 1)]
    for k, idx in enumerate(edges):
        bench.ggtt_write(1, idx, hw.pte_encode(100 + k, FLAGS))
        assert bench.phys(idx) == mapped(bench, 1, 100 + k)
    assert bench.mediator.vgpus[1].ggtt.counts["dropped"] == 0


# ---- 2. present entry with a RAM gfn ----------------------------------------------------------
def test_present_entry_maps_through_p2m_and_pins_once(bench):
    g = 1234
    i, j = ap_index(bench, 1, 10), hi_index(bench, 1, 20)
    entry = hw.pte_encode(g, FLAGS)
    bench.ggtt_write(1, i, entry)
    want = mapped(bench, 1, g)
    assert bench.phys(i) == want
    assert want & ~hw.PTE_ADDR_MASK == FLAGS                 # same flag bits, present kept
    assert hw.pte_frame(want) != g                           # the p2m is not the identity
    assert bench.pinned_gfns_in_calls() == [g]
    assert bench.hv.vms[1].pins[g] == 1
    assert bench.ggtt_read(1, i) == entry                    # the guest reads what it wrote

    # a second entry with the same gfn: served from the cache, no new GFN_PIN
    bench.ggtt_write(1, j, hw.pte_encode(g, hw.PTE_PRESENT))
    assert bench.phys(j) == mapped(bench, 1, g, hw.PTE_PRESENT)
    assert len(bench.calls_of("GFN_PIN")) == 1
    assert bench.hv.vms[1].pins[g] == 1

    # a new gfn pins exactly that gfn
    bench.ggtt_write(1, i + 1, hw.pte_encode(g + 1, FLAGS))
    assert bench.pinned_gfns_in_calls() == [g, g + 1]


def test_one_batch_with_repeated_gfn_pins_it_once(bench):
    g = 777
    base = ap_index(bench, 1, 100)
    bench.trap_writes(1, [(gtt_off(base + k), 8, hw.pte_encode(g, FLAGS)) for k in range(5)])
    assert bench.pinned_gfns_in_calls() == [g]
    assert bench.hv.vms[1].pins[g] == 1
    assert [bench.phys(base + k) for k in range(5)] == [mapped(bench, 1, g)] * 5


def test_high_flag_bits_are_kept(bench):
    i = ap_index(bench, 1, 11)
    bench.ggtt_write(1, i, hw.pte_encode(55, FLAGS) | HIGH_FLAG)
    assert bench.phys(i) == mapped(bench, 1, 55) | HIGH_FLAG


def test_later_write_in_one_batch_wins(bench):
    i = ap_index(bench, 1, 12)
    bench.trap_writes(1, [(gtt_off(i), 8, hw.pte_encode(60, FLAGS)),
                          (gtt_off(i), 8, hw.pte_encode(61, FLAGS))])
    assert bench.phys(i) == mapped(bench, 1, 61)
    assert bench.ggtt_read(1, i) == hw.pte_encode(61, FLAGS)
    # the overwritten value never held a pin: nothing leaks once the entry is unmapped
    assert bench.hv.vms[1].pins[60] == 0
    assert bench.mediator.vgpus[1].ggtt.pinned_gfns() == 1
    bench.ggtt_write(1, i, 0)
    assert not bench.hv.vms[1].pins.any()
    assert bench.mediator.vgpus[1].ggtt.pinned_gfns() == 0


# ---- 3. half writes ---------------------------------------------------------------------------
@pytest.mark.parametrize("high_first", [False, True], ids=["low_then_high", "high_then_low"])
def test_half_writes_scratch_until_both_halves(bench, high_first):
    g = 4321
    i = hi_index(bench, 1, 33)
    entry = hw.pte_encode(g, FLAGS) | HIGH_FLAG
    halves = [(False, entry & 0xFFFFFFFF), (True, entry >> 32)]
    if high_first:
        halves.reverse()
    first, second = halves

    bench.ggtt_write_half(1, i, *first)
    e = bench.phys(i)
    assert is_scratch(e, bench) and not e & hw.PTE_PRESENT
    assert not bench.calls_of("GFN_PIN")
    assert bench.trap_read(1, gtt_off(i) + (4 if first[0] else 0), 4) == first[1]   # virtual kept

    bench.ggtt_write_half(1, i, *second)
    assert bench.phys(i) == mapped(bench, 1, g) | HIGH_FLAG
    assert bench.pinned_gfns_in_calls() == [g]
    assert bench.ggtt_read(1, i) == entry


def test_half_write_over_a_mapped_entry_scratches_it(bench):
    g = 99
    i = ap_index(bench, 1, 40)
    bench.ggtt_write(1, i, hw.pte_encode(g, FLAGS))
    bench.ggtt_write_half(1, i, False, hw.pte_encode(g + 1, FLAGS) & 0xFFFFFFFF)
    e = bench.phys(i)
    assert is_scratch(e, bench) and not e & hw.PTE_PRESENT
    bench.ggtt_write_half(1, i, True, 0)
    assert bench.phys(i) == mapped(bench, 1, g + 1)


# ---- 4. invalid gfns --------------------------------------------------------------------------
@pytest.mark.parametrize("gfn", [RAM_FRAMES, RAM_FRAMES + 17, RAM_FRAMES + GFN_HOLE_FRAMES - 1])
def test_gfn_in_hole_pin_fails_scratch_present(bench, gfn):
    i = ap_index(bench, 1, 50)
    bench.ggtt_write(1, i, hw.pte_encode(gfn, FLAGS))
    e = bench.phys(i)
    assert e == hw.pte_encode(bench.mediator.scratch_mfn, FLAGS)   # scratch, flags and present kept
    assert e & hw.PTE_PRESENT
    assert bench.pinned_gfns_in_calls() == [gfn]                    # the pin was tried...
    assert not bench.hv.vms[1].pins.any()                          # ...and failed
    assert bench.mediator.vgpus[1].ggtt.pinned_gfns() == 0         # nothing is held
    # a failed pin is remembered: the same gfn again makes no new call
    bench.ggtt_write(1, i + 1, hw.pte_encode(gfn, FLAGS))
    assert len(bench.calls_of("GFN_PIN")) == 1
    assert bench.phys(i + 1) == e
    # unmapping an entry whose pin failed has nothing to unpin
    bench.trap_writes(1, [(gtt_off(i), 8, 0), (gtt_off(i + 1), 8, 0)])
    assert not bench.posts_of("GFN_UNPIN")


@pytest.mark.parametrize("gfn", [RAM_FRAMES + GFN_HOLE_FRAMES, 1 << 20, hw.PTE_ADDR_MASK >> 12])
def test_gfn_far_beyond_ram_scratch_present_no_pin(bench, gfn):
    i = hi_index(bench, 1, 51)
    bench.ggtt_write(1, i, hw.pte_encode(gfn, FLAGS))
    e = bench.phys(i)
    assert e == hw.pte_encode(bench.mediator.scratch_mfn, FLAGS)
    assert e & hw.PTE_PRESENT
    assert not bench.calls_of("GFN_PIN")


# ---- 5. not present -------------------------------------------------------------------------
def test_not_present_entry_is_scratch_present_cleared(bench):
    i = ap_index(bench, 1, 60)
    flags = FLAGS & ~hw.PTE_PRESENT
    before = bench.mediator.vgpus[1].ggtt.counts["not_present"]
    bench.ggtt_write(1, i, hw.pte_encode(300, flags))
    e = bench.phys(i)
    assert is_scratch(e, bench)
    assert not e & hw.PTE_PRESENT
    assert e == hw.pte_encode(bench.mediator.scratch_mfn, flags)
    assert not bench.calls_of("GFN_PIN")
    assert bench.mediator.vgpus[1].ggtt.counts["not_present"] == before + 1


# ---- 6. unpin -------------------------------------------------------------------------------
def test_unmapping_unpins(bench):
    g = 2000
    i = ap_index(bench, 1, 70)
    bench.ggtt_write(1, i, hw.pte_encode(g, FLAGS))
    assert bench.hv.vms[1].pins[g] == 1
    bench.ggtt_write(1, i, hw.pte_encode(g, 0))             # not present
    assert bench.unpinned_gfns_in_posts() == [g]
    assert bench.hv.vms[1].pins[g] == 0
    assert bench.mediator.vgpus[1].ggtt.pinned_gfns() == 0
    # mapping it again pins it again
    bench.ggtt_write(1, i, hw.pte_encode(g, FLAGS))
    assert bench.pinned_gfns_in_calls() == [g, g]
    assert bench.hv.vms[1].pins[g] == 1


def test_remapping_to_another_gfn_unpins_the_old_one(bench):
    i = ap_index(bench, 1, 71)
    bench.ggtt_write(1, i, hw.pte_encode(10, FLAGS))
    bench.ggtt_write(1, i, hw.pte_encode(11, FLAGS))
    assert bench.unpinned_gfns_in_posts() == [10]
    assert bench.hv.vms[1].pins[10] == 0 and bench.hv.vms[1].pins[11] == 1


def test_shared_gfn_unpinned_only_after_last_entry(bench):
    g = 2001
    i, j = ap_index(bench, 1, 80), hi_index(bench, 1, 80)
    bench.ggtt_write(1, i, hw.pte_encode(g, FLAGS))
    bench.ggtt_write(1, j, hw.pte_encode(g, FLAGS))
    bench.ggtt_write(1, i, 0)
    assert not bench.posts_of("GFN_UNPIN")
    assert bench.hv.vms[1].pins[g] == 1
    assert bench.phys(j) == mapped(bench, 1, g)
    bench.ggtt_write(1, j, 0)
    assert bench.unpinned_gfns_in_posts() == [g]
    assert bench.hv.vms[1].pins[g] == 0


# ---- 7. GGTT flush --------------------------------------------------------------------------
def test_every_committed_batch_flushes(bench):
    f0 = bench.gpu.ggtt_flushes
    i = ap_index(bench, 1, 90)
    bench.ggtt_write(1, i, hw.pte_encode(5, FLAGS))
    assert bench.gpu.ggtt_flushes == f0 + 1
    kinds = [p.kind for p in bench.posts]
    assert kinds[-1] == "MMIO_WRITE" and kinds.index("MMIO_WRITE_BATCH") < len(kinds) - 1
    last = bench.posts[-1]
    assert last.peer == bench.mediator.gpu
    assert (last.payload["off"], last.payload["size"]) == (hw.GFX_FLSH_CNTL, 4)

    bench.trap_writes(1, [(gtt_off(i + k), 8, hw.pte_encode(6 + k, FLAGS)) for k in range(4)])
    assert bench.gpu.ggtt_flushes == f0 + 2                 # one batch, one flush
    bench.ggtt_write(1, i, 0)                               # unmap: unpin, then flush
    assert bench.gpu.ggtt_flushes == f0 + 3
    assert bench.posts[-1].kind == "MMIO_WRITE" and bench.posts[-2].kind == "GFN_UNPIN"
    bench.ggtt_write_half(1, i, False, 1)                   # a half write commits scratch
    assert bench.gpu.ggtt_flushes == f0 + 4


# ---- 8. a new vGPU's partition is all scratch ------------------------------------------------
def test_new_vgpu_partition_is_scratch():
    """GVT-FACTS: every GGTT entry of a new vGPU points at the scratch page. The present bit
    follows the kernel (intel_vgpu_reset_ggtt: set_pfn(scratch_mfn); set_present), so a new
    entry is scratch AND present; the guest's own (virtual) entries all read 0."""
    b = make_bench()
    try:
        b.setup([(1, "_8")])
        part = b.mediator.vgpus[1].part
        ap = slice(part.aperture_base >> 12, (part.aperture_base + part.aperture_size) >> 12)
        hi = slice(part.hidden_base >> 12, (part.hidden_base + part.hidden_size) >> 12)
        want = np.uint64(reset_entry(b))
        for s in (ap, hi):
            seg = b.gpu.ggtt[s]
            assert len(seg) and (seg == want).all()
            frames = (seg & np.uint64(hw.PTE_ADDR_MASK)) >> np.uint64(hw.PAGE_SHIFT)
            assert (frames == np.uint64(b.mediator.scratch_mfn)).all()
        g = b.mediator.vgpus[1].ggtt
        assert not g.vggtt.any()
        assert b.ggtt_read(1, ap.start) == 0 and b.ggtt_read(1, hi.stop - 1) == 0
        assert (g.mapped_gfn == -1).all() and not b.calls_of("GFN_PIN")
        # nothing outside the partition was touched
        outside = np.ones(hw.GGTT_ENTRIES, dtype=bool)
        outside[ap] = outside[hi] = False
        assert not b.gpu.ggtt[outside].any()
        assert b.gpu.ggtt_flushes >= 1
        assert b.calls_of("SYNC")
    finally:
        b.close()


# ---- 9. PV info page content ----------------------------------------------------------------
def pv(off: int) -> int:
    return hw.PVINFO_BASE + off


def test_pv_info_page(bench):
    for vgpu in (1, 2):
        part = bench.mediator.vgpus[vgpu].part
        rd = lambda off, size=4: bench.trap_read(vgpu, pv(off), size)   # noqa: E731
        assert rd(hw.PV_MAGIC_OFF, 8) == hw.PV_MAGIC == 0x4776544776544776
        assert rd(hw.PV_MAGIC_OFF).to_bytes(4, "little") + rd(4).to_bytes(4, "little") == b"vGTvGTvG"
        assert rd(hw.PV_VERSION_MAJOR_OFF, 2) == 1
        assert rd(hw.PV_VERSION_MINOR_OFF, 2) == 0
        assert rd(hw.PV_VGT_ID_OFF) == vgpu
        caps = rd(hw.PV_CAPS_OFF)
        assert caps & (1 << 2) and caps & (1 << 3) and caps & (1 << 4)
        assert rd(hw.PV_AVAIL_MAPPABLE_BASE) == part.aperture_base
        assert rd(hw.PV_AVAIL_MAPPABLE_SIZE) == part.aperture_size == 64 * MiB
        assert rd(hw.PV_AVAIL_NONMAPPABLE_BASE) == part.hidden_base
        assert rd(hw.PV_AVAIL_NONMAPPABLE_SIZE) == part.hidden_size == 384 * MiB
        assert rd(hw.PV_AVAIL_FENCE_NUM) == 4
        assert bench.mediator.vgpus[vgpu].vregs.pv_notified


def test_pv_avail_rs_is_the_ggtt_range_the_guest_may_use(bench):
    base = bench.trap_read(1, pv(hw.PV_AVAIL_MAPPABLE_BASE), 4) >> hw.PAGE_SHIFT
    size = bench.trap_read(1, pv(hw.PV_AVAIL_MAPPABLE_SIZE), 4) >> hw.PAGE_SHIFT
    bench.ggtt_write(1, base, hw.pte_encode(1, FLAGS))
    bench.ggtt_write(1, base + size - 1, hw.pte_encode(2, FLAGS))
    bench.ggtt_write(1, base + size, hw.pte_encode(3, FLAGS))
    assert bench.phys(base) == mapped(bench, 1, 1)
    assert bench.phys(base + size - 1) == mapped(bench, 1, 2)
    assert bench.mediator.vgpus[1].ggtt.counts["dropped"] == 1


# ---- 10. PV page: read-only except the writable fields ---------------------------------------
@pytest.mark.parametrize("off", [hw.PV_MAGIC_OFF, hw.PV_VERSION_MAJOR_OFF, hw.PV_VGT_ID_OFF,
                                 hw.PV_CAPS_OFF, hw.PV_AVAIL_MAPPABLE_BASE,
                                 hw.PV_AVAIL_NONMAPPABLE_SIZE, hw.PV_AVAIL_FENCE_NUM])
def test_pv_read_only_fields_ignore_writes(bench, off):
    before = bench.trap_read(1, pv(off), 4)
    res = bench.trap_writes(1, [(pv(off), 4, 0x12345678), (pv(off & ~7), 8, 0x1111111122222222)])
    assert res["n_errors"] == 0
    assert bench.trap_read(1, pv(off), 4) == before
    assert bench.trap_read(1, pv(hw.PV_MAGIC_OFF), 8) == hw.PV_MAGIC


def test_pv_writable_fields_keep_writes(bench):
    bench.trap_write(1, pv(hw.PV_G2V_NOTIFY), 4, hw.G2V_PPGTT_L4_CREATE)
    assert bench.trap_read(1, pv(hw.PV_G2V_NOTIFY), 4) == hw.G2V_PPGTT_L4_CREATE
    assert bench.mediator.vgpus[1].vregs.g2v_notifications == [hw.G2V_PPGTT_L4_CREATE]
    bench.trap_write(1, pv(hw.PV_PDP0_LO), 8, 0xABCD_0000_1234_5000)
    assert bench.trap_read(1, pv(hw.PV_PDP0_LO), 8) == 0xABCD_0000_1234_5000
    bench.trap_write(1, pv(hw.PV_DISPLAY_READY), 4, 1)
    assert bench.trap_read(1, pv(hw.PV_DISPLAY_READY), 4) == 1
    bench.trap_write(1, pv(hw.PV_EXECLIST_DESC_HI), 4, 0x55)
    assert bench.trap_read(1, pv(hw.PV_EXECLIST_DESC_HI), 4) == 0x55


# ---- 11. read-only bits and masked registers ------------------------------------------------
def test_execlist_status_ignores_writes(bench):
    bench.trap_writes(1, [(EXECLIST_STATUS, 4, 0xDEADBEEF), (EXECLIST_STATUS + 4, 4, 0xCAFE)])
    assert bench.trap_read(1, EXECLIST_STATUS, 4) == 0
    assert bench.trap_read(1, EXECLIST_STATUS + 4, 4) == 0


def test_csb_pointer_write_pointer_is_read_only(bench):
    assert bench.trap_read(1, CSB_PTR, 4) == hw.CSB_PTR_RESET
    # set read pointer to 3 and try to set write pointer to 2, both with mask bits
    bench.trap_write(1, CSB_PTR, 4, (0x0707 << 16) | 0x0302)
    assert bench.trap_read(1, CSB_PTR, 4) == 0x0307
    # without mask bits nothing changes
    bench.trap_write(1, CSB_PTR, 4, 0x0501)
    assert bench.trap_read(1, CSB_PTR, 4) == 0x0307


def test_gfx_mode_is_masked(bench):
    bench.trap_read(1, pv(hw.PV_MAGIC_OFF), 8)         # a PV-aware guest: no failsafe here
    bench.trap_write(1, GFX_MODE, 4, hw.GFX_MODE_RUN_LIST_ENABLE | hw.GFX_MODE_PPGTT_ENABLE)
    assert bench.trap_read(1, GFX_MODE, 4) == 0        # no mask bits: nothing changes
    bench.trap_write(1, GFX_MODE, 4, hw.masked_enable(hw.GFX_MODE_RUN_LIST_ENABLE))
    assert bench.trap_read(1, GFX_MODE, 4) == hw.GFX_MODE_RUN_LIST_ENABLE
    # mask selects exactly which bits change: bit 9 set, bit 0 mask with value 0, bit 15 untouched
    bench.trap_write(1, GFX_MODE, 4, (0x0201 << 16) | 0x0200)
    assert bench.trap_read(1, GFX_MODE, 4) == hw.GFX_MODE_RUN_LIST_ENABLE | hw.GFX_MODE_PPGTT_ENABLE
    bench.trap_write(1, GFX_MODE, 4, hw.masked_disable(hw.GFX_MODE_RUN_LIST_ENABLE))
    assert bench.trap_read(1, GFX_MODE, 4) == hw.GFX_MODE_PPGTT_ENABLE
    assert bench.mediator.vgpus[1].failsafe is None


# ---- 12. failsafe ----------------------------------------------------------------------------
@pytest.mark.parametrize("bit", [hw.GFX_MODE_RUN_LIST_ENABLE, hw.GFX_MODE_PPGTT_ENABLE])
def test_enabling_before_pv_read_is_failsafe(bench, bit):
    v = bench.mediator.vgpus[1]
    assert v.failsafe is None
    bench.trap_write(1, GFX_MODE, 4, hw.masked_enable(bit))
    assert v.failsafe == "unsupported_guest"
    assert bench.mediator.vgpus[2].failsafe is None            # other vGPUs untouched

    i, j = ap_index(bench, 1, 5), hi_index(bench, 1, 5)
    before = {i: bench.phys(i), j: bench.phys(j)}
    assert before == {i: reset_entry(bench), j: reset_entry(bench)}
    entry = hw.pte_encode(321, FLAGS)
    bench.ggtt_write(1, i, entry)
    bench.ggtt_write_half(1, j, False, entry & 0xFFFFFFFF)
    bench.ggtt_write_half(1, j, True, entry >> 32)
    for idx in (i, j):
        assert bench.phys(idx) == before[idx]                   # physical stays scratch
        assert bench.ggtt_read(1, idx) == entry                 # the virtual GGTT changed
    assert not bench.calls_of("GFN_PIN")
    assert not bench.hv.vms[1].pins.any()


def test_failsafe_in_the_middle_of_a_batch(bench):
    i = ap_index(bench, 1, 6)
    bench.trap_writes(1, [(GFX_MODE, 4, hw.masked_enable(hw.GFX_MODE_RUN_LIST_ENABLE)),
                          (gtt_off(i), 8, hw.pte_encode(7, FLAGS))])
    assert bench.mediator.vgpus[1].failsafe == "unsupported_guest"
    assert bench.phys(i) == reset_entry(bench)


def test_pv_aware_guest_is_not_failsafe(bench):
    bench.trap_read(1, pv(hw.PV_MAGIC_OFF), 8)
    bench.trap_write(1, GFX_MODE, 4, hw.masked_enable(hw.GFX_MODE_RUN_LIST_ENABLE | hw.GFX_MODE_PPGTT_ENABLE))
    assert bench.mediator.vgpus[1].failsafe is None
    i = ap_index(bench, 1, 7)
    bench.ggtt_write(1, i, hw.pte_encode(8, FLAGS))
    assert bench.phys(i) == mapped(bench, 1, 8)


# ---- 13. capacity ----------------------------------------------------------------------------
def expected_available(aperture: int, vgpu_type: str, gm: int = hw.GM_SIZE) -> int:
    low, high, fences, _ = hw.VGPU_TYPES[vgpu_type]
    low_free = aperture - 128 * MiB
    high_free = gm - aperture - 384 * MiB
    return min(low_free // low, high_free // high, (32 - 4) // fences)


def test_available_counts():
    a = GmAllocator(1024 * MiB)
    # _8: min(896/64=14, 2688/384=7, 28/4=7) = 7
    # _4: min(896/128=7, 2688/512=5, 7) = 5   (high GM binds: 4096 - 1024 - 384 = 2688 MiB)
    assert a.available("_8") == expected_available(1024 * MiB, "_8") == 7
    assert a.available("_4") == expected_available(1024 * MiB, "_4") == 5
    assert a.available("_2") == expected_available(1024 * MiB, "_2") == 2
    assert a.available("_1") == expected_available(1024 * MiB, "_1") == 1
    with pytest.raises(GvtError) as ei:
        a.available("_3")
    assert ei.value.code == "EINVAL"


def test_create_past_capacity_is_enospc():
    b = make_bench(vm_frames={vm: 16 for vm in range(1, 10)}, max_vgpus=20)
    try:
        m = b.mediator
        for vm in range(1, 8):
            m.create_vgpu(vm, "_8")
        assert m.alloc.available("_8") == 0
        free = (list(m.alloc.low_free), list(m.alloc.high_free), list(m.alloc.fences_free))
        with pytest.raises(GvtError) as ei:
            m.create_vgpu(8, "_8")
        assert ei.value.code == "ENOSPC"
        assert "hidden" in ei.value.text
        assert 8 not in m.vgpus
        assert (m.alloc.low_free, m.alloc.high_free, m.alloc.fences_free) == free
        # partitions never overlap
        parts = sorted((v.part for v in m.vgpus.values()), key=lambda p: p.aperture_base)
        for p, q in zip(parts, parts[1:]):
            assert p.aperture_base + p.aperture_size <= q.aperture_base
            assert p.hidden_base + p.hidden_size <= q.hidden_base
            assert p.fence_base + p.fence_num <= q.fence_base
    finally:
        b.close()


def test_aperture_limited_capacity_names_the_aperture():
    b = make_bench(aperture_size=256 * MiB, vm_frames={1: 16, 2: 16, 3: 16})
    try:
        m = b.mediator
        assert m.alloc.available("_8") == expected_available(256 * MiB, "_8") == 2
        m.create_vgpu(1, "_8")
        m.create_vgpu(2, "_8")
        with pytest.raises(GvtError) as ei:
            m.create_vgpu(3, "_8")
        assert ei.value.code == "ENOSPC" and "aperture" in ei.value.text
        assert 3 not in m.vgpus
    finally:
        b.close()


def test_fence_limited_capacity_names_fences():
    a = GmAllocator(1024 * MiB, gm_size=8 * hw.GiB)     # plenty of GM: fences bind (28 / 4 = 7)
    assert a.available("_8") == 7
    for _ in range(7):
        a.allocate("_8")
    low, high = list(a.low_free), list(a.high_free)
    with pytest.raises(GvtError) as ei:
        a.allocate("_8")
    assert ei.value.code == "ENOSPC" and "fence" in ei.value.text
    assert (a.low_free, a.high_free) == (low, high)


def test_failed_allocation_leaves_free_space_unchanged():
    a = GmAllocator(1024 * MiB)
    a.allocate("_1")                                  # 512 low, 2048 high: 384 low, 640 high left
    before = (list(a.low_free), list(a.high_free), list(a.fences_free))
    avail = {t: a.available(t) for t in hw.VGPU_TYPES}
    with pytest.raises(GvtError) as ei:
        a.allocate("_2")                              # low fits (256), high (1024) does not
    assert ei.value.code == "ENOSPC" and "hidden" in ei.value.text
    assert (a.low_free, a.high_free, a.fences_free) == before
    assert {t: a.available(t) for t in hw.VGPU_TYPES} == avail
    p = a.allocate("_8")                              # a smaller one still fits
    assert p.aperture_size == 64 * MiB and p.hidden_size == 384 * MiB


def test_max_vgpus_is_enospc():
    b = make_bench(max_vgpus=1)
    try:
        b.setup([(1, "_8")])
        with pytest.raises(GvtError) as ei:
            b.mediator.create_vgpu(2, "_8")
        assert ei.value.code == "ENOSPC"
        assert 2 not in b.mediator.vgpus
        assert b.mediator.alloc.available("_8") == 6   # nothing was taken by the refusal
    finally:
        b.close()


# ---- 14. bad TRAP payloads -------------------------------------------------------------------
def _good_w(b: Bench) -> dict:
    return pack_writes([(gtt_off(ap_index(b, 1, 1)), 8, hw.pte_encode(3, FLAGS))])


BAD_PAYLOADS = {
    "not_a_map": lambda b: None,
    "no_op": lambda b: {k: v for k, v in _good_w(b).items() if k != "op"},
    "op_wrong_type": lambda b: {**_good_w(b), "op": 1},
    "op_x": lambda b: {**_good_w(b), "op": "x"},
    "w_no_off": lambda b: {k: v for k, v in _good_w(b).items() if k != "off"},
    "w_no_size": lambda b: {k: v for k, v in _good_w(b).items() if k != "size"},
    "w_no_val": lambda b: {k: v for k, v in _good_w(b).items() if k != "val"},
    "w_off_int": lambda b: {**_good_w(b), "off": gtt_off(ap_index(b, 1, 1))},
    "w_val_list": lambda b: {**_good_w(b), "val": [hw.pte_encode(3, FLAGS)]},
    "w_size_str": lambda b: {**_good_w(b), "size": "8"},
    "w_two_offs_one_val": lambda b: {**pack_writes([(gtt_off(ap_index(b, 1, 1)), 8, 0),
                                                    (gtt_off(ap_index(b, 1, 2)), 8, 0)]),
                                     "val": _good_w(b)["val"], "size": b"\x08"},
    "w_two_sizes": lambda b: {**_good_w(b), "size": b"\x08\x08"},
    "r_no_size": lambda b: {"op": "r", "off": gtt_off(ap_index(b, 1, 1))},
    "r_off_str": lambda b: {"op": "r", "off": "8388608", "size": 8},
    "r_off_bool": lambda b: {"op": "r", "off": True, "size": 4},
    "r_size_float": lambda b: {"op": "r", "off": gtt_off(ap_index(b, 1, 1)), "size": 8.0},
}


@pytest.mark.parametrize("case", list(BAD_PAYLOADS))
def test_bad_trap_payload_is_einval_and_changes_nothing(bench, case):
    phys = bench.gpu.ggtt.copy()
    virt = bench.mediator.vgpus[1].ggtt.vggtt.copy()
    with pytest.raises(GvtError) as ei:
        bench.send("TRAP", BAD_PAYLOADS[case](bench), vgpu=1)
    assert ei.value.code == "EINVAL"
    assert np.array_equal(bench.gpu.ggtt, phys)
    assert np.array_equal(bench.mediator.vgpus[1].ggtt.vggtt, virt)
    assert not bench.posts and not bench.calls


@pytest.mark.parametrize("field,blob", [("off", b"\x00\x00\x80\x00\x08\x00"),   # 1.5 offsets
                                        ("val", b"\x01" * 12)])                 # 1.5 values
def test_ragged_packed_field_is_einval(bench, field, blob):
    """A packed field whose length is not a whole number of elements is malformed input: it
    must be refused as EINVAL like every other bad payload, not crash with a numpy error."""
    phys = bench.gpu.ggtt.copy()
    payload = {**_good_w(bench), field: blob}
    with pytest.raises(GvtError) as ei:
        bench.send("TRAP", payload, vgpu=1)
    assert ei.value.code == "EINVAL"
    assert np.array_equal(bench.gpu.ggtt, phys)


def test_misaligned_8_byte_gtt_write_does_not_change_an_entry(bench):
    """Rule 1: only aligned 4- or 8-byte GGTT writes. An 8-byte write at entry + 4 is not an
    aligned write of any entry: it must not rewrite entry i (the read path refuses the same
    access with EINVAL)."""
    i = ap_index(bench, 1, 9)
    bench.ggtt_write(1, i, hw.pte_encode(20, FLAGS))
    before_phys, before_virt = bench.phys(i), bench.ggtt_read(1, i)
    with pytest.raises(GvtError):
        bench.trap_read(1, gtt_off(i) + 4, 8)              # the read side refuses it
    try:
        res = bench.trap_write(1, gtt_off(i) + 4, 8, hw.pte_encode(21, FLAGS))
    except GvtError as err:
        assert err.code == "EINVAL"
    else:
        assert res["n_errors"] == 1
    assert bench.phys(i) == before_phys
    assert bench.ggtt_read(1, i) == before_virt


def test_bad_sizes_in_a_batch_are_reported_not_applied(bench):
    i = ap_index(bench, 1, 8)
    phys = bench.gpu.ggtt.copy()
    res = bench.trap_writes(1, [(gtt_off(i), 2, 0xFFFF), (gtt_off(i) + 2, 4, 1),
                                (gtt_off(i), 1, 1)])
    assert res["n_errors"] == 3 and res["n"] == 3
    assert np.array_equal(bench.gpu.ggtt, phys)
    assert bench.ggtt_read(1, i) == 0


def test_trap_for_unknown_vgpu_is_refused(bench):
    with pytest.raises(GvtError) as ei:
        bench.send("TRAP", _good_w(bench), vgpu=5)
    assert ei.value.code == "ENODEV"


# ---- 15. C and Python translators agree end to end -------------------------------------------
def _workload(b: Bench) -> list[list[tuple[int, int, int]]]:
    a = lambda k: gtt_off(ap_index(b, 1, k))     # noqa: E731
    h = lambda k: gtt_off(hi_index(b, 1, k))     # noqa: E731
    rng = np.random.default_rng(7)
    batches = []
    gfns = rng.integers(0, RAM_FRAMES + GFN_HOLE_FRAMES + 50, size=300)
    flags = rng.integers(0, 1 << 12, size=300) | (rng.integers(0, 2, size=300) << 60)
    batches.append([(a(k), 8, hw.pte_encode(int(g), int(f) & 0xFFF) | (int(f) & ~0xFFF))
                    for k, (g, f) in enumerate(zip(gfns, flags))])
    batches.append([(h(k), 8, hw.pte_encode(int(g) % 64, hw.PTE_PRESENT)) for k, g in enumerate(gfns[:100])])
    batches.append([(a(k), 8, 0) for k in range(0, 300, 3)])            # unmap a third
    batches.append([(a(1), 4, hw.pte_encode(9, FLAGS) & 0xFFFFFFFF), (a(2) + 4, 4, 0)])
    batches.append([(a(1) + 4, 4, 0), (a(500), 8, hw.pte_encode(1 << 30, FLAGS)),
                    (a(501), 8, hw.pte_encode(5, FLAGS)), (a(501), 8, hw.pte_encode(6, FLAGS)),
                    (gtt_off(3), 8, hw.pte_encode(5, FLAGS))])
    return batches


def test_c_and_python_translators_give_the_same_ggtt():
    results = []
    for name in ("c", "python"):
        b = make_bench(translate=get_translator(name))
        try:
            b.setup([(1, "_8"), (2, "_8")])
            for batch in _workload(b):
                b.trap_writes(1, batch)
            g = b.mediator.vgpus[1].ggtt
            results.append((b.gpu.ggtt.copy(), g.vggtt.copy(), b.hv.vms[1].pins.copy(),
                            dict(g.counts), b.pinned_gfns_in_calls(), b.unpinned_gfns_in_posts()))
        finally:
            b.close()
    (pc, vc, hc, cc, pinc, unc), (pp, vp, hp, cp, pinp, unp) = results
    assert np.array_equal(pc, pp)
    assert np.array_equal(vc, vp)
    assert np.array_equal(hc, hp)
    assert cc == cp and pinc == pinp and unc == unp
    # and the workload did exercise every path
    assert cc["ok"] and cc["scratch"] and cc["not_present"] and cc["partial"] and cc["dropped"]
