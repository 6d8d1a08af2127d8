"""Malformed frames, protocol mismatches and bad payloads, sent to each role's real process."""
import msgpack
import pytest

from wireclient import RawPeer, start_node, stop

ROLE_ARGS = {
    "gpu": [],
    "mediator": ["--peer", "gpu=ipc:///tmp/gvtt-nobody-gpu"],
    "hypervisor": ["--peer", "mediator=ipc:///tmp/gvtt-nobody-med"],
    "guest": ["--peer", "hypervisor=ipc:///tmp/gvtt-nobody-hv", "--vm", "1"],
}


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[vgpus]\ncount = 1\nram_mib = 4\n")
    return p


@pytest.mark.parametrize("role", list(ROLE_ARGS))
def test_node_survives_bad_frames(role, cfg_file, short_ipc_dir):
    ep = f"ipc://{short_ipc_dir}/n"
    proc = start_node(role, cfg_file, ep, *ROLE_ARGS[role])
    peer = RawPeer(ep)
    try:
        # before HELLO: refused, with the reason
        r = peer.call("STATS")
        assert r[0] == "ERROR" and r[6]["code"] == "EPROTO" and "HELLO" in r[6]["text"]
        # protocol version mismatch is refused with both versions named
        r = peer.hello(version=99)
        assert r[0] == "ERROR" and r[6]["code"] == "EPROTO" and "99" in r[6]["text"]
        r = peer.hello()
        assert r[0] == "REPLY" and r[6]["version"] == 1
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
        # oversized
        r = peer.raw(msgpack.packb(("MMIO_WRITE", 99, 0, 0, 0, 1, b"x" * (33 << 20))))
        assert r[0] == "ERROR" and r[6]["code"] == "EMSGSIZE"
        # a known kind with a bad payload
        r = peer.call("MMIO_READ", {"off": "zero", "size": 4})
        assert r[0] == "ERROR" and r[6]["code"] in ("EINVAL", "ENOTSUP", "EPERM")
        # and the node still serves, and counted what it refused
        r = peer.call("STATS")
        assert r[0] == "REPLY"
        bad = r[6]["runtime"]["gvtbench_bad_frames"]["rows"]
        assert sum(v for _labels, v in bad) >= 5
        assert proc.poll() is None
    finally:
        peer.close()
        stop(proc)


def test_gpu_serves_mmio_and_refuses_bad_accesses(cfg_file, short_ipc_dir):
    ep = f"ipc://{short_ipc_dir}/g"
    proc = start_node("gpu", cfg_file, ep)
    peer = RawPeer(ep)
    try:
        assert peer.hello()[0] == "REPLY"
        gtt = 8 << 20
        assert peer.call("MMIO_WRITE", {"off": gtt + 8 * 5, "size": 8, "val": 0x1234001})[0] == "REPLY"
        assert peer.call("MMIO_READ", {"off": gtt + 8 * 5, "size": 8})[6] == 0x1234001
        r = peer.call("MMIO_READ", {"off": 3 << 20, "size": 4})       # the hole
        assert r[0] == "ERROR" and r[6]["code"] == "EFAULT"
        r = peer.call("MMIO_READ", {"off": 2, "size": 4})             # misaligned
        assert r[0] == "ERROR" and r[6]["code"] == "EINVAL"
        r = peer.call("GM_WRITE", {"ops": [[7 << 12, b"abc"]]})        # entry not present
        assert r[0] == "ERROR" and r[6]["code"] == "EFAULT"
    finally:
        peer.close()
        stop(proc)
