"""SIGHUP with a config file no check foresaw: the daemon never dies, it
logs one ERROR line per reload and keeps the running config; a good file
then reloads and SIGTERM still exits 0.

The same files at start are exit 2 with one ERROR line: bad_configs.py
cases metrics-address-superscript-port, file-lone-surrogate-path and
file-unknown-key-nested-deep (test_config_corpus.py runs them).

Files read again while the daemon runs: a config (or ``secret_id_file``)
replaced by a FIFO neither hangs the reload (or the login) nor outlives a
stop; a hundred reloads leave no request-deadline thread behind."""

import json
import os
import signal
import sys
import threading

import vault_snapshot_agent as vsa
from support.agent_sim import START, ScriptedVault, fake_clock, run_daemon
from support.fake_endpoints import FakeVault
from support.fake_s3 import FakeS3
from support.harness import FakeSignals, read, reaped, start_agent, stop, wait_for

FAILED = "Config reload failed, keeping the running config:"
RELOADED = "Config reloaded"


class StandbyVault(FakeVault):
    """A Vault whose sys/leader says another node leads: the agent idles."""

    def respond(self, request):
        if request.path.split("?", 1)[0] == "/v1/sys/leader":
            return 200, {}, {"ha_enabled": True, "is_self": False,
                             "leader_address": "http://127.0.0.1:1"}
        return FakeVault.respond(self, request)


def write(path, data):
    with open(str(path), "wb") as handle:
        handle.write(data)
    os.chmod(str(path), 0o600)


def bad_files(good):
    """(what, bytes, whether this Python refuses it) for each broken file."""
    deep = json.dumps(good)[:-1].encode() + b', "x": ' + b'{"a": ' * 1200 + b"1" \
        + b"}" * 1200 + b"}"
    cases = [
        # "\u00b2".isdigit() is true, int() of it raised ValueError
        ("superscript port", json.dumps(dict(good, metrics_address="127.0.0.1:\u00b2")).encode(),
         True),
        # a lone surrogate: json accepts it, the file system call raised UnicodeEncodeError
        ("lone surrogate", json.dumps(dict(good, local_storage={"path": good["local_storage"]
                                                                ["path"] + "/\ud800x"})).encode(),
         True),
    ]
    # 1,200 nested objects: json before 3.12 refuses them (nested too deeply);
    # 3.12+ parses them and the unknown key is warned about and ignored.
    cases.append(("unknown key nested 1200 deep", deep, sys.version_info < (3, 12)))
    return cases


def outcomes(log):
    return [line for line in log.splitlines() if FAILED in line or RELOADED in line]


def reload_with(proc, config, data, logfile):
    """Write ``data`` to the config, SIGHUP, and return the reload's log line
    (None if the agent died instead)."""
    before = len(outcomes(read(logfile)))
    write(config, data)
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: proc.poll() is not None or len(outcomes(read(logfile))) > before, 10,
             "the reload's outcome in the log")
    if proc.poll() is not None:
        return None
    return outcomes(read(logfile))[before]


def test_sighup_with_broken_configs_keeps_the_daemon_and_its_config(tmp_path):
    with StandbyVault(token="s.unused", role_id="r", secret_id="s") as vault:
        good = {"addr": vault.url, "role_id": "r", "secret_id": "s",
                "local_storage": {"path": str(tmp_path / "snaps")}}
        config, logfile = tmp_path / "c.json", tmp_path / "agent.log"
        write(config, json.dumps(good).encode())
        with reaped(start_agent(str(config), logfile)) as proc:
            wait_for(lambda: "Not running on leader node" in read(logfile), 10, "a standby")
            refused = 0
            for what, data, bad in bad_files(good):
                line = reload_with(proc, config, data, logfile)
                assert line is not None, "%s killed the daemon (exit %s):\n%s" % (
                    what, proc.returncode, read(logfile))
                assert (FAILED in line) == bad, "%s: %s" % (what, line)
                refused += bad
            line = reload_with(proc, config, json.dumps(good).encode(), logfile)
            assert line is not None and RELOADED in line, read(logfile)
            code = stop(proc)
    log = read(logfile)
    assert code == 0, log
    errors = [ln for ln in log.splitlines() if " ERROR " in ln]
    assert len(errors) == refused and all(FAILED in ln for ln in errors), log
    assert "Traceback" not in log
    starting = [ln for ln in log.splitlines() if " starting: " in ln][0].split(" starting: ")[1]
    assert outcomes(log)[-1].endswith(": " + starting), log     # the good file: the same config


# =============================================================================
# files replaced by a FIFO
# =============================================================================


def test_a_reload_from_a_fifo_config_neither_hangs_nor_ignores_sigterm(tmp_path):
    # The config path now names a FIFO nobody writes to (a mistake, or a
    # hostile local user where the directory allows it). open() blocked
    # until a writer appeared, and PEP 475 restarts it after SIGTERM's
    # handler: the daemon hung in the reload and a stop was ignored for good.
    with StandbyVault(role_id="r", secret_id="s") as vault:
        config, logfile = tmp_path / "c.json", tmp_path / "agent.log"
        write(config, json.dumps({"addr": vault.url, "role_id": "r", "secret_id": "s",
                                  "local_storage": {"path": str(tmp_path / "snaps")}}).encode())
        with reaped(start_agent(str(config), logfile)) as proc:
            wait_for(lambda: "Not running on leader node" in read(logfile), 10, "a standby")
            os.unlink(str(config))
            os.mkfifo(str(config), 0o600)
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "Config reload failed" in read(logfile) or proc.poll() is not None,
                     3, "the reload to give up on the FIFO (it hung in open())")
            code = stop(proc, timeout=3)
    assert code == 0, read(logfile)


def test_a_secret_id_file_replaced_by_a_fifo_does_not_hang_the_login_past_a_stop(tmp_path):
    # secret_id_file is checked to be a file at load, then re-read at each
    # login with a blocking open(): replaced by a FIFO (nobody writing), the
    # cycle hung in open() and a stop request never ended it.
    secret = tmp_path / "secret_id"
    write(secret, b"s")
    clock = fake_clock()
    signals = FakeSignals(clock)
    with FakeVault(role_id="r", secret_id="s") as vault:
        doc = {"addr": vault.url, "role_id": "r", "secret_id_file": str(secret),
               "local_storage": {"path": str(tmp_path / "snaps")}}
        path = tmp_path / "c.json"
        write(path, json.dumps(doc).encode())
        agent = vsa.Agent(lambda runtime: vsa.load_all(str(path), runtime), clock, signals,
                          env={})
        os.unlink(str(secret))
        os.mkfifo(str(secret), 0o600)
        results = []
        worker = threading.Thread(target=lambda: results.append(agent.run_cycle()))
        worker.daemon = True
        worker.start()
        worker.join(0.5)                 # a fixed agent fails the cycle at once
        signals.request_stop()
        worker.join(3.0)
        hung = worker.is_alive()
        if hung:                         # let the blocked open() return, then end it
            fd = os.open(str(secret), os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
            worker.join(5.0)
    assert not hung, "run_cycle still blocked in open() of the FIFO 3 s after the stop"


# =============================================================================
# many reloads
# =============================================================================


def test_reloads_do_not_leave_request_deadline_threads_behind(tmp_path):
    # Each reload builds a new VaultClient (and storages), each Http its own
    # Watchdog, whose daemon thread never ended: a daemon reloaded every few
    # minutes (certificate rotation, config management) piled them up.
    def watchdogs():
        return sum(1 for thread in threading.enumerate() if thread.name == "http-deadlines")
    clock = fake_clock()
    before = watchdogs()
    events = [(START + 60 * i + 1, "reload_requested") for i in range(1, 101)]
    signals = FakeSignals(clock, until=START + 101 * 60, events=events)
    with ScriptedVault(clock) as vault, FakeS3() as s3:
        _, log = run_daemon(tmp_path, vault, clock, signals, leader_poll="30s", local_storage=None,
                            temp_dir=str(tmp_path), aws_storage=s3.storage_block())
    assert log.count(RELOADED) == 100, log[-2000:]
    # Before the fix: 103 more "http-deadlines" threads after 100 reloads.
    assert watchdogs() - before <= 5, watchdogs() - before
