# Minimal Vault/OpenBao policy for vault_snapshot_agent.py: it only needs to
# read (stream) the Raft snapshot. The leader check (GET sys/leader) is
# unauthenticated, and token lookup-self / renew-self are granted by the
# built-in "default" policy that AppRole tokens carry.
#
# Load it (OpenBao: use "bao" instead of "vault"):
#   vault policy write snapshot contrib/snapshot-policy.hcl
#
# AppRole setup for the agent:
#   vault auth enable approle
#   vault write auth/approle/role/snapshot \
#       token_policies=snapshot \
#       token_ttl=1h \
#       token_max_ttl=24h \
#       secret_id_ttl=0
#   # secret_id_ttl=0 means the secret ID never expires: convenient for an
#   # unattended agent, but it is then a long-lived credential. Protect it
#   # (file mode 0600/0640, secret_id_file), consider secret_id_bound_cidrs /
#   # token_bound_cidrs, or set a finite TTL and rotate it.
#   vault read -field=role_id auth/approle/role/snapshot/role-id
#   vault write -f -field=secret_id auth/approle/role/snapshot/secret-id
#
# Put the two values into role_id and secret_id (or secret_id_file) of
# /etc/vault.d/snapshot.json; "approle" is the mount path ("approle" above).

path "sys/storage/raft/snapshot" {
  capabilities = ["read"]
}
