"""Jobs: a row per piece of background work, the single place progress is reported.

Tasks are sent by name (no import of workers/ here) and only after the
transaction that created the job commits, so a worker never sees a job whose
inputs are not yet visible.
"""
from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

from celery import current_app
from django.db import transaction
from django.utils import timezone

from hub.models import Job

logger = logging.getLogger(__name__)

# Job kind → (Celery task name, queue).
TASKS: dict[str, tuple[str, str]] = {
    Job.Kind.ANALYZE: ("workers.tasks.analyze_revision", "embed"),
    Job.Kind.EMBED: ("workers.tasks.embed_adapter", "embed"),
    Job.Kind.REEMBED_ALL: ("workers.tasks.reembed_all", "embed"),
    Job.Kind.TRAIN_WEIGHT_ENCODER: ("workers.tasks.train_weight_encoder", "gpu"),
    Job.Kind.COMPOSE: ("workers.tasks.compose", "gpu"),
    Job.Kind.MERGE: ("workers.tasks.merge", "gpu"),
    Job.Kind.TRAIN_GENERATOR: ("workers.tasks.train_generator", "gpu"),
    # Generating is a forward pass of a small network (well under a second on a CPU):
    # the default queue keeps requests from waiting behind merges and training.
    Job.Kind.GENERATE: ("workers.tasks.generate_adapter", "default"),
}


def enqueue_job(*, kind: str, owner, params: dict) -> Job:
    job = Job.objects.create(kind=kind, owner=owner, params=params)
    task_name, queue = TASKS[kind]
    transaction.on_commit(lambda: current_app.send_task(task_name, args=[str(job.id)], queue=queue))
    return job


class JobReporter:
    """Progress reports from inside a running job (rate-limited writes)."""

    def __init__(self, job: Job):
        self.job = job
        self._last_write = 0.0

    def progress(self, fraction: float, message: str = "") -> None:
        fraction = max(0.0, min(1.0, fraction))
        now = timezone.now().timestamp()
        if now - self._last_write < 0.2 and fraction < 1.0:
            return
        self._last_write = now
        Job.objects.filter(id=self.job.id).update(progress=fraction, message=message[:500])


def run_job(job_id: str, work: Callable[[Job, JobReporter], dict]) -> Job:
    """Run `work` for a job, idempotently: a finished job is not run again; a job
    redelivered after a worker died (state running) is simply run again."""
    with transaction.atomic():
        job = Job.objects.select_for_update().get(id=job_id)
        if job.state in (Job.State.SUCCEEDED, Job.State.FAILED):
            return job
        job.state = Job.State.RUNNING
        job.started_at = timezone.now()
        job.attempts += 1
        job.save(update_fields=["state", "started_at", "attempts"])
    try:
        result = work(job, JobReporter(job))
    except Exception as error:  # the job row is the place errors are reported
        logger.exception("job %s failed", job_id)
        Job.objects.filter(id=job.id).update(
            state=Job.State.FAILED,
            error=f"{type(error).__name__}: {error}"[:5000],
            message="failed",
            finished_at=timezone.now(),
        )
        logger.debug("traceback: %s", traceback.format_exc())
    else:
        Job.objects.filter(id=job.id).update(
            state=Job.State.SUCCEEDED, progress=1.0, result=result, message="done", finished_at=timezone.now()
        )
    job.refresh_from_db()
    return job
