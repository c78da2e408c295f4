"""Section "Storage backends" with section "HTTP transport and retry"'s back-off: the shared
retry of ``Storage.send`` honours a throttling store's ``Retry-After``
(delta seconds or an HTTP date, capped, garbage ignored) on every storage,
and no back-off is ever near zero.

The stores are loopback listing servers (hostile_servers.py) that answer
their first requests with ``503`` + ``Retry-After``; waits go to a
FakeSignals on a FakeClock, so nothing really sleeps.
"""

import email.utils
import json

import pytest

import vault_snapshot_agent as vsa
from harness import FakeClock, FakeSignals, captured_log
from hostile_servers import AzureListServer, GcsListServer, S3ListServer
from slow_servers import throttled

LISTINGS = {"s3": S3ListServer, "azure": AzureListServer, "gcs": GcsListServer}


class RecordingSignals(FakeSignals):
    """FakeSignals that also keep every wait asked for."""

    def __init__(self, clock):
        FakeSignals.__init__(self, clock)
        self.waits = []

    def wait(self, seconds, wake_on_reload=True):
        self.waits.append(seconds)
        FakeSignals.wait(self, seconds, wake_on_reload)


def listed(tmp_path, kind, throttle, retry_after):
    """(the refs listed, the waits between tries, throttled answers sent)."""
    clock = FakeClock()
    signals = RecordingSignals(clock)
    with throttled(LISTINGS[kind], throttle, retry_after(clock))("odd_size") as server:
        config = {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s"}
        config.update(server.storage_block())
        path = tmp_path / "c.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        _, storages = vsa.load_all(str(path), vsa.Runtime({}, clock, signals))
        with captured_log():
            refs = storages[0].list()
        return refs, signals.waits, server.count("throttled")


@pytest.mark.parametrize("kind", sorted(LISTINGS))
def test_retry_after_in_seconds_is_honoured_by_every_storage(tmp_path, kind):
    refs, waits, throttled_count = listed(tmp_path, kind, 3, lambda clock: "10")
    assert throttled_count == 3 and refs
    assert len(waits) == 3 and all(wait >= 10.0 for wait in waits), waits


def test_retry_after_as_an_http_date_is_honoured(tmp_path):
    def thirty_seconds_on(clock):
        return email.utils.format_datetime(clock.now() + vsa.datetime.timedelta(seconds=30),
                                           usegmt=True)
    _, waits, _ = listed(tmp_path, "s3", 1, thirty_seconds_on)
    assert len(waits) == 1 and 29.0 <= waits[0] <= 30.0, waits


def test_a_huge_retry_after_is_capped(tmp_path):
    _, waits, _ = listed(tmp_path, "s3", 1, lambda clock: "86400")
    assert waits == [vsa.MAX_RETRY_AFTER]


@pytest.mark.parametrize("value", ["soon", "-5", "1e9", "Mon, 99 Foo 2026 00:00:00 GMT", ""])
def test_a_garbage_retry_after_is_ignored(tmp_path, value):
    _, waits, _ = listed(tmp_path, "s3", 1, lambda clock: value)
    assert len(waits) == 1 and 0.25 <= waits[0] <= 0.5, waits      # the first back-off


@pytest.mark.parametrize("value,expected", [
    ("0", 0.0), ("7", 7.0), ("61", 60.0), (" 12 ", 12.0), (None, None), ("x", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),             # in the past: at once
    ("Wed, 21 Oct 2015 07:28:00", None),                # no zone: not an HTTP date
])
def test_retry_after_values(value, expected):
    now = vsa.datetime.datetime(2026, 1, 1, tzinfo=vsa.UTC)
    assert vsa.retry_after(value, now) == expected


def test_no_back_off_is_near_zero():
    assert vsa.backoff_delays(5, 0.5, 20.0, rand=lambda: 0.0) == [0.25, 0.5, 1.0, 2.0]
    assert vsa.backoff_delays(5, 0.5, 20.0, rand=lambda: 1.0) == [0.5, 1.0, 2.0, 4.0]
    assert vsa.backoff_delays(8, 1.0, 20.0, rand=lambda: 0.0)[-1] == 10.0      # half the cap
