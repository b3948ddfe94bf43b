"""The Kubernetes manifests in deploy/: valid against the schemas (offline, strict), and consistent
with the service: its probes, its time limit, its metric, one GPU per pod."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from harness import ROOT
from svd.config import Settings

KUBERNETES = "1.30.0"
MANIFESTS = sorted((ROOT / "deploy").glob("*.yaml"))


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "deploy" / name).read_text())


@pytest.mark.parametrize("path", MANIFESTS, ids=[path.name for path in MANIFESTS])
def test_each_manifest_is_valid_in_strict_mode(path: Path):
    for resource in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(resource, KUBERNETES, strict=True)


def test_strict_mode_refuses_a_misspelt_field():
    deployment = _load("deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz", "port": 3000}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_the_deployment_fits_the_service():
    deployment = _load("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60, "time to load the model"
    timeout = next(int(env["value"]) for env in container["env"] if env["name"] == "SVD_TIMEOUT")
    assert timeout == Settings().timeout and pod["terminationGracePeriodSeconds"] >= timeout
    secret = _load("secret.yaml")
    for env in container["env"]:
        if "valueFrom" in env:
            reference = env["valueFrom"]["secretKeyRef"]
            assert reference["name"] == secret["metadata"]["name"] and reference["key"] in secret["stringData"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == _load("pvc.yaml")["metadata"]["name"]
    # Jobs and videos outlive a restart of the container: they are on a volume of the pod.
    outputs = next(env["value"] for env in container["env"] if env["name"] == "SVD_OUTPUT_DIR")
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert any(outputs.startswith(path + "/") and name in volumes for path, name in mounts.items()), outputs
    assert _load("service.yaml")["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_the_autoscaler_scales_the_deployment_on_the_queue_metric():
    from svd import metrics

    hpa = _load("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _load("deployment.yaml")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == metrics.IN_FLIGHT._name == "svd_in_flight"
