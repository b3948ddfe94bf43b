"""The code's layers, read from every import of svd/ and service.py (those inside functions too).

A module imports only from its own layer and the layers RULES lets it: the ones below it.
Nothing imports svd/tools but the shims left at the old paths. Only the generation core
(and the GPU check among the tools, which measures the GPU with torch) imports the model
libraries; the layers under it import no web framework, so the core runs without BentoML.
There is no import circle, and no folder holds more than MAX_MODULES modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

from harness import ROOT

# Layer -> the layers below it that it may import, bottom to top.
RULES: dict[str, set[str]] = {
    "base": set(),
    "media": {"base"},
    "storage": {"base", "media"},
    "core": {"base", "media", "storage"},
    "serving": {"base", "media", "storage", "core"},
    "jobs": {"base", "media", "storage", "core", "serving"},
    "http": {"base", "media", "storage", "core", "serving", "jobs"},
    "tools": {"base", "media", "storage", "core", "serving"},
    # service.py, the front door: it wires the layers together; it never needs the tools.
    "service": {"base", "media", "storage", "core", "serving", "jobs", "http"},
    # svd/batch.py, svd/gpu_check.py, svd/client.py: the old paths, re-exporting the tools.
    "shims": {"tools"},
}
MODEL_LIBRARIES = {"torch", "diffusers", "transformers", "accelerate"}
MAY_IMPORT_MODEL_LIBRARIES = {"core", "tools"}
WEB_LIBRARIES = {"bentoml", "starlette", "pydantic"}
NO_WEB_LIBRARIES = {"base", "media", "storage", "core"}
MAX_MODULES = 12


def _modules() -> dict[str, Path]:
    modules = {"service": ROOT / "service.py"}
    for path in sorted((ROOT / "svd").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def layer_of(module: str) -> str | None:
    """The layer a module of svd (or service.py) is in; None for the package itself."""
    parts = module.split(".")
    if module == "service":
        return "service"
    if parts == ["svd"]:
        return None
    if len(parts) == 2 and f"{module}" not in {f"svd.{layer}" for layer in RULES}:
        return "shims"
    return parts[1]


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module `path` imports, at any depth of its code, with the line: `from svd.jobs import
    events` counts as svd.jobs.webhooks.events."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
            found += [
                (f"{node.module}.{alias.name}", node.lineno)
                for alias in node.names
                if f"{node.module}.{alias.name}" in MODULES
            ]
    return found


def _edges() -> dict[str, set[str]]:
    return {
        module: {name for name, _ in imports_of(path) if name in MODULES and name != module}
        for module, path in MODULES.items()
    }


def test_each_module_imports_only_its_own_layer_and_the_layers_below():
    wrong = []
    for module, path in MODULES.items():
        layer = layer_of(module)
        for name, line in imports_of(path):
            if name not in MODULES or layer is None:
                continue
            target = layer_of(name)
            if target is not None and target != layer and target not in RULES[layer]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {name} ({target})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_only_the_core_imports_the_model_libraries_and_the_layers_under_http_no_web_framework():
    wrong = []
    for module, path in MODULES.items():
        layer = layer_of(module)
        for name, line in imports_of(path):
            top = name.split(".")[0]
            if top in MODEL_LIBRARIES and layer not in MAY_IMPORT_MODEL_LIBRARIES:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {name}")
            if top in WEB_LIBRARIES and layer in NO_WEB_LIBRARIES:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_tools_but_their_shims():
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for module, path in MODULES.items()
        if layer_of(module) not in ("tools", "shims")
        for name, line in imports_of(path)
        if name == "svd.tools" or name.startswith("svd.tools.")
    ]
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_circle():
    edges = _edges()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for name in sorted(edges[module]):
            if state.get(name) == 1:
                circles.append([*path[path.index(name) :], name])
            elif name not in state:
                walk(name)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(circle) for circle in circles)


def test_no_folder_holds_more_than_twelve_modules():
    folders: dict[Path, int] = {}
    for path in (ROOT / "svd").rglob("*.py"):
        folders[path.parent] = folders.get(path.parent, 0) + 1
    crowded = {str(folder.relative_to(ROOT)): count for folder, count in folders.items() if count > MAX_MODULES}
    assert not crowded, crowded


def test_every_module_is_in_a_layer_of_the_table():
    unknown = sorted(module for module in MODULES if layer_of(module) not in (None, *RULES))
    assert not unknown, unknown
