"""Compose adapters into one adapter, or merge them into their base model.

Requests are validated here (visibility, one base model, method, parameters);
the tensor work runs in a worker (queue `gpu`) through kernels.compose and
kernels.streaming_merge. A merge is stored once per distinct request: the key
is a sha256 over the base weights, the exact adapter revisions, the weights,
the method and the dtype, so an identical request reuses the stored result.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from hub.blobs import blobs_on_disk
from hub.errors import Forbidden, InvalidInput, NotFound
from hub.models import Adapter, BaseModel, Job, MergedCheckpoint, MergedFile, Revision, Visibility
from hub.selectors import (base_model_commit, get_adapter, get_base_model, get_revision, load_revision_adapter,
                           merge_identity)
from hub.services.adapters import adapter_made_by, check_new_adapter, upload_canonical_adapter
from hub.services.files import IncomingFile, store_blobs
from hub.services.jobs import JobReporter, enqueue_requested_job
from kernels.compose import METHODS, compose_adapters

MAX_ADAPTERS = 16
MERGE_DTYPES = ("float16", "bfloat16", "float32")
# Checks of the parameters a method may take (which ones it takes: METHODS[method].params).
PARAM_CHECKS = {
    "rank": (lambda v: isinstance(v, int) and 1 <= v <= 4096, "an integer from 1 to 4096"),
    "density": (lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "a number in (0, 1]"),
    "majority_sign": (lambda v: v in ("total", "frequency"), "'total' or 'frequency'"),
    "seed": (lambda v: isinstance(v, int) and 0 <= v < 2**63, "a non-negative integer"),
    "iso_scale": (lambda v: isinstance(v, (int, float)) and 0 < v <= 100, "a number in (0, 100]"),
}


@dataclass
class AdapterInput:
    adapter: Adapter
    revision: Revision
    weight: float

    def as_json(self) -> dict:
        return {"adapter_id": self.adapter.id, "adapter": self.adapter.full_name, "revision_id": self.revision.id,
                "revision": self.revision.number, "commit": self.revision.commit, "weight": self.weight}


def resolve_adapter_inputs(user, refs: list[dict]) -> list[AdapterInput]:
    """[{id: "ns/name" or "ns/name@revision", weight}] → visible adapters on one base model."""
    if not refs:
        raise InvalidInput("no_adapters", "Give at least one adapter.", field="adapters")
    if len(refs) > MAX_ADAPTERS:
        raise InvalidInput("too_many_adapters", f"At most {MAX_ADAPTERS} adapters at a time.", field="adapters")
    inputs = []
    for ref in refs:
        full_name, _, revision = str(ref.get("id", "")).partition("@")
        namespace, _, name = full_name.partition("/")
        weight = ref.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise InvalidInput("bad_weight", f"The weight of {full_name!r} must be a finite number.", field="adapters")
        try:
            adapter = get_adapter(user, namespace, name)
            inputs.append(AdapterInput(adapter, get_revision(adapter, revision or None), float(weight)))
        except NotFound as error:  # a bad reference in the body is a 400, not a missing URL
            raise InvalidInput(error.code, error.message, field="adapters") from None
    bases = {item.adapter.base_model_id for item in inputs}
    if len(bases) > 1 or None in bases:
        names = sorted({str(item.adapter.base_model) for item in inputs})
        raise InvalidInput("different_base_models",
                           f"Adapters must share one registered base model; these are for {', '.join(names)}.",
                           field="adapters")
    return inputs


def check_method(method: str, params: dict) -> dict:
    if method not in METHODS:
        raise InvalidInput("unknown_method", f"Unknown method {method!r}; choose one of {sorted(METHODS)}.", field="method")
    allowed = METHODS[method].params
    for key, value in params.items():
        if key not in allowed:
            raise InvalidInput("bad_param", f"{method} takes no parameter {key!r} (it takes: {', '.join(allowed) or 'none'}).",
                               field="params")
        check, expected = PARAM_CHECKS.get(key, (lambda v: True, ""))
        if not check(value):
            raise InvalidInput("bad_param", f"{key} must be {expected}, not {value!r}.", field="params")
    return params


# --- compose ------------------------------------------------------------------------------------

def request_composition(*, user, adapters: list[dict], method: str, params: dict | None = None,
                        namespace: str | None = None, name: str | None = None, description: str = "",
                        visibility: str = Visibility.PUBLIC) -> Job:
    inputs = resolve_adapter_inputs(user, adapters)
    params = check_method(method, params or {})
    namespace = namespace or user.username
    digest = hashlib.sha256(json.dumps([[i.as_json() for i in inputs], method, params], sort_keys=True).encode())
    name = name or f"composed-{method.replace('_', '-')}-{digest.hexdigest()[:8]}"
    check_new_adapter(user, namespace, name, visibility)
    return enqueue_requested_job(kind=Job.Kind.COMPOSE, user=user, params={
        "adapters": [i.as_json() for i in inputs], "method": method, "params": params, "namespace": namespace,
        "name": name, "description": description, "visibility": visibility})


def _job_inputs(job: Job) -> list[AdapterInput]:
    return [AdapterInput(Adapter.objects.get(id=ref["adapter_id"]), Revision.objects.get(id=ref["revision_id"]),
                         ref["weight"]) for ref in job.params["adapters"]]


@contextmanager
def base_weight_reader(base: BaseModel):
    """module path → base weight tensor, read lazily one tensor at a time (DoRA needs W)."""
    from safetensors import safe_open

    files = {f.filename: f.blob_id for f in base.files.all() if f.filename.endswith(".safetensors")}
    with blobs_on_disk(files) as paths:
        where = {}
        for path in paths.values():
            with safe_open(str(path), framework="pt") as handle:
                where.update({key: path for key in handle.keys()})

        def read(module_path: str):
            with safe_open(str(where[module_path + ".weight"]), framework="pt") as handle:
                return handle.get_tensor(module_path + ".weight")

        yield read


def compose_job(job: Job, reporter: JobReporter) -> dict:
    spec = job.params
    existing = adapter_made_by(job)
    if existing is not None:
        return {"namespace": existing.namespace, "name": existing.name}  # a retried job that already finished
    inputs = _job_inputs(job)
    base = inputs[0].adapter.base_model
    reporter.progress(0.05, "reading adapters")
    canonical = [load_revision_adapter(item.revision) for item in inputs]
    with base_weight_reader(base) as base_weights:
        composed, report = compose_adapters(
            canonical, [item.weight for item in inputs], spec["method"], base_weights=base_weights,
            progress=lambda fraction, message: reporter.progress(0.1 + 0.8 * fraction, message), **spec["params"])
    provenance = {"kind": "composition", "job": str(job.id), "method": spec["method"], "params": spec["params"],
                  "exact": bool(report.get("exact", METHODS[spec["method"]].exact)), "parents": [
                      {k: ref[k] for k in ("adapter", "revision", "commit", "weight")} for ref in spec["adapters"]],
                  "report": report}
    revision = upload_canonical_adapter(
        composed, user=job.owner, base=base, namespace=spec["namespace"], name=spec["name"],
        description=spec["description"] or _composed_description(spec), visibility=spec["visibility"],
        tags=["composed", spec["method"].replace("_", "-")], provenance=provenance)
    return {"namespace": revision.adapter.namespace, "name": revision.adapter.name, "revision": revision.number,
            "exact": provenance["exact"], "report": report}


def _composed_description(spec: dict) -> str:
    # Parents are named in the provenance only, where each reader sees those they may see: a
    # description is the same text for everyone and would name a private parent.
    return f"Composed with {spec['method']}; its parents are listed in its provenance."


# --- merge --------------------------------------------------------------------------------------

def merge_key(base: BaseModel, inputs: list[AdapterInput], method: str, params: dict, dtype: str | None) -> str:
    recipe = {"base": base.weight_fingerprint, "method": method, "params": params, "dtype": dtype,
              "adapters": [[i.revision.commit, i.adapter.id, i.weight] for i in inputs]}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def merged_files_result(checkpoint: MergedCheckpoint) -> dict:
    """A merge's download manifest: pinned to the base model's and every adapter's revision."""
    return {**merge_identity(checkpoint), "base_model_revision": base_model_commit(checkpoint.base_model), "files": [
        {"filename": f.filename, "size": f.size, "sha256": f.sha256,
         "url": reverse("merge-file", args=[checkpoint.key, f.filename])}
        for f in checkpoint.files.select_related("blob")]}


def request_merge(*, user, base_model: str, adapters: list[dict], method: str = "linear", params: dict | None = None,
                  dtype: str | None = None) -> Job:
    try:
        base = get_base_model(base_model)
    except NotFound as error:
        raise InvalidInput("unknown_base_model", error.message, field="base_model") from None
    inputs = resolve_adapter_inputs(user, adapters)
    if inputs[0].adapter.base_model_id != base.id:
        raise InvalidInput("different_base_models",
                           f"The adapters are for {inputs[0].adapter.base_model}, not {base.full_name}.", field="adapters")
    params = check_method(method, params or {})
    if dtype is not None and dtype not in MERGE_DTYPES:
        raise InvalidInput("bad_dtype", f"dtype must be one of {MERGE_DTYPES} (or omitted: the base's).", field="dtype")
    key = merge_key(base, inputs, method, params, dtype)
    spec = {"key": key, "base_model_id": base.id, "adapters": [i.as_json() for i in inputs], "method": method,
            "params": params, "dtype": dtype}
    # Marking it used first: retention re-checks the mark under the row's lock, so a checkpoint found
    # here is never removed before its requester can download it.
    stored = MergedCheckpoint.objects.filter(key=key).first() if mark_merge_used(key) else None
    if stored is not None:  # identical request: answer with the stored checkpoint, no work queued
        return Job.objects.create(kind=Job.Kind.MERGE, owner=user, params=spec, state=Job.State.SUCCEEDED,
                                  progress=1.0, message="reused a stored merge", result=merged_files_result(stored))
    return enqueue_requested_job(kind=Job.Kind.MERGE, user=user, params=spec)


def merge_job(job: Job, reporter: JobReporter) -> dict:
    from kernels.streaming_merge import merge_checkpoint

    spec = job.params
    if mark_merge_used(spec["key"]):  # made meanwhile (or by this job's earlier, interrupted run)
        return merged_files_result(MergedCheckpoint.objects.get(key=spec["key"]))
    base = BaseModel.objects.get(id=spec["base_model_id"])
    inputs = _job_inputs(job)
    reporter.progress(0.02, "reading adapters")
    canonical = [load_revision_adapter(item.revision) for item in inputs]
    weights = [item.weight for item in inputs]
    if spec["method"] in ("linear", "cat", "task_arithmetic"):
        # Exact: every ΔW goes into the base with its weight, no composition step needed.
        to_merge = list(zip(canonical, weights))
    else:
        with base_weight_reader(base) as base_weights:
            composed, _ = compose_adapters(canonical, weights, spec["method"], base_weights=base_weights, **spec["params"])
        to_merge = [(composed, 1.0)]
    base_files = {f.filename: f.blob_id for f in base.files.all()}
    # Scratch beside the uploads: local blob storage renames the files into place rather than
    # copying them, and a multi-GB checkpoint never lands in /tmp (often a RAM-backed tmpfs).
    with blobs_on_disk(base_files) as base_paths, \
            tempfile.TemporaryDirectory(dir=settings.FILE_UPLOAD_TEMP_DIR, prefix="merge-") as scratch:
        digests: dict[str, str] = {}  # hashed while written: no second read of the checkpoint
        written = merge_checkpoint(base_paths, to_merge, Path(scratch), dtype=spec["dtype"], sha256=digests,
                                   progress=lambda fraction, message: reporter.progress(0.05 + 0.85 * fraction, message))
        reporter.progress(0.92, "storing the checkpoint")
        incoming = [IncomingFile.from_path(path, disposable=True, sha256=digests[path.name]) for path in written]
        blobs = store_blobs(incoming)
    with transaction.atomic():
        checkpoint, created = MergedCheckpoint.objects.get_or_create(
            key=spec["key"], defaults={"base_model": base, "created_by": job.owner, "recipe": {
                "adapters": spec["adapters"], "method": spec["method"], "params": spec["params"], "dtype": spec["dtype"]},
                "size": sum(f.size for f in incoming)})
        if created:
            MergedFile.objects.bulk_create(MergedFile(checkpoint=checkpoint, filename=f.name, blob=blobs[f.name])
                                           for f in incoming)
        else:  # made meanwhile by an identical job: this one's requester uses it now
            mark_merge_used(checkpoint.key)
    return merged_files_result(checkpoint)


# Downloads mark their merge used at most this often: a client reading a checkpoint sends a request
# per file (and per range), and one UPDATE per 10 minutes is precise enough for retention in days.
MERGE_USE_RESOLUTION = timedelta(minutes=10)


def mark_merge_used(key: str, *, unless_used_within: timedelta | None = None) -> bool:
    """Record a use of stored merge `key` now (an identical request, a download), unless one was
    recorded within `unless_used_within`. True when this call recorded it: False also when there
    is no such merge (any more)."""
    now = timezone.now()
    merges = MergedCheckpoint.objects.filter(key=key)
    if unless_used_within is not None:
        merges = merges.filter(last_used_at__lt=now - unless_used_within)
    return bool(merges.update(last_used_at=now))


def mark_merge_downloaded(key: str) -> None:
    """A download of one of the merge's files (native or through the Hub-compatible API)."""
    mark_merge_used(key, unless_used_within=MERGE_USE_RESOLUTION)


def delete_merge(*, user, checkpoint: MergedCheckpoint) -> None:
    """Rows go now, the bytes with the orphan sweep. A merge is shared by everyone who asks for the
    same recipe, so only whoever made it, or staff, may remove it; anyone may make it again."""
    if checkpoint.created_by_id != user.id and not user.is_staff:
        raise Forbidden("not_creator", "Only whoever made this merge, or staff, can delete it.")
    checkpoint.delete()
