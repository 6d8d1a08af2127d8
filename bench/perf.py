"""Benchmarks through the real processes, each measured against a reference in the same run on
the same machine (ratios, not absolute numbers, are what carry over between machines):

- `gvtbench perf trap`: the trap path against a bare pyzmq echo over the same hops;
- `gvtbench perf neighbour`: one VM's read latency alone and next to a VM that floods posted
  writes as fast as its socket takes them.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time

import msgpack
import zmq
import zmq.auth

from typing import Any, Callable, Iterator

from bench import config, procstat
from bench.launch import Launcher
from nodes.actions import Call, Post, Sleep
from nodes.hw import regs
from nodes.metrics import TRAP_LATENCY
from nodes.stats import hist_from_snapshot
from nodes.wire.codec import PROTOCOL_VERSION, encode
from nodes.wire.linkproto import LinkFull, LinkProtocol
from nodes.wire.schema import pack_write_batch


def _relay(front: str, back: str, ready) -> None:
    """The hypervisor's place in the echo: ROUTER in front, DEALER to the echo server."""
    ctx = zmq.Context()
    r, d = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (r, d):
        s.setsockopt(zmq.LINGER, 0)
    r.bind(front)
    d.connect(back)
    ready.set()
    poller = zmq.Poller()
    poller.register(r, zmq.POLLIN)
    poller.register(d, zmq.POLLIN)
    ident = b""
    while True:
        for sock, _ in poller.poll(1000):
            if sock is r:
                ident, frame = r.recv_multipart()
                if frame == b"stop":
                    d.send(frame)
                    return
                doc = msgpack.unpackb(frame)
                d.send(msgpack.packb(doc))
            else:
                doc = msgpack.unpackb(d.recv())
                r.send_multipart((ident, msgpack.packb(doc)))


def _echo(bind: str, ready) -> None:
    """The mediator's place: answer each frame."""
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    r.bind(bind)
    ready.set()
    while True:
        ident, frame = r.recv_multipart()
        if frame == b"stop":
            return
        doc = msgpack.unpackb(frame)
        r.send_multipart((ident, msgpack.packb(doc)))


def echo_rtt(seconds: float, cpu: dict | None = None) -> list[float]:
    """Round trips (us) of client -> relay -> echo -> relay -> client, one at a time. With `cpu`,
    also what they cost: `cpu["round_trips_per_cpu_s"]`, over the three processes (the floor
    any trap path over these hops pays in ZeroMQ and msgpack alone)."""
    tmp = tempfile.mkdtemp(prefix="gvtb-echo-")
    front, back = f"ipc://{tmp}/relay", f"ipc://{tmp}/echo"
    ctx = mp.get_context("spawn")
    e1, e2 = ctx.Event(), ctx.Event()
    pe = ctx.Process(target=_echo, args=(back, e1), daemon=True)
    pr = ctx.Process(target=_relay, args=(front, back, e2), daemon=True)
    pe.start()
    pr.start()
    try:
        if not (e1.wait(30) and e2.wait(30)):
            raise RuntimeError("echo processes did not start")
        zc = zmq.Context()
        c = zc.socket(zmq.DEALER)
        c.setsockopt(zmq.LINGER, 0)
        c.setsockopt(zmq.RCVTIMEO, 5000)
        c.connect(front)
        frame = msgpack.packb(("MMIO_READ", 1, 0, 1, 0, 1, {"off": 0x2600, "size": 4}))
        for _ in range(200):            # warm up
            c.send(frame)
            c.recv()
        out = []
        before = [procstat.sample(p.pid) for p in (pe, pr)]
        own = time.process_time()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter_ns()
            c.send(frame)
            c.recv()
            out.append((time.perf_counter_ns() - t) / 1000)
        if cpu is not None:
            after = [procstat.sample(p.pid) for p in (pe, pr)]
            spent = time.process_time() - own + sum(
                a.cpu_s - b.cpu_s for a, b in zip(after, before) if a and b)
            cpu["round_trips_per_cpu_s"] = round(len(out) / spent, 1) if spent > 0 else None
        c.send(b"stop")
        zc.destroy(linger=0)
        return out
    finally:
        for p in (pe, pr):
            p.join(2)
            if p.is_alive():
                p.kill()
        try:
            for f in os.listdir(tmp):
                os.unlink(os.path.join(tmp, f))
            os.rmdir(tmp)
        except OSError:
            pass


def _bench_cfg(seconds: float, trace_rate: float = 0.0, processes: str = "split", **load) -> dict:
    raw = {"run": {"duration_s": seconds, "seed": 7, "trace_rate": trace_rate,
                   "processes": processes},
           "vgpus": {"count": 1}, "load": {"mode": "closed", **load}}
    return config.validate(raw, "perf")


def _run(cfg: dict) -> dict:
    res = Launcher(cfg).run()
    if res["verdict"] != "pass":
        raise RuntimeError("perf run failed its verdict: " + "; ".join(res["reasons"][:3]))
    return res


def _against_echo(seconds: float, rounds: int, name: str,
                  measure: Callable[[], tuple[dict, dict]]) -> tuple[list[dict], dict, dict]:
    """Echo and a measured run alternate, round by round, so a noisy neighbour hits both alike.
    `measure` returns (the run's result, its latency summary). Returns the rounds, the round
    with the median ratio (the one reported), and the last run's result."""
    out = []
    for _ in range(max(1, rounds)):
        cpu: dict = {}
        echo_p50 = statistics.median(echo_rtt(seconds, cpu))
        res, lat = measure()
        out.append({"echo_p50_us": round(echo_p50, 1),
                    "echo_per_cpu_s": cpu.get("round_trips_per_cpu_s"), f"{name}_p50_us": lat["p50_us"],
                    f"{name}_p99_us": lat["p99_us"], "samples": lat["count"],
                    "ratio": round(lat["p50_us"] / echo_p50, 3)})
    mid = sorted(out, key=lambda r: r["ratio"])[len(out) // 2]
    return out, mid, res


def _per_cpu(res: dict, what: str) -> float | None:
    """A run's `what` per CPU-second of its node processes (bench.procstat, over the load)."""
    return res["resources"]["per_cpu_s"][what]


def _by_layout(processes: str, mine: float | None, measure: Callable[[str], float | None]
               ) -> dict[str, float | None]:
    """A per-CPU figure in every run.processes layout: the one measured already, the others
    now (where the same work goes when a GPU's nodes share a process)."""
    return {p: mine if p == processes else measure(p) for p in config.PROCESS_LAYOUTS}


def run_trap(seconds: float = 3.0, rounds: int = 3, trace_rate: float = 0.0,
             processes: str = "split") -> dict:
    """`trace_rate` > 0: every node records spans and the guest samples that many operations
    per second (what tracing costs; the spans are not collected). `processes`: the layout of
    the runs (run.processes); MMIO reads per CPU-second are measured in the others as well."""
    def reads_cfg(layout: str) -> dict:
        return _bench_cfg(seconds, trace_rate, layout, concurrency=1, mix={"mmio-read": 1.0})

    def reads_once() -> tuple[dict, dict]:
        res = _run(reads_cfg(processes))
        return res, res["vgpus"][0]["traps"]["mmio_read"]
    rounds_out, mid, reads = _against_echo(seconds, rounds, "mmio_read", reads_once)
    writes = _run(_bench_cfg(seconds, trace_rate, processes, concurrency=1024,
                             mix={"mmio-write": 1.0}))
    wg = writes["vgpus"][0]["guest"]
    bursts = _run(_bench_cfg(seconds, trace_rate, processes, concurrency=8, burst=4096,
                             mix={"gtt-burst": 1.0}, not_present_ratio=0.0, invalid_gfn_ratio=0.0,
                             outside_ratio=0.0))
    layouts = _by_layout(processes, _per_cpu(reads, "mmio_traps"),
                         lambda p: _per_cpu(_run(reads_cfg(p)), "mmio_traps"))
    bg = bursts["vgpus"][0]
    return {
        "seconds": seconds,
        "rounds": rounds_out,
        "echo_p50_us": mid["echo_p50_us"],
        "mmio_read_p50_us": mid["mmio_read_p50_us"],
        "mmio_read_p99_us": mid["mmio_read_p99_us"],
        "read_vs_echo": round(mid["ratio"], 2),
        "posted_writes_per_s": round(wg["completed"] / wg["elapsed_s"]),
        "gtt_entries_per_s": round(bg["traps"]["gtt_write"]["count"] / bg["guest"]["elapsed_s"]),
        # what the machine spent: operations per CPU-second of every node process over the load
        "ops_per_cpu_s": {"mmio_reads": _per_cpu(reads, "mmio_traps"),
                          "posted_writes": _per_cpu(writes, "mmio_traps"),
                          "ggtt_entries": _per_cpu(bursts, "ggtt_entries")},
        # the bare echo's round trips per CPU-second over the same hops (median round): what a
        # read could cost at best in three Python processes over ZeroMQ
        "echo_per_cpu_s": statistics.median(
            [r["echo_per_cpu_s"] for r in rounds_out if r["echo_per_cpu_s"]] or [0.0]) or None,
        "mmio_reads_per_cpu_s_by_processes": layouts,
        "processes": processes,
        "translator": reads["translator"],
        "trace_rate": trace_rate,
    }


def format_trap(r: dict) -> str:
    return "\n".join([
        *(f"round {i + 1}: echo p50 {x['echo_p50_us']:.1f} us, guest MMIO read p50 "
          f"{x['mmio_read_p50_us']:.1f} us (p99 {x['mmio_read_p99_us']:.1f}), ratio {x['ratio']:.2f}x"
          for i, x in enumerate(r["rounds"])),
        f"read / echo (p50), median round: {r['read_vs_echo']:.2f}x",
        f"posted MMIO writes, 1 vGPU:   {r['posted_writes_per_s']:,} /s",
        f"GGTT burst, end to end:       {r['gtt_entries_per_s']:,} entries/s",
        "per CPU-second (all nodes):   " + ", ".join(
            f"{k.replace('_', ' ')} {v:,.0f}" for k, v in r["ops_per_cpu_s"].items() if v is not None),
        *([f"bare echo, same hops:         {r['echo_per_cpu_s']:,.0f} round trips per CPU-second "
           f"(reads reach {r['ops_per_cpu_s']['mmio_reads'] / r['echo_per_cpu_s']:.0%} of it)"]
          if r.get("echo_per_cpu_s") and r["ops_per_cpu_s"].get("mmio_reads") else []),
        "reads per CPU-second, by run.processes: " + ", ".join(
            f"{k} {v:,.0f}" for k, v in r["mmio_reads_per_cpu_s_by_processes"].items()
            if v is not None) + f" (the runs above: {r['processes']})",
        f"translator:                   {r['translator']}",
        *([f"tracing:                      {r['trace_rate']:g} sampled ops/s per guest"]
          if r.get("trace_rate") else []),
    ])


# ---- neighbour ------------------------------------------------------------------------------------
FLOOD_BATCH = 4096          # GPR writes per MMIO_WRITE_BATCH of the flooding VM


def _flood(endpoint: str, keys_dir: str, ready, stop) -> None:
    """A hostile guest 1: posts batches of register writes as fast as its socket takes them and
    never waits for WRITE_DONE (it reads and drops whatever comes back)."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, b"guest1")
    if keys_dir:
        pub, sec = zmq.auth.load_certificate(os.path.join(keys_dir, "guest1.key_secret"))
        s.curve_publickey, s.curve_secretkey = pub, sec
        s.curve_serverkey = zmq.auth.load_certificate(os.path.join(keys_dir, "hypervisor-0.key"))[0]
    s.connect(endpoint)
    # it speaks the link protocol (its frames would be refused otherwise) and acks what comes
    # back, so the hypervisor's window toward it stays open; the messages it drops
    link = LinkProtocol(time.time_ns(), now=time.monotonic_ns())
    for f in link.send(encode("HELLO", 1, 0, 0, 0, 1, {"name": "guest1", "role": "guest",
                                                      "version": PROTOCOL_VERSION}),
                       time.monotonic_ns()):
        s.send(f)
    if not s.poll(30000):
        return
    link.receive(s.recv(), time.monotonic_ns())
    ready.set()
    payload = pack_write_batch([regs.RCS_GPR0] * FLOOD_BATCH, [4] * FLOOD_BATCH, range(FLOOD_BATCH))
    frames: list[bytes] = []
    while not stop.is_set():
        now = time.monotonic_ns()
        if not frames:
            try:
                frames = link.send(encode("MMIO_WRITE_BATCH", link.next_seq, 0, 1, 0, 0,
                                          {**payload, "w": link.next_seq}), now)
            except LinkFull:
                pass
        frames += link.tick(now)
        while frames and not stop.is_set():
            try:
                s.send(frames[0], zmq.NOBLOCK)
                frames.pop(0)
            except zmq.Again:
                s.poll(10, zmq.POLLOUT)
                break
        while s.poll(0):
            link.receive(s.recv(), time.monotonic_ns())
    ctx.destroy(linger=0)


def _read_phase(launcher: Launcher, spec: dict) -> Iterator[Any]:
    """guest2 reads for the phase; returns its read latency summary."""
    launcher.core.reports.pop(2, None)
    yield Post("guest2", "START", {"load": True, "spec": spec}, vgpu=2)
    while 2 not in launcher.core.reports:
        yield Sleep(0.05)
    rep = launcher.core.reports[2]
    if rep["failed"] or rep["mismatches"]:
        raise RuntimeError(f"guest2's reads failed: {rep['fail_reasons']}")
    return rep["latency"]["mmio_read"]


def _stats(names: tuple[str, ...]) -> Iterator[Any]:
    out = {}
    for n in names:
        out[n] = yield Call(n, "STATS", timeout=30)
    return out


def _neighbour(seconds: float, rounds: int, out: dict):
    def drive(launcher: Launcher, names: list[str]) -> Iterator[Any]:
        yield from launcher.wait_ready(names)
        yield Call("guest2", "START", {"load": False}, vgpu=2, timeout=60)
        spec = {"mode": "closed", "concurrency": 1, "mix": {"mmio-read": 1.0}, "duration_s": seconds,
                "ops": 0}
        ctx = mp.get_context("spawn")
        for r in range(rounds):
            alone = yield from _read_phase(launcher, spec)
            ready, stop = ctx.Event(), ctx.Event()
            flooder = ctx.Process(target=_flood, args=(launcher.eps["hypervisor/0.vm1"], launcher.keys_dir,
                                                       ready, stop), daemon=True)
            flooder.start()
            try:
                while not ready.is_set():
                    yield Sleep(0.05)
                while True:                 # flooded: vm1 has writes waiting at the hypervisor
                    snap = yield Call("hypervisor/0", "STATS", timeout=30)
                    if snap["core"]["vms"][1]["posted"] > 0:
                        break
                    yield Sleep(0.05)
                before = yield from _stats(("hypervisor/0", "mediator/0"))
                flooded = yield from _read_phase(launcher, spec)
                after = yield from _stats(("hypervisor/0", "mediator/0"))
                snap = after["hypervisor/0"]
            finally:
                stop.set()
                flooder.join(5)
                if flooder.is_alive():
                    flooder.kill()
            posted = snap["core"]["vms"][1]["posted"]
            stages = {}
            for node in ("hypervisor", "mediator"):       # where vm2's flooded reads waited
                h = [hist_from_snapshot(x[f"{node}/0"]["stats"], TRAP_LATENCY, vgpu=2,
                                        kind="mmio_read", stage=node)
                     for x in (before, after)]
                stages[node] = h[1].minus(h[0]).summary_us()
            out["rounds"].append({"alone": alone, "flooded": flooded, "vm1_posted_at_end": posted,
                                  "flooded_stages": stages,
                                  "p99_ratio": round(flooded["p99_us"] / alone["p99_us"], 2)})
        return out
    return drive


def run_neighbour(seconds: float = 3.0, rounds: int = 3) -> dict:
    """vm2's MMIO read latency (closed loop, one at a time) alone and while vm1 floods, round by
    round in one run; medians over the rounds."""
    cfg = config.validate({"run": {"duration_s": seconds, "seed": 7}, "vgpus": {"count": 2}}, "perf")
    out: dict = {"seconds": seconds, "rounds": []}
    Launcher(cfg).run(drive=_neighbour(seconds, max(1, rounds), out), guests=[2])
    med = lambda xs: round(statistics.median(xs), 1)       # noqa: E731
    rs = out["rounds"]
    out.update({
        "alone_p50_us": med([r["alone"]["p50_us"] for r in rs]),
        "alone_p99_us": med([r["alone"]["p99_us"] for r in rs]),
        "flooded_p50_us": med([r["flooded"]["p50_us"] for r in rs]),
        "flooded_p99_us": med([r["flooded"]["p99_us"] for r in rs]),
        "p99_ratio": round(statistics.median(r["p99_ratio"] for r in rs), 2),
        "samples": sum(r["alone"]["count"] + r["flooded"]["count"] for r in rs),
    })
    out["target_met"] = out["flooded_p99_us"] <= 5000 and out["p99_ratio"] <= 5
    return out


def format_neighbour(r: dict) -> str:
    return "\n".join([
        *(f"round {i + 1}: vm2 read p50/p99 alone {x['alone']['p50_us']:.0f}/{x['alone']['p99_us']:.0f} us, "
          f"next to vm1's flood {x['flooded']['p50_us']:.0f}/{x['flooded']['p99_us']:.0f} us "
          f"(p99 x{x['p99_ratio']:.2f}; vm1 had {x['vm1_posted_at_end']:,} writes waiting; p99 "
          f"in the hypervisor {x['flooded_stages']['hypervisor']['p99_us']:.0f} us, in the mediator "
          f"{x['flooded_stages']['mediator']['p99_us']:.0f} us)"
          for i, x in enumerate(r["rounds"])),
        f"median: alone p50 {r['alone_p50_us']:.0f} us, p99 {r['alone_p99_us']:.0f} us; flooded p50 "
        f"{r['flooded_p50_us']:.0f} us, p99 {r['flooded_p99_us']:.0f} us; p99 ratio {r['p99_ratio']:.2f}",
        f"target (flooded p99 <= 5 ms, ratio <= 5): {'met' if r['target_met'] else 'MISSED'}",
    ])


# ---- submit ---------------------------------------------------------------------------------------
def _submit_cfg(seconds: float, vgpus: int, processes: str = "split", **load) -> dict:
    raw = {"run": {"duration_s": seconds, "seed": 7, "processes": processes},
           "vgpus": {"count": vgpus, "type": "_8"},
           "load": {"mode": "closed", "stores_per_batch": 4, "batches_per_workload": 1, **load}}
    return config.validate(raw, "perf")


def run_submit(seconds: float = 3.0, rounds: int = 3, processes: str = "split") -> dict:
    """GPU workloads through all four roles: latency of one vGPU's workloads (one at a time)
    next to a two-hop pyzmq echo in the same run, round by round, and what the command parser's
    scan of each took (the mediator times it); workloads per second with 1, 2
    and 4 vGPUs (closed loop, both engines); tracked page-table writes per second under
    ppgtt-churn. `processes`: the runs' layout (run.processes); 1 vGPU's workloads per
    CPU-second are measured in the others as well."""
    scans: list[dict] = []

    def one_at_a_time() -> tuple[dict, dict]:
        res = _run(_submit_cfg(seconds, 1, processes, concurrency=1, mix={"submit": 1.0},
                               engines=["rcs"]))
        m = res["vgpus"][0]["mediator"]
        scans.append({"us_per_workload": m["scan_ns"] / max(m["scans"], 1) / 1e3,
                      "us_per_command": m["scan_ns"] / max(m["commands_scanned"], 1) / 1e3,
                      "commands_per_workload": m["commands_scanned"] / max(m["scans"], 1)})
        return res, res["vgpus"][0]["workload"]["all"]
    rounds_out, mid, _res = _against_echo(seconds, rounds, "workload", one_at_a_time)
    scan = {k: round(statistics.median(x[k] for x in scans), 2) for k in scans[0]}
    scan["share_of_workload_p50"] = round(scan["us_per_workload"] / mid["workload_p50_us"], 4)
    per_s: dict[str, float] = {}
    per_cpu: dict[str, float | None] = {}
    for n in (1, 2, 4):
        res = _run(_submit_cfg(seconds, n, processes, concurrency=16, mix={"submit": 1.0}))
        per_s[str(n)] = round(sum(v["workloads"]["completed"] / max(v["guest"]["elapsed_s"], 1e-9)
                                  for v in res["vgpus"]))
        per_cpu[str(n)] = _per_cpu(res, "workloads")
    layouts = _by_layout(processes, per_cpu["1"], lambda p: _per_cpu(
        _run(_submit_cfg(seconds, 1, p, concurrency=16, mix={"submit": 1.0})), "workloads"))
    churn = _run(_submit_cfg(seconds, 1, processes, concurrency=256, mix={"ppgtt-churn": 1.0}))
    v = churn["vgpus"][0]
    return {
        "seconds": seconds,
        "rounds": rounds_out,
        "echo_p50_us": mid["echo_p50_us"],
        "workload_p50_us": mid["workload_p50_us"],
        "workload_p99_us": mid["workload_p99_us"],
        "latency_vs_echo": round(mid["ratio"], 2),
        "scan": scan,
        "workloads_per_s": per_s,
        "workloads_per_cpu_s": per_cpu,
        "workloads_per_cpu_s_by_processes": layouts,
        "processes": processes,
        "tracked_writes_per_s": round(v["ppgtt"]["tracked_writes"] / max(v["guest"]["elapsed_s"], 1e-9)),
        "targets_met": {"latency_vs_echo": mid["ratio"] <= 2.5, "workloads_per_s_1": per_s["1"] >= 2000,
                        "scales_to_4": per_s["4"] >= per_s["1"]},
    }


# configs/faults.toml's per-frame faults, without its partition
FAULTY_PLAN = ["drop=0.05", "dup=0.05", "reorder=0.02", "corrupt=0.01", "delay=500us+-500us"]


def run_faults(seconds: float = 3.0, rounds: int = 3) -> dict:
    """The same load, clean and on a faulty network (FAULTY_PLAN on every link), alternating
    for `rounds`: operations per second (every guest operation completed, all vGPUs), and the
    MMIO read p99; the medians of the rounds and their ratio."""
    def one(faults: list[str]) -> tuple[float, float]:
        raw = {"run": {"duration_s": seconds, "seed": 7}, "vgpus": {"count": 2},
               "load": {"mode": "closed", "concurrency": 16,
                        "mix": {"mmio-read": 0.4, "mmio-write": 0.3, "submit": 0.3}},
               "faults": {"links": faults}}
        res = _run(config.validate(raw, "perf"))
        ops = sum(v["guest"]["completed"] / max(v["guest"]["elapsed_s"], 1e-9) for v in res["vgpus"])
        p99 = max(v["traps"]["mmio_read"]["p99_us"] for v in res["vgpus"])
        return ops, p99
    out = []
    for _ in range(rounds):
        c_ops, c_p99 = one([])
        f_ops, f_p99 = one(FAULTY_PLAN)
        out.append({"clean_ops_per_s": round(c_ops), "faulty_ops_per_s": round(f_ops),
                    "clean_p99_us": c_p99, "faulty_p99_us": f_p99,
                    "ratio": round(f_ops / max(c_ops, 1e-9), 3)})
    med = {k: statistics.median(x[k] for x in out) for k in out[0]}
    recovery = [gpu_recovery(seconds) for _ in range(rounds)]
    rec = statistics.median(recovery) if all(r is not None for r in recovery) else None
    return {"seconds": seconds, "plan": FAULTY_PLAN, "rounds": out,
            "gpu_recovery_rounds_s": recovery, "gpu_recovery_s": rec,
            "gpu_recovery_target_met": rec is not None and rec <= 2.0,
            "clean_ops_per_s": round(med["clean_ops_per_s"]),
            "faulty_ops_per_s": round(med["faulty_ops_per_s"]),
            "throughput_ratio": round(med["ratio"], 3),
            "clean_p99_us": med["clean_p99_us"], "faulty_p99_us": med["faulty_p99_us"],
            "target_met": med["ratio"] >= 0.7}


GPU_KILL_AT_S = 1.0
RECOVERY_HANG_TIMEOUT_S = 1.0       # the guests' hang check in the recovery run


def gpu_recovery(seconds: float) -> float | None:
    """kill -9 of the gpu and a new one at once, under workloads on both engines of two vGPUs:
    seconds from the kill to the first workload completed after the mediator restored the gpu
    (None: none completed). A workload the dead gpu ran ends as a hang, so an engine busy at the
    kill waits for its guest's hang check (RECOVERY_HANG_TIMEOUT_S), as on the kernel."""
    raw = {"run": {"duration_s": max(seconds, GPU_KILL_AT_S + 3), "seed": 7},
           "vgpus": {"count": 2},
           "load": {"mode": "open", "rate": 200, "hang_timeout_s": RECOVERY_HANG_TIMEOUT_S,
                    "mix": {"mmio-read": 0.4, "submit": 0.6}},
           "faults": {"links": [f"restart=gpu@{GPU_KILL_AT_S:g}s"]}}
    res = _run(config.validate(raw, "perf"))
    [kill] = [nf for nf in res["faults"]["nodes"] if nf["kind"] == "restart"]
    done = [r["first_completion_ns"] for r in res["gpu_restores"] if r["first_completion_ns"]]
    if not done:
        return None
    return round((min(done) - kill["at_monotonic_ns"]) / 1e9, 3)


def format_faults(r: dict) -> str:
    return "\n".join([
        *(f"round {i + 1}: clean {x['clean_ops_per_s']:,} ops/s (read p99 {x['clean_p99_us']:.0f} us), "
          f"faulty {x['faulty_ops_per_s']:,} ops/s (read p99 {x['faulty_p99_us']:.0f} us), "
          f"ratio {x['ratio']:.2f}" for i, x in enumerate(r["rounds"])),
        f"faulty / clean throughput, median round: {r['throughput_ratio']:.2f}   (target >= 0.7)",
        f"gpu recovery (kill -9 to the first workload completed after it), rounds: "
        f"{', '.join('-' if x is None else f'{x:.2f}' for x in r['gpu_recovery_rounds_s'])} s; "
        f"median {'-' if r['gpu_recovery_s'] is None else format(r['gpu_recovery_s'], '.2f')} s"
        f"   (target <= 2)",
        f"plan: {' '.join(r['plan'])}",
    ])


def format_submit(r: dict) -> str:
    w = r["workloads_per_s"]
    return "\n".join([
        *(f"round {i + 1}: echo p50 {x['echo_p50_us']:.1f} us, workload p50 {x['workload_p50_us']:.1f} us "
          f"(p99 {x['workload_p99_us']:.1f}), ratio {x['ratio']:.2f}x"
          for i, x in enumerate(r["rounds"])),
        f"workload / echo (p50), median round: {r['latency_vs_echo']:.2f}x   (target <= 2.5)",
        f"command parser, median of the rounds: {r['scan']['us_per_workload']:.1f} us per workload "
        f"({r['scan']['commands_per_workload']:.1f} commands, {r['scan']['us_per_command']:.2f} us each), "
        f"{100 * r['scan']['share_of_workload_p50']:.1f}% of the workload p50",
        f"workloads/s with 1, 2, 4 vGPUs:      {w['1']:,} / {w['2']:,} / {w['4']:,}   "
        f"(target: >= 2000 with 1, 4 >= 1)",
        "workloads per CPU-second (all nodes): " + " / ".join(
            f"{v:,.0f}" if v is not None else "-" for v in r["workloads_per_cpu_s"].values()),
        "1 vGPU's per CPU-second, by run.processes: " + ", ".join(
            f"{k} {v:,.0f}" for k, v in r["workloads_per_cpu_s_by_processes"].items()
            if v is not None) + f" (the runs above: {r['processes']})",
        f"tracked PTE writes/s (ppgtt-churn): {r['tracked_writes_per_s']:,}",
    ])


# ---- sched -----------------------------------------------------------------------------------------
SCHED_WEIGHTS = (2, 4, 8, 16)
SCHED_VERTICES = 1_000_000      # a 3DPRIMITIVE per workload: 2 ms of GPU at the default vertex_ns
SCHED_HANG_TIMEOUT_MS = 200     # the host's hang detection in the hang phase (i915's: 5640)
SCHED_TARGET_PTS = 5.0


def _sched_cfg(seconds: float, hang: bool) -> dict:
    types = {f"w{w}": {"low_gm_mib": 32, "high_gm_mib": 64, "fences": 2, "weight": w}
             for w in SCHED_WEIGHTS}
    load = {"mode": "closed", "concurrency": 4, "mix": {"submit": 1.0}, "engines": ["rcs"],
            "vertices": SCHED_VERTICES, "stores_per_batch": 1}
    sched: dict = {}
    if hang:
        # vGPU 1's every workload is a batch that chains to itself; the host resets its engine
        # after SCHED_HANG_TIMEOUT_MS, the guest (whose other workloads the reset dropped) its
        # own after a third of the window (at least 2 s), and submits again: a few hangs in
        # every window
        load.update(spin_ratio=1.0, spin_vms=[1], hang_timeout_s=max(2.0, seconds / 3))
        sched["hang_timeout_ms"] = SCHED_HANG_TIMEOUT_MS
    raw = {"run": {"duration_s": seconds + 30, "seed": 11},
           "vgpu_types": types,
           "vgpus": {"count": len(SCHED_WEIGHTS), "types": list(types), "ram_mib": 16,
                     "per_process": len(SCHED_WEIGHTS)},
           "scheduler": sched, "load": load}
    return config.validate(raw, "perf sched")


def _sched_window(seconds: float, warmup_s: float) -> Callable:
    """A drive that starts the load, lets the start-up boost pass, and returns the mediator's
    scheduler snapshots at both ends of a `seconds` window."""
    def drive(launcher: Launcher, names: list[str]) -> Iterator[Any]:
        yield from launcher.wait_ready(names)
        for g in (n for n in names if n.startswith("guest")):
            yield Post(g, "START", {"load": True})
        yield Sleep(warmup_s)
        before = yield Call("mediator/0", "STATS", timeout=30)
        t0 = time.monotonic()
        yield Sleep(seconds)
        after = yield Call("mediator/0", "STATS", timeout=30)
        return before, after, time.monotonic() - t0
    return drive


def _sched_phase(seconds: float, hang: bool) -> dict:
    from nodes.metrics import SCHED_LATENCY
    cfg = _sched_cfg(seconds, hang)
    boost_s = cfg["scheduler"]["start_boost_ms"] / 1000
    before, after, wall = Launcher(cfg).run(drive=_sched_window(seconds, boost_s + 1.0))
    s0, s1 = before["core"]["sched"], after["core"]["sched"]
    weights = dict(zip(range(1, len(SCHED_WEIGHTS) + 1), SCHED_WEIGHTS))
    gpu = {v: s1["shares"][v]["gpu_ns"] - s0["shares"][v]["gpu_ns"] for v in weights}
    busy = {v: sum(s1["engine_ns"][v].values()) - sum(s0["engine_ns"][v].values()) for v in weights}
    lat = hist_from_snapshot(after["stats"], SCHED_LATENCY).minus(
        hist_from_snapshot(before["stats"], SCHED_LATENCY)).summary_us()
    mmio_n = s1["mmio_switches"] - s0["mmio_switches"]
    out: dict = {"window_s": round(wall, 2), "switches_per_s": round((s1["switches"] - s0["switches"]) / wall, 1),
                 "switch_cost_us": round((s1["mmio_switch_ns"] - s0["mmio_switch_ns"]) / mmio_n / 1e3, 1)
                 if mmio_n else None,
                 "sched_latency_p50_us": lat["p50_us"], "sched_latency_p99_us": lat["p99_us"],
                 "host_resets": s1["host_resets"] - s0["host_resets"]}

    def shares(vs: list[int]) -> dict:
        tw, tg, tb = (sum(weights[v] for v in vs), sum(gpu[v] for v in vs) or 1,
                      sum(busy[v] for v in vs) or 1)
        return {str(v): {"weight": weights[v], "weight_share": round(weights[v] / tw, 4),
                         "gpu_share": round(gpu[v] / tg, 4), "busy_share": round(busy[v] / tb, 4),
                         "gpu_ms": round(gpu[v] / 1e6, 1)} for v in vs}
    out["shares"] = shares(list(weights))
    if hang:
        out["hang_shares"] = shares([v for v in weights if v != 1])
    table = out["hang_shares"] if hang else out["shares"]
    out["max_share_error_pts"] = round(max(abs(x["gpu_share"] - x["weight_share"]) * 100
                                           for x in table.values()), 2)
    return out


def run_sched(seconds: float = 8.0) -> dict:
    """Four vGPUs of weights 2, 4, 8, 16, each with 4 workloads of 2 ms of GPU always queued:
    each one's share of GPU time (the time it owned the GPU, as the policy charges it) against
    its weight share, measured over `seconds` after the start-up boost; then the same with vGPU
    1 submitting only workloads that never end: the other three's shares among themselves."""
    fair = _sched_phase(seconds, hang=False)
    hang = _sched_phase(seconds, hang=True)
    return {"seconds": seconds, "weights": list(SCHED_WEIGHTS), "vertices": SCHED_VERTICES,
            "shares": fair["shares"], "max_share_error_pts": fair["max_share_error_pts"],
            "switch_cost_us": fair["switch_cost_us"], "switches_per_s": fair["switches_per_s"],
            "sched_latency_p50_us": fair["sched_latency_p50_us"],
            "sched_latency_p99_us": fair["sched_latency_p99_us"],
            "hang_shares": hang["hang_shares"], "hang_max_share_error_pts": hang["max_share_error_pts"],
            "hang_host_resets": hang["host_resets"], "hang_timeout_ms": SCHED_HANG_TIMEOUT_MS,
            "hang_all_shares": hang["shares"],
            "target_met": fair["max_share_error_pts"] <= SCHED_TARGET_PTS
            and hang["max_share_error_pts"] <= SCHED_TARGET_PTS and hang["host_resets"] > 0}


def format_sched(r: dict) -> str:
    def rows(shares: dict) -> list[str]:
        return [f"  vGPU {v} (weight {x['weight']:>2}): GPU share {x['gpu_share']:6.1%} against "
                f"{x['weight_share']:6.1%} by weight (engine busy {x['busy_share']:6.1%}, "
                f"{x['gpu_ms']:,.0f} ms)" for v, x in shares.items()]
    return "\n".join([
        f"four vGPUs, saturating work ({r['vertices']:,} vertices a workload), {r['seconds']:g} s "
        f"after the start-up boost:",
        *rows(r["shares"]),
        f"  worst share error: {r['max_share_error_pts']:.2f} points (target <= {SCHED_TARGET_PTS:g})",
        f"  vGPU switches: {r['switches_per_s']:,.0f}/s; engine MMIO context switch: "
        + (f"{r['switch_cost_us']:,.0f} us" if r["switch_cost_us"] is not None else "none"),
        f"  scheduler latency (queued to dispatched): p50 {r['sched_latency_p50_us']:,.0f} us, "
        f"p99 {r['sched_latency_p99_us']:,.0f} us",
        f"vGPU 1's workloads never end (host hang detection after {r['hang_timeout_ms']} ms, "
        f"{r['hang_host_resets']} engine resets); the others among themselves:",
        *rows(r["hang_shares"]),
        f"  worst share error: {r['hang_max_share_error_pts']:.2f} points",
        f"targets met: {r['target_met']}",
    ])
