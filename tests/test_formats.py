"""hub.formats on real files: PEFT adapters, kohya / diffusers single files and
base models built by hub.demo.builders (PEFT + transformers, fixed seeds).
Bad inputs are real files corrupted on disk, never hand-made tensors.

No Django: run with `pytest tests/test_formats.py -p no:django`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file as _load_mapped  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hub.demo.builders import (  # noqa: E402
    CLIP_ATTENTION,
    DEMO_ADAPTERS,
    DEMO_BASE_MODELS,
    base_weight_files,
    build_demo_files,
    build_peft_adapter,
    build_tiny_clip_vision,
    build_tiny_llama,
    full_name,
    upload_files,
)
from hub.formats import (  # noqa: E402
    FormatError,
    detect_adapter_format,
    parse_adapter,
    parse_base_model,
    read_safetensors_header,
    refuse_pickle,
    summarize_adapter,
    write_peft_adapter,
)
from hub.formats.base_model import read_probe_texts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


# ----------------------------------------------------------------------
# Fixtures: the demo catalog, built once per session


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict[str, dict]:
    """Every demo entry by short name, built into a session temp dir."""
    catalog = build_demo_files(tmp_path_factory.mktemp("demo"))
    return {entry["name"]: entry for entry in catalog["base_models"] + catalog["adapters"]}


@pytest.fixture(scope="session")
def bases(demo) -> dict:
    """full base-model name → BaseModelInfo."""
    return {full_name(demo[e["name"]]): parse_base_model(upload_files(demo[e["name"]])) for e in DEMO_BASE_MODELS}


def shapes_for(demo, bases, adapter: str) -> dict:
    return bases[demo[adapter]["base_model"]].shapes


def copied_upload(entry: dict, to: Path) -> dict[str, Path]:
    """A private copy of an entry's files, safe to corrupt."""
    to.mkdir(parents=True, exist_ok=True)
    return {name: Path(shutil.copy(path, to / name)) for name, path in upload_files(entry).items()}


def expect_error(code: str, call, *args, **kwargs) -> FormatError:
    with pytest.raises(FormatError) as caught:
        call(*args, **kwargs)
    assert caught.value.code == code, caught.value.message
    return caught.value


def load_peft_model(base_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    config = json.loads((Path(base_dir) / "config.json").read_text())
    causal = any(a.endswith("ForCausalLM") for a in config.get("architectures", []))
    base = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def peft_lora_layers(peft_model) -> dict:
    """module path (as in the base's state dict) → PEFT LoraLayer."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.r
    }


# Safetensors surgery on real files.


def load_file(path: str) -> dict[str, torch.Tensor]:
    """safetensors' load_file maps the file into memory; rewriting that file
    while its tensors live would crash the process (SIGBUS), so copy."""
    return {name: tensor.clone() for name, tensor in _load_mapped(path).items()}


def read_raw(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_raw(path: Path, header: dict, body: bytes, pad_to: int | None = None) -> None:
    raw = json.dumps(header).encode()
    if pad_to is not None:
        raw = raw.ljust(pad_to)  # the format allows trailing spaces in the header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def first_lora_b(header: dict) -> str:
    return sorted(k for k in header if k.endswith("lora_B.weight"))[0]


# ----------------------------------------------------------------------
# PEFT adapters


def test_peft_plain_round_trip(demo, bases):
    entry = demo["ticket-summarizer"]
    adapter = parse_adapter(upload_files(entry), base_shapes=shapes_for(demo, bases, "ticket-summarizer"))
    stored = load_file(str(entry["dir"] / ADAPTER_WEIGHTS))

    assert adapter.format == "peft" and adapter.peft_type == "LORA"
    assert sorted(adapter.modules) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    for path, module in adapter.modules.items():
        assert torch.equal(module.A, stored[f"base_model.model.{path}.lora_A.weight"])
        assert torch.equal(module.B, stored[f"base_model.model.{path}.lora_B.weight"])
        assert module.scale == 8 / 4 and module.rank == 4 and module.shape == (64, 64)
        assert module.B.abs().max() > 0  # trained, not the zero init
    summary = summarize_adapter(adapter)
    json.dumps(summary)  # JSON-able
    assert summary["rank"] == 4 and summary["alpha"] == 8
    assert summary["target_modules"] == ["q_proj", "v_proj"]
    assert summary["module_shapes"]["model.layers.0.self_attn.q_proj"] == [64, 64]
    assert summary["dtype"] == "float32" and summary["module_count"] == 4
    assert summary["parameter_count"] == sum(t.numel() for t in stored.values())
    assert adapter.config["base_model_name_or_path"] == "quiver-demo/tiny-llama"


@pytest.mark.parametrize(
    "name",
    ["ticket-summarizer", "contract-plain-language-rslora", "recipe-steps-dora", "code-review-comments",
     "product-search-minilm"],
)
def test_peft_rank_scale_and_delta_match_peft(demo, bases, name):
    """Per module: rank, scale and ΔW equal what PEFT itself loads."""
    entry = demo[name]
    adapter = parse_adapter(upload_files(entry), base_shapes=shapes_for(demo, bases, name))
    layers = peft_lora_layers(load_peft_model(demo[entry["base_model"].split("/")[1]]["dir"], entry["dir"]))

    assert sorted(layers) == sorted(adapter.modules)
    for path, layer in layers.items():
        module = adapter.modules[path]
        assert module.rank == layer.r["default"]
        assert module.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        torch.testing.assert_close(module.delta_weight(), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-7)
        if adapter.use_dora:
            torch.testing.assert_close(module.magnitude, layer.lora_magnitude_vector["default"].weight.detach())


def test_rslora_scale_is_alpha_over_sqrt_r(demo):
    adapter = parse_adapter(upload_files(demo["contract-plain-language-rslora"]))
    assert adapter.use_rslora and adapter.rank == 16
    assert {m.scale for m in adapter.modules.values()} == {16 / math.sqrt(16)}


def test_rank_pattern_and_alpha_pattern_per_module(demo):
    adapter = parse_adapter(upload_files(demo["code-review-comments"]))
    ranks = {path: m.rank for path, m in adapter.modules.items()}
    scales = {path: m.scale for path, m in adapter.modules.items()}
    layer = "model.layers.{}.{}"
    assert ranks[layer.format(0, "self_attn.k_proj")] == 2 and scales[layer.format(0, "self_attn.k_proj")] == 16 / 2
    assert ranks[layer.format(1, "self_attn.v_proj")] == 2 and scales[layer.format(1, "self_attn.v_proj")] == 4 / 2
    assert ranks[layer.format(0, "self_attn.o_proj")] == 8 and scales[layer.format(0, "self_attn.o_proj")] == 32 / 8
    assert ranks[layer.format(1, "mlp.down_proj")] == 2 and scales[layer.format(1, "mlp.down_proj")] == 16 / 2
    assert ranks[layer.format(0, "mlp.down_proj")] == 8 and scales[layer.format(0, "mlp.down_proj")] == 16 / 8
    assert summarize_adapter(adapter)["rank_pattern"] == {"k_proj": 2, "v_proj": 2, r"layers\.1\.mlp\.down_proj": 2}


def test_dora_merge_matches_peft_merge(demo):
    entry = demo["recipe-steps-dora"]
    adapter = parse_adapter(upload_files(entry))
    base_weights = load_file(str(demo["tiny-llama"]["dir"] / "model.safetensors"))
    merged = load_peft_model(demo["tiny-llama"]["dir"], entry["dir"]).merge_and_unload().state_dict()
    for path, module in adapter.modules.items():
        assert module.magnitude is not None and module.magnitude.shape == (64,)
        torch.testing.assert_close(module.merged_weight(base_weights[path + ".weight"]), merged[path + ".weight"])


def test_minilm_adapter_names_are_the_base_files_names(demo, bases):
    """No prefix juggling: PEFT on AutoModel(MiniLM) saves exactly the names of its model.safetensors."""
    adapter = parse_adapter(upload_files(demo["product-search-minilm"]))
    base = bases["quiver-demo/all-MiniLM-L6-v2"].shapes
    assert all(path + ".weight" in base for path in adapter.modules)
    assert {p.rsplit(".", 1)[1] for p in adapter.modules} == {"query", "value"} and len(adapter.modules) == 12


def test_embedding_lora_and_modules_to_save(demo, bases, tmp_path):
    llama_dir = demo["tiny-llama"]["dir"]
    out = build_peft_adapter(
        llama_dir, tmp_path / "emb", r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"],
        modules_to_save=["lm_head"], train_steps=2,
    )
    adapter = parse_adapter(
        {ADAPTER_CONFIG: out / ADAPTER_CONFIG, ADAPTER_WEIGHTS: out / ADAPTER_WEIGHTS},
        base_shapes=bases["quiver-demo/tiny-llama"].shapes,
    )
    embedding = adapter.modules["model.embed_tokens"]
    assert embedding.kind == "embedding" and embedding.shape == (64, 256)  # ΔWᵀ: base weight is 256 × 64
    assert sorted(adapter.extra_tensors) == ["lm_head.weight", "model.embed_tokens.weight"]
    layers = peft_lora_layers(load_peft_model(llama_dir, out))
    for path, layer in layers.items():
        torch.testing.assert_close(adapter.modules[path].delta_weight(), layer.get_delta_weight("default"))
    expect_error("unsupported_feature", write_peft_adapter, adapter, tmp_path / "export")


def test_conv_lora_is_flattened_and_matches_peft(tmp_path):
    vision_dir = build_tiny_clip_vision(tmp_path / "vision")
    out = build_peft_adapter(
        vision_dir, tmp_path / "conv", r=4, lora_alpha=4, target_modules=["patch_embedding"], train_steps=2
    )
    base = parse_base_model(upload_files({"files": base_weight_files(vision_dir)}))
    adapter = parse_adapter(
        {ADAPTER_CONFIG: out / ADAPTER_CONFIG, ADAPTER_WEIGHTS: out / ADAPTER_WEIGHTS}, base_shapes=base.shapes
    )
    conv = adapter.modules["embeddings.patch_embedding"]
    assert conv.kind == "conv" and conv.conv_shape == (4, 3, 8, 8)
    assert conv.A.shape == (4, 3 * 8 * 8) and conv.B.shape == (32, 4)
    layer = peft_lora_layers(load_peft_model(vision_dir, out))["embeddings.patch_embedding"]
    torch.testing.assert_close(conv.delta_weight(), layer.get_delta_weight("default"))


# ----------------------------------------------------------------------
# kohya and diffusers single files


CLIP_MODULES = sorted(f"encoder.layers.{i}.self_attn.{p}" for i in range(2) for p in CLIP_ATTENTION)


@pytest.fixture(scope="session")
def clip_source_lora(demo, tmp_path_factory):
    """The PEFT LoRA the kohya demo file was made from (same recipe, same seed)."""
    kwargs = next(e for e in DEMO_ADAPTERS if e["name"] == "watercolor-style-kohya")["builder_kwargs"]
    return build_peft_adapter(
        demo["tiny-clip-text"]["dir"], tmp_path_factory.mktemp("clip-peft"),
        r=kwargs["r"], lora_alpha=kwargs["alpha"], target_modules=CLIP_ATTENTION, seed=kwargs["seed"],
    )


def test_kohya_without_base_keeps_mangled_names(demo):
    adapter = parse_adapter(upload_files(demo["watercolor-style-kohya"]))
    assert adapter.format == "kohya"
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in adapter.modules
    assert {m.scale for m in adapter.modules.values()} == {2.0 / 4}
    summary = summarize_adapter(adapter)
    assert summary["rank"] == 4 and summary["alpha"] == 2.0
    assert summary["target_modules"] == ["self_attn_k_proj", "self_attn_out_proj", "self_attn_q_proj", "self_attn_v_proj"]
    assert adapter.config["ss_network_dim"] == "4"  # kohya's training metadata is kept


def test_kohya_with_base_resolves_clip_module_paths(demo, bases, clip_source_lora):
    shapes = bases["quiver-demo/tiny-clip-text"].shapes
    adapter = parse_adapter(upload_files(demo["watercolor-style-kohya"]), base_shapes=shapes)
    assert sorted(adapter.modules) == CLIP_MODULES
    assert summarize_adapter(adapter)["target_modules"] == sorted(CLIP_ATTENTION)

    # The same file against a transformers-4 style base ("text_model." prefix): exact mangled match.
    legacy = {"text_model." + name: shape for name, shape in shapes.items()}
    assert sorted(parse_adapter(upload_files(demo["watercolor-style-kohya"]), base_shapes=legacy).modules) == [
        "text_model." + name for name in CLIP_MODULES
    ]

    layers = peft_lora_layers(load_peft_model(demo["tiny-clip-text"]["dir"], clip_source_lora))
    for path, layer in layers.items():
        torch.testing.assert_close(adapter.modules[path].delta_weight(), layer.get_delta_weight("default"))


def test_diffusers_with_and_without_base(demo, bases):
    files = upload_files(demo["pixel-art-diffusers"])
    assert detect_adapter_format(files) == "diffusers"
    plain = parse_adapter(files)
    assert sorted(plain.modules) == ["text_encoder.text_model." + name for name in CLIP_MODULES]
    assert {m.scale for m in plain.modules.values()} == {1.0}  # no alpha stored: alpha = r
    resolved = parse_adapter(files, base_shapes=bases["quiver-demo/tiny-clip-text"].shapes)
    assert sorted(resolved.modules) == CLIP_MODULES
    for path, module in resolved.modules.items():
        assert torch.equal(module.A, plain.modules["text_encoder.text_model." + path].A)


def test_diffusers_embedded_lora_config_sets_scale(demo, tmp_path):
    """diffusers ≥ 0.33 embeds the LoraConfig in the safetensors metadata."""
    source = upload_files(demo["pixel-art-diffusers"])["pytorch_lora_weights.safetensors"]
    target = tmp_path / "pytorch_lora_weights.safetensors"
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({"text_encoder.r": 4, "text_encoder.lora_alpha": 8})}
    save_file(load_file(str(source)), str(target), metadata=metadata)
    assert {m.scale for m in parse_adapter({target.name: target}).modules.values()} == {2.0}


def test_kohya_round_trip_through_peft_export_matches_source(demo, bases, clip_source_lora, tmp_path):
    """kohya file → canonical → PEFT files → PeftModel gives the source LoRA's outputs."""
    clip_dir = demo["tiny-clip-text"]["dir"]
    adapter = parse_adapter(
        upload_files(demo["watercolor-style-kohya"]), base_shapes=bases["quiver-demo/tiny-clip-text"].shapes
    )
    write_peft_adapter(adapter, tmp_path / "exported")
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_peft_model(clip_dir, clip_source_lora)(input_ids=ids).last_hidden_state
        actual = load_peft_model(clip_dir, tmp_path / "exported")(input_ids=ids).last_hidden_state
    torch.testing.assert_close(actual, expected)


# ----------------------------------------------------------------------
# Refused inputs (real files, corrupted)


def test_pickle_refused_by_name_and_content(demo, tmp_path):
    upload = copied_upload(demo["ticket-summarizer"], tmp_path)
    expect_error("pickle_refused", parse_adapter, {ADAPTER_CONFIG: upload[ADAPTER_CONFIG], "adapter_model.bin": upload[ADAPTER_WEIGHTS]})
    for name in ("model.ckpt", "weights.pt", "x.pth", "y.pkl", "z.pickle", "pytorch_model.bin"):
        expect_error("pickle_refused", refuse_pickle, name, b"")

    tensors = load_file(str(upload[ADAPTER_WEIGHTS]))
    torch.save(tensors, upload[ADAPTER_WEIGHTS])  # zip archive with a pickle inside
    error = expect_error("pickle_refused", parse_adapter, upload)
    assert error.filename == ADAPTER_WEIGHTS and "zip" in error.message
    torch.save(tensors, upload[ADAPTER_WEIGHTS], _use_new_zipfile_serialization=False)  # bare pickle
    assert upload[ADAPTER_WEIGHTS].read_bytes()[:2] == b"\x80\x02"
    expect_error("pickle_refused", parse_adapter, upload)


def test_safetensors_whose_length_looks_like_pickle_magic_is_accepted(demo, tmp_path):
    """A header padded to 896 bytes starts 80 03 00 .., like pickle protocol 3."""
    upload = copied_upload(demo["ticket-summarizer"], tmp_path)
    header, body = read_raw(upload[ADAPTER_WEIGHTS])
    length = next(n for n in (640, 896, 1152, 1408) if n >= len(json.dumps(header)))
    write_raw(upload[ADAPTER_WEIGHTS], header, body, pad_to=length)
    assert upload[ADAPTER_WEIGHTS].read_bytes()[0] == 0x80
    refuse_pickle(ADAPTER_WEIGHTS, upload[ADAPTER_WEIGHTS].read_bytes()[:8])  # the 8 bytes the upload view checks
    assert len(parse_adapter(upload).modules) == 4


def test_truncated_file(demo, tmp_path):
    upload = copied_upload(demo["ticket-summarizer"], tmp_path)
    data = upload[ADAPTER_WEIGHTS].read_bytes()
    upload[ADAPTER_WEIGHTS].write_bytes(data[:-100])
    error = expect_error("truncated_file", parse_adapter, upload)
    assert ADAPTER_WEIGHTS in error.message and "truncated" in error.message
    upload[ADAPTER_WEIGHTS].write_bytes(data[:5])
    expect_error("truncated_file", parse_adapter, upload)


def test_header_length_past_end_of_file(demo, tmp_path):
    upload = copied_upload(demo["ticket-summarizer"], tmp_path)
    data = upload[ADAPTER_WEIGHTS].read_bytes()
    upload[ADAPTER_WEIGHTS].write_bytes(struct.pack("<Q", len(data)) + data[8:])
    expect_error("header_out_of_bounds", parse_adapter, upload)


def test_oversized_header_refused_before_reading(demo):
    path = upload_files(demo["ticket-summarizer"])[ADAPTER_WEIGHTS]
    expect_error("header_too_large", read_safetensors_header, path, max_header_bytes=64)


def test_overlapping_offsets(demo, tmp_path):
    upload = copied_upload(demo["ticket-summarizer"], tmp_path)
    header, body = read_raw(upload[ADAPTER_WEIGHTS])
    names = sorted(k for k in header if k != "__metadata__")
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
    write_raw(upload[ADAPTER_WEIGHTS], header, body)
    error = expect_error("overlapping_offsets", parse_adapter, upload)
    assert names[0] in error.message or names[1] in error.message


def test_offsets_with_wrong_size_or_gap(demo, tmp_path):
    upload = copied_upload(demo["ticket-summarizer"], tmp_path)
    header, body = read_raw(upload[ADAPTER_WEIGHTS])
    key = first_lora_b(header)
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin, end - 4]  # one float short of its shape
    write_raw(upload[ADAPTER_WEIGHTS], header, body)
    expect_error("bad_offsets", parse_adapter, upload)

    header, body = read_raw(copied_upload(demo["ticket-summarizer"], tmp_path / "fresh")[ADAPTER_WEIGHTS])
    write_raw(upload[ADAPTER_WEIGHTS], header, body + b"\0" * 16)  # trailing bytes nobody describes
    expect_error("bad_offsets", parse_adapter, upload)


def test_dtype_not_allowed(demo, tmp_path):
    upload = copied_upload(demo["ticket-summarizer"], tmp_path)
    header, body = read_raw(upload[ADAPTER_WEIGHTS])
    key = first_lora_b(header)
    header[key]["dtype"] = "I32"  # same item size, so only the dtype is wrong
    write_raw(upload[ADAPTER_WEIGHTS], header, body)
    error = expect_error("dtype_not_allowed", parse_adapter, upload)
    assert key in error.message
    # ...while a base model may hold I32 tensors
    assert read_safetensors_header(upload[ADAPTER_WEIGHTS], allowed_dtypes=frozenset({"F32", "I32"}))


def test_nan_in_a_real_tensor(demo, tmp_path):
    upload = copied_upload(demo["ticket-summarizer"], tmp_path)
    tensors = load_file(str(upload[ADAPTER_WEIGHTS]))
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[-1]
    tensors[key][3, 1] = float("nan")
    save_file(tensors, str(upload[ADAPTER_WEIGHTS]), metadata={"format": "pt"})
    error = expect_error("non_finite", parse_adapter, upload)
    assert key in error.message and error.filename == ADAPTER_WEIGHTS
    tensors[key][3, 1] = float("inf")
    save_file(tensors, str(upload[ADAPTER_WEIGHTS]), metadata={"format": "pt"})
    expect_error("non_finite", parse_adapter, upload)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_check_finite_finds_every_nan_and_infinity_wherever_it_is(dtype):
    from hub.formats.safetensors_header import check_finite

    for size in (1, 7, 16, 1000, 4099):  # lengths around vector widths and a tail
        clean = torch.randn(size).to(dtype) * 100
        check_finite(clean, "f", "t")
        for position in {0, size // 2, size - 1}:
            for value in (float("nan"), float("inf"), float("-inf")):
                dirty = clean.clone()
                dirty[position] = value
                with pytest.raises(FormatError, match="1 NaN or infinite"):
                    check_finite(dirty.reshape(1, -1) if size % 2 else dirty, "f", "t")
    check_finite(torch.empty(0, 3, dtype=dtype), "f", "t")  # nothing to check
    check_finite(torch.tensor([2**31 - 1]), "f", "t")  # integers are always finite


def test_shape_mismatch_against_a_different_base(demo, bases, tmp_path):
    narrow = parse_base_model(upload_files({"files": base_weight_files(build_tiny_llama(tmp_path / "narrow", hidden_size=32))}))
    error = expect_error("shape_mismatch", parse_adapter, upload_files(demo["ticket-summarizer"]), base_shapes=narrow.shapes)
    assert "model.layers.0.self_attn.q_proj" in error.message and "[64, 64]" in error.message and "[32, 32]" in error.message
    # modules the base does not have at all
    error = expect_error(
        "shape_mismatch", parse_adapter, upload_files(demo["product-search-minilm"]),
        base_shapes=bases["quiver-demo/tiny-llama"].shapes,
    )
    assert "does not exist in the base model" in error.message
    expect_error(
        "shape_mismatch", parse_adapter, upload_files(demo["watercolor-style-kohya"]),
        base_shapes=bases["quiver-demo/tiny-llama"].shapes,
    )


def test_base_prefix_difference_accepted_only_when_unique(demo, bases):
    shapes = bases["quiver-demo/tiny-llama"].shapes
    without_model_prefix = {name.removeprefix("model."): shape for name, shape in shapes.items()}
    adapter = parse_adapter(upload_files(demo["ticket-summarizer"]), base_shapes=without_model_prefix)
    assert "layers.0.self_attn.q_proj" in adapter.modules
    wrapped = {"text_tower." + name: shape for name, shape in shapes.items()}  # base has an extra prefix
    adapter = parse_adapter(upload_files(demo["ticket-summarizer"]), base_shapes=wrapped)
    assert "text_tower.model.layers.0.self_attn.q_proj" in adapter.modules
    ambiguous = {**wrapped, **{"vision_tower." + name: shape for name, shape in shapes.items()}}
    error = expect_error("shape_mismatch", parse_adapter, upload_files(demo["ticket-summarizer"]), base_shapes=ambiguous)
    assert "several base modules" in error.message


def test_rank_mismatch_with_config(demo, tmp_path):
    upload = copied_upload(demo["ticket-summarizer"], tmp_path)
    config = json.loads(upload[ADAPTER_CONFIG].read_text())
    config["r"] = 8
    upload[ADAPTER_CONFIG].write_text(json.dumps(config))
    error = expect_error("rank_mismatch", parse_adapter, upload)
    assert "r=8" in error.message


def test_missing_lora_b(demo, tmp_path):
    upload = copied_upload(demo["ticket-summarizer"], tmp_path)
    tensors = load_file(str(upload[ADAPTER_WEIGHTS]))
    del tensors[first_lora_b(tensors)]
    save_file(tensors, str(upload[ADAPTER_WEIGHTS]))
    expect_error("missing_tensor", parse_adapter, upload)


def test_config_problems(demo, tmp_path):
    upload = copied_upload(demo["ticket-summarizer"], tmp_path)
    original = json.loads(upload[ADAPTER_CONFIG].read_text())
    for change, code in [
        ({"peft_type": "LOHA"}, "unsupported_peft_type"),
        ({"peft_type": 3}, "invalid_config"),
        ({"r": "four"}, "invalid_config"),
        ({"lora_alpha": True}, "invalid_config"),
        ({"rank_pattern": {"q_proj": 0}}, "invalid_config"),
        ({"target_modules": ["k_proj"]}, "invalid_config"),  # weights for modules the config does not target
        ({"lora_bias": True}, "unsupported_feature"),
        ({"use_dora": True}, "missing_tensor"),
    ]:
        upload[ADAPTER_CONFIG].write_text(json.dumps({**original, **change}))
        expect_error(code, parse_adapter, upload)
    upload[ADAPTER_CONFIG].write_text("[1, 2]")
    expect_error("invalid_config", parse_adapter, upload)
    upload[ADAPTER_CONFIG].write_text("{not json")
    expect_error("invalid_config", parse_adapter, upload)


def test_unknown_format_and_missing_files(demo, tmp_path):
    base_weights = demo["tiny-llama"]["dir"] / "model.safetensors"  # a model, not an adapter
    expect_error("unknown_format", parse_adapter, {"model.safetensors": base_weights})
    readme = tmp_path / "README.md"
    readme.write_text("# hello")
    expect_error("unknown_format", parse_adapter, {"README.md": readme})
    upload = upload_files(demo["ticket-summarizer"])
    expect_error("missing_file", parse_adapter, {ADAPTER_CONFIG: upload[ADAPTER_CONFIG]})
    expect_error("missing_file", parse_adapter, {ADAPTER_WEIGHTS: upload[ADAPTER_WEIGHTS]})
    renamed = Path(shutil.copy(upload[ADAPTER_WEIGHTS], tmp_path / "lora.safetensors"))
    expect_error("missing_file", parse_adapter, {"lora.safetensors": renamed})  # PEFT keys, config missing
    assert len(parse_adapter({**upload, "README.md": readme}).modules) == 4  # extra files are ignored


def test_lycoris_single_file_refused(demo, tmp_path):
    tensors = load_file(str(upload_files(demo["watercolor-style-kohya"])["watercolor-style-kohya.safetensors"]))
    renamed = {k.replace("lora_down.weight", "hada_w1_a").replace("lora_up.weight", "hada_w1_b"): v for k, v in tensors.items()}
    path = tmp_path / "loha.safetensors"
    save_file(renamed, str(path))
    expect_error("unsupported_peft_type", parse_adapter, {path.name: path})


def test_empty_files(demo, tmp_path):
    upload = copied_upload(demo["ticket-summarizer"], tmp_path)
    upload[ADAPTER_WEIGHTS].write_bytes(b"")
    error = expect_error("empty_file", parse_adapter, upload)
    assert error.filename == ADAPTER_WEIGHTS
    empty = tmp_path / "lora.safetensors"
    empty.write_bytes(b"")
    expect_error("empty_file", parse_adapter, {empty.name: empty})
    upload = copied_upload(demo["ticket-summarizer"], tmp_path / "b")
    upload[ADAPTER_CONFIG].write_bytes(b"")
    expect_error("empty_file", parse_adapter, upload)


# ----------------------------------------------------------------------
# Base models


def test_base_model_single_file(demo, bases):
    from transformers import AutoModelForCausalLM

    info = bases["quiver-demo/tiny-llama"]
    model = AutoModelForCausalLM.from_pretrained(demo["tiny-llama"]["dir"])
    assert info.architecture == "LlamaForCausalLM" and info.model_type == "llama"
    assert info.shapes == {name: list(t.shape) for name, t in model.state_dict().items()}
    assert info.parameter_count == sum(t.numel() for t in model.state_dict().values())
    assert info.dtype == "float32" and info.weight_files == ["model.safetensors"]
    assert info.config["hidden_size"] == 64

    minilm = bases["quiver-demo/all-MiniLM-L6-v2"]
    assert minilm.architecture == "BertModel" and minilm.shapes["encoder.layer.0.attention.self.query.weight"] == [384, 384]
    assert minilm.shapes["embeddings.position_ids"] == [1, 512]  # an I64 buffer is fine in a base model
    assert bases["quiver-demo/tiny-clip-text"].architecture == "CLIPTextModel"


def test_base_model_headers_only(demo, tmp_path):
    """Values are not read: a NaN in the weights does not stop registration."""
    upload = copied_upload(demo["tiny-llama"], tmp_path)
    tensors = load_file(str(upload["model.safetensors"]))
    tensors["lm_head.weight"][0, 0] = float("nan")
    save_file(tensors, str(upload["model.safetensors"]), metadata={"format": "pt"})
    assert parse_base_model(upload).parameter_count > 0


def test_base_model_sharded(demo, bases, tmp_path):
    sharded_dir = build_tiny_llama(tmp_path / "sharded", max_shard_size="200KB")
    files = upload_files({"files": base_weight_files(sharded_dir)})
    shards = sorted(name for name in files if name.startswith("model-"))
    assert len(shards) > 1
    info = parse_base_model(files)
    single = bases["quiver-demo/tiny-llama"]
    assert info.shapes == single.shapes and info.parameter_count == single.parameter_count
    assert info.weight_files == shards

    expect_error("missing_file", parse_base_model, {n: p for n, p in files.items() if n != shards[-1]})
    expect_error("missing_file", parse_base_model, {n: p for n, p in files.items() if n != "model.safetensors.index.json"})
    index = json.loads(files["model.safetensors.index.json"].read_text())
    shard_sizes = {shard: list(index["weight_map"].values()).count(shard) for shard in shards}
    tensor = next(t for t, shard in index["weight_map"].items() if shard_sizes[shard] > 1)
    index["weight_map"][tensor] = next(s for s in shards if s != index["weight_map"][tensor])
    bad_index = tmp_path / "model.safetensors.index.json"
    bad_index.write_text(json.dumps(index))
    error = expect_error("invalid_index", parse_base_model, {**files, "model.safetensors.index.json": bad_index})
    assert tensor in error.message
    expect_error(
        "unknown_format", parse_base_model, {**files, "model.safetensors": demo["tiny-llama"]["dir"] / "model.safetensors"}
    )


def test_base_model_bad_config_and_pickle(demo, tmp_path):
    upload = copied_upload(demo["tiny-llama"], tmp_path)
    config = json.loads(upload["config.json"].read_text())
    del config["model_type"]
    upload["config.json"].write_text(json.dumps(config))
    expect_error("invalid_config", parse_base_model, upload)
    expect_error("missing_file", parse_base_model, {"model.safetensors": upload["model.safetensors"]})
    upload = copied_upload(demo["tiny-llama"], tmp_path / "b")
    expect_error("pickle_refused", parse_base_model, {"config.json": upload["config.json"], "pytorch_model.bin": upload["model.safetensors"]})
    upload["model.safetensors"].write_bytes(upload["model.safetensors"].read_bytes()[:-10])
    expect_error("truncated_file", parse_base_model, upload)


def test_base_model_probe_texts_are_checked(demo, tmp_path):
    upload = copied_upload(demo["tiny-llama"], tmp_path)
    probes = tmp_path / "probe_texts.json"
    probes.write_text(json.dumps({"texts": ["Anna Nowak", "ul. Polna 3, Kraków"]}))
    assert parse_base_model({**upload, "probe_texts.json": probes}).parameter_count > 0
    assert read_probe_texts(probes) == ["Anna Nowak", "ul. Polna 3, Kraków"]
    for bad in ([], {"texts": []}, {"texts": ["ok", ""]}, {"texts": ["ok", 3]}, {"texts": ["x" * 2001]},
                {"texts": "one string"}):
        probes.write_text(json.dumps(bad))
        error = expect_error("invalid_config", parse_base_model, {**upload, "probe_texts.json": probes})
        assert error.filename == "probe_texts.json"


# ----------------------------------------------------------------------
# Export back to PEFT


@pytest.mark.parametrize("name", ["ticket-summarizer", "recipe-steps-dora", "code-review-comments",
                                  "contract-plain-language-rslora"])
def test_write_peft_adapter_round_trip(demo, tmp_path, name):
    entry = demo[name]
    adapter = parse_adapter(upload_files(entry))
    written = write_peft_adapter(adapter, tmp_path / "out")
    assert [p.name for p in written] == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]

    again = parse_adapter({p.name: p for p in written})
    assert sorted(again.modules) == sorted(adapter.modules)
    for path, module in adapter.modules.items():
        assert torch.equal(again.modules[path].A, module.A) and torch.equal(again.modules[path].B, module.B)
        assert again.modules[path].scale == pytest.approx(module.scale, rel=1e-12)
        if module.magnitude is not None:
            assert torch.equal(again.modules[path].magnitude, module.magnitude)

    llama_dir = demo["tiny-llama"]["dir"]
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = load_peft_model(llama_dir, entry["dir"])(input_ids=ids).logits
        actual = load_peft_model(llama_dir, tmp_path / "out")(input_ids=ids).logits
    torch.testing.assert_close(actual, expected)


# ----------------------------------------------------------------------
# Demo builders


def test_tiny_llama_is_deterministic(tmp_path):
    first = build_tiny_llama(tmp_path / "a", seed=3)
    second = build_tiny_llama(tmp_path / "b", seed=3)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    other = build_tiny_llama(tmp_path / "c", seed=4)
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_demo_catalog_is_complete_and_cached(demo, tmp_path_factory):
    names = {e["name"] for e in DEMO_ADAPTERS}
    assert len(names) == len(DEMO_ADAPTERS) == 8
    assert {full_name(e) for e in DEMO_BASE_MODELS} == {
        "quiver-demo/tiny-llama", "quiver-demo/all-MiniLM-L6-v2", "quiver-demo/tiny-clip-text"
    }
    assert len({e["description"] for e in DEMO_ADAPTERS}) == len(DEMO_ADAPTERS)
    out_dir = demo["tiny-llama"]["dir"].parent.parent
    before = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*") if p.is_file()}
    build_demo_files(out_dir)  # everything cached: nothing rebuilt
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("*") if p.is_file()} == before


def test_formats_and_demo_do_not_import_django():
    code = "import sys, hub.formats, hub.demo.builders; sys.exit(any(m.startswith('django') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
