"""Issue 22 under attack: notifications (``notify_command``, ``notify_url``;
``Notifications``, ``_collect``, ``_kill_group``, ``Agent.notify_cycle``).

A notify command that forks, closes its output, ignores SIGTERM, prints
without end or exits at once; a webhook that stalls its headers, trickles
or never ends its answer, redirects elsewhere, or presents a certificate
for another name; events by the hundred, reloads and stops while some are
queued or running.  Nothing may block the agent's loop, outlive the agent,
leave a zombie, or put the webhook's path (its token) or a credential in a
log line or the command's environment.

Webhooks are raw loopback servers (support/readback_servers.py); the
daemon runs in process on the fake clock (support/agent_sim.py) or as a
subprocess against a loopback FakeVault.  Tests marked
``xfail(strict=True)`` show a bug: they pass once it is fixed.
"""

import json
import os
import re
import signal
import sys
import time

import pytest

import vault_snapshot_agent as vsa
from support.agent_sim import START, ScriptedVault, fake_clock, load_doc, run_daemon
from support.fake_endpoints import Endpoint
from support.harness import (FakeSignals, captured_log, child_env, free_port, known_secrets, read,
                             reaped, start_agent, stop, thread_ids, wait_for)
from support.hostile_servers import snapshot_names
from support.readback_servers import Reply, ScriptedServer, endless, repeat

HOOK = "/services/T0HOOKSECRET/B0HOOKSECRET/xoxbHOOKSECRETTOKEN"
QUERY = "sig=HOOKQUERYSECRET"
FAILED = vsa.Event("failed", "local", "", "Vault is sealed", 1)
RECOVERED = vsa.Event("recovered", "local", "raft_snapshot-20260101T000000.000Z.snap")


@pytest.fixture(autouse=True)
def hook_secrets():
    known_secrets(HOOK, QUERY, "T0HOOKSECRET", "xoxbHOOKSECRETTOKEN", "HOOKQUERYSECRET")


# -- helpers -------------------------------------------------------------------


def notifications(tmp_path, env=None, **keys):
    """A Notifications built from a config with ``keys`` (and a local storage)."""
    keys.setdefault("local_storage", {"path": str(tmp_path / "snaps")})
    cfg = load_doc(tmp_path, keys)
    return vsa.Notifications(cfg, env or {"PATH": os.environ["PATH"]}, vsa.Clock())


def command(tmp_path, body, name="notify.sh"):
    """An executable sh script ``body`` (``%(dir)s``: tmp_path); its argv."""
    script = tmp_path / name
    script.write_text("#!/bin/sh\n" + body % {"dir": tmp_path} + "\n")
    script.chmod(0o755)
    return [str(script)]


def group_alive(pgid):
    """Whether a process (not a zombie) of process group ``pgid`` runs."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def ended(pgid, timeout=2.0):
    """Whether process group ``pgid`` is gone within ``timeout`` seconds: a
    SIGKILLed group takes a moment to end on a loaded machine."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def zombies():
    """This process's children that are zombies."""
    found = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open("/proc/self/task/%s/children" % task) as handle:
                pids = handle.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open("/proc/%s/stat" % pid) as handle:
                    if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                        found.append(int(pid))
            except OSError:
                pass
    return found


def kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def posts_within(server, count, seconds):
    """Whether ``server`` saw ``count`` POSTs within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len(server.requests("POST")) >= count:
            return True
        time.sleep(0.02)
    return False


# -- the webhook ---------------------------------------------------------------


def test_a_webhook_trickling_its_error_answer_is_abandoned_at_notify_timeout(tmp_path):
    script = lambda request: Reply(500, [("Content-Length", "300")], repeat(b"x", 300),  # noqa: E731
                                   interval=0.25)
    with ScriptedServer(script, limit=10) as server, captured_log():
        alerts = notifications(tmp_path, notify_url=server.url + HOOK, notify_timeout="1s")
        alerts.send(FAILED)
        alerts.send(RECOVERED)
        delivered = posts_within(server, 2, 3.0)
        alerts.close(wait=None)          # the thread ends with the server's limit
    assert delivered, "the second event waited more than 3 s behind a 1 s notify_timeout"


def _redirect_elsewhere(target):
    return lambda request: Reply(307, [("Location", target.url + request.path), ("Content-Length", "0")])


STALLS = {
    "slow-headers": lambda request: time.sleep(20) or Reply(200, [("Content-Length", "0")]),
    "endless-ok": lambda request: Reply(200, [], endless(b"ok"), chunked=True),
    "endless-error": lambda request: Reply(500, [], endless(b"e" * 1000), chunked=True),
    "100MB-ok": lambda request: Reply(200, [("Content-Length", str(100 << 20))],
                                      repeat(bytes(1 << 20), 100)),
}


@pytest.mark.parametrize("kind", sorted(STALLS) + ["redirect"])
def test_webhooks_that_stall_or_never_end_stay_within_notify_timeout(tmp_path, kind):
    with ScriptedServer(lambda request: Reply(200, [("Content-Length", "0")])) as elsewhere, \
            ScriptedServer(STALLS.get(kind) or _redirect_elsewhere(elsewhere), limit=30) as server, \
            captured_log() as log:
        alerts = notifications(tmp_path, notify_url=server.url + HOOK, notify_timeout="1s")
        started = time.monotonic()
        alerts.send(FAILED)
        alerts.send(RECOVERED)
        alerts.close(wait=True)
        took = time.monotonic() - started
    assert len(server.requests("POST")) == 2
    assert took < 3.5, "two notifications took %.1f s with notify_timeout 1s" % took
    assert elsewhere.requests() == []
    assert (kind in ("endless-ok", "100MB-ok")) == ("Notified failed through notify_url" in log.getvalue())


def _echo(request):
    text = ("no such hook: %s?%s" % (request.path, QUERY)).encode()
    return Reply(404, [("Content-Length", str(len(text)))], text)


def _echo_piece(request):
    return Reply(500, [("Content-Length", "20")], request.path[12:32].encode())


@pytest.mark.parametrize("kind", ["echo", "echo-piece", "redirect", "refused", "tls-wrong-name"])
def test_the_webhook_path_and_query_never_reach_the_log(tmp_path, kind):
    scripts = {"echo": _echo, "echo-piece": _echo_piece,
               "redirect": lambda r: Reply(302, [("Location", "http://127.0.0.1:9" + r.path + "?" + QUERY),
                                                 ("Content-Length", "0")])}
    keys = {"notify_timeout": "2s"}
    with captured_log() as log:
        if kind in scripts:
            with ScriptedServer(scripts[kind]) as server:
                alerts = notifications(tmp_path, notify_url=server.url + HOOK + "?" + QUERY, **keys)
                alerts.send(FAILED)
                alerts.close(wait=True)
        elif kind == "refused":
            alerts = notifications(tmp_path, notify_url="http://127.0.0.1:%d%s" % (free_port(), HOOK), **keys)
            alerts.send(FAILED)
            alerts.close(wait=True)
        else:
            cert, key = self_signed_cert_for(tmp_path, "localhost")
            with Endpoint(lambda r: (200, {}, b"ok"), tls=(cert, key)) as server:
                alerts = notifications(tmp_path, notify_url=server.url + HOOK, notify_ca_cert=cert, **keys)
                alerts.send(FAILED)
                alerts.close(wait=True)
    text = log.getvalue()
    assert "Notification of failed to notify_url" in text, text
    for piece in ("HOOKSECRET", "HOOKQUERYSECRET", "/services/"):
        assert piece not in text, text


def self_signed_cert_for(tmp_path, host):
    from support.azurite import make_self_signed_cert
    directory = tmp_path / "cert"
    directory.mkdir()
    return make_self_signed_cert(str(directory), hosts=(host,))


# -- the command ---------------------------------------------------------------


def test_an_event_naming_thousands_of_snapshots_still_runs_the_command(tmp_path):
    argv = command(tmp_path, 'echo "$SNAPSHOT_EVENT" >> %(dir)s/ran')
    names = snapshot_names(0, 4000)                    # 4000 missing: someone emptied the bucket
    with captured_log() as log:
        alerts = notifications(tmp_path, notify_command=argv, notify_timeout="5s")
        alerts.send(vsa.Event("verify_failed", "s3", ", ".join(names), "%s is missing" % names[0],
                              len(names)))
        alerts.close(wait=True)
    assert (tmp_path / "ran").exists(), log.getvalue()


def test_the_notify_command_gets_no_credentials(tmp_path):
    argv = command(tmp_path, "env > %(dir)s/env")
    env = {"PATH": os.environ["PATH"], "VAULT_TOKEN": "s.AgentTokenNeverForTheNotifier",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-never-for-the-notifier",
           "AZURE_CLIENT_SECRET": "azure-secret-never-for-the-notifier", "LANG": "C.UTF-8"}
    known_secrets(*env.values())
    with captured_log():
        alerts = notifications(tmp_path, env=env, notify_command=argv, notify_timeout="5s",
                               secret_id="secret-id-never-for-the-notifier")
        alerts.send(vsa.Event("failed", "local", "", "login refused for secret-id-never-for-the-notifier",
                              1))
        alerts.close(wait=True)
    seen = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert "never-for-the-notifier" not in (tmp_path / "env").read_text()
    assert "VAULT_TOKEN" not in seen and seen["LANG"] == "C.UTF-8"
    assert seen["SNAPSHOT_EVENT"] == "failed" and seen["SNAPSHOT_ERROR"] == "login refused for ***"


HOSTILE_COMMANDS = {
    # name: (script body, last log line of the first event)
    "closes-output-runs-on": ("exec >&- 2>&-; echo $$ > %(dir)s/pid.$SNAPSHOT_EVENT; sleep 30",
                              "killed after"),
    "ignores-sigterm": ("trap '' TERM; echo $$ > %(dir)s/pid.$SNAPSHOT_EVENT; "
                        "while :; do sleep 0.1; done", "killed after"),
    "prints-without-end": ("echo $$ > %(dir)s/pid.$SNAPSHOT_EVENT; yes 'a long line of output'",
                           "killed after"),
    "exits-at-once": ("echo $$ > %(dir)s/pid.$SNAPSHOT_EVENT; exit 3", "exited with 3"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_COMMANDS))
def test_hostile_commands_end_at_notify_timeout_with_their_group_and_no_zombie(tmp_path, kind):
    body, outcome = HOSTILE_COMMANDS[kind]
    argv = command(tmp_path, body)
    with captured_log() as log:
        alerts = notifications(tmp_path, notify_command=argv, notify_timeout="1s")
        started = time.monotonic()
        for event in (FAILED, RECOVERED):
            alerts.send(event)                  # returns at once: the thread runs them
        assert time.monotonic() - started < 0.2
        alerts.close(wait=True)
        took = time.monotonic() - started
    pids = [int((tmp_path / ("pid." + e)).read_text()) for e in ("failed", "recovered")]
    try:
        # SIGKILL has been sent to the groups; a loaded machine may take a moment to end them
        assert all(ended(pid) for pid in pids)
        assert zombies() == []
        assert took < 7.5, took          # two events: 1 s each, plus 2 s each to SIGKILL at worst
        lines = [line for line in log.getvalue().splitlines() if "notify_command for failed" in line]
        assert lines and outcome in lines[-1], log.getvalue()[-3000:]
        assert len(log.getvalue().splitlines()) < 50
    finally:
        for pid in pids:
            kill_group(pid)


def test_a_background_process_of_the_notify_command_ends_at_notify_timeout(tmp_path):
    argv = command(tmp_path, "echo $$ > %(dir)s/pgid; sleep 30 & echo started")
    with captured_log():
        alerts = notifications(tmp_path, notify_command=argv, notify_timeout="1s")
        alerts.send(FAILED)
        alerts.close(wait=True)
    pgid = int((tmp_path / "pgid").read_text())
    try:
        time.sleep(3.0)                  # notify_timeout and the 2 s SIGKILL grace are over
        assert ended(pgid), "the command's 'sleep 30 &' still runs"
    finally:
        kill_group(pgid)


# -- stops and reloads of the daemon ---------------------------------------------


def sealed_vault():
    """A loopback Vault whose every answer is 503 (sealed): a cycle fails at once."""
    return Endpoint(lambda request: (503, {}, {"errors": ["Vault is sealed"]}))


def start_failing_agent(tmp_path, vault, argv, *extra, **keys):
    """The agent as a subprocess against ``vault``, notifying through
    ``argv``; its first cycle fails (a ``failed`` event)."""
    doc = {"addr": vault.url, "role_id": "r", "secret_id": "s", "frequency": "1h",
           "retry_interval": "1h", "local_storage": {"path": str(tmp_path / "snaps")},
           "notify_command": argv}
    doc.update(keys)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(doc))
    config.chmod(0o600)
    return start_agent(str(config), tmp_path / "log", sys.executable, *extra,
                       env=child_env(drop_prefixes=("VAULT_", "BAO_", "AWS_")))


def running_pid(tmp_path, event="failed"):
    path = tmp_path / ("pid." + event)
    return int(wait_for(lambda: path.exists() and path.read_text().strip(), 20, "the notify command"))


def test_a_stop_after_a_reload_kills_the_running_notify_command(tmp_path):
    argv = command(tmp_path, "echo $$ > %(dir)s/pid.$SNAPSHOT_EVENT; exec sleep 30")
    with sealed_vault() as vault, reaped(start_failing_agent(tmp_path, vault, argv,
                                                             notify_timeout="20s")) as proc:
        pid = running_pid(tmp_path)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "Config reloaded" in read(tmp_path / "log"), 10, "the reload")
        assert stop(proc) == 0
    try:
        assert ended(pid, 2.5), "the notify command outlives the agent"
    finally:
        kill_group(pid)


def other_threads(pid):
    """The thread ids of process ``pid`` but its main thread's."""
    return [t for t in thread_ids(pid) if t != pid]


def test_signals_the_kernel_hands_to_the_notify_thread_still_reload_and_stop(tmp_path):
    # kill() of a thread id is still a process signal, delivered to that thread
    # first: what the kernel may do to any signal while the main thread sleeps.
    argv = command(tmp_path, "echo $$ > %(dir)s/pid.$SNAPSHOT_EVENT; exec sleep 30")
    with sealed_vault() as vault, reaped(start_failing_agent(tmp_path, vault, argv,
                                                             notify_timeout="20s")) as proc:
        pid = running_pid(tmp_path)
        threads = other_threads(proc.pid)
        assert threads, "the notify thread is running"
        for tid in threads:
            os.kill(tid, signal.SIGHUP)
        wait_for(lambda: "Config reloaded" in read(tmp_path / "log"), 5, "the reload")
        started = time.monotonic()
        os.kill(other_threads(proc.pid)[0], signal.SIGTERM)
        assert proc.wait(5) == 0
        assert time.monotonic() - started < 3
    try:
        assert ended(pid, 2.5), "the notify command outlives the agent"
    finally:
        kill_group(pid)


def test_once_honours_a_stop_while_waiting_for_its_notifications(tmp_path):
    argv = command(tmp_path, "echo $$ > %(dir)s/pid.$SNAPSHOT_EVENT; exec sleep 30")
    with sealed_vault() as vault, reaped(start_failing_agent(tmp_path, vault, argv, "--once",
                                                             notify_timeout="3s")) as proc:
        pid = running_pid(tmp_path)
        started = time.monotonic()
        stop(proc, signal.SIGTERM, timeout=20)
        took = time.monotonic() - started
    kill_group(pid)
    assert took < 1.5, "--once took %.1f s to stop on SIGTERM" % took


def test_a_stop_kills_a_notify_command_that_ignores_sigterm(tmp_path):
    argv = command(tmp_path, "trap '' TERM; echo $$ > %(dir)s/pid.$SNAPSHOT_EVENT; "
                             "while :; do sleep 0.1; done")
    with sealed_vault() as vault, reaped(start_failing_agent(tmp_path, vault, argv,
                                                             notify_timeout="30s")) as proc:
        pid = running_pid(tmp_path)
        started = time.monotonic()
        assert stop(proc, signal.SIGTERM, timeout=15) == 0
        took = time.monotonic() - started
    try:
        assert ended(pid)
        assert took < 5.0, "stopping took %.1f s" % took      # SIGKILL after 2 s of SIGTERM
    finally:
        kill_group(pid)


# -- events: once each, bounded, never in the loop's way ---------------------------------

HOUR = 3600.0


def event_lines(path, count, seconds=10):
    """The first lines of ``path`` once it holds ``count`` (or after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            break
        time.sleep(0.02)
    return path.read_text().splitlines() if path.exists() else []


def test_failed_and_recovered_are_sent_once_through_retries_and_a_reload(tmp_path):
    argv = command(tmp_path, 'echo "$SNAPSHOT_EVENT $SNAPSHOT_STORAGE $SNAPSHOT_FAILURES" >> %(dir)s/events')
    clock = fake_clock()
    signals = FakeSignals(clock, until=START + 10 * HOUR, events=[(START + 2.5 * HOUR, "reload_requested")])
    with ScriptedVault(clock) as vault:
        vault.sealed = lambda t: t < 5 * HOUR            # 5 hours of failing cycles, retried
        agent, _ = run_daemon(tmp_path, vault, clock, signals, retry_interval="5m", notify_command=argv,
                              notify_events=["failed", "recovered"])
        agent.alerts.close(wait=True)
    assert vault.times("/v1/sys/leader").count(0.0) == 1 and len(vault.times("/v1/sys/leader")) > 8
    events = event_lines(tmp_path / "events", 2)         # recovered: after how many failed cycles
    assert events[0] == "failed local 1" and re.match(r"\Arecovered local ([89]|1[0-9])\Z", events[1]), events


def test_the_daemon_loop_never_waits_for_a_hung_webhook(tmp_path):
    clock = fake_clock()
    signals = FakeSignals(clock, until=START + 6 * HOUR)
    hung = lambda request: time.sleep(25) or Reply(200, [("Content-Length", "0")])    # noqa: E731
    with ScriptedVault(clock) as vault, ScriptedServer(hung, limit=30) as webhook:
        started = time.monotonic()
        agent, log = run_daemon(tmp_path, vault, clock, signals, notify_url=webhook.url + HOOK,
                                notify_timeout="5s", notify_events=["stored"])
        took = time.monotonic() - started
        agent.alerts.close(wait=False)
    assert len(vault.snapshot_times()) == 6
    assert took < 3.0, "6 cycles took %.1f s with a webhook that never answers" % took


def test_an_event_storm_keeps_the_queue_bounded_and_sending_instant(tmp_path):
    argv = command(tmp_path, 'echo "$SNAPSHOT_NAME" >> %(dir)s/events; sleep 0.5')
    with captured_log() as log:
        alerts = notifications(tmp_path, notify_command=argv, notify_timeout="5s",
                               notify_events=["stored"])
        started = time.monotonic()
        for number in range(300):
            alerts.send(vsa.Event("stored", "local", "snapshot-%d" % number))
        took = time.monotonic() - started
        queued = len(alerts._queue)
        alerts.close(wait=False)
    assert took < 1.0 and queued <= vsa.NOTIFY_QUEUE
    assert log.getvalue().count("Notification queue full") >= 300 - vsa.NOTIFY_QUEUE - 1
    assert zombies() == []


def test_notifications_queued_before_a_reload_are_delivered(tmp_path):
    argv = command(tmp_path, 'sleep 0.2; echo "$SNAPSHOT_NAME" >> %(dir)s/events')
    clock = fake_clock()
    with ScriptedVault(clock) as vault, captured_log():
        doc = {"addr": vault.url, "role_id": "r", "secret_id": "s", "notify_command": argv,
               "notify_events": ["stored"], "local_storage": {"path": str(tmp_path / "snaps")}}
        config = tmp_path / "c.json"
        config.write_text(json.dumps(doc))
        config.chmod(0o600)
        agent = vsa.Agent(lambda rt: vsa.load_all(str(config), rt), clock, FakeSignals(clock), env={})
        for number in range(3):
            agent.alerts.send(vsa.Event("stored", "local", "before-%d" % number))
        assert agent.reload()
        agent.alerts.send(vsa.Event("stored", "local", "after"))
        lines = event_lines(tmp_path / "events", 4)
        agent.alerts.close(wait=True)
    assert sorted(lines) == ["after", "before-0", "before-1", "before-2"]


def test_a_notify_command_forking_a_daemon_holding_its_output_does_not_hold_the_queue(tmp_path):
    argv = command(tmp_path, '(sleep 30; echo late) & echo $! >> %(dir)s/daemons; '
                             'echo "$SNAPSHOT_EVENT" >> %(dir)s/events')
    try:
        with captured_log():
            alerts = notifications(tmp_path, notify_command=argv, notify_timeout="10s")
            started = time.monotonic()
            alerts.send(FAILED)
            alerts.send(RECOVERED)
            alerts.close(wait=True)
            took = time.monotonic() - started
        assert event_lines(tmp_path / "events", 2) == ["failed", "recovered"]
        assert took < 3.0, took
        assert zombies() == []
    finally:
        for line in (tmp_path / "daemons").read_text().split():
            kill_group(os.getpgid(int(line)) if group_alive_pid(int(line)) else int(line))


def group_alive_pid(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
