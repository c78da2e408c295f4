"""Sections "Local storage" and "Retention": local storage and retention.

End to end: a full local disk (a file size limit, a small tmpfs to stage on
or to copy onto) is one ERROR line naming the disk, and keeps every older
snapshot."""

import datetime
import logging
import os
import resource
import signal
import stat
import subprocess
import sys

import pytest

import vault_snapshot_agent as vsa
from support.archives import write_archive
from support.faults_support import GO_NAMES, MB, write_config
from support.harness import AGENT, FakeSignals, error_lines, go_snapshot_name, run_main

UTC = vsa.UTC
BASE = datetime.datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


def ref(name):
    return vsa.SnapshotRef(name, vsa.parse_snapshot_name(name), 1)


def own(minutes):
    return vsa.snapshot_name(BASE + datetime.timedelta(minutes=minutes))


def go(minutes):
    return go_snapshot_name(BASE + datetime.timedelta(minutes=minutes))


def plan(*args, **kwargs):
    """The names retention_plan() deletes, newest first."""
    return list(vsa.retention_plan(*args, **kwargs))


def test_retention_plan_keeps_the_newest_across_both_name_styles():
    refs = [ref(own(m)) for m in (10, 30, 50)] + [ref(go(m)) for m in (0, 20, 40)]
    doomed = plan(refs, 4, keep=own(50))
    assert sorted(doomed) == sorted([go(0), own(10)])


def test_retention_plan_zero_keeps_all_and_never_deletes_keep():
    refs = [ref(own(m)) for m in range(5)]
    assert plan(refs, 0) == []
    # The snapshot just written is kept even if the clock went backwards.
    assert own(0) not in plan(refs, 1, keep=own(0))


def staged(path):
    return vsa.SnapshotInfo(str(path), os.path.getsize(str(path)), None, 1, 1, 1)


def make_store(tmp_path, retain=2, signals=None):
    runtime = vsa.Runtime({}, vsa.Clock(), signals or FakeSignals())
    return vsa.LocalStorage(str(tmp_path / "snaps"), vsa.Policy(retain, 0, 3600.0), runtime)


def test_upload_is_0600_complete_and_listed(tmp_path):
    store = make_store(tmp_path)
    src = tmp_path / "staged"
    data = write_archive(str(src))
    location = store.upload(staged(src), own(0))
    assert location == os.path.join(store.path, own(0))
    assert open(location, "rb").read() == data
    assert stat.S_IMODE(os.stat(location).st_mode) == 0o600
    assert [r.name for r in store.list()] == [own(0)]


def test_upload_across_filesystems_copies_atomically(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    src = tmp_path / "staged"
    data = write_archive(str(src))

    def no_link(a, b):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(vsa.os, "link", no_link)
    location = store.upload(staged(src), own(1))
    assert open(location, "rb").read() == data
    assert stat.S_IMODE(os.stat(location).st_mode) == 0o600
    assert sorted(os.listdir(store.path)) == [own(1)]


def test_stopped_copy_leaves_nothing(tmp_path, monkeypatch):
    signals = FakeSignals()
    store = make_store(tmp_path, signals=signals)
    src = tmp_path / "staged"
    write_archive(str(src))
    monkeypatch.setattr(vsa.os, "link", lambda a, b: (_ for _ in ()).throw(OSError(18, "x")))
    signals.stop_requested = True
    with pytest.raises(vsa.Stopped):
        store.upload(staged(src), own(2))
    assert os.listdir(store.path) == []


def test_upload_never_overwrites(tmp_path):
    store = make_store(tmp_path)
    src = tmp_path / "staged"
    write_archive(str(src))
    store.upload(staged(src), own(0))
    with pytest.raises(vsa.StorageError, match="already exists"):
        store.upload(staged(src), own(0))


def test_retention_rotates_go_agent_files_and_ignores_foreign_ones(tmp_path):
    store = make_store(tmp_path, retain=2)
    os.makedirs(store.path)
    foreign = ["notes.txt", "raft_snapshot-latest.snap", "vault.db", "raft_snapshot-1.snap.bak"]
    for name in [go(0), go(10), own(20)] + foreign:
        open(os.path.join(store.path, name), "wb").close()
    src = tmp_path / "staged"
    write_archive(str(src))
    store.upload(staged(src), own(30))
    deleted = vsa.apply_retention(store, keep=own(30))
    assert sorted(deleted) == sorted([go(0), go(10)])
    assert sorted(os.listdir(store.path)) == sorted([own(20), own(30)] + foreign)


def test_delete_is_idempotent_and_refuses_foreign_names(tmp_path):
    store = make_store(tmp_path)
    os.makedirs(store.path)
    store.delete([own(0)])
    with pytest.raises(vsa.StorageError, match="refusing"):
        store.delete(["../etc/passwd"])


def test_prepare_removes_dead_leftovers_of_this_host_only(tmp_path):
    store = make_store(tmp_path)
    os.makedirs(store.path)
    host = vsa.temp_name().split("-")[1]
    dead = ".raft_snapshot-%s-%d-abcd.tmp" % (host, 2 ** 22 + 12345)
    alive = ".raft_snapshot-%s-%d-abcd.tmp" % (host, os.getppid())
    other = ".raft_snapshot-otherhost-%d-abcd.tmp" % (2 ** 22 + 12345)
    for name in (dead, alive, other):
        open(os.path.join(store.path, name), "wb").close()
    store.prepare()
    assert sorted(os.listdir(store.path)) == sorted([alive, other])


def test_prepare_creates_a_missing_directory_0700(tmp_path):
    store = make_store(tmp_path)
    store.prepare()
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o700


def test_age_based_retention_next_to_the_count():
    refs = [ref(own(m)) for m in (0, 60 * 24, 60 * 24 * 3, 60 * 24 * 9)]
    now = BASE + datetime.timedelta(days=10)
    age = datetime.timedelta(days=7)
    assert plan(refs, 0, max_age=age, now=now) == [own(60 * 24), own(0)]
    assert plan(refs, 1, max_age=age, now=now) == [own(60 * 24 * 3), own(60 * 24), own(0)]
    # The snapshot just written survives even when everything is too old.
    assert own(60 * 24 * 9) not in plan(refs, 0, keep=own(60 * 24 * 9),
                                                       max_age=datetime.timedelta(0), now=now)


def test_running_hash_equals_a_full_pass_whatever_the_upload_rereads(tmp_path):
    """GCS's MD5 comes from the chunks its upload reads: retries re-read,
    a session may skip ahead; the digest must still be the file's."""
    import hashlib
    import os
    data = os.urandom(3 * vsa.CHUNK_SIZE + 123)
    path = str(tmp_path / "f")
    with open(path, "wb") as handle:
        handle.write(data)
    size, want = len(data), hashlib.md5(data).digest()
    third = size // 3

    def read(running, offset, length):
        for _ in vsa._FileSlice(path, offset, length, lambda: None, tap=running):
            pass

    plans = {
        "in order": [(0, third), (third, size - third)],
        "a chunk re-sent": [(0, third), (0, third), (third, size - third)],
        "resumed from earlier": [(0, 2 * third), (third, size - third)],
        "a gap, then the rest": [(0, third), (2 * third, size - 2 * third)],
        "nothing read": [],
    }
    for what, reads in plans.items():
        running = vsa._RunningHash("md5")
        for offset, length in reads:
            read(running, offset, length)
        assert running.digest(path, size, lambda: None) == want, what


def _retention_run(tmp_path, hours, retain, retain_days):
    """apply_retention at BASE, keeping the newest, on a local store holding
    snapshots ``hours`` old under Policy(retain, retain_days, 1h): (their
    names in the order of ``hours``, the store, what it deleted, the
    "Retention on" lines it logged).  The lines are caught on the agent's
    own logger: an in-process main() earlier in the session turns off its
    propagation to the root logger, where caplog listens."""
    names = [vsa.snapshot_name(BASE - datetime.timedelta(hours=h)) for h in hours]
    runtime = vsa.Runtime({}, vsa.Clock(), FakeSignals())
    store = vsa.LocalStorage(str(tmp_path / "snaps"), vsa.Policy(retain, retain_days, 3600.0),
                             runtime)
    os.makedirs(store.path)
    for name in names:
        open(os.path.join(store.path, name), "wb").close()
    messages = []
    catch = logging.Handler(logging.INFO)
    catch.emit = lambda record: messages.append(record.getMessage())
    level = vsa.LOG.level
    vsa.LOG.addHandler(catch)
    vsa.LOG.setLevel(logging.INFO)
    try:
        deleted = vsa.apply_retention(store, keep=names[0], now=BASE)
    finally:
        vsa.LOG.removeHandler(catch)
        vsa.LOG.setLevel(level)
    return names, store, deleted, [m for m in messages if m.startswith("Retention on")]


def test_retention_line_names_what_each_rule_kept_and_removed(tmp_path):
    names, store, deleted, lines = _retention_run(tmp_path, (0, 1, 30, 50, 60), 3, 1)
    # 30h old: within the newest 3 but older than a day; 50h and 60h: beyond the newest 3.
    assert deleted == names[2:]
    assert sorted(os.listdir(store.path)) == sorted(names[:2])
    assert len(lines) == 1
    assert "kept 2; deleted 3 (2 by retain=3, 1 by retain_days=1)" in lines[0]


def test_retention_line_with_only_retain_days_counts_what_is_kept(tmp_path):
    # The old line said "kept 0" (the retain setting) when only retain_days was set.
    names, store, deleted, lines = _retention_run(tmp_path, (0, 12, 24, 36, 49), 0, 2)
    assert deleted == [names[4]]
    line = lines[0]
    assert "kept 4; deleted 1 (1 by retain_days=2)" in line


@pytest.mark.parametrize("link", [True, False], ids=["hard-link", "copy"])
def test_a_name_another_agent_wrote_is_never_replaced(tmp_path, monkeypatch, link):
    # Two agents on one directory, the same millisecond: the second write is
    # a NameClash (the agent then moves to the next millisecond), and the
    # first agent's file keeps its bytes, on the link path and the copy path.
    store = make_store(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    data = write_archive(str(first))
    write_archive(str(second), state=b"other" * 100)
    store.upload(staged(first), own(3))
    if not link:
        monkeypatch.setattr(vsa.os, "link", lambda a, b: (_ for _ in ()).throw(OSError(18, "x")))
    with pytest.raises(vsa.NameClash):
        store.upload(staged(second), own(3))
    assert open(os.path.join(store.path, own(3)), "rb").read() == data
    assert sorted(os.listdir(store.path)) == [own(3)]


def test_the_copy_never_replaces_a_file_that_appears_meanwhile(tmp_path):
    # The race the existence check cannot close: another agent's file lands
    # between the check and the final rename; rename would replace it.
    final = tmp_path / "snap"
    temp = tmp_path / "temp"
    final.write_bytes(b"theirs")
    temp.write_bytes(b"ours")
    with pytest.raises(OSError):
        vsa._place(str(temp), str(final))
    assert final.read_bytes() == b"theirs"


# =============================================================================
# end to end: a full local disk
# =============================================================================


def _tmpfs(path, size="1m"):
    os.makedirs(path)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % size, "tmpfs", path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % result.stdout.decode().strip())


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 * MB, 1 * MB))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.usefixtures("isolated_env")
@pytest.mark.parametrize("how", ["rlimit-fsize", "tmpfs-staging", "tmpfs-copy"])
def test_full_local_disk_is_one_clear_error_and_keeps_older_snapshots(bao_cluster, approle,
                                                                       kv_data, tmp_path, how):
    snapdir = str(tmp_path / "tiny")
    mounted = how.startswith("tmpfs")
    if mounted:
        _tmpfs(snapdir)
    else:
        os.makedirs(snapdir)
    try:
        old = {name: ("old snapshot %d" % i).encode() for i, name in enumerate(
            GO_NAMES + ["raft_snapshot-20200101T000000.000Z.snap"])}
        for name, data in old.items():
            with open(os.path.join(snapdir, name), "wb") as handle:
                handle.write(data)
        extra = {"local_storage": {"path": snapdir, "retain": 1}}
        staging = tmp_path / "staging"
        if how == "tmpfs-copy":          # staged on a big disk, copied onto the full one
            staging.mkdir()
            extra["temp_dir"] = str(staging)
        config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, **extra)
        if how == "rlimit-fsize":
            proc = subprocess.run([sys.executable, "-I", AGENT, "-c", config, "--once"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  preexec_fn=_limit_file_size, timeout=120)
            code, log = proc.returncode, proc.stdout.decode("utf-8", "replace")
        else:
            code, log = run_main("-c", config, "--once")
        listing = sorted(os.listdir(snapdir))
        contents = dict((name, open(os.path.join(snapdir, name), "rb").read())
                        for name in listing if not name.startswith("."))
    finally:
        if mounted:
            subprocess.run(["umount", snapdir])
    assert code == 1, "%s: exit %s\n%s" % (how, code, log)
    assert "Traceback" not in log
    errors = error_lines(log)
    assert len(errors) == 1, "%s: expected one ERROR line\n%s" % (how, log)
    reason = "File too large" if how == "rlimit-fsize" else "No space left on device"
    assert reason in errors[0], errors[0]
    assert listing == sorted(old), "%s: partial or missing files: %s" % (how, listing)
    assert contents == old, "an older snapshot changed"
    if how == "tmpfs-copy":
        assert os.listdir(str(staging)) == []
    # an operator must be able to tell which disk is full
    assert snapdir in errors[0] or (how == "tmpfs-copy" and str(staging) in errors[0]), (
        "the error does not say where the write failed: %r" % errors[0])
