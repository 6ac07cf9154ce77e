"""deploy/kubernetes: every manifest is valid against the Kubernetes schemas, offline, and the
pieces agree with each other and with netjail (config, socket, group, image, paths)."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from netjail.daemon.config import parse_config

DEPLOY = Path(__file__).parents[2] / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
#: The oldest Kubernetes the manifests are for (appArmorProfile is a field since 1.30), and the
#: newest schema kubernetes-validate bundles.
VERSIONS = ("1.30", kubernetes_validate.latest_version())
MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def load(path: Path) -> dict[str, Any]:
    [document] = list(yaml.safe_load_all(path.read_text()))
    assert isinstance(document, dict)
    return document


def pod_spec(name: str) -> dict[str, Any]:
    if name == "daemonset":
        spec: dict[str, Any] = load(BASE / "daemonset.yaml")["spec"]["template"]["spec"]
        return spec
    client: dict[str, Any] = load(DEPLOY / "examples" / "client-pod.yaml")["spec"]
    return client


def mounts(spec: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Mount path -> (volume name, its hostPath or configMap) of a pod's first container."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    found = {}
    for mount in spec["containers"][0]["volumeMounts"]:
        volume = volumes[mount["name"]]
        source = volume["hostPath"]["path"] if "hostPath" in volume else volume["configMap"]["name"]
        found[mount["mountPath"]] = (mount["name"], source)
    return found


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_is_valid_for_kubernetes(path: Path, version: str) -> None:
    """Each manifest validates strictly (no unknown field) against the bundled schemas."""
    kubernetes_validate.validate(load(path), version, strict=True)


def test_the_validator_refuses_a_misspelt_field() -> None:
    """The check above can fail: a misspelt pod field is a validation error."""
    broken = copy.deepcopy(load(BASE / "daemonset.yaml"))
    broken["spec"]["template"]["spec"]["hostPIDD"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_the_kustomize_base_lists_every_manifest_of_the_base() -> None:
    """kustomization.yaml names exactly the files of base/, and the DaemonSet's image."""
    kustomization = load(BASE / "kustomization.yaml")
    files = sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    [image] = kustomization["images"]
    container = pod_spec("daemonset")["containers"][0]
    assert container["image"] == f"{image['name']}:{image['newTag']}"


def test_the_config_map_is_a_valid_netjaild_config_that_fits_the_mounts() -> None:
    """netjaild.toml parses with netjail's own strict reader; its socket and state directory
    are on the DaemonSet's hostPath mounts, and the client pod mounts the same socket dir."""
    data = load(BASE / "configmap.yaml")["data"]["netjaild.toml"]
    config = parse_config(tomllib.loads(data), "configmap.yaml")
    daemon = mounts(pod_spec("daemonset"))
    assert daemon["/etc/netjail"] == ("config", "netjaild-config")
    socket_dir = str(Path(config.socket).parent)
    assert daemon[socket_dir][1] == socket_dir
    assert daemon[config.state_dir][1] == config.state_dir
    assert daemon["/run/netns"][1] == "/run/netns"
    assert mounts(pod_spec("client"))[socket_dir][1] == socket_dir
    assert config.metrics_listen is not None
    [port] = pod_spec("daemonset")["containers"][0]["ports"]
    assert port["containerPort"] == config.metrics_listen.port


def test_the_daemon_runs_privileged_in_a_privileged_namespace_with_no_api_token() -> None:
    """Privileged, in the host's PID namespace, in a namespace Pod Security lets it run in,
    with no service account token."""
    spec = pod_spec("daemonset")
    assert spec["hostPID"] is True
    assert spec["containers"][0]["securityContext"]["privileged"] is True
    assert spec["automountServiceAccountToken"] is False
    labels = load(BASE / "namespace.yaml")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert load(BASE / "serviceaccount.yaml")["automountServiceAccountToken"] is False


def test_the_client_pod_has_the_sockets_group_of_the_image() -> None:
    """The example client's supplementalGroups hold the gid the Containerfile gives netjail."""
    containerfile = (DEPLOY / "Containerfile").read_text()
    match = re.search(r"groupadd --system --gid (\d+) netjail", containerfile)
    assert match is not None
    config = parse_config(
        tomllib.loads(load(BASE / "configmap.yaml")["data"]["netjaild.toml"]), "configmap.yaml"
    )
    assert config.group == "netjail"
    assert int(match[1]) in pod_spec("client")["securityContext"]["supplementalGroups"]
