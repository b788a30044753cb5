"""Search vectors: description embeddings (all-MiniLM-L6-v2) and weight
embeddings (generation.weight_encoder, AutoLoRA-style) of every adapter, and
training of the weight encoder on the hub's own described adapters.

Every vector records the encoder that made it (`*_encoder` columns): search
and "similar" only compare vectors of one encoder, so a new encoder version
can re-embed everything in the background while search keeps working.
"""
from __future__ import annotations

import json
import logging
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import torch
from django.conf import settings
from django.db import transaction
from pgvector.django import CosineDistance

from generation import text_encoder, weight_encoder
from hub import formats
from hub.blobs import blobs_on_disk
from hub.models import Adapter, EncoderArtifact, Job, Visibility
from hub.selectors import load_revision_adapter
from hub.services.files import IncomingFile, store_blobs
from hub.services.jobs import JobReporter, enqueue_job

logger = logging.getLogger(__name__)

TEXT_ENCODER_LABEL = f"{text_encoder.TEXT_ENCODER_ID}@1"
UNTRAINED_WEIGHT_LABEL = f"{weight_encoder.ENCODER_VERSION}@untrained"


# --- encoders -------------------------------------------------------------------------------

def description_text(adapter: Adapter) -> str:
    """What the description embedding reads: the name in words, the description, the tags."""
    parts = [adapter.name.replace("-", " ").replace("_", " ")]
    if adapter.description.strip():
        parts.append(adapter.description.strip())
    if adapter.tags:
        parts.append("Tags: " + ", ".join(adapter.tags))
    return ". ".join(parts)


def embed_query(query: str) -> list[float]:
    return _query_vector(query, settings.QUIVER_QUERY_PRECISION).tolist()


def warm_query_encoder() -> None:
    """Load the query encoder and build its kernels for every query length before serving
    (generation.text_encoder.warm_query_path says why)."""
    text_encoder.warm_query_path(settings.QUIVER_QUERY_PRECISION)


# A user who narrows a search by base model, format, tag or license repeats its words: the
# vector is kept (per web process, 1.5 KB each, ~1.5 MB in all) instead of running the encoder
# again (~8 ms of a search's CPU). The encoder is deterministic, so a kept vector is the same.
QUERY_VECTORS_KEPT = 1024


@lru_cache(maxsize=QUERY_VECTORS_KEPT)
def _query_vector(query: str, precision: str) -> torch.Tensor:
    return text_encoder.embed_query(query, precision)


def active_artifact() -> EncoderArtifact | None:
    return EncoderArtifact.objects.filter(active=True, version=weight_encoder.ENCODER_VERSION).first()


def trained_weight_label() -> str | None:
    """The label of the trained encoder, or None: only a trained encoder is aligned
    with the text space, so only then do weight vectors answer text queries."""
    artifact = active_artifact()
    return artifact.label if artifact else None


_encoders: dict[str, weight_encoder.WeightEncoder] = {}
_encoders_lock = threading.Lock()


def current_weight_encoder() -> tuple[str, weight_encoder.WeightEncoder]:
    """(label, encoder): the active trained encoder, else the deterministic untrained one."""
    artifact = active_artifact()
    label = artifact.label if artifact else UNTRAINED_WEIGHT_LABEL
    with _encoders_lock:
        if label not in _encoders:
            _encoders[label] = _load_artifact(artifact) if artifact else weight_encoder.untrained_encoder()
        return label, _encoders[label]


def _load_artifact(artifact: EncoderArtifact) -> weight_encoder.WeightEncoder:
    with blobs_on_disk({"encoder.safetensors": artifact.weights_id}) as paths, tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "encoder.safetensors").write_bytes(paths["encoder.safetensors"].read_bytes())
        (folder / "encoder.json").write_text(json.dumps(artifact.config))
        return weight_encoder.load_encoder(folder)


# --- jobs -----------------------------------------------------------------------------------

def enqueue_embedding(adapter: Adapter, *, parts: tuple[str, ...] = ("description", "weights"), owner=None) -> Job:
    return enqueue_job(kind=Job.Kind.EMBED, owner=owner or adapter.owner,
                       params={"adapter_id": adapter.id, "parts": list(parts)})


def embed_adapter_job(job: Job, reporter: JobReporter) -> dict:
    adapter = Adapter.objects.filter(id=job.params["adapter_id"]).select_related("latest_revision").first()
    if adapter is None:
        return {"skipped": "the adapter was deleted"}
    done = {}
    if "description" in job.params["parts"]:
        reporter.progress(0.1, "embedding the description")
        vector = text_encoder.embed_texts([description_text(adapter)])[0].tolist()
        Adapter.objects.filter(id=adapter.id).update(description_embedding=vector, description_encoder=TEXT_ENCODER_LABEL)
        done["description"] = TEXT_ENCODER_LABEL
    if "weights" in job.params["parts"]:
        reporter.progress(0.4, "embedding the weights")
        done["weights"] = embed_weights(adapter)
        duplicate = flag_near_duplicate(adapter)
        done["near_duplicate_of"] = duplicate.full_name if duplicate else None
    return done


def embed_weights(adapter: Adapter) -> str:
    """Weight embedding of the latest revision with the current encoder (idempotent)."""
    label, encoder = current_weight_encoder()
    revision = adapter.latest_revision
    if adapter.weight_encoder == label and adapter.weight_embedded_revision == revision.number:
        return label
    with torch.no_grad():
        vector = encoder.encode(load_revision_adapter(revision)).tolist()
    Adapter.objects.filter(id=adapter.id).update(weight_embedding=vector, weight_encoder=label,
                                                 weight_embedded_revision=revision.number)
    adapter.weight_embedding, adapter.weight_encoder = vector, label
    adapter.weight_embedded_revision = revision.number
    return label


def flag_near_duplicate(adapter: Adapter) -> Adapter | None:
    """Mark the adapter when an older adapter on the same base has almost the same
    weight embedding (cosine ≥ QUIVER_NEAR_DUPLICATE_SIMILARITY). Shown, never blocking."""
    nearest = (
        Adapter.objects.filter(base_model_id=adapter.base_model_id, weight_encoder=adapter.weight_encoder,
                               created_at__lt=adapter.created_at)
        .exclude(id=adapter.id)
        .annotate(distance=CosineDistance("weight_embedding", adapter.weight_embedding))
        .order_by("distance")
        .first()
    )
    similarity = 1.0 - nearest.distance if nearest else None
    duplicate = nearest if similarity is not None and similarity >= settings.QUIVER_NEAR_DUPLICATE_SIMILARITY else None
    Adapter.objects.filter(id=adapter.id).update(
        near_duplicate_of=duplicate, near_duplicate_similarity=similarity if duplicate else None)
    return duplicate


def reembed_all_job(job: Job, reporter: JobReporter) -> dict:
    """Bring every adapter's weight vector to the current encoder (resumable: done ones are skipped)."""
    label, _ = current_weight_encoder()
    stale = list(Adapter.objects.exclude(weight_encoder=label).filter(latest_revision__isnull=False)
                 .select_related("latest_revision").order_by("id"))
    for index, adapter in enumerate(stale):
        try:
            embed_weights(adapter)
        except formats.FormatError as error:  # one unreadable adapter must not stop the others
            logger.warning("cannot re-embed %s: %s", adapter.full_name, error)
        reporter.progress((index + 1) / max(len(stale), 1), f"re-embedded {index + 1}/{len(stale)}")
    return {"encoder": label, "reembedded": len(stale)}


def training_set() -> list[Adapter]:
    """Public adapters with a description vector: the encoder learns from what everyone
    may see, so a private description never shapes vectors shown to others."""
    return list(
        Adapter.objects.filter(visibility=Visibility.PUBLIC, description_encoder=TEXT_ENCODER_LABEL,
                               latest_revision__isnull=False)
        .exclude(description="")
        .select_related("latest_revision").order_by("id")
    )


def train_weight_encoder_job(job: Job, reporter: JobReporter) -> dict:
    adapters = training_set()
    if len(adapters) < 2:
        raise ValueError(f"training needs at least 2 public adapters with descriptions, found {len(adapters)}")
    reporter.progress(0.0, f"reading {len(adapters)} adapters")
    canonical = [load_revision_adapter(adapter.latest_revision) for adapter in adapters]
    texts = torch.tensor([list(adapter.description_embedding) for adapter in adapters], dtype=torch.float32)
    params = {"seed": 0, **job.params.get("training", {})}  # epochs, lr: train_encoder's defaults
    encoder, curve = weight_encoder.train_encoder(
        canonical, texts, progress=lambda fraction, message: reporter.progress(0.05 + 0.9 * fraction, message), **params)
    with tempfile.TemporaryDirectory() as scratch:
        weights_path = weight_encoder.save_encoder(encoder, Path(scratch))
        config = json.loads((Path(scratch) / "encoder.json").read_text())
        incoming = IncomingFile.from_path(weights_path)
        with transaction.atomic():
            blob = store_blobs([incoming])[incoming.name]
            EncoderArtifact.objects.filter(active=True).update(active=False)
            artifact = EncoderArtifact.objects.create(
                version=weight_encoder.ENCODER_VERSION, weights=blob, config=config,
                metrics={"adapters": len(adapters), "initial": curve[0], "final": curve[-1]})
            reembed = enqueue_job(kind=Job.Kind.REEMBED_ALL, owner=job.owner, params={"encoder": artifact.label})
    return {"encoder": artifact.label, "adapters": len(adapters), "initial": curve[0], "final": curve[-1],
            "reembed_job": str(reembed.id)}
