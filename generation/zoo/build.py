"""Train, evaluate and save one PEFT LoRA per task; resumable.

Every adapter starts from the same LoRA initialisation (one seed for A, B = 0),
as the expert populations of SG-LoRA and ICM-LoRA do: adapters then differ only
by what their task taught them, which is what a generator can learn.

Layout on disk:
    out_dir/base/                     config.json, model.safetensors
    out_dir/adapters/<slug>/          adapter_config.json, adapter_model.safetensors, task.json
    out_dir/zoo.json                  the manifest (family, settings, every task's metrics)
An adapter folder appears only when complete (written aside, then renamed), so
an interrupted build resumes where it stopped.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import data, model as zoo_model
from .tasks import FAMILIES, Task

LORA_INIT_SEED = 1234
MANIFEST = "zoo.json"
PROBE_TEXTS = "probe_texts.json"  # hub.formats.base_model.PROBE_TEXTS_NAME: registered with the base


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 100
    batch_size: int = 32
    learning_rate: float = 2e-3
    rank: int = 8
    alpha: float = 16.0
    eval_size: int = 512

    @classmethod
    def for_size(cls, size: str) -> "TrainSettings":
        # The small zoo is trained in every CI run: a third of the full zoo's samples at a higher
        # rate still puts every adapter at 0.73-0.98 accuracy (base 0.34-0.63) in ~7 s each.
        return cls(steps=24, batch_size=16, learning_rate=3e-3, eval_size=256) if size == "small" else cls()


def lora_config(settings: TrainSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, target_modules=list(zoo_model.TARGET_MODULES), lora_dropout=0.0
    )


def train_adapter(base_dir: Path, task: Task, settings: TrainSettings, out_dir: Path) -> dict:
    """Train the task's LoRA with PEFT, save it with save_pretrained, return its metrics."""
    from peft import get_peft_model

    classifier = zoo_model.load_classifier(base_dir)
    test_texts, test_labels = data.sample(task, settings.eval_size, seed=0, split="test")
    base_accuracy = zoo_model.accuracy(classifier, test_texts, test_labels)
    torch.manual_seed(LORA_INIT_SEED)
    peft_model = get_peft_model(classifier, lora_config(settings))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=settings.learning_rate)
    texts, labels = data.sample(task, settings.steps * settings.batch_size, seed=0, split="train")
    started = time.monotonic()
    peft_model.train()
    for step in range(settings.steps):
        batch = slice(step * settings.batch_size, (step + 1) * settings.batch_size)
        logits = peft_model(**zoo_model.encode(texts[batch]))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels[batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.monotonic() - started
    metrics = {
        "base_accuracy": base_accuracy,
        "accuracy": zoo_model.accuracy(peft_model, test_texts, test_labels),
        "final_loss": float(loss.item()),
        "train_seconds": round(seconds, 2),
    }
    peft_model.save_pretrained(out_dir)
    return metrics


def adapter_dir(zoo_dir: Path, task: Task) -> Path:
    return Path(zoo_dir) / "adapters" / task.slug


def build_zoo(zoo_dir: Path, size: str = "full", *, progress: bool = True) -> dict:
    """Build (or finish building) the zoo; return the manifest."""
    from tqdm import tqdm

    zoo_dir = Path(zoo_dir)
    tasks = FAMILIES[size]()
    settings = TrainSettings.for_size(size)
    base_dir = zoo_dir / "base"
    if not (base_dir / "model.safetensors").exists():
        partial = zoo_dir / "base.partial"
        shutil.rmtree(partial, ignore_errors=True)
        zoo_model.build_zoo_base(partial)
        partial.rename(base_dir)
    probes = base_dir / PROBE_TEXTS
    if not probes.exists():  # zoos built before probe texts existed get them on the next build
        per_cell = 8 if size == "small" else data.PROBES_PER_CELL  # the small zoo's teachers run in CI
        texts = data.probe_texts(data.probe_cells(tasks), per_cell)
        probes.with_suffix(".partial").write_text(json.dumps({"texts": texts}))
        probes.with_suffix(".partial").rename(probes)
    entries = []
    for task in tqdm(tasks, desc=f"LoRA zoo ({size})", unit="adapter", disable=not progress):
        final = adapter_dir(zoo_dir, task)
        if not (final / "task.json").exists():
            partial = final.with_name(final.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            metrics = train_adapter(base_dir, task, settings, partial)
            (partial / "task.json").write_text(json.dumps({"task": asdict(task), "metrics": metrics}, indent=2))
            final.parent.mkdir(parents=True, exist_ok=True)
            partial.rename(final)
        entries.append(json.loads((final / "task.json").read_text()))
    manifest = {"size": size, "settings": asdict(settings), "lora_init_seed": LORA_INIT_SEED, "tasks": entries}
    (zoo_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def load_manifest(zoo_dir: Path) -> dict:
    return json.loads((Path(zoo_dir) / MANIFEST).read_text())


def task_from_entry(entry: dict) -> Task:
    fields = dict(entry["task"])
    fields["paraphrases"] = tuple(fields["paraphrases"])
    return Task(**fields)


ZOO_NAMESPACE = "zoo"
ZOO_BASE_NAME = "minilm-task-classifier"


def zoo_catalog(zoo_dir: Path, namespace: str = ZOO_NAMESPACE) -> dict:
    """The zoo as a registry catalog (hub.services.catalog.seed_catalog): the base and
    the *training* experts. Held-out tasks stay out of the registry: they are the
    benchmark's oracles, and a generator that had seen them would not be zero-shot."""
    from .tasks import LANGUAGES

    zoo_dir = Path(zoo_dir)
    base = zoo_dir / "base"
    adapters = []
    for entry in load_manifest(zoo_dir)["tasks"]:
        task = task_from_entry(entry)
        if task.split != "train":
            continue
        folder = adapter_dir(zoo_dir, task)
        tags = ["zoo", "text-classification", *(t.replace("_", "-") for t in (task.category,) if t)]
        if task.locale:
            tags.append(LANGUAGES[task.locale].lower())
        adapters.append({
            "namespace": namespace, "name": task.slug, "base_model": f"{namespace}/{ZOO_BASE_NAME}",
            # The description carries the paraphrases as extra sentences: the generators
            # read each sentence as one more way users phrase the task.
            "description": " ".join(task.texts), "tags": tags, "license": "apache-2.0",
            "files": [folder / "adapter_config.json", folder / "adapter_model.safetensors"],
        })
    return {
        "base_models": [{
            "namespace": namespace, "name": ZOO_BASE_NAME,
            "description": "all-MiniLM-L6-v2 with mean pooling and a frozen 2-way head fixed by a seed: the "
                           "base of the LoRA zoo (load with generation.zoo.model.load_classifier). "
                           "probe_texts.json: unlabelled texts of its domain, for function-space generator "
                           "training.",
            "files": [base / "config.json", base / "model.safetensors", base / PROBE_TEXTS],
        }],
        "adapters": adapters,
    }
