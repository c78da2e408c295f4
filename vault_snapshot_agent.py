#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Keep verified, rotated Raft snapshots of a HashiCorp Vault or OpenBao cluster.

One file, Python standard library only, Python 3.6 to 3.13. Run it beside every
Vault node; on each tick the agent logs in (AppRole, Kubernetes, JWT, a TLS
certificate, userpass/LDAP, AWS, Google, Azure or a token: the table in
"Vault login methods"),
asks whether its own node is the Raft leader and only there streams
``GET /v1/sys/storage/raft/snapshot`` to disk with constant memory, verifies
the archive while it arrives, stores it in every configured storage (a
directory, S3, Azure Blob, Google Cloud Storage, OpenStack Swift) and
applies retention. It reads the Go ``vault_raft_snapshot_agent`` config file
unchanged.

Usage::

    vault_snapshot_agent.py [-c /etc/vault.d/snapshot.json] [--once]
                            [--check-config] [--log-level info]
                            [--log-format text|json] [--version]
                            [--config-reference]
    vault_snapshot_agent.py list [-c CONFIG] [--storage NAME]
    vault_snapshot_agent.py download NAME|latest [-o FILE] [-c CONFIG] [--storage NAME]
    vault_snapshot_agent.py verify FILE
    vault_snapshot_agent.py verify NAME|latest|all [-c CONFIG] [--storage NAME]
    vault_snapshot_agent.py restore FILE|NAME|latest --yes [--force] [-c CONFIG]
                            [--storage NAME]
    vault_snapshot_agent.py status [-c CONFIG]
    vault_snapshot_agent.py doctor [-c CONFIG] [--storage NAME]

Exit codes: 0 success, requested stop, or not the leader; 1 a ``--once``
cycle failed; 2 usage or config error.

The data path of one cycle (on the leader only; every request under a
deadline, every wait on the monotonic clock, a stop cuts any of it)::

    sys/leader --is_self--> login/renew --token--> GET sys/storage/raft/snapshot
        |                                                 | chunked gzip tar
     standby: skip                                        v
                  staging file (0600) <--write-- one pass: inflate, tar members,
                        |  verified before use    SHA256SUMS, sealed file, sizes
                        v
      +- local (hard link) - S3 (multipart) - Azure (blocks) - GCS - Swift (SLO) -+
      |   each storage on its own: conditional write, retries, own errors          |
      +-----------> retention per storage: list, plan, delete listed keys <--------+

Sections (``grep -n '^# [0-9]*\\. '`` lists them):

    1. Constants
    2. Errors
    3. Utilities
    4. Clock and signals
    5. HTTP transport and retry
    6. Request signing
    7. AWS credentials
    8. Azure, Google and OpenStack credentials
    9. Config schema
    10. Vault login methods
    11. Config
    12. Vault client
    13. Snapshot archive
    14. Snapshot stream
    15. Storage backends
    16. Local storage
    17. S3 storage
    18. Azure Blob storage
    19. Google Cloud Storage
    20. OpenStack Swift
    21. Retention
    22. Scrub
    23. Status and metrics
    24. Status page
    25. Metrics server and systemd
    26. Notifications
    27. Agent
    28. Restore tooling
    29. Command line
"""

import argparse
import base64
import collections
import collections.abc
import datetime
import errno
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import random
import re
import select
import signal
import socket
import stat
import sys
import threading
import time
import urllib.parse
import zlib
# Imported where they are used, so that `--version` and a standby's check do
# not pay for them: concurrent.futures, configparser, http.client (and with it
# ssl), ipaddress, xml.etree.ElementTree.

__version__ = "0.1.0"

__all__ = [
    "AgentError", "ConfigError", "TransportError", "VaultError", "SnapshotError",
    "StorageError", "Stopped", "Config", "load_config", "VaultClient",
    "ArchiveVerifier", "verify_file", "LocalStorage", "retention_plan", "Agent",
    "main",
]

# =============================================================================
# 1. Constants
# =============================================================================


PROG = "vault-snapshot-agent"
LOG = logging.getLogger("vault_snapshot_agent")

DEFAULT_CONFIG_PATH = "/etc/vault.d/snapshot.json"
DEFAULT_ADDR = "https://127.0.0.1:8200"
DEFAULT_FREQUENCY = "1h"
DEFAULT_API_TIMEOUT = "30s"          # per socket operation on API calls
DEFAULT_REQUEST_TIMEOUT = "60s"      # total deadline of one request (the Vault Go client's default)
DEFAULT_SNAPSHOT_TIMEOUT = "2m"      # idle (per read) timeout of the snapshot stream
VERIFY_SCOPES = ("latest", "all")     # what a re-verification reads
NOTIFY_EVENTS = ("failed", "recovered", "verify_failed", "retention_failed", "stored")
NOTIFY_DEFAULT_EVENTS = ("failed", "recovered", "verify_failed", "retention_failed")
DEFAULT_RETRY_INTERVAL = "1m"        # first retry after a failed cycle; doubles, up to frequency
STOP_GRACE = 1.0                     # seconds a clean-up request may take after a stop
DEFAULT_LEADER_POLL = "30s"          # sys/leader between cycles: a failover is noticed this fast
DEFAULT_K8S_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"

SNAPSHOT_PATH = "/v1/sys/storage/raft/snapshot"
DEFAULT_FILE_PREFIX = "raft_snapshot"
SNAPSHOT_SUFFIX = ".snap"
# Names are <file_prefix>-<time>.snap. Our time: 20261127T205239.123Z (UTC,
# sorts by time as text); the Go agent's: <unix nanoseconds>. Neither holds a
# "-", so a name splits at its last "-" in one way only: a block sees exactly
# the names of its own prefix (prefix "raft" never sees raft_snapshot-...).
# Whole ASCII names only: [0-9], not \d (fullwidth digits), and \Z, not $ (a
# trailing newline).
SNAPSHOT_NAME_RE = re.compile(r"\A([A-Za-z0-9_.-]{1,64})-(?:([0-9]{8}T[0-9]{6}\.[0-9]{3})Z"
                              r"|([0-9]{1,20}))\.snap\Z")
# A file_prefix or a storage block's name: a safe charset; a prefix also
# neither starts with "." or "-" (a hidden file, an option) nor ends in "-".
FILE_PREFIX_RE = r"\A(?![.-])[A-Za-z0-9_.-]{1,64}(?<!-)\Z"
STORAGE_NAME_RE = r"\A(?!-)[A-Za-z0-9_.-]{1,64}\Z"     # "-x" would read as an option
# A listed name dated later than now plus this is planted or from a clock that
# ran ahead: the schedule, retention and 'latest' ignore it, nothing deletes it.
FUTURE_SKEW = 300.0
# Staging and partial files: hidden, tagged with host and pid so a later run
# can tell its own crash leftovers from another live process's work.
TEMP_NAME_RE = re.compile(
    r"\A\.raft_snapshot-(?P<host>[A-Za-z0-9_.-]*)-(?P<pid>[0-9]{1,10})-[0-9a-f]+\.tmp\Z")

CHUNK_SIZE = 1024 * 1024             # stream and copy granularity
UPLOAD_CHUNK = 1024 * 1024           # read size of uploads (one reused buffer per part in flight)
INFLATE_STEP = 64 * 1024             # archive bytes inflated (and at most produced) per zlib call
PASS_BUFFERS = 4                     # CHUNK_SIZE buffers between reading and verifying a snapshot
WRITEBACK_STEP = 64 * 1024 * 1024    # a snapshot's bytes flushed to disk in the background this often
MAX_JSON_BYTES = 4 * 1024 * 1024     # an API answer larger than this is refused
OWN_SHA256 = "vault-snapshot-sha256"  # object metadata: the SHA-256 of the snapshot as written
REWRITE_ALLOWANCE = 3600.0           # seconds after its name's time a snapshot may still be written
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a config file larger than this is refused
MAX_SMALL_MEMBER = 1024 * 1024       # meta.json / SHA256SUMS size cap
MAX_PAX_HEADER = 64 * 1024           # a PAX extended header larger than this is refused
MAX_TAR_HEADERS = 64                 # 4 members, their PAX headers and a few spare
MAX_TRAILING = 1024 * 1024           # NUL padding a re-verification accepts after the gzip stream
MAX_LIST_PAGES = 10000               # pages of one storage listing (10 million objects)
MAX_REDIRECTS = 3
MAX_RETAIN = 1000000                 # snapshots kept per storage
MAX_RETAIN_DAYS = 36500              # a century: beyond, the date arithmetic overflows
RETENTION_FLOOR = 2                  # age and size rules never leave fewer snapshots than this

TOKEN_RENEW_FRACTION = 2.0 / 3.0     # renew after 2/3 of the TTL has passed
TOKEN_MIN_REMAINING = 10.0           # seconds (at most 10% of the TTL) of safety margin
MAX_TOKEN_TTL = 10 * 365 * 86400.0   # a longer lease_duration is taken as this

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

ENV_PREFIXES = ("VAULT_", "BAO_")    # VAULT_X wins over BAO_X; config wins over both

UTC = datetime.timezone.utc

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=UTC)


# =============================================================================
# 2. Errors
# =============================================================================


class AgentError(Exception):
    """Root of every error this program raises on purpose."""


class ConfigError(AgentError):
    """A config file, flag or environment value is wrong (exit code 2)."""


class TransportError(AgentError):
    """A request could not be completed. ``status`` is the HTTP status if any."""

    def __init__(self, message, status=None, retryable=False):
        AgentError.__init__(self, message)
        self.status = status
        self.retryable = retryable


class VaultError(AgentError):
    """Vault answered, but not with what the agent needs."""

    def __init__(self, message, status=None):
        AgentError.__init__(self, message)
        self.status = status


class NotLeader(AgentError):
    """This node is not (or no longer) the active node."""


class SnapshotError(AgentError):
    """The snapshot archive is empty, truncated or does not verify."""


class StagingError(SnapshotError):
    """The local disk could not take the download (full, read-only, no such
    directory): another staging directory may."""


class StorageError(AgentError):
    """A storage backend failed to store, list or delete."""

    def __init__(self, message, retryable=False):
        AgentError.__init__(self, message)
        self.retryable = retryable


class NameClash(StorageError):
    """The storage already holds an object of the name being written (another
    agent wrote it in the same millisecond): nothing was overwritten; the
    agent stores under the next free name."""


class Stopped(AgentError):
    """A stop was requested (SIGTERM/SIGINT) while work was in progress."""


# =============================================================================
# 3. Utilities
# =============================================================================


class Secret:
    """A credential. Formats as '***' everywhere; ``reveal()`` is the only way in."""

    __slots__ = ("_value",)

    def __init__(self, value):
        self._value = value

    def reveal(self):
        return self._value

    def __repr__(self):
        return "'***'"

    __str__ = __repr__

    def __bool__(self):
        return bool(self._value)

    __nonzero__ = __bool__

    def __eq__(self, other):
        return isinstance(other, Secret) and other._value == self._value

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = None


_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3,
    "s": 1.0, "m": 60.0, "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_duration(text):
    """Parse a Go duration ('30s', '1h30m', '500ms', '1.5h') into seconds.

    Raises ValueError for anything Go's time.ParseDuration would refuse, and for
    negative values, which no setting here accepts.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("empty duration")
    if text == "0":
        return 0.0
    rest = text[1:] if text[0] == "+" else text
    if rest.startswith("-"):
        raise ValueError("negative duration")
    total, pos = 0.0, 0
    if not rest:
        raise ValueError("no number")
    while pos < len(rest):
        match = _DURATION_PART.match(rest, pos)
        if match is None:
            raise ValueError("cannot parse %r" % rest[pos:])
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return total


def format_duration(seconds):
    """Seconds as a short Go-style duration: 3600 -> '1h', 90 -> '1m30s', 0 -> '0s'."""
    if 0 < seconds < 1:
        return "%dms" % round(seconds * 1000)
    whole = int(round(seconds))
    hours, rem = divmod(whole, 3600)
    minutes, secs = divmod(rem, 60)
    out = ""
    if hours:
        out += "%dh" % hours
    if minutes:
        out += "%dm" % minutes
    if secs or not out:
        out += "%ds" % secs
    return out


def format_size(num):
    """Bytes for humans, decimal units as storage consoles show them."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(num) < 1000 or unit == "TB":
            return ("%d %s" % (num, unit)) if unit == "B" else ("%.1f %s" % (num, unit))
        num /= 1000.0
    return "%d B" % num  # pragma: no cover


def snapshot_name(when, prefix=DEFAULT_FILE_PREFIX):
    """The name of a snapshot taken at ``when`` (an aware datetime)."""
    utc = when.astimezone(UTC)
    return "%s-%s.%03dZ%s" % (prefix, utc.strftime("%Y%m%dT%H%M%S"), utc.microsecond // 1000,
                              SNAPSHOT_SUFFIX)


def parse_snapshot_name(name, prefix=DEFAULT_FILE_PREFIX):
    """The UTC time inside a name of ours or the Go agent's with exactly
    ``prefix``, else None."""
    match = SNAPSHOT_NAME_RE.match(name)
    if not match or match.group(1) != prefix:
        return None
    if match.group(3) and prefix != DEFAULT_FILE_PREFIX:
        return None     # the Go agent's nanosecond names only ever had the default prefix
    if match.group(2):
        try:
            return datetime.datetime.strptime(match.group(2), "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)
        except ValueError:
            return None
    try:
        return EPOCH + datetime.timedelta(microseconds=int(match.group(3)) // 1000)
    except OverflowError:
        return None


def redact_url(url):
    """A URL fit for logs: no userinfo, no query string (SAS tokens live there)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc.rpartition("@")[2]
    query = "<redacted>" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def printable(text, limit=200):
    """``text`` from an untrusted source (a tar member, a listed name) fit for
    one log line: control and non-ASCII characters escaped, length capped."""
    text = str(text).encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit - 3] + "..."


_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def has_control(text):
    """Whether ``text`` holds a character no header value or path may hold
    (C0 controls but tab, and DEL): CR/LF would split a header."""
    return _CONTROL_RE.search(text) is not None


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
               "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_size(value):
    """Bytes from a size: a whole number of bytes, or text such as '500MB',
    '1.5GB' (powers of 1000) or '20GiB' (powers of 1024). ValueError else."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError("negative size")
        return value
    match = re.match(r"\A\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*\Z",
                     value if isinstance(value, str) else "")
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("not a size")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def size_text(num):
    """Bytes as a short size for settings: 50000000000 -> '50GB'."""
    return format_size(num).replace(".0 ", "").replace(" ", "")


def refuse_control(value, where):
    """ConfigError naming ``where`` when ``value`` holds a control character;
    the value itself is never shown (it may be a credential)."""
    if has_control(value):
        raise ConfigError("%s: contains a control character (CR, LF, NUL...); value not shown"
                          % where)


def parse_listed_size(value):
    """An object size from a listing (XML text, JSON string or number); 0
    when it is missing or not a plain whole number of at most 20 digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < 10 ** 20 else 0
    if isinstance(value, str) and re.match(r"\A[0-9]{1,20}\Z", value.strip()):
        return int(value.strip())
    return 0


def page_text(data):
    """The text of an error answer that may be an HTML page (tags dropped)."""
    return re.sub(r"<[^>]*>", " ", data.decode("utf-8", "replace"))


def one_line(text, limit=300):
    """Collapse whitespace and cut long server answers for a log line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _error_text(exc):
    if isinstance(exc, OSError) and not isinstance(exc, AgentError):
        return "%s%s" % (exc.strerror or exc, (": " + exc.filename) if exc.filename else "")
    return str(exc)


def fields(**facts):
    """``extra=`` for a log call: facts a JSON log line carries as fields of
    its own (storage, snapshot, bytes, duration, error), beside the message."""
    return {"extra": {"fields": facts}}


def masked(error, secrets):
    """The text of ``error`` with every credential in ``secrets`` (sent in
    the request) shown as ``***``; when a server echoed part of one (a body
    cut at 200 characters), the whole text is withheld."""
    text = str(error)
    for secret in secrets:
        if not secret:
            continue
        for form in (secret, json.dumps(secret)[1:-1]):
            # a short one only as a word of its own ("s" must not eat every s)
            pattern = re.escape(form) if len(form) >= 8 else r"(?<!\w)%s(?!\w)" % re.escape(form)
            text = re.sub(pattern, "***", text)
        pieces = (secret[i:i + 12] for i in range(max(1, len(secret) - 11)))
        if any(piece in text for piece in pieces if len(piece) >= 8):
            return "the answer quoted the credential sent; not shown (HTTP status above)"
    return text


def parse_bool(text):
    """Go's strconv.ParseBool, as used for VAULT_SKIP_VERIFY."""
    lowered = text.strip().lower()
    if lowered in ("1", "t", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "f", "false", "no", "n", "off", ""):
        return False
    raise ValueError("not a boolean: %r" % text)


def open_regular(path, mode="rb"):
    """``open(path, mode)`` for reading, refusing anything but a regular
    file without blocking: a FIFO put in place of a config or secret file
    would otherwise hang the open (and PEP 475 restarts it after SIGTERM)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or directory)", path)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def expand_home(path, env):
    """``path`` with a leading ``~`` replaced by HOME from ``env`` (the
    injected environment), falling back to the password database."""
    if path == "~" or path.startswith("~/"):
        return (env.get("HOME") or os.path.expanduser("~")) + path[1:]
    return os.path.expanduser(path)


def read_at_most(handle, limit, chunk=65536):
    """Up to ``limit`` bytes of ``handle``, read in chunks: ``read(limit)``
    would allocate the whole limit up front even for a small file."""
    parts, size = [], 0
    while size < limit:
        data = handle.read(min(chunk, limit - size))
        if not data:
            break
        parts.append(data)
        size += len(data)
    return b"".join(parts)


def read_secret_file(path, what):
    """The stripped content of a small secret file (at most 64 KiB), as a Secret."""
    try:
        with open_regular(path, "r") as handle:
            value = handle.read(65537)
    except OSError as exc:
        raise ConfigError("%s %s: cannot read: %s" % (what, path, exc.strerror or exc)) from exc
    except UnicodeDecodeError:
        raise ConfigError("%s %s: not UTF-8 text" % (what, path)) from None
    if len(value) > 65536:
        raise ConfigError("%s %s: larger than 64 KiB; not a secret file?" % (what, path))
    value = value.strip()
    if not value:
        raise ConfigError("%s %s: file is empty" % (what, path))
    refuse_control(value, "%s %s" % (what, path))
    return Secret(value)


def fsync_dir(path):
    """Make a rename or link in ``path`` durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name():
    """A hidden staging name tagged with this host and pid."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40]
    return ".raft_snapshot-%s-%d-%s.tmp" % (host, os.getpid(), os.urandom(4).hex())


def new_hash(algorithm, data=b""):
    """A hashlib object; MD5 (a checksum the storage APIs ask for, not a
    security function) is created so that FIPS-mode hosts allow it."""
    if algorithm == "md5":
        try:
            return hashlib.new("md5", data, usedforsecurity=False)  # novermin (3.9+, guarded)
        except TypeError:        # Python < 3.9 has no usedforsecurity
            return hashlib.new("md5", data)
    return hashlib.new(algorithm, data)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True

def xml_children(root, name):
    """Elements named ``name`` anywhere below ``root``, whatever the namespace."""
    return [el for el in root.iter() if el.tag == name or el.tag.endswith("}" + name)]

def xml_text(root, name, default=None):
    found = xml_children(root, name)
    return found[0].text or "" if found else default

def parse_xml(data, what):
    from xml.etree import ElementTree
    try:
        return ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise StorageError("%s: answer is not valid XML (%s)" % (what, exc)) from exc


def parse_error_xml(data):
    """The root of an error answer's XML body, or None when it is not XML."""
    from xml.etree import ElementTree
    try:
        return ElementTree.fromstring(data)
    except ElementTree.ParseError:
        return None


def xml_escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(moment):
    """An aware datetime as an RFC 7231 date: 'Wed, 02 Dec 2026 08:02:10 GMT'."""
    t = moment.astimezone(UTC)
    return "%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _WEEKDAYS[t.weekday()], t.day, _MONTHS[t.month - 1], t.year, t.hour, t.minute, t.second)


def iso(when):
    """An aware datetime as '2026-12-07T21:00:00Z' (None stays None)."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if when else None


def parse_http_date(text):
    """An RFC 7231 date ('Wed, 02 Dec 2026 08:02:10 GMT') as an aware UTC
    datetime; None when absent or not a date."""
    import email.utils
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


class Progress:
    """Logs a long transfer every ``interval`` seconds: bytes, rate, ETA.
    With ``tty`` (a terminal's stream) it redraws one line there twice a
    second instead, which ``end()`` clears."""

    def __init__(self, what, total, clock, interval=30.0, tty=None):
        self.what, self.total, self.clock, self.interval = what, total, clock, interval
        self.tty = tty
        if tty is not None:
            self.interval = 0.5
        self.done = 0
        self.start = self.last = clock.monotonic()
        self._lock = threading.Lock()

    def add(self, count):
        with self._lock:
            self.done += count
            now = self.clock.monotonic()
            if now - self.last < self.interval:
                return
            self.last = now
            rate = self.done / max(now - self.start, 1e-6)
            if self.total:
                text = "%s: %s of %s (%d%%), %s/s, about %s left" % (
                    self.what, format_size(self.done), format_size(self.total),
                    100 * self.done // self.total, format_size(rate),
                    format_duration((self.total - self.done) / max(rate, 1.0)))
            else:
                text = "%s: %s so far, %s/s" % (self.what, format_size(self.done), format_size(rate))
            if self.tty is None:
                LOG.info("%s", text)
            else:
                self.tty.write("\r\x1b[K" + text)
                self.tty.flush()

    def end(self):
        """Clear the terminal line (nothing without ``tty``)."""
        if self.tty is not None and self.done:
            self.tty.write("\r\x1b[K")
            self.tty.flush()


def transfer_summary(what, size, seconds):
    return "%s: %s in %s (%s/s)" % (what, format_size(size), format_duration(seconds),
                                   format_size(size / max(seconds, 1e-6)))


# =============================================================================
# 4. Clock and signals
# =============================================================================


class Clock:
    """Wall and monotonic time. Tests pass a fake with the same two methods."""

    def now(self):
        return datetime.datetime.now(UTC)

    def monotonic(self):
        return time.monotonic()


class Signals:
    """SIGTERM/SIGINT/SIGHUP as flags, plus a self-pipe so waits end at once.

    A handler that only sets a flag does not cut ``time.sleep`` short (PEP 475
    restarts it), so ``wait`` selects on a pipe the handler writes to. Work in
    progress polls ``check()`` between chunks, and ``aborting`` registers a
    callable (closing a socket) that runs the moment a stop arrives, so a read
    blocked on a silent server returns at once.
    """

    HANDLED = ("SIGTERM", "SIGINT", "SIGHUP")

    def __init__(self):
        self.stop_requested = False
        self.reload_requested = False
        self.stop_signal = None
        self._read_fd, self._write_fd = os.pipe()
        for fd in (self._read_fd, self._write_fd):
            _set_nonblocking(fd)
        self._previous = {}
        self._previous_wakeup = None   # the wakeup fd before install (-1: none)
        self._abort_hooks = []
        self.heartbeat = time.monotonic()    # last check(): the watchdog's sign of life
        self.waiting = False

    def install(self):
        """Take over the signals; returns False outside the main thread.

        The kernel may deliver a signal to any thread (the notify reader,
        the metrics server), and then the main thread's ``select`` is not
        interrupted; Python runs the handler only once the main thread wakes.
        So the C-level handler also writes to the pipe (``set_wakeup_fd``),
        from whichever thread took the signal."""
        try:
            for name in self.HANDLED:
                num = getattr(signal, name)
                self._previous[num] = signal.signal(num, self._handle)
            if sys.version_info >= (3, 7):
                self._previous_wakeup = signal.set_wakeup_fd(  # novermin (3.7+, guarded)
                    self._write_fd, warn_on_full_buffer=False)
            else:
                self._previous_wakeup = signal.set_wakeup_fd(self._write_fd)
        except ValueError:      # not the main thread: leave signals alone
            self.uninstall()
            return False
        return True

    def uninstall(self):
        for num, previous in self._previous.items():
            try:
                signal.signal(num, previous if previous is not None else signal.SIG_DFL)
            except ValueError:
                pass
        self._previous = {}
        if self._previous_wakeup is not None:
            try:
                signal.set_wakeup_fd(self._previous_wakeup)
            except ValueError:
                pass
            self._previous_wakeup = None

    def close(self):
        self.uninstall()
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def _handle(self, signum, frame):
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.request_stop(signum)
        try:
            os.write(self._write_fd, b"!")
        except OSError:
            pass

    def request_stop(self, signum=None):
        """Ask everything to stop; also used by tests and by the second signal."""
        self.stop_requested = True
        self.stop_signal = signum
        for hook in list(self._abort_hooks):
            try:
                hook()
            except Exception:   # an abort hook must never break signal handling
                pass

    def idle_for(self):
        """Seconds since the last sign of life (a check() or a wait), on the
        same clock as the heartbeat."""
        return time.monotonic() - self.heartbeat

    def check(self):
        """Raise Stopped if a stop was requested."""
        self.heartbeat = time.monotonic()
        if self.stop_requested:
            raise Stopped("stop requested")

    def wait(self, seconds, wake_on_reload=True):
        """Sleep up to ``seconds``; returns early when a stop (or, unless told
        otherwise, a reload) is requested."""
        if self.stop_requested or (wake_on_reload and self.reload_requested):
            return
        self.waiting = True
        try:
            ready, _, _ = select.select([self._read_fd], [], [], max(0.0, seconds))
        except (OSError, ValueError):
            ready = []
        finally:
            self.waiting = False
            self.heartbeat = time.monotonic()
        if ready:
            try:
                while os.read(self._read_fd, 512):
                    pass
            except OSError:
                pass

    def aborting(self, hook):
        """Context manager: run ``hook`` if a stop arrives inside the block."""
        return _AbortHook(self, hook)


class _AbortHook:
    def __init__(self, signals, hook):
        self.signals, self.hook = signals, hook

    def __enter__(self):
        self.signals._abort_hooks.append(self.hook)
        if self.signals.stop_requested:
            self.hook()
        return self

    def __exit__(self, *exc):
        try:
            self.signals._abort_hooks.remove(self.hook)
        except ValueError:
            pass
        return False


class signals_blocked:
    """``with signals_blocked():`` the handled signals are blocked in this
    thread; a thread started inside inherits the mask and never takes them.
    ``signals_blocked(False)`` unblocks them instead (see spawn).

    The kernel hands a process signal to any thread that does not block it,
    and only the main thread runs Python handlers: a SIGTERM taken by a
    worker would wait for the main thread's read or ``select`` to end. So
    every thread the agent starts is started inside this block, and every
    signal goes to the main thread."""

    def __init__(self, block=True):
        self.how = signal.SIG_BLOCK if block else signal.SIG_UNBLOCK
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.pthread_sigmask(
                self.how, [getattr(signal, name) for name in Signals.HANDLED])
        except (AttributeError, OSError, ValueError):
            pass            # no pthread_sigmask: Signals' wakeup fd still wakes the wait
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.previous)
        return False


def start_thread(target, name, *args):
    """Start a daemon thread running ``target(*args)`` that never takes the
    handled signals (see signals_blocked); returns it."""
    thread = threading.Thread(target=target, args=args, name=name)
    thread.daemon = True
    with signals_blocked():
        thread.start()
    return thread


def spawn(argv, **kwargs):
    """``subprocess.Popen(argv, **kwargs)`` whose child takes the handled
    signals again: a child inherits its thread's mask across ``exec``, and
    one started from a start_thread thread would ignore the SIGTERM that is
    to end it."""
    import subprocess
    with signals_blocked(False):
        return subprocess.Popen(argv, **kwargs)


class Runtime(collections.namedtuple("Runtime", "env clock signals")):
    """What every part of one run shares: the environment mapping, the clock
    and the stop/reload signals. main() builds one; tests build their own."""

    __slots__ = ()

    @classmethod
    def create(cls, env=None, clock=None, signals=None):
        return cls(os.environ if env is None else env, clock or Clock(), signals or Signals())


def _set_nonblocking(fd):
    import fcntl
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


# =============================================================================
# 5. HTTP transport and retry
# =============================================================================


TlsOptions = collections.namedtuple(
    "TlsOptions", "ca_cert ca_path client_cert client_key server_name skip_verify")


def make_ssl_context(tls):
    """An SSLContext for ``tls``; certificate errors become ConfigErrors."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        if tls.ca_cert or tls.ca_path:
            try:
                context.load_verify_locations(cafile=tls.ca_cert, capath=tls.ca_path)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError("ca_cert: cannot load %s: %s"
                                  % (tls.ca_cert or tls.ca_path, _exc_text(exc))) from exc
        else:
            context.load_default_certs()
    if tls.client_cert:
        try:
            # An encrypted key would make OpenSSL prompt on the terminal and
            # wait there: ask nobody, refuse it.
            context.load_cert_chain(tls.client_cert, tls.client_key, password=_no_passphrase)
        except _EncryptedKey:
            raise ConfigError("client_key: %s is encrypted (a passphrase is never asked for); "
                              "decrypt it: openssl pkey -in KEY -out KEY.plain"
                              % (tls.client_key or tls.client_cert)) from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("client_cert: cannot load %s: %s" % (tls.client_cert, _exc_text(exc))) from exc
    return context


class _EncryptedKey(Exception):
    pass


def _no_passphrase():
    raise _EncryptedKey()


def _exc_text(exc):
    return one_line(getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc)


Proxy = collections.namedtuple("Proxy", "host port auth display")
# An HTTP forward proxy: ``auth`` is the Proxy-Authorization value (a Secret)
# or None; ``display`` its URL for logs, with the password as ***.

# Credential endpoints on the node itself: never through a proxy, from the
# environment or an explicit ``proxy`` key (the proxy would see IMDS session
# tokens and the pod identity token in cleartext). Besides these, every
# link-local address (169.254.0.0/16, fe80::/10) in any spelling.
METADATA_NAMES = ("metadata.google.internal", "metadata.google.internal.")
METADATA_ADDRESSES = ("fd00:ec2::254", "fd00:ec2::23")     # AWS IMDS, EKS Pod Identity (IPv6)


def parse_proxy_url(text, where):
    """A Proxy from ``http://[user:password@]host[:port]`` (a bare host:port
    means http://); ConfigError naming ``where`` otherwise, never showing a
    password."""
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        port = 80 if parts.port is None else parts.port
        if not 0 < port < 65536:
            raise ValueError("port %d" % port)
    except ValueError:
        raise ConfigError("%s: not a proxy URL (http://[user:password@]host:port)" % where) from None
    if parts.scheme == "https":
        raise ConfigError("%s: https:// proxies are not supported; use http:// (TLS to the "
                          "destination still runs end to end through the tunnel)" % where)
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError("%s: not a proxy URL (http://[user:password@]host:port)" % where)
    auth, user = None, ""
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        auth = Secret("Basic " + base64.b64encode(("%s:%s" % (user, password)).encode("utf-8"))
                      .decode("ascii"))
    host = parts.hostname
    netloc = "[%s]" % host if ":" in host else host
    display = "http://%s%s:%d" % (user + ":***@" if auth else "", netloc, port)
    return Proxy(host, port, auth, display)


def no_proxy_match(host, port, no_proxy):
    """Whether NO_PROXY text exempts ``host``:``port``, as Go's httpproxy
    reads it: ``*``; a name (itself and its subdomains); ``.name`` or
    ``*.name`` (subdomains only); an IP; a CIDR; each with an optional port."""
    import ipaddress
    host = host.lower().strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in (no_proxy or "").split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, want_port = entry, None
        match = re.match(r"\A(\[[^]]+\]|[^:]+):([0-9]+)\Z", entry)
        if match:                       # host:port or [v6]:port
            name, want_port = match.group(1), int(match.group(2))
        name = name.strip("[]")
        if want_port is not None and want_port != port:
            continue
        if "/" in name:
            try:
                if address is not None and address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        try:
            literal = ipaddress.ip_address(name)
        except ValueError:
            literal = None
        if literal is not None:
            if address == literal:
                return True
            continue
        if name.startswith("*."):
            name = name[1:]
        if host.endswith(name if name.startswith(".") else "." + name) or host == name:
            return True
    return False


class ProxyPolicy:
    """Which proxy a request goes through. ``setting``: None (the
    environment, with Go's http.ProxyFromEnvironment rules), "direct", or a
    proxy URL used for every request (loopback included). Credential
    endpoints on the node itself (is_node_local: every link-local address,
    the AWS IPv6 metadata addresses, Google's metadata name) are always
    reached directly, and from the environment neither localhost nor
    loopback addresses are ever proxied; a proxy variable the agent cannot
    use is ignored, and ``warnings`` says so: it goes direct instead, as Go's
    http.ProxyFromEnvironment ignores what it cannot use (an exit 2 would be
    a restart loop under systemd even when no request needed the proxy). A
    ``setting`` is a Proxy, or a URL string (ConfigError naming ``where``)."""

    def __init__(self, setting=None, env=None, where="proxy"):
        env = {} if env is None else env
        self.explicit = self.direct = False
        self.proxies, self.warnings, self.where, self.sources = {}, [], where, {}
        self.no_proxy = ""
        if setting == "direct":
            self.direct = True
        elif setting:
            self.explicit = True
            proxy = setting if isinstance(setting, Proxy) else parse_proxy_url(setting, where)
            self.proxies = {"http": proxy, "https": proxy}
        else:
            for scheme in ("http", "https"):
                proxy, problem = _env_proxy(env, scheme)
                if proxy is not None:
                    self.proxies[scheme] = proxy
                    self.sources[scheme] = next(v for v in (scheme.upper() + "_PROXY", scheme + "_proxy")
                                                if env.get(v, "").strip())
                if problem:
                    self.warnings.append("%s; ignored: %s requests go direct" % (problem, scheme))
            self.no_proxy = next((env[v] for v in ("NO_PROXY", "no_proxy") if env.get(v)), "")

    def for_url(self, url):
        """The Proxy for ``url``, or None to connect directly."""
        return self.decide(url)[0]

    def decide(self, url):
        """(Proxy or None, why): the decision for ``url`` and its reason,
        as ``--check-config`` and the start-up log show it."""
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower()
        proxy = self.proxies.get(parts.scheme)
        if self.direct:
            return None, "direct (%s is \"direct\")" % self.where
        if is_node_local(host):
            return None, "direct (a node-local metadata address is never proxied)"
        if proxy is None:
            return None, "direct (%s)" % ("%s is not set" % self.where if self.explicit else
                                          "no %s_PROXY in the environment" % parts.scheme.upper())
        if self.explicit:
            return proxy, "via %s (%s)" % (proxy.display, self.where)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if host == "localhost" or host.endswith(".localhost") or _is_loopback(host):
            return None, "direct (loopback is never proxied from the environment)"
        if no_proxy_match(host, port, self.no_proxy):
            return None, "direct (NO_PROXY matches %s)" % host
        return proxy, "via %s (%s)" % (proxy.display, self.sources.get(parts.scheme, "environment"))


def _env_proxy(env, scheme):
    """(Proxy, problem) of ``scheme``'s proxy variable in ``env``: (None,
    None) when unset; a value the agent cannot use (https://, socks5://,
    malformed) gives no Proxy and the one-line reason, never the password."""
    var = next((v for v in (scheme.upper() + "_PROXY", scheme + "_proxy")
                if env.get(v, "").strip()), None)
    if var is None:
        return None, None
    try:
        return parse_proxy_url(env[var].strip(), var), None
    except ConfigError as exc:
        return None, str(exc)


def _is_loopback(host):
    address = _host_address(host)
    return address is not None and address.is_loopback


def _host_address(host):
    """The ipaddress object ``host`` names when connected to (any spelling
    the resolver takes: ``[v6]``, a zone, ``0xa9fea9fe``, ``169.254.43518``),
    or None for a name."""
    import ipaddress
    host = host.strip("[]").partition("%")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not re.match(r"\A[0-9a-fA-FxX.]+\Z", host) or not re.match(r"\A[0-9]", host):
            return None
        try:
            address = ipaddress.ip_address(socket.inet_aton(host))   # what getaddrinfo accepts
        except (OSError, ValueError):
            return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def is_node_local(host):
    """Whether ``host`` is a credential endpoint of the node itself: a
    link-local address, the AWS IPv6 metadata addresses or Google's
    metadata name, compared as parsed addresses."""
    import ipaddress
    host = host.lower()
    if host in METADATA_NAMES:
        return True
    address = _host_address(host)
    return address is not None and (address.is_link_local or address in [
        ipaddress.ip_address(text) for text in METADATA_ADDRESSES])


MAX_HEADER_LINES = 100                  # a proxy's answer to CONNECT (http.client's own limit)
MAX_HEADER_BYTES = 64 * 1024


class Watchdog:
    """Shuts down the socket of every request that runs past its deadline.

    One daemon thread per Watchdog (an Http makes its own), running while
    requests are in flight, sleeps until the earliest deadline, whatever
    their number. A read blocked on a server that trickles one byte
    a second never times out on its own; the shutdown ends it at once."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._watches = set()
        self._thread = None

    def arm(self, watch):
        with self._cond:
            self._watches.add(watch)
            if self._thread is None:
                try:
                    thread = start_thread(self._run, "http-deadlines")
                except RuntimeError as exc:     # out of threads (a pids limit): no deadline
                    self._watches.discard(watch)
                    raise TransportError("cannot start the request deadline thread: %s" % exc,
                                         retryable=True) from exc
                self._thread = thread
            self._cond.notify()

    def disarm(self, watch):
        """Forget ``watch``; once this returns, it is never fired."""
        with self._cond:
            self._watches.discard(watch)
            if not self._watches:
                self._cond.notify()         # the thread ends now, not at the old deadline

    def _run(self):
        with self._cond:
            while True:
                now = self.clock()
                for watch in [w for w in self._watches if w.deadline() <= now]:
                    self._watches.discard(watch)
                    watch.expire()
                due = min((w.deadline() for w in self._watches), default=None)
                if due is None:         # idle: end (the next arm() starts another), so an
                    self._thread = None     # Http dropped by a reload leaves no thread behind
                    return
                if any(w.cleanup for w in self._watches):
                    due = min(due, now + 0.25)      # a stop may shorten it without a notify
                self._cond.wait(max(0.0, due - now))


def _shutdown(sock):
    """Cut ``sock`` in both directions, so a read or write blocked on it in
    another thread returns at once (socket.socket's own method: an
    SSLSocket's would also drop its TLS state under the reading thread)."""
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass


class _Watch:
    """One request's guard: the Watchdog shuts its socket down at the
    deadline (``expired``), the Signals' abort hook at a stop (``stopped``).
    A stop requested before the request started does not abort it (a
    cleanup after a stop, such as aborting a multipart upload, still runs),
    but it gets STOP_GRACE seconds at most, not the whole deadline; a second
    signal cuts it at once."""

    def __init__(self, watchdog, signals, seconds, what, cleanup=False):
        if signals is not None and signals.stop_requested:
            seconds = min(seconds, STOP_GRACE)
        self.watchdog, self.seconds, self.what, self.cleanup = watchdog, seconds, what, cleanup
        self.stop_due = None        # a cleanup request's deadline once a stop came
        self.sock = self.due = None
        self.expired = self.stopped = False
        self._live = False
        self._hook = signals.aborting(self.abort) if signals is not None else None
        if self._hook is not None:
            self._hook.__enter__()
        self._live = True

    def attach(self, sock):
        self.sock = sock
        if self.stopped or self.expired:
            _shutdown(sock)

    def start(self):
        """Arm: ``seconds`` from now."""
        self.due = self.watchdog.clock() + self.seconds
        self.watchdog.arm(self)

    def resume(self):
        """Arm again until the same deadline (a small body read after the headers)."""
        if self.due is not None:
            self.watchdog.arm(self)

    def pause(self):
        self.watchdog.disarm(self)

    def expire(self):
        self.expired = True
        _shutdown(self.sock)

    def abort(self):
        """The stop hook (it runs in the signal handler: no locks here)."""
        if self._live and self.cleanup:
            if self.stop_due is None:
                self.stop_due = self.watchdog.clock() + STOP_GRACE    # the watchdog polls it
        elif self._live:
            self.stopped = True
            _shutdown(self.sock)

    def deadline(self):
        return self.due if self.stop_due is None else min(self.due, self.stop_due)

    def failure(self):
        """What a failed read or write really means, or None: Stopped, or
        the deadline's TransportError."""
        if self.stopped:
            return Stopped("stop requested")
        if self.expired:
            return TransportError("%s: no complete answer within %s (request_timeout)"
                                  % (self.what, format_duration(self.seconds)), retryable=True)
        return None

    def release(self):
        self.pause()
        if self._hook is not None:
            self._hook.__exit__(None, None, None)
        self.sock = None


class Response:
    """An HTTP response whose body is read on demand (streams stay streams).
    ``body()`` and ``json()`` read under the request's deadline; ``read``
    and ``readinto`` (streams) only under the socket's idle timeout."""

    def __init__(self, method, url, conn, raw, sock, watch=None):
        self.method = method
        self.url = url
        self.status = raw.status
        self.reason = raw.reason
        self.headers = raw.msg
        self._conn = conn
        self._raw = raw
        self._sock = sock
        self._watch = watch

    def header(self, name, default=None):
        return self.headers.get(name, default)

    def read(self, size=CHUNK_SIZE):
        return self._reading(self._raw.read, size)

    def read1(self, size=CHUNK_SIZE):
        """What one receive brings (at most ``size``): a consumer that must
        see progress (a stop, a cycle due) is not held until ``size``
        bytes trickled in."""
        return self._reading(self._raw.read1, size)

    def readinto(self, buffer):
        """Fill ``buffer`` from the body (chunked or not) without allocating;
        returns the count, 0 at the end."""
        return self._reading(self._raw.readinto, buffer)

    def _reading(self, method, argument):
        """``method(argument)`` on the raw answer; a failure is a retryable
        TransportError naming the request (or Stopped, or the deadline's
        error, when that is why the socket was cut)."""
        import http.client
        try:
            return method(argument)
        except (socket.timeout, OSError, ValueError, http.client.HTTPException) as exc:
            failure = self._watch.failure() if self._watch is not None else None
            if failure is not None:
                raise failure from exc
            raise TransportError("%s %s: reading the answer failed: %s"
                                 % (self.method, redact_url(self.url), _exc_text(exc) or type(exc).__name__),
                                 retryable=True) from exc

    def body(self, limit=MAX_JSON_BYTES, cut=False):
        """The whole body, refusing more than ``limit`` bytes (``cut``: its
        first ``limit`` bytes, the rest unread); within the request's
        deadline."""
        if self._watch is not None:
            self._watch.resume()
        try:
            data = read_at_most(self, limit, CHUNK_SIZE) if cut else self._read_body(limit)
        finally:
            if self._watch is not None:
                self._watch.pause()
        failure = self._watch.failure() if self._watch is not None else None
        if failure is not None:      # cut short: an answer without a length ends "cleanly"
            raise failure
        return data

    def _read_body(self, limit):
        data = read_at_most(self, limit + 1, CHUNK_SIZE)
        if len(data) > limit:
            self.close()
            raise TransportError("%s %s: answer larger than %s, refused"
                                 % (self.method, redact_url(self.url), format_size(limit)))
        return data

    def json(self):
        data = self.body()
        if not data.strip():
            return {}
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError:
            raise TransportError("%s %s: HTTP %d with a body that is not JSON: %s"
                                 % (self.method, redact_url(self.url), self.status,
                                    one_line(data[:200].decode("utf-8", "replace"))),
                                 status=self.status) from None

    def abort(self):
        """Cut the connection now; a read blocked in another frame returns at once."""
        _shutdown(self._sock)

    def close(self):
        if self._watch is not None:
            self._watch.release()
        try:
            self._raw.close()
        finally:
            self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class Http:
    """Minimal HTTP/1.1 client on http.client: no automatic redirects, TLS as
    configured, forward proxies as ``proxy`` (a ProxyPolicy) says.

    Two limits: ``timeout`` per socket operation (so a stream only fails
    when it goes idle, never because it is long) and ``deadline``, the total
    time of connecting, the proxy's CONNECT, TLS, the answer's headers and
    a body read with ``body()``/``json()``. A request body that is a file or
    an iterable (snapshot data) is sent under the idle timeout alone; the
    deadline starts again for its answer's headers. A request given a
    longer ``timeout`` than the deadline (the snapshot stream: Vault builds
    the snapshot before its first byte) waits that long for its headers.
    With ``signals``, a stop cuts every request in progress at once
    (Stopped)."""

    def __init__(self, tls=None, timeout=30.0, user_agent=None, proxy=None, deadline=60.0,
                 signals=None, watchdog=None):
        self.tls = tls or TlsOptions(None, None, None, None, None, False)
        self.timeout = timeout
        self.user_agent = user_agent or "%s/%s" % (PROG, __version__)
        self.proxy = proxy or ProxyPolicy("direct")
        self.deadline = deadline
        self.signals = signals
        self.watchdog = watchdog or Watchdog()
        self._context = None

    def _open(self, parts, proxy, timeout, watch):
        """An http.client connection on a socket this opened (through a
        proxy: with its CONNECT for https), TLS checked against the
        origin's name or ``server_name``, never the proxy's."""
        import http.client
        https = parts.scheme == "https"
        if parts.scheme not in ("http", "https"):
            raise TransportError("unsupported URL scheme in %s" % redact_url(parts.geturl()))
        host, port = parts.hostname, parts.port or (443 if https else 80)
        if https and self._context is None:
            self._context = make_ssl_context(self.tls)
        sock = _connect(proxy.host if proxy else host, proxy.port if proxy else port, timeout, watch)
        try:
            if https:
                if proxy is not None:
                    _tunnel(sock, host, port, proxy)
                sock = self._context.wrap_socket(sock, server_hostname=self.tls.server_name or host,
                                                  do_handshake_on_connect=False)
                watch.attach(sock)
                sock.do_handshake()
                conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._context)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
        except BaseException:
            sock.close()
            raise
        conn.sock = sock
        return conn

    def _prepare(self, method, url, headers, body):
        """(parts, request target, Proxy or None, headers) of a request;
        TransportError for a bad URL or a header with a control character."""
        try:
            parts = urllib.parse.urlsplit(url)
            _ = parts.port          # a bad port raises here
        except ValueError as exc:
            raise TransportError("%s %s: invalid URL (%s)" % (method, redact_url(url), exc)) from exc
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        proxy = self.proxy.for_url(url)
        all_headers = {"User-Agent": self.user_agent}
        if proxy is not None and parts.scheme == "http":
            target = "http://%s%s" % (parts.netloc.rpartition("@")[2], target)   # absolute form
            if proxy.auth:
                all_headers["Proxy-Authorization"] = proxy.auth.reveal()
        all_headers.update(headers or {})
        if body is not None and "Content-Type" not in all_headers:
            all_headers["Content-Type"] = "application/octet-stream"
        for name, value in all_headers.items():
            # http.client would refuse it with the value in the message: a
            # token with a pasted newline would land in the log.
            if has_control("%s%s" % (name, value)):
                raise TransportError("%s %s: header %s holds a control character (CR, LF...); "
                                     "not sent" % (method, redact_url(url), printable(name, 60)))
        return parts, target, proxy, all_headers

    def request(self, method, url, headers=None, body=None, timeout=None, cleanup=False):
        """Send one request and return the Response (any status).

        Connection-level failures raise a retryable TransportError naming the
        host and operation (never a header value); the deadline's is one too;
        a stop raises Stopped. A ``cleanup`` request (aborting an upload) is
        not cut by a stop: it gets STOP_GRACE seconds from the stop instead.
        """
        parts, target, proxy, all_headers = self._prepare(method, url, headers, body)
        via = " via proxy %s" % proxy.display if proxy else ""
        limit = self.deadline if timeout is None else max(self.deadline, timeout)
        timeout = timeout or self.timeout
        watch = _Watch(self.watchdog, self.signals, limit, "%s %s%s" % (method, redact_url(url), via),
                       cleanup)
        streaming = body is not None and not isinstance(body, (bytes, bytearray, str))
        conn = None
        try:
            watch.start()
            conn = self._open(parts, proxy, timeout, watch)
            if streaming:
                watch.pause()       # the body goes out under the idle timeout alone
            raw = _send(conn, method, target, body, all_headers, watch.start if streaming else None)
            watch.pause()
            if watch.failure() is not None:     # cut short: http.client takes EOF as the headers' end
                raise watch.failure()
        except BaseException as exc:
            if conn is not None:
                conn.close()
            watch.release()
            error = _request_error(exc, watch, method, url, via, proxy)
            if error is exc:
                raise
            raise error from exc
        # A proxy's 407, or the 401 some proxies send for a bad password; only
        # plain http goes through the proxy itself (inside a CONNECT tunnel the
        # answer is the origin's, and the tunnel's own refusals came earlier).
        if proxy is not None and parts.scheme == "http" and (raw.status == 407 or raw.status == 401 and (
                raw.getheader("WWW-Authenticate") or "").lower().startswith("basic")):
            conn.close()
            watch.release()
            raise TransportError("%s %s%s: the proxy refused the credentials (%d %s)" % (
                method, redact_url(url), via, raw.status, raw.reason), status=raw.status)
        return Response(method, url, conn, raw, conn.sock, watch)


def _request_error(exc, watch, method, url, via, proxy):
    """The error a failed request raises for ``exc``: Stopped or the
    deadline's error when that is why it failed, else a TransportError
    naming the request; anything not from the network as it is."""
    import http.client
    import ssl
    failure = watch.failure()
    if failure is not None and isinstance(exc, (OSError, ValueError, http.client.HTTPException)):
        return failure
    if isinstance(exc, ssl.SSLError):      # before ValueError: a certificate error is both
        text = _exc_text(exc)
        if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
            text += " (the server answered without TLS: use http:// in the URL, or its TLS port)"
        return TransportError("%s %s%s: TLS error: %s" % (method, redact_url(url), via, text),
                              retryable=False)
    if isinstance(exc, ValueError):         # http.client's header checks; its text may hold a value
        return TransportError("%s %s: http.client refused the request headers" % (method, redact_url(url)))
    if isinstance(exc, (OSError, http.client.HTTPException)):
        text = _exc_text(exc) or type(exc).__name__
        refused = proxy is not None and re.search(r"Tunnel connection failed: 40[137]", text)
        return TransportError("%s %s%s: %s%s" % (
            method, redact_url(url), via, text,
            " (the proxy refused the tunnel: check its user and password)" if refused else ""),
            retryable=not refused)
    return exc


def _connect(host, port, timeout, watch):
    """A TCP socket connected to ``host``:``port`` (each address in turn,
    as socket.create_connection), attached to ``watch`` before it connects,
    so a deadline or a stop ends even a connect that hangs."""
    error = OSError("no address for %s" % host)
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            watch.attach(sock)
            sock.connect(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
            if watch.failure() is not None:
                break
    raise error


def _tunnel(sock, host, port, proxy):
    """The CONNECT exchange on ``sock`` (open to ``proxy``): at most
    MAX_HEADER_LINES header lines and MAX_HEADER_BYTES in all, read byte by
    byte so nothing of the tunnel is consumed. (http.client's own reads
    header lines without a count before 3.12: a proxy streaming them
    without end held the agent for ever.)"""
    authority = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
    lines = ["CONNECT %s HTTP/1.1" % authority, "Host: %s" % authority]
    if proxy.auth:
        lines.append("Proxy-Authorization: %s" % proxy.auth.reveal())
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
    reader = sock.makefile("rb", buffering=0)
    headers = {}
    try:
        status = _tunnel_status(reader.readline(MAX_HEADER_BYTES + 1))
        total = 0
        for _ in range(MAX_HEADER_LINES + 1):
            line = reader.readline(MAX_HEADER_BYTES + 1)
            total += len(line)
            if total > MAX_HEADER_BYTES:
                raise OSError("the proxy's answer to CONNECT has more than %s of headers"
                              % format_size(MAX_HEADER_BYTES))
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise OSError("the proxy closed the connection during CONNECT")
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        else:
            raise OSError("the proxy's answer to CONNECT has more than %d header lines" % MAX_HEADER_LINES)
        said = _proxy_reason(reader, headers) if status[0] != 200 else ""
    finally:
        reader.close()
    if status[0] != 200:
        raise OSError("Tunnel connection failed: %d %s%s" % (status + (said,)))


def _proxy_reason(reader, headers):
    """What a proxy that refused CONNECT says besides its status: Squid's
    X-Squid-Error, else the text of its error page (HTML tags dropped; at
    most 4 KiB of it read)."""
    if headers.get("x-squid-error"):
        return " (the proxy said: %s)" % printable(headers["x-squid-error"], 100)
    length = headers.get("content-length", "")
    if re.match(r"\A[0-9]{1,9}\Z", length):
        want = min(int(length), 4096)
    else:
        want = 4096 if "chunked" not in headers.get("transfer-encoding", "").lower() else 0
    try:
        page = read_at_most(reader, want, 1024).decode("utf-8", "replace") if want else ""
    except OSError:
        return ""
    text = one_line(re.sub(r"(?s)<(script|style)[^>]*>.*?</\1>|<[^>]*>", " ", page), 160)
    return " (the proxy said: %s)" % printable(text, 160) if text else ""


def _tunnel_status(line):
    """(code, reason) of the status line of a proxy's answer to CONNECT."""
    if not line:
        raise OSError("the proxy closed the connection during CONNECT")
    match = re.match(br"\AHTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?\r?\n\Z", line)
    if not match:
        raise OSError("the proxy's answer to CONNECT is not HTTP: %s"
                      % printable(line[:60].decode("latin-1"), 60))
    return int(match.group(1)), printable((match.group(2) or b"").decode("latin-1"), 60)


def _send(conn, method, target, body, headers, sent=None):
    """Send the request and return the raw answer; ``sent()``, if given,
    runs between the last byte of the body and reading the answer. A server
    (or proxy) that answers early and closes while the body is still going
    out (a refusal before a large upload) has its answer read rather than
    lost to a connection reset."""
    import http.client
    try:
        conn.request(method, target, body=body, headers=headers)
    except (BrokenPipeError, ConnectionResetError):
        if sent is not None:
            sent()
        try:
            return conn.getresponse()
        except (OSError, http.client.HTTPException):
            pass
        raise
    if sent is not None:
        sent()
    return conn.getresponse()


def retryable_status(status):
    """Whether an HTTP status is worth another try: timeouts, throttling and
    server errors, but not 501 (the server will never implement it)."""
    return status in (408, 429) or (500 <= status < 600 and status != 501)


def backoff_delays(attempts, base=1.0, cap=30.0, rand=random.random):
    """Equal-jitter exponential backoff: the waits between ``attempts``
    tries, each half its step fixed plus a random half (full jitter could
    wait next to nothing, retrying a throttled store at once)."""
    return [step / 2 + rand() * step / 2 for step in
            (min(cap, base * (2 ** i)) for i in range(attempts - 1))]


MAX_RETRY_AFTER = 60.0      # a longer Retry-After waits this long (the next cycle retries anyway)


def retry_after(value, now):
    """Seconds a ``Retry-After`` value asks to wait (delta seconds or an
    HTTP date, against the aware datetime ``now``), at most MAX_RETRY_AFTER;
    None when absent or not understood."""
    import email.utils
    value = (value or "").strip()
    if re.match(r"\A[0-9]{1,10}\Z", value):
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return min(max(0.0, (when - now).total_seconds()), MAX_RETRY_AFTER)


# =============================================================================
# 6. Request signing
# =============================================================================


SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def uri_encode(text, safe="-_.~"):
    """RFC 3986 percent-encoding as SigV4 wants it. ``safe`` is always given
    explicitly: Python 3.6's quote() escapes '~' by default, 3.7+ does not."""
    return urllib.parse.quote(text, safe=safe)


def canonical_query(pairs):
    """The SigV4 canonical query string of (name, value) pairs; also a valid
    query string to send, so the request and the signature cannot differ."""
    encoded = sorted((uri_encode(k), uri_encode(v)) for k, v in pairs)
    return "&".join("%s=%s" % kv for kv in encoded)


def sigv4_signing_key(secret_key, datestamp, region, service):
    key = ("AWS4" + secret_key).encode("utf-8")
    for part in (datestamp, region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def sigv4_headers(method, host, path, query, headers, payload_hash, access_key, secret_key,
                  session_token, region, service, when):
    """Headers for one request signed with AWS Signature Version 4.

    Pure: ``when`` (an aware datetime) and the credentials are arguments.
    ``path`` is the already-encoded canonical URI, ``query`` the canonical
    query string; every header in ``headers`` is signed (with ``host``).
    Returns a new dict with x-amz-date, x-amz-content-sha256, the session
    token if any, and Authorization added.
    """
    amz_date = when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    datestamp = amz_date[:8]
    out = dict(headers)
    out["host"] = host
    out["x-amz-date"] = amz_date
    if service == "s3":
        out["x-amz-content-sha256"] = payload_hash
    if session_token:
        out["x-amz-security-token"] = session_token
    canon = {}
    for name, value in out.items():
        canon[name.lower()] = " ".join(str(value).split())
    signed = ";".join(sorted(canon))
    canonical_request = "\n".join([
        method, path or "/", query,
        "".join("%s:%s\n" % (name, canon[name]) for name in sorted(canon)),
        signed, payload_hash])
    scope = "%s/%s/%s/aws4_request" % (datestamp, region, service)
    string_to_sign = "\n".join([SIGV4_ALGORITHM, amz_date, scope,
                                hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()])
    signature = hmac.new(sigv4_signing_key(secret_key, datestamp, region, service),
                         string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    out["Authorization"] = "%s Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        SIGV4_ALGORITHM, access_key, scope, signed, signature)
    return out

def azure_shared_key(method, url, headers, account, key):
    """The Shared Key ``Authorization`` value for one Blob service request.

    Pure: ``headers`` must already hold x-ms-date and x-ms-version; ``key`` is
    the base64 account key.
    """
    string_to_sign = azure_string_to_sign(method, url, headers, account)
    digest = hmac.new(base64.b64decode(key), string_to_sign.encode("utf-8"), hashlib.sha256).digest()
    return "SharedKey %s:%s" % (account, base64.b64encode(digest).decode("ascii"))

def azure_string_to_sign(method, url, headers, account):
    """The string-to-sign of "Authorize with Shared Key" (Blob service,
    version 2015-02-21 and later: an empty Content-Length for 0)."""
    lower = dict((name.lower(), str(value)) for name, value in headers.items())
    length = lower.get("content-length", "")
    fields = [method.upper(), lower.get("content-encoding", ""), lower.get("content-language", ""),
              "" if length == "0" else length, lower.get("content-md5", ""),
              lower.get("content-type", ""), lower.get("date", ""),
              lower.get("if-modified-since", ""), lower.get("if-match", ""),
              lower.get("if-none-match", ""), lower.get("if-unmodified-since", ""),
              lower.get("range", "")]
    canonical_headers = "".join(
        "%s:%s\n" % (name, " ".join(lower[name].split()))
        for name in sorted(n for n in lower if n.startswith("x-ms-")))
    parts = urllib.parse.urlsplit(url)
    resource = "/%s%s" % (account, parts.path or "/")
    params = collections.defaultdict(list)
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        params[name.lower()].append(value)
    for name in sorted(params):
        resource += "\n%s:%s" % (name, ",".join(sorted(params[name])))
    return "\n".join(fields) + "\n" + canonical_headers + resource


# DER of the DigestInfo prefix for SHA-256 (RFC 8017, section 9.2, note 1).
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
RSA_ENCRYPTION_OID = bytes.fromhex("2a864886f70d010101")

RsaKey = collections.namedtuple("RsaKey", "n e d p q dp dq qinv")


def _der_read(data, pos, want=None):
    """One DER element at ``pos``: returns (tag, value bytes, next position)."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    if want is not None and tag != want:
        raise ValueError("unexpected DER tag 0x%02x" % tag)
    return tag, data[pos:pos + length], pos + length


def _der_integers(data):
    """The INTEGERs of a DER SEQUENCE body, in order (non-integers skipped)."""
    out, pos = [], 0
    while pos < len(data):
        tag, value, pos = _der_read(data, pos)
        if tag == 0x02:
            out.append(int.from_bytes(value, "big", signed=True))
    return out


def load_rsa_private_key(pem):
    """An RsaKey from a PEM PKCS#8 ('PRIVATE KEY') or PKCS#1 ('RSA PRIVATE
    KEY') block. Errors never include key material."""
    match = re.search(r"-----BEGIN (RSA )?PRIVATE KEY-----(.*?)-----END (RSA )?PRIVATE KEY-----",
                      pem, re.S)
    if not match:
        raise ValueError("no PEM 'PRIVATE KEY' or 'RSA PRIVATE KEY' block found")
    try:
        der = base64.b64decode("".join(match.group(2).split()), validate=True)
    except (ValueError, TypeError):
        raise ValueError("the PEM block is not valid base64") from None
    _, body, _ = _der_read(der, 0, 0x30)
    if not match.group(1):             # PKCS#8: version, AlgorithmIdentifier, OCTET STRING
        _, _, pos = _der_read(body, 0, 0x02)
        _, algorithm, pos = _der_read(body, pos, 0x30)
        _, oid, _ = _der_read(algorithm, 0, 0x06)
        if oid != RSA_ENCRYPTION_OID:
            raise ValueError("the private key is not an RSA key")
        _, inner, _ = _der_read(body, pos, 0x04)
        _, body, _ = _der_read(inner, 0, 0x30)
    numbers = _der_integers(body)
    if len(numbers) < 9 or numbers[0] != 0:
        raise ValueError("not a two-prime RSA private key")
    return RsaKey(*numbers[1:9])


def _mod_inverse(value, modulus):
    """value**-1 mod modulus (pow(x, -1, m) only exists from 3.8)."""
    old_r, r, old_s, s = value % modulus, modulus, 1, 0
    while r:
        q = old_r // r
        old_r, r = r, old_r - q * r
        old_s, s = s, old_s - q * s
    if old_r != 1:
        raise ValueError("not invertible")
    return old_s % modulus


def rs256_sign(key, message, rand=os.urandom):
    """RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017, 8.2.1) of ``message``.

    Uses the CRT with the key's primes, blinds the input with a random r**e
    so the time taken does not depend on the secret exponent's use on the
    real message, and checks the result against the public key before
    returning it (a faulty CRT result would leak the key).
    """
    k = (key.n.bit_length() + 7) // 8
    t = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    if k < len(t) + 11:
        raise ValueError("RSA key too short")
    em = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
    m = int.from_bytes(em, "big")
    while True:
        r = int.from_bytes(rand(k), "big") % key.n
        if r > 1:
            try:
                r_inv = _mod_inverse(r, key.n)
                break
            except ValueError:
                continue
    blinded = (m * pow(r, key.e, key.n)) % key.n
    m1 = pow(blinded, key.dp, key.p)
    m2 = pow(blinded, key.dq, key.q)
    h = (key.qinv * (m1 - m2)) % key.p
    s = ((m2 + h * key.q) * r_inv) % key.n
    if pow(s, key.e, key.n) != m:
        raise ValueError("RSA signature self-check failed")
    return s.to_bytes(k, "big")


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def service_account_jwt(key, client_email, key_id, token_uri, scope, now):
    """The signed JWT assertion Google's OAuth 2.0 server exchanges for an
    access token (service accounts, "Using OAuth 2.0 for Server to Server")."""
    header = collections.OrderedDict([("alg", "RS256"), ("typ", "JWT")])
    if key_id:
        header["kid"] = key_id
    iat = int(now)
    claims = collections.OrderedDict([("iss", client_email), ("scope", scope), ("aud", token_uri),
                                      ("iat", iat), ("exp", iat + 3600)])
    signing_input = "%s.%s" % (b64url(json.dumps(header, separators=(",", ":")).encode("utf-8")),
                               b64url(json.dumps(claims, separators=(",", ":")).encode("utf-8")))
    return signing_input + "." + b64url(rs256_sign(key, signing_input.encode("ascii")))


# =============================================================================
# 7. AWS credentials
# =============================================================================


AwsCredentials = collections.namedtuple(
    "AwsCredentials", "access_key secret_key token expires source")
# secret_key and token are Secrets; expires is an aware datetime or None.

DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
DEFAULT_CONTAINER_ENDPOINT = "http://169.254.170.2"
CREDENTIAL_REFRESH_MARGIN = datetime.timedelta(minutes=5)
# Short-lived credentials (less than the margin left: IMDS hands them out for
# minutes before it rotates) are used, and asked for again half-way to their
# expiry but not sooner than this before it, so no request runs the source.
CREDENTIAL_MIN_REUSE = datetime.timedelta(seconds=10)
# A source that answered with expired or absurd credentials is not asked
# again for this long: the error stands (upload workers, the abort, ...).
CREDENTIAL_ERROR_HOLD = 30.0
CREDENTIAL_OLDEST = datetime.datetime(2000, 1, 1, tzinfo=UTC)    # an Expiration before: absurd
CREDENTIAL_PROCESS_TIMEOUT = 60.0
CREDENTIAL_PROCESS_MAX_STDOUT = 1024 * 1024
CREDENTIAL_PROCESS_STDERR_KEPT = 4096


def _parse_time(text):
    """An ISO 8601 time as AWS and its tools write it ('2026-11-27T21:00:00Z',
    with or without fractions, 'z', or an offset such as '+02:00' or '-0500'),
    as an aware UTC datetime; fromisoformat cannot read 'Z' before 3.11."""
    match = re.match(r"\A([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.[0-9]+)?"
                     r"([Zz]|[+-][0-9]{2}:?[0-9]{2})?\Z", text.strip())
    if not match:
        raise ValueError("not an ISO 8601 time: %r" % text)
    when = datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    zone = match.group(2) or "Z"
    if zone not in "Zz":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        when -= sign * datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return when


class CredentialHelper:
    """A credential_process run contained: its own process group (session),
    killed as a whole on timeout, on a stop request or when it prints more
    than CREDENTIAL_PROCESS_MAX_STDOUT; stdout and stderr are read here with
    a cap, so neither a grandchild holding a pipe nor endless output can
    keep the agent waiting or fill its memory. A helper that starts its own
    session (setsid) leaves the group: it is not waited for, only not killed.
    """

    POLL = 0.1          # seconds between looks at the deadline and the stop flag
    REAP = 2.0          # seconds to wait for the group leader after SIGKILL
    DRAIN = 0.5         # seconds to read what is left once the helper itself exited

    def __init__(self, argv, env, signals, timeout, what):
        self.argv, self.env, self.signals = argv, env, signals
        self.timeout, self.what = timeout, what
        self.proc = None

    def run(self):
        """(exit status, stdout bytes, first stderr bytes); raises
        StorageError (timeout, too much output, cannot start) or Stopped."""
        import subprocess
        try:
            self.proc = spawn(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=self.env, start_new_session=True)
        except (OSError, ValueError) as exc:
            raise StorageError("%s: cannot run it: %s" % (
                self.what, getattr(exc, "strerror", None) or exc)) from exc
        deadline = time.monotonic() + self.timeout     # real time: the helper runs in it
        try:
            out, err = self._read(deadline)
            return self._wait(deadline), out, err
        except BaseException:
            self._kill()
            raise
        finally:
            self.proc.stdout.close()
            self.proc.stderr.close()

    def _tick(self, deadline):
        if self.signals is not None and self.signals.stop_requested:
            raise Stopped("stop requested")
        if time.monotonic() >= deadline:
            raise StorageError("%s: no answer within %gs; stopped it" % (self.what, self.timeout))

    def _read(self, deadline):
        out, err = bytearray(), bytearray()
        streams = {self.proc.stdout.fileno(): out, self.proc.stderr.fileno(): err}
        drained = None      # once the helper exited: until when its pipes are still read
        while streams:
            self._tick(deadline)
            if drained is None and self.proc.poll() is not None:
                drained = time.monotonic() + self.DRAIN
            elif drained is not None and time.monotonic() >= drained:
                break       # a daemon it left (setsid) holds the pipes: not waited for
            ready, _, _ = select.select(list(streams), [], [], self.POLL)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    del streams[fd]
                elif streams[fd] is err:
                    err += chunk[:max(0, CREDENTIAL_PROCESS_STDERR_KEPT - len(err))]
                else:
                    out += chunk
                    if len(out) > CREDENTIAL_PROCESS_MAX_STDOUT:
                        raise StorageError("%s: printed more than %d bytes; stopped it" % (
                            self.what, CREDENTIAL_PROCESS_MAX_STDOUT))
        return bytes(out), bytes(err)

    def _wait(self, deadline):
        import subprocess
        while True:
            self._tick(deadline)
            try:
                return self.proc.wait(timeout=self.POLL)
            except subprocess.TimeoutExpired:
                continue

    def _kill(self):
        """SIGKILL the helper's whole process group; wait a bounded time."""
        import subprocess
        if self.proc.returncode is not None:
            return          # reaped: its pid (the group id) may belong to another now
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=self.REAP)
        except subprocess.TimeoutExpired:
            LOG.warning("%s: still not gone %gs after SIGKILL", self.what, self.REAP)


class AwsCredentialChain:
    """The AWS SDKs' default credential chain, in their order:

    config keys → AWS_ACCESS_KEY_ID/… → web identity (AWS_ROLE_ARN +
    AWS_WEB_IDENTITY_TOKEN_FILE, via STS AssumeRoleWithWebIdentity) → shared
    credentials and config files (AWS_PROFILE) → container credentials (ECS,
    EKS Pod Identity) → EC2 instance metadata (IMDSv2). The first source that
    is configured is used; if it fails, that is the error (no silent fall
    through to another identity). Temporary credentials are refreshed five
    minutes before they expire. Credentials that are already expired when a
    source hands them out, or whose Expiration is not a plausible time, are
    an error naming the source (held for CREDENTIAL_ERROR_HOLD seconds, so
    the source is not run again for every request); they never sign.
    """

    def __init__(self, static, env, region, profile, http, clock, imds_endpoint=None,
                 container_endpoint=None, sts_endpoint=None, role=None, profile_given=False,
                 signals=None, process_timeout=CREDENTIAL_PROCESS_TIMEOUT):
        self.static = static
        self.env = env
        self.region = region
        self.profile = profile
        self.http = http
        self.clock = clock
        # The endpoints as the block's key table resolved them (environment
        # fallbacks included); unset: AWS's own.
        self.imds_endpoint = (imds_endpoint or DEFAULT_IMDS_ENDPOINT).rstrip("/")
        self.container_endpoint = (container_endpoint or DEFAULT_CONTAINER_ENDPOINT).rstrip("/")
        self.sts_endpoint = (sts_endpoint or "https://sts.%s.amazonaws.com" % region).rstrip("/")
        self.role = role                    # an AwsRole to assume with what the chain finds
        # A profile named in the config outranks the environment's keys, as in
        # botocore (else credential_source = Environment could never apply).
        self.profile_given = profile_given
        self.signals = signals              # a stop ends a credential_process at once
        self.process_timeout = process_timeout
        self._cached = None
        self._refresh_at = None             # when the cached credentials are asked for again
        self._held = None                   # (error text, until monotonic) of a bad source
        self._lock = threading.Lock()      # upload workers share it: one refresh per expiry

    def get(self, min_valid=0.0):
        """Credentials valid for at least ``min_valid`` more seconds (a
        login that another server replays later asks for a margin)."""
        with self._lock:
            return self._get(min_valid)

    def _get(self, min_valid=0.0):
        cached, now = self._cached, self.clock.now()
        if cached is not None and (cached.expires is None or (
                now < self._refresh_at and (cached.expires - now).total_seconds() > min_valid)):
            return cached
        if self._held is not None and self.clock.monotonic() < self._held[1]:
            raise StorageError(self._held[0])
        for source in (self._static, self._environment, self._web_identity, self._shared_files,
                       self._container, self._instance_metadata):
            if source == self._environment and self.profile_given:
                continue
            creds = source()
            if creds is not None:
                if self.role is not None:
                    creds = self._assume(creds, self.role)
                if any(has_control(part) for part in (creds.access_key, creds.secret_key.reveal(),
                                                      creds.token.reveal() if creds.token else "")):
                    raise StorageError("AWS credentials from %s hold a control character" % creds.source)
                if cached is None or cached.source != creds.source:
                    LOG.info("AWS credentials from %s", creds.source)
                self._cached, self._refresh_at = creds, _refresh_time(creds.expires, now)
                return creds
        raise StorageError("no AWS credentials found (tried aws_storage keys, environment, "
                           "web identity, shared files, container and EC2 instance metadata)")

    def _assume(self, base, role):
        """Temporary credentials of ``role`` (an AwsRole) from STS AssumeRole,
        signed with ``base``: the cross-account backup bucket's usual way."""
        fields = [("Action", "AssumeRole"), ("Version", "2011-06-15"), ("RoleArn", role.arn),
                  ("RoleSessionName", role.session_name), ("DurationSeconds", str(int(role.duration)))]
        if role.external_id:
            fields.append(("ExternalId", role.external_id))
        body = urllib.parse.urlencode(fields).encode("ascii")
        url = self.sts_endpoint + "/"
        headers = sigv4_headers(
            "POST", urllib.parse.urlsplit(url).netloc, "/", "",
            {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/xml"},
            hashlib.sha256(body).hexdigest(), base.access_key, base.secret_key.reveal(),
            base.token.reveal() if base.token else None, self.region, "sts", self.clock.now())
        headers.pop("host", None)
        try:
            resp = self.http.request("POST", url, headers, body)
        except TransportError as exc:
            raise StorageError("STS AssumeRole of %s: %s" % (role.arn, exc), exc.retryable) from exc
        with resp:
            data = resp.body()
            if resp.status != 200:
                raise StorageError(masked("STS AssumeRole of %s (with %s) refused: HTTP %d %s" % (
                    role.arn, base.source, resp.status, _aws_error_line(data)),
                    [base.token.reveal() if base.token else "",
                     headers["Authorization"].rpartition("Signature=")[2]]),
                    retryable_status(resp.status))
        root = parse_xml(data, "STS AssumeRole")
        return self._from_fields(xml_text(root, "AccessKeyId"), xml_text(root, "SecretAccessKey"),
                                 xml_text(root, "SessionToken"), xml_text(root, "Expiration"),
                                 "role %s (assumed with %s)" % (role.arn, base.source))

    def _static(self):
        if self.static is not None:
            return self.static

    def _environment(self):
        def get(name):      # export X=$(cat file) keeps a newline: strip it
            return (self.env.get(name) or "").strip()
        key, secret = get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            token = get("AWS_SESSION_TOKEN") or get("AWS_SECURITY_TOKEN")
            return AwsCredentials(key, Secret(secret), Secret(token) if token else None, None,
                                  "environment")

    def _web_identity(self):
        role, token_file = self.env.get("AWS_ROLE_ARN"), self.env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
        if not (role and token_file):
            return None
        jwt = read_secret_file(token_file, "AWS_WEB_IDENTITY_TOKEN_FILE")
        form = urllib.parse.urlencode([
            ("Action", "AssumeRoleWithWebIdentity"), ("Version", "2011-06-15"),
            ("RoleArn", role),
            ("RoleSessionName", self.env.get("AWS_ROLE_SESSION_NAME") or "vault-snapshot-agent"),
            ("WebIdentityToken", jwt.reveal())]).encode("ascii")
        url = self.sts_endpoint + "/"
        resp = self.http.request("POST", url, {
            "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/xml"}, form)
        with resp:
            data = resp.body()
            if resp.status != 200:
                raise StorageError(masked("STS AssumeRoleWithWebIdentity for %s failed: HTTP %d %s"
                                          % (role, resp.status, _aws_error_line(data)), [jwt.reveal()]))
        root = parse_xml(data, "STS AssumeRoleWithWebIdentity")
        return self._from_fields(xml_text(root, "AccessKeyId"), xml_text(root, "SecretAccessKey"),
                                 xml_text(root, "SessionToken"), xml_text(root, "Expiration"),
                                 "web identity (%s)" % role)

    def _shared_files(self):
        """The profile of the shared config and credentials files, as the AWS
        CLI reads it (None when the default profile has nothing)."""
        found = self._profile(self.profile or "default", [])
        if found is None and self.profile:
            raise StorageError("AWS profile %r has no credentials in %s or %s"
                               % (self.profile, *self._shared_paths()))
        return found

    def _shared_paths(self):
        home = expand_home("~", self.env)
        return (self.env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(home, ".aws", "credentials"),
                self.env.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config"))

    def _profile(self, name, seen):
        """Credentials of profile ``name``: its role (from a source profile,
        a chain of them, or a credential source), its static keys, or its
        credential_process; ``seen`` are the profiles that led here."""
        if name in seen or len(seen) > 5:
            raise StorageError("AWS profiles loop: %s" % " -> ".join(seen + [name]))
        cred_file, conf_file = self._shared_paths()
        conf = read_ini_section(conf_file, name if name == "default" else "profile " + name)
        if any(key.startswith("sso_") for key in conf):
            raise StorageError("AWS profile %r uses AWS SSO (sso_* keys), which is not supported: "
                               "use credential_process or a role" % name)
        if conf.get("role_arn"):
            return self._assume(self._role_source(name, conf, seen), AwsRole(
                conf["role_arn"], conf.get("external_id"),
                conf.get("role_session_name") or default_session_name(),
                _profile_duration(name, conf)))
        for path, values in ((cred_file, read_ini_section(cred_file, name)), (conf_file, conf)):
            if values.get("aws_access_key_id") and values.get("aws_secret_access_key"):
                token = values.get("aws_session_token")
                return AwsCredentials(values["aws_access_key_id"].strip(),
                                      Secret(values["aws_secret_access_key"].strip()),
                                      Secret(token.strip()) if token else None, None,
                                      "shared file %s [%s]" % (path, name))
            if path == cred_file and conf.get("credential_process"):
                return self._process(conf["credential_process"], name)
        return None

    def _role_source(self, name, conf, seen):
        """The credentials a profile's role is assumed with."""
        if conf.get("source_profile"):
            base = self._profile(conf["source_profile"], seen + [name])
            if base is None:
                raise StorageError("AWS profile %r: its source_profile %r has no credentials"
                                   % (name, conf["source_profile"]))
            return base
        sources = {"Environment": self._environment, "Ec2InstanceMetadata": self._instance_metadata,
                   "EcsContainer": self._container}
        source = sources.get(conf.get("credential_source", ""))
        if source is None:
            raise StorageError("AWS profile %r: role_arn needs source_profile or credential_source "
                               "(%s)" % (name, ", ".join(sorted(sources))))
        base = source()
        if base is None:
            raise StorageError("AWS profile %r: credential_source %s has no credentials"
                               % (name, conf["credential_source"]))
        return base

    def _process(self, command, profile):
        """Credentials from a profile's credential_process (run without a
        shell, contained: CredentialHelper). Its stderr (one line, cut) goes
        into errors; its stdout, which holds the secret, never does."""
        import shlex
        what = "credential_process of AWS profile %r" % profile
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise StorageError("%s: cannot parse it: %s" % (what, exc)) from exc
        if not argv:
            raise StorageError("%s is empty" % what)
        code, out, err = CredentialHelper(argv, dict(self.env), self.signals,
                                          self.process_timeout, what).run()
        if code != 0:
            raise StorageError("%s exited %d: %s" % (what, code, one_line(
                err.decode("utf-8", "replace"), 300) or "(no stderr)"))
        try:
            data = json.loads(out.decode("utf-8"))
        except (ValueError, RecursionError):
            raise StorageError("%s: its output is not JSON" % what) from None
        if not isinstance(data, dict) or data.get("Version") != 1:
            raise StorageError("%s: its output is not JSON with \"Version\": 1" % what)
        return self._from_fields(data.get("AccessKeyId"), data.get("SecretAccessKey"),
                                 data.get("SessionToken"), data.get("Expiration"), what)

    def _container(self):
        full = self.env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        relative = self.env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        if not (full or relative):
            return None
        url = full or self.container_endpoint + relative
        headers = {"Accept": "application/json"}
        token_file = self.env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
        if token_file:
            headers["Authorization"] = read_secret_file(
                token_file, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").reveal()
        elif self.env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN"):
            headers["Authorization"] = self.env["AWS_CONTAINER_AUTHORIZATION_TOKEN"]
        resp = self.http.request("GET", url, headers, timeout=5)
        with resp:
            if resp.status != 200:
                raise StorageError("container credentials at %s: HTTP %d" % (redact_url(url), resp.status))
            data = _json_object(resp, "container credentials")
        return self._from_fields(data.get("AccessKeyId"), data.get("SecretAccessKey"),
                                 data.get("Token"), data.get("Expiration"), "container credentials")

    def _instance_metadata(self):
        if (self.env.get("AWS_EC2_METADATA_DISABLED") or "").lower() == "true":
            return None
        base = self.imds_endpoint
        try:
            resp = self.http.request("PUT", base + "/latest/api/token",
                                     {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, b"", timeout=2)
        except TransportError:
            return None        # no metadata service: not on EC2
        with resp:
            token = resp.body(4096).decode("ascii", "replace").strip()
            if resp.status != 200 or not token:
                raise StorageError("EC2 metadata at %s refused an IMDSv2 session token: HTTP %d"
                                   % (base, resp.status))
        headers = {"X-aws-ec2-metadata-token": token}
        path = base + "/latest/meta-data/iam/security-credentials/"
        with self.http.request("GET", path, headers, timeout=2) as resp:
            if resp.status != 200:
                raise StorageError("EC2 metadata: no instance profile role (HTTP %d)" % resp.status)
            role = resp.body(4096).decode("utf-8", "replace").strip().splitlines()[0:1]
        if not role:
            raise StorageError("EC2 metadata: no instance profile role attached")
        with self.http.request("GET", path + role[0], headers, timeout=2) as resp:
            if resp.status != 200:
                raise StorageError("EC2 metadata: credentials for role %s: HTTP %d" % (role[0], resp.status))
            data = _json_object(resp, "EC2 metadata credentials")
        return self._from_fields(data.get("AccessKeyId"), data.get("SecretAccessKey"),
                                 data.get("Token"), data.get("Expiration"),
                                 "EC2 instance metadata (%s)" % role[0])

    def _from_fields(self, key, secret, token, expiration, source):
        if not key or not secret:
            raise StorageError("%s: answer has no AccessKeyId/SecretAccessKey" % source)
        expires = None
        if expiration is not None and expiration != "":       # none: they do not expire
            expires = self._expiry(expiration, source)
        return AwsCredentials(key, Secret(secret), Secret(token) if token else None, expires, source)

    def _expiry(self, expiration, source):
        """The aware time of a source's Expiration; an expired or absurd
        one is an error that stands for CREDENTIAL_ERROR_HOLD seconds."""
        problem, expires = None, None
        try:
            expires = _parse_time(expiration) if isinstance(expiration, str) else None
        except (ValueError, OverflowError):
            pass
        now = self.clock.now()
        if expires is None or expires < CREDENTIAL_OLDEST:
            problem = "%s: unreadable Expiration %s (want an ISO 8601 time)" % (
                source, printable(str(expiration), 40) if isinstance(expiration, str)
                else "of type " + type(expiration).__name__)
        elif expires <= now:
            problem = ("%s: credentials were refreshed, but the refreshed credentials are still "
                       "expired (Expiration %s, %s ago); not used" % (
                           source, expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                           format_duration((now - expires).total_seconds())))
        if problem is None:
            return expires
        self._held = (problem, self.clock.monotonic() + CREDENTIAL_ERROR_HOLD)
        raise StorageError(problem)


def refresh_in(left):
    """Seconds until credentials (AWS keys, an OAuth token) with ``left``
    seconds of life are fetched again: CREDENTIAL_REFRESH_MARGIN before they
    expire, or for short-lived ones half-way there (but at least
    CREDENTIAL_MIN_REUSE, and never after they expire), so no short-lived
    credential is fetched again for every request."""
    margin = CREDENTIAL_REFRESH_MARGIN.total_seconds()
    if left > margin:
        return left - margin
    return min(left, max(left / 2.0, CREDENTIAL_MIN_REUSE.total_seconds()))


def _refresh_time(expires, now):
    """When credentials expiring at ``expires`` are asked for again (refresh_in)."""
    if expires is None:
        return None
    return now + datetime.timedelta(seconds=refresh_in((expires - now).total_seconds()))


def _json_object(resp, what):
    try:
        data = resp.json()
    except TransportError as exc:
        raise StorageError("%s: %s" % (what, exc)) from exc
    if not isinstance(data, dict):
        raise StorageError("%s: answer is not a JSON object" % what)
    return data


AwsRole = collections.namedtuple("AwsRole", "arn external_id session_name duration")
# A role to assume: ARN, optional external id, session name, seconds.


def default_session_name():
    """vault-snapshot-agent-<host>, in the characters STS allows, at most 64."""
    return ("vault-snapshot-agent-" + re.sub(r"[^\w+=,.@-]", "-", socket.gethostname()))[:64]


def _profile_duration(name, conf):
    try:
        seconds = int(conf.get("duration_seconds") or 3600)
    except ValueError:
        raise StorageError("AWS profile %r: duration_seconds is not a whole number" % name) from None
    if not 900 <= seconds <= 43200:
        raise StorageError("AWS profile %r: duration_seconds must be 900 to 43200" % name)
    return seconds


def read_ini_section(path, section):
    """Keys of one section of an AWS-style INI file; {} when absent or unreadable."""
    import configparser
    parser = configparser.RawConfigParser()
    try:
        with open_regular(path, "r") as handle:
            parser.read_file(handle)
    except OSError:
        return {}
    except configparser.Error as exc:
        raise StorageError("%s: cannot parse: %s" % (path, one_line(exc))) from exc
    if not parser.has_section(section):
        return {}
    return dict(parser.items(section))


def _aws_error_line(data):
    """'Code: Message' from an AWS XML error body, or a cut of the body."""
    root = parse_error_xml(data)
    code, message = (xml_text(root, "Code"), xml_text(root, "Message")) if root is not None else (None, None)
    text = "%s: %s" % (code, message) if code else data[:200].decode("utf-8", "replace")
    return printable(one_line(text), 300)


# =============================================================================
# 8. Azure, Google and OpenStack credentials
# =============================================================================


class BearerToken:
    """An access token cache: ``fetch()`` returns (token, seconds valid) or
    (token, seconds, what comes with it: a Swift storage URL); a new token
    is fetched when refresh_in() says, as AWS credentials are (five minutes
    before it expires, half-way through a shorter life), or once the server
    refused it (``invalidate``); one that arrives expired is an error."""

    def __init__(self, fetch, clock, what):
        self.fetch, self.clock, self.what = fetch, clock, what
        self._token = self._context = None
        self._expires = None
        self._lock = threading.Lock()      # upload workers share it: one fetch per expiry

    def get(self):
        return self.session()[0]

    def session(self):
        """(the token as a Secret, what its fetch gave with it)."""
        with self._lock:
            if self._token is None or self.clock.monotonic() >= self._expires:
                answer = self.fetch()
                token, seconds = answer[0], answer[1]
                if not token:
                    raise StorageError("%s: answer has no access token" % self.what)
                seconds = float(seconds)
                if not seconds > 0:
                    raise StorageError("%s: answered a token that is already expired "
                                       "(expires_in %r)" % (self.what, seconds))
                self._token, self._context = Secret(token), answer[2] if len(answer) > 2 else None
                self._expires = self.clock.monotonic() + refresh_in(seconds)
                LOG.info("Obtained an access token from %s, valid %s", self.what,
                         format_duration(float(seconds)))
            return self._token, self._context

    def invalidate(self, token):
        """Forget ``token`` (the Secret a server just refused) unless a newer
        one has replaced it already: the next ``get`` fetches another."""
        with self._lock:
            if self._token is token:
                self._token = None


def _oauth_answer(http, method, url, headers, body, what, secrets=()):
    """POST/GET a token endpoint; returns the JSON object or raises StorageError.
    The whole exchange is under the Http's deadline (request_timeout); an
    answer too large or too slow is that error, one that is not JSON an
    empty object. ``secrets`` (sent in the request) are masked in errors."""
    try:
        resp = http.request(method, url, headers, body)
    except TransportError as exc:
        raise StorageError("%s: %s" % (what, exc), exc.retryable) from exc
    with resp:
        try:
            raw = resp.body()
        except TransportError as exc:
            raise StorageError("%s: %s" % (what, exc), exc.retryable) from exc
        try:
            data = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except ValueError:
            data = {}
        if resp.status != 200:
            detail = ""
            if isinstance(data, dict):
                detail = data.get("error_description") or data.get("error") or data.get("message") or ""
                if isinstance(detail, dict):    # Google APIs: {"error": {"code", "message", "status"}}
                    detail = detail.get("message") or detail.get("status") or ""
            raise StorageError("%s: HTTP %d %s" % (what, resp.status, masked(
                printable(one_line(detail, 200), 300), secrets)), retryable_status(resp.status))
    if not isinstance(data, dict):
        raise StorageError("%s: answer is not a JSON object" % what)
    return data


def _expires_in(data):
    """Seconds a token stays valid (``expires_in``, a number or a string),
    within a day: 'nan', 'inf' or 1e308 would keep a token cached forever."""
    try:
        seconds = float(data["expires_in"])
    except (KeyError, TypeError, ValueError):
        return 3600.0
    return min(max(seconds, 0.0), 86400.0) if math.isfinite(seconds) else 3600.0


AZURE_STORAGE_SCOPE = "https://storage.azure.com/.default"

AZURE_STORAGE_RESOURCE = "https://storage.azure.com/"

def azure_imds_token(http, imds, resource, identity=()):
    """(access token, seconds valid) of the node's managed identity for
    ``resource``, from IMDS at ``imds``; ``identity`` picks a user-assigned
    one: ``[("client_id", id)]`` or ``[("object_id", id)]``."""
    query = [("api-version", "2018-02-01"), ("resource", resource)] + list(identity)
    data = _oauth_answer(http, "GET", imds + "/metadata/identity/oauth2/token?" +
                         urllib.parse.urlencode(query), {"Metadata": "true"}, None,
                         "Azure managed identity (IMDS)")
    return data.get("access_token"), _expires_in(data)

def _azure_token_fetcher(mode, http, imds, authority, tenant_id, client_id, client_secret, token_file):
    """A function returning (access token, seconds) for Azure Storage."""
    def managed_identity():
        return azure_imds_token(http, imds, AZURE_STORAGE_RESOURCE,
                                [("client_id", client_id)] if client_id else [])

    def entra():
        form = [("grant_type", "client_credentials"), ("client_id", client_id),
                ("scope", AZURE_STORAGE_SCOPE)]
        if mode == "client_secret":
            form.append(("client_secret", client_secret.reveal()))
        else:
            form += [("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                     ("client_assertion", read_secret_file(token_file, "federated_token_file").reveal())]
        data = _oauth_answer(http, "POST", "%s/%s/oauth2/v2.0/token" % (authority, tenant_id),
                             {"Content-Type": "application/x-www-form-urlencoded",
                              "Accept": "application/json"},
                             urllib.parse.urlencode(form).encode("ascii"),
                             "Microsoft Entra token for %s" % mode.replace("_", " "))
        return data.get("access_token"), _expires_in(data)

    return managed_identity if mode == "managed_identity" else entra

GCS_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"

GOOGLE_CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"   # IAM Credentials API

def google_token_source(credentials_file, env, http, clock, metadata_host, scope=GCS_SCOPE):
    """(fetch function, description) for Application Default Credentials:
    the given file (the key or GOOGLE_APPLICATION_CREDENTIALS), then
    gcloud's ADC file, then the metadata server. The fetch returns (access
    token, seconds); a service-account key asks for ``scope``."""
    path = credentials_file
    if not path:
        gcloud = env.get("CLOUDSDK_CONFIG") or os.path.join(expand_home("~", env), ".config", "gcloud")
        candidate = os.path.join(gcloud, "application_default_credentials.json")
        path = candidate if os.path.isfile(candidate) else None
    if path is None:
        def metadata():
            data = _oauth_answer(http, "GET", "http://%s/computeMetadata/v1/instance/service-accounts/"
                                 "default/token" % metadata_host, {"Metadata-Flavor": "Google"}, None,
                                 "GCE metadata server %s" % metadata_host)
            return data.get("access_token"), _expires_in(data)
        return metadata, "the GCE metadata server"
    info = read_credentials_file(path)
    kind = info.get("type")
    if kind == "service_account":
        try:
            pem = info.get("private_key")
            key = load_rsa_private_key(pem if isinstance(pem, str) else "")
        except ValueError as exc:
            raise ConfigError("credentials file %s: private_key: %s" % (path, exc)) from exc
        email, token_uri = info.get("client_email"), info.get("token_uri") or GOOGLE_TOKEN_URI
        if not email:
            raise ConfigError("credentials file %s: client_email missing" % path)

        def service_account():
            assertion = service_account_jwt(key, email, info.get("private_key_id"), token_uri,
                                            scope, (clock.now() - EPOCH).total_seconds())
            form = urllib.parse.urlencode([("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                                           ("assertion", assertion)]).encode("ascii")
            data = _oauth_answer(http, "POST", token_uri, {
                "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
                form, "Google token exchange for %s" % email)
            return data.get("access_token"), _expires_in(data)
        return service_account, "service account %s" % email
    if kind == "authorized_user":
        missing = [k for k in ("client_id", "client_secret", "refresh_token") if not info.get(k)]
        if missing:
            raise ConfigError("credentials file %s: %s missing" % (path, ", ".join(missing)))
        token_uri = info.get("token_uri") or GOOGLE_TOKEN_URI

        def authorized_user():
            form = urllib.parse.urlencode([("grant_type", "refresh_token"),
                                           ("client_id", info["client_id"]),
                                           ("client_secret", info["client_secret"]),
                                           ("refresh_token", info["refresh_token"])]).encode("ascii")
            data = _oauth_answer(http, "POST", token_uri, {
                "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
                form, "Google token refresh (authorized_user)")
            return data.get("access_token"), _expires_in(data)
        return authorized_user, "authorized user credentials in %s" % path
    raise ConfigError("credentials file %s: type %r is not supported (service_account or "
                      "authorized_user)" % (path, kind))

MAX_CREDENTIALS_FILE = 1024 * 1024     # a key file is a few KiB


def read_credentials_file(path):
    try:
        with open_regular(path, "r") as handle:
            text = handle.read(MAX_CREDENTIALS_FILE + 1)
        if len(text) > MAX_CREDENTIALS_FILE:
            raise ConfigError("credentials file %s: larger than 1 MiB; not a key file?" % path)
        info = json.loads(text)
    except OSError as exc:
        raise ConfigError("credentials file %s: cannot read: %s" % (path, exc.strerror or exc)) from exc
    except ValueError:
        raise ConfigError("credentials file %s: not valid JSON" % path) from None
    if not isinstance(info, dict):
        raise ConfigError("credentials file %s: not a JSON object" % path)
    return info


# -- OpenStack: Keystone v3 and tempauth ----------------------------------------

OPENSTACK_INTERFACES = ("public", "internal", "admin")


def swift_auth_version(auth_url):
    """'1' for a tempauth (v1) URL, whose path ends in ``/auth/v1.0`` or
    ``/v1``; else '3' (Keystone)."""
    path = urllib.parse.urlsplit(auth_url).path.rstrip("/")
    return "1" if re.search(r"/v1(\.0)?\Z", path) else "3"


def _openstack_ref(name, ident, domain_name, domain_id):
    """A Keystone user or project reference: by id, else by name in a
    domain (by id, else by name; neither: the ``default`` domain)."""
    if ident:
        return {"id": ident}
    domain = {"id": domain_id} if domain_id else {"name": domain_name} if domain_name else {"id": "default"}
    return {"name": name, "domain": domain}


def keystone_auth_body(values, secret):
    """The body of a Keystone v3 token request for a ``swift_storage``
    block's ``values``: its application credential, else its password
    scoped to its project; ``secret`` is the revealed secret sent."""
    user = _openstack_ref(values["username"], values["user_id"], values["user_domain_name"],
                          values["user_domain_id"])
    if values["application_credential_id"] or values["application_credential_name"]:
        credential = {"secret": secret}
        if values["application_credential_id"]:
            credential["id"] = values["application_credential_id"]
        else:
            credential.update(name=values["application_credential_name"], user=user)
        return {"auth": {"identity": {"methods": ["application_credential"],
                                      "application_credential": credential}}}
    domain_name, domain_id = values["project_domain_name"], values["project_domain_id"]
    if not (domain_name or domain_id):
        domain_name, domain_id = values["user_domain_name"], values["user_domain_id"]
    user["password"] = secret
    return {"auth": {"identity": {"methods": ["password"], "password": {"user": user}},
                     "scope": {"project": _openstack_ref(values["project_name"], values["project_id"],
                                                         domain_name, domain_id)}}}


def catalog_endpoint(catalog, service_type, interface, region, what):
    """The URL of ``service_type`` at ``interface`` (and ``region``, when
    given) in a Keystone v3 catalog; StorageError saying what the catalog
    offers otherwise."""
    offered = []
    for service in catalog if isinstance(catalog, list) else []:
        if not isinstance(service, dict) or service.get("type") != service_type:
            continue
        for point in service.get("endpoints") if isinstance(service.get("endpoints"), list) else []:
            if isinstance(point, dict) and isinstance(point.get("url"), str):
                regions = sorted(set(r for r in (point.get("region"), point.get("region_id"))
                                     if isinstance(r, str)))
                offered.append((point.get("interface"), regions, point["url"]))
    urls = sorted(set(url for where, regions, url in offered
                      if where == interface and (region is None or region in regions)))
    if len(urls) == 1:
        return urls[0]
    shown = ", ".join(sorted(set("%s in %s" % (printable(str(where), 20), printable(
        "/".join(regions) or "no region", 60)) for where, regions, _ in offered)))
    if not offered:
        raise StorageError("%s: the token's catalog has no %s service (is the project right?)"
                           % (what, service_type))
    if not urls:
        raise StorageError("%s: no %s endpoint for interface %s%s; the catalog offers: %s"
                           % (what, service_type, interface, " in region %s" % region if region else "",
                              shown))
    raise StorageError("%s: several %s endpoints for interface %s (%s); set region"
                       % (what, service_type, interface, shown))


def keystone_login(http, auth_url, body, interface, region, clock, what, secret):
    """(token, seconds valid, object-store URL at ``interface``, None
    without one) from Keystone v3's ``POST /v3/auth/tokens`` (``auth_url``
    is the v3 root as OS_AUTH_URL gives it; a bare host gets ``/v3``)."""
    url = auth_url.rstrip("/")
    url += ("" if urllib.parse.urlsplit(url).path else "/v3") + "/auth/tokens"
    try:
        resp = http.request("POST", url, {"Content-Type": "application/json",
                                          "Accept": "application/json"},
                            json.dumps(body).encode("utf-8"))
        with resp:
            raw, token = resp.body(), resp.header("X-Subject-Token")
    except TransportError as exc:
        raise StorageError("%s: %s" % (what, exc), exc.retryable) from exc
    try:
        data = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (ValueError, RecursionError):
        data = {}
    data = data if isinstance(data, dict) else {}
    if resp.status not in (200, 201):
        error = data.get("error") if isinstance(data.get("error"), dict) else {}
        detail = error.get("message") if isinstance(error.get("message"), str) else ""
        raise StorageError("%s: HTTP %d %s%s" % (what, resp.status, masked(
            printable(one_line(detail or resp.reason or "", 200), 300), [secret]),
            " (the credentials were refused)" if resp.status == 401 else ""),
            retryable_status(resp.status))
    answer = data.get("token") if isinstance(data.get("token"), dict) else {}
    try:
        left = (_parse_time(answer.get("expires_at")) - clock.now()).total_seconds()
    except (ValueError, TypeError, AttributeError):
        left = 3600.0
    left = min(left, 86400.0) if math.isfinite(left) else 3600.0
    if interface is None:       # the block names its storage URL itself
        return token, left, None
    return token, left, catalog_endpoint(answer.get("catalog"), "object-store", interface, region, what)


def tempauth_login(http, auth_url, user, key, what):
    """(token, seconds valid, storage URL) from a v1 auth endpoint
    (tempauth, swauth, or a store that speaks it): ``GET`` with
    ``X-Auth-User``/``X-Auth-Key``."""
    try:
        resp = http.request("GET", auth_url, {"X-Auth-User": user, "X-Auth-Key": key})
        with resp:
            raw = resp.body(64 * 1024, cut=True)
            token, storage_url = resp.header("X-Auth-Token"), resp.header("X-Storage-Url")
            expires = resp.header("X-Auth-Token-Expires")
    except TransportError as exc:
        raise StorageError("%s: %s" % (what, exc), exc.retryable) from exc
    if resp.status not in (200, 204):
        text = page_text(raw)
        raise StorageError("%s: HTTP %d %s%s" % (
            what, resp.status, masked(printable(one_line(text or resp.reason or "", 200), 300), [key]),
            " (the user or key was refused)" if resp.status == 401 else ""),
            retryable_status(resp.status))
    try:
        left = float(expires)
    except (TypeError, ValueError):
        left = 3600.0
    return token, min(left, 86400.0) if math.isfinite(left) else 3600.0, storage_url


def swift_token_source(values, http, clock):
    """(fetch, description) for a ``swift_storage`` block's ``values``: the
    fetch logs in (tempauth or Keystone v3, a secret file read afresh each
    time) and returns (token, seconds valid, storage URL)."""
    auth_url, version = values["auth_url"], values["auth_version"]
    app = values["application_credential_id"] or values["application_credential_name"]

    def secret():
        if app:
            if values["application_credential_secret_file"]:
                return read_secret_file(values["application_credential_secret_file"],
                                        "application_credential_secret_file").reveal()
            return values["application_credential_secret"].reveal()
        if values["password_file"]:
            return read_secret_file(values["password_file"], "password_file").reveal()
        return values["password"].reveal()

    def checked(url, what):
        if values["storage_url"]:
            return values["storage_url"]
        parts = urllib.parse.urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StorageError("%s: the storage URL %r is not an http(s) URL"
                               % (what, printable(url or "", 100)))
        if parts.scheme == "http" and auth_url.startswith("https:"):
            raise StorageError("%s: the storage URL %s is plain http while auth_url is https; the "
                               "token would cross the network in clear (set storage_url to insist)"
                               % (what, redact_url(url)))
        return url.rstrip("/")

    if version == "1":
        what = "Swift tempauth at %s (user %s)" % (redact_url(auth_url), values["username"])

        def tempauth():
            token, left, url = tempauth_login(http, auth_url, values["username"], secret(), what)
            return token, left, checked(url, what)
        return tempauth, what
    who = ("application credential %s" % (values["application_credential_id"] or
                                          values["application_credential_name"]) if app else
           "user %s, project %s" % (values["username"] or values["user_id"],
                                    values["project_name"] or values["project_id"]))
    what = "Keystone at %s (%s)" % (redact_url(auth_url), who)

    def keystone():
        key = secret()
        token, left, url = keystone_login(
            http, auth_url, keystone_auth_body(values, key),
            None if values["storage_url"] else values["interface"], values["region"], clock, what, key)
        return token, left, checked(url, what)
    return keystone, what


# =============================================================================
# 9. Config schema
# =============================================================================


class Key:
    """One config key, declared once: how it is read and checked (``kind``
    and ``options``), its default, the environment variables that stand in
    for it (in order), the old names it also answers to, and a one-line doc.
    Parsing, unknown-key warnings, ``--check-config`` and the README tables
    (``--config-reference``) all come from these declarations.

    Kinds: ``str``; ``name`` (no white space: it ends up in a header or a
    URL path); ``mount`` (a name without surrounding slashes); ``choice``
    (``choices=``); ``secret`` (stripped, shown as
    ``***``); ``path``, ``file``, ``dir`` (the last two must exist); ``int``
    (``minimum=``, ``maximum=``); ``bool``; ``duration`` (``minimum=``);
    ``url``; ``any`` (a raw JSON value its block checks itself).

    ``required``: the block is refused without it. ``pattern``: a regular
    expression and what it describes (``(BUCKET_RE, "bucket name")``); a
    value that does not match it is refused as "not a valid bucket name".
    """

    __slots__ = ("name", "kind", "default", "env", "aliases", "doc", "default_doc", "options",
                 "required", "pattern")

    def __init__(self, name, kind, default=None, env=(), aliases=(), doc="", default_doc=None,
                 required=False, pattern=None, **options):
        self.name, self.kind, self.default = name, kind, default
        self.env, self.aliases, self.doc = tuple(env), tuple(aliases), doc
        self.default_doc, self.options = default_doc, options
        self.required, self.pattern = required, pattern

    def meaning(self):
        """The meaning column of the README tables."""
        return self.doc + (" (required)" if self.required else "")

    def check(self, section, value):
        """``value`` as read, refused when required and unset or when it
        does not match the pattern."""
        if value is None and self.required:
            raise section.error(self.name, "required")
        if value is not None and self.pattern and not re.match(self.pattern[0], value):
            raise section.error(self.name, "%r is not a valid %s" % (value, self.pattern[1]))
        return value

    def show(self, value):
        """``value`` as --check-config prints it: secrets masked, durations
        as text, unset as null."""
        if value is None:
            return None
        if isinstance(value, Secret):
            return "***"
        if self.kind == "duration":
            return format_duration(value)
        if isinstance(value, Proxy):
            return value.display        # never the password
        return value

    def documented_default(self):
        """The default column of the README tables."""
        parts = ["`%s`" % var for var in self.env]
        if self.default_doc:
            parts.append(self.default_doc)
        elif self.default is not None:
            shown = self.default
            if isinstance(shown, bool):
                shown = "true" if shown else "false"
            parts.append("`%s`" % (shown if shown != "" else '""'))
        return ", ".join(parts) or "–"


class Section:
    """Typed, strict reads from one JSON object of the config file.

    Every getter names the key in its error (``local_storage.path: ...``) and
    records what was read and where it came from, so ``unknown()`` can warn
    about typos and ``sources`` says which value came from the file, which
    from an environment variable and which is a default. JSON ``null`` and,
    as the Go agent's files use them for "unset", empty strings count as
    absent.
    """

    def __init__(self, raw, prefix="", env=None):
        self.raw = raw
        self.prefix = prefix
        self.env = os.environ if env is None else env
        self.seen = set()
        self.sources = {}        # key -> "config", "env VAR" or "default"

    def name(self, key):
        return self.prefix + key

    def error(self, key, problem):
        return ConfigError("%s: %s" % (self.name(key), problem))

    def _value(self, key, env=()):
        self.seen.add(key)
        value = self.raw.get(key)
        if value is None or value == "":
            for var in env:
                # Surrounding white space from the environment is never meant
                # (VAULT_TOKEN=$(cat file) keeps a newline): strip it.
                if self.env.get(var, "").strip():
                    self.sources[key] = "env " + var
                    return self.env[var].strip(), var
            self.sources[key] = "default"
            return None, None
        self.sources[key] = "config"
        return value, None

    def read(self, key, default=None):
        """The value of ``key`` (a Key) in this block, ``default`` when unset."""
        name = key.name
        self.seen.update(key.aliases)        # known spellings, even when empty ("" is unset)
        if key.options.get("env_only") and self.raw.get(name) not in (None, ""):
            raise self.error(name, "is read from the environment only (%s), never from the config "
                             "file: use the file key instead" % ", ".join(key.env))
        for alias in key.aliases:
            if self.raw.get(alias) not in (None, "") and self.raw.get(name) not in (None, "") \
                    and self.raw.get(alias) != self.raw.get(name):
                raise self.error(alias, "conflicts with %s: both set, differently (one "
                                 "setting, two spellings); keep one" % name)
        if self.raw.get(name) in (None, ""):
            for alias in key.aliases:           # an old spelling, used when the new one is absent
                if self.raw.get(alias) not in (None, ""):
                    self.seen.add(name)
                    name = alias
                    break
        value = _READERS[key.kind](self, name, key, default)
        if name != key.name:
            self.sources[key.name] = self.sources.pop(name, "config") + " (as %s)" % name
        return key.check(self, value)

    def string(self, key, default=None, env=(), choices=None, spaces=True):
        """A string; ``spaces=False`` for values that end up in a header or a
        URL path (a name, a mount, a storage class), where white space is
        always a mistake. Control characters are refused everywhere, and the
        error never shows the value (it may be a credential)."""
        value, source = self._value(key, env)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(key, "must be a string, got %s" % _json_type(value))
        where = source or self.name(key)
        refuse_control(value, where)
        if not spaces and value != "".join(value.split()):
            raise ConfigError("%s: must not contain whitespace, got %r" % (where, value))
        if choices and value not in choices:
            raise self.error(key, "must be one of %s, got %r" % (", ".join(choices), value))
        return value

    def secret(self, key, env=()):
        """A credential, stripped of surrounding white space (a pasted newline)."""
        value, source = self._value(key, env)
        if isinstance(value, str):
            value = value.strip()
            refuse_control(value, source or self.name(key))
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise self.error(key, "must be a string, got %s" % _json_type(value))
        return Secret(value)

    def path(self, key, default=None, env=(), must_exist=None):
        value = self.string(key, default, env)
        if value is None:
            return None
        value = expand_home(value, self.env)
        if must_exist == "file" and not os.path.isfile(value):
            raise self.error(key, "%s is not a regular file" % value if os.path.exists(value)
                             else "file %s does not exist" % value)
        if must_exist == "dir" and not os.path.isdir(value):
            raise self.error(key, "directory %s does not exist" % value)
        return value

    def integer(self, key, default=None, minimum=0, maximum=1000000):
        value, _ = self._value(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise self.error(key, "must be a whole number, got %s" % _json_type(value))
        if value < minimum:
            raise self.error(key, "must be at least %d, got %d" % (minimum, value))
        if value > maximum:
            raise self.error(key, "must be at most %d, got %d" % (maximum, value))
        return value

    def boolean(self, key, default=False, env=()):
        value, source = self._value(key, env)
        if value is None:
            return default
        if source is not None:
            try:
                return parse_bool(value)
            except ValueError:
                raise ConfigError("%s: environment value %r is not a boolean" % (source, value)) from None
        if not isinstance(value, bool):
            raise self.error(key, "must be true or false, got %s" % _json_type(value))
        return value

    def duration(self, key, default, minimum=0.0, maximum=10 * 365 * 86400.0, zero_off=False):
        """Seconds from a Go duration string; ``default`` is a string or seconds.
        With ``zero_off``, 0 (off) is allowed below ``minimum``."""
        value, _ = self._value(key)
        if value is None:
            if not isinstance(default, str):
                return default
            value = default
        if not isinstance(value, str):
            raise self.error(key, "must be a duration string like \"1h\" or \"30s\", got %s"
                             % _json_type(value))
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise self.error(key, "invalid duration %r (use Go syntax: 30s, 15m, 1h30m, 500ms)"
                             % value) from None
        if seconds < minimum and not (zero_off and seconds == 0):
            raise self.error(key, "must be at least %s%s, got %r" % (
                format_duration(minimum), " (or 0s: off)" if zero_off else "", value))
        if not seconds <= maximum:
            raise self.error(key, "must be at most %s, got %r" % (format_duration(maximum), value))
        return seconds

    def url(self, key, default=None, env=()):
        """An http(s) URL (a bare host gets ``https://``), checked to parse."""
        value = self.string(key, default, env)
        return None if value is None else check_url(value, self.name(key))

    def size(self, key, default=0):
        """Bytes from a size ("500MB", "20GiB", a byte count); see parse_size."""
        value, _ = self._value(key)
        if value is None:
            return default
        try:
            return parse_size(value)
        except (ValueError, OverflowError):
            got = repr(value) if isinstance(value, str) else _json_type(value)
            raise self.error(key, "must be a size like \"500MB\" or \"20GiB\", or a byte count, "
                                  "got %s" % got) from None

    def proxy(self, key, env=()):
        """A Proxy (see parse_proxy_url) or "direct"."""
        value, source = self._value(key, env)
        if value is None or value == "direct":
            return value
        if not isinstance(value, str):
            raise self.error(key, "must be a string, got %s" % _json_type(value))
        return parse_proxy_url(value, source or self.name(key))

    def strings(self, key, default=None):
        """A list of 1 to 64 non-empty strings without control characters
        (an argv, a list of names); the error never shows a value."""
        value, _ = self._value(key)
        if value is None:
            return default
        if not isinstance(value, list) or not value or len(value) > 64:
            raise self.error(key, "must be a list of 1 to 64 strings, got %s" % (
                "%d items" % len(value) if isinstance(value, list) else _json_type(value)))
        for number, item in enumerate(value, 1):
            if not isinstance(item, str) or not item:
                raise self.error(key, "item %d must be a non-empty string, got %s"
                                 % (number, _json_type(item) if not isinstance(item, str) else "\"\""))
            refuse_control(item, "%s item %d" % (self.name(key), number))
        return list(value)

    def any(self, key, default=None):
        """The raw JSON value (its block checks it)."""
        value, _ = self._value(key)
        return default if value is None else value

    def section(self, key):
        """A nested object as a Section, or None when absent."""
        self.seen.add(key)
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(key, "must be an object, got %s" % _json_type(value))
        return Section(value, self.name(key) + ".", self.env)

    def unknown(self):
        return sorted(self.name(k) for k in self.raw if k not in self.seen)


def _mount(section, key, value):
    """A mount path: segments of letters, digits, ``_ . -`` (never ``.`` or
    ``..``), surrounding slashes dropped; it becomes part of a URL path."""
    value = (value or "").strip("/")
    if value and not all(re.match(r"\A[A-Za-z0-9_.-]+\Z", part) and part not in (".", "..")
                         for part in value.split("/")):
        raise section.error(key, "must be a mount path like approle or team/approle (letters, "
                                 "digits, _ . - and / between them), got %r" % value)
    return value or None


def check_url(value, where):
    """``value`` as an http(s) URL without a trailing slash (a bare host gets
    ``https://``); ConfigError naming ``where`` otherwise."""
    if "://" not in value:
        value = "https://" + value
    try:
        parts = urllib.parse.urlsplit(value)
        _ = parts.port              # a bad port raises here
    except ValueError as exc:
        raise ConfigError("%s: invalid URL %s: %s" % (where, redact_url(value), exc)) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("%s: must be an http:// or https:// URL, got %s" % (where, redact_url(value)))
    if parts.username is not None or parts.password is not None:
        raise ConfigError("%s: must not carry a user name or password (it would be shown in logs); "
                          "use the credential keys" % where)
    return value.rstrip("/")


_READERS = {
    "str": lambda s, n, k, d: s.string(n, d, k.env, choices=k.options.get("choices")),
    "choice": lambda s, n, k, d: s.string(n, d, k.env, choices=k.options["choices"]),
    "name": lambda s, n, k, d: s.string(n, d, k.env, spaces=False),
    "secret": lambda s, n, k, d: s.secret(n, k.env),
    "path": lambda s, n, k, d: s.path(n, d, k.env),
    "file": lambda s, n, k, d: s.path(n, d, k.env, must_exist="file"),
    "dir": lambda s, n, k, d: s.path(n, d, k.env, must_exist="dir"),
    "int": lambda s, n, k, d: s.integer(n, d, k.options.get("minimum", 0),
                                        k.options.get("maximum", 1000000)),
    "bool": lambda s, n, k, d: s.boolean(n, d, k.env),
    "duration": lambda s, n, k, d: s.duration(n, d, k.options.get("minimum", 0.0),
                                              zero_off=k.options.get("zero_off", False)),
    "url": lambda s, n, k, d: s.url(n, d, k.env),
    "size": lambda s, n, k, d: s.size(n, d),
    "proxy": lambda s, n, k, d: s.proxy(n, k.env),
    "any": lambda s, n, k, d: s.any(n, d),
    "strings": lambda s, n, k, d: s.strings(n, d),
    "mount": lambda s, n, k, d: _mount(s, n, s.string(n, d, k.env, spaces=False)),
}


class Settings(collections.abc.Mapping):
    """A block's effective values, by key, read-only; ``sources`` says where
    each came from ("config", "env VAR", "default"); ``block`` is where the
    block stands in the file (``aws_storage``, ``aws_storage[2]``)."""

    def __init__(self, values=(), sources=None, block=""):
        self._values = collections.OrderedDict(values)
        self.sources = dict(sources or {})
        self.block = block

    def __getitem__(self, name):
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)


def read_block(section, keys, inherited=None):
    """Every key of ``keys`` read from ``section`` as an OrderedDict
    (defaults filled in; ``inherited`` overrides the declared defaults, e.g.
    a storage's ``retain`` defaults to the global one). The block completes
    it, then freezes it as Settings."""
    inherited = inherited or {}
    values = collections.OrderedDict()
    for key in keys:
        values[key.name] = section.read(key, inherited.get(key.name, key.default))
    return values


def show_block(keys, values):
    """A block's values as --check-config prints them: every key, in order."""
    return collections.OrderedDict((key.name, key.show(values.get(key.name))) for key in keys)


def _json_type(value):
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "null"


def _env_names(name):
    """VAULT_X and BAO_X, in precedence order."""
    return tuple(prefix + name for prefix in ENV_PREFIXES)


# =============================================================================
# 10. Vault login methods
# =============================================================================


class AuthMethod(collections.namedtuple(
        "AuthMethod", "name aliases doc path role keys check login token")):
    """One way to log in to Vault, declared once in AUTH_METHODS.

    ``path``: the mount it usually has (``vault_auth_path`` overrides it);
    ``role``: whether ``vault_auth_role`` is "required", "optional" or
    unused (None); ``keys``: its own keys, which join the top-level table;
    ``check(top, values)`` refuses at load what it cannot log in with
    (ConfigError naming the key). At each login either ``login(cfg,
    runtime, cache)`` gives the Login to send, read afresh (a rotated file
    is picked up; ``cache`` keeps what may be reused between logins, such
    as a credential chain), or ``token(cfg)`` gives a token to use as is
    (then a 403 cannot be cured by logging in again).
    """

    __slots__ = ()


Login = collections.namedtuple("Login", "mount payload user secrets")
Login.__new__.__defaults__ = ((),)
# POST auth/<mount>/login[/<user>] with the JSON ``payload``; its credentials
# are Secrets, revealed only into the request body, and masked in any error
# text that echoes them back, as are ``secrets`` (strings inside the payload
# that would be shown otherwise, e.g. a signature in a signed request).


def _check_approle(top, values):
    if values["vault_auth_path"] and top.sources.get("approle") == "config" and \
            values["vault_auth_path"] != values["approle"]:
        raise top.error("approle", "and vault_auth_path both name the AppRole mount, differently; "
                                   "keep one")
    values["vault_auth_path"] = values["vault_auth_path"] or values["approle"]  # the Go agent's key
    if not values["role_id"]:
        raise top.error("role_id", "required for AppRole login (or set vault_auth_method)")
    _one_of(top, values, "secret_id", "secret_id_file", "required for AppRole login (or use "
                                                          "secret_id_file)")


def _approle_login(cfg, runtime, cache):
    secret_id = (read_secret_file(cfg.secret_id_file, "secret_id_file") if cfg.secret_id_file
                 else cfg.secret_id)
    return Login(cfg.vault_auth_path, {"role_id": cfg.role_id, "secret_id": secret_id}, None)


def _k8s_login(cfg, runtime, cache):
    jwt = read_secret_file(cfg.k8s_token_path, "k8s_token_path")
    return Login(cfg.vault_auth_path, {"role": cfg.vault_auth_role, "jwt": jwt}, None)


def _check_jwt(top, values):
    if not values["jwt_file"]:
        raise top.error("jwt_file", "required for JWT login (the file holding the token)")
    read_secret_file(values["jwt_file"], "jwt_file")


def _jwt_login(cfg, runtime, cache):
    jwt = read_secret_file(cfg.jwt_file, "jwt_file")
    return Login(cfg.vault_auth_path, {"role": cfg.vault_auth_role, "jwt": jwt}, None)


def _check_cert(top, values):
    if not (values["client_cert"] and values["client_key"]):
        raise top.error("client_cert", "required for cert login, with client_key (the "
                                       "certificate the agent presents)")
    if not values["addr"].startswith("https://"):
        raise top.error("addr", "cert login needs an https:// addr (the certificate is presented "
                                "in the TLS handshake)")


def _cert_login(cfg, runtime, cache):
    payload = {"name": cfg.vault_auth_role} if cfg.vault_auth_role else {}
    return Login(cfg.vault_auth_path, payload, None)


def _check_password(top, values):
    if not values["username"]:
        raise top.error("username", "required for %s login" % values["vault_auth_method"])
    if values["username"] in (".", ".."):
        raise top.error("username", "%r is not a user name" % values["username"])
    if values["password_file"] and values["password"]:
        raise top.error("password_file", "conflicts with the password in %s: set only one"
                        % top.sources.get("password", "the environment")[4:])
    if not (values["password_file"] or values["password"]):
        raise top.error("password_file", "required for %s login (or VAULT_AUTH_PASSWORD in the "
                                         "environment; never in the config file)"
                        % values["vault_auth_method"])
    if values["password_file"]:
        read_secret_file(values["password_file"], "password_file")


def _password_login(cfg, runtime, cache):
    password = (read_secret_file(cfg.password_file, "password_file") if cfg.password_file
                else cfg.password)
    return Login(cfg.vault_auth_path, {"password": password}, cfg.username)


def _check_token(top, values):
    _one_of(top, values, "token", "token_file", "required for token auth (or token_file, or "
                                                 "VAULT_TOKEN)")


def _given_token(cfg):
    return read_secret_file(cfg.token_file, "token_file") if cfg.token_file else cfg.token


def _one_of(top, values, key, file_key, missing):
    """Exactly one of a secret's key and its file key; the file readable now."""
    if values[key] and values[file_key]:
        raise top.error(file_key, "conflicts with %s: set only one" % key)
    if not (values[key] or values[file_key]):
        raise top.error(key, missing)
    if values[file_key]:
        read_secret_file(values[file_key], file_key)


def _no_check(top, values):
    pass


AWS_STS_GLOBAL = "https://sts.amazonaws.com"
AWS_LOGIN_MARGIN = 60.0     # seconds the signing credentials must stay valid (Vault replays later)
AWS_LOGIN_BODY = b"Action=GetCallerIdentity&Version=2011-06-15"
AWS_SERVER_ID_HEADER = "X-Vault-AWS-IAM-Server-ID"


def aws_sts_url(region):
    """The STS origin a login request is signed for: the global endpoint
    (signed for us-east-1) unless a region is named."""
    if not region:
        return AWS_STS_GLOBAL
    return "https://sts.%s.amazonaws.com%s" % (region, ".cn" if region.startswith("cn-") else "")


def go_header_name(name):
    """A header name as Go's http.Header spells it (X-Amz-Date)."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def aws_login_request(creds, url, region, server_id, when):
    """The iam_* fields of Vault's aws login (IAM type): sts:GetCallerIdentity
    POSTed to ``url``, signed with SigV4 for ``region``, as Vault's own client
    sends it (sdk/helper/awsutil GenerateLoginData): URL, body and headers
    base64 (standard, padded); the headers as JSON in Go's http.Header shape
    (name -> list of values), without Host, which Vault takes from the URL.
    Pure: ``creds`` (AwsCredentials) and ``when`` are arguments."""
    parts = urllib.parse.urlsplit(url)
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    if server_id:
        headers[AWS_SERVER_ID_HEADER] = server_id
    signed = sigv4_headers("POST", parts.netloc, parts.path or "/", "", headers,
                           hashlib.sha256(AWS_LOGIN_BODY).hexdigest(), creds.access_key,
                           creds.secret_key.reveal(), creds.token.reveal() if creds.token else None,
                           region, "sts", when)
    signed.pop("host")
    shaped = dict((go_header_name(name), [value]) for name, value in signed.items())

    def b64(data):
        return base64.b64encode(data).decode("ascii")
    return {"iam_http_request_method": "POST", "iam_request_url": b64(url.encode("utf-8")),
            "iam_request_body": b64(AWS_LOGIN_BODY),
            "iam_request_headers": b64(json.dumps(shaped, sort_keys=True).encode("utf-8"))}


def _check_aws(top, values):
    endpoint = values["aws_sts_endpoint"]
    if endpoint:
        parts = urllib.parse.urlsplit(endpoint)
        if parts.path not in ("", "/") or "?" in endpoint or "#" in endpoint:
            raise top.error("aws_sts_endpoint", "must be an origin without a path, e.g. "
                                                "https://sts.eu-west-1.amazonaws.com")
        named = re.match(r"\Asts\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?\Z", parts.hostname or "")
        if named and values["aws_sts_region"] and named.group(1) != values["aws_sts_region"]:
            raise top.error("aws_sts_region", "%r contradicts aws_sts_endpoint %s"
                            % (values["aws_sts_region"], endpoint))
        if named:       # a regional STS accepts only its own region in the signature
            values["aws_sts_region"] = named.group(1)
    values["aws_sts_endpoint"] = endpoint or aws_sts_url(values["aws_sts_region"])


def _login_http(cfg, runtime, cache):
    """The Http of a login method's own requests (metadata, STS, IAM),
    kept between logins: the Vault proxy policy (node-local metadata is
    never proxied), under request_timeout, stopped by a stop."""
    if "http" not in cache:
        cache["http"] = Http(None, cfg.timeout, proxy=cfg.proxy_policy,
                             deadline=cfg.request_timeout, signals=runtime.signals)
    return cache["http"]


def _aws_chain(cfg, runtime, http):
    """The AWS credential chain of the aws login (built once per client)."""
    role = None
    if cfg.aws_role_arn:
        role = AwsRole(cfg.aws_role_arn, None, default_session_name(), 3600)
    return AwsCredentialChain(None, runtime.env, cfg.aws_sts_region or "us-east-1", cfg.aws_profile,
                              http, runtime.clock, imds_endpoint=cfg.aws_imds_endpoint,
                              container_endpoint=cfg.aws_container_endpoint,
                              sts_endpoint=cfg.aws_sts_endpoint, role=role, signals=runtime.signals,
                              profile_given=cfg.sources.get("aws_profile") == "config")


def _aws_login(cfg, runtime, cache):
    chain = cache.get("aws_chain")
    if chain is None:
        chain = cache["aws_chain"] = _aws_chain(cfg, runtime, _login_http(cfg, runtime, cache))
    try:
        creds = chain.get(min_valid=AWS_LOGIN_MARGIN)     # Vault replays the request later
    except (StorageError, TransportError) as exc:
        raise VaultError("aws login at auth/%s: no AWS credentials to sign with: %s"
                         % (cfg.vault_auth_path, exc)) from exc
    payload = aws_login_request(creds, cfg.aws_sts_endpoint + "/", cfg.aws_sts_region or "us-east-1",
                                cfg.aws_iam_server_id, runtime.clock.now())
    if cfg.vault_auth_role:
        payload["role"] = cfg.vault_auth_role
    payload["iam_request_headers"] = Secret(payload["iam_request_headers"])     # the signature
    signed = json.loads(base64.b64decode(payload["iam_request_headers"].reveal()).decode("utf-8"))
    signature = "".join(signed.get("Authorization", [""])).rpartition("Signature=")[2]
    return Login(cfg.vault_auth_path, payload, None,
                 [signature] + ([creds.token.reveal()] if creds.token else []))


GCP_JWT_EXP_MAX = 3600.0        # Vault's gcp method refuses a JWT that lives longer

GCP_IDENTITY_LIMIT = 64 * 1024  # a metadata identity token is about 1 KiB: more is refused

_JWT_RE = re.compile(r"\A[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\Z")


def _check_gcp(top, values):
    """The type (``iam`` when a service account or key file is known), the
    service account (default: the key file's ``client_email``), the key
    file checked now, and a JWT lifetime Vault accepts."""
    path, account = values["gcp_credentials_file"], values["gcp_service_account"]
    host_re = r"\A(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z"
    if not re.match(host_re, values["gcp_metadata_host"]):
        raise top.error("gcp_metadata_host", "must be host or host:port (no scheme, no path), got %r"
                        % values["gcp_metadata_host"])
    kind = values["gcp_auth_type"] or ("iam" if account or path else "gce")
    values["gcp_auth_type"] = kind
    if kind == "gce":
        if account and top.sources.get("gcp_service_account") == "config":
            raise top.error("gcp_service_account", "only for gcp_auth_type iam (a gce login is "
                                                   "the instance's own identity)")
        return
    if path:
        try:
            info = read_credentials_file(path)
            google_token_source(path, top.env, None, None, None)    # the key parses, fields present
        except ConfigError as exc:
            raise top.error("gcp_credentials_file", str(exc)) from exc
        if not account and info.get("type") == "service_account":
            account = values["gcp_service_account"] = info.get("client_email")
    if not account:
        raise top.error("gcp_service_account", "required for gcp iam login (or a service-account "
                                               "key in gcp_credentials_file)")
    if values["gcp_jwt_exp"] > GCP_JWT_EXP_MAX:
        raise top.error("gcp_jwt_exp", "must be at most 1h (Vault refuses a JWT living longer), "
                                       "got %s" % format_duration(values["gcp_jwt_exp"]))


def _gcp_login(cfg, runtime, cache):
    """A JWT for audience ``http://vault/<role>``, from the metadata server
    (gce) or signed for the service account (iam); a failure to get it is
    one line naming the method and the mount."""
    try:
        jwt = _gcp_iam_jwt(cfg, runtime, cache) if cfg.gcp_auth_type == "iam" else \
            _gcp_gce_jwt(cfg, runtime, cache)
    except Stopped:
        raise
    except AgentError as exc:
        raise VaultError("gcp login at auth/%s failed: %s" % (cfg.vault_auth_path, exc)) from exc
    return Login(cfg.vault_auth_path, {"role": cfg.vault_auth_role, "jwt": jwt}, None)


def _gcp_gce_jwt(cfg, runtime, cache):
    """The metadata server's identity token, ``format=full`` (gce roles
    need the instance claims)."""
    what = "GCE metadata server %s (identity token)" % cfg.gcp_metadata_host
    query = urllib.parse.urlencode([("audience", "http://vault/%s" % cfg.vault_auth_role),
                                    ("format", "full")])
    url = "http://%s/computeMetadata/v1/instance/service-accounts/default/identity?%s" % (
        cfg.gcp_metadata_host, query)
    with _login_http(cfg, runtime, cache).request("GET", url, {"Metadata-Flavor": "Google"}) as resp:
        status, data = resp.status, resp.body(GCP_IDENTITY_LIMIT)
    text = data.decode("ascii", "replace").strip()
    if status != 200:
        detail = "" if _JWT_RE.match(text) else ": " + printable(one_line(text, 200))
        raise VaultError("%s: HTTP %d%s" % (what, status, detail), status)
    if not _JWT_RE.match(text):
        raise VaultError("%s: the answer is not a JWT (%d bytes)" % (what, len(data)))
    return Secret(text)


def _gcp_iam_jwt(cfg, runtime, cache):
    """Claims {aud, sub, exp} for the service account, signed with its key
    file when that is the account's, else by the IAM Credentials API."""
    account, path = cfg.gcp_service_account, cfg.gcp_credentials_file
    now = int((runtime.clock.now() - EPOCH).total_seconds())
    claims = collections.OrderedDict([("aud", "http://vault/%s" % cfg.vault_auth_role),
                                      ("sub", account), ("exp", now + int(cfg.gcp_jwt_exp))])
    info = read_credentials_file(path) if path else {}
    if info.get("type") == "service_account" and info.get("client_email") == account:
        return _gcp_local_jwt(path, info, claims)
    return _gcp_sign_jwt(cfg, runtime, cache, claims)


def _gcp_local_jwt(path, info, claims):
    """RS256 with the key file's key; ``kid`` is how Vault finds the public key."""
    kid, pem = info.get("private_key_id"), info.get("private_key")
    if not kid or not isinstance(kid, str):
        raise ConfigError("credentials file %s: private_key_id missing (Vault looks the key up "
                          "by it)" % path)
    try:
        key = load_rsa_private_key(pem if isinstance(pem, str) else "")
    except ValueError as exc:
        raise ConfigError("credentials file %s: private_key: %s" % (path, exc)) from exc
    header = collections.OrderedDict([("alg", "RS256"), ("typ", "JWT"), ("kid", kid)])
    signing_input = "%s.%s" % (b64url(json.dumps(header, separators=(",", ":")).encode("utf-8")),
                               b64url(json.dumps(claims, separators=(",", ":")).encode("utf-8")))
    return Secret(signing_input + "." + b64url(rs256_sign(key, signing_input.encode("ascii"))))


def _gcp_sign_jwt(cfg, runtime, cache, claims):
    """``projects/-/serviceAccounts/<email>:signJwt`` with an access token
    of the Google credentials found (kept between logins)."""
    http, account = _login_http(cfg, runtime, cache), cfg.gcp_service_account
    if "token" not in cache:
        fetch, what = google_token_source(cfg.gcp_credentials_file, runtime.env, http, runtime.clock,
                                          cfg.gcp_metadata_host, GOOGLE_CLOUD_PLATFORM_SCOPE)
        cache["token"] = BearerToken(fetch, runtime.clock, what)
    url = "%s/v1/projects/-/serviceAccounts/%s:signJwt" % (cfg.gcp_iam_endpoint,
                                                          uri_encode(account, safe="@"))
    body = json.dumps({"payload": json.dumps(claims, separators=(",", ":"))}).encode("utf-8")
    bearer = cache["token"].get().reveal()
    data = _oauth_answer(http, "POST", url, {
        "Authorization": "Bearer " + bearer,
        "Content-Type": "application/json", "Accept": "application/json"}, body,
        "IAM signJwt for %s" % account, secrets=[bearer])
    jwt = data.get("signedJwt")
    if not isinstance(jwt, str) or not _JWT_RE.match(jwt):
        raise VaultError("IAM signJwt for %s: the answer has no signedJwt" % account)
    return Secret(jwt)


AZURE_MANAGEMENT_RESOURCE = "https://management.azure.com/"

AZURE_INSTANCE_FIELDS = (("subscription_id", "subscriptionId"), ("resource_group_name", "resourceGroupName"),
                         ("vm_name", "name"), ("vmss_name", "vmScaleSetName"))
# login field <- the instance metadata's compute.<name> (Vault Agent's choice)


def _check_azure(top, values):
    if values["azure_client_id"] and values["azure_object_id"]:
        raise top.error("azure_object_id", "conflicts with azure_client_id: set only one (both "
                                           "name the user-assigned identity)")


def _azure_login(cfg, runtime, cache):
    """Vault Agent's azure login: the managed identity's token for
    ``azure_resource`` as the JWT, where the VM stands from the instance
    metadata. The token is reused while valid (BearerToken); a failing IMDS
    call is one line naming the method and the mount."""
    try:
        http = _login_http(cfg, runtime, cache)
        if "token" not in cache:
            identity = [(name, value) for name, value in (("client_id", cfg.azure_client_id),
                                                         ("object_id", cfg.azure_object_id)) if value]
            cache["token"] = BearerToken(
                lambda: azure_imds_token(http, cfg.azure_imds_endpoint, cfg.azure_resource, identity),
                runtime.clock, "Azure managed identity (IMDS)")
        jwt = cache["token"].get().reveal()
        if not isinstance(jwt, str):
            raise StorageError("Azure managed identity (IMDS): access_token is not a string")
        where = _azure_instance(cfg, http)
    except (StorageError, TransportError) as exc:
        raise VaultError("azure login at auth/%s failed: %s" % (cfg.vault_auth_path, exc)) from exc
    where.update(role=cfg.vault_auth_role, jwt=Secret(jwt))
    return Login(cfg.vault_auth_path, where, None)


def _azure_instance(cfg, http):
    """subscription_id, resource_group_name, vm_name and vmss_name (when in a
    scale set): the azure_* keys set, the rest from the instance metadata,
    which is not read when the keys name a subscription, a resource group
    and a VM or scale set."""
    found = dict((field, getattr(cfg, "azure_" + field)) for field, _ in AZURE_INSTANCE_FIELDS)
    if not (found["subscription_id"] and found["resource_group_name"]
            and (found["vm_name"] or found["vmss_name"])):
        what = "Azure instance metadata (IMDS)"
        data = _oauth_answer(http, "GET", cfg.azure_imds_endpoint + "/metadata/instance?api-version="
                             "2021-02-01", {"Metadata": "true"}, None, what)
        compute = data.get("compute")
        if not isinstance(compute, dict):
            raise StorageError("%s: answer has no compute object" % what)
        for field, name in AZURE_INSTANCE_FIELDS:
            value = found[field] or compute.get(name)
            if value is not None and (not isinstance(value, str) or has_control(value)):
                raise StorageError("%s: compute.%s is not a plain string" % (what, name))
            found[field] = value
        for field, name in AZURE_INSTANCE_FIELDS[:3]:
            if not (found[field] or field == "vm_name" and found["vmss_name"]):
                raise StorageError("%s: answer has no compute.%s (or set azure_%s)" % (what, name, field))
    return dict((field, value) for field, value in found.items() if value)


PASSWORD_KEYS = (
    Key("username", "name", doc="`userpass`/`ldap` user name"),
    Key("password_file", "file", doc="`userpass`/`ldap`: read the password from this file at each "
                                     "login"),
    Key("password", "secret", env=_env_names("AUTH_PASSWORD"), env_only=True,
        doc="`userpass`/`ldap`: the password from the environment only (never from the config "
            "file)"),
)

AUTH_METHODS = collections.OrderedDict((method.name, method) for method in (
    AuthMethod("approle", (), "AppRole", "approle", None, (
        Key("approle", "mount", "approle", doc="AppRole mount path (the Go agent's key; "
                                               "`vault_auth_path` also works)"),
        Key("role_id", "name", doc="AppRole role_id"),
        Key("secret_id", "secret", doc="AppRole secret_id"),
        Key("secret_id_file", "file",
            doc="read the secret_id from this file at each login (instead of `secret_id`)"),
    ), _check_approle, _approle_login, None),
    AuthMethod("k8s", ("kubernetes",), "Kubernetes", "kubernetes", "required", (
        Key("k8s_token_path", "path", DEFAULT_K8S_TOKEN_PATH,
            doc="`k8s`: service-account JWT, re-read at each login"),
    ), _no_check, _k8s_login, None),
    AuthMethod("jwt", (), "JWT/OIDC", "jwt", "required", (
        Key("jwt_file", "file", doc="`jwt`: the JWT (a projected service-account token, a CI "
                                    "job's OIDC token, a JWT-SVID), re-read at each login"),
    ), _check_jwt, _jwt_login, None),
    AuthMethod("cert", (), "TLS certificate", "cert", "optional", (), _check_cert, _cert_login, None),
    AuthMethod("userpass", (), "user name and password", "userpass", None, PASSWORD_KEYS,
               _check_password, _password_login, None),
    AuthMethod("ldap", (), "LDAP user name and password", "ldap", None, PASSWORD_KEYS,
               _check_password, _password_login, None),
    AuthMethod("aws", (), "AWS IAM (a signed sts:GetCallerIdentity)", "aws", "optional", (
        Key("aws_iam_server_id", "name",
            doc="`aws`: the `X-Vault-AWS-IAM-Server-ID` header value, signed with the request (the "
                "mount's `iam_server_id_header_value`)"),
        Key("aws_sts_region", "name", pattern=(r"\A[a-z]{2}(-[a-z]+)+-[0-9]+\Z", "AWS region"),
            default_doc="the global endpoint, signed for `us-east-1`",
            doc="`aws`: sign for this region's STS, `https://sts.<region>.amazonaws.com` (Vault's "
                "`sts_endpoint` and `sts_region` must match)"),
        Key("aws_sts_endpoint", "url", default_doc="`https://sts.amazonaws.com`, or the region's",
            doc="`aws`: the STS origin the request is signed for (its host), also used for web "
                "identity and `aws_role_arn`"),
        Key("aws_profile", "name", env=("AWS_PROFILE",),
            doc="`aws`: profile in `~/.aws/credentials` / `~/.aws/config` (as the S3 storage's "
                "`profile`)"),
        Key("aws_role_arn", "name", pattern=(r"\Aarn:[a-z-]+:iam::[0-9]{12}:role/\S+\Z", "role ARN"),
            doc="`aws`: assume this role (STS AssumeRole) with the credentials found, and log in "
                "as it"),
        Key("aws_imds_endpoint", "url", DEFAULT_IMDS_ENDPOINT,
            env=("AWS_EC2_METADATA_SERVICE_ENDPOINT",), doc="`aws`: EC2 instance metadata (IMDSv2)"),
        Key("aws_container_endpoint", "url", DEFAULT_CONTAINER_ENDPOINT,
            doc="`aws`: container credentials for `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`"),
    ), _check_aws, _aws_login, None),
    AuthMethod("gcp", (), "Google Cloud (an IAM service account or a GCE instance)", "gcp",
               "required", (
        Key("gcp_auth_type", "choice", choices=("iam", "gce"),
            default_doc="`iam` when a service account or credentials file is known, else `gce`",
            doc="`gcp`: `iam` (a JWT for the service account) or `gce` (the metadata server's "
                "identity token)"),
        Key("gcp_service_account", "name", default_doc="the key file's `client_email`",
            doc="`gcp` iam: the service account's email (the JWT's `sub`)"),
        Key("gcp_credentials_file", "path", env=("GOOGLE_APPLICATION_CREDENTIALS",),
            default_doc="gcloud's ADC file, the metadata server",
            doc="`gcp` iam: the service account's own key signs the JWT here (RS256, `kid` = "
                "`private_key_id`); other credentials call the IAM Credentials API's signJwt"),
        Key("gcp_jwt_exp", "duration", "15m", minimum=60.0,
            doc="`gcp` iam: the JWT's lifetime, at most 1h (beyond 15m the role's `max_jwt_exp` "
                "must allow it)"),
        Key("gcp_metadata_host", "str", "metadata.google.internal", env=("GCE_METADATA_HOST",),
            doc="`gcp`: the metadata server (gce identity token; access token for signJwt)"),
        Key("gcp_iam_endpoint", "url", "https://iamcredentials.googleapis.com",
            doc="`gcp` iam: the IAM Credentials API (signJwt)"),
    ), _check_gcp, _gcp_login, None),
    AuthMethod("azure", (), "Azure managed identity", "azure", "required", (
        Key("azure_resource", "name", AZURE_MANAGEMENT_RESOURCE,
            doc="`azure`: the resource the managed identity's token is for: the mount's `resource`, "
                "exactly (a trailing slash counts)"),
        Key("azure_client_id", "name", doc="`azure`: client ID of the user-assigned identity to log "
                                           "in as (default: the VM's system-assigned identity)"),
        Key("azure_object_id", "name", doc="`azure`: or its object ID"),
        Key("azure_imds_endpoint", "url", "http://169.254.169.254",
            doc="`azure`: the Instance Metadata Service (a link-local address: never proxied)"),
        Key("azure_subscription_id", "name",
            doc="`azure`: sent instead of the instance metadata's `compute.subscriptionId`; with "
                "the resource group and a VM or scale set name set, no instance metadata is read"),
        Key("azure_resource_group_name", "name",
            doc="`azure`: instead of `compute.resourceGroupName`"),
        Key("azure_vm_name", "name", doc="`azure`: instead of `compute.name`"),
        Key("azure_vmss_name", "name", doc="`azure`: instead of `compute.vmScaleSetName` (Vault then "
                                           "checks the scale set, not the VM)"),
    ), _check_azure, _azure_login, None),
    AuthMethod("token", (), "a token", None, None, (
        Key("token", "secret", env=_env_names("TOKEN"), doc="a token to use as is (token auth)"),
        Key("token_file", "file",
            doc="a Vault/Bao Agent sink file, re-read whenever a new token is needed"),
    ), _check_token, None, _given_token),
))

AUTH_NAMES = collections.OrderedDict((name, method) for method in AUTH_METHODS.values()
                                     for name in (method.name,) + method.aliases)


def _auth_methods_doc():
    return ", ".join("`%s`%s" % (m.name, " (alias %s)" % ", ".join("`%s`" % a for a in m.aliases)
                                 if m.aliases else "") for m in AUTH_METHODS.values())


def _methods_with_role(need):
    return ", ".join("`%s`" % m.name for m in AUTH_METHODS.values() if m.role == need)


AUTH_KEYS = (
    Key("vault_auth_method", "choice", choices=tuple(AUTH_NAMES),
        default_doc="`approle` (or `token` when only a token is given)", doc=_auth_methods_doc()),
    Key("vault_auth_role", "name", aliases=("k8s_auth_role",),
        doc="the role to log in as: required for %s, optional for %s (also as `k8s_auth_role`)"
            % (_methods_with_role("required"), _methods_with_role("optional"))),
    Key("vault_auth_path", "mount", aliases=("k8s_auth_path",),
        default_doc="the method's name (`kubernetes` for `k8s`; `approle`'s own key)",
        doc="where the auth method is mounted (also as `k8s_auth_path`)"),
) + tuple(collections.OrderedDict((key.name, key) for method in AUTH_METHODS.values()
                                       for key in method.keys).values())


def check_auth(top, values, warn):
    """The login method's name (an alias resolved), its mount filled in,
    and the credentials it needs checked (ConfigError naming the key); a key
    of another method set in the file is warned about (ignored)."""
    name = values["vault_auth_method"]
    if name is None:
        # Drop-in default is AppRole; a token (file) alone selects token auth.
        has_token = values["token_file"] or (values["token"] and not (
            values["role_id"] or values["secret_id"] or values["secret_id_file"]))
        name = "token" if has_token else "approle"
    method = AUTH_NAMES[name]
    values["vault_auth_method"] = method.name
    if method.role == "required" and not values["vault_auth_role"]:
        raise top.error("vault_auth_role", "required for %s login" % method.name)
    method.check(top, values)
    values["vault_auth_path"] = values["vault_auth_path"] or method.path
    own = set(key.name for key in method.keys)
    others = collections.OrderedDict()
    for other in AUTH_METHODS.values():
        for key in other.keys:
            if key.name not in own and top.sources.get(key.name) == "config":
                others.setdefault(key.name, []).append(other.name)
    for name, users in others.items():
        warn("%s is for %s login; ignored with vault_auth_method %s"
             % (name, "/".join(users), method.name))


# =============================================================================
# 11. Config
# =============================================================================


TOP_KEYS = (
    Key("addr", "url", DEFAULT_ADDR, env=_env_names("ADDR"),
        doc="this node's Vault API address (`http://` or `https://`)"),
    Key("frequency", "duration", DEFAULT_FREQUENCY, minimum=1.0,
        doc="Go duration between snapshots (`30s`, `15m`, `1h30m`); minimum `1s`; a bad value is an error"),
    Key("retain", "int", 0, maximum=MAX_RETAIN,
        doc="snapshots to keep per storage; `0` keeps all"),
    Key("retain_days", "int", 0, maximum=MAX_RETAIN_DAYS,
        doc="also delete snapshots older than this many days (never the one just written); `0`: off"),
    Key("max_space", "size", 0,
        doc="also delete the oldest snapshots while the storage's snapshots add up to more than this "
            "(`\"500MB\"`, `\"20GiB\"`, bytes); the one just written is always kept; `0`: no cap"),
    Key("file_prefix", "str", DEFAULT_FILE_PREFIX, pattern=(FILE_PREFIX_RE, "file prefix (1 to 64 of "
        "A-Z a-z 0-9 _ . -, not starting with . or -, not ending in -)"),
        doc="snapshots are named `<file_prefix>-<UTC time>.snap`; retention, `latest`, `list` and "
            "the schedule only ever see names with exactly this prefix, so clusters can share a "
            "bucket prefix or directory"),
    Key("jitter", "duration", "0s",
        doc="add a random delay up to this to every scheduled time, so a fleet spreads out"),
    Key("retry_interval", "duration", DEFAULT_RETRY_INTERVAL, minimum=1.0, zero_off=True,
        doc="after a failed cycle, try the failed storages again this much later, doubling each "
            "time, never later than their regular time; minimum `1s`; `0s`: wait for the regular "
            "time (the Go agent's behaviour)"),
    Key("leader_poll", "duration", DEFAULT_LEADER_POLL, minimum=1.0, zero_off=True,
        doc="between cycles, ask the unauthenticated `sys/leader` this often (plus up to 10% jitter) "
            "whether this node became the leader, so a new leader takes the due snapshot within "
            "about this time of a failover; minimum `1s`; `0s`: only each cycle checks"),
    Key("align", "bool", False,
        doc="round scheduled times up to whole multiples of the frequency (UTC): `1h` runs at :00"),
    Key("timeout", "duration", DEFAULT_API_TIMEOUT, minimum=1.0,
        doc="per socket operation on API calls (login, leader, renew)"),
    Key("request_timeout", "duration", DEFAULT_REQUEST_TIMEOUT, minimum=1.0,
        doc="total deadline of each API, storage, token-endpoint and proxy request (connect, proxy "
            "CONNECT, TLS, the answer's headers and any small body); snapshot downloads and uploads "
            "instead fail when idle for `snapshot_timeout`/`timeout`"),
    Key("restore_timeout", "duration", "30m", minimum=1.0,
        doc="how long `restore` waits for Vault's answer once the snapshot is sent (a large "
            "restore keeps Vault busy for a while)"),
    Key("snapshot_timeout", "duration", DEFAULT_SNAPSHOT_TIMEOUT, minimum=1.0,
        doc="idle timeout of the snapshot stream: only a stream that stops sending for this long "
            "fails; a long snapshot never does"),
    Key("temp_dir", "dir", default_doc="the `local_storage` path, else the system temp dir",
        doc="where the download is staged and verified"),
    Key("status_file", "path", doc="JSON status written atomically (mode 0640) after each cycle "
                                   "(see Operations)"),
    Key("metrics_textfile", "path",
        doc="write the metrics to a file (mode 0644) for node_exporter's textfile collector"),
    Key("metrics_address", "str",
        doc="serve Prometheus metrics at `http://HOST:PORT/metrics`, e.g. `127.0.0.1:9469`, with "
            "a status page at `/`, `/healthz` and `/status.json`"),
    Key("health_window", "duration", "0s",
        doc="`/healthz` answers 200 while the last cycle that stored (a standby: its last leader "
            "check) is at most this old, else 503; `0s`: twice the frequency"),
    Key("verify_frequency", "duration", "0s", minimum=1.0, zero_off=True,
        doc="re-verify what each storage holds this often (`24h`): read the stored snapshots back "
            "and check the archive and the checksum recorded at upload, writing nothing, on the "
            "leader, between cycles; `0s`: off"),
    Key("verify_scope", "choice", "latest", choices=VERIFY_SCOPES,
        doc="what a re-verification reads: the newest snapshot (`latest`) or `all`"),
    Key("notify_command", "strings",
        doc="a command run on each of `notify_events`: an argv list (`[\"/usr/local/bin/page\", "
            "\"backups\"]`), never a shell, with the facts in `SNAPSHOT_*` environment variables, "
            "in its own process group, killed at `notify_timeout`"),
    Key("notify_url", "secret",
        doc="a webhook (Slack, Mattermost or Teams incoming webhook) POSTed a JSON document whose "
            "`text` reads as a chat message; a secret (never logged), proxy as the environment says"),
    Key("notify_events", "strings", list(NOTIFY_DEFAULT_EVENTS),
        default_doc="`%s`" % ", ".join(NOTIFY_DEFAULT_EVENTS),
        doc="what notifies: `failed` (a storage starts failing), `recovered` (it stores again), "
            "`verify_failed` (a re-verification found a bad or missing snapshot), "
            "`retention_failed`, `stored` (every snapshot stored)"),
    Key("notify_timeout", "duration", "30s", minimum=1.0,
        doc="deadline of each notification: the command is killed, the webhook abandoned; "
            "a notification never fails or delays a cycle"),
    Key("notify_ca_cert", "file", doc="CA bundle for the webhook's certificate (default: the system's)"),
) + AUTH_KEYS + (
    Key("namespace", "name", env=_env_names("NAMESPACE"),
        doc="sent on the login call only (snapshots are a root-namespace operation)"),
    Key("proxy", "proxy", env=_env_names("PROXY_ADDR") + _env_names("HTTP_PROXY"),
        doc="HTTP proxy for Vault and the login methods' token endpoints (STS, IAM signJwt, "
            "Google OAuth; node-local metadata never) (`http://[user:password@]host:port`) or "
            "`\"direct\"`; unset: "
            "`HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` as Go reads them, never for a loopback `addr`"),
    Key("ca_cert", "file", env=_env_names("CACERT"), doc="CA bundle for Vault's certificate"),
    Key("ca_path", "dir", env=_env_names("CAPATH"), doc="directory of CA certificates"),
    Key("client_cert", "file", env=_env_names("CLIENT_CERT"), doc="TLS client certificate"),
    Key("client_key", "file", env=_env_names("CLIENT_KEY"), doc="its private key"),
    Key("tls_server_name", "name", env=_env_names("TLS_SERVER_NAME"),
        doc="name to send (SNI) and verify, e.g. when `addr` is 127.0.0.1"),
    Key("tls_skip_verify", "bool", False, env=_env_names("SKIP_VERIFY"),
        doc="turn certificate verification off (warned about at start)"),
)

# Keys every storage block has, declared once: each defaults to the global value
# (name: to its kind, "aws"; in a list of blocks, kind and place, "aws-2").
STORAGE_POLICY_KEYS = (
    Key("name", "str", pattern=(STORAGE_NAME_RE, "storage name (1 to 64 of A-Z a-z 0-9 _ . -)"),
        default_doc="the kind (`local`, `aws`, `azure`, `google`, `swift`); in a list, kind-N (`aws-2`)",
        doc="this block's name in logs, the status file, metrics, `list` and `--storage`; unique"),
    Key("file_prefix", "str", default_doc="global `file_prefix`",
        pattern=(FILE_PREFIX_RE, "file prefix (1 to 64 of A-Z a-z 0-9 _ . -, not starting with "
                                 ". or -, not ending in -)"),
        doc="names of this block's snapshots: `<file_prefix>-<UTC time>.snap`"),
    Key("retain", "int", maximum=MAX_RETAIN, default_doc="global `retain`",
        doc="snapshots to keep in this storage; `0` keeps all"),
    Key("retain_days", "int", maximum=MAX_RETAIN_DAYS, default_doc="global `retain_days`",
        doc="also delete snapshots older than this many days here"),
    Key("max_space", "size", default_doc="global `max_space`",
        doc="size cap for the snapshots in this storage"),
    Key("frequency", "duration", minimum=1.0, default_doc="global `frequency`",
        doc="time between snapshots for this storage (e.g. local hourly, S3 daily)"),
    Key("verify_frequency", "duration", minimum=1.0, zero_off=True,
        default_doc="global `verify_frequency`",
        doc="re-verify this storage's snapshots this often; `0s`: off"),
    Key("verify_scope", "choice", choices=VERIFY_SCOPES, default_doc="global `verify_scope`",
        doc="`latest` or `all` of this storage's snapshots"),
)


def tls_keys(ca_env=(), token_endpoint=None):
    """The TLS keys of a storage block that talks to a server; with
    ``token_endpoint`` (where the block sends client secrets or signed
    assertions) a separate key to skip verification there too."""
    keys = (
        Key("proxy", "proxy",
            doc="HTTP proxy for every request of this storage and its token endpoints "
                "(`http://[user:password@]host:port`) or `\"direct\"`; unset: `HTTPS_PROXY`/"
                "`HTTP_PROXY`/`NO_PROXY` as Go reads them"),
        Key("ca_cert", "file", env=ca_env, doc="CA bundle for the endpoint"),
        Key("tls_skip_verify", "bool", False, doc="turn certificate verification off for the endpoint"),
    )
    if token_endpoint:
        keys += (Key("auth_tls_skip_verify", "bool", False, doc=(
            "also skip certificate checks on %s; `tls_skip_verify` alone leaves the endpoint that "
            "receives credentials verified" % token_endpoint)),)
    return keys


def storage_proxy(settings, runtime, block):
    """The ProxyPolicy of a storage block: its ``proxy`` key, else the
    environment's proxy variables."""
    return ProxyPolicy(settings["proxy"], runtime.env, block + ".proxy")


def storage_tls(values, endpoint):
    """TlsOptions of a storage block (``ca_cert``, ``tls_skip_verify``); the
    CA file is loaded now when ``endpoint`` is https, so errors are config
    errors."""
    tls = TlsOptions(values["ca_cert"], None, None, None, None, values["tls_skip_verify"])
    if endpoint.startswith("https"):
        make_ssl_context(tls)
    return tls


STORAGE_TYPES = collections.OrderedDict()
# config key -> Storage class: each storage backend registers itself
# (register_storage, in the section Storage backends); load_config reads the
# blocks of those present in the file.


class Config:
    """The effective configuration, after defaults and environment;
    read-only. Built by ``load_config``.

    Every key of TOP_KEYS is an attribute (None when unset) and ``sources``
    says where each came from. ``storages`` holds a (Storage class,
    Settings) pair per configured block, in registry order; ``warnings``
    what loading found (shown at start and on reload). ``tls``,
    ``proxy_policy`` and ``metrics_bind`` are what the values mean for
    Vault's client and the metrics server.
    """

    __slots__ = ("path", "values", "storages", "warnings", "tls", "proxy_policy", "metrics_bind")

    def __init__(self, path, values, storages=(), warnings=(), tls=None, proxy_policy=None,
                 metrics_bind=None):
        given = (path, values, tuple(storages), tuple(warnings),
                 tls or TlsOptions(None, None, None, None, None, False),
                 proxy_policy or ProxyPolicy("direct"), metrics_bind)
        for name, value in zip(self.__slots__, given):
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        values = object.__getattribute__(self, "values")
        if name in values:
            return values[name]
        raise AttributeError(name)

    def __setattr__(self, name, value):
        raise AttributeError("the configuration is read-only (%s)" % name)

    @property
    def sources(self):
        return self.values.sources

    def describe(self):
        """Every setting as a JSON-able dict, secrets masked: the top-level
        keys, then each storage block under its key."""
        described = show_block(TOP_KEYS, self.values)
        for cls, settings in self.storages:
            shown = show_block(cls.keys, settings)
            if settings.block.endswith("]"):            # a list of blocks: shown as a list
                described.setdefault(cls.config_key, []).append(shown)
            else:
                described[cls.config_key] = shown
        return described


def load_config(path, env=None):
    """Read, validate and complete the config file at ``path``.

    Raises ConfigError with one line naming the key and the problem.
    Precedence for each setting: config file, then VAULT_*, then BAO_*
    environment variables, then the default.
    """
    env = os.environ if env is None else env
    try:
        with open_regular(path, "rb") as handle:
            data = read_at_most(handle, MAX_CONFIG_BYTES + 1)
            mode = os.fstat(handle.fileno()).st_mode
    except OSError as exc:
        raise ConfigError("config file %s: cannot read: %s" % (path, exc.strerror or exc)) from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError("config file %s: larger than %s; not a config file?" % (
            path, format_size(MAX_CONFIG_BYTES)))
    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise ConfigError("config file %s: not UTF-8 text" % path) from None
    except _DuplicateKey as exc:
        raise ConfigError("config file %s: key %r appears twice in one object; keep one (which "
                          "one was meant is not guessed)" % (path, printable(exc.args[0], 80))) from None
    except ValueError as exc:
        raise ConfigError("config file %s: invalid JSON: %s" % (path, exc)) from exc
    except RecursionError:
        raise ConfigError("config file %s: JSON nested too deeply" % path) from None
    if not isinstance(raw, dict):
        raise ConfigError("config file %s: top level must be a JSON object, got %s"
                          % (path, _json_type(raw)))
    return config_from_dict(raw, path, env, secret_file_warnings(path, mode, "config file")
                            if _holds_secret(raw) else ())


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    """A JSON object as a dict, refusing a key given twice (Python keeps the
    last silently; Go's encoding/json v2 refuses it too)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def secret_key_names():
    """The names of every key declared as a secret, in any block."""
    blocks = [TOP_KEYS] + [cls.keys for cls in STORAGE_TYPES.values()]
    return frozenset(key.name for keys in blocks for key in keys if key.kind == "secret")


def _holds_secret(raw, names=None):
    """Whether a config document sets a secret anywhere (any block)."""
    names = secret_key_names() if names is None else names
    for name, value in raw.items():
        if isinstance(value, dict) and _holds_secret(value, names):
            return True
        if isinstance(value, list) and any(isinstance(item, dict) and _holds_secret(item, names)
                                           for item in value):
            return True
        if name in names and value not in (None, ""):
            return True
    return False


def secret_file_warnings(path, mode, what):
    """A warning when a file holding secrets can be read by group or others (as ssh does)."""
    if stat.S_IMODE(mode) & 0o077:
        return ["%s %s holds secrets and is readable by others (mode %04o); run: chmod 600 %s"
                % (what, path, stat.S_IMODE(mode), path)]
    return []


def config_from_dict(raw, path="<config>", env=None, warnings=()):
    """The Config of a parsed config document (see load_config), storage
    blocks included; ``warnings`` are the caller's own (the file's mode)."""
    top = Section(raw, "", env)
    warnings = list(warnings)
    given = top.string("addr", DEFAULT_ADDR, env=_env_names("ADDR"))
    if "://" not in given:          # a bare host is fine for storages, not for Vault
        raise top.error("addr", "must be an http:// or https:// URL, got %r" % given)
    values = read_block(top, TOP_KEYS)
    check_auth(top, values, warnings.append)
    metrics_bind = _check_outputs(top, values)
    _check_notify(top, values)
    tls = TlsOptions(values["ca_cert"], values["ca_path"], values["client_cert"],
                     values["client_key"], values["tls_server_name"], values["tls_skip_verify"])
    if tls.client_key and not tls.client_cert:
        raise top.error("client_key", "needs client_cert as well")
    if values["addr"].startswith("https://"):
        make_ssl_context(tls)   # load certificates now: errors are config errors
    proxy_policy = ProxyPolicy(values["proxy"], top.env, "proxy")
    warnings += proxy_policy.warnings
    for key in ("secret_id_file", "token_file", "password_file"):
        if values[key]:
            try:
                warnings += secret_file_warnings(values[key], os.stat(values[key]).st_mode, key)
            except OSError:
                pass
    storages = _read_storages(top, values, warnings.append)
    warnings += [_unknown_key(section, k) for section in [top] + [s for s, _, _ in storages]
                 for k in section.unknown()]
    return Config(path, Settings(values, top.sources), [(c, v) for _, c, v in storages], warnings,
                  tls, proxy_policy, metrics_bind)


def _unknown_key(section, name):
    """The warning for an unknown key: the closest known one, if any."""
    import difflib
    key = name[len(section.prefix):] if name.startswith(section.prefix) else name
    close = difflib.get_close_matches(key, sorted(section.seen), n=1, cutoff=0.7)
    return "unknown config key %r ignored (%s)" % (
        name, "did you mean %r?" % (section.prefix + close[0]) if close else "typo?")


def _read_storages(top, values, warn):
    """(Section, Storage class, Settings) of each storage block present, in
    registry order (a key's list in its order); names unique, no two blocks
    at one place. With ``align``, the jitter must stay in the first half of
    each period (the next boundary is found half a period after a cycle's
    start, so a later start would skip a whole period)."""
    blocks = []
    for key, cls in STORAGE_TYPES.items():
        sections = _storage_sections(top, key)
        for index, section in enumerate(sections, 1):
            name = cls.kind if len(sections) == 1 and section.prefix == key + "." else \
                "%s-%d" % (cls.kind, index)
            blocks.append((section, cls, cls.read(section, values, warn, name)))
    if not blocks:
        raise ConfigError("no storage configured: add local_storage (or another *_storage block)")
    _check_blocks_apart(blocks)
    shortest = min(settings["frequency"] for _, _, settings in blocks)
    if values["align"] and values["jitter"] >= shortest / 2.0:
        raise ConfigError("jitter: with align, must be less than half the shortest frequency "
                          "(%s), got %s" % (format_duration(shortest / 2.0),
                                            format_duration(values["jitter"])))
    return blocks


def _storage_sections(top, key):
    """The Sections of storage key ``key``: none when absent, one for an
    object, one per item of a list (``aws_storage[1].``, counted from 1 as
    the default names ``aws-1`` are)."""
    top.seen.add(key)
    value = top.raw.get(key)
    if value is None:
        return []
    if isinstance(value, dict):
        return [Section(value, key + ".", top.env)]
    if not isinstance(value, list):
        raise top.error(key, "must be an object or a list of objects, got %s" % _json_type(value))
    if not value:
        raise top.error(key, "an empty list: give at least one block, or leave the key out")
    sections = []
    for index, item in enumerate(value, 1):
        if not isinstance(item, dict):
            raise ConfigError("%s[%d]: must be an object, got %s" % (key, index, _json_type(item)))
        sections.append(Section(item, "%s[%d]." % (key, index), top.env))
    return sections


def _check_blocks_apart(blocks):
    """Refuse two blocks with one name, a name that is another block's kind
    (``--storage aws`` selects every aws block), and two blocks at one
    place: their retentions would delete each other's snapshots."""
    names, places = {}, {}
    kinds = dict((alias, cls) for cls in STORAGE_TYPES.values()
                 for alias in (cls.config_key,) + cls.aliases)
    for section, cls, settings in blocks:
        name, where = settings["name"], settings.block
        if name in names:
            raise ConfigError("%s.name and %s.name: both %r; storage names must be unique"
                              % (names[name], where, name))
        names[name] = where
        of_kind = sum(1 for _, c, _ in blocks if c is cls)
        if name in kinds and (kinds[name] is not cls or of_kind > 1):
            raise section.error("name", "%r is the short name of every %s block (--storage %s); "
                                "pick another" % (name, kinds[name].config_key, name))
        place = cls.place(settings)
        if place in places:
            raise ConfigError("%s and %s: both store at %s; their retentions would delete each "
                              "other's snapshots (give one another place or file_prefix)"
                              % (places[place], where, place))
        places[place] = where


def _check_outputs(top, values):
    """metrics_address parses (its (host, port) to bind is returned, None
    when unset); output files have a directory."""
    bind, address = None, values["metrics_address"]
    if address is not None:
        host, _, port = address.rpartition(":")
        if not re.match(r"\A[0-9]{1,5}\Z", port) or not 0 < int(port) < 65536:
            raise top.error("metrics_address", "must be host:port, e.g. 127.0.0.1:9469, got %r"
                            % address)
        bind = (host.strip("[]") or "127.0.0.1", int(port))
    for key in ("status_file", "metrics_textfile"):
        target = values[key]
        if target and not os.path.isdir(os.path.dirname(os.path.abspath(target))):
            raise top.error(key, "directory %s does not exist" % os.path.dirname(os.path.abspath(target)))
    return bind


def _check_notify(top, values):
    """The notify_* keys: a command that can run, a webhook URL that parses
    (never shown: it holds a token), known events."""
    command = values["notify_command"]
    if command:
        import shutil
        program = command[0]
        found = shutil.which(program, path=top.env.get("PATH", os.defpath)) if "/" not in program \
            else (program if os.path.isfile(program) and os.access(program, os.X_OK) else None)
        if not found:
            raise top.error("notify_command", "%s is not an executable %s" % (
                program, "file" if "/" in program else "program on PATH"))
    url = values["notify_url"]
    if url:
        try:
            parts = urllib.parse.urlsplit(url.reveal())
            _ = parts.port
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise top.error("notify_url", "must be an http:// or https:// URL with a host "
                                          "(the value is not shown: it is a secret)")
        if parts.scheme == "https":
            make_ssl_context(TlsOptions(values["notify_ca_cert"], None, None, None, None, False))
    unknown = [e for e in values["notify_events"] if e not in NOTIFY_EVENTS]
    if unknown:
        raise top.error("notify_events", "unknown event %r (have: %s)"
                        % (unknown[0], ", ".join(NOTIFY_EVENTS)))


# =============================================================================
# 12. Vault client
# =============================================================================


class VaultClient:
    """Login, token lifecycle, leader check and the snapshot request.

    Every request carries ``X-Vault-Request: true``; the namespace header goes
    on the login call only (snapshots are a root-namespace operation); the
    token never follows a redirect to another host.
    """

    def __init__(self, cfg, http=None, clock=None, signals=None, env=None):
        self.cfg = cfg
        self.http = http or Http(cfg.tls, cfg.timeout, proxy=cfg.proxy_policy,
                                 deadline=cfg.request_timeout, signals=signals)
        self.clock = clock or Clock()
        self.runtime = Runtime(os.environ if env is None else env, self.clock, signals)
        self.method = AUTH_METHODS[cfg.vault_auth_method]
        self._login_cache = {}      # what the method reuses between logins (see AuthMethod)
        self._token = None          # Secret
        self._renew_at = None       # monotonic seconds; None: never
        self._expire_at = None
        self._renewable = False
        self._granted = 0.0         # TTL the login granted; a renewal giving less hit the max TTL
        origin = urllib.parse.urlsplit(cfg.addr)
        self._origin = (origin.scheme, origin.hostname, origin.port or
                        (443 if origin.scheme == "https" else 80))

    # -- plumbing ------------------------------------------------------------

    def _headers(self, token=True, namespace=False):
        headers = {"X-Vault-Request": "true", "Accept": "application/json"}
        if token and self._token:
            headers["X-Vault-Token"] = self._token.reveal()
        if namespace and self.cfg.namespace:
            headers["X-Vault-Namespace"] = self.cfg.namespace
        return headers

    def _call(self, method, path, payload=None, token=True, namespace=False, ok=(200, 204),
              headers=None):
        url = self.cfg.addr + path
        all_headers = self._headers(token, namespace)
        all_headers.update(headers or {})
        body = None
        if payload is not None:
            body = json.dumps(payload).encode("utf-8")
            all_headers["Content-Type"] = "application/json"
        with self.http.request(method, url, all_headers, body) as resp:
            if resp.status not in ok:
                raise vault_error(resp)
            return resp.json() if resp.status != 204 else {}

    # -- leader --------------------------------------------------------------

    def leader_status(self):
        """``GET /v1/sys/leader``: whether this node is the active node."""
        try:
            return self._call("GET", "/v1/sys/leader", token=False)
        except VaultError as exc:
            if exc.status == 503:
                raise VaultError("Vault at %s is sealed or not initialised (HTTP 503 on sys/leader)"
                                 % self.cfg.addr, 503) from exc
            raise

    def is_leader(self):
        status = self.leader_status()
        if not isinstance(status, dict):
            raise VaultError("sys/leader answer is not a JSON object")
        if status.get("ha_enabled") is False:
            return True
        return status.get("is_self") is True

    # -- tokens --------------------------------------------------------------

    def ensure_token(self):
        """Make sure a usable token is held: log in, renew or log in again."""
        now = self.clock.monotonic()
        if self._token is None or (self._expire_at is not None and now >= self._expire_at):
            self.login()
            return
        if self._renew_at is not None and now >= self._renew_at:
            if self._renewable:
                try:
                    self.renew()
                    return
                except (VaultError, TransportError) as exc:
                    LOG.warning("Token renewal failed (%s); logging in again", exc)
            self.login()

    def login(self):
        """Log in with the configured method (AUTH_METHODS), or take up the
        configured token."""
        if self.method.token is not None:
            self._token = self.method.token(self.cfg)
            data = _object(self._call("GET", "/v1/auth/token/lookup-self"), "token lookup-self")
            data = _object(data.get("data") or {}, "token lookup-self data")
            self._set_ttl(data.get("ttl"), data.get("renewable"))
            LOG.info("Using token auth, token TTL %s", self._ttl_text(data.get("ttl")))
            return
        method = self.method.name
        try:
            mount, payload, user, extra = self.method.login(self.cfg, self.runtime, self._login_cache)
        except AgentError:
            self._login_cache.clear()       # a refused credential is fetched again, never reused
            raise
        self._token = None
        path = "/v1/auth/%s/login" % mount + ("/" + uri_encode(user, safe="") if user else "")
        secrets = [v.reveal() for v in payload.values() if isinstance(v, Secret)] + list(extra)
        body = dict((k, v.reveal() if isinstance(v, Secret) else v) for k, v in payload.items())
        try:
            answer = self._call("POST", path, body, token=False, namespace=True)
        except VaultError as exc:
            self._login_cache.clear()
            raise VaultError("%s login at auth/%s failed: %s" % (method, mount, masked(exc, secrets)),
                             exc.status) from None
        except TransportError as exc:       # e.g. an answer that is not JSON, quoted
            raise TransportError(masked(exc, secrets), exc.status, exc.retryable) from None
        auth = answer.get("auth") if isinstance(answer, dict) else None
        token = auth.get("client_token") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token.strip() or has_control(token):
            raise VaultError("%s login at auth/%s: answer has no auth.client_token" % (method, mount))
        self._token = Secret(token)
        self._granted = self._set_ttl(auth.get("lease_duration"), auth.get("renewable"))
        LOG.info("Logged in with %s at auth/%s, token TTL %s%s", method, mount,
                 self._ttl_text(auth.get("lease_duration")),
                 ", renewable" if self._renewable else "")

    def renew(self):
        answer = _object(self._call("POST", "/v1/auth/token/renew-self", {}), "token renew-self")
        auth = _object(answer.get("auth") or {}, "token renew-self auth")
        ttl = auth.get("lease_duration")
        seconds = self._set_ttl(ttl, auth.get("renewable", self._renewable))
        capped = 0 < seconds < self._granted
        if capped:
            # The token reached its max TTL: renewing again could only shrink
            # it further (and fail once it lapses), so the next refresh logs in.
            self._renewable = False
        LOG.info("Renewed token, TTL now %s%s", self._ttl_text(ttl),
                 " (capped by its max TTL: a new login follows)" if capped else "")

    def _set_ttl(self, ttl, renewable):
        """Schedule renewal and expiry from a TTL in seconds; returns it."""
        now = self.clock.monotonic()
        try:
            ttl = float(ttl or 0)
        except (TypeError, ValueError, OverflowError):
            ttl = 0.0
        if not math.isfinite(ttl) or ttl < 0:
            raise VaultError("Vault answered a lease_duration that is not a time: %s"
                             % printable(ttl, 40))
        ttl = min(ttl, MAX_TOKEN_TTL)
        self._renewable = bool(renewable)
        if ttl <= 0:
            self._renew_at = self._expire_at = None     # root-like token: never expires
        else:
            # Treat the token as expired a little early: a request sent in its
            # last seconds could still arrive after it lapsed, and Vault
            # rounds TTLs to whole seconds.
            self._renew_at = now + ttl * TOKEN_RENEW_FRACTION
            self._expire_at = now + ttl - min(TOKEN_MIN_REMAINING, max(1.0, ttl * 0.1))
        return ttl

    def token_ttl_text(self):
        """What is left of the token's life, for doctor."""
        if self._expire_at is None:
            return "unlimited"
        return format_duration(max(0.0, self._expire_at - self.clock.monotonic()))

    @staticmethod
    def _ttl_text(ttl):
        try:
            seconds = float(ttl)
            return format_duration(min(seconds, MAX_TOKEN_TTL)) if seconds else "unlimited"
        except (TypeError, ValueError, OverflowError):
            return "unknown"

    def use_token(self, token):
        """Use ``token`` (a Secret) as is, e.g. an operator's token for restore."""
        self._token = token
        self._renew_at = self._expire_at = None

    # -- snapshot ------------------------------------------------------------

    def restore(self, path, size, force=False, tty=None):
        """``POST /v1/sys/storage/raft/snapshot[-force]`` with the file as
        body; progress on the terminal ``tty`` (else every 30 s) and a
        summary line of the upload and of Vault's answer."""
        api_path = SNAPSHOT_PATH[len("/v1/"):] + ("-force" if force else "")
        # Ask first: Vault refuses a restore only after the upload started, and
        # closes the connection on the rest of the body, hiding its 403.
        try:
            capabilities = self.capabilities(api_path)
        except VaultError as exc:
            if exc.status != 403:
                raise
            raise VaultError("%s refused the token (invalid, expired or revoked: capabilities-self "
                             "answered 403); give a valid operator token in VAULT_TOKEN or "
                             "BAO_TOKEN" % self.cfg.addr, 403) from exc
        if not set(capabilities) & set(["update", "root", "sudo"]):
            raise VaultError("this token may not restore: its capabilities on %s are [%s]; use an "
                             "operator token (VAULT_TOKEN or BAO_TOKEN)"
                             % (api_path, ", ".join(capabilities)))
        url = self.cfg.addr + "/v1/" + api_path
        headers = self._headers()
        headers.update({"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        progress = Progress("Sending %s to %s" % (os.path.basename(path), self.cfg.addr), size,
                            self.clock, tty=tty)
        with open(path, "rb") as handle:
            body = _Sent(handle, progress)
            with self.http.request("POST", url, headers, body, timeout=self.cfg.restore_timeout) as resp:
                progress.end()
                LOG.info("%s; Vault answered %s later", transfer_summary(
                    "Sent %s to %s" % (os.path.basename(path), self.cfg.addr), progress.done,
                    body.sent_at - progress.start), format_duration(self.clock.monotonic() - body.sent_at))
                if resp.status in (301, 302, 303, 307, 308):
                    raise VaultError("restore must be sent to the active node; %s redirected to %s"
                                     % (self.cfg.addr, redact_url(resp.header("Location", "?"))))
                if resp.status not in (200, 204):
                    error = vault_error(resp)
                    if force or resp.status not in (400, 500):
                        raise error
                    raise VaultError("%s (a snapshot of another cluster, whose keys differ, is "
                                     "restored only with --force)" % error, resp.status)

    def capabilities(self, api_path):
        """The token's capabilities on ``api_path`` (``sys/capabilities-self``)."""
        answer = self._call("POST", "/v1/sys/capabilities-self", {"paths": [api_path]})
        if not isinstance(answer, dict):
            raise VaultError("sys/capabilities-self answer is not a JSON object")
        found = answer.get(api_path) or (answer.get("data") or {}).get(api_path) or []
        return [c for c in found if isinstance(c, str)] if isinstance(found, list) else []

    def sealed(self):
        """Whether ``sys/seal-status`` says sealed (None: no answer)."""
        try:
            status = self._call("GET", "/v1/sys/seal-status", token=False)
        except AgentError:
            return None
        return status.get("sealed") if isinstance(status, dict) else None

    def open_snapshot(self):
        """Start ``GET /v1/sys/storage/raft/snapshot``; returns the 200 Response.

        Follows a redirect only to the same scheme, host and port (the token
        must never reach another host); a redirect elsewhere means another
        node is active and raises NotLeader. One 403 triggers a new login.
        """
        relogged = False
        url = self.cfg.addr + SNAPSHOT_PATH
        hops = 0
        while True:
            headers = self._headers()
            headers["Accept"] = "application/gzip, application/octet-stream"
            resp = self.http.request("GET", url, headers, timeout=self.cfg.snapshot_timeout)
            if resp.status == 200:
                return resp
            try:
                if resp.status in (301, 302, 303, 307, 308):
                    location = urllib.parse.urljoin(url, resp.header("Location", ""))
                    target = urllib.parse.urlsplit(location)
                    origin = (target.scheme, target.hostname,
                              target.port or (443 if target.scheme == "https" else 80))
                    if origin != self._origin:
                        raise NotLeader("snapshot request redirected to %s://%s:%s (the active node);"
                                        " the token is not sent there" % origin)
                    hops += 1
                    if hops > MAX_REDIRECTS:
                        raise VaultError("snapshot request: too many redirects")
                    url = location
                    continue
                if resp.status == 403 and not relogged and self.method.login is not None:
                    LOG.info("Vault answered 403 to the snapshot request; logging in again")
                    relogged = True
                    self.login()
                    continue
                raise vault_error(resp)
            finally:
                resp.close()


class _Sent:
    """A request body file that tells ``progress`` what went out, and when
    the last of it did (``sent_at``)."""

    def __init__(self, handle, progress):
        self.handle, self.progress = handle, progress
        self.sent_at = progress.start

    def read(self, size=-1):
        data = self.handle.read(size)
        self.progress.add(len(data))
        self.sent_at = self.progress.clock.monotonic()
        return data


def _object(answer, what):
    """``answer`` when it is a JSON object; VaultError otherwise."""
    if not isinstance(answer, dict):
        raise VaultError("%s: the answer is not a JSON object" % what)
    return answer


def vault_error(resp):
    """A VaultError from a non-success Vault answer, with Vault's own messages."""
    try:
        data = resp.body(64 * 1024)
    except TransportError:
        data = b""
    detail = ""
    try:
        errors = json.loads(data.decode("utf-8")).get("errors")
        if isinstance(errors, list) and errors:
            detail = "; ".join(str(e) for e in errors)
    except (ValueError, AttributeError):
        detail = data[:200].decode("utf-8", "replace")
    path = urllib.parse.urlsplit(resp.url).path
    hint = {403: " (permission denied: check the token's policy)",
            503: " (sealed or unavailable)", 429: " (standby or rate limited)"}.get(resp.status, "")
    if resp.status in (400, 403) and re.search(r"/login(/[^/]+)?\Z", path):
        hint = " (login refused: check the credentials and the role)"
    return VaultError("Vault answered HTTP %d to %s %s%s%s" % (
        resp.status, resp.method, path, hint, (": " + printable(one_line(detail), 300)) if detail else ""),
        resp.status)


# =============================================================================
# 13. Snapshot archive
# =============================================================================


SnapshotInfo = collections.namedtuple(
    "SnapshotInfo", "path size sha256 index term state_size")

REQUIRED_MEMBERS = ("meta.json", "state.bin", "SHA256SUMS", "SHA256SUMS.sealed")
SMALL_MEMBERS = ("meta.json", "SHA256SUMS")         # kept in memory, to be parsed
SUMMED_MEMBERS = ("meta.json", "state.bin")         # listed in SHA256SUMS
_SUMS_LINE_RE = re.compile(r"\A([0-9a-fA-F]{64}) [ *](\S+)\Z")


class _Member:
    """One tar member as it streams past: hashed, and kept only when small
    (what is kept is capped by the bytes really kept, not the declared size)."""

    def __init__(self, name, size, keep):
        self.name, self.size, self.keep = name, size, keep
        self.sha256 = hashlib.sha256()
        self.seen = 0
        self.data = bytearray() if keep else None

    def feed(self, data):
        self.sha256.update(data)
        self.seen += len(data)
        if self.keep:
            if len(self.data) + len(data) > MAX_SMALL_MEMBER:
                raise SnapshotError("snapshot member %s is implausibly large" % printable(self.name))
            self.data.extend(data)


class ArchiveVerifier:
    """Push-style check of a Raft snapshot archive, fed as bytes arrive.

    As strict as the official restore: a gzip stream (zlib checks its CRC and
    length) of a tar holding exactly meta.json, state.bin, SHA256SUMS and a
    non-empty SHA256SUMS.sealed, each a regular file, once; SHA256SUMS lists
    exactly the first two and matches them; state.bin has the size meta.json
    announces. After the gzip stream only NUL padding may follow. Memory is
    bounded whatever the stream claims: inflation is capped per call, the
    header count and PAX headers are capped, and a wrong member is refused at
    its header, before any of its data is read.
    """

    def __init__(self):
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._buf = bytearray()
        self._member = None        # _Member being read, or None when a header is due
        self._remaining = 0        # data bytes left in the current member
        self._padding = 0          # bytes to skip after the current member
        self._pax_name = None
        self._pax_size = None
        self._headers = 0
        self._ended = False        # saw the end-of-archive zero block
        self.members = collections.OrderedDict()
        self.compressed = 0
        self.trailing = 0          # bytes after the end of the gzip stream (NUL padding)

    def feed(self, data):
        """Take the next bytes of the archive (any bytes-like object).

        They are inflated INFLATE_STEP at a time: zlib's output then comes
        in blocks small enough for malloc to reuse. With 1 MiB steps every
        output block was fresh memory from the kernel, and page faults cost
        about 2.5 s of system time per GB (measured)."""
        view = memoryview(data)
        for start in range(0, len(view), INFLATE_STEP):
            self._feed(view[start:start + INFLATE_STEP])

    def _feed(self, data):
        self.compressed += len(data)
        if self._inflate.eof:
            # Past the gzip end: check each new chunk once (linear, nothing kept).
            self.trailing += len(data)
            if bytes(data).strip(b"\0"):
                raise SnapshotError("snapshot has unexpected data after the end of the gzip stream")
            return
        try:
            out = self._inflate.decompress(data, INFLATE_STEP)
            while True:
                self._tar(out)
                tail = self._inflate.unconsumed_tail
                if not tail:
                    break
                out = self._inflate.decompress(tail, INFLATE_STEP)
        except zlib.error as exc:
            raise SnapshotError("snapshot is not a valid gzip stream: %s" % exc) from exc
        if self._inflate.eof and self._inflate.unused_data.strip(b"\0"):
            raise SnapshotError("snapshot has unexpected data after the end of the gzip stream")

    def _tar(self, data):
        if self._ended:
            if data.strip(b"\0"):
                raise SnapshotError("snapshot has data after the end of the tar archive")
            return
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._member is not None and self._remaining:
                take = min(self._remaining, len(view) - pos)
                self._member.feed(view[pos:pos + take])
                self._remaining -= take
                pos += take
                if self._remaining:
                    return
                self._close_member()
                continue
            if self._padding:
                take = min(self._padding, len(view) - pos)
                self._padding -= take
                pos += take
                continue
            need = 512 - len(self._buf)
            self._buf.extend(view[pos:pos + need])
            pos += min(need, len(view) - pos)
            if len(self._buf) < 512:
                return
            header = bytes(self._buf)
            del self._buf[:]
            if not header.strip(b"\0"):
                self._ended = True
                if bytes(view[pos:]).strip(b"\0"):
                    raise SnapshotError("snapshot has data after the end of the tar archive")
                return
            self._header(header)

    def _header(self, header):
        self._headers += 1
        if self._headers > MAX_TAR_HEADERS:
            raise SnapshotError("snapshot tar has too many members (more than %d headers)"
                                % MAX_TAR_HEADERS)
        try:
            stored = int(header[148:156].split(b"\0")[0].strip() or b"0", 8)
        except ValueError:
            raise SnapshotError("snapshot tar header is corrupt (bad checksum field)") from None
        computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != computed:
            raise SnapshotError("snapshot tar header checksum mismatch")
        name = header[0:100].split(b"\0")[0]
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = header[345:500].split(b"\0")[0] + b"/" + name
        name = name.decode("utf-8", "replace")
        size = _tar_number(header[124:136])
        kind = header[156:157]
        if kind in (b"x", b"g"):                 # PAX extended header: parsed, kept small
            if size > MAX_PAX_HEADER:
                raise SnapshotError("snapshot tar extended header is implausibly large (%d bytes)" % size)
            self._start(_Member("<pax>", size, keep=True), size)
            self._member.pax_global = kind == b"g"
            return
        if self._pax_name is not None:
            name = self._pax_name
        if self._pax_size is not None:
            size = self._pax_size
        self._pax_name = self._pax_size = None
        if name not in REQUIRED_MEMBERS:
            raise SnapshotError("snapshot has an unexpected member %s (a Raft snapshot holds only %s)"
                                % (printable(name), ", ".join(REQUIRED_MEMBERS)))
        if kind not in (b"0", b"\0"):
            raise SnapshotError("snapshot member %s is not a regular file (tar type %s)"
                                % (name, printable(kind.decode("latin-1"))))
        if name in self.members:
            raise SnapshotError("snapshot archive lists %s twice" % name)
        keep = name in SMALL_MEMBERS
        if keep and size > MAX_SMALL_MEMBER:
            raise SnapshotError("snapshot member %s is implausibly large (%d bytes)" % (name, size))
        self._start(_Member(name, size, keep), size)

    def _start(self, member, size):
        self._member = member
        self._remaining = size
        self._padding = (-size) % 512
        if not size:
            self._close_member()

    def _close_member(self):
        member = self._member
        self._member = None
        if member.name == "<pax>":
            if not getattr(member, "pax_global", False):
                self._pax_name, self._pax_size = _parse_pax(bytes(member.data))
            return
        self.members[member.name] = member

    def finish(self):
        """Check the archive is complete and consistent; return (index, term, state size)."""
        if self.compressed == 0:
            raise SnapshotError("snapshot is empty (0 bytes)")
        if not self._inflate.eof:
            raise SnapshotError("snapshot is truncated (gzip stream ends early after %d bytes)"
                                % self.compressed)
        if self._member is not None or self._buf:
            raise SnapshotError("snapshot is truncated inside a tar member")
        missing = [m for m in REQUIRED_MEMBERS if m not in self.members]
        if missing:
            raise SnapshotError("snapshot archive lacks %s" % ", ".join(missing))
        meta = self._meta()
        sums = self._sums()
        for name in SUMMED_MEMBERS:
            if name not in sums:
                raise SnapshotError("snapshot SHA256SUMS has no entry for %s" % name)
            if sums[name] != self.members[name].sha256.hexdigest():
                raise SnapshotError("snapshot %s does not match its SHA-256 in SHA256SUMS" % name)
        if self.members["SHA256SUMS.sealed"].seen == 0:
            raise SnapshotError("snapshot SHA256SUMS.sealed is empty")
        state = self.members["state.bin"].seen
        if "Size" in meta and meta["Size"] != state:
            raise SnapshotError("snapshot state.bin has %d bytes, meta.json says %d"
                                % (state, meta["Size"]))
        return meta["Index"], meta["Term"], state

    def _meta(self):
        """meta.json as a dict whose Index, Term (and Size, if any) are whole
        numbers: they reach logs and metrics, so nothing else may pass."""
        try:
            meta = json.loads(bytes(self.members["meta.json"].data).decode("utf-8"))
        except (ValueError, RecursionError):
            raise SnapshotError("snapshot meta.json is not valid JSON") from None
        if not isinstance(meta, dict):
            raise SnapshotError("snapshot meta.json is not a JSON object")
        for key in ("Index", "Term", "Size"):
            value = meta.get(key)
            if key == "Size" and key not in meta:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SnapshotError("snapshot meta.json %s is not a whole number" % key)
        return meta

    def _sums(self):
        """SHA256SUMS as {name: hex}: one '<sha256>  <name>' line for each of
        meta.json and state.bin, nothing else (blank lines aside)."""
        try:
            text = bytes(self.members["SHA256SUMS"].data).decode("ascii")
        except UnicodeDecodeError:
            raise SnapshotError("snapshot SHA256SUMS is not ASCII text") from None
        sums = {}
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            match = _SUMS_LINE_RE.match(line.rstrip("\r"))
            if not match or match.group(2) not in SUMMED_MEMBERS or match.group(2) in sums:
                raise SnapshotError("snapshot SHA256SUMS line %d is not one '<sha256>  NAME' line "
                                    "for each of %s: %s" % (number, " and ".join(SUMMED_MEMBERS),
                                                            printable(line, 80)))
            sums[match.group(2)] = match.group(1).lower()
        return sums


def _tar_number(field):
    if field[:1] == b"\x80":                      # GNU base-256 for large sizes
        value = 0
        for byte in bytearray(field[1:]):
            value = (value << 8) | byte
        return value
    if field[:1] == b"\xff":                      # base-256 negative: never a size
        raise SnapshotError("snapshot tar header is corrupt (negative size)")
    text = field.split(b"\0")[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise SnapshotError("snapshot tar header is corrupt (bad size field)") from None


def _parse_pax(data):
    """The path and size overrides of a PAX extended header."""
    name = size = None
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise SnapshotError("snapshot tar extended header is corrupt") from None
        if length <= 0:
            break
        record = data[space + 1:pos + length].rstrip(b"\n")
        key, _, value = record.partition(b"=")
        if key == b"path":
            name = value.decode("utf-8", "replace")
        elif key == b"size":
            if not re.match(br"\A[0-9]{1,20}\Z", value):
                raise SnapshotError("snapshot tar extended header has a bad size")
            size = int(value)
        pos += length
    return name, size


# =============================================================================
# 14. Snapshot stream
# =============================================================================


class _Pass:
    """One pass over a snapshot's bytes: read, write, take the archive's
    SHA-256 and verify, so nothing is read twice and memory stays bounded.

    ``threaded``: two threads share the work through a ring of PASS_BUFFERS
    reusable buffers: this one reads into a free buffer, writes it and
    hashes it; a verifier thread inflates it, hashes state.bin and walks
    the tar (zlib, hashlib and file calls release the GIL). A failure on
    either side stops both, and the first error is the one raised. It wins
    where a core is free and costs where none is (contrib/bench/README.md):
    verifying 1 GB takes 1.36 s instead of 1.89 s on two cores, for 12 %
    more CPU; but a snapshot from a leader on the same two cores, which
    builds it meanwhile, took 6.2 s against 5.7 s in one thread."""

    def __init__(self, signals, threaded=True):
        self.signals = signals
        self.threaded = threaded
        self.verifier = ArchiveVerifier()
        self.digest = hashlib.sha256()
        self.size = 0
        self._error = None
        self._stop = False

    def run(self, readinto, write, progress=None):
        """Pump ``readinto(buffer)`` to ``write`` until it returns 0; returns
        (index, term, state size) once the archive verified."""
        import queue
        free, full = queue.Queue(), queue.Queue()
        for _ in range(PASS_BUFFERS if self.threaded else 1):
            free.put(bytearray(CHUNK_SIZE))
        worker = None
        if self.threaded:
            worker = start_thread(self._verify, "verify", full, free)
        try:
            while True:
                buf = self._next_free(free)
                count = readinto(buf)
                if not count:
                    break
                self.signals.check()
                view = memoryview(buf)[:count]
                write(view)
                self.digest.update(view)
                self.size += count
                if worker is None:
                    self.verifier.feed(view)
                    free.put(buf)
                else:
                    full.put((buf, count))
                if progress is not None:
                    progress.add(count)
        except BaseException:
            self._stop = True
            raise
        finally:
            if worker is not None:
                full.put(None)
                worker.join()
        if self._error is not None:
            raise self._error
        self.signals.check()
        return self.verifier.finish()

    def _next_free(self, free):
        """A free buffer; raises the verifier's error, or Stopped, instead
        of waiting for ever."""
        import queue
        while True:
            self.signals.check()
            if self._error is not None:
                raise self._error
            try:
                return free.get(timeout=0.5)
            except queue.Empty:
                continue

    def _verify(self, full, free):
        while True:
            item = full.get()
            if item is None:
                return
            buf, count = item
            if self._error is None and not self._stop:
                try:
                    with memoryview(buf) as view:
                        self.verifier.feed(view[:count])
                except BaseException as exc:      # handed to the reading thread
                    self._error = exc
            free.put(buf)


class _NoStop:
    def check(self):
        pass


def usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def stream_snapshot(resp, directory, signals, progress=None, threaded=None):
    """Stream a snapshot answer into a 0600 file in ``directory``, verifying
    and hashing on the way; returns SnapshotInfo. On any failure or stop the
    partial file is removed and the error raised. ``threaded`` (default:
    with 3 or more CPUs, one for the Vault node building the snapshot) says
    how the pass runs; see _Pass."""
    path = os.path.join(directory, temp_name())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise StagingError("cannot create a temporary file in %s: %s" % (directory, exc.strerror)) from exc
    one_pass = _Pass(signals, usable_cpus() >= 3 if threaded is None else threaded)
    try:
        with os.fdopen(fd, "wb", buffering=0) as out, signals.aborting(resp.abort):
            writeback = _Writeback(out.fileno())
            try:
                index, term, state_size = one_pass.run(resp.readinto, _writer(out, writeback),
                                                       progress)
                writeback.finish()
            finally:
                writeback.close()
    except OSError as exc:     # the disk: full, file too large, I/O error
        _unlink_quietly(path)
        raise StagingError("cannot write the snapshot to %s (in %s, after %s): %s" % (
            os.path.basename(path), directory, format_size(one_pass.size), exc.strerror or exc)) from exc
    except BaseException:
        _unlink_quietly(path)
        raise
    return SnapshotInfo(path, one_pass.size, one_pass.digest.hexdigest(), index, term, state_size)


def _writer(out, writeback):
    """``write(view)`` for an unbuffered file: writes all of it, and tells
    ``writeback`` (a _Writeback) how much."""
    def write(view):
        done = 0
        while done < len(view):
            done += out.write(view[done:])
        writeback.wrote(done)
    return write


class _Writeback:
    """Flush a file to disk while it is still being written: after every
    WRITEBACK_STEP bytes a thread calls ``fdatasync`` on its own copy of the
    descriptor, so the final ``fsync`` (``finish``, still the one that makes
    the file durable) has only the last step left. For 1 GB from a leader
    on the same two cores: the final fsync 0.57 s -> 0.03 s and 0.5 s less
    wall time, with less system time too, as the page cache never holds a
    gigabyte of dirty pages (posix_fadvise instead cost 2 s more system time
    per GB). Linux reports a write-back error to one caller only, so an
    error of the thread is kept and raised by ``finish``."""

    def __init__(self, fd):
        self.fd = fd
        self.written = self.flushed = 0
        self.error = None
        self._cond = threading.Condition(threading.Lock())
        self._due = self._closed = False
        self._thread = None

    def wrote(self, count):
        self.written += count
        if self.written - self.flushed < WRITEBACK_STEP:
            return
        self.flushed = self.written
        with self._cond:
            self._due = True
            self._cond.notify()
        if self._thread is None:
            self._thread = False        # no descriptor or thread left: the final fsync does it
            try:
                copy = os.dup(self.fd)
            except OSError:
                return
            try:
                self._thread = start_thread(self._run, "writeback", copy)
            except RuntimeError:
                os.close(copy)

    def _run(self, fd):
        sync = getattr(os, "fdatasync", os.fsync)
        try:
            while True:
                with self._cond:
                    while not self._due and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    self._due = False
                try:
                    sync(fd)
                except OSError as exc:
                    self.error = self.error or exc
        finally:
            os.close(fd)

    def finish(self):
        """Wait for the thread, then ``fsync``; raises OSError when either
        failed."""
        thread = self._thread
        self.close()
        if thread:
            thread.join()
        if self.error is not None:
            raise self.error
        os.fsync(self.fd)

    def close(self):
        """End the thread (it closes its own descriptor, so nothing waits
        for a slow flush here)."""
        with self._cond:
            self._closed = True
            self._cond.notify()


def verify_file(path, threaded=None):
    """Verify a snapshot file on disk; returns SnapshotInfo (path as given).
    ``threaded`` defaults to whether there are 2 CPUs or more."""
    one_pass = _Pass(_NoStop(), usable_cpus() >= 2 if threaded is None else threaded)
    try:
        with open(path, "rb", buffering=0) as handle:
            index, term, state_size = one_pass.run(handle.readinto, lambda view: None)
    except OSError as exc:
        raise SnapshotError("%s: cannot read: %s" % (path, exc.strerror or exc)) from exc
    return SnapshotInfo(path, one_pass.size, one_pass.digest.hexdigest(), index, term, state_size)


Recorded = collections.namedtuple("Recorded", "what algorithm expected size part_size parts")
Recorded.__new__.__defaults__ = (None, None, 0)
# The checksum a store recorded for an object when it was written, to compare
# with the bytes read back: ``what`` names it ("S3 ETag"), ``algorithm`` is
# "sha256" or "md5", ``expected`` the digest (bytes), ``size`` the object's
# size if the store said. With ``part_size``, a multipart composite of
# ``parts`` parts: the algorithm's digest of the parts' digests joined (S3's
# "-N" ETag and composite checksum).


OWN_RECORD = "SHA-256 this agent recorded"


def own_record(value, size=None):
    """The Recorded of this agent's own SHA-256 (hex text, as stored in the
    object's metadata or xattr), or None when there is none."""
    if value is None:
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    digest = bytes.fromhex(text) if re.match(r"\A[0-9a-f]{64}\Z", text) else b""
    return Recorded(OWN_RECORD, "sha256", digest, size)


class StoredCheck:
    """A download sink that verifies instead of keeping: what is written to
    it goes through the archive check and the hash of the checksum the
    store recorded (``expect``), and nowhere else, so reading a stored
    snapshot back takes constant memory and no disk. ``seek(0)`` starts
    over (send() does so before a retried download); ``finish()`` says
    whether it was all good."""

    incremental = True      # fed what each receive brings: a preemption is seen at once

    def __init__(self, signals, progress=None, interrupt=None, limit=None):
        self.signals, self.progress, self.interrupt = signals, progress, interrupt
        self.limit = limit          # the listed size: more is refused
        self.recorded = self.written = None
        self.seek(0)

    def expect(self, recorded, written=None):
        """The checksum recorded at upload (a Recorded), or None; when the
        store last wrote the object (aware datetime), if it says."""
        self.recorded, self.written = recorded, written
        self.seek(0)

    def seek(self, position):
        self.verifier = ArchiveVerifier()
        self.size = 0
        self._parts, self._part_left = [], 0
        self._hash = new_hash(self.recorded.algorithm) if self.recorded and self.recorded.algorithm else None

    def truncate(self):
        pass

    def write(self, data):
        self.signals.check()
        if self.interrupt is not None:
            self.interrupt()
        self.size += len(data)
        most = max(self.recorded.size or 0 if self.recorded else 0, self.limit or 0)
        if most and self.size > most:
            raise SnapshotError("the store sent more than the %d bytes it lists for the object" % most)
        self.verifier.feed(data)
        if self.verifier.trailing > MAX_TRAILING:        # no size known: NULs must end somewhere
            raise SnapshotError("the object has more than %s of padding after the end of the gzip "
                                "stream" % format_size(MAX_TRAILING))
        if self._hash is not None:
            self._hash_parts(memoryview(data)) if self.recorded.part_size else self._hash.update(data)
        if self.progress is not None:
            self.progress.add(len(data))
        return len(data)

    def _hash_parts(self, view):
        while len(view):
            if not self._part_left:
                if len(self._parts) >= self.recorded.parts:
                    raise SnapshotError("the object read back is longer than the %d parts of %s "
                                        "the store records" % (self.recorded.parts,
                                                               format_size(self.recorded.part_size)))
                self._hash = new_hash(self.recorded.algorithm)
                self._parts.append(self._hash)
                self._part_left = self.recorded.part_size
            take = min(self._part_left, len(view))
            self._hash.update(view[:take])
            self._part_left -= take
            view = view[take:]

    def finish(self, stored_at=None, written_here=False):
        """(index, term, state size, what was compared) of a good read;
        SnapshotError naming what is wrong otherwise. An object without this
        agent's own SHA-256 was replaced when this process wrote it
        (``written_here``: always with one) or when the store says it was
        written well after ``stored_at`` (the time in its name)."""
        self.signals.check()        # a stop that cut the read looks like an early end
        index, term, state = self.verifier.finish()
        recorded = self.recorded
        own = recorded is not None and recorded.what == OWN_RECORD
        if not own and written_here:
            raise SnapshotError("the object holds no SHA-256 recorded by this agent, which wrote it "
                                "with one: replaced by another upload")
        if not own and stored_at and self.written \
                and (self.written - stored_at).total_seconds() > REWRITE_ALLOWANCE:
            raise SnapshotError("the object was written at %s, %s after the snapshot's time, and "
                                "holds no SHA-256 recorded by this agent: replaced by another upload" % (
                                    iso(self.written), format_duration(
                                        (self.written - stored_at).total_seconds())))
        if recorded is not None and recorded.size is not None and recorded.size != self.size:
            raise SnapshotError("read %d bytes, but the store records %d" % (self.size, recorded.size))
        if recorded is None or recorded.algorithm is None:
            return index, term, state, "archive only: no checksum recorded at upload"
        if recorded.part_size:
            if len(self._parts) != recorded.parts:
                raise SnapshotError("%s is of %d parts, but the object read back makes %d of %s"
                                    % (recorded.what, recorded.parts, len(self._parts),
                                       format_size(recorded.part_size)))
            got = new_hash(recorded.algorithm, b"".join(h.digest() for h in self._parts)).digest()
        else:
            got = self._hash.digest()
        what = recorded.what + ("" if own else " recorded")
        if got != recorded.expected:
            raise SnapshotError("the object read back does not match the %s at upload (the archive "
                                "itself is a valid snapshot: another one, or replaced)" % what)
        return index, term, state, "matches the %s at upload" % what


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


# =============================================================================
# 15. Storage backends
# =============================================================================


SnapshotRef = collections.namedtuple("SnapshotRef", "name when size")

Policy = collections.namedtuple("Policy", "retain retain_days frequency max_space")
Policy.__new__.__defaults__ = (0,)
# When a storage gets snapshots (every ``frequency`` seconds) and which it
# keeps (the newest ``retain``, none older than ``retain_days``, the newest
# that fit in ``max_space`` bytes; 0: no limit).


def xml_error(data, code=None):
    """(Code, first line of Message, parsed root or None) of an error answer
    in the XML shape S3 and Azure share; another body gives its start as
    the message; ``code`` is the one a header gave."""
    message = None
    root = parse_error_xml(data) if data.strip() else None
    if root is not None:
        code = xml_text(root, "Code") or code
        lines = [line for line in (xml_text(root, "Message") or "").splitlines() if line.strip()]
        message = lines[0].strip() if lines else None
    if message is None and data.strip() and (root is None or xml_text(root, "Code") is None):
        message = one_line(data[:200].decode("utf-8", "replace"))     # an HTML page, a proxy's text
    return code, message, root


def storage_error(service, action, resp, code, message, hint, retryable=False):
    """The one line every storage error reads as: ``S3 PutObject on KEY:
    HTTP 403 AccessDenied: what the service said (what to do)``; retryable
    on the statuses every service means so, or when the caller says."""
    text = "%s %s: HTTP %d %s%s%s" % (service, action, resp.status,
                                      printable(one_line(code or resp.reason or ""), 100),
                                      (": " + printable(one_line(message), 300)) if message else "",
                                      (" (%s)" % hint) if hint else "")
    return StorageError(text, retryable_status(resp.status) or retryable)


class Storage:
    """One place snapshots are kept. A subclass answers to one config key,
    declares its keys, and gets everything it uses through its constructor:
    its Policy, the Runtime (environment, clock, signals) and the settings
    ``--check-config`` shows.

    ``upload(snapshot, name, progress)`` stores the verified file (a
    SnapshotInfo: path, size, sha256) under ``name`` and returns its location
    for the log line; it leaves nothing half-written.
    ``list()`` returns SnapshotRefs for names this agent (or the Go agent)
    writes, and only those. ``delete(names)`` is idempotent. ``describe()``
    names the destination for logs, never a credential.
    """

    config_key = None
    kind = None
    aliases = ()        # short names for --storage (besides the config key)
    keys = STORAGE_POLICY_KEYS

    def __init__(self, policy, runtime, settings=None):
        self.retain, self.retain_days, self.frequency, self.max_space = policy
        self.env, self.clock, self.signals = runtime.env, runtime.clock, runtime.signals
        self.settings = settings or Settings()
        self.name = self.settings.get("name") or self.kind
        self.file_prefix = self.settings.get("file_prefix") or DEFAULT_FILE_PREFIX
        self.verify_frequency = self.settings.get("verify_frequency") or 0.0
        self.verify_scope = self.settings.get("verify_scope") or "latest"

    def new_name(self, when):
        """The name of this block's snapshot taken at ``when``."""
        return snapshot_name(when, self.file_prefix)

    def parse_name(self, name):
        """The time in ``name`` when it is one of this block's snapshot
        names (its own ``file_prefix`` exactly), else None."""
        return parse_snapshot_name(name, self.file_prefix)

    def label(self):
        """The storage in log lines: its location, after its name when the
        block has one of its own (a single block of a kind keeps the lines
        it always had)."""
        return self.describe() if self.name == self.kind else "%s (%s)" % (self.name, self.describe())

    @classmethod
    def read(cls, section, top, warn, name=None):
        """The block's Settings: every key of ``keys`` read (the policy keys
        and ``file_prefix`` default to the global ones in ``top``, ``name``
        to ``name`` or the kind), then checked together and completed by
        ``complete``. ConfigError naming the key otherwise."""
        inherited = dict((key, top[key]) for key in Policy._fields + (
            "file_prefix", "verify_frequency", "verify_scope"))
        inherited["name"] = name or cls.kind
        values = read_block(section, cls.keys, inherited)
        cls.complete(section, values, warn)
        return Settings(values, section.sources, section.prefix.rstrip("."))

    @classmethod
    def place(cls, settings):
        """Where the block's snapshots go, as one text: two blocks with the
        same place would delete each other's snapshots (refused at load)."""
        raise NotImplementedError

    @classmethod
    def complete(cls, section, values, warn):
        """Check the block's values together and fill in what they imply
        (a region, an endpoint, an auth mode), so that ``--check-config``
        shows the effective values; ``warn`` takes a warning line."""

    @classmethod
    def from_settings(cls, settings, cfg, runtime):
        """The backend for a block's Settings (see ``read``), with the
        clients and credential sources it needs. ConfigError when a
        credential file cannot be used."""
        raise NotImplementedError

    @staticmethod
    def policy_of(settings):
        return Policy(*(settings[name] for name in Policy._fields))

    def backoff(self, seconds):
        """Wait before a retry; raises Stopped as soon as a stop is requested."""
        self.signals.check()
        self.signals.wait(seconds, wake_on_reload=False)
        self.signals.check()

    # Retry policy of send(): attempts and the first backoff (equal jitter, doubling, 20 s
    # cap; a longer Retry-After of the answer wins, up to MAX_RETRY_AFTER).
    attempts = 5
    backoff_base = 0.5
    service = "storage"

    def send(self, action, build, ok, error_from, sink=None, resync=None, cleanup=False):
        """One storage request with retries; returns (Response, body bytes).

        ``build()`` returns (method, url, headers, body) afresh for each
        attempt, so signatures, dates and file slices are new on a retry.
        ``error_from(resp, data, action)`` turns an answer outside ``ok`` into
        a StorageError whose ``retryable`` says whether to try again;
        connection failures retry when the transport says so. With ``sink``
        (an open binary file) a successful body is streamed into it instead
        of being returned. ``resync()``, if given, runs before each retry (a
        resumable upload asks its session where to go on); when it returns a
        (Response, body) pair, the request's work is already done and that
        is the result.
        """
        delays = backoff_delays(self.attempts, self.backoff_base, 20.0)
        for attempt in range(self.attempts):
            method, url, headers, body = build()
            wanted = None        # the server's Retry-After, seconds
            try:
                resp = self.http.request(method, url, headers, body, cleanup=cleanup)
                with resp:
                    wanted = retry_after(resp.header("Retry-After"), self.clock.now())
                    if sink is not None and resp.status in ok:
                        sink.seek(0)
                        sink.truncate()
                        copy_stream(resp.read1 if getattr(sink, "incremental", False) else resp.read,
                                    sink.write, self.signals)
                        return resp, b""
                    data = resp.body(MAX_JSON_BYTES)
                    if resp.status in ok:
                        return resp, data
                    error = error_from(resp, data, action)
            except TransportError as exc:
                error = StorageError("%s %s: %s" % (self.service, action, exc), exc.retryable)
            if not error.retryable or attempt == self.attempts - 1:
                raise error
            delay = max(delays[attempt], wanted or 0.0)
            LOG.warning("%s, %s %.1fs (retry %d/%d)", error, "asking the session how much it has after"
                        if resync else "retrying in", delay, attempt + 1, self.attempts - 1)
            self.backoff(delay)
            done = resync() if resync is not None else None
            if done is not None:
                return done

    @staticmethod
    def sent_copy(read):
        """Settles a NameClash: ``read()`` looks at the object of the taken
        name and returns something true (its metadata) when it is the very
        object this agent sent, written by an attempt whose answer was lost;
        else None. A store that cannot show it (no read right, or it is gone
        again) gives None too: the clash stands, never a failed upload."""
        try:
            return read() or None
        except StorageError:
            return None

    def prepare(self):
        """Called at the start of each cycle (e.g. to remove crash leftovers)."""

    def upload(self, snapshot, name, progress=None):
        raise NotImplementedError

    def list(self):
        raise NotImplementedError

    def delete(self, names):
        """Delete ``names``; returns those left in place because the store
        locks them (an immutability or retention policy), [] otherwise."""
        raise NotImplementedError

    def describe(self):
        raise NotImplementedError

    def retention_off(self):
        """Why this storage applies no retention (a text), else None."""
        return None

    def route(self):
        """(URL, Http) of the server this storage talks to (None for a
        directory): for the proxy and TLS lines of --check-config."""
        http = getattr(self, "http", None)
        return (self.describe_endpoint(), http) if http is not None else None

    def describe_endpoint(self):
        return getattr(self, "endpoint", None)

    def probe(self):
        """``doctor``'s write test: put a small object (a name no listing of
        snapshots ever takes) where snapshots go, read it back, delete it;
        returns what was done, StorageError naming the step that failed."""
        blocked = self.probe_blocked()
        if blocked:
            return "write test skipped: %s" % blocked
        name = ".vault-snapshot-agent-doctor-%s" % os.urandom(6).hex()
        data = ("written by %s doctor at %s\n" % (PROG, iso(self.clock.now()))).encode("ascii")
        try:
            version = self.probe_put(name, data)
        except StorageError as exc:
            raise StorageError("write: %s" % exc) from exc
        problems, got = [], None
        try:
            got = self.probe_get(name)
        except StorageError as exc:
            problems.append("read back: %s" % exc)
        try:
            note = self.probe_delete(name, version)
        except StorageError as exc:
            problems.append("delete (%s is left behind): %s" % (self.full_name(name), exc))
        if problems:
            raise StorageError("; then ".join(problems))
        if got != data:
            raise StorageError("read back %d bytes that differ from the %d written" % (len(got), len(data)))
        return "wrote, read back and deleted %s%s" % (self.full_name(name), note or "")

    def probe_blocked(self):
        """Why a probe object must not be written (it could not be deleted), or None."""
        return None

    def probe_put(self, name, data):
        """Write the probe; returns its version id where the store keeps versions."""
        raise NotImplementedError

    def probe_get(self, name):
        raise NotImplementedError

    def probe_delete(self, name, version=None):
        """Delete the probe (that version); returns a note for the ok line, or None."""
        raise NotImplementedError

    def emptiness(self):
        """Why a listing found nothing, for the message that says so."""
        return "no snapshot named %s-<time>.snap there" % self.file_prefix

    # Object stores keep snapshots under an optional "folder" prefix.
    prefix = ""
    static_name = None      # one fixed object name instead of dated ones (S3 only)

    # Whether an upload keeps this agent's SHA-256 with the object (a local
    # filesystem without user xattrs cannot): a re-verification then expects it.
    records_sha256 = True

    def full_name(self, name):
        """The object name of snapshot ``name`` under the prefix."""
        return "%s/%s" % (self.prefix, name) if self.prefix else name

    def list_prefix(self):
        return self.prefix + "/" if self.prefix else ""

    def snapshot_ref(self, full, size):
        """A SnapshotRef for a listed object when it is one of ours directly
        under the prefix (not in a deeper "folder"), else None."""
        prefix = self.list_prefix()
        name = full[len(prefix):]
        if not full.startswith(prefix) or "/" in name:
            return None
        when = self.parse_name(name)
        return SnapshotRef(name, when, parse_listed_size(size)) if when is not None else None

    def pages(self, fetch, what, token_name):
        """The items of a paged listing. ``fetch(token)`` returns (items, next
        token or None). A server that repeats a token, or pages on past
        MAX_LIST_PAGES, fails the listing instead of looping forever, and a
        stop request is honoured between pages."""
        seen, token = set(), None
        for _ in range(MAX_LIST_PAGES):
            if self.signals is not None:
                self.signals.check()
            items, token = fetch(token)
            for item in items:
                yield item
            if not token:
                return
            digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
            if digest in seen:
                raise StorageError("%s: the server repeated its %s %s; listing abandoned"
                                   % (what, token_name, printable(token, 40)))
            seen.add(digest)
        raise StorageError("%s: more than %d pages; listing abandoned" % (what, MAX_LIST_PAGES))

    def download(self, name, sink):
        """Write snapshot ``name`` into the open binary file ``sink``."""
        raise NotImplementedError

    def read_back(self, name, check):
        """Read snapshot ``name`` into ``check`` (a StoredCheck), after
        telling it (``check.expect``) the checksum the store recorded when
        the object was written, taken from the very version read: a
        re-verification. Raises StorageError when it cannot be read."""
        check.expect(None)
        self.download(name, check)

    def staging_dir(self):
        """A directory where staging the download makes upload() cheap, or None."""
        return None


def _object_place(scheme, endpoint, container, prefix, file_prefix):
    """The place of an object store block (see Storage.place): endpoint host
    in lower case, "folder" without surrounding slashes."""
    parts = urllib.parse.urlsplit(endpoint)
    prefix = prefix.strip("/")
    netloc = parts.netloc.lower()
    default_port = {"https": ":443", "http": ":80"}.get(parts.scheme)
    if default_port and netloc.endswith(default_port):
        netloc = netloc[:-len(default_port)]
    return "%s://%s/%s (at %s://%s%s, file_prefix %s)" % (
        scheme, container, prefix + "/" if prefix else "", parts.scheme, netloc,
        parts.path.rstrip("/"), file_prefix)


def _unique_refs(storage, items):
    """SnapshotRefs for the (name, size) pairs of a listing that are our
    snapshots, each name once."""
    refs = collections.OrderedDict()
    for name, size in items:
        ref = storage.snapshot_ref(name, size) if isinstance(name, str) else None
        if ref is not None:
            refs[ref.name] = ref
    return list(refs.values())


def copy_stream(read, write, signals, size=CHUNK_SIZE):
    """Copy ``read(size)`` chunks to ``write`` until EOF, checking for a stop
    between chunks; returns the bytes copied."""
    total = 0
    while True:
        signals.check()
        chunk = read(size)
        if not chunk:
            return total
        write(chunk)
        total += len(chunk)


class _FileSlice:
    """Iterate ``length`` bytes of ``path`` from ``offset`` in chunks, checking
    for a stop between chunks (http.client sends an iterable chunk by chunk).
    ``tap(position, chunk)``, if given, sees every chunk read.

    The chunks are views of one UPLOAD_CHUNK buffer, refilled for the next
    one: a consumer uses each before asking for the next (http.client sends
    it, a hash takes it) and keeps none. That is one buffer per part in
    flight instead of a fresh one per read, which glibc's per-thread arenas
    would keep (a 500 MB S3 upload, 4 threads: 42 MB peak RSS before, 37 MB
    now). Smaller chunks saved 2 MB more but slowed the GCS and Azure
    emulators by 15 %: they read what arrives in smaller pieces."""

    def __init__(self, path, offset, length, stop_check, progress=None, tap=None):
        self.path, self.offset, self.length, self.stop_check = path, offset, length, stop_check
        self.progress, self.tap = progress, tap

    def __iter__(self):
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(self.offset)
            position, left = self.offset, self.length
            view = memoryview(bytearray(min(UPLOAD_CHUNK, max(left, 1))))
            while left > 0:
                self.stop_check()
                count = handle.readinto(view[:min(len(view), left)])
                if not count:
                    raise StorageError("%s shrank while uploading" % self.path)
                chunk = view[:count]
                if self.tap is not None:
                    self.tap(position, chunk)
                position += len(chunk)
                left -= len(chunk)
                if self.progress is not None:
                    self.progress.add(len(chunk))
                yield chunk

    def digest(self, algorithm="sha256"):
        """Hash the slice (one read pass); returns the hashlib object."""
        digest = new_hash(algorithm)
        for chunk in self:
            digest.update(chunk)
        return digest


class _RunningHash:
    """Hash a file from the chunks an upload reads anyway, in file order: a
    chunk read again (a retry, a resumed session) is skipped where already
    hashed, and so is one read out of order (parts in parallel).
    ``digest(path, size, check)`` reads only what no upload covered."""

    def __init__(self, algorithm):
        self.hash, self.done = new_hash(algorithm), 0
        self._lock = threading.Lock()      # upload workers call it at once

    def __call__(self, position, chunk):
        end = position + len(chunk)
        with self._lock:
            if position <= self.done < end:
                self.hash.update(chunk[self.done - position:])
                self.done = end

    def digest(self, path, size, check):
        if self.done < size:
            for chunk in _FileSlice(path, self.done, size - self.done, check):
                self.hash.update(chunk)
            self.done = size
        return self.hash.digest()


def run_parts(parts, worker, concurrency, signals):
    """Call ``worker(check, *part)`` for every part, ``concurrency`` at a time.

    Returns the results in the order of ``parts``. On the first failure or a
    stop request, parts not started are cancelled and running ones see
    ``check()`` raise at their next chunk; then the error is raised, so the
    caller can abort the upload as a whole.
    """
    import concurrent.futures
    failed = []

    def check():
        signals.check()
        if failed:
            raise StorageError("upload abandoned after another part failed")

    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(parts)))) as pool:
        with signals_blocked():     # the pool's threads start on submit
            pending = dict((pool.submit(worker, check, *part), index)
                           for index, part in enumerate(parts))
        try:
            while pending:
                finished, _ = concurrent.futures.wait(
                    list(pending), timeout=0.5, return_when=concurrent.futures.FIRST_EXCEPTION)
                for future in finished:
                    results[pending.pop(future)] = future.result()
                signals.check()
        except BaseException:
            failed.append(True)
            for future in pending:
                future.cancel()
            raise
    return [results[i] for i in range(len(parts))]


def register_storage(cls):
    """Class decorator: make ``cls`` answer to its ``config_key`` (see
    STORAGE_TYPES)."""
    STORAGE_TYPES[cls.config_key] = cls
    return cls


def build_storages(cfg, runtime):
    """The storage backends of ``cfg``'s blocks, in registry order. Raises
    ConfigError."""
    return [cls.from_settings(settings, cfg, runtime) for cls, settings in cfg.storages]


# =============================================================================
# 16. Local storage
# =============================================================================


@register_storage
class LocalStorage(Storage):
    """A local directory. Files are 0600, written under a hidden temporary
    name and renamed (or hard-linked from the staged download) into place, so
    a reader never sees a partial snapshot."""

    config_key = "local_storage"
    kind = "local"
    aliases = ("local",)
    keys = (Key("path", "path", required=True, doc="directory for snapshots (created 0700 if missing)"),
            ) + STORAGE_POLICY_KEYS

    def __init__(self, path, policy, runtime, settings=None):
        Storage.__init__(self, policy, runtime, settings)
        self.path = path

    @classmethod
    def complete(cls, section, values, warn):
        path = values["path"]
        if os.path.exists(path) and not os.path.isdir(path):
            raise section.error("path", "%s exists and is not a directory" % path)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            mode = 0
        if mode & 0o022:
            warn("%s: %s is writable by %s (mode %04o): anyone there could plant or replace "
                 "snapshot names; chmod 700 %s" % (
                     section.name("path"), path, "group and others" if mode & 0o022 == 0o022 else
                     "others" if mode & 0o002 else "group", mode, path))
        values["path"] = os.path.abspath(path)

    @classmethod
    def from_settings(cls, settings, cfg, runtime):
        return cls(settings["path"], cls.policy_of(settings), runtime, settings)

    @classmethod
    def place(cls, settings):
        return "directory %s (file_prefix %s)" % (os.path.realpath(settings["path"]),
                                                  settings["file_prefix"])

    def describe(self):
        return "local:%s" % self.path

    def staging_dir(self):
        return self.path

    def full_name(self, name):
        return os.path.join(self.path, name)

    def probe_put(self, name, data):
        self._ensure_dir()
        try:
            fd = os.open(self.full_name(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        except OSError as exc:
            raise StorageError("cannot write %s: %s" % (self.full_name(name), exc.strerror)) from exc

    def probe_get(self, name):
        try:
            with open_regular(self.full_name(name)) as handle:
                return read_at_most(handle, 4096)
        except OSError as exc:
            raise StorageError("cannot read %s: %s" % (self.full_name(name), exc.strerror)) from exc

    def probe_delete(self, name, version=None):
        try:
            os.unlink(self.full_name(name))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise StorageError("cannot delete %s: %s" % (self.full_name(name), exc.strerror)) from exc

    def emptiness(self):
        if not os.path.isdir(self.path):
            return "the directory %s does not exist (yet: the first snapshot creates it)" % self.path
        return Storage.emptiness(self)

    def _ensure_dir(self):
        try:
            os.makedirs(self.path, 0o700)
            LOG.info("Created snapshot directory %s", self.path)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise StorageError("cannot create %s: %s" % (self.path, exc.strerror)) from exc

    def prepare(self):
        """Remove staging files left by a crashed run of this host."""
        self._ensure_dir()
        host = temp_name().split("-")[1]
        try:
            names = os.listdir(self.path)
        except OSError as exc:
            raise StorageError("cannot list %s: %s" % (self.path, exc.strerror)) from exc
        for name in names:
            match = TEMP_NAME_RE.match(name)
            if not match or match.group("host") != host[:40]:
                continue
            pid = int(match.group("pid"))
            if pid != os.getpid() and pid_alive(pid):
                continue
            _unlink_quietly(os.path.join(self.path, name))
            LOG.info("Removed leftover temporary file %s", os.path.join(self.path, name))

    def upload(self, snapshot, name, progress=None):
        path = snapshot.path
        self._ensure_dir()
        final = os.path.join(self.path, name)
        if os.path.lexists(final):
            raise NameClash("%s already exists; not overwriting" % final)
        try:
            os.link(path, final)        # same filesystem: atomic, zero-copy, never replaces
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise NameClash("%s already exists; not overwriting" % final) from exc
            self._copy(path, final)
        else:
            try:
                os.chmod(final, 0o600)
            except OSError as exc:
                raise StorageError("cannot make %s private: %s" % (final, exc.strerror)) from exc
        self.records_sha256 = _record_sha256(final, snapshot.sha256)
        fsync_dir(self.path)
        return final

    def _copy(self, source, final):
        temp = os.path.join(self.path, temp_name())
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                while True:
                    self.signals.check()
                    chunk = src.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            _place(temp, final)
        except OSError as exc:
            _unlink_quietly(temp)
            if exc.errno == errno.EEXIST:
                raise NameClash("%s already exists; not overwriting" % final) from exc
            raise StorageError("cannot write %s: %s" % (final, exc.strerror or exc)) from exc
        except BaseException:
            _unlink_quietly(temp)
            raise

    def download(self, name, sink):
        try:
            with open(os.path.join(self.path, name), "rb") as src:
                copy_stream(src.read, sink.write, self.signals)
        except OSError as exc:
            raise StorageError("cannot read %s: %s" % (os.path.join(self.path, name),
                                                        exc.strerror or exc)) from exc

    def read_back(self, name, check):
        path = os.path.join(self.path, name)
        try:
            with open_regular(path) as src:
                info = os.fstat(src.fileno())
                # no "written" time: a chown, cp or restore of the directory changes
                # ctime, and old snapshots without the xattr would all read as replaced
                check.expect(_local_recorded(src.fileno(), info.st_size))
                copy_stream(src.read, check.write, self.signals)
        except OSError as exc:
            raise StorageError("cannot read %s: %s" % (path, exc.strerror or exc)) from exc

    def list(self):
        try:
            names = os.listdir(self.path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return []           # not created yet: no snapshots
            raise StorageError("cannot list %s: %s" % (self.path, exc.strerror)) from exc
        refs = []
        for name in names:
            when = self.parse_name(name)
            if when is None:
                continue
            full = os.path.join(self.path, name)
            try:
                info = os.lstat(full)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                refs.append(SnapshotRef(name, when, info.st_size))
        return refs

    def delete(self, names):
        for name in names:
            if self.parse_name(name) is None:
                raise StorageError("refusing to delete %r: not a snapshot name of this block" % name)
            try:
                os.unlink(os.path.join(self.path, name))
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise StorageError("cannot delete %s: %s"
                                       % (os.path.join(self.path, name), exc.strerror)) from exc
        if names:
            fsync_dir(self.path)


LOCAL_SHA256_XATTR = "user.vault_snapshot_agent.sha256"
# The SHA-256 of a local snapshot, kept with the file (an extended attribute:
# it follows the inode through renames and in-place writes, cp -a and rsync -X)
# so that a re-verification tells the file written from another valid snapshot
# put in its place. Filesystems without user xattrs keep the archive check only.


def _record_sha256(path, sha256):
    """Keep ``sha256`` with the file; False when the filesystem cannot."""
    if not sha256:
        return False
    try:
        os.setxattr(path, LOCAL_SHA256_XATTR, sha256.encode("ascii"))
        return True
    except (OSError, AttributeError) as exc:      # no user xattrs here (or not Linux)
        LOG.debug("Cannot record the SHA-256 of %s in an xattr: %s", path, exc)
        return False


def _local_recorded(fd, size):
    """The Recorded SHA-256 of the open file ``fd``, or None."""
    try:
        value = os.getxattr(fd, LOCAL_SHA256_XATTR)
    except (OSError, AttributeError):
        return None
    return own_record(value[:100], size)


def _place(temp, final):
    """Give ``temp`` the name ``final`` without replacing a file another
    agent put there meanwhile (a hard link fails with EEXIST; rename would
    replace it). Filesystems without hard links get the rename."""
    try:
        os.link(temp, final)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
            raise
        if os.path.lexists(final):
            raise OSError(errno.EEXIST, "File exists") from exc
        os.rename(temp, final)
        return
    _unlink_quietly(temp)


# =============================================================================
# 17. S3 storage
# =============================================================================


S3_MAX_PARTS = 10000
S3_DELETE_BATCH = 1000
S3_RETRYABLE_CODES = ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable")
S3_LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")

S3_HINTS = {
    "SignatureDoesNotMatch": "the secret access key does not match the access key id",
    "InvalidAccessKeyId": "the access key id is unknown to this endpoint",
    "InvalidToken": "the session token is invalid or expired",
    "ExpiredToken": "the session token has expired",
    "RequestTimeTooSkewed": "this host's clock is off: check NTP",
    "NoSuchBucket": "the bucket does not exist (check s3_bucket and s3_endpoint)",
    "AccessDenied": "the credentials are not allowed to do this",
    "InvalidBucketName": "check s3_bucket",
    "KMS.NotFoundException": "the KMS key does not exist",
}


def _s3_error(resp, data, action):
    """StorageError (retryable where S3 says so) from an S3 error answer."""
    code, message, root = xml_error(data)
    region = resp.header("x-amz-bucket-region") or (
        root is not None and (xml_text(root, "Region") or xml_text(root, "BucketRegion"))) or None
    hint = S3_HINTS.get(code or "", "")
    if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException") \
            or (resp.status == 301 and region):
        hint = "the bucket is in region %s: set s3_region to it" % (region or "another region")
    if code == "AccessDenied":
        hint = "the credentials are not allowed to %s" % action
    if code == "InvalidRequest" and re.search(r"Object ?Lock", message or ""):
        hint = ("s3_object_lock_mode needs a bucket created with Object Lock enabled; "
                "create one or remove s3_object_lock_mode")
    return storage_error("S3", action, resp, code, message, hint, code in S3_RETRYABLE_CODES)


def _s3_code(data):
    return xml_error(data)[0]


def _s3_code_in(error, code):
    """Whether a StorageError from _s3_error carries S3 error ``code``."""
    return re.search(r"HTTP \d+ %s\b" % re.escape(code), str(error)) is not None


def _s3_write_error(resp, data, action):
    """_s3_error for a write with If-None-Match: * : 412 means the name is
    taken (NameClash); 409 ConditionalRequestConflict (another conditional
    write of that name in progress) is worth another try."""
    code = _s3_code(data)
    if resp.status == 412 or code == "PreconditionFailed":
        return NameClash("S3 %s: the name is taken (HTTP 412 PreconditionFailed: another writer "
                         "stored it first); nothing was overwritten" % action)
    error = _s3_error(resp, data, action)
    if resp.status == 409 and code == "ConditionalRequestConflict":
        error.retryable = True
    return error


S3Expected = collections.namedtuple("S3Expected", "size etag checksum")
# What an object we wrote must look like: its size, its ETag as S3 computes it
# (the body's MD5, or "<MD5 of the parts' MD5s>-N"; None if unknown) and its
# x-amz-checksum-sha256 (base64, "-N" for a multipart's composite; or None).


def _s3_md5_hidden(resp, sse):
    """Whether the ETag of an answer cannot be an MD5 of the body: SSE-KMS
    (asked for, or the bucket's default) and SSE-C objects."""
    answered = resp.header("x-amz-server-side-encryption") or ""
    return (sse in ("aws:kms", "aws:kms:dsse") or answered.startswith("aws:kms")
            or bool(resp.header("x-amz-server-side-encryption-customer-algorithm")))


def _s3_etag(resp):
    return (resp.header("ETag") or "").strip().strip('"')


def _s3_multipart_expected(size, done):
    """S3Expected of a multipart object from its parts' (number, ETag,
    base64 SHA-256 or None), as S3 composes them."""
    etags = [etag.strip().strip('"') for _, etag, _ in done]
    etag = None
    if all(re.match(r"\A[0-9a-fA-F]{32}\Z", e) for e in etags):
        joined = b"".join(bytes.fromhex(e) for e in etags)
        etag = "%s-%d" % (new_hash("md5", joined).hexdigest(), len(done))
    checksum = None
    if done and all(c for _, _, c in done):
        joined = b"".join(base64.b64decode(c) for _, _, c in done)
        checksum = "%s-%d" % (base64.b64encode(hashlib.sha256(joined).digest()).decode("ascii"),
                              len(done))
    return S3Expected(size, etag, checksum)


def _s3_lock(section, values):
    """Object Lock for new objects: both keys or neither, the mode in capitals."""
    mode, days = values["s3_object_lock_mode"], values["s3_object_lock_days"]
    if bool(mode) != bool(days):
        raise section.error("s3_object_lock_days" if mode else "s3_object_lock_mode",
                            "s3_object_lock_mode and s3_object_lock_days go together")
    if mode and not values["s3_checksum"]:
        raise section.error("s3_checksum", "must stay on with s3_object_lock_mode (S3 requires a "
                                           "checksum on locked writes)")
    if mode and mode.upper() not in S3_LOCK_MODES:
        raise section.error("s3_object_lock_mode", "must be GOVERNANCE or COMPLIANCE, got %r" % mode)
    if mode:
        values["s3_object_lock_mode"] = mode.upper()


def _s3_sse(section, values):
    """The server-side encryption header value, from the Go agent's boolean
    or a name; a KMS key alone means aws:kms."""
    given, kms_key_id = values["s3_server_side_encryption"], values["s3_kms_key_id"]
    if given in (None, False):
        sse = "aws:kms" if kms_key_id else None
    elif given is True:
        sse = "aws:kms" if kms_key_id else "AES256"
    elif given in ("AES256", "aws:kms", "aws:kms:dsse"):
        sse = given
    else:
        raise section.error("s3_server_side_encryption",
                            "must be true/false, \"AES256\" or \"aws:kms\", got %r" % (given,))
    if kms_key_id and sse == "AES256":
        raise section.error("s3_kms_key_id", "conflicts with s3_server_side_encryption \"AES256\"")
    return sse


@register_storage
class S3Storage(Storage):
    """AWS S3 and S3-compatible stores (MinIO, Ceph RGW, ...), signed with SigV4.

    Single PUT up to ``part_size``, multipart above it (parts streamed from
    the file, uploaded ``concurrency`` at a time, aborted on failure or stop).
    Every request is signed over the payload's SHA-256, so the store checks
    integrity; what it answers (checksum echo, else the ETag) is checked
    against what was sent. Writes carry If-None-Match: * (except the static
    name), so a name another agent took is NameClash, never overwritten.
    Retention lists with ListObjectsV2 pages and deletes in batches
    with DeleteObjects (single DELETEs where a store lacks it).
    """

    config_key = "aws_storage"
    kind = "aws"
    aliases = ("aws", "s3")
    service = "S3"
    keys = (
        Key("s3_bucket", "name", required=True,
            pattern=(r"\A[A-Za-z0-9][A-Za-z0-9._-]{1,254}\Z", "bucket name"), doc="bucket"),
        Key("s3_region", "name", env=("AWS_REGION", "AWS_DEFAULT_REGION"),
            default_doc="the profile's `region`, `us-east-1`", doc="signing region"),
        Key("s3_endpoint", "url", env=("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            default_doc="`https://s3.<region>.amazonaws.com`",
            doc="for MinIO/Ceph/...: `https://minio.example:9000`"),
        Key("s3_force_path_style", "bool", False,
            doc="path-style URLs; automatic for IP/localhost and one-word (`http://minio:9000`) "
                "endpoints and dotted bucket names"),
        Key("s3_key_prefix", "str", "raft_snapshots", doc="\"folder\" for the objects"),
        Key("s3_server_side_encryption", "any", False,
            doc="`true` or `\"AES256\"` (SSE-S3), `\"aws:kms\"` (SSE-KMS), `\"aws:kms:dsse\"`"),
        Key("s3_kms_key_id", "name", doc="KMS key id/ARN/alias; implies `aws:kms`"),
        Key("s3_storage_class", "name", doc="e.g. `STANDARD_IA`, `GLACIER_IR`"),
        Key("s3_static_snapshot_name", "str",
            doc="always write `<prefix>/<name>.snap` (overwritten; no retention)"),
        Key("s3_checksum", "bool", True,
            doc="send `x-amz-checksum-sha256` (turn off for stores that reject it)"),
        Key("s3_object_lock_mode", "name",
            doc="`GOVERNANCE` or `COMPLIANCE` (any case): every new object is locked (Object Lock), "
                "so these credentials cannot destroy it; needs `s3_object_lock_days` and a bucket "
                "with Object Lock"),
        Key("s3_object_lock_days", "int", minimum=1, maximum=MAX_RETAIN_DAYS,
            doc="days each new object stays locked"),
        Key("access_key_id", "name", doc="static credentials (else the chain below)"),
        Key("secret_access_key", "secret", doc="goes with `access_key_id`"),
        Key("session_token", "secret", doc="for temporary static credentials"),
        Key("profile", "name", env=("AWS_PROFILE",),
            doc="profile in `~/.aws/credentials` / `~/.aws/config` (static keys, `role_arn` with "
                "`source_profile` or `credential_source`, `credential_process`)"),
        Key("role_arn", "name",
            doc="assume this role (STS AssumeRole) with the credentials found: e.g. a backup "
                "account's bucket; refreshed before it expires"),
        Key("external_id", "name", doc="the role's external id, if its trust policy wants one"),
        Key("role_session_name", "name", default_doc="`vault-snapshot-agent-<host>`",
            doc="session name, seen in CloudTrail"),
        Key("role_duration", "duration", "1h", minimum=900.0, doc="assumed credentials' lifetime "
            "(15m to 12h, within the role's maximum)"),
        Key("part_size_mb", "int", 16, minimum=5, maximum=5120,
            doc="multipart part size (grown automatically so any file fits in 10,000 parts); "
                "files up to it go in one PUT"),
        Key("concurrency", "int", 4, minimum=1, maximum=64, doc="parts uploaded at once"),
    ) + tls_keys(ca_env=("AWS_CA_BUNDLE",)) + (
        Key("imds_endpoint", "str", DEFAULT_IMDS_ENDPOINT, env=("AWS_EC2_METADATA_SERVICE_ENDPOINT",),
            doc="EC2 instance metadata (tests use loopback)"),
        Key("container_endpoint", "str", DEFAULT_CONTAINER_ENDPOINT,
            doc="container credentials for a relative URI"),
        Key("sts_endpoint", "str", env=("AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL"),
            default_doc="`https://sts.<region>.amazonaws.com`", doc="STS, for web identity"),
    ) + STORAGE_POLICY_KEYS

    def __init__(self, bucket, prefix, region, endpoint, path_style, chain, http, policy, runtime,
                 settings=None, sse=None, kms_key_id=None, storage_class=None, static_name=None,
                 part_size=16 * 1024 * 1024, concurrency=4, attempts=5, checksum=True, lock=None):
        Storage.__init__(self, policy._replace(retain=0) if static_name else policy, runtime, settings)
        self.bucket, self.prefix, self.region = bucket, prefix, region
        self.endpoint = endpoint
        self.path_style = path_style
        self.chain, self.http = chain, http
        self.sse, self.kms_key_id, self.storage_class = sse, kms_key_id, storage_class
        self.static_name = static_name
        self.part_size, self.concurrency = part_size, concurrency
        self.attempts = attempts
        self.checksum = checksum
        self.lock = lock            # (mode, days) or None
        self.backoff_base = 0.5
        parts = urllib.parse.urlsplit(endpoint)
        self._scheme = parts.scheme
        self._host = parts.netloc if path_style else "%s.%s" % (bucket, parts.netloc)
        self._base_path = parts.path.rstrip("/")

    @classmethod
    def complete(cls, section, values, warn):
        profile, env = values["profile"], section.env
        conf_file = env.get("AWS_CONFIG_FILE") or expand_home("~/.aws/config", env)
        values["s3_region"] = region = (values["s3_region"] or read_ini_section(
            conf_file, "profile " + profile if profile and profile != "default" else "default"
        ).get("region") or "us-east-1")
        values["s3_endpoint"] = values["s3_endpoint"] or "https://s3.%s.amazonaws.com" % region
        values["sts_endpoint"] = values["sts_endpoint"] or "https://sts.%s.amazonaws.com" % region
        values["s3_server_side_encryption"] = _s3_sse(section, values)
        key_id, secret = values["access_key_id"], values["secret_access_key"]
        if bool(key_id) != bool(secret):
            raise section.error("secret_access_key" if key_id else "access_key_id",
                                "access_key_id and secret_access_key go together")
        if values["role_arn"]:
            if values["role_duration"] > 43200:
                raise section.error("role_duration", "must be at most 12h")
            values["role_session_name"] = values["role_session_name"] or default_session_name()
        _s3_lock(section, values)
        storage_tls(values, values["s3_endpoint"])

    @classmethod
    def from_settings(cls, settings, cfg, runtime):
        bucket, region, endpoint = settings["s3_bucket"], settings["s3_region"], settings["s3_endpoint"]
        host = urllib.parse.urlsplit(endpoint).hostname or ""
        path_style = (settings["s3_force_path_style"] or _is_ip_or_localhost(host)
                      or "." not in host       # docker-compose's "minio": bucket.minio cannot resolve
                      or ("." in bucket and endpoint.startswith("https")))
        key_id = settings["access_key_id"]
        static = (AwsCredentials(key_id, settings["secret_access_key"], settings["session_token"],
                                 None, "%s keys" % (settings.block or cls.config_key)) if key_id else None)
        role = None
        if settings["role_arn"]:
            role = AwsRole(settings["role_arn"], settings["external_id"],
                           settings["role_session_name"], settings["role_duration"])
        proxy = storage_proxy(settings, runtime, settings.block or cls.config_key)
        chain = AwsCredentialChain(static, runtime.env, region, settings["profile"], Http(
            None, 5.0, proxy=proxy, deadline=cfg.request_timeout, signals=runtime.signals),
                                   runtime.clock, role=role, signals=runtime.signals,
                                   profile_given=settings.sources.get("profile") == "config",
                                   imds_endpoint=settings["imds_endpoint"],
                                   container_endpoint=settings["container_endpoint"],
                                   sts_endpoint=settings["sts_endpoint"])
        lock = settings["s3_object_lock_mode"]
        return cls(bucket, settings["s3_key_prefix"].strip("/"), region, endpoint, path_style, chain,
                   Http(storage_tls(settings, endpoint), cfg.timeout, proxy=proxy,
                        deadline=cfg.request_timeout, signals=runtime.signals),
                   cls.policy_of(settings), runtime, settings,
                   sse=settings["s3_server_side_encryption"], kms_key_id=settings["s3_kms_key_id"],
                   storage_class=settings["s3_storage_class"],
                   static_name=settings["s3_static_snapshot_name"],
                   part_size=settings["part_size_mb"] * 1024 * 1024,
                   concurrency=settings["concurrency"], checksum=settings["s3_checksum"],
                   lock=(lock, settings["s3_object_lock_days"]) if lock else None)

    @classmethod
    def place(cls, settings):
        static = settings["s3_static_snapshot_name"]
        if static:          # one object, whatever the file_prefix
            return _object_place("s3", settings["s3_endpoint"], settings["s3_bucket"],
                                 settings["s3_key_prefix"], "-") + " static name %s" % static
        return _object_place("s3", settings["s3_endpoint"], settings["s3_bucket"],
                             settings["s3_key_prefix"], settings["file_prefix"])

    def describe(self):
        return "s3://%s/%s" % (self.bucket, self.list_prefix())

    def key_for(self, name):
        """The key a new snapshot ``name`` is uploaded to. Only uploads use
        it: reads and deletes use the listed name's own key (full_name), so
        a static name can never turn a delete of an old snapshot into a
        delete of the object just written."""
        return self.full_name(self.static_name + SNAPSHOT_SUFFIX if self.static_name else name)

    def retention_off(self):
        if self.static_name:
            return "s3_static_snapshot_name replaces one object each time"
        return None

    # -- requests --------------------------------------------------------------

    def _path(self, key=None):
        path = self._base_path
        if self.path_style:
            path += "/" + uri_encode(self.bucket)
        return path + "/" + (uri_encode(key, safe="-_.~/") if key else "")

    def _request(self, method, action, key=None, query=(), headers=None, body=None,
                 payload_hash=EMPTY_SHA256, ok=(200,), sink=None, error_from=_s3_error, cleanup=False):
        """One SigV4-signed request with retries; returns (Response, body bytes)."""
        path = self._path(key)
        query_text = canonical_query(query)
        url = "%s://%s%s%s" % (self._scheme, self._host, path, ("?" + query_text) if query_text else "")

        def build():
            creds = self.chain.get()
            signed = sigv4_headers(method, self._host, path, query_text, headers or {},
                                   payload_hash, creds.access_key, creds.secret_key.reveal(),
                                   creds.token.reveal() if creds.token else None,
                                   self.region, "s3", self.clock.now())
            return method, url, signed, body() if callable(body) else body
        return self.send(action, build, ok, error_from, sink, cleanup=cleanup)

    def download(self, name, sink):
        key = self.full_name(name)
        self._request("GET", "GetObject on %s" % key, key, sink=sink)

    def describe_endpoint(self):
        return "%s://%s" % (self._scheme, self._host)

    def probe_blocked(self):
        if self.lock:
            return "Object Lock (%s, %d days) would keep the object" % self.lock
        return None

    def probe_put(self, name, data):
        key = self.full_name(name)
        headers = self._object_headers(None)
        headers["Content-Length"] = str(len(data))
        resp, _ = self._request("PUT", "PutObject on %s" % key, key, headers=headers, body=data,
                                payload_hash=hashlib.sha256(data).hexdigest())
        version = resp.header("x-amz-version-id")
        return version if version and version != "null" else None

    def probe_get(self, name):
        key = self.full_name(name)
        return self._request("GET", "GetObject on %s" % key, key)[1]

    def probe_delete(self, name, version=None):
        """In a versioned bucket the probe's version itself is deleted (no
        delete marker, no noncurrent version); without the right for that
        (s3:DeleteObjectVersion), a plain delete, and the line says what stays."""
        key = self.full_name(name)
        if version:
            try:
                self._request("DELETE", "DeleteObject (version) on %s" % key, key,
                              query=[("versionId", version)], ok=(200, 204, 404))
                return None
            except StorageError as exc:
                LOG.debug("Deleting the probe's version failed: %s", exc)
                self._request("DELETE", "DeleteObject on %s" % key, key, ok=(200, 204, 404))
                return (" (versioned bucket: a noncurrent version and a delete marker stay; "
                        "s3:DeleteObjectVersion would remove them)")
        self._request("DELETE", "DeleteObject on %s" % key, key, ok=(200, 204, 404))
        return None

    def read_back(self, name, check):
        """HEAD (with the checksum when ``s3_checksum``), then GET that very
        object (If-Match its ETag)."""
        key = self.full_name(name)
        mode = {"x-amz-checksum-mode": "ENABLED"} if self.checksum else {}
        head, _ = self._request("HEAD", "HeadObject on %s" % key, key, headers=mode)
        size = parse_listed_size(head.header("Content-Length")) or None
        check.expect(own_record(head.header("x-amz-meta-" + OWN_SHA256), size) or self._recorded(key, head),
                     parse_http_date(head.header("Last-Modified")))
        etag = head.header("ETag")
        self._request("GET", "GetObject on %s" % key, key, sink=check,
                      headers=dict(mode, **({"If-Match": etag} if etag else {})))

    def _recorded(self, key, head):
        """What S3 recorded of the object at ``key`` (from its HEAD): the
        SHA-256 checksum (whole, or a composite of parts), else the ETag
        when it is an MD5 (whole, or of parts); None when neither is."""
        size = parse_listed_size(head.header("Content-Length")) or None
        checksum = head.header("x-amz-checksum-sha256") if self.checksum else None
        etag = _s3_etag(head)
        if checksum:
            what, algorithm, value = "S3 x-amz-checksum-sha256", "sha256", checksum
        elif etag and not _s3_md5_hidden(head, self.sse):
            what, algorithm, value = "S3 ETag (MD5)", "md5", etag
        else:
            return Recorded("S3 size", None, None, size)
        whole, _, count = value.partition("-")
        if algorithm == "sha256" and not count and head.header("x-amz-checksum-type") != "FULL_OBJECT":
            count = etag.partition("-")[2]      # a HEAD may show a composite without its "-N"
        try:
            expected = (base64.b64decode(whole, validate=True) if algorithm == "sha256"
                        else bytes.fromhex(whole))
        except ValueError:
            expected = b""          # not what S3 writes: never matches
        if not count:
            return Recorded(what, algorithm, expected, size)
        if not count.isdigit() or not 0 < int(count) <= 10000:
            return Recorded(what, algorithm, b"", size)
        part_size = self._part_size(key, int(count), size)
        if part_size is None:
            LOG.debug("S3 %s: the part size of %s is unknown; the archive check only", what, key)
            return Recorded("S3 size", None, None, size)
        return Recorded(what + " of %s parts" % count, algorithm, expected, size, part_size, int(count))

    def _part_size(self, key, count, size):
        """The part size of a multipart object: part 1's size (HEAD
        ?partNumber=1), else the size this agent would choose."""
        try:
            head, _ = self._request("HEAD", "HeadObject part 1 of %s" % key, key,
                                    query=[("partNumber", "1")], ok=(200, 206))
            part = parse_listed_size(head.header("Content-Length"))
            if part >= S3_MIN_PART and (size is None or part < size) and -(-(size or 0) // part) == count:
                return part
        except StorageError as exc:
            LOG.debug("HEAD part 1 of %s: %s", key, exc)
        guess = s3_part_size(size or 0, self.part_size)
        return guess if size and -(-size // guess) == count else None

    def _object_headers(self, sha256):
        headers = {"Content-Type": "application/octet-stream"}
        if sha256:
            headers["x-amz-meta-" + OWN_SHA256] = sha256
        if self.sse:
            headers["x-amz-server-side-encryption"] = self.sse
        if self.kms_key_id:
            headers["x-amz-server-side-encryption-aws-kms-key-id"] = self.kms_key_id
        if self.storage_class:
            headers["x-amz-storage-class"] = self.storage_class
        if self.lock:
            until = self.clock.now() + datetime.timedelta(days=self.lock[1])
            headers["x-amz-object-lock-mode"] = self.lock[0]
            # S3 wants Content-MD5 or this on locked writes; the SHA-256 checksum goes along
            headers["x-amz-sdk-checksum-algorithm"] = "SHA256"
            headers["x-amz-object-lock-retain-until-date"] = until.astimezone(UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ")
        return headers

    # -- upload ------------------------------------------------------------------

    def upload(self, snapshot, name, progress=None):
        key = self.key_for(name)
        if snapshot.size <= self.part_size:
            self._put(snapshot, key, progress)
        else:
            self._multipart(snapshot, key, progress)
        return "s3://%s/%s" % (self.bucket, key)

    def _put(self, snapshot, key, progress):
        sha256 = snapshot.sha256 or _FileSlice(snapshot.path, 0, snapshot.size,
                                               self.signals.check).digest("sha256").hexdigest()
        md5 = _RunningHash("md5")          # of the bytes sent, for the ETag the store answers
        headers = self._object_headers(sha256)
        headers["Content-Length"] = str(snapshot.size)
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode("ascii") if self.checksum else None
        if checksum:
            headers["x-amz-checksum-sha256"] = checksum

        def expected():
            return S3Expected(snapshot.size, md5.digest(snapshot.path, snapshot.size,
                                                        self.signals.check).hex(), checksum)
        resp, _ = self._write("PUT", "PutObject on %s" % key, key, expected, headers=headers,
                              body=lambda: _FileSlice(snapshot.path, 0, snapshot.size,
                                                      self.signals.check, progress, tap=md5),
                              payload_hash=sha256)
        if resp is not None:
            self._check_put_answer(resp, key, expected())

    def _write(self, method, action, key, expected, **kwargs):
        """A write that never replaces an object: If-None-Match: * (unless
        s3_static_snapshot_name, a name meant to be replaced), 412 is
        NameClash. When an answer was lost (a 500 or a broken connection
        after the store acted) and the retry finds the name taken or the
        upload gone, the object there may be this one: HEAD it and compare
        it with ``expected()``; if it is ours, that is success (returns
        (None, b"")), else NameClash or the error."""
        if not self.static_name:
            kwargs["headers"]["If-None-Match"] = "*"
        body, tries = kwargs.pop("body"), []

        def counted():
            tries.append(1)
            return body() if callable(body) else body
        try:
            return self._request(method, action, key, body=counted, error_from=_s3_write_error,
                                 **kwargs)
        except StorageError as exc:
            lost = isinstance(exc, NameClash) or _s3_code_in(exc, "NoSuchUpload")
            if len(tries) < 2 or not lost:
                raise
            if self.sent_copy(lambda: self._holds(key, expected())):
                LOG.info("S3 %s: the answer was lost, but s3://%s/%s holds the object sent",
                         action, self.bucket, key)
                return None, b""
            if isinstance(exc, NameClash):
                raise
            raise StorageError("S3 %s: the upload is gone after a lost answer, and s3://%s/%s "
                               "does not hold the object sent" % (action, self.bucket, key)) from exc

    def _holds(self, key, expected):
        """Whether the object at ``key`` is the one sent (S3Expected): same
        size, and the same checksum (when the store shows one) or ETag
        (when it is an MD5 of the content)."""
        headers = {"x-amz-checksum-mode": "ENABLED"} if expected.checksum else {}
        resp, _ = self._request("HEAD", "HeadObject on %s" % key, key, headers=headers, ok=(200, 404))
        if resp.status != 200 or parse_listed_size(resp.header("Content-Length")) != expected.size:
            return False
        shown = resp.header("x-amz-checksum-sha256")
        if shown and expected.checksum:       # a composite's "-N" is not shown by every store
            return shown.partition("-")[0] == expected.checksum.partition("-")[0]
        return (expected.etag is not None and not _s3_md5_hidden(resp, self.sse)
                and _s3_etag(resp).lower() == expected.etag.lower())

    def _check_put_answer(self, resp, key, expected):
        """The store's answer to a PutObject must match what was sent: its
        echoed checksum, else its ETag (the body's MD5, unless encrypted
        with SSE-KMS or SSE-C)."""
        echoed = resp.header("x-amz-checksum-sha256")
        if expected.checksum and echoed:
            if echoed != expected.checksum:
                raise StorageError("S3 PutObject on %s: the store answered x-amz-checksum-sha256 %s "
                                   "for a body whose SHA-256 is %s: stored object not trusted"
                                   % (key, printable(echoed, 80), expected.checksum))
            return
        if _s3_md5_hidden(resp, self.sse):
            return
        etag = _s3_etag(resp)
        if etag.lower() != expected.etag:
            raise StorageError("S3 PutObject on %s: the store answered ETag %s for a body whose MD5 "
                               "is %s: stored object not trusted"
                               % (key, printable(etag, 80) or "(none)", expected.etag))

    def _multipart(self, snapshot, key, progress):
        part_size = s3_part_size(snapshot.size, self.part_size)
        headers = self._object_headers(snapshot.sha256)
        if self.checksum:
            headers["x-amz-checksum-algorithm"] = "SHA256"
        # A stop must not cut this request once sent: S3 may have created the
        # upload whose id the answer brings, and only that id can abort it
        # (an upload left behind costs storage until a lifecycle rule acts).
        self.signals.check()
        _, data = self._request("POST", "CreateMultipartUpload on %s" % key, key,
                                query=[("uploads", "")], headers=headers, cleanup=True)
        upload_id = xml_text(parse_xml(data, "CreateMultipartUpload"), "UploadId")
        if not upload_id:
            raise StorageError("S3 CreateMultipartUpload on %s: answer has no UploadId" % key)

        def put_part(check, number, offset, length):
            digest = _FileSlice(snapshot.path, offset, length, check).digest("sha256")
            piece = _FileSlice(snapshot.path, offset, length, check, progress)
            part_headers = {"Content-Length": str(length)}
            if self.checksum:
                part_headers["x-amz-checksum-sha256"] = base64.b64encode(digest.digest()).decode("ascii")
            resp, _ = self._request("PUT", "UploadPart %d of %s" % (number, key), key,
                                    query=[("partNumber", str(number)), ("uploadId", upload_id)],
                                    headers=part_headers, body=lambda: piece,
                                    payload_hash=digest.hexdigest())
            return number, resp.header("ETag", ""), part_headers.get("x-amz-checksum-sha256")

        parts = [(i + 1, off, min(part_size, snapshot.size - off))
                 for i, off in enumerate(range(0, snapshot.size, part_size))]
        try:
            done = run_parts(parts, put_part, self.concurrency, self.signals)
            self._complete(key, upload_id, done, _s3_multipart_expected(snapshot.size, done))
        except BaseException:
            self._abort(key, upload_id)
            raise

    def _complete(self, key, upload_id, done, expected):
        """CompleteMultipartUpload (conditional: _write); the answer's ETag
        must be a multipart one of len(done) parts."""
        body = ["<CompleteMultipartUpload xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">"]
        for number, etag, checksum in done:
            body.append("<Part><PartNumber>%d</PartNumber><ETag>%s</ETag>%s</Part>" % (
                number, xml_escape(etag),
                "<ChecksumSHA256>%s</ChecksumSHA256>" % checksum if checksum else ""))
        body.append("</CompleteMultipartUpload>")
        payload = "".join(body).encode("utf-8")
        action = "CompleteMultipartUpload on %s" % key
        resp, data = self._write("POST", action, key, lambda: expected,
                                 query=[("uploadId", upload_id)],
                                 headers={"Content-Type": "application/xml",
                                          "Content-Length": str(len(payload))},
                                 body=payload, payload_hash=hashlib.sha256(payload).hexdigest())
        if resp is None:
            return
        root = parse_xml(data, "CompleteMultipartUpload")
        if root.tag == "Error" or root.tag.endswith("}Error"):
            raise StorageError("S3 %s: %s" % (action, _aws_error_line(data)))
        etag = (xml_text(root, "ETag") or "").strip().strip('"')
        count = re.match(r"\A[^\s-]+-(\d+)\Z", etag)
        if count is None or int(count.group(1)) != len(done):
            raise StorageError("S3 %s: the store answered ETag %s for an object of %d parts: stored "
                               "object not trusted" % (action, printable(etag, 80) or "(none)",
                                                       len(done)))

    def _abort(self, key, upload_id):
        try:
            self._request("DELETE", "AbortMultipartUpload on %s" % key, key,
                          query=[("uploadId", upload_id)], ok=(200, 204, 404), cleanup=True)
            LOG.info("Aborted multipart upload of s3://%s/%s", self.bucket, key)
        except (StorageError, TransportError) as exc:
            LOG.error("Could not abort multipart upload of s3://%s/%s (%s); a bucket lifecycle rule "
                      "for incomplete uploads will remove the parts", self.bucket, key, exc)

    # -- list and delete ---------------------------------------------------------

    def list(self):
        prefix = self.list_prefix()
        what = "ListObjectsV2 on %s" % (prefix or "/")

        def page(token):
            query = [("list-type", "2"), ("prefix", prefix), ("max-keys", "1000")]
            if token:
                query.append(("continuation-token", token))
            _, data = self._request("GET", what, query=query)
            root = parse_xml(data, "ListObjectsV2")
            items = [(xml_text(item, "Key", ""), xml_text(item, "Size"))
                     for item in xml_children(root, "Contents")]
            more = xml_text(root, "IsTruncated", "false") == "true"
            return items, xml_text(root, "NextContinuationToken") if more else None

        return _unique_refs(self, self.pages(page, what, "continuation token"))

    def delete(self, names):
        keys = [self.full_name(name) for name in names]      # the listed keys, never key_for()
        for start in range(0, len(keys), S3_DELETE_BATCH):
            batch = keys[start:start + S3_DELETE_BATCH]
            payload = ("<Delete><Quiet>true</Quiet>%s</Delete>" % "".join(
                "<Object><Key>%s</Key></Object>" % xml_escape(k) for k in batch)).encode("utf-8")
            try:
                _, data = self._request(
                    "POST", "DeleteObjects", query=[("delete", "")],
                    headers={"Content-Type": "application/xml", "Content-Length": str(len(payload)),
                             "Content-MD5": base64.b64encode(
                                 new_hash("md5", payload).digest()).decode("ascii")},
                    body=payload, payload_hash=hashlib.sha256(payload).hexdigest())
            except StorageError as exc:
                if "NotImplemented" not in str(exc) and "HTTP 501" not in str(exc):
                    raise
                for key in batch:       # a store without DeleteObjects
                    self._request("DELETE", "DeleteObject on %s" % key, key, ok=(200, 204, 404))
                continue
            errors = xml_children(parse_xml(data, "DeleteObjects"), "Error")
            if errors:
                raise StorageError("S3 DeleteObjects: %d keys not deleted, first %s: %s %s" % (
                    len(errors), printable(xml_text(errors[0], "Key", ""), 120),
                    xml_text(errors[0], "Code"), one_line(xml_text(errors[0], "Message", ""), 200)))


S3_MIN_PART = 5 * 1024 * 1024     # every part of a multipart object but the last is this large


def s3_part_size(size, preferred):
    """``preferred``, grown in whole MiB so that ``size`` fits in 10,000 parts."""
    needed = max(preferred, -(-size // S3_MAX_PARTS))
    return -(-needed // (1024 * 1024)) * 1024 * 1024


def _is_ip_or_localhost(host):
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except (OSError, ValueError):
        return False


# =============================================================================
# 18. Azure Blob storage
# =============================================================================


AZURE_VERSION = "2021-08-06"          # x-ms-version: understood by Azure and Azurite
AZURE_MAX_BLOCKS = 50000
AZURE_AUTH_MODES = ("auto", "shared_key", "sas", "managed_identity", "workload_identity",
                    "client_secret")
AZURE_HINTS = {
    "AuthenticationFailed": "the account key, SAS or token was refused",
    "AuthorizationFailure": "the credentials are not allowed to do this",
    "AuthorizationPermissionMismatch": "the SAS or role lacks a permission for this operation",
    "ContainerNotFound": "the container does not exist (check container_name)",
    "InvalidAuthenticationInfo": "the token is malformed or expired",
    "Md5Mismatch": "the data changed on the way",
}


def parse_connection_string(text):
    """Azure Storage connection string fields (AccountName, AccountKey, ...)."""
    fields = {}
    for part in text.split(";"):
        if part.strip():
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError("a part is not Name=Value (value not shown)")
            fields[name.strip()] = value.strip()
    return fields


def _azure_endpoint(section, values, conn):
    """(blob endpoint URL, account name) from the endpoint, the connection
    string or the account name and suffix."""
    endpoint, account = values["endpoint"], values["account_name"] or conn.get("AccountName")
    if not endpoint and conn.get("BlobEndpoint"):
        endpoint = check_url(conn["BlobEndpoint"], section.name("connection_string") + " BlobEndpoint")
    if endpoint and urllib.parse.urlsplit(endpoint).query:
        # It would be printed in logs, metrics and --check-config.
        raise section.error("endpoint", "must not carry a query string (put the SAS in sas_token)")
    if not endpoint:
        if not account:
            raise section.error("account_name", "required (or endpoint / connection_string)")
        if not re.match(r"\A[a-z0-9]{3,24}\Z", account):
            raise section.error("account_name", "%r is not a storage account name "
                                "(3-24 lowercase letters and digits)" % account)
        suffix = (values["endpoint_suffix"] if section.sources.get("endpoint_suffix") != "default"
                  else conn.get("EndpointSuffix") or values["endpoint_suffix"])
        if not re.match(r"\A[A-Za-z0-9.-]+\Z", suffix):
            raise section.error("endpoint_suffix", "%r is not a DNS suffix" % suffix)
        scheme = "http" if conn.get("DefaultEndpointsProtocol") == "http" else "https"
        endpoint = "%s://%s.blob.%s" % (scheme, account, suffix)
    if not account:
        parts = urllib.parse.urlsplit(endpoint)
        account = (parts.path.strip("/").split("/")[0] if _is_ip_or_localhost(parts.hostname)
                   else parts.hostname.split(".")[0])
    return endpoint, account


def _azure_auth_mode(section, values, key, sas):
    """The auth mode (``auto`` resolved), with the keys it needs checked."""
    mode = values["auth_mode"]
    client_id, tenant_id = values["client_id"], values["tenant_id"]
    if mode == "auto":
        if sas is not None:
            mode = "sas"
        elif key is not None:
            mode = "shared_key"
        elif values["client_secret"] is not None and client_id and tenant_id:
            mode = "client_secret"
        elif values["federated_token_file"] and client_id and tenant_id:
            mode = "workload_identity"
        else:
            mode = "managed_identity"
    needs = {"shared_key": [("account_key", key)], "sas": [("sas_token", sas)],
             "client_secret": [("client_id", client_id), ("tenant_id", tenant_id),
                               ("client_secret", values["client_secret"])],
             "workload_identity": [("client_id", client_id), ("tenant_id", tenant_id),
                                   ("federated_token_file", values["federated_token_file"])]}
    for name, value in needs.get(mode, []):
        if not value:
            raise section.error(name, "required for auth_mode %s" % mode)
    return mode


@register_storage
class AzureStorage(Storage):
    """Azure Blob storage (and Azurite, sovereign clouds, private endpoints).

    Auth, in this order when ``auth_mode`` is ``auto``: a SAS token, the
    account key (Shared Key), a client secret, workload identity (federated
    token file), managed identity (IMDS). Put Blob up to ``block_size``;
    above it Put Block (each block's MD5 checked by the service, uploaded
    ``concurrency`` at a time) and Put Block List, so no blob exists until
    every block arrived: a failed or stopped upload leaves no blob (Azure
    discards uncommitted blocks itself after a week).
    """

    config_key = "azure_storage"
    kind = "azure"
    aliases = ("azure",)
    service = "Azure"
    keys = (
        Key("account_name", "name", env=("AZURE_STORAGE_ACCOUNT",), doc="storage account"),
        Key("container_name", "name", required=True, pattern=(
            r"\A(?:[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])?|\$root)\Z", "container name"), doc="container"),
        Key("account_key", "secret", env=("AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCESS_KEY"),
            doc="Shared Key auth"),
        Key("sas_token", "secret", env=("AZURE_STORAGE_SAS_TOKEN",),
            doc="SAS (needs create, write, list, delete)"),
        Key("connection_string", "secret", env=("AZURE_STORAGE_CONNECTION_STRING",),
            doc="`AccountName=...;AccountKey=...;BlobEndpoint=...`"),
        Key("auth_mode", "choice", "auto", choices=AZURE_AUTH_MODES,
            doc="`shared_key`, `sas`, `client_secret`, `workload_identity`, `managed_identity`; "
                "`auto` picks in that spirit: SAS, key, client secret, federated token, managed "
                "identity"),
        Key("client_id", "name", env=("AZURE_CLIENT_ID",),
            doc="Microsoft Entra app, workload identity or user-assigned managed identity"),
        Key("tenant_id", "name", env=("AZURE_TENANT_ID",), doc="Microsoft Entra tenant"),
        Key("client_secret", "secret", env=("AZURE_CLIENT_SECRET",), doc="Entra app secret"),
        Key("federated_token_file", "path", env=("AZURE_FEDERATED_TOKEN_FILE",),
            doc="AKS workload identity token"),
        Key("authority_host", "str", "https://login.microsoftonline.com",
            env=("AZURE_AUTHORITY_HOST",), doc="sovereign clouds"),
        Key("endpoint", "url", default_doc="`https://<account>.blob.<endpoint_suffix>`",
            doc="Azurite, private endpoints; no query string (a SAS goes in `sas_token`)"),
        Key("endpoint_suffix", "str", "core.windows.net",
            doc="e.g. `core.usgovcloudapi.net`, `core.chinacloudapi.cn`"),
        Key("prefix", "str", "", doc="blob name prefix (\"folder\")"),
        Key("access_tier", "choice", choices=("Hot", "Cool", "Cold", "Archive"),
            doc="`Hot`, `Cool`, `Cold`, `Archive`"),
        Key("block_size_mb", "int", 16, minimum=1, maximum=4000,
            doc="block size (Azure's limit: 4000)"),
        Key("concurrency", "int", 4, minimum=1, maximum=64, doc="blocks uploaded at once"),
        Key("imds_endpoint", "str", "http://169.254.169.254",
            doc="managed identity endpoint (tests use loopback)"),
        Key("list_page_size", "int", 5000, minimum=1, maximum=5000, doc="List Blobs page size"),
    ) + tls_keys(token_endpoint="the Entra token endpoint (`authority_host`)") + STORAGE_POLICY_KEYS

    def __init__(self, endpoint, account, container, prefix, auth, http, policy, runtime,
                 settings=None, key=None, sas=None, token=None, access_tier=None,
                 block_size=16 * 1024 * 1024, concurrency=4, page_size=5000):
        Storage.__init__(self, policy, runtime, settings)
        self.endpoint, self.account, self.container, self.prefix = endpoint, account, container, prefix
        self.auth, self.http = auth, http
        self.key, self.sas, self.token = key, sas, token
        self.access_tier = access_tier
        self.block_size, self.concurrency = block_size, concurrency
        self.page_size = page_size

    @classmethod
    def complete(cls, section, values, warn):
        conn = {}
        if values["connection_string"]:
            try:
                conn = parse_connection_string(values["connection_string"].reveal())
            except ValueError as exc:
                raise section.error("connection_string", "cannot parse: %s" % exc) from exc
        if values["account_key"] is None and conn.get("AccountKey"):
            values["account_key"] = Secret(conn["AccountKey"])
        if values["account_key"] is not None:
            try:
                base64.b64decode(values["account_key"].reveal(), validate=True)
            except (ValueError, TypeError):
                raise section.error("account_key", "is not base64 (copy the key as shown by Azure)") from None
        sas = values["sas_token"] or (Secret(conn["SharedAccessSignature"])
                                      if conn.get("SharedAccessSignature") else None)
        values["sas_token"] = Secret(sas.reveal().lstrip("?")) if sas is not None else None
        values["endpoint"], values["account_name"] = _azure_endpoint(section, values, conn)
        values["auth_mode"] = _azure_auth_mode(section, values, values["account_key"],
                                               values["sas_token"])
        storage_tls(values, values["endpoint"])

    @classmethod
    def from_settings(cls, settings, cfg, runtime):
        endpoint, mode = settings["endpoint"], settings["auth_mode"]
        tls = storage_tls(settings, endpoint)
        proxy = storage_proxy(settings, runtime, settings.block or cls.config_key)
        token = None
        if mode in ("managed_identity", "workload_identity", "client_secret"):
            auth_http = Http(tls._replace(skip_verify=settings["auth_tls_skip_verify"]), 30.0,
                             proxy=proxy, deadline=cfg.request_timeout, signals=runtime.signals)
            token = BearerToken(_azure_token_fetcher(
                mode, auth_http, settings["imds_endpoint"].rstrip("/"),
                settings["authority_host"].rstrip("/"), settings["tenant_id"], settings["client_id"],
                settings["client_secret"], settings["federated_token_file"]),
                runtime.clock, "Azure %s" % mode.replace("_", " "))
        return cls(endpoint.rstrip("/"), settings["account_name"], settings["container_name"],
                   settings["prefix"].strip("/"), mode,
                   Http(tls, cfg.timeout, proxy=proxy, deadline=cfg.request_timeout,
                        signals=runtime.signals), cls.policy_of(settings), runtime, settings,
                   key=settings["account_key"], sas=settings["sas_token"], token=token,
                   access_tier=settings["access_tier"],
                   block_size=settings["block_size_mb"] * 1024 * 1024,
                   concurrency=settings["concurrency"], page_size=settings["list_page_size"])

    @classmethod
    def place(cls, settings):
        return _object_place("azure", settings["endpoint"], settings["container_name"],
                             settings["prefix"], settings["file_prefix"])

    def describe(self):
        return "azure:%s/%s/%s" % (self.endpoint, self.container, self.list_prefix())

    def _url(self, blob=None, query=()):
        path = "/" + self.container + ("/" + uri_encode(blob, safe="-_.~/") if blob else "")
        pairs = list(query)
        text = "&".join("%s=%s" % (uri_encode(k), uri_encode(v)) for k, v in pairs)
        if self.auth == "sas":
            text = "&".join(t for t in (text, self.sas.reveal()) if t)
        return self.endpoint + path + ("?" + text if text else "")

    def _request(self, method, action, blob=None, query=(), headers=None, body=None, ok=(200, 201),
                 sink=None):
        url = self._url(blob, query)

        def build():
            all_headers = {"x-ms-version": AZURE_VERSION,
                           "x-ms-date": http_date(self.clock.now())}
            all_headers.update(headers or {})
            if body is not None and not any(k.lower() == "content-type" for k in all_headers):
                all_headers["Content-Type"] = "application/octet-stream"   # signed, not added later
            if self.auth == "shared_key":
                all_headers["Authorization"] = azure_shared_key(method, url, all_headers, self.account,
                                                                self.key.reveal())
            elif self.token is not None:
                all_headers["Authorization"] = "Bearer " + self.token.get().reveal()
            return method, url, all_headers, body() if callable(body) else body
        return self.send(action, build, ok, _azure_error, sink)

    def download(self, name, sink):
        blob = self.full_name(name)
        self._request("GET", "Get Blob %s" % blob, blob, ok=(200,), sink=sink)

    def probe_put(self, name, data):
        blob = self.full_name(name)
        self._request("PUT", "Put Blob %s" % blob, blob, headers={
            "x-ms-blob-type": "BlockBlob", "Content-Length": str(len(data)),
            "Content-Type": "application/octet-stream"}, body=data)

    def probe_get(self, name):
        blob = self.full_name(name)
        return self._request("GET", "Get Blob %s" % blob, blob, ok=(200,))[1]

    def probe_delete(self, name, version=None):
        blob = self.full_name(name)
        self._request("DELETE", "Delete Blob %s" % blob, blob, ok=(200, 202, 404))

    def read_back(self, name, check):
        """Get Blob Properties (the Content-MD5 this agent set), then Get
        Blob of that very blob (If-Match its ETag)."""
        blob = self.full_name(name)
        head, _ = self._request("HEAD", "Get Blob Properties %s" % blob, blob, ok=(200,))
        md5 = head.header("Content-MD5")
        recorded = own_record(head.header(AZURE_OWN_SHA256),
                              parse_listed_size(head.header("Content-Length")) or None)
        if recorded is None:
            size = parse_listed_size(head.header("Content-Length")) or None
            try:
                expected = base64.b64decode(md5 or "", validate=True)
            except ValueError:
                expected = b""
            recorded = Recorded("Azure Content-MD5", "md5", expected, size) if md5 else \
                Recorded("Azure size", None, None, size)
        check.expect(recorded, parse_http_date(head.header("Last-Modified")))
        etag = head.header("ETag")
        self._request("GET", "Get Blob %s" % blob, blob, ok=(200,), sink=check,
                      headers={"If-Match": etag} if etag else None)

    # -- upload ------------------------------------------------------------------

    def upload(self, snapshot, name, progress=None):
        """Put Blob, or blocks and Put Block List, each with ``If-None-Match:
        *``: a blob of the name that exists already (another agent's, the
        same millisecond) is never replaced (NameClash), unless it is the
        very blob sent, whose answer was lost (same size and MD5)."""
        blob = self.full_name(name)
        headers = {"Content-Type": "application/octet-stream", "If-None-Match": "*"}
        if snapshot.sha256:
            headers[AZURE_OWN_SHA256] = snapshot.sha256
        if self.access_tier:
            headers["x-ms-access-tier"] = self.access_tier
        if snapshot.size <= self.block_size:
            md5 = _FileSlice(snapshot.path, 0, snapshot.size, self.signals.check).digest("md5")
            piece = _FileSlice(snapshot.path, 0, snapshot.size, self.signals.check, progress)
            md5 = base64.b64encode(md5.digest()).decode("ascii")
            headers.update({"x-ms-blob-type": "BlockBlob", "Content-Length": str(snapshot.size),
                            "Content-MD5": md5})
            self._conditional(blob, snapshot.size, md5, lambda: self._request(
                "PUT", "Put Blob %s" % blob, blob, headers=headers, body=lambda: piece))
        else:
            self._put_blocks(snapshot, blob, headers, progress)
        return "%s/%s/%s" % (self.endpoint, self.container, uri_encode(blob, safe="-_.~/"))

    def _conditional(self, blob, size, md5, write):
        """``write()``; its NameClash stands unless ``blob`` is the very blob
        sent (size and MD5, base64), created by an attempt whose answer was lost."""
        try:
            write()
        except NameClash:
            if not self.sent_copy(lambda: self._holds(blob, size, md5)):
                raise

    def _holds(self, blob, size, md5):
        resp, _ = self._request("HEAD", "Get Blob Properties %s" % blob, blob, ok=(200,))
        return resp.header("Content-Length") == str(size) and resp.header("Content-MD5") == md5

    def _put_blocks(self, snapshot, blob, headers, progress):
        size = max(self.block_size, -(-snapshot.size // AZURE_MAX_BLOCKS))
        nonce = os.urandom(6).hex()
        whole = _RunningHash("md5")     # the blob's own MD5, from the blocks' MD5 passes

        def put_block(check, number, offset, length):
            block_id = base64.b64encode(("%s-%06d" % (nonce, number)).encode("ascii")).decode("ascii")
            md5 = base64.b64encode(_FileSlice(snapshot.path, offset, length, check, None, whole)
                                   .digest("md5").digest()).decode("ascii")
            piece = _FileSlice(snapshot.path, offset, length, check, progress)
            self._request("PUT", "Put Block %d of %s" % (number, blob), blob,
                          query=[("comp", "block"), ("blockid", block_id)],
                          headers={"Content-Length": str(length), "Content-MD5": md5},
                          body=lambda: piece)
            return block_id

        blocks = [(i, off, min(size, snapshot.size - off))
                  for i, off in enumerate(range(0, snapshot.size, size))]
        ids = run_parts(blocks, put_block, self.concurrency, self.signals)
        self.signals.check()
        payload = ("<?xml version=\"1.0\" encoding=\"utf-8\"?><BlockList>%s</BlockList>" % "".join(
            "<Latest>%s</Latest>" % block_id for block_id in ids)).encode("utf-8")
        list_headers = {"Content-Length": str(len(payload)), "Content-Type": "application/xml",
                        "x-ms-blob-content-type": headers["Content-Type"],
                        # the whole blob's MD5, which clients check on download
                        "x-ms-blob-content-md5": base64.b64encode(whole.digest(
                            snapshot.path, snapshot.size, self.signals.check)).decode("ascii"),
                        "Content-MD5": base64.b64encode(new_hash("md5", payload).digest()).decode("ascii")}
        if self.access_tier:
            list_headers["x-ms-access-tier"] = self.access_tier
        if AZURE_OWN_SHA256 in headers:
            list_headers[AZURE_OWN_SHA256] = headers[AZURE_OWN_SHA256]
        list_headers["If-None-Match"] = "*"
        self._conditional(blob, snapshot.size, list_headers["x-ms-blob-content-md5"], lambda: self._request(
            "PUT", "Put Block List %s" % blob, blob, query=[("comp", "blocklist")],
            headers=list_headers, body=payload))

    # -- list and delete ---------------------------------------------------------

    def list(self):
        def page(marker):
            query = [("restype", "container"), ("comp", "list"), ("prefix", self.list_prefix()),
                     ("maxresults", str(self.page_size))]
            if marker:
                query.append(("marker", marker))
            _, data = self._request("GET", "List Blobs", query=query, ok=(200,))
            root = parse_xml(data, "List Blobs")
            items = [(xml_text(item, "Name", ""), xml_text(item, "Content-Length"))
                     for item in xml_children(root, "Blob")
                     if not xml_children(item, "Snapshot")]     # blob snapshots go with their blob
            return items, xml_text(root, "NextMarker")

        return _unique_refs(self, self.pages(page, "List Blobs of %s" % self.describe(), "NextMarker"))

    def delete(self, names):
        locked = []
        for name in names:
            blob = self.full_name(name)
            try:
                self._request("DELETE", "Delete Blob %s" % blob, blob,
                              headers={"x-ms-delete-snapshots": "include"}, ok=(200, 202, 404))
            except StorageError as exc:
                if "BlobImmutable" not in str(exc):       # an immutability policy or legal hold
                    raise
                locked.append(name)
                LOG.warning("%s is locked by an immutability policy; left in place (%s)", blob, exc)
        return locked


AZURE_OWN_SHA256 = "x-ms-meta-" + OWN_SHA256.replace("-", "_")   # metadata names are identifiers


def _azure_error(resp, data, action):
    code, message, _ = xml_error(data, resp.header("x-ms-error-code"))
    if code in ("BlobAlreadyExists", "ConditionNotMet"):     # our If-None-Match: *
        return NameClash("Azure %s: the blob exists already (%s); not replaced" % (action, code))
    hint = AZURE_HINTS.get(code or "", "")
    if code == "AuthenticationFailed" and message and "expired" in message.lower():
        hint = "the SAS or token has expired"
    return storage_error("Azure", action, resp, code, message, hint,
                         code in ("ServerBusy", "OperationTimedOut", "InternalError"))


# =============================================================================
# 19. Google Cloud Storage
# =============================================================================


GCS_CHUNK_ALIGN = 256 * 1024                     # resumable chunks are multiples of this
GCS_HINTS = {
    "forbidden": "the credentials are not allowed to do this (roles/storage.objectAdmin on the bucket?)",
    "notFound": "the bucket does not exist (check bucket)",
    "authError": "the access token was refused",
    "invalid_grant": "the key or refresh token was refused (revoked, or this host's clock is off)",
}


def _gcs_error(resp, data, action):
    reason = message = None
    try:
        error = json.loads(data.decode("utf-8")).get("error")
        if isinstance(error, dict):
            message = error.get("message")
            details = error.get("errors") or [{}]
            reason = details[0].get("reason") if isinstance(details[0], dict) else None
        elif isinstance(error, str):
            reason = error
    except (ValueError, AttributeError, KeyError, TypeError, IndexError, RecursionError):
        message = one_line(data[:200].decode("utf-8", "replace"))
    hint = GCS_HINTS.get(reason if isinstance(reason, str) else "", "")
    if resp.status == 401:
        hint = GCS_HINTS["authError"]
    error = storage_error("GCS", action, resp, reason, message, hint)
    if resp.status == 412:          # our ifGenerationMatch=0: the name is taken
        return NameClash("%s; the object exists already, not replaced" % error)
    return error


@register_storage
class GoogleStorage(Storage):
    """Google Cloud Storage through the JSON API.

    Objects up to ``chunk_size`` go in one request; larger ones through a
    resumable upload session in chunks (multiples of 256 KiB): after an
    interrupted chunk the session is asked how much it holds and the upload
    goes on from there. The MD5 GCS reports must equal the file's. A failed or
    stopped upload cancels its session, so no object appears.
    """

    config_key = "google_storage"
    kind = "google"
    aliases = ("google", "gcs")
    service = "GCS"

    keys = (
        Key("bucket", "name", required=True,
            pattern=(r"\A[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]\Z", "bucket name"),
            doc="bucket (the Go agent's key)"),
        Key("prefix", "str", "", default_doc="`\"\"` (bucket root, as the Go agent)",
            doc="object name prefix"),
        Key("credentials_file", "file", env=("GOOGLE_APPLICATION_CREDENTIALS",),
            default_doc="gcloud's ADC file, the metadata server",
            doc="`service_account` key (JWT signed RS256 here) or `authorized_user`"),
        Key("endpoint", "url", default_doc="`STORAGE_EMULATOR_HOST`, `https://storage.googleapis.com`",
            doc="the JSON API endpoint"),
        Key("anonymous", "bool", default_doc="`true` only with `STORAGE_EMULATOR_HOST` and no credentials",
            doc="send no token"),
        Key("metadata_host", "str", "metadata.google.internal", env=("GCE_METADATA_HOST",),
            doc="the metadata server (tests use loopback)"),
        Key("storage_class", "name", doc="e.g. `NEARLINE`"),
        Key("chunk_size_mb", "int", 16, minimum=1, maximum=5120,
            doc="resumable chunk (multiple of 256 KiB); files up to it go in one request"),
        Key("list_page_size", "int", 1000, minimum=1, maximum=5000, doc="objects list page size"),
    ) + tls_keys(token_endpoint="the key file's `token_uri` and the metadata server"
                 ) + STORAGE_POLICY_KEYS

    def __init__(self, bucket, prefix, endpoint, token, http, policy, runtime, settings=None,
                 storage_class=None, chunk_size=16 * 1024 * 1024, page_size=1000):
        Storage.__init__(self, policy, runtime, settings)
        self.bucket, self.prefix, self.endpoint = bucket, prefix, endpoint
        self.token, self.http = token, http
        self.storage_class = storage_class
        self.chunk_size = chunk_size
        self.page_size = page_size

    @classmethod
    def complete(cls, section, values, warn):
        env = section.env
        emulator = env.get("STORAGE_EMULATOR_HOST")
        if emulator:           # the emulator convention: a plain host:port
            emulator = check_url(emulator if "://" in emulator else "http://" + emulator,
                                 "STORAGE_EMULATOR_HOST")
        values["endpoint"] = values["endpoint"] or emulator or "https://storage.googleapis.com"
        if values["anonymous"] is None:
            values["anonymous"] = bool(emulator) and not values["credentials_file"]
        storage_tls(values, values["endpoint"])

    @classmethod
    def from_settings(cls, settings, cfg, runtime):
        endpoint = settings["endpoint"]
        tls = storage_tls(settings, endpoint)
        proxy = storage_proxy(settings, runtime, settings.block or cls.config_key)
        token = None
        if settings["credentials_file"] or not settings["anonymous"]:
            auth_http = Http(tls._replace(skip_verify=settings["auth_tls_skip_verify"]), 30.0,
                             proxy=proxy, deadline=cfg.request_timeout, signals=runtime.signals)
            try:
                fetch, what = google_token_source(settings["credentials_file"], runtime.env,
                                                  auth_http, runtime.clock, settings["metadata_host"])
            except ConfigError as exc:
                raise ConfigError("%s.credentials_file: %s" % (settings.block or cls.config_key,
                                                                 exc)) from exc
            token = BearerToken(fetch, runtime.clock, what)
        return cls(settings["bucket"], settings["prefix"].strip("/"), endpoint.rstrip("/"), token,
                   Http(tls, cfg.timeout, proxy=proxy, deadline=cfg.request_timeout,
                        signals=runtime.signals), cls.policy_of(settings), runtime, settings,
                   storage_class=settings["storage_class"],
                   chunk_size=settings["chunk_size_mb"] * 1024 * 1024,
                   page_size=settings["list_page_size"])

    @classmethod
    def place(cls, settings):
        return _object_place("gs", settings["endpoint"], settings["bucket"], settings["prefix"],
                             settings["file_prefix"])

    def describe(self):
        return "gs://%s/%s" % (self.bucket, self.list_prefix())

    def _headers(self, url, extra=None):
        headers = {"Accept": "application/json"}
        same_host = urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(self.endpoint).netloc
        if self.token is not None and same_host:
            headers["Authorization"] = "Bearer " + self.token.get().reveal()
        headers.update(extra or {})
        return headers

    def _request(self, method, action, url, headers=None, body=None, ok=(200,), sink=None):
        def build():
            return method, url, self._headers(url, headers), body() if callable(body) else body
        return self.send(action, build, ok, _gcs_error, sink)

    def download(self, name, sink):
        obj = self.full_name(name)
        self._request("GET", "download of %s" % obj, self._object_url(obj) + "?alt=media", sink=sink)

    def _object_url(self, obj):
        """The JSON API URL of object ``obj`` (its metadata; ``?alt=media``: its bytes)."""
        return "%s/storage/v1/b/%s/o/%s" % (self.endpoint, uri_encode(self.bucket), uri_encode(obj, safe=""))

    def probe_put(self, name, data):
        obj = self.full_name(name)
        url = "%s/upload/storage/v1/b/%s/o?%s" % (self.endpoint, uri_encode(self.bucket),
                                                   canonical_query([("uploadType", "media"), ("name", obj)]))
        self._request("POST", "upload of %s" % obj, url, {"Content-Type": "application/octet-stream",
                                                           "Content-Length": str(len(data))}, data)

    def probe_get(self, name):
        obj = self.full_name(name)
        return self._request("GET", "download of %s" % obj, self._object_url(obj) + "?alt=media")[1]

    def probe_delete(self, name, version=None):
        obj = self.full_name(name)
        self._request("DELETE", "delete of %s" % obj, self._object_url(obj), ok=(200, 204, 404))

    def read_back(self, name, check):
        """The object's metadata (its md5Hash and generation), then the
        media of that generation."""
        obj = self.full_name(name)
        url = self._object_url(obj)
        _, data = self._request("GET", "metadata of %s" % obj, url)
        meta = self._object_json(data, obj)
        md5, generation = meta.get("md5Hash"), str(meta.get("generation") or "")
        custom = meta.get("metadata") if isinstance(meta.get("metadata"), dict) else {}
        recorded = own_record(custom.get(OWN_SHA256), parse_listed_size(meta.get("size")) or None)
        if isinstance(md5, str) and recorded is None:
            try:
                expected = base64.b64decode(md5, validate=True)
            except ValueError:
                expected = b""
            recorded = Recorded("GCS md5Hash", "md5", expected, parse_listed_size(meta.get("size")) or None)
        try:
            created = _parse_time(meta.get("timeCreated") or "")
        except (ValueError, TypeError, AttributeError):
            created = None
        check.expect(recorded, created)
        query = "?alt=media" + ("&generation=" + generation if generation.isdigit() else "")
        self._request("GET", "download of %s" % obj, url + query, sink=check)

    # -- upload ------------------------------------------------------------------

    def upload(self, snapshot, name, progress=None):
        obj = self.full_name(name)
        md5 = _RunningHash("md5")       # to compare with GCS's md5Hash, without a pass of its own
        base = "%s/upload/storage/v1/b/%s/o" % (self.endpoint, uri_encode(self.bucket))
        try:
            result = self._create(snapshot, obj, base, progress, md5)
        except NameClash:
            result = self.sent_copy(lambda: self._holds(obj, snapshot, md5))
            if result is None:
                raise
        reported = result.get("md5Hash")
        ours = md5.digest(snapshot.path, snapshot.size, self.signals.check)
        if reported and base64.b64decode(reported) != ours:
            self.delete([name])
            raise StorageError("GCS upload of %s: stored MD5 %s differs from the file's %s; object deleted"
                               % (obj, reported, base64.b64encode(ours).decode("ascii")))
        return "gs://%s/%s" % (self.bucket, obj)

    def _create(self, snapshot, obj, base, progress, md5):
        """Create ``obj`` only if no object of that name exists
        (``ifGenerationMatch=0``: another agent's is never replaced; 412 is a
        NameClash); returns the object's metadata."""
        if snapshot.size > self.chunk_size:
            return self._resumable(snapshot, obj, base, progress, md5)
        url = base + "?" + canonical_query([("uploadType", "multipart"), ("ifGenerationMatch", "0")])
        boundary = "vault-snapshot-agent-" + os.urandom(12).hex()
        head = ("--%s\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n%s\r\n--%s\r\n"
                "Content-Type: application/octet-stream\r\n\r\n" % (
                    boundary, json.dumps(self._resource(snapshot, obj)), boundary)).encode("utf-8")
        tail = ("\r\n--%s--\r\n" % boundary).encode("ascii")
        headers = {"Content-Type": "multipart/related; boundary=%s" % boundary,
                   "Content-Length": str(len(head) + snapshot.size + len(tail))}

        def body():
            piece = _FileSlice(snapshot.path, 0, snapshot.size, self.signals.check, progress, md5)
            return itertools.chain([head], piece, [tail])
        _, data = self._request("POST", "upload of %s" % obj, url, headers, body)
        return self._object_json(data, obj)

    def _holds(self, obj, snapshot, md5):
        """``obj``'s metadata when it is the object sent (size and MD5), else None."""
        _, data = self._request("GET", "metadata of %s" % obj, self._object_url(obj))
        found = self._object_json(data, obj)
        ours = base64.b64encode(md5.digest(snapshot.path, snapshot.size, self.signals.check))
        same = found.get("md5Hash") == ours.decode("ascii") and str(found.get("size")) == str(snapshot.size)
        return found if same else None

    def _object_json(self, data, obj):
        try:
            result = json.loads(data.decode("utf-8"))
        except ValueError:
            raise StorageError("GCS upload of %s: answer is not JSON" % obj) from None
        return result if isinstance(result, dict) else {}

    def _resource(self, snapshot, obj):
        """The new object's resource: name, type, storage class, this
        agent's SHA-256."""
        resource = {"name": obj, "contentType": "application/octet-stream"}
        if self.storage_class:
            resource["storageClass"] = self.storage_class
        if snapshot.sha256:
            resource["metadata"] = {OWN_SHA256: snapshot.sha256}
        return resource

    def _resumable(self, snapshot, obj, base, progress, tap):
        payload = json.dumps(self._resource(snapshot, obj)).encode("utf-8")
        url = base + "?" + canonical_query([("uploadType", "resumable"), ("name", obj),
                                            ("ifGenerationMatch", "0")])
        resp, _ = self._request("POST", "start of resumable upload of %s" % obj, url, {
            "Content-Type": "application/json; charset=UTF-8",
            "X-Upload-Content-Type": "application/octet-stream",
            "X-Upload-Content-Length": str(snapshot.size)}, payload)
        session = resp.header("Location")
        if not session:
            raise StorageError("GCS resumable upload of %s: no session URI in the answer" % obj)
        try:
            return self._send_chunks(snapshot, obj, session, progress, tap)
        except BaseException:
            self._cancel(session, obj)
            raise

    def _send_chunks(self, snapshot, obj, session, progress, tap):
        """PUT the file in chunks to a resumable session, with the shared
        retry policy; after a failed chunk the session says where to go on."""
        chunk = max(GCS_CHUNK_ALIGN, self.chunk_size // GCS_CHUNK_ALIGN * GCS_CHUNK_ALIGN)
        where = [0]            # the offset the next chunk starts at

        def build():
            offset = where[0]
            length = min(chunk, snapshot.size - offset)
            headers = {"Content-Length": str(length),
                       "Content-Range": "bytes %d-%d/%d" % (offset, offset + length - 1, snapshot.size)}
            return "PUT", session, self._headers(session, headers), _FileSlice(
                snapshot.path, offset, length, self.signals.check, progress, tap)

        def resync():
            where[0], done = self._session_status(session, snapshot.size, obj)
            return done

        stalls = 0
        while True:
            self.signals.check()
            offset = where[0]
            resp, data = self.send("chunk at %d of %s" % (offset, obj), build, (200, 201, 308),
                                   _gcs_error, resync=resync)
            if resp.status in (200, 201):
                return self._object_json(data, obj)
            confirmed = _confirmed(resp.header("Range"))
            stalls = self._check_progress(obj, where[0], min(chunk, snapshot.size - where[0]),
                                          confirmed, stalls)
            where[0] = confirmed

    def _check_progress(self, obj, offset, length, confirmed, stalls):
        """Chunks in a row after which a resumable session held no more than
        before; a session that never moves on (or claims bytes it was never
        sent) fails the upload instead of taking chunks forever."""
        if confirmed > offset + length:
            raise StorageError("GCS upload of %s: the session claims %d bytes, more than the %d sent"
                               % (obj, confirmed, offset + length))
        if confirmed > offset:
            return 0
        if stalls + 1 >= self.attempts:
            raise StorageError("GCS upload of %s: the session made no progress (still %d bytes "
                               "after %d chunks in a row)" % (obj, confirmed, stalls + 1))
        return stalls + 1

    def _session_status(self, session, total, obj):
        """(bytes the session holds, its final (Response, body) if complete)."""
        resp, data = self.send("status of resumable upload of %s" % obj, lambda: (
            "PUT", session, self._headers(session, {"Content-Range": "bytes */%d" % total,
                                                    "Content-Length": "0"}), b""),
            (200, 201, 308), _gcs_error)
        if resp.status in (200, 201):
            return total, (resp, data)
        return _confirmed(resp.header("Range")), None

    def _cancel(self, session, obj):
        try:
            resp = self.http.request("DELETE", session, self._headers(session, {"Content-Length": "0"}),
                                     cleanup=True)
            resp.close()
            LOG.info("Cancelled resumable upload of gs://%s/%s", self.bucket, obj)
        except TransportError as exc:
            LOG.error("Could not cancel resumable upload of gs://%s/%s (%s); GCS drops it after a week",
                      self.bucket, obj, exc)

    # -- list and delete ---------------------------------------------------------

    def list(self):
        what = "GCS list of %s" % self.describe()

        def page(token):
            query = [("prefix", self.list_prefix()), ("maxResults", str(self.page_size))]
            if token:
                query.append(("pageToken", token))
            url = "%s/storage/v1/b/%s/o?%s" % (self.endpoint, uri_encode(self.bucket), canonical_query(query))
            _, data = self._request("GET", "list of %s" % self.describe(), url)
            try:
                answer = json.loads(data.decode("utf-8"))
            except (ValueError, RecursionError):
                raise StorageError("%s: answer is not JSON" % what) from None
            if not isinstance(answer, dict) or not isinstance(answer.get("items") or [], list):
                raise StorageError("%s: answer is not a list of objects" % what)
            items = [(item.get("name"), item.get("size")) for item in answer.get("items") or []
                     if isinstance(item, dict)]
            token = answer.get("nextPageToken")
            return items, token if isinstance(token, str) else None

        return _unique_refs(self, self.pages(page, what, "nextPageToken"))

    def delete(self, names):
        locked = []
        for name in names:
            obj = self.full_name(name)
            try:
                self._request("DELETE", "delete of %s" % obj, self._object_url(obj),
                              {"Content-Length": "0"}, b"",
                              ok=(200, 204, 404))
            except StorageError as exc:
                if "retentionPolicyNotMet" not in str(exc) and "objectRetention" not in str(exc):
                    raise
                locked.append(name)         # GCS's message says until when
                LOG.warning("%s is locked by a retention policy; left in place (%s)", obj, exc)
        return locked


def _confirmed(range_header):
    """Bytes a resumable session holds, from its 'Range: bytes=0-N' (none: 0)."""
    match = re.match(r"\Abytes=0-([0-9]{1,20})\Z", (range_header or "").strip())
    return int(match.group(1)) + 1 if match else 0


# =============================================================================
# 20. OpenStack Swift
# =============================================================================


SWIFT_MAX_SEGMENTS = 1000       # Swift's default max_manifest_segments
SWIFT_HINTS = {
    401: "the token was refused: expired, revoked, or for another project",
    403: "the user may not do this here (a Swift ACL, or the project's member role)",
    404: "the container does not exist (create it, e.g. `swift post CONTAINER`)",
    413: "larger than this Swift takes in one object (max_file_size): lower segment_size_mb",
}


def _swift_error(resp, data, action):
    """Swift answers errors as a short HTML page or plain text."""
    text = page_text(data[:400])
    hint = SWIFT_HINTS.get(resp.status, "")
    if resp.status == 404 and action.startswith(("download", "metadata", "delete")):
        hint = ""                   # the object, not the container, is what is missing
    error = storage_error("Swift", action, resp, None, one_line(text) or None, hint)
    if resp.status == 412:          # our If-None-Match: *: the name is taken
        return NameClash("%s; the object exists already, not replaced" % error)
    return error


def _swift_etag(resp):
    """The ETag of an answer without quotes, in lower case ("" when none)."""
    return (resp.header("Etag") or "").strip().strip('"').lower()


@register_storage
class SwiftStorage(Storage):
    """OpenStack Swift (and stores that speak its API), with Keystone v3
    (password or application credential) or v1 (tempauth) login.

    Files up to ``segment_size`` go in one PUT; larger ones as a Static
    Large Object: segments (``concurrency`` at a time, each one's MD5
    compared with the ETag Swift answers) under ``.segments/`` of the
    prefix or in ``segment_container``, then the manifest, which Swift
    checks against every segment. Each PUT carries ``If-None-Match: *``, so
    no object is ever replaced; a failed or stopped upload deletes the
    segments it wrote and leaves no manifest. Retention deletes a manifest
    with its segments (``multipart-manifest=delete``). The token is fetched
    again before it expires and when Swift refuses it.
    """

    config_key = "swift_storage"
    kind = "swift"
    aliases = ("swift",)
    service = "Swift"
    keys = (
        Key("container", "name", required=True, pattern=(r"\A[^/\s]{1,256}\Z", "container name"),
            doc="container"),
        Key("prefix", "str", "", doc="object name prefix (\"folder\")"),
        Key("auth_url", "url", env=("OS_AUTH_URL", "ST_AUTH"), required=True,
            doc="Keystone v3 (`https://keystone:5000/v3`) or v1/tempauth (`.../auth/v1.0`) URL"),
        Key("auth_version", "choice", choices=("1", "3"),
            default_doc="`1` when `auth_url` ends in `/v1.0` or `/v1`, else `3`",
            doc="`3` (Keystone) or `1` (tempauth `X-Auth-User`/`X-Auth-Key`)"),
        Key("username", "str", env=("OS_USERNAME", "ST_USER"),
            doc="user name (v1: `account:user`)"),
        Key("user_id", "name", env=("OS_USER_ID",), doc="user id, instead of a name and domain"),
        Key("user_domain_name", "str", env=("OS_USER_DOMAIN_NAME",),
            default_doc="`default` (by id)", doc="the user's domain"),
        Key("user_domain_id", "name", env=("OS_USER_DOMAIN_ID",), doc="the user's domain, by id"),
        Key("password", "secret", env=("OS_PASSWORD", "ST_KEY"), doc="password (v1: the key)"),
        Key("password_file", "file", doc="read the password from this file at each login"),
        Key("project_name", "str", env=("OS_PROJECT_NAME", "OS_TENANT_NAME"),
            doc="the project the token is scoped to"),
        Key("project_id", "name", env=("OS_PROJECT_ID", "OS_TENANT_ID"), doc="the project, by id"),
        Key("project_domain_name", "str", env=("OS_PROJECT_DOMAIN_NAME",),
            default_doc="the user's domain", doc="the project's domain"),
        Key("project_domain_id", "name", env=("OS_PROJECT_DOMAIN_ID",),
            doc="the project's domain, by id"),
        Key("application_credential_id", "name", env=("OS_APPLICATION_CREDENTIAL_ID",),
            doc="Keystone application credential (instead of a password)"),
        Key("application_credential_name", "str", env=("OS_APPLICATION_CREDENTIAL_NAME",),
            doc="the application credential by name (with the user)"),
        Key("application_credential_secret", "secret", env=("OS_APPLICATION_CREDENTIAL_SECRET",),
            doc="its secret"),
        Key("application_credential_secret_file", "file",
            doc="read the application credential's secret from this file at each login"),
        Key("region", "str", env=("OS_REGION_NAME",),
            default_doc="the only region offering object-store", doc="catalog region"),
        Key("interface", "choice", "public", env=("OS_INTERFACE", "OS_ENDPOINT_TYPE"),
            choices=OPENSTACK_INTERFACES, doc="catalog interface: `public`, `internal`, `admin`"),
        Key("storage_url", "url", env=("OS_STORAGE_URL",),
            default_doc="the catalog's object-store endpoint (v1: `X-Storage-Url`)",
            doc="the account URL (`https://swift:8080/v1/AUTH_<project id>`)"),
        Key("segment_container", "name", pattern=(r"\A[^/\s]{1,256}\Z", "container name"),
            default_doc="`container`, under `<prefix>/.segments/`",
            doc="container for the segments of large snapshots"),
        Key("segment_size_mb", "int", 1024, minimum=1, maximum=5120,
            doc="segment size; files up to it go in one PUT (Swift's limit: 5120)"),
        Key("concurrency", "int", 4, minimum=1, maximum=64, doc="segments uploaded at once"),
        Key("list_page_size", "int", 1000, minimum=1, maximum=10000, doc="container listing page size"),
    ) + tls_keys(token_endpoint="`auth_url`") + STORAGE_POLICY_KEYS

    def __init__(self, container, prefix, token, http, policy, runtime, settings=None,
                 segment_container=None, segment_size=1024 * 1024 * 1024, concurrency=4,
                 page_size=1000, endpoint=None):
        Storage.__init__(self, policy, runtime, settings)
        self.container, self.prefix, self.token, self.http = container, prefix, token, http
        self.segment_container = segment_container
        self.segment_size, self.concurrency, self.page_size = segment_size, concurrency, page_size
        self.endpoint = endpoint        # for logs and doctor: the storage URL, else auth_url

    @classmethod
    def complete(cls, section, values, warn):
        values["auth_version"] = values["auth_version"] or swift_auth_version(values["auth_url"])
        app = values["application_credential_id"] or values["application_credential_name"]
        secrets = ("application_credential_secret", "application_credential_secret_file") if app \
            else ("password", "password_file")
        needed = [("username",) if values["auth_version"] == "1" else
                  ("username", "user_id") if not values["application_credential_id"] else (), secrets]
        if not app and values["auth_version"] == "3":
            needed.append(("project_name", "project_id"))
        for keys in needed:
            if keys and not any(values[k] for k in keys):
                raise section.error(keys[0], "required%s (Keystone v%s%s)" % (
                    " (or %s)" % " or ".join(keys[1:]) if len(keys) > 1 else "",
                    values["auth_version"], ", application credential" if app else ""))
        if values["auth_version"] == "1" and app:
            raise section.error("application_credential_id", "needs Keystone (auth_version 3)")
        if values["auth_version"] == "1" and ":" not in values["username"]:
            warn("%s.username: tempauth users are usually account:user, got %r"
                 % (section.prefix.rstrip("."), values["username"]))
        storage_tls(values, values["storage_url"] or values["auth_url"])

    @classmethod
    def from_settings(cls, settings, cfg, runtime):
        endpoint = settings["storage_url"] or settings["auth_url"]
        tls = storage_tls(settings, endpoint)
        proxy = storage_proxy(settings, runtime, settings.block or cls.config_key)
        auth_http = Http(tls._replace(skip_verify=settings["auth_tls_skip_verify"]), 30.0, proxy=proxy,
                         deadline=cfg.request_timeout, signals=runtime.signals)
        fetch, what = swift_token_source(settings, auth_http, runtime.clock)
        return cls(settings["container"], settings["prefix"].strip("/"),
                   BearerToken(fetch, runtime.clock, what),
                   Http(tls, cfg.timeout, proxy=proxy, deadline=cfg.request_timeout,
                        signals=runtime.signals), cls.policy_of(settings), runtime, settings,
                   segment_container=settings["segment_container"],
                   segment_size=settings["segment_size_mb"] * 1024 * 1024,
                   concurrency=settings["concurrency"], page_size=settings["list_page_size"],
                   endpoint=endpoint)

    @classmethod
    def place(cls, settings):
        who = settings["project_id"] or settings["project_name"] or settings["username"] or \
            settings["application_credential_id"] or settings["application_credential_name"]
        return _object_place("swift", settings["storage_url"] or settings["auth_url"],
                             "%s:%s" % (who, settings["container"]), settings["prefix"],
                             settings["file_prefix"])

    def describe(self):
        return "swift://%s/%s" % (self.container, self.list_prefix())

    def _request(self, method, action, obj="", query=(), headers=None, body=None, ok=(200,),
                 sink=None, container=None, cleanup=False):
        """One request to the account's ``container`` (this block's) with
        retries; a 401 fetches a new token and tries again, once."""
        used, refused = [None], []

        def build():
            token, account = self.token.session()
            used[0] = token
            url = "%s/%s%s%s" % (account, uri_encode(container or self.container),
                                 "/" + uri_encode(obj, safe="-_.~/") if obj else "",
                                 "?" + canonical_query(query) if query else "")
            sent = {"X-Auth-Token": token.reveal()}
            sent.update(headers or {})
            return method, url, sent, body() if callable(body) else body

        def error_from(resp, data, action):
            error = _swift_error(resp, data, action)
            shown = masked(str(error), [used[0].reveal()])
            if shown != str(error):           # a page that quotes the token
                error = type(error)(shown, error.retryable)
            if resp.status == 401 and not refused:
                refused.append(True)
                self.token.invalidate(used[0])
                error.retryable = True
            return error
        return self.send(action, build, ok, error_from, sink, cleanup=cleanup)

    def download(self, name, sink):
        obj = self.full_name(name)
        self._request("GET", "download of %s" % obj, obj, sink=sink)

    def probe_put(self, name, data):
        obj = self.full_name(name)
        self._request("PUT", "upload of %s" % obj, obj, headers={
            "Content-Length": str(len(data)), "If-None-Match": "*"}, body=data, ok=(201,))

    def probe_get(self, name):
        obj = self.full_name(name)
        return self._request("GET", "download of %s" % obj, obj)[1]

    def probe_delete(self, name, version=None):
        obj = self.full_name(name)
        self._request("DELETE", "delete of %s" % obj, obj, ok=(200, 204, 404))

    def read_back(self, name, check):
        """HEAD (the agent's SHA-256, else a plain object's MD5 ETag), then
        GET that very object (If-Match its ETag)."""
        obj = self.full_name(name)
        head, _ = self._request("HEAD", "metadata of %s" % obj, obj, ok=(200, 204))
        size = parse_listed_size(head.header("Content-Length")) or None
        etag = _swift_etag(head)
        recorded = own_record(head.header("X-Object-Meta-" + OWN_SHA256), size)
        large = (head.header("X-Static-Large-Object") or "").lower() == "true"
        if recorded is None and not large and re.match(r"\A[0-9a-f]{32}\Z", etag):
            recorded = Recorded("Swift ETag", "md5", bytes.fromhex(etag), size)
        check.expect(recorded, parse_http_date(head.header("Last-Modified")))
        self._request("GET", "download of %s" % obj, obj, sink=check,
                      headers={"If-Match": '"%s"' % etag} if etag else {})

    # -- upload ------------------------------------------------------------------

    def upload(self, snapshot, name, progress=None):
        obj = self.full_name(name)
        sha256 = snapshot.sha256 or _FileSlice(snapshot.path, 0, snapshot.size,
                                               self.signals.check).digest("sha256").hexdigest()
        if snapshot.size <= self.segment_size:
            md5 = _RunningHash("md5")
            resp = self._write(snapshot, obj, sha256, "upload of %s" % obj, {
                "Content-Length": str(snapshot.size), "Content-Type": "application/octet-stream"},
                lambda: _FileSlice(snapshot.path, 0, snapshot.size, self.signals.check, progress, md5))
            ours = md5.digest(snapshot.path, snapshot.size, self.signals.check).hex()
        else:
            resp, ours = self._large(snapshot, obj, sha256, progress)
        if resp is not None and _swift_etag(resp) != ours:
            self.delete([name])
            raise StorageError("Swift upload of %s: the store answered ETag %s, expected %s; "
                               "object deleted" % (obj, printable(_swift_etag(resp), 80) or "(none)", ours))
        return "swift://%s/%s" % (self.container, obj)

    def _write(self, snapshot, obj, sha256, action, headers, body, query=()):
        """A PUT that never replaces an object (If-None-Match: *; 412 is
        NameClash) and keeps the agent's SHA-256 with it. When an answer was
        lost and the retry finds the name taken, the object there may be
        this one: if it is (size and SHA-256), that is success (None)."""
        headers = dict(headers, **{"If-None-Match": "*", "X-Object-Meta-" + OWN_SHA256: sha256})
        tries = []

        def counted():
            tries.append(1)
            return body() if callable(body) else body
        try:
            return self._request("PUT", action, obj, query, headers, counted, ok=(201,))[0]
        except NameClash:
            if len(tries) < 2 or not self.sent_copy(lambda: self._holds(obj, snapshot.size, sha256)):
                raise
            LOG.info("Swift %s: the answer was lost, but the object there is the one sent", action)
            return None

    def _holds(self, obj, size, sha256):
        resp, _ = self._request("HEAD", "metadata of %s" % obj, obj, ok=(200, 204, 404))
        return resp.status != 404 and resp.header("X-Object-Meta-" + OWN_SHA256) == sha256 and \
            parse_listed_size(resp.header("Content-Length")) == size

    def _segment_root(self):
        """(container, name prefix) under which segments go, each upload's
        in ``<snapshot name>/<random>/``, so two agents never share one."""
        if self.segment_container:
            return self.segment_container, self.list_prefix()
        return self.container, self.list_prefix() + ".segments/"

    def _large(self, snapshot, obj, sha256, progress):
        """A Static Large Object: the segments, then the manifest; returns
        (the manifest PUT's answer or None, the ETag it must have)."""
        container, root = self._segment_root()
        base = "%s%s/%s/" % (root, obj.rpartition("/")[2], os.urandom(6).hex())
        parts = [(i + 1, offset, min(self.segment_size, snapshot.size - offset))
                 for i, offset in enumerate(range(0, snapshot.size, self.segment_size))]
        if len(parts) > SWIFT_MAX_SEGMENTS:
            raise StorageError("Swift upload of %s: %d segments of %s, more than a manifest takes "
                               "(%d): raise segment_size_mb" % (obj, len(parts), format_size(
                                   self.segment_size), SWIFT_MAX_SEGMENTS))
        written = []

        def put_segment(check, number, offset, length):
            path = "%s%08d" % (base, number)
            written.append(path)
            digests = []

            def body():
                digests.append(new_hash("md5"))
                return _FileSlice(snapshot.path, offset, length, check, progress,
                                  lambda position, chunk: digests[-1].update(chunk))
            resp, _ = self._request("PUT", "upload of segment %d of %s" % (number, obj), path,
                                    headers={"Content-Length": str(length)}, body=body, ok=(201,),
                                    container=container)
            etag = digests[-1].hexdigest()
            if _swift_etag(resp) != etag:
                raise StorageError("Swift upload of segment %d of %s: the store answered ETag %s "
                                   "for a body whose MD5 is %s" % (number, obj, printable(
                                       _swift_etag(resp), 80) or "(none)", etag))
            return {"path": "/%s/%s" % (container, path), "etag": etag, "size_bytes": length}

        try:
            segments = run_parts(parts, put_segment, self.concurrency, self.signals)
            manifest = json.dumps(segments).encode("utf-8")
            resp = self._write(snapshot, obj, sha256, "manifest of %s" % obj, {
                "Content-Length": str(len(manifest)), "Content-Type": "application/octet-stream"},
                manifest, query=[("multipart-manifest", "put")])
        except BaseException:
            self._remove(container, written, obj)
            raise
        return resp, new_hash("md5", "".join(s["etag"] for s in segments).encode("ascii")).hexdigest()

    def _remove(self, container, paths, obj):
        """Delete the segments of a failed upload (also after a stop)."""
        left, deleted = [], 0
        for path in paths:
            try:
                resp, _ = self._request("DELETE", "delete of segment of %s" % obj, path,
                                        ok=(200, 204, 404), container=container, cleanup=True)
                deleted += resp.status != 404       # 404: never written
            except (StorageError, TransportError, Stopped):
                left.append(path)
        if left:
            LOG.error("Could not delete %d segment(s) of the failed upload of %s, e.g. %s/%s",
                      len(left), obj, container, left[0])
        elif deleted:
            LOG.info("Deleted the %d segment(s) of the failed upload of %s", deleted, obj)

    def prepare(self):
        """Delete the segments an upload killed mid-way left behind: those
        of a snapshot name without a manifest, over a day after the time in
        that name (an upload still running is never that old). A failure
        here is a warning: the cycle goes on."""
        container, root = self._segment_root()
        try:
            held = set(ref.name for ref in self.list())
            for subdir in self._listing(container, root, "/", subdirs=True):
                name = subdir[len(root):].rstrip("/")
                when = self.parse_name(name)
                if when is None or name in held or (self.clock.now() - when).total_seconds() < 86400:
                    continue
                paths = [path for path, _ in self._listing(container, subdir)
                         if isinstance(path, str) and path.startswith(subdir)
                         and ".." not in path.split("/")]
                self._remove(container, paths, self.full_name(name))
        except StorageError as exc:
            LOG.warning("Swift: looking for segments of killed uploads in %s failed: %s", container, exc)

    def _listing(self, container, prefix, delimiter=None, subdirs=False):
        """(name, size) of the objects (``subdirs``: the names of the
        "folders") a container listing shows under ``prefix``, page by page."""
        what = "Swift list of %s/%s" % (container, prefix)

        def page(marker):
            query = [("format", "json"), ("prefix", prefix), ("limit", str(self.page_size))] + (
                [("delimiter", delimiter)] if delimiter else []) + ([("marker", marker)] if marker else [])
            _, data = self._request("GET", "list of %s/%s" % (container, prefix), query=query,
                                    headers={"Accept": "application/json"}, container=container)
            try:
                answer = json.loads(data.decode("utf-8")) if data.strip() else []
            except (ValueError, RecursionError):
                raise StorageError("%s: answer is not JSON" % what) from None
            if not isinstance(answer, list):
                raise StorageError("%s: answer is not a list of objects" % what)
            entries = [item for item in answer if isinstance(item, dict)]
            items = [item.get("subdir") if subdirs else (item.get("name"), item.get("bytes"))
                     for item in entries if ("subdir" if subdirs else "name") in item]
            last = (entries[-1].get("name") or entries[-1].get("subdir")) if entries else None
            return items, last if len(answer) >= self.page_size and isinstance(last, str) else None

        for item in self.pages(page, what, "marker"):
            if not subdirs or (isinstance(item, str) and item.startswith(prefix)):
                yield item

    # -- list and delete ---------------------------------------------------------

    def list(self):
        return _unique_refs(self, self._listing(self.container, self.list_prefix(), "/"))

    def delete(self, names):
        for name in names:
            obj = self.full_name(name)
            resp, data = self._request("DELETE", "delete of %s" % obj, obj,
                                       query=[("multipart-manifest", "delete")],
                                       headers={"Accept": "application/json"}, ok=(200, 204, 404))
            try:
                summary = json.loads(data.decode("utf-8")) if data.strip() else {}
            except (ValueError, RecursionError):
                summary = {}
            errors = summary.get("Errors") if isinstance(summary, dict) else None
            if errors and not isinstance(errors, list):
                errors = [errors]
            if errors and len(errors) == 1 and "Not an SLO manifest" in json.dumps(errors[0]):
                self._request("DELETE", "delete of %s" % obj, obj, ok=(200, 204, 404))   # one PUT
            elif errors:
                raise StorageError("Swift delete of %s: %d segment(s) not deleted, first: %s" % (
                    obj, len(errors), printable(one_line(json.dumps(errors[0])), 200)))
        return []


# =============================================================================
# 21. Retention
# =============================================================================


def retention_plan(snapshots, retain, keep=None, max_age=None, now=None, max_space=0,
                   floor=RETENTION_FLOOR):
    """{name to delete: the rule that deletes it}, newest first: beyond the
    newest ``retain`` snapshots ("retain"), older than ``max_age`` (a
    timedelta) at ``now`` ("retain_days"), or beyond the newest that add up
    to at most ``max_space`` bytes ("max_space"). A snapshot goes when any
    rule says so; a rule at 0 (or None) keeps everything.

    Ordered by the UTC time inside each name (ties by name), newest first.
    Invariants: ``keep`` (the snapshot just written) and every snapshot newer
    than it (another agent's, during a failover) are never deleted and count
    first against ``max_space``; the age and size rules never leave fewer
    than ``floor`` snapshots (the newest), so no rule but an explicit
    ``retain`` can thin a storage below that, and none can empty it.
    """
    ordered = sorted(snapshots, key=lambda ref: (ref.when, ref.name), reverse=True)
    keep_when = next((ref.when for ref in ordered if ref.name == keep), None)
    doomed = collections.OrderedDict()
    kept_size, kept = 0, 0
    full = False            # max_space reached: everything older goes
    for position, ref in enumerate(ordered):
        rule = None
        if ref.name == keep or keep_when is not None and ref.when > keep_when:
            pass
        elif retain > 0 and position >= retain:
            rule = "retain"
        elif kept < floor:
            pass
        elif max_age is not None and now - ref.when > max_age:
            rule = "retain_days"
        elif max_space and (full or kept_size + ref.size > max_space):
            rule, full = "max_space", True
        if rule:
            doomed[ref.name] = rule
        else:
            kept_size, kept = kept_size + ref.size, kept + 1
    return doomed


def age_view(refs, keep, now, frequency):
    """``refs`` as the age rule sees them: every gap between neighbouring
    snapshots (and between the newest and ``now``) longer than two
    frequencies and a day counts as a day. Such a gap is a clock that jumped
    ahead (one wrongly dated snapshot, or several while it stays wrong) or an
    outage; counted in full it would make the age rule delete the whole
    history before it as "old". So ``retain_days`` counts the time the agent
    really kept snapshots: a history is thinned by age only once the
    snapshots after a gap span ``retain_days`` themselves."""
    limit = datetime.timedelta(seconds=max(2.0 * (frequency or 0), 86400.0))
    ordered = sorted(refs, key=lambda ref: (ref.when, ref.name), reverse=True)
    shift, later, gaps, view = datetime.timedelta(0), now, [], []
    for ref in ordered:
        if later - ref.when > limit:
            shift += later - ref.when - limit
            gaps.append((ref, later))
        later = ref.when
        view.append(ref._replace(when=ref.when + shift))
    for ref, after in gaps[:1]:
        LOG.log(logging.WARNING if any(r.name == keep for r in ordered if r.when == after)
                else logging.INFO,
                "A gap of %s between %s and %s (a clock that jumped ahead, or an outage): "
                "retain_days counts each such gap as %s",
                format_duration((after - ref.when).total_seconds()), printable(ref.name, 80),
                next((printable(r.name, 80) for r in ordered if r.when == after), "now"),
                format_duration(limit.total_seconds()))
    return view


def without_future(refs, now, where):
    """``refs`` less those dated beyond ``now`` plus FUTURE_SKEW, which are
    named in one WARNING. Such a name was planted, or written by a host whose
    clock ran ahead: trusted, it would put the schedule off for years and
    make retention delete the real snapshots, so it is left alone."""
    limit = now + datetime.timedelta(seconds=FUTURE_SKEW)
    future = [ref for ref in refs if ref.when > limit]
    if future:
        LOG.warning("Ignoring %d snapshot name(s) dated in the future in %s: %s (planted, or "
                    "written by a host whose clock ran ahead; the agent never deletes them)",
                    len(future), where, ", ".join(printable(r.name, 60) for r in future[:5])
                    + (" ..." if len(future) > 5 else ""))
    return [ref for ref in refs if ref.when <= limit]


def apply_retention(storage, keep, now=None):
    """List, plan and delete on one storage; returns the deleted names. Logs
    one line: what is kept, and what each rule deleted. Only names the
    listing returned and the plan chose are ever deleted, each by its exact
    listed name; a failed listing raises before anything is deleted."""
    now = now or Clock().now()
    rules = [("retain", storage.retain, str(storage.retain)),
             ("retain_days", storage.retain_days, str(storage.retain_days)),
             ("max_space", storage.max_space, size_text(storage.max_space))]
    rules = [(rule, text) for rule, limit, text in rules if limit]
    if not rules or storage.retention_off():
        return []
    refs = without_future(storage.list(), now, storage.label())
    max_age = datetime.timedelta(days=storage.retain_days) if storage.retain_days else None
    view = age_view(refs, keep, now, storage.frequency) if max_age else refs
    plan = retention_plan(view, storage.retain, keep, max_age, now, storage.max_space)
    listed = set(ref.name for ref in refs)
    if any(name == keep or name not in listed for name in plan):    # never: a bug guard
        raise StorageError("retention planned to delete a name it did not list; nothing deleted")
    own = [ref for ref in refs if ref.name == keep]
    if storage.max_space and own and own[0].size > storage.max_space:
        LOG.warning("Snapshot %s (%s) alone exceeds max_space=%s on %s; it is kept", keep,
                    format_size(own[0].size), size_text(storage.max_space), storage.label())
    doomed = list(plan)
    LOG.debug("Retention plan for %s: %d listed; %s", storage.label(), len(refs), ", ".join(
        "%s (%s)" % (name, rule) for name, rule in plan.items()) or "delete nothing")
    locked = (storage.delete(doomed) or []) if doomed else []
    doomed = [name for name in doomed if name not in locked]
    LOG.info("Retention on %s: kept %d; deleted %d (%s)%s%s", storage.label(),
             len(refs) - len(doomed), len(doomed), ", ".join(
                 "%d by %s=%s" % (sum(1 for n in doomed if plan[n] == rule), rule, text)
                 for rule, text in rules),
             "; %d locked" % len(locked) if locked else "",
             (": " + ", ".join(doomed[:5]) + (" ..." if len(doomed) > 5 else "")) if doomed else "")
    return doomed


# =============================================================================
# 22. Scrub
# =============================================================================


Verified = collections.namedtuple("Verified", "name size index term checked")
# A stored snapshot read back and found good: its size, Raft index and term,
# and what was compared besides the archive ("matches the S3 ETag (MD5)
# recorded at upload", or "archive only: ..." for another agent's object).

ScrubReport = collections.namedtuple("ScrubReport", "storage verified bad new_bad ended")
# One storage's finished re-verification: verified [Verified], bad {name:
# error} (unreadable, damaged, replaced or missing), new_bad the names not bad
# at the run before (what notifies), ended (aware datetime).


def verify_stored(storage, name, progress=None, written_here=False, interrupt=None, limit=None):
    """Read snapshot ``name`` back from ``storage`` and check it in full (the
    archive as the restore would, and the checksum the store recorded at
    upload) without writing it anywhere; returns Verified. SnapshotError when
    it is damaged or not the object written, StorageError when it cannot be
    read, Stopped on a stop."""
    check = StoredCheck(storage.signals, progress, interrupt, limit)
    storage.read_back(name, check)
    index, term, _, checked = check.finish(storage.parse_name(name), written_here)
    return Verified(name, check.size, index, term, checked)


def scrub_names(refs, scope):
    """The names a re-verification of ``scope`` reads, newest first."""
    ordered = sorted(refs, key=lambda ref: (ref.when, ref.name), reverse=True)
    return [ref.name for ref in (ordered[:1] if scope == "latest" else ordered)]


class ScrubPreempted(Exception):
    """A snapshot cycle (or a reload) is due: the read in progress yields;
    the same snapshot is read again at the next step."""


class _ScrubRun:
    """One storage's re-verification in progress: the names left to read
    (and their listed sizes), what was found so far."""

    def __init__(self, names, missing, sizes=None):
        self.left = list(names)
        self.sizes = sizes or {}
        self.verified = []
        self.bad = collections.OrderedDict((name, "%s is missing: it was stored or listed before and "
                                                  "no retention of this agent deleted it" % name)
                                           for name in missing)


class Scrubber:
    """Re-verifies what each storage with a ``verify_frequency`` holds, one
    object per ``step``: the agent's loop calls it only when no snapshot
    cycle is due, so a re-verification never overlaps a cycle and holds one
    up by at most one object's read.

    A storage is due ``verify_frequency`` after its last re-verification
    (``resume`` takes the time from the previous run's status file), else at
    once. Besides reading objects back, a run notices deletions behind the
    agent's back: a name it stored or listed before that is gone though no
    retention of its own deleted it. What it knows is dropped whenever
    another node may have led (``standby``): another agent's retention is
    not a deletion to report."""

    def __init__(self, clock, interrupt=None):
        self.clock = clock
        self.interrupt = interrupt   # raises ScrubPreempted when a cycle is due
        self.due = {}        # storage name -> monotonic time it is due
        self.last = {}       # storage name -> wall time its last run ended
        self.runs = {}       # storage name -> _ScrubRun in progress
        self.known = {}      # storage name -> names stored or listed before
        self.deleted = collections.defaultdict(set)   # storage name -> deleted by own retention
        self.bad = {}        # storage name -> names bad at the last run
        self.written = collections.defaultdict(set)   # storage name -> names this process stored
        self._lock = threading.Lock()     # upload threads report stores and deletions

    def resume(self, last_verified):
        """{storage name: aware datetime} of re-verifications before a restart."""
        self.last.update(last_verified)

    def plan(self, storages):
        """Due times for the storages to verify (after start or a reload)."""
        mono, now = self.clock.monotonic(), self.clock.now()
        names = set()
        for storage in storages:
            if not storage.verify_frequency:
                continue
            names.add(storage.name)
            last = self.last.get(storage.name)
            since = max(0.0, (now - last).total_seconds()) if last is not None else None
            due = mono if since is None else mono + max(0.0, storage.verify_frequency - since)
            self.due[storage.name] = due
        for name in list(self.due):
            if name not in names:
                self.forget(name)

    def forget(self, name):
        """A storage no longer verified, or moved to another place."""
        with self._lock:
            for state in (self.due, self.runs, self.known, self.deleted, self.bad, self.last,
                          self.written):
                state.pop(name, None)

    def next_due(self):
        """The monotonic time of the next step (None: nothing to verify)."""
        if self.runs:
            return self.clock.monotonic()
        return min(self.due.values()) if self.due else None

    def stored(self, storage, name):
        if storage.static_name:         # one fixed object name, never listed as a snapshot
            return
        with self._lock:
            self.known.setdefault(storage.name, set()).add(name)
            if storage.records_sha256:
                self.written[storage.name].add(name)

    def retained(self, storage, names):
        with self._lock:
            self.deleted[storage.name].update(names)
            self.written[storage.name].difference_update(names)

    def standby(self):
        """Another node may lead: what it stores and deletes is its own."""
        with self._lock:
            self.known.clear()
            self.deleted.clear()

    def pending(self, storages):
        """The storage the next step works on, or None."""
        mono = self.clock.monotonic()
        for storage in storages:
            if storage.name in self.runs:
                return storage
        for storage in storages:
            if storage.name in self.due and self.due[storage.name] <= mono:
                return storage
        return None

    def postpone(self, storage, seconds):
        """Not now (not the leader, or the listing failed): try again later."""
        self.runs.pop(storage.name, None)
        self.due[storage.name] = self.clock.monotonic() + min(seconds, storage.verify_frequency)

    def step(self, storage):
        """Start ``storage``'s run (list it) or read its next object; returns
        a ScrubReport when the run ended, else None. StorageError when the
        listing fails (postpone), Stopped on a stop."""
        run = self.runs.get(storage.name)
        if run is None:
            refs = without_future(storage.list(), self.clock.now(), storage.label())
            listed = set(ref.name for ref in refs)
            with self._lock:
                gone = (self.known.get(storage.name, set()) - listed) - self.deleted[storage.name]
                self.known[storage.name] = set(listed)
                self.deleted[storage.name] = set()
            run = self.runs[storage.name] = _ScrubRun(scrub_names(refs, storage.verify_scope),
                                                      sorted(gone), dict((r.name, r.size) for r in refs))
            LOG.info("Re-verifying %s: %d snapshot(s) to read%s", storage.label(), len(run.left),
                     "; missing: %s" % ", ".join(sorted(gone)) if gone else "")
        if run.left:
            self._read(storage, run, run.left.pop(0))
        if run.left:
            return None
        return self._finish(storage, run)

    def _read(self, storage, run, name):
        progress = Progress("Re-verifying %s in %s" % (name, storage.label()), None, self.clock)
        try:
            found = verify_stored(storage, name, progress, name in self.written[storage.name],
                                  self.interrupt, run.sizes.get(name))
        except Stopped:
            raise
        except ScrubPreempted:
            run.left.insert(0, name)
            LOG.info("Re-verification of %s in %s yields to a due cycle; read again after it",
                     name, storage.label())
            return
        except AgentError as exc:
            with self._lock:
                gone = name in self.deleted[storage.name]
            if gone:             # this agent's retention deleted it since the listing
                return
            run.bad[name] = _error_text(exc)
            LOG.error("Re-verification of %s in %s FAILED: %s", name, storage.label(), _error_text(exc),
                      **fields(storage=storage.name, snapshot=name, error=_error_text(exc)))
            return
        run.verified.append(found)
        LOG.info("Re-verified %s in %s: %s, Raft index %s term %s, %s", name, storage.label(),
                 format_size(found.size), found.index, found.term, found.checked,
                 **fields(storage=storage.name, snapshot=name, bytes=found.size,
                          duration=round(self.clock.monotonic() - progress.start, 3)))

    def _finish(self, storage, run):
        del self.runs[storage.name]
        ended = self.clock.now()
        self.last[storage.name] = ended
        self.due[storage.name] = self.clock.monotonic() + storage.verify_frequency
        before = self.bad.get(storage.name, set())
        self.bad[storage.name] = set(run.bad)
        new_bad = [name for name in run.bad if name not in before]
        LOG.log(logging.ERROR if run.bad else logging.INFO, "Re-verification of %s: %d good, %d bad%s",
                storage.label(), len(run.verified), len(run.bad),
                (" (%s)" % ", ".join(run.bad)) if run.bad else "")
        return ScrubReport(storage, run.verified, run.bad, new_bad, ended)


# =============================================================================
# 23. Status and metrics
# =============================================================================


def write_atomic(path, text, mode):
    """Replace ``path`` with ``text`` so readers see the old or the new file.

    The temporary name is unpredictable and opened with O_EXCL|O_NOFOLLOW, so
    a file or link planted in the directory is never followed or reused; the
    mode is set on the descriptor, whatever the umask."""
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, ".%s.%s.tmp" % (os.path.basename(path), os.urandom(6).hex()))
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(fd, mode)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temp, path)
    except OSError:
        _unlink_quietly(temp)
        raise


def _timestamp(when):
    return (when - EPOCH).total_seconds() if when else 0


STATUS_HISTORY = 48            # recent snapshots kept for the status page's chart


class Status:
    """What the agent tells operators, modelled on Vault Enterprise's
    ``sys/storage/raft/snapshot-auto/status``: the JSON status file, the
    Prometheus metrics and systemd's STATUS line come from here."""

    def __init__(self, clock, frequency=0.0):
        self.clock = clock
        self.started = clock.now()
        self.last_start = self.last_end = self.next_start = None
        self.last_outcome = self.last_error = None
        self.last_duration = 0.0
        self.last_snapshot = None      # dict
        self.is_leader = None
        self.cycles = collections.Counter()
        self.storages = collections.OrderedDict()   # storage name -> dict
        self.frequency = frequency
        self.health_window = 0.0       # 0: two frequencies
        self.last_ok = self.started    # the last cycle that stored, or a standby's leader check
        self.history = collections.deque(maxlen=STATUS_HISTORY)   # recent snapshots, for the page

    def configured(self, frequency, health_window=0.0):
        """A (re)loaded config's global frequency and health window."""
        self.frequency, self.health_window = frequency, health_window

    def scheduled(self, storage, when):
        """When ``storage`` is next due (an aware datetime)."""
        self.storage(storage)["next_run"] = iso(when)

    def planned(self, next_start):
        """The next cycle's start (an aware datetime), as the agent planned it."""
        self.next_start = next_start

    def leader_seen(self, leader):
        """What sys/leader said (True/False); returns what it said before.
        A standby that got its answer is healthy."""
        was, self.is_leader = self.is_leader, leader
        if leader is False:
            self.last_ok = self.clock.now()
        return was

    def storage(self, storage):
        entry = self.storages.setdefault(storage.name, {
            "type": storage.kind, "location": storage.describe(), "last_success": None,
            "last_snapshot": None,
            "last_error": None, "last_error_time": None, "successes": 0, "failures": 0,
            "failures_in_a_row": 0, "retention_error": None, "retention_failures": 0,
            "last_size": None, "next_run": None,
            "last_verified": None, "verified_snapshots": 0, "bad_snapshots": {},
            "verify_failures": 0})
        entry["type"], entry["location"] = storage.kind, storage.describe()    # a reload moved it
        return entry

    def forget(self, names):
        """Storages no longer configured leave the status and the metrics."""
        for name in names:
            self.storages.pop(name, None)

    def record_retention(self, storage, error):
        """A retention's outcome on ``storage``: None (it worked) or its error."""
        entry = self.storage(storage)
        entry["retention_error"] = error
        if error is not None:
            entry["retention_failures"] += 1

    def verified_before(self, storage, when):
        """The last re-verification of a previous run (from its status file)."""
        self.storage(storage)["last_verified"] = iso(when)

    def record_verify(self, report):
        """A finished re-verification (ScrubReport): when, how many were
        good, which were bad and why."""
        entry = self.storage(report.storage)
        entry["last_verified"] = iso(report.ended)
        entry["verified_snapshots"] = len(report.verified)
        entry["bad_snapshots"] = dict(report.bad)
        entry["verify_failures"] += len(report.bad)

    def record(self, result, started, ended, duration, storages, leading=False):
        """A cycle's result; ``leading``: sys/leader said is_self (a skip
        after that, a redirected snapshot, leaves is_leader as it said)."""
        self.last_start, self.last_end, self.last_duration = started, ended, duration
        self.last_outcome = result.outcome
        self.cycles[result.outcome] += 1
        if result.outcome == "skipped":
            self.is_leader = leading
        elif result.snapshot is not None:      # only the leader gets this far
            self.is_leader = True
        self.last_error = "; ".join(result.errors) or None
        if result.outcome in ("stored", "skipped"):
            self.last_ok = ended
        if result.snapshot is not None:
            self.history.append(collections.OrderedDict((
                ("time", iso(started)), ("size", result.snapshot.size),
                ("duration", round(duration, 3)), ("outcome", result.outcome))))
        if result.snapshot is not None and result.stored:
            info = result.snapshot
            self.last_snapshot = collections.OrderedDict((
                ("name", result.stored[0][1]), ("time", iso(started)), ("size", info.size),
                ("sha256", info.sha256), ("raft_index", info.index), ("raft_term", info.term)))
        stored = dict((id(s), name) for s, name in result.stored)
        failed = dict((s.name, e) for s, e in getattr(result, "failures", ()))
        for storage in storages:
            entry = self.storage(storage)
            if id(storage) in stored:
                entry["last_success"] = iso(ended)
                entry["last_snapshot"] = stored[id(storage)]
                entry["last_size"] = result.snapshot.size
                entry["successes"] += 1
                entry["failures_in_a_row"] = 0
            elif storage.name in failed:
                entry["last_error"] = failed[storage.name]
                entry["last_error_time"] = iso(ended)
                entry["failures"] += 1
                entry["failures_in_a_row"] += 1
        retained = dict((s.name, e) for s, _, e in getattr(result, "retention", ()))
        for storage, _ in result.stored:
            self.record_retention(storage, retained.get(storage.name))

    def as_json(self):
        return collections.OrderedDict((
            ("version", __version__), ("pid", os.getpid()), ("started", iso(self.started)),
            ("is_leader", self.is_leader), ("last_start", iso(self.last_start)),
            ("last_end", iso(self.last_end)), ("last_outcome", self.last_outcome),
            ("last_error", self.last_error), ("last_snapshot", self.last_snapshot),
            ("next_start", iso(self.next_start)), ("cycles", dict(self.cycles)),
            ("last_ok", iso(self.last_ok)), ("storages", self.storages),
            ("history", list(self.history))))

    def health(self, now):
        """(healthy, why): whether the last cycle that stored (a standby:
        its last leader check) is within the health window."""
        window = health_limit(self.health_window, self.frequency)
        age = (now - self.last_ok).total_seconds()
        why = "last success %s (%s ago), window %s" % (iso(self.last_ok), format_duration(max(age, 0)),
                                                       format_duration(window))
        return age <= window, why

    def metrics(self):
        """Prometheus text exposition format (version 0.0.4)."""
        lines = []

        def metric(name, kind, help_text, samples):
            lines.append("# HELP %s %s" % (name, help_text))
            lines.append("# TYPE %s %s" % (name, kind))
            for labels, value in samples:
                label_text = ",".join('%s="%s"' % (k, _label_escape(v)) for k, v in labels)
                lines.append("%s%s %s" % (name, "{%s}" % label_text if label_text else "",
                                          repr(float(value)) if isinstance(value, float) else value))

        metric("vault_snapshot_agent_info", "gauge", "Agent version.", [((("version", __version__),), 1)])
        metric("vault_snapshot_is_leader", "gauge",
               "1 when this node was the active node at the last cycle.",
               [((), 1 if self.is_leader else 0)])
        metric("vault_snapshot_frequency_seconds", "gauge", "Configured time between snapshots.",
               [((), float(self.frequency))])
        metric("vault_snapshot_cycles_total", "counter", "Snapshot cycles by outcome.",
               [((("outcome", k),), v) for k, v in sorted(self.cycles.items())])
        metric("vault_snapshot_last_cycle_timestamp_seconds", "gauge", "End of the last cycle.",
               [((), _timestamp(self.last_end))])
        metric("vault_snapshot_last_cycle_duration_seconds", "gauge", "Duration of the last cycle.",
               [((), float(self.last_duration))])
        if self.last_snapshot:
            metric("vault_snapshot_last_size_bytes", "gauge", "Size of the last stored snapshot.",
                   [((), self.last_snapshot["size"])])
            metric("vault_snapshot_last_raft_index", "gauge", "Raft index of the last stored snapshot.",
                   [((), self.last_snapshot["raft_index"] or 0)])
        # storage (the location) and type as before, so dashboards keep working;
        # name tells blocks of one kind apart (two buckets, two prefixes).
        per = [((("storage", v["location"]), ("type", v["type"]), ("name", k)), v)
               for k, v in self.storages.items()]
        metric("vault_snapshot_last_success_timestamp_seconds", "gauge",
               "Last time a snapshot was stored in this storage.",
               [(labels, _timestamp(_parse_iso(v["last_success"])))
                for labels, v in per])
        metric("vault_snapshot_storage_successes_total", "counter", "Snapshots stored.",
               [(labels, v["successes"]) for labels, v in per])
        metric("vault_snapshot_storage_failures_total", "counter",
               "Failed stores (retention failures are counted apart).",
               [(labels, v["failures"]) for labels, v in per])
        metric("vault_snapshot_retention_failures_total", "counter",
               "Retentions that failed (listing or deleting); the snapshot itself was stored.",
               [(labels, v["retention_failures"]) for labels, v in per])
        metric("vault_snapshot_storage_consecutive_failures", "gauge",
               "Failed stores in a row (0 after a success).",
               [(labels, v["failures_in_a_row"]) for labels, v in per])
        metric("vault_snapshot_last_verified_timestamp_seconds", "gauge",
               "End of the last re-verification of this storage's snapshots (0: none yet).",
               [(labels, _timestamp(_parse_iso(v["last_verified"]))) for labels, v in per])
        metric("vault_snapshot_verify_bad_snapshots", "gauge",
               "Snapshots the last re-verification found unreadable, damaged, replaced or missing.",
               [(labels, len(v["bad_snapshots"])) for labels, v in per])
        metric("vault_snapshot_verify_failures_total", "counter",
               "Bad snapshots found by re-verifications, each time one was found.",
               [(labels, v["verify_failures"]) for labels, v in per])
        return "\n".join(lines) + "\n"

    def summary(self):
        if self.last_outcome is None:
            return "starting"
        text = "last cycle %s at %s" % (self.last_outcome, iso(self.last_end))
        if self.next_start:
            text += ", next %s" % iso(self.next_start)
        return text


def read_status_file(path):
    """The parsed status file at ``path`` (OSError, ValueError otherwise)."""
    with open_regular(path) as handle:
        return json.loads(read_at_most(handle, MAX_JSON_BYTES).decode("utf-8"))


def health_limit(window, frequency):
    """Seconds the last good cycle may be old: ``health_window``, else two frequencies."""
    return window or 2.0 * (frequency or 3600.0)


def previous_verifications(path):
    """{storage name: aware datetime} of the re-verifications a previous
    run recorded in the status file ``path`` (empty when unset, missing or
    not the agent's JSON), so a restart does not read everything again."""
    if not path:
        return {}
    try:
        storages = read_status_file(path)["storages"]
        found = ((name, _parse_iso(entry.get("last_verified"))) for name, entry in storages.items())
        return dict((name, when) for name, when in found if when is not None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _label_escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _parse_iso(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) if text else None


# =============================================================================
# 24. Status page
# =============================================================================


STATUS_CSS = ("body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}"
              "table{border-collapse:collapse;margin:1em 0}"
              "th,td{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}"
              "th{background:#f4f4f4}.bad{color:#b00020;font-weight:600}.ok{color:#137333}"
              ".muted{color:#777}svg{border:1px solid #ddd;background:#fafafa}")


def _h(value):
    """Text for HTML: escaped, '-' for nothing."""
    import html
    return html.escape("-" if value in (None, "") else str(value), quote=True)


def status_page(status, now, host):
    """The one-page HTML status: the agent, each storage, a chart of the
    recent snapshots; every value escaped; no script, no external asset."""
    healthy, why = status.health(now)
    rows = []
    for name, entry in status.storages.items():
        failing = entry["failures_in_a_row"] or entry["bad_snapshots"] or entry["retention_error"]
        rows.append("<tr><td class=\"%s\">%s<br><span class=muted>%s</span></td><td>%s</td>"
                    "<td>%s<br><span class=muted>%s</span></td><td>%s</td><td>%s</td>"
                    "<td>%s</td><td>%s</td></tr>" % (
                        "bad" if failing else "ok", _h(name), _h(entry["location"]),
                        _h(entry["last_success"]), _h(entry["last_snapshot"]),
                        _h(format_size(entry["last_size"]) if entry["last_size"] else None),
                        _h(entry["next_run"]), _h(entry["failures_in_a_row"]),
                        _h(entry["last_error"] if entry["failures_in_a_row"] else entry["retention_error"]),
                        _h("%s, %d bad" % (entry["last_verified"], len(entry["bad_snapshots"]))
                           if entry["last_verified"] else None)))
    return "".join((
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width\">",
        "<title>%s on %s</title><style>%s</style></head><body>" % (_h(PROG), _h(host), STATUS_CSS),
        "<h1>%s on %s</h1>" % (_h(PROG), _h(host)),
        "<p><span class=\"%s\">%s</span> (%s) &middot; leader: %s &middot; last cycle: %s at %s &middot; "
        "next: %s</p>" % ("ok" if healthy else "bad", "healthy" if healthy else "UNHEALTHY", _h(why),
                          _h({True: "yes", False: "no"}.get(status.is_leader)),
                          _h(status.last_outcome), _h(iso(status.last_end)), _h(iso(status.next_start))),
        "<table><thead><tr><th>storage</th><th>last success</th><th>last snapshot</th>"
        "<th>next run</th><th>failures in a row</th><th>last error</th><th>last verified</th>"
        "</tr></thead><tbody>%s</tbody></table>" % "".join(rows),
        "<h2>Recent snapshots</h2>%s" % _history_chart(list(status.history)),
        "<p class=muted>%s %s, pid %d, started %s &middot; <a href=\"/metrics\">metrics</a> &middot; "
        "<a href=\"/healthz\">healthz</a> &middot; <a href=\"/status.json\">status.json</a></p>"
        % (_h(PROG), _h(__version__), os.getpid(), _h(iso(status.started))),
        "</body></html>\n"))


def _history_chart(history, width=600, height=140):
    """An inline SVG: a bar per recent snapshot (height: its size), a dot
    for how long its cycle took; each with a tooltip."""
    if not history:
        return "<p class=muted>No snapshot yet.</p>"
    most = max(item["size"] for item in history) or 1
    slowest = max(item["duration"] for item in history) or 1.0
    step = float(width) / max(len(history), 1)
    shapes = []
    for number, item in enumerate(history):
        bar = max(1.0, (height - 20) * item["size"] / float(most))
        x = number * step
        tip = _h("%s: %s in %s (%s)" % (item["time"], format_size(item["size"]),
                                       format_duration(item["duration"]), item["outcome"]))
        shapes.append("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\">"
                      "<title>%s</title></rect>" % (x + 1, height - bar, max(step - 2, 1), bar,
                                                    "#4a7bd0" if item["outcome"] == "stored" else "#d08a4a",
                                                    tip))
        shapes.append("<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"#222\"><title>%s</title>"
                      "</circle>" % (x + step / 2, height - 4 - (height - 24) * item["duration"] / slowest,
                                     tip))
    return ("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" role=\"img\" "
            "aria-label=\"sizes and durations of the recent snapshots\">%s</svg>"
            "<p class=muted>bars: size (largest %s) &middot; dots: cycle duration (longest %s)</p>"
            % (width, height, "".join(shapes), _h(format_size(most)), _h(format_duration(slowest))))


def status_csp():
    """The page's Content-Security-Policy: nothing but its own style block."""
    digest = base64.b64encode(hashlib.sha256(STATUS_CSS.encode("utf-8")).digest()).decode("ascii")
    return ("default-src 'none'; style-src 'sha256-%s'; img-src 'none'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'" % digest)


def status_route(status, target, now, host):
    """(code, body, content type, extra headers) for a request target of
    the metrics address: /metrics, / (the page), /healthz, /status.json."""
    path = target.split("?", 1)[0]
    if path == "/metrics":
        return 200, status.metrics(), "text/plain; version=0.0.4; charset=utf-8", ()
    if path == "/":
        return 200, status_page(status, now, host), "text/html; charset=utf-8", (
            "Content-Security-Policy: " + status_csp(), "X-Content-Type-Options: nosniff",
            "Referrer-Policy: no-referrer", "Cache-Control: no-store", "X-Frame-Options: DENY")
    if path == "/healthz":
        healthy, why = status.health(now)
        return (200 if healthy else 503), ("ok: " if healthy else "unhealthy: ") + why + "\n", \
            "text/plain; charset=utf-8", ("Cache-Control: no-store",)
    if path == "/status.json":
        return 200, json.dumps(status.as_json(), indent=2) + "\n", "application/json", (
            "Cache-Control: no-store",)
    return None


# =============================================================================
# 25. Metrics server and systemd
# =============================================================================


METRICS_HEADER_TIMEOUT = 5.0   # seconds a client has, in all, to send its request line and headers
METRICS_MAX_CLIENTS = 16       # connections served at once; beyond, the oldest is closed
METRICS_MAX_LINE = 8192        # bytes of request line (414 beyond)
METRICS_MAX_HEAD = 16384       # bytes of request line and headers (431 beyond)

_HTTP_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                 414: "URI Too Long", 431: "Request Header Fields Too Large",
                 500: "Internal Server Error", 503: "Service Unavailable"}


def _http_answer(code, body, content_type="text/plain; charset=utf-8", head_only=False, extra=()):
    """A whole HTTP/1.1 response, ``Connection: close``."""
    lines = ["HTTP/1.1 %d %s" % (code, _HTTP_REASONS[code]), "Content-Type: " + content_type,
             "Content-Length: %d" % len(body), "Connection: close"] + list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


def metrics_answer(head, render):
    """The bytes answering a request whose line and headers are ``head``:
    ``GET`` (or ``HEAD``) of a target ``render(target)`` knows (it returns
    (code, text, content type, extra headers), or None: 404)."""
    parts = head.split(b"\n", 1)[0].split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _http_answer(400, b"Bad request\n")
    method, target = parts[0], parts[1]
    if method not in (b"GET", b"HEAD"):
        return _http_answer(405, b"Only GET\n", extra=("Allow: GET, HEAD",))
    try:
        answer = render(target.decode("latin-1"))
        if answer is None:
            return _http_answer(404, b"Not found: /metrics, /healthz, /status.json or / (the page)\n")
        code, text, content_type, extra = answer
        body = text.encode("utf-8")
    except Exception as exc:           # a bug: the scraper sees 500, the journal one line
        LOG.error("Metrics: rendering failed with %s: %s", type(exc).__name__, exc)
        return _http_answer(500, b"Internal error\n")
    return _http_answer(code, body, content_type, head_only=method == b"HEAD", extra=extra)


def _line_too_long(received):
    newline = received.find(b"\n")
    return newline > METRICS_MAX_LINE or (newline < 0 and len(received) > METRICS_MAX_LINE)


class _MetricsClient:
    """One connection: ``head`` while its request comes in, ``answer`` while
    the reply goes out, ``drain`` while its last bytes are read and dropped
    before the close (so a close does not reset the reply away)."""

    def __init__(self, sock, deadline):
        self.sock, self.deadline = sock, deadline
        self.state, self.received, self.pending = "head", b"", b""

    def take(self, data, render):
        """Add received bytes; the answer once it is known (else None)."""
        self.received += data
        if _line_too_long(self.received):
            return _http_answer(414, b"Request line too long\n")
        ends = [i for i in (self.received.find(b"\r\n\r\n"), self.received.find(b"\n\n"))
                if 0 <= i <= METRICS_MAX_HEAD]
        if ends:
            return metrics_answer(self.received[:min(ends)], render)
        if len(self.received) > METRICS_MAX_HEAD:
            return _http_answer(431, b"Request headers too long\n")
        return None


class _MetricsLoop:
    """The metrics server's one thread: a selector over the listener, a wake-up
    socket and at most ``max_clients`` connections. Every connection has a
    deadline (``timeout`` seconds, in all, for its request line and headers,
    as long again to take the reply); a new connection beyond the cap closes
    the oldest, so trickling clients cost neither threads nor scrapes."""

    def __init__(self, listener, render, clock, timeout, max_clients):
        import selectors
        self.events = selectors
        self.listener, self.render, self.clock = listener, render, clock
        self.timeout, self.max_clients = timeout, max_clients
        self.clients = collections.OrderedDict()      # socket -> _MetricsClient, oldest first
        self.stopping = False
        self.pause, self.paused_until = 0.0, None    # accept() back-off (see _pause_accepts)
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        for sock in (listener, self.wake_r):
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
        self.thread = start_thread(self.run, "metrics")

    def run(self):
        try:
            while not self.stopping:
                accept = False
                for key, _ in self.selector.select(self._wait()):
                    if key.fileobj is self.listener:
                        accept = True
                    elif key.fileobj is self.wake_r:
                        self._woken()
                    elif key.fileobj in self.clients:   # not dropped earlier in this turn
                        self._serve(key.data)
                self._expire()
                if accept:              # after the reads, so a new client's request is served
                    self._accept()
                self._resume_accepts()
        except Exception as exc:        # a bug: one line, and the agent runs on without metrics
            LOG.error("Metrics server stopped by %s: %s", type(exc).__name__, exc)
        finally:
            self._close_all()

    def stop(self, wait=2.0):
        self.stopping = True
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass
        self.thread.join(wait)

    def _woken(self):
        try:
            self.wake_r.recv(64)
        except OSError:
            pass

    def _wait(self):
        times = [client.deadline for client in self.clients.values()]
        if self.paused_until is not None:
            times.append(self.paused_until)
        if not times:
            return None
        return max(0.0, min(times) - self.clock.monotonic())

    def _pause_accepts(self):
        """accept() failed (out of descriptors): stop watching the listener
        for a while (5 ms, doubling up to 1 s, as Go's http.Server), or the
        pending connection would keep the loop spinning on a whole core."""
        self.pause = min(max(self.pause * 2, 0.005), 1.0)
        self.paused_until = self.clock.monotonic() + self.pause
        self.selector.unregister(self.listener)

    def _resume_accepts(self):
        if self.paused_until is not None and self.clock.monotonic() >= self.paused_until:
            self.paused_until = None
            self.selector.register(self.listener, self.events.EVENT_READ)

    def _accept(self):
        for _ in range(self.max_clients):       # a batch, then the reads come first again
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:              # e.g. out of descriptors
                LOG.debug("Metrics: accept failed: %s", exc)
                self._pause_accepts()
                return
            self.pause = 0.0
            if len(self.clients) >= self.max_clients:
                self._drop(next(iter(self.clients)))
            sock.setblocking(False)
            client = _MetricsClient(sock, self.clock.monotonic() + self.timeout)
            self.clients[sock] = client
            self.selector.register(sock, self.events.EVENT_READ, client)

    def _serve(self, client):
        if client.state == "answer":
            self._send(client)
            return
        try:
            data = client.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = None
        if not data:                            # hung up (or reset): nothing more to say
            self._drop(client.sock)
        elif client.state == "head":
            answer = client.take(data, self.render)
            if answer is not None:
                client.state, client.pending = "answer", answer
                client.deadline = self.clock.monotonic() + self.timeout
                self.selector.modify(client.sock, self.events.EVENT_WRITE, client)
                self._send(client)

    def _send(self, client):
        try:
            client.pending = client.pending[client.sock.send(client.pending):]
            if not client.pending:              # all out: read what is left until the close
                client.state = "drain"
                client.sock.shutdown(socket.SHUT_WR)
                self.selector.modify(client.sock, self.events.EVENT_READ, client)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:                         # the client went away
            self._drop(client.sock)

    def _expire(self):
        now = self.clock.monotonic()
        for sock, client in list(self.clients.items()):
            if client.deadline <= now:
                self._drop(sock)

    def _drop(self, sock):
        self.clients.pop(sock, None)
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _close_all(self):
        for sock in list(self.clients):
            self._drop(sock)
        self.selector.close()
        for sock in (self.listener, self.wake_r, self.wake_w):
            sock.close()


def _metrics_listener(bind):
    """A socket listening on ``bind`` (host, port), IPv4 or IPv6; OSError if not."""
    family, _, _, _, address = socket.getaddrinfo(bind[0], bind[1], 0, socket.SOCK_STREAM, 0,
                                                  socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)                # waiting costs no thread; the cap applies on accept
    except OSError:
        sock.close()
        raise
    return sock


def _listen_error(bind, exc):
    return "metrics_address: cannot listen on %s:%d: %s" % (bind[0], bind[1], exc.strerror or exc)


class MetricsServer:
    """Serves ``GET /metrics`` from a Status on (host, port), in one thread.

    Slow clients are bounded three ways: ``max_clients`` connections at once
    (a new one closes the oldest, never a new thread), ``header_timeout``
    seconds in all for a request line and headers (Go's ReadHeaderTimeout, not
    per read, so a byte every few seconds does not hold a connection), and
    8 KiB of request line (414) / 16 KiB of headers (431). A stop or a
    rebind wakes the thread at once."""

    def __init__(self, bind, status, clock=None, header_timeout=METRICS_HEADER_TIMEOUT,
                 max_clients=METRICS_MAX_CLIENTS):
        self.status, self.clock, self.requested = status, clock or Clock(), bind
        self.header_timeout, self.max_clients = header_timeout, max_clients
        try:
            listener = _metrics_listener(bind)
        except OSError as exc:
            raise ConfigError(_listen_error(bind, exc)) from exc
        self._start(listener)
        LOG.info("Serving Prometheus metrics on http://%s/metrics", self.where())

    def _start(self, listener):
        self.address = listener.getsockname()[:2]
        host = socket.gethostname()
        self.loop = _MetricsLoop(listener, lambda target: status_route(
            self.status, target, self.clock.now(), host), self.clock, self.header_timeout,
            self.max_clients)

    def where(self):
        host, port = self.address
        return "%s:%d" % ("[%s]" % host if ":" in host else host, port)

    def rebind(self, bind):
        """Serve on ``bind`` from now on: None when it does, else the error line
        (the old address serves on). When the new address needs our own port
        (another host name for it), the old listener is closed first and
        taken back if the new bind fails."""
        old = self.where()
        try:
            listener = _metrics_listener(bind)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and bind[1] == self.address[1]:
                return self._swap_same_port(bind, old)
            return _listen_error(bind, exc) + "; still serving on " + old
        self._switch(listener, bind, old)
        return None

    def _switch(self, listener, bind, old):
        self.loop.stop()
        self._start(listener)
        self.requested = bind
        LOG.info("Serving Prometheus metrics on http://%s/metrics (was %s)", self.where(), old)

    def _swap_same_port(self, bind, old):
        previous = self.address
        self.loop.stop()
        try:
            listener = _metrics_listener(bind)
        except OSError as exc:
            error = _listen_error(bind, exc)
            try:
                self._start(_metrics_listener(previous))
            except OSError:
                return error + "; the old address is lost too: no metrics until a reload"
            return error + "; still serving on " + old
        self._switch(listener, bind, old)
        return None

    def serving(self):
        return self.loop.thread.is_alive()

    def close(self):
        self.loop.stop()


def follow_metrics_address(server, cfg, status):
    """After a reload: the metrics server for ``cfg.metrics_address`` (None
    when unset), made by rebinding, starting or closing ``server``. A bind
    that fails is logged, and the old address serves on."""
    bind = getattr(cfg, "metrics_bind", None) if cfg.metrics_address else None
    if server is not None and bind is None:
        server.close()
        LOG.info("Metrics server stopped: metrics_address removed")
        return None
    if server is None:
        try:
            return MetricsServer(bind, status) if bind else None
        except ConfigError as exc:
            LOG.error("%s", exc)
            return None
    if bind != server.requested or not server.serving():
        error = server.rebind(bind)
        if error:
            LOG.error("%s", error)
    return server


class SystemdNotifier:
    """sd_notify(3) over $NOTIFY_SOCKET with the standard library; silent when
    not started by systemd. With WatchdogSec= set, a thread sends WATCHDOG=1
    every half period while the main loop shows signs of life."""

    def __init__(self, env, signals, clock):
        self.signals, self.clock = signals, clock
        self.sock = self.address = None
        address = env.get("NOTIFY_SOCKET")
        if address and address[0] in "/@":
            self.address = "\0" + address[1:] if address[0] == "@" else address
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.watchdog = 0.0
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if self.sock and usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 1e6
        self._stopped = threading.Event()

    def notify(self, *fields):
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(fields).encode("utf-8"), self.address)
        except (OSError, socket.error) as exc:
            LOG.debug("sd_notify failed: %s", exc)

    def start_watchdog(self):
        if not self.watchdog:
            return
        start_thread(self._watchdog_loop, "watchdog")

    def _watchdog_loop(self):
        interval = self.watchdog / 2.0
        while not self._stopped.is_set():
            alive = self.signals.waiting or self.signals.idle_for() < self.watchdog
            if alive:
                self.notify("WATCHDOG=1")
            self._stopped.wait(interval)

    def close(self):
        self._stopped.set()
        if self.sock is not None:
            self.sock.close()




# =============================================================================
# 26. Notifications
# =============================================================================


NOTIFY_QUEUE = 100          # events waiting for delivery; beyond, the oldest are dropped
NOTIFY_OUTPUT = 16 * 1024   # bytes of a notify command's output kept for the log
NOTIFY_ANSWER = 300         # bytes of a webhook's error answer kept for the log
NOTIFY_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY",
              "https_proxy", "http_proxy", "no_proxy")
# What a notify command inherits from the agent's environment: never tokens
# or cloud credentials (VAULT_TOKEN, AWS_SECRET_ACCESS_KEY...).

Event = collections.namedtuple("Event", "event storage snapshot error failures when")
Event.__new__.__defaults__ = ("", "", "", 0, None)
# event: one of NOTIFY_EVENTS; storage: block name(s), comma-separated;
# snapshot: name(s); error: one line; failures: in a row (or bad snapshots).

_EVENT_TITLES = {
    "failed": "Vault snapshots FAILING",
    "recovered": "Vault snapshots recovered",
    "verify_failed": "Stored Vault snapshot(s) failed re-verification",
    "retention_failed": "Vault snapshot retention failing",
    "stored": "Vault snapshot stored",
}


def event_text(event, host):
    """The one-paragraph message of ``event``: what a chat shows."""
    facts = ["storage %s" % event.storage if event.storage else "",
             "snapshot %s" % event.snapshot if event.snapshot else "",
             ("%d in a row" if event.event in ("failed", "recovered") else "%d") % event.failures
             if event.failures else ""]
    text = "%s on %s: %s" % (_EVENT_TITLES[event.event], host, ", ".join(f for f in facts if f))
    return text + (" - %s" % event.error if event.error else "")


def event_document(event, host):
    """The webhook's JSON: ``text`` for Slack, Mattermost and Teams incoming
    webhooks, the facts as fields for anything else."""
    return collections.OrderedDict((
        ("text", event_text(event, host)), ("event", event.event), ("storage", event.storage),
        ("snapshot", event.snapshot), ("error", event.error), ("failures", event.failures),
        ("host", host), ("time", iso(event.when)), ("agent", "%s %s" % (PROG, __version__))))


def event_environment(event, host, env):
    """The notify command's environment: a few of the agent's (NOTIFY_ENV)
    and the event's facts as SNAPSHOT_* variables."""
    result = dict((name, env[name]) for name in NOTIFY_ENV if env.get(name))
    result.setdefault("PATH", os.defpath)
    result.update({"SNAPSHOT_EVENT": event.event, "SNAPSHOT_STORAGE": event.storage,
                   "SNAPSHOT_NAME": event.snapshot, "SNAPSHOT_ERROR": event.error,
                   "SNAPSHOT_FAILURES": str(event.failures), "SNAPSHOT_HOST": host,
                   "SNAPSHOT_TIME": iso(event.when) or "", "SNAPSHOT_TEXT": event_text(event, host)})
    return result


def config_secrets(cfg):
    """Every credential value in ``cfg`` (to mask in what others print)."""
    values = list(cfg.values.values()) + [v for _, settings in cfg.storages for v in settings.values()]
    return [v.reveal() for v in values if isinstance(v, Secret) and v.reveal()]


class Notifications:
    """Tells someone about events: runs ``notify_command`` and POSTs to
    ``notify_url``, from one background thread, so a cycle never waits for
    either. Each delivery has ``notify_timeout``: the command (in its own
    process group, never a shell) is then killed with its group, the webhook
    abandoned. A failing notification is logged, never retried beyond three
    quick attempts on a 429/503 (the receiver said it took nothing), never
    fails a cycle. ``close`` waits for what is queued (``--once``), or, on a
    stop, kills what runs and drops the rest."""

    def __init__(self, cfg, env, clock, http=None, signals=None):
        self.signals = signals          # a stop while close() waits drops the rest
        self.command, self.url = cfg.notify_command, cfg.notify_url
        self.events, self.timeout = set(cfg.notify_events), cfg.notify_timeout
        self.env, self.clock = env, clock
        # the webhook's path and query are its secret: replaced where they
        # appear, not a reason to withhold a whole text that shares a host name
        self.secrets = [v for v in config_secrets(cfg) if not self.url or v != self.url.reveal()]
        parts = urllib.parse.urlsplit(self.url.reveal()) if self.url else None
        self._url_parts = [p for p in ((parts.path, parts.query) if parts else ()) if len(p) > 1]
        self.host = socket.gethostname()
        self.http = http or Http(TlsOptions(cfg.notify_ca_cert, None, None, None, None, False),
                                 timeout=self.timeout, deadline=self.timeout,
                                 proxy=ProxyPolicy(None, env, "notify_url"))
        self._queue = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._thread = None
        self._busy = False
        self._closing = False
        self._child = None       # the running command's Popen
        self._stopping = threading.Event()   # close(wait=False): cut a retry's pause

    def enabled(self):
        return bool(self.command or self.url)

    def busy(self):
        """Whether its thread still delivers."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def send(self, event):
        """Queue ``event`` (an Event) if its kind is one of notify_events."""
        if not self.enabled() or event.event not in self.events:
            return
        event = event._replace(when=event.when or self.clock.now(), error=self._mask(
            printable(one_line(event.error), 400)) if event.error else "",
            storage=_capped(event.storage), snapshot=_capped(event.snapshot))
        with self._cond:
            if self._closing:
                return
            if len(self._queue) >= NOTIFY_QUEUE:
                dropped = self._queue.popleft()
                LOG.warning("Notification queue full: dropped the %s event of %s", dropped.event,
                            iso(dropped.when))
            self._queue.append(event)
            if self._thread is None:
                self._thread = start_thread(self._run, "notify")
            self._cond.notify()

    def _mask(self, text):
        """``text`` with config secrets and the webhook's path shown as ***."""
        text = masked(text, self.secrets)
        for part in self._url_parts:
            text = text.replace(part, "***")
        return text

    def close(self, wait=True):
        """Deliver what is queued (``wait``; at most each one's timeout), or
        (``wait=False``, a stop) drop it and kill a running command; then
        end the thread. ``wait=None`` (a reload) lets the thread deliver
        what is queued and end, without waiting for it."""
        with self._cond:
            if wait is False:
                if self._queue:
                    LOG.warning("Stopping: %d notification(s) not sent", len(self._queue))
                self._queue.clear()
            self._closing = True
            self._cond.notify()
            thread, child = self._thread, self._child
        if wait is False:
            self._stopping.set()
            if child is not None:
                _kill_group(child)
        if thread is not None and wait is not None:
            end = time.monotonic() + ((self.timeout * 2 + 5) * (len(self._queue) + 1) if wait else 2.0)
            while thread.is_alive() and time.monotonic() < end:
                thread.join(0.2)
                if wait and self.signals is not None and self.signals.stop_requested:
                    self.close(wait=False)          # a stop while --once waits: drop the rest
                    return

    def _run(self):
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    self._thread = None
                    return
                event = self._queue.popleft()
            try:
                if self.command:
                    self._run_command(event)
                if self.url:
                    self._post(event)
            except Exception as exc:      # a bug here must not end the deliveries
                LOG.error("Notification of %s failed: %s: %s", event.event, type(exc).__name__, exc)

    def _run_command(self, event):
        import subprocess
        started = time.monotonic()
        try:
            child = spawn(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=event_environment(event, self.host, self.env),
                          close_fds=True, start_new_session=True)
        except OSError as exc:
            LOG.error("notify_command %s cannot run: %s", self.command[0], exc.strerror or exc)
            return
        with self._cond:
            self._child = child
        try:
            output, killed = _collect(child, started + self.timeout)
        finally:
            with self._cond:
                self._child = None
            child.stdout.close()
        for line in output.decode("utf-8", "replace").splitlines()[:20]:
            if line.strip():
                LOG.info("notify_command: %s", self._mask(printable(line, 300)))
        took = format_duration(time.monotonic() - started)
        if killed:
            LOG.error("notify_command for %s killed after %s (notify_timeout)", event.event, took)
        elif child.returncode:
            LOG.error("notify_command for %s exited with %s after %s", event.event,
                      child.returncode, took)
        else:
            LOG.info("Notified %s through notify_command (%s)", event.event, took)

    def _post(self, event):
        url = self.url.reveal()
        parts = urllib.parse.urlsplit(url)
        where = "notify_url %s://%s" % (parts.scheme, parts.hostname)      # the path is the secret
        body = json.dumps(event_document(event, self.host)).encode("utf-8")
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        end = time.monotonic() + self.timeout
        for attempt in range(3):
            try:
                with self.http.request("POST", url, headers, body) as resp:
                    status = resp.status
                    wait = retry_after(resp.header("Retry-After"), self.clock.now())
                    answer = b"" if 200 <= status < 300 else resp.body(NOTIFY_ANSWER, cut=True)
            except TransportError as exc:
                LOG.error("Notification of %s to %s failed: %s", event.event, where,
                          self._mask(str(exc).replace("(request_timeout)", "(notify_timeout)")))
                return
            if 200 <= status < 300:
                LOG.info("Notified %s through %s", event.event, where)
                return
            wait = max(wait or 0.0, 1.0 * 2 ** attempt)
            if status not in (429, 503) or attempt == 2 or time.monotonic() + wait > end:
                break
            if self._stopping.wait(wait):
                return
        LOG.error("Notification of %s to %s failed: HTTP %d%s%s", event.event, where, status,
                  " (redirects are not followed)" if 300 <= status < 400 else "",
                  ": " + masked(self._mask(printable(one_line(answer.decode("utf-8", "replace")), 200)),
                                [url] + self._url_parts) if answer.strip() else "")


def _capped(names, limit=2000):
    """A comma-separated list cut to about ``limit`` characters, saying how
    many were left out (an environment variable over 128 KiB fails exec)."""
    if len(names) <= limit:
        return names
    items = names.split(", ")
    shown = []
    for item in items:
        if sum(len(i) + 2 for i in shown) + len(item) > limit:
            break
        shown.append(item)
    return "%s (and %d more)" % (", ".join(shown) or names[:limit], len(items) - len(shown))


def _collect(child, deadline):
    """Read ``child``'s output (NOTIFY_OUTPUT bytes kept, the rest
    discarded) until it exits, killing its process group at ``deadline``;
    what it leaves running in its group (a ``cmd &``) ends half a second
    after it does. Returns (output, killed)."""
    fd = child.stdout.fileno()
    _set_nonblocking(fd)
    kept, killed, exited_at = bytearray(), False, None
    while True:
        now = time.monotonic()
        if exited_at is None and child.poll() is not None:
            exited_at = now
        if now >= deadline or (exited_at is not None and now - exited_at > 0.5):
            killed = exited_at is None
            _kill_group(child)
            child.wait()
            break
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if not data:        # the pipe closed: wait for the exit, or the deadline
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except Exception:       # subprocess.TimeoutExpired
                killed = True
            _kill_group(child)     # and whatever it left running in its group
            child.wait()
            break
        kept.extend(data[:max(0, NOTIFY_OUTPUT - len(kept))])
    return bytes(kept), killed


def _kill_group(child):
    """SIGTERM ``child``'s process group, then, 2 s later or once the
    command is gone, SIGKILL whatever of the group is left (a grandchild
    that ignores SIGTERM)."""
    import subprocess
    try:
        os.killpg(child.pid, signal.SIGTERM)
    except OSError:
        return
    try:
        child.wait(2.0)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except OSError:
        pass            # the whole group is gone
    child.wait()


# =============================================================================
# 27. Agent
# =============================================================================


CycleResult = collections.namedtuple("CycleResult", "outcome snapshot stored errors failures retention")
CycleResult.__new__.__defaults__ = ((),)
# outcome: "stored" (everywhere), "partial", "failed", "skipped" (not leader), "stopped";
# stored: [(storage, name)]; failures: [(storage, error text)] of uploads (retried by
# taking a new snapshot); retention: [(storage, kept name, error text)] of retentions
# that failed after a good upload (retried as retention, never by a new snapshot).


class Agent:
    """Runs snapshot cycles on a schedule, stores them, reports on them.

    Each storage has its own ``frequency``; its next snapshot is due one
    frequency after its newest snapshot (read from the storage at start, so a
    restart or a crash loop does not take snapshots early, and a long outage
    leads to one catch-up, not many). A cycle serves every storage that is
    due. ``align`` rounds due times up to whole multiples of the frequency
    (UTC), ``jitter`` adds a random delay so a fleet spreads out. A storage
    whose cycle failed (Vault unreachable, sealed, a bad snapshot, its own
    upload) is due again after ``retry_interval``, doubling with each failure
    in a row, never later than its regular time: a blip costs a minute, not a
    day of backups. A retention that failed after a good upload is retried on
    its own, the same way, without taking another snapshot.

    Due times are kept on the monotonic clock (as Go timers and systemd's
    monotonic timers are): a wall clock stepped back or forward neither
    delays nor hastens a snapshot. The wall clock only names snapshots and
    places ``align`` boundaries. Becoming the leader plans again from the
    storages but never shortens a retry back-off.

    ``loader()`` returns a fresh (Config, storages) pair; it is called again on
    SIGHUP, and a failure keeps the running config. Time and waiting come from
    ``clock`` and ``signals`` so tests can drive days in milliseconds.
    """

    def __init__(self, loader, clock=None, signals=None, vault_factory=VaultClient,
                 notifier=None, rand=random.random, env=None):
        self.loader = loader
        self.clock = clock or Clock()
        self.signals = signals or Signals()
        self.runtime = Runtime(os.environ if env is None else env, self.clock, self.signals)
        self.vault_factory = vault_factory
        self.notifier = notifier
        self.rand = rand
        self.status = Status(self.clock)
        self.due = {}          # storage.name -> monotonic time it is due
        self.last_start = {}   # storage.name -> (aware datetime, monotonic) of its last cycle
        self.failed_runs = {}  # storage.name -> failed uploads in a row
        self.retry_at = {}     # storage.name -> monotonic time before which no retry starts
        self.held = set()      # storages whose back-off outlasts a new leadership (see plan)
        self.stored_at = {}    # storage.name -> (wall, monotonic) start of its last stored cycle
        self.leading = False   # the running cycle saw is_self: true
        self.retention_retry = {}  # storage.name -> [monotonic due, kept name, failures]
        self.next_poll = None  # monotonic time of the next leader poll; None: no polling
        self.streak = {}       # storage.name -> failed cycles in a row (what notifies)
        self.retention_failing = set()   # storage names whose retention failed last
        self.scrubber = Scrubber(self.clock, self._scrub_interrupt)
        self._scrub_until = None   # monotonic time a re-verification's read yields at (a cycle)
        self.cfg, self.storages = loader(self.runtime)
        self.vault = vault_factory(self.cfg, clock=self.clock, signals=self.signals,
                                   env=self.runtime.env)
        self.alerts = Notifications(self.cfg, self.runtime.env, self.clock, signals=self.signals)
        self.retired_alerts = []   # Notifications replaced by a reload, still delivering
        self.status.configured(self.cfg.frequency, self.cfg.health_window)
        verified = previous_verifications(self.cfg.status_file)
        self.scrubber.resume(verified)
        for storage in self.storages:
            if storage.name in verified:
                self.status.verified_before(storage, verified[storage.name])

    def reload(self):
        try:
            cfg, storages = self.loader(self.runtime)
        except Exception as exc:       # whatever the new file does, the running config stays
            LOG.error("Config reload failed, keeping the running config: %s", exc
                      if isinstance(exc, ConfigError) else "%s: %s" % (type(exc).__name__, exc))
            LOG.debug("Traceback", exc_info=True)
            return False
        for warning in cfg.warnings:
            LOG.warning("%s", warning)
        self._forget(self.storages, storages)
        self.cfg, self.storages = cfg, storages
        self.vault = self.vault_factory(cfg, clock=self.clock, signals=self.signals,
                                        env=self.runtime.env)
        self.alerts.close(wait=None)       # delivers what it has, then ends
        self.retired_alerts = [a for a in self.retired_alerts if a.busy()] + [self.alerts]
        self.alerts = Notifications(cfg, self.runtime.env, self.clock, signals=self.signals)
        self.status.configured(cfg.frequency, cfg.health_window)
        self.plan(reloaded=True)
        LOG.info("Config reloaded from %s: %s", cfg.path, self.summary())
        return True

    def _forget(self, old, new):
        """Before a reload takes ``new`` storages: a block whose name now
        stands for another place (a new path, bucket or file_prefix, two
        names swapped) or is gone loses its schedule state, so it is planned
        from its own place's snapshots; a name no longer configured leaves
        the status file and the metrics."""
        places = dict((s.name, type(s).place(s.settings)) for s in new)
        for storage in old:
            if places.get(storage.name) != type(storage).place(storage.settings):
                for state in (self.due, self.last_start, self.failed_runs, self.retry_at,
                              self.stored_at, self.retention_retry, self.streak):
                    state.pop(storage.name, None)
                self.held.discard(storage.name)
                self.retention_failing.discard(storage.name)
                self.scrubber.forget(storage.name)
        self.status.forget([s.name for s in old if s.name not in places])

    def summary(self):
        return "addr %s, every %s, storages: %s" % (
            self.cfg.addr, format_duration(self.cfg.frequency), ", ".join(
                "%s (every %s, retain %s%s)" % (
                    s.label(), format_duration(s.frequency or self.cfg.frequency),
                    s.retain or "all", ", %d days" % s.retain_days if s.retain_days else "")
                for s in self.storages))

    # -- schedule --------------------------------------------------------------

    def _frequency(self, storage):
        return storage.frequency or self.cfg.frequency

    def next_time(self, after, frequency):
        """The due time one ``frequency`` after ``after``, jittered; with
        ``align``, the first whole multiple of the frequency (UTC) more than
        half a frequency after ``after``: a cycle that began a little late
        (a wake-up, jitter) is followed by the next boundary, not the one
        after it, and one that began just before a boundary does not run
        again at it."""
        due = after + datetime.timedelta(seconds=frequency)
        if self.cfg.align:
            seconds = (after - EPOCH).total_seconds() + frequency / 2.0
            due = EPOCH + datetime.timedelta(seconds=(math.floor(seconds / frequency) + 1) * frequency)
        if self.cfg.jitter:
            due += datetime.timedelta(seconds=self.rand() * self.cfg.jitter)
        return due

    def _mono(self, when):
        """The monotonic time at which the wall clock will read ``when``, as
        the two clocks stand now."""
        return self.clock.monotonic() + (when - self.clock.now()).total_seconds()

    def _wall(self, mono):
        """The wall-clock time of monotonic time ``mono``, for logs and status."""
        return self.clock.now() + datetime.timedelta(seconds=mono - self.clock.monotonic())

    def due_at(self, storage):
        """When ``storage`` is next due, as an aware wall-clock datetime."""
        return self._wall(self.due[storage.name])

    def _regular(self, started, frequency):
        """The regular next due time (monotonic) after a cycle begun at
        ``started`` (wall, monotonic)."""
        wall, mono = started
        return mono + (self.next_time(wall, frequency) - wall).total_seconds()

    def plan(self, reloaded=False):
        """Set each storage's due time from its newest snapshot (or now),
        never before the regular time after this agent's own last store
        (a static name is not listed; a listing may fail).
        A storage whose cycle failed after this node knew it led (its upload,
        the snapshot stream, the login) stays in its back-off: planning again
        for a new leadership never makes it due earlier, so a flapping leader
        does not storm a failing storage. A failure before that (Vault sealed
        or unreachable at boot) ends with the node leading: due now."""
        now, mono = self.clock.now(), self.clock.monotonic()
        self.scrubber.plan(self.storages)
        for storage in self.storages:
            key, frequency = storage.name, self._frequency(storage)
            if reloaded and key in self.last_start:
                self.due[key] = min(self.due.get(key, mono), self._regular(self.last_start[key], frequency))
                continue
            due, newest = mono, self._newest(storage, now)
            if newest is not None:
                due = max(mono, self._mono(self.next_time(newest, frequency)))
                if due > mono:
                    LOG.info("Newest snapshot in %s is from %s: next one due %s", storage.label(),
                             iso(newest), iso(self._wall(due)))
            if key in self.stored_at:     # what this agent stored itself (unlisted: a static name)
                due = max(due, self._regular(self.stored_at[key], frequency))
            if self.failed_runs.get(key) and key in self.held:
                due = max(due, self.retry_at.get(key, mono))
            self.due[key] = due

    def _newest(self, storage, now):
        """The time of the newest snapshot in ``storage`` (None: none, or the
        listing failed, which is logged)."""
        try:
            refs = without_future(storage.list(), now, storage.label())
        except Stopped:
            return None             # the loop sees the stop
        except AgentError as exc:
            LOG.warning("Cannot list %s to plan the schedule (%s); snapshotting now",
                        storage.label(), _error_text(exc))
            return None
        return max([ref.when for ref in refs]) if refs else None

    def _backoff(self, runs, frequency):
        """Seconds before retry number ``runs`` (1, 2...): retry_interval,
        doubling, at most ``frequency``."""
        return min(self.cfg.retry_interval * 2 ** min(runs - 1, 20), frequency)

    def schedule_after(self, result, storages, started):
        """Set the next due time of the ``storages`` a cycle begun at
        ``started`` (wall, monotonic) served: the regular time, or, for those
        whose upload failed, a retry counted from the cycle's end (a long
        failing upload still leaves a pause before the next attempt). A
        standby's skipped cycle keeps any back-off for when it leads again."""
        ended = self.clock.monotonic()
        if result.outcome == "failed" and result.snapshot is None:
            failed = set(s.name for s in storages)      # before any upload: all of them
        else:
            failed = set(s.name for s, _ in result.failures)
        retries = []
        for storage in storages:
            key, frequency = storage.name, self._frequency(storage)
            self.last_start[key] = started
            regular = self._regular(started, frequency)
            if result.outcome == "skipped" and not self.leading:
                self.due[key] = regular
                continue
            if result.outcome == "skipped":
                failed.add(key)           # sys/leader said is_self, the snapshot said otherwise
            elif key not in failed:
                self.stored_at[key] = started
            if key not in failed or not self.cfg.retry_interval:
                self.failed_runs.pop(key, None)
                self.retry_at.pop(key, None)
                self.due[key] = regular
                continue
            runs = self.failed_runs[key] = self.failed_runs.get(key, 0) + 1
            self.retry_at[key] = ended + self._backoff(runs, frequency)
            (self.held.add if self.leading else self.held.discard)(key)
            self.due[key] = min(regular, self.retry_at[key])
            retries.append("%s at %s (%d failed in a row)" % (storage.label(), iso(self._wall(self.due[key])),
                                                             runs))
        if retries:
            LOG.warning("Retrying %s", "; ".join(retries))
        self._schedule_retention(result)

    def _schedule_retention(self, result):
        """Note the retentions that failed (retried on their own) and those
        that ran again after an upload (done)."""
        for storage, _ in result.stored:
            self.retention_retry.pop(storage.name, None)
        for storage, kept, _ in result.retention:
            self._retention_failed(storage, kept)

    def _retention_failed(self, storage, kept):
        key = storage.name
        entry = self.retention_retry.setdefault(key, [0.0, kept, 0])
        entry[1], entry[2] = kept, entry[2] + 1
        if not self.cfg.retry_interval:
            self.retention_retry.pop(key)         # the next cycle's retention tries again
            return
        entry[0] = self.clock.monotonic() + self._backoff(entry[2], self._frequency(storage))
        LOG.warning("Retrying the retention of %s at %s (%d failed in a row; no new snapshot "
                    "is taken for it)", storage.label(), iso(self._wall(entry[0])), entry[2])

    def _retention_retries(self):
        """[(storage, [monotonic due, kept name, failures])] of the running
        storages with a retention to retry (a storage a reload removed has none)."""
        return [(s, self.retention_retry[s.name]) for s in self.storages
                if s.name in self.retention_retry]

    def retry_retentions(self):
        """Run the retentions whose retry is due, on the leader only; False
        when none was due."""
        mono = self.clock.monotonic()
        due = [s for s, entry in self._retention_retries() if entry[0] <= mono]
        if not due:
            return False
        try:
            leader = self.vault.is_leader()
        except Stopped:
            return True             # the loop sees the stop
        except AgentError as exc:
            leader = None
            LOG.warning("Retention retry: cannot ask sys/leader (%s)", _error_text(exc))
        for storage in due:
            kept = self.retention_retry[storage.name][1]
            if leader is False:
                self.retention_retry.pop(storage.name)   # the new leader's agent does it
                continue
            try:
                error = _retain(storage, kept, self.scrubber) if leader else "sys/leader did not answer"
            except Stopped:
                return True         # the loop sees the stop
            self.status.record_retention(storage, error)
            self._notify_retention(storage, kept, error)
            if error is None:
                self.retention_retry.pop(storage.name)
            else:
                self._retention_failed(storage, kept)
        self.report()
        return True

    # -- leader poll -----------------------------------------------------------

    def _schedule_poll(self):
        """The next leader poll: ``leader_poll`` (plus up to 10%) from now, or
        none when it is off or every cycle checks as often."""
        poll = self.cfg.leader_poll
        if not poll or min(self._frequency(s) for s in self.storages) <= poll:
            self.next_poll = None
        else:
            self.next_poll = self.clock.monotonic() + poll * (1.0 + 0.1 * self.rand())

    def poll_leader(self, planned=False):
        """Ask ``sys/leader`` (no token, no login) whether this node is the
        active one and schedule the next poll. When it just became active (or
        became reachable as the active node), plan again from what the
        storages hold, unless ``planned`` just now, so a due or overdue
        snapshot is taken now, not a ``frequency`` after the last skip."""
        self._schedule_poll()
        try:
            leader = self.vault.is_leader()
        except AgentError as exc:
            LOG.debug("Leader poll failed: %s", exc)
            self.scrubber.standby()         # who leads meanwhile is unknown
            return
        was = self.status.leader_seen(leader)
        if not leader:
            self.scrubber.standby()
        if leader and not was and not planned:
            LOG.info("This node is now the leader; planning from the storages")
            self.plan()
        if leader != was:
            self.report()

    def _wait_for(self, due):
        """Sleep until ``due`` (monotonic) or the next leader poll, whichever
        is first."""
        seconds = due - self.clock.monotonic()
        if self.next_poll is not None:
            seconds = min(seconds, self.next_poll - self.clock.monotonic())
        self.signals.wait(max(0.0, seconds))
        if self.next_poll is not None and self.clock.monotonic() >= self.next_poll \
                and not (self.signals.stop_requested or self.signals.reload_requested):
            self.poll_leader()

    def run_forever(self):
        """The daemon loop; returns when a stop is requested."""
        self.plan()
        self._schedule_poll()
        if self.next_poll is not None and min(self.due.values()) > self.clock.monotonic():
            self.poll_leader(planned=True)    # no cycle now: is_leader known from start-up anyway
        if self.notifier:
            self.notifier.notify("READY=1", "STATUS=" + self.status.summary())
            self.notifier.start_watchdog()
        while not self.signals.stop_requested:
            if self.signals.reload_requested:
                self.signals.reload_requested = False
                if self.notifier:
                    self.notifier.notify("RELOADING=1",
                                         "MONOTONIC_USEC=%d" % int(self.clock.monotonic() * 1e6))
                self.reload()
                self._schedule_poll()
                if self.notifier:
                    self.notifier.notify("READY=1", "STATUS=" + self.status.summary())
                continue
            if self.retry_retentions():
                continue
            started = (self.clock.now(), self.clock.monotonic())
            next_due = min(self.due[s.name] for s in self.storages)
            self.status.planned(self._wall(next_due))
            if started[1] < next_due:
                if self.scrub_step():
                    continue
                scrub = self.scrubber.next_due()
                self._wait_for(min([next_due] + ([scrub] if scrub is not None else [])
                                   + [entry[0] for _, entry in self._retention_retries()]))
                continue
            due = [s for s in self.storages if self.due[s.name] <= started[1]]
            result = self.run_cycle(due)
            if result.outcome == "stopped":
                break
            self.notify_cycle(result, due)
            self.schedule_after(result, due, started)
            self._schedule_poll()         # the cycle just checked leadership
            self.status.planned(self._wall(min(self.due[s.name] for s in self.storages)))
            self.report()
        if self.notifier:
            self.notifier.notify("STOPPING=1")
        LOG.info("Stopping on %s", _signal_name(self.signals.stop_signal))

    # -- re-verification and notifications --------------------------------------

    def _scrub_interrupt(self):
        """Raise ScrubPreempted when a reload is asked for, or the next
        cycle, not due when the step began, has come due."""
        if self.signals.reload_requested or (
                self._scrub_until is not None and self.clock.monotonic() >= self._scrub_until):
            raise ScrubPreempted("a snapshot cycle is due")

    def scrub_step(self):
        """One step of a due re-verification (see Scrubber), on the leader
        only; False when none is due. A read yields to a cycle that comes
        due meanwhile (it is read again at the next step)."""
        storage = self.scrubber.pending(self.storages)
        if storage is None:
            return False
        due = min(self.due.values()) if self.due else None
        self._scrub_until = due if due is not None and due > self.clock.monotonic() else None
        try:
            leader = self.vault.is_leader()
        except Stopped:
            return True             # the loop sees the stop
        except AgentError as exc:
            LOG.warning("Re-verification of %s postponed: cannot ask sys/leader (%s)",
                        storage.label(), _error_text(exc))
            self.scrubber.standby()         # who leads meanwhile is unknown
            self.scrubber.postpone(storage, max(self.cfg.retry_interval, 60.0))
            return True
        if not leader:
            LOG.debug("Not the leader: re-verification of %s postponed", storage.label())
            self.scrubber.standby()
            self.scrubber.postpone(storage, self._frequency(storage))
            return True
        try:
            report = self.scrubber.step(storage)
        except Stopped:
            return True
        except AgentError as exc:
            LOG.error("Re-verification of %s: cannot list it (%s); trying again later",
                      storage.label(), _error_text(exc))
            self.scrubber.postpone(storage, max(self.cfg.retry_interval, 60.0))
            return True
        if report is not None:
            self.status.record_verify(report)
            if report.new_bad:
                self.alerts.send(Event("verify_failed", storage.name, ", ".join(report.new_bad),
                                       report.bad[report.new_bad[0]], len(report.bad)))
            self.report()
        return True

    def notify_cycle(self, result, storages):
        """The events of a cycle over ``storages``: a storage that starts
        failing (one event for those of the cycle), one that stores again,
        a retention that starts failing, and every store."""
        if not self.leading:
            self.scrubber.standby()         # another node may have led: its deletions are its own
        if result.outcome in ("skipped", "stopped"):
            return
        stored = collections.OrderedDict((s.name, name) for s, name in result.stored)
        if result.snapshot is None:
            errors = dict((s.name, "; ".join(result.errors)) for s in storages)
        else:
            errors = dict((s.name, error) for s, error in result.failures)
        started, recovered = [], []
        for storage in storages:
            key = storage.name
            if key in errors:
                self.streak[key] = self.streak.get(key, 0) + 1
                if self.streak[key] == 1:
                    started.append(key)
            elif key in stored:
                runs = self.streak.pop(key, 0)
                if runs:
                    recovered.append((key, runs))
        if started:
            self.alerts.send(Event("failed", ", ".join(started), "", "; ".join(
                "%s: %s" % (k, errors[k]) for k in started) if len(started) > 1 else errors[started[0]], 1))
        for key, runs in recovered:
            self.alerts.send(Event("recovered", key, stored[key], "", runs))
        for storage, kept, error in result.retention:
            self._notify_retention(storage, kept, error)
        for storage, name in result.stored:
            if not any(s is storage for s, _, _ in result.retention):
                self._notify_retention(storage, name, None)
        if stored:
            self.alerts.send(Event("stored", ", ".join(stored), ", ".join(sorted(set(stored.values())))))

    def close_alerts(self):
        """At the end: deliver what is queued (``--once``), or on a stop
        kill what runs, here and in what a reload replaced."""
        stopping = self.signals.stop_requested
        for alerts in self.retired_alerts + [self.alerts]:
            alerts.close(wait=not stopping)

    def _notify_retention(self, storage, kept, error):
        if error is None:
            self.retention_failing.discard(storage.name)
        elif storage.name not in self.retention_failing:
            self.retention_failing.add(storage.name)
            self.alerts.send(Event("retention_failed", storage.name, kept, error))

    # -- reporting -------------------------------------------------------------

    def report(self):
        """Write the status file and metrics textfile; tell systemd."""
        for storage in self.storages:
            if storage.name in self.due:
                self.status.scheduled(storage, self._wall(self.due[storage.name]))
        # The status file holds error texts: 0640. Prometheus' textfile
        # collector runs as another user: 0644.
        outputs = ((self.cfg.status_file, lambda: json.dumps(self.status.as_json(), indent=2) + "\n",
                    0o640), (self.cfg.metrics_textfile, self.status.metrics, 0o644))
        for path, render, mode in outputs:
            if path:
                try:
                    write_atomic(path, render(), mode)
                except OSError as exc:
                    LOG.error("Cannot write %s: %s", path, exc.strerror or exc)
        if self.notifier:
            self.notifier.notify("STATUS=" + self.status.summary())

    # -- one cycle ---------------------------------------------------------------

    def _staging_dirs(self, storages):
        """Where to stage the download, best first: ``temp_dir``, else each
        storage's own directory (a local storage: then storing it there is a
        hard link) and the system temp dir. A directory this process cannot
        write, or whose free space is below the last snapshot's size, goes
        last: a full local disk must not stop the other storages."""
        if self.cfg.temp_dir:
            return [self.cfg.temp_dir]
        candidates = []
        for directory in [s.staging_dir() for s in storages] + [_default_temp_dir()]:
            if directory and directory not in candidates:
                candidates.append(directory)
        need = (self.status.last_snapshot or {}).get("size") or 0
        return sorted(candidates, key=lambda d: not _can_stage(d, need))

    def _download(self, vault, directories):
        """Stream and verify the snapshot into the first directory that can
        take it; a disk error there moves on to the next one (a new request).
        When none can, the error names each directory and what it said."""
        failed = []
        for position, directory in enumerate(directories):
            LOG.debug("Streaming the snapshot into %s (staging choices: %s)", directory,
                      ", ".join(directories))
            resp = vault.open_snapshot()
            try:
                return stream_snapshot(resp, directory, self.signals,
                                       Progress("Downloading snapshot", None, self.clock))
            except StagingError as exc:
                failed.append(str(exc))
                if position == len(directories) - 1:
                    raise StagingError("; ".join(failed)) from exc
                LOG.warning("%s; staging in %s instead", exc, directories[position + 1])
            finally:
                resp.close()
        raise SnapshotError("no staging directory")     # pragma: no cover (the loop returns or raises)

    def _store_everywhere(self, storages, info, when):
        """Store in every storage at once (one slow store does not hold up the
        others), each under its own name for ``when``; [(storage, (stored
        name or None, error text or None, retention error or None))] in
        config order."""
        self.signals.check()
        if len(storages) == 1:
            return [(storages[0], _store_one(storages[0], info, when, self.scrubber))]
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(storages)) as pool:
            with signals_blocked():     # the pool's threads start on submit
                futures = [pool.submit(_store_one, s, info, when, self.scrubber)
                           for s in storages]
            while not all(f.done() for f in futures):
                concurrent.futures.wait(futures, timeout=0.5)   # lets the main thread take signals
        for future in futures:
            if isinstance(future.exception(), Stopped):
                raise Stopped("stop requested")
        return [(s, f.result()) for s, f in zip(storages, futures)]

    def run_cycle(self, storages=None):
        """One cycle for ``storages`` (default: all); never raises. Returns a
        CycleResult and records it in ``status``."""
        storages = self.storages if storages is None else storages
        started, began = self.clock.now(), self.clock.monotonic()
        result = self._guarded_cycle(storages)
        elapsed = self.clock.monotonic() - began
        if result.snapshot is not None:
            info = result.snapshot
            LOG.info("Cycle %s: %s, %s, Raft index %s term %s, stored in %d/%d storages in %s",
                     result.outcome, "snapshot %s" % result.stored[0][1] if result.stored
                     else "snapshot taken but stored nowhere", format_size(info.size), info.index,
                     info.term, len(result.stored), len(storages), format_duration(elapsed),
                     **fields(outcome=result.outcome, snapshot=result.stored[0][1] if result.stored
                              else None, bytes=info.size, duration=round(elapsed, 3),
                              raft_index=info.index, error="; ".join(result.errors) or None))
        self.status.record(result, started, self.clock.now(), elapsed, storages,
                           leading=self.leading)
        return result

    def _guarded_cycle(self, storages):
        try:
            return self._cycle(storages)
        except Stopped:
            pass
        except NotLeader as exc:
            LOG.info("Not running on leader node, skipping.")
            LOG.debug("%s", exc)
            return CycleResult("skipped", None, [], [], [])
        except AgentError as exc:
            if not self.signals.stop_requested:     # else: the stop cut a connection or a write
                LOG.error("Snapshot cycle failed: %s", _error_text(exc))
                return CycleResult("failed", None, [], [_error_text(exc)], [])
        except Exception as exc:      # a bug must not kill the daemon
            LOG.error("Snapshot cycle failed with an unexpected %s: %s", type(exc).__name__, exc)
            LOG.debug("Traceback", exc_info=True)
            return CycleResult("failed", None, [], [repr(exc)], [])
        LOG.warning("Snapshot cycle stopped by %s; nothing partial was kept",
                    _signal_name(self.signals.stop_signal))
        return CycleResult("stopped", None, [], [], [])

    def _cycle(self, storages):
        vault = self.vault
        self.leading = False
        if not vault.is_leader():
            raise NotLeader("sys/leader: is_self is false")
        self.leading = True
        LOG.debug("sys/leader at %s: this node is the active one; cycle for %s", self.cfg.addr,
                  ", ".join(s.name for s in storages))
        vault.ensure_token()
        storages, unprepared = _prepared(storages)
        if not storages:
            return CycleResult("failed", None, [], ["%s: %s" % (s.label(), e) for s, e in unprepared],
                               unprepared)
        if not vault.is_leader():      # re-checked right before the snapshot
            raise NotLeader("leadership moved during login")
        when = self.clock.now()
        started = self.clock.monotonic()
        info = self._download(vault, self._staging_dirs(storages))
        elapsed = max(self.clock.monotonic() - started, 1e-6)
        LOG.info("Snapshot verified: %s, Raft index %s term %s, sha256 %s, downloaded in %s (%s/s)",
                 format_size(info.size), info.index, info.term, info.sha256[:16],
                 format_duration(elapsed), format_size(info.size / elapsed),
                 **fields(bytes=info.size, duration=round(elapsed, 3), raft_index=info.index,
                          sha256=info.sha256))
        try:
            results = self._store_everywhere(storages, info, when)
        finally:
            _unlink_quietly(info.path)
        stored = [(s, named) for s, (named, _, _) in results if named]
        failures = unprepared + [(s, error) for s, (_, error, _) in results if error is not None]
        retention = [(s, named, error) for s, (named, _, error) in results if error is not None]
        errors = ["%s: %s" % (s.label(), e) for s, e in failures] + [
            "%s: retention: %s" % (s.label(), e) for s, _, e in retention]
        outcome = "stored" if not failures else ("partial" if stored else "failed")
        return CycleResult(outcome, info, stored, errors, failures, retention)


def _store_one(storage, info, when, journal=None):
    """Upload to one storage under its name for ``when``, then apply its
    retention. Returns (stored name or None, upload error or None, retention
    error or None); raises Stopped. Any other failure stays in this storage:
    one storage failing never stops the others. A name another agent took in
    the same millisecond (NameClash) is never overwritten: the next free
    millisecond is used."""
    progress = Progress("Uploading to %s" % storage.label(), info.size, storage.clock)
    LOG.debug("Uploading %s to %s", format_size(info.size), storage.label())
    try:
        location, name = _upload_named(storage, info, storage.new_name(when), progress)
    except Stopped:
        raise
    except Exception as exc:
        if storage.signals.stop_requested:
            raise Stopped("stop requested") from exc
        if not isinstance(exc, AgentError):
            LOG.debug("Traceback", exc_info=True)
        LOG.error("Storing snapshot in %s failed: %s", storage.label(), _error_text(exc),
                  **fields(storage=storage.name, error=_error_text(exc)))
        return None, _error_text(exc), None
    LOG.info("Successfully created %s snapshot to %s", storage.name, location,
             **fields(storage=storage.name, snapshot=name, bytes=info.size,
                      duration=round(storage.clock.monotonic() - progress.start, 3)))
    if journal is not None:
        journal.stored(storage, name)
    return name, None, _retain(storage, name, journal)


def _upload_named(storage, info, name, progress, attempts=3):
    """storage.upload() under ``name``, or under the next free millisecond
    when the storage says the name is taken; returns (location, name)."""
    for attempt in range(attempts):
        try:
            return storage.upload(info, name, progress), name
        except NameClash as exc:
            if attempt == attempts - 1:
                raise
            later = storage.parse_name(name) + datetime.timedelta(milliseconds=1)
            taken, name = name, storage.new_name(later)
            LOG.warning("%s (another agent wrote %s at the same moment); storing as %s",
                        exc, taken, name)
    raise StorageError("no free snapshot name")      # pragma: no cover (the loop returns or raises)


def _retain(storage, keep, journal=None):
    """apply_retention, its failure as a text (logged) instead of raised;
    ``journal`` (the Scrubber) learns what it deleted."""
    try:
        deleted = apply_retention(storage, keep=keep, now=storage.clock.now())
        if journal is not None:
            journal.retained(storage, deleted)
    except Stopped:
        raise
    except AgentError as exc:
        LOG.error("Retention on %s failed: %s", storage.label(), _error_text(exc))
        return _error_text(exc)
    return None


def _prepared(storages):
    """(storages whose prepare() worked, [(storage, error)] for the others):
    one storage's directory or credentials failing never stops the rest."""
    ready, failed = [], []
    for storage in storages:
        try:
            storage.prepare()
            ready.append(storage)
        except Stopped:
            raise
        except AgentError as exc:
            LOG.error("Preparing %s failed: %s", storage.label(), _error_text(exc))
            failed.append((storage, _error_text(exc)))
    return ready, failed


def _can_stage(directory, need):
    """Whether ``directory`` is writable here with ``need`` bytes free."""
    try:
        if not os.access(directory, os.W_OK | os.X_OK):
            return False
        fs = os.statvfs(directory)
    except (OSError, AttributeError):
        return os.path.isdir(directory)
    return fs.f_bavail * fs.f_frsize >= need


def _default_temp_dir():
    import tempfile
    return tempfile.gettempdir()


def _signal_name(signum):
    if signum is None:
        return "request"
    try:
        return signal.Signals(signum).name
    except (ValueError, AttributeError):
        return "signal %s" % signum


# =============================================================================
# 28. Restore tooling
# =============================================================================


def list_snapshots(storages):
    """([(storage, SnapshotRef)] newest first, [error lines]) over all storages."""
    found, errors = [], []
    for storage in storages:
        try:
            found.extend((storage, ref) for ref in storage.list())
        except Stopped:
            raise
        except AgentError as exc:
            errors.append("%s: %s" % (storage.label(), _error_text(exc)))
    found.sort(key=lambda item: (item[1].when, item[1].name), reverse=True)
    return found, errors


def _empty_storages(storages, found, errors):
    """'label: why' of each storage that listed no snapshot (and no error)."""
    failed = set(line.split(": ", 1)[0] for line in errors)
    have = set(id(storage) for storage, _ in found)
    return ["%s: %s" % (s.label(), s.emptiness()) for s in storages
            if id(s) not in have and s.label() not in failed]


def _storage_help():
    return "only this storage: a block's name, or every block of a kind (%s, or the key)" % (
        ", ".join("/".join(cls.aliases) for cls in STORAGE_TYPES.values()))


def pick_storages(storages, wanted):
    """The storages ``--storage`` names: every block of a kind (its config
    key or a short name, as before names existed), else the block of that
    name."""
    if not wanted:
        return storages
    chosen = [s for s in storages if wanted == s.config_key or wanted in s.aliases]
    chosen = chosen or [s for s in storages if s.name == wanted]
    if not chosen:
        raise ConfigError("--storage %s: no such storage in the config (have: %s)"
                          % (wanted, ", ".join(s.name for s in storages)))
    return chosen


class _Counted:
    """A file (``read`` or ``write`` side) that tells ``progress`` the bytes
    that pass: a download's sink, a restore's body."""

    def __init__(self, handle, progress):
        self.handle, self.progress = handle, progress

    def write(self, data):
        count = self.handle.write(data)
        self.progress.add(len(data))
        return count

    def read(self, size=-1):
        data = self.handle.read(size)
        self.progress.add(len(data))
        return data

    def __getattr__(self, name):            # seek, truncate, flush, fileno...
        return getattr(self.handle, name)


def fetch_snapshot(storages, name, directory, output=None, now=None, tty=None):
    """Download ``name`` (or the newest, for 'latest', ignoring names dated
    in the future), verify it, and move it to ``output`` (or
    ``directory/name``). Returns (SnapshotInfo, storage). A copy that is
    damaged or gone is named in a WARNING and the next storage listing the
    same name is tried. Nothing unverified is left behind."""
    found, errors = list_snapshots(storages)
    for line in errors:
        LOG.error("Listing failed: %s", line)
    if name == "latest":
        usable = set(id(r) for r in without_future([r for _, r in found], now or Clock().now(),
                                                   "the storages"))
        found = [(s, r) for s, r in found if id(r) in usable]
        name = found[0][1].name if found else name
    candidates = [(s, r) for s, r in found if r.name == name]
    if not candidates:
        empty = _empty_storages(storages, found, errors)
        if name == "latest" and empty:
            raise StorageError("no snapshot to download: %s" % "; ".join(empty))
        raise StorageError("snapshot %s not found in %s%s" % (
            name, ", ".join(s.label() for s in storages),
            " (%s)" % "; ".join(empty) if empty else ""))
    failed = []
    for storage, ref in candidates:
        try:
            return _fetch_copy(storage, ref, output or os.path.join(directory, ref.name), tty), storage
        except (StorageError, SnapshotError) as exc:
            failed.append("%s: %s" % (storage.label(), _error_text(exc)))
            LOG.warning("The copy of %s in %s is damaged or missing: %s%s", ref.name,
                        storage.label(), _error_text(exc),
                        "; trying the next storage" if len(failed) < len(candidates) else "")
    raise StorageError("no intact copy of %s: %s" % (name, "; ".join(failed)))


def _fetch_copy(storage, ref, final, tty=None):
    """Download ``ref`` from ``storage`` next to ``final``, verify it and
    rename it there; returns SnapshotInfo. Raises with nothing left behind.
    Progress on the terminal ``tty``, else a log line every 30 s; a summary
    line at the end."""
    temp = os.path.join(os.path.dirname(os.path.abspath(final)), temp_name())
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise AgentError("cannot create a file next to %s: %s" % (final, exc.strerror)) from exc
    try:
        progress = Progress("Downloading %s from %s" % (ref.name, storage.label()), ref.size or None,
                            storage.clock, tty=tty)
        with os.fdopen(fd, "wb") as sink:
            try:
                storage.download(ref.name, _Counted(sink, progress))
            finally:
                progress.end()
            sink.flush()
            os.fsync(sink.fileno())
        LOG.info("%s", transfer_summary("Downloaded %s from %s" % (ref.name, storage.label()),
                                         progress.done, storage.clock.monotonic() - progress.start))
        info = verify_file(temp)
        os.rename(temp, final)
    except OSError as exc:          # the local disk: full, a directory in the way...
        _unlink_quietly(temp)
        raise AgentError("cannot write %s: %s" % (final, exc.strerror or exc)) from exc
    except BaseException:
        _unlink_quietly(temp)
        raise
    return info._replace(path=final)


def cmd_list(storages, out):
    found, errors = list_snapshots(storages)
    for storage, ref in found:
        out.write("%-24s  %-10s  %10s  %s\n" % (
            ref.when.strftime("%Y-%m-%dT%H:%M:%SZ"), storage.name, format_size(ref.size),
            ref.name))
    for line in _empty_storages(storages, found, errors):
        LOG.warning("No snapshots in %s", line)
    for line in errors:
        LOG.error("Listing failed: %s", line)
    return EXIT_FAILED if errors else EXIT_OK


def cmd_download(storages, name, output, out, now=None, tty=None):
    info, storage = fetch_snapshot(storages, name, os.getcwd(), output, now, tty)
    out.write("%s  (from %s; verified: %s, Raft index %s term %s, sha256 %s)\n" % (
        info.path, storage.label(), format_size(info.size), info.index, info.term, info.sha256))
    return EXIT_OK


def cmd_verify(path, out):
    info = verify_file(path)
    out.write("%s: OK, %s, Raft index %s term %s, state %d bytes, sha256 %s\n" % (
        path, format_size(info.size), info.index, info.term, info.state_size, info.sha256))
    return EXIT_OK


def route_lines(cfg, storages, vault_http=None):
    """One line per destination (Vault, each storage's server): which proxy
    or direct and why, and whether TLS is verified."""
    vault_http = vault_http or Http(cfg.tls, proxy=cfg.proxy_policy)
    routes = [("Vault", cfg.addr, vault_http)] + [
        (s.label(), url, http) for s in storages for url, http in [s.route() or (None, None)] if url]
    lines = []
    for what, url, http in routes:
        parts = urllib.parse.urlsplit(url)
        tls = "" if parts.scheme != "https" else (
            ", TLS NOT verified" if http.tls.skip_verify else ", TLS verified%s" % (
                " with %s" % http.tls.ca_cert if http.tls.ca_cert else ""))
        lines.append("%s at %s://%s: %s%s" % (what, parts.scheme, parts.netloc.rpartition("@")[2],
                                              http.proxy.decide(url)[1], tls))
    return lines


def cmd_doctor(cfg, storages, runtime, out):
    """Prove the set-up without taking a snapshot: one line per check, ok
    or FAIL with the reason; exit 0 only when all pass."""
    results = []

    def check(what, step, *args):
        """Run ``step(*args)``: True when it passed, the error when not."""
        try:
            detail = step(*args)
        except Stopped:
            raise
        except AgentError as exc:
            results.append(False)
            out.write("FAIL  %-24s %s\n" % (what, _error_text(exc)))
            return exc
        results.append(True)
        out.write("ok    %-24s %s\n" % (what, detail))
        return True

    vault = VaultClient(cfg, clock=runtime.clock, signals=runtime.signals, env=runtime.env)
    for line in route_lines(cfg, storages, vault.http):
        out.write("info  %-24s %s\n" % ("route", line))
    leader = check("vault", _doctor_leader, vault)
    if leader is True or isinstance(leader, NotLeader):        # a standby's login still counts
        if check("login (%s)" % cfg.vault_auth_method, _doctor_login, vault) is True:
            check("snapshot policy", _doctor_policy, vault)
    for storage in storages:
        if check("%s list" % storage.name, _doctor_list, storage) is True:
            check("%s write" % storage.name, storage.probe)
    failed = results.count(False)
    LOG.log(logging.ERROR if failed else logging.INFO, "doctor: %d check(s), %d failed",
            len(results), failed)
    return EXIT_FAILED if failed else EXIT_OK


def _doctor_leader(vault):
    status = vault.leader_status()
    if not isinstance(status, dict):
        raise VaultError("sys/leader answer is not a JSON object")
    if status.get("ha_enabled") is False or status.get("is_self") is True:
        return "%s is reachable and the active node (it takes the snapshots)" % vault.cfg.addr
    raise NotLeader("%s is a standby (the active node is %s): only the active node's agent takes "
                    "snapshots" % (vault.cfg.addr, printable(str(status.get("leader_address") or "?"), 100)))


def _doctor_list(storage):
    return "%d snapshot(s) in %s" % (len(storage.list()), storage.describe())


def _doctor_login(vault):
    vault.ensure_token()
    return "logged in; token TTL %s" % vault.token_ttl_text()


def _doctor_policy(vault):
    api_path = SNAPSHOT_PATH[len("/v1/"):]
    capabilities = vault.capabilities(api_path)
    if set(capabilities) & set(["read", "root", "sudo"]):
        return "the token may read sys/storage/raft/snapshot (capabilities [%s])" % ", ".join(capabilities)
    raise VaultError("the token may not read %s (capabilities [%s]): give the role the policy of "
                     "contrib/snapshot-policy.hcl" % (api_path, ", ".join(capabilities)))


def read_status(cfg, now):
    """(status document, where it came from): the running agent's
    /status.json at metrics_address, else the status_file. AgentError when
    neither is configured or readable."""
    tried = []
    if cfg.metrics_bind:
        host, port = cfg.metrics_bind
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        url = "http://%s:%d/status.json" % ("[%s]" % host if ":" in host else host, port)
        try:
            with Http(deadline=5.0, timeout=5.0).request("GET", url) as resp:
                if resp.status == 200:
                    return resp.json(), "the running agent at %s" % url
                tried.append("%s: HTTP %d" % (url, resp.status))
        except (TransportError, VaultError) as exc:
            tried.append(str(exc))
        if cfg.status_file:
            LOG.warning("The running agent did not answer (%s); showing the status file %s, "
                        "which may be old", tried[-1], cfg.status_file)
    if cfg.status_file:
        try:
            return read_status_file(cfg.status_file), cfg.status_file
        except (OSError, ValueError) as exc:
            tried.append("%s: %s" % (cfg.status_file, getattr(exc, "strerror", None) or exc))
    if not tried:
        raise AgentError("no status to show: set status_file or metrics_address in the config")
    raise AgentError("no status to show: %s" % "; ".join(tried))


def cmd_status(cfg, out, now):
    """Print the agent's status per storage; exit 1 when a storage is
    failing, holds bad snapshots, or nothing stored for two frequencies."""
    doc, where = read_status(cfg, now)
    if not isinstance(doc, dict) or not isinstance(doc.get("storages"), dict):
        raise AgentError("%s is not the agent's status" % where)
    out.write("%s %s (pid %s), from %s\n" % (PROG, doc.get("version"), doc.get("pid"), where))
    out.write("  leader: %s, last cycle: %s at %s, next: %s\n" % (
        {True: "yes", False: "no"}.get(doc.get("is_leader"), "unknown"), doc.get("last_outcome") or "-",
        doc.get("last_end") or "-", doc.get("next_start") or "-"))
    troubled = []
    window = health_limit(cfg.health_window, cfg.frequency)
    try:
        last_ok = _parse_iso(doc.get("last_ok")) if isinstance(doc.get("last_ok"), str) else None
    except ValueError:
        last_ok = None
    if last_ok is not None and (now - last_ok).total_seconds() > window:
        out.write("  STALE: the last good cycle was %s, %s ago (more than %s)\n" % (
            iso(last_ok), format_duration((now - last_ok).total_seconds()), format_duration(window)))
        troubled.append("nothing good for %s" % format_duration((now - last_ok).total_seconds()))
    if doc.get("last_outcome") in ("failed", "partial"):
        out.write("  last error: %s\n" % printable(str(doc.get("last_error") or "-"), 300))
        troubled.append("the last cycle (%s)" % doc["last_outcome"])
    for name, entry in doc["storages"].items():
        if not isinstance(entry, dict):
            continue
        size = entry.get("last_size")
        bad = entry.get("bad_snapshots") or {}
        lines = [
            ("last success", "%s  %s%s" % (
                entry.get("last_success") or "never", entry.get("last_snapshot") or "",
                " (%s)" % format_size(size) if isinstance(size, int) else "")),
            ("next run", entry.get("next_run") or "-"),
            ("failures", "%s in a row (%s in all)" % (entry.get("failures_in_a_row", 0),
                                                     entry.get("failures", 0))),
            ("last error", "%s%s" % (entry.get("last_error") or "-", " (at %s)" % entry["last_error_time"]
                                     if entry.get("last_error_time") else ""))]
        if entry.get("retention_error"):
            lines.append(("retention", "failing: %s" % entry["retention_error"]))
        if entry.get("last_verified"):
            lines.append(("last verified", "%s, %d bad%s" % (entry["last_verified"], len(bad), (
                ": " + ", ".join(sorted(bad))) if bad else "")))
        out.write("%s (%s)\n" % (name, entry.get("location") or entry.get("type")))
        for label, text in lines:
            out.write("  %-14s %s\n" % (label, printable(str(text), 300)))
        if entry.get("failures_in_a_row") or bad or entry.get("retention_error"):
            troubled.append(name)
    if troubled:
        LOG.error("Failing or holding bad snapshots: %s", ", ".join(troubled))
    return EXIT_FAILED if troubled else EXIT_OK


def _sealed_after(vault, signals, seconds=10.0):
    """Whether the cluster sealed itself within ``seconds`` of a restore."""
    end = time.monotonic() + seconds
    while True:
        if vault.sealed():
            return True
        if time.monotonic() >= end or (signals is not None and signals.stop_requested):
            return False
        if signals is not None:
            signals.wait(1.0)
        else:
            select.select([], [], [], 1.0)


def _stored_target(target):
    """Whether ``verify TARGET`` means stored snapshots (not a file)."""
    return target in VERIFY_SCOPES or SNAPSHOT_NAME_RE.match(target) is not None


def cmd_verify_stored(storages, target, out, now, tty=None):
    """Read back and verify ``target`` (a name, 'latest' or 'all') in each
    storage: one OK or FAIL line per snapshot; exit 1 when any failed or
    the name is nowhere."""
    good, failed = 0, []
    for storage in storages:
        try:
            refs = without_future(storage.list(), now, storage.label())
        except Stopped:
            raise
        except AgentError as exc:
            failed.append((storage, "-", "cannot list: %s" % _error_text(exc)))
            continue
        names = scrub_names(refs, target) if target in VERIFY_SCOPES else \
            [ref.name for ref in refs if ref.name == target]
        if not names and (target in VERIFY_SCOPES or len(storages) == 1):
            failed.append((storage, target, "nothing to verify: %s" % storage.emptiness()
                           if target in VERIFY_SCOPES
                           else "no snapshot of that name in %s" % storage.label()))
        for name in names:
            progress = Progress("Verifying %s in %s" % (name, storage.label()), None, storage.clock,
                                tty=tty)
            try:
                found = verify_stored(storage, name, progress)
            except Stopped:
                raise
            except AgentError as exc:
                progress.end()
                failed.append((storage, name, _error_text(exc)))
                out.write("FAIL  %-10s  %s  %s\n" % (storage.name, name, _error_text(exc)))
                continue
            progress.end()
            good += 1
            out.write("OK    %-10s  %s  %s, Raft index %s term %s (%s)\n" % (
                storage.name, found.name, format_size(found.size), found.index, found.term,
                found.checked))
    for storage, name, error in failed:
        LOG.error("%s in %s: %s", name, storage.label(), error)
    if not good and not failed:
        LOG.error("snapshot %s not found in %s", target, ", ".join(s.label() for s in storages))
        return EXIT_FAILED
    LOG.info("Verified %d snapshot(s): %d good, %d bad", good + len(failed), good, len(failed))
    return EXIT_FAILED if failed else EXIT_OK


def cmd_restore(cfg, storages, target, force, out, env=None, signals=None, tty=None):
    """POST a verified snapshot to the cluster. Uses VAULT_TOKEN/BAO_TOKEN when
    set (restoring needs an operator's token), else the configured login."""
    env = os.environ if env is None else env
    temp_dir = None
    if os.path.isfile(target):
        info = verify_file(target)
    else:
        import tempfile
        try:
            temp_dir = tempfile.mkdtemp(prefix="vault-snapshot-restore-")
        except OSError as exc:
            raise SnapshotError("cannot create a temporary directory: %s" % exc.strerror) from exc
    try:
        if temp_dir:
            info, storage = fetch_snapshot(storages, target, temp_dir, tty=tty)
            LOG.info("Downloaded and verified %s from %s", os.path.basename(info.path),
                     storage.label())
        vault = VaultClient(cfg, signals=signals, env=env)
        token = next((env[v].strip() for v in _env_names("TOKEN") if env.get(v, "").strip()), None)
        if token:
            refuse_control(token, "VAULT_TOKEN/BAO_TOKEN")
            vault.use_token(Secret(token))
        else:
            vault.ensure_token()
        vault.restore(info.path, info.size, force, tty)
        if force and _sealed_after(vault, signals):
            LOG.warning("%s sealed itself after the forced restore: it took the keyring of the "
                        "snapshot's cluster, and unseals only with that cluster's seal key "
                        "(auto-unseal) or unseal keys (Shamir)", cfg.addr)
    finally:
        if temp_dir:
            import shutil
            shutil.rmtree(temp_dir, ignore_errors=True)
    out.write("Restored %s (Raft index %s term %s) into %s%s\n" % (
        info.path if not temp_dir else os.path.basename(info.path), info.index, info.term, cfg.addr,
        " (forced)" if force else ""))
    return EXIT_OK


# =============================================================================
# 29. Command line
# =============================================================================


class _TextFormatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self):
        logging.Formatter.__init__(self, "%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s",
                                   "%Y-%m-%dT%H:%M:%S")


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, then the facts the
    call gave (``fields``: storage, snapshot, bytes, duration, error...)."""

    def format(self, record):
        when = datetime.datetime.fromtimestamp(record.created, UTC)
        line = collections.OrderedDict((
            ("time", when.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (when.microsecond // 1000)),
            ("level", record.levelname.lower()),
            ("message", record.getMessage()),
        ))
        for key, value in sorted((getattr(record, "fields", None) or {}).items()):
            if value is not None and key not in line:
                line[key] = value
        return json.dumps(line)


def _configure_logging(level, fmt, stream):
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    LOG.handlers[:] = [handler]
    LOG.setLevel(level)
    LOG.propagate = False
    return handler


def _parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0],
        epilog="Exit codes: 0 ok / stopped / not leader, 1 a --once cycle failed, "
               "2 usage or config error.")
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                        help="config file (default %(default)s)")
    parser.add_argument("--once", action="store_true",
                        help="run one snapshot cycle and exit")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config, print it with secrets masked, and exit")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", default="text", choices=("text", "json"))
    parser.add_argument("--version", action="version", version="%s %s" % (PROG, __version__))
    parser.add_argument("--config-reference", action="store_true",
                        help="print every config key with its default and meaning (Markdown) and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     help="restore tooling (without one: run the agent)")
    listing = commands.add_parser("list", help="list the snapshots in every configured storage, "
                                               "newest first")
    listing.add_argument("--storage", help=_storage_help())
    download = commands.add_parser("download", help="download a snapshot and verify it")
    download.add_argument("name", help="a snapshot name, or 'latest'")
    download.add_argument("-o", "--output", metavar="FILE", help="where to write it (default ./NAME)")
    download.add_argument("--storage", help=_storage_help())
    verify = commands.add_parser(
        "verify", help="verify a snapshot file (no config needed), or read stored snapshots back "
                       "and verify them in full, writing nothing")
    verify.add_argument("target", metavar="FILE|NAME|latest|all",
                        help="a snapshot file; or, in the storages: a snapshot name, the newest "
                             "of each ('latest'), or 'all'")
    verify.add_argument("--storage", help=_storage_help())
    restore = commands.add_parser("restore", help="restore a snapshot into the cluster at addr")
    restore.add_argument("target", help="a snapshot file, a snapshot name, or 'latest'")
    restore.add_argument("--yes", action="store_true",
                         help="really replace all data in the cluster with the snapshot")
    restore.add_argument("--force", action="store_true",
                         help="use snapshot-force (a snapshot from another cluster)")
    restore.add_argument("--storage", help=_storage_help())
    doctor = commands.add_parser("doctor", help="check the set-up without taking a snapshot: Vault, "
                                                "login, policy, each storage's list and a write test")
    doctor.add_argument("--storage", help=_storage_help())
    status = commands.add_parser("status", help="show the agent's status per storage (from the running "
                                                "agent's metrics_address, else the status_file)")
    for command in (listing, download, verify, restore, status, doctor):    # -c after the command too
        command.add_argument("-c", "--config", default=argparse.SUPPRESS, metavar="PATH",
                             help="config file (default %s)" % DEFAULT_CONFIG_PATH)
    return parser


def load_all(path, runtime):
    """Config and storages from ``path``; ConfigError on any problem. Any
    other exception while reading a file the user wrote (a value no check
    foresaw) is a ConfigError too: at start that is exit 2 with one line, on
    SIGHUP the running config stays."""
    try:
        cfg = load_config(path, runtime.env)
        return cfg, build_storages(cfg, runtime)
    except (ConfigError, Stopped):
        raise
    except Exception as exc:
        LOG.debug("Traceback", exc_info=True)
        raise ConfigError("config file %s: cannot be used (%s: %s)" % (
            path, type(exc).__name__, printable(one_line(exc), 200))) from None


def main(argv=None, stream=None, env=None, out=None):
    """Run the program; returns the exit code. ``stream`` takes the log
    (default stderr), ``out`` what commands print (default stdout), ``env``
    stands for the environment (default os.environ), so tests drive the
    command line without touching any of them."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:          # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler = _configure_logging(getattr(logging, args.log_level.upper()), args.log_format,
                                 stream or sys.stderr)
    try:
        isatty = getattr(handler.stream, "isatty", None)
        return _run(args, out, env, handler.stream if isatty and isatty() else None)
    finally:
        LOG.removeHandler(handler)


def _run(args, out=None, env=None, tty=None):
    out = out or sys.stdout
    if args.config_reference:
        out.write(config_reference())
        return EXIT_OK
    if args.command == "verify" and not args.storage and (
            os.path.isfile(args.target) or not _stored_target(args.target)):
        try:
            return cmd_verify(args.target, out)
        except SnapshotError as exc:
            text = str(exc)
            LOG.error("%s", text if text.startswith(args.target + ":") else "%s: %s" % (args.target, text))
            return EXIT_FAILED
    runtime = Runtime.create(env=env)
    try:
        try:
            cfg, storages = load_all(args.config, runtime)
            if args.command:
                storages = pick_storages(storages, getattr(args, "storage", None))
        except ConfigError as exc:
            LOG.error("Config error: %s", exc)
            return EXIT_USAGE
        if args.command == "restore" and not args.yes:
            LOG.error("restore would replace ALL data in the cluster at %s with %s; add --yes to "
                      "do it", cfg.addr, "the file %s" % args.target if os.path.isfile(args.target)
                      else "snapshot %s%s" % (args.target, " (--storage %s)" % args.storage
                                              if args.storage else ""))
            return EXIT_USAGE
        if args.command:
            return _run_command(args, cfg, storages, runtime, out, tty)
        for warning in cfg.warnings:
            LOG.warning("%s", warning)
        if cfg.tls_skip_verify:
            LOG.warning("TLS certificate verification towards Vault is OFF (tls_skip_verify)")
        if args.check_config:
            return _check_config(cfg, storages, out)
        return _run_agent(args, cfg, storages, runtime)
    finally:
        runtime.signals.close()


def _check_config(cfg, storages, out):
    """Print the whole effective configuration (stdout, JSON) and where each
    value came from (the log: stderr); exit 1 when a key is unknown (the
    daemon ignores it, as the Go agent did, but a check must not pass)."""
    sources = [("", cfg.sources)] + [(settings.block + ".", settings.sources)
                                     for _, settings in cfg.storages]
    out.write(json.dumps(cfg.describe(), indent=2) + "\n")
    from_env = ["%s%s (%s)" % (prefix, key, source[4:]) for prefix, block in sources
                for key, source in sorted(block.items()) if source.startswith("env ")]
    LOG.info("Values from the environment: %s", ", ".join(from_env) or "none")
    for line in route_lines(cfg, storages):
        LOG.info("Route: %s", line)
    unknown = [w for w in cfg.warnings if w.startswith("unknown config key")]
    if unknown:
        LOG.error("--check-config: %d unknown key(s): the agent would run, ignoring them; fix or "
                  "remove them", len(unknown))
        return EXIT_FAILED
    return EXIT_OK


def _run_agent(args, cfg, storages, runtime):
    """The daemon (or one cycle with --once) on an already loaded config."""
    loaded = [(cfg, storages)]

    metrics = [None]        # the MetricsServer; a reload rebinds it

    def loader(runtime):
        if loaded:
            return loaded.pop()
        fresh = load_all(args.config, runtime)
        metrics[0] = follow_metrics_address(metrics[0], fresh[0], agent.status)
        return fresh

    runtime.signals.install()
    notifier = SystemdNotifier(runtime.env, runtime.signals, runtime.clock)
    agent = None
    try:
        agent = Agent(loader, clock=runtime.clock, signals=runtime.signals, notifier=notifier,
                      env=runtime.env)
        LOG.info("%s %s starting: %s", PROG, __version__, agent.summary())
        for line in route_lines(cfg, storages, agent.vault.http):
            LOG.info("Route: %s", line)
        if cfg.metrics_address:
            metrics[0] = MetricsServer(cfg.metrics_bind, agent.status)
        if args.once:
            result = agent.run_cycle()
            agent.notify_cycle(result, agent.storages)
            agent.report()
            ok = result.outcome in ("stored", "skipped", "stopped") and not result.retention
            return EXIT_OK if ok else EXIT_FAILED
        agent.run_forever()
        return EXIT_OK
    except ConfigError as exc:
        LOG.error("Config error: %s", exc)
        return EXIT_USAGE
    finally:
        if metrics[0] is not None:
            metrics[0].close()
        notifier.close()
        if agent is not None:
            agent.close_alerts()


def _run_command(args, cfg, storages, runtime, out, tty=None):
    runtime.signals.install()
    try:
        if args.command == "list":
            return cmd_list(storages, out)
        if args.command == "download":
            return cmd_download(storages, args.name, args.output, out, runtime.clock.now(), tty)
        if args.command == "verify":
            return cmd_verify_stored(storages, args.target, out, runtime.clock.now(), tty)
        if args.command == "status":
            return cmd_status(cfg, out, runtime.clock.now())
        if args.command == "doctor":
            return cmd_doctor(cfg, storages, runtime, out)
        return cmd_restore(cfg, storages, args.target, args.force, out, runtime.env,
                           runtime.signals, tty)
    except Stopped:
        LOG.warning("Stopped; nothing partial was kept")
        return EXIT_OK
    except AgentError as exc:
        LOG.error("%s failed: %s", args.command, _error_text(exc))
        return EXIT_FAILED
    except Exception as exc:          # a bug: still one line (the traceback at debug level)
        LOG.error("%s failed with an unexpected %s: %s", args.command, type(exc).__name__,
                  _error_text(exc))
        LOG.debug("Traceback", exc_info=True)
        return EXIT_FAILED


def config_reference():
    """The config keys of every block as Markdown tables (the README's)."""
    blocks = [("top level", TOP_KEYS)] + [(key, cls.keys) for key, cls in STORAGE_TYPES.items()]
    lines = []
    for title, keys in blocks:
        lines += ["<!-- keys: %s -->" % title, "| key | default | meaning |", "|---|---|---|"]
        lines += ["| `%s`%s | %s | %s |" % (
            key.name, "".join(" (or `%s`)" % a for a in key.aliases), key.documented_default(),
            key.meaning().replace("|", "\\|")) for key in keys]
        lines += ["<!-- /keys -->", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
