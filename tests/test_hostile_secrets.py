"""Issue 14, part 4: secrets with stray whitespace or control characters,
the status files against a planted symlink, an SAS in the Azure endpoint,
and certificate checks on the OAuth token endpoints.

Vault is tests/fake_endpoints.FakeVault (a loopback stand-in that serves a
valid snapshot archive and accepts one token); the storages are loopback
stand-ins too, except the one S3 store that goes to moto with signature
checking on.  Secrets carry a recognisable text so a leak is easy to see
(the session's secret scan in conftest.py catches the Vault-token-shaped
ones as well)."""

import json
import os
import stat

import pytest

from support.archives import write_archive
from support.fake_endpoints import Endpoint, FakeVault, self_signed_cert
from support.harness import error_lines, free_port, read, run_main, snapshots

TOKEN = "s.HostileNewlineToken0123456789"
SESSION_TOKEN = "FwoGZXIvYXdzEHostileSessionToken0123456789"
SAS_SIG = "HostileSasSignature0123456789abcdef%3D"
SAS = "sv=2021-08-06&ss=b&srt=co&sp=rwdlac&se=2099-01-01T00%3A00%3A00Z&sig=" + SAS_SIG


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith(("VAULT_", "BAO_", "AWS_", "AZURE_", "GOOGLE_")) or \
                name in ("STORAGE_EMULATOR_HOST", "GCE_METADATA_HOST"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))


def write_config(tmp_path, **config):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    return str(path)


def agent(*argv):
    """run_main, but an exception out of main() fails the test without
    printing its text (it may hold the very secret under test)."""
    try:
        return run_main(*argv)
    except Exception as exc:
        raise AssertionError("main(%s) raised %s: a traceback for the user"
                             % (" ".join(argv[2:3]), type(exc).__name__)) from None


def assert_not_in(secret, *texts):
    for text in texts:
        assert secret not in text, "the secret was printed"


# -- VAULT_TOKEN with a trailing newline ---------------------------------------------------

def test_vault_token_env_with_a_trailing_newline_takes_a_snapshot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VAULT_TOKEN", TOKEN + "\n")
    status, prom = tmp_path / "status.json", tmp_path / "agent.prom"
    with FakeVault(token=TOKEN) as vault:
        config = write_config(tmp_path, addr=vault.url,
                              local_storage={"path": str(tmp_path / "snaps")},
                              status_file=str(status), metrics_textfile=str(prom))
        code, log = agent("-c", config, "--once", "--log-level", "debug")
    out = capsys.readouterr()
    assert_not_in(TOKEN, log, out.out, out.err, read(status), read(prom))
    assert code == 0, log
    assert "Invalid header value" not in log
    assert len(snapshots(tmp_path / "snaps")) == 1
    assert vault.tokens_seen and set(vault.tokens_seen) == {TOKEN}


# -- a control character inside a secret ---------------------------------------------------

def test_a_token_with_a_newline_inside_is_a_config_error_without_the_value(tmp_path, capsys):
    config = write_config(tmp_path, addr="http://127.0.0.1:8200", token="TOKHEAD\nTOKTAIL",
                          local_storage={"path": str(tmp_path / "snaps")})
    code, log = agent("-c", config, "--check-config")
    out = log + capsys.readouterr().out
    assert code == 2, out
    errors = error_lines(out)
    assert len(errors) == 1 and "control character" in errors[0] and "token" in errors[0], out
    assert "TOKHEAD" not in out and "TOKTAIL" not in out


# -- restore with VAULT_TOKEN="...\n" --------------------------------------------------------

def test_restore_with_a_newline_terminated_vault_token(tmp_path, monkeypatch, capsys):
    archive = tmp_path / "backup.snap"
    data = write_archive(str(archive))
    monkeypatch.setenv("VAULT_TOKEN", TOKEN + "\n")
    with FakeVault(token=TOKEN, role_id="role", secret_id="secret") as vault:
        config = write_config(tmp_path, addr=vault.url, role_id="role", secret_id="secret",
                              local_storage={"path": str(tmp_path / "snaps")})
        code, log = agent("-c", config, "restore", str(archive), "--yes")
    out = capsys.readouterr()
    assert_not_in(TOKEN, log, out.out, out.err)
    assert "Traceback" not in log + out.out + out.err
    assert code == 0, log
    assert "Restored " in out.out
    assert vault.restores == [data]
    assert set(vault.tokens_seen) == {TOKEN}


# -- status file and metrics textfile: no predictable temp name ------------------------------

def test_a_symlink_at_the_old_temp_name_is_not_followed(tmp_path, capsys):
    status_dir, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    status_dir.mkdir()
    elsewhere.mkdir()
    targets = {}
    for base in ("status.json", "agent.prom"):
        target = elsewhere / ("precious-" + base)
        target.write_text("precious %s\n" % base)
        os.chmod(str(target), 0o600)
        # The name the agent used to write through: .<basename>.<pid>.tmp (pid:
        # this process, as the run is in-process).
        os.symlink(str(target), str(status_dir / (".%s.%d.tmp" % (base, os.getpid()))))
        targets[base] = target
    config = write_config(tmp_path, addr="http://127.0.0.1:%d" % free_port(),
                          role_id="role", secret_id="secret",
                          local_storage={"path": str(tmp_path / "snaps")},
                          status_file=str(status_dir / "status.json"),
                          metrics_textfile=str(status_dir / "agent.prom"))
    code, log = agent("-c", config, "--once")
    capsys.readouterr()
    assert code == 1, log                     # no Vault there: the cycle fails, and is reported
    for base, target in targets.items():
        assert read(target) == "precious %s\n" % base, "%s was written through the symlink" % base
        assert stat.S_IMODE(os.lstat(str(target)).st_mode) == 0o600, base
    status = status_dir / "status.json"
    assert not os.path.islink(str(status)) and os.path.isfile(str(status))
    assert json.loads(read(status))["last_outcome"] == "failed"
    mode = stat.S_IMODE(os.stat(str(status)).st_mode)
    assert mode & 0o137 == 0, "status file mode %o, not 0640 or tighter" % mode
    prom = status_dir / "agent.prom"
    assert not os.path.islink(str(prom))
    assert stat.S_IMODE(os.stat(str(prom)).st_mode) == 0o644
    assert "vault_snapshot_" in read(prom)


# -- cloud secrets from the environment with a trailing newline ------------------------------

def _s3_listing(request):
    return 200, {"Content-Type": "application/xml"}, (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        '<Name>snapshots</Name><Prefix></Prefix><KeyCount>0</KeyCount>'
        '<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>')


def test_aws_session_token_with_a_trailing_newline_works(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAHOSTILEEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "HostileSecretAccessKey0123456789\n")
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN + "\n")
    with Endpoint(_s3_listing) as s3:
        config = write_config(tmp_path, addr="http://127.0.0.1:8200", role_id="r", secret_id="s",
                              aws_storage={"s3_bucket": "snapshots", "s3_endpoint": s3.url,
                                           "s3_region": "us-east-1"})
        code, log = agent("-c", config, "list")
    out = capsys.readouterr()
    assert_not_in(SESSION_TOKEN, log, out.out, out.err)
    assert_not_in("HostileSecretAccessKey", log, out.out, out.err)
    assert code == 0, log
    assert s3.requests
    for request in s3.requests:
        assert request.headers.get("x-amz-security-token") == SESSION_TOKEN
        assert "Credential=ASIAHOSTILEEXAMPLE/" in request.headers.get("authorization", "")


def test_aws_secret_key_with_a_trailing_newline_stores_in_moto(moto, tmp_path, monkeypatch):
    """Signature checking is on in moto: a key with its newline signs wrong."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.secret_access_key + "\n")
    prefix = "hostile-newline-%d" % os.getpid()
    with FakeVault(role_id="role", secret_id="secret") as vault:
        config = write_config(tmp_path, addr=vault.url, role_id="role", secret_id="secret",
                              aws_storage={"s3_bucket": "snapshots", "s3_endpoint": moto.endpoint,
                                           "s3_region": "us-east-1", "s3_key_prefix": prefix})
        code, log = agent("-c", config, "--once")
    assert_not_in(moto.secret_access_key, log)
    assert code == 0, log
    assert len(moto.list_keys("snapshots", prefix + "/")) == 1


def _azure_listing(request):
    return 200, {"Content-Type": "application/xml"}, (
        '<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="x" '
        'ContainerName="snapshots"><Blobs /><NextMarker /></EnumerationResults>')


# With "\n" alone the old agent worked by accident: urllib.parse.urlsplit drops
# "\t\r\n" from URLs (bpo-43882); a space before it went into the request line.
@pytest.mark.parametrize("ending", ["\n", " \n"], ids=["newline", "space-newline"])
def test_azure_sas_token_with_a_trailing_newline_works(tmp_path, monkeypatch, capsys, ending):
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", SAS + ending)
    with Endpoint(_azure_listing) as azure:
        config = write_config(tmp_path, addr="http://127.0.0.1:8200", role_id="r", secret_id="s",
                              azure_storage={"endpoint": azure.url + "/devstoreaccount1",
                                             "container_name": "snapshots"})
        code, log = agent("-c", config, "list")
    out = capsys.readouterr()
    assert_not_in(SAS_SIG, log, out.out, out.err)
    assert code == 0, log
    assert azure.requests
    for request in azure.requests:
        assert request.path.endswith("sig=" + SAS_SIG), request.path
    assert "se=2099" not in log


def test_azure_endpoint_with_a_query_string_is_refused(tmp_path, capsys):
    config = write_config(tmp_path, addr="http://127.0.0.1:8200", role_id="r", secret_id="s",
                          azure_storage={
                              "endpoint": "http://127.0.0.1:10000/devstoreaccount1?sv=2020&sig=SECRETSIG",
                              "container_name": "snapshots",
                              "account_key": "a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5"})
    code, log = agent("-c", config, "--check-config")
    out = log + capsys.readouterr().out
    assert "SECRETSIG" not in out, "the SAS in the endpoint was printed"
    assert code == 2, out
    errors = error_lines(out)
    assert len(errors) == 1, out
    assert ("azure_storage.endpoint: must not carry a query string (put the SAS in sas_token)"
            in errors[0]), errors[0]


# -- certificate checks on the token endpoints ---------------------------------------------

GOOGLE_TOKEN = "ya29.hostile-tls-test-token"
AZURE_TOKEN = "eyJhbGciOiJub25lIn0.eyJhdWQiOiJzdG9yYWdlIn0.hostile"


def _cloud(request):
    """Token endpoints and empty listings for Google and Azure, over HTTPS."""
    path = request.path.split("?", 1)[0]
    if request.method == "POST" and path == "/token":
        return 200, {}, {"access_token": GOOGLE_TOKEN, "expires_in": 3599, "token_type": "Bearer"}
    if request.method == "POST" and path.endswith("/oauth2/v2.0/token"):
        return 200, {}, {"access_token": AZURE_TOKEN, "expires_in": 3599, "token_type": "Bearer"}
    if path.startswith("/storage/v1/b/"):
        return 200, {}, {"kind": "storage#objects"}
    if path.startswith("/devstoreaccount1/"):
        return _azure_listing(request)
    return 404, {}, {"error": "not found"}


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def https_cloud(tls_files):
    with Endpoint(_cloud, tls=tls_files) as server:
        yield server


def _google_config(tmp_path, server, tls_files, **extra):
    with open(tls_files[1]) as handle:
        key = handle.read()
    creds = tmp_path / "sa.json"
    creds.write_text(json.dumps({
        "type": "service_account", "project_id": "p", "private_key_id": "k1", "private_key": key,
        "client_email": "agent@p.iam.gserviceaccount.com", "token_uri": server.url + "/token"}))
    block = {"bucket": "snapshots", "endpoint": server.url, "credentials_file": str(creds),
             "tls_skip_verify": True}
    block.update(extra)
    return write_config(tmp_path, addr="http://127.0.0.1:8200", role_id="r", secret_id="s",
                        google_storage=block)


def _azure_config(tmp_path, server, **extra):
    block = {"endpoint": server.url + "/devstoreaccount1", "container_name": "snapshots",
             "auth_mode": "client_secret", "tenant_id": "tenant", "client_id": "client",
             "client_secret": "HostileClientSecret0123", "authority_host": server.url,
             "tls_skip_verify": True}
    block.update(extra)
    return write_config(tmp_path, addr="http://127.0.0.1:8200", role_id="r", secret_id="s",
                        azure_storage=block)


def _token_requests(server):
    return [r for r in server.requests if r.path.split("?")[0].endswith("/token")]


def assert_refused_before_a_token(config, server, secret, capsys):
    """``list`` fails on the token endpoint's certificate, before any token
    request, and ``secret`` is not in the log."""
    code, log = agent("-c", config, "list")
    capsys.readouterr()
    assert code == 1, log
    errors = error_lines(log)
    assert errors and "certificate" in errors[0].lower(), log
    assert _token_requests(server) == []
    assert secret not in log


def assert_known_key(config, capsys):
    code, log = agent("-c", config, "--check-config")
    capsys.readouterr()
    assert code == 0, log
    assert "unknown config key" not in log, log          # auth_tls_skip_verify is known


def assert_lists_with_the_token(config, server, prefix, token, capsys):
    """The config checks clean, and ``list`` asks for one token and lists
    (paths starting with ``prefix``) with it."""
    assert_known_key(config, capsys)
    code, log = agent("-c", config, "list")
    capsys.readouterr()
    assert code == 0, log
    assert len(_token_requests(server)) == 1
    listings = [r for r in server.requests if r.path.startswith(prefix)]
    assert listings and listings[0].headers.get("authorization") == "Bearer " + token
    assert "unknown config key" not in log


def test_tls_skip_verify_does_not_cover_the_google_token_endpoint(tmp_path, https_cloud,
                                                                 tls_files, capsys):
    config = _google_config(tmp_path, https_cloud, tls_files)
    assert_refused_before_a_token(config, https_cloud, GOOGLE_TOKEN, capsys)


def test_auth_tls_skip_verify_turns_it_off_for_the_google_token_endpoint(tmp_path, https_cloud,
                                                                         tls_files, capsys):
    config = _google_config(tmp_path, https_cloud, tls_files, auth_tls_skip_verify=True)
    assert_lists_with_the_token(config, https_cloud, "/storage/v1/b/", GOOGLE_TOKEN, capsys)


def test_tls_skip_verify_does_not_cover_the_entra_authority(tmp_path, https_cloud, capsys):
    config = _azure_config(tmp_path, https_cloud)
    assert_refused_before_a_token(config, https_cloud, "HostileClientSecret0123", capsys)


def test_auth_tls_skip_verify_turns_it_off_for_the_entra_authority(tmp_path, https_cloud, capsys):
    config = _azure_config(tmp_path, https_cloud, auth_tls_skip_verify=True)
    assert_lists_with_the_token(config, https_cloud, "/devstoreaccount1/", AZURE_TOKEN, capsys)
