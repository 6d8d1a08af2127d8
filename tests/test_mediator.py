"""The mediator beyond single rules: vGPU creation and capacity, malformed trapped accesses, and
the C and Python translators building the same GGTT from the same guest writes."""
from __future__ import annotations

import numpy as np
import pytest

from harness import Bench, make_bench
from nodes.errors import GvtError
from nodes.hw import MiB, gtt
from nodes.mediator.aperture import GmAllocator
from nodes.mediator.core import GFN_HOLE_FRAMES
from nodes.mediator.translate import get_translator
from nodes.wire.schema import pack_write_batch

RAM_FRAMES = 16384
FLAGS = gtt.PTE_PRESENT | gtt.PTE_RW | 0x0C0


# ---- capacity ---------------------------------------------------------------------------------
def expected_available(aperture: int, vgpu_type: str, gm: int = gtt.GM_SIZE) -> int:
    from nodes.hw.partition import VGPU_TYPES
    low, high, fences, _ = VGPU_TYPES[vgpu_type]
    return min((aperture - 128 * MiB) // low, (gm - aperture - 384 * MiB) // high, (32 - 4) // fences)


def test_available_counts():
    a = GmAllocator(1024 * MiB)
    # _8: min(896/64=14, 2688/384=7, 28/4=7) = 7; _4: high GM binds (2688/512 = 5)
    for t, n in (("_8", 7), ("_4", 5), ("_2", 2), ("_1", 1)):
        assert a.available(t) == expected_available(1024 * MiB, t) == n
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
        assert ei.value.code == "ENOSPC" and "hidden" in ei.value.text
        assert 8 not in m.vgpus
        assert (m.alloc.low_free, m.alloc.high_free, m.alloc.fences_free) == free
        parts = sorted((v.part for v in m.vgpus.values()), key=lambda p: p.aperture_base)
        for p, q in zip(parts, parts[1:]):          # partitions never overlap
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
    finally:
        b.close()


def test_fence_limited_capacity_names_fences():
    a = GmAllocator(1024 * MiB, gm_size=8 << 30)
    for _ in range(7):
        a.allocate("_8")
    low, high = list(a.low_free), list(a.high_free)
    with pytest.raises(GvtError) as ei:
        a.allocate("_8")
    assert ei.value.code == "ENOSPC" and "fence" in ei.value.text
    assert (a.low_free, a.high_free) == (low, high)


def test_failed_allocation_leaves_free_space_unchanged():
    a = GmAllocator(1024 * MiB)
    a.allocate("_1")                                  # 384 low, 640 high left
    before = (list(a.low_free), list(a.high_free), list(a.fences_free))
    with pytest.raises(GvtError) as ei:
        a.allocate("_2")                              # low fits (256), high (1024) does not
    assert ei.value.code == "ENOSPC" and "hidden" in ei.value.text
    assert (a.low_free, a.high_free, a.fences_free) == before
    assert a.allocate("_8").aperture_size == 64 * MiB


def test_max_vgpus_and_missing_ram_are_refused():
    b = make_bench(max_vgpus=1)
    try:
        b.setup([(1, "_8")])
        with pytest.raises(GvtError) as ei:
            b.mediator.create_vgpu(2, "_8")
        assert ei.value.code == "ENOSPC" and "at most 1" in ei.value.text
        assert b.mediator.alloc.available("_8") == 6
    finally:
        b.close()
    b = make_bench(vm_frames={1: 16})
    try:
        with pytest.raises(GvtError) as ei:
            b.mediator.create_vgpu(3, "_8")
        assert ei.value.code == "ENOENT"
    finally:
        b.close()


# ---- malformed trapped accesses ------------------------------------------------------------------
def _good_w(b: Bench) -> dict:
    return pack_write_batch([gtt.offset_of(b.ap_index(1, 1))], [8], [gtt.encode(3, FLAGS)])


BAD_PAYLOADS = {
    "not_a_map": ("TRAP_WRITE", lambda b: None),
    "no_off": ("TRAP_WRITE", lambda b: {k: v for k, v in _good_w(b).items() if k != "off"}),
    "no_val": ("TRAP_WRITE", lambda b: {k: v for k, v in _good_w(b).items() if k != "val"}),
    "off_int": ("TRAP_WRITE", lambda b: {**_good_w(b), "off": gtt.offset_of(b.ap_index(1, 1))}),
    "val_list": ("TRAP_WRITE", lambda b: {**_good_w(b), "val": [gtt.encode(3, FLAGS)]}),
    "size_str": ("TRAP_WRITE", lambda b: {**_good_w(b), "size": "8"}),
    "extra_field": ("TRAP_WRITE", lambda b: {**_good_w(b), "op": "w"}),
    "ragged_off": ("TRAP_WRITE", lambda b: {**_good_w(b), "off": b"\x00\x00\x80\x00\x08\x00"}),
    "ragged_val": ("TRAP_WRITE", lambda b: {**_good_w(b), "val": b"\x01" * 12}),
    "two_sizes": ("TRAP_WRITE", lambda b: {**_good_w(b), "size": b"\x08\x08"}),
    "read_no_size": ("TRAP_READ", lambda b: {"off": gtt.offset_of(b.ap_index(1, 1))}),
    "read_off_str": ("TRAP_READ", lambda b: {"off": "8388608", "size": 8}),
    "read_off_bool": ("TRAP_READ", lambda b: {"off": True, "size": 4}),
    "read_size_float": ("TRAP_READ", lambda b: {"off": 8 << 20, "size": 8.0}),
    "read_off_negative": ("TRAP_READ", lambda b: {"off": -8, "size": 8}),
    "read_off_huge": ("TRAP_READ", lambda b: {"off": 1 << 40, "size": 8}),
}


@pytest.mark.parametrize("case", list(BAD_PAYLOADS))
def test_bad_trap_payload_is_einval_and_changes_nothing(bench, case):
    kind, make = BAD_PAYLOADS[case]
    phys = bench.gpu.ggtt.copy()
    virt = bench.mediator.vgpus[1].ggtt.vggtt.copy()
    with pytest.raises(GvtError) as ei:
        bench.net.call("hypervisor", "mediator", kind, make(bench), 1)
    assert ei.value.code == "EINVAL"
    assert np.array_equal(bench.gpu.ggtt, phys)
    assert np.array_equal(bench.mediator.vgpus[1].ggtt.vggtt, virt)
    assert not [e for s, d, e in bench.net.log if s == "mediator" and e.kind not in ("ERROR",)]


def test_trap_for_a_vgpu_outside_the_run_or_not_created_is_enodev(bench):
    with pytest.raises(GvtError) as ei:
        bench.net.call("hypervisor", "mediator", "TRAP_WRITE", _good_w(bench), 5)
    assert ei.value.code == "ENODEV" and "run" in ei.value.text
    b = make_bench()
    try:
        with pytest.raises(GvtError) as ei:
            b.trap_read(1, 0x2600, 4)               # vGPU 1 is in the run, not created yet
        assert ei.value.code == "ENODEV"
    finally:
        b.close()


def test_mmio_reads_in_the_hole_or_misaligned_are_refused(bench):
    for off, size, code in ((3 << 20, 4, "EFAULT"), (2, 4, "EINVAL"), (16 << 20, 4, "EFAULT"),
                            (0x2600, 3, "EINVAL")):
        with pytest.raises(GvtError) as ei:
            bench.trap_read(1, off, size)
        assert ei.value.code == code, (off, size)


# ---- C and Python translators agree end to end -------------------------------------------------
def _workload(b: Bench) -> list[list[tuple[int, int, int]]]:
    a = lambda k: gtt.offset_of(b.ap_index(1, k))     # noqa: E731
    h = lambda k: gtt.offset_of(gtt.index_of_gm(b.mediator.vgpus[1].part.hidden_base) + k)  # noqa: E731
    rng = np.random.default_rng(7)
    gfns = rng.integers(0, RAM_FRAMES + GFN_HOLE_FRAMES + 50, size=300)
    flags = rng.integers(0, 1 << 12, size=300) | (rng.integers(0, 2, size=300) << 60)
    return [
        [(a(k), 8, gtt.encode(int(g), int(f) & 0xFFF) | (int(f) & ~0xFFF))
         for k, (g, f) in enumerate(zip(gfns, flags))],
        [(h(k), 8, gtt.encode(int(g) % 64, gtt.PTE_PRESENT)) for k, g in enumerate(gfns[:100])],
        [(a(k), 8, 0) for k in range(0, 300, 3)],
        [(a(1), 4, gtt.encode(9, FLAGS) & 0xFFFFFFFF), (a(2) + 4, 4, 0)],
        [(a(1) + 4, 4, 0), (a(500), 8, gtt.encode(1 << 30, FLAGS)), (a(501), 8, gtt.encode(5, FLAGS)),
         (a(501), 8, gtt.encode(6, FLAGS)), (gtt.offset_of(3), 8, gtt.encode(5, FLAGS))],
    ]


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
    assert np.array_equal(pc, pp) and np.array_equal(vc, vp) and np.array_equal(hc, hp)
    assert cc == cp and pinc == pinp and unc == unp
    assert cc["ok"] and cc["scratch"] and cc["not_present"] and cc["partial"] and cc["dropped"]
