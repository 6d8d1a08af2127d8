"""What an independent client did to the nodes, as a hostile peer would, each done again here with
real processes and real sockets: disconnect with requests pending, control kinds from a guest,
identities claimed without the key, frames and replies too large, floods of requests, of made-up
vGPU ids and names, links left silent, a VM flooding its neighbour, a stalled mediator, and a
second HELLO with another version. No node may die, and none may do what the peer asked."""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import msgpack
import pytest
import zmq.auth

from nodes.engine import TRACE_SPANS_MAX
from nodes.wire.codec import MAX_POSTED_WRITES, PROTOCOL_VERSION
from wireclient import Cluster, RawPeer, free_port, metric, peak_rss_kib, start_node, wait_for

GPR0 = 0x2600
PV_MAGIC = 0x78000


ROLES_FOR = {"gpu": ("gpu",), "mediator": ("gpu", "mediator"), "hypervisor": ("gpu", "mediator", "hypervisor")}


@pytest.fixture
def cluster(short_ipc_dir):
    c = Cluster(Path(short_ipc_dir))
    yield c
    c.close()


@pytest.fixture
def gpu_alone(short_ipc_dir):
    """A gpu with no mediator: a raw peer may be its mediator."""
    c = Cluster(Path(short_ipc_dir), roles=("gpu",))
    yield c
    c.close()


# ---- a peer that disconnects with requests pending ---------------------------------------------
@pytest.mark.parametrize("target,name,kind,payload", [
    ("hypervisor", "guest1", "MMIO_READ", {"off": GPR0, "size": 4}),
    ("mediator", "hypervisor", "TRAP_READ", {"off": GPR0, "size": 4}),
    ("gpu", "mediator", "MMIO_READ", {"off": GPR0, "size": 4}),
])
def test_a_peer_that_leaves_with_requests_pending_does_not_stop_the_node(short_ipc_dir, target, name,
                                                                         kind, payload):
    """Hundreds of requests, some that end in an error, then the socket closes: the answers go
    to a peer that is gone. They are dropped and counted; the node serves the next peer."""
    cluster = Cluster(Path(short_ipc_dir), roles=ROLES_FOR[target])
    try:
        _leave_with_requests_pending(cluster, target, name, kind, payload)
    finally:
        cluster.close()


def _leave_with_requests_pending(cluster: Cluster, target: str, name: str, kind: str, payload: dict) -> None:
    if target == "hypervisor":
        cluster.guest(1).close()            # the vGPU is up
    for _ in range(20):                     # HELLO, then gone before the answer
        p = cluster.peer(target, name)
        p.send("HELLO", {"name": name, "role": name.rstrip("0123456789"), "version": PROTOCOL_VERSION})
        p.close()
    p = cluster.peer(target, name)
    assert wait_for(lambda: (p.hello() or [""])[0] == "REPLY", 20, "the HELLO to be answered")
    for i in range(2000):
        p.send(kind, payload if i % 3 else {"off": 3 << 20, "size": 4}, vgpu=1)   # every third: EFAULT
    assert p.recv(10000) is not None        # it is answering
    p.close()
    time.sleep(0.5)
    assert cluster.alive(target), cluster.log(target)
    q = cluster.peer(target, name)
    try:
        assert wait_for(lambda: (q.hello() or [""])[0] == "REPLY", 20, "a new peer to be accepted")
        assert wait_for(lambda: q.call(kind, payload, vgpu=1)[0] == "REPLY", 20, "an answer")
        text = cluster.metrics(target)
        assert metric(text, "gvtbench_links_dropped_total") >= 1
    finally:
        q.close()


# ---- control kinds come only from the launcher ---------------------------------------------------
def test_a_restarted_mediator_is_welcomed_by_its_new_epoch(short_ipc_dir):
    """kill -9 of the mediator and a new one on the same endpoint: the hypervisor tells the new
    incarnation by its epoch (its heartbeat meets an empty frame outside any stream), fails what
    was in flight, says HELLO again, and its traps reach the new mediator; never "before HELLO"
    for good, as version 4 had it."""
    c = Cluster(Path(short_ipc_dir))
    try:
        g = c.guest(1)
        c.restart("mediator")
        wait_for(lambda: metric(c.metrics("hypervisor"), "gvtbench_link_restarts_total",
                                link="mediator") >= 1, 20, "the hypervisor to see the new epoch")
        assert metric(c.metrics("hypervisor"), "gvtbench_links_dropped_total", reason="restarted") >= 1
        # the new mediator's vGPUs are new (a mediator restart loses their state): the guest
        # is told (VGPU_LOST), its reads fail with ENODEV until it resets its VM; then they work
        r = g.call("MMIO_READ", {"off": GPR0, "size": 4}, 1)
        assert r[0] == "ERROR" and r[6]["code"] == "ENODEV" and "reset the VM" in r[6]["text"], r
        assert any(m[0] == "VGPU_LOST" and "mediator restarted" in m[6]["reason"] for m in g.others)
        wait_for(lambda: (g.call("VM_RESET", None, 1) or [""])[0] == "REPLY", 30,
                 "the VM reset on the new mediator")
        wait_for(lambda: (g.call("MMIO_READ", {"off": GPR0, "size": 4}, 1) or [""])[0] == "REPLY",
                 30, "a read through the new mediator")
        assert metric(c.metrics("mediator"), "gvtbench_link_messages_total", link="hypervisor",
                      direction="rx") >= 2          # its HELLO and the traps
        g.close()
    finally:
        c.close()


def test_with_the_shm_fabric_the_hypervisor_takes_no_gpu_link(cluster):
    """Least privilege: with shm the gpu reaches guest RAM directly, so the hypervisor refuses a
    peer that says it is the gpu (it could DMA_READ and DMA_WRITE any VM's RAM)."""
    p = cluster.peer("hypervisor", "gpu")
    try:
        r = p.hello()
        assert r[0] == "ERROR" and r[6]["code"] == "EPERM" and "does not need" in r[6]["text"], r
        r = p.call("DMA_READ", {"ops": [[0, 0, 4096]]}, vgpu=1)
        assert r[0] == "ERROR" and r[6]["code"] == "EPROTO", r       # no link: before HELLO
    finally:
        p.close()


def test_a_guest_cannot_stop_or_inspect_the_hypervisor(cluster):
    g = cluster.guest(1)
    try:
        for kind, payload in (("SHUTDOWN", None), ("STATS", None), ("VGPU_RESET", None), ("START", {})):
            r = g.call(kind, payload, vgpu=1)
            assert r[0] == "ERROR" and r[6]["code"] == "EPERM", r
        assert g.call("MMIO_READ", {"off": PV_MAGIC, "size": 8}, 1)[6] == 0x4776544776544776
        assert cluster.alive("hypervisor")
        text = cluster.metrics("hypervisor")
        assert metric(text, "gvtbench_refused_messages_total", peer_role="guest", kind="SHUTDOWN", code="EPERM") == 1
    finally:
        g.close()
    # a peer calling itself the launcher is not one: no launcher connects to a node's socket
    p = cluster.peer("hypervisor", "launcher")
    try:
        r = p.hello()
        assert r[0] == "ERROR" and r[6]["code"] == "EPERM"
        r = p.call("SHUTDOWN")
        assert r[0] == "ERROR" and r[6]["code"] == "EPROTO"
    finally:
        p.close()
    assert cluster.alive("hypervisor")


# ---- identity comes from the key --------------------------------------------------------------------
@pytest.fixture
def tcp_cluster(short_ipc_dir):
    c = Cluster(Path(short_ipc_dir), transport="tcp")
    yield c
    c.close()


def test_on_tcp_a_peer_without_the_right_key_never_reaches_the_node(tcp_cluster, tmp_path):
    c = tcp_cluster
    g = c.guest(1)                                  # guest1's own key works
    g.close()
    nokey = RawPeer(c.eps["hypervisor"], "guest1")  # no CURVE at all
    assert nokey.hello(timeout_ms=2000) is None
    nokey.close()
    zmq.auth.create_certificates(tmp_path, "guest1")        # a key that is not the run's
    shutil.copy(c.keys / "hypervisor-0.key", tmp_path / "hypervisor-0.key")
    wrong = RawPeer(c.eps["hypervisor"], "guest1", keys=tmp_path, server="hypervisor/0")
    assert wrong.hello(timeout_ms=2000) is None
    wrong.close()
    # libzmq reports a peer without CURVE as a protocol failure or one with no detail
    text = wait_for(lambda: (t := c.metrics("hypervisor")) and
                    metric(t, "gvtbench_handshake_failures_total", reason="auth") >= 1 and
                    metric(t, "gvtbench_handshake_failures_total") >= 2 and t,
                    30, "the failed handshakes to be counted: " + "|".join(
                        l for l in c.metrics("hypervisor").splitlines() if "handshake" in l or "disconnects_total" in l))
    assert metric(text, "gvtbench_link_messages_total", link="guest1", direction="rx") > 0


def test_on_tcp_a_key_speaks_only_for_its_own_name(tcp_cluster):
    c = tcp_cluster
    c.guest(1).close()
    # guest1's key, claiming to be guest2
    p = c.peer("hypervisor", "guest1", identity="impostor")
    r = p.hello(name="guest2")
    assert r[0] == "ERROR" and r[6]["code"] == "EPERM" and "guest1" in r[6]["text"]
    p.close()
    # guest1 as itself may not act for VM 2, nor make the mediator's calls
    g = c.peer("hypervisor", "guest1")
    assert g.hello()[0] == "REPLY"
    for kind, payload, vm in (("MMIO_READ", {"off": GPR0, "size": 4}, 2), ("GPA_READ", {"ops": [[0, 16]]}, 2),
                              ("GFN_PIN", {"gfns": b"\0" * 8}, 1), ("GPA_WRITE", {"ops": [[0, b"x"]]}, 1)):
        r = g.call(kind, payload, vm)
        assert r[0] == "ERROR" and r[6]["code"] == "EPERM", (kind, r)
    g.close()
    # guest2's key on guest1's endpoint and identity, once guest1 has gone: the handshake fails,
    # each VM's endpoint takes its own guest's key only
    spoof = c.peer("hypervisor", "guest2", identity="guest1", vm=1)
    assert spoof.call("MMIO_READ", {"off": GPR0, "size": 4}, 1, timeout_ms=2000) is None
    spoof.close()
    wait_for(lambda: metric(c.metrics("hypervisor"), "gvtbench_handshake_failures_total", reason="auth") >= 1,
             30, "the refused handshake to be counted")


def test_a_node_refuses_tcp_without_keys_and_ipc_in_a_shared_directory(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    p = start_node("gpu", cfg, f"tcp://127.0.0.1:{free_port()}", log=tmp_path / "a.log")
    assert p.wait(30) == 2 and "--keys" in (tmp_path / "a.log").read_text()
    p = start_node("gpu", cfg, "ipc:///tmp/gvtbench-shared-test", log=tmp_path / "b.log")
    assert p.wait(30) == 2 and "mode 700" in (tmp_path / "b.log").read_text()


# ---- what a peer can make a node hold is bounded ------------------------------------------------
def test_a_huge_frame_is_refused_by_the_socket_without_the_node_holding_it(gpu_alone):
    cluster = gpu_alone
    p = cluster.peer("gpu", "mediator")
    assert p.hello()[0] == "REPLY"
    pid = cluster.procs["gpu"].pid
    before = peak_rss_kib(pid)
    p.s.send(msgpack.packb(("MMIO_WRITE", 2, 0, 0, 0, 0, b"x" * (160 << 20))))
    wait_for(lambda: metric(cluster.metrics("gpu"), "gvtbench_disconnects_total") >= 1, 20,
             "the connection to be dropped")
    assert peak_rss_kib(pid) - before < 32 * 1024           # it never buffered the 160 MiB
    p.close()
    q = cluster.peer("gpu", "mediator", identity="mediator2")
    try:
        assert wait_for(lambda: (q.hello() or [""])[0] == "REPLY", 20, "the gpu to serve again")
        assert q.call("MMIO_READ", {"off": GPR0, "size": 4})[0] == "REPLY"
    finally:
        q.close()


def test_a_reply_never_exceeds_the_frame_limit(cluster):
    g = cluster.guest(1)
    try:
        r = g.call("GPA_READ", {"ops": [[k * 4096, 4096] for k in range(300)]}, 1)
        assert r[0] == "ERROR" and r[6]["code"] == "E2BIG" and "1048576" in r[6]["text"]
        r = g.call("GPA_READ", {"ops": [[k * 4096, 4096] for k in range(200)]}, 1)
        assert r[0] == "REPLY" and len(r[6]) == 200
    finally:
        g.close()


def test_outstanding_requests_per_link_are_bounded(cluster):
    g = cluster.guest(1)
    os.kill(cluster.procs["mediator"].pid, signal.SIGSTOP)       # nothing gets answered
    try:
        for _ in range(1500):
            g.send("MMIO_READ", {"off": GPR0, "size": 4}, 1)
        refusals = [g.recv(5000) for _ in range(1500 - 1024)]
        assert all(r and r[0] == "ERROR" and r[6]["code"] == "EAGAIN" for r in refusals), refusals[-1]
        assert g.recv(300) is None                               # the other 1024 wait
    finally:
        os.kill(cluster.procs["mediator"].pid, signal.SIGCONT)
    replies = [g.recv(20000) for _ in range(1024)]
    assert all(r and r[0] == "REPLY" for r in replies)
    g.close()


def test_made_up_vgpu_ids_and_names_leave_no_trace_in_metrics(short_ipc_dir):
    cluster = Cluster(Path(short_ipc_dir), roles=("gpu",))
    try:
        _made_up_ids_and_names(cluster)
    finally:
        cluster.close()


def _made_up_ids_and_names(cluster: Cluster) -> None:
    size0 = len(cluster.metrics("gpu"))
    p = cluster.peer("gpu", "mediator")
    assert p.hello()[0] == "REPLY"
    for vgpu in range(3, 5003):
        p.send("MMIO_READ", {"off": GPR0, "size": 4}, vgpu)
    replies = [p.recv(5000) for _ in range(5000)]
    assert all(r[6]["code"] == "ENODEV" for r in replies)
    p.close()
    names = [f"x{i}" for i in range(100)] + [f"guest{i}" for i in range(3, 103)] + ["g" * 1000]
    for n in names:
        q = cluster.peer("gpu", "mediator", identity=f"id{len(n)}{n[:50]}")
        r = q.hello(name=n)
        assert r[0] == "ERROR" and r[6]["code"] in ("EINVAL", "EPERM"), (n, r)
        q.close()
    text = cluster.metrics("gpu")
    assert 'vgpu="4999"' not in text and "x99" not in text and "guest50" not in text
    assert len(text) < size0 + 8192


def test_a_silent_peer_counts_as_dead_and_is_taken_back_when_it_speaks_again(short_ipc_dir):
    """The link protocol's liveness (run.link_silent_s): a guest that reads and sends nothing is
    dead to its hypervisor after the timeout (what was in flight to it is given up); heard again
    with the same epoch, it is the same incarnation, taken back without a new HELLO."""
    c = Cluster(Path(short_ipc_dir), "[run]\nlink_silent_s = 1\n[vgpus]\ncount = 2\nram_mib = 8\n")
    try:
        g = c.guest(1)
        wait_for(lambda: metric(c.metrics("hypervisor"), "gvtbench_link_deaths_total", link="guest1") >= 1,
                 20, "the silent guest to count as dead")
        assert metric(c.metrics("hypervisor"), "gvtbench_links_dropped_total", reason="silent") >= 1
        r = g.call("MMIO_READ", {"off": GPR0, "size": 4}, 1)
        assert r[0] == "REPLY", r
        g.close()
    finally:
        c.close()


def test_posted_writes_to_a_stalled_mediator_meet_backpressure(cluster):
    """With the mediator stopped, a guest's writes pile up at the hypervisor only to half the
    bound; then the hypervisor stops reading that guest (its frames wait in the socket, then its
    sends block): nothing is lost, nothing is refused, and the hypervisor holds a bounded amount."""
    g = cluster.guest(1)
    pid = cluster.procs["mediator"].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        batch = {"off": (GPR0).to_bytes(4, "little") * 4096, "size": bytes([4]) * 4096,
                 "val": (1).to_bytes(8, "little") * 4096}
        for w in range(1, 41):                                   # 163840 writes
            g.send("MMIO_WRITE_BATCH", {**batch, "w": w}, 1, want_reply=False)
        posted = wait_for(lambda: metric(cluster.metrics("hypervisor"), "gvtbench_hv_posted_writes_in_flight",
                                         vgpu="1") >= 1 << 16 and
                          metric(cluster.metrics("hypervisor"), "gvtbench_hv_posted_writes_in_flight", vgpu="1"),
                          20, "the hypervisor to take half its bound")
        time.sleep(0.5)
        again = metric(cluster.metrics("hypervisor"), "gvtbench_hv_posted_writes_in_flight", vgpu="1")
        assert (1 << 16) <= posted == again < (1 << 16) + 4096    # it stopped reading
        assert g.recv(300) is None                                 # nothing refused
    finally:
        os.kill(pid, signal.SIGCONT)
    done = [g.recv(30000) for _ in range(40)]
    assert [d[6]["status"] for d in done] == ["ok"] * 40
    assert sorted(d[6]["first"] for d in done) == list(range(1, 41))
    g.close()


# ---- one VM cannot starve another ------------------------------------------------------------------
def test_a_flooding_vm_does_not_hold_back_its_neighbours_read(cluster):
    """vm1 posts three times the hypervisor's bound of writes at once; vm2's read is answered
    while most of them still wait (at the hypervisor, or in vm1's socket while the hypervisor
    stops reading it). No timing: the flood takes hundreds of times longer than a read."""
    g1, g2 = cluster.guest(1), cluster.guest(2)
    batch = {"off": (GPR0).to_bytes(4, "little") * 4096, "size": bytes([4]) * 4096,
             "val": (7).to_bytes(8, "little") * 4096}
    frames = 3 * MAX_POSTED_WRITES // 4096
    for w in range(1, frames + 1):
        g1.send("MMIO_WRITE_BATCH", {**batch, "w": w}, 1, want_reply=False)
    wait_for(lambda: metric(cluster.metrics("hypervisor"), "gvtbench_trap_batches_total", vgpu="1") > 0,
             20, "vm1's flood to arrive")
    r = g2.call("MMIO_READ", {"off": GPR0, "size": 4}, 2)
    text = cluster.metrics("hypervisor")
    assert r[0] == "REPLY"
    # vm1's writes were still waiting at the hypervisor, most of them not done yet
    assert metric(text, "gvtbench_hv_posted_writes_in_flight", vgpu="1") > 30000
    assert metric(text, "gvtbench_posted_writes_total", vgpu="1") < frames * 4096 // 2
    done = [g1.recv(60000) for _ in range(frames)]
    assert all(d and d[6]["status"] == "ok" for d in done)
    g1.close()
    g2.close()


# ---- a write whose answer never came -------------------------------------------------------------
def test_a_write_to_a_stalled_mediator_has_an_unknown_outcome_and_may_be_applied_later(short_ipc_dir):
    c = Cluster(Path(short_ipc_dir), "[run]\ncall_timeout_s = 1\n[vgpus]\ncount = 1\nram_mib = 8\n")
    g = c.guest(1)
    pid = c.procs["mediator"].pid
    try:
        os.kill(pid, signal.SIGSTOP)
        g.send("MMIO_WRITE", {"off": GPR0, "size": 4, "val": 0xCAFE, "w": 1}, 1, want_reply=False)
        done = g.recv(10000)
        assert done[0] == "WRITE_DONE" and done[6]["status"] == "unknown", done
        assert "ETIMEDOUT" in done[6]["reason"]
        os.kill(pid, signal.SIGCONT)
        assert wait_for(lambda: g.call("MMIO_READ", {"off": GPR0, "size": 4}, 1)[6] == 0xCAFE, 20,
                        "the stalled write to be applied")
    finally:
        os.kill(pid, signal.SIGCONT)
        g.close()
        c.close()


# ---- a second HELLO with another version -----------------------------------------------------------
def test_a_second_hello_with_another_version_is_refused_on_a_live_link(cluster):
    g = cluster.guest(1)
    try:
        r = g.hello(version=PROTOCOL_VERSION + 1)
        assert r[0] == "ERROR" and r[6]["code"] == "EPROTO" and "keeps its version" in r[6]["text"]
        assert g.call("MMIO_READ", {"off": PV_MAGIC, "size": 8}, 1)[0] == "REPLY"
        assert g.hello()[0] == "REPLY"          # the same version again is answered again
    finally:
        g.close()


# ---- trace flags ----------------------------------------------------------------------------------
def test_trace_flags_from_a_flooding_peer_leave_a_bounded_span_buffer(short_ipc_dir):
    """Nodes that record spans (run.trace_rate > 0) take a peer's word that a message is traced:
    a guest that marks every write traced gets a span each, up to the node's bound, and no more;
    the rest are counted as dropped, and the node serves on."""
    c = Cluster(Path(short_ipc_dir), "[run]\ntrace_rate = 1\n[vgpus]\ncount = 1\nram_mib = 8\n")
    g = c.guest(1)
    pid = c.procs["hypervisor"].pid
    try:
        before = peak_rss_kib(pid)
        n = 2 * TRACE_SPANS_MAX
        for k in range(1, n + 1):
            g.send("MMIO_WRITE", {"off": GPR0, "size": 4, "val": k, "w": k}, 1, want_reply=False,
                   trace=(1 << 40) | k)
        wait_for(lambda: metric(c.metrics("hypervisor"), "gvtbench_trace_spans_total",
                                outcome="dropped") >= n - TRACE_SPANS_MAX, 60,
                 "the hypervisor to drop the spans past its bound")
        m = c.metrics("hypervisor")
        assert metric(m, "gvtbench_trace_spans_total", outcome="kept") == TRACE_SPANS_MAX
        assert metric(c.metrics("mediator"), "gvtbench_trace_spans_total", outcome="kept") <= TRACE_SPANS_MAX
        assert peak_rss_kib(pid) - before < 32 * 1024     # 16384 spans: about 10 MB
        r = g.call("MMIO_READ", {"off": GPR0, "size": 4}, 1)
        assert r[0] == "REPLY" and c.alive("hypervisor") and c.alive("mediator")
    finally:
        g.close()
        c.close()


def test_a_node_that_does_not_trace_serves_traced_messages_as_any_other(cluster):
    """Without run.trace_rate a node records nothing and sends no trace on, but a traced
    message is still an ordinary message to it."""
    g = cluster.guest(1)
    try:
        g.send("MMIO_WRITE", {"off": GPR0, "size": 4, "val": 0xBEEF, "w": 1}, 1,
               want_reply=False, trace=(1 << 40) | 1)
        done = g.recv(10000)
        assert done[0] == "WRITE_DONE" and done[6]["status"] == "ok" and len(done) == 7, done
        seq = g.send("MMIO_READ", {"off": GPR0, "size": 4}, 1, trace=(1 << 40) | 2)
        r = g.recv(10000)
        assert r[0] == "REPLY" and r[2] == seq and r[6] == 0xBEEF
        for role in ("hypervisor", "mediator"):
            assert "gvtbench_trace_spans" not in cluster.metrics(role)
    finally:
        g.close()


# ---- what one peer can make a node hold ------------------------------------------------------------
def _rss_mib(pid: int, c: Cluster | None = None) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS: the hypervisor exited: " + (c.log("hypervisor")[-3000:] if c else ""))


def test_the_worst_guest_makes_the_hypervisor_hold_under_100_mib(short_ipc_dir):
    """Frames of 1 MiB a hypervisor cannot take (its mediator is stopped, so it stops reading
    the guest), and requests with 1 MiB answers the guest never reads: the bounds are bytes
    (64 frames in the socket, the link's window and queue), so the hypervisor's memory grows by
    less than 100 MiB however long the guest goes on. Version 4 held +148 MiB and +188 MiB."""
    c = Cluster(Path(short_ipc_dir))
    try:
        g = c.guest(1)
        g.s.setsockopt(zmq.SNDTIMEO, 1000)
        hv = c.procs["hypervisor"].pid
        med = c.procs["mediator"].pid
        base = _rss_mib(hv)
        os.kill(med, signal.SIGSTOP)
        try:
            small = {"off": GPR0.to_bytes(4, "little") * 4096, "size": bytes([4]) * 4096,
                     "val": (1).to_bytes(8, "little") * 4096}
            for w in range(1, 41):              # the hypervisor takes half its bound, then stops
                g.send("MMIO_WRITE_BATCH", {**small, "w": w}, 1, want_reply=False)
            n = 78_000                          # 13 bytes a write: a frame just under 1 MiB
            big = {"off": GPR0.to_bytes(4, "little") * n, "size": bytes([4]) * n,
                   "val": (1).to_bytes(8, "little") * n}
            sent = 0
            for w in range(41, 341):            # 300 MiB offered
                try:
                    g.send("MMIO_WRITE_BATCH", {**big, "w": w}, 1, want_reply=False)
                    sent += 1
                except zmq.Again:
                    break                       # the sockets are full: the guest waits
            time.sleep(1.0)
            held = _rss_mib(hv, c) - base
            print(f"posted: {held:.1f} MiB held after {sent} frames")
            assert held < 100, f"the hypervisor holds {held:.0f} MiB more after {sent} MiB frames"
        finally:
            os.kill(med, signal.SIGCONT)
        g.close()
        # requests whose answers are 1 MiB each, never read nor acked
        r = c.peer("hypervisor", "guest2")
        assert r.hello()[0] == "REPLY"
        r.s.setsockopt(zmq.SNDTIMEO, 1000)
        base = _rss_mib(hv)
        ops = [[k * 4096, 4096] for k in range(255)]
        for _ in range(400):                    # 400 MiB of answers asked for
            try:
                r.send("GPA_READ", {"ops": ops}, 2)
            except zmq.Again:
                break
        time.sleep(2.0)
        held = _rss_mib(hv, c) - base
        print(f"answers: {held:.1f} MiB held")
        assert held < 100, f"the hypervisor holds {held:.0f} MiB more for answers never read"
        assert c.alive("hypervisor")
        r.close()
    finally:
        c.close()
