"""Production settings come from the environment: no secret, no start."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _django_check(env: dict, show: str = "settings.DEBUG, settings.ALLOWED_HOSTS, settings.STORAGES['blobs']['BACKEND']"
                  ) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_URL", "REDIS_URL", "QUIVER_"))}
    return subprocess.run([sys.executable, "-c", f"import django; django.setup(); from django.conf import settings; "
                           f"print({show})"],
                          cwd=ROOT, env={**clean, "DJANGO_SETTINGS_MODULE": "hub.settings", **env},
                          capture_output=True, text=True, timeout=120)


def test_real_servers_without_a_secret_key_refuse_to_start():
    result = _django_check({"DATABASE_URL": "postgres://u:p@db.example:5432/q", "REDIS_URL": "redis://r:6379/0"})
    assert result.returncode != 0 and "DJANGO_SECRET_KEY" in result.stderr


def test_production_settings_from_the_environment():
    result = _django_check({"DATABASE_URL": "postgres://u:p@db.example:5432/q", "REDIS_URL": "redis://r:6379/0",
                            "DJANGO_SECRET_KEY": "s" * 50, "DJANGO_ALLOWED_HOSTS": "hub.example.com",
                            "QUIVER_S3_BUCKET": "quiver", "QUIVER_S3_ENDPOINT_URL": "http://minio:9000"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "False ['hub.example.com'] storages.backends.s3.S3Storage"


def test_an_unknown_query_precision_refuses_to_start():
    production = {"DATABASE_URL": "postgres://u:p@db.example:5432/q", "REDIS_URL": "redis://r:6379/0",
                  "DJANGO_SECRET_KEY": "s" * 50}
    result = _django_check({**production, "QUIVER_QUERY_PRECISION": "int4"})
    assert result.returncode != 0 and "QUIVER_QUERY_PRECISION" in result.stderr
    assert _django_check({**production, "QUIVER_QUERY_PRECISION": "float32"}).returncode == 0


def test_an_hnsw_breadth_pgvector_would_refuse_refuses_to_start():
    production = {"DATABASE_URL": "postgres://u:p@db.example:5432/q", "REDIS_URL": "redis://r:6379/0",
                  "DJANGO_SECRET_KEY": "s" * 50}
    for name, value in (("QUIVER_HNSW_EF_SEARCH", "abc"), ("QUIVER_HNSW_WEIGHTS_EF_SEARCH", "0"),
                        ("QUIVER_HNSW_WEIGHTS_EF_SEARCH", "1001")):
        result = _django_check({**production, name: value})
        assert result.returncode != 0 and name in result.stderr, (name, value)
    assert _django_check({**production, "QUIVER_HNSW_WEIGHTS_EF_SEARCH": "1000"}).returncode == 0


def test_download_redirects_are_on_where_clients_can_reach_the_bucket():
    production = {"DATABASE_URL": "postgres://u:p@db.example:5432/q", "REDIS_URL": "redis://r:6379/0",
                  "DJANGO_SECRET_KEY": "s" * 50, "QUIVER_S3_BUCKET": "quiver"}
    minio = {**production, "QUIVER_S3_ENDPOINT_URL": "http://minio:9000"}
    cases = [(production, True),  # AWS S3
             (minio, False),  # an internal address: streamed through the hub
             ({**minio, "QUIVER_S3_PUBLIC_ENDPOINT_URL": "https://files.example.com"}, True),
             ({**minio, "QUIVER_S3_DOWNLOAD_REDIRECTS": "1"}, True),
             ({**production, "QUIVER_S3_DOWNLOAD_REDIRECTS": "0"}, False),
             ({key: value for key, value in production.items() if key != "QUIVER_S3_BUCKET"}, False)]  # local files
    for env, expected in cases:
        result = _django_check(env, show="settings.QUIVER_S3_DOWNLOAD_REDIRECTS")
        assert result.returncode == 0 and result.stdout.split("\n")[0] == str(expected), (env, result.stderr[-500:])
    refused = _django_check({**production, "QUIVER_S3_DOWNLOAD_REDIRECTS": "yes"})
    assert refused.returncode != 0 and "QUIVER_S3_DOWNLOAD_REDIRECTS" in refused.stderr
