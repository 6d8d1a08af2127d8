"""A real Prometheus next to a run (`gvtbench run --prometheus`): Debian's `prometheus` binary
with a config the launcher writes, every node found through file-based service discovery, the
data in the run's folder.

The config scrapes every second (a run lasts seconds) and re-reads the targets file every second;
the launcher writes that file once every node has told it its /metrics port.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

SCRAPE_INTERVAL_S = 1
INSTALL_HINT = "apt-get install prometheus   (Debian/Ubuntu; it brings promtool too)"
TARGETS_FILE = "targets.json"


class PrometheusMissing(Exception):
    pass


def find_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise PrometheusMissing(f"--prometheus needs the `prometheus` binary, which is not on PATH; "
                                f"install it with: {INSTALL_HINT}")
    return path


def write_config(folder: Path) -> Path:
    """prometheus.yml for a run: one job, its targets from targets.json next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TARGETS_FILE).write_text("[]\n")
    cfg = folder / "prometheus.yml"
    cfg.write_text(
        "# written by gvtbench run --prometheus\n"
        "global:\n"
        f"  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
        f"  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
        "scrape_configs:\n"
        "  - job_name: gvtbench\n"
        "    file_sd_configs:\n"
        f"      - files: ['{TARGETS_FILE}']\n"
        f"        refresh_interval: {SCRAPE_INTERVAL_S}s\n")
    return cfg


def write_targets(folder: Path, nodes: dict[str, dict], host: str = "127.0.0.1") -> None:
    """One target per process with a /metrics port; labels name the node (a pool of guests: the
    pool, whose samples name their guest) and its role."""
    groups = [{"targets": [f"{host}:{r['metrics_port']}"],
               "labels": {"node": r.get("pool") or name, "role": r.get("role") or name}}
              for name, r in sorted(nodes.items()) if r.get("metrics_port")]
    tmp = folder / (TARGETS_FILE + ".tmp")
    tmp.write_text(json.dumps(groups, indent=1))
    os.replace(tmp, folder / TARGETS_FILE)        # whole, so Prometheus never reads half a file


class PrometheusServer:
    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port
        self.binary = find_binary()
        self.config = write_config(folder)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.folder / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.config}",
             f"--storage.tsdb.path={self.folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            cwd=self.folder, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.folder / "prometheus.log").read_text(errors="replace").strip()[-400:]
                raise RuntimeError(f"prometheus exited (code {self.proc.returncode}): {tail}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus did not become ready within {timeout:g} s")

    def scraping(self, nodes: int) -> bool:
        """Prometheus has scraped each of `nodes` targets at least once, successfully. It applies
        a changed target list at most every 5 s (its scrape manager's reload tick), so a run that
        started its load before this would lose its first seconds."""
        try:
            with urllib.request.urlopen(self.url + "/api/v1/targets?state=active", timeout=2) as r:
                active = json.load(r)["data"]["activeTargets"]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return False
        return len(active) == nodes and all(t.get("health") == "up" for t in active)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
