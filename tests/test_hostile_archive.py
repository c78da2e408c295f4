"""Section "Snapshot stream and verification": verification of hostile snapshot archives (issue 14, part 1).

A snapshot stream (or a stored object fetched back for a restore) comes from
a server we do not control. Whatever it holds, `verify FILE` answers with
exit 0 and "OK", or exit 1 and exactly one ERROR line saying why (control
characters escaped), with memory bounded; `--once` stores nothing it refused,
and no forged meta.json value reaches a log line, the status file or the
metrics. The attacks themselves are built in hostile_archives.py.
"""

import json
import os
import sys

import pytest

from support import harness
from support.fake_endpoints import FakeVault
from support.hostile_archives import (BIG, FORGED_INDEX, SMALL, error_matches, forged_meta,
                                      hostile_archive, raw_member, run_measured, write_small)

import vault_snapshot_agent as vsa

RSS_LIMIT_MB = 100
TIMEOUT = 120.0          # a safety net for a hung child, never an assertion


def check_outcome(code, log, expected):
    """The agent's answer to one archive: exit 0 and no ERROR line when
    ``expected`` is None, else exit 1 and one ERROR line matching it."""
    errors = harness.error_lines(log)
    if expected is None:
        assert (code, errors) == (0, []), log
    else:
        assert code == 1, log
        assert len(errors) == 1, log
        assert error_matches(errors[0], expected), log


# ------------------------------------------------------- every small attack


@pytest.mark.parametrize("label", list(SMALL))
def test_verify_answers_each_attack_with_one_error_line(tmp_path, capsys, label):
    path = tmp_path / "hostile.snap"
    expected = write_small(path, label)
    code, log = harness.run_main("verify", str(path))
    check_outcome(code, log, expected)
    if expected is None:
        assert ": OK, " in capsys.readouterr().out


@pytest.mark.parametrize("label", list(SMALL))
def test_the_verdict_does_not_depend_on_how_the_stream_is_cut(label):
    data = SMALL[label][0]()
    verifier = vsa.ArchiveVerifier()
    try:
        for pos in range(0, len(data), 509):       # not a multiple of any block size
            verifier.feed(data[pos:pos + 509])
        verifier.finish()
    except vsa.SnapshotError as exc:
        message = str(exc)
    else:
        message = None
    expected = SMALL[label][1]
    if expected is None:
        assert message is None
    else:
        assert message is not None and error_matches(message, expected), message


def test_a_newline_in_a_member_name_is_escaped_on_one_line(tmp_path):
    path = tmp_path / "newline.snap"
    path.write_bytes(hostile_archive(after=[raw_member("evil\nvault_snapshot_x 1", b"x")]))
    code, log = harness.run_main("verify", str(path))
    assert code == 1
    assert len(log.splitlines()) == 1, log
    assert "unexpected member" in log and "evil\\nvault_snapshot_x 1" in log
    assert not log.startswith("vault_snapshot_x")


# --------------------------------------------- a forged Index goes nowhere


def test_a_forged_index_never_reaches_the_output_of_verify(tmp_path):
    path = tmp_path / "forged.snap"
    path.write_bytes(forged_meta(Index=FORGED_INDEX))
    result = run_measured([sys.executable, harness.AGENT, "verify", str(path)], TIMEOUT)
    check_outcome(result.code, result.output, "meta.json Index is not a whole number")
    assert not [line for line in result.output.splitlines()
                if line.startswith("vault_snapshot_last_success")], result.output
    assert "9e99" not in result.output


@pytest.mark.parametrize("archive", [
    lambda: forged_meta(Index=FORGED_INDEX),
    lambda: hostile_archive(after=[raw_member("../../tmp/pwned", b"x")]),
], ids=["forged Index", "extra member"])
def test_once_stores_nothing_it_refused(tmp_path, archive):
    token = "hostile-archive-test-token"
    status, metrics, snaps = tmp_path / "status.json", tmp_path / "m.prom", tmp_path / "snaps"
    with FakeVault(token=token, archive=archive()) as vault:
        config = tmp_path / "c.json"
        config.write_text(json.dumps({
            "addr": vault.url, "token": token, "local_storage": {"path": str(snaps)},
            "status_file": str(status), "metrics_textfile": str(metrics)}))
        code, log = harness.run_main("-c", str(config), "--once")
    assert code == 1, log
    assert harness.snapshots(snaps) == []
    if status.exists():
        assert json.loads(status.read_text())["last_outcome"] != "stored"
    for text in (log, status.read_text() if status.exists() else "",
                 metrics.read_text() if metrics.exists() else ""):
        assert "9e99" not in text, text
        assert not [line for line in text.splitlines()
                    if line.startswith("vault_snapshot_last_success_timestamp_seconds 9")], text


# --------------------------------------- large streams: peak RSS of verify


@pytest.mark.slow
@pytest.mark.parametrize("label", list(BIG))
def test_verify_memory_stays_bounded_on_large_hostile_streams(tmp_path, label):
    write, expected = BIG[label]
    path = tmp_path / "big.snap"
    write(str(path))
    result = run_measured([sys.executable, harness.AGENT, "verify", str(path)], TIMEOUT)
    assert result.code is not None, "verify still running after %d s" % TIMEOUT
    check_outcome(result.code, result.output, expected)
    assert result.peak_rss_mb < RSS_LIMIT_MB, "peak RSS %.0f MB" % result.peak_rss_mb
    os.unlink(str(path))
