"""Training generators in function space: a generated adapter is judged by what
it does to the base model's outputs, not by its distance to an expert's factors.

Why: independently trained LoRAs are nearly orthogonal in parameter space. On
the zoo, an unseen task's own adapter projected onto the span of the 59 experts
keeps cosine ≈ 0.2 with itself and *no* accuracy gain (README, "Generation"):
most of each expert's parameters is optimiser noise no other expert shares, so
any generator that mixes or regresses expert parameters is capped near the
nearest expert. A shared decoder trained so that its adapter for task i makes
the base model answer like expert i (distillation on unlabelled probe inputs)
learns only the structure the experts share, and composes it for new
descriptions (the argument Text-to-LoRA makes for training hypernetworks by
their outputs rather than by reconstruction).

What the hub must supply (FunctionProbe): the frozen base model as a module that
maps a batch of inputs to class logits, its input encoder, and unlabelled probe
texts from the base model's domain. Teachers are the experts themselves: no
labels, no user data.

Pure torch; no Django.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .lora_layout import Layout

SLOT_EMBEDDING_DIM = 32


@dataclass
class FunctionProbe:
    model: nn.Module  # frozen base: model(**encode(texts)) -> (batch, classes) logits
    encode: Callable[[list[str]], dict]
    texts: list[str]  # unlabelled inputs typical of the base model's domain


# ----------------------------------------------------------------------
# Factors: a batch of adapters as one (A, B) pair per layout slot


def split_factors(params: torch.Tensor, layout: Layout) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n × D flat vectors (lora_layout.flatten order) → per slot (A: n×r×in, B: n×out×r)."""
    factors, offset = [], 0
    for slot in layout.slots:
        a_size, b_size = slot.rank * slot.in_features, slot.out_features * slot.rank
        A = params[:, offset : offset + a_size].reshape(-1, slot.rank, slot.in_features)
        B = params[:, offset + a_size : offset + a_size + b_size].reshape(-1, slot.out_features, slot.rank)
        factors.append((A, B))
        offset += a_size + b_size
    return factors


def join_factors(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The inverse of split_factors: n × D flat vectors."""
    return torch.cat([part.flatten(1) for A, B in factors for part in (A, B)], dim=1)


class BatchedLoRA:
    """Runs the base model with a different LoRA for every row of the batch, through
    forward hooks on the layout's modules (out += s·(x·Aᵢᵀ)·Bᵢᵀ, what PEFT's forward
    computes): one forward serves many adapters, and gradients reach the factors."""

    def __init__(self, probe: FunctionProbe, layout: Layout):
        self.probe, self.layout = probe, layout
        modules = dict(probe.model.named_modules())
        missing = [slot.path for slot in layout.slots if slot.path not in modules]
        if missing:
            raise ValueError(f"the base model has no module {missing[0]}")
        self._modules = [modules[slot.path] for slot in layout.slots]
        self._factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _hook(self, index: int, scale: float):
        def add_lora(module, inputs, output):
            A, B = self._factors[index]
            low = torch.einsum("bti,bri->btr", inputs[0], A)
            return output + scale * torch.einsum("btr,bor->bto", low, B)
        return add_lora

    @contextmanager
    def _installed(self, factors):
        self._factors = factors
        handles = [module.register_forward_hook(self._hook(i, slot.scale))
                   for i, (module, slot) in enumerate(zip(self._modules, self.layout.slots))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._factors = None

    def logits(self, texts: list[str], factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """factors: per slot (A, B) with one row per text (or one row for all texts)."""
        factors = [(A.expand(len(texts), -1, -1), B.expand(len(texts), -1, -1)) for A, B in factors]
        with self._installed(factors):
            return self.probe.model(**self.probe.encode(texts))


@torch.inference_mode()
def teacher_probabilities(runner: BatchedLoRA, params: torch.Tensor, batch_size: int = 256,
                          progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Each expert's class probabilities on every probe text: n × T × classes. Texts are
    batched by length, so short inputs are not padded to the longest one."""
    texts = runner.probe.texts
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = None
    for j in range(len(params)):
        factors = split_factors(params[j : j + 1].float(), runner.layout)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            probabilities = torch.softmax(runner.logits([texts[i] for i in rows], factors).float(), -1)
            if out is None:
                out = torch.empty(len(params), len(texts), probabilities.shape[-1])
            out[j, rows] = probabilities
        if progress:
            progress(j + 1, len(params))
    return out


class StratifiedProbes:
    """Probe rows for an expert, drawn class by class of its own predictions: a rare
    class (a pair task's positives are one probe in seventy) is seen as often as the
    common one, as it was when the expert was trained on balanced data."""

    def __init__(self, teacher: torch.Tensor, seed: int):
        predicted = teacher.argmax(-1)  # n × T
        by_expert = ([(predicted[j] == c).nonzero().flatten().tolist() for c in range(teacher.shape[-1])]
                     for j in range(teacher.shape[0]))
        self.rows = [[rows for rows in by_class if rows] for by_class in by_expert]  # classes it predicts
        self.random = random.Random(seed)

    def draw(self, expert: int, count: int) -> list[int]:
        by_class = self.rows[expert]
        return [self.random.choice(by_class[i % len(by_class)]) for i in range(count)]


def distillation_loss(student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's soft labels."""
    return -(teacher * torch.log_softmax(student_logits, -1)).sum(-1).mean()


# ----------------------------------------------------------------------
# Decoder: condition → a whole LoRA


class LoRADecoder(nn.Module):
    """A condition vector and a starting adapter (per slot A, B; one row per condition) →
    that adapter plus a learned correction for every slot. One trunk, a learned embedding
    per slot, and one head per distinct slot shape, so storage grows with the shapes, not
    the module count. The correction starts at zero: an untrained decoder returns its
    starting adapter (the generator's semantic prior) unchanged."""

    def __init__(self, layout: Layout, in_dim: int, hidden: int):
        super().__init__()
        self.layout = layout
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.slot_embeddings = nn.Parameter(torch.randn(len(layout.slots), SLOT_EMBEDDING_DIM) * 0.1)
        shapes = sorted({self._shape(slot) for slot in layout.slots})
        self._head_of = [shapes.index(self._shape(slot)) for slot in layout.slots]
        self.heads = nn.ModuleList()
        for rank, in_features, out_features in shapes:
            head = nn.Sequential(nn.Linear(hidden + SLOT_EMBEDDING_DIM, hidden), nn.GELU(),
                                 nn.Linear(hidden, rank * (in_features + out_features)))
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)
            self.heads.append(head)

    @staticmethod
    def _shape(slot) -> tuple[int, int, int]:
        return slot.rank, slot.in_features, slot.out_features

    def forward(self, condition: torch.Tensor, start: list[tuple[torch.Tensor, torch.Tensor]]):
        hidden = self.trunk(condition)
        factors = []
        for i, (slot, (A, B)) in enumerate(zip(self.layout.slots, start)):
            inputs = torch.cat([hidden, self.slot_embeddings[i].expand(len(hidden), -1)], -1)
            out = self.heads[self._head_of[i]](inputs)
            a_size = slot.rank * slot.in_features
            factors.append((A + out[:, :a_size].reshape(-1, slot.rank, slot.in_features),
                            B + out[:, a_size:].reshape(-1, slot.out_features, slot.rank)))
        return factors
