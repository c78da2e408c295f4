"""Section "OpenStack Swift": Swift storage end to end against a real Swift
(all in one, tempauth) and a real Keystone v3 (support/swift_server.py):
real snapshots from the OpenBao cluster stored with every login flavour,
then listed, downloaded, verified and restored through main(); Static Large
Objects (segments, segment_container, retention of manifests with their
segments); uploads cut or stopped mid-way leave nothing; crash leftovers
are swept; tokens that expire or are refused mid-cycle; one-line errors;
``--check-config`` with the OS_* variables; ``doctor``; re-verification of
damaged objects; no password, secret or token in any log line.

Short cycles that need no real Raft data run against the loopback
FakeVault (support/fake_endpoints.py) through support/scrub_stores.py's
``SwiftStore``; the container is the ``swift_container`` fixture's (fresh
per test), so every listing is exactly what the test put there.
"""

import hashlib
import io
import json
import os
import re
import time

import pytest

import vault_snapshot_agent as vsa
from support.fake_endpoints import FakeVault
from support.faultproxy import FaultProxy
from support.harness import (error_lines, known_secrets, read, reaped, run_main, run_once, start_agent,
                             stop, success_location, verify_download, wait_for)
from support.scrub_stores import Snapshots, SwiftStore, run_cli, store_snapshots, taken, upload
from support.swift_server import request, start_swift

SUCCESS = "Successfully created swift snapshot to swift://"
OBTAINED = "Obtained an access token from "


@pytest.fixture(autouse=True)
def no_openstack_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("OS_", "ST_", "VAULT_", "BAO_")):
            monkeypatch.delenv(name)


@pytest.fixture
def logins(monkeypatch):
    """Every token the agent's Swift logins (tempauth and Keystone) got,
    in order; each one is added to the session's secret scan."""
    tokens = []

    def recording(real):
        def login(*args, **kwargs):
            answer = real(*args, **kwargs)
            tokens.append(answer[0])
            known_secrets(answer[0])
            return answer
        return login
    monkeypatch.setattr(vsa, "tempauth_login", recording(vsa.tempauth_login))
    monkeypatch.setattr(vsa, "keystone_login", recording(vsa.keystone_login))
    return tokens


def tempauth_block(swift, container, **extra):
    return dict({"auth_url": swift.auth_url, "username": swift.user, "password": swift.key,
                 "container": container}, **extra)


KEYSTONE_LOGINS = ("password-names", "password-ids", "appcred-id", "appcred-name")


def keystone_block(ksw, container, how="password-names", **extra):
    ks = ksw.keystone
    block = {"auth_url": ks.auth_url, "container": container}
    if how == "password-names":
        block.update(username=ks.user, user_domain_name=ks.domain, password=ks.password,
                     project_name=ks.project, project_domain_name=ks.domain)
    elif how == "password-ids":
        block.update(user_id=ks.user_id, password=ks.password, project_id=ks.project_id)
    elif how == "appcred-id":
        block.update(application_credential_id=ks.app_cred_id,
                     application_credential_secret=ks.app_cred_secret)
    else:
        block.update(application_credential_name=ks.app_cred_name, username=ks.user,
                     user_domain_name=ks.domain, application_credential_secret=ks.app_cred_secret)
    return dict(block, **extra)


def keystone_store(ksw, container, prefix, how="password-names", **extra):
    block = keystone_block(ksw, container, how, **extra)
    del block["container"]
    return SwiftStore(None, container, prefix, **block)


def keystone_listing(ksw, container):
    """Every object name in a container of the Keystone project."""
    resp = request("GET", "%s/%s?format=json" % (ksw.storage_url, container),
                   token=ksw.keystone.user_token()[0])
    assert resp.status == 200, resp
    return sorted(item["name"] for item in resp.json())


def keystone_get(ksw, container, name):
    resp = request("GET", "%s/%s/%s" % (ksw.storage_url, container, name),
                   token=ksw.keystone.user_token()[0])
    assert resp.status == 200, resp
    return resp


def assert_no_secret(log, *secrets):
    for secret in secrets:
        assert secret and secret not in log
    assert "Traceback" not in log


def cycle(tmp_path, store, archive):
    """One ``--once`` cycle of ``store``'s block against a FakeVault serving
    ``archive``: (exit code, log)."""
    with FakeVault(role_id="r", secret_id="s", archive=archive) as vault:
        code, log, _ = run_cli(tmp_path, store, "--once", addr=vault.url)
    return code, log


def proxied(store, proxy, **extra):
    """``store``'s block with tempauth and storage through ``proxy``."""
    return SwiftStore(store.swift, store.container, store.prefix, store.segment_size_mb,
                      **dict(store.extra, auth_url=proxy.addr + "/auth/v1.0",
                             storage_url=proxy.addr + "/v1/" + store.swift.account, **extra))


def segment_puts(proxy):
    return [line for line in proxy.requests if line.startswith("PUT ") and "/.segments/" in line]


# =============================================================================
# --once against the real cluster, with each login; list, download, verify
# =============================================================================


def _commands_work(tmp_path, name, data):
    """list, download latest, verify (the file, and the stored snapshot)
    through main() on the config run_once wrote."""
    config = str(tmp_path / "c.json")
    code, log = run_main("-c", config, "list")
    assert code == 0, log
    output = str(tmp_path / "latest.snap")
    out = io.StringIO()
    assert vsa.main(["-c", config, "list"], stream=io.StringIO(), out=out) == 0
    assert [line.split()[-1] for line in out.getvalue().splitlines()] == [name], out.getvalue()
    assert " swift " in out.getvalue()
    code, log = run_main("-c", config, "download", "latest", "-o", output)
    assert code == 0, log
    assert open(output, "rb").read() == data
    code, log = run_main("verify", output)
    assert code == 0, log
    out = io.StringIO()
    code = vsa.main(["-c", config, "verify", "latest", "--storage", "swift"], stream=io.StringIO(), out=out)
    assert code == 0 and re.match(r"OK +swift +%s " % re.escape(name), out.getvalue()), out.getvalue()


@pytest.mark.parametrize("how", ["tempauth"] + [pytest.param(how, marks=pytest.mark.slow)
                                                for how in KEYSTONE_LOGINS])
def test_once_stores_a_snapshot_that_lists_downloads_and_verifies(how, bao_cluster, approle, swift,
                                                                  swift_keystone, logins, tmp_path):
    ks = swift_keystone.keystone
    if how == "tempauth":
        container = swift.new_container("once")
        block, listing = tempauth_block(swift, container, prefix="p"), \
            lambda: SwiftStore(swift, container, "p").listing()
        get = lambda key: swift.request("GET", "/%s/%s" % (container, key))  # noqa: E731
    else:
        container = swift_keystone.new_container(ks.user_token()[0])
        block, listing = keystone_block(swift_keystone, container, how, prefix="p"), \
            lambda: keystone_listing(swift_keystone, container)
        get = lambda key: keystone_get(swift_keystone, container, key)  # noqa: E731
    code, log = run_once(tmp_path, bao_cluster.leader().addr, approle, swift_storage=block)
    assert code == 0, log
    key = success_location(log, SUCCESS + container + "/")
    assert re.match(r"p/raft_snapshot-\d{8}T\d{6}\.\d{3}Z\.snap\Z", key) and listing() == [key]
    resp = get(key)
    info = verify_download(resp.body, tmp_path)
    assert resp.headers["x-object-meta-vault-snapshot-sha256"] == info.sha256
    assert log.count(OBTAINED) == 1 and len(logins) == 1
    if how == "tempauth":       # the same after the login; Keystone's proxy takes ~0.5 s a request
        _commands_work(tmp_path, key.split("/")[1], resp.body)
    assert_no_secret(log, swift.key if how == "tempauth" else
                     ks.password if how.startswith("password") else ks.app_cred_secret, *logins)


def test_restore_takes_the_snapshot_from_swift(swift, swift_container, tmp_path):
    store = SwiftStore(swift, swift_container, "restore")
    snaps = Snapshots()
    older, newer = store_snapshots(tmp_path, store, [snaps.small(), snaps.small()])
    with FakeVault(role_id="r", secret_id="s") as vault:
        code, log, out = run_cli(tmp_path, store, "restore", "latest", "--yes", addr=vault.url)
        assert code == 0, log
        assert vault.restores == [store.read(newer)]
        code, log, out = run_cli(tmp_path, store, "restore", older, "--yes", addr=vault.url)
        assert code == 0, log
        assert vault.restores[1] == store.read(older)


# =============================================================================
# Static Large Objects, segment_container, retention
# =============================================================================


@pytest.mark.parametrize("separate", [False, True], ids=["segments-beside", "segment-container"])
def test_a_large_snapshot_is_an_slo_whose_segments_retention_deletes(separate, swift, swift_container,
                                                                      tmp_path):
    seg = swift.new_container("seg") if separate else None
    store = SwiftStore(swift, swift_container, "slo", segment_size_mb=1, retain=1,
                       **({"segment_container": seg} if separate else {}))
    segments = SwiftStore(swift, seg, "slo") if separate else store
    under = "slo/" if separate else "slo/.segments/"
    snaps, kept = Snapshots(), {}
    for _ in range(3):
        data = snaps.sized(2.5)
        code, log = cycle(tmp_path, store, data)
        assert code == 0, log
        name = success_location(log, SUCCESS + swift_container + "/").split("/", 1)[1]
        head = store.head(name)
        assert head.headers.get("x-static-large-object", "").lower() == "true", head
        assert store.read(name) == data and store.own_sha256(name) == hashlib.sha256(data).hexdigest()
        parts = segments.listing(under + name + "/")
        assert len(parts) == 3 and all(re.match(r"%s%s/[0-9a-f]{12}/0000000[123]\Z" % (
            re.escape(under), re.escape(name)), p) for p in parts), parts
        kept = {"manifest": "slo/" + name, "segments": parts}
    assert store.names() == [kept["manifest"].split("/")[1]]
    if separate:
        assert store.listing() == [kept["manifest"]]
        assert segments.listing() == kept["segments"]
    else:
        assert store.listing() == sorted([kept["manifest"]] + kept["segments"])
    assert "deleted 1" in log


# =============================================================================
# a cut or stopped upload leaves nothing; crash leftovers are swept
# =============================================================================


def test_a_refused_segment_leaves_no_manifest_and_no_segment(swift, swift_container, tmp_path):
    store = SwiftStore(swift, swift_container, "cut", segment_size_mb=1, concurrency=2)
    with FaultProxy("127.0.0.1", swift.ports["proxy"]) as proxy:
        rule = proxy.fail_requests(lambda m, p: m == "PUT" and "/.segments/" in p and
                                   p.endswith("/00000003"), status=403, body=b"cut",
                                   content_type="text/plain")
        code, log = cycle(tmp_path, proxied(store, proxy), Snapshots().sized(4.5))
    assert code == 1, log
    assert rule.hits == 1
    assert store.listing() == [], log
    assert re.search(r"Deleted the [1-5] segment\(s\) of the failed upload of cut/raft_snapshot-", log), log
    assert "HTTP 403" in log and "segment 3" in log


def test_a_missing_segment_container_leaves_nothing(swift, swift_container, tmp_path):
    store = SwiftStore(swift, swift_container, "noseg", segment_size_mb=1,
                       segment_container="no-such-segments")
    code, log = cycle(tmp_path, store, Snapshots().sized(2.5))
    assert code == 1, log
    assert store.listing() == []
    assert any("HTTP 404" in line and "segment" in line for line in error_lines(log)), log


@pytest.mark.slow
def test_sigterm_during_the_segment_uploads_leaves_nothing_and_exits_0(swift, swift_container, tmp_path):
    store = SwiftStore(swift, swift_container, "term", segment_size_mb=1, concurrency=1)
    with FakeVault(role_id="r", secret_id="s", archive=Snapshots().sized(6.5)) as vault, \
            FaultProxy("127.0.0.1", swift.ports["proxy"]) as proxy:
        proxy.delay(0.2)
        config = tmp_path / "agent.json"
        config.write_text(json.dumps({"addr": vault.url, "role_id": "r", "secret_id": "s",
                                      "temp_dir": str(tmp_path), "frequency": "1h",
                                      "swift_storage": proxied(store, proxy).block()}))
        os.chmod(str(config), 0o600)
        logfile = tmp_path / "agent.log"
        with reaped(start_agent(str(config), str(logfile))) as proc:
            wait_for(lambda: len(segment_puts(proxy)) >= 2, 30, "two segment uploads")
            assert stop(proc) == 0, read(logfile)
    log = read(logfile)
    assert store.listing() == [], log
    assert SUCCESS not in log and "Traceback" not in log
    assert re.search(r"Deleted the \d segment\(s\) of the failed upload of term/", log), log


def test_prepare_sweeps_segments_of_killed_uploads_and_nothing_else(swift, swift_container, tmp_path):
    store = SwiftStore(swift, swift_container, "sweep", segment_size_mb=1, retain=0)
    snaps = Snapshots()
    old_slo, orphan, recent = taken(50), taken(49), taken(2)
    data = snaps.sized(2.5)
    upload(tmp_path, store, old_slo, data)                 # an old SLO: its segments are its own
    kept = store.segments(old_slo + "/")
    assert len(kept) == 3
    leftovers = ["sweep/.segments/%s/0123456789ab/%08d" % (orphan, n) for n in (1, 2)]
    spared = ["sweep/.segments/%s/0123456789ab/00000001" % recent,     # may still be uploading
              "sweep/.segments/notes/0123456789ab/00000001"]           # not a snapshot name
    for path in leftovers + spared:
        resp = store.request("PUT", path, body=b"segment")
        assert resp.status == 201, resp
    code, log = cycle(tmp_path, store, snaps.small())
    assert code == 0, log
    new = success_location(log, SUCCESS + swift_container + "/")
    assert store.listing() == sorted(["sweep/" + old_slo, new] + kept + spared), log
    assert store.read(old_slo) == data
    assert "Deleted the 2 segment(s) of the failed upload of sweep/%s" % orphan in log


# =============================================================================
# tokens: expiring mid-cycle, refused once, refused always
# =============================================================================


@pytest.fixture(scope="module")
def short_swift(tmp_path_factory):
    """A Swift of its own whose tempauth tokens live 2 seconds."""
    server = start_swift(str(tmp_path_factory.mktemp("swift-short")), token_life=2)
    known_secrets(server.key)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_a_token_expiring_mid_upload_is_fetched_again(short_swift, logins, tmp_path):
    container = short_swift.new_container("short")
    store = SwiftStore(short_swift, container, "short", segment_size_mb=1, concurrency=1)
    data = Snapshots().sized(5.5)
    with FaultProxy("127.0.0.1", short_swift.ports["proxy"]) as proxy:
        proxy.delay(0.5)                # each answer half a second late: 6 segments take > 3 s
        code, log = cycle(tmp_path, proxied(store, proxy), data)
        assert code == 0, log
        sent = set(proxy.header_values("X-Auth-Token"))
    name = success_location(log, SUCCESS + container + "/").split("/", 1)[1]
    assert store.read(name) == data
    assert log.count(OBTAINED) >= 2 and len(logins) >= 2, log
    assert len(sent) >= 2 and sent <= set(logins)          # the segments went with several tokens
    assert_no_secret(log, short_swift.key, *logins)


def expired_token(swift):
    """A token of ``swift``'s tempauth (its own Fernet key) for test:tester
    that expired an hour ago: what a stale cached token is."""
    from cryptography.fernet import Fernet
    token = swift.login()[0]
    prefix = "AUTH_zftk" if token.startswith("AUTH_zftk") else "AUTH_ftk"
    fernet = Fernet(swift.fernet_key.encode("ascii"))
    groups = fernet.decrypt(token[len(prefix):].encode("ascii"))
    stale = prefix + fernet.encrypt_at_time(groups, int(time.time()) - 3600 - swift.token_life).decode()
    assert swift.request("HEAD", "", token=stale).status == 401
    return stale


def test_a_token_refused_on_the_first_request_is_fetched_again_once(swift, swift_container, tmp_path,
                                                                     monkeypatch):
    real, calls, stale = vsa.tempauth_login, [], expired_token(swift)

    def revoked_first(*args, **kwargs):
        token, left, url = real(*args, **kwargs)
        calls.append(token)
        return (stale if len(calls) == 1 else token), left, url
    monkeypatch.setattr(vsa, "tempauth_login", revoked_first)
    store = SwiftStore(swift, swift_container, "relogin")
    code, log = cycle(tmp_path, store, Snapshots().small())
    assert code == 0, log
    assert len(calls) == 2 and log.count(OBTAINED) == 2, log
    assert store.names() and "Traceback" not in log


def test_a_token_refused_every_time_fails_after_one_new_login_per_request(swift, swift_container, tmp_path,
                                                              monkeypatch):
    real, calls, stale = vsa.tempauth_login, [], expired_token(swift)

    def always_bogus(*args, **kwargs):
        token, left, url = real(*args, **kwargs)
        calls.append(token)
        return stale, left, url
    monkeypatch.setattr(vsa, "tempauth_login", always_bogus)
    code, log = cycle(tmp_path, SwiftStore(swift, swift_container, "bogus"), Snapshots().small())
    assert code == 1, log
    assert len(calls) == 3, log         # the first; one more for the listing, one for the upload
    assert "retry 2/" not in log        # each refused request: one new login, one retry
    errors = error_lines(log)
    assert any("HTTP 401" in line and "the token was refused" in line for line in errors), log
    assert "Traceback" not in log and stale not in log


# =============================================================================
# one-line errors
# =============================================================================


def one_error(log, *words):
    errors = [line for line in error_lines(log) if all(word in line for word in words)]
    assert errors and "Traceback" not in log, log
    return errors[0]


@pytest.mark.parametrize("kind", ["tempauth", "keystone"])
def test_a_wrong_password_is_one_line_naming_the_login_and_401(kind, swift, swift_keystone,
                                                                swift_container, tmp_path):
    wrong = "not-the-password-%s" % os.urandom(4).hex()
    if kind == "tempauth":
        store = SwiftStore(swift, swift_container, "wrong", password=wrong)
    else:
        store = keystone_store(swift_keystone, swift_container, "wrong", password=wrong)
    code, log = cycle(tmp_path, store, Snapshots().small())
    assert code == 1, log
    line = one_error(log, "HTTP 401")
    assert ("Swift tempauth at %s (user test:tester)" % swift.auth_url if kind == "tempauth" else
            "Keystone at %s (user %s" % (swift_keystone.keystone.auth_url, swift_keystone.keystone.user)) \
        in line, line
    assert "refused" in line and wrong not in log


@pytest.mark.parametrize("what", ["container", "segment_container"])
def test_a_missing_container_is_named_with_a_hint(what, swift, swift_container, tmp_path):
    if what == "container":
        store = SwiftStore(swift, "no-such-container", "missing", segment_size_mb=1)
    else:
        store = SwiftStore(swift, swift_container, "missing", segment_size_mb=1,
                           segment_container="no-such-container")
    code, log = cycle(tmp_path, store, Snapshots().sized(1.5))
    assert code == 1, log
    line = one_error(log, "Storing snapshot", "HTTP 404")
    assert "the container does not exist" in line, line


def test_a_missing_container_fails_with_404(swift, tmp_path):
    code, log = cycle(tmp_path, SwiftStore(swift, "no-such-container", "missing"), Snapshots().small())
    assert code == 1, log
    one_error(log, "Storing snapshot", "HTTP 404")
    assert "the container does not exist" in log        # the WARNING of the listing says it


def test_the_reader_user_gets_403_with_a_hint(swift, swift_container, tmp_path):
    store = SwiftStore(swift, swift_container, "reader", username=swift.reader)
    code, log = cycle(tmp_path, store, Snapshots().small())
    assert code == 1, log
    line = one_error(log, "HTTP 403")
    assert "the user may not do this here" in line, line
    assert store.listing() == []


def region_error(swift_keystone, tmp_path):
    store = keystone_store(swift_keystone, "any", "region", region="Mars")
    code, log = cycle(tmp_path, store, Snapshots().small())
    assert code == 1, log
    return one_error(log, "no object-store endpoint for interface public in region Mars")


def test_a_region_not_in_the_catalog_lists_what_it_offers(swift_keystone, tmp_path):
    line = region_error(swift_keystone, tmp_path)
    offers = line.split("the catalog offers: ", 1)[1]
    assert [part.split(" in ")[0] for part in offers.split(", ")] == ["admin", "internal", "public"]
    assert all(swift_keystone.keystone.region in part for part in offers.split(", ")), line


def test_the_offered_regions_are_named_once(swift_keystone, tmp_path):
    line = region_error(swift_keystone, tmp_path)
    assert "the catalog offers: admin in {0}, internal in {0}, public in {0}".format(
        swift_keystone.keystone.region) in line, line


def test_the_internal_interface_of_the_region_works(swift_keystone, tmp_path):
    ks = swift_keystone.keystone
    container = swift_keystone.new_container(ks.user_token()[0])
    store = keystone_store(swift_keystone, container, "internal", "appcred-id", interface="internal",
                           region=ks.region)
    code, log = cycle(tmp_path, store, Snapshots().small())
    assert code == 0, log
    key = success_location(log, SUCCESS + container + "/")
    assert keystone_listing(swift_keystone, container) == [key]
    assert_no_secret(log, ks.app_cred_secret)


# =============================================================================
# --check-config with the OS_* variables; doctor
# =============================================================================

KEYSTONE_ENV = {"OS_AUTH_URL": "https://keystone.example.com:5000/v3", "OS_USERNAME": "backup",
                "OS_PASSWORD": "os-env-password-1", "OS_PROJECT_NAME": "vault",
                "OS_USER_DOMAIN_NAME": "Default", "OS_PROJECT_DOMAIN_NAME": "Default",
                "OS_REGION_NAME": "RegionOne"}
APP_CRED_ENV = {"OS_AUTH_URL": "https://keystone.example.com:5000/v3",
                "OS_APPLICATION_CREDENTIAL_ID": "0123abcd",
                "OS_APPLICATION_CREDENTIAL_SECRET": "os-env-secret-2"}
TEMPAUTH_ENV = {"ST_AUTH": "https://swift.example.com/auth/v1.0", "ST_USER": "acct:user",
                "ST_KEY": "st-env-key-3"}


def check_config(tmp_path, env, **block):
    path = tmp_path / "check.json"
    path.write_text(json.dumps({"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s",
                                "swift_storage": dict({"container": "vault-snapshots"}, **block)}))
    stream, out = io.StringIO(), io.StringIO()
    code = vsa.main(["-c", str(path), "--check-config"], stream=stream, out=out, env=env)
    return code, stream.getvalue() + out.getvalue()


@pytest.mark.parametrize("env", [KEYSTONE_ENV, APP_CRED_ENV, TEMPAUTH_ENV],
                         ids=["keystone-password", "application-credential", "tempauth"])
def test_check_config_takes_the_openstack_variables(env, tmp_path):
    code, text = check_config(tmp_path, dict(env))
    assert code == 0, text
    assert_no_secret(text, *[value for key, value in env.items() if "PASSWORD" in key or
                             "SECRET" in key or key == "ST_KEY"])


@pytest.mark.parametrize("env,drop,key", [
    (KEYSTONE_ENV, "OS_PASSWORD", "password"),
    (KEYSTONE_ENV, "OS_PROJECT_NAME", "project_name"),
    (KEYSTONE_ENV, "OS_USERNAME", "username"),
    (KEYSTONE_ENV, "OS_AUTH_URL", "auth_url"),
    (APP_CRED_ENV, "OS_APPLICATION_CREDENTIAL_SECRET", "application_credential_secret"),
    (TEMPAUTH_ENV, "ST_USER", "username"),
])
def test_check_config_names_the_missing_key_in_one_line(env, drop, key, tmp_path):
    env = dict(env)
    del env[drop]
    code, text = check_config(tmp_path, env)
    assert code == 2, text
    lines = text.splitlines()
    assert len(lines) == 1 and "swift_storage.%s" % key in lines[0], lines


def doctor(tmp_path, store):
    with FakeVault(role_id="r", secret_id="s") as vault:
        code, log, out = run_cli(tmp_path, store, "doctor", addr=vault.url)
    return code, log, out


def doctor_line(out, status, check):
    found = [text for text in out.splitlines()
             if text.split(" ", 1)[0] == status and text[6:].startswith(check + " ")]
    assert len(found) == 1, (status, check, out)
    return found[0]


def test_doctor_passes_against_swift_and_leaves_nothing(swift, swift_container, tmp_path):
    store = SwiftStore(swift, swift_container, "doctor")
    code, log, out = doctor(tmp_path, store)
    assert code == 0, out + log
    assert "0 snapshot(s) in" in doctor_line(out, "ok", "swift list")
    assert "wrote, read back and deleted" in doctor_line(out, "ok", "swift write")
    assert store.listing() == []
    assert_no_secret(log + out, swift.key)


def test_doctor_fails_a_wrong_password_naming_the_reason(swift, swift_container, tmp_path):
    wrong = "doctor-wrong-%s" % os.urandom(4).hex()
    code, log, out = doctor(tmp_path, SwiftStore(swift, swift_container, "doctor", password=wrong))
    assert code == 1, out + log
    failed = [text for text in out.splitlines() if text.startswith("FAIL") and "swift" in text]
    assert failed and "Swift tempauth" in failed[0] and "HTTP 401" in failed[0], out
    assert wrong not in out + log


# =============================================================================
# re-verification: verify --storage swift NAME
# =============================================================================


def _damage(store, name, damage, other, large):
    """Someone with write access damages snapshot ``name``: an SLO's second
    segment, a single object's bytes (keeping the agent's SHA-256 with it)."""
    keep = {store.OWN_META: store.own_sha256(name)}
    if damage == "deleted":
        return store.delete(name)
    if damage == "replaced":
        return store.replace_keeping_record(name, other)
    if large:
        path = store.segments(name + "/")[1]
        data = store.request("GET", path).body
    else:
        path, data = store.full(name), store.read(name)
    data = data[:len(data) // 2] if damage == "truncated" else \
        data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x55]) + data[len(data) // 2 + 1:]
    assert store.request("PUT", path, keep if not large else None, data).status == 201


@pytest.mark.parametrize("damage", ["intact", "truncated", "corrupted", "replaced", "deleted"])
@pytest.mark.parametrize("large", [False, True], ids=["single-put", "slo"])
def test_verify_reports_a_damaged_object_and_passes_an_intact_one(large, damage, swift, swift_container,
                                                                  tmp_path):
    store = SwiftStore(swift, swift_container, "scrub", segment_size_mb=1 if large else None)
    snaps = Snapshots()
    name = taken(0.1)
    upload(tmp_path, store, name, snaps.sized(2.5) if large else snaps.small())
    if large:
        assert store.head(name).headers.get("x-static-large-object", "").lower() == "true"
    if damage != "intact":
        _damage(store, name, damage, snaps.small(), large)
    code, log, out = run_cli(tmp_path, store, "verify", "--storage", "swift", name)
    word = "OK" if damage == "intact" else "FAIL"
    found = [line for line in out.splitlines() if re.match(r"%s +swift +%s " % (word, re.escape(name)), line)]
    if damage == "intact":
        assert code == 0 and found and "SHA-256 this agent recorded" in found[0], out + log
    elif damage == "deleted":
        assert code == 1 and re.search(r"ERROR %s in .*: no snapshot of that name" % re.escape(name), log)
    else:
        assert code == 1 and len(found) == 1, out + log
    assert "Traceback" not in log
