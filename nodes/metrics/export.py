"""Prometheus export of a node: its Stats families and its links, collected on each scrape."""
from __future__ import annotations

from typing import Any, Callable, Iterator

from importlib import metadata

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from nodes.stats import LatencyHistogram, Stats
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
    """Per link: messages by direction, messages lost on the way in, frames that could not go out.
    Links exist only for this run's node names, and those of peers gone are dropped, so the
    label values stay bounded."""

    def __init__(self, links: Callable[[], dict[str, Link]], pending_calls: Callable[[], int]):
        self.links, self.pending_calls = links, pending_calls

    def collect(self) -> Iterator[Metric]:
        msgs = CounterMetricFamily("gvtbench_link_messages", "Messages on a link, by peer and direction",
                                   labels=["link", "direction"])
        gaps = CounterMetricFamily("gvtbench_link_lost_messages",
                                   "Sequence numbers a peer sent that never arrived", labels=["link"])
        failed = CounterMetricFamily("gvtbench_link_send_failures",
                                     "Frames to a peer the transport refused", labels=["link"])
        for name, link in list(self.links().items()):
            msgs.add_metric([name, "tx"], link.sent)
            msgs.add_metric([name, "rx"], link.received)
            gaps.add_metric([name], link.gaps)
            failed.add_metric([name], link.send_failed)
        yield msgs
        yield gaps
        yield failed
        pend = GaugeMetricFamily("gvtbench_pending_calls", "Requests awaiting a reply")
        pend.add_metric([], self.pending_calls())
        yield pend


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
