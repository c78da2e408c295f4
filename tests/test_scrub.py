"""Re-verification ("scrub") of stored snapshots, on every storage kind.

What a user would notice, from ``verify`` and from the daemon:

* ``verify --storage NAME latest|all|<name>`` reads stored snapshots back,
  writing nothing, and prints one OK line per snapshot naming the checksum
  it compared: for what this agent stored, the SHA-256 it kept with the
  object (S3 and GCS metadata, Azure x-ms-meta, the local xattr); for an
  object without it (the Go agent's, an older build's), the store's own:
  the S3 ETag (MD5) or x-amz-checksum-sha256 (whole, or of 3 parts), the
  Azure Content-MD5 (Put Blob, or blocks), the GCS md5Hash (simple or
  resumable upload), a local file's archive only; exit 0;
* a truncated object, a byte corrupted in the middle, other bytes, another
  valid snapshot under the checksum recorded for the old one: a FAIL line
  naming the object and why, exit 1; ``all`` still says OK for the good
  ones; a deleted object named is an error, exit 1;
* an object without this agent's SHA-256 that the store wrote over an hour
  after its name's time is a FAIL (replaced by another upload): so is one
  this agent stored, then replaced the ordinary way (renamed over,
  uploaded again); within the hour the store's checksum verifies it;
* the daemon with ``verify_frequency``: after a stored cycle, between
  cycles, it re-verifies (``verify_scope`` latest: the newest only; all:
  every one), puts ``last_verified``, ``verified_snapshots``,
  ``bad_snapshots`` and ``verify_failures`` in the status file and the
  metrics, runs ``notify_command`` once for a bad snapshot however many
  scrubs find it still bad, reports a snapshot deleted behind its back as
  missing (never one its own retention deleted), writes no file for it,
  does nothing of it on a standby, lets a due cycle go first, after a
  restart goes on from the status file's ``last_verified``, and reports a
  snapshot it stored that then lost its SHA-256 (replaced) at once.

Damage is done as someone with access to the place would (``write``: an
ordinary overwrite, after which the store describes the new bytes); where
only the checksum recorded at upload can tell (another valid snapshot),
support/scrub_stores.py makes the store's record disagree with its bytes as
far as each store allows (see there; S3 without checksums cannot be made
to). Objects without this agent's SHA-256, and objects named hours ago,
are uploaded through the agent's own Storage.upload (support/scrub_stores.py
``upload``). The servers are moto (signature checking on), Azurite and
gcp-storage-emulator; the daemon runs the real Agent against a loopback
stand-in Vault on a fake clock (support/agent_sim.py).
"""

import datetime
import hashlib
import json
import os
import re
import stat

import pytest

import vault_snapshot_agent as vsa
from support.agent_sim import LEADER, NOW, START, ScriptedVault, fake_clock, plant, run_daemon
from support.archives import write_archive
from support.harness import FakeClock, FakeSignals, clear_cloud_env, run_main, unique
from support.scrub_stores import (OWN_CHECKED, XATTR_OK, AzureStore, GcsStore, LocalStore, S3Store,
                                  Snapshots, run_cli, store_snapshots, taken, upload)

SMALL = ("local", "s3", "s3-etag", "azure", "gcs")
BIG = ("s3-multipart", "s3-multipart-etag", "azure-blocks", "gcs-resumable")
MEGABYTES = {"s3-multipart": 11, "s3-multipart-etag": 11, "azure-blocks": 2.5, "gcs-resumable": 2.5}
SERVER = {"s3": "moto", "azure": "azurite", "gcs": "gcs"}
OWN = [pytest.param(True, id="by-this-agent"), pytest.param(False, id="without-its-sha256")]
needs_xattr = pytest.mark.skipif(not XATTR_OK, reason="no user xattrs where the tests write: a "
                                 "snapshot stored on the fake clock's day would look replaced")


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    clear_cloud_env(monkeypatch, tmp_path, ("AWS_", "AZURE_", "VAULT_", "BAO_"))


def kinds(*names):
    """pytest params of store kinds, e2e for the servers' (the multipart ones
    take about a second each: not slow)."""
    return [pytest.param(name, id=name, marks=[pytest.mark.e2e] if name != "local" else [])
            for name in names]


@pytest.fixture
def store(request, tmp_path):
    """The Store (support/scrub_stores.py) of the kind in ``request.param``,
    under a prefix of its own; ``megabytes``: the size of its archives
    (None: a few hundred bytes)."""
    kind = request.param
    if kind == "local":
        if not XATTR_OK:
            pytest.skip("no user xattrs where the tests write")
        made = LocalStore(tmp_path / "snaps")
    else:
        server, prefix, big = request.getfixturevalue(SERVER[kind.split("-")[0]]), unique("scrub"), \
            kind in BIG
        if kind.startswith("s3"):
            made = S3Store(server, prefix, checksum=not kind.endswith("etag"),
                           part_size_mb=5 if big else None, parts=3 if big else None)
        elif kind.startswith("azure"):
            made = AzureStore(server, prefix, block_size_mb=1 if big else None)
        else:
            made = GcsStore(server, prefix, chunk_size_mb=1 if big else None)
    made.megabytes = MEGABYTES.get(kind)
    return made


def archive(snaps, store):
    return snaps.sized(store.megabytes) if store.megabytes else snaps.small()


def lines(out, word, store, name):
    """The ``word`` (OK/FAIL) lines of ``out`` about ``name`` in ``store``."""
    pattern = re.compile(r"\A%s +%s +%s +" % (word, re.escape(store.name), re.escape(name)))
    return [line for line in out.splitlines() if pattern.match(line)]


def verify(tmp_path, store, target):
    return run_cli(tmp_path, store, "verify", "--storage", store.name, target)


def put_two(tmp_path, store, snaps, own):
    """Two snapshots in ``store`` (older, newer): stored by ``--once`` cycles
    of this agent (``own``), else without its SHA-256, as the Go agent or an
    older build stored them, under names of a minute or two ago."""
    archives = [archive(snaps, store), archive(snaps, store)]
    if own:
        return store_snapshots(tmp_path, store, archives)
    names = [taken(2 / 60), taken(1 / 60)]
    for name, data in zip(names, archives):
        upload(tmp_path, store, name, data, own=False)
    return names


def stored_before(directory, when):
    """A valid snapshot named as taken at ``when`` in ``directory``, as this
    agent stores one (its SHA-256 in the xattr); its name."""
    name = plant(directory, when)
    LocalStore(directory).record(name)
    return name


# =============================================================================
# verify --storage NAME latest|all|<name>
# =============================================================================


@pytest.mark.parametrize("own", OWN)
@pytest.mark.parametrize("store", kinds(*(SMALL + BIG)), indirect=True)
def test_stored_snapshots_verify_naming_the_checksum_compared(store, own, tmp_path):
    snaps = Snapshots()
    older, newer = put_two(tmp_path, store, snaps, own)
    if store.megabytes and isinstance(store, (S3Store, AzureStore)):
        assert store.parts(newer) == 3          # really a multipart upload, or blocks
    for name in (older, newer):     # this agent's SHA-256 kept with the object, or none
        assert store.own_sha256(name) == (hashlib.sha256(store.read(name)).hexdigest() if own else None)
    checked = OWN_CHECKED if own else store.checked
    code, log, out = verify(tmp_path, store, "latest")
    assert code == 0, log
    assert len(out.splitlines()) == 1 and lines(out, "OK", store, newer), out
    assert "Raft index 102 term 3 (%s)" % checked in out
    code, log, out = verify(tmp_path, store, "all")
    assert code == 0, log
    assert [line.split()[2] for line in out.splitlines()] == [newer, older], out
    assert out.count("(%s)" % checked) == 2, out
    assert "Verified 2 snapshot(s): 2 good, 0 bad" in log
    code, log, out = verify(tmp_path, store, older)
    assert code == 0 and lines(out, "OK", store, older) and "Raft index 101 " in out, log + out


def _flip_middle(data, other):
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x55
    return bytes(damaged)


DAMAGES = {
    "truncated": (lambda data, other: data[:len(data) // 2], r"truncated"),
    "a byte corrupted in the middle": (_flip_middle, r"not a valid gzip stream: Error -3"),
    "other bytes": (lambda data, other: os.urandom(len(data)), r"not a (valid )?gzip|gzip"),
}


@pytest.mark.parametrize("own", OWN)
@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("store", kinds(*SMALL), indirect=True)
def test_a_damaged_snapshot_is_a_fail_naming_it_and_why(store, damage, own, tmp_path):
    snaps = Snapshots()
    older, newer = put_two(tmp_path, store, snaps, own)
    make, reason = DAMAGES[damage]
    store.write(newer, make(store.read(newer), snaps.small()))
    code, log, out = verify(tmp_path, store, newer)
    assert code == 1, log
    failed = lines(out, "FAIL", store, newer)
    assert len(failed) == 1 and re.search(reason, failed[0]), out
    assert re.search(r"ERROR %s in .*: .*(%s)" % (re.escape(newer), reason), log), log
    code, log, out = verify(tmp_path, store, "all")
    assert code == 1, log
    assert lines(out, "OK", store, older) and lines(out, "FAIL", store, newer), out
    assert "Verified 2 snapshot(s): 1 good, 1 bad" in log


KEEPING_RECORD = ("s3", "azure", "gcs", "s3-multipart", "azure-blocks", "gcs-resumable")


@pytest.mark.parametrize("store,own", [
    pytest.param(kind, own, id="%s-%s" % (kind, tag), marks=[pytest.mark.e2e] if kind != "local" else [])
    for own, tag in ((True, "by-this-agent"), (False, "without-its-sha256"))
    for kind in (("local",) if own else ()) + KEEPING_RECORD], indirect=["store"])
def test_another_valid_snapshot_under_the_recorded_checksum_is_a_fail(store, own, tmp_path):
    """A local file rewritten in place keeps this agent's xattr; in a cloud
    store, the replacement drops this agent's SHA-256 and the store's
    checksum, made to disagree (see support/scrub_stores.py), tells."""
    snaps = Snapshots()
    name, = put_two(tmp_path, store, snaps, own)[1:]
    store.replace_keeping_record(name, archive(snaps, store))
    code, log, out = verify(tmp_path, store, "latest")
    assert code == 1, log
    failed = lines(out, "FAIL", store, name)
    what = "S3 x-amz-checksum-sha256" if isinstance(store, S3Store) else store.recorded
    what = "SHA-256 this agent recorded" if isinstance(store, LocalStore) else what
    assert len(failed) == 1 and re.search(
        r"the object read back does not match the %s.* at upload \(the archive itself is "
        r"a valid snapshot" % re.escape(what), failed[0]), out


def _replace_the_ordinary_way(store, name, other):
    """Another valid snapshot in place as people do it: locally written beside
    and renamed over (an editor, ``mv``: a new inode, no xattr); in a store,
    an ordinary upload."""
    if isinstance(store, LocalStore):
        beside = store.file(name) + ".new"
        with open(beside, "wb") as handle:
            handle.write(other)
        os.replace(beside, store.file(name))
    else:
        store.write(name, other)


REPLACED = (r"the object was written at \S+, (1h59m\d+s|2h\S*) after the snapshot's time, and holds "
            r"no SHA-256 recorded by this agent: replaced by another upload")


@pytest.mark.parametrize("store", kinds("s3", "azure", "gcs"), indirect=True)
def test_another_valid_snapshot_put_in_place_the_ordinary_way_is_a_fail(store, tmp_path):
    """Named two hours before: its own SHA-256 verifies it whenever the store
    wrote it; replaced (renamed over, uploaded), it has none, and the store
    wrote it over an hour after its time."""
    snaps, name = Snapshots(), taken(2)
    upload(tmp_path, store, name, snaps.small())
    code, log, out = verify(tmp_path, store, name)
    assert code == 0 and OWN_CHECKED in lines(out, "OK", store, name)[0], out + log
    _replace_the_ordinary_way(store, name, snaps.small())
    assert store.own_sha256(name) is None
    code, log, out = verify(tmp_path, store, name)
    assert code == 1, out + log
    failed = lines(out, "FAIL", store, name)
    assert len(failed) == 1 and re.search(REPLACED, failed[0]), out


@pytest.mark.parametrize("store", kinds("local"), indirect=True)
def test_an_old_local_file_without_the_xattr_is_checked_as_an_archive_only(store, tmp_path):
    """A file's ctime changes with chown, cp or a restore of the directory:
    an old snapshot without the xattr (the Go agent's, an older build's)
    is no "replaced" file, whenever it was last touched; the daemon still
    tells a file it wrote itself (test_the_daemon_reports_...)."""
    name = taken(5)
    upload(tmp_path, store, name, Snapshots().small(), own=False)
    code, log, out = verify(tmp_path, store, name)
    assert code == 0 and "archive only: no checksum recorded at upload" in \
        lines(out, "OK", store, name)[0], out + log


@pytest.mark.parametrize("minutes", [50, 120])
@pytest.mark.parametrize("store", kinds("s3", "azure", "gcs"), indirect=True)
def test_an_object_without_this_agents_sha256_written_over_an_hour_after_its_time_is_a_fail(
        store, minutes, tmp_path):
    """As the Go agent or an older build stored it, or replaced by another
    upload: within the hour of its name the store's checksum verifies it
    (another valid snapshot put there this soon passes: what ``verify``
    cannot tell), later it is a FAIL."""
    name = taken(minutes / 60)
    upload(tmp_path, store, name, Snapshots().small(), own=False)
    assert store.own_sha256(name) is None
    code, log, out = verify(tmp_path, store, name)
    if minutes < 60:
        assert code == 0 and "(%s)" % store.checked in lines(out, "OK", store, name)[0], out + log
    else:
        failed = lines(out, "FAIL", store, name)
        assert code == 1 and len(failed) == 1 and re.search(REPLACED, failed[0]), \
            out + log


@pytest.mark.parametrize("store", kinds(*SMALL), indirect=True)
def test_a_deleted_snapshot_named_is_an_error_and_all_reads_what_is_left(store, tmp_path):
    snaps = Snapshots()
    older, newer = store_snapshots(tmp_path, store, [snaps.small(), snaps.small()])
    store.delete(newer)
    code, log, out = verify(tmp_path, store, newer)
    assert code == 1, log
    assert re.search(r"ERROR %s in .*: no snapshot of that name" % re.escape(newer), log), log
    assert not lines(out, "OK", store, newer), out
    code, log, out = verify(tmp_path, store, "all")
    assert code == 0 and len(out.splitlines()) == 1 and lines(out, "OK", store, older), out + log


def test_verify_of_a_file_still_verifies_the_file(tmp_path, capsys):
    path = str(tmp_path / vsa.snapshot_name(NOW))      # named as a stored snapshot is
    data = write_archive(path, state=b"f" * 4096, index=77)
    code, log = run_main("verify", path)
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("%s: OK" % path) and "Raft index 77 " in out, log + out
    with open(path, "wb") as handle:
        handle.write(data[:len(data) // 2])
    code, log = run_main("verify", path)
    assert code == 1 and "truncated" in log, log


# =============================================================================
# the daemon: verify_frequency
# =============================================================================


NOTIFY_SCRIPT = """#!/bin/sh
{ env | grep '^SNAPSHOT_' | sort; echo END; } >> "$1"
"""


def notify_command(tmp_path):
    """A notify_command writing its SNAPSHOT_* variables, then END, to a file:
    (argv, path of that file)."""
    script, record = tmp_path / "notify.sh", tmp_path / "notified.txt"
    script.write_text(NOTIFY_SCRIPT)
    script.chmod(stat.S_IRWXU)
    return [str(script), str(record)], record


def notified(record):
    """The notifications recorded: [{SNAPSHOT_...: value}]."""
    if not record.exists():
        return []
    events = []
    for block in record.read_text().split("END\n")[:-1]:
        events.append(dict(line.split("=", 1) for line in block.splitlines()))
    return events


def metric(text, name, storage="local"):
    match = re.search(r'^%s\{[^}]*name="%s"\} (\S+)$' % (name, storage), text, re.M)
    assert match, (name, text)
    return float(match.group(1))


def daemon(tmp_path, clock, until, vault=None, on_agent=None, **config):
    """run_daemon with its status file and metrics textfile in tmp_path/out;
    returns (agent, log, status file path)."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    config.setdefault("status_file", str(out / "status.json"))
    config.setdefault("metrics_textfile", str(out / "metrics.prom"))
    agent, log = run_daemon(tmp_path, vault, clock, FakeSignals(clock, until=until),
                            on_agent=on_agent, **config)
    agent.alerts.close(wait=True)       # deliver what is queued, as a stopping daemon does
    return agent, log, config["status_file"]


def status_of(path, storage="local"):
    with open(path) as handle:
        return json.load(handle)["storages"][storage]


def scrubbed(log):
    """The names each re-verification read, in order."""
    return re.findall(r"Re-verified (\S+) in |Re-verification of (\S+) in .* FAILED", log)


@needs_xattr
def test_a_damaged_snapshot_is_reported_in_status_metrics_and_notified_once(tmp_path):
    argv, record = notify_command(tmp_path)
    clock, snaps = fake_clock(), tmp_path / "snaps"

    def corrupt_once(t):
        names = sorted(os.listdir(str(snaps))) if snaps.is_dir() else []
        if t >= 300 and names and not corrupt_once.done:
            corrupt_once.done = names[0]
            LocalStore(snaps).write(names[0], b"\x1f\x8b" + os.urandom(300))
    corrupt_once.done = None
    with ScriptedVault(clock, on_leader=corrupt_once) as vault:
        _, log, status_file = daemon(tmp_path, clock, START + 1500, vault, verify_frequency="10m",
                                     notify_command=argv)
    name = corrupt_once.done
    assert name and len(vault.snapshot_times()) == 1, log
    assert len(re.findall(r"Re-verification of local:.*: 0 good, 1 bad", log)) == 2, log
    entry = status_of(status_file)
    assert entry["last_verified"] == vsa.iso(NOW + datetime.timedelta(seconds=1200))
    assert list(entry["bad_snapshots"]) == [name] and entry["verified_snapshots"] == 0
    assert entry["verify_failures"] == 2
    metrics = (tmp_path / "out" / "metrics.prom").read_text()
    assert metric(metrics, "vault_snapshot_verify_bad_snapshots") == 1
    assert metric(metrics, "vault_snapshot_verify_failures_total") == 2
    assert metric(metrics, "vault_snapshot_last_verified_timestamp_seconds") == \
        (NOW - vsa.EPOCH).total_seconds() + 1200
    events = notified(record)
    assert len(events) == 1, events
    assert events[0]["SNAPSHOT_EVENT"] == "verify_failed" and events[0]["SNAPSHOT_NAME"] == name
    assert events[0]["SNAPSHOT_STORAGE"] == "local" and events[0]["SNAPSHOT_FAILURES"] == "1"
    assert "gzip" in events[0]["SNAPSHOT_ERROR"] and name in events[0]["SNAPSHOT_TEXT"]


def test_a_snapshot_deleted_behind_the_agents_back_is_reported_missing(tmp_path):
    argv, record = notify_command(tmp_path)
    clock, snaps = fake_clock(), tmp_path / "snaps"
    gone = []

    def delete_once(t):
        if t >= 300 and not gone:
            gone.append(sorted(os.listdir(str(snaps)))[0])
            os.unlink(str(snaps / gone[0]))
    with ScriptedVault(clock, on_leader=delete_once) as vault:
        _, log, status_file = daemon(tmp_path, clock, START + 900, vault, verify_frequency="10m",
                                     notify_command=argv)
    bad = status_of(status_file)["bad_snapshots"]
    assert list(bad) == gone and re.search(r"is missing: .*no retention of this agent deleted it",
                                           bad[gone[0]]), (bad, log)
    assert "Re-verifying local:%s: 0 snapshot(s) to read; missing: %s" % (snaps, gone[0]) in log
    events = notified(record)
    assert [(e["SNAPSHOT_EVENT"], e["SNAPSHOT_NAME"]) for e in events] == [("verify_failed", gone[0])]


@needs_xattr
def test_snapshots_deleted_by_its_own_retention_are_not_reported_missing(tmp_path):
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        _, log, status_file = daemon(tmp_path, clock, START + 3000, vault, frequency="5m", retain=1,
                                     verify_frequency="7m", verify_scope="all")
    assert len(vault.snapshot_times()) == 10 and len(os.listdir(str(tmp_path / "snaps"))) == 1
    entry = status_of(status_file)
    assert entry["bad_snapshots"] == {} and entry["verify_failures"] == 0, log
    assert len(re.findall(r"Re-verification of local.*: 1 good, 0 bad", log)) >= 6, log
    assert "missing" not in log


@needs_xattr
@pytest.mark.parametrize("scope", ["latest", "all"])
def test_scope_latest_reads_the_newest_only_and_all_reads_every_one(scope, tmp_path):
    snaps = tmp_path / "snaps"
    planted = [stored_before(snaps, NOW - datetime.timedelta(hours=h)) for h in (30, 20, 10)]
    with open(str(snaps / planted[0]), "r+b") as handle:      # the oldest: damaged
        handle.seek(100)
        handle.write(b"\0" * 50)
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        _, log, status_file = daemon(tmp_path, clock, START + 300, vault, verify_frequency="1h",
                                     verify_scope=scope)
    newest = sorted(os.listdir(str(snaps)))[-1]
    assert newest not in planted and len(vault.snapshot_times()) == 1
    read = [a or b for a, b in scrubbed(log)]
    entry = status_of(status_file)
    if scope == "latest":
        assert read == [newest] and entry["bad_snapshots"] == {}, log
        assert entry["verified_snapshots"] == 1
    else:
        assert read == [newest] + planted[::-1], log
        assert list(entry["bad_snapshots"]) == [planted[0]] and entry["verified_snapshots"] == 3


@needs_xattr
def test_a_scrub_opens_no_file_for_writing(tmp_path, monkeypatch):
    import builtins
    import tempfile
    writes, scrubbing = [], []
    real_open, real_os_open = builtins.open, os.open

    def watched_open(file, mode="r", *args, **kwargs):
        if scrubbing and any(c in mode for c in "wax+"):
            writes.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    def watched_os_open(path, flags, *args, **kwargs):
        if scrubbing and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            writes.append(str(path))
        return real_os_open(path, flags, *args, **kwargs)

    def on_agent(agent):
        step = agent.scrubber.step

        def watched_step(storage):
            scrubbing.append(1)
            try:
                return step(storage)
            finally:
                scrubbing.pop()
        agent.scrubber.step = watched_step
    monkeypatch.setattr(builtins, "open", watched_open)
    monkeypatch.setattr(os, "open", watched_os_open)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "systmp"))
    (tmp_path / "systmp").mkdir()
    (tmp_path / "staging").mkdir()
    for h in (3, 2):
        stored_before(tmp_path / "snaps", NOW - datetime.timedelta(hours=h))
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        _, log, _ = daemon(tmp_path, clock, START + 1900, vault, on_agent=on_agent, temp_dir=str(
            tmp_path / "staging"), verify_frequency="10m", verify_scope="all")
    assert len(scrubbed(log)) == 4 * 3, log          # 3 snapshots, at 0, 600, 1200 and 1800
    assert writes == []
    assert os.listdir(str(tmp_path / "staging")) == [] and os.listdir(str(tmp_path / "systmp")) == []
    assert all(vsa.parse_snapshot_name(n) for n in os.listdir(str(tmp_path / "snaps")))


def test_a_standby_does_not_scrub(tmp_path):
    argv, record = notify_command(tmp_path)
    plant(tmp_path / "snaps", NOW - datetime.timedelta(hours=2))
    name = sorted(os.listdir(str(tmp_path / "snaps")))[0]
    LocalStore(tmp_path / "snaps").write(name, b"not a snapshot")
    clock = fake_clock()
    with ScriptedVault(clock, leader=lambda t: False) as vault:
        _, log, status_file = daemon(tmp_path, clock, START + 4 * 3600, vault, verify_frequency="10m",
                                     notify_command=argv)
    assert vault.snapshot_times() == [] and "Re-verif" not in log, log
    entry = status_of(status_file)
    assert entry["last_verified"] is None and entry["bad_snapshots"] == {}
    assert notified(record) == []
    # the postponed scrub asks sys/leader again once a verify_frequency, besides the cycles
    assert len(vault.times(LEADER)) <= 4 * 6 + 5, vault.times(LEADER)


@needs_xattr
def test_a_due_cycle_runs_before_a_scrub_and_between_two_of_its_reads(tmp_path):
    for h in (4, 3, 2):
        stored_before(tmp_path / "snaps", NOW - datetime.timedelta(hours=h))
    clock, steps = fake_clock(), []

    def on_agent(agent):
        step = agent.scrubber.step

        def step_then_an_hour_passes(storage):
            result = step(storage)
            steps.append(clock.monotonic())
            if len(steps) == 2:
                clock.advance(3600)         # the next cycle is due before the third read
            return result
        agent.scrubber.step = step_then_an_hour_passes
    with ScriptedVault(clock) as vault:
        _, log, _ = daemon(tmp_path, clock, START + 3700, vault, on_agent=on_agent,
                           verify_frequency="24h", verify_scope="all")
    events = re.findall(r"(Cycle stored)|Re-verified (\S+) in", log)
    names = sorted(os.listdir(str(tmp_path / "snaps")))
    assert len(names) == 5 and len(vault.snapshot_times()) == 2, log
    # at start both are due: the cycle first; an hour later, amid the scrub, the next cycle
    assert events == [("Cycle stored", ""), ("", names[3]), ("", names[2]), ("Cycle stored", ""),
                      ("", names[1]), ("", names[0])], events


@needs_xattr
def test_a_restart_goes_on_from_the_status_files_last_verified(tmp_path):
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        _, log, status_file = daemon(tmp_path, clock, START + 100, vault, verify_frequency="1h")
    assert status_of(status_file)["last_verified"] == vsa.iso(NOW), log
    later = FakeClock(NOW + datetime.timedelta(seconds=1000), START)      # restarted 1000 s later
    with ScriptedVault(later) as vault:
        _, log, status_file = daemon(tmp_path, later, START + 2700, vault, verify_frequency="1h")
    # not again at once: one re-verification, an hour after the one before the restart
    assert len(scrubbed(log)) == 1, log
    assert status_of(status_file)["last_verified"] == vsa.iso(NOW + datetime.timedelta(hours=1))


@needs_xattr
def test_a_restarted_agent_keeps_last_verified_until_it_verifies_again(tmp_path):
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        daemon(tmp_path, clock, START + 100, vault, verify_frequency="1h")
    logs, kept = [], []
    for seconds in (700, 1400):     # two restarts, each with a cycle (frequency 10m), no scrub due
        later = FakeClock(NOW + datetime.timedelta(seconds=seconds), START)
        with ScriptedVault(later) as vault:
            _, log, status_file = daemon(tmp_path, later, START + 300, vault, frequency="10m",
                                         verify_frequency="1h")
        assert len(vault.snapshot_times()) == 1, log
        logs.append(log)
        kept.append(status_of(status_file)["last_verified"])
        metrics = (tmp_path / "out" / "metrics.prom").read_text()
        kept.append(metric(metrics, "vault_snapshot_last_verified_timestamp_seconds"))
    assert ["Re-verif" in log for log in logs] == [False, False], logs[1]
    assert kept == [vsa.iso(NOW), (NOW - vsa.EPOCH).total_seconds()] * 2


# =============================================================================
# the daemon on the cloud stores
# =============================================================================


@pytest.mark.parametrize("store", kinds("local", "s3", "azure", "gcs"), indirect=True)
def test_the_daemon_reports_a_snapshot_it_stored_replaced_the_ordinary_way(store, tmp_path):
    """What ``verify`` cannot tell within the hour, the daemon that stored the
    object can: it stored it with its SHA-256."""
    clock = FakeClock(None, START)      # the real time: the stores check request dates
    done = []

    def replace_once(t):
        if t >= 200 and not done:
            done.append(store.names()[0])
            _replace_the_ordinary_way(store, done[0], Snapshots().small())
    config = {"local_storage": None, store.key: store.block()}
    with ScriptedVault(clock, on_leader=replace_once) as vault:
        vault.archive = Snapshots().small()
        _, log, status_file = daemon(tmp_path, clock, START + 500, vault, verify_frequency="5m",
                                     **config)
    entry = status_of(status_file, store.name)
    assert re.search(r"Re-verified %s in .*, %s\n" % (re.escape(done[0]), re.escape(OWN_CHECKED)),
                     log), log           # at 0, before the object was replaced at 300
    assert list(entry["bad_snapshots"]) == done and entry["bad_snapshots"][done[0]].endswith(
        "holds no SHA-256 recorded by this agent, which wrote it with one: replaced by another "
        "upload"), entry
    code, log, out = verify(tmp_path, store, done[0])     # another process, within the hour
    assert code == 0 and "(%s)" % store.checked in lines(out, "OK", store, done[0])[0], out + log
