"""Derived experts: conjunctions of experts that the population does not cover yet,
distilled into LoRAs of the layout before a generator is trained.

Why: a task like "is this a job title written in Polish" is the conjunction of two
tasks the population knows ("is this a job title", "is this written in Polish"). Its
function is the product of the two experts' functions (on the zoo, p(job title) ·
p(Polish) labels such unseen pairs with 0.95 of their oracle's gain), and no mixture
of expert *parameters* expresses a product (0.56–0.62 measured, README "Generation").
So, once per training job and not per request, each missing conjunction is
distilled into one adapter: the base model is taught to answer like the product of
the two parents' probabilities on the base's unlabelled probe texts (no labels, no
user data). The derived adapters join the expert bank with a description made of
their parents' descriptions, so a request finds them by description like any expert,
and generation stays a millisecond decode.

Which conjunctions (i < j): for binary detectors (class 1 = "yes", as "is this text
…?" tasks are), the product's positives on the probes (p_i · p_j > ½) must be
* alive: at least half as many as the rarest expert's own positives (the conjunction
  of disjoint tasks, "a job title that is a phone number", is never true),
* new: no expert's positives overlap them with Jaccard ≥ `max_overlap` (the product of
  an expert and one of its supersets, "job title in German" ∧ "job title", is that
  expert again; a conjunction an expert already covers needs no second adapter), and
* of two attributes, as the population itself shows them: its *known compositions* are
  the pairs whose product some third expert already is (Jaccard ≥ `max_overlap`, closer
  than to either parent: "is a job title" ∧ "is English" = "job title in English"). They
  link experts of different attributes, so each connected group of them splits in two
  sides (categories | languages), and a new conjunction must join the two sides of one
  group. Why: broad detectors share false positives, so the product of two
  *alternatives* ("is German" ∧ "is Polish": 126 of 1 680 zoo probes, texts with no
  language in them) is alive and new but means nothing. On the full zoo the first two
  rules alone keep 142 pairs (all 10 held-out pairs, then mostly such products of
  alternatives); with the third, 28: the 10 held-out pairs and 18 pairs whose expert
  exists but is narrower than its parents' product. A group whose links form an odd
  cycle has no two sides and yields nothing; a population with no known composition
  yields nothing (nothing shows which experts compose).
The most frequent first, at most `limit`.

Pure torch; no Django.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .functional import BatchedLoRA, StratifiedProbes, distillation_loss, split_factors
from .generators import no_parents

POSITIVE_CLASS = 1
MAX_CONJUNCTIONS = 64  # derived experts per training job: bounds its distillation time
DISTILL_STEPS = 100
CONJUNCTIONS_VERSION = 2  # bump when find_conjunctions or distill_conjunctions changes what it returns


@dataclass(frozen=True)
class Conjunction:
    parents: tuple[int, int]  # expert indices, i < j
    positives: int  # probe texts the product calls positive
    overlap: float  # largest Jaccard overlap of those positives with any expert's


def find_conjunctions(teacher: torch.Tensor, *, limit: int = MAX_CONJUNCTIONS, max_overlap: float = 0.5) -> list[Conjunction]:
    """teacher: the experts' class probabilities on the probes (n × T × 2). Returns the
    alive, new conjunctions of two attributes (module docstring), most positives first."""
    if teacher.ndim != 3 or teacher.shape[-1] != 2 or teacher.shape[0] < 2:
        return []  # conjunctions are defined for two or more binary detectors
    yes = teacher[..., POSITIVE_CLASS].float()  # n × T
    expert_positive = (yes > 0.5).float()
    counts = expert_positive.sum(-1)
    alive_at = max(1.0, 0.5 * float(counts[counts > 0].min())) if bool((counts > 0).any()) else float("inf")
    n = yes.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    product_positive = ((yes[i] * yes[j]) > 0.5).float()  # pairs × T
    sizes = product_positive.sum(-1)
    intersections = product_positive @ expert_positive.T  # pairs × n
    jaccard = intersections / (sizes[:, None] + counts[None, :] - intersections).clamp(min=1)
    overlap = jaccard.max(-1).values
    side = attribute_sides(i, j, jaccard, max_overlap)
    two_attributes = (side[i] >= 0) & (side[j] >= 0) & (side[i] // 2 == side[j] // 2) & (side[i] != side[j])
    keep = (sizes >= alive_at) & (overlap < max_overlap) & two_attributes
    found = [Conjunction((int(a), int(b)), int(s), round(float(o), 4))
             for a, b, s, o, k in zip(i, j, sizes, overlap, keep) if bool(k)]
    found.sort(key=lambda c: (-c.positives, c.parents))
    return found[:limit]


def attribute_sides(i: torch.Tensor, j: torch.Tensor, jaccard: torch.Tensor, max_overlap: float) -> torch.Tensor:
    """Each expert's side in the graph of known compositions (module docstring), as
    2·group + side (0 or 1); −1 for an expert in no known composition or in a group
    with an odd cycle. i, j: the pairs (i < j); jaccard: pairs × n, each pair's product
    positives against each expert's."""
    rows = torch.arange(len(i))
    parents_best = torch.maximum(jaccard[rows, i], jaccard[rows, j])
    third = jaccard.clone()
    third[rows, i] = third[rows, j] = -1.0
    third_best = third.max(-1).values
    known = (third_best >= max_overlap) & (third_best > parents_best)
    partners: dict[int, list[int]] = {}
    for a, b in zip(i[known].tolist(), j[known].tolist()):
        partners.setdefault(a, []).append(b)
        partners.setdefault(b, []).append(a)
    side = torch.full((jaccard.shape[1],), -1, dtype=torch.long)
    seen: set[int] = set()
    for group, start in enumerate(sorted(partners)):
        if start in seen:
            continue
        side[start], members, frontier, bipartite = 2 * group, [start], [start], True
        while frontier:
            expert = frontier.pop()
            for partner in partners[expert]:
                if side[partner] < 0:
                    side[partner] = side[expert] ^ 1  # the other side of the same group
                    members.append(partner)
                    frontier.append(partner)
                elif side[partner] == side[expert]:
                    bipartite = False
        seen.update(members)
        if not bipartite:
            side[members] = -1
    return side


def product_teacher(teacher: torch.Tensor, conjunctions: list[Conjunction]) -> torch.Tensor:
    """Each conjunction's probabilities on the probes (m × T × 2): yes = p_i(yes) · p_j(yes)."""
    yes = torch.stack([teacher[a, :, POSITIVE_CLASS] * teacher[b, :, POSITIVE_CLASS]
                       for a, b in (c.parents for c in conjunctions)])
    return torch.stack([1 - yes, yes], -1)


def conjunction_texts(texts: list[list[str]], conjunction: Conjunction) -> list[str]:
    """The derived expert's description and paraphrases: its parents' side by side
    (a sentence encoder embeds "Is this text a job title? Is this text written in
    Polish?" at cosine 0.99 with "Is this text a job title written in Polish?")."""
    first, second = (texts[p] for p in conjunction.parents)
    return [f"{a} {b}" for a, b in zip(first, second)]


def distill_conjunctions(runner: BatchedLoRA, params: torch.Tensor, teacher: torch.Tensor,
                         conjunctions: list[Conjunction], *, steps: int = DISTILL_STEPS, probes_per_task: int = 32,
                         learning_rate: float = 2e-3, seed: int = 0,
                         progress: Callable[[int, int, float], None] | None = None) -> torch.Tensor:
    """One LoRA per conjunction (m × D, the layout's flat order), trained together: each
    starts at its parents' mean and is taught the product of their probabilities on
    probes drawn class by class of the product's own predictions (a conjunction's
    positives are rare). progress(step, steps, loss)."""
    if not conjunctions:
        return params.new_zeros((0, params.shape[1]))
    targets = product_teacher(teacher, conjunctions)
    parents = torch.tensor([c.parents for c in conjunctions])
    derived = params[parents].float().mean(1).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([derived], lr=learning_rate)
    probes = StratifiedProbes(targets, seed)
    texts = runner.probe.texts
    for step in range(steps):
        drawn = [(m, probe) for m in range(len(conjunctions)) for probe in probes.draw(m, probes_per_task)]
        owner = torch.tensor([m for m, _ in drawn])
        rows = [probe for _, probe in drawn]
        factors = [(A[owner], B[owner]) for A, B in split_factors(derived, runner.layout)]
        loss = distillation_loss(runner.logits([texts[p] for p in rows], factors), targets[owner, torch.tensor(rows)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress:
            progress(step + 1, steps, loss.item())
    return derived.detach().to(params.dtype)


def bank_parents(experts: int, conjunctions: list[Conjunction]) -> torch.Tensor:
    """The expert bank's lineage (generators.ExpertBank.parents) for `experts` real experts
    followed by these derived ones: −1 for a real expert, a conjunction's two parents else."""
    derived = torch.tensor([c.parents for c in conjunctions], dtype=torch.long).reshape(-1, 2)
    return torch.cat([no_parents(experts), derived])
