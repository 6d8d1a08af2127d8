"""A run's result as one self-contained HTML file: tables, and charts drawn as inline SVG here in
Python. Nothing is fetched when it opens (no script, font or style from elsewhere), so it can be
mailed, archived or opened on a machine with no network.

Sections: the verdict and its reasons; latency percentiles by vGPU and kind; the latency
distribution (HdrHistogram percentile plots); throughput over time (the guests' per-second
counts); workloads; the ledger; the config. Every string that comes from the result is escaped.
"""
from __future__ import annotations

import functools
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from bench import report
from bench.report import KINDS as TRAP_KINDS
from nodes.stats import LatencyHistogram

STAGES = ("hypervisor", "mediator")
# Tableau 10: distinct on screen and in print
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
PER_DECADE = 20             # percentile plot points per decade of 1/(1-p)
WIDTH, HEIGHT = 560, 300    # a chart's SVG size in px
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 12, 12, 42


class ResultInvalid(Exception):
    """The file is not a gvtbench result this report can read."""


def load_result(path: str | Path) -> dict:
    """Read and check a result JSON (as `gvtbench run --json` writes it)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ResultInvalid(f"cannot read {path}: {err.strerror or err}") from None
    try:
        result = json.loads(text)
    except ValueError as err:
        raise ResultInvalid(f"{path} is not JSON: {err}") from None
    check_result(result, str(path))
    return result


def check_result(result: Any, where: str = "the result") -> None:
    """Raise ResultInvalid naming the first thing a report needs that `result` lacks."""
    if not isinstance(result, dict):
        raise ResultInvalid(f"{where} is not a gvtbench result: a JSON object was expected, "
                            f"got {type(result).__name__}")
    for key, typ in (("schema", int), ("seed", int), ("translator", str), ("vgpus", list),
                     ("verdict", str), ("reasons", list), ("config", dict)):
        if key not in result:
            raise ResultInvalid(f"{where} is not a gvtbench result: it has no {key!r} key")
        if not isinstance(result[key], typ):
            raise ResultInvalid(f"{where}: {key!r} must be a {typ.__name__}, got "
                                f"{type(result[key]).__name__}")
    for i, v in enumerate(result["vgpus"]):
        if not isinstance(v, dict) or not all(k in v for k in ("id", "type", "traps")):
            raise ResultInvalid(f"{where}: vgpus[{i}] is not a vGPU (an object with 'id', 'type' "
                                f"and 'traps')")


# ---- numbers --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _decode(encoded: str) -> Any:
    """A result's "hdr" string as an hdrh HdrHistogram (decoded once: the table and the chart
    both read it)."""
    try:
        return LatencyHistogram.from_dict({"hdr": encoded}).hdr
    except ValueError as err:
        raise ResultInvalid(f"an 'hdr' value is not a base64 HdrHistogram: {err}") from None


def percentile_points(encoded: str) -> list[tuple[float, float]]:
    """The classic HdrHistogram percentile plot of a base64 compressed V2 histogram (values in ns):
    (x, value ns) with x = log10(1 / (1 - p)), PER_DECADE points per decade, up to where one
    sample is left (1 - p = 1/count), whose value is the maximum."""
    h = _decode(encoded)
    n = h.get_total_count()
    if n <= 0:
        return []
    top = math.log10(n)
    steps = math.ceil(top * PER_DECADE - 1e-9)
    xs = [min(k / PER_DECADE, top) for k in range(steps + 1)]
    pcts = [100.0 * (1.0 - 10.0 ** -x) for x in xs]
    vals = h.get_percentile_to_value_dict(pcts)
    pts = [(x, float(vals[p])) for x, p in zip(xs, pcts) if p in vals]
    if len(pts) > 1:
        pts[-1] = (top, float(h.get_max_value()))
    else:
        # one sample: every percentile is that sample; draw it out to p90 so it shows as a line
        pts = [(0.0, float(h.get_max_value())), (1.0, float(h.get_max_value()))]
    return pts


def _pct_label(decade: int) -> str:
    """0 -> 0%, 1 -> 90%, 2 -> 99%, 3 -> 99.9% ..."""
    if decade == 0:
        return "0%"
    return f"{100 - 10.0 ** (2 - decade):.{max(0, decade - 2)}f}%"


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def _fmt_ns(ns: float) -> str:
    if ns >= 1e9:
        return f"{ns / 1e9:g} s"
    if ns >= 1e6:
        return f"{ns / 1e6:g} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:g} us"
    return f"{ns:g} ns"


def _num(v: Any, digits: int = 1) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _slug(v: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(v))


# ---- charts -------------------------------------------------------------------------------------
@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]       # in plot coordinates (already log10 where the axis is)
    color: str
    dash: str = ""          # "": solid, "dashed" (failures), "dotted"


@dataclass
class Axis:
    lo: float
    hi: float
    ticks: list[tuple[float, str]] = field(default_factory=list)
    label: str = ""


def _chart(cid: str, cls: str, title: str, series: list[Series], x: Axis, y: Axis,
           attrs: dict[str, Any] | None = None,
           marks: list[tuple[float, float, str]] | None = None) -> str:
    """One line chart as an <svg class="chart ..."> with a legend. The svg carries data-series and
    data-points (what was given to draw); each line is a <path class="series"> with its data-name
    and data-points. `marks` (from, to, label) shade an x range with a line at its start: a
    fault and its window, <g class="fault-mark" data-fault=label>."""
    pw, ph = WIDTH - MARGIN_L - MARGIN_R, HEIGHT - MARGIN_T - MARGIN_B
    xs = (x.hi - x.lo) or 1.0
    ys = (y.hi - y.lo) or 1.0

    def px(v: float) -> float:
        return MARGIN_L + (v - x.lo) / xs * pw

    def py(v: float) -> float:
        return MARGIN_T + ph - (v - y.lo) / ys * ph

    out = []
    extra = "".join(f' data-{_e(k)}="{_e(v)}"' for k, v in (attrs or {}).items())
    npts = sum(len(s.points) for s in series)
    out.append(f'<figure class="chart-box"><figcaption>{_e(title)}</figcaption>'
               f'<svg id="{_e(cid)}" class="chart {_e(cls)}" width="{WIDTH}" height="{HEIGHT}" '
               f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{_e(title)}" '
               f'data-series="{len(series)}" data-points="{npts}" '
               f'data-plot="{MARGIN_L} {MARGIN_T} {pw} {ph}"{extra}>')
    out.append(f'<rect class="plot" x="{MARGIN_L}" y="{MARGIN_T}" width="{pw}" height="{ph}"/>')
    for v, label in y.ticks:
        if y.lo - 1e-9 <= v <= y.hi + 1e-9:
            yy = py(v)
            out.append(f'<line class="grid" x1="{MARGIN_L}" y1="{yy:.1f}" x2="{MARGIN_L + pw}" '
                       f'y2="{yy:.1f}"/>')
            if label:
                out.append(f'<text class="tick" x="{MARGIN_L - 4}" y="{yy + 4:.1f}" '
                           f'text-anchor="end">{_e(label)}</text>')
    for v, label in x.ticks:
        if x.lo - 1e-9 <= v <= x.hi + 1e-9:
            xx = px(v)
            # the last label ends at the plot's edge instead of running past the svg
            anchor = "end" if v >= x.hi - 1e-9 and v > x.lo else "middle"
            out.append(f'<line class="grid" x1="{xx:.1f}" y1="{MARGIN_T}" x2="{xx:.1f}" '
                       f'y2="{MARGIN_T + ph}"/>')
            out.append(f'<text class="tick" x="{xx:.1f}" y="{MARGIN_T + ph + 14}" '
                       f'text-anchor="{anchor}">{_e(label)}</text>')
    for a, b, label in marks or ():
        a, b = max(a, x.lo), min(b, x.hi)
        if a > x.hi or b < x.lo:
            continue
        xa, xb = px(a), px(b)
        out.append(f'<g class="fault-mark" data-fault="{_e(label)}"><title>{_e(label)}</title>'
                   f'<rect class="fault-window" x="{xa:.1f}" y="{MARGIN_T}" '
                   f'width="{max(xb - xa, 1):.1f}" height="{ph}"/>'
                   f'<line class="fault-at" x1="{xa:.1f}" y1="{MARGIN_T}" x2="{xa:.1f}" '
                   f'y2="{MARGIN_T + ph}"/><text class="fault-label" x="{xa + 3:.1f}" '
                   f'y="{MARGIN_T + 12}">{_e(label)}</text></g>')
    out.append(f'<text class="axis" x="{MARGIN_L + pw / 2:.0f}" y="{HEIGHT - 6}" '
               f'text-anchor="middle">{_e(x.label)}</text>')
    out.append(f'<text class="axis" x="12" y="{MARGIN_T + ph / 2:.0f}" text-anchor="middle" '
               f'transform="rotate(-90 12 {MARGIN_T + ph / 2:.0f})">{_e(y.label)}</text>')
    for s in series:
        d = " ".join(f"{'M' if i == 0 else 'L'}{px(a):.1f} {py(b):.1f}"
                     for i, (a, b) in enumerate(s.points))
        dash = {"dashed": ' stroke-dasharray="6 4"', "dotted": ' stroke-dasharray="2 3"'}.get(s.dash, "")
        out.append(f'<path class="series" d="{d}" stroke="{s.color}"{dash} '
                   f'data-name="{_e(s.name)}" data-points="{len(s.points)}">'
                   f'<title>{_e(s.name)}</title></path>')
    out.append("</svg>")
    out.append('<ul class="legend">' + "".join(
        f'<li><span class="swatch {s.dash}" style="border-color:{s.color}">'
        f'</span>{_e(s.name)}</li>' for s in series) + "</ul></figure>")
    return "".join(out)


def _latency_axis(values_ns: Iterable[float]) -> Axis:
    """A log10 axis over whole decades of ns, labelled 1 us, 10 us ... (1-2-5 inside when the
    range is narrow enough to need them)."""
    vals = [v for v in values_ns if v > 0]
    lo = math.floor(math.log10(min(vals))) if vals else 3
    hi = math.ceil(math.log10(max(vals))) if vals else 6
    if hi <= lo:
        hi = lo + 1
    ticks = []
    for dec in range(lo, hi + 1):
        ticks.append((float(dec), _fmt_ns(10.0 ** dec)))
        if hi - lo <= 3 and dec < hi:
            for m in (2, 5):
                ticks.append((dec + math.log10(m), _fmt_ns(m * 10.0 ** dec) if hi - lo <= 2 else ""))
    return Axis(float(lo), float(hi), ticks, "latency (log scale)")


def _distribution_charts(result: dict) -> str:
    """One percentile plot per trap kind and per workload engine, a line per vGPU."""
    groups: dict[str, list[tuple[str, str]]] = {}      # chart key -> [(vGPU label, hdr)]
    titles: dict[str, str] = {}
    for v in result["vgpus"]:
        vname = f"vGPU {v['id']}"
        for kind, s in (v.get("traps") or {}).items():
            if isinstance(s, dict) and s.get("hdr"):
                groups.setdefault(f"trap-{kind}", []).append((vname, s["hdr"]))
                titles[f"trap-{kind}"] = f"{kind} trap latency, guest view"
        for eng, s in (v.get("workload") or {}).items():
            if isinstance(s, dict) and s.get("hdr"):
                key = f"workload-{eng}"
                groups.setdefault(key, []).append((vname, s["hdr"]))
                titles[key] = ("workload latency, all engines" if eng == "all"
                               else f"workload latency, {eng}")
    order = [f"trap-{k}" for k in TRAP_KINDS] + ["workload-all"]
    keys = [k for k in order if k in groups] + sorted(k for k in groups if k not in order)
    charts = []
    for key in keys:
        series, all_vals, top = [], [], 2.0
        for i, (vname, enc) in enumerate(groups[key]):
            pts = percentile_points(enc)
            if not pts:
                continue
            all_vals += [b for _a, b in pts]
            top = max(top, pts[-1][0])
            series.append(Series(vname, [(a, math.log10(max(b, 1.0))) for a, b in pts],
                                 PALETTE[i % len(PALETTE)]))
        if not series:
            continue
        # the axis ends a quarter decade past the longest line, not a whole decade past it
        hi = math.ceil(top * 4 - 1e-9) / 4
        xa = Axis(0.0, hi, [(float(d), _pct_label(d)) for d in range(math.floor(hi) + 1)],
                  "percentile (log scale of 1/(1-p))")
        charts.append(_chart(f"dist-{_slug(key)}", "chart-distribution", titles[key], series,
                             xa, _latency_axis(all_vals), {"kind": key}))
    if not charts:
        return ('<p class="note">This result holds no HdrHistogram (no "hdr" key in its latency '
                'summaries): it was written before they were recorded.</p>')
    return '<div class="charts">' + "".join(charts) + "</div>"


def _fault_marks(result: dict, tl: dict) -> list[tuple[float, float, str]]:
    """The run's fault windows on a guest's time axis (its load started at its timeline's t0)."""
    windows = (result.get("faults") or {}).get("windows") or []
    t0 = result.get("load_t0_ns")
    if not windows or not t0 or not tl.get("t0_ns"):
        return []
    off = (tl["t0_ns"] - t0) / 1e9
    return [(w["from_s"] - off, w["to_s"] - off, w["fault"]) for w in windows]


def _throughput_chart(v: dict, result: dict | None = None) -> str | None:
    """Completed (and failed) operations per second by mix, and workloads retired, of one vGPU:
    a step line per series, each interval's count over its length; the run's faults marked."""
    tl = v.get("timeline") or {}
    bins, step = int(tl.get("bins") or 0), float(tl.get("interval_s") or 1.0)
    if bins <= 0:
        return None
    raw: list[tuple[str, list[int], str]] = []
    for mix, by in sorted((tl.get("ops") or {}).items()):
        raw.append((f"{mix} ops", by.get("completed") or [], ""))
        if any(by.get("failed") or []):
            raw.append((f"{mix} failed", by["failed"], "dashed"))
    wl = tl.get("workloads") or {}
    if wl:
        # dotted: it runs on top of the submit line (a submit op completes when its workload
        # retires), and both must stay visible
        raw.append(("workloads retired", wl.get("completed") or [], "dotted"))
        if any(wl.get("failed") or []):
            raw.append(("workloads failed", wl["failed"], "dashed"))
    series, peak = [], 0.0
    for i, (name, counts, dash) in enumerate(raw):
        pts: list[tuple[float, float]] = []
        for k, c in enumerate(counts[:bins]):
            rate = c / step
            peak = max(peak, rate)
            pts += [(k * step, rate), ((k + 1) * step, rate)]
        if pts:
            series.append(Series(name, pts, PALETTE[i % len(PALETTE)], dash))
    if not series:
        return None
    span = bins * step
    xstep = _nice_step(span, 6)
    xa = Axis(0.0, span, [(k * xstep, f"{k * xstep:g}") for k in range(int(span / xstep) + 1)],
              "seconds since this guest's load started")
    ystep = _nice_step(peak or 1.0, 5)
    yhi = ystep * math.ceil((peak or 1.0) / ystep)
    ya = Axis(0.0, yhi, [(k * ystep, f"{k * ystep:g}") for k in range(int(round(yhi / ystep)) + 1)],
              "per second")
    note = f" ({step:g} s intervals)" if step != 1.0 else ""
    return _chart(f"tput-vgpu-{_slug(v['id'])}", "chart-throughput",
                  f"vGPU {v['id']} ({v.get('type', '?')}): throughput{note}", series, xa, ya,
                  {"vgpu": v["id"]}, _fault_marks(result or {}, tl))


def _faults_html(result: dict) -> str:
    """The fault plan, every node fault with its times, what each link met, and per vGPU what
    each fault cost."""
    f = result.get("faults") or {}
    if not f.get("plan"):
        return '<p class="note">No faults were injected (no [faults] plan).</p>'
    out = [f'<p>Seed {_e(f.get("seed"))}; specs: <code>{_e(" ".join(f.get("specs") or []))}</code>.</p>']
    nodes = f.get("nodes") or []
    if nodes:
        out.append("<h3>Node faults</h3>" + _table(
            "node-faults-table", ["fault", "node", "kind", "at s", "length s", "down s", "ready s",
                                  "killed with it"],
            [[n.get("spec") or n["kind"], n["node"], n["kind"], n.get("at_s"), n.get("length_s", "-"),
              n.get("down_s", "-"), n.get("ready_s", "-"), ", ".join(n.get("also_killed") or []) or "-"]
             for n in nodes], numeric_from=3))
    totals = f.get("totals") or {}
    if totals:
        out.append("<h3>Frame faults, all links</h3>" + _table(
            "frame-faults-table", ["kind", "frames"], sorted(totals.items())))
    rows = [[v["id"], c["fault"], c["failed_ops"], c["unknown_ops"], c["failed_workloads"],
             c.get("killed_in_flight", 0)] for v in result["vgpus"] for c in v.get("fault_costs", [])]
    if rows:
        out.append('<h3>What each fault cost</h3><p class="note">In the fault\'s window: from the '
                   "fault to its end, plus the guests' hang check and the liveness timeout. "
                   "Killed in flight: operations a killed incarnation of the guest had in flight "
                   "(outcome unknown).</p>" + _table(
                       "fault-costs-table", ["vGPU", "fault", "ops failed", "ops unknown",
                                             "workloads failed", "killed in flight"], rows,
                       numeric_from=2))
    return "".join(out)


# ---- tables -------------------------------------------------------------------------------------
def _table(tid: str, head: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    th = "".join(f'<th{" class=n" if i >= numeric_from else ""}>{_e(h)}</th>' for i, h in enumerate(head))
    body = []
    for r in rows:
        body.append("<tr>" + "".join(
            f'<td{" class=n" if i >= numeric_from else ""}>{_e(_num(c) if not isinstance(c, str) else c)}</td>'
            for i, c in enumerate(r)) + "</tr>")
    return f'<table id="{_e(tid)}"><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _max_us(s: dict) -> float | None:
    return _decode(s["hdr"]).get_max_value() / 1000.0 if s.get("hdr") else None


def _latency_rows(result: dict) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for v in result["vgpus"]:
        entries: list[tuple[str, str, dict]] = []
        for kind, s in (v.get("traps") or {}).items():
            entries.append((kind, "guest", s))
        for st in STAGES:
            for kind, s in ((v.get("stages") or {}).get(st) or {}).items():
                entries.append((kind, st, s))
        for eng, s in (v.get("workload") or {}).items():
            entries.append((f"workload {eng}", "guest", s))
        for kind, stage, s in entries:
            if not isinstance(s, dict):
                continue
            rows.append([str(v["id"]), kind, stage, s.get("count"), s.get("p50_us"),
                         s.get("p99_us"), s.get("p999_us"), _max_us(s)])
    return rows


def _workload_rows(result: dict) -> list[list[Any]]:
    rows = []
    for v in result["vgpus"]:
        w, pp, ex = v.get("workloads") or {}, v.get("ppgtt") or {}, v.get("execlist") or {}
        rows.append([str(v["id"]), v.get("type", "?"),
                     *(w.get(k, 0) for k in ("submitted", "completed", "failed", "failed_expected",
                                             "lost", "duplicated", "misplaced")),
                     pp.get("tracked_writes", 0), pp.get("shadow_pages", 0),
                     ex.get("context_switches", 0), ex.get("virtual_irqs", 0)])
    return rows


def _sched_rows(result: dict) -> list[list[Any]]:
    """Each vGPU's share of its GPU's time against its weight's share (the time-slice policy)."""
    rows = []
    for v in result["vgpus"]:
        sc = v.get("sched") or {}
        engines = sc.get("engine_ms") or {}
        rows.append([str(v["id"]), str(v.get("gpu", 0)), str(v.get("weight", "?")),
                     f"{sc.get('weight_share', 0.0):.1%}", f"{sc.get('gpu_share', 0.0):.1%}",
                     f"{(sc.get('gpu_share', 0.0) - sc.get('weight_share', 0.0)) * 100:+.1f}",
                     f"{sc.get('gpu_ms', 0.0):,.1f}",
                     ", ".join(f"{e} {ms:,.1f}" for e, ms in engines.items()) or "-"])
    return rows


def _sched_html(result: dict) -> str:
    heads = result.get("scheduler") or []
    lines = "".join(
        f'<p>GPU {i}: policy <code>{_e(h.get("policy") or "?")}</code>, '
        f'{_num(h.get("switches") or 0)} vGPU switches, {_num(h.get("mmio_switches") or 0)} engine '
        f'MMIO context switches ({(h.get("mmio_switch_ns") or 0) / 1e6:,.1f} ms), '
        f'{_num(h.get("host_resets") or 0)} engines reset by the host\'s hang detection.</p>'
        for i, h in enumerate(heads))
    return (lines + '<p class="note">GPU share: the time the vGPU owned its GPU over all its '
            'GPU\'s vGPUs\' (what the time-slice policy charges); weight share: its weight over '
            'theirs, the share the policy aims at when every vGPU has work. Engine ms: its '
            'workloads\' time on each engine, from dispatch to interrupt.</p>'
            + _table("sched-table", ["vGPU", "GPU", "weight", "weight share", "GPU share",
                                     "points off", "owned ms", "engine ms"], _sched_rows(result),
                     numeric_from=2))


def _guest_rows(result: dict) -> list[list[Any]]:
    rows = []
    for v in result["vgpus"]:
        g, c, p = v.get("guest") or {}, v.get("ggtt") or {}, v.get("probes") or {}
        rows.append([str(v["id"]), *(g.get(k) for k in ("issued", "completed", "failed", "unknown",
                                                         "pending", "mismatches")),
                     g.get("elapsed_s"), *(c.get(k, 0) for k in ("ok", "scratch", "not_present",
                                                                  "dropped", "pinned")),
                     f"{p.get('landed', 0):,}/{p.get('probes', 0):,}"])
    return rows


def _hostile_html(result: dict) -> str:
    hostile = result.get("hostile") or {}
    if not hostile:
        return '<p class="note">No VM of this run ran the hostile mix.</p>'
    parts = []
    for vm, h in sorted(hostile.items(), key=lambda kv: int(kv[0])):
        fs = h.get("failsafe")
        parts.append(f'<h3>vGPU {_e(vm)}</h3><p>{_num(h.get("attempted", 0), 0)} of '
                     f'{_num(h.get("planned", 0), 0)} attacks tried, {_num(h.get("reboots", 0), 0)} VM '
                     f'resets; the vGPU ends {"in failsafe (" + _e(fs) + ")" if fs else "active"}.</p>'
                     + _table(f"hostile-{_slug(vm)}", ["attack", "tries", "the kernel", "here", "unexpected"],
                              report.hostile_rows(h), numeric_from=99))
    return ('<p class="note">Each attack of the hostile mix, what the kernel\'s GVT-g makes of it '
            '(refused, failsafe, failed, contained) and what became of each try in this run; an '
            'unexpected outcome fails the verdict.</p>' + "".join(parts))


def _error_rows(result: dict) -> list[list[Any]]:
    rows = []
    for node, e in sorted((result.get("errors") or {}).items()):
        fmt = lambda d: ", ".join(f"{c} {n}" for c, n in sorted((d or {}).items())) or "-"
        rows.append([node, e.get("internal_errors", 0), fmt(e.get("failed_requests")),
                     fmt(e.get("hostile_failed_requests")), e.get("bad_frames", 0),
                     e.get("refused_messages", 0), e.get("late_replies", 0), e.get("dropped_frames", 0)])
    return rows


def _fail_reason_rows(result: dict) -> list[list[Any]]:
    return [[str(v["id"]), reason, n] for v in result["vgpus"]
            for reason, n in ((v.get("mediator") or {}).get("fail_reasons") or {}).items()]


def _config_html(cfg: dict) -> str:
    parts = []
    for sec, keys in cfg.items():
        if isinstance(keys, dict):
            rows = [[k, json.dumps(val)] for k, val in keys.items()]
        else:
            rows = [["", json.dumps(keys)]]
        parts.append(f'<h3>[{_e(sec)}]</h3>' + _table(f"config-{_slug(sec)}", ["key", "value"],
                                                        rows, numeric_from=99))
    return '<div class="config">' + "".join(parts) + "</div>"


# ---- the page ---------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;
 padding:0 16px 40px;color:#222;background:#fff}
h1{margin:16px 0 4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
nav a{margin-right:12px}
.verdict{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:600}
.verdict.pass{background:#2ca02c}.verdict.fail{background:#d62728}
table{border-collapse:collapse;margin:8px 0 16px;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #e4e4e4;padding:3px 10px;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.n,th.n{text-align:right}
.charts{display:flex;flex-wrap:wrap;gap:8px 24px}
figure.chart-box{margin:8px 0}figcaption{font-weight:600;margin-bottom:2px}
svg.chart .plot{fill:#fcfcfc;stroke:#999}
svg.chart .grid{stroke:#e2e2e2;stroke-width:1}
svg.chart .fault-window{fill:#d62728;fill-opacity:.08;stroke:none}
svg.chart .fault-at{stroke:#d62728;stroke-width:1.5;stroke-dasharray:4 3}
svg.chart .fault-label{font-size:10px;fill:#d62728}
svg.chart .tick,svg.chart .axis{font-size:11px;fill:#444}
svg.chart .series{fill:none;stroke-width:2;stroke-linejoin:round}
ul.legend{list-style:none;padding:0;margin:2px 0 0 64px;max-width:480px;font-size:12px}
ul.legend li{display:inline-block;margin-right:14px}
.swatch{display:inline-block;width:18px;height:0;border-top:3px solid;margin-right:5px;
 vertical-align:middle}.swatch.dashed{border-top-style:dashed}.swatch.dotted{border-top-style:dotted}
.note{color:#666}ul.reasons li{font-family:ui-monospace,monospace;white-space:pre-wrap}
code{font-family:ui-monospace,monospace}
"""

# Marks each chart with what the browser drew: how many of its lines have length, and how many
# stray outside the plot area. A headless browser's DOM dump then tells a drawn chart from an
# empty or mis-scaled one (tests/test_html_report.py reads these attributes).
JS = """
for (const svg of document.querySelectorAll("svg.chart")) {
  const [x, y, w, h] = svg.dataset.plot.split(" ").map(Number);
  let drawn = 0, outside = 0, length = 0;
  for (const p of svg.querySelectorAll("path.series")) {
    const len = p.getTotalLength();
    const b = p.getBBox();
    if (len > 0) { drawn++; length += len; }
    if (b.x < x - 1 || b.y < y - 1 || b.x + b.width > x + w + 1 || b.y + b.height > y + h + 1) outside++;
  }
  svg.dataset.drawnSeries = drawn;
  svg.dataset.drawnOutside = outside;
  svg.dataset.drawnLength = Math.round(length);
}
"""


def render_html(result: dict) -> str:
    """The whole report page for a result dict."""
    check_result(result)
    vg = result["vgpus"]
    verdict = "pass" if result["verdict"] == "pass" else "fail"
    summary = (f"{len(vg)} vGPUs, seed {result.get('seed', '?')}, translator "
               f"{result.get('translator', '?')}, scratch mode {result.get('scratch', '?')}, "
               f"{float(result.get('wall_s') or 0):.1f} s of load, result schema {result['schema']}")
    reasons = result["reasons"]
    if reasons:
        reasons_html = ('<ul id="reasons" class="reasons">'
                        + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>")
    else:
        reasons_html = '<p id="reasons" class="note">No check failed.</p>'
    dist_html = _distribution_charts(result)
    tput = [c for c in (_throughput_chart(v, result) for v in vg) if c]
    tput_html = ('<div class="charts">' + "".join(tput) + "</div>" if tput else
                 '<p class="note">This result holds no per-second counts (no "timeline" per vGPU).</p>')
    led = result.get("ledger") or {}
    iso = result.get("isolation") or {}
    link_rows = [[r.get("from", "?"), r.get("to", "?"), r.get("sent"), r.get("received"),
                  r.get("gaps")] for r in led.get("links") or []]
    sections = [
        ("verdict", "Verdict",
         f'<p><span class="verdict {verdict}" id="verdict-badge">verdict: {_e(result["verdict"])}'
         f'</span></p>{reasons_html}'),
        ("latency", "Latency percentiles",
         '<p class="note">By vGPU and kind, in microseconds. Guest rows run from the intended issue '
         'time to completion (open loop); hypervisor and mediator rows are those stages alone; '
         'workloads run from the ELSP submission to retirement.</p>'
         + _table("latency-table", ["vGPU", "kind", "stage", "count", "p50 us", "p99 us",
                                    "p99.9 us", "max us"], _latency_rows(result), numeric_from=3)),
        ("distribution", "Latency distribution",
         '<p class="note">HdrHistogram percentile plots: latency against the percentile, on a log '
         'scale of 1/(1-p) so the tail has room; each line ends at its maximum.</p>' + dist_html),
        ("throughput", "Throughput over time",
         '<p class="note">Operations completed per second by mix (failed ones dashed, when there '
         'are any), and workloads retired, as each guest counted them.</p>' + tput_html),
        ("workloads", "Workloads",
         _table("workloads-table", ["vGPU", "type", "submitted", "completed", "failed",
                                    "failed (meant)", "lost", "duplicated", "misplaced",
                                    "tracked writes", "shadow pages", "context switches",
                                    "virtual IRQs"], _workload_rows(result), numeric_from=2)
         + f'<p>Isolation sweep: {_num(iso.get("pages_checked", 0))} pages checked, '
           f'{_num(iso.get("violations", 0))} violations. Memory image sha256 '
           f'<code>{_e(result.get("memory_sha256", "-"))}</code>.</p>'
         + "<h3>Guest operations and GGTT entries</h3>"
         + _table("guests-table", ["vGPU", "issued", "completed", "failed", "unknown", "pending",
                                   "mismatches", "load s", "GGTT ok", "scratch", "not present",
                                   "dropped", "pinned", "GPU probes landed"], _guest_rows(result))
         + "<h3>Why workloads failed at the mediator</h3>"
         + (_table("fail-reasons-table", ["vGPU", "reason", "workloads"], _fail_reason_rows(result),
                   numeric_from=2) if _fail_reason_rows(result) else
            '<p class="note">No workload failed at the mediator.</p>')),
        ("scheduler", "GPU shares", _sched_html(result)),
        ("hostile", "Hostile guests", _hostile_html(result)),
        ("faults", "Faults", _faults_html(result)),
        ("ledger", "Ledger",
         f'<p>GGTT entries written outside every partition: '
         f'{_e(_num(led.get("ggtt_outside_written", "-")))}; physical GGTT sha256 '
         f'<code>{_e(led.get("ggtt_sha256", "-"))}</code>.</p><h3>Links</h3>'
         + _table("links-table", ["from", "to", "sent", "received", "gaps"], link_rows,
                  numeric_from=2)
         + "<h3>Errors the nodes counted</h3>"
         + _table("errors-table", ["node", "internal errors", "failed requests",
                                   "a hostile guest's failed requests", "bad frames",
                                   "refused messages", "late replies", "dropped frames"],
                  _error_rows(result), numeric_from=99)),
        ("config", "Config", _config_html(result["config"])),
    ]
    nav = "".join(f'<a href="#{sid}">{title}</a>' for sid, title, _b in sections)
    body = "".join(f'<section id="{sid}"><h2>{title}</h2>{b}</section>' for sid, title, b in sections)
    return ("<!doctype html>\n"
            f'<html lang="en"><head><meta charset="utf-8"><title>gvtbench: {verdict}, '
            f"{len(vg)} vGPUs, seed {_e(result.get('seed', '?'))}</title>"
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{CSS}</style></head><body>"
            f'<header><h1>gvtbench run</h1><p class="summary">{_e(summary)}</p><nav>{nav}</nav>'
            f"</header>{body}<script>{JS}</script></body></html>\n")


def write_html(result: dict, path: str | Path) -> None:
    Path(path).write_text(render_html(result), encoding="utf-8")
