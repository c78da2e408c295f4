"""Section "Clock and signals": signal flags, the self-pipe wait, and abort hooks."""

import os
import signal
import threading
import time

import vault_snapshot_agent as vsa


def test_wait_returns_at_once_on_sigterm():
    signals = vsa.Signals()
    assert signals.install()
    try:
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
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
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGHUP)).start()
        started = time.monotonic()
        signals.wait(30)
        assert time.monotonic() - started < 5
        assert signals.reload_requested and not signals.stop_requested
    finally:
        signals.close()


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
    signals.wait(0.2)
    assert 0.15 < time.monotonic() - started < 5
    signals.close()
