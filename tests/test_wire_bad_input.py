"""Malformed frames, protocol mismatches and bad payloads, sent to each role's real process by a
raw peer that speaks the wire by hand. The node answers with the reason, counts what it refused
(on /metrics) and keeps serving."""
import subprocess
import sys

import msgpack
import pytest

from nodes.wire.codec import PROTOCOL_VERSION
from wireclient import RawPeer, free_port, metric, scrape, start_node, stop, wait_for

# the name a raw peer may take towards each role (nodes.wire.schema.CONNECTS_TO), and a request
# kind that peer may send with a bad payload
ROLE_ARGS = {
    "gpu": ([], "mediator", "MMIO_READ"),
    "mediator": (["--peer", "gpu=ipc:///tmp/gvtt-nobody-gpu"], "hypervisor", "TRAP_READ"),
    "hypervisor": (["--peer", "mediator=ipc:///tmp/gvtt-nobody-med"], "guest1", "MMIO_READ"),
}


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[vgpus]\ncount = 1\nram_mib = 4\n")
    return p


def test_a_guest_binds_nothing(cfg_file, short_ipc_dir):
    """Nobody connects to a guest (CONNECTS_TO): it opens no socket a peer could reach, and a
    --bind for one is refused with the reason rather than ignored."""
    r = subprocess.run([sys.executable, "-m", "bench.cli", "node", "guest", "--config", str(cfg_file),
                        "--bind", f"ipc://{short_ipc_dir}/g", "--vm", "1",
                        "--peer", "hypervisor=ipc:///tmp/gvtt-nobody-hv"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "binds nothing" in r.stderr + r.stdout


@pytest.mark.parametrize("role", list(ROLE_ARGS))
def test_node_survives_bad_frames(role, cfg_file, short_ipc_dir, tmp_path):
    args, name, kind = ROLE_ARGS[role]
    ep = f"ipc://{short_ipc_dir}/n"
    port = free_port()
    proc = start_node(role, cfg_file, ep, *args, metrics_port=port, log=tmp_path / "node.log")
    # a guest talks to the hypervisor's endpoint for its VM
    peer = RawPeer(ep + (".vm1" if role == "hypervisor" else ""), name)
    try:
        # before HELLO: refused, with the reason
        r = peer.call("MMIO_READ", {"off": 0, "size": 4})
        assert r[0] == "ERROR" and r[6]["code"] == "EPROTO" and "HELLO" in r[6]["text"]
        # protocol version mismatch is refused with both versions named
        r = peer.hello(version=99)
        assert r[0] == "ERROR" and r[6]["code"] == "EPROTO" and "99" in r[6]["text"]
        r = peer.hello()
        assert r[0] == "REPLY" and r[6]["version"] == PROTOCOL_VERSION and r[6]["max_frame"] == 1 << 20
        # not msgpack
        r = peer.raw(b"\xc1\xc1 definitely not msgpack")
        assert r[0] == "ERROR" and r[6]["code"] == "EBADMSG"
        # msgpack, but not an envelope
        r = peer.raw(msgpack.packb({"hello": 1}))
        assert r[0] == "ERROR" and r[6]["code"] == "EBADMSG"
        # wrong field types
        r = peer.raw(msgpack.packb(("MMIO_READ", "one", 0, 0, 0, 1, {})))
        assert r[0] == "ERROR" and r[6]["code"] == "EBADMSG"
        # unknown kind
        r = peer.call("FROBNICATE", {})
        assert r[0] == "ERROR" and r[6]["code"] == "EPROTO" and "FROBNICATE" in r[6]["text"]
        if kind:
            # a known kind with a bad payload: refused naming the field
            r = peer.call(kind, {"off": "zero", "size": 4}, vgpu=1)
            assert r[0] == "ERROR" and r[6]["code"] == "EINVAL" and "'off'" in r[6]["text"]
            # a kind this peer's role may not send
            r = peer.call("GGTT_DUMP", {"start": 0, "count": 1})
            assert r[0] == "ERROR" and r[6]["code"] == "EPERM"
        # and the node still serves, and counted what it refused
        text = wait_for(lambda: (t := scrape(port)) and metric(t, "gvtbench_bad_frames_total") >= 4 and t,
                        10, "the bad frames to be counted")
        assert metric(text, "gvtbench_bad_frames_total", reason="EBADMSG") >= 3
        assert metric(text, "gvtbench_bad_frames_total", reason="version") == 1
        if kind:
            assert metric(text, "gvtbench_bad_frames_total", reason="EINVAL") == 1
            assert metric(text, "gvtbench_refused_messages_total", kind="GGTT_DUMP", code="EPERM") == 1
        assert proc.poll() is None
    finally:
        peer.close()
        stop(proc)


def test_a_guest_uses_only_its_own_vms_endpoint(cfg_file, short_ipc_dir, tmp_path):
    cfg_file.write_text("[vgpus]\ncount = 2\nram_mib = 4\n")
    ep = f"ipc://{short_ipc_dir}/hv"
    proc = start_node("hypervisor", cfg_file, ep, "--peer", "mediator=ipc:///tmp/gvtt-nobody-med",
                      log=tmp_path / "hv.log")
    try:
        for endpoint, name in ((ep, "guest1"), (ep + ".vm2", "guest1"), (ep + ".vm1", "guest2")):
            p = RawPeer(endpoint, name)
            r = p.hello()
            p.close()
            assert r[0] == "ERROR" and r[6]["code"] == "EPERM", (endpoint, name, r)
        p = RawPeer(ep + ".vm2", "guest2")
        assert p.hello()[0] == "REPLY"
        p.close()
    finally:
        stop(proc)


def test_gpu_serves_mmio_and_refuses_bad_accesses(cfg_file, short_ipc_dir, tmp_path):
    ep = f"ipc://{short_ipc_dir}/g"
    proc = start_node("gpu", cfg_file, ep, log=tmp_path / "gpu.log")
    peer = RawPeer(ep, "mediator")
    try:
        assert peer.hello()[0] == "REPLY"
        gtt = 8 << 20
        assert peer.call("MMIO_WRITE", {"off": gtt + 8 * 5, "size": 8, "val": 0x1234001})[0] == "REPLY"
        assert peer.call("MMIO_READ", {"off": gtt + 8 * 5, "size": 8})[6] == 0x1234001
        r = peer.call("MMIO_READ", {"off": 3 << 20, "size": 4})       # the hole
        assert r[0] == "ERROR" and r[6]["code"] == "EFAULT"
        r = peer.call("MMIO_READ", {"off": 2, "size": 4})             # misaligned
        assert r[0] == "ERROR" and r[6]["code"] == "EINVAL"
        r = peer.call("MMIO_READ", {"off": 0, "size": 4}, vgpu=7)      # not a vGPU of the run
        assert r[0] == "ERROR" and r[6]["code"] == "ENODEV"
    finally:
        peer.close()
        stop(proc)
