"""Section "Storage backends" with section "HTTP transport and retry"'s back-off: the shared
retry of ``Storage.send`` honours a throttling store's ``Retry-After``
(delta seconds or an HTTP date, capped, garbage ignored) on every storage,
and no back-off is ever near zero.

The stores are loopback listing servers (hostile_servers.py) that answer
their first requests with ``503`` + ``Retry-After``; waits go to a
FakeSignals on a FakeClock, so nothing really sleeps.

End to end: the real agent stores a real snapshot in each storage emulator
(S3, Azure, GCS) through tests/support/faultproxy.py; a storm of 5xx answers, a
reset or a slow store is retried to success, and a store that always fails
is one ERROR line that keeps the local snapshot and every older object.
"""

import email.utils
import json
import os
import re
import time

import pytest

import vault_snapshot_agent as vsa
from support.faults_support import (GO_NAMES, MB, Backend, proxy_to, temp_files, verify_all,
                                    verify_bytes, write_config)
from support.harness import FakeClock, FakeSignals, captured_log, error_lines, run_main
from support.hostile_servers import AzureListServer, GcsListServer, S3ListServer
from support.slow_servers import throttled

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


# =============================================================================
# end to end: storage faults (5xx storms, resets, slow answers, permanent
# failure) through tests/support/faultproxy.py in front of each storage emulator
# =============================================================================


BACKEND_FIXTURES = {"s3": "moto", "azure": "azurite", "gcs": "gcs"}


@pytest.fixture
def make_backend(request, tmp_path):
    def make(kind):
        server = request.getfixturevalue(BACKEND_FIXTURES[kind])
        prefix = "faults-%s-%s" % (re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[-40:].strip("-"),
                                   os.urandom(3).hex())
        return Backend(kind, server, prefix)
    return make


def _storage_cycle(tmp_path, bao_cluster, approle, backend, proxy, **block_extra):
    key, block = backend.block(proxy, **block_extra)
    snapdir = tmp_path / "local"
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir,
                          **{key: block})
    code, log = run_main("-c", config, "--once", "--log-level", "debug")
    return code, log, snapdir


@pytest.mark.usefixtures("isolated_env")
@pytest.mark.parametrize("kind", sorted(BACKEND_FIXTURES))
@pytest.mark.parametrize("fault", ["5xx-storm", "reset", "slow"])
def test_storage_transient_fault_is_retried_to_success(bao_cluster, approle, kv_data, tmp_path,
                                                       make_backend, kind, fault):
    backend = make_backend(kind)
    old = ["%s/%s" % (backend.prefix, n) for n in GO_NAMES]
    backend.put_many(old, b"old")
    with proxy_to(backend.url) as proxy:
        rule = None
        if fault == "5xx-storm":
            body, ctype = backend.error(503)
            rule = proxy.fail_requests(backend.data_puts(), status=503, body=body,
                                       content_type=ctype, times=2)
        elif fault == "reset":
            proxy.reset(times=1)
        else:
            proxy.delay(0.2)
        started = time.monotonic()
        code, log, snapdir = _storage_cycle(tmp_path, bao_cluster, approle, backend, proxy)
        elapsed = time.monotonic() - started
        if rule is not None:
            assert rule.hits == 2, log
    assert code == 0, "%s %s: exit %s\n%s" % (kind, fault, code, log)
    assert "Traceback" not in log and error_lines(log) == [], log
    if fault != "slow":
        assert re.search(r"retry|asking the session", log), log
    else:
        assert elapsed > 0.4, elapsed
    local = verify_all(snapdir)
    assert len(local) == 1 and temp_files(snapdir) == []
    new = sorted(set(backend.names()) - set(old))
    assert len(new) == 1, (new, log)
    info = verify_bytes(backend.get(new[0]), tmp_path, "%s object %s" % (kind, new[0]))
    assert info.sha256 == local[0].sha256 and info.size > 4 * MB
    assert sorted(set(backend.names()) & set(old)) == old, "an older object was deleted"
    assert backend.uploads_in_progress() == []


@pytest.mark.usefixtures("isolated_env")
@pytest.mark.parametrize("kind", sorted(BACKEND_FIXTURES))
def test_storage_permanent_failure_keeps_local_and_old_objects(bao_cluster, approle, kv_data,
                                                               tmp_path, make_backend, kind):
    backend = make_backend(kind)
    old = ["%s/%s" % (backend.prefix, n) for n in GO_NAMES]
    backend.put_many(old, b"old")
    before = dict((name, backend.get(name)) for name in old)
    with proxy_to(backend.url) as proxy:
        body, ctype = backend.error(500)
        rule = proxy.fail_requests(lambda m, p: m == "PUT", status=500, body=body,
                                   content_type=ctype)
        # retain 1 would delete the old objects if retention ran after a failed upload
        code, log, snapdir = _storage_cycle(tmp_path, bao_cluster, approle, backend, proxy,
                                            retain=1)
        assert rule.hits >= 2, log
    assert code == 1, "%s: exit %s\n%s" % (kind, code, log)
    assert "Traceback" not in log
    errors = error_lines(log)
    assert len(errors) == 1 and "Storing snapshot in" in errors[0], log
    assert "Successfully created local snapshot" in log
    assert len(verify_all(snapdir)) == 1 and temp_files(snapdir) == []
    assert backend.names() == sorted(old), "%s: half-written or deleted objects: %s" % (
        kind, backend.names())
    assert dict((name, backend.get(name)) for name in old) == before
    assert backend.uploads_in_progress() == [], "S3 multipart upload left behind"
