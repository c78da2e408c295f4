"""Section "Azure Blob storage": Azure Blob storage end to end: real snapshots from the OpenBao
cluster into Microsoft's Azurite, which checks Shared Key and SAS
signatures; bearer tokens from loopback IMDS and Entra token servers against
Azurite over HTTPS with OAuth on."""

import io
import json

import pytest

import vault_snapshot_agent as vsa
from support.azurite import service_sas
from support.cred_servers import DEFAULT_CLIENT_ID, DEFAULT_TENANT, AzureImdsServer, EntraTokenServer
from support.faultproxy import FaultProxy
from support.harness import run_once, success_location, verify_download

from support.storage_blocks import CONTAINER, azure_key_block as key_block

pytestmark = pytest.mark.usefixtures("no_azure_env")


def run_agent(tmp_path, bao_cluster, approle, block):
    return run_once(tmp_path, bao_cluster.leader().addr, approle, azure_storage=block)


def stored(server, log):
    return success_location(log, "Successfully created azure snapshot to %s/%s/"
                            % (server.endpoint, CONTAINER))


def verify(server, blob, tmp_path):
    return verify_download(server.get_blob(CONTAINER, blob), tmp_path)


def test_shared_key_put_blob_downloads_and_verifies(azurite, bao_cluster, approle, tmp_path):
    code, log = run_agent(tmp_path, bao_cluster, approle, key_block(azurite))
    assert code == 0, log
    blob = stored(azurite, log)
    assert blob.startswith("raft_snapshot-")
    verify(azurite, blob, tmp_path)
    assert azurite.key not in log


def test_block_upload_with_prefix_and_tier(azurite, bao_cluster, approle, kv_data, tmp_path):
    code, log = run_agent(tmp_path, bao_cluster, approle,
                          key_block(azurite, block_size_mb=1, prefix="blocks", access_tier="Cool"))
    assert code == 0, log
    blob = stored(azurite, log)
    assert blob.startswith("blocks/")
    assert verify(azurite, blob, tmp_path).size > 4 * 1024 * 1024
    assert log.count("Put Block ") == 0          # no retries or errors were needed
    props = azurite.blob_properties(CONTAINER, blob)
    assert props.get("x-ms-access-tier") == "Cool"


@pytest.mark.slow
def test_retention_over_several_pages(azurite, bao_cluster, approle, tmp_path):
    old = ["pages/raft_snapshot-%d.snap" % (1700000000000000000 + i * 10 ** 9) for i in range(23)]
    foreign = ["pages/readme.txt", "pages/sub/raft_snapshot-1700000000000000000.snap"]
    azurite.put_many(CONTAINER, old + foreign, b"x")
    code, log = run_agent(tmp_path, bao_cluster, approle,
                          key_block(azurite, prefix="pages", retain=3, list_page_size=5))
    assert code == 0, log
    blob = stored(azurite, log)
    assert sorted(azurite.blob_names(CONTAINER, "pages/")) == sorted([blob, old[-1], old[-2]] + foreign)
    assert "deleted 21" in log


def test_sas_token_auth_and_no_signature_in_logs(azurite, bao_cluster, approle, tmp_path):
    sas = service_sas(azurite.account, azurite.key, CONTAINER, permissions="racwdl")
    block = key_block(azurite, account_key=None, sas_token="?" + sas, prefix="sas", retain=1)
    for _ in range(2):
        code, log = run_agent(tmp_path, bao_cluster, approle, block)
        assert code == 0, log
    assert azurite.blob_names(CONTAINER, "sas/") == [stored(azurite, log)]
    signature = [p for p in sas.split("&") if p.startswith("sig=")][0][4:]
    assert signature not in log and "sig=" not in log


def test_expired_sas_is_one_clear_line(azurite, bao_cluster, approle, tmp_path):
    sas = service_sas(azurite.account, azurite.key, CONTAINER, start=-7200, expiry=-3600)
    code, log = run_agent(tmp_path, bao_cluster, approle,
                          key_block(azurite, account_key=None, sas_token=sas, prefix="expired"))
    assert code == 1
    errors = [ln for ln in log.splitlines() if " ERROR " in ln and "Azure Put Blob" in ln]
    assert len(errors) == 1 and "HTTP 403" in errors[0], log


def test_connection_string_auth(azurite, bao_cluster, approle, tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    code, log = run_agent(tmp_path, bao_cluster, approle,
                          {"container_name": CONTAINER, "prefix": "connstr"})
    assert code == 0, log
    verify(azurite, stored(azurite, log), tmp_path)
    assert azurite.key not in log


def test_wrong_key_fails_with_403_and_no_key_in_logs(azurite, bao_cluster, approle, tmp_path):
    wrong = "A" * 86 + "=="
    code, log = run_agent(tmp_path, bao_cluster, approle, key_block(azurite, account_key=wrong))
    assert code == 1
    assert "HTTP 403" in log and wrong not in log


def test_failed_block_leaves_no_blob_and_deletes_nothing(azurite, bao_cluster, approle, kv_data,
                                                         tmp_path):
    old = ["fail/raft_snapshot-%d.snap" % (1700000000000000000 + i) for i in range(3)]
    azurite.put_many(CONTAINER, old, b"x")
    port = int(azurite.endpoint.split(":")[2].split("/")[0])
    with FaultProxy("127.0.0.1", port) as proxy:
        proxy.fail_requests(lambda m, p: m == "PUT" and "comp=block&" in p and "blockid=" in p,
                            status=500, body=b"<Error><Code>InternalError</Code></Error>",
                            content_type="application/xml")
        block = key_block(azurite, endpoint=proxy.addr + "/" + azurite.account, block_size_mb=1,
                          prefix="fail", retain=1)
        code, log = run_agent(tmp_path, bao_cluster, approle, block)
    assert code == 1
    assert sorted(azurite.blob_names(CONTAINER, "fail/")) == sorted(old)


def test_server_busy_and_resets_are_retried(azurite, bao_cluster, approle, tmp_path):
    port = int(azurite.endpoint.split(":")[2].split("/")[0])
    with FaultProxy("127.0.0.1", port) as proxy:
        rule = proxy.fail_requests(lambda m, p: m == "PUT", status=503, times=2,
                                   body=b"<Error><Code>ServerBusy</Code></Error>",
                                   content_type="application/xml")
        proxy.reset(times=1)
        block = key_block(azurite, endpoint=proxy.addr + "/" + azurite.account, prefix="busy")
        code, log = run_agent(tmp_path, bao_cluster, approle, block)
        assert rule.hits == 2
    assert code == 0, log
    assert "ServerBusy" in log
    blobs = azurite.blob_names(CONTAINER, "busy/")
    assert len(blobs) == 1
    verify(azurite, blobs[0], tmp_path)


def oauth_block(server, **extra):
    block = {"account_name": server.account, "container_name": CONTAINER,
             "endpoint": server.endpoint, "ca_cert": server.cert}
    block.update(extra)
    return block


def test_managed_identity_bearer_token(azurite_oauth, bao_cluster, approle, tmp_path):
    with AzureImdsServer() as imds:
        code, log = run_agent(tmp_path, bao_cluster, approle,
                              oauth_block(azurite_oauth, auth_mode="managed_identity",
                                          imds_endpoint=imds.url, prefix="mi"))
        assert code == 0, log
        assert imds.requests[0].header("Metadata") == "true"
        token = imds.issued[0]
    verify(azurite_oauth, stored(azurite_oauth, log), tmp_path)
    assert token not in log


def test_workload_identity_federated_token(azurite_oauth, bao_cluster, approle, tmp_path,
                                           monkeypatch):
    with EntraTokenServer() as entra:
        federated = tmp_path / "federated-token"
        federated.write_text(entra.federated_token)
        monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(federated))
        monkeypatch.setenv("AZURE_CLIENT_ID", DEFAULT_CLIENT_ID)
        monkeypatch.setenv("AZURE_TENANT_ID", DEFAULT_TENANT)
        monkeypatch.setenv("AZURE_AUTHORITY_HOST", entra.authority)
        code, log = run_agent(tmp_path, bao_cluster, approle, oauth_block(azurite_oauth, prefix="wi"))
        assert code == 0, log
        form = entra.form(entra.requests[0])
        assert form["client_assertion_type"] == \
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert "Azure workload identity" in log
    assert entra.federated_token not in log


def test_client_secret(azurite_oauth, bao_cluster, approle, tmp_path):
    with EntraTokenServer() as entra:
        block = oauth_block(azurite_oauth, client_id=DEFAULT_CLIENT_ID, tenant_id=DEFAULT_TENANT,
                            client_secret=entra.client_secret, authority_host=entra.authority,
                            prefix="cs")
        code, log = run_agent(tmp_path, bao_cluster, approle, block)
        assert code == 0, log
    assert entra.client_secret not in log


@pytest.mark.parametrize("block,key", [
    ({"account_name": "acct"}, "container_name"),
    ({"account_name": "acct", "container_name": "Bad_Name"}, "container_name"),
    ({"account_name": "acct", "container_name": "c", "account_key": "not base64!"}, "account_key"),
    ({"account_name": "acct", "container_name": "c", "auth_mode": "sas"}, "sas_token"),
    ({"account_name": "acct", "container_name": "c", "auth_mode": "client_secret"}, "client_id"),
    ({"account_name": "acct", "container_name": "c", "auth_mode": "magic"}, "auth_mode"),
    ({"container_name": "c"}, "account_name"),
    ({"account_name": "acct", "container_name": "c", "connection_string": "garbage"}, "connection_string"),
    ({"account_name": "acct", "container_name": "c", "block_size_mb": 5000}, "block_size_mb"),
])
def test_azure_config_errors_name_the_key(tmp_path, block, key):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s",
                                  "azure_storage": block}))
    stream = io.StringIO()
    assert vsa.main(["-c", str(config), "--check-config"], stream=stream) == 2
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "azure_storage.%s" % key in lines[0], lines
