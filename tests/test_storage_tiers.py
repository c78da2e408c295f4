"""Storage tiers end to end: several blocks of one kind, named, each with its
own frequency, retention, credentials and file prefix, against the real
OpenBao cluster and moto's S3 server (signature checking on).

* two local directories and two S3 buckets with their own frequencies and
  ``retain`` store and rotate independently in one daemon, and the status
  file and metrics show each block by name;
* a block with wrong credentials fails alone: the others keep the snapshot;
* two clusters' agents with different ``file_prefix`` sharing one bucket
  prefix through several cycles each keep exactly their own ``retain`` and
  never touch the other's objects (nor a Go agent's);
* after a restart each block plans from its own names: two blocks at one
  bucket prefix (one location) with two prefixes, one fresh, one empty.
"""

import datetime
import json
import os

import pytest

import vault_snapshot_agent as vsa
from support.harness import (go_snapshot_name, read, run_once, start_agent, stop, verify_download,
                             wait_for)
from support.storage_blocks import BUCKET, CONTAINER, azure_key_block, s3_block

pytestmark = pytest.mark.usefixtures("no_aws_env")

SECOND_BUCKET = "snapshots-kms"


def unique_prefix(what):
    return "%s-%s" % (what, os.urandom(3).hex())


def own(keys, prefix):
    """The keys whose last part is a snapshot name of ``prefix``."""
    return [k for k in keys if vsa.parse_snapshot_name(k.rsplit("/", 1)[-1], prefix)]


def local_names(directory):
    return sorted(n for n in os.listdir(str(directory)) if not n.startswith("."))


def daemon_config(tmp_path, bao_cluster, approle, **extra):
    config = {"addr": bao_cluster.leader().addr, "role_id": approle.role_id,
              "secret_id": approle.secret_id, "frequency": "1h",
              "status_file": str(tmp_path / "status.json"),
              "metrics_textfile": str(tmp_path / "agent.prom")}
    config.update(extra)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    os.chmod(str(path), 0o600)
    return str(path)


def successes(tmp_path, name):
    try:
        return json.loads(read(tmp_path / "status.json"))["storages"][name]["successes"]
    except (OSError, ValueError, KeyError):
        return 0


def test_two_local_and_two_s3_blocks_store_and_rotate_independently(moto, bao_cluster, approle,
                                                                     tmp_path):
    prefix = unique_prefix("tiers")
    config = daemon_config(
        tmp_path, bao_cluster, approle,
        local_storage=[{"path": str(tmp_path / "hot"), "name": "hot", "frequency": "2s", "retain": 2},
                       {"path": str(tmp_path / "cold"), "name": "cold", "retain": 1}],
        aws_storage=[s3_block(moto, s3_key_prefix=prefix, name="s3-hourly", frequency="2s", retain=3),
                     s3_block(moto, s3_bucket=SECOND_BUCKET, s3_key_prefix=prefix,
                              file_prefix="daily", retain=2)])
    logfile = tmp_path / "agent.log"
    proc = start_agent(config, logfile)
    try:
        # The status file is written once a cycle is over: the stop comes between cycles.
        wait_for(lambda: successes(tmp_path, "s3-hourly") >= 5, 90, "five cycles of the fast blocks")
    finally:
        assert stop(proc) == 0
    log = read(logfile)
    assert " ERROR " not in log, log
    fast = log.count("Successfully created s3-hourly snapshot")
    hot = log.count("Successfully created hot snapshot to %s/raft_snapshot-" % (tmp_path / "hot"))
    assert abs(hot - fast) <= 1, log          # one cycle serves both; a stop may cut one of them
    assert log.count("Successfully created cold snapshot") == 1, log
    assert log.count("Successfully created aws-2 snapshot to s3://%s/%s/daily-"
                     % (SECOND_BUCKET, prefix)) == 1, log
    assert len(local_names(tmp_path / "hot")) == 2 and len(local_names(tmp_path / "cold")) == 1
    hourly = moto.list_keys(BUCKET, prefix + "/")
    assert len(hourly) == 3 and own(hourly, "raft_snapshot") == hourly, hourly
    daily = moto.list_keys(SECOND_BUCKET, prefix + "/")
    assert len(daily) == 1 and own(daily, "daily") == daily, daily
    verify_download(moto.get(SECOND_BUCKET, daily[0]), tmp_path)
    status = json.loads(read(tmp_path / "status.json"))["storages"]
    assert list(status) == ["hot", "cold", "s3-hourly", "aws-2"]
    assert status["aws-2"]["location"] == "s3://%s/%s/" % (SECOND_BUCKET, prefix)
    # the stop may cut the last cycle before its report
    assert status["aws-2"]["successes"] == 1 and status["s3-hourly"]["successes"] in (fast - 1, fast)
    metrics = read(tmp_path / "agent.prom")
    assert ('vault_snapshot_storage_successes_total{storage="s3://%s/%s/",type="aws",name="aws-2"} 1'
            % (SECOND_BUCKET, prefix)) in metrics, metrics


def test_a_block_with_wrong_credentials_leaves_the_others_snapshot(moto, bao_cluster, approle,
                                                                    tmp_path):
    prefix = unique_prefix("one-fails")
    code, log = run_once(tmp_path, bao_cluster.leader().addr, approle, aws_storage=[
        s3_block(moto, s3_key_prefix=prefix, name="broken",
                 secret_access_key="wrong" + moto.secret_access_key[5:]),
        s3_block(moto, s3_bucket=SECOND_BUCKET, s3_key_prefix=prefix, name="intact")])
    assert code == 1, log
    assert "Storing snapshot in broken (s3://%s/%s/) failed: " % (BUCKET, prefix) in log, log
    assert "Successfully created intact snapshot to s3://%s/%s/raft_snapshot-" % (
        SECOND_BUCKET, prefix) in log
    assert moto.list_keys(BUCKET, prefix + "/") == []
    kept = moto.list_keys(SECOND_BUCKET, prefix + "/")
    assert len(kept) == 1
    verify_download(moto.get(SECOND_BUCKET, kept[0]), tmp_path)
    assert moto.secret_access_key not in log


def test_two_clusters_sharing_one_bucket_prefix_keep_their_own_retain(moto, bao_cluster, approle,
                                                                       tmp_path):
    prefix = unique_prefix("shared")
    old = datetime.datetime.now(vsa.UTC) - datetime.timedelta(days=30)
    strangers = ["%s/%s" % (prefix, go_snapshot_name(old)), "%s/%s" % (prefix, vsa.snapshot_name(old)),
                 "%s/%s" % (prefix, vsa.snapshot_name(old, "east-1"))]
    for key in strangers:
        moto.put(BUCKET, key, b"another agent's")
    agents = {"east": 2, "west": 3}
    for cycle in range(5):
        for file_prefix, retain in sorted(agents.items()):
            code, log = run_once(tmp_path, bao_cluster.leader().addr, approle, file_prefix=file_prefix,
                                 aws_storage=s3_block(moto, s3_key_prefix=prefix, retain=retain))
            assert code == 0, log
            keys = moto.list_keys(BUCKET, prefix + "/")
            assert len(own(keys, file_prefix)) == min(cycle + 1, retain), keys
    keys = moto.list_keys(BUCKET, prefix + "/")
    assert len(own(keys, "east")) == 2 and len(own(keys, "west")) == 3, keys
    assert sorted(keys) == sorted(own(keys, "east") + own(keys, "west") + strangers), keys


def test_after_a_restart_each_block_plans_from_its_own_names(moto, bao_cluster, approle, tmp_path):
    prefix = unique_prefix("restart")
    first = s3_block(moto, s3_key_prefix=prefix, name="tier-a", file_prefix="tier-a")
    second = s3_block(moto, s3_key_prefix=prefix, name="tier-b", file_prefix="tier-b")
    code, log = run_once(tmp_path, bao_cluster.leader().addr, approle, aws_storage=[first])
    assert code == 0, log
    config = daemon_config(tmp_path, bao_cluster, approle, aws_storage=[first, second])
    logfile = tmp_path / "agent.log"
    proc = start_agent(config, logfile)
    try:
        wait_for(lambda: "Successfully created tier-b snapshot" in read(logfile), 60, "tier-b's snapshot")
        wait_for(lambda: os.path.exists(str(tmp_path / "status.json")) and json.loads(
            read(tmp_path / "status.json"))["storages"].get("tier-b", {}).get("successes"), 10,
            "the status file")
    finally:
        assert stop(proc) == 0
    log = read(logfile)
    assert "Newest snapshot in tier-a (s3://%s/%s/) is from " % (BUCKET, prefix) in log, log
    assert "Successfully created tier-a snapshot" not in log, log
    keys = moto.list_keys(BUCKET, prefix + "/")
    assert len(own(keys, "tier-a")) == 1 and len(own(keys, "tier-b")) == 1, keys
    status = json.loads(read(tmp_path / "status.json"))
    assert status["storages"]["tier-b"]["successes"] == 1
    assert status["storages"].get("tier-a", {}).get("successes", 0) == 0


def test_azure_and_gcs_lists_rotate_each_prefix_on_its_own(azurite, gcs, bao_cluster, approle,
                                                           tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("AZURE_") or name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
            monkeypatch.delenv(name)
    folder = unique_prefix("lists")
    azure = [azure_key_block(azurite, prefix=folder, retain=1),
             azure_key_block(azurite, prefix=folder, file_prefix="offsite", retain=2)]
    google = [{"bucket": "snapshots", "endpoint": gcs.endpoint, "anonymous": True, "prefix": folder,
               "name": "gcs-a", "file_prefix": "a", "retain": 1},
              {"bucket": "snapshots", "endpoint": gcs.endpoint, "anonymous": True, "prefix": folder,
               "name": "gcs-b", "file_prefix": "b", "retain": 2}]
    for _ in range(3):
        code, log = run_once(tmp_path, bao_cluster.leader().addr, approle, azure_storage=azure,
                             google_storage=google)
        assert code == 0, log
    assert "Successfully created azure-2 snapshot to " in log and "Retention on gcs-b (gs://" in log
    blobs = [b["name"] for b in azurite.list_blobs(CONTAINER, folder + "/")]
    assert len(own(blobs, "raft_snapshot")) == 1 and len(own(blobs, "offsite")) == 2, blobs
    assert len(blobs) == 3, blobs
    objects = gcs.list_objects("snapshots", folder + "/")
    assert len(own(objects, "a")) == 1 and len(own(objects, "b")) == 2 and len(objects) == 3, objects
    verify_download(gcs.get_object("snapshots", own(objects, "a")[0]), tmp_path)
