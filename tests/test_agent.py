"""Section "Agent": the daemon loop's schedule and reload, driven by a fake clock.

The Vault side is a stand-in that only answers "not the leader" and counts
calls: these tests are about when cycles happen, not about Vault (the end to
end tests cover that against a real cluster)."""

import io
import json

import vault_snapshot_agent as vsa
from support.agent_sim import StandbyVault, fake_clock
from support.harness import FakeSignals


def make_loader(tmp_path, frequencies, **extra):
    path = tmp_path / "c.json"

    def loader(runtime):
        value = frequencies.pop(0)
        if value is None:
            raise vsa.ConfigError("frequency: broken")
        # leader_poll off: the counted is_leader calls are then the cycles'
        # (tests/test_leader_poll.py covers the polls).
        config = {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s",
                  "frequency": value, "leader_poll": "0s", "local_storage": {"path": str(tmp_path)}}
        config.update(extra)
        path.write_text(json.dumps(config))
        return vsa.load_all(str(path), runtime)
    return loader


class FlakyVault(StandbyVault):
    """The leader, whose login fails ``fail`` times in a row (Vault sealed,
    unreachable...), then a standby (a cycle that ends normally)."""
    fail = 0

    def is_leader(self):
        StandbyVault.is_leader(self)
        return FlakyVault.fail > 0

    def ensure_token(self):
        FlakyVault.fail -= 1
        raise vsa.VaultError("Vault answered HTTP 503 to POST /v1/auth/approle/login (sealed)")


def test_cycles_run_at_start_then_every_frequency(tmp_path):
    StandbyVault.calls = []
    clock = fake_clock()
    signals = FakeSignals(clock, until=1000 + 3 * 3600 + 1)
    agent = vsa.Agent(make_loader(tmp_path, ["1h"]), clock, signals, StandbyVault)
    agent.run_forever()
    assert [t for t, _ in StandbyVault.calls] == [1000, 4600, 8200, 11800]


def test_reload_applies_new_frequency_and_a_broken_one_is_ignored(tmp_path):
    StandbyVault.calls = []
    clock = fake_clock()
    events = [(1000 + 600, "reload_requested"), (1000 + 700, "reload_requested")]
    signals = FakeSignals(clock, until=1000 + 3600, events=events)
    agent = vsa.Agent(make_loader(tmp_path, ["1h", "15m", None]), clock, signals, StandbyVault)
    stream = io.StringIO()
    vsa._configure_logging(20, "text", stream)
    agent.run_forever()
    # Start, then 15 minutes after the start once reloaded, and every 15 minutes on.
    assert [t for t, _ in StandbyVault.calls] == [1000, 1900, 2800, 3700]
    assert [f for _, f in StandbyVault.calls] == [3600, 900, 900, 900]
    log = stream.getvalue()
    assert "Config reloaded" in log and "every 15m" in log
    assert "Config reload failed, keeping the running config: frequency: broken" in log


def test_a_long_cycle_does_not_cause_a_burst(tmp_path):
    StandbyVault.calls = []
    clock = fake_clock()

    class SlowVault(StandbyVault):
        def is_leader(self):
            StandbyVault.is_leader(self)
            clock.advance(5000)      # a cycle longer than the 1h frequency
            signals.stop_requested = clock.monotonic() >= signals.until
            return False
    signals = FakeSignals(clock, until=1000 + 20000)
    vsa.Agent(make_loader(tmp_path, ["1h"]), clock, signals, SlowVault).run_forever()
    times = [t for t, _ in StandbyVault.calls]
    assert len(times) == 4
    assert all(b - a == 5000 for a, b in zip(times, times[1:]))


def test_a_failed_cycle_is_retried_sooner_with_backoff_up_to_the_frequency(tmp_path):
    StandbyVault.calls = []
    FlakyVault.fail = 100
    clock = fake_clock()
    signals = FakeSignals(clock, until=1000 + 8000)
    stream = io.StringIO()
    handler = vsa._configure_logging(20, "text", stream)
    try:
        vsa.Agent(make_loader(tmp_path, ["1h"], retry_interval="1m"), clock, signals,
                  FlakyVault).run_forever()
    finally:
        vsa.LOG.removeHandler(handler)
    times = [t - 1000 for t, _ in StandbyVault.calls]
    # 1m, 2m, 4m, 8m, 16m, 32m after each failure; then capped at the 1h frequency.
    assert times == [0, 60, 180, 420, 900, 1860, 3780, 7380]
    log = stream.getvalue()
    assert log.count("Snapshot cycle failed") == 8
    assert "Retrying local:%s at 2026-01-01T00:17:40Z (1 failed in a row)" % tmp_path in log
    assert "(7 failed in a row)" in log


def test_a_retry_is_counted_from_the_end_of_a_long_failing_cycle(tmp_path):
    StandbyVault.calls = []
    FlakyVault.fail = 100
    clock = fake_clock()

    class SlowFlakyVault(FlakyVault):
        def ensure_token(self):
            clock.advance(100)       # e.g. an upload retried for 100 s before giving up
            FlakyVault.ensure_token(self)
    signals = FakeSignals(clock, until=1000 + 600)
    vsa.Agent(make_loader(tmp_path, ["1h"]), clock, signals, SlowFlakyVault).run_forever()
    # start 0, fails at 100, retried 1m later (160), fails at 260, 2m later (380)...
    assert [t - 1000 for t, _ in StandbyVault.calls] == [0, 160, 380]


def test_retries_stop_once_a_cycle_ends_normally(tmp_path):
    StandbyVault.calls = []
    FlakyVault.fail = 2
    clock = fake_clock()
    signals = FakeSignals(clock, until=1000 + 2 * 3600)
    vsa.Agent(make_loader(tmp_path, ["1h"]), clock, signals, FlakyVault).run_forever()
    # default retry_interval 1m: fail, fail, then a standby answer: back to hourly.
    assert [t - 1000 for t, _ in StandbyVault.calls] == [0, 60, 180, 3780]


def test_retry_interval_0s_keeps_the_go_agents_behaviour(tmp_path):
    StandbyVault.calls = []
    FlakyVault.fail = 100
    clock = fake_clock()
    signals = FakeSignals(clock, until=1000 + 2 * 3600 + 1)
    vsa.Agent(make_loader(tmp_path, ["1h"], retry_interval="0s"), clock, signals,
              FlakyVault).run_forever()
    assert [t - 1000 for t, _ in StandbyVault.calls] == [0, 3600, 7200]


def test_progress_logs_bytes_rate_and_eta_every_interval():
    clock = fake_clock()
    stream = io.StringIO()
    handler = vsa._configure_logging(20, "text", stream)
    try:
        progress = vsa.Progress("Uploading to s3://b/", 10 * 10 ** 9, clock, interval=30)
        for _ in range(100):                 # 100 MB a second for 100 seconds
            clock.advance(1)
            progress.add(100 * 10 ** 6)
        unknown = vsa.Progress("Downloading snapshot", None, clock, interval=30)
        clock.advance(31)
        unknown.add(5 * 10 ** 9)
    finally:
        vsa.LOG.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4, lines             # at 30, 60, 90 s, and the download
    assert "Uploading to s3://b/: 3.0 GB of 10.0 GB (30%), 100.0 MB/s, about 1m10s left" in lines[0]
    assert "Downloading snapshot: 5.0 GB so far" in lines[3]


class ScriptedHttp:
    """Answers Vault's login and renew-self from a script of TTLs; records paths."""

    def __init__(self, renew_ttls):
        self.renew_ttls = list(renew_ttls)
        self.paths = []

    def request(self, method, url, headers, body=None, timeout=None):
        path = url.split("://", 1)[1].split("/", 1)[1]
        self.paths.append(path)
        ttl = 4 if path.endswith("/login") else self.renew_ttls.pop(0)
        answer = {"auth": {"client_token": "s.%d" % len(self.paths), "lease_duration": ttl,
                           "renewable": True}}

        class Answer:
            status = 200

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def json(self):
                return answer
        return Answer()


def test_a_renewal_capped_by_the_max_ttl_is_followed_by_a_login_not_another_renewal(tmp_path):
    clock = fake_clock()
    cfg, _ = make_loader(tmp_path, ["1h"])(vsa.Runtime.create(env={}))
    http = ScriptedHttp(renew_ttls=[4, 3, 4])
    vault = vsa.VaultClient(cfg, http, clock)
    stream = io.StringIO()
    handler = vsa._configure_logging(20, "text", stream)
    try:
        for _ in range(5):               # a cycle every 2.7 s: past each renewal time
            vault.ensure_token()
            clock.advance(2.7)
    finally:
        vsa.LOG.removeHandler(handler)
    # login (4 s), renew (4 s), renew (3 s < 4 s: the max TTL), then a login, renew.
    assert [p.rsplit("/", 1)[1] for p in http.paths] == [
        "login", "renew-self", "renew-self", "login", "renew-self"]
    assert "TTL now 3s (capped by its max TTL: a new login follows)" in stream.getvalue()
    assert "failed" not in stream.getvalue()
