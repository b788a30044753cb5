"""generation.conjunctions: which conjunctions of experts are missing from a population,
their product teachers and descriptions (pure torch, on teachers built in the test)."""
import torch

from generation.conjunctions import (Conjunction, attribute_sides, conjunction_texts, find_conjunctions,
                                     product_teacher)

CATEGORIES, LANGUAGES, PER_CELL = 3, 3, 4
# After the category × language cells: PER_CELL probes with no language in them (numbers,
# say), which two broad language detectors both call theirs.
NO_LANGUAGE = list(range(CATEGORIES * LANGUAGES * PER_CELL, (CATEGORIES * LANGUAGES + 1) * PER_CELL))
TOTAL = NO_LANGUAGE[-1] + 1


def cell_probes(category=None, language=None):
    """Probe indices (category-major cells of PER_CELL probes) matching a category and/or language."""
    return [(c * LANGUAGES + l) * PER_CELL + k for c in range(CATEGORIES) for l in range(LANGUAGES)
            for k in range(PER_CELL) if category in (None, c) and language in (None, l)]


def detector(positives, total=TOTAL, sure=0.95):
    """A binary expert's probabilities (T × 2): `sure` yes on its positives, 1 − sure elsewhere."""
    yes = torch.full((total,), 1 - sure)
    yes[positives] = sure
    return torch.stack([1 - yes, yes], -1)


def population():
    """Category and language detectors (lang0 and lang1 broad: both fire on NO_LANGUAGE) and
    five of the nine pair experts, whose products link categories to languages."""
    experts = {f"cat{c}": cell_probes(category=c) for c in range(CATEGORIES)}
    experts.update({f"lang{l}": cell_probes(language=l) + (NO_LANGUAGE if l < 2 else []) for l in range(LANGUAGES)})
    experts.update({f"cat{c}&lang{l}": cell_probes(c, l) for c, l in ((0, 0), (0, 1), (1, 0), (1, 2), (2, 1))})
    return list(experts), torch.stack([detector(p) for p in experts.values()])


def named(names, found):
    return {tuple(names[i] for i in c.parents) for c in found}


def test_finds_exactly_the_missing_conjunctions_of_two_attributes():
    names, teacher = population()
    found = find_conjunctions(teacher)
    # The four pairs no expert covers. Not: cat∧cat (never true); a pair expert ∧ its superset
    # (that expert again); lang0∧lang1, alive and new on their shared false positives but two
    # alternatives: both languages compose with the same categories, so they are one side.
    assert named(names, found) == {("cat0", "lang2"), ("cat1", "lang1"), ("cat2", "lang0"), ("cat2", "lang2")}
    assert all(c.positives == PER_CELL and c.overlap < 0.5 for c in found)
    lang0_and_lang1 = (teacher[names.index("lang0"), :, 1] * teacher[names.index("lang1"), :, 1] > 0.5)
    assert lang0_and_lang1.nonzero().flatten().tolist() == NO_LANGUAGE


def test_no_known_composition_means_no_conjunction():
    """Category and language detectors alone: nothing in the population shows which of them
    compose (cat0∧lang0 might as well be two alternatives' shared errors), so nothing is derived."""
    names, teacher = population()
    assert find_conjunctions(teacher[[names.index(n) for n in ("cat0", "cat1", "lang0", "lang1", "lang2")]]) == []


def test_sides_come_from_known_compositions_and_an_odd_cycle_has_none():
    """Experts 0–2 and, as third experts, 3–5: pair (0, 1)'s product is expert 3, (1, 2)'s is 4."""
    i, j = torch.triu_indices(6, 6, offset=1)
    pair = {(a, b): row for row, (a, b) in enumerate(zip(i.tolist(), j.tolist()))}
    jaccard = torch.zeros(len(i), 6)
    jaccard[pair[0, 1], 3] = jaccard[pair[1, 2], 4] = 1.0
    side = attribute_sides(i, j, jaccard, 0.5)
    assert side[0] == side[2] != side[1] and side[0] // 2 == side[1] // 2 and (side[3:] == -1).all()
    jaccard[pair[0, 2], 5] = 1.0  # 0–1–2–0: no two sides
    assert (attribute_sides(i, j, jaccard, 0.5) == -1).all()


def test_limit_keeps_the_most_frequent_and_overlap_threshold_is_respected():
    names, teacher = population()
    # A category-2 detector that fires on half of each of its cells: its product with lang1 is
    # half of cat2&lang1 (Jaccard ½: a known composition, so it is a category), and its
    # conjunctions with lang0 and lang2 are alive (2 positives ≥ half the rarest expert's 4).
    half = [p for p in cell_probes(category=2) if p % PER_CELL < PER_CELL // 2]
    teacher = torch.cat([teacher, detector(half)[None]])
    names.append("cat2-half")
    found = find_conjunctions(teacher)
    assert [c.positives for c in found] == [4, 4, 4, 4, 2, 2]
    assert named(names, found[4:]) == {("lang0", "cat2-half"), ("lang2", "cat2-half")}
    assert find_conjunctions(teacher, limit=2) == found[:2]
    # With the overlap bound at 0, nothing that shares a single positive with an expert is new.
    assert find_conjunctions(teacher, max_overlap=0.0) == []


def test_not_binary_or_single_expert_gives_none():
    _, teacher = population()
    assert find_conjunctions(teacher[:1]) == []
    three_classes = torch.softmax(torch.randn(4, 10, 3), -1)
    assert find_conjunctions(three_classes) == []


def test_product_teacher_multiplies_the_parents_yes():
    names, teacher = population()
    cat0, lang0 = names.index("cat0"), names.index("lang0")
    product = product_teacher(teacher, [Conjunction((cat0, lang0), PER_CELL, 0.0)])
    assert product.shape == (1, teacher.shape[1], 2)
    torch.testing.assert_close(product[0, :, 1], teacher[cat0, :, 1] * teacher[lang0, :, 1])
    torch.testing.assert_close(product.sum(-1), torch.ones(1, teacher.shape[1]))
    assert set((product[0, :, 1] > 0.5).nonzero().flatten().tolist()) == set(cell_probes(0, 0))


def test_descriptions_put_the_parents_side_by_side():
    texts = [["Is this a job title?", "Detect job titles."], ["Is this Polish?", "Detect Polish text.", "Polish?"]]
    assert conjunction_texts(texts, Conjunction((0, 1), 1, 0.0)) == [
        "Is this a job title? Is this Polish?", "Detect job titles. Detect Polish text."]
