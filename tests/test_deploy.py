"""The Kubernetes manifests in deploy/: valid against the schemas (offline, strict), and consistent
with the service: its probes, its time limit, its metric, one GPU per pod."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from harness import ROOT
from svd.base.settings import Settings

KUBERNETES = "1.30.0"
# deploy/bucket/ is the variant for clusters whose pods share no volume.
MANIFESTS = sorted((ROOT / "deploy").glob("*.yaml")) + sorted((ROOT / "deploy" / "bucket").glob("*.yaml"))


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "deploy" / name).read_text())


@pytest.mark.parametrize("path", MANIFESTS, ids=[str(path.relative_to(ROOT / "deploy")) for path in MANIFESTS])
def test_each_manifest_is_valid_in_strict_mode(path: Path):
    for resource in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(resource, KUBERNETES, strict=True)


def test_strict_mode_refuses_a_misspelt_field():
    deployment = _load("deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {
        "httpGet": {"path": "/readyz", "port": 3000}
    }
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
    # Videos are on the volume every replica mounts, ReadWriteMany.
    env = {env["name"]: env.get("value") for env in container["env"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    (shared,) = [path for path in mounts if env["SVD_OUTPUT_DIR"].startswith(path + "/")]
    assert volumes[mounts[shared]]["persistentVolumeClaim"]["claimName"] == "svd-data"
    assert _load("pvc.yaml")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _load("service.yaml")["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_the_bucket_variant_mounts_no_shared_volume_and_is_otherwise_the_deployment(monkeypatch: pytest.MonkeyPatch):
    main, variant = _load("deployment.yaml"), _load("bucket/deployment.yaml")
    pod = variant["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert [volume for volume in pod["volumes"] if "emptyDir" not in volume] == [], "nothing shared, nothing kept"
    secrets = {
        doc["metadata"]["name"]: doc["stringData"] for doc in (_load("secret.yaml"), _load("bucket/secret.yaml"))
    }
    values = {}
    for env in container["env"]:
        if "valueFrom" in env:
            reference = env["valueFrom"]["secretKeyRef"]
            assert reference["key"] in secrets[reference["name"]], reference
        else:
            values[env["name"]] = env["value"]
    assert values["SVD_OUTPUT_DIR"].startswith("s3://") and values["SVD_QUEUE_URL"].startswith("redis://")
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    assert Settings.from_env().output_dir == values["SVD_OUTPUT_DIR"], "the service starts with it"
    # The rest as deploy/deployment.yaml, so that the two cannot drift apart.
    for deployment in (main, variant):
        spec = deployment["spec"]["template"]["spec"]
        del spec["volumes"], spec["containers"][0]["env"], spec["containers"][0]["volumeMounts"]
    assert variant == main


def test_every_replica_shares_the_redis_of_deploy_with_persistence():
    container = _load("deployment.yaml")["spec"]["template"]["spec"]["containers"][0]
    url = next(env["value"] for env in container["env"] if env["name"] == "SVD_QUEUE_URL")
    service, statefulset = yaml.safe_load_all((ROOT / "deploy" / "redis.yaml").read_text())
    assert url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"
    assert service["spec"]["selector"] == statefulset["spec"]["template"]["metadata"]["labels"]
    (redis,) = statefulset["spec"]["template"]["spec"]["containers"]
    options = dict(zip(redis["args"][::2], redis["args"][1::2]))
    assert options["--appendonly"] == "yes" and options["--maxmemory-policy"] == "noeviction"
    (mount,) = redis["volumeMounts"]
    assert (
        mount["mountPath"] == "/data"
        and mount["name"] == statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    )


def test_the_autoscaler_scales_the_deployment_on_the_queue():
    from svd.serving import metrics

    hpa = _load("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _load("deployment.yaml")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["target"] == {
        "type": "AverageValue",
        "averageValue": "1",
    }
    # The adapter rule in the file's comment makes that metric out of the gauges the service exports.
    rule = (ROOT / "deploy" / "hpa.yaml").read_text().split("rules:", 1)[1].split("\n#\n", 1)[0]
    assert f"name: {{as: {metric['external']['metric']['name']}}}" in rule
    assert f"max({metrics.JOBS_WAITING._name}{{" in rule and f"max({metrics.JOBS_RUNNING._name}{{" in rule


def test_the_readme_builds_pushes_and_applies_the_image_the_deployment_runs(bento: Path):
    """The README's Kubernetes commands, in order: build the Bento, containerize it under a tag, push
    that tag, apply deploy/; the Bento is the one `bentoml build` names, the tag the Deployment's image."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Kubernetes") : readme.index("## Test")]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert [command.split()[:2] for command in commands] == [
        ["bentoml", "build"],
        ["bentoml", "containerize"],
        ["docker", "push"],
        ["kubectl", "apply"],
    ]
    containerize = commands[1].split()
    name = yaml.safe_load((bento / "bento.yaml").read_text())["name"]
    assert containerize[2] == f"{name}:latest"
    image = containerize[containerize.index("-t") + 1]
    assert commands[2] == f"docker push {image}"
    assert commands[3] == "kubectl apply -f deploy/"
    (container,) = _load("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == image
