"""The message kinds of the wire protocol, one schema each: the payload's fields and their types,
the reply's, and which role may send the kind to which. PROTOCOL.md describes the same kinds for
people who write their own peer; a test keeps the two in step.

Types (as named in PROTOCOL.md):
  u8 u16 u32 u64    a msgpack integer in that unsigned range
  bool str bytes    msgpack bool, str (UTF-8), bin
  u8s u32s u64s     bin holding packed little-endian unsigned integers of that width
  map any           a msgpack map / any value (control payloads from the launcher only)
  list[T]           an array of T; list[T1,T2] an array of arrays [T1, T2]
  nil               no payload (msgpack nil)
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from nodes.errors import GvtError

ROLES = ("launcher", "gpu", "mediator", "hypervisor", "guest")
NAME_MAX = 64                       # a node name in HELLO
TEXT_MAX = 4096                     # an ERROR text, a reason
PROBE_READS_MAX = 256               # timed reads one PROBE may ask for

# Who connects to whom: the roles whose DEALER may connect to a node's ROUTER. Traffic flows both
# ways on a connection; the launcher reaches every node over the connection the node opened.
CONNECTS_TO: dict[str, frozenset[str]] = {
    "launcher": frozenset({"gpu", "mediator", "hypervisor", "guest"}),
    "gpu": frozenset({"mediator"}),
    "mediator": frozenset({"hypervisor"}),
    "hypervisor": frozenset({"guest", "gpu"}),
    "guest": frozenset(),
}


# ---- field types ----------------------------------------------------------------------------------
def _uint(bits: int) -> Callable[[Any], bool]:
    top = 1 << bits
    return lambda v: type(v) is int and 0 <= v < top


def _packed(width: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is bytes and len(v) % width == 0


_SCALARS: dict[str, Callable[[Any], bool]] = {
    "u8": _uint(8), "u16": _uint(16), "u32": _uint(32), "u64": _uint(64),
    "bool": lambda v: type(v) is bool,
    "str": lambda v: type(v) is str,
    "bytes": lambda v: type(v) is bytes,
    "u8s": _packed(1), "u32s": _packed(4), "u64s": _packed(8),
    "map": lambda v: type(v) is dict,
    "any": lambda v: True,
    "nil": lambda v: v is None,
}
_LIST = re.compile(r"^list\[([a-z0-9,]+)\]$")


def checker(type_name: str) -> Callable[[Any], bool]:
    """A predicate for a type name of the vocabulary above."""
    if type_name in _SCALARS:
        return _SCALARS[type_name]
    m = _LIST.match(type_name)
    if not m:
        raise ValueError(f"unknown wire type {type_name!r}")
    parts = [checker(t) for t in m.group(1).split(",")]
    if len(parts) == 1:
        one = parts[0]
        return lambda v: type(v) in (list, tuple) and all(one(x) for x in v)
    n = len(parts)
    return lambda v: type(v) in (list, tuple) and all(
        type(x) in (list, tuple) and len(x) == n and all(c(y) for c, y in zip(parts, x)) for x in v)


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    optional: bool = False
    max_len: int = 0                # str/bytes/list: the longest accepted (0: the frame limit)
    doc: str = ""


@dataclass
class Kind:
    name: str
    routes: frozenset[tuple[str, str]]      # (sender role, receiver role)
    fields: tuple[Field, ...] | None        # None: the payload is nil
    reply: str | tuple[Field, ...] | None   # None: a posted message, no reply
    doc: str = ""
    _checks: list = field(default_factory=list, repr=False)
    _reply_check: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._checks = [(f.name, checker(f.type), f.optional, f.max_len, f.type)
                        for f in (self.fields or ())]
        self._names = frozenset(f.name for f in (self.fields or ()))
        if self.fields is not None:
            self.validate = _compile(self)     # type: ignore[method-assign]
        if isinstance(self.reply, tuple):
            self._reply_check = Kind(f"{self.name} reply", frozenset(), self.reply, None)
        elif self.reply is not None:
            self._reply_check = checker(self.reply)

    @property
    def posted(self) -> bool:
        return self.reply is None

    def validate(self, payload: Any) -> Any:
        """The payload if it fits the schema, else EINVAL naming the field. (A kind with fields
        replaces this with a compiled version of the same checks; this one explains failures.)"""
        if self.fields is None:
            if payload is not None:
                raise GvtError("EINVAL", f"{self.name} takes no payload (nil), got "
                               f"{type(payload).__name__}")
            return payload
        if type(payload) is not dict:
            raise GvtError("EINVAL", f"{self.name} payload must be a map, got "
                           f"{type(payload).__name__}")
        for name, ok, optional, max_len, tname in self._checks:
            if name not in payload:
                if optional:
                    continue
                raise GvtError("EINVAL", f"{self.name} payload lacks field {name!r} ({tname})")
            v = payload[name]
            if not ok(v):
                raise GvtError("EINVAL", f"{self.name} field {name!r} must be {tname}, got "
                               f"{_describe(v)}")
            if max_len and len(v) > max_len:
                raise GvtError("EINVAL", f"{self.name} field {name!r} is longer than {max_len}")
        if len(payload) > len(self._checks) or not self._names.issuperset(payload):
            extra = sorted(str(k)[:40] for k in payload if k not in self._names)
            raise GvtError("EINVAL", f"{self.name} payload has unknown fields {extra}")
        return payload

    def validate_reply(self, result: Any) -> Any:
        chk = self._reply_check
        if chk is None:
            return result
        if isinstance(chk, Kind):
            return chk.validate(result)
        if not chk(result):
            raise GvtError("EPROTO", f"the reply to {self.name} must be {self.reply}, got "
                           f"{_describe(result)}")
        return result


_MISSING = object()
_INLINE = {f"u{b}": f"type(v) is int and 0 <= v < {1 << b}" for b in (8, 16, 32, 64)}
_INLINE.update({"bool": "type(v) is bool", "str": "type(v) is str", "bytes": "type(v) is bytes",
                "map": "type(v) is dict", "any": "True"})


def _compile(kind: Kind) -> Callable[[Any], Any]:
    """The kind's checks as one straight-line function: every message on every hop is checked,
    so the generic loop is too slow. Any failure is explained by Kind.validate."""
    lines = ["def validate(p):", "    if type(p) is not dict: return explain(p)", "    seen = 0"]
    env: dict[str, Any] = {"_MISSING": _MISSING, "explain": lambda p: Kind.validate(kind, p)}
    for i, f in enumerate(kind.fields or ()):
        cond = _INLINE.get(f.type)
        if cond is None:
            env[f"c{i}"] = checker(f.type)
            cond = f"c{i}(v)"
        if f.max_len:
            cond = f"({cond}) and len(v) <= {f.max_len}"
        lines += [f"    v = p.get({f.name!r}, _MISSING)",
                  "    if v is _MISSING:",
                  "        " + ("pass" if f.optional else "return explain(p)"),
                  f"    elif {cond}: seen += 1",
                  "    else: return explain(p)"]
    lines += ["    if seen != len(p): return explain(p)", "    return p"]
    exec("\n".join(lines), env)
    return env["validate"]


def _describe(v: Any) -> str:
    if type(v) is int:
        return f"the integer {v}"
    return type(v).__name__


# ---- the kinds -------------------------------------------------------------------------------------
def _routes(*pairs: str) -> frozenset[tuple[str, str]]:
    out = set()
    for p in pairs:
        s, _, r = p.partition(">")
        out.add((s, r))
    return frozenset(out)


_ALL_NODES = ("gpu", "mediator", "hypervisor", "guest")
_ACCESS = (Field("off", "u32", doc="BAR0 offset"), Field("size", "u8", doc="1, 2, 4 or 8 bytes"))
_BATCH = (Field("off", "u32s", doc="BAR0 offsets"), Field("size", "u8s", doc="access sizes"),
          Field("val", "u64s", doc="values (the low `size` bytes count)"))
_WRITE_NO = Field("w", "u64", optional=True, doc="the sender's number of this posted write")
_HELLO = (Field("name", "str", max_len=NAME_MAX), Field("role", "str", max_len=16),
          Field("version", "u32"), Field("max_frame", "u64", optional=True),
          Field("max_outstanding", "u32", optional=True),
          Field("max_posted_writes", "u32", optional=True))
_GPA_READ = (Field("ops", "list[u64,u32]", doc="[gpa, length] pairs; each stays in one page"),)
_GPA_WRITE = (Field("ops", "list[u64,bytes]", doc="[gpa, data] pairs; each stays in one page"),)
_GFNS = (Field("gfns", "u64s"),)
_NONCE = (Field("nonce", "u64"),)

KINDS: dict[str, Kind] = {k.name: k for k in [
    # the link
    Kind("HELLO", _routes(*(f"{a}>{b}" for b in ROLES for a in CONNECTS_TO[b])), _HELLO, _HELLO,
         "opens a link: names the sender, its role and protocol version; the reply is the "
         "receiver's own HELLO"),
    Kind("HEARTBEAT", _routes(*(f"{a}>{b}" for b in ROLES for a in CONNECTS_TO[b]),
                              *(f"{b}>{a}" for b in ROLES for a in CONNECTS_TO[b])), None, None,
         "keeps a quiet link alive; the receiver does nothing else with it"),
    Kind("REPLY", frozenset(), None, None, "the result of the request whose seq is reply_to"),
    Kind("ERROR", frozenset(), (Field("code", "str", max_len=32), Field("text", "str", max_len=TEXT_MAX)),
         None, "the refusal of the request whose seq is reply_to"),
    # control: only on a node's link to its launcher
    Kind("STATS", _routes(*(f"launcher>{r}" for r in _ALL_NODES)), None, "map",
         "counters, links and metric families of the node"),
    Kind("SHUTDOWN", _routes(*(f"launcher>{r}" for r in _ALL_NODES)), None, "bool",
         "stop the node after the reply"),
    Kind("TRACE_DUMP", _routes(*(f"launcher>{r}" for r in _ALL_NODES)),
         (Field("start", "u32", doc="index of the first span"),), "map",
         "a page of the spans the node recorded for sampled operations"),
    Kind("START", _routes("launcher>guest"),
         (Field("load", "bool", optional=True), Field("spec", "map", optional=True)), "map",
         "boot the guest and (load: true) start its load, optionally with another load spec"),
    Kind("REPORT", _routes("launcher>guest"), None, "map", "the guest's load report"),
    Kind("PROBE", _routes("launcher>guest"),
         (Field("reads", "u32", doc=f"how many reads to time, 1..{PROBE_READS_MAX}"),), "map",
         "boot the guest if it has not, then time this many trapped MMIO reads one after another "
         "(the unloaded latency, when nothing else runs)"),
    Kind("VERIFY_PLAN", _routes("launcher>guest"), (*_NONCE, Field("page", "u32")), "map",
         "a page of the guest's GGTT entries and of the GPU write probes that must land in its "
         "RAM; the reply says how many pages there are"),
    Kind("VERIFY", _routes("launcher>guest"), _NONCE, "map",
         "read the probe tokens back from guest RAM"),
    Kind("PARTITIONS", _routes("launcher>mediator"), None, "list[map]", "every vGPU and its partition"),
    Kind("VGPU_RESET", _routes("launcher>mediator", "hypervisor>mediator"), None, "map",
         "device-model reset of the envelope's vGPU (intel_gvt_reset_vgpu): from the launcher, "
         "or from the hypervisor for a VM that resets itself"),
    Kind("SYNC", _routes("launcher>mediator", "mediator>gpu"), None, "map",
         "returns once everything sent before it on the link has been applied"),
    Kind("POOL_CHECK", _routes("launcher>mediator"), None, "map",
         "check the host pool holds only mediator data: pages not in use are zero, shadow page "
         "tables map only their own VM's RAM"),
    Kind("RAM_VERIFY", _routes("launcher>guest"), None, "map",
         "the guest compares all of its RAM with what it wrote and what its workloads stored"),
    Kind("GGTT_DUMP", _routes("launcher>gpu"),
         (Field("start", "u32"), Field("count", "u32")), "bytes",
         "count physical GGTT entries from index start, as u64s"),
    Kind("GM_WRITE", _routes("launcher>gpu"), (Field("ops", "list[u64,bytes]"),), "list[u64]",
         "GPU writes through GM addresses (GGTT walk, DMA); returns the machine frames hit"),
    Kind("READY", _routes(*(f"{r}>launcher" for r in _ALL_NODES)),
         (Field("name", "str", max_len=NAME_MAX), Field("role", "str", optional=True),
          Field("endpoint", "str", optional=True), Field("metrics_port", "u16", optional=True),
          Field("pid", "u32", optional=True), Field("setup", "any", optional=True),
          Field("translator", "str", optional=True), Field("error", "str", optional=True),
          Field("pool", "str", optional=True, max_len=NAME_MAX,
                doc="the process of a guest run in a pool of guests"),
          Field("pool_vms", "list[u32]", optional=True, doc="the VMs of that pool")), None,
         "a node is up (or could not start: error)"),
    Kind("PROGRESS", _routes("guest>launcher"), (Field("report", "map"),), None, "load progress"),
    Kind("LOAD_DONE", _routes("guest>launcher"), (Field("report", "map"),), None,
         "the guest's load has drained"),
    # guest <-> hypervisor, and the mediator's access to the physical GPU
    Kind("MMIO_READ", _routes("guest>hypervisor", "mediator>gpu"), _ACCESS, "u64", "a BAR0 read"),
    Kind("MMIO_WRITE", _routes("guest>hypervisor", "mediator>gpu"), (*_ACCESS, Field("val", "u64"), _WRITE_NO),
         None, "a posted BAR0 write"),
    Kind("MMIO_WRITE_BATCH", _routes("guest>hypervisor", "mediator>gpu"), (*_BATCH, _WRITE_NO), None,
         "posted BAR0 writes, applied in order"),
    Kind("MMIO_READ_BATCH", _routes("mediator>gpu"),
         (Field("off", "u32s", doc="BAR0 offsets of registers, each read as a dword"),), "u32s",
         "register reads in one go (the engine MMIO context save at a vGPU switch); the values, "
         "packed as the offsets are"),
    Kind("WRITE_DONE", _routes("hypervisor>guest"),
         (Field("first", "u64"), Field("last", "u64"), Field("n", "u32"),
          Field("status", "str", max_len=16), Field("reason", "str", optional=True, max_len=TEXT_MAX),
          Field("n_errors", "u32"), Field("errors", "list[str]"),
          Field("refused", "list[u32]", optional=True)), None,
         "the outcome of the guest's posted writes numbered first..last"),
    Kind("IRQ", _routes("hypervisor>guest"), (Field("vector", "u32", optional=True),), None,
         "an interrupt delivered to the guest"),
    Kind("VGPU_LOST", _routes("hypervisor>guest"), (Field("reason", "str", max_len=TEXT_MAX),), None,
         "the VM's vGPU is gone (its mediator restarted): its BAR0 accesses fail with ENODEV "
         "until the guest resets its VM (VM_RESET) and boots the vGPU again"),
    # hypervisor <-> mediator
    Kind("TRAP_READ", _routes("hypervisor>mediator"), _ACCESS, "u64", "a guest's BAR0 read, to emulate"),
    Kind("TRAP_WRITE", _routes("hypervisor>mediator"), _BATCH,
         (Field("n", "u32"), Field("n_errors", "u32"), Field("errors", "list[str]"),
          Field("refused", "u8s", optional=True), Field("mmio", "u32"), Field("gtt", "u32")),
         "a guest's BAR0 writes, in order, to emulate"),
    Kind("GPA_READ", _routes("mediator>hypervisor", "guest>hypervisor"), _GPA_READ, "list[bytes]",
         "read guest physical memory of the envelope's VM"),
    Kind("GPA_WRITE", _routes("mediator>hypervisor"), _GPA_WRITE, "u32", "write guest physical memory"),
    Kind("GFN_PIN", _routes("mediator>hypervisor"), _GFNS, (Field("mfns", "u64s"),),
         "pin guest frames; machine frame of each, 0 where the gfn is not guest RAM"),
    Kind("GFN_UNPIN", _routes("mediator>hypervisor"), _GFNS, None, "release pins"),
    Kind("PAGE_TRACK", _routes("mediator>hypervisor"), (*_GFNS, Field("enable", "bool")), "u32",
         "write-protect (enable) or release guest pages of the envelope's VM for the mediator; "
         "returns how many gfns were guest RAM"),
    Kind("TRACKED_WRITE", _routes("hypervisor>mediator"),
         (Field("gpa", "u64"), Field("data", "bytes", max_len=8)), "nil",
         "a guest store to a tracked page, to emulate before it is stored"),
    Kind("PAGE_FAULT", _routes("guest>hypervisor"),
         (Field("gpa", "u64"), Field("data", "bytes", max_len=8), _WRITE_NO), None,
         "a guest store the guest's MMU found write-protected"),
    Kind("VM_RESET", _routes("guest>hypervisor"), None, "map",
         "the guest resets its VM (a reboot): after the guest's earlier writes, the hypervisor "
         "has the mediator reset the VM's vGPU (VGPU_RESET) and answers with the vGPU"),
    Kind("RAM_WRITE", _routes("guest>hypervisor"), _GPA_WRITE, None,
         "guest stores to its own RAM, where the guest cannot map it (msg fabric)"),
    Kind("ENGINE_IRQ", _routes("gpu>mediator"),
         (Field("engine", "str", max_len=8), Field("csb", "list[u32,u32]", max_len=64),
          Field("faults", "list[u32,u64,str]", max_len=64)), None,
         "an engine's interrupt: the CSB entries it posted, [low, high] dwords, and the contexts "
         "it hung on, [context id, address, reason]"),
    Kind("INJECT_MSI", _routes("mediator>hypervisor"), (Field("vector", "u32", optional=True),), None,
         "inject an MSI into the envelope's VM"),
    # the memory fabric (msg backend): DMA to the owner of a machine frame
    Kind("DMA_READ", _routes("gpu>hypervisor", "gpu>mediator", "mediator>hypervisor"), (Field("ops", "list[u64,u32,u32]"),),
         "list[bytes]", "[mfn, offset, length] reads"),
    Kind("DMA_WRITE", _routes("gpu>hypervisor", "gpu>mediator", "mediator>hypervisor"), (Field("ops", "list[u64,u32,bytes]"),),
         "u32", "[mfn, offset, data] writes"),
]}

CONTROL_KINDS = frozenset(k.name for k in KINDS.values()
                          if k.routes and all(s == "launcher" for s, _ in k.routes))
LINK_KINDS = frozenset({"HELLO", "HEARTBEAT", "REPLY", "ERROR"})


def may_send(kind: Kind, sender: str, receiver: str) -> bool:
    return (sender, receiver) in kind.routes


MAX_GPUS = 16                       # physical GPUs in one run: gpu/0 .. gpu/15
MAX_HYPERVISORS = 8                 # hypervisors serving one GPU's mediator: hypervisor/G.0 .. .7
STACK_ROLES = ("gpu", "mediator", "hypervisor")     # one of each per physical GPU


def role_of(name: str) -> tuple[str, int]:
    """(role, vm) of a node id: gpu/G, mediator/G, hypervisor/G[.K] (G a GPU's index, K one of
    its hypervisors; the bare role is GPU 0's), launcher, or guest<N> (VM N)."""
    role, _gpu, vm = parse_node(name)
    return role, vm


def split_node(name: str) -> tuple[str, int | None, int, int]:
    """(role, GPU index or None, vm, hypervisor index) of a node id, or of the name a node of
    a GPU gives its peers there (`hypervisor`, `hypervisor.K`); EINVAL naming the forms."""
    if name == "launcher":
        return name, None, 0, 0
    head, sep, idx = name.partition("/")
    base, dot, k = head.partition(".")      # a GPU's own name for its hypervisor K: hypervisor.K
    if dot and sep:
        base = ""                           # hypervisor.K/G is no name
    elif base == "hypervisor" and sep:
        idx, dot, k = idx.partition(".")    # the id of hypervisor K of GPU G: hypervisor/G.K
    hv = 0
    if dot:
        if base != "hypervisor" or not _index_ok(k, MAX_HYPERVISORS) or k == "0":
            base = ""                       # K = 0 is spelled without it
        else:
            hv = int(k)
    if base in STACK_ROLES:
        if not sep:
            return base, 0, 0, hv
        if _index_ok(idx, MAX_GPUS):
            return base, int(idx), 0, hv
    elif name.startswith("guest") and name[5:].isdigit() and not name[5:].startswith("0"):
        return "guest", None, int(name[5:]), 0
    raise GvtError("EINVAL", f"{name[:NAME_MAX]!r} is not a node name: gpu/G, mediator/G, "
                   f"hypervisor/G or hypervisor/G.K (G < {MAX_GPUS}, 0 < K < {MAX_HYPERVISORS}; "
                   f"the bare role is G = 0), launcher or guest<N>")


def _index_ok(idx: str, bound: int) -> bool:
    return idx.isdigit() and (idx == "0" or not idx.startswith("0")) and int(idx) < bound


def parse_node(name: str) -> tuple[str, int | None, int]:
    """(role, GPU index or None, vm) of a node id; EINVAL naming the forms if it is none."""
    role, gpu, vm, _hv = split_node(name)
    return role, gpu, vm


def hypervisor_index(name: str) -> int:
    """Which of its GPU's hypervisors a node name is (0 for every other node)."""
    return split_node(name)[3]


def node_id(role: str, gpu: int = 0, vm: int = 0, hv: int = 0) -> str:
    """The id of a node: a GPU's gpu/mediator/hypervisor (hypervisor K >= 1 of a GPU:
    hypervisor/G.K), a VM's guest, or the launcher."""
    if role == "guest":
        return guest_name(vm)
    if role == "launcher":
        return role
    return f"{role}/{gpu}.{hv}" if hv else f"{role}/{gpu}"


def local_hypervisor(hv: int) -> str:
    """How the nodes of a GPU name its hypervisor `hv` in their links."""
    return f"hypervisor.{hv}" if hv else "hypervisor"


def canonical(name: str) -> str:
    """A node name in its one spelling: the bare role of GPU 0 as gpu/0 (and so on)."""
    role, gpu, vm, hv = split_node(name)
    return node_id(role, gpu or 0, vm, hv)


def key_stem(name: str) -> str:
    """The file name (without .key) of a node's CURVE certificate: its id, '/' as '-'."""
    return canonical(name).replace("/", "-")


def node_of_key_stem(stem: str) -> str:
    """The node id of a certificate's file name (EINVAL if it names no node)."""
    role, sep, idx = stem.rpartition("-")
    return canonical(f"{role}/{idx}" if sep and role in STACK_ROLES else stem)


def guest_name(vm: int) -> str:
    return f"guest{vm}"


def write_batch_len(p: dict) -> int:
    """The number of writes in an MMIO_WRITE_BATCH / TRAP_WRITE payload (whose fields the schema
    has checked are packed u32s, u8s and u64s); EINVAL unless they hold as many of each."""
    n = len(p["size"])
    if len(p["off"]) != 4 * n or len(p["val"]) != 8 * n:
        raise GvtError("EINVAL", f"a write batch needs as many offsets, sizes and values; got "
                       f"{len(p['off']) // 4}, {n} and {len(p['val']) // 8}")
    return n


def unpack_write_batch(p: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, sizes, values) of an MMIO_WRITE_BATCH / TRAP_WRITE payload, as many of each."""
    write_batch_len(p)
    return (np.frombuffer(p["off"], dtype="<u4"), np.frombuffer(p["size"], dtype=np.uint8),
            np.frombuffer(p["val"], dtype="<u8"))


def pack_write_batch(offs: Any, sizes: Any, vals: Any) -> dict:
    if type(offs) is list and len(offs) <= 16:      # a few writes: numpy's set-up costs more
        n = len(offs)
        return {"off": struct.pack(f"<{n}I", *offs), "size": bytes(sizes),
                "val": struct.pack(f"<{n}Q", *vals)}
    return {"off": np.asarray(offs, dtype="<u4").tobytes(),
            "size": np.asarray(sizes, dtype=np.uint8).tobytes(),
            "val": np.asarray(vals, dtype="<u8").tobytes()}
