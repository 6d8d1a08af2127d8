"""`gvtbench run --prometheus`: a real Prometheus (Debian's package, installed by the README's test
command) scrapes every node of a real run through file-based service discovery."""
from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest

from bench import config
from bench.launch import Launcher, free_port
from bench.prom import PrometheusMissing, PrometheusServer, find_binary

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="needs Debian's prometheus package (the README's test command installs it)")


def query(url: str, q: str) -> list:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': q})}", timeout=10) as r:
        doc = json.load(r)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def test_a_run_is_scraped_by_a_real_prometheus(tmp_path):
    cfg = config.validate({"run": {"duration_s": 3, "seed": 3}, "vgpus": {"count": 2, "ram_mib": 16},
                           "load": {"mix": {"submit": 0.5, "mmio-read": 0.5}, "rate": 200}}, "test")
    prom = PrometheusServer(tmp_path / "prometheus", free_port("127.0.0.1"))
    check = subprocess.run(["promtool", "check", "config", str(prom.config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    prom.start()
    try:
        res = Launcher(cfg, prometheus=prom).run()
        assert res["verdict"] == "pass", res["reasons"]
        targets = json.loads((prom.folder / "targets.json").read_text())
        assert sorted(t["labels"]["node"] for t in targets) == ["gpu", "guest1", "guest2", "hypervisor",
                                                                  "mediator"]
        up = {r["metric"]["node"]: float(r["value"][1]) for r in query(prom.url, "max_over_time(up[5m])")}
        assert up == {n: 1.0 for n in ("gpu", "guest1", "guest2", "hypervisor", "mediator")}
        lat = query(prom.url, 'max_over_time(gvtbench_workload_latency_seconds_count{stage="guest"}[5m])')
        assert {r["metric"]["vgpu"] for r in lat} == {"1", "2"} and all(float(r["value"][1]) > 0 for r in lat)
        traps = query(prom.url, 'max_over_time(gvtbench_traps_total{kind="mmio_read",stage="mediator"}[5m])')
        assert traps and all(float(r["value"][1]) > 0 for r in traps)
        assert (prom.folder / "data").is_dir()
    finally:
        prom.stop()
    assert prom.proc.poll() is not None


def test_without_the_binary_the_message_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PrometheusMissing) as e:
        find_binary()
    assert "apt-get install prometheus" in str(e.value)
