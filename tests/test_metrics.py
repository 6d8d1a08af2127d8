"""Four nodes started one by one (as on separate hosts), each scraped and linted by promtool."""
import shutil
import subprocess
import time
import urllib.request

import pytest

from wireclient import RawPeer, free_port, start_node, stop

PROMTOOL = shutil.which("promtool")


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


@pytest.mark.skipif(PROMTOOL is None and not __import__("os").environ.get("CI"),
                    reason="promtool not installed (CI installs it)")
def test_standalone_nodes_metrics(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nops = 200\ntransport = "tcp"\n[vgpus]\ncount = 1\nram_mib = 8\n'
                   '[load]\nmode = "closed"\nburst = 32\n')
    eps = {n: f"tcp://127.0.0.1:{free_port()}" for n in ("gpu", "mediator", "hypervisor", "guest1")}
    ports = {n: free_port() for n in eps}
    procs = {
        "gpu": start_node("gpu", cfg, eps["gpu"], metrics_port=ports["gpu"]),
        "mediator": start_node("mediator", cfg, eps["mediator"], "--peer", f"gpu={eps['gpu']}",
                               metrics_port=ports["mediator"]),
        "hypervisor": start_node("hypervisor", cfg, eps["hypervisor"], "--peer",
                                 f"mediator={eps['mediator']}", metrics_port=ports["hypervisor"]),
        "guest1": start_node("guest", cfg, eps["guest1"], "--peer", f"hypervisor={eps['hypervisor']}",
                             "--vm", "1", metrics_port=ports["guest1"]),
    }
    try:
        # ready when the guest has finished its 200 ops
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, f"the guest did not finish its load: {text[-1500:]}"
            assert all(p.poll() is None for p in procs.values()), {
                n: p.stderr.read().decode()[-500:] for n, p in procs.items() if p.poll() is not None}
            try:
                text = _scrape(ports["guest1"])
            except OSError:
                text = ""
            text = text if text else ""
            done = [l for l in text.splitlines()
                    if l.startswith("gvtbench_guest_ops_total") and 'status="completed"' in l]
            if sum(float(l.rsplit(" ", 1)[1]) for l in done) >= 200:
                break
            time.sleep(0.1)
        for name, port in ports.items():
            text = _scrape(port)
            if name != "gpu":
                assert "gvtbench_trap_latency_seconds_bucket{" in text
                assert 'le="1e-06"' in text and 'le="1.0"' in text
            assert "gvtbench_link_messages_total" in text
            if PROMTOOL:
                r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                                   text=True, timeout=30)
                assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", \
                    f"{name}: {r.stdout}{r.stderr}"
            else:
                pytest.fail("promtool is missing in CI")
        med = _scrape(ports["mediator"])
        assert 'gvtbench_ggtt_entries_translated_total{result="ok",vgpu="1"}' in med
        assert 'gvtbench_traps_total{kind="gtt_write",stage="mediator",vgpu="1"}' in med
        gpu = _scrape(ports["gpu"])
        assert "gvtbench_gpu_ggtt_writes_total" in gpu
        # the MSI path: a mediator-side peer asks the hypervisor to inject; the guest counts an IRQ
        injector = RawPeer(eps["hypervisor"], name="msi-tester")
        try:
            assert injector.hello()[0] == "REPLY"
            for _ in range(3):
                assert injector.call("INJECT_MSI", {"vector": 0x41}, vgpu=1)[0] == "REPLY"
            r = injector.call("INJECT_MSI", {}, vgpu=9)
            assert r[0] == "ERROR" and r[6]["code"] == "ENODEV"
        finally:
            injector.close()
        deadline = time.monotonic() + 10
        while 'gvtbench_guest_irqs_total{vgpu="1"} 3.0' not in _scrape(ports["guest1"]):
            assert time.monotonic() < deadline, "the guest never saw the 3 interrupts"
            time.sleep(0.05)
        assert 'gvtbench_msi_injected_total{vgpu="1"} 3.0' in _scrape(ports["hypervisor"])
    finally:
        for name, ep in eps.items():
            try:
                peer = RawPeer(ep, name=f"stopper-{name}")
                peer.hello()
                peer.call("SHUTDOWN")
                peer.close()
            except Exception:
                pass
        for p in procs.values():
            stop(p)
