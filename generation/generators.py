"""LoRA generators learned from a base model's expert adapters: SG-LoRA and
ICM-LoRA. Pure torch; the hub supplies flat parameter vectors (lora_layout)
and text embeddings (text_encoder) and stores what `save` writes.

Shared pieces
- ExpertBank: the experts' parameter vectors in a PCA basis of their span
  (mean + ≤ 64 orthonormal directions: a generated adapter is a point of that
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
   expert task, top-k (default 5), weights softmax(sim / τ) with τ = 0.1.
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
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

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


class ExpertBank(nn.Module):
    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, coeffs: torch.Tensor, task_embeddings: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)  # (D,)
        self.register_buffer("basis", basis)  # (D, P), orthonormal columns
        self.register_buffer("coeffs", coeffs)  # (n, P)
        self.register_buffer("task_embeddings", task_embeddings)  # (n, E), unit rows
        self.scale = float(coeffs.std().clamp(min=1e-8)) if coeffs.numel() else 1.0

    @classmethod
    def fit(cls, params: torch.Tensor, text_embeddings: list[torch.Tensor], max_components: int = 64) -> "ExpertBank":
        params = params.float()
        mean = params.mean(0)
        _, singular, vh = torch.linalg.svd(params - mean, full_matrices=False)
        keep = int(min(max_components, (singular > singular[0] * 1e-6).sum()))
        basis = vh[:keep].T.contiguous()
        tasks = torch.stack([nn.functional.normalize(e.float().mean(0), dim=0) for e in text_embeddings])
        return cls(mean, basis, (params - mean) @ basis, tasks)

    @property
    def size(self) -> int:
        return int(self.coeffs.shape[0])

    def to_params(self, coeffs: torch.Tensor) -> torch.Tensor:
        return self.mean + self.basis @ coeffs

    def neighbours(self, queries: torch.Tensor, k: int, temperature: float, exclude: torch.Tensor | None = None):
        """For each query row: the k most similar expert tasks (B × k indices), their
        softmax(sim/τ) weights and their similarities. `exclude`: one expert per row to leave out."""
        similarity = queries @ self.task_embeddings.T
        if exclude is not None:
            similarity = similarity.scatter(1, exclude[:, None], -math.inf)
        k = min(k, self.size - (exclude is not None))
        top, index = similarity.topk(k, dim=1)
        return index, torch.softmax(top / temperature, dim=1), top


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
    def __init__(self, x_dim: int, c_dim: int, z_dim: int = 8, hidden: int = 256):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = _mlp([x_dim + c_dim, hidden, hidden, 2 * z_dim])
        self.decoder = _mlp([z_dim + c_dim, hidden, hidden, x_dim])
        # Zero output at first: an untrained generator returns its prior exactly.
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)

    def loss(self, x: torch.Tensor, c: torch.Tensor, beta: float) -> torch.Tensor:
        mu, logvar = self.encoder(torch.cat([x, c], -1)).chunk(2, -1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        reconstruction = (self.decoder(torch.cat([z, c], -1)) - x).pow(2).sum(-1).mean()
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean()
        return reconstruction + beta * kl

    def decode_mean(self, c: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([c.new_zeros(*c.shape[:-1], self.z_dim), c], -1))


@dataclass
class GeneratorSettings:
    k: int = 5
    temperature: float = 0.1
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    beta: float = 0.01
    z_dim: int = 8
    hidden: int = 256
    validation_fraction: float = 0.2
    seed: int = 0


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

    def __init__(self, bank: ExpertBank, settings: GeneratorSettings, c_dim: int):
        super().__init__()
        self.bank = bank
        self.settings = settings
        self.cvae = CVAE(bank.basis.shape[1], c_dim, settings.z_dim, settings.hidden)

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
        coeffs, index, weights = self.coefficients(query.float()[None], k=k)
        return self.bank.to_params(coeffs[0]), list(zip(index[0].tolist(), weights[0].tolist()))

    def fit(self, examples: list[tuple[int, torch.Tensor]], progress=None) -> list[dict]:
        """examples: (expert index, one embedding of its description or a paraphrase).
        Returns the training curve; keeps the state with the best validation error."""
        settings = self.settings
        generator = torch.Generator().manual_seed(settings.seed)
        torch.manual_seed(settings.seed)
        experts = torch.tensor([j for j, _ in examples])
        queries = torch.stack([q for _, q in examples])
        is_held = validation_rows_of(experts, settings)
        train_rows, validation_rows = (~is_held).nonzero().flatten(), is_held.nonzero().flatten()
        optimizer = torch.optim.AdamW(self.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
        best = self.validation_error(queries[validation_rows], experts[validation_rows])
        curve = [{"step": 0, "train_loss": None, "validation_error": round(best, 8)}]
        best_state = self._trainable_state()
        for step in range(settings.steps):
            self.train()
            rows = train_rows[torch.randint(len(train_rows), (settings.batch_size,), generator=generator)]
            c, prior, _, _ = self.condition(queries[rows], experts[rows], training=True)
            loss = self.cvae.loss(self.target(experts[rows], prior), c, settings.beta)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 50 == 49 or step == settings.steps - 1:
                val = self.validation_error(queries[validation_rows], experts[validation_rows])
                curve.append({"step": step + 1, "train_loss": round(loss.item(), 6), "validation_error": round(val, 8)})
                if val < best:
                    best, best_state = val, self._trainable_state()
                if progress:
                    progress((step + 1) / settings.steps, curve[-1])
        self.load_state_dict(best_state, strict=False)
        return curve

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
    bank = ExpertBank(tensors["bank.mean"], tensors["bank.basis"].float(), tensors["bank.coeffs"],
                      tensors["bank.task_embeddings"])
    generator = GENERATORS[metadata["method"]](bank, settings)
    generator.load_state_dict({k: v.float() for k, v in tensors.items()})
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

    def __init__(self, bank: ExpertBank, settings: GeneratorSettings):
        embedding_dim = bank.task_embeddings.shape[1]
        super().__init__(bank, settings, c_dim=2 * embedding_dim + bank.basis.shape[1])

    def condition(self, queries, exclude=None, *, k=None, training=False):
        index, weights, _ = self.bank.neighbours(queries, k or self.settings.k, self.settings.temperature, exclude)
        prior = norm_preserving_mix(weights, self.bank.coeffs[index])
        semantic = nn.functional.normalize(torch.einsum("bk,bke->be", weights, self.bank.task_embeddings[index]), dim=-1)
        return torch.cat([queries, semantic, prior / self.bank.scale], -1), prior, index, weights


class ICMLoRA(Generator):
    method = "icm-lora"
    context_dim = 128

    def __init__(self, bank: ExpertBank, settings: GeneratorSettings):
        embedding_dim, components = bank.task_embeddings.shape[1], bank.basis.shape[1]
        super().__init__(bank, settings, c_dim=embedding_dim + self.context_dim)
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
                    settings: GeneratorSettings | None = None, progress=None) -> tuple[Generator, list[dict]]:
    """Fit a generator on n experts: params (n × D) in one layout, and each expert's
    description + paraphrase embeddings (m_i × E). Returns it and its training curve."""
    settings = settings or GeneratorSettings()
    bank = ExpertBank.fit(params, text_embeddings)
    generator = GENERATORS[method](bank, settings)
    examples = [(j, e.float()) for j, embeddings in enumerate(text_embeddings) for e in embeddings]
    curve = generator.fit(examples, progress=progress)
    return generator, curve
