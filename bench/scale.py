"""`gvtbench scale`: one run per vGPU count, each with its own verdict, and what each cost: trap
and workload throughput, latency percentiles over every vGPU, operations per CPU-second, CPU and
memory per process and per vGPU (bench.procstat), achieved against offered rate.

A count that fails (its verdict, or a run that could not start) is a row with its reasons; the
sweep goes on, and the sweep passes only if every count passed."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from rich import box
from rich.table import Table

from bench import config
from bench.launch import Launcher, RunFailed
from nodes.stats import LatencyHistogram
from nodes.wire.schema import MAX_GPUS

SCHEMA_VERSION = 1
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "scale.toml"


def parse_counts(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8]: distinct counts >= 1, in the order given."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"--vgpus wants counts >= 1 separated by commas (1,8,64), got {part!r}")
        if int(part) in out:
            raise ValueError(f"--vgpus names {part} twice")
        out.append(int(part))
    if not out:
        raise ValueError("--vgpus names no count")
    return out


def configs_for(cfg: dict, counts: list[int], duration: float | None,
                processes: str | None = None) -> list[dict]:
    """The config of each count: the sweep's config with vgpus.count set, on as many GPUs as
    it takes (at least the config's gpu.count, and one more per mediator.max_vgpus vGPUs),
    checked up front, so that a count the config cannot hold is refused before the first run,
    naming why."""
    out = []
    for n in counts:
        per_gpu = cfg["mediator"]["max_vgpus"]
        gpus = min(n, max(cfg["gpu"]["count"], -(-n // per_gpu)))
        if gpus > MAX_GPUS:
            raise config.ConfigError(f"--vgpus {n}", "vgpus.count",
                                     f"{n} vGPUs need {gpus} GPUs of mediator.max_vgpus = {per_gpu}; "
                                     f"a run has at most {MAX_GPUS} GPUs ({MAX_GPUS * per_gpu} vGPUs)")
        try:
            out.append(config.apply_overrides(cfg, vgpus=n, duration=duration, gpus=gpus,
                                              processes=processes))
        except config.ConfigError as err:
            raise config.ConfigError(f"--vgpus {n}", err.key, err.reason) from None
    return out


def _merged(vgpus: list[dict], pick: Callable[[dict], dict | None]) -> dict:
    """p50/p99 over every vGPU's histogram of one kind (HdrHistograms merge exactly)."""
    h = LatencyHistogram()
    for v in vgpus:
        d = pick(v)
        if d and d.get("hdr"):
            h.merge(LatencyHistogram.from_dict(d))
    s = h.summary_us()
    return {"count": s["count"], "p50_us": s["p50_us"], "p99_us": s["p99_us"]}


def summarize(result: dict, cfg: dict) -> dict:
    """One row of the sweep from a run's result."""
    vgpus = result["vgpus"]
    res = result.get("resources") or {}
    load_s = res.get("load_s") or result.get("wall_s") or 0.0
    counts = res.get("counts", {})
    read = _merged(vgpus, lambda v: v["traps"].get("mmio_read"))
    wl = _merged(vgpus, lambda v: v["workload"].get("all"))
    procs = res.get("processes", {})
    n = len(vgpus)
    per = lambda k: round(counts.get(k, 0) / load_s, 1) if load_s else None    # noqa: E731
    row = {"vgpus": n, "gpus": len(result.get("gpus") or ()) or cfg["gpu"]["count"],
           "verdict": result["verdict"], "reasons": list(result["reasons"]),
           "traps_per_s": per("mmio_traps"), "ggtt_entries_per_s": per("ggtt_entries"),
           "workloads_per_s": per("workloads"),
           "p50_us": read["p50_us"], "p99_us": read["p99_us"],
           "workload_p50_us": wl["p50_us"], "workload_p99_us": wl["p99_us"],
           "ops_per_cpu_s": (res.get("per_cpu_s") or {}).get("operations"),
           "per_cpu_s": res.get("per_cpu_s"),
           "cpu_s": res.get("cpu_s"), "cores": res.get("cores"),
           "cpu_s_per_vgpu": res.get("cpu_s_per_vgpu"),
           "cpu_s_by_process": {k: p["cpu_s"] for k, p in procs.items()},
           "rss_mib": res.get("rss_mib"), "rss_per_vgpu_mib": res.get("rss_per_vgpu_mib"),
           "rss_by_process_mib": {k: p["rss_mib"] for k, p in procs.items()},
           "guest_processes": sum(1 for k in procs if k.startswith("guests/")),
           "offered_per_s": None, "achieved_per_s": per("operations"),
           "unloaded_read_p50_us": min((g["p50_us"] for g in (result.get("unloaded") or {})
                                        .get("gpus", []) if "p50_us" in g), default=None),
           "warnings": list(result.get("warnings", []))}
    if cfg["load"]["mode"] == "open":
        row["offered_per_s"] = round(float(cfg["load"]["rate"]) * n, 1)
    return row


def run_scale(cfg: dict, counts: list[int], duration: float | None = None,
              on_run: Callable[[dict], None] | None = None,
              launcher: Callable[[dict], Any] = Launcher, processes: str | None = None) -> dict:
    """Run each count in turn; `on_run` hears of each row as it is done. `processes` overrides
    the config's run.processes."""
    cfgs = configs_for(cfg, counts, duration, processes)
    runs = []
    for c in cfgs:
        n = c["vgpus"]["count"]
        try:
            row = summarize(launcher(c).run(), c)
        except RunFailed as err:
            row = {"vgpus": n, "gpus": c["gpu"]["count"], "verdict": "fail",
                   "reasons": [f"the run failed: {err}"]}
        runs.append(row)
        if on_run:
            on_run(row)
    return {"schema": SCHEMA_VERSION, "config": cfg.get("_source", ""),
            "duration_s": float(cfgs[0]["run"]["duration_s"]),
            "rate": float(cfg["load"]["rate"]), "mode": cfg["load"]["mode"],
            "processes": cfgs[0]["run"]["processes"],
            "mix": dict(cfg["load"]["mix"]),
            "verdict": "pass" if all(r["verdict"] == "pass" for r in runs) else "fail",
            "runs": runs}


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:,.1f}"


def _n(v: float | None, fmt: str = ",.0f") -> str:
    return "-" if v is None else format(v, fmt)


def format_row(row: dict) -> str:
    """One line as a run ends."""
    if row.get("traps_per_s") is None:
        return f"{row['vgpus']:>4} vGPUs: {row['verdict']}: {'; '.join(row['reasons'][:2])}"
    return (f"{row['vgpus']:>4} vGPUs: {row['verdict']}  traps {_n(row['traps_per_s'])}/s  "
            f"workloads {_n(row['workloads_per_s'], ',.1f')}/s  read p99 {_ms(row['p99_us'])} ms  "
            f"workload p99 {_ms(row['workload_p99_us'])} ms  {_n(row['ops_per_cpu_s'])} ops/CPU-s  "
            f"{_n(row['rss_per_vgpu_mib'], '.1f')} MiB/vGPU"
            + (f"  ({len(row['reasons'])} reasons)" if row["reasons"] else "")
            + "".join(f"\n      warning: {w}" for w in row.get("warnings", [])[:3]))


def table(res: dict) -> Table:
    """The sweep as a table (the JSON has more: per process CPU and memory, GGTT entries/s)."""
    t = Table(title=f"gvtbench scale: {res['mode']} load, {res['rate']:g} ops/s per vGPU, "
                    f"{res['duration_s']:g} s a run: {res['verdict']}", show_edge=False,
              pad_edge=False, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True)
    for col in ("vGPU", "GPU", "verdict", "trap\n/s", "wl\n/s", "rd\np50", "rd\np99", "wl\np99",
                "op/\nCPU-s", "cores", "MiB/\nvGPU", "done"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in res["runs"]:
        ratio = (f"{r['achieved_per_s'] / r['offered_per_s']:.0%}"
                 if r.get("offered_per_s") and r.get("achieved_per_s") is not None else "-")
        t.add_row(str(r["vgpus"]), str(r["gpus"]),
                  "[green]pass[/]" if r["verdict"] == "pass" else "[red]fail[/]",
                  _n(r.get("traps_per_s")), _n(r.get("workloads_per_s"), ",.1f"),
                  _ms(r.get("p50_us")), _ms(r.get("p99_us")), _ms(r.get("workload_p99_us")),
                  _n(r.get("ops_per_cpu_s")), _n(r.get("cores"), ".2f"),
                  _n(r.get("rss_per_vgpu_mib"), ".1f"), ratio)
    t.caption = ("latency in ms (rd: MMIO read trap; wl: workload, ELSP to retirement); done: "
                 "share of the offered rate completed")
    return t
