"""Search at registry scale: REST latency of /api/v1/search and HNSW recall@10.

Fills its own database (quiver_bench_search; the developer's registry is untouched) with
N adapters whose description and weight vectors cluster around ~2 000 embedded synthetic task
descriptions, then measures in the same run:
  REST   GET /api/v1/search?q=&k=10 through gunicorn (2 workers × 1 thread), anonymous, one
         request at a time, queries held out from the stored descriptions: p50/p95, query
         embedding in the web process included. Two passes of distinct queries: a hub without a
         trained weight encoder (description and keyword rankings) and one with it (the weights
         ranking too, a second HNSW scan: the stored weight vectors are labelled with a stand-in
         EncoderArtifact that the benchmark turns on). The headline is the second, whole search;
  recall HNSW top-10 at the app's breadth for each ranking (hub.search.hnsw_ef_search), with
         the app's query vectors (bfloat16 layers where the CPU has them,
         hub.services.embeddings.embed_query) against an exact
         scan (index scans off) with the same vectors, both limited to public adapters as for
         an anonymous user, for each vector ranking (the headline: the lower of the two); the
         exact description scan's p95 is the baseline it replaces. Details add each ranking's
         ef_search sweep with float32 query vectors, and how much of the float32 exact top-10
         the app's vectors find (bfloat16 moves near-ties).
Before measuring, the server is brought to the state of a hub that has been serving: the table
read once and 1 000 HNSW scans of other queries (the embedded server's buffer pool holds the
graph; hub/embedded.py sizes it), as a PostgreSQL restarted a second ago is not what users meet.
Prints JSON lines, first the headline:
{"bench": "search", "n", "p50_ms", "p95_ms", "recall_at_10", "exact_p95_ms"}
then one "search_rest" line per REST pass (with the web workers' and PostgreSQL's CPU per search,
which other load on a shared machine disturbs less than wall time), details, an ef_search sweep, a per-stage breakdown, and a check of
the query encoder's precision (stored task descriptions, phrased as searches, must find
themselves among all TASK_COUNT as often with the app's query vectors as with float32 ones).
Goals: p95 ≤ 25 ms, recall@10 ≥ 0.98.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import secrets
import time

import numpy as np
import psycopg
import requests

from _server import bench_database_url, django_setup, gunicorn

BENCH_DB = "quiver_bench_search"
DATA_VERSION = 5  # bump when the generator or the indexes change: the marker then no longer matches and the table is refilled
TASK_COUNT = 2000
WARMUP, QUERIES, RECALL_QUERIES, BREAKDOWN_QUERIES = 20, 300, 200, 100
WARM_SEARCHES = 1000  # HNSW scans that bring the buffer pool to a serving hub's state first
EF_SWEEP = (40, 100, 150, 200, 250, 300, 400)
DESCRIPTION_HNSW = "adapter_description_hnsw"
WEIGHT_HNSW = "adapter_weight_hnsw"
# The stand-in trained weight encoder the stored weight vectors are labelled with: an
# EncoderArtifact row (no file behind its blob; nothing here loads it) that the benchmark turns on
# for the REST pass with the weights ranking, as a hub whose encoder has been trained runs it.
BENCH_ENCODER_SHA256 = hashlib.sha256(b"benchmarks/search.py stand-in weight encoder").hexdigest()

DOMAINS = ["legal", "medical", "financial", "e-commerce", "customer support", "scientific", "news", "insurance",
           "gaming", "education", "real estate", "travel", "cybersecurity", "agriculture", "automotive", "retail",
           "HR", "biotech", "energy", "logistics"]
DOCUMENTS = ["contracts", "emails", "reports", "support tickets", "research papers", "chat logs", "invoices",
             "product pages", "meeting notes", "forum posts", "patents", "call transcripts"]
TONES = ["formal", "casual", "playful", "concise", "persuasive", "empathetic", "technical"]
STYLES = ["watercolor", "pixel-art", "photorealistic", "anime", "oil-painting", "low-poly"]
ISSUES = ["fraud", "toxicity", "personal data", "spam", "compliance violations", "hallucinations"]
TEMPLATES = [
    "Summarize {domain} {doc} about how to {bs}",
    "Classify the sentiment of {domain} {doc} that mention a {noun}",
    "Translate {domain} {doc} from {lang} to {lang2}",
    "Extract {noun} and {noun2} entities from {domain} {doc}",
    "Answer questions about {domain} {doc} for a {job}",
    "Write {tone} marketing copy for a company that wants to {bs}",
    "Generate {color} {style} images of a {noun} in a {noun2} setting",
    "Chat as a {job} who explains {domain} topics in a {tone} way",
    "Turn natural-language questions about {noun} into SQL over {domain} data",
    "Detect {issue} in {domain} {doc}",
    "Rewrite {domain} {doc} in a {tone} tone for a {job}",
    "Write Python code that helps a {job} {bs}",
]
QUERY_PHRASES = ["{}", "I need an adapter to {}", "looking for a LoRA that can {}", "a model that can {}"]


# --- data -----------------------------------------------------------------------------------

def task_texts(seed: int, count: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Distinct task descriptions: templates filled with seeded Faker words."""
    from faker import Faker

    fake, rng = Faker("en_US"), random.Random(seed)
    fake.seed_instance(seed)
    texts: list[str] = []
    seen = set(exclude)
    while len(texts) < count:
        text = rng.choice(TEMPLATES).format(
            domain=rng.choice(DOMAINS), doc=rng.choice(DOCUMENTS), tone=rng.choice(TONES),
            style=rng.choice(STYLES), issue=rng.choice(ISSUES), bs=fake.bs(), job=fake.job().lower(),
            noun=fake.word(part_of_speech="noun"), noun2=fake.word(part_of_speech="noun"),
            lang=fake.language_name(), lang2=fake.language_name(), color=fake.color_name().lower())
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def query_texts(seed: int, count: int, tasks: list[str]) -> list[str]:
    """Held-out queries: new tasks from the same templates (never one of the stored ones), phrased as a search."""
    rng = random.Random(seed)
    return [rng.choice(QUERY_PHRASES).format(text[0].lower() + text[1:])
            for text in task_texts(seed, count, exclude=frozenset(tasks))]


def mix(rng: np.random.Generator, centers: np.ndarray, primary: np.ndarray, weight: np.ndarray,
        secondary: np.ndarray, noise: float) -> np.ndarray:
    """Convex mix of two centers per row plus Gaussian noise, L2-normalised."""
    vectors = weight[:, None] * centers[primary] + (1 - weight)[:, None] * centers[secondary]
    vectors += noise * rng.standard_normal(vectors.shape, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def adapter_rows(n: int, seed: int, tasks: list[str], centers: np.ndarray, owner_id: int):
    """COPY rows for hub_adapter: half the descriptions cover one task, half blend two."""
    from django.utils import timezone

    from hub.services.embeddings import TEXT_ENCODER_LABEL

    rng = np.random.default_rng(seed)
    primary = rng.integers(len(tasks), size=n)
    secondary = rng.integers(len(tasks), size=n)
    single = rng.random(n) < 0.5
    description_weight = np.where(single, 1.0, rng.uniform(0.5, 0.9, n)).astype(np.float32)
    descriptions = mix(rng, centers, primary, description_weight, secondary, noise=0.015)
    # Weights relate to the task less tightly than the text: another partner task, more noise.
    weights = mix(rng, centers, primary, rng.uniform(0.3, 0.8, n).astype(np.float32),
                  rng.integers(len(tasks), size=n), noise=0.03)
    private = rng.random(n) < 0.1
    parameter_count = rng.integers(100_000, 50_000_000, size=n)
    # Names like "summarize-legal-123": task words, as people name adapters; a token shared by
    # every name (say "adapter-123") would make each keyword query match the whole table.
    slugs = ["-".join(re.findall(r"[a-z]+", task.lower())[:2]) for task in tasks]
    now = timezone.now()
    for i in range(n):
        text = tasks[primary[i]] if single[i] else f"{tasks[primary[i]]}. Also: {tasks[secondary[i]].lower()}"
        visibility = "private" if private[i] else "public"
        yield (owner_id, f"team-{i % 500}", f"{slugs[primary[i]]}-{i}", text, [], "", visibility, "peft", "LORA",
               8, 16.0, False, False, [], {}, "float32", int(parameter_count[i]), {},
               descriptions[i], TEXT_ENCODER_LABEL, weights[i], bench_weight_label(), now, now)


COPY_COLUMNS = [
    ("owner_id", "int4"), ("namespace", "varchar"), ("name", "varchar"), ("description", "text"),
    ("tags", "varchar[]"), ("license", "varchar"), ("visibility", "varchar"), ("format", "varchar"),
    ("peft_type", "varchar"), ("rank", "int4"), ("alpha", "float8"), ("use_rslora", "bool"), ("use_dora", "bool"),
    ("target_modules", "varchar[]"), ("module_shapes", "jsonb"), ("dtype", "varchar"), ("parameter_count", "int8"),
    ("provenance", "jsonb"), ("description_embedding", "vector"), ("description_encoder", "varchar"),
    ("weight_embedding", "vector"), ("weight_encoder", "varchar"), ("created_at", "timestamptz"),
    ("updated_at", "timestamptz"),
]


def bench_weight_label() -> str:
    from generation.weight_encoder import ENCODER_VERSION

    return f"{ENCODER_VERSION}@{BENCH_ENCODER_SHA256[:12]}"


def set_weights_ranking(active: bool) -> None:
    """Turn the stand-in trained encoder on or off: with it on, every search also ranks by the weight
    vectors (the active encoder's label is read inside the search statement, so the web workers
    follow at once)."""
    from generation.weight_encoder import ENCODER_VERSION
    from hub.models import Blob, EncoderArtifact

    Blob.objects.get_or_create(sha256=BENCH_ENCODER_SHA256, defaults={"size": 0})
    EncoderArtifact.objects.update_or_create(version=ENCODER_VERSION, weights_id=BENCH_ENCODER_SHA256,
                                             defaults={"config": {"benchmark": "search"}, "active": active})
    if bench_weight_label() != EncoderArtifact.objects.get(weights_id=BENCH_ENCODER_SHA256).label:
        raise RuntimeError("the stored weight vectors' label is not the stand-in encoder's")


def hnsw_indexes():
    from pgvector.django import HnswIndex

    from hub.models import Adapter

    return [index for index in Adapter._meta.indexes if isinstance(index, HnswIndex)]


def fill(url: str, n: int, seed: int) -> dict:
    """Replace the adapters with N synthetic ones: drop HNSW, COPY, rebuild HNSW (a bulk build
    is far faster than N incremental inserts). Returns timings."""
    from django.contrib.auth import get_user_model
    from django.db import connection
    from pgvector.psycopg import register_vector

    from generation.text_encoder import embed_texts
    from hub.models import Adapter

    start = time.perf_counter()
    tasks = task_texts(seed, TASK_COUNT)
    centers = embed_texts(tasks).numpy()
    embed_s = time.perf_counter() - start
    owner, _ = get_user_model().objects.get_or_create(username="bench")
    with connection.schema_editor() as editor:
        for index in hnsw_indexes():
            editor.remove_index(Adapter, index)
    start = time.perf_counter()
    with psycopg.connect(url) as conn:
        register_vector(conn)
        conn.execute("TRUNCATE hub_adapter CASCADE")
        columns = ", ".join(name for name, _ in COPY_COLUMNS)
        with conn.cursor().copy(f"COPY hub_adapter ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types([kind for _, kind in COPY_COLUMNS])
            for row in adapter_rows(n, seed, tasks, centers, owner.id):
                copy.write_row(row)
    copy_s = time.perf_counter() - start
    build_s = {}
    with connection.cursor() as cursor:
        cursor.execute("SET maintenance_work_mem = '1GB'")  # the whole graph in memory: no slow spill phase
    for index in hnsw_indexes():
        start = time.perf_counter()
        with connection.schema_editor() as editor:
            editor.add_index(Adapter, index)
        build_s[index.name] = round(time.perf_counter() - start, 1)
    with connection.cursor() as cursor:
        cursor.execute("RESET maintenance_work_mem")
        # VACUUM, not only ANALYZE: a table just filled by COPY is one autovacuum will visit
        # (hint bits, visibility map, TOAST), and it did so during the REST passes of the run that
        # filled it (loadavg 2.45, PostgreSQL CPU 13.0 against 7.1 ms per search, p95 +8.6 ms).
        cursor.execute("VACUUM (ANALYZE) hub_adapter")
    return {"task_embed_s": round(embed_s, 1), "copy_s": round(copy_s, 1), "index_build_s": build_s}


def marker(n: int, seed: int) -> dict:
    return {"n": n, "seed": seed, "version": DATA_VERSION}


def stored_marker() -> dict | None:
    """The marker kept as the table's comment: it lives and dies with the data it describes."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT obj_description('hub_adapter'::regclass, 'pg_class')")
        comment = cursor.fetchone()[0]
        cursor.execute("SELECT count(*) FROM hub_adapter")
        rows = cursor.fetchone()[0]
        cursor.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'hub_adapter' AND indexname = ANY(%s)",
                       [[index.name for index in hnsw_indexes()]])
        indexes = cursor.fetchone()[0]
    if not comment or indexes != len(hnsw_indexes()):
        return None
    stored = json.loads(comment)
    return stored if stored.get("n") == rows else None


def ensure_data(url: str, n: int, seed: int) -> dict:
    from django.db import connection

    stored = stored_marker()
    if stored and {key: stored.get(key) for key in ("n", "seed", "version")} == marker(n, seed):
        return {**stored, "reused": True}
    timings = fill(url, n, seed)
    record = {**marker(n, seed), **timings}
    with connection.cursor() as cursor:
        cursor.execute("COMMENT ON TABLE hub_adapter IS %s", [json.dumps(record)])
    return {**record, "reused": False}


# --- measurements ---------------------------------------------------------------------------

def ms(samples: list[float], q: float) -> float:
    return round(float(np.percentile(samples, q)) * 1000, 2)


def rest_latencies(url: str, warmup: list[str], queries: list[str]) -> list[float]:
    """Seconds per anonymous GET /api/v1/search, one at a time (warm-up loads the encoder in each worker)."""
    def get(session: requests.Session, query: str) -> float:
        start = time.perf_counter()
        response = session.get(url + "/api/v1/search", params={"q": query, "k": 10}, timeout=120)
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        if not response.json()["results"]:
            raise RuntimeError(f"no results for {query!r}")
        return elapsed

    with requests.Session() as session:
        for query in warmup:
            get(session, query)
        return [get(session, query) for query in queries]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds these processes have used (Linux /proc)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # exited
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def serving_processes() -> tuple[list[int], list[int]]:
    """(gunicorn workers started by this process, the PostgreSQL backends of other connections to
    the bench database): the CPU a search costs is theirs. On a machine shared with other work,
    CPU per request is the figure that other load disturbs least (wall time counts waiting too).
    PostgreSQL 18's I/O worker processes, which read pages for every backend, are not counted."""
    from django.db import connection

    def command_line(pid: int) -> bytes:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read()

    masters = [pid for pid in child_pids(os.getpid()) if b"gunicorn" in command_line(pid)]
    workers = [worker for master in masters for worker in child_pids(master)]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        backends = [pid for (pid,) in cursor.fetchall()]
    return workers, backends


def nearest_ids(vector: list[float], *, exact: bool, limit: int = 10, ranking: str = "description",
                ef_search: int | None = None) -> tuple[list[int], float, bool]:
    """The app's description (or weights) ranking for an anonymous user (hub.search._nearest, same
    scope, at the HNSW breadth the app's search gives that ranking unless `ef_search` says another);
    exact=True forbids index scans. Also says whether PostgreSQL scanned the HNSW index: the
    planner may prefer a sequential scan, and recall must not hide that."""
    from django.db import connection, transaction

    from hub.search import _nearest, hnsw_ef_search
    from hub.selectors import adapter_list
    from hub.services.embeddings import TEXT_ENCODER_LABEL

    scope = adapter_list(None).order_by()
    column, index, encoder_filter = {
        "description": ("description_embedding", DESCRIPTION_HNSW, {"description_encoder": TEXT_ENCODER_LABEL}),
        "weights": ("weight_embedding", WEIGHT_HNSW, {"weight_encoder": bench_weight_label()}),
    }[ranking]

    def hnsw_scans(cursor) -> int:
        # Counted since the statistics were last flushed, which may be a few transactions ago:
        # compare before and after.
        cursor.execute("SELECT pg_stat_get_xact_numscans(%s::regclass)", [index])
        return cursor.fetchone()[0]

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL hnsw.ef_search = %s", [ef_search or hnsw_ef_search((ranking,))])
        if exact:
            cursor.execute("SET LOCAL enable_indexscan = off")
        scans_before = hnsw_scans(cursor)
        start = time.perf_counter()
        rows = _nearest(scope, column, vector, limit, **encoder_filter)
        seconds = time.perf_counter() - start
        used_hnsw = hnsw_scans(cursor) > scans_before
    if exact and used_hnsw:
        raise RuntimeError("the exact scan used the HNSW index")
    return [adapter_id for adapter_id, _ in rows], seconds, used_hnsw


def warm_buffer_pool(tasks: list[str], seed: int, count: int = WARM_SEARCHES) -> dict:
    """Bring PostgreSQL to the state of a hub that has been serving searches: the adapter table
    read once and `count` HNSW scans with queries of their own (none of them is measured later),
    so the latencies below are not those of pages read back from the kernel after a restart.
    Reports how long that took and what a search statement costs at its start and its end."""
    from django.db import connection

    from generation.text_encoder import embed_texts

    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM hub_adapter")
    vectors = [vector.tolist() for vector in embed_texts(query_texts(seed, count, tasks))]
    seconds = [nearest_ids(vector, exact=False)[1] for vector in vectors]
    for vector in vectors:  # the weights ranking's graph too
        nearest_ids(vector, exact=False, ranking="weights")
    tenth = max(len(seconds) // 10, 1)
    return {"warm_searches": count, "warm_s": round(time.perf_counter() - started, 1),
            "warm_first_tenth_sql_p50_ms": ms(seconds[:tenth], 50), "warm_last_tenth_sql_p50_ms": ms(seconds[-tenth:], 50)}


def recall(found: list[tuple], truth: list[tuple]) -> float:
    """Mean share of each exact top-10 that the HNSW top-10 found (rows of nearest_ids)."""
    return round(float(np.mean([len(set(ids) & set(exact)) / len(exact) for (ids, _, _), (exact, _, _) in
                                zip(found, truth)])), 4)


def recall_sweep(vectors: list[list[float]], app_vectors: list[list[float]]) -> tuple[dict, dict[tuple, dict]]:
    """For each vector ranking, exact top-10 once, then HNSW top-10 at each ef_search: recall@10
    and SQL-level latency (float32 query vectors), keyed by (ranking, ef_search). Then the app's
    query vectors at the app's breadths: HNSW against an exact scan with the same vectors (the
    index's recall, the headline), and the app's HNSW and exact top-10 against the float32 exact
    top-10 (what the query precision changes, among near-ties)."""
    from hub.search import hnsw_ef_search

    sweep = {}
    for ranking in ("description", "weights"):
        truth = [nearest_ids(vector, exact=True, ranking=ranking) for vector in vectors]
        if ranking == "description":
            exact = truth
        for ef in sorted({*EF_SWEEP, hnsw_ef_search((ranking,))}):
            hnsw = [nearest_ids(vector, exact=False, ranking=ranking, ef_search=ef) for vector in vectors]
            sweep[ranking, ef] = {"recall_at_10": recall(hnsw, truth), "hnsw_p50_ms": ms([s for _, s, _ in hnsw], 50),
                                  "hnsw_p95_ms": ms([s for _, s, _ in hnsw], 95),
                                  "hnsw_plan_share": round(float(np.mean([used for _, _, used in hnsw])), 3)}
    exact_stats = {"exact_p50_ms": ms([s for _, s, _ in exact], 50), "exact_p95_ms": ms([s for _, s, _ in exact], 95)}
    app_exact = [nearest_ids(vector, exact=True) for vector in app_vectors]
    app_hnsw = [nearest_ids(vector, exact=False) for vector in app_vectors]
    exact_stats.update(app_query_recall_at_10=recall(app_hnsw, app_exact),
                       app_hnsw_vs_float32_exact_at_10=recall(app_hnsw, exact),
                       app_exact_vs_float32_exact_at_10=recall(app_exact, exact))
    # The weights ranking's HNSW scan, with the same app query vectors and settings.
    weights_exact = [nearest_ids(vector, exact=True, ranking="weights") for vector in app_vectors]
    weights_hnsw = [nearest_ids(vector, exact=False, ranking="weights") for vector in app_vectors]
    exact_stats.update(weights_recall_at_10=recall(weights_hnsw, weights_exact),
                       weights_exact_p95_ms=ms([s for _, s, _ in weights_exact], 95),
                       weights_hnsw_plan_share=round(float(np.mean([used for _, _, used in weights_hnsw])), 3))
    return exact_stats, sweep


def query_precision_check(tasks: list[str], seed: int, count: int = 1000) -> dict:
    """Does the app's query precision find what float32 finds? Each of `count` stored task
    descriptions, phrased as a search ("I need an adapter to …"), queries the float32 embeddings
    of all TASK_COUNT descriptions; recall@1/@5 of its own description, for the app's query
    vectors and for float32 ones (embedded one at a time, as searches are)."""
    import torch
    from django.conf import settings

    from generation.text_encoder import embed_query, embed_texts

    rng = random.Random(seed)
    picked = rng.sample(range(len(tasks)), min(count, len(tasks)))
    stored = embed_texts(tasks)
    phrased = [rng.choice(QUERY_PHRASES).format(tasks[i][0].lower() + tasks[i][1:]) for i in picked]
    result = {}
    for label, precision in (("app", settings.QUIVER_QUERY_PRECISION), ("float32", "float32")):
        queries = torch.stack([embed_query(text, precision) for text in phrased])
        top = (queries @ stored.T).topk(5, dim=1).indices
        truth = torch.tensor(picked).unsqueeze(1)
        result[f"{label}_recall_at_1"] = round(float((top[:, :1] == truth).any(1).float().mean()), 4)
        result[f"{label}_recall_at_5"] = round(float((top == truth).any(1).float().mean()), 4)
    return {"queries": len(picked), "stored": len(tasks), **result}


def stage_timings(queries: list[str]) -> dict:
    """Where a search request's time goes: the stages of the API's search (k=10: 40
    candidates per ranking), timed one by one in this process with the web workers' torch threads."""
    import torch
    from django.contrib.auth.models import AnonymousUser
    from django.test import RequestFactory

    from api.serializers import search_results
    from hub.ranking import fuse
    from hub.search import RANKINGS, rankings_statement
    from hub.selectors import adapter_listings
    from hub.services.embeddings import _query_vector, embed_query

    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("QUIVER_WEB_TORCH_THREADS", 1)))  # as hub/wsgi.py sets it
    request = RequestFactory().get("/api/v1/search")
    request.user = AnonymousUser()
    stages: dict[str, list[float]] = {"embed": [], "rankings_sql": [], "fetch": [], "serialize": []}

    def timed(stage: str, call):
        start = time.perf_counter()
        result = call()
        stages[stage].append(time.perf_counter() - start)
        return result

    for query in queries:
        _query_vector.cache_clear()  # these queries were embedded for the recall figures: time the encoder
        vector = timed("embed", lambda: embed_query(query))
        rows = timed("rankings_sql", lambda: rankings_statement(None, limit=40, modes=RANKINGS).rows(query, vector))
        rankings: dict[str, list[tuple[int, float]]] = {}
        for ranking, adapter_id, value in rows:
            rankings.setdefault(ranking, []).append((adapter_id, value))
        fused = fuse(rankings, 10)
        listings = timed("fetch", lambda: adapter_listings(None, [adapter_id for adapter_id, _, _ in fused]))
        timed("serialize", lambda: search_results(fused, listings, request))
    torch.set_num_threads(threads)
    return {f"{stage}_{label}_ms": ms(samples, q) for stage, samples in stages.items()
            for label, q in (("p50", 50), ("p95", 95))}


# --- main -----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()

    os.environ.setdefault("QUIVER_REDIS_DB", "3")  # read when hub.embedded is imported
    url = bench_database_url(BENCH_DB)
    os.environ["DATABASE_URL"] = url  # assigned, not defaulted: never the developer's database
    # Settings demand a key once DATABASE_URL is set; sessions don't matter here.
    django_setup(DJANGO_SECRET_KEY=secrets.token_urlsafe(50))
    from django.conf import settings

    from generation.text_encoder import embed_texts, query_dtype
    from hub.services.embeddings import embed_query

    data = ensure_data(url, args.n, args.seed)
    tasks = task_texts(args.seed, TASK_COUNT)
    queries = query_texts(args.seed + 1, WARMUP + 2 * QUERIES, tasks)
    # Distinct queries for each REST pass: a web worker keeps the vectors of queries it has seen.
    warmup, measured, measured_weights = queries[:WARMUP], queries[WARMUP:-QUERIES], queries[-QUERIES:]
    vectors = [vector.tolist() for vector in embed_texts(measured[:RECALL_QUERIES])]
    app_vectors = [embed_query(query) for query in measured[:RECALL_QUERIES]]

    warm = warm_buffer_pool(tasks, args.seed + 3)
    load_before = os.getloadavg()[0]  # other work on the machine skews every latency here
    passes = {}
    # The anonymous rate limit stays on (its Redis round trips are part of a search) but high enough
    # for the benchmark's 640 searches in a couple of minutes.
    with gunicorn(workers=2, threads=1, env={"QUIVER_THROTTLE_ANON": "100000/minute"}) as base_url:
        rest_latencies(base_url, warmup, [])
        workers, backends = serving_processes()
        # Both searches a hub serves: before its weight encoder is trained (description and keyword
        # rankings) and after (the weights ranking too: a second HNSW scan in the same statement).
        try:
            for rankings, active, batch in (("description+keywords", False, measured),
                                            ("description+weights+keywords", True, measured_weights)):
                set_weights_ranking(active)
                web_cpu, db_cpu = cpu_seconds(workers), cpu_seconds(backends)
                latencies = rest_latencies(base_url, [], batch)
                passes[rankings] = {
                    "p50_ms": ms(latencies, 50), "p95_ms": ms(latencies, 95),
                    "web_cpu_ms_per_search": round((cpu_seconds(workers) - web_cpu) / len(batch) * 1000, 2),
                    "db_cpu_ms_per_search": round((cpu_seconds(backends) - db_cpu) / len(batch) * 1000, 2)}
        finally:
            set_weights_ranking(False)  # the later stages measure the hub without a trained encoder
    full = passes["description+weights+keywords"]
    default_ef, weights_ef = int(settings.QUIVER_HNSW_EF_SEARCH), int(settings.QUIVER_HNSW_WEIGHTS_EF_SEARCH)
    exact_stats, sweep = recall_sweep(vectors, app_vectors)
    set_weights_ranking(True)  # the stages of the whole search, as the headline measures it
    try:
        stages = stage_timings(measured[:BREAKDOWN_QUERIES])
    finally:
        set_weights_ranking(False)
    precision_check = query_precision_check(tasks, args.seed + 2)

    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM hub_adapter WHERE visibility = 'public'")
        public = cursor.fetchone()[0]
        cursor.execute("SHOW shared_buffers")
        shared_buffers = cursor.fetchone()[0]

    # Headline: the whole search (both vector rankings); recall: the worse of the two HNSW scans.
    print(json.dumps({"bench": "search", "n": args.n, "p50_ms": full["p50_ms"], "p95_ms": full["p95_ms"],
                      "recall_at_10": min(exact_stats["app_query_recall_at_10"], exact_stats["weights_recall_at_10"]),
                      "exact_p95_ms": exact_stats["exact_p95_ms"]}))
    for rankings, figures in passes.items():
        print(json.dumps({"bench": "search_rest", "rankings": rankings, "queries": QUERIES, **figures}))
    print(json.dumps({
        "bench": "search_detail", "ef_search": default_ef, "weights_ef_search": weights_ef,
        "hnsw_sql_p50_ms": sweep["description", default_ef]["hnsw_p50_ms"],
        "hnsw_sql_p95_ms": sweep["description", default_ef]["hnsw_p95_ms"],
        "weights_hnsw_sql_p50_ms": sweep["weights", weights_ef]["hnsw_p50_ms"],
        "weights_hnsw_sql_p95_ms": sweep["weights", weights_ef]["hnsw_p95_ms"],
        "float32_query_recall_at_10": sweep["description", default_ef]["recall_at_10"],
        "query_dtype": str(query_dtype(settings.QUIVER_QUERY_PRECISION)), **exact_stats,
        "index_build_s": data["index_build_s"], "index_build_reused": data["reused"],
        "copy_s": data["copy_s"], "task_embed_s": data["task_embed_s"], "public_rows": public,
        "tasks": TASK_COUNT, "rest_queries": len(measured), "recall_queries": len(vectors),
        "gunicorn": "2 workers x 1 thread", "cores": os.cpu_count(), "loadavg_1m_before_rest": round(load_before, 2), "shared_buffers": shared_buffers, **warm}))
    for (ranking, ef), stats in sweep.items():
        print(json.dumps({"bench": "search_ef_search", "ranking": ranking, "ef_search": ef, **stats}))
    print(json.dumps({"bench": "search_stages", "queries": BREAKDOWN_QUERIES, **stages}))
    print(json.dumps({"bench": "search_query_precision", "query_dtype": str(query_dtype(settings.QUIVER_QUERY_PRECISION)),
                      **precision_check}))
    print(json.dumps({"bench": "search_runtime", "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
