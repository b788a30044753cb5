"""Shared fixtures: real PostgreSQL (embedded or DATABASE_URL), real Redis, a real
Celery worker process, and real adapter files built with PEFT (hub.demo)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture(scope="session", autouse=True)
def unthrottled():
    """No rate limits in tests (in this process and the servers it starts), except where a test
    sets them (tests/test_throttling.py)."""
    from django.conf import settings

    settings.QUIVER_THROTTLE_RATES = {"anon": None, "user": None}
    os.environ["QUIVER_THROTTLE_ANON"] = os.environ["QUIVER_THROTTLE_USER"] = ""


@pytest.fixture(scope="session")
def demo_files():
    """The demo catalog's real files (base models and adapters), built once and cached."""
    from hub.demo.builders import build_demo_files

    return build_demo_files(ROOT / "var" / "demo-cache")


@pytest.fixture(scope="session")
def small_zoo():
    """The small LoRA zoo (16 tasks, real PEFT training), built once and kept under var/test
    (a rerun resumes or reuses it): its folder."""
    import torch

    from generation.zoo.build import build_zoo

    zoo_dir = ROOT / "var" / "test" / "zoo-small"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is faster than two fighting the worker
    try:
        build_zoo(zoo_dir, "small", progress=False)
    finally:
        torch.set_num_threads(threads)
    return zoo_dir


@pytest.fixture
def make_user(db):
    from django.contrib.auth import get_user_model

    def make(username: str, **extra):
        return get_user_model().objects.create_user(username=username, password="pw-" + username, **extra)

    return make


@pytest.fixture
def client_for():
    """An API client authenticated with a real API token of `user` (None: anonymous)."""
    from rest_framework.test import APIClient

    from hub.services.accounts import create_api_token

    def make(user=None) -> APIClient:
        client = APIClient()
        if user is not None:
            client.credentials(HTTP_AUTHORIZATION="Token " + create_api_token(user))
        return client

    return make


def _database_url_for_test_db() -> str:
    from django.conf import settings

    db = settings.DATABASES["default"]
    host = quote(db.get("HOST") or "", safe="")
    password = f":{quote(db['PASSWORD'], safe='')}" if db.get("PASSWORD") else ""
    port = f":{db['PORT']}" if db.get("PORT") else ""
    return f"postgres://{db['USER']}{password}@{host}{port}/{db['NAME']}"


def start_worker(log_path: Path, *, name: str, queues: str = "default,embed,gpu", module: str = "celery",
                 **env: str) -> subprocess.Popen:
    """A real `celery worker` process on the test database (in its own process group, so a test
    can kill it whole); returns once it is ready. `module` runs the celery command line (a test's
    wrapper may set something up first)."""
    ARTIFACTS.mkdir(exist_ok=True)
    env = {**os.environ, "DATABASE_URL": _database_url_for_test_db(), "PYTHONUNBUFFERED": "1", **env}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, "-A", "workers", "worker", "--queues", queues,
             "--concurrency", "1", "--pool", "prefork", "--loglevel", "INFO", "--hostname", f"{name}@%h"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while "ready." not in log_path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("celery worker did not start:\n" + log_path.read_text()[-3000:])
        time.sleep(0.2)
    return process


def stop_worker(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


SESSION_WORKER = f"test-{os.getpid()}"


@pytest.fixture(scope="session")
def session_worker(django_db_setup, django_db_blocker):
    """A real `celery worker` process on the test database, consuming every queue."""
    from workers import app

    app.control.purge()  # tasks left by an earlier, interrupted run
    process = start_worker(ARTIFACTS / "celery-worker.log", name=SESSION_WORKER)
    yield process
    stop_worker(process)


@pytest.fixture
def celery_worker_process(session_worker):
    """The session's worker, for one (transactional) test, which ends only once the jobs it queued
    have finished: the tables are truncated after the test, and a job still writing (the embedding
    a composed adapter's upload queued, say) would deadlock the TRUNCATE and leave rows behind."""
    yield session_worker
    wait_for_jobs_to_settle()


def wait_for_job(job_id, *, timeout: float = 120.0):
    """Poll the Job row (as a client would poll /api/v1/jobs/{id}/) until it finishes."""
    from hub.models import Job

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = Job.objects.get(id=job_id)
        if job.state in Job.FINISHED_STATES:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job.state} after {timeout}s")


def wait_for_jobs_to_settle(timeout: float = 300.0) -> None:
    """Until no job is queued or running, counting those that finishing jobs queue."""
    from hub.models import Job

    unfinished = Job.objects.filter(state__in=(Job.State.QUEUED, Job.State.RUNNING))
    while (job := unfinished.first()) is not None:
        wait_for_job(job.id, timeout=timeout)


def wait_for_all_jobs():
    from hub.models import Job

    for job in Job.objects.all():
        finished = wait_for_job(job.id, timeout=180)
        assert finished.state == Job.State.SUCCEEDED, (finished.kind, finished.error)


@pytest.fixture
def registry(celery_worker_process, demo_files):
    """The demo registry, registered through the services and embedded by the worker."""
    from hub.management.commands.seed_demo import seed_catalog

    seed_catalog(demo_files, log=lambda message: None)
    wait_for_all_jobs()
    return demo_files


@pytest.fixture
def zoo_registry(celery_worker_process, small_zoo):
    """The small zoo registered through the services (base zoo/minilm-task-classifier and its
    expert adapters, owned by the user `zoo`): that user."""
    from django.contrib.auth import get_user_model

    from generation.zoo.build import zoo_catalog
    from hub.services.catalog import seed_catalog

    seed_catalog(zoo_catalog(small_zoo), log=lambda message: None)
    return get_user_model().objects.get(username="zoo")


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def demo_bases(db, demo_files):
    """The demo base models registered through the service (full name → BaseModel)."""
    from django.contrib.auth import get_user_model

    from hub.services.base_models import register_base_model
    from hub.services.files import IncomingFile

    owner, _ = get_user_model().objects.get_or_create(username="quiver-demo")
    return {
        f"{entry['namespace']}/{entry['name']}": register_base_model(
            user=owner, namespace=entry["namespace"], name=entry["name"],
            files=[IncomingFile.from_path(path) for path in entry["files"]],
        )
        for entry in demo_files["base_models"]
    }


@pytest.fixture
def live_hub(live_server, demo_files) -> str:
    """The hub on a live test server (a thread of this process, on the test database) with the demo
    catalog registered: the base URL for real HTTP clients (huggingface_hub, PEFT, the quiver CLI)."""
    from hub.services.catalog import seed_catalog

    seed_catalog(demo_files, log=lambda message: None)
    return live_server.url


@pytest.fixture
def demo_adapter(demo_files):
    """A demo catalog adapter entry by name."""
    by_name = {entry["name"]: entry for entry in demo_files["adapters"]}
    return by_name.__getitem__


def upload_payload(entry: dict, **fields) -> dict:
    """Multipart data for POST /api/v1/adapters/ from a built catalog entry's real files."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    files = [SimpleUploadedFile(Path(path).name, Path(path).read_bytes()) for path in entry["files"]]
    data = {"files": files, "namespace": fields.pop("namespace", "alice"), "name": fields.pop("name", entry["name"])}
    if entry.get("base_model"):
        data["base_model"] = entry["base_model"]
    data.update({"description": entry.get("description", ""), **fields})
    return data


def stored_state() -> dict:
    """What an upload leaves behind: rows and blob files (to assert a refusal left nothing)."""
    from django.conf import settings

    from hub.models import Adapter, Blob, Revision, RevisionFile

    blob_root = Path(settings.BLOB_ROOT)
    upload_tmp = Path(settings.FILE_UPLOAD_TEMP_DIR)
    return {
        "adapters": Adapter.objects.count(),
        "revisions": Revision.objects.count(),
        "files": RevisionFile.objects.count(),
        "blobs": Blob.objects.count(),
        "blob_files": sorted(str(p) for p in blob_root.rglob("*") if p.is_file()) if blob_root.exists() else [],
        "upload_tmp": sorted(str(p) for p in upload_tmp.rglob("*") if p.is_file()) if upload_tmp.exists() else [],
    }


def require_kernel(dtype=None) -> None:
    """For the tests of the fused CPU merge kernel (kernels/merge_cpu.py): skip where this machine
    cannot have it (no AVX-512/AVX2 build it runs, or neither a cached library nor a C compiler);
    fail where it could but the kernel is off, e.g. because it differs from the torch reference,
    so that a wrong kernel does not turn its tests into skips."""
    import torch

    from kernels import merge_cpu

    variant = merge_cpu.chosen_variant()
    if variant is None:
        pytest.skip("this CPU runs no build of the fused merge kernel (AVX-512 or AVX2 with FMA)")
    if not merge_cpu.library_path(variant).exists() and merge_cpu._compiler() is None:
        pytest.skip("no C compiler here and no cached build of the fused merge kernel")
    dtype = dtype or torch.bfloat16
    if not merge_cpu.available(dtype):
        pytest.fail(f"the {variant} build of the fused merge kernel did not build or differs from the torch reference "
                    f"in {dtype}")
