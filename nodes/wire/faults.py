"""Seeded fault plans for links, sans-IO: what the network does to each frame a node sends. A plan
is built from a seed and fault specs (the `[faults]` section of a config, `gvtbench run --fault`)
and given `now`; it keeps no clock. The k-th frame on a link and direction meets the same fate
for the same seed and specs, and a partition covers the same window of the run.

Grammar of one spec (repeatable; the later a spec, the more it overrides for its links):

    KIND=VALUE                      every link, both directions
    link=A-B:KIND=VALUE[,KIND=VALUE...]   the link between nodes A and B, both directions
    link=A>B:KIND=VALUE[,...]       frames from A to B only
    partition=A-B@T+D               nothing passes between A and B from T for D (A>B: one way)
    pause=NODE@T+D                  the launcher stops NODE's process (SIGSTOP) at T and lets it
                                    go on (SIGCONT) after D; T counts from the start of the load
    kill=NODE@T[+D]                 kill -9 of NODE at T; a new process of it starts D later
                                    (without +D: once its peers' liveness timeout has passed)
    restart=NODE@T                  kill -9 of NODE at T and a new process of it at once
    T may be `random`: a time drawn from the seed, within the middle of the load (20-60%)

    KIND:   drop=P  dup=P  reorder=P  corrupt=P    P a probability in [0, 1]
            delay=D[+-J]                           D and J durations (ns, us, ms, s)

A node name is a node id (`gpu/1`, `mediator/0`, `guest2`), or a role (`gpu`, `mediator`,
`hypervisor`), which in a link rule covers that role on every GPU and in a node fault means
GPU 0's; `*` is any node of the system under test (not the launcher: its control links carry the bench's own work, and
are faulted only when named).
Reorder holds a frame back by REORDER_NS so the frames after it overtake it; dup sends a second
copy DUP_GAP_NS later; corrupt flips one byte (the link checksum then refuses the frame).
"""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass, field, replace
from typing import Iterable

from nodes.errors import GvtError
from nodes.wire.schema import canonical

REORDER_NS = 5_000_000
DUP_GAP_NS = 100_000
PER_FRAME_KINDS = ("drop", "dup", "reorder", "corrupt")
FAULT_KINDS = (*PER_FRAME_KINDS, "delay", "partition")     # what a link's filter counts
FAULT_LOG_MAX = 2_000           # faults listed one by one; past it, only counted
_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_DUR = re.compile(r"^(\d+(?:\.\d+)?)(ns|us|ms|s)$")


class FaultSpecError(GvtError):
    """A fault spec that does not parse: the spec and the problem are named."""

    def __init__(self, spec: str, problem: str):
        super().__init__("EINVAL", f"fault spec {spec!r}: {problem}")
        self.spec = spec


def duration_ns(text: str, spec: str) -> int:
    m = _DUR.match(text.strip())
    if not m:
        raise FaultSpecError(spec, f"{text!r} is not a duration (a number with ns, us, ms or s)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _probability(text: str, spec: str) -> float:
    try:
        p = float(text)
    except ValueError:
        raise FaultSpecError(spec, f"{text!r} is not a probability") from None
    if not 0.0 <= p <= 1.0:
        raise FaultSpecError(spec, f"probability {p:g} is outside [0, 1]")
    return p


@dataclass(frozen=True)
class LinkFaultParams:
    drop: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0
    delay_ns: int = 0
    jitter_ns: int = 0

    @property
    def any(self) -> bool:
        return bool(self.drop or self.dup or self.reorder or self.corrupt or self.delay_ns
                    or self.jitter_ns)


@dataclass(frozen=True)
class Selector:
    """Which frames a rule covers: from `src` to `dst` (`*`: any), and the other way if `both`."""
    src: str = "*"
    dst: str = "*"
    both: bool = True

    def covers(self, src: str, dst: str) -> bool:
        def one(a: str, b: str) -> bool:
            return _matches(self.src, a) and _matches(self.dst, b)
        return one(src, dst) or (self.both and one(dst, src))

    def __str__(self) -> str:
        if self.src == self.dst == "*":
            return "*"
        return f"{self.src}{'-' if self.both else '>'}{self.dst}"


def _matches(pattern: str, name: str) -> bool:
    """A rule's end covers a node id: the id itself, its role (every GPU's node of it: gpu
    covers gpu/1), or * (any node but the launcher)."""
    return (pattern == name or (pattern == "*" and name != "launcher")
            or (name.partition("/")[0] == pattern and "/" in name))


@dataclass(frozen=True)
class Partition:
    sel: Selector
    start_ns: int
    length_ns: int


@dataclass(frozen=True)
class NodeFault:
    node: str
    kind: str               # pause, kill, restart
    start_ns: int
    length_ns: int          # pause: stopped for; kill: down for (-1: the liveness timeout)
    spec: str = ""


NODE_FAULT_KINDS = ("pause", "kill", "restart")


@dataclass
class FaultPlan:
    """Every link fault of a run: rules (in order; later ones override the kinds they name) and
    partitions. `for_link` gives the sans-IO filter one direction of one link uses."""
    seed: int
    rules: list[tuple[Selector, dict]] = field(default_factory=list)
    partitions: list[Partition] = field(default_factory=list)
    nodes: list[NodeFault] = field(default_factory=list)
    specs: list[str] = field(default_factory=list)

    duration_ns: int = 10_000_000_000      # the load's length: where `random` times fall

    @classmethod
    def parse(cls, seed: int, specs: Iterable[str], duration_ns: int = 10_000_000_000) -> "FaultPlan":
        plan = cls(seed, duration_ns=duration_ns)
        for spec in specs:
            plan.add(spec)
        return plan

    def _node_time(self, text: str, spec: str) -> int:
        if text.strip() != "random":
            return duration_ns(text, spec)
        # one stream per spec and its position: the same seed and specs give the same times
        rng = random.Random(zlib.crc32(f"{self.seed}/{len(self.nodes)}/{spec}".encode()))
        return int(self.duration_ns * (0.2 + 0.4 * rng.random()))

    def add(self, spec: str) -> None:
        if not isinstance(spec, str) or "=" not in spec:
            raise FaultSpecError(str(spec), "expected KIND=VALUE, link=A-B:KIND=VALUE, "
                                 "partition=A-B@T+D or pause=NODE@T+D")
        key, _, value = spec.partition("=")
        key = key.strip()
        if key in NODE_FAULT_KINDS:
            node, at, window = value.partition("@")
            forms = {"pause": "pause=NODE@START+LENGTH", "kill": "kill=NODE@START[+DOWN]",
                     "restart": "restart=NODE@START"}
            start, plus, length = window.partition("+")
            if not node.strip() or not at or not start or (key == "pause" and not plus) \
                    or (key == "restart" and plus):
                raise FaultSpecError(spec, f"a {key} fault is {forms[key]}")
            length_ns = duration_ns(length, spec) if plus else (-1 if key == "kill" else 0)
            self.nodes.append(NodeFault(_node_id(node.strip()), key, self._node_time(start, spec),
                                        length_ns, spec))
        elif key == "partition":
            sel_text, at, window = value.partition("@")
            if not at or "+" not in window:
                raise FaultSpecError(spec, "a partition is partition=A-B@START+LENGTH")
            start, _, length = window.partition("+")
            self.partitions.append(Partition(_selector(sel_text, spec), duration_ns(start, spec),
                                             duration_ns(length, spec)))
        elif key == "link":
            sel_text, colon, kinds = value.partition(":")
            if not colon or not kinds:
                raise FaultSpecError(spec, "a link rule is link=A-B:KIND=VALUE[,KIND=VALUE...]")
            sel = _selector(sel_text, spec)
            self.rules.append((sel, _kinds(kinds.split(","), spec)))
        else:
            self.rules.append((Selector(), _kinds([spec], spec)))
        self.specs.append(spec)

    def params(self, src: str, dst: str) -> LinkFaultParams:
        p = LinkFaultParams()
        for sel, kinds in self.rules:
            if sel.covers(src, dst):
                p = replace(p, **kinds)
        return p

    def for_link(self, src: str, dst: str) -> "LinkFaults | None":
        """The filter for frames from `src` to `dst`, or None if nothing touches them."""
        parts = [pt for pt in self.partitions if pt.sel.covers(src, dst)]
        params = self.params(src, dst)
        if not params.any and not parts:
            return None
        return LinkFaults(src, dst, params, parts, self.seed)

    def describe(self) -> list[dict]:
        """The plan as the result lists it: each rule and partition with its parameters."""
        out: list[dict] = []
        for sel, kinds in self.rules:
            out.append({"link": str(sel), "kind": "frames", **kinds})
        for pt in self.partitions:
            out.append({"link": str(pt.sel), "kind": "partition", "at_ns": pt.start_ns,
                        "length_ns": pt.length_ns})
        for nf in self.nodes:
            out.append({"node": nf.node, "kind": nf.kind, "at_ns": nf.start_ns,
                        "length_ns": nf.length_ns, "spec": nf.spec})
        return out


def _selector(text: str, spec: str) -> Selector:
    text = text.strip()
    for sep, both in (("-", True), (">", False)):
        if sep in text:
            a, _, b = text.partition(sep)
            a, b = a.strip(), b.strip()
            if a and b:
                return Selector(a, b, both)
    raise FaultSpecError(spec, f"{text!r} names no link: A-B (both ways) or A>B (one way)")


def _kinds(items: list[str], spec: str) -> dict:
    out: dict = {}
    for item in items:
        kind, eq, value = item.partition("=")
        kind = kind.strip()
        if not eq:
            raise FaultSpecError(spec, f"{item!r} is not KIND=VALUE")
        if kind in PER_FRAME_KINDS:
            out[kind] = _probability(value, spec)
        elif kind == "delay":
            base, pm, jitter = value.partition("+-")
            out["delay_ns"] = duration_ns(base, spec)
            out["jitter_ns"] = duration_ns(jitter, spec) if pm else 0
            if out["jitter_ns"] > out["delay_ns"]:
                raise FaultSpecError(spec, "the jitter may not exceed the delay")
        else:
            raise FaultSpecError(spec, f"unknown fault kind {kind!r}: drop, dup, reorder, corrupt, "
                                 f"delay, or link=, partition=, pause=, kill=, restart=")
    return out


class LinkFaults:
    """One direction of one link: `apply(frame, now)` gives the (time, frame) pairs the network
    delivers in its place (none when dropped). Every fault is counted by kind and the first
    FAULT_LOG_MAX are logged as (ns, kind)."""

    def __init__(self, src: str, dst: str, params: LinkFaultParams, partitions: list[Partition],
                 seed: int):
        self.src, self.dst, self.p, self.partitions = src, dst, params, partitions
        # a stable seed per direction (hash() of a str is salted per process)
        self.rng = random.Random(zlib.crc32(f"{seed}/{src}>{dst}".encode()) ^ (seed << 32))
        self.frames = 0
        self.counts = {k: 0 for k in FAULT_KINDS}
        self.log: list[tuple[int, str]] = []
        self.t0 = -1                # the plan's time 0: the first frame's, unless set

    def _note(self, now: int, kind: str) -> None:
        self.counts[kind] += 1
        if len(self.log) < FAULT_LOG_MAX:
            self.log.append((now, kind))

    def partitioned(self, now: int) -> bool:
        rel = now - self.t0
        return any(pt.start_ns <= rel < pt.start_ns + pt.length_ns for pt in self.partitions)

    def apply(self, frame: bytes, now: int) -> list[tuple[int, bytes]]:
        if self.t0 < 0:
            self.t0 = now
        self.frames += 1
        p, rng = self.p, self.rng
        # every frame draws the same number of values, so one kind's setting does not shift
        # the others' schedule
        r_drop, r_corrupt, r_reorder, r_dup, r_jit = (rng.random() for _ in range(5))
        at_byte = rng.randrange(1 << 30)
        if self.partitions and self.partitioned(now):
            self._note(now, "partition")
            return []
        if r_drop < p.drop:
            self._note(now, "drop")
            return []
        if r_corrupt < p.corrupt:
            self._note(now, "corrupt")
            i = at_byte % len(frame)
            frame = frame[:i] + bytes([frame[i] ^ 0xFF]) + frame[i + 1:]
        at = now
        if p.delay_ns or p.jitter_ns:
            at += p.delay_ns + int((2 * r_jit - 1) * p.jitter_ns)
            self.counts["delay"] += 1
        if r_reorder < p.reorder:
            self._note(now, "reorder")
            at += REORDER_NS
        out = [(at, frame)]
        if r_dup < p.dup:
            self._note(now, "dup")
            out.append((at + DUP_GAP_NS, frame))
        return out

    def report(self) -> dict:
        return {"link": f"{self.src}>{self.dst}", "frames": self.frames, "counts": dict(self.counts),
                "log": [[t - self.t0, k] for t, k in self.log]}


def _node_id(name: str) -> str:
    """A node fault's node by its id (gpu is gpu/0); a name that is no node's is kept as written,
    for the config's check to name it."""
    try:
        return canonical(name)
    except GvtError:
        return name
