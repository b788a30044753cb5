"""A worker killed with SIGKILL in the middle of a merge: the job is retried by another worker and
completes; nothing partial is ever served; no orphan blob remains. A merge cancelled in the middle:
its worker stops, removes its scratch files and takes the next job."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS, ROOT, SESSION_WORKER, start_worker, stop_worker, wait_for_job

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# Short enough for a test, longer than the (interrupted) merge; production keeps hours (settings).
VISIBILITY = {"QUIVER_VISIBILITY_TIMEOUT": "6", "QUIVER_UNACKED_RESTORE_INTERVAL": "1"}


@pytest.fixture(scope="module")
def large_files():
    """A 6-layer Llama of hidden size 1024 (≈ 400 MB of float32, several copy chunks and row blocks
    per tensor) and a real PEFT LoRA on it; built once, cached under var/test."""
    from hub.demo.builders import build_peft_adapter, build_tiny_llama

    folder = ROOT / "var" / "test" / "large-llama"
    base, adapter = folder / "base", folder / "adapter"
    if not (adapter / "adapter_model.safetensors").exists():
        build_tiny_llama(base, hidden_size=1024, intermediate_size=4096, layers=6, heads=8)
        build_peft_adapter(base, adapter, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], train_steps=1)
    return base, adapter


@pytest.fixture
def only_our_workers():
    """The session's worker stops consuming the merge queue while this test owns it."""
    from workers import app

    session_worker = f"{SESSION_WORKER}@{socket.gethostname()}"
    app.control.cancel_consumer("gpu", destination=[session_worker], reply=True, timeout=2)
    yield
    app.control.add_consumer("gpu", destination=[session_worker], reply=True, timeout=2)


@pytest.fixture
def large_registry(large_files, make_user, client_for):
    """alice's large base and LoRA registered; her API client."""
    from hub.services.adapters import upload_adapter
    from hub.services.base_models import register_base_model
    from hub.services.files import IncomingFile

    base_dir, adapter_dir = large_files
    alice = make_user("alice")
    register_base_model(user=alice, namespace="alice", name="large-llama",
                        files=[IncomingFile.from_path(p) for p in sorted(base_dir.iterdir()) if p.is_file()])
    upload_adapter(user=alice, namespace="alice", name="large-lora", base_model="alice/large-llama",
                   files=[IncomingFile.from_path(p) for p in sorted(adapter_dir.iterdir()) if p.is_file()])
    return client_for(alice)


def request_large_merge(api) -> str:
    response = api.post("/api/v1/merges/", {"base_model": "alice/large-llama",
                                            "adapters": [{"id": "alice/large-lora", "weight": 0.5}]}, format="json")
    assert response.status_code == 202, response.content
    return response.json()["id"]


def merge_streaming(api) -> str:
    """A merge requested, once it runs and streams its tensors (on a paced worker): its job id."""
    from hub.models import Job

    job_id = request_large_merge(api)
    deadline = time.monotonic() + 120
    while True:
        job = Job.objects.get(id=job_id)
        if job.state == Job.State.RUNNING and 0.06 < job.progress < 0.9:
            return job_id
        assert job.state != Job.State.SUCCEEDED, "the merge finished before it could be interrupted"
        assert time.monotonic() < deadline, f"the merge never started: {job.state} {job.progress}"
        time.sleep(0.02)


@pytest.fixture
def new_merge_scratch():
    """() → the merges' scratch folders that appeared since the test began."""
    from django.conf import settings

    scratch = Path(settings.FILE_UPLOAD_TEMP_DIR)
    before = set(scratch.glob("merge-*"))
    return lambda: set(scratch.glob("merge-*")) - before


def start_paced_worker(name: str):
    """A worker on the merge queue whose writes are paced (tests/paced_merge_worker.py), so that
    what a test does to its merge lands mid-stream."""
    return start_worker(ARTIFACTS / f"celery-worker-{name}.log", name=f"{name}-{os.getpid()}", queues="gpu",
                        module="tests.paced_merge_worker", **VISIBILITY)


def test_a_merge_whose_worker_is_killed_is_retried_and_completes(large_registry, only_our_workers,
                                                                   new_merge_scratch):
    from django.conf import settings

    from hub.models import Job, MergedCheckpoint
    from hub.services.cleanup import sweep_stale_scratch, unreferenced_blobs

    api = large_registry
    doomed = start_paced_worker("killed")
    try:
        job_id = merge_streaming(api)  # killed while it streams the merged tensors
    finally:  # killed mid-merge, or (the test failing) killed anyway: never left running
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait(timeout=60)
    assert doomed.returncode == -signal.SIGKILL

    # While no worker runs it, nothing of the merge is served.
    job = Job.objects.get(id=job_id)
    assert job.state == Job.State.RUNNING and not MergedCheckpoint.objects.exists()
    merge_id = job.params["key"]
    assert api.get(f"/api/v1/merges/{merge_id}/").status_code == 404
    assert api.get(f"/api/v1/merges/{merge_id}/files/model.safetensors").status_code == 404

    rescuer = start_worker(ARTIFACTS / "celery-worker-rescuer.log", name=f"rescuer-{os.getpid()}", queues="gpu",
                           **VISIBILITY)
    try:
        finished = wait_for_job(job_id, timeout=180)
    finally:
        stop_worker(rescuer)

    assert finished.state == Job.State.SUCCEEDED, finished.error
    assert finished.attempts == 2  # the redelivered task ran the same job again
    files = api.get(f"/api/v1/merges/{merge_id}/").json()["files"]
    weights = next(f for f in files if f["filename"].endswith(".safetensors"))
    body = b"".join(api.get(f"/api/v1/merges/{merge_id}/files/{weights['filename']}").streaming_content)
    assert len(body) == weights["size"] and hashlib.sha256(body).hexdigest() == weights["sha256"]
    assert MergedCheckpoint.objects.count() == 1
    assert not unreferenced_blobs(timedelta(0)).exists()  # the killed attempt left no orphan blob
    # ...but its half-written checkpoint is still in the scratch folder, until the hourly sweep
    # finds it idle for the grace period: aged here past it, then swept (other entries are fresh).
    left = new_merge_scratch()
    assert left, "the killed merge left no scratch folder"
    idle_since = time.time() - settings.QUIVER_ORPHAN_GRACE_SECONDS - 60
    for folder in left:
        for path in [folder, *folder.rglob("*")]:
            os.utime(path, (idle_since, idle_since))
    assert sweep_stale_scratch() >= 1
    assert not new_merge_scratch()


def test_a_merge_cancelled_midway_stops_cleans_up_and_frees_its_worker(large_registry, only_our_workers,
                                                                        new_merge_scratch):
    from hub.models import Job, MergedCheckpoint
    from hub.services.cleanup import unreferenced_blobs

    api = large_registry
    worker = start_paced_worker("cancel")
    try:
        job_id = merge_streaming(api)
        assert new_merge_scratch(), "the merge writes no scratch folder"
        response = api.post(f"/api/v1/jobs/{job_id}/cancel/")
        assert response.status_code == 200 and response.json()["state"] == "cancelled", response.content

        # The worker notices at its next progress report: it stops and its scratch folder goes.
        deadline = time.monotonic() + 30
        while new_merge_scratch():
            assert time.monotonic() < deadline, "the cancelled merge is still writing"
            time.sleep(0.05)
        stopped = Job.objects.get(id=job_id)
        assert stopped.state == Job.State.CANCELLED and stopped.result is None and not stopped.error
        assert not MergedCheckpoint.objects.exists() and not unreferenced_blobs(timedelta(0)).exists()
        again = api.post(f"/api/v1/jobs/{job_id}/cancel/")
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"

        # The same worker is free for the next job: the same merge, asked again, completes.
        finished = wait_for_job(request_large_merge(api), timeout=120)
        assert finished.state == Job.State.SUCCEEDED, finished.error
        assert Job.objects.get(id=job_id).state == Job.State.CANCELLED
    finally:
        stop_worker(worker)
