"""Section "Request signing": SigV4, pinned by AWS's published example and checked against
botocore's signer (the oracle) on many random requests."""

import datetime
import random

import pytest

import vault_snapshot_agent as vsa

ACCESS = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
WHEN = datetime.datetime(2013, 5, 24, 0, 0, 0, tzinfo=vsa.UTC)


def test_aws_published_get_object_example():
    # "Example: GET Object" of the S3 SigV4 header-auth documentation.
    headers = vsa.sigv4_headers("GET", "examplebucket.s3.amazonaws.com", "/test.txt", "",
                                {"Range": "bytes=0-9"}, vsa.EMPTY_SHA256, ACCESS, SECRET, None,
                                "us-east-1", "s3", WHEN)
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")


def test_aws_published_list_objects_example():
    # "Example: GET Bucket (List Objects)" of the same page.
    query = vsa.canonical_query([("max-keys", "2"), ("prefix", "J")])
    headers = vsa.sigv4_headers("GET", "examplebucket.s3.amazonaws.com", "/", query, {},
                                vsa.EMPTY_SHA256, ACCESS, SECRET, None, "us-east-1", "s3", WHEN)
    assert headers["Authorization"].endswith(
        "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")


@pytest.mark.parametrize("text,encoded", [
    ("a b", "a%20b"), ("a~b", "a~b"), ("a+b", "a%2Bb"), ("a=b", "a%3Db"), ("\u00e9", "%C3%A9"),
    ("a/b", "a%2Fb"), ("*", "%2A"), ("-_.", "-_."),
])
def test_uri_encode_is_the_same_on_every_python(text, encoded):
    assert vsa.uri_encode(text) == encoded


KEY_ALPHABET = "abcXYZ019 ~+=&?%#@!$'()*,;:/\u00e9\u00fc\u4e2d\U0001f600-_."


def random_case(rng):
    key = "".join(rng.choice(KEY_ALPHABET) for _ in range(rng.randint(1, 40))).lstrip("/")
    key = key or "k"
    query = [("".join(rng.choice("abcXYZ-_.~+= &/") for _ in range(rng.randint(1, 8))),
              "".join(rng.choice(KEY_ALPHABET) for _ in range(rng.randint(0, 12))))
             for _ in range(rng.randint(0, 4))]
    headers = {}
    for _ in range(rng.randint(0, 4)):
        name = rng.choice(["Content-Type", "x-amz-meta-Note", "X-Amz-Storage-Class",
                           "Content-MD5", "x-amz-server-side-encryption", "Range"])
        headers[name] = rng.choice(["a  b", " lead", "trail ", "x", "bytes=0-9", "AES256"])
    body = bytes(bytearray(rng.getrandbits(8) for _ in range(rng.randint(0, 300))))
    token = rng.choice([None, "FQoGZXIvYXdzE" + "".join(rng.choice("abcdef0123") for _ in range(40))])
    region = rng.choice(["us-east-1", "eu-central-1", "ap-southeast-2"])
    host = rng.choice(["bucket.s3.amazonaws.com", "127.0.0.1:9000", "s3.eu-central-1.amazonaws.com"])
    method = rng.choice(["GET", "PUT", "POST", "DELETE", "HEAD"])
    when = datetime.datetime(2020, 1, 1, tzinfo=vsa.UTC) + datetime.timedelta(
        seconds=rng.randint(0, 10 ** 9))
    return method, host, "/" + key, query, headers, body, token, region, when


SIGNATURE_CASES = 500


@pytest.mark.oracle
def test_signatures_equal_botocore_on_random_requests(monkeypatch):
    botocore_auth = pytest.importorskip("botocore.auth")
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    import hashlib
    rng = random.Random(20261127)
    for _ in range(SIGNATURE_CASES):
        method, host, key, query, headers, body, token, region, when = random_case(rng)
        path = vsa.uri_encode(key, safe="-_.~/")
        payload_hash = hashlib.sha256(body).hexdigest()
        ours = vsa.sigv4_headers(method, host, path, vsa.canonical_query(query), headers,
                                 payload_hash, ACCESS, SECRET, token, region, "s3", when)
        monkeypatch.setattr(botocore_auth, "get_current_datetime",
                            lambda remove_tzinfo=True, when=when: when.replace(tzinfo=None))
        request = AWSRequest(method=method, url="http://%s%s" % (host, path), data=body,
                             headers=dict(headers), params=list(query))
        botocore_auth.S3SigV4Auth(Credentials(ACCESS, SECRET, token), "s3", region).add_auth(request)
        assert ours["Authorization"] == request.headers["Authorization"], (method, key, query, headers)


# -- Azure Shared Key -----------------------------------------------------------------

def test_azure_string_to_sign_is_microsofts_documented_example():
    # "Authorize with Shared Key", Get Container Metadata on a path-style URL
    # (the account appears twice): the documented string-to-sign.
    headers = {"x-ms-version": "2009-09-19", "x-ms-date": "Sun, 11 Oct 2009 21:49:13 GMT"}
    url = "http://127.0.0.1:10000/myaccount/mycontainer?restype=container&comp=metadata&timeout=20"
    assert vsa.azure_string_to_sign("GET", url, headers, "myaccount") == (
        "GET\n\n\n\n\n\n\n\n\n\n\n\n"
        "x-ms-date:Sun, 11 Oct 2009 21:49:13 GMT\nx-ms-version:2009-09-19\n"
        "/myaccount/myaccount/mycontainer\ncomp:metadata\nrestype:container\ntimeout:20")


def test_azure_string_to_sign_rules():
    headers = {"Content-Length": "0", "Content-Type": "application/xml", "Content-MD5": "abc==",
               "Range": "bytes=0-9", "X-MS-Meta-B": "  two   words ", "x-ms-meta-a": "1",
               "User-Agent": "ignored", "If-Match": '"etag"'}
    url = "https://acct.blob.core.windows.net/c/blob%20name?Comp=list&prefix=a%2Fb&include=snapshots&include=metadata"
    lines = vsa.azure_string_to_sign("put", url, headers, "acct").split("\n")
    assert lines[:12] == ["PUT", "", "", "", "abc==", "application/xml", "", "", '"etag"', "", "",
                          "bytes=0-9"]
    assert lines[12:14] == ["x-ms-meta-a:1", "x-ms-meta-b:two words"]
    assert lines[14:] == ["/acct/c/blob%20name", "comp:list", "include:metadata,snapshots",
                          "prefix:a/b"]


def test_azure_signature_is_the_hmac_of_the_string_to_sign():
    import base64
    import hashlib
    import hmac
    key = base64.b64encode(b"k" * 64).decode()
    headers = {"x-ms-version": "2021-08-06", "x-ms-date": "Fri, 27 Nov 2026 21:00:00 GMT"}
    url = "https://acct.blob.core.windows.net/c/b"
    expected = base64.b64encode(hmac.new(base64.b64decode(key), vsa.azure_string_to_sign(
        "GET", url, headers, "acct").encode(), hashlib.sha256).digest()).decode()
    assert vsa.azure_shared_key("GET", url, headers, "acct", key) == "SharedKey acct:" + expected
