"""kernels.compose on real PEFT adapters (hub.demo builders, tiny fixed-seed Llama).

The ground truth is dense and computed here: each adapter's ΔWᵢ comes from PEFT
itself (merge_and_unload minus the base weight, which also covers DoRA and
rsLoRA / rank_pattern scaling), the weighted sum Σ wᵢΔWᵢ is formed densely, and
every method's own rule is re-implemented on those dense tensors. PEFT's
add_weighted_adapter is the peer for svd, cat, peft_linear and the dense rules.

No database: `pytest tests/test_compose_math.py -p no:django` works too.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hub.demo.builders import LLAMA_LINEAR, build_peft_adapter, build_tiny_llama  # noqa: E402
from hub.formats import LoraModule, parse_adapter, write_peft_adapter  # noqa: E402
from kernels.compose import (  # noqa: E402
    METHODS,
    ModuleUpdate,
    compose_adapters,
    compose_module,
    dense_rule,
    module_seed,
)

pytestmark = []

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
SPECS = {
    "plain_a": dict(r=8, lora_alpha=16, target_modules=LLAMA_LINEAR, seed=11),
    "plain_b": dict(r=8, lora_alpha=8, target_modules=LLAMA_LINEAR, seed=12),
    "rslora": dict(r=16, lora_alpha=16, use_rslora=True, target_modules=ATTENTION, seed=13),
    "pattern": dict(r=8, lora_alpha=16, target_modules=LLAMA_LINEAR, rank_pattern={"k_proj": 2, "v_proj": 2},
                    alpha_pattern={"v_proj": 4}, seed=14),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"], seed=15),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every tensor here is small: one thread avoids OpenMP barrier stalls on a shared box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load_base(base_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """Base weights, parsed adapters, and each adapter's ΔW as PEFT merges it."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp("compose")
    base_dir = build_tiny_llama(root / "base")
    base = load_file(str(base_dir / "model.safetensors"))
    dirs, adapters, truth = {}, {}, {}
    for name, kwargs in SPECS.items():
        dirs[name] = build_peft_adapter(base_dir, root / name, train_steps=3, **kwargs)
        adapters[name] = parse_adapter({p.name: p for p in dirs[name].iterdir()})
        merged = PeftModel.from_pretrained(_load_base(base_dir), dirs[name]).merge_and_unload().state_dict()
        truth[name] = {path: merged[path + ".weight"] - base[path + ".weight"] for path in adapters[name].modules}
    return {"base_dir": base_dir, "base": base, "dirs": dirs, "adapters": adapters, "truth": truth,
            "base_weights": lambda path: base[path + ".weight"]}


def weighted_truth(tiny, names, weights):
    """path → list of (weight, dense ΔWᵢ) over the adapters that have it."""
    paths = sorted({p for n in names for p in tiny["truth"][n]})
    return {p: [(w, tiny["truth"][n][p]) for n, w in zip(names, weights) if p in tiny["truth"][n]] for p in paths}


def dense_sum(terms):
    return sum(w * d for w, d in terms)


def composed_delta(module: LoraModule) -> torch.Tensor:
    return (module.B.double() @ module.A.double()).float() * module.scale


def assert_close_rel(actual, expected, rel=1e-5):
    scale = max(float(expected.norm()), 1e-12)
    assert float((actual - expected).norm()) / scale <= rel, float((actual - expected).norm()) / scale


def compose(tiny, names, weights, method, **kw):
    return compose_adapters([tiny["adapters"][n] for n in names], weights, method,
                            base_weights=tiny["base_weights"], **kw)


ALL = list(SPECS)
ALL_WEIGHTS = [0.7, -0.5, 1.2, 0.3, -0.8]


# ----------------------------------------------------------------------
# Exact methods


def test_ground_truth_matches_the_canonical_factors(tiny):
    for name, adapter in tiny["adapters"].items():
        for path, module in adapter.modules.items():
            if module.magnitude is None:
                assert_close_rel(module.delta_weight(), tiny["truth"][name][path], 1e-6)


@pytest.mark.parametrize("method", ["linear", "cat", "task_arithmetic"])
def test_stacked_methods_are_exact_with_dora_rslora_patterns_and_negative_weights(tiny, method):
    composed, report = compose(tiny, ALL, ALL_WEIGHTS, method)
    expected = weighted_truth(tiny, ALL, ALL_WEIGHTS)
    assert sorted(composed.modules) == sorted(expected)
    for path, terms in expected.items():
        module = composed.modules[path]
        assert module.scale == 1.0
        assert_close_rel(composed_delta(module), dense_sum(terms), 1e-5)
    # rank Σrᵢ; a DoRA update is full rank (min(out, in)), the rank_pattern adapter has r=2 on k_proj
    assert composed.modules["model.layers.0.self_attn.k_proj"].rank == 8 + 8 + 16 + 2
    assert composed.modules["model.layers.0.self_attn.q_proj"].rank == 8 + 8 + 16 + 8 + 64
    assert report["exact"] is True and report["max_error"] == 0.0
    assert composed.format == "peft" and composed.peft_type == "LORA" and not composed.use_dora
    json.dumps(report)


def test_dora_without_base_weights_is_refused(tiny):
    with pytest.raises(ValueError, match="base weight"):
        compose_adapters([tiny["adapters"]["plain_a"], tiny["adapters"]["dora"]], [1.0, 1.0], "linear")
    update = ModuleUpdate(*(lambda m: (m.A, m.B, m.scale, m.magnitude))(
        tiny["adapters"]["dora"].modules["model.layers.0.self_attn.q_proj"]))
    with pytest.raises(ValueError, match="base weight"):
        compose_module([update], [1.0], "svd")


def test_svd_is_exact_when_rank_covers_the_sum_and_the_best_truncation_otherwise(tiny):
    names, weights = ["plain_a", "rslora", "pattern", "dora"], [0.9, -0.6, 0.5, 1.1]
    expected = weighted_truth(tiny, names, weights)
    composed, report = compose(tiny, names, weights, "svd", rank=512)
    assert report["exact"] is True
    for path, terms in expected.items():
        assert_close_rel(composed_delta(composed.modules[path]), dense_sum(terms), 1e-5)
        assert report["modules"][path]["error"] == 0.0

    composed, report = compose(tiny, names, weights, "svd", rank=4)
    assert report["exact"] is False
    for path, terms in expected.items():
        total = dense_sum(terms).double()
        U, S, Vh = torch.linalg.svd(total)
        best = (U[:, :4] * S[:4]) @ Vh[:4]
        assert composed.modules[path].rank == 4
        assert_close_rel(composed_delta(composed.modules[path]).double(), best, 1e-4)
        dropped = math.sqrt(float((S[4:] ** 2).sum()) / float((S ** 2).sum()))
        assert report["modules"][path]["error"] == pytest.approx(dropped, rel=1e-4)


def test_svd_default_rank_is_the_largest_input_rank(tiny):
    composed, report = compose(tiny, ["plain_a", "rslora"], [1.0, 1.0], "svd")
    assert report["rank"] == 16
    assert composed.modules["model.layers.0.self_attn.q_proj"].rank == 16
    assert composed.modules["model.layers.0.mlp.up_proj"].rank == 8  # only plain_a has it: exact at its rank
    assert report["modules"]["model.layers.0.mlp.up_proj"]["error"] == 0.0


# ----------------------------------------------------------------------
# Iso-C


@pytest.mark.parametrize("iso_scale,rank", [(1.0, None), (1.5, 4)])
def test_iso_c_flattens_the_spectrum_of_the_sum(tiny, iso_scale, rank):
    names, weights = ["plain_a", "rslora", "pattern"], [1.0, -0.7, 0.6]
    params = {"iso_scale": iso_scale} if iso_scale != 1.0 else {}
    composed, report = compose(tiny, names, weights, "iso_c", rank=rank, **params)
    for path, terms in weighted_truth(tiny, names, weights).items():
        U, S, Vh = torch.linalg.svd(dense_sum(terms).double())
        k = int((S > 1e-6 * S[0]).sum())
        assert k == sum(tiny["adapters"][n].modules[path].rank for n in names if path in tiny["adapters"][n].modules)
        keep = k if rank is None else rank
        expected = iso_scale * S[:k].mean() * U[:, :keep] @ Vh[:keep]
        assert composed.modules[path].rank == keep
        assert_close_rel(composed_delta(composed.modules[path]).double(), expected, 1e-4)
        assert report["modules"][path]["error"] == pytest.approx(math.sqrt((k - keep) / k))
        if rank is None and iso_scale == 1.0:  # the mean keeps the nuclear norm of the sum
            assert float(torch.linalg.svdvals(composed_delta(composed.modules[path]).double())[:k].sum()) == \
                pytest.approx(float(S[:k].sum()), rel=1e-4)


def test_iso_c_does_not_raise_cancelled_directions_to_the_mean(tiny):
    """An adapter added and subtracted leaves only rounding noise in those directions; flattening
    must not lift that noise to the mean singular value."""
    composed, _ = compose(tiny, ["plain_a", "plain_a", "rslora"], [1.0, -1.0, 0.5], "iso_c")
    for path, module in composed.modules.items():
        if path in tiny["adapters"]["rslora"].modules:
            assert module.rank == 16
            U, S, Vh = torch.linalg.svd(0.5 * tiny["truth"]["rslora"][path].double())
            assert_close_rel(composed_delta(module).double(), S[:16].mean() * U[:, :16] @ Vh[:16], 1e-4)
        else:  # MLP: only plain_a, which cancels
            assert float(composed_delta(module).abs().max()) == 0.0


# ----------------------------------------------------------------------
# Dense rules (TIES, DARE, magnitude pruning), implemented here on dense tensors


def reference_rule(rule, terms, density, majority_sign, seed):
    """The rule from scratch: task tensor sign(w)·ΔW with weight |w|; magnitude
    pruning keeps the int(density·n) largest |x|; DARE masks are Bernoulli draws
    from torch.Generator().manual_seed(seed), one per present adapter in order."""
    generator = torch.Generator().manual_seed(seed)
    tasks, mags = [], []
    for w, delta in terms:
        task = delta if w >= 0 else -delta
        if rule in ("ties", "magnitude_prune"):
            k = int(density * task.numel())
            order = torch.argsort(task.abs().reshape(-1), descending=True)
            keep = torch.zeros(task.numel())
            keep[order[:k]] = 1
            task = task * keep.reshape(task.shape)
        else:
            mask = torch.bernoulli(torch.full_like(task, density), generator=generator)
            task = task * mask / density
        tasks.append(task)
        mags.append(abs(w))
    if rule in ("dare_linear", "magnitude_prune"):
        return sum(m * t for m, t in zip(mags, tasks))
    if majority_sign == "total":
        elected = torch.where(sum(tasks) >= 0, 1.0, -1.0)
    else:
        elected = torch.where(sum(t.sign() for t in tasks) >= 0, 1.0, -1.0)
    agree = [(t.sign() == elected).float() for t in tasks]
    return sum(m * t * a for m, t, a in zip(mags, tasks, agree)) / torch.clamp(sum(agree), min=1.0)


@pytest.mark.parametrize("rule,majority_sign", [
    ("ties", "total"), ("ties", "frequency"), ("dare_linear", "total"), ("dare_ties", "total"),
    ("dare_ties", "frequency"), ("magnitude_prune", "total"),
])
def test_dense_rules_match_a_dense_reference(tiny, rule, majority_sign):
    density, seed = 0.4, 1234
    composed, report = compose(tiny, ALL, ALL_WEIGHTS, rule, density=density, majority_sign=majority_sign, seed=seed)
    assert report["seed"] == seed and report["exact"] is False
    for path, terms in weighted_truth(tiny, ALL, ALL_WEIGHTS).items():
        expected = reference_rule(rule, terms, density, majority_sign, module_seed(seed, path))
        module = composed.modules[path]
        assert module.rank == min(expected.shape)  # exact full-rank factorisation
        assert_close_rel(composed_delta(module), expected, 1e-5)


@pytest.mark.parametrize("rule", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_dense_rules_equal_peft_merge_utils_for_positive_weights(tiny, rule):
    from peft.utils import merge_utils

    path = "model.layers.1.mlp.down_proj"
    deltas = [tiny["truth"][n][path] for n in ("plain_a", "plain_b", "pattern")]
    weights = [0.7, 0.4, 1.1]
    kwargs = {"majority_sign_method": "frequency"} if "ties" in rule else {}
    torch.manual_seed(99)  # PEFT's DARE draws from the global generator
    theirs = getattr(merge_utils, rule)(deltas, torch.tensor(weights), 0.3, **kwargs)
    ours = dense_rule(rule, deltas, weights, density=0.3, majority_sign="frequency",
                      generator=torch.Generator().manual_seed(99))
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize("method", ["ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"])
def test_svd_variants_truncate_the_dense_result_near_optimally_and_report_the_error(tiny, method):
    names, weights, density, seed, rank = ["plain_a", "pattern", "dora"], [1.0, -0.6, 0.8], 0.5, 7, 8
    composed, report = compose(tiny, names, weights, method, rank=rank, density=density, seed=seed)
    for path, terms in weighted_truth(tiny, names, weights).items():
        dense = reference_rule(method.removesuffix("_svd"), terms, density, "total", module_seed(seed, path))
        module = composed.modules[path]
        assert module.rank == rank
        ours = composed_delta(module)
        actual = float((dense - ours).norm() / dense.norm())
        S = torch.linalg.svdvals(dense.double())
        optimal = math.sqrt(float((S[rank:] ** 2).sum() / (S ** 2).sum()))
        assert report["modules"][path]["error"] == pytest.approx(actual, rel=1e-3)
        assert optimal - 1e-6 <= actual <= optimal * 1.02 + 1e-6


def test_dare_repeats_with_its_seed_and_keeps_density_rescaled(tiny):
    names, density = ["plain_a"], 0.3
    first, report = compose(tiny, names, [1.0], "dare_linear", density=density, seed=5)
    again, _ = compose(tiny, names, [1.0], "dare_linear", density=density, seed=5)
    other, _ = compose(tiny, names, [1.0], "dare_linear", density=density, seed=6)
    drawn, drawn_report = compose(tiny, names, [1.0], "dare_linear", density=density)
    replay, _ = compose(tiny, names, [1.0], "dare_linear", density=density, seed=drawn_report["seed"])
    for path in first.modules:
        assert torch.equal(first.modules[path].B, again.modules[path].B)
        assert torch.equal(drawn.modules[path].A, replay.modules[path].A)
        assert not torch.allclose(composed_delta(first.modules[path]), composed_delta(other.modules[path]))
    assert isinstance(drawn_report["seed"], int)

    kept = total = 0
    for path, module in first.modules.items():
        delta, out = tiny["truth"]["plain_a"][path], composed_delta(module)
        big = delta.abs() > 1e-3 * delta.abs().max()  # entries whose fate is measurable
        is_kept = (out[big] / delta[big] - 1 / density).abs() < 1e-3 / density
        is_dropped = out[big].abs() < 1e-5 * delta.abs().max() / density
        assert bool((is_kept | is_dropped).all())  # every entry is either rescaled by 1/density or zero
        kept, total = kept + int(is_kept.sum()), total + int(big.sum())
    sigma = math.sqrt(density * (1 - density) / total)
    assert abs(kept / total - density) < 4 * sigma


# ----------------------------------------------------------------------
# PEFT's add_weighted_adapter as the peer


@pytest.fixture(scope="module")
def peft_pair(tiny):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(_load_base(tiny["base_dir"]), tiny["dirs"]["plain_a"], adapter_name="a")
    model.load_adapter(tiny["dirs"]["plain_b"], adapter_name="b")

    def combine(name, weights, combination_type, **kw):
        model.add_weighted_adapter(["a", "b"], weights, name, combination_type=combination_type, **kw)
        return {key.removeprefix("base_model.model."): layer for key, layer in model.named_modules()
                if isinstance(layer, LoraLayer) and name in layer.lora_A}

    return combine


def test_peft_linear_and_cat_reproduce_peft_factors_bit_for_bit(tiny, peft_pair):
    weights = [0.7, -0.4]
    for ours_name, theirs_name in (("peft_linear", "linear"), ("cat", "cat")):
        layers = peft_pair(f"m_{theirs_name}", weights, theirs_name)
        composed, report = compose(tiny, ["plain_a", "plain_b"], weights, ours_name)
        assert sorted(layers) == sorted(composed.modules)
        for path, layer in layers.items():
            assert torch.equal(layer.lora_A[f"m_{theirs_name}"].weight, composed.modules[path].A)
            assert torch.equal(layer.lora_B[f"m_{theirs_name}"].weight, composed.modules[path].B)
            assert layer.scaling[f"m_{theirs_name}"] == composed.modules[path].scale == 1.0
    # peft_linear is an approximation: its reported error is the distance to the exact sum
    composed, report = compose(tiny, ["plain_a", "plain_b"], weights, "peft_linear")
    for path, terms in weighted_truth(tiny, ["plain_a", "plain_b"], weights).items():
        exact = dense_sum(terms)
        actual = float((composed_delta(composed.modules[path]) - exact).norm() / exact.norm())
        assert report["modules"][path]["error"] == pytest.approx(actual, rel=1e-3)


@pytest.mark.parametrize("svd_rank", [None, 5, 16])
def test_svd_equals_peft_svd(tiny, peft_pair, svd_rank):
    weights = [0.7, -0.4]
    name = f"m_svd_{svd_rank}"
    layers = peft_pair(name, weights, "svd", svd_rank=svd_rank)
    composed, report = compose(tiny, ["plain_a", "plain_b"], weights, "svd", rank=svd_rank)
    assert report["exact"] is (svd_rank == 16)
    for path, layer in layers.items():
        theirs = layer.get_delta_weight(name)
        ours = composed_delta(composed.modules[path])
        assert float((theirs - ours).abs().max()) <= 1e-4 * float(theirs.abs().max())


@pytest.mark.parametrize("ours,theirs", [("ties", "ties_svd"), ("magnitude_prune", "magnitude_prune_svd")])
def test_dense_rules_equal_peft_at_full_rank(tiny, peft_pair, ours, theirs):
    """PEFT's *_svd at svd_rank = min(out, in) keeps the whole dense rule: our plain variant."""
    weights = [0.7, 0.4]
    layers = peft_pair(f"m_{theirs}", weights, theirs, svd_rank=64, density=0.4, majority_sign_method="total")
    composed, _ = compose(tiny, ["plain_a", "plain_b"], weights, ours, density=0.4)
    for path, layer in layers.items():
        assert_close_rel(composed_delta(composed.modules[path]), layer.get_delta_weight(f"m_{theirs}"), 1e-5)


# ----------------------------------------------------------------------
# Export, refusals, report


@pytest.mark.parametrize("method,kw", [("linear", {}), ("svd", {"rank": 4}), ("ties", {"density": 0.5})])
def test_written_composition_loads_in_peft_with_the_composed_update(tiny, tmp_path, method, kw):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names, weights = ["plain_a", "rslora", "pattern", "dora"], [1.0, -0.6, 0.5, 0.8]
    composed, _ = compose(tiny, names, weights, method, **kw)
    write_peft_adapter(composed, tmp_path / method)
    model = PeftModel.from_pretrained(_load_base(tiny["base_dir"]), tmp_path / method)
    layers = {key.removeprefix("base_model.model."): layer for key, layer in model.named_modules()
              if isinstance(layer, LoraLayer) and "default" in layer.lora_A}
    assert sorted(layers) == sorted(composed.modules)
    for path, layer in layers.items():
        assert_close_rel(layer.get_delta_weight("default"), composed_delta(composed.modules[path]), 1e-6)
    if method == "linear":  # and the loaded adapter applies exactly Σ wᵢΔWᵢ
        for path, terms in weighted_truth(tiny, names, weights).items():
            assert_close_rel(layers[path].get_delta_weight("default"), dense_sum(terms), 1e-5)


def test_mismatched_shapes_and_bad_requests_are_refused(tiny):
    plain = tiny["adapters"]["plain_a"]
    path = "model.layers.1.self_attn.o_proj"
    module = plain.modules[path]
    narrow = replace(plain, modules={**plain.modules, path: replace(module, A=module.A[:, :32].clone())})
    with pytest.raises(ValueError, match=path.replace(".", r"\.")):
        compose_adapters([plain, narrow], [1.0, 1.0], "svd")
    with pytest.raises(ValueError, match="equal ranks"):
        compose(tiny, ["plain_a", "rslora"], [1.0, 1.0], "peft_linear")
    with pytest.raises(ValueError, match="DoRA"):
        compose(tiny, ["dora"], [1.0], "peft_linear")
    with pytest.raises(ValueError, match="unknown method"):
        compose(tiny, ["plain_a"], [1.0], "average")
    with pytest.raises(ValueError, match="rank"):
        compose(tiny, ["plain_a"], [1.0], "linear", rank=4)
    with pytest.raises(ValueError, match="density"):
        compose(tiny, ["plain_a"], [1.0], "ties", density=0.0)
    with pytest.raises(ValueError, match="weights"):
        compose(tiny, ["plain_a", "plain_b"], [1.0], "linear")


def test_methods_table_progress_and_report(tiny):
    assert set(METHODS) == {"linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                            "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd",
                            "task_arithmetic", "iso_c", "peft_linear"}
    assert {name for name, info in METHODS.items() if info.exact} == {"linear", "cat", "task_arithmetic"}
    assert {name for name, info in METHODS.items() if info.dense} == {
        "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
        "magnitude_prune_svd"}
    calls = []
    composed, report = compose(tiny, ["plain_a", "rslora"], [0.5, 0.5], "svd", rank=8,
                               progress=lambda fraction, message: calls.append((fraction, message)))
    assert len(calls) == len(composed.modules) and calls[-1][0] == 1.0
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert set(report["modules"]) == set(composed.modules)
    json.dumps(report)
