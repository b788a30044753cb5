"""Ingest throughput: upload a ≥ 1 GB safetensors base model through the API
(gunicorn, multipart, streamed from disk) and compare with `sha256sum` of the same
file in the same run. Prints one JSON line:
{"bench": "ingest", "bytes", "seconds", "sha256sum_seconds", "ratio_to_sha256sum"}
ratio_to_sha256sum = sha256sum_seconds / seconds (1.0 = as fast as hashing alone; goal ≥ 0.7).
"""
from __future__ import annotations

import argparse
import http.client
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _server import ROOT, django_setup, gunicorn

CHUNK = 4 * 2**20


def build_base_model(folder: Path, target_bytes: int) -> Path:
    """A Llama-architecture bf16 checkpoint of about target_bytes (random weights, fixed seed)."""
    import torch
    from safetensors.torch import save_file

    hidden, intermediate, vocab = 2048, 5632, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate
    layers = max(1, (target_bytes // 2 - 2 * vocab * hidden) // per_layer + 1)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": int(layers), "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": vocab, "torch_dtype": "bfloat16"}
    generator = torch.Generator().manual_seed(0)

    def weight(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": weight(vocab, hidden), "lm_head.weight": weight(vocab, hidden),
               "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    for i in range(int(layers)):
        prefix = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[prefix + f"self_attn.{name}.weight"] = weight(hidden, hidden)
        tensors[prefix + "mlp.gate_proj.weight"] = weight(intermediate, hidden)
        tensors[prefix + "mlp.up_proj.weight"] = weight(intermediate, hidden)
        tensors[prefix + "mlp.down_proj.weight"] = weight(hidden, intermediate)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "model.safetensors"


def multipart_upload(url: str, token: str, fields: dict[str, str], files: list[Path]) -> tuple[int, bytes]:
    """POST multipart/form-data streamed from disk (requests would build the body in memory)."""
    boundary = uuid.uuid4().hex
    parts: list[bytes | Path] = []
    for key, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for path in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode())
        parts.append(path)
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    length = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in parts)
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=600)
    connection.putrequest("POST", "/api/v1/base-models/")
    connection.putheader("Authorization", f"Token {token}")
    connection.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    connection.putheader("Content-Length", str(length))
    connection.endheaders()
    for part in parts:
        if isinstance(part, Path):
            with open(part, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    connection.send(chunk)
        else:
            connection.send(part)
    response = connection.getresponse()
    return response.status, response.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gigabytes", type=float, default=1.05)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="quiver-ingest-", dir=ROOT / "var"))
    # The benchmark's blobs go to their own folder, removed afterwards.
    django_setup(QUIVER_BLOB_ROOT=str(work / "blobs"), QUIVER_UPLOAD_TMP=str(work / "uploads"))
    from django.contrib.auth import get_user_model

    from hub.models import BaseModel
    from hub.services.accounts import create_api_token

    try:
        weights = build_base_model(work, int(args.gigabytes * 1e9))
        size = weights.stat().st_size
        user, _ = get_user_model().objects.get_or_create(username="bench")
        token = create_api_token(user)
        name = f"ingest-{uuid.uuid4().hex[:8]}"
        subprocess.run(["cat", str(weights)], stdout=subprocess.DEVNULL, check=True)  # same warm cache for both
        start = time.perf_counter()
        subprocess.run(["sha256sum", str(weights)], stdout=subprocess.DEVNULL, check=True)
        sha256sum_seconds = time.perf_counter() - start
        with gunicorn(workers=1, threads=1) as url:
            start = time.perf_counter()
            status, body = multipart_upload(url, token, {"namespace": "bench", "name": name},
                                            [work / "config.json", weights])
            seconds = time.perf_counter() - start
        if status != 201:
            sys.exit(f"upload failed: {status} {body[:500]!r}")
        print(json.dumps({"bench": "ingest", "bytes": size, "seconds": round(seconds, 3),
                          "sha256sum_seconds": round(sha256sum_seconds, 3),
                          "ratio_to_sha256sum": round(sha256sum_seconds / seconds, 3)}))
        BaseModel.objects.filter(namespace="bench", name=name).delete()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
