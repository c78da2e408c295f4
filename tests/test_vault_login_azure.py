"""Section "Vault login methods": the ``azure`` login (a managed identity's
token from IMDS plus where the VM stands, as Vault Agent sends them).

OpenBao has no azure auth method: the end-to-end tests put
login_standin.VaultLoginStandIn in front of the real cluster, judging each
login the way vault-plugin-auth-azure does (azure_vm.vault_azure_check:
the token's RS256 signature by the loopback IMDS's key, ``aud`` == the
mount's resource, not expired, and the subscription, resource group and VM
or scale set the VM's metadata names, bound to the role). The unit tests
use fake_endpoints.FakeVault and hostile loopback IMDS answers: each
failure is one line, exit 1, bounded in time and memory, and no token
reaches the log."""

import json
import os
import time
import urllib.parse

import pytest

import conftest
import vault_snapshot_agent as vsa
from support.azure_vm import MANAGEMENT_RESOURCE, RESOURCE_GROUP, SUBSCRIPTION, AzureVm, vault_azure_check
from support.cred_servers import decode_jwt
from support.fake_endpoints import Endpoint, FakeVault
from support.harness import FakeClock, error_lines, run_main, snapshots, token_lifecycle
from support.login_standin import VaultLoginStandIn
from support.slow_servers import EndlessServer, TrickleServer

ROLE = "snapshot"
USER_ASSIGNED = "6f1c2d3e-0000-4000-8000-00000000eeee"
OTHER_IDENTITY = "7a2b3c4d-0000-4000-8000-00000000ffff"
MB = 1024 * 1024


@pytest.fixture(scope="module")
def tenant_key():
    from support import rsa_keys
    return rsa_keys.make_rsa_key()


def write_config(tmp_path, addr, imds_url, **extra):
    config = {"addr": addr, "vault_auth_method": "azure", "vault_auth_role": ROLE,
              "azure_imds_endpoint": imds_url, "local_storage": {"path": str(tmp_path / "snaps")}}
    config.update(extra)
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(config))
    os.chmod(str(path), 0o600)
    return str(path)


def token_requests(vm):
    return [urllib.parse.parse_qs(urllib.parse.urlsplit(r.path).query) for r in vm.requests
            if r.path.startswith("/metadata/identity/oauth2/token")]


def instance_requests(vm):
    return [r for r in vm.requests if r.path.startswith("/metadata/instance")]


def no_token_in(text, vm, stand_in=None):
    secrets = list(vm.issued) + (list(stand_in.tokens) if stand_in else [])
    conftest.KNOWN_SECRETS.update(secrets)
    for secret in secrets:
        assert secret not in text
    assert "eyJ" not in text        # no JWT, whole or cut


def one_error(log, *parts):
    """The one ERROR line of a failed --once run, holding every part."""
    errors = error_lines(log)
    assert len(errors) == 1, log
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


# -------------------------------------------- end to end, through the stand-in


def run_through_stand_in(bao_cluster, tmp_path, vm, check, **config):
    with vm, VaultLoginStandIn(bao_cluster, "azure", check) as stand_in:
        code, log = run_main("-c", write_config(tmp_path, stand_in.url, vm.url, **config), "--once")
    no_token_in(log, vm, stand_in)
    return code, log, stand_in


def test_azure_login_on_a_vm_stores_a_verified_snapshot(bao_cluster, tenant_key, tmp_path):
    vm = AzureVm(vm_name="vault-1", key=tenant_key)
    check = vault_azure_check(vm, role=ROLE, bound_subscriptions=[SUBSCRIPTION],
                              bound_resource_groups=[RESOURCE_GROUP])
    started = time.monotonic()
    code, log, stand_in = run_through_stand_in(bao_cluster, tmp_path, vm, check)
    assert code == 0, log
    assert "Logged in with azure at auth/azure" in log
    [body] = stand_in.logins
    assert sorted(body) == ["jwt", "resource_group_name", "role", "subscription_id", "vm_name"]
    assert (body["subscription_id"], body["resource_group_name"], body["vm_name"], body["role"]) == \
        (SUBSCRIPTION, RESOURCE_GROUP, "vault-1", ROLE)
    [query] = token_requests(vm)
    assert query == {"api-version": ["2018-02-01"], "resource": [MANAGEMENT_RESOURCE]}
    assert all(r.header("Metadata") == "true" for r in vm.requests) and len(instance_requests(vm)) == 1
    stored = snapshots(tmp_path / "snaps")
    assert len(stored) == 1 and run_main("verify", str(tmp_path / "snaps" / stored[0]))[0] == 0
    print("azure --once cycle (IMDS, login, snapshot): %.2f s" % (time.monotonic() - started))


def test_azure_login_in_a_scale_set_as_a_user_assigned_identity(bao_cluster, tenant_key, tmp_path):
    vm = AzureVm(vm_name="vmss-backup_3", vmss_name="vmss-backup", key=tenant_key,
                 system_assigned=False, client_ids=[OTHER_IDENTITY, USER_ASSIGNED])
    check = vault_azure_check(vm, role=ROLE, bound_scale_sets=["vmss-backup"])
    code, log, stand_in = run_through_stand_in(bao_cluster, tmp_path, vm, check,
                                               azure_client_id=USER_ASSIGNED)
    assert code == 0, log
    [body] = stand_in.logins
    assert body["vmss_name"] == "vmss-backup" and body["vm_name"] == "vmss-backup_3"
    [query] = token_requests(vm)
    assert query["client_id"] == [USER_ASSIGNED]
    assert decode_jwt(body["jwt"])["oid"] == USER_ASSIGNED
    assert len(snapshots(tmp_path / "snaps")) == 1


def test_azure_login_renews_then_logs_in_again_with_a_new_imds_token(bao_cluster, tenant_key, tmp_path):
    # The token lifecycle AppRole has: renew after 2/3 of the TTL (1h here),
    # log in again once past its end. The IMDS token (1 h) is reused until
    # five minutes before it expires, so the second login fetches a new one.
    vm = AzureVm(key=tenant_key)
    with vm, VaultLoginStandIn(bao_cluster, "azure", vault_azure_check(vm, role=ROLE)) as stand_in:
        cfg = vsa.load_config(write_config(tmp_path, stand_in.url, vm.url), env={})
        text = token_lifecycle(cfg, FakeClock())
    assert text.count("Logged in with azure at auth/azure") == 2, text
    assert text.count("Renewed token") == 1, text
    assert len(stand_in.logins) == 2 and len(token_requests(vm)) == 2
    assert len(instance_requests(vm)) == 2
    assert stand_in.logins[0]["jwt"] != stand_in.logins[1]["jwt"]
    no_token_in(text, vm, stand_in)


def _refusals(tenant_key, other_key):
    """(AzureVm, check, agent config, Vault's reason) of logins Vault refuses."""
    expired = AzureVm(key=tenant_key)
    expired.claims_override = {"exp": int(time.time()) - 600}     # IMDS says 3599 s left: it lies
    both = (MANAGEMENT_RESOURCE, MANAGEMENT_RESOURCE.rstrip("/"))
    return {
        "audience without the trailing slash": (
            AzureVm(key=tenant_key, resources=both), None,
            {"azure_resource": MANAGEMENT_RESOURCE.rstrip("/")}, "expected audience"),
        "resource group not bound": (
            AzureVm(key=tenant_key), {"bound_resource_groups": ["rg-other"]}, {},
            "resource group not authorized"),
        "expired token": (expired, None, {}, "token is expired"),
        "signed by another key": (
            AzureVm(key=other_key), {"public_pem": tenant_key.public_pem}, {},
            "failed to verify signature"),
        "another VM named by the keys": (
            AzureVm(key=tenant_key), None,
            {"azure_subscription_id": SUBSCRIPTION, "azure_resource_group_name": RESOURCE_GROUP,
             "azure_vm_name": "vault-2"}, "404 ResourceNotFound"),
        "a VM where a scale set is bound": (
            AzureVm(key=tenant_key), {"bound_scale_sets": ["vmss-backup"]}, {},
            "bound scale set defined but this vm isn't in a scale set"),
    }


@pytest.mark.parametrize("case", ["audience without the trailing slash", "resource group not bound",
                                  "expired token", "signed by another key",
                                  "another VM named by the keys", "a VM where a scale set is bound"])
def test_a_login_vault_refuses_is_one_line(case, bao_cluster, tenant_key, tmp_path):
    from support import rsa_keys
    vm, bindings, config, reason = _refusals(tenant_key, rsa_keys.make_rsa_key())[case]
    check = vault_azure_check(vm, role=ROLE, **(bindings or {}))
    code, log, stand_in = run_through_stand_in(bao_cluster, tmp_path, vm, check, **config)
    assert code == 1 and snapshots(tmp_path / "snaps") == []
    one_error(log, "azure login at auth/azure failed: Vault answered HTTP 400", reason)
    assert len(stand_in.logins) == 1 and stand_in.tokens == []
    if "azure_vm_name" in config:
        assert instance_requests(vm) == []      # the keys named it all: no metadata read


# ------------------------------------------------ unit: the request, the keys


def run_against_fake_vault(tmp_path, imds_url, **config):
    with FakeVault() as vault:
        code, log = run_main("-c", write_config(tmp_path, vault.url, imds_url, **config), "--once")
    logins = [json.loads(r.body.decode("utf-8")) for r in vault.requests if r.path.endswith("/login")]
    return code, log, logins


def test_the_keys_replace_the_instance_metadata_field_by_field(tmp_path):
    with AzureVm(vm_name="vault-1") as vm:
        code, log, logins = run_against_fake_vault(tmp_path, vm.url, azure_vm_name="pinned-vm",
                                                   vault_auth_path="azure-prod")
        assert code == 0, log
        assert len(instance_requests(vm)) == 1
        assert (logins[0]["subscription_id"], logins[0]["vm_name"]) == (SUBSCRIPTION, "pinned-vm")
        assert "Logged in with azure at auth/azure-prod" in log
        vm.clear()
        code, log, logins = run_against_fake_vault(
            tmp_path, vm.url, azure_subscription_id="sub-1", azure_resource_group_name="rg-1",
            azure_vmss_name="ss-1")
        assert code == 0, log
        assert instance_requests(vm) == [] and len(token_requests(vm)) == 1
        assert dict((k, v) for k, v in logins[0].items() if k not in ("jwt", "role")) == \
            {"subscription_id": "sub-1", "resource_group_name": "rg-1", "vmss_name": "ss-1"}
        no_token_in(log, vm)


def test_an_identity_imds_does_not_know_is_one_line(tmp_path):
    with AzureVm(system_assigned=False, client_ids=[USER_ASSIGNED]) as vm:
        code, log, logins = run_against_fake_vault(tmp_path, vm.url, azure_client_id=OTHER_IDENTITY)
    assert code == 1 and logins == []
    one_error(log, "azure login at auth/azure failed: Azure managed identity (IMDS): HTTP 400 "
                   "Identity not found")
    [query] = token_requests(vm)
    assert query["client_id"] == [OTHER_IDENTITY]


def test_the_object_id_picks_the_identity_too(tmp_path):
    with AzureVm(system_assigned=False, client_ids=[OTHER_IDENTITY, USER_ASSIGNED]) as vm:
        code, log, logins = run_against_fake_vault(tmp_path, vm.url, azure_object_id=USER_ASSIGNED)
    assert code == 0, log
    [query] = token_requests(vm)
    assert query["object_id"] == [USER_ASSIGNED] and "client_id" not in query
    assert decode_jwt(logins[0]["jwt"])["oid"] == USER_ASSIGNED
    no_token_in(log, vm)


@pytest.mark.parametrize("answer,reason", [
    ((200, None, {"network": {}}), "answer has no compute object"),
    ((200, None, {"compute": "vault-1"}), "answer has no compute object"),
    ((200, None, {"compute": {"name": "vault-1", "resourceGroupName": RESOURCE_GROUP}}),
     "answer has no compute.subscriptionId (or set azure_subscription_id)"),
    ((200, None, {"compute": {"subscriptionId": SUBSCRIPTION, "resourceGroupName": RESOURCE_GROUP}}),
     "answer has no compute.name (or set azure_vm_name)"),
    ((200, None, {"compute": {"subscriptionId": SUBSCRIPTION, "resourceGroupName": ["rg"],
                              "name": "vault-1"}}), "compute.resourceGroupName is not a plain string"),
    ((200, None, [1, 2]), "answer is not a JSON object"),
    ((200, {"Content-Type": "text/html"}, "<html>captive portal\n</html>"), "answer has no compute object"),
    ((400, None, {"error": "Bad request. api-version is invalid"}), "HTTP 400 Bad request."),
    ((503, {"Content-Type": "text/plain"}, "busy\r\nX-Injected: yes"), "HTTP 503"),
])
def test_instance_metadata_the_login_cannot_use_is_one_line(tmp_path, answer, reason):
    with AzureVm() as vm:
        vm.instance_answer = answer
        code, log, logins = run_against_fake_vault(tmp_path, vm.url)
    assert code == 1 and logins == []
    line = one_error(log, "azure login at auth/azure failed: Azure instance metadata (IMDS)", reason)
    assert "X-Injected" not in log.replace(line, "") and "\r" not in line
    no_token_in(log, vm)


@pytest.mark.parametrize("answer,reason", [
    ({"token_type": "Bearer", "expires_in": "3599"}, "answer has no access token"),
    ({"access_token": 12345, "expires_in": "3599"}, "access_token is not a string"),
    ({"access_token": "eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "expires_in": "0"}, "already expired"),
])
def test_a_token_answer_without_a_usable_token_is_one_line(tmp_path, answer, reason):
    with Endpoint(lambda request: (200, {}, answer)) as imds:
        code, log, logins = run_against_fake_vault(tmp_path, imds.url)
    assert code == 1 and logins == []
    one_error(log, "azure login at auth/azure failed: Azure managed identity (IMDS)", reason)
    assert "eyJ" not in log


@pytest.mark.slow
def test_a_slow_instance_metadata_answer_ends_at_the_request_timeout(tmp_path):
    with AzureVm() as vm:
        vm.instance_hold = True
        started = time.monotonic()
        code, log, logins = run_against_fake_vault(tmp_path, vm.url, request_timeout="1s")
        elapsed = time.monotonic() - started
    assert code == 1 and logins == [] and elapsed < 4, elapsed
    one_error(log, "azure login at auth/azure failed: Azure instance metadata (IMDS): GET",
              "no complete answer within 1s (request_timeout)")
    no_token_in(log, vm)
    print("held instance metadata, request_timeout 1s: failed after %.2f s" % elapsed)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["headers", "body"])
def test_a_trickling_token_answer_ends_at_the_request_timeout(tmp_path, mode):
    with TrickleServer(mode, interval=0.05) as imds:
        started = time.monotonic()
        code, log, logins = run_against_fake_vault(tmp_path, imds.url, request_timeout="1s")
        elapsed = time.monotonic() - started
    assert code == 1 and logins == [] and elapsed < 4, elapsed
    one_error(log, "azure login at auth/azure failed: Azure managed identity (IMDS)",
              "request_timeout")
    print("token answer trickling its %s, request_timeout 1s: failed after %.2f s" % (mode, elapsed))


def test_a_huge_instance_metadata_answer_is_refused(tmp_path):
    with AzureVm() as vm:
        vm.instance_answer = (200, None, b'{"compute": {"name": "' + b"v" * (8 * MB) + b'"}}')
        code, log, logins = run_against_fake_vault(tmp_path, vm.url)
    assert code == 1 and logins == []
    one_error(log, "azure login at auth/azure failed: Azure instance metadata (IMDS)",
              "answer larger than 4.2 MB, refused")
    no_token_in(log, vm)


def test_an_endless_token_answer_is_cut_at_the_json_limit(tmp_path):
    with EndlessServer("random", 1024 * MB) as imds:
        started = time.monotonic()
        code, log, logins = run_against_fake_vault(tmp_path, imds.url)
        elapsed, sent = time.monotonic() - started, imds.sent
    assert code == 1 and logins == []
    one_error(log, "azure login at auth/azure failed: Azure managed identity (IMDS)",
              "answer larger than 4.2 MB, refused")
    assert sent < 32 * MB, sent
    print("endless token answer: refused after %.2f s, %d MiB sent" % (elapsed, sent // MB))


# --------------------------------------------------------------- at load


@pytest.mark.parametrize("change,key", [
    ({"vault_auth_role": None}, "vault_auth_role"),
    ({"azure_client_id": USER_ASSIGNED, "azure_object_id": OTHER_IDENTITY}, "azure_object_id"),
    ({"azure_imds_endpoint": "ftp://169.254.169.254"}, "azure_imds_endpoint"),
    ({"azure_vm_name": "two words"}, "azure_vm_name"),
    ({"azure_resource": 42}, "azure_resource"),
])
def test_bad_azure_settings_are_one_line_at_load(tmp_path, change, key):
    config = {"addr": "http://127.0.0.1:8200", "vault_auth_method": "azure", "vault_auth_role": ROLE,
              "local_storage": {"path": str(tmp_path / "s")}}
    config.update(change)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(dict((k, v) for k, v in config.items() if v is not None)))
    code, log = run_main("-c", str(path), "--check-config")
    errors = error_lines(log)
    assert code == 2 and len(errors) == 1, log
    assert key in errors[0], errors[0]


def test_the_defaults_are_vault_agents(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"addr": "http://127.0.0.1:8200", "vault_auth_method": "azure",
                                "vault_auth_role": ROLE, "local_storage": {"path": str(tmp_path)}}))
    cfg = vsa.load_config(str(path), env={"HTTP_PROXY": "http://proxy.example:3128"})
    assert (cfg.vault_auth_path, cfg.azure_resource, cfg.azure_imds_endpoint) == \
        ("azure", "https://management.azure.com/", "http://169.254.169.254")
    policy = vsa.ProxyPolicy(None, {"HTTP_PROXY": "http://proxy.example:3128"})
    assert policy.for_url(cfg.azure_imds_endpoint + "/metadata/instance") is None
