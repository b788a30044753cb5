"""Register a catalog of locally built base models and adapters (the demo registry,
the LoRA zoo) through the same services as an upload; what exists is skipped."""
from __future__ import annotations

from pathlib import Path

from django.contrib.auth import get_user_model

from hub.models import Adapter, BaseModel
from hub.services.adapters import upload_adapter
from hub.services.base_models import register_base_model
from hub.services.files import IncomingFile


def seed_catalog(catalog: dict, log=print) -> None:
    """catalog: {"base_models": [{namespace, name, description, files}],
    "adapters": [{namespace, name, base_model, description, tags, license, visibility, files}]}."""
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
