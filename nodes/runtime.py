"""The thin runtime shared by every role: ZeroMQ sockets and the poll loop, the HELLO handshake and
the control kinds (STATS, SHUTDOWN), link authentication, heartbeats, and the metrics endpoint.
What a message means is decided by NodeEngine (nodes/engine.py) and the role's core.

Links. Each node binds one ROUTER; it connects one DEALER to each peer it needs and says HELLO
first. On a ROUTER a peer is a link only after its HELLO: its name must be one of this run's node
names whose role connects to this node (nodes.wire.schema.CONNECTS_TO). With CURVE (every tcp
link the launcher makes, or `gvtbench node --keys`), the name comes from the peer's key: each
node accepts only the public keys of the roles that may connect to it, checked by pyzmq's
authenticator, and every frame's User-Id must be its link's name. A peer with no key or a wrong
one never gets past the handshake; that is counted. ipc endpoints must sit in a directory only
this user can enter.

Nodes of one process (a pool of guests; a GPU's host process, run.processes) share one NodeHost:
one context, one poll loop, one ZAP authenticator. A node that connects to an endpoint another
node of its process binds gets a link in memory (MemoryLink through NodeHost.inbox), whose HELLO
runs as above and whose messages then skip ZeroMQ and the link header.

Bounds. Every socket refuses frames over the frame limit (ZMQ_MAXMSGSIZE) and queues at most
frames per peer (RCVHWM in, SNDHWM out); sends never block. Each link runs its LinkProtocol
(nodes/wire/linkproto.py): this loop feeds it what arrives and ticks it when it is due (resends,
acks, heartbeats, liveness); what it finds about its peer (dead, returned, restarted) fails the
calls in flight and, on the side that connects, says HELLO again.
"""
from __future__ import annotations

import ctypes
import gc
import heapq
import os
import select
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from nodes.core import overrides
from nodes.actions import Call
from nodes.engine import NodeEngine
from nodes.errors import GvtError, WireError
from nodes.metrics.export import BuildInfoCollector, LinkCollector, StatsCollector, serve_metrics
from nodes.topology import Topology
from nodes.wire.codec import (
    LINK_SILENT_S, MAX_FRAME, MAX_OUTSTANDING, MAX_POSTED_WRITES, PROTOCOL_VERSION, Envelope,
    decode, encode_error, encode_reply,
)
from nodes.wire.faults import FaultPlan
from nodes.wire.link import Link, MemoryLink, SendFailed
from nodes.wire.linkproto import (
    FLAG_OOB, PeerNewStream, PeerRestarted, PeerReturned, PeerSilent, State, oob_frame, unpack,
)
from nodes.wire.schema import (CONNECTS_TO, STACK_ROLES, canonical, guest_name, key_stem, node_id,
                               node_of_key_stem, parse_node, role_of, split_node)

monotonic_ns = time.monotonic_ns
NOBLOCK = int(zmq.NOBLOCK)         # a plain int: pyzmq's flag enums cost a call each use
SNDMORE_NOBLOCK = int(zmq.NOBLOCK | zmq.SNDMORE)
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
SNDHWM = 10_000                 # frames this node queues to one peer
RCVHWM = 64                     # frames one peer can queue here (<= 64 MiB): past it, it waits
DRAIN_PER_SOCKET = 64           # frames taken from one socket before the next gets its turn...
TURN_NS = 300_000               # ...or this much time, whichever comes first
DRAIN_BUDGET = 256              # frames per loop iteration, across sockets...
LOCAL_QUEUE = 4 * SNDHWM        # frames in flight over in-memory links of one process
LOCAL_ROUNDS = 8                # rounds of in-memory hand-overs per loop iteration
ITERATION_NS = 2_000_000        # ...or this much time: then timers, yielded tasks and the tick
IDLE_WAKE_NS = 100_000_000     # the loop looks around at least this often
STALL_NS = 1_000_000_000        # an iteration this long after the last: the process was stopped
LINK_TICK_NS = 1_000_000        # the links' timers are looked at no more often than this...
LINK_LOOK_NS = 20_000_000       # ...and at least this often
GC_THRESHOLDS = (50_000, 50, 100)      # gen0 allocations, then gen0 and gen1 collections
# why a frame was refused: the codec's WireError codes, then the link checks of _on_frame
BAD_FRAME_REASONS = ("EBADMSG", "EINVAL", "EMSGSIZE", "EPROTO", "version", "auth", "no_hello",
                     "multipart")
LINK_DROP_REASONS = ("restarted", "silent", "replaced")
_HANDSHAKE_EVENTS = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
                     zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
                     zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "other"}


def die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the launcher dies, so no node outlives a crashed run."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)       # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---- keys ----------------------------------------------------------------------------------------
@dataclass
class Keys:
    """CURVE material of one node: its own key pair and every node's public key, by name."""
    public: bytes
    secret: bytes
    peers: dict[str, bytes]

    @classmethod
    def load(cls, directory: str | os.PathLike, name: str) -> "Keys":
        d = Path(directory)
        own = d / f"{key_stem(name)}.key_secret"
        if not own.is_file():
            raise GvtError("ENOENT", f"keys directory {d} has no secret key {own.name} for {name} "
                           f"(make them with `gvtbench keys`)")
        public, secret = zmq.auth.load_certificate(own)
        peers = {}
        for f in sorted(d.glob("*.key")):
            try:
                peer = node_of_key_stem(f.stem)
            except GvtError:
                continue
            peers[peer] = zmq.auth.load_certificate(f)[0]
        return cls(public, secret, peers)


def make_keys(directory: str | os.PathLike, names: Iterable[str]) -> Path:
    """A certificate (NAME.key public, NAME.key_secret secret; NAME the node id with '-' for '/':
    mediator-0.key) per node, in a directory only this user can enter."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for name in names:
        stem = key_stem(name)
        for f in (d / f"{stem}.key", d / f"{stem}.key_secret"):
            f.unlink(missing_ok=True)
        zmq.auth.create_certificates(d, stem)
        os.chmod(d / f"{stem}.key_secret", 0o600)
    return d


class _KeyAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP authenticator, told which public keys may connect to which socket (a ZAP
    domain per socket: `NODE|main`, `NODE|vm<N>`) and whose they are: the User-Id of an
    authenticated connection is the node name of its key. One per process (ZAP is one per
    context), shared by the nodes of a host process."""

    def __init__(self, ctx: zmq.Context):
        super().__init__(ctx)
        self.names_by_key: dict[bytes, str] = {}
        self.rules: dict[str, Callable[[str, str], bool]] = {}   # node -> its _key_allowed

    def callback(self, domain: str, z85_key: bytes) -> bool:
        name = self.names_by_key.get(z85_key)
        node, _, sock = domain.partition("|")
        rule = self.rules.get(node)
        return name is not None and rule is not None and rule(sock, name)

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names_by_key[z85.encode(client_public_key)]


def check_ipc_bind(endpoint: str) -> None:
    """An ipc endpoint must live in a directory that is this user's and closed to others."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://"):]
    if path.startswith("@"):
        raise GvtError("EPERM", f"{endpoint}: abstract ipc sockets have no permissions; use a path "
                       f"in a private directory")
    directory = os.path.dirname(os.path.abspath(path))
    st = os.stat(directory)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise GvtError("EPERM", f"ipc endpoint {endpoint}: its directory {directory} must belong to "
                       f"this user and be closed to others (mode 700, as `mktemp -d` makes it)")


# ---- the runtime ---------------------------------------------------------------------------------
class _Router:
    """A ROUTER this node binds, the peers it accepts, and its links by ZeroMQ identity. A
    hypervisor binds one per VM besides its main one, so it can stop reading a VM's socket
    (backpressure toward that guest alone) and serve VMs in turn."""

    __slots__ = ("sock", "monitor", "endpoint", "vm", "by_ident")

    def __init__(self, sock: zmq.Socket, monitor: zmq.Socket, endpoint: str, vm: int):
        self.sock, self.monitor, self.endpoint, self.vm = sock, monitor, endpoint, vm
        self.by_ident: dict[bytes, Link] = {}


class Runtime:
    """One node: its core, its engine, its sockets and links. It runs on a NodeHost, its own
    (run()) or one it shares with the other nodes of a process (a pool of guests)."""

    def __init__(self, name: str, role: str, core: Any, bind: str | None, *, vgpus: Iterable[int],
                 vm_binds: dict[int, str] | None = None, keys: Keys | None = None,
                 max_frame: int = MAX_FRAME, link_silent_s: float = LINK_SILENT_S,
                 trace_spans: int = 0, faults: FaultPlan | None = None, epoch: int = 0,
                 accepts: frozenset[str] | None = None, host: "NodeHost | None" = None):
        # the node's id (gpu/0 ...: a bare role is GPU 0's), and the GPU it serves (None: the
        # launcher, or a guest, which names its GPU's hypervisor when it connects)
        name = canonical(name)
        self.name, self.role, self.core = name, role, core
        self.gpu = parse_node(name)[1]
        self.peer_ids: dict[str, str] = {}      # link name (a peer of our GPU: its role) -> id
        self.vgpus = frozenset(vgpus)
        self.max_frame = max_frame
        self.keys = keys
        self.dead_ns = int(link_silent_s * 1e9)
        # this incarnation: wall-clock ns at start, so a restarted node's epoch is the larger
        self.epoch = epoch or time.time_ns()
        self.faults = faults
        # the roles that may connect here: this run's (least privilege), else any the protocol allows
        self.accepts = CONNECTS_TO[role] if accepts is None else accepts & CONNECTS_TO[role]
        self.engine = NodeEngine(name, role, core, vgpus=self.vgpus, clock=monotonic_ns,
                                 max_frame=max_frame, trace_spans=trace_spans)
        self.engine.serve(["STATS"], lambda env, now: self.snapshot())
        self.engine.serve(["TRACE_DUMP"], lambda env, now: self.engine.trace_page(env.payload["start"]))
        self.engine.serve(["SHUTDOWN"], self._shutdown)
        st = self.engine.stats
        st.counter("gvtbench_handshake_failures",
                   "Connections refused in the ZeroMQ handshake (no key, a wrong key), by reason",
                   ["reason"])
        st.counter("gvtbench_links_dropped", "Links that lost their peer, by reason (restarted: "
                   "it came back with a new epoch; silent: nothing heard within the liveness "
                   "timeout; replaced: a new incarnation said HELLO)", ["reason"])
        st.counter("gvtbench_disconnects", "Connections to this node's sockets that ended (a peer "
                   "left, or sent a frame over the limit)")
        # every reason is exported from the start at 0, so a rate over a clean run is 0, not absent
        for family, reasons in (("gvtbench_bad_frames", BAD_FRAME_REASONS),
                                ("gvtbench_links_dropped", LINK_DROP_REASONS),
                                ("gvtbench_handshake_failures", tuple(_HANDSHAKE_EVENTS.values()))):
            for reason in reasons:
                st.inc(family, (reason,), 0)
        st.inc("gvtbench_disconnects", (), 0)
        self.host = host if host is not None else NodeHost()
        self.host.add(self)
        self.ctx = self.host.ctx
        self._auth: _KeyAuthenticator | None = None
        # vm -> read its socket now? (None: the core gates no VM)
        self._accepting = core.accepting if overrides(core, "accepting") else None
        self.routers: list[_Router] = []
        if keys is not None and (bind or vm_binds):   # a node that binds nothing checks no keys
            self._auth = self.host.authenticator()
            self._auth.names_by_key.update(
                {pub: n for n, pub in keys.peers.items() if self._may_connect(n)})  # z85 keys
            self._auth.rules[name] = self._key_allowed
        # a node nobody connects to (a guest) binds nothing
        self.routers = [self._bind(bind, 0)] if bind else []
        self.routers += [self._bind(ep, vm) for vm, ep in sorted((vm_binds or {}).items())]
        self.endpoint = self.routers[0].endpoint if self.routers else ""
        self._vm_router = {r.vm: r for r in self.routers if r.vm}
        self._dealers: dict[Any, Link] = {}     # DEALER (or in-memory ident) -> its link
        for r in self.routers:
            self.host.register(r.sock, self, r)
            self.host.register(r.monitor, self, None)
        self._gated: set[int] = set()           # VMs whose socket is not read for now
        self._links_due = 0                     # when a link's timer may next be due
        self._links_touched: set[Link] = set()  # links that sent or received since last looked at
        self._link_heap: list[tuple[int, int, Link]] = []   # (due, id, link), some stale
        self._link_due: dict[Link, int] = {}    # each link's current entry in the heap
        self._links_rescan = 0
        self.wake = 0                           # when this node next has work (NodeHost)
        self._gate_due = 0                      # when the VM gates are looked at next
        self.stopping = False
        self.on_stop: list[Callable[[], None]] = []
        self.metrics_port: int | None = None
        self._http: Any = None

    def _socket(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, SNDHWM)
        s.setsockopt(zmq.RCVHWM, RCVHWM)
        s.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        # tcp: dead connections are found by the kernel's keepalive, not ZMTP heartbeats. The
        # link protocol does liveness itself, and libzmq 4.3's heartbeat timer writes on a
        # connection whose input stopped at the high-water mark, where it asserts and aborts
        # the process (stream_engine_base.cpp: out_event after _io_error): a guest that floods
        # a VM socket the hypervisor has stopped reading could kill it
        s.setsockopt(zmq.TCP_KEEPALIVE, 1)
        s.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 2)
        s.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 2)
        s.setsockopt(zmq.TCP_KEEPALIVE_CNT, 5)
        return s

    def _bind(self, endpoint: str, vm: int) -> _Router:
        sock = self._socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # a peer's connection re-made underneath (a tcp timeout) comes back under its routing id
        # (name and epoch): it takes the old pipe's place, and its link goes on
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self.keys is not None:
            domain = f"{self.name}|" + (f"vm{vm}" if vm else "main")
            sock.zap_domain = domain.encode()
            self._auth.configure_curve_callback(domain, credentials_provider=self._auth)
            sock.curve_server = True
            sock.curve_publickey = self.keys.public
            sock.curve_secretkey = self.keys.secret
        monitor = sock.get_monitor_socket(sum(_HANDSHAKE_EVENTS) | zmq.EVENT_DISCONNECTED)
        check_ipc_bind(endpoint)
        sock.bind(endpoint)
        r = _Router(sock, monitor, sock.getsockopt_string(zmq.LAST_ENDPOINT), vm)
        # a node of this process that connects here gets an in-memory link (connect())
        self.host.binds[endpoint] = self.host.binds[r.endpoint] = (self, r)
        return r

    def _other_gpu(self, name: str) -> int | None:
        """The GPU of `name` when it is a node of another GPU than ours (None: it is not)."""
        role, gpu, _vm = parse_node(name)
        if role in STACK_ROLES and self.gpu is not None and gpu != self.gpu:
            return gpu
        return None

    def _may_connect(self, name: str) -> bool:
        role, vm = role_of(name)
        return (role in self.accepts and (role != "guest" or vm in self.vgpus)
                and self._other_gpu(name) is None)

    def _accepts(self, r: _Router, name: str) -> str | None:
        """Why `name` (an id) may not connect on this socket (None: it may)."""
        role, vm = role_of(name)
        if not self._may_connect(name):
            other = self._other_gpu(name)
            return f"{name} may not connect to {self.name}" + (
                f": it serves GPU {other}, this node GPU {self.gpu}" if other is not None else
                f": VM {vm} is not one of its VMs" if role == "guest" and vm not in self.vgpus else
                ": this run does not need that link" if role in CONNECTS_TO[self.role] else "")
        if r.vm and name != guest_name(r.vm):
            return f"this endpoint of {self.name} is VM {r.vm}'s guest's only"
        if not r.vm and role == "guest" and len(self.routers) > 1:
            return f"{name} connects to its own VM's endpoint of {self.name}, not this one"
        return None

    def _key_allowed(self, domain: str, name: str) -> bool:
        """ZAP: may the holder of `name`'s key connect on the socket of this domain?"""
        vm = int(domain[2:]) if domain.startswith("vm") else 0
        r = next((r for r in self.routers if r.vm == vm), None)
        return r is not None and self._accepts(r, name) is None

    def _max_outstanding(self, name: str) -> int:
        # a guest speaks for its VM; the other roles for every VM of the run
        return MAX_OUTSTANDING * (1 if role_of(name)[0] == "guest" else max(1, len(self.vgpus)))

    # ---- links we open -----------------------------------------------------------------------
    def connect(self, peer: str, endpoint: str, control: bool = False, node: str | None = None) -> Link:
        """A DEALER to a peer's ROUTER; the HELLO runs as a task (hello_task). `peer` is the
        link's name (a node of our own GPU: its role), `node` the peer's id when the name does
        not say it (a guest's hypervisor)."""
        node = canonical(node) if node else self._peer_id(peer)
        local = self.host.binds.get(endpoint)
        if local is not None and local[0] is not self:
            return self._connect_local(peer, node, local, control)
        # The routing id names this incarnation (name and epoch): a connection re-made underneath
        # keeps it, and a restarted node's differs. Who a peer is comes from HELLO (and its key).
        s = self._socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, f"{self.name}/{self.epoch:x}".encode())
        if self.keys is not None:
            server = self.keys.peers.get(node)
            if server is None:
                raise GvtError("ENOENT", f"no public key {key_stem(node)}.key for peer {node}")
            s.curve_serverkey = server
            s.curve_publickey = self.keys.public
            s.curve_secretkey = self.keys.secret
        s.connect(endpoint)

        sent = self.host.sent

        def send(frame: bytes) -> None:
            sent.add(s)             # a send may take the socket's input signal: look at it again
            try:
                s.send(frame, NOBLOCK)
            except zmq.Again:
                raise SendFailed("EAGAIN", f"the queue to {peer} is full") from None
            except zmq.ZMQError as err:
                raise SendFailed("EHOSTUNREACH", f"send to {peer} failed: {err}") from None

        link = self._link(peer, node, send, control=control)
        self.engine.add_link(link)
        self._dealers[s] = link
        self.host.register(s, self, link)
        return link

    def _connect_local(self, peer: str, node: str, local: tuple["Runtime", _Router],
                       control: bool) -> Link:
        """A link to a node of this process (the nodes of a host process): a MemoryLink, whose
        HELLO goes through the link protocol as over a socket and whose messages then are
        handed over in memory (NodeHost.inbox), as kvmgt calls into GVT-g in the one host
        kernel. No key: both ends are this process."""
        target, r = local
        # one per link in the process (a gpu links to each of its GPU's hypervisors)
        ident = f"{self.name}/{self.epoch:x}>{r.endpoint}".encode()
        link = self._link(peer, node, *self.host.pipe(target, r, ident, peer), control=control)
        self.engine.add_link(link)
        self._dealers[ident] = link     # the side that connects (never drained as a socket)
        self.host.local[ident] = (self, link)
        return link

    def _peer_id(self, peer: str) -> str:
        """The id of the peer a link name means: a bare role is our own GPU's node of it."""
        role, gpu, vm, hv = split_node(peer)
        if role in STACK_ROLES and "/" not in peer:
            return node_id(role, self.gpu or 0, 0, hv)
        return node_id(role, gpu or 0, vm, hv)

    def _link(self, peer: str, node: str, send: Callable[[bytes], None],
              hand: Callable[[bytes], None] | None = None, control: bool = False) -> Link:
        """A link to `peer` (its id `node`); with `hand`, one in memory (MemoryLink)."""
        self.peer_ids[peer] = node
        # faults are chosen by the ends' ids (a rule naming a role covers it on every GPU)
        kw: dict[str, Any] = dict(
            control=control, max_outstanding=self._max_outstanding(peer), epoch=self.epoch,
            now=monotonic_ns(), dead_ns=self.dead_ns,
            faults=self.faults.for_link(self.name, node) if self.faults else None)
        link = Link(peer, send, **kw) if hand is None else MemoryLink(peer, send, hand, **kw)
        link.touched = self._links_touched
        self._links_touched.add(link)
        return link

    def hello_task(self, peers: Iterable[str]) -> Iterator[Any]:
        """HELLO to each peer we connected to: the protocol version checked both ways."""
        for peer in peers:
            link = self.engine.links[peer]
            link.proto.hello_sent()
            info = yield Call(peer, "HELLO", self._hello_payload(), timeout=30.0)
            if info["version"] != PROTOCOL_VERSION:
                raise GvtError("EPROTO", f"peer {peer} speaks protocol {info['version']}, this node "
                               f"speaks {PROTOCOL_VERSION}")
            link.version = info["version"]
            if link.proto.state is State.HELLO_SENT:
                link.proto.hello_answered()
        return True

    def _hello_payload(self) -> dict:
        return {"name": self.name, "role": self.role, "version": PROTOCOL_VERSION,
                "max_frame": self.max_frame, "max_outstanding": MAX_OUTSTANDING,
                "max_posted_writes": MAX_POSTED_WRITES}

    # ---- links that connect to us ----------------------------------------------------------------
    def _router_send(self, r: _Router, ident: bytes, frame: bytes) -> None:
        sock = r.sock
        self.host.sent.add(sock)    # a send may take the socket's input signal: look at it again
        try:
            sock.send(ident, SNDMORE_NOBLOCK)
            sock.send(frame, NOBLOCK)
        except zmq.Again:
            raise SendFailed("EAGAIN", "the peer's queue is full") from None
        except zmq.ZMQError as err:     # not connected now: the protocol resends, or liveness ends it
            raise SendFailed("EHOSTUNREACH", f"the peer is not connected ({err})") from None

    def _check_version(self, env: Envelope, again: bool) -> None:
        v = env.payload["version"]
        if v != PROTOCOL_VERSION:
            self._count_bad("version")
            raise GvtError("EPROTO", f"protocol version mismatch: peer speaks {v}, {self.name} "
                           f"speaks {PROTOCOL_VERSION}" + (" (this link keeps its version)" if again else ""))

    def _on_hello(self, r: _Router, ident: bytes, env: Envelope, uid: str | None, epoch: int,
                  now: int) -> Link:
        """The HELLO of a connection this node has no link for: a new link (not yet fed the
        frame), or a refusal. A name already linked is taken over only by a later epoch (the
        node restarted); its old link's calls fail."""
        p = env.payload
        self._check_version(env, False)
        name = canonical(p["name"])
        role, _vm = role_of(name)
        if uid is not None and name != uid:
            raise GvtError("EPERM", f"this connection's key is {uid}'s; it cannot speak as {name}")
        if p["role"] != role:
            raise GvtError("EINVAL", f"{name} is a {role}, not a {p['role'][:16]}")
        refusal = self._accepts(r, name)
        if refusal:
            raise GvtError("EPERM", refusal)
        local = name if self.gpu is None else Topology.local_name(self.name, name)
        old = self.engine.links.get(local)
        if old is not None:
            if old in self._dealers.values() or epoch <= old.proto.peer_epoch:
                raise GvtError("EEXIST", f"a peer named {name} is linked already (epoch "
                               f"{old.proto.peer_epoch:x}; a restarted node says HELLO with a "
                               f"later one)")
            self._drop(old, "replaced", now)
        near = self.host.local.get(ident)
        if near is not None:                # a node of this process: answered in memory
            link = self._link(local, name, *self.host.pipe(near[0], None, ident, name))
        else:
            link = self._link(local, name, lambda frame: self._router_send(r, ident, frame))
        link.version = p["version"]
        r.by_ident[ident] = link
        self.engine.add_link(link)
        return link

    def _reply_hello(self, link: Link, env: Envelope, now: int) -> None:
        link.note_rx(env.seq, now)
        try:
            link.send(lambda s: encode_reply(s, env.seq, 0, now, self._hello_payload()), self.max_frame, now)
        except SendFailed:
            pass                        # full: the peer says HELLO again

    def _drop(self, link: Link, reason: str, now: int) -> None:
        for r in self.routers:
            for ident, l in list(r.by_ident.items()):
                if l is link:
                    del r.by_ident[ident]
        if self.engine.links.get(link.name) is link:
            self.engine.drop_link(link.name, now, reason)
        link.proto.close()
        self.engine.stats.inc("gvtbench_links_dropped", (reason,))

    def _link_events(self, link: Link, events: list, now: int) -> None:
        """What the protocol found: a restarted or silent peer loses what was in flight; one that
        returns or restarted is welcomed with a new HELLO (from the side that connects; the other
        side takes a returned peer back as it was: same epoch, its name already checked)."""
        for ev in events:
            # a line in the node's log for each: what a user reads when a run fails on a link
            print(f"gvtbench {self.name}: link {link.name}: {_describe(ev)}", file=sys.stderr,
                  flush=True)
            if isinstance(ev, PeerRestarted):
                why = f"restarted (epoch {ev.old_epoch:x} -> {ev.new_epoch:x})"
                self.engine.link_lost(link.name, why, now, event="")
                link.new_incarnation()
                self.engine.stats.inc("gvtbench_links_dropped", ("restarted",))
                if link in self._dealers.values():
                    self.spawn(self.hello_task([link.name]))
                # after the new HELLO went: what the core sends to recover follows it
                self.engine.peer_event(link.name, link.role, "restarted", why, now)
            elif isinstance(ev, PeerSilent):
                self.engine.link_lost(link.name, f"went silent for {ev.silent_ns / 1e9:.1f} s"
                                      if ev.why == "silent" else "acked nothing through "
                                      "repeated resends", now)
                self.engine.stats.inc("gvtbench_links_dropped", ("silent",))
            elif isinstance(ev, PeerNewStream):
                self.engine.peer_event(link.name, link.role, "new_stream",
                                       "gave up what it had in flight to us", now)
            elif isinstance(ev, PeerReturned):
                if link in self._dealers.values():
                    self.spawn(self.hello_task([link.name]))
                else:
                    link.proto.hello_accepted()
                self.engine.peer_event(link.name, link.role, "returned", "heard again", now)

    def _tick_links(self, now: int) -> None:
        """The links' timers: each link's next one (resend, ack, heartbeat, liveness, a frame the
        fault plan holds back) sits in a heap, put there again whenever the link sent, received
        or was ticked, so only the links that are due are looked at (a hypervisor has a link per
        VM). Acks and resends wait LINK_TICK_NS at most past their time, and go together; held
        frames go at their own time, to the microsecond: the plan adds the delay it states."""
        touched = self._links_touched
        if now >= self._links_rescan:       # a safety net under the touched links
            touched.update(self.engine.links.values())
            self._links_rescan = now + LINK_LOOK_NS
        heap, dues = self._link_heap, self._link_due
        if touched:
            # a link's entry may be early (its timer moved later since: it is looked at for
            # nothing and put back), never late: only a timer that moved earlier is pushed
            for link in touched:
                w = link.next_wake()
                cur = dues.get(link)
                if cur is None or w < cur:
                    dues[link] = w
                    heapq.heappush(heap, (w, id(link), link))
            touched.clear()
            self._links_due = min(self._links_due, max(heap[0][0], now)) if heap else self._links_due
        if now < self._links_due:
            return
        links = self.engine.links
        while heap and heap[0][0] <= now:
            due, _, link = heapq.heappop(heap)
            if dues.get(link) != due:
                continue                    # an older entry of a link put there again since
            if links.get(link.name) is not link:
                del dues[link]              # dropped
                continue
            events = link.tick(now)         # resends, acks, and held frames now due
            if events:
                self._link_events(link, events, now)
            w = link.next_wake()
            dues[link] = w
            heapq.heappush(heap, (w, id(link), link))
        nxt = heap[0][0] if heap else now + LINK_LOOK_NS
        held = any(l.delayed and l.delayed[0][0] == nxt for l in links.values()) \
            if self.faults is not None else False
        self._links_due = nxt if held else max(nxt, now + LINK_TICK_NS)

    def _refuse(self, ident: bytes | None, sock: zmq.Socket, seq: int, code: str, text: str) -> None:
        """An error answer where there is no link (yet) whose sequence numbers to use: a frame
        outside any stream."""
        self._send_oob(ident, sock, encode_error(1, seq or 1, 0, monotonic_ns(), code, text))

    def _send_oob(self, ident: bytes | None, sock: zmq.Socket, body: bytes) -> None:
        frame = oob_frame(self.epoch, body)
        near = self.host.local.get(ident) if ident is not None else None
        if near is not None:
            if len(self.host.inbox) < LOCAL_QUEUE:
                self.host.inbox.append((near[0], None, ident, frame, False))
            return
        self.host.sent.add(sock)
        try:
            if ident is None:
                sock.send(frame, zmq.NOBLOCK)
            else:
                sock.send_multipart((ident, frame), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _count_bad(self, reason: str) -> None:
        self.engine.stats.inc("gvtbench_bad_frames", (reason,))

    # ---- receiving ---------------------------------------------------------------------------
    def _on_frame(self, r: _Router | None, link: Link | None, ident: bytes | None, frame: bytes,
                  uid: str | None, now: int) -> None:
        if link is not None:
            if r is not None and uid is not None and uid != self.peer_ids.get(link.name):
                self._count_bad("auth")     # another key speaking on this link's identity
                self._refuse(ident, r.sock, 0, "EPERM", f"this connection's key is {uid}'s, not "
                             f"{self.peer_ids.get(link.name, link.name)}'s")
                return
            proto = link.proto
            bad = proto.counts["bad"]
            bodies = link.receive(frame, now)   # (the link is touched: its timers are looked at)
            if proto.counts["bad"] != bad:  # malformed; a checksum that fails is the link's count
                self._count_bad("EBADMSG")
            if proto.events:
                self._link_events(link, proto.take_events(), now)
            for body in bodies:
                self._on_message(r, link, ident, body, now)
            return
        # a connection this node has no link for: its first message must be HELLO
        try:
            parts = unpack(frame)
        except WireError as err:
            self._count_bad(err.code)
            self._refuse(ident, r.sock, 0, err.code, err.text)
            return
        epoch, stream, seq, ack, ack_epoch, ack_stream, flags, body = parts
        if flags & FLAG_OOB:
            return                      # a refusal from a peer we do not know: nothing to say
        if ack_epoch and ack_epoch != self.epoch:
            # the stream of a peer that knew an earlier incarnation of this node: not a bad
            # frame, the news that we restarted is what it lacks. The empty frame outside any
            # stream carries our epoch; it fails what it had in flight and says HELLO again
            self.engine.stats.inc("gvtbench_stale_frames")
            self._send_oob(ident, r.sock, b"")
            return
        if not seq:
            # an ack (a heartbeat) from a peer that knows a link we do not have: this node
            # restarted. An empty frame outside any stream tells it so (it carries our epoch)
            self._send_oob(ident, r.sock, b"")
            return
        try:
            env = decode(body, self.max_frame)
        except WireError as err:
            self._count_bad(err.code)
            self._refuse(ident, r.sock, err.seq, err.code, err.text)
            return
        if env.kind != "HELLO" and ack_epoch == self.epoch:
            # a frame of a stream that knows this incarnation and overtook its HELLO (the
            # network reordered them, or dropped the HELLO): resent once the HELLO opened it
            self.engine.stats.inc("gvtbench_early_frames")
            return
        if env.kind != "HELLO":
            self._count_bad("no_hello")
            self._refuse(ident, r.sock, env.seq, "EPROTO",
                         f"{env.kind} before HELLO: say HELLO with protocol version first")
            return
        try:
            if env.seq != seq:
                raise GvtError("EPROTO", f"the envelope's seq {env.seq} is not the link header's {seq}")
            link = self._on_hello(r, ident, env, uid, epoch, now)
        except GvtError as err:
            self.engine.stats.inc("gvtbench_refused_messages", ("?", "HELLO", err.code))
            self._refuse(ident, r.sock, env.seq, err.code, err.text)
            return
        link.proto.start_at(epoch, stream, seq)      # the stream starts at its HELLO
        link.proto.receive_parts(*parts, now)       # its ack; the HELLO itself is answered below
        link.proto.hello_accepted()
        self._reply_hello(link, env, now)

    def _on_message(self, r: _Router | None, link: Link, ident: bytes | None, body: bytes,
                    now: int) -> None:
        try:
            env = decode(body, self.max_frame)
        except WireError as err:
            self._count_bad(err.code)
            link.note_rx(err.seq or link.rx_seq + 1, now)
            self.engine.send_error(link, Envelope("?", err.seq or 1, 0, 0, 0, 1, None), err)
            return
        if env.kind == "HELLO":
            if r is None:               # only the side that connects says HELLO
                self._count_bad("EPROTO")
                link.note_rx(env.seq, now)
                self.engine.send_error(link, env, GvtError("EPROTO", "HELLO comes from the side "
                                                            "that connects"))
                return
            try:                        # HELLO again on a live link: answered again
                self._check_version(env, True)
                link.proto.hello_accepted()
                self._reply_hello(link, env, now)
            except GvtError as err:
                self.engine.stats.inc("gvtbench_refused_messages", ("?", "HELLO", err.code))
                link.note_rx(env.seq, now)
                self.engine.send_error(link, env, err)
            return
        if env.kind == "HEARTBEAT":     # version 4's keep-alive: the protocol's acks do this now
            link.note_rx(env.seq, now, counted=False)
            return
        self.engine.deliver(link, env, now)

    def _drain_router(self, r: _Router, budget: int, deadline: int) -> int:
        """recv of zmq.Frames, whose `more` is read without a getsockopt: the hot path of every
        node (about 2 µs a message against 6 µs with the rcvmore attribute). With CURVE, the
        body frame carries the User-Id the authenticator gave the connection."""
        sock = r.sock
        recv = sock.recv
        curve = self.keys is not None
        gate = self._accepting if r.vm else None
        host = self.host
        for n in range(budget):
            # the first recv without asking (the host saw input); then NodeHost.take_more
            if n and not host.take_more(sock, n):
                return n
            try:
                head = recv(NOBLOCK, copy=False)
            except zmq.Again:
                return n
            ident = head.bytes
            body = recv(NOBLOCK, copy=False) if head.more else None
            if body is None or body.more:
                while body is not None and body.more:
                    body = recv(NOBLOCK, copy=False)
                self._count_bad("multipart")
                self._refuse(ident, sock, 0, "EBADMSG", "one frame per message")
                continue
            now = monotonic_ns()
            self._on_frame(r, r.by_ident.get(ident), ident, body.bytes,
                           body.get("User-Id") if curve else None, now)
            if gate is not None and not gate(r.vm):
                self._gated.add(r.vm)       # as in drain_socket: read again once it takes more
                self.host.pause(sock)
                return n + 1
            if now >= deadline:
                return n + 1
        return budget

    def _drain_dealer(self, sock: zmq.Socket, budget: int, deadline: int) -> int:
        link = self._dealers[sock]
        recv = sock.recv
        host = self.host
        for n in range(budget):
            if n and not host.take_more(sock, n):     # as in _drain_router
                return n
            try:
                frame = recv(NOBLOCK, copy=False)
            except zmq.Again:
                return n
            if frame.more:
                while frame.more:
                    frame = recv(NOBLOCK, copy=False)
                self._count_bad("multipart")
                continue
            now = monotonic_ns()
            self._on_frame(None, link, None, frame.bytes, None, now)
            if now >= deadline:
                return n + 1
        return budget

    def _drain_monitor(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                ev = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            reason = _HANDSHAKE_EVENTS.get(ev["event"])
            if reason:
                self.engine.stats.inc("gvtbench_handshake_failures", (reason,))
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                self.engine.stats.inc("gvtbench_disconnects")

    def _gate(self) -> None:
        """Read again the socket of a VM its core stopped taking frames from (drain_socket paused
        it: backpressure toward that guest alone, ZeroMQ holds its frames, then its sends wait),
        once the core takes more. Only the paused VMs are looked at, every LINK_TICK_NS at most."""
        if not self._gated:
            return
        now = monotonic_ns()
        if now < self._gate_due:
            return
        self._gate_due = now + LINK_TICK_NS
        for vm in [vm for vm in self._gated if self._accepting(vm)]:
            self._gated.discard(vm)
            self.host.resume(self._vm_router[vm].sock)

    def drain_socket(self, sock: zmq.Socket, kind: Any, take: int, deadline: int) -> int:
        """Up to `take` frames from one of this node's sockets (NodeHost._drain decides turns)."""
        if kind is None:
            self._drain_monitor(sock)
            return 0
        if type(kind) is _Router:
            if kind.vm and self._accepting is not None and not self._accepting(kind.vm):
                # that VM has enough waiting: leave the rest queued, and stop reading its
                # socket until _gate() finds the VM taking work again
                self._gated.add(kind.vm)
                self.host.pause(sock)
                return 0
            return self._drain_router(kind, take, deadline)
        return self._drain_dealer(sock, take, deadline)

    def stalled(self, now: int) -> None:
        """The process ran not at all for STALL_NS or more: every link's timers now, before
        what arrived meanwhile is read (see NodeHost.run)."""
        self._links_touched.update(self.engine.links.values())
        self._links_due = 0
        self._tick_links(now)
        self.wake = 0

    def step(self, now: int) -> None:
        """After a drain: the engine's tasks and tick, the links' timers, the VM gates; then
        when this node next has work."""
        engine = self.engine
        engine.step(now)
        now = monotonic_ns()
        self._tick_links(now)
        self._gate()
        w = engine.next_wake(now)
        self.wake = self._links_due if w is None else min(w, self._links_due)
        if self._gated:                 # a paused VM is looked at again soon
            self.wake = min(self.wake, self._gate_due)

    # ---- control ------------------------------------------------------------------------------
    def _shutdown(self, env: Envelope, now: int) -> bool:
        self.stopping = True
        return True

    # ---- loop ---------------------------------------------------------------------------------
    def spawn(self, task: Any) -> None:
        self.engine.sched.spawn(task, monotonic_ns())
        self.wake = 0

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Run this node (on its host, with any others there) until it stops or `until()`."""
        self.host.run(until)

    def stop(self) -> None:
        """The node's own clean-up once it stopped: its on_stop hooks (each runs once)."""
        hooks, self.on_stop = self.on_stop, []
        for fn in hooks:
            try:
                fn()
            except Exception:
                pass

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._auth is not None:
            self._auth.rules.pop(self.name, None)
            self._auth = None
        for r in self.routers:
            r.sock.disable_monitor()
        self.host.forget(self)

    # ---- observability -----------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The engine's snapshot, its links keyed by the peers' ids (so that both ends of a
        link can be matched across GPUs)."""
        snap = self.engine.snapshot()
        snap["links"] = {self.peer_ids.get(n, n): v for n, v in snap["links"].items()}
        return snap

    def collectors(self) -> list[Any]:
        """What this node exports: its core's and its engine's families, and its links."""
        return [StatsCollector(self.core.stats), StatsCollector(self.engine.stats),
                LinkCollector(lambda: self.engine.links, lambda: self.engine.sched.pending_calls)]

    def serve_metrics(self, addr: str = "127.0.0.1", port: int = 0, translator: str = "") -> int:
        self._http, self.metrics_port = serve_metrics(
            self.collectors() + [BuildInfoCollector(translator)], addr, port)
        return self.metrics_port


def _describe(ev: Any) -> str:
    """A link event as a line of a node's log."""
    if isinstance(ev, PeerRestarted):
        return f"the peer restarted (epoch {ev.old_epoch:x} -> {ev.new_epoch:x}); {ev.lost} bodies lost"
    if isinstance(ev, PeerSilent):
        if ev.why == "silent":
            return f"the peer went silent for {ev.silent_ns / 1e9:.1f} s; {ev.lost} bodies given up"
        return f"the peer acked nothing through repeated resends; {ev.lost} bodies given up"
    if isinstance(ev, PeerReturned):
        return "the peer is heard again"
    return f"the peer gave up what it had in flight to us (new stream {ev.stream})"


class NodeHost:
    """The poll loop of a process: one ZeroMQ context and one select() for every node it runs (one,
    a pool of guests, or a GPU's host process). Each iteration takes frames from the ready
    sockets in turn, then gives each node that got frames, or whose work is due, its step; the
    others are not looked at (a pool of idle guests costs nothing per iteration), save once
    every IDLE_WAKE_NS. What the nodes hand each other in memory is delivered after the steps,
    up to LOCAL_ROUNDS rounds of it before the sockets' next turn, and the nodes it reached
    step once after."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.nodes: list[Runtime] = []
        self.socks: dict[zmq.Socket, tuple[Runtime, Any]] = {}  # -> node, its _Router, Link or None
        self._paused: set[zmq.Socket] = set()
        self._fd_cache: list[int] | None = None
        self._by_fd: dict[int, zmq.Socket] = {}
        # The sockets to look at (ZMQ_EVENTS) before the next sleep: those whose fd signalled,
        # those not read dry, those sent on (a send can take the signal of input that came
        # meanwhile). Any other socket has had no input since it was last looked at: a
        # socket's fd signals every change. A node with many sockets (a hypervisor with one per
        # VM) then looks at a few per iteration, not at all of them twice.
        self.hot: set[zmq.Socket] = set()
        self.sent: set[zmq.Socket] = set()
        # sockets left after their first frame (one_at_a_time), and those that had more then
        self.single: set[zmq.Socket] = set()
        self.busy: set[zmq.Socket] = set()
        self.stopping = False
        # In-memory links between this process's nodes: the endpoints they bind, the side
        # that connected by its routing id, and what is handed over, in order: (to node, its
        # _Router (None: to the side that connected), routing id, frame or body, a body (True)
        # or a frame of the link protocol)
        self.binds: dict[str, tuple[Runtime, _Router]] = {}
        self.local: dict[bytes, tuple[Runtime, Link]] = {}
        self.inbox: deque[tuple[Runtime, _Router | None, bytes, bytes, bool]] = deque()
        self._auth: _KeyAuthenticator | None = None

    def pipe(self, to: Runtime, r: _Router | None, ident: bytes, peer: str
             ) -> tuple[Callable[[bytes], None], Callable[[bytes], None]]:
        """The two ways onto an in-memory link toward node `to` (r: its _Router, None toward
        the side that connected): a frame of the link protocol, and (MemoryLink, once open) a
        body as it is."""
        inbox = self.inbox

        def send(frame: bytes) -> None:
            if len(inbox) >= LOCAL_QUEUE:
                raise SendFailed("EAGAIN", f"the in-memory queue to {peer} is full")
            inbox.append((to, r, ident, frame, False))

        def hand(body: bytes) -> None:
            if len(inbox) >= LOCAL_QUEUE:
                raise SendFailed("EAGAIN", f"the in-memory queue to {peer} is full")
            inbox.append((to, r, ident, body, True))
        return send, hand

    def authenticator(self) -> _KeyAuthenticator:
        """The process's ZAP authenticator, started with its first node that checks keys."""
        if self._auth is None:
            self._auth = _KeyAuthenticator(self.ctx)
            self._auth.start()
        return self._auth

    def add(self, rt: Runtime) -> None:
        self.nodes.append(rt)

    def register(self, sock: zmq.Socket, rt: Runtime, kind: Any) -> None:
        self.socks[sock] = (rt, kind)
        self.hot.add(sock)
        self._fd_cache = None

    def pause(self, sock: zmq.Socket) -> None:
        """Stop reading a socket (a gated VM) until resume()."""
        if sock not in self._paused:
            self._paused.add(sock)
            self._fd_cache = None

    def resume(self, sock: zmq.Socket) -> None:
        if sock in self._paused:
            self._paused.discard(sock)
            self.hot.add(sock)
            self._fd_cache = None

    def forget(self, rt: Runtime) -> None:
        """Close a node's sockets; the context goes with the last node."""
        for sock, (owner, _kind) in list(self.socks.items()):
            if owner is rt:
                del self.socks[sock]
                self.hot.discard(sock)
                self.sent.discard(sock)
                self.single.discard(sock)
                self.busy.discard(sock)
                self._paused.discard(sock)
                sock.close(linger=0)
        self._fd_cache = None
        self.binds = {ep: v for ep, v in self.binds.items() if v[0] is not rt}
        self.local = {i: v for i, v in self.local.items() if v[0] is not rt}
        if rt in self.nodes:
            self.nodes.remove(rt)
        if not self.nodes:
            if self._auth is not None:
                self._auth.stop()
                self._auth = None
            self.ctx.destroy(linger=0)

    @property
    def _fds(self) -> list[int]:
        if self._fd_cache is None:
            self._by_fd = {s.getsockopt(zmq.FD): s for s in self.socks if s not in self._paused}
            self._fd_cache = list(self._by_fd)
        return self._fd_cache

    def _look(self) -> list[tuple[zmq.Socket, int]]:
        """The hot sockets with input now (their ZMQ_EVENTS, which also resets their signal)."""
        hot = self.hot
        if self.sent:
            hot |= self.sent
            self.sent.clear()
        ready = []
        paused, single = self._paused, self.single
        for sock in hot:
            if sock not in paused and sock.getsockopt(EVENTS) & POLLIN:
                ready.append((sock, POLLIN))
                if sock in single:          # it had more than the one frame taken: drain it
                    self.busy.add(sock)     # whole from now on
        hot.clear()
        single.clear()
        return ready

    def take_more(self, sock: zmq.Socket, n: int) -> bool:
        """After a turn's n-th frame of a socket: take another now? A socket that brings one
        frame at a time (a closed loop: a request, then its answer) is left to the next look,
        which asks ZMQ_EVENTS anyway after its node has sent; one that brought more last time (a
        flood) is asked at once. A recv that finds nothing raises zmq.Again, whose construction
        costs ten times the question."""
        if sock not in self.busy:
            self.single.add(sock)
            self.hot.add(sock)
            return False
        if sock.getsockopt(EVENTS) & POLLIN:
            return True
        if n == 1:
            self.busy.discard(sock)         # one frame this turn: back to one at a time
        return False

    def _drain(self, ready: list) -> set[Runtime]:
        """Take frames from the ready sockets in turn, so a flood on one does not starve the
        others (a turn ends after DRAIN_PER_SOCKET frames or TURN_NS), up to a budget of frames
        and of time per loop iteration. A socket whose turn ended before it ran dry gets another
        round, and is looked at again before the next sleep if the budget ran out first; one
        that ran dry (its ZMQ_EVENTS said so, which also reset its fd's signal) signals its next
        input itself. Returns the nodes whose sockets were read."""
        touched: set[Runtime] = set()
        budget = DRAIN_BUDGET
        end = monotonic_ns() + ITERATION_NS
        socks = self.socks
        while ready and budget > 0:
            full = []
            for i, item in enumerate(ready):
                sock = item[0]
                rt, kind = socks[sock]
                take = min(DRAIN_PER_SOCKET, budget)
                deadline = min(end, monotonic_ns() + TURN_NS)
                n = rt.drain_socket(sock, kind, take, deadline)
                touched.add(rt)
                now = monotonic_ns()
                if n >= take or now >= deadline:    # its turn ended before it ran dry
                    full.append(item)
                budget -= n
                if budget <= 0 or now >= end:
                    self.hot.update(x[0] for x in full)
                    self.hot.update(x[0] for x in ready[i + 1:])
                    return touched
            ready = full
        return touched

    def _deliver_local(self, touched: set[Runtime]) -> None:
        """Hand over the frames of in-memory links, up to a loop iteration's budget (what the
        nodes send meanwhile waits for the next iteration)."""
        inbox, nodes = self.inbox, self.nodes
        for _ in range(min(len(inbox), DRAIN_BUDGET)):
            rt, r, ident, data, body = inbox.popleft()
            if rt not in nodes:
                continue                    # closed meanwhile
            now = monotonic_ns()
            link = rt._dealers.get(ident) if r is None else r.by_ident.get(ident)
            if body:
                if link is not None:        # a MemoryLink's body: no framing to undo
                    rt._on_message(r, link, ident, data, now)
            elif r is None:
                if link is not None:
                    rt._on_frame(None, link, None, data, None, now)
            else:
                rt._on_frame(r, link, ident, data, None, now)
            touched.add(rt)

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Until every node stopped (SHUTDOWN; SIGTERM stops them all) or `until()`. A node that
        stopped runs its on_stop hooks at once; the others go on."""
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        # A full collection walks every tracked object, imports and all: several ms of stall.
        # What exists now lives for the whole run: freeze it, and collect the young objects
        # (messages, tasks) less often; they are nearly all freed by reference counting anyway.
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        look_all = 0
        last = monotonic_ns()
        live = [rt for rt in self.nodes if not rt.stopping]
        try:
            while live and not self.stopping and not (until and until()):
                # zmq_poll sleeps in whole milliseconds, which would add up to 1 ms of timer
                # lateness to an open-loop schedule; select() on the sockets' signalling fds
                # sleeps to the microsecond. The fds are edge-triggered, so zmq_poll(0) asks
                # for pending input before sleeping, and every ready socket is drained.
                ready = self._look()
                if not ready and not self.inbox:
                    now = monotonic_ns()
                    first = live[0].wake if len(live) == 1 else min(rt.wake for rt in live)
                    wake = min(now + IDLE_WAKE_NS, look_all, first)
                    if wake > now:
                        try:
                            fds = select.select(self._fds, (), (), (wake - now) / 1e9)[0]
                        except InterruptedError:
                            fds = []
                        by_fd = self._by_fd
                        self.hot.update(by_fd[fd] for fd in fds if fd in by_fd)
                    ready = self._look()
                now = monotonic_ns()
                if now - last > STALL_NS:
                    # this process was stopped (SIGSTOP, a frozen VM): its links' timers run
                    # before any frame that waited meanwhile is read, so a peer silent past the
                    # liveness timeout (it has given up on us too) is seen so first, and the
                    # cores hear of it first (the mediator checks its shadows before it emulates
                    # an ELSP that waited against guest memory that changed since)
                    for rt in live:
                        rt.stalled(now)
                if ready:
                    touched = self._drain(ready)
                else:
                    touched = set()
                if self.inbox:
                    self._deliver_local(touched)
                now = monotonic_ns()
                if now >= look_all:         # a safety net under every node's next_wake, and
                    touched = live          # under the sockets' signals
                    look_all = now + IDLE_WAKE_NS
                    self.hot.update(s for s in self.socks if s not in self._paused)
                stopped = False
                # With frames handed over in memory waiting (a trap's call to the mediator, its
                # answer), a node that only got frames steps once they have gone round: what
                # its handlers send goes out as they run, so the round trip needs no step
                # between its hops; a node whose own work is due steps now.
                later: set[Runtime] = set()
                for rt in live:
                    if rt.wake <= now or rt in touched:
                        if self.inbox and rt.wake > now:
                            later.add(rt)
                            continue
                        rt.step(now)
                        now = monotonic_ns()
                    stopped |= rt.stopping
                rounds = 0
                while self.inbox and rounds < LOCAL_ROUNDS and not stopped:
                    rounds += 1
                    self._deliver_local(later)
                if later:
                    now = monotonic_ns()
                    for rt in later:
                        if not rt.stopping:
                            rt.step(now)
                            now = monotonic_ns()
                        stopped |= rt.stopping
                last = now
                if stopped:
                    for rt in live:
                        if rt.stopping:
                            rt.stop()
                    live = [rt for rt in live if not rt.stopping]
        finally:
            for rt in self.nodes:
                rt.stop()

