"""Section "Command line": ``status``, what an operator types to see how the
agent is doing: per storage the last success with its snapshot and size, the
next run, failures, the last error, retention and re-verification; from the
running agent (its /status.json at metrics_address), else the status_file.
Exit 1 when the last cycle failed or was partial, or a storage is failing,
its retention is, or it holds bad snapshots.

The status files come from real runs of the Agent (in process, on a fake
clock, against a loopback FakeVault and, for a failing storage, an S3
endpoint that refuses every upload); a few are then edited the way a later
run would have written them (a retention error, a re-verification). The
running agent is the script as a subprocess."""

import datetime
import io
import json
import os
import re
import sys

import pytest

import vault_snapshot_agent as vsa
from support.agent_sim import START, ScriptedVault, run_daemon
from support.fake_endpoints import Endpoint, FakeVault
from support.harness import (FakeClock, FakeSignals, child_env, free_port, read, reaped, start_agent, stop,
                             wait_for)

HEADER = re.compile(r"vault-snapshot-agent %s \(pid (\d+)\), from (.+)\n" % re.escape(vsa.__version__))
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
              "ALL_PROXY", "NO_PROXY")


def refusing_s3(request):
    return 403, {"Content-Type": "application/xml"}, (
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied</Code>"
        "<Message>Access Denied</Message></Error>")


def offsite(endpoint):
    """An aws_storage block named offsite at ``endpoint`` (which refuses)."""
    return {"name": "offsite", "access_key_id": "AKIDSTATUSTEST", "secret_access_key": "status-test-secret",
            "s3_endpoint": endpoint.url, "s3_region": "us-east-1", "s3_bucket": "snapshots"}


def storages(tmp_path):
    return [{"name": "hourly", "path": str(tmp_path / "hourly")},
            {"name": "daily", "path": str(tmp_path / "daily"), "frequency": "24h"}]


def recent(hours_ago=0):
    """The real time ``hours_ago`` hours ago, in whole seconds: status files
    as fresh as a running agent's (the fake clock's 2026-01-01 would be old)."""
    now = datetime.datetime.now(vsa.UTC).replace(microsecond=0)
    return now - datetime.timedelta(hours=hours_ago)


def agent_run(tmp_path, sealed=False, at=None, **config):
    """One cycle of the daemon at ``at`` (default: now), then stopped; two
    local storages; writes ``tmp_path/status.json``: (its config file, the
    status file)."""
    tmp_path.mkdir(exist_ok=True)
    clock = FakeClock(at or recent(), START)
    status = str(tmp_path / "status.json")
    with ScriptedVault(clock) as vault:
        vault.sealed = lambda t: sealed
        run_daemon(tmp_path, vault, clock, FakeSignals(clock, until=START + 60), status_file=status,
                   local_storage=storages(tmp_path), **config)
    return str(tmp_path / "c.json"), status


def status_command(config):
    """``status -c config`` in process: (exit code, what it printed, its log)."""
    out, log = io.StringIO(), io.StringIO()
    code = vsa.main(["status", "-c", config], stream=log, env={}, out=out)
    return code, out.getvalue(), log.getvalue()


def edit(path, change):
    with open(path) as handle:
        doc = json.load(handle)
    change(doc)
    with open(path, "w") as handle:
        json.dump(doc, handle)


def rewrite_config(path, **changes):
    with open(path) as handle:
        doc = json.load(handle)
    doc.update(changes)
    doc = dict((k, v) for k, v in doc.items() if v is not None)
    with open(path, "w") as handle:
        json.dump(doc, handle)


# -- from the status file --------------------------------------------------------------


def test_status_from_the_status_file_shows_each_storage_and_exits_0(tmp_path):
    at = recent()
    config, status = agent_run(tmp_path, at=at)
    code, out, log = status_command(config)
    assert code == 0, log
    [hourly] = os.listdir(str(tmp_path / "hourly"))
    [daily] = os.listdir(str(tmp_path / "daily"))
    size = vsa.format_size(os.path.getsize(str(tmp_path / "hourly" / hourly)))
    assert hourly == daily == vsa.snapshot_name(at)
    when, hour, day = (vsa.iso(at + datetime.timedelta(hours=h)) for h in (0, 1, 24))
    assert out == (
        "vault-snapshot-agent %s (pid %d), from %s\n" % (vsa.__version__, os.getpid(), status)
        + "  leader: yes, last cycle: stored at %s, next: %s\n" % (when, hour)
        + "hourly (local:%s)\n" % (tmp_path / "hourly")
        + "  last success   %s  %s (%s)\n" % (when, hourly, size)
        + "  next run       %s\n" % hour
        + "  failures       0 in a row (0 in all)\n"
        + "  last error     -\n"
        + "daily (local:%s)\n" % (tmp_path / "daily")
        + "  last success   %s  %s (%s)\n" % (when, daily, size)
        + "  next run       %s\n" % day
        + "  failures       0 in a row (0 in all)\n"
        + "  last error     -\n")
    assert vsa.format_size(os.path.getsize(str(tmp_path / "daily" / daily))) == size
    assert " ERROR " not in log


def test_a_failing_storage_is_shown_with_its_error_and_exits_1(tmp_path):
    at = recent()
    with Endpoint(refusing_s3) as s3:
        config, _ = agent_run(tmp_path, at=at, aws_storage=offsite(s3))
    code, out, log = status_command(config)
    assert code == 1
    when, retry = vsa.iso(at), vsa.iso(at + datetime.timedelta(minutes=1))     # retry_interval 1m
    assert "  leader: yes, last cycle: partial at %s" % when in out
    error = re.search(r"^  last error: (.+)$", out, re.M).group(1)
    assert error.startswith("offsite (s3://snapshots/raft_snapshots/): S3 PutObject on raft_snapshots/%s: "
                            "HTTP 403 AccessDenied: Access Denied" % vsa.snapshot_name(at)), error
    section = out.split("offsite (s3://snapshots/raft_snapshots/)\n", 1)[1]
    assert section.startswith("  last success   never  \n  next run       %s\n"
                              "  failures       1 in a row (1 in all)\n"
                              "  last error     S3 PutObject on raft_snapshots/" % retry), section
    assert section.rstrip("\n").endswith(" (at %s)" % when)
    assert "hourly (local:" in out and "daily (local:" in out
    assert "ERROR Failing or holding bad snapshots: the last cycle (partial), offsite" in log


def test_a_failed_cycle_exits_1_with_its_error(tmp_path):
    config, _ = agent_run(tmp_path, sealed=True)
    code, out, log = status_command(config)
    assert code == 1
    assert re.search(r"  leader: unknown, last cycle: failed at \S+Z, next: ", out), out
    assert re.search(r"^  last error: .*sealed", out, re.M | re.I), out
    assert "  last success   never  \n" in out
    assert "Failing or holding bad snapshots: the last cycle (failed)" in log


BAD = "raft_snapshot-20251231T231640.000Z.snap"
VERIFIED = vsa.iso(recent())


@pytest.mark.parametrize("change,code,shown", [
    (lambda d: d["storages"]["daily"].update(retention_error="cannot list: HTTP 503"), 1,
     "  retention      failing: cannot list: HTTP 503\n"),
    (lambda d: d["storages"]["hourly"].update(last_verified=VERIFIED,
                                              bad_snapshots={BAD: "checksum differs"}), 1,
     "  last verified  %s, 1 bad: %s\n" % (VERIFIED, BAD)),
    (lambda d: d["storages"]["hourly"].update(last_verified=VERIFIED, verified_snapshots=1), 0,
     "  last verified  %s, 0 bad\n" % VERIFIED),
    (lambda d: d["storages"]["daily"].update(failures_in_a_row=2, failures=3), 1,
     "  failures       2 in a row (3 in all)\n"),
    (lambda d: d.update(is_leader=False, last_outcome="skipped"), 0,
     "  leader: no, last cycle: skipped at "),
], ids=["retention-error", "bad-snapshot", "verified-good", "failures-in-a-row", "standby"])
def test_exit_code_follows_what_the_storages_report(tmp_path, change, code, shown):
    config, status = agent_run(tmp_path)
    edit(status, change)
    got, out, log = status_command(config)
    assert got == code, (out, log)
    assert shown in out
    assert (" ERROR " in log) == (code == 1)


def test_a_status_file_older_than_two_frequencies_exits_1(tmp_path):
    # The agent died 5 hours ago (frequency 1h) after a good cycle: its file
    # still says all is well. cmd_status's docstring: exit 1 when "nothing
    # stored for two frequencies", as /healthz would say 503.
    config, _ = agent_run(tmp_path, at=recent(hours_ago=5))
    code, out, log = status_command(config)
    assert code == 1, out + log


# -- from the running agent ------------------------------------------------------------


def test_status_prefers_the_running_agent_and_falls_back_to_the_file(tmp_path):
    config, stale = agent_run(tmp_path / "old")         # all well, pid: ours
    port = free_port()
    with FakeVault(role_id="r", secret_id="s") as vault, Endpoint(refusing_s3) as s3:
        doc = {"addr": vault.url, "role_id": "r", "secret_id": "s", "frequency": "1h",
               "metrics_address": "127.0.0.1:%d" % port, "aws_storage": offsite(s3),
               "local_storage": {"name": "hourly", "path": str(tmp_path / "live")}}
        running = tmp_path / "running.json"
        running.write_text(json.dumps(doc))
        os.chmod(str(running), 0o600)
        rewrite_config(config, metrics_address="127.0.0.1:%d" % port)    # and its status_file: stale
        env = child_env(drop=PROXY_VARS, drop_prefixes=("VAULT_", "BAO_", "AWS_"),
                        AWS_EC2_METADATA_DISABLED="true")
        log = tmp_path / "agent.log"
        with reaped(start_agent(str(running), str(log), sys.executable, env=env)) as proc:
            wait_for(lambda: proc.poll() is not None or "Cycle partial" in read(log), 30,
                     "the agent's first cycle")
            code, out, _ = status_command(config)
            assert stop(proc) == 0
    pid, where = HEADER.match(out).groups()
    assert (int(pid), where) == (proc.pid, "the running agent at http://127.0.0.1:%d/status.json" % port)
    assert code == 1 and "offsite (s3://snapshots/raft_snapshots/)\n" in out
    assert "daily" not in out                       # the stale file's storage: not read
    code, out, log = status_command(config)         # stopped: the status file it is
    pid, where = HEADER.match(out).groups()
    assert (int(pid), where, code) == (os.getpid(), stale, 0)
    assert "offsite" not in out and "daily (local:" in out


# -- nothing to show -------------------------------------------------------------------


def other_service(request):
    return 200, {"Content-Type": "text/plain"}, b"node_cpu_seconds_total 1\n"


@pytest.mark.parametrize("setup,message", [
    (lambda tmp, port: {}, "no status to show: set status_file or metrics_address in the config"),
    (lambda tmp, port: {"status_file": write(tmp / "s.json", "not json {")},
     "no status to show: %(tmp)s/s.json: Expecting value: line 1 column 1 (char 0)"),
    (lambda tmp, port: {"status_file": str(tmp / "missing.json")},
     "no status to show: %(tmp)s/missing.json: No such file or directory"),
    (lambda tmp, port: {"status_file": write(tmp / "s.json", "[1, 2]")},
     "%(tmp)s/s.json is not the agent's status"),
    (lambda tmp, port: {"metrics_address": "127.0.0.1:%d" % port},
     "no status to show: GET http://127.0.0.1:%(port)d/status.json: Connection refused"),
], ids=["neither", "file-not-json", "file-missing", "file-not-a-status", "nothing-listens"])
def test_nothing_to_show_is_one_line_and_exit_1(tmp_path, setup, message):
    port = free_port()
    config, _ = agent_run(tmp_path / "run")
    changes = {"status_file": None, "metrics_address": None}
    changes.update(setup(tmp_path, port))
    rewrite_config(config, **changes)
    code, out, log = status_command(config)
    assert (code, out) == (1, "")
    lines = log.splitlines()
    assert len(lines) == 1 and " ERROR status failed: " in lines[0], log
    assert message % {"tmp": tmp_path, "port": port} in lines[0], lines[0]


def test_a_metrics_address_that_is_not_the_agent_is_one_line(tmp_path):
    # Another program on that port (an exporter answering text): not JSON.
    config, _ = agent_run(tmp_path)
    with Endpoint(other_service) as other:
        rewrite_config(config, status_file=None, metrics_address="127.0.0.1:%d" % other.port)
        code, out, log = status_command(config)
    assert (code, out) == (1, "")
    assert len(log.splitlines()) == 1 and "not JSON: node_cpu_seconds_total 1" in log, log


def write(path, text):
    path.write_text(text)
    return str(path)
