"""The tcp endpoints a run hands out: ports free when chosen, distinct, and below the kernel's
ephemeral range (where the run's own outgoing connections would take them before their node
binds them); and a port two processes on one host were both given is asked for again."""
import socket

from bench import config
from bench.executor import PORTS_FROM, LocalExecutor, _ephemeral_start, free_ports
from bench.launch import Launcher


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    ports = free_ports("127.0.0.1", 300)
    assert len(set(ports)) == 300
    top = _ephemeral_start()
    if top - PORTS_FROM > 2200:
        assert all(PORTS_FROM <= p < top for p in ports), (top, sorted(ports)[-3:])
    for p in ports[:20]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", p))


class _OnePortFirst(LocalExecutor):
    """A local executor whose first answers (one per binder, as separate hosts' processes would
    each find it free) are all the same port."""

    def __init__(self, port: int):
        super().__init__()
        self.port, self.asked = port, 0

    def tcp_endpoints(self, process, host, count):
        self.asked += 1
        if self.asked <= 3:
            return [f"tcp://{host}:{self.port}"] + super().tcp_endpoints(process, host, count - 1)
        return super().tcp_endpoints(process, host, count)


def test_an_endpoint_given_to_two_binders_is_asked_for_again():
    cfg = config.validate({"run": {"transport": "tcp", "fabric": "msg"},
                           "vgpus": {"count": 2, "ram_mib": 4}}, "test")
    port = free_ports("127.0.0.1", 1)[0]
    ex = _OnePortFirst(port)
    eps = Launcher(cfg, executor=ex)._endpoints()
    assert len(set(eps.values())) == len(eps), eps
    assert sum(1 for ep in eps.values() if ep.endswith(f":{port}")) == 1
    assert ex.asked > 3         # the two that came second were asked for again


def test_a_node_whose_start_up_failed_fails_the_run_at_once_not_at_the_timeout():
    from bench.launch import RunFailed
    import pytest
    cfg = config.validate({"vgpus": {"count": 2, "ram_mib": 4}}, "test")
    launcher = Launcher(cfg)
    names = launcher.topo.node_ids()
    launcher.core.ready["hypervisor/0"] = {"error": "hypervisor acked nothing"}
    waiting = launcher.wait_ready(names)
    with pytest.raises(RunFailed, match="hypervisor/0: hypervisor acked nothing"):
        next(waiting)           # no Sleep first: the others are not waited for
