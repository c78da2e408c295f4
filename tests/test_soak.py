"""Soak: 500 real snapshot cycles in one process against the real cluster
(frequency is irrelevant here: cycles run back to back). RSS and open file
descriptors must stay flat; the samples are printed for the closing note."""

import io
import json
import os

import pytest

import vault_snapshot_agent as vsa

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
