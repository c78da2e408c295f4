"""download and restore: a damaged copy is named in a WARNING and the next
storage listing the same name is tried; with no intact copy, one ERROR line
naming every copy and nothing left behind (no temporary file next to the
output, no vault-snapshot-restore-* directory)."""

import datetime
import json
import os
import tempfile

import pytest

import vault_snapshot_agent as vsa
from support.archives import build_archive
from support.fake_endpoints import FakeVault
from support.harness import clear_cloud_env, error_lines, run_main

BUCKET = "snapshots"


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    clear_cloud_env(monkeypatch, tmp_path)
    for name in ("VAULT_TOKEN", "BAO_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def temp_root(monkeypatch, tmp_path):
    """tempfile's directory (cached from TMPDIR at first use) pointed at an
    empty directory of this test."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def snapshot_name(hours_ago):
    return vsa.snapshot_name(datetime.datetime.now(vsa.UTC) - datetime.timedelta(hours=hours_ago))


def damaged(data):
    """``data`` with its middle byte flipped."""
    data = bytearray(data)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def write_config(tmp_path, addr="http://127.0.0.1:1", **storages):
    config = {"addr": addr, "role_id": "r", "secret_id": "s",
              "local_storage": {"path": str(tmp_path / "snaps")}}
    config.update(storages)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    os.chmod(str(path), 0o600)
    return str(path)


def put_local(tmp_path, name, data):
    directory = tmp_path / "snaps"
    directory.mkdir(exist_ok=True)
    (directory / name).write_bytes(data)


def warnings(log):
    return [line for line in log.splitlines() if " WARNING " in line]


# -- two storages: local damaged, S3 intact (moto) -----------------------------------------


def s3_storage(moto, prefix):
    return {"access_key_id": moto.access_key_id, "secret_access_key": moto.secret_access_key,
            "s3_endpoint": moto.endpoint, "s3_region": "us-east-1", "s3_bucket": BUCKET,
            "s3_key_prefix": prefix}


@pytest.fixture
def two_copies(moto, tmp_path):
    """A config with local_storage and S3, the same two snapshots in both:
    ``(config, names oldest first, intact bytes by name, prefix)``; the local
    copies are damaged (one truncated, one with a byte flipped)."""
    prefix = "fallback-%s" % os.urandom(3).hex()
    names = [snapshot_name(2), snapshot_name(1)]
    intact = {}
    for name, spoil in zip(names, (lambda d: d[:len(d) // 2], damaged)):
        intact[name] = build_archive()
        put_local(tmp_path, name, spoil(intact[name]))
        moto.put(BUCKET, "%s/%s" % (prefix, name), intact[name])
    (tmp_path / "out").mkdir()
    return write_config(tmp_path, aws_storage=s3_storage(moto, prefix)), names, intact, prefix


def assert_fell_back(tmp_path, code, log, name, intact, output):
    assert code == 0, log
    vsa.verify_file(output)
    with open(output, "rb") as handle:
        assert handle.read() == intact[name]
    local = "local:%s" % (tmp_path / "snaps")
    assert any(name in line and local in line and "damaged" in line for line in warnings(log)), log
    assert error_lines(log) == [], log
    assert os.listdir(os.path.dirname(output)) == [os.path.basename(output)]


def test_download_takes_the_intact_s3_copy_when_the_local_one_is_damaged(two_copies, tmp_path):
    config, names, intact, _ = two_copies
    output = str(tmp_path / "out" / "first.snap")
    code, log = run_main("-c", config, "download", names[0], "-o", output)
    assert_fell_back(tmp_path, code, log, names[0], intact, output)


def test_download_latest_takes_the_intact_s3_copy(two_copies, tmp_path):
    config, names, intact, _ = two_copies
    output = str(tmp_path / "out" / "latest.snap")
    code, log = run_main("-c", config, "download", "latest", "-o", output)
    assert_fell_back(tmp_path, code, log, names[1], intact, output)


def test_download_with_every_copy_damaged_is_one_error_naming_both(moto, two_copies, tmp_path):
    config, names, intact, prefix = two_copies
    moto.put(BUCKET, "%s/%s" % (prefix, names[0]), damaged(intact[names[0]]))
    code, log = run_main("-c", config, "download", names[0], "-o", str(tmp_path / "out" / "x.snap"))
    assert code == 1, log
    errors = error_lines(log)
    assert len(errors) == 1, log
    assert names[0] in errors[0] and "local:%s" % (tmp_path / "snaps") in errors[0], log
    assert "s3://%s/%s/" % (BUCKET, prefix) in errors[0], log
    assert os.listdir(str(tmp_path / "out")) == []
    assert "Traceback" not in log


def test_restore_takes_the_intact_s3_copy(two_copies, tmp_path, temp_root):
    config, names, intact, _ = two_copies
    with FakeVault(role_id="r", secret_id="s") as vault:
        with open(config) as handle:
            raw = json.load(handle)
        with open(config, "w") as handle:
            json.dump(dict(raw, addr=vault.url), handle)
        code, log = run_main("-c", config, "restore", names[0], "--yes")
    assert code == 0, log
    assert vault.restores == [intact[names[0]]]
    assert any("damaged" in line and names[0] in line for line in warnings(log)), log
    assert os.listdir(str(temp_root)) == []


# -- restore: whatever fails, no temporary directory is left --------------------------------


def test_failed_restores_leave_no_temporary_directory(tmp_path, temp_root):
    name = snapshot_name(1)
    put_local(tmp_path, name, damaged(build_archive()))
    intact = snapshot_name(2)
    put_local(tmp_path, intact, build_archive())
    with FakeVault(role_id="someone-else", secret_id="x") as vault:    # refuses our login
        config = write_config(tmp_path, addr=vault.url)
        attempts = [(name, "gzip"), (snapshot_name(3), "not found"),
                    (intact, "invalid role or secret ID")]
        for target, needle in attempts:
            code, log = run_main("-c", config, "restore", target, "--yes")
            assert os.listdir(str(temp_root)) == [], "%s: %s" % (target, log)
            assert code == 1, log
            assert len(error_lines(log)) == 1 and needle in error_lines(log)[0], log
        assert vault.restores == []
