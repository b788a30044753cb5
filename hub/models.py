"""Registry data. Models hold data only: writes live in hub.services, reads in hub.selectors."""
from __future__ import annotations

import uuid

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector, SearchVectorField
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import F
from django.db.models.functions import Upper
from django.utils import timezone
from pgvector.django import HnswIndex, VectorField

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2; weight embeddings live in the same space

SLUG = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$",
    "Use letters, digits, '.', '_' and '-' (at most 96 characters, starting with a letter or digit).",
)


class Visibility(models.TextChoices):
    PUBLIC = "public"
    PRIVATE = "private"


class Blob(models.Model):
    """Content-addressed bytes in blob storage; rows reference blobs, never paths."""

    sha256 = models.CharField(primary_key=True, max_length=64)
    size = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    # Last time a writer (upload, merge) claimed these bytes; the orphan sweep's grace period counts from it.
    claimed_at = models.DateTimeField(default=timezone.now, db_index=True)

    @property
    def storage_key(self) -> str:
        return blob_key(self.sha256)

    def __str__(self) -> str:
        return f"{self.sha256[:12]} ({self.size} B)"


def blob_key(sha256: str) -> str:
    return f"sha256/{sha256[:2]}/{sha256[2:4]}/{sha256}"


class StoredFile(models.Model):
    """A named file of an upload: the original file name and its blob."""

    filename = models.CharField(max_length=255)
    blob = models.ForeignKey(Blob, on_delete=models.PROTECT, related_name="+")

    class Meta:
        abstract = True

    @property
    def sha256(self) -> str:
        return self.blob_id

    @property
    def size(self) -> int:
        return self.blob.size


class BaseModel(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="base_models")
    namespace = models.CharField(max_length=96, validators=[SLUG])
    name = models.CharField(max_length=96, validators=[SLUG])
    description = models.TextField(blank=True)
    architecture = models.CharField(max_length=128)
    model_type = models.CharField(max_length=64)
    config = models.JSONField()
    # state-dict name → shape; adapters are validated against it.
    module_shapes = models.JSONField()
    dtype = models.CharField(max_length=16)
    parameter_count = models.BigIntegerField()
    # sha256 over the weight files' sha256s in shard order: same weights, same fingerprint.
    weight_fingerprint = models.CharField(max_length=64, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["namespace", "name"], name="unique_base_model_id")]

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return self.full_name


class BaseModelFile(StoredFile):
    base_model = models.ForeignKey(BaseModel, on_delete=models.CASCADE, related_name="files")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["base_model", "filename"], name="unique_base_model_file")]


class Adapter(models.Model):
    """An adapter; format fields describe its latest revision (kept for filtering)."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="adapters")
    namespace = models.CharField(max_length=96, validators=[SLUG])
    name = models.CharField(max_length=96, validators=[SLUG])
    base_model = models.ForeignKey(BaseModel, null=True, blank=True, on_delete=models.PROTECT, related_name="adapters")
    description = models.TextField(blank=True)
    tags = ArrayField(models.CharField(max_length=64), default=list, blank=True)
    license = models.CharField(max_length=64, blank=True)
    visibility = models.CharField(max_length=8, choices=Visibility.choices, default=Visibility.PUBLIC)
    format = models.CharField(max_length=16)
    peft_type = models.CharField(max_length=16)
    rank = models.PositiveIntegerField()
    alpha = models.FloatField()
    use_rslora = models.BooleanField(default=False)
    use_dora = models.BooleanField(default=False)
    target_modules = ArrayField(models.CharField(max_length=128), default=list)
    module_shapes = models.JSONField(default=dict)
    dtype = models.CharField(max_length=16)
    parameter_count = models.BigIntegerField()
    # Parents, method and parameters for composed / generated adapters.
    provenance = models.JSONField(default=dict, blank=True)
    latest_revision = models.ForeignKey("Revision", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # Search vectors (filled by workers). Each records the encoder that made it:
    # vectors of different encoders are never compared.
    description_embedding = VectorField(dimensions=EMBEDDING_DIM, null=True, blank=True)
    description_encoder = models.CharField(max_length=128, blank=True)
    weight_embedding = VectorField(dimensions=EMBEDDING_DIM, null=True, blank=True)
    weight_encoder = models.CharField(max_length=128, blank=True, db_index=True)
    weight_embedded_revision = models.PositiveIntegerField(null=True, blank=True)
    # Set when the weights are almost the same as an older adapter's on the same base (not blocking).
    near_duplicate_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    near_duplicate_similarity = models.FloatField(null=True, blank=True)
    # Full-text document kept by PostgreSQL itself (GIN-indexed): keyword search never re-parses rows.
    search_document = models.GeneratedField(
        expression=SearchVector("name", "description", config="english"),
        output_field=SearchVectorField(), db_persist=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["namespace", "name"], name="unique_adapter_id")]
        indexes = [
            GinIndex(fields=["tags"], name="adapter_tags_gin"),
            GinIndex(fields=["search_document"], name="adapter_search_document_gin"),
            models.Index(fields=["base_model", "visibility"], name="adapter_base_visibility"),
            # One per adapter-list ordering (hub.selectors.ADAPTER_SORTS; by name: unique_adapter_id), so a
            # page of a browse is an index range, not a sort of every adapter (85 ms at 100 000).
            models.Index(fields=["-updated_at", "id"], name="adapter_updated_order"),
            models.Index(fields=["-created_at", "id"], name="adapter_created_order"),
            models.Index(fields=["-parameter_count", "id"], name="adapter_largest_order"),
            models.Index(fields=["parameter_count", "id"], name="adapter_smallest_order"),
            # The list filters without an index of their own (tags: GIN, base model: above; license
            # matches case-insensitively, as hub.selectors.adapter_list spells it): at 100 000
            # adapters their page counts read every row, 45 ms each.
            models.Index(fields=["format", "visibility"], name="adapter_format_visibility"),
            models.Index(Upper("license"), F("visibility"), name="adapter_license_visibility"),
            HnswIndex(name="adapter_description_hnsw", fields=["description_embedding"], m=16, ef_construction=200,
                      opclasses=["vector_cosine_ops"]),
            HnswIndex(name="adapter_weight_hnsw", fields=["weight_embedding"], m=16, ef_construction=200,
                      opclasses=["vector_cosine_ops"]),
        ]

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return self.full_name


class Revision(models.Model):
    """One upload of an adapter; older revisions stay downloadable."""

    adapter = models.ForeignKey(Adapter, on_delete=models.CASCADE, related_name="revisions")
    number = models.PositiveIntegerField()
    # A git-like 40-hex id over the file manifest (what Hub-style clients call the commit).
    commit = models.CharField(max_length=40, db_index=True)
    metadata = models.JSONField()  # hub.formats.summarize_adapter of this upload
    analysis = models.JSONField(null=True, blank=True)  # per-module spectra, filled by a worker
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["adapter", "number"], name="unique_revision_number")]
        ordering = ["-number"]


class RevisionPlot(models.Model):
    """A picture of a revision's weights (SVG from hub.plots), rendered once by the analysis job.

    Its own table rather than a column of Revision: every adapter list joins the latest
    revision, and tens of KB of SVG per row would ride along; only the plot view reads
    these. In PostgreSQL rather than blob storage: they are small, derived, deleted with
    their revision (cascade) and need no orphan sweep or second storage round trip.
    """

    class Kind(models.TextChoices):
        SPECTRUM = "spectrum"
        LAYER_NORMS = "layer-norms"

    revision = models.ForeignKey(Revision, on_delete=models.CASCADE, related_name="plots")
    kind = models.CharField(max_length=32, choices=Kind.choices)
    svg = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["revision", "kind"], name="unique_revision_plot")]


class RevisionFile(StoredFile):
    revision = models.ForeignKey(Revision, on_delete=models.CASCADE, related_name="files")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["revision", "filename"], name="unique_revision_file")]
        ordering = ["filename"]


class EncoderArtifact(models.Model):
    """A trained weight encoder (safetensors + JSON in blob storage). The newest
    active one embeds adapters; a new one re-embeds everything in the background."""

    version = models.CharField(max_length=64)  # generation.weight_encoder.ENCODER_VERSION
    weights = models.ForeignKey(Blob, on_delete=models.PROTECT, related_name="+")
    config = models.JSONField()  # the JSON sidecar: architecture, metadata, training curve
    metrics = models.JSONField(default=dict)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    @property
    def label(self) -> str:
        return f"{self.version}@{self.weights_id[:12]}"


class GeneratorArtifact(models.Model):
    """A trained LoRA generator (SG-LoRA or ICM-LoRA) for one base model: its
    tensors in blob storage, the layout it generates, the experts it learned
    from (and those skipped, with the reason), and its training curve. The
    newest version per (base model, method) serves generation requests."""

    class Method(models.TextChoices):
        SG_LORA = "sg-lora"
        ICM_LORA = "icm-lora"

    base_model = models.ForeignKey(BaseModel, on_delete=models.CASCADE, related_name="generators")
    method = models.CharField(max_length=16, choices=Method.choices)
    version = models.PositiveIntegerField()
    weights = models.ForeignKey(Blob, on_delete=models.PROTECT, related_name="+")
    layout = models.JSONField()  # [{path, rank, out_features, in_features, scale}]
    experts = models.JSONField()  # [{adapter_id, adapter, revision_id, revision}] in generator order
    skipped = models.JSONField(default=list)  # [{adapter, reason}]
    settings = models.JSONField(default=dict)
    curve = models.JSONField(default=list)  # [{step, train_loss, validation_error}]
    job = models.OneToOneField("Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-version"]
        constraints = [
            models.UniqueConstraint(fields=["base_model", "method", "version"], name="generator_version_unique"),
        ]

    @property
    def label(self) -> str:
        return f"{self.method}@v{self.version}"

    @property
    def validation_error(self) -> float | None:
        """The validation error of the state kept (training keeps the best point of the curve)."""
        errors = [point["validation_error"] for point in self.curve if point.get("validation_error") is not None]
        return min(errors) if errors else None


class MergedCheckpoint(models.Model):
    """A base model with adapters merged in, stored once per distinct request
    (`key` = sha256 over the base weights, adapter revisions, weights, method, dtype)."""

    key = models.CharField(max_length=64, unique=True)
    base_model = models.ForeignKey(BaseModel, on_delete=models.CASCADE, related_name="merges")
    # [{"adapter": "ns/name", "revision": n, "commit": ..., "weight": w}], method, dtype: what went in.
    recipe = models.JSONField()
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    # A stored merge is a cache: it can always be made again from its recipe. Retention
    # (hub.services.cleanup.expire_merged_checkpoints) removes the least recently used first.
    last_used_at = models.DateTimeField(default=timezone.now, db_index=True)
    size = models.BigIntegerField(default=0)  # bytes of its files, counted once it is stored


class MergedFile(StoredFile):
    checkpoint = models.ForeignKey(MergedCheckpoint, on_delete=models.CASCADE, related_name="files")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["checkpoint", "filename"], name="unique_merged_file")]
        ordering = ["filename"]


class Job(models.Model):
    class Kind(models.TextChoices):
        ANALYZE = "analyze"
        EMBED = "embed"
        REEMBED_ALL = "reembed_all"
        TRAIN_WEIGHT_ENCODER = "train_weight_encoder"
        COMPOSE = "compose"
        MERGE = "merge"
        TRAIN_GENERATOR = "train_generator"
        GENERATE = "generate"

    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    progress = models.FloatField(default=0.0, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)])
    message = models.CharField(max_length=500, blank=True)
    params = models.JSONField(default=dict)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.CASCADE, related_name="jobs")
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    FINISHED_STATES = (State.SUCCEEDED, State.FAILED, State.CANCELLED)  # nothing more will happen

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # Every upload adds jobs, so /metrics (scraped every few seconds) must not read them all:
            # the backlog reads the few unfinished ones, the last hour's ends a range of finished_at.
            models.Index(fields=["kind", "created_at"], condition=models.Q(state__in=["queued", "running"]),
                         name="job_unfinished"),
            models.Index(fields=["finished_at"], name="job_finished_at"),
            models.Index(fields=["owner", "-created_at"], name="job_owner_newest"),  # a user's jobs list
        ]
