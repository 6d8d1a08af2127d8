"""Prometheus export of a node: its Stats families and its links, collected on each scrape."""
from __future__ import annotations

from typing import Any, Callable, Iterator

from importlib import metadata

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from nodes.stats import LatencyHistogram, Stats
from nodes.wire.faults import FAULT_KINDS
from nodes.wire.link import Link


class StatsCollector:
    def __init__(self, stats: Stats):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        for fam in list(self.stats.families.values()):
            rows = list(fam.values.items())
            labels = list(fam.labels)
            m: Metric
            if fam.type == "histogram":
                m = HistogramMetricFamily(fam.name, fam.help, labels=labels)
                for lv, h in rows:
                    assert isinstance(h, LatencyHistogram)
                    m.add_metric([str(v) for v in lv], h.prom_buckets(), h.total_ns / 1e9)
            elif fam.type == "counter":
                m = CounterMetricFamily(fam.name, fam.help, labels=labels)
                for lv, v in rows:
                    m.add_metric([str(x) for x in lv], v)
            else:
                m = GaugeMetricFamily(fam.name, fam.help, labels=labels)
                for lv, v in rows:
                    m.add_metric([str(x) for x in lv], v)
            yield m


class LinkCollector:
    """Per link: messages by direction, messages lost on the way in, frames that could not go out,
    and the link protocol's own counts (resends, duplicates suppressed, acks, frames the
    transport refused, corrupted frames, bodies given up with a dead or restarted peer, the
    round-trip time, the peer's epoch). Links exist only for this run's node names, so the label
    values stay bounded."""

    PROTO = (("retransmits", "gvtbench_link_retransmits", "Frames sent again: not acked in time"),
             ("duplicates", "gvtbench_link_duplicates",
              "Frames that arrived again and were suppressed"),
             ("acks", "gvtbench_link_acks", "Frames with no message sent: acks and heartbeats"),
             ("corrupt", "gvtbench_link_corrupt_frames", "Frames refused by the link checksum"),
             ("lost", "gvtbench_link_given_up",
              "Messages given up unacked: the peer went silent or restarted"),
             ("restarts", "gvtbench_link_restarts", "Times the peer came back with a new epoch"),
             ("deaths", "gvtbench_link_deaths", "Times the peer went silent past the liveness "
              "timeout"))

    def __init__(self, links: Callable[[], dict[str, Link]], pending_calls: Callable[[], int]):
        self.links, self.pending_calls = links, pending_calls

    def collect(self) -> Iterator[Metric]:
        msgs = CounterMetricFamily("gvtbench_link_messages", "Messages on a link, by peer and direction",
                                   labels=["link", "direction"])
        gaps = CounterMetricFamily("gvtbench_link_lost_messages",
                                   "Sequence numbers a peer sent that never arrived", labels=["link"])
        failed = CounterMetricFamily("gvtbench_link_send_failures",
                                     "Messages the link refused to take (too large, or its "
                                     "window and queue full)", labels=["link"])
        drops = CounterMetricFamily("gvtbench_link_transport_drops",
                                    "Frames the transport would not take (the peer not connected, "
                                    "its queue full): resent by the link protocol", labels=["link"])
        proto = [CounterMetricFamily(name, doc, labels=["link"]) for _k, name, doc in self.PROTO]
        rtt = GaugeMetricFamily("gvtbench_link_rtt_seconds", "Smoothed round-trip time",
                                labels=["link"])
        injected = CounterMetricFamily("gvtbench_link_faults_injected", "Faults the run's plan "
                                       "played on the frames this node sent on the link, by kind "
                                       "(0 without a plan)", labels=["link", "kind"])
        held = GaugeMetricFamily("gvtbench_link_held_bytes", "Bytes the link holds for its peer: "
                                 "unacked, waiting for the window, and out of order",
                                 labels=["link"])
        for name, link in list(self.links().items()):
            msgs.add_metric([name, "tx"], link.sent)
            msgs.add_metric([name, "rx"], link.received)
            gaps.add_metric([name], link.gaps)
            failed.add_metric([name], link.send_failed)
            drops.add_metric([name], link.transport_drops)
            c = link.proto.counts
            for fam, (key, _n, _d) in zip(proto, self.PROTO):
                fam.add_metric([name], c[key])
            rtt.add_metric([name], link.proto.srtt / 1e9)
            held.add_metric([name], link.proto.held_bytes())
            counts = link.faults.counts if link.faults is not None else {}
            for kind in FAULT_KINDS:
                injected.add_metric([name, kind], counts.get(kind, 0))
        yield msgs
        yield gaps
        yield failed
        yield drops
        yield from proto
        yield rtt
        yield held
        yield injected
        pend = GaugeMetricFamily("gvtbench_pending_calls", "Requests awaiting a reply")
        pend.add_metric([], self.pending_calls())
        yield pend


class PoolCollector:
    """The families of several nodes of one process (a pool of guests) as one exposition: a family
    name appears once, and each sample gains a `guest` label naming its node (without it, two
    guests' link counters would be the same series)."""

    def __init__(self, members: list[tuple[str, list[Any]]]):
        self.members = members          # (node name, its collectors)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for name, collectors in self.members:
            for c in collectors:
                for m in c.collect():
                    out = merged.get(m.name)
                    if out is None:
                        out = merged[m.name] = Metric(m.name, m.documentation, m.type, m.unit)
                    for smp in m.samples:
                        out.add_sample(smp.name, {**smp.labels, "guest": name}, smp.value,
                                       smp.timestamp, smp.exemplar)
        yield from merged.values()


class BuildInfoCollector:
    """gvtbench_build_info: constant 1, its labels say what runs (the usual *_build_info idiom,
    so a query can join on it)."""

    def __init__(self, translator: str = ""):
        try:
            version = metadata.version("gvtbench")
        except metadata.PackageNotFoundError:     # run from a source tree that was never installed
            version = "unknown"
        self.labels = [version, translator]

    def collect(self) -> Iterator[Metric]:
        # no role label: the launcher's scrape targets carry `role`, and a metric label of the
        # same name would be renamed exported_role
        m = GaugeMetricFamily("gvtbench_build_info", "The gvtbench version a node runs, and the "
                              "mediator's GTT translator (c or python)",
                              labels=["version", "translator"])
        m.add_metric(self.labels, 1)
        yield m


def serve_metrics(collectors: list[Any], addr: str = "127.0.0.1", port: int = 0) -> tuple[Any, int]:
    """Start the /metrics HTTP server on its own registry, with the process collector's CPU,
    memory and file descriptors; returns (server, port)."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    for c in collectors:
        registry.register(c)
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server, server.server_port
