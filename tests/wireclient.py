"""A raw ZeroMQ peer for tests: speaks the envelope by hand, so it can also speak it wrongly."""
import socket
import subprocess
import sys
import time

import msgpack
import zmq

from nodes.wire.codec import PROTOCOL_VERSION


class RawPeer:
    def __init__(self, endpoint: str, name: str = "tester"):
        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.setsockopt(zmq.IDENTITY, name.encode())
        self.s.setsockopt(zmq.RCVTIMEO, 10000)
        self.s.connect(endpoint)
        self.name = name
        self.seq = 0

    def raw(self, frame: bytes):
        self.s.send(frame)
        return msgpack.unpackb(self.s.recv(), raw=False, strict_map_key=False)

    def call(self, kind, payload=None, vgpu=0, version=None):
        self.seq += 1
        doc = (kind, self.seq, 0, vgpu, time.monotonic_ns(), 1, payload)
        return self.raw(msgpack.packb(doc, use_bin_type=True))

    def hello(self, version=PROTOCOL_VERSION):
        return self.call("HELLO", {"name": self.name, "role": "test", "version": version})

    def close(self):
        self.ctx.destroy(linger=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(role, cfg_path, bind, *extra, metrics_port=0):
    cmd = [sys.executable, "-m", "bench.cli", "node", role, "--config", str(cfg_path), "--bind", bind,
           "--metrics-port", str(metrics_port), "--run-id", f"t{id(bind) & 0xffffff:x}", *extra]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop(proc, timeout=10):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
