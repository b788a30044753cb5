"""Celery tasks: take a job id, call the service that does the work, report through the Job row.
acks_late + reject_on_worker_lost (settings) make a killed worker's task run again;
hub.services.jobs.run_job makes that rerun safe. Queues are chosen by hub.services.jobs.TASKS."""
from celery import shared_task

from hub.services import cleanup, compositions, embeddings, generations
from hub.services.analysis import analyze_revision_job
from hub.services.jobs import run_job


def job_task(name: str, work):
    """A Celery task named workers.tasks.<name> that runs `work` for a job id."""

    def run(job_id: str) -> str:
        return run_job(job_id, work).state

    run.__name__ = run.__qualname__ = name
    return shared_task(name=f"workers.tasks.{name}")(run)


analyze_revision = job_task("analyze_revision", analyze_revision_job)
embed_adapter = job_task("embed_adapter", embeddings.embed_adapter_job)
reembed_all = job_task("reembed_all", embeddings.reembed_all_job)
train_weight_encoder = job_task("train_weight_encoder", embeddings.train_weight_encoder_job)
compose = job_task("compose", compositions.compose_job)
merge = job_task("merge", compositions.merge_job)
train_generator = job_task("train_generator", generations.train_generator_job)
generate_adapter = job_task("generate_adapter", generations.generate_job)


@shared_task(name="workers.tasks.sweep_orphan_blobs")
def sweep_orphan_blobs() -> int:
    """Periodic (beat): remove blobs no row references, after a grace period."""
    return cleanup.sweep_orphan_blobs()


@shared_task(name="workers.tasks.sweep_stale_scratch")
def sweep_stale_scratch() -> int:
    """Periodic (beat): remove what killed uploads and merges left in the scratch folder."""
    return cleanup.sweep_stale_scratch()


@shared_task(name="workers.tasks.expire_merged_checkpoints")
def expire_merged_checkpoints() -> dict:
    """Periodic (beat): remove stored merges past their retention or the storage cap (LRU)."""
    return cleanup.expire_merged_checkpoints()
