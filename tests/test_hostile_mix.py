"""The `hostile` load mix, on the real cores (sans-IO harness, virtual time): a malicious guest's
whole campaign next to a benign neighbour, judged by the ledger's own checks.

Every attack must end as the kernel ends it, the attacker's vGPU must end in failsafe, the
neighbour must complete all its work, and no byte may change outside what each guest and its
workloads wrote (both VMs' RAM and the host pool are swept)."""
from __future__ import annotations

import pytest

from bench import ledger
from harness import SEED, add_guest, make_bench
from nodes.guest import hostile
from nodes.guest.core import LoadSpec

pytestmark = pytest.mark.xdist_group("sansio-hostile")

NAMES = ("gpu", "mediator", "hypervisor", "guest1", "guest2")


def _campaign(scratch: str = "kernel", repeat: int = 2):
    b = make_bench(shadow_quota=96, scratch=scratch)
    b.setup([(1, "_8"), (2, "_8")])
    attacker = add_guest(b.net, 1, 16384, SEED, LoadSpec(
        mix={"submit": 0.4, "mmio-read": 0.2, "mmio-write": 0.2, "hostile": 0.2}, mode="closed",
        concurrency=4, duration_s=1000, ops=400, hostile_repeat=repeat))
    neighbour = add_guest(b.net, 2, 16384, SEED, LoadSpec(
        mix={"submit": 0.6, "ppgtt-churn": 0.2, "mmio-read": 0.2}, mode="closed", concurrency=4,
        duration_s=1000, ops=300))
    guests = (attacker, neighbour)
    for g in guests:
        b.net.spawn(f"guest{g.vm}", g.boot_and_start(True, None, b.net.now))
    b.net.run(until=lambda: all(g.state in ("drained", "failed") for g in guests), max_steps=5_000_000)
    assert [g.state for g in guests] == ["drained", "drained"]
    reports = {g.vm: g.report(b.net.now) for g in guests}
    rams = {g.vm: b.net.call("launcher", f"guest{g.vm}", "RAM_VERIFY", None, g.vm, timeout=60)
            for g in guests}
    pool = b.net.call("launcher", "mediator", "POOL_CHECK")
    snaps = {n: b.net.engines[n].snapshot() for n in NAMES}     # what STATS answers
    return b, reports, rams, pool, snaps


@pytest.fixture(scope="module")
def campaign():
    return _campaign()


def test_every_attack_ends_as_the_kernel_ends_it_and_the_attacker_ends_in_failsafe(campaign):
    b, reports, _rams, _pool, _snaps = campaign
    v1 = b.mediator.vgpus[1]
    summary, reasons = ledger.check_hostile(1, reports[1]["hostile"], v1.failsafe)
    assert reasons == []
    assert summary["attempted"] == summary["planned"] == len(hostile.campaign(2))
    for a in hostile.ATTACKS:
        st = summary["attacks"][a.kind]
        assert st["attempts"] == (2 if not a.failsafe else 1), a.kind
        assert st["unexpected"] == 0 and sum(st[o] for o in hostile.OUTCOMES) == st["attempts"], a.kind
    assert v1.failsafe == v1.FAILSAFE_GUEST_ERR
    # each failsafe attack but the last was followed by a VM reset and a new boot
    assert summary["reboots"] == sum(a.failsafe for a in hostile.ATTACKS) - 1
    assert b.hv.stats.get("gvtbench_hv_vm_resets", (1,)) == summary["reboots"]
    # the parser's refusals are counted by code, and EBADRQC/EFAULT are among them
    assert {"EBADRQC", "EFAULT"} <= set(v1.refusals)


def test_the_neighbour_completes_everything_and_no_byte_moved_outside_its_owner(campaign):
    b, reports, rams, pool, _snaps = campaign
    assert ledger.check_workloads(reports, frozenset({1})) == []
    for vm in (1, 2):
        assert ledger.check_gpu_workloads(vm, reports[vm]["workloads"], rams[vm], vm == 1) == []
        assert rams[vm]["violations"] == 0 and rams[vm]["pages_checked"] > 0
    wl = reports[2]["workloads"]
    assert wl["submitted"] == wl["completed"] > 50 and wl["failed"] == wl["lost"] == 0
    assert reports[2]["failed"] == 0
    assert b.mediator.vgpus[2].failsafe is None and b.mediator.vgpus[2].fail_reasons == {}
    # the host pool, every level of every shadow table included, holds only mediator data
    assert pool["violations"] == 0 and pool["pages_checked"] == b.mediator.pool.region.frames
    assert not pool.get("scratch_dirty")


def test_the_nodes_count_the_attackers_refusals_apart_and_no_bug(campaign):
    _b, _reports, _rams, _pool, snaps = campaign
    summary, reasons = ledger.check_errors(snaps, frozenset({1}))
    assert reasons == []
    assert all(row["internal_errors"] == 0 for row in summary.values())
    assert summary["mediator"]["hostile_failed_requests"]        # the refused tracked writes
    # the same counts with the attacker taken for a benign guest fail the verdict
    _, as_benign = ledger.check_errors(snaps, frozenset())
    assert any("requests failed that the run did not expect" in r for r in as_benign)


def test_the_campaign_in_the_fault_scratch_mode_is_contained_too():
    b, reports, rams, pool, snaps = _campaign(scratch="fault", repeat=1)
    assert ledger.check_hostile(1, reports[1]["hostile"], b.mediator.vgpus[1].failsafe)[1] == []
    assert ledger.check_workloads(reports, frozenset({1})) == []
    assert rams[1]["violations"] == rams[2]["violations"] == pool["violations"] == 0
    assert ledger.check_errors(snaps, frozenset({1}))[1] == []


def test_the_readme_lists_every_attack_with_what_it_ends_in():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("| attack | what it does | ends |"):].splitlines()[2:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table if line.startswith("|")]
    rows = rows[:len(hostile.ATTACKS)]
    assert [r[0].strip("`") for r in rows] == [a.kind for a in hostile.ATTACKS]
    for r, a in zip(rows, hostile.ATTACKS):
        assert r[1] == a.what and set(r[2].split(" or ")) == set(a.expect), a.kind
