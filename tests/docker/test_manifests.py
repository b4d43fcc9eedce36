"""docker/compose.yaml and docker/k8s/*.yaml: valid against their schemas and consistent with the app."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from server.config import Settings
from tests.docker.helpers import ENTRYPOINT_VARIABLES, REPO, tool

COMPOSE = REPO / "docker" / "compose.yaml"
K8S = REPO / "docker" / "k8s"
SETTINGS_VARIABLES = {f"EAD_{name.upper()}" for name in Settings.model_fields} | ENTRYPOINT_VARIABLES
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")  # oldest still common .. recent
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def load_all(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    """kind -> the one manifest of that kind."""
    manifests: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in load_all(path):
            assert document["kind"] not in manifests, f"two {document['kind']} manifests"
            manifests[document["kind"]] = document
    return manifests


@pytest.fixture(scope="module")
def server_container(k8s: dict[str, dict]) -> dict:
    (container,) = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def app(exported_model_dir: Path):
    """The real app (built, its lifespan not started: no model is loaded)."""
    from server.app import create_app

    return create_app(Settings(model_dirs=[exported_model_dir]))


@pytest.fixture(scope="module")
def app_paths(app) -> set[str]:
    """The app's GET routes, from its OpenAPI document."""
    return {path for path, operations in app.openapi()["paths"].items() if "get" in operations}


def seconds(duration: str) -> int:
    """Compose durations: 45s, 10m, 1m30s."""
    total = 0
    for amount, unit in re.findall(r"(\d+)([hms])", duration):
        total += int(amount) * {"h": 3600, "m": 60, "s": 1}[unit]
    return total


# ---- Kubernetes


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    validate = tool("kubernetes-validate")
    if validate is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate==1.37.0)")
    files = [str(path) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"]
    for version in KUBERNETES_VERSIONS:
        result = subprocess.run([validate, "--strict", "-k", version, *files], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_schema_validation_rejects_a_broken_deployment(tmp_path: Path) -> None:
    validate = tool("kubernetes-validate")
    if validate is None:
        pytest.skip("kubernetes-validate is not installed")
    broken = (K8S / "deployment.yaml").read_text().replace("periodSeconds: 10", "periodSecond: 10", 1)
    (tmp_path / "deployment.yaml").write_text(broken)
    result = subprocess.run(
        [validate, "--strict", str(tmp_path / "deployment.yaml")], capture_output=True, text=True
    )
    assert result.returncode != 0


def test_probe_paths_are_routes_of_the_app(server_container: dict, app, app_paths: set[str]) -> None:
    from fastapi.testclient import TestClient

    probes = {name: server_container[name]["httpGet"]["path"] for name in PROBES}
    assert probes == {
        "startupProbe": "/health/ready",
        "readinessProbe": "/health/ready",
        "livenessProbe": "/health/live",
    }
    scraped = server_container_annotations()["prometheus.io/path"]
    assert {*probes.values(), scraped} <= app_paths
    client = TestClient(app)  # no `with`: the lifespan does not run, so the app is alive but not ready
    assert client.get(probes["livenessProbe"]).status_code == 200
    assert client.get(probes["readinessProbe"]).status_code == 503, "not ready before the models are loaded"
    assert client.get(scraped).status_code == 200


def server_container_annotations() -> dict[str, str]:
    (deployment,) = load_all(K8S / "deployment.yaml")
    return deployment["spec"]["template"]["metadata"]["annotations"]


def test_probes_cover_the_engine_build_and_the_drain(k8s: dict[str, dict], server_container: dict) -> None:
    startup = server_container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, (
        "first start builds a TensorRT engine"
    )
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    pre_stop = server_container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(
        k8s["ConfigMap"]["data"].get(
            "EAD_GRACEFUL_SHUTDOWN_S", Settings.model_fields["graceful_shutdown_s"].default
        )
    )
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain
    ports = {port["name"]: port["containerPort"] for port in server_container["ports"]}
    env = {item["name"]: item.get("value") for item in server_container["env"]}
    assert ports["http"] == int(env["EAD_PORT"]) and env["EAD_HOST"] == "0.0.0.0"


def test_deployment_asks_for_one_gpu_and_runs_as_the_image_user(server_container: dict, k8s: dict) -> None:
    assert server_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    security = k8s["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    dockerfile_user = re.search(r"^USER (\d+):(\d+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == tuple(int(g) for g in dockerfile_user.groups())
    mounts = {mount["name"]: mount["mountPath"] for mount in server_container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in k8s["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert mounts["models"] == "/models"
    assert (
        volumes["models"]["persistentVolumeClaim"]["claimName"]
        == k8s["PersistentVolumeClaim"]["metadata"]["name"]
    )
    strategy = k8s["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, "a rollout must not drop serving capacity"


def test_service_hpa_and_pdb_point_at_the_deployment(k8s: dict[str, dict], server_container: dict) -> None:
    deployment = k8s["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert k8s["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target_ports = {port["targetPort"] for port in k8s["Service"]["spec"]["ports"]}
    assert target_ports <= {port["name"] for port in server_container["ports"]}
    target = k8s["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    hpa = k8s["HorizontalPodAutoscaler"]["spec"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert k8s["PodDisruptionBudget"]["spec"]["minAvailable"] < hpa["minReplicas"]
    assert server_container["resources"]["requests"]["cpu"], "CPU utilisation needs a CPU request"


def test_configmap_and_env_are_real_settings(k8s: dict[str, dict], server_container: dict) -> None:
    names = set(k8s["ConfigMap"]["data"]) | {item["name"] for item in server_container["env"]}
    assert names <= SETTINGS_VARIABLES, names - SETTINGS_VARIABLES
    (source,) = server_container["envFrom"]
    assert source["configMapRef"]["name"] == k8s["ConfigMap"]["metadata"]["name"]
    # The ConfigMap's values are valid settings (model dirs aside, which live on the volume).
    values = {key.removeprefix("EAD_").lower(): value for key, value in k8s["ConfigMap"]["data"].items()}
    values = {
        key: value for key, value in values.items() if key in Settings.model_fields and key != "model_dirs"
    }
    Settings(model_dirs=[REPO], **values)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}


# ---- Compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_validates_against_the_compose_spec() -> None:
    check = tool("check-jsonschema")
    if check is None:
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema==0.39.0)")
    result = subprocess.run(
        [check, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_gpu_service(compose: dict) -> None:
    service = compose["services"]["efficientad"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    assert service["restart"] in ("unless-stopped", "always")
    assert service["healthcheck"]["test"] == ["CMD", "efficientad-entrypoint", "healthcheck"]
    assert seconds(service["healthcheck"]["start_period"]) >= 600
    assert any(volume.endswith(":/models") for volume in service["volumes"])
    assert service["ports"][0].endswith(":8000")


def test_compose_settings_are_real_and_the_stop_grace_covers_the_drain(compose: dict) -> None:
    for name, service in compose["services"].items():
        environment = service["environment"]
        assert set(environment) <= SETTINGS_VARIABLES, f"{name}: {set(environment) - SETTINGS_VARIABLES}"
        drain = float(re.search(r":-([\d.]+)", environment["EAD_GRACEFUL_SHUTDOWN_S"])[1])
        assert seconds(service["stop_grace_period"]) > drain
        assert service["stop_signal"] == "SIGTERM" and service["init"] is True
    assert compose["services"]["efficientad-cpu"]["environment"]["EAD_BACKEND"] == "onnxruntime-cpu"
    assert "deploy" not in compose["services"]["efficientad-cpu"], "the CPU service must not need a GPU"
