"""Adapter writes: upload (a new adapter or a new revision), metadata edits, deletion."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.conf import settings

from hub import formats
from hub.errors import Conflict, Forbidden, InvalidInput, NotFound
from hub.models import SLUG, Adapter, BaseModel, Job, Revision, RevisionFile, Visibility
from hub.selectors import MERGES_NAMESPACE, get_base_model
from hub.services.files import IncomingFile, as_invalid_input, check_incoming_files, manifest_commit, store_blobs
from hub.services.embeddings import enqueue_embedding
from hub.services.jobs import enqueue_job

logger = logging.getLogger(__name__)

EDITABLE_FIELDS = ("description", "tags", "license", "visibility")
MAX_TAGS = 32


def check_slug(value: str, field: str) -> None:
    try:
        SLUG(value)
    except ValidationError as error:
        raise InvalidInput("bad_" + field, f"{field} {value!r}: {error.messages[0]}", field=field) from None


def check_namespace_owner(user, namespace: str) -> None:
    """A user writes to their own namespace (staff may write anywhere but the reserved ones)."""
    if namespace == MERGES_NAMESPACE:
        raise Forbidden("namespace_reserved", f"The namespace {namespace!r} holds merged checkpoints.", field="namespace")
    if user.is_staff or namespace == user.username:
        return
    raise Forbidden("namespace_forbidden", f"You can only upload to your own namespace ({user.username!r}).", field="namespace")


def clean_metadata(*, description=None, tags=None, license=None, visibility=None) -> dict:
    """Validated editable metadata (only the keys that were given)."""
    cleaned: dict = {}
    if description is not None:
        if len(description) > 100_000:
            raise InvalidInput("description_too_long", "The description is longer than 100 000 characters.", field="description")
        cleaned["description"] = description
    if tags is not None:
        tag_list = sorted({tag.strip().lower() for tag in tags if tag.strip()})
        if len(tag_list) > MAX_TAGS or any(len(tag) > 64 for tag in tag_list):
            raise InvalidInput("bad_tags", f"At most {MAX_TAGS} tags of at most 64 characters each.", field="tags")
        cleaned["tags"] = tag_list
    if license is not None:
        if len(license) > 64:
            raise InvalidInput("bad_license", "A license identifier is at most 64 characters (e.g. apache-2.0).", field="license")
        cleaned["license"] = license.strip()
    if visibility is not None:
        if visibility not in Visibility.values:
            raise InvalidInput("bad_visibility", f"visibility must be one of {Visibility.values}.", field="visibility")
        cleaned["visibility"] = visibility
    return cleaned


def _named_base_model(base_model: str) -> BaseModel:
    try:
        return get_base_model(base_model)
    except NotFound as error:  # a field error of this request, not a missing URL
        raise InvalidInput("unknown_base_model", error.message, field="base_model") from None


def _hinted_base_model(parsed: formats.CanonicalAdapter) -> BaseModel | None:
    """For PEFT files sent without base_model: the config's
    base_model_name_or_path, when it names a registered base model."""
    hinted = str(parsed.config.get("base_model_name_or_path") or "")
    namespace, _, name = hinted.partition("/")
    return BaseModel.objects.filter(namespace=namespace, name=name).first() if name else None


def _parse(paths, base: BaseModel | None) -> formats.CanonicalAdapter:
    try:
        return formats.parse_adapter(paths, base_shapes=base.module_shapes if base else None)
    except formats.FormatError as error:
        raise as_invalid_input(error) from None


def upload_adapter(
    *,
    user,
    namespace: str,
    name: str,
    files: list[IncomingFile],
    base_model: str | None = None,
    description: str | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    visibility: str | None = None,
    provenance: dict | None = None,
) -> Revision:
    """Validate the files completely, store their blobs, then commit the rows.

    The first upload of namespace/name creates the adapter; later uploads add
    revisions. Any failure before the commit leaves no row behind; blobs of a
    failed commit are unreferenced and removed by the orphan sweep.
    """
    check_slug(namespace, "namespace")
    check_slug(name, "name")
    check_namespace_owner(user, namespace)
    metadata = clean_metadata(description=description, tags=tags, license=license, visibility=visibility)
    paths = check_incoming_files(files, max_total_bytes=settings.QUIVER_MAX_ADAPTER_BYTES)

    named_base = _named_base_model(base_model) if base_model else None
    parsed = _parse(paths, named_base)
    base = named_base or _hinted_base_model(parsed)
    if base is not None and named_base is None:
        _parse(paths, base)  # the base came from the config: check shapes against it too
    if base is None and parsed.format == "peft":
        raise InvalidInput(
            "base_model_required",
            "A PEFT adapter needs base_model (namespace/name of a registered base model).",
            field="base_model",
        )
    summary = formats.summarize_adapter(parsed)
    _check_same_base(namespace, name, base)  # before any blob is stored; checked again under the row lock

    blobs = store_blobs(files)
    try:
        with transaction.atomic():
            adapter = Adapter.objects.select_for_update().filter(namespace=namespace, name=name).first()
            if adapter is None:
                adapter = Adapter(owner=user, namespace=namespace, name=name, provenance=provenance or {}, **metadata)
            else:
                _check_same_base(namespace, name, base, adapter)
                for key, value in metadata.items():
                    setattr(adapter, key, value)
            _apply_summary(adapter, summary, base)
            adapter.save()
            number = (adapter.revisions.order_by("-number").values_list("number", flat=True).first() or 0) + 1
            revision = Revision.objects.create(
                adapter=adapter, number=number, commit=manifest_commit(files), metadata=summary, created_by=user
            )
            RevisionFile.objects.bulk_create(
                RevisionFile(revision=revision, filename=incoming.name, blob=blobs[incoming.name]) for incoming in files
            )
            adapter.latest_revision = revision
            adapter.save(update_fields=["latest_revision"])
            enqueue_job(kind=Job.Kind.ANALYZE, owner=user, params={"revision_id": revision.id})
            enqueue_embedding(adapter, owner=user)
    except IntegrityError:
        raise Conflict("concurrent_upload", f"{namespace}/{name} was being created by another upload; try again.") from None
    return revision


def check_new_adapter(user, namespace: str, name: str, visibility: str) -> None:
    """Checks for an adapter a job will create: a valid, free name the user may write, a known visibility."""
    check_slug(namespace, "namespace")
    check_slug(name, "name")
    check_namespace_owner(user, namespace)
    if visibility not in Visibility.values:
        raise InvalidInput("bad_visibility", f"visibility must be one of {Visibility.values}.", field="visibility")
    if Adapter.objects.filter(namespace=namespace, name=name).exists():
        raise Conflict("adapter_exists", f"{namespace}/{name} already exists; pick another name.", field="name")


def adapter_made_by(job) -> Adapter | None:
    """The adapter a (retried) job already created, if any."""
    return Adapter.objects.filter(namespace=job.params["namespace"], name=job.params["name"],
                                  provenance__job=str(job.id)).first()


def upload_canonical_adapter(adapter: formats.CanonicalAdapter, *, user, base: BaseModel, **metadata) -> Revision:
    """Store an adapter made by the hub (composed, generated) as PEFT files, through the same
    validation as any upload."""
    with tempfile.TemporaryDirectory() as scratch:
        paths = formats.write_peft_adapter(adapter, Path(scratch), base_model_name_or_path=base.full_name)
        return upload_adapter(user=user, base_model=base.full_name,
                              files=[IncomingFile.from_path(path, disposable=True) for path in paths], **metadata)


def _check_same_base(namespace: str, name: str, base: BaseModel | None, adapter: Adapter | None = None) -> None:
    adapter = adapter or Adapter.objects.filter(namespace=namespace, name=name).first()
    if adapter is not None and adapter.base_model_id != (base.id if base else None):
        raise Conflict(
            "base_model_changed",
            f"{namespace}/{name} is an adapter for {adapter.base_model}; a new revision must use the same base model.",
            field="base_model",
        )


def _apply_summary(adapter: Adapter, summary: dict, base: BaseModel | None) -> None:
    adapter.base_model = base
    for field in ("format", "peft_type", "rank", "alpha", "use_rslora", "use_dora", "target_modules",
                  "module_shapes", "dtype", "parameter_count"):
        setattr(adapter, field, summary[field])


def update_adapter(*, user, adapter: Adapter, **changes) -> Adapter:
    if adapter.owner_id != user.id and not user.is_staff:
        raise Forbidden("not_owner", "Only the owner can change this adapter.")
    metadata = clean_metadata(**{key: changes[key] for key in EDITABLE_FIELDS if key in changes})
    text_changed = any(getattr(adapter, key) != metadata[key] for key in ("description", "tags") if key in metadata)
    with transaction.atomic():
        for key, value in metadata.items():
            setattr(adapter, key, value)
        adapter.save(update_fields=[*metadata.keys(), "updated_at"])
        if text_changed:
            enqueue_embedding(adapter, parts=("description",), owner=user)
    return adapter


def delete_adapter(*, user, adapter: Adapter) -> None:
    """Rows go now; the blobs they referenced are removed by the orphan sweep."""
    if adapter.owner_id != user.id and not user.is_staff:
        raise Forbidden("not_owner", "Only the owner can delete this adapter.")
    adapter.delete()
