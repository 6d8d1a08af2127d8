"""Workloads with the real processes: configs/workloads.toml passes its verdict, and the msg fabric
leaves the same memory image as the shm fabric for the same seed and ops."""
from __future__ import annotations

from pathlib import Path

from bench import config
from bench.launch import Launcher

WORKLOADS = Path(__file__).resolve().parents[1] / "configs" / "workloads.toml"


def test_workloads_config_passes():
    cfg = config.apply_overrides(config.load(WORKLOADS), duration=2.0)
    res = Launcher(cfg).run()
    assert res["verdict"] == "pass", res["reasons"]
    assert len(res["vgpus"]) == 4 and len({v["type"] for v in res["vgpus"]}) == 3
    for v in res["vgpus"]:
        w = v["workloads"]
        assert w["submitted"] > 20 and w["completed"] == w["submitted"], w
        assert not (w["lost"] or w["duplicated"] or w["misplaced"] or w["failed"]), w
        assert v["ppgtt"]["tracked_writes"] > 0 and v["ppgtt"]["shadow_pages"] >= 6
        assert v["workload"]["all"]["count"] == w["completed"]
        assert v["execlist"]["context_switches"] > 0 and v["execlist"]["virtual_irqs"] > 0
        # the time-slice scheduler: every vGPU owned the GPU for a while, its engines were busy
        sc = v["sched"]
        assert sc["gpu_share"] > 0 and sc["gpu_ms"] > 0 and sum(sc["engine_ms"].values()) > 0
    weights = [v["weight"] for v in res["vgpus"]]
    assert [v["sched"]["weight_share"] for v in res["vgpus"]] == [round(w / sum(weights), 4) for w in weights]
    assert abs(sum(v["sched"]["gpu_share"] for v in res["vgpus"]) - 1) < 0.01
    (sched,) = res["scheduler"]
    assert sched["policy"] == "timeslice" and sched["switches"] > 0 and sched["mmio_switches"] > 0
    iso = res["isolation"]
    assert iso["violations"] == 0 and iso["pages_checked"] == 4 * 64 * 256 + 4096


def _deterministic(fabric: str) -> dict:
    """One context at a time per guest, so the CSB sequence (and so the status pages) is the
    same whatever the timing."""
    raw = {"run": {"seed": 11, "ops": 60, "fabric": fabric, "duration_s": 60},
           "vgpus": {"count": 2, "types": ["_8", "_4"], "ram_mib": 16},
           "load": {"mode": "closed", "concurrency": 1, "engines": ["rcs"],
                    "mix": {"submit": 0.6, "ppgtt-churn": 0.4}, "batches_per_workload": 2}}
    res = Launcher(config.validate(raw, "test")).run()
    assert res["verdict"] == "pass", res["reasons"]
    return res


def test_msg_fabric_leaves_the_same_memory_image_as_shm():
    shm, msg = _deterministic("shm"), _deterministic("msg")
    assert shm["memory_sha256"] == msg["memory_sha256"]
    assert shm["ledger"]["ggtt_sha256"] == msg["ledger"]["ggtt_sha256"]
    assert [v["workloads"] for v in shm["vgpus"]] == [v["workloads"] for v in msg["vgpus"]]
    assert all(v["ppgtt"]["tracked_writes"] > 0 for v in msg["vgpus"])
