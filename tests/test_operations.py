"""Sections "Status, metrics and systemd" and "Agent": the schedule that survives restarts, per-storage
frequencies, the status file, Prometheus metrics and systemd notifications,
against the real cluster."""

import datetime
import io
import json
import os
import re
import signal
import socket
import time
import urllib.request

import pytest

import vault_snapshot_agent as vsa
from support.harness import (FakeClock, FakeSignals, free_port, read, snapshots, start_agent, stop,
                             wait_for)


def write_config(tmp_path, addr, approle, **extra):
    config = {"addr": addr, "role_id": approle.role_id, "secret_id": approle.secret_id,
              "local_storage": {"path": str(tmp_path / "snaps")}}
    config.update(extra)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    return str(path)


PROM_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? '
                       r'-?[0-9.e+-]+$')


def parse_prometheus(text):
    """Samples of a Prometheus text exposition, checking every line's syntax."""
    samples, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("gauge", "counter"), line
            typed.add(name)
            continue
        assert PROM_LINE.match(line), "not Prometheus text: %r" % line
        key, value = line.rsplit(" ", 1)
        assert key.split("{")[0] in typed, "sample before its TYPE: %r" % line
        samples[key] = float(value)
    return samples


# -- status file -----------------------------------------------------------------

def test_status_file_after_success_and_after_failure(bao_cluster, approle, tmp_path):
    status = tmp_path / "status.json"
    config = write_config(tmp_path, bao_cluster.leader().addr, approle, status_file=str(status),
                          metrics_textfile=str(tmp_path / "agent.prom"))
    assert vsa.main(["-c", config, "--once"], stream=io.StringIO()) == 0
    data = json.loads(read(status))
    assert data["last_outcome"] == "stored" and data["is_leader"] is True
    name = snapshots(tmp_path / "snaps")[0]
    info = vsa.verify_file(str(tmp_path / "snaps" / name))
    assert data["last_snapshot"]["name"] == name
    assert data["last_snapshot"]["sha256"] == info.sha256
    assert data["last_snapshot"]["size"] == info.size
    assert data["last_snapshot"]["raft_index"] == info.index
    local = data["storages"]["local"]
    assert local["location"] == "local:%s" % (tmp_path / "snaps") and local["type"] == "local"
    assert local["successes"] == 1 and local["last_error"] is None
    samples = parse_prometheus(read(tmp_path / "agent.prom"))
    assert samples["vault_snapshot_is_leader"] == 1

    os.chmod(str(tmp_path / "snaps"), 0o500)     # the storage now fails (unless root)
    config = write_config(tmp_path, bao_cluster.leader().addr, approle, status_file=str(status),
                          local_storage={"path": str(tmp_path / "snaps" / "sub" / "deeper")}) \
        if os.geteuid() == 0 else config
    if os.geteuid() == 0:
        (tmp_path / "snaps" / "sub").write_text("a file where a directory is needed")
    code = vsa.main(["-c", config, "--once"], stream=io.StringIO())
    os.chmod(str(tmp_path / "snaps"), 0o700)
    assert code == 1
    data = json.loads(read(status))
    assert data["last_outcome"] == "failed" and data["last_error"]
    assert data["last_snapshot"] is None or data["last_snapshot"]["name"] == name


def test_status_file_directory_must_exist(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"role_id": "r", "secret_id": "s", "local_storage": {"path": "/x"},
                                  "status_file": "/nonexistent/dir/status.json"}))
    stream = io.StringIO()
    assert vsa.main(["-c", str(config), "--check-config"], stream=stream) == 2
    assert "status_file" in stream.getvalue()


# -- the daemon: metrics, restart, systemd --------------------------------------------

def test_metrics_endpoint_is_prometheus_text(bao_cluster, approle, tmp_path):
    port = free_port()
    config = write_config(tmp_path, bao_cluster.leader().addr, approle,
                          metrics_address="127.0.0.1:%d" % port)
    proc = start_agent(config, tmp_path / "log")
    try:
        wait_for(lambda: snapshots(tmp_path / "snaps"), 30, "a snapshot")
        time.sleep(0.5)
        text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5).read().decode()
    finally:
        assert stop(proc) == 0
    samples = parse_prometheus(text)
    storage = 'storage="local:%s",type="local",name="local"' % (tmp_path / "snaps")
    assert samples["vault_snapshot_is_leader"] == 1
    assert samples["vault_snapshot_storage_successes_total{%s}" % storage] == 1
    assert samples["vault_snapshot_storage_failures_total{%s}" % storage] == 0
    assert abs(samples["vault_snapshot_last_success_timestamp_seconds{%s}" % storage] - time.time()) < 60
    assert samples["vault_snapshot_frequency_seconds"] == 3600
    assert samples['vault_snapshot_cycles_total{outcome="stored"}'] == 1
    print(text)


def test_a_restart_does_not_snapshot_early(bao_cluster, approle, tmp_path):
    snapdir = tmp_path / "snaps"
    snapdir.mkdir()
    recent = vsa.snapshot_name(datetime.datetime.now(vsa.UTC) - datetime.timedelta(minutes=10))
    (snapdir / recent).write_bytes(b"taken before the restart")
    config = write_config(tmp_path, bao_cluster.leader().addr, approle, frequency="1h")
    proc = start_agent(config, tmp_path / "log")
    try:
        wait_for(lambda: "next one due" in read(tmp_path / "log"), 20, "the plan")
        time.sleep(2)
        assert snapshots(snapdir) == [recent]
    finally:
        assert stop(proc) == 0
    assert re.search(r"next one due 20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ", read(tmp_path / "log"))


def test_a_long_outage_causes_one_catch_up_not_many(bao_cluster, approle, tmp_path):
    snapdir = tmp_path / "snaps"
    snapdir.mkdir()
    old = vsa.snapshot_name(datetime.datetime.now(vsa.UTC) - datetime.timedelta(days=3))
    (snapdir / old).write_bytes(b"old")
    config = write_config(tmp_path, bao_cluster.leader().addr, approle, frequency="1h")
    proc = start_agent(config, tmp_path / "log")
    try:
        wait_for(lambda: len(snapshots(snapdir)) == 2, 30, "the catch-up snapshot")
        time.sleep(2)
        assert len(snapshots(snapdir)) == 2
    finally:
        assert stop(proc) == 0


def test_sd_notify_ready_status_watchdog_reloading_stopping(bao_cluster, approle, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    config = write_config(tmp_path, bao_cluster.leader().addr, approle)
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
    proc = start_agent(config, tmp_path / "log", env=env)
    messages = []

    def drain(until, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                pass
            if any(until in m for m in messages):
                return
        raise AssertionError("no %s in %r" % (until, messages))
    try:
        drain("READY=1")
        drain("last cycle stored")
        count = sum("WATCHDOG=1" in m for m in messages)
        time.sleep(1.0)
        drain("WATCHDOG=1")
        assert sum("WATCHDOG=1" in m for m in messages) > count
        proc.send_signal(signal.SIGHUP)
        drain("RELOADING=1")
        assert re.search(r"MONOTONIC_USEC=\d+", [m for m in messages if "RELOADING" in m][0])
        index = len(messages)
        drain("READY=1")
        assert any("READY=1" in m for m in messages[index - 1:])
    finally:
        assert stop(proc) == 0
    drain("STOPPING=1")
    sock.close()


# -- per-storage frequency over a simulated day ------------------------------------------

@pytest.mark.slow
def test_per_storage_frequencies_over_a_simulated_day(bao_cluster, approle, tmp_path):
    config = write_config(tmp_path, bao_cluster.leader().addr, approle, frequency="24h",
                          local_storage=[{"path": str(tmp_path / "hourly"), "frequency": "1h",
                                          "retain_days": 1},
                                         {"path": str(tmp_path / "daily")}])     # the global 24h
    raw = json.loads(read(config))
    # Wall time that only moves when the agent waits, for one day less a
    # second: the stop then always comes before the cycle due at 24:00, however
    # the jittered leader polls between cycles happen to end.
    clock = FakeClock(datetime.datetime(2026, 11, 27, 0, 0, 0, tzinfo=vsa.UTC))
    signals = FakeSignals(clock, until=clock.monotonic() + 86400 - 1)

    def loader(runtime):
        cfg, storages = vsa.load_all(config, runtime)
        assert [s.frequency for s in storages] == [3600, 86400] and cfg.frequency == 86400
        return cfg, storages
    agent = vsa.Agent(loader, clock=clock, signals=signals)
    agent.run_forever()
    hourly, daily = snapshots(tmp_path / "hourly"), snapshots(tmp_path / "daily")
    assert len(hourly) == 24, hourly
    assert len(daily) == 1
    times = [vsa.parse_snapshot_name(n) for n in hourly]
    assert all(b - a == datetime.timedelta(hours=1) for a, b in zip(times, times[1:]))
    assert raw["local_storage"][0]["retain_days"] == 1
