"""Offline checks of the Helm chart (helm/twinstream): lint and `helm template` with Helm v4's Go SDK
(helm-python-sdk) and with the real helm CLI (v4.1.4, var/tools/helm from scripts/setup.sh) for
every ci/*-values.yaml, strict validation of every rendered manifest against the Kubernetes JSON
schemas (kubernetes-validate), the `helm test` pod, and the properties the deployment relies on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import _native
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "twinstream"
PROD_VALUES = CHART / "ci" / "prod-values.yaml"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
HELM = REPO / "var" / "tools" / "helm"
needs_helm = pytest.mark.skipif(not HELM.exists(),
                                reason="no helm CLI at var/tools/helm (scripts/setup.sh installs it)")
CRD_SCHEMAS = CHART / "ci" / "crd-schemas"
RELEASE, NAMESPACE = "ts", "twinstream"
# Validated against the chart's minimum Kubernetes (Chart.yaml kubeVersion) and a recent one.
MIN_KUBE = re.sub(r"^>=\s*([0-9.]+).*$", r"\1", yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"])
RECENT_KUBE = "1.36.0"
OPERATOR_APIS = ("keda.sh/v1alpha1", "monitoring.coreos.com/v1")
HEALTH_PORT = 8081  # values.yaml runtime.healthPort: the probes' port in every service pod
# service -> (gRPC port, metrics port, consumed topic)
SERVICES = {
    "ingestion": (50051, 9101, "items.raw"),
    "embedding": (50052, 9102, "items.accepted"),
    "indexing": (50053, 9103, "items.embedded"),
    "matching": (50054, 9104, ""),
}
# The one lint finding allowed: the optional subcharts are declared but not downloaded, since no
# chart repository is reachable here (`helm dependency build` fetches them; docs/deploy.md).
MISSING_DEPENDENCIES = "chart directory is missing these dependencies: milvus,kafka"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")

Manifest = dict[str, Any]


def render_files(values: dict[str, Any] | None = None, *, api_versions: Sequence[str] = (),
                 kube_version: str = RECENT_KUBE, release: str = RELEASE) -> dict[str, str]:
    """`helm template --kube-version --api-versions`, strict (a missing value is an error).

    Chart.render() exposes no api_versions, kube_version or strict parameters, but libhelm_c's
    helm_render accepts them in its options JSON, so this calls the binding's native layer.
    """
    options = {"name": release, "namespace": NAMESPACE, "is_install": True, "strict": True,
               "kube_version": f"v{kube_version}", "api_versions": list(api_versions)}
    with helm.Chart.load(CHART) as chart:
        rendered: dict[str, str] = json.loads(_native.call_string(
            "helm_render", chart._raw(), None if values is None else json.dumps(values), json.dumps(options)))
    return rendered


def manifests_of(rendered: dict[str, str]) -> list[Manifest]:
    """Every Kubernetes object in the rendered templates (NOTES.txt left out)."""
    return [doc for path, text in sorted(rendered.items()) if path.endswith((".yaml", ".yml"))
            for doc in yaml.safe_load_all(text) if doc]


def render(values: dict[str, Any] | None = None, **kwargs: Any) -> list[Manifest]:
    return manifests_of(render_files(values, **kwargs))


def prod_values() -> dict[str, Any]:
    return helm.values_from_yaml(PROD_VALUES.read_text())


def find(manifests: Iterable[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]


def one(manifests: Iterable[Manifest], kind: str, name: str) -> Manifest:
    found = find(manifests, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workload(manifests: Iterable[Manifest], component: str) -> Manifest:
    found = [m for m in manifests if m["kind"] in ("Deployment", "StatefulSet")
             and m["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one workload for {component}, found {len(found)}"
    return found[0]


def container(manifest: Manifest, name: str | None = None) -> dict[str, Any]:
    containers = manifest["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if name is None or c["name"] == name)


def env_of(manifest: Manifest) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(manifest).get("env", [])}


def pod_specs(manifests: Iterable[Manifest]) -> list[tuple[str, dict[str, Any]]]:
    return [(f'{m["kind"]}/{m["metadata"]["name"]}', m["spec"]["template"]["spec"])
            for m in manifests if m["kind"] in WORKLOAD_KINDS]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module")
def default() -> list[Manifest]:
    return render()


@pytest.fixture(scope="module")
def prod() -> list[Manifest]:
    return render(prod_values(), api_versions=OPERATOR_APIS)


# -- lint and schema validation ---------------------------------------------------------------


@pytest.mark.parametrize("values_name", ["default", "prod"])
def test_lint_strict(values_name: str) -> None:
    values = prod_values() if values_name == "prod" else None
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{RECENT_KUBE}")
    assert report["total_charts_linted"] == 1
    findings = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    assert findings == [MISSING_DEPENDENCIES], report
    assert report["errors"] == [MISSING_DEPENDENCIES], report


def test_lint_reports_schema_violations() -> None:
    report = helm.lint(CHART, {"triton": {"gpu": -1}}, strict=True, kube_version=f"v{RECENT_KUBE}")
    assert any("/triton/gpu" in error for error in report["errors"]), report


def _kube_definitions(kube_version: str) -> Any:
    path = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{kube_version}-local-strict"
    return json.loads((path / "_definitions.json").read_text())


@cache
def crd_validator(api_version: str, kind: str, kube_version: str) -> jsonschema.protocols.Validator:
    """Our minimal strict schema for a CRD kind kubernetes-validate has none for; ObjectMeta and
    LabelSelector come from kubernetes-validate's definitions for that Kubernetes version."""
    group, version = api_version.split("/")
    schema = json.loads((CRD_SCHEMAS / f"{kind.lower()}-{group.split('.')[0]}-{version}.json").read_text())
    definitions = Resource.from_contents(_kube_definitions(kube_version))
    registry: Registry[Any] = Registry().with_resource("https://kubernetes.io/api/_definitions.json", definitions)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validation_errors(manifest: Manifest, kube_version: str) -> list[str]:
    where = f'{manifest["kind"]}/{manifest["metadata"]["name"]}'
    if manifest["apiVersion"].split("/")[0] in ("keda.sh", "monitoring.coreos.com"):
        validator = crd_validator(manifest["apiVersion"], manifest["kind"], kube_version)
        return [f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(manifest)]
    try:
        kubernetes_validate.validate(manifest, kube_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: {e.message}"]
    return []


@pytest.mark.parametrize("kube_version", [MIN_KUBE, RECENT_KUBE])
@pytest.mark.parametrize("values_name", ["default", "prod"])
def test_manifests_validate_strictly(values_name: str, kube_version: str) -> None:
    if values_name == "prod":
        manifests = render(prod_values(), api_versions=OPERATOR_APIS, kube_version=kube_version)
    else:
        manifests = render(kube_version=kube_version)
    assert len(manifests) > 10
    errors = [error for m in manifests for error in validation_errors(m, kube_version)]
    assert errors == []


def test_validation_catches_mistakes(prod: list[Manifest]) -> None:
    """The validators reject what the API server or the operators would."""
    deployment = json.loads(json.dumps(workload(prod, "matching")))
    container(deployment)["livenessProbe"]["grpc"]["prot"] = 1
    assert validation_errors(deployment, RECENT_KUBE)
    scaled = json.loads(json.dumps(one(prod, "ScaledObject", f"{RELEASE}-twinstream-embedding")))
    scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 500  # KEDA wants strings
    assert validation_errors(scaled, RECENT_KUBE)
    monitor = json.loads(json.dumps(find(prod, "ServiceMonitor")[0]))
    monitor["spec"]["endpoints"][0]["interval"] = "often"
    assert validation_errors(monitor, RECENT_KUBE)


def test_default_and_prod_values_match_the_schema() -> None:
    with helm.Chart.load(CHART) as chart:
        assert chart.schema is not None
        chart.validate_schema(chart.values)
        chart.validate_schema(prod_values())


BAD_VALUES = {
    "gpu count as text": "triton:\n  gpu: one\n",
    "keda on matching, which consumes no topic": (
        "services:\n  matching:\n    autoscaling:\n      keda: {enabled: true}\n"),
    "unknown top-level key": "replicaCount: 3\n",
    "bootstrap without a port": "externalKafka:\n  bootstrap: kafka\n",
    "pvc source without a claim": "models:\n  source: pvc\n  existingClaim: ''\n",
    "port out of range": "services:\n  ingestion:\n    grpcPort: 70000\n",
    "typo in a service key": "services:\n  embedding:\n    replica: 3\n",
    "external triton without url": "triton:\n  enabled: false\n  url: ''\n",
    "bad log level": "config:\n  logLevel: verbose\n",
    "topic of an unknown role": "topics:\n  names: {queue: items.queue}\n",
    "topic name with a space": "topics:\n  names: {raw: items raw}\n",
    "topic names as a list": "topics:\n  names: [items.raw, items.accepted]\n",
}


@pytest.mark.parametrize("text", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_file_is_rejected(text: str) -> None:
    values = helm.values_from_yaml(text)
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError, match="schema"):
        render_files(values)


# -- the services ---------------------------------------------------------------------------


def test_four_services_with_their_ports_and_commands(default: list[Manifest]) -> None:
    for name, (grpc_port, metrics_port, _topic) in SERVICES.items():
        manifest = workload(default, name)
        assert manifest["metadata"]["name"] == f"{RELEASE}-twinstream-{name}"
        # ingestion keeps its idempotency store on a volume per replica
        assert manifest["kind"] == ("StatefulSet" if name == "ingestion" else "Deployment")
        main = container(manifest)
        assert main["command"] == ["python", "-m", f"twinstream.{name}"]
        assert {p["name"]: p["containerPort"] for p in main["ports"]} == {
            "grpc": grpc_port, "metrics": metrics_port, "health": HEALTH_PORT}
        env = env_of(manifest)
        assert env["TWINSTREAM_GRPC_PORT"] == str(grpc_port)
        assert env["TWINSTREAM_METRICS_PORT"] == str(metrics_port)
        assert env["TWINSTREAM_GRPC_HOST"] == "0.0.0.0"  # the code's default, 127.0.0.1, is unreachable
        service = one(default, "Service", f"{RELEASE}-twinstream-{name}")
        assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
            "grpc": (grpc_port, "grpc"), "metrics": (metrics_port, "metrics"),
            "health": (HEALTH_PORT, "health")}
        assert selects(service["spec"]["selector"], manifest["spec"]["template"]["metadata"]["labels"])
    assert len([m for m in default if m["kind"] in ("Deployment", "StatefulSet")]) == 5  # + Triton


def test_probes_are_native_grpc_on_the_plain_text_health_port(default: list[Manifest]) -> None:
    """The health port has its own plain-text server and pool: kubelet gRPC probes cannot speak
    TLS, and open streams cannot starve the probes; with TLS off the probes still go there."""
    plain = render({"security": {"tls": {"enabled": False}}})
    for name in SERVICES:
        main = container(workload(default, name))
        assert env_of(workload(default, name))["TWINSTREAM_HEALTH_PORT"] == str(HEALTH_PORT)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert main[probe]["grpc"] == {"port": HEALTH_PORT}, (name, probe)
            assert not {"httpGet", "tcpSocket", "exec"} & set(main[probe]), (name, probe)
            assert container(workload(plain, name))[probe]["grpc"] == {"port": HEALTH_PORT}


def test_termination_grace_is_derived_from_the_drain_and_grace_the_services_get() -> None:
    manifests = render({"runtime": {"drainSeconds": 7, "graceSeconds": 11}})
    for name in SERVICES:
        manifest = workload(manifests, name)
        env = env_of(manifest)
        assert (env["TWINSTREAM_SHUTDOWN_DRAIN_S"], env["TWINSTREAM_SHUTDOWN_GRACE_S"]) == ("7", "11")
        assert manifest["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 7 + 11 + 15


def test_env_carries_backends_from_values() -> None:
    uri = "https://milvus.vector.example:19530"
    manifests = render({"externalMilvus": {"uri": uri}, "externalKafka": {"bootstrap": "k1:9092,k2:9092"},
                        "models": {"bundles": ["text/2", "image/1"], "mountPath": "/srv/models"}})
    envs = {name: env_of(workload(manifests, name)) for name in SERVICES}
    assert {n for n, e in envs.items() if e.get("TWINSTREAM_MILVUS_URI") == uri} == {"indexing", "matching"}
    assert not any("TWINSTREAM_MILVUS_URI" in envs[n] for n in ("ingestion", "embedding"))
    for name, (_grpc, _metrics, topic) in SERVICES.items():
        if topic:
            assert envs[name]["TWINSTREAM_KAFKA_BOOTSTRAP"] == "k1:9092,k2:9092"
            assert envs[name]["TWINSTREAM_CONSUMER_GROUP"] == f"twinstream-{name}"
    # matching publishes Delete's store commands (docs/store.md) but consumes nothing
    assert envs["matching"]["TWINSTREAM_KAFKA_BOOTSTRAP"] == "k1:9092,k2:9092"
    assert "TWINSTREAM_CONSUMER_GROUP" not in envs["matching"]
    for name in ("embedding", "indexing", "matching"):
        assert envs[name]["TWINSTREAM_MODEL_DIR"] == "/srv/models/text/2,/srv/models/image/1"
        mounts = {m["name"]: m for m in container(workload(manifests, name))["volumeMounts"]}
        assert mounts["models"]["mountPath"] == "/srv/models" and mounts["models"]["readOnly"] is True
    # Triton's address is its Service's gRPC port
    triton = one(manifests, "Service", f"{RELEASE}-twinstream-triton")
    grpc_port = next(p["port"] for p in triton["spec"]["ports"] if p["name"] == "grpc")
    for name in ("embedding", "matching"):
        assert envs[name]["TWINSTREAM_TRITON_URL"] == f"{RELEASE}-twinstream-triton:{grpc_port}"
    assert envs["ingestion"]["TWINSTREAM_DATA_DIR"] == "/data"


def test_subcharts_are_optional_and_wired_when_enabled() -> None:
    dependencies = {d["name"]: d for d in yaml.safe_load((CHART / "Chart.yaml").read_text())["dependencies"]}
    conditions = {name: d["condition"] for name, d in dependencies.items()}
    assert conditions == {"milvus": "milvus.enabled", "kafka": "kafka.enabled"}
    with helm.Chart.load(CHART) as chart:
        assert chart.values["milvus"]["enabled"] is False and chart.values["kafka"]["enabled"] is False
    manifests = render({"milvus": {"enabled": True}, "kafka": {"enabled": True}})
    assert env_of(workload(manifests, "matching"))["TWINSTREAM_MILVUS_URI"] == f"http://{RELEASE}-milvus:19530"
    assert env_of(workload(manifests, "embedding"))["TWINSTREAM_KAFKA_BOOTSTRAP"] == f"{RELEASE}-kafka:9092"


def test_milvus_token_comes_from_a_secret() -> None:
    existing = render({"externalMilvus": {"existingSecret": "milvus-auth", "existingSecretKey": "apikey"}})
    ref = env_of(workload(existing, "indexing"))["TWINSTREAM_MILVUS_TOKEN"]
    assert ref == {"secretKeyRef": {"name": "milvus-auth", "key": "apikey"}}
    assert find(existing, "Secret") == []
    assert "TWINSTREAM_MILVUS_TOKEN" not in env_of(workload(render(), "matching"))


@pytest.mark.parametrize("values", [
    {"externalMilvus": {"token": "root:Milvus"}},
    {"config": {"extraEnv": {"TWINSTREAM_MILVUS_TOKEN": "root:Milvus"}}},
    {"services": {"indexing": {"env": {"TWINSTREAM_KAFKA_SASL_PASSWORD": "hunter2"}}}},
], ids=["milvus-token", "extra-env", "service-env"])
def test_the_schema_rejects_a_secret_written_into_values(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{RECENT_KUBE}")
    assert any("values don't meet the specifications" in e for e in report["errors"]), report


def test_grpc_tls_and_the_token_key_are_mounted_from_secrets(default: list[Manifest]) -> None:
    for name in SERVICES:
        manifest = workload(default, name)
        env = env_of(manifest)
        assert env["TWINSTREAM_TLS_CERT_FILE"] == "/etc/twinstream/tls/tls.crt"
        assert env["TWINSTREAM_TLS_KEY_FILE"] == "/etc/twinstream/tls/tls.key"
        assert env["TWINSTREAM_AUTH_TOKEN_KEY_FILE"] == "/etc/twinstream/auth/token.key"
        assert "TWINSTREAM_GRPC_PLAINTEXT" not in env and "TWINSTREAM_AUTH_DISABLED" not in env
        volumes = {v["name"]: v for v in manifest["spec"]["template"]["spec"]["volumes"]}
        assert volumes["grpc-tls"]["secret"]["secretName"] == f"{RELEASE}-twinstream-grpc-tls"
        assert volumes["token-key"]["secret"]["secretName"] == f"{RELEASE}-twinstream-token-key"
        mounts = {m["name"]: m for m in container(manifest)["volumeMounts"]}
        assert mounts["grpc-tls"]["readOnly"] is True and mounts["token-key"]["readOnly"] is True
    named = render({"security": {"tls": {"existingSecret": "certs", "clientAuth": True},
                                 "auth": {"existingSecret": "keys", "existingSecretKey": "k"}}})
    env = env_of(workload(named, "matching"))
    assert env["TWINSTREAM_TLS_CLIENT_AUTH"] == "true"
    assert env["TWINSTREAM_AUTH_TOKEN_KEY_FILE"] == "/etc/twinstream/auth/k"
    volumes = {v["name"]: v for v in workload(named, "matching")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["grpc-tls"]["secret"]["secretName"] == "certs"
    off = render({"security": {"tls": {"enabled": False}, "auth": {"enabled": False}}})
    env = env_of(workload(off, "matching"))
    assert env["TWINSTREAM_GRPC_PLAINTEXT"] == "true" and env["TWINSTREAM_AUTH_DISABLED"] == "true"


def test_kafka_sasl_and_backend_cas_come_from_secrets() -> None:
    manifests = render({"externalKafka": {"securityProtocol": "SASL_SSL",
                                          "sasl": {"mechanism": "SCRAM-SHA-512", "existingSecret": "kafka-user"},
                                          "tls": {"existingSecret": "kafka-ca"}},
                        "externalMilvus": {"uri": "https://m:19530", "tls": {"existingSecret": "milvus-ca"}}})
    env = env_of(workload(manifests, "indexing"))
    assert env["TWINSTREAM_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["TWINSTREAM_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env["TWINSTREAM_KAFKA_SASL_PASSWORD"] == {"secretKeyRef": {"name": "kafka-user", "key": "password"}}
    assert env["TWINSTREAM_KAFKA_SSL_CA_FILE"] == "/etc/twinstream/kafka-tls/ca.crt"
    assert env["TWINSTREAM_MILVUS_CA_FILE"] == "/etc/twinstream/milvus-tls/ca.crt"
    assert "TWINSTREAM_MILVUS_CA_FILE" not in env_of(workload(manifests, "embedding"))


def test_network_policies_let_only_the_needed_traffic_through(default: list[Manifest]) -> None:
    policies = {p["metadata"]["name"].removeprefix(f"{RELEASE}-twinstream-"): p["spec"]
                for p in find(default, "NetworkPolicy")}
    assert set(policies) == {*SERVICES, "triton"}
    for name, (grpc_port, metrics_port, _topic) in SERVICES.items():
        spec = policies[name]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        opened = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
        api = {grpc_port} if name in ("ingestion", "matching") else set()
        assert opened == api | {HEALTH_PORT, metrics_port}, name
        egress = {p["port"] for rule in spec["egress"] for p in rule["ports"]}
        expected = {53, 9092} | ({19530} if name in ("indexing", "matching") else set()) \
            | ({8001} if name in ("embedding", "matching") else set())
        assert egress == expected, name
    triton_from = [peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                   for rule in policies["triton"]["ingress"] for peer in rule.get("from", [])]
    assert sorted(triton_from) == ["embedding", "matching"]
    assert policies["triton"]["egress"] == []
    clients = [{"namespaceSelector": {"matchLabels": {"team": "search"}}}]
    restricted = render({"networkPolicy": {"clients": clients}})
    matching = one(restricted, "NetworkPolicy", f"{RELEASE}-twinstream-matching")["spec"]
    api_rule = next(r for r in matching["ingress"] if {"port": 50054, "protocol": "TCP"} in r["ports"])
    assert api_rule["from"] == clients
    assert find(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy") == []


def test_only_the_chart_binds_all_addresses() -> None:
    from twinstream.common.config import Settings

    assert Settings().server.grpc_host == "127.0.0.1"
    with helm.Chart.load(CHART) as chart:
        assert chart.values["config"]["bindAddress"] == "0.0.0.0"


def test_pods_run_hardened(prod: list[Manifest]) -> None:
    specs = pod_specs(prod)
    assert len(specs) == 6  # four services, Triton, the topics Job
    for where, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["automountServiceAccountToken"] is False, where
        for c in spec["containers"] + spec.get("initContainers", []):
            context = c["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert context["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert c["resources"]["requests"]["memory"], (where, c["name"])
            assert "memory" in c["resources"]["limits"], (where, c["name"])


def test_ingestion_store_is_one_volume_per_replica(prod: list[Manifest]) -> None:
    ingestion = workload(prod, "ingestion")
    assert ingestion["kind"] == "StatefulSet" and ingestion["spec"]["replicas"] == 3
    claim = ingestion["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert one(prod, "Service", ingestion["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    ephemeral = workload(render({"services": {"ingestion": {"persistence": {"enabled": False}}}}), "ingestion")
    assert ephemeral["kind"] == "Deployment"
    assert {"name": "data", "emptyDir": {"sizeLimit": "2Gi"}} in ephemeral["spec"]["template"]["spec"]["volumes"]


def test_each_service_selector_picks_one_workload(prod: list[Manifest]) -> None:
    pods = [m["spec"]["template"]["metadata"]["labels"] for m in prod if m["kind"] in ("Deployment", "StatefulSet")]
    for service in find(prod, "Service"):
        assert sum(selects(service["spec"]["selector"], labels) for labels in pods) == 1, service["metadata"]["name"]
    budgets = find(prod, "PodDisruptionBudget")
    assert len(budgets) == 5
    for pdb in budgets:
        assert sum(selects(pdb["spec"]["selector"]["matchLabels"], labels) for labels in pods) == 1


def test_names_fit_dns_labels() -> None:
    release = "a-rather-long-release-name-for-a-twinstream-stage-x"
    for manifest in render(prod_values(), api_versions=OPERATOR_APIS, release=release):
        name = manifest["metadata"]["name"]
        # 52: a StatefulSet's controller-revision-hash label is "<name>-<10-char hash>"
        assert len(name) <= 52 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        assert manifest["metadata"]["labels"].get("app.kubernetes.io/component", "") in name, name


# -- Triton -----------------------------------------------------------------------------------


def test_triton_requests_a_gpu_in_prod(prod: list[Manifest]) -> None:
    triton = workload(prod, "triton")
    main = container(triton, "triton")
    assert main["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    spec = triton["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["runtimeClassName"] == "nvidia"
    assert triton["spec"]["replicas"] == 2
    assert main["image"].startswith("nvcr.io/nvidia/tritonserver:") and main["image"].endswith("-py3")
    assert {"--model-repository=/models/triton-gpu", "--model-control-mode=explicit",
            "--load-model=twinstream_text", "--allow-gpu-metrics=true"} <= set(main["args"])
    assert main["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}


def test_triton_is_cpu_by_default(default: list[Manifest]) -> None:
    assert "nvidia.com/gpu" not in json.dumps(default)
    assert "--allow-gpu-metrics=false" in container(workload(default, "triton"))["args"]
    assert find(render({"triton": {"enabled": False, "url": "triton.ml:8001"}}), "Deployment",
                f"{RELEASE}-twinstream-triton") == []


# -- autoscaling ------------------------------------------------------------------------------


def test_keda_scales_the_consumers_on_their_lag(prod: list[Manifest]) -> None:
    scaled = {m["spec"]["scaleTargetRef"]["name"]: m for m in find(prod, "ScaledObject")}
    assert set(scaled) == {f"{RELEASE}-twinstream-embedding", f"{RELEASE}-twinstream-indexing"}
    partitions = prod_values()["topics"]["partitions"]
    for name in ("embedding", "indexing"):
        target = workload(prod, name)
        so = scaled[target["metadata"]["name"]]
        assert so["spec"]["scaleTargetRef"]["kind"] == target["kind"]
        env = env_of(target)
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["consumerGroup"] == env["TWINSTREAM_CONSUMER_GROUP"]
        assert trigger["metadata"]["bootstrapServers"] == env["TWINSTREAM_KAFKA_BOOTSTRAP"]
        assert trigger["metadata"]["topic"] == SERVICES[name][2]
        assert 2 == so["spec"]["minReplicaCount"] < so["spec"]["maxReplicaCount"] <= partitions
        assert "replicas" not in target["spec"]  # left to KEDA's HPA
    hpa = one(prod, "HorizontalPodAutoscaler", f"{RELEASE}-twinstream-matching")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": f"{RELEASE}-twinstream-matching"}
    assert "replicas" not in workload(prod, "matching")["spec"]
    assert len(find(prod, "HorizontalPodAutoscaler")) == 1


def test_operator_objects_need_their_apis() -> None:
    rendered = render_files(prod_values())
    manifests = manifests_of(rendered)
    assert not find(manifests, "ScaledObject") and not find(manifests, "ServiceMonitor")
    assert not find(manifests, "PrometheusRule")
    notes = rendered["twinstream/templates/NOTES.txt"]
    assert "services.embedding.autoscaling.keda.enabled is set but the cluster does not serve" in notes
    assert "monitoring.coreos.com/v1" in notes
    # without KEDA the consumers keep a fixed replica count
    assert workload(manifests, "embedding")["spec"]["replicas"] == 1


def test_keda_and_hpa_together_fail() -> None:
    both = {"services": {"indexing": {"autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}}}}
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render_files(both, api_versions=OPERATOR_APIS)


# -- monitoring -------------------------------------------------------------------------------


def test_service_monitor_scrapes_every_metrics_port(prod: list[Manifest]) -> None:
    (monitor,) = find(prod, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    # the services export no service label; the target gets it from the pod's component
    assert endpoint["relabelings"] == [{
        "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"],
        "targetLabel": "service"}]
    with_metrics = {s["metadata"]["name"] for s in find(prod, "Service")
                    if any(p["name"] == "metrics" for p in s["spec"]["ports"])}
    selected = {s["metadata"]["name"] for s in find(prod, "Service")
                if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])}
    assert len(with_metrics) == 5 and with_metrics <= selected
    # prod scrapes through the ServiceMonitor only, not also through pod annotations
    assert all("prometheus.io/scrape" not in json.dumps(spec) for _, spec in pod_specs(prod))


def test_pods_carry_scrape_annotations_by_default(default: list[Manifest]) -> None:
    for name, (_grpc, metrics_port, _topic) in SERVICES.items():
        annotations = workload(default, name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port),
                               "prometheus.io/path": "/metrics"}


def test_prometheus_rule_is_deploy_rules(prod: list[Manifest]) -> None:
    (rule,) = find(prod, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())


def test_dashboard_configmap_is_deploy_dashboard(prod: list[Manifest]) -> None:
    (config_map,) = find(prod, "ConfigMap", f"{RELEASE}-twinstream-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads((REPO / "deploy" / "grafana" / "twinstream-dashboard.json").read_text())
    assert json.loads(config_map["data"]["twinstream-dashboard.json"]) == dashboard
    assert len(dashboard["panels"]) > 10


# -- topics -----------------------------------------------------------------------------------


def test_topics_job_creates_the_pipeline_topics(prod: list[Manifest]) -> None:
    (job,) = find(prod, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    env = env_of(job)
    assert env["TOPICS"] == "items.raw,items.accepted,items.embedded,items.decisions,items.dlq"
    assert (env["PARTITIONS"], env["REPLICATION_FACTOR"]) == ("48", "3")
    assert json.loads(env["TOPIC_CONFIGS"]) == {"min.insync.replicas": "2", "retention.ms": "604800000"}
    assert env["KAFKA_BOOTSTRAP"] == prod_values()["externalKafka"]["bootstrap"]
    (script_map,) = [m for m in find(prod, "ConfigMap") if "create_topics.py" in m.get("data", {})]
    script = script_map["data"]["create_topics.py"]
    assert script.strip() == (CHART / "files" / "create_topics.py").read_text().strip()
    compile(script, "create_topics.py", "exec")
    topics = {t for _, _, t in SERVICES.values() if t}
    assert topics <= set(env["TOPICS"].split(","))
    assert find(render(), "Job") == []


def test_topic_names_reach_every_service_the_keda_trigger_and_the_job() -> None:
    names = {"raw": "t.in", "accepted": "t.ok", "embedded": "t.vec", "decisions": "t.out", "dlq": "t.dead"}
    values = prod_values()
    values["topics"]["names"] = names
    manifests = render(values, api_versions=OPERATOR_APIS)
    for name in SERVICES:
        env = env_of(workload(manifests, name))
        assert {k: v for k, v in env.items() if k.startswith("TWINSTREAM_TOPIC_")} == {
            f"TWINSTREAM_TOPIC_{role.upper()}": topic for role, topic in names.items()}
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in find(manifests, "ScaledObject")}
    (trigger,) = scaled[workload(manifests, "embedding")["metadata"]["name"]]["spec"]["triggers"]
    assert trigger["metadata"]["topic"] == "t.ok"
    (job,) = find(manifests, "Job")
    assert env_of(job)["TOPICS"] == "t.in,t.ok,t.vec,t.out,t.dead"


@pytest.mark.parametrize("values", [*CI_VALUES, PROD_VALUES], ids=lambda p: p.name)
def test_every_twinstream_variable_the_chart_sets_is_a_setting(values: Path) -> None:
    """A service refuses an unknown TWINSTREAM_* variable at start: the chart must set none."""
    from twinstream.common.config import env_fields

    known = set(env_fields())
    for _, spec in pod_specs(render(yaml.safe_load(values.read_text()), api_versions=OPERATOR_APIS)):
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            unknown = {e["name"] for e in c.get("env", [])
                       if e["name"].startswith("TWINSTREAM_") and e["name"] not in known}
            assert not unknown, f"{values.name}: {c['name']} gets {unknown}"


# -- the helm CLI -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the chart with its files/ links resolved and the two optional subcharts stubbed
    (no chart repository is reachable here; `helm dependency build` fetches the real ones)."""
    copy = tmp_path_factory.mktemp("chart") / "twinstream"
    shutil.copytree(CHART, copy, symlinks=False)
    for dependency in yaml.safe_load((CHART / "Chart.yaml").read_text())["dependencies"]:
        stub = copy / "charts" / dependency["name"]
        stub.mkdir(parents=True)
        version = dependency["version"].lstrip("~^")
        (stub / "Chart.yaml").write_text(f"apiVersion: v2\nname: {dependency['name']}\nversion: {version}\n")
    return copy


def helm_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120, check=False)


def cli_template(chart: Path, values: Path | None, kube_version: str = RECENT_KUBE) -> list[Manifest]:
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE, "--kube-version", kube_version]
    args += [arg for api in OPERATOR_APIS for arg in ("--api-versions", api)]
    done = helm_cli(*args, *(["--values", str(values)] if values else []))
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def test_each_feature_has_a_ci_values_file() -> None:
    features = {re.sub(r"^\d+-|-values\.yaml$", "", p.name) for p in CI_VALUES}
    assert {"gpu", "keda", "monitoring", "tls", "external-backends", "subcharts", "runtime"} <= features


@needs_helm
def test_helm_cli_is_the_pinned_version() -> None:
    assert 'Version:"v4.1.4"' in helm_cli("version").stdout


@needs_helm
@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "default")
def test_helm_cli_lints_strictly(cli_chart: Path, values: Path | None) -> None:
    done = helm_cli("lint", "--strict", str(cli_chart), "--namespace", NAMESPACE,
                    "--kube-version", RECENT_KUBE, *(["--values", str(values)] if values else []))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout and "[WARNING]" not in done.stdout


@needs_helm
@pytest.mark.parametrize("kube_version", [MIN_KUBE, RECENT_KUBE])
@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "default")
def test_helm_cli_template_validates_strictly(cli_chart: Path, values: Path | None, kube_version: str) -> None:
    manifests = cli_template(cli_chart, values, kube_version)
    errors = [error for m in manifests for error in validation_errors(m, kube_version)]
    assert errors == []
    assert find(manifests, "Pod", f"{RELEASE}-twinstream-test-health"), "no `helm test` pod"


@needs_helm
def test_helm_cli_and_the_sdk_render_the_same_manifests(cli_chart: Path) -> None:
    def key(m: Manifest) -> str:
        return json.dumps(m, sort_keys=True)

    # The SDK renders the chart without subcharts; the stubs add no objects.
    assert sorted(map(key, cli_template(cli_chart, PROD_VALUES))) == sorted(
        map(key, render(prod_values(), api_versions=OPERATOR_APIS)))


@needs_helm
def test_helm_cli_rejects_values_that_break_the_schema(cli_chart: Path) -> None:
    done = helm_cli("template", RELEASE, str(cli_chart), "--set", "triton.gpu=-1")
    assert done.returncode != 0 and "/triton/gpu" in done.stderr


def test_helm_test_pod_checks_every_service(default: list[Manifest]) -> None:
    pod = one(default, "Pod", f"{RELEASE}-twinstream-test-health")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (check,) = pod["spec"]["containers"]
    targets = check["command"][3:]
    # the plain-text health port (the gRPC port serves TLS); pods listen on it directly
    assert targets == sorted(f"{RELEASE}-twinstream-{name}:{HEALTH_PORT}" for name in SERVICES)
    for target in targets:
        name, port = target.split(":")
        service = one(default, "Service", name)
        assert any(p["port"] == int(port) and p["name"] == "health" for p in service["spec"]["ports"])
    compile(check["command"][2], "health-check", "exec")
    assert check["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["restartPolicy"] == "Never"
    assert find(render({"tests": {"enabled": False, "timeoutSeconds": 5}}), "Pod") == []
