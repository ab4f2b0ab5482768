"""The site harness (swarm_testing/site.py) end to end: a broker and three node
daemons in network namespaces; submit and status across namespaces; nothing
reaches the broker without the token; the broker and a node survive SIGKILL
and restart. (The site-job e2e tests build on this harness.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from swarm_testing.netns import list_links, list_namespaces
from swarm_testing.site import SiteNet
from tests.sitejob.test_control import spec_text

pytestmark = [pytest.mark.netns, pytest.mark.nats, pytest.mark.timeout(180)]


def test_submit_and_status_across_namespaces_and_no_client_without_the_token(
    tmp_path: Path,
) -> None:
    spec = tmp_path / "job.toml"
    spec.write_text(spec_text("mc", max_events=95))
    # work = false: the nodes take no range, so the counts below stay put
    # (with the site worker merged, nodes that work would run them).
    site = SiteNet(
        tmp_path / "site", nodes=3, site={"work": False}, per_node=[{"runner": {"cores": 2}}]
    )
    with site:
        assert all(n.proc is not None and n.proc.poll() is None for n in site.nodes)
        job = site.submit(spec, "--ack-wait", "3", on=0)  # from node 0's namespace
        seen = site.status(job, on=2)  # from another node's namespace
        assert seen["events_planned"] == 95 and seen["ack_wait"] == 3
        assert seen["ranges"] == {
            "ready": 10, "running": 0, "finished": 0, "retrying": 0, "abandoned": 0
        }  # fmt: skip
        assert site.status(job)["id"] == job  # from the broker's namespace (control config)
        r = site.swarm("site-job", "list", "--json", on=1)
        assert r.returncode == 0 and job in r.stdout, r.stderr

        refused = site.connect_without_token(on=1)
        assert refused.startswith("refused") and "authorization" in refused.lower(), refused
        wrong = site.connect_without_token(on=1, token="not-the-token")
        assert wrong.startswith("refused"), wrong
        assert site.connect_without_token(on=1, token=site.token) == "connected"

        # The broker's store survives a SIGKILL (sync_interval always).
        site.kill_broker()
        r = site.swarm("site-job", "status", job, on=0)
        assert r.returncode == 6 and site.url in r.stderr, (r.returncode, r.stderr)
        site.start_broker()
        assert site.status(job, on=0)["ranges"] == seen["ranges"]

        # A node killed with SIGKILL starts again on the same data directory.
        site.kill_node(1)
        site.start_node(1)
        assert site.nodes[1].proc is not None and site.nodes[1].proc.poll() is None
        pids = [n.proc.pid for n in site.nodes if n.proc is not None]
        assert site.broker is not None and site.broker.proc is not None
        pids.append(site.broker.proc.pid)
    # Everything is gone: the processes (by PID) and the namespaces.
    assert not any(_alive(pid) for pid in pids)
    assert not set(site.net.names()) & set(list_namespaces() + list_links())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_restarted_broker_is_listening_when_start_broker_returns(tmp_path: Path) -> None:
    # NatsServer in a namespace waits for "Server is ready" in its log; after
    # a SIGKILL the previous run's line is still in the tail, so a restart
    # returned at once, before the new server listened (NatsServer now reads
    # only what this start logged).
    with SiteNet(tmp_path / "site", nodes=1, start_nodes=False) as site:
        for _ in range(2):
            site.kill_broker()
            site.start_broker()
            probe = f"exec 3<>/dev/tcp/{site.broker_host.addr}/4222"
            assert site.broker_host.run(["bash", "-c", probe]).returncode == 0


def test_the_harness_kills_and_restarts_a_gather(tmp_path: Path) -> None:
    spec = tmp_path / "job.toml"
    spec.write_text(spec_text("mc", max_events=20))
    with SiteNet(tmp_path / "site", nodes=1, site={"work": False}) as site:
        job = site.submit(spec)
        g = site.start_gather(job, tmp_path / "out")  # no node works: it waits
        site.kill_gather(g)
        assert g.proc.returncode == -9
        again = site.restart_gather(g)
        assert again.proc.poll() is None and again.output == g.output
        unknown = site.start_gather("20250101-000000-000-abcdef", tmp_path / "out2", on=0)
        code, report = site.wait_gather(unknown, 60)
        assert code == 1 and report is None
        assert "no site job" in unknown.stderr.read_text()
