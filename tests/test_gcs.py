"""Section "Google Cloud Storage": Google Cloud Storage end to end: real snapshots from the
OpenBao cluster into GCS emulators (gcp-storage-emulator for uploads and
resumable sessions, fake-gcs-server for paginated listings), with the token
sources tested against loopback servers that verify the JWT signature."""

import io
import json

import pytest

import vault_snapshot_agent as vsa
from support.cred_servers import GceMetadataServer, GoogleTokenServer
from support.faultproxy import FaultProxy
from support.harness import run_once, success_location, verify_download
from support.rsa_keys import authorized_user_json, make_rsa_key, service_account_json, write_json

BUCKET = "snapshots"


@pytest.fixture(autouse=True)
def no_google_env(monkeypatch, tmp_path):
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "GCE_METADATA_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))


def run_agent(tmp_path, bao_cluster, approle, block):
    return run_once(tmp_path, bao_cluster.leader().addr, approle, google_storage=block)


def stored(log):
    return success_location(log, "Successfully created google snapshot to gs://%s/" % BUCKET)


def verify(server, name, tmp_path):
    return verify_download(server.get_object(BUCKET, name), tmp_path)


def test_once_stores_an_object_at_the_bucket_root_like_the_go_agent(gcs, bao_cluster, approle,
                                                                    tmp_path):
    code, log = run_agent(tmp_path, bao_cluster, approle,
                          {"bucket": BUCKET, "endpoint": gcs.endpoint, "anonymous": True})
    assert code == 0, log
    name = stored(log)
    assert name.startswith("raft_snapshot-") and "/" not in name
    verify(gcs, name, tmp_path)


def test_resumable_upload_in_several_chunks_with_storage_class(gcs, bao_cluster, approle, kv_data,
                                                               tmp_path):
    block = {"bucket": BUCKET, "endpoint": gcs.endpoint, "anonymous": True, "chunk_size_mb": 1,
             "prefix": "resumable"}
    code, log = run_agent(tmp_path, bao_cluster, approle, block)
    assert code == 0, log
    name = stored(log)
    info = verify(gcs, name, tmp_path)
    assert info.size > 4 * 1024 * 1024
    assert gcs.object_metadata(BUCKET, name)["md5Hash"]


def test_resume_after_chunks_are_cut_and_refused(gcs, bao_cluster, approle, kv_data, tmp_path):
    port = int(gcs.endpoint.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as proxy:
        seen = []

        def second_chunk(method, path):
            # Not the first chunk: before any byte, gcp-storage-emulator answers a
            # status query with "Range: bytes=0-0" where GCS sends no Range.
            if method == "PUT" and "upload_id" in path:
                seen.append(path)
                return len(seen) == 2
            return False
        rule = proxy.fail_requests(second_chunk, status=503, body=b'{"error":{"code":503}}', times=1)
        block = {"bucket": BUCKET, "endpoint": proxy.addr, "anonymous": True, "chunk_size_mb": 1,
                 "prefix": "resumed"}
        original = proxy.cut_after
        cuts = []

        def cut_third_answer():
            # A later chunk reaches the server, its answer is cut: the agent
            # must ask the session how much it has and go on from there.
            puts = [r for r in proxy.requests if r.startswith("PUT")]
            if len(puts) == 4 and not cuts:
                cuts.append(1)
                original(0, times=1)
        real = vsa.Http.request

        def request(self, method, url, *args, **kwargs):
            if method == "PUT" and "upload_id" in url:
                cut_third_answer()
            return real(self, method, url, *args, **kwargs)
        vsa.Http.request = request
        try:
            code, log = run_agent(tmp_path, bao_cluster, approle, block)
        finally:
            vsa.Http.request = real
    assert code == 0, log
    assert rule.hits == 1 and cuts
    assert log.count("asking the session how much it has") == 2
    verify(gcs, stored(log), tmp_path)


def test_permanent_failure_leaves_no_object_and_deletes_nothing(gcs, bao_cluster, approle, kv_data,
                                                                tmp_path):
    old = ["fail/raft_snapshot-%d.snap" % (1700000000000000000 + i) for i in range(3)]
    gcs.put_many(BUCKET, old)
    port = int(gcs.endpoint.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as proxy:
        proxy.fail_requests(lambda m, p: m == "PUT", status=500, body=b'{"error":{"code":500}}')
        block = {"bucket": BUCKET, "endpoint": proxy.addr, "anonymous": True, "chunk_size_mb": 1,
                 "prefix": "fail", "retain": 1}
        code, log = run_agent(tmp_path, bao_cluster, approle, block)
    assert code == 1
    assert "Cancelled resumable upload" in log
    assert gcs.list_objects(BUCKET, "fail/") == sorted(old)


@pytest.mark.slow
def test_retention_over_several_pages(gcs_paging, bao_cluster, approle, tmp_path):
    old = ["pages/raft_snapshot-%d.snap" % (1700000000000000000 + i * 10 ** 9) for i in range(40)]
    foreign = ["pages/notes.txt", "pages/sub/raft_snapshot-1700000000000000000.snap"]
    gcs_paging.put_many(BUCKET, old + foreign)
    block = {"bucket": BUCKET, "endpoint": gcs_paging.endpoint, "anonymous": True, "prefix": "pages",
             "retain": 3, "list_page_size": 7}
    code, log = run_agent(tmp_path, bao_cluster, approle, block)
    assert code == 0, log
    name = stored(log)
    assert sorted(gcs_paging.list_objects(BUCKET, "pages/")) == sorted(
        [name, old[-1], old[-2]] + foreign)
    assert "deleted 38" in log


@pytest.mark.parametrize("fmt", ["pkcs8", "pkcs1"])
def test_service_account_key_file_jwt_is_verified_by_the_token_server(gcs, bao_cluster, approle,
                                                                       tmp_path, fmt):
    private, public, _ = make_rsa_key(2048, fmt)
    with GoogleTokenServer(public) as tokens:
        key_file = tmp_path / "sa.json"
        write_json(str(key_file), service_account_json(private, tokens.token_url))
        port = int(gcs.endpoint.rsplit(":", 1)[1])
        with FaultProxy("127.0.0.1", port) as proxy:
            block = {"bucket": BUCKET, "endpoint": proxy.addr, "credentials_file": str(key_file),
                     "prefix": "sa"}
            code, log = run_agent(tmp_path, bao_cluster, approle, block)
            assert code == 0, log
            assert [g["ok"] for g in tokens.grants] == [True]
            issued = tokens.issued[0]
            assert set(proxy.header_values("Authorization")) == {"Bearer " + issued}
        assert tokens.claims[0]["scope"] == vsa.GCS_SCOPE
    assert issued not in log and "PRIVATE KEY" not in log
    verify(gcs, stored(log), tmp_path)


def test_wrong_key_is_refused_with_a_one_line_hint(gcs, bao_cluster, approle, tmp_path):
    private, _, _ = make_rsa_key(2048, "pkcs8")
    _, other_public, _ = make_rsa_key(2048, "pkcs8")
    with GoogleTokenServer(other_public) as tokens:
        key_file = tmp_path / "sa.json"
        write_json(str(key_file), service_account_json(private, tokens.token_url))
        code, log = run_agent(tmp_path, bao_cluster, approle, {
            "bucket": BUCKET, "endpoint": gcs.endpoint, "credentials_file": str(key_file)})
    assert code == 1
    assert "Google token exchange" in log and "HTTP 400" in log


def test_authorized_user_file_through_application_default(gcs, bao_cluster, approle, tmp_path,
                                                          monkeypatch):
    with GoogleTokenServer(authorized_users={"cid": ("csecret", "1//refresh")}) as tokens:
        adc = tmp_path / "adc.json"
        write_json(str(adc), authorized_user_json("cid", "csecret", "1//refresh",
                                                  token_uri=tokens.token_url))
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
        code, log = run_agent(tmp_path, bao_cluster, approle,
                              {"bucket": BUCKET, "endpoint": gcs.endpoint, "prefix": "adc"})
        assert code == 0, log
        assert tokens.grants[0]["grant_type"] == "refresh_token" and tokens.grants[0]["ok"]
    assert "csecret" not in log and "1//refresh" not in log


def test_metadata_server_token(gcs, bao_cluster, approle, tmp_path, monkeypatch):
    with GceMetadataServer() as metadata:
        monkeypatch.setenv("GCE_METADATA_HOST", metadata.host)
        code, log = run_agent(tmp_path, bao_cluster, approle,
                              {"bucket": BUCKET, "endpoint": gcs.endpoint, "prefix": "gce"})
        assert code == 0, log
        assert len(metadata.token_requests()) == 1
        assert "the GCE metadata server" in log


@pytest.mark.parametrize("content,problem", [
    ("not json", "not valid JSON"),
    (json.dumps({"type": "service_account", "client_email": "a@b", "private_key": "nope"}), "private_key"),
    (json.dumps({"type": "external_account"}), "not supported"),
    (json.dumps({"type": "authorized_user", "client_id": "x"}), "refresh_token"),
])
def test_bad_credentials_file_is_a_config_error(tmp_path, content, problem):
    key_file = tmp_path / "creds.json"
    key_file.write_text(content)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s",
                                  "google_storage": {"bucket": "bkt",
                                                     "credentials_file": str(key_file)}}))
    stream = io.StringIO()
    assert vsa.main(["-c", str(config), "--check-config"], stream=stream) == 2
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "google_storage.credentials_file" in lines[0] and problem in lines[0]
