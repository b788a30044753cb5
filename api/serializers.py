"""Request validation and response shapes; no logic beyond shaping data."""
from __future__ import annotations

from django.urls import reverse
from rest_framework import serializers

from hub import selectors
from hub.services import generations
from hub.models import Adapter, BaseModel, GeneratorArtifact, Job, Revision, Visibility


def viewer(serializer):
    """The user a response is shaped for (None: anonymous)."""
    request = serializer.context.get("request")
    return request.user if request is not None else None


class CommaSeparatedListField(serializers.ListField):
    """Accepts repeated form fields or one comma-separated value (both are common in multipart)."""

    def to_internal_value(self, data):
        if isinstance(data, str):
            data = [data]
        items = [part.strip() for value in data for part in str(value).split(",")]
        return super().to_internal_value([item for item in items if item])


class StoredFileSerializer(serializers.Serializer):
    filename = serializers.CharField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()
    url = serializers.SerializerMethodField()

    def get_url(self, stored) -> str:
        return absolute_url(self.context.get("request"), self.context["file_url"](stored))


def absolute_url(request, url: str) -> str:
    return request.build_absolute_uri(url) if request else url


def adapter_file_path(namespace: str, name: str, revision_number: int, filename: str) -> str:
    return f"{reverse('adapter-file', args=[namespace, name, filename])}?revision={revision_number}"


def adapter_file_url(adapter: Adapter, revision: Revision):
    def url(stored) -> str:
        return adapter_file_path(adapter.namespace, adapter.name, revision.number, stored.filename)

    return url


class RevisionSerializer(serializers.ModelSerializer):
    files = serializers.SerializerMethodField()

    class Meta:
        model = Revision
        fields = ["number", "commit", "created_at", "files"]

    def get_files(self, revision) -> list[dict]:
        context = {**self.context, "file_url": adapter_file_url(revision.adapter, revision)}
        return StoredFileSerializer(revision.files.select_related("blob").all(), many=True, context=context).data


class AdapterSerializer(serializers.ModelSerializer):
    id = serializers.CharField(source="full_name", read_only=True)
    owner = serializers.CharField(source="owner.username", read_only=True)
    base_model = serializers.CharField(source="base_model.full_name", default=None, read_only=True)
    revision = serializers.IntegerField(source="latest_revision.number", default=None, read_only=True)
    commit = serializers.CharField(source="latest_revision.commit", default=None, read_only=True)
    files = serializers.SerializerMethodField()
    near_duplicate_of = serializers.SerializerMethodField()
    near_duplicate_similarity = serializers.SerializerMethodField()
    provenance = serializers.SerializerMethodField()
    embeddings = serializers.SerializerMethodField()

    class Meta:
        model = Adapter
        fields = [
            "id", "namespace", "name", "owner", "base_model", "description", "tags", "license", "visibility",
            "format", "peft_type", "rank", "alpha", "use_rslora", "use_dora", "target_modules", "module_shapes",
            "dtype", "parameter_count", "provenance", "revision", "commit", "files", "near_duplicate_of",
            "near_duplicate_similarity", "embeddings", "created_at", "updated_at",
        ]

    def get_near_duplicate_of(self, adapter) -> str | None:
        duplicate = selectors.visible_near_duplicate(viewer(self), adapter)
        return duplicate.full_name if duplicate else None

    def get_near_duplicate_similarity(self, adapter) -> float | None:
        return adapter.near_duplicate_similarity if self.get_near_duplicate_of(adapter) else None

    def get_provenance(self, adapter) -> dict:
        if hasattr(adapter, "listed_provenance"):  # set for this viewer by selectors.attach_readable_provenance
            return adapter.listed_provenance
        return selectors.readable_provenance(viewer(self), adapter.provenance)

    def get_embeddings(self, adapter) -> dict:
        """Which encoders have embedded this adapter (empty until the worker has run)."""
        return {"description": adapter.description_encoder or None, "weights": adapter.weight_encoder or None}

    def get_files(self, adapter) -> list[dict]:
        revision = adapter.latest_revision
        if revision is None:
            return []
        files = getattr(revision, "listed_files", None)  # fetched by selectors.adapters_for_listing
        if files is None:
            files = revision.files.select_related("blob").all()
        context = {**self.context, "file_url": adapter_file_url(adapter, revision)}
        return StoredFileSerializer(files, many=True, context=context).data


class AdapterListSerializer(AdapterSerializer):
    """An adapter in a list leaves out per-module shapes, which can be large. This is the lists'
    schema and reference; the API writes lists through hub.selectors.adapter_listings and
    listing_data, a faster path to the same JSON (tested equal)."""

    class Meta(AdapterSerializer.Meta):
        fields = [f for f in AdapterSerializer.Meta.fields if f != "module_shapes"]


class AdapterUploadSerializer(serializers.Serializer):
    files = serializers.ListField(child=serializers.FileField(allow_empty_file=True), allow_empty=False)
    namespace = serializers.CharField(max_length=96)
    name = serializers.CharField(max_length=96)
    base_model = serializers.CharField(required=False, allow_blank=True, help_text="namespace/name of a registered base model")
    description = serializers.CharField(required=False, allow_blank=True)
    tags = CommaSeparatedListField(child=serializers.CharField(max_length=64), required=False)
    license = serializers.CharField(required=False, allow_blank=True, max_length=64)
    visibility = serializers.ChoiceField(choices=Visibility.choices, required=False)


class AdapterUpdateSerializer(serializers.Serializer):
    description = serializers.CharField(required=False, allow_blank=True)
    tags = CommaSeparatedListField(child=serializers.CharField(max_length=64), required=False)
    license = serializers.CharField(required=False, allow_blank=True, max_length=64)
    visibility = serializers.ChoiceField(choices=Visibility.choices, required=False)


class BaseModelSerializer(serializers.ModelSerializer):
    id = serializers.CharField(source="full_name", read_only=True)
    owner = serializers.CharField(source="owner.username", read_only=True)
    files = serializers.SerializerMethodField()

    class Meta:
        model = BaseModel
        fields = [
            "id", "namespace", "name", "owner", "description", "architecture", "model_type", "dtype",
            "parameter_count", "weight_fingerprint", "config", "module_shapes", "files", "created_at",
        ]

    def get_files(self, base) -> list[dict]:
        def url(stored) -> str:
            return reverse("base-model-file", args=[base.namespace, base.name, stored.filename])

        return StoredFileSerializer(base.files.select_related("blob").all(), many=True, context={**self.context, "file_url": url}).data


class BaseModelListSerializer(BaseModelSerializer):
    class Meta(BaseModelSerializer.Meta):
        fields = [f for f in BaseModelSerializer.Meta.fields if f not in ("config", "module_shapes")]


class BaseModelUploadSerializer(serializers.Serializer):
    files = serializers.ListField(child=serializers.FileField(allow_empty_file=True), allow_empty=False)
    namespace = serializers.CharField(max_length=96)
    name = serializers.CharField(max_length=96)
    description = serializers.CharField(required=False, allow_blank=True)


class JobSerializer(serializers.ModelSerializer):
    class Meta:
        model = Job
        fields = ["id", "kind", "state", "progress", "message", "result", "error", "params",
                  "created_at", "started_at", "finished_at"]


class JobFilterSerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=Job.State.choices, required=False)
    kind = serializers.ChoiceField(choices=Job.Kind.choices, required=False)


class HealthSerializer(serializers.Serializer):
    status = serializers.CharField()
    database = serializers.CharField()
    broker = serializers.CharField()


class SimilarQuerySerializer(serializers.Serializer):
    k = serializers.IntegerField(min_value=1, max_value=100, default=10)


class SearchQuerySerializer(SimilarQuerySerializer):
    q = serializers.CharField(max_length=2000, help_text="what the adapter should do, in words")
    base_model = serializers.CharField(required=False)
    format = serializers.CharField(required=False)
    tag = serializers.CharField(required=False)
    license = serializers.CharField(required=False)


DATES = serializers.DateTimeField()


def listing_data(listing: dict, request) -> dict:
    """An adapter's listing from hub.selectors.adapter_listings as AdapterListSerializer writes it
    (the same JSON, tested), without model instances or DRF fields per adapter: how the API writes
    adapter lists, search results and "more like this"."""
    files = [{**file, "url": absolute_url(request, adapter_file_path(listing["namespace"], listing["name"],
                                                                     listing["revision"], file["filename"]))}
             for file in listing["files"]]
    return {**listing, "files": files, "created_at": DATES.to_representation(listing["created_at"]),
            "updated_at": DATES.to_representation(listing["updated_at"])}


def search_results(matches: list, listings: dict[int, dict], request) -> list[dict]:
    """SearchHitSerializer's JSON of hub.search matches (id, score, matched) with their listings, in
    the matches' order (an adapter deleted or hidden since it was ranked is left out)."""
    return [{"adapter": listing_data(listings[adapter_id], request), "score": score, "matched": matched}
            for adapter_id, score, matched in matches if adapter_id in listings]


class SearchHitSerializer(serializers.Serializer):
    adapter = AdapterListSerializer()
    score = serializers.FloatField(help_text="reciprocal-rank-fusion score")
    matched = serializers.DictField(child=serializers.FloatField(),
                                    help_text="ranking → similarity: description, weights (cosine), keywords (text rank)")


class SearchResponseSerializer(serializers.Serializer):
    query = serializers.CharField()
    results = SearchHitSerializer(many=True)


class AdapterRefSerializer(serializers.Serializer):
    id = serializers.CharField(help_text="namespace/name, optionally @revision (number or commit)")
    weight = serializers.FloatField(default=1.0)


class CompositionRequestSerializer(serializers.Serializer):
    adapters = AdapterRefSerializer(many=True)
    method = serializers.CharField()
    params = serializers.DictField(required=False, default=dict,
                                   help_text="rank, density, majority_sign, seed (as the method uses them)")
    namespace = serializers.CharField(required=False)
    name = serializers.CharField(required=False)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    visibility = serializers.ChoiceField(choices=Visibility.choices, default=Visibility.PUBLIC)


class MergeRequestSerializer(serializers.Serializer):
    base_model = serializers.CharField()
    adapters = AdapterRefSerializer(many=True)
    method = serializers.CharField(default="linear")
    params = serializers.DictField(required=False, default=dict)
    dtype = serializers.CharField(required=False, allow_null=True, default=None)


class GenerationRequestSerializer(serializers.Serializer):
    # Length and emptiness are checked by the service (the same rules serve the web form).
    description = serializers.CharField(allow_blank=True, trim_whitespace=False,
                                        help_text="the task, in words (at most 1000 characters)")
    base_model = serializers.CharField(help_text="namespace/name of a base model with a trained generator")
    method = serializers.ChoiceField(choices=GeneratorArtifact.Method.choices, default=GeneratorArtifact.Method.SG_LORA)
    k = serializers.IntegerField(required=False, allow_null=True, default=None,
                                 help_text="how many expert adapters condition the generation (1–32)")
    namespace = serializers.CharField(required=False)
    name = serializers.CharField(required=False)
    visibility = serializers.ChoiceField(choices=Visibility.choices, default=Visibility.PUBLIC)


class GeneratorTrainingRequestSerializer(serializers.Serializer):
    base_model = serializers.CharField()
    methods = serializers.ListField(child=serializers.ChoiceField(choices=GeneratorArtifact.Method.choices),
                                    required=False, allow_empty=False)
    steps = serializers.IntegerField(required=False, min_value=50, max_value=20000,
                                     help_text="training steps (default 1500 in parameter space, 600 in function space)")
    space = serializers.ChoiceField(choices=generations.SPACES, default="parameter",
                                    help_text="parameter: the CVAE models the experts' parameters (any base model); "
                                              "function: adapters are trained by what they make the base model "
                                              "answer on its probe texts (a base the hub can run, with "
                                              "probe_texts.json)")
    conjunctions = serializers.BooleanField(
        default=True, help_text="on a base the hub can run (with probe_texts.json): first distill the conjunctions "
                                "of experts that no expert covers into derived experts (README, 'Generation'); on "
                                "by default there, false skips them; ignored elsewhere")
    conjunction_steps = serializers.IntegerField(
        required=False, min_value=10, max_value=2000,
        help_text="distillation steps per derived expert (default 100; each step runs the base on 32 probe texts "
                  "per conjunction)")


class GeneratorArtifactSerializer(serializers.ModelSerializer):
    base_model = serializers.CharField(source="base_model.full_name")
    label = serializers.CharField()
    bytes = serializers.IntegerField(source="weights.size")
    sha256 = serializers.CharField(source="weights_id")
    experts = serializers.SerializerMethodField()

    class Meta:
        model = GeneratorArtifact
        fields = ["id", "base_model", "method", "version", "label", "bytes", "sha256", "experts", "skipped",
                  "settings", "curve", "created_at"]

    skipped = serializers.SerializerMethodField()

    def get_experts(self, artifact) -> list[str]:
        return [expert["adapter"] for expert in selectors.readable_generator_adapters(viewer(self), artifact.experts)]

    def get_skipped(self, artifact) -> list[dict]:
        return selectors.readable_generator_adapters(viewer(self), artifact.skipped)


class ComposeMethodSerializer(serializers.Serializer):
    name = serializers.CharField()
    exact = serializers.BooleanField(help_text="true: the result equals Σ wᵢ·ΔWᵢ under the method's own rule, "
                                               "no approximation")
    dense = serializers.BooleanField()
    description = serializers.CharField()


class PinnedAdapterSerializer(serializers.Serializer):
    adapter = serializers.CharField()
    revision = serializers.IntegerField()
    commit = serializers.CharField()
    weight = serializers.FloatField()


class MergeSummarySerializer(serializers.Serializer):
    merge_id = serializers.CharField()
    repo_id = serializers.CharField(help_text="merges/<merge_id>: the Hugging Face Hub-compatible repository id")
    url = serializers.CharField(help_text="the merge's manifest, with its files")
    base_model = serializers.CharField()
    adapters = PinnedAdapterSerializer(many=True)
    method = serializers.CharField()
    params = serializers.DictField()
    dtype = serializers.CharField(allow_null=True)
    size = serializers.IntegerField(help_text="bytes of its files")
    created_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField(help_text="its last download or identical request")
    expires_at = serializers.DateTimeField(allow_null=True, help_text=(
        "when retention removes it unless it is used before (null: kept); past the hub's storage cap the least "
        "recently used merges go earlier. Requesting the same merge again makes it again."))


class MergedCheckpointSerializer(MergeSummarySerializer):
    base_model_revision = serializers.CharField(help_text="commit over the base model's files")
    files = serializers.ListField(child=serializers.DictField())


class ManifestSerializer(serializers.Serializer):
    adapter = serializers.DictField(help_text="id, revision, commit")
    base_model = serializers.DictField(allow_null=True, help_text="id, revision (commit over its files), weight_fingerprint")
    files = StoredFileSerializer(many=True)


class FileHolderSerializer(serializers.Serializer):
    adapter = serializers.CharField(source="revision.adapter.full_name")
    revision = serializers.IntegerField(source="revision.number")
    commit = serializers.CharField(source="revision.commit")
    filename = serializers.CharField()
    latest = serializers.SerializerMethodField(help_text="whether this is the adapter's latest revision")

    def get_latest(self, stored) -> bool:
        return stored.revision.adapter.latest_revision_id == stored.revision_id


class ByHashResponseSerializer(serializers.Serializer):
    sha256 = serializers.CharField()
    matches = FileHolderSerializer(many=True)


class UpdateCheckRequestSerializer(serializers.Serializer):
    adapters = serializers.ListField(child=serializers.CharField(max_length=300), allow_empty=False,
                                     help_text='["namespace/name@revision", ...] (revision: number or commit)')


class UpdateCheckResponseSerializer(serializers.Serializer):
    results = serializers.ListField(child=serializers.DictField(), help_text=(
        "per adapter, in request order: ref, id, current, latest, newer (newest first), update_available; "
        "or ref, id, error {code, message}"))
