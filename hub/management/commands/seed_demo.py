"""Build the demo registry: real models and adapters made with PEFT from fixed-seed
configs (hub.demo), registered through the same services as an upload."""
from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from hub.demo.builders import build_demo_files
from hub.services.catalog import seed_catalog


class Command(BaseCommand):
    help = "Register the demo base models and adapters (skips what is already registered)."

    def add_arguments(self, parser):
        parser.add_argument("--cache", default=str(settings.VAR_DIR / "demo-cache"), help="where built files are kept")

    def handle(self, cache, **options):
        catalog = build_demo_files(Path(cache))
        seed_catalog(catalog, log=self.stdout.write)
