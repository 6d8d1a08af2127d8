"""run.processes: a GPU's nodes in one host process, their links in memory (nodes.runtime's
NodeHost.inbox, nodes.wire.link.MemoryLink), against the same run split into a process per role."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest

from bench import config
from bench.launch import Launcher
from nodes.actions import Call
from nodes.core import Core
from nodes.errors import GvtError
from nodes.runtime import NodeHost, Runtime
from nodes.wire.link import NEVER, Link, MemoryLink, SendFailed
from nodes.wire.linkproto import State
from nodes.wire.codec import encode, decode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- MemoryLink, alone --------------------------------------------------------------------------
def _pair(faults=None) -> tuple[MemoryLink, list, list]:
    framed, bodies = [], []
    link = MemoryLink("mediator", framed.append, bodies.append, epoch=5, now=0, faults=faults)
    return link, framed, bodies


def test_a_memory_link_frames_its_hello_then_hands_bodies_over_numbered_on():
    link, framed, bodies = _pair()
    link.proto.hello_sent()
    hello = encode("HELLO", 1, 0, 0, 0, 1, {"name": "hypervisor/0", "role": "hypervisor",
                                            "version": 6})
    assert link.send_frame(hello, link.tx_seq + 1, 1 << 20, 0) == 1
    assert len(framed) == 1 and not bodies          # the protocol's frame, header and all
    assert link.next_wake() < NEVER                 # its resend timer runs until open
    link.proto.hello_answered()
    assert link.proto.state is State.OPEN
    for seq in (2, 3, 4):
        assert link.tx_seq + 1 == seq
        body = encode("TRAP_READ", seq, 0, 1, 0, 1, {"off": 0x2600, "size": 4})
        assert link.send_frame(body, seq, 1 << 20, 0) == seq
    assert len(framed) == 1                         # nothing more through the protocol
    assert [decode(b).seq for b in bodies] == [2, 3, 4]     # the bodies as they are
    assert link.sent == 4 and link.proto.tx_seq == 1
    assert link.next_wake() == NEVER and link.tick(10**12) == []    # no acks, resends, liveness
    # Link.send (a reply built from its seq) numbers on from the same sequence
    link.send(lambda s: encode("REPLY", s, 1, 0, 0, 0, 1), 1 << 20, 0)
    assert decode(bodies[-1]).seq == 5


def test_a_memory_link_refuses_what_a_socket_would():
    link, framed, bodies = _pair()
    link.proto.hello_accepted()
    with pytest.raises(SendFailed) as e:
        link.send_frame(b"x" * 100, 1, 64, 0)
    assert e.value.code == "E2BIG" and link.send_failed == 1 and not bodies

    def full(_body: bytes) -> None:
        raise SendFailed("EAGAIN", "the in-memory queue to mediator is full")
    link._hand = full
    with pytest.raises(SendFailed) as e:
        link.send_frame(b"x", 1, 1 << 20, 0)
    assert e.value.code == "EAGAIN" and link.tx_seq == 0    # nothing numbered


def test_a_memory_link_with_a_fault_plan_stays_framed():
    from nodes.wire.faults import FaultPlan
    faults = FaultPlan.parse(1, ["corrupt=1.0"], 10**9).for_link("hypervisor/0", "mediator/0")
    assert faults is not None
    link, framed, bodies = _pair(faults)
    link.proto.hello_accepted()
    link.send_frame(encode("TRAP_READ", 1, 0, 1, 0, 1, {"off": 0, "size": 4}), 1, 1 << 20, 0)
    assert len(framed) == 1 and not bodies          # framed, and the plan played on it
    assert link.faults.report()["counts"].get("corrupt") == 1
    assert link.next_wake() < NEVER                 # its resends and acks run as on a socket


# ---- two nodes on one NodeHost ------------------------------------------------------------------
class _Regs(Core):
    """A mediator that answers TRAP_READ with the offset plus one."""

    def handle(self, msg, now):
        if msg.kind == "TRAP_READ":
            return msg.payload["off"] + 1
        return super().handle(msg, now)


def test_nodes_of_one_process_link_in_memory():
    """A hypervisor and a mediator on one NodeHost: the hypervisor's link to the mediator's
    endpoint is a MemoryLink, requests and replies go both ways in order, are counted on both
    ends, and only the HELLO goes through the link protocol."""
    d = tempfile.mkdtemp(prefix="gvtb-t-", dir="/tmp")
    host = NodeHost()
    med = Runtime("mediator", "mediator", _Regs(), f"ipc://{d}/med", vgpus=[1], host=host)
    hv = Runtime("hypervisor", "hypervisor", Core(), f"ipc://{d}/hv", vgpus=[1], host=host)
    link = hv.connect("mediator", f"ipc://{d}/med")
    assert isinstance(link, MemoryLink)
    got: list = []

    def client():
        yield from hv.hello_task(["mediator"])
        for off in range(0, 400, 4):
            got.append((yield Call("mediator", "TRAP_READ", {"off": off, "size": 4}, vgpu=1)))
        hv.stopping = med.stopping = True
    hv.spawn(client())
    t0 = time.monotonic()
    hv.run(until=lambda: time.monotonic() - t0 > 20)
    try:
        assert got == [off + 1 for off in range(0, 400, 4)]
        back = med.engine.links["hypervisor"]
        assert isinstance(back, MemoryLink)
        assert link.sent == back.received == 101 and back.sent == link.received == 101
        assert link.gaps == back.gaps == link.dups == back.dups == 0
        # only the HELLO went through the link protocol (its answer came from an open link)
        assert link.proto.sent == 1 and back.proto.sent == 0
        assert not host.inbox
    finally:
        med.close()
        hv.close()


# ---- whole runs ---------------------------------------------------------------------------------
def _run(processes: str, **run) -> dict:
    raw = {"run": {"ops": 100, "seed": 6, "processes": processes, **run},
           "vgpus": {"count": 3, "ram_mib": 8, "per_process": 3},
           "gpu": {"hypervisors": 2},
           # one operation at a time, so that what guest memory holds at the end is the same
           # in every run of the seed
           "load": {"mode": "closed", "concurrency": 1, "burst": 32,
                    "mix": {"mmio-read": 0.3, "mmio-write": 0.2, "gtt-burst": 0.2, "submit": 0.2,
                            "ppgtt-churn": 0.1}}}
    return Launcher(config.validate(raw, "test")).run()


@pytest.mark.xdist_group("runs")
def test_every_layout_gives_the_same_run():
    """The same seed and op count split into a process per role, with the mediator and both
    hypervisors in one process, and with the gpu there too: the same verdict, every op done, the
    same guest memory; the processes are the layout's."""
    runs = {p: _run(p) for p in config.PROCESS_LAYOUTS}
    for p, res in runs.items():
        assert res["verdict"] == "pass", (p, res["reasons"])
        assert all(v["guest"]["completed"] == 100 for v in res["vgpus"]), p
    assert len({res["memory_sha256"] for res in runs.values()}) == 1
    procs = {p: sorted(res["resources"]["processes"]) for p, res in runs.items()}
    assert procs["split"] == ["gpu/0", "guests/1", "hypervisor/0", "hypervisor/0.1", "mediator/0"]
    assert procs["host"] == ["gpu/0", "guests/1", "host/0"]
    assert procs["machine"] == ["guests/1", "host/0"]
    # each hypervisor still counts its own VMs' traps
    for res in runs.values():
        assert all(v["traps"]["mmio_read"]["count"] > 0 for v in res["vgpus"])


@pytest.mark.xdist_group("runs")
def test_a_machine_layout_over_tcp_with_curve_and_two_gpus():
    """Two GPUs, each its own host process holding gpu, mediator and two hypervisors that share
    one ZAP authenticator; guests reach them over tcp with CURVE and DMA goes by message."""
    raw = {"run": {"duration_s": 2, "seed": 3, "processes": "machine", "transport": "tcp",
                   "fabric": "msg"},
           "vgpus": {"count": 4}, "gpu": {"count": 2, "hypervisors": 2}, "load": {"rate": 100}}
    res = Launcher(config.validate(raw, "test")).run()
    assert res["verdict"] == "pass", res["reasons"]
    assert sorted(res["resources"]["processes"]) == ["guests/1", "guests/3", "host/0", "host/1"]
    assert all(v["guest"]["completed"] > 0 for v in res["vgpus"])
    # within a host process every link is in memory (the gpu's DMA to each hypervisor too),
    # and it carried messages; a guest's and the launcher's cross a socket
    memory = {(r["from"], r["to"]) for r in res["ledger"]["links"] if r["memory"]}
    for g in (0, 1):
        stack = {f"gpu/{g}", f"mediator/{g}", f"hypervisor/{g}", f"hypervisor/{g}.1"}
        inside = {(a, b) for a in stack for b in stack if a != b}
        linked = {(r["from"], r["to"]) for r in res["ledger"]["links"]} & inside
        assert linked and linked <= memory, linked - memory
        # msg fabric: DMA goes by message, from the gpu to each hypervisor on its own link
        assert {(f"gpu/{g}", f"hypervisor/{g}"), (f"gpu/{g}", f"hypervisor/{g}.1")} <= linked
    assert not any(r["memory"] for r in res["ledger"]["links"]
                   if "launcher" in (r["from"], r["to"]) or r["from"].startswith("guest"))
    assert all(r["sent"] > 0 for r in res["ledger"]["links"] if r["memory"])


def test_node_faults_need_the_nodes_they_stop_in_a_process_of_their_own():
    def cfg(processes: str, fault: str) -> dict:
        return config.validate({"run": {"processes": processes, "duration_s": 3},
                                "faults": {"links": [fault]}}, "test")
    for processes, node in (("host", "mediator"), ("host", "hypervisor"), ("machine", "gpu")):
        with pytest.raises(config.ConfigError) as e:
            cfg(processes, f"kill={node}@1s")
        assert "run.processes = 'split'" in str(e.value)
    cfg("host", "kill=gpu@1s")              # the gpu is a process of its own there
    cfg("split", "restart=hypervisor@1s")
    with pytest.raises(config.ConfigError) as e:
        config.validate({"run": {"processes": "one"}}, "test")
    assert "run.processes" in str(e.value) and "'machine'" in str(e.value)


def test_a_host_process_names_what_its_command_line_lacks(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"vgpus": {"count": 2}}')
    env = {**os.environ, "PYTHONPATH": ROOT}

    def node(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bench.cli", "node", "host", "--config",
                               str(cfg), *args], capture_output=True, text=True, env=env,
                              timeout=60)
    out = node("--bind", f"ipc://{tmp_path}/m", "--peer", f"gpu=ipc://{tmp_path}/g")
    assert out.returncode != 0 and "--hypervisor-bind K=ENDPOINT" in out.stderr
    out = node("--bind", f"ipc://{tmp_path}/m", "--hypervisor-bind", f"0=ipc://{tmp_path}/h")
    assert out.returncode != 0 and "--peer gpu=ENDPOINT" in out.stderr
    out = node("--vm", "1", "--bind", f"ipc://{tmp_path}/m")
    assert out.returncode != 0 and "not for a host process" in out.stderr
    with pytest.raises(GvtError):
        from nodes.node import run_host
        run_host(config.load(str(cfg)), gpu=0, bind=None, hv_binds={}, peers={}, vm_binds=None,
                 launcher=None, run_id="t")
