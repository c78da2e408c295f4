"""Section "Snapshot stream and verification": streaming verification of snapshot archives."""

import gzip
import hashlib
import io
import os
import tarfile
import threading

import pytest

import vault_snapshot_agent as vsa
from archives import build_archive


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
