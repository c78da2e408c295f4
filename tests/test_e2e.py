"""The agent end to end against a real 3-node OpenBao Raft cluster.

Each test runs the real program (``main([...])`` in-process or as a
subprocess) and checks what an operator would: files that exist and verify,
exit codes, log lines, nothing left behind, no secret in any log line.
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import vault_snapshot_agent as vsa
from support.faultproxy import FaultProxy
from support.harness import read, run_main, snapshots, start_agent, stop, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(ROOT, "vault_snapshot_agent.py")
TOKEN_RE = re.compile(r"\b(?:hvs|hvb|s|b|sb)\.[A-Za-z0-9_-]{20,}")

pytestmark = pytest.mark.e2e


# -- helpers -------------------------------------------------------------------

def write_config(path, addr, approle, snapdir, **extra):
    config = {"addr": addr, "role_id": approle.role_id, "secret_id": approle.secret_id,
              "approle": approle.mount, "frequency": "1h", "retain": 0,
              "local_storage": {"path": str(snapdir)}}
    config.update(extra)
    with open(str(path), "w") as handle:
        json.dump(config, handle)
    return str(path)


def leftovers(snapdir):
    return [n for n in os.listdir(str(snapdir)) if n.startswith(".")]


def assert_no_secrets(log, approle):
    assert approle.secret_id not in log
    assert not TOKEN_RE.search(log), TOKEN_RE.search(log).group(0)


# -- one cycle -------------------------------------------------------------------

def test_once_on_leader_stores_a_verified_0600_snapshot(bao_cluster, approle, tmp_path):
    snapdir = tmp_path / "snaps"
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir)
    code, log = run_main("-c", config, "--once", "--log-level", "debug")
    assert code == 0, log
    names = snapshots(snapdir)
    assert len(names) == 1, log
    path = os.path.join(str(snapdir), names[0])
    info = vsa.verify_file(path)
    assert info.size > 0 and info.index > 0 and info.term > 0
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert "Successfully created local snapshot to %s" % path in log
    assert "Raft index %s term %s" % (info.index, info.term) in log
    assert leftovers(snapdir) == []
    assert_no_secrets(log, approle)


def test_once_on_a_standby_skips_and_stores_nothing(bao_cluster, approle, tmp_path):
    snapdir = tmp_path / "snaps"
    config = write_config(tmp_path / "c.json", bao_cluster.standbys()[0].addr, approle, snapdir)
    code, log = run_main("-c", config, "--once")
    assert code == 0, log
    assert "Not running on leader node, skipping." in log
    assert not os.path.exists(str(snapdir)) or os.listdir(str(snapdir)) == []


def test_retention_keeps_exactly_retain_including_go_agent_files(bao_cluster, approle, tmp_path):
    snapdir = tmp_path / "snaps"
    snapdir.mkdir()
    old_go = ["raft_snapshot-%d.snap" % (1700000000000000000 + i) for i in range(3)]
    for name in old_go + ["keep-me.txt"]:
        (snapdir / name).write_bytes(b"old")
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir,
                          retain=2)
    made = []
    for _ in range(4):
        code, log = run_main("-c", config, "--once")
        assert code == 0, log
        made.append(snapshots(snapdir)[-1])
        time.sleep(0.01)
    assert snapshots(snapdir) == sorted(made[-2:])
    assert (snapdir / "keep-me.txt").exists()
    for name in snapshots(snapdir):
        vsa.verify_file(str(snapdir / name))


def test_unreachable_vault_fails_once_with_exit_1_and_one_line(tmp_path, approle):
    snapdir = tmp_path / "snaps"
    config = write_config(tmp_path / "c.json", "http://127.0.0.1:9", approle, snapdir)
    code, log = run_main("-c", config, "--once")
    assert code == 1
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "127.0.0.1:9" in errors[0], log
    assert "Traceback" not in log


def test_wrong_secret_id_fails_with_a_clear_line_and_no_secret(bao_cluster, approle, tmp_path):
    snapdir = tmp_path / "snaps"
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir,
                          secret_id="00000000-wrong-secret-0000")
    code, log = run_main("-c", config, "--once", "--log-level", "debug")
    assert code == 1
    assert "approle login at auth/%s failed" % approle.mount in log
    assert "(login refused: check the credentials and the role)" in log, log
    assert "token's policy" not in log            # there is no token yet to blame
    assert "00000000-wrong-secret-0000" not in log
    assert snapshots(snapdir) == []


def test_secret_id_file_and_token_file_auth(bao_cluster, approle, tmp_path):
    snapdir = tmp_path / "snaps"
    sid = tmp_path / "secret_id"
    sid.write_text(approle.secret_id + "\n")
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir,
                          secret_id=None, secret_id_file=str(sid))
    code, log = run_main("-c", config, "--once")
    assert code == 0, log
    token = bao_cluster.login_approle(approle.role_id, approle.secret_id, approle.mount)
    tok = tmp_path / "token"
    tok.write_text(token)
    config = write_config(tmp_path / "t.json", bao_cluster.leader().addr, approle, snapdir,
                          role_id=None, secret_id=None, token_file=str(tok))
    code, log = run_main("-c", config, "--once", "--log-level", "debug")
    assert code == 0, log
    assert "Using token auth" in log
    assert token not in log
    assert len(snapshots(snapdir)) == 2


# -- the stream ------------------------------------------------------------------

@pytest.mark.parametrize("cut", [0, 300, 5000, 1000000, 7000000])
def test_truncated_stream_is_rejected_and_nothing_is_stored(bao_cluster, approle, kv_data, tmp_path,
                                                            cut, monkeypatch):
    leader = bao_cluster.leader()
    port = int(leader.addr.rsplit(":", 1)[1])
    snapdir = tmp_path / "snaps"
    with FaultProxy("127.0.0.1", port) as proxy:
        config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
        # Only the snapshot download is cut: login and leader checks pass.
        real_request = vsa.Http.request

        def request(self, method, url, *args, **kwargs):
            if url.endswith(vsa.SNAPSHOT_PATH):
                proxy.cut_after(cut, times=1)
            return real_request(self, method, url, *args, **kwargs)
        monkeypatch.setattr(vsa.Http, "request", request)
        code, log = run_main("-c", config, "--once")
    assert code == 1, log
    assert "snapshot" in log.lower() and "ERROR" in log
    assert snapshots(snapdir) == []
    assert leftovers(snapdir) == []


def test_redirect_to_another_host_never_carries_the_token(bao_cluster, approle, tmp_path):
    leader = bao_cluster.leader()
    port = int(leader.addr.rsplit(":", 1)[1])
    snapdir = tmp_path / "snaps"
    with FaultProxy("127.0.0.1", port) as elsewhere, FaultProxy("127.0.0.1", port) as proxy:
        proxy.fail_requests(lambda m, p: p.startswith(vsa.SNAPSHOT_PATH), status=307, body=b"",
                            headers={"Location": elsewhere.addr + vsa.SNAPSHOT_PATH})
        config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
        code, log = run_main("-c", config, "--once")
        assert code == 0, log
        assert "Not running on leader node, skipping." in log
        assert elsewhere.requests == []
        assert proxy.saw_header("X-Vault-Token")     # it was sent to the configured node
    assert snapshots(snapdir) == []


def test_every_request_carries_x_vault_request(bao_cluster, approle, tmp_path):
    port = int(bao_cluster.leader().addr.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as proxy:
        config = write_config(tmp_path / "c.json", proxy.addr, approle, tmp_path / "s")
        code, log = run_main("-c", config, "--once")
        assert code == 0, log
        heads = proxy.request_heads
        assert len(heads) >= 4
        assert all(h.header("X-Vault-Request") == "true" for h in heads)


# -- tokens ------------------------------------------------------------------------

@pytest.mark.slow
def test_short_token_ttl_is_renewed_then_replaced_by_a_new_login(bao_cluster, tmp_path):
    role_id, secret_id = bao_cluster.setup_snapshot_approle(
        role="short-ttl", token_ttl="4s", token_max_ttl="9s")
    approle = type("A", (), {"role_id": role_id, "secret_id": secret_id, "mount": "approle"})
    snapdir = tmp_path / "snaps"
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir,
                          frequency="1s")
    logfile = tmp_path / "agent.log"
    proc = start_agent(config, logfile, sys.executable, "--log-level", "debug")
    def stored_after_second_login(text):
        logins = [i for i, line in enumerate(text.splitlines()) if "Logged in" in line]
        return len(logins) >= 2 and any("Successfully created" in line
                                        for line in text.splitlines()[logins[1]:])

    try:
        wait_for(lambda: "Renewed token" in read(logfile) and stored_after_second_login(read(logfile)),
                 60, "a renewal, a second login and a snapshot with the new token")
    finally:
        assert stop(proc) == 0
    log = read(logfile)
    assert "failed" not in log.lower(), log
    # snapshots went on with the renewed token and with the new one (not a count:
    # how many cycles fit in the 9 s of the first token depends on the machine)
    lines = log.splitlines()
    renewed = next(i for i, line in enumerate(lines) if "Renewed token" in line)
    assert any("Successfully created" in line for line in lines[renewed:])
    assert len(snapshots(snapdir)) >= 2
    assert_no_secrets(log, approle)


# -- signals -----------------------------------------------------------------------

def test_sigterm_while_idle_exits_0_within_a_second(bao_cluster, approle, tmp_path):
    snapdir = tmp_path / "snaps"
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir)
    logfile = tmp_path / "agent.log"
    proc = start_agent(config, logfile)
    try:
        wait_for(lambda: "Successfully created local snapshot" in read(logfile), 30, "a snapshot")
        time.sleep(0.3)
        started = time.monotonic()
        assert stop(proc) == 0
        assert time.monotonic() - started < 1.0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Stopping on SIGTERM" in read(logfile)
    assert len(snapshots(snapdir)) == 1 and leftovers(snapdir) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_during_transfer_leaves_nothing_and_exits_0(bao_cluster, approle, kv_data, tmp_path,
                                                         sig):
    leader = bao_cluster.leader()
    port = int(leader.addr.rsplit(":", 1)[1])
    snapdir = tmp_path / "snaps"
    with FaultProxy("127.0.0.1", port) as proxy:
        proxy.delay(0.5)     # every 64 KiB of answer takes half a second
        config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
        logfile = tmp_path / "agent.log"
        proc = start_agent(config, logfile, sys.executable, "--log-level", "debug")
        try:
            wait_for(lambda: any(r.startswith("GET " + vsa.SNAPSHOT_PATH) for r in proxy.requests),
                     60, "the snapshot request")
            time.sleep(1.0)
            started = time.monotonic()
            assert stop(proc, sig) == 0
            assert time.monotonic() - started < 5
        finally:
            if proc.poll() is None:
                proc.kill()
    log = read(logfile)
    assert "stopped by" in log, log
    assert os.listdir(str(snapdir)) == []


def test_sighup_reloads_and_a_broken_config_keeps_the_old_one(bao_cluster, approle, tmp_path):
    snapdir = tmp_path / "snaps"
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir)
    logfile = tmp_path / "agent.log"
    proc = start_agent(config, logfile)
    try:
        wait_for(lambda: "Successfully created local snapshot" in read(logfile), 30, "a snapshot")
        write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir,
                     frequency="2h", retain=5)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "Config reloaded" in read(logfile), 10, "the reload")
        assert "every 2h" in read(logfile)
        with open(config, "w") as handle:
            handle.write('{"addr": "http://x", "frequency": "often"')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "Config reload failed" in read(logfile), 10, "the failed reload")
        time.sleep(0.3)
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    assert "invalid JSON" in read(logfile)


# -- interpreters ------------------------------------------------------------------

def pyenv_interpreters():
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = {}
    for path in sorted(glob.glob(os.path.join(root, "versions", "3.*", "bin", "python3.*"))):
        match = re.search(r"python(3\.\d+)$", path)
        if match:
            found.setdefault(match.group(1), path)
    return found


def test_python_3_6_interpreter_is_present():
    # The floor is 3.6: CI must fail, not skip, when it cannot be exercised.
    assert "3.6" in pyenv_interpreters(), "no pyenv Python 3.6 found"


@pytest.mark.parametrize("version", ["3.%d" % minor for minor in range(6, 14)])
def test_every_python_runs_a_real_cycle(bao_cluster, approle, tmp_path, version):
    python = pyenv_interpreters().get(version)
    if python is None:
        if version == "3.6":
            pytest.fail("Python 3.6 is required and missing")
        pytest.skip("no pyenv Python %s on this machine" % version)
    snapdir = tmp_path / "snaps"
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir)
    proc = subprocess.run([python, "-I", AGENT, "-c", config, "--once"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    log = proc.stdout.decode()
    assert proc.returncode == 0, log
    names = snapshots(snapdir)
    assert len(names) == 1
    vsa.verify_file(str(snapdir / names[0]))
    assert "Successfully created local snapshot" in log
    standby = write_config(tmp_path / "s.json", bao_cluster.standbys()[0].addr, approle, snapdir)
    proc = subprocess.run([python, "-I", AGENT, "-c", standby, "--once"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0
    assert b"Not running on leader node, skipping." in proc.stdout


# -- failover (last: it restarts a node) --------------------------------------------

@pytest.mark.slow
def test_leader_killed_next_snapshot_comes_from_the_new_leader(bao_cluster, approle, tmp_path):
    procs = {}
    try:
        for node in bao_cluster.nodes:
            snapdir = tmp_path / node.name
            config = write_config(tmp_path / (node.name + ".json"), node.addr, approle, snapdir,
                                  frequency="1s")
            procs[node.name] = (start_agent(config, tmp_path / (node.name + ".log")), snapdir)
        old = bao_cluster.leader()
        wait_for(lambda: snapshots(procs[old.name][1]), 30, "a snapshot from the first leader")
        for node in bao_cluster.standbys():
            assert snapshots(procs[node.name][1]) == []
        bao_cluster.kill_node(old)
        new = bao_cluster.wait_for_leader(exclude=old)
        assert new.name != old.name
        wait_for(lambda: snapshots(procs[new.name][1]), 60, "a snapshot from the new leader")
        vsa.verify_file(str(procs[new.name][1] / snapshots(procs[new.name][1])[0]))
        for name, (proc, _) in procs.items():
            assert proc.poll() is None, "agent for %s died: %s" % (name, read(tmp_path / (name + ".log")))
    finally:
        for proc, _ in procs.values():
            stop(proc)
        bao_cluster.heal()
