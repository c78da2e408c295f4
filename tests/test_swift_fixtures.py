"""The Swift and Keystone fixtures are real servers, usable over plain HTTP
(stdlib only), and the wire facts the Swift storage is coded against hold:
tempauth and Keystone logins, object PUT/GET/HEAD/DELETE with ETags,
conditional PUT, SLO upload, listing and deletion, listing shapes, 401/403
on bad, foreign or expired tokens, the Keystone catalog and application
credentials.  (All e2e: the servers run from .venv-openstack.)"""

import hashlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from support import swift_server as sws
from support.harness import pid_alive

IGNORED = ("date", "x-trans-id", "x-openstack-request-id", "x-timestamp", "last-modified")


def joined(pairs):
    """Headers by lower-case name; a repeated one joined by ", "."""
    out = {}
    for name, value in pairs:
        name = name.lower()
        out[name] = out[name] + ", " + value if name in out else value
    return out


def http(method, url, token=None, body=None, headers=None):
    """(status, headers (``joined``), body) by urllib alone."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    if token is not None:
        req.add_header("X-Auth-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, joined(resp.getheaders()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, joined(exc.headers.items()), exc.read()


def login(swift, user=None, key=None):
    status, headers, _ = http("GET", swift.auth_url, headers={
        "X-Auth-User": user or swift.user, "X-Auth-Key": key or swift.key})
    assert status == 200, status
    return headers["x-auth-token"], headers["x-storage-url"]


def md5(data):
    return hashlib.md5(data).hexdigest()


def listing(url, token, query=""):
    status, headers, body = http("GET", url + "?format=json" + query, token)
    assert status == 200 and headers["content-type"].startswith("application/json")
    return json.loads(body)


# ----------------------------------------------------------------- tempauth


def test_tempauth_login_gives_token_and_storage_url(swift):
    status, headers, _ = http("GET", swift.auth_url, headers={
        "X-Auth-User": swift.user, "X-Auth-Key": swift.key})
    assert status == 200
    assert headers["x-storage-url"] == swift.storage_url == swift.proxy_url + "/v1/AUTH_test"
    assert headers["x-auth-token"].startswith("AUTH_ftk") or headers["x-auth-token"].startswith("AUTH_zftk")
    assert headers["x-storage-token"] == headers["x-auth-token"]
    # whole seconds left, truncated: token_life - 1 just after login
    assert 3590 <= int(headers["x-auth-token-expires"]) <= 3599
    status, _, _ = http("GET", swift.storage_url, headers["x-auth-token"])
    assert status in (200, 204)
    status, headers, body = http("GET", swift.auth_url, headers={
        "X-Auth-User": swift.user, "X-Auth-Key": "wrong"})
    assert status == 401 and headers["www-authenticate"] == 'Swift realm="test"'
    assert b"<h1>Unauthorized</h1>" in body


def test_object_round_trip_with_etag_and_metadata(swift, swift_container):
    token, url = login(swift)
    obj = "%s/%s/snap/one.snap" % (url, swift_container)
    data = b"raft snapshot bytes" * 100
    status, headers, _ = http("PUT", obj, token, data, {
        "ETag": md5(data), "Content-Type": "application/octet-stream",
        "X-Object-Meta-Snapshot-Sha256": hashlib.sha256(data).hexdigest()})
    assert status == 201 and headers["etag"] == md5(data)          # unquoted
    status, headers, _ = http("HEAD", obj, token)
    assert status == 200 and headers["etag"] == md5(data)
    assert int(headers["content-length"]) == len(data)
    assert headers["x-object-meta-snapshot-sha256"] == hashlib.sha256(data).hexdigest()
    assert "x-static-large-object" not in headers
    status, headers, body = http("GET", obj, token)
    assert (status, body, headers["etag"]) == (200, data, md5(data))
    status, _, body = http("PUT", obj + ".bad", token, b"x", {"ETag": md5(b"y")})
    assert status == 422 and b"Unprocessable Entity" in body
    assert http("HEAD", obj + ".bad", token)[0] == 404
    assert http("DELETE", obj, token)[0] == 204
    status, headers, body = http("GET", obj, token)
    assert status == 404 and body.startswith(b"<html><h1>Not Found</h1>")
    assert http("DELETE", obj, token)[0] == 404
    assert http("HEAD", obj, token)[0::2] == (404, b"")


def test_if_none_match_star_refuses_to_overwrite(swift, swift_container):
    token, url = login(swift)
    obj = "%s/%s/once" % (url, swift_container)
    assert http("PUT", obj, token, b"first", {"If-None-Match": "*"})[0] == 201
    status, headers, body = http("PUT", obj, token, b"second", {"If-None-Match": "*"})
    assert status == 412
    assert body == (b"<html><h1>Precondition Failed</h1><p>A precondition for this request "
                    b"was not met.</p></html>")
    assert http("GET", obj, token)[2] == b"first"


def test_foreign_and_unprivileged_tokens_get_403_and_bad_ones_401(swift, swift_container):
    token, url = login(swift)
    obj = "%s/%s/x" % (url, swift_container)
    assert http("PUT", obj, token, b"x")[0] == 201
    reader, _ = login(swift, swift.reader)
    other, other_url = login(swift, swift.other_user)
    assert other_url == swift.other_storage_url
    for who in (reader, other):
        status, _, body = http("GET", obj, who)
        assert status == 403
        assert body == b"<html><h1>Forbidden</h1><p>Access was denied to this resource.</p></html>"
        assert http("PUT", obj, who, b"y")[0] == 403
    for bad in (None, "AUTH_ftkgAAAAAforged", token[:-4] + "AAAA"):
        status, headers, body = http("GET", obj, bad)
        assert status == 401 and headers["www-authenticate"] == 'Swift realm="AUTH_test"'
    assert http("GET", obj, token)[2] == b"x"


# ---------------------------------------------------- static large objects


def put_slo(url, token, container, segments_container):
    """Two segments (one in ``segments_container``, one under a prefix of
    ``container``) and the manifest ``big``; returns (data, segment etags)."""
    parts = [(b"A" * 1000, "/%s/big/000001" % segments_container),
             (b"B" * 7, "/%s/big.segments/000002" % container)]
    manifest = []
    for data, path in parts:
        status, headers, _ = http("PUT", url + path, token, data)
        assert status == 201
        manifest.append({"path": path, "etag": headers["etag"], "size_bytes": len(data)})
    status, headers, _ = http("PUT", "%s/%s/big?multipart-manifest=put" % (url, container), token,
                              json.dumps(manifest).encode(), {"X-Object-Meta-Kind": "slo"})
    etags = [m["etag"] for m in manifest]
    assert status == 201
    assert headers["etag"] == '"%s"' % md5("".join(etags).encode())     # quoted
    return b"".join(data for data, _ in parts), etags


def test_slo_upload_reads_back_whole_and_lists(swift, swift_container):
    token, url = login(swift)
    segs = swift.new_container("seg")
    data, etags = put_slo(url, token, swift_container, segs)
    slo_etag = '"%s"' % md5("".join(etags).encode())
    status, headers, body = http("GET", "%s/%s/big" % (url, swift_container), token)
    assert (status, body) == (200, data)
    assert headers["etag"] == slo_etag and headers["x-static-large-object"] == "True"
    assert headers["x-object-meta-kind"] == "slo" and headers["content-length"] == str(len(data))
    manifest_etag = headers["x-manifest-etag"]
    status, head, _ = http("HEAD", "%s/%s/big" % (url, swift_container), token)
    assert head["etag"] == slo_etag and head["content-length"] == str(len(data))
    status, headers, body = http("GET", "%s/%s/big?multipart-manifest=get" % (url, swift_container),
                                 token)
    assert headers["etag"] == manifest_etag == md5(body)
    assert [(e["name"], e["bytes"], e["hash"]) for e in json.loads(body)] == [
        ("/%s/big/000001" % segs, 1000, etags[0]),
        ("/%s/big.segments/000002" % swift_container, 7, etags[1])]
    status, headers, body = http("GET", "%s/%s/big" % (url, swift_container), token,
                                 headers={"Range": "bytes=998-1001"})
    assert (status, body, headers["content-range"]) == (206, b"AABB", "bytes 998-1001/1007")
    entries = listing(url + "/" + swift_container, token)
    assert [e["name"] for e in entries] == ["big", "big.segments/000002"]
    big = entries[0]
    assert set(big) == {"name", "bytes", "hash", "content_type", "last_modified", "slo_etag"}
    assert (big["bytes"], big["hash"], big["slo_etag"]) == (len(data), manifest_etag, slo_etag)
    assert "slo_etag" not in entries[1]


def test_listing_prefix_delimiter_marker_limit(swift, swift_container):
    token, url = login(swift)
    curl = url + "/" + swift_container
    for name in ("a/1", "a/2", "b/1", "c"):      # (urllib's PUT default is form-urlencoded)
        assert http("PUT", curl + "/" + name, token, name.encode(),
                    {"Content-Type": "application/octet-stream"})[0] == 201
    entries = listing(curl, token)
    assert [e["name"] for e in entries] == ["a/1", "a/2", "b/1", "c"]
    assert entries[0] == {"name": "a/1", "bytes": 3, "hash": md5(b"a/1"),
                          "content_type": "application/octet-stream",
                          "last_modified": entries[0]["last_modified"]}
    time.strptime(entries[0]["last_modified"], "%Y-%m-%dT%H:%M:%S.%f")    # UTC, no zone
    assert listing(curl, token, "&delimiter=/") == [{"subdir": "a/"}, {"subdir": "b/"}, entries[3]]
    assert [e["name"] for e in listing(curl, token, "&prefix=a/")] == ["a/1", "a/2"]
    assert [e["name"] for e in listing(curl, token, "&marker=a/2&limit=1")] == ["b/1"]
    assert [e["name"] for e in listing(curl, token, "&marker=c")] == []
    status, headers, body = http("GET", curl, token)
    assert headers["content-type"].startswith("text/plain") and body == b"a/1\na/2\nb/1\nc\n"
    assert headers["x-container-object-count"] == "4"
    status, _, body = http("GET", url + "/no-such-container?format=json", token)
    assert status == 404 and b"Not Found" in body
    assert http("DELETE", curl, token)[0] == 409             # not empty


def test_multipart_manifest_delete_removes_segments(swift, swift_container):
    token, url = login(swift)
    segs = swift.new_container("seg")
    put_slo(url, token, swift_container, segs)
    status, headers, body = http("DELETE", "%s/%s/big?multipart-manifest=delete"
                                 % (url, swift_container), token, headers={"Accept": "application/json"})
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"Number Deleted": 3, "Number Not Found": 0, "Response Body": "",
                                "Response Status": "200 OK", "Errors": []}
    assert listing(url + "/" + swift_container, token) == []
    assert listing(url + "/" + segs, token) == []


def test_multipart_manifest_delete_keeps_a_plain_object(swift, swift_container):
    """The trap: on a plain object ``?multipart-manifest=delete`` answers 200
    but deletes nothing (the body says 400 "Not an SLO manifest")."""
    token, url = login(swift)
    obj = "%s/%s/plain" % (url, swift_container)
    assert http("PUT", obj, token, b"keep me")[0] == 201
    status, headers, body = http("DELETE", obj + "?multipart-manifest=delete", token)
    assert status == 200 and headers["content-type"] == "text/plain"
    assert body == (b"Number Deleted: 0\nNumber Not Found: 0\nResponse Body: \n"
                    b"Response Status: 400 Bad Request\nErrors:\n/%s/plain, Not an SLO manifest\n"
                    % swift_container.encode())
    assert http("GET", obj, token)[2] == b"keep me"
    status, _, body = http("DELETE", obj + ".gone?multipart-manifest=delete", token,
                           headers={"Accept": "application/json"})
    assert status == 200 and json.loads(body)["Number Not Found"] == 1
    status, _, body = http("PUT", obj + ".slo?multipart-manifest=put", token, json.dumps(
        [{"path": "/%s/plain" % swift_container, "etag": md5(b"wrong"), "size_bytes": 7}]).encode())
    assert status == 400 and body.decode() == "Errors:\n/%s/plain, Etag Mismatch\n" % swift_container


@pytest.mark.slow
def test_tempauth_token_expires_and_servers_stop_by_pid(tmp_path):
    swift = sws.start_swift(str(tmp_path), token_life=2)
    try:
        took = swift.startup_seconds
        token, url = login(swift)
        born = time.monotonic()
        container = swift.new_container(token=token)
        assert http("GET", url + "/" + container, token)[0] == 204
        time.sleep(max(0, born + 3.2 - time.monotonic()))
        status, headers, _ = http("GET", url + "/" + container, token)
        assert status == 401 and headers["www-authenticate"] == 'Swift realm="AUTH_test"'
        assert http("GET", url + "/" + container, login(swift)[0])[0] == 204
        pids = swift.pids
    finally:
        swift.stop()
    assert sorted(pids) == ["account", "container", "object", "proxy"]
    assert not [pid for pid in pids.values() if pid_alive(pid)]
    assert took < 30
    with pytest.raises(OSError):
        http("GET", swift.proxy_url + "/healthcheck")


# ----------------------------------------------------------------- Keystone


def keystone_login(keystone, identity, scope=None):
    body = {"auth": {"identity": identity}}
    if scope is not None:
        body["auth"]["scope"] = scope
    return http("POST", keystone.auth_url + "/auth/tokens", body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"})


def password(user, secret):
    return {"methods": ["password"], "password": {"user": dict(user, password=secret)}}


def test_keystone_password_login_and_catalog(swift_keystone):
    ks = swift_keystone.keystone
    by_name = {"name": ks.domain}
    by_id = {"id": ks.domain_id}
    logins = [({"name": ks.user, "domain": by_name}, {"name": ks.project, "domain": by_name}),
              ({"name": ks.user, "domain": by_id}, {"name": ks.project, "domain": by_id}),
              ({"id": ks.user_id}, {"id": ks.project_id})]
    for user, project in logins:
        status, headers, body = keystone_login(ks, password(user, ks.password),
                                               {"project": project})
        assert status == 201 and headers["x-subject-token"].startswith("gAAAAA")
        token = json.loads(body)["token"]
        assert token["project"] == {"id": ks.project_id, "name": ks.project,
                                    "domain": {"id": ks.domain_id, "name": ks.domain}}
        assert token["user"]["id"] == ks.user_id
        assert {r["name"] for r in token["roles"]} == {"member", "reader"}
        time.strptime(token["expires_at"], "%Y-%m-%dT%H:%M:%S.000000Z")
    stores = [s for s in token["catalog"] if s["type"] == "object-store"]
    assert len(stores) == 1 and stores[0]["name"] == "swift"
    endpoints = sorted((e["interface"], e["region_id"], e["region"], e["url"])
                       for e in stores[0]["endpoints"])
    assert endpoints == [(i, ks.region, ks.region, swift_keystone.storage_url)
                         for i in ("admin", "internal", "public")]
    assert set(stores[0]["endpoints"][0]) == {"id", "interface", "region", "region_id", "url"}
    status, headers, body = keystone_login(ks, password({"id": ks.user_id}, "wrong"),
                                           {"project": {"id": ks.project_id}})
    assert status == 401 and headers["www-authenticate"] == 'Keystone uri="%s"' % ks.auth_url
    assert json.loads(body) == {"error": {"code": 401, "title": "Unauthorized", "message":
                                          "The request you have made requires authentication."}}


def test_keystone_application_credential_login(swift_keystone):
    ks = swift_keystone.keystone
    secret = ks.app_cred_secret
    creds = [{"id": ks.app_cred_id, "secret": secret},
             {"name": ks.app_cred_name, "secret": secret,
              "user": {"name": ks.user, "domain": {"name": ks.domain}}},
             {"name": ks.app_cred_name, "secret": secret, "user": {"id": ks.user_id}}]
    for cred in creds:
        status, headers, body = keystone_login(ks, {"methods": ["application_credential"],
                                                    "application_credential": cred})
        assert status == 201, body
        token = json.loads(body)["token"]
        assert token["project"]["id"] == ks.project_id and token["methods"] == [
            "application_credential"]
        assert token["application_credential"] == {"id": ks.app_cred_id,
                                                   "name": ks.app_cred_name, "restricted": True}
        status, _, _ = http("GET", swift_keystone.storage_url, headers["x-subject-token"])
        assert status in (200, 204)
    status, _, body = keystone_login(ks, {"methods": ["application_credential"],
                                          "application_credential": dict(creds[0], secret="no")})
    assert status == 401 and json.loads(body)["error"]["code"] == 401
    status, _, body = keystone_login(ks, {"methods": ["application_credential"],
                                          "application_credential": {"name": ks.app_cred_name,
                                                                     "secret": secret}})
    assert status == 400 and json.loads(body)["error"]["title"] == "Bad Request"


def test_keystone_token_works_on_the_keystone_proxy(swift_keystone, swift):
    ks = swift_keystone.keystone
    status, headers, _ = keystone_login(ks, password({"id": ks.user_id}, ks.password),
                                        {"project": {"id": ks.project_id}})
    token = headers["x-subject-token"]
    container = swift_keystone.new_container(token)
    obj = "%s/%s/one" % (swift_keystone.storage_url, container)
    status, headers, _ = http("PUT", obj, token, b"via keystone")
    assert status == 201 and headers["etag"] == md5(b"via keystone")
    assert http("GET", obj, token)[2] == b"via keystone"
    for url in (obj, swift_keystone.storage_url):      # two WWW-Authenticate headers
        status, headers, _ = http("GET", url)
        assert status == 401
        assert headers["www-authenticate"] == 'Swift realm="AUTH_%s", Keystone uri="%s"' % (
            ks.project_id, ks.auth_url)
    assert http("GET", obj, "gAAAAABforged")[0] == 401
    assert http("GET", swift_keystone.proxy_url + "/v1/AUTH_test", token)[0] == 403
    tempauth_token, _ = login(swift)
    assert http("GET", obj, tempauth_token)[0] == 401       # the other proxy's token
    assert http("GET", swift.storage_url + "/" + container, tempauth_token)[0] == 404


@pytest.mark.slow
def test_keystone_token_expires_on_the_swift_proxy(swift, tmp_path):
    ks = sws.start_keystone(str(tmp_path / "ks"), token_expiration=3)
    pids = [ks.server.pid]
    try:
        proxy = sws.start_keystone_swift(swift, ks)
        pids.append(proxy.server.pid)
        try:
            status, headers, body = keystone_login(ks, password({"id": ks.user_id}, ks.password),
                                                   {"project": {"id": ks.project_id}})
            born = time.monotonic()
            token = json.loads(body)["token"]
            issued = time.strptime(token["issued_at"], "%Y-%m-%dT%H:%M:%S.000000Z")
            expires = time.strptime(token["expires_at"], "%Y-%m-%dT%H:%M:%S.000000Z")
            assert time.mktime(expires) - time.mktime(issued) == 3
            assert http("GET", proxy.storage_url, headers["x-subject-token"])[0] in (200, 204)
            time.sleep(max(0, born + 4.2 - time.monotonic()))
            assert http("GET", proxy.storage_url, headers["x-subject-token"])[0] == 401
            status, _, body = http("GET", ks.auth_url + "/auth/tokens", ks.admin_token(),
                                   headers={"X-Subject-Token": headers["x-subject-token"]})
            assert status == 404 and json.loads(body)["error"]["message"] == "Failed to validate token"
        finally:
            proxy.stop()
    finally:
        ks.stop()
    assert not [pid for pid in pids if pid_alive(pid)]


def test_swift_cli_talks_to_both_proxies(swift, swift_keystone, tmp_path):
    """python-swiftclient's CLI (for benchmarks): an SLO upload by tempauth,
    its segments in ``<container>_segments``; a listing by application
    credential through the keystone proxy."""
    ks = swift_keystone.keystone
    data = os.urandom(2500)
    (tmp_path / "f").write_bytes(data)
    env = dict((k, v) for k, v in os.environ.items() if not k.startswith(("OS_", "ST_")))

    def cli(*args):
        done = subprocess.run([swift.cli] + list(args), cwd=str(tmp_path), env=env, timeout=120,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert done.returncode == 0, done.stdout
        return done.stdout.decode()

    container = swift.new_container("cli")
    cli("-A", swift.auth_url, "-U", swift.user, "-K", swift.key, "upload", "--use-slo",
        "--segment-size", "1000", "--object-name", "obj", container, "f")
    token, url = login(swift)
    assert http("GET", "%s/%s/obj" % (url, container), token)[2] == data
    assert len(listing("%s/%s_segments" % (url, container), token)) == 3
    kcontainer = swift_keystone.new_container(ks.user_token()[0])
    cli("--os-auth-url", ks.auth_url, "--auth-version", "3", "--os-username", ks.user,
        "--os-password", ks.password, "--os-user-domain-name", ks.domain,
        "--os-project-name", ks.project, "--os-project-domain-name", ks.domain,
        "--os-region-name", ks.region, "upload", "--object-name", "k", kcontainer, "f")
    out = cli("--os-auth-url", ks.auth_url, "--auth-version", "3",
              "--os-auth-type", "v3applicationcredential",
              "--os-application-credential-id", ks.app_cred_id,
              "--os-application-credential-secret", ks.app_cred_secret,
              "--os-region-name", ks.region, "list", kcontainer)
    assert out.split() == ["k"]
