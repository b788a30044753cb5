"""`/metrics`: what only the hub knows, in Prometheus' text format.

Computed from the database and the broker at each scrape, so every gunicorn worker answers the
same (no per-process counters, no prometheus_client multiprocess directory): the Celery queues'
lengths (what the workers' autoscaler scales on, docs/scaling.md), the unfinished jobs and the age
of the oldest queued one per kind, the jobs that ended in the last hour by state, and the stored
merges' bytes. Per-request latency and status codes are the proxy's to measure: it sees every
worker.
"""
from __future__ import annotations

import hmac
from datetime import timedelta

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from api.exceptions import error_body
from hub import selectors
from hub.services.jobs import TASKS
from workers import app as celery_app

QUEUES = sorted({queue for _, queue in TASKS.values()})
FINISHED_WINDOW = timedelta(hours=1)


def queue_lengths() -> dict[str, int]:
    """Tasks waiting in each Celery queue (Redis lists named after their queue; taken tasks leave them)."""
    with celery_app.connection_for_read() as connection:
        client = connection.default_channel.client
        return {queue: client.llen(queue) for queue in QUEUES}


class HubCollector:
    def collect(self):
        now = timezone.now()
        queues = GaugeMetricFamily("quiver_queue_length", "Tasks waiting in a Celery queue", labels=["queue"])
        for queue, length in queue_lengths().items():
            queues.add_metric([queue], length)
        yield queues

        jobs = GaugeMetricFamily("quiver_jobs_unfinished", "Jobs queued or running", labels=["kind", "state"])
        oldest = GaugeMetricFamily("quiver_job_oldest_queued_seconds",
                                   "Age of the oldest queued job of a kind (0: none queued)", labels=["kind"])
        waiting = {kind: 0.0 for kind in TASKS}
        for row in selectors.job_backlog():
            jobs.add_metric([row["kind"], row["state"]], row["count"])
            if row["state"] == "queued":
                waiting[row["kind"]] = (now - row["oldest"]).total_seconds()
        for kind, seconds in sorted(waiting.items()):
            oldest.add_metric([kind], seconds)
        yield jobs
        yield oldest

        ended = GaugeMetricFamily("quiver_jobs_finished_last_hour", "Jobs that ended in the last hour",
                                  labels=["kind", "state"])
        for row in selectors.jobs_finished_since(now - FINISHED_WINDOW):
            ended.add_metric([row["kind"], row["state"]], row["count"])
        yield ended

        storage = selectors.merge_storage()
        yield GaugeMetricFamily("quiver_merged_checkpoints", "Stored merges", value=storage["count"])
        yield GaugeMetricFamily("quiver_merged_checkpoint_bytes", "Bytes of the stored merges' files",
                                value=storage["bytes"])


def render(accept: str) -> tuple[bytes, str]:
    """The scrape in the format the scraper's Accept header asks for (Prometheus' text format, or
    OpenMetrics), and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector())
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type


@require_GET
def metrics_view(request):
    """The scrape: with QUIVER_METRICS_TOKEN set, only for `Authorization: Bearer <token>` (Prometheus'
    `authorization` scrape setting); without one, only on a developer machine (the embedded servers)."""
    token = settings.QUIVER_METRICS_TOKEN
    if token:
        offered = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(offered.encode(), token.encode()):
            return JsonResponse(error_body("metrics_token_required", "Send Authorization: Bearer <QUIVER_METRICS_TOKEN>."),
                                status=401, headers={"WWW-Authenticate": "Bearer"})
    elif not settings.QUIVER_METRICS_OPEN:
        return JsonResponse(error_body("metrics_disabled", "Set QUIVER_METRICS_TOKEN to serve /metrics."), status=404)
    body, content_type = render(request.headers.get("Accept", ""))
    return HttpResponse(body, content_type=content_type)
