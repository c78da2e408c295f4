"""The real Agent driven in process by a fake clock, against a loopback fake
Vault: hours of schedule in milliseconds. Stdlib only; Python 3.6+.

For the unit tests of the schedule, the leader poll, reloads and stops
(test_schedule.py, test_leader_poll.py, test_reload.py, ...):

* ``START``: the fake clock's ``monotonic()`` when the agent starts;
  ``NOW``: its wall clock then (2026-01-01T00:16:40Z); ``fake_clock()``;
* ``LEADER``, ``LOGIN``, ``RENEW``, ``LOOKUP``, ``SNAPSHOT``: Vault paths;
* ``plant(directory, when)``: a valid snapshot named as taken at ``when``;
  ``gaps(times)``: the intervals between successive times;
* ``ScriptedVault(clock, leader=..., redirect=..., on_leader=...)``: a
  FakeVault whose ``is_self`` follows the fake clock and which notes every
  request in ``timeline`` as (seconds since START, method, path);
* ``StandbyVault``: a VaultClient stand-in (the Agent's ``vault_factory``)
  that is never the leader and notes each ``is_leader()`` in the class's
  ``calls`` as (monotonic time, frequency);
* ``write_config(tmp_path, doc)``: ``tmp_path/c.json`` (mode 0600);
* ``agent_config(tmp_path, vault, **config)``: the daemon's usual config
  (AppRole ``r``/``s``, hourly, no leader poll, local storage in
  ``tmp_path/snaps``) with ``config`` applied (a value None removes a key);
* ``run_daemon(tmp_path, vault, clock, signals, **config)``: the daemon
  loop until ``signals`` stops it: (agent, log text at INFO);
* ``one_cycle(tmp_path, vault, clock, **config)``: one cycle, no schedule:
  (CycleResult, log text at INFO).

    clock = fake_clock()
    with ScriptedVault(clock, lambda t: t >= 100) as vault:
        agent, log = run_daemon(tmp_path, vault, clock,
                                FakeSignals(clock, until=START + 600))
        taken = vault.snapshot_times()
"""

import datetime
import json
import logging
import os

import vault_snapshot_agent as vsa
from support.archives import write_archive
from support.fake_endpoints import FakeVault
from support.harness import FakeClock, FakeSignals, captured_log, overridden

__all__ = ["START", "NOW", "LEADER", "LOGIN", "RENEW", "LOOKUP", "SNAPSHOT", "fake_clock",
           "gaps", "plant", "StandbyVault", "ScriptedVault", "write_config", "agent_config",
           "run_daemon", "one_cycle"]

START = 1000.0              # the fake clock's monotonic() when the agent starts
NOW = datetime.datetime(2026, 1, 1, 0, 16, 40, tzinfo=vsa.UTC)
LEADER = "/v1/sys/leader"
LOGIN = "/v1/auth/approle/login"
RENEW = "/v1/auth/token/renew-self"
LOOKUP = "/v1/auth/token/lookup-self"
SNAPSHOT = "/v1/sys/storage/raft/snapshot"


def fake_clock():
    """2026-01-01T00:16:40Z (``NOW``), monotonic() ``START``."""
    return FakeClock(NOW, START)


class StandbyVault:
    """Never the leader; every ``is_leader()`` is noted in ``StandbyVault.calls``
    (a test resets it) as (the clock's monotonic time, the config's frequency)."""
    calls = []

    def __init__(self, cfg, clock=None, signals=None, env=None):     # as VaultClient
        self.cfg, self.clock = cfg, clock

    def is_leader(self):
        StandbyVault.calls.append((self.clock.monotonic(), self.cfg.frequency))
        return False


def gaps(times):
    """The intervals between successive ``times``, rounded to the millisecond."""
    return [round(b - a, 3) for a, b in zip(times, times[1:])]


def plant(directory, when):
    """A valid snapshot named as taken at ``when`` in ``directory`` (created
    0700 if missing); its name."""
    directory = str(directory)
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o700)
    name = vsa.snapshot_name(when)
    write_archive(os.path.join(directory, name), state=b"p" * 4096)
    return name


class ScriptedVault(FakeVault):
    """FakeVault whose ``sys/leader`` says ``is_self`` when ``leader(t)`` is
    true, ``t`` being the fake clock's seconds since START; every request is
    noted in ``timeline`` as (t, method, path). Logins need role_id ``r``
    and secret_id ``s``.

    ``on_leader(t)``, if given, runs on each sys/leader request before it
    is answered; with ``redirect`` the snapshot GET is answered 307 to
    another node; while ``sealed(t)`` (an attribute a test may set) every
    request gets 503."""

    def __init__(self, clock, leader=lambda t: True, redirect=False, on_leader=None):
        FakeVault.__init__(self, role_id="r", secret_id="s")
        self.clock, self.leader, self.redirect = clock, leader, redirect
        self.on_leader = on_leader
        self.timeline = []

    sealed = staticmethod(lambda t: False)

    def respond(self, request):
        # The agent is blocked on this request: reading its clock is safe.
        t = self.clock.monotonic() - START
        path = request.path.split("?", 1)[0]
        with self.lock:
            self.timeline.append((t, request.method, path))
        if self.sealed(t):
            return 503, {}, {"errors": ["Vault is sealed"]}
        if path == LEADER:
            if self.on_leader is not None:
                self.on_leader(t)
            is_self = bool(self.leader(t))
            return 200, {}, {"ha_enabled": True, "is_self": is_self,
                             "leader_address": self.url if is_self else "http://127.0.0.1:9",
                             "leader_cluster_address": ""}
        if path == SNAPSHOT and request.method == "GET" and self.redirect:
            return 307, {"Location": "http://127.0.0.2:8200" + SNAPSHOT}, b""
        return FakeVault.respond(self, request)

    def times(self, path, method=None):
        """When ``path`` was requested (by ``method``, if given)."""
        with self.lock:
            return [t for t, m, p in self.timeline if p == path and method in (None, m)]

    def snapshot_times(self):
        return self.times(SNAPSHOT, "GET")


def write_config(tmp_path, doc):
    """``doc`` as ``tmp_path/c.json`` (mode 0600); its path."""
    path = os.path.join(str(tmp_path), "c.json")
    with open(path, "w") as handle:
        json.dump(doc, handle)
    os.chmod(path, 0o600)
    return path


def agent_config(tmp_path, vault, **config):
    """The config a simulated daemon runs with: AppRole ``r``/``s`` at
    ``vault``, frequency 1h, leader_poll 0s, local storage in
    ``tmp_path/snaps``, then ``config`` (a value None removes a key)."""
    doc = {"addr": vault.url, "role_id": "r", "secret_id": "s", "frequency": "1h",
           "leader_poll": "0s", "local_storage": {"path": str(tmp_path / "snaps")}}
    return overridden(doc, config)


def run_daemon(tmp_path, vault, clock, signals, rand=None, on_agent=None, **config):
    """The daemon loop (``Agent.run_forever``) against ``vault`` with
    ``agent_config(tmp_path, vault, **config)`` until ``signals`` stops it;
    ``on_agent(agent)`` runs before the loop starts. Returns (agent, log)."""
    path = write_config(tmp_path, agent_config(tmp_path, vault, **config))
    kwargs = {"rand": rand} if rand is not None else {}
    with captured_log(logging.INFO) as stream:
        agent = vsa.Agent(lambda runtime: vsa.load_all(path, runtime), clock, signals, env={},
                          **kwargs)
        if on_agent is not None:
            on_agent(agent)
        agent.run_forever()
    return agent, stream.getvalue()


def one_cycle(tmp_path, vault, clock, **config):
    """One cycle of an Agent (``run_cycle``, no schedule) against ``vault``
    with local storage in ``tmp_path/snaps`` and ``config`` applied (a value
    None removes a key): (CycleResult, log text)."""
    doc = overridden({"addr": vault.url, "role_id": "r", "secret_id": "s",
                      "local_storage": {"path": str(tmp_path / "snaps")}}, config)
    path = write_config(tmp_path, doc)
    with captured_log(logging.INFO) as stream:
        agent = vsa.Agent(lambda runtime: vsa.load_all(path, runtime), clock,
                          FakeSignals(clock), env={})
        result = agent.run_cycle()
    return result, stream.getvalue()


def names_in(directory, prefix):
    """The snapshot names of ``prefix`` in ``directory``, oldest first."""
    if not os.path.isdir(str(directory)):
        return []
    return sorted(n for n in os.listdir(str(directory)) if vsa.parse_snapshot_name(n, prefix))


def plant_named(directory, name):
    """A valid snapshot archive named ``name`` in ``directory``; returns the name."""
    from support.archives import write_archive
    if not os.path.isdir(str(directory)):
        os.makedirs(str(directory), 0o700)
    write_archive(os.path.join(str(directory), name), state=b"p" * 4096)
    return name


def load_doc(tmp_path, doc):
    """The Config of ``doc`` (AppRole r/s added) as load_config reads it."""
    full = {"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s"}
    full.update(doc)
    return vsa.load_config(write_config(tmp_path, full), {"AWS_CONFIG_FILE": str(tmp_path / "none")})
