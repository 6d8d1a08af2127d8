"""gvtbench: the command line."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.config import PROCESS_LAYOUTS, ConfigError

EXIT_FAIL = 1       # the run's verdict failed
EXIT_ERROR = 2      # the run could not be made (bad config, a node did not start...)


def _run(args: argparse.Namespace) -> int:
    # Ctrl-C must stop a run even when the launcher was started with SIGINT ignored (a background
    # job of a non-interactive shell, some test runners' workers): Python then keeps it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from bench import config
    from bench.launch import Launcher, RunFailed
    from bench.report import print_result
    from bench.trace import DEFAULT_TRACE_RATE

    cfg = config.load(args.config)
    if args.trace_rate is not None and not args.trace:
        raise ConfigError("command line", "--trace-rate", "needs --trace PATH (where the trace goes)")
    # without --trace nothing collects spans, so no node records any
    rate = (args.trace_rate or cfg["run"]["trace_rate"] or DEFAULT_TRACE_RATE) if args.trace else 0.0
    cfg = config.apply_overrides(cfg, duration=args.duration, vgpus=args.vgpus, gpus=args.gpus,
                                 seed=args.seed,
                                 ops=args.ops, trace_rate=rate, faults=args.fault,
                                 processes=args.processes)
    console = Console(stderr=True)
    executor = _ray_executor(args, cfg)

    def view(p: dict) -> Table:
        title = f"gvtbench run: {p['phase']}"
        if p["phase"] == "load" and not p.get("ops"):
            title += f" {p.get('elapsed_s', 0):.0f}/{p['duration_s']:g} s"
        t = Table(title=title, show_edge=False)
        for col in ("vGPU", "state", "issued", "completed", "failed"):
            t.add_column(col, justify="right")
        for vm, g in sorted(p["guests"].items()):
            t.add_row(str(vm), str(g.get("state", "?")), f"{g.get('issued', 0):,}",
                      f"{g.get('completed', 0):,}", f"{g.get('failed', 0):,}")
        return t

    prom = None
    if args.prometheus or args.keep_prometheus:
        from bench.prom import PrometheusMissing, PrometheusServer
        from bench.launch import free_port
        folder = Path(args.run_dir) / time.strftime("%Y%m%d-%H%M%S") / "prometheus"
        try:
            prom = PrometheusServer(folder.resolve(), free_port("127.0.0.1"))
            prom.start()
        except (PrometheusMissing, RuntimeError) as err:
            console.print(f"[bold red]gvtbench run:[/] {err}")
            if executor is not None:
                executor.close()
            return EXIT_ERROR
        console.print(f"Prometheus: {prom.url}  (config and data in {folder})")
    live = Live(view({"phase": "starting", "guests": {}, "duration_s": 0}), console=console, refresh_per_second=4,
                transient=True, auto_refresh=False)
    try:
        launcher = Launcher(cfg, on_progress=lambda p: (live.update(view(p)), live.refresh()),
                            prometheus=prom, trace_path=args.trace, executor=executor)
    except BaseException:
        if executor is not None:
            executor.close()        # the launcher closes it at the end of its run, not before
        if prom is not None:
            prom.stop()
        raise
    try:
        with live:
            result = launcher.run()
    except RunFailed as err:
        console.print(f"[bold red]gvtbench run failed:[/] {err}")
        if launcher.trace_summary is not None:
            console.print(_trace_line(launcher.trace_summary))
        return EXIT_ERROR
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every node stopped, shm and sockets removed[/]")
        return 130
    finally:
        if prom is not None and not args.keep_prometheus:
            prom.stop()
    if executor is not None:
        console.print(_ray_line(executor))
    print_result(result, Console())
    if launcher.trace_summary is not None:
        console.print(_trace_line(launcher.trace_summary))
    if prom is not None and args.keep_prometheus:
        console.print(f"Prometheus keeps running at {prom.url} (pid {prom.proc.pid}; stop it with "
                      f"kill {prom.proc.pid})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0 if result["verdict"] == "pass" else EXIT_FAIL


def _ray_executor(args: argparse.Namespace, cfg: dict) -> Any:
    """The RayExecutor --ray asks for (None: the nodes are the launcher's children), its
    placement checked against the config before Ray is reached."""
    if args.ray_placement and not args.ray:
        raise ConfigError("command line", "--ray-placement", "needs --ray ADDRESS")
    if not args.ray:
        return None
    from bench.executor import ExecutorError, RayExecutor, one_host, ray_strategy
    placement = args.ray_placement or "pack"
    try:
        ray_strategy(placement, cfg)
    except ExecutorError as err:
        raise ConfigError("command line", "--ray-placement", err.text) from None
    if (args.prometheus or args.keep_prometheus) and not one_host(cfg):
        raise ConfigError("command line", "--prometheus", "a tcp + msg run on Ray may put nodes on "
                          "other hosts, whose /metrics listen on their own loopback, out of "
                          "Prometheus's reach here")
    return RayExecutor(args.ray, placement)


def _ray_line(ex: Any) -> str:
    where = ex.placement()
    nodes = {w["node_id"] for w in where.values()}
    hosts = {w["ip"] for w in where.values()}
    return (f"Ray: {len(where)} node processes as Ray actors on {_count(len(nodes), 'Ray node')} "
            f"({_count(len(hosts), 'host')}), placement group {ex.strategy}")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _trace_line(t: dict) -> str:
    return (f"trace: {t['path']}: {t['spans']} spans of {t['operations']} sampled operations in "
            f"{len(t['processes'])} processes, {t['flows']} flows"
            + (f", {t['dropped']} spans dropped (the per-node bound)" if t["dropped"] else "")
            + "; open it in https://ui.perfetto.dev or chrome://tracing")


def _vm_endpoints(items: list[str], flag: str) -> dict[int, str]:
    """N=ENDPOINT options by VM."""
    out = {}
    for p in items:
        vm, sep, ep = p.partition("=")
        if not sep or not vm.isdigit() or not ep:
            raise SystemExit(f"gvtbench node: {flag} must be N=ENDPOINT, got {p!r}")
        out[int(vm)] = ep
    return out


def _node(args: argparse.Namespace) -> int:
    from bench import config
    from nodes.node import run_node

    cfg = config.load(args.config)
    peers = {}
    for p in args.peer:
        name, sep, ep = p.partition("=")
        if not sep or not name or not ep:
            raise SystemExit(f"gvtbench node: --peer must be NAME=ENDPOINT, got {p!r}")
        peers[name] = ep
    vm_binds = _vm_endpoints(args.vm_bind, "--vm-bind")
    vm_peers = _vm_endpoints(args.vm_peer, "--vm-peer")
    vms: list[int] = []
    for spec in args.vm:
        lo, dash, hi = spec.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise SystemExit(f"gvtbench node: --vm must be N or N-M, got {spec!r}")
        vms += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    hv_binds = _vm_endpoints(args.hypervisor_bind, "--hypervisor-bind")
    if args.role == "host":
        if vms or vm_peers or args.restart or args.hypervisor:
            raise SystemExit("gvtbench node host: --vm, --vm-peer, --hypervisor and --restart are "
                             "not for a host process")
        from nodes.node import run_host
        return run_host(cfg, gpu=args.gpu, bind=args.bind, hv_binds=hv_binds, peers=peers,
                        vm_binds=vm_binds, launcher=args.launcher, run_id=args.run_id,
                        keys_dir=args.keys, metrics_port=args.metrics_port,
                        metrics_addr=args.metrics_addr, parent_death=args.parent_death,
                        gpu_bind=args.gpu_bind)
    if hv_binds or args.gpu_bind:
        raise SystemExit("gvtbench node: --hypervisor-bind and --gpu-bind are for a host process "
                         "(role host)")
    return run_node(args.role, cfg, vms=vms, bind=args.bind, peers=peers,
                    launcher=args.launcher, run_id=args.run_id, keys_dir=args.keys,
                    metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
                    parent_death=args.parent_death, vm_binds=vm_binds, restarted=args.restart,
                    vm_peers=vm_peers, gpu=args.gpu, hv=args.hypervisor)


def _keys(args: argparse.Namespace) -> int:
    from bench import config
    from nodes.node import node_names
    from nodes.runtime import make_keys

    cfg = config.load(args.config)
    names = node_names(cfg) + ["launcher"]
    d = make_keys(args.dir, names)
    from nodes.wire.schema import key_stem
    print(f"CURVE keys of {len(names)} nodes in {d} (FILE.key public, FILE.key_secret secret):")
    print("  " + " ".join(f"{n}={key_stem(n)}" if key_stem(n) != n else n for n in names))
    print("give each node's host every *.key and only that node's own FILE.key_secret")
    return 0


def _perf(args: argparse.Namespace) -> int:
    if args.seconds is None:        # each benchmark's own default
        args.seconds = 8.0 if args.what == "sched" else 3.0
    if args.what == "translate":
        from bench.perf_translate import format_translate, run_translate
        res = run_translate(entries=args.entries, repeats=args.repeats)
        print(json.dumps(res) if args.json else format_translate(res))
        return 0
    if args.what == "neighbour":
        from bench.perf import format_neighbour, run_neighbour
        res = run_neighbour(seconds=args.seconds, rounds=args.rounds)
        print(json.dumps(res) if args.json else format_neighbour(res))
        return 0
    if args.what == "faults":
        from bench.perf import format_faults, run_faults
        res = run_faults(seconds=args.seconds, rounds=args.rounds)
        print(json.dumps(res) if args.json else format_faults(res))
        return 0
    if args.what == "sched":
        from bench.perf import format_sched, run_sched
        res = run_sched(seconds=args.seconds)
        print(json.dumps(res) if args.json else format_sched(res))
        return 0
    if args.what == "submit":
        from bench.perf import format_submit, run_submit
        res = run_submit(seconds=args.seconds, rounds=args.rounds, processes=args.processes)
        print(json.dumps(res) if args.json else format_submit(res))
        return 0
    from bench.perf import format_trap, run_trap
    res = run_trap(seconds=args.seconds, rounds=args.rounds, trace_rate=args.trace_rate or 0.0,
                   processes=args.processes)
    print(json.dumps(res) if args.json else format_trap(res))
    return 0


def _scale(args: argparse.Namespace) -> int:
    """A run per vGPU count: a row per run as it ends, the table, the JSON and the HTML page."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from rich.console import Console

    from bench import config, scale

    try:
        counts = scale.parse_counts(args.vgpus)
    except ValueError as err:
        raise ConfigError("command line", "--vgpus", str(err)) from None
    cfg = config.load(args.config or scale.DEFAULT_CONFIG)
    console = Console(stderr=True)
    console.print(f"gvtbench scale: {len(counts)} runs ({', '.join(map(str, counts))} vGPUs) of "
                  f"{cfg['_source']}")

    def on_run(row: dict) -> None:
        console.print(scale.format_row(row))

    try:
        res = scale.run_scale(cfg, counts, duration=args.duration, on_run=on_run,
                              processes=args.processes)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every node stopped, shm and sockets removed[/]")
        return 130
    Console().print(scale.table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.html:
        from bench import scale_html
        scale_html.write(res, args.html)
        console.print(f"gvtbench scale: wrote {args.html}")
    return 0 if res["verdict"] == "pass" else EXIT_FAIL


def _report(args: argparse.Namespace) -> int:
    from bench.html_report import ResultInvalid, load_result, write_html
    from bench.report import print_result
    try:
        result = load_result(args.result)
        if args.html:
            write_html(result, args.html)
    except ResultInvalid as err:
        print(f"gvtbench report: {err}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as err:
        print(f"gvtbench report: cannot write {args.html}: {err.strerror or err}", file=sys.stderr)
        return EXIT_ERROR
    if args.html:
        print(f"gvtbench report: wrote {args.html}", file=sys.stderr)
    else:
        print_result(result)
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gvtbench", description="A distributed test bench for GVT-g "
                                 "style mediated GPU pass-through")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="start gpu, mediator, hypervisor and guests; drive load; judge")
    r.add_argument("config", nargs="?", help="TOML config (default: configs/smoke.toml)")
    r.add_argument("--duration", type=float, help="seconds of load (run.duration_s)")
    r.add_argument("--vgpus", type=int, help="number of vGPUs / guests (vgpus.count)")
    r.add_argument("--gpus", type=int, help="physical GPUs, the vGPUs split over them (gpu.count)")
    r.add_argument("--seed", type=int, help="seed of p2m and load (run.seed)")
    r.add_argument("--fault", action="append", metavar="SPEC",
                   help="a fault, added to [faults] links (repeatable): drop=0.05, "
                        "link=hypervisor-mediator:delay=2ms+-1ms, partition=hypervisor-mediator@5s+1s, "
                        "pause=gpu@2s+1s, kill=gpu@3s[+1s], restart=guest2@4s")
    r.add_argument("--ops", type=int, help="stop each guest after N ops instead of a duration")
    r.add_argument("--processes", choices=PROCESS_LAYOUTS,
                   help="where each GPU's nodes run (run.processes): split, host (mediator and "
                        "hypervisors in one process) or machine (the gpu too)")
    r.add_argument("--json", metavar="PATH", help="write the result as JSON")
    r.add_argument("--prometheus", action="store_true",
                   help="start a real Prometheus (the `prometheus` binary) that scrapes every node")
    r.add_argument("--keep-prometheus", action="store_true",
                   help="with --prometheus: leave it running after the run, for queries")
    r.add_argument("--run-dir", default="runs", metavar="DIR",
                   help="where a run's folder (Prometheus config and data) goes (default: runs/)")
    r.add_argument("--trace", metavar="PATH",
                   help="write a timeline of sampled operations (Chrome trace-event JSON, for "
                        "ui.perfetto.dev or chrome://tracing)")
    r.add_argument("--trace-rate", type=float, metavar="N",
                   help="with --trace: operations sampled per second per guest (default: "
                        "run.trace_rate, else 20)")
    r.add_argument("--ray", metavar="ADDRESS",
                   help="run each node process as a Ray actor of a cluster: its head's HOST:PORT, "
                        "'auto' (the cluster this host is in) or 'local' (a Ray of its own here)")
    r.add_argument("--ray-placement", choices=["pack", "spread", "strict-spread"],
                   help="with --ray: the placement group's strategy (default pack; spread and "
                        "strict-spread, a Ray node each, need a tcp + msg config)")
    r.set_defaults(fn=_run)
    n = sub.add_parser("node", help="run one node alone (for multi-host runs)")
    n.add_argument("role", choices=["gpu", "mediator", "hypervisor", "guest", "host"],
                   help="host: GPU G's mediator (at --bind) and its hypervisors (each at its "
                        "--hypervisor-bind) in this one process (run.processes = 'host')")
    n.add_argument("--gpu", type=int, default=0, metavar="G",
                   help="the physical GPU this gpu, mediator or hypervisor serves (its id is "
                        "ROLE/G; default 0); a guest's GPU is its VM's")
    n.add_argument("--hypervisor", type=int, default=0, metavar="K",
                   help="hypervisor: which of its GPU's hypervisors this is (gpu.hypervisors; "
                        "its id is hypervisor/G.K, or hypervisor/G for K = 0)")
    n.add_argument("--config", help="TOML or JSON config shared by all nodes of the run")
    n.add_argument("--vm", action="append", default=[], metavar="N[-M]",
                   help="guest: the VM (or VMs N..M) to run; several make a pool of guests in "
                        "this process")
    n.add_argument("--bind", help="ZeroMQ endpoint to bind, e.g. tcp://0.0.0.0:5555 (every role "
                                  "but guest, which binds nothing)")
    n.add_argument("--peer", action="append", default=[], metavar="NAME=ENDPOINT")
    n.add_argument("--vm-peer", action="append", default=[], metavar="N=ENDPOINT",
                   help="guest: VM N's endpoint of the hypervisor (a pool gives one per VM; one "
                        "guest may give --peer hypervisor=ENDPOINT instead)")
    n.add_argument("--vm-bind", action="append", default=[], metavar="N=ENDPOINT",
                   help="hypervisor: the endpoint of VM N's guest (default: the ipc path + .vmN, "
                        "or the tcp port + N)")
    n.add_argument("--hypervisor-bind", action="append", default=[], metavar="K=ENDPOINT",
                   help="host: the endpoint hypervisor K of the GPU binds")
    n.add_argument("--gpu-bind", metavar="ENDPOINT",
                   help="host: run the GPU's simulated gpu in this process too, bound here")
    n.add_argument("--launcher", help="the launcher's endpoint, when started by one")
    n.add_argument("--run-id", default="solo", help="names this run's /dev/shm region files")
    n.add_argument("--keys", metavar="DIR", help="CURVE keys of the run (gvtbench keys); needed on tcp")
    n.add_argument("--metrics-port", type=int, default=0, help="/metrics port (0: any free port)")
    n.add_argument("--metrics-addr", default="127.0.0.1")
    n.add_argument("--parent-death", action="store_true", help=argparse.SUPPRESS)
    n.add_argument("--restart", action="store_true",
                   help="this process replaces one of the same node that died (a hypervisor "
                        "then starts every VM again: each vGPU reset, RAM emptied)")
    n.set_defaults(fn=_node)
    k = sub.add_parser("keys", help="make the CURVE keys of a run's nodes (for tcp links)")
    k.add_argument("dir", help="directory to write them to (made with mode 700)")
    k.add_argument("--config", help="the run's config: which guests there are")
    k.set_defaults(fn=_keys)
    p = sub.add_parser("perf", help="benchmarks: translate (C vs numpy vs Python), trap (end to "
                       "end), neighbour (a VM's reads next to a flooding VM), submit (GPU "
                       "workloads), faults (the same load clean and on a faulty network), sched "
                       "(GPU shares against weights, and next to a hung vGPU)")
    p.add_argument("what", choices=["translate", "trap", "neighbour", "submit", "faults", "sched"])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seconds", type=float, default=None,
                   help="trap, neighbour, submit, faults: seconds per measurement (3); sched: the "
                        "measured window of each phase (8)")
    p.add_argument("--rounds", type=int, default=3,
                   help="trap, submit: alternating echo/measure rounds; neighbour: alone/flooded rounds")
    p.add_argument("--trace-rate", type=float, metavar="N",
                   help="trap: sample N reads per second for tracing in every run (spans recorded, "
                        "not written): what tracing costs")
    p.add_argument("--processes", choices=PROCESS_LAYOUTS, default="split",
                   help="trap, submit: run.processes of the measured runs (default split); the "
                        "per-CPU figure is measured in every layout")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_perf)
    sc = sub.add_parser("scale", help="one run per vGPU count: throughput, latency, CPU and "
                        "memory against the number of vGPUs")
    sc.add_argument("--vgpus", default="1,2,4,8,16,32,64", metavar="N,N,...",
                    help="the vGPU counts, one run each (default: 1,2,4,8,16,32,64)")
    sc.add_argument("--config", help="the config each run starts from (default: configs/scale.toml)")
    sc.add_argument("--duration", type=float, metavar="S", help="seconds of load per run")
    sc.add_argument("--processes", choices=PROCESS_LAYOUTS,
                    help="where each GPU's nodes run (run.processes; default: the config's)")
    sc.add_argument("--json", metavar="PATH", help="write the sweep as JSON")
    sc.add_argument("--html", metavar="PATH", help="write the sweep as a self-contained HTML page")
    sc.set_defaults(fn=_scale)
    dash = sub.add_parser("dashboards", help="write the Grafana dashboards (JSON) that "
                          "bench/dashboards.py builds")
    dash.add_argument("--out", default="dashboards", help="folder to write (default: dashboards/)")
    dash.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if a file differs from what the code builds")
    dash.set_defaults(fn=_dashboards)
    rep = sub.add_parser("report", help="print a result JSON as a table, or write it as one "
                         "self-contained HTML file")
    rep.add_argument("result", help="a result JSON (gvtbench run --json)")
    rep.add_argument("--html", metavar="PATH",
                     help="write the report as HTML (charts included, opens with no network) "
                          "instead of printing the table")
    rep.set_defaults(fn=_report)
    return ap


def _dashboards(args: argparse.Namespace) -> int:
    from bench import dashboards
    return dashboards.main(["--out", args.out] + (["--check"] if args.check else []))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"gvtbench: {err}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:
        from nodes.errors import GvtError
        if isinstance(err, GvtError):
            print(f"gvtbench: {err.text}", file=sys.stderr)
            return EXIT_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
