"""Section "Snapshot stream and verification": streaming verification of snapshot archives.

End to end (the real agent, the real cluster, tests/support/faultproxy.py in
between): the stream cut at random offsets (seeded, ``FAULTS_SEED``) and
answers that are not snapshots are one ERROR line each, store nothing and
leave no temp file; the next clean cycle stores. An endless stream from a
loopback server keeps memory bounded."""

import errno
import gzip
import hashlib
import io
import os
import random
import tarfile
import threading
import tracemalloc

import pytest

import vault_snapshot_agent as vsa
from support.archives import build_archive
from support.faults_support import MB, SEED, proxy_to, temp_files, verify_all, write_config
from support.harness import error_lines, run_main, snapshots, wait_for
from support.slow_servers import EndlessServer


def verify_bytes(data, step=None):
    verifier = vsa.ArchiveVerifier()
    step = step or len(data) or 1
    for pos in range(0, len(data), step):
        verifier.feed(data[pos:pos + step])
    return verifier.finish()


def test_good_archive_verifies_and_reports_raft_position():
    state = os.urandom(300 * 1024)
    index, term, size = verify_bytes(build_archive(state=state, index=99, term=3))
    assert (index, term, size) == (99, 3, len(state))


@pytest.mark.parametrize("step", [1, 7, 511, 512, 513, 65536])
def test_any_chunking_gives_the_same_answer(step):
    data = build_archive(state=os.urandom(20000))
    assert verify_bytes(data, step)[2] == 20000


def test_pax_format_members_verify():
    data = build_archive(fmt=tarfile.PAX_FORMAT)
    assert verify_bytes(data, 1000)[0] == 1234


def test_every_truncation_is_rejected():
    data = build_archive(state=os.urandom(5000))
    for cut in list(range(0, len(data), 97)) + [len(data) - 1, len(data) - 8]:
        with pytest.raises(vsa.SnapshotError):
            verify_bytes(data[:cut], 1000)


def test_empty_snapshot_is_rejected():
    with pytest.raises(vsa.SnapshotError, match="empty"):
        verify_bytes(b"")


def test_not_gzip_is_rejected():
    with pytest.raises(vsa.SnapshotError, match="gzip"):
        verify_bytes(b"<html><body>502 Bad Gateway</body></html>")


def test_state_not_matching_sha256sums_is_rejected():
    state = os.urandom(4096)
    meta_sum = hashlib.sha256(b"x").hexdigest()
    sums = "%s  meta.json\n%s  state.bin\n" % (meta_sum, hashlib.sha256(state).hexdigest())
    with pytest.raises(vsa.SnapshotError, match="meta.json does not match"):
        verify_bytes(build_archive(state=state, sums=sums))


def test_flipped_byte_in_state_is_rejected():
    raw = io.BytesIO(gzip.decompress(build_archive(state=b"A" * 10000)))
    data = bytearray(raw.getvalue())
    pos = bytes(data).index(b"A" * 100) + 50
    data[pos] = ord("B")
    with pytest.raises(vsa.SnapshotError, match="state.bin does not match"):
        verify_bytes(gzip.compress(bytes(data)))


@pytest.mark.parametrize("missing", ["meta.json", "state.bin", "SHA256SUMS", "SHA256SUMS.sealed"])
def test_missing_member_is_rejected(missing):
    members = [m for m in vsa.REQUIRED_MEMBERS if m != missing]
    with pytest.raises(vsa.SnapshotError):
        verify_bytes(build_archive(members=members))


def test_empty_sealed_sums_are_rejected():
    with pytest.raises(vsa.SnapshotError, match="sealed is empty"):
        verify_bytes(build_archive(sealed=b""))


def test_state_size_differing_from_meta_is_rejected():
    with pytest.raises(vsa.SnapshotError, match="meta.json says"):
        verify_bytes(build_archive(state=b"x" * 100, meta_size=101))


def test_trailing_garbage_after_gzip_is_rejected():
    with pytest.raises(vsa.SnapshotError, match="after the end"):
        verify_bytes(build_archive() + b"GARBAGE")


def test_compression_bomb_is_inflated_in_bounded_steps():
    # 64 MB of zeros compresses to ~64 kB; feeding it must not inflate it at once.
    state = b"\0" * (64 * 1024 * 1024)
    data = build_archive(state=state)
    assert len(data) < 1024 * 1024
    verifier = vsa.ArchiveVerifier()
    verifier.feed(data)
    assert verifier.finish()[2] == len(state)


def test_verify_file_reports_size_and_sha256(tmp_path):
    data = build_archive()
    path = tmp_path / "x.snap"
    path.write_bytes(data)
    info = vsa.verify_file(str(path))
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()


def test_verify_file_unreadable_is_a_snapshot_error(tmp_path):
    with pytest.raises(vsa.SnapshotError, match="cannot read"):
        vsa.verify_file(str(tmp_path / "nope.snap"))


def _variants():
    good = build_archive(state=os.urandom(3 * 1024 * 1024 + 123), index=77)
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x40
    return {"good": good, "flipped byte": bytes(flipped), "truncated": good[:len(good) // 2],
            "not gzip": os.urandom(2 * 1024 * 1024), "trailing garbage": good + b"junk"}


@pytest.mark.parametrize("label", sorted(_variants()))
def test_one_thread_and_two_give_the_same_verdict(tmp_path, label):
    """Section "Snapshot stream and verification": the pass runs the verifier in a second thread where
    cores are free and inline otherwise; both give the same answer, the
    same archive SHA-256, and no thread outlives the pass."""
    data = _variants()[label]
    path = tmp_path / "x.snap"
    path.write_bytes(data)
    outcomes = []
    for threaded in (False, True):
        try:
            info = vsa.verify_file(str(path), threaded=threaded)
            outcomes.append((info.index, info.size, info.sha256))
        except vsa.SnapshotError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]
    if label == "good":
        assert outcomes[0] == (77, len(data), hashlib.sha256(data).hexdigest())
    else:
        assert isinstance(outcomes[0], str)
    assert [t for t in threading.enumerate() if t.name == "verify"] == []


@pytest.mark.parametrize("threaded", [False, True])
def test_a_refused_stream_is_not_read_on(threaded):
    """Section "Snapshot stream and verification": once the verifier refuses the archive, reading stops
    within the buffers already in flight, in either mode."""
    reads = []

    def endless(buf):
        reads.append(len(buf))
        if len(reads) > 50:
            raise AssertionError("still reading after the archive was refused")
        buf[:] = b"\x1f\x8b\x08\x00" + os.urandom(len(buf) - 4) if len(reads) == 1 else \
            os.urandom(len(buf))
        return len(buf)

    with pytest.raises(vsa.SnapshotError):
        vsa._Pass(vsa.Signals(), threaded).run(endless, lambda view: None)
    assert len(reads) <= vsa.PASS_BUFFERS + 2


# =============================================================================
# end to end: the Vault stream cut at random offsets, and hostile answers to
# the snapshot request (through tests/support/faultproxy.py); endless streams
# =============================================================================


def verify_threads():
    """The snapshot pass's verifier threads still alive (section "Snapshot stream and verification")."""
    return [t for t in threading.enumerate() if t.name == "verify" and t.is_alive()]


def cut_snapshot_stream(monkeypatch, proxy, plan):
    """Arm ``proxy.cut_after(*plan["cut"], times=1)`` right before the agent
    opens the snapshot stream, so login and leader checks are never cut."""
    real = vsa.Http.request

    def request(self, method, url, *args, **kwargs):
        if plan.get("cut") is not None and url.endswith(vsa.SNAPSHOT_PATH):
            nbytes, rst = plan["cut"]
            proxy.cut_after(nbytes, rst=rst, times=1)
        return real(self, method, url, *args, **kwargs)
    monkeypatch.setattr(vsa.Http, "request", request)


def _random_cuts(bao_cluster, approle, tmp_path, monkeypatch, trials, seed):
    snapdir = tmp_path / "snaps"
    with proxy_to(bao_cluster.leader().addr) as proxy:
        config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
        code, log = run_main("-c", config, "--once")          # learn the size
        assert code == 0, log
        size = os.path.getsize(str(snapdir / snapshots(snapdir)[0]))
        assert size > 4 * MB, "kv_data should make a multi-MB snapshot, got %d bytes" % size
        for name in snapshots(snapdir):
            os.unlink(str(snapdir / name))
        plan = {}
        cut_snapshot_stream(monkeypatch, proxy, plan)
        rng = random.Random(seed)
        for trial in range(trials):
            cut, rst = rng.randrange(0, size), rng.random() < 0.3
            what = "trial %d/%d (seed %d): cut after %d of %d bytes%s" % (
                trial + 1, trials, seed, cut, size, " with RST" if rst else "")
            plan["cut"] = (cut, rst)
            code, log = run_main("-c", config, "--once")
            plan["cut"] = None
            proxy.pass_through()
            assert code == 1, "%s: exit %s\n%s" % (what, code, log)
            errors = error_lines(log)
            assert len(errors) == 1, "%s: expected one ERROR line\n%s" % (what, log)
            assert "Traceback" not in log, what
            assert snapshots(snapdir) == [], "%s: something was stored: %s" % (what, snapshots(snapdir))
            assert temp_files(snapdir) == [], "%s: temp files left: %s" % (what, temp_files(snapdir))
            assert verify_threads() == [], what
            # the next cycle, without the fault, stores a verified snapshot
            code, log = run_main("-c", config, "--once")
            assert code == 0, "%s: the clean cycle after it failed\n%s" % (what, log)
            infos = verify_all(snapdir)
            assert len(infos) == 1 and temp_files(snapdir) == [], what
            os.unlink(infos[0].path)
    return size


@pytest.mark.usefixtures("isolated_env")
def test_stream_cut_at_random_offsets_10_trials(bao_cluster, approle, kv_data, tmp_path,
                                                monkeypatch):
    _random_cuts(bao_cluster, approle, tmp_path, monkeypatch, 10, SEED)


@pytest.mark.usefixtures("isolated_env")
@pytest.mark.slow
def test_stream_cut_at_random_offsets_100_trials(bao_cluster, approle, kv_data, tmp_path,
                                                 monkeypatch):
    _random_cuts(bao_cluster, approle, tmp_path, monkeypatch, 100, SEED + 1)

def _gzip_tar(members):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


HOSTILE_BODIES = [
    ("html-page", b"<!DOCTYPE html><html><body><h1>Welcome to nginx!</h1></body></html>",
     "text/html", "gzip"),
    ("empty-body", b"", "application/octet-stream", "empty"),
    ("json-error", b'{"errors":["permission denied"]}', "application/json", "gzip"),
    ("gzip-of-text", gzip.compress(b"hello world\n" * 100), "application/gzip", "tar header"),
    ("tar-without-members", _gzip_tar([]), "application/gzip", "lacks"),
    ("gzip-with-trailing-junk", build_archive() + b"JUNK", "application/gzip", "after the end"),
    ("wrong-sha256sums", build_archive(sums="%s  meta.json\n%s  state.bin\n" % ("0" * 64, "0" * 64)),
     "application/gzip", "does not match"),
    ("empty-sealed-sums", build_archive(sealed=b""), "application/gzip", "SHA256SUMS.sealed"),
    ("meta-size-lies", build_archive(meta_size=1), "application/gzip", "meta.json says"),
    ("huge-meta-member", _gzip_tar([("meta.json", b"{" + b" " * (2 * MB) + b"}")]),
     "application/gzip", "implausibly large"),
]


@pytest.mark.usefixtures("isolated_env")
@pytest.mark.parametrize("case_id,body,ctype,problem", HOSTILE_BODIES,
                         ids=[b[0] for b in HOSTILE_BODIES])
def test_hostile_200_answer_to_the_snapshot_request_is_rejected(bao_cluster, approle, tmp_path,
                                                                case_id, body, ctype, problem):
    snapdir = tmp_path / "snaps"
    with proxy_to(bao_cluster.leader().addr) as proxy:
        proxy.fail_requests(lambda m, p: p.startswith(vsa.SNAPSHOT_PATH), status=200, body=body,
                            content_type=ctype)
        config = write_config(tmp_path / "c.json", proxy.addr, approle, snapdir)
        code, log = run_main("-c", config, "--once")
    assert code == 1, "%s: exit %s\n%s" % (case_id, code, log)
    errors = error_lines(log)
    assert len(errors) == 1 and problem in errors[0], "%s:\n%s" % (case_id, log)
    assert "Traceback" not in log
    assert snapshots(snapdir) == [] and temp_files(snapdir) == []

@pytest.mark.slow
@pytest.mark.usefixtures("isolated_env")
@pytest.mark.parametrize("threaded", [False, True], ids=["one thread", "two threads"])
@pytest.mark.parametrize("mode", ["random", "state", "pax", "bomb"])
def test_endless_snapshot_stream_keeps_memory_bounded(tmp_path, mode, threaded):
    limit = 100 * MB          # five times the bound on the peak
    stage = tmp_path / "stage"
    stage.mkdir()
    with EndlessServer(mode, limit) as server:
        http = vsa.Http(timeout=30)
        tracemalloc.start()
        try:
            resp = http.request("GET", server.url + vsa.SNAPSHOT_PATH)
            try:
                with pytest.raises(vsa.SnapshotError) as failure:
                    vsa.stream_snapshot(resp, str(stage), vsa.Signals(), threaded=threaded)
            finally:
                resp.close()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        sent = server.sent
    print("%s: %d MB sent, tracemalloc peak %.1f MB, %s" % (mode, sent // MB, peak / MB, failure.value))
    assert peak < 20 * MB, "%s: %.0f MB of memory for a stream (%d MB sent) - not bounded" % (
        mode, peak / MB, sent // MB)
    assert os.listdir(str(stage)) == [], "partial file left: %s" % os.listdir(str(stage))
    assert verify_threads() == [], "the verifier thread outlived the failure"
    if mode == "random":
        assert sent < 32 * MB, "a stream that is not gzip was read on for %d MB" % (sent // MB)
    elif mode == "state":     # a long (legitimate-looking) snapshot is never cut short
        assert sent >= limit, "only %d MB flowed" % (sent // MB)


# =============================================================================
# write-back: a large snapshot reaches the disk while it still arrives
# =============================================================================


class _Answer:
    """A snapshot answer for stream_snapshot, from bytes."""

    def __init__(self, data):
        self.stream = io.BytesIO(data)

    def readinto(self, buffer):
        return self.stream.readinto(buffer)

    def abort(self):
        pass


def _quiet_writeback():
    """Whether no write-back thread is left running."""
    return not [t for t in threading.enumerate() if t.name == "writeback" and t.is_alive()]


def test_a_large_snapshot_is_flushed_while_it_arrives_and_stored_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(vsa, "WRITEBACK_STEP", 256 * 1024)
    flushed, real = [], os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (flushed.append(fd), real(fd)))
    archive = build_archive(os.urandom(3 * MB))
    signals = vsa.Signals()
    descriptors = len(os.listdir("/proc/self/fd"))
    info = vsa.stream_snapshot(_Answer(archive), str(tmp_path), signals, threaded=False)
    with open(info.path, "rb") as handle:
        assert handle.read() == archive
    assert info.sha256 == hashlib.sha256(archive).hexdigest()
    assert flushed, "nothing was flushed before the end"
    assert wait_for(_quiet_writeback, 5, "the write-back thread to end")
    assert len(os.listdir("/proc/self/fd")) == descriptors, "a descriptor was left open"
    signals.close()


def test_an_error_of_the_background_flush_fails_the_snapshot_and_keeps_nothing(tmp_path, monkeypatch):
    # Linux reports a write-back error to one caller only: the final fsync
    # alone would succeed, and a snapshot that never reached the disk be kept.
    monkeypatch.setattr(vsa, "WRITEBACK_STEP", 256 * 1024)

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(vsa.StagingError) as caught:
        vsa.stream_snapshot(_Answer(build_archive(os.urandom(2 * MB))), str(tmp_path), vsa.Signals(),
                            threaded=False)
    assert "Input/output error" in str(caught.value)
    assert os.listdir(str(tmp_path)) == []
    assert wait_for(_quiet_writeback, 5, "the write-back thread to end")
