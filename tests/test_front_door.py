"""A light front door: service.py imports no model code, and the generation core runs without BentoML."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT, Server

HEAVY = ("torch", "diffusers", "transformers")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("model_id", ["tiny", ""], ids=["tiny", "hub model"])
def test_importing_the_service_loads_no_model_code(model_id: str):
    """`bentoml serve` imports service.py in a process that never runs the model."""
    code = f"import json, sys, service; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    result = _python(code, SVD_MODEL_ID=model_id)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_the_bentoml_serve_process_stays_small(server: Server):
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    resident_mib = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024
    assert resident_mib < 250, f"bentoml serve itself holds {resident_mib:.0f} MiB"


def test_gpu_check_runs_where_bentoml_cannot_be_imported(tmp_path: Path):
    """GPU machines often have no network, and BentoML pulls in dozens of packages."""
    report = tmp_path / "report.json"
    code = (
        "import sys\n"
        "for name in ('bentoml', 'pydantic', 'starlette'):\n"
        "    sys.modules[name] = None  # import of it fails, as where it is not installed\n"
        "from svd.tools import gpu_check\n"
        "sys.exit(gpu_check.main(['--width', '64', '--height', '64', '--num-frames', '2', "
        f"'--json', {str(report)!r}]))\n"
    )
    result = _python(code, SVD_MODEL_ID="tiny", SVD_DEVICE="cpu")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert json.loads(report.read_text())["settings"]["num_frames"] == 2

