"""The fused CPU merge of bf16 and float16 weights (`merge_cpu.c`): built, loaded and checked here.

    merge_rows(weight, B, A, bounds, scales, out)   # out = W + Σₜ sₜ·Bₜ·Aₜ in W's dtype, one block
    merge_rows_to_file(weight, B, A, bounds, scales, buffer, fd, offset)   # many rows, to a file
    available(dtype=torch.bfloat16) -> bool
    python -m kernels.merge_cpu     # build every variant into the cache (a Docker build stage)

Same bits as the torch reference (`merge_reference.merge_rows_into`, then one rounding), at less
than half its CPU time: the reference makes three passes over a float32 copy of the block (upcast,
`addmm_`, round); the C kernel reads W once, keeps a tile's products in vector registers and writes
W's dtype once (one core, r = 16, ns per weight: AVX-512 0.31–0.34 in 8-row tiles, 0.34–0.38 in
the 4-row tiles it had before; AVX2 0.55–0.58; the torch path 0.77–0.82). float16 takes the same
path as bf16, its conversions done by F16C's instructions (session 23; before, float16 bases went
the torch path).

One source, two builds (`VARIANTS`): AVX-512 (16 floats a vector) where the CPU has AVX-512 F, BW,
FMA and F16C, else AVX2 (8 floats) where it has AVX2, FMA and F16C: AMD before Zen 4, Intel before
Skylake-SP. The kernel is used only where all of these hold, else the torch reference runs (same
bits):

* the CPU runs one of the variants (`/proc/cpuinfo`), and QUIVER_CPU_KERNEL is not "0"
  ("avx2" picks the AVX2 build on a CPU that runs both);
* the variant's library is in QUIVER_KERNEL_CACHE (default $XDG_CACHE_HOME/quiver, else
  ~/.cache/quiver), named by a hash of the source and flags, or a C compiler ($CC, cc, gcc or
  clang) builds it there on first use (well under a second). The Docker image builds both in a
  build stage and carries only the libraries, no compiler;
* on random blocks (tails, several adapters, negative and non-power-of-two scales) it gives
  exactly the reference's bits (`equal_results`: in float16 a NaN only has to stay a NaN),
  checked for each dtype: a dtype that differs runs the torch path. The kernel's products are
  FMA chains in k order; MKL's sgemm computes the same on the CPUs measured, but BLAS promises
  no order, so this is checked once per process and variant rather than assumed.

Why C rather than Triton: Triton compiles for GPUs; on CPU the choice is a C kernel or torch's
passes. Why not a library: no library fuses a bf16 upcast, a low-rank GEMM and the rounding
with PEFT's exact rounding order.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from .merge_reference import merge_rows_into

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("merge_cpu.c")
COMMON_CFLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared"]
# variant → (compiler flags, /proc/cpuinfo flags it needs), widest first: the first the CPU runs is used.
VARIANTS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "avx512": (["-mavx512f", "-mavx512bw", "-mfma", "-mf16c"], ("avx512f", "avx512bw", "fma", "f16c")),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], ("avx2", "fma", "f16c")),
}
# dtype → the C functions' `format` argument
FORMATS = {torch.bfloat16: 0, torch.float16: 1}


def cache_dir() -> Path:
    configured = os.environ.get("QUIVER_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quiver"


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            return frozenset(next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def runnable_variants() -> list[str]:
    """The variants this CPU runs, widest first."""
    return [name for name, (_, needed) in VARIANTS.items() if _cpu_flags().issuperset(needed)]


def chosen_variant() -> str | None:
    """What QUIVER_CPU_KERNEL and the CPU select: None for the torch path."""
    setting = os.environ.get("QUIVER_CPU_KERNEL", "1")
    if setting == "0":
        return None
    runnable = runnable_variants()
    if setting in VARIANTS:
        return setting if setting in runnable else None
    return runnable[0] if runnable else None


def _compiler() -> str | None:
    found = (shutil.which(name) for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name)
    return next((path for path in found if path), None)


def _cflags(variant: str) -> list[str]:
    return VARIANTS[variant][0] + COMMON_CFLAGS


def library_path(variant: str) -> Path:
    """Where `variant`'s library is cached: named by the source and flags, so an edit means a new build."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_cflags(variant)).encode()).hexdigest()[:16]
    return cache_dir() / f"merge_cpu-{variant}-{digest}.so"


def build(variant: str) -> Path | None:
    """`variant`'s shared library: the cached one, else built now; None if it is not cached and
    cannot be built here (no compiler, a failed build, an unwritable cache)."""
    if not SOURCE.exists():
        return None
    target = library_path(variant)
    if target.exists():
        return target
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: processes building at once never load half a file.
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            partial = Path(scratch) / target.name
            subprocess.run([compiler, *_cflags(variant), str(SOURCE), "-o", str(partial)],
                           check=True, capture_output=True, timeout=120)
            os.replace(partial, target)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        log.warning("fused CPU merge kernel (%s) not built (%s%s); the torch path merges instead", variant, error,
                    f": {detail.decode(errors='replace')[:500]}" if detail else "")
        return None
    return target


class _Library(NamedTuple):
    merge: ctypes._CFuncPtr  # quiver_merge_rows: one block into a buffer
    merge_to_file: ctypes._CFuncPtr  # quiver_merge_rows_pwrite: many rows, written to a file
    dtypes: frozenset  # the dtypes in which it gave the reference's bits on this machine


def _kernel() -> _Library | None:
    """The C functions QUIVER_CPU_KERNEL and the CPU select, or None (see the module docstring)."""
    variant = chosen_variant()
    return None if variant is None else _load(variant)


@functools.cache
def _load(variant: str) -> _Library | None:
    path = build(variant)
    if path is None:
        return None
    try:
        library = ctypes.CDLL(str(path))
        merge, merge_to_file = library.quiver_merge_rows, library.quiver_merge_rows_pwrite
    except (OSError, AttributeError) as error:  # e.g. a cache shared with another architecture
        log.warning("fused CPU merge kernel not loaded from %s (%s); the torch path merges instead", path, error)
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    factors = [pointer, pointer, pointer, pointer, pointer, integer, integer, integer, integer]  # W B A bounds …
    merge.argtypes = [*factors, integer, pointer]  # … format, out
    merge.restype = None
    merge_to_file.argtypes = [*factors, integer, integer, pointer, integer, integer]  # … format, row_block, buffer …
    merge_to_file.restype = integer
    dtypes = frozenset(dtype for dtype in FORMATS if _matches_reference(merge, dtype))
    for dtype in FORMATS.keys() - dtypes:
        log.warning("fused CPU merge kernel (%s) differs from the torch reference in %s on this machine; "
                    "not used for it", variant, dtype)
    return _Library(merge, merge_to_file, dtypes) if dtypes else None


def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether weights of `dtype` (bf16 or float16) merge through the kernel here."""
    library = _kernel()
    return library is not None and dtype in library.dtypes


def concat_factors(Bs: list[torch.Tensor], As: list[torch.Tensor], scales: list[float]):
    """(B_cat, A_cat, bounds, scales) as the kernel takes them: float32, contiguous, ranks side by
    side. `As` and `scales` as `merge_reference.fold_scales` left them."""
    B_cat = torch.cat([B.to(torch.float32) for B in Bs], dim=1).contiguous()
    A_cat = torch.cat([A.to(torch.float32) for A in As], dim=0).contiguous()
    ranks = [int(A.shape[0]) for A in As]
    bounds = torch.tensor([sum(ranks[:i]) for i in range(len(ranks) + 1)], dtype=torch.int64)
    return B_cat, A_cat, bounds, torch.tensor([float(s) for s in scales], dtype=torch.float32)


def merge_rows(weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, bounds: torch.Tensor,
               scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = W + Σₜ sₜ·Bₜ·Aₜ in W's dtype (bf16 or float16) for one block of rows (arguments from
    `concat_factors`, B's rows the block's). Only where available(W's dtype)."""
    library = _checked(weight, B, A, bounds, scales, out, out.shape != weight.shape)
    if weight.numel():
        _call(library.merge, weight, B, A, bounds, scales, out)
    return out


def merge_rows_to_file(weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, bounds: torch.Tensor,
                       scales: torch.Tensor, buffer: torch.Tensor, fd: int, offset: int) -> None:
    """merge_rows of all of `weight`'s rows, written to file descriptor `fd` at byte `offset`,
    block by block through `buffer` (W's dtype, whole rows: its row count is the block), in one call
    that holds no GIL. Only where available(W's dtype); OSError if a write fails (what was written
    stays)."""
    library = _checked(weight, B, A, bounds, scales, buffer,
                       buffer.dim() != 2 or buffer.shape[0] < 1 or buffer.shape[1] != weight.shape[1])
    if offset < 0:
        raise ValueError(f"offset must not be negative, got {offset}")
    if not weight.numel():
        return
    status = library.merge_to_file(*_factor_args(weight, B, A, bounds, scales), FORMATS[weight.dtype],
                                   buffer.shape[0], buffer.data_ptr(), fd, offset)
    if status:
        raise OSError(-status, f"fused CPU merge: writing at byte {offset} of fd {fd}: {os.strerror(-status)}")


def _checked(weight, B, A, bounds, scales, out, out_mismatch: bool) -> _Library:
    """The kernel's functions, after checking the arguments both take (`out`: the block buffer)."""
    library = _kernel()
    if library is None:
        raise RuntimeError("the fused CPU merge kernel is not available on this machine")
    if weight.dim() != 2:
        raise ValueError(f"the fused CPU merge takes a 2-D weight, got shape {list(weight.shape)}")
    rows, columns = weight.shape
    if not (weight.dtype == out.dtype and weight.dtype in FORMATS and B.dtype == A.dtype == torch.float32):
        raise ValueError("the fused CPU merge takes bf16 or float16 weights (out in the same dtype) and float32 "
                         "factors")
    if weight.dtype not in library.dtypes:
        raise RuntimeError(f"the fused CPU merge kernel is not available for {weight.dtype} on this machine")
    if out_mismatch or B.shape[0] != rows or A.shape[1] != columns or B.shape[1] != A.shape[0]:
        raise ValueError(f"shapes do not agree: W {list(weight.shape)}, B {list(B.shape)}, A {list(A.shape)}, "
                         f"out {list(out.shape)}")
    if not all(t.is_contiguous() and t.device.type == "cpu" for t in (weight, B, A, bounds, scales, out)):
        raise ValueError("the fused CPU merge takes contiguous CPU tensors")
    if bounds.dtype != torch.int64 or scales.dtype != torch.float32 or len(bounds) != len(scales) + 1 \
            or int(bounds[-1]) != A.shape[0]:
        raise ValueError("bounds must be int64 rank offsets (one more than scales, ending at A's rows)")
    return library


def _factor_args(weight, B, A, bounds, scales) -> tuple[int, ...]:
    """The arguments both C functions start with: W B A bounds scales adapters rows cols R."""
    return (weight.data_ptr(), B.data_ptr(), A.data_ptr(), bounds.data_ptr(), scales.data_ptr(),
            len(scales), weight.shape[0], weight.shape[1], B.shape[1])


def _call(function, weight, B, A, bounds, scales, out) -> None:
    function(*_factor_args(weight, B, A, bounds, scales), FORMATS[weight.dtype], out.data_ptr())


def reference_rows(weight: torch.Tensor, Bs: list[torch.Tensor], As: list[torch.Tensor],
                   scales: list[float]) -> torch.Tensor:
    """What the kernel must equal: the streaming merge's torch path for one block, in W's dtype."""
    acc = torch.empty(weight.shape, dtype=torch.float32)
    merge_rows_into(acc, weight, Bs, [A.to(torch.float32) for A in As], scales, torch.empty_like(acc))
    return acc.to(weight.dtype)


def _matches_reference(function, dtype: torch.dtype) -> bool:
    """Random blocks of `dtype` through the kernel and the torch reference: the same bits? (Shapes
    with row and column tails, one adapter and three with mixed ranks and scales, an infinity, a NaN,
    and in float16 a sum past its largest value.)"""
    generator = torch.Generator().manual_seed(0)
    cases = [(8, 64, [16], [1.0]), (13, 70, [16, 8, 3], [1.0, -0.3, 0.75]), (4, 33, [64], [2.5])]
    for rows, columns, ranks, scales in cases:
        weight = (torch.randn(rows, columns, generator=generator) * 0.02).to(dtype)
        weight[0, 0], weight[-1, -1], weight[1, 1] = float("inf"), float("nan"), torch.finfo(dtype).max
        Bs = [torch.randn(rows, r, generator=generator) * 0.01 for r in ranks]
        As = [torch.randn(r, columns, generator=generator) / columns**0.5 for r in ranks]
        out = torch.empty_like(weight)
        _call(function, weight, *concat_factors(Bs, As, scales), out)
        if not equal_results(out, reference_rows(weight, Bs, As, scales)):
            return False
    return True


def equal_results(out: torch.Tensor, expected: torch.Tensor) -> bool:
    """The kernel's block against the reference's: bit for bit, except that in float16 a NaN only
    has to be a NaN. torch's float16 → float32 conversion gives a NaN another payload in its scalar
    tail (0x7FFFFFFF) than in its vector loop (0x7FC00000), so the reference's NaN bits depend on
    where the element falls in the block (and PEFT's on where it falls in the whole tensor), not on
    the merge. In bf16 the kernel writes torch's NaN (0xFFFF) everywhere."""
    same_bits = out.view(torch.int16) == expected.view(torch.int16)
    if out.dtype == torch.float16:
        same_bits |= out.isnan() & expected.isnan()
    return bool(same_bits.all())


if __name__ == "__main__":  # the Docker build stage: every variant into QUIVER_KERNEL_CACHE
    for name in VARIANTS:
        built = build(name)
        if built is None:
            raise SystemExit(f"merge_cpu: the {name} variant did not build (is a C compiler installed?)")
        print(built)
