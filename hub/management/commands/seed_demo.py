"""Build the demo registry: real models and adapters made with PEFT from fixed-seed
configs (hub.demo), registered through the same services as an upload."""
from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from hub.demo.builders import build_demo_files
from hub.models import Adapter, BaseModel
from hub.services.adapters import upload_adapter
from hub.services.base_models import register_base_model
from hub.services.files import IncomingFile


class Command(BaseCommand):
    help = "Register the demo base models and adapters (skips what is already registered)."

    def add_arguments(self, parser):
        parser.add_argument("--cache", default=str(settings.VAR_DIR / "demo-cache"), help="where built files are kept")

    def handle(self, cache, **options):
        catalog = build_demo_files(Path(cache))
        seed_catalog(catalog, log=self.stdout.write)


def seed_catalog(catalog: dict, log=print) -> None:
    User = get_user_model()
    for entry in catalog["base_models"]:
        if BaseModel.objects.filter(namespace=entry["namespace"], name=entry["name"]).exists():
            continue
        owner, _ = User.objects.get_or_create(username=entry["namespace"])
        register_base_model(
            user=owner, namespace=entry["namespace"], name=entry["name"], description=entry.get("description", ""),
            files=[IncomingFile.from_path(Path(path)) for path in entry["files"]],
        )
        log(f"  base model {entry['namespace']}/{entry['name']}")
    for entry in catalog["adapters"]:
        if Adapter.objects.filter(namespace=entry["namespace"], name=entry["name"]).exists():
            continue
        owner, _ = User.objects.get_or_create(username=entry["namespace"])
        upload_adapter(
            user=owner, namespace=entry["namespace"], name=entry["name"], base_model=entry.get("base_model"),
            description=entry.get("description", ""), tags=entry.get("tags", []), license=entry.get("license", ""),
            visibility=entry.get("visibility", "public"),
            files=[IncomingFile.from_path(Path(path)) for path in entry["files"]],
        )
        log(f"  adapter {entry['namespace']}/{entry['name']}")
