"""Weight encoder: a LoRA adapter's parameters → the text-embedding space.

After AutoLoRA ("weight encoding-based LoRA retriever that establishes a
shared semantic space between LoRA parameter matrices and text prompts"): an
adapter with thin metadata can still be found by a text query, because its
weights are embedded next to the descriptions of similar adapters.

Pipeline
1. `module_features`: per LoRA module, features of ΔW = scale·B@A that do not
   depend on the arbitrary factorisation (A, B) → (R·A, B·R⁻¹), nor on rank
   padding, nor on the sign of singular vectors. Computed from the thin SVD of
   ΔW (`kernels.lowrank.lowrank_svd`, never forming the dense matrix). The
   direction sketch uses random projections seeded by the module's place
   (kind, layer) and shape, so the sum of the sketches of an adapter's modules
   is one Johnson–Lindenstrauss sketch of all its updates side by side: which
   layer changed how is kept, a missing module counts as zero, and any rank or
   module set pools to the same length.
2. `WeightEncoder`: pooling (sum of sketches, mean of spectra) and one affine
   map to TEXT_DIM, L2-normalised. Linear on purpose: a hub trains it on tens
   to thousands of described adapters, and on the LoRA zoo a linear map of the
   pooled sketch found held-out tasks where an MLP over modules memorised its
   training set (benchmarks/retrieval_eval.py; README "Retrieval on the zoo").
3. `train_encoder`: symmetric InfoNCE between encoded adapters and the
   embeddings of their descriptions (full batch, AdamW).

Pure torch; nothing here imports Django. Weights are stored as safetensors
with a JSON sidecar (never pickle).
"""
from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from generation.text_encoder import TEXT_DIM, TEXT_ENCODER_ID
from hub.formats.canonical import CanonicalAdapter, LoraModule, short_module_name
from kernels.lowrank import lowrank_svd

# Bump whenever features or architecture change: embeddings made by different
# versions live in different spaces and must never be compared.
ENCODER_VERSION = "weight-encoder/2"

DEFAULT_K = 8
DEFAULT_PROJ_DIM = 32
_LOG_RANGE = math.log(1e6)  # log-scaled magnitudes are divided by this (≈ [-1, 1] for 1e-6..1e6)
_EPS = 1e-6


def feature_dim(k: int = DEFAULT_K, proj_dim: int = DEFAULT_PROJ_DIM) -> int:
    """Length of `module_features(..., k=k, proj_dim=proj_dim)` and of a pooled adapter."""
    return spectral_dim(k) + proj_dim * proj_dim


def spectral_dim(k: int = DEFAULT_K) -> int:
    return 2 * k + 2


@lru_cache(maxsize=32)  # bounded: a 7B adapter has hundreds of slots
def _projection(dim: int, proj_dim: int, slot: str) -> torch.Tensor:
    """Fixed Gaussian projection R^dim → R^proj_dim (float64, dim × proj_dim), seeded
    by the dimension and the module's slot ("q_proj@3"): the same matrix for the same
    module of any adapter on any machine, independent ones for different modules."""
    seed = zlib.crc32(f"{int(dim)}:{int(proj_dim)}:{slot}".encode("utf-8"))
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(int(dim), int(proj_dim), generator=generator, dtype=torch.float64)


def module_slot(path: str) -> str:
    """Where a module sits, independent of the naming scheme's prefixes: "kind@layer"."""
    layer, kind = parse_module_path(path)
    return f"{kind.lower()}@{'' if layer is None else layer}"


def module_features(path: str, module: LoraModule, *, k: int = DEFAULT_K, proj_dim: int = DEFAULT_PROJ_DIM) -> torch.Tensor:
    """Basis-free features of one module's ΔW = scale·B@A (float32, `feature_dim(k, proj_dim)`).

    With ΔW = Σᵢ sᵢ·uᵢ·vᵢᵀ (thin SVD, via QR of the factors):

    - spectrum shape: the top-k sᵢ / ‖s‖₂ (zero-padded when rank < k);
    - spectrum scale: log(sᵢ) of the top k, log‖ΔW‖_F (both / log 1e6, so in
      about [-1, 1]); padded values sit at the floor (-1);
    - effective rank: exp(entropy of sᵢ²/Σsⱼ²) / k;
    - directions: the sketch Σᵢ wᵢ·(P_outᵀuᵢ)(P_inᵀvᵢ)ᵀ over the top k, with
      wᵢ = sᵢ/‖s‖₂ and P_out (out × proj_dim), P_in (in × proj_dim) fixed
      Gaussian matrices seeded by the dimension and the module's slot
      (`module_slot`), scaled by 1/proj_dim; flattened (proj_dim²).

    Sign invariance — why the outer product: a singular pair is only defined
    up to (uᵢ, vᵢ) → (-uᵢ, -vᵢ), and for (near-)equal singular values only up
    to a rotation inside their subspace. Flipping each pair so a reference
    projection is positive fixes the sign but is discontinuous where that
    projection crosses 0 (a little noise flips it) and does nothing for ties;
    |·| of the projections is continuous but throws away the relative sign of
    u and v. The rank-1 outer products are unchanged by the joint sign flip,
    and their weighted sum is unchanged by any rotation among tied pairs (it
    is just P_outᵀ·ΔW_k·P_in / ‖s‖ for the rank-k truncation ΔW_k), so the
    features are continuous in ΔW and keep the pairing of input and output
    directions — a Johnson–Lindenstrauss sketch of the normalised update.
    Seeding the projections by slot makes the sketches of different modules
    independent, so their sum (`AdapterFeatures.pooled`) sketches the concatenation.

    Only ΔW is used, so features(A, B) == features(R·A, B·R⁻¹) for any
    invertible R, and zero-padding the rank changes nothing. A DoRA magnitude
    vector is ignored (it depends on the base weights).
    """
    A = module.A.reshape(module.A.shape[0], -1).to(torch.float64)
    B = module.B.reshape(module.B.shape[0], -1).to(torch.float64)
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"module '{path}': A has {A.shape[0]} rows but B has {B.shape[1]} columns")
    U, S, Vh = lowrank_svd([B], [A], [float(module.scale)])
    S = S.clamp_min(0.0)
    total = torch.linalg.vector_norm(S)
    top = min(k, S.numel())

    s_top = torch.zeros(k, dtype=torch.float64)
    s_top[:top] = S[:top]
    rel = s_top / (total + _EPS)
    log_s = torch.log(s_top.clamp_min(_EPS)) / _LOG_RANGE
    log_total = torch.log(total.clamp_min(_EPS)) / _LOG_RANGE
    energy = S**2 / (S**2).sum().clamp_min(1e-30)
    entropy = -(energy * torch.log(energy.clamp_min(1e-30))).sum()
    eff_rank = torch.exp(entropy) / k if total > _EPS else torch.zeros((), dtype=torch.float64)

    out_dim, in_dim, slot = int(U.shape[0]), int(Vh.shape[1]), module_slot(path)
    left = _projection(out_dim, proj_dim, "out:" + slot).T @ U[:, :top]  # proj_dim × top
    right = Vh[:top] @ _projection(in_dim, proj_dim, "in:" + slot)  # top × proj_dim
    sketch = (left * (S[:top] / (total + _EPS))) @ right / proj_dim  # proj_dim × proj_dim, entries ~ 1/proj_dim

    spectral = torch.cat([rel, log_s, log_total.reshape(1), eff_rank.reshape(1)])
    return torch.cat([spectral, sketch.reshape(-1)]).to(torch.float32)


_INDEX_COMPONENT = re.compile(r"^\d+$")
_KOHYA_INDEX = re.compile(r"_(\d+)_")


def parse_module_path(path: str) -> tuple[int | None, str]:
    """(layer index or None, module kind) from a module path.

    "model.layers.3.self_attn.q_proj" → (3, "q_proj");
    "encoder.layer.2.attention.self.query" → (2, "query");
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj" → (0, "self_attn_q_proj").
    The layer is the first numeric path component (the outermost block);
    the kind is the module's own name (`short_module_name`)."""
    kind = short_module_name(path)
    if "." in path:
        layer = next((int(part) for part in path.split(".") if _INDEX_COMPONENT.match(part)), None)
    else:
        match = _KOHYA_INDEX.search(path)
        layer = int(match.group(1)) if match else None
    return layer, kind


@dataclass
class AdapterFeatures:
    """An adapter prepared for the encoder (computed once; cheap to re-encode)."""

    features: torch.Tensor  # M × feature_dim, one row per module
    paths: list[str]
    spectral_columns: int  # the first columns of each row: spectral features; the rest: the sketch

    def pooled(self) -> torch.Tensor:
        """(feature_dim,): mean of the modules' spectral features ‖ sum of their sketches.
        The sum of slot-seeded sketches sketches every module's update side by side, so an
        adapter with fewer modules is the same adapter with zeros elsewhere."""
        split = self.spectral_columns
        return torch.cat([self.features[:, :split].mean(0), self.features[:, split:].sum(0)])


def adapter_features(adapter: CanonicalAdapter, *, k: int = DEFAULT_K, proj_dim: int = DEFAULT_PROJ_DIM) -> AdapterFeatures:
    """Module features of every module (sorted by path)."""
    paths = sorted(adapter.modules)
    if not paths:
        raise ValueError("adapter has no LoRA modules to encode")
    features = torch.stack([module_features(path, adapter.modules[path], k=k, proj_dim=proj_dim) for path in paths])
    return AdapterFeatures(features=features, paths=paths, spectral_columns=spectral_dim(k))


class WeightEncoder(nn.Module):
    """Pooled module features → TEXT_DIM (unit norm) by one affine map.

    x = pool(adapter) (`AdapterFeatures.pooled`), standardised with the training set's
    mean and mean norm (buffers), then normalize(W·x + b).
    """

    def __init__(self, *, k: int = DEFAULT_K, proj_dim: int = DEFAULT_PROJ_DIM, out_dim: int = TEXT_DIM):
        super().__init__()
        self.k, self.proj_dim, self.out_dim = int(k), int(proj_dim), int(out_dim)
        dim = feature_dim(self.k, self.proj_dim)
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_scale", torch.ones(()))
        self.linear = nn.Linear(dim, self.out_dim)
        self.training_curve: list[dict] = []
        self.metadata: dict = {}

    def config(self) -> dict:
        """Architecture hyper-parameters (what `WeightEncoder(**config)` needs)."""
        return {"k": self.k, "proj_dim": self.proj_dim, "out_dim": self.out_dim}

    def prepare(self, adapter: CanonicalAdapter) -> AdapterFeatures:
        return adapter_features(adapter, k=self.k, proj_dim=self.proj_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """batch × feature_dim pooled features → batch × out_dim unit rows."""
        standardised = (pooled - self.feature_mean) / self.feature_scale
        return F.normalize(self.linear(standardised), dim=-1)

    def encode_prepared(self, prepared: list[AdapterFeatures]) -> torch.Tensor:
        return self(collate(prepared))

    @torch.no_grad()
    def encode_many(self, adapters: list[CanonicalAdapter]) -> torch.Tensor:
        """len(adapters) × out_dim."""
        was_training = self.training
        self.eval()
        try:
            return self.encode_prepared([self.prepare(adapter) for adapter in adapters])
        finally:
            self.train(was_training)

    @torch.no_grad()
    def encode(self, adapter: CanonicalAdapter) -> torch.Tensor:
        """(out_dim,) unit vector in the text space."""
        return self.encode_many([adapter])[0]


def collate(prepared: list[AdapterFeatures]) -> torch.Tensor:
    """batch × feature_dim pooled features."""
    dims = {item.features.shape[1] for item in prepared}
    if len(dims) != 1:
        raise ValueError("prepared adapters were made with different k / proj_dim")
    return torch.stack([item.pooled() for item in prepared])


# ----------------------------------------------------------------------
# Construction, persistence


UNTRAINED_SEED = 20240901
# Training defaults, chosen on the LoRA zoo by grouped 5-fold held-out recall
# (benchmarks/retrieval_eval.py): the held-out recall@5 plateaus at 0.83-0.87 for
# 40-100 epochs at 1e-3 or 100 at 5e-4, and falls as training goes on (0.72 at
# 200 epochs, 0.61 at 300 × 3e-3) while training recall stays 1.0: on tens of
# adapters, stopping early is the regulariser.
TRAIN_EPOCHS = 100
TRAIN_LR = 5e-4


def _initialise(encoder: WeightEncoder, seed: int) -> WeightEncoder:
    """Deterministic initialisation from `seed` (independent of the global RNG): a
    Gaussian map with variance 1/fan_in and zero bias, so the untrained encoder is a
    fixed random projection that keeps angles between pooled features (a reparametrised
    or slightly perturbed twin lands next to its original)."""
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        weight = encoder.linear.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) / math.sqrt(weight.shape[1]))
        encoder.linear.bias.zero_()
    return encoder


def untrained_encoder(**config) -> WeightEncoder:
    """The deterministic encoder used before any training: the same weights on
    every machine, so "similar by weights" search works from day one."""
    encoder = _initialise(WeightEncoder(**config), UNTRAINED_SEED)
    encoder.metadata = {"trained": False, "init_seed": UNTRAINED_SEED}
    return encoder.eval()


def _paths(path) -> tuple[Path, Path]:
    """(weights, metadata) files: "x.safetensors" → x.safetensors + x.json; any
    other path is a directory holding encoder.safetensors + encoder.json."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / "encoder.safetensors", path / "encoder.json"


def save_encoder(encoder: WeightEncoder, path) -> Path:
    """Write weights (safetensors) + metadata (JSON: version, architecture,
    text encoder, training curve). Returns the weights file."""
    from safetensors.torch import save_file

    weights_path, meta_path = _paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in encoder.state_dict().items()}
    save_file(state, str(weights_path), metadata={"encoder_version": ENCODER_VERSION})
    meta = {
        "encoder_version": ENCODER_VERSION,
        "text_encoder": TEXT_ENCODER_ID,
        "text_dim": TEXT_DIM,
        "architecture": encoder.config(),
        "metadata": encoder.metadata,
        "training_curve": encoder.training_curve,
    }
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return weights_path


def load_encoder(path) -> WeightEncoder:
    """Read what `save_encoder` wrote; refuses another ENCODER_VERSION (its
    embeddings would live in a different space)."""
    from safetensors.torch import load_file

    weights_path, meta_path = _paths(path)
    meta = json.loads(meta_path.read_text())
    if meta.get("encoder_version") != ENCODER_VERSION:
        raise ValueError(
            f"{weights_path}: encoder version {meta.get('encoder_version')!r}, this code reads {ENCODER_VERSION!r}"
        )
    encoder = WeightEncoder(**meta["architecture"])
    encoder.load_state_dict(load_file(str(weights_path)), strict=True)
    encoder.metadata = meta.get("metadata", {})
    encoder.training_curve = meta.get("training_curve", [])
    return encoder.eval()


# ----------------------------------------------------------------------
# Training


def recall_at_k(query_embeddings: torch.Tensor, item_embeddings: torch.Tensor, k: int = 1) -> float:
    """Fraction of queries whose correct item (query i ↔ item i) is among the
    k items with the highest cosine similarity."""
    queries = F.normalize(query_embeddings.float(), dim=-1)
    items = F.normalize(item_embeddings.float(), dim=-1)
    if queries.shape[0] == 0:
        return 0.0
    scores = queries @ items.T
    top = scores.topk(min(k, items.shape[0]), dim=1).indices
    hits = (top == torch.arange(queries.shape[0]).unsqueeze(1)).any(dim=1)
    return float(hits.float().mean())


def _info_nce(adapter_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = adapter_emb @ text_emb.T / temperature
    targets = torch.arange(logits.shape[0])
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def train_encoder(
    adapters: list[CanonicalAdapter],
    text_embeddings: torch.Tensor,
    *,
    epochs: int = TRAIN_EPOCHS,
    lr: float = TRAIN_LR,
    temperature: float = 0.07,
    seed: int = 0,
    weight_decay: float = 1e-4,
    progress: Callable[[float, str], None] | None = None,
    **config,
) -> tuple[WeightEncoder, list[dict]]:
    """Contrastive training: adapter i ↔ text_embeddings[i], symmetric InfoNCE.

    Full batch (a hub's described adapters fit in memory as pooled features:
    thousands × ~1 000 floats), AdamW. Pooled features are computed once; the
    training set's mean and mean norm become the encoder's standardisation. The
    map starts at the untrained encoder's random projection, scaled down, with
    the bias at the mean description, so every adapter starts near the centre of
    the text space and training moves each towards its own description.
    Deterministic given `seed`. `config` is passed to `WeightEncoder` (k, proj_dim).
    Returns (encoder in eval mode, curve: one dict per epoch — epoch 0 is the
    initialisation — with the training loss and the training-set recall@1 of
    text → adapter retrieval)."""
    if len(adapters) != text_embeddings.shape[0]:
        raise ValueError(f"{len(adapters)} adapters but {text_embeddings.shape[0]} text embeddings")
    if len(adapters) < 2:
        raise ValueError("contrastive training needs at least two adapters")
    texts = F.normalize(text_embeddings.detach().float(), dim=-1)
    encoder = _initialise(WeightEncoder(**config), seed)
    if texts.shape[1] != encoder.out_dim:
        raise ValueError(f"text embeddings are {texts.shape[1]}-d, the encoder outputs {encoder.out_dim}-d")

    pooled = collate([encoder.prepare(adapter) for adapter in adapters])
    with torch.no_grad():
        encoder.feature_mean.copy_(pooled.mean(0))
        encoder.feature_scale.copy_((pooled - encoder.feature_mean).norm(dim=1).mean().clamp_min(_EPS))
        encoder.linear.weight.mul_(0.1)
        encoder.linear.bias.copy_(texts.mean(0))
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=weight_decay)
    curve: list[dict] = []

    def evaluate() -> tuple[float, float]:
        encoder.eval()
        with torch.no_grad():
            encoded = encoder(pooled)
            return float(_info_nce(encoded, texts, temperature)), recall_at_k(texts, encoded, 1)

    loss0, recall0 = evaluate()  # epoch 0: the initialisation, for comparison
    curve.append({"epoch": 0, "loss": loss0, "recall_at_1": recall0})
    for epoch in range(int(epochs)):
        encoder.train()
        loss = _info_nce(encoder(pooled), texts, temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _, recall = evaluate()
        curve.append({"epoch": epoch + 1, "loss": float(loss.detach()), "recall_at_1": recall})
        if progress is not None:
            progress((epoch + 1) / epochs, f"epoch {epoch + 1}/{epochs} loss {curve[-1]['loss']:.4f} recall@1 {recall:.2f}")
    encoder.training_curve = curve
    encoder.metadata = {
        "trained": True, "seed": int(seed), "epochs": int(epochs), "lr": float(lr),
        "temperature": float(temperature), "weight_decay": float(weight_decay), "adapters": len(adapters),
    }
    return encoder.eval(), curve
