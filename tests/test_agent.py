"""Section 11: the daemon loop's schedule and reload, driven by a fake clock.

The Vault side is a stand-in that only answers "not the leader" and counts
calls: these tests are about when cycles happen, not about Vault (the end to
end tests cover that against a real cluster)."""

import datetime
import io
import json

import vault_snapshot_agent as vsa


class FakeClock(object):
    def __init__(self):
        self.t = 1000.0

    def monotonic(self):
        return self.t

    def now(self):
        return datetime.datetime(2026, 1, 1, tzinfo=vsa.UTC) + datetime.timedelta(seconds=self.t)


class FakeSignals(object):
    """Waiting advances the fake clock; scripted events fire at set times."""

    def __init__(self, clock, until, events=()):
        self.clock, self.until = clock, until
        self.events = sorted(events)
        self.stop_requested = self.reload_requested = False
        self.stop_signal = 15

    def wait(self, seconds, wake_on_reload=True):
        target = self.clock.t + seconds
        if self.events and self.events[0][0] <= target:
            at, what = self.events.pop(0)
            self.clock.t = max(self.clock.t, at)
            setattr(self, what, True)
            return
        self.clock.t = target
        if self.clock.t >= self.until:
            self.stop_requested = True

    def check(self):
        if self.stop_requested:
            raise vsa.Stopped("stop")


class StandbyVault(object):
    calls = []

    def __init__(self, cfg, clock=None):
        self.cfg, self.clock = cfg, clock

    def is_leader(self):
        StandbyVault.calls.append((self.clock.monotonic(), self.cfg.frequency))
        return False


def make_loader(tmp_path, frequencies):
    path = tmp_path / "c.json"

    def loader():
        value = frequencies.pop(0)
        if value is None:
            raise vsa.ConfigError("frequency: broken")
        path.write_text(json.dumps({"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s",
                                    "frequency": value, "local_storage": {"path": str(tmp_path)}}))
        return vsa.load_all(str(path))
    return loader


def test_cycles_run_at_start_then_every_frequency(tmp_path):
    StandbyVault.calls = []
    clock = FakeClock()
    signals = FakeSignals(clock, until=1000 + 3 * 3600 + 1)
    agent = vsa.Agent(make_loader(tmp_path, ["1h"]), clock, signals, StandbyVault)
    agent.run_forever()
    assert [t for t, _ in StandbyVault.calls] == [1000, 4600, 8200, 11800]


def test_reload_applies_new_frequency_and_a_broken_one_is_ignored(tmp_path):
    StandbyVault.calls = []
    clock = FakeClock()
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
    clock = FakeClock()

    class SlowVault(StandbyVault):
        def is_leader(self):
            StandbyVault.is_leader(self)
            clock.t += 5000      # a cycle longer than the 1h frequency
            signals.stop_requested = clock.t >= signals.until
            return False
    signals = FakeSignals(clock, until=1000 + 20000)
    vsa.Agent(make_loader(tmp_path, ["1h"]), clock, signals, SlowVault).run_forever()
    times = [t for t, _ in StandbyVault.calls]
    assert len(times) == 4
    assert all(b - a == 5000 for a, b in zip(times, times[1:]))


def test_progress_logs_bytes_rate_and_eta_every_interval():
    clock = FakeClock()
    stream = io.StringIO()
    handler = vsa._configure_logging(20, "text", stream)
    try:
        progress = vsa.Progress("Uploading to s3://b/", 10 * 10 ** 9, clock, interval=30)
        for _ in range(100):                 # 100 MB a second for 100 seconds
            clock.t += 1
            progress.add(100 * 10 ** 6)
        unknown = vsa.Progress("Downloading snapshot", None, clock, interval=30)
        clock.t += 31
        unknown.add(5 * 10 ** 9)
    finally:
        vsa.LOG.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4, lines             # at 30, 60, 90 s, and the download
    assert "Uploading to s3://b/: 3.0 GB of 10.0 GB (30%), 100.0 MB/s, about 1m10s left" in lines[0]
    assert "Downloading snapshot: 5.0 GB so far" in lines[3]
