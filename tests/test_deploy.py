"""Deployment files agree with Kubernetes and with the server they deploy.

No cluster and no kustomize binary run here: overlays are rendered as kustomize does for the
features used (resources and nested kustomizations, components, `labels`, strategic-merge patches
where containers merge by name, image overrides), and every built-in resource is validated
offline against the Kubernetes 1.37 schemas (kubernetes-validate, strict: unknown fields fail).
ServiceMonitors are custom resources and are checked by hand against the Services they scrape.
Then the probes, ports, volume mounts and grace periods are compared with what `retroserve serve`
and `retroserve retriever serve` actually listen on and read, and the sharded overlays' shard
count, shard paths and shard addresses with what `retroserve datastore shard` writes.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from artefacts import paths
from server.cli import main as cli
from server.config import ServerConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.37.0"
BUILT_IN_API_GROUPS = ("v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2")
OVERLAYS = ("cpu", "gpu", "cpu-sharded", "gpu-sharded")
ENGINE_SHM = "1Gi"
"""/dev/shm for the server's pods and containers (deploy/image_check.sh runs with the same)."""


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


def build(directory: Path, inherited: list[dict] | None = None) -> list[dict]:
    """One kustomization (or, with `inherited`, a Component applied to its parent's resources):
    its resources (files, or directories built recursively), then its components, then its
    labels, patches and image overrides over all of them."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization["kind"] == ("Component" if inherited is not None else "Kustomization")
    documents = list(inherited or [])
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        documents += build(path) if path.is_dir() else [copy.deepcopy(d) for d in load_documents(path)]
    for component in kustomization.get("components", []):
        documents = build((directory / component).resolve(), documents)
    labels = {k: v for entry in kustomization.get("labels", []) for k, v in entry["pairs"].items()}
    patches = [doc for patch in kustomization.get("patches", []) for doc in load_documents(directory / patch["path"])]
    rendered = []
    for doc in documents:
        doc["metadata"].setdefault("labels", {}).update(labels)
        for patch in patches:
            if (patch["kind"], patch["metadata"]["name"]) == (doc["kind"], doc["metadata"]["name"]):
                doc = merge(doc, patch)
        for image in kustomization.get("images", []):
            for container in containers(doc) + init_containers(doc):
                name, _, _ = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
        rendered.append(doc)
    return rendered


def render(overlay: str) -> list[dict]:
    documents = build(DEPLOY / "k8s" / "overlays" / overlay)
    names = [(d["kind"], d["metadata"]["name"]) for d in documents]
    assert len(names) == len(set(names)), f"{overlay}: a resource appears twice"
    return documents


def pod_spec(doc: dict) -> dict:
    spec = doc.get("spec", {})
    template = spec.get("template", spec.get("jobTemplate", {}).get("spec", {}).get("template", {}))
    return template.get("spec", {})


def containers(doc: dict) -> list[dict]:
    return pod_spec(doc).get("containers", [])


def init_containers(doc: dict) -> list[dict]:
    return pod_spec(doc).get("initContainers", [])


def find(documents: list[dict], kind: str, name: str) -> dict:
    return next(d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.fixture(params=OVERLAYS)
def rendered(request):
    return request.param, render(request.param)


@pytest.fixture(params=[o for o in OVERLAYS if o.endswith("-sharded")])
def sharded(request):
    return request.param, render(request.param)


def test_built_in_resources_validate_against_kubernetes_schemas(rendered):
    overlay, documents = rendered
    built_in = [d for d in documents if d["apiVersion"] in BUILT_IN_API_GROUPS]
    kinds = {d["kind"] for d in built_in}
    assert kinds >= {"Deployment", "Service", "Job", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                     "PersistentVolumeClaim"}
    assert ("StatefulSet" in kinds) == overlay.endswith("-sharded")
    for doc in built_in:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "retroserve" for d in documents)


def test_schema_validation_catches_a_misspelt_field():
    deployment = find(render("cpu"), "Deployment", "retroserve")
    broken = copy.deepcopy(deployment)
    containers(broken)[0]["readinessProbes"] = containers(broken)[0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_service_monitors_scrape_the_metrics_services(rendered):
    _, documents = rendered
    monitors = [d for d in documents if d["kind"] == "ServiceMonitor"]
    assert "retroserve" in {m["metadata"]["name"] for m in monitors}
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selected = [d for d in documents if d["kind"] == "Service"
                    and all(d["metadata"].get("labels", {}).get(k) == v
                            for k, v in monitor["spec"]["selector"]["matchLabels"].items())]
        assert len(selected) == 1, monitor["metadata"]["name"]
        port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
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
    from server.api.app import SERVICE_NAME

    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # covers first-time preparation

    from server.core.engine import ENGINE_SHUTDOWN_TIMEOUT_S

    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.grace_period_s + ENGINE_SHUTDOWN_TIMEOUT_S
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

    # vLLM's engine needs more shared memory than a container's default 64 MiB /dev/shm (its start
    # failed in the CPU image with "160 MiB required, 62 MiB free"; deploy/image_check.sh).
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[shm["name"]]["emptyDir"]["sizeLimit"] == ENGINE_SHM

    services = [d for d in documents if d["kind"] == "Service"]
    targets = {p["targetPort"] for s in services for p in s["spec"]["ports"]}
    assert targets == {"grpc", "metrics"}

    job = find(documents, "Job", "retroserve-prepare")
    job_env = {e["name"]: e["value"] for e in containers(job)[0]["env"]}
    assert job_env["RETROSERVE_HOME"] == env["RETROSERVE_HOME"]
    assert "model prepare" in " ".join(containers(job)[0]["args"])

    if overlay.startswith("gpu"):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"].endswith(":cuda")
    else:
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
        assert container["image"].endswith(":cpu")


def shell_words(args: list[str]) -> list[str]:
    import shlex

    return shlex.split(" ".join(args))


def test_retriever_statefulset_agrees_with_retriever_serve(sharded):
    """Ports, probes, the datastore it reads and the volume it reads it from, per shard pod."""
    from server.api import retriever_app

    _, documents = sharded
    statefulset = find(documents, "StatefulSet", "retroserve-retriever")
    (container,) = containers(statefulset)
    args = cli.build_parser().parse_args(container["args"])
    assert args.func is cli.run_retriever_serve
    config = cli.retriever_config_from_args(args)
    grpc_port = int(config.address.rsplit(":", 1)[1])
    metrics_port = int(config.metrics_address.rsplit(":", 1)[1])
    assert config.address.startswith("0.0.0.0:") and config.metrics_address.startswith("0.0.0.0:")
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": grpc_port, "metrics": metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port
    readiness_service = container["readinessProbe"]["grpc"]["service"]
    assert readiness_service == retriever_app.SERVICE_NAME == "retroserve.v1.RetrieverService"
    assert statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > config.grace_period_s

    # The datastore it serves lies on the pod's own volume (a volumeClaimTemplate), mounted read-only.
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    mount = next(m for m in container["volumeMounts"] if config.datastore_dir.is_relative_to(m["mountPath"]))
    assert mount["name"] in claims and mount.get("readOnly") is True
    # The init container writes exactly that directory, on the same volume at the same path, from
    # shard `pod-index` of the set the shard Job publishes on the shared volume.
    (init,) = init_containers(statefulset)
    init_env = {e["name"]: e for e in init["env"]}
    assert init_env["DATASTORE_DIR"]["value"] == str(config.datastore_dir)
    pod_index = init_env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert pod_index == "metadata.labels['apps.kubernetes.io/pod-index']"
    init_mount = {m["mountPath"]: m for m in init["volumeMounts"]}[mount["mountPath"]]
    assert init_mount["name"] == mount["name"] and not init_mount.get("readOnly")
    from datastore_tools.shard import SHARD_DIR

    assert '"$SHARD_SOURCE/' + SHARD_DIR.format(index="$SHARD_INDEX") + '"' in init["args"][0]
    source = Path(init_env["SHARD_SOURCE"]["value"])
    shared_mount = next(m for m in init["volumeMounts"] if source.is_relative_to(m["mountPath"]))
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    shared_claim = volumes[shared_mount["name"]]["persistentVolumeClaim"]["claimName"]

    # The shard Job writes that set: same claim, `-n` = replicas, from the default datastore path.
    job = find(documents, "Job", "retroserve-shard")
    (job_container,) = containers(job)
    job_volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    (job_mount,) = job_container["volumeMounts"]
    assert job_volumes[job_mount["name"]]["persistentVolumeClaim"]["claimName"] == shared_claim
    words = shell_words(job_container["args"])
    command = words[words.index("datastore"):]
    shard_args = cli.build_parser().parse_args(command[: command.index("-o") + 2])
    assert shard_args.func.__name__ == "run_shard"
    assert shard_args.shards == statefulset["spec"]["replicas"]
    assert source.relative_to(shared_mount["mountPath"]) == shard_args.output.relative_to(job_mount["mountPath"])
    job_env = {e["name"]: e["value"] for e in job_container["env"]}
    previous = os.environ.get("RETROSERVE_HOME")
    os.environ["RETROSERVE_HOME"] = job_env["RETROSERVE_HOME"]
    try:
        assert shard_args.datastore == paths.default_datastore_dir()  # what the prepare Job builds
    finally:
        if previous is None:
            os.environ.pop("RETROSERVE_HOME", None)
        else:
            os.environ["RETROSERVE_HOME"] = previous

    # The headless Service gives each pod the name the generator dials, one address per shard.
    service = find(documents, "Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": grpc_port, "metrics": metrics_port}
    deployment = find(documents, "Deployment", "retroserve")
    server_config = cli.server_config_from_args(cli.build_parser().parse_args(containers(deployment)[0]["args"]))
    name, service_name = statefulset["metadata"]["name"], service["metadata"]["name"]
    assert list(server_config.shards.addresses) == [
        f"{name}-{i}.{service_name}:{grpc_port}" for i in range(statefulset["spec"]["replicas"])]
    # The server waits for the shards at start no longer than its own startup probe allows.
    startup = containers(deployment)[0]["startupProbe"]
    assert server_config.shards.shard_connect_timeout_s < startup["periodSeconds"] * startup["failureThreshold"]
    pdb = find(documents, "PodDisruptionBudget", "retroserve-retriever")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


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
    assert "--shm-size 1g" in (DEPLOY / "image_check.sh").read_text()
