"""Adversarial review after issue 18: new shapes of its bug classes that the
suite did not cover, each a failing test until the agent is fixed.

Classes: two agents writing one name (local directory, Azure, GCS), a
config file that blocks a reload, retention planned over lying listings,
credential helpers. Loopback servers only; a FakeClock for time.
"""

import datetime
import errno
import io
import json
import os

import pytest

import vault_snapshot_agent as vsa
from fake_endpoints import FakeVault
from harness import FakeClock, FakeSignals, clear_cloud_env, snapshots

START = 1000.0
UTC = vsa.UTC
NOW = datetime.datetime(2026, 1, 1, 0, 16, 40, tzinfo=UTC)


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    clear_cloud_env(monkeypatch, tmp_path, ("AWS_", "AZURE_", "VAULT_", "BAO_", "GOOGLE_"))


def fake_clock():
    return FakeClock(NOW, START)


def one_cycle(tmp_path, vault, clock, doc_extra=None):
    """One cycle of a real Agent against ``vault`` with local storage in
    ``tmp_path/snaps`` (``doc_extra`` merged into the config): (result, log)."""
    doc = {"addr": vault.url, "role_id": "r", "secret_id": "s",
           "local_storage": {"path": str(tmp_path / "snaps")}}
    doc.update(doc_extra or {})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    stream = io.StringIO()
    handler = vsa._configure_logging(20, "text", stream)
    try:
        agent = vsa.Agent(lambda runtime: vsa.load_all(str(path), runtime), clock,
                          FakeSignals(clock), env={})
        result = agent.run_cycle()
    finally:
        vsa.LOG.removeHandler(handler)
    return result, stream.getvalue()


# =============================================================================
# two agents, one local directory (align: true, the same millisecond)
# =============================================================================


def test_local_storage_name_taken_by_another_agent_moves_to_the_next_millisecond(tmp_path):
    # Two agents share one directory (an NFS mount, a failover pair) and wake
    # in the same millisecond. The other one stored first. The S3 storage
    # resolves this with NameClash; the local storage must too (not fail the
    # cycle, which then takes a second snapshot on the retry).
    clock = fake_clock()
    directory = tmp_path / "snaps"
    directory.mkdir(mode=0o700)
    taken = vsa.snapshot_name(clock.now())
    theirs = b"another agent's snapshot"
    (directory / taken).write_bytes(theirs)
    with FakeVault(role_id="r", secret_id="s") as vault:
        result, log = one_cycle(tmp_path, vault, clock)
    ours = vsa.snapshot_name(clock.now() + datetime.timedelta(milliseconds=1))
    assert result.outcome == "stored", (result, log)
    assert snapshots(directory) == sorted([taken, ours]), log
    assert (directory / taken).read_bytes() == theirs


def test_local_storage_never_replaces_a_name_another_agent_wrote_during_the_upload(
        tmp_path, monkeypatch):
    # The other agent's file appears after upload() checked the name and
    # before it linked (or, staged on another filesystem, while it copied):
    # os.link says EEXIST (or EXDEV), upload() falls back to a copy and
    # os.rename() silently replaces the other agent's snapshot.
    clock = fake_clock()
    directory = tmp_path / "snaps"
    directory.mkdir(mode=0o700)
    taken = vsa.snapshot_name(clock.now())
    theirs = b"another agent's snapshot, written a moment ago"
    real_link = os.link

    def racing_link(source, target, *args, **kwargs):
        if os.path.basename(str(target)) == taken and not os.path.lexists(str(target)):
            with open(str(target), "wb") as handle:       # the other agent wins the race
                handle.write(theirs)
        return real_link(source, target, *args, **kwargs)
    monkeypatch.setattr(os, "link", racing_link)
    with FakeVault(role_id="r", secret_id="s") as vault:
        result, log = one_cycle(tmp_path, vault, clock)
    assert (directory / taken).read_bytes() == theirs, (
        "the other agent's snapshot was replaced; log:\n%s" % log)


def test_local_storage_copy_fallback_never_replaces_a_name_taken_while_copying(
        tmp_path, monkeypatch):
    # Staged on another filesystem (temp_dir on tmpfs): os.link fails with
    # EXDEV and the snapshot is copied, which takes a while for gigabytes;
    # the other agent stores the same name meanwhile.
    clock = fake_clock()
    directory = tmp_path / "snaps"
    directory.mkdir(mode=0o700)
    taken = vsa.snapshot_name(clock.now())
    theirs = b"another agent's snapshot, stored while we copied"

    def cross_device_link(source, target, *args, **kwargs):
        with open(str(target), "wb") as handle:            # it lands while we copy
            handle.write(theirs)
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", cross_device_link)
    with FakeVault(role_id="r", secret_id="s") as vault:
        result, log = one_cycle(tmp_path, vault, clock)
    assert (directory / taken).read_bytes() == theirs, (
        "the other agent's snapshot was replaced; log:\n%s" % log)


# =============================================================================
# two agents, one Azure container or GCS bucket (the same millisecond)
# =============================================================================


CLASH_NAME = "raft_snapshot-20261127T000000.000Z.snap"


def snapshot_file(tmp_path, size, label):
    import hashlib
    data = os.urandom(size)
    path = tmp_path / label
    path.write_bytes(data)
    return vsa.SnapshotInfo(str(path), size, hashlib.sha256(data).hexdigest(), 1, 1, size), data


def built_storage(key, block, env=None):
    env = dict(env or {}, AWS_EC2_METADATA_DISABLED="true")
    cfg = vsa.config_from_dict({"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s",
                                key: block}, env=env)
    return vsa.build_storages(cfg, vsa.Runtime(env, FakeClock(NOW, START), FakeSignals()))[0]


@pytest.mark.parametrize("size", [4096, 3 * 1024 * 1024 + 5], ids=["put-blob", "block-list"])
def test_azure_second_writer_of_a_name_gets_name_clash_and_the_first_blob_stays(
        azurite, tmp_path, size):
    # Azure replaces a blob on Put Blob / Put Block List unless told not to
    # (If-None-Match: *, answered 409 BlobAlreadyExists): two agents that
    # wake in the same millisecond both log success and one backup is lost.
    prefix = "clash-%s" % os.urandom(3).hex()
    block = {"account_name": azurite.account, "account_key": azurite.key,
             "container_name": "snapshots", "endpoint": azurite.endpoint, "prefix": prefix,
             "block_size_mb": 1}
    first, first_data = snapshot_file(tmp_path, size, "first.snap")
    second, _ = snapshot_file(tmp_path, size, "second.snap")
    built_storage("azure_storage", block).upload(first, CLASH_NAME)
    try:
        with pytest.raises(vsa.NameClash):
            built_storage("azure_storage", block).upload(second, CLASH_NAME)
        assert azurite.get_blob("snapshots", "%s/%s" % (prefix, CLASH_NAME)) == first_data
    finally:
        for blob in azurite.blob_names("snapshots", prefix + "/"):
            azurite.delete_blob("snapshots", blob)


class PreconditionGcs(object):
    """A loopback GCS JSON API for simple (media) uploads that keeps GCS's
    precondition semantics, which neither emulator of the suite does:
    ``ifGenerationMatch=0`` on an existing object is 412 and nothing is
    written; without it the object is replaced."""

    def __init__(self):
        from fake_endpoints import Endpoint
        self.objects = {}
        self.endpoint = Endpoint(self.respond)

    def respond(self, request):
        import base64
        import hashlib
        import urllib.parse
        parts = urllib.parse.urlsplit(request.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        if request.method == "POST" and parts.path == "/upload/storage/v1/b/snapshots/o" \
                and query.get("uploadType") == "media":
            name = query["name"]
            if query.get("ifGenerationMatch") == "0" and name in self.objects:
                return 412, {}, {"error": {"code": 412, "message": "conditionNotMet"}}
            self.objects[name] = request.body
            return 200, {}, {"name": name, "bucket": "snapshots", "size": str(len(request.body)),
                             "generation": str(len(self.objects)),
                             "md5Hash": base64.b64encode(hashlib.md5(request.body).digest())
                             .decode("ascii")}
        return 404, {}, {"error": {"code": 404, "message": "not here"}}


def test_gcs_second_writer_of_a_name_gets_name_clash_and_the_first_object_stays(tmp_path):
    # GCS replaces an object on upload unless told ifGenerationMatch=0 (412
    # conditionNotMet): two agents in the same millisecond, one backup lost.
    gcs = PreconditionGcs()
    block = {"bucket": "snapshots", "endpoint": None, "anonymous": True, "prefix": "p"}
    first, first_data = snapshot_file(tmp_path, 4096, "first.snap")
    second, _ = snapshot_file(tmp_path, 4096, "second.snap")
    with gcs.endpoint:
        block["endpoint"] = gcs.endpoint.url
        built_storage("google_storage", block).upload(first, CLASH_NAME)
        with pytest.raises(vsa.NameClash):
            built_storage("google_storage", block).upload(second, CLASH_NAME)
    assert gcs.objects["p/" + CLASH_NAME] == first_data


# =============================================================================
# a config file replaced by a FIFO between reloads
# =============================================================================


def test_a_reload_from_a_fifo_config_neither_hangs_nor_ignores_sigterm(tmp_path):
    # The config path now names a FIFO nobody writes to (a mistake, or a
    # hostile local user where the directory allows it). open() blocks
    # until a writer appears, and PEP 475 restarts it after SIGTERM's
    # handler: the daemon hangs in the reload and a stop is ignored for good.
    import signal
    from harness import read, reaped, start_agent, stop, wait_for

    class StandbyVault(FakeVault):
        def respond(self, request):
            if request.path.split("?", 1)[0] == "/v1/sys/leader":
                return 200, {}, {"ha_enabled": True, "is_self": False,
                                 "leader_address": "http://127.0.0.1:1"}
            return FakeVault.respond(self, request)

    with StandbyVault(role_id="r", secret_id="s") as vault:
        config, logfile = tmp_path / "c.json", tmp_path / "agent.log"
        config.write_text(json.dumps({"addr": vault.url, "role_id": "r", "secret_id": "s",
                                      "local_storage": {"path": str(tmp_path / "snaps")}}))
        os.chmod(str(config), 0o600)
        with reaped(start_agent(str(config), logfile)) as proc:
            wait_for(lambda: "Not running on leader node" in read(logfile), 10, "a standby")
            os.unlink(str(config))
            os.mkfifo(str(config), 0o600)
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "Config reload failed" in read(logfile) or proc.poll() is not None,
                     3, "the reload to give up on the FIFO (it hangs in open())")
            code = stop(proc, timeout=3)
    assert code == 0, read(logfile)


# =============================================================================
# credential_process: an Expiration in another valid ISO 8601 spelling
# =============================================================================


@pytest.mark.parametrize("spelling", ["+02:00", "-05:00", "lowercase z"])
def test_credential_process_expiration_with_an_offset_or_lowercase_z_is_read_as_that_instant(
        tmp_path, spelling):
    # credential_process prints ISO 8601 (botocore reads any offset with
    # dateutil): Python's own isoformat() of an aware local time writes
    # "+02:00"; RFC 3339 allows a lowercase "z". Valid credentials valid for
    # another hour were refused as "unreadable Expiration", so the storage
    # failed every cycle.
    import sys
    clock = FakeClock(NOW, START)
    expires = NOW + datetime.timedelta(hours=1)
    if spelling == "lowercase z":
        text = expires.strftime("%Y-%m-%dT%H:%M:%Sz")
    else:
        sign = 1 if spelling[0] == "+" else -1
        offset = datetime.timezone(sign * datetime.timedelta(hours=int(spelling[1:3])))
        text = expires.astimezone(offset).isoformat()
    doc = {"Version": 1, "AccessKeyId": "ASIAPROC", "SecretAccessKey": "proc-secret",
           "SessionToken": "proc-token", "Expiration": text}
    script = tmp_path / "helper"
    script.write_text("#!%s\nimport json\nprint(json.dumps(%r))\n" % (sys.executable, doc))
    os.chmod(str(script), 0o755)
    config = tmp_path / "config"
    config.write_text("[profile proc]\ncredential_process = %s\n" % script)
    env = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/c", "AWS_CONFIG_FILE": str(config),
           "AWS_EC2_METADATA_DISABLED": "true"}
    chain = vsa.AwsCredentialChain(None, env, "us-east-1", "proc", vsa.Http(None, 5.0), clock,
                                   profile_given=True)
    creds = chain.get()                  # raised StorageError: unreadable Expiration
    assert creds.access_key == "ASIAPROC"
    assert creds.expires == expires, (text, creds.expires)


# A helper that answers at once and exits 0, leaving a daemon in its own
# session (a credential cache, an SSO refresher) that inherited stdout.
DAEMONIZING = """
import json, os, sys, time
print(json.dumps({"Version": 1, "AccessKeyId": "AKIDDAEMON", "SecretAccessKey": "daemon-secret"}))
sys.stdout.flush()
if os.fork() == 0:
    os.setsid()
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(20)
    os._exit(0)
os._exit(0)
"""


def test_a_helper_that_answers_and_leaves_a_setsid_daemon_is_not_waited_for(tmp_path):
    # CredentialHelper's docstring: a helper that starts its own session
    # "is not waited for, only not killed". But the answer is read until
    # EOF on stdout and stderr, which the daemon holds: the agent waits out
    # the whole process_timeout (60 s by default) and then fails, although
    # the helper printed good credentials and exited 0 at once.
    import signal
    import sys
    import time
    script = tmp_path / "helper"
    script.write_text("#!%s\n%s" % (sys.executable, DAEMONIZING))
    os.chmod(str(script), 0o755)
    pidfile = tmp_path / "daemon.pid"
    config = tmp_path / "config"
    config.write_text("[profile proc]\ncredential_process = %s %s\n" % (script, pidfile))
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(config),
           "AWS_EC2_METADATA_DISABLED": "true", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    chain = vsa.AwsCredentialChain(None, env, "us-east-1", "proc", vsa.Http(None, 5.0),
                                   FakeClock(), profile_given=True, process_timeout=4.0)
    began = time.monotonic()
    try:
        creds = chain.get()
        elapsed = time.monotonic() - began
    except vsa.StorageError as exc:
        elapsed, creds = time.monotonic() - began, exc
    finally:
        for _ in range(50):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.05)
        if pidfile.exists() and pidfile.read_text():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)     # the daemon we started
            except OSError:
                pass
    assert not isinstance(creds, Exception), "%s after %.1fs" % (creds, elapsed)
    assert creds.access_key == "AKIDDAEMON"
    assert elapsed < 2.0, elapsed


def test_a_secret_id_file_replaced_by_a_fifo_does_not_hang_the_login_past_a_stop(tmp_path):
    # secret_id_file is checked to be a file at load, then re-read at each
    # login with a blocking open(): replaced by a FIFO (nobody writing), the
    # cycle hangs in open() and a stop request never ends it.
    import threading
    import time
    secret = tmp_path / "secret_id"
    secret.write_text("s")
    os.chmod(str(secret), 0o600)
    clock = fake_clock()
    signals = FakeSignals(clock)
    with FakeVault(role_id="r", secret_id="s") as vault:
        doc = {"addr": vault.url, "role_id": "r", "secret_id_file": str(secret),
               "local_storage": {"path": str(tmp_path / "snaps")}}
        path = tmp_path / "c.json"
        path.write_text(json.dumps(doc))
        agent = vsa.Agent(lambda runtime: vsa.load_all(str(path), runtime), clock, signals,
                          env={})
        os.unlink(str(secret))
        os.mkfifo(str(secret), 0o600)
        results = []
        worker = threading.Thread(target=lambda: results.append(agent.run_cycle()))
        worker.daemon = True
        worker.start()
        time.sleep(0.5)
        signals.request_stop()
        worker.join(3.0)
        hung = worker.is_alive()
        if hung:                         # let the blocked open() return, then end it
            fd = os.open(str(secret), os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
            worker.join(5.0)
    assert not hung, "run_cycle still blocked in open() of the FIFO 3 s after the stop"
