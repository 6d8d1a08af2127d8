"""The wire package on its own: the envelope codec, one schema per kind (its compiled checks and
the explanation of a failure), the role table, and links' sequence numbers and counts."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.errors import GvtError, WireError
from nodes.wire.codec import MAX_FRAME, decode, encode, encode_error, encode_reply
from nodes.wire import linkproto
from nodes.wire.link import Link, SendFailed
from nodes.wire.schema import CONTROL_KINDS, KINDS, Kind, may_send, role_of, unpack_write_batch


def frame(kind, payload, seq=1, reply_to=0, vgpu=0, ts=0, flags=1):
    return msgpack.packb((kind, seq, reply_to, vgpu, ts, flags, payload), use_bin_type=True)


def refused(f: bytes) -> WireError:
    with pytest.raises(WireError) as e:
        decode(f)
    return e.value


def test_a_good_frame_decodes():
    env = decode(encode("MMIO_READ", 7, 0, 1, 123, 1, {"off": 0x2600, "size": 4}))
    assert (env.kind, env.seq, env.vgpu, env.ts, env.wants_reply) == ("MMIO_READ", 7, 1, 123, True)
    assert env.payload == {"off": 0x2600, "size": 4}


@pytest.mark.parametrize("f,code,words", [
    (b"\xc1", "EBADMSG", "not msgpack"),
    (msgpack.packb([1, 2, 3]), "EBADMSG", "7 fields"),
    (frame("MMIO_READ", {}, seq=0), "EBADMSG", "seq"),
    (frame("MMIO_READ", {}, vgpu=-1), "EBADMSG", "vgpu"),
    (frame("MMIO_READ", {}, vgpu=1 << 32), "EBADMSG", "vgpu"),
    (frame("MMIO_READ", {}, flags=2), "EBADMSG", "flags bit 1 (traced) needs an 8th field"),
    (frame("MMIO_READ", {}, flags=4), "EBADMSG", "flags must be an integer in 0..3"),
    (msgpack.packb(("MMIO_READ", 1, 0, 0, 0, 3, {}, 0)), "EBADMSG", "trace: an integer in 1..2**64-1"),
    (msgpack.packb(("MMIO_READ", 1, 0, 0, 0, 3, {}, "t1")), "EBADMSG", "needs an 8th field, trace"),
    (msgpack.packb(("MMIO_READ", 1, 0, 0, 0, 3, {}, -1)), "EBADMSG", "needs an 8th field, trace"),
    (msgpack.packb(("MMIO_READ", 1, 0, 0, 0, 1, {}, 5)), "EBADMSG", "only with flags bit 1"),
    (msgpack.packb(("MMIO_READ", 1, 0, 0, 0, 3, {}, 5, 6)), "EBADMSG", "or 8 with trace"),
    (frame("MMIO_READ", {}, ts=True), "EBADMSG", "ts_ns"),
    (frame(7, {}), "EBADMSG", "kind"),
    (frame("NOPE", {}), "EPROTO", "NOPE"),
    (frame("REPLY", 1, reply_to=0), "EBADMSG", "reply_to"),
    (frame("MMIO_READ", {"off": 1}), "EINVAL", "'size'"),
    (frame("MMIO_READ", {"off": 1 << 32, "size": 4}), "EINVAL", "'off' must be u32, got the integer 4294967296"),
    (frame("MMIO_READ", {"off": True, "size": 4}), "EINVAL", "'off' must be u32, got bool"),
    (frame("MMIO_READ", {"off": 1, "size": 4, "x": 1}), "EINVAL", "unknown fields ['x']"),
    (frame("MMIO_READ", [1, 4]), "EINVAL", "must be a map"),
    (frame("STATS", {}), "EINVAL", "no payload"),
    (frame("GFN_PIN", {"gfns": b"\0" * 7}), "EINVAL", "'gfns' must be u64s"),
    (frame("GPA_READ", {"ops": [[0, "x"]]}), "EINVAL", "list[u64,u32]"),
    (frame("HELLO", {"name": "g" * 65, "role": "guest", "version": 2}), "EINVAL", "longer than 64"),
    (frame("ERROR", {"code": "EIO"}, reply_to=1), "EINVAL", "'text'"),
])
def test_a_bad_frame_is_refused_naming_what_is_wrong(f, code, words):
    err = refused(f)
    assert err.code == code and words in err.text, err.text


def test_a_traced_frame_carries_its_id_and_an_untraced_one_none():
    f = encode("MMIO_READ", 7, 0, 1, 123, 1, {"off": 0x2600, "size": 4}, trace=(1 << 40) | 9)
    doc = msgpack.unpackb(f)
    assert len(doc) == 8 and doc[5] == 3 and doc[7] == (1 << 40) | 9    # bit 1 set, id 8th
    env = decode(f)
    assert env.trace == (1 << 40) | 9 and env.wants_reply and env.payload["off"] == 0x2600
    plain = encode("MMIO_READ", 7, 0, 1, 123, 1, {"off": 0x2600, "size": 4})
    assert len(msgpack.unpackb(plain)) == 7 and decode(plain).trace == 0
    # the largest id fits; a posted traced message keeps bit 0 clear
    top = decode(encode("MMIO_WRITE", 1, 0, 1, 0, 0, {"off": 0, "size": 4, "val": 1}, trace=(1 << 64) - 1))
    assert top.trace == (1 << 64) - 1 and not top.wants_reply


def test_an_oversized_frame_is_emsgsize():
    assert refused(b"x" * (MAX_FRAME + 1)).code == "EMSGSIZE"


def test_a_reply_payload_is_checked_against_the_request_kind():
    spec = KINDS["GFN_PIN"]
    assert spec.validate_reply({"mfns": b"\0" * 8}) == {"mfns": b"\0" * 8}
    with pytest.raises(GvtError) as e:
        spec.validate_reply({"mfns": 5})
    assert e.value.code == "EINVAL" and "'mfns'" in e.value.text
    with pytest.raises(GvtError) as e:
        KINDS["MMIO_READ"].validate_reply("zero")
    assert e.value.code == "EPROTO" and "u64" in e.value.text
    assert decode(encode_reply(1, 5, 0, 0, {"any": "thing"})).payload == {"any": "thing"}
    assert decode(encode_error(1, 5, 0, 0, "EIO", "x" * 10_000)).payload["text"] == "x" * 4096


_values = st.one_of(st.none(), st.booleans(), st.integers(-2, 1 << 65), st.binary(max_size=17),
                    st.text(max_size=5), st.lists(st.integers(0, 9), max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(k for k in KINDS if KINDS[k].fields)),
       st.dictionaries(st.sampled_from(["off", "size", "val", "w", "gfns", "ops", "name", "role",
                                        "version", "x", "nonce", "page", "report", "start", "count",
                                        "first", "last", "n", "status", "n_errors", "errors"]),
                       _values, max_size=6))
def test_compiled_checks_agree_with_the_generic_ones(name, payload):
    kind = KINDS[name]
    def outcome(fn):
        try:
            fn(payload)
            return "ok"
        except GvtError as e:
            return e.code
    assert outcome(kind.validate) == outcome(lambda p: Kind.validate(kind, p))


def test_the_role_table():
    assert all(all(s == "launcher" for s, _ in KINDS[k].routes) for k in CONTROL_KINDS)
    assert {"STATS", "SHUTDOWN", "START", "GGTT_DUMP", "GM_WRITE"} <= CONTROL_KINDS
    assert "VGPU_RESET" not in CONTROL_KINDS     # the hypervisor sends it for a VM_RESET
    assert may_send(KINDS["MMIO_READ"], "guest", "hypervisor")
    assert not may_send(KINDS["GFN_PIN"], "guest", "hypervisor")
    assert not may_send(KINDS["TRAP_WRITE"], "guest", "mediator")
    assert role_of("guest12") == ("guest", 12)
    for bad in ("guest", "guest0", "guest01", "gpu2", "", "x"):
        with pytest.raises(GvtError):
            role_of(bad)


def test_write_batch_fields_must_be_as_many():
    with pytest.raises(GvtError) as e:
        unpack_write_batch({"off": b"\0" * 8, "size": b"\4", "val": b"\0" * 8})
    assert e.value.code == "EINVAL" and "2, 1 and 1" in e.value.text


def test_a_link_numbers_and_counts_what_went_out():
    """Link around its protocol: numbering, a frame the transport refuses is resent (not lost to
    the layer above), E2BIG and a full link (EAGAIN) leave no number used."""
    out: list[bytes] = []
    refuse = []

    def send(f: bytes) -> None:
        if refuse:
            raise SendFailed(refuse[0], "no")
        out.append(f)
    link = Link("guest1", send, epoch=7)
    assert (link.role, link.vm) == ("guest", 1)
    assert link.send(lambda s: encode("IRQ", s, 0, 1, 0, 0, {}), MAX_FRAME, 5) == 1
    refuse.append("EHOSTUNREACH")
    assert link.send(lambda s: encode("IRQ", s, 0, 1, 0, 0, {}), MAX_FRAME, 6) == 2
    refuse.clear()
    assert link.transport_drops == 1 and len(out) == 1
    link.tick(6 + linkproto.RTO_INIT_NS)             # the timer resends the oldest unacked
    assert [linkproto.unpack(f)[2] for f in out] == [1, 1]
    with pytest.raises(SendFailed) as e:
        link.send(lambda s: b"x" * 100, 50, 8)
    assert e.value.code == "E2BIG" and link.tx_seq == 2
    small = Link("guest1", out.append, epoch=7)
    small.proto.window_bytes = small.proto.queue_bytes = 100
    small.send(lambda s: b"y" * 90, MAX_FRAME, 9)
    small.send(lambda s: b"y" * 90, MAX_FRAME, 9)       # waits for the window
    with pytest.raises(SendFailed) as e:
        small.send(lambda s: b"y" * 90, MAX_FRAME, 9)
    assert e.value.code == "EAGAIN" and small.tx_seq == 2 and small.send_failed == 1
    c = link.counters()
    assert (c["sent"], c["send_failed"], c["transport_drops"], c["tx_seq"], c["retransmits"]) == \
        (2, 1, 1, 2, 1)
    for seq in (1, 2, 3):
        link.note_rx(seq, 10)
    link.note_rx(6, 11, counted=False)
    c = link.counters()
    assert (c["received"], c["gaps"], c["dups"]) == (3, 2, 0)
