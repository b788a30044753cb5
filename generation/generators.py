"""LoRA generators learned from a base model's expert adapters: SG-LoRA and
ICM-LoRA. Pure torch; the hub supplies flat parameter vectors (lora_layout)
and text embeddings (text_encoder) and stores what `save` writes.

Shared pieces
- ExpertBank: the experts' parameter vectors in a PCA basis of their span
  (mean + ≤ MAX_COMPONENTS orthonormal directions: a generated adapter is a point of that
  affine space; storage is D×P instead of D×n), plus one unit text embedding
  per expert task (mean of its description and paraphrases).
- CVAE: q(z | x, c) and p(x | z, c) as small MLPs modelling the target's offset
  from a prior built out of related experts. Generation decodes z = 0, the mean
  of the latent prior, so a request gives the same adapter every time. The
  decoder starts at zero (an untrained generator returns its prior), and the
  state with the best validation error is kept, step 0 included.
- Mixtures of experts keep the experts' norm (norm_preserving_mix): a plain
  weighted mean of nearly orthogonal adapters shrinks towards the mean adapter.

SG-LoRA ("Semantic-guided LoRA Parameter Generation"), choices made here:
1. The semantic bridge is the hub's text encoder (MiniLM; the paper uses CLIP's).
2. Expert selection: cosine similarity of the request's embedding to each
   expert task, top-k (default 5), weights softmax(sim / τ). τ is the paper's 0.1
   unless the hub can run the base model: then it is chosen by function on the
   experts themselves, left out one at a time (select_temperature), because how
   sharply to prefer the closest entry depends on the population (a bank with a
   near-exact entry for a task wants it alone).
3. The semantic prior is the weighted mixture of the selected experts'
   parameters; the CVAE models the target's distribution around it, conditioned
   on c = [request embedding, weighted expert embedding, prior]. Trained
   leave-one-out: an expert is never in its own prior, exactly the situation of
   an unseen task.
ICM-LoRA ("In-Context Meta LoRA Generation"), choices made here:
1. The condition is the task embedding plus in-context examples: the k most
   related *other* expert tasks, each given as (request, its embedding, its
   parameters, its similarity), read by a learned example encoder and a learned
   attention (starting from the semantic softmax).
2. The CVAE decodes the target from the attention-weighted mixture of the
   examples' parameters and the pooled context, so what it learns is how to
   read related tasks, not a fixed rule.
3. Meta-training by episodes: a target expert and a randomly thinned set of its
   related experts as context, so the generator learns to read context of any
   size and mix rather than to memorise tasks.
Both: 20 % of experts (at least 2) are held out as validation targets; the
curve records train loss and validation error (1 − cosine to the real expert).

Two training spaces (train_generator):
- parameter space (any base model): the CVAE decodes PCA coefficients around the prior.
- function space (a base the hub can run, with probe texts; generation/functional.py):
  the CVAE's decoder is a LoRADecoder that corrects the prior's factors with a whole
  LoRA, trained so that the corrected adapter for expert i makes the base answer like
  expert i on the probes (the expert left out of its own prior, as above); validation
  error is 1 − agreement with held-out experts' predictions. Step 0 is the prior itself,
  so the kept state is never worse than parameter space's prior on validation.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .functional import (BatchedLoRA, FunctionProbe, LoRADecoder, StratifiedProbes, distillation_loss, join_factors,
                         split_factors, teacher_probabilities)
from .lora_layout import Layout

METHODS = ("sg-lora", "icm-lora")
# What each method does, in one line for people choosing one (the web form shows them).
METHOD_SUMMARIES = {
    "sg-lora": "SG-LoRA: mixes the expert adapters whose tasks read closest to yours, "
               "then a learned model refines that mixture.",
    "icm-lora": "ICM-LoRA: reads the closest experts as in-context examples and has learned "
                "how much to take from each of them.",
}
GENERATOR_FORMAT_VERSION = 1


# ----------------------------------------------------------------------
# Expert bank


# Directions the bank keeps. A population smaller than this is kept whole: an entry that fits a
# request is then served as it is (on the full zoo, 87 entries cut to 64 directions came back
# with 10–28 % error, and the best-fitting entries lost 0.008 of accuracy on average); a larger
# one is compressed to its principal directions (storage D × 128 in float16, however many experts).
MAX_COMPONENTS = 128


class ExpertBank(nn.Module):
    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, coeffs: torch.Tensor, task_embeddings: torch.Tensor,
                 parents: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("mean", mean)  # (D,)
        self.register_buffer("basis", basis)  # (D, P), orthonormal columns
        self.register_buffer("coeffs", coeffs)  # (n, P)
        self.register_buffer("task_embeddings", task_embeddings)  # (n, E), unit rows
        # (n, 2): the two experts a derived entry (a conjunction) was made from; −1 for real experts.
        self.register_buffer("parents", no_parents(len(coeffs)) if parents is None else parents.long())
        self.scale = float(coeffs.std().clamp(min=1e-8)) if coeffs.numel() else 1.0

    @classmethod
    def fit(cls, params: torch.Tensor, text_embeddings: list[torch.Tensor], max_components: int = MAX_COMPONENTS,
            parents: torch.Tensor | None = None) -> "ExpertBank":
        """parents: (n, 2) as the buffer, for banks whose last entries are derived from others."""
        params = params.float()
        mean = params.mean(0)
        _, singular, vh = torch.linalg.svd(params - mean, full_matrices=False)
        keep = int(min(max_components, (singular > singular[0] * 1e-6).sum()))
        basis = vh[:keep].T.contiguous()
        tasks = torch.stack([nn.functional.normalize(e.float().mean(0), dim=0) for e in text_embeddings])
        return cls(mean, basis, (params - mean) @ basis, tasks, parents)

    @property
    def size(self) -> int:
        return int(self.coeffs.shape[0])

    def to_params(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Flat parameters of P coefficients (or a batch of them, B × P → B × D)."""
        return self.mean + coeffs @ self.basis.T

    def neighbours(self, queries: torch.Tensor, k: int, temperature: float, exclude: torch.Tensor | None = None):
        """For each query row: the k most similar expert tasks (B × k indices), their
        softmax(sim/τ) weights and their similarities. `exclude`: one expert per row to leave
        out, with every entry derived from it (a conjunction carries what its parent knows)."""
        similarity = queries @ self.task_embeddings.T
        if exclude is not None:
            entries = torch.arange(self.size)
            hidden = (entries[None] == exclude[:, None]) | (self.parents[None] == exclude[:, None, None]).any(-1)
            similarity = similarity.masked_fill(hidden, -math.inf)
            k = min(k, int((~hidden).sum(1).min()))
        top, index = similarity.topk(min(k, self.size), dim=1)
        return index, torch.softmax(top / temperature, dim=1), top


def no_parents(n: int) -> torch.Tensor:
    return torch.full((n, 2), -1, dtype=torch.long)


# ----------------------------------------------------------------------
# CVAE


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class CVAE(nn.Module):
    """q(z | x, c) and a decoder p(· | z, c). The decoder is an MLP to the target's
    PCA coefficients (parameter space), or a functional.LoRADecoder that emits a
    whole LoRA (function space)."""

    def __init__(self, x_dim: int, c_dim: int, z_dim: int = 8, hidden: int = 256, decoder: nn.Module | None = None):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = _mlp([x_dim + c_dim, hidden, hidden, 2 * z_dim])
        if decoder is None:
            decoder = _mlp([z_dim + c_dim, hidden, hidden, x_dim])
            # Zero output at first: an untrained generator returns its prior exactly.
            nn.init.zeros_(decoder[-1].weight)
            nn.init.zeros_(decoder[-1].bias)
        self.decoder = decoder

    def sample(self, x: torch.Tensor, c: torch.Tensor, *start):
        """The decoder's output for a latent drawn from q(z | x, c), and KL(q ‖ N(0, I)).
        `start`: what a LoRADecoder corrects (the prior's factors)."""
        mu, logvar = self.encoder(torch.cat([x, c], -1)).chunk(2, -1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean()
        return self.decoder(torch.cat([z, c], -1), *start), kl

    def loss(self, x: torch.Tensor, c: torch.Tensor, beta: float) -> torch.Tensor:
        reconstruction, kl = self.sample(x, c)
        return (reconstruction - x).pow(2).sum(-1).mean() + beta * kl

    def decode_mean(self, c: torch.Tensor, *start):
        return self.decoder(torch.cat([c.new_zeros(*c.shape[:-1], self.z_dim), c], -1), *start)


PAPER_TEMPERATURE = 0.1  # SG-LoRA's softmax temperature over the top-k experts
# What select_temperature chooses among, from the paper's side down to "the nearest entry alone".
TEMPERATURE_CANDIDATES = (0.2, 0.1, 0.05, 0.03, 0.02, 0.01)


@dataclass
class GeneratorSettings:
    k: int = 5
    # None: chosen by function when the base model can be run (select_temperature), else the paper's.
    temperature: float | None = None
    steps: int | None = None  # None: 1500 in parameter space, 600 in function space
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    beta: float = 0.01
    z_dim: int = 8
    hidden: int = 256
    validation_fraction: float = 0.2
    seed: int = 0
    # Function space only: experts per step, probe texts per expert, probes per validation expert.
    tasks_per_step: int = 8
    probes_per_task: int = 8
    validation_probes: int = 64

    def resolved(self, functional: bool) -> "GeneratorSettings":
        return replace(self, steps=(600 if functional else 1500) if self.steps is None else self.steps,
                       temperature=PAPER_TEMPERATURE if self.temperature is None else self.temperature)


# ----------------------------------------------------------------------
# The two generators


def validation_rows_of(experts: torch.Tensor, settings: GeneratorSettings) -> torch.Tensor:
    """Which training examples (by their expert index) are validation: every example of a seeded
    random 20 % of the experts (at least 2)."""
    distinct = experts.unique()
    count = max(2, int(len(distinct) * settings.validation_fraction))
    held = distinct[torch.randperm(len(distinct), generator=torch.Generator().manual_seed(settings.seed))[:count]]
    return torch.isin(experts, held)


class Generator(nn.Module):
    """Common training loop, generation and (de)serialisation."""

    method: str
    temperature_selection: list[dict] | None = None  # select_temperature's table, when it chose τ

    def __init__(self, bank: ExpertBank, settings: GeneratorSettings, c_dim: int, layout: Layout | None = None):
        """layout: correct the prior with whole-LoRA outputs trained in function space
        (generation/functional.py); without it, the CVAE works in parameter space."""
        super().__init__()
        self.bank = bank
        self.settings = settings.resolved(functional=layout is not None)
        decoder = LoRADecoder(layout, settings.z_dim + c_dim, settings.hidden) if layout is not None else None
        self.cvae = CVAE(bank.basis.shape[1], c_dim, settings.z_dim, settings.hidden, decoder)

    @property
    def functional(self) -> bool:
        return isinstance(self.cvae.decoder, LoRADecoder)

    # Subclasses define, for a batch of queries (B × E) and the expert each must not see
    # (B,) or None: condition(...) -> (c: B × C, prior: B × P, index: B × k, weights: B × k).
    def condition(self, queries, exclude=None, *, k=None, training=False):
        raise NotImplementedError

    def target(self, experts: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """What the CVAE models: the expert's offset from its prior, in units of the bank's scale."""
        return (self.bank.coeffs[experts] - prior) / self.bank.scale

    def coefficients(self, queries: torch.Tensor, exclude: torch.Tensor | None = None, k: int | None = None):
        c, prior, index, weights = self.condition(queries, exclude, k=k)
        coeffs = prior + self.bank.scale * self.cvae.decode_mean(c)
        # The decoded mean is a conditional expectation, shrunk like any average: give it the
        # prior's norm (the experts' typical strength) and keep only its direction.
        return coeffs * (prior.norm(dim=-1) / coeffs.norm(dim=-1).clamp(min=1e-12))[:, None], index, weights

    @torch.no_grad()
    def generate(self, query: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, list[tuple[int, float]]]:
        """Flat parameter vector for one task embedding, and the experts used [(index, weight)].
        k overrides how many experts condition the generation."""
        self.eval()
        if self.functional:
            c, prior, index, weights = self.condition(query.float()[None], k=k)
            vector = join_factors(self.cvae.decode_mean(c, self.prior_factors(prior)))[0]
        else:
            coeffs, index, weights = self.coefficients(query.float()[None], k=k)
            vector = self.bank.to_params(coeffs[0])
        return vector, list(zip(index[0].tolist(), weights[0].tolist()))

    def fit(self, examples: list[tuple[int, torch.Tensor]], progress=None, *, runner: BatchedLoRA | None = None,
            teacher: torch.Tensor | None = None) -> list[dict]:
        """examples: (expert index, one embedding of its description or a paraphrase); in function
        space also the runner of the base model and the experts' teacher probabilities on its
        probes. Returns the training curve; keeps the state with the best validation error."""
        settings = self.settings
        torch.manual_seed(settings.seed)
        experts = torch.tensor([j for j, _ in examples])
        queries = torch.stack([q for _, q in examples])
        is_held = validation_rows_of(experts, settings)
        train_rows, validation_rows = (~is_held).nonzero().flatten(), is_held.nonzero().flatten()
        if self.functional:
            step_loss, validation = self._function_space(queries, experts, train_rows, validation_rows, runner, teacher)
        else:
            step_loss, validation = self._parameter_space(queries, experts, train_rows, validation_rows)
        optimizer = torch.optim.AdamW(self.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
        best = validation()
        curve = [{"step": 0, "train_loss": None, "validation_error": round(best, 8)}]
        best_state = self._trainable_state()
        every = 50 if not self.functional else 100  # a function-space validation runs the base model
        for step in range(settings.steps):
            self.train()
            loss = step_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % every == every - 1 or step == settings.steps - 1:
                val = validation()
                curve.append({"step": step + 1, "train_loss": round(loss.item(), 6), "validation_error": round(val, 8)})
                if val < best:
                    best, best_state = val, self._trainable_state()
                if progress:
                    progress((step + 1) / settings.steps, curve[-1])
        self.load_state_dict(best_state, strict=False)
        return curve

    def prior_factors(self, prior: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prior's PCA coefficients (B × P) as LoRA factors, per slot: what the decoder corrects."""
        return split_factors(self.bank.to_params(prior), self.cvae.decoder.layout)

    def _parameter_space(self, queries, experts, train_rows, validation_rows):
        """The CVAE models each expert's PCA coefficients around its prior."""
        generator = torch.Generator().manual_seed(self.settings.seed)

        def step_loss():
            rows = train_rows[torch.randint(len(train_rows), (self.settings.batch_size,), generator=generator)]
            c, prior, _, _ = self.condition(queries[rows], experts[rows], training=True)
            return self.cvae.loss(self.target(experts[rows], prior), c, self.settings.beta)

        return step_loss, lambda: self.validation_error(queries[validation_rows], experts[validation_rows])

    def _function_space(self, queries, experts, train_rows, validation_rows, runner, teacher):
        """The decoded LoRA must make the base model answer like the expert on probe texts
        (distillation: cross-entropy to the expert's probabilities), plus β·KL of the latent.
        Validation: how often a held-out expert's generated adapter predicts the class the
        expert predicts, on probes drawn class by class (1 − that agreement)."""
        settings, texts = self.settings, runner.probe.texts
        rng = random.Random(settings.seed)
        probes = StratifiedProbes(teacher, settings.seed)
        rows_of: dict[int, list[int]] = {}
        for row in train_rows.tolist():
            rows_of.setdefault(int(experts[row]), []).append(row)
        trained_experts = sorted(rows_of)
        first_row = {}
        for row in validation_rows.tolist():  # each validation expert by its description (its first text)
            first_row.setdefault(int(experts[row]), row)
        held_rows = torch.tensor(list(first_row.values()))
        held_probes = [probes.draw(int(experts[row]), settings.validation_probes) for row in held_rows.tolist()]

        def step_loss():
            chosen = rng.sample(trained_experts, min(settings.tasks_per_step, len(trained_experts)))
            rows = torch.tensor([rng.choice(rows_of[j]) for j in chosen])
            c, prior, _, _ = self.condition(queries[rows], experts[rows], training=True)
            factors, kl = self.cvae.sample(self.bank.coeffs[experts[rows]] / self.bank.scale, c,
                                           self.prior_factors(prior))
            drawn = [(i, probe) for i, j in enumerate(chosen) for probe in probes.draw(j, settings.probes_per_task)]
            owner = torch.tensor([i for i, _ in drawn])
            logits = runner.logits([texts[probe] for _, probe in drawn], [(A[owner], B[owner]) for A, B in factors])
            targets = teacher[torch.tensor(chosen)[owner], torch.tensor([probe for _, probe in drawn])]
            return distillation_loss(logits, targets) + settings.beta * kl

        @torch.no_grad()
        def validation() -> float:
            self.eval()
            c, prior, _, _ = self.condition(queries[held_rows], experts[held_rows])
            factors = self.cvae.decode_mean(c, self.prior_factors(prior))
            agree = total = 0
            for i, row in enumerate(held_rows.tolist()):
                chosen = held_probes[i]
                logits = runner.logits([texts[p] for p in chosen], [(A[i : i + 1], B[i : i + 1]) for A, B in factors])
                agree += int((logits.argmax(-1) == teacher[int(experts[row]), chosen].argmax(-1)).sum())
                total += len(chosen)
            return 1.0 - agree / max(total, 1)

        return step_loss, validation

    def _trainable_state(self) -> dict:
        """A copy of the learned tensors only: the expert bank (megabytes) never changes in training."""
        return {name: p.detach().clone() for name, p in self.named_parameters()}

    @torch.no_grad()
    def validation_error(self, queries: torch.Tensor, experts: torch.Tensor) -> float:
        """1 − mean cosine between generated and real experts (about the population mean), each expert
        never in its own context. Direction, not distance: outputs keep their prior's norm, and a
        closer but shrunk vector is a weaker adapter."""
        self.eval()
        coeffs, _, _ = self.coefficients(queries, exclude=experts)
        return 1.0 - float(nn.functional.cosine_similarity(coeffs, self.bank.coeffs[experts], dim=-1).mean())

    # ---------------------------------------------------------------- files
    def save(self, handle, extra: dict | None = None) -> None:
        """safetensors bytes: every tensor, with the settings in the metadata."""
        from safetensors.torch import save

        metadata = {"method": self.method, "format_version": str(GENERATOR_FORMAT_VERSION),
                    "settings": json.dumps(asdict(self.settings)), "extra": json.dumps(extra or {})}
        if self.functional:
            metadata["decoder_layout"] = json.dumps(self.cvae.decoder.layout.as_json())
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        tensors["bank.basis"] = tensors["bank.basis"].to(torch.float16)  # half the storage; error ≪ LoRA noise
        handle.write(save(tensors, metadata=metadata))


def load_generator(data: bytes) -> tuple["Generator", dict]:
    """The generator `save` wrote, and the extra metadata stored with it."""
    from safetensors.torch import load

    tensors = load(data)
    header_size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_size])["__metadata__"]
    settings = GeneratorSettings(**json.loads(metadata["settings"]))
    tensors.setdefault("bank.parents", no_parents(len(tensors["bank.coeffs"])))  # stored before derived entries
    bank = ExpertBank(tensors["bank.mean"], tensors["bank.basis"].float(), tensors["bank.coeffs"],
                      tensors["bank.task_embeddings"], tensors["bank.parents"])
    layout = Layout.from_json(json.loads(metadata["decoder_layout"])) if "decoder_layout" in metadata else None
    generator = GENERATORS[metadata["method"]](bank, settings, layout=layout)
    generator.load_state_dict({k: v if k == "bank.parents" else v.float() for k, v in tensors.items()})
    generator.eval()
    return generator, json.loads(metadata["extra"])


def norm_preserving_mix(weights: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Σ wₖ·cₖ rescaled to Σ wₖ·‖cₖ‖ (B × k weights, B × k × P coefficients about the population mean).
    A plain weighted mean of nearly orthogonal experts shrinks towards the mean adapter and loses
    most of its effect (measured on the zoo: below the base model); keeping the experts' typical
    norm keeps the mixture as decisive as they are."""
    mixed = torch.einsum("bk,bkp->bp", weights, coeffs)
    norm = torch.einsum("bk,bk->b", weights, coeffs.norm(dim=-1))
    return mixed * (norm / mixed.norm(dim=-1).clamp(min=1e-12))[:, None]


class SGLoRA(Generator):
    method = "sg-lora"

    def __init__(self, bank: ExpertBank, settings: GeneratorSettings, layout: Layout | None = None):
        embedding_dim = bank.task_embeddings.shape[1]
        # In function space the condition is the paper's: the request and the semantic prior
        # (the experts' weighted task embedding). Their mixed *parameters* are left out there:
        # mostly expert-specific noise, they only let the decoder memorise its experts.
        c_dim = 2 * embedding_dim + (0 if layout is not None else bank.basis.shape[1])
        super().__init__(bank, settings, c_dim, layout)

    def condition(self, queries, exclude=None, *, k=None, training=False):
        index, weights, _ = self.bank.neighbours(queries, k or self.settings.k, self.settings.temperature, exclude)
        prior = norm_preserving_mix(weights, self.bank.coeffs[index])
        semantic = nn.functional.normalize(torch.einsum("bk,bke->be", weights, self.bank.task_embeddings[index]), dim=-1)
        parts = [queries, semantic] + ([] if self.functional else [prior / self.bank.scale])
        return torch.cat(parts, -1), prior, index, weights


class ICMLoRA(Generator):
    method = "icm-lora"
    context_dim = 128

    def __init__(self, bank: ExpertBank, settings: GeneratorSettings, layout: Layout | None = None):
        embedding_dim, components = bank.task_embeddings.shape[1], bank.basis.shape[1]
        super().__init__(bank, settings, embedding_dim + self.context_dim, layout)
        example_dim = 2 * embedding_dim + components + 1
        # Reads one in-context example: (the request, its task embedding, its parameters, its similarity).
        self.example_encoder = _mlp([example_dim, settings.hidden, self.context_dim])
        # Learned correction of the attention over examples; zero at first, so training
        # starts from the semantic softmax and keeps a change only if validation improves.
        self.attention = _mlp([example_dim, 64, 1])
        nn.init.zeros_(self.attention[-1].weight)
        nn.init.zeros_(self.attention[-1].bias)

    def condition(self, queries, exclude=None, *, k=None, training=False):
        index, _, similarity = self.bank.neighbours(queries, k or self.settings.k, self.settings.temperature, exclude)
        embeddings, coeffs = self.bank.task_embeddings[index], self.bank.coeffs[index]
        examples = torch.cat([queries[:, None].expand_as(embeddings), embeddings, coeffs / self.bank.scale,
                              similarity[..., None]], -1)
        scores = similarity / self.settings.temperature + self.attention(examples).squeeze(-1)
        if training and index.shape[1] > 1:  # meta-training: context sets of varying size and make-up
            keep = torch.rand(index.shape) < 0.75
            keep[torch.arange(len(keep)), torch.randint(index.shape[1], (len(keep),))] = True
            scores = scores.masked_fill(~keep, -math.inf)
        attention = torch.softmax(scores, -1)
        pooled = torch.einsum("bk,bkc->bc", attention, self.example_encoder(examples))
        prior = norm_preserving_mix(attention, coeffs)
        return torch.cat([queries, pooled], -1), prior, index, attention


GENERATORS: dict[str, type[Generator]] = {"sg-lora": SGLoRA, "icm-lora": ICMLoRA}


def train_generator(method: str, params: torch.Tensor, text_embeddings: list[torch.Tensor],
                    settings: GeneratorSettings | None = None, progress=None, *,
                    probe: FunctionProbe | None = None, layout: Layout | None = None,
                    teacher: torch.Tensor | None = None, space: str | None = None,
                    parents: torch.Tensor | None = None) -> tuple[Generator, list[dict]]:
    """Fit a generator on n bank entries: params (n × D) in one layout, and each entry's
    description + paraphrase embeddings (m_i × E). `parents` (n × 2, −1 for a real expert)
    marks entries derived from two others (generation/conjunctions.py), which leave-one-out
    hides with their parents. With a probe (the runnable base model and unlabelled inputs)
    and the layout, the prior's temperature is chosen by function (select_temperature,
    unless settings fix it) and, with space="function" (the default when a probe is given),
    the generator is trained in function space; `teacher` (the entries' probabilities on the
    probes) may be passed in when several generators share it or it was cached
    (hub.services.generations.expert_teachers). Returns the generator and its training curve."""
    settings = settings or GeneratorSettings()
    space = space or ("function" if probe is not None else "parameter")
    bank = ExpertBank.fit(params, text_embeddings, parents=parents)
    examples = [(j, e.float()) for j, embeddings in enumerate(text_embeddings) for e in embeddings]
    runner = BatchedLoRA(probe, layout) if probe is not None else None
    if runner is not None and teacher is None:
        teacher = teacher_probabilities(runner, params)
    selection = None
    if settings.temperature is None and runner is not None:
        experts = int((bank.parents < 0).all(-1).sum())  # real experts come first
        descriptions = torch.stack([e[0].float() for e in text_embeddings[:experts]])
        chosen, selection = select_temperature(bank, runner, teacher, descriptions, settings.k, seed=settings.seed)
        settings = replace(settings, temperature=chosen)
    # The same inputs and settings train the same generator: its initial weights come from the
    # seed, not from whatever the process drew before (the caller's random state is left as it was).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        generator = GENERATORS[method](bank, settings, layout=layout if space == "function" else None)
        generator.temperature_selection = selection
        return generator, generator.fit(examples, progress=progress, runner=runner if space == "function" else None,
                                        teacher=teacher)


@torch.no_grad()
def select_temperature(bank: ExpertBank, runner: BatchedLoRA, teacher: torch.Tensor, descriptions: torch.Tensor,
                       k: int, *, candidates: tuple[float, ...] = TEMPERATURE_CANDIDATES, probes_per_expert: int = 32,
                       seed: int = 0, experts_per_batch: int = 8) -> tuple[float, list[dict]]:
    """The semantic prior's softmax temperature τ, chosen by what the prior does: each real
    expert j (descriptions: one embedding per real expert, the bank's first entries) is left
    out of the bank with every entry derived from it, exactly an unseen task; its prior at
    each τ runs on probe texts drawn class by class of the expert's own predictions, and the
    τ whose priors agree with their experts most often wins (ties: the larger τ).

    Why choose it: the paper's τ = 0.1 mixes the top-k entries, which is right when no entry
    fits and wrong when one fits nearly exactly (a derived conjunction "job title? Polish?" for
    the request "a job title written in Polish": alone it recovers 0.92 of the oracle's gain on
    the zoo, mixed at τ = 0.1 with four experts of the right category and the wrong language
    0.83). Which case a population is in shows in its own experts, judged by function: in
    parameter space independently trained adapters are nearly orthogonal, so a distance there
    cannot tell a good prior from a bad one. Returns τ and [{temperature, agreement}]."""
    count = len(descriptions)
    left_out = torch.arange(count)
    draws = StratifiedProbes(teacher[:count], seed)
    probes = [draws.draw(j, probes_per_expert) for j in range(count)]
    texts = runner.probe.texts
    table = []
    for temperature in candidates:
        index, weights, _ = bank.neighbours(descriptions, k, temperature, left_out)
        prior = bank.to_params(norm_preserving_mix(weights, bank.coeffs[index]))
        agree = 0
        for start in range(0, count, experts_per_batch):
            drawn = [(j, p) for j in range(start, min(start + experts_per_batch, count)) for p in probes[j]]
            owner, rows = torch.tensor([j for j, _ in drawn]), torch.tensor([p for _, p in drawn])
            factors = [(A[owner - start], B[owner - start])
                       for A, B in split_factors(prior[start : start + experts_per_batch], runner.layout)]
            predicted = runner.logits([texts[p] for p in rows.tolist()], factors).argmax(-1)
            agree += int((predicted == teacher[owner, rows].argmax(-1)).sum())
        table.append({"temperature": temperature, "agreement": round(agree / (count * probes_per_expert), 6)})
    return max(table, key=lambda row: row["agreement"])["temperature"], table
