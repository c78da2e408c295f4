"""The Azure test fixtures themselves: the Shared Key / SAS signing in
tests/support/azurite.py (pinned by Microsoft's documented rules, then checked by a
real Azurite, which rejects a wrong signature), Azurite's behaviour the
Azure backend tests rely on, and the IMDS / Entra token servers of
tests/support/cred_servers.py.

The tests that run Azurite are marked ``e2e`` (a real server, like the
OpenBao and moto tests); the rest are plain unit tests.
"""

import base64
import hashlib
import json
import os
import re
import stat
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from support import azurite as az_mod
from support import cred_servers as cs

WRONG_KEY = base64.b64encode(b"not the account key" * 3).decode("ascii")


# ------------------------------------------------- signing, no server


def test_string_to_sign_matches_documented_example():
    # "Authorize with Shared Key": Get Container Metadata on a path-style URL
    # (the account appears twice), no standard headers, x-ms-date/x-ms-version.
    headers = [("x-ms-version", "2009-09-19"), ("x-ms-date", "Sun, 11 Oct 2009 21:49:13 GMT")]
    query = [("restype", "container"), ("comp", "metadata"), ("timeout", "20")]
    text = az_mod.string_to_sign("GET", "myaccount", "/myaccount/mycontainer", query, headers)
    assert text == ("GET\n\n\n\n\n\n\n\n\n\n\n\n"
                    "x-ms-date:Sun, 11 Oct 2009 21:49:13 GMT\nx-ms-version:2009-09-19\n"
                    "/myaccount/myaccount/mycontainer\ncomp:metadata\nrestype:container\ntimeout:20")


def test_string_to_sign_rules():
    headers = [("Content-Length", "0"), ("Content-Type", "application/xml"),
               ("Content-MD5", "abc=="), ("Range", "bytes=0-9"), ("X-MS-Meta-B", "  two   words "),
               ("x-ms-meta-a", "1"), ("User-Agent", "ignored"), ("If-Match", '"etag"')]
    query = [("Comp", "list"), ("prefix", "a%2Fb"), ("include", "snapshots"),
             ("include", "metadata")]
    text = az_mod.string_to_sign("put", "acct", "/c/blob%20name", query, headers)
    lines = text.split("\n")
    # verb, then the 11 standard headers in the documented order; a zero
    # Content-Length is signed as the empty string (version 2015-02-21+)
    assert lines[:12] == ["PUT", "", "", "", "abc==", "application/xml", "", "", '"etag"', "",
                          "", "bytes=0-9"]
    # x-ms-* only, names lower-cased and sorted, whitespace folded
    assert lines[12:14] == ["x-ms-meta-a:1", "x-ms-meta-b:two words"]
    # "/" + account + encoded path; query names lower-cased and sorted,
    # values decoded, several values sorted and comma-joined
    assert lines[14:] == ["/acct/c/blob%20name", "comp:list", "include:metadata,snapshots",
                          "prefix:a/b"]
    assert az_mod.string_to_sign("PUT", "a", "/c", None, [("Content-Length", "12")]) \
        .split("\n")[3] == "12"


def test_shared_key_authorization_format():
    auth = az_mod.shared_key_authorization(az_mod.ACCOUNT, az_mod.ACCOUNT_KEY, "GET", "/x")
    assert re.match(r"^SharedKey devstoreaccount1:[A-Za-z0-9+/]{43}=$", auth)


def test_service_sas_string_to_sign_layout():
    # "Create a service SAS", version 2020-12-06 and later: 16 fields
    text = az_mod.service_sas_string_to_sign(
        "acct", "cont", "dir/blob", permissions="r", start="2024-01-01T00:00:00Z",
        expiry="2024-01-02T00:00:00Z", version="2021-08-06")
    assert text.split("\n") == ["r", "2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z",
                                "/blob/acct/cont/dir/blob", "", "", "", "2021-08-06", "b",
                                "", "", "", "", "", "", ""]
    container = az_mod.service_sas_string_to_sign("acct", "cont", permissions="rl",
                                                  expiry="2024-01-02T00:00:00Z")
    assert container.split("\n")[3] == "/blob/acct/cont"
    assert container.split("\n")[8] == "c"


def test_sas_token_fields():
    token = az_mod.service_sas("acct", az_mod.ACCOUNT_KEY, "cont", permissions="racwdl",
                               expiry="2030-01-01T00:00:00Z")
    q = urllib.parse.parse_qs(token)
    assert q["sv"] == [az_mod.SAS_VERSION] and q["sr"] == ["c"] and q["sp"] == ["racwdl"]
    assert q["se"] == ["2030-01-01T00:00:00Z"]
    expect = az_mod.sign(az_mod.ACCOUNT_KEY, az_mod.service_sas_string_to_sign(
        "acct", "cont", permissions="racwdl", expiry="2030-01-01T00:00:00Z"))
    assert q["sig"] == [expect]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", az_mod.sas_time(60))


def test_find_azurite_order(tmp_path, monkeypatch):
    fake = tmp_path / "node_modules" / ".bin" / "azurite-blob"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("AZURITE_DIR", str(tmp_path))
    assert az_mod.find_azurite() == str(fake)
    with pytest.raises(az_mod.AzuriteError):
        az_mod.find_azurite(str(tmp_path / "nope"))


# ------------------------------------------------------------ Azurite


def _need_azurite():
    try:
        return az_mod.find_azurite()
    except az_mod.AzuriteError as exc:
        pytest.fail("cannot run the Azure tests: %s" % exc)


@pytest.fixture(scope="module")
def azurite(azurite):
    """The session's Azurite (plain HTTP, Shared Key / SAS; conftest), with
    this module's container ``fixtures``."""
    azurite.create_container("fixtures")
    return azurite


@pytest.fixture(scope="module")
def azurite_oauth(azurite_oauth):
    """The session's Azurite over HTTPS accepting Bearer tokens, with the
    container ``fixtures``."""
    azurite_oauth.create_container("fixtures")
    return azurite_oauth


@pytest.mark.e2e
def test_azurite_endpoint_and_round_trip(azurite):
    assert azurite.account == "devstoreaccount1"
    assert azurite.endpoint == "http://127.0.0.1:%d/devstoreaccount1" % azurite.port
    assert "AccountKey=%s;" % az_mod.ACCOUNT_KEY in azurite.connection_string
    assert "BlobEndpoint=%s;" % azurite.endpoint in azurite.connection_string
    assert azurite.create_container("fixtures") is False          # already there
    azurite.put_blob("fixtures", "rt/a b+c.snap", b"hello azure")
    assert azurite.get_blob("fixtures", "rt/a b+c.snap") == b"hello azure"
    listed = azurite.list_blobs("fixtures", prefix="rt/")
    assert [(b["name"], b["size"]) for b in listed] == [("rt/a b+c.snap", 11)]
    props = azurite.blob_properties("fixtures", "rt/a b+c.snap")
    assert props["content-length"] == "11"
    assert props["content-md5"] == base64.b64encode(hashlib.md5(b"hello azure").digest()).decode()
    assert azurite.blob_properties("fixtures", "rt/missing") is None


@pytest.mark.e2e
def test_azurite_checks_shared_key(azurite):
    azurite.put_blob("fixtures", "sk/x", b"x")
    assert azurite.request("GET", "fixtures", "sk/x").status == 200
    wrong = azurite.request("GET", "fixtures", "sk/x", key=WRONG_KEY)
    assert wrong.status == 403 and wrong.error_code == "AuthorizationFailure"
    assert azurite.request("GET", "fixtures", "sk/x", auth=None).status == 403


@pytest.mark.e2e
def test_azurite_canonical_resource_forms(azurite):
    import email.utils
    import http.client
    azurite.put_blob("fixtures", "form/x", b"x")
    # path style: the account must appear twice -- signing it once fails
    path = "/devstoreaccount1/fixtures/form/x"
    hdrs = [("x-ms-date", email.utils.formatdate(usegmt=True)),
            ("x-ms-version", az_mod.API_VERSION)]
    once = az_mod.shared_key_authorization(azurite.account, azurite.key, "GET",
                                           "/fixtures/form/x", None, hdrs)
    conn = http.client.HTTPConnection("127.0.0.1", azurite.port, timeout=10)
    try:
        conn.putrequest("GET", path)
        for name, value in hdrs + [("Authorization", once)]:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 403
    finally:
        conn.close()
    # production form: account in the Host, path without it, signed once
    resp = azurite.request("GET", "fixtures", "form/x", host=azurite.production_host)
    assert resp.status == 200 and resp.body == b"x"


@pytest.mark.e2e
def test_azurite_checks_sas(azurite):
    azurite.put_blob("fixtures", "sas/r", b"readable")
    sas = azurite.make_sas("fixtures")
    assert azurite.request("GET", "fixtures", "sas/r", auth="sas", sas=sas).body == b"readable"
    put = azurite.request("PUT", "fixtures", "sas/w", auth="sas", sas=sas, body=b"w",
                          headers=[("x-ms-blob-type", "BlockBlob")])
    assert put.status == 201
    listing = azurite.request("GET", "fixtures", auth="sas", sas=sas,
                              query=[("restype", "container"), ("comp", "list"),
                                     ("prefix", "sas/")])
    assert listing.status == 200 and b"<Name>sas/w</Name>" in listing.body
    forged = azurite.make_sas("fixtures", key=WRONG_KEY)
    assert azurite.request("GET", "fixtures", "sas/r", auth="sas", sas=forged).status == 403
    expired = azurite.make_sas("fixtures", expiry=-60)
    assert azurite.request("GET", "fixtures", "sas/r", auth="sas", sas=expired).status == 403
    read_only = azurite.make_sas("fixtures", permissions="r")
    denied = azurite.request("PUT", "fixtures", "sas/ro", auth="sas", sas=read_only, body=b"w",
                             headers=[("x-ms-blob-type", "BlockBlob")])
    assert denied.status == 403 and denied.error_code == "AuthorizationPermissionMismatch"
    blob_sas = azurite.make_sas("fixtures", blob="sas/r", permissions="r")
    assert azurite.request("GET", "fixtures", "sas/r", auth="sas", sas=blob_sas).status == 200


@pytest.mark.e2e
def test_azurite_blocks_and_md5(azurite):
    data = b"block data"
    block_id = base64.b64encode(b"block-000000").decode()
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    bad = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    resp = azurite.put_block("fixtures", "blk/x", block_id, data, content_md5=bad)
    assert resp.status == 400 and resp.error_code == "Md5Mismatch"
    assert azurite.put_block("fixtures", "blk/x", block_id, data, content_md5=md5).status == 201
    assert azurite.list_uncommitted_blocks("fixtures", "blk/x") == [(block_id, len(data))]
    assert azurite.blob_properties("fixtures", "blk/x") is None
    azurite.put_block_list("fixtures", "blk/x", [block_id])
    assert azurite.list_uncommitted_blocks("fixtures", "blk/x") == []
    assert azurite.get_blob("fixtures", "blk/x") == data


@pytest.mark.e2e
def test_azurite_list_paging(azurite):
    names = ["page/%03d" % i for i in range(23)]
    azurite.put_many("fixtures", names, data=lambda n: n.encode())
    first = azurite.request("GET", "fixtures", query=[
        ("restype", "container"), ("comp", "list"), ("prefix", "page/"), ("maxresults", "10")])
    assert first.body.count(b"<Blob>") == 10
    assert re.search(b"<NextMarker>[^<]+</NextMarker>", first.body)
    assert [b["name"] for b in azurite.list_blobs("fixtures", "page/", maxresults=7)] == names
    assert azurite.get_blob("fixtures", "page/007") == b"page/007"


@pytest.mark.e2e
def test_azurite_rejects_unknown_api_version(azurite):
    azurite.put_blob("fixtures", "ver/x", b"x")
    resp = azurite.request("GET", "fixtures", "ver/x", headers=[("x-ms-version", "2099-01-01")])
    assert resp.status == 400


@pytest.mark.e2e
def test_azurite_stop_is_idempotent_and_bearer_needs_https(tmp_path):
    _need_azurite()
    server = az_mod.Azurite(str(tmp_path), oauth="basic", debug=True).start()
    try:
        assert server.running
        server.create_container("cont")
        resp = server.request("GET", "cont", "x", auth="bearer", token=cs.make_azure_jwt())
        assert resp.status == 403 and resp.error_code == "AuthenticationFailed"
        assert b"not allowed with HTTP" in resp.body
        assert os.path.getsize(server.debug_path) > 0
    finally:
        pid = server.proc.pid
        server.stop()
        server.stop()
    assert not server.running
    with pytest.raises(OSError):
        os.kill(pid, 0)


@pytest.mark.e2e
def test_azurite_oauth_with_token_servers(azurite_oauth, tmp_path):
    az = azurite_oauth
    assert az.endpoint.startswith("https://127.0.0.1:")
    with cs.AzureImdsServer() as imds, cs.EntraTokenServer() as entra:
        token = _imds_get(imds)[1]["access_token"]
        put = az.request("PUT", "fixtures", "oauth/imds", auth="bearer", token=token, body=b"i",
                         headers=[("x-ms-blob-type", "BlockBlob")])
        assert put.status == 201
        status, doc = _entra_post(entra, client_assertion_type=cs.CLIENT_ASSERTION_TYPE,
                                  client_assertion=entra.federated_token)
        assert status == 200
        got = az.request("GET", "fixtures", "oauth/imds", auth="bearer",
                         token=doc["access_token"])
        assert got.status == 200 and got.body == b"i"
    for bad in (cs.make_azure_jwt(audience="https://vault.azure.net"), cs.make_azure_jwt(lifetime=-30),
                cs.make_azure_jwt(iss="https://issuer.example/"), "not-a-jwt"):
        resp = az.request("GET", "fixtures", "oauth/imds", auth="bearer", token=bad)
        assert resp.status == 403 and resp.error_code == "AuthenticationFailed"
    # Shared Key still works over HTTPS
    assert az.request("GET", "fixtures", "oauth/imds").status == 200


# ------------------------------------------------------ token servers


def _imds_get(imds, metadata="true", **params):
    query = {"api-version": "2018-02-01", "resource": cs.STORAGE_RESOURCE}
    query.update(params)
    req = urllib.request.Request(imds.token_url + "?" + urllib.parse.urlencode(query))
    if metadata is not None:
        req.add_header("Metadata", metadata)
    return _call(req)


def _entra_post(entra, tenant=None, **fields):
    form = {"grant_type": "client_credentials", "client_id": entra.client_id,
            "scope": cs.STORAGE_SCOPE}
    form.update(fields)
    form = dict((k, v) for k, v in form.items() if v is not None)
    url = entra.url + "/%s/oauth2/v2.0/token" % (tenant or entra.tenant)
    req = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    return _call(req)


def _call(req):
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read().decode())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


def test_imds_token_endpoint():
    with cs.AzureImdsServer(expires_in=1200) as imds:
        before = int(time.time())
        status, doc = _imds_get(imds)
        assert status == 200
        assert doc["token_type"] == "Bearer" and doc["resource"] == cs.STORAGE_RESOURCE
        assert doc["expires_in"] == "1200"
        assert before + 1200 <= int(doc["expires_on"]) <= int(time.time()) + 1200
        claims = cs.decode_jwt(doc["access_token"])
        assert claims["aud"] == "https://storage.azure.com"
        assert claims["exp"] == int(doc["expires_on"])
        assert claims["iss"].startswith("https://sts.windows.net/")
        req = imds.requests[-1]
        assert req.method == "GET" and req.header("Metadata") == "true"
        assert "api-version=2018-02-01" in req.path
        assert imds.last_token == doc["access_token"]

        status, doc = _imds_get(imds, metadata=None)
        assert (status, doc["error"]) == (400, "bad_request_102")
        assert _imds_get(imds, metadata="True")[0] == 400

        status, doc = _imds_get(imds, client_id=cs.DEFAULT_MI_CLIENT_ID)
        assert status == 200 and doc["client_id"] == cs.DEFAULT_MI_CLIENT_ID
        status, doc = _imds_get(imds, client_id="unknown")
        assert (status, doc["error"]) == (400, "invalid_request")
        status, doc = _imds_get(imds, resource="https://vault.azure.net")
        assert (status, doc["error"]) == (400, "invalid_resource")

        imds.set_token("fixed-token", expires_in=5)
        status, doc = _imds_get(imds)
        assert doc["access_token"] == "fixed-token" and doc["expires_in"] == "5"
        imds.fail_next(500, body={"error": "unknown", "error_description": "boom"})
        assert _imds_get(imds)[0] == 500
        assert _imds_get(imds)[0] == 200


def test_imds_user_assigned_only():
    with cs.AzureImdsServer(system_assigned=False, client_ids=["a", "b"]) as imds:
        assert _imds_get(imds)[0] == 400
        assert _imds_get(imds, client_id="b")[1]["client_id"] == "b"
    with cs.AzureImdsServer(system_assigned=False, client_ids=["only"]) as imds:
        assert _imds_get(imds)[1]["client_id"] == "only"


def test_entra_token_endpoint_secret_and_assertion():
    with cs.EntraTokenServer(expires_in=600) as entra:
        status, doc = _entra_post(entra, client_secret=entra.client_secret)
        assert status == 200
        assert doc["token_type"] == "Bearer" and doc["expires_in"] == 600
        assert cs.decode_jwt(doc["access_token"])["aud"] == "https://storage.azure.com"
        form = entra.form(entra.requests[-1])
        assert form["grant_type"] == "client_credentials" and form["scope"] == cs.STORAGE_SCOPE
        assert entra.requests[-1].path == "/%s/oauth2/v2.0/token" % entra.tenant

        status, doc = _entra_post(entra, client_secret="wrong")
        assert (status, doc["error"]) == (401, "invalid_client")
        assert doc["error_description"].startswith("AADSTS7000215:")
        assert doc["error_codes"] == [7000215]

        status, doc = _entra_post(entra, client_assertion_type=cs.CLIENT_ASSERTION_TYPE,
                                  client_assertion=entra.federated_token)
        assert status == 200
        status, doc = _entra_post(entra, client_assertion_type=cs.CLIENT_ASSERTION_TYPE,
                                  client_assertion="someone-else")
        assert (status, doc["error"]) == (400, "invalid_request")
        status, doc = _entra_post(entra, client_assertion_type="urn:wrong",
                                  client_assertion=entra.federated_token)
        assert status == 400

        assert _entra_post(entra)[0] == 401                          # no credential
        status, doc = _entra_post(entra, client_secret=entra.client_secret,
                                  scope="https://storage.azure.com/user_impersonation")
        assert (status, doc["error"]) == (400, "invalid_scope")
        status, doc = _entra_post(entra, client_secret=entra.client_secret,
                                  grant_type="password")
        assert (status, doc["error"]) == (400, "unsupported_grant_type")
        assert _entra_post(entra, tenant="other-tenant", client_secret=entra.client_secret)[0] == 400
        assert _entra_post(entra, client_id="who", client_secret=entra.client_secret)[0] == 400

        entra.set_token("fixed", expires_in=30)
        status, doc = _entra_post(entra, client_secret=entra.client_secret)
        assert (doc["access_token"], doc["expires_in"]) == ("fixed", 30)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(entra.token_url, timeout=10)      # GET
        assert err.value.code == 405
