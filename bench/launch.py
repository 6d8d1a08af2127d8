"""The launcher: starts every node as its own OS process, drives the run, takes the ledger, and
tears everything down (processes, /dev/shm files, ipc sockets), also on Ctrl-C or a failure.
With a trace path it also gathers every node's spans into a trace file (bench.trace), from the
nodes still there when the run fails."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import numpy as np

from bench import ledger, procstat, trace
from bench.config import HOST_ROLES, public
# free_port is also this module's: bench.cli and the tests take it from here
from bench.executor import Executor, LocalExecutor, NodeProcess, free_port, terminate  # noqa: F401
from nodes.actions import Call, Post, Sleep
from nodes.core import Core
from nodes.errors import GvtError
from nodes.hw import gtt
from nodes.memory import remove_run_shm, sweep_stale_shm
from nodes.metrics import TRAP_LATENCY
from nodes.node import fault_plan, guest_pools, hostile_vms, vm_ids
from nodes.runtime import Keys, Runtime, make_keys
from nodes.stats import Stats
from nodes.wire.codec import Envelope
from nodes.topology import Topology, vm_endpoint_name
from nodes.wire.schema import STACK_ROLES, guest_name, hypervisor_index, role_of
from nodes.wire.faults import NodeFault

SCHEMA_VERSION = 1
DUMP_CHUNK = 65536          # GGTT entries per GGTT_DUMP (512 KiB: inside the frame limit)
PROBE_CHUNK = 8192          # probes per GM_WRITE
BEHIND_SHARE = 0.9          # a vGPU that completes less of its offered rate fell behind
# a vGPU whose MMIO read p99 is past this many times the unloaded read latency (PROBE's p50)
# measured queueing, not the design: on an idle 2-core machine a healthy run stays under 15x
P99_OVER_UNLOADED = 20.0


class LauncherCore(Core):
    role = "launcher"

    def __init__(self) -> None:
        super().__init__()
        self.stats = Stats()
        self.ready: dict[str, dict] = {}
        self.progress: dict[int, dict] = {}
        self.reports: dict[int, dict] = {}

    def handle(self, msg: Envelope, now: int) -> Any:
        p = msg.payload
        if msg.kind == "READY":
            self.ready[msg.peer] = p
        elif msg.kind == "PROGRESS":
            self.progress[msg.vgpu] = p["report"]
        elif msg.kind == "LOAD_DONE":
            self.reports[msg.vgpu] = p["report"]
            self.progress[msg.vgpu] = {**self.progress.get(msg.vgpu, {}), **p["report"]}
        else:
            raise GvtError("ENOTSUP", f"the launcher does not handle {msg.kind}")
        return None


class RunFailed(Exception):
    pass


class Launcher:
    def __init__(self, cfg: dict, on_progress: Callable[[dict], None] | None = None,
                 prometheus: Any = None, trace_path: str | None = None,
                 executor: Executor | None = None):
        self.cfg = cfg
        # where the node processes run: children of this process, or a cluster's (bench.executor)
        self.executor: Executor = executor if executor is not None else LocalExecutor()
        self.executor.check(cfg)
        self.trace_path = trace_path        # write the nodes' spans there (run.trace_rate > 0)
        self.trace_summary: dict | None = None     # what was written: bench.trace.summary
        if trace_path and not cfg["run"]["trace_rate"] > 0:
            raise GvtError("EINVAL", "a trace needs sampled operations: run.trace_rate must be > 0")
        self.on_progress = on_progress
        self.prometheus = prometheus        # a bench.prom.PrometheusServer scraping the run
        self.run_id = f"{os.getpid()}x{secrets.token_hex(3)}"
        self.procs: dict[str, NodeProcess] = {}
        self.tmp = ""
        self.core = LauncherCore()
        self.rt: Runtime | None = None
        self.result: dict | None = None
        self.error: str | None = None
        self.keys_dir = ""
        self.eps: dict[str, str] = {}
        self.rams: dict[int, dict] = {}
        self.pool: dict = {}
        self.node_errors: dict = {}
        self.hostile: dict[int, dict] = {}
        self.topo = Topology(cfg)           # the nodes, their GPUs, links and memory
        self.plan = fault_plan(cfg)         # the run's fault plan (None: no faults)
        self.node_faults: list[dict] = []    # the node faults injected: when, which, how long
        self.down: set[str] = set()          # nodes killed by the plan, not yet started again
        self.cfg_path = ""
        # per guest, its incarnations that a fault killed: the fault and the last progress
        # report it sent (what it had issued, completed, failed and had in flight then)
        self.incarnations: dict[int, list[dict]] = {}
        self.windows: list[dict] = []        # when each fault could cost operations (ledger)
        self.costs: dict[int, list[dict]] = {}
        self.t_spawn = self.t_load_ns = 0
        self.cpu_at_start: dict = {}             # /proc samples of the node processes
        self.cpu_at_end: dict = {}               # at the start and the end of the load
        self.pools: list[list[int]] = []         # the guests' processes: the VMs of each
        self.unloaded: dict = {}                 # PROBE's figures (bench.launch._probe)
        self.pool_of: dict[str, list[int]] = {}  # guest name -> its pool

    # ---- processes -------------------------------------------------------------------------------
    def _endpoints(self) -> dict[str, str]:
        """The endpoints the launcher and the nodes bind (a guest binds none): ipc paths in the
        launcher's folder, or tcp ports free where each is bound, which the executor knows."""
        run = self.cfg["run"]
        binders = self.topo.binders()
        if run["transport"] == "ipc":
            return {n: f"ipc://{self.tmp}/{n.replace('/', '-')}" for n in binders}
        by_binder: dict[str | None, list[str]] = {}
        for n, b in binders.items():        # by the process that binds them
            by_binder.setdefault(b and self._process_name(b), []).append(n)
        eps: dict[str, str] = {}
        for b, ns in by_binder.items():
            eps.update(zip(ns, self.executor.tcp_endpoints(b, run["host"], len(ns))))
        # processes on one host (a Ray cluster's nodes on one machine) each found their ports
        # free on their own: ask again for any that another one was given too
        dup: list[str] = []
        for _ in range(8):
            seen: dict[str, str] = {}
            dup = [n for n, ep in eps.items() if seen.setdefault(ep, n) != n]
            if not dup:
                return eps
            for n in dup:
                b = binders[n]
                eps[n] = self.executor.tcp_endpoints(b and self._process_name(b), run["host"], 1)[0]
        raise GvtError("EADDRINUSE", "could not find a distinct tcp port for every endpoint: "
                       + ", ".join(sorted(dup)))

    def _process_name(self, name: str) -> str:
        """The process a node runs in: its own, its pool's (guests/<first VM>), or with
        run.processes = 'host' its GPU's host process (host/<G>: mediator and hypervisors)."""
        pool = self.pool_of.get(name)
        if pool:
            return f"guests/{pool[0]}"
        if role_of(name)[0] in HOST_ROLES[self.cfg["run"]["processes"]]:
            return f"host/{self.topo.stack_of(name).index}"
        return name

    def _spawn(self, role: str, name: str, eps: dict[str, str], cfg_path: str,
               restart: bool = False) -> None:
        """Start a node's process; a guest's is its pool's, which runs every VM of the pool."""
        topo = self.topo
        cmd = [sys.executable, "-m", "bench.cli", "node", role, "--config", cfg_path,
               "--launcher", eps["launcher"], "--run-id", self.run_id,
               "--parent-death"] + (["--restart"] if restart else [])
        names = [name]
        process = self._process_name(name)
        if process.startswith("host/"):
            # the GPU's mediator and hypervisors, one process (nodes.node.run_host)
            st = self.topo.stack_of(name)
            roles = HOST_ROLES[self.cfg["run"]["processes"]]
            names = [n for n in st.nodes if role_of(n)[0] in roles]
            med = next(n for n in names if role_of(n)[0] == "mediator")
            cmd[4] = "host"
            cmd += ["--gpu", str(st.index), "--bind", eps[med]]
            gpu_ep = eps[self.topo.qualify(med, "gpu")]
            cmd += ["--gpu-bind", gpu_ep] if "gpu" in roles else ["--peer", f"gpu={gpu_ep}"]
            for n in names:
                if role_of(n)[0] == "hypervisor":
                    cmd += ["--hypervisor-bind", f"{hypervisor_index(n)}={eps[n]}"]
                    cmd += [a for v in st.vms_of(n)
                            for a in ("--vm-bind", f"{v}={eps[vm_endpoint_name(n, v)]}")]
        elif role == "guest":
            pool = self.pool_of[name]
            names = [guest_name(v) for v in pool]
            # each guest connects to its own VM's endpoint of its GPU's hypervisor
            for v in pool:
                hv = topo.stack(topo.gpu_of(v)).hypervisor_of(v)
                cmd += ["--vm", str(v), "--vm-peer", f"{v}={eps[vm_endpoint_name(hv, v)]}"]
        else:
            st = topo.stack_of(name)
            cmd += ["--gpu", str(st.index), "--bind", eps[name]]
            cmd += [a for peer in topo.peers_of(name)
                    for a in ("--peer", f"{peer}={eps[topo.qualify(name, peer)]}")]
        if role == "hypervisor" and not process.startswith("host/"):
            cmd += ["--hypervisor", str(hypervisor_index(name))]
            cmd += [a for v in st.vms_of(name)
                    for a in ("--vm-bind", f"{v}={eps[vm_endpoint_name(name, v)]}")]
        if self.keys_dir:
            cmd += ["--keys", self.executor.keys_for(process, self.keys_dir, names)]
        proc = self.executor.start(process, cmd, self._log_path(name))
        for n in names:
            self.procs[n] = proc

    def processes(self) -> dict[str, tuple[NodeProcess, int]]:
        """The run's node processes by name (a pool of guests: guests/<its first VM>), each with the
        number of vGPUs it serves."""
        out: dict[str, tuple[NodeProcess, int]] = {}
        n = len(self.pool_of)
        for name, proc in self.procs.items():
            pool = self.pool_of.get(name)
            out.setdefault(self._process_name(name), (proc, len(pool) if pool else n))
        return out

    def _sample_processes(self) -> dict[str, procstat.Sample | None]:
        procs = {name: proc for name, (proc, _n) in self.processes().items()}
        asked = {name: proc.sample_begin() for name, proc in procs.items()}
        return {name: proc.sample_end(asked[name]) for name, proc in procs.items()}

    def _log_path(self, name: str) -> str:
        return os.path.join(self.tmp, f"{self._process_name(name).replace('/', '-')}.log")

    def _log_tail(self, name: str, lines: int = 5) -> str:
        proc = self.procs.get(name)         # its process has the log, on the host it runs on
        return proc.log_tail(lines) if proc is not None else ""

    def _dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None and n not in self.down]

    # ---- the run -----------------------------------------------------------------------------------
    def run(self, drive: Callable[["Launcher", list[str]], Iterator[Any]] | None = None,
            guests: list[int] | None = None) -> dict:
        """Start the nodes (every guest, or those of `guests`), run `drive` (by default: load,
        then the ledger) and tear everything down. Returns what `drive` returned."""
        sweep_stale_shm()
        self.tmp = tempfile.mkdtemp(prefix="gvtb-", dir="/tmp")     # mode 700: ipc is private
        try:
            vms = vm_ids(self.cfg) if guests is None else guests
            names = [n for st in self.topo.stacks for n in st.nodes]
            names += [f"guest{v}" for v in vms]
            self.pools = guest_pools(self.cfg, vms)
            self.pool_of = {guest_name(v): pool for pool in self.pools for v in pool}
            try:
                self.executor.place(list(dict.fromkeys(self._process_name(n) for n in names)),
                                    self.cfg, self.run_id)
            except GvtError as err:
                raise RunFailed(f"the node processes could not be placed: {err.text}") from None
            eps = self.eps = self._endpoints()
            cfg_path = self.cfg_path = os.path.join(self.tmp, "run.json")
            with open(cfg_path, "w") as f:
                json.dump(public(self.cfg), f)
            keys = None
            if self.cfg["run"]["transport"] == "tcp":
                self.keys_dir = str(make_keys(os.path.join(self.tmp, "keys"),
                                              self.topo.with_launcher()))
                keys = Keys.load(self.keys_dir, "launcher")
            self.rt = Runtime("launcher", "launcher", self.core, eps["launcher"],
                              vgpus=vm_ids(self.cfg), keys=keys,
                              link_silent_s=self.cfg["run"]["link_silent_s"])
            self.t_spawn = time.monotonic()
            for n in names:
                if not n.startswith("guest") and (role_of(n)[0] == "mediator" or not
                                                  self._process_name(n).startswith("host/")):
                    self._spawn(role_of(n)[0], n, eps, cfg_path)    # a host process: once
            self.rt.spawn(self._orchestrate(drive or Launcher._drive, names))
            self.rt.run(until=lambda: self.result is not None or self.error is not None)
            if self.error:
                raise RunFailed(self.error)
            if self.result is None:
                raise RunFailed("the launcher was stopped (SIGTERM) before the run ended")
            return self.result
        finally:
            self._teardown()

    def _wait(self, cond: Callable[[], bool], timeout: float, what: str,
              missing: Callable[[], list[str]] | None = None,
              state: Callable[[str], str] | None = None) -> Iterator[Any]:
        """Until cond(); past the timeout the run fails naming the `missing` nodes (with their
        `state`, if given) and the first one's log tail."""
        deadline = time.monotonic() + timeout
        while not cond():
            dead = self._dead()
            if dead:
                raise RunFailed(f"node {dead[0]} exited (code {self.procs[dead[0]].returncode}) while "
                                f"waiting for {what}: {self._log_tail(dead[0])}")
            if time.monotonic() > deadline:
                late = missing() if missing else []
                tail = self._log_tail(late[0]) if late else ""
                named = [f"{n} ({state(n)})" if state else n for n in late[:8]]
                raise RunFailed(f"timed out after {timeout:g} s waiting for {what}" + (
                    f" (still waiting for {', '.join(named)}{' ...' if len(late) > 8 else ''})"
                    if late else "") + (f"; {late[0]}'s log ends: {tail}" if tail else ""))
            if self.on_progress:
                self.on_progress(self._progress_view())
            yield Sleep(0.05)

    def _progress_view(self) -> dict:
        elapsed = time.monotonic() - self.t_load if self.t_load else 0.0
        return {"phase": self.phase, "guests": dict(self.core.progress), "elapsed_s": elapsed,
                "duration_s": self.cfg["run"]["duration_s"], "ops": self.cfg["run"]["ops"]}

    phase = "starting"
    t_load = 0.0

    def _orchestrate(self, drive: Callable[["Launcher", list[str]], Iterator[Any]],
                     names: list[str]) -> Iterator[Any]:
        try:
            # the guests once their GPUs' nodes are READY: a hypervisor answers a guest only once
            # it has said HELLO to its mediator and gpu, which on a crowded host can take longer
            # than a link's resends last
            stacks = [n for n in names if not n.startswith("guest")]
            yield from self.wait_ready(stacks)
            for n in names:
                if n.startswith("guest") and self.pool_of[n][0] == int(n[5:]):
                    self._spawn("guest", n, self.eps, self.cfg_path)    # with its pool's VMs
            self.result = yield from drive(self, names)
        except Exception as err:
            if self.trace_path and self.trace_summary is None and self.phase != "starting":
                # a failed run's trace is the one most worth reading: what the nodes still there have
                try:
                    yield from self.collect_trace(names, timeout=5.0)
                except Exception:
                    pass
            if isinstance(err, (GvtError, RunFailed)):
                self.error = getattr(err, "text", None) or str(err)
            else:       # our own bug, not a node's: say where, so that it can be fixed
                import traceback
                traceback.print_exc(file=sys.stderr)
                where = traceback.extract_tb(err.__traceback__)[-1]
                self.error = (f"launcher bug: {type(err).__name__}: {err} "
                              f"(at {os.path.basename(where.filename)}:{where.lineno})")

    def collect_trace(self, names: list[str], timeout: float = 30.0) -> Iterator[Any]:
        """Every node's spans (TRACE_DUMP, page by page) into the trace file. A node that does
        not answer (it died, say) contributes nothing; the file is complete without it."""
        got = []
        for n in names:
            node = trace.NodeSpans(n, int(self.core.ready.get(n, {}).get("pid") or 0),
                                   peers={r: self.topo.qualify(n, r) for r in STACK_ROLES})
            try:
                while True:
                    page = yield Call(n, "TRACE_DUMP", {"start": len(node.spans)}, timeout=timeout)
                    node.spans += page["spans"]
                    node.dropped = page["dropped"]
                    if not page["spans"] or len(node.spans) >= page["total"]:
                        break
            except Exception:
                continue
            got.append(node)
        doc = trace.build(got, {"run_id": self.run_id, "seed": self.cfg["run"]["seed"],
                                "trace_rate": self.cfg["run"]["trace_rate"],
                                "missing": sorted(set(names) - {n.name for n in got})})
        trace.write(self.trace_path, doc)
        self.trace_summary = trace.summary(doc, self.trace_path)
        return self.trace_summary

    def wait_ready(self, names: list[str]) -> Iterator[Any]:
        core = self.core
        self.phase = "starting"
        # a node whose start-up failed says so in its READY: the run fails then, not at the timeout
        yield from self._wait(lambda: all(n in core.ready for n in names) or
                              any(r.get("error") for r in core.ready.values()),
                              self.cfg["run"]["start_timeout_s"], "every node to be ready",
                              lambda: [n for n in names if n not in core.ready])
        failed = {n: r["error"] for n, r in core.ready.items() if r.get("error")}
        if failed:
            raise RunFailed("; ".join(f"{n}: {e}" for n, e in failed.items()))
        if self.prometheus is not None:
            from bench.prom import write_targets
            nodes = {n: core.ready[n] for n in names}
            write_targets(self.prometheus.folder, nodes)
            scraped = sum(1 for r in nodes.values() if r.get("metrics_port"))
            yield from self._wait(lambda: self.prometheus.scraping(scraped), 30,
                                  "Prometheus to scrape every node")

    def _drive(self, names: list[str]) -> Iterator[Any]:
        cfg, core = self.cfg, self.core
        guests = [n for n in names if n.startswith("guest")]
        run = cfg["run"]
        yield from self.wait_ready(names)
        self.unloaded = yield from self._probe()
        self.phase = "load"
        self.cpu_at_start = self._sample_processes()
        t_start = self.t_load = time.monotonic()
        self.t_load_ns = time.monotonic_ns()
        for g in guests:
            yield Post(g, "START", {"load": True})
        for nf in self.plan.nodes if self.plan else ():
            self.rt.spawn(self._node_fault(nf))
        vms = [int(g[5:]) for g in guests]
        limit = (run["duration_s"] if not run["ops"] else 3600) + run["drain_timeout_s"]
        yield from self._wait(lambda: len(core.reports) == len(vms) or
                              any(core.progress.get(v, {}).get("state") == "failed" for v in vms),
                              limit, "the guests to finish their load",
                              lambda: [guest_name(v) for v in vms if v not in core.reports],
                              lambda g: core.progress.get(int(g[5:]), {}).get("state", "no progress"))
        wall = time.monotonic() - t_start
        self.cpu_at_end = self._sample_processes()
        # a guest whose boot failed reports on request
        for v in vms:
            if v not in core.reports:
                core.reports[v] = yield Call(f"guest{v}", "REPORT")
        self.phase = "ledger"
        if self.on_progress:
            self.on_progress(self._progress_view())
        return (yield from self._ledger(names, wall))

    def _node_fault(self, nf: NodeFault) -> Iterator[Any]:
        """A node fault of the plan, at its time from the start of the load: a pause stops the
        node's process (SIGSTOP) and lets it go on (SIGCONT) after its length; a kill or restart
        is a kill -9 and a new process of the node after the time it is down. A fault that
        cannot be carried out fails the run with the reason."""
        try:
            yield Sleep(max(0.0, self.t_load + nf.start_ns / 1e9 - time.monotonic()))
            proc = self.procs.get(nf.node)
            if proc is None or proc.poll() is not None:
                self.node_faults.append({"node": nf.node, "kind": nf.kind, "spec": nf.spec,
                                         "at_s": None, "note": "not running"})
                return
            if nf.kind == "pause":
                yield from self._pause(nf, proc)
            else:
                yield from self._kill_and_start(nf)
        except Exception as err:
            self.error = f"node fault {nf.spec or nf.kind}: {getattr(err, 'text', None) or err}"

    def _pause(self, nf: NodeFault, proc: NodeProcess) -> Iterator[Any]:
        at = time.monotonic() - self.t_load
        proc.signal(signal.SIGSTOP)
        try:
            yield Sleep(nf.length_ns / 1e9)
        finally:
            proc.signal(signal.SIGCONT)
        self.node_faults.append({"node": nf.node, "kind": nf.kind, "spec": nf.spec,
                                 "at_s": round(at, 3),
                                 "length_s": round(time.monotonic() - self.t_load - at, 3)})

    def _kill_and_start(self, nf: NodeFault) -> Iterator[Any]:
        """kill -9, then a new process under the same name and endpoint. The VMs die with their
        hypervisor: its guests are killed with it, and start again after it is ready."""
        run = self.cfg["run"]
        names = [nf.node]
        if role_of(nf.node)[0] == "hypervisor":
            # its VMs, and the guests that share a pool's process with theirs
            st = self.topo.stack_of(nf.node)
            pools = {tuple(self.pool_of[guest_name(v)]) for v in st.vms_of(nf.node)}
            names += [guest_name(v) for pool in sorted(pools) for v in pool]
        at = time.monotonic() - self.t_load
        at_ns = time.monotonic_ns()
        for n in names:
            self.down.add(n)
        for proc in {id(self.procs[n]): self.procs[n] for n in names}.values():
            proc.signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(self.procs[n].poll() is None for n in names):
            if time.monotonic() > deadline:
                raise RunFailed(f"{nf.node} did not die within 10 s of SIGKILL")
            yield Sleep(0.01)
        for n in names:
            if n.startswith("guest"):
                vm = int(n[5:])
                last = dict(self.core.progress.pop(vm, {}) or {})
                self.incarnations.setdefault(vm, []).append(
                    {"fault": nf.spec or f"{nf.kind}={nf.node}", "at_s": round(at, 3),
                     "last_progress": last,
                     "in_flight": max(0, last.get("issued", 0) - last.get("completed", 0)
                                      - last.get("failed", 0) - last.get("unknown", 0))})
            self.core.ready.pop(n, None)
        down = nf.length_ns / 1e9 if nf.length_ns >= 0 else run["link_silent_s"] + 0.5
        yield Sleep(down)
        t_spawn = time.monotonic()
        for n in names:                 # the hypervisor before its guests
            if n.startswith("guest") and self.pool_of[n][0] != int(n[5:]):
                continue                # started with its pool
            self._spawn(role_of(n)[0], n, self.eps, self.cfg_path, restart=True)
            for m in [guest_name(v) for v in self.pool_of[n]] if n in self.pool_of else [n]:
                yield from self._wait_back(m)
                self.down.discard(m)
        if self.prometheus is not None:
            from bench.prom import write_targets
            write_targets(self.prometheus.folder, dict(self.core.ready))
        back = time.monotonic() - self.t_load
        for n in names:
            if n.startswith("guest"):
                spec: dict[str, Any] = {"duration_s": max(0.5, run["duration_s"] - back)}
                if run["ops"]:
                    vm = int(n[5:])
                    done = sum(i["last_progress"].get("issued", 0) for i in self.incarnations[vm])
                    spec = {"ops": max(1, run["ops"] - done)}
                yield Post(n, "START", {"load": True, "spec": spec})
        self.node_faults.append({"node": nf.node, "kind": nf.kind, "spec": nf.spec,
                                 "at_s": round(at, 3), "down_s": round(t_spawn - self.t_load - at, 3),
                                 "ready_s": round(back - at, 3), "also_killed": names[1:],
                                 "at_monotonic_ns": at_ns})

    def _wait_back(self, name: str) -> Iterator[Any]:
        """The new process of a killed node said READY (or failed: the run fails with why)."""
        deadline = time.monotonic() + self.cfg["run"]["start_timeout_s"]
        while name not in self.core.ready:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RunFailed(f"{name} exited (code {proc.returncode}) after its restart: "
                                f"{self._log_tail(name)}")
            if time.monotonic() > deadline:
                raise RunFailed(f"{name} was not ready again within run.start_timeout_s")
            yield Sleep(0.02)
        if self.core.ready[name].get("error"):
            raise RunFailed(f"{name} failed to start again: {self.core.ready[name]['error']}")

    def _ledger(self, names: list[str], wall: float) -> Iterator[Any]:
        cfg = self.cfg
        # every GPU is checked alone (its GGTT, its host pool, its vGPUs' probes, against its
        # own DMA space), then the results are put together
        vgpus: list[dict] = []
        ggtt: dict[str, Any] = {"vgpus": {}, "outside_written": 0, "reasons": []}
        rams: dict[int, dict] = {}
        pools: list[dict] = []
        probes: dict[int, dict] = {}
        probe_reasons: list[str] = []
        dumps = []
        for st in self.topo.stacks:
            part = yield from self._check_gpu(st, rams, probes, probe_reasons)
            vgpus += part["vgpus"]
            dumps.append(part["dump"])
            pools.append(part["pool"])
            g = part["ggtt"]
            ggtt["vgpus"].update(g["vgpus"])
            ggtt["outside_written"] += g["outside_written"]
            where = f"GPU {st.index}: " if len(self.topo.stacks) > 1 else ""
            ggtt["reasons"] += [where + r for r in g["reasons"]]
            for what, nz in g.get("scratch_dirty", {}).items():      # {scratch page: bytes not 0}
                ggtt.setdefault("scratch_dirty", {})[where + what] = nz
        vgpus.sort(key=lambda x: x["id"])
        failsafe_of = {x["id"]: x["failsafe"] for x in vgpus}
        pool = {"violations": sum(p["violations"] for p in pools),
                "reasons": [r for p in pools for r in p["reasons"]],
                "pages_checked": sum(p.get("pages_checked", 0) for p in pools)}
        snaps = {}
        for n in names:
            snaps[n] = yield Call(n, "STATS", timeout=30)
        snaps["launcher"] = self.rt.snapshot()
        link_rows, link_reasons = ledger.check_links(snaps)
        hostile = self.hostile_vms()
        self.node_errors, error_reasons = ledger.check_errors(
            snaps, hostile, node_faults=bool(self.plan and self.plan.nodes))
        # what each fault of the plan cost each guest: failures in a fault's window are its
        # outcome (failed with a reason, or unknown); those outside every window fail the run
        run = cfg["run"]
        self.windows = ledger.fault_windows(self._faults({}),
                                            cfg["load"]["hang_timeout_s"] + run["link_silent_s"] + 2.0,
                                            self.t_spawn - self.t_load)
        self.costs, excused_ops, excused_wl = {}, {}, {}
        for v in vm_ids(cfg):
            rows, _outside = ledger.fault_costs(self.core.reports.get(v, {}).get("timeline", {}),
                                                self.t_load_ns, self.windows)
            for r in rows:      # and what a killed incarnation of the guest had in flight
                r["killed_in_flight"] = sum(i["in_flight"] for i in self.incarnations.get(v, [])
                                            if i["fault"] == r["fault"])
            self.costs[v] = rows
            excused_ops[v] = sum(r["failed_ops"] for r in rows)
            excused_wl[v] = sum(r["failed_workloads"] for r in rows)
        work_reasons = ledger.check_workloads(self.core.reports, hostile, excused_ops)
        for v in vm_ids(cfg):
            mv = self._mediator_vgpu(snaps, v)
            replays = ledger.replay_allowance(mv.get("fail_reasons", {})) \
                if self.plan and self.plan.nodes else 0
            work_reasons += ledger.check_gpu_workloads(v, self.core.reports.get(v, {}).get("workloads", {}),
                                                       rams[v], v in hostile, excused_wl[v], replays)
        self.hostile = {}
        for v in sorted(hostile):
            self.hostile[v], rs = ledger.check_hostile(v, self.core.reports.get(v, {}).get("hostile"),
                                                       failsafe_of[v])
            work_reasons += rs
        for v in vgpus:
            mv = self._mediator_vgpu(snaps, v["id"])
            if mv.get("execlist_errors") and not (self.plan and self.plan.nodes) \
                    and v["id"] not in hostile:
                work_reasons.append(f"vGPU {v['id']}: {mv['execlist_errors']} completions of a "
                                    f"context its execlist was not running (the emulation lost step)")
        if pool["violations"]:
            work_reasons.append(f"host pool: {pool['violations']} violations: "
                                + "; ".join(pool["reasons"][:3]))
        thr_reasons = self._thresholds(snaps, wall)
        verdict, reasons = ledger.verdict(work_reasons, ggtt["reasons"], probe_reasons, link_reasons,
                                          error_reasons, thr_reasons)
        if self.trace_path:
            yield from self.collect_trace(names)
        if self.prometheus is not None:
            # let Prometheus scrape every node after the load ended before they stop
            from bench.prom import SCRAPE_INTERVAL_S
            yield Sleep(2.5 * SCRAPE_INTERVAL_S)
        for n in names:
            try:
                yield Call(n, "SHUTDOWN", timeout=5)
            except Exception:
                pass
        # one GPU's GGTT, or every GPU's in order
        ggtt["sha256"] = hashlib.sha256(b"".join(d.tobytes() for d in dumps)).hexdigest()
        self.rams, self.pool = rams, pool
        res = self._result(snaps, vgpus, ggtt, probes, link_rows, verdict, reasons, wall)
        if self.trace_summary is not None:
            res["trace"] = self.trace_summary
        return res

    def _mediator_vgpu(self, snaps: dict, vm: int) -> dict:
        """What VM vm's mediator (its GPU's) says of its vGPU in its STATS snapshot."""
        mvs = snaps[self.topo.stack(self.topo.gpu_of(vm)).mediator]["core"]["vgpus"]
        return mvs.get(vm) or mvs.get(str(vm)) or {}

    def _check_gpu(self, st: Any, rams: dict[int, dict], probes: dict[int, dict],
                   probe_reasons: list[str]) -> Iterator[Any]:
        """One GPU's part of the ledger: its mediator's vGPUs and host pool, its physical GGTT
        against what each of its guests wrote, and GPU writes through each of its vGPUs' GGTT
        (the probes), all in that GPU's DMA space."""
        cfg = self.cfg
        seed = cfg["run"]["seed"]
        layout = self.topo.layout(st.index)
        yield Call(st.mediator, "SYNC", timeout=30)
        vgpus = yield Call(st.mediator, "PARTITIONS")
        failsafe_of = {x["id"]: x["failsafe"] for x in vgpus}      # vGPU -> its failsafe reason, or None
        dump = np.empty(gtt.ENTRIES, dtype=np.uint64)
        for start in range(0, gtt.ENTRIES, DUMP_CHUNK):
            chunk = yield Call(st.gpu, "GGTT_DUMP", {"start": start, "count": DUMP_CHUNK}, timeout=30)
            dump[start:start + DUMP_CHUNK] = np.frombuffer(chunk, dtype="<u8")
        # the RAM sweep comes first: the GGTT probes below write into guest pages
        for v in st.vms:
            rams[v] = yield Call(f"guest{v}", "RAM_VERIFY", vgpu=v, timeout=300)
        pool = yield Call(st.mediator, "POOL_CHECK", timeout=120)
        nonce = int.from_bytes(secrets.token_bytes(7), "little")
        maps, loose = {}, {}
        for v in st.vms:
            idx, vals, hit = [], [], []
            page, pages = 0, 1
            while page < pages:
                plan = yield Call(f"guest{v}", "VERIFY_PLAN", {"nonce": nonce, "page": page},
                                  vgpu=v, timeout=60)
                pages = plan["pages"]
                idx.append(np.frombuffer(plan["entries_idx"], "<u8").astype(np.int64))
                vals.append(np.frombuffer(plan["entries_val"], "<u8").astype(np.uint64))
                if plan.get("loose_idx"):
                    loose[v] = np.frombuffer(plan["loose_idx"], "<u8").astype(np.int64)
                ops = plan["probes"]
                for i in range(0, len(ops), PROBE_CHUNK):
                    try:
                        hit += yield Call(st.gpu, "GM_WRITE", {"ops": ops[i:i + PROBE_CHUNK]},
                                          vgpu=v, timeout=60)
                    except GvtError as err:     # a probe through an entry the guest mapped
                        probe_reasons.append(f"vGPU {v}: the gpu refused GPU writes through "
                                             f"entries the guest mapped: {err}")
                page += 1
            maps[v] = (np.concatenate(idx), np.concatenate(vals))
            res = yield Call(f"guest{v}", "VERIFY", {"nonce": nonce}, vgpu=v, timeout=120)
            probes[v] = res
            probe_reasons += ledger.check_probes(v, hit, res, layout, failsafe_of[v] is not None)
        ggtt = ledger.check_ggtt(dump, vgpus, maps, layout, seed, layout.host.base_mfn, loose)
        if pool.get("scratch_dirty"):
            ggtt["scratch_dirty"] = pool["scratch_dirty"]
        for v in vgpus:
            v["gpu"] = st.index
        return {"vgpus": vgpus, "dump": dump, "pool": pool, "ggtt": ggtt}

    def _resources(self, vgpus: list[dict], wall: float) -> dict:
        """CPU and memory of the node processes over the load, and what they carried: the
        load's operations, MMIO traps, GGTT entries and workloads, per CPU-second."""
        res = procstat.usage(self.cpu_at_start, self.cpu_at_end,
                             {n: k for n, (_p, k) in self.processes().items()})
        ops = {"operations": sum(v["guest"].get("completed", 0) for v in vgpus),
               "mmio_traps": sum(v["traps"].get(k, {}).get("count", 0) for v in vgpus
                                 for k in ("mmio_read", "mmio_write")),
               "ggtt_entries": sum(v["traps"].get("gtt_write", {}).get("count", 0) for v in vgpus),
               "workloads": sum(v["workloads"]["completed"] for v in vgpus)}
        cpu = res["cpu_s"]
        n = max(1, len(vgpus))
        res.update({"load_s": round(wall, 3), "counts": ops,
                    "per_cpu_s": {k: round(c / cpu, 1) if cpu > 0 else None for k, c in ops.items()},
                    "cores": round(cpu / wall, 3) if wall > 0 else None,
                    "cpu_s_per_vgpu": round(cpu / n, 4), "rss_per_vgpu_mib": round(res["rss_mib"] / n, 2)})
        return res

    def _probe(self) -> Iterator[Any]:
        """The unloaded MMIO read latency of each GPU's path, before any load: one guest of each
        GPU at a time (its first not hostile) times run.probe_reads reads one after another
        (PROBE). A guest that cannot answer leaves its GPU without a figure, and says why."""
        n = self.cfg["run"]["probe_reads"]
        out: dict[str, Any] = {"reads": n, "gpus": []}
        if not n:
            return out
        hostile = self.hostile_vms()
        self.phase = "probe"
        for st in self.topo.stacks:
            vm = next((v for v in st.vms if v not in hostile), st.vms[0] if st.vms else None)
            if vm is None:
                continue
            row: dict[str, Any] = {"gpu": st.index, "vgpu": vm}
            try:
                got = yield Call(guest_name(vm), "PROBE", {"reads": n},
                                 timeout=self.cfg["run"]["start_timeout_s"])
                row.update({k: got[k] for k in ("p50_us", "min_us", "max_us")})
            except GvtError as err:
                row["error"] = err.text
            out["gpus"].append(row)
        return out

    def unloaded_read_us(self, gpu: int) -> float | None:
        """PROBE's p50 MMIO read latency on this GPU before the load (None: not measured)."""
        for row in self.unloaded.get("gpus", ()):
            if row["gpu"] == gpu and row.get("p50_us"):
                return float(row["p50_us"])
        return None

    def _achieved(self, v: dict) -> tuple[float, float] | None:
        """(achieved, offered) ops/s of a vGPU's open-loop load (None: closed loop, a count of
        ops, or no report)."""
        ld, rep = self.cfg["load"], v["guest"]
        if ld["mode"] != "open" or not rep.get("elapsed_s"):
            return None
        done = rep.get("completed", 0) + rep.get("failed", 0) + rep.get("unknown", 0)
        return done / rep["elapsed_s"], float(ld["rate"])

    def _warnings(self, vgpus: list[dict]) -> list[str]:
        """What makes a passing run's figures doubtful: the load generator could not keep up
        (its latency is then the queueing of a saturated system, not the design's)."""
        out = []
        slow = []
        for v in vgpus:
            base = self.unloaded_read_us(v["gpu"])
            p99 = v["traps"].get("mmio_read", {}).get("p99_us")
            if base and p99 is not None and p99 > P99_OVER_UNLOADED * base:
                slow.append((p99 / base, v["id"], p99, base))
        if slow:
            worst = max(slow)
            out.append(f"MMIO read p99 is over {P99_OVER_UNLOADED:.0f}x the unloaded read latency "
                       f"on {len(slow)} of {len(vgpus)} vGPUs (worst: vGPU {worst[1]}, p99 "
                       f"{worst[2]:,.0f} us against {worst[3]:,.0f} us unloaded, {worst[0]:.0f}x): "
                       f"its latencies are mostly queueing in a saturated system")
        behind = []
        for v in vgpus:
            rates = self._achieved(v)
            if rates and rates[0] < BEHIND_SHARE * rates[1]:
                behind.append((rates[0] / rates[1], v["id"], *rates))
        if not behind:
            return out
        worst = min(behind)
        return out + [f"the load fell behind on {len(behind)} of {len(vgpus)} vGPUs: they completed "
                f"under {BEHIND_SHARE:.0%} of the offered rate (worst: vGPU {worst[1]}, "
                f"{worst[2]:,.0f} of {worst[3]:,.0f} ops/s); this machine cannot carry the load, "
                f"and its latencies are those of a saturated system"]

    def hostile_vms(self) -> frozenset[int]:
        """The VMs whose load includes the hostile mix: their refusals are expected."""
        return frozenset(hostile_vms(self.cfg))

    def _thresholds(self, snaps: dict, wall: float) -> list[str]:
        th = self.cfg["thresholds"]
        out = []
        for v in vm_ids(self.cfg):
            traps = ledger.summarize_traps(snaps[f"guest{v}"], v, "guest")
            for kind, key in (("mmio_read", "mmio_read_p99_us"), ("gtt_write", "gtt_write_p99_us")):
                lim = th[key]
                got = traps.get(kind, {}).get("p99_us")
                if lim and got is not None and got > lim:
                    out.append(f"vGPU {v}: {kind} p99 {got:.1f} us exceeds thresholds.{key} = {lim}")
            base = self.unloaded_read_us(self.topo.gpu_of(v))
            lim = th["max_read_p99_over_unloaded"]
            got = traps.get("mmio_read", {}).get("p99_us")
            if lim and base and got is not None and got > lim * base:
                out.append(f"vGPU {v}: mmio_read p99 {got:.1f} us is {got / base:.1f}x the unloaded "
                           f"{base:.1f} us, past thresholds.max_read_p99_over_unloaded = {lim}")
            rep = self.core.reports.get(v, {})
            v_row = {"guest": rep}
            rates = self._achieved(v_row) if th["min_achieved_ratio"] else None
            if rates and rates[0] < th["min_achieved_ratio"] * rates[1]:
                out.append(f"vGPU {v}: achieved {rates[0]:,.0f} of the offered {rates[1]:,.0f} "
                           f"ops/s, under thresholds.min_achieved_ratio = {th['min_achieved_ratio']}")
            if th["min_ops_per_s"] and wall > 0:
                rate = rep.get("completed", 0) / max(rep.get("elapsed_s") or wall, 1e-9)
                if rate < th["min_ops_per_s"]:
                    out.append(f"vGPU {v}: {rate:.0f} ops/s is below thresholds.min_ops_per_s = "
                               f"{th['min_ops_per_s']}")
        return out

    def _result(self, snaps, vgpus, ggtt, probes, link_rows, verdict, reasons, wall) -> dict:
        topo = self.topo
        meds = [snaps[st.mediator] for st in topo.stacks]
        med = meds[0]
        out_vgpus = []
        for v in vgpus:
            vm = v["id"]
            st = topo.stack(topo.gpu_of(vm))
            mv = self._mediator_vgpu(snaps, vm)
            sched = snaps[st.mediator]["core"].get("sched", {})
            sh = sched.get("shares", {}).get(vm) or {}
            engine_ns = sched.get("engine_ns", {}).get(vm) or {}
            # the guest's per-second counts get their own key: "guest" stays a table of totals
            guest = dict(self.core.reports.get(vm, {}))
            timeline = guest.pop("timeline", None) or {"interval_s": 1.0, "t0_ns": 0, "bins": 0, "ops": {}}
            out_vgpus.append({
                "id": vm, "gpu": st.index, "type": v["type"], "weight": v["weight"],
                "failsafe": v["failsafe"],
                "traps": ledger.summarize_traps(snaps[f"guest{vm}"], vm, "guest"),
                "stages": {stage: ledger.summarize_traps(snaps[n], vm, stage)
                           for stage, n in (("hypervisor", st.hypervisor_of(vm)), ("mediator", st.mediator))},
                "ggtt": {**mv.get("ggtt", {}), "pinned": mv.get("pinned", 0)},
                "guest": guest,
                "timeline": timeline,
                "probes": {k: probes[vm][k] for k in ("probes", "landed")} if vm in probes else {},
                "ggtt_check": ggtt["vgpus"].get(vm, {}),
                "histograms": {k: r for k, r in _hist_rows(snaps[f"guest{vm}"]).items()},
                "workloads": _workload_row(self.core.reports.get(vm, {}).get("workloads", {}),
                                           self.rams.get(vm, {})),
                # what each fault cost this vGPU, and its guest's incarnations a fault killed
                "fault_costs": self.costs.get(vm, []),
                "incarnations": self.incarnations.get(vm, []),
                "ppgtt": {k: mv.get("ppgtt", {}).get(k, 0) for k in ("tracked_writes", "shadow_pages")},
                # the time-slice scheduler: the share of the GPU's time this vGPU owned it,
                # against its weight's share of its GPU's vGPUs, and its engines' busy time
                "sched": {"gpu_share": round(sh.get("gpu_share", 0.0), 4),
                          "weight_share": round(sh.get("weight_share", 0.0), 4),
                          "gpu_ms": round(sh.get("gpu_ns", 0) / 1e6, 1),
                          "engine_ms": {e: round(ns / 1e6, 1)
                                        for e, ns in sorted(engine_ns.items())}},
                "workload": ledger.summarize_workloads(snaps[f"guest{vm}"], vm),
                "execlist": {k: mv.get(k, 0) for k in ("context_switches", "csb_entries", "virtual_irqs")},
                # what the mediator saw of the vGPU's work: why workloads failed there, the
                # parser's and shadowing's refusals by code, commands scanned, pool pages held
                "mediator": {"fail_reasons": mv.get("fail_reasons", {}), "refusals": mv.get("refusals", {}),
                             "execlist_errors": mv.get("execlist_errors", 0),
                             "commands_scanned": mv.get("commands_scanned", 0),
                             "scans": mv.get("scans", 0), "scan_ns": mv.get("scan_ns", 0),
                             "pool_pages": mv.get("pool_pages", 0)},
            })
        isolation = {"pages_checked": sum(r.get("pages_checked", 0) for r in self.rams.values())
                     + self.pool.get("pages_checked", 0),
                     "violations": sum(r.get("violations", 0) for r in self.rams.values())
                     + self.pool.get("violations", 0)}
        mem_hash = hashlib.sha256("".join(self.rams[v]["sha256"] for v in sorted(self.rams)).encode()).hexdigest()
        return {
            "schema": SCHEMA_VERSION,
            "config": public(self.cfg),
            "seed": self.cfg["run"]["seed"],
            "translator": self.core.ready.get(topo.stacks[0].mediator, {}).get("translator", "?"),
            "scratch": med["core"].get("scratch", "?"),
            # the GPUs and the VMs on each
            "gpus": [{"index": st.index, "vms": list(st.vms), "nodes": st.nodes,
                      "hypervisors": {h: list(st.vms_of(h)) for h in st.hypervisors}}
                     for st in topo.stacks],
            "gpu_restores": [dict(r, gpu=i) if len(meds) > 1 and isinstance(r, dict) else r
                             for i, m in enumerate(meds) for r in m["core"].get("gpu_restores", [])],
            "shadow_quota_pages": med["core"].get("shadow_quota"),
            # each GPU's scheduler: its policy, vGPU switches, engine MMIO context switches and
            # their time, engines the host's hang detection reset
            "scheduler": [{k: m["core"].get("sched", {}).get(k) for k in
                           ("policy", "switches", "mmio_switches", "mmio_switch_ns", "host_resets")}
                          for m in meds],
            "wall_s": round(wall, 3),
            # PROBE before the load: the unloaded MMIO read latency of each GPU's path
            "unloaded": self.unloaded,
            # the launcher's monotonic clock at the start of the load: where a guest's timeline
            # (t0_ns) and the faults' times (seconds from it) meet
            "load_t0_ns": self.t_load_ns,
            "vgpus": out_vgpus,
            "ledger": {"links": link_rows, "ggtt_outside_written": ggtt["outside_written"],
                       "ggtt_sha256": ggtt["sha256"],
                       # ops of the last incarnation; `killed_in_flight`: those the earlier
                       # ones had in flight when a fault killed them (unknown, with the fault)
                       "workloads": {vm: {**{k: r.get(k) for k in ("issued", "completed", "failed",
                                                                    "unknown", "pending")},
                                          "killed_in_flight": sum(i["in_flight"] for i in
                                                                  self.incarnations.get(vm, []))}
                                     for vm, r in self.core.reports.items()}},
            "isolation": isolation,
            "memory_sha256": mem_hash,
            "resources": self._resources(out_vgpus, wall),
            "errors": self.node_errors,
            "hostile": {str(v): h for v, h in self.hostile.items()},
            "faults": self._faults(snaps),
            "verdict": verdict,
            "reasons": reasons,
            "warnings": self._warnings(out_vgpus),
        }

    def _faults(self, snaps: dict) -> dict:
        """The link fault plan (its specs, seed and rules) and what each directed link met: the
        plan's counts by kind, as the sending end kept them."""
        plan = self.plan
        if plan is None:
            return {"seed": None, "plan": [], "links": [], "totals": {}, "nodes": []}
        links, totals = [], {}
        for name, snap in sorted(snaps.items()):
            for peer, c in sorted(snap.get("links", {}).items()):
                if c.get("faults"):
                    links.append({"link": f"{name}>{peer}", **c["faults"],
                                  "log": c.get("faults_log", [])})
                    for k, v in c["faults"].items():
                        totals[k] = totals.get(k, 0) + v
        return {"seed": plan.seed, "specs": list(plan.specs), "plan": plan.describe(),
                "links": links, "totals": totals, "nodes": list(self.node_faults),
                "windows": list(self.windows)}

    # ---- teardown --------------------------------------------------------------------------------
    def _teardown(self) -> None:
        procs = list({id(p): p for p in self.procs.values()}.values())     # a pool's once
        try:
            deadline = time.monotonic() + 5
            for p in procs:
                while p.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
            terminate(procs, 5)
        finally:
            try:
                self.executor.close()
            finally:
                if self.rt is not None:
                    self.rt.close()
                    self.rt = None
                remove_run_shm(self.run_id)
                if self.tmp:
                    shutil.rmtree(self.tmp, ignore_errors=True)


def _workload_row(wl: dict, ram: dict) -> dict:
    """The ledger's workload counts of a vGPU (lost: submitted, neither completed nor failed;
    duplicated: ran more than once, by its context's counter; misplaced: a token missing where
    it was stored, or found where no workload stored it)."""
    return {"submitted": wl.get("submitted", 0), "completed": wl.get("completed", 0),
            "failed": wl.get("failed", 0), "lost": wl.get("lost", 0),
            "duplicated": ram.get("duplicated", 0),
            "misplaced": wl.get("misplaced", 0) + ram.get("misplaced", 0),
            "failed_expected": wl.get("failed_expected", 0)}


def _hist_rows(snap: dict) -> dict:
    fam = snap["stats"].get(TRAP_LATENCY)
    if not fam:
        return {}
    return {row[0][1]: row[1] for row in fam["rows"]}

