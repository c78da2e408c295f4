"""Sections "Clock and signals" and "Snapshot stream", attacked: signals the
kernel hands to any thread of a daemon (idle, mid-download), the signal mask
of the children it starts, the caller's signal state after an in-process
main(), and the write-back thread under stops, slow and failing flushes,
many cycles and descriptor reuse."""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import vault_snapshot_agent as vsa
from support.archives import build_archive
from support.fake_endpoints import FakeVault
from support.harness import child_env, free_port, reaped, read, run_main, thread_ids, wait_for

MB = 1024 * 1024
HANDLED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
AGENT_DIR = os.path.dirname(os.path.abspath(vsa.__file__))


# -- helpers -------------------------------------------------------------------


class TricklingVault(FakeVault):
    """A FakeVault whose snapshot answer arrives ``piece`` bytes every
    ``pause`` seconds (the connection ends after it)."""

    def __init__(self, archive, piece=64 * 1024, pause=0.02):
        FakeVault.__init__(self, archive=archive)
        self.piece, self.pause = piece, pause

    def answer(self, handler):
        if handler.path.split("?")[0] != "/v1/sys/storage/raft/snapshot" or handler.command != "GET":
            return FakeVault.answer(self, handler)
        handler.close_connection = True
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(self.archive))
        for at in range(0, len(self.archive), self.piece):
            handler.wfile.write(self.archive[at:at + self.piece])
            time.sleep(self.pause)
        raise ConnectionResetError("answer sent")       # LoopbackHandler ends the connection


class Answer:
    """A snapshot answer for stream_snapshot from bytes; ``at(n, fn)`` runs
    ``fn`` once ``n`` bytes have been handed out."""

    def __init__(self, data, at=None, hook=None):
        self.data, self.pos, self.at, self.hook = data, 0, at, hook

    def readinto(self, buffer):
        count = min(len(buffer), len(self.data) - self.pos, 128 * 1024)
        buffer[:count] = self.data[self.pos:self.pos + count]
        self.pos += count
        if self.hook is not None and self.pos >= self.at:
            self.hook, hook = None, self.hook
            hook()
        return count

    def abort(self):
        pass


def writeback_threads():
    return [t for t in threading.enumerate() if t.name == "writeback" and t.is_alive()]


def open_fds(pid="self"):
    return len(os.listdir("/proc/%s/fd" % pid))


def new_fds(before):
    """The descriptors open now that were not open (to the same file) when
    ``before = fd_targets()`` was taken: another test's thread closing one
    of its own meanwhile must not hide or fake a leak."""
    return sorted(set(fd_targets().items()) - set(before.items()))


def fd_targets():
    """This process's open descriptors and what each points to."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[fd] = os.readlink("/proc/self/fd/" + fd)
        except OSError:         # the directory's own descriptor, closed by now
            pass
    return found


def start_daemon(tmp_path, vault, step=256 * 1024, **keys):
    """The agent as a daemon subprocess with WRITEBACK_STEP ``step``, the
    metrics server on and a notify command that records its SigBlk line."""
    # Python, not sh: dash clears its signal mask at start and would hide ours.
    notify = tmp_path / "notify.py"
    notify.write_text("import os, time\nevent = os.environ['SNAPSHOT_EVENT']\n"
                      "status = open('/proc/self/status').read()\n"
                      "open(%r + '/sigblk.' + event, 'w').write(status[status.index('SigBlk'):])\n"
                      "open(%r + '/pid.' + event, 'w').write(str(os.getpid()))\ntime.sleep(30)\n"
                      % (str(tmp_path), str(tmp_path)))
    doc = {"addr": vault.url, "token": FakeVault.LOGIN_TOKEN, "frequency": "1h",
           "retry_interval": "1h", "local_storage": {"path": str(tmp_path / "snaps")},
           "metrics_address": "127.0.0.1:%d" % free_port(),
           "notify_command": [sys.executable, "-I", str(notify)],
           "notify_timeout": "20s", "notify_events": ["stored", "failed"]}
    doc.update(keys)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(doc))
    config.chmod(0o600)
    launcher = tmp_path / "launch.py"
    launcher.write_text("import sys\nsys.path.insert(0, %r)\nimport vault_snapshot_agent as v\n"
                        "v.WRITEBACK_STEP = %d\nsys.exit(v.main(sys.argv[1:]))\n" % (AGENT_DIR, step))
    handle = open(str(tmp_path / "log"), "ab")
    try:
        return subprocess.Popen([sys.executable, "-I", str(launcher), "-c", str(config)],
                                stdout=handle, stderr=subprocess.STDOUT,
                                env=child_env(drop_prefixes=("VAULT_", "BAO_", "AWS_")))
    finally:
        handle.close()


def process_state(pid):
    try:
        return read("/proc/%d/stat" % pid).rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def kill_pidfile(path):
    try:
        os.kill(int(path.read_text().strip()), signal.SIGKILL)
    except (OSError, ValueError):
        pass


# =============================================================================
# write-back: stops, slow and failing flushes, descriptors
# =============================================================================


@pytest.fixture
def small_step(monkeypatch):
    monkeypatch.setattr(vsa, "WRITEBACK_STEP", 256 * 1024)


@pytest.fixture
def stalled_flush(monkeypatch):
    """os.fdatasync stalls (up to 10 s, until ``release.set()``), then
    records the file it syncs; yields (release, seen)."""
    release, seen = threading.Event(), []

    def slow(fd):
        release.wait(10)
        seen.append(os.readlink("/proc/self/fd/%d" % fd))
    monkeypatch.setattr(os, "fdatasync", slow)
    yield release, seen
    release.set()


def test_a_stop_during_a_stalled_background_flush_ends_the_snapshot_at_once(tmp_path, small_step,
                                                                           stalled_flush):
    release, seen = stalled_flush
    signals = vsa.Signals()
    before = fd_targets()
    answer = Answer(build_archive(os.urandom(4 * MB)), at=2 * MB, hook=signals.request_stop)
    started = time.monotonic()
    with pytest.raises(vsa.Stopped):
        vsa.stream_snapshot(answer, str(tmp_path), signals, threaded=False)
    assert time.monotonic() - started < 1.5, "the stop waited for the flush"
    assert os.listdir(str(tmp_path)) == [], "a partial file was kept"
    release.set()
    wait_for(lambda: not writeback_threads(), 5, "the write-back thread to end")
    assert seen, "the flush thread ran"
    assert new_fds(before) == [], "a descriptor was left open"
    signals.close()


def test_the_flush_thread_never_syncs_a_descriptor_number_reused_after_the_stop(tmp_path, small_step,
                                                                               stalled_flush):
    # The staging descriptor is closed while the thread still sleeps in its
    # flush; its number goes to the next file opened: a late flush must hit
    # only the thread's own copy of the staging file.
    release, seen = stalled_flush
    signals = vsa.Signals()
    answer = Answer(build_archive(os.urandom(4 * MB)), at=MB, hook=signals.request_stop)
    with pytest.raises(vsa.Stopped):
        vsa.stream_snapshot(answer, str(tmp_path), signals, threaded=False)
    others = [open(str(tmp_path / ("other-%d" % i)), "wb") for i in range(4)]
    try:
        release.set()
        wait_for(lambda: not writeback_threads(), 5, "the write-back thread to end")
        synced = {os.path.basename(p).replace(" (deleted)", "") for p in seen}
        assert synced and all(n.startswith(".") for n in synced), synced
    finally:
        for handle in others:
            handle.close()
    signals.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failing_background_flush_is_one_error_line_and_the_next_cycle_stores(tmp_path, monkeypatch,
                                                                                small_step, code):
    def failing(fd):
        raise OSError(code, os.strerror(code))
    snaps = tmp_path / "snaps"
    with FakeVault(archive=build_archive(os.urandom(2 * MB))) as vault:
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"addr": vault.url, "token": FakeVault.LOGIN_TOKEN,
                                      "local_storage": {"path": str(snaps)}}))
        config.chmod(0o600)
        with monkeypatch.context() as patch:
            patch.setattr(os, "fdatasync", failing)
            status, log = run_main("-c", str(config), "--once")
        assert status == vsa.EXIT_FAILED, log
        errors = [line for line in log.splitlines() if "ERROR" in line and os.strerror(code) in line]
        assert len(errors) == 1, log
        assert "Traceback" not in log
        assert [n for n in os.listdir(str(snaps)) if not n.startswith(".")] == [], "a snapshot was kept"
        status, log = run_main("-c", str(config), "--once")
    assert status == vsa.EXIT_OK, log
    assert len(os.listdir(str(snaps))) == 1
    assert not writeback_threads()


def test_many_stopped_and_whole_snapshots_leave_no_thread_and_no_descriptor(tmp_path, small_step):
    archive = build_archive(os.urandom(3 * MB))
    before = fd_targets()
    for index in range(30):
        signals = vsa.Signals()
        stop_at = (index % 5) * 700 * 1024
        answer = Answer(archive, at=stop_at or len(archive) + 1, hook=signals.request_stop)
        try:
            info = vsa.stream_snapshot(answer, str(tmp_path), signals, threaded=index % 2 == 0)
            os.unlink(info.path)
        except vsa.Stopped:
            assert stop_at
        signals.close()
    wait_for(lambda: not writeback_threads(), 5, "the write-back threads to end")
    assert os.listdir(str(tmp_path)) == []
    assert new_fds(before) == []


def test_no_thread_left_for_the_flush_leaks_no_descriptor(tmp_path, small_step, monkeypatch):
    def no_thread(*args):
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(vsa, "start_thread", no_thread)
    archive = build_archive(os.urandom(2 * MB))
    signals = vsa.Signals()
    before = fd_targets()
    info = vsa.stream_snapshot(Answer(archive), str(tmp_path), signals, threaded=False)
    with open(info.path, "rb") as handle:
        assert handle.read() == archive
    assert new_fds(before) == [], "the flush's descriptor was left open"
    signals.close()


def test_a_slow_flush_delays_a_whole_snapshot_only_as_an_fsync_would(tmp_path, small_step, monkeypatch):
    def slow(fd):
        time.sleep(0.5)
    monkeypatch.setattr(os, "fdatasync", slow)
    archive = build_archive(os.urandom(2 * MB))
    info = vsa.stream_snapshot(Answer(archive), str(tmp_path), vsa.Signals(), threaded=False)
    with open(info.path, "rb") as handle:
        assert handle.read() == archive
    assert not writeback_threads(), "finish() returned before its flush ended"


# =============================================================================
# in-process main(): the caller's signal state is left as it was
# =============================================================================


def signal_state():
    """(this thread's blocked handled signals, the wakeup fd, the handlers)."""
    mask = HANDLED & set(signal.pthread_sigmask(signal.SIG_BLOCK, []))
    wakeup = signal.set_wakeup_fd(-1)
    if wakeup != -1:
        signal.set_wakeup_fd(wakeup)
    return mask, wakeup, [signal.getsignal(s) for s in sorted(HANDLED)]


def _config(tmp_path, vault, **keys):
    doc = {"addr": vault.url, "token": FakeVault.LOGIN_TOKEN,
           "local_storage": {"path": str(tmp_path / "snaps")},
           "local_storage_2": {"type": "local", "path": str(tmp_path / "snaps2")}}
    doc.update(keys)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(doc))
    config.chmod(0o600)
    return str(config)


@pytest.mark.parametrize("case", ["stored", "failed", "config_error", "bug", "reload_then_stop"])
def test_main_in_process_leaves_the_callers_signal_mask_wakeup_fd_and_handlers(tmp_path, monkeypatch,
                                                                               small_step, case):
    before = signal_state()
    assert before[0] == set() and before[1] == -1
    with FakeVault(archive=build_archive(os.urandom(MB))) as vault:
        config = _config(tmp_path, vault, metrics_address="127.0.0.1:%d" % free_port(),
                         notify_command=["/bin/true"])
        if case == "failed":
            vault.archive = b"not a snapshot"
        if case == "config_error":
            (tmp_path / "c.json").write_text("{")
        if case == "bug":
            monkeypatch.setattr(vsa.Agent, "run_cycle", lambda self: 1 / 0)
        if case == "reload_then_stop":
            timers = [threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGHUP)),
                      threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))]
            for timer in timers:
                timer.start()
            status, log = run_main("-c", config)
            assert status == vsa.EXIT_OK and "Config reloaded" in log, log
        elif case == "bug":
            with pytest.raises(ZeroDivisionError):
                run_main("-c", config, "--once")
        else:
            status, log = run_main("-c", config, "--once")
            assert status == {"stored": 0, "failed": 1, "config_error": 2}[case], log
    assert signal_state() == before
    wait_for(lambda: not writeback_threads(), 5, "the write-back thread to end")


# =============================================================================
# a daemon: signals handed to each of its threads, idle and mid-download
# =============================================================================


def _reloads(tmp_path):
    return read(tmp_path / "log").count("Config reloaded")


def test_sighup_and_sigterm_to_any_thread_of_an_idle_daemon_reload_and_stop_it(tmp_path):
    with FakeVault(archive=build_archive(os.urandom(MB))) as vault, \
            reaped(start_daemon(tmp_path, vault)) as proc:
        wait_for(lambda: (tmp_path / "pid.stored").exists(), 30, "the first cycle and its notify")
        time.sleep(0.2)     # the notify thread waits for its command
        bits = int((tmp_path / "sigblk.stored").read_text().split()[1], 16)
        blocked = {s for s in HANDLED if bits & (1 << (int(s) - 1))}
        assert blocked == set(), "the notify command was started with %s blocked" % blocked
        threads = thread_ids(proc.pid)
        assert len(threads) >= 3, "the metrics and notify threads run"
        sent = 0
        for tid in threads:
            try:
                os.kill(tid, signal.SIGHUP)
            except ProcessLookupError:      # a thread that ended meanwhile
                continue
            sent += 1
            wait_for(lambda n=sent: _reloads(tmp_path) >= n, 2, "a reload from thread %d" % tid)
        assert sent >= 3
        child = int((tmp_path / "pid.stored").read_text())
        os.kill(child, signal.SIGTERM)
        wait_for(lambda: not os.path.exists("/proc/%d" % child) or process_state(child) == "Z", 2,
                 "the notify command to die of SIGTERM")
        victim = [t for t in thread_ids(proc.pid) if t != proc.pid][-1]
        started = time.monotonic()
        os.kill(victim, signal.SIGTERM)
        assert proc.wait(5) == 0, read(tmp_path / "log")
        assert time.monotonic() - started < 2
    kill_pidfile(tmp_path / "pid.stored")
    assert "Traceback" not in read(tmp_path / "log")


@pytest.mark.parametrize("which", ["newest", "oldest"])
def test_sigterm_to_a_thread_mid_download_stops_the_daemon_at_once(tmp_path, which):
    # 8 MB at ~3 MB/s: about 3 s of download, flushed every 256 KiB.
    archive = build_archive(os.urandom(8 * MB))
    with TricklingVault(archive) as vault, reaped(start_daemon(tmp_path, vault)) as proc:
        snaps = tmp_path / "snaps"
        wait_for(lambda: snaps.is_dir() and [n for n in os.listdir(str(snaps)) if n.startswith(".")],
                 30, "the download to begin")
        time.sleep(0.5)
        others = [t for t in thread_ids(proc.pid) if t != proc.pid]
        assert len(others) >= 2, "the metrics and write-back threads run"
        fds = open_fds(proc.pid)
        started = time.monotonic()
        os.kill(others[-1] if which == "newest" else others[0], signal.SIGTERM)   # newest: write-back
        code = proc.wait(5)
        took = time.monotonic() - started
    log = read(tmp_path / "log")
    assert code == 0, log
    assert took < 2, "took %.1f s to stop (fds %d)" % (took, fds)
    assert os.listdir(str(snaps)) == [], "a partial file was kept"
    assert "Traceback" not in log
