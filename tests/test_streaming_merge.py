"""kernels.streaming_merge.merge_checkpoint on a real tiny Llama and real PEFT adapters
(plain with modules_to_save, rsLoRA, DoRA, rank/alpha patterns, two weighted adapters),
against PEFT's merge_and_unload() + save_pretrained(); sharding; atomic output; and the
peak memory of a ~220 MB merge measured in a subprocess. No database."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub.demo.builders import LLAMA_LINEAR, build_peft_adapter, build_tiny_llama
from hub.formats import parse_adapter, read_safetensors_header
from hub.formats.safetensors_header import BASE_MODEL_DTYPES
from kernels.streaming_merge import SafetensorsStreamWriter, merge_checkpoint
from tests.conftest import require_kernel

ROOT = Path(__file__).resolve().parent.parent


def sha256_of(paths: list[Path]) -> dict[str, str]:
    digests = {}
    for path in paths:
        with open(path, "rb") as handle:
            digests[path.name] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests

ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=LLAMA_LINEAR),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA_LINEAR),
    "pattern": dict(r=8, lora_alpha=16, target_modules=LLAMA_LINEAR,
                    rank_pattern={"k_proj": 2, r"layers\.1\.mlp\.down_proj": 3}, alpha_pattern={"v_proj": 4, "o_proj": 32}),
    "first": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "second": dict(r=6, lora_alpha=6, target_modules=["q_proj", "k_proj", "down_proj"]),
}


def files_in(folder: Path) -> dict[str, Path]:
    return {path.name: path for path in Path(folder).iterdir() if path.is_file() and not path.name.startswith(".")}


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        tensors = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(folder / shard))
        return tensors
    return load_file(folder / "model.safetensors")


def max_abs_diff(ours: dict, theirs: dict) -> float:
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    worst = 0.0
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape, name
        worst = max(worst, float((ours[name].double() - theirs[name].double()).abs().max()))
    return worst


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = build_tiny_llama(root / "base", seed=0)
    sharded = build_tiny_llama(root / "sharded", seed=0, max_shard_size=100_000)
    adapters = {}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items(), start=1):
        adapters[name] = build_peft_adapter(base, root / name, seed=seed, train_steps=2, **kwargs)
    return {"root": root, "base": base, "sharded": sharded, "adapters": adapters}


def peft_merged(base: Path, adapters: list[Path], out: Path, dtype: torch.dtype, weights=None) -> Path:
    """PEFT's own merge: from_pretrained → (add_weighted_adapter 'cat') → merge_and_unload → save_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    if len(adapters) > 1:
        for index, path in enumerate(adapters[1:], start=1):
            model.load_adapter(path, adapter_name=f"a{index}")
        names = [f"a{i}" for i in range(len(adapters))]
        model.add_weighted_adapter(names, weights, "combined", combination_type="cat")
        model.set_adapter("combined")
    model.merge_and_unload().save_pretrained(out)
    return out


def load_ours(out: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


CASES = [(name, dtype) for name in ("plain", "rslora", "dora", "pattern") for dtype in (None, "bfloat16")]


@pytest.mark.parametrize("name, dtype", CASES, ids=[f"{n}-{d or 'float32'}" for n, d in CASES])
def test_single_adapter_is_bit_exact_with_peft(built, name, dtype):
    root, base = built["root"], built["base"]
    adapter = parse_adapter(files_in(built["adapters"][name]))
    out = root / f"ours-{name}-{dtype}"
    calls, digests = [], {}
    written = merge_checkpoint(files_in(base), [(adapter, 1.0)], out, dtype=dtype, sha256=digests,
                               progress=lambda fraction, message: calls.append(fraction))
    assert [p.name for p in written] == ["config.json", "model.safetensors", "generation_config.json"]
    assert digests == sha256_of(written)  # hashed while written (bf16: through the fused kernel's writes)
    assert calls and calls[-1] == pytest.approx(1.0) and calls == sorted(calls)
    read_safetensors_header(out / "model.safetensors", allowed_dtypes=BASE_MODEL_DTYPES)  # our writer's header is valid
    model = load_ours(out)

    torch_dtype = getattr(torch, dtype or "float32")
    reference = peft_merged(base, [built["adapters"][name]], root / f"peft-{name}-{dtype}", torch_dtype)
    ours, theirs = weights_of(out), weights_of(reference)
    difference = max_abs_diff(ours, theirs)
    print(f"{name} {dtype or 'float32'}: max |quiver - peft| = {difference}")
    assert difference == 0.0  # bit-exact: same float32 ops, one rounding (see kernels.merge_reference)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor.to(ours[key].dtype), ours[key]), key
    if name == "plain":  # modules_to_save replaced the base tensor
        assert torch.equal(ours["lm_head.weight"], theirs["lm_head.weight"])
        assert not torch.equal(ours["lm_head.weight"], weights_of(base)["lm_head.weight"].to(torch_dtype))
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == (dtype or "float32")


def test_two_weighted_adapters_match_peft_cat(built):
    root, base, paths = built["root"], built["base"], built["adapters"]
    first, second = (parse_adapter(files_in(paths[name])) for name in ("first", "second"))
    out = root / "ours-two"
    merge_checkpoint(files_in(base), [(first, 0.7), (second, -0.4)], out)
    load_ours(out)
    reference = peft_merged(base, [paths["first"], paths["second"]], root / "peft-two", torch.float32, [0.7, -0.4])
    ours, theirs = weights_of(out), weights_of(reference)
    difference = max_abs_diff(ours, theirs)
    print(f"two adapters (0.7, -0.4): max |quiver - peft cat| = {difference}")
    # PEFT folds weight·scale into A and sums one rank-10 product; we sum two rank-4/6 products
    # in float32: the same value up to float32 rounding.
    assert difference < 1e-6
    changed = {k for k in ours if not torch.equal(ours[k], weights_of(base)[k])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")}


def test_dora_weights_and_mixed_adapters_follow_the_documented_rule(built):
    root, base, paths = built["root"], built["base"], built["adapters"]
    dora, first = parse_adapter(files_in(paths["dora"])), parse_adapter(files_in(paths["first"]))
    merge_checkpoint(files_in(base), [(dora, 0.5), (first, 2.0)], root / "ours-mixed")
    merged = weights_of(root / "ours-mixed")
    W = weights_of(base)
    name = "model.layers.0.self_attn.q_proj"
    expected = (W[name + ".weight"] + 0.5 * (dora.modules[name].merged_weight(W[name + ".weight"]) - W[name + ".weight"])
                + 2.0 * first.modules[name].delta_weight())
    torch.testing.assert_close(merged[name + ".weight"], expected, rtol=0, atol=1e-6)
    only_dora = "model.layers.0.mlp.gate_proj"  # DoRA at weight 0.5 alone: halfway to the DoRA merge
    halfway = 0.5 * (W[only_dora + ".weight"] + dora.modules[only_dora].merged_weight(W[only_dora + ".weight"]))
    torch.testing.assert_close(merged[only_dora + ".weight"], halfway, rtol=0, atol=1e-6)


def test_sharded_base_gives_sharded_output_like_transformers(built):
    root, paths = built["root"], built["adapters"]
    assert (built["sharded"] / "model.safetensors.index.json").exists()
    adapter = parse_adapter(files_in(paths["pattern"]))
    out = root / "ours-sharded"
    digests = {}
    written = merge_checkpoint(files_in(built["sharded"]), [(adapter, 1.0)], out, max_shard_bytes=100_000,
                               sha256=digests)
    assert digests == sha256_of(written)  # every shard hashed while written, two shards at a time
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert [p.name for p in written[:2]] == ["config.json", "model.safetensors.index.json"]
    assert sorted(p.name for p in written if p.name.startswith("model-")) == shards
    assert not (out / "model.safetensors").exists()
    total = 0
    for shard in shards:
        header = read_safetensors_header(out / shard, allowed_dtypes=BASE_MODEL_DTYPES)
        size = header.data_length
        assert size <= 100_000 or len(header.tensors) == 1
        assert all(index["weight_map"][name] == shard for name in header.tensors)
        total += size
    assert index["metadata"]["total_size"] == total
    load_ours(out)
    # the same merge from the single-file base, written as one file: identical tensors
    single = root / "ours-pattern-unsharded"
    merge_checkpoint(files_in(built["base"]), [(adapter, 1.0)], single)
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert max_abs_diff(weights_of(out), weights_of(single)) == 0.0
    # re-merging into the sharded folder as one file replaces the shards and the index
    merge_checkpoint(files_in(built["sharded"]), [(adapter, 1.0)], out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_the_stream_writer_takes_each_declared_tensor_once_in_any_order(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(5, dtype=torch.bfloat16),
               "c": torch.tensor([7], dtype=torch.int64)}
    dtypes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
    writer = SafetensorsStreamWriter(tmp_path / "out.safetensors",
                                     [(name, dtypes[t.dtype], tuple(t.shape)) for name, t in tensors.items()])
    writer.write_tensor("c", tensors["c"])
    with pytest.raises(ValueError, match="declared with 10 bytes, got 12"):
        writer.claim("b", 12)
    offset = writer.claim("a", 24)  # claimed now, written below
    writer.write_tensor("b", tensors["b"])
    for name, nbytes in (("b", 10), ("nope", 4)):
        with pytest.raises(ValueError, match="not declared, or was claimed already"):
            writer.claim(name, nbytes)
    writer.write_at(offset, memoryview(tensors["a"].numpy()).cast("B"))
    writer.close()
    loaded = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())

    unfinished = SafetensorsStreamWriter(tmp_path / "unfinished.safetensors", [("a", "F32", (2,)), ("b", "F32", (1,))])
    unfinished.write_tensor("b", torch.ones(1))
    with pytest.raises(ValueError, match="closed before tensor 'a' was written"):
        unfinished.close()


def test_two_workers_write_two_shards_at_a_time_with_the_same_bytes(built, monkeypatch):
    """Writes into one file take turns on its inode lock; with two workers two shards are written
    at once, their tasks interleaved (claims alternate between files), and every shard's bytes are
    those of the merge that writes shard after shard (one worker)."""
    adapter = parse_adapter(files_in(built["adapters"]["pattern"]))
    claims: list[str] = []
    claim = SafetensorsStreamWriter.claim
    monkeypatch.setattr(SafetensorsStreamWriter, "claim",
                        lambda self, name, nbytes: claims.append(self.path.name) or claim(self, name, nbytes))
    previous = torch.get_num_threads()
    outputs = {}
    try:
        for workers in (2, 1):
            torch.set_num_threads(workers)
            claims.clear()
            outputs[workers] = built["root"] / f"interleaved-{workers}"
            merge_checkpoint(files_in(built["sharded"]), [(adapter, 1.0)], outputs[workers], max_shard_bytes=100_000)
            files = list(dict.fromkeys(claims))  # in the order they were started
            assert len(files) > 2
            first_of_second = claims.index(files[1])
            last_of_first = len(claims) - 1 - claims[::-1].index(files[0])
            assert (first_of_second < last_of_first) == (workers == 2)
    finally:
        torch.set_num_threads(previous)
    shards = sorted(p.name for p in outputs[1].iterdir())
    assert shards == sorted(p.name for p in outputs[2].iterdir())
    for name in shards:
        assert (outputs[1] / name).read_bytes() == (outputs[2] / name).read_bytes()


def test_a_failed_merge_leaves_no_partial_files(built):
    root, base = built["root"], built["base"]
    adapter = parse_adapter(files_in(built["adapters"]["rslora"]))
    out = root / "ours-atomic"
    merge_checkpoint(files_in(base), [(adapter, 1.0)], out)
    before = {name: path.read_bytes() for name, path in files_in(out).items()}

    def fail(fraction, message):
        if fraction > 0.3:
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        merge_checkpoint(files_in(base), [(adapter, -1.0)], out, dtype="float16", progress=fail)
    assert sorted(path.name for path in out.iterdir()) == sorted(before)  # no temporaries left behind
    assert {name: path.read_bytes() for name, path in files_in(out).items()} == before
    empty = root / "ours-atomic-empty"
    with pytest.raises(RuntimeError):
        merge_checkpoint(files_in(base), [(adapter, 1.0)], empty, progress=fail)
    assert list(empty.iterdir()) == []


MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from hub.formats import CanonicalAdapter, LoraModule
    from kernels.streaming_merge import merge_checkpoint

    base, out = Path(sys.argv[1]), Path(sys.argv[2])
    shapes = json.loads(sys.argv[3])
    generator = torch.Generator().manual_seed(0)
    modules = {name[: -len(".weight")]: LoraModule(A=torch.randn(8, shape[1], generator=generator) * 0.01,
                                                   B=torch.randn(shape[0], 8, generator=generator) * 0.01, scale=2.0)
               for name, shape in shapes.items()}
    adapter = CanonicalAdapter(format="peft", peft_type="LORA", modules=modules, rank=8, alpha=16)

    def status(field):  # kB → bytes; VmHWM is this process's peak RSS (ru_maxrss would include the
        # parent's RSS at fork: Linux carries it across exec)
        line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    before = status("VmRSS")
    merge_checkpoint({"config.json": base / "config.json", "model.safetensors": base / "model.safetensors"},
                     [(adapter, 1.0)], out)
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
    """
)


def test_peak_memory_stays_well_below_the_checkpoint_size(tmp_path):
    """A ~220 MB bf16 Llama-shaped base: the merging process's peak RSS grows by a
    fraction of it (the mapping of the tensor being merged, a few row blocks, and a
    constant ~30-40 MB for the worker threads' allocator arenas and BLAS buffers)."""
    from safetensors.torch import save_file

    hidden, intermediate, vocab, layers = 1024, 2816, 4096, 8
    generator = torch.Generator().manual_seed(0)
    def weight(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": weight(vocab, hidden), "lm_head.weight": weight(vocab, hidden),
               "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    targets = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
                  "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
                  "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
                  "mlp.down_proj": (hidden, intermediate)}
        for name, shape in shapes.items():
            tensors[p + name + ".weight"] = weight(*shape)
            targets[p + name + ".weight"] = list(shape)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    base = tmp_path / "base"
    base.mkdir()
    save_file(tensors, str(base / "model.safetensors"))
    del tensors
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    size = (base / "model.safetensors").stat().st_size
    assert size > 200e6

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(base), str(tmp_path / "out"), json.dumps(targets)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    increase = measured["peak"] - measured["before"]
    print(f"checkpoint {size / 1e6:.0f} MB, peak RSS increase {increase / 1e6:.1f} MB ({increase / size:.3f}×)")
    assert increase < 0.3 * size
    merged = read_safetensors_header(tmp_path / "out" / "model.safetensors", allowed_dtypes=BASE_MODEL_DTYPES)
    assert merged.data_length == read_safetensors_header(base / "model.safetensors").data_length


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_base_merges_through_the_fused_cpu_kernel_with_the_torch_paths_and_peft_bits(built, monkeypatch,
                                                                                            dtype):
    """bf16 or float16 in and out: pieces of rows go through kernels/merge_cpu.c where this machine
    runs it, and the bytes are PEFT's (one rsLoRA adapter: a scale that is not a power of two) and
    the torch path's (two adapters with different targets, a rank pattern and weights 1 and −0.3)."""
    from kernels import merge_cpu

    require_kernel(getattr(torch, dtype))
    calls = []
    kernel = merge_cpu.merge_rows_to_file
    monkeypatch.setattr(merge_cpu, "merge_rows_to_file", lambda *args: calls.append(1) or kernel(*args))
    root = built["root"]
    base = root / f"base-{dtype}"
    merge_checkpoint(files_in(built["base"]), [], base, dtype=dtype)

    rslora = built["adapters"]["rslora"]
    merge_checkpoint(files_in(base), [(parse_adapter(files_in(rslora)), 1.0)], root / f"fused-rslora-{dtype}")
    assert calls
    reference = peft_merged(base, [rslora], root / f"peft-rslora-{dtype}", getattr(torch, dtype))
    assert max_abs_diff(weights_of(root / f"fused-rslora-{dtype}"), weights_of(reference)) == 0.0

    adapters = [(parse_adapter(files_in(built["adapters"][name])), weight)
                for name, weight in (("pattern", 1.0), ("second", -0.3))]
    merge_checkpoint(files_in(base), adapters, root / f"fused-two-{dtype}")
    monkeypatch.setattr(merge_cpu, "available", lambda dtype=None: False)
    calls.clear()
    merge_checkpoint(files_in(base), adapters, root / f"torch-two-{dtype}")
    assert not calls
    torch_bytes = (root / f"torch-two-{dtype}" / "model.safetensors").read_bytes()
    assert (root / f"fused-two-{dtype}" / "model.safetensors").read_bytes() == torch_bytes
    if merge_cpu.chosen_variant() != "avx2" and "avx2" in merge_cpu.runnable_variants():
        monkeypatch.undo()  # the real available() and kernel again, now the AVX2 build
        monkeypatch.setenv("QUIVER_CPU_KERNEL", "avx2")
        assert merge_cpu._kernel() is merge_cpu._load("avx2") is not None
        monkeypatch.setattr(merge_cpu, "merge_rows_to_file", lambda *args: calls.append(1) or kernel(*args))
        merge_checkpoint(files_in(base), adapters, root / f"fused-two-avx2-{dtype}")
        assert calls
        assert (root / f"fused-two-avx2-{dtype}" / "model.safetensors").read_bytes() == torch_bytes
