"""Kept outputs: every video in SVD_OUTPUT_DIR with its sidecar, served back by id, across restarts."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from harness import PHOTO, ROOT, SMALL, decode_video, serve, wait_until
from svd.base.ids import ID
from svd.base.retention import Retention
from svd.storage.outputs import Outputs

TINY = {**SMALL, "num_frames": 4}


def _post(url: str, route: str = "/generate", **data) -> httpx.Response:
    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    return httpx.post(f"{url}{route}", files=files, data={**TINY, **data}, timeout=300)


def test_every_video_is_kept_with_how_it_was_made(call_service):
    path, headers = call_service(image=PHOTO, **TINY, seed=9)
    output_id = headers["x-output-id"]
    assert ID.fullmatch(output_id)
    folder = Path(os.environ["SVD_OUTPUT_DIR"])
    assert (folder / f"{output_id}.mp4").read_bytes() == path.read_bytes()
    record = json.loads((folder / f"{output_id}.json").read_text())
    assert record["seed"] == 9 and record["settings"] == json.loads(headers["x-settings"])
    assert record["model"] == "tiny" and record["content_type"] == "video/mp4"
    assert record["image_sha256"] == hashlib.sha256(PHOTO.read_bytes()).hexdigest()
    assert record["stage_seconds"]["denoise"] > 0 and record["created"].endswith("+00:00")
    assert not list(folder.glob(".*.part")), "no temporary file left"


def test_a_full_disk_is_a_507_and_leaves_nothing_half_written(call_service, monkeypatch: pytest.MonkeyPatch):
    from svd.storage import folder as storage

    folder = Path(os.environ["SVD_OUTPUT_DIR"])
    before = set(folder.iterdir())

    def full(source, sink) -> None:
        sink.write(source.read(1000))  # a part written, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.shutil, "copyfileobj", full)
    refused, _ = call_service(image=PHOTO, **TINY)
    assert refused.status_code == 507
    assert (
        "SVD_OUTPUT_DIR" in json.loads(refused.body)["error"]
        and "nothing was kept" in json.loads(refused.body)["error"]
    )
    assert set(folder.iterdir()) == before


def test_outputs_are_listed_newest_first_and_served_back_by_id(server):
    made = [_post(server.url, seed=str(seed)) for seed in (1, 2, 3)]
    assert all(response.status_code == 200 for response in made)
    ids = [response.headers["x-output-id"] for response in made]
    page = httpx.get(f"{server.url}/outputs/", params={"limit": 2}, timeout=30).json()
    assert [record["id"] for record in page["outputs"]] == ids[::-1][:2] and page["next_offset"] == 2
    rest = httpx.get(f"{server.url}/outputs/", params={"limit": 2, "offset": 2}, timeout=30).json()
    assert rest["outputs"][0]["id"] == ids[0]
    again = httpx.get(f"{server.url}/outputs/{ids[1]}", timeout=30)
    assert again.status_code == 200 and again.content == made[1].content
    assert again.headers["content-type"] == "video/mp4" and again.headers["x-seed"] == "2"
    assert json.loads(again.headers["x-settings"]) == json.loads(made[1].headers["x-settings"])


@pytest.mark.parametrize(
    ("output_id", "status"),
    [
        ("0" * 32, 404),
        ("%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", 400),
        ("..%2F..%2Fservice.py", 400),
        ("ABCDEF" + "0" * 26, 400),
        ("0" * 33, 400),
        ("0" * 31 + ".json", 400),
    ],
)
def test_unknown_ids_are_404_and_malformed_ones_400(server, output_id: str, status: int):
    response = httpx.get(f"{server.url}/outputs/{output_id}", timeout=30)
    assert response.status_code == status and "error" in response.json()
    assert "bentoml" not in response.text


def test_a_finished_job_is_served_by_its_task_id_after_a_restart(tmp_path: Path):
    """The job store and the output folder both outlive the server."""
    with serve(tmp_path) as first:
        task_id = _post(first.url, "/generate_task/submit", seed="4").json()["task_id"]
        status_url = f"{first.url}/generate_task/status"
        wait_until(lambda: httpx.get(status_url, params={"task_id": task_id}).json()["status"] == "completed", 120)
        video = httpx.get(f"{first.url}/generate_task/get", params={"task_id": task_id}, timeout=60)
        assert video.headers["x-output-id"] == task_id
    with serve(tmp_path) as second:
        kept = httpx.get(f"{second.url}/outputs/{task_id}", timeout=60)
        assert kept.status_code == 200 and kept.content == video.content, "byte for byte"
        assert kept.headers["x-seed"] == "4"
        again = httpx.get(f"{second.url}/generate_task/get", params={"task_id": task_id}, timeout=60)
        assert again.status_code == 200 and again.content == video.content, "the job store survived"
    (tmp_path / "kept.mp4").write_bytes(kept.content)
    assert len(decode_video(tmp_path / "kept.mp4").frames) == 4


def _fake_output(outputs: Outputs, tmp_path: Path, index: int, size: int) -> str:
    video = tmp_path / f"v{index}.mp4"
    video.write_bytes(b"x" * size)
    output_id = f"{index:032x}"
    outputs.save(output_id, video, {"content_type": "video/mp4", "seed": index, "settings": {}})
    os.utime(outputs.storage.path / f"{output_id}.json", (index, index))  # distinct ages, oldest first
    return output_id


def test_the_folder_keeps_the_newest_by_count_or_by_size(tmp_path: Path):
    by_count = Outputs(tmp_path / "count", Retention(count=2))
    ids = [_fake_output(by_count, tmp_path, index, 10) for index in range(1, 5)]
    by_count.prune()
    assert [by_count.find(output_id) is not None for output_id in ids] == [False, False, True, True]
    by_size = Outputs(tmp_path / "size", Retention(bytes=2500))
    ids = [_fake_output(by_size, tmp_path, index, 1000) for index in range(1, 5)]
    # Named as write_atomically names a video it is writing: the id is in it.
    being_written = by_size.storage.path / f".{'0' * 31}9.mp4.k2v8q1.part"
    being_written.write_bytes(b"x" * 5000)
    by_size.prune()
    assert [by_size.find(output_id) is not None for output_id in ids] == [False, False, True, True]
    assert being_written.exists(), "a file being written is never pruned"


def test_files_a_crash_left_mid_write_are_removed_once_older_than_any_write(tmp_path: Path):
    outputs = Outputs(tmp_path / "outputs", Retention(count=10))
    left = [outputs.storage.path / f".{'0' * 31}9.mp4.k2v8q1.part", outputs.storage.path / f"{'0' * 31}8~1.mp4"]
    fresh = outputs.storage.path / f".{'0' * 31}7.mp4.x1y2z3.part"
    for path in [*left, fresh]:
        path.write_bytes(b"x")
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in left:
        os.utime(path, (two_days_ago, two_days_ago))
    outputs.prune()
    assert [path.exists() for path in [*left, fresh]] == [False, False, True]


def test_a_sidecar_that_cannot_be_written_takes_its_video_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    outputs = Outputs(tmp_path / "out", Retention(count=10))
    writes: list[str] = []
    real_write = outputs.storage.write

    def sidecar_fails(name: str, content) -> None:
        writes.append(name)
        if name.endswith(".json"):
            raise OSError(errno.EIO, "Input/output error")
        real_write(name, content)

    monkeypatch.setattr(outputs.storage, "write", sidecar_fails)
    video = tmp_path / "video.mp4"
    video.write_bytes(b"x" * 100)
    with pytest.raises(OSError):
        outputs.save("1" * 32, video, {"content_type": "video/mp4", "seed": 1, "settings": {}})
    assert [Path(name).suffix for name in writes] == [".mp4", ".json"], "the video was in place when the sidecar failed"
    assert list(outputs.storage.path.iterdir()) == [], "no video without its record"


def test_the_listing_pages_to_a_null_next_offset(tmp_path: Path):
    from starlette.testclient import TestClient

    from svd.http.outputs_routes import library_app

    outputs = Outputs(tmp_path / "out", Retention(count=10))
    ids = [_fake_output(outputs, tmp_path, index, 10) for index in range(1, 4)]
    with TestClient(library_app(outputs)) as client:
        first = client.get("/", params={"limit": 2}).json()
        last = client.get("/", params={"limit": 2, "offset": 2}).json()
    assert [record["id"] for record in first["outputs"]] == ids[::-1][:2] and first["next_offset"] == 2
    assert [record["id"] for record in last["outputs"]] == ids[:1] and last["next_offset"] is None


@pytest.mark.parametrize(
    ("value", "keep"),
    [("500", Retention(count=500)), ("2GB", Retention(bytes=2 * 1000**3)), ("750 mb", Retention(bytes=750 * 1000**2))],
)
def test_svd_output_keep_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, keep: Retention):
    from svd.base.settings import Settings

    monkeypatch.setenv("SVD_OUTPUT_KEEP", value)
    assert Settings.from_env().output_keep == keep


def test_a_bad_svd_output_keep_stops_the_start_naming_it(monkeypatch: pytest.MonkeyPatch):
    from svd.base.settings import ConfigError, Settings

    monkeypatch.setenv("SVD_OUTPUT_KEEP", "lots")
    with pytest.raises(ConfigError, match="SVD_OUTPUT_KEEP: 'lots' is neither a count"):
        Settings.from_env()


def test_with_the_output_folder_set_empty_nothing_is_kept_but_jobs_still_deliver(tmp_path: Path):
    jobs_db = tmp_path / "jobs" / "jobs.db"
    with serve(tmp_path, env={"SVD_OUTPUT_DIR": "", "SVD_JOBS_DB": str(jobs_db)}) as server:
        made = _post(server.url, seed="6")
        assert made.status_code == 200 and "x-output-id" not in made.headers, "no id that points at nothing"
        assert httpx.get(f"{server.url}/outputs/", timeout=30).status_code == 404, "no /outputs at all"
        task_id = _post(server.url, "/generate_task/submit", seed="7").json()["task_id"]
        status_url = f"{server.url}/generate_task/status"
        wait_until(lambda: httpx.get(status_url, params={"task_id": task_id}).json()["status"] == "completed", 120)
        video = httpx.get(f"{server.url}/generate_task/get", params={"task_id": task_id}, timeout=60)
        assert video.status_code == 200 and video.headers["x-seed"] == "7"
        assert "denoise;dur=" in video.headers["server-timing"]
    # The job's video waited beside the job store; nothing went to ./outputs or anywhere else.
    assert (jobs_db.parent / f"{task_id}.mp4").is_file()
    assert not (tmp_path / "outputs").exists() and not (ROOT / "svd-jobs").exists()
    (tmp_path / "job.mp4").write_bytes(video.content)
    assert len(decode_video(tmp_path / "job.mp4").frames) == 4
