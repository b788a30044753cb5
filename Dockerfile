# syntax=docker/dockerfile:1.7
#
# Quiver image: one image for the web server (gunicorn), the Celery workers and beat.
#
#   docker build -t quiver .                                   # CPU torch (default)
#   docker build -t quiver-gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#
# PyPI's Linux x86_64 torch wheels are the CUDA builds, so the second form is the
# image for the GPU worker (docker-compose.yml builds it for `worker-gpu`).
FROM python:3.11-slim AS runtime

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# torch first, from its own index, so requirements.txt (which should pin plain
# `torch==2.13.0`, no `+cpu` label) finds it already satisfied.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY requirements.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r requirements.txt

# The fused CPU merge kernel (kernels/merge_cpu.c) is compiled in a stage of its own, so the image
# carries its two builds (AVX-512 and AVX2) but no compiler; each worker loads the one its CPU runs
# from QUIVER_KERNEL_CACHE (kernels/merge_cpu.py) and checks it against the torch path.
FROM runtime AS cpu-kernels
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY kernels/ kernels/
RUN QUIVER_KERNEL_CACHE=/opt/quiver/kernels python -m kernels.merge_cpu

FROM runtime
COPY --from=cpu-kernels /opt/quiver/kernels /opt/quiver/kernels
COPY . .

# Static files are baked into the image (served by WhiteNoise). Settings need a
# secret and server URLs to import; nothing connects to them during collectstatic.
RUN DJANGO_SECRET_KEY=build-only \
    DJANGO_SKIP_EMBEDDED=1 \
    DATABASE_URL=postgres://build:build@localhost:5432/build \
    REDIS_URL=redis://localhost:6379/0 \
    python manage.py collectstatic --noinput \
 && groupadd --system --gid 10001 quiver \
 && useradd --system --uid 10001 --gid quiver --home-dir /home/quiver --create-home \
        --shell /usr/sbin/nologin quiver \
 && mkdir -p /app/var/uploads /app/var/hf /app/var/beat \
 && chown -R quiver:quiver /app/var

# The embedded PostgreSQL/Redis of a developer machine never start in the image:
# DATABASE_URL and REDIS_URL come from the environment (docker-compose.yml).
ENV DJANGO_SKIP_EMBEDDED=1 \
    HF_HOME=/app/var/hf \
    QUIVER_KERNEL_CACHE=/opt/quiver/kernels

USER quiver
EXPOSE 8000

CMD ["gunicorn", "hub.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "4", "--timeout", "300"]
