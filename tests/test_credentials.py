"""Sections "AWS credentials" and "Azure and Google credentials" and the pure parts of section "S3
storage": the AWS credential chain (against loopback servers speaking IMDSv2 and the container
protocol), its refresh before expiry, S3 addressing and part sizing; bearer tokens (Azure,
Google) fetched once by racing workers, and a short-lived one reused.

End to end: no credential (AppRole, Vault token, AWS, Azure key and SAS,
GCS tokens, JWT assertions, private keys) appears in any output of the real
agent, right or wrong, in text or JSON, in process or as a daemon."""

import base64
import datetime
import json
import os
import re
import sys

import pytest

import vault_snapshot_agent as vsa
from support.agent_sim import fake_clock, write_config
from support.cred_servers import ContainerCredentialsServer, ImdsServer
from support.fake_endpoints import Endpoint
from support.faults_support import BUCKET, CONTAINER
from support.faults_support import write_config as write_agent_config
from support.harness import FakeClock, FakeSignals, read, run_main, start_agent, stop, wait_for

UTC = vsa.UTC


def chain(env, clock=None, **kwargs):
    return vsa.AwsCredentialChain(None, env, "us-east-1", None, vsa.Http(None, 5.0),
                                  clock or FakeClock(), **kwargs)


NO_FILES = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/c", "AWS_CONFIG_FILE": "/nonexistent/f"}


def test_environment_wins_over_metadata():
    env = dict(NO_FILES, AWS_ACCESS_KEY_ID="AKIAENV", AWS_SECRET_ACCESS_KEY="envsecret")
    creds = chain(env).get()
    assert creds.access_key == "AKIAENV" and creds.source == "environment"
    assert "envsecret" not in repr(creds)


def test_imdsv2_session_token_is_used_and_credentials_refresh_before_expiry():
    now = datetime.datetime.now(UTC).replace(microsecond=0)
    with ImdsServer(access_key_id="ASIA1", expiration=now + datetime.timedelta(hours=1)) as imds:
        clock = FakeClock(now)
        aws = chain(dict(NO_FILES), clock, imds_endpoint=imds.url)
        assert aws.get().access_key == "ASIA1"
        calls = len(imds.requests)
        clock.advance(datetime.timedelta(minutes=50))
        assert aws.get().access_key == "ASIA1"          # cached: 10 minutes left
        assert len(imds.requests) == calls
        imds.set_credentials(access_key_id="ASIA2", expiration=now + datetime.timedelta(hours=2))
        clock.advance(datetime.timedelta(minutes=6))    # 56 minutes: inside the 5-minute margin
        assert aws.get().access_key == "ASIA2"
        assert imds.requests[0].method == "PUT"
        assert all(r.header("X-aws-ec2-metadata-token") for r in imds.requests if r.method == "GET")


def test_imds_without_role_is_a_clear_error():
    with ImdsServer(role=None) as imds:
        with pytest.raises(vsa.StorageError, match="instance profile"):
            chain(dict(NO_FILES), imds_endpoint=imds.url).get()


def test_no_metadata_service_means_no_credentials():
    with pytest.raises(vsa.StorageError, match="no AWS credentials found"):
        chain(dict(NO_FILES), imds_endpoint="http://127.0.0.1:9").get()


def test_container_relative_uri_with_authorization_token():
    with ContainerCredentialsServer(authorization="tok", access_key_id="ASIAC") as server:
        env = dict(NO_FILES, AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=server.relative_uri,
                   AWS_CONTAINER_AUTHORIZATION_TOKEN="tok")
        assert chain(env, container_endpoint=server.url).get().access_key == "ASIAC"
        env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = "wrong"
        with pytest.raises(vsa.StorageError, match="HTTP 401"):
            chain(env, container_endpoint=server.url).get()


def test_configured_profile_missing_is_an_error(tmp_path):
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = A\naws_secret_access_key = B\n")
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_CONFIG_FILE": "/nonexistent"}
    assert chain(env).get().access_key == "A"
    named = vsa.AwsCredentialChain(None, env, "us-east-1", "prod", vsa.Http(None, 5.0),
                                   FakeClock())
    with pytest.raises(vsa.StorageError, match="profile 'prod'"):
        named.get()


@pytest.mark.parametrize("size,part", [
    (100, 16 * 2 ** 20), (16 * 2 ** 20 * 10000, 16 * 2 ** 20),
    (16 * 2 ** 20 * 10000 + 1, 17 * 2 ** 20), (5 * 2 ** 40, 525 * 2 ** 20),
])
def test_part_size_grows_so_any_file_fits_in_10000_parts(size, part):
    assert vsa.s3_part_size(size, 16 * 2 ** 20) == part
    assert -(-size // part) <= 10000


def build(aws, env=None):
    cfg = vsa.config_from_dict({"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s",
                                "aws_storage": aws}, env=env or {})
    return vsa.build_storages(cfg, vsa.Runtime.create(env=env or {}))[0]


def test_addressing_virtual_hosted_on_aws_path_style_when_needed():
    aws = build({"s3_bucket": "bkt", "s3_region": "eu-west-1"})
    assert aws.endpoint == "https://s3.eu-west-1.amazonaws.com" and not aws.path_style
    assert aws._host == "bkt.s3.eu-west-1.amazonaws.com" and aws._path("k y") == "/k%20y"
    forced = build({"s3_bucket": "bkt", "s3_endpoint": "minio.local:9000", "s3_force_path_style": True})
    assert forced._host == "minio.local:9000" and forced._path("k") == "/bkt/k"
    assert build({"s3_bucket": "bkt", "s3_endpoint": "http://127.0.0.1:9000"}).path_style
    assert build({"s3_bucket": "my.bucket"}).path_style        # dots break TLS wildcards


def test_region_and_endpoint_from_environment():
    env = {"AWS_REGION": "ap-south-1", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1234",
           "AWS_CONFIG_FILE": "/nonexistent"}
    aws = build({"s3_bucket": "bkt"}, env)
    assert aws.region == "ap-south-1" and aws.endpoint == "http://127.0.0.1:1234"


@pytest.mark.parametrize("block,key", [
    ({}, "s3_bucket"), ({"s3_bucket": "bkt", "access_key_id": "A"}, "secret_access_key"),
    ({"s3_bucket": "bkt", "s3_server_side_encryption": "DES"}, "s3_server_side_encryption"),
    ({"s3_bucket": "bkt", "s3_server_side_encryption": "AES256", "s3_kms_key_id": "k"}, "s3_kms_key_id"),
    ({"s3_bucket": "bkt", "part_size_mb": 1}, "part_size_mb"),
    ({"s3_bucket": "bkt", "concurrency": 0}, "concurrency"),
    ({"s3_bucket": "bkt", "s3_endpoint": "ftp://x"}, "s3_endpoint"),
    ({"s3_bucket": "bad bucket"}, "s3_bucket"),
    ({"s3_bucket": "bkt", "s3_force_path_style": "yes"}, "s3_force_path_style"),
])
def test_aws_config_errors_name_the_key(block, key):
    with pytest.raises(vsa.ConfigError, match="aws_storage.%s" % key):
        build(block)


def test_go_agent_boolean_sse_means_aes256():
    assert build({"s3_bucket": "bkt", "s3_server_side_encryption": True}).sse == "AES256"
    kms = build({"s3_bucket": "bkt", "s3_kms_key_id": "alias/backup"})
    assert kms.sse == "aws:kms" and kms.kms_key_id == "alias/backup"


def _race(get, threads=8):
    """Call ``get`` from ``threads`` threads released at the same moment."""
    import threading
    barrier = threading.Barrier(threads)
    results, errors = [], []

    def worker():
        barrier.wait()
        try:
            results.append(get())
        except Exception as exc:      # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(30)
    assert not errors
    return results


def test_aws_credentials_are_fetched_once_when_upload_workers_race():
    # Parts upload in worker threads that all ask the chain for credentials:
    # an expiry must lead to one fetch, not one per worker.
    with ContainerCredentialsServer(access_key_id="ASIARACE") as server:
        env = dict(NO_FILES, AWS_CONTAINER_CREDENTIALS_FULL_URI=server.full_uri)
        shared = chain(env, container_endpoint=server.url)
        results = _race(shared.get)
        assert [r.access_key for r in results] == ["ASIARACE"] * 8
        assert len(server.requests) == 1


def test_bearer_token_is_fetched_once_when_upload_workers_race():
    import threading
    import time
    fetches = []
    lock = threading.Lock()

    def fetch():
        with lock:
            fetches.append(1)
        time.sleep(0.2)          # a slow token endpoint: the others arrive meanwhile
        return "access-token", 3600

    token = vsa.BearerToken(fetch, vsa.Clock(), "test token endpoint")
    results = _race(token.get)
    assert len(fetches) == 1
    assert set(r.reveal() for r in results) == {"access-token"}


def test_a_token_valid_for_four_minutes_is_not_fetched_for_every_request(tmp_path):
    # A metadata server (GCE, GKE workload identity, Azure IMDS) hands out a
    # cached token near its end: expires_in 240. BearerToken subtracted a
    # 5-minute margin, so the token was expired on arrival and every storage
    # request (each listing page, each resumable chunk) fetched another
    # (the class fixed for AWS with CREDENTIAL_MIN_REUSE).
    tokens = Endpoint(lambda request: (200, {}, {"access_token": "ya29.short-lived",
                                                 "expires_in": 240, "token_type": "Bearer"}))
    listing = Endpoint(lambda request: (200, {}, {"kind": "storage#objects"}))
    with tokens, listing:
        config = write_config(tmp_path, {
            "addr": "http://127.0.0.1:9", "token": "t",
            "google_storage": {"bucket": "snapshots", "endpoint": listing.url, "anonymous": False,
                               "metadata_host": "127.0.0.1:%d" % tokens.port}})
        clock = fake_clock()
        runtime = vsa.Runtime({"CLOUDSDK_CONFIG": str(tmp_path / "no-gcloud")}, clock,
                              FakeSignals(clock))
        _, storages = vsa.load_all(config, runtime)
        for _ in range(10):
            storages[0].list()             # ten requests within the same second
        fetched = len(tokens.requests)
    # Before the fix: 10 token requests for 10 storage requests.
    assert fetched <= 2, fetched


# =============================================================================
# end to end: no secret in any output
# =============================================================================


TOKEN_RE = re.compile(r"\b(?:hvs|hvb|hvr|s|b|sb|r)\.[A-Za-z0-9_-]{20,}")


@pytest.mark.usefixtures("isolated_env")
def test_no_credential_appears_in_any_output(bao_cluster, approle, moto, azurite, gcs, tmp_path,
                                             capsys):
    from support.azurite import service_sas
    from support.cred_servers import GoogleTokenServer
    from support.rsa_keys import make_rsa_key, service_account_json, write_json

    leader = bao_cluster.leader()
    private, public, _ = make_rsa_key(2048, "pkcs8")
    sas = service_sas(azurite.account, azurite.key, CONTAINER, permissions="racwdl")
    expired = service_sas(azurite.account, azurite.key, CONTAINER, start=-7200, expiry=-3600)
    token = bao_cluster.login_approle(approle.role_id, approle.secret_id, approle.mount)
    wrong_aws = moto.wrong_secret_access_key
    wrong_azure = base64.b64encode(os.urandom(64)).decode("ascii")
    wrong_secret_id = "6f1c2d3e-0000-4000-8000-0123456789ab"
    (tmp_path / "sid").write_text(approle.secret_id + "\n")
    (tmp_path / "tok").write_text(token)

    with GoogleTokenServer(public) as tokens:
        key_file = tmp_path / "sa.json"
        write_json(str(key_file), service_account_json(private, tokens.token_url))
        s3 = {"access_key_id": moto.access_key_id, "secret_access_key": moto.secret_access_key,
              "s3_endpoint": moto.endpoint, "s3_region": "us-east-1", "s3_bucket": BUCKET,
              "s3_key_prefix": "secrets"}
        azure = {"account_name": azurite.account, "account_key": azurite.key,
                 "container_name": CONTAINER, "endpoint": azurite.endpoint, "prefix": "secrets"}
        google = {"bucket": BUCKET, "endpoint": gcs.endpoint, "credentials_file": str(key_file),
                  "prefix": "secrets"}
        cases = {
            "approle-all-storages": dict(aws_storage=s3, azure_storage=azure, google_storage=google),
            "secret-id-file": dict(secret_id=None, secret_id_file=str(tmp_path / "sid")),
            "token-file": dict(role_id=None, secret_id=None, token_file=str(tmp_path / "tok")),
            "token-inline": dict(role_id=None, secret_id=None, token=token),
            "wrong-secret-id": dict(secret_id=wrong_secret_id),
            "s3-wrong-secret": dict(aws_storage=dict(s3, secret_access_key=wrong_aws)),
            "azure-sas": dict(azure_storage=dict(azure, account_key=None, sas_token="?" + sas)),
            "azure-expired-sas": dict(azure_storage=dict(azure, account_key=None, sas_token=expired)),
            "azure-wrong-key": dict(azure_storage=dict(azure, account_key=wrong_azure)),
            "azure-connection-string": dict(azure_storage={
                "container_name": CONTAINER, "prefix": "secrets",
                "connection_string": azurite.connection_string}),
        }
        outputs = []
        for name, extra in sorted(cases.items()):
            for key in ("aws_storage", "azure_storage", "google_storage"):
                if key in extra:
                    extra[key] = {k: v for k, v in extra[key].items() if v is not None}
            config = write_agent_config(tmp_path / ("%s.json" % name), leader.addr, approle,
                                  tmp_path / "local", **extra)
            for argv in (["--once", "--log-level", "debug"],
                         ["--once", "--log-level", "debug", "--log-format", "json"],
                         ["--check-config", "--log-level", "debug"],
                         ["--log-level", "debug", "list"]):
                code, log = run_main("-c", config, *argv)
                captured = capsys.readouterr()
                outputs.append(("%s %s -> %s" % (name, " ".join(argv), code),
                                log + captured.out + captured.err))
        # and one daemon, as systemd would run it
        config = write_agent_config(tmp_path / "daemon.json", leader.addr, approle, tmp_path / "local",
                              frequency="1s", aws_storage=s3, azure_storage=azure,
                              google_storage=google)
        logfile = tmp_path / "daemon.log"
        proc = start_agent(config, logfile, sys.executable, "--log-level", "debug")
        try:
            wait_for(lambda: read(logfile).count("Cycle stored") >= 2, 60, "two daemon cycles")
        finally:
            stop(proc)
        outputs.append(("daemon", read(logfile)))
        issued = list(tokens.issued)
        assertions = [g.get("assertion") for g in tokens.grants if g.get("assertion")]

    first = dict((label.split(" ")[0], text) for label, text in reversed(outputs))
    assert "Cycle stored" in first["approle-all-storages"], first["approle-all-storages"]
    assert all(" -> 2" not in label for label, _ in outputs), [ln for ln, _ in outputs]
    assert issued, "the GCS service-account flow was not exercised"
    secrets = {"secret_id": approle.secret_id, "wrong secret_id": wrong_secret_id,
               "vault token": token, "aws secret": moto.secret_access_key,
               "wrong aws secret": wrong_aws, "azure key": azurite.key,
               "wrong azure key": wrong_azure, "sas": sas, "expired sas": expired,
               "sas signature": sas.split("sig=")[1].split("&")[0],
               "expired sas signature": expired.split("sig=")[1].split("&")[0]}
    for i, value in enumerate(issued):
        secrets["gcs access token %d" % i] = value
    for i, value in enumerate(assertions):
        secrets["gcs jwt assertion %d" % i] = value
        secrets["gcs jwt signature %d" % i] = value.rsplit(".", 1)[1]
    pem_lines = [line for line in private.splitlines() if line and "-----" not in line]
    for i, line in enumerate(pem_lines):
        secrets["private key line %d" % i] = line
    for label, text in outputs:
        for what, value in secrets.items():
            assert value not in text, "%s appears in the output of %s" % (what, label)
            quoted = json.dumps(value)[1:-1]
            assert quoted not in text, "%s (JSON-escaped) appears in the output of %s" % (what, label)
        match = TOKEN_RE.search(text)
        assert match is None, "token-like %r in the output of %s" % (match.group(0), label)
        assert "sig=" not in text and "PRIVATE KEY" not in text, label
        for pattern in (r"Signature=[0-9a-f]{16}", r"SharedKey [^\s:]+:[A-Za-z0-9+/=]{16}",
                        r"Bearer [A-Za-z0-9._~+/=-]{16}", r"X-Amz-Security-Token"):
            assert not re.search(pattern, text), "%s in the output of %s" % (pattern, label)
