"""One declaration of the controls (GenerationParams in svd/base/params.py), and everything that shows
them agrees with it: Swagger's schema, the batch client's flags and the README's table.
The web page's form is checked in a real browser (tests/test_browser.py)."""

from __future__ import annotations

import re

import httpx
import pytest

from harness import ROOT
from svd.base.params import CONTROLS, Range
from svd.http.request_fields import JOB_ONLY
from svd.tools.batch import build_parser


def _readme_controls() -> dict[str, tuple[str, str]]:
    """The README's controls table: field -> (default, allowed), as written."""
    section = (ROOT / "README.md").read_text().split("## Generation controls", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]*) \| ([^|]*) \|", section, re.M)
    return {name: (default.strip(), allowed.strip()) for name, default, allowed in rows}


def test_the_readme_table_lists_every_control_with_its_default_and_range():
    table = _readme_controls()
    assert list(table) == ["image", *(control.name for control in CONTROLS)], "same fields, same order"
    for control in CONTROLS:
        assert table[control.name] == (control.default_text, control.allowed_text), control.name


@pytest.mark.parametrize("route", ["/generate", "/generate_task/submit"])
def test_swagger_shows_each_control_s_default_range_and_description(server, route: str):
    spec = httpx.get(f"{server.url}/docs.json", timeout=60).json()
    schema = spec["paths"][route]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    properties = schema["properties"]
    job_only = list(JOB_ONLY) if route == "/generate_task/submit" else []
    assert list(properties) == ["image", *(control.name for control in CONTROLS), *job_only]
    for control in CONTROLS:
        shown = properties[control.name]
        assert shown.get("default") == control.default, control.name
        assert shown["description"] == control.help, control.name
        if isinstance(control.allowed, Range):
            assert shown["minimum"] == control.allowed.low and shown.get("maximum") == control.allowed.high
            assert shown.get("multipleOf", 1) == control.allowed.step
        else:
            assert shown["enum"] == list(control.allowed)


def test_the_batch_client_has_a_flag_per_control_checked_as_the_server_checks():
    parser = build_parser()
    flags = {action.dest: action for action in parser._actions if action.dest in {c.name for c in CONTROLS}}
    assert list(flags) == [control.name for control in CONTROLS]
    for control in CONTROLS:
        flag = flags[control.name]
        assert flag.option_strings == [f"--{control.name.replace('_', '-')}"] and flag.help == control.help
        assert flag.default is None, "left out, the server's default applies"
        if isinstance(control.allowed, Range):
            inside = control.allowed.low
            assert flag.type(str(inside)) == inside
            with pytest.raises(Exception, match=re.escape(str(control.allowed))):
                flag.type(str(control.allowed.low - 1))
        else:
            assert list(flag.choices) == list(control.allowed)

