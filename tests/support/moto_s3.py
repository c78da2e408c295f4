"""Run a real ``moto_server`` (S3, IAM, STS, KMS) on loopback for the S3
storage tests, with request-signature checking switched on.

Works on Python 3.6+.  Importing this module needs only the stdlib; botocore
(installed with ``moto[server]``) is imported when a client is first needed,
so the unit-test venvs without moto can still collect the tests that use it
(they skip).

Typical use::

    moto = MotoServer("/tmp/somewhere")
    moto.start()          # moto_server -H 127.0.0.1 -p <free port>, own session
    moto.setup()          # IAM users + keys, buckets, KMS key, STS creds (auth off)
    moto.enable_auth()    # from now on every request must be correctly signed
    ...                   # agent talks to moto.endpoint with moto.access_key_id
    moto.list_keys("snapshots", "prefix/")
    moto.stop()           # by PID; idempotent; also runs at exit

What ``setup()`` creates (account 123456789012, region us-east-1):

* IAM user ``snapshot-agent`` with an inline policy allowing ``s3:*`` on
  ``arn:aws:s3:::snapshots*`` and ``arn:aws:s3:::snapshots*/*`` (plus the KMS
  data-key actions a real SSE-KMS upload needs): ``access_key_id`` /
  ``secret_access_key``;
* IAM user ``no-s3-access`` with no policy at all: ``denied_access_key_id`` /
  ``denied_secret_access_key``;
* IAM user ``moto-admin`` allowed ``*`` on ``*``; the inspection helpers
  (``list_keys``, ``get``, ``head``, ...) sign with it, so they keep working
  once auth is on: ``admin_access_key_id`` / ``admin_secret_access_key``;
* buckets ``snapshots`` and ``snapshots-kms`` in us-east-1 and ``snapshots-eu``
  in eu-west-1 (``OTHER_REGION``; for wrong-region tests);
* a symmetric KMS key: ``kms_key_id`` (key id) and ``kms_key_arn``;
* role ``snapshot-role`` (trust: ``sts:AssumeRoleWithWebIdentity`` from an OIDC
  provider, inline policy like the agent user's) and STS credentials for it
  from ``AssumeRoleWithWebIdentity``: ``web_identity`` =
  ``(access_key_id, secret_access_key, session_token, expiration)`` where
  expiration is an aware ``datetime``.  moto answers that (unsigned) call only
  while auth is off, hence here.

Auth switching goes through moto's ``POST /moto-api/reset-auth`` whose body is
the number of requests still let through unchecked: ``0`` turns checking on
at once, ``inf`` turns it off.  With it on, an unknown access key gives
``InvalidAccessKeyId`` (403), a wrong signature ``SignatureDoesNotMatch`` (403)
and a missing permission ``AccessDenied`` (403).
"""

import datetime
import json
import os
import sys

import urllib.error as _urlerr
import urllib.request as _urlreq

from support.harness import ServerProcess, child_env

__all__ = ["MotoServer", "MotoServerError", "find_moto_server", "ACCOUNT_ID", "policy_document",
           "REGION", "OTHER_REGION", "ROOT_ACCESS_KEY", "ROOT_SECRET_KEY"]

ACCOUNT_ID = "123456789012"          # moto's default account
REGION = "us-east-1"
OTHER_REGION = "eu-west-1"

# Any key pair is accepted while auth is off; these are AWS's documented
# example credentials (not an IAM user in moto, so useless once auth is on).
ROOT_ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
ROOT_SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

AGENT_USER = "snapshot-agent"
DENIED_USER = "no-s3-access"
ADMIN_USER = "moto-admin"
ROLE_NAME = "snapshot-role"
OIDC_HOST = "oidc.snapshot-agent.test"
BUCKETS = ("snapshots", "snapshots-kms")
OTHER_REGION_BUCKET = "snapshots-eu"

DEFAULT_START_TIMEOUT = 60.0


class MotoServerError(RuntimeError):
    """moto_server did not start, or a setup step failed."""


def find_moto_server(path=None):
    """Path of the ``moto_server`` script: explicit, ``$MOTO_SERVER``, next to
    ``sys.executable`` (the venv running the tests), then PATH."""
    import shutil

    if path:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
        raise MotoServerError("moto_server not found or not executable: %s" % path)
    candidates = [os.environ.get("MOTO_SERVER"),
                  os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "moto_server"),
                  shutil.which("moto_server")]
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    raise MotoServerError("moto_server not found (pip install 'moto[server]')")


def _policy(*statements):
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


policy_document = _policy          # public name: a policy JSON from statements


def agent_policy_document(kms_key_arn="*"):
    """The policy given to the agent user and to the web-identity role."""
    return _policy(
        {"Sid": "SnapshotBuckets", "Effect": "Allow", "Action": "s3:*",
         "Resource": ["arn:aws:s3:::snapshots*", "arn:aws:s3:::snapshots*/*"]},
        {"Sid": "SnapshotKmsKey", "Effect": "Allow",
         "Action": ["kms:GenerateDataKey", "kms:Decrypt", "kms:DescribeKey"],
         "Resource": kms_key_arn},
    )


class MotoServer(ServerProcess):
    """One ``moto_server`` process on 127.0.0.1:<free port>, in its own
    session (harness.ServerProcess: ``start()`` retries on another port if
    the chosen one was taken; ``stop()`` by PID, idempotent, also at exit)."""

    label = "moto_server"
    error = MotoServerError
    start_timeout = DEFAULT_START_TIMEOUT

    def __init__(self, workdir, moto_server=None, port=None):
        self.workdir = os.path.abspath(workdir)
        if not os.path.isdir(self.workdir):
            os.makedirs(self.workdir)
        ServerProcess.__init__(self, os.path.join(self.workdir, "moto_server.log"),
                               cwd=self.workdir, port=port)
        self.moto_server = moto_server
        self.auth_enabled = False
        self.region = REGION
        self.buckets = BUCKETS
        self.other_region_bucket = OTHER_REGION_BUCKET
        self.access_key_id = self.secret_access_key = None
        self.denied_access_key_id = self.denied_secret_access_key = None
        self.admin_access_key_id = self.admin_secret_access_key = None
        self.kms_key_id = self.kms_key_arn = None
        self.role_arn = None
        self.web_identity = None
        self._admin = None

    # ------------------------------------------------------------- lifecycle

    def command(self):
        return [find_moto_server(self.moto_server), "-H", "127.0.0.1", "-p", str(self.port)]

    def environment(self):
        return child_env(drop=("INITIAL_NO_AUTH_ACTION_COUNT",), drop_prefixes=("AWS_",),
                         PYTHONUNBUFFERED="1")

    def ready(self):
        try:
            with _urlreq.urlopen(self.endpoint + "/moto-api/", timeout=2) as resp:
                resp.read()
        except _urlerr.HTTPError:
            pass            # any HTTP answer means the WSGI app is serving
        return True

    def stop(self, timeout=10.0):
        """SIGTERM the server's process group (reloader children too), SIGKILL
        after ``timeout``.  Idempotent."""
        ServerProcess.stop(self, timeout)
        self._admin = None

    # ------------------------------------------------------------------ auth

    def _reset_auth(self, value):
        req = _urlreq.Request(self.endpoint + "/moto-api/reset-auth",
                              data=str(value).encode(), method="POST",
                              headers={"Content-Type": "text/plain"})
        with _urlreq.urlopen(req, timeout=10) as resp:
            body = json.loads(resp.read().decode("utf-8"))
        if body.get("status") != "ok":
            raise MotoServerError("reset-auth %s: %r" % (value, body))
        return body

    def enable_auth(self):
        """Check every request's signature and IAM permissions from now on."""
        self._reset_auth("0")
        self.auth_enabled = True

    def disable_auth(self):
        """Accept any credentials again (moto's default)."""
        self._reset_auth("inf")
        self.auth_enabled = False

    # --------------------------------------------------------------- clients

    def _botocore_client(self, service, access_key, secret, token=None,
                         region=None, **config):
        import botocore.config
        import botocore.session

        session = botocore.session.Session()
        opts = {"retries": {"max_attempts": 1}, "connect_timeout": 10,
                "read_timeout": 60, "max_pool_connections": 32}
        if service == "s3":
            opts["s3"] = {"addressing_style": "path"}
            opts["signature_version"] = "s3v4"
        opts.update(config)
        return session.create_client(
            service, region_name=region or self.region, endpoint_url=self.endpoint,
            aws_access_key_id=access_key, aws_secret_access_key=secret,
            aws_session_token=token, config=botocore.config.Config(**opts),
        )

    def client(self, access_key, secret, token=None, region=None, **config):
        """A botocore S3 client for the endpoint (path-style, SigV4, no
        retries).  ``config`` goes to ``botocore.config.Config``."""
        return self._botocore_client("s3", access_key, secret, token, region, **config)

    def service_client(self, service, access_key=None, secret=None, token=None, region=None):
        """A botocore client for another moto service (iam, sts, kms, ...);
        root example keys by default (valid only while auth is off)."""
        return self._botocore_client(service, access_key or ROOT_ACCESS_KEY,
                                     secret or ROOT_SECRET_KEY, token, region)

    def agent_client(self, **config):
        return self.client(self.access_key_id, self.secret_access_key, **config)

    @property
    def wrong_secret_access_key(self):
        """The agent user's secret with its first character changed: same
        length and alphabet, never equal (moto's secrets are random, so a fixed
        replacement character would match one run in sixty-four)."""
        first = self.secret_access_key[0]
        return ("x" if first != "x" else "y") + self.secret_access_key[1:]

    @property
    def admin(self):
        """S3 client used by the inspection helpers (admin user once set up,
        root example keys before)."""
        if self._admin is None:
            if self.admin_access_key_id:
                self._admin = self.client(self.admin_access_key_id, self.admin_secret_access_key)
            else:
                self._admin = self.client(ROOT_ACCESS_KEY, ROOT_SECRET_KEY)
        return self._admin

    # ----------------------------------------------------------------- setup

    def setup(self):
        """Create users, keys, buckets, KMS key and STS credentials.  Must run
        while auth is still off (right after ``start()``)."""
        if self.auth_enabled:
            raise MotoServerError("setup() needs auth off; call it before enable_auth()")
        iam = self.service_client("iam")
        kms = self.service_client("kms")

        key = kms.create_key(Description="snapshot-agent test key",
                             KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]
        self.kms_key_id, self.kms_key_arn = key["KeyId"], key["Arn"]

        policy = agent_policy_document(self.kms_key_arn)
        self.access_key_id, self.secret_access_key = self._make_user(
            iam, AGENT_USER, {"snapshot-buckets": policy})
        self.denied_access_key_id, self.denied_secret_access_key = self._make_user(
            iam, DENIED_USER, {})
        self.admin_access_key_id, self.admin_secret_access_key = self._make_user(
            iam, ADMIN_USER,
            {"everything": _policy({"Effect": "Allow", "Action": "*", "Resource": "*"})})
        self._admin = None

        for name in self.buckets:
            self.admin.create_bucket(Bucket=name)
        self.client(self.admin_access_key_id, self.admin_secret_access_key,
                    region=OTHER_REGION).create_bucket(
            Bucket=self.other_region_bucket,
            CreateBucketConfiguration={"LocationConstraint": OTHER_REGION})

        provider = iam.create_open_id_connect_provider(
            Url="https://" + OIDC_HOST, ClientIDList=["sts.amazonaws.com"],
            ThumbprintList=["9e99a48a9960b14926bb7f3b02e22da2b0ab7280"],
        )["OpenIDConnectProviderArn"]
        trust = _policy({
            "Effect": "Allow", "Principal": {"Federated": provider},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {"StringEquals": {OIDC_HOST + ":aud": "sts.amazonaws.com"}},
        })
        self.role_arn = iam.create_role(RoleName=ROLE_NAME,
                                        AssumeRolePolicyDocument=trust)["Role"]["Arn"]
        iam.put_role_policy(RoleName=ROLE_NAME, PolicyName="snapshot-buckets",
                            PolicyDocument=policy)
        self.web_identity = self.assume_role_with_web_identity()
        return self

    def _make_user(self, iam, name, inline_policies):
        iam.create_user(UserName=name)
        for pname, doc in sorted(inline_policies.items()):
            iam.put_user_policy(UserName=name, PolicyName=pname, PolicyDocument=doc)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def assume_role_with_web_identity(self, token="header.payload.signature",
                                      session_name="snapshot-agent", duration=3600):
        """STS credentials for ``snapshot-role``: (key, secret, session token,
        expiration).  moto serves the unsigned call only with auth off, so
        auth is switched off around it if needed."""
        was_on = self.auth_enabled
        if was_on:
            self.disable_auth()
        try:
            sts = self.service_client("sts")
            creds = sts.assume_role_with_web_identity(
                RoleArn=self.role_arn, RoleSessionName=session_name,
                WebIdentityToken=token, DurationSeconds=duration,
            )["Credentials"]
        finally:
            if was_on:
                self.enable_auth()
        exp = creds["Expiration"]
        if isinstance(exp, datetime.datetime) and exp.tzinfo is None:
            exp = exp.replace(tzinfo=datetime.timezone.utc)
        return (creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"], exp)

    # ------------------------------------------------- more IAM principals
    #
    # For the AssumeRole tests (tests/test_aws_roles.py).  These work with
    # auth on or off: the IAM calls are signed with the admin user's keys.
    #
    # What moto 5.x checks once auth is on (moto/iam/access_control.py):
    # the caller's signature; for sts:AssumeRole on an *existing* role both
    # the caller's identity policies (Action and Resource) and the role's
    # trust policy (Principal ``{"AWS": ...}`` compared as a string with the
    # caller's ARN -- ``arn:aws:iam::<acct>:user/<name>`` for a user,
    # ``arn:aws:sts::<acct>:assumed-role/<role>/<session>`` for a role
    # session, so a trust policy naming ``...:role/<role>`` or the account
    # root does NOT match a session the way it does on AWS; a Condition on
    # ``sts:ExternalId`` refuses a wrong id but lets a missing one pass); an
    # AssumeRole on a role that does not exist is decided by the caller's
    # identity policy alone (moto then hands out credentials for the phantom
    # role, and S3 answers them with a 500).  Temporary credentials never
    # expire in moto (the Expiration is only reported), DurationSeconds is
    # not checked against the role's MaxSessionDuration, and request times
    # (X-Amz-Date skew) are not checked.

    def iam_admin(self):
        """An IAM client signed with the admin user's keys."""
        return self.service_client("iam", self.admin_access_key_id, self.admin_secret_access_key)

    def user_arn(self, name):
        return "arn:aws:iam::%s:user/%s" % (ACCOUNT_ID, name)

    def role_arn_of(self, name):
        return "arn:aws:iam::%s:role/%s" % (ACCOUNT_ID, name)

    @staticmethod
    def session_arn(role_name, session_name):
        """The ARN moto gives a role session (what its trust check compares)."""
        return "arn:aws:sts::%s:assumed-role/%s/%s" % (ACCOUNT_ID, role_name, session_name)

    def create_user(self, name, inline_policies=None):
        """A new IAM user with ``inline_policies`` ({name: JSON document})
        and one access key: (access key id, secret access key)."""
        return self._make_user(self.iam_admin(), name, inline_policies or {})

    def create_role(self, name, trust_document, inline_policies=None):
        """A new IAM role with that trust policy and inline policies; its ARN."""
        iam = self.iam_admin()
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust_document)["Role"]["Arn"]
        for pname, doc in sorted((inline_policies or {}).items()):
            iam.put_role_policy(RoleName=name, PolicyName=pname, PolicyDocument=doc)
        return arn

    def update_trust(self, role_name, trust_document):
        self.iam_admin().update_assume_role_policy(RoleName=role_name,
                                                   PolicyDocument=trust_document)

    def assume_role(self, access_key, secret, role_arn, session_name="snapshot-test",
                    token=None, external_id=None, duration=3600):
        """sts:AssumeRole signed with the given credentials (auth stays as it
        is): (access key id, secret, session token, aware expiration)."""
        sts = self.service_client("sts", access_key, secret, token)
        kwargs = {"RoleArn": role_arn, "RoleSessionName": session_name,
                  "DurationSeconds": duration}
        if external_id is not None:
            kwargs["ExternalId"] = external_id
        creds = sts.assume_role(**kwargs)["Credentials"]
        exp = creds["Expiration"]
        if isinstance(exp, datetime.datetime) and exp.tzinfo is None:
            exp = exp.replace(tzinfo=datetime.timezone.utc)
        return (creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"], exp)

    # ------------------------------------------------------------ inspection

    def list_keys(self, bucket, prefix=""):
        """All keys under ``prefix``, sorted (follows continuation tokens)."""
        keys = []
        kwargs = {"Bucket": bucket, "Prefix": prefix}
        while True:
            page = self.admin.list_objects_v2(**kwargs)
            keys.extend(o["Key"] for o in page.get("Contents", ()))
            if not page.get("IsTruncated"):
                return sorted(keys)
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def get(self, bucket, key):
        return self.admin.get_object(Bucket=bucket, Key=key)["Body"].read()

    def head(self, bucket, key):
        """HeadObject response (``ContentLength``, ``ServerSideEncryption``,
        ``SSEKMSKeyId``, ``Metadata``, ``ResponseMetadata.HTTPHeaders``...)."""
        return self.admin.head_object(Bucket=bucket, Key=key)

    def list_multipart_uploads(self, bucket, prefix=""):
        """In-progress multipart uploads: list of {Key, UploadId, ...}."""
        return self.admin.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])

    def put(self, bucket, key, body=b"x", **kwargs):
        return self.admin.put_object(Bucket=bucket, Key=key, Body=body, **kwargs)

    def delete_all(self, bucket, prefix=""):
        """Delete every object (and abort every upload) under ``prefix``."""
        for up in self.list_multipart_uploads(bucket, prefix):
            self.admin.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
        keys = self.list_keys(bucket, prefix)
        for i in range(0, len(keys), 1000):
            self.admin.delete_objects(Bucket=bucket, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
        return len(keys)

    def put_many(self, bucket, keys, body=b"x", threads=16):
        """Create many small objects quickly (a thread pool sharing one
        client).  Returns the number created."""
        from concurrent.futures import ThreadPoolExecutor

        client = self.admin
        keys = list(keys)

        def one(key):
            client.put_object(Bucket=bucket, Key=key, Body=body)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(one, keys):
                pass
        return len(keys)

    def describe(self):
        return {
            "endpoint": self.endpoint, "pid": self.pid, "log": self.log_path,
            "auth_enabled": self.auth_enabled, "region": self.region,
            "buckets": list(self.buckets) + [self.other_region_bucket],
            "access_key_id": self.access_key_id,
            "denied_access_key_id": self.denied_access_key_id,
            "kms_key_id": self.kms_key_id, "role_arn": self.role_arn,
        }
