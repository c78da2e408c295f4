"""Vault's server side of a login method OpenBao does not have (``aws``,
``gcp``, ``azure``), standing in front of a real OpenBao node.

OpenBao ships no aws, gcp or azure auth method, so their end-to-end tests
put this loopback server between the agent and the cluster's leader: it
answers ``POST /v1/auth/<mount>/login`` itself, the way Vault's method
does (the test's ``check`` judges the login body: replays a signed STS
request, verifies a JWT's signature and claims, ...), and on success hands
out a REAL token of the cluster (policy ``snapshot``, renewable, with
``ttl``), so everything after the login (renew-self, sys/leader, the
snapshot) is OpenBao's own answer, relayed unchanged::

    stand_in = VaultLoginStandIn(bao_cluster, "aws", check).start()
    config["addr"] = stand_in.url          # the agent talks to the stand-in
    ...
    stand_in.logins                        # the login bodies it received

``check(body)`` returns None to accept or an error text, which the
stand-in answers as Vault does: ``400 {"errors": [text]}``.  A stand-in,
not a fake of the thing under test: the agent is under test, and the
judging is done by the real services the test points ``check`` at (moto's
STS, a loopback key's signature).
"""

import http.client
import json
import urllib.parse

from support.bao_auth import write_snapshot_policy
from support.harness import LoopbackServer

__all__ = ["VaultLoginStandIn"]

_RELAYED = ("Content-Type", "Location", "Content-Length")


class VaultLoginStandIn(LoopbackServer):
    """See the module docstring.  ``cluster``: a running
    bao_cluster.BaoCluster (plain http); ``mount``: the auth mount the
    agent logs in at; ``check(body)`` -> None or an error text."""

    server_version = "vault-login-stand-in"

    def __init__(self, cluster, mount, check, ttl="1h"):
        LoopbackServer.__init__(self)
        self.cluster, self.mount, self.check, self.ttl = cluster, mount, check, ttl
        self.policy = write_snapshot_policy(cluster)
        self.logins = []            # the parsed login bodies, in order
        self.tokens = []            # the tokens handed out (add them to the secret scan)

    def answer(self, handler):
        body = handler.read_body()
        if handler.command == "POST" and handler.path.split("?")[0] == "/v1/auth/%s/login" % self.mount:
            return self._login(body)
        return self._relay(handler, body)

    def _login(self, body):
        try:
            payload = json.loads(body.decode("utf-8"))
        except ValueError:
            return 400, {}, {"errors": ["failed to parse JSON input"]}
        self.logins.append(payload)
        error = self.check(payload)
        if error:
            return 400, {}, {"errors": [error]}
        _, created = self.cluster.api("POST", "auth/token/create", {
            "policies": [self.policy], "ttl": self.ttl, "renewable": True,
            "no_parent": True, "display_name": self.mount}, expect=200)
        auth = created["auth"]
        self.tokens.append(auth["client_token"])
        return 200, {}, {"auth": {"client_token": auth["client_token"],
                                  "lease_duration": auth["lease_duration"],
                                  "renewable": auth["renewable"], "policies": auth["policies"]}}

    def _relay(self, handler, body):
        """The request as is to the cluster's leader; its answer back."""
        node = self.cluster.leader() or self.cluster.nodes[0]
        target = urllib.parse.urlsplit(node.addr)
        headers = dict((k, v) for k, v in handler.headers.items()
                       if k.lower() not in ("host", "connection", "content-length"))
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        try:
            conn.request(handler.command, handler.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            kept = dict((k, resp.getheader(k)) for k in _RELAYED[:2] if resp.getheader(k))
            return resp.status, kept, data
        finally:
            conn.close()
