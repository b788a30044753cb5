"""`quiver`: a command-line client of Quiver's REST API (pure HTTP: requests, requests-toolbelt, tqdm;
no Django). Progress bars go to stderr; `--json` prints the server's JSON on stdout for scripts.

    quiver --endpoint http://127.0.0.1:8000 --token $QUIVER_TOKEN upload adapter/* --name alice/summarizer \\
        --base-model quiver-demo/tiny-llama
    quiver search "summarize support tickets" -k 5
    quiver download alice/summarizer@2 --dir ./summarizer     # files + quiver-manifest.json, sha256-checked
    quiver merge alice/summarizer:1.0 --base-model quiver-demo/tiny-llama --download ./merged
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import requests
from requests_toolbelt.multipart.encoder import MultipartEncoder, MultipartEncoderMonitor
from tqdm import tqdm

DEFAULT_ENDPOINT = "http://127.0.0.1:8000"
CHUNK = 1 << 20
MERGES = "merges/"
FINISHED_STATES = ("succeeded", "failed", "cancelled")  # hub.models.Job.FINISHED_STATES (cli.py imports no Django)


class CliError(Exception):
    """A failure to report to the user: `body` is the server's JSON error when there was one."""

    def __init__(self, message: str, body: dict | None = None):
        super().__init__(message)
        self.body = body or {"error": {"code": "client_error", "message": message}}


class Client:
    def __init__(self, endpoint: str, token: str | None, quiet: bool):
        self.endpoint = endpoint.rstrip("/")
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Token {token}"
        self.quiet = quiet

    def url(self, path: str) -> str:
        return path if path.startswith("http") else f"{self.endpoint}{path}"

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            response = self.session.request(method, self.url(path), timeout=kwargs.pop("timeout", 60), **kwargs)
        except requests.RequestException as error:
            raise CliError(f"cannot reach Quiver at {self.endpoint} ({type(error).__name__})") from None
        if response.status_code >= 400:
            raise _server_error(method, path, response)
        return response

    def json(self, method: str, path: str, **kwargs):
        return self.request(method, path, **kwargs).json()

    def progress(self, **kwargs) -> tqdm:
        return tqdm(disable=self.quiet or None, file=sys.stderr, **kwargs)


def _server_error(method: str, path: str, response: requests.Response) -> CliError:
    try:
        body = response.json()
        error = body["error"]
        message = f"{error.get('code', 'error')}: {error.get('message', '')}"
        if error.get("field"):
            message += f" (field: {error['field']})"
        return CliError(message, body)
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    if response.status_code in (404, 405):
        message = (f"HTTP {response.status_code} from {method} {path}: this Quiver server has no such endpoint "
                   "(it may be older than this client)")
    else:
        message = f"HTTP {response.status_code} from {method} {path}"
    return CliError(message, {"error": {"code": f"http_{response.status_code}", "message": message}})


def split_ref(ref: str) -> tuple[str, str | None]:
    """"namespace/name@revision" → ("namespace/name", "revision"); the revision is optional."""
    name, _, revision = ref.partition("@")
    if name.count("/") != 1 or not all(name.split("/")):
        raise CliError(f"{ref!r} is not namespace/name[@revision]")
    return name, revision or None


def weighted_ref(text: str) -> dict:
    """"namespace/name[@revision][:weight]" → {"id", "weight"} (weights may be negative)."""
    ref, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            ref, weight = head, float(tail)
        except ValueError:
            raise CliError(f"{text!r}: the weight after ':' must be a number") from None
    split_ref(ref)
    return {"id": ref, "weight": weight}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- transfers and jobs -----------------------------------------------------------------------------

def upload(client: Client, paths: list[Path], fields: dict) -> dict:
    handles = [open(path, "rb") for path in paths]
    try:
        parts = [(key, str(value)) for key, value in fields.items() if value is not None]
        parts += [("files", (path.name, handle, "application/octet-stream")) for path, handle in zip(paths, handles)]
        encoder = MultipartEncoder(parts)  # streams the files: nothing is read into memory at once
        with client.progress(total=encoder.len, unit="B", unit_scale=True, desc="upload") as bar:
            monitor = MultipartEncoderMonitor(encoder, lambda m: bar.update(m.bytes_read - bar.n))
            return client.json("POST", "/api/v1/adapters/", data=monitor,
                               headers={"Content-Type": monitor.content_type}, timeout=None)
    finally:
        for handle in handles:
            handle.close()


def download_file(client: Client, url: str, target: Path, size: int, sha256: str) -> None:
    """Stream one file to `target`, resuming a partial `.part` with a Range request, then check its sha256."""
    if target.exists() and target.stat().st_size == size and sha256_of(target) == sha256:
        return
    partial = target.with_name(target.name + ".part")
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={have}-"} if 0 < have < size else {}
    response = client.request("GET", url, stream=True, headers=headers, timeout=None)
    mode = "ab" if response.status_code == 206 else "wb"
    with open(partial, mode) as out, client.progress(total=size, initial=have if mode == "ab" else 0, unit="B",
                                                     unit_scale=True, desc=target.name) as bar:
        for chunk in response.iter_content(CHUNK):
            out.write(chunk)
            bar.update(len(chunk))
    if sha256_of(partial) != sha256:
        partial.unlink()
        raise CliError(f"{target.name}: the downloaded bytes do not match sha256 {sha256}; try again")
    partial.replace(target)


def wait_for_job(client: Client, job: dict, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    with client.progress(total=1.0, desc=job["kind"], bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}") as bar:
        while job["state"] not in FINISHED_STATES:
            if time.monotonic() > deadline:
                raise CliError(f"job {job['id']} is still {job['state']} after {timeout:g}s "
                               f"(follow it with: quiver jobs {job['id']} --wait)")
            time.sleep(0.5)
            job = client.json("GET", f"/api/v1/jobs/{job['id']}/")
            bar.update(job["progress"] - bar.n)
            bar.set_postfix_str(job.get("message") or job["state"])
    if job["state"] == "failed":
        raise CliError(f"job {job['id']} failed: {job['error']}", {"error": {"code": "job_failed",
                                                                         "message": job["error"]}, "job": job})
    if job["state"] == "cancelled":
        raise CliError(f"job {job['id']} was cancelled", {"error": {"code": "job_cancelled",
                                                                    "message": "cancelled"}, "job": job})
    return job


def started_job(client: Client, args, job: dict) -> dict:
    return job if args.no_wait else wait_for_job(client, job, args.timeout)


# --- commands ---------------------------------------------------------------------------------------

def cmd_upload(client: Client, args) -> tuple[dict, str]:
    namespace, name = split_ref(args.name)[0].split("/")
    paths = [Path(p) for p in args.files]
    for path in paths:
        if not path.is_file():
            raise CliError(f"{path}: no such file")
    adapter = upload(client, paths, {"namespace": namespace, "name": name, "base_model": args.base_model,
                                     "description": args.description, "tags": args.tags, "license": args.license,
                                     "visibility": args.visibility})
    return adapter, f"{adapter['id']}@{adapter['revision']} ({adapter['commit'][:12]}), {adapter['format']} rank {adapter['rank']}"


def cmd_search(client: Client, args) -> tuple[dict, str]:
    params = {"q": args.query, "k": args.k, "base_model": args.base_model, "tag": args.tag, "format": args.format,
              "license": args.license}
    found = client.json("GET", "/api/v1/search", params={k: v for k, v in params.items() if v is not None})
    # What matched says more than the fused score (a reciprocal-rank sum, only an order).
    lines = [f"{hit['adapter']['id']:<40} {_matched_text(hit.get('matched') or {}):<34} "
             f"{hit['adapter']['description'][:60]}" for hit in found["results"]]
    return found, "\n".join(lines) or "no adapter found"


def _matched_text(matched: dict) -> str:
    """'description 0.67, keywords': the rankings that found a hit, with the embeddings' cosine
    similarities (keyword ranks have no common scale, so only their name)."""
    return ", ".join(name if name == "keywords" else f"{name} {value:.2f}" for name, value in matched.items())


def cmd_show(client: Client, args) -> tuple[dict, str]:
    name, revision = split_ref(args.adapter)
    if name.startswith(MERGES):
        merge = client.json("GET", f"/api/v1/merges/{name.removeprefix(MERGES)}/")
        return merge, _manifest_text(merge["repo_id"], merge)
    adapter = client.json("GET", f"/api/v1/adapters/{name}/")
    if revision:
        adapter["manifest"] = client.json("GET", f"/api/v1/adapters/{name}/manifest", params={"revision": revision})
    lines = [f"{adapter['id']}@{adapter['revision']} ({adapter['visibility']}) by {adapter['owner']}",
             f"  base model: {adapter['base_model']}  format: {adapter['format']}  rank: {adapter['rank']}  "
             f"alpha: {adapter['alpha']}", f"  tags: {', '.join(adapter['tags']) or '-'}",
             f"  {adapter['description']}"]
    lines += [f"  {f['filename']}  {f['size']} B  sha256 {f['sha256']}" for f in adapter["files"]]
    return adapter, "\n".join(lines)


def _manifest_text(label: str, manifest: dict) -> str:
    return "\n".join([label] + [f"  {f['filename']}  {f['size']} B  sha256 {f['sha256']}" for f in manifest["files"]])


def download_repo(client: Client, ref: str, target: str | None) -> dict:
    """Every file of an adapter revision or a merge into `target`, with its manifest beside them."""
    name, revision = split_ref(ref)
    if name.startswith(MERGES):
        manifest = client.json("GET", f"/api/v1/merges/{name.removeprefix(MERGES)}/")
    else:
        manifest = client.json("GET", f"/api/v1/adapters/{name}/manifest",
                               params={"revision": revision} if revision else None)
    folder = Path(target or name.replace("/", "--"))
    folder.mkdir(parents=True, exist_ok=True)
    for listed in manifest["files"]:
        download_file(client, listed["url"], folder / listed["filename"], listed["size"], listed["sha256"])
    (folder / "quiver-manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {**manifest, "dir": str(folder)}


def cmd_download(client: Client, args) -> tuple[dict, str]:
    downloaded = download_repo(client, args.adapter, args.dir)
    return downloaded, f"{len(downloaded['files'])} files in {downloaded['dir']} (checked against sha256)"


def cmd_compose(client: Client, args) -> tuple[dict, str]:
    body = {"adapters": [weighted_ref(ref) for ref in args.adapters], "method": args.method,
            "params": _params(args.param), "visibility": args.visibility, "description": args.description or ""}
    if args.name:
        body["namespace"], body["name"] = split_ref(args.name)[0].split("/")
    job = started_job(client, args, client.json("POST", "/api/v1/compositions/", json=body))
    if job["state"] != "succeeded":
        return job, f"job {job['id']} {job['state']}"
    result = job["result"]
    return job, f"{result['namespace']}/{result['name']}@{result['revision']} (exact: {result['exact']})"


def cmd_merge(client: Client, args) -> tuple[dict, str]:
    body = {"base_model": args.base_model, "adapters": [weighted_ref(ref) for ref in args.adapters],
            "method": args.method, "params": _params(args.param), "dtype": args.dtype}
    job = started_job(client, args, client.json("POST", "/api/v1/merges/", json=body))
    if job["state"] != "succeeded":
        return job, f"job {job['id']} {job['state']}"
    result = job["result"]
    if args.download:
        download_repo(client, result["repo_id"], args.download)
    return job, f"{result['repo_id']} ({len(result['files'])} files)" + (f" in {args.download}" if args.download else "")


def cmd_generate(client: Client, args) -> tuple[dict, str]:
    body = {"description": args.description, "base_model": args.base_model, "method": args.method}
    body.update({key: value for key, value in (("k", args.k), ("visibility", args.visibility)) if value is not None})
    job = started_job(client, args, client.json("POST", "/api/v1/generations/", json=body))
    result = job.get("result") or {}
    return job, f"job {job['id']} {job['state']}" + (f": {result}" if result else "")


def _job_line(job: dict) -> str:
    return f"{job['id']} {job['kind']} {job['state']} {job['progress']:.0%} {job.get('message') or ''}".rstrip()


def cmd_jobs(client: Client, args) -> tuple[dict, str]:
    if args.job_id is None:
        if args.wait or args.cancel:
            raise CliError("--wait and --cancel need a job id")
        params = {"limit": args.limit, "state": args.state, "kind": args.kind}
        found = client.json("GET", "/api/v1/jobs/", params={k: v for k, v in params.items() if v is not None})
        return found, "\n".join(f"{job['created_at'][:16]} {_job_line(job)}" for job in found["results"]) or "no jobs"
    if args.cancel:
        job = client.json("POST", f"/api/v1/jobs/{args.job_id}/cancel/")
    else:
        job = client.json("GET", f"/api/v1/jobs/{args.job_id}/")
    if args.wait and not args.cancel:
        job = wait_for_job(client, job, args.timeout)
    return job, _job_line(job)


def cmd_merges(client: Client, args) -> tuple[dict, str]:
    if args.delete:
        merge_id = args.delete.removeprefix(MERGES)
        client.request("DELETE", f"/api/v1/merges/{merge_id}/")
        return {"deleted": f"{MERGES}{merge_id}"}, f"deleted {MERGES}{merge_id}"
    found = client.json("GET", "/api/v1/merges/", params={"limit": args.limit})
    lines = [f"{m['repo_id']}  {m['base_model']}  {m['method']}  {m['size'] / 2**20:.1f} MiB  "
             f"last used {m['last_used_at'][:16]}  expires {(m['expires_at'] or 'never')[:10]}"
             for m in found["results"]]
    more = found["count"] - len(found["results"])
    return found, "\n".join(lines + ([f"... and {more} more (--limit)"] if more > 0 else [])) or "no stored merges"


def cmd_which(client: Client, args) -> tuple[dict, str]:
    path = Path(args.file)
    if path.is_file():
        digest = sha256_of(path)
    elif len(args.file) == 64:
        digest = args.file  # a sha256 given directly (the server checks its form)
    else:
        raise CliError(f"{args.file}: no such file (give a file or its sha256)")
    found = client.json("GET", f"/api/v1/adapters/by-hash/{digest}")
    lines = [f"{m['adapter']}@{m['revision']} ({m['commit'][:12]}) {m['filename']}" + (" [latest]" if m["latest"] else "")
             for m in found["matches"]]
    return found, "\n".join(lines)


def cmd_updates(client: Client, args) -> tuple[dict, str]:
    refs = list(args.adapters)
    for manifest_path in args.manifest or []:
        pinned = json.loads(Path(manifest_path).read_text())["adapter"]
        refs.append(f"{pinned['id']}@{pinned['commit']}")
    if not refs:
        raise CliError("give namespace/name@revision references or --manifest quiver-manifest.json")
    found = client.json("POST", "/api/v1/adapters/updates", json={"adapters": refs})
    lines = []
    for item in found["results"]:
        if "error" in item:
            lines.append(f"{item['ref']}: {item['error']['message']}")
        elif item["update_available"]:
            lines.append(f"{item['id']}: {item['current']['revision']} → {item['latest']['revision']} "
                         f"({len(item['newer'])} newer)")
        else:
            lines.append(f"{item['id']}: up to date ({item['current']['revision']})")
    return found, "\n".join(lines)


def _params(pairs: list[str] | None) -> dict:
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CliError(f"--param {pair!r}: use key=value")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


# --- arguments --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quiver", description="Command-line client of a Quiver adapter hub.")
    parser.add_argument("--endpoint", default=os.environ.get("QUIVER_ENDPOINT", DEFAULT_ENDPOINT),
                        help="the hub's URL (env QUIVER_ENDPOINT)")
    parser.add_argument("--token", default=os.environ.get("QUIVER_TOKEN") or os.environ.get("HF_TOKEN"),
                        help="API token (env QUIVER_TOKEN, else HF_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print the server's JSON on stdout (no progress bars)")
    commands = parser.add_subparsers(dest="command", required=True)

    def job_options(command):
        command.add_argument("--no-wait", action="store_true", help="print the queued job and return")
        command.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job")

    command = commands.add_parser("upload", help="upload adapter files (a new adapter or a new revision)")
    command.add_argument("files", nargs="+")
    command.add_argument("--name", required=True, help="namespace/name")
    command.add_argument("--base-model", help="namespace/name of a registered base model")
    command.add_argument("--description")
    command.add_argument("--tags", help="comma-separated")
    command.add_argument("--license")
    command.add_argument("--visibility", choices=["public", "private"])
    command.set_defaults(run=cmd_upload)

    command = commands.add_parser("search", help="adapters for a task described in words")
    command.add_argument("query")
    command.add_argument("-k", type=int, default=10)
    for option in ("--base-model", "--tag", "--format", "--license"):
        command.add_argument(option)
    command.set_defaults(run=cmd_search)

    command = commands.add_parser("show", help="an adapter (namespace/name[@revision]) or a merge (merges/<id>)")
    command.add_argument("adapter")
    command.set_defaults(run=cmd_show)

    command = commands.add_parser("download", help="files of an adapter revision or a merge, with a manifest")
    command.add_argument("adapter", help="namespace/name[@revision] or merges/<merge_id>")
    command.add_argument("--dir", help="target folder (default: namespace--name)")
    command.set_defaults(run=cmd_download)

    command = commands.add_parser("compose", help="compose adapters into a new adapter")
    command.add_argument("adapters", nargs="+", help="namespace/name[@revision][:weight]")
    command.add_argument("--method", default="linear")
    command.add_argument("--param", action="append", help="key=value (rank, density, seed, ...)")
    command.add_argument("--name", help="namespace/name of the result")
    command.add_argument("--description")
    command.add_argument("--visibility", choices=["public", "private"], default="public")
    job_options(command)
    command.set_defaults(run=cmd_compose)

    command = commands.add_parser("merge", help="merge adapters into their base model")
    command.add_argument("adapters", nargs="+", help="namespace/name[@revision][:weight]")
    command.add_argument("--base-model", required=True)
    command.add_argument("--method", default="linear")
    command.add_argument("--param", action="append", help="key=value")
    command.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    command.add_argument("--download", metavar="DIR", help="download the merged checkpoint into DIR")
    job_options(command)
    command.set_defaults(run=cmd_merge)

    command = commands.add_parser("generate", help="generate an adapter from a task description")
    command.add_argument("description")
    command.add_argument("--base-model", required=True)
    command.add_argument("--method", choices=["sg-lora", "icm-lora"], default="sg-lora")
    command.add_argument("-k", type=int)
    command.add_argument("--visibility", choices=["public", "private"])
    job_options(command)
    command.set_defaults(run=cmd_generate)

    command = commands.add_parser("jobs", help="a background job's state, or (no id) the jobs you started")
    command.add_argument("job_id", nargs="?")
    command.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    command.add_argument("--kind", help="merge, compose, generate, ...")
    command.add_argument("--limit", type=int, default=20)
    command.add_argument("--wait", action="store_true", help="follow it until it finishes")
    command.add_argument("--cancel", action="store_true", help="cancel it (queued or running)")
    command.add_argument("--timeout", type=float, default=3600)
    command.set_defaults(run=cmd_jobs)

    command = commands.add_parser("merges", help="the stored merges you made, with size and expiry")
    command.add_argument("--limit", type=int, default=50)
    command.add_argument("--delete", metavar="MERGE_ID", help="remove a stored merge you made (merges/<id> or <id>)")
    command.set_defaults(run=cmd_merges)

    command = commands.add_parser("which", help="which adapters hold this file (looked up by its sha256)")
    command.add_argument("file", help="a local file, or a sha256")
    command.set_defaults(run=cmd_which)

    command = commands.add_parser("updates", help="newer revisions of pinned adapters")
    command.add_argument("adapters", nargs="*", help="namespace/name@revision")
    command.add_argument("--manifest", action="append", help="a quiver-manifest.json written by download")
    command.set_defaults(run=cmd_updates)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = Client(args.endpoint, args.token, quiet=args.json)
    try:
        data, text = args.run(client, args)
    except CliError as error:
        if args.json:
            print(json.dumps(error.body))
        else:
            print(f"quiver: {error}", file=sys.stderr)
        return 1
    print(json.dumps(data) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
