"""Hostile Raft snapshot archives for the verifier tests (issue 14, part 1).

What an attacker who controls a snapshot stream (or a stored object) can send
the verifier: extra members and links, allowed names typed as links or
directories, forged SHA256SUMS and meta.json, PAX tricks, streams that claim
huge sizes or members by the million, data after the gzip end.

* Small archives are built in memory from the real members of
  ``archives.build_archive`` (its tar blocks, cut out unchanged) plus raw tar
  headers made here, so a test can put anything anywhere.
* Large ones are written to a file through gzip chunk by chunk
  (``StreamingArchive``): the test process never holds them.
* ``SMALL`` and ``BIG`` list the attacks with the outcome the fixed agent
  gives; the tests and the measuring script (/work/measure_archive.py) share
  them.
* ``run_measured(argv)`` runs a command under a tiny wrapper and reports its
  exit code, output, peak RSS and wall time.

Stdlib only; works on Python 3.6+.
"""

import collections
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile

from support.archives import build_archive

BLOCK = 512
END = b"\0" * (2 * BLOCK)                # end-of-archive marker
MiB = 1024 * 1024
MTIME = 1764276759
REGTYPE, LNKTYPE, SYMTYPE, DIRTYPE = b"0", b"1", b"2", b"5"
PAX_LOCAL, PAX_GLOBAL = b"x", b"g"
STANDARD = ("meta.json", "state.bin", "SHA256SUMS", "SHA256SUMS.sealed")
STATE = b"".join(hashlib.sha256(b"%d" % n).digest() for n in range(2048))   # 64 KiB
FORGED_INDEX = "7\nvault_snapshot_last_success_timestamp_seconds 9e99"


# ------------------------------------------------------------ tar pieces


def _b(text):
    return text if isinstance(text, bytes) else text.encode("utf-8")


def _pad(size):
    return b"\0" * ((-size) % BLOCK)


def tar_header(name, size=0, kind=REGTYPE, linkname=b"", mode=0o600):
    """One USTAR header block, exactly as given: any name (up to 100 bytes,
    newlines and ``../`` included), any type, any size (data not included)."""
    name, linkname = _b(name), _b(linkname)
    if len(name) > 100 or len(linkname) > 100:
        raise ValueError("name or link name over 100 bytes: use a PAX path record")
    header = bytearray(b"".join([
        name.ljust(100, b"\0"), b"%07o\0" % mode, b"%07o\0" % 0, b"%07o\0" % 0,
        b"%011o\0" % size, b"%011o\0" % MTIME, b" " * 8, kind, linkname.ljust(100, b"\0"),
        b"ustar\x0000", b"root".ljust(32, b"\0"), b"root".ljust(32, b"\0"),
        b"\0" * 8, b"\0" * 8, b"\0" * 155, b"\0" * 12]))
    assert len(header) == BLOCK
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def raw_member(name, data=b"", kind=REGTYPE, linkname=b""):
    """Header, data and padding of one member; the header's size is the data's
    length whatever the type (a symlink or directory carrying data)."""
    data = _b(data)
    return tar_header(name, len(data), kind, linkname) + data + _pad(len(data))


def pax_record(key, value):
    """One ``"<length> key=value\\n"`` PAX record (length counts itself)."""
    body = b" " + _b(key) + b"=" + _b(value) + b"\n"
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length = len(b"%d" % length) + len(body)
    return b"%d" % length + body


def pax_header(records, kind=PAX_LOCAL):
    """A PAX extended header (``x``, or ``g`` for global) holding ``records``:
    a list of (key, value) pairs or of already encoded records."""
    data = b"".join(r if isinstance(r, bytes) else pax_record(*r) for r in records)
    return tar_header(b"././@PaxHeader", len(data), kind) + data + _pad(len(data))


def standard_members(**kwargs):
    """The four members of ``archives.build_archive(**kwargs)`` as raw tar
    blocks (PAX header if any, header, data, padding) by name, in order. The
    state is STATE unless given, so members of two calls fit together."""
    kwargs.setdefault("state", STATE)
    raw = gzip.decompress(build_archive(**kwargs))
    blocks = collections.OrderedDict()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        for info in tar:
            end = info.offset_data + info.size + (-info.size) % BLOCK
            blocks[info.name] = raw[info.offset:end]
    return blocks


def sums_for(**kwargs):
    """The SHA256SUMS text archives.build_archive(**kwargs) writes."""
    return standard_members(**kwargs)["SHA256SUMS"][BLOCK:].rstrip(b"\0").decode()


def hostile_archive(before=(), after=(), replace=None, drop=(), trailer=b"", **kwargs):
    """gzip bytes of: ``before`` raw blocks, the standard members (``replace``
    maps a name to the raw blocks that stand in its place, ``drop`` leaves
    some out), ``after`` raw blocks, the end-of-archive marker; then
    ``trailer`` after the gzip end. ``kwargs`` go to build_archive."""
    replace = replace or {}
    blocks = list(before)
    for name, block in standard_members(**kwargs).items():
        if name not in drop:
            blocks.append(replace.get(name, block))
    blocks.extend(after)
    blocks.append(END)
    return gzip.compress(b"".join(blocks)) + trailer


# ----------------------------------------------------- streamed archives


class StreamingArchive:
    """A gzip'd tar written to ``path`` as it is produced (gzip level 1,
    chunk by chunk), for archives too large to hold."""

    def __init__(self, path, level=1):
        self._file = open(str(path), "wb")
        self._gzip = gzip.GzipFile(filename="", mode="wb", fileobj=self._file,
                                   compresslevel=level, mtime=0)

    def write(self, data):
        self._gzip.write(data)

    def zeros(self, count, chunk=MiB):
        block = b"\0" * min(count, chunk)
        while count > 0:
            self._gzip.write(block[:count])
            count -= len(block)

    def close(self, end=True, trailing_nuls=0):
        """End-of-archive marker (``end``), gzip trailer, then
        ``trailing_nuls`` raw NUL bytes after the gzip end."""
        if end:
            self._gzip.write(END)
        self._gzip.close()
        block = b"\0" * MiB
        while trailing_nuls > 0:
            self._file.write(block[:trailing_nuls])
            trailing_nuls -= MiB
        self._file.close()


def write_symlink_sums(path, size=300 * MiB):
    """SHA256SUMS typed as a symlink whose header claims (and whose stream
    carries) ``size`` bytes of data."""
    out = StreamingArchive(path)
    members = standard_members()
    out.write(members["meta.json"] + members["state.bin"])
    out.write(tar_header("SHA256SUMS", size, SYMTYPE, "SHA256SUMS.real"))
    out.zeros(size)
    out.write(_pad(size) + members["SHA256SUMS.sealed"])
    out.close()


def write_many_members(path, count=1000000):
    """The four members, then ``count`` empty regular members (distinct names
    ``m0000000``...; their headers are patched from one template, for speed)."""
    out = StreamingArchive(path)
    out.write(b"".join(standard_members().values()))
    template = tar_header(b"m0000000")
    base = sum(template[:148]) + 8 * 32 + sum(template[156:]) - sum(template[:8])
    middle, tail = template[8:148], template[156:]
    batch = []
    for number in range(count):
        name = b"m%07d" % number
        batch.append(b"".join((name, middle, b"%06o\0 " % (base + sum(name)), tail)))
        if len(batch) == 2048:
            out.write(b"".join(batch))
            batch = []
    out.write(b"".join(batch))
    out.close()


def write_pax_flood(path, count=1000, size=MiB):
    """``count`` PAX headers of ``size`` bytes, each one ``path`` record (a
    distinct name of about ``size`` bytes) for an empty member, then the four."""
    out = StreamingArchive(path)
    filler = b"a" * (size - 32)          # the record: length, key, number, filler
    for number in range(count):
        out.write(pax_header([("path", b"%05d" % number + filler)]))
        out.write(tar_header(b"placeholder"))
    out.write(b"".join(standard_members().values()))
    out.close()


def write_trailing_nuls(path, count=128 * MiB):
    """A good archive, then ``count`` NUL bytes after the gzip end."""
    out = StreamingArchive(path)
    out.write(b"".join(standard_members().values()))
    out.close(trailing_nuls=count)


# -------------------------------------------------------------- the attacks


def forged_meta(**fields):
    """Archive bytes: the standard archive with meta.json fields replaced (``Index``,
    ``Term``); SHA256SUMS made to match, so only the values are wrong."""
    state = STATE
    meta = {"ID": "7-1234-%d" % MTIME, "Index": 1234, "Term": 7, "Size": len(state),
            "Version": 1, "Configuration": {"Servers": []}}
    meta.update(fields)
    meta = json.dumps(meta).encode() + b"\n"
    sums = "%s  meta.json\n%s  state.bin\n" % (hashlib.sha256(meta).hexdigest(),
                                               hashlib.sha256(state).hexdigest())
    return hostile_archive(replace={"meta.json": raw_member("meta.json", meta)}, sums=sums)


def _with_sums(lines):
    return hostile_archive(sums=lines(sums_for()))


def retyped(block, kind, linkname=b""):
    """A member's raw blocks (plain USTAR header first) with its header's type
    and link name changed, checksum redone: same name, same size, same data."""
    header = bytearray(block[:BLOCK])
    header[156:157] = kind
    header[157:257] = _b(linkname).ljust(100, b"\0")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + block[BLOCK:]


def _typed(name, kind, linkname=b""):
    """``name`` (one of the four) typed ``kind`` instead of a regular file."""
    return hostile_archive(replace={name: retyped(standard_members()[name], kind, linkname)})


def _too_many_headers(count=70):
    """``count`` harmless PAX headers (a comment each) before meta.json."""
    return hostile_archive(before=[pax_header([("comment", "x%d" % n)]) for n in range(count)])


def _pax_archive():
    """Every member behind a PAX header naming it (path, mtime records): a
    well-formed PAX archive, as other tar writers make."""
    blocks = standard_members()
    return hostile_archive(replace=dict(
        (name, pax_header([("path", name), ("mtime", "%d.5" % MTIME)]) + block)
        for name, block in blocks.items()))


def _second_gzip_member():
    return build_archive() + gzip.compress(b"more")


class AnyOf(tuple):
    """An expected outcome met by an ERROR line holding any one of these texts
    (when two rules may both catch an attack, whichever the agent checks first)."""


UNEXPECTED = "unexpected member"
NOT_REGULAR = "is not a regular file"
NOT_WHOLE = "is not a whole number"
AFTER_GZIP = "unexpected data after the end of the gzip stream"

# label -> (build() -> archive bytes, expected): None when it must verify,
# else what its one ERROR line holds (see error_matches).
SMALL = collections.OrderedDict([
    ("normal archive", (build_archive, None)),
    ("PAX archive (tarfile PAX_FORMAT)", (lambda: build_archive(fmt=tarfile.PAX_FORMAT), None)),
    ("PAX archive (path+mtime record per member)", (_pax_archive, None)),
    ("extra member ../../tmp/pwned",
     (lambda: hostile_archive(after=[raw_member("../../tmp/pwned", b"* * * * * root sh\n")]),
      (UNEXPECTED, "../../tmp/pwned"))),
    ("extra member /etc/cron.d/x",
     (lambda: hostile_archive(before=[raw_member("/etc/cron.d/x", b"* * * * * root sh\n")]),
      (UNEXPECTED, "/etc/cron.d/x"))),
    ("extra directory", (lambda: hostile_archive(after=[raw_member("extra-dir/", kind=DIRTYPE)]),
                         (UNEXPECTED, "extra-dir"))),
    ("extra symlink", (lambda: hostile_archive(
        after=[raw_member("link", kind=SYMTYPE, linkname="/etc/shadow")]), (UNEXPECTED, "link"))),
    ("extra hard link", (lambda: hostile_archive(
        after=[raw_member("hardlink", kind=LNKTYPE, linkname="meta.json")]),
        (UNEXPECTED, "hardlink"))),
    ("extra regular file", (lambda: hostile_archive(after=[raw_member("extra.txt", b"hello")]),
                            (UNEXPECTED, "extra.txt"))),
    ("extra member named evil\\nname",
     (lambda: hostile_archive(after=[raw_member("evil\nname", b"x")]),
      (UNEXPECTED, "evil\\nname"))),
    ("meta.json typed symlink", (lambda: _typed("meta.json", SYMTYPE, "/etc/passwd"),
                                 (NOT_REGULAR, "meta.json"))),
    ("state.bin typed directory", (lambda: _typed("state.bin", DIRTYPE),
                                   (NOT_REGULAR, "state.bin"))),
    ("SHA256SUMS typed hard link", (lambda: _typed("SHA256SUMS", LNKTYPE, "meta.json"),
                                    (NOT_REGULAR, "SHA256SUMS"))),
    ("meta.json twice", (lambda: hostile_archive(after=[standard_members()["meta.json"]]),
                         ("twice", "meta.json"))),
    ("SHA256SUMS extra line naming another file",
     (lambda: _with_sums(lambda good: good + "%s  evil.sh\n" % ("0" * 64)), "SHA256SUMS")),
    ("SHA256SUMS garbage line",
     (lambda: _with_sums(lambda good: good + "this is not a checksum line\n"), "SHA256SUMS")),
    ("SHA256SUMS missing state.bin line",
     (lambda: _with_sums(lambda good: good.splitlines(True)[0]), "SHA256SUMS")),
    ("SHA256SUMS meta.json line twice",
     (lambda: _with_sums(lambda good: good + good.splitlines(True)[0]), "SHA256SUMS")),
    ("SHA256SUMS with blank lines",
     (lambda: _with_sums(lambda good: "\n" + good.replace("\n", "\n\n")), None)),
    ("SHA256SUMS in ' *name' form",
     (lambda: _with_sums(lambda good: good.replace("  ", " *")), None)),
    ("symlink-typed SHA256SUMS with 64 KiB data",
     (lambda: hostile_archive(replace={"SHA256SUMS": raw_member(
         "SHA256SUMS", b"0" * 65536, SYMTYPE, "SHA256SUMS.real")}), (NOT_REGULAR, "SHA256SUMS"))),
    ("100 empty members", (lambda: hostile_archive(after=[tar_header("m%07d" % n)
                                                          for n in range(100)]),
                           AnyOf((UNEXPECTED, "too many members")))),
    ("PAX header of 65 KiB", (lambda: hostile_archive(before=[
        pax_header([("path", "a" * (65 * 1024))]), tar_header("placeholder")]),
        "extended header is implausibly large")),
    ("70 PAX headers (> 64 headers)", (_too_many_headers, "too many members")),
    ("1 MiB of NULs after the gzip end", (lambda: build_archive() + b"\0" * MiB, None)),
    ("NULs then 'x' after the gzip end",
     (lambda: build_archive() + b"\0" * 1000 + b"x", AFTER_GZIP)),
    ("second gzip member after the end", (_second_gzip_member, AFTER_GZIP)),
    ("negative PAX size", (lambda: hostile_archive(replace={"meta.json": pax_header(
        [("size", "-512")]) + standard_members()["meta.json"]}), "bad size")),
    ("meta.json Index = forged string with newline",
     (lambda: forged_meta(Index=FORGED_INDEX), "meta.json Index " + NOT_WHOLE)),
    ("meta.json Index = \"7\"", (lambda: forged_meta(Index="7"), "meta.json Index " + NOT_WHOLE)),
    ("meta.json Index = true", (lambda: forged_meta(Index=True), "meta.json Index " + NOT_WHOLE)),
    ("meta.json Index = 7.5", (lambda: forged_meta(Index=7.5), "meta.json Index " + NOT_WHOLE)),
    ("meta.json Index = -1", (lambda: forged_meta(Index=-1), "meta.json Index")),
    ("meta.json Term = \"3\\nX\"",
     (lambda: forged_meta(Term="3\nX"), "meta.json Term " + NOT_WHOLE)),
    ("meta.json Term = false", (lambda: forged_meta(Term=False), "meta.json Term " + NOT_WHOLE)),
    ("meta.json Term = 3.0", (lambda: forged_meta(Term=3.0), "meta.json Term " + NOT_WHOLE)),
])

# label -> (write(path), expected), as SMALL; for the peak-RSS runs.
BIG = collections.OrderedDict([
    ("symlink-typed SHA256SUMS with 300 MB data",
     (write_symlink_sums, (NOT_REGULAR, "SHA256SUMS"))),
    ("1,000,000 empty members", (write_many_members, AnyOf((UNEXPECTED, "too many members")))),
    ("1000 PAX path records of 1 MiB", (write_pax_flood, "extended header is implausibly large")),
    ("128 MiB of NULs after the gzip end", (write_trailing_nuls, None)),
])


def error_matches(line, expected):
    """Whether an ERROR line holds what ``expected`` (a SMALL/BIG outcome, not
    None) asks: a text, all texts of a tuple, or one text of an AnyOf."""
    if isinstance(expected, AnyOf):
        return any(text in line for text in expected)
    if isinstance(expected, str):
        expected = (expected,)
    return all(text in line for text in expected)


# ------------------------------------------------------ measured processes

_WRAPPER = r"""
import json, resource, subprocess, sys, time
start = time.monotonic()
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
try:
    out = proc.communicate(timeout=float(sys.argv[1]))[0]
    code = proc.returncode
except subprocess.TimeoutExpired:
    proc.kill()
    out = proc.communicate()[0]
    code = None
seconds = time.monotonic() - start
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
if sys.platform == "darwin":
    rss //= 1024
sys.stdout.write(json.dumps({"code": code, "output": out.decode("utf-8", "replace"),
                             "rss_kb": rss, "seconds": seconds}))
"""

Measured = collections.namedtuple("Measured", "code output peak_rss_mb seconds")


def run_measured(argv, timeout=120.0, python=None):
    """Run ``argv`` (stdout and stderr together) under a wrapper process that
    waits at most ``timeout`` seconds (then kills it: code None) and reports
    the peak RSS of that one child: Measured(code, output, MB, seconds)."""
    wrapper = [python or sys.executable, "-c", _WRAPPER, str(timeout)] + list(argv)
    done = subprocess.run(wrapper, stdout=subprocess.PIPE, timeout=timeout + 60, check=True)
    report = json.loads(done.stdout.decode("utf-8"))
    return Measured(report["code"], report["output"], report["rss_kb"] / 1024.0,
                    report["seconds"])


def write_small(path, label):
    """Write the SMALL attack ``label`` to ``path``; returns its expected outcome."""
    build, expected = SMALL[label]
    with open(str(path), "wb") as handle:
        handle.write(build())
    return expected


__all__ = ["tar_header", "raw_member", "retyped", "pax_record", "pax_header",
           "standard_members", "sums_for", "hostile_archive", "StreamingArchive",
           "write_symlink_sums", "write_many_members", "write_pax_flood", "write_trailing_nuls",
           "SMALL", "BIG", "AnyOf", "error_matches", "run_measured", "Measured", "write_small",
           "FORGED_INDEX", "forged_meta", "MiB"]
