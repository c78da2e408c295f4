"""Notifications (section Notifications, and the Agent's events): what a
user's pager or chat receives, and what can never go wrong around it.

* ``notify_command`` is an argv run without a shell, in its own process
  group, with the event in ``SNAPSHOT_*`` variables, PATH, and none of the
  agent's secrets; past ``notify_timeout`` its whole group is killed;
  its output is bounded in memory and its lines are logged with the
  config's secrets masked; a non-zero exit is an error line; a program
  that cannot run is one config error line at load;
* ``notify_url`` gets one JSON POST (``text`` and the facts); the URL's
  path (the secret of a chat webhook) never reaches the log, whatever the
  outcome; a redirect is not followed; 429/503 are tried 3 times at most;
  a slow receiver is abandoned at the deadline; a huge answer is not read;
  a private CA works through ``notify_ca_cert``; the environment's proxy
  carries it (the real tinyproxy);
* through the Agent (fake clock, support/agent_sim.py): ``failed`` once
  when a storage starts failing and ``recovered`` once when it stores
  again; one ``failed`` for all storages of a cycle that fails before any
  upload; ``retention_failed`` once per failing streak; ``stored`` only
  when listed; an event left out of ``notify_events`` is never sent;
  ``--once`` delivers before it exits 1; a slow webhook never delays a
  cycle;
* a stop (SIGTERM to the daemon) kills a running command's group at once.

The command is support/notify_probe.py (it notes its argv, environment and
process ids); the webhook is support/webhook_receiver.py on loopback.
"""

import datetime
import io
import os
import signal
import socket
import sys
import time
import tracemalloc

import pytest

import vault_snapshot_agent as vsa
from support.agent_sim import NOW, START, ScriptedVault, fake_clock, plant, run_daemon, write_config
from support.fake_endpoints import FakeVault
from support.harness import (FakeSignals, captured_log, error_lines, free_port, known_secrets,
                             loopback_alias, pid_alive, reaped, run_main, start_agent, stop, wait_for)
from support.notify_probe import command, entries
from support.webhook_receiver import Answer, WebhookReceiver, make_private_ca

pytestmark = pytest.mark.usefixtures("isolated_env")

HOUR = 3600.0
DAY = 24 * HOUR
MiB = 1024 * 1024
HOST = socket.gethostname()
SECRET_ID = "sid-" + os.urandom(10).hex()
AGENT_SECRETS = {"AWS_SECRET_ACCESS_KEY": "aws-" + os.urandom(12).hex(),
                 "AWS_SESSION_TOKEN": "sess-" + os.urandom(12).hex(),
                 "AZURE_CLIENT_SECRET": "az-" + os.urandom(12).hex(),
                 "GOOGLE_APPLICATION_CREDENTIALS": "/run/secrets/gcp-" + os.urandom(6).hex(),
                 "VAULT_TOKEN": FakeVault.LOGIN_TOKEN}
known_secrets(SECRET_ID, *AGENT_SECRETS.values())
FAILED = vsa.Event("failed", "local", "", "upload to local failed: No space left on device", 1)
DOCUMENT_KEYS = {"text", "event", "storage", "snapshot", "error", "failures", "host", "time", "agent"}


# -- helpers -------------------------------------------------------------------


def load(tmp_path, **config):
    """The Config of the usual AppRole config plus ``config``."""
    doc = {"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": SECRET_ID,
           "local_storage": {"path": str(tmp_path / "snaps")}}
    doc.update(config)
    return vsa.load_config(write_config(tmp_path, doc), {"PATH": os.environ.get("PATH", os.defpath)})


def deliver(cfg, *events, env=None):
    """Send ``events`` (default: FAILED) through the Notifications of ``cfg``
    and wait for their delivery: (log text, seconds it took)."""
    with captured_log() as stream:
        alerts = vsa.Notifications(cfg, {"PATH": os.environ.get("PATH", os.defpath)} if env is None
                                   else env, vsa.Clock())
        began = time.monotonic()
        for event in events or (FAILED,):
            alerts.send(event)
        alerts.close(wait=True)
        took = time.monotonic() - began
    return stream.getvalue(), took


def all_dead(pids, seconds):
    """Whether every one of ``pids`` is gone (or a zombie) within ``seconds``."""
    end = time.monotonic() + seconds
    while any(pid_alive(pid) for pid in pids):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def alive(out):
    return [(e["role"], e["pid"]) for e in entries(out) if pid_alive(e["pid"])]


@pytest.fixture
def probe_out(tmp_path):
    """Where the probe notes what it got; its processes left alive (a bug)
    are killed afterwards, by PID, if they still are the probe."""
    out = tmp_path / "probe.jsonl"
    yield out
    for entry in entries(out):
        try:
            with open("/proc/%d/cmdline" % entry["pid"], "rb") as handle:
                if b"notify_probe" in handle.read():
                    os.kill(entry["pid"], signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def receivers():
    """``receivers(*answers, **kwargs)``: a started WebhookReceiver (its
    secret path joins the session's secret scan); all stopped afterwards."""
    started = []

    def make(*answers, **kwargs):
        hook = WebhookReceiver(answers, **kwargs).start()
        known_secrets(hook.path)
        started.append(hook)
        return hook
    yield make
    for hook in started:
        hook.stop()


# =============================================================================
# notify_command
# =============================================================================


def test_the_command_gets_the_event_and_path_but_no_secret_of_the_agent(tmp_path, probe_out):
    """Through the Agent: a stored snapshot runs the command with the
    SNAPSHOT_* facts; the agent's own environment holds a Vault token and
    cloud credentials (the token even logs it in): none reaches the command."""
    clock = fake_clock()
    env = dict(AGENT_SECRETS, PATH="/usr/local/bin:/usr/bin:/bin", HOME=str(tmp_path), LANG="C.UTF-8",
               AWS_ACCESS_KEY_ID="AKIDEXAMPLE", BAO_TOKEN=FakeVault.LOGIN_TOKEN)
    with FakeVault() as vault:
        path = write_config(tmp_path, {"addr": vault.url, "local_storage": {"path": str(tmp_path / "snaps")},
                                       "notify_command": command("record", probe_out),
                                       "notify_events": ["stored"]})
        with captured_log() as log:
            agent = vsa.Agent(lambda runtime: vsa.load_all(path, runtime), clock, FakeSignals(clock),
                              env=env)
            result = agent.run_cycle()
            agent.notify_cycle(result, agent.storages)
            agent.alerts.close(wait=True)
    assert result.outcome == "stored", log.getvalue()
    name = result.stored[0][1]
    (entry,) = entries(probe_out)
    got = entry["env"]
    assert {k: v for k, v in got.items() if k.startswith("SNAPSHOT_")} == {
        "SNAPSHOT_EVENT": "stored", "SNAPSHOT_STORAGE": "local", "SNAPSHOT_NAME": name,
        "SNAPSHOT_ERROR": "", "SNAPSHOT_FAILURES": "0", "SNAPSHOT_HOST": HOST,
        "SNAPSHOT_TIME": vsa.iso(NOW),
        "SNAPSHOT_TEXT": "Vault snapshot stored on %s: storage local, snapshot %s" % (HOST, name)}
    assert got["PATH"] == env["PATH"] and got["HOME"] == env["HOME"] and got["LANG"] == "C.UTF-8"
    assert not set(got) & (set(AGENT_SECRETS) | {"BAO_TOKEN", "AWS_ACCESS_KEY_ID"}), sorted(got)
    leaked = [s for s in AGENT_SECRETS.values() if any(s in v for v in got.values())]
    assert leaked == []
    others = set(got) - set(vsa.NOTIFY_ENV) - {"LC_CTYPE"}     # PEP 538 may add LC_CTYPE
    assert all(k.startswith("SNAPSHOT_") for k in others), sorted(others)
    assert os.path.isfile(str(tmp_path / "snaps" / name))


def test_the_command_is_an_argv_never_a_shell_in_its_own_process_group(tmp_path, probe_out):
    marks = [tmp_path / ("pwned-%d" % i) for i in range(4)]
    args = ["$(touch %s)" % marks[0], "; touch %s" % marks[1], "`touch %s`" % marks[2],
            "&& touch %s" % marks[3], ";", "|", "*", "a b", "$HOME", "'q'"]
    event = FAILED._replace(error="boom $(touch %s)" % marks[0])
    log, _ = deliver(load(tmp_path, notify_command=command("record", probe_out, *args)), event)
    (entry,) = entries(probe_out)
    assert entry["argv"][2:] == args
    assert entry["env"]["SNAPSHOT_ERROR"] == "boom $(touch %s)" % marks[0]
    assert [m.name for m in marks if m.exists()] == []
    assert entry["pgid"] == entry["pid"] == entry["sid"], entry      # a session and group of its own
    assert entry["pgid"] != os.getpgid(0)
    assert "Notified failed through notify_command" in log, log




@pytest.mark.parametrize("mode", [
    "sleep",
    "hang",
    pytest.param("hang-stubborn", marks=pytest.mark.slow),
])
def test_a_command_past_notify_timeout_is_killed_with_its_grandchildren(tmp_path, probe_out, mode):
    """``sleep``: the command and its grandchild sleep; ``hang``: the
    grandchild ignores SIGTERM; ``hang-stubborn``: both do (SIGKILL after
    the 2 s grace)."""
    cfg = load(tmp_path, notify_command=command(mode, probe_out), notify_timeout="1s")
    log, took = deliver(cfg)
    wait_for(lambda: len(entries(probe_out)) == 2, 2, "the probe's child and grandchild")
    assert "notify_command for failed killed after" in log, log
    assert "notify_command: probe sleeping" in log, log
    assert 0.9 <= took < 4.5, took
    assert all_dead([e["pid"] for e in entries(probe_out)], 1.0), alive(probe_out)


def test_huge_output_stays_bounded_and_its_lines_are_logged_masked(tmp_path, probe_out, receivers):
    hook = receivers()
    line = "secret_id %s webhook %s" % (SECRET_ID, hook.url)
    cfg = load(tmp_path, notify_command=command("flood", probe_out, line, 64), notify_url=hook.url,
               notify_timeout="20s")
    tracemalloc.start()
    try:
        log, took = deliver(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, "peak %.1f MiB for 64 MiB of output" % (peak / MiB)
    shown = [ln.split("notify_command: ", 1)[1] for ln in log.splitlines() if "notify_command: " in ln]
    assert shown[0].startswith("secret_id *** webhook ") and shown[0].endswith("***"), shown[0]
    assert 2 <= len(shown) <= 20 and all(len(text) <= 300 for text in shown), len(shown)
    assert SECRET_ID not in log and hook.path not in log
    assert "Notified failed through notify_command" in log, log[-2000:]
    assert len(hook.posts) == 1


def test_a_command_that_exits_non_zero_is_an_error_line(tmp_path, probe_out):
    log, _ = deliver(load(tmp_path, notify_command=command("fail", probe_out)))
    errors = error_lines(log)
    assert len(errors) == 1 and "notify_command for failed exited with 3 after" in errors[0], log
    assert " INFO notify_command: probe failing" in log, log


@pytest.mark.parametrize("program", ["no-such-notifier-here", "/nonexistent/bin/notify", "plain-file"])
def test_a_command_that_cannot_run_is_one_config_error_line_at_load(tmp_path, program):
    if program == "plain-file":
        program = str(tmp_path / "notify.sh")
        with open(program, "w") as handle:
            handle.write("#!/bin/sh\nexit 0\n")
        os.chmod(program, 0o644)
    path = write_config(tmp_path, {"addr": "http://127.0.0.1:9", "role_id": "r", "secret_id": SECRET_ID,
                                   "local_storage": {"path": str(tmp_path / "snaps")},
                                   "notify_command": [program, "--page"]})
    for extra in (["--check-config"], ["--once"]):
        code, log = run_main("-c", path, *extra)
        assert code == 2, log
        errors = error_lines(log)
        assert len(errors) == 1 and len(log.strip().splitlines()) == 1, log
        assert "notify_command" in errors[0] and program in errors[0], errors
        assert "Traceback" not in log


@pytest.mark.parametrize("url", ["https://hooks.example.test%s", "hooks.example.test%s", "ftp://h%s"])
def test_the_webhook_url_is_never_shown_by_check_config_or_a_config_error(tmp_path, url):
    secret = "/services/T000/B000/%s" % os.urandom(12).hex()
    known_secrets(secret)
    path = write_config(tmp_path, {"addr": "http://127.0.0.1:9", "role_id": "r", "secret_id": SECRET_ID,
                                   "local_storage": {"path": str(tmp_path / "snaps")},
                                   "notify_url": url % secret})
    stream, out = io.StringIO(), io.StringIO()
    code = vsa.main(["-c", path, "--check-config"], stream=stream, out=out)
    shown = stream.getvalue() + out.getvalue()
    assert code == (0 if url.startswith("https:") else 2), shown
    assert secret not in shown and secret.rsplit("/", 1)[1] not in shown, shown
    assert "notify_url" in shown, shown


# =============================================================================
# notify_url
# =============================================================================


def test_the_webhook_gets_one_json_post_with_the_text_and_the_facts(tmp_path, receivers):
    hook = receivers()
    event = vsa.Event("failed", "local, offsite", "", "upload failed: HTTP 403 AccessDenied", 2, NOW)
    log, _ = deliver(load(tmp_path, notify_url=hook.url), event)
    (post,) = hook.posts
    assert (post.method, post.path) == ("POST", hook.path)
    assert post.headers["content-type"] == "application/json"
    doc = post.json()
    assert set(doc) == DOCUMENT_KEYS
    assert doc == {"text": "Vault snapshots FAILING on %s: storage local, offsite, 2 in a row - upload "
                           "failed: HTTP 403 AccessDenied" % HOST,
                   "event": "failed", "storage": "local, offsite", "snapshot": "",
                   "error": "upload failed: HTTP 403 AccessDenied", "failures": 2, "host": HOST,
                   "time": "2026-01-01T00:16:40Z", "agent": "%s %s" % (vsa.PROG, vsa.__version__)}
    assert "Notified failed through notify_url http://127.0.0.1" in log, log


def _outcome_url(tmp_path, receivers, outcome):
    """The notify_url of a receiver (or a closed port) giving ``outcome``."""
    if outcome == "refused":
        return "http://127.0.0.1:%d/services/T000/B000/%s" % (free_port(), os.urandom(12).hex())
    if outcome == "tls":            # a private CA the agent is not told about
        _, cert, key = make_private_ca(tmp_path)
        return receivers(tls=(cert, key)).url
    answers = {"stored": Answer(200), "timeout": Answer(200, delay=3.0),
               "redirect": Answer(302, {"Location": "http://127.0.0.1:9/x"}, b""),
               "error": Answer(500, None, b"")}
    hook = receivers(answers[outcome])
    if outcome == "error":          # the receiver quotes the path it was asked for
        hook.answers[:] = [Answer(500, None, ("no such hook: %s" % hook.path).encode())]
    return hook.url


@pytest.mark.parametrize("outcome", ["stored", "error", "refused", "timeout", "redirect", "tls"])
def test_the_webhook_path_never_reaches_the_log(tmp_path, receivers, outcome):
    url = _outcome_url(tmp_path, receivers, outcome)
    path = url.split("127.0.0.1", 1)[1].split("/", 1)[1]
    known_secrets(path)
    log, _ = deliver(load(tmp_path, notify_url=url, notify_timeout="1s"))
    lines = [ln for ln in log.splitlines() if "notify_url" in ln]
    assert len(lines) == 1, log
    assert ("notify_url %s://127.0.0.1 " % url.split(":")[0]) in lines[0] + " ", lines
    assert path not in log and path.rsplit("/", 1)[1] not in log and "/services" not in log, log
    assert (" INFO " in lines[0]) == (outcome == "stored"), lines


def test_a_redirect_is_not_followed(tmp_path, receivers):
    elsewhere = receivers()
    hook = receivers(Answer(307, {"Location": elsewhere.url}, b""))
    log, _ = deliver(load(tmp_path, notify_url=hook.url))
    assert len(hook.posts) == 1 and elsewhere.posts == []
    errors = error_lines(log)
    assert len(errors) == 1 and "HTTP 307 (redirects are not followed)" in errors[0], log


@pytest.mark.parametrize("answers, posts", [
    pytest.param([Answer(429, {"Retry-After": "0"}, b"rate limited")] * 5, 3, id="429-always"),
    pytest.param([Answer(503)], 2, id="503-then-200"),
    pytest.param([Answer(503, {"Retry-After": "30"})], 1, id="retry-after-past-the-deadline"),
    pytest.param([Answer(500)], 1, id="500-not-retried"),
])
def test_429_and_503_are_tried_three_times_at_most(tmp_path, receivers, answers, posts):
    hook = receivers(*answers)
    log, took = deliver(load(tmp_path, notify_url=hook.url, notify_timeout="10s"))
    assert len(hook.posts) == posts, (hook.posts, log)
    gaps = [b.at - a.at for a, b in zip(hook.posts, hook.posts[1:])]
    assert all(0.95 <= gap / step < 1.5 for gap, step in zip(gaps, (1.0, 2.0))), gaps   # 1 s, then 2 s
    assert took < 4.0, took
    delivered = "Notified failed through notify_url" in log
    assert delivered == (posts == 2), log


def test_a_slow_receiver_is_abandoned_at_the_deadline_and_gets_the_event_once(tmp_path, receivers):
    hook = receivers(default=Answer(200, delay=3.0))
    log, took = deliver(load(tmp_path, notify_url=hook.url, notify_timeout="1s"))
    assert 0.9 <= took < 2.0, took
    assert len(hook.posts) == 1
    errors = error_lines(log)
    assert len(errors) == 1 and "within 1s" in errors[0], log


@pytest.mark.slow
def test_a_trickled_error_answer_is_abandoned_at_the_deadline(tmp_path, receivers):
    """The receiver answers 500 at once, then sends its body one byte every
    0.3 s (it gives up after 3 s): 300 bytes would take 90 s."""
    hook = receivers(default=Answer(500, trickle=0.3), limit_s=3.0)
    log, took = deliver(load(tmp_path, notify_url=hook.url, notify_timeout="1s"))
    assert len(hook.posts) == 1
    assert took < 2.5, "the notification took %.1fs with notify_timeout 1s" % took


@pytest.mark.parametrize("status", [500, 200])
def test_a_huge_answer_body_is_not_read(tmp_path, receivers, status):
    hook = receivers(default=Answer(status, endless=True))
    log, took = deliver(load(tmp_path, notify_url=hook.url, notify_timeout="5s"))
    assert took < 1.0, took
    assert hook.sent < 32 * MiB, "the receiver could send %.0f MiB" % (hook.sent / MiB)
    line = [ln for ln in log.splitlines() if "notify_url" in ln][0]
    if status == 200:
        assert "Notified failed through notify_url" in line, log
    else:
        assert "HTTP 500: eeee" in line and len(line) < 400, line


def test_https_with_a_private_ca_needs_notify_ca_cert(tmp_path, receivers):
    ca, cert, key = make_private_ca(tmp_path)
    hook = receivers(tls=(cert, key))
    log, _ = deliver(load(tmp_path, notify_url=hook.url, notify_ca_cert=ca))
    assert "Notified failed through notify_url https://127.0.0.1" in log, log
    assert [p.json()["event"] for p in hook.posts] == ["failed"]
    # Without it: the system's CAs refuse the certificate, logged; the next event is tried too.
    log, _ = deliver(load(tmp_path, notify_url=hook.url), FAILED, FAILED._replace(event="recovered"))
    errors = error_lines(log)
    assert len(errors) == 2 and all("CERTIFICATE_VERIFY_FAILED" in e for e in errors), log
    assert "Traceback" not in log and len(hook.posts) == 1


def test_the_environment_proxy_carries_the_webhook(tmp_path, receivers, proxy):
    """HTTPS_PROXY (the real tinyproxy, with a password) and a webhook by a
    host name: one CONNECT to it, TLS inside with the private CA; neither
    the proxy's password nor the webhook's path in the log."""
    alias = loopback_alias()
    ca, cert, key = make_private_ca(tmp_path, hosts=(alias, "127.0.0.1"))
    hook = receivers(tls=(cert, key), host=alias)
    mark = proxy.mark()
    env = {"PATH": os.environ.get("PATH", os.defpath), "HTTPS_PROXY": proxy.url, "NO_PROXY": ""}
    log, _ = deliver(load(tmp_path, notify_url=hook.url, notify_ca_cert=ca), env=env)
    assert "Notified failed through notify_url https://%s" % alias in log, log
    assert [p.json()["event"] for p in hook.posts] == ["failed"]
    assert proxy.requests(mark) == ["CONNECT %s:%d" % (alias, hook.port)]
    assert proxy.password not in log and hook.path not in log


# =============================================================================
# events through the Agent
# =============================================================================


def daemon_posts(tmp_path, hook, seconds, on_leader=None, sealed=None, **config):
    """The daemon for ``seconds`` of fake time with ``notify_url`` at
    ``hook``, then its notifications delivered: (posted documents, log, vault)."""
    clock = fake_clock()
    with ScriptedVault(clock, on_leader=on_leader) as vault:
        if sealed is not None:
            vault.sealed = sealed
        agent, log = run_daemon(tmp_path, vault, clock, FakeSignals(clock, until=START + seconds),
                                notify_url=hook.url, notify_timeout="5s", retry_interval="1m",
                                **config)
        agent.alerts.close(wait=True)
    return [p.json() for p in hook.posts], log, vault


def fixed_after(tmp_path, seconds):
    """A local path that cannot be created (under a regular file) until the
    first sys/leader request ``seconds`` after START: (path, on_leader)."""
    blocker = tmp_path / "afile"
    blocker.write_bytes(b"not a directory")

    def on_leader(t):
        if t > seconds and blocker.is_file():
            blocker.unlink()
    return str(blocker / "snaps"), on_leader


def two_locals(tmp_path, second=None):
    return [{"name": "good", "path": str(tmp_path / "good")},
            {"name": "bad", "path": second or str(tmp_path / "bad")}]


def test_a_storage_failing_three_cycles_notifies_failed_once_then_recovered_once(tmp_path, receivers):
    bad, on_leader = fixed_after(tmp_path, 250)      # fails at 0, 60 and 180 s; stores at 420 s
    docs, log, _ = daemon_posts(tmp_path, receivers(), 2 * HOUR, on_leader,
                                local_storage=two_locals(tmp_path, bad))
    assert log.count("Preparing bad") == 3 and "(3 failed in a row)" in log, log
    assert [(d["event"], d["storage"]) for d in docs] == [("failed", "bad"), ("recovered", "bad")]
    assert "Not a directory" in docs[0]["error"] and docs[0]["failures"] == 1
    assert os.path.isfile(os.path.join(bad, docs[1]["snapshot"]))
    assert docs[1]["time"] == vsa.iso(NOW + datetime.timedelta(seconds=420))


def test_recovered_says_how_many_cycles_had_failed(tmp_path, receivers):
    bad, on_leader = fixed_after(tmp_path, 250)
    docs, log, _ = daemon_posts(tmp_path, receivers(), HOUR, on_leader,
                                local_storage=two_locals(tmp_path, bad))
    recovered = [d for d in docs if d["event"] == "recovered"]
    assert len(recovered) == 1, docs
    assert recovered[0]["failures"] == 3 and "3 in a row" in recovered[0]["text"], recovered[0]


def test_a_cycle_failing_before_any_upload_notifies_failed_once_for_all_its_storages(
        tmp_path, receivers):
    docs, log, vault = daemon_posts(tmp_path, receivers(), HOUR, sealed=lambda t: t < 200,
                                    local_storage=two_locals(tmp_path))
    assert log.count("Snapshot cycle failed") == 3 and vault.snapshot_times() == [420.0], log
    assert [(d["event"], d["storage"]) for d in docs] == [
        ("failed", "good, bad"), ("recovered", "good"), ("recovered", "bad")]


def test_the_failed_event_says_why_when_vault_shares_the_webhooks_host(tmp_path, receivers):
    docs, log, _ = daemon_posts(tmp_path, receivers(), 600, sealed=lambda t: t < 200)
    assert docs and docs[0]["event"] == "failed", docs
    assert "sealed" in docs[0]["error"] and "credential" not in docs[0]["error"], docs[0]


def test_a_snapshot_gone_bad_notifies_verify_failed_once(tmp_path, receivers):
    """verify_frequency 24h over everything stored: the first snapshot is
    corrupted an hour in; the re-verifications at 24 h and 48 h both find
    it bad; one event, at the first."""
    snaps, corrupted = tmp_path / "snaps", []

    def on_leader(t):
        if t > HOUR - 60 and not corrupted:
            target = snaps / sorted(os.listdir(str(snaps)))[0]
            data = target.read_bytes()
            target.write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:110]) + data[110:])
            corrupted.append(target.name)
    docs, log, _ = daemon_posts(tmp_path, receivers(), 2 * DAY + 2 * HOUR, on_leader, leader_poll="30m",
                                local_storage={"path": str(snaps), "retain": 100,
                                               "verify_frequency": "24h", "verify_scope": "all"})
    assert log.count("Re-verification of local:%s: " % snaps) == 3, log
    assert [(d["event"], d["snapshot"]) for d in docs] == [("verify_failed", corrupted[0])], docs
    assert docs[0]["time"] == vsa.iso(NOW + datetime.timedelta(days=1))
    assert docs[0]["failures"] == 1 and docs[0]["error"], docs[0]


def test_retention_failing_twice_notifies_retention_failed_once_per_streak(
        tmp_path, receivers, monkeypatch):
    """Deletes fail at the cycle and its first retry, work at the second
    retry, fail again the next day, then work: two events, one per streak."""
    for days in (2, 3, 4):
        plant(tmp_path / "snaps", NOW - datetime.timedelta(days=days))
    attempts, delete = [], vsa.LocalStorage.delete

    def flaky_delete(storage, names):
        attempts.append(names)
        if len(attempts) in (1, 2, 4):
            raise vsa.StorageError("cannot delete %s: Read-only file system" % names[0])
        return delete(storage, names)
    monkeypatch.setattr(vsa.LocalStorage, "delete", flaky_delete)
    docs, log, vault = daemon_posts(tmp_path, receivers(), DAY + HOUR, frequency="24h",
                                    local_storage={"path": str(tmp_path / "snaps"), "retain": 2})
    assert len(attempts) == 5 and vault.snapshot_times() == [0.0, DAY], (attempts, log)
    assert [(d["event"], d["time"]) for d in docs] == [
        ("retention_failed", vsa.iso(NOW)), ("retention_failed", vsa.iso(NOW + datetime.timedelta(days=1)))]
    assert "Read-only file system" in docs[0]["error"]


@pytest.mark.parametrize("events, expected", [
    (None, []),
    (["stored"], ["stored", "stored"]),
    (["failed", "recovered", "stored"], ["stored", "stored"]),
])
def test_stored_is_sent_only_when_listed(tmp_path, receivers, events, expected):
    config = {"notify_events": events} if events else {}
    docs, log, _ = daemon_posts(tmp_path, receivers(), HOUR + 60, **config)
    assert [d["event"] for d in docs] == expected, log
    assert sorted(d["snapshot"] for d in docs) == sorted(os.listdir(str(tmp_path / "snaps")))[:len(docs)]


@pytest.mark.parametrize("events, expected", [
    (["recovered"], ["recovered"]), (["failed"], ["failed"]), (["verify_failed"], []),
])
def test_an_event_left_out_of_notify_events_is_not_sent(tmp_path, receivers, events, expected):
    bad, on_leader = fixed_after(tmp_path, 250)
    docs, log, _ = daemon_posts(tmp_path, receivers(), HOUR, on_leader, notify_events=events,
                                local_storage=two_locals(tmp_path, bad))
    assert "Created snapshot directory %s" % bad in log, log       # it failed, then recovered
    assert [d["event"] for d in docs] == expected


def test_once_with_a_failing_cycle_exits_1_after_notifying(tmp_path, receivers, probe_out):
    """main(--once): the cycle fails (Vault sealed); main returns 1 only
    after the command ran and the webhook answered, 2.3 s later (longer
    than a stop's 2 s wait for the notifications)."""
    hook = receivers(default=Answer(200, delay=2.3))
    with ScriptedVault(fake_clock()) as vault:
        vault.sealed = lambda t: True
        path = write_config(tmp_path, {"addr": vault.url, "role_id": "r", "secret_id": SECRET_ID,
                                       "local_storage": {"path": str(tmp_path / "snaps")},
                                       "notify_url": hook.url,
                                       "notify_command": command("record", probe_out)})
        code, log = run_main("-c", path, "--once")
    assert code == 1, log
    assert [e["env"]["SNAPSHOT_EVENT"] for e in entries(probe_out)] == ["failed"]
    assert [p.json()["event"] for p in hook.posts] == ["failed"]
    assert "Notified failed through notify_command" in log, log
    assert "Notified failed through notify_url http://127.0.0.1" in log, log


def test_a_slow_webhook_never_delays_the_next_cycle(tmp_path, receivers):
    """Each POST is answered after 2 s; a day of hourly cycles, each
    notifying ``stored``, runs in a fraction of one POST."""
    hook = receivers(default=Answer(200, delay=2.0))
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        began = time.monotonic()
        agent, log = run_daemon(tmp_path, vault, clock, FakeSignals(clock, until=START + DAY - 60),
                                notify_url=hook.url, notify_events=["stored"], notify_timeout="5s")
        took = time.monotonic() - began
        hook.stop()                 # the POST in progress ends now: the stop need not wait for it
        agent.alerts.close(wait=False)
    assert len(vault.snapshot_times()) == 24, log
    assert took < 1.5, "24 cycles took %.1fs behind a 2 s webhook" % took
    assert len(hook.posts) <= 1


# =============================================================================
# a stop
# =============================================================================


@pytest.mark.parametrize("mode", [
    "sleep",
    "hang",
    pytest.param("hang-stubborn", marks=pytest.mark.slow),
])
def test_sigterm_kills_a_running_command_group_promptly(tmp_path, probe_out, mode):
    """The daemon (a real process) runs the command on ``stored`` with
    notify_timeout 60s; SIGTERM while it runs: its group is gone within
    3 s and the agent exits 0."""
    with FakeVault(role_id="r", secret_id=SECRET_ID) as vault:
        path = write_config(tmp_path, {"addr": vault.url, "role_id": "r", "secret_id": SECRET_ID,
                                       "leader_poll": "0s", "local_storage": {"path": str(tmp_path / "s")},
                                       "notify_command": command(mode, probe_out),
                                       "notify_events": ["stored"], "notify_timeout": "60s"})
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(tmp_path)}
        with reaped(start_agent(path, tmp_path / "agent.log", sys.executable, env=env)) as proc:
            wait_for(lambda: len(entries(probe_out)) == 2, 15, "the command and its grandchild")
            began = time.monotonic()
            code = stop(proc, signal.SIGTERM, timeout=10)
            gone = all_dead([e["pid"] for e in entries(probe_out)], max(0.0, began + 3.0 - time.monotonic()))
            took = time.monotonic() - began
    log = (tmp_path / "agent.log").read_text()
    assert code == 0, log
    assert gone, "alive %.1fs after SIGTERM: %s" % (took, alive(probe_out))
    assert "Stopping on SIGTERM" in log and "Traceback" not in log, log
