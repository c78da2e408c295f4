"""The schedule: monotonic due times, back-off, retention retries, partial cycles.

What a user would notice, counted at a loopback fake Vault (snapshot GETs),
a loopback fake S3, the snapshot directory, the log, the status file and
the metrics:

* the wall clock stepped back a day (NTP) right after a snapshot does not
  put the next one off by a day: it comes a ``frequency`` of monotonic time
  later; a 400-day jump ahead and its correction leave no gap either;
* a flapping leader (``is_self`` flips every minute) in front of a storage
  whose upload always fails does not snapshot at every flip: the back-off
  outlasts a new leadership;
* a retention that fails after a good upload is retried on its own, with
  no new snapshot, and is shown in the status file and the metrics;
* a local_storage that cannot be used does not stop the other storage:
  the cycle is "partial";
* a name another agent took in the same millisecond (NameClash) is never
  overwritten: the snapshot is stored under the next millisecond.

The real Agent and VaultClient, driven by a FakeClock (hours in
milliseconds) whose wall clock a test can step alone (FakeClock.step_wall).
"""

import datetime
import io
import json
import os
import re
import tempfile

import pytest

import vault_snapshot_agent as vsa
from archives import write_archive
from fake_endpoints import FakeVault
from fake_s3 import FakeS3
from harness import (FakeClock, FakeSignals, clear_cloud_env, error_lines, overridden, read,
                     run_main, snapshots)

START = 1000.0              # the fake clock's monotonic() when the agent starts
HOUR = 3600.0
DAY = 24 * HOUR
LEADER = "/v1/sys/leader"
SNAPSHOT = "/v1/sys/storage/raft/snapshot"


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    clear_cloud_env(monkeypatch, tmp_path, ("AWS_", "AZURE_", "VAULT_", "BAO_"))


# =============================================================================
# helpers
# =============================================================================


def fake_clock():
    """2026-01-01T00:16:40Z, monotonic() START."""
    return FakeClock(datetime.datetime(2026, 1, 1, 0, 16, 40, tzinfo=vsa.UTC), START)


def plant(directory, when):
    """A valid snapshot named as taken at ``when`` in ``directory``; its name."""
    directory = str(directory)
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o700)
    name = vsa.snapshot_name(when)
    write_archive(os.path.join(directory, name), state=b"p" * 4096)
    return name


class ScriptedVault(FakeVault):
    """FakeVault whose ``sys/leader`` says ``is_self`` when ``leader(t)`` is
    true, ``t`` being the fake clock's seconds since START; every request is
    noted in ``timeline`` as (t, method, path). Logins need role_id ``r``
    and secret_id ``s``."""

    def __init__(self, clock, leader=lambda t: True):
        FakeVault.__init__(self, role_id="r", secret_id="s")
        self.clock, self.leader = clock, leader
        self.timeline = []

    def respond(self, request):
        # The agent is blocked on this request: reading its clock is safe.
        t = self.clock.monotonic() - START
        path = request.path.split("?", 1)[0]
        with self.lock:
            self.timeline.append((t, request.method, path))
        if path == LEADER:
            is_self = bool(self.leader(t))
            return 200, {}, {"ha_enabled": True, "is_self": is_self,
                             "leader_address": self.url if is_self else "http://127.0.0.1:9",
                             "leader_cluster_address": ""}
        return FakeVault.respond(self, request)

    def snapshot_times(self):
        with self.lock:
            return [t for t, m, p in self.timeline if p == SNAPSHOT and m == "GET"]


class SteppingSignals(FakeSignals):
    """FakeSignals whose waits also step the wall clock alone: ``steps`` are
    (seconds since START, seconds to step the wall clock by), applied when
    a wait reaches that time (the agent sleeps through the step, as it
    would through NTP's)."""

    def __init__(self, clock, until, steps=()):
        FakeSignals.__init__(self, clock, until=until)
        self.steps = sorted(steps)

    def wait(self, seconds, wake_on_reload=True):
        target = self.clock.monotonic() + seconds
        while self.steps and START + self.steps[0][0] <= target:
            at, step = self.steps.pop(0)
            self.clock.advance(max(0.0, START + at - self.clock.monotonic()))
            self.clock.step_wall(step)
        FakeSignals.wait(self, max(0.0, target - self.clock.monotonic()), wake_on_reload)


def run_agent(tmp_path, vault, clock, seconds, steps=(), **config):
    """Run the daemon loop for ``seconds`` of fake time against ``vault``
    with local storage in ``tmp_path/snaps`` (unless ``config`` says
    otherwise; a value None removes a key), a status file and a metrics
    textfile; returns (agent, log text)."""
    doc = {"addr": vault.url, "role_id": "r", "secret_id": "s", "frequency": "1h",
           "leader_poll": "0s", "local_storage": {"path": str(tmp_path / "snaps")},
           "status_file": str(tmp_path / "status.json"),
           "metrics_textfile": str(tmp_path / "metrics.prom")}
    overridden(doc, config)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    signals = SteppingSignals(clock, START + seconds, steps)
    stream = io.StringIO()
    handler = vsa._configure_logging(20, "text", stream)
    try:
        agent = vsa.Agent(lambda runtime: vsa.load_all(str(path), runtime), clock, signals,
                          env={})
        agent.run_forever()
    finally:
        vsa.LOG.removeHandler(handler)
    return agent, stream.getvalue()


def one_cycle(tmp_path, vault, clock):
    """One cycle of an Agent (no schedule) against ``vault`` with local
    storage in ``tmp_path/snaps``: (CycleResult, log text)."""
    doc = {"addr": vault.url, "role_id": "r", "secret_id": "s",
           "local_storage": {"path": str(tmp_path / "snaps")}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    stream = io.StringIO()
    handler = vsa._configure_logging(20, "text", stream)
    try:
        agent = vsa.Agent(lambda runtime: vsa.load_all(str(path), runtime), clock,
                          FakeSignals(clock), env={})
        result = agent.run_cycle()
    finally:
        vsa.LOG.removeHandler(handler)
    return result, stream.getvalue()


def gaps(times):
    return [round(b - a, 3) for a, b in zip(times, times[1:])]


def unwritable(tmp_path):
    """A directory path no one can create, not even root: under a regular file."""
    (tmp_path / "afile").write_bytes(b"not a directory")
    return str(tmp_path / "afile" / "snaps")


# =============================================================================
# the wall clock stepped
# =============================================================================


def test_a_clock_stepped_back_a_day_does_not_delay_the_next_snapshot(tmp_path):
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        _, log = run_agent(tmp_path, vault, clock, 3.5 * HOUR, steps=[(60, -DAY)])
        taken = vault.snapshot_times()
    assert "Traceback" not in log and " ERROR " not in log, log
    # One at start, then one an hour of monotonic time later, each hour.
    assert taken == [0.0, HOUR, 2 * HOUR, 3 * HOUR], (taken, log)
    assert len(snapshots(tmp_path / "snaps")) == 4


def test_a_400_day_jump_ahead_and_its_correction_leave_no_gap(tmp_path):
    clock = fake_clock()
    jump = 400 * DAY
    with ScriptedVault(clock) as vault:
        _, log = run_agent(tmp_path, vault, clock, 4.5 * HOUR,
                           steps=[(60, jump), (HOUR + 60, -jump)])
        taken = vault.snapshot_times()
    assert "Traceback" not in log and " ERROR " not in log, log
    assert taken == [0.0, HOUR, 2 * HOUR, 3 * HOUR, 4 * HOUR], (taken, gaps(taken), log)
    names = snapshots(tmp_path / "snaps")
    assert len(names) == 5, names
    # The one taken while the clock was 400 days ahead carries that date.
    assert sum(1 for n in names if n.startswith("raft_snapshot-2027")) == 1, names


# =============================================================================
# back-off
# =============================================================================


def test_a_flapping_leader_does_not_storm_a_failing_storage(tmp_path):
    clock = fake_clock()
    with FakeS3(put_status=403) as s3, \
            ScriptedVault(clock, lambda t: int(t // 60) % 2 == 0) as vault:
        _, log = run_agent(tmp_path, vault, clock, 6 * HOUR, leader_poll="30s",
                           retry_interval="1m", local_storage=None,
                           temp_dir=str(tmp_path), aws_storage=s3.storage_block())
        taken = vault.snapshot_times()
        puts = s3.paths("PUT")
    assert "Traceback" not in log, log
    assert "fake S3 refuses PUT" in log, log
    assert s3.objects == {}
    # Back-off 1m, 2m, 4m... up to the 1h frequency, whoever leads meanwhile:
    # about a dozen snapshots in 6 hours, not one at every other flip (~180).
    assert 6 <= len(taken) <= 14, (len(taken), taken)
    assert len(puts) >= len(taken)


# =============================================================================
# retention retried on its own
# =============================================================================


def test_a_failed_retention_is_retried_without_a_new_snapshot(tmp_path, monkeypatch):
    clock = fake_clock()
    for days in (2, 3, 4):
        plant(tmp_path / "snaps", clock.now() - datetime.timedelta(days=days))
    attempts = []

    def delete(storage, names):
        attempts.append(list(names))
        raise vsa.StorageError("cannot delete %s: Read-only file system" % names[0])
    monkeypatch.setattr(vsa.LocalStorage, "delete", delete)
    with ScriptedVault(clock) as vault:
        _, log = run_agent(tmp_path, vault, clock, DAY - 1, frequency="24h",
                           retry_interval="1m", local_storage={"path": str(tmp_path / "snaps"),
                                                               "retain": 2})
        taken = vault.snapshot_times()
    assert "Traceback" not in log, log
    assert taken == [0.0], (taken, log)                       # one snapshot, no re-snapshot
    assert len(snapshots(tmp_path / "snaps")) == 4
    retries = [line for line in log.splitlines() if "Retrying the retention" in line]
    assert len(retries) >= 3, log
    assert len(attempts) == len(retries), (attempts, retries)
    status = json.loads(read(tmp_path / "status.json"))
    entry = status["storages"]["local:%s" % (tmp_path / "snaps")]
    assert "Read-only file system" in (entry["retention_error"] or ""), entry
    failures = re.search(r"^vault_snapshot_retention_failures_total\{[^}]*\} (\S+)$",
                         read(tmp_path / "metrics.prom"), re.M)
    assert failures and float(failures.group(1)) == len(attempts), read(tmp_path / "metrics.prom")


# =============================================================================
# one storage failing never stops another
# =============================================================================


def test_an_unusable_local_storage_does_not_stop_the_s3_one(tmp_path, monkeypatch):
    system_tmp = tmp_path / "systmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    local = unwritable(tmp_path)
    with FakeVault(role_id="r", secret_id="s") as vault, FakeS3() as s3:
        config = {"addr": vault.url, "role_id": "r", "secret_id": "s",
                  "local_storage": {"path": local},
                  "aws_storage": s3.storage_block(s3_key_prefix="snaps")}
        (tmp_path / "c.json").write_text(json.dumps(config))
        os.chmod(str(tmp_path / "c.json"), 0o600)
        code, log = run_main("-c", str(tmp_path / "c.json"), "--once")
        stored = dict(s3.objects)
    assert "Traceback" not in log, log
    assert len(stored) == 1, (sorted(stored), log)
    key, data = stored.popitem()
    assert key.startswith("snaps/raft_snapshot-"), key
    path = tmp_path / "got.snap"
    path.write_bytes(data)
    vsa.verify_file(str(path))
    assert "Cycle partial" in log, log
    assert code == 1, log
    about_local = [line for line in error_lines(log) if local in line]
    assert len(about_local) == 1, log
    assert os.listdir(str(system_tmp)) == []                  # the staged download is gone


# =============================================================================
# a name already taken
# =============================================================================


def test_a_name_taken_in_the_same_millisecond_moves_to_the_next_one(tmp_path, monkeypatch):
    clock = fake_clock()
    directory = tmp_path / "snaps"
    directory.mkdir(mode=0o700)
    taken = vsa.snapshot_name(clock.now())
    theirs = b"another agent's snapshot"
    (directory / taken).write_bytes(theirs)
    upload = vsa.LocalStorage.upload

    def conditional_upload(storage, snapshot, name, progress=None):
        if os.path.lexists(os.path.join(storage.path, name)):
            raise vsa.NameClash("%s is taken" % name)
        return upload(storage, snapshot, name, progress)
    monkeypatch.setattr(vsa.LocalStorage, "upload", conditional_upload)
    with ScriptedVault(clock) as vault:
        result, log = one_cycle(tmp_path, vault, clock)
        requests = vault.snapshot_times()
    assert "Traceback" not in log and " ERROR " not in log, log
    assert result.outcome == "stored", (result, log)
    assert requests == [0.0], requests
    ours = vsa.snapshot_name(clock.now() + datetime.timedelta(milliseconds=1))
    assert snapshots(directory) == sorted([taken, ours]), log
    assert (directory / taken).read_bytes() == theirs
    vsa.verify_file(str(directory / ours))
    warnings = [line for line in log.splitlines() if " WARNING " in line and taken in line]
    assert len(warnings) == 1 and "storing as %s" % ours in warnings[0], log
