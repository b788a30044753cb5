"""generation.conjunctions: which conjunctions of experts are missing from a population,
their product teachers and descriptions (pure torch, on teachers built in the test)."""
import torch

from generation.conjunctions import Conjunction, conjunction_texts, find_conjunctions, product_teacher

CATEGORIES, LANGUAGES, PER_CELL = 3, 3, 4


def cell_probes(category=None, language=None):
    """Probe indices (category-major cells of PER_CELL probes) matching a category and/or language."""
    return [(c * LANGUAGES + l) * PER_CELL + k for c in range(CATEGORIES) for l in range(LANGUAGES)
            for k in range(PER_CELL) if category in (None, c) and language in (None, l)]


def detector(positives, total=CATEGORIES * LANGUAGES * PER_CELL, sure=0.95):
    """A binary expert's probabilities (T × 2): `sure` yes on its positives, 1 − sure elsewhere."""
    yes = torch.full((total,), 1 - sure)
    yes[positives] = sure
    return torch.stack([1 - yes, yes], -1)


def population():
    experts = {
        "cat0": cell_probes(category=0), "cat1": cell_probes(category=1),
        "lang0": cell_probes(language=0), "lang1": cell_probes(language=1),
        "cat0&lang1": cell_probes(0, 1), "cat1&lang0": cell_probes(1, 0),
    }
    return list(experts), torch.stack([detector(p) for p in experts.values()])


def test_finds_exactly_the_conjunctions_no_expert_covers():
    names, teacher = population()
    found = find_conjunctions(teacher)
    pairs = {tuple(names[i] for i in c.parents) for c in found}
    # cat0∧lang1 and cat1∧lang0 are experts already; cat∧cat and lang∧lang are never true;
    # an expert ∧ its superset (cat0&lang1 ∧ cat0) is that expert again.
    assert pairs == {("cat0", "lang0"), ("cat1", "lang1")}
    assert all(c.positives == PER_CELL and c.overlap < 0.5 for c in found)


def test_limit_keeps_the_most_frequent_and_overlap_threshold_is_respected():
    names, teacher = population()
    # A category-2 detector that fires on half of each of its cells: its conjunctions are
    # alive (2 positives ≥ half the rarest expert's 4) but smaller.
    half = [p for p in cell_probes(category=2) if p % PER_CELL < PER_CELL // 2]
    teacher = torch.cat([teacher, detector(half)[None]])
    names.append("cat2-half")
    found = find_conjunctions(teacher)
    assert [c.positives for c in found] == [4, 4, 2, 2]
    assert {tuple(names[i] for i in c.parents) for c in found[2:]} == {("lang0", "cat2-half"), ("lang1", "cat2-half")}
    assert find_conjunctions(teacher, limit=2) == found[:2]
    # With the overlap bound at 0, nothing that shares a single positive with an expert is new.
    assert find_conjunctions(teacher, max_overlap=0.0) == []


def test_not_binary_or_single_expert_gives_none():
    _, teacher = population()
    assert find_conjunctions(teacher[:1]) == []
    three_classes = torch.softmax(torch.randn(4, 10, 3), -1)
    assert find_conjunctions(three_classes) == []


def test_product_teacher_multiplies_the_parents_yes():
    _, teacher = population()
    conjunction = Conjunction((0, 2), PER_CELL, 0.0)
    product = product_teacher(teacher, [conjunction])
    assert product.shape == (1, teacher.shape[1], 2)
    torch.testing.assert_close(product[0, :, 1], teacher[0, :, 1] * teacher[2, :, 1])
    torch.testing.assert_close(product.sum(-1), torch.ones(1, teacher.shape[1]))
    assert set((product[0, :, 1] > 0.5).nonzero().flatten().tolist()) == set(cell_probes(0, 0))


def test_descriptions_put_the_parents_side_by_side():
    texts = [["Is this a job title?", "Detect job titles."], ["Is this Polish?", "Detect Polish text.", "Polish?"]]
    assert conjunction_texts(texts, Conjunction((0, 1), 1, 0.0)) == [
        "Is this a job title? Is this Polish?", "Detect job titles. Detect Polish text."]
