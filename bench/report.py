"""Turning a result into something to read: a terminal table (rich)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

KINDS = ("mmio_read", "mmio_write", "gtt_write")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


HOSTILE_OUTCOMES = ("refused", "failsafe", "failed", "contained")


def hostile_rows(h: dict) -> list[list]:
    """One row per attack kind: tries, what the kernel makes of it, what became of the tries
    here, and how many did not end as the kernel ends them."""
    return [[kind, st["attempts"], "/".join(st["expected"]),
             ", ".join(f"{o} {st[o]}" for o in HOSTILE_OUTCOMES if st[o]) or "-", st["unexpected"]]
            for kind, st in h.get("attacks", {}).items()]


def hostile_table(vm: str, h: dict) -> Table:
    fs = h.get("failsafe")
    t = Table(title=f"vGPU {vm} (hostile): {h.get('attempted', 0)} of {h.get('planned', 0)} attacks "
                    f"tried, {h.get('reboots', 0)} VM resets, ends "
                    + (f"in failsafe ({fs})" if fs else "active"), box=None, padding=(0, 1))
    t.add_column("attack", no_wrap=True)
    t.add_column("tries", justify="right")
    t.add_column("the kernel")
    t.add_column("here")
    t.add_column("unexpected", justify="right")
    for row in hostile_rows(h):
        t.add_row(*(str(x) for x in row), style="bold red" if row[-1] else None)
    return t


def print_result(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"gvtbench: {len(result['vgpus'])} vGPUs, seed {result['seed']}, "
                    f"translator {result['translator']}, {result.get('wall_s', 0):.1f} s")
    t.add_column("vGPU", justify="right")
    t.add_column("type")
    t.add_column("trap kind")
    t.add_column("count", justify="right")
    t.add_column("p50 us", justify="right")
    t.add_column("p99 us", justify="right")
    t.add_column("p99.9 us", justify="right")
    for v in result["vgpus"]:
        first = True
        for kind in KINDS:
            s = v["traps"].get(kind)
            if not s:
                continue
            t.add_row(str(v["id"]) if first else "", v["type"] if first else "", kind, f"{s['count']:,}",
                      _fmt(s["p50_us"]), _fmt(s["p99_us"]), _fmt(s["p999_us"]))
            first = False
        if first:
            t.add_row(str(v["id"]), v["type"], "(no traps)", "", "", "", "")
    console.print(t)
    g = Table(title="GGTT entries translated by the mediator")
    for col in ("vGPU", "ok", "scratch", "not present", "dropped", "pinned", "GPU probes landed"):
        g.add_column(col, justify="right")
    for v in result["vgpus"]:
        c, p = v.get("ggtt", {}), v.get("probes", {})
        g.add_row(str(v["id"]), f"{c.get('ok', 0):,}", f"{c.get('scratch', 0):,}",
                  f"{c.get('not_present', 0):,}", f"{c.get('dropped', 0):,}", f"{c.get('pinned', 0):,}",
                  f"{p.get('landed', 0):,}/{p.get('probes', 0):,}")
    console.print(g)
    if any(v.get("workloads", {}).get("submitted") for v in result["vgpus"]):
        w = Table(title="GPU workloads (latency in ms, from the ELSP submission to retirement)")
        for col in ("vGPU", "subm", "done", "fail", "lost", "dup", "misp", "p50", "p99",
                    "tracked", "shadow"):
            w.add_column(col, justify="right")
        for v in result["vgpus"]:
            c, lat, pp = v.get("workloads", {}), v.get("workload", {}).get("all", {}), v.get("ppgtt", {})
            ms = [None if lat.get(k) is None else lat[k] / 1000 for k in ("p50_us", "p99_us")]
            w.add_row(str(v["id"]), *(f"{c.get(k, 0):,}" for k in ("submitted", "completed", "failed",
                                                                     "lost", "duplicated", "misplaced")),
                      *(_fmt(x) for x in ms), f"{pp.get('tracked_writes', 0):,}",
                      f"{pp.get('shadow_pages', 0):,}")
        console.print(w)
        sh = Table(title="GPU shares (time each vGPU owned its GPU, against its weight's share)")
        for col in ("vGPU", "weight", "weight share", "GPU share", "owned ms"):
            sh.add_column(col, justify="right")
        for v in result["vgpus"]:
            sc = v.get("sched") or {}
            sh.add_row(str(v["id"]), str(v.get("weight", "?")), f"{sc.get('weight_share', 0.0):.1%}",
                       f"{sc.get('gpu_share', 0.0):.1%}", f"{sc.get('gpu_ms', 0.0):,.1f}")
        console.print(sh)
        iso = result.get("isolation", {})
        console.print(f"isolation: {iso.get('pages_checked', 0):,} pages checked, "
                      f"{iso.get('violations', 0)} violations; memory image sha256 "
                      f"{result.get('memory_sha256', '')[:16]}; scratch mode "
                      f"{result.get('scratch', '?')}")
    for vm, h in sorted(result.get("hostile", {}).items(), key=lambda kv: int(kv[0])):
        console.print(hostile_table(vm, h))
    ft = fault_table(result)
    if ft is not None:
        console.print(ft)
    for row in (result.get("unloaded") or {}).get("gpus", []):
        console.print(f"unloaded MMIO read latency on GPU {row['gpu']} (vGPU {row['vgpu']}, "
                      f"{result['unloaded']['reads']} reads before the load): "
                      + (f"p50 {row['p50_us']:,.1f} us, min {row['min_us']:,.1f} us"
                         if "p50_us" in row else f"not measured: {row.get('error', '?')}"))
    for w in result.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {w}")
    if result["verdict"] == "pass":
        console.print("[bold green]verdict: pass[/]")
    else:
        console.print("[bold red]verdict: fail[/]")
        for r in result["reasons"]:
            console.print(f"  - {r}")


def fault_table(result: dict) -> Table | None:
    """Per vGPU, what each node fault or partition cost it: operations failed and of unknown
    outcome, workloads failed, in the fault's window; and the operations a killed incarnation
    of its guest had in flight (unknown). None when the run had no such fault."""
    f = result.get("faults") or {}
    windows = f.get("windows") or []
    if not windows:
        return None
    t = Table(title="What each fault cost (in its window: from the fault to its end, plus the "
                    "hang check and liveness timeouts)")
    t.add_column("fault", no_wrap=True)
    for col in ("at s", "vGPU", "ops failed", "unknown", "wl failed", "killed"):
        t.add_column(col, justify="right")
    for w in windows:
        for v in result["vgpus"]:
            cost = next((c for c in v.get("fault_costs", []) if c["fault"] == w["fault"]), {})
            t.add_row(w["fault"], f"{w['from_s']:.2f}", str(v["id"]), f"{cost.get('failed_ops', 0):,}",
                      f"{cost.get('unknown_ops', 0):,}", f"{cost.get('failed_workloads', 0):,}",
                      f"{cost.get('killed_in_flight', 0):,}")
    return t
