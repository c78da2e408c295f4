"""SIGHUP with a config file no check foresaw: the daemon never dies, it
logs one ERROR line per reload and keeps the running config; a good file
then reloads and SIGTERM still exits 0.

The same files at start are exit 2 with one ERROR line: bad_configs.py
cases metrics-address-superscript-port, file-lone-surrogate-path and
file-unknown-key-nested-deep (test_faults.py runs them)."""

import json
import os
import signal
import sys

from fake_endpoints import FakeVault
from harness import read, reaped, start_agent, stop, wait_for

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
    errors = [l for l in log.splitlines() if " ERROR " in l]
    assert len(errors) == refused and all(FAILED in l for l in errors), log
    assert "Traceback" not in log
    starting = [l for l in log.splitlines() if " starting: " in l][0].split(" starting: ")[1]
    assert outcomes(log)[-1].endswith(": " + starting), log     # the good file: the same config
