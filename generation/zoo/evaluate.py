"""Accuracy of any adapter (trained, retrieved, averaged or generated) on a zoo
task, and the zoo's experts as the generators' training population."""
from __future__ import annotations

from pathlib import Path

import torch

from hub.formats import parse_adapter
from hub.formats.canonical import CanonicalAdapter

from . import data, model as zoo_model
from .build import adapter_dir, load_manifest, task_from_entry
from .tasks import Task


def read_adapter(folder: Path) -> CanonicalAdapter:
    folder = Path(folder)
    return parse_adapter({name: folder / name for name in ("adapter_config.json", "adapter_model.safetensors")})


def zoo_adapters(zoo_dir: Path, splits: tuple[str, ...] = ("train",)) -> list[tuple[Task, CanonicalAdapter]]:
    tasks = [task_from_entry(entry) for entry in load_manifest(zoo_dir)["tasks"]]
    return [(task, read_adapter(adapter_dir(zoo_dir, task))) for task in tasks if task.split in splits]


class AdapterScorer:
    """One base classifier; adapters are applied by adding their ΔW to a copy of
    the base weights (what PEFT's forward computes), so scoring many adapters
    costs one model."""

    def __init__(self, base_dir: Path, eval_size: int = 512):
        self.model = zoo_model.load_classifier(base_dir)
        self.base_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.eval_size = eval_size

    def accuracy(self, task: Task, adapter: CanonicalAdapter | None) -> float:
        self.model.load_state_dict(self.base_state)
        if adapter is not None:
            state = self.model.state_dict()
            with torch.no_grad():
                for path, module in adapter.modules.items():
                    state[f"{path}.weight"].add_(module.delta_weight().to(state[f"{path}.weight"].dtype))
        texts, labels = data.sample(task, self.eval_size, seed=0, split="test")
        return zoo_model.accuracy(self.model, texts, labels)
