"""Every setting of the service, read from the environment in this one place."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from svd.base.retention import Retention, parse_retention
from svd.base.users import parse_users

DEFAULT_MODEL_ID = "stabilityai/stable-video-diffusion-img2vid-xt"
TINY_MODEL_ID = "tiny"
# Built in code with random weights (svd/core/architectures.py): no download.
BUILT_IN_MODEL_IDS = (TINY_MODEL_ID, "random-svd-xt", "random-svd")

Device = Literal["auto", "cuda", "cpu"]
Memory = Literal["full", "model_offload", "sequential_offload"]
Dtype = Literal["auto", "float16", "bfloat16", "float32"]
# all: the whole service; api: requests only, no model; worker: the model and the queue, no public API.
Role = Literal["all", "api", "worker"]


class ConfigError(ValueError):
    """A setting has a value the service cannot run with."""


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; use one of: {', '.join(allowed)}.")
    return value


def _flag(name: str) -> bool:
    return _choice(name, "0", ("0", "1", "false", "true", "no", "yes")) in ("1", "true", "yes")


def _compile_backend(raw: str) -> str:
    """'' for off, else a torch.compile backend: 1 means inductor, the default one."""
    value = raw.strip().lower()
    if value in ("", "0", "false", "no"):
        return ""
    return "inductor" if value in ("1", "true", "yes") else value


def _positive_int(name: str, default: int, zero: bool = False) -> int:
    """A whole number above 0, or from 0 where `zero` allows it (0: no bound)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < (0 if zero else 1):
        raise ConfigError(
            f"{name}={raw!r} must be a {'' if zero else 'positive '}whole number{', 0 for none' if zero else ''}."
        )
    return value


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, without importing torch: CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([device for device in visible.split(",") if device.strip() and device.strip() != "-1"])
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return 0
    listed = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=60)
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines()) if listed.returncode == 0 else 0


def _workers(name: str) -> int:
    if os.environ.get(name, "").strip().lower() != "gpus":
        return _positive_int(name, 1)
    count = visible_gpus()
    if count == 0:
        raise ConfigError(
            f"{name}=gpus starts one worker per GPU, but no GPU is visible (CUDA_VISIBLE_DEVICES and "
            "`nvidia-smi -L` list none); set a number instead."
        )
    return count


def _keep(name: str, default: str) -> Retention:
    try:
        return parse_retention(os.environ.get(name, "").strip() or default)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}; a count keeps that many videos, a size the newest that fit.") from None


def _size(name: str, default: str) -> int:
    text = os.environ.get(name, "").strip() or default
    try:
        size = parse_retention(text).bytes
    except ValueError:
        size = None
    if size is None:
        raise ConfigError(f"{name}={text!r} is not a size: use a number and KB, MB, GB or TB, such as {default}")
    return size


def _users(name: str, admin_token: str) -> tuple[tuple[str, str], ...]:
    """SVD_API_TOKENS, or the file SVD_API_TOKENS_FILE names (a mounted secret), as (name, token) pairs."""
    text, path = os.environ.get(name, "").strip(), os.environ.get(f"{name}_FILE", "").strip()
    if text and path:
        raise ConfigError(f"{name} and {name}_FILE are both set; set one.")
    source = name
    if path:
        source = f"{name}_FILE ({path})"
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{source} cannot be read: {exc.strerror}.") from None
    try:
        users = parse_users(text, source)
    except ValueError as exc:
        raise ConfigError(f"{exc}.") from None
    if admin_token and admin_token in users.values():
        raise ConfigError(f"{source}: a user has SVD_API_TOKEN, the admin's token; each needs their own.")
    return tuple(users.items())


def _queue_url(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if value and not value.startswith(("redis://", "rediss://", "unix://")):
        # Only the scheme: the rest may hold the password, and this goes into the log.
        shown = f"{value.split('://')[0]}://..." if "://" in value else "a value without a scheme"
        raise ConfigError(f"{name} is {shown}, not a Redis URL; use redis://host:port/db, rediss://... or unix://...")
    return value


def _output_dir(name: str) -> str:
    """A folder, or s3://bucket/prefix; unset: ./outputs; set empty: videos are not kept."""
    value = os.environ.get(name, "outputs").strip()
    if value.startswith("s3://") and not value.removeprefix("s3://").split("/")[0]:
        raise ConfigError(f"{name}={value!r} names no bucket; use s3://bucket or s3://bucket/prefix.")
    return value


def _webhook_secret(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if value:
        encoded = value.removeprefix("whsec_")
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except ValueError:
            key = b""
        if len(key) < 24:
            raise ConfigError(
                f"{name} must be a Standard Webhooks secret: whsec_ and the base64 of 24 or more random bytes, such as "
                "`whsec_$(openssl rand -base64 32)`"
            )
    return value


@dataclass(frozen=True)
class Settings:
    """The service's configuration; see the README's environment table."""

    model_id: str = DEFAULT_MODEL_ID
    revision: str = "main"
    device: Device = "auto"
    dtype: Dtype = "auto"
    memory: Memory = "full"
    forward_chunking: bool = False
    compile: str = ""
    max_pixels: int = 40_000_000
    max_upload_bytes: int = 20_000_000
    upload_timeout: int = 60
    api_token: str = ""
    # Named users (SVD_API_TOKENS): (name, token) pairs.
    api_tokens: tuple[tuple[str, str], ...] = ()
    timeout: int = 600
    max_queue: int = 4
    # Jobs one user may have waiting or running; 0: no bound but SVD_MAX_QUEUE's.
    max_queue_per_user: int = 0
    max_concurrency: int = 32
    workers: int = 1
    output_dir: str = "outputs"
    output_keep: Retention = Retention(bytes=10 * 1000**3)
    jobs_db: str = "outputs/jobs.db"
    queue_url: str = ""
    # The bucket's region (AWS_REGION) when SVD_OUTPUT_DIR is s3://; empty: boto3's own lookup
    # (AWS_DEFAULT_REGION, ~/.aws/config, the instance's).
    output_region: str = ""
    job_attempts: int = 2
    job_lease: int = 30
    input_keep: int = 500 * 1000**2
    webhook_secret: str = ""
    webhook_hosts: str = ""
    test_faults: str = ""
    role: Role = "all"
    # Not from the environment: which of the workers this process is (from 1), set by the
    # service in each worker; it picks the worker's GPU.
    worker: int = 1

    @property
    def is_tiny(self) -> bool:
        return self.model_id == TINY_MODEL_ID

    @property
    def is_built_in(self) -> bool:
        """The tiny model or a full-size architecture with random weights, built in code."""
        return self.model_id in BUILT_IN_MODEL_IDS

    @property
    def is_hub_model(self) -> bool:
        """A hub id rather than a built-in model or a local directory."""
        return (
            not self.is_built_in and not os.path.isdir(self.model_id) and not self.model_id.startswith((".", "/", "~"))
        )

    def __post_init__(self) -> None:
        if self.compile and self.memory != "full":
            # Offloading wraps each model's forward in accelerate's hooks, which then
            # sit inside the compiled graph and are wrapped again on every request.
            raise ConfigError(
                f"SVD_COMPILE cannot be combined with SVD_MEMORY={self.memory}: offloading moves "
                "weights inside the compiled model on every call. Use SVD_MEMORY=full with "
                "SVD_COMPILE, or turn SVD_COMPILE off to offload."
            )
        if self.role != "all" and not (self.queue_url and self.output_dir):
            raise ConfigError(
                f"SVD_ROLE={self.role} splits the service in two: api replicas take the requests and GPU workers "
                "run the jobs, and they meet only in the shared queue and the shared videos. Set SVD_QUEUE_URL to "
                "the Redis both use and SVD_OUTPUT_DIR to a folder every replica mounts, or leave SVD_ROLE unset "
                "(all) to run the whole service in one process."
            )
        if self.queue_url and not self.output_dir:
            raise ConfigError(
                "SVD_QUEUE_URL shares jobs between replicas, and a job's video must reach whichever replica "
                "is asked for it: set SVD_OUTPUT_DIR to a folder every replica mounts, or to s3://bucket/prefix."
            )

    @classmethod
    def from_env(cls) -> Settings:
        output_dir = _output_dir("SVD_OUTPUT_DIR")
        # Beside the kept videos, where BentoML's start-up clean-up never reaches; a local folder
        # when they are in a bucket, or not kept.
        jobs_folder = "svd-jobs" if not output_dir or output_dir.startswith("s3://") else output_dir
        return cls(
            model_id=os.environ.get("SVD_MODEL_ID", "").strip() or DEFAULT_MODEL_ID,
            revision=os.environ.get("SVD_MODEL_REVISION", "").strip() or "main",
            device=_choice("SVD_DEVICE", "auto", ("auto", "cuda", "cpu")),  # type: ignore[arg-type]
            dtype=_choice("SVD_DTYPE", "auto", ("auto", "float16", "bfloat16", "float32")),  # type: ignore[arg-type]
            memory=_choice("SVD_MEMORY", "full", ("full", "model_offload", "sequential_offload")),  # type: ignore[arg-type]
            forward_chunking=_flag("SVD_FORWARD_CHUNKING"),
            compile=_compile_backend(os.environ.get("SVD_COMPILE", "")),
            max_pixels=_positive_int("SVD_MAX_PIXELS", 40_000_000),
            max_upload_bytes=_positive_int("SVD_MAX_UPLOAD_BYTES", 20_000_000),
            upload_timeout=_positive_int("SVD_UPLOAD_TIMEOUT", 60),
            api_token=os.environ.get("SVD_API_TOKEN", "").strip(),
            api_tokens=_users("SVD_API_TOKENS", os.environ.get("SVD_API_TOKEN", "").strip()),
            timeout=_positive_int("SVD_TIMEOUT", 600),
            max_queue=_positive_int("SVD_MAX_QUEUE", 4),
            max_queue_per_user=_positive_int("SVD_MAX_QUEUE_PER_USER", 0, zero=True),
            max_concurrency=_positive_int("SVD_MAX_CONCURRENCY", 32),
            workers=_workers("SVD_WORKERS"),
            output_dir=output_dir,
            output_keep=_keep("SVD_OUTPUT_KEEP", "10GB"),
            jobs_db=os.environ.get("SVD_JOBS_DB", "").strip() or os.path.join(jobs_folder, "jobs.db"),
            queue_url=_queue_url("SVD_QUEUE_URL"),
            output_region=os.environ.get("AWS_REGION", "").strip(),
            job_attempts=_positive_int("SVD_JOB_ATTEMPTS", 2),
            job_lease=_positive_int("SVD_JOB_LEASE", 30),
            input_keep=_size("SVD_INPUT_KEEP", "500MB"),
            webhook_secret=_webhook_secret("SVD_WEBHOOK_SECRET"),
            webhook_hosts=os.environ.get("SVD_WEBHOOK_HOSTS", "").strip(),
            test_faults=os.environ.get("SVD_TEST_FAULTS", ""),
            role=_choice("SVD_ROLE", "all", ("all", "api", "worker")),  # type: ignore[arg-type]
        )
