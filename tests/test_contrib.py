"""contrib/deploy: the deployment examples (systemd credentials unit,
Dockerfile, Kubernetes manifests, Helm values, Prometheus alerts, the Grafana
dashboard).

Every YAML file parses; every container runs the agent with flags its argparse
accepts and mounts the config it names; every embedded JSON config passes
``config_from_dict`` and ``build_storages`` without warnings; the systemd units
pass ``systemd-analyze verify``; the Dockerfile builds where a Docker engine
works and has the essentials anyway; the alert rules pass ``promtool`` (and its
rule unit tests) where it is installed; the Grafana dashboard queries only
metrics the agent exports, shows every one but an explained few, and each of
its queries returns data from series shaped as the agent's (``promtool test
rules``).

PyYAML is a third-party oracle (moto pulls it into the test venv), absent from
the bare interpreters that run the unit tests: the module is marked ``oracle``
and skipped where PyYAML cannot be imported.
"""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import textwrap

import pytest

yaml = pytest.importorskip("yaml")

import vault_snapshot_agent as vsa  # noqa: E402
from support.harness import parse_dockerfile, parse_unit, read  # noqa: E402

pytestmark = pytest.mark.oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRIB = os.path.join(ROOT, "contrib")
DEPLOY = os.path.join(CONTRIB, "deploy")
K8S = os.path.join(DEPLOY, "kubernetes")

DOCKERFILE = os.path.join(DEPLOY, "Dockerfile")
CRONJOB = os.path.join(K8S, "cronjob.yaml")
SIDECAR = os.path.join(K8S, "sidecar.yaml")
SIDECAR_CONFIG = os.path.join(K8S, "sidecar-config.yaml")
PODMONITOR = os.path.join(K8S, "podmonitor.yaml")
HELM_VALUES = os.path.join(DEPLOY, "helm-values.yaml")
ALERTS = os.path.join(DEPLOY, "alerts.yaml")
PLAIN_UNIT = os.path.join(CONTRIB, "vault-snapshot-agent.service")
CREDS_UNIT = os.path.join(DEPLOY, "vault-snapshot-agent-credentials.service")
CREDS_CONFIG = os.path.join(DEPLOY, "snapshot-credentials.json")

# tini as PID 1 reaps what an AWS credential_process leaves behind.
ENTRYPOINT = ["/usr/bin/tini", "-s", "--", "python3", "-u", "/app/vault_snapshot_agent.py"]
IMAGE_CMD = ["--config", "/etc/vault.d/snapshot.json"]

METRICS = ("vault_snapshot_last_success_timestamp_seconds",
           "vault_snapshot_storage_consecutive_failures",
           "vault_snapshot_is_leader",
           "vault_snapshot_frequency_seconds",
           "vault_snapshot_verify_bad_snapshots")


def _walk_files(top, suffixes):
    found = []
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            if name.endswith(suffixes):
                found.append(os.path.join(dirpath, name))
    return sorted(found)


YAML_FILES = _walk_files(DEPLOY, (".yaml", ".yml"))
UNIT_FILES = [PLAIN_UNIT] + _walk_files(DEPLOY, (".service", ".timer"))


def _rel(path):
    return os.path.relpath(path, ROOT)


def load_docs(path):
    with open(path) as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def all_docs():
    return [(path, doc) for path in YAML_FILES for doc in load_docs(path)]


# ------------------------------------------------------------------ YAML


def test_expected_files_exist():
    for path in (DOCKERFILE, CRONJOB, SIDECAR, SIDECAR_CONFIG, PODMONITOR, HELM_VALUES, ALERTS,
                 CREDS_UNIT, CREDS_CONFIG, DASHBOARD):
        assert os.path.isfile(path), _rel(path)


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs, "%s has no document" % _rel(path)
    for doc in docs:
        assert isinstance(doc, dict), "%s: a document is not a mapping" % _rel(path)
    with open(path) as handle:
        assert "\t" not in handle.read(), "%s contains a tab" % _rel(path)


def test_kubernetes_manifests_are_objects():
    for path in _walk_files(K8S, (".yaml", ".yml")):
        for doc in load_docs(path):
            assert doc.get("apiVersion") and doc.get("kind"), _rel(path)
            assert doc.get("metadata", {}).get("name"), _rel(path)


# ------------------------------------------------------------ containers


def find_pod_specs(node, found=None):
    """Every mapping that holds a ``containers`` list (pod specs), plus the
    Helm ``server`` block (extraContainers + volumes)."""
    found = [] if found is None else found
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list) or isinstance(node.get("extraContainers"), list):
            found.append(node)
        for value in node.values():
            find_pod_specs(value, found)
    elif isinstance(node, list):
        for value in node:
            find_pod_specs(value, found)
    return found


def agent_containers():
    """(path, document, pod spec, container) for every agent container."""
    out = []
    for path, doc in all_docs():
        for spec in find_pod_specs(doc):
            for container in (spec.get("containers") or []) + (spec.get("extraContainers") or []):
                if "vault-snapshot-agent" in str(container.get("image", "")):
                    out.append((path, doc, spec, container))
    return out


def agent_argv(container):
    """The agent's own arguments: the image's ENTRYPOINT runs the script, so
    ``args`` replace CMD; a ``command`` must run the script itself."""
    command, args = container.get("command"), container.get("args")
    if command is None:
        return list(IMAGE_CMD if args is None else args)
    scripts = [i for i, word in enumerate(command) if str(word).endswith("vault_snapshot_agent.py")]
    assert scripts, "command %r does not run vault_snapshot_agent.py" % (command,)
    return [str(w) for w in command[scripts[0] + 1:]] + [str(w) for w in (args or [])]


def parse_agent_args(argv):
    try:
        return vsa._parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail("the agent's argparse refuses %r (exit %s)" % (argv, exc.code))


def test_every_manifest_with_a_pod_runs_the_agent():
    files = set(_rel(path) for path, _doc, _spec, _c in agent_containers())
    assert files == set(_rel(p) for p in (CRONJOB, SIDECAR, HELM_VALUES))


@pytest.mark.parametrize("entry", agent_containers(),
                         ids=lambda e: "%s:%s" % (_rel(e[0]), e[3].get("name")))
def test_container_arguments_are_accepted_by_the_agent(entry):
    path, _doc, spec, container = entry
    argv = agent_argv(container)
    args = parse_agent_args(argv)
    assert not args.check_config
    # A CronJob runs one cycle; a sidecar runs the loop.
    if path == CRONJOB:
        assert args.once, "the CronJob must run --once"
    else:
        assert not args.once, "a sidecar must not run --once (the pod would restart it)"
    # The config it names is mounted.
    mounts = container.get("volumeMounts") or []
    config_dir = os.path.dirname(args.config)
    assert any(m["mountPath"].rstrip("/") == config_dir for m in mounts), \
        "%s is not mounted into %s" % (args.config, container.get("name"))


@pytest.mark.parametrize("entry", agent_containers(),
                         ids=lambda e: "%s:%s" % (_rel(e[0]), e[3].get("name")))
def test_container_security_and_volumes(entry):
    _path, _doc, spec, container = entry
    pod_sc = spec.get("securityContext") or {}
    sc = container.get("securityContext") or {}

    def setting(key):
        return sc.get(key, pod_sc.get(key))

    assert setting("runAsNonRoot") is True
    assert int(setting("runAsUser")) != 0
    assert sc.get("readOnlyRootFilesystem") is True
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("capabilities", {}).get("drop") == ["ALL"]
    assert container.get("resources", {}).get("limits", {}).get("memory")
    assert container.get("resources", {}).get("requests", {}).get("memory")
    # Every mount names a volume of the pod (Helm: server.volumes).
    volumes = set(v["name"] for v in (spec.get("volumes") or []))
    for mount in container.get("volumeMounts") or []:
        assert mount["name"] in volumes, "volume %s is not defined" % mount["name"]
    # Port names are IANA service names (at most 15 characters).
    for port in container.get("ports") or []:
        assert re.match(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$", port["name"]), port
    # /tmp is writable (staging for cloud-only configs, read-only root fs).
    assert any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts") or [])


@pytest.mark.parametrize("entry", agent_containers(),
                         ids=lambda e: "%s:%s" % (_rel(e[0]), e[3].get("name")))
def test_container_keeps_the_image_entrypoint_and_its_init(entry):
    # A `command` replaces the ENTRYPOINT, and with it tini: the agent would be
    # PID 1 and never reap what a credential_process leaves behind.
    container = entry[3]
    assert "command" not in container, "set args, not command: command drops tini"
    assert "shareProcessNamespace" not in entry[2]


def _config_sources():
    """{Secret/ConfigMap name: {key: text}} over all manifests."""
    out = {}
    for _path, doc in all_docs():
        if doc.get("kind") == "Secret":
            data = dict((k, base64.b64decode(v).decode("utf-8"))
                        for k, v in (doc.get("data") or {}).items())
            data.update(doc.get("stringData") or {})
        elif doc.get("kind") == "ConfigMap":
            data = dict(doc.get("data") or {})
        else:
            continue
        out[doc["metadata"]["name"]] = data
    return out


@pytest.mark.parametrize("entry", agent_containers(),
                         ids=lambda e: "%s:%s" % (_rel(e[0]), e[3].get("name")))
def test_container_config_comes_from_a_shipped_secret(entry):
    _path, _doc, spec, container = entry
    args = parse_agent_args(agent_argv(container))
    config_dir, config_name = os.path.split(args.config)
    mount = [m for m in container["volumeMounts"] if m["mountPath"].rstrip("/") == config_dir][0]
    assert mount.get("readOnly") is True
    volume = [v for v in spec["volumes"] if v["name"] == mount["name"]][0]
    source = volume.get("secret", {}).get("secretName") or volume.get("configMap", {}).get("name")
    assert source, "the config volume is neither a Secret nor a ConfigMap"
    sources = _config_sources()
    assert source in sources, "no manifest ships the Secret/ConfigMap %s" % source
    assert config_name in sources[source], "%s has no key %s" % (source, config_name)


def test_cronjob_essentials():
    docs = dict((doc["kind"], doc) for doc in load_docs(CRONJOB))
    assert set(docs) >= {"ServiceAccount", "Secret", "PersistentVolumeClaim", "CronJob"}
    cron = docs["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert isinstance(cron["successfulJobsHistoryLimit"], int)
    assert isinstance(cron["failedJobsHistoryLimit"], int)
    assert len(cron["schedule"].split()) == 5
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod.get("automountServiceAccountToken") is True     # the JWT for k8s auth
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [docs["PersistentVolumeClaim"]["metadata"]["name"]]
    # The config error exit code is not retried.
    rules = cron["jobTemplate"]["spec"].get("podFailurePolicy", {}).get("rules", [])
    assert any(r["action"] == "FailJob" and vsa.EXIT_USAGE in r["onExitCodes"]["values"]
               for r in rules)
    # Every object lives in the namespace the config's Service points at.
    for doc in load_docs(CRONJOB):
        assert doc["metadata"]["namespace"] == "vault"


def test_sidecar_patch_and_helm_values_shape():
    patch = load_docs(SIDECAR)
    assert len(patch) == 1, "kubectl patch --patch-file takes one document"
    assert patch[0]["kind"] == "StatefulSet"
    pod = patch[0]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["vault-snapshot-agent"]
    values = load_docs(HELM_VALUES)[0]
    assert set(values) == {"server"}
    server = values["server"]
    assert isinstance(server["extraContainers"], list)
    assert isinstance(server["volumes"], list)
    # Not set on purpose (would replace the user's own list); documented.
    assert "volumeMounts" not in server
    with open(HELM_VALUES) as handle:
        text = handle.read()
    assert "volumeMounts" in text and "OpenBao" in text
    # The Helm sidecar is the same container as the patch's.
    assert server["extraContainers"][0] == pod["containers"][0]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_sidecar_patch_merges_into_a_statefulset(tmp_path):
    """kustomize (built into kubectl, works offline) applies the patch as a
    strategic merge: the Vault container and its volumes stay."""
    statefulset = {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "vault", "namespace": "vault"},
        "spec": {"serviceName": "vault-internal",
                 "selector": {"matchLabels": {"app": "vault"}},
                 "template": {"metadata": {"labels": {"app": "vault"}},
                              "spec": {"containers": [{"name": "vault", "image": "hashicorp/vault"}],
                                       "volumes": [{"name": "config",
                                                    "configMap": {"name": "vault-config"}}]}}}}
    (tmp_path / "sts.yaml").write_text(yaml.safe_dump(statefulset))
    shutil.copy(SIDECAR, str(tmp_path / "sidecar.yaml"))
    (tmp_path / "kustomization.yaml").write_text(textwrap.dedent("""\
        resources: [sts.yaml]
        patches:
          - path: sidecar.yaml
            target: {kind: StatefulSet, name: vault}
        """))
    proc = subprocess.run(["kubectl", "kustomize", str(tmp_path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pod = yaml.safe_load(proc.stdout)["spec"]["template"]["spec"]
    assert sorted(c["name"] for c in pod["containers"]) == ["vault", "vault-snapshot-agent"]
    assert sorted(v["name"] for v in pod["volumes"]) == [
        "config", "vault-snapshot-agent-config", "vault-snapshot-agent-tmp"]


def test_sidecar_metrics_are_exposed_and_scraped(tmp_path):
    """The sidecar config serves metrics on the port the containers declare
    and the PodMonitor scrapes, under the job the alert rules expect."""
    monitor = load_docs(PODMONITOR)[0]
    assert monitor["kind"] == "PodMonitor"
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert {"targetLabel": "job", "replacement": "vault-snapshot-agent"} in endpoint["relabelings"]
    raw = json.loads(load_docs(SIDECAR_CONFIG)[0]["stringData"]["snapshot.json"])
    cfg, _ = check_config(raw, tmp_path, "sidecar")
    host, port = cfg.metrics_bind
    assert host == "0.0.0.0", "Prometheus must reach it from outside the pod"
    sidecars = [c for path, _d, _s, c in agent_containers() if path != CRONJOB]
    assert len(sidecars) == 2
    for container in sidecars:
        ports = dict((p["name"], p["containerPort"]) for p in container.get("ports", []))
        assert ports.get(endpoint["port"]) == port


# ---------------------------------------------------------------- configs


FILE_KEYS = ("secret_id_file", "token_file")


def check_config(raw, tmp_path, label):
    """config_from_dict + build_storages on ``raw``, with the secret files it
    names replaced by temporary ones (they exist only on the target host);
    returns the Config and the storages. Fails on any warning (an unknown key)."""
    raw = json.loads(json.dumps(raw))
    for key in FILE_KEYS:
        if raw.get(key):
            stand_in = tmp_path / ("%s-%s" % (label, key))
            stand_in.write_text("dummy-%s\n" % key)
            stand_in.chmod(0o600)       # as the README's install steps make it
            raw[key] = str(stand_in)
    cfg = vsa.config_from_dict(raw, "<%s>" % label, env={})
    storages = vsa.build_storages(cfg, vsa.Runtime.create(env={}))
    assert storages
    assert list(cfg.warnings) == [], "%s: %s" % (label, cfg.warnings)
    return cfg, storages


def embedded_configs():
    """(label, parsed JSON) of every *.json key of a Secret/ConfigMap."""
    out = []
    for path, doc in all_docs():
        if doc.get("kind") not in ("Secret", "ConfigMap"):
            continue
        for key, text in sorted(_config_sources()[doc["metadata"]["name"]].items()):
            if key.endswith(".json"):
                out.append(("%s:%s/%s" % (_rel(path), doc["metadata"]["name"], key), json.loads(text)))
    return out


def test_manifests_embed_configs():
    labels = [label for label, _raw in embedded_configs()]
    assert any(label.startswith(_rel(CRONJOB)) for label in labels)
    assert any(label.startswith(_rel(SIDECAR_CONFIG)) for label in labels)


@pytest.mark.parametrize("label,raw", embedded_configs(), ids=[c[0] for c in embedded_configs()])
def test_embedded_configs_are_valid(label, raw, tmp_path):
    cfg, storages = check_config(raw, tmp_path, "embedded")
    assert cfg.vault_auth_method == "k8s" and cfg.vault_auth_role
    if label.startswith(_rel(CRONJOB)):
        # The CronJob reaches the active node through the active Service.
        assert cfg.addr == "http://vault-active.vault.svc:8200"
        assert [s.config_key for s in storages] == ["local_storage"]
    else:
        # A sidecar talks to the Vault node of its own pod.
        assert cfg.addr == "http://127.0.0.1:8200"


def test_credentials_config_is_valid(tmp_path):
    with open(CREDS_CONFIG) as handle:
        raw = json.load(handle)
    assert raw["secret_id_file"] == "/run/credentials/vault-snapshot-agent.service/secret_id"
    cfg, _ = check_config(raw, tmp_path, "credentials")
    assert cfg.vault_auth_method == "approle" and cfg.secret_id is None
    # The same config is quoted in the unit's header.
    with open(CREDS_UNIT) as handle:
        lines = handle.read().splitlines()
    start = lines.index("# The config (/etc/vault.d/snapshot.json):") + 1
    quoted = []
    for line in lines[start:]:
        if line.strip() == "#":
            break
        quoted.append(line[1:])
    assert json.loads("\n".join(quoted)) == raw


# ---------------------------------------------------------------- systemd


def test_credentials_unit_keeps_the_hardening_and_loads_the_secret():
    plain = set(parse_unit(PLAIN_UNIT))
    creds = parse_unit(CREDS_UNIT)
    missing = [item for item in plain
               if item[0] == "Service" and item not in creds]
    assert missing == [], "the credentials unit lost %r" % missing
    assert ("Service", "LoadCredential", "secret_id:/etc/vault.d/snapshot-secret-id") in creds
    with open(CREDS_CONFIG) as handle:
        secret_id_file = json.load(handle)["secret_id_file"]
    # The credential's name is the file's name in the credentials directory.
    assert os.path.basename(secret_id_file) == "secret_id"
    with open(CREDS_UNIT) as handle:
        text = handle.read()
    assert "%d" in text and "$CREDENTIALS_DIRECTORY" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("path", UNIT_FILES, ids=_rel)
def test_systemd_unit_verifies(path, tmp_path):
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("/usr/bin/python3 (the units' ExecStart) does not exist here")
    # verify checks the unit under its file name: copy it under the name it
    # is installed as, so nothing in contrib/ is touched.
    unit = tmp_path / os.path.basename(path)
    shutil.copy(path, str(unit))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    own = [line for line in (proc.stdout + proc.stderr).splitlines()
           if os.path.basename(path) in line]
    assert proc.returncode == 0 and own == [], proc.stdout + proc.stderr


# ------------------------------------------------------------------ Docker


def dockerfile_instructions():
    return parse_dockerfile(DOCKERFILE)


def test_dockerfile_essentials():
    instructions = dockerfile_instructions()
    names = [name for name, _args in instructions]
    froms = [args for name, args in instructions if name == "FROM"]
    assert len(froms) == 1 and re.match(r"^python:3\.\d+-slim(@sha256:[0-9a-f]{64})?$", froms[0]), froms
    minor = int(froms[0].split(":")[1].split(".")[1].split("-")[0])
    assert 6 <= minor <= 13, "the agent supports Python 3.6 to 3.13"
    users = [args for name, args in instructions if name == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid"
    assert names.index("USER") > max(i for i, n in enumerate(names) if n == "RUN")
    for name, args in instructions:
        assert not re.search(r"\bpip3?\b|python3? -m pip", args), (name, args)
        # apt: tini (the init) and nothing else.
        for packages in re.findall(r"apt-get install((?: -\S+| [a-z0-9.+-]+)*)", args):
            assert [p for p in packages.split() if not p.startswith("-")] == ["tini"], args
    assert "HEALTHCHECK" not in names
    with open(DOCKERFILE) as handle:
        assert "--once" in handle.read(), "the missing HEALTHCHECK is explained"
    copies = [args for name, args in instructions if name in ("COPY", "ADD")]
    assert copies == ["vault_snapshot_agent.py /app/vault_snapshot_agent.py"]
    entry = [json.loads(args) for name, args in instructions if name == "ENTRYPOINT"]
    cmd = [json.loads(args) for name, args in instructions if name == "CMD"]
    assert entry == [ENTRYPOINT] and cmd == [IMAGE_CMD]
    parse_agent_args(cmd[0])
    labels = " ".join(args for name, args in instructions if name == "LABEL")
    for key in ("org.opencontainers.image.title", "org.opencontainers.image.version",
                "org.opencontainers.image.licenses"):
        assert key in labels


def test_dockerignore_keeps_the_agent():
    with open(DOCKERFILE + ".dockerignore") as handle:
        patterns = [line.strip() for line in handle
                    if line.strip() and not line.startswith("#")]
    assert patterns == ["*", "!vault_snapshot_agent.py"]


def _docker_unavailable():
    if shutil.which("docker") is None:
        return "docker is not installed"
    try:
        proc = subprocess.run(["docker", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "docker info failed: %s" % exc
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return "docker info failed (no working Docker engine): %s" % (lines[-1] if lines else "")
    return None


def test_docker_build():
    reason = _docker_unavailable()
    if reason:
        pytest.skip(reason)
    tag = "vault-snapshot-agent-test:contrib-%d" % os.getpid()
    try:
        proc = subprocess.run(["docker", "build", "-q", "-f", DOCKERFILE,
                               "--build-arg", "VERSION=%s" % vsa.__version__, "-t", tag, ROOT],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=900)
        assert proc.returncode == 0, proc.stdout
        proc = subprocess.run(["docker", "run", "--rm", "--read-only", "--cap-drop", "ALL",
                               tag, "--version"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
        assert proc.returncode == 0 and vsa.__version__ in proc.stdout, proc.stdout
        proc = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=300)
        assert proc.stdout.strip() == "65532", proc.stdout
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=300)


# ------------------------------------------------------------------ alerts


def alert_rules():
    return dict((rule["alert"], rule) for group in load_docs(ALERTS)[0]["groups"]
                for rule in group["rules"])


def test_alert_rules_shape():
    doc = load_docs(ALERTS)[0]
    names = [group["name"] for group in doc["groups"]]
    assert len(names) == len(set(names))
    rules = alert_rules()
    for name, rule in rules.items():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"], name
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), name
        if "for" in rule:
            assert re.match(r"^\d+[smhd]$", rule["for"]), name
        for metric in re.findall(r"\bvault_snapshot_[a-z_]+", expr):
            assert metric in METRICS, "%s uses unknown metric %s" % (name, metric)
    used = " ".join(rule["expr"] for rule in rules.values())
    for metric in METRICS:
        assert metric in used, metric
    too_old = rules["VaultSnapshotTooOld"]["expr"]
    assert "max without (instance" in too_old and "vault_snapshot_is_leader" in too_old
    assert "2 *" in too_old and "vault_snapshot_frequency_seconds" in too_old
    failing = rules["VaultSnapshotStorageFailing"]["expr"]
    assert "vault_snapshot_storage_consecutive_failures" in failing and ">= 2" in failing
    assert "vault_snapshot_is_leader" in failing
    assert re.search(r"\bup\{[^}]*\} == 0", rules["VaultSnapshotAgentDown"]["expr"])
    exported = vsa.Status(vsa.Clock()).metrics()       # every rule's metric is one the agent exports
    for metric in METRICS:
        assert "# TYPE %s " % metric in exported, metric


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)")
def test_alert_rules_pass_promtool_check():
    proc = subprocess.run([PROMTOOL, "check", "rules", ALERTS], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stdout


# Scenarios for `promtool test rules`. eval_time is minutes from 0; the
# gauges hold seconds. frequency is 1h, so "too old" is an age > 7200 s that
# lasts `for: 10m`.
PROMTOOL_TESTS = """
rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  # Failover: node a was leader and stored at t=60s, then b became leader and
  # has not stored yet. a's snapshot is the newest: no alert until it is older
  # than 2h (+10m), then one alert for that storage. a's count of failures in
  # a row (3) is frozen since it became a standby: no StorageFailing.
  - interval: 1m
    input_series:
      - series: 'vault_snapshot_last_success_timestamp_seconds{{job="vault-snapshot-agent",instance="a",storage="local",type="local"}}'
        values: '60x300'
      - series: 'vault_snapshot_last_success_timestamp_seconds{{job="vault-snapshot-agent",instance="b",storage="local",type="local"}}'
        values: '0x300'
      - series: 'vault_snapshot_is_leader{{job="vault-snapshot-agent",instance="a"}}'
        values: '1x10 0x290'
      - series: 'vault_snapshot_is_leader{{job="vault-snapshot-agent",instance="b"}}'
        values: '0x10 1x290'
      - series: 'vault_snapshot_frequency_seconds{{job="vault-snapshot-agent",instance="a"}}'
        values: '3600x300'
      - series: 'vault_snapshot_frequency_seconds{{job="vault-snapshot-agent",instance="b"}}'
        values: '3600x300'
      - series: 'vault_snapshot_storage_consecutive_failures{{job="vault-snapshot-agent",instance="a",storage="local",type="local"}}'
        values: '3x300'
      - series: 'up{{job="vault-snapshot-agent",instance="a"}}'
        values: '1x300'
      - series: 'up{{job="vault-snapshot-agent",instance="b"}}'
        values: '1x300'
    alert_rule_test:
      - eval_time: 100m
        alertname: VaultSnapshotTooOld
        exp_alerts: []
      - eval_time: 150m
        alertname: VaultSnapshotTooOld
        exp_alerts:
          - exp_labels: {{severity: critical, job: vault-snapshot-agent, storage: local, type: local}}
      - eval_time: 150m
        alertname: VaultSnapshotStorageFailing
        exp_alerts: []
      - eval_time: 150m
        alertname: VaultSnapshotAgentDown
        exp_alerts: []

  # The leader stores hourly in "local"; its agent restarts at 200m (the gauge
  # is 0 until it stores again at 241m): no alert, the last success is
  # remembered. "s3" never succeeded: alert. Another cluster, whose agent sees
  # no leader, stays quiet. "local" fails once at 51m and heals on the retry:
  # quiet. "s3" fails from 101m, twice in a row from 102m, stores at 201m:
  # alert in between. Agent c goes down.
  - interval: 1m
    input_series:
      - series: 'vault_snapshot_last_success_timestamp_seconds{{job="vault-snapshot-agent",instance="a",storage="local",type="local"}}'
        values: '0 60x59 3660x59 7260x59 10860x18 0x40 14460x59'
      - series: 'vault_snapshot_last_success_timestamp_seconds{{job="vault-snapshot-agent",instance="a",storage="s3",type="s3"}}'
        values: '0x300'
      - series: 'vault_snapshot_is_leader{{job="vault-snapshot-agent",instance="a"}}'
        values: '1x300'
      - series: 'vault_snapshot_frequency_seconds{{job="vault-snapshot-agent",instance="a"}}'
        values: '3600x300'
      - series: 'vault_snapshot_last_success_timestamp_seconds{{job="vault-snapshot-agent",instance="c",storage="local",type="local",cluster="other"}}'
        values: '0x300'
      - series: 'vault_snapshot_is_leader{{job="vault-snapshot-agent",instance="c",cluster="other"}}'
        values: '0x300'
      - series: 'vault_snapshot_frequency_seconds{{job="vault-snapshot-agent",instance="c",cluster="other"}}'
        values: '3600x300'
      - series: 'vault_snapshot_storage_consecutive_failures{{job="vault-snapshot-agent",instance="a",storage="s3",type="s3"}}'
        values: '0x100 1 2x98 0x100'
      - series: 'vault_snapshot_storage_consecutive_failures{{job="vault-snapshot-agent",instance="a",storage="local",type="local"}}'
        values: '0x50 1 0x248'
      - series: 'up{{job="vault-snapshot-agent",instance="a"}}'
        values: '1x300'
      - series: 'up{{job="vault-snapshot-agent",instance="c",cluster="other"}}'
        values: '1x100 0x200'
    alert_rule_test:
      - eval_time: 100m
        alertname: VaultSnapshotTooOld
        exp_alerts: []
      - eval_time: 235m
        alertname: VaultSnapshotTooOld
        exp_alerts:
          - exp_labels: {{severity: critical, job: vault-snapshot-agent, storage: s3, type: s3}}
      - eval_time: 290m
        alertname: VaultSnapshotTooOld
        exp_alerts:
          - exp_labels: {{severity: critical, job: vault-snapshot-agent, storage: s3, type: s3}}
      - eval_time: 51m
        alertname: VaultSnapshotStorageFailing
        exp_alerts: []
      - eval_time: 101m
        alertname: VaultSnapshotStorageFailing
        exp_alerts: []
      - eval_time: 120m
        alertname: VaultSnapshotStorageFailing
        exp_alerts:
          - exp_labels: {{severity: warning, job: vault-snapshot-agent, storage: s3, type: s3}}
      - eval_time: 250m
        alertname: VaultSnapshotStorageFailing
        exp_alerts: []
      - eval_time: 120m
        alertname: VaultSnapshotAgentDown
        exp_alerts:
          - exp_labels: {{severity: warning, job: vault-snapshot-agent, instance: c, cluster: other}}
      - eval_time: 120m
        alertname: VaultSnapshotAgentAbsent
        exp_alerts: []

  # Re-verification: the leader a finds 2 bad snapshots in "s3" from 30m to
  # 60m; b, a standby since 10m, still shows the 1 it found while it led.
  # Only the leader's finding alerts, and only while it stands.
  - interval: 1m
    input_series:
      - series: 'vault_snapshot_verify_bad_snapshots{{job="vault-snapshot-agent",instance="a",storage="s3",type="s3"}}'
        values: '0x30 2x30 0x60'
      - series: 'vault_snapshot_verify_bad_snapshots{{job="vault-snapshot-agent",instance="b",storage="local",type="local"}}'
        values: '1x120'
      - series: 'vault_snapshot_is_leader{{job="vault-snapshot-agent",instance="a"}}'
        values: '0x10 1x110'
      - series: 'vault_snapshot_is_leader{{job="vault-snapshot-agent",instance="b"}}'
        values: '1x10 0x110'
      - series: 'up{{job="vault-snapshot-agent",instance="a"}}'
        values: '1x120'
      - series: 'up{{job="vault-snapshot-agent",instance="b"}}'
        values: '1x120'
    alert_rule_test:
      - eval_time: 5m
        alertname: VaultSnapshotVerifyFailed
        exp_alerts:
          - exp_labels: {{severity: critical, job: vault-snapshot-agent, storage: local, type: local}}
      - eval_time: 20m
        alertname: VaultSnapshotVerifyFailed
        exp_alerts: []
      - eval_time: 45m
        alertname: VaultSnapshotVerifyFailed
        exp_alerts:
          - exp_labels: {{severity: critical, job: vault-snapshot-agent, storage: s3, type: s3}}
      - eval_time: 90m
        alertname: VaultSnapshotVerifyFailed
        exp_alerts: []

  # CronJob flavour through kube-state-metrics: last success at 10 minutes.
  # No agent is scraped at all here: VaultSnapshotAgentAbsent.
  - interval: 1m
    input_series:
      - series: 'kube_cronjob_status_last_successful_time{{namespace="vault",cronjob="vault-snapshot-agent",instance="ksm:8080"}}'
        values: '600x300'
    alert_rule_test:
      - eval_time: 120m
        alertname: VaultSnapshotCronJobNotSucceeding
        exp_alerts: []
      - eval_time: 150m
        alertname: VaultSnapshotCronJobNotSucceeding
        exp_alerts:
          - exp_labels: {{severity: critical, namespace: vault, cronjob: vault-snapshot-agent}}
      - eval_time: 150m
        alertname: VaultSnapshotAgentAbsent
        exp_alerts:
          - exp_labels: {{severity: warning, job: vault-snapshot-agent}}
"""


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)")
def test_alert_rules_behave(tmp_path):
    # promtool compares annotations too when alerts are expected: test the
    # expressions, `for` and labels on a copy without them (check rules above
    # parses the annotation templates).
    doc = load_docs(ALERTS)[0]
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(doc))
    tests = tmp_path / "alerts_test.yaml"
    tests.write_text(PROMTOOL_TESTS.format(rules=json.dumps(str(rules))))
    proc = subprocess.run([PROMTOOL, "test", "rules", str(tests)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stdout


def test_the_full_example_config_passes_check_config_with_its_files_in_place(tmp_path):
    # contrib/snapshot-full.json shows every block; it checks clean once the
    # files and programs it names exist (here under a temporary root).
    root = tmp_path / "root"
    doc = json.loads(read(os.path.join(CONTRIB, "snapshot-full.json")))

    def rooted(value):
        if isinstance(value, dict):
            return dict((k, rooted(v)) for k, v in value.items())
        if isinstance(value, list):
            return [rooted(v) for v in value]
        if isinstance(value, str) and value.startswith("/"):
            return str(root) + value
        return value
    doc = rooted(doc)
    os.makedirs(os.path.dirname(doc["ca_cert"]))
    with open(doc["ca_cert"], "w") as handle:
        handle.write(read(vsa_ca_bundle()))
    with open(doc["secret_id_file"], "w") as handle:
        handle.write("secret-id-example\n")
    os.chmod(doc["secret_id_file"], 0o600)
    os.makedirs(os.path.dirname(doc["notify_command"][0]))
    with open(doc["notify_command"][0], "w") as handle:
        handle.write("#!/bin/sh\nexit 0\n")
    os.chmod(doc["notify_command"][0], 0o755)
    os.makedirs(os.path.dirname(doc["status_file"]))
    config = tmp_path / "snapshot.json"
    config.write_text(json.dumps(doc))
    os.chmod(str(config), 0o600)
    log, out = io.StringIO(), io.StringIO()
    assert vsa.main(["-c", str(config), "--check-config"], stream=log, out=out, env={}) == 0, log.getvalue()
    shown = json.loads(out.getvalue())
    for key in ("local_storage", "aws_storage", "azure_storage", "google_storage", "status_file",
                "metrics_address", "proxy", "verify_frequency", "notify_url", "max_space"):
        assert shown.get(key) not in (None, [], {}), key
    assert "unknown config key" not in log.getvalue() and "WARNING" not in log.getvalue()


def vsa_ca_bundle():
    """A CA bundle of this machine (any PEM of certificates will do)."""
    for path in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
        if os.path.isfile(path):
            return path
    import ssl
    return ssl.get_default_verify_paths().cafile


def test_readme_and_policy_file_name_the_same_approle_role():
    readme = read(os.path.join(ROOT, "README.md"))
    policy = read(os.path.join(CONTRIB, "snapshot-policy.hcl"))
    roles = set(re.findall(r"auth/approle/role/([A-Za-z0-9_-]+)", readme + policy))
    assert roles == {"snapshot"}, roles
    assert "token_policies=snapshot" in readme and "vault policy write snapshot" in readme


# ------------------------------------------------------------------ Grafana


DASHBOARD = os.path.join(DEPLOY, "grafana-dashboard.json")
# Metric families the agent exports that no panel shows, each with the reason.
DASHBOARD_LEAVES_OUT = {
    "vault_snapshot_last_raft_index": "Vault's own progress, not the agent's; Vault's dashboards show it",
}
# What Grafana puts in for its variables, for promtool.
GRAFANA_VARIABLES = (("$__rate_interval", "5m"), ("$job", "vault-snapshot-agent"))
METRIC_RE = re.compile(r"\bvault_snapshot_[a-z_]+")


def dashboard():
    with open(DASHBOARD) as handle:
        return json.load(handle)


def dashboard_queries():
    """[(panel title and refId, PromQL)] of every panel target."""
    return [("%s/%s" % (panel["title"], target["refId"]), target["expr"])
            for panel in dashboard()["panels"] for target in panel["targets"]]


def metrics_after_a_cycle(tmp_path):
    """The agent's metrics text after one stored cycle (with the families
    only a stored snapshot brings) of a real Agent against a FakeVault."""
    from support.agent_sim import fake_clock, write_config
    from support.fake_endpoints import FakeVault
    from support.harness import FakeSignals
    with FakeVault(role_id="r", secret_id="s") as vault:
        path = write_config(tmp_path, {"addr": vault.url, "role_id": "r", "secret_id": "s",
                                       "local_storage": {"path": str(tmp_path / "snaps")}})
        clock = fake_clock()
        agent = vsa.Agent(lambda runtime: vsa.load_all(path, runtime), clock, FakeSignals(clock), env={})
        assert agent.run_cycle().outcome == "stored"
    return agent.status.metrics()


def test_grafana_dashboard_shape():
    doc = dashboard()
    assert 36 <= doc["schemaVersion"] <= 41 and doc["uid"] and doc["title"]
    variables = dict((v["name"], v) for v in doc["templating"]["list"])
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["job"]["current"]["value"] == ["vault-snapshot-agent"]      # alerts.yaml's job
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    assert variables["job"]["datasource"] == source
    panels = doc["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), ids
    titles = [panel["title"] for panel in panels]
    assert len(titles) == len(set(titles)), titles
    taken = set()
    for panel in panels:
        assert panel["type"] in ("stat", "timeseries", "table", "bargauge", "gauge"), panel["title"]
        assert panel["datasource"] == source and panel["description"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(target["datasource"] == source and target["expr"] for target in panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        cells = set((x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                    for y in range(grid["y"], grid["y"] + grid["h"]))
        assert not cells & taken, "%s overlaps another panel" % panel["title"]
        taken |= cells
    wanted = ("leader", "last success age", "consecutive failures", "snapshot size", "cycle duration",
              "cycles by outcome", "retention failures", "last verified age", "bad snapshots")
    lowered = " | ".join(titles).lower()
    assert [w for w in wanted if w not in lowered] == []


def test_grafana_dashboard_uses_exactly_the_metrics_the_agent_exports(tmp_path):
    exported = vsa.Status(vsa.Clock()).metrics() + metrics_after_a_cycle(tmp_path)
    families = set(re.findall(r"^# TYPE (\S+) ", exported, re.M))
    assert "vault_snapshot_last_size_bytes" in families         # only after a stored snapshot
    used = set()
    for where, expr in dashboard_queries():
        names = set(METRIC_RE.findall(expr))
        assert names, "%s queries no metric of the agent" % where
        unknown = sorted(name for name in names if "# TYPE %s " % name not in exported)
        assert unknown == [], "%s: %s" % (where, unknown)
        # Each selector picks the dashboard's job, as alerts.yaml's rules do.
        assert len(re.findall(r"\bvault_snapshot_[a-z_]+\{job=~\"\$job\"\}", expr)) == \
            len(METRIC_RE.findall(expr)), where
        used |= names
    for variable in dashboard()["templating"]["list"]:
        query = json.dumps(variable.get("query", ""))
        assert set(METRIC_RE.findall(query)) <= families, variable["name"]
    assert sorted(families - used - set(DASHBOARD_LEAVES_OUT)) == [], "exported but on no panel"
    assert sorted(set(DASHBOARD_LEAVES_OUT) & used) == [], "on a panel and in DASHBOARD_LEAVES_OUT"
    assert set(DASHBOARD_LEAVES_OUT) <= families


def dashboard_series(exposition):
    """promtool input series for every sample of ``exposition``, from one agent
    (job vault-snapshot-agent, instance a, the leader): counters count up one
    a minute, gauges hold 1 (a time in seconds: just after the epoch)."""
    kinds = dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M))
    series = []
    for line in exposition.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, labels = re.match(r"([a-z_]+)(?:\{(.*)\})? ", line).groups()
        labels = ",".join(filter(None, [labels, 'job="vault-snapshot-agent"', 'instance="a"']))
        values = "0+1x300" if kinds[name] == "counter" else "1+0x300"
        series.append({"series": "%s{%s}" % (name, labels), "values": values})
    return series


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)")
def test_grafana_dashboard_queries_return_data_for_the_agents_series(tmp_path):
    # Each panel query, as an alert "count(query) > 0", must fire after 3 h
    # of series shaped as the agent exports them: every query parses and
    # matches the labels the agent sets.
    rules = []
    for number, (where, expr) in enumerate(dashboard_queries()):
        for name, value in GRAFANA_VARIABLES:
            expr = expr.replace(name, value)
        rules.append({"alert": "Query%d" % number, "expr": "count(%s) > 0" % expr,
                      "annotations": {"summary": where}})
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    test = {"rule_files": [str(tmp_path / "rules.yaml")], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": dashboard_series(metrics_after_a_cycle(tmp_path)),
                       "alert_rule_test": [{"eval_time": "3h", "alertname": rule["alert"],
                                            "exp_alerts": [{"exp_labels": {},
                                                            "exp_annotations": rule["annotations"]}]}
                                           for rule in rules]}]}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    proc = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "test.yaml")], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
