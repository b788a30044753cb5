"""Build the LoRA zoo (resumable: rerun after an interruption) and register it."""
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from generation.zoo.build import build_zoo, zoo_catalog
from hub.services.catalog import seed_catalog


class Command(BaseCommand):
    help = ("Train the LoRA zoo's task adapters (full: 75 tasks, ~40 s each on 2 cores; small: 16 tasks for tests), "
            "then register the base model and the training experts in the hub.")

    def add_arguments(self, parser):
        parser.add_argument("--size", choices=("full", "small"), default="full")
        parser.add_argument("--dir", default=None, help="where the zoo is kept (default var/zoo/<size>)")
        parser.add_argument("--no-register", action="store_true", help="only build the files")

    def handle(self, size, dir, no_register, **options):
        zoo_dir = Path(dir or settings.VAR_DIR / "zoo" / size)
        manifest = build_zoo(zoo_dir, size)
        trained = [e for e in manifest["tasks"] if e["task"]["split"] == "train"]
        self.stdout.write(f"zoo ({size}) at {zoo_dir}: {len(manifest['tasks'])} tasks, {len(trained)} experts")
        if not no_register:
            seed_catalog(zoo_catalog(zoo_dir), log=self.stdout.write)
