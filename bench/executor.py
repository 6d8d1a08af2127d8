"""Where the launcher's node processes run. An Executor starts each node process of a run and
hands back a NodeProcess, the handle the launcher polls, signals, waits for and samples.

- LocalExecutor: a child process of the launcher in its own session (its own process group),
  as the launcher has always started its nodes.
- RayExecutor: on an existing Ray cluster, one Ray actor per node process (a pool of guests is
  one process). A placement group with one bundle per process says where they go; each actor
  starts its node command on its own host, owns that process group, and answers for it (poll,
  signal, wait, CPU and memory). Ray is imported only here, and only when a RayExecutor is made.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

from bench import procstat
from nodes.errors import GvtError
from nodes.wire.schema import key_stem

RPC_TIMEOUT_S = 30.0        # an actor answers a call about its process within this
POLL_EVERY_S = 0.25         # how often a node process on Ray is asked whether it exited
BUNDLE_CPU = 0.01           # a bundle only places a process: the bench reserves no cores
HOST_SHARE = 0.001          # of the node:<ip> resource, to pin a bundle to the launcher's host
PLACEMENTS = {"pack": "PACK", "spread": "SPREAD", "strict-spread": "STRICT_SPREAD"}
REACH_TIMEOUT_S = 3.0       # how long a Ray address may take to accept a connection
SLOT_DIR_PREFIX = "gvtb-ray-"   # + the actor's pid: an actor's own folder on its host


class ExecutorError(GvtError):
    """The executor cannot start, place or reach a node process; the text says why."""


# Ports a run binds are chosen before the node binds them, so they are taken from below the
# kernel's ephemeral range: an outgoing connection (hundreds in a large run, and Ray's own) gets
# its local port from that range and could take one in between. Ray's workers use 10002-19999.
PORTS_FROM = 20000


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct tcp ports free on `host` now (all held bound until every one is found),
    below the ephemeral range where it leaves room (else from the kernel's choice)."""
    import random
    top = _ephemeral_start()
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        tries = 0
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            tries += 1
            want = (random.randrange(PORTS_FROM, top)
                    if top - PORTS_FROM >= 4 * count + 1000 and tries < 20 * count + 100 else 0)
            try:
                s.bind((host, want))
            except OSError:
                if want == 0:
                    raise
                continue
            ports.append(s.getsockname()[1])
        return ports
    finally:
        for s in socks:
            s.close()


def free_port(host: str) -> int:
    return free_ports(host, 1)[0]


class NodeProcess(Protocol):
    """A running node process: what the launcher needs of it, wherever it runs."""

    pid: int | None             # None: it runs elsewhere, ask the handle itself
    returncode: int | None

    def poll(self) -> int | None:
        """The exit code if it exited, else None; never waits."""

    def signal(self, sig: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def sample(self) -> procstat.Sample | None: ...

    def sample_begin(self) -> Any:
        """Ask for a sample; sample_end(what this returned) gives it (several at once)."""

    def sample_end(self, ref: Any) -> procstat.Sample | None: ...

    def log_tail(self, lines: int = 5) -> str: ...


class Executor(Protocol):
    def check(self, cfg: dict) -> None:
        """Refuse a config this executor cannot run (before anything starts)."""

    def place(self, processes: list[str], cfg: dict, run_id: str) -> None:
        """Reserve a place for each node process of the run, before any of them starts."""

    def tcp_endpoints(self, process: str | None, host: str, count: int) -> list[str]:
        """`count` tcp endpoints free where `process` runs (None: the launcher itself)."""

    def keys_for(self, process: str, keys_dir: str, names: list[str]) -> str:
        """The CURVE keys directory, as `process` (running the nodes `names`) sees it."""

    def start(self, name: str, argv: list[str], log_path: str,
              env: dict[str, str] | None = None) -> NodeProcess:
        """Start a node process (again, for a restart) with its output appended to log_path."""

    def close(self) -> None:
        """Release what the executor holds; every node process must be gone by then."""


# ---- on this machine --------------------------------------------------------------------------
class LocalProcess:
    """A node process started here, the leader of its own process group."""

    def __init__(self, popen: subprocess.Popen, log_path: str):
        self.popen = popen
        self.pid: int | None = popen.pid
        self.log_path = log_path

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        """To the whole group: anything the node started stops, goes on or dies with it."""
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass                # the group is gone: nothing left to signal

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def sample(self) -> procstat.Sample | None:
        return procstat.sample(self.popen.pid)

    def sample_begin(self) -> Any:
        return None

    def sample_end(self, ref: Any) -> procstat.Sample | None:
        return self.sample()

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode(errors="replace").strip().splitlines()
            return " | ".join(text[-lines:])
        except OSError:
            return ""


class LocalExecutor:
    """Every node process a child of the launcher, on the launcher's host."""

    def check(self, cfg: dict) -> None:
        pass

    def place(self, processes: list[str], cfg: dict, run_id: str) -> None:
        pass

    def tcp_endpoints(self, process: str | None, host: str, count: int) -> list[str]:
        return [f"tcp://{host}:{p}" for p in free_ports(host, count)]

    def keys_for(self, process: str, keys_dir: str, names: list[str]) -> str:
        return keys_dir

    def start(self, name: str, argv: list[str], log_path: str,
              env: dict[str, str] | None = None) -> LocalProcess:
        log = open(log_path, "ab")      # a restarted node adds to it
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True,
                                     env={**os.environ, **env} if env else None)
        finally:
            log.close()
        return LocalProcess(popen, log_path)

    def close(self) -> None:
        pass


def terminate(procs: list[NodeProcess], grace_s: float) -> None:
    """SIGTERM every process still running, and SIGKILL those not gone within grace_s."""
    for p in procs:
        if p.poll() is None:
            p.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.signal(signal.SIGKILL)
            p.wait()


# ---- on Ray -----------------------------------------------------------------------------------
def _proc_start(pid: int) -> str | None:
    """A live process's start time (clock ticks since boot), None if it is gone or a zombie:
    with the pid it names one process, since pids are reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _slot_dir_owner() -> str:
    pid = os.getpid()
    return f"{pid}.{_proc_start(pid)}"


def _sweep_slot_dirs() -> None:
    """Remove the folders (keys, logs) of this user's NodeSlot actors that are gone."""
    for d in Path("/tmp").glob(f"{SLOT_DIR_PREFIX}*-*"):
        pid, _, start = d.name[len(SLOT_DIR_PREFIX):].split("-", 1)[0].partition(".")
        try:
            mine = d.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and _proc_start(int(pid)) != start:
            shutil.rmtree(d, ignore_errors=True)


class NodeSlot:
    """What one Ray actor does: run a node process (and its restarts) on the actor's host, and
    answer for it. It holds the processes in a LocalExecutor's handles, so a node on Ray is
    started, signalled and sampled as a local one is."""

    # The actor runs its methods one at a time on its main thread (Ray's default, kept): a node
    # started with --parent-death dies when the thread that started it does (PR_SET_PDEATHSIG),
    # so it must be the thread that lives as long as the actor.
    def __init__(self) -> None:
        _sweep_slot_dirs()
        # mode 700: keys go here; named by this actor's pid and start time, so that a later
        # actor can tell it is gone (an actor killed with its dead launcher has no chance to
        # remove it itself)
        self.dir = tempfile.mkdtemp(prefix=f"{SLOT_DIR_PREFIX}{_slot_dir_owner()}-", dir="/tmp")
        self.local = LocalExecutor()
        self.procs: dict[int, LocalProcess] = {}

    def where(self) -> dict[str, Any]:
        import ray
        return {"node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
                "actor_pid": os.getpid()}

    def free_ports(self, count: int) -> list[str]:
        """tcp endpoints on this host's Ray address, each port free when asked (bench.executor.
        free_ports)."""
        import ray
        ip = ray.util.get_node_ip_address()
        return [f"tcp://{ip}:{p}" for p in free_ports(ip, count)]

    def ship(self, files: dict[str, bytes]) -> str:
        """Write the keys a node needs into this actor's private folder; their folder."""
        d = Path(self.dir) / "keys"
        d.mkdir(mode=0o700, exist_ok=True)
        for fname, data in files.items():
            path = d / Path(fname).name
            path.write_bytes(data)
            os.chmod(path, 0o600 if fname.endswith(".key_secret") else 0o644)
        return str(d)

    def start(self, args: list[str], log_path: str, env: dict[str, str] | None) -> int:
        """Start `python args...` with this host's Python (the launcher's interpreter path may
        not exist here). The log goes where the launcher wants it when its folder is on this
        host (one machine, or a shared file system), else into this actor's folder."""
        if any(p.poll() is None for p in self.procs.values()):
            raise ExecutorError("EBUSY", "this actor's node process is still running")
        if not os.path.isdir(os.path.dirname(log_path)):
            log_path = os.path.join(self.dir, os.path.basename(log_path))
        proc = self.local.start("", [sys.executable, *args], log_path, env)
        self.procs[proc.popen.pid] = proc
        return proc.popen.pid

    def poll(self, pid: int) -> int | None:
        return self.procs[pid].poll()

    def signal(self, pid: int, sig: int) -> None:
        self.procs[pid].signal(sig)

    def wait(self, pid: int, timeout: float | None) -> int | None:
        try:
            return self.procs[pid].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def sample(self, pid: int) -> procstat.Sample | None:
        return self.procs[pid].sample()

    def log_tail(self, pid: int, lines: int) -> str:
        return self.procs[pid].log_tail(lines)

    def stop(self, grace_s: float) -> None:
        """Every process group of this actor's gone (before the actor itself is killed), and
        its folder (the keys) removed."""
        terminate(list(self.procs.values()), grace_s)
        shutil.rmtree(self.dir, ignore_errors=True)


class RayProcess:
    """A node process a NodeSlot actor runs, maybe on another host: every question goes to it."""

    pid = None

    def __init__(self, executor: "RayExecutor", name: str, actor: Any, node_pid: int):
        self.ex, self.name, self.actor = executor, name, actor
        self.node_pid = node_pid        # its pid on its own host
        self.returncode: int | None = None
        self._polling: Any = None       # the actor's answer to a poll, on its way
        self._polled_at = 0.0

    def _ask(self, method: str, *args: Any, timeout: float = RPC_TIMEOUT_S) -> Any:
        return self.ex.get(getattr(self.actor, method).remote(self.node_pid, *args),
                           f"{self.name}: {method}", timeout)

    def poll(self) -> int | None:
        """Never waits: the launcher's loop calls this for every process many times a second,
        and a round trip to an actor on a busy host can take longer than a link's liveness
        timeout. The exit code is the one the actor's last answer had (asked again at most
        every POLL_EVERY_S), so an exit is seen that much later."""
        if self.returncode is not None:
            return self.returncode
        ray = self.ex.ray
        if self._polling is not None:
            done, _ = ray.wait([self._polling], timeout=0)
            if not done:
                return None
            ref, self._polling = self._polling, None
            try:
                self.returncode = self.ex.get(ref, f"{self.name}: poll")
            except ActorGone:
                # the node dies with its actor (PR_SET_PDEATHSIG sends it SIGTERM)
                self.returncode = -signal.SIGTERM
            except ExecutorError:
                pass                # asked again next time
            if self.returncode is not None:
                return self.returncode
        now = time.monotonic()
        if now - self._polled_at >= POLL_EVERY_S:
            self._polled_at = now
            self._polling = self.actor.poll.remote(self.node_pid)
        return None

    def sample_begin(self) -> Any:
        """Ask for a sample without waiting for it (sample_end waits): the processes of a run
        are sampled together, in one round trip's time."""
        return self.actor.sample.remote(self.node_pid)

    def sample_end(self, ref: Any) -> procstat.Sample | None:
        try:
            return self.ex.get(ref, f"{self.name}: sample")
        except ActorGone:
            return None

    def signal(self, sig: int) -> None:
        try:
            self._ask("signal", sig)
        except ActorGone:
            pass                # and with it the process group: nothing left to signal

    def wait(self, timeout: float | None = None) -> int:
        if self.poll() is not None:
            return self.returncode
        try:
            rc = self._ask("wait", timeout, timeout=RPC_TIMEOUT_S + (timeout or 3600))
        except ActorGone:
            rc = -signal.SIGTERM
        if rc is None:
            raise subprocess.TimeoutExpired(self.name, timeout or 0)
        self.returncode = rc
        return rc

    def sample(self) -> procstat.Sample | None:
        return self.sample_end(self.sample_begin())

    def log_tail(self, lines: int = 5) -> str:
        try:
            return self._ask("log_tail", lines)
        except ExecutorError:
            return ""


class ActorGone(ExecutorError):
    """The Ray actor of a node process died (and its process with it)."""


def ray_strategy(placement: str, cfg: dict) -> str:
    """The placement group strategy of a placement choice for this config. ipc endpoints live in
    the launcher's folder and shm regions in its host's /dev/shm: such runs stay on its host."""
    _known(placement)
    run = cfg["run"]
    if placement != "pack" and (run["transport"] != "tcp" or run["fabric"] != "msg"):
        raise ExecutorError("EINVAL", f"Ray placement {placement} puts nodes on several hosts: it "
                            f"needs run.transport = \"tcp\" and run.fabric = \"msg\" (this config "
                            f"has {run['transport']} and {run['fabric']}, which need one host)")
    return PLACEMENTS[placement]


def _known(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ExecutorError("EINVAL", f"Ray placement must be one of {', '.join(PLACEMENTS)}, "
                            f"got {placement!r}")


def one_host(cfg: dict) -> bool:
    return cfg["run"]["transport"] == "ipc" or cfg["run"]["fabric"] == "shm"


def _reachable(address: str) -> None:
    """A HOST:PORT address must take a connection before Ray is asked to join it: ray.init on an
    address nobody answers at retries without end."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ExecutorError("EINVAL", f"--ray takes HOST:PORT (a Ray head's GCS address, as `ray "
                            f"start --head` prints it), 'local' or 'auto', got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        raise ExecutorError("EHOSTUNREACH", f"--ray {address}: no Ray cluster answers there "
                            f"({err.strerror or err}); start one with `ray start --head` on that "
                            f"host, or give --ray local") from None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Ray's C++ client logs every retry of a connection that fails to fd 2 (twenty lines for
    an address where something else answers); the error raised after says it once."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class RayExecutor:
    """Node processes on a Ray cluster: `address` is a head's HOST:PORT, 'auto' (the cluster
    this host belongs to) or 'local' (a Ray instance of its own, started here)."""

    def __init__(self, address: str, placement: str = "pack"):
        _known(placement)
        try:
            import importlib
            import ray
            # the module: ray.util's attribute of that name is its function
            pg_mod = importlib.import_module("ray.util.placement_group")
        except ImportError:
            raise ExecutorError("ENOPKG", "gvtbench run --ray needs Ray: pip install 'ray>=2.9' "
                                "(it is in the test extra: pip install -e '.[test]')") from None
        self.ray, self.pg_mod = ray, pg_mod
        self.address, self.choice = address, placement
        self.owned = not ray.is_initialized()       # a caller's own Ray connection is left open
        if self.owned:
            if address not in ("local", "auto"):
                _reachable(address)
            try:
                # the nodes write their own logs: nothing of the actors' output on the console
                with _quiet_stderr():
                    ray.init(address=address, log_to_driver=False,
                             include_dashboard=False if address == "local" else None,
                             logging_level=logging.WARNING)
            except Exception as err:
                raise ExecutorError("ECONNREFUSED", f"--ray {address}: Ray did not start or "
                                    f"connect: {err}") from None
        self.pg: Any = None
        self.strategy = ""
        self.actors: dict[str, Any] = {}
        self.where: dict[str, dict[str, Any]] = {}   # process -> its actor's node, host, bundle
        self.started: list[dict[str, Any]] = []      # every node process started: where, its pid
        self._keys: dict[str, str] = {}
        self.closed = False

    def get(self, ref: Any, what: str, timeout: float = RPC_TIMEOUT_S) -> Any:
        """ray.get, with Ray's failures said as what they mean for the run."""
        exc = self.ray.exceptions
        try:
            return self.ray.get(ref, timeout=timeout)
        except exc.GetTimeoutError:
            raise ExecutorError("ETIMEDOUT", f"{what}: its Ray actor did not answer within "
                                f"{timeout:g} s") from None
        except exc.RayActorError as err:
            raise ActorGone("ESRCH", f"{what}: its Ray actor died: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        except exc.RayTaskError as err:
            cause = err.cause
            raise ExecutorError("EIO", f"{what}: {getattr(cause, 'text', None) or cause}") from None

    def check(self, cfg: dict) -> None:
        ray_strategy(self.choice, cfg)

    def place(self, processes: list[str], cfg: dict, run_id: str) -> None:
        ray = self.ray
        if self.closed:
            raise ExecutorError("EINVAL", "a RayExecutor serves one run: make a new one")
        self.strategy = ray_strategy(self.choice, cfg)
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if self.strategy == "STRICT_SPREAD" and len(processes) > len(alive):
            raise ExecutorError("ENOSPC", f"Ray placement strict-spread needs a Ray node per node "
                                f"process: {len(processes)} processes ({', '.join(processes)}), "
                                f"{len(alive)} Ray nodes alive")
        bundle = {"CPU": BUNDLE_CPU}
        if one_host(cfg):
            # the launcher's host: the node:<ip> resource every Ray node on it has
            bundle[f"node:{ray.util.get_node_ip_address()}"] = HOST_SHARE
        timeout = cfg["run"]["start_timeout_s"]
        self.pg = self.pg_mod.placement_group([dict(bundle) for _ in processes],
                                              strategy=self.strategy, name=f"gvtbench-{run_id}")
        try:
            ray.get(self.pg.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ExecutorError("ENOSPC", f"Ray could not place {len(processes)} node processes "
                                f"({self.strategy}, {bundle}) within {timeout:g} s on "
                                f"{len(alive)} Ray nodes (see `ray status`)") from None
        bundle_nodes = self.pg_mod.placement_group_table(self.pg)["bundles_to_node_id"]
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        slot = ray.remote(NodeSlot)
        for i, proc in enumerate(processes):
            self.actors[proc] = slot.options(
                num_cpus=BUNDLE_CPU, max_restarts=0, name=f"gvtbench-{run_id}-{proc.replace('/', '-')}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=i)).remote()
        for i, proc in enumerate(processes):
            self.where[proc] = {**self.get(self.actors[proc].where.remote(), proc, timeout),
                                "bundle": i, "bundle_node_id": bundle_nodes[i]}

    def tcp_endpoints(self, process: str | None, host: str, count: int) -> list[str]:
        """On the address Ray knows the host by (run.host is the launcher's own choice, for
        runs on one machine): the launcher's host for its own endpoint, the actor's for a node."""
        if process is None:
            ip = self.ray.util.get_node_ip_address()
            return [f"tcp://{ip}:{p}" for p in free_ports(ip, count)]
        return self.get(self.actors[process].free_ports.remote(count), f"{process}: free ports")

    def keys_for(self, process: str, keys_dir: str, names: list[str]) -> str:
        """Shipped to the actor: every public key and only the secret keys of its own nodes."""
        if process not in self._keys:
            d = Path(keys_dir)
            files = {f.name: f.read_bytes() for f in sorted(d.glob("*.key"))}
            files.update({f"{key_stem(n)}.key_secret": (d / f"{key_stem(n)}.key_secret").read_bytes()
                          for n in names})
            self._keys[process] = self.get(self.actors[process].ship.remote(files),
                                           f"{process}: keys")
        return self._keys[process]

    def start(self, name: str, argv: list[str], log_path: str,
              env: dict[str, str] | None = None) -> RayProcess:
        actor = self.actors[name]
        pid = self.get(actor.start.remote(argv[1:], log_path, env), f"{name}: start")
        self.started.append({"process": name, "pid": pid, **self.where[name]})
        return RayProcess(self, name, actor, pid)

    def placement(self) -> dict[str, dict[str, Any]]:
        """Where each node process runs: its actor's Ray node, host and bundle."""
        return {p: dict(w) for p, w in self.where.items()}

    def close(self) -> None:
        ray = self.ray
        self.closed = True
        for proc, actor in self.actors.items():
            try:
                self.get(actor.stop.remote(5.0), f"{proc}: stop", timeout=RPC_TIMEOUT_S)
            except ExecutorError:
                pass            # gone already: its processes died with it
            ray.kill(actor)
        self.actors = {}
        if self.pg is not None:
            self.pg_mod.remove_placement_group(self.pg)
            self.pg = None
        if self.owned and ray.is_initialized():
            ray.shutdown()
