"""contrib/: what the systemd units and the Dockerfile must hold, read with
plain parsers so the checks run under every Python (tests/test_contrib.py
adds the YAML manifests and the external tools where they are installed).

The units stop restarting on a config error, keep the sandbox that
``systemd-analyze security`` asks for while leaving the agent its config and
snapshot directory, and ship the network allow-list ready to fill in; the
image runs the agent under an init that reaps orphans."""

import json
import os
import re

import pytest

import vault_snapshot_agent as vsa
from support.harness import parse_dockerfile, parse_unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = [os.path.join(ROOT, "contrib", "vault-snapshot-agent.service"),
         os.path.join(ROOT, "contrib", "deploy", "vault-snapshot-agent-credentials.service")]
DOCKERFILE = os.path.join(ROOT, "contrib", "deploy", "Dockerfile")

SANDBOX = {"PrivateUsers": "yes", "ProtectProc": "invisible", "ProcSubset": "pid",
           "RemoveIPC": "yes", "PrivateMounts": "yes", "ProtectSystem": "strict",
           "NoNewPrivileges": "yes", "UMask": "0077"}


def service(path):
    return [(key, value) for section, key, value in parse_unit(path) if section == "Service"]


@pytest.mark.parametrize("path", UNITS, ids=os.path.basename)
def test_a_config_error_is_not_restarted(path):
    items = service(path)
    assert ("Restart", "on-failure") in items
    assert ("RestartPreventExitStatus", str(vsa.EXIT_USAGE)) in items
    assert vsa.EXIT_USAGE == 2


@pytest.mark.parametrize("path", UNITS, ids=os.path.basename)
def test_the_sandbox_hardening_is_on_and_leaves_the_agent_its_paths(path):
    items = dict(service(path))
    missing = dict((k, v) for k, v in SANDBOX.items() if items.get(k) != v)
    assert missing == {}, "not set as expected: %r" % missing
    # What the agent writes: the snapshot directory (and its bytecode cache).
    assert "/var/backups/vault" in items["ReadWritePaths"].split()
    assert items["CacheDirectory"] == "vault-snapshot-agent"
    # What it reads: the config under /etc (read-only, not hidden).
    assert "/etc/vault.d/snapshot.json" in items["ExecStart"]
    for key in ("InaccessiblePaths", "TemporaryFileSystem"):
        assert "/etc" not in items.get(key, ""), key


@pytest.mark.parametrize("path", UNITS, ids=os.path.basename)
def test_the_network_allow_list_ships_commented_and_uncomments_cleanly(path):
    """Off by default (cloud storage has no fixed addresses); every commented
    line is a valid setting once its # goes (systemd takes no comment after
    a value), starting with deny-all and localhost."""
    assert not [k for k, _ in service(path) if k.startswith("IPAddress")]
    with open(path) as handle:
        lines = [line.rstrip("\n") for line in handle if line.startswith("#IPAddress")]
    assert lines[:2] == ["#IPAddressDeny=any", "#IPAddressAllow=localhost"]
    for line in lines:
        assert re.match(r"^#IPAddress(Allow|Deny)=[0-9a-f.:/]+$|^#IPAddress(Allow|Deny)="
                        r"(any|localhost|link-local)$", line), line


def test_the_image_runs_the_agent_under_an_init():
    instructions = parse_dockerfile(DOCKERFILE)
    entry = [json.loads(args) for name, args in instructions if name == "ENTRYPOINT"]
    assert len(entry) == 1
    init, rest = entry[0][:entry[0].index("--")], entry[0][entry[0].index("--") + 1:]
    assert init[0] == "/usr/bin/tini", "PID 1 must reap orphans (credential_process)"
    assert "-s" in init, "subreaper, for docker run --init and shared PID namespaces"
    assert rest == ["python3", "-u", "/app/vault_snapshot_agent.py"]
    runs = " ".join(args for name, args in instructions if name == "RUN")
    assert re.search(r"apt-get install [^&]*\btini\b", runs)
    assert "rm -rf /var/lib/apt/lists" in runs
    with open(DOCKERFILE) as handle:
        text = handle.read()
    assert "needs no init" not in text and "credential_process" in text
