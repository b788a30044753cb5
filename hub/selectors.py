"""Reads. Every query that returns adapters goes through `visible_adapters`, so
visibility is applied inside SQL, never after it."""
from __future__ import annotations

from django.contrib.postgres.search import SearchQuery
from django.db import connection
from django.db.models import Q, QuerySet
from knox.models import AuthToken

from hub import formats
from hub.blobs import blobs_on_disk, open_blob
from hub.errors import NotFound
from hub.models import Adapter, BaseModel, Job, Revision, RevisionPlot, Visibility
from kernels.compose import METHODS

# Orderings of adapter lists: name → ORDER BY (id last, so pages never overlap).
ADAPTER_SORTS = {
    "updated": ("-updated_at", "id"),
    "created": ("-created_at", "id"),
    "name": ("namespace", "name", "id"),
    "largest": ("-parameter_count", "id"),
    "smallest": ("parameter_count", "id"),
}
README_MAX_BYTES = 512 * 1024


def visible_adapters(user) -> QuerySet[Adapter]:
    adapters = Adapter.objects.select_related("base_model", "owner", "latest_revision")
    if user is not None and user.is_authenticated:
        if user.is_staff:
            return adapters
        return adapters.filter(Q(visibility=Visibility.PUBLIC) | Q(owner=user))
    return adapters.filter(visibility=Visibility.PUBLIC)


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
    """Values to filter the adapters `user` may see by: formats, licenses, the most used tags."""
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


def get_merged_checkpoint(user, key: str):
    """A stored merge, visible to whoever may see every adapter that went into it."""
    from hub.models import MergedCheckpoint

    checkpoint = MergedCheckpoint.objects.select_related("base_model").filter(key=key).first()
    adapter_ids = {ref["adapter_id"] for ref in checkpoint.recipe["adapters"]} if checkpoint else set()
    if checkpoint is None or visible_adapters(user).filter(id__in=adapter_ids).count() != len(adapter_ids):
        raise NotFound("merge_not_found", f"No merge {key}.")
    return checkpoint
