"""Sans-IO tests of the mediator, call by call, against the real hypervisor and gpu cores."""
import time
from types import GeneratorType

import numpy as np
import pytest

from nodes import hw
from nodes.errors import GvtError
from nodes.gpu.sim import GpuSim
from nodes.hypervisor.core import HypervisorCore
from nodes.mediator.core import GFN_HOLE_FRAMES, MediatorCore
from nodes.mediator.translate import get_translator
from nodes.mediator.vgpu import GmAllocator
from nodes.memory import Fabric, Layout, OwnedMemory, RegionMemory
from nodes.runtime import Call, Post
from nodes.wire.codec import Envelope

RAM = 4096


class Bench:
    """Mediator, hypervisor and gpu cores wired in-process: Calls and Posts are delivered at once."""

    def __init__(self, translator="c"):
        self.layout = Layout.build(1024, {1: RAM, 2: RAM})
        hv_owned = OwnedMemory(self.layout)
        mems = {}
        for vm in (1, 2):
            mems[vm] = RegionMemory.create(self.layout.vm_region(vm), "msg", "t")
            hv_owned.add(mems[vm])
        self.hv = HypervisorCore(self.layout, hv_owned, mems, seed=5, clock=time.monotonic_ns)
        med_owned = OwnedMemory(self.layout)
        med_owned.add(RegionMemory.create(self.layout.host, "msg", "t"))
        self.med = MediatorCore(self.layout, med_owned, clock=time.monotonic_ns,
                                translate=get_translator(translator))
        self.gpu = GpuSim(Fabric(self.layout, "msg", "t"), time.monotonic_ns)
        self.calls = []
        self.drive(self.med.setup([(1, "_8"), (2, "_8")]))

    def deliver(self, peer, kind, payload, vgpu, sender):
        core = {"hypervisor": self.hv, "gpu": self.gpu, "mediator": self.med}[peer]
        res = core.handle(Envelope(kind, 1, 0, vgpu, 0, 1, payload, peer=sender), time.monotonic_ns())
        return self.drive(res) if isinstance(res, GeneratorType) else res

    def drive(self, gen):
        value = None
        try:
            while True:
                act = gen.send(value)
                value = None
                if isinstance(act, Call):
                    self.calls.append(act.kind)
                    value = self.deliver(act.peer, act.kind, act.payload, act.vgpu, "mediator")
                elif isinstance(act, Post):
                    self.deliver(act.peer, act.kind, act.payload, act.vgpu, "mediator")
        except StopIteration as stop:
            return stop.value

    def trap(self, vgpu, op, **p):
        res = self.med.handle(Envelope("TRAP", 1, 0, vgpu, 0, 1, {"op": op, **p}, peer="hypervisor"),
                              time.monotonic_ns())
        return self.drive(res) if isinstance(res, GeneratorType) else res

    def write(self, vgpu, writes):
        offs = np.array([w[0] for w in writes], "<u4").tobytes()
        sizes = bytes(w[1] for w in writes)
        vals = np.array([w[2] for w in writes], "<u8").tobytes()
        return self.trap(vgpu, "w", off=offs, size=sizes, val=vals)

    def read(self, vgpu, off, size=4):
        return self.trap(vgpu, "r", off=off, size=size)

    def first_index(self, vgpu):
        return self.med.vgpus[vgpu].part.aperture_base >> 12

    def phys(self, index):
        return int(self.gpu.ggtt[index])

    def p2m(self, vm, gfn):
        return int(self.hv.vms[vm].p2m[gfn])


def goff(i):
    return hw.GTT_OFFSET + 8 * i


@pytest.fixture(params=["c", "python"])
def b(request):
    return Bench(request.param)


def test_new_vgpu_entries_point_at_scratch_present(b):
    v = b.med.vgpus[1]
    idx = np.arange(v.part.aperture_base >> 12, (v.part.aperture_base + v.part.aperture_size) >> 12)
    assert (b.gpu.ggtt[idx] == hw.pte_encode(b.med.scratch_mfn, hw.PTE_PRESENT)).all()


def test_present_entry_translated_through_p2m_and_cached(b):
    i = b.first_index(1)
    b.write(1, [(goff(i), 8, hw.pte_encode(77, hw.PTE_PRESENT | hw.PTE_RW))])
    assert b.phys(i) == hw.pte_encode(b.p2m(1, 77), hw.PTE_PRESENT | hw.PTE_RW)
    assert b.p2m(1, 77) != 77
    pins = b.calls.count("GFN_PIN")
    b.write(1, [(goff(i + 1), 8, hw.pte_encode(77))])           # same gfn: from the cache
    assert b.calls.count("GFN_PIN") == pins
    assert b.read(1, goff(i), 8) == hw.pte_encode(77, hw.PTE_PRESENT | hw.PTE_RW)


def test_write_outside_partition_dropped_and_reads_zero(b):
    other = b.first_index(2)
    before = b.phys(other)
    b.write(1, [(goff(other), 8, hw.pte_encode(5))])
    assert b.phys(other) == before
    assert b.read(1, goff(other), 8) == 0
    assert b.med.vgpus[1].ggtt.counts["dropped"] == 1


@pytest.mark.parametrize("first", [0, 4])
def test_half_writes(b, first):
    i = b.first_index(1)
    full = hw.pte_encode(0x123, hw.PTE_PRESENT)
    halves = {0: full & 0xFFFFFFFF, 4: full >> 32}
    b.write(1, [(goff(i) + first, 4, halves[first])])
    e = b.phys(i)
    assert hw.pte_frame(e) == b.med.scratch_mfn and not e & hw.PTE_PRESENT
    other = 4 - first
    b.write(1, [(goff(i) + other, 4, halves[other])])
    assert b.phys(i) == hw.pte_encode(b.p2m(1, 0x123), hw.PTE_PRESENT)


def test_bad_gfn_scratch_present(b):
    i = b.first_index(1)
    b.write(1, [(goff(i), 8, hw.pte_encode(RAM + 5))])                  # in the hole: pin fails
    assert b.phys(i) == hw.pte_encode(b.med.scratch_mfn, hw.PTE_PRESENT)
    pins = b.calls.count("GFN_PIN")
    b.write(1, [(goff(i + 1), 8, hw.pte_encode(RAM + GFN_HOLE_FRAMES + 9))])   # beyond: no pin
    assert b.calls.count("GFN_PIN") == pins
    assert b.phys(i + 1) == hw.pte_encode(b.med.scratch_mfn, hw.PTE_PRESENT)


def test_not_present_scratch_and_unpin(b):
    i = b.first_index(1)
    b.write(1, [(goff(i), 8, hw.pte_encode(9)), (goff(i + 1), 8, hw.pte_encode(9))])
    assert b.hv.vms[1].pins[9] == 1
    b.write(1, [(goff(i), 8, hw.pte_encode(9, 0))])
    assert b.phys(i) == hw.pte_encode(b.med.scratch_mfn, 0)
    assert b.hv.vms[1].pins[9] == 1                 # index i+1 still holds it
    b.write(1, [(goff(i + 1), 8, 0)])
    assert b.hv.vms[1].pins[9] == 0
    flushes = b.gpu.ggtt_flushes
    b.write(1, [(goff(i), 8, hw.pte_encode(3))])
    assert b.gpu.ggtt_flushes == flushes + 1


def test_pv_info_page(b):
    v = b.med.vgpus[2]
    assert b.read(2, hw.PVINFO_BASE, 8) == hw.PV_MAGIC
    assert b.read(2, hw.PVINFO_BASE + hw.PV_VERSION_MAJOR_OFF, 4) == 1
    assert b.read(2, hw.PVINFO_BASE + hw.PV_VGT_ID_OFF) == 2
    assert b.read(2, hw.PVINFO_BASE + hw.PV_CAPS_OFF) & hw.VGT_CAPS_FULL_PPGTT
    assert b.read(2, hw.PVINFO_BASE + hw.PV_AVAIL_MAPPABLE_BASE) == v.part.aperture_base
    assert b.read(2, hw.PVINFO_BASE + hw.PV_AVAIL_NONMAPPABLE_SIZE) == 384 * hw.MiB
    assert b.read(2, hw.PVINFO_BASE + hw.PV_AVAIL_FENCE_NUM) == 4
    b.write(2, [(hw.PVINFO_BASE, 4, 0), (hw.PVINFO_BASE + hw.PV_G2V_NOTIFY, 4, 4)])
    assert b.read(2, hw.PVINFO_BASE, 8) == hw.PV_MAGIC          # read-only
    assert b.read(2, hw.PVINFO_BASE + hw.PV_G2V_NOTIFY) == 4


def test_ro_bits_and_masked_registers(b):
    mode = hw.RCS_BASE + hw.RING_GFX_MODE
    b.read(1, hw.PVINFO_BASE)
    b.write(1, [(mode, 4, hw.GFX_MODE_RUN_LIST_ENABLE)])             # no mask bit: no change
    assert b.read(1, mode) == 0
    b.write(1, [(mode, 4, hw.masked_enable(hw.GFX_MODE_RUN_LIST_ENABLE))])
    assert b.read(1, mode) == hw.GFX_MODE_RUN_LIST_ENABLE
    st = hw.RCS_BASE + hw.RING_EXECLIST_STATUS
    b.write(1, [(st, 4, 0xFFFF)])
    assert b.read(1, st) == 0
    ptr = hw.RCS_BASE + hw.RING_CSB_PTR
    b.write(1, [(ptr, 4, hw.masked_enable(0x707))])                  # write pointer is read-only
    assert b.read(1, ptr) & 0x7 == hw.CSB_PTR_RESET and b.read(1, ptr) & 0x700 == 0x700


def test_failsafe_when_execlists_enabled_before_pv_read(b):
    mode = hw.RCS_BASE + hw.RING_GFX_MODE
    b.write(1, [(mode, 4, hw.masked_enable(hw.GFX_MODE_RUN_LIST_ENABLE))])
    assert b.med.vgpus[1].failsafe == "unsupported_guest"
    i = b.first_index(1)
    b.write(1, [(goff(i), 8, hw.pte_encode(7))])
    assert b.read(1, goff(i), 8) == hw.pte_encode(7)                  # virtual copy only
    assert b.phys(i) == hw.pte_encode(b.med.scratch_mfn, hw.PTE_PRESENT)
    b.read(2, hw.PVINFO_BASE)
    b.write(2, [(mode, 4, hw.masked_enable(hw.GFX_MODE_RUN_LIST_ENABLE))])
    assert b.med.vgpus[2].failsafe is None


def test_capacity_by_type():
    a = GmAllocator(1024 * hw.MiB)
    assert a.available("_8") == 7 and a.available("_4") == 5 and a.available("_1") == 1
    parts = [a.allocate("_8") for _ in range(7)]
    with pytest.raises(GvtError) as e:
        a.allocate("_8")
    assert e.value.code == "ENOSPC"
    a.release(parts[0])
    assert a.available("_8") == 1
    with pytest.raises(GvtError) as e:
        Bench().med.create_vgpu(3, "_8")                             # no RAM region for VM 3
    assert e.value.code == "ENOENT"


def test_max_vgpus_setting():
    b = Bench()
    b.med.max_vgpus = 2
    with pytest.raises(GvtError) as e:
        b.med.create_vgpu(3, "_8")
    assert e.value.code == "ENOSPC" and "at most 2" in e.value.text


@pytest.mark.parametrize("payload", [{"op": "r", "off": "x", "size": 4}, {"op": "x"},
                                     {"op": "w", "off": b"\0\0\0\0", "size": b"", "val": b""}])
def test_bad_trap_payload(b, payload):
    before = b.gpu.ggtt.copy()
    with pytest.raises(GvtError) as e:
        b.trap(1, **payload)
    assert e.value.code == "EINVAL"
    assert (b.gpu.ggtt == before).all()


def test_c_and_python_translators_build_the_same_ggtt():
    rng = np.random.default_rng(3)
    out = []
    for t in ("c", "python"):
        b = Bench(t)
        i0 = b.first_index(1)
        idx = i0 + rng.integers(0, 1000, 500)
        gfns = rng.integers(0, RAM + GFN_HOLE_FRAMES + 100, 500)
        vals = [hw.pte_encode(int(g), int(f)) for g, f in zip(gfns, rng.integers(0, 4, 500))]
        b.write(1, [(goff(int(i)), 8, v) for i, v in zip(idx, vals)])
        out.append(b.gpu.ggtt.copy())
        rng = np.random.default_rng(3)
    assert (out[0] == out[1]).all()
