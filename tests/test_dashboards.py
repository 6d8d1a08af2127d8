"""The Grafana dashboards as code (bench/dashboards.py, dashboards/*.json), their provisioning
and docker-compose.yml. That every query returns data from a real run is checked next to the run
it needs, in test_prometheus.py."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dashlint
from bench import dashboards
from bench.cli import parser

ROOT = Path(__file__).resolve().parent.parent


def test_the_committed_json_is_what_the_code_builds(tmp_path):
    """`python -m bench.dashboards` is the command that regenerates dashboards/; its output must be
    the committed files, byte for byte, and no other dashboard may lie there."""
    out = subprocess.run([sys.executable, "-m", "bench.dashboards", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    built = {p.name: p.read_text() for p in tmp_path.glob("*.json")}
    committed = {p.name: p.read_text() for p in dashlint.DASHBOARDS.glob("*.json")}
    assert set(built) == set(committed), f"built {sorted(built)}, dashboards/ has {sorted(committed)}"
    stale = [n for n in built if built[n] != committed[n]]
    assert not stale, f"{stale} differ from what bench/dashboards.py builds: run python -m bench.dashboards"
    check = subprocess.run([sys.executable, "-m", "bench.dashboards", "--check"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr


def test_check_names_a_file_that_differs(tmp_path):
    dashboards.write(tmp_path)
    victim = tmp_path / "gvtbench-nodes.json"
    victim.write_text(victim.read_text().replace("vGPU state", "vGPU status"))
    assert dashboards.stale(tmp_path) == ["gvtbench-nodes.json"]
    assert dashboards.main(["--check", "--out", str(tmp_path)]) == 1
    # the same through the command line: gvtbench dashboards --check, then a rewrite fixes it
    check = [sys.executable, "-m", "bench.cli", "dashboards", "--out", str(tmp_path), "--check"]
    assert subprocess.run(check, capture_output=True, timeout=60).returncode == 1
    subprocess.run(check[:-1], check=True, capture_output=True, timeout=60)
    assert subprocess.run(check, capture_output=True, timeout=60).returncode == 0


def test_a_few_dashboards_with_stable_uids():
    boards = dashlint.load_all()
    assert {d["uid"]: d["title"] for d in boards.values()} == {
        "gvtbench-traps": "gvtbench / traps", "gvtbench-workloads": "gvtbench / workloads",
        "gvtbench-memory": "gvtbench / memory (GGTT/PPGTT)", "gvtbench-nodes": "gvtbench / nodes"}
    assert all(name == d["uid"] + ".json" for name, d in boards.items())


@pytest.mark.parametrize("name", sorted(p.name for p in dashlint.DASHBOARDS.glob("*.json")))
def test_every_dashboard_follows_the_linter_rules(name):
    d = json.loads((dashlint.DASHBOARDS / name).read_text())
    assert list(dashlint.panels(d)), f"{name} has no panels"
    problems = dashlint.lint(d)
    assert not problems, "\n".join(problems)


def test_the_dashboards_show_what_issue_7_asks_for():
    """Trap latency quantiles by vGPU, kind and stage, heatmaps from the buckets, trap rate,
    workload latency and throughput by engine, GGTT/PPGTT results and tracked writes, vGPU
    states, links and bad frames, process CPU and memory."""
    exprs = {t["expr"]: p for d in dashlint.load_all().values() for p, t in dashlint.targets(d)}

    def panel_of(*parts: str) -> dict:
        hits = [p for e, p in exprs.items() if all(x in e for x in parts)]
        assert hits, f"no query has all of {parts}"
        return hits[0]

    for q in ("0.5", "0.99", "0.999"):
        panel_of(f"histogram_quantile({q}, sum by (le, vgpu, kind, stage)", "gvtbench_trap_latency_seconds_bucket")
        panel_of(f"histogram_quantile({q}, sum by (le, engine)", "gvtbench_workload_latency_seconds_bucket")
    heat = [p for d in dashlint.load_all().values() for p in dashlint.panels(d) if p["type"] == "heatmap"]
    assert {t["expr"].split("{")[0].split("(")[-1] for p in heat for t in p["targets"]} == {
        "gvtbench_trap_latency_seconds_bucket", "gvtbench_workload_latency_seconds_bucket"}
    assert all(t["format"] == "heatmap" and p["options"]["calculate"] is False for p in heat for t in p["targets"])
    for parts in (("gvtbench_traps_total",), ("sum by (engine, status)", "gvtbench_workloads_total"),
                  ("gvtbench_ggtt_entries_translated_total",), ("gvtbench_ppgtt_entries_translated_total",),
                  ("gvtbench_ppgtt_tracked_writes_total",), ("gvtbench_hv_tracked_writes_total",),
                  ("gvtbench_vgpu_state",), ("gvtbench_link_messages_total",), ("gvtbench_bad_frames_total",),
                  ("process_cpu_seconds_total",), ("process_resident_memory_bytes",)):
        panel_of(*parts)


def test_the_rules_catch_what_they_are_about():
    """The linter check is not vacuous: each kind of breakage of a good dashboard is reported."""
    good = json.loads((dashlint.DASHBOARDS / "gvtbench-traps.json").read_text())
    assert dashlint.lint(good) == []
    cases = {
        "no description": lambda d: next(dashlint.panels(d)).pop("description"),
        "unit": lambda d: next(dashlint.panels(d))["fieldConfig"]["defaults"].update(unit="sec"),
        "datasource": lambda d: next(dashlint.panels(d)).update(datasource={"type": "prometheus", "uid": "abc"}),
        "lacks instance": lambda d: next(dashlint.targets(d))[1].update(
            expr='sum(rate(gvtbench_traps_total{job=~"$job", vgpu=~"$vgpu"}[$__rate_interval]))'),
        "not [$__rate_interval]": lambda d: next(dashlint.targets(d))[1].update(
            expr='sum(rate(gvtbench_traps_total{job=~"$job", instance=~"$instance", vgpu=~"$vgpu"}[5m]))'),
        "not under rate": lambda d: next(dashlint.targets(d))[1].update(
            expr='sum(gvtbench_traps_total{job=~"$job", instance=~"$instance", vgpu=~"$vgpu"})'),
        "lacks vgpu": lambda d: next(dashlint.targets(d))[1].update(
            expr='sum(process_open_fds{job=~"$job", instance=~"$instance"})'),
        "invalid PromQL": lambda d: next(dashlint.targets(d))[1].update(expr="sum(rate(x[$__rate_interval])"),
        "no `vgpu` variable": lambda d: d["templating"]["list"].pop(),
        "allValue": lambda d: d["templating"]["list"][1].update(allValue=".*"),
        "uid": lambda d: d.update(uid="Traps"),
        "is editable": lambda d: d.update(editable=True),
    }
    for needle, breaks in cases.items():
        d = copy.deepcopy(good)
        breaks(d)
        problems = dashlint.lint(d)
        assert any(needle in p for p in problems), f"breaking '{needle}' went unnoticed: {problems}"


def test_grafana_interpolation_of_variables():
    vals = dashlint.grafana_values("4s", "1s", "10s", job=["gvtbench"], instance=None, vgpu=["1", "2"])
    assert dashlint.substitute('x{job=~"$job", instance=~"${instance}", vgpu=~"$vgpu|"}[$__rate_interval]',
                               vals) == 'x{job=~"gvtbench", instance=~".+", vgpu=~"(1|2)|"}[4s]'
    assert dashlint.grafana_values("4s", "1s", "1s", instance=["127.0.0.1:80"])["instance"] == r"127\\.0\\.0\\.1:80"


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume, short (`src:dst[:ro]`) or long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            src, dst = v.split(":")[:2]
        else:
            src, dst = v["source"], v["target"]
        out.append((src, dst))
    return out


def test_every_file_the_compose_file_mounts_exists():
    compose = _compose()
    named = set(compose.get("volumes") or {})
    run_dir = parser().parse_args(["run"]).run_dir
    for name, svc in compose["services"].items():
        for src, dst in _mounts(svc):
            if not src.startswith(("./", "/")):
                assert src in named, f"service {name}: volume {src!r} is not declared under volumes:"
                continue
            assert not src.startswith("/"), f"service {name}: {src} is an absolute path of one machine"
            if Path(src).parts == (run_dir,):
                continue        # the runs' folder: made by `gvtbench run`, not part of the repo
            assert (ROOT / src).exists(), f"service {name} mounts {src}, which is not in the repo"


def test_compose_provisioning_and_prometheus_agree():
    """Grafana's datasource is the compose Prometheus, the dashboards provider reads the folder
    dashboards/ is mounted on, and Prometheus discovers its targets where the targets service
    puts them."""
    svc = _compose()["services"]
    prom_args = svc["prometheus"]["command"]
    listen = next(a.split("=", 1)[1] for a in prom_args if a.startswith("--web.listen-address="))
    config_in = next(a.split("=", 1)[1] for a in prom_args if a.startswith("--config.file="))
    prom_mounts = dict((dst, src) for src, dst in _mounts(svc["prometheus"]))
    assert svc["prometheus"]["network_mode"] == "host" == svc["grafana"]["network_mode"]
    prom_cfg = yaml.safe_load((ROOT / prom_mounts[config_in]).read_text())
    sd_dir = str(Path(prom_cfg["scrape_configs"][0]["file_sd_configs"][0]["files"][0]).parent)
    assert sd_dir in prom_mounts and prom_mounts[sd_dir] in dict(_mounts(svc["targets"]))
    assert prom_cfg["scrape_configs"][0]["job_name"] == "gvtbench"

    graf = dict((dst, src) for src, dst in _mounts(svc["grafana"]))
    prov = ROOT / graf["/etc/grafana/provisioning"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == f"http://{listen}" and ds["isDefault"]
    assert ds["jsonData"]["timeInterval"] == prom_cfg["global"]["scrape_interval"]
    provider = yaml.safe_load((prov / "dashboards" / "gvtbench.yml").read_text())["providers"][0]
    assert (ROOT / graf[provider["options"]["path"]]).resolve() == dashlint.DASHBOARDS
    home = svc["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashlint.DASHBOARDS / Path(home).relative_to(provider["options"]["path"])).is_file()


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="needs promtool (Debian's prometheus package, installed by the README's test command)")
def test_the_compose_prometheus_config_passes_promtool():
    cfg = ROOT / "dashboards" / "prometheus.yml"
    check = subprocess.run(["promtool", "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
