"""Deployment files agree with Kubernetes and with the server they deploy.

No cluster and no kustomize binary run here: overlays are rendered by applying their image
override and strategic-merge patch to the base (containers merge by name, as kustomize does), and
every built-in resource is validated offline against the Kubernetes 1.37 schemas
(kubernetes-validate, strict: unknown fields fail). The ServiceMonitor is a custom resource and is
checked by hand against the Service it scrapes. Then the probes, ports, volume mounts and grace
period are compared with what `retroserve serve` actually listens on and reads.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server import cli, paths
from server.config import ServerConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.37.0"
BUILT_IN_API_GROUPS = ("v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2")


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def merge(base, patch):
    """Strategic merge for the shapes used here: dicts recursively, lists of named items by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x for x in patch):
        merged = [copy.deepcopy(item) for item in base]
        for item in patch:
            for index, existing in enumerate(merged):
                if existing.get("name") == item["name"]:
                    merged[index] = merge(existing, item)
                    break
            else:
                merged.append(item)
        return merged
    return patch


def render(overlay: str) -> list[dict]:
    directory = DEPLOY / "k8s" / "overlays" / overlay
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../../base"]
    base_dir = DEPLOY / "k8s" / "base"
    base = yaml.safe_load((base_dir / "kustomization.yaml").read_text())
    labels = {k: v for entry in base.get("labels", []) for k, v in entry["pairs"].items()}
    documents = [doc for name in base["resources"] for doc in load_documents(base_dir / name)]
    patches = [doc for patch in kustomization.get("patches", []) for doc in load_documents(directory / patch["path"])]
    rendered = []
    for doc in documents:
        doc = copy.deepcopy(doc)
        doc["metadata"].setdefault("labels", {}).update(labels)
        for patch in patches:
            if (patch["kind"], patch["metadata"]["name"]) == (doc["kind"], doc["metadata"]["name"]):
                doc = merge(doc, patch)
        for image in kustomization.get("images", []):
            for container in containers(doc):
                name, _, _ = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
        rendered.append(doc)
    return rendered


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    template = spec.get("template", spec.get("jobTemplate", {}).get("spec", {}).get("template", {}))
    return template.get("spec", {}).get("containers", [])


def find(documents: list[dict], kind: str, name: str) -> dict:
    return next(d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.fixture(params=["cpu", "gpu"])
def rendered(request):
    return request.param, render(request.param)


def test_built_in_resources_validate_against_kubernetes_schemas(rendered):
    _, documents = rendered
    built_in = [d for d in documents if d["apiVersion"] in BUILT_IN_API_GROUPS]
    assert {d["kind"] for d in built_in} >= {"Deployment", "Service", "Job", "PodDisruptionBudget",
                                              "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
    for doc in built_in:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_validation_catches_a_misspelt_field():
    deployment = find(render("cpu"), "Deployment", "retroserve")
    broken = copy.deepcopy(deployment)
    containers(broken)[0]["readinessProbes"] = containers(broken)[0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_service_monitor_scrapes_the_metrics_service(rendered):
    _, documents = rendered
    monitor = find(documents, "ServiceMonitor", "retroserve")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = next(d for d in documents if d["kind"] == "Service"
                   and all(d["metadata"].get("labels", {}).get(k) == v
                           for k, v in monitor["spec"]["selector"]["matchLabels"].items()))
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])


def test_probes_ports_and_volumes_agree_with_the_server(rendered):
    overlay, documents = rendered
    deployment = find(documents, "Deployment", "retroserve")
    container = containers(deployment)[0]
    args = cli.build_parser().parse_args(container["args"])
    config = cli.server_config_from_args(args)
    grpc_port = int(config.address.rsplit(":", 1)[1])
    metrics_port = int(config.metrics_address.rsplit(":", 1)[1])
    assert config.address.startswith("0.0.0.0:") and config.metrics_address.startswith("0.0.0.0:")

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port
    from server.app import SERVICE_NAME

    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # covers first-time preparation

    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > config.grace_period_s
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["RETROSERVE_HOME"] in mounts
    # The model and datastore the server opens by default resolve under that mount.
    previous = os.environ.get("RETROSERVE_HOME")
    os.environ["RETROSERVE_HOME"] = env["RETROSERVE_HOME"]
    try:
        for path in (paths.default_model_dir(), paths.default_datastore_dir()):
            assert any(path.is_relative_to(mount) for mount in mounts), path
    finally:
        os.environ["RETROSERVE_HOME"] = previous

    services = [d for d in documents if d["kind"] == "Service"]
    targets = {p["targetPort"] for s in services for p in s["spec"]["ports"]}
    assert targets == {"grpc", "metrics"}

    job = find(documents, "Job", "retroserve-prepare")
    job_env = {e["name"]: e["value"] for e in containers(job)[0]["env"]}
    assert job_env["RETROSERVE_HOME"] == env["RETROSERVE_HOME"]
    assert "model prepare" in " ".join(containers(job)[0]["args"])

    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"].endswith(":cuda")
    else:
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
        assert container["image"].endswith(":cpu")


def test_images_install_through_the_readme_script_and_run_as_non_root():
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (DEPLOY / name).read_text()
        assert "bash scripts/install.sh" in text
        assert re.search(r"^USER retroserve$", text, re.M)
        assert 'VOLUME ["/data"]' in text and "RETROSERVE_HOME=/data" in text
        cmd = re.search(r"^CMD (\[.*\])$", text, re.M).group(1)
        args = cli.build_parser().parse_args(yaml.safe_load(cmd))
        assert cli.server_config_from_args(args).address == "0.0.0.0:50051"
    assert ServerConfig().grace_period_s == 30.0
