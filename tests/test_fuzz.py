"""The published schema is the contract: Schemathesis, the property-based API fuzzer, reads
/docs.json of a real `bentoml serve` of the tiny model and sends what a new user's CI would.

Negative data (requests the schema says are wrong) goes to every route: none may get a 5xx.
Positive data (requests the schema says are right) goes to every route that does not
generate: each must be accepted and answered with a status the schema documents. The
generating routes (/generate, /generate_task, /generate_task/submit) get no positive data:
each valid request would make a 1024x576 video by default, minutes of CPU apiece here; the
tests of tests/test_http.py and tests/test_jobs.py send them valid requests instead.
A fixed seed makes every run send the same requests, so a failure reproduces.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness import Server

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
SEED = "20261202"
GENERATING = r"^/generate(_task|_task/submit)?$"


def _fuzz(server: Server, tmp_path: Path, *options: str) -> str:
    run = subprocess.run(
        [str(SCHEMATHESIS), "run", f"{server.url}/docs.json", "--seed", SEED, "--max-examples", "40", *options],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    return run.stdout


NEGATIVE = ("--mode", "negative", "--checks", "not_a_server_error,negative_data_rejection")


def test_no_request_the_schema_calls_wrong_gets_a_server_error(server: Server, tmp_path: Path):
    logged_before = len(server.log_text())
    report = _fuzz(server, tmp_path, *NEGATIVE, "--exclude-path-regex", GENERATING)
    assert "10 selected / 13 total" in report
    # The routes that take the image as a multipart file: Schemathesis 4.32's random phase crashes
    # on them in negative mode (jsonschema_rs: "Unsupported type: 'Binary'", while it checks that
    # a mutated form is invalid). Its coverage phase sends them the wrong values, types and
    # missing fields, and the stateful phase sequences of them.
    report = _fuzz(
        server, tmp_path, *NEGATIVE, "--include-path-regex", GENERATING, "--phases", "examples,coverage,stateful"
    )
    assert "3 selected / 13 total" in report
    log = server.log_text()[logged_before:]
    assert "Traceback" not in log, "a refused request logs its access line, not a traceback"
    assert log.count("status=4") > 100, "the refusals were logged, one line each"


def test_requests_the_schema_calls_right_are_accepted_with_documented_statuses(server: Server, tmp_path: Path):
    report = _fuzz(
        server, tmp_path, "--mode", "positive", "--exclude-path-regex", GENERATING,
        "--checks", "positive_data_acceptance,status_code_conformance,not_a_server_error",
    )
    assert "10 selected / 13 total" in report


def test_the_schema_says_what_a_route_refuses(server: Server):
    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    progress = spec["paths"]["/progress"]["post"]
    body = progress["requestBody"]
    assert body["required"] and body["content"]["application/json"]["schema"]["additionalProperties"] is False
    generate = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert generate["additionalProperties"] is False
    assert set(progress["responses"]) == {"200", "400", "404", "408", "413", "503"}
    assert set(spec["paths"]["/generate"]["post"]["responses"]) == {
        "200", "400", "408", "413", "415", "422", "429", "503", "504", "507"
    }
    refusal = progress["responses"]["400"]["content"]["application/json"]["schema"]
    assert spec["components"]["schemas"][refusal["$ref"].rsplit("/", 1)[1]]["required"] == ["error"]
    assert "Retry-After" in spec["paths"]["/generate"]["post"]["responses"]["429"]["headers"]
    # What the schema says, the route does: an unknown field is refused, naming it.
    refused = httpx.post(f"{server.url}/progress", json={"task_id": "0" * 32, "verbose": True}, timeout=30)
    assert refused.status_code == 400 and "`verbose`" in refused.json()["error"]


@pytest.mark.parametrize("route", ["/generate_task/status", "/generate_task/get"])
def test_the_schema_gives_the_task_id_its_form(server: Server, route: str):
    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    (parameter,) = spec["paths"][route]["get"]["parameters"]
    assert parameter["schema"]["pattern"] == "^[0-9a-f]{32}$"
    assert httpx.get(f"{server.url}{route}", params={"task_id": "a" * 32}, timeout=30).status_code == 404
    assert httpx.get(f"{server.url}{route}", params={"task_id": "not-an-id"}, timeout=30).status_code == 400


MALFORMED = {
    "a JSON list": ("/progress", "application/json", b"[1]", "the body: Input should be an object"),
    "JSON that does not parse": ("/progress", "application/json", b"{bad", "the body: Invalid JSON"),
    "a wrong type": ("/progress", "application/json", b'{"task_id": 5}', "task_id: Input should be a valid string"),
    "no body": ("/progress", "application/json", b"", "task_id: Field required"),
    "Latin-1 in a JSON body": (
        "/progress",
        "application/json; charset=latin-1",
        b'{"task_id": "\xe9"}',
        "the body: Invalid JSON",
    ),
    "text instead of a form": ("/generate", "text/plain", b"hello", "the body: Invalid JSON"),
    "JSON without the image": ("/generate", "application/json", b'{"seed": 1}', "image: Field required"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_body_gets_400_with_an_error_that_says_what_was_wrong(server: Server, case: str):
    route, content_type, body, message = MALFORMED[case]
    response = httpx.post(f"{server.url}{route}", headers={"Content-Type": content_type}, content=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"].startswith(message), response.text
    assert response.json()["detail"], "the details stay for clients that read them"
