"""Issue 11, AWS part: AssumeRole (``role_arn`` in aws_storage), shared config
profiles (``source_profile`` chains, ``credential_source``,
``credential_process``, SSO refused) and the refresh of temporary
credentials.

Two halves:

* unit tests (no server but an in-process STS stand-in on loopback; every
  Python 3.6+): what the agent sends to STS (RoleArn, default session name,
  DurationSeconds, ExternalId, a SigV4 signature by the source key), the
  refresh schedule on a FakeClock, ``role_duration`` bounds,
  ``--check-config``, profile loops, SSO profiles, ``credential_process``
  failures and refresh;
* end to end against moto's IAM/STS/S3 with auth on (the ``moto`` fixture):
  an IAM user whose only permission is ``sts:AssumeRole`` on a few roles,
  roles allowed S3 whose trust policies name that user (or, for a refusal,
  another user).  Storing works with ``role_arn`` and is AccessDenied
  without it; refused AssumeRoles name the role and STS's reason; a
  ``source_profile`` chain of two hops, ``credential_source = Environment``
  and ``credential_process`` profiles store.

What moto 5.2 checks with auth on (read in moto/iam/access_control.py and
confirmed by the tests here): the SigV4 signature of every call (STS
included); the caller's identity policies (Action and Resource); for
``sts:AssumeRole`` on an existing role, the role's trust policy against the
caller's ARN, and a *wrong* ``sts:ExternalId``.  What it does not: a
*missing* ExternalId passes a ``StringEquals sts:ExternalId`` condition; an
AssumeRole on a role that does not exist is decided by the identity policy
alone: allowed if the caller's policy names it (or ``*``), and then S3
answers those phantom credentials with a 500 (so the user's policy here
names only the roles that exist, and the "missing role" refusal is the
identity policy's AccessDenied, as on AWS); a trust policy
naming ``arn:aws:iam::<acct>:role/<name>`` does not match that role's
sessions (moto compares with ``arn:aws:sts::<acct>:assumed-role/<name>/
<session>``, so the second hop's trust policy names the session too);
temporary credentials never expire; DurationSeconds is not checked against
the role's maximum; request times are not checked.
"""

import datetime
import io
import json
import os
import socket
import stat
import sys
import threading
import types
from urllib.parse import parse_qs

import pytest

import vault_snapshot_agent as vsa
from support.archives import write_archive
from support.harness import FakeClock, LoopbackServer, clear_cloud_env, error_lines, known_secrets, run_once

UTC = datetime.timezone.utc
BUCKET = "snapshots"
SNAP = "raft_snapshot-20261127T000000.000Z.snap"

# names of the IAM principals this module creates in the session's moto
USER = "backup-assumer"              # only sts:AssumeRole on the roles below
ROLE = "backup-writer"               # S3 on snapshots*; trusts USER
EXT_ROLE = "backup-writer-ext"       # same, trust needs ExternalId EXTERNAL_ID
FOREIGN_ROLE = "backup-writer-foreign"   # S3, but trusts another user (snapshot-agent)
HOP_B = "backup-hop-b"               # trusts USER; may only assume HOP_A
HOP_A = "backup-hop-a"               # S3; trusts HOP_B's session HOP_B_SESSION
HOP_B_SESSION = "hop-b-session"
MISSING_ROLE = "backup-writer-missing"   # never created (and not in USER's policy: moto
#   lets an identity policy that names a missing role assume it, then answers 500 on S3)
EXTERNAL_ID = "ext-7f3a-backup"
ROLE_SESSION_DEFAULT = "vault-snapshot-agent-" + socket.gethostname()


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch, tmp_path):
    """No AWS (or other cloud) variable of ours leaks into the in-process runs."""
    clear_cloud_env(monkeypatch, tmp_path)


# ----------------------------------------------------------------- helpers


def base_env(tmp_path, **extra):
    """An environment for vsa.Runtime: no ~/.aws, no metadata service."""
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
           "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
           "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(tmp_path),
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    env.update(extra)
    return env


def build(tmp_path, aws, env=None, clock=None):
    """The aws storage from a config file with that block, as the agent
    loads it (``vsa.load_all``)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"addr": "http://127.0.0.1:8200", "role_id": "r",
                                "secret_id": "s", "aws_storage": aws}))
    runtime = vsa.Runtime.create(env=env if env is not None else base_env(tmp_path),
                                 clock=clock)
    _, storages = vsa.load_all(str(path), runtime)
    (storage,) = [s for s in storages if s.config_key == "aws_storage"]
    return storage


def archive(tmp_path):
    path = str(tmp_path / "s.snap")
    data = write_archive(path)
    return vsa.verify_file(path), data


def attempt(tmp_path, aws, env=None, clock=None):
    """Load and upload one snapshot: ("stored", location) or ("error", the
    ConfigError/StorageError text).  Either way the text is one line."""
    try:
        storage = build(tmp_path, aws, env, clock)
        info, _ = archive(tmp_path)
        result = ("stored", storage.upload(info, SNAP))
    except (vsa.ConfigError, vsa.StorageError) as exc:
        result = ("error", str(exc))
    assert "\n" not in result[1], result
    return result


def refused(tmp_path, aws, env=None):
    outcome, text = attempt(tmp_path, aws, env)
    assert outcome == "error", text
    return text


def write_ini(path, sections):
    """An AWS-style INI file from [(section, {key: value})]."""
    lines = []
    for name, values in sections:
        lines.append("[%s]" % name)
        lines.extend("%s = %s" % kv for kv in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return str(path)


def script(tmp_path, name, body):
    """An executable python script (this interpreter) in tmp_path."""
    path = tmp_path / name
    path.write_text("#!%s\n%s" % (sys.executable, body))
    os.chmod(str(path), os.stat(str(path)).st_mode | stat.S_IXUSR)
    return str(path)


def process_script(tmp_path, name, creds, counter=None, expiration=None):
    """A credential_process printing Version 1 JSON for ``creds`` (key,
    secret[, token]); appends a line to ``counter`` on every run."""
    doc = {"Version": 1, "AccessKeyId": creds[0], "SecretAccessKey": creds[1]}
    if len(creds) > 2 and creds[2]:
        doc["SessionToken"] = creds[2]
    if expiration is not None:
        doc["Expiration"] = iso(expiration)
    body = "import json\n"
    if counter:
        body += "open(%r, 'a').write('run\\n')\n" % counter
    body += "print(json.dumps(%r))\n" % (doc,)
    return script(tmp_path, name, body)


def iso(when):
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def count_lines(path):
    try:
        with open(path) as handle:
            return len(handle.read().splitlines())
    except OSError:
        return 0


# ------------------------------------------------------ STS stand-in (unit)


class StsStandIn(LoopbackServer):
    """STS ``AssumeRole`` on loopback: records each call's form and
    Authorization header; answers with fresh credentials expiring
    ``lifetime`` after ``clock.now()``, or with ``refuse`` = (status, code,
    message) as STS's XML error."""

    def __init__(self, clock, lifetime=datetime.timedelta(hours=1)):
        LoopbackServer.__init__(self)
        self.clock, self.lifetime = clock, lifetime
        self.calls = []
        self.refuse = None
        self._lock = threading.Lock()

    def answer(self, handler):
        body = handler.read_body().decode("utf-8", "replace")
        form = dict((k, v[-1]) for k, v in parse_qs(body, keep_blank_values=True).items())
        with self._lock:
            self.calls.append({"method": handler.command, "path": handler.path, "form": form,
                               "authorization": handler.headers.get("Authorization", ""),
                               "token": handler.headers.get("X-Amz-Security-Token")})
            number = len(self.calls)
        if self.refuse:
            status, code, message = self.refuse
            return status, {"Content-Type": "text/xml"}, (
                '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
                '<Type>Sender</Type><Code>%s</Code><Message>%s</Message></Error>'
                '<RequestId>req-%d</RequestId></ErrorResponse>' % (code, message, number))
        if form.get("Action") != "AssumeRole":
            return 400, {"Content-Type": "text/xml"}, (
                "<ErrorResponse><Error><Code>InvalidAction</Code><Message>unexpected %s</Message>"
                "</Error></ErrorResponse>" % form.get("Action"))
        role = form.get("RoleArn", "")
        session = form.get("RoleSessionName", "")
        expires = self.clock.now() + self.lifetime
        return 200, {"Content-Type": "text/xml"}, (
            '<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            "<AssumeRoleResult><AssumedRoleUser>"
            "<AssumedRoleId>AROASTANDIN:%s</AssumedRoleId>"
            "<Arn>arn:aws:sts::123456789012:assumed-role/%s/%s</Arn></AssumedRoleUser>"
            "<Credentials><AccessKeyId>ASIASTANDIN%04d</AccessKeyId>"
            "<SecretAccessKey>stand-in-secret-%d</SecretAccessKey>"
            "<SessionToken>stand-in-session-token-%d</SessionToken>"
            "<Expiration>%s</Expiration></Credentials>"
            "</AssumeRoleResult><ResponseMetadata><RequestId>req-%d</RequestId>"
            "</ResponseMetadata></AssumeRoleResponse>"
            % (session, role.rsplit("/", 1)[-1], session, number, number, number,
               iso(expires), number))


ROLE_ARN = "arn:aws:iam::210987654321:role/cross-account-backup"


def unit_block(sts, **extra):
    block = {"s3_bucket": "backups", "s3_region": "eu-west-1", "sts_endpoint": sts.url,
             "access_key_id": "AKIASOURCEUSER", "secret_access_key": "source-user-secret",
             "role_arn": ROLE_ARN}
    block.update(extra)
    return {k: v for k, v in block.items() if v is not None}


def credentials(storage):
    """The storage's current AWS credentials (its credential chain)."""
    return storage.chain.get()


# ------------------------------------------------------------ unit tests


def test_assume_role_request_defaults_and_signature(tmp_path):
    clock = FakeClock()
    with StsStandIn(clock) as sts:
        storage = build(tmp_path, unit_block(sts), clock=clock)
        creds = credentials(storage)
        assert creds.access_key == "ASIASTANDIN0001"
        assert creds.token is not None and creds.expires is not None
        (call,) = sts.calls
    assert call["method"] == "POST"
    form = call["form"]
    assert form["Action"] == "AssumeRole" and form["RoleArn"] == ROLE_ARN
    assert form["RoleSessionName"] == ROLE_SESSION_DEFAULT
    assert form["DurationSeconds"] == "3600"
    assert "ExternalId" not in form
    # signed (SigV4, service sts) with the block's own keys
    assert call["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIASOURCEUSER/")
    assert "/eu-west-1/sts/aws4_request" in call["authorization"]
    assert "source-user-secret" not in repr(creds)


def test_external_id_session_name_and_duration_are_sent(tmp_path):
    clock = FakeClock()
    with StsStandIn(clock) as sts:
        block = unit_block(sts, external_id="ext-42", role_session_name="nightly-backup",
                           role_duration="2h")
        credentials(build(tmp_path, block, clock=clock))
        form = sts.calls[0]["form"]
    assert (form["ExternalId"], form["RoleSessionName"], form["DurationSeconds"]) == \
        ("ext-42", "nightly-backup", "7200")


def test_assumed_role_credentials_are_reused_then_refreshed_before_expiry(tmp_path):
    clock = FakeClock()
    with StsStandIn(clock, lifetime=datetime.timedelta(hours=1)) as sts:
        storage = build(tmp_path, unit_block(sts), clock=clock)
        assert credentials(storage).access_key == "ASIASTANDIN0001"
        clock.advance(datetime.timedelta(minutes=30))
        assert credentials(storage).access_key == "ASIASTANDIN0001"
        assert len(sts.calls) == 1                          # reused at +30 min
        clock.advance(datetime.timedelta(minutes=26))       # +56: inside the 5-minute margin
        assert credentials(storage).access_key == "ASIASTANDIN0002"
        assert len(sts.calls) == 2
        assert credentials(storage).access_key == "ASIASTANDIN0002"
        assert len(sts.calls) == 2
        # the refresh signs with the source keys again, not the role's
        assert "Credential=AKIASOURCEUSER/" in sts.calls[1]["authorization"]
        assert sts.calls[1]["token"] is None


def test_refused_assume_role_is_one_line_naming_role_and_reason(tmp_path):
    clock = FakeClock()
    with StsStandIn(clock) as sts:
        sts.refuse = (403, "AccessDenied", "User: arn:aws:iam::123456789012:user/u is not "
                                           "authorized to perform: sts:AssumeRole on resource: x")
        storage = build(tmp_path, unit_block(sts), clock=clock)
        with pytest.raises(vsa.StorageError) as err:
            credentials(storage)
    text = str(err.value)
    assert "\n" not in text
    assert ROLE_ARN in text and "AccessDenied" in text
    assert "not authorized to perform: sts:AssumeRole" in text
    assert "source-user-secret" not in text


@pytest.mark.parametrize("value,ok", [("10m", False), ("14m59s", False), ("15m", True),
                                      ("1h", True), ("12h", True), ("13h", False)])
def test_role_duration_bounds(tmp_path, value, ok):
    block = {"s3_bucket": "backups", "role_arn": ROLE_ARN, "role_duration": value,
             "access_key_id": "AKIASOURCEUSER", "secret_access_key": "source-user-secret"}
    if ok:
        build(tmp_path, block)
    else:
        with pytest.raises(vsa.ConfigError, match=r"aws_storage\.role_duration"):
            build(tmp_path, block)


def test_check_config_shows_role_and_no_secret(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "addr": "http://127.0.0.1:8200", "role_id": "r", "secret_id": "s",
        "aws_storage": {"s3_bucket": "backups", "s3_region": "eu-west-1", "role_arn": ROLE_ARN,
                        "external_id": "ext-42", "access_key_id": "AKIASOURCEUSER",
                        "secret_access_key": "source-user-secret-value"}}))
    stream = io.StringIO()
    assert vsa.main(["-c", str(path), "--check-config"], stream=stream) == 0, stream.getvalue()
    out = capsys.readouterr().out
    shown = json.loads(out)["aws_storage"]
    assert shown["role_arn"] == ROLE_ARN
    assert shown["role_session_name"] == ROLE_SESSION_DEFAULT
    assert shown["role_duration"] in ("1h", "1h0m0s", 3600, "3600s")
    assert shown["sts_endpoint"] == "https://sts.eu-west-1.amazonaws.com"     # regional
    assert "source-user-secret-value" not in out + stream.getvalue()


def test_role_arn_with_the_chain_as_source(tmp_path):
    """No keys in the block: the chain (here the environment) signs AssumeRole."""
    clock = FakeClock()
    with StsStandIn(clock) as sts:
        env = base_env(tmp_path, AWS_ACCESS_KEY_ID="AKIAFROMENV", AWS_SECRET_ACCESS_KEY="env-secret")
        block = unit_block(sts, access_key_id=None, secret_access_key=None)
        assert credentials(build(tmp_path, block, env, clock)).access_key == "ASIASTANDIN0001"
        assert "Credential=AKIAFROMENV/" in sts.calls[0]["authorization"]


def test_profile_role_keys_are_sent(tmp_path):
    """A config-file role: external_id, role_session_name, duration_seconds
    of the profile; the source profile's static keys sign the call."""
    clock = FakeClock()
    with StsStandIn(clock) as sts:
        creds_file = write_ini(tmp_path / "credentials", [
            ("base", {"aws_access_key_id": "AKIAPROFILEBASE", "aws_secret_access_key": "base-secret"})])
        config = write_ini(tmp_path / "config", [
            ("profile backup", {"role_arn": ROLE_ARN, "source_profile": "base",
                                "external_id": "prof-ext", "role_session_name": "prof-session",
                                "duration_seconds": "900", "region": "eu-central-1"})])
        env = base_env(tmp_path, AWS_CONFIG_FILE=config, AWS_SHARED_CREDENTIALS_FILE=creds_file)
        block = {"s3_bucket": "backups", "sts_endpoint": sts.url, "profile": "backup"}
        storage = build(tmp_path, block, env, clock)
        assert storage.region == "eu-central-1"
        assert credentials(storage).access_key == "ASIASTANDIN0001"
        (call,) = sts.calls
    form = call["form"]
    assert (form["RoleArn"], form["ExternalId"], form["RoleSessionName"], form["DurationSeconds"]) \
        == (ROLE_ARN, "prof-ext", "prof-session", "900")
    assert "Credential=AKIAPROFILEBASE/" in call["authorization"]


@pytest.mark.parametrize("source", ["Ec2InstanceMetadata", "EcsContainer"])
def test_credential_source_metadata_services(tmp_path, source):
    """credential_source Ec2InstanceMetadata / EcsContainer: the metadata
    service's temporary keys (with their session token) sign AssumeRole."""
    from support.cred_servers import ContainerCredentialsServer, ImdsServer
    clock = FakeClock()
    config = write_ini(tmp_path / "config", [
        ("profile meta", {"role_arn": ROLE_ARN, "credential_source": source})])
    server = (ImdsServer(access_key_id="ASIAFROMIMDS", token="imds-session")
              if source == "Ec2InstanceMetadata" else
              ContainerCredentialsServer(access_key_id="ASIAFROMECS", token="ecs-session"))
    with server, StsStandIn(clock) as sts:
        env = base_env(tmp_path, AWS_CONFIG_FILE=config)
        if source == "Ec2InstanceMetadata":
            del env["AWS_EC2_METADATA_DISABLED"]
            env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = server.url
            key, token = "ASIAFROMIMDS", "imds-session"
        else:
            env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = server.full_uri
            key, token = "ASIAFROMECS", "ecs-session"
        block = {"s3_bucket": "backups", "sts_endpoint": sts.url, "profile": "meta"}
        assert credentials(build(tmp_path, block, env, clock)).access_key == "ASIASTANDIN0001"
        (call,) = sts.calls
    assert "Credential=%s/" % key in call["authorization"]
    assert call["token"] == token


def test_profile_loop_is_one_line_naming_the_profiles(tmp_path):
    clock = FakeClock()
    with StsStandIn(clock) as sts:
        config = write_ini(tmp_path / "config", [
            ("profile loop-a", {"role_arn": ROLE_ARN, "source_profile": "loop-b"}),
            ("profile loop-b", {"role_arn": ROLE_ARN, "source_profile": "loop-a"})])
        env = base_env(tmp_path, AWS_CONFIG_FILE=config)
        text = refused(tmp_path, unit_block(sts, access_key_id=None, secret_access_key=None,
                                            role_arn=None, profile="loop-a"), env)
        assert sts.calls == []
    assert "loop-a" in text and "loop-b" in text, text
    assert "loop" in text.lower() or "cycle" in text.lower(), text


def test_sso_profile_is_not_supported_in_one_line(tmp_path):
    config = write_ini(tmp_path / "config", [("profile sso-backup", {
        "sso_start_url": "https://example.awsapps.com/start", "sso_region": "us-east-1",
        "sso_account_id": "123456789012", "sso_role_name": "Backup", "region": "us-east-1"})])
    env = base_env(tmp_path, AWS_CONFIG_FILE=config)
    text = refused(tmp_path, {"s3_bucket": "backups", "s3_endpoint": "http://127.0.0.1:9",
                              "profile": "sso-backup"}, env)
    assert "SSO" in text and "not supported" in text, text
    assert "sso-backup" in text, text


def test_credential_process_failure_shows_stderr_never_stdout(tmp_path):
    leaked = "AKIALEAKEDSTDOUT wJalrXUtnFEMI/K7MDENG/bPxRfiCYSTDOUTSECRET"
    proc = script(tmp_path, "failing-process",
                  "import sys\nsys.stdout.write(%r)\nsys.stderr.write('boom\\n')\nsys.exit(1)\n"
                  % leaked)
    config = write_ini(tmp_path / "config", [("profile proc", {"credential_process": proc})])
    env = base_env(tmp_path, AWS_CONFIG_FILE=config)
    text = refused(tmp_path, {"s3_bucket": "backups", "s3_endpoint": "http://127.0.0.1:9",
                              "profile": "proc"}, env)
    assert "boom" in text, text
    assert "AKIALEAKEDSTDOUT" not in text and "STDOUTSECRET" not in text, text


def test_credential_process_bad_json_does_not_echo_stdout(tmp_path):
    proc = script(tmp_path, "bad-json", "print('not json: supersecretvalue123')\n")
    config = write_ini(tmp_path / "config", [("profile proc", {"credential_process": proc})])
    env = base_env(tmp_path, AWS_CONFIG_FILE=config)
    text = refused(tmp_path, {"s3_bucket": "backups", "s3_endpoint": "http://127.0.0.1:9",
                              "profile": "proc"}, env)
    assert "supersecretvalue123" not in text, text


def test_credential_process_expiration_is_honoured_and_refreshed(tmp_path):
    clock = FakeClock()
    counter = str(tmp_path / "runs")
    proc = process_script(tmp_path, "proc", ("ASIAPROCESS", "process-secret", "process-token"),
                          counter=counter, expiration=clock.now() + datetime.timedelta(hours=1))
    config = write_ini(tmp_path / "config", [("profile proc", {"credential_process": proc})])
    env = base_env(tmp_path, AWS_CONFIG_FILE=config)
    storage = build(tmp_path, {"s3_bucket": "backups", "profile": "proc"}, env, clock)
    creds = credentials(storage)
    assert creds.access_key == "ASIAPROCESS" and creds.token.reveal() == "process-token"
    assert abs((creds.expires - clock.now()).total_seconds() - 3600) < 2
    assert count_lines(counter) == 1
    clock.advance(datetime.timedelta(minutes=30))
    credentials(storage)
    assert count_lines(counter) == 1
    clock.advance(datetime.timedelta(minutes=26))
    credentials(storage)
    assert count_lines(counter) == 2


# ------------------------------------------------------ end to end (moto)


@pytest.fixture(scope="module")
def iam(moto):
    """The module's principals in the session's moto (created once)."""
    from support.moto_s3 import agent_policy_document, policy_document as doc
    arn = moto.role_arn_of
    key, secret = moto.create_user(USER, {"assume-only": doc({
        "Effect": "Allow", "Action": "sts:AssumeRole",
        "Resource": [arn(ROLE), arn(EXT_ROLE), arn(FOREIGN_ROLE), arn(HOP_B)]})})
    s3 = {"snapshot-buckets": agent_policy_document(moto.kms_key_arn)}

    def trust(*principals, **condition):
        statement = {"Effect": "Allow", "Principal": {"AWS": list(principals)},
                     "Action": "sts:AssumeRole"}
        if condition:
            statement["Condition"] = {"StringEquals": condition}
        return doc(statement)

    moto.create_role(ROLE, trust(moto.user_arn(USER)), s3)
    moto.create_role(EXT_ROLE, trust(moto.user_arn(USER), **{"sts:ExternalId": EXTERNAL_ID}), s3)
    moto.create_role(FOREIGN_ROLE, trust(moto.user_arn("snapshot-agent")), s3)
    moto.create_role(HOP_B, trust(moto.user_arn(USER)), {"assume-hop-a": doc({
        "Effect": "Allow", "Action": "sts:AssumeRole", "Resource": arn(HOP_A)})})
    # on AWS the role ARN alone would do; moto compares with the session ARN
    moto.create_role(HOP_A, trust(arn(HOP_B), moto.session_arn(HOP_B, HOP_B_SESSION)), s3)
    known_secrets(secret)
    return types.SimpleNamespace(key=key, secret=secret, role=arn(ROLE), ext_role=arn(EXT_ROLE),
                                 foreign_role=arn(FOREIGN_ROLE), hop_a=arn(HOP_A),
                                 hop_b=arn(HOP_B), missing_role=arn(MISSING_ROLE))


def moto_block(moto, prefix, **extra):
    block = {"s3_endpoint": moto.endpoint, "sts_endpoint": moto.endpoint,
             "s3_region": "us-east-1", "s3_bucket": BUCKET, "s3_key_prefix": prefix}
    block.update(extra)
    return {k: v for k, v in block.items() if v is not None}


def user_block(moto, iam, prefix, **extra):
    return moto_block(moto, prefix, access_key_id=iam.key, secret_access_key=iam.secret, **extra)


def assert_stored(moto, tmp_path, outcome, prefix):
    assert outcome[0] == "stored", outcome[1]
    assert outcome[1] == "s3://%s/%s/%s" % (BUCKET, prefix, SNAP)
    with open(str(tmp_path / "s.snap"), "rb") as handle:
        assert moto.get(BUCKET, "%s/%s" % (prefix, SNAP)) == handle.read()


def run_agent(tmp_path, bao_cluster, approle, aws):
    return run_once(tmp_path, bao_cluster.leader().addr, approle, aws_storage=aws)


def test_once_stores_through_the_role_and_is_denied_without_it(moto, iam, bao_cluster, approle,
                                                               tmp_path):
    moto.delete_all(BUCKET, "role-once/")
    code, log = run_agent(tmp_path, bao_cluster, approle,
                          user_block(moto, iam, "role-once", role_arn=iam.role))
    assert code == 0, log
    line = [ln for ln in log.splitlines() if "Successfully created aws snapshot to s3://" in ln]
    assert len(line) == 1, log
    key = line[0].split("s3://%s/" % BUCKET, 1)[1].strip()
    assert moto.list_keys(BUCKET, "role-once/") == [key]
    assert iam.secret not in log and "Signature=" not in log

    code, log = run_agent(tmp_path, bao_cluster, approle, user_block(moto, iam, "role-once"))
    assert code == 1, log
    denied = [ln for ln in error_lines(log) if "AccessDenied" in ln]
    assert len(denied) == 1, log
    assert "PutObject" in denied[0] or "CreateMultipartUpload" in denied[0], denied
    assert moto.list_keys(BUCKET, "role-once/") == [key]
    assert iam.secret not in log


def test_role_arn_stores_and_without_it_the_user_is_denied(moto, iam, tmp_path):
    assert_stored(moto, tmp_path, attempt(tmp_path, user_block(moto, iam, "role", role_arn=iam.role)),
                  "role")
    text = refused(tmp_path, user_block(moto, iam, "no-role"))
    assert "AccessDenied" in text and "PutObject" in text, text


def test_external_id_is_sent_and_checked(moto, iam, tmp_path):
    ok = attempt(tmp_path, user_block(moto, iam, "ext", role_arn=iam.ext_role,
                                      external_id=EXTERNAL_ID))
    assert_stored(moto, tmp_path, ok, "ext")
    text = refused(tmp_path, user_block(moto, iam, "ext-wrong", role_arn=iam.ext_role,
                                        external_id="not-the-id"))
    assert iam.ext_role in text and "AccessDenied" in text, text


@pytest.mark.parametrize("which", ["missing", "foreign"])
def test_refused_assume_role_names_role_and_sts_reason(moto, iam, tmp_path, which):
    role = iam.missing_role if which == "missing" else iam.foreign_role
    text = refused(tmp_path, user_block(moto, iam, "refused", role_arn=role))
    assert role in text, text
    assert "AccessDenied" in text and "not authorized to perform: sts:AssumeRole" in text, text
    assert iam.secret not in text


def test_wrong_source_secret_gives_the_sts_signature_error(moto, iam, tmp_path):
    wrong = ("x" if iam.secret[0] != "x" else "y") + iam.secret[1:]
    text = refused(tmp_path, moto_block(moto, "wrong", access_key_id=iam.key,
                                        secret_access_key=wrong, role_arn=iam.role))
    assert iam.role in text and "SignatureDoesNotMatch" in text, text
    assert wrong not in text


def test_source_profile_chain_of_two_hops(moto, iam, tmp_path):
    creds = write_ini(tmp_path / "credentials", [
        ("hop-c", {"aws_access_key_id": iam.key, "aws_secret_access_key": iam.secret})])
    config = write_ini(tmp_path / "config", [
        ("profile hop-a", {"role_arn": iam.hop_a, "source_profile": "hop-b"}),
        ("profile hop-b", {"role_arn": iam.hop_b, "source_profile": "hop-c",
                           "role_session_name": HOP_B_SESSION})])
    env = base_env(tmp_path, AWS_CONFIG_FILE=config, AWS_SHARED_CREDENTIALS_FILE=creds)
    assert_stored(moto, tmp_path, attempt(tmp_path, moto_block(moto, "hops", profile="hop-a"), env),
                  "hops")
    # one hop short: hop-b's role may not write to S3
    text = refused(tmp_path, moto_block(moto, "hops-b", profile="hop-b"), env)
    assert "AccessDenied" in text, text


def test_credential_source_environment(moto, iam, tmp_path):
    """``credential_source = Environment`` always comes with AWS_ACCESS_KEY_ID
    in the environment, so it only works if a profile named in the config
    is not pre-empted by the environment provider: botocore drops its
    EnvProvider when the profile is given explicitly (credentials.py,
    "An explicitly provided profile will negate an EnvProvider"; AWS_PROFILE
    alone keeps the environment first)."""
    config = write_ini(tmp_path / "config", [
        ("profile from-env", {"role_arn": iam.role, "credential_source": "Environment"})])
    env = base_env(tmp_path, AWS_CONFIG_FILE=config, AWS_ACCESS_KEY_ID=iam.key,
                   AWS_SECRET_ACCESS_KEY=iam.secret)
    assert_stored(moto, tmp_path,
                  attempt(tmp_path, moto_block(moto, "cred-env", profile="from-env"), env),
                  "cred-env")


def test_credential_process_with_role_credentials(moto, iam, tmp_path):
    role_creds = moto.assume_role(iam.key, iam.secret, iam.role, "process-test")
    known_secrets(role_creds[1], role_creds[2])
    expires = datetime.datetime.now(UTC) + datetime.timedelta(minutes=20)
    proc = process_script(tmp_path, "proc", role_creds[:3], expiration=expires)
    config = write_ini(tmp_path / "config", [("profile proc", {"credential_process": proc})])
    env = base_env(tmp_path, AWS_CONFIG_FILE=config)
    assert_stored(moto, tmp_path, attempt(tmp_path, moto_block(moto, "proc", profile="proc"), env),
                  "proc")


def test_credential_process_as_source_of_a_role(moto, iam, tmp_path):
    proc = process_script(tmp_path, "proc", (iam.key, iam.secret))
    config = write_ini(tmp_path / "config", [
        ("profile proc-src", {"credential_process": proc}),
        ("profile proc-role", {"role_arn": iam.role, "source_profile": "proc-src"})])
    env = base_env(tmp_path, AWS_CONFIG_FILE=config)
    assert_stored(moto, tmp_path,
                  attempt(tmp_path, moto_block(moto, "proc-role", profile="proc-role"), env),
                  "proc-role")


def test_assumed_credentials_refresh_against_moto(moto, iam, tmp_path):
    """FakeClock: the role's credentials (Expiration now + 1 h from moto) are
    reused for uploads at +30 min and fetched again at +56 min; STS calls
    are counted by a recording proxy in front of moto."""
    from support.faultproxy import FaultProxy
    port = int(moto.endpoint.rsplit(":", 1)[1])
    clock = FakeClock()
    with FaultProxy("127.0.0.1", port) as proxy:
        storage = build(tmp_path, user_block(moto, iam, "refresh", role_arn=iam.role,
                                             sts_endpoint=proxy.addr), clock=clock)
        info, _ = archive(tmp_path)

        def sts_calls():
            return [r for r in proxy.requests if r.startswith("POST ")]

        # three names: a write never replaces an object (If-None-Match: *)
        names = [SNAP.replace("000000.000Z", "00000%d.000Z" % i) for i in range(3)]
        storage.upload(info, names[0])
        assert len(sts_calls()) == 1
        clock.advance(datetime.timedelta(minutes=30))
        storage.upload(info, names[1])
        assert len(sts_calls()) == 1
        clock.advance(datetime.timedelta(minutes=26))
        storage.upload(info, names[2])
        assert len(sts_calls()) == 2
    assert moto.list_keys(BUCKET, "refresh/") == ["refresh/" + name for name in names]


def test_sts_goes_through_the_storage_proxy(moto, iam, tmp_path):
    """The storage's ``proxy`` carries its STS calls too (absolute-form
    requests to the http endpoints)."""
    from support.faultproxy import FaultProxy
    port = int(moto.endpoint.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as proxy:
        outcome = attempt(tmp_path, user_block(moto, iam, "via-proxy", role_arn=iam.role,
                                               proxy=proxy.addr))
        lines = list(proxy.requests)
    assert_stored(moto, tmp_path, outcome, "via-proxy")
    assert any(ln.startswith("POST %s/ " % moto.endpoint) for ln in lines), lines
    assert any(ln.startswith("PUT %s/%s/via-proxy/" % (moto.endpoint, BUCKET)) for ln in lines), lines
