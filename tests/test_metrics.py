"""Four nodes started one by one over tcp with their CURVE keys (as on separate hosts), each
/metrics scraped and linted by promtool; and the MSI path through real processes."""
import shutil
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wireclient import RawPeer, RawServer, free_port, metric, scrape, start_node, stop, wait_for

PROMTOOL = shutil.which("promtool")
# the label names the metric set may use: each has a bounded set of values in a run, and none is
# a label the launcher's scrape targets carry (node, role), which Prometheus would rename exported_*
LABELS = {"vgpu", "kind", "stage", "engine", "link", "direction", "status", "reason", "result",
          "state", "mix", "code", "peer_role", "version", "translator", "outcome",
          "guest"}     # a guest process (a pool of guests) labels each sample with its guest


def check_metric_names(node: str, text: str) -> None:
    """The metric review's rules: every family is gvtbench_ (or the client's process_/python_),
    counters are _total, durations _seconds, labels from the bounded set, the process collector
    and build_info are there."""
    fams = list(text_string_to_metric_families(text))
    names = {f.name for f in fams}
    assert {"gvtbench_build_info", "process_cpu_seconds", "process_resident_memory_bytes"} <= names, node
    for f in fams:
        assert f.name.startswith(("gvtbench_", "process_", "python_")), (node, f.name)
        for s in f.samples:
            if f.type == "counter" and not s.name.endswith("_created"):
                assert s.name.endswith("_total"), (node, s.name)
            assert set(s.labels) - {"le"} <= LABELS, (node, s.name, s.labels)
        if f.type == "histogram":
            assert f.name.endswith("_seconds"), (node, f.name)


@pytest.mark.skipif(PROMTOOL is None and not __import__("os").environ.get("CI"),
                    reason="promtool not installed (CI installs it)")
def test_standalone_nodes_metrics(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nops = 200\ntransport = "tcp"\n[vgpus]\ncount = 1\nram_mib = 8\n'
                   '[load]\nmode = "closed"\nburst = 32\n')
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "bench.cli", "keys", str(keys), "--config", str(cfg)],
                   check=True, capture_output=True, timeout=60)
    eps = {n: f"tcp://127.0.0.1:{free_port()}" for n in ("gpu", "mediator", "hypervisor", "guest1", "vm1")}
    ports = {n: free_port() for n in ("gpu", "mediator", "hypervisor", "guest1")}
    k = ["--keys", str(keys)]

    def node(role, name, *peer):
        return start_node(role, cfg, eps[name], *peer, *k, metrics_port=ports[name],
                          log=tmp_path / f"{name}.log")
    procs = {
        "gpu": node("gpu", "gpu"),
        "mediator": node("mediator", "mediator", "--peer", f"gpu={eps['gpu']}"),
        "hypervisor": node("hypervisor", "hypervisor", "--peer", f"mediator={eps['mediator']}",
                           "--vm-bind", f"1={eps['vm1']}"),
        "guest1": node("guest", "guest1", "--peer", f"hypervisor={eps['vm1']}", "--vm", "1"),
    }
    try:
        def done():
            assert all(p.poll() is None for p in procs.values()), {
                n: (tmp_path / f"{n}.log").read_text()[-500:] for n, p in procs.items() if p.poll() is not None}
            try:
                return metric(scrape(ports["guest1"]), "gvtbench_guest_ops_total", status="completed") >= 200
            except OSError:
                return False
        wait_for(done, 90, "the guest to finish its 200 ops")
        for name, port in ports.items():
            text = scrape(port)
            if name != "gpu":
                assert "gvtbench_trap_latency_seconds_bucket{" in text
                assert 'le="1e-06"' in text and 'le="1.0"' in text
            assert "gvtbench_link_messages_total" in text
            check_metric_names(name, text)
            if PROMTOOL:
                r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                                   text=True, timeout=30)
                assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", \
                    f"{name}: {r.stdout}{r.stderr}"
            else:
                pytest.fail("promtool is missing in CI")
        med = scrape(ports["mediator"])
        assert 'gvtbench_vgpu_state{state="active",vgpu="1"} 1.0' in med
        assert 'gvtbench_build_info{translator="c",version="' in med
        assert 'gvtbench_ggtt_entries_translated_total{result="ok",vgpu="1"}' in med
        assert 'gvtbench_traps_total{kind="gtt_write",stage="mediator",vgpu="1"}' in med
        assert metric(scrape(ports["gpu"]), "gvtbench_gpu_ggtt_writes_total") > 0
        assert metric(scrape(ports["hypervisor"]), "gvtbench_handshake_failures_total") == 0
    finally:
        for p in procs.values():
            stop(p)


def test_inject_msi_reaches_the_guest_through_real_processes(tmp_path, short_ipc_dir):
    """The mediator asks the hypervisor to inject an MSI; the guest of that VM gets an IRQ."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[vgpus]\ncount = 2\nram_mib = 4\n")
    med = RawServer(f"ipc://{short_ipc_dir}/med", "mediator")
    port = free_port()
    hv = start_node("hypervisor", cfg, f"ipc://{short_ipc_dir}/hv", "--peer",
                    f"mediator=ipc://{short_ipc_dir}/med", metrics_port=port, log=tmp_path / "hv.log")
    guests = [RawPeer(f"ipc://{short_ipc_dir}/hv.vm{vm}", f"guest{vm}") for vm in (1, 2)]
    try:
        link = med.accept_hello()
        for g in guests:
            assert g.hello()[0] == "REPLY"
        # INJECT_MSI is posted; MSIs that come before the first is delivered merge (the IRR bit)
        for _ in range(3):
            med.post(link, "INJECT_MSI", {"vector": 0x41}, vgpu=1)
        med.post(link, "INJECT_MSI", {}, vgpu=9)            # no such VM: refused, nothing sent
        irqs = []
        while (m := guests[0].recv(1000)) is not None:
            irqs.append(m)
        assert 1 <= len(irqs) <= 3
        assert all((m[0], m[3], m[6]) == ("IRQ", 1, {"vector": 0x41}) for m in irqs)
        assert guests[1].recv(300) is None
        text = scrape(port)
        assert metric(text, "gvtbench_msi_injected_total", vgpu="1") == 3
        merged = metric(text, "gvtbench_msi_merged_total", vgpu="1") or 0
        assert merged == 3 - len(irqs)
    finally:
        for g in guests:
            g.close()
        med.close()
        stop(hv)
