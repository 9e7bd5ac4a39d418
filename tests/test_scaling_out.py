"""Scaling out (SPEC §13, README "Scaling out"): three hosts, one JetStream stream, each event once.

A real 3-node JetStream cluster (Debian's nats-server) on 127.0.0.1; three handler hosts
(`serve` + `forward --follow`, each with its own data folder) behind one nginx upstream
(round-robin), each behind a proxy that loses some answers after the host stored the
callback, so SMSC's retries land on another host and two hosts hold the same event. The
example examples/nats_publish_hook.py publishes with ``Nats-Msg-Id: <event_id>``.
Mid-run one host is killed (every process of it) and restarted on its data folder, and
one NATS node that does not lead the stream is killed. Then: every callback SMSC got a
200 for is in the stream exactly once, and nothing else is.
"""

import shutil
import subprocess
import sys
import threading
import time

import pytest
from cli_util import wait_until
from cluster_util import PUBLISHER, FaultProxy, Host, NatsCluster, Nginx, Smsc

pytest.importorskip("nats", reason="nats-py is the example's dependency (pip install nats-py)")
for program in ("nats-server", "nginx"):
    if not (shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin")):
        pytest.skip("%s is not installed" % program, allow_module_level=True)


@pytest.fixture
def cluster(tmp_path):
    nats = NatsCluster(tmp_path / "nats").start()
    yield nats
    nats.stop()


def init_stream(cluster, stream, subject):
    """Create the stream with the example's --init (3 replicas, 4 h window), as the README says."""
    def created():
        done = subprocess.run([sys.executable, str(PUBLISHER), "--servers", cluster.urls, "--init", "--stream",
                               stream, "--subject", subject, "--timeout", "2"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=30)
        return done.returncode == 0 and "stream %s ready" % stream in done.stdout
    wait_until(created, timeout=40, interval=0.5)  # JetStream elects its meta leader first
    info = cluster.stream_info(stream)
    assert info.config.num_replicas == 3
    assert info.config.duplicate_window >= 4 * 3600  # SMSC retries for 3 h 20 min
    return info


def deploy(tmp_path, cluster, mode, stream, subject, drop):
    hosts = [Host(tmp_path / ("host%d" % i), cluster, mode, stream, subject).start() for i in range(3)]
    proxies = [FaultProxy(host.port, drop=drop, seed=index) for index, host in enumerate(hosts)]
    nginx = Nginx(tmp_path / "nginx", [proxy.port for proxy in proxies])
    return hosts, proxies, nginx


def assert_exactly_the_acknowledged(cluster, stream, smsc, hosts, timeout):
    expected = set(smsc.acknowledged.values())
    assert not smsc.gave_up, "SMSC gave up on %d callbacks" % len(smsc.gave_up)
    wait_until(lambda: all(host.caught_up() for host in hosts), timeout=timeout, interval=0.5)
    ids = cluster.message_ids(stream)
    assert len(ids) == len(set(ids)), "a callback is in the stream twice"
    assert set(ids) == expected  # every acknowledged callback once, nothing else


def stored_on_two_hosts(hosts):
    from collections import Counter
    held = Counter()
    for host in hosts:
        ids = set()
        for line in (host.folder / "data" / "status.jsonl").read_text().splitlines():
            ids.add(line.split('"event_id": "', 1)[1][:32])
        held.update(ids)
    return sum(1 for count in held.values() if count > 1)


def test_three_hosts_behind_nginx_publish_each_acknowledged_callback_once(tmp_path, cluster):
    init_stream(cluster, "SMSC", "smsc")
    hosts, proxies, nginx = deploy(tmp_path, cluster, "relay", "SMSC", "smsc", drop=0.05)
    smsc = Smsc(nginx.port, interval=0.1)
    count = 2000
    try:
        sender = threading.Thread(target=smsc.run, args=(count,), kwargs={"workers": 8})
        sender.start()
        # A host goes down mid-run (every process of it) and comes back on its data folder.
        wait_until(lambda: len(smsc.acknowledged) >= count * 0.3, timeout=120, interval=0.05)
        hosts[1].kill()
        before_kill = hosts[1].stored()
        time.sleep(1.5)
        hosts[1].start()
        # A NATS node that does not lead the stream dies.
        wait_until(lambda: len(smsc.acknowledged) >= count * 0.6, timeout=120, interval=0.05)
        leader = cluster.stream_info("SMSC").cluster.leader
        victim = next(name for name in cluster.names if name != leader)
        cluster.kill(victim)
        sender.join(timeout=180)
        assert not sender.is_alive()
        assert len(smsc.acknowledged) == count, smsc.gave_up[:3]
        assert 0 < before_kill < hosts[1].stored()  # it stored before the kill, and again after its restart
        lost = sum(proxy.lost for proxy in proxies)
        assert lost >= 20  # answers really were lost after storing ...
        assert stored_on_two_hosts(hosts) >= 10  # ... and retries really landed on another host
        assert_exactly_the_acknowledged(cluster, "SMSC", smsc, hosts, timeout=90)
    finally:
        nginx.stop()
        for host in hosts:
            host.kill()
        for proxy in proxies:
            proxy.close()


def test_the_example_as_a_hook_publishes_each_callback_once(tmp_path, cluster):
    init_stream(cluster, "SMSCHOOK", "hooked")
    hosts, proxies, nginx = deploy(tmp_path, cluster, "hook", "SMSCHOOK", "hooked", drop=0.2)
    smsc = Smsc(nginx.port, interval=0.05)
    try:
        smsc.run(60, workers=4)
        assert len(smsc.acknowledged) == 60
        assert sum(proxy.lost for proxy in proxies) >= 3
        assert_exactly_the_acknowledged(cluster, "SMSCHOOK", smsc, hosts, timeout=90)
    finally:
        nginx.stop()
        for host in hosts:
            host.kill()
        for proxy in proxies:
            proxy.close()
