"""Issue 22 under attack: re-verification of stored snapshots ("scrub":
``read_back``, ``verify_stored``, ``Scrubber``, ``Agent.scrub_step``,
``verify --storage NAME latest|all|NAME``) against a store that lies or
stalls, planted names in a local directory, and deletions by someone else.

The hostile stores are raw loopback servers whose every byte the test
scripts (support/readback_servers.py); Vault is a FakeVault or the fake
clock's ScriptedVault (support/agent_sim.py).  A read that would run for
ever on an unfixed agent ends on the test's stop request or the server's
``limit``, a safety net the tests never assert on.  Tests marked
``xfail(strict=True)`` show a bug: they pass once it is fixed.
"""

import base64
import datetime
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zlib

import pytest

import vault_snapshot_agent as vsa
from support.agent_sim import (NOW, ScriptedVault, agent_config, fake_clock, names_in, plant,
                               write_config)
from support.archives import build_archive, write_archive
from support.fake_endpoints import FakeVault
from support.fake_s3 import FakeS3
from support.harness import (FakeSignals, captured_log, child_env, clear_cloud_env, reaped, run_main,
                             start_agent, stop, wait_for)
from support.readback_servers import Reply, ScriptedServer, endless

from support.slow_servers import _tar_header

# A valid archive sent a byte at a time: the read-back sees a good stream
# that simply takes its time (the agent reads what each receive brings).
TRICKLE = build_archive(state=os.urandom(300000))


def trickle():
    return (TRICKLE[i:i + 1] for i in range(len(TRICKLE)))


NAME = "raft_snapshot-20200101T000000.000Z.snap"
ARCHIVE = build_archive(state=b"s" * 50000)
OTHER = build_archive(state=b"t" * 50000)          # another valid snapshot
MD5 = hashlib.md5(ARCHIVE).hexdigest()
HOUR = 3600.0
NO_AWS_FILES = {"AWS_CONFIG_FILE": "/nonexistent/aws-config",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials"}


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    clear_cloud_env(monkeypatch, tmp_path, ("AWS_", "AZURE_", "VAULT_", "BAO_"))


# -- helpers -------------------------------------------------------------------


def s3_block(url, **extra):
    block = {"access_key_id": "AKIDREADBACKTEST", "secret_access_key": "readback-test-not-a-secret",
             "s3_endpoint": url, "s3_region": "us-east-1", "s3_bucket": "snapshots"}
    block.update(extra)
    return {"aws_storage": block}


def load_storage(tmp_path, blocks, signals=None, clock=None):
    """The one storage of ``blocks`` (a config's storage block), built by load_all."""
    doc = {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s"}
    doc.update(blocks)
    path = write_config(tmp_path, doc)
    runtime = vsa.Runtime(dict(NO_AWS_FILES), clock or vsa.Clock(), signals or FakeSignals())
    return vsa.load_all(path, runtime)[1][0]


def s3_object(head, get=None):
    """A script: HEAD answers ``head`` (header pairs), part HEADs 1 byte,
    GET ``get`` (a Reply; default: ARCHIVE with its true length)."""
    def script(request):
        if request.method == "HEAD":
            if request.query.get("partNumber"):
                return Reply(206, [("Content-Length", "1")])
            return Reply(200, head)
        return get or Reply(200, [("Content-Length", str(len(ARCHIVE)))], ARCHIVE)
    return script


def read_back_for(storage, seconds, signals):
    """verify_stored(storage, NAME) in a thread for at most ``seconds``,
    then a stop request: (finished in time, result or exception, seconds taken)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = vsa.verify_stored(storage, NAME)
        except BaseException as exc:        # Stopped included
            outcome["value"] = exc
    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    finished = not thread.is_alive()
    took = time.monotonic() - started
    signals.request_stop()
    thread.join(10)
    return finished, outcome.get("value"), took


def bomb():
    """A gzip stream of a tar whose state.bin is zeros without end (about
    1000:1): byte-aligned full-flush blocks, so one block repeats for ever."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    yield deflate.compress(_tar_header("state.bin", 2 ** 60)) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(bytes(8 << 20)) + deflate.flush(zlib.Z_FULL_FLUSH)
    while True:
        yield block


# -- a store that lies or stalls -------------------------------------------------


def test_a_get_longer_than_the_recorded_size_is_cut_short(tmp_path):
    head = [("Content-Length", str(len(ARCHIVE))), ("ETag", '"%s"' % MD5)]
    get = Reply(200, [], endless(ARCHIVE), chunked=True)       # the archive, then NULs for ever
    signals = FakeSignals()
    with ScriptedServer(s3_object(head, get), limit=30) as server:
        storage = load_storage(tmp_path, s3_block(server.url), signals)
        finished, value, _ = read_back_for(storage, 3.0, signals)
    assert finished, "still reading after 3 s (%d MB read)" % (server.sent // 10 ** 6)
    assert isinstance(value, vsa.SnapshotError), value


_RSS_PROBE = r"""
import json, resource, sys
sys.path[:0] = sys.argv[1:3]
import vault_snapshot_agent as vsa
from support.harness import FakeSignals
runtime = vsa.Runtime(%r, vsa.Clock(), FakeSignals())
storage = vsa.load_all(sys.argv[3], runtime)[1][0]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    vsa.verify_stored(storage, %r)
    result = "good"
except vsa.AgentError as exc:
    result = type(exc).__name__
print(json.dumps([result, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024]))
""" % (NO_AWS_FILES, NAME)


def test_a_lying_part_size_keeps_the_memory_bounded(tmp_path):
    # HEAD: 10000 bytes in 10000 parts (part 1 is 1 byte); the GET sends 1 MiB.
    head = [("Content-Length", "10000"), ("ETag", '"%s-10000"' % MD5)]
    body = ARCHIVE + bytes((1 << 20) - len(ARCHIVE))
    get = Reply(200, [("Content-Length", str(len(body)))], body)
    with ScriptedServer(s3_object(head, get)) as server:
        doc = {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s"}
        doc.update(s3_block(server.url))
        config = write_config(tmp_path, doc)
        tests = os.path.dirname(os.path.abspath(__file__))
        proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, tests, os.path.dirname(tests), config],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    result, grown_mb = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert result == "SnapshotError"
    assert grown_mb < 30, "peak RSS grew by %d MB reading 1 MiB back" % grown_mb


def test_a_stop_ends_a_trickling_read_back_at_once(tmp_path):
    head = [("Content-Length", str(len(TRICKLE))), ("ETag", '"%s"' % MD5)]
    get = Reply(200, [("Content-Length", str(len(TRICKLE)))], trickle(), interval=0.05)
    signals = FakeSignals()
    with ScriptedServer(s3_object(head, get)) as server:
        storage = load_storage(tmp_path, s3_block(server.url), signals)
        threading.Timer(0.5, signals.request_stop).start()
        finished, value, took = read_back_for(storage, 5.0, signals)
    assert finished and isinstance(value, vsa.Stopped), value
    assert took < 1.5


def test_a_stop_ends_a_gzip_bomb_read_back_within_seconds(tmp_path):
    head = [("ETag", '"%s"' % MD5)]                 # no size: read until the end
    signals = FakeSignals()
    with ScriptedServer(s3_object(head, Reply(200, [], bomb(), chunked=True)), limit=30) as server:
        storage = load_storage(tmp_path, s3_block(server.url), signals)
        threading.Timer(1.0, signals.request_stop).start()
        finished, value, took = read_back_for(storage, 8.0, signals)
    assert finished and isinstance(value, vsa.Stopped), value
    assert took < 4.0, "a stop took %.1f s to end the read-back of a gzip bomb" % (took - 1.0)


LIES = [
    # (what the HEAD says, what the read-back error must name)
    ([("Content-Length", "999"), ("ETag", '"%s"' % MD5)], "the store records 999"),
    ([("ETag", '"not-hex"')], "does not match the S3 ETag"),
    ([("ETag", '"%s-0"' % MD5)], "does not match the S3 ETag"),
    ([("ETag", '"%s-99999"' % MD5)], "does not match the S3 ETag"),
    ([("ETag", '"%s--3"' % MD5)], "does not match the S3 ETag"),
    ([("x-amz-checksum-sha256", "!!not base64!!"), ("ETag", '"%s"' % MD5)], "x-amz-checksum-sha256"),
    ([("x-amz-checksum-sha256", "A" * 44 + "-0")], "x-amz-checksum-sha256"),
    ([("x-amz-checksum-sha256", "A" * 100000)], "HeadObject"),      # a header line of 100 kB
]


@pytest.mark.parametrize("head, named", LIES, ids=["size", "etag-not-hex", "etag-0-parts",
                                                   "etag-99999-parts", "etag-negative",
                                                   "checksum-not-base64", "checksum-0-parts",
                                                   "checksum-100kB"])
def test_a_lying_head_fails_the_object_and_nothing_else(tmp_path, head, named):
    signals = FakeSignals()
    with ScriptedServer(s3_object(head)) as server:
        storage = load_storage(tmp_path, s3_block(server.url), signals)
        finished, value, _ = read_back_for(storage, 10.0, signals)
    assert finished and isinstance(value, (vsa.SnapshotError, vsa.StorageError)), value
    assert named in str(value)


@pytest.mark.parametrize("head", [[("Content-Length", "-5"), ("ETag", '"%s"' % MD5)],
                                  [("Content-Length", "9" * 40), ("ETag", '  "%s"  ' % MD5)]],
                         ids=["negative-size", "huge-size-spaced-etag"])
def test_malformed_sizes_are_ignored_not_trusted(tmp_path, head):
    signals = FakeSignals()
    with ScriptedServer(s3_object(head)) as server:
        storage = load_storage(tmp_path, s3_block(server.url), signals)
        found = vsa.verify_stored(storage, NAME)
    assert (found.size, found.checked) == (len(ARCHIVE), "matches the S3 ETag (MD5) recorded at upload")


def test_a_get_of_another_object_than_the_head_fails(tmp_path):
    # If-Match ignored: the GET answers another valid snapshot than the HEAD described.
    head = [("Content-Length", str(len(OTHER))), ("ETag", '"%s"' % MD5)]
    get = Reply(200, [("Content-Length", str(len(OTHER)))], OTHER)
    with ScriptedServer(s3_object(head, get)) as server:
        storage = load_storage(tmp_path, s3_block(server.url))
        with pytest.raises(vsa.SnapshotError, match="does not match the S3 ETag"):
            vsa.verify_stored(storage, NAME)
        assert server.requests("GET")[0].headers.get("if-match") == '"%s"' % MD5


def gcs_object(meta, media=ARCHIVE):
    def script(request):
        if request.query.get("alt") == "media":
            return Reply(200, [("Content-Length", str(len(media)))], media)
        data = json.dumps(meta).encode()
        return Reply(200, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))], data)
    return script


MD5_B64 = base64.b64encode(hashlib.md5(ARCHIVE).digest()).decode()


@pytest.mark.parametrize("meta, media, outcome", [
    ({"md5Hash": "%%%", "generation": "17"}, ARCHIVE, "does not match the GCS md5Hash"),
    ({"md5Hash": MD5_B64, "generation": "17"}, OTHER, "does not match the GCS md5Hash"),
    ({"md5Hash": MD5_B64, "generation": "\u0661\u0662"}, ARCHIVE, "GCS download"),
    ({"md5Hash": MD5_B64, "generation": "1&alt=json", "size": -5}, ARCHIVE, "GCS md5Hash"),
    ({"md5Hash": [MD5_B64], "generation": 1.5}, ARCHIVE, "no checksum recorded at upload"),
    ([1, 2], ARCHIVE, "no checksum recorded at upload"),
], ids=["md5-not-base64", "another-generation", "arabic-digits", "generation-injection",
        "md5-not-a-string", "not-an-object"])
def test_lying_gcs_metadata_is_never_trusted_beyond_what_it_can_prove(tmp_path, meta, media, outcome):
    block = {"google_storage": {"bucket": "snapshots", "endpoint": "", "anonymous": True}}
    with ScriptedServer(gcs_object(meta, media)) as server:
        block["google_storage"]["endpoint"] = server.url
        storage = load_storage(tmp_path, block)
        try:
            text = vsa.verify_stored(storage, NAME).checked
        except (vsa.SnapshotError, vsa.StorageError) as exc:
            text = str(exc)
        media_queries = [s.query for s in server.requests("GET") if s.query.get("alt") == "media"]
    assert outcome in text
    assert all(set(q) <= {"alt", "generation"} and re.match(r"\A[0-9]+\Z", q.get("generation", "1"))
               for q in media_queries), media_queries


def azure_blob(head, body=ARCHIVE):
    def script(request):
        if request.method == "HEAD":
            return Reply(200, head)
        return Reply(200, [("Content-Length", str(len(body)))], body)
    return script


@pytest.mark.parametrize("head, named", [
    ([("Content-MD5", "%%%"), ("Content-Length", str(len(ARCHIVE)))], "Azure Content-MD5"),
    ([("Content-MD5", MD5_B64), ("Content-Length", "7")], "(the store records 7|more than the 7 bytes)"),
], ids=["md5-not-base64", "size"])
def test_a_lying_azure_blob_properties_answer_fails_the_blob(tmp_path, head, named):
    from support.hostile_servers import AZURE_ACCOUNT, AZURE_KEY
    with ScriptedServer(azure_blob(head)) as server:
        block = {"azure_storage": {"account_name": AZURE_ACCOUNT, "account_key": AZURE_KEY,
                                   "container_name": "snapshots",
                                   "endpoint": "%s/%s" % (server.url, AZURE_ACCOUNT)}}
        storage = load_storage(tmp_path, block)
        with pytest.raises(vsa.SnapshotError, match=named):
            vsa.verify_stored(storage, NAME)


# -- planted names in a local directory ------------------------------------------


def local_storage(tmp_path, directory, clock=None, signals=None, **keys):
    block = {"path": str(directory)}
    block.update(keys)
    return load_storage(tmp_path, {"local_storage": block}, signals, clock)


def test_a_fifo_swapped_in_after_the_listing_does_not_hang_the_scrub(tmp_path):
    directory = tmp_path / "snaps"
    names = [plant(directory, NOW - datetime.timedelta(hours=h)) for h in (3, 2, 1)]
    clock, signals = fake_clock(), FakeSignals()
    storage = local_storage(tmp_path, directory, clock, signals, verify_frequency="1h",
                            verify_scope="all")
    scrubber = vsa.Scrubber(clock)
    scrubber.plan([storage])
    assert scrubber.step(storage) is None             # listed all three, read the newest
    fifo = str(directory / names[0])
    os.unlink(fifo)
    os.mkfifo(fifo)                                   # the oldest is now a FIFO
    reports = []

    def steps():
        try:
            reports.extend([scrubber.step(storage), scrubber.step(storage)])
        except vsa.Stopped:
            pass
    thread = threading.Thread(target=steps, daemon=True)
    thread.start()
    thread.join(2.0)
    hung = thread.is_alive()
    if hung:
        signals.request_stop()
        thread.join(1.0)
        stop_ended_it = not thread.is_alive()
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))      # let the open() return
        thread.join(5.0)
        assert not hung, "the scrub hangs on the FIFO (a stop %s it)" % (
            "ended" if stop_ended_it else "did not end")
    assert list(reports[-1].bad) == [names[0]]


def test_planted_links_fifos_directories_and_future_names_are_never_read(tmp_path):
    directory = tmp_path / "snaps"
    good = plant(directory, NOW)
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$PLANTEDSECRETHASH:19000:0:99999:7:::\n")
    os.symlink(str(secret), str(directory / vsa.snapshot_name(NOW - datetime.timedelta(hours=1))))
    os.mkfifo(str(directory / vsa.snapshot_name(NOW - datetime.timedelta(hours=2))))
    os.mkdir(str(directory / vsa.snapshot_name(NOW - datetime.timedelta(hours=3))))
    future = datetime.datetime.now(vsa.UTC) + datetime.timedelta(days=365)
    write_archive(str(directory / vsa.snapshot_name(future)), state=b"f" * 100)
    doc = {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s",
           "local_storage": {"path": str(directory)}}
    config, log = write_config(tmp_path, doc), tmp_path / "log"
    with reaped(start_agent(config, log, sys.executable, "verify", "--storage", "local", "all",
                            env=child_env(drop_prefixes=("VAULT_", "BAO_")))) as proc:
        code = proc.wait(20)
    text = log.read_text()
    assert code == 0, text
    assert [line.split()[2] for line in text.splitlines() if line.startswith(("OK", "FAIL"))] == [good]
    assert "PLANTEDSECRETHASH" not in text


def test_a_stored_snapshot_renamed_over_by_another_is_noticed(tmp_path):
    clock = fake_clock()
    with ScriptedVault(clock) as vault, captured_log():
        path = write_config(tmp_path, agent_config(tmp_path, vault, verify_frequency="1h"))
        agent = vsa.Agent(lambda rt: vsa.load_all(path, rt), clock, FakeSignals(clock), env={})
        agent.plan()
        assert agent.run_cycle().outcome == "stored"
        [name] = names_in(tmp_path / "snaps", "raft_snapshot")
        other = str(tmp_path / "other.snap")
        with open(other, "wb") as handle:
            handle.write(OTHER)
        os.rename(other, str(tmp_path / "snaps" / name))       # another valid snapshot in its place
        run_scrub(agent)
    assert list(agent.status.storages["local"]["bad_snapshots"]) == [name]


# -- deletions: by this agent, by another, behind the agent's back ------------------


def run_scrub(agent):
    """Every step of the due re-verifications."""
    agent.scrub_step()
    while agent.scrubber.runs:
        agent.scrub_step()


def bad_after(agent):
    return dict(agent.status.storages[agent.storages[0].name]["bad_snapshots"])


def test_own_retention_between_two_scrub_steps_is_no_bad_snapshot(tmp_path):
    for hours in (4, 3, 2, 1):
        plant(tmp_path / "snaps", NOW - datetime.timedelta(hours=hours, minutes=1))
    clock = fake_clock()
    with ScriptedVault(clock) as vault, captured_log() as log:
        path = write_config(tmp_path, agent_config(tmp_path, vault, retain=4, verify_frequency="24h",
                                                   verify_scope="all"))
        agent = vsa.Agent(lambda rt: vsa.load_all(path, rt), clock, FakeSignals(clock), env={})
        agent.plan()
        agent.scrub_step()                    # lists 4, reads the newest
        clock.advance(agent.due["local"] - clock.monotonic())
        assert agent.run_cycle().outcome == "stored"      # retain=4: the oldest goes
        run_scrub(agent)
    assert bad_after(agent) == {}, log.getvalue()


def two_agents(tmp_path, clock, vault_a, vault_b, **keys):
    """Agents A and B (two nodes' agents) on one local directory, retain 2."""
    agents = []
    for sub, vault in (("a", vault_a), ("b", vault_b)):
        (tmp_path / sub).mkdir()
        doc = agent_config(tmp_path / sub, vault, retain=2, verify_frequency="24h",
                           local_storage={"path": str(tmp_path / "snaps")}, **keys)
        path = write_config(tmp_path / sub, doc)
        agents.append(vsa.Agent(lambda rt, p=path: vsa.load_all(p, rt), clock, FakeSignals(clock),
                                env={}))
    return agents


def fail_over(clock, a, b, hours):
    """A stores; B leads ``hours`` hours (a cycle each hour on both); A leads
    again and stores; a day later A re-verifies."""
    def cycle(agent):
        agent.notify_cycle(agent.run_cycle(), agent.storages)
    a.plan()
    run_scrub(a)
    cycle(a)
    for _ in range(hours):
        clock.advance(HOUR)
        cycle(a)
        cycle(b)
    clock.advance(HOUR)
    cycle(a)
    clock.advance(24 * HOUR)
    run_scrub(a)


def test_another_leaders_retention_while_this_node_was_sealed_is_not_missing(tmp_path):
    plant(tmp_path / "snaps", NOW - datetime.timedelta(hours=1, minutes=1))
    clock = fake_clock()
    b_leads = lambda t: HOUR <= t < 4 * HOUR                            # noqa: E731
    with ScriptedVault(clock, lambda t: not b_leads(t)) as vault_a, \
            ScriptedVault(clock, b_leads) as vault_b, captured_log():
        vault_a.sealed = b_leads              # A's node sealed (503) while B leads
        a, b = two_agents(tmp_path, clock, vault_a, vault_b)
        fail_over(clock, a, b, 3)
    assert bad_after(a) == {}


def test_another_leaders_retention_after_a_seen_standby_is_not_missing(tmp_path):
    plant(tmp_path / "snaps", NOW - datetime.timedelta(hours=1, minutes=1))
    clock = fake_clock()
    b_leads = lambda t: HOUR <= t < 4 * HOUR                            # noqa: E731
    with ScriptedVault(clock, lambda t: not b_leads(t)) as vault_a, \
            ScriptedVault(clock, b_leads) as vault_b, captured_log():
        a, b = two_agents(tmp_path, clock, vault_a, vault_b)
        fail_over(clock, a, b, 3)            # A's cycles are skipped: it saw B lead
    assert len(names_in(tmp_path / "snaps", "raft_snapshot")) == 2
    assert bad_after(a) == {}


def test_a_static_name_storage_reports_nothing_missing(tmp_path):
    clock = fake_clock()
    with ScriptedVault(clock) as vault, FakeS3() as s3, captured_log():
        block = s3.storage_block(s3_static_snapshot_name="vault-latest", verify_frequency="2h")
        path = write_config(tmp_path, agent_config(tmp_path, vault, local_storage=None,
                                                   aws_storage=block))
        agent = vsa.Agent(lambda rt: vsa.load_all(path, rt), clock, FakeSignals(clock),
                          env=dict(NO_AWS_FILES))
        agent.plan()
        for _ in range(2):
            assert agent.run_cycle().outcome == "stored"
            clock.advance(2 * HOUR)
            run_scrub(agent)
    assert sorted(s3.objects) == ["raft_snapshots/vault-latest.snap"]
    assert bad_after(agent) == {}


def notify_log_command(tmp_path):
    """A notify_command appending "EVENT NAMES" to tmp_path/events; (argv, path of the events)."""
    script, events = tmp_path / "notify.sh", tmp_path / "events"
    script.write_text('#!/bin/sh\necho "$SNAPSHOT_EVENT $SNAPSHOT_NAME" >> %s\n' % events)
    script.chmod(0o755)
    return [str(script)], events


def test_a_deletion_behind_the_agents_back_is_reported_once_across_a_reload(tmp_path):
    clock = fake_clock()
    command, events = notify_log_command(tmp_path)
    with ScriptedVault(clock) as vault, captured_log() as log:
        path = write_config(tmp_path, agent_config(tmp_path, vault, retain=2, verify_frequency="2h",
                                                   notify_command=command,
                                                   notify_events=["verify_failed"]))
        agent = vsa.Agent(lambda rt: vsa.load_all(path, rt), clock, FakeSignals(clock), env={})
        agent.plan()
        first = [agent.run_cycle(), clock.advance(HOUR), agent.run_cycle()][0]
        agent.reload()                                  # SIGHUP between the stores and the scrub
        clock.advance(HOUR)
        assert agent.run_cycle().outcome == "stored"   # retain=2: the first goes, by this agent
        [gone, kept] = names_in(tmp_path / "snaps", "raft_snapshot")
        os.unlink(str(tmp_path / "snaps" / gone))      # someone else deletes one
        clock.advance(2 * HOUR)
        run_scrub(agent)
        assert list(bad_after(agent)) == [gone], log.getvalue()
        clock.advance(2 * HOUR)
        run_scrub(agent)                                # no second event for the same name
        agent.alerts.close(wait=True)
    assert first.stored[0][1] not in bad_after(agent)
    assert events.read_text().split("\n") == ["verify_failed %s" % gone, ""]


@pytest.mark.slow
def test_a_trickling_read_back_does_not_hold_up_the_snapshot_cycles(tmp_path):
    recent = vsa.snapshot_name(datetime.datetime.now(vsa.UTC) - datetime.timedelta(minutes=1))

    def script(request):
        if request.query.get("list-type") == "2":       # one recent object: S3 is not due
            body = ("<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>raft_snapshots/"
                    "%s</Key><Size>%d</Size></Contents></ListBucketResult>" % (recent, len(TRICKLE))).encode()
            return Reply(200, [("Content-Length", str(len(body)))], body)
        if request.method == "HEAD":
            return Reply(200, [("Content-Length", str(len(TRICKLE))), ("ETag", '"%s"' % MD5)])
        return Reply(200, [("Content-Length", str(len(TRICKLE)))], trickle(), interval=0.05)
    with FakeVault(role_id="r", secret_id="s") as vault, ScriptedServer(script, limit=30) as s3, \
            captured_log():
        doc = dict(s3_block(s3.url, verify_frequency="1h"), addr=vault.url, role_id="r",
                   secret_id="s", leader_poll="0s", local_storage={"path": str(tmp_path / "snaps"),
                                                                   "frequency": "2s"})
        path = write_config(tmp_path, doc)
        signals = vsa.Signals()
        agent = vsa.Agent(lambda rt: vsa.load_all(path, rt), vsa.Clock(), signals, env=dict(NO_AWS_FILES))
        thread = threading.Thread(target=agent.run_forever, daemon=True)
        thread.start()
        try:
            wait_for(lambda: len(names_in(tmp_path / "snaps", "raft_snapshot")) >= 3, 8,
                     "three local snapshots, 2 s apart, while S3 is re-verified")
        finally:
            signals.request_stop()
            thread.join(5)
            signals.close()


_LARGE_PROBE = _RSS_PROBE.replace("vsa.verify_stored(storage, %r)" % NAME,
                                  "print(vsa.verify_stored(storage, sys.argv[4]).checked)")


@pytest.mark.slow
def test_reading_back_a_200_mb_local_snapshot_takes_constant_memory(tmp_path):
    directory = tmp_path / "snaps"
    directory.mkdir()
    name = vsa.snapshot_name(NOW)
    digest = write_large_archive(str(directory / name), 200)
    os.setxattr(str(directory / name), vsa.LOCAL_SHA256_XATTR, digest.encode())
    config = write_config(tmp_path, {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s",
                                     "local_storage": {"path": str(directory)}})
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _LARGE_PROBE, tests, os.path.dirname(tests), config,
                           name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    lines = proc.stdout.decode().strip().splitlines()
    assert lines[0].startswith("matches the SHA-256 this agent recorded"), proc.stderr.decode()[-2000:]
    result, grown_mb = json.loads(lines[-1])
    assert result == "good"
    assert grown_mb < 16, "peak RSS grew by %d MB reading 200 MB back" % grown_mb


def write_large_archive(path, megabytes):
    """A valid snapshot of ``megabytes`` MiB of random state (incompressible,
    so the file is as large), written in a stream; returns its SHA-256."""
    import gzip
    import io
    import tarfile
    state, digest = path + ".state", hashlib.sha256()
    with open(state, "wb") as handle:
        for _ in range(megabytes):
            block = os.urandom(1 << 20)
            digest.update(block)
            handle.write(block)
    size = megabytes << 20
    meta = json.dumps({"Index": 1234, "Term": 7, "Size": size}).encode() + b"\n"
    sums = ("%s  meta.json\n%s  state.bin\n" % (hashlib.sha256(meta).hexdigest(), digest.hexdigest()))
    with gzip.open(path, "wb", compresslevel=1) as packed, \
            tarfile.open(fileobj=packed, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in (("meta.json", meta), ("state.bin", None), ("SHA256SUMS", sums.encode()),
                             ("SHA256SUMS.sealed", b"sealed")):
            info = tarfile.TarInfo(member)
            info.mode, info.size = 0o600, size if data is None else len(data)
            with (open(state, "rb") if data is None else io.BytesIO(data)) as source:
                tar.addfile(info, source)
    os.unlink(state)
    with open(path, "rb") as handle:
        whole = hashlib.sha256()
        for block in iter(lambda: handle.read(1 << 20), b""):
            whole.update(block)
    return whole.hexdigest()


# -- the command line ----------------------------------------------------------------


def test_verify_all_of_an_empty_storage_says_it_is_empty(tmp_path):
    config = write_config(tmp_path, {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s",
                                     "local_storage": {"path": str(tmp_path / "snaps")}})
    code, log = run_main("-c", config, "verify", "--storage", "local", "all")
    assert code == 1
    assert "nothing to verify: " in log and "of that name" not in log, log


def test_sigterm_ends_a_verify_command_reading_a_trickle_at_once(tmp_path):
    def script(request):
        if request.query.get("list-type") == "2":
            body = ("<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>raft_snapshots/"
                    "%s</Key><Size>100000</Size></Contents></ListBucketResult>" % NAME).encode()
            return Reply(200, [("Content-Length", str(len(body)))], body)
        if request.method == "HEAD":
            return Reply(200, [("Content-Length", "100000"), ("ETag", '"%s"' % MD5)])
        return Reply(200, [("Content-Length", str(len(TRICKLE)))], trickle(), interval=0.05)
    with ScriptedServer(script) as server:
        doc = dict(s3_block(server.url), addr="http://127.0.0.1:1", role_id="r", secret_id="s")
        config, log = write_config(tmp_path, doc), tmp_path / "log"
        env = child_env(drop_prefixes=("VAULT_", "BAO_", "AWS_"), **NO_AWS_FILES)
        with reaped(start_agent(config, log, sys.executable, "verify", "--storage", "s3", "latest",
                                env=env)) as proc:
            wait_for(lambda: server.requests("GET")[1:], 10, "the read-back's GET")
            time.sleep(0.3)
            started = time.monotonic()
            stop(proc, signal.SIGTERM, timeout=10)
            took = time.monotonic() - started
    assert took < 1.5, "verify took %.1f s to stop" % took
