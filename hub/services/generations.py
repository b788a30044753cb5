"""Generated adapters: train SG-LoRA / ICM-LoRA generators on a base model's
public adapters, and turn a task description into a new adapter.

The math lives in generation/ (no Django); this module picks the population,
stores artifacts, validates requests and records provenance. Only public
adapters with a description are experts: a generated adapter, and the experts
its provenance lists, must never reveal a private adapter. Adapters the hub
generated are not experts either (a generator must not learn from itself).
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path

import torch
from django.core.files.base import ContentFile
from django.db import transaction
from django.db.models import Max

from generation import conjunctions, functional, generators, lora_layout
from generation.functional import FunctionProbe
from generation.text_encoder import embed_texts
from generation.zoo import model as zoo_model
from hub.blobs import blob_storage, blobs_on_disk
from hub.errors import Conflict, Forbidden, InvalidInput
from hub.formats.base_model import PROBE_TEXTS_NAME, read_probe_texts
from hub.models import Adapter, BaseModel, GeneratorArtifact, Job, Revision, Visibility
from hub.selectors import get_base_model, latest_generator, load_revision_adapter
from hub.services.adapters import adapter_made_by, check_new_adapter, upload_canonical_adapter
from hub.services.files import IncomingFile, store_blobs
from hub.services.jobs import JobReporter, enqueue_requested_job, enqueue_requested_jobs

MIN_EXPERTS = 4
# Where generators learn (generation/generators.py). Parameter space is the default: on the zoo,
# function space generalises better to unseen categories/languages but worse to unseen pairs and
# costs minutes instead of seconds (README, "Generation").
SPACES = ("parameter", "function")
CONJUNCTION_STEPS = conjunctions.DISTILL_STEPS  # by name here: request_generator_training's flag shadows the module
MAX_DESCRIPTION_CHARS = 1000  # a task description, not a document: MiniLM reads 256 tokens at most
MAX_K = 32
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


def expert_texts(description: str) -> list[str]:
    """The texts an expert is known by: its whole description and, when it has
    several sentences (paraphrases), each of them (at most 4)."""
    sentences = [s.strip() for s in _SENTENCE_END.split(description.strip()) if s.strip()]
    return [description.strip(), *sentences[:4]] if len(sentences) > 1 else [description.strip()]


def expert_candidates(base: BaseModel) -> list[Adapter]:
    return list(
        Adapter.objects.filter(base_model=base, visibility=Visibility.PUBLIC, latest_revision__isnull=False)
        .exclude(description="").exclude(provenance__contains={"kind": "generation"})
        .select_related("latest_revision").order_by("id")
    )


# ----------------------------------------------------------------------
# Training


def request_generator_training(*, user, base_model: str, methods: list[str] | None = None,
                               steps: int | None = None, space: str = "parameter",
                               conjunctions: bool = True, conjunction_steps: int | None = None) -> list[Job]:
    """Training costs a worker minutes, so only the base model's owner or staff may ask for it.
    space: "parameter" (any base) or "function" (a base the hub can run, with probe texts).
    conjunctions: derive experts for the conjunctions no expert covers, where the base can run (on by
    default: with them and the temperature chosen by function, generated adapters recover 0.91 of the
    oracle's gain on the zoo's unseen pairs, against 0.58 without; README "Generation")."""
    base = get_base_model(base_model)
    if user is None or not (user.is_staff or base.owner_id == user.id):
        raise Forbidden("not_base_owner", f"Only the owner of {base.full_name} or staff may train its generators.")
    methods = methods or list(generators.METHODS)
    unknown = [m for m in methods if m not in generators.METHODS]
    if unknown:
        raise InvalidInput("unknown_method", f"Unknown method {unknown[0]!r}; use one of {list(generators.METHODS)}.",
                           field="method")
    if space not in SPACES:
        raise InvalidInput("unknown_space", f"space must be one of {list(SPACES)}.", field="space")
    if space == "function" and not runs_in_function_space(base):
        raise Conflict("function_space_unavailable",
                       f"{base.full_name} cannot train generators in function space: the hub runs only the zoo's "
                       f"classifier architecture, with a {PROBE_TEXTS_NAME} among its files.", field="space")
    if len(expert_candidates(base)) < MIN_EXPERTS:
        raise Conflict("too_few_experts", f"{base.full_name} needs at least {MIN_EXPERTS} public adapters with "
                                          f"descriptions to train a generator.", field="base_model")
    settings = {"steps": steps} if steps else {}
    return enqueue_requested_jobs(user=user, jobs=[
        (Job.Kind.TRAIN_GENERATOR, {"base_model_id": base.id, "method": m, "settings": settings, "space": space,
                                    "conjunctions": bool(conjunctions),
                                    "conjunction_steps": conjunction_steps or CONJUNCTION_STEPS})
        for m in methods])


def _population(base: BaseModel, reporter: JobReporter):
    """Experts in the dominant layout (params n × D, text embeddings), their references, the skipped,
    and each expert's texts (expert_texts)."""
    candidates = expert_candidates(base)
    parsed = []
    for index, adapter in enumerate(candidates):
        parsed.append(load_revision_adapter(adapter.latest_revision))
        reporter.progress(0.1 * (index + 1) / len(candidates), f"read {index + 1}/{len(candidates)} adapters")
    if not parsed:
        raise ValueError(f"{base.full_name} has no public adapters with descriptions")
    layout = lora_layout.dominant_layout(parsed)
    experts, skipped, params, texts, raw_texts = [], [], [], [], []
    for adapter, canonical in zip(candidates, parsed):
        reason = layout.mismatch(canonical)
        if reason:
            skipped.append({"adapter": adapter.full_name, "reason": reason})
            continue
        experts.append({"adapter_id": adapter.id, "adapter": adapter.full_name,
                        "revision_id": adapter.latest_revision_id, "revision": adapter.latest_revision.number})
        params.append(lora_layout.flatten(canonical, layout))
        raw_texts.append(expert_texts(adapter.description))
        texts.append(embed_texts(raw_texts[-1]))
    if len(experts) < MIN_EXPERTS:
        raise ValueError(f"only {len(experts)} adapters share one layout; a generator needs {MIN_EXPERTS}")
    return layout, experts, skipped, torch.stack(params), texts, raw_texts


def runs_in_function_space(base: BaseModel) -> bool:
    """Whether the hub can run the base as a classifier (today: the zoo's architecture) and has
    its probe texts, which function-space training needs."""
    return zoo_model.is_zoo_classifier(base.config) and base.files.filter(filename=PROBE_TEXTS_NAME).exists()


@contextmanager
def function_probe(base: BaseModel) -> Iterator[FunctionProbe]:
    """The base model as a runnable classifier with its probe texts (runs_in_function_space)."""
    files = {f.filename: f.blob_id for f in base.files.all()}
    with blobs_on_disk(files) as paths, tempfile.TemporaryDirectory() as folder:
        for name in ("config.json", "model.safetensors"):
            (Path(folder) / name).symlink_to(paths[name])
        yield zoo_model.function_probe(Path(folder), read_probe_texts(paths[PROBE_TEXTS_NAME]))


# Function-space training needs every expert's probabilities on the probe texts (its teacher):
# minutes of forward passes on a full zoo, and the same every time for the same files. They are
# kept in blob storage, keyed by what determines them (the base's files, the expert revision's
# commit, this version), so retraining (the other method, more steps, one new expert) runs only
# the experts it has not run before. Each expert's row is computed on its own
# (teacher_probabilities), so a cached row is exactly what a fresh run would give.
TEACHERS_VERSION = 1  # bump when the classifier's forward or teacher_probabilities changes
TEACHERS_PREFIX = "derived/teachers/"
CONJUNCTIONS_PREFIX = "derived/conjunctions/"


def _teacher_path(base_files: dict[str, str], revision: Revision) -> str:
    key = json.dumps([TEACHERS_VERSION, sorted(base_files.items()), revision.commit])
    return f"{TEACHERS_PREFIX}{hashlib.sha256(key.encode()).hexdigest()}.safetensors"


def _cached_teacher(storage, path: str, probe_texts: int) -> torch.Tensor | None:
    from safetensors.torch import load

    if not storage.exists(path):
        return None
    with storage.open(path, "rb") as handle:
        row = load(handle.read()).get("teacher")
    return row if row is not None and row.ndim == 2 and row.shape[0] == probe_texts else None


def expert_teachers(base: BaseModel, experts: list[dict], params: torch.Tensor, layout, probe: FunctionProbe,
                    reporter: JobReporter) -> tuple[torch.Tensor, dict]:
    """n × probe texts × classes teacher probabilities, from the cache where it has them; and
    how many were computed and how many reused."""
    from safetensors.torch import save

    storage = blob_storage()
    base_files = {f.filename: f.blob_id for f in base.files.all()}
    revisions = Revision.objects.in_bulk([expert["revision_id"] for expert in experts])
    paths = [_teacher_path(base_files, revisions[expert["revision_id"]]) for expert in experts]
    rows = {j: row for j, path in enumerate(paths) if (row := _cached_teacher(storage, path, len(probe.texts))) is not None}
    missing = [j for j in range(len(experts)) if j not in rows]
    if missing:
        computed = functional.teacher_probabilities(
            functional.BatchedLoRA(probe, layout), params[missing],
            progress=lambda done, total: reporter.progress(0.1 + 0.2 * done / total,
                                                           f"ran {done}/{total} experts on the probe texts"))
        for j, row in zip(missing, computed):
            rows[j] = row
            storage.save(paths[j], ContentFile(save({"teacher": row.contiguous()})))
    teacher = torch.stack([rows[j] for j in range(len(experts))])
    return teacher, {"computed": len(missing), "reused": len(experts) - len(missing)}


def derived_conjunctions(base: BaseModel, experts: list[dict], params: torch.Tensor, layout, probe: FunctionProbe,
                         teacher: torch.Tensor, reporter: JobReporter, steps: int = conjunctions.DISTILL_STEPS,
                         ) -> tuple[list[conjunctions.Conjunction], torch.Tensor]:
    """The conjunctions of experts no expert covers, distilled into adapters of the layout
    (generation/conjunctions.py): from blob storage when this population was distilled before
    (the other method, more steps), else computed and kept. Returns them and their params (m × D)."""
    from safetensors.torch import load, save

    found = conjunctions.find_conjunctions(teacher)
    if not found:
        return [], params.new_zeros((0, params.shape[1]))
    revisions = Revision.objects.in_bulk([expert["revision_id"] for expert in experts])
    key = json.dumps([conjunctions.CONJUNCTIONS_VERSION, steps,
                      sorted((f.filename, f.blob_id) for f in base.files.all()),
                      [[revisions[experts[i]["revision_id"]].commit for i in c.parents] for c in found]])
    path = f"{CONJUNCTIONS_PREFIX}{hashlib.sha256(key.encode()).hexdigest()}.safetensors"
    storage = blob_storage()
    if storage.exists(path):
        with storage.open(path, "rb") as handle:
            cached = load(handle.read()).get("params")
        if cached is not None and cached.shape == (len(found), params.shape[1]):
            return found, cached.to(params.dtype)
    derived = conjunctions.distill_conjunctions(
        functional.BatchedLoRA(probe, layout), params, teacher, found, steps=steps,
        progress=lambda step, steps, loss: reporter.progress(
            0.3 + 0.2 * step / steps, f"distilling {len(found)} conjunctions of experts: step {step}/{steps}"))
    storage.save(path, ContentFile(save({"params": derived.contiguous()})))
    return found, derived


def train_generator_job(job: Job, reporter: JobReporter) -> dict:
    existing = GeneratorArtifact.objects.filter(job=job).first()
    if existing is not None:  # a redelivered job that already stored its artifact
        return _training_result(existing)
    base = BaseModel.objects.get(id=job.params["base_model_id"])
    method = job.params["method"]
    layout, experts, skipped, params, texts, raw_texts = _population(base, reporter)
    settings = generators.GeneratorSettings(**job.params.get("settings", {}))
    in_function_space = job.params.get("space") == "function"
    # Conjunctions need the base run on its probe texts: asked for, and where the hub can.
    with_conjunctions = job.params.get("conjunctions", False) and runs_in_function_space(base)
    found = []
    with function_probe(base) if in_function_space or with_conjunctions else nullcontext() as probe:
        teacher, teachers = expert_teachers(base, experts, params, layout, probe, reporter) if probe else (None, None)
        if with_conjunctions:
            found, derived = derived_conjunctions(base, experts, params, layout, probe, teacher, reporter,
                                                  steps=job.params.get("conjunction_steps", conjunctions.DISTILL_STEPS))
            params = torch.cat([params, derived])
            texts = texts + [embed_texts(conjunctions.conjunction_texts(raw_texts, c)) for c in found]
            teacher = torch.cat([teacher, conjunctions.product_teacher(teacher, found)]) if found else teacher
        start = 0.5 if with_conjunctions else 0.3 if probe else 0.1  # after the adapters, teachers, conjunctions
        generator, curve = generators.train_generator(
            method, params, texts, settings, layout=layout, probe=probe, teacher=teacher,
            space="function" if in_function_space else "parameter", parents=conjunctions.bank_parents(len(experts), found),
            progress=lambda fraction, point: reporter.progress(start + (0.95 - start) * fraction,
                                                               f"step {point['step']}: "
                                                               f"validation error {point['validation_error']:.3g}"))
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"{method}.safetensors"
        with open(path, "wb") as handle:
            generator.save(handle, extra={"base_model": base.full_name, "layout": layout.as_json(),
                                          "alpha": layout.slots[0].scale * layout.slots[0].rank})
        incoming = IncomingFile.from_path(path, disposable=True)
        blob = store_blobs([incoming])[incoming.name]
    with transaction.atomic():
        BaseModel.objects.select_for_update().get(id=base.id)  # serialises version numbers per base model
        version = (base.generators.filter(method=method).aggregate(v=Max("version"))["v"] or 0) + 1
        artifact = GeneratorArtifact.objects.create(
            base_model=base, method=method, version=version, weights=blob, layout=layout.as_json(),
            experts=experts, skipped=skipped, curve=curve, job=job,
            settings={**generator.settings.__dict__, "space": "function" if generator.functional else "parameter",
                      "conjunctions": [{"parents": list(c.parents), "positives": c.positives, "overlap": c.overlap}
                                       for c in found],
                      "temperature_selection": generator.temperature_selection})
    return {**_training_result(artifact), **({"teachers": teachers} if teachers else {})}


def _training_result(artifact: GeneratorArtifact) -> dict:
    return {"generator": artifact.label, "base_model": artifact.base_model.full_name, "experts": len(artifact.experts),
            "conjunctions": len(artifact.settings.get("conjunctions", [])),
            "skipped": artifact.skipped, "final": artifact.curve[-1] if artifact.curve else None,
            "bytes": artifact.weights.size}


# ----------------------------------------------------------------------
# Generation


def _slugify(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "task"


def request_generation(*, user, description, base_model, method, k=None, visibility=Visibility.PUBLIC,
                       namespace: str | None = None, name: str | None = None) -> Job:
    if not isinstance(description, str) or not description.strip():
        raise InvalidInput("empty_description", "Describe the task the adapter should do.", field="description")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidInput("description_too_long", f"A task description has at most {MAX_DESCRIPTION_CHARS} "
                                                   f"characters; this one has {len(description)}.", field="description")
    if method not in generators.METHODS:
        raise InvalidInput("unknown_method", f"method must be one of {list(generators.METHODS)}.", field="method")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K):
        raise InvalidInput("bad_k", f"k must be an integer from 1 to {MAX_K}.", field="k")
    base = get_base_model(base_model)
    artifact = latest_generator(base, method)
    if artifact is None:
        raise Conflict("no_generator", f"{base.full_name} has no trained {method} generator yet; its owner can train "
                                       f"one with POST /api/v1/generators/.", field="base_model")
    namespace = namespace or user.username
    name = name or f"generated-{_slugify(description)}-{uuid.uuid4().hex[:6]}"
    check_new_adapter(user, namespace, name, visibility)
    return enqueue_requested_job(kind=Job.Kind.GENERATE, user=user, params={
        "description": description.strip(), "base_model_id": base.id, "method": method, "generator_id": artifact.id,
        "k": k, "namespace": namespace, "name": name, "visibility": visibility})


def used_expert(artifact: GeneratorArtifact, index: int) -> dict:
    """A generator's expert by its index in the bank: a real expert, or a derived conjunction
    (indices past the experts), named by its first parent with the second beside it."""
    def reference(i):
        return {k: artifact.experts[i][k] for k in ("adapter", "revision")}
    if index < len(artifact.experts):
        return reference(index)
    first, second = artifact.settings["conjunctions"][index - len(artifact.experts)]["parents"]
    return {**reference(first), "conjunction_with": reference(second)}


@lru_cache(maxsize=8)
def _load_generator(sha256: str):
    with blobs_on_disk({"generator.safetensors": sha256}) as paths:
        return generators.load_generator(paths["generator.safetensors"].read_bytes())


def generate_job(job: Job, reporter: JobReporter) -> dict:
    spec = job.params
    existing = adapter_made_by(job)
    if existing is not None:
        return {"namespace": existing.namespace, "name": existing.name}
    artifact = GeneratorArtifact.objects.select_related("base_model").get(id=spec["generator_id"])
    generator, extra = _load_generator(artifact.weights_id)
    reporter.progress(0.2, "generating")
    query = embed_texts([spec["description"]])[0]
    vector, used = generator.generate(query, k=spec.get("k"))
    layout = lora_layout.Layout.from_json(artifact.layout)
    adapter = lora_layout.unflatten(vector, layout, alpha=extra.get("alpha"))
    provenance = {
        "kind": "generation", "job": str(job.id), "method": artifact.method, "generator": artifact.label,
        "generator_id": artifact.id, "description": spec["description"],
        "experts": [{**used_expert(artifact, i), "weight": round(w, 6)} for i, w in used],
    }
    reporter.progress(0.6, "storing the adapter")
    revision = upload_canonical_adapter(
        adapter, user=job.owner, base=artifact.base_model, namespace=spec["namespace"], name=spec["name"],
        description=spec["description"], visibility=spec["visibility"], tags=["generated", artifact.method],
        provenance=provenance)
    return {"namespace": revision.adapter.namespace, "name": revision.adapter.name, "revision": revision.number,
            "generator": artifact.label, "experts": provenance["experts"]}
