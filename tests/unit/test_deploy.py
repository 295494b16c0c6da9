"""docker/ and docker/k8s/: validated here, since no Docker engine or cluster exists in CI.

Manifests are checked against the Kubernetes schemas (kubernetes-validate, strict) and
against the server: ports, probes, drain timings and environment names must agree with
pipeline.frontends.server's defaults. Custom resources (KEDA, KServe) have their Kubernetes
parts (containers, HPA behavior) validated the same way, and every PromQL a scaling recipe
runs must name series a real render of the exporter has. Dockerfiles are parsed and held to a few hadolint-style rules.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipeline.frontends.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker/k8s"
KUBERNETES = "1.33"  # the oldest minor we promise (native gRPC probes, preStop sleep: 1.30+)
# Custom resources we ship, by (apiVersion, kind): no Kubernetes schema; checked below.
CUSTOM = {("keda.sh/v1alpha1", "ScaledObject"), ("serving.kserve.io/v1alpha1", "ServingRuntime"),
          ("serving.kserve.io/v1beta1", "InferenceService")}
DEFAULTS = ServerConfig()
SETTINGS = {f"RLE_SERVING_{f.name.upper()}" for f in dataclasses.fields(ServerConfig)}


def documents():
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def find(kind, name):
    for _, doc in documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name}")


def is_custom(doc) -> bool:
    return (doc["apiVersion"], doc["kind"]) in CUSTOM


@pytest.mark.parametrize("path, doc", [(p, d) for p, d in documents() if not is_custom(d)],
                         ids=lambda x: x.name if isinstance(x, Path) else x.get("kind", "?"))
def test_manifest_is_valid_kubernetes(path, doc):
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def built(folder: Path) -> list[dict]:
    """The documents ``kubectl apply -k folder`` would apply, before its patches."""
    out = []
    for resource in kustomization(folder)["resources"]:
        path = folder / resource
        if path.is_dir():
            out += built(path)
        else:
            out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


@pytest.mark.parametrize("folder", ["base", "triton", "keda", "kserve"])
def test_kustomizations_list_existing_files(folder):
    here = K8S / folder
    resources = kustomization(here)["resources"]
    for resource in resources:
        assert (here / resource).is_file() or (here / resource / "kustomization.yaml").is_file(), resource
    listed = {here / r for r in resources if (here / r).is_file()}
    assert set(here.glob("*.yaml")) - {here / "kustomization.yaml"} == listed
    docs = built(here)
    for patch in kustomization(here).get("patches", []):
        (target,) = [d for d in docs if d["kind"] == patch["target"]["kind"]
                     and d["metadata"]["name"] == patch["target"]["name"]]
        for op in yaml.safe_load(patch["patch"]):
            *parents, leaf = op["path"].strip("/").split("/")
            node = target
            for key in parents:
                node = node[key]
            assert op["op"] != "replace" or leaf in node, f"{folder}: {op['path']} is not there to replace"


def server_container():
    deployment = find("Deployment", "rle-serving")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def test_ports_and_probes_match_the_server():
    deployment, c = server_container()
    env = {e["name"]: e["value"] for e in c["env"]}
    assert set(env) - {"HOME"} <= SETTINGS, "unknown RLE_SERVING_* setting"
    grpc_port = int(env.get("RLE_SERVING_GRPC_PORT", DEFAULTS.grpc_port))
    metrics_port = int(env.get("RLE_SERVING_METRICS_PORT", DEFAULTS.metrics_port))
    http_port = int(env.get("RLE_SERVING_HTTP_PORT", DEFAULTS.http_port))
    assert (grpc_port, metrics_port, http_port) == (DEFAULTS.grpc_port, DEFAULTS.metrics_port,
                                                    DEFAULTS.http_port)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port, probe  # native gRPC health probes
    # Liveness and start-up ask the service that is SERVING through a long load; readiness
    # the default one, NOT_SERVING until the models are loaded.
    from pipeline.frontends.server import LIVENESS_SERVICE

    assert c["startupProbe"]["grpc"]["service"] == c["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert c["readinessProbe"]["grpc"].get("service", "") == ""
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port


def test_drain_timings_agree():
    deployment, c = server_container()
    env = {e["name"]: e["value"] for e in c["env"]}
    grace = float(env.get("RLE_SERVING_GRACE_PERIOD_S", DEFAULTS.grace_period_s))
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    pod_grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pod_grace >= pre_stop + grace + 5, "Kubernetes would SIGKILL before the drain ends"
    assert c["readinessProbe"]["periodSeconds"] * c["readinessProbe"]["failureThreshold"] <= pre_stop + grace


def test_gpu_shm_and_security():
    deployment, c = server_container()
    spec = deployment["spec"]["template"]["spec"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_services_pdb_and_hpa_point_at_the_deployment():
    deployment, _ = server_container()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    cluster, headless = find("Service", "rle-serving"), find("Service", "rle-serving-headless")
    assert headless["spec"]["clusterIP"] == "None"
    for service in (cluster, headless):
        assert service["spec"]["selector"].items() <= labels.items()
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["port"] == DEFAULTS.grpc_port and grpc["appProtocol"] == "grpc"
    pdb = find("PodDisruptionBudget", "rle-serving")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    hpa = find("HorizontalPodAutoscaler", "rle-serving")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "rle-serving"}
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(find("ConfigMap", "rle-serving-adapter-rules")["data"]["rules"])
    assert any(r["name"]["as"] == metric for r in rules)


def exposed_series() -> set[str]:
    """Names of the samples the exporter renders from a ledger that has seen some work."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from pipeline.frontends.metrics import LedgerCollector
    from pipeline.telemetry import BatchReport, Ledger

    ledger = Ledger()
    ledger.record_batch("m", BatchReport(2, (5e-3, 0.2), 0.1, {"preprocess": 0.01, "rle": 0.002},
                                         failed=False))
    ledger.record_request("m", images=2, duration_s=0.3, output_s=0.01)
    ledger.record_request("m", images=1, duration_s=0.001, failure="resource_exhausted")
    ledger.stream_opened("camera")
    ledger.add_load("m", 3, 2)
    ledger.model_stream_opened("m")
    ledger.stream_error("m", "TIMEOUT")
    ledger.camera_stream_moved("m", None, ("reconnecting", "TIMEOUT"))
    ledger.sink_messages("webhook", "dropped")
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledger))
    text = generate_latest(registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def scaling_queries() -> list[str]:
    """Every PromQL the scaling recipes run: the adapter rule's and KEDA's triggers'."""
    rules = yaml.safe_load(find("ConfigMap", "rle-serving-adapter-rules")["data"]["rules"])
    keda = find("ScaledObject", "rle-serving")["spec"]["triggers"]
    return ([q for r in rules for q in (r["seriesQuery"], r["metricsQuery"])]
            + [t["metadata"]["query"] for t in keda if t["type"] == "prometheus"])


def test_scaling_queries_read_series_the_server_exposes():
    exposed = exposed_series()
    queries = scaling_queries()
    named = {n for q in queries for n in re.findall(r"\b((?:nv_inference|rle_serving)_\w+)\s*[{\[]", q)}
    assert {"nv_inference_pending_request_count", "rle_serving_queue_duration_seconds_bucket"} <= named
    assert named <= exposed, named - exposed
    for query in queries:
        assert query.count("(") == query.count(")"), query
        if "histogram_quantile" in query:  # quantiles of summed buckets: by le, over a rate
            assert re.search(r"sum by \(le\) \(rate\(\w+_bucket\{", query), query


def test_the_promql_of_the_docs_reads_series_the_server_exposes():
    docs = "".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    queries = re.findall(r"```promql\n(.*?)```", docs, re.S)
    named = {n for q in queries for n in re.findall(r"\b((?:nv_inference|rle_serving)_\w+)\b", q)}
    assert "rle_serving_request_duration_seconds_bucket" in named
    assert named <= exposed_series(), named - exposed_series()


def test_keda_agrees_with_the_hpa_and_its_behavior_is_valid_kubernetes():
    scaled, hpa = find("ScaledObject", "rle-serving"), find("HorizontalPodAutoscaler", "rle-serving")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == hpa["spec"]["scaleTargetRef"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (hpa["spec"]["minReplicas"],
                                                                  hpa["spec"]["maxReplicas"])
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == hpa["spec"]["behavior"]
    kubernetes_validate.validate({**hpa, "spec": {**hpa["spec"], "behavior": behavior}},
                                 KUBERNETES, strict=True)
    triggers = {t["name"]: t for t in spec["triggers"]}
    for trigger in triggers.values():
        assert trigger["type"] == "prometheus" and trigger["metricType"] in ("AverageValue", "Value")
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA metadata are strings"
        assert float(trigger["metadata"]["threshold"]) > 0
    # one backlog target for both recipes: images waiting per replica
    target = hpa["spec"]["metrics"][0]["pods"]["target"]
    assert triggers["backlog"]["metricType"] == target["type"] == "AverageValue"
    assert float(triggers["backlog"]["metadata"]["threshold"]) == float(target["averageValue"])
    # a quantile does not add up over replicas: compared as a value, never averaged per pod
    assert triggers["queue-p99"]["metricType"] == "Value"


def test_kserve_runtime_runs_this_image_on_its_ports():
    runtime = find("ServingRuntime", "rle-serving")
    spec = runtime["spec"]
    (c,) = spec["containers"]
    _, base = server_container()
    assert c["name"] == "kserve-container" and c["image"] == base["image"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "rle-serving"},
           "spec": {k: spec[k] for k in ("containers", "volumes", "tolerations")}}
    kubernetes_validate.validate(pod, KUBERNETES, strict=True)
    env = {e["name"]: e["value"] for e in c["env"]}
    assert set(env) - {"HOME"} <= SETTINGS, "unknown RLE_SERVING_* setting"
    grpc_port = int(env.get("RLE_SERVING_GRPC_PORT", DEFAULTS.grpc_port))
    metrics_port = int(env.get("RLE_SERVING_METRICS_PORT", DEFAULTS.metrics_port))
    # KServe routes gRPC (HTTP/2 cleartext) to the one port named h2c
    assert c["ports"] == [{"name": "h2c", "containerPort": grpc_port, "protocol": "TCP"}]
    assert c["readinessProbe"]["grpc"]["port"] == grpc_port
    assert int(runtime["metadata"]["annotations"]["prometheus.kserve.io/port"]) == metrics_port
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    assert {m["name"] for m in c["volumeMounts"]} <= {v["name"] for v in spec["volumes"]}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_kserve_inference_service_uses_the_runtime_and_is_scaled_by_keda():
    service, runtime = find("InferenceService", "rle-serving"), find("ServingRuntime", "rle-serving")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert {k: model["modelFormat"][k] for k in ("name", "version")} in [
        {k: f[k] for k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    annotations = service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"  # KEDA scales it:
    docs = built(K8S / "kserve")
    assert any(d["kind"] == "ScaledObject" for d in docs)
    (patch,) = kustomization(K8S / "kserve")["patches"]
    (op,) = yaml.safe_load(patch["patch"])
    assert (op["path"], op["value"]) == ("/spec/scaleTargetRef/name",
                                         f"{service['metadata']['name']}-predictor")
    for trigger in find("ScaledObject", "rle-serving")["spec"]["triggers"]:
        pods = re.search(r'pod=~"([^"]+)"', trigger["metadata"]["query"]).group(1)
        assert re.fullmatch(pods, "rle-serving-predictor-7d9f8b6c5-x2x4q")  # KServe's pods count
        assert re.fullmatch(pods, "rle-serving-5c7b9d8f6-abcde")  # and base's


# -------------------------------------------------------------------------- Dockerfiles

DOCKERFILES = [ROOT / "docker/Dockerfile.cpu", ROOT / "docker/Dockerfile.cuda",
               ROOT / "docker/triton/Dockerfile"]


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_rules(path):
    steps = instructions(path)
    keywords = [k for k, _ in steps]
    defaults = dict(v.split("=", 1) for k, v in steps if k == "ARG" and "=" in v)
    base = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)].strip('"'), dict(steps)["FROM"])
    assert ":" in base and not base.endswith(":latest"), "pin the base image (hadolint DL3006/7)"
    assert "USER" in keywords and keywords.index("USER") < keywords.index("ENTRYPOINT")
    user = [v for k, v in steps if k == "USER"][-1]
    assert user not in ("root", "0"), "run as non-root"
    assert "HEALTHCHECK" in keywords
    for keyword, value in steps:
        assert keyword != "ADD", "use COPY (DL3020)"
        if keyword == "COPY":
            *sources, _ = shlex.split(value)
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source} does not exist"
        if keyword == "RUN":
            if "pip install" in value:
                assert value.count("pip install") == value.count("--no-cache-dir"), "DL3042"
            if "apt-get install" in value:
                assert "--no-install-recommends" in value and "rm -rf /var/lib/apt/lists" in value
            assert "torch " not in value.replace("torch==", "")  # never an unpinned torch
        if keyword == "ENV":
            for name in re.findall(r"(RLE_SERVING_\w+)=", value):
                assert name in SETTINGS, f"{path.name}: {name} is not a server setting"
    exposed = " ".join(v for k, v in steps if k == "EXPOSE").split()
    assert {str(DEFAULTS.grpc_port), str(DEFAULTS.http_port), str(DEFAULTS.metrics_port)} <= set(exposed)


@pytest.mark.parametrize("path", DOCKERFILES[:2], ids=lambda p: p.name)
def test_server_images_get_the_model_the_make_way(path):
    text = path.read_text()
    assert "make VENV=/opt/venv model" in text
    assert 'ENTRYPOINT ["python", "-m", "pipeline", "serve"]' in text
    assert '"pipeline", "health"' in text


def test_dockerignore_keeps_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".venv-triton", ".cache", ".git"):
        assert entry in ignored


def locked() -> dict[str, str]:
    """package (normalised) -> version, from the lock file."""
    out = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


@pytest.mark.parametrize("path", DOCKERFILES[:2], ids=lambda p: p.name)
def test_the_server_images_install_the_locked_versions(path):
    installs = [v for k, v in instructions(path) if k == "RUN" and "pip install" in v]
    assert any("-c requirements.lock '.[server" in v for v in installs)
    torch = locked()["torch"]
    assert all(f"torch=={torch}" in v for v in installs if "torch==" in v)


def test_the_makefile_installs_the_locked_versions_and_the_lock_covers_every_extra():
    makefile = (ROOT / "Makefile").read_text()
    assert "PIP    := -m pip install --quiet --disable-pip-version-check -c $(LOCK)" in makefile
    assert makefile.count("$(PIP) -e") == 2  # the server's and the light client's environments
    versions = locked()
    for name in ("numpy", "torch", "numba", "grpcio", "grpcio-health-checking", "grpcio-reflection",
                 "grpcio-tools", "protobuf", "tritonclient", "aiohttp", "opencv-python", "vulture"):
        assert name in versions, name
    grpc = {versions[n].rsplit(".", 1)[0] for n in
            ("grpcio", "grpcio-health-checking", "grpcio-reflection", "grpcio-tools")}
    assert len(grpc) == 1, f"the grpc packages on one release line, got {grpc}"


def test_tritons_model_environment_matches_the_lock_but_for_numpy():
    """The Python backend's environment pins numpy < 2 (see its file); every other pin it
    shares with the lock is the lock's version."""
    versions = locked()
    assert {"torch", "pycocotools", "numba", "grpcio", "tritonclient"} <= set(versions)
    for line in (ROOT / "docker/triton/requirements-models.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            name = re.sub(r"\[.*\]", "", re.sub(r"[-_.]+", "-", name).lower())
            if name != "numpy" and name in versions:
                assert versions[name] == version, (name, version, versions[name])
