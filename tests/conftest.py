import shutil
import tempfile

import pytest

from bench import config
from harness import started_bench


@pytest.fixture
def bench():
    """A sans-IO bench (tests/harness.py): mediator, hypervisor and gpu cores, vGPUs 1 and 2."""
    yield from started_bench()


@pytest.fixture
def small_cfg():
    """A short run: two guests, a fixed number of ops (so contents depend on the seed only)."""
    def make(**over):
        raw = {"run": {"duration_s": 2, "ops": 300, "seed": 11},
               "vgpus": {"count": 2, "ram_mib": 16},
               "load": {"mode": "closed", "concurrency": 8, "burst": 64,
                        "mix": {"mmio-read": 0.4, "mmio-write": 0.4, "gtt-burst": 0.2}}}
        for key, val in over.items():
            sec, _, k = key.partition("__")
            raw.setdefault(sec, {})[k] = val
        return config.validate(raw, "test")
    return make


@pytest.fixture
def short_ipc_dir():
    """A private (mode 700) directory with a short path, as ipc endpoints need."""
    d = tempfile.mkdtemp(prefix="gvtt-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)
