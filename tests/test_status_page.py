"""Section "Status page": what an operator's browser shows at the metrics
address, the headers that keep it inert, and what a probe gets from
/healthz.

The page: the agent script runs as a subprocess against a loopback FakeVault
(each snapshot a little larger than the one before), storing every second
into a local directory and, hourly, into a second one and into "offsite", an
S3 endpoint on loopback that answers every upload with 403 and an error
Message full of markup, as a hostile or compromised server could. Debian's
headless Chromium loads ``GET /`` (``--dump-dom``, ``--screenshot``) and
curl fetches it with its headers. Set STATUS_PAGE_SCREENSHOT=PATH to keep
the screenshot.

/healthz over hours: the Agent in process on a fake clock (agent_sim), its
status served by the real MetricsServer on that clock, curl asking at chosen
moments of the schedule.
"""

import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import sys
import types
from xml.sax.saxutils import escape as xml_escape

import pytest

import vault_snapshot_agent as vsa
from support.agent_sim import START, SNAPSHOT, ScriptedVault, fake_clock, run_daemon
from support.archives import build_archive
from support.browser import color_count, png_pixels, png_size, read_page
from support.fake_endpoints import Endpoint, FakeVault
from support.harness import FakeSignals, child_env, free_port, read, start_agent, stop, wait_for

M = 60                      # seconds in a minute of fake time
WIDTH, HEIGHT = 1100, 700
HOSTILE = 'Access Denied <script>alert(1)</script> "><img src=x onerror=alert(2)> <svg onload=alert(3)>'
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
              "ALL_PROXY", "NO_PROXY")


class GrowingVault(FakeVault):
    """A FakeVault whose snapshots grow in steps (so the chart's bars differ)."""

    def __init__(self):
        FakeVault.__init__(self, role_id="r", secret_id="s")
        self.taken = 0

    def respond(self, request):
        if request.path.split("?", 1)[0] == SNAPSHOT and request.method == "GET":
            with self.lock:
                self.taken += 1
                number = self.taken
            state = os.urandom(16384 * (2 + number % 5))       # random: gzip keeps its size
            return 200, {"Content-Type": "application/gzip"}, build_archive(state=state, index=100 + number)
        return FakeVault.respond(self, request)


def hostile_s3(request):
    """Every S3 request: 403 AccessDenied, the Message quoting markup."""
    message = xml_escape(HOSTILE, {'"': "&quot;"})
    return 403, {"Content-Type": "application/xml"}, (
        '<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
        "<Message>%s</Message><RequestId>4442587FB7D0A2F9</RequestId></Error>" % message)


def status_json(port):
    """/status.json of the agent on ``port``, None while it does not answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/status.json")
        resp = conn.getresponse()
        return json.loads(resp.read().decode("utf-8")) if resp.status == 200 else None
    except (OSError, ValueError):
        return None
    finally:
        conn.close()


def cycles(port):
    """The recent snapshots the agent on ``port`` lists (its chart's)."""
    return (status_json(port) or {}).get("history", ())


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The agent script, running, with 4+ cycles behind it: ``url`` (its
    metrics address), ``port``, ``dirs`` {storage name: directory}, ``log``."""
    tmp = tmp_path_factory.mktemp("status-page")
    port = free_port()
    dirs = {"disk": str(tmp / "disk"), "nas": str(tmp / "nas")}
    with GrowingVault() as vault, Endpoint(hostile_s3) as s3:
        config = {"addr": vault.url, "role_id": "r", "secret_id": "s", "frequency": "1s", "retain": 8,
                  "health_window": "30s",          # however loaded the machine
                  "metrics_address": "127.0.0.1:%d" % port,
                  "local_storage": [{"name": "disk", "path": dirs["disk"]},
                                    {"name": "nas", "path": dirs["nas"], "frequency": "1h"}],
                  "aws_storage": {"name": "offsite", "access_key_id": "AKIDHOSTILETEST",
                                  "secret_access_key": "hostile-test-secret", "s3_endpoint": s3.url,
                                  "s3_region": "us-east-1", "s3_bucket": "snapshots", "frequency": "1h"}}
        path = tmp / "snapshot.json"
        path.write_text(json.dumps(config))
        os.chmod(str(path), 0o600)
        env = child_env(drop=PROXY_VARS, drop_prefixes=("VAULT_", "BAO_", "AWS_", "AZURE_", "GOOGLE_"),
                        AWS_EC2_METADATA_DISABLED="true")
        log = tmp / "agent.log"
        proc = start_agent(str(path), str(log), sys.executable, env=env)
        try:
            wait_for(lambda: proc.poll() is not None or len(cycles(port)) >= 4, 30,
                     "four cycles of the agent (log: %s)" % log)
            assert proc.poll() is None, read(log)
            yield types.SimpleNamespace(url="http://127.0.0.1:%d" % port, port=port, dirs=dirs, log=log)
        finally:
            code = stop(proc)
        assert code == 0 and "Traceback" not in read(log), read(log)[-3000:]


def rows_by_name(page):
    return dict((cells[0][1].split("\n")[0], cells) for cells in page.rows)


# -- the page in a browser -----------------------------------------------------------


def test_the_page_shows_each_storage_and_a_chart_of_the_recent_snapshots(live, chromium):
    dom, console = chromium.dump_dom(live.url + "/")
    page = read_page(dom)
    assert console == [], console           # nothing blocked by the policy, no script error
    assert re.match(r"vault-snapshot-agent on \S+$", page.title)
    rows = rows_by_name(page)
    assert list(rows) == ["disk", "nas", "offsite"]
    assert [rows[name][0][0] for name in rows] == ["ok", "ok", "bad"]
    assert [len(cells) for cells in rows.values()] == [7, 7, 7]
    local = [text for _, text in rows["disk"]]
    assert local[0] == "disk\nlocal:%s" % live.dirs["disk"]
    assert re.match(ISO + "$", local[1]) and re.match(ISO + "$", local[3])
    snapshot, size = local[2].split("\n")
    assert vsa.parse_snapshot_name(snapshot) and re.match(r"\d+\.\d kB$", size)
    assert snapshot in os.listdir(live.dirs["disk"])
    nas = [text for _, text in rows["nas"]]
    assert nas[2].split("\n")[0] in os.listdir(live.dirs["nas"]) and nas[4] == "0"
    offsite = [text for _, text in rows["offsite"]]
    assert offsite[0] == "offsite\ns3://snapshots/raft_snapshots/"
    assert offsite[1] == "-" and offsite[2] == "-\n-" and int(offsite[4]) >= 1
    assert offsite[5].startswith("S3 PutObject on raft_snapshots/raft_snapshot-"), offsite[5]
    tags = [tag for tag, _ in page.elements]
    assert tags.count("svg") == 1 and tags.count("rect") >= 4
    assert tags.count("rect") == tags.count("circle") and tags.count("title") == 1 + 2 * tags.count("rect")
    bars = [attrs for tag, attrs in page.elements if tag == "rect"]
    assert len(set(attrs["height"] for attrs in bars)) >= 2, bars    # sizes differ
    assert "healthy" in dom and "UNHEALTHY" not in dom


def test_an_error_text_full_of_markup_shows_as_text_and_runs_nothing(live, chromium, curl):
    dom, console = chromium.dump_dom(live.url + "/")
    page = read_page(dom)
    error = [text for _, text in rows_by_name(page)["offsite"]][5]
    assert HOSTILE in error, error            # the operator reads what the server said, as text
    tags = [tag for tag, _ in page.elements]
    assert "script" not in tags and "img" not in tags
    assert tags.count("svg") == 1             # the chart; the <svg onload> stayed text
    handlers = [(tag, name) for tag, attrs in page.elements for name in attrs if name.startswith("on")]
    assert handlers == []
    assert console == [] and re.match(r"vault-snapshot-agent on \S+$", page.title)
    # The server escaped it: the bytes on the wire hold no markup of the attacker's.
    status, _, body = curl(live.url + "/")
    assert status == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in body
    assert "<script" not in body and "<img" not in body and body.count("<svg") == 1


def test_the_screenshot_is_a_png_of_the_window_with_the_style_applied(live, chromium, tmp_path):
    path = str(tmp_path / "status-page.png")
    console = chromium.screenshot(live.url + "/", path, WIDTH, HEIGHT)
    with open(path, "rb") as handle:
        data = handle.read()
    assert console == [], console
    assert png_size(data) == (WIDTH, HEIGHT)
    pixels = png_pixels(data)
    # Colours only the page's own style block paints: allowed by the CSP hash.
    assert color_count(pixels, "#f4f4f4") > 2000          # the table head
    assert color_count(pixels, "#fafafa") > 20000         # the chart's background
    assert color_count(pixels, "#4a7bd0") > 500           # the bars of stored snapshots
    keep = os.environ.get("STATUS_PAGE_SCREENSHOT")
    if keep:
        shutil.copyfile(path, keep)


@pytest.mark.e2e          # the running agent; the browser tests are e2e by their fixture
def test_the_page_headers_pin_its_style_and_forbid_everything_else(live, curl):
    status, headers, body = curl(live.url + "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer"
    policy = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
    style = read_page(body).style
    digest = base64.b64encode(hashlib.sha256(style.encode("utf-8")).digest()).decode("ascii")
    assert policy == {"default-src": "'none'", "style-src": "'sha256-%s'" % digest,
                      "img-src": "'none'", "base-uri": "'none'", "form-action": "'none'",
                      "frame-ancestors": "'none'"}
    assert body.count("<style>") == 1 and " style=" not in body   # the hash covers all styling
    assert int(headers["content-length"]) == len(body.encode("utf-8"))


def test_a_style_the_policy_does_not_pin_would_be_seen(chromium, monkeypatch, tmp_path):
    # The control for the checks above: with a policy pinned to another hash,
    # Chromium reports the blocked style and the page loses its colours.
    monkeypatch.setattr(vsa, "status_csp", lambda: "default-src 'none'; style-src 'sha256-%s'"
                        % base64.b64encode(hashlib.sha256(b"other").digest()).decode("ascii"))
    server = vsa.MetricsServer(("127.0.0.1", 0), vsa.Status(vsa.Clock()))
    try:
        path = str(tmp_path / "blocked.png")
        console = chromium.screenshot("http://%s/" % server.where(), path, WIDTH, HEIGHT)
    finally:
        server.close()
    assert [m for m in console if "Content Security Policy" in m], console
    with open(path, "rb") as handle:
        assert color_count(png_pixels(handle.read()), "#f4f4f4") < 200     # anti-aliased text only


@pytest.mark.e2e          # the running agent; the browser tests are e2e by their fixture
def test_healthz_head_and_unknown_paths_on_the_running_agent(live, curl):
    status, headers, body = curl(live.url + "/healthz")
    assert status == 200 and re.match(r"ok: last success %s \(.+ ago\), window 30s\n$" % ISO, body), body
    assert headers["cache-control"] == "no-store"
    status, headers, body = curl(live.url + "/healthz", "-I")
    assert (status, body) == (200, "") and int(headers["content-length"]) > 0
    assert raw_head(live.port, "/healthz").endswith(b"\r\n\r\n")       # and not a byte more
    status, headers, body = curl(live.url + "/", "-I")
    assert (status, body) == (200, "") and "content-security-policy" in headers
    assert curl(live.url + "/nope")[0] == 404
    assert curl(live.url + "/healthz/")[0] == 404
    status, headers, _ = curl(live.url + "/healthz", "-X", "POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, headers, body = curl(live.url + "/status.json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert list(json.loads(body)["storages"]) == ["disk", "nas", "offsite"]


def raw_head(port, path):
    """All the bytes the server sends for a HEAD of ``path``, until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(("HEAD %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path).encode("ascii"))
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk


# -- /healthz over hours of fake time ------------------------------------------------


class Probing(FakeSignals):
    """FakeSignals that, as the fake clock passes each of ``at`` (seconds
    after START), calls ``probe()`` and notes {t: its answer} in ``seen``."""

    def __init__(self, clock, at, until):
        FakeSignals.__init__(self, clock, until=START + until)
        self.pending, self.seen, self.probe = sorted(at), {}, None

    def wait(self, seconds, wake_on_reload=True):
        target = self.clock.monotonic() + seconds
        while self.pending and START + self.pending[0] <= target:
            self.clock.advance(max(0.0, START + self.pending[0] - self.clock.monotonic()))
            self.seen[self.pending.pop(0)] = self.probe()
        FakeSignals.wait(self, max(0.0, target - self.clock.monotonic()), wake_on_reload)


def healthz_over_time(tmp_path, curl, vault, clock, at, until, **config):
    """Run the daemon until ``until`` seconds; {t: (status, body)} of
    /healthz (curl, the real MetricsServer on the fake clock) at each ``at``."""
    signals = Probing(clock, at, until)
    servers = []

    def serve(agent):
        servers.append(vsa.MetricsServer(("127.0.0.1", 0), agent.status, clock=clock))
        url = "http://%s/healthz" % servers[0].where()
        signals.probe = lambda: curl(url)[::2]
    try:
        run_daemon(tmp_path, vault, clock, signals, on_agent=serve, **config)
    finally:
        for server in servers:
            server.close()
    assert sorted(signals.seen) == sorted(at)
    return signals.seen


def test_healthz_turns_503_two_frequencies_after_the_last_stored_cycle(tmp_path, curl):
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        vault.sealed = lambda t: t >= 150 * M      # stored at 0, 1h, 2h; sealed from 2h30
        seen = healthz_over_time(tmp_path, curl, vault, clock, [30 * M, 210 * M, 250 * M], 260 * M)
    assert seen[30 * M][0] == 200 and seen[30 * M][1].startswith("ok: last success 2026-01-01T00:16:40Z")
    # The 3h cycle failed; the 2h one is still within 2 x 1h.
    assert seen[210 * M] == (200, "ok: last success 2026-01-01T02:16:40Z (1h30m ago), window 2h\n")
    assert seen[250 * M] == (503, "unhealthy: last success 2026-01-01T02:16:40Z (2h10m ago), window 2h\n")


def test_a_leaders_checks_do_not_keep_it_healthy_only_stored_cycles_do(tmp_path, curl):
    clock = fake_clock()
    with ScriptedVault(clock) as vault:
        seen = healthz_over_time(tmp_path, curl, vault, clock, [2 * M, 10 * M, 61 * M, 70 * M], 75 * M,
                                 health_window="5m", leader_poll="1m")
        polls = len(vault.times("/v1/sys/leader"))
    assert polls > 60                                        # it asked every minute or so
    assert [seen[t][0] for t in sorted(seen)] == [200, 503, 200, 503]
    assert seen[10 * M][1] == "unhealthy: last success 2026-01-01T00:16:40Z (10m ago), window 5m\n"
    assert seen[61 * M][1] == "ok: last success 2026-01-01T01:16:40Z (1m ago), window 5m\n"


def test_a_standby_stays_healthy_while_its_leader_checks_succeed(tmp_path, curl):
    clock = fake_clock()
    with ScriptedVault(clock, leader=lambda t: False) as vault:
        vault.sealed = lambda t: t >= 120 * M      # from 2h on, every check fails
        at = [10 * M, 50 * M, 90 * M, 110 * M, 130 * M, 170 * M]
        seen = healthz_over_time(tmp_path, curl, vault, clock, at, 180 * M, health_window="5m",
                                 leader_poll="1m")
        assert not vault.snapshot_times()
    # A standby's cycles (skipped) come hourly, so between them only its
    # leader checks, every minute or so, keep it within the 5 minutes.
    assert [seen[t][0] for t in at] == [200, 200, 200, 200, 503, 503], seen
    assert all(seen[t][1].startswith("ok: last success ") for t in at[:4])
    assert re.match(r"unhealthy: last success 2026-01-01T02:1\d:\d\dZ \(1[0-9]m", seen[130 * M][1])
