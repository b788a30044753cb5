from django.core.management.base import BaseCommand

from generation.weight_encoder import TRAIN_EPOCHS
from hub.models import Job
from hub.services.embeddings import train_weight_encoder_job
from hub.services.jobs import enqueue_job, run_job


class Command(BaseCommand):
    help = ("Train the weight encoder (adapter weights → text space) on the public adapters with descriptions, "
            "store it as a new versioned artifact, and re-embed every adapter in the background.")

    def add_arguments(self, parser):
        parser.add_argument("--epochs", type=int, default=TRAIN_EPOCHS)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--background", action="store_true", help="queue the job for a worker instead")

    def handle(self, epochs, seed, background, **options):
        params = {"training": {"epochs": epochs, "seed": seed}}
        if background:
            job = enqueue_job(kind=Job.Kind.TRAIN_WEIGHT_ENCODER, owner=None, params=params)
            self.stdout.write(f"queued job {job.id}")
            return
        job = Job.objects.create(kind=Job.Kind.TRAIN_WEIGHT_ENCODER, params=params)
        job = run_job(str(job.id), train_weight_encoder_job)
        if job.state != Job.State.SUCCEEDED:
            raise SystemExit(f"training failed: {job.error}")
        self.stdout.write(f"trained {job.result['encoder']} on {job.result['adapters']} adapters; "
                          f"recall@1 {job.result['initial']['recall_at_1']:.2f} → {job.result['final']['recall_at_1']:.2f}")
