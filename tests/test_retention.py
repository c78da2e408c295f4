"""Retention that can never empty a storage or eat the real history.

What a user would notice, on a real LocalStorage in a temporary directory
(or an S3 storage against a loopback fake S3 that records every request):

* two agents during a failover, each with ``max_space``: the one that wrote
  the older snapshot never deletes the newer one, and the two together
  never empty the storage (each used to delete the other's snapshot);
* a host whose clock jumped 400 days ahead writes a snapshot dated then:
  ``retain_days`` counts from the snapshot before it (with a WARNING), so
  the real history stays; once the clock is corrected it still stays;
* the age and size rules never leave fewer than two snapshots
  (RETENTION_FLOOR); an explicit ``retain: 1`` still leaves one;
* ``s3_static_snapshot_name`` applies no retention at all (it used to send
  a DeleteObjects naming the static object just written), and a download
  of a listed snapshot GETs that snapshot's own key.

No servers but loopback ones; these run under every Python.
"""

import datetime
import io
import json
import os


import vault_snapshot_agent as vsa
from support.fake_s3 import BUCKET, FakeS3
from support.harness import FakeSignals, captured_log

UTC = vsa.UTC
DAY = datetime.timedelta(days=1)
HOUR = datetime.timedelta(hours=1)
NOW = datetime.datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
PREFIX = "raft_snapshots"


# -- helpers -------------------------------------------------------------------


def name(when):
    return vsa.snapshot_name(when)


def local_store(directory, retain=0, retain_days=0, max_space=0, frequency=3600.0):
    """A LocalStorage on ``directory`` (created 0700 if missing)."""
    directory = str(directory)
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o700)
    runtime = vsa.Runtime({}, vsa.Clock(), FakeSignals())
    return vsa.LocalStorage(directory, vsa.Policy(retain, retain_days, frequency, max_space),
                            runtime)


def plant(directory, names, size=1000):
    for planted in names:
        with open(os.path.join(str(directory), planted), "wb") as handle:
            handle.write(planted.encode("ascii")[:size].ljust(size, b"s"))


def on_disk(store):
    return sorted(os.listdir(store.path))


def retain(store, keep, now):
    """apply_retention: (deleted names, log text)."""
    with captured_log() as stream:
        deleted = vsa.apply_retention(store, keep=keep, now=now)
    return deleted, stream.getvalue()


class FrozenListing:
    """A storage as seen by an agent that listed it at one moment: list()
    returns that listing, everything else is the real storage's."""

    def __init__(self, store, listing):
        self._store, self._listing = store, list(listing)

    def list(self):
        return list(self._listing)

    def __getattr__(self, attr):
        return getattr(self._store, attr)


# -- two agents, max_space ----------------------------------------------------


def test_the_agent_that_wrote_the_older_snapshot_keeps_the_newer_one(tmp_path):
    # Agent A (a deposed leader) just wrote ``a``; agent B (the new leader)
    # wrote ``b`` a minute later. Room for one snapshot only.
    c, a, b = name(NOW - DAY), name(NOW), name(NOW + datetime.timedelta(minutes=1))
    store = local_store(tmp_path / "snaps", max_space=1500)
    plant(store.path, [c, a, b])
    deleted, log = retain(store, a, NOW + datetime.timedelta(minutes=2))
    assert b in on_disk(store), (deleted, log)           # never newer than the one just written
    assert on_disk(store) == sorted([a, b]), (deleted, log)
    assert deleted == [c], log


def test_two_agents_with_max_space_never_empty_the_storage(tmp_path):
    # Both agents list the storage at the same moment (each has just written
    # its snapshot), then each applies its own plan: A keeps a, B keeps b.
    c, a, b = name(NOW - DAY), name(NOW), name(NOW + datetime.timedelta(minutes=1))
    store = local_store(tmp_path / "snaps", max_space=1500)
    plant(store.path, [c, a, b])
    listing = store.list()
    later = NOW + datetime.timedelta(minutes=2)
    deleted_by_a, log_a = retain(FrozenListing(store, listing), a, later)
    deleted_by_b, log_b = retain(FrozenListing(store, listing), b, later)
    left = on_disk(store)
    assert left, "the storage was emptied: A deleted %s, B deleted %s\n%s%s" % (
        deleted_by_a, deleted_by_b, log_a, log_b)
    assert left == sorted([a, b]), (left, log_a, log_b)
    assert c not in left                                  # the size rule still works


# -- a clock that jumps ahead ---------------------------------------------------


def test_a_forward_clock_jump_does_not_delete_the_history_as_old(tmp_path):
    history = [name(NOW - d * DAY) for d in range(30)]        # 30 daily, the last 30 days
    store = local_store(tmp_path / "snaps", retain_days=30)
    plant(store.path, history)
    jumped = NOW + 400 * DAY + HOUR                           # this host's clock: 2027
    wild = name(jumped)
    assert wild.startswith("raft_snapshot-2027")
    plant(store.path, [wild])
    deleted, log = retain(store, wild, jumped)
    assert deleted == [], log
    assert on_disk(store) == sorted(history + [wild]), log
    warnings = [line for line in log.splitlines()
                if " WARNING " in line and "retain_days counts each such gap" in line]
    assert len(warnings) == 1 and history[0] in warnings[0], log

    # The clock is corrected; the next cycle's snapshot is dated an hour after
    # the last real one. The 2027 name is in the future now: left alone.
    corrected = NOW + HOUR
    plant(store.path, [name(corrected)])
    deleted, log = retain(store, name(corrected), corrected)
    assert deleted == [], log
    assert on_disk(store) == sorted(history + [wild, name(corrected)]), log


def test_a_clock_that_stays_ahead_for_a_second_cycle_does_not_delete_the_history(tmp_path):
    history = [name(NOW - d * DAY) for d in range(30)]
    store = local_store(tmp_path / "snaps", retain_days=30)
    plant(store.path, history)
    jumped = NOW + 400 * DAY + HOUR
    for cycle in range(2):                                    # hourly, the clock still ahead
        when = jumped + cycle * HOUR
        plant(store.path, [name(when)])
        deleted, log = retain(store, name(when), when)
        # The gap counts as a day: the history ages by that day and the hours
        # after it, so at most the 29-day-old snapshot goes, never the history.
        assert set(deleted) <= set(history[-1:]), (cycle, log)
    assert len([n for n in on_disk(store) if n in history]) >= 29


# -- the floor ------------------------------------------------------------------


def test_age_and_size_rules_leave_two_snapshots_an_explicit_retain_may_leave_one(tmp_path):
    # Weekly snapshots kept for a week; the new one came a day late, so every
    # older one is past retain_days (and none fits max_space).
    week = 7 * DAY
    old = [name(NOW - DAY - (w + 1) * week) for w in range(5)]
    new = name(NOW)
    cases = [("age", dict(retain_days=7), 2), ("size", dict(max_space=1000), 2),
             ("age and size", dict(retain_days=7, max_space=1), 2),
             ("retain 1", dict(retain=1, retain_days=7, max_space=1), 1)]
    for label, policy, left in cases:
        store = local_store(tmp_path / label.replace(" ", "-"), frequency=week.total_seconds(),
                            **policy)
        plant(store.path, old + [new])
        deleted, log = retain(store, new, NOW)
        expected = [new, old[0]][:left]                      # the newest ones
        assert on_disk(store) == sorted(expected), (label, deleted, log)
        assert sorted(deleted) == sorted(set(old + [new]) - set(expected)), (label, log)
    # Without a snapshot just written (keep=None) the floor holds too.
    store = local_store(tmp_path / "no-keep", retain_days=7, frequency=week.total_seconds())
    plant(store.path, old)
    deleted, log = retain(store, None, NOW)
    assert on_disk(store) == sorted(old[:2]), (deleted, log)


# -- s3_static_snapshot_name ---------------------------------------------------


def s3_storage(tmp_path, s3, **block):
    """The aws_storage block's storage, built by load_all() as the agent does."""
    config = {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s",
              "aws_storage": s3.storage_block(s3_key_prefix=PREFIX, **block)}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    runtime = vsa.Runtime({}, vsa.Clock(), FakeSignals())
    _, storages = vsa.load_all(str(path), runtime)
    return storages[0]


def test_a_static_s3_name_applies_no_retention(tmp_path):
    # Timestamped snapshots from before the switch to a static name, then the
    # static object the cycle just wrote.
    history = ["%s/%s" % (PREFIX, name(NOW - d * DAY)) for d in range(10, 14)]
    static = "%s/latest.snap" % PREFIX
    objects = dict((key, b"h" * 2048) for key in history)
    objects[static] = b"the snapshot just written"
    with FakeS3(objects) as s3:
        storage = s3_storage(tmp_path, s3, s3_static_snapshot_name="latest", retain_days=1,
                             max_space="1kB")
        with captured_log() as stream:
            deleted = vsa.apply_retention(storage, keep=name(NOW), now=NOW)
        bodies = [r.body.decode("utf-8", "replace") for r in s3.deletes()]
        left = dict(s3.objects)
    assert bodies == [], "DeleteObjects sent: %s\n%s" % (bodies, stream.getvalue())
    assert deleted == [], stream.getvalue()
    assert left == objects


def test_an_s3_download_gets_the_listed_key_not_the_static_one(tmp_path):
    listed = name(NOW - DAY)
    key = "%s/%s" % (PREFIX, listed)
    objects = {key: b"the listed snapshot", "%s/latest.snap" % PREFIX: b"the static one"}
    with FakeS3(objects) as s3:
        storage = s3_storage(tmp_path, s3, s3_static_snapshot_name="latest")
        assert [ref.name for ref in storage.list()] == [listed]
        sink = io.BytesIO()
        storage.download(listed, sink)
        gets = s3.paths("GET")
    assert gets[-1] == "/%s/%s" % (BUCKET, key), gets
    assert sink.getvalue() == b"the listed snapshot"
