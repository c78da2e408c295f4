"""Self-tests for the GCS test infrastructure: the two emulators
(gcs_emulators.py), the Google token endpoints (cred_servers.py) and the RSA
key helpers (rsa_keys.py).

They pin the emulator behaviour documented in gcs_emulators.QUIRKS, so a new
emulator release that changes it shows up here first.  The emulators are the
session's (conftest's ``gcs`` and ``gcs_paging``), with this module's own
bucket ``fixtures``; only the test of ``stop()`` starts one of its own.  Like
every ``*_fixtures.py`` module these tests are ``e2e`` (conftest), out of the
bare unit-test runs; ``cryptography`` missing -> the RSA tests skip."""

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from support import cred_servers
from support import gcs_emulators
from support import rsa_keys
from support.gcs_emulators import GcsEmulator, md5_base64

BUCKET = "fixtures"        # not the session's "snapshots": the backend tests list that one
SCOPE = rsa_keys.DEFAULT_SCOPE


# ------------------------------------------------------------- emulators


def _with_bucket(emu):
    emu.create_bucket(BUCKET)            # already there (409) is fine
    return emu


@pytest.fixture(scope="module")
def gcs(request, gcs, gcs_paging):
    """The session's emulator of kind ``request.param`` (default
    gcp-storage-emulator: conftest's ``gcs``; fake-gcs-server is its
    ``gcs_paging``), with the bucket ``fixtures``."""
    kind = getattr(request, "param", "gcp-storage-emulator")
    return _with_bucket({"gcp-storage-emulator": gcs, "fake-gcs-server": gcs_paging}[kind])


# The tests that run against each emulator in turn.
each_emulator = pytest.mark.parametrize("gcs", gcs_emulators.KINDS, indirect=True)


@pytest.fixture(scope="module")
def gse(gcs):
    """gcp-storage-emulator, the one that handles resumable uploads right."""
    return gcs


@pytest.fixture(scope="module")
def fake_gcs(gcs_paging):
    return _with_bucket(gcs_paging)


@each_emulator
def test_emulator_put_list_get(gcs):
    assert gcs.endpoint == "http://127.0.0.1:%d" % gcs.port and gcs.running
    data = b"snapshot bytes \x00\xff" * 100
    obj = gcs.put_object(BUCKET, "fx/a b/one.snap", data)
    assert obj["name"] == "fx/a b/one.snap" and int(obj["size"]) == len(data)
    gcs.put_object(BUCKET, "fx/two.snap", b"2")
    gcs.put_object(BUCKET, "other/three.snap", b"3")
    assert gcs.list_objects(BUCKET, "fx/") == ["fx/a b/one.snap", "fx/two.snap"]
    assert gcs.get_object(BUCKET, "fx/a b/one.snap") == data
    meta = gcs.object_metadata(BUCKET, "fx/a b/one.snap")
    assert meta["md5Hash"] == md5_base64(data)          # base64 of the raw digest
    assert meta["crc32c"] and meta["storageClass"] == "STANDARD"
    assert gcs.object_metadata(BUCKET, "fx/missing") is None
    # no Authorization check at all
    res = gcs.request("GET", "/storage/v1/b/%s/o" % BUCKET,
                      headers={"Authorization": "Bearer not-a-token"})
    assert res.status == 200 and not gcs.quirks["checks_auth"]
    # DELETE
    assert gcs.delete_object(BUCKET, "fx/two.snap") == gcs.quirks["delete_status"]
    assert gcs.delete_object(BUCKET, "fx/two.snap") == 404
    assert gcs.list_objects(BUCKET, "fx/") == ["fx/a b/one.snap"]


@each_emulator
def test_emulator_listing_pages(gcs):
    names = ["page/%03d" % i for i in range(25)]
    assert gcs.put_many(BUCKET, names) == 25
    assert gcs.list_objects(BUCKET, "page/", max_results=10) == names
    res = gcs.request("GET", "/storage/v1/b/%s/o" % BUCKET,
                      query={"prefix": "page/", "maxResults": "10"})
    page = res.json()
    if gcs.quirks["paginates"]:
        assert len(page["items"]) == 10 and page["nextPageToken"]
        assert gcs.last_list_pages == 3
    else:
        assert len(page["items"]) == 25 and "nextPageToken" not in page
        assert gcs.last_list_pages == 1


@each_emulator
def test_emulator_missing_bucket(gcs):
    for method, path, query in (("GET", "/storage/v1/b/no-such-bucket/o", None),
                                ("GET", "/storage/v1/b/no-such-bucket/o/x", None),
                                ("POST", "/upload/storage/v1/b/no-such-bucket/o",
                                 {"uploadType": "resumable", "name": "x"})):
        res = gcs.request(method, path, body=b"" if method == "POST" else None, query=query)
        assert res.status == 404
        if gcs.quirks["missing_json_error"]:
            assert res.json()["error"]["code"] == 404
        else:
            assert res.body == b""


@each_emulator
def test_emulator_session_uri_points_at_emulator(gcs):
    session = gcs.start_resumable(BUCKET, "loc/x")
    assert session.startswith(gcs.endpoint + "/upload/storage/v1/b/%s/o?" % BUCKET)
    assert "upload_id=" in session


def test_emulator_stop_kills_process(tmp_path):
    kind = gcs_emulators.KINDS[0]
    try:
        gcs_emulators.find_emulator(kind)
    except gcs_emulators.GcsEmulatorError as exc:
        pytest.skip(str(exc))
    emu = GcsEmulator(str(tmp_path), kind).start()
    pid = emu.pid
    emu.stop()
    emu.stop()                                    # idempotent
    with pytest.raises(OSError):
        os.kill(pid, 0)
    assert emu.pid is None


# ---------------------------------------------------- resumable uploads


def test_resumable_upload_gcp_storage_emulator(gse):
    assert gse.quirks["resumable_ok"]
    chunk = 256 * 1024
    data = os.urandom(2 * chunk + 1000)
    session = gse.start_resumable(BUCKET, "res/big.snap",
                                  metadata={"contentType": "application/octet-stream",
                                            "metadata": {"sha256": "x"}})
    # before any byte: 308 with the (wrong) Range bytes=0-0
    res = gse.query_status(session)
    assert res.status == 308 and res.header("Range") == gse.quirks["empty_status_range"]
    res = gse.put_chunk(session, data[:chunk], 0)
    assert res.status == 308 and res.header("Range") == "bytes=0-%d" % (chunk - 1)
    res = gse.put_chunk(session, data[:chunk], 0)            # re-sent: rejected
    assert res.status == 400
    for total in (None, len(data)):                          # status queries change nothing
        res = gse.query_status(session, total)
        assert res.status == 308 and res.header("Range") == "bytes=0-%d" % (chunk - 1)
    res = gse.put_chunk(session, data[chunk:2 * chunk], chunk)
    assert res.status == 308 and res.header("Range") == "bytes=0-%d" % (2 * chunk - 1)
    res = gse.put_chunk(session, data[2 * chunk:], 2 * chunk, len(data))
    assert res.status == 200
    obj = res.json()
    assert obj["name"] == "res/big.snap" and int(obj["size"]) == len(data)
    assert obj["md5Hash"] == md5_base64(data) and obj["metadata"] == {"sha256": "x"}
    assert gse.get_object(BUCKET, "res/big.snap") == data
    # whole-object helper; finishing with an empty `*/total` works too
    assert gse.resumable_upload(BUCKET, "res/small", b"abc", chunk_size=2).status == 200
    session = gse.start_resumable(BUCKET, "res/empty-finish")
    assert gse.put_chunk(session, b"hello", 0).status == 308
    assert gse.query_status(session, 5).status == 200
    assert gse.get_object(BUCKET, "res/empty-finish") == b"hello"


def test_fake_gcs_server_resumable_corruption(fake_gcs):
    assert not fake_gcs.quirks["resumable_ok"]
    a, b, c = b"A" * 10, b"B" * 10, b"C" * 5
    # plain sequential chunks work
    assert fake_gcs.resumable_upload(BUCKET, "fk/ok", a + b + c, chunk_size=10).status == 200
    assert fake_gcs.get_object(BUCKET, "fk/ok") == a + b + c
    # a status query commits the partial object and ends the session
    session = fake_gcs.start_resumable(BUCKET, "fk/status")
    assert fake_gcs.put_chunk(session, a, 0).status == 308
    res = fake_gcs.query_status(session, 25)
    assert res.status == 200 and fake_gcs.quirks["status_query_commits"]
    assert fake_gcs.get_object(BUCKET, "fk/status") == a                 # truncated
    assert fake_gcs.put_chunk(session, b, 10).status == 404
    # a re-sent chunk is appended again
    session = fake_gcs.start_resumable(BUCKET, "fk/resent")
    fake_gcs.put_chunk(session, a, 0)
    fake_gcs.put_chunk(session, a, 0)
    fake_gcs.put_chunk(session, b, 10)
    assert fake_gcs.put_chunk(session, c, 20, 25).status == 200
    assert fake_gcs.get_object(BUCKET, "fk/resent") == a + a + b + c     # 35 bytes
    assert fake_gcs.quirks["resent_chunk"] == "duplicated"


# ------------------------------------------------------------ RSA keys


@pytest.fixture(scope="module")
def crypto():
    return pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def key(crypto):
    return rsa_keys.make_rsa_key(2048, "pkcs8")


@pytest.fixture(scope="module")
def other_key(crypto):
    return rsa_keys.make_rsa_key(2048, "pkcs1")


def test_rsa_key_formats(key, other_key):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    assert key.private_pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert other_key.private_pem.startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert key.public_pem.startswith("-----BEGIN PUBLIC KEY-----")
    private_pem, public_pem, sign = key                          # plain 3-tuple too
    sig = sign(b"data")
    assert len(sig) == 256 and sig == sign(b"data")              # PKCS#1 v1.5 is deterministic
    load_pem_public_key(public_pem.encode()).verify(sig, b"data", padding.PKCS1v15(),
                                                    hashes.SHA256())
    n, e = rsa_keys.public_numbers(private_pem)
    assert e == 65537 and n.bit_length() == 2048
    assert rsa_keys.public_numbers(public_pem) == (n, e)
    sa = rsa_keys.service_account_json(private_pem, "http://127.0.0.1:1/token",
                                       client_email="a@p.iam.gserviceaccount.com")
    assert sa["type"] == "service_account" and sa["token_uri"] == "http://127.0.0.1:1/token"
    for field in ("project_id", "private_key_id", "private_key", "client_email", "client_id"):
        assert sa[field]
    assert "universe_domain" not in rsa_keys.service_account_json(private_pem, "x",
                                                                  universe_domain=None)


# ------------------------------------------------------ Google token endpoint


def _post_form(url, fields, content_type="application/x-www-form-urlencoded"):
    req = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode(),
                                 headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read().decode())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode())


def _claims(server, **over):
    now = int(time.time())
    claims = {"iss": "snapshot-agent@test-project.iam.gserviceaccount.com", "scope": SCOPE,
              "aud": server.token_url, "iat": now, "exp": now + 3600}
    claims.update(over)
    return dict((k, v) for k, v in claims.items() if v is not None)


def _grant(server, assertion):
    return _post_form(server.token_url, {"grant_type": cred_servers.JWT_BEARER_GRANT,
                                         "assertion": assertion})


def test_google_token_server_verifies_jwt(key, other_key):
    with cred_servers.GoogleTokenServer(key.public_pem) as oauth:
        jwt = rsa_keys.make_jwt(key.sign, _claims(oauth),
                                {"alg": "RS256", "typ": "JWT", "kid": "abc"})
        status, body = _grant(oauth, jwt)
        assert status == 200, body
        assert body["token_type"] == "Bearer" and body["expires_in"] == 3599
        assert body["access_token"].startswith("ya29.")
        assert oauth.is_valid_token(body["access_token"])
        assert oauth.claims[-1]["scope"] == SCOPE and oauth.grants[-1]["header"]["kid"] == "abc"
        # signed by another key
        status, body = _grant(oauth, rsa_keys.make_jwt(other_key.sign, _claims(oauth)))
        assert (status, body["error"]) == (400, "invalid_grant")
        assert body["error_description"] == "Invalid JWT Signature."
        # tampered claims under a good signature
        head, _, sig = jwt.split(".")
        forged = "%s.%s.%s" % (head, rsa_keys.b64url(json.dumps(_claims(oauth, iss="x@y"))), sig)
        assert _grant(oauth, forged)[1]["error_description"] == "Invalid JWT Signature."
        # claim checks
        now = int(time.time())
        bad = {
            "aud": _claims(oauth, aud="https://oauth2.googleapis.com/token"),
            "life": _claims(oauth, iat=now, exp=now + 3601),
            "expired": _claims(oauth, iat=now - 7200, exp=now - 3600),
            "future": _claims(oauth, iat=now + 3000, exp=now + 4000),
            "float": _claims(oauth, iat=now + 0.5),
            "no-iss": _claims(oauth, iss=None),
        }
        for what, claims in sorted(bad.items()):
            status, body = _grant(oauth, rsa_keys.make_jwt(key.sign, claims))
            assert (status, body["error"]) == (400, "invalid_grant"), what
        status, body = _grant(oauth, rsa_keys.make_jwt(key.sign, _claims(oauth, scope=None)))
        assert (status, body["error"]) == (400, "invalid_scope")
        for header in ({"alg": "none", "typ": "JWT"}, {"alg": "RS256"},
                       {"alg": "RS256", "typ": "JWT", "x5u": "http://x"}):
            status, body = _grant(oauth, rsa_keys.make_jwt(key.sign, _claims(oauth), header))
            assert (status, body["error"]) == (400, "invalid_grant"), header
        padded = jwt.split(".")
        padded[1] += "=" * (-len(padded[1]) % 4 or 4)
        assert _grant(oauth, ".".join(padded))[0] == 400
        # form checks
        assert _post_form(oauth.token_url, {"grant_type": "password"})[1]["error"] == \
            "unsupported_grant_type"
        assert _post_form(oauth.token_url, {"grant_type": cred_servers.JWT_BEARER_GRANT,
                                            "assertion": jwt},
                          content_type="application/json")[0] == 400
        assert [g["ok"] for g in oauth.grants].count(True) == 1
        assert all(r.path == "/token" for r in oauth.requests)


def test_google_token_server_pkcs1_key_kid_and_fixed_token(key, other_key):
    oauth = cred_servers.GoogleTokenServer(client_email="sa@p.iam.gserviceaccount.com",
                                           access_token="ya29.fixed", expires_in=120)
    oauth.add_key(other_key.private_pem, kid="k1").add_key(key.public_pem, kid="k2")
    with oauth:
        claims = _claims(oauth, iss="sa@p.iam.gserviceaccount.com")
        ok = rsa_keys.make_jwt(other_key.sign, claims, {"alg": "RS256", "typ": "JWT", "kid": "k1"})
        assert _grant(oauth, ok) == (200, {"access_token": "ya29.fixed", "expires_in": 120,
                                           "token_type": "Bearer"})
        wrong_kid = rsa_keys.make_jwt(other_key.sign, claims,
                                      {"alg": "RS256", "typ": "JWT", "kid": "k2"})
        assert _grant(oauth, wrong_kid)[1]["error_description"] == "Invalid JWT Signature."
        other_iss = rsa_keys.make_jwt(key.sign, _claims(oauth))
        assert _grant(oauth, other_iss)[1]["error"] == "invalid_grant"


def test_google_token_server_refresh_token():
    with cred_servers.GoogleTokenServer(authorized_users={"cid": ("secret", "1//rt")}) as oauth:
        form = {"grant_type": "refresh_token", "client_id": "cid", "client_secret": "secret",
                "refresh_token": "1//rt"}
        status, body = _post_form(oauth.token_url, form)
        assert status == 200 and body["token_type"] == "Bearer"
        assert oauth.is_valid_token("Bearer " + body["access_token"])
        assert _post_form(oauth.token_url, dict(form, refresh_token="1//x"))[1]["error"] == \
            "invalid_grant"
        assert _post_form(oauth.token_url, dict(form, client_secret="no")) == \
            (401, {"error": "invalid_client",
                   "error_description": "The OAuth client was not found."})
        oauth.fail_next(503, {"error": "backendError"})
        assert _post_form(oauth.token_url, form)[0] == 503


# --------------------------------------------------------- metadata server


def test_gce_metadata_server():
    with cred_servers.GceMetadataServer(access_token="ya29.meta", expires_in=1800,
                                        project_id="proj-1") as mds:
        assert mds.host == "127.0.0.1:%d" % mds.port
        req = urllib.request.Request(mds.token_url)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 403
        assert info.value.headers["Metadata-Flavor"] == "Google"
        req = urllib.request.Request(mds.token_url + "?scopes=" + SCOPE,
                                     headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.headers["Metadata-Flavor"] == "Google"
            assert json.loads(resp.read().decode()) == {
                "access_token": "ya29.meta", "expires_in": 1800, "token_type": "Bearer"}
        req = urllib.request.Request(mds.url + cred_servers.GceMetadataServer.PROJECT_PATH,
                                     headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.read() == b"proj-1"
        mds.set_token("ya29.rotated", 60)
        req = urllib.request.Request(mds.token_url, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read().decode())["access_token"] == "ya29.rotated"
        assert [r.status for r in mds.token_requests()] == [403, 200, 200]
        assert mds.issued == ["ya29.meta", "ya29.rotated"]
