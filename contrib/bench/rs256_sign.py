#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: the agent's stdlib RS256 signer next to cryptography (OpenSSL).

For each key size (--bits, default 2048 3072 4096) makes a fresh RSA key
with ``cryptography`` (PKCS#8 PEM, as in Google service-account files),
loads it once with ``vsa.load_rsa_private_key`` (the agent does that once
per configuration) and then, in one process, --iterations times, in an
order that rotates every iteration:

  agent     vsa.rs256_sign(key, message)      pure-Python RSASSA-PKCS1-v1_5
            with SHA-256: CRT, blinding (os.urandom + a modular inverse),
            and a check of the result against the public key
  crypto    private_key.sign(message, PKCS1v15(), SHA256())   OpenSSL
  jwt       vsa.service_account_jwt(key, ...)   the whole assertion the
            agent builds per Google token: header and claims JSON, base64url,
            rs256_sign

``message`` is a real JWT signing input (header.claims of a
service-account assertion, 369 bytes).  Every agent signature is compared
with cryptography's (PKCS#1 v1.5 is deterministic: they must be identical).
Times are time.perf_counter() around one call; the table shows medians
(and the 10th-90th percentile range) and the agent/cryptography ratio.
Key loading is timed too (median of --iterations loads).

Usage (cryptography in this interpreter's venv):

    .venv/bin/python contrib/bench/rs256_sign.py [--iterations 50] [--json out.json]

It takes a few seconds (4096-bit key generation is the slow part).
"""

import argparse
import json
import platform
import statistics
import sys
import time

import benchlib

sys.path.insert(0, benchlib.REPO)

import vault_snapshot_agent as vsa

EMAIL = "snapshots@bench-project.iam.gserviceaccount.com"
KEY_ID = "0123456789abcdef0123456789abcdef01234567"
TOKEN_URI = "https://oauth2.googleapis.com/token"
NOW = 1764276759.0
OPS = ("agent", "crypto", "jwt")


def signing_input():
    """header.claims of the assertion service_account_jwt builds (checked below)."""
    header = json.dumps({"alg": "RS256", "typ": "JWT", "kid": KEY_ID}, separators=(",", ":"))
    claims = json.dumps({"iss": EMAIL, "scope": vsa.GCS_SCOPE, "aud": TOKEN_URI,
                         "iat": int(NOW), "exp": int(NOW) + 3600}, separators=(",", ":"))
    return ("%s.%s" % (vsa.b64url(header.encode()), vsa.b64url(claims.encode()))).encode("ascii")


def bench_bits(bits, iterations):
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    t0 = time.perf_counter()
    priv = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    keygen = time.perf_counter() - t0
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode("ascii")
    message = signing_input()
    pad, sha = padding.PKCS1v15(), hashes.SHA256()

    loads = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        key = vsa.load_rsa_private_key(pem)
        loads.append(time.perf_counter() - t0)

    # warm-up, and the correctness check the numbers rest on
    want = priv.sign(message, pad, sha)
    if vsa.rs256_sign(key, message) != want:
        raise SystemExit("%d bits: agent signature differs from cryptography's" % bits)
    jwt = vsa.service_account_jwt(key, EMAIL, KEY_ID, TOKEN_URI, vsa.GCS_SCOPE, NOW)
    if jwt.encode("ascii").rsplit(b".", 1)[0] != message or jwt.rsplit(".", 1)[1] != vsa.b64url(want):
        raise SystemExit("%d bits: service_account_jwt is not header.claims.signature" % bits)

    times = dict((op, []) for op in OPS)
    mismatches = 0
    for i in range(iterations):
        for op in benchlib.rotated(OPS, i):
            if op == "agent":
                t0 = time.perf_counter()
                sig = vsa.rs256_sign(key, message)
                times[op].append(time.perf_counter() - t0)
                mismatches += sig != want
            elif op == "crypto":
                t0 = time.perf_counter()
                priv.sign(message, pad, sha)
                times[op].append(time.perf_counter() - t0)
            else:
                t0 = time.perf_counter()
                vsa.service_account_jwt(key, EMAIL, KEY_ID, TOKEN_URI, vsa.GCS_SCOPE, NOW)
                times[op].append(time.perf_counter() - t0)
    if mismatches:
        raise SystemExit("%d bits: %d agent signatures differ from cryptography's"
                         % (bits, mismatches))
    out = {"bits": bits, "keygen_seconds": keygen, "iterations": iterations,
           "message_bytes": len(message), "load": loads}
    out.update(times)
    return out


def row_stats(values):
    return {"median": statistics.median(values), "p10": benchlib.percentile(values, 0.1),
            "p90": benchlib.percentile(values, 0.9)}


def ms(value):
    return "%.2f ms" % (value * 1000) if value >= 0.001 else "%.0f µs" % (value * 1e6)


def table(data):
    lines = [
        "| key | agent `rs256_sign`, median (p10-p90) | cryptography `sign`, median (p10-p90) "
        "| agent / cryptography | whole `service_account_jwt` | `load_rsa_private_key` (once) |",
        "|---|---|---|---|---|---|",
    ]
    for res in data["results"]:
        a, c, j, ld = (row_stats(res[k]) for k in ("agent", "crypto", "jwt", "load"))
        lines.append("| RSA %d | %s (%s-%s) | %s (%s-%s) | %.1fx | %s | %s |" % (
            res["bits"], ms(a["median"]), ms(a["p10"]), ms(a["p90"]), ms(c["median"]),
            ms(c["p10"]), ms(c["p90"]), a["median"] / c["median"], ms(j["median"]),
            ms(ld["median"])))
    v = data["versions"]
    lines.append("")
    lines.append("Medians of %d interleaved calls per key, one process; %d-byte JWT signing "
                 "input; every agent signature byte-identical to cryptography's; Python %s, "
                 "cryptography %s (%s); agent sha256 `%s`; %s; %s." % (
                     data["iterations"], data["results"][0]["message_bytes"], v["python"],
                     v["cryptography"], v["openssl"], v["agent_sha256"], data["machine"],
                     data["date"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2048, 3072, 4096],
                        help="key sizes (2048 3072 4096)")
    parser.add_argument("--iterations", type=int, default=50,
                        help="timed calls per operation and key (50)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.iterations < 1 or any(b < 1024 for b in args.bits):
        parser.error("--iterations >= 1 and --bits >= 1024")
    try:
        import cryptography
        from cryptography.hazmat.backends.openssl import backend
    except ImportError:
        raise SystemExit("needs the cryptography package (.venv has it, through moto)") from None
    data = benchlib.stamp()
    data.update({
        "versions": {"python": platform.python_version(), "cryptography": cryptography.__version__,
                     "openssl": backend.openssl_version_text(),
                     "agent_sha256": benchlib.agent_sha12()},
        "iterations": args.iterations,
        "results": [],
    })
    for bits in args.bits:
        res = bench_bits(bits, args.iterations)
        data["results"].append(res)
        a, c = statistics.median(res["agent"]), statistics.median(res["crypto"])
        print("RSA %d: agent %s, cryptography %s (%.1fx), jwt %s, load %s, keygen %.1fs" % (
            bits, ms(a), ms(c), a / c, ms(statistics.median(res["jwt"])),
            ms(statistics.median(res["load"])), res["keygen_seconds"]), flush=True)
    print()
    print(table(data))
    if args.json:
        benchlib.write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
