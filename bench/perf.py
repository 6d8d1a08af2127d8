"""`gvtbench perf trap`: the trap path through the real processes, against a bare pyzmq echo
measured in the same run on the same machine (ratios, not absolute numbers, are what carry over
between machines)."""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time

import msgpack
import zmq

from bench import config
from bench.launch import Launcher


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


def echo_rtt(seconds: float) -> list[float]:
    """Round trips (us) of client -> relay -> echo -> relay -> client, one at a time."""
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
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter_ns()
            c.send(frame)
            c.recv()
            out.append((time.perf_counter_ns() - t) / 1000)
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


def _bench_cfg(seconds: float, **load) -> dict:
    raw = {"run": {"duration_s": seconds, "seed": 7}, "vgpus": {"count": 1},
           "load": {"mode": "closed", **load}}
    return config.validate(raw, "perf")


def _run(cfg: dict) -> dict:
    res = Launcher(cfg).run()
    if res["verdict"] != "pass":
        raise RuntimeError("perf run failed its verdict: " + "; ".join(res["reasons"][:3]))
    return res


def run_trap(seconds: float = 3.0, rounds: int = 3) -> dict:
    # echo and reads alternate, round by round, so a noisy neighbour hits both alike; the ratio
    # reported is the median of the per-round ratios
    rounds_out = []
    for _ in range(max(1, rounds)):
        echo_p50 = statistics.median(echo_rtt(seconds))
        reads = _run(_bench_cfg(seconds, concurrency=1, mix={"mmio-read": 1.0}))
        rd = reads["vgpus"][0]["traps"]["mmio_read"]
        rounds_out.append({"echo_p50_us": round(echo_p50, 1), "mmio_read_p50_us": rd["p50_us"],
                           "mmio_read_p99_us": rd["p99_us"], "samples": rd["count"],
                           "ratio": round(rd["p50_us"] / echo_p50, 3)})
    mid = sorted(rounds_out, key=lambda r: r["ratio"])[len(rounds_out) // 2]
    writes = _run(_bench_cfg(seconds, concurrency=1024, mix={"mmio-write": 1.0}))
    wg = writes["vgpus"][0]["guest"]
    bursts = _run(_bench_cfg(seconds, concurrency=8, burst=4096, mix={"gtt-burst": 1.0},
                             not_present_ratio=0.0, invalid_gfn_ratio=0.0, outside_ratio=0.0))
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
        "translator": reads["translator"],
    }


def format_trap(r: dict) -> str:
    return "\n".join([
        *(f"round {i + 1}: echo p50 {x['echo_p50_us']:.1f} us, guest MMIO read p50 "
          f"{x['mmio_read_p50_us']:.1f} us (p99 {x['mmio_read_p99_us']:.1f}), ratio {x['ratio']:.2f}x"
          for i, x in enumerate(r["rounds"])),
        f"read / echo (p50), median round: {r['read_vs_echo']:.2f}x",
        f"posted MMIO writes, 1 vGPU:   {r['posted_writes_per_s']:,} /s",
        f"GGTT burst, end to end:       {r['gtt_entries_per_s']:,} entries/s",
        f"translator:                   {r['translator']}",
    ])
