"""Login method ``aws`` (IAM type): a SigV4-signed sts:GetCallerIdentity
request, sent as Vault's ``iam_*`` login fields.

OpenBao has no aws auth method, so the end-to-end tests log in at
login_standin.VaultLoginStandIn, whose check (aws_iam_standin.VaultAwsIam)
does what Vault's server does: decodes the four fields, checks the
server-ID header, the X-Amz-* allow-list and the body, REPLAYS the request
to moto's STS (signature checking on) and binds the ARN STS names to the
role. The token it then hands out is the real cluster's. Unit tests pin
the wire shape (botocore as the signing oracle) and hostile credential
endpoints, each one line, bounded in time and memory."""

import base64
import datetime
import io
import json
import os
import time
import tracemalloc

import pytest

import vault_snapshot_agent as vsa
from support.aws_iam_standin import HostileEndpoint, VaultAwsIam, WebIdentitySts, go_name
from support.cred_servers import ImdsServer
from support.harness import FakeClock, known_secrets, token_lifecycle
from support.login_standin import VaultLoginStandIn

ACCOUNT = "123456789012"
USER_ARN = "arn:aws:iam::%s:user/snapshot-agent" % ACCOUNT
ROLE_ARN = "arn:aws:iam::%s:role/snapshot-role" % ACCOUNT
SERVER_ID = "vault.example.test"
WHEN = datetime.datetime(2026, 11, 27, 21, 0, 5, tzinfo=datetime.timezone.utc)
CREDS = vsa.AwsCredentials("ASIAEXAMPLEKEY000001", vsa.Secret("unit-secret/key+0000000000000000"),
                           vsa.Secret("unit-session-token"), None, "test")


known_secrets("unit-secret/key+0000000000000000", "unit-session-token", "hostile-secret",
              "hostile-token", "imdsSecretKeyExample/0000000000000000000")


def base_env(tmp_path, **extra):
    """No ~/.aws, no metadata service, no AWS variable but ``extra``."""
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
           "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
           "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(tmp_path)}
    env.update(extra)
    return env


def decoded(payload):
    """(url, body, headers) of a login payload."""
    return (base64.b64decode(payload["iam_request_url"]).decode(),
            base64.b64decode(payload["iam_request_body"]),
            json.loads(base64.b64decode(payload["iam_request_headers"]).decode()))


def signed_headers(headers):
    return headers["Authorization"][0].split("SignedHeaders=")[1].split(",")[0].split(";")


# ------------------------------------------------------------- wire shape


def test_the_login_body_has_the_shape_vaults_client_sends():
    payload = vsa.aws_login_request(CREDS, "https://sts.amazonaws.com/", "us-east-1", SERVER_ID, WHEN)
    assert sorted(payload) == ["iam_http_request_method", "iam_request_body", "iam_request_headers",
                               "iam_request_url"]
    assert payload["iam_http_request_method"] == "POST"
    url, body, headers = decoded(payload)
    assert url == "https://sts.amazonaws.com/"
    assert body == b"Action=GetCallerIdentity&Version=2011-06-15"
    assert all(isinstance(v, list) and len(v) == 1 for v in headers.values())
    assert sorted(headers) == ["Authorization", "Content-Type", "X-Amz-Date", "X-Amz-Security-Token",
                               "X-Vault-Aws-Iam-Server-Id"]         # Go's spelling; no Host
    assert all(name == go_name(name) for name in headers)
    assert headers["X-Vault-Aws-Iam-Server-Id"] == [SERVER_ID]
    assert headers["X-Amz-Date"] == ["20261127T210005Z"]
    assert headers["Content-Type"] == ["application/x-www-form-urlencoded; charset=utf-8"]
    assert signed_headers(headers) == ["content-type", "host", "x-amz-date", "x-amz-security-token",
                                       "x-vault-aws-iam-server-id"]
    assert "Credential=ASIAEXAMPLEKEY000001/20261127/us-east-1/sts/aws4_request" in \
        headers["Authorization"][0]


def test_a_region_signs_for_its_own_endpoint_and_no_server_id_is_sent_unasked():
    url = vsa.aws_sts_url("eu-west-2") + "/"
    payload = vsa.aws_login_request(CREDS._replace(token=None), url, "eu-west-2", None, WHEN)
    url, _, headers = decoded(payload)
    assert url == "https://sts.eu-west-2.amazonaws.com/"
    assert sorted(headers) == ["Authorization", "Content-Type", "X-Amz-Date"]
    assert "/20261127/eu-west-2/sts/aws4_request" in headers["Authorization"][0]
    assert vsa.aws_sts_url("cn-north-1") == "https://sts.cn-north-1.amazonaws.com.cn"
    assert vsa.aws_sts_url(None) == "https://sts.amazonaws.com"


@pytest.mark.oracle
@pytest.mark.parametrize("url,region,token,server_id", [
    ("https://sts.amazonaws.com/", "us-east-1", "unit-session-token", SERVER_ID),
    ("https://sts.eu-west-2.amazonaws.com/", "eu-west-2", None, None),
    ("http://127.0.0.1:4566/", "us-east-1", "unit-session-token", "a.b"),
])
def test_the_signature_equals_botocores(monkeypatch, url, region, token, server_id):
    botocore_auth = pytest.importorskip("botocore.auth")
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    creds = CREDS._replace(token=vsa.Secret(token) if token else None)
    ours = decoded(vsa.aws_login_request(creds, url, region, server_id, WHEN))[2]
    monkeypatch.setattr(botocore_auth, "get_current_datetime",
                        lambda remove_tzinfo=True: WHEN.replace(tzinfo=None))
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    if server_id:
        headers["X-Vault-AWS-IAM-Server-ID"] = server_id
    request = AWSRequest(method="POST", url=url, data=b"Action=GetCallerIdentity&Version=2011-06-15",
                         headers=headers)
    botocore_auth.SigV4Auth(Credentials(CREDS.access_key, CREDS.secret_key.reveal(), token), "sts",
                            region).add_auth(request)
    assert ours["Authorization"] == [request.headers["Authorization"]]


# ----------------------------------------------- the stand-in's judgement


def judged(payload, **standin):
    """What VaultAwsIam says of ``payload`` before any replay."""
    check = VaultAwsIam("http://127.0.0.1:9", {}, **standin)
    _, body, headers = decoded(payload)
    from support.aws_iam_standin import _headers
    return check._validate(_headers(payload["iam_request_headers"]), body.decode())


def with_headers(payload, change):
    _, _, headers = decoded(payload)
    change(headers)
    out = dict(payload)
    out["iam_request_headers"] = base64.b64encode(json.dumps(headers).encode()).decode()
    return out


def test_the_stand_in_refuses_a_missing_an_unsigned_or_a_wrong_server_id_header():
    signed = vsa.aws_login_request(CREDS, "https://sts.amazonaws.com/", "us-east-1", SERVER_ID, WHEN)
    unasked = vsa.aws_login_request(CREDS, "https://sts.amazonaws.com/", "us-east-1", None, WHEN)
    assert judged(signed, server_id=SERVER_ID) is None
    assert "missing header" in judged(unasked, server_id=SERVER_ID)
    unsigned = with_headers(unasked, lambda h: h.update({"X-Vault-Aws-Iam-Server-Id": [SERVER_ID]}))
    assert judged(unsigned, server_id=SERVER_ID).endswith("vault header wasn't signed")
    assert 'expected "other" but got "%s"' % SERVER_ID in judged(signed, server_id="other")


def test_the_stand_in_refuses_extra_amz_headers_and_body_values():
    signed = vsa.aws_login_request(CREDS, "https://sts.amazonaws.com/", "us-east-1", None, WHEN)
    extra = with_headers(signed, lambda h: h.update({"X-Amz-User-Agent": ["x"]}))
    assert judged(extra) == "invalid request header: X-Amz-User-Agent"
    body = dict(signed, iam_request_body=base64.b64encode(b"Action=GetCallerIdentity&Version=2011-06-15"
                                                          b"&RoleArn=x").decode())
    assert judged(body) == "iam_request_body contains unexpected values"


# ---------------------------------------------------------------- config


def write_config(tmp_path, **config):
    full = {"addr": "http://127.0.0.1:8200", "vault_auth_method": "aws",
            "local_storage": {"path": str(tmp_path / "snaps")}}
    full.update(config)
    full = dict((k, v) for k, v in full.items() if v is not None)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(full))
    os.chmod(str(path), 0o600)
    return str(path)


def run(argv, env):
    stream = io.StringIO()
    code = vsa.main(list(argv), stream=stream, env=env)
    return code, stream.getvalue()


def test_defaults_mount_aws_no_role_and_the_global_endpoint(tmp_path):
    cfg = vsa.load_config(write_config(tmp_path), env=base_env(tmp_path))
    assert (cfg.vault_auth_method, cfg.vault_auth_path, cfg.vault_auth_role) == ("aws", "aws", None)
    assert cfg.aws_sts_endpoint == "https://sts.amazonaws.com"
    assert cfg.aws_imds_endpoint == "http://169.254.169.254"
    cfg = vsa.load_config(write_config(tmp_path, aws_sts_region="eu-west-2"), env=base_env(
        tmp_path, AWS_PROFILE="backup", AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:9"))
    assert cfg.aws_sts_endpoint == "https://sts.eu-west-2.amazonaws.com"
    assert (cfg.aws_profile, cfg.aws_imds_endpoint) == ("backup", "http://127.0.0.1:9")


@pytest.mark.parametrize("change,key", [
    ({"aws_sts_region": "EU-West"}, "aws_sts_region"),
    ({"aws_sts_endpoint": "https://sts.example.test/some/path"}, "aws_sts_endpoint"),
    ({"aws_sts_endpoint": "ftp://sts.example.test"}, "aws_sts_endpoint"),
    ({"aws_role_arn": "snapshot-role"}, "aws_role_arn"),
    ({"aws_iam_server_id": "vault example"}, "aws_iam_server_id"),
    ({"aws_imds_endpoint": "http://[::1"}, "aws_imds_endpoint"),
])
def test_bad_aws_settings_are_one_line_at_load(tmp_path, change, key):
    code, log = run(["-c", write_config(tmp_path, **change), "--check-config"], base_env(tmp_path))
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert code == 2 and len(errors) == 1, log
    assert key in errors[0], errors[0]


# --------------------------------------------- hostile credential sources


def login_error(tmp_path, env, **config):
    """(error text, seconds, peak traced bytes) of one login that must fail."""
    cfg = vsa.load_config(write_config(tmp_path, request_timeout="3s", timeout="2s", **config), env=env)
    client = vsa.VaultClient(cfg, env=env)
    tracemalloc.start()
    began = time.monotonic()
    try:
        with pytest.raises(vsa.AgentError) as caught:
            client.login()
        elapsed = time.monotonic() - began
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    text = str(caught.value)
    assert "\n" not in text and "hostile-secret" not in text and "hostile-token" not in text
    return text, elapsed, peak


@pytest.mark.parametrize("mode,expect", [
    ("silent", "no AWS credentials found"),       # no token answer: not on EC2
    ("endless", "EC2 metadata credentials"),
    ("huge", "EC2 metadata credentials"),
    ("no_key", "no AccessKeyId/SecretAccessKey"),
    ("expired", "still expired"),
    ("not_json", "not JSON"),
])
@pytest.mark.slow
def test_a_hostile_metadata_service_is_one_line_bounded_in_time_and_memory(tmp_path, mode, expect):
    with HostileEndpoint(mode) as imds:
        env = base_env(tmp_path, AWS_EC2_METADATA_DISABLED="false")
        text, elapsed, peak = login_error(tmp_path, env, aws_imds_endpoint=imds.url)
    assert text.startswith("aws login at auth/aws: no AWS credentials to sign with: "), text
    assert expect in text, text
    assert elapsed < 8.0 and peak < 24 * 1024 * 1024, (elapsed, peak)


@pytest.mark.slow
def test_a_web_identity_sts_that_never_answers_is_one_line_within_the_deadline(tmp_path):
    token = tmp_path / "token"
    token.write_text("header.payload.signature")
    with HostileEndpoint("silent") as sts:
        env = base_env(tmp_path, AWS_ROLE_ARN=ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE=str(token))
        text, elapsed, _ = login_error(tmp_path, env, aws_sts_endpoint=sts.url)
    assert text.startswith("aws login at auth/aws: no AWS credentials to sign with: "), text
    assert "header.payload.signature" not in text
    assert elapsed < 6.0, elapsed


def test_no_credentials_anywhere_is_one_line(tmp_path):
    text, _, _ = login_error(tmp_path, base_env(tmp_path))
    assert "no AWS credentials found" in text, text


# ------------------------------------------------------- end to end (moto)


@pytest.fixture
def aws_login(bao_cluster, moto):
    """A factory: (stand-in, check) for a role bound to ``bound``."""
    started = []

    def make(roles, server_id=None):
        check = VaultAwsIam(moto.endpoint, roles, server_id=server_id)
        stand_in = VaultLoginStandIn(bao_cluster, "aws", check).start()
        started.append(stand_in)
        return stand_in, check
    yield make
    for stand_in in started:
        known_secrets(*stand_in.tokens)
        known_secrets(*(login.get("iam_request_headers") for login in stand_in.logins))
        stand_in.stop()


def snapshots(tmp_path):
    directory = tmp_path / "snaps"
    return sorted(str(directory / n) for n in os.listdir(str(directory))
                  if n.endswith(".snap")) if directory.is_dir() else []


def error_lines(log):
    return [line for line in log.splitlines() if " ERROR " in line]


def env_keys(tmp_path, moto, secret=None):
    return base_env(tmp_path, AWS_ACCESS_KEY_ID=moto.access_key_id,
                    AWS_SECRET_ACCESS_KEY=secret or moto.secret_access_key)


def test_environment_credentials_log_in_and_store_a_verified_snapshot(aws_login, moto, tmp_path):
    stand_in, check = aws_login({"snapshot-agent": [USER_ARN]}, server_id=SERVER_ID)
    config = write_config(tmp_path, addr=stand_in.url, vault_auth_role="snapshot-agent",
                          aws_iam_server_id=SERVER_ID)
    code, log = run(["-c", config, "--once"], env_keys(tmp_path, moto))
    assert code == 0, log
    assert "Logged in with aws at auth/aws" in log and "AWS credentials from environment" in log
    assert check.callers == [USER_ARN]
    # The default: signed for the global endpoint; Vault sends it there, with that Host.
    assert ("Host", "sts.amazonaws.com") in check.replays[0]
    stored = snapshots(tmp_path)
    assert len(stored) == 1 and run(["verify", stored[0]], {})[0] == 0
    assert moto.secret_access_key not in log and "Signature=" not in log


def test_imds_credentials_and_a_region_log_in_as_the_arns_friendly_name(aws_login, moto, tmp_path):
    key, secret, session, _ = moto.web_identity
    stand_in, check = aws_login({"snapshot-role": [ROLE_ARN]})
    with ImdsServer(access_key_id=key, secret_access_key=secret, token=session) as imds:
        config = write_config(tmp_path, addr=stand_in.url, aws_sts_region="eu-west-2",
                              aws_imds_endpoint=imds.url)
        code, log = run(["-c", config, "--once"], base_env(tmp_path, AWS_EC2_METADATA_DISABLED="false"))
        assert imds.requests[0].method == "PUT"
    assert code == 0, log
    assert "EC2 instance metadata" in log
    assert "role" not in stand_in.logins[0]          # Vault takes the ARN's friendly name
    assert check.callers[0].startswith("arn:aws:sts::%s:assumed-role/snapshot-role/" % ACCOUNT)
    assert ("Host", "sts.eu-west-2.amazonaws.com") in check.replays[0]
    assert len(snapshots(tmp_path)) == 1
    assert secret not in log and session not in log


def test_web_identity_credentials_log_in(aws_login, moto, tmp_path):
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2ln")
    stand_in, check = aws_login({"snapshot-role": [ROLE_ARN]})
    with WebIdentitySts(moto) as sts:
        config = write_config(tmp_path, addr=stand_in.url, vault_auth_role="snapshot-role",
                              aws_sts_endpoint=sts.url)
        code, log = run(["-c", config, "--once"], base_env(
            tmp_path, AWS_ROLE_ARN=moto.role_arn, AWS_WEB_IDENTITY_TOKEN_FILE=str(token)))
    assert code == 0, log
    assert "web identity" in log
    assert [c["WebIdentityToken"] for c in sts.calls] == [token.read_text()]
    assert check.callers[0].startswith("arn:aws:sts::%s:assumed-role/snapshot-role/" % ACCOUNT)
    assert len(snapshots(tmp_path)) == 1 and token.read_text() not in log


def test_the_token_is_renewed_then_a_new_login_follows(aws_login, moto, tmp_path):
    stand_in, check = aws_login({"snapshot-agent": [USER_ARN]})
    env = env_keys(tmp_path, moto)
    cfg = vsa.load_config(write_config(tmp_path, addr=stand_in.url, vault_auth_role="snapshot-agent"),
                          env=env)
    text = token_lifecycle(cfg, FakeClock(), env)
    assert text.count("Logged in with aws") == 2 and text.count("Renewed token") == 1, text
    assert check.callers == [USER_ARN, USER_ARN]
    assert text.count("AWS credentials from environment") == 1     # one chain per client


def test_sts_refusing_the_signature_is_one_line_naming_stss_reason(aws_login, moto, tmp_path):
    stand_in, _ = aws_login({"snapshot-agent": [USER_ARN]})
    config = write_config(tmp_path, addr=stand_in.url, vault_auth_role="snapshot-agent")
    wrong = moto.wrong_secret_access_key
    code, log = run(["-c", config, "--once"], env_keys(tmp_path, moto, secret=wrong))
    assert code == 1 and snapshots(tmp_path) == []
    errors = error_lines(log)
    assert len(errors) == 1, log
    assert "aws login at auth/aws failed" in errors[0]
    assert "received error code 403 from STS" in errors[0] and "SignatureDoesNotMatch" in errors[0]
    assert wrong not in log and "Signature=" not in log


@pytest.mark.parametrize("agent_id,expect", [
    (None, 'missing header "X-Vault-AWS-IAM-Server-ID"'),
    ("someone-else.test", 'expected "%s" but got "someone-else.test"' % SERVER_ID),
])
def test_a_missing_or_wrong_server_id_is_refused_in_one_line(aws_login, moto, tmp_path, agent_id,
                                                             expect):
    stand_in, check = aws_login({"snapshot-agent": [USER_ARN]}, server_id=SERVER_ID)
    config = write_config(tmp_path, addr=stand_in.url, vault_auth_role="snapshot-agent",
                          aws_iam_server_id=agent_id)
    code, log = run(["-c", config, "--once"], env_keys(tmp_path, moto))
    errors = error_lines(log)
    assert code == 1 and len(errors) == 1, log
    assert "aws login at auth/aws failed" in errors[0] and expect in errors[0], errors[0]
    assert check.callers == []          # refused before anything went to STS


def test_a_role_bound_to_another_arn_is_refused_in_one_line(aws_login, moto, tmp_path):
    stand_in, check = aws_login({"snapshot-agent": [ROLE_ARN]})
    config = write_config(tmp_path, addr=stand_in.url, vault_auth_role="snapshot-agent")
    code, log = run(["-c", config, "--once"], env_keys(tmp_path, moto))
    errors = error_lines(log)
    assert code == 1 and len(errors) == 1, log
    assert 'IAM Principal "%s" does not belong to the role "snapshot-agent"' % USER_ARN in errors[0]
    assert check.callers == [USER_ARN]

