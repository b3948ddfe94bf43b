"""The Kubernetes manifests in deploy/: valid against the schemas (offline, strict; KEDA's
ScaledObject against KEDA's own CRD schema), and consistent with the service: its roles, probes,
time limit, queue and metric, one GPU per worker pod."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from harness import ROOT
from svd.base.settings import Settings
from svd.jobs.redis import STREAM

KUBERNETES = "1.30.0"
KEDA = "keda.yaml"
# What `kubectl apply -f deploy/` applies (not the folders below it), the autoscalers to choose from, and
# deploy/bucket/, the variant for clusters whose pods share no volume.
APPLIED = sorted((ROOT / "deploy").glob("*.yaml"))
MANIFESTS = [
    *APPLIED,
    *(path for path in sorted((ROOT / "deploy" / "scaling").glob("*.yaml")) if path.name != KEDA),
    *sorted((ROOT / "deploy" / "bucket").glob("*.yaml")),
]
KEDA_SCHEMA = ROOT / "tests" / "schemas" / "keda-scaledobject-v2.20.2.json"


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "deploy" / name).read_text())


def _container(name: str) -> dict:
    (container,) = _load(name)["spec"]["template"]["spec"]["containers"]
    return container


def _env(name: str) -> dict[str, str | None]:
    return {env["name"]: env.get("value") for env in _container(name)["env"]}


@pytest.mark.parametrize("path", MANIFESTS, ids=[str(path.relative_to(ROOT / "deploy")) for path in MANIFESTS])
def test_each_manifest_is_valid_in_strict_mode(path: Path):
    for resource in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(resource, KUBERNETES, strict=True)


def test_strict_mode_refuses_a_misspelt_field():
    deployment = _load("worker.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {
        "httpGet": {"path": "/readyz", "port": 3000}
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


@pytest.mark.parametrize("name", ["api.yaml", "worker.yaml"])
def test_both_deployments_fit_the_service(name: str):
    deployment = _load(name)
    pod = deployment["spec"]["template"]["spec"]
    container = _container(name)
    assert _env(name)["SVD_ROLE"] == name.removesuffix(".yaml")
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    timeout = int(_env(name)["SVD_TIMEOUT"])
    assert timeout == Settings().timeout and pod["terminationGracePeriodSeconds"] >= timeout
    secret = _load("secret.yaml")
    for env in container["env"]:
        if "valueFrom" in env:
            reference = env["valueFrom"]["secretKeyRef"]
            assert reference["name"] == secret["metadata"]["name"] and reference["key"] in secret["stringData"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == _load("pvc.yaml")["metadata"]["name"]
    # Videos are on the volume every replica mounts, ReadWriteMany.
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    (shared,) = [path for path in mounts if _env(name)["SVD_OUTPUT_DIR"].startswith(path + "/")]
    assert volumes[mounts[shared]]["persistentVolumeClaim"]["claimName"] == "svd-data"
    assert _load("pvc.yaml")["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("name", ["api.yaml", "worker.yaml"])
def test_the_bucket_variant_mounts_no_shared_volume_and_is_otherwise_the_deployment(
    name: str, monkeypatch: pytest.MonkeyPatch
):
    main, variant = _load(name), _load(f"bucket/{name}")
    pod = variant["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    shared = [volume for volume in pod.get("volumes", []) if not {"emptyDir", "secret"} & volume.keys()]
    assert shared == [], "nothing shared, nothing kept"
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
    for env_name, value in values.items():
        if env_name != "SVD_API_TOKENS_FILE":  # the secret's file, in the pod only (below)
            monkeypatch.setenv(env_name, value)
    assert Settings.from_env().output_dir == values["SVD_OUTPUT_DIR"], "the service starts with it"
    # The rest as the main Deployment, so that the two cannot drift apart.
    for deployment in (main, variant):
        spec = deployment["spec"]["template"]["spec"]
        spec.pop("volumes", None)
        del spec["containers"][0]["env"]
        spec["containers"][0].pop("volumeMounts", None)
    assert variant == main


def test_the_api_replicas_take_the_traffic_without_a_gpu_and_the_workers_hold_the_gpus():
    api, worker = _load("api.yaml"), _load("worker.yaml")
    assert api["spec"]["replicas"] >= 2
    assert "nvidia.com/gpu" not in json.dumps(_container("api.yaml")["resources"])
    assert _container("worker.yaml")["resources"]["limits"]["nvidia.com/gpu"] == 1
    startup = _container("worker.yaml")["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60, "time to load the model"
    # The autoscaler owns the workers' count: applying the file again must not reset it.
    assert "replicas" not in worker["spec"]
    selector = _load("service.yaml")["spec"]["selector"]
    assert selector == api["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= worker["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("name", ["api.yaml", "worker.yaml"])
def test_every_replica_shares_the_redis_of_deploy_with_persistence(name: str):
    url = _env(name)["SVD_QUEUE_URL"]
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


def _strict(schema: dict) -> dict:
    """The schema as `kubectl apply` enforces it (strict field validation): no field it does not name,
    except where it keeps unknown fields."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            if not schema.get("x-kubernetes-preserve-unknown-fields"):
                schema["additionalProperties"] = False
    return schema


def _validate_scaledobject(resource: dict) -> None:
    jsonschema.validate(resource, _strict(json.loads(KEDA_SCHEMA.read_text())))


def test_the_scaledobject_is_valid_against_kedas_schema_and_a_misspelt_field_is_not():
    scaled = _load(f"scaling/{KEDA}")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    _validate_scaledobject(scaled)
    scaled["spec"]["minReplicasCount"] = 0
    with pytest.raises(jsonschema.ValidationError):
        _validate_scaledobject(scaled)


def test_keda_scales_the_workers_from_zero_on_the_jobs_waiting_or_running():
    scaled = _load(f"scaling/{KEDA}")["spec"]
    assert scaled["scaleTargetRef"]["name"] == _load("worker.yaml")["metadata"]["name"]
    assert scaled["minReplicaCount"] == 0
    # The last worker outlasts one job before going to zero, and so does scaling down.
    assert scaled["cooldownPeriod"] > Settings().timeout
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > Settings().timeout
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "redis-streams"
    metadata = trigger["metadata"]
    service = next(yaml.safe_load_all((ROOT / "deploy" / "redis.yaml").read_text()))
    assert metadata["address"] == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    # The stream's length (XLEN, KEDA's mode without a consumer group): one worker per job waiting or running,
    # active from the first (tests/test_roles.py checks the length is exactly that).
    assert metadata["stream"] == STREAM and "consumerGroup" not in metadata
    assert metadata["streamLength"] == "1" and metadata["activationLagCount"] == "0"


def test_one_autoscaler_at_a_time():
    """`kubectl apply -f deploy/` applies no autoscaler: one of deploy/scaling/ is applied on its own."""
    kinds = {resource["kind"] for path in APPLIED for resource in yaml.safe_load_all(path.read_text())}
    assert not kinds & {"HorizontalPodAutoscaler", "ScaledObject"}
    assert _load("scaling/hpa.yaml")["spec"]["scaleTargetRef"]["name"] == _load("worker.yaml")["metadata"]["name"]


def test_the_hpa_variant_scales_the_workers_on_the_queue():
    from svd.serving import metrics

    hpa = _load("scaling/hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _load("worker.yaml")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["target"] == {
        "type": "AverageValue",
        "averageValue": "1",
    }
    # The adapter rule in the file's comment makes that metric out of the gauges the service exports.
    rule = (ROOT / "deploy" / "scaling" / "hpa.yaml").read_text().split("rules:", 1)[1].split("\n#\n", 1)[0]
    assert f"name: {{as: {metric['external']['metric']['name']}}}" in rule
    assert f"max({metrics.JOBS_WAITING._name}{{" in rule and f"max({metrics.JOBS_RUNNING._name}{{" in rule


def test_the_readme_builds_pushes_and_applies_the_image_the_deployment_runs(bento: Path):
    """The README's Kubernetes commands, in order: build the Bento, containerize it under a tag, push
    that tag, apply deploy/, then one autoscaler; the Bento is the one `bentoml build` names, the tag the
    image of both Deployments."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Kubernetes") : readme.index("## Test")]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert [command.split()[:2] for command in commands] == [
        ["bentoml", "build"],
        ["bentoml", "containerize"],
        ["docker", "push"],
        ["kubectl", "apply"],
        ["kubectl", "apply"],
    ]
    containerize = commands[1].split()
    name = yaml.safe_load((bento / "bento.yaml").read_text())["name"]
    assert containerize[2] == f"{name}:latest"
    image = containerize[containerize.index("-t") + 1]
    assert commands[2] == f"docker push {image}"
    assert commands[3] == "kubectl apply -f deploy/"
    assert commands[4] == f"kubectl apply -f deploy/scaling/{KEDA}"
    assert _container("api.yaml")["image"] == _container("worker.yaml")["image"] == image


@pytest.mark.parametrize("name", ["api.yaml", "worker.yaml", "bucket/api.yaml", "bucket/worker.yaml"])
def test_every_pod_reads_the_users_from_the_secret_as_a_file(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The secret's SVD_API_TOKENS, mounted where SVD_API_TOKENS_FILE points; the service reads it, and
    an empty one (the secret as shipped) names no user."""
    pod = _load(name)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    path = next(env["value"] for env in container["env"] if env["name"] == "SVD_API_TOKENS_FILE")
    (volume,) = [volume for volume in pod["volumes"] if "secret" in volume]
    assert volume["secret"]["secretName"] == _load("secret.yaml")["metadata"]["name"]
    (item,) = volume["secret"]["items"]
    assert item["key"] in _load("secret.yaml")["stringData"]
    (mount,) = [mount for mount in container["volumeMounts"] if mount["name"] == volume["name"]]
    assert f"{mount['mountPath']}/{item['path']}" == path and mount["readOnly"]
    tokens = tmp_path / "tokens"
    tokens.write_text(_load("secret.yaml")["stringData"][item["key"]])
    monkeypatch.setenv("SVD_API_TOKENS_FILE", str(tokens))
    assert Settings.from_env().api_tokens == ()
    tokens.write_text("ann:a-token\nbob:b-token\n")
    assert Settings.from_env().api_tokens == (("ann", "a-token"), ("bob", "b-token"))
