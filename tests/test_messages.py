"""Messages that say what happened and what to do (#23): each case a user
met, with the exact situation."""

import io
import json
import socket
import threading

import pytest

import vault_snapshot_agent as vsa
from support.agent_sim import one_cycle
from support.fake_endpoints import FakeVault
from support.harness import FakeClock, free_port


def test_a_cycle_stored_nowhere_says_so_not_snapshot_dash(tmp_path):
    with FakeVault(role_id="r", secret_id="s") as vault:
        result, log = one_cycle(tmp_path, vault, FakeClock(), local_storage=None, aws_storage={
            "s3_bucket": "snaps", "s3_region": "us-east-1",
            "s3_endpoint": "http://127.0.0.1:%d" % free_port(),
            "access_key_id": "AKIDEXAMPLE", "secret_access_key": "secret-example-key"})
    assert result.outcome == "failed"
    assert "Cycle failed: snapshot taken but stored nowhere" in log
    assert "snapshot -," not in log


@pytest.mark.parametrize("endpoint, path_style", [
    ("http://minio:9000", True), ("http://minio.internal:9000", False),
    ("http://127.0.0.1:9000", True), ("https://s3.eu-west-1.amazonaws.com", False)])
def test_a_one_word_s3_endpoint_host_gets_path_style(tmp_path, endpoint, path_style):
    cfg = vsa.config_from_dict({"vault_auth_method": "token", "token": "t", "aws_storage": {
        "s3_bucket": "snaps", "s3_region": "us-east-1", "s3_endpoint": endpoint,
        "access_key_id": "AKIDEXAMPLE", "secret_access_key": "secret-example-key"}}, env={})
    runtime = vsa.Runtime.create(env={})
    try:
        storage = vsa.build_storages(cfg, runtime)[0]
    finally:
        runtime.signals.close()
    assert storage.path_style is path_style
    host = endpoint.split("://")[1]
    assert storage._host == (host if path_style else "snaps." + host)


def plain_http_listener():
    """A loopback socket that answers any connection with an HTTP/1.1 400."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return server


def test_https_to_a_plain_http_listener_says_use_http():
    server = plain_http_listener()
    try:
        http = vsa.Http(deadline=10.0, timeout=5.0)
        with pytest.raises(vsa.TransportError) as caught:
            http.request("GET", "https://127.0.0.1:%d/v1/sys/leader" % server.getsockname()[1])
    finally:
        server.close()
    assert "the server answered without TLS: use http:// in the URL" in str(caught.value)


def test_verify_of_a_file_that_is_not_gzip_names_the_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a snapshot\n")
    log = io.StringIO()
    assert vsa.main(["verify", str(path)], stream=log, out=io.StringIO()) == 1
    assert "ERROR %s: snapshot is not a valid gzip stream" % path in log.getvalue()


def test_an_unknown_key_gets_a_suggestion_and_fails_check_config(tmp_path):
    config = tmp_path / "c.json"
    config.write_text('{"addr": "http://127.0.0.1:9", "vault_auth_method": "token", "token": "t", '
                      '"retian": 3, "local_storage": {"path": "%s", "frequncy": "1h", "zzz": 1}}'
                      % (tmp_path / "snaps"))
    log, out = io.StringIO(), io.StringIO()
    assert vsa.main(["-c", str(config), "--check-config"], stream=log, out=out, env={}) == 1
    text = log.getvalue()
    assert "unknown config key 'retian' ignored (did you mean 'retain'?)" in text
    assert "'local_storage.frequncy' ignored (did you mean 'local_storage.frequency'?)" in text
    assert "'local_storage.zzz' ignored (typo?)" in text
    assert "ERROR --check-config: 3 unknown key(s)" in text
    assert '"retain": 0' in out.getvalue()          # the effective config is still shown
    config.write_text('{"addr": "http://127.0.0.1:9", "vault_auth_method": "token", "token": "t", '
                      '"local_storage": {"path": "%s"}}' % (tmp_path / "snaps"))
    assert vsa.main(["-c", str(config), "--check-config"], stream=io.StringIO(), out=io.StringIO(),
                    env={}) == 0


def test_check_config_shows_each_route_and_why(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({
        "addr": "https://vault.example:8200", "vault_auth_method": "token", "token": "t",
        "local_storage": {"path": str(tmp_path / "snaps")},
        "aws_storage": {"s3_bucket": "snaps", "s3_region": "eu-west-1", "access_key_id": "AKIDEXAMPLE",
                        "secret_access_key": "secret-example-key"},
        "azure_storage": {"account_name": "acct", "account_key": "a2V5", "container_name": "c",
                          "endpoint": "http://127.0.0.1:10000/acct"},
        "google_storage": {"bucket": "gsnaps", "proxy": "direct"}}))
    env = {"HTTPS_PROXY": "http://user:pw-secret@proxy.corp:3128", "NO_PROXY": ".amazonaws.com"}
    log = io.StringIO()
    vsa.main(["-c", str(config), "--check-config"], stream=log, out=io.StringIO(), env=env)
    routes = [line.split(" Route: ", 1)[1] for line in log.getvalue().splitlines() if " Route: " in line]
    assert routes == [
        "Vault at https://vault.example:8200: via http://user:***@proxy.corp:3128 (HTTPS_PROXY), "
        "TLS verified",
        "s3://snaps/raft_snapshots/ at https://snaps.s3.eu-west-1.amazonaws.com: direct (NO_PROXY "
        "matches snaps.s3.eu-west-1.amazonaws.com), TLS verified",
        "azure:http://127.0.0.1:10000/acct/c/ at http://127.0.0.1:10000: direct (no HTTP_PROXY in "
        "the environment)",
        "gs://gsnaps/ at https://storage.googleapis.com: direct (google_storage.proxy is \"direct\"), "
        "TLS verified"], log.getvalue()
    assert "pw-secret" not in log.getvalue()


def test_debug_adds_lines_to_a_cycle_and_json_lines_carry_fields(tmp_path):
    with FakeVault(role_id="r", secret_id="s") as vault:
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"addr": vault.url, "role_id": "r", "secret_id": "s",
                                      "retain": 1, "local_storage": {"path": str(tmp_path / "snaps")}}))
        logs = {}
        for level in ("info", "debug"):
            log = io.StringIO()
            assert vsa.main(["-c", str(config), "--once", "--log-level", level, "--log-format",
                             "json"], stream=log, out=io.StringIO(), env={}) == 0
            logs[level] = [json.loads(line) for line in log.getvalue().splitlines()]
    debug = [line["message"] for line in logs["debug"] if line["level"] == "debug"]
    for start in ("sys/leader at %s: this node is the active one" % vault.url, "Streaming the snapshot into",
                  "Uploading ", "Retention plan for local:"):
        assert any(message.startswith(start) for message in debug), (start, debug)
    assert not [line for line in logs["info"] if line["level"] == "debug"]
    stored = [line for line in logs["info"] if line["message"].startswith("Successfully created")][0]
    assert stored["storage"] == "local" and stored["snapshot"].startswith("raft_snapshot-")
    assert stored["bytes"] > 0 and stored["duration"] >= 0
    cycle = [line for line in logs["info"] if line["message"].startswith("Cycle stored")][0]
    assert cycle["outcome"] == "stored" and cycle["snapshot"] == stored["snapshot"]
    assert cycle["bytes"] == stored["bytes"] and "error" not in cycle


@pytest.mark.e2e
def test_a_refused_connect_shows_the_proxys_own_reason(open_proxy):
    # tinyproxy cannot reach the origin: its 500 page says why; the error shows it.
    http = vsa.Http(proxy=vsa.ProxyPolicy(open_proxy.open_url), deadline=10.0, timeout=5.0)
    with pytest.raises(vsa.TransportError) as caught:
        http.request("GET", "https://127.0.0.1:%d/v1/sys/leader" % free_port())
    text = str(caught.value)
    assert "Tunnel connection failed: 500" in text
    assert "(the proxy said: " in text and "<" not in text.split("the proxy said: ")[1], text
