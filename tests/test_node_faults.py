"""Node faults by the launcher, with real processes: a kill -9 of each role, a new process of
it under the same name, and the recovery the README states per role. Each run must pass its
verdict (every operation completed, failed in the fault's window with a reason, or unknown with
the fault), keep every VM's memory to itself, and list the fault with its times; and what each
role's recovery did is checked where it shows (the mediator's gpu restores, the guest's lost
vGPU, the hypervisor's restarted VMs, a killed guest's incarnation)."""
import pytest

from bench import config
from bench.launch import Launcher
from nodes.wire.faults import FaultPlan, FaultSpecError


def _run(faults: list[str], fabric: str = "shm", duration: float = 4.0, seed: int = 5) -> dict:
    raw = {"run": {"duration_s": duration, "seed": seed, "fabric": fabric},
           "vgpus": {"count": 2, "ram_mib": 16},
           "load": {"mode": "open", "rate": 100, "hang_timeout_s": 1,
                    "mix": {"mmio-read": 0.3, "mmio-write": 0.2, "gtt-burst": 0.1, "submit": 0.3,
                            "ppgtt-churn": 0.1}},
           "faults": {"links": faults}}
    return Launcher(config.validate(raw, "test")).run()


def _passes(res: dict) -> None:
    assert res["verdict"] == "pass", res["reasons"]
    assert res["isolation"]["violations"] == 0 and res["isolation"]["pages_checked"] > 0
    for v in res["vgpus"]:
        assert v["probes"]["landed"] == v["probes"]["probes"] > 0, v["probes"]
        assert v["workloads"]["lost"] == 0 and v["workloads"]["duplicated"] == 0



@pytest.mark.parametrize("fabric", ["shm", "msg"])
def test_a_gpu_killed_and_started_again_is_restored_by_the_mediator(fabric):
    res = _run(["restart=gpu@1500ms"], fabric)
    _passes(res)
    [nf] = res["faults"]["nodes"]
    assert nf["node"] == "gpu/0" and nf["kind"] == "restart" and 1.4 <= nf["at_s"] < 3
    assert 0 < nf["ready_s"] < 10
    # workloads went on after the restart: the physical GGTT was rewritten from the shadows,
    # so the ledger's dump of the new gpu's GGTT matches every vGPU's mappings (probes landed)
    for v in res["vgpus"]:
        assert v["workloads"]["completed"] > 0
    # a workload the gpu ran when it died failed with the reset as reason, in the fault's window
    reasons = {r for v in res["vgpus"] for r in v["mediator"]["fail_reasons"]}
    costs = {c["fault"]: c for v in res["vgpus"] for c in v["fault_costs"]}
    assert "restart=gpu@1500ms" in costs
    failed = sum(v["workloads"]["failed"] - v["workloads"]["failed_expected"] for v in res["vgpus"])
    assert failed == sum(c["failed_workloads"] for v in res["vgpus"] for c in v["fault_costs"])
    # (a workload that hung on a PPGTT walk in the window showed up once in ~20 runs: charged to
    # the fault like the others, its cause not yet understood; see the closing note of issue 14)
    assert not reasons or any("GPU reset" in r or "engine reset" in r for r in reasons), reasons


def test_a_guest_killed_and_started_again_boots_a_new_vm_and_its_neighbour_is_untouched():
    res = _run(["kill=guest2@1s+500ms"])
    _passes(res)
    [nf] = res["faults"]["nodes"]
    assert nf["node"] == "guest2" and nf["kind"] == "kill" and nf["down_s"] >= 0.5
    g1, g2 = res["vgpus"]
    # the killed incarnation is in the ledger: what it had done and had in flight (unknown)
    [inc] = g2["incarnations"]
    assert inc["fault"] == "kill=guest2@1s+500ms" and inc["last_progress"]["issued"] > 0
    assert res["ledger"]["workloads"][2]["killed_in_flight"] == inc["in_flight"]
    # the new incarnation ran a load of its own to the end; the neighbour lost nothing
    assert g2["guest"]["issued"] > 0 and g2["guest"]["completed"] == g2["guest"]["issued"]
    assert not g1["incarnations"] and g1["guest"]["failed"] == 0
    assert all(c["failed_ops"] == 0 for c in g1["fault_costs"])


def test_a_restarted_mediator_loses_the_vgpus_and_the_guests_boot_them_again():
    res = _run(["restart=mediator@1500ms"])
    _passes(res)
    for v in res["vgpus"]:
        assert v["guest"]["vgpu_losses"] == 1
        # what failed, failed for the loss and in its window: nothing outside it
        assert v["guest"]["failed"] == sum(c["failed_ops"] for c in v["fault_costs"])
        assert v["guest"]["completed"] > 0
    assert "ENODEV" in str(res["errors"]["hypervisor/0"]["fault_failed_requests"]) or \
        all(v["guest"]["failed"] == 0 for v in res["vgpus"])


def test_a_restarted_hypervisor_takes_its_vms_with_it_and_they_start_again():
    res = _run(["restart=hypervisor@1500ms"])
    _passes(res)
    [nf] = res["faults"]["nodes"]
    assert nf["also_killed"] == ["guest1", "guest2"]
    for v in res["vgpus"]:
        [inc] = v["incarnations"]
        assert inc["fault"] == "restart=hypervisor@1500ms"
        assert v["guest"]["completed"] > 0


def test_a_gpu_killed_for_longer_than_the_liveness_timeout_comes_back():
    res = _run(["kill=gpu@1s"], duration=6.0)
    _passes(res)
    [nf] = res["faults"]["nodes"]
    assert nf["down_s"] >= 3.0          # kill without +D: back once its peers saw it die


def test_node_fault_specs_parse_and_random_times_follow_the_seed():
    plan = FaultPlan.parse(7, ["kill=gpu@2s", "kill=guest1@1s+300ms", "restart=mediator@random"],
                           duration_ns=10_000_000_000)
    kill, kill_d, restart = plan.nodes
    assert (kill.kind, kill.start_ns, kill.length_ns) == ("kill", 2_000_000_000, -1)
    assert kill_d.length_ns == 300_000_000 and restart.length_ns == 0
    assert 2_000_000_000 <= restart.start_ns <= 6_000_000_000
    again = FaultPlan.parse(7, ["kill=gpu@2s", "kill=guest1@1s+300ms", "restart=mediator@random"],
                            duration_ns=10_000_000_000)
    assert again.nodes == plan.nodes and again.describe() == plan.describe()
    other = FaultPlan.parse(8, ["kill=gpu@2s", "kill=guest1@1s+300ms", "restart=mediator@random"],
                            duration_ns=10_000_000_000)
    assert other.nodes[2].start_ns != restart.start_ns
    for bad, why in (("restart=gpu@1s+1s", r"restart=NODE@START$"), ("kill=gpu", r"NODE@START\[\+DOWN\]"),
                     ("kill=@1s", "kill=NODE"), ("restart=gpu@soon", "not a duration")):
        with pytest.raises(FaultSpecError, match=why):
            FaultPlan.parse(1, [bad])


def test_a_mediator_paused_past_the_liveness_timeout_resyncs_its_shadows():
    """SIGSTOP of the mediator for 4 s: the hypervisor takes it for dead and gives up what it
    had sent, tracked page-table writes among them (their stores are in guest RAM). When the
    mediator runs again it sees the hypervisor's new stream and checks every PPGTT shadow
    against guest memory before any new trap, so no workload stores through a stale shadow:
    the verdict passes, the RAM sweep included."""
    res = _run(["pause=mediator@1s+4s"], duration=7.0)
    _passes(res)
    [nf] = res["faults"]["nodes"]
    assert nf["kind"] == "pause" and nf["length_s"] >= 3.9
    for v in res["vgpus"]:
        assert v["workloads"]["misplaced"] == 0 and v["guest"]["completed"] > 0
