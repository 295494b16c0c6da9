"""docker/ and docker/k8s/: validated here, since no Docker engine or cluster exists in CI.

Manifests are checked against the Kubernetes schemas (kubernetes-validate, strict) and
against the server: ports, probes, drain timings and environment names must agree with
pipeline.frontends.server's defaults. Dockerfiles are parsed and held to a few hadolint-style rules.
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


@pytest.mark.parametrize("path, doc", list(documents()),
                         ids=lambda x: x.name if isinstance(x, Path) else x.get("kind", "?"))
def test_manifest_is_valid_kubernetes(path, doc):
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("folder", ["base", "triton"])
def test_kustomizations_list_existing_files(folder):
    kustomization = yaml.safe_load((K8S / folder / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / folder / resource).is_file(), resource
    listed = {K8S / folder / r for r in kustomization["resources"]}
    assert set((K8S / folder).glob("*.yaml")) - {K8S / folder / "kustomization.yaml"} == listed


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


def test_hpa_metric_exists_on_the_server():
    """The adapter rule reads series the server really exposes, under Triton's names."""
    from prometheus_client import CollectorRegistry, generate_latest

    from pipeline.frontends.metrics import LedgerCollector
    from pipeline.telemetry import BatchReport, Ledger

    ledger = Ledger()
    ledger.record_batch("m", BatchReport(1, (5e-6,), 0.1, {}, failed=False))
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledger))
    text = generate_latest(registry).decode()
    rules = yaml.safe_load(find("ConfigMap", "rle-serving-adapter-rules")["data"]["rules"])
    for series in set(re.findall(r"(nv_inference_\w+)\{", " ".join(r["metricsQuery"] + r["seriesQuery"] for r in rules))):
        assert re.search(rf"^{series}{{", text, re.M), series


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
