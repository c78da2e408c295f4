"""A ``notify_command`` for the tests of notifications (test_notify.py):
run by the agent as ``python notify_probe.py MODE OUT [ARG...]``, it notes
what it was given as JSON lines appended to the file OUT, then behaves as
MODE says. Stdlib only; Python 3.6+.

Modes:

* ``record``: one line ``{"role": "child", "argv": [...], "env": {...},
  "pid", "pgid", "sid", "cwd"}``, then exit 0;
* ``fail``: the same, prints ``probe failing`` and exits 3;
* ``sleep``: the same, then forks a grandchild (same process group) that
  notes ``{"role": "grandchild", "pid"}``, and both sleep (for at most
  60 s); ``hang``: the grandchild ignores SIGTERM; ``hang-stubborn``: the
  child ignores SIGTERM too;
* ``flood``: prints the line ``ARG`` (the first one), then ``ARG2`` MiB of
  100-byte lines (``x`` * 99) as fast as the pipe takes them, then exits 0.

Helpers for the tests: ``PROBE`` (this file), ``command(mode, out, *args)``
(the argv list for notify_command), ``entries(out)`` (the JSON lines).
"""

import json
import os
import signal
import sys
import time

PROBE = os.path.abspath(__file__)

__all__ = ["PROBE", "command", "entries"]


def command(mode, out, *args):
    """The notify_command argv running this probe in ``mode``, noting into ``out``."""
    return [sys.executable, PROBE, mode, str(out)] + [str(a) for a in args]


def entries(out, role=None):
    """The JSON lines the probe wrote to ``out`` (those of ``role`` if given)."""
    if not os.path.exists(str(out)):
        return []
    with open(str(out)) as handle:
        found = [json.loads(line) for line in handle if line.strip()]
    return [e for e in found if role is None or e.get("role") == role]


def _note(out, entry):
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def _sleep_for_a_while():
    end = time.monotonic() + 60
    while time.monotonic() < end:
        time.sleep(0.05)


def main(argv):
    mode, out = argv[0], argv[1]
    _note(out, {"role": "child", "argv": argv, "env": dict(os.environ), "pid": os.getpid(),
                "pgid": os.getpgid(0), "sid": os.getsid(0), "cwd": os.getcwd()})
    if mode == "record":
        return 0
    if mode == "fail":
        print("probe failing", flush=True)
        return 3
    if mode in ("sleep", "hang", "hang-stubborn"):
        pid = os.fork()
        if pid == 0:
            if mode != "sleep":
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _note(out, {"role": "grandchild", "pid": os.getpid(), "pgid": os.getpgid(0)})
            _sleep_for_a_while()
            os._exit(0)
        if mode == "hang-stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("probe sleeping", flush=True)
        _sleep_for_a_while()
        return 0
    if mode == "flood":
        stdout = sys.stdout.buffer
        stdout.write(argv[2].encode("utf-8") + b"\n")
        block = (b"x" * 99 + b"\n") * 10486          # ~1 MiB
        for _ in range(int(argv[3])):
            stdout.write(block)
        stdout.flush()
        return 0
    print("unknown mode %r" % mode, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
