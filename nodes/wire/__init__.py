"""The wire: one msgpack document per ZeroMQ frame, an envelope around every message."""
from nodes.wire.codec import (  # noqa: F401
    KINDS, MAX_FRAME, PROTOCOL_VERSION, Envelope, RemoteError, WireError, decode, encode,
    encode_error, encode_reply,
)
