"""Section "Clock and signals": signal flags, the self-pipe wait, and abort hooks.

End to end: SIGTERM at random moments of a real cycle (local storage and an
S3 multipart upload to moto; seeded, ``FAULTS_SEED``) exits 0 within
seconds, keeps nothing partial locally and leaves no open multipart upload."""

import os
import random
import signal
import sys
import threading
import time

import pytest

import vault_snapshot_agent as vsa
from support.faults_support import (BUCKET, SEED, hidden, proxy_to, temp_files, verify_all,
                                    verify_bytes, write_config)
from support.harness import read, start_agent, stop, wait_for


def test_wait_returns_at_once_on_sigterm():
    signals = vsa.Signals()
    assert signals.install()
    try:
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        started = time.monotonic()
        signals.wait(30)
        assert time.monotonic() - started < 5
        assert signals.stop_requested and signals.stop_signal == signal.SIGTERM
    finally:
        signals.close()


def test_sighup_sets_reload_and_wakes_the_wait():
    signals = vsa.Signals()
    signals.install()
    try:
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGHUP)).start()
        started = time.monotonic()
        signals.wait(30)
        assert time.monotonic() - started < 5
        assert signals.reload_requested and not signals.stop_requested
    finally:
        signals.close()


@pytest.mark.parametrize("name", ["SIGHUP", "SIGTERM"])
def test_a_signal_taken_by_another_thread_still_wakes_the_wait(name):
    # The kernel may hand a process signal to any thread (a notify command's
    # reader, the metrics server); the main thread's wait must end all the same.
    signals = vsa.Signals()
    signals.install()
    num = getattr(signal, name)
    try:
        threading.Timer(0.05, lambda: signal.pthread_kill(threading.get_ident(), num)).start()
        started = time.monotonic()
        signals.wait(10)
        wait_for(lambda: signals.reload_requested or signals.stop_requested, 2, "the handler")
        assert time.monotonic() - started < 5
        assert (signals.reload_requested, signals.stop_requested) == (num == signal.SIGHUP,
                                                                      num == signal.SIGTERM)
    finally:
        signals.close()


def test_threads_the_agent_starts_leave_every_handled_signal_to_the_main_thread():
    seen = []
    vsa.start_thread(lambda: seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
                     "probe").join(5)
    with vsa.signals_blocked():
        pass
    assert {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} <= set(seen[0])
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_uninstall_restores_previous_handlers():
    before = signal.getsignal(signal.SIGTERM)
    signals = vsa.Signals()
    signals.install()
    assert signal.getsignal(signal.SIGTERM) != before
    signals.close()
    assert signal.getsignal(signal.SIGTERM) == before


def test_abort_hook_runs_on_stop_and_only_inside_the_block():
    signals = vsa.Signals()
    calls = []
    with signals.aborting(lambda: calls.append(1)):
        signals.request_stop()
    signals.request_stop()
    assert calls == [1]
    signals.close()


def test_wait_times_out_without_signals():
    signals = vsa.Signals()
    started = time.monotonic()
    signals.wait(0.05)
    assert 0.04 < time.monotonic() - started < 5
    signals.close()


# =============================================================================
# end to end: SIGTERM at random moments of a cycle (local + S3 multipart)
# =============================================================================


def _sigterm_trials(bao_cluster, approle, moto, tmp_path, trials, seed):
    rng = random.Random(seed)
    with proxy_to(bao_cluster.leader().addr) as proxy:
        proxy.delay(0.004)           # ~0.7 s for the download: the stream is a big target

        def trial(index, moment):
            snapdir = tmp_path / ("local-%d" % index)
            prefix = "sigterm-%s-%d" % (os.urandom(3).hex(), index)
            aws = {"access_key_id": moto.access_key_id, "secret_access_key": moto.secret_access_key,
                   "s3_endpoint": moto.endpoint, "s3_region": "us-east-1", "s3_bucket": BUCKET,
                   "s3_key_prefix": prefix, "part_size_mb": 5, "concurrency": 2}
            config = write_config(tmp_path / ("c-%d.json" % index), proxy.addr, approle, snapdir,
                                  aws_storage=aws)
            logfile = tmp_path / ("agent-%d.log" % index)
            proc = start_agent(config, logfile, sys.executable, "--log-level", "debug")
            try:
                wait_for(lambda: " starting: " in read(logfile) or proc.poll() is not None, 30,
                         "the agent to start")
                began = time.monotonic()
                if moment is None:     # calibration: let the cycle finish
                    wait_for(lambda: "Cycle stored" in read(logfile) or proc.poll() is not None,
                             60, "a whole cycle", interval=0.01)
                    duration = time.monotonic() - began
                else:
                    time.sleep(moment)
                    duration = None
                sent = time.monotonic()
                code = stop(proc, timeout=5)
                took = time.monotonic() - sent
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            log = read(logfile)
            what = "trial %d (seed %d): SIGTERM %.3fs after start" % (
                index, seed, moment if moment is not None else -1)
            assert code == 0, "%s: exit %s\n%s" % (what, code, log)
            assert took < 5, "%s: took %.1fs to stop" % (what, took)
            assert "Traceback" not in log, "%s\n%s" % (what, log)
            local = verify_all(snapdir)
            assert temp_files(snapdir) == [] and hidden(snapdir) == [], (what, hidden(snapdir))
            assert moto.list_multipart_uploads(BUCKET, prefix + "/") == [], \
                "%s: multipart upload left behind\n%s" % (what, log)
            keys = moto.list_keys(BUCKET, prefix + "/")
            assert len(keys) <= 1, (what, keys)
            for key in keys:
                verify_bytes(moto.get(BUCKET, key), tmp_path, "%s: s3 object %s" % (what, key))
            moto.delete_all(BUCKET, prefix + "/")
            for info in local:
                os.unlink(info.path)
            return duration, len(local), len(keys)

        duration, stored, uploaded = trial(0, None)
        assert (stored, uploaded) == (1, 1), "the calibration cycle did not store everywhere"
        # Stratified over 1.5 cycles: every part of the cycle gets its share of
        # moments (a third fall after a calibrated cycle's end, so a busier
        # machine's slower cycles still see some SIGTERMs after both stores).
        span = duration * 1.5
        outcomes = []
        for index in range(1, trials + 1):
            moment = span * (index - 1 + rng.random()) / trials
            outcomes.append(trial(index, moment)[1:])
    print("SIGTERM trials: cycle %.2fs; (local, s3) stored per trial: %s" % (duration, outcomes))
    return outcomes


@pytest.mark.usefixtures("isolated_env")
def test_sigterm_at_random_moments_5_trials(bao_cluster, approle, kv_data, moto, tmp_path):
    _sigterm_trials(bao_cluster, approle, moto, tmp_path, 5, SEED + 2)


@pytest.mark.usefixtures("isolated_env")
@pytest.mark.slow
def test_sigterm_at_random_moments_50_trials(bao_cluster, approle, kv_data, moto, tmp_path):
    outcomes = _sigterm_trials(bao_cluster, approle, moto, tmp_path, 50, SEED + 3)
    # the moments really spread over the cycle: some stopped before anything was
    # stored, some between local and S3, some after both
    assert (0, 0) in outcomes and (1, 1) in outcomes, outcomes
