"""The web hub in a real browser: Debian's Chromium driven by Playwright against a live
Django server on the test database, with a real Celery worker for the jobs.

Every test saves a screenshot of the page it checks under artifacts/screenshots/.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import ARTIFACTS, stored_state, wait_for_all_jobs, wait_for_job

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow,
              pytest.mark.timeout(1500)]  # the generate test may be the one that builds the small zoo

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
SCREENSHOTS = ARTIFACTS / "screenshots"
TIMEOUT_MS = 20_000
JOB_TIMEOUT_MS = 180_000  # a job waits for the one test worker


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with a fresh profile (Playwright's default: a temporary one per launch)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install -y chromium)")
    # Playwright's sync API runs an asyncio loop in this thread, which trips Django's
    # async-safety check on ORM calls made by the test itself (never by the server thread).
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            yield launched
            launched.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


def _new_page(browser, live_server, **options):
    context = browser.new_context(base_url=live_server.url, accept_downloads=True, **options)
    context.set_default_timeout(TIMEOUT_MS)
    return context, context.new_page()


@pytest.fixture
def page(browser, live_server):
    context, opened = _new_page(browser, live_server)
    yield opened
    context.close()


@pytest.fixture
def page_without_js(browser, live_server):
    context, opened = _new_page(browser, live_server, java_script_enabled=False)
    yield opened
    context.close()


def screenshot(page, request, suffix: str = "") -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{request.node.name}{suffix}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page, username: str) -> None:
    page.goto("/account/sign-in/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill("pw-" + username)  # tests.conftest.make_user's password
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("button", name=f"Sign out ({username})").wait_for()


def downloaded_sha256(page, link) -> tuple[str, Path]:
    with page.expect_download() as download_info:
        link.click()
    path = Path(download_info.value.path())
    return hashlib.sha256(path.read_bytes()).hexdigest(), path


def listed_names(page) -> list[str]:
    return page.locator(".result h2 a").all_inner_texts()


def test_search_then_adapter_page_with_its_plots_without_javascript(registry, page_without_js, request):
    from hub.models import Adapter

    page = page_without_js  # browse, search and download need no JavaScript
    page.goto("/")
    page.get_by_label("Describe the task").fill("summarise support tickets for the triage queue")
    page.get_by_role("button", name="Search", exact=True).click()

    first = page.locator(".result").first
    assert first.locator("h2 a").inner_text() == "quiver-demo/ticket-summarizer"
    assert re.search(r"Matched: description 0\.\d\d", first.locator(".matched").inner_text())
    first.locator("h2 a").click()

    assert page.get_by_role("heading", level=1).inner_text().startswith("quiver-demo/ticket-summarizer")
    spectrum = page.get_by_role("img", name=re.compile("Singular-value spectrum"))
    norms = page.get_by_role("img", name=re.compile("size of the weight update"))
    # The click returns once the new page commits; its images finish (or fail) before "load".
    page.wait_for_load_state("load")
    for image in (spectrum, norms):  # the SVG was served and decoded by the browser
        assert image.evaluate("img => img.complete && img.naturalWidth > 0")
    assert page.get_by_text("Provenance").count() == 0  # an uploaded adapter has none
    stored = Adapter.objects.get(name="ticket-summarizer").latest_revision.files.get(
        filename="adapter_model.safetensors")
    row = page.get_by_role("row", name=re.compile("adapter_model.safetensors"))
    assert stored.sha256 in row.inner_text()
    sha256, _ = downloaded_sha256(page, row.get_by_role("link", name="Download adapter_model.safetensors"))
    assert sha256 == stored.sha256
    screenshot(page, request)


def test_upload_a_real_peft_adapter_then_it_is_listed(celery_worker_process, demo_bases, demo_adapter, make_user,
                                                       page, request):
    entry = demo_adapter("sql-from-questions")
    make_user("alice")
    sign_in(page, "alice")
    page.goto("/upload/")
    page.get_by_label("Files").set_input_files([str(path) for path in entry["files"]])
    page.get_by_label(re.compile(r"^Name( |$)")).fill("warehouse-sql")
    page.get_by_label("Base model").select_option("quiver-demo/tiny-llama")
    page.get_by_label("Description").fill("Writes SQL for the **sales warehouse** from plain questions.")
    page.get_by_label("Tags").fill("sql, analytics")
    page.get_by_role("button", name="Upload").click()

    assert page.get_by_role("heading", level=1).inner_text().startswith("alice/warehouse-sql")
    assert page.locator(".model-card strong").inner_text() == "sales warehouse"  # the card is rendered Markdown
    assert page.get_by_role("row", name=re.compile("adapter_config.json")).count() == 1
    page.goto("/")
    assert "alice/warehouse-sql" in listed_names(page)
    screenshot(page, request)


def test_upload_a_pickle_shows_the_error_by_the_field_and_lists_nothing(celery_worker_process, demo_bases,
                                                                        demo_adapter, make_user, page, request,
                                                                        tmp_path):
    import torch

    entry = demo_adapter("ticket-summarizer")
    config, weights = (Path(path) for path in entry["files"])
    pickled = tmp_path / "adapter_model.bin"
    torch.save(load_file(weights), pickled)  # a real torch pickle of the same tensors
    make_user("alice")
    sign_in(page, "alice")
    before = stored_state()

    page.goto("/upload/")
    page.get_by_label("Files").set_input_files([str(config), str(pickled)])
    page.get_by_label(re.compile(r"^Name( |$)")).fill("pickled-tickets")
    page.get_by_label("Base model").select_option("quiver-demo/tiny-llama")
    page.get_by_role("button", name="Upload").click()

    files_field = page.locator(".field", has=page.get_by_label("Files"))
    error = files_field.get_by_role("alert")
    assert "pickle" in error.inner_text() and "refused" in error.inner_text()
    assert page.get_by_label("Files").get_attribute("aria-invalid") == "true"
    assert page.get_by_label(re.compile(r"^Name( |$)")).input_value() == "pickled-tickets"  # the form keeps what was typed
    after = stored_state()
    assert {k: after[k] for k in ("adapters", "revisions", "files", "blobs", "blob_files")} == \
           {k: before[k] for k in ("adapters", "revisions", "files", "blobs", "blob_files")}
    screenshot(page, request)
    page.goto("/")
    assert "alice/pickled-tickets" not in listed_names(page)


def test_compose_two_adapters_follow_the_job_then_download(registry, make_user, page, request):
    from hub.models import Adapter

    make_user("alice")
    sign_in(page, "alice")
    page.goto("/?base_model=quiver-demo/tiny-llama")
    page.get_by_label("Pick quiver-demo/ticket-summarizer").check()
    page.get_by_label("Pick quiver-demo/sql-from-questions").check()
    page.get_by_role("button", name="Compose selected").click()

    picked = {page.get_by_label("Adapter 1").input_value(), page.get_by_label("Adapter 2").input_value()}
    assert picked == {"quiver-demo/ticket-summarizer", "quiver-demo/sql-from-questions"}
    page.get_by_label("Weight 2").fill("-0.5")
    page.get_by_role("button", name="Add another adapter").click()  # left empty: empty rows are ignored
    assert page.get_by_label("Adapter 3").input_value() == "" and page.get_by_label("Weight 3").is_visible()
    page.get_by_label("Method").select_option("svd")
    page.get_by_text("Method parameters").click()
    page.get_by_label("Rank").fill("16")
    page.get_by_label("New adapter name").fill("tickets-minus-sql")
    screenshot(page, request, "-form")
    page.get_by_role("button", name="Start composing").click()

    assert re.search(r"/jobs/[0-9a-f-]{36}/$", page.url)
    page.locator("#job-state[data-state=succeeded]").wait_for(timeout=JOB_TIMEOUT_MS)  # the page follows the job
    assert page.locator("#job-progress").evaluate("bar => bar.value") == 1
    screenshot(page, request, "-job")
    page.get_by_role("link", name="alice/tickets-minus-sql").click()

    provenance = page.get_by_role("region", name="Provenance")
    assert "svd" in provenance.inner_text() and "quiver-demo/sql-from-questions" in provenance.inner_text()
    stored = Adapter.objects.get(name="tickets-minus-sql").latest_revision.files.get(
        filename="adapter_model.safetensors")
    sha256, path = downloaded_sha256(page, page.get_by_role("link", name="Download adapter_model.safetensors"))
    assert sha256 == stored.sha256 and load_file(path)  # real safetensors, the bytes the hub stored
    screenshot(page, request)


def test_merge_then_download_the_checkpoint(registry, make_user, page, request):
    make_user("alice")
    sign_in(page, "alice")
    page.goto("/adapters/quiver-demo/ticket-summarizer/")
    page.get_by_role("link", name="Merge into tiny-llama").click()
    assert page.get_by_label("Base model").input_value() == "quiver-demo/tiny-llama"
    assert page.get_by_label("Adapter 1").input_value() == "quiver-demo/ticket-summarizer"
    page.get_by_role("button", name="Start merging").click()

    page.locator("#job-state[data-state=succeeded]").wait_for(timeout=JOB_TIMEOUT_MS)
    row = page.get_by_role("row", name=re.compile("model.safetensors"))
    listed_sha256 = re.search(r"[0-9a-f]{64}", row.inner_text()).group(0)
    sha256, path = downloaded_sha256(page, row.get_by_role("link", name="Download model.safetensors"))
    assert sha256 == listed_sha256
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(path)
    assert "it is kept until" in page.locator(".job-result").inner_text()
    screenshot(page, request)

    # The job is in the Jobs list; the stored merge is on the merge page, where its maker removes it.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Jobs").click()
    page.get_by_role("row", name=re.compile("Merge succeeded 100%")).get_by_role("link", name="Merge").wait_for()
    screenshot(page, request, "-jobs")
    page.goto("/merge/")
    stored = page.get_by_role("row", name="quiver-demo/ticket-summarizer@1")
    assert "model.safetensors" in stored.inner_text()
    screenshot(page, request, "-stored")
    stored.get_by_role("button", name=re.compile("Remove the merge")).click()
    page.get_by_text("merging the same adapters again makes it again").wait_for()
    assert page.get_by_text("You have no stored merges.").is_visible()


def test_job_page_moves_its_progress_bar_live_and_shows_the_result(make_user, page, request):
    """The bar follows the Job row through the API without a reload; a finished job
    reloads into its result (the worker is stood in for by writes to the row)."""
    from hub.models import Job

    alice = make_user("alice")
    job = Job.objects.create(kind=Job.Kind.COMPOSE, owner=alice, state=Job.State.RUNNING, progress=0.25,
                             message="composing module 1/4")
    sign_in(page, "alice")
    page.goto(f"/jobs/{job.id}/")
    page.evaluate("window.notReloaded = true")
    assert page.locator("#job-progress").evaluate("bar => bar.value") == 0.25

    Job.objects.filter(id=job.id).update(progress=0.75, message="composing module 3/4")
    page.wait_for_function("document.getElementById('job-progress').value === 0.75")
    assert page.evaluate("window.notReloaded") is True and page.locator("#job-message").inner_text() == \
        "composing module 3/4"
    screenshot(page, request, "-running")

    Job.objects.filter(id=job.id).update(state=Job.State.SUCCEEDED, progress=1.0, message="done",
                                         result={"namespace": "alice", "name": "composed-x"})
    page.get_by_role("link", name="alice/composed-x").wait_for()
    screenshot(page, request)


def test_a_running_job_is_cancelled_from_its_page(make_user, page, request):
    """The Cancel button (a form with the CSRF token) cancels the job; the page then says so and
    stops following it (the worker is stood in for by the row, as above)."""
    from hub.models import Job

    job = Job.objects.create(kind=Job.Kind.MERGE, owner=make_user("alice"), state=Job.State.RUNNING, progress=0.4,
                             message="merged model.layers.3.mlp.up_proj.weight")
    sign_in(page, "alice")
    page.goto(f"/jobs/{job.id}/")
    page.get_by_role("button", name="Cancel the job").click()
    page.locator("#job-cancelled").wait_for()
    assert page.locator("#job-state").inner_text() == "cancelled"
    assert page.get_by_role("button", name="Cancel the job").count() == 0
    assert Job.objects.get(id=job.id).state == Job.State.CANCELLED
    screenshot(page, request)


def test_private_adapter_is_invisible_when_signed_out(registry, make_user, page, request):
    from hub.services.adapters import upload_adapter
    from hub.services.files import IncomingFile

    alice = make_user("alice")
    entry = next(e for e in registry["adapters"] if e["name"] == "recipe-steps-dora")
    upload_adapter(user=alice, namespace="alice", name="secret-recipes", base_model=entry["base_model"],
                   description="Private: numbered cooking steps from a list of ingredients.", visibility="private",
                   files=[IncomingFile.from_path(Path(path)) for path in entry["files"]])
    wait_for_all_jobs()

    page.goto("/")
    assert "quiver-demo/recipe-steps-dora" in listed_names(page)
    assert "alice/secret-recipes" not in listed_names(page)
    page.goto("/?q=numbered+cooking+steps+from+ingredients")
    assert "alice/secret-recipes" not in listed_names(page)
    response = page.goto("/adapters/alice/secret-recipes/")
    assert response.status == 404 and page.get_by_role("heading", name="Not found").is_visible()
    assert page.request.get("/api/v1/adapters/alice/secret-recipes/files/adapter_model.safetensors").status == 404
    screenshot(page, request)

    sign_in(page, "alice")
    page.goto("/?q=numbered+cooking+steps+from+ingredients")
    mine = page.locator(".result", has=page.get_by_role("link", name="alice/secret-recipes"))
    assert mine.locator(".badge.private").inner_text() == "private"
    screenshot(page, request, "-owner")


def test_generate_an_adapter_from_a_description_then_read_its_provenance(zoo_registry, make_user, page, request):
    from hub.models import Adapter
    from hub.services.generations import request_generator_training

    base = "zoo/minilm-task-classifier"
    for job in request_generator_training(user=zoo_registry, base_model=base, methods=["sg-lora"], steps=300,
                                          conjunctions=False):
        trained = wait_for_job(job.id, timeout=600)
        assert trained.state == "succeeded", trained.error
    make_user("alice")
    sign_in(page, "alice")
    page.get_by_role("link", name="Generate", exact=True).click()

    generators = page.get_by_role("region", name="Generators")
    assert re.search(r"zoo/minilm-task-classifier\s+sg-lora@v1\s+14\b", generators.inner_text())
    page.get_by_label("Describe the task").fill("Is this text a job title written in Polish?")
    page.get_by_label("Base model").select_option(base)
    page.get_by_role("radio", name=re.compile(r"^SG-LoRA: mixes the expert adapters")).check()
    screenshot(page, request, "-form")
    page.get_by_role("button", name="Generate").click()

    assert re.search(r"/jobs/[0-9a-f-]{36}/$", page.url)
    page.locator("#job-state[data-state=succeeded]").wait_for(timeout=JOB_TIMEOUT_MS)
    screenshot(page, request, "-job")
    page.locator("#result-link").click()

    generated = Adapter.objects.get(provenance__kind="generation")
    assert page.get_by_role("heading", level=1).inner_text().startswith(f"alice/{generated.name}")
    provenance = page.get_by_role("region", name="Provenance")
    text = provenance.inner_text()
    assert "sg-lora@v1" in text and "Is this text a job title written in Polish?" in text
    experts = [expert["adapter"] for expert in generated.provenance["experts"]]
    assert experts and all(name.startswith("zoo/") for name in experts)
    assert provenance.get_by_role("link").all_inner_texts() == experts  # every expert, linked, in order
    screenshot(page, request)
    provenance.get_by_role("link").first.click()
    assert page.get_by_role("heading", level=1).inner_text().startswith(experts[0])
