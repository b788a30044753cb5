"""Web pages. Views are thin: read the request, call hub selectors (reads) and
services (writes) — the same ones the API calls — and render a template."""
from __future__ import annotations

import functools

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from frontend.forms import ComposeForm, GenerateForm, MergeForm, SearchForm, UploadForm
from hub import search, selectors
from hub.errors import NotFound, QuiverError
from hub.models import Job
from hub.services import accounts, compositions, generations
from hub.services import jobs as job_services
from hub.services.adapters import upload_adapter
from hub.services.files import incoming_uploads

PAGE_SIZE = 20
STORED_MERGES_SHOWN = 50  # the rest through GET /api/v1/merges/ (paged)
SEARCH_DEPTH = 100  # a semantic search ranks this many adapters; pages are cut from them
SIMILAR_COUNT = 5


def not_found_as_404(view):
    """A selector's NotFound (missing, or private to someone else) is the 404 page."""

    @functools.wraps(view)
    def wrapped(request, *args, **kwargs):
        try:
            return view(request, *args, **kwargs)
        except NotFound as error:
            raise Http404(error.message) from None

    return wrapped


@require_GET
def adapter_list(request):
    facets = selectors.adapter_facets(request.user)
    form = SearchForm(request.GET, facets=facets)
    form.is_valid()  # a value that is not a choice (an unknown format) is dropped, not an error page
    filters = {key: form.cleaned_data.get(key) or None for key in ("base_model", "format", "license", "tag")}
    query = (form.cleaned_data.get("q") or "").strip()
    sort = form.cleaned_data.get("sort") or ("relevance" if query else "updated")
    matched: dict[int, dict] = {}
    if query:
        hits = search.search_adapters(request.user, query, k=SEARCH_DEPTH, **filters)
        matched = {hit.adapter.id: hit.matched for hit in hits}
        if sort == "relevance":
            adapters = [hit.adapter for hit in hits]
        else:  # the same matches in another order (the ordering rules live in the selector)
            adapters = selectors.adapter_list(request.user, sort=sort).filter(id__in=matched)
    else:
        sort = "updated" if sort == "relevance" else sort
        adapters = selectors.adapter_list(request.user, sort=sort, **filters)
    page = Paginator(adapters, PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "frontend/adapter_list.html", {
        "form": form, "query": query, "page": page, "tags": facets["tags"],
        "results": [(adapter, matched.get(adapter.id)) for adapter in page],
    })


@require_GET
@not_found_as_404
def adapter_detail(request, namespace, name):
    adapter = selectors.get_adapter(request.user, namespace, name)
    revision = selectors.get_revision(adapter, request.GET.get("revision"))
    return render(request, "frontend/adapter_detail.html", {
        "adapter": adapter,
        "revision": revision,
        "files": revision.files.select_related("blob"),
        "revisions": adapter.revisions.all(),
        "readme": selectors.revision_readme(revision),
        "plot_kinds": selectors.revision_plot_kinds(revision),
        "similar": search.similar_adapters(request.user, adapter, k=SIMILAR_COUNT),
        "provenance": selectors.readable_provenance(request.user, adapter.provenance),
        "near_duplicate": selectors.visible_near_duplicate(request.user, adapter),
    })


@require_GET
@not_found_as_404
def adapter_plot(request, namespace, name, kind):
    """A plot of one revision as an SVG image (rendered once by the analysis job)."""
    adapter = selectors.get_adapter(request.user, namespace, name)
    revision = selectors.get_revision(adapter, request.GET.get("revision"))
    plot = selectors.get_revision_plot(revision, kind)
    response = HttpResponse(plot.svg, content_type="image/svg+xml")
    # A revision's plot never changes; private adapters' plots stay out of shared caches.
    response["Cache-Control"] = f"{'public' if adapter.visibility == 'public' else 'private'}, max-age=86400"
    response["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'"
    return response


@login_required
@require_http_methods(["GET", "POST"])
def upload(request):
    form = UploadForm(request.POST or None, request.FILES or None, initial={"namespace": request.user.username})
    if request.method == "POST" and form.is_valid():
        try:
            revision = upload_adapter(user=request.user, files=incoming_uploads(request.FILES.getlist("files")),
                                      **form.service_arguments())
        except QuiverError as error:
            form.add_service_error(error)
        else:
            messages.success(request, f"Uploaded {revision.adapter.full_name} (revision {revision.number}).")
            return redirect("frontend:adapter", revision.adapter.namespace, revision.adapter.name)
    return render(request, "frontend/upload.html", {"form": form}, status=400 if form.errors else 200)


def _adapter_picks_page(request, form_class, template: str, request_job, extra: dict | None = None):
    """Compose and merge: a form of adapters, weights and a method that starts a job."""
    if request.method == "POST":
        form = form_class(request.POST)
        if form.is_valid():
            try:
                job = request_job(user=request.user, **form.service_arguments())
            except QuiverError as error:
                form.add_service_error(error)
            else:
                return redirect("frontend:job", job.id)
    else:  # ?adapters=ns/a&adapters=ns/b: picked on the search page or an adapter page
        picked = request.GET.getlist("adapters")
        form = form_class(initial_adapters=picked, rows=2, initial={"base_model": _base_model_of(request.user, picked)})
    invalid = request.method == "POST"
    return render(request, template, {"form": form, "adapter_names": selectors.adapter_names(request.user),
                                      **(extra or {})}, status=400 if invalid else 200)


def _base_model_of(user, picked: list[str]) -> str:
    """The base model of the first picked adapter (to preselect it), '' when unknown."""
    namespace, _, name = (picked[0] if picked else "").partition("/")
    try:
        base = selectors.get_adapter(user, namespace, name).base_model
    except NotFound:
        return ""
    return base.full_name if base else ""


@login_required
@require_http_methods(["GET", "POST"])
def compose(request):
    return _adapter_picks_page(request, ComposeForm, "frontend/compose.html", compositions.request_composition)


@login_required
@require_http_methods(["GET", "POST"])
def merge(request):
    """The merge form, and below it the stored merges the user made, with their files and expiry."""
    stored = [(checkpoint, selectors.merge_retention(checkpoint))
              for checkpoint in selectors.merge_list(request.user)[:STORED_MERGES_SHOWN]]
    return _adapter_picks_page(request, MergeForm, "frontend/merge.html", compositions.request_merge,
                               extra={"stored_merges": stored})


@login_required
@require_POST
@not_found_as_404
def merge_delete(request, merge_id):
    checkpoint = selectors.get_merged_checkpoint(request.user, merge_id)
    try:
        compositions.delete_merge(user=request.user, checkpoint=checkpoint)
    except QuiverError as error:
        messages.error(request, error.message)
    else:
        messages.success(request, f"The merge of {checkpoint.base_model.full_name} was removed; merging the same "
                                  "adapters again makes it again.")
    return redirect(reverse("frontend:merge") + "#stored-merges")


@login_required
@require_http_methods(["GET", "POST"])
def generate(request):
    generators = list(selectors.generator_list())
    form = GenerateForm(request.POST or None, generators=generators,
                        initial={"base_model": request.GET.get("base_model")})
    if request.method == "POST" and form.is_valid():
        try:
            job = generations.request_generation(user=request.user, **form.service_arguments())
        except QuiverError as error:
            form.add_service_error(error)
        else:
            return redirect("frontend:job", job.id)
    return render(request, "frontend/generate.html", {"form": form, "generators": generators},
                  status=400 if form.errors else 200)


@login_required
@require_GET
def job_list(request):
    state = request.GET.get("state") if request.GET.get("state") in Job.State.values else None
    page = Paginator(selectors.job_list(request.user, state=state), PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "frontend/jobs.html", {"page": page, "state": state, "states": Job.State.choices})


@login_required
@require_http_methods(["GET", "POST"])
@not_found_as_404
def job_detail(request, job_id):
    """The job's progress and result; POST (its Cancel button) cancels it."""
    if request.method == "POST":
        try:
            job_services.cancel_job(user=request.user, job_id=job_id)
        except QuiverError as error:  # e.g. it finished meanwhile: the page says how it ended
            messages.info(request, error.message)
        return redirect("frontend:job", job_id)
    job = selectors.get_job(request.user, job_id)
    finished = job.state in Job.FINISHED_STATES
    merge_id = (job.result or {}).get("merge_id") if job.kind == Job.Kind.MERGE else None
    stored = selectors.find_merged_checkpoint(request.user, merge_id) if merge_id else None
    return render(request, "frontend/job.html", {"job": job, "finished": finished, "merge_id": merge_id,
                                                 "stored_merge": selectors.merge_retention(stored) if stored else None})


@login_required
@require_http_methods(["GET", "POST"])
def api_tokens(request):
    new_key = None
    if request.method == "POST":
        if "revoke" in request.POST:
            try:
                accounts.revoke_api_token(request.user, request.POST["revoke"])
            except NotFound as error:
                messages.error(request, error.message)
            else:
                messages.success(request, "The token was revoked.")
            return redirect("frontend:tokens")
        new_key = accounts.create_api_token(request.user)  # shown once, on this response only
    return render(request, "frontend/tokens.html", {"tokens": selectors.api_tokens(request.user), "new_key": new_key})
