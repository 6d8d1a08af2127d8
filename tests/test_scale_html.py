"""The scale sweep's HTML page (bench/scale_html.py) opened in a real headless Chromium: every chart
there with every point inside its plot (by the page's own coordinates, and by the browser's layout
of a copy with a probe script added: the page itself has none), a failed run shown as failed with
its reason, strings from the result shown as text, a screenshot that is not blank; and the
inputs it refuses."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.html_report import PALETTE
from bench.scale_html import ResultInvalid, render, write
from test_html_report import Dom, assert_self_contained, chromium, dump_dom, needs_chromium

COUNTS = (1, 2, 4, 8, 16, 32, 64)
CHARTS = ("chart-p99", "chart-throughput", "chart-cpu")
EVIL = '<script>document.title="owned"</script><img src=x onerror=alert(1)>'
WINDOW = (1280, 1600)


def _run(n: int) -> dict:
    """A run of n vGPUs as `gvtbench scale` reports it: latency and CPU per operation grow with
    the count, a GPU per 16 vGPUs."""
    gpus = max(1, n // 16)
    ops_per_cpu = 400.0 / (1 + n / 32)
    ops = 20.0 * n * 10.0
    cpu = {f"{role}/{g}": ops / ops_per_cpu * share / gpus
           for g in range(gpus) for role, share in (("gpu", .1), ("mediator", .3),
                                                     ("hypervisor", .2), ("guests", .4))}
    rss = {f"{role}/{g}": mib + 2.5 * n / gpus
           for g in range(gpus) for role, mib in (("gpu", 60.0), ("mediator", 80.0),
                                                   ("hypervisor", 50.0), ("guests", 40.0))}
    return {"vgpus": n, "gpus": gpus, "verdict": "pass", "reasons": [],
            "traps_per_s": 120.0 * n, "workloads_per_s": 4.0 * n, "ggtt_entries_per_s": 900.0 * n,
            "p50_us": 800.0 + 10 * n, "p99_us": 4000.0 * (1 + n / 16),
            "workload_p50_us": 9000.0 + 100 * n, "workload_p99_us": 40000.0 * (1 + n / 8),
            "ops_per_cpu_s": ops_per_cpu, "cpu_s": sum(cpu.values()),
            "cpu_s_per_vgpu": sum(cpu.values()) / n, "cpu_s_by_process": cpu,
            "rss_mib": sum(rss.values()), "rss_per_vgpu_mib": sum(rss.values()) / n,
            "rss_by_process_mib": rss, "offered_per_s": 20.0 * n, "achieved_per_s": 19.5 * n,
            "warnings": []}


def _sweep() -> dict:
    """1 to 64 vGPUs: 32 fails its latency budget (its numbers are there), 64 never started (it
    has nothing but its counts, verdict and reasons); markup in a reason, a warning, the config."""
    runs = [_run(n) for n in COUNTS]
    runs[5].update(verdict="fail", reasons=["MMIO read p99 12.0 ms over the 10 ms budget"],
                   warnings=["<b>4</b> late replies"])
    runs[6] = {"vgpus": 64, "gpus": 4, "verdict": "fail",
               "reasons": [f"mediator/3 did not start: {EVIL}"]}
    return {"schema": 1, "config": f"configs/scale-{EVIL}.toml", "duration_s": 10.0, "rate": 20.0,
            "runs": runs}


def in_svg(dom: Dom, cid: str) -> list[dict]:
    """The elements inside the <svg id=cid>: Dom keeps them in document order, charts do not
    nest, and the svg is followed by its legend's <ul>."""
    out, inside = [], False
    for el in dom.elements:
        if el["tag"] == "svg":
            inside = el["attrs"].get("id") == cid
        elif inside and el["tag"] in ("ul", "figure", "div", "p", "section"):
            inside = False
        elif inside:
            out.append(el)
    return out


def assert_points_inside(dom: Dom, cids=CHARTS) -> dict[str, list[dict]]:
    """Each chart's points by the page's own numbers: as many dots as the chart says it has,
    every dot (its radius too) inside data-plot, x increasing with the vGPU count along each
    line and y rising with the value."""
    out = {}
    for cid in cids:
        [svg] = dom.find("svg", ("chart",), id=cid)
        x0, y0, w, h = map(float, svg["attrs"]["data-plot"].split())
        dots = [el for el in in_svg(dom, cid) if el["tag"] == "circle"]
        assert len(dots) == int(svg["attrs"]["data-points"]), cid
        for d in dots:
            a = d["attrs"]
            assert "pt" in a["class"].split(), a
            cx, cy, r = float(a["cx"]), float(a["cy"]), float(a["r"])
            assert x0 <= cx - r and cx + r <= x0 + w and y0 <= cy - r and cy + r <= y0 + h, (cid, a)
        for name in {d["attrs"]["data-series"] for d in dots}:
            line = sorted((int(d["attrs"]["data-x"]), float(d["attrs"]["cx"])) for d in dots
                          if d["attrs"]["data-series"] == name)
            assert all(a[1] < b[1] for a, b in zip(line, line[1:])), (cid, name, line)
        by_value = sorted((float(d["attrs"]["data-y"]), float(d["attrs"]["cy"])) for d in dots)
        assert all(a[1] >= b[1] - 0.05 for a, b in zip(by_value, by_value[1:])), (cid, by_value)
        out[cid] = dots
    return out


def _page(tmp_path: Path, result: dict | None = None) -> Path:
    page = tmp_path / "scale.html"
    write(result or _sweep(), page)
    return page


# Added to a copy of the page only: marks each dot with whether the browser laid it out inside
# its chart's plot rectangle, and each chart with how many of its lines have length and how many
# of its labels stray outside the svg.
PROBE = """
for (const svg of document.querySelectorAll("svg.chart")) {
  const plot = svg.querySelector("rect.plot").getBoundingClientRect();
  const box = svg.getBoundingClientRect();
  let outside = 0, lines = 0, stray = 0;
  for (const c of svg.querySelectorAll("circle.pt")) {
    const b = c.getBoundingClientRect();
    const inside = b.width > 0 && b.left >= plot.left - 1 && b.right <= plot.right + 1 &&
                   b.top >= plot.top - 1 && b.bottom <= plot.bottom + 1;
    c.dataset.inside = inside ? "1" : "0";
    if (!inside) outside++;
  }
  for (const p of svg.querySelectorAll("path.series")) if (p.getTotalLength() > 0) lines++;
  for (const t of svg.querySelectorAll("text")) {
    const b = t.getBoundingClientRect();
    if (b.left < box.left - 1 || b.right > box.right + 1 || b.top < box.top - 1 ||
        b.bottom > box.bottom + 1) stray++;
  }
  svg.dataset.probeOutside = outside;
  svg.dataset.probeLines = lines;
  svg.dataset.probeStray = stray;
}
document.body.dataset.probed = "1";
"""


# ---- in Chromium --------------------------------------------------------------------------------
@needs_chromium
@pytest.mark.timeout(60)
def test_the_page_opens_with_every_chart_and_the_failed_runs_shown(tmp_path):
    result = _sweep()
    dom = dump_dom(tmp_path, _page(tmp_path, result))
    assert_self_contained(dom)
    # no script of its own, and none (nor an image) made from the result's strings
    assert not dom.find("script") and not dom.find("img")
    assert dom.find("title")[0]["text"] == "gvtbench scale: fail, 7 runs, 1-64 vGPUs"
    assert dom.find(id="verdict-badge")[0]["text"] == "2 of 7 runs failed"
    for sid in ("runs", "charts", "processes"):
        assert dom.find("section", id=sid) and dom.find("a", href=f"#{sid}")

    dots = assert_points_inside(dom)
    # every run with numbers is a point on each line; the run that never started is on none
    assert len(dots["chart-p99"]) == len(dots["chart-throughput"]) == 2 * 6
    assert len(dots["chart-cpu"]) == 6
    assert not any(d["attrs"]["data-x"] == "64" for ds in dots.values() for d in ds)
    for cid in CHARTS:
        [svg] = dom.find("svg", id=cid)
        assert int(svg["attrs"]["data-series"]) == (1 if cid == "chart-cpu" else 2)
        # the failed runs' counts are marked; 32's points are hollow
        inside = in_svg(dom, cid)
        assert [g["attrs"]["data-fault"] for g in inside
                if g["tag"] == "g" and "fault-mark" in g["attrs"]["class"]] == ["fail", "fail"]
        assert all(("fail" in d["attrs"]["class"]) == (d["attrs"]["data-x"] == "32")
                   for d in dots[cid])
        # the axis is labelled at every count, log2-spaced: 1 to 2 as wide as 32 to 64
        ticks = {t["text"]: float(t["attrs"]["x"]) for t in inside
                 if t["tag"] == "text" and "tick" in t["attrs"].get("class", "")}
        assert {str(n) for n in COUNTS} <= set(ticks), ticks
        assert abs((ticks["2"] - ticks["1"]) - (ticks["64"] - ticks["32"])) < 0.2
    # each dot carries the run's own number, in the chart's unit
    runs = {r["vgpus"]: r for r in result["runs"]}
    for d in dots["chart-cpu"]:
        want = 1e6 / runs[int(d["attrs"]["data-x"])]["ops_per_cpu_s"]
        assert math.isclose(float(d["attrs"]["data-y"]), want, rel_tol=1e-5)
    for d in dots["chart-p99"]:
        key = "p99_us" if d["attrs"]["data-series"] == "MMIO read p99" else "workload_p99_us"
        want = runs[int(d["attrs"]["data-x"])][key] / 1000
        assert math.isclose(float(d["attrs"]["data-y"]), want, rel_tol=1e-5)
    for cid in CHARTS:
        assert dom.find("p", ("missing",), **{"data-chart": cid})[0]["text"] == \
            "No value for 64 vGPUs."
    legends = [li["text"] for li in dom.find("li") if li["text"] in
               ("MMIO read p99", "workload p99", "traps/s", "workloads/s", "CPU us per operation")]
    assert len(legends) == 5

    # the summary table: a row per run, the failed ones marked so, 64 without measurements
    rows = {r["attrs"]["data-vgpus"]: r for r in dom.find("tr") if "data-vgpus" in r["attrs"]}
    assert list(rows) == [str(n) for n in COUNTS]
    verdicts = {n: r["attrs"]["data-verdict"] for n, r in rows.items()}
    assert verdicts == {**{str(n): "pass" for n in COUNTS[:5]}, "32": "fail", "64": "fail"}
    badges = [s for s in dom.find("span", ("verdict",)) if s["attrs"].get("id") != "verdict-badge"]
    assert [s["attrs"]["class"] for s in badges] == ["verdict pass"] * 5 + ["verdict fail"] * 2
    assert "no measurements" in rows["64"]["text"]
    assert "156.0 / 160.0" in rows["8"]["text"]                # achieved / offered per s
    # in ms: MMIO read p50 and p99, workload p99 of 16 vGPUs
    assert all(ms in rows["16"]["text"] for ms in ("0.96", "8.00", "120.00"))
    assert "<b>4</b> late replies" in rows["32"]["text"]
    assert not [b for b in dom.find("b") if b["text"] == "4"]
    reasons = {li["text"] for li in dom.find("li") if "data-vgpus" in li["attrs"]}
    assert reasons == {"32 vGPUs: MMIO read p99 12.0 ms over the 10 ms budget",
                       f"64 vGPUs: mediator/3 did not start: {EVIL}"}
    assert EVIL in dom.find("p", ("summary",))[0]["text"]

    # per-run processes, folded away
    procs = dom.find("details", ("procs",))
    assert [p["attrs"]["data-vgpus"] for p in procs] == [str(n) for n in COUNTS]
    table16 = dom.find("table", id="procs-4")[0]["text"]
    assert all(f"{role}/0" in table16 for role in ("gpu", "mediator", "hypervisor", "guests"))
    assert "No per-process numbers" in procs[-1]["text"]


@needs_chromium
@pytest.mark.timeout(60)
def test_the_browser_lays_every_point_out_inside_its_plot(tmp_path):
    text = _page(tmp_path).read_text()
    assert text.count("</body>") == 1
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", f"<script>{PROBE}</script></body>"))
    dom = dump_dom(tmp_path, probed)
    assert dom.find("body")[0]["attrs"].get("data-probed") == "1", "the probe did not run"
    for cid in CHARTS:
        [svg] = dom.find("svg", id=cid)
        a = svg["attrs"]
        assert a["data-probe-outside"] == "0", a
        assert a["data-probe-stray"] == "0", a           # no tick or axis label runs off the svg
        assert int(a["data-probe-lines"]) == int(a["data-series"]), a
        dots = [el for el in in_svg(dom, cid) if el["tag"] == "circle"]
        assert dots and all(d["attrs"]["data-inside"] == "1" for d in dots), cid


@needs_chromium
@pytest.mark.timeout(60)
def test_the_screenshot_is_not_blank(tmp_path):
    from PIL import Image
    page = _page(tmp_path)
    shot = tmp_path / "scale.png"
    r = chromium(tmp_path, page, f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    assert r.returncode == 0 and shot.exists(), r.stderr.decode(errors="replace")[-2000:]
    with Image.open(shot) as im:
        assert im.size == WINDOW
        colours = {c: n for n, c in im.convert("RGB").getcolors(1 << 24)}
    # anti-aliased lines and text give hundreds of colours; a blank or failed page a handful
    assert len(colours) > 200, len(colours)
    # both series colours (the lines and dots of every chart) and the fail badges' red
    for hexc in (PALETTE[0], PALETTE[1], "#d62728"):
        rgb = tuple(int(hexc[i:i + 2], 16) for i in (1, 3, 5))
        assert colours.get(rgb, 0) > 200, (hexc, colours.get(rgb, 0))


# ---- without a browser --------------------------------------------------------------------------
@pytest.mark.parametrize("bad, says", [
    ([], "a JSON object was expected, got list"),
    ("runs", "a JSON object was expected, got str"),
    ({"schema": 1}, "it has no 'runs' list"),
    ({"runs": {"vgpus": 1}}, "it has no 'runs' list"),
    ({"runs": []}, "'runs' is empty"),
    ({"runs": [{"gpus": 1, "verdict": "pass"}]}, r"runs\[0\] is not a run"),
    ({"runs": [{"vgpus": 1}, "8"]}, r"runs\[1\] is not a run"),
    ({"runs": [{"vgpus": "4"}]}, r"runs\[0\] is not a run"),
    ({"runs": [{"vgpus": True}]}, r"runs\[0\] is not a run"),
    ({"runs": [{"vgpus": 0}]}, "'vgpus' must be at least 1"),
    ({"runs": [{"vgpus": 2, "p99_us": "slow"}]}, "'p99_us' must be a number or null, got str"),
])
def test_what_is_not_a_scale_result_is_refused(bad, says, tmp_path):
    with pytest.raises(ResultInvalid, match=says):
        render(bad)
    # nothing is written for it
    with pytest.raises(ResultInvalid):
        write(bad, tmp_path / "bad.html")
    assert not (tmp_path / "bad.html").exists()


def test_write_writes_what_render_renders(tmp_path):
    result = _sweep()
    assert _page(tmp_path, result).read_text(encoding="utf-8") == render(result)


def _parsed(result: dict) -> Dom:
    return Dom(render(result))


def test_missing_numbers_are_dashes_and_the_charts_name_the_runs_without_them():
    result = _sweep()
    r8 = result["runs"][3]
    r8["workload_p99_us"] = None
    del r8["traps_per_s"]
    r8["ops_per_cpu_s"] = float("nan")     # JSON from Python may carry NaN: not a number to draw
    r8["p99_us"] = 0.0                      # no place on a log axis
    dom = _parsed(result)
    dots = assert_points_inside(dom)
    assert len(dots["chart-p99"]) == 2 * 6 - 2 and len(dots["chart-cpu"]) == 5
    notes = {p["attrs"]["data-chart"]: p["text"] for p in dom.find("p", ("missing",))}
    assert notes == {"chart-p99": "No value for 8, 64 vGPUs.",
                     "chart-throughput": "traps/s: no value for 8, 64 vGPUs; "
                                         "workloads/s: no value for 64 vGPUs.",
                     "chart-cpu": "No value for 8, 64 vGPUs."}
    cells = _cells(dom, 8)
    assert len(cells) == 13, cells
    # traps/s, MMIO read p99 (0 is a number, if not on a log axis), workload p99, ops per CPU-s
    assert [cells[i] for i in (3, 6, 7, 8)] == ["-", "0.00", "-", "-"], cells
    assert cells[4] == "32.0" and cells[5] == "0.88", cells


def _cells(dom: Dom, vgpus: int) -> list[str]:
    """The text of each cell of the summary table's row for `vgpus`."""
    out, inside = [], False
    for el in dom.elements:
        if el["tag"] == "tr":
            inside = el["attrs"].get("data-vgpus") == str(vgpus)
        elif inside and el["tag"] == "td":
            out.append(el["text"])
    return out


def test_a_sweep_where_no_run_started_still_renders_and_says_so():
    result = {"schema": 1, "config": "c.toml",
              "runs": [{"vgpus": n, "gpus": 1, "verdict": "fail", "reasons": ["hypervisor died"]}
                       for n in (1, 2, 4)]}
    dom = _parsed(result)
    for cid in CHARTS:
        [svg] = dom.find("svg", id=cid)
        assert svg["attrs"]["data-points"] == "0"
    assert len([td for td in dom.elements if td["tag"] == "td"
                and "no measurements" in td["text"]]) == 3
    assert dom.find(id="verdict-badge")[0]["text"] == "3 of 3 runs failed"
    assert "the run did not get that far" in dom.find("details")[0]["text"]


@pytest.mark.parametrize("counts", [(1,), (3, 5, 6, 12, 100), (1, 2, 3, 4, 5, 6, 7, 8, 16)],
                         ids=["one run", "not powers of two", "dense"])
def test_any_counts_put_every_point_inside_and_labels_apart(counts):
    result = {"schema": 1, "runs": [_run(n) for n in counts]}
    # values right on a decade and on the linear axis's top tick
    result["runs"][-1].update(p99_us=10_000.0, traps_per_s=1000.0, ops_per_cpu_s=200.0)
    dom = _parsed(result)
    assert_points_inside(dom)
    for cid in CHARTS:
        xs = sorted(float(t["attrs"]["x"]) for t in in_svg(dom, cid)
                    if t["tag"] == "text" and "tick" in t["attrs"]["class"]
                    and t["attrs"].get("text-anchor") == "middle")
        assert xs and all(b - a >= 28 for a, b in zip(xs, xs[1:])), (cid, xs)
