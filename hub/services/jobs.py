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
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from hub.errors import Conflict, TooManyJobs
from hub.models import Job
from hub.selectors import get_job

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


# The jobs users ask for; the hub's own (an upload's analysis and embeddings) are not counted.
REQUESTED_KINDS = (Job.Kind.COMPOSE, Job.Kind.MERGE, Job.Kind.GENERATE, Job.Kind.TRAIN_GENERATOR)


def enqueue_requested_jobs(*, user, jobs: list[tuple[str, dict]]) -> list[Job]:
    """enqueue_job for (kind, params) pairs a user asked for, within their share of the workers: at
    most QUIVER_MAX_ACTIVE_JOBS_PER_USER of theirs queued or running (staff, and 0: no limit), so
    one user's batch cannot fill the gpu queue ahead of everyone else. Requests of one user are
    counted one at a time (their user row locked), so two at once cannot both take the last slot."""
    limit = settings.QUIVER_MAX_ACTIVE_JOBS_PER_USER
    with transaction.atomic():
        if limit and not user.is_staff:
            get_user_model().objects.select_for_update().filter(pk=user.pk).first()
            active = Job.objects.filter(owner=user, kind__in=REQUESTED_KINDS,
                                        state__in=(Job.State.QUEUED, Job.State.RUNNING)).count()
            if active + len(jobs) > limit:
                raise TooManyJobs("too_many_jobs", f"You have {active} jobs queued or running and this hub runs at "
                                  f"most {limit} per user; wait for one to finish, or cancel one.")
        return [enqueue_job(kind=kind, owner=user, params=params) for kind, params in jobs]


def enqueue_requested_job(*, kind: str, user, params: dict) -> Job:
    return enqueue_requested_jobs(user=user, jobs=[(kind, params)])[0]


class JobCancelled(BaseException):
    """Raised inside a job's work, at a progress report, once the job was cancelled. A
    BaseException, as asyncio.CancelledError is: work that catches Exception to report or retry
    a step must not swallow a cancellation (cleanup in `finally` blocks still runs)."""


class JobReporter:
    """Progress reports from inside a running job (rate-limited writes). Each write is also where a
    cancellation is noticed: the row is updated only while the job is running, so an update that
    finds no row means someone cancelled it, and the work stops there (JobCancelled)."""

    def __init__(self, job: Job):
        self.job = job
        self._last_write = 0.0

    def progress(self, fraction: float, message: str = "") -> None:
        fraction = max(0.0, min(1.0, fraction))
        now = timezone.now().timestamp()
        if now - self._last_write < 0.2 and fraction < 1.0:
            return
        self._last_write = now
        if not _running(self.job.id).update(progress=fraction, message=message[:500]):
            raise JobCancelled(f"job {self.job.id} was cancelled")


def _running(job_id):
    return Job.objects.filter(id=job_id, state=Job.State.RUNNING)


def run_job(job_id: str, work: Callable[[Job, JobReporter], dict]) -> Job:
    """Run `work` for a job, idempotently: a finished (or cancelled) job is not run again; a job
    redelivered after a worker died (state running) is simply run again. Its end is written only
    while it is still running, so a cancellation is never overwritten."""
    with transaction.atomic():
        job = Job.objects.select_for_update().get(id=job_id)
        if job.state in Job.FINISHED_STATES:
            return job
        job.state = Job.State.RUNNING
        job.started_at = timezone.now()
        job.attempts += 1
        job.save(update_fields=["state", "started_at", "attempts"])
    try:
        result = work(job, JobReporter(job))
    except JobCancelled:  # the work stopped where it noticed; its own cleanup (temporary files) has run
        logger.info("job %s stopped: cancelled", job_id)
    except Exception as error:  # the job row is the place errors are reported
        logger.exception("job %s failed", job_id)
        _running(job.id).update(
            state=Job.State.FAILED,
            error=f"{type(error).__name__}: {error}"[:5000],
            message="failed",
            finished_at=timezone.now(),
        )
        logger.debug("traceback: %s", traceback.format_exc())
    else:
        _running(job.id).update(
            state=Job.State.SUCCEEDED, progress=1.0, result=result, message="done", finished_at=timezone.now()
        )
    job.refresh_from_db()
    return job


def cancel_job(*, user, job_id) -> Job:
    """Cancel a queued or running job of `user`'s (any job for staff). A queued job never starts;
    a running one stops at its next progress report (within a fraction of a second while it
    streams a merge), removing its temporary files. Work that ends before it reports again keeps
    its result (a merge's stored checkpoint is then reused by the next identical request)."""
    get_job(user, job_id)  # 404 where the user may not see it
    with transaction.atomic():
        job = Job.objects.select_for_update().get(id=job_id)
        if job.state in Job.FINISHED_STATES:
            raise Conflict("job_finished", f"Job {job.id} has already ended ({job.state}); there is nothing to cancel.")
        job.state = Job.State.CANCELLED
        job.message = "cancelled"
        job.finished_at = timezone.now()
        job.save(update_fields=["state", "message", "finished_at"])
    return job
