"""Runs on a faulty network: real processes whose links drop, duplicate, reorder, delay and
corrupt frames and are partitioned, by a seeded plan. The link protocol must deliver every
message once and in order, so the verdict is a clean run's, and the result lists the plan and
what each link met."""
import subprocess
import sys

import pytest

from bench import config
from bench.launch import Launcher
from nodes.wire.faults import FaultPlan

PLAN = ["drop=0.05", "dup=0.05", "reorder=0.05", "corrupt=0.02", "delay=200us+-200us",
        "partition=hypervisor-mediator@1s+500ms", "pause=gpu@300ms+800ms"]


@pytest.fixture(scope="module")
def faulty():
    raw = {"run": {"duration_s": 3, "ops": 400, "seed": 21},
           "vgpus": {"count": 2, "ram_mib": 16},
           "load": {"mode": "closed", "concurrency": 4, "burst": 32,
                    "mix": {"mmio-read": 0.3, "mmio-write": 0.3, "gtt-burst": 0.1, "submit": 0.3}},
           "faults": {"links": PLAN}}
    return Launcher(config.validate(raw, "test")).run()


def test_a_run_on_a_faulty_network_passes_with_every_message_once(faulty):
    assert faulty["verdict"] == "pass", faulty["reasons"]
    rows = faulty["ledger"]["links"]
    # conservation per link: every message sent arrived once; the protocol's work is counted apart
    for r in rows:
        if r["received"] is not None and r["to"] != "launcher":    # the STATS reply: in flight
            assert r["sent"] == r["received"] and r["gaps"] == 0, r
    under = [r for r in rows if "launcher" not in (r["from"], r["to"])]
    assert sum(r["retransmits"] for r in under) > 0
    assert sum(r["duplicates"] for r in under) > 0 and sum(r["corrupt"] for r in under) > 0
    for v in faulty["vgpus"]:
        w = v["workloads"]
        assert w["submitted"] > 0 and w["completed"] == w["submitted"], w
    assert faulty["isolation"]["violations"] == 0


def test_the_result_lists_the_plan_and_what_each_link_met(faulty):
    f = faulty["faults"]
    assert f["seed"] == 21 and f["specs"] == PLAN
    assert f["plan"] == FaultPlan.parse(21, PLAN).describe()
    assert {"drop", "dup", "reorder", "corrupt", "partition"} <= {k for k, n in f["totals"].items() if n}
    links = {x["link"] for x in f["links"]}
    assert "hypervisor/0>mediator/0" in links and "mediator/0>hypervisor/0" in links
    assert not any("launcher" in x for x in links)
    # every fault played is listed with its time (delays are only counted), up to the log's bound
    for x in f["links"]:
        logged = sum(x[k] for k in ("drop", "dup", "reorder", "corrupt", "partition"))
        assert len(x["log"]) == min(logged, 2000), x["link"]
        assert all(t >= 0 for t, _k in x["log"]) and [t for t, _k in x["log"]] == sorted(t for t, _k in x["log"])
        for kind in ("drop", "dup", "reorder", "corrupt", "partition"):
            if logged <= 2000:
                assert sum(1 for _t, k in x["log"] if k == kind) == x[kind], (x["link"], kind)
    part = {x["link"]: x["partition"] for x in f["links"]}
    assert part["hypervisor/0>mediator/0"] > 0 and part.get("guest1>hypervisor/0", 0) == 0
    # the gpu was stopped for less than the liveness timeout: delayed, nothing lost
    [pause] = f["nodes"]
    assert pause["node"] == "gpu/0" and pause["kind"] == "pause" and pause["at_s"] >= 0.3
    assert 0.75 <= pause["length_s"] < 2.0     # the launcher's timer may wake a few ms early


def test_a_bad_fault_spec_is_refused_naming_it(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--fault", "drop=1.5",
                        "--duration", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "drop=1.5" in r.stderr and "outside [0, 1]" in r.stderr, r.stderr
    bad = tmp_path / "f.toml"
    for spec, why in (("link=gpu:drop=0.1", "names no link"), ("pause=gpu@1s", r"NODE@START\+LENGTH"),
                      ("pause=guest9@1s+1s", "no node 'guest9'")):
        bad.write_text(f'[faults]\nlinks = ["{spec}"]\n')
        with pytest.raises(config.ConfigError, match="faults.links.*" + why):
            config.load(str(bad))
