"""`gvtbench run --prometheus`: a real Prometheus (Debian's package, installed by the README's test
command) scrapes every node of a real run through file-based service discovery; every query of
every Grafana dashboard (dashboards/) returns data from that run.

The tests of this module share one run (a module fixture; a run costs seconds of both cores):
one per pytest-xdist worker that gets one of them, or exactly one with `--dist loadgroup`, which
keeps the group `prometheus_run` on one worker.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Iterator

import pytest

import dashlint
from bench import config
from bench.launch import Launcher, free_port
from bench.prom import SCRAPE_INTERVAL_S, PrometheusMissing, PrometheusServer, find_binary

needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="needs Debian's prometheus package (the README's test command installs it)")
same_run = pytest.mark.xdist_group("prometheus_run")


def api(url: str, path: str, **params: object) -> object:
    q = urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(f"{url}{path}?{q}", timeout=30) as r:
        doc = json.load(r)
    assert doc["status"] == "success", doc
    return doc["data"]


def query(url: str, q: str) -> list:
    return api(url, "/api/v1/query", query=q)["result"]


@dataclass
class Run:
    prom: PrometheusServer
    result: dict
    start: float            # wall clock, seconds: the window the dashboards look at
    end: float


@pytest.fixture(scope="module")
def scraped_run(tmp_path_factory) -> Iterator[Run]:
    """A short run under a real Prometheus, with every kind of load so that every dashboard panel
    has something to show: MMIO reads and writes, GGTT bursts, GPU workloads on both engines and
    page-table churn (tracked writes, PPGTT translations)."""
    cfg = config.validate({"run": {"duration_s": 4, "seed": 3}, "vgpus": {"count": 2, "ram_mib": 16},
                           "load": {"rate": 200, "burst": 32,
                                    "mix": {"submit": 0.4, "ppgtt-churn": 0.2, "mmio-read": 0.15,
                                            "mmio-write": 0.15, "gtt-burst": 0.1}}}, "test")
    prom = PrometheusServer(tmp_path_factory.mktemp("run") / "prometheus", free_port("127.0.0.1"))
    prom.start()
    try:
        start = time.time()
        res = Launcher(cfg, prometheus=prom).run()
        yield Run(prom, res, start, time.time())
    finally:
        prom.stop()
    assert prom.proc.poll() is not None, "prometheus still runs after stop()"


@needs_prometheus
@same_run
def test_a_run_is_scraped_by_a_real_prometheus(scraped_run):
    prom, res = scraped_run.prom, scraped_run.result
    check = subprocess.run(["promtool", "check", "config", str(prom.config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert res["verdict"] == "pass", res["reasons"]
    targets = json.loads((prom.folder / "targets.json").read_text())
    # one target per process: a guest's is its pool's (guests/<first VM>), and its samples name
    # the guest
    procs = ("gpu/0", "guests/1", "guests/2", "hypervisor/0", "mediator/0")
    assert sorted(t["labels"]["node"] for t in targets) == list(procs)
    up = {r["metric"]["node"]: float(r["value"][1]) for r in query(prom.url, "max_over_time(up[5m])")}
    assert up == {n: 1.0 for n in procs}
    ops = query(prom.url, 'max_over_time(gvtbench_guest_ops_total{status="completed"}[5m])')
    assert {(r["metric"]["node"], r["metric"]["guest"]) for r in ops} >= {("guests/1", "guest1"),
                                                                         ("guests/2", "guest2")}
    lat = query(prom.url, 'max_over_time(gvtbench_workload_latency_seconds_count{stage="guest"}[5m])')
    assert {r["metric"]["vgpu"] for r in lat} == {"1", "2"} and all(float(r["value"][1]) > 0 for r in lat)
    traps = query(prom.url, 'max_over_time(gvtbench_traps_total{kind="mmio_read",stage="mediator"}[5m])')
    assert traps and all(float(r["value"][1]) > 0 for r in traps)
    assert (prom.folder / "data").is_dir()


def _label_values(run: Run, query_text: str, values: dict[str, str]) -> list[str]:
    """A `label_values(selector, label)` variable query, answered as Grafana's Prometheus
    datasource does it (the series API over the time range)."""
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query_text)
    assert m, f"not a label_values query: {query_text}"
    series = api(run.prom.url, "/api/v1/series", **{"match[]": dashlint.substitute(m.group(1), values)},
                 start=run.start, end=run.end)
    return sorted({s[m.group(2)] for s in series if m.group(2) in s})


def _known_metrics(run: Run) -> tuple[set[str], set[str]]:
    """Names with samples in the run, and names of families the nodes declared (Prometheus keeps
    the HELP/TYPE of every family it scraped, also of counters no event has created yet)."""
    names = set(api(run.prom.url, "/api/v1/label/__name__/values", start=run.start, end=run.end))
    meta = set(api(run.prom.url, "/api/v1/metadata"))
    return names, meta


def _declared(name: str, names: set[str], meta: set[str]) -> bool:
    base = re.sub(r"_(total|bucket|count|sum)$", "", name)
    return name in names or name in meta or base in meta


@needs_prometheus
@same_run
def test_every_dashboard_query_returns_data(scraped_run):
    """Every query of every dashboard, its variables filled in as Grafana fills them, evaluated as
    Grafana does (query_range over the run, step = $__interval), returns a series with a value
    that is a number. Once with every variable on "All", once with job and one vGPU chosen.
    Besides: every metric a query names was exported by the run, and the vgpu matcher fits the
    series (vgpu=~"$vgpu|" only for series without a vgpu label)."""
    run = scraped_run
    assert run.result["verdict"] == "pass", run.result["reasons"]
    step = SCRAPE_INTERVAL_S
    # Grafana: $__rate_interval = max($__interval + scrape interval, 4 * scrape interval), the
    # scrape interval being the datasource's timeInterval (1 s, as dashboards/provisioning says)
    rate_interval = f"{max(step + SCRAPE_INTERVAL_S, 4 * SCRAPE_INTERVAL_S)}s"
    range_ = f"{math.ceil(run.end - run.start)}s"
    names, meta = _known_metrics(run)
    boards = dashlint.load_all()
    assert len(boards) == 4

    all_values = dashlint.grafana_values(rate_interval, f"{step}s", range_, job=None, instance=None, vgpu=None)
    problems: list[str] = []
    for board in boards.values():
        title = board["title"]
        choices = {}
        for name in dashlint.FILTERS:
            var = dashlint.variables(board)[name]
            choices[name] = _label_values(run, var["query"], all_values)
            if not choices[name]:
                problems.append(f"{title}: variable {name} ({var['query']}) has no values")
        assert "gvtbench" in choices["job"] and {"1", "2"} <= set(choices["vgpu"]), (title, choices)
        fills = {"All": all_values,
                 "job=gvtbench, vGPU 2": dashlint.grafana_values(rate_interval, f"{step}s", range_, job=["gvtbench"],
                                                                 instance=None, vgpu=["2"])}
        for panel, target in dashlint.targets(board):
            where = f"{title} / {panel['title']} [{target['refId']}]"
            for sel in dashlint.selectors(target["expr"]):
                if not _declared(sel.name, names, meta):
                    problems.append(f"{where}: the run exported no metric {sel.name}")
                    continue
                with_vgpu = api(run.prom.url, "/api/v1/series", **{"match[]": f'{sel.name}{{vgpu!=""}}'},
                                start=run.start, end=run.end)
                vgpu_matcher = dashlint.matchers(sel)["vgpu"][1]
                if vgpu_matcher == "$vgpu|" and with_vgpu:
                    problems.append(f"{where}: {sel.name} has a vgpu label; its matcher must be vgpu=~\"$vgpu\"")
                if vgpu_matcher == "$vgpu" and sel.name in names and not with_vgpu:
                    problems.append(f"{where}: {sel.name} has no vgpu label; its matcher must be vgpu=~\"$vgpu|\"")
            for fill_name, values in fills.items():
                expr = dashlint.substitute(target["expr"], values)
                data = api(run.prom.url, "/api/v1/query_range", query=expr, start=run.start, end=run.end, step=step)
                numbers = [v for s in data["result"] for _, v in s["values"] if v != "NaN"]
                if not numbers:
                    problems.append(f"{where}, variables {fill_name}: no data "
                                    f"({len(data['result'])} series, all NaN or none): {expr}")
    assert not problems, "\n".join(problems)


def test_without_the_binary_the_message_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PrometheusMissing) as e:
        find_binary()
    assert "apt-get install prometheus" in str(e.value)


def test_every_dashboard_annotation_is_a_query_prometheus_runs(scraped_run):
    """The fault annotations (a peer restarted or went silent, a gpu restored) are valid PromQL
    over the run, their variables filled in as Grafana does; a clean run has no fault to mark."""
    run = scraped_run
    step = SCRAPE_INTERVAL_S
    values = dashlint.grafana_values(f"{4 * SCRAPE_INTERVAL_S}s", f"{step}s",
                                     f"{math.ceil(run.end - run.start)}s", job=None, instance=None, vgpu=None)
    for board in dashlint.load_all().values():
        notes = board["annotations"]["list"]
        assert {a["name"] for a in notes} >= {"Peer restarted", "Peer went silent", "gpu restored"}
        for a in notes:
            data = api(run.prom.url, "/api/v1/query_range", query=dashlint.substitute(a["expr"], values),
                       start=run.start, end=run.end, step=step)
            assert data["result"] == [], (board["title"], a["name"], data["result"][:1])
