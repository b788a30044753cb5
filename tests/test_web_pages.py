"""Web pages through Django's test client: sign-in rules, API tokens, form errors
from the services shown beside their fields, job pages private to their owner."""
from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh_facets():
    """The browse facets are cached (in Redis, across tests) and forgotten when a write commits,
    which a test's rolled-back transaction never does: start each test from facets not yet counted."""
    from hub import selectors

    selectors.forget_adapter_facets()


def test_writing_pages_ask_to_sign_in_and_reading_pages_do_not(client):
    for path in ("/upload/", "/compose/", "/merge/", "/generate/", "/account/tokens/"):
        response = client.get(path)
        assert response.status_code == 302 and response["Location"] == f"/account/sign-in/?next={path}"
    assert client.get("/").status_code == 200
    assert client.get("/adapters/nobody/nothing/").status_code == 404


def test_api_tokens_page_creates_lists_and_revokes_tokens(client, make_user):
    from knox.models import AuthToken
    from rest_framework.test import APIClient

    client.force_login(make_user("alice"))
    created = client.post("/account/tokens/", {"create": "1"}).content.decode()
    key = re.search(r'id="new-token-key" type="text" readonly value="([^"]+)"', created).group(1)
    token = AuthToken.objects.get(user__username="alice")
    assert key.startswith(token.token_key)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION="Token " + key)
    job_url = "/api/v1/jobs/00000000-0000-0000-0000-000000000000/"
    assert api.get(job_url).status_code == 404  # signed in by the token: no such job

    listing = client.get("/account/tokens/").content.decode()
    assert token.token_key in listing and key not in listing  # the key is shown once, at creation
    assert client.post("/account/tokens/", {"revoke": token.token_key}).status_code == 302
    assert api.get(job_url).status_code == 401
    assert "revoked" in client.get("/account/tokens/").content.decode()


def test_compose_form_shows_the_services_error_by_the_adapter_list(client, make_user):
    client.force_login(make_user("alice"))
    response = client.post("/compose/", {"adapter_0": "quiver-demo/nope", "weight_0": "1", "adapter_1": "",
                                         "weight_1": "", "method": "linear", "visibility": "public"})
    assert response.status_code == 400
    html = response.content.decode()
    adapters_fieldset = html[html.index('<fieldset class="adapter-picks'):html.index("</fieldset>")]
    assert "No adapter quiver-demo/nope." in adapters_fieldset
    assert 'value="quiver-demo/nope"' in adapters_fieldset  # what was typed stays


def _field_errors(html: str, field: str) -> str:
    """The error list shown beside a form field (frontend/_field.html), '' when none."""
    found = re.search(rf'<ul class="errors" id="id_{field}_error"[^>]*>(.*?)</ul>', html, re.S)
    return found.group(1) if found else ""


def test_generate_form_shows_the_services_errors_by_their_fields_and_starts_nothing(client, make_user, demo_bases):
    from hub.models import Blob, GeneratorArtifact, Job

    # A trained sg-lora generator's row; its weights are never read, as every request here is refused.
    GeneratorArtifact.objects.create(
        base_model=demo_bases["quiver-demo/tiny-llama"], method="sg-lora", version=1, layout=[], experts=[],
        weights=Blob.objects.create(sha256="0" * 64, size=2048),
        curve=[{"step": 0, "train_loss": None, "validation_error": 0.5},
               {"step": 100, "train_loss": 0.1, "validation_error": 0.25}])
    client.force_login(make_user("alice"))
    page = client.get("/generate/").content.decode()
    select = page[page.index('<select name="base_model"'):page.index("</select>")]
    assert re.findall(r'<option value="([^"]+)"', select) == ["quiver-demo/tiny-llama"]  # only bases with a generator
    assert re.search(r"<td>sg-lora@v1</td>.*?<td>0.250</td>", page, re.S)  # the kept (best) validation error

    ok = {"description": "Summarise support tickets.", "base_model": "quiver-demo/tiny-llama", "method": "sg-lora",
          "k": "", "name": "", "visibility": "public"}
    response = client.post("/generate/", {**ok, "description": "   "})
    assert response.status_code == 400
    html = response.content.decode()
    assert "Describe the task the adapter should do." in _field_errors(html, "description")
    assert _field_errors(html, "base_model") == ""

    html = client.post("/generate/", {**ok, "method": "icm-lora"}).content.decode()
    assert "has no trained icm-lora generator yet" in _field_errors(html, "base_model")
    assert "Summarise support tickets." in html  # what was typed stays

    html = client.post("/generate/", {**ok, "k": "99"}).content.decode()
    assert "k must be an integer from 1 to 32" in _field_errors(html, "k")
    assert Job.objects.count() == 0


def test_a_job_page_is_private_to_its_owner(client, make_user):
    from hub.models import Job

    job = Job.objects.create(kind=Job.Kind.MERGE, owner=make_user("alice"))
    client.force_login(make_user("bob"))
    assert client.get(f"/jobs/{job.id}/").status_code == 404


def test_a_job_page_cancels_its_job_and_then_says_so(client, make_user):
    from hub.models import Job

    job = Job.objects.create(kind=Job.Kind.MERGE, owner=make_user("alice"))
    client.force_login(Job.objects.get(id=job.id).owner)
    assert 'id="cancel-job"' in client.get(f"/jobs/{job.id}/").content.decode()
    response = client.post(f"/jobs/{job.id}/")
    assert response.status_code == 302 and response["Location"] == f"/jobs/{job.id}/"
    page = client.get(f"/jobs/{job.id}/").content.decode()
    assert Job.objects.get(id=job.id).state == Job.State.CANCELLED
    assert "The job was cancelled." in page and 'id="cancel-job"' not in page and "http-equiv=\"refresh\"" not in page
    again = client.post(f"/jobs/{job.id}/", follow=True).content.decode()  # e.g. a second tab
    assert "has already ended (cancelled); there is nothing to cancel" in again


def test_the_jobs_page_lists_your_jobs_with_links_and_filters_by_state(client, make_user):
    from hub.models import Job

    alice = make_user("alice")
    done = Job.objects.create(kind=Job.Kind.MERGE, owner=alice, state=Job.State.SUCCEEDED, progress=1.0,
                              message="reused a stored merge")
    queued = Job.objects.create(kind=Job.Kind.GENERATE, owner=alice)
    others = Job.objects.create(kind=Job.Kind.COMPOSE, owner=make_user("bob"))
    assert client.get("/jobs/").status_code == 302  # sign in first
    client.force_login(alice)
    page = client.get("/jobs/").content.decode()
    assert 'href="/jobs/"' in page  # in the navigation
    assert page.index(f'href="/jobs/{queued.id}/"') < page.index(f'href="/jobs/{done.id}/"')  # newest first
    assert str(others.id) not in page and "reused a stored merge" in page
    succeeded = client.get("/jobs/?state=succeeded").content.decode()
    assert f"/jobs/{done.id}/" in succeeded and f"/jobs/{queued.id}/" not in succeeded
    assert "No failed jobs." in client.get("/jobs/?state=failed").content.decode()
    assert f"/jobs/{queued.id}/" in client.get("/jobs/?state=nonsense").content.decode()  # an unknown state: no filter


def test_model_cards_render_markdown_but_never_raw_html_or_script_links():
    from frontend.templatetags.quiver import markdown

    html = markdown("# Card\n\n<script>alert(1)</script> **bold** [x](javascript:alert(1)) [ok](https://example.org)")
    assert "<h1>Card</h1>" in html and "<strong>bold</strong>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'href="javascript:' not in html and 'href="https://example.org"' in html


def test_browse_filters_sorts_and_pages_without_javascript(client, demo_bases, demo_adapter, monkeypatch):
    from pathlib import Path

    from frontend import views
    from hub.services.adapters import upload_adapter
    from hub.services.files import IncomingFile

    owner = demo_bases["quiver-demo/tiny-llama"].owner
    for name in ("watercolor-style-kohya", "ticket-summarizer", "pixel-art-diffusers"):
        entry = demo_adapter(name)
        upload_adapter(user=owner, namespace="quiver-demo", name=name, base_model=entry["base_model"],
                       tags=entry["tags"], license=entry["license"],
                       files=[IncomingFile.from_path(Path(path)) for path in entry["files"]])
    monkeypatch.setattr(views, "PAGE_SIZE", 2)

    def names(html: str) -> list[str]:
        return re.findall(r'<h2><a href="/adapters/quiver-demo/([^/]+)/">', html)

    first = client.get("/", {"sort": "name"}).content.decode()
    assert names(first) == ["pixel-art-diffusers", "ticket-summarizer"]
    assert 'href="?sort=name&amp;page=2"' in first
    assert names(client.get("/", {"sort": "name", "page": 2}).content.decode()) == ["watercolor-style-kohya"]
    assert names(client.get("/", {"format": "kohya"}).content.decode()) == ["watercolor-style-kohya"]
    assert names(client.get("/", {"base_model": "quiver-demo/tiny-llama"}).content.decode()) == ["ticket-summarizer"]
    assert names(client.get("/", {"tag": "style", "license": "openrail", "sort": "name"}).content.decode()) == [
        "pixel-art-diffusers", "watercolor-style-kohya"]
    options = client.get("/").content.decode()
    assert '<option value="kohya">kohya</option>' in options and '<option value="openrail">openrail</option>' in options


def test_browse_facets_are_kept_until_an_adapter_is_written(demo_bases, demo_adapter, django_assert_num_queries,
                                                           django_capture_on_commit_callbacks):
    """The facets (formats, licenses, top tags) read every visible adapter, so the browse page keeps
    them in the cache (real Redis) per visibility scope, and a committed write of an adapter renews them."""
    from pathlib import Path

    from hub import selectors
    from hub.services import adapters
    from hub.services.files import IncomingFile

    def committed(write, **arguments):  # the test's transaction never commits: run what would follow
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            result = write(user=owner, **arguments)
        assert callbacks
        return result

    def update_adapter(**arguments):
        return committed(adapters.update_adapter, **arguments)

    def delete_adapter(**arguments):
        return committed(adapters.delete_adapter, **arguments)

    owner = demo_bases["quiver-demo/tiny-llama"].owner
    entry = demo_adapter("watercolor-style-kohya")
    empty = {"formats": [], "licenses": [], "tags": []}
    assert selectors.adapter_facets(None) == empty
    with django_capture_on_commit_callbacks(execute=False) as pending:
        adapter = adapters.upload_adapter(user=owner, namespace="quiver-demo", name="watercolor-style-kohya",
                                          base_model=entry["base_model"], tags=["style"], license="openrail",
                                          files=[IncomingFile.from_path(Path(path)) for path in entry["files"]]).adapter
    assert selectors.adapter_facets(None) == empty  # forgotten when the upload commits, not before
    for callback in pending:
        callback()
    facets = selectors.adapter_facets(None)
    assert facets == {"formats": ["kohya"], "licenses": ["openrail"], "tags": ["style"]}
    with django_assert_num_queries(0):  # kept: no SQL at all
        assert selectors.adapter_facets(None) == facets
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        adapter.save(update_fields=["description"])  # not a field the facets are counted from
    assert not callbacks
    with django_assert_num_queries(0):
        assert selectors.adapter_facets(None) == facets

    update_adapter(adapter=adapter, license="mit", tags=["pixel", "style"])
    assert selectors.adapter_facets(None) == {"formats": ["kohya"], "licenses": ["mit"], "tags": ["pixel", "style"]}
    update_adapter(adapter=adapter, visibility="private")
    assert selectors.adapter_facets(None) == empty  # anonymous scope
    assert selectors.adapter_facets(owner)["licenses"] == ["mit"]  # the owner's own scope
    delete_adapter(adapter=adapter)
    assert selectors.adapter_facets(owner) == empty


def plan_nodes(queryset, *settings_off: str) -> list[dict]:
    """Every node of PostgreSQL's plan for `queryset`, with the named planner methods priced out."""
    import json

    from django.db import connection, transaction

    sql, params = queryset.query.sql_with_params()
    with transaction.atomic(), connection.cursor() as cursor:
        for setting in settings_off:
            cursor.execute(f"SET LOCAL {setting} = off")
        cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
        plan = cursor.fetchone()[0]
    plan = json.loads(plan) if isinstance(plan, str) else plan

    def nodes(node):
        yield node
        for child in node.get("Plans", []):
            yield from nodes(child)

    return list(nodes(plan[0]["Plan"]))


def test_every_adapter_list_order_reads_an_index_not_a_sort(make_user):
    """A page of the adapter list at any order (every one the selector offers, so a new order
    needs its index) is a range of an index (0009_adapter_list_orders): with sorting priced out,
    PostgreSQL's plan has no Sort of the adapters (at 100 000 adapters a sort of them all took
    85 ms per page)."""
    from hub import selectors

    sorting = {}
    for user in (None, make_user("carol")):
        for sort in selectors.ADAPTER_SORTS:
            kinds = [node["Node Type"] for node in plan_nodes(selectors.adapter_list(user, sort=sort)[:20], "enable_sort")]
            if "Sort" in kinds:
                sorting[(sort, "anonymous" if user is None else "signed in")] = kinds
    assert not sorting


@pytest.mark.parametrize("filters, column", [({"format": "kohya"}, "format"), ({"license": "LICENSE-3"}, "upper"),
                                             ({"tag": "tag-7"}, "tags"), ({"base_model": "quiver-demo/tiny-llama"}, "base_model_id")])
def test_every_adapter_list_filter_has_an_index(filters, column, make_user, demo_bases):
    """What a filtered page counts is found through an index on the filtered column (an index
    condition), not by reading every adapter and filtering (a sequential scan of 100 000 adapters
    took 45 ms)."""
    from django.db import connection

    from hub import selectors
    from hub.models import Adapter

    # A registry the planner can weigh (an empty table's estimates favour any index): 2 000 rows
    # over 4 formats, 20 licenses, 50 tags and one base model in 40, analysed.
    owner = make_user("registry")
    Adapter.objects.bulk_create([
        Adapter(owner=owner, namespace="bulk", name=f"a{i}", format=["peft", "kohya", "diffusers", "other"][i % 4],
                license=f"license-{i % 20}", tags=[f"tag-{i % 50}"], peft_type="LORA", rank=8, alpha=16,
                dtype="float32", parameter_count=i, base_model=demo_bases["quiver-demo/tiny-llama"] if i % 40 == 0 else None)
        for i in range(2000)])
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE hub_adapter")
    adapters = selectors.adapter_list(None, **filters).order_by().values("id")
    conditions = [node.get("Index Cond", "") for node in plan_nodes(adapters, "enable_seqscan")]
    assert any(column in condition for condition in conditions), (filters, conditions)
