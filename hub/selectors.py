"""Reads. Every query that returns adapters goes through `visible_adapters`, so
visibility is applied inside SQL, never after it."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.postgres.expressions import ArraySubquery
from django.contrib.postgres.search import SearchQuery
from django.core.cache import cache
from django.db import connection
from django.db.models import (BooleanField, Case, CharField, Count, F, Min, OuterRef, Prefetch, Q, QuerySet, Subquery,
                              Sum, Value, When)
from django.db.models.expressions import RawSQL
from django.db.models.functions import Coalesce, Concat, JSONObject, NullIf
from django.urls import reverse
from knox.models import AuthToken

from generation import generators
from hub import formats
from hub.blobs import blobs_on_disk, manifest_commit, open_blob
from hub.db import KeptStatement, KeptStatements
from hub.errors import InvalidInput, NotFound
from hub.models import (Adapter, BaseModel, GeneratorArtifact, Job, MergedCheckpoint, Revision, RevisionFile,
                        RevisionPlot, Visibility)
from kernels.compose import METHODS

FACETS_VERSION_KEY = "adapter-facets-version"
FACETS_CACHE_SECONDS = 300
# Merged checkpoints are Hub-style repositories named merges/<merge_id>; no one may upload to it.
MERGES_NAMESPACE = "merges"
MAX_UPDATE_CHECKS = 1000
SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# Orderings of adapter lists: name → ORDER BY (id last, so pages never overlap).
ADAPTER_SORTS = {
    "updated": ("-updated_at", "id"),
    "created": ("-created_at", "id"),
    "name": ("namespace", "name", "id"),
    "largest": ("-parameter_count", "id"),
    "smallest": ("parameter_count", "id"),
}
README_MAX_BYTES = 512 * 1024


def visibility_scope(user) -> tuple:
    """What `user` may see, as a key that `visible_adapters` is derived from: users with equal
    keys get the same SQL, so statements compiled for one serve the others (hub.search)."""
    if user is not None and user.is_authenticated:
        return ("all",) if user.is_staff else ("public_or_owned_by", user.pk)
    return ("public",)


def visible_adapters(user) -> QuerySet[Adapter]:
    adapters = Adapter.objects.select_related("base_model", "owner", "latest_revision")
    scope = visibility_scope(user)
    if scope[0] == "all":
        return adapters
    if scope[0] == "public_or_owned_by":
        return adapters.filter(Q(visibility=Visibility.PUBLIC) | Q(owner_id=scope[1]))
    return adapters.filter(visibility=Visibility.PUBLIC)


def adapters_for_listing(user, adapters: QuerySet[Adapter]) -> QuerySet[Adapter]:
    """`adapters` with what a listing of them shows fetched up front, so N adapters cost the
    same few queries whatever N is: the rows (owner, base model, latest revision joined), the
    latest revisions' files with their blobs, and the near duplicates `user` may see (as
    `listed_near_duplicate`, None when there is none or it is hidden from `user`). Search
    vectors, per-module shapes and the joined rows' large JSON (a base model's config and
    shapes, a revision's metadata and analysis: kilobytes each on real models, decoded for
    every hit), which listings do not show, are left in the database. Model instances, for the web
    pages and AdapterListSerializer; the API writes its lists from adapter_listings."""
    return adapters.defer(
        "description_embedding", "weight_embedding", "module_shapes", "search_document",
        "base_model__config", "base_model__module_shapes", "latest_revision__metadata", "latest_revision__analysis",
        "owner__password",
    ).prefetch_related(
        Prefetch("latest_revision__files", queryset=RevisionFile.objects.select_related("blob"), to_attr="listed_files"),
        Prefetch("near_duplicate_of", queryset=visible_adapters(user).select_related(None).only("id", "namespace", "name"),
                 to_attr="listed_near_duplicate"),
    )


def _full_name(prefix: str = "") -> Concat:
    return Concat(f"{prefix}namespace", Value("/"), f"{prefix}name", output_field=CharField())


# Columns of a listing row that PostgreSQL returns as JSON text: Django's psycopg connection leaves
# jsonb undecoded (JSONField decodes it), and kept statements bypass the fields.
LISTING_JSON_COLUMNS = ("provenance", "embeddings")


def listing_columns(user) -> dict:
    """What a listing of an adapter shows, as SQL: key → expression, each value as
    api.serializers.AdapterListSerializer writes it for `user` but for the request's file URLs,
    the dates' format and provenance that `user` may not read (adapter_listings). The latest
    revision's files and the near duplicate (when `user` may see it) are subqueries."""
    files = (RevisionFile.objects.filter(revision_id=OuterRef("latest_revision_id")).order_by("filename")
             .values(file=JSONObject(filename="filename", size="blob__size", sha256="blob_id")))
    near_duplicate = (visible_adapters(user).select_related(None).order_by()
                      .filter(id=OuterRef("near_duplicate_of_id")).values(full_name=_full_name()))
    return {
        "id": _full_name(), "namespace": F("namespace"), "name": F("name"), "owner": F("owner__username"),
        "base_model": Case(When(base_model__isnull=False, then=_full_name("base_model__")), default=None,
                           output_field=CharField()),
        **{name: F(name) for name in ("description", "tags", "license", "visibility", "format", "peft_type", "rank",
                                      "alpha", "use_rslora", "use_dora", "target_modules", "dtype", "parameter_count",
                                      "provenance")},
        "revision": F("latest_revision__number"), "commit": F("latest_revision__commit"),
        "files": ArraySubquery(files),
        "near_duplicate_of": Subquery(near_duplicate),
        "near_duplicate_similarity": F("near_duplicate_similarity"),
        "embeddings": JSONObject(description=NullIf("description_encoder", Value("")),
                                 weights=NullIf("weight_encoder", Value(""))),
        "created_at": F("created_at"), "updated_at": F("updated_at"),
    }


def listing_query(user, ids: list[int]) -> QuerySet:
    """One statement for the listings of the adapters of `ids` that `user` may see: rows of each
    one's id, then the values of listing_columns in their order."""
    wanted = RawSQL(f'"{Adapter._meta.db_table}"."id" = ANY(%s)', [ids], output_field=BooleanField())
    return (visible_adapters(user).select_related(None).order_by().alias(wanted=wanted).filter(wanted=True)
            .values_list("id", *listing_columns(user).values()))


class ListingStatement(KeptStatement):
    """listing_query of one visibility scope compiled once (hub.db.KeptStatement); slot: the ids.
    Compiling it costs ≈ 1 ms, and building model instances and running DRF's serializers over
    them another ≈ 4 ms for ten adapters: most of a search's time outside the encoder and
    PostgreSQL. Here PostgreSQL writes the listing's values and Python only decodes them."""

    IDS_STAND_INS = ([-1], [-2])

    def __init__(self, user):
        self.columns = tuple(listing_columns(user))
        super().__init__(lambda ids: listing_query(user, ids), stand_ins={"ids": self.IDS_STAND_INS})

    def rows(self, ids: list[int]) -> list[tuple]:
        with connection.cursor() as cursor:
            cursor.execute(self.sql, self.params_with(ids=list(ids)))
            return cursor.fetchall()


_listing_statements = KeptStatements()


def adapter_listings(user, ids: list[int]) -> dict[int, dict]:
    """The listings (listing_columns, as dictionaries) of the adapters of `ids` that `user` may see,
    by id: the API's adapter lists, search results and "more like this" (api.serializers.listing_data
    writes them out). The same values as AdapterListSerializer over adapters_for_listing (tested), in
    one statement compiled once per visibility scope, plus one query when provenance names adapters."""
    statement = _listing_statements.get(visibility_scope(user), lambda: ListingStatement(user))
    listings = {}
    for adapter_id, *values in statement.rows(ids):
        listing = dict(zip(statement.columns, values))
        for column in LISTING_JSON_COLUMNS:
            listing[column] = json.loads(listing[column])
        listing["files"] = [json.loads(file) for file in listing["files"]]
        if listing["near_duplicate_of"] is None:  # none, or hidden from `user`
            listing["near_duplicate_similarity"] = None
        listings[adapter_id] = listing
    provenances = readable_provenances(user, [listing["provenance"] for listing in listings.values()])
    for listing, provenance in zip(listings.values(), provenances):
        listing["provenance"] = provenance
    return listings


def adapter_list(
    user,
    *,
    base_model: str | None = None,
    format: str | None = None,
    tag: str | None = None,
    license: str | None = None,
    owner: str | None = None,
    q: str | None = None,
    sort: str = "updated",
) -> QuerySet[Adapter]:
    adapters = visible_adapters(user)
    if base_model:
        namespace, _, name = base_model.partition("/")
        adapters = adapters.filter(base_model__namespace=namespace, base_model__name=name)
    if format:
        adapters = adapters.filter(format=format)
    if tag:
        adapters = adapters.filter(tags__contains=[tag])
    if license:
        adapters = adapters.filter(license__iexact=license)
    if owner:
        adapters = adapters.filter(owner__username=owner)
    if q:
        # Keywords: the stored full-text document (name, description), plus substrings of name and tags.
        adapters = adapters.filter(
            Q(search_document=SearchQuery(q, config="english", search_type="websearch"))
            | Q(name__icontains=q)
            | Q(tags__icontains=q)
        )
    return adapters.order_by(*ADAPTER_SORTS.get(sort, ADAPTER_SORTS["updated"]))


def adapter_facets(user, *, top_tags: int = 40) -> dict[str, list[str]]:
    """Values to filter the adapters `user` may see by: formats, licenses, the most used tags.

    Counting them reads every visible adapter (≈ 140 ms at 100 000 adapters, on every browse
    page), so they are kept in the cache per visibility scope: until an adapter is saved or
    deleted (`forget_adapter_facets`, connected in hub.apps), and at most FACETS_CACHE_SECONDS
    after a write that bypasses the ORM's signals (a queryset update)."""
    version = cache.get_or_set(FACETS_VERSION_KEY, 0, timeout=None)
    key = ":".join(["adapter-facets", str(version), *map(str, visibility_scope(user)), str(top_tags)])
    facets = cache.get(key)
    if facets is None:
        facets = _count_adapter_facets(user, top_tags)
        cache.set(key, facets, FACETS_CACHE_SECONDS)
    return facets


def forget_adapter_facets() -> None:
    """Every scope's cached facets are out of date (a new version key): an adapter was written."""
    cache.add(FACETS_VERSION_KEY, 0, timeout=None)
    cache.incr(FACETS_VERSION_KEY)


def _count_adapter_facets(user, top_tags: int) -> dict[str, list[str]]:
    visible = visible_adapters(user).order_by()
    tags_sql, params = visible.values("tags").query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT tag FROM ({tags_sql}) AS visible, unnest(visible.tags) AS tag "
                       "GROUP BY tag ORDER BY count(*) DESC, tag LIMIT %s", [*params, top_tags])
        tags = [row[0] for row in cursor.fetchall()]
    return {
        "formats": list(visible.values_list("format", flat=True).distinct().order_by("format")),
        "licenses": list(visible.exclude(license="").values_list("license", flat=True).distinct().order_by("license")),
        "tags": sorted(tags),
    }


def adapter_names(user, *, limit: int = 500) -> list[str]:
    """namespace/name of adapters `user` may see (suggestions when picking adapters to combine)."""
    return [f"{namespace}/{name}" for namespace, name in
            visible_adapters(user).order_by("namespace", "name").values_list("namespace", "name")[:limit]]


def get_adapter(user, namespace: str, name: str) -> Adapter:
    adapter = visible_adapters(user).filter(namespace=namespace, name=name).first()
    if adapter is None:
        # Same answer for "missing" and "private to someone else": no existence leak.
        raise NotFound("adapter_not_found", f"No adapter {namespace}/{name}.")
    return adapter


def visible_full_names(user, full_names) -> set[str]:
    """Of these "namespace/name"s, the adapters `user` may see."""
    pairs = {tuple(full_name.split("/", 1)) for full_name in full_names if "/" in full_name}
    if not pairs:
        return set()
    wanted = Q()
    for namespace, name in pairs:
        wanted |= Q(namespace=namespace, name=name)
    return {f"{ns}/{n}" for ns, n in visible_adapters(user).filter(wanted).values_list("namespace", "name")}


# Provenance lists that name other adapters: a composition's parents, a generation's experts.
PROVENANCE_ADAPTER_LISTS = ("parents", "experts")


def _provenance_names(provenance: dict) -> list[str]:
    return [entry.get("adapter", "") for key in PROVENANCE_ADAPTER_LISTS for entry in provenance.get(key) or []]


def _provenance_among(provenance: dict, visible: set[str]) -> dict:
    return {**provenance, **{key: [entry for entry in provenance[key] if entry.get("adapter") in visible]
                             for key in PROVENANCE_ADAPTER_LISTS if key in provenance}}


def readable_provenance(user, provenance: dict) -> dict:
    """An adapter's provenance as `user` may read it: parents and experts they may not see (private
    to someone else, possibly turned private after the fact) are left out, so the provenance of a
    public adapter never names a private one."""
    named = _provenance_names(provenance)
    if not named:
        return provenance
    return _provenance_among(provenance, visible_full_names(user, named))


def readable_provenances(user, provenances: list[dict]) -> list[dict]:
    """readable_provenance of each, for all of them in at most one query (a listing of N composed
    adapters would otherwise make N)."""
    named = [_provenance_names(provenance) for provenance in provenances]
    visible = visible_full_names(user, [name for names in named for name in names])
    return [_provenance_among(provenance, visible) if names else provenance
            for provenance, names in zip(provenances, named)]


def attach_readable_provenance(user, adapters) -> None:
    """readable_provenance of each adapter as `listed_provenance` (readable_provenances)."""
    adapters = list(adapters)
    for adapter, provenance in zip(adapters, readable_provenances(user, [adapter.provenance for adapter in adapters])):
        adapter.listed_provenance = provenance


def visible_near_duplicate(user, adapter: Adapter) -> Adapter | None:
    """The older adapter this one nearly duplicates, when `user` may see it."""
    if adapter.near_duplicate_of_id is None:
        return None
    if hasattr(adapter, "listed_near_duplicate"):  # fetched by adapters_for_listing for this user
        return adapter.listed_near_duplicate
    return visible_adapters(user).filter(id=adapter.near_duplicate_of_id).first()


def readable_generator_adapters(user, entries: list[dict]) -> list[dict]:
    """A generator's experts or skipped adapters, without those `user` may not see."""
    visible = visible_full_names(user, [entry["adapter"] for entry in entries])
    return [entry for entry in entries if entry["adapter"] in visible]


def get_revision(adapter: Adapter, revision: str | None) -> Revision:
    """`revision` is a revision number, a commit id (or its prefix), 'main' or None (the latest)."""
    if revision in (None, "", "main", "latest"):
        if adapter.latest_revision is None:
            raise NotFound("revision_not_found", f"{adapter.full_name} has no revision.")
        return adapter.latest_revision
    revisions = adapter.revisions.all()
    if revision.isdigit() and len(revision) < 10:
        found = revisions.filter(number=int(revision)).first()
    else:
        found = revisions.filter(commit__startswith=revision.lower()).first() if len(revision) >= 7 else None
    if found is None:
        raise NotFound("revision_not_found", f"{adapter.full_name} has no revision {revision!r}.")
    return found


def revision_readme(revision: Revision) -> str | None:
    """The text of a revision's README.md (the model card), when it has a small one."""
    readme = revision.files.select_related("blob").filter(filename__iexact="README.md").first()
    if readme is None or readme.size > README_MAX_BYTES:
        return None
    with open_blob(readme.sha256) as handle:
        return handle.read().decode("utf-8", errors="replace")


def revision_plot_kinds(revision: Revision) -> list[str]:
    return list(revision.plots.order_by("kind").values_list("kind", flat=True))


def get_revision_plot(revision: Revision, kind: str) -> RevisionPlot:
    found = revision.plots.filter(kind=kind).first()
    if found is None:
        raise NotFound("plot_not_found", f"Revision {revision.number} has no {kind!r} plot yet.")
    return found


def get_stored_file(files, filename: str, owner_label: str):
    """One file of a revision, base model or merge (`files`: its related manager)."""
    found = files.select_related("blob").filter(filename=filename).first()
    if found is None:
        raise NotFound("file_not_found", f"{owner_label} has no file {filename!r}.")
    return found


def base_model_list() -> QuerySet[BaseModel]:
    return BaseModel.objects.order_by("namespace", "name")


def get_base_model(full_name: str) -> BaseModel:
    namespace, _, name = full_name.partition("/")
    found = BaseModel.objects.filter(namespace=namespace, name=name).first()
    if found is None:
        raise NotFound("base_model_not_found", f"No base model {full_name!r} is registered.")
    return found


def generator_list(*, base_model: str | None = None) -> QuerySet[GeneratorArtifact]:
    artifacts = GeneratorArtifact.objects.select_related("base_model", "weights")
    if base_model:
        namespace, _, name = base_model.partition("/")
        artifacts = artifacts.filter(base_model__namespace=namespace, base_model__name=name)
    return artifacts.order_by("base_model__namespace", "base_model__name", "method", "-version")


def latest_generator(base: BaseModel, method: str):
    """The newest trained generator of a method for a base model, or None."""
    return base.generators.filter(method=method).select_related("weights").first()


def generation_methods() -> list[tuple[str, str]]:
    """Every generation method with one line on what it does (generation.generators)."""
    return [(method, generators.METHOD_SUMMARIES[method]) for method in generators.METHODS]


def compose_methods():
    """Every composition method (kernels.compose.METHODS): name, exactness, parameters, description."""
    return list(METHODS.values())


def api_tokens(user) -> QuerySet[AuthToken]:
    """The user's API tokens (knox keeps a hash and an 8-character prefix, never the key)."""
    return AuthToken.objects.filter(user=user).order_by("-created")


def visible_jobs(user) -> QuerySet[Job]:
    if user is None or not user.is_authenticated:
        return Job.objects.none()
    if user.is_staff:
        return Job.objects.all()
    return Job.objects.filter(owner=user)


def job_list(user, *, state: str | None = None, kind: str | None = None) -> QuerySet[Job]:
    """The jobs `user` started, newest first (staff too: theirs; a job's page is open to staff)."""
    jobs = Job.objects.filter(owner=user).order_by("-created_at", "-pk") if user.is_authenticated else Job.objects.none()
    if state:
        jobs = jobs.filter(state=state)
    if kind:
        jobs = jobs.filter(kind=kind)
    return jobs


def job_backlog() -> QuerySet:
    """Unfinished jobs per kind and state, with the oldest one's creation (an index of its own)."""
    return (Job.objects.filter(state__in=(Job.State.QUEUED, Job.State.RUNNING)).values("kind", "state")
            .annotate(count=Count("id"), oldest=Min("created_at")).order_by("kind", "state"))


def jobs_finished_since(since: datetime) -> QuerySet:
    """Jobs that ended after `since`, per kind and state (succeeded, failed, cancelled)."""
    return (Job.objects.filter(finished_at__gt=since).values("kind", "state").annotate(count=Count("id"))
            .order_by("kind", "state"))


def merge_storage() -> dict:
    """How many merges are stored, and their bytes."""
    return MergedCheckpoint.objects.aggregate(count=Count("id"), bytes=Coalesce(Sum("size"), 0))


def get_job(user, job_id) -> Job:
    found = visible_jobs(user).filter(id=job_id).first()
    if found is None:
        raise NotFound("job_not_found", f"No job {job_id}.")
    return found


def load_revision_adapter(revision: Revision) -> formats.CanonicalAdapter:
    """The canonical form of a stored revision (parsed and validated again: blobs are inputs too)."""
    files = {f.filename: f.blob_id for f in revision.files.all()}
    with blobs_on_disk(files) as paths:
        return formats.parse_adapter(paths)


def _merges_visible_to(user, checkpoints: list[MergedCheckpoint]) -> list[MergedCheckpoint]:
    """Those of `checkpoints` that `user` may see: every adapter that went into it is visible to them."""
    inputs = {ref["adapter_id"] for checkpoint in checkpoints for ref in checkpoint.recipe["adapters"]}
    visible = set(visible_adapters(user).filter(id__in=inputs).values_list("id", flat=True))
    return [checkpoint for checkpoint in checkpoints
            if all(ref["adapter_id"] in visible for ref in checkpoint.recipe["adapters"])]


def get_merged_checkpoint(user, key: str) -> MergedCheckpoint:
    """A stored merge, visible to whoever may see every adapter that went into it."""
    found = _merges_visible_to(user, list(MergedCheckpoint.objects.select_related("base_model").filter(key=key)))
    if not found:
        raise NotFound("merge_not_found", f"No merge {key}. Stored merges that nobody uses are removed after a "
                       "while; requesting the same merge makes it again.")
    return found[0]


def find_merged_checkpoint(user, key: str) -> MergedCheckpoint | None:
    """get_merged_checkpoint, or None where it answers 404 (e.g. a merge removed by retention)."""
    try:
        return get_merged_checkpoint(user, key)
    except NotFound:
        return None


def merge_list(user) -> QuerySet[MergedCheckpoint] | list[MergedCheckpoint]:
    """The stored merges `user` made (staff: all) that they may still see, most recently used first.
    Staff see every merge, so theirs stays a queryset: a page reads only its own rows."""
    merges = (MergedCheckpoint.objects.select_related("base_model").prefetch_related("files__blob")
              .order_by("-last_used_at", "-pk"))
    if user.is_staff:
        return merges
    return _merges_visible_to(user, list(merges.filter(created_by=user)))


def merge_identity(checkpoint: MergedCheckpoint) -> dict:
    """What names a stored merge and what went into it (JSON: a merge job's result starts with it)."""
    return {"merge_id": checkpoint.key, "repo_id": f"{MERGES_NAMESPACE}/{checkpoint.key}",
            "url": reverse("merge-detail", args=[checkpoint.key]), "base_model": checkpoint.base_model.full_name,
            **merge_recipe(checkpoint)}


def merge_summary(checkpoint: MergedCheckpoint) -> dict:
    """A stored merge without its files: what went in, its size, its uses and its expiry."""
    return {**merge_identity(checkpoint), **merge_retention(checkpoint)}


def merge_retention(checkpoint: MergedCheckpoint) -> dict:
    """A stored merge's size and uses, and when retention removes it if nobody uses it before."""
    retention_days = settings.QUIVER_MERGE_RETENTION_DAYS
    return {"size": checkpoint.size, "created_at": checkpoint.created_at, "last_used_at": checkpoint.last_used_at,
            "expires_at": checkpoint.last_used_at + timedelta(days=retention_days) if retention_days > 0 else None}


def base_model_commit(base: BaseModel) -> str:
    """The revision of a base model (immutable once registered): the commit over its files."""
    return manifest_commit((f.filename, f.blob_id) for f in base.files.all())


def download_manifest(adapter: Adapter, revision: Revision) -> dict:
    """What a download is pinned to: the adapter revision, the base model revision, every file's hash."""
    base = adapter.base_model
    return {
        "adapter": {"id": adapter.full_name, "revision": revision.number, "commit": revision.commit},
        "base_model": None if base is None else {
            "id": base.full_name, "revision": base_model_commit(base), "weight_fingerprint": base.weight_fingerprint},
        "files": list(revision.files.select_related("blob")),
    }


def revisions_holding_file(user, sha256: str) -> list[RevisionFile]:
    """Every visible adapter revision with a file of these bytes, newest first (never empty)."""
    if not SHA256.fullmatch(sha256):
        raise InvalidInput("bad_sha256", "Give the file's sha256 as 64 hexadecimal characters.", field="sha256")
    holders = list(
        RevisionFile.objects.select_related("revision__adapter__latest_revision", "blob")
        .filter(blob_id=sha256.lower(), revision__adapter__in=visible_adapters(user).values("id"))
        .order_by("-revision__created_at", "filename")
    )
    if not holders:  # the same answer when only someone else's private adapter holds it
        raise NotFound("file_not_registered", f"No adapter you can see has a file with sha256 {sha256.lower()}.")
    return holders


def _revision_json(revision: Revision) -> dict:
    return {"revision": revision.number, "commit": revision.commit, "created_at": revision.created_at.isoformat()}


def adapter_updates(user, refs: list[str]) -> list[dict]:
    """For each "namespace/name@revision": the revisions newer than it (a per-item error when
    the adapter or the revision is unknown, so one stale pin does not fail the whole check)."""
    if len(refs) > MAX_UPDATE_CHECKS:
        raise InvalidInput("too_many_adapters", f"At most {MAX_UPDATE_CHECKS} adapters per check.", field="adapters")
    parsed = []
    for ref in refs:
        full_name, _, revision = str(ref).partition("@")
        namespace, _, name = full_name.partition("/")
        parsed.append((str(ref), namespace, name, revision))
    wanted = Q(pk__in=[])
    for _, namespace, name, _ in parsed:
        wanted |= Q(namespace=namespace, name=name)
    adapters = {(a.namespace, a.name): a for a in visible_adapters(user).filter(wanted)}
    newer_pool: dict[int, list[Revision]] = {}
    for revision in Revision.objects.filter(adapter__in=adapters.values()).order_by("number"):
        newer_pool.setdefault(revision.adapter_id, []).append(revision)

    results = []
    for ref, namespace, name, revision in parsed:
        item: dict = {"ref": ref, "id": f"{namespace}/{name}"}
        adapter = adapters.get((namespace, name))
        try:
            if not namespace or not name:
                raise InvalidInput("bad_reference", f"{ref!r} is not namespace/name@revision.")
            if adapter is None:  # same answer for missing and private to someone else
                raise NotFound("adapter_not_found", f"No adapter {namespace}/{name}.")
            if not revision:
                raise InvalidInput("revision_required", f"{ref!r} names no revision (namespace/name@revision).")
            asked = get_revision(adapter, revision)
        except (InvalidInput, NotFound) as error:
            results.append({**item, "error": {"code": error.code, "message": error.message}})
            continue
        newer = [r for r in newer_pool[adapter.id] if r.number > asked.number]
        results.append({**item, "current": _revision_json(asked), "latest": _revision_json(adapter.latest_revision),
                        "newer": [_revision_json(r) for r in reversed(newer)], "update_available": bool(newer)})
    return results


# --- Hugging Face Hub-compatible repositories ---------------------------------------------------

@dataclass(frozen=True)
class HubRepo:
    """A repository as Hugging Face Hub clients see it, at one commit: an adapter revision,
    a registered base model or a merged checkpoint (the last two are immutable: one commit)."""

    repo_id: str
    kind: str  # "adapter" | "base_model" | "merge"
    commit: str
    files: list  # StoredFile rows, blobs loaded
    private: bool
    author: str
    created_at: datetime
    last_modified: datetime
    library_name: str
    tags: list[str] = field(default_factory=list)
    card: dict = field(default_factory=dict)  # cardData: base model and its pinned revision, license, recipe

    def file(self, filename: str):
        for stored in self.files:
            if stored.filename == filename:
                return stored
        raise NotFound("file_not_found", f"{self.repo_id}@{self.commit[:12]} has no file {filename!r}.")


def get_hub_repo(user, repo_id: str, revision: str | None = None) -> HubRepo:
    """`repo_id` names an adapter, a base model (when no adapter has that id) or merges/<merge_id>;
    `revision` is main/None (the latest), a commit (or its prefix) or an adapter revision number."""
    namespace, _, name = repo_id.partition("/")
    if namespace == MERGES_NAMESPACE:
        return _merge_repo(get_merged_checkpoint(user, name), revision)
    adapter = visible_adapters(user).filter(namespace=namespace, name=name).first()
    if adapter is not None:
        return _adapter_repo(adapter, get_revision(adapter, revision))
    base = BaseModel.objects.select_related("owner").filter(namespace=namespace, name=name).first()
    if base is not None:
        return _base_model_repo(base, revision)
    # Same answer for "missing" and "private to someone else": no existence leak.
    raise NotFound("repo_not_found", f"No repository {repo_id}.")


def _stored_files(files) -> list:
    return list(files.select_related("blob").order_by("filename"))


def _check_immutable_revision(repo_id: str, commit: str, revision: str | None) -> None:
    if revision in (None, "", "main", "latest"):
        return
    if len(revision) < 7 or not commit.startswith(revision.lower()):
        raise NotFound("revision_not_found", f"{repo_id} has one revision, {commit}; not {revision!r}.")


def _adapter_repo(adapter: Adapter, revision: Revision) -> HubRepo:
    base = adapter.base_model
    card = {"license": adapter.license or None, "tags": adapter.tags, "library_name": "peft"}
    if base is not None:
        card.update(base_model=base.full_name, base_model_revision=base_model_commit(base))
    return HubRepo(
        repo_id=adapter.full_name, kind="adapter", commit=revision.commit, files=_stored_files(revision.files),
        private=adapter.visibility == Visibility.PRIVATE, author=adapter.namespace, created_at=adapter.created_at,
        last_modified=revision.created_at, library_name="peft", tags=["peft", "lora", *adapter.tags], card=card)


def _base_model_repo(base: BaseModel, revision: str | None) -> HubRepo:
    files = _stored_files(base.files)
    commit = manifest_commit((f.filename, f.blob_id) for f in files)
    _check_immutable_revision(base.full_name, commit, revision)
    return HubRepo(
        repo_id=base.full_name, kind="base_model", commit=commit, files=files, private=False, author=base.namespace,
        created_at=base.created_at, last_modified=base.created_at, library_name="transformers",
        tags=["transformers", base.model_type], card={"library_name": "transformers"})


def _merge_repo(checkpoint: MergedCheckpoint, revision: str | None) -> HubRepo:
    repo_id = f"{MERGES_NAMESPACE}/{checkpoint.key}"
    files = _stored_files(checkpoint.files)
    commit = manifest_commit((f.filename, f.blob_id) for f in files)
    _check_immutable_revision(repo_id, commit, revision)
    adapter_ids = [ref["adapter_id"] for ref in checkpoint.recipe["adapters"]]
    base = checkpoint.base_model
    return HubRepo(
        repo_id=repo_id, kind="merge", commit=commit, files=files,
        private=Adapter.objects.filter(id__in=adapter_ids, visibility=Visibility.PRIVATE).exists(),
        author=MERGES_NAMESPACE, created_at=checkpoint.created_at, last_modified=checkpoint.created_at,
        library_name="transformers", tags=["transformers", "merge"],
        card={"library_name": "transformers", "base_model": base.full_name,
              "base_model_revision": base_model_commit(base), "merge": merge_recipe(checkpoint)})


def merge_recipe(checkpoint: MergedCheckpoint) -> dict:
    """What went into a merge, pinned: each adapter's revision and commit, its weight, the method."""
    recipe = checkpoint.recipe
    return {"adapters": [{key: ref[key] for key in ("adapter", "revision", "commit", "weight")}
                         for ref in recipe["adapters"]],
            "method": recipe["method"], "params": recipe.get("params", {}), "dtype": recipe.get("dtype")}
