"""Helpers the benchmarks share: start the hub's real server stack on loopback."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def django_setup(**env: str) -> None:
    """Configure Django in this process (embedded servers unless DATABASE_URL is set)."""
    for key, value in env.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hub.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)


def bench_database_url(name: str) -> str:
    """The server of DATABASE_URL (else the embedded one) with a benchmark's own database `name`."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    base = os.environ.get("DATABASE_URL")
    if not base:
        from hub import embedded

        base = embedded.ensure_postgres()
    with psycopg.connect(base, autocommit=True) as conn:  # CREATE DATABASE cannot run in a transaction
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(base)._replace(path="/" + name))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def gunicorn(workers: int = 2, threads: int = 4, env: dict | None = None, log_path: Path | None = None):
    """The production web server (gunicorn) on a free loopback port; yields its base URL.
    `env`: variables set for the server on top of this process's (e.g. other DATABASE_URL)."""
    port = free_port()
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "hub.wsgi:application", "--bind", f"127.0.0.1:{port}",
         "--workers", str(workers), "--threads", str(threads), "--timeout", "600"],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(url + "/api/v1/health", timeout=30).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("gunicorn did not come up")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        if log_path:
            log.close()
