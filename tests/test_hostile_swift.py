"""Section "OpenStack Swift" (and its login in "Azure, Google and OpenStack
credentials") attacked: a Swift, tempauth or Keystone on loopback that lies,
loops, answers garbage or refuses. Listings never loop, never crash and
never hand retention a name that is not ours; logins refuse what would
send the token astray and never log a secret; a token Swift keeps refusing
costs one new login per request, not a loop; a failed, cut or stopped
upload leaves no manifest and deletes its own segments only; the cleaner of
killed uploads deletes nothing but old orphan segments.

The store is hostile_swift.FakeSwift (an in-memory Swift whose answers a
test bends with hooks), Keystone a fake_endpoints.Endpoint; the happy path
against a real Swift and Keystone is test_swift*.py's."""

import datetime
import json
import os
import time

import pytest

import vault_snapshot_agent as vsa
from support.archives import write_archive
from support.fake_endpoints import Endpoint
from support.harness import (FakeClock, FakeSignals, captured_log, clear_cloud_env, error_lines,
                             go_snapshot_name, known_secrets, run_main)
from support.hostile_swift import KEY, FakeSwift, Obj

HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)
MB = 1024 * 1024
PASSWORD = "hostile-keystone-password-9f8e7d"
APP_SECRET = "hostile-app-credential-secret-1a2b3c"
known_secrets(KEY, PASSWORD, APP_SECRET)


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    clear_cloud_env(monkeypatch, tmp_path, ("AWS_", "AZURE_", "OS_", "ST_", "VAULT_", "BAO_"))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


# -- helpers -------------------------------------------------------------------


def write_config(tmp_path, block, **top):
    config = {"addr": "http://127.0.0.1:9", "role_id": "r", "secret_id": "s"}
    config.update(block)
    config.update(top)
    path = str(tmp_path / ("c-%s.json" % os.urandom(3).hex()))
    with open(path, "w") as handle:
        json.dump(config, handle)
    os.chmod(path, 0o600)
    return path


def storage(tmp_path, block, clock=None, signals=None, **top):
    """The SwiftStorage of ``block`` (a ``{"swift_storage": {...}}``), with
    ``clock`` and ``signals`` (default: real clock, FakeSignals: retries
    wait for nothing)."""
    runtime = vsa.Runtime.create(env={}, clock=clock, signals=signals or FakeSignals())
    _, storages = vsa.load_all(write_config(tmp_path, block, **top), runtime)
    return storages[0]


def name_at(when):
    return vsa.snapshot_name(when)


def now():
    return datetime.datetime.now(vsa.UTC)


def staged(tmp_path, size=1536 * 1024, name="staged.snap"):
    """A verified snapshot file of about ``size`` bytes (SnapshotInfo)."""
    path = str(tmp_path / name)
    write_archive(path, state=os.urandom(size))
    return vsa.verify_file(path)


def listing_hook(entries_for):
    """A hook answering container GETs with ``entries_for(req)`` (a list
    or bytes), everything else as FakeSwift would."""
    def hook(req):
        if req.method == "GET" and req.obj is None and req.container is not None:
            answer = entries_for(req)
            if answer is not None:
                return 200, {"Content-Type": "application/json"}, answer
        return None
    return hook


def no_secret(text, *more):
    for secret in (KEY, PASSWORD, APP_SECRET) + more:
        assert secret not in text, "secret %s... in:\n%s" % (secret[:6], text)


def tokens_free(text, swift):
    no_secret(text, *swift.tokens)


# -- listings --------------------------------------------------------------------


def test_a_listing_whose_marker_never_advances_is_abandoned(tmp_path):
    page = [{"name": "p/" + name_at(now() - HOUR * i), "bytes": 5} for i in range(1, 6)]
    with FakeSwift([listing_hook(lambda req: page)]) as swift:
        store = storage(tmp_path, swift.storage_block(prefix="p", list_page_size=5))
        with captured_log() as log, pytest.raises(vsa.StorageError) as caught:
            store.list()
        pages = swift.count("GET")
    assert "repeated" in str(caught.value)
    assert pages < 10, "%d pages" % pages
    tokens_free(log.getvalue() + str(caught.value), swift)


def test_a_listing_with_new_names_on_every_full_page_ends_at_the_page_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(vsa, "MAX_LIST_PAGES", 20)
    counter = [0]

    def endless(req):
        counter[0] += 1
        return [{"name": "p/x-%06d-%d" % (counter[0], i), "bytes": 1} for i in range(3)]
    with FakeSwift([listing_hook(endless)]) as swift:
        store = storage(tmp_path, swift.storage_block(prefix="p", list_page_size=3))
        with captured_log(), pytest.raises(vsa.StorageError) as caught:
            store.list()
    assert "more than 20 pages" in str(caught.value)
    assert counter[0] <= 21


@pytest.mark.parametrize("answer, words", [
    (b"[" + b'{"name": "p/x", "bytes": 1},' * 200000 + b"{}]", "larger than"),
    (b"<html>not json</html>", "not JSON"),
    (b'{"name": "p/raft_snapshot-20200101T000000.000Z.snap"}', "not a list"),
    (b"[" * 100000 + b"]" * 100000, "not JSON"),
], ids=["huge", "html", "object", "deep"])
def test_a_listing_that_is_not_a_json_list_fails_with_one_clear_error(tmp_path, answer, words):
    with FakeSwift([listing_hook(lambda req: answer)]) as swift:
        store = storage(tmp_path, swift.storage_block(prefix="p"))
        with captured_log(), pytest.raises(vsa.StorageError) as caught:
            store.list()
    assert words in str(caught.value), caught.value
    assert len(str(caught.value)) < 600


def test_entries_of_the_wrong_types_are_skipped_or_count_as_zero(tmp_path):
    good = [name_at(now() - HOUR * i) for i in range(1, 6)]
    entries = [7, None, "p/" + good[0], [1], {"name": 12345, "bytes": 1},
               {"name": None}, {"name": ["p/" + good[0]]},
               {"name": "p/" + good[0], "bytes": "12"},
               {"name": "p/" + good[1], "bytes": -5},
               {"name": "p/" + good[2], "bytes": 1.5e3},
               {"name": "p/" + good[3], "bytes": "nan"},
               {"name": "p/" + good[4], "bytes": 2048}]
    with FakeSwift([listing_hook(lambda req: entries)]) as swift:
        store = storage(tmp_path, swift.storage_block(prefix="p"))
        with captured_log():
            refs = store.list()
    assert sorted(ref.name for ref in refs) == sorted(good)
    sizes = dict((ref.name, ref.size) for ref in refs)
    assert sizes[good[4]] == 2048
    for name in good[:4]:
        assert isinstance(sizes[name], int) and 0 <= sizes[name] <= 12, sizes


def test_a_listed_size_beyond_any_object_does_not_crash_list(tmp_path, capsys):
    name = name_at(now() - HOUR)
    entries = [{"name": "p/" + name, "bytes": 10 ** 400}]
    with FakeSwift([listing_hook(lambda req: entries)]) as swift:
        code, log = run_main("-c", write_config(tmp_path, swift.storage_block(prefix="p")), "list")
    out = capsys.readouterr().out
    assert code == 0 and "unexpected" not in log, log
    assert name in out, out


def planted_names(when):
    """(ours, planted): snapshot names of this agent and the Go agent under
    ``p/``, and names that only look like ours."""
    own = [name_at(when - HOUR * i) for i in (1, 2, 3)]
    go = go_snapshot_name(when - 5 * HOUR)
    old = name_at(when - 10 * HOUR)
    planted = ["p/../" + old, "p/" + old + "\n", "p/\x1b[2J" + old, "p/sub/" + old,
               "q/" + old, "p" + old, old, "p/.segments/" + old, "p//" + old,
               "p/" + old.replace(".snap", ".snap.tmp"), "p/" + old.upper()]
    return own + [go], planted, old


def test_planted_names_are_never_listed_nor_deleted_by_retention(tmp_path):
    when = now()
    ours, planted, old = planted_names(when)
    entries = sorted([{"name": "p/" + n, "bytes": 10} for n in ours] +
                     [{"name": n, "bytes": 10} for n in planted] +
                     [{"subdir": "p/" + old}, {"subdir": "p/" + old + "/"}], key=lambda e: str(e))
    with FakeSwift([listing_hook(lambda req: entries)]) as swift:
        store = storage(tmp_path, swift.storage_block(prefix="p", retain=1))
        with captured_log() as log:
            listed = sorted(ref.name for ref in store.list())
            deleted = vsa.apply_retention(store, keep=ours[0], now=when)
        deletes = [r for r in swift.requests if r[0] == "DELETE"]
    assert listed == sorted(ours), listed
    assert sorted(deleted) == sorted(ours[1:]), log.getvalue()
    assert sorted(r[2] for r in deletes if "multipart-manifest" in r[3]) == sorted(
        "p/" + n for n in ours[1:]), deletes
    assert all(r[2] in ["p/" + n for n in ours[1:]] for r in deletes), deletes
    assert "\x1b" not in log.getvalue()


def test_the_go_agents_names_are_listed_beside_ours_and_other_prefixes_are_not(tmp_path):
    when = now()
    ours, _, _ = planted_names(when)
    with FakeSwift() as swift:
        for name in ours:
            swift.put("snaps", "p/" + name)
            swift.put("snaps", "other/" + name)
        swift.put("snaps", "p/vault-" + name_at(when)[len("raft_snapshot-"):])
        store = storage(tmp_path, swift.storage_block(prefix="p"))
        with captured_log():
            assert sorted(ref.name for ref in store.list()) == sorted(ours)


# -- tempauth --------------------------------------------------------------------


def auth_hook(answer):
    """A hook answering the tempauth login with ``answer(login)``, where
    ``login`` is FakeSwift's own (status, headers, payload) answer."""
    def hook(req):
        if req.path.rstrip("/") == "/auth/v1.0":
            return answer(hook.swift.login(req))
        return None
    return hook


def with_swift(*hooks):
    swift = FakeSwift(hooks)
    for hook in hooks:
        hook.swift = swift
    return swift


@pytest.mark.parametrize("dropped, words", [
    ("X-Auth-Token", "no access token"), ("X-Storage-Url", "not an http(s) URL")])
def test_a_tempauth_answer_without_token_or_storage_url_is_a_clear_error(tmp_path, dropped, words):
    def drop(login):
        status, headers, payload = login
        headers.pop(dropped)
        headers.pop("X-Storage-Token", None)
        return status, headers, payload
    with with_swift(auth_hook(drop)) as swift:
        store = storage(tmp_path, swift.storage_block())
        with captured_log() as log, pytest.raises(vsa.StorageError) as caught:
            store.list()
        listings = swift.count("GET") - 1
    assert words in str(caught.value), caught.value
    assert listings == 0
    tokens_free(log.getvalue() + str(caught.value), swift)


@pytest.mark.parametrize("expires", ["nan", "inf", "-inf", "1e308", "garbage", "", "86400000"])
def test_an_absurd_token_expiry_keeps_a_token_one_day_at_most(tmp_path, expires):
    def odd(login):
        login[1]["X-Auth-Token-Expires"] = expires
        return login
    clock = FakeClock()
    with with_swift(auth_hook(odd)) as swift:
        store = storage(tmp_path, swift.storage_block(), clock=clock)
        with captured_log():
            store.list()
            store.list()
            assert len(swift.tokens) == 1
            clock.advance(86401)
            store.list()
        assert len(swift.tokens) == 2


@pytest.mark.parametrize("expires", ["0", "-1", "-1e308"])
def test_a_token_that_arrives_expired_is_refused_once(tmp_path, expires):
    def expired(login):
        login[1]["X-Auth-Token-Expires"] = expires
        return login
    with with_swift(auth_hook(expired)) as swift:
        store = storage(tmp_path, swift.storage_block())
        with captured_log() as log, pytest.raises(vsa.StorageError) as caught:
            store.list()
        assert len(swift.tokens) == 1
        assert swift.count("GET") == 1        # the login only
    assert "already expired" in str(caught.value)
    tokens_free(log.getvalue() + str(caught.value), swift)


@pytest.mark.parametrize("url", ["javascript:alert(1)", "file:///etc/passwd", "/v1/AUTH_test",
                                 "127.0.0.1:8080/v1/AUTH_test", "ftp://127.0.0.1/v1/AUTH_test",
                                 "http://", "http:///v1/AUTH_test"])
def test_a_storage_url_that_is_not_http_is_refused(tmp_path, url):
    def odd(login):
        login[1]["X-Storage-Url"] = url
        return login
    with with_swift(auth_hook(odd)) as swift:
        store = storage(tmp_path, swift.storage_block())
        with captured_log() as log, pytest.raises(vsa.StorageError) as caught:
            store.list()
        assert swift.count("GET") == 1
    assert "not an http(s) URL" in str(caught.value)
    tokens_free(log.getvalue() + str(caught.value), swift)


def test_credentials_in_the_storage_url_never_reach_the_log(tmp_path):
    secret = "url-password-7c6b5a4d3e"
    known_secrets(secret)

    def userinfo(login):
        login[1]["X-Storage-Url"] = "http://snap:%s@127.0.0.1:1/v1/AUTH_test" % secret
        return login
    with with_swift(auth_hook(userinfo)) as swift:
        store = storage(tmp_path, swift.storage_block())
        with captured_log() as log, pytest.raises(vsa.StorageError) as caught:
            store.list()
    text = log.getvalue() + str(caught.value)
    no_secret(text, secret)
    tokens_free(text, swift)


def test_a_plain_http_storage_url_from_an_https_auth_url_is_refused(tmp_path):
    from support.fake_endpoints import self_signed_cert
    cert, key = self_signed_cert(tmp_path)
    with FakeSwift() as plain:
        def downgrade(login):
            login[1]["X-Storage-Url"] = plain.storage_url()
            return login
        secure = with_swift(auth_hook(downgrade))
        secure.tls = (cert, key)
        with secure:
            store = storage(tmp_path, secure.storage_block(ca_cert=cert))
            with captured_log() as log, pytest.raises(vsa.StorageError) as caught:
                store.list()
            assert secure.count("GET") == 1
        assert plain.requests == []
    assert "plain http" in str(caught.value)
    tokens_free(log.getvalue() + str(caught.value), secure)


def test_a_tempauth_error_page_quoting_the_key_is_masked(tmp_path):
    def quote(login):
        return 401, {}, "<html><h1>Unauthorized</h1><p>key %s is not valid for test:tester</p></html>" % KEY
    with with_swift(auth_hook(quote)) as swift:
        code, log = run_main("-c", write_config(tmp_path, swift.storage_block()), "list")
    assert code == 1, log
    assert [line for line in error_lines(log) if "HTTP 401" in line], log
    no_secret(log)


def test_a_swift_error_page_quoting_the_token_is_masked(tmp_path):
    def quote(req):
        if req.container is not None:
            return 403, {}, "<html><p>token %s may not read %s</p></html>" % (
                req.headers.get("X-Auth-Token"), req.container)
        return None
    with FakeSwift([quote]) as swift:
        code, log = run_main("-c", write_config(tmp_path, swift.storage_block()), "list")
    assert code == 1, log
    assert [line for line in error_lines(log) if "HTTP 403" in line], log
    tokens_free(log, swift)


# -- Keystone --------------------------------------------------------------------

KS_TOKEN = "gAAAAAhostileKeystoneToken0123456789abcdef"


def catalog_of(url, regions=("RegionOne",), interface="public"):
    return [{"type": "identity", "endpoints": [{"interface": "public", "url": "http://127.0.0.1:9/v3",
                                                 "region": "RegionOne"}]},
            {"type": "object-store", "name": "swift", "endpoints": [
                {"interface": interface, "url": url, "region": region, "region_id": region}
                for region in regions]}]


def good_token(swift, **changes):
    """Keystone's answer: KS_TOKEN for an hour, ``swift`` in the catalog."""
    token = {"expires_at": (now() + HOUR).strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
             "catalog": catalog_of(swift.storage_url())}
    token.update(changes)
    return 201, {"X-Subject-Token": KS_TOKEN}, {"token": token}


class Keystone(Endpoint):
    """POST /v3/auth/tokens answered by ``reply(request, swift)`` ->
    (status, headers, body); by default a good token (KS_TOKEN, one hour,
    a catalog with ``swift``'s storage URL), which FakeSwift accepts."""

    def __init__(self, swift, reply=None, tls=None):
        Endpoint.__init__(self, tls=tls)
        self.swift, self.reply = swift, reply or (lambda request, swift: good_token(swift))
        swift.tokens.append(KS_TOKEN)

    def respond(self, request):
        if request.method == "POST" and request.path == "/v3/auth/tokens":
            return self.reply(request, self.swift)
        return 404, {}, {"error": {"code": 404, "message": "not here"}}

    def block(self, **extra):
        block = {"auth_url": self.url + "/v3", "container": "snaps", "username": "snap",
                 "user_domain_name": "Default", "password": PASSWORD, "project_name": "vault"}
        block.update(extra)
        return {"swift_storage": block}


def keystone_list(tmp_path, reply, clock=None, **extra):
    """list() through a Keystone answering ``reply``: (refs or the
    StorageError, log text, the FakeSwift's requests, Keystone's)."""
    with FakeSwift() as swift, Keystone(swift, reply) as ks:
        store = storage(tmp_path, ks.block(**extra), clock=clock)
        with captured_log() as log:
            try:
                result = store.list()
            except vsa.StorageError as exc:
                result = exc
    text = log.getvalue() + str(result)
    no_secret(text, KS_TOKEN)
    return result, text, swift.requests, ks.requests


def test_keystone_without_a_subject_token_is_a_clear_error(tmp_path):
    result, _, requests, _ = keystone_list(
        tmp_path, lambda req, swift: (201, {}, {"token": {"catalog": catalog_of(swift.storage_url())}}))
    assert "no access token" in str(result)
    assert requests == []


@pytest.mark.parametrize("catalog", [None, [], "catalog", 5, {"type": "object-store"},
                                     [None, 1, "x", {"type": 5}, {"type": "object-store"},
                                      {"type": "object-store", "endpoints": "x"},
                                      {"type": "object-store", "endpoints": [
                                          None, {"interface": "public", "url": 5},
                                          {"interface": ["public"], "url": "http://127.0.0.1:1/x"},
                                          {"interface": "internal", "url": "http://127.0.0.1:1/x"}]}]],
                         ids=["none", "empty", "string", "number", "object", "garbage"])
def test_a_catalog_without_a_usable_object_store_is_a_clear_error(tmp_path, catalog):
    def reply(req, swift):
        return 201, {"X-Subject-Token": KS_TOKEN}, {"token": {"catalog": catalog}}
    result, text, requests, _ = keystone_list(tmp_path, reply)
    assert isinstance(result, vsa.StorageError), result
    assert "object-store" in str(result) and "unexpected" not in text, result
    assert requests == []


def test_a_catalog_with_two_regions_needs_region(tmp_path):
    def reply(req, swift):
        return 201, {"X-Subject-Token": KS_TOKEN}, {"token": {"catalog": [
            {"type": "object-store", "endpoints": [
                {"interface": "public", "url": swift.storage_url(), "region": "RegionOne"},
                {"interface": "public", "url": "http://127.0.0.1:1/v1/AUTH_x", "region": "Evil"}]}]}}
    result, _, requests, _ = keystone_list(tmp_path, reply)
    assert "set region" in str(result) and "RegionOne" in str(result), result
    assert requests == []
    result, _, requests, _ = keystone_list(tmp_path, reply, region="RegionOne")
    assert result == [] and len(requests) == 1


@pytest.mark.parametrize("expires_at, logins_after_a_day", [
    ("garbage", 2), (None, 2), (12345, 2), ("9999-12-31T23:59:59.000000Z", 2),
    ("2026-13-45T99:00:00Z", 2)])
def test_odd_keystone_expiries_keep_a_token_one_day_at_most(tmp_path, expires_at, logins_after_a_day):
    clock = FakeClock()
    with FakeSwift() as swift, Keystone(swift, lambda req, sw: good_token(sw, expires_at=expires_at)) as ks:
        store = storage(tmp_path, ks.block(), clock=clock)
        with captured_log():
            store.list()
            store.list()
            assert len(ks.requests) == 1
            clock.advance(86401)
            store.list()
        assert len(ks.requests) == logins_after_a_day


def test_a_keystone_token_expired_on_arrival_is_refused(tmp_path):
    result, _, requests, ks_requests = keystone_list(
        tmp_path, lambda req, swift: good_token(swift, expires_at="2001-01-01T00:00:00.000000Z"))
    assert "already expired" in str(result), result
    assert requests == [] and len(ks_requests) == 1


def test_a_huge_keystone_answer_is_refused(tmp_path):
    def reply(req, swift):
        return 201, {"X-Subject-Token": KS_TOKEN}, {"token": {"catalog": catalog_of(swift.storage_url()),
                                                              "pad": "x" * (5 * MB)}}
    result, _, requests, _ = keystone_list(tmp_path, reply)
    assert "larger than" in str(result), result
    assert requests == []


def test_a_keystone_that_trickles_is_cut_by_request_timeout(tmp_path):
    from support.slow_servers import TrickleServer
    with TrickleServer("body", interval=0.05, limit=20) as slow:
        block = {"swift_storage": {"auth_url": slow.url + "/v3", "container": "snaps", "username": "u",
                                   "password": PASSWORD, "project_name": "p"}}
        store = storage(tmp_path, block, request_timeout="2s")
        started = time.monotonic()
        with captured_log() as log, pytest.raises(vsa.StorageError) as caught:
            store.list()
        took = time.monotonic() - started
    assert "request_timeout" in str(caught.value), caught.value
    assert took < 8, "%.1f s" % took
    no_secret(log.getvalue() + str(caught.value))


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_keystone_redirect_is_not_followed(tmp_path, status):
    with Endpoint(lambda req: (201, {"X-Subject-Token": KS_TOKEN}, {"token": {}})) as elsewhere:
        def reply(req, swift):
            return status, {"Location": elsewhere.url + "/v3/auth/tokens"}, b""
        result, text, requests, ks_requests = keystone_list(tmp_path, reply)
        assert elsewhere.requests == []
    assert isinstance(result, vsa.StorageError) and "HTTP %d" % status in str(result), result
    assert len(ks_requests) == 1 and requests == []


@pytest.mark.parametrize("app", [False, True], ids=["password", "application-credential"])
def test_a_keystone_error_quoting_the_secret_is_masked(tmp_path, app):
    def reply(req, swift):
        sent = json.loads(req.body.decode("utf-8"))["auth"]["identity"]
        secret = sent["application_credential"]["secret"] if app else sent["password"]["user"]["password"]
        return 401, {}, {"error": {"code": 401, "title": "Unauthorized",
                                   "message": "The request you have made requires authentication: "
                                              "secret %r, head %s" % (secret, secret[:14])}}
    extra = {"application_credential_id": "appcred-1", "application_credential_secret": APP_SECRET,
             "password": None, "project_name": None, "username": None} if app else {}
    with FakeSwift() as swift, Keystone(swift, reply) as ks:
        block = ks.block(**extra)
        block["swift_storage"] = dict((k, v) for k, v in block["swift_storage"].items() if v is not None)
        code, log = run_main("-c", write_config(tmp_path, block), "list")
        assert len(ks.requests) == 1
    assert code == 1, log
    assert [line for line in error_lines(log) if "HTTP 401" in line], log
    no_secret(log, KS_TOKEN)


# -- 401 loops ---------------------------------------------------------------------


def test_a_store_that_refuses_every_token_costs_one_new_login_per_request(tmp_path):
    def refuse(req):
        return (401, {}, b"<html><h1>Unauthorized</h1></html>") if req.container else None
    with FakeSwift([refuse]) as swift:
        store = storage(tmp_path, swift.storage_block())
        with captured_log() as log:
            for _ in range(3):
                with pytest.raises(vsa.StorageError) as caught:
                    store.list()
                assert "HTTP 401" in str(caught.value) and "token was refused" in str(caught.value)
        # a login, then per list: the list, a new login, the list again (the
        # second refusal ends it; its token stays for the next request's try)
        assert len(swift.tokens) == 4, swift.tokens
        assert swift.count("GET") == 4 + 6
    tokens_free(log.getvalue(), swift)


def test_a_token_refused_once_then_accepted_needs_exactly_one_new_login(tmp_path):
    def refuse_first(req):
        if req.container and req.headers.get("X-Auth-Token") == swift.tokens[0]:
            return 401, {}, b"<html><h1>Unauthorized</h1></html>"
        return None
    with FakeSwift([refuse_first]) as swift:
        swift.put("snaps", name_at(now() - HOUR))
        store = storage(tmp_path, swift.storage_block())
        with captured_log():
            assert len(store.list()) == 1
            assert len(store.list()) == 1
        assert len(swift.tokens) == 2


# -- uploads ---------------------------------------------------------------------


def sha_meta(value):
    return {"X-Object-Meta-" + vsa.OWN_SHA256: value}


def served_then(change):
    """A hook answering as FakeSwift, then ``change(req, (status, headers,
    payload))`` -> what is sent (or "cut")."""
    def hook(req):
        return change(req, hook.swift.serve(req)) if req.container else None
    return hook


def is_segment_put(req):
    return req.method == "PUT" and ".segments/" in (req.obj or "")


def is_manifest_put(req):
    return req.method == "PUT" and req.query.get("multipart-manifest") == "put"


def upload_with(tmp_path, *hooks, signals=None):
    """Upload a 1.5 MiB snapshot (two 1 MiB segments) under prefix p/ to a
    FakeSwift with ``hooks``: (result or the exception, log, the swift)."""
    info = staged(tmp_path)
    name = name_at(now())
    with with_swift(*hooks) as swift:
        store = storage(tmp_path, swift.storage_block(prefix="p", segment_size_mb=1), signals=signals)
        with captured_log() as log:
            try:
                result = store.upload(info, name)
            except (vsa.StorageError, vsa.Stopped) as exc:
                result = exc
    tokens_free(log.getvalue() + str(result), swift)
    return result, log.getvalue(), swift, name


def test_a_segment_answered_with_a_wrong_etag_fails_the_upload_and_leaves_nothing(tmp_path):
    def wrong(req, answer):
        if is_segment_put(req):
            answer[1]["Etag"] = "0" * 32
        return answer
    result, log, swift, _ = upload_with(tmp_path, served_then(wrong))
    assert isinstance(result, vsa.StorageError) and "segment" in str(result), result
    assert swift.names() == [], swift.names()
    assert swift.count("PUT", query_key="multipart-manifest") == 0
    assert "Deleted the" in log and "segment(s) of the failed upload" in log, log


def test_a_manifest_answered_with_a_wrong_etag_is_deleted_with_its_segments(tmp_path):
    def wrong(req, answer):
        if is_manifest_put(req):
            answer[1]["Etag"] = '"%s"' % ("f" * 32)
        return answer
    result, _, swift, _ = upload_with(tmp_path, served_then(wrong))
    assert isinstance(result, vsa.StorageError) and "object deleted" in str(result), result
    assert swift.names() == [], swift.names()


def test_a_manifest_put_cut_after_it_was_stored_is_a_success(tmp_path):
    def cut_first(req, answer):
        if is_manifest_put(req) and hook.swift.count("PUT", query_key="multipart-manifest") == 1:
            return "cut"        # stored, but the answer is lost
        return answer
    hook = served_then(cut_first)
    result, log, swift, name = upload_with(tmp_path, hook)
    assert result == "swift://snaps/p/" + name, result
    assert swift.count("PUT", query_key="multipart-manifest") == 2
    assert "the answer was lost, but the object there is the one sent" in log, log
    assert len(swift.names()) == 3 and "p/" + name in swift.names()


def test_a_manifest_put_cut_then_refused_for_another_object_is_a_name_clash(tmp_path):
    def plant_then_cut(req):
        if is_manifest_put(req) and hook.swift.count("PUT", query_key="multipart-manifest") == 1:
            hook.swift.put("snaps", req.obj, b"another agent's", sha_meta("0" * 64))
            return "cut"
        return None
    hook = plant_then_cut
    result, _, swift, name = upload_with(tmp_path, hook)
    assert isinstance(result, vsa.NameClash), result
    assert swift.names() == ["p/" + name]
    assert swift.objects[("snaps", "p/" + name)].data == b"another agent's"


def test_a_stop_during_segment_uploads_deletes_the_segments_written(tmp_path):
    signals = FakeSignals()

    def stop_on_second(req, answer):
        if is_segment_put(req) and hook.swift.count("PUT") == 2:
            signals.request_stop()
        return answer
    hook = served_then(stop_on_second)
    result, log, swift, _ = upload_with(tmp_path, hook, signals=signals)
    assert isinstance(result, vsa.Stopped), result
    assert swift.count("PUT", query_key="multipart-manifest") == 0
    assert swift.count("PUT") >= 1
    assert swift.names() == [], swift.names()


def test_segments_that_cannot_be_deleted_are_named_in_one_error_line(tmp_path):
    from support.archives import build_archive
    from support.fake_endpoints import FakeVault

    def wrong_then_locked(req):
        if req.method == "DELETE" and ".segments/" in (req.obj or ""):
            return 403, {}, b"<html><h1>Forbidden</h1></html>"
        if is_segment_put(req):
            status, headers, payload = hook.swift.serve(req)
            return status, dict(headers, Etag="0" * 32), payload
        return None
    hook = wrong_then_locked
    with FakeVault(archive=build_archive(state=os.urandom(1536 * 1024))) as vault, \
            with_swift(hook) as swift:
        block = swift.storage_block(prefix="p", segment_size_mb=1)
        code, log = run_main("-c", write_config(tmp_path, block, addr=vault.url), "--once")
        left = [n for n in swift.names() if ".segments/" in n]
    assert code == 1, log
    assert left and swift.count("PUT", query_key="multipart-manifest") == 0, swift.names()
    lines = [line for line in error_lines(log) if "Could not delete %d segment(s)" % len(left) in line]
    assert lines and any("snaps/" + name in lines[0] for name in left), log
    assert "Traceback" not in log and "unexpected" not in log, log
    tokens_free(log, swift)


def slo_store(swift, names, prefix="p/"):
    """Each name stored as a manifest of one segment under prefix/.segments/."""
    for name in names:
        seg = "%s.segments/%s/0a0b0c/00000001" % (prefix, name)
        swift.put("snaps", seg, b"segment of " + name.encode())
        part = swift.objects[("snaps", seg)]
        swift.objects[("snaps", prefix + name)] = Obj(b"", {}, [
            {"path": "/snaps/" + seg, "etag": part.etag, "size_bytes": part.size}])


@pytest.mark.parametrize("errors", [
    [["/snaps/p/.segments/x/00000001", "403 Forbidden"]], "text", [None], 5, {"a": 1}, True],
    ids=["list", "string", "null-entry", "number", "object", "bool"])
def test_a_manifest_delete_answering_errors_is_a_retention_error(tmp_path, errors):
    when = now()
    names = [name_at(when - HOUR * i) for i in (0, 1, 2)]

    def refuse(req):
        if req.method == "DELETE" and req.query.get("multipart-manifest") == "delete":
            return 200, {}, {"Number Deleted": 0, "Response Status": "400 Bad Request", "Errors": errors}
        return None
    with FakeSwift([refuse]) as swift:
        slo_store(swift, names)
        store = storage(tmp_path, swift.storage_block(prefix="p", retain=1))
        with captured_log(), pytest.raises(vsa.StorageError) as caught:
            vsa.apply_retention(store, keep=names[0], now=when)
        assert len(swift.names()) == 6
    assert "not deleted" in str(caught.value), caught.value


# -- two agents, one name --------------------------------------------------------


def test_two_agents_uploading_one_name_at_once_one_wins_and_the_other_removes_only_its_own(tmp_path):
    import threading
    infos = [staged(tmp_path, name="a.snap"), staged(tmp_path, name="b.snap")]
    name = name_at(now())
    both = threading.Barrier(2, timeout=20)

    def meet(req):
        if is_manifest_put(req):
            both.wait()         # both manifests arrive before either is stored
        return None
    results = [None, None]
    with FakeSwift([meet]) as swift:
        stores = [storage(tmp_path, swift.storage_block(prefix="p", segment_size_mb=1)) for _ in infos]

        def run(index):
            try:
                results[index] = stores[index].upload(infos[index], name)
            except vsa.StorageError as exc:
                results[index] = exc
        with captured_log():
            threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        winner = [i for i in (0, 1) if isinstance(results[i], str)]
        assert len(winner) == 1 and isinstance(results[1 - winner[0]], vsa.NameClash), results
        manifest = swift.objects[("snaps", "p/" + name)]
        assert manifest.meta["X-Object-Meta-" + vsa.OWN_SHA256] == infos[winner[0]].sha256
        segments = [n for n in swift.names() if ".segments/" in n]
        assert sorted(s["path"] for s in manifest.segments) == sorted("/snaps/" + n for n in segments)
        with captured_log():
            data = stores[0]._request("GET", "download", "p/" + name)[1]
    with open(infos[winner[0]].path, "rb") as handle:
        assert data == handle.read()


# -- the cleaner of killed uploads ----------------------------------------------


def segments_of(swift, name, upload="0a0b0c", count=2, prefix="p/.segments/"):
    for number in range(1, count + 1):
        swift.put("snaps", "%s%s/%s/%08d" % (prefix, name, upload, number), b"seg")


def test_the_cleaner_deletes_only_old_orphan_segments(tmp_path):
    when = now()
    kept_manifest, orphan, young = name_at(when - 3 * DAY), name_at(when - 2 * DAY), name_at(when - HOUR)
    with FakeSwift() as swift:
        slo_store(swift, [kept_manifest])
        for name in (orphan, young):
            segments_of(swift, name)
        segments_of(swift, orphan, prefix="q/.segments/")
        segments_of(swift, orphan, prefix="p/other/")
        segments_of(swift, "vault-" + orphan[len("raft_snapshot-"):])      # another file_prefix
        swift.put("snaps", "p/.segments/" + orphan)                         # not a folder
        before = swift.names()
        store = storage(tmp_path, swift.storage_block(prefix="p"))
        with captured_log() as log:
            store.prepare()
        gone = sorted(set(before) - set(swift.names()))
    assert gone == ["p/.segments/%s/0a0b0c/%08d" % (orphan, n) for n in (1, 2)], log.getvalue()
    tokens_free(log.getvalue(), swift)


def test_a_hostile_segment_listing_cannot_make_the_cleaner_delete_elsewhere(tmp_path):
    when = now()
    orphan, real = name_at(when - 2 * DAY), name_at(when - 3 * HOUR)
    folder = "p/.segments/%s/" % orphan

    def lie(req):
        prefix = req.query.get("prefix", "")
        if req.method == "GET" and req.obj is None and prefix == folder:
            return 200, {}, [{"name": "p/" + real, "bytes": 3}, {"name": "q/x", "bytes": 1},
                             {"name": folder + "../../" + real, "bytes": 1},
                             {"name": folder + "0a/00000001", "bytes": 3}]
        if req.method == "GET" and req.obj is None and prefix == "p/.segments/":
            return 200, {}, [{"subdir": folder}, {"subdir": "p/.segments/../"},
                             {"subdir": "q/.segments/%s/" % orphan}, {"subdir": "p/"}]
        return None
    with FakeSwift([lie]) as swift:
        swift.put("snaps", "p/" + real)
        swift.put("snaps", "q/x")
        swift.put("snaps", folder + "0a/00000001")
        store = storage(tmp_path, swift.storage_block(prefix="p"))
        with captured_log():
            store.prepare()
        deleted = sorted(r[2] for r in swift.requests if r[0] == "DELETE")
    assert deleted == [folder + "0a/00000001"], deleted


# -- a SIGTERM during an upload, in the daemon -----------------------------------


def test_sigterm_during_segment_uploads_deletes_them_and_exits_0(tmp_path):
    import signal
    import threading
    from support.archives import build_archive
    from support.fake_endpoints import FakeVault
    from support.harness import child_env, read, reaped, start_agent, stop, wait_for
    release = threading.Event()

    def hold_the_second(req):
        if is_segment_put(req) and hook.swift.count("PUT") >= 2:
            release.wait(20)            # the agent is stopped meanwhile
            return 503, {}, b"<html><h1>Service Unavailable</h1></html>"
        return None
    hook = hold_the_second
    logfile = tmp_path / "agent.log"
    with FakeVault(archive=build_archive(state=os.urandom(1536 * 1024))) as vault, \
            with_swift(hook) as swift:
        block = swift.storage_block(prefix="p", segment_size_mb=1, concurrency=1)
        config = write_config(tmp_path, block, addr=vault.url, frequency="1h")
        try:
            with reaped(start_agent(config, str(logfile), env=child_env())) as proc:
                wait_for(lambda: proc.poll() is not None or swift.count("PUT") >= 2, 30,
                         "the second segment PUT")
                assert proc.poll() is None, read(logfile)
                assert any(".segments/" in n for n in swift.names())     # the first is stored
                code = stop(proc, signal.SIGTERM, timeout=15)
        finally:
            release.set()
        names = swift.names()
    log = read(logfile)
    assert code == 0, log
    assert names == [], log
    assert swift.count("PUT", query_key="multipart-manifest") == 0
    assert "Traceback" not in log, log
    tokens_free(log, swift)
