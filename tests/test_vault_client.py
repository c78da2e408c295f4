"""Section "Vault client" against the real 3-node OpenBao cluster, with
tests/support/faultproxy.py in between: redirects (the token never leaves for
another origin, a loop ends, API calls are not redirected), a huge JSON
answer refused with bounded memory, and Vault-side faults (a sealed node,
the daemon's Vault restarting, the leader killed mid-snapshot: last, as
they break the cluster and heal it)."""

import re
import subprocess
import sys
import time

import pytest

import vault_snapshot_agent as vsa
from support.faults_support import MB, proxy_to, snapshot_gets, temp_files, verify_all, write_config
from support.harness import (ROOT, error_lines, read, run_main, snapshots, start_agent, stop,
                             wait_for)

pytestmark = pytest.mark.usefixtures("isolated_env")


# =============================================================================
# hostile answers: redirects, huge JSON
# =============================================================================


REDIRECTS = [
    ("307-other-port", 307, "{elsewhere}{path}"),
    ("302-other-port", 302, "{elsewhere}{path}"),
    ("301-other-port", 301, "{elsewhere}{path}"),
    ("303-other-port", 303, "{elsewhere}{path}"),
    ("308-other-port", 308, "{elsewhere}{path}"),
    ("localhost-instead-of-ip", 307, "http://localhost:{eport}{path}"),
    ("userinfo-trick", 307, "http://127.0.0.1:{pport}@127.0.0.1:{eport}{path}"),
    ("scheme-relative", 307, "//127.0.0.1:{eport}{path}"),
    ("https-same-host-and-port", 307, "https://127.0.0.1:{pport}{path}"),
]


@pytest.mark.parametrize("case_id,status,location", REDIRECTS, ids=[r[0] for r in REDIRECTS])
def test_snapshot_redirect_elsewhere_never_carries_the_token(bao_cluster, approle, tmp_path,
                                                             case_id, status, location):
    leader = bao_cluster.leader()
    snapdir = tmp_path / "snaps"
    with proxy_to(leader.addr) as elsewhere, proxy_to(leader.addr) as proxy:
        target = location.format(elsewhere=elsewhere.addr, path=vsa.SNAPSHOT_PATH,
                                 eport=elsewhere.port, pport=proxy.port)
        proxy.fail_requests(lambda m, p: p.startswith(vsa.SNAPSHOT_PATH), status=status, body=b"",
                            headers={"Location": target})
        config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
        code, log = run_main("-c", config, "--once", "--log-level", "debug")
        assert not elsewhere.saw_header("X-Vault-Token"), "%s: token sent to %s" % (case_id, target)
        assert elsewhere.requests == [], case_id
        assert len(snapshot_gets(proxy)) == 1, (case_id, proxy.requests)
    assert code == 0, "%s: exit %s\n%s" % (case_id, code, log)
    assert "Not running on leader node, skipping." in log
    assert snapshots(snapdir) == [] and temp_files(snapdir) == []


def test_same_origin_redirect_loop_stops_after_a_few_hops(bao_cluster, approle, tmp_path):
    snapdir = tmp_path / "snaps"
    with proxy_to(bao_cluster.leader().addr) as proxy:
        proxy.fail_requests(lambda m, p: p.startswith(vsa.SNAPSHOT_PATH), status=307, body=b"",
                            headers={"Location": proxy.addr + vsa.SNAPSHOT_PATH})
        config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
        code, log = run_main("-c", config, "--once")
        gets = len(snapshot_gets(proxy))
    assert code == 1, log
    errors = error_lines(log)
    assert len(errors) == 1 and "too many redirects" in errors[0], log
    assert gets == 1 + vsa.MAX_REDIRECTS, gets
    assert snapshots(snapdir) == []


@pytest.mark.parametrize("path", ["/v1/sys/leader", "/v1/auth/approle/login"])
def test_redirect_on_api_calls_is_not_followed(bao_cluster, approle, tmp_path, path):
    leader = bao_cluster.leader()
    with proxy_to(leader.addr) as elsewhere, proxy_to(leader.addr) as proxy:
        proxy.fail_requests(lambda m, p: p.startswith(path), status=307, body=b"",
                            headers={"Location": elsewhere.addr + path})
        config = write_config(tmp_path / "c.json", proxy.addr, approle, tmp_path / "snaps")
        code, log = run_main("-c", config, "--once", "--log-level", "debug")
        assert elsewhere.requests == [], "the agent followed a redirect of %s" % path
    assert code == 1, log
    errors = error_lines(log)
    assert len(errors) == 1 and "307" in errors[0], log
    assert approle.secret_id not in log


TRACED_MAIN = (
    "import sys, tracemalloc\n"
    "sys.path.insert(0, %r)\n"
    "import vault_snapshot_agent as vsa\n"
    "tracemalloc.start()\n"
    "code = vsa.main(sys.argv[1:])\n"
    "sys.stderr.write('TRACEMALLOC_PEAK %%d\\n' %% tracemalloc.get_traced_memory()[1])\n"
    "sys.exit(code)\n" % ROOT)


@pytest.mark.parametrize("path", ["/v1/sys/leader", "/v1/auth/approle/login"])
def test_huge_json_answer_is_refused_with_bounded_memory(bao_cluster, approle, tmp_path, path):
    body = b'{"is_self": true, "auth": null, "padding": "' + b"x" * (50 * MB) + b'"}'
    snapdir = tmp_path / "snaps"
    with proxy_to(bao_cluster.leader().addr) as proxy:
        rule = proxy.fail_requests(lambda m, p: p.startswith(path), status=200, body=body)
        config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
        proc = subprocess.run([sys.executable, "-I", "-c", TRACED_MAIN, "-c", config, "--once"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        assert rule.hits >= 1
    log = proc.stderr.decode("utf-8", "replace")
    peak = int(re.search(r"TRACEMALLOC_PEAK (\d+)", log).group(1))
    log = re.sub(r"TRACEMALLOC_PEAK \d+\n", "", log)
    assert proc.returncode == 1, log
    errors = error_lines(log)
    assert len(errors) == 1 and "refused" in errors[0], log
    assert "Traceback" not in log
    assert peak < 20 * MB, "%.0f MB of memory for a refused 50 MB answer" % (peak / MB)
    assert snapshots(snapdir) == []


# =============================================================================
# Vault-side faults (last: they break the cluster, then heal it)
# =============================================================================


def test_sealed_node_is_one_clear_error(bao_cluster, approle, tmp_path):
    node = bao_cluster.standbys()[0]
    snapdir = tmp_path / "snaps"
    try:
        bao_cluster.seal(node)
        config = write_config(tmp_path / "c.json", node.addr, approle, snapdir)
        code, log = run_main("-c", config, "--once")
    finally:
        bao_cluster.heal()
    assert code == 1, log
    errors = error_lines(log)
    assert len(errors) == 1 and "sealed" in errors[0], log
    assert "Traceback" not in log
    assert snapshots(snapdir) == [] and temp_files(snapdir) == []


def test_daemon_survives_its_vault_restarting(bao_cluster, approle, kv_data, tmp_path):
    node = bao_cluster.leader()
    snapdir = tmp_path / "snaps"
    config = write_config(tmp_path / "c.json", node.addr, approle, snapdir, frequency="1s")
    logfile = tmp_path / "agent.log"
    proc = start_agent(config, logfile)
    try:
        wait_for(lambda: "Cycle stored" in read(logfile), 30, "a first snapshot")
        bao_cluster.stop_node(node)
        mark = len(read(logfile))
        wait_for(lambda: read(logfile)[mark:].count("Snapshot cycle failed") >= 2, 30,
                 "failed cycles while Vault is down")
        assert proc.poll() is None, read(logfile)
        bao_cluster.start_node(node)
        bao_cluster.wait_ready()
        # The restarted node rejoins, usually as a standby (who leads after the
        # election is up to Raft): the daemon is back to normal cycles when it
        # either stores again or skips as a standby, without failing.
        mark = len(read(logfile))
        wait_for(lambda: re.search(r"Cycle stored|Not running on leader node, skipping\.",
                                   read(logfile)[mark:]), 60,
                 "a normal cycle once the node is back")
        later = len(read(logfile))
        time.sleep(3)
        assert "Snapshot cycle failed" not in read(logfile)[later:], read(logfile)[later:]
        assert proc.poll() is None
    finally:
        code = stop(proc)
        bao_cluster.heal()
    log = read(logfile)
    assert code == 0, log
    assert "Traceback" not in log
    assert len(verify_all(snapdir)) >= 1 and temp_files(snapdir) == []


def test_leader_killed_mid_snapshot_stores_nothing_then_the_new_leader_works(
        bao_cluster, approle, kv_data, tmp_path):
    old = bao_cluster.leader()
    snapdir = tmp_path / "snaps"
    try:
        with proxy_to(old.addr) as proxy:
            proxy.delay(0.05)           # ~8 s for the stream: time to kill in the middle
            config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
            logfile = tmp_path / "agent.log"
            proc = start_agent(config, logfile, sys.executable, "--once")
            try:
                wait_for(lambda: snapshot_gets(proxy), 30, "the snapshot request")
                time.sleep(0.5)
                bao_cluster.kill_node(old)
                code = proc.wait(60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        log = read(logfile)
        assert code == 1, log
        errors = error_lines(log)
        assert len(errors) == 1 and "snapshot" in errors[0].lower(), log
        assert "Traceback" not in log
        assert snapshots(snapdir) == [] and temp_files(snapdir) == []
        new = bao_cluster.wait_for_leader(exclude=old)
        config = write_config(tmp_path / "n.json", new.addr, approle, snapdir)
        code, log = run_main("-c", config, "--once")
        assert code == 0, log
        assert len(verify_all(snapdir)) == 1
    finally:
        bao_cluster.heal()
