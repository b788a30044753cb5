"""A base model's adapters as one fixed layout (module order, rank, shapes,
scale), and the flat parameter vector of an adapter in that layout.

Generators learn a distribution over these vectors. Adapters of another layout
on the same base (another rank, other target modules, DoRA) cannot be placed in
the vector without changing what they compute, so they are skipped with the
reason recorded rather than projected silently.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from hub.formats.canonical import CanonicalAdapter, LoraModule


@dataclass(frozen=True)
class ModuleSlot:
    path: str
    rank: int
    out_features: int
    in_features: int
    scale: float

    @property
    def size(self) -> int:
        return self.rank * (self.in_features + self.out_features)


@dataclass(frozen=True)
class Layout:
    slots: tuple[ModuleSlot, ...]

    @classmethod
    def of(cls, adapter: CanonicalAdapter) -> "Layout":
        return cls(tuple(
            ModuleSlot(path, module.rank, *module.shape, round(float(module.scale), 9))
            for path, module in sorted(adapter.modules.items())
        ))

    @property
    def size(self) -> int:
        return sum(slot.size for slot in self.slots)

    def as_json(self) -> list[dict]:
        return [slot.__dict__ for slot in self.slots]

    @classmethod
    def from_json(cls, rows: list[dict]) -> "Layout":
        return cls(tuple(ModuleSlot(**row) for row in rows))

    def mismatch(self, adapter: CanonicalAdapter) -> str | None:
        """Why the adapter does not fit this layout, or None when it does."""
        if any(module.magnitude is not None for module in adapter.modules.values()):
            return "DoRA adapters carry magnitude vectors the layout has no place for"
        if adapter.extra_tensors:
            return "modules_to_save tensors are outside the LoRA layout"
        mine = {slot.path: slot for slot in self.slots}
        theirs = Layout.of(adapter)
        missing = sorted(set(mine) - {slot.path for slot in theirs.slots})
        extra = sorted({slot.path for slot in theirs.slots} - set(mine))
        if missing or extra:
            return f"target modules differ (missing {len(missing)}, extra {len(extra)}; e.g. {(missing + extra)[0]})"
        for slot in theirs.slots:
            expected = mine[slot.path]
            if slot != expected:
                return (f"{slot.path}: rank {slot.rank}, scale {slot.scale:g} where the layout has "
                        f"rank {expected.rank}, scale {expected.scale:g}")
        return None


def dominant_layout(adapters: list[CanonicalAdapter]) -> Layout:
    """The layout most adapters share (ties: the first seen)."""
    counts = Counter(Layout.of(adapter) for adapter in adapters)
    return counts.most_common(1)[0][0]


def flatten(adapter: CanonicalAdapter, layout: Layout) -> torch.Tensor:
    """The adapter's A and B factors, in layout order, as one float32 vector."""
    parts = []
    for slot in layout.slots:
        module = adapter.modules[slot.path]
        parts += [module.A.float().reshape(-1), module.B.float().reshape(-1)]
    return torch.cat(parts)


def unflatten(vector: torch.Tensor, layout: Layout, *, alpha: float | None = None) -> CanonicalAdapter:
    """The inverse of flatten: a plain PEFT LoRA in canonical form."""
    modules, offset = {}, 0
    for slot in layout.slots:
        a_size, b_size = slot.rank * slot.in_features, slot.out_features * slot.rank
        A = vector[offset : offset + a_size].reshape(slot.rank, slot.in_features)
        B = vector[offset + a_size : offset + a_size + b_size].reshape(slot.out_features, slot.rank)
        offset += a_size + b_size
        modules[slot.path] = LoraModule(A=A.contiguous().clone(), B=B.contiguous().clone(), scale=slot.scale)
    first = layout.slots[0]
    return CanonicalAdapter(
        format="peft", peft_type="LORA", modules=modules, rank=first.rank,
        alpha=alpha if alpha is not None else first.scale * first.rank,
        target_modules=sorted({slot.path.rsplit(".", 1)[-1] for slot in layout.slots}),
    )
