"""Base-model registration: config.json plus one safetensors file or shards with their index."""
from __future__ import annotations

import hashlib

from django.conf import settings
from django.db import IntegrityError, transaction

from hub import formats
from hub.errors import Conflict, InvalidInput
from hub.models import BaseModel, BaseModelFile
from hub.services.adapters import check_namespace_owner, check_slug
from hub.services.files import IncomingFile, as_invalid_input, check_incoming_files, store_blobs


def weight_fingerprint(files: list[IncomingFile]) -> str:
    """sha256 over the weight files' sha256s in name (= shard) order."""
    weights = sorted((f.name, f.sha256) for f in files if f.name.endswith(".safetensors"))
    return hashlib.sha256("".join(sha for _, sha in weights).encode()).hexdigest()


def register_base_model(*, user, namespace: str, name: str, files: list[IncomingFile], description: str = "") -> BaseModel:
    check_slug(namespace, "namespace")
    check_slug(name, "name")
    check_namespace_owner(user, namespace)
    paths = check_incoming_files(files, max_total_bytes=settings.QUIVER_MAX_UPLOAD_BYTES)
    try:
        info = formats.parse_base_model(paths)
    except formats.FormatError as error:
        raise as_invalid_input(error) from None
    if BaseModel.objects.filter(namespace=namespace, name=name).exists():
        raise Conflict("base_model_exists", f"Base model {namespace}/{name} is already registered.", field="name")
    if len(description) > 100_000:
        raise InvalidInput("description_too_long", "The description is longer than 100 000 characters.", field="description")

    blobs = store_blobs(files)
    try:
        with transaction.atomic():
            base = BaseModel.objects.create(
                owner=user,
                namespace=namespace,
                name=name,
                description=description,
                architecture=info.architecture,
                model_type=info.model_type,
                config=info.config,
                module_shapes=info.shapes,
                dtype=info.dtype,
                parameter_count=info.parameter_count,
                weight_fingerprint=weight_fingerprint(files),
            )
            BaseModelFile.objects.bulk_create(
                BaseModelFile(base_model=base, filename=incoming.name, blob=blobs[incoming.name]) for incoming in files
            )
    except IntegrityError:
        raise Conflict("base_model_exists", f"Base model {namespace}/{name} is already registered.", field="name") from None
    return base
