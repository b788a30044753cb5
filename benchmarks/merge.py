"""Streaming merge: a ≥ 1 GB bf16 (or, with --dtype float16, float16) Llama base + one r=16 LoRA on every linear layer
(q, k, v, o, gate, up, down), merged by kernels.streaming_merge.merge_checkpoint,
with its peers measured in the same run:

* copy: shutil.copyfile of the base's model.safetensors after a warm read (the
  floor: any merge has to read and write every byte);
* quiver: merge_checkpoint in a fresh subprocess (time of the call, peak RSS);
* peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base,
  dtype=<the base's dtype>), adapter).merge_and_unload().save_pretrained(out) in a fresh
  subprocess (time of those calls, peak RSS);
* max_abs_diff_vs_peft: largest |quiver − peft| over every tensor of the two outputs.

Peak RSS is the child's VmHWM (/proc/self/status; ru_maxrss would include the
parent's RSS at fork, which Linux carries across exec); *_rss_fraction = (peak RSS − RSS after the
imports, before the work) / checkpoint bytes, i.e. the memory the work itself
needed per byte of checkpoint (Python + torch + transformers imports are about
0.3-0.6 GB whatever the model; the absolute peaks are printed too).

The machine may be shared: copy and quiver run --repeat times, alternated, and the
headline takes the best time of each (and the largest RSS fraction); every run is
printed with its CPU time (user + system) and the 1-minute load average. Dirty
pages are written back (os.sync) before each timed step, and the base is read once
first so every reader finds it in the page cache.

Prints JSON lines: one per measurement, then the headline
{"bench": "merge", "bytes", "copy_s", "quiver_s", "ratio_to_copy", "rss_fraction", "paired_ratios",
 "weight_files", "peft_s", "peft_rss_fraction", "max_abs_diff_vs_peft"}
(ratio_to_copy: best merge / best copy; paired_ratios: each merge / the copy run just before it, sorted).
Goals: ratio_to_copy ≤ 1.3, rss_fraction ≤ 0.25. Before the headline, unless --skip-sha256, what the
hub's merge job pays to store the files as content-addressed blobs: the merge with every file's sha256,
hashed after the merge (as the job did up to session 23) and while it writes (merge_checkpoint(sha256=…),
as it does now), alternated --repeat times, the same digests checked across runs:
{"bench": "merge.sha256", "files", "after_s", "during_s", "speedup", "during_ratio_to_copy"}

    python benchmarks/merge.py [--work DIR] [--layers 10] [--keep] [--max-shard-bytes N]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 32, 4  # TinyLlama-1.1B shapes
SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default (max_shard_size="5GB")
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def current_rss() -> int:
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """This process's peak RSS. VmHWM rather than getrusage's ru_maxrss: Linux carries
    ru_maxrss across exec, so a child forked from a big parent starts at the parent's RSS."""
    return _status_bytes("VmHWM")


# ----------------------------------------------------------------------
# Inputs


def build_base(folder: Path, layers: int, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """A LlamaForCausalLM checkpoint (every tensor transformers expects) with
    random weights of `dtype` from a fixed seed, written with safetensors."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    head_dim = HIDDEN // HEADS
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": head_dim, "vocab_size": VOCAB, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "dtype": dtype,
    }
    generator = torch.Generator().manual_seed(seed)

    def weight(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(getattr(torch, dtype))

    def norm():
        return (1 + 0.1 * torch.randn(HIDDEN, generator=generator)).to(getattr(torch, dtype))

    kv = KV_HEADS * head_dim
    tensors = {"model.embed_tokens.weight": weight(VOCAB, HIDDEN), "model.norm.weight": norm(),
               "lm_head.weight": weight(VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": weight(HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": weight(kv, HIDDEN),
            p + "self_attn.v_proj.weight": weight(kv, HIDDEN), p + "self_attn.o_proj.weight": weight(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": weight(INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": weight(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": weight(HIDDEN, INTERMEDIATE),
        })
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def build_adapter(base: Path, folder: Path, *, r: int = 16, alpha: float = 32, seed: int = 1) -> Path:
    """A PEFT LoRA (r=16 on every linear layer, float32 factors as PEFT trains
    and saves them) with random non-zero A and B, written as PEFT files."""
    import torch
    from safetensors import safe_open

    from hub.formats import CanonicalAdapter, LoraModule, write_peft_adapter

    generator = torch.Generator().manual_seed(seed)
    modules = {}
    with safe_open(str(base / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            module = key.removesuffix(".weight")
            if module.rsplit(".", 1)[-1] in LINEAR:
                out_features, in_features = handle.get_slice(key).get_shape()
                A = torch.randn(r, in_features, generator=generator) / in_features**0.5
                B = torch.randn(out_features, r, generator=generator) * 0.01
                modules[module] = LoraModule(A=A, B=B, scale=alpha / r)
    adapter = CanonicalAdapter(format="peft", peft_type="LORA", modules=modules, rank=r, alpha=alpha,
                               target_modules=LINEAR)
    write_peft_adapter(adapter, folder, base_model_name_or_path=str(base))
    return folder


# ----------------------------------------------------------------------
# Children (fresh processes, so each peak RSS is its own)


def cpu_seconds() -> float:
    """user + system CPU time of this process (all threads; kernel copies count as system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_quiver(base: Path, adapter: Path, out: Path, device: str = "cpu", max_shard_bytes: int = SHARD_BYTES,
                 sha256: str = "none") -> dict:
    """sha256: "none"; "after": then hash every written file, as the hub's merge job did before
    session 23; "during": merge_checkpoint(sha256=…) hashes while it writes, as the job does now."""
    import hashlib

    import torch

    from hub.formats import parse_adapter
    from kernels.streaming_merge import merge_checkpoint

    files = {p.name: p for p in base.iterdir() if p.is_file()}
    adapter_files = {p.name: p for p in adapter.iterdir() if p.is_file()}
    clear_output(out)
    baseline, cpu = current_rss(), cpu_seconds()
    start = time.perf_counter()
    parsed = parse_adapter(adapter_files)
    digests: dict[str, str] = {}
    written = merge_checkpoint(files, [(parsed, 1.0)], out, device=device, max_shard_bytes=max_shard_bytes,
                               sha256=digests if sha256 == "during" else None)
    if device != "cpu":
        torch.cuda.synchronize()
    if sha256 == "after":
        for path in written:
            with open(path, "rb") as handle:
                digests[path.name] = hashlib.file_digest(handle, "sha256").hexdigest()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_s": cpu_seconds() - cpu, "peak_rss": peak_rss(), "baseline_rss": baseline,
            "threads": torch.get_num_threads(), "sha256": digests}


def child_peft(base: Path, adapter: Path, out: Path, max_shard_bytes: int = SHARD_BYTES) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    clear_output(out)
    baseline, cpu = current_rss(), cpu_seconds()
    start = time.perf_counter()
    dtype = json.loads((base / "config.json").read_text())["dtype"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out, max_shard_size=max_shard_bytes)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_s": cpu_seconds() - cpu, "peak_rss": peak_rss(), "baseline_rss": baseline}


def clear_output(out: Path) -> None:
    """Remove the previous output, then write back dirty pages, right before a timed step (after the
    child's imports): each step, the copy included, then writes into page-cache memory the kernel has
    just freed, with no dirty pages of earlier steps queued for writeback. (On this VM memory freed a
    few seconds earlier is 8-10x slower to write the first time: a copy made while the previous merge
    still held its pages ran 2.3-7 s instead of 0.3 s, and merges started 2 s after their rmtree, the
    child's imports, ran up to 0.8 s instead of 0.45 s.)"""
    if out.is_dir():
        shutil.rmtree(out)
    else:
        out.unlink(missing_ok=True)
    os.sync()


def run_child(kind: str, base: Path, adapter: Path, out: Path, device: str = "cpu",
              max_shard_bytes: int = SHARD_BYTES, sha256: str = "none") -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--base", str(base), "--adapter", str(adapter), "--out", str(out),
         "--device", device, "--max-shard-bytes", str(max_shard_bytes), "--sha256", sha256],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------


def warm_read(path: Path) -> None:
    with open(path, "rb", buffering=0) as handle:
        while handle.read(64 * 2**20):
            pass


def max_abs_diff(ours: Path, theirs: Path) -> tuple[float, int, int]:
    """(max |a − b|, elements that differ, elements) over every tensor, one tensor at a time."""
    from safetensors import safe_open

    def locations(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            return {k: folder / "model.safetensors" for k in handle.keys()}

    a_where, b_where = locations(ours), locations(theirs)
    if set(a_where) != set(b_where):
        raise SystemExit(f"tensor names differ: {sorted(set(a_where) ^ set(b_where))[:5]}")
    worst, differing, total = 0.0, 0, 0
    for name in sorted(a_where):
        with safe_open(str(a_where[name]), framework="pt") as fa, safe_open(str(b_where[name]), framework="pt") as fb:
            a, b = fa.get_tensor(name), fb.get_tensor(name)
            if a.dtype != b.dtype or a.shape != b.shape:
                raise SystemExit(f"{name}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
            diff = (a.float() - b.float()).abs()
            worst = max(worst, float(diff.max())) if diff.numel() else worst
            differing += int((diff > 0).sum())
            total += diff.numel()
            del a, b, diff
    return worst, differing, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="folder for the inputs and outputs (default: a temporary one)")
    parser.add_argument("--layers", type=int, default=10, help="decoder layers (10 → 1.14 GB)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16",
                        help="the base's dtype (both merge through the fused CPU kernel where it runs)")
    parser.add_argument("--repeat", type=int, default=3, help="copy / quiver runs, alternated; the best of each counts")
    parser.add_argument("--device", default="cpu",
                        help="where quiver merges the adapted tensors (cpu, or cuda on a GPU worker: the Triton kernel)")
    parser.add_argument("--max-shard-bytes", type=int, default=SHARD_BYTES,
                        help="shard the output above this size, as save_pretrained(max_shard_size=…) does (default "
                             "transformers' 5 GB: one file here); smaller values measure the merge writing shards "
                             "in parallel")
    parser.add_argument("--skip-sha256", action="store_true",
                        help="skip the merge.sha256 line: the merge with its files hashed after it (the hub's job "
                             "before session 23) against hashed while written (merge_checkpoint(sha256=…), now)")
    parser.add_argument("--child", choices=["quiver", "peft"])
    parser.add_argument("--sha256", choices=["none", "after", "during"], default="none")
    parser.add_argument("--base", type=Path)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    if args.child:
        if args.child == "quiver":
            result = child_quiver(args.base, args.adapter, args.out, args.device, args.max_shard_bytes, args.sha256)
        else:
            result = child_peft(args.base, args.adapter, args.out, args.max_shard_bytes)
        print(json.dumps(result))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="quiver-bench-merge-", dir=ROOT / "var"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        # The adapter (float32 factors) serves both dtypes' bases: it depends on their shapes only.
        base = work / ("base" if args.dtype == "bfloat16" else f"base-{args.dtype}")
        adapter = work / "adapter"
        marker, adapter_marker = base / f".built-{args.layers}", adapter / f".built-{args.layers}"
        if not marker.exists():
            shutil.rmtree(base, ignore_errors=True)
            build_base(base, args.layers, dtype=args.dtype)
            marker.touch()
        if not adapter_marker.exists():
            shutil.rmtree(adapter, ignore_errors=True)
            build_adapter(base, adapter)
            adapter_marker.touch()
        weights = base / "model.safetensors"
        size = weights.stat().st_size

        warm_read(weights)
        copies, merges = [], []
        for run in range(args.repeat):  # alternate, so both see the same background load
            copy_target = work / "copy.safetensors"
            clear_output(copy_target)  # as each merge clears its own
            cpu, start = cpu_seconds(), time.perf_counter()
            shutil.copyfile(weights, copy_target)
            copy_s, copy_cpu = time.perf_counter() - start, cpu_seconds() - cpu
            copies.append(copy_s)
            print(json.dumps({"bench": "merge.copy", "run": run, "bytes": size, "seconds": round(copy_s, 3),
                              "cpu_s": round(copy_cpu, 3), "gb_per_s": round(size / copy_s / 1e9, 3),
                              "loadavg_1m": os.getloadavg()[0]}), flush=True)
            quiver = run_child("quiver", base, adapter, work / "quiver-out", args.device, args.max_shard_bytes)
            quiver["rss_fraction"] = (quiver["peak_rss"] - quiver["baseline_rss"]) / size
            merges.append(quiver)
            print(json.dumps({"bench": "merge.quiver", "run": run, "seconds": round(quiver["seconds"], 3),
                              "cpu_s": round(quiver["cpu_s"], 3), "threads": quiver["threads"],
                              "peak_rss_bytes": quiver["peak_rss"], "baseline_rss_bytes": quiver["baseline_rss"],
                              "rss_fraction": round(quiver["rss_fraction"], 4), "loadavg_1m": os.getloadavg()[0]}),
                  flush=True)
        copy_s = min(copies)
        quiver_s = min(m["seconds"] for m in merges)
        quiver_fraction = max(m["rss_fraction"] for m in merges)
        # The copy's time swings with the VM's page-cache state (0.27–1.1 s within an hour here); each
        # merge against the copy just before it shows how much of the ratio is that swing.
        paired = sorted(m["seconds"] / c for m, c in zip(merges, copies))
        headline = {"bench": "merge", "device": args.device, "dtype": args.dtype, "bytes": size, "copy_s": round(copy_s, 3), "quiver_s": round(quiver_s, 3),
                    "ratio_to_copy": round(quiver_s / copy_s, 3), "rss_fraction": round(quiver_fraction, 4),
                    "paired_ratios": [round(r, 3) for r in paired],
                    "weight_files": len(list((work / "quiver-out").glob("model*.safetensors")))}
        if not args.skip_sha256:
            hashed: dict[str, list[dict]] = {"after": [], "during": []}
            for run in range(args.repeat):  # alternated, like the copy and the merge
                for mode, runs in hashed.items():
                    runs.append(run_child("quiver", base, adapter, work / "quiver-out", args.device,
                                          args.max_shard_bytes, sha256=mode))
                    print(json.dumps({"bench": f"merge.sha256_{mode}", "run": run,
                                      "seconds": round(runs[-1]["seconds"], 3), "cpu_s": round(runs[-1]["cpu_s"], 3),
                                      "loadavg_1m": os.getloadavg()[0]}), flush=True)
            digests = {json.dumps(r["sha256"], sort_keys=True) for runs in hashed.values() for r in runs}
            if len(digests) != 1:
                raise SystemExit(f"the merged files' sha256 differ between runs or modes: {sorted(digests)}")
            after_s, during_s = (min(r["seconds"] for r in runs) for runs in hashed.values())
            print(json.dumps({"bench": "merge.sha256", "files": len(hashed["during"][0]["sha256"]),
                              "after_s": round(after_s, 3), "during_s": round(during_s, 3),
                              "speedup": round(after_s / during_s, 3), "during_ratio_to_copy": round(during_s / copy_s, 3)}),
                  flush=True)
        if not args.skip_peft:
            peft = run_child("peft", base, adapter, work / "peft-out", max_shard_bytes=args.max_shard_bytes)
            peft_fraction = (peft["peak_rss"] - peft["baseline_rss"]) / size
            print(json.dumps({"bench": "merge.peft", "seconds": round(peft["seconds"], 3), "cpu_s": round(peft["cpu_s"], 3),
                              "peak_rss_bytes": peft["peak_rss"], "baseline_rss_bytes": peft["baseline_rss"],
                              "rss_fraction": round(peft_fraction, 4), "loadavg_1m": os.getloadavg()[0]}), flush=True)
            worst, differing, total = max_abs_diff(work / "quiver-out", work / "peft-out")
            print(json.dumps({"bench": "merge.diff", "max_abs_diff": worst, "differing_elements": differing,
                              "elements": total}), flush=True)
            headline.update({"peft_s": round(peft["seconds"], 3), "peft_rss_fraction": round(peft_fraction, 4),
                             "max_abs_diff_vs_peft": worst})
        print(json.dumps(headline), flush=True)
        (work / "copy.safetensors").unlink(missing_ok=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
