"""Load: many concurrent clients mixing search, detail, file download and uploads for a fixed time
against the production stack on loopback: gunicorn (2 workers × 4 threads) and a Celery worker, on
this benchmark's own database (quiver_bench_load), Redis database and blob folder.

The clients run in a second process (threads, one HTTP session each). Afterwards every upload the
server acknowledged (201) is read back: it must be listed, with the sha256 of every file sent.
Rate limits are off for the run (all clients share one address). Prints JSON lines, first the headline:
{"bench": "load", "clients", "seconds", "requests", "errors_5xx", "uploads_acknowledged", "uploads_lost"}
then one line per endpoint (requests, p50/p95 ms, status counts). Goals: no 5xx, nothing lost.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import requests

from _server import ROOT, bench_database_url, django_setup, gunicorn

BENCH_DB = "quiver_bench_load"
# Share of each operation in a client's mix.
MIX = {"search": 0.35, "detail": 0.25, "download": 0.30, "upload": 0.10}
QUERIES = ["summarise support tickets", "translate questions to SQL", "watercolor style", "product search",
           "sentiment of reviews", "classify news", "answer medical questions", "write code comments"]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] * 1000, 1)


def run_clients(url: str, token: str, plan: dict, clients: int, seconds: float) -> dict:
    """The client side (its own process): `clients` threads for `seconds`; returns the raw tallies."""
    latencies, statuses, acknowledged, lock = defaultdict(list), defaultdict(Counter), [], threading.Lock()
    deadline = time.monotonic() + seconds
    upload_files = [(name, Path(path).read_bytes()) for name, path in plan["upload_files"]]

    def one(session: requests.Session, rng: random.Random, client: int, count: int) -> None:
        kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        adapter = rng.choice(plan["adapters"])
        started = time.perf_counter()
        if kind == "search":
            response = session.get(f"{url}/api/v1/search", params={"q": rng.choice(QUERIES), "k": 10}, timeout=120)
        elif kind == "detail":
            response = session.get(f"{url}/api/v1/adapters/{adapter}/", timeout=120)
        elif kind == "download":
            response = session.get(f"{url}/api/v1/adapters/{adapter}/files/{plan['files'][adapter]}", timeout=120)
            response.content  # noqa: B018 - the whole body is part of the request's time
        else:
            name = f"load-{client}-{count}"
            response = session.post(f"{url}/api/v1/adapters/", headers={"Authorization": f"Token {token}"},
                                    files=[("files", item) for item in upload_files],
                                    data={"namespace": plan["namespace"], "name": name,
                                          "base_model": plan["upload_base"], "description": f"load test {name}"},
                                    timeout=300)
        elapsed = time.perf_counter() - started
        with lock:
            latencies[kind].append(elapsed)
            statuses[kind][response.status_code] += 1
            if kind == "upload" and response.status_code == 201:
                acknowledged.append(f"{plan['namespace']}/{name}")

    def client_loop(client: int) -> None:
        rng, count = random.Random(client), 0
        with requests.Session() as session:
            while time.monotonic() < deadline:
                count += 1
                try:
                    one(session, rng, client, count)
                except requests.RequestException as error:
                    with lock:
                        statuses["connection"][type(error).__name__] += 1

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies": latencies, "statuses": {k: dict(v) for k, v in statuses.items()}, "acknowledged": acknowledged}


def check_uploads(url: str, token: str, acknowledged: list[str], expected: dict[str, str]) -> int:
    """How many acknowledged uploads are missing or hold other bytes than were sent."""
    lost = 0
    with requests.Session() as session:
        session.headers["Authorization"] = f"Token {token}"
        for full_name in acknowledged:
            response = session.get(f"{url}/api/v1/adapters/{full_name}/", timeout=60)
            stored = {f["filename"]: f["sha256"] for f in response.json().get("files", [])} if response.ok else {}
            lost += stored != expected
    return lost


def client_main(args) -> None:
    plan = json.loads(Path(args.plan).read_text())
    raw = run_clients(args.url, plan["token"], plan, args.clients, args.seconds)
    expected = {name: hashlib.sha256(Path(path).read_bytes()).hexdigest() for name, path in plan["upload_files"]}
    raw["lost"] = check_uploads(args.url, plan["token"], raw["acknowledged"], expected)
    print(json.dumps(raw))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)  # the client process
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args)

    os.environ.setdefault("QUIVER_REDIS_DB", "4")  # read when hub.embedded is imported
    os.environ["DATABASE_URL"] = bench_database_url(BENCH_DB)  # never the developer's database
    var = ROOT / "var" / "bench-load"
    os.environ.update({"QUIVER_BLOB_ROOT": str(var / "blobs"), "QUIVER_UPLOAD_TMP": str(var / "uploads"),
                       "QUIVER_THROTTLE_ANON": "", "QUIVER_THROTTLE_USER": ""})
    django_setup(DJANGO_SECRET_KEY=secrets.token_urlsafe(50))
    from django.contrib.auth import get_user_model

    from hub.demo.builders import build_demo_files
    from hub.models import Adapter
    from hub.services.accounts import create_api_token
    from hub.services.catalog import seed_catalog
    from workers import app

    catalog = build_demo_files(ROOT / "var" / "demo-cache")
    seed_catalog(catalog, log=lambda message: None)
    user, _ = get_user_model().objects.get_or_create(username="load")
    Adapter.objects.filter(namespace="load").delete()  # uploads of an earlier run
    uploaded = next(entry for entry in catalog["adapters"] if entry["name"] == "ticket-summarizer")
    public = Adapter.objects.filter(visibility="public").select_related("latest_revision")
    plan = {
        "token": create_api_token(user), "namespace": "load", "upload_base": uploaded["base_model"],
        "upload_files": [(Path(p).name, str(p)) for p in uploaded["files"]],
        "adapters": [a.full_name for a in public],
        "files": {a.full_name: a.latest_revision.files.order_by("-blob__size").first().filename for a in public},
    }
    plan_path = var / "plan.json"
    plan_path.write_text(json.dumps(plan))
    app.control.purge()

    log_dir = ROOT / "artifacts"
    log_dir.mkdir(exist_ok=True)
    env = dict(os.environ)
    with open(log_dir / "load-worker.log", "w") as worker_log:
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers", "worker", "--queues",
                                   "default,embed,gpu", "--concurrency", "1", "--loglevel", "WARNING"],
                                  cwd=ROOT, env=env, stdout=worker_log, stderr=subprocess.STDOUT)
    try:
        with gunicorn(workers=2, threads=4, log_path=log_dir / "load-gunicorn.log") as url:
            for query in QUERIES:  # warm: the query encoder loads in each web worker on first use
                requests.get(f"{url}/api/v1/search", params={"q": query}, timeout=120)
            started = time.perf_counter()
            client = subprocess.run([sys.executable, __file__, "--client", "--url", url, "--plan", str(plan_path),
                                     "--clients", str(args.clients), "--seconds", str(args.seconds)],
                                    cwd=ROOT, env=env, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - started
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    raw = json.loads(client.stdout.strip().splitlines()[-1])
    statuses, latencies = raw["statuses"], raw["latencies"]
    total = sum(sum(counts.values()) for kind, counts in statuses.items() if kind != "connection")
    errors_5xx = sum(n for kind, counts in statuses.items() if kind != "connection"
                     for code, n in counts.items() if int(code) >= 500)
    print(json.dumps({"bench": "load", "clients": args.clients, "seconds": args.seconds, "requests": total,
                      "errors_5xx": errors_5xx, "uploads_acknowledged": len(raw["acknowledged"]),
                      "uploads_lost": raw["lost"]}))
    print(json.dumps({"bench": "load.summary", "requests_per_second": round(total / args.seconds, 1),
                      "connection_errors": statuses.get("connection", {}), "client_wall_s": round(wall, 1),
                      "web": "gunicorn 2 workers x 4 threads", "worker": "celery prefork x1", "cores": os.cpu_count()}))
    for kind in MIX:
        print(json.dumps({"bench": "load.endpoint", "endpoint": kind, "requests": len(latencies.get(kind, [])),
                          "p50_ms": percentile(latencies.get(kind, []), 50),
                          "p95_ms": percentile(latencies.get(kind, []), 95), "statuses": statuses.get(kind, {})}))


if __name__ == "__main__":
    main()
