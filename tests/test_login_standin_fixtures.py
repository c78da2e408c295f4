"""Self-test of tests/login_standin.py: the agent logs in at the stand-in
and everything after the login is the real cluster's answer."""

import json
import os

from support.harness import run_main
from support.login_standin import VaultLoginStandIn


def test_a_login_the_stand_in_accepts_gives_a_real_token(bao_cluster, tmp_path):
    seen = []

    def check(body):
        seen.append(sorted(body))
        return None if body.get("jwt") == "good" else "invalid audience (aud) claim"

    (tmp_path / "jwt").write_text("good\n")
    with VaultLoginStandIn(bao_cluster, "jwt", check) as stand_in:
        config = {"addr": stand_in.url, "vault_auth_method": "jwt", "vault_auth_role": "r",
                  "jwt_file": str(tmp_path / "jwt"), "local_storage": {"path": str(tmp_path / "s")}}
        (tmp_path / "c.json").write_text(json.dumps(config))
        code, log = run_main("-c", str(tmp_path / "c.json"), "--once")
        assert code == 0, log
        assert seen == [["jwt", "role"]] and len(stand_in.tokens) == 1
        assert [n for n in os.listdir(str(tmp_path / "s")) if n.endswith(".snap")]
        (tmp_path / "jwt").write_text("bad\n")
        code, log = run_main("-c", str(tmp_path / "c.json"), "--once")
        assert code == 1 and "jwt login at auth/jwt failed" in log and "invalid audience" in log
