"""Celery tasks: take a job id, call the service that does the work, report through the Job row.
acks_late + reject_on_worker_lost (settings) make a killed worker's task run again;
hub.services.jobs.run_job makes that rerun safe."""
from celery import shared_task

from hub.services import embeddings
from hub.services.analysis import analyze_revision_job
from hub.services.jobs import run_job


@shared_task(name="workers.tasks.analyze_revision")
def analyze_revision(job_id: str) -> str:
    return run_job(job_id, analyze_revision_job).state


@shared_task(name="workers.tasks.embed_adapter")
def embed_adapter(job_id: str) -> str:
    return run_job(job_id, embeddings.embed_adapter_job).state


@shared_task(name="workers.tasks.reembed_all")
def reembed_all(job_id: str) -> str:
    return run_job(job_id, embeddings.reembed_all_job).state


@shared_task(name="workers.tasks.train_weight_encoder")
def train_weight_encoder(job_id: str) -> str:
    return run_job(job_id, embeddings.train_weight_encoder_job).state
