"""Adversarial review of the schedule and storage code after issue 18, with
new shapes of its bug classes; each test fails until the agent is fixed.

* ``align`` with a ``jitter`` over half the frequency (a documented,
  accepted config) drops every period whose jitter passed the half: the
  next boundary is counted from the jittered start.
* Azure: a name another agent took is a NameClash only while the follow-up
  Get Blob Properties works; a SAS without read permission (write-only
  backups) or a blob gone meanwhile turns the clash into a failed upload,
  so no next millisecond is tried and the cycle retries with a new snapshot.
* A stop (SIGTERM) during the retention retry's ``sys/leader`` check is
  recorded as a failed retention (status, metric) and a new retry is
  scheduled, though a stop is a stop.

Loopback servers only (a FakeVault, a small fake Blob endpoint); a
FakeClock drives the schedule.
"""

import datetime
import hashlib
import io
import json
import os
import re
import time

import pytest

import vault_snapshot_agent as vsa
from archives import write_archive
from fake_endpoints import Endpoint, FakeVault
from harness import FakeClock, FakeSignals, clear_cloud_env, overridden, read

START = 1000.0
HOUR = 3600.0
UTC = vsa.UTC
NOW = datetime.datetime(2026, 1, 1, 0, 16, 40, tzinfo=UTC)
LEADER = "/v1/sys/leader"
SNAPSHOT = "/v1/sys/storage/raft/snapshot"


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    clear_cloud_env(monkeypatch, tmp_path, ("AWS_", "AZURE_", "VAULT_", "BAO_", "GOOGLE_"))


def fake_clock():
    """2026-01-01T00:16:40Z, monotonic() START."""
    return FakeClock(NOW, START)


class ScriptedVault(FakeVault):
    """FakeVault that always leads; every request noted as (t, method, path),
    ``t`` the fake seconds since START. ``on_leader(t)``, if given, runs on
    each sys/leader request before it is answered."""

    def __init__(self, clock, on_leader=None):
        FakeVault.__init__(self, role_id="r", secret_id="s")
        self.clock, self.on_leader = clock, on_leader
        self.timeline = []

    def respond(self, request):
        t = self.clock.monotonic() - START      # the agent is blocked on this request
        path = request.path.split("?", 1)[0]
        with self.lock:
            self.timeline.append((t, request.method, path))
        if path == LEADER:
            if self.on_leader is not None:
                self.on_leader(t)
            return 200, {}, {"ha_enabled": True, "is_self": True, "leader_address": self.url}
        return FakeVault.respond(self, request)

    def snapshot_times(self):
        with self.lock:
            return [t for t, m, p in self.timeline if p == SNAPSHOT and m == "GET"]


def run_agent(tmp_path, vault, clock, signals, rand=None, **config):
    """The daemon loop against ``vault`` until ``signals`` stops it (local
    storage in tmp_path/snaps unless ``config`` says otherwise); (agent, log)."""
    doc = {"addr": vault.url, "role_id": "r", "secret_id": "s", "frequency": "1h",
           "leader_poll": "0s", "local_storage": {"path": str(tmp_path / "snaps")}}
    overridden(doc, config)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    os.chmod(str(path), 0o600)
    stream = io.StringIO()
    handler = vsa._configure_logging(20, "text", stream)
    try:
        kwargs = {"rand": rand} if rand is not None else {}
        agent = vsa.Agent(lambda runtime: vsa.load_all(str(path), runtime), clock, signals,
                          env={}, **kwargs)
        agent.run_forever()
    finally:
        vsa.LOG.removeHandler(handler)
    return agent, stream.getvalue()


def clock_text(t):
    return (NOW + datetime.timedelta(seconds=t)).strftime("%H:%M:%S")


# =============================================================================
# align with a jitter over half the frequency
# =============================================================================


def test_align_with_a_jitter_over_half_the_frequency_is_refused(tmp_path):
    # align: true, frequency 1h, jitter 45m once ran: a cycle 40.5 min after
    # its boundary was followed by the boundary after next (7 snapshots in
    # 12 h, 2 h apart). Such a jitter cannot stay inside its period: refused.
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        with pytest.raises(vsa.ConfigError) as caught:
            run_agent(tmp_path, vault, clock, FakeSignals(clock, until=START + 12 * HOUR),
                      rand=lambda: 0.9, align=True, jitter="45m")
    assert "jitter" in str(caught.value) and "30m" in str(caught.value), caught.value


def test_align_with_a_jitter_under_half_the_frequency_keeps_every_period(tmp_path):
    # The largest accepted jitter, every draw near its top: one per hour.
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        _, log = run_agent(tmp_path, vault, clock, FakeSignals(clock, until=START + 12 * HOUR),
                           rand=lambda: 0.99, align=True, jitter="29m")
        taken = vault.snapshot_times()
    assert "Traceback" not in log and " ERROR " not in log, log
    assert len(taken) >= 11, [clock_text(t) for t in taken]


# =============================================================================
# Azure: a taken name whose Get Blob Properties fails
# =============================================================================


class ClashingBlobs(object):
    """A loopback Blob endpoint (SAS auth; signatures not checked): Put Blob
    with If-None-Match: * on an existing name is 409 BlobAlreadyExists, as
    Azure answers; Get Blob Properties answers ``head_status`` (403
    AuthorizationPermissionMismatch: a SAS with sp=cw, no read; 404: the
    blob was deleted in between)."""

    def __init__(self, head_status):
        self.blobs = {}
        self.head_status = head_status
        self.endpoint = Endpoint(self.respond)

    def respond(self, request):
        path = request.path.split("?", 1)[0]
        if request.method == "PUT":
            if path in self.blobs and request.headers.get("if-none-match") == "*":
                return 409, {"x-ms-error-code": "BlobAlreadyExists"}, (
                    b"<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>BlobAlreadyExists"
                    b"</Code><Message>The specified blob already exists.</Message></Error>")
            self.blobs[path] = request.body
            return 201, {"Content-MD5": request.headers.get("content-md5", "")}, b""
        if request.method == "HEAD":
            code = "AuthorizationPermissionMismatch" if self.head_status == 403 else "BlobNotFound"
            return self.head_status, {"x-ms-error-code": code}, b""
        return 404, {"x-ms-error-code": "ResourceNotFound"}, b""


@pytest.mark.parametrize("head_status", [403, 404], ids=["sas-without-read", "blob-gone"])
def test_azure_name_taken_moves_to_the_next_millisecond_whatever_the_head_answers(
        tmp_path, head_status):
    # Another agent stored <name> a moment ago (align: true, two agents). Our
    # Put Blob gets 409 BlobAlreadyExists: a NameClash, which _upload_named
    # resolves with the next millisecond. But _conditional() first asks Get
    # Blob Properties whether the blob is our own lost write, and when that
    # HEAD fails (403 for a write-only SAS, 404 when retention removed the
    # blob meanwhile) its StorageError replaces the NameClash: the upload
    # fails, the cycle is "failed" and a new snapshot is taken after the
    # back-off. GCS keeps the clash when its metadata read fails.
    server = ClashingBlobs(head_status)
    name = vsa.snapshot_name(NOW)
    data = os.urandom(4096)
    (tmp_path / "s.snap").write_bytes(data)
    info = vsa.SnapshotInfo(str(tmp_path / "s.snap"), len(data), hashlib.sha256(data).hexdigest(),
                            1, 1, len(data))
    with server.endpoint:
        server.blobs["/snapshots/p/" + name] = b"theirs"
        env = {"AWS_EC2_METADATA_DISABLED": "true"}
        cfg = vsa.config_from_dict({
            "addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s",
            "azure_storage": {"account_name": "acct", "container_name": "snapshots",
                              "sas_token": "sv=2021-08-06&sp=cw&sig=abc",
                              "endpoint": server.endpoint.url, "prefix": "p"}}, env=env)
        storage = vsa.build_storages(cfg, vsa.Runtime(env, FakeClock(NOW, START), FakeSignals()))[0]
        # Observed: StorageError "Azure Get Blob Properties p/<name>: HTTP 403
        # AuthorizationPermissionMismatch" (or "HTTP 404 BlobNotFound").
        _, stored = vsa._upload_named(storage, info, name, None)
    assert stored == vsa.snapshot_name(NOW + datetime.timedelta(milliseconds=1))
    assert server.blobs["/snapshots/p/" + name] == b"theirs"
    assert server.blobs["/snapshots/p/" + stored] == data


# =============================================================================
# a stop during the retention retry's sys/leader check
# =============================================================================


def test_a_stop_during_the_retention_retry_leader_check_is_not_a_failed_retention(
        tmp_path, monkeypatch):
    # retain: 2 over 3 planted snapshots; deletes fail (a read-only mount):
    # the cycle's retention fails once and is retried a minute later. SIGTERM
    # arrives while that retry asks sys/leader: is_leader() raises Stopped
    # (an AgentError), which retry_retentions() takes for "sys/leader did not
    # answer": a second retention failure is counted, shown in the status
    # file and the metric, and a retry 2 minutes on is announced.
    clock = fake_clock()
    snaps = tmp_path / "snaps"
    snaps.mkdir(mode=0o700)
    for days in (2, 3, 4):
        write_archive(str(snaps / vsa.snapshot_name(NOW - datetime.timedelta(days=days))),
                      state=b"p" * 512)

    def delete(storage, names):
        raise vsa.StorageError("cannot delete %s: Read-only file system" % names[0])
    monkeypatch.setattr(vsa.LocalStorage, "delete", delete)
    signals = FakeSignals(clock, until=START + 3 * HOUR)

    def on_leader(t):
        if t > 30:          # the retention retry's check, a minute after the cycle
            signals.request_stop()
            time.sleep(1.0)     # the stop cuts this request at once
    with ScriptedVault(clock, on_leader) as vault:
        _, log = run_agent(tmp_path, vault, clock, signals, frequency="24h", retry_interval="1m",
                           local_storage={"path": str(snaps), "retain": 2},
                           status_file=str(tmp_path / "status.json"),
                           metrics_textfile=str(tmp_path / "metrics.prom"))
    assert "Traceback" not in log, log
    assert "Stopping on SIGTERM" in log, log
    failures = re.search(r"^vault_snapshot_retention_failures_total\{[^}]*\} (\S+)$",
                         read(tmp_path / "metrics.prom"), re.M)
    status = json.loads(read(tmp_path / "status.json"))["storages"]["local:%s" % snaps]
    # Observed: 2 failures; retention_error "sys/leader did not answer"; the
    # log says "Retention retry: cannot ask sys/leader (stop requested)" and
    # "Retrying the retention of ... (2 failed in a row ...)".
    assert failures and float(failures.group(1)) == 1, (failures and failures.group(0), status)
    assert "Read-only file system" in (status["retention_error"] or ""), status
    assert log.count("Retrying the retention") == 1, log
