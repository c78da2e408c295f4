"""Section "AWS credentials": credentials that a source hands out already expired, or with
an Expiration that is no time at all, are one clear error naming the
source; they never sign a request, and the source is not run again for
every request. Short-lived credentials are used without a run per request.
An Expiration in any ISO 8601 spelling (an offset, a lowercase ``z``) is
read as that instant."""

import datetime
import os
import sys

import pytest

import vault_snapshot_agent as vsa
from support.archives import write_archive
from support.aws_fakes import FakeS3, StsServer
from support.cred_servers import ContainerCredentialsServer, ImdsServer
from support.harness import FakeClock, FakeSignals

UTC = vsa.UTC
NO_FILES = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/c", "AWS_CONFIG_FILE": "/nonexistent/f"}
YEAR_ONE = "0001-01-01T00:00:00Z"


def iso(when):
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def process_profile(tmp_path, expiration):
    """(env, run counter path) for a profile whose credential_process
    prints credentials with ``expiration`` (any JSON value) and counts runs."""
    counter = tmp_path / "runs"
    doc = {"Version": 1, "AccessKeyId": "ASIAPROC", "SecretAccessKey": "proc-secret",
           "SessionToken": "proc-token", "Expiration": expiration}
    script = tmp_path / "helper"
    script.write_text("#!%s\nimport json\nopen(%r, 'a').write('run\\n')\nprint(json.dumps(%r))\n"
                      % (sys.executable, str(counter), doc))
    os.chmod(str(script), 0o755)
    config = tmp_path / "config"
    config.write_text("[profile proc]\ncredential_process = %s\n" % script)
    env = dict(NO_FILES, AWS_CONFIG_FILE=str(config), AWS_EC2_METADATA_DISABLED="true")
    return env, counter


def runs(counter):
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def process_chain(env, clock):
    return vsa.AwsCredentialChain(None, env, "us-east-1", "proc", vsa.Http(None, 5.0), clock,
                                  profile_given=True)


def test_expired_process_credentials_are_one_held_error(tmp_path):
    clock = FakeClock()
    env, counter = process_profile(tmp_path, iso(clock.now() - datetime.timedelta(hours=1)))
    aws = process_chain(env, clock)
    for _ in range(50):             # fifty requests of one upload
        with pytest.raises(vsa.StorageError) as caught:
            aws.get()
        assert "credentials were refreshed, but the refreshed credentials are still expired" \
            in str(caught.value)
        assert "credential_process of AWS profile 'proc'" in str(caught.value)
    assert runs(counter) == 1       # before: fifty runs, and expired keys signing
    clock.advance(vsa.CREDENTIAL_ERROR_HOLD + 1)
    with pytest.raises(vsa.StorageError):
        aws.get()
    assert runs(counter) == 2


def test_expired_credentials_never_sign_an_upload(tmp_path):
    clock = FakeClock()
    env, counter = process_profile(tmp_path, iso(clock.now() - datetime.timedelta(minutes=1)))
    with FakeS3() as s3:
        cfg = vsa.config_from_dict({"addr": "http://127.0.0.1:8200", "role_id": "r",
                                    "secret_id": "s", "aws_storage": s3.storage_block(
                                        access_key_id=None, secret_access_key=None,
                                        profile="proc")}, env=env)
        runtime = vsa.Runtime(env, clock, FakeSignals())
        storage = vsa.build_storages(cfg, runtime)[0]
        path = str(tmp_path / "s.snap")
        write_archive(path)
        with pytest.raises(vsa.StorageError, match="still expired"):
            storage.upload(vsa.verify_file(path), "raft_snapshot-20261127T000000.000Z.snap")
        assert s3.requests == []
    assert runs(counter) == 1


def test_short_lived_credentials_are_not_fetched_for_every_request(tmp_path):
    # IMDS hands out credentials with minutes left before it rotates them:
    # inside the refresh margin, but good to sign with until they expire.
    clock = FakeClock()
    env, counter = process_profile(tmp_path, iso(clock.now() + datetime.timedelta(minutes=3)))
    aws = process_chain(env, clock)
    for _ in range(50):
        assert aws.get().access_key == "ASIAPROC"
        clock.advance(1)
    assert runs(counter) <= 3, runs(counter)      # before: fifty runs


@pytest.mark.parametrize("expiration,shown", [
    (YEAR_ONE, "0001-01-01T00:00:00Z"), (1700000000, "of type int"), ([], "of type list"),
    ("1999-12-31T23:59:59Z", "1999-12-31T23:59:59Z"), ("tomorrow", "tomorrow"),
])
def test_absurd_process_expiration_is_one_error_naming_the_source(tmp_path, expiration, shown):
    clock = FakeClock()
    env, counter = process_profile(tmp_path, expiration)
    aws = process_chain(env, clock)
    for _ in range(3):
        with pytest.raises(vsa.StorageError) as caught:      # before: OverflowError, AttributeError
            aws.get()
        text = str(caught.value)
        assert "credential_process of AWS profile 'proc': unreadable Expiration" in text, text
        assert shown in text, text
    assert runs(counter) == 1


@pytest.mark.parametrize("spelling", ["+02:00", "-05:00", "lowercase z"])
def test_credential_process_expiration_with_an_offset_or_lowercase_z_is_read_as_that_instant(
        tmp_path, spelling):
    # credential_process prints ISO 8601 (botocore reads any offset with
    # dateutil): Python's own isoformat() of an aware local time writes
    # "+02:00"; RFC 3339 allows a lowercase "z". Valid credentials valid for
    # another hour were refused as "unreadable Expiration", so the storage
    # failed every cycle.
    clock = FakeClock(datetime.datetime(2026, 1, 1, 0, 16, 40, tzinfo=UTC))
    expires = clock.now() + datetime.timedelta(hours=1)
    if spelling == "lowercase z":
        text = expires.strftime("%Y-%m-%dT%H:%M:%Sz")
    else:
        sign = 1 if spelling[0] == "+" else -1
        offset = datetime.timezone(sign * datetime.timedelta(hours=int(spelling[1:3])))
        text = expires.astimezone(offset).isoformat()
    env, _ = process_profile(tmp_path, text)
    creds = process_chain(env, clock).get()     # raised StorageError: unreadable Expiration
    assert creds.access_key == "ASIAPROC"
    assert creds.expires == expires, (text, creds.expires)


@pytest.mark.parametrize("expiration", [YEAR_ONE, "past"])
def test_imds_with_expired_or_absurd_expiration(expiration):
    clock = FakeClock()
    when = YEAR_ONE if expiration == YEAR_ONE else iso(clock.now() - datetime.timedelta(hours=2))
    with ImdsServer(expiration=when) as imds:
        aws = vsa.AwsCredentialChain(None, dict(NO_FILES), "us-east-1", None, vsa.Http(None, 5.0),
                                     clock, imds_endpoint=imds.url)
        for _ in range(5):
            with pytest.raises(vsa.StorageError, match=r"EC2 instance metadata \(snapshot-instance-"
                                                       r"role\): (unreadable|credentials were)"):
                aws.get()
        assert len(imds.requests) == 3        # token, role, credentials: once


class NumericExpiry(ContainerCredentialsServer):
    def credentials_document(self):
        doc = ContainerCredentialsServer.credentials_document(self)
        doc["Expiration"] = 1700000000
        return doc


@pytest.mark.parametrize("server", ["year-one", "numeric", "past"])
def test_container_endpoint_with_expired_or_absurd_expiration(server):
    clock = FakeClock()
    past = iso(clock.now() - datetime.timedelta(seconds=5))
    make = {"year-one": lambda: ContainerCredentialsServer(expiration=YEAR_ONE),
            "numeric": NumericExpiry,
            "past": lambda: ContainerCredentialsServer(expiration=past)}[server]
    with make() as endpoint:
        env = dict(NO_FILES, AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoint.full_uri)
        aws = vsa.AwsCredentialChain(None, env, "us-east-1", None, vsa.Http(None, 5.0), clock)
        for _ in range(5):
            with pytest.raises(vsa.StorageError, match=r"^container credentials: "):
                aws.get()
        assert len(endpoint.requests) == 1


@pytest.mark.parametrize("via", ["role_arn", "web identity"])
def test_sts_answering_expired_credentials(tmp_path, via):
    clock = FakeClock()
    with StsServer(iso(clock.now() - datetime.timedelta(minutes=10))) as sts:
        env = dict(NO_FILES, AWS_EC2_METADATA_DISABLED="true")
        role = None
        if via == "role_arn":
            role = vsa.AwsRole("arn:aws:iam::123456789012:role/backup", None, "s", 3600)
            static = vsa.AwsCredentials("AKIASRC", vsa.Secret("src"), None, None, "aws_storage keys")
        else:
            static = None
            token = tmp_path / "jwt"
            token.write_text("header.payload.signature")
            env.update(AWS_ROLE_ARN="arn:aws:iam::123456789012:role/irsa",
                       AWS_WEB_IDENTITY_TOKEN_FILE=str(token))
        aws = vsa.AwsCredentialChain(static, env, "us-east-1", None, vsa.Http(None, 5.0), clock,
                                     sts_endpoint=sts.url, role=role)
        for _ in range(5):
            with pytest.raises(vsa.StorageError, match="still expired"):
                aws.get()
        assert sts.calls == 1


def test_fresh_credentials_after_an_expired_answer_are_used(tmp_path):
    clock = FakeClock()
    with ImdsServer(expiration=iso(clock.now() - datetime.timedelta(hours=1))) as imds:
        aws = vsa.AwsCredentialChain(None, dict(NO_FILES), "us-east-1", None, vsa.Http(None, 5.0),
                                     clock, imds_endpoint=imds.url)
        with pytest.raises(vsa.StorageError, match="still expired"):
            aws.get()
        imds.set_credentials(access_key_id="ASIAFRESH",
                             expiration=clock.now() + datetime.timedelta(hours=6))
        clock.advance(vsa.CREDENTIAL_ERROR_HOLD)
        assert aws.get().access_key == "ASIAFRESH"
