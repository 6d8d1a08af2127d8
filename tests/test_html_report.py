"""gvtbench report --html: the page of a real run opened in a real headless Chromium (Debian's
`chromium`): every chart drawn with data inside its plot, a screenshot that is not blank, nothing
fetched from elsewhere; strings from the result shown as text; the percentile plot's points; the
CLI's errors."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram

from bench import config
from bench.html_report import PALETTE, ResultInvalid, percentile_points, render_html
from bench.launch import Launcher

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                    reason="chromium not installed (CI installs it)")
WINDOW = (1280, 4000)


@pytest.fixture(scope="session")
def real_result() -> dict:
    """A real 3 s run: two guests of two vGPU types with every mix of the load."""
    raw = {"run": {"duration_s": 3, "seed": 5},
           "vgpus": {"count": 2, "types": ["_8", "_4"], "ram_mib": 16},
           "load": {"mode": "open", "rate": 150, "engines": ["rcs", "bcs"],
                    "mix": {"submit": 0.4, "ppgtt-churn": 0.2, "mmio-read": 0.2,
                            "mmio-write": 0.1, "gtt-burst": 0.1}}}
    return Launcher(config.validate(raw, "test")).run()


# ---- reading what Chromium made of the page ---------------------------------------------------
class Dom(HTMLParser):
    """Every element's tag, attributes and text, in document order."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(el)
        if tag not in ("meta", "br", "img", "input", "link", "rect", "line"):
            self._open.append(el)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for el in self._open:
            el["text"] += data

    def find(self, tag: str | None = None, classes: tuple[str, ...] = (), **attrs) -> list[dict]:
        """Elements of `tag` that have every class of `classes` and these attribute values."""
        def ok(el):
            a = el["attrs"]
            return ((tag is None or el["tag"] == tag)
                    and set(classes) <= set((a.get("class") or "").split())
                    and all(a.get(k) == v for k, v in attrs.items()))
        return [el for el in self.elements if ok(el)]


def chromium(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.fail("chromium is missing in CI")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, timeout=120)


def dump_dom(tmp_path: Path, page: Path) -> Dom:
    """The DOM after the page's script ran."""
    r = chromium(tmp_path, page, "--dump-dom")
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    return Dom(r.stdout.decode())


def assert_self_contained(dom: Dom) -> None:
    """Nothing the page would fetch: no src, no link, no href but in-page anchors, no CSS url."""
    for el in dom.elements:
        a = el["attrs"]
        assert "src" not in a and el["tag"] not in ("link", "iframe", "img", "object"), el
        assert "href" not in a or a["href"].startswith("#"), el
        if el["tag"] == "style":
            assert "url(" not in el["text"] and "@import" not in el["text"]


def assert_charts_drawn(dom: Dom, cls: str) -> list[dict]:
    charts = dom.find("svg", ("chart", cls))
    assert charts, f"no {cls} chart"
    for svg in charts:
        a = svg["attrs"]
        n = int(a["data-series"])
        assert n > 0 and int(a["data-points"]) > 0, a
        # set by the page's script from the browser's own layout of each line
        assert int(a["data-drawn-series"]) == n, a
        assert int(a["data-drawn-outside"]) == 0, a
        assert int(a["data-drawn-length"]) > 50 * n, a
    return charts


# ---- the main test: a real run, the real CLI, a real browser -------------------------------------
@needs_chromium
def test_report_of_a_real_run_opens_in_chromium_with_every_chart_drawn(real_result, tmp_path):
    res = tmp_path / "result.json"
    res.write_text(json.dumps(real_result))
    page = tmp_path / "report.html"
    cli = subprocess.run([sys.executable, "-m", "bench.cli", "report", str(res), "--html", str(page)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    assert page.stat().st_size > 10_000

    dom = dump_dom(tmp_path, page)
    assert_self_contained(dom)
    for sid in ("verdict", "latency", "distribution", "throughput", "workloads", "ledger", "config"):
        assert dom.find("section", id=sid), sid
    assert dom.find(id="verdict-badge")[0]["text"].strip() == f"verdict: {real_result['verdict']}"

    # one percentile plot per trap kind and per workload engine, a line per vGPU
    dist = assert_charts_drawn(dom, "chart-distribution")
    kinds = {k for v in real_result["vgpus"] for k in v["traps"]}
    engines = {e for v in real_result["vgpus"] for e in v["workload"]}
    assert {c["attrs"]["data-kind"] for c in dist} == \
        {f"trap-{k}" for k in kinds} | {f"workload-{e}" for e in engines}
    assert kinds == {"mmio_read", "mmio_write", "gtt_write"} and engines == {"all", "rcs", "bcs"}
    for svg in dist:
        assert int(svg["attrs"]["data-series"]) == len(real_result["vgpus"])

    # throughput over time: a chart per vGPU, a line per mix and one of workloads retired
    tput = assert_charts_drawn(dom, "chart-throughput")
    assert sorted(int(c["attrs"]["data-vgpu"]) for c in tput) == [v["id"] for v in real_result["vgpus"]]
    names = {p["attrs"]["data-name"] for p in dom.find("path", ("series",))}
    for mix in ("submit", "ppgtt-churn", "mmio-read", "mmio-write", "gtt-burst"):
        assert f"{mix} ops" in names
    assert "workloads retired" in names

    # the tables hold the result's numbers
    rows = dom.find("table", id="latency-table")[0]["text"]
    for v in real_result["vgpus"]:
        for kind, s in v["traps"].items():
            assert f"{s['count']:,}" in rows and kind in rows
    wl = dom.find("table", id="workloads-table")[0]["text"]
    assert all(f"{v['workloads']['completed']:,}" in wl for v in real_result["vgpus"])
    assert dom.find("table", id="config-load") and '"ppgtt-churn": 0.2' in \
        dom.find("table", id="config-load")[0]["text"]

    shot = tmp_path / "report.png"
    r = chromium(tmp_path, page, f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    assert r.returncode == 0 and shot.exists(), r.stderr.decode(errors="replace")[-2000:]
    from PIL import Image
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as im:
        im.verify()
    with Image.open(shot) as im:
        assert im.size == WINDOW
        colours = {c: n for n, c in im.convert("RGB").getcolors(1 << 24)}
    # anti-aliased lines and text give hundreds of colours; a blank or failed page a handful
    assert len(colours) > 200, len(colours)
    # the first two series colours (vGPU 1 and 2 on every percentile plot) are on screen
    for hexc in PALETTE[:2]:
        rgb = tuple(int(hexc[i:i + 2], 16) for i in (1, 3, 5))
        assert colours.get(rgb, 0) > 500, (hexc, colours.get(rgb, 0))


# ---- hand-made results ---------------------------------------------------------------------------
def _hdr(values_ns: list[int]) -> str:
    h = HdrHistogram(1, 3600 * 10**9, 2)
    for v in values_ns:
        h.record_value(v)
    return h.encode().decode()


def _summary(values_ns: list[int]) -> dict:
    vs = sorted(values_ns)
    return {"count": len(vs), "p50_us": vs[len(vs) // 2] / 1e3, "p99_us": vs[-1] / 1e3,
            "p999_us": vs[-1] / 1e3, "hdr": _hdr(vs)}


def _small_result(**over) -> dict:
    lat = [1000 * k for k in range(100, 1100)]
    res = {"schema": 1, "seed": 3, "translator": "c", "wall_s": 2.0, "verdict": "pass",
           "reasons": [], "config": {"run": {"seed": 3}, "load": {"mix": {"mmio-read": 1.0}}},
           "vgpus": [{"id": 1, "type": "_8", "traps": {"mmio_read": _summary(lat)},
                      "workload": {"all": _summary(lat[::3])},
                      "timeline": {"interval_s": 2.0, "t0_ns": 5, "bins": 3,
                                   "ops": {"mmio-read": {"completed": [10, 20, 4],
                                                         "failed": [0, 2, 0]}},
                                   "workloads": {"completed": [1, 2, 3], "failed": [0, 0, 0]}}}],
           "ledger": {"links": [{"from": "guest1", "to": "hypervisor", "sent": 5, "received": 5,
                                 "gaps": 0}]}}
    res.update(over)
    return res


@needs_chromium
def test_strings_from_the_result_are_shown_as_text_not_markup(tmp_path):
    evil = '<script>document.title="owned"</script><img src=x onerror=alert(1)>'
    res = _small_result(verdict="fail", reasons=[f"vGPU 1: {evil}"],
                        config={"run": {"host": evil}, evil: {"k": 1}})
    res["vgpus"][0]["type"] = evil
    page = tmp_path / "r.html"
    page.write_text(render_html(res))
    dom = dump_dom(tmp_path, page)
    # the page's own script is the only one, and no image came from the result
    assert len(dom.find("script")) == 1 and not dom.find("img")
    assert dom.find("ul", id="reasons")[0]["text"] == f"vGPU 1: {evil}"
    assert json.dumps(evil) in dom.find("table", id="config-run")[0]["text"]    # values as JSON
    assert f"[{evil}]" in "".join(h["text"] for h in dom.find("h3"))
    assert "owned" not in dom.find("title")[0]["text"]
    assert dom.find(id="verdict-badge")[0]["text"] == "verdict: fail"
    assert_self_contained(dom)
    # failed ops are drawn, dashed, beside the completed ones; rates are counts per interval
    tput = assert_charts_drawn(dom, "chart-throughput")
    paths = {p["attrs"]["data-name"]: p["attrs"] for p in dom.find("path", ("series",))}
    assert "stroke-dasharray" in paths["mmio-read failed"]
    assert "workloads failed" not in paths      # none failed: no line of zeros
    assert "2 s intervals" in dom.find("figcaption")[-1]["text"]
    assert int(tput[0]["attrs"]["data-series"]) == 3


def test_percentile_points_follow_the_histogram():
    values = [1000 * k for k in range(1, 10001)]        # 1 us .. 10 ms, evenly
    pts = percentile_points(_hdr(values))
    xs = [x for x, _v in pts]
    assert xs[0] == 0.0 and xs == sorted(xs) and abs(xs[-1] - 4.0) < 1e-9     # log10(10 000)
    assert [v for _x, v in pts] == sorted(v for _x, v in pts)
    at = dict(pts)
    # 2 significant figures: within 1% of the exact percentile
    assert abs(at[1.0] - 9_000_000) <= 0.01 * 9_000_000          # p90
    assert abs(at[2.0] - 9_900_000) <= 0.01 * 9_900_000          # p99
    assert abs(pts[-1][1] - 10_000_000) <= 0.01 * 10_000_000     # the maximum, at the end
    assert len(pts) == 4 * 20 + 1
    one = percentile_points(_hdr([5000]))
    assert len(one) == 2 and one[0][1] == one[1][1] and one[1][0] > one[0][0]


def test_a_bad_histogram_is_an_invalid_result():
    res = _small_result()
    res["vgpus"][0]["traps"]["mmio_read"]["hdr"] = "not a histogram"
    with pytest.raises(ResultInvalid, match="not a base64 HdrHistogram"):
        render_html(res)


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", "report", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_cli_errors_name_the_problem_and_exit_2(tmp_path):
    missing = tmp_path / "nope.json"
    r = _report(str(missing), "--html", str(tmp_path / "o.html"))
    assert r.returncode == 2 and f"cannot read {missing}" in r.stderr and "No such file" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = _report(str(bad), "--html", str(tmp_path / "o.html"))
    assert r.returncode == 2 and "is not JSON" in r.stderr
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    r = _report(str(other))
    assert r.returncode == 2 and "is not a gvtbench result: it has no 'schema' key" in r.stderr
    res = _small_result()
    del res["vgpus"][0]["traps"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(res))
    r = _report(str(broken), "--html", str(tmp_path / "o.html"))
    assert r.returncode == 2 and "vgpus[0] is not a vGPU" in r.stderr
    assert not (tmp_path / "o.html").exists()
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_small_result()))
    r = _report(str(good), "--html", str(tmp_path / "no-such-dir" / "o.html"))
    assert r.returncode == 2 and "cannot write" in r.stderr


def test_a_result_without_histograms_or_timelines_says_so(tmp_path):
    res = _small_result()
    v = copy.deepcopy(res["vgpus"][0])
    for s in (*v["traps"].values(), *v["workload"].values()):
        del s["hdr"]
    del v["timeline"]
    res["vgpus"] = [v]
    text = render_html(res)
    assert 'class="chart ' not in text
    assert "holds no HdrHistogram" in text and "holds no per-second counts" in text


@needs_chromium
def test_a_faulty_runs_report_lists_every_fault_and_marks_it_on_the_throughput_charts(tmp_path):
    """The faults section names the plan, each node fault with its times and what each fault
    cost each vGPU; each fault's window is shaded on the throughput chart from its time, on the
    guest's own axis (its load started 1 s after the launcher's)."""
    faults = {"seed": 9, "specs": ["drop=0.05", "restart=gpu@2s"],
              "plan": [{"link": "*", "kind": "frames", "drop": 0.05},
                       {"node": "gpu", "kind": "restart", "at_ns": 2 * 10**9, "length_ns": 0,
                        "spec": "restart=gpu@2s"}],
              "links": [], "totals": {"drop": 41},
              "nodes": [{"node": "gpu", "kind": "restart", "spec": "restart=gpu@2s", "at_s": 2.0,
                         "down_s": 0.01, "ready_s": 0.6, "also_killed": []}],
              "windows": [{"fault": "restart=gpu@2s", "from_s": 2.0, "to_s": 4.5}]}
    res = _small_result(faults=faults, load_t0_ns=5 - 10**9)
    res["vgpus"][0]["fault_costs"] = [{"fault": "restart=gpu@2s", "failed_ops": 2,
                                       "unknown_ops": 0, "failed_workloads": 2}]
    page = tmp_path / "f.html"
    page.write_text(render_html(res))
    dom = dump_dom(tmp_path, page)
    assert dom.find("section", id="faults") and dom.find("a", href="#faults")
    nodes = dom.find("table", id="node-faults-table")[0]["text"]
    assert "restart=gpu@2s" in nodes and "0.6" in nodes
    assert "41" in dom.find("table", id="frame-faults-table")[0]["text"]
    costs = dom.find("table", id="fault-costs-table")[0]["text"]
    assert "restart=gpu@2s" in costs and "2" in costs
    [mark] = dom.find("g", ("fault-mark",))
    assert mark["attrs"]["data-fault"] == "restart=gpu@2s"
    [rect] = dom.find("rect", ("fault-window",))
    svg = assert_charts_drawn(dom, "chart-throughput")[0]["attrs"]
    x0, _y, w, _h = map(float, svg["data-plot"].split())
    # the guest's axis spans its 3 bins of 2 s; the fault at 2 s of the load is at 1 s on it
    assert abs(float(rect["attrs"]["x"]) - (x0 + w * 1.0 / 6.0)) < 1.0, rect
    assert abs(float(rect["attrs"]["width"]) - w * 2.5 / 6.0) < 1.0, rect


def test_a_clean_runs_report_says_no_fault_was_injected():
    html = render_html(_small_result())
    assert "No faults were injected" in html and 'class="fault-mark"' not in html
