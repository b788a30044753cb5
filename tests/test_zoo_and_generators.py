"""The LoRA zoo (task family, data, real PEFT training, resumable build) and the
SG-LoRA / ICM-LoRA generators as pure torch, on the small zoo's real adapters."""
from __future__ import annotations

import io
import shutil

import pytest
import torch

from generation import generators, lora_layout
from generation.zoo import data
from generation.zoo.build import adapter_dir, build_zoo, load_manifest, task_from_entry
from generation.zoo.evaluate import zoo_adapters
from generation.zoo.tasks import CATEGORIES, LANGUAGES, task_family

pytestmark = pytest.mark.timeout(1500)  # the first test to use the small zoo builds it


def test_task_family_has_the_held_out_splits_the_benchmark_needs():
    tasks = task_family()
    assert len(tasks) >= 60 and len(CATEGORIES) >= 7 and len(LANGUAGES) >= 10
    assert len({t.slug for t in tasks}) == len(tasks)
    assert all(2 <= len(t.paraphrases) <= 3 for t in tasks)
    train = [t for t in tasks if t.split == "train"]
    seen_categories = {t.category for t in train if t.category}
    seen_locales = {t.locale for t in train if t.locale}
    trained_pairs = {(t.category, t.locale) for t in train}
    unseen_pairs = [t for t in tasks if t.split == "unseen_pair"]
    assert len(unseen_pairs) >= 10
    for task in unseen_pairs:  # the pair is new, each part is known
        assert (task.category, task.locale) not in trained_pairs
        assert task.category in seen_categories and task.locale in seen_locales
    unseen_parts = [t for t in tasks if t.split == "unseen_part"]
    assert len(unseen_parts) >= 5
    for task in unseen_parts:  # the category or the language was never trained at all
        assert (task.category and task.category not in seen_categories) or (task.locale and task.locale not in seen_locales)
    assert {"is this text", "written in"} <= {w for t in tasks for w in ("is this text", "written in") if w in t.description.lower()}


def test_task_data_is_seeded_balanced_and_split():
    task = next(t for t in task_family() if t.category == "job_title" and t.locale == "de_DE")
    texts, labels = data.sample(task, 400, seed=0)
    assert (texts, labels) == data.sample(task, 400, seed=0)
    assert 0.4 < sum(labels) / len(labels) < 0.6
    assert data.text_pool("job_title", "de_DE", data.TRAIN_SEED) != data.text_pool("job_title", "de_DE", data.TEST_SEED)
    positives = [text for text, label in zip(texts, labels) if label]
    assert set(positives) <= set(data.text_pool("job_title", "de_DE", data.TRAIN_SEED))


def test_small_zoo_trains_every_adapter_and_resumes(small_zoo):
    manifest = load_manifest(small_zoo)
    assert manifest["size"] == "small" and len(manifest["tasks"]) == 13
    for entry in manifest["tasks"]:
        metrics = entry["metrics"]
        assert metrics["accuracy"] >= metrics["base_accuracy"] + 0.15, entry["task"]["slug"]
    # Interrupted build: one adapter missing (and a half-written one lying around).
    victim = task_from_entry(manifest["tasks"][3])
    others = {e["task"]["slug"]: (adapter_dir(small_zoo, task_from_entry(e)) / "adapter_model.safetensors").stat().st_mtime_ns
              for e in manifest["tasks"] if e["task"]["slug"] != victim.slug}
    shutil.rmtree(adapter_dir(small_zoo, victim))
    adapter_dir(small_zoo, victim).with_name(victim.slug + ".partial").mkdir()
    rebuilt = build_zoo(small_zoo, "small", progress=False)
    assert len(rebuilt["tasks"]) == 13
    assert (adapter_dir(small_zoo, victim) / "adapter_model.safetensors").exists()
    assert not adapter_dir(small_zoo, victim).with_name(victim.slug + ".partial").exists()
    for slug, mtime in others.items():  # nothing else was retrained
        assert (small_zoo / "adapters" / slug / "adapter_model.safetensors").stat().st_mtime_ns == mtime


@pytest.fixture(scope="module")
def experts(small_zoo):
    from generation.text_encoder import embed_texts

    population = zoo_adapters(small_zoo, ("train",))
    layout = lora_layout.dominant_layout([adapter for _, adapter in population])
    params = torch.stack([lora_layout.flatten(adapter, layout) for _, adapter in population])
    texts = [embed_texts(list(task.texts)) for task, _ in population]
    return population, layout, params, texts


def test_layout_round_trip_and_mismatch_reasons(experts):
    population, layout, params, _ = experts
    task, adapter = population[0]
    assert len(layout.slots) == 12 and layout.size == params.shape[1]  # query+value × 6 layers, rank 8
    rebuilt = lora_layout.unflatten(params[0], layout)
    for path, module in adapter.modules.items():
        assert torch.equal(rebuilt.modules[path].delta_weight(), module.delta_weight())
    assert layout.mismatch(adapter) is None
    fewer = lora_layout.unflatten(params[0], layout)
    fewer.modules.pop(next(iter(fewer.modules)))
    assert "target modules differ" in layout.mismatch(fewer)
    wider = lora_layout.unflatten(params[0], layout)
    path, module = next(iter(wider.modules.items()))
    module.A, module.B = torch.cat([module.A, module.A]), torch.cat([module.B, module.B], 1)
    assert "rank 16" in layout.mismatch(wider)
    dora = lora_layout.unflatten(params[0], layout)
    next(iter(dora.modules.values())).magnitude = torch.ones(384)
    assert "DoRA" in layout.mismatch(dora)


def test_expert_bank_spans_the_experts(experts):
    _, _, params, texts = experts
    bank = generators.ExpertBank.fit(params, texts)
    for j in range(len(params)):
        error = (bank.to_params(bank.coeffs[j]) - params[j]).norm() / params[j].norm()
        assert error < 1e-4  # float32 SVD round-off; the basis spans every expert
    index, weights, _ = bank.neighbours(bank.task_embeddings[:2], k=3, temperature=0.1, exclude=torch.tensor([0, 1]))
    assert index.shape == (2, 3) and 0 not in index[0].tolist() and 1 not in index[1].tolist()
    assert torch.allclose(weights.sum(1), torch.ones(2))


@pytest.mark.parametrize("method", generators.METHODS)
def test_generator_trains_saves_loads_and_generates_deterministically(experts, method):
    from generation.text_encoder import embed_texts

    _, layout, params, texts = experts
    generator, curve = generators.train_generator(method, params, texts, generators.GeneratorSettings(steps=200))
    assert curve[0]["step"] == 0 and curve[-1]["step"] == 200
    kept = min(point["validation_error"] for point in curve)
    assert generator.validation_error(*_validation(generator, texts)) == pytest.approx(kept, abs=1e-4)
    query = embed_texts(["Is this text a job title written in Polish?"])[0]
    vector, used = generator.generate(query)
    assert vector.shape == (layout.size,) and torch.isfinite(vector).all()
    assert torch.equal(vector, generator.generate(query)[0])
    assert sum(weight for _, weight in used) == pytest.approx(1.0, abs=1e-5)
    buffer = io.BytesIO()
    generator.save(buffer, extra={"layout": layout.as_json()})
    loaded, extra = generators.load_generator(buffer.getvalue())
    assert lora_layout.Layout.from_json(extra["layout"]) == layout
    again, used_again = loaded.generate(query)
    assert [i for i, _ in used_again] == [i for i, _ in used]
    assert torch.allclose(again, vector, atol=1e-3 * vector.abs().max())  # the basis is stored in float16
    assert len(buffer.getvalue()) < 2 * params.numel() * 4  # never more than twice the experts themselves


def _validation(generator, texts):
    experts = torch.tensor([j for j, embeddings in enumerate(texts) for _ in embeddings])
    rows = generators.validation_rows_of(experts, generator.settings)
    return torch.cat(texts)[rows], experts[rows]
