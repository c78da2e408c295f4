"""Section "Utilities": pure helpers (durations, names, redaction, secrets)."""

import datetime

import pytest

import vault_snapshot_agent as vsa

UTC = vsa.UTC


@pytest.mark.parametrize("text,seconds", [
    ("0", 0), ("30s", 30), ("1h", 3600), ("1h30m", 5400), ("500ms", 0.5), ("1.5h", 5400),
    ("2h45m30s", 9930), ("100us", 1e-4), ("1\u00b5s", 1e-6), ("10ns", 1e-8), ("+5m", 300),
    (".5s", 0.5), ("1m0s", 60),
])
def test_go_durations_parse(text, seconds):
    assert vsa.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "1d", "h", "1h 30m", " 1h", "-1h", "1.h.", "1hh",
                                  "abc", "1H", "30 s", "1e3s"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError):
        vsa.parse_duration(text)


@pytest.mark.parametrize("seconds,text", [(3600, "1h"), (90, "1m30s"), (0.25, "250ms"),
                                          (5400, "1h30m"), (1, "1s")])
def test_format_duration(seconds, text):
    assert vsa.format_duration(seconds) == text


def test_snapshot_name_format_and_round_trip():
    when = datetime.datetime(2026, 11, 27, 20, 52, 39, 123456, tzinfo=UTC)
    name = vsa.snapshot_name(when)
    assert name == "raft_snapshot-20261127T205239.123Z.snap"
    assert vsa.parse_snapshot_name(name) == when.replace(microsecond=123000)


def test_snapshot_names_sort_by_time_as_text():
    base = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    times = [base + datetime.timedelta(seconds=s) for s in (0, 0.001, 9, 10, 3599, 86400 * 40)]
    names = [vsa.snapshot_name(t) for t in times]
    assert sorted(names) == names


def test_go_agent_names_parse_as_unix_nanoseconds():
    when = vsa.parse_snapshot_name("raft_snapshot-1764276759123456789.snap")
    assert when == datetime.datetime(2025, 11, 27, 20, 52, 39, 123456, tzinfo=UTC)


@pytest.mark.parametrize("name", ["raft_snapshot-abc.snap", "raft_snapshot-1.snap.tmp",
                                  "other.snap", "raft_snapshot-20261127T205239Z.snap",
                                  ".raft_snapshot-h-1-ab.tmp", "raft_snapshot-20261327T205239.123Z.snap"])
def test_foreign_names_are_not_ours(name):
    assert vsa.parse_snapshot_name(name) is None


def test_redact_url_drops_query_and_userinfo():
    out = vsa.redact_url("https://user:pw@acct.blob.core.windows.net/c/b?sv=1&sig=SECRET")
    assert "SECRET" not in out and "pw" not in out
    assert out.startswith("https://acct.blob.core.windows.net/c/b")


def test_secret_never_formats_its_value():
    secret = vsa.Secret("s.verysecret")
    for text in (str(secret), repr(secret), "%s" % secret, "{}".format(secret), repr([secret])):
        assert "verysecret" not in text
    assert secret.reveal() == "s.verysecret"


@pytest.mark.parametrize("text,value", [("1", True), ("true", True), ("TRUE", True),
                                        ("0", False), ("false", False), ("", False)])
def test_parse_bool(text, value):
    assert vsa.parse_bool(text) is value


def test_parse_bool_refuses_junk():
    with pytest.raises(ValueError):
        vsa.parse_bool("maybe")


@pytest.mark.parametrize("stamp", [0, 951782400, 1764663730.75, 4102444799])
def test_http_date_matches_the_standard_library(stamp):
    """Section "Utilities": the Azure x-ms-date the agent writes itself is the RFC 7231
    date email.utils writes (that module is no longer imported at start)."""
    from email.utils import formatdate
    moment = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc)
    assert vsa.http_date(moment) == formatdate(int(stamp), usegmt=True)
    east = moment.astimezone(datetime.timezone(datetime.timedelta(hours=5, minutes=30)))
    assert vsa.http_date(east) == vsa.http_date(moment)


@pytest.mark.parametrize("text", ["plain", "a&b<c>d", "&amp;", "<Key>x</Key>", "\"quoted\" 'it'"])
def test_xml_escape_matches_the_standard_library(text):
    """Section "Utilities": S3 keys and ETags in request bodies are escaped as
    xml.sax.saxutils.escape does."""
    from xml.sax.saxutils import escape
    assert vsa.xml_escape(text) == escape(text)
