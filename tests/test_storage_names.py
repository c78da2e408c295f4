"""Several storage blocks of one kind, block names and file prefixes (the
sections Config, Storage backends, Agent and Restore tooling).

* each ``*_storage`` key takes one object (as always) or a list of them; a
  block's ``name`` defaults to its kind (``aws``), in a list to the kind and
  its place counted from 1 (``aws-2``); an error names the block the same
  way (``aws_storage[2].s3_bucket``);
* ``--check-config`` shows a list as a list with every key of every block,
  ``name`` and ``file_prefix`` included, secrets masked;
* two blocks at one place (a directory, a bucket and key prefix, with one
  file prefix) are refused with one line naming both;
* names are ``<file_prefix>-<time>.snap`` with one of the two time formats,
  matched exactly: prefix ``raft`` never sees ``raft_snapshot-...``, ``a``
  never sees ``a-1-...``; the Go agent's names belong to the default prefix;
* two blocks sharing one directory with two prefixes keep exactly their own
  ``retain`` over many cycles, and after a restart each plans from its own
  names (the agent's schedule is keyed by the block name: both blocks have
  one location);
* the status file, the metrics, the log, ``list`` and ``--storage`` use the
  names; one block failing leaves the other's snapshot.

Driven in process by a fake clock against a loopback fake Vault
(support/agent_sim.py).
"""

import datetime
import io
import json
import logging
import os
import re

import pytest

import vault_snapshot_agent as vsa
from support.agent_sim import NOW, START, ScriptedVault, fake_clock, run_daemon, write_config
from support.agent_sim import load_doc as load, names_in, plant_named as plant
from support.harness import FakeSignals, captured_log, go_snapshot_name, read

HOUR = 3600.0

pytestmark = pytest.mark.usefixtures("isolated_env")


def check_config(tmp_path, doc):
    """``--check-config`` on ``doc``: (exit code, printed JSON or None, log)."""
    full = {"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s"}
    full.update(doc)
    stream, out = io.StringIO(), io.StringIO()
    code = vsa.main(["-c", write_config(tmp_path, full), "--check-config"], stream=stream, out=out)
    return code, json.loads(out.getvalue()) if out.getvalue() else None, stream.getvalue()


def s3(bucket, **extra):
    block = {"s3_bucket": bucket, "s3_region": "eu-west-1", "access_key_id": "AKIDEXAMPLE",
             "secret_access_key": "not-a-real-secret-key"}
    block.update(extra)
    return block


# -- parsing ------------------------------------------------------------------


def test_a_single_block_is_named_after_its_kind_and_list_blocks_by_kind_and_place(tmp_path):
    cfg = load(tmp_path, {"local_storage": {"path": str(tmp_path / "a")},
                          "aws_storage": [s3("one"), s3("two", name="offsite"), s3("three")]})
    names = [(cls.config_key, settings["name"], settings.block) for cls, settings in cfg.storages]
    assert names == [("local_storage", "local", "local_storage"),
                     ("aws_storage", "aws-1", "aws_storage[1]"),
                     ("aws_storage", "offsite", "aws_storage[2]"),
                     ("aws_storage", "aws-3", "aws_storage[3]")]
    storages = vsa.build_storages(cfg, vsa.Runtime({}, vsa.Clock(), FakeSignals()))
    assert [s.name for s in storages] == ["local", "aws-1", "offsite", "aws-3"]
    assert [s.file_prefix for s in storages] == ["raft_snapshot"] * 4


def test_a_list_of_one_is_still_named_by_place(tmp_path):
    cfg = load(tmp_path, {"local_storage": [{"path": str(tmp_path / "a")}]})
    assert [s["name"] for _, s in cfg.storages] == ["local-1"]


def test_file_prefix_defaults_to_the_top_level_one(tmp_path):
    cfg = load(tmp_path, {"file_prefix": "prod-eu", "local_storage": [
        {"path": str(tmp_path / "a")}, {"path": str(tmp_path / "a"), "file_prefix": "test"}]})
    assert [s["file_prefix"] for _, s in cfg.storages] == ["prod-eu", "test"]
    assert cfg.file_prefix == "prod-eu"


@pytest.mark.parametrize("doc,line", [
    ({"aws_storage": [s3("one"), {"s3_region": "eu-west-1"}]}, "aws_storage[2].s3_bucket: required"),
    ({"local_storage": [{"path": "/x"}, "/y"]}, "local_storage[2]: must be an object, got a string"),
    ({"local_storage": []}, "local_storage: an empty list"),
    ({"local_storage": [{"path": "/x", "retain": -1}]}, "local_storage[1].retain: must be at least 0"),
    ({"local_storage": {"path": "/x", "name": "a/b"}},
     "local_storage.name: 'a/b' is not a valid storage name"),
    ({"local_storage": {"path": "/x", "file_prefix": "raft-"}},
     "local_storage.file_prefix: 'raft-' is not a valid file prefix"),
    ({"file_prefix": "-raft", "local_storage": {"path": "/x"}},
     "file_prefix: '-raft' is not a valid file prefix"),
    ({"local_storage": [{"path": "/x", "name": "b"}, {"path": "/y", "name": "b"}]},
     "local_storage[1].name and local_storage[2].name: both 'b'; storage names must be unique"),
    ({"local_storage": [{"path": "/x", "name": "aws"}]},
     "local_storage[1].name: 'aws' is the short name of every aws_storage block"),
])
def test_errors_name_the_block_by_its_place_in_the_list(tmp_path, doc, line):
    with pytest.raises(vsa.ConfigError) as caught:
        load(tmp_path, doc)
    assert str(caught.value).startswith(line), str(caught.value)


def test_check_config_shows_a_list_as_a_list_with_every_key(tmp_path):
    code, shown, log = check_config(tmp_path, {
        "file_prefix": "prod",
        "local_storage": {"path": str(tmp_path / "a")},
        "aws_storage": [s3("one", frequency="24h"), s3("two", name="offsite", file_prefix="weekly")]})
    assert code == 0, log
    assert shown["file_prefix"] == "prod"
    assert isinstance(shown["local_storage"], dict)
    assert shown["local_storage"]["name"] == "local" and shown["local_storage"]["file_prefix"] == "prod"
    blocks = shown["aws_storage"]
    assert isinstance(blocks, list) and len(blocks) == 2
    for block in blocks:
        assert list(block) == [key.name for key in vsa.S3Storage.keys]
        assert block["secret_access_key"] == "***"
    assert [(b["name"], b["file_prefix"], b["frequency"]) for b in blocks] == [
        ("aws-1", "prod", "24h"), ("offsite", "weekly", "1h")]
    assert "not-a-real-secret-key" not in json.dumps(shown) + log


def test_a_secret_inside_a_list_block_is_a_secret_file(tmp_path):
    token = tmp_path / "token"
    token.write_text("not-a-real-token")
    os.chmod(str(token), 0o600)
    doc = {"addr": "http://127.0.0.1:8200", "token_file": str(token), "aws_storage": [s3("one")]}
    path = write_config(tmp_path, doc)
    os.chmod(path, 0o644)
    cfg = vsa.load_config(path, {"AWS_CONFIG_FILE": str(tmp_path / "none")})
    assert any("holds secrets and is readable by others" in w for w in cfg.warnings), cfg.warnings


def test_two_blocks_at_one_place_are_refused_with_one_line_naming_both(tmp_path):
    os.makedirs(str(tmp_path / "real"))
    os.symlink(str(tmp_path / "real"), str(tmp_path / "link"))
    with pytest.raises(vsa.ConfigError) as caught:
        load(tmp_path, {"local_storage": [{"path": str(tmp_path / "real"), "retain": 3},
                                          {"path": str(tmp_path / "link"), "retain": 30}]})
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith("local_storage[1] and local_storage[2]: both store at directory %s "
                           "(file_prefix raft_snapshot)" % (tmp_path / "real")), text
    with pytest.raises(vsa.ConfigError) as caught:
        load(tmp_path, {"aws_storage": [s3("one", s3_key_prefix="x", name="hourly"),
                                        s3("one", s3_key_prefix="/x/", name="daily",
                                           s3_endpoint="https://S3.eu-west-1.amazonaws.com/")]})
    assert str(caught.value).startswith("aws_storage[1] and aws_storage[2]: both store at "
                                        "s3://one/x/"), str(caught.value)


@pytest.mark.parametrize("other", [
    {"file_prefix": "other"},                       # one directory, two prefixes
    {"path": "b"},                                  # two directories
])
def test_blocks_apart_by_directory_or_prefix_are_accepted(tmp_path, other):
    second = {"path": str(tmp_path / other.get("path", "a"))}
    second.update((k, v) for k, v in other.items() if k != "path")
    cfg = load(tmp_path, {"local_storage": [{"path": str(tmp_path / "a")}, second]})
    assert len(cfg.storages) == 2


def test_blocks_in_two_buckets_or_one_bucket_with_two_prefixes_are_accepted(tmp_path):
    cfg = load(tmp_path, {"aws_storage": [s3("one"), s3("two"), s3("one", file_prefix="b"),
                                          s3("one", s3_key_prefix="other")]})
    assert len(cfg.storages) == 4


# -- the name grammar -----------------------------------------------------------


@pytest.mark.parametrize("name,prefix,parsed", [
    ("raft_snapshot-20261127T205239.123Z.snap", "raft_snapshot", True),
    ("raft_snapshot-1700000000000000000.snap", "raft_snapshot", True),    # the Go agent's
    ("raft_snapshot-20261127T205239.123Z.snap", "raft", False),
    ("raft-20261127T205239.123Z.snap", "raft_snapshot", False),
    ("raft-20261127T205239.123Z.snap", "raft", True),
    ("a-1-20261127T205239.123Z.snap", "a", False),
    ("a-1-20261127T205239.123Z.snap", "a-1", True),
    ("a-1700000000000000000.snap", "a", False),     # Go-agent nanoseconds: default prefix only
    ("a-1-1700000000000000000.snap", "a", False),
    ("a.b-20261127T205239.123Z.snap", "a", False),
    ("xa-20261127T205239.123Z.snap", "a", False),
    ("a-20261127T205239.123Z.snap.tmp", "a", False),
    ("a-20261127T205239.123Z.snap\n", "a", False),
    ("A-20261127T205239.123Z.snap", "a", False),
    ("a--20261127T205239.123Z.snap", "a", False),
])
def test_names_are_matched_exactly_per_prefix(name, prefix, parsed):
    assert (vsa.parse_snapshot_name(name, prefix) is not None) is parsed


def test_a_name_round_trips_through_its_prefix():
    when = datetime.datetime(2026, 11, 27, 20, 52, 39, 123000, tzinfo=vsa.UTC)
    for prefix in ("raft_snapshot", "a", "prod.eu-1", "x" * 64, "_"):
        name = vsa.snapshot_name(when, prefix)
        assert name == "%s-20261127T205239.123Z.snap" % prefix
        assert vsa.parse_snapshot_name(name, prefix) == when
        assert re.match(vsa.FILE_PREFIX_RE, prefix)


# -- retention, schedule, reporting ------------------------------------------------


def two_prefixes(tmp_path, **extra):
    """Two local blocks in one directory: east (hourly, retain 3) and west
    (every 30 minutes, retain 5)."""
    snaps = str(tmp_path / "snaps")
    east = {"path": snaps, "name": "east", "file_prefix": "east", "retain": 3}
    west = {"path": snaps, "name": "west", "file_prefix": "west", "retain": 5, "frequency": "30m"}
    east.update(extra)
    return {"local_storage": [east, west]}


def test_two_prefixes_in_one_directory_each_keep_exactly_their_own_retain(tmp_path):
    snaps = tmp_path / "snaps"
    strangers = [plant(snaps, go_snapshot_name(NOW - datetime.timedelta(days=3))),
                 plant(snaps, vsa.snapshot_name(NOW - datetime.timedelta(days=2))),
                 plant(snaps, vsa.snapshot_name(NOW - datetime.timedelta(days=2), "east-1")),
                 plant(snaps, vsa.snapshot_name(NOW - datetime.timedelta(days=2), "eas"))]
    clock = fake_clock()
    seen = []

    def note(agent):
        seen.append(agent)
    with ScriptedVault(clock) as vault:
        signals = FakeSignals(clock, until=START + 12 * HOUR + 60)
        _, log = run_daemon(tmp_path, vault, clock, signals, on_agent=note, **two_prefixes(tmp_path))
        taken = vault.snapshot_times()
    assert len(taken) == 25, taken          # every 30 minutes: west each time, east every other
    assert len(names_in(snaps, "east")) == 3 and len(names_in(snaps, "west")) == 5, os.listdir(str(snaps))
    for stranger in strangers:
        assert os.path.exists(str(snaps / stranger)), stranger
    assert sorted(os.listdir(str(snaps))) == sorted(strangers + names_in(snaps, "east")
                                                    + names_in(snaps, "west"))
    assert log.count("Successfully created east snapshot to %s/east-" % snaps) == 13, log
    assert log.count("Successfully created west snapshot to %s/west-" % snaps) == 25, log
    assert "Retention on east (local:%s): kept 3; deleted 1" % snaps in log
    assert sorted(seen[0].due) == ["east", "west"]


def test_the_go_agents_names_are_rotated_by_the_default_prefix_only(tmp_path):
    old = [plant(tmp_path / "snaps", go_snapshot_name(NOW - datetime.timedelta(hours=h)))
           for h in (30, 20, 10)]
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        run_daemon(tmp_path, vault, clock, FakeSignals(clock, until=START + 2 * HOUR + 60),
                   local_storage={"path": str(tmp_path / "snaps"), "retain": 2})
    left = names_in(tmp_path / "snaps", "raft_snapshot")
    assert len(left) == 2 and not set(old) & set(left), left


def test_after_a_restart_each_block_plans_from_its_own_names(tmp_path):
    snaps = tmp_path / "snaps"
    plant(snaps, vsa.snapshot_name(NOW - datetime.timedelta(minutes=10), "east"))
    plant(snaps, vsa.snapshot_name(NOW - datetime.timedelta(hours=5), "west"))
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        _, log = run_daemon(tmp_path, vault, clock, FakeSignals(clock, until=START + 40 * 60),
                            **two_prefixes(tmp_path, frequency="1h"))
        taken = vault.snapshot_times()
    assert taken == [0.0, 30 * 60.0], taken       # west now and after 30m; east not before 50m
    assert len(names_in(snaps, "east")) == 1 and len(names_in(snaps, "west")) == 3
    assert re.search(r"Newest snapshot in east \(local:%s\) is from 2026-01-01T00:06:40Z: next "
                     r"one due 2026-01-01T01:06:40Z" % re.escape(str(snaps)), log), log


def test_status_metrics_list_and_storage_use_the_block_names(tmp_path):
    clock = fake_clock()
    doc = {"local_storage": [{"path": str(tmp_path / "fast"), "name": "fast", "retain": 2},
                             {"path": str(tmp_path / "slow"), "name": "slow", "frequency": "24h"}],
           "status_file": str(tmp_path / "status.json"), "metrics_textfile": str(tmp_path / "m.prom")}
    with ScriptedVault(clock) as vault:
        run_daemon(tmp_path, vault, clock, FakeSignals(clock, until=START + 60), **doc)
        config = os.path.join(str(tmp_path), "c.json")
        out = io.StringIO()
        assert vsa.main(["-c", config, "list"], stream=io.StringIO(), out=out) == 0
        listed = out.getvalue().splitlines()
        code, picked = _download(config, tmp_path, "slow")
        assert code == 0, picked
        code, both = _download(config, tmp_path, "local")
        assert code == 0, both
        code, none = _download(config, tmp_path, "nope")
    status = json.loads(read(tmp_path / "status.json"))["storages"]
    assert list(status) == ["fast", "slow"]
    assert status["slow"]["location"] == "local:%s" % (tmp_path / "slow")
    assert status["slow"]["type"] == "local" and status["slow"]["successes"] == 1
    assert status["fast"]["last_snapshot"] == names_in(tmp_path / "fast", "raft_snapshot")[0]
    metrics = read(tmp_path / "m.prom")
    assert 'vault_snapshot_storage_successes_total{storage="local:%s",type="local",name="slow"} 1' % (
        tmp_path / "slow") in metrics
    assert [line.split()[1] for line in listed] == ["fast", "slow"], listed
    assert "(from slow (local:%s);" % (tmp_path / "slow") in picked
    assert code == 2 and "--storage nope: no such storage in the config (have: fast, slow)" in none


def _download(config, tmp_path, storage):
    out, stream = io.StringIO(), io.StringIO()
    target = str(tmp_path / ("got-%s.snap" % storage))
    code = vsa.main(["-c", config, "download", "latest", "-o", target, "--storage", storage],
                    stream=stream, out=out)
    return code, out.getvalue() + stream.getvalue()


def test_one_block_failing_leaves_the_others_snapshot(tmp_path):
    (tmp_path / "blocked").write_text("a file where a directory should be")
    clock = fake_clock()
    doc = {"local_storage": [{"path": str(tmp_path / "blocked" / "snaps"), "name": "broken"},
                             {"path": str(tmp_path / "good"), "name": "good"}]}
    with ScriptedVault(clock) as vault:
        path = write_config(tmp_path, dict(addr=vault.url, role_id="r", secret_id="s", **doc))
        with captured_log(logging.INFO) as stream:
            agent = vsa.Agent(lambda runtime: vsa.load_all(path, runtime), clock, FakeSignals(clock),
                              env={})
            result = agent.run_cycle()
    log = stream.getvalue()
    assert result.outcome == "partial", log
    assert [s.name for s, _ in result.stored] == ["good"]
    assert len(names_in(tmp_path / "good", "raft_snapshot")) == 1
    assert "Preparing broken (local:%s) failed" % (tmp_path / "blocked" / "snaps") in log
    assert "Successfully created good snapshot to %s/raft_snapshot-" % (tmp_path / "good") in log
