"""Issue 14, part 2: names and values from storage listings.

Whoever can write into a storage chooses the names and values the agent
lists there.  A planted far-future name must not stop the schedule, crash
the daemon or make retention delete real snapshots; a name that only looks
like a snapshot's (a trailing newline, non-ASCII digits) is not one; sizes
are read defensively; a listing that never ends and a GCS session that never
makes progress fail their storage instead of holding the agent for ever; a
local_storage directory others may write to is warned about.

The hostile stores are loopback servers (hostile_servers.py), Vault a
FakeVault (fake_endpoints.py) or the real cluster; a run that
would hang an unfixed agent ends on the server's ``limit`` or a subprocess
timeout, which are safety nets, never what a test asserts.
"""

import datetime
import json
import os
import signal

import pytest

import vault_snapshot_agent as vsa
from support.archives import build_archive, write_archive
from support.harness import (CLOUD_ENV_PREFIXES, FakeSignals, captured_log, child_env,
                             clear_cloud_env, error_lines, read, reaped, run_main, snapshots,
                             start_agent, stop, wait_for)
from support.fake_endpoints import FakeVault
from support.hostile_servers import (AzureListServer, GcsListServer, GcsStuckSession, S3ListServer,
                                     snapshot_names)
from support.agent_sim import StandbyVault, fake_clock

HOUR = datetime.timedelta(hours=1)
MINUTE = datetime.timedelta(minutes=1)

# Names an attacker (or a host with a broken clock) planted: two in 2099, the
# last millisecond of year 9999 (one hour later overflows datetime), and the
# largest Go-agent name (20 digits of nanoseconds: the year 5138).
PLANTED = ["raft_snapshot-20990101T000000.000Z.snap", "raft_snapshot-20991231T000000.000Z.snap",
           "raft_snapshot-99991231T235959.999Z.snap", "raft_snapshot-99999999999999999999.snap"]

LISTINGS = {"s3": S3ListServer, "azure": AzureListServer, "gcs": GcsListServer}


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    """No credentials, emulator hosts or Vault settings from the environment
    (in-process runs and, through child_env(), subprocesses)."""
    clear_cloud_env(monkeypatch, tmp_path, CLOUD_ENV_PREFIXES + ("VAULT_", "BAO_"))


# -- helpers -------------------------------------------------------------------


def name_at(when):
    return vsa.snapshot_name(when)


def real_now():
    return datetime.datetime.now(vsa.UTC)


def write_config(tmp_path, config, name="c.json"):
    full = {"addr": "http://127.0.0.1:1", "role_id": "r", "secret_id": "s"}
    full.update(config)
    path = str(tmp_path / name)
    with open(path, "w") as handle:
        json.dump(full, handle)
    return path


def plant(directory, names, content=None):
    """Create ``directory`` (0700) holding a file for each name; ``content``
    maps a name to its bytes (default b"x")."""
    directory = str(directory)
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o700)
    for name in names:
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write((content or {}).get(name, b"x"))
    return directory


def future_warnings(log, name):
    """WARNING lines saying ``name`` is in the future."""
    return [line for line in log.splitlines()
            if " WARNING " in line and "in the future" in line and name in line]


def fake_vault_config(vault, **extra):
    """Top-level config keys pointing the agent at a FakeVault."""
    config = {"addr": vault.url, "role_id": "fake-role", "secret_id": "fake-secret"}
    config.update(extra)
    return config


def snapshot_requests(vault):
    return [r for r in vault.requests
            if r.method == "GET" and r.path.startswith("/v1/sys/storage/raft/snapshot")]


def make_agent(config_path, clock, until):
    return vsa.Agent(lambda runtime: vsa.load_all(config_path, runtime), clock,
                     FakeSignals(clock, until), StandbyVault)


def local_store(path, retain, clock=None):
    """A LocalStorage keeping the newest ``retain`` snapshots; ``clock``
    defaults to the real one."""
    runtime = vsa.Runtime({}, clock or vsa.Clock(), FakeSignals())
    return vsa.LocalStorage(path, vsa.Policy(retain, 0, 3600.0), runtime)


# -- far-future names: schedule, retention, download latest --------------------


def test_the_schedule_ignores_far_future_names_and_warns(tmp_path):
    clock = fake_clock()
    now = clock.now()
    real = [name_at(now - 3 * HOUR), name_at(now - 30 * MINUTE)]
    snapdir = plant(tmp_path / "snaps", real + PLANTED)
    agent = make_agent(write_config(tmp_path, {"frequency": "1h", "local_storage": {"path": snapdir}}),
                       clock, until=clock.monotonic() + 10)
    with captured_log() as stream:
        agent.plan()
    # Due one frequency after the newest REAL snapshot: in 30 minutes, not in 2099.
    assert agent.due_at(agent.storages[0]) == now + 30 * MINUTE
    log = stream.getvalue()
    for name in PLANTED:
        assert future_warnings(log, name), "no 'in the future' warning for %s:\n%s" % (name, log)
    assert sorted(os.listdir(snapdir)) == sorted(real + PLANTED)


def test_five_minutes_of_clock_skew_are_tolerated_more_is_the_future(tmp_path):
    clock = fake_clock()
    now = clock.now()
    skewed, future = name_at(now + 2 * MINUTE), name_at(now + 10 * MINUTE)
    snapdir = plant(tmp_path / "snaps", [name_at(now - 2 * HOUR), skewed, future])
    agent = make_agent(write_config(tmp_path, {"frequency": "1h", "local_storage": {"path": snapdir}}),
                       clock, until=clock.monotonic() + 10)
    with captured_log() as stream:
        agent.plan()
    # 2 minutes ahead (another host's clock) is a snapshot; 10 minutes ahead is not.
    assert agent.due_at(agent.storages[0]) == now + 2 * MINUTE + HOUR
    log = stream.getvalue()
    assert future_warnings(log, future), log
    assert not future_warnings(log, skewed), log


def test_the_daemon_loop_starts_at_once_despite_planted_names(tmp_path):
    StandbyVault.calls = []
    clock = fake_clock()
    now = clock.now()
    snapdir = plant(tmp_path / "snaps", [name_at(now - 2 * HOUR)] + PLANTED)
    # leader_poll off: the counted is_leader calls are then the cycles'.
    agent = make_agent(write_config(tmp_path, {"frequency": "1h", "leader_poll": "0s",
                                               "local_storage": {"path": snapdir}}),
                       clock, until=clock.monotonic() + 2 * 3600 + 1)
    with captured_log():
        agent.run_forever()       # the old agent: OverflowError, or a first cycle in 2099
    assert [t for t, _ in StandbyVault.calls] == [1000, 4600, 8200]


def test_retention_keeps_the_newest_real_snapshots_and_never_deletes_planted_ones(tmp_path):
    clock = fake_clock()
    now = clock.now()
    older, old, new = name_at(now - 3 * HOUR), name_at(now - 2 * HOUR), name_at(now)
    snapdir = plant(tmp_path / "snaps", [older, old, new] + PLANTED)
    store = local_store(snapdir, 2, clock)
    with captured_log():
        deleted = vsa.apply_retention(store, keep=new, now=now)
    assert deleted == [older]
    assert sorted(os.listdir(snapdir)) == sorted([old, new] + PLANTED)


def test_download_latest_picks_the_newest_real_snapshot_and_names_still_work(tmp_path):
    now = real_now()
    older, newest = name_at(now - 2 * HOUR), name_at(now - HOUR)
    content = {older: build_archive(state=b"o" * 4096, index=10),
               newest: build_archive(state=b"n" * 4096, index=11)}
    for name in PLANTED:
        content[name] = build_archive(state=b"p" * 4096, index=99)
    snapdir = plant(tmp_path / "snaps", sorted(content), content)
    config = write_config(tmp_path, {"local_storage": {"path": snapdir}})
    latest, named = str(tmp_path / "latest.snap"), str(tmp_path / "named.snap")
    code, log = run_main("-c", config, "download", "latest", "-o", latest)
    assert code == 0, log
    assert vsa.verify_file(latest).index == 11
    code, log = run_main("-c", config, "download", PLANTED[0], "-o", named)
    assert code == 0, log
    assert vsa.verify_file(named).index == 99


def test_list_still_shows_far_future_names(tmp_path, capsys):
    now = real_now()
    snapdir = plant(tmp_path / "snaps", [name_at(now - HOUR)] + PLANTED)
    code, log = run_main("-c", write_config(tmp_path, {"local_storage": {"path": snapdir}}), "list")
    out = capsys.readouterr().out
    assert code == 0, log
    for name in PLANTED + [name_at(now - HOUR)]:
        assert name in out, out


def sigterm_the_daemon(config, logfile, ready, what):
    """Start the daemon (a subprocess) on ``config``, wait (30 s at most)
    until ``ready()`` -- failing if the daemon exited first --, then SIGTERM
    it: its exit status (a daemon still running after 15 s fails the test;
    one left running by a failure is killed)."""
    with reaped(start_agent(config, str(logfile), env=child_env())) as proc:
        wait_for(lambda: proc.poll() is not None or ready(), 30, what)
        assert proc.poll() is None, "the daemon exited with %s:\n%s" % (proc.returncode, read(logfile))
        return stop(proc, signal.SIGTERM, timeout=15)


def _daemon_with_planted_names(tmp_path, vault_config, secrets=()):
    """The daemon (a subprocess) on a local_storage holding two old real
    snapshots and the PLANTED names, retain 2: it snapshots at start, retention
    keeps the new one, the newest old one and every planted name; a SIGTERM
    then ends it with 0."""
    now = real_now()
    older, old = name_at(now - 3 * HOUR), name_at(now - 2 * HOUR)
    snapdir = plant(tmp_path / "snaps", [older, old] + PLANTED)
    config = dict(vault_config, frequency="1h", local_storage={"path": snapdir, "retain": 2})
    logfile = tmp_path / "agent.log"
    code = sigterm_the_daemon(write_config(tmp_path, config), logfile,
                              lambda: " Cycle " in read(logfile), "the first cycle to end")
    log = read(logfile)
    assert code == 0, log
    assert "Traceback" not in log and not error_lines(log), log
    new = sorted(set(snapshots(snapdir)) - set([older, old] + PLANTED))
    assert len(new) == 1, log
    vsa.verify_file(os.path.join(snapdir, new[0]))
    assert sorted(os.listdir(snapdir)) == sorted(new + [old] + PLANTED), log
    for name in PLANTED:
        assert future_warnings(log, name), "no 'in the future' warning for %s:\n%s" % (name, log)
    for secret in secrets:
        assert secret not in log


def test_the_daemon_snapshots_at_start_whatever_names_are_planted(tmp_path):
    with FakeVault() as vault:
        _daemon_with_planted_names(tmp_path, fake_vault_config(vault))
        assert len(snapshot_requests(vault)) == 1


def test_the_daemon_against_openbao_snapshots_at_start_whatever_names_are_planted(
        bao_cluster, approle, tmp_path):
    _daemon_with_planted_names(tmp_path, {"addr": bao_cluster.leader().addr,
                                          "role_id": approle.role_id,
                                          "secret_id": approle.secret_id,
                                          "approle": approle.mount},
                               secrets=[approle.secret_id])


# -- strict names ----------------------------------------------------------------

LOOKALIKES = {
    "own-newline": "raft_snapshot-20261127T205239.123Z.snap\n",
    "go-newline": "raft_snapshot-1700000000000000000.snap\n",
    "go-fullwidth": "raft_snapshot-\uff11\uff17" + "\uff10" * 17 + ".snap",
    "own-fullwidth": "raft_snapshot-\uff12\uff10\uff12\uff16\uff11\uff11\uff12\uff17T205239.123Z.snap",
    "own-arabic-indic": "raft_snapshot-\u0662\u0660\u0662\u0666\u0661\u0661\u0662\u0667T205239.123Z.snap",
}


@pytest.mark.parametrize("kind", sorted(LOOKALIKES))
def test_names_that_only_look_like_snapshots_are_not_snapshots(tmp_path, kind):
    lookalike = LOOKALIKES[kind]
    assert vsa.parse_snapshot_name(lookalike) is None
    now = real_now()
    older, newest = name_at(now - 2 * HOUR), name_at(now - HOUR)
    snapdir = plant(tmp_path / "snaps", [older, newest, lookalike])
    store = local_store(snapdir, 1)
    assert sorted(ref.name for ref in store.list()) == [older, newest]
    with captured_log():
        assert vsa.apply_retention(store, keep=newest, now=now) == [older]
    assert sorted(os.listdir(snapdir)) == sorted([newest, lookalike])


# -- listing fields --------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(LISTINGS))
def test_odd_sizes_in_a_listing_count_as_zero(tmp_path, capsys, kind):
    odd, normal = snapshot_names(0, 2)
    with LISTINGS[kind]("odd_size") as server:
        code, err = run_main("-c", write_config(tmp_path, server.storage_block()), "list")
    out = capsys.readouterr().out
    assert code == 0, err
    assert "Traceback" not in err and not error_lines(err), err
    lines = out.splitlines()
    assert [line for line in lines if line.endswith(" 0 B  " + odd)], out
    assert [line for line in lines if line.endswith(normal)], out


# -- listings that never end -----------------------------------------------------


@pytest.mark.parametrize("kind", sorted(LISTINGS))
def test_a_listing_that_repeats_its_token_fails_with_repeated(tmp_path, kind):
    with LISTINGS[kind]("repeat", limit=300) as server:
        code, err = run_main("-c", write_config(tmp_path, server.storage_block()), "list")
        pages = server.count("list")
    assert code == 1, err
    assert "Traceback" not in err, err
    assert [line for line in error_lines(err) if "repeated" in line], err
    assert pages < 10, "%d pages listed before giving up" % pages


@pytest.mark.slow
def test_a_listing_of_more_than_the_page_cap_fails(tmp_path, monkeypatch):
    # The cap is MAX_LIST_PAGES (10,000 pages, 10 million objects); 10,050
    # real pages took 6-8 s, so the test lowers the cap to 50 and runs main()
    # in this process.
    monkeypatch.setattr(vsa, "MAX_LIST_PAGES", 50)
    with GcsListServer("endless", page_keys=1, limit=100) as server:
        code, err = run_main("-c", write_config(tmp_path, server.storage_block()), "list")
        pages = server.count("list")
    assert code == 1, err
    assert [line for line in error_lines(err) if "more than 50 pages" in line], err
    assert pages <= 51


@pytest.mark.parametrize("kind", sorted(LISTINGS))
def test_sigterm_during_a_listing_that_never_ends_stops_the_daemon(tmp_path, kind):
    # A new token on every page, slowly: the daemon is still planning its
    # schedule (listing) when the SIGTERM comes.
    with LISTINGS[kind]("endless", delay=0.05) as server:
        config = write_config(tmp_path, dict(server.storage_block(), frequency="1h"))
        logfile = tmp_path / "agent.log"
        code = sigterm_the_daemon(config, logfile, lambda: server.count("list") >= 3,
                                  "the daemon to list a few pages")
    log = read(logfile)
    assert code == 0, log
    assert "Traceback" not in log, log


# -- a GCS session that never makes progress -------------------------------------


def test_a_gcs_session_that_never_makes_progress_fails_the_upload(tmp_path):
    staged = str(tmp_path / "staged.snap")
    write_archive(staged, state=os.urandom(1536 * 1024))     # > the 1 MiB chunk: resumable
    info = vsa.verify_file(staged)
    with GcsStuckSession(limit=50) as gcs:
        # No stop ever requested, and waits (retry backoffs) return at once.
        runtime = vsa.Runtime.create(signals=FakeSignals())
        _, storages = vsa.load_all(write_config(tmp_path, gcs.storage_block()), runtime)
        storage = storages[0]
        with captured_log(), pytest.raises(vsa.StorageError) as caught:
            storage.upload(info, name_at(real_now()))
        chunks = gcs.count("chunk")
    assert "no progress" in str(caught.value)
    assert chunks <= 10, "%d chunk PUTs to a session that never moved" % chunks


def test_once_with_a_stuck_gcs_session_stores_locally_and_exits_1(tmp_path):
    snapdir = tmp_path / "snaps"
    with FakeVault(archive=build_archive(state=os.urandom(1536 * 1024))) as vault, \
            GcsStuckSession(limit=50) as gcs:
        config = fake_vault_config(vault, local_storage={"path": str(snapdir)}, **gcs.storage_block())
        code, log = run_main("-c", write_config(tmp_path, config), "--once")
        chunks = gcs.count("chunk")
    assert code == 1, log
    assert len(snapshots(snapdir)) == 1, log
    assert [line for line in error_lines(log) if "no progress" in line], log
    assert chunks <= 10, "%d chunk PUTs to a session that never moved" % chunks


# -- a local_storage directory others may write to -------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o702], ids=lambda mode: "%04o" % mode)
def test_a_local_storage_directory_writable_by_others_is_warned_about(tmp_path, capsys, mode):
    snapdir = str(tmp_path / "snaps")
    os.mkdir(snapdir)
    os.chmod(snapdir, mode)
    code, log = run_main("-c", write_config(tmp_path, {"local_storage": {"path": snapdir}}),
                         "--check-config")
    capsys.readouterr()
    assert code == 0, log
    assert not error_lines(log), log
    assert [line for line in log.splitlines()
            if " WARNING " in line and "writable by" in line and "chmod" in line], log


def test_a_private_local_storage_directory_is_not_warned_about(tmp_path, capsys):
    snapdir = str(tmp_path / "snaps")
    os.mkdir(snapdir)
    os.chmod(snapdir, 0o700)
    code, log = run_main("-c", write_config(tmp_path, {"local_storage": {"path": snapdir}}),
                         "--check-config")
    capsys.readouterr()
    assert code == 0, log
    assert "writable by" not in log, log
