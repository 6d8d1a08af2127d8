"""The hypervisor's guest side, message by message: batching of posted writes, reads ordered
after the writes before them, a guest confined to its VM, WRITE_DONE and its outcomes, the
posted-write bound, and one VM's flood not holding back another's reads. Guests are recording
stand-ins; the mediator and gpu behind the hypervisor are the real cores."""
from __future__ import annotations

import numpy as np
import pytest

from harness import Bench, add_peer, make_bench
from nodes.actions import Post
from nodes.errors import GvtError
from nodes.hw import regs
from nodes.hypervisor.core import BATCHES_IN_FLIGHT
from nodes.wire.schema import pack_write_batch


@pytest.fixture
def bench():
    b = make_bench()
    b.setup([(1, "_8"), (2, "_8")])
    b.guests = {vm: add_peer(b.net, f"guest{vm}") for vm in (1, 2)}
    b.clear_log()
    yield b
    b.close()


def gpr(k: int) -> int:
    return regs.RCS_GPR0 + 4 * k


def post_writes(b: Bench, vm: int, writes: list[tuple[int, int]], first_w: int = 1) -> None:
    """The guest posts 4-byte writes, one message each, without the network running between."""
    def task():
        for n, (off, val) in enumerate(writes):
            yield Post("hypervisor", "MMIO_WRITE", {"off": off, "size": 4, "val": val, "w": first_w + n},
                       vgpu=vm)
    b.net.spawn(f"guest{vm}", task())


def trap_kinds(b: Bench) -> list[tuple[str, int]]:
    return [(e.kind, e.vgpu) for s, d, e in b.net.log if d == "mediator" and e.kind.startswith("TRAP")]


def test_posted_writes_go_to_the_mediator_as_one_batch(bench):
    post_writes(bench, 1, [(gpr(k), 10 + k) for k in range(5)])
    bench.net.run()
    batches = bench.net.sent("TRAP_WRITE")
    assert len(batches) == 1 and len(batches[0].payload["size"]) == 5
    done = bench.guests[1].of("WRITE_DONE")
    assert done == [{"first": 1, "last": 5, "n": 5, "status": "ok", "n_errors": 0, "errors": ()}]
    assert bench.net.call("guest1", "hypervisor", "MMIO_READ", {"off": gpr(4), "size": 4}, 1) == 14


def test_a_read_goes_after_the_writes_made_before_it(bench):
    post_writes(bench, 1, [(gpr(0), 1), (gpr(0), 2), (gpr(0), 3)])
    box = bench.net.spawn("guest1", _read(gpr(0), 1))
    bench.net.run(until=lambda: bool(box))
    assert box["value"] == 3
    assert trap_kinds(bench) == [("TRAP_WRITE", 1), ("TRAP_READ", 1)]


def _read(off: int, vm: int):
    from nodes.actions import Call
    return (yield Call("hypervisor", "MMIO_READ", {"off": off, "size": 4}, vgpu=vm))


def test_a_guest_acts_only_for_its_own_vm(bench):
    for kind, payload in (("MMIO_READ", {"off": gpr(0), "size": 4}),
                          ("GPA_READ", {"ops": [[0, 16]]})):
        with pytest.raises(GvtError) as e:
            bench.net.call("guest1", "hypervisor", kind, payload, 2)
        assert e.value.code == "EPERM" and "VM 1" in e.value.text
    for kind, payload in (("GFN_PIN", {"gfns": np.array([1], "<u8").tobytes()}),
                          ("GPA_WRITE", {"ops": [[0, b"x"]]}), ("INJECT_MSI", {})):
        with pytest.raises(GvtError) as e:             # the mediator's calls, not a guest's
            bench.net.call("guest1", "hypervisor", kind, payload, 1)
        assert e.value.code == "EPERM"
    # and its own VM it may read
    assert bench.net.call("guest1", "hypervisor", "GPA_READ", {"ops": [[0, 4]]}, 1) == (b"\0" * 4,)


def test_write_done_reports_the_accesses_the_mediator_refused(bench):
    def task():
        yield Post("hypervisor", "MMIO_WRITE_BATCH",
                   {**pack_write_batch([gpr(0), 3 << 20, gpr(1)], [4, 4, 4], [1, 2, 3]), "w": 7}, vgpu=1)
    bench.net.spawn("guest1", task())
    bench.net.run()
    (done,) = bench.guests[1].of("WRITE_DONE")
    assert (done["first"], done["last"], done["n"], done["status"]) == (7, 7, 3, "refused")
    assert list(done["refused"]) == [1]          # the second write of the message
    assert done["n_errors"] == 1 and "EFAULT" in done["errors"][0]


def test_write_done_splits_a_batch_around_the_message_with_a_refused_write(bench):
    """Messages merged into one TRAP_WRITE: only the one with the refused write says refused."""
    def task():
        for w, off in ((1, gpr(0)), (2, 3 << 20), (3, gpr(1)), (4, gpr(2))):
            yield Post("hypervisor", "MMIO_WRITE", {"off": off, "size": 4, "val": w, "w": w}, vgpu=1)
    bench.net.spawn("guest1", task())
    bench.net.run()
    done = [(d["first"], d["last"], d["n"], d["status"]) for d in bench.guests[1].of("WRITE_DONE")]
    assert (2, 2, 1, "refused") in done
    covered = sorted(w for first, last, _n, _st in done for w in range(first, last + 1))
    assert covered == [1, 2, 3, 4]
    assert all(st == "ok" for first, _l, _n, st in done if first != 2)


def test_write_done_covers_exactly_the_messages_of_a_batch_numbered_out_of_order(bench):
    """A guest may number its messages as it likes: each WRITE_DONE covers a run of consecutive
    numbers, so no number the guest did not send is ever reported done."""
    def task():
        for w in (10, 11, 20, 12, 13):
            yield Post("hypervisor", "MMIO_WRITE", {"off": gpr(0), "size": 4, "val": w, "w": w}, vgpu=1)
    bench.net.spawn("guest1", task())
    bench.net.run()
    assert len(bench.net.sent("TRAP_WRITE")) == 1
    done = [(d["first"], d["last"], d["n"], d["status"]) for d in bench.guests[1].of("WRITE_DONE")]
    assert done == [(10, 11, 2, "ok"), (20, 20, 1, "ok"), (12, 13, 2, "ok")]


def test_a_batch_with_ragged_fields_is_refused_whole(bench):
    def task():
        yield Post("hypervisor", "MMIO_WRITE_BATCH", {"off": b"\0" * 8, "size": b"\4", "val": b"\0" * 8},
                   vgpu=1)
    bench.net.spawn("guest1", task())
    bench.net.run()
    assert not bench.net.sent("TRAP_WRITE") and not bench.guests[1].of("WRITE_DONE")


def test_posted_writes_past_the_bound_are_refused_with_eagain(bench):
    bench.hv.max_posted = 4
    bench.net.lose = lambda s, d, e: d == "mediator"            # a mediator that never answers
    post_writes(bench, 1, [(gpr(0), k) for k in range(6)])
    bench.net.run(advance=False)
    done = bench.guests[1].of("WRITE_DONE")
    assert [(d["first"], d["status"]) for d in done] == [(5, "failed"), (6, "failed")]
    assert all("EAGAIN" in d["reason"] and "limit is 4" in d["reason"] for d in done)


def test_a_write_whose_answer_never_comes_has_an_unknown_outcome(bench):
    bench.net.lose = lambda s, d, e: s == "mediator" and e.kind == "REPLY"
    post_writes(bench, 1, [(gpr(0), 5)])
    bench.net.run()                         # virtual time runs past the call timeout
    (done,) = bench.guests[1].of("WRITE_DONE")
    assert done["status"] == "unknown" and "ETIMEDOUT" in done["reason"]
    bench.net.lose = None
    # it was applied all the same: the mediator just did not answer
    assert bench.net.call("guest1", "hypervisor", "MMIO_READ", {"off": gpr(0), "size": 4}, 1) == 5


def test_one_vms_flood_does_not_hold_back_another_vms_read(bench):
    """With vm1's writes queued by the thousand, vm2's read reaches the mediator behind at most
    the batches vm1 may have in flight, not behind vm1's whole queue."""
    n = 100
    def flood():
        for w in range(1, n + 1):
            yield Post("hypervisor", "MMIO_WRITE_BATCH",
                       {**pack_write_batch([gpr(w % 16)] * 4096, [4] * 4096, [w] * 4096), "w": w}, vgpu=1)
    bench.net.spawn("guest1", flood())
    box = bench.net.spawn("guest2", _read(gpr(0), 2))
    bench.net.run(until=lambda: bool(box))
    kinds = trap_kinds(bench)
    at = kinds.index(("TRAP_READ", 2))
    assert kinds[:at].count(("TRAP_WRITE", 1)) <= BATCHES_IN_FLIGHT
    assert sum(1 for k in kinds if k == ("TRAP_WRITE", 1)) < n      # vm1 still has a queue
    assert bench.hv.vms[1].queued > 0


def test_inject_msi_reaches_the_guest_as_an_irq_and_undelivered_ones_merge(bench):
    """INJECT_MSI is posted. MSIs that come before the first is delivered merge into one IRQ, as
    the LAPIC's IRR bit does; one after delivery is an IRQ of its own."""
    from nodes.actions import Post

    def three():
        for _ in range(3):
            yield Post("hypervisor", "INJECT_MSI", {"vector": 0x41}, vgpu=1)
    bench.net.spawn("mediator", three())
    bench.net.run()
    assert bench.guests[1].of("IRQ") == [{"vector": 0x41}]
    assert bench.hv.vms[1].msi_injected == 3 and bench.hv.vms[1].msi_merged == 2
    bench.net.post("mediator", "hypervisor", "INJECT_MSI", {"vector": 0x41}, 1)
    assert bench.guests[1].of("IRQ") == [{"vector": 0x41}] * 2
    assert not bench.guests[2].of("IRQ")
    bench.net.post("mediator", "hypervisor", "INJECT_MSI", {}, 9)       # no such VM: refused, not sent
    assert len(bench.guests[1].of("IRQ")) == 2 and not bench.guests[2].of("IRQ")
    assert bench.net.call("mediator", "hypervisor", "GFN_PIN", {"gfns": b"\0" * 8}, 1)    # still serving


def test_gpa_read_larger_than_a_frame_is_e2big_naming_the_limit(bench):
    ops = [[k * 4096, 4096] for k in range(300)]                    # 1.2 MiB
    with pytest.raises(GvtError) as e:
        bench.net.call("mediator", "hypervisor", "GPA_READ", {"ops": ops}, 1)
    assert e.value.code == "E2BIG" and "frame limit 1048576" in e.value.text


def test_pins_are_counted_and_released(bench):
    gfns = np.array([5, 6, 6, 1 << 30], "<u8").tobytes()
    r = bench.net.call("mediator", "hypervisor", "GFN_PIN", {"gfns": gfns}, 1)
    mfns = np.frombuffer(r["mfns"], "<u8")
    assert mfns[3] == 0 and mfns[0] == bench.hv.vms[1].p2m[5]
    assert bench.hv.vms[1].pins[6] == 2
    bench.net.post("mediator", "hypervisor", "GFN_UNPIN", {"gfns": gfns}, 1)
    assert not bench.hv.vms[1].pins.any()
