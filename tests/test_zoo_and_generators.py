"""The LoRA zoo (task family, data, real PEFT training, resumable build) and the
SG-LoRA / ICM-LoRA generators as pure torch, on the small zoo's real adapters."""
from __future__ import annotations

import io
import shutil

import pytest
import torch

from generation import functional, generators, lora_layout
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
    assert manifest["size"] == "small" and len(manifest["tasks"]) == 16
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
    assert len(rebuilt["tasks"]) == 16
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


def test_leaving_an_expert_out_hides_the_entries_derived_from_it(experts):
    """A derived entry (a conjunction) carries what its parents know: leave-one-out, which
    stands for an unseen task, must not see it through them."""
    from generation import conjunctions

    _, _, params, texts = experts
    n = len(params)
    found = [conjunctions.Conjunction((0, 1), 1, 0.0), conjunctions.Conjunction((2, 3), 1, 0.0)]
    bank = generators.ExpertBank.fit(torch.cat([params, params[[0, 2]]]), texts + [texts[0], texts[2]],
                                     parents=conjunctions.bank_parents(n, found))
    index, _, _ = bank.neighbours(bank.task_embeddings[:4], k=n + 2, temperature=0.1, exclude=torch.arange(4))
    assert index.shape == (4, n)  # every entry a row may see, and no more
    for row, hidden in enumerate([{0, n}, {1, n}, {2, n + 1}, {3, n + 1}]):
        assert set(index[row].tolist()) == set(range(n + 2)) - hidden
    # Seen from another expert, a derived entry is an entry like any other; its twin ranks first.
    index, _, _ = bank.neighbours(bank.task_embeddings[[n]], k=2, temperature=0.1, exclude=torch.tensor([5]))
    assert set(index[0].tolist()) == {0, n}


@pytest.mark.parametrize("method", generators.METHODS)
def test_generator_trains_saves_loads_and_generates_deterministically(experts, method):
    _, layout, params, texts = experts
    generator, curve = generators.train_generator(method, params, texts, generators.GeneratorSettings(steps=200))
    assert curve[0]["step"] == 0 and curve[-1]["step"] == 200
    torch.rand(3)  # whatever the process drew in between, the same settings train the same generator
    assert generators.train_generator(method, params, texts, generators.GeneratorSettings(steps=200))[1] == curve
    kept = min(point["validation_error"] for point in curve)
    assert generator.validation_error(*_validation(generator, texts)) == pytest.approx(kept, abs=1e-4)
    loaded, stored_bytes = _generates_deterministically_and_round_trips(generator, layout)
    assert not loaded.functional
    assert stored_bytes < 2 * params.numel() * 4  # never more than twice the experts themselves


def _generates_deterministically_and_round_trips(generator, layout):
    """Generate for one query: a finite vector of the layout, the same every time, experts' weights
    summing to 1; saved and loaded, the same experts and (float16 basis aside) the same vector.
    Returns the loaded generator and the stored size."""
    from generation.text_encoder import embed_texts

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
    return loaded, len(buffer.getvalue())


def _validation(generator, texts):
    experts = torch.tensor([j for j, embeddings in enumerate(texts) for _ in embeddings])
    rows = generators.validation_rows_of(experts, generator.settings)
    return torch.cat(texts)[rows], experts[rows]


# ----------------------------------------------------------------------
# Function space: generators judged by what their adapters do


@pytest.fixture(scope="module")
def function_space(small_zoo, experts):
    """The zoo base as a FunctionProbe on its registered probe texts, and the experts' teachers."""
    from generation.zoo import model as zoo_model
    from hub.formats.base_model import read_probe_texts

    _, layout, params, _ = experts
    probe = zoo_model.function_probe(small_zoo / "base", read_probe_texts(small_zoo / "base" / "probe_texts.json"))
    runner = functional.BatchedLoRA(probe, layout)
    return probe, runner, functional.teacher_probabilities(runner, params)


def test_batched_lora_runs_every_row_with_its_own_adapter_as_peft_does(small_zoo, experts, function_space):
    from peft import PeftModel

    from generation.zoo import model as zoo_model

    population, layout, params, _ = experts
    _, runner, _ = function_space
    factors = functional.split_factors(params[:2], layout)
    assert torch.equal(functional.join_factors(factors), params[:2])
    texts = ["Anna Nowak", "Software engineer", "+48 601 234 567", "Berlin", "Ein kurzer Satz.", "Kowalski i syn"]
    rows = torch.tensor([0, 1, 0, 1, 1, 0])
    with torch.no_grad():
        got = runner.logits(texts, [(A[rows], B[rows]) for A, B in factors])
        for j in (0, 1):
            peft_model = PeftModel.from_pretrained(zoo_model.load_classifier(small_zoo / "base"),
                                                   adapter_dir(small_zoo, population[j][0]))
            expected = peft_model(**zoo_model.encode(texts))
            assert torch.allclose(got[rows == j], expected[rows == j], atol=1e-5)
    modules = dict(runner.probe.model.named_modules())
    assert not any(modules[slot.path]._forward_hooks for slot in layout.slots)  # the base is plain again


def test_teachers_are_each_experts_own_predictions_on_the_probe_texts(small_zoo, experts, function_space):
    population, _, _, _ = experts
    probe, _, teacher = function_space
    cells = data.probe_cells([task_from_entry(entry) for entry in load_manifest(small_zoo)["tasks"]])
    per_cell = len(probe.texts) // len(cells)
    assert teacher.shape == (len(population), len(probe.texts), 2)
    own, rest = [], []
    for j, (task, _) in enumerate(population):
        if task.category and task.locale:  # a pair expert says yes to its own cell's texts, no elsewhere
            i = cells.index((task.category, task.locale))
            own.append(teacher[j, i * per_cell : (i + 1) * per_cell, 1].mean())
            rest.append(torch.cat([teacher[j, : i * per_cell, 1], teacher[j, (i + 1) * per_cell :, 1]]).mean())
    assert min(own) > 0.6 and max(rest) < 0.3, (own, rest)
    draws = functional.StratifiedProbes(teacher, seed=0).draw(0, 16)
    assert sum(int(teacher[0, i].argmax()) for i in draws) == 8  # the expert's two classes alike


@pytest.mark.parametrize("method", generators.METHODS)
def test_function_space_generator_trains_saves_loads_and_generates_deterministically(experts, function_space, method):
    _, layout, params, texts = experts
    probe, _, teacher = function_space
    settings = generators.GeneratorSettings(steps=20, validation_probes=16)
    generator, curve = generators.train_generator(method, params, texts, settings,
                                                  probe=probe, layout=layout, teacher=teacher)
    assert generator.functional and [point["step"] for point in curve] == [0, 20]
    assert 0.0 <= curve[-1]["validation_error"] <= 1.0 and curve[-1]["train_loss"] > 0
    loaded, _ = _generates_deterministically_and_round_trips(generator, layout)
    assert loaded.functional and loaded.settings.steps == 20


def test_conjunctions_distil_towards_the_product_of_their_parents(experts, function_space):
    """Derived experts (generation/conjunctions.py) on the small zoo's real experts: the
    distilled adapters answer like the product of their parents' probabilities on the probe
    texts more often than where they start (their parents' mean)."""
    from generation import conjunctions

    _, layout, params, _ = experts
    _, runner, teacher = function_space
    found = conjunctions.find_conjunctions(teacher, limit=3)
    assert found and all(a < b for a, b in (c.parents for c in found))
    targets = conjunctions.product_teacher(teacher, found)

    def agreement(candidates):
        with torch.no_grad():
            student = functional.teacher_probabilities(runner, candidates)
        # Balanced over the product's two classes, as the distillation draws its probes.
        hits = student.argmax(-1) == targets.argmax(-1)
        positive = targets.argmax(-1) == conjunctions.POSITIVE_CLASS
        return float((hits & positive).sum(1).div(positive.sum(1)).mean() + (hits & ~positive).sum(1).div(
            (~positive).sum(1)).mean()) / 2

    starts = torch.stack([params[list(c.parents)].mean(0) for c in found])
    losses = []
    derived = conjunctions.distill_conjunctions(runner, params, teacher, found, steps=40,
                                                progress=lambda step, steps, loss: losses.append(loss))
    assert derived.shape == (len(found), params.shape[1]) and len(losses) == 40
    assert agreement(derived) > agreement(starts) + 0.05, (agreement(derived), agreement(starts))
    first, again = (conjunctions.distill_conjunctions(runner, params, teacher, found, steps=5) for _ in range(2))
    # Seeded: a retrained population gets the same derived experts (up to the float32 sums of
    # threaded backward passes, whose order varies between runs).
    torch.testing.assert_close(first, again, rtol=1e-3, atol=1e-5)


def test_temperature_is_chosen_by_what_the_prior_does(experts, function_space):
    """select_temperature on the small zoo: where every expert has an exact twin in the bank
    (an entry that fits its task perfectly), the prior that takes the twin alone agrees with
    the expert best, so the sharpest temperatures win; each τ's agreement is measured on the
    experts' own predictions, and the chosen τ is the best of the table."""
    _, _, params, texts = experts
    _, runner, teacher = function_space
    descriptions = torch.stack([e[0] for e in texts])
    plain = generators.ExpertBank.fit(params, texts)
    with_twins = generators.ExpertBank.fit(torch.cat([params, params]), texts + texts)
    chosen, table = generators.select_temperature(with_twins, runner, teacher, descriptions, k=5)
    assert [row["temperature"] for row in table] == list(generators.TEMPERATURE_CANDIDATES)
    agreement = {row["temperature"]: row["agreement"] for row in table}
    assert chosen == max(table, key=lambda row: row["agreement"])["temperature"] and chosen <= 0.03, table
    assert agreement[chosen] > 0.9 and agreement[chosen] > agreement[0.2] + 0.1, table
    _, without = generators.select_temperature(plain, runner, teacher, descriptions, k=5)
    assert max(row["agreement"] for row in without) < agreement[chosen] - 0.1, (without, table)
