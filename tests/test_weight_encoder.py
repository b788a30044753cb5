"""generation.weight_encoder / generation.text_encoder: basis-free module
features, the untrained (deterministic) encoder, contrastive training against
real all-MiniLM-L6-v2 embeddings, and safetensors persistence.

No database and no Django: adapters are real PEFT LoRA adapters on a tiny,
fixed-seed LlamaForCausalLM, read straight from the PEFT model into
`CanonicalAdapter` (so these tests depend on neither hub.formats parsers nor
hub.demo builders).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from generation.text_encoder import TEXT_DIM, TEXT_ENCODER_ID, embed_texts  # noqa: E402
from generation.weight_encoder import (  # noqa: E402
    ENCODER_VERSION,
    WeightEncoder,
    feature_dim,
    module_slot,
    spectral_dim,
    load_encoder,
    module_features,
    parse_module_path,
    recall_at_k,
    save_encoder,
    train_encoder,
    untrained_encoder,
)
from hub.formats.canonical import CanonicalAdapter, LoraModule  # noqa: E402

pytestmark = []

DESCRIPTIONS = [
    "summarises legal contracts and highlights risky clauses",
    "completes Python code and writes unit tests",
    "answers medical questions about symptoms and drugs",
    "writes poetry in the style of Shakespeare",
    "generates SQL queries from natural language questions",
    "translates French text into English",
    "polite customer support chatbot for an online shop",
    "solves grade school math word problems step by step",
    "classifies the sentiment of tweets",
    "invents cooking recipes from a list of ingredients",
]
TARGET_SETS = [
    ["q_proj", "v_proj"],
    ["q_proj", "k_proj", "v_proj", "o_proj"],
    ["gate_proj", "up_proj", "down_proj"],
    ["q_proj", "v_proj", "down_proj"],
]


# ----------------------------------------------------------------------
# helpers


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )


def build_peft_canonical(seed: int, *, r: int, alpha: int, targets: list[str]) -> CanonicalAdapter:
    """A real PEFT LoRA on a tiny fixed-seed llama, read into canonical form.
    init_lora_weights=False gives random A and B (PEFT's default B = 0 would
    make every ΔW zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(_tiny_llama_config())
    torch.manual_seed(seed)
    model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    )
    modules = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or "default" not in lora_a:
            continue
        modules[name.removeprefix("base_model.model.")] = LoraModule(
            A=module.lora_A["default"].weight.detach().clone(),
            B=module.lora_B["default"].weight.detach().clone(),
            scale=float(module.scaling["default"]),
        )
    return CanonicalAdapter(
        format="peft", peft_type="LORA", modules=modules, rank=r, alpha=float(alpha), target_modules=targets
    )


def _well_conditioned(r: int, generator: torch.Generator) -> torch.Tensor:
    """Random invertible r×r matrix with condition number ≤ 4 (Q₁·diag(0.5…2)·Q₂)."""
    q1, _ = torch.linalg.qr(torch.randn(r, r, generator=generator, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(r, r, generator=generator, dtype=torch.float64))
    d = 0.5 + 1.5 * torch.rand(r, generator=generator, dtype=torch.float64)
    return q1 @ torch.diag(d) @ q2


def reparametrise(module: LoraModule, generator: torch.Generator, *, pad_to: int | None = None) -> LoraModule:
    """Same ΔW, other factors: optionally zero-pad the rank, then A → R·A, B → B·R⁻¹."""
    A, B = module.A.double(), module.B.double()
    if pad_to is not None and pad_to > A.shape[0]:
        extra = pad_to - A.shape[0]
        A = torch.cat([A, torch.zeros(extra, A.shape[1], dtype=A.dtype)])
        B = torch.cat([B, torch.zeros(B.shape[0], extra, dtype=B.dtype)], dim=1)
    R = _well_conditioned(A.shape[0], generator)
    return LoraModule(A=(R @ A).float(), B=(B @ torch.linalg.inv(R)).float(), scale=module.scale, kind=module.kind)


def map_adapter(adapter: CanonicalAdapter, fn) -> CanonicalAdapter:
    return CanonicalAdapter(
        format=adapter.format, peft_type=adapter.peft_type, rank=adapter.rank, alpha=adapter.alpha,
        modules={path: fn(module) for path, module in adapter.modules.items()},
    )


def random_module(out_dim: int, in_dim: int, r: int, seed: int, scale: float = 2.0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(A=torch.randn(r, in_dim, generator=g) / in_dim**0.5, B=torch.randn(out_dim, r, generator=g), scale=scale)


@pytest.fixture(scope="module")
def adapters() -> list[CanonicalAdapter]:
    """Ten real PEFT adapters: distinct seeds, ranks, alphas and target modules."""
    ranks = [4, 8, 16, 2, 8]
    return [
        build_peft_canonical(100 + i, r=ranks[i % len(ranks)], alpha=2 * ranks[i % len(ranks)] + i,
                             targets=TARGET_SETS[i % len(TARGET_SETS)])
        for i in range(len(DESCRIPTIONS))
    ]


@pytest.fixture(scope="module")
def description_embeddings() -> torch.Tensor:
    return embed_texts(DESCRIPTIONS)


@pytest.fixture(scope="module")
def trained(adapters, description_embeddings):
    fractions = []
    encoder, curve = train_encoder(
        adapters, description_embeddings, epochs=40, lr=1e-3, seed=0,
        progress=lambda fraction, message: fractions.append((fraction, message)),
    )
    return encoder, curve, fractions


# ----------------------------------------------------------------------
# module features


@pytest.mark.parametrize("rank,pad_to", [(8, None), (8, 13), (3, None), (3, 8), (20, None)])
def test_features_invariant_to_reparametrisation_and_rank_padding(rank, pad_to):
    generator = torch.Generator().manual_seed(rank * 31 + (pad_to or 0))
    module = random_module(48, 64, rank, seed=rank)
    twin = reparametrise(module, generator, pad_to=pad_to)
    assert twin.rank == (pad_to or rank)
    original = module_features("model.layers.0.self_attn.q_proj", module)
    other = module_features("model.layers.0.self_attn.q_proj", twin)
    assert original.shape == (feature_dim(),)
    assert original.dtype == torch.float32
    assert torch.allclose(original, other, atol=1e-4, rtol=0), (original - other).abs().max()


def test_features_invariant_on_real_peft_modules(adapters):
    generator = torch.Generator().manual_seed(7)
    for path, module in list(adapters[1].modules.items())[:4]:
        for pad in (None, module.rank + 3):
            diff = (module_features(path, module) - module_features(path, reparametrise(module, generator, pad_to=pad))).abs().max()
            assert diff <= 1e-4, (path, pad, diff)


def test_features_any_rank_and_shape_and_continuity():
    for rank in (1, 2, 8, 9, 64):
        for k, proj_dim in ((8, 32), (4, 8)):
            features = module_features("x", random_module(40, 24, rank, seed=rank), k=k, proj_dim=proj_dim)
            assert features.shape == (feature_dim(k, proj_dim),)
            assert torch.isfinite(features).all()
    # a zero update (PEFT's default B = 0) is finite, not NaN
    zero = LoraModule(A=torch.randn(4, 24), B=torch.zeros(40, 4), scale=1.0)
    assert torch.isfinite(module_features("x", zero)).all()
    # continuity (no sign canonicalisation jumps): small noise, small change;
    # scale only moves the magnitude features
    module = random_module(40, 24, 8, seed=3)
    g = torch.Generator().manual_seed(0)
    noisy = LoraModule(A=module.A + 1e-3 * torch.randn(module.A.shape, generator=g), B=module.B, scale=module.scale)
    base = module_features("x", module)
    assert (base - module_features("x", noisy)).abs().max() < 0.05
    louder = module_features("x", LoraModule(A=module.A, B=module.B, scale=module.scale * 10))
    k = 8
    assert torch.allclose(base[:k], louder[:k], atol=1e-5)  # spectrum shape
    assert torch.allclose(base[2 * k + 2:], louder[2 * k + 2:], atol=1e-4)  # direction sketch
    assert (louder[k:2 * k] > base[k:2 * k]).all()  # log singular values


def test_module_path_parsing():
    assert parse_module_path("model.layers.3.self_attn.q_proj") == (3, "q_proj")
    assert parse_module_path("encoder.layer.2.attention.self.query") == (2, "query")
    assert parse_module_path("lora_te_text_model_encoder_layers_0_self_attn_q_proj") == (0, "self_attn_q_proj")
    assert parse_module_path("lm_head") == (None, "lm_head")
    assert module_slot("model.layers.3.self_attn.q_proj") == module_slot("base_model.model.model.layers.3.self_attn.q_proj")
    assert module_slot("model.layers.3.self_attn.q_proj") != module_slot("model.layers.4.self_attn.q_proj")


def test_module_sketches_are_independent_per_slot():
    """The same update in two different modules sketches to (nearly) orthogonal vectors, so
    the pooled sum keeps which module changed; in the same slot it is the same sketch."""
    module = random_module(48, 64, 8, seed=5)

    def sketch(path):
        return module_features(path, module)[spectral_dim():]

    q3, q3_again = sketch("model.layers.3.self_attn.q_proj"), sketch("base_model.model.model.layers.3.self_attn.q_proj")
    v3, q4 = sketch("model.layers.3.self_attn.v_proj"), sketch("model.layers.4.self_attn.q_proj")
    assert torch.equal(q3, q3_again)
    cos = torch.nn.functional.cosine_similarity
    assert abs(float(cos(q3, v3, dim=0))) < 0.2 and abs(float(cos(q3, q4, dim=0))) < 0.2


# ----------------------------------------------------------------------
# encoder


def test_encoder_accepts_different_ranks_and_module_sets(adapters):
    encoder = untrained_encoder()
    mixed = CanonicalAdapter(
        format="peft", peft_type="LORA", rank=4, alpha=8.0,
        modules={  # rank_pattern-like: a different rank per module, and a non-square module
            "model.layers.0.self_attn.q_proj": random_module(64, 64, 2, seed=1),
            "model.layers.1.mlp.down_proj": random_module(64, 128, 12, seed=2),
            "model.layers.1.mlp.up_proj": random_module(128, 64, 5, seed=3),
        },
    )
    batch = [*adapters[:4], mixed]
    embeddings = encoder.encode_many(batch)
    assert embeddings.shape == (5, TEXT_DIM)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(5), atol=1e-5)
    # the batched (padded) path equals encoding one at a time
    for adapter, row in zip(batch, embeddings):
        assert torch.allclose(encoder.encode(adapter), row, atol=1e-5)


def test_untrained_encoder_is_deterministic_and_finds_twins(adapters):
    first, second = untrained_encoder(), untrained_encoder()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))

    generator = torch.Generator().manual_seed(11)
    anchor = adapters[1]
    twin = map_adapter(anchor, lambda m: reparametrise(m, generator, pad_to=m.rank + 2))

    def noisy(m: LoraModule) -> LoraModule:
        return LoraModule(A=m.A, B=m.B + 0.05 * m.B.std() * torch.randn(m.B.shape, generator=generator), scale=m.scale)

    near = map_adapter(anchor, noisy)
    same_targets = [a for a in adapters if a is not anchor and sorted(a.modules) == sorted(anchor.modules)]
    assert same_targets, "need an unrelated adapter on the very same modules"
    unrelated = [a for a in adapters if a is not anchor]

    e_anchor, e_twin, e_near = first.encode_many([anchor, twin, near])
    e_unrelated = first.encode_many(unrelated)
    twin_sim, near_sim = float(e_anchor @ e_twin), float(e_anchor @ e_near)
    best_unrelated = float((e_unrelated @ e_anchor).max())
    assert twin_sim > 0.999
    assert near_sim > 0.98
    # "much closer": the distance to the nearest unrelated adapter is ≥ 10× the noisy twin's
    assert (1 - best_unrelated) > 10 * (1 - near_sim), (twin_sim, near_sim, best_unrelated)
    e_same_targets = first.encode_many(same_targets)
    assert float((e_same_targets @ e_anchor).max()) < near_sim - 0.1


# ----------------------------------------------------------------------
# training


def test_training_improves_text_to_adapter_recall(trained, adapters, description_embeddings):
    encoder, curve, fractions = trained
    before = recall_at_k(description_embeddings, untrained_encoder().encode_many(adapters), 1)
    after = recall_at_k(description_embeddings, encoder.encode_many(adapters), 1)
    assert after >= 0.9 and after > before, (before, after)
    assert curve[0]["epoch"] == 0 and curve[-1]["epoch"] == 40 and len(curve) == 41
    assert after > curve[0]["recall_at_1"]
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert curve[-1]["recall_at_1"] == pytest.approx(after)
    assert len(fractions) == 40 and fractions[-1][0] == pytest.approx(1.0)
    assert all(b[0] > a[0] for a, b in zip(fractions, fractions[1:]))
    # adapter → text works too (the other direction of the symmetric loss)
    assert recall_at_k(encoder.encode_many(adapters), description_embeddings, 1) >= 0.9


def test_training_is_deterministic(trained, adapters, description_embeddings):
    encoder, curve, _ = trained
    again, curve_again = train_encoder(adapters, description_embeddings, epochs=40, lr=1e-3, seed=0)
    assert torch.equal(encoder.encode_many(adapters), again.encode_many(adapters))
    assert [c["loss"] for c in curve] == [c["loss"] for c in curve_again]


def test_save_load_round_trip(trained, adapters, tmp_path):
    encoder, curve, _ = trained
    weights = save_encoder(encoder, tmp_path / "encoder")
    with open(weights, "rb") as handle:  # safetensors: u64 header length, then a JSON header — no pickle
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    assert header["__metadata__"]["encoder_version"] == ENCODER_VERSION
    meta = json.loads((tmp_path / "encoder" / "encoder.json").read_text())
    assert meta["encoder_version"] == ENCODER_VERSION
    assert meta["text_encoder"] == TEXT_ENCODER_ID
    assert meta["architecture"] == encoder.config()
    assert meta["training_curve"] == curve

    loaded = load_encoder(tmp_path / "encoder")
    assert isinstance(loaded, WeightEncoder)
    assert torch.equal(loaded.encode_many(adapters), encoder.encode_many(adapters))
    assert loaded.training_curve == curve

    # single-file spelling: x.safetensors + x.json
    save_encoder(untrained_encoder(), tmp_path / "plain.safetensors")
    assert torch.equal(load_encoder(tmp_path / "plain.safetensors").encode(adapters[0]),
                       untrained_encoder().encode(adapters[0]))

    meta["encoder_version"] = "weight-encoder/0"
    (tmp_path / "encoder" / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version"):
        load_encoder(tmp_path / "encoder")


def test_recall_at_k():
    items = torch.eye(4)
    queries = torch.eye(4)[[0, 1, 3, 2]]
    assert recall_at_k(queries, items, 1) == pytest.approx(0.5)
    assert recall_at_k(queries, items, 4) == pytest.approx(1.0)


# ----------------------------------------------------------------------
# text encoder


def test_embed_texts_unit_vectors_and_semantics():
    embeddings = embed_texts([
        "a LoRA that writes Python code",
        "an adapter for generating source code in Python",
        "a recipe for chocolate cake",
    ])
    assert embeddings.shape == (3, TEXT_DIM) and embeddings.dtype == torch.float32
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)
    similar = float(embeddings[0] @ embeddings[1])
    unrelated = float(embeddings[0] @ embeddings[2])
    assert similar > unrelated + 0.2, (similar, unrelated)
    assert embed_texts([]).shape == (0, TEXT_DIM)


def test_embed_texts_gives_sentence_transformers_vectors():
    """embed_texts calls the tokenizer and BERT directly (no SentenceTransformer.encode overhead per
    query); the vectors must stay those of the model's own pipeline, which stored vectors came from.
    Texts of many lengths in one call (sorted and padded in batches), one at a time, a text past
    the 256-token limit, an empty one and surrounding blanks."""
    from generation.text_encoder import BATCH_SIZE, load_text_encoder

    texts = ["summarise support tickets", "", "  padded with blanks  ", "legal " * 400, "日本語の説明文",
             "Tags: sql, text-to-sql"] + [f"task number {i} " * (i % 13 + 1) for i in range(BATCH_SIZE + 5)]
    with torch.no_grad():
        reference = load_text_encoder().encode(texts, convert_to_tensor=True, normalize_embeddings=True,
                                               show_progress_bar=False, device="cpu").float()
    assert (embed_texts(texts) - reference).abs().max() < 1e-6
    one_at_a_time = torch.stack([embed_texts([text])[0] for text in texts])
    assert (one_at_a_time - reference).abs().max() < 1e-6


def test_packed_linear_matches_plain_linear(monkeypatch):
    """The encoder's linears (weights packed once for oneDNN, GELU or the residual fused in) compute
    what F.linear does, and so does the fallback for PyTorch builds without oneDNN."""
    from generation import text_encoder

    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 32, generator=generator), torch.randn(48, generator=generator)
    x, residual = torch.randn(7, 32, generator=generator), torch.randn(7, 48, generator=generator)
    expected = torch.nn.functional.linear(x, weight, bias)
    packed = text_encoder.Linear.of(weight, bias, torch.float32)
    assert packed.packed == text_encoder.ONEDNN
    monkeypatch.setattr(text_encoder, "ONEDNN", False)
    plain = text_encoder.Linear.of(weight, bias, torch.float32)
    assert not plain.packed
    for linear in (packed, plain):
        torch.testing.assert_close(linear(x), expected)
        torch.testing.assert_close(linear(x, gelu=True), torch.nn.functional.gelu(expected))
        torch.testing.assert_close(linear(x, residual=residual), expected + residual)


def test_query_lengths_share_a_few_warmed_shapes(monkeypatch):
    """oneDNN builds and keeps kernels per input shape: queries are padded to SEQUENCE_BUCKET tokens, so
    queries of 1–42 tokens run on at most six shapes, all of which warm_query_path has built."""
    from generation import text_encoder

    rows_seen: set[int] = set()
    linear_call = text_encoder.Linear.__call__

    def recording_call(self, x, **kwargs):
        rows_seen.add(int(x.shape[0]))
        return linear_call(self, x, **kwargs)

    monkeypatch.setattr(text_encoder.Linear, "__call__", recording_call)
    for words in range(41):
        text_encoder.embed_query("word " * words, "float32")
    queried = set(rows_seen)
    assert queried and all(rows % text_encoder.SEQUENCE_BUCKET == 0 for rows in queried), queried
    assert len(queried) <= 6, queried
    rows_seen.clear()
    assert text_encoder.warm_query_path("float32") == 256 // text_encoder.SEQUENCE_BUCKET
    assert queried <= rows_seen


def test_bfloat16_queries_land_where_float32_ones_do():
    """Search queries may run the layers in bfloat16 (text_encoder.embed_query): each vector stays
    within cosine 0.9995 of the float32 one (0.99996 on average over search queries), and ranks stored
    float32 descriptions the same way."""
    from generation.text_encoder import embed_query, query_dtype

    queries = ["summarise support tickets", "", "flag urgent customer emails written in German", "legal " * 400,
               "日本語の説明文", "turn questions about invoices into SQL"]
    stored = embed_texts(DESCRIPTIONS)
    for query in queries:
        exact, fast = embed_query(query, "float32"), embed_query(query, "bfloat16")
        assert torch.equal(exact, embed_texts([query])[0])
        assert not torch.equal(exact, fast)  # the bfloat16 path really ran
        assert float(exact @ fast) > 0.9995 and abs(float(fast.norm()) - 1) < 1e-5
        assert torch.equal((stored @ exact).argsort(descending=True)[:3], (stored @ fast).argsort(descending=True)[:3])
    assert query_dtype("float32") == torch.float32 and query_dtype("bfloat16") == torch.bfloat16
    assert query_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="query precision"):
        query_dtype("int4")
