"""kernels.merge_reference / merge_triton / dispatch: the torch reference against a
float64 ground truth and PEFT's own merge, and the fused Triton kernel against the
reference under the Triton interpreter (CPU tensors, TRITON_INTERPRET=1)."""
import importlib
import os
import sys

import pytest
import torch

# triton.jit picks the interpreter when the decorator runs (when kernels.merge_triton is
# imported), and the interpreter reads the variable again while it runs: set it before the
# import, keep it for this module's tests, restore it when they are done.
_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
if "kernels.merge_triton" in sys.modules:  # imported earlier without the interpreter: rebuild the kernel
    importlib.reload(sys.modules["kernels.merge_triton"])
from kernels import merge_triton  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _previous


from hub.formats.threads import intra_op_threads  # noqa: E402
from kernels.dispatch import choose_backend, merge_lora  # noqa: E402
from kernels.merge_reference import default_row_block, merge_lora_reference  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def factors(out_features, in_features, ranks, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=generator).to(dtype)
    Bs = [torch.randn(out_features, r, generator=generator) * 0.3 for r in ranks]
    As = [torch.randn(r, in_features, generator=generator) * 0.3 for r in ranks]
    return W, Bs, As


def exact(W, Bs, As, scales):
    """W + Σ s·B·A in float64 (the ground truth every float32 path rounds from)."""
    total = W.double()
    for B, A, s in zip(Bs, As, scales):
        total = total + s * (B.double() @ A.double())
    return total


def mantissa_bits(dtype):
    return {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]


def spacing(values, dtype):
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(values.abs().double().clamp_min(info.tiny)))
    return torch.exp2(exponent - mantissa_bits(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_rounds_once_from_the_exact_sum(dtype):
    W, Bs, As = factors(37, 53, (3, 5), dtype)
    scales = [2.0, -0.75]
    merged = merge_lora_reference(W, Bs, As, scales)
    assert merged.dtype == dtype and merged.shape == W.shape
    truth = exact(W, Bs, As, scales)
    error = (merged.double() - truth).abs()
    # at most half a unit in the last place of the result, plus float32 accumulation noise
    bound = 0.5 * spacing(truth, dtype) + 1e-5 * (truth.abs() + 1)
    assert bool((error <= bound).all()), float((error - bound).max())


def test_row_blocks_out_and_in_place_give_identical_bits():
    W, Bs, As = factors(1001, 96, (4, 16, 2), torch.bfloat16)  # 1001 rows: a ragged last block
    scales = [0.5, 1.25, -3.0]
    whole = merge_lora_reference(W, Bs, As, scales)
    assert torch.equal(merge_lora_reference(W, Bs, As, scales, row_block=64), whole)
    assert torch.equal(merge_lora_reference(W, Bs, As, scales, row_block=default_row_block(96)), whole)
    assert torch.equal(merge_lora(W, Bs, As, scales), whole)
    with intra_op_threads(1):
        assert torch.equal(merge_lora(W, Bs, As, scales, workers=2), whole)
    in_place = W.clone()
    merge_lora_reference(in_place, Bs, As, scales, out=in_place, row_block=64)
    assert torch.equal(in_place, whole)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [16, 320])
def test_fused_addmm_blocks_give_the_two_step_bits(dtype, rank):
    """Scale 1 after folding (alpha/r = 2): a block may be one addmm_, used only where
    fused_add_is_exact found it gives `float(W) + B @ A` (PEFT's order). Whatever the BLAS
    does (MKL's sgemm on AVX-512 matches for small ranks, its dgemm and sgemm past
    K-blocking do not), every block must give the two-step bits, and a zero B (a fresh
    LoRA) must not be what decides."""
    from kernels.merge_reference import _FUSED_ADD_EXACT

    Bs_zero_first = [torch.zeros(64, rank)]
    W0 = torch.randn(64, 200, generator=torch.Generator().manual_seed(4)).to(dtype)
    with intra_op_threads(1):
        merge_lora_reference(W0, Bs_zero_first, [torch.randn(rank, 200)], [1.0], row_block=64)

    W, Bs, As = factors(64 * 9 + 5, 200, (rank,), dtype, seed=3)
    compute = torch.promote_types(torch.float32, dtype)
    two_step = (W.to(compute) + Bs[0].to(compute) @ (As[0].to(compute) * 2.0)).to(dtype)
    with intra_op_threads(1):
        blocked = merge_lora_reference(W, Bs, As, [2.0], row_block=64)
    assert torch.equal(blocked, two_step)
    key = ("cpu", compute, (64, 200), (rank, 200), 1)
    assert key in _FUSED_ADD_EXACT  # decided once for this key, on random data


def test_reference_refuses_mismatched_factors():
    W, Bs, As = factors(8, 6, (2,))
    with pytest.raises(ValueError, match="does not give the weight's shape"):
        merge_lora_reference(W, [Bs[0].T], As, [1.0])
    with pytest.raises(ValueError, match="pair up"):
        merge_lora_reference(W, Bs, As, [1.0, 2.0])


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
def test_reference_is_bit_exact_with_peft_linear_merge(base_dtype, lora_dtype):
    """PEFT's LoRA Linear.merge() on CPU: float32 LoRA weights (what from_pretrained's
    autocast_adapter_dtype gives) ↔ delta_dtype=None; bf16 LoRA weights ↔ delta_dtype=bf16."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(96, 80, bias=False)

    torch.manual_seed(0)
    model = Net().to(base_dtype)
    W = model.lin.weight.detach().clone()
    peft_model = get_peft_model(model, LoraConfig(r=6, lora_alpha=9, target_modules=["lin"]))
    generator = torch.Generator().manual_seed(1)
    A = torch.randn(6, 96, generator=generator).to(lora_dtype)
    B = (torch.randn(80, 6, generator=generator) * 0.05).to(lora_dtype)
    layer = peft_model.base_model.model.lin
    layer.lora_A["default"].weight.data = A.clone()
    layer.lora_B["default"].weight.data = B.clone()
    peft_merged = peft_model.merge_and_unload().lin.weight.detach()

    ours = merge_lora_reference(W, [B], [A], [9 / 6], delta_dtype=None if lora_dtype == torch.float32 else lora_dtype)
    assert ours.dtype == peft_merged.dtype
    assert torch.equal(ours, peft_merged), float((ours.float() - peft_merged.float()).abs().max())


# --- the Triton kernel, interpreted on the CPU -------------------------------------------------


def test_kernel_runs_under_the_interpreter():
    assert merge_triton.is_interpreted()
    assert choose_backend(torch.zeros(2, 2)) == "torch"


@pytest.mark.parametrize("schedule", ["tile", "outer"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, ranks, blocks",
    [
        ((70, 45), (3, 7), (32, 32, 16)),  # neither dimension a block multiple, R = 10
        ((33, 100), (20,), (16, 64, 16)),  # R = 20: two R steps, the second masked
        ((16, 16), (1,), (16, 16, 16)),  # exactly one tile, rank 1
    ],
)
def test_kernel_matches_reference(schedule, dtype, shape, ranks, blocks):
    W, Bs, As = factors(*shape, ranks, dtype, seed=len(ranks))
    scales = [1.5, -0.5][: len(ranks)]
    block_m, block_n, block_r = blocks
    merged = merge_triton.merge_lora_triton(W, Bs, As, scales, schedule=schedule, block_m=block_m, block_n=block_n,
                                            block_r=block_r)
    reference = merge_lora_reference(W, Bs, As, scales)
    assert merged.dtype == dtype and merged.shape == W.shape
    # Scales folded into B and one shared accumulator: float32 sums may differ in the last
    # bits, so after rounding an element may sit one unit in the last place away.
    difference = (merged.double() - reference.double()).abs()
    assert bool((difference <= spacing(reference, dtype) * 1.0001 + 1e-6).all()), float(difference.max())
    truth = exact(W, Bs, As, scales)
    bound = 0.5 * spacing(truth, dtype) + 1e-5 * (truth.abs() + 1)
    assert bool(((merged.double() - truth).abs() <= bound).all())
    if dtype == torch.float32:
        torch.testing.assert_close(merged, reference, rtol=1e-6, atol=1e-5)


def test_kernel_in_place_and_input_checks():
    W, Bs, As = factors(40, 24, (5,), torch.bfloat16)
    expected = merge_triton.merge_lora_triton(W, Bs, As, [0.5], block_m=16, block_n=16)
    in_place = W.clone()
    merge_triton.merge_lora_triton(in_place, Bs, As, [0.5], out=in_place, block_m=16, block_n=16)
    assert torch.equal(in_place, expected)
    with pytest.raises(ValueError, match="powers of two"):
        merge_triton.merge_lora_triton(W, Bs, As, [0.5], block_m=24)
    B_cat, A_cat = merge_triton.concat_factors(Bs * 2, As * 2, [0.5, 2.0], W.device)
    assert B_cat.shape == (40, 10) and A_cat.shape == (10, 24)
    torch.testing.assert_close(B_cat[:, 5:], Bs[0] * 2.0)
