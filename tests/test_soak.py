"""Soak: 500 real snapshot cycles in one process against the real cluster
(frequency is irrelevant here: cycles run back to back). RSS and open file
descriptors must stay flat; the samples are printed for the closing note.

Also a daemon taking a snapshot every second for a minute (its RSS and open
file descriptors sampled from /proc), and 200 in-process cycles (open file
descriptors)."""

import io
import json
import os
import time

import pytest

import vault_snapshot_agent as vsa
from support.faults_support import hidden, verify_all, write_config
from support.harness import error_lines, read, start_agent, stop, wait_for

CYCLES = 500


def vm_rss_kb():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


@pytest.mark.slow
def test_500_cycles_keep_rss_and_fds_flat(bao_cluster, approle, tmp_path, capsys):
    snapdir = tmp_path / "snaps"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({
        "addr": bao_cluster.leader().addr, "role_id": approle.role_id,
        "secret_id": approle.secret_id, "retain": 3, "frequency": "1s",
        "status_file": str(tmp_path / "status.json"),
        "local_storage": {"path": str(snapdir)}}))
    stream = io.StringIO()
    handler = vsa._configure_logging(30, "text", stream)     # warnings and errors only
    agent = vsa.Agent(lambda runtime: vsa.load_all(str(config), runtime))
    samples = []
    try:
        for cycle in range(1, CYCLES + 1):
            result = agent.run_cycle()
            agent.report()
            assert result.outcome == "stored", "cycle %d: %s %s" % (cycle, result.outcome, result.errors)
            if cycle % 50 == 0:
                samples.append((cycle, vm_rss_kb(), len(os.listdir("/proc/self/fd"))))
    finally:
        agent.signals.close()
        vsa.LOG.removeHandler(handler)
    with capsys.disabled():
        print("\nsoak: cycle, VmRSS kB, open fds: %s" % samples)
    rss = [s[1] for s in samples]
    fds = [s[2] for s in samples]
    # After the first 50 cycles (caches, first TLS/HTTP use), memory and fds stay put.
    assert max(rss) - rss[0] < 4 * 1024, "RSS grew: %s" % samples
    assert max(fds) - min(fds) <= 2, "open fds changed: %s" % samples
    assert len(os.listdir(str(snapdir))) == 3
    assert json.loads((tmp_path / "status.json").read_text())["cycles"]["stored"] == CYCLES
    assert stream.getvalue() == ""


# =============================================================================
# the daemon, and 200 in-process cycles: memory and file descriptors stay flat
# =============================================================================


def _proc_rss_kb(pid):
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def _proc_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


@pytest.mark.usefixtures("isolated_env")
@pytest.mark.slow
def test_soak_daemon_every_second_keeps_rss_and_fds_flat(bao_cluster, approle, kv_data, tmp_path):
    snapdir = tmp_path / "snaps"
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir,
                          frequency="1s", retain=3)
    logfile = tmp_path / "agent.log"
    proc = start_agent(config, logfile)
    samples = []
    try:
        wait_for(lambda: "Cycle stored" in read(logfile), 30, "the first cycle")
        started = time.monotonic()
        for tick in range(1, 13):
            time.sleep(max(0.0, started + 5 * tick - time.monotonic()))
            assert proc.poll() is None, read(logfile)
            samples.append((round(time.monotonic() - started), _proc_rss_kb(proc.pid),
                            _proc_fds(proc.pid), read(logfile).count("Cycle stored")))
    finally:
        assert stop(proc) == 0
    print("soak samples (seconds, VmRSS kB, open fds, cycles stored):")
    for sample in samples:
        print("  %3ds  %7d kB  %3d fds  %3d cycles" % sample)
    log = read(logfile)
    assert "Traceback" not in log and error_lines(log) == [], log
    cycles = samples[-1][3]
    assert cycles >= 40, "only %d cycles in a minute at frequency 1s" % cycles
    warm = samples[2:]                              # the first 15 s are warm-up
    # A sample may land mid-cycle (a few MiB in flight) or between cycles, so
    # compare peaks: the late peak may not exceed the early one.
    growth = max(s[1] for s in warm[-4:]) - max(s[1] for s in warm[:4])
    assert growth < 5 * 1024, "RSS grew by %d kB over %d cycles: %s" % (growth, cycles, samples)
    fds = [s[2] for s in samples]
    assert max(fds) - min(fds) <= 2, "open fds changed: %s" % fds
    assert len(verify_all(snapdir)) == 3 and hidden(snapdir) == []


@pytest.mark.usefixtures("isolated_env")
def test_soak_200_in_process_cycles_keep_fds_flat(bao_cluster, approle, tmp_path):
    snapdir = tmp_path / "snaps"
    config = write_config(tmp_path / "c.json", bao_cluster.leader().addr, approle, snapdir,
                          retain=3)
    agent = vsa.Agent(lambda runtime: vsa.load_all(config, runtime))
    fds = []
    try:
        for cycle in range(200):
            result = agent.run_cycle()
            assert result.outcome == "stored", "cycle %d: %s %s" % (cycle, result.outcome, result.errors)
            if cycle % 20 == 19:
                fds.append(len(os.listdir("/proc/self/fd")))
    finally:
        agent.signals.close()
    print("open fds every 20 cycles: %s" % fds)
    assert max(fds) - min(fds) <= 2, "open fds changed over 200 cycles: %s" % fds
    assert len(verify_all(snapdir)) == 3 and hidden(snapdir) == []
