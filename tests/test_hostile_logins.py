"""Adversarial review of the read-only Config, the Vault login methods and
the storages' one error mapper: a user who gets the config wrong, and a
broken or hostile server (a loopback "Vault" or storage answer).

Each test holds a defect found in review (fixed with it) or a behaviour that
held under attack and must stay so."""

import io
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import vault_snapshot_agent as vsa
from support.harness import FakeClock, FakeSignals, LoopbackServer, captured_log, run_main

PASSWORD = "s3cret-PW-7f3a"


# ------------------------------------------------------------------ helpers


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")
    os.chmod(str(path), 0o600)
    return str(path)


def userpass(tmp_path, password_file, addr="http://127.0.0.1:8200", **extra):
    config = {"addr": addr, "vault_auth_method": "userpass", "username": "alice",
              "password_file": password_file, "local_storage": {"path": str(tmp_path / "s")}}
    config.update(extra)
    return config


class LoginVault(LoopbackServer):
    """A loopback "Vault": ``reply(handler, body)`` answers every request;
    ``seen`` records (method, path, body)."""

    def __init__(self, reply):
        LoopbackServer.__init__(self)
        self.reply = reply
        self.seen = []

    def answer(self, handler):
        body = handler.read_body()
        self.seen.append((handler.command, handler.path, body))
        return self.reply(handler, body)


def granted(lease=3600, token="hvs.test-token", renewable=True):
    return 200, {}, {"auth": {"client_token": token, "lease_duration": lease,
                              "renewable": renewable}}


def client_for(server, tmp_path, password_file, clock=None, **extra):
    cfg = vsa.config_from_dict(userpass(tmp_path, password_file, server.url, **extra), env={})
    return vsa.VaultClient(cfg, clock=clock or FakeClock(), env={})


# ------------------------------------- secrets a server echoes back at login


@pytest.mark.parametrize("status,payload", [
    (400, lambda body: {"errors": ["invalid request body: " + body.decode()]}),
    (400, lambda body: b"<html><pre>" + body + b"</pre></html>"),
    (200, lambda body: b"unexpected: " + body),
], ids=["json-errors", "html-400", "non-json-200"])
def test_a_password_echoed_by_the_login_answer_never_reaches_the_log(
        tmp_path, password_file, status, payload):
    with LoginVault(lambda handler, body: (status, {}, payload(body))) as server:
        client = client_for(server, tmp_path, password_file)
        with captured_log() as log:
            with pytest.raises(vsa.AgentError) as caught:
                client.login()
    assert PASSWORD in server.seen[0][2].decode()      # it was sent, and answered back
    assert PASSWORD not in str(caught.value) + log.getvalue()


# ------------------------------------------ what the config lets reach a URL


@pytest.mark.parametrize("mount", ["x#y", "x?y", "a/../b", "..", ".", "x%2fy", "a//b"])
def test_a_mount_that_is_not_a_plain_path_is_refused_at_load(tmp_path, password_file, mount):
    with pytest.raises(vsa.ConfigError) as caught:
        vsa.config_from_dict(userpass(tmp_path, password_file, vault_auth_path=mount), env={})
    assert "vault_auth_path" in str(caught.value)


@pytest.mark.parametrize("user", [".", ".."])
def test_a_username_of_dots_is_refused_at_load(tmp_path, password_file, user):
    with pytest.raises(vsa.ConfigError) as caught:
        vsa.config_from_dict(userpass(tmp_path, password_file, username=user), env={})
    assert "username" in str(caught.value)


@pytest.mark.parametrize("user,sent", [
    ("a/b", "a%2Fb"), ("%41", "%2541"), ("a?b", "a%3Fb"), ("a#b", "a%23b"), ("\u00fc", "%C3%BC"),
])
def test_a_username_is_one_escaped_path_segment(tmp_path, password_file, user, sent):
    with LoginVault(lambda handler, body: granted()) as server:
        client_for(server, tmp_path, password_file, username=user).login()
    assert server.seen[0][1] == "/v1/auth/userpass/login/" + sent


# ------------------------------------------- two spellings of the same key


@pytest.mark.parametrize("extra", [
    {"vault_auth_method": "jwt", "vault_auth_role": "a", "k8s_auth_role": "b"},
    {"vault_auth_method": "jwt", "vault_auth_role": "r", "vault_auth_path": "a",
     "k8s_auth_path": "b"},
    {"vault_auth_method": "approle", "role_id": "r", "secret_id": "s", "approle": "a",
     "vault_auth_path": "b"},
], ids=["role", "path", "approle-key"])
def test_two_spellings_with_different_values_are_refused(tmp_path, password_file, extra):
    config = {"addr": "http://127.0.0.1:8200", "jwt_file": password_file,
              "local_storage": {"path": str(tmp_path / "s")}}
    config.update(extra)
    with pytest.raises(vsa.ConfigError) as caught:
        vsa.config_from_dict(config, env={})
    assert "conflict" in str(caught.value) or "both" in str(caught.value)


# ------------------------------------------------ the password, its file


@pytest.mark.parametrize("value", ["", "   ", "\n", "\t"])
def test_an_empty_or_blank_password_variable_counts_as_unset(tmp_path, value):
    config = {"addr": "http://127.0.0.1:8200", "vault_auth_method": "userpass",
              "username": "u", "local_storage": {"path": str(tmp_path / "s")}}
    with pytest.raises(vsa.ConfigError) as caught:
        vsa.config_from_dict(config, env={"VAULT_AUTH_PASSWORD": value})
    assert "password_file" in str(caught.value)


@pytest.mark.parametrize("value", [12345678, ["x"], {"a": 1}, True])
def test_a_password_key_of_any_type_is_refused_as_env_only(tmp_path, value):
    config = {"addr": "http://127.0.0.1:8200", "vault_auth_method": "userpass",
              "username": "u", "password": value, "local_storage": {"path": str(tmp_path / "s")}}
    with pytest.raises(vsa.ConfigError) as caught:
        vsa.config_from_dict(config, env={})
    assert "environment only" in str(caught.value)


def test_a_password_file_readable_by_others_is_warned_about(tmp_path, password_file):
    os.chmod(password_file, 0o644)
    cfg = vsa.config_from_dict(userpass(tmp_path, password_file), env={})
    assert any("password_file" in w and "chmod 600" in w for w in cfg.warnings), cfg.warnings


def test_an_empty_jwt_file_is_refused_at_load(tmp_path):
    jwt = tmp_path / "jwt"
    jwt.write_text("")
    config = {"addr": "http://127.0.0.1:8200", "vault_auth_method": "jwt", "vault_auth_role": "r",
              "jwt_file": str(jwt), "local_storage": {"path": str(tmp_path / "s")}}
    with pytest.raises(vsa.ConfigError):
        vsa.config_from_dict(config, env={})


def test_a_secret_file_longer_than_the_limit_is_refused_not_truncated(tmp_path):
    path = tmp_path / "jwt"
    path.write_text("e" * 70000)
    with pytest.raises(vsa.ConfigError):
        vsa.read_secret_file(str(path), "jwt_file")


def test_a_jwt_file_replaced_by_a_fifo_before_login_fails_the_login_at_once(
        tmp_path, password_file):
    jwt = tmp_path / "jwt"
    jwt.write_text("a.b.c")
    config = {"addr": "http://127.0.0.1:8200", "vault_auth_method": "jwt", "vault_auth_role": "r",
              "jwt_file": str(jwt), "local_storage": {"path": str(tmp_path / "s")}}
    cfg = vsa.config_from_dict(config, env={})
    os.unlink(str(jwt))
    os.mkfifo(str(jwt))
    started = time.monotonic()
    with pytest.raises(vsa.ConfigError) as caught:
        vsa.VaultClient(cfg, env={}).login()
    assert "not a regular file" in str(caught.value)
    assert time.monotonic() - started < 5


# ---------------------------------------------------- hostile login answers


@pytest.mark.parametrize("token", [123, ["x"], {"a": 1}, True])
def test_a_client_token_that_is_not_a_string_is_a_login_error(tmp_path, password_file, token):
    with LoginVault(lambda handler, body: granted(token=token)) as server:
        client = client_for(server, tmp_path, password_file)
        with pytest.raises(vsa.VaultError) as caught:
            client.login()
    assert "client_token" in str(caught.value)


@pytest.mark.parametrize("lease", [b"1e400", b"Infinity"])
def test_an_infinite_lease_duration_does_not_break_the_login(tmp_path, password_file, lease):
    body = b'{"auth": {"client_token": "t", "lease_duration": ' + lease + b'}}'
    reply = (200, {"Content-Type": "application/json"}, body)
    with LoginVault(lambda handler, _: reply) as server:
        client = client_for(server, tmp_path, password_file)
        try:
            client.login()
        except vsa.AgentError:
            pass                      # refusing the answer is fine too


def test_a_negative_lease_duration_is_not_logged_as_a_wrapped_time(tmp_path, password_file):
    with LoginVault(lambda handler, body: granted(lease=-5)) as server:
        client = client_for(server, tmp_path, password_file)
        with captured_log() as log:
            with pytest.raises(vsa.VaultError):     # not a time: refused, never a wrapped one
                client.login()
    assert "-1h59m55s" not in log.getvalue(), log.getvalue()


def test_a_renewal_answer_that_is_not_an_object_leads_to_a_new_login(tmp_path, password_file):
    def reply(handler, body):
        if handler.path.endswith("/renew-self"):
            return 200, {}, [1, 2]
        return granted(lease=60)
    clock = FakeClock()
    with LoginVault(reply) as server:
        client = client_for(server, tmp_path, password_file, clock=clock)
        client.ensure_token()
        clock.advance(45)            # past 2/3 of the TTL, before its end
        client.ensure_token()
    assert [p for _, p, _ in server.seen].count("/v1/auth/userpass/login/alice") == 2


def test_a_refused_user_login_gets_the_login_hint(tmp_path, password_file):
    answer = (400, {}, {"errors": ["invalid username or password"]})
    with LoginVault(lambda handler, body: answer) as server:
        with pytest.raises(vsa.VaultError) as caught:
            client_for(server, tmp_path, password_file).login()
    assert "login refused" in str(caught.value)


# ------------------------------------------------------- --check-config


@pytest.mark.parametrize("where", ["addr", "aws_storage.s3_endpoint", "google_storage.endpoint"])
def test_check_config_never_prints_a_password_given_in_a_url(tmp_path, where):
    config = {"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s",
              "local_storage": {"path": str(tmp_path / "s")}}
    url = "http://someone:urlPW-91c2@127.0.0.1:9"
    if where == "addr":
        config["addr"] = url
    elif where.startswith("aws"):
        config["aws_storage"] = {"s3_bucket": "bkt-1", "s3_region": "us-east-1",
                                 "access_key_id": "AKIAEXAMPLE", "secret_access_key": "x",
                                 "s3_endpoint": url}
    else:
        config["google_storage"] = {"bucket": "bkt-1", "endpoint": url}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    os.chmod(str(path), 0o600)
    out, log = io.StringIO(), io.StringIO()
    code = vsa.main(["-c", str(path), "--check-config"], stream=log, out=out,
                    env={"HOME": str(tmp_path)})
    assert code in (0, 2), log.getvalue()
    assert "urlPW-91c2" not in out.getvalue() + log.getvalue()


def test_check_config_never_prints_the_password(tmp_path, password_file):
    config = userpass(tmp_path, None)
    del config["password_file"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    os.chmod(str(path), 0o600)
    out, log = io.StringIO(), io.StringIO()
    code = vsa.main(["-c", str(path), "--check-config"], stream=log, out=out,
                    env={"VAULT_AUTH_PASSWORD": PASSWORD})
    assert code == 0, log.getvalue()
    assert json.loads(out.getvalue())["password"] == "***"
    assert PASSWORD not in out.getvalue() + log.getvalue()


def test_an_encrypted_client_key_is_a_config_error_not_a_terminal_prompt(tmp_path):
    pty = pytest.importorskip("pty")
    import select
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make an encrypted key")
    key, cert = str(tmp_path / "enc.key"), str(tmp_path / "cert.pem")
    subprocess.check_call(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-keyout", key,
                           "-out", cert, "-days", "1", "-subj", "/CN=agent",
                           "-passout", "pass:hunter2"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({
        "addr": "https://127.0.0.1:8200", "vault_auth_method": "cert", "client_cert": cert,
        "client_key": key, "local_storage": {"path": str(tmp_path / "s")}}))
    pid, fd = pty.fork()
    if pid == 0:           # the child: its own session with the pty as its terminal
        os.execv(sys.executable, [sys.executable, vsa.__file__, "-c", str(config),
                                  "--check-config"])
    output, deadline, status = b"", time.monotonic() + 30, None
    try:
        while b"pass phrase" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                output += chunk
        while time.monotonic() < deadline:      # EOF on the pty comes before the exit
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            status = None
            time.sleep(0.05)
    finally:
        if status is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert b"pass phrase" not in output, output
    assert status is not None and os.WEXITSTATUS(status) == 2, output


# --------------------------------------------------------------- reload


def test_a_reload_that_changes_only_the_login_method_logs_in_the_new_way(
        tmp_path, password_file):
    def reply(handler, body):
        if handler.path == "/v1/sys/leader":
            return 200, {}, {"ha_enabled": False}
        return granted()
    with LoginVault(reply) as server:
        path = tmp_path / "c.json"
        approle = {"addr": server.url, "role_id": "r", "secret_id": "s",
                   "local_storage": {"path": str(tmp_path / "s")}}
        path.write_text(json.dumps(approle))
        os.chmod(str(path), 0o600)
        clock = FakeClock()
        agent = vsa.Agent(lambda runtime: vsa.load_all(str(path), runtime), clock=clock,
                          signals=FakeSignals(clock), env={})
        agent.vault.login()
        path.write_text(json.dumps(userpass(tmp_path, password_file, server.url)))
        with captured_log() as log:
            assert agent.reload(), log.getvalue()
        agent.vault.login()
    assert [p for _, p, _ in server.seen] == ["/v1/auth/approle/login",
                                              "/v1/auth/userpass/login/alice"]
    with pytest.raises(AttributeError):
        agent.cfg.vault_auth_method = "approle"         # still read-only after a reload


# ------------------------------------------------- the storage error mapper


class _Answer:
    status, reason = 403, "Forbidden"


@pytest.mark.parametrize("mapper,body", [
    ("xml", b"<Error><Code>AccessDenied\n2030-01-01T00:00:00.000Z INFO Cycle stored: fake"
            b"</Code><Message>m</Message></Error>"),
    ("xml", b"<Error><Code>A&#10;B</Code></Error>"),
    ("xml", b"<Error><Code>" + b"C" * 100000 + b"</Code></Error>"),
    ("gcs", json.dumps({"error": {"message": "m", "errors": [{"reason": "r\nINFO fake"}]}}).encode()),
], ids=["code-newline", "code-entity-newline", "code-100kB", "gcs-reason-newline"])
def test_a_storage_error_is_one_short_line_whatever_the_body(mapper, body):
    if mapper == "xml":
        code, message, _ = vsa.xml_error(body)
        text = str(vsa.storage_error("S3", "PutObject on k", _Answer(), code, message, None))
    else:
        text = str(vsa._gcs_error(_Answer(), body, "upload k"))
    assert "\n" not in text and "\r" not in text
    assert len(text) < 1000


def test_a_message_that_starts_with_a_newline_keeps_its_text():
    code, message, _ = vsa.xml_error(b"<Error><Code>AccessDenied</Code><Message>\n  the bucket "
                                     b"policy denies it\n</Message></Error>")
    assert message and "bucket policy" in message


@pytest.mark.parametrize("body", [
    b"", b"  \n", b"\xff\xfe not utf-8 \x00",
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
    b"<Error><Code>X</Code><Message>&e;</Message></Error>",
])
def test_odd_error_bodies_map_to_a_line_without_reading_files(body):
    code, message, _ = vsa.xml_error(body, "HeaderCode")
    text = str(vsa.storage_error("Azure", "Put Blob", _Answer(), code, message, None))
    assert text.startswith("Azure Put Blob: HTTP 403 ")
    assert "root:" not in text                   # no external entity was read


def test_run_main_check_config_with_a_userpass_config_exits_0(tmp_path, password_file):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(userpass(tmp_path, password_file)))
    os.chmod(str(path), 0o600)
    code, log = run_main("-c", str(path), "--check-config")
    assert code == 0, log
    assert PASSWORD not in log
