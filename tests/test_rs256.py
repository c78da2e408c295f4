"""Section "Request signing": RS256 with the standard library. A fixed key and its signature
(made with `cryptography`) pin the implementation on every Python; the
oracle tests compare with `cryptography` on fresh keys of every size."""

import base64
import json

import pytest

import vault_snapshot_agent as vsa

TEST_KEY_PKCS1 = '''-----BEGIN RSA PRIVATE KEY-----
MIIEogIBAAKCAQEAlGQgjbdLIe/t83EGYL9weNrO+SWUUoFD9zwksgg3e6n5DsiG
H3U59PHnE3GlZwdT+MnnPbodKVLdkBvV5MsPxO3ge41zH+gRypmIkg4VSS99Nsuz
mW2RkBsjQvl8d09oH6L9EZ/8QSl/PEKzdals0h7AZ1Uy2uWDEU9KvfAbXqgirnMH
WvPq0booT+1Q86ckXRIaj4rzc4qlZecM1hQhCwiVHl7vWChyKBwP9DWrQtZVytlr
T9Tdg1oV1YgGrNduTruySxSqdhWekfRHPrOj5d8JdXL9eyCyw6jpy7LbbeNY+P/G
58Yn31gnNqm71DPFjebM+h/Yfa8gV8vnBWNDmQIDAQABAoIBAEYN5Q5yX250ok4A
6GVpS3RKvFaD5rtymj8QbjR8S5E+o71WbndQdN2ODCyyRMdYfsyfqOMLx7OYEtBz
S63ZLacnNAiwNQ71lNykUgS90E++MytYzH+c6hDxttpqBNggrUPuQvH8qO6sZAxz
Ytyj8SNbcDL4Vmtf2dokqGD2Bz3OgxxV5W9z9SbFTudBLqT58kAEX5ZqzX6GufW2
dHmpMbD0Bfw/dhaI8ZR3sVw8vaaq0hhPXpFOv+ygFUrtvbflngBuR+SIODsJDI3V
9Qp3AbNB4C5Dd++AHp2MvcO0dzus+c90hrwIBTwLHihTxmDVr9/1s0Cu4VC20ryJ
5gHGfxcCgYEA0WRTCT5NKzhgPQJ52Pj3BLa2mkusYdRFF+3m5gSJS1g7KB9m21V4
LQYZSbph17OyERxPlMOg8dX60rEIpc+gxVGlxNltyMvXJIPxDG6te/UPUYT/M6uh
uSXdYYtgrf44xhHtGb4UpDuVItbVnD61IZEtjxVhT7mfRClA/dGmkn8CgYEAtWvT
Zm83awSkrvmIhOPM/p+lYW/n2m2pbTZVQBdVes8jzP/Zx4PzwfmTnraE3MTkJSXO
r0bbr8bwesHxcgk98TfMEKkZwA6kGqMxQ6u4dbUy/0Y0ew19db2XA2FYepNUoCVl
SvjpIqpXTC664IZ46cAArwceTup6XK1lyL/LbecCgYAyzC7k0Ctyb8PRKTecLpHm
n9jex7rzJMb6Tim05abVE3uOeUe/sBVufstFuqSf6qUpR3/67BawdKPb1zzs1NkA
5ZTck47xppnz7tpclMEbkFD+CtDKnTmnrArv7hsvOrxVOOYXV6i0SwwcHphFxmS0
1v6BdsNbzwFXTNbKfMD3SwKBgGoTXKzFFIMXWO8R6ffBdkfesoUROGBnxCueHCR4
QDupR8aCRiS5C1p8ggrHr1GiMb9ipsGnTaYuTMeKBJFnw/b5Z/DJ3suEBAGrL4/g
pN72DpZhxye30IZ6TwTj8ybgZBerJdm7Rh1FuftKS2wiVCpgYEX2hIsh4F+15xCE
y/47AoGAJq3mHKV79Fywpod6vtb/89OThI4wnVKLf8RkmFI+uGPXitwjzsmvYbfO
QwOoS31va+riJeY+ETQT5TCDiH1EZptO1+TQ5DUnohVmD/Q7guuo6R5Ykh+8XllI
TZD4A6QBZrJ60jhb9hIela/Q9C61eX1ZivTyASt6XAP+T3yVv0c=
-----END RSA PRIVATE KEY-----
'''
TEST_SIGNATURE = (
    "516995b31d53307ceba8c84a22c587fbd4b86c8b57587618217551d50c3d8952"
    "ed80a02f7247deab54ea72f03e3abd061c948722fc491ae5de3bf2210b954571"
    "4fd83b9d93d5c98d2cbdee14c1386f5b2b8fc5afae0c35c7ffbf9371355cb6db"
    "e6ca31605b6bb5f25885dc6a7940df62ff8895b4ae8df3da9ef6f0db86e3de21"
    "030200a1c8167c6e7367118d40909d13fc40ea99befe266d765e4455b6cab6da"
    "cd86da179d502cd2cd517e2e7573e8a5525fe4f44b2720705ac960a8becd1178"
    "70b624c4f51dfc0ffaa023d10664e064c95ff1ee2bcb9f5317154b2afeef4737"
    "1c283597ccca427f9f47e5eb21689748b764b1b4d43a6eea21b988279ac6a914"
)


def test_pinned_signature_on_every_python():
    key = vsa.load_rsa_private_key(TEST_KEY_PKCS1)
    assert vsa.rs256_sign(key, b"vault-snapshot-agent test vector").hex() == TEST_SIGNATURE


def test_blinding_does_not_change_the_signature():
    key = vsa.load_rsa_private_key(TEST_KEY_PKCS1)
    sigs = set(vsa.rs256_sign(key, b"m").hex() for _ in range(5))
    assert len(sigs) == 1


@pytest.mark.parametrize("pem,problem", [
    ("no key here", "no PEM"),
    ("-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----", "base64"),
    ("-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----", "DER"),
])
def test_bad_pem_errors_name_the_problem_not_the_key(pem, problem):
    with pytest.raises(ValueError, match=problem):
        vsa.load_rsa_private_key(pem)


def test_truncated_key_error_has_no_key_material():
    body = TEST_KEY_PKCS1.split("-----")[2].strip()
    cut = "-----BEGIN RSA PRIVATE KEY-----\n%s\n-----END RSA PRIVATE KEY-----" % body[:400]
    with pytest.raises(ValueError) as info:
        vsa.load_rsa_private_key(cut)
    assert body[40:80] not in str(info.value)


def test_jwt_header_and_claims_are_those_google_documents():
    key = vsa.load_rsa_private_key(TEST_KEY_PKCS1)
    jwt = vsa.service_account_jwt(key, "agent@proj.iam.gserviceaccount.com", "kid123",
                                  "https://oauth2.googleapis.com/token", vsa.GCS_SCOPE, 1764276759.5)
    head, claims, sig = jwt.split(".")
    def pad(s):
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    assert json.loads(pad(head)) == {"alg": "RS256", "typ": "JWT", "kid": "kid123"}
    assert json.loads(pad(claims)) == {
        "iss": "agent@proj.iam.gserviceaccount.com", "scope": vsa.GCS_SCOPE,
        "aud": "https://oauth2.googleapis.com/token", "iat": 1764276759, "exp": 1764280359}
    assert pad(sig) == vsa.rs256_sign(key, (head + "." + claims).encode())


@pytest.mark.oracle
@pytest.mark.parametrize("bits", [2048, 3072, 4096])
@pytest.mark.parametrize("fmt", ["PKCS8", "PKCS1"])
def test_signatures_are_byte_identical_to_cryptography(bits, fmt):
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    form = (serialization.PrivateFormat.PKCS8 if fmt == "PKCS8"
            else serialization.PrivateFormat.TraditionalOpenSSL)
    pem = key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption()).decode()
    ours = vsa.load_rsa_private_key(pem)
    for size in (0, 1, 100, 5000):
        message = bytes(bytearray(range(256))) * (size // 256) + b"x" * (size % 256)
        assert vsa.rs256_sign(ours, message) == key.sign(message, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.oracle
def test_non_rsa_key_is_refused():
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    with pytest.raises(ValueError, match="not an RSA key"):
        vsa.load_rsa_private_key(pem)
