"""Issue 12: ``max_space``, retention by size, and the retention line.

End to end on every storage (local directory, moto S3, Azurite, the GCS
emulator): pre-made snapshots of known sizes with this agent's and the Go
agent's names (older times), plus foreign objects, then one real ``--once``
cycle with a cap that leaves room for the new snapshot and exactly two old
ones.  The new snapshot's size is measured first (a snapshot straight from
the cluster's leader), and every old one is ``OLD_SIZE`` bytes, so the cap
sits half an old snapshot away from either answer.

Unit tests (no servers; they run on 3.6 too): the size syntax through the
config, the WARNING when the new snapshot alone is over the cap, and the
exact retention line when retain, retain_days and max_space all delete.
"""

import datetime
import json
import os
import re

import pytest

import vault_snapshot_agent as vsa
from support.harness import (FakeSignals, captured_log, clear_cloud_env, error_lines, go_snapshot_name,
                             run_main, run_once, success_location, unique)
from support.storage_blocks import azure_key_block as key_block, s3_block

UTC = vsa.UTC
OLD_SIZE = 512 * 1024                   # each pre-made snapshot
OLD_COUNT = 5                           # of which the 2 newest must stay
BASE = datetime.datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)      # "old" snapshots' times


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    clear_cloud_env(monkeypatch, tmp_path)


# -- helpers ----------------------------------------------------------------------------


def own(hours):
    """This agent's name for BASE plus ``hours``."""
    return vsa.snapshot_name(BASE + datetime.timedelta(hours=hours))


def go(hours):
    """The Go agent's name (nanoseconds since the epoch) for BASE plus ``hours``."""
    return go_snapshot_name(BASE + datetime.timedelta(hours=hours))


def old_snapshots():
    """OLD_COUNT names, oldest first, in both name styles."""
    return [go(0), own(1), go(2), own(3), own(4)]


def snapshot_size(bao_cluster):
    """The size of a snapshot of the cluster as it is now."""
    status, _, data = bao_cluster.api_raw("GET", "sys/storage/raft/snapshot",
                                          node=bao_cluster.leader(), timeout=120)
    assert status == 200, data[:300]
    return len(data)


def cap_for(new_size):
    """A cap that keeps the new snapshot and the 2 newest old ones: half an
    old snapshot of room on either side."""
    return new_size + 2 * OLD_SIZE + OLD_SIZE // 2


def expected_after(names):
    """(kept, deleted) of the old snapshots under cap_for()."""
    return names[-2:], names[:-2]


def retention_line(log):
    lines = [ln for ln in log.splitlines() if "Retention on " in ln]
    assert len(lines) == 1, log
    return lines[0]


def assert_max_space_line(log, deleted, where):
    line = retention_line(log)
    assert "Retention on %s" % where in line, line
    assert re.search(r": kept 3; deleted 3 \(3 by max_space=[^)]+\): ", line), line
    assert "by retain=" not in line and "by retain_days=" not in line, line
    for name in deleted:
        assert name in line, line


def blob_of(size, seed):
    """``size`` bytes (not an archive: retention never reads them)."""
    return (seed.encode() * (size // len(seed) + 1))[:size]


def run_capped(tmp_path, bao_cluster, approle, config_for):
    """One ``--once`` run with the storage config ``config_for(cap)`` returns
    (run_once's keyword arguments), ``cap`` from cap_for() on a snapshot
    measured now: (exit code, log)."""
    cap = cap_for(snapshot_size(bao_cluster))
    return run_once(tmp_path, bao_cluster.leader().addr, approle, **config_for(cap))


def plant_old(put, prefix, foreign):
    """With ``put(key, data)``: the old snapshots under ``prefix/``, then the
    ``foreign`` keys (three old snapshots' size each).  The old names, oldest
    first."""
    names = old_snapshots()
    for name in names:
        put("%s/%s" % (prefix, name), blob_of(OLD_SIZE, name))
    for key in foreign:
        put(key, b"f" * (3 * OLD_SIZE))
    return names


def assert_cloud_outcome(code, log, marker, names, prefix, foreign, listed, where):
    """After a run over what plant_old() put: it succeeded, ``listed()`` (the
    keys under ``prefix/``, sorted) is the new snapshot, the old ones
    cap_for() keeps and the foreign keys, and the one retention line on
    ``where`` names the deleted ones."""
    assert code == 0, log
    new = success_location(log, marker)
    kept, deleted = expected_after(names)
    assert listed() == sorted(["%s/%s" % (prefix, n) for n in kept] + [new] + foreign)
    assert_max_space_line(log, deleted, where)


# -- end to end, one storage at a time --------------------------------------------------


def test_local_storage(bao_cluster, approle, tmp_path):
    directory = tmp_path / "local"
    directory.mkdir(mode=0o700)
    names = old_snapshots()
    for name in names:
        (directory / name).write_bytes(blob_of(OLD_SIZE, name))
    foreign = {"notes.txt": 10 * OLD_SIZE, "raft_snapshot-latest.snap": 3 * OLD_SIZE}
    for name, size in foreign.items():
        (directory / name).write_bytes(b"f" * size)
    code, log = run_capped(tmp_path, bao_cluster, approle, lambda cap: {
        "max_space": "%dkB" % (cap // 1000), "local_storage": {"path": str(directory)}})
    assert code == 0, log
    new = os.path.basename(success_location(log, "Successfully created local snapshot to"))
    kept, deleted = expected_after(names)
    assert sorted(os.listdir(str(directory))) == sorted(kept + [new] + list(foreign))
    assert_max_space_line(log, deleted, "local:%s" % directory)


def test_s3(moto, bao_cluster, approle, tmp_path):
    bucket, prefix = "snapshots", unique("maxspace")
    foreign = ["%s/notes.txt" % prefix, "%s/sub/%s" % (prefix, go(-1))]
    names = plant_old(lambda key, data: moto.put(bucket, key, data), prefix, foreign)
    code, log = run_capped(tmp_path, bao_cluster, approle, lambda cap: {"aws_storage": s3_block(
        moto, s3_bucket=bucket, s3_key_prefix=prefix, max_space="%dKiB" % (cap // 1024))})
    assert_cloud_outcome(code, log, "Successfully created aws snapshot to s3://%s/" % bucket,
                         names, prefix, foreign, lambda: moto.list_keys(bucket, prefix + "/"),
                         "s3://%s/%s/" % (bucket, prefix))


def test_azure(azurite, bao_cluster, approle, tmp_path):
    container, prefix = "snapshots", unique("maxspace")
    foreign = ["%s/readme.txt" % prefix, "%s/sub/%s" % (prefix, own(-1))]
    names = plant_old(lambda blob, data: azurite.put_blob(container, blob, data), prefix, foreign)
    code, log = run_capped(tmp_path, bao_cluster, approle, lambda cap: {"azure_storage": key_block(
        azurite, container_name=container, prefix=prefix, max_space=cap)})   # a JSON byte count
    assert_cloud_outcome(code, log, "Successfully created azure snapshot to %s/%s/"
                         % (azurite.endpoint, container), names, prefix, foreign,
                         lambda: sorted(azurite.blob_names(container, prefix + "/")), "azure:")


def test_gcs(gcs, bao_cluster, approle, tmp_path):
    bucket, prefix = "snapshots", unique("maxspace")
    foreign = ["%s/notes.txt" % prefix, "%s/sub/%s" % (prefix, own(-1))]
    names = plant_old(lambda obj, data: gcs.put_object(bucket, obj, data), prefix, foreign)
    code, log = run_capped(tmp_path, bao_cluster, approle, lambda cap: {
        "max_space": "%.3fMB" % (cap / 1e6),                           # inherited by the block
        "google_storage": {"bucket": bucket, "endpoint": gcs.endpoint, "anonymous": True,
                           "prefix": prefix}})
    assert_cloud_outcome(code, log, "Successfully created google snapshot to gs://%s/" % bucket,
                         names, prefix, foreign, lambda: gcs.list_objects(bucket, prefix + "/"),
                         "gs://%s/%s/" % (bucket, prefix))


# -- config: the size syntax (no server) ------------------------------------------------


def check_config(tmp_path, value, where):
    """``--check-config`` with max_space set at the top level or in the
    local_storage block: (exit code, log)."""
    local = {"path": str(tmp_path / "snaps")}
    config = {"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s",
              "local_storage": local}
    (config if where == "top" else local)["max_space"] = value
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    return run_main("-c", str(path), "--check-config")


@pytest.mark.parametrize("where", ["top", "local_storage"])
@pytest.mark.parametrize("value", ["500MB", "20GiB", 1024, "1024", "0", 0, "1.5GB", "10kb",
                                   "7TB", "100B", "2tib"])
def test_sizes_accepted(tmp_path, capsys, value, where):
    code, log = check_config(tmp_path, value, where)
    assert code == 0, log
    assert "unknown config key" not in log, log
    shown = json.loads(capsys.readouterr().out)
    assert "max_space" in (shown if where == "top" else shown["local_storage"]), shown


@pytest.mark.parametrize("where", ["top", "local_storage"])
@pytest.mark.parametrize("value", ["-1", -1, "1.5.5GB", "10XB", True, "MB", "12 parsecs",
                                   [5]])
def test_sizes_refused(tmp_path, value, where):
    code, log = check_config(tmp_path, value, where)
    assert code == 2, log
    errors = error_lines(log)
    name = "max_space" if where == "top" else "local_storage.max_space"
    assert len(errors) == 1 and name in errors[0], log
    assert "unknown config key" not in log


# -- retention on a local store (no server) ---------------------------------------------

NOW = datetime.datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


def at(hours_ago):
    return vsa.snapshot_name(NOW - datetime.timedelta(hours=hours_ago))


def store_with(tmp_path, files, retain=0, retain_days=0, max_space=0):
    """A LocalStorage holding ``files`` ({name: size})."""
    directory = tmp_path / "snaps"
    directory.mkdir(mode=0o700)
    for name, size in files.items():
        (directory / name).write_bytes(b"s" * size)
    runtime = vsa.Runtime({}, vsa.Clock(), FakeSignals())
    return vsa.LocalStorage(str(directory), vsa.Policy(retain, retain_days, 3600.0, max_space),
                            runtime)


def retain_run(store, keep):
    with captured_log() as stream:
        deleted = vsa.apply_retention(store, keep=keep, now=NOW)
    return deleted, stream.getvalue()


def test_newest_kept_while_the_total_fits_boundary_included(tmp_path):
    files = {at(0): 1000, at(1): 1000, at(2): 1000, at(3): 1000, "notes.txt": 10 ** 6}
    store = store_with(tmp_path, files, max_space=3000)           # exactly three fit
    deleted, log = retain_run(store, at(0))
    assert deleted == [at(3)]
    assert sorted(os.listdir(store.path)) == sorted([at(0), at(1), at(2), "notes.txt"])
    assert "kept 3; deleted 1 (1 by max_space=" in retention_line(log)


def test_new_snapshot_alone_over_the_cap_is_kept_with_a_warning(tmp_path):
    files = {at(0): 5000, at(1): 10, go(-1000): 10}
    store = store_with(tmp_path, files, max_space=1000)
    deleted, log = retain_run(store, at(0))
    # The size rule never leaves fewer than RETENTION_FLOOR (2) snapshots.
    assert deleted == [go(-1000)]
    assert sorted(os.listdir(store.path)) == sorted([at(0), at(1)])
    warnings = [ln for ln in log.splitlines() if " WARNING " in ln and "alone exceeds max_space" in ln]
    assert len(warnings) == 1, log
    assert "kept 2; deleted 1 (1 by max_space=" in retention_line(log)


def test_zero_is_no_cap(tmp_path):
    files = {at(h): 10 ** 5 for h in range(4)}
    store = store_with(tmp_path, files, retain=10, max_space=0)
    deleted, log = retain_run(store, at(0))
    assert deleted == [] and len(os.listdir(store.path)) == 4
    line = retention_line(log)
    assert line.endswith("kept 4; deleted 0 (0 by retain=10)"), line


def test_all_three_rules_in_one_line(tmp_path):
    """Newest first: new, 1h, 2h, 3h, 30h, 40h, 50h, 60h old, 1000 bytes each.
    retain=6 takes the two oldest; retain_days=1 the other two older than a
    day; max_space=3500 (three fit) the 3h one.  A snapshot several rules
    would delete counts for the first rule of the line."""
    hours = [0, 1, 2, 3, 30, 40, 50, 60]
    files = dict((at(h), 1000) for h in hours)
    files["foreign.snap"] = 10 ** 6
    store = store_with(tmp_path, files, retain=6, retain_days=1, max_space=3500)
    deleted, log = retain_run(store, at(0))
    assert sorted(deleted) == sorted(at(h) for h in (3, 30, 40, 50, 60))
    assert sorted(os.listdir(store.path)) == sorted([at(0), at(1), at(2), "foreign.snap"])
    line = retention_line(log)
    assert re.search(r"Retention on local:%s: kept 3; deleted 5 \(2 by retain=6, "
                     r"2 by retain_days=1, 1 by max_space=[^)]+\): " % re.escape(store.path),
                     line), line
    for h in (3, 30, 40, 50, 60):
        assert at(h) in line


def test_nothing_deleted_still_says_what_was_kept(tmp_path):
    files = {at(0): 100, at(1): 100}
    store = store_with(tmp_path, files, retain=3, retain_days=30, max_space=10 ** 6)
    deleted, log = retain_run(store, at(0))
    assert deleted == []
    line = retention_line(log)
    assert re.search(r": kept 2; deleted 0 \(0 by retain=3, 0 by retain_days=30, "
                     r"0 by max_space=[^)]+\)$", line), line


def test_no_rule_set_no_line(tmp_path):
    store = store_with(tmp_path, {at(0): 100, at(1): 100})
    deleted, log = retain_run(store, at(0))
    assert deleted == [] and "Retention on" not in log
