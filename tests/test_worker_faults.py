"""A worker killed with SIGKILL in the middle of a merge: the job is retried by another worker and
completes; nothing partial is ever served; no orphan blob remains."""
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


def test_a_merge_whose_worker_is_killed_is_retried_and_completes(large_files, only_our_workers, make_user,
                                                                   client_for):
    from django.conf import settings

    from hub.models import Job, MergedCheckpoint
    from hub.services.adapters import upload_adapter
    from hub.services.base_models import register_base_model
    from hub.services.cleanup import sweep_stale_scratch, unreferenced_blobs
    from hub.services.files import IncomingFile

    base_dir, adapter_dir = large_files
    alice = make_user("alice")
    register_base_model(user=alice, namespace="alice", name="large-llama",
                        files=[IncomingFile.from_path(p) for p in sorted(base_dir.iterdir()) if p.is_file()])
    upload_adapter(user=alice, namespace="alice", name="large-lora", base_model="alice/large-llama",
                   files=[IncomingFile.from_path(p) for p in sorted(adapter_dir.iterdir()) if p.is_file()])
    api = client_for(alice)
    scratch = Path(settings.FILE_UPLOAD_TEMP_DIR)
    scratch_before = set(scratch.glob("merge-*"))

    # Its writes are paced (tests/paced_merge_worker.py), so that the kill lands mid-stream.
    doomed = start_worker(ARTIFACTS / "celery-worker-killed.log", name=f"doomed-{os.getpid()}", queues="gpu",
                          module="tests.paced_merge_worker", **VISIBILITY)
    try:
        response = api.post("/api/v1/merges/", {"base_model": "alice/large-llama",
                                                "adapters": [{"id": "alice/large-lora", "weight": 0.5}]}, format="json")
        assert response.status_code == 202, response.content
        job_id = response.json()["id"]
        deadline = time.monotonic() + 120
        while True:  # kill it while it streams the merged tensors
            job = Job.objects.get(id=job_id)
            if job.state == Job.State.RUNNING and 0.06 < job.progress < 0.9:
                break
            assert job.state != Job.State.SUCCEEDED, "the merge finished before it could be killed"
            assert time.monotonic() < deadline, f"the merge never started: {job.state} {job.progress}"
            time.sleep(0.02)
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
    # finds it idle for the grace period (here: any time at all).
    assert set(scratch.glob("merge-*")) - scratch_before, "the killed merge left no scratch folder"
    assert sweep_stale_scratch(older_than=timedelta(0)) >= 1
    assert not list(scratch.glob("merge-*"))
