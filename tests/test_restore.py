"""Section "Restore tooling": list, download, verify and restore, end to end on the real
cluster: snapshot, change data, restore, and the old data is back."""

import io
import json
import os
import time

import pytest

import vault_snapshot_agent as vsa
from support.archives import write_archive


def write_config(tmp_path, bao_cluster, approle, **extra):
    config = {"addr": bao_cluster.leader().addr, "role_id": approle.role_id,
              "secret_id": approle.secret_id, "local_storage": {"path": str(tmp_path / "snaps")}}
    config.update(extra)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    return str(path)


def run(*argv):
    stream, out = io.StringIO(), io.StringIO()
    code = vsa.main(list(argv), stream=stream, out=out)
    return code, out.getvalue(), stream.getvalue()


def test_list_download_and_verify(bao_cluster, approle, tmp_path):
    config = write_config(tmp_path, bao_cluster, approle)
    for _ in range(2):
        assert vsa.main(["-c", config, "--once"], stream=io.StringIO()) == 0
        time.sleep(0.01)
    names = sorted(n for n in os.listdir(str(tmp_path / "snaps")) if n.endswith(".snap"))
    code, out, log = run("-c", config, "list")
    assert code == 0, log
    lines = out.splitlines()
    assert [line.split()[-1] for line in lines] == names[::-1]
    assert all(" local " in line for line in lines)

    code, out, log = run("-c", config, "download", "latest", "-o", str(tmp_path / "latest.snap"))
    assert code == 0, log
    assert open(str(tmp_path / "latest.snap"), "rb").read() == \
        open(str(tmp_path / "snaps" / names[-1]), "rb").read()
    assert "verified" in out

    code, out, log = run("-c", config, "download", names[0], "-o", str(tmp_path / "first.snap"))
    assert code == 0, log
    code, out, log = run("verify", str(tmp_path / "first.snap"))
    assert code == 0 and ": OK," in out and "Raft index" in out

    code, out, log = run("-c", config, "download", "raft_snapshot-20000101T000000.000Z.snap")
    assert code == 1 and "not found" in log
    code, out, log = run("-c", config, "download", "latest", "--storage", "aws")
    assert code == 2 and "--storage aws" in log


def test_verify_rejects_a_corrupt_file(tmp_path):
    path = tmp_path / "bad.snap"
    data = bytearray(write_archive(str(path)))
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    code, out, log = run("verify", str(path))
    assert code == 1 and out == ""
    assert len(log.splitlines()) == 1


def test_restore_needs_yes_and_says_what_it_would_replace(bao_cluster, approle, tmp_path):
    config = write_config(tmp_path, bao_cluster, approle)
    code, out, log = run("-c", config, "restore", "latest", "--storage", "local")
    assert code == 2
    assert "restore would replace ALL data in the cluster at %s with snapshot latest (--storage " \
           "local); add --yes to do it" % bao_cluster.leader().addr in log
    path = tmp_path / "x.snap"
    write_archive(str(path))
    code, out, log = run("restore", str(path), "-c", config)
    assert code == 2 and "with the file %s; add --yes" % path in log


def test_restore_with_a_bogus_token_says_the_token_was_refused(bao_cluster, approle, tmp_path,
                                                                 monkeypatch):
    config = write_config(tmp_path, bao_cluster, approle)
    path = tmp_path / "x.snap"
    write_archive(str(path))
    monkeypatch.setenv("VAULT_TOKEN", "s.NotATokenThisClusterKnows0000")
    code, out, log = run("-c", config, "restore", str(path), "--yes")
    assert code == 1
    assert "refused the token (invalid, expired or revoked" in log
    assert "policy" not in log and "s.NotATokenThisClusterKnows0000" not in log


def test_a_snapshot_of_another_cluster_is_refused_with_a_hint_at_force(bao_cluster, approle,
                                                                        bao_tls, tmp_path, monkeypatch):
    # The TLS cluster is another cluster (other keys): without --force it refuses
    # the snapshot, and says nothing of a seal; it keeps serving afterwards.
    config = write_config(tmp_path, bao_cluster, approle)
    assert vsa.main(["-c", config, "--once"], stream=io.StringIO()) == 0
    other = bao_tls.agent_tls_config()
    other.update({"vault_auth_method": "token", "token": bao_tls.root_token,
                  "local_storage": {"path": str(tmp_path / "snaps")}})
    other_config = tmp_path / "other.json"
    other_config.write_text(json.dumps(other))
    os.chmod(str(other_config), 0o600)
    monkeypatch.setenv("VAULT_TOKEN", bao_tls.root_token)
    code, out, log = run("-c", str(other_config), "restore", "latest", "--yes")
    assert code == 1, log
    assert "is restored only with --force" in log, log
    assert "sealed itself" not in log
    status, _ = bao_tls.api("GET", "sys/health")
    assert status == 200


def read_value(bao_cluster):
    status, body = bao_cluster.api("GET", "restoretest/item")
    return (body or {}).get("data", {}).get("value") if status == 200 else None


@pytest.mark.slow
def test_restore_brings_the_old_data_back(bao_cluster, approle, tmp_path, monkeypatch):
    status, mounts = bao_cluster.api("GET", "sys/mounts")
    if "restoretest/" not in (mounts or {}).get("data", mounts or {}):
        bao_cluster.api("POST", "sys/mounts/restoretest", {"type": "kv"}, expect=(200, 204))
    bao_cluster.api("POST", "restoretest/item", {"value": "before"}, expect=(200, 204))
    config = write_config(tmp_path, bao_cluster, approle)
    assert vsa.main(["-c", config, "--once"], stream=io.StringIO()) == 0
    bao_cluster.api("POST", "restoretest/item", {"value": "after"}, expect=(200, 204))
    assert read_value(bao_cluster) == "after"

    monkeypatch.setenv("VAULT_TOKEN", bao_cluster.root_token)
    code, out, log = run("-c", config, "restore", "latest", "--yes")
    assert code == 0, log
    assert "Restored raft_snapshot-" in out
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and read_value(bao_cluster) != "before":
        time.sleep(0.5)
    assert read_value(bao_cluster) == "before"
    assert bao_cluster.root_token not in log + out
    bao_cluster.wait_for_leader()


def test_restore_with_the_agent_token_is_refused_clearly(bao_cluster, approle, tmp_path, monkeypatch):
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    monkeypatch.delenv("BAO_TOKEN", raising=False)
    config = write_config(tmp_path, bao_cluster, approle)
    assert vsa.main(["-c", config, "--once"], stream=io.StringIO()) == 0
    code, out, log = run("-c", config, "restore", "latest", "--yes")
    assert code == 1
    assert "this token may not restore: its capabilities on sys/storage/raft/snapshot are [read]" in log


@pytest.mark.slow
def test_a_forced_restore_into_the_same_cluster_gives_no_seal_warning(bao_cluster, approle, tmp_path,
                                                                       monkeypatch):
    # The seal warning is for a forced restore that really sealed the target
    # (another cluster's keyring); into the same cluster nothing seals.
    config = write_config(tmp_path, bao_cluster, approle)
    assert vsa.main(["-c", config, "--once"], stream=io.StringIO()) == 0
    monkeypatch.setenv("VAULT_TOKEN", bao_cluster.root_token)
    code, out, log = run("-c", config, "restore", "latest", "--yes", "--force")
    assert code == 0, log
    assert "(forced)" in out and "sealed itself" not in log and "keyring" not in log
    bao_cluster.wait_for_leader()
