"""The topology: node ids, the split of VMs over GPUs, links and who may make them, memory
regions and their owners, endpoints and key names, all from the config; and a node of one GPU
refusing a node of another over a real socket."""
from pathlib import Path

import pytest

from bench import config
from bench.config import ConfigError
from nodes.errors import GvtError
from nodes.node import accepted_roles, needed_peers
from nodes.topology import Topology, split_vms, vm_endpoint_name
from nodes.wire.faults import FaultPlan
from nodes.wire.schema import (MAX_GPUS, MAX_HYPERVISORS, canonical, key_stem, node_id,
                               node_of_key_stem, parse_node, split_node)
from tests.wireclient import RawPeer, start_node, stop, wait_for, scrape, free_port


def _topo(gpus: int, vgpus: int, fabric: str = "shm") -> Topology:
    return Topology(config.validate({"gpu": {"count": gpus}, "vgpus": {"count": vgpus, "ram_mib": 8},
                                     "run": {"fabric": fabric}}, "test"))


# ---- ids ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, parsed", [
    ("gpu", ("gpu", 0, 0)), ("gpu/0", ("gpu", 0, 0)), ("mediator/3", ("mediator", 3, 0)),
    ("hypervisor/15", ("hypervisor", 15, 0)), ("guest12", ("guest", None, 12)),
    ("launcher", ("launcher", None, 0))])
def test_node_ids_parse(name, parsed):
    assert parse_node(name) == parsed


@pytest.mark.parametrize("name, parsed", [
    ("hypervisor/0.1", ("hypervisor", 0, 0, 1)), ("hypervisor/15.7", ("hypervisor", 15, 0, 7)),
    ("hypervisor.3", ("hypervisor", 0, 0, 3)), ("hypervisor/2", ("hypervisor", 2, 0, 0))])
def test_a_gpus_further_hypervisors_have_ids_of_their_own(name, parsed):
    assert split_node(name) == parsed
    assert canonical(name) == node_id("hypervisor", parsed[1], 0, parsed[3])
    assert node_of_key_stem(key_stem(name)) == canonical(name)


@pytest.mark.parametrize("bad", ["gpu/", "gpu/01", "gpu/-1", f"gpu/{MAX_GPUS}", "guest0", "guest",
                                 "guests/0", "mediator/x", "launcher/0", "", "a" * 500,
                                 "hypervisor/0.0", "hypervisor.0", f"hypervisor/0.{MAX_HYPERVISORS}",
                                 "hypervisor/0.01", "gpu/0.1", "mediator.1", "hypervisor.1/0"])
def test_a_name_that_is_no_node_is_refused_naming_the_forms(bad):
    with pytest.raises(GvtError) as e:
        parse_node(bad)
    assert e.value.code == "EINVAL" and "gpu/G" in e.value.text and len(e.value.text) < 300


def test_one_spelling_per_node_and_its_key_file():
    assert canonical("mediator") == canonical("mediator/0") == "mediator/0"
    assert canonical("guest3") == "guest3"
    assert key_stem("hypervisor") == "hypervisor-0" and key_stem("gpu/2") == "gpu-2"
    for n in ("gpu/0", "mediator/7", "hypervisor/1", "guest4", "launcher"):
        assert node_of_key_stem(key_stem(n)) == n


# ---- the split -----------------------------------------------------------------------------------
def test_vms_go_over_the_gpus_in_order_the_first_taking_the_rest():
    assert split_vms(7, 3) == [(1, 2, 3), (4, 5), (6, 7)]
    assert split_vms(4, 1) == [(1, 2, 3, 4)]
    assert split_vms(2, 2) == [(1,), (2,)]
    t = _topo(2, 5)
    assert [st.vms for st in t.stacks] == [(1, 2, 3), (4, 5)]
    assert [t.gpu_of(v) for v in range(1, 6)] == [0, 0, 0, 1, 1]
    assert t.node_ids() == ["gpu/0", "mediator/0", "hypervisor/0", "gpu/1", "mediator/1",
                            "hypervisor/1", "guest1", "guest2", "guest3", "guest4", "guest5"]
    assert t.stack_of("guest4").index == 1 and t.stack_of("mediator/1").index == 1
    assert t.stack_of("launcher") is None
    with pytest.raises(GvtError, match="VM 6 is not in this run"):
        t.gpu_of(6)
    with pytest.raises(GvtError, match="GPU 2 is not in this run"):
        t.stack(2)


def test_a_config_with_more_gpus_than_vgpus_or_too_many_gpus_is_refused():
    with pytest.raises(ConfigError, match="gpu.count"):
        config.validate({"gpu": {"count": 3}, "vgpus": {"count": 2}}, "test")
    with pytest.raises(ConfigError, match="gpu.count"):
        config.validate({"gpu": {"count": MAX_GPUS + 1}, "vgpus": {"count": 64}}, "test")


# ---- links ------------------------------------------------------------------------------------------
def test_links_stay_within_a_gpu_and_follow_the_fabric():
    t = _topo(2, 4)
    links = set(t.links())
    assert ("mediator/1", "gpu/1") in links and ("hypervisor/1", "mediator/1") in links
    assert ("guest3", "hypervisor/1") in links and ("guest2", "hypervisor/0") in links
    assert all((n, "launcher") in links for n in t.node_ids())
    # no link crosses GPUs: each GPU's nodes serve only it
    for a, b in links:
        if b != "launcher":
            assert t.stack_of(a).index == t.stack_of(b).index, (a, b)
    # shm: the gpu reaches guest RAM itself and links to nobody; msg: it asks the hypervisor
    assert not any(a.startswith("gpu/") and b != "launcher" for a, b in links)
    msg = set(_topo(2, 4, "msg").links())
    assert ("gpu/0", "hypervisor/0") in msg and ("gpu/1", "hypervisor/1") in msg


def test_who_may_connect_to_whom():
    t = _topo(1, 2)
    assert t.accepted_roles("gpu") == {"mediator", "launcher"}
    assert t.accepted_roles("mediator") == {"hypervisor", "launcher"}
    assert t.accepted_roles("hypervisor") == {"guest", "launcher"}       # shm: no gpu
    assert _topo(1, 2, "msg").accepted_roles("hypervisor") == {"guest", "gpu", "launcher"}
    assert t.accepted_roles("guest") == {"launcher"}
    cfg = t.cfg
    assert needed_peers("hypervisor", cfg) == ["mediator"] and accepted_roles("gpu", cfg) == t.accepted_roles("gpu")


def test_a_node_names_its_own_gpus_peers_by_role_and_the_launcher_by_id():
    t = _topo(2, 2)
    assert t.qualify("guest2", "hypervisor") == "hypervisor/1"
    assert t.qualify("mediator/1", "gpu") == "gpu/1"
    assert t.qualify("mediator/1", "launcher") == "launcher"
    assert Topology.local_name("mediator/1", "gpu/1") == "gpu"
    assert Topology.local_name("launcher", "gpu/1") == "gpu/1"
    assert Topology.local_name("launcher", "mediator") == "mediator/0"


# ---- memory and endpoints ------------------------------------------------------------------------
def test_each_gpu_has_its_own_dma_space_pool_and_vm_regions():
    t = _topo(2, 3)
    assert t.regions() == {"host0": "mediator/0", "vm1": "hypervisor/0", "vm2": "hypervisor/0",
                           "host1": "mediator/1", "vm3": "hypervisor/1"}
    l0, l1 = t.layout(0), t.layout(1)
    assert [r.name for r in l0.regions] == ["host0", "vm1", "vm2"]
    assert [r.name for r in l1.regions] == ["host1", "vm3"]
    # both spaces start at the same machine frame (an IOMMU domain each): GPU 1 has no frame
    # of GPU 0's VMs, and the same frame number means another page there
    assert l0.host.base_mfn == l1.host.base_mfn and l0.host.frames == l1.host.frames
    assert "vm1" not in l1.by_name and "vm3" not in l0.by_name
    assert l1.vm_region(3).base_mfn == l0.vm_region(1).base_mfn


def test_endpoints_the_launcher_hands_out():
    t = _topo(2, 3)
    b = t.binders()
    assert b["launcher"] is None
    for st in t.stacks:
        for n in st.nodes:
            assert b[n] == n
    assert b[vm_endpoint_name("hypervisor/0", 2)] == "hypervisor/0"
    assert b["hypervisor/1.vm3"] == "hypervisor/1"
    assert "hypervisor/1.vm1" not in b and len(b) == 1 + 6 + 3


def test_a_fault_rule_naming_a_role_covers_it_on_every_gpu_and_an_id_one():
    plan = FaultPlan.parse(1, ["link=hypervisor-mediator:drop=0.5", "link=guest3-hypervisor/1:dup=0.5",
                               "kill=gpu@1s", "pause=mediator/1@1s+1s"])
    assert [n.node for n in plan.nodes] == ["gpu/0", "mediator/1"]
    assert plan.for_link("hypervisor/0", "mediator/0") is not None
    assert plan.for_link("hypervisor/1", "mediator/1") is not None
    assert plan.for_link("guest3", "hypervisor/1") is not None
    assert plan.for_link("guest3", "hypervisor/0") is None


def test_node_faults_on_a_gpu_that_is_not_in_the_run_are_refused():
    with pytest.raises(ConfigError, match="mediator/1"):
        config.validate({"vgpus": {"count": 2}, "faults": {"links": ["kill=mediator/1@1s"]}}, "test")
    config.validate({"gpu": {"count": 2}, "vgpus": {"count": 2},
                     "faults": {"links": ["kill=mediator/1@1s"]}}, "test")


# ---- several hypervisors serving one mediator --------------------------------------------------
def _hv_topo(vgpus: int, hvs: int, gpus: int = 1, fabric: str = "msg") -> Topology:
    return Topology(config.validate({"gpu": {"count": gpus, "hypervisors": hvs},
                                     "vgpus": {"count": vgpus, "ram_mib": 8},
                                     "run": {"fabric": fabric, "transport": "tcp"}}, "test"))


def test_a_gpus_vms_split_over_its_hypervisors_with_their_links_regions_and_endpoints():
    t = _hv_topo(5, 2)
    st = t.stack(0)
    assert st.hypervisors == ["hypervisor/0", "hypervisor/0.1"]
    assert st.hv_vms == ((1, 2, 3), (4, 5)) and st.vms_of("hypervisor/0.1") == (4, 5)
    assert t.node_ids()[:4] == ["gpu/0", "mediator/0", "hypervisor/0", "hypervisor/0.1"]
    links = set(t.links())
    # each hypervisor links to the one mediator; each guest to its own VM's hypervisor; the gpu
    # (msg fabric: DMA by messages to the region's owner) to every hypervisor of its GPU
    assert {("hypervisor/0", "mediator/0"), ("hypervisor/0.1", "mediator/0"),
            ("gpu/0", "hypervisor/0"), ("gpu/0", "hypervisor/0.1"),
            ("guest3", "hypervisor/0"), ("guest4", "hypervisor/0.1")} <= links
    assert ("guest4", "hypervisor/0") not in links and ("guest1", "hypervisor/0.1") not in links
    assert t.peers_of("gpu/0") == ["hypervisor", "hypervisor.1"]
    # a VM's RAM is served by its own hypervisor
    assert t.regions() == {"host0": "mediator/0", "vm1": "hypervisor/0", "vm2": "hypervisor/0",
                           "vm3": "hypervisor/0", "vm4": "hypervisor/0.1", "vm5": "hypervisor/0.1"}
    b = t.binders()
    assert b["hypervisor/0.1"] == b["hypervisor/0.1.vm4"] == "hypervisor/0.1"
    assert b["hypervisor/0.vm3"] == "hypervisor/0" and "hypervisor/0.vm4" not in b
    # how the nodes of the GPU name each other, and back
    assert t.local_name("mediator/0", "hypervisor/0.1") == "hypervisor.1"
    assert t.local_name("guest4", "hypervisor/0.1") == "hypervisor"
    assert t.qualify("guest4", "hypervisor") == "hypervisor/0.1"
    assert t.qualify("gpu/0", "hypervisor.1") == "hypervisor/0.1"
    # shm: the gpu reaches guest RAM itself and links to no hypervisor
    assert _hv_topo(5, 2, fabric="shm").peers_of("gpu/0") == []


def test_more_hypervisors_than_a_gpus_vms_are_refused():
    with pytest.raises(GvtError, match="GPU 1 has 2 VMs: every hypervisor needs a VM"):
        _hv_topo(5, 3, gpus=2)
    with pytest.raises(ConfigError, match="gpu.hypervisors"):
        config.validate({"gpu": {"hypervisors": MAX_HYPERVISORS + 1}, "vgpus": {"count": 9}}, "test")


def test_the_mediator_takes_a_vms_accesses_only_from_the_hypervisor_that_runs_it():
    from harness import make_bench
    from nodes.wire.codec import Envelope
    b = make_bench()
    try:
        b.setup([(1, "_8")])
        med = b.mediator
        v = med.vgpus[1]
        read = Envelope("TRAP_READ", 1, 0, 1, 0, 1, {"off": 0x78000, "size": 4}, peer="hypervisor.1")
        with pytest.raises(GvtError) as e:
            med.handle(read, 0)
        assert e.value.code == "EPERM" and f"runs on {v.hypervisor}, not hypervisor.1" in e.value.text
        read.peer = v.hypervisor
        med.handle(read, 0)         # its own hypervisor's read is emulated
    finally:
        b.close()


# ---- a real node of GPU 1 --------------------------------------------------------------------------
def test_a_node_of_one_gpu_refuses_the_nodes_of_another(short_ipc_dir):
    d = Path(short_ipc_dir)
    cfg = d / "c.toml"
    cfg.write_text("[gpu]\ncount = 2\n[vgpus]\ncount = 2\nram_mib = 8\n")
    ep, port = f"ipc://{d}/g1", free_port()
    proc = start_node("gpu", cfg, ep, "--gpu", "1", metrics_port=port, log=d / "gpu.log")
    try:
        wait_for(lambda: _serving(proc, port), 30, "gpu/1 to serve")
        wrong = RawPeer(ep, "mediator/0")
        try:
            r = wrong.hello(role="mediator")
            assert r[0] == "ERROR" and r[6]["code"] == "EPERM", r
            assert "serves GPU 0, this node GPU 1" in r[6]["text"], r
        finally:
            wrong.close()
        right = RawPeer(ep, "mediator/1")
        try:
            assert right.hello(role="mediator")[0] == "REPLY"
            r = right.call("MMIO_READ", {"off": 0x2358, "size": 4})    # its timestamp register
            assert r[0] == "REPLY", r
        finally:
            right.close()
        assert proc.poll() is None
    finally:
        stop(proc)


def _serving(proc, port: int) -> bool:
    assert proc.poll() is None, "the node exited"
    try:
        return bool(scrape(port))
    except OSError:
        return False


# ---- real runs -------------------------------------------------------------------------------------
MIXED = {"mmio-read": 0.3, "mmio-write": 0.2, "gtt-burst": 0.1, "submit": 0.3, "ppgtt-churn": 0.1}


def _real_run(run: dict, gpu: dict, vgpus: dict | None = None, load: dict | None = None,
              faults: list[str] | None = None) -> dict:
    """A run of 3 small vGPUs under the mixed open-loop load, with what a test changes."""
    from bench.launch import Launcher
    raw = {"run": run, "gpu": gpu, "vgpus": {"count": 3, "ram_mib": 8, **(vgpus or {})},
           "load": {"mode": "open", "rate": 120, "mix": MIXED, **(load or {})},
           "faults": {"links": faults or []}}
    return Launcher(config.validate(raw, "test")).run()


# ---- a real run on two GPUs ------------------------------------------------------------------------
def test_a_run_on_two_gpus_passes_with_each_gpu_serving_its_own_vms():
    res = _real_run({"duration_s": 2.5, "seed": 3}, {"count": 2})
    assert res["verdict"] == "pass", res["reasons"]
    assert res["gpus"] == [{"index": 0, "vms": [1, 2], "nodes": ["gpu/0", "mediator/0", "hypervisor/0"],
                            "hypervisors": {"hypervisor/0": [1, 2]}},
                           {"index": 1, "vms": [3], "nodes": ["gpu/1", "mediator/1", "hypervisor/1"],
                            "hypervisors": {"hypervisor/1": [3]}}]
    assert [(v["id"], v["gpu"]) for v in res["vgpus"]] == [(1, 0), (2, 0), (3, 1)]
    for v in res["vgpus"]:
        assert v["workloads"]["completed"] > 0 and v["workloads"]["lost"] == 0
        assert v["probes"]["landed"] == v["probes"]["probes"] > 0
    # every VM's RAM and both host pools were checked page by page
    assert res["isolation"]["violations"] == 0 and res["isolation"]["pages_checked"] > 0
    # each GPU's nodes are in the run's books under their ids
    assert {"gpu/1", "mediator/1", "hypervisor/1"} <= set(res["errors"])
    assert all(e["internal_errors"] == 0 for e in res["errors"].values())


def test_a_run_with_two_hypervisors_on_one_gpu_passes_each_serving_its_own_vms():
    """Several hypervisors may serve one mediator: each runs its VMs (their RAM, their traps),
    the mediator's vGPUs answer to their own hypervisor, the gpu's DMA goes to the owner of each
    VM's RAM (msg fabric over tcp with CURVE, as across hosts)."""
    res = _real_run({"duration_s": 2.5, "seed": 3, "transport": "tcp", "fabric": "msg"},
                    {"hypervisors": 2})
    assert res["verdict"] == "pass", res["reasons"]
    [g] = res["gpus"]
    assert g["hypervisors"] == {"hypervisor/0": [1, 2], "hypervisor/0.1": [3]}
    for v in res["vgpus"]:
        assert v["stages"]["hypervisor"]["mmio_read"]["count"] > 0, v["id"]
        assert v["workloads"]["completed"] > 0 and v["workloads"]["lost"] == 0
        assert v["probes"]["landed"] == v["probes"]["probes"] > 0
    assert res["isolation"]["violations"] == 0 and res["isolation"]["pages_checked"] > 0
    assert {"hypervisor/0", "hypervisor/0.1"} <= set(res["errors"])
    assert all(e["internal_errors"] == 0 for e in res["errors"].values())
    assert set(res["resources"]["processes"]) >= {"hypervisor/0", "hypervisor/0.1"}


def test_a_restarted_hypervisor_takes_down_only_its_own_vms():
    """The VMs die with their hypervisor, not with another hypervisor of the same GPU."""
    res = _real_run({"duration_s": 4, "seed": 5, "fabric": "msg"}, {"hypervisors": 2},
                    vgpus={"per_process": 1}, load={"rate": 100, "hang_timeout_s": 1},
                    faults=["restart=hypervisor/0.1@1500ms"])
    assert res["verdict"] == "pass", res["reasons"]
    [nf] = res["faults"]["nodes"]
    assert nf["node"] == "hypervisor/0.1" and nf["also_killed"] == ["guest3"]
    inc = {v["id"]: v["incarnations"] for v in res["vgpus"]}
    assert inc[1] == inc[2] == [] and len(inc[3]) == 1
    assert all(v["guest"]["completed"] > 0 for v in res["vgpus"])
