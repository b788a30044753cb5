import argparse

from django.core.management.base import BaseCommand

from generation.generators import METHODS
from hub.models import BaseModel, Job
from hub.selectors import get_base_model
from hub.services.generations import SPACES, train_generator_job
from hub.services.jobs import enqueue_job, run_job


class Command(BaseCommand):
    help = ("Train SG-LoRA / ICM-LoRA generators on a base model's public adapters and store them as new "
            "versioned artifacts (in this process, or as jobs on queue `gpu` with --background).")

    def add_arguments(self, parser):
        parser.add_argument("base_model", help="namespace/name")
        parser.add_argument("--method", choices=(*METHODS, "all"), default="all")
        parser.add_argument("--steps", type=int, default=None)
        parser.add_argument("--space", choices=SPACES, default="parameter",
                            help="function: train by the base model's outputs on its probe texts")
        parser.add_argument("--conjunctions", action=argparse.BooleanOptionalAction, default=True,
                            help="first derive experts for the conjunctions no expert covers (a base the hub can "
                                 "run; on by default)")
        parser.add_argument("--background", action="store_true", help="queue the jobs for a worker instead")

    def handle(self, base_model, method, steps, space, background, conjunctions, **options):
        base: BaseModel = get_base_model(base_model)
        settings = {"steps": steps} if steps else {}
        for name in METHODS if method == "all" else (method,):
            params = {"base_model_id": base.id, "method": name, "settings": settings, "space": space,
                      "conjunctions": conjunctions}
            if background:
                self.stdout.write(f"queued job {enqueue_job(kind=Job.Kind.TRAIN_GENERATOR, owner=None, params=params).id}")
                continue
            job = run_job(str(Job.objects.create(kind=Job.Kind.TRAIN_GENERATOR, params=params).id), train_generator_job)
            if job.state != Job.State.SUCCEEDED:
                raise SystemExit(f"{name}: training failed: {job.error}")
            self.stdout.write(f"{job.result['generator']}: {job.result['experts']} experts, "
                              f"{job.result['conjunctions']} derived conjunctions, "
                              f"{len(job.result['skipped'])} skipped, final {job.result['final']}")
