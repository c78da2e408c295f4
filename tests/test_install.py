# SPDX-License-Identifier: MIT
"""The agent as operators install it (contrib/ systemd units): a module run
with ``python3 -m`` from cached bytecode; and what a start imports."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from support.harness import parse_unit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
AGENT = os.path.join(REPO, "vault_snapshot_agent.py")
UNITS = [os.path.join(REPO, "contrib", "vault-snapshot-agent.service"),
         os.path.join(REPO, "contrib", "deploy", "vault-snapshot-agent-credentials.service")]


@pytest.mark.slow
@pytest.mark.parametrize("path", UNITS, ids=os.path.basename)
def test_unit_runs_the_installed_module_from_cached_bytecode(path, tmp_path):
    """Sections "Status, metrics and systemd" and "Command line": installed as
    the unit's header says and started with
    the unit's Environment= and ExecStart= (paths moved under tmp_path), the
    agent runs; on Python >= 3.8 it writes its bytecode into the unit's
    CacheDirectory= and the next start reads it back instead of compiling."""
    items = [(k, v) for s, k, v in parse_unit(path) if s == "Service"]
    lib, cache = str(tmp_path / "lib"), str(tmp_path / "cache")
    def moved(text):
        return text.replace("/usr/local/lib/vault-snapshot-agent", lib).replace(
            "/var/cache/vault-snapshot-agent", cache)
    env = dict((k, v) for k, v in os.environ.items() if not k.startswith("PYTHON"))
    for key, value in items:
        if key == "Environment":
            name, _, val = value.partition("=")
            env[name] = moved(val)
    assert ("CacheDirectory", "vault-snapshot-agent") in items
    os.makedirs(lib)
    os.makedirs(cache, mode=0o700)
    shutil.copy(AGENT, lib)
    subprocess.check_call([sys.executable, "-m", "compileall", "-q", lib])
    config = tmp_path / "snapshot.json"
    config.write_text(json.dumps({"addr": "http://127.0.0.1:1", "token": "t",
                                  "local_storage": {"path": str(tmp_path / "snaps")}}))
    os.chmod(str(config), 0o600)
    argv = moved(dict(items)["ExecStart"]).split()
    assert argv[:3] == ["/usr/bin/python3", "-m", "vault_snapshot_agent"], argv
    argv = [sys.executable] + argv[1:argv.index("--config")] + ["--config", str(config),
                                                                 "--check-config"]
    cached = []
    for _ in range(2):
        proc = subprocess.run(argv, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["local_storage"]["path"] == str(tmp_path / "snaps")
        cached.append(sorted((os.path.join(d, f), os.stat(os.path.join(d, f)).st_mtime_ns)
                             for d, _, files in os.walk(cache) for f in files))
    if sys.version_info >= (3, 8):
        # the prefix holds every module's bytecode, the stdlib's too
        mine = [p for p, _ in cached[0] if os.path.basename(p).startswith("vault_snapshot_agent.")
                and p.startswith(cache + lib)]
        assert len(mine) == 1 and mine[0].endswith(".pyc"), cached[0]
        assert cached[1] == cached[0]           # the second start compiled nothing
    else:           # 3.6, 3.7: the install-time bytecode next to the module
        assert cached == [[], []]
        assert os.listdir(os.path.join(lib, "__pycache__"))


LAZY = ("http.client", "ssl", "xml.etree.ElementTree", "concurrent.futures", "configparser",
        "email.utils")
PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import vault_snapshot_agent
code = vault_snapshot_agent.main(sys.argv[2:])
print(json.dumps(sorted(set(%r) & set(sys.modules))))
""" % (LAZY,)


def run_probe(*args):
    proc = subprocess.run([sys.executable, "-I", "-c", PROBE, REPO] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    return proc.stdout.strip().splitlines(), proc.stderr


def test_version_imports_nothing_it_does_not_need():
    """Sections "Constants" and "Command line": `--version` loads none of the heavy modules (they are
    imported where used), so it starts in little more than the interpreter's
    own time (contrib/bench/startup.py)."""
    out, err = run_probe("--version")
    assert out[0].startswith("vault-snapshot-agent "), err
    assert json.loads(out[-1]) == []


def test_check_config_of_a_local_http_setup_imports_no_tls_or_xml(tmp_path):
    """Section "Config": checking a config that needs neither TLS nor a cloud store
    loads neither ssl nor an XML parser."""
    config = tmp_path / "snapshot.json"
    config.write_text(json.dumps({"addr": "http://127.0.0.1:1", "token": "t",
                                  "local_storage": {"path": str(tmp_path / "snaps")}}))
    os.chmod(str(config), 0o600)
    out, err = run_probe("-c", str(config), "--check-config")
    assert json.loads("\n".join(out[:-1]))["addr"] == "http://127.0.0.1:1", err
    assert set(json.loads(out[-1])) & {"ssl", "http.client", "xml.etree.ElementTree"} == set()
