"""kernels.merge_cpu: the fused C merge of bf16 weights against the torch reference, bit for bit,
in each build this CPU runs (AVX-512, AVX2), on row and column tails, several adapters, negative and
non-power-of-two scales, infinities, a NaN, a signed zero and values that round to infinity; its
input checks; how a build is chosen, cached and found without a compiler; and where it is not
used. The streaming merge through it is tested against PEFT in tests/test_streaming_merge.py."""
import errno

import pytest
import torch

from kernels import merge_cpu
from kernels.merge_reference import fold_scales
from tests.conftest import require_kernel

# Rows: the AVX-512 build takes 8-row tiles, then 4-row tiles, then single rows (13 = 8 + 4 + 1);
# the AVX2 build 4-row tiles, then single rows. Columns: whole 32/16-column tiles and tails.
SHAPES = [(1, 1), (3, 31), (4, 32), (7, 33), (13, 70), (64, 100), (129, 2048)]
ADAPTERS = [([16], [2.0]), ([1], [0.75]), ([16, 8, 3], [1.0, -0.3, 0.75]), ([64], [-1.0])]


def block(rows, columns, ranks, scales, seed=0, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, columns, generator=generator) * 0.02).to(dtype)
    # …, and the largest finite value, which a positive update takes past it (to infinity)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, torch.finfo(dtype).max], dtype=dtype)
    count = min(len(specials), weight.numel())
    weight.view(-1)[-count:] = specials[:count]  # the last elements: the tails of the kernel
    Bs = [torch.randn(rows, r, generator=generator) * 0.01 for r in ranks]
    As = [torch.randn(r, columns, generator=generator) / columns**0.5 for r in ranks]
    As, scales = fold_scales(As, scales)
    return weight, Bs, As, scales


@pytest.fixture(params=list(merge_cpu.VARIANTS))
def variant(request, monkeypatch):
    """Each build of the kernel in turn (QUIVER_CPU_KERNEL picks it), where this CPU runs it."""
    if request.param not in merge_cpu.runnable_variants():
        pytest.skip(f"this CPU does not run the {request.param} build")
    monkeypatch.setenv("QUIVER_CPU_KERNEL", request.param)
    require_kernel(torch.bfloat16)
    require_kernel(torch.float16)
    return request.param


@pytest.fixture(params=list(merge_cpu.FORMATS), ids=str)
def dtype(request):
    return request.param


@pytest.mark.parametrize("rows, columns", SHAPES)
@pytest.mark.parametrize("ranks, scales", ADAPTERS)
def test_fused_cpu_merge_gives_the_reference_bits(variant, dtype, rows, columns, ranks, scales):
    assert merge_cpu._kernel() is merge_cpu._load(variant)
    weight, Bs, As, scales = block(rows, columns, ranks, scales, seed=rows * 4096 + columns, dtype=dtype)
    out = merge_cpu.merge_rows(weight, *merge_cpu.concat_factors(Bs, As, scales), torch.empty_like(weight))
    expected = merge_cpu.reference_rows(weight, Bs, As, scales)
    assert merge_cpu.equal_results(out, expected)
    assert torch.equal(out.isnan(), weight.isnan())  # a NaN of the base stays one (and only it)
    assert weight.numel() <= 5 or not torch.equal(out, weight)  # the update is there (beyond the specials)


@pytest.mark.parametrize("rows, columns, block_rows", [(1, 1, 1), (7, 33, 3), (129, 2048, 32), (64, 100, 64)])
def test_fused_cpu_merge_to_a_file_writes_the_reference_bytes_at_the_offset(variant, dtype, rows, columns,
                                                                             block_rows, tmp_path):
    """Block by block through a buffer of `block_rows` rows (the last block shorter), written at an
    odd offset of a file that has other bytes around that range: those stay as they were."""
    weight, Bs, As, scales = block(rows, columns, [16, 8, 3], [1.0, -0.3, 0.75], seed=rows + columns, dtype=dtype)
    expected = merge_cpu.reference_rows(weight, Bs, As, scales)
    size = expected.numel() * expected.element_size()
    path, offset = tmp_path / "out.bin", 13
    path.write_bytes(b"\xaa" * (offset + size + 5))
    with path.open("r+b") as handle:
        buffer = torch.empty(block_rows, columns, dtype=dtype)
        merge_cpu.merge_rows_to_file(weight, *merge_cpu.concat_factors(Bs, As, scales), buffer, handle.fileno(),
                                     offset)
    written = path.read_bytes()
    merged = torch.frombuffer(bytearray(written[offset:offset + size]), dtype=dtype).view(expected.shape)
    assert merge_cpu.equal_results(merged, expected)
    assert written[:offset] == b"\xaa" * offset and written[offset + size:] == b"\xaa" * 5


def test_fused_cpu_merge_to_a_file_raises_the_write_error(variant, tmp_path):
    weight, Bs, As, scales = block(8, 40, [4], [1.0])
    factors = merge_cpu.concat_factors(Bs, As, scales)
    buffer = torch.empty(4, 40, dtype=torch.bfloat16)
    path = tmp_path / "read-only.bin"
    path.write_bytes(b"")
    with path.open("rb") as handle, pytest.raises(OSError, match="Bad file descriptor") as raised:
        merge_cpu.merge_rows_to_file(weight, *factors, buffer, handle.fileno(), 0)
    assert raised.value.errno == errno.EBADF and path.read_bytes() == b""
    with pytest.raises(ValueError, match="shapes do not agree"):
        merge_cpu.merge_rows_to_file(weight, *factors, torch.empty(4, 41, dtype=torch.bfloat16), 1, 0)
    with pytest.raises(ValueError, match="offset"):
        merge_cpu.merge_rows_to_file(weight, *factors, buffer, 1, -1)


def test_fused_cpu_merge_refuses_what_it_does_not_take():
    require_kernel()
    weight, Bs, As, scales = block(8, 40, [4], [1.0])
    factors = merge_cpu.concat_factors(Bs, As, scales)
    out = torch.empty_like(weight)
    with pytest.raises(ValueError, match="bf16 or float16 weights"):
        merge_cpu.merge_rows(weight.float(), *factors, out)
    with pytest.raises(ValueError, match="same dtype"):
        merge_cpu.merge_rows(weight, *factors, out.to(torch.float16))
    with pytest.raises(ValueError, match="shapes do not agree"):
        merge_cpu.merge_rows(weight[:4], *factors, out[:4])
    with pytest.raises(ValueError, match="contiguous"):
        merge_cpu.merge_rows(weight.t().contiguous().t(), *factors, out)


def test_the_widest_build_the_cpu_runs_is_chosen_unless_told_otherwise(monkeypatch):
    flags = {"avx512": {"avx512f", "avx512bw", "fma", "f16c", "avx2"}, "avx2": {"avx2", "fma", "f16c"},
             "none": {"sse2", "avx2", "fma"}}  # without F16C: no build
    for cpu, expected in (("avx512", "avx512"), ("avx2", "avx2"), ("none", None)):
        monkeypatch.setattr(merge_cpu, "_cpu_flags", lambda: frozenset(flags[cpu]))
        monkeypatch.delenv("QUIVER_CPU_KERNEL", raising=False)
        assert merge_cpu.chosen_variant() == expected
        monkeypatch.setenv("QUIVER_CPU_KERNEL", "0")
        assert merge_cpu.chosen_variant() is None
        monkeypatch.setenv("QUIVER_CPU_KERNEL", "avx2")
        assert merge_cpu.chosen_variant() == (None if cpu == "none" else "avx2")
        monkeypatch.setenv("QUIVER_CPU_KERNEL", "avx512")
        assert merge_cpu.chosen_variant() == (expected if cpu == "avx512" else None)  # never one the CPU lacks


def test_no_compiler_means_no_kernel_and_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setenv("QUIVER_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang
    monkeypatch.delenv("CC", raising=False)
    assert all(merge_cpu.build(name) is None for name in merge_cpu.VARIANTS) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", list(merge_cpu.VARIANTS))
def test_each_build_is_made_once_into_the_cache_and_then_needs_no_compiler(name, monkeypatch, tmp_path):
    """The Docker image builds the libraries in a build stage (`python -m kernels.merge_cpu`) and
    runs without a compiler: a cached library is used as it is."""
    if merge_cpu._compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("QUIVER_KERNEL_CACHE", str(tmp_path))
    first = merge_cpu.build(name)
    assert first is not None and first.parent == tmp_path and first.stat().st_size > 0
    assert first == merge_cpu.library_path(name) and name in first.name
    modified = first.stat().st_mtime_ns
    assert merge_cpu.build(name) == first and first.stat().st_mtime_ns == modified
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    assert merge_cpu._compiler() is None and merge_cpu.build(name) == first


def test_a_library_that_does_not_load_means_the_torch_path(monkeypatch, tmp_path):
    broken = tmp_path / "merge_cpu-broken.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(merge_cpu, "chosen_variant", lambda: "avx512")
    monkeypatch.setattr(merge_cpu, "build", lambda variant: broken)
    merge_cpu._load.cache_clear()
    try:
        assert merge_cpu._kernel() is None
    finally:
        merge_cpu._load.cache_clear()  # the next caller loads the real one again
