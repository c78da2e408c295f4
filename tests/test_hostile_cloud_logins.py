"""Section "Vault login methods", methods ``aws``, ``gcp`` and ``azure``,
attacked: hostile metadata, IAM, STS and Vault answers on loopback, and
users with a wrong config. Each test holds a defect found in review (fixed
with it: credentials quoted back by STS, IAM or Vault masked; a refused
token fetched again; the login's token endpoints behind the configured
proxy; a regional STS signed for its region; capped key files; plain
metadata names) or a defence that held; each leak test checks its own log."""

import base64
import datetime
import json
import os
import signal
import time
import tracemalloc
import urllib.parse

import pytest

import vault_snapshot_agent as vsa
from support.azure_vm import AzureVm
from support.bad_configs import EC_PKCS8, FAKE_PKCS1
from support.fake_endpoints import Endpoint, FakeVault
from support.harness import (FakeClock, clear_cloud_env, error_lines, reaped, run_main,
                     start_agent, stop, wait_for)
from support.slow_servers import RecordingProxy, TrickleServer

ROLE = "snap"
ACCOUNT = "vault-snap@proj-1.iam.gserviceaccount.com"
ROLE_ARN = "arn:aws:iam::123456789012:role/snap"
MB = 1024 * 1024


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    clear_cloud_env(monkeypatch, tmp_path, ("AWS_", "AZURE_", "GOOGLE_", "GCE_", "VAULT_", "BAO_"))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


def write_config(tmp_path, **keys):
    config = {"addr": "http://127.0.0.1:9", "local_storage": {"path": str(tmp_path / "snaps")}}
    config.update(keys)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(dict((k, v) for k, v in config.items() if v is not None)))
    os.chmod(str(path), 0o600)
    return str(path)


def aws_env(tmp_path, **extra):
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(tmp_path)}
    env.update(extra)
    return env


def aws_login(tmp_path, env, clock=None, **keys):
    """(Login, decoded url, decoded headers) of one aws login built now."""
    cfg = vsa.load_config(write_config(tmp_path, vault_auth_method="aws", **keys), env=env)
    client = vsa.VaultClient(cfg, clock=clock, env=env)
    login = vsa._aws_login(cfg, client.runtime, client._login_cache)
    return login, base64.b64decode(login.payload["iam_request_url"]).decode(), json.loads(
        base64.b64decode(login.payload["iam_request_headers"].reveal()).decode())


def keys_env(tmp_path, **extra):
    return aws_env(tmp_path, AWS_ACCESS_KEY_ID="AKIAHOSTILE0000001", AWS_SECRET_ACCESS_KEY="hostile-sk",
                   **extra)


def set_env(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def leader_and(login_answer):
    """A Vault: the active node, ``login_answer(body)`` -> (status, payload) for any login."""
    def respond(request):
        if request.path == "/v1/sys/leader":
            return 200, {}, {"ha_enabled": True, "is_self": True}
        if request.path.endswith("/login"):
            status, payload = login_answer(json.loads(request.body.decode("utf-8")))
            return status, {}, payload
        return 404, {}, {"errors": ["no such path"]}
    return Endpoint(respond)


# ================================================================ aws


def test_aws_region_naming_another_host_is_refused_at_load(tmp_path):
    for region in ("us-east-1.evil.example", "us-east-1/x", "evil.example#"):
        code, log = run_main("-c", write_config(tmp_path, vault_auth_method="aws", aws_sts_region=region),
                             "--check-config")
        assert code == 2 and "aws_sts_region" in error_lines(log)[0], log


def test_aws_endpoint_with_an_empty_query_is_sent_as_signed(tmp_path):
    try:
        _, url, _ = aws_login(tmp_path, keys_env(tmp_path), aws_sts_endpoint="https://sts.example.test?")
    except vsa.ConfigError:
        return          # refused at load: fine too
    parts = urllib.parse.urlsplit(url)
    assert (parts.path, parts.query) == ("/", ""), url       # signed: path "/", no query


def test_aws_regional_endpoint_is_signed_for_its_own_region(tmp_path):
    try:
        _, url, headers = aws_login(tmp_path, keys_env(tmp_path),
                                    aws_sts_endpoint="https://sts.eu-west-1.amazonaws.com")
    except vsa.ConfigError:
        return          # refused at load (name the region): fine too
    assert "/eu-west-1/sts/aws4_request" in headers["Authorization"][0]


def test_aws_endpoint_port_is_in_the_signed_host_and_the_url(tmp_path):
    _, url, headers = aws_login(tmp_path, keys_env(tmp_path), aws_sts_endpoint="https://sts.example.test:8443")
    assert url == "https://sts.example.test:8443/"
    assert "host" in headers["Authorization"][0].split("SignedHeaders=")[1]
    # the signature is over host:port: signing the bare host gives another one
    creds = vsa.AwsCredentials("AKIAHOSTILE0000001", vsa.Secret("hostile-sk"), None, None, "t")
    when = datetime.datetime.strptime(headers["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=vsa.UTC)
    bare = vsa.aws_login_request(creds, "https://sts.example.test/", "us-east-1", None, when)
    ported = vsa.aws_login_request(creds, "https://sts.example.test:8443/", "us-east-1", None, when)
    assert bare["iam_request_headers"] != ported["iam_request_headers"]
    ported_headers = json.loads(base64.b64decode(ported["iam_request_headers"]))
    assert ported_headers["Authorization"] == headers["Authorization"]


def test_aws_x_amz_date_is_the_clock_at_signing_even_after_a_step(tmp_path):
    clock = FakeClock(datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=vsa.UTC))
    clock.step_wall(-7200)
    _, _, headers = aws_login(tmp_path, keys_env(tmp_path), clock=clock)
    assert headers["X-Amz-Date"] == ["20260301T100000Z"]


class ContainerCreds(Endpoint):
    """Container credentials: the n-th answer expires ``lifetimes[n]`` seconds after ``clock``."""

    def __init__(self, clock, lifetimes):
        Endpoint.__init__(self)
        self.clock, self.lifetimes, self.expiry = clock, list(lifetimes), {}

    def respond(self, request):
        n = len(self.expiry)
        lifetime = self.lifetimes[min(n, len(self.lifetimes) - 1)]
        expires = self.clock.now() + datetime.timedelta(seconds=lifetime)
        key = "ASIACONTAINER%07d" % n
        self.expiry[key] = expires
        return 200, {}, {"AccessKeyId": key, "SecretAccessKey": "hostile-secret-%d" % n,
                         "Token": "hostile-token-%d" % n,
                         "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}


def test_aws_login_is_not_signed_with_credentials_about_to_expire(tmp_path):
    clock = FakeClock(datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=vsa.UTC))
    with ContainerCreds(clock, [11, 3600]) as creds:
        env = aws_env(tmp_path, AWS_CONTAINER_CREDENTIALS_FULL_URI=creds.url + "/creds")
        cfg = vsa.load_config(write_config(tmp_path, vault_auth_method="aws"), env=env)
        client = vsa.VaultClient(cfg, clock=clock, env=env)
        left = []
        for advance in (0, 9.5):
            clock.advance(advance)
            login = vsa._aws_login(cfg, client.runtime, client._login_cache)
            headers = json.loads(base64.b64decode(login.payload["iam_request_headers"].reveal()))
            key = headers["Authorization"][0].split("Credential=")[1].split("/")[0]
            left.append((creds.expiry[key] - clock.now()).total_seconds())
    assert min(left) >= 5, "signed with credentials %.1f s from expiry" % min(left)


def test_aws_session_token_with_a_control_character_is_refused_before_signing(tmp_path):
    env = keys_env(tmp_path, AWS_SESSION_TOKEN="hostile-token\nX-Injected: 1")
    with pytest.raises(vsa.AgentError) as caught:
        aws_login(tmp_path, env)
    assert "\n" not in str(caught.value) and "hostile-token" not in str(caught.value)


def test_aws_session_token_and_signature_quoted_by_vault_are_masked(monkeypatch, tmp_path):
    token = "IQoJb3JpZ2luSessionTokenHostileQuoted01"

    def quote(body):
        headers = json.loads(base64.b64decode(body["iam_request_headers"]).decode())
        return 400, {"errors": ["error making upstream request: received error code 403 from STS: "
                                "canonical x-amz-security-token:%s sig %s" % (
                                    headers["X-Amz-Security-Token"][0],
                                    headers["Authorization"][0].rsplit("=", 1)[1])]}
    with leader_and(quote) as vault:
        set_env(monkeypatch, keys_env(tmp_path, AWS_SESSION_TOKEN=token))
        code, log = run_main("-c", write_config(tmp_path, addr=vault.url, vault_auth_method="aws"), "--once")
    assert code == 1 and "aws login at auth/aws failed" in log, log
    assert token not in log
    signature = error_lines(log)[0].rsplit("sig ", 1)[-1]
    assert len(signature) != 64, "the SigV4 signature is in the log"


def sts_quoting_the_token(request):
    form = dict(urllib.parse.parse_qsl(request.body.decode("utf-8")))
    return 400, {"Content-Type": "text/xml"}, (
        "<ErrorResponse><Error><Code>InvalidIdentityToken</Code><Message>Token %s is not valid"
        "</Message></Error></ErrorResponse>" % form.get("WebIdentityToken"))


def test_aws_web_identity_token_quoted_by_sts_is_masked(monkeypatch, tmp_path):
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJob3N0aWxlIn0.aG9zdGlsZS1zaWduYXR1cmUtd2ViaWQ"
    (tmp_path / "token").write_text(jwt)
    with Endpoint(sts_quoting_the_token) as sts, FakeVault() as vault:
        set_env(monkeypatch, aws_env(tmp_path, AWS_ROLE_ARN=ROLE_ARN,
                                  AWS_WEB_IDENTITY_TOKEN_FILE=str(tmp_path / "token")))
        code, log = run_main("-c", write_config(tmp_path, addr=vault.url, vault_auth_method="aws",
                                                aws_sts_endpoint=sts.url), "--once")
    assert code == 1 and "InvalidIdentityToken" in log, log
    assert jwt not in log and "aG9zdGlsZS1zaWduYXR1cmUtd2ViaWQ" not in log


def imds_refusing_the_role(request):
    if request.method == "PUT":
        return 200, {}, "imds-session-token-0001"
    return 401, {}, ""


def test_aws_imds_that_takes_the_session_token_then_answers_401_is_one_line(tmp_path):
    with Endpoint(imds_refusing_the_role) as imds:
        env = aws_env(tmp_path, AWS_EC2_METADATA_DISABLED="false")
        cfg = vsa.load_config(write_config(tmp_path, vault_auth_method="aws", aws_imds_endpoint=imds.url),
                              env=env)
        with pytest.raises(vsa.VaultError) as caught:
            vsa.VaultClient(cfg, env=env).login()
    text = str(caught.value)
    assert "\n" not in text and "HTTP 401" in text and "imds-session-token" not in text, text
    assert [r.method for r in imds.requests] == ["PUT", "GET"]      # no retry with a new session token


def web_identity_sts(clock):
    def respond(request):
        expires = (clock.now() + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return 200, {"Content-Type": "text/xml"}, (
            "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>"
            "<AccessKeyId>ASIAWEBID0000001</AccessKeyId><SecretAccessKey>hostile-secret</SecretAccessKey>"
            "<SessionToken>hostile-token</SessionToken><Expiration>%s</Expiration></Credentials>"
            "</AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>" % expires)
    return respond


def test_aws_web_identity_token_file_vanishing_is_one_line_and_the_next_login_recovers(tmp_path):
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ3In0.c2ln")
    clock = FakeClock()
    with Endpoint(web_identity_sts(clock)) as sts:
        env = aws_env(tmp_path, AWS_ROLE_ARN=ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE=str(token))
        cfg = vsa.load_config(write_config(tmp_path, vault_auth_method="aws", aws_sts_endpoint=sts.url),
                              env=env)
        client = vsa.VaultClient(cfg, clock=clock, env=env)
        vsa._aws_login(cfg, client.runtime, client._login_cache)
        token.unlink()                      # kubelet swapping the projected token
        clock.advance(3300)                 # past the refresh point
        with pytest.raises(vsa.AgentError) as caught:
            vsa._aws_login(cfg, client.runtime, client._login_cache)
        assert "AWS_WEB_IDENTITY_TOKEN_FILE" in str(caught.value) and "\n" not in str(caught.value)
        token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ3In0.bmV3")
        vsa._aws_login(cfg, client.runtime, client._login_cache)
    assert len(sts.requests) == 2


def test_aws_imds_redirect_is_not_followed(tmp_path):
    with Endpoint(lambda r: (200, {}, {"AccessKeyId": "ASIAELSEWHERE", "SecretAccessKey": "x"})) as elsewhere:
        def imds(request):
            if request.method == "PUT":
                return 200, {}, "imds-session-token-0002"
            return 307, {"Location": elsewhere.url + request.path}, ""
        with Endpoint(imds) as server:
            env = aws_env(tmp_path, AWS_EC2_METADATA_DISABLED="false")
            cfg = vsa.load_config(write_config(tmp_path, vault_auth_method="aws",
                                               aws_imds_endpoint=server.url), env=env)
            with pytest.raises(vsa.VaultError) as caught:
                vsa.VaultClient(cfg, env=env).login()
    assert "HTTP 307" in str(caught.value) and elsewhere.requests == []


# ================================================================ gcp


class MetadataAndIam:
    """A GCE metadata server (access tokens ``ya29.hostile-N``) and an IAM
    signJwt endpoint answering with ``iam(request)``."""

    def __init__(self, iam):
        self.issued = []
        self.mds = Endpoint(self._mds)
        self.iam = Endpoint(iam)

    def _mds(self, request):
        token = "ya29.hostileMetadataAccessToken%04d" % len(self.issued)
        self.issued.append(token)
        return 200, {"Metadata-Flavor": "Google"}, {"access_token": token, "expires_in": 3599,
                                                     "token_type": "Bearer"}

    def keys(self):
        return {"vault_auth_method": "gcp", "vault_auth_role": ROLE, "gcp_service_account": ACCOUNT,
                "gcp_metadata_host": self.mds.url.split("//", 1)[1], "gcp_iam_endpoint": self.iam.url}

    def __enter__(self):
        self.mds.start()
        self.iam.start()
        return self

    def __exit__(self, *exc):
        self.mds.stop()
        self.iam.stop()


def iam_quoting_the_bearer(request):
    return 401, {}, {"error": {"code": 401, "status": "UNAUTHENTICATED", "message":
                               "Request had invalid authentication credentials: %s"
                               % request.headers.get("authorization")}}


def test_gcp_signjwt_error_quoting_the_bearer_token_is_masked(tmp_path):
    with MetadataAndIam(iam_quoting_the_bearer) as google, FakeVault() as vault:
        code, log = run_main("-c", write_config(tmp_path, addr=vault.url, **google.keys()), "--once")
    assert code == 1 and "IAM signJwt for %s: HTTP 401" % ACCOUNT in log, log
    assert google.issued and google.issued[0] not in log


def test_gcp_signjwt_redirect_to_another_host_is_not_followed(tmp_path):
    with Endpoint() as elsewhere:
        def iam(request):
            return 302, {"Location": elsewhere.url + "/steal"}, ""
        with MetadataAndIam(iam) as google, FakeVault() as vault:
            code, log = run_main("-c", write_config(tmp_path, addr=vault.url, **google.keys()), "--once")
    assert code == 1 and "HTTP 302" in error_lines(log)[0], log
    assert elsewhere.requests == []         # the Bearer token went nowhere else


def test_gcp_identity_redirect_is_not_followed(tmp_path):
    with Endpoint() as elsewhere:
        mds = Endpoint(lambda r: (302, {"Location": elsewhere.url + "/identity"}, ""))
        with mds, FakeVault() as vault:
            code, log = run_main("-c", write_config(
                tmp_path, addr=vault.url, vault_auth_method="gcp", vault_auth_role=ROLE,
                gcp_metadata_host=mds.url.split("//", 1)[1]), "--once")
    assert code == 1 and "HTTP 302" in error_lines(log)[0], log
    assert elsewhere.requests == [] and not [r for r in vault.requests if "/login" in r.path]


@pytest.mark.parametrize("host", ["http://127.0.0.1:9", "127.0.0.1:9/computeMetadata", "127.0.0.1:9?x="])
def test_gcp_metadata_host_that_is_not_host_port_is_refused_at_load(tmp_path, host):
    code, log = run_main("-c", write_config(tmp_path, vault_auth_method="gcp", vault_auth_role=ROLE,
                                            gcp_metadata_host=host), "--check-config")
    assert code == 2 and "gcp_metadata_host" in error_lines(log)[0], log


@pytest.mark.parametrize("pem", [
    EC_PKCS8, "not a pem at all", FAKE_PKCS1.replace("RSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY"),
    "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nMIIsecret\n"
    "-----END RSA PRIVATE KEY-----\n", 42])
def test_gcp_key_file_with_a_key_that_is_not_a_plain_rsa_pem_is_one_line_at_load(tmp_path, pem):
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({"type": "service_account", "client_email": ACCOUNT,
                                "private_key_id": "k1", "private_key": pem}))
    code, log = run_main("-c", write_config(tmp_path, vault_auth_method="gcp", vault_auth_role=ROLE,
                                            gcp_credentials_file=str(path)), "--check-config")
    errors = error_lines(log)
    assert code == 2 and len(errors) == 1 and "gcp_credentials_file" in errors[0], log
    assert "Traceback" not in log and "MIIsecret" not in log and "BEGIN" not in log


def test_gcp_huge_credentials_file_is_refused_without_parsing_it(tmp_path):
    path = tmp_path / "sa.json"
    with open(str(path), "w") as handle:
        handle.write('{"type": "service_account", "client_email": "%s", "private_key_id": "k", '
                     '"private_key": "x", "pad": "' % ACCOUNT)
        handle.write("A" * (16 * MB))
        handle.write('"}')
    tracemalloc.start()
    try:
        with pytest.raises(vsa.ConfigError) as caught:
            vsa.load_config(write_config(tmp_path, vault_auth_method="gcp", vault_auth_role=ROLE,
                                         gcp_credentials_file=str(path)), env={})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MB, "peak %.0f MiB for a 16 MiB key file (%s)" % (peak / MB, caught.value)


@pytest.mark.parametrize("exp,ok", [("59s", False), ("60s", True), ("1h", True), ("3601s", False),
                                    ("60.9s", True)])
def test_gcp_jwt_exp_edges(tmp_path, exp, ok):
    code, log = run_main("-c", write_config(tmp_path, vault_auth_method="gcp", vault_auth_role=ROLE,
                                            gcp_service_account=ACCOUNT, gcp_jwt_exp=exp), "--check-config")
    assert code == (0 if ok else 2), log


def signjwt_refusing_first(calls):
    def iam(request):
        calls.append(request.headers.get("authorization"))
        if len(calls) == 1:     # that access token was revoked
            return 401, {}, {"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "revoked"}}
        return 200, {}, {"keyId": "k", "signedJwt": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"}
    return iam


def test_gcp_access_token_signjwt_refused_is_fetched_again(tmp_path):
    calls = []
    with MetadataAndIam(signjwt_refusing_first(calls)) as google, FakeVault() as vault:
        cfg = vsa.load_config(write_config(tmp_path, addr=vault.url, **google.keys()), env={})
        clock = FakeClock()
        client = vsa.VaultClient(cfg, clock=clock, env={})
        with pytest.raises(vsa.VaultError):
            client.login()
        clock.advance(60)                   # retry_interval
        client.login()
    assert calls[0] != calls[1], "the refused access token was presented again"


def test_gcp_login_requests_go_through_the_configured_proxy(tmp_path):
    with RecordingProxy("refuse") as proxy, \
            MetadataAndIam(lambda r: (200, {}, {"signedJwt": "eyJh.eyJ4.c2ln"})) as google:
        cfg = vsa.load_config(write_config(tmp_path, proxy=proxy.url, **google.keys()), env={})
        runtime = vsa.Runtime({}, FakeClock(), None)
        try:
            vsa._gcp_login(cfg, runtime, {})     # the login's own requests only, not Vault's
        except vsa.AgentError:
            pass
    assert google.iam.requests == [] and proxy.connections >= 1


# ================================================================ azure


def test_azure_client_id_cannot_add_query_parameters(tmp_path):
    hostile = "0000&resource=https://vault.azure.net&object_id=x"
    with AzureVm() as vm, FakeVault() as vault:
        code, log = run_main("-c", write_config(
            tmp_path, addr=vault.url, vault_auth_method="azure", vault_auth_role=ROLE,
            azure_imds_endpoint=vm.url, azure_client_id=hostile), "--once")
    [query] = [urllib.parse.parse_qs(urllib.parse.urlsplit(r.path).query) for r in vm.requests
               if r.path.startswith("/metadata/identity")]
    assert query == {"api-version": ["2018-02-01"], "resource": ["https://management.azure.com/"],
                     "client_id": [hostile]}
    assert code == 1 and "Identity not found" in log


def test_azure_token_vault_refused_is_not_sent_again(tmp_path):
    sent = []

    def refuse(body):
        sent.append(body["jwt"])
        return 400, {"errors": ['oidc: expected audience "https://management.azure.com/" got '
                                '["https://vault.azure.net"]']}
    with AzureVm(resources=("https://vault.azure.net",)) as vm, leader_and(refuse) as vault:
        cfg = vsa.load_config(write_config(tmp_path, addr=vault.url, vault_auth_method="azure",
                                           vault_auth_role=ROLE, azure_imds_endpoint=vm.url,
                                           azure_resource="https://vault.azure.net"), env={})
        clock = FakeClock()
        client = vsa.VaultClient(cfg, clock=clock, env={})
        for _ in range(2):
            with pytest.raises(vsa.VaultError):
                client.ensure_token()
            clock.advance(600)
    assert len(sent) == 2 and sent[0] != sent[1], "the refused token was sent again"


def test_azure_instance_names_with_control_characters_do_not_reach_the_log(tmp_path):
    with AzureVm(vm_name="vault-1\x1b[31m\r\nFAKE ERROR line") as vm, \
            leader_and(lambda body: (400, {"errors": ["vm %s not found" % body.get("vm_name")]})) as vault:
        code, log = run_main("-c", write_config(tmp_path, addr=vault.url, vault_auth_method="azure",
                                                vault_auth_role=ROLE, azure_imds_endpoint=vm.url), "--once")
    assert code == 1 and len(error_lines(log)) == 1, log
    assert "\x1b" not in log and "\r" not in log and "\nFAKE" not in log


# ========================================================= all three


def method_keys(method, slow):
    host = slow.url.split("//", 1)[1]
    return {"aws": {"aws_imds_endpoint": slow.url},
            "gcp": {"vault_auth_role": ROLE, "gcp_metadata_host": host},
            "gcp-signjwt": {"vault_auth_role": ROLE, "gcp_service_account": ACCOUNT,
                            "gcp_metadata_host": host},
            "azure": {"vault_auth_role": ROLE, "azure_imds_endpoint": slow.url}}[method]


@pytest.mark.parametrize("method", ["aws", "gcp", "gcp-signjwt", "azure"])
def test_sigterm_during_a_silent_metadata_answer_exits_0_within_2s(tmp_path, method):
    with FakeVault() as vault, TrickleServer("silent", limit=30) as slow:
        config = write_config(tmp_path, addr=vault.url, vault_auth_method=method.split("-")[0],
                              request_timeout="60s", **method_keys(method, slow))
        env = aws_env(tmp_path, AWS_EC2_METADATA_DISABLED="false", PATH=os.environ.get("PATH", ""),
                      CLOUDSDK_CONFIG=str(tmp_path / "no-gcloud"))
        with reaped(start_agent(config, str(tmp_path / "agent.log"), env=env)) as proc:
            wait_for(lambda: slow.connections, 15, "the metadata request")
            began = time.monotonic()
            code = stop(proc, signal.SIGTERM, timeout=10)
            elapsed = time.monotonic() - began
    log = (tmp_path / "agent.log").read_text()
    assert code == 0 and elapsed < 2.0, (code, elapsed, log)
    snaps = tmp_path / "snaps"
    assert "Stopping on SIGTERM" in log and not (snaps.is_dir() and os.listdir(str(snaps)))
    assert [n for n in os.listdir(str(tmp_path)) if n.startswith(".") or n.endswith(".partial")] == []


def test_a_reload_that_changes_the_method_drops_the_old_identity(tmp_path):
    configs = iter([{"vault_auth_method": "azure", "vault_auth_role": ROLE},
                    {"vault_auth_method": "gcp", "vault_auth_role": ROLE}])

    def loader(runtime):
        cfg = vsa.load_config(write_config(tmp_path, **next(configs)), env={})
        return cfg, []
    agent = vsa.Agent(loader, clock=FakeClock(), env={})
    first = agent.vault
    first._login_cache["token"] = "old identity"
    first._token = vsa.Secret("old-token")
    agent.storages = []
    agent.plan = lambda reloaded=False: None
    assert agent.reload()
    assert agent.vault is not first and agent.vault.method.name == "gcp"
    assert agent.vault._login_cache == {} and agent.vault._token is None


def gce_world():
    identity = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwOi8vdmF1bHQvc25hcCJ9.Z2NlLWlkZW50aXR5LXNpZw"
    return Endpoint(lambda r: (200, {"Metadata-Flavor": "Google"}, identity)), identity


@pytest.mark.parametrize("method", ["aws", "gcp", "azure"])
def test_debug_log_of_a_login_vault_refuses_holds_no_credential(monkeypatch, tmp_path, method):
    def refuse(body):
        return 400, {"errors": ["permission denied: %s" % json.dumps(body)]}
    with leader_and(refuse) as vault, AzureVm() as vm:
        mds, identity = gce_world()
        with mds:
            keys = {"aws": {},
                    "gcp": {"vault_auth_role": ROLE, "gcp_metadata_host": mds.url.split("//", 1)[1]},
                    "azure": {"vault_auth_role": ROLE, "azure_imds_endpoint": vm.url}}[method]
            set_env(monkeypatch, keys_env(tmp_path, AWS_SESSION_TOKEN="hostile-token-debug-0001"))
            config = write_config(tmp_path, addr=vault.url, vault_auth_method=method, **keys)
            code, log = run_main("-c", config, "--once", "--log-level", "debug")
    assert code == 1 and "login at auth/%s failed" % method in log, log
    for secret in [identity, "hostile-sk", "hostile-token-debug-0001"] + list(vm.issued):
        assert secret not in log
    assert "Signature=" not in log and "eyJ" not in log
