"""Storage block lists, names and file prefixes under hostile configs (the
sections Config, Storage backends, Status and Agent).

Guards that hold:

* blocks with colliding prefixes in one directory (``a`` and ``a-b``,
  ``raft`` and the default ``raft_snapshot``), each ``retain: 1``, keep
  exactly their own one snapshot through many cycles; names of a prefix
  with a malformed or far-future time are neither deleted nor planned from;
* ``download latest --storage NAME`` never takes a newer snapshot of
  another prefix in the same directory;
* a list holding null or a nested list, a name that would need escaping,
  and a bad credentials file in the second block are refused at load,
  naming the block by its place;
* a location that needs escaping is escaped in the metrics.

Defects found in review, fixed with these tests:

* a SIGHUP that moves a block (new ``path`` or ``file_prefix``, same
  ``name``) keeps the old place's schedule: the new place gets no snapshot
  for up to a whole frequency (before names, it got one at once); the
  status and the metrics keep the old location;
* a SIGHUP that renames a block leaves the old name in the status file and
  the metrics for good (a stuck ``consecutive_failures`` alert);
* a SIGHUP that swaps two blocks' names swaps their schedules: the daily
  block takes a second snapshot an hour after the first;
* one place written two ways (``:443``) is not refused;
* two static-name S3 blocks that differ only in ``file_prefix`` (which a
  static name does not use) write one object and are not refused;
* under a non-default prefix, ``prod-1.snap`` (the Go form, which the Go
  agent never wrote with this prefix) is deleted by retention;
* a block named ``-x`` cannot be chosen with ``--storage -x``.

Driven in process by a fake clock against a loopback fake Vault
(support/agent_sim.py); no real server.
"""

import datetime
import io
import json
import logging
import os

import pytest

import vault_snapshot_agent as vsa
from support.agent_sim import NOW, START, ScriptedVault, fake_clock, run_daemon, write_config
from support.agent_sim import load_doc as load, names_in, plant_named as plant
from support.harness import FakeSignals, captured_log, go_snapshot_name, read

HOUR = 3600.0

pytestmark = pytest.mark.usefixtures("isolated_env")


def s3(bucket, **extra):
    block = {"s3_bucket": bucket, "s3_region": "eu-west-1", "access_key_id": "AKIDEXAMPLE",
             "secret_access_key": "not-a-real-secret-key"}
    block.update(extra)
    return block


def run_reloading(tmp_path, vault, clock, docs, until, reload_at=START + 600):
    """The daemon on ``docs[0]``, reloaded with ``docs[1]`` at ``reload_at``,
    until ``until``: the log text."""
    docs = list(docs)
    path = os.path.join(str(tmp_path), "c.json")

    def loader(runtime):
        write_config(tmp_path, docs.pop(0) if len(docs) > 1 else docs[0])
        return vsa.load_all(path, runtime)
    signals = FakeSignals(clock, until=until, events=[(reload_at, "reload_requested")])
    with captured_log(logging.INFO) as stream:
        vsa.Agent(loader, clock, signals, env={}).run_forever()
    log = stream.getvalue()
    assert log.count("Config reloaded") == 1, log
    return log


def base(tmp_path, vault, **extra):
    doc = {"addr": vault.url, "role_id": "r", "secret_id": "s", "frequency": "1h",
           "leader_poll": "0s", "status_file": str(tmp_path / "status.json"),
           "metrics_textfile": str(tmp_path / "m.prom")}
    doc.update(extra)
    return doc


# -- guards: colliding prefixes, planted names, download, load errors -------------


def test_retain_one_on_colliding_prefixes_in_one_directory_keeps_each_its_own(tmp_path):
    snaps = tmp_path / "snaps"
    future = NOW + datetime.timedelta(days=400)
    strangers = [plant(snaps, "a-b-20261299T000000.000Z.snap"),            # a malformed time
                 plant(snaps, vsa.snapshot_name(future, "a")),            # far future
                 plant(snaps, "a-99999999999999999999.snap"),             # Go form, year 5138
                 plant(snaps, vsa.snapshot_name(NOW, "A")),               # another case
                 plant(snaps, vsa.snapshot_name(NOW, "raft_snapshot-1"))]
    go_old = plant(snaps, go_snapshot_name(NOW - datetime.timedelta(days=2)))
    prefixes = ("a", "a-b", "raft", "raft_snapshot")
    blocks = [{"path": str(snaps), "name": "n%d" % i, "file_prefix": p, "retain": 1}
              for i, p in enumerate(prefixes)]
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        _, log = run_daemon(tmp_path, vault, clock, FakeSignals(clock, until=START + 12 * HOUR + 60),
                            local_storage=blocks)
        taken = vault.snapshot_times()
    assert len(taken) == 13, taken          # the future "a" name did not push "a" back
    for prefix in prefixes:
        own = [n for n in names_in(snaps, prefix) if n not in strangers]
        assert len(own) == 1, (prefix, sorted(os.listdir(str(snaps))))
    for stranger in strangers:
        assert os.path.exists(str(snaps / stranger)), stranger
    assert not os.path.exists(str(snaps / go_old))      # the default prefix rotates the Go agent's
    assert "deleted 1 (1 by retain=1)" in log


def test_download_latest_by_name_never_takes_a_newer_snapshot_of_another_prefix(tmp_path):
    snaps = tmp_path / "snaps"
    mine = plant(snaps, vsa.snapshot_name(NOW - datetime.timedelta(hours=3), "east"))
    plant(snaps, vsa.snapshot_name(NOW - datetime.timedelta(minutes=1), "west"))
    doc = {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s", "local_storage": [
        {"path": str(snaps), "name": "east", "file_prefix": "east"},
        {"path": str(snaps), "name": "west", "file_prefix": "west"}]}
    out, stream = io.StringIO(), io.StringIO()
    target = str(tmp_path / "got.snap")
    code = vsa.main(["-c", write_config(tmp_path, doc), "download", "latest", "-o", target,
                     "--storage", "east"], stream=stream, out=out)
    assert code == 0, stream.getvalue()
    assert read(target) == read(snaps / mine)


@pytest.mark.parametrize("entry,line", [
    (None, "local_storage[2]: must be an object, got null"),
    ([{"path": "/x"}], "local_storage[2]: must be an object, got a list"),
    ({"path": "/y", "name": 'a"b'}, "local_storage[2].name: 'a\"b' is not a valid storage name"),
    ({"path": "/y", "name": "a\\b"}, "local_storage[2].name: "),
    ({"path": "/y", "name": "a\nb"}, "local_storage[2].name: "),
    ({"path": "/y", "name": "x" * 65}, "local_storage[2].name: "),
    ({"path": "/y", "file_prefix": ".."}, "local_storage[2].file_prefix: '..' is not a valid"),
    ({"path": "/y", "file_prefix": ".hidden"}, "local_storage[2].file_prefix: '.hidden' is not"),
    ({"path": "/y", "file_prefix": "-a"}, "local_storage[2].file_prefix: '-a' is not"),
    ({"path": "/y", "file_prefix": "a/b"}, "local_storage[2].file_prefix: 'a/b' is not"),
])
def test_a_hostile_second_entry_is_refused_naming_its_place(tmp_path, entry, line):
    with pytest.raises(vsa.ConfigError) as caught:
        load(tmp_path, {"local_storage": [{"path": "/x"}, entry]})
    assert str(caught.value).startswith(line), str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bad_credentials_file_in_the_second_block_is_refused_at_load_naming_it(tmp_path):
    bad = tmp_path / "sa.json"
    bad.write_text(json.dumps({"type": "service_account"}))
    os.chmod(str(bad), 0o600)
    doc = {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s",
           "local_storage": {"path": str(tmp_path / "l")},
           "google_storage": [{"bucket": "good-one", "anonymous": True, "endpoint": "http://127.0.0.1:1"},
                              {"bucket": "bad-two", "credentials_file": str(bad)}]}
    stream = io.StringIO()
    code = vsa.main(["-c", write_config(tmp_path, doc), "--check-config"], stream=stream,
                    out=io.StringIO(), env={})
    assert code == 2
    assert "Config error: google_storage[2].credentials_file: credentials file" in stream.getvalue()


def test_a_location_that_needs_escaping_is_escaped_in_the_metrics(tmp_path):
    odd = tmp_path / 'q"b\\s'
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        run_daemon(tmp_path, vault, clock, FakeSignals(clock, until=START + 60),
                   **base(tmp_path, vault, local_storage=[{"path": str(odd), "name": "odd"}]))
    metrics = read(tmp_path / "m.prom")
    escaped = str(odd).replace("\\", "\\\\").replace('"', '\\"')
    assert ('vault_snapshot_storage_successes_total{storage="local:%s",type="local",name="odd"} 1'
            % escaped) in metrics, metrics


# -- bugs: reloads -------------------------------------------------------------------


@pytest.mark.parametrize("change", [{"path": "b"}, {"file_prefix": "moved"}])
def test_a_reload_that_moves_a_block_snapshots_the_empty_new_place_at_once(tmp_path, change):
    old = {"path": str(tmp_path / "a"), "name": "weekly", "frequency": "168h"}
    new = dict(old, **change)
    new["path"] = str(tmp_path / new["path"]) if "path" in change else old["path"]
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        run_reloading(tmp_path, vault, clock, [base(tmp_path, vault, local_storage=[old]),
                                               base(tmp_path, vault, local_storage=[new])],
                      until=START + 2 * HOUR)
        taken = vault.snapshot_times()
    assert taken == [0.0, 600.0], taken     # measured: [0.0]; nothing new for 168h
    assert len(names_in(new["path"], new.get("file_prefix", "raft_snapshot"))) == 1


def test_after_a_reload_moves_a_block_status_and_metrics_show_the_new_location(tmp_path):
    old = {"path": str(tmp_path / "a"), "name": "tier"}
    new = dict(old, path=str(tmp_path / "b"))
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        run_reloading(tmp_path, vault, clock, [base(tmp_path, vault, local_storage=[old]),
                                               base(tmp_path, vault, local_storage=[new])],
                      until=START + HOUR + 60)
    assert len(names_in(tmp_path / "b", "raft_snapshot")) == 1      # stored there after the reload
    status = json.loads(read(tmp_path / "status.json"))["storages"]
    assert status["tier"]["location"] == "local:%s" % (tmp_path / "b"), status
    assert 'storage="local:%s"' % (tmp_path / "a") not in read(tmp_path / "m.prom")


def test_a_reload_that_renames_a_block_drops_the_old_name_from_status_and_metrics(tmp_path):
    (tmp_path / "blocked").write_text("a file where a directory should be")
    old = {"path": str(tmp_path / "blocked" / "x"), "name": "old"}
    new = {"path": str(tmp_path / "good"), "name": "new"}
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        run_reloading(tmp_path, vault, clock,
                      [base(tmp_path, vault, retry_interval="0s", local_storage=[old]),
                       base(tmp_path, vault, retry_interval="0s", local_storage=[new])],
                      until=START + 2 * HOUR + 60)
    status = json.loads(read(tmp_path / "status.json"))["storages"]
    assert status["new"]["successes"] == 2, status
    metrics = read(tmp_path / "m.prom")
    assert list(status) == ["new"], status      # measured: ["old", "new"]
    assert 'name="old"' not in metrics, metrics  # measured: consecutive_failures{...name="old"} 1


def test_a_reload_that_swaps_two_names_keeps_each_blocks_own_schedule(tmp_path):
    hourly = {"path": str(tmp_path / "h"), "frequency": "1h"}
    daily = {"path": str(tmp_path / "d"), "frequency": "24h"}
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        before = base(tmp_path, vault, local_storage=[dict(hourly, name="fast"), dict(daily, name="slow")])
        after = base(tmp_path, vault, local_storage=[dict(hourly, name="slow"), dict(daily, name="fast")])
        run_reloading(tmp_path, vault, clock, [before, after], until=START + 3 * HOUR + 60)
    assert len(names_in(tmp_path / "h", "raft_snapshot")) == 4
    # measured: 2 (at the start and one hour later; the next then at 25h)
    assert len(names_in(tmp_path / "d", "raft_snapshot")) == 1


# -- bugs: one place written two ways, static names, stray names ------------------------


@pytest.mark.parametrize("key,blocks", [
    ("aws_storage", [s3("one"), s3("one", s3_endpoint="https://s3.eu-west-1.amazonaws.com:443")]),
    ("azure_storage", [{"account_name": "acct", "account_key": "eA==", "container_name": "cont"},
                       {"endpoint": "https://acct.blob.core.windows.net:443/", "account_key": "eA==",
                        "container_name": "cont"}]),
    ("google_storage", [{"bucket": "bkt", "anonymous": True, "endpoint": "http://127.0.0.1:80"},
                        {"bucket": "bkt", "anonymous": True, "endpoint": "http://127.0.0.1/"}]),
])
def test_one_place_with_and_without_its_default_port_is_refused(tmp_path, key, blocks):
    with pytest.raises(vsa.ConfigError) as caught:
        load(tmp_path, {key: blocks})
    assert "%s[1] and %s[2]: both store at" % (key, key) in str(caught.value)


def test_two_static_name_blocks_writing_one_object_are_refused(tmp_path):
    with pytest.raises(vsa.ConfigError) as caught:
        load(tmp_path, {"aws_storage": [
            s3("one", s3_static_snapshot_name="latest", name="hourly"),
            s3("one", s3_static_snapshot_name="latest", name="daily", frequency="24h",
               file_prefix="daily")]})
    assert "aws_storage[1] and aws_storage[2]: both store at" in str(caught.value)
    storages = vsa.build_storages(load(tmp_path, {"aws_storage": [
        s3("one", s3_static_snapshot_name="latest")]}), vsa.Runtime({}, vsa.Clock(), FakeSignals()))
    assert storages[0].key_for("ignored") == "raft_snapshots/latest.snap"


def test_a_short_numeric_name_under_a_custom_prefix_is_not_a_snapshot(tmp_path):
    snaps = tmp_path / "snaps"
    stray = [plant(snaps, "prod-1.snap"), plant(snaps, "prod-2024.snap")]
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        _, log = run_daemon(tmp_path, vault, clock, FakeSignals(clock, until=START + 60),
                            local_storage={"path": str(snaps), "file_prefix": "prod", "retain": 1})
    for name in stray:
        # measured: both deleted ("deleted 2 (2 by retain=1): prod-1.snap, prod-2024.snap")
        assert os.path.exists(str(snaps / name)), log


def test_a_block_name_can_be_chosen_with_storage(tmp_path):
    snaps = tmp_path / "snaps"
    plant(snaps, vsa.snapshot_name(NOW))
    doc = {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s",
           "local_storage": [{"path": str(snaps), "name": "-x"}]}
    try:
        path = write_config(tmp_path, doc)
        vsa.load_config(path, {})
    except vsa.ConfigError:
        return                                  # refused at load: fine
    stream = io.StringIO()
    code = vsa.main(["-c", path, "download", "latest", "-o", str(tmp_path / "got.snap"),
                     "--storage", "-x"], stream=stream, out=io.StringIO())
    assert code == 0, stream.getvalue()        # measured: 2, "expected one argument"
