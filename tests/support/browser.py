"""A real browser and a real HTTP client for the status page tests
(test_status_page.py): Debian's headless Chromium and curl, run as
subprocesses against loopback only.  Stdlib only; Python 3.6+.

* ``find_chromium()`` / ``find_curl()``: the binary's path, else
  ``BrowserError`` saying how to install it (tests/run.sh does);
* ``Chromium(binary, workdir)``: each run gets a new, empty profile
  (``--user-data-dir``) and the flags a root CI needs (``--no-sandbox``)
  plus those that keep it off the network (no QUIC, no background
  networking, no component updates, no sync):

  - ``dump_dom(url)``: (the DOM after the page loaded, serialised; the
    page's console messages, e.g. a Content-Security-Policy violation);
  - ``screenshot(url, path, width, height)``: the console messages; the
    PNG is at ``path``;

* ``curl(url, *args)``: (HTTP status, headers dict with lower-case names,
  body text) of one request made by curl (``-I`` for HEAD);
* ``read_page(html)``: what a reader of the page gets (``title``, every
  element as (tag, attrs), the table body's rows as (first cell's class,
  cell texts with ``<br>`` as a newline), the ``<style>`` text);
* ``png_size(data)``, ``png_pixels(data)`` (rows of (r, g, b) tuples of an
  8-bit RGB or RGBA PNG, decoded with zlib) and ``color_count(pixels,
  rgb)``: what a screenshot shows, e.g. whether the page's style applied.
"""

import html.parser
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib

__all__ = ["BrowserError", "find_chromium", "find_curl", "Chromium", "curl", "png_size",
           "png_pixels", "color_count", "console_messages", "read_page"]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONSOLE_RE = re.compile(r":INFO:CONSOLE[^\]]*\] (.*)")


class BrowserError(RuntimeError):
    pass


def _find(names, what):
    for name in names:
        path = shutil.which(name) or (("/usr/bin/" + name) if os.access("/usr/bin/" + name, os.X_OK)
                                      else None)
        if path:
            return path
    raise BrowserError("%s is not installed (Debian: apt-get install %s)" % (names[0], what))


def find_chromium():
    return _find(("chromium", "chromium-browser"), "chromium")


def find_curl():
    return _find(("curl",), "curl")


def console_messages(stderr):
    """What the page wrote to its console (CSP violations, errors, a script's
    console.log), from Chromium's ``--enable-logging=stderr`` output."""
    return [m.group(1) for m in CONSOLE_RE.finditer(stderr)]


class Chromium:
    """Headless Chromium, one fresh profile per run under ``workdir``."""

    def __init__(self, binary, workdir, timeout=60):
        self.binary, self.workdir, self.timeout = binary, workdir, timeout
        self.runs = 0

    def run(self, url, *flags):
        """(stdout bytes, stderr text) of one run on ``url``."""
        profile = tempfile.mkdtemp(prefix="profile-", dir=self.workdir)
        try:
            proc = subprocess.run([self.binary] + FLAGS + ["--user-data-dir=" + profile] + list(flags)
                                  + [url], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=self.timeout)
        finally:
            shutil.rmtree(profile, ignore_errors=True)
        self.runs += 1
        stderr = proc.stderr.decode("utf-8", "replace")
        if proc.returncode != 0:
            raise BrowserError("chromium exited %d on %s: %s" % (proc.returncode, url, stderr[-2000:]))
        return proc.stdout, stderr

    def dump_dom(self, url):
        out, err = self.run(url, "--dump-dom")
        return out.decode("utf-8"), console_messages(err)

    def screenshot(self, url, path, width, height):
        _, err = self.run(url, "--screenshot=%s" % path, "--window-size=%d,%d" % (width, height),
                          "--hide-scrollbars")
        if not os.path.isfile(path):
            raise BrowserError("chromium wrote no screenshot to %s: %s" % (path, err[-2000:]))
        return console_messages(err)


def curl(url, *args):
    """(status, headers {lower-case name: value}, body text) of one request
    by curl (``-I``: HEAD); no proxy, whatever the environment says."""
    dump = [] if "-I" in args else ["-D", "-"]       # -I: the headers are the output
    proc = subprocess.run([find_curl(), "-sS", "--noproxy", "*", "--max-time", "10"] + dump
                          + list(args) + [url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=30)
    if proc.returncode != 0:
        raise BrowserError("curl %s: exit %d: %s" % (url, proc.returncode,
                                                      proc.stderr.decode("utf-8", "replace")))
    text = proc.stdout.decode("utf-8", "replace")
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = dict((name.strip().lower(), value.strip()) for name, _, value in
                   (line.partition(":") for line in lines[1:]))
    return int(lines[0].split()[1]), headers, body


class _PageReader(html.parser.HTMLParser):
    def __init__(self):
        html.parser.HTMLParser.__init__(self, convert_charrefs=True)
        self.elements, self.rows, self.stack = [], [], []
        self.title = self.style = ""
        self.cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag == "br" and self.cell is not None:
            self.cell[1].append("\n")
            return
        self.stack.append(tag)
        if tag == "tr" and "tbody" in self.stack:
            self.rows.append([])
        elif tag == "td" and "tbody" in self.stack:
            self.cell = (attrs.get("class"), [])

    def handle_endtag(self, tag):
        if tag in self.stack:
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(tag):]
        if tag == "td" and self.cell is not None:
            self.rows[-1].append((self.cell[0], "".join(self.cell[1])))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[1].append(data)
        if self.stack and self.stack[-1] == "title" and "svg" not in self.stack:
            self.title += data
        elif self.stack and self.stack[-1] == "style":
            self.style += data


def read_page(text):
    """The page as a reader gets it: ``title``, ``style`` (the text of the
    style element), ``elements`` [(tag, attrs dict)] in document order, and
    ``rows``: each table body row as [(td class, td text)], ``<br>`` read
    as a newline and character references resolved."""
    reader = _PageReader()
    reader.feed(text)
    reader.close()
    return reader


def _chunks(data):
    if data[:8] != PNG_MAGIC:
        raise ValueError("not a PNG")
    pos = 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        yield kind, data[pos + 8:pos + 8 + length]
        pos += 12 + length


def png_size(data):
    """(width, height) from a PNG's IHDR; ValueError if ``data`` is no PNG."""
    for kind, body in _chunks(data):
        if kind == b"IHDR":
            return struct.unpack(">II", body[:8])
    raise ValueError("PNG without IHDR")


def png_pixels(data):
    """Rows of (r, g, b) of an 8-bit, non-interlaced RGB or RGBA PNG."""
    chunks = list(_chunks(data))
    width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1][:13])
    if depth != 8 or ctype not in (2, 6) or interlace:
        raise ValueError("unsupported PNG: depth %d, colour type %d" % (depth, ctype))
    step = 3 if ctype == 2 else 4
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = width * step
    rows, prev, pos = [], bytearray(stride), 0
    for _ in range(height):
        kind, line = raw[pos], bytearray(raw[pos + 1:pos + 1 + stride])
        pos += 1 + stride
        _unfilter(kind, line, prev, step)
        rows.append([tuple(line[i:i + 3]) for i in range(0, stride, step)])
        prev = line
    return rows


def _unfilter(kind, line, prev, step):
    for i in range(len(line)):
        left = line[i - step] if i >= step else 0
        up = prev[i]
        if kind == 1:
            line[i] = (line[i] + left) & 255
        elif kind == 2:
            line[i] = (line[i] + up) & 255
        elif kind == 3:
            line[i] = (line[i] + (left + up) // 2) & 255
        elif kind == 4:
            corner = prev[i - step] if i >= step else 0
            guess = left + up - corner
            pa, pb, pc = abs(guess - left), abs(guess - up), abs(guess - corner)
            line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255


def color_count(pixels, rgb):
    """How many pixels are exactly ``rgb`` (a '#rrggbb' text or a tuple)."""
    if isinstance(rgb, str):
        rgb = tuple(int(rgb.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4))
    return sum(row.count(rgb) for row in pixels)
