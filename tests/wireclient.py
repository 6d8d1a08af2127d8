"""A raw ZeroMQ peer for tests: it speaks the documented protocol by hand, so it can also speak it
wrongly, and standalone nodes started as a person would start them on separate hosts."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import struct
import zlib

import msgpack
import zmq
import zmq.auth

from nodes.wire.codec import PROTOCOL_VERSION

# The link header as PROTOCOL.md gives it, written out here by hand (not nodes.wire.linkproto):
# crc32 u32 | stream u32 | epoch u64 | seq u64 | ack u64 | ack_epoch u64 | ack_stream u32 | flags u32
_REST = struct.Struct("<IQQQQII")
HEADER = 48


class Stream:
    """One end of a link, the least the protocol asks: number what goes out, ack what comes in,
    hand up each message once and in order (a node resends what is not acked)."""

    def __init__(self, epoch: int | None = None):
        self.epoch = epoch or time.time_ns()
        self.stream = 1
        self.seq = 0
        self.peer_epoch = self.peer_stream = 0
        self.rx_next = 1

    def frame(self, body: bytes, seq: int, flags: int = 0) -> bytes:
        rest = _REST.pack(self.stream, self.epoch, seq, self.rx_next - 1, self.peer_epoch,
                          self.peer_stream, flags) + body
        return struct.pack("<I", zlib.crc32(rest)) + rest

    def ack(self) -> bytes:
        return self.frame(b"", 0)

    def take(self, frame: bytes) -> tuple[bytes | None, bool]:
        """(the message a frame hands up or None, whether to ack it now)."""
        crc = struct.unpack_from("<I", frame)[0]
        assert zlib.crc32(frame[4:]) == crc, "a node sent a frame whose crc32 does not match"
        stream, epoch, seq, _ack, _ae, _as, flags = _REST.unpack_from(frame, 4)
        body = frame[HEADER:]
        if flags & 1:                               # outside any stream: a refusal, or
            return body or None, False              # (empty) a notice that we have no link
        if (epoch, stream) != (self.peer_epoch, self.peer_stream):
            self.peer_epoch, self.peer_stream, self.rx_next = epoch, stream, 1
        if seq == 0:
            return None, False                      # an ack, or a heartbeat
        if seq != self.rx_next:
            return None, True                       # a resend of what we have: ack again
        self.rx_next += 1
        return body, True


def key_file(name: str) -> str:
    """A node's certificate file name, as PROTOCOL.md gives it: its id with '-' for '/' (a bare
    gpu, mediator or hypervisor is GPU 0's: mediator-0)."""
    if name in ("gpu", "mediator", "hypervisor"):
        name += "/0"
    return name.replace("/", "-")


class RawPeer:
    """A DEALER with identity `name`. With `keys` (a `gvtbench keys` directory) it uses the
    certificate `key_name` (default: its name) and authenticates the server as `server`."""

    def __init__(self, endpoint: str, name: str = "tester", *, keys: str | Path | None = None,
                 key_name: str | None = None, server: str | None = None, identity: str | None = None):
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        if identity is not None:        # else ZeroMQ's random routing id, as the nodes use
            self.s.setsockopt(zmq.IDENTITY, identity.encode())
        self.s.setsockopt(zmq.RCVTIMEO, 10000)
        if keys is not None:
            pub, sec = zmq.auth.load_certificate(Path(keys) / f"{key_file(key_name or name)}.key_secret")
            self.s.curve_publickey, self.s.curve_secretkey = pub, sec
            self.s.curve_serverkey = zmq.auth.load_certificate(Path(keys) / f"{key_file(server)}.key")[0]
        self.s.connect(endpoint)
        self.name = name
        self.seq = 0
        self.link = Stream()
        self.others: list = []          # messages that came while call() waited for its answer

    def send_body(self, body: bytes) -> None:
        """A message (well formed or not) as the next of the stream."""
        self.seq += 1
        self.s.send(self.link.frame(body, self.seq))

    def send(self, kind: str, payload: Any = None, vgpu: int = 0, want_reply: bool = True,
             trace: int = 0) -> int:
        """With a trace id, flags bit 1 is set and the id is the envelope's 8th field."""
        self.seq += 1
        doc: tuple = (kind, self.seq, 0, vgpu, time.monotonic_ns(), int(want_reply) | (2 if trace else 0),
                      payload)
        if trace:
            doc += (trace,)
        self.s.send(self.link.frame(msgpack.packb(doc, use_bin_type=True), self.seq))
        return self.seq

    def recv(self, timeout_ms: int = 10000) -> Any:
        """The next message (acked), skipping acks and resends; None if none within the time."""
        end = time.monotonic() + timeout_ms / 1000
        while True:
            left = int((end - time.monotonic()) * 1000)
            if left <= 0 or not self.s.poll(left):
                return None
            body, ack = self.link.take(self.s.recv())
            if ack:
                self.s.send(self.link.ack())
            if body is not None:
                return msgpack.unpackb(body, raw=False, strict_map_key=False)

    def raw(self, body: bytes, timeout_ms: int = 10000, wrap: bool = True) -> Any:
        """Send bytes as the next message of the stream (wrap) or as a whole frame."""
        if wrap:
            self.send_body(body)
        else:
            self.s.send(body)
        return self.recv(timeout_ms)

    def call(self, kind: str, payload: Any = None, vgpu: int = 0, timeout_ms: int = 10000) -> Any:
        """Send a request and return its answer; what came meanwhile is kept in `others`."""
        seq = self.send(kind, payload, vgpu)
        while True:
            r = self.recv(timeout_ms)
            if r is None or r[2] == seq:
                return r
            if len(self.others) < 1000:
                self.others.append(r)

    def hello(self, version: int = PROTOCOL_VERSION, name: str | None = None, role: str | None = None,
              timeout_ms: int = 10000) -> Any:
        name = name or self.name
        if role is None:
            role = re.sub(r"\d+$", "", name) if re.fullmatch(r"(guest\d+|gpu|mediator|hypervisor|launcher)", name) else "test"
        return self.call("HELLO", {"name": name, "role": role, "version": version}, timeout_ms=timeout_ms)

    def post(self, ident: bytes, kind: str, payload: Any = None, vgpu: int = 0) -> None:
        self.seq += 1
        self.send(ident, (kind, self.seq, 0, vgpu, 0, 0, payload))

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(role: str, cfg_path: str | Path, bind: str, *extra: str, metrics_port: int = 0,
               log: Path | None = None, run_id: str | None = None) -> subprocess.Popen:
    """A node process; a guest binds nothing (nobody connects to it), so `bind` only names its run."""
    cmd = [sys.executable, "-m", "bench.cli", "node", role, "--config", str(cfg_path),
           *(["--bind", bind] if role != "guest" else []),
           "--metrics-port", str(metrics_port), "--run-id", run_id or f"t{os.getpid()}{abs(hash(bind)) % 10**6}",
           *extra]
    out = open(log, "wb") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    finally:
        if log:
            out.close()


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def wait_for(cond: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.05)


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


class Cluster:
    """gpu, mediator and hypervisor nodes started alone (no launcher), on ipc in a private
    directory or on tcp with the run's keys; guests are the test's raw peers."""

    def __init__(self, directory: Path, cfg_text: str = "", *, roles: tuple[str, ...] = ("gpu", "mediator", "hypervisor"),
                 transport: str = "ipc"):
        self.dir = directory
        self.cfg = directory / "c.toml"
        self.cfg.write_text(cfg_text or "[vgpus]\ncount = 2\nram_mib = 8\n")
        self.keys = None
        from bench import config
        vms = range(1, config.load(self.cfg)["vgpus"]["count"] + 1)
        if transport == "tcp":
            self.keys = directory / "keys"
            subprocess.run([sys.executable, "-m", "bench.cli", "keys", str(self.keys), "--config",
                            str(self.cfg)], check=True, capture_output=True, timeout=60)
            self.eps = {r: f"tcp://127.0.0.1:{free_port()}" for r in roles}
            self.vm_eps = {vm: f"tcp://127.0.0.1:{free_port()}" for vm in vms}
        else:
            self.eps = {r: f"ipc://{directory}/{r[:3]}" for r in roles}
            self.vm_eps = {vm: f"{self.eps.get('hypervisor')}.vm{vm}" for vm in vms}
        self.ports = {r: free_port() for r in roles}
        self.procs: dict[str, subprocess.Popen] = {}
        self.args: dict[str, list[str]] = {}
        peers = {"mediator": "gpu", "hypervisor": "mediator"}
        for r in roles:
            extra = ["--peer", f"{peers[r]}={self.eps[peers[r]]}"] if r in peers else []
            if self.keys:
                extra += ["--keys", str(self.keys)]
            if r == "hypervisor":
                extra += [a for vm, ep in self.vm_eps.items() for a in ("--vm-bind", f"{vm}={ep}")]
            self.args[r] = extra
            self.procs[r] = start_node(r, self.cfg, self.eps[r], *extra, metrics_port=self.ports[r],
                                       log=directory / f"{r}.log")
        for r in roles:
            wait_for(lambda: self._serving(r), 30, f"{r} to start")

    def restart(self, role: str) -> None:
        """kill -9 a node and start it again on the same endpoint: a new incarnation."""
        p = self.procs[role]
        p.kill()
        p.wait(10)
        self.procs[role] = start_node(role, self.cfg, self.eps[role], *self.args[role],
                                      metrics_port=self.ports[role], log=self.dir / f"{role}.restarted.log")
        wait_for(lambda: self._serving(role), 30, f"{role} to start again")

    def _serving(self, role: str) -> bool:
        assert self.alive(role), self.log(role)
        try:
            return bool(self.metrics(role))
        except OSError:
            return False

    def peer(self, to: str, name: str, *, vm: int | None = None, **kw: Any) -> RawPeer:
        """A raw peer connected to node `to`; with `vm`, to the hypervisor's endpoint of that
        VM's guest (by default a peer named guestN connects to VM N's)."""
        if self.keys is not None:
            kw.setdefault("keys", self.keys)
            kw.setdefault("server", to)
        if vm is None and to == "hypervisor" and re.fullmatch(r"guest\d+", name):
            vm = int(name[5:])
        endpoint = self.vm_eps[vm] if vm else self.eps[to]
        return RawPeer(endpoint, name, **kw)

    def metrics(self, role: str) -> str:
        return scrape(self.ports[role])

    def alive(self, role: str) -> bool:
        return self.procs[role].poll() is None

    def log(self, role: str) -> str:
        return (self.dir / f"{role}.log").read_text(errors="replace")

    def guest(self, vm: int = 1, **kw: Any) -> RawPeer:
        """A raw guest that has said HELLO to the hypervisor and whose vGPU answers."""
        g = self.peer("hypervisor", f"guest{vm}", **kw)
        assert g.hello()[0] == "REPLY"
        wait_for(lambda: (g.call("MMIO_READ", {"off": 0x78000, "size": 8}, vm) or [""])[0] == "REPLY",
                 60, "the vGPU to answer")
        return g

    def close(self) -> None:
        for p in self.procs.values():
            stop(p)


class RawServer:
    """A ROUTER playing a node that others connect to (the mediator a hypervisor connects to):
    it answers HELLO and can send requests back over the connection."""

    def __init__(self, endpoint: str, name: str, *, keys: str | Path | None = None):
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.ROUTER)
        self.s.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            pub, sec = zmq.auth.load_certificate(Path(keys) / f"{name}.key_secret")
            self.s.curve_server = True
            self.s.curve_publickey, self.s.curve_secretkey = pub, sec
        self.s.bind(endpoint)
        self.name = name
        self.seq = 0
        self.links: dict[bytes, Stream] = {}

    def recv(self, timeout_ms: int = 10000) -> tuple[bytes, Any] | None:
        end = time.monotonic() + timeout_ms / 1000
        while True:
            left = int((end - time.monotonic()) * 1000)
            if left <= 0 or not self.s.poll(left):
                return None
            ident, frame = self.s.recv_multipart()
            link = self.links.setdefault(ident, Stream())
            body, ack = link.take(frame)
            if ack:
                self.s.send_multipart((ident, link.ack()))
            if body is not None:
                return ident, msgpack.unpackb(body, raw=False, strict_map_key=False)

    def send(self, ident: bytes, doc: tuple) -> None:
        link = self.links.setdefault(ident, Stream())
        self.s.send_multipart((ident, link.frame(msgpack.packb(doc, use_bin_type=True), doc[1])))

    def accept_hello(self, timeout_ms: int = 30000) -> bytes:
        got = self.recv(timeout_ms)
        assert got and got[1][0] == "HELLO", got
        ident, doc = got
        self.seq += 1
        self.send(ident, ("REPLY", self.seq, doc[1], 0, 0, 0,
                          {"name": self.name, "role": self.name, "version": PROTOCOL_VERSION}))
        return ident

    def call(self, ident: bytes, kind: str, payload: Any = None, vgpu: int = 0) -> Any:
        self.seq += 1
        self.send(ident, (kind, self.seq, 0, vgpu, 0, 1, payload))
        while True:
            got = self.recv()
            if got is None or got[1][2] == self.seq:
                return got[1] if got else None

    def post(self, ident: bytes, kind: str, payload: Any = None, vgpu: int = 0) -> None:
        self.seq += 1
        self.send(ident, (kind, self.seq, 0, vgpu, 0, 0, payload))

    def close(self) -> None:
        self.ctx.destroy(linger=0)
