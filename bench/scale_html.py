"""A scale sweep's result (`gvtbench scale --json`) as one self-contained HTML page: a summary
table with a row per run, three charts against the vGPU count (p99 latency, throughput, CPU per
operation) and each run's processes. The charts are inline SVG drawn here in Python; the page has
no script and fetches nothing, so it can be mailed or archived like the run report.

It is drawn with bench/html_report.py's chart, table, escaping and style, so the two reports read
alike. A run that failed to start carries only its vGPU and GPU counts, verdict and reasons: its
row says it has no measurements, and the charts mark where it failed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from bench.html_report import (CSS, HEIGHT, MARGIN_B, MARGIN_L, MARGIN_R, MARGIN_T, PALETTE, WIDTH,
                               Axis, ResultInvalid, Series, _chart, _e, _latency_axis, _nice_step,
                               _num, _table)

# The numbers a run may carry; each one may be missing or null (not measured).
METRICS = ("traps_per_s", "workloads_per_s", "ggtt_entries_per_s", "p50_us", "p99_us",
           "workload_p50_us", "workload_p99_us", "ops_per_cpu_s", "cpu_s", "cpu_s_per_vgpu",
           "rss_mib", "rss_per_vgpu_mib", "offered_per_s", "achieved_per_s")
PLOT_W, PLOT_H = WIDTH - MARGIN_L - MARGIN_R, HEIGHT - MARGIN_T - MARGIN_B
X_PAD = 0.25        # octaves either side of the counts, so the first and last points sit inside
EDGE_PX = 6         # no point closer than this to the plot's edge (a dot's radius and its stroke)
DOT_R = 3
TICK_GAP_PX = 28    # x tick labels closer than this would run into each other

EXTRA_CSS = """
svg.chart circle.pt{stroke-width:1.5}
td.missing{color:#666;font-style:italic}
tr.fail td:first-child{border-left:3px solid #d62728}
details.procs{margin:4px 0}details.procs summary{cursor:pointer}
"""


def check_result(result: Any, where: str = "the scale result") -> None:
    """Raise ResultInvalid naming the first thing the page needs that `result` lacks."""
    if not isinstance(result, dict):
        raise ResultInvalid(f"{where} is not a gvtbench scale result: a JSON object was "
                            f"expected, got {type(result).__name__}")
    runs = result.get("runs")
    if not isinstance(runs, list):
        raise ResultInvalid(f"{where} is not a gvtbench scale result: it has no 'runs' list")
    if not runs:
        raise ResultInvalid(f"{where}: 'runs' is empty (the sweep ran nothing)")
    for i, run in enumerate(runs):
        # bool is an int to Python, but never a count
        if not isinstance(run, dict) or not isinstance(run.get("vgpus"), int) \
                or isinstance(run["vgpus"], bool):
            raise ResultInvalid(f"{where}: runs[{i}] is not a run (an object with an int 'vgpus')")
        if run["vgpus"] < 1:
            raise ResultInvalid(f"{where}: runs[{i}]: 'vgpus' must be at least 1 (the x axis is "
                                f"log2 of it), got {run['vgpus']}")
        for key in METRICS:
            v = run.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ResultInvalid(f"{where}: runs[{i}]: {key!r} must be a number or null, got "
                                    f"{type(v).__name__}")


def _metric(run: dict, key: str) -> float | None:
    """A run's number, or None where it is missing, null or not finite (JSON may carry NaN)."""
    v = run.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _strings(v: Any) -> list[str]:
    if v is None:
        return []
    return [str(s) for s in v] if isinstance(v, list) else [str(v)]


def _failed(run: dict) -> bool:
    return run.get("verdict") != "pass"


def _ms(run: dict, key: str) -> float | None:
    us = _metric(run, key)
    return None if us is None else us / 1000.0


def _us_per_op(run: dict) -> float | None:
    ops = _metric(run, "ops_per_cpu_s")
    return 1e6 / ops if ops and ops > 0 else None


def _fmt_count(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


# ---- axes ---------------------------------------------------------------------------------------
def _x_axis(runs: list[dict]) -> Axis:
    """log2 of the vGPU count. Powers of two are labelled first, then the counts that ran, each
    where it leaves room for its neighbours' labels."""
    counts = sorted({r["vgpus"] for r in runs})
    lo, hi = math.log2(counts[0]) - X_PAD, math.log2(counts[-1]) + X_PAD
    px_per_octave = PLOT_W / (hi - lo)
    candidates = [float(k) for k in range(math.ceil(lo), math.floor(hi) + 1)]
    candidates += [math.log2(n) for n in counts]
    kept: list[float] = []
    for c in candidates:
        if all(abs(c - k) * px_per_octave >= TICK_GAP_PX for k in kept):
            kept.append(c)
    ticks = [(k, f"{round(2 ** k):d}") for k in sorted(kept)]
    return Axis(lo, hi, ticks, "vGPUs (log2 scale)")


def _log_axis(values: list[float], label: str, fmt: Callable[[float], str]) -> Axis:
    """Whole decades over positive values. html_report's latency axis does this for any positive
    numbers (with 1-2-5 ticks inside a narrow range); only its labels are ns, so they are redone."""
    ax = _latency_axis(values)
    return Axis(ax.lo, ax.hi, [(t, fmt(10.0 ** t) if lab else "") for t, lab in ax.ticks], label)


def _linear_axis(values: list[float], label: str) -> Axis:
    peak = max(values, default=0.0) or 1.0
    step = _nice_step(peak, 5)
    hi = step * math.ceil(peak / step)
    return Axis(0.0, hi, [(k * step, f"{k * step:g}") for k in range(int(round(hi / step)) + 1)],
                label)


def _with_room(ax: Axis, plotted: list[float]) -> Axis:
    """The axis stretched so no plotted value lies within EDGE_PX of either end: a value on a
    decade, or on the top tick, would otherwise put half its dot outside the plot."""
    lo, hi = ax.lo, ax.hi
    if plotted:
        room = EDGE_PX / PLOT_H * ((hi - lo) or 1.0)
        lo, hi = min(lo, min(plotted) - room), max(hi, max(plotted) + room)
    return Axis(lo, hi, ax.ticks, ax.label)


# ---- charts -------------------------------------------------------------------------------------
# A chart's line: its name, and a run's value for it (None where the run has none).
Line = tuple[str, Callable[[dict], "float | None"]]


def _frac(ax: Axis, v: float) -> float:
    """Where v lies along the axis, 0 at lo and 1 at hi (as html_report's _chart maps it)."""
    return (v - ax.lo) / ((ax.hi - ax.lo) or 1.0)


def _dot(name: str, colour: str, run: dict, value: float, xa: Axis, ya: Axis, y: float) -> str:
    """A run's point: data-x is its vGPU count and data-y the value in the chart's unit; a failed
    run's dot is hollow."""
    cx = MARGIN_L + _frac(xa, math.log2(run["vgpus"])) * PLOT_W
    cy = MARGIN_T + PLOT_H - _frac(ya, y) * PLOT_H
    failed = _failed(run)
    return (f'<circle class="pt{" fail" if failed else ""}" cx="{cx:.1f}" cy="{cy:.1f}" '
            f'r="{DOT_R}" fill="{"#fff" if failed else colour}" stroke="{colour}" '
            f'data-series="{_e(name)}" data-x="{run["vgpus"]}" data-y="{value:.6g}">'
            f'<title>{_e(name)}, {run["vgpus"]} vGPUs: '
            f'{f"{value:.4g}" if value < 1e4 else f"{value:,.0f}"}</title></circle>')


def _scale_chart(cid: str, title: str, runs: list[dict], lines: list[Line], y_label: str,
                 fmt: Callable[[float], str] | None = None) -> str:
    """One chart against log2 of the vGPU count: a line and dots per series. With `fmt` the y
    axis is log10 (labelled by fmt), else linear from 0. Every failed run's count is marked,
    whether or not it has a point, and the runs a line has no value for are named below."""
    xa = _x_axis(runs)
    drawn: list[tuple[str, str, list[tuple[dict, float]]]] = []
    lacking_by: dict[tuple[str, ...], list[str]] = {}    # counts without a value -> the lines
    for i, (name, value) in enumerate(lines):
        pts, lacking = [], []
        for r in runs:
            v = value(r)
            # a log axis has no place for 0 or less
            if v is not None and (fmt is None or v > 0):
                pts.append((r, v))
            else:
                lacking.append(str(r["vgpus"]))
        drawn.append((name, PALETTE[i % len(PALETTE)], pts))
        if lacking:
            lacking_by.setdefault(tuple(lacking), []).append(name)
    to_y: Callable[[float], float] = math.log10 if fmt else float
    values = [v for _n, _c, pts in drawn for _r, v in pts]
    ya = _log_axis(values, y_label, fmt) if fmt else _linear_axis(values, y_label)
    ya = _with_room(ya, [to_y(v) for v in values])
    series = [Series(name, [(math.log2(r["vgpus"]), to_y(v)) for r, v in pts], colour)
              for name, colour, pts in drawn if pts]
    fails = sorted({math.log2(r["vgpus"]) for r in runs if _failed(r)})
    svg = _chart(cid, "chart-scale", title, series, xa, ya,
                 {"x-scale": "log2", "y-scale": "log10" if fmt else "linear"},
                 [(x, x, "fail") for x in fails])
    dots = "".join(_dot(name, colour, r, v, xa, ya, to_y(v))
                   for name, colour, pts in drawn for r, v in pts)
    # the dots go last in the svg, so they are drawn over the lines and the fail marks
    head, close, tail = svg.rpartition("</svg>")
    # one sentence when every line lacks the same runs (a run that never started lacks them all)
    notes = [("No value" if len(names) == len(lines) else f"{' and '.join(names)}: no value")
             + f" for {', '.join(counts)} vGPUs" for counts, names in lacking_by.items()]
    note = (f'<p class="note missing" data-chart="{_e(cid)}">{_e("; ".join(notes))}.</p>'
            if notes else "")
    return f'<div class="scale-chart">{head}{dots}{close}{tail}{note}</div>'


def _charts_html(runs: list[dict]) -> str:
    def traps(r: dict) -> float | None:
        return _metric(r, "traps_per_s")

    def workloads(r: dict) -> float | None:
        return _metric(r, "workloads_per_s")

    def mmio_p99(r: dict) -> float | None:
        return _ms(r, "p99_us")

    def workload_p99(r: dict) -> float | None:
        return _ms(r, "workload_p99_us")

    charts = [
        _scale_chart("chart-p99", "p99 latency by vGPU count", runs,
                     [("MMIO read p99", mmio_p99), ("workload p99", workload_p99)],
                     "p99 latency, ms (log scale)", lambda v: f"{v:g}"),
        _scale_chart("chart-throughput", "Throughput by vGPU count", runs,
                     [("traps/s", traps), ("workloads/s", workloads)],
                     "per second (log scale)", _fmt_count),
        _scale_chart("chart-cpu", "CPU per operation by vGPU count", runs,
                     [("CPU us per operation", _us_per_op)], "CPU us per operation"),
    ]
    return ('<p class="note">Each point is one run; hollow points are runs that failed, and a '
            'red dashed line marks each failed run\'s vGPU count. CPU per operation is one '
            'million over the operations per CPU-second of every process of the bench.</p>'
            '<div class="charts">' + "".join(charts) + "</div>")


# ---- tables -------------------------------------------------------------------------------------
HEAD = ("vGPUs", "GPUs", "verdict", "traps/s", "workloads/s", "MMIO read p50 ms",
        "MMIO read p99 ms", "workload p99 ms", "ops per CPU-second", "CPU s per vGPU",
        "RSS per vGPU MiB", "achieved / offered per s", "warnings")


def _measured_cells(run: dict) -> list[str]:
    """The text of a run's number columns, "-" for each one it has not."""
    achieved, offered = _metric(run, "achieved_per_s"), _metric(run, "offered_per_s")
    return [_num(_metric(run, "traps_per_s")), _num(_metric(run, "workloads_per_s")),
            _num(_ms(run, "p50_us"), 2), _num(_ms(run, "p99_us"), 2),
            _num(_ms(run, "workload_p99_us"), 2), _num(_metric(run, "ops_per_cpu_s")),
            _num(_metric(run, "cpu_s_per_vgpu"), 2), _num(_metric(run, "rss_per_vgpu_mib")),
            "-" if achieved is None and offered is None else f"{_num(achieved)} / {_num(offered)}"]


def _summary_table(runs: list[dict]) -> str:
    th = "".join(f'<th{" class=n" if 3 <= i < len(HEAD) - 1 else ""}>{_e(h)}</th>'
                 for i, h in enumerate(HEAD))
    rows = []
    for run in runs:
        cls = "fail" if _failed(run) else "pass"
        verdict = str(run.get("verdict", "?"))
        cells = [f'<td class=n>{run["vgpus"]}</td>', f'<td class=n>{_e(_num(run.get("gpus")))}</td>',
                 f'<td><span class="verdict {cls}">{_e(verdict)}</span></td>']
        nums = _measured_cells(run)
        if all(_metric(run, k) is None for k in METRICS):
            cells.append(f'<td class="missing" colspan="{len(nums)}">no measurements: the run '
                         f'produced no numbers</td>')
        else:
            cells += [f"<td class=n>{_e(c)}</td>" for c in nums]
        warnings = _strings(run.get("warnings"))
        cells.append('<td class="warnings">' + ("<br>".join(_e(w) for w in warnings) or "-")
                     + "</td>")
        rows.append(f'<tr class="{cls}" data-vgpus="{run["vgpus"]}" data-verdict="{_e(verdict)}">'
                    + "".join(cells) + "</tr>")
    return (f'<table id="scale-table"><thead><tr>{th}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _reasons_html(runs: list[dict]) -> str:
    items = []
    for run in runs:
        if _failed(run):
            for reason in _strings(run.get("reasons")) or ["failed; no reason was given"]:
                items.append(f'<li data-vgpus="{run["vgpus"]}"><b>{run["vgpus"]} vGPUs</b>: '
                             f"{_e(reason)}</li>")
    if not items:
        return '<p id="reasons" class="note">Every run passed.</p>'
    return '<h3>Why runs failed</h3><ul id="reasons" class="reasons">' + "".join(items) + "</ul>"


def _processes_html(runs: list[dict]) -> str:
    """Each run's CPU seconds and RSS by process, folded away: they are long, and read only to
    see which process grows with the vGPU count."""
    parts = []
    for i, run in enumerate(runs):
        cpu = run.get("cpu_s_by_process") if isinstance(run.get("cpu_s_by_process"), dict) else {}
        rss = (run.get("rss_by_process_mib") if isinstance(run.get("rss_by_process_mib"), dict)
               else {})
        names = sorted(set(cpu) | set(rss), key=str)
        summary = (f"{run['vgpus']} vGPUs on {_num(run.get('gpus'))} GPUs: CPU "
                   f"{_num(_metric(run, 'cpu_s'))} s, RSS {_num(_metric(run, 'rss_mib'))} MiB")
        if names:
            rows: list[list[Any]] = [[str(n), _metric(cpu, n), _metric(rss, n)] for n in names]
            rows.append(["all", _metric(run, "cpu_s"), _metric(run, "rss_mib")])
            body = _table(f"procs-{i}", ["process", "CPU s", "RSS MiB"], rows)
        else:
            body = '<p class="note">No per-process numbers: the run did not get that far.</p>'
        parts.append(f'<details class="procs" data-vgpus="{run["vgpus"]}"><summary>{_e(summary)}'
                     f"</summary>{body}</details>")
    return "".join(parts)


# ---- the page -----------------------------------------------------------------------------------
def render(result: dict) -> str:
    """The whole page for a scale result dict; ResultInvalid if it is not one."""
    check_result(result)
    runs = sorted(result["runs"], key=lambda r: (r["vgpus"], _metric(r, "gpus") or 0.0))
    failed = sum(_failed(r) for r in runs)
    verdict = "fail" if failed else "pass"
    lo, hi = runs[0]["vgpus"], runs[-1]["vgpus"]
    summary = (f"{len(runs)} runs, {lo} to {hi} vGPUs; config {result.get('config', '-')}; "
               f"{_num(_metric(result, 'duration_s'))} s of load a run at an offered rate of "
               f"{_num(_metric(result, 'rate'))} per second; result schema "
               f"{result.get('schema', '-')}")
    badge = (f"{failed} of {len(runs)} runs failed" if failed else f"all {len(runs)} runs passed")
    sections = [
        ("runs", "Runs",
         f'<p><span class="verdict {verdict}" id="verdict-badge">{_e(badge)}</span></p>'
         '<p class="note">Latencies in milliseconds: MMIO read traps as the guests saw them, and '
         'workloads from submission to retirement. "-": the run has no such number.</p>'
         + _summary_table(runs) + _reasons_html(runs)),
        ("charts", "Against the vGPU count", _charts_html(runs)),
        ("processes", "Processes", _processes_html(runs)),
    ]
    nav = "".join(f'<a href="#{sid}">{title}</a>' for sid, title, _b in sections)
    body = "".join(f'<section id="{sid}"><h2>{title}</h2>{b}</section>' for sid, title, b in sections)
    return ("<!doctype html>\n"
            f'<html lang="en"><head><meta charset="utf-8"><title>gvtbench scale: {verdict}, '
            f"{len(runs)} runs, {lo}-{hi} vGPUs</title>"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{CSS}{EXTRA_CSS}</style></head><body>"
            f'<header><h1>gvtbench scale sweep</h1><p class="summary">{_e(summary)}</p>'
            f"<nav>{nav}</nav></header>{body}</body></html>\n")


def write(result: dict, path: str | Path) -> None:
    """Write the page for `result` to `path` (rendered first: a bad result writes nothing)."""
    text = render(result)
    Path(path).write_text(text, encoding="utf-8")
