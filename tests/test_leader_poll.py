"""Issue 12: a new leader takes over within a minute (``leader_poll``).

A daemon polls the unauthenticated ``GET /v1/sys/leader`` every
``leader_poll`` (30 s plus up to 10% jitter; never when ``frequency`` is not
longer: each cycle checks anyway) from start-up on, so that:

* a node that becomes the leader takes the due (or overdue) snapshot within
  a poll, planning again from what the storages hold;
* ``is_leader`` in the status file and ``vault_snapshot_is_leader`` in the
  metrics follow each poll;
* a standby never logs in or renews a token just to poll.

Unit tests: the real Agent and VaultClient, driven by a FakeClock, against a
loopback fake Vault (fake_endpoints.FakeVault) whose ``is_self`` follows the
fake clock, so ten simulated minutes take milliseconds. End to end: three
daemons, one beside each node of the real 3-node cluster (each with its own
local disk), and the leader killed.
"""

import datetime
import json
import os
import re
import time

import pytest

import vault_snapshot_agent as vsa
from support.agent_sim import LEADER, LOGIN, RENEW, SNAPSHOT, START, ScriptedVault, fake_clock, gaps, \
    plant, run_daemon
from support.harness import FakeSignals, child_env, read, snapshots, start_agent, stop, wait_for

POLL = 30.0                 # the default leader_poll
SLACK = 31 * 1.1            # a poll interval, its 10% jitter and a second to spare
HOUR = datetime.timedelta(hours=1)
BECAME_LEADER = "This node is now the leader"
SKIPPED = "Not running on leader node, skipping."


# =============================================================================
# helpers
# =============================================================================


def status_is_leader(path):
    """``is_leader`` in a status file (None if there is no file yet)."""
    try:
        with open(str(path)) as handle:
            return json.load(handle).get("is_leader")
    except (IOError, OSError, ValueError):
        return None


def metric_is_leader(path):
    """The value of ``vault_snapshot_is_leader`` in a metrics textfile (None
    if there is no file or no such sample)."""
    try:
        text = read(path)
    except OSError:
        return None
    found = re.search(r"^vault_snapshot_is_leader(?:\{\})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


class WatchingSignals(FakeSignals):
    """FakeSignals that note, whenever the agent waits, (seconds since
    START, ``agent.status.is_leader``, the status file's ``is_leader``, the
    metric's value)."""

    def __init__(self, clock, until, tmp_path):
        FakeSignals.__init__(self, clock, until=until)
        self.tmp_path = tmp_path
        self.agent = None
        self.seen = []

    def wait(self, seconds, wake_on_reload=True):
        self.seen.append((self.clock.monotonic() - START,
                          self.agent.status.is_leader if self.agent is not None else "no agent",
                          status_is_leader(self.tmp_path / "status.json"),
                          metric_is_leader(self.tmp_path / "metrics.prom")))
        FakeSignals.wait(self, seconds, wake_on_reload)


def run_agent(tmp_path, vault, clock, seconds, **config):
    """Run the daemon loop for ``seconds`` of fake time against ``vault``
    with local storage in ``tmp_path/snaps``, leader_poll 30s, a status
    file and a metrics textfile; returns (agent, signals, log text)."""
    signals = WatchingSignals(clock, START + seconds, tmp_path)
    config.setdefault("leader_poll", "30s")
    config.setdefault("status_file", str(tmp_path / "status.json"))
    config.setdefault("metrics_textfile", str(tmp_path / "metrics.prom"))
    agent, log = run_daemon(tmp_path, vault, clock, signals,
                            on_agent=lambda agent: setattr(signals, "agent", agent), **config)
    return agent, signals, log


# =============================================================================
# fake clock: a standby that becomes the leader
# =============================================================================


def test_a_standby_that_becomes_leader_takes_the_overdue_snapshot_within_a_poll(tmp_path):
    clock = fake_clock()
    old = plant(tmp_path / "snaps", clock.now() - 2 * HOUR)      # overdue at 1h
    with ScriptedVault(clock, lambda t: t >= 100) as vault:
        agent, signals, log = run_agent(tmp_path, vault, clock, 600)
        snaps = vault.times(SNAPSHOT, "GET")
        logins, renewals = vault.times(LOGIN), vault.times(RENEW)
        polls = vault.times(LEADER)
    assert "Traceback" not in log and " ERROR " not in log, log
    assert SKIPPED in log, log                     # the start-up cycle found a standby
    # One snapshot, taken after the change and within a poll (plus jitter) of it.
    assert len(snaps) == 1, (snaps, log)
    assert 100 <= snaps[0] < 100 + SLACK, (snaps, polls, log)
    new = [n for n in snapshots(tmp_path / "snaps") if n != old]
    assert len(new) == 1, snapshots(tmp_path / "snaps")
    taken = vsa.parse_snapshot_name(new[0])
    started = clock.now() - datetime.timedelta(seconds=clock.monotonic() - START)
    assert 100 <= (taken - started).total_seconds() < 100 + SLACK, (new, log)
    vsa.verify_file(str(tmp_path / "snaps" / new[0]))
    # The log says why it happened.
    assert "%s; planning from the storages" % BECAME_LEADER in log, log
    assert log.index(BECAME_LEADER) < log.index("Successfully created"), log
    # No login (or renewal) while a standby: the only login is for the snapshot.
    assert logins and min(logins) >= 100, (logins, log)
    assert len(logins) == 1 and renewals == [], (logins, renewals)
    assert log.count("Logged in") == 1 and log.index("Logged in") > log.index(BECAME_LEADER)
    # is_leader: False from start-up until the change, True from the snapshot on,
    # in the agent's status, the status file and the metrics alike.
    before = [s for s in signals.seen if s[0] < 100]
    after = [s for s in signals.seen if s[0] >= snaps[0]]
    assert before and after, signals.seen
    assert all(s[1:] == (False, False, 0.0) for s in before), before
    assert all(s[1:] == (True, True, 1.0) for s in after), after
    assert agent.status.is_leader is True
    assert status_is_leader(tmp_path / "status.json") is True
    assert metric_is_leader(tmp_path / "metrics.prom") == 1.0


def test_a_node_that_stays_standby_is_polled_every_30s_and_never_logs_in(tmp_path):
    clock = fake_clock()
    old = plant(tmp_path / "snaps", clock.now() - 2 * HOUR)
    with ScriptedVault(clock, lambda t: False) as vault:
        agent, signals, log = run_agent(tmp_path, vault, clock, 600)
        polls = vault.times(LEADER)
        timeline = list(vault.timeline)
    assert "Traceback" not in log and " ERROR " not in log, log
    # Ten minutes at one poll per 30-33 s, plus the start-up cycle's own check.
    assert 18 <= len(polls) <= 21, (polls, log)
    spaced = [g for g in gaps(polls) if g >= 1.0]
    assert spaced and min(spaced) >= POLL and max(spaced) <= POLL * 1.1 + 0.01, gaps(polls)
    assert max(polls) >= 600 - POLL * 1.1 - 0.01, polls            # until the end
    # Nothing but sys/leader: no login, no renewal, no lookup, no snapshot.
    assert set(p for _, _, p in timeline) == set([LEADER]), timeline
    assert "Logged in" not in log and "Renewed token" not in log, log
    assert snapshots(tmp_path / "snaps") == [old]
    assert all(s[1:] == (False, False, 0.0) for s in signals.seen), signals.seen
    assert agent.status.is_leader is False


def test_no_extra_polls_when_the_frequency_is_not_longer_than_leader_poll(tmp_path):
    clock = fake_clock()
    plant(tmp_path / "snaps", clock.now() - 2 * HOUR)
    with ScriptedVault(clock, lambda t: False) as vault:
        _, _, log = run_agent(tmp_path, vault, clock, 600, frequency="20s")
        polls = vault.times(LEADER)
        timeline = list(vault.timeline)
    cycles = log.count(SKIPPED)
    assert cycles == 30, log                                   # every 20 s: 0, 20, ..., 580
    assert len(polls) == cycles, (polls, log)                  # one check per cycle, no more
    assert set(p for _, _, p in timeline) == set([LEADER]), timeline


def test_leader_poll_0s_turns_polling_off(tmp_path):
    clock = fake_clock()
    plant(tmp_path / "snaps", clock.now() - 2 * HOUR)
    with ScriptedVault(clock, lambda t: t >= 100) as vault:
        _, _, log = run_agent(tmp_path, vault, clock, 600, leader_poll="0s")
        polls = vault.times(LEADER)
        snaps = vault.times(SNAPSHOT, "GET")
    # The start-up cycle's check only; the leadership change waits for the 1h cycle.
    assert polls == [0.0], (polls, log)
    assert snaps == [] and BECAME_LEADER not in log, log


def test_becoming_leader_plans_from_the_storages_and_does_not_snapshot_early(tmp_path):
    clock = fake_clock()
    recent = plant(tmp_path / "snaps", clock.now() - datetime.timedelta(minutes=10))
    with ScriptedVault(clock, lambda t: t >= 100) as vault:
        _, signals, log = run_agent(tmp_path, vault, clock, 3300)
        snaps = vault.times(SNAPSHOT, "GET")
        logins = vault.times(LOGIN)
    assert "%s; planning from the storages" % BECAME_LEADER in log, log
    # Nothing is due at start-up, yet is_leader is known from the first poll on
    # and follows the change (it used to read 0 until the first scheduled cycle).
    before = [s for s in signals.seen if s[0] < 100]
    between = [s for s in signals.seen if 100 + SLACK <= s[0] < 3000]
    assert before and between, signals.seen
    assert all(s[1:] == (False, False, 0.0) for s in before), before
    assert all(s[1:] == (True, True, 1.0) for s in between), between
    # The newest snapshot is 10 minutes old at start: the next is due 50 minutes in.
    assert len(snaps) == 1 and 2999.9 <= snaps[0] < 3001, (snaps, log)
    assert logins and min(logins) >= 100, logins
    assert len(snapshots(tmp_path / "snaps")) == 2 and recent in snapshots(tmp_path / "snaps")


def test_a_leader_that_becomes_standby_says_so_within_a_poll_and_stops_renewing(tmp_path):
    clock = fake_clock()
    plant(tmp_path / "snaps", clock.now() - 2 * HOUR)
    with ScriptedVault(clock, lambda t: t < 200) as vault:
        agent, signals, log = run_agent(tmp_path, vault, clock, 600)
        snaps = vault.times(SNAPSHOT, "GET")
        logins, renewals = vault.times(LOGIN), vault.times(RENEW)
    assert snaps == [0.0], (snaps, log)                        # the overdue one, at start
    assert len(logins) == 1 and renewals == [], (logins, renewals)
    early = [s for s in signals.seen if s[0] < 200]
    late = [s for s in signals.seen if s[0] >= 200 + SLACK]
    assert early and late, signals.seen
    assert all(s[1:] == (True, True, 1.0) for s in early), early
    assert all(s[1:] == (False, False, 0.0) for s in late), late
    assert agent.status.is_leader is False
    assert status_is_leader(tmp_path / "status.json") is False


def test_a_node_sealed_at_start_up_takes_the_overdue_snapshot_within_a_poll_of_leading(tmp_path):
    # A reboot: the agent starts while its Vault is still sealed (every
    # request 503), then the node is unsealed at t=600 and is the active node.
    # Its cycles failed meanwhile and their retries back off (1m, 2m, 4m,
    # 8m...), but the snapshot is still overdue: it is due within a poll of
    # the node leading, not at the next retry.
    clock = fake_clock()
    plant(tmp_path / "snaps", clock.now() - 2 * HOUR)
    with ScriptedVault(clock, lambda t: True) as vault:
        vault.sealed = lambda t: t < 600
        agent, signals, log = run_agent(tmp_path, vault, clock, 1200)
        snaps = vault.times(SNAPSHOT, "GET")
        polls = vault.times(LEADER)
    assert "Snapshot cycle failed" in log and "sealed" in log, log
    assert [t for t in polls if t >= 600], polls
    assert snaps and 600 <= snaps[0] < 600 + SLACK, (snaps, polls, log)
    assert agent.status.is_leader is True
    assert status_is_leader(tmp_path / "status.json") is True


# =============================================================================
# end to end: the real cluster, its leader killed
# =============================================================================


@pytest.mark.slow
def test_a_new_leader_takes_the_overdue_snapshot_within_a_minute_of_a_failover(
        bao_cluster, approle, tmp_path):
    # Every server a voter (and every node knowing the leader), or the two
    # survivors have no quorum once the leader is gone.
    old = bao_cluster.wait_ready()
    env = child_env(drop_prefixes=("VAULT_", "BAO_"))
    two_hours_ago = datetime.datetime.now(vsa.UTC) - 2 * HOUR
    agents = {}            # node name -> dict(proc, log, snaps, status, metrics)
    try:
        for node in bao_cluster.nodes:
            here = tmp_path / node.name                   # that node's own disk
            snaps = here / "snaps"
            planted = plant(snaps, two_hours_ago)         # overdue at frequency 1h
            config = {"addr": node.addr, "role_id": approle.role_id,
                      "secret_id": approle.secret_id, "approle": approle.mount,
                      "frequency": "1h", "leader_poll": "5s",
                      "local_storage": {"path": str(snaps)},
                      "status_file": str(here / "status.json"),
                      "metrics_textfile": str(here / "metrics.prom")}
            (here / "c.json").write_text(json.dumps(config))
            log = here / "agent.log"
            agents[node.name] = dict(node=node, snaps=snaps, planted=planted, log=log,
                                     status=here / "status.json", metrics=here / "metrics.prom",
                                     proc=start_agent(str(here / "c.json"), log, env=env))
        leader = agents[old.name]
        standbys = [a for name, a in sorted(agents.items()) if name != old.name]

        # The leader's agent takes the overdue snapshot; the standbys' skip.
        wait_for(lambda: "Cycle stored" in read(leader["log"]), 60,
                 "the leader's agent to store the overdue snapshot")
        for agent in standbys:
            wait_for(lambda agent=agent: SKIPPED in read(agent["log"]), 60,
                     "a standby's agent to skip")
            wait_for(lambda agent=agent: status_is_leader(agent["status"]) is False, 10,
                     "a standby's status file to say is_leader false")
            assert metric_is_leader(agent["metrics"]) == 0.0, read(agent["metrics"])
            assert snapshots(agent["snaps"]) == [agent["planted"]], read(agent["log"])
        wait_for(lambda: status_is_leader(leader["status"]) is True, 10,
                 "the leader's status file to say is_leader true")
        assert len(snapshots(leader["snaps"])) == 2
        assert all(a["proc"].poll() is None for a in agents.values())

        bao_cluster.kill_node(old)
        killed = time.monotonic()

        def taken_over():
            return [a for a in standbys if len(snapshots(a["snaps"])) > 1]
        found = wait_for(taken_over, 60, "a snapshot from the new leader's agent within 60 s "
                                         "of killing the leader")
        seconds = time.monotonic() - killed
        print("leader %s killed; new leader's snapshot after %.1f s" % (old.name, seconds))
        assert len(found) == 1, [read(a["log"]) for a in found]
        new, other = found[0], [a for a in standbys if a is not found[0]][0]
        assert bao_cluster.wait_for_leader(exclude=old, timeout=10) is new["node"]
        name = [n for n in snapshots(new["snaps"]) if n != new["planted"]][0]
        vsa.verify_file(os.path.join(str(new["snaps"]), name))

        wait_for(lambda: "Cycle stored" in read(new["log"]), 30, "the new leader's cycle to end")
        wait_for(lambda: status_is_leader(new["status"]) is True, 10,
                 "the new leader's status file to say is_leader true")
        wait_for(lambda: metric_is_leader(new["metrics"]) == 1.0, 10,
                 "the new leader's metrics to say vault_snapshot_is_leader 1")
        text = read(new["log"])
        assert BECAME_LEADER in text, text
        assert name in text, text
        # Standbys never logged in: not before becoming leader, not at all if still standby.
        assert "Logged in" not in text[:text.index(BECAME_LEADER)], text
        assert "Logged in" in text[text.index(BECAME_LEADER):], text
        text = read(other["log"])
        assert "Logged in" not in text and BECAME_LEADER not in text, text
        assert snapshots(other["snaps"]) == [other["planted"]], text
        assert status_is_leader(other["status"]) is False
        assert metric_is_leader(other["metrics"]) == 0.0
        for agent in agents.values():
            assert "Traceback" not in read(agent["log"]), read(agent["log"])
        assert new["proc"].poll() is None and other["proc"].poll() is None
    finally:
        for agent in agents.values():
            try:
                stop(agent["proc"])
            except AssertionError:
                pass
        bao_cluster.heal()          # restart the killed node, wait until it is a voter again
