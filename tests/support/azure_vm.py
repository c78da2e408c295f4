"""An Azure VM's Instance Metadata Service on loopback, and the judge of
Vault's ``azure`` auth method, for the tests of the agent's ``azure`` login
(test_vault_login_azure.py).  Stdlib only, except that signing and
verifying use ``cryptography`` (the e2e venv has it; without a key the
tokens carry a fake signature, for the unit tests).

* ``AzureVm`` -- cred_servers.AzureImdsServer (the managed-identity token
  endpoint: Metadata header, api-version, resource, ``client_id`` /
  ``object_id`` / ``msi_res_id`` of a user-assigned identity, "Identity
  not found") plus the instance metadata
  ``GET /metadata/instance?api-version=...`` whose ``compute`` names the
  subscription, resource group, VM and scale set.  With ``key`` (an
  rsa_keys.RsaKey) every token is an RS256 JWT signed by that key, with
  ``aud`` the resource exactly as requested (Azure's v1 tokens do so) and
  ``oid`` the identity's principal id.  ``instance_answer`` replaces the
  instance metadata's answer (``(status, headers, payload)``, a payload of
  any size), ``instance_hold`` makes it wait (until ``stop()``) before
  answering: hostile metadata.
* ``vault_azure_check(vm, resource, ...)`` -- a ``check(body)`` for
  login_standin.VaultLoginStandIn judging a login the way
  vault-plugin-auth-azure's ``pathLogin`` does (path_login.go, read at
  hashicorp/vault-plugin-auth-azure 048404d1): the OIDC verifier (RS256
  signature by the tenant's key -- here the VM's key --, ``iss``, ``aud``
  == the mount's configured ``resource``, ``exp``), ``nbf``, then
  ``verifyResource``: subscription_id and resource_group_name required;
  with ``vmss_name`` the scale set (not the VM) is looked up, else the VM
  by ``vm_name``, else ``resource_id`` is required; the token's ``oid``
  must be one of that resource's identities; bound subscriptions, resource
  groups and scale sets.  Azure Resource Manager's answer to those lookups
  is this VM's instance metadata: a name, group or subscription that is
  not this VM's is "not found", as ARM would say.  The error texts are the
  plugin's.
"""

import base64
import json
import threading
import time

from support.cred_servers import DEFAULT_TENANT, AzureImdsServer, decode_jwt

__all__ = ["AzureVm", "vault_azure_check", "MANAGEMENT_RESOURCE", "SUBSCRIPTION", "RESOURCE_GROUP"]

MANAGEMENT_RESOURCE = "https://management.azure.com/"
SUBSCRIPTION = "8d3b4f6a-0000-4000-8000-00000000dddd"
RESOURCE_GROUP = "rg-vault-backups"
INSTANCE_PATH = "/metadata/instance"


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text):
    return base64.urlsafe_b64decode((text + "=" * (-len(text) % 4)).encode("ascii"))


class AzureVm(AzureImdsServer):
    """See the module docstring.  ``vm_name``; ``vmss_name`` (None: not in
    a scale set; then compute.vmScaleSetName is "", as Azure answers);
    ``key``: an rsa_keys.RsaKey signing the tokens (None: fake signature);
    other arguments as cred_servers.AzureImdsServer (``system_assigned``,
    ``client_ids``, ``resources``, ``expires_in``, ``token``)."""

    def __init__(self, vm_name="vault-1", vmss_name=None, key=None, subscription=SUBSCRIPTION,
                 resource_group=RESOURCE_GROUP, resources=(MANAGEMENT_RESOURCE,), **options):
        AzureImdsServer.__init__(self, resources=resources, **options)
        self.key = key
        self.compute = {
            "azEnvironment": "AzurePublicCloud", "location": "westeurope", "name": vm_name,
            "osType": "Linux", "resourceGroupName": resource_group,
            "subscriptionId": subscription, "vmScaleSetName": vmss_name or "",
            "vmId": "02aab8a4-74ef-476e-8182-f6d2ba4166a6", "vmSize": "Standard_D2s_v5",
            "resourceId": "/subscriptions/%s/resourceGroups/%s/providers/Microsoft.Compute/"
                          "virtualMachines/%s" % (subscription, resource_group, vm_name)}
        self.instance_answer = None     # (status, headers, payload) instead of the real answer
        self.instance_hold = False      # wait (until stop()) before answering
        self.claims_override = {}       # claims every new token gets (a lying IMDS)
        self._released = threading.Event()

    @property
    def identities(self):
        """The principal ids of this VM's identities (system, user-assigned)."""
        return ([self.system_client_id] if self.system_assigned else []) + list(self.client_ids)

    def stop(self):
        self._released.set()
        AzureImdsServer.stop(self)

    def respond(self, record):
        path = record.path.split("?", 1)[0]
        if path == INSTANCE_PATH:
            return self._instance(record)
        status, headers, payload = AzureImdsServer.respond(self, record)
        if status == 200 and self.token is None:
            payload["access_token"] = self._resign(payload["access_token"], payload["resource"])
        return status, headers, payload

    def _instance(self, record):
        if self.instance_hold:
            self._released.wait(60)
        if self.instance_answer is not None:
            return self.instance_answer
        if record.header("Metadata") != "true" or record.has_header("X-Forwarded-For"):
            return 400, None, {"error": "Bad request. Required metadata header not specified"}
        if "api-version=" not in record.path:
            return 400, None, {"error": "Bad request. api-version was not specified in the "
                                        "request", "newest-versions": ["2021-02-01"]}
        return 200, None, {"compute": dict(self.compute), "network": {"interface": []}}

    def _resign(self, unsigned, resource):
        """The token the base server minted, with ``aud`` = ``resource`` as
        requested and, with a key, signed by it (replaced in ``issued``)."""
        claims = decode_jwt(unsigned)
        claims["aud"] = resource
        claims.update(self.claims_override)
        header = {"typ": "JWT", "alg": "RS256", "kid": "azure-vm-test-key"}
        signing_input = "%s.%s" % (_b64url(json.dumps(header).encode("utf-8")),
                                   _b64url(json.dumps(claims).encode("utf-8")))
        signature = self.key.sign(signing_input.encode("ascii")) if self.key else b"unsigned"
        token = signing_input + "." + _b64url(signature)
        with self._lock:
            self.issued[self.issued.index(unsigned)] = token
        return token


def verify_rs256(public_pem, token):
    """The JWT's (header, claims) if its RS256 signature verifies with
    ``public_pem``; ValueError (go-oidc's words) otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.backends import default_backend
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise ValueError("oidc: malformed jwt: go-jose/go-jose: compact JWS format must have three parts")
    try:
        header = json.loads(_unb64url(parts[0]).decode("utf-8"))
        claims = json.loads(_unb64url(parts[1]).decode("utf-8"))
        signature = _unb64url(parts[2])
    except ValueError:
        raise ValueError("oidc: malformed jwt: illegal base64 data") from None
    if header.get("alg") != "RS256":
        raise ValueError("oidc: id token signed with unsupported algorithm, expected [\"RS256\"] "
                         "got %r" % header.get("alg"))
    key = serialization.load_pem_public_key(public_pem.encode("ascii"), default_backend())
    try:
        key.verify(signature, (parts[0] + "." + parts[1]).encode("ascii"), padding.PKCS1v15(),
                   hashes.SHA256())
    except InvalidSignature:
        raise ValueError("failed to verify signature: failed to verify id token signature") from None
    return header, claims


def vault_azure_check(vm, resource=MANAGEMENT_RESOURCE, role="snapshot", bound_subscriptions=(),
                      bound_resource_groups=(), bound_scale_sets=(), tenant=DEFAULT_TENANT,
                      public_pem=None):
    """A ``check(body)`` for VaultLoginStandIn: None or Vault's error text
    (see the module docstring).  ``vm``: the AzureVm whose key signs the
    tenant's tokens and whose metadata stands for Azure Resource Manager;
    ``resource``: the mount's configured ``resource``; ``role``: the one
    role on the mount, with its bindings; ``public_pem``: the tenant's
    signing key (default: the VM's, ``vm.key``)."""
    def check(body):
        if not body.get("jwt"):
            return "jwt is required"
        if not body.get("role"):
            return "role is required"
        if body["role"] != role:
            return 'invalid role name "%s"' % body["role"]
        try:
            _, claims = verify_rs256(public_pem or vm.key.public_pem, body["jwt"])
        except ValueError as exc:
            return str(exc)
        now = time.time()
        if claims.get("iss") != "https://sts.windows.net/%s/" % tenant:
            return "oidc: id token issued by a different provider, expected %r got %r" % (
                "https://sts.windows.net/%s/" % tenant, claims.get("iss"))
        audiences = claims.get("aud") if isinstance(claims.get("aud"), list) else [claims.get("aud")]
        if resource not in audiences:
            return "oidc: expected audience %r got %r" % (resource, audiences)
        if not isinstance(claims.get("exp"), int) or claims["exp"] < now:
            return "oidc: token is expired (Token Expiry: %s)" % claims.get("exp")
        if claims.get("nbf", 0) > now:
            return "token is not yet valid (Token Not Before: %s)" % claims["nbf"]
        return _verify_resource(vm, body, claims, bound_subscriptions, bound_resource_groups,
                                bound_scale_sets)
    return check


def _verify_resource(vm, body, claims, bound_subscriptions, bound_resource_groups,
                     bound_scale_sets):
    """verifyResource of path_login.go, ARM being ``vm``'s metadata."""
    subscription, group = body.get("subscription_id", ""), body.get("resource_group_name", "")
    if not subscription or not group:
        return "subscription_id and resource_group_name are required"
    compute = vm.compute
    here = subscription == compute["subscriptionId"] and group == compute["resourceGroupName"]
    if body.get("vmss_name"):
        if not (here and body["vmss_name"] == compute["vmScaleSetName"]):
            return ("unable to retrieve virtual machine scale set metadata: GET .../%s: 404 "
                    "ResourceNotFound" % body["vmss_name"])
        if bound_scale_sets and body["vmss_name"] not in bound_scale_sets:
            return "scale set not authorized"
    elif body.get("vm_name"):
        if not (here and body["vm_name"] == compute["name"]):
            return "unable to retrieve virtual machine metadata: GET .../%s: 404 ResourceNotFound" \
                   % body["vm_name"]
        if bound_scale_sets:
            return "bound scale set defined but this vm isn't in a scale set"
    else:
        return "resource_id is required"
    if claims.get("oid") not in vm.identities:
        return "token object id does not match expected identities"
    if bound_subscriptions and subscription not in bound_subscriptions:
        return "subscription not authorized"
    if bound_resource_groups and group not in bound_resource_groups:
        return "resource group not authorized"
    return None
