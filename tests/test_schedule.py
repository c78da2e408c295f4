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
* nor does it in front of a healthy storage whose listing cannot show the
  last snapshot (a static S3 name, a failing listing), nor when the
  snapshot is redirected to another node while ``sys/leader`` says
  ``is_self``: a new leadership plans from the agent's own last store;
* ``align`` keeps every period, whether a cycle wakes a moment late or is
  jittered; a jitter of half the frequency or more is refused;
* a retention that fails after a good upload is retried on its own, with
  no new snapshot, and is shown in the status file and the metrics; a stop
  during that retry is a stop, not one more failed retention;
* a local_storage that cannot be used does not stop the other storage:
  the cycle is "partial";
* a name another agent took in the same millisecond (NameClash) is never
  overwritten: the snapshot is stored under the next millisecond.

The real Agent and VaultClient (agent_sim.py), driven by a FakeClock (hours
in milliseconds) whose wall clock a test can step alone
(FakeClock.step_wall).
"""

import datetime
import json
import os
import re
import tempfile
import time

import pytest

import vault_snapshot_agent as vsa
from support.agent_sim import (NOW, START, ScriptedVault, fake_clock, gaps, one_cycle, plant,
                               run_daemon)
from support.fake_endpoints import FakeVault
from support.fake_s3 import FakeS3
from support.harness import FakeSignals, clear_cloud_env, error_lines, read, run_main, snapshots

HOUR = 3600.0
DAY = 24 * HOUR


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    clear_cloud_env(monkeypatch, tmp_path, ("AWS_", "AZURE_", "VAULT_", "BAO_"))


# =============================================================================
# helpers
# =============================================================================


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


class LateSignals(FakeSignals):
    """FakeSignals whose every wait ends ``late`` seconds after it was due,
    as a real select() does (the kernel wakes a sleeper after its timeout,
    never before; here 2 ms)."""

    late = 0.002

    def wait(self, seconds, wake_on_reload=True):
        FakeSignals.wait(self, seconds + self.late, wake_on_reload)


def run_agent(tmp_path, vault, clock, seconds, steps=(), **config):
    """Run the daemon loop for ``seconds`` of fake time against ``vault``
    with local storage in ``tmp_path/snaps`` (unless ``config`` says
    otherwise; a value None removes a key), a status file and a metrics
    textfile; returns (agent, log text)."""
    config.setdefault("status_file", str(tmp_path / "status.json"))
    config.setdefault("metrics_textfile", str(tmp_path / "metrics.prom"))
    return run_daemon(tmp_path, vault, clock, SteppingSignals(clock, START + seconds, steps),
                      **config)


def flapping(t):
    """is_self flips every minute (as in the flapping-leader attack of issue 18)."""
    return int(t // 60) % 2 == 0


def clock_text(t):
    return (NOW + datetime.timedelta(seconds=t)).strftime("%H:%M:%S")


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


@pytest.mark.slow
def test_a_flapping_leader_does_not_storm_a_failing_storage(tmp_path):
    clock = fake_clock()
    with FakeS3(put_status=403) as s3, \
            ScriptedVault(clock, flapping) as vault:
        _, log = run_agent(tmp_path, vault, clock, 3 * HOUR, leader_poll="30s",
                           retry_interval="1m", local_storage=None, status_file=None,
                           metrics_textfile=None,
                           temp_dir=str(tmp_path), aws_storage=s3.storage_block())
        taken = vault.snapshot_times()
        puts = s3.paths("PUT")
    assert "Traceback" not in log, log
    assert "fake S3 refuses PUT" in log, log
    assert s3.objects == {}
    # Back-off 1m, 2m, 4m... up to the 1h frequency, whoever leads meanwhile:
    # 8 snapshots in 3 hours (the last two an hour apart), not one at every
    # other flip (~90).
    assert 6 <= len(taken) <= 10, (len(taken), taken)
    assert 3500 <= taken[-1] - taken[-2] <= 3700, taken
    assert len(puts) >= len(taken)


# =============================================================================
# a new leadership never makes a healthy storage due now
# =============================================================================


class ListFailingS3(FakeS3):
    """A bucket whose ListObjectsV2 always answers 500 (writes work)."""

    def respond(self, request):
        if request.method == "GET" and "list-type=2" in request.path:
            return 500, {}, b"<Error><Code>InternalError</Code><Message>listing down</Message></Error>"
        return FakeS3.respond(self, request)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["static_name", "listing_fails"])
def test_a_flapping_leader_does_not_snapshot_a_healthy_storage_at_every_flip(tmp_path, shape):
    # frequency 24h; is_self flips every minute for 2 h; every upload works.
    # A static S3 name is never listed as a snapshot, and a failing listing
    # shows none, so each new leadership planned "no snapshot yet: due now".
    clock = fake_clock()
    server = FakeS3() if shape == "static_name" else ListFailingS3()
    extra = {"s3_static_snapshot_name": "vault.snap"} if shape == "static_name" else {}
    with server as s3, ScriptedVault(clock, flapping) as vault:
        _, log = run_daemon(tmp_path, vault, clock, FakeSignals(clock, until=START + 2 * HOUR),
                            frequency="24h", leader_poll="30s", retry_interval="1m",
                            local_storage=None, temp_dir=str(tmp_path),
                            aws_storage=s3.storage_block(**extra))
        taken = vault.snapshot_times()
        puts = s3.paths("PUT")
    assert "Traceback" not in log, log
    # Before the fix: 60 snapshots pulled and 60 PUTs in 2 h (one per flip).
    assert len(taken) <= 2, (len(taken), len(puts), taken[:5])


def test_a_snapshot_redirected_while_sys_leader_says_is_self_does_not_cycle_at_every_poll(tmp_path):
    # sys/leader says is_self but the snapshot GET is redirected to another
    # node (addr behind a load balancer, a leadership in flux): the cycle is
    # "skipped", the status says standby, the next poll says leader again
    # and plan() made the storage due now: a full cycle every poll.
    clock = fake_clock()
    with ScriptedVault(clock, redirect=True) as vault:
        _, log = run_daemon(tmp_path, vault, clock, FakeSignals(clock, until=START + 3 * HOUR),
                            frequency="1h", leader_poll="30s")
        taken = vault.snapshot_times()
    assert "Traceback" not in log, log
    # Before the fix: 686 snapshot requests (and 686 "skipping" lines) in 6 h,
    # one per poll; now 8 in 3 h.
    assert len(taken) <= 10, (len(taken), log.count("skipping"))


# =============================================================================
# align keeps every period
# =============================================================================


@pytest.mark.parametrize("shape", ["late_wakeup", "jitter"])
def test_align_keeps_every_period(tmp_path, shape):
    # align: true, frequency 1h, 12 h. A cycle that starts any time after
    # its boundary (a real wake-up is never early; jitter delays it on
    # purpose) was followed by one a frequency later rounded *up*: two
    # boundaries on.
    clock = fake_clock()
    config = {"align": True}
    signals_class = LateSignals if shape == "late_wakeup" else FakeSignals
    if shape == "jitter":
        config["jitter"] = "10m"
    with ScriptedVault(clock) as vault:
        _, log = run_daemon(tmp_path, vault, clock, signals_class(clock, until=START + 12 * HOUR),
                            rand=lambda: 0.5, **config)
        taken = vault.snapshot_times()
    assert "Traceback" not in log and " ERROR " not in log, log
    hours = [round(t / HOUR, 3) for t in taken]
    # Before the fix: 7 snapshots, 2 h apart ([0.0, 1.722, 3.722, ...]).
    assert len(taken) >= 11, hours


def test_align_with_a_jitter_over_half_the_frequency_is_refused(tmp_path):
    # align: true, frequency 1h, jitter 45m once ran: a cycle 40.5 min after
    # its boundary was followed by the boundary after next (7 snapshots in
    # 12 h, 2 h apart). Such a jitter cannot stay inside its period: refused.
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        with pytest.raises(vsa.ConfigError) as caught:
            run_daemon(tmp_path, vault, clock, FakeSignals(clock, until=START + 12 * HOUR),
                       rand=lambda: 0.9, align=True, jitter="45m")
    assert "jitter" in str(caught.value) and "30m" in str(caught.value), caught.value


def test_align_with_a_jitter_under_half_the_frequency_keeps_every_period(tmp_path):
    # The largest accepted jitter, every draw near its top: one per hour.
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        _, log = run_daemon(tmp_path, vault, clock, FakeSignals(clock, until=START + 12 * HOUR),
                            rand=lambda: 0.99, align=True, jitter="29m")
        taken = vault.snapshot_times()
    assert "Traceback" not in log and " ERROR " not in log, log
    assert len(taken) >= 11, [clock_text(t) for t in taken]


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
    entry = status["storages"]["local"]
    assert entry["location"] == "local:%s" % (tmp_path / "snaps")
    assert "Read-only file system" in (entry["retention_error"] or ""), entry
    failures = re.search(r"^vault_snapshot_retention_failures_total\{[^}]*\} (\S+)$",
                         read(tmp_path / "metrics.prom"), re.M)
    assert failures and float(failures.group(1)) == len(attempts), read(tmp_path / "metrics.prom")


def test_a_stop_during_the_retention_retry_leader_check_is_not_a_failed_retention(
        tmp_path, monkeypatch):
    # retain: 2 over 3 planted snapshots; deletes fail (a read-only mount):
    # the cycle's retention fails once and is retried a minute later. SIGTERM
    # arrives while that retry asks sys/leader: is_leader() raised Stopped
    # (an AgentError), which retry_retentions() took for "sys/leader did not
    # answer": a second retention failure was counted, shown in the status
    # file and the metric, and a retry 2 minutes on was announced.
    clock = fake_clock()
    snaps = tmp_path / "snaps"
    for days in (2, 3, 4):
        plant(snaps, NOW - datetime.timedelta(days=days))

    def delete(storage, names):
        raise vsa.StorageError("cannot delete %s: Read-only file system" % names[0])
    monkeypatch.setattr(vsa.LocalStorage, "delete", delete)
    signals = FakeSignals(clock, until=START + 3 * HOUR)

    def on_leader(t):
        if t > 30:          # the retention retry's check, a minute after the cycle
            signals.request_stop()
            time.sleep(1.0)     # the stop cuts this request at once
    with ScriptedVault(clock, on_leader=on_leader) as vault:
        _, log = run_daemon(tmp_path, vault, clock, signals, frequency="24h", retry_interval="1m",
                            local_storage={"path": str(snaps), "retain": 2},
                            status_file=str(tmp_path / "status.json"),
                            metrics_textfile=str(tmp_path / "metrics.prom"))
    assert "Traceback" not in log, log
    assert "Stopping on SIGTERM" in log, log
    failures = re.search(r"^vault_snapshot_retention_failures_total\{[^}]*\} (\S+)$",
                         read(tmp_path / "metrics.prom"), re.M)
    status = json.loads(read(tmp_path / "status.json"))["storages"]["local"]
    # Before the fix: 2 failures; retention_error "sys/leader did not answer";
    # the log said "Retention retry: cannot ask sys/leader (stop requested)"
    # and "Retrying the retention of ... (2 failed in a row ...)".
    assert failures and float(failures.group(1)) == 1, (failures and failures.group(0), status)
    assert "Read-only file system" in (status["retention_error"] or ""), status
    assert log.count("Retrying the retention") == 1, log


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
