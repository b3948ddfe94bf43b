"""The benchmarks still run: `python -m bench --quick` goes through every section.

--quick measures nothing worth reading (tiny frames and requests, one run each);
the real figures come from `python -m bench`, outside the test run.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench.__main__ import SECTIONS, main


def test_quick_bench_runs_every_section_and_gpu_mode_refuses_without_cuda(tmp_path, capsys):
    out = tmp_path / "latest.json"
    assert main(["--quick", "--out", str(out)]) == 0

    printed = capsys.readouterr().out
    assert "| section | measure | value | target | met |" in printed
    results = json.loads(out.read_text())
    assert results["command"] == f"python -m bench --quick --out {out}"
    assert list(results["sections"]) == list(SECTIONS)
    assert all(section["rows"] for section in results["sections"].values())
    assert results["sections"]["encoding"]["data"]["video_writer"]["browser_safe"]
    for level in results["sections"]["load"]["data"]["levels"]:
        assert level["videos"] > 0 and set(level["answers"]) <= {"200", "429"}, level

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            main(["--gpu", "--out", str(tmp_path / "gpu.json")])


def test_the_benchmarks_import_nothing_of_the_tests():
    """What both need lives in harness.py."""
    import ast

    from harness import ROOT

    for path in (ROOT / "bench").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(name == "tests" or name.startswith("tests.") for name in names), (
                f"{path.name} imports {names}"
            )
