"""Base checkpoint + adapters → merged checkpoint, one tensor at a time.

    merge_checkpoint(base_files, [(adapter, weight), …], out_dir, dtype=None,
                     max_shard_bytes=5 * 10**9, progress=None) -> [written paths]

Memory stays near one tensor, never the model:

* The base is validated first (`hub.formats.parse_base_model`: config, shard
  numbering, index ↔ shards, and every header through
  `read_safetensors_header`: dtypes, shapes, offsets that tile the file).
* The output layout is known before any tensor is read (names, dtypes,
  shapes come from the base headers), so every output file's safetensors
  header is written first and each tensor's bytes have a known offset
  (`SafetensorsStreamWriter`: each tensor is claimed once, in any order, and
  every write names its offset, so any thread can write any claimed range); sharding
  follows transformers (huggingface_hub's greedy split in tensor order: a
  tensor that would push the shard over `max_shard_bytes` starts the next
  one, one larger than the limit gets a shard of its own;
  `model-0000i-of-0000N.safetensors` + an index with metadata.total_size /
  total_parameters and weight_map; a single `model.safetensors` when it all
  fits).
* An adapted tensor is read with safetensors' `safe_open`, opened for that
  tensor only and closed at once: the tensor owns its own mapping of the
  file, and the pages it made resident go when it does (one handle per file
  would keep every page read resident, growing RSS to the file size). A
  tensor nothing touches and whose dtype stays the same is copied byte for
  byte from its validated range (`os.copy_file_range`, in the kernel, no
  user-space buffer); one whose dtype changes is converted in chunks of
  `CHUNK_BYTES`.
* On the CPU a shard is a list of independent tasks (`_RowBlockPipeline`):
  each row block of a LoRA-only tensor (`STREAM_BLOCK_BYTES` of float32,
  ~2 MiB) is read from the mapping, merged into reused buffers
  (`kernels.merge_reference.merge_rows_into`), rounded and written at its
  offset; bf16 or float16 in and out, where the machine runs the fused C kernel
  (`kernels.merge_cpu`, same bits), a task is a `CHUNK_BYTES` piece of rows
  that the kernel merges and writes block by block in one call, without
  the GIL; each `CHUNK_BYTES` piece of an untouched tensor is copied in
  the kernel.
  Worker threads (as many as torch's intra-op threads, each running
  single-threaded torch ops) take the tasks, this thread runs one itself
  when 4·workers are queued, so page faults, compute and page-cache writes
  overlap on every core with no ordered hand-off, and only a few blocks are
  ever allocated. DoRA, a replaced tensor, or a CUDA `device` merges the
  whole tensor at once.
* A sharded output is written two shards at a time (`SHARD_STREAMS`, at most
  `workers`), their tasks interleaved (`_run_shards`): writes into one file
  take turns on its inode lock, writes into two files do not. Within a shard, the kernel copies of
  untouched tensors are interleaved with the merges by bytes (`_interleaved`).
* `sha256={}` asks for every written file's sha256 (the hub stores content-addressed
  blobs): each weight file is hashed by a thread that follows its writes
  (`kernels.trailing_digest`), so the hash ends soon after the last write
  rather than starting then, and shards are hashed in parallel.
* Measured (`benchmarks/merge.py`: 1.14 GB bf16 Llama, 10 layers, r=16 on
  every linear layer; 2 vCPUs shared with other work): 0.35–0.44 s and
  0.63–0.77 CPU-s with the fused kernel (session 23), bit-exact with PEFT (whose
  merge_and_unload + save_pretrained took 15–17 s); the plain copy of the
  file 0.30–0.40 s in its fast mode; peak RSS growth 8–9 % of the
  checkpoint. Where the CPU goes: the kernel ≈ 30 % (its FMAs are at one
  core's AVX-512 rate; W read through fresh mappings costs the rest),
  page-cache writes and the kernel copies ≈ 45 %, what the copy spends too,
  and spinning on the file's inode lock ≈ 9 %. The merge is CPU-bound at
  about 2.4× the copy's CPU time, so it gets near the copy's wall time
  only with cores to spare.
* Files are written under hidden temporary names in `out_dir` and renamed
  into place only when everything has been written (weights, then index,
  then config.json), so no partial checkpoint is ever visible; a failure
  removes the temporary files. Weight files of an earlier checkpoint in
  out_dir that the new one does not have (model.safetensors vs shards) are
  removed after the rename. Nothing is fsync'ed: the renames are about what
  readers can see, not crash durability (the hub copies the files into blob
  storage right after).

What a merged tensor is (W: base tensor, in the output dtype):

* LoRA module of adapter i with weight wᵢ: ΔWᵢ = wᵢ·sᵢ·Bᵢ·Aᵢ in W's layout
  (conv kernels reshaped, embeddings and fan_in_fan_out weights transposed,
  as PEFT's get_delta_weight). merged = W + Σᵢ ΔWᵢ in float32, rounded once
  (`kernels.merge_reference.merge_rows_into` row block by row block on the
  CPU, `kernels.dispatch.merge_lora` for whole tensors; bit-exact with PEFT's merge_and_unload for
  one adapter at weight 1, see kernels.merge_reference).
* DoRA (`LoraModule.merged_weight`): one DoRA module at weight 1 alone on a
  tensor gives exactly PEFT's DoRA merge, m/‖W + ΔW‖_row · (W + ΔW). With
  weights or several adapters on one tensor, each DoRA module contributes
  wᵢ·(DoRAᵢ(W) − W), its full merged update with the row norm taken on the
  *unmerged* base W (as PEFT's forward does, and PEFT 0.21's merge, which
  un-merges earlier adapters to compute each norm), and the contributions
  add like task vectors: merged = W + Σ LoRA ΔWᵢ + Σ wⱼ·(DoRAⱼ(W) − W).
  This is linear in the weights (w = 0.5 is halfway between W and the DoRA
  merge) and independent of adapter order; PEFT's sequential merge of several
  DoRA adapters rescales the adapters merged before by later magnitudes, and
  is order-dependent, so it is not reproduced.
* modules_to_save / extra_tensors replace the base tensor (whatever the
  adapter's weight); two adapters replacing one tensor are refused.
* `dtype` ("float16", "bfloat16", "float32") casts every floating tensor;
  the base is cast *before* merging, as `from_pretrained(torch_dtype=…)` +
  merge_and_unload does. config.json gets the new dtype ("dtype", the
  transformers 5 key, and/or "torch_dtype").

This module imports `hub.formats` (validation, the canonical adapter): both are
Django-free.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import uuid
from collections import deque
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from queue import SimpleQueue
from typing import Callable, Iterator, NamedTuple

import torch

from hub.formats.base_model import CONFIG_NAME, INDEX_NAME, SHARD_NAME, SINGLE_WEIGHTS_NAME, parse_base_model
from hub.formats.canonical import CanonicalAdapter, LoraModule, align_modules_to_base, resolve_name
from hub.formats.errors import FormatError
from hub.formats.safetensors_header import (
    BASE_MODEL_DTYPES,
    DTYPE_ITEMSIZE,
    TensorEntry,
    normalise_upload_names,
    read_json_object,
    read_safetensors_header,
)
from hub.formats.threads import intra_op_threads

from . import merge_cpu
from .dispatch import merge_lora, worker_pool
from .merge_reference import default_row_block, fold_scales, merge_rows_into
from .trailing_digest import TrailingSha256

CHUNK_BYTES = 16 * 2**20
STREAM_BLOCK_BYTES = 2 * 2**20  # float32 bytes per row block (measured best of 1, 2, 4 MiB)
# Shards written at once: two halve the writes that wait on one file's inode lock; each more would
# keep one more tensor's mapped pages resident, and memory is to stay near one tensor.
SHARD_STREAMS = 2
MERGE_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
KOHYA_PREFIX = re.compile(r"^lora_(?:unet|te\d?)_")

Progress = Callable[[float, str], None]


class Task(NamedTuple):
    """One piece of the CPU pipeline's work (`_RowBlockPipeline`)."""
    run: Callable[[], None]
    nbytes: int  # output bytes it writes: how `_interleaved` keeps streams in step
    then: Callable[[], None] | None  # run by `retire` once this task and all before it are done


# ----------------------------------------------------------------------
# Streaming safetensors writer


class SafetensorsStreamWriter:
    """Write a safetensors file whose tensor list is known up front: the
    header (8-byte length + JSON, space-padded so data starts 8-byte aligned,
    as the safetensors library writes it) goes out first, so every tensor's
    place in the file is known; each declared tensor is then claimed once, in
    any order, and its bytes written there. Every write names its offset
    (os.pwrite, copy_file_range with offsets), so a claimed tensor's bytes
    can be written by other threads, in any order, with `write_at`. Nothing
    is buffered beyond the tensor being written. With `sha256=True` a thread
    hashes the file as it is written (`TrailingSha256`: every write reports
    its range), and `sha256()` gives the digest after close()."""

    def __init__(self, path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None,
                 *, sha256: bool = False):
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        declared: list[tuple[str, int, int]] = []  # name, data offset, bytes
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            declared.append((name, offset, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)
        self.data_length = offset
        self.size = 8 + len(raw) + offset
        # name → (file offset, bytes) of the tensors not claimed yet, in declared order
        self._unclaimed = {name: (8 + len(raw) + start, nbytes) for name, start, nbytes in declared}
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._digest: TrailingSha256 | None = None
        try:
            if sha256:
                self._digest = TrailingSha256(self.path, self.size)
            self.write_at(0, len(raw).to_bytes(8, "little") + raw)
        except BaseException:
            self.abort()
            raise

    def claim(self, name: str, nbytes: int) -> int:
        """The file offset of declared tensor `name`, not claimed before, whose bytes the
        caller writes with `write_at` (or the write methods below) before close()."""
        if name not in self._unclaimed:
            raise ValueError(f"{self.path.name}: tensor '{name}' is not declared, or was claimed already")
        offset, expected_bytes = self._unclaimed[name]
        if nbytes != expected_bytes:
            raise ValueError(f"{self.path.name}: tensor '{name}' is declared with {expected_bytes} bytes, got {nbytes}")
        del self._unclaimed[name]
        return offset

    def fileno(self) -> int:
        """The file's descriptor, for code that writes a claimed range itself (the fused CPU
        merge, `merge_cpu.merge_rows_to_file`); like `write_at`, any thread, own range
        only, and reported with `wrote` once written."""
        return self._fd

    def wrote(self, offset: int, nbytes: int) -> None:
        """Bytes [offset, offset + nbytes) are written (through `fileno`): the digest may read them."""
        if self._digest is not None:
            self._digest.written(offset, nbytes)

    def write_at(self, offset: int, data) -> None:
        """Bytes of a claimed tensor at `offset` (safe from several threads at once)."""
        self.wrote(offset, _pwrite_all(self._fd, data, offset))

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self.write_at(self.claim(name, data.numel()), memoryview(data.numpy()))

    def write_chunks(self, name: str, nbytes: int, chunks) -> None:
        """Declared tensor `name` from an iterable of uint8 tensors / buffers."""
        offset = self.claim(name, nbytes)
        written = 0
        for chunk in chunks:
            if isinstance(chunk, torch.Tensor):
                chunk = memoryview(chunk.contiguous().reshape(-1).view(torch.uint8).numpy())
            if written + len(chunk) > nbytes:
                raise ValueError(f"{self.path.name}: tensor '{name}' got more than the {nbytes} bytes declared")
            self.write_at(offset + written, chunk)
            written += len(chunk)
        if written != nbytes:
            raise ValueError(f"{self.path.name}: tensor '{name}' got {written} bytes, {nbytes} declared")

    def copy_range(self, name: str, source_fd: int, offset: int, nbytes: int) -> None:
        """Declared tensor `name` from `nbytes` of `source_fd` at `offset` (`copy_at`)."""
        self.copy_at(self.claim(name, nbytes), source_fd, offset, nbytes)

    def copy_at(self, target: int, source_fd: int, offset: int, nbytes: int) -> None:
        """Copy `nbytes` from `source_fd` at `offset` to `target` in this file, in the
        kernel (copy_file_range: no user-space buffer), or through a bounded buffer where
        the kernel cannot. Safe from several threads at once, like `write_at`."""
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < nbytes:
                    copied = os.copy_file_range(source_fd, self._fd, nbytes - done, offset + done, target + done)
                    if copied == 0:
                        raise OSError(f"{self.path.name}: unexpected end of the source file at {offset + done}")
                    done += copied
            except OSError as error:
                if error.errno is None or done:  # our own EOF, or a failure half-way: not a missing feature
                    raise
        while done < nbytes:
            chunk = os.pread(source_fd, min(CHUNK_BYTES, nbytes - done), offset + done)
            if not chunk:
                raise OSError(f"{self.path.name}: unexpected end of the source file at {offset + done}")
            _pwrite_all(self._fd, chunk, target + done)
            done += len(chunk)
        self.wrote(target, nbytes)

    def close(self) -> None:
        """Check that every declared byte was written and close the file (its digest, if any,
        may still be reading it: `sha256()` waits for it)."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            if self._unclaimed:
                missing = next(iter(self._unclaimed))
                raise ValueError(f"{self.path.name}: closed before tensor '{missing}' was written")
            if os.fstat(fd).st_size != self.size:  # a claimed tensor at the end never written
                raise ValueError(f"{self.path.name}: {os.fstat(fd).st_size} bytes written, {self.size} declared")
        except BaseException:
            self._stop_digest()
            raise
        finally:
            os.close(fd)

    def sha256(self) -> str:
        """The file's sha256 (hex), after close(); only for a writer made with sha256=True."""
        if self._fd >= 0 or self._digest is None:
            raise RuntimeError(f"{self.path.name}: sha256() needs sha256=True and a closed writer")
        return self._digest.hexdigest()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._stop_digest()

    def _stop_digest(self) -> None:
        if self._digest is not None:
            self._digest.stop()


def _pwrite_all(fd: int, data, offset: int) -> int:
    """Write all of `data` at `offset` (pwrite may write less); returns its length."""
    view = memoryview(data).cast("B")
    total = len(view)
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    return total


# ----------------------------------------------------------------------
# Planning


@dataclass
class _Contribution:
    module: LoraModule
    weight: float
    transposed_layout: bool  # fan_in_fan_out: the base stores W as in × out


@dataclass
class _PlannedTensor:
    name: str
    source_path: Path
    source_filename: str
    entry: TensorEntry
    data_start: int  # absolute file offset of the tensor's bytes
    out_dtype: str
    contributions: list[_Contribution] = field(default_factory=list)
    replacement: torch.Tensor | None = None

    @property
    def out_nbytes(self) -> int:
        return self.entry.numel * DTYPE_ITEMSIZE[self.out_dtype]

    @property
    def untouched(self) -> bool:
        return not self.contributions and self.replacement is None

    @property
    def copied_as_is(self) -> bool:
        """Untouched and in the same dtype: its bytes are copied, in the kernel."""
        return self.untouched and self.out_dtype == self.entry.dtype


def _align_adapter(adapter: CanonicalAdapter, base_shapes: dict[str, list[int]], label: str) -> dict[str, LoraModule]:
    """Module paths → base module paths (no-op for adapters parsed with base_shapes)."""
    modules = adapter.modules
    if all(f"{path}.weight" in base_shapes for path in modules):
        return modules
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out", False)) if adapter.format == "peft" else False
    if adapter.format == "kohya":
        return align_modules_to_base(
            modules, base_shapes, filename=label,
            adapter_key=lambda n: KOHYA_PREFIX.sub("", n), base_key=lambda n: n.replace(".", "_"), separator="_",
        )
    return align_modules_to_base(modules, base_shapes, filename=label, fan_in_fan_out=fan_in_fan_out)


def _plan_adapters(
    adapters: list[tuple[CanonicalAdapter, float]], planned: dict[str, _PlannedTensor], base_shapes: dict[str, list[int]]
) -> None:
    replaced_by: dict[str, int] = {}
    for index, (adapter, weight) in enumerate(adapters):
        label = f"adapter {index + 1}"
        weight = float(weight)
        if not math.isfinite(weight):
            raise ValueError(f"{label}: weight {weight} is not finite")
        fan_in_fan_out = adapter.format == "peft" and bool(adapter.config.get("fan_in_fan_out", False))
        for path, module in _align_adapter(adapter, base_shapes, label).items():
            target = planned[f"{path}.weight"]
            if module.kind not in ("linear", "conv", "embedding"):
                raise FormatError("unsupported_feature", f"{label}: module '{path}' has unknown kind {module.kind!r}.")
            if module.magnitude is not None and (module.kind != "linear" or fan_in_fan_out):
                raise FormatError(
                    "unsupported_feature",
                    f"{label}: module '{path}' is DoRA on a {'fan_in_fan_out ' if fan_in_fan_out else ''}"
                    f"{module.kind} layer; merging DoRA is implemented for linear layers only.",
                )
            target.contributions.append(_Contribution(module, weight, fan_in_fan_out and module.kind == "linear"))
        index_by_name = {name: [name] for name in base_shapes}
        for key, tensor in adapter.extra_tensors.items():
            base_key, _ = resolve_name(key, index_by_name, ".")
            if base_key is None or list(base_shapes[base_key]) != list(tensor.shape):
                raise FormatError(
                    "shape_mismatch",
                    f"{label}: saved tensor '{key}' {list(tensor.shape)} does not fit any base tensor.",
                )
            if base_key in replaced_by:
                raise FormatError(
                    "unsupported_feature",
                    f"adapters {replaced_by[base_key] + 1} and {index + 1} both replace '{base_key}' "
                    "(modules_to_save); merge them one at a time.",
                )
            replaced_by[base_key] = index
            planned[base_key].replacement = tensor


def _shard_plan(order: list[_PlannedTensor], max_shard_bytes: int) -> list[list[_PlannedTensor]]:
    """huggingface_hub.split_state_dict_into_shards_factory, on output byte sizes."""
    shards: list[list[_PlannedTensor]] = []
    current: list[_PlannedTensor] = []
    current_size = 0
    for item in order:
        size = item.out_nbytes
        if size > max_shard_bytes:
            shards.append([item])
            continue
        if current_size + size > max_shard_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append(item)
        current_size += size
    if current:
        shards.append(current)
    return shards


# ----------------------------------------------------------------------
# Merging one tensor


def _delta_factors(contribution: _Contribution) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, scale) with B @ A in the stored base layout, flattened to 2-D."""
    module = contribution.module
    scale = module.scale * contribution.weight
    if module.kind == "embedding" or contribution.transposed_layout:
        return module.A.T, module.B.T, scale  # PEFT stores (B @ A)ᵀ here
    return module.B, module.A, scale


def _merge_tensor(base: torch.Tensor, item: _PlannedTensor, device: torch.device, workers: int) -> torch.Tensor:
    """The merged tensor in item.out_dtype, on the CPU."""
    out_dtype = TORCH_DTYPES[item.out_dtype]
    W = base.to(device=device, dtype=out_dtype)  # cast first, as from_pretrained(torch_dtype=…) would
    shape = W.shape
    W2 = W.reshape(shape[0], -1)
    loras = [c for c in item.contributions if c.module.magnitude is None]
    doras = [c for c in item.contributions if c.module.magnitude is not None]
    factors = [_delta_factors(c) for c in loras]
    Bs, As, scales = [f[0] for f in factors], [f[1] for f in factors], [f[2] for f in factors]
    if not doras:
        out = torch.empty(W2.shape, dtype=out_dtype, device=device)
        merge_lora(W2, Bs, As, scales, out=out, workers=workers)
        return out.reshape(shape).cpu()
    W2 = W2.cpu()  # DoRA (LoraModule.merged_weight) runs where the adapter's tensors are: the CPU
    if len(doras) == 1 and not loras and doras[0].weight == 1.0:
        return doras[0].module.merged_weight(W2).to(out_dtype).reshape(shape)
    acc = W2.to(torch.promote_types(torch.float32, W2.dtype), copy=True)
    for c in doras:  # wⱼ·(DoRAⱼ(W) − W), norms on the unmerged base
        acc.add_(c.module.merged_weight(W2).sub_(W2), alpha=c.weight)
    if loras:
        merge_lora(acc, Bs, As, scales, out=acc, workers=workers)
    return acc.to(out_dtype).reshape(shape)


def _converted_chunks(source_fd: int, item: _PlannedTensor):
    """A dtype-changed tensor nothing else touches, converted a chunk at a time."""
    in_dtype, out_dtype = TORCH_DTYPES[item.entry.dtype], TORCH_DTYPES[item.out_dtype]
    itemsize = DTYPE_ITEMSIZE[item.entry.dtype]
    total = item.entry.end - item.entry.begin
    step = max(itemsize, CHUNK_BYTES // itemsize * itemsize)
    for start in range(0, total, step):
        raw = bytearray(os.pread(source_fd, min(step, total - start), item.data_start + start))
        if len(raw) != min(step, total - start):
            raise OSError(f"unexpected end of file reading '{item.name}'")
        yield torch.frombuffer(raw, dtype=in_dtype).to(out_dtype).view(torch.uint8)


# ----------------------------------------------------------------------


def _temporary(out_dir: Path, final_name: str, tag: str) -> Path:
    return out_dir / f".{final_name}.{tag}.partial"


def merge_checkpoint(
    base_files: dict[str, Path],
    adapters: list[tuple[CanonicalAdapter, float]],
    out_dir: Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    progress: Progress | None = None,
    device: str | torch.device | None = None,
    sha256: dict[str, str] | None = None,
) -> list[Path]:
    """Merge `adapters` (each with its weight) into the base checkpoint.

    base_files: file name → path: config.json and model.safetensors, or the
        shards + model.safetensors.index.json (other files, e.g.
        generation_config.json, are copied unchanged).
    dtype: output dtype for floating tensors ("float16", "bfloat16",
        "float32"); None keeps the base's.
    progress: called as progress(fraction 0..1, message) after each tensor.
    device: where adapted tensors are merged (default CPU; a CUDA device
        uses the Triton kernel through kernels.dispatch).
    sha256: if given, filled with each written file's name → sha256 (hex).
        The weight files are hashed while they are written (`TrailingSha256`),
        so a caller storing content-addressed blobs need not read them again.
    Returns the written paths: config.json, the index (if sharded), the
    weight files, then any other copied files.
    """
    if dtype is not None and dtype not in MERGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(MERGE_DTYPES)} or None, got {dtype!r}")
    if int(max_shard_bytes) <= 0:
        raise ValueError("max_shard_bytes must be positive")
    device = torch.device(device or "cpu")
    files = normalise_upload_names(base_files)
    info = parse_base_model(files)
    config = read_json_object(files[CONFIG_NAME], CONFIG_NAME)

    planned: dict[str, _PlannedTensor] = {}
    order: list[_PlannedTensor] = []
    for filename in info.weight_files:
        header = read_safetensors_header(files[filename], allowed_dtypes=BASE_MODEL_DTYPES, filename=filename)
        for entry in sorted(header.tensors.values(), key=lambda e: e.begin):  # file order: sequential reads
            out_dtype = MERGE_DTYPES[dtype] if dtype is not None and entry.dtype in FLOAT_DTYPES else entry.dtype
            item = _PlannedTensor(entry.name, header.path, filename, entry, 8 + header.header_length + entry.begin,
                                  out_dtype)
            planned[entry.name] = item
            order.append(item)
    _plan_adapters(adapters, planned, info.shapes)

    shards = _shard_plan(order, int(max_shard_bytes))
    if len(shards) == 1:
        names = [SINGLE_WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    temporaries: list[tuple[Path, Path]] = []  # (temporary, final)
    total_bytes = sum(item.out_nbytes for item in order) or 1
    done_bytes = 0

    def written(item: _PlannedTensor) -> None:
        nonlocal done_bytes
        done_bytes += item.out_nbytes
        if progress is not None:
            progress(done_bytes / total_bytes, f"merged {item.name}")

    source_fds: dict[Path, int] = {}
    workers = max(1, torch.get_num_threads()) if device.type == "cpu" else 1
    blocks = _RowBlockPipeline(workers) if device.type == "cpu" else None
    try:
        # On CPU, row blocks go to `workers` pool threads with single-threaded torch ops
        # (kernels.dispatch), and this thread's own ops run single-threaded too.
        with intra_op_threads(1) if device.type == "cpu" else nullcontext():
            for path in {item.source_path for item in order}:
                source_fds[path] = os.open(path, os.O_RDONLY)
            writers: list[SafetensorsStreamWriter] = []

            def open_shard(shard_name: str, shard: list[_PlannedTensor]) -> SafetensorsStreamWriter:
                temporary = _temporary(out_dir, shard_name, tag)
                temporaries.append((temporary, out_dir / shard_name))
                writers.append(SafetensorsStreamWriter(
                    temporary, [(item.name, item.out_dtype, item.entry.shape) for item in shard], {"format": "pt"},
                    sha256=sha256 is not None,
                ))
                return writers[-1]

            def tasks_of(writer: SafetensorsStreamWriter, items: list[_PlannedTensor]) -> Iterator[Task]:
                for item in items:  # lazily: a tensor is opened when its first task is wanted
                    yield from _item_tasks(writer, item, source_fds[item.source_path], device, workers, blocks,
                                           written)

            def shard_tasks(writer: SafetensorsStreamWriter, shard: list[_PlannedTensor]) -> Iterator[Task]:
                if sha256 is not None:
                    # In file order: the hash follows the written prefix, and interleaved copies
                    # (the embeddings and the head often open the file) would hold it back to the end.
                    return tasks_of(writer, shard)
                copied = [item for item in shard if item.copied_as_is]
                rest = [item for item in shard if not item.copied_as_is]
                return _interleaved([(tasks_of(writer, items), sum(item.out_nbytes for item in items))
                                     for items in (copied, rest)])

            try:
                _run_shards(list(zip(names, shards)), open_shard, shard_tasks, blocks,
                            streams=min(workers, SHARD_STREAMS) if blocks is not None else 1)
                if sha256 is not None:  # each file's hash has been following its writes
                    if progress is not None:
                        progress(1.0, "finishing the files' sha256")
                    final_names = {temporary: final.name for temporary, final in temporaries}
                    sha256.update((final_names[writer.path], writer.sha256()) for writer in writers)
            finally:
                if blocks is not None:
                    blocks.cancel()  # nothing left after a success; after a failure, running blocks finish first
                for writer in writers:
                    writer.abort()  # closed and hashed ones: nothing to do

        extra_outputs: list[tuple[Path, Path]] = []
        if len(shards) > 1:
            index = {
                "metadata": {"total_parameters": sum(item.entry.numel for item in order),
                             "total_size": sum(item.out_nbytes for item in order)},
                "weight_map": {item.name: name for name, shard in zip(names, shards) for item in shard},
            }
            index["weight_map"] = dict(sorted(index["weight_map"].items()))
            temporary = _temporary(out_dir, INDEX_NAME, tag)
            temporary.write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
            extra_outputs.append((temporary, out_dir / INDEX_NAME))
            temporaries.append(extra_outputs[-1])
        temporary = _temporary(out_dir, CONFIG_NAME, tag)
        if dtype is not None:
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = dtype
            if "dtype" not in config and "torch_dtype" not in config:
                config["torch_dtype"] = dtype
            temporary.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            temporary.write_bytes(files[CONFIG_NAME].read_bytes())
        temporaries.append((temporary, out_dir / CONFIG_NAME))
        others = [name for name in files if name not in (CONFIG_NAME, INDEX_NAME, *info.weight_files)]
        for name in sorted(others):
            temporary = _temporary(out_dir, name, tag)
            temporary.write_bytes(files[name].read_bytes())
            temporaries.append((temporary, out_dir / name))
    except BaseException:
        for temporary, _ in temporaries:
            temporary.unlink(missing_ok=True)
        raise
    finally:
        for fd in source_fds.values():
            os.close(fd)

    if sha256 is not None:
        for temporary, final in temporaries:
            if final.name not in sha256:  # config.json, the index, other files: small
                with open(temporary, "rb") as handle:
                    sha256[final.name] = hashlib.file_digest(handle, "sha256").hexdigest()
    for temporary, final in temporaries:  # weights first, config.json last
        os.replace(temporary, final)
    written_names = {final.name for _, final in temporaries}
    for stale in out_dir.iterdir():  # weights of an earlier checkpoint written here
        if stale.name not in written_names and (
            stale.name in (SINGLE_WEIGHTS_NAME, INDEX_NAME) or SHARD_NAME.match(stale.name)
        ):
            stale.unlink()
    weight_paths = [out_dir / name for name in names]
    head = [out_dir / CONFIG_NAME] + ([out_dir / INDEX_NAME] if len(shards) > 1 else [])
    return head + weight_paths + [out_dir / name for name in sorted(others)]


def _run_shards(
    shards: list[tuple[str, list[_PlannedTensor]]],
    open_shard: Callable[[str, list[_PlannedTensor]], SafetensorsStreamWriter],
    shard_tasks: Callable[[SafetensorsStreamWriter, list[_PlannedTensor]], Iterator[Task]],
    blocks: _RowBlockPipeline | None,
    streams: int,
) -> None:
    """Write the shards (name, planned tensors), up to `streams` at a time, their tasks interleaved
    one by one: open_shard(name, tensors) gives a shard's writer, shard_tasks(writer, tensors) its
    tasks, lazily (tasks exist only with the row-block pipeline). Why interleave: ext4 (like
    most file systems) takes a file's inode lock for each buffered write, so two threads writing
    one file take turns, the waiting one spinning; two files take writes at once. With one worker
    per shard in flight a sharded merge writes in parallel (two threads writing 1.14 GB from cache:
    0.13–0.16 s into two files, 0.22–0.27 s and twice the CPU into one). A shard's writer is closed
    once every task before its last has finished (in submission order, `after`)."""
    waiting = deque(shards)
    active: deque = deque()
    while waiting or active:
        while waiting and len(active) < streams:
            name, tensors = waiting.popleft()
            writer = open_shard(name, tensors)
            active.append((writer, shard_tasks(writer, tensors)))
        writer, tasks = active.popleft()
        task = next(tasks, None)
        if task is None:
            if blocks is None:
                writer.close()
            else:
                blocks.after(writer.close)
            continue
        blocks.submit(task)
        active.append((writer, tasks))
    if blocks is not None:
        blocks.drain()


def _interleaved(streams: list[tuple[Iterator[Task], int]]) -> Iterator[Task]:
    """The tasks of several streams (tasks, their total bytes), the least-done stream's next task
    first, so the streams advance together. Within a shard: the untouched tensors' kernel copies
    beside the merges, so that one thread copies while another computes, rather than the copies of
    the embeddings and the head meeting at the file's two ends (7 % less wall time on the 1.14 GB
    benchmark, 2 vCPUs)."""
    states = [[0, max(total, 1), tasks] for tasks, total in streams]
    while states:
        state = min(states, key=lambda entry: entry[0] / entry[1])
        task = next(state[2], None)
        if task is None:
            states.remove(state)
            continue
        state[0] += task.nbytes
        yield task


def _item_tasks(
    writer: SafetensorsStreamWriter,
    item: _PlannedTensor,
    source_fd: int,
    device: torch.device,
    workers: int,
    blocks: _RowBlockPipeline | None,
    written: Callable[[_PlannedTensor], None],
) -> list[Task]:
    """One planned tensor: its row-block pipeline tasks, or [] once it is written here (whole-tensor
    merges, dtype conversions, replacements, and everything without the pipeline). `written(item)`
    runs once its bytes are all in the file (for pipeline tasks, after its last one)."""
    if item.copied_as_is:
        if blocks is not None:
            return blocks.copy_tasks(writer, item, source_fd, written)
        writer.copy_range(item.name, source_fd, item.data_start, item.out_nbytes)
    elif item.untouched:
        writer.write_chunks(item.name, item.out_nbytes, _converted_chunks(source_fd, item))
    elif item.replacement is not None:
        merged = item.replacement.to(TORCH_DTYPES[item.out_dtype])
        writer.write_tensor(item.name, _merge_tensor(merged, item, device, workers) if item.contributions else merged)
    else:
        from safetensors import safe_open

        # One handle per tensor, closed at once: the tensor owns its mapping, which
        # (with the pages it made resident) goes away when the last block drops it.
        with safe_open(str(item.source_path), framework="pt") as handle:
            base = handle.get_tensor(item.name)
        if blocks is not None and all(c.module.magnitude is None for c in item.contributions):
            return blocks.merge_tasks(writer, item, base, written)
        writer.write_tensor(item.name, _merge_tensor(base, item, device, workers))
    written(item)
    return []


class _RowBlockPipeline:
    """The CPU work of a shard as independent tasks, each writing its own byte
    range of the output at its own offset (`SafetensorsStreamWriter.write_at`,
    `copy_at`), so nothing waits on order and no data is handed between threads:

    * a row block of a LoRA-only tensor: read from the base mapping, merged in
      float32 into a reused buffer (`merge_rows_into`), rounded, written;
    * bf16 or float16 in and out with the fused C kernel: a CHUNK_BYTES piece of such a
      tensor's rows, merged and written block by block in one C call;
    * a CHUNK_BYTES piece of an untouched tensor: copied in the kernel.

    Tasks run on `workers` pool threads (kernels.dispatch.worker_pool,
    single-threaded torch ops), so page faults, compute and page-cache writes
    are spread over the cores. At most 4·workers tasks are queued; past that
    this thread runs the next task itself instead of waiting. Only workers + 1
    buffer sets exist, and a tensor's mapping lives until its last block is
    done: memory is a few blocks and tensors, whatever the model. `retire`
    takes finished tasks in submission order, raising their errors and
    reporting each tensor when its last task is done."""

    def __init__(self, workers: int):
        self.pool = worker_pool(workers)
        self.limit = 4 * workers  # with the fused path's longer tasks, 2·workers left the pool idle (5–7 % slower)
        self.in_flight: deque[tuple[Future, Callable[[], None] | None]] = deque()
        self.buffers: SimpleQueue[_BlockBuffers] = SimpleQueue()
        for _ in range(workers + 1):  # the pool's threads and this one
            self.buffers.put(_BlockBuffers())

    def merge_tasks(
        self, writer: SafetensorsStreamWriter, item: _PlannedTensor, base: torch.Tensor,
        written: Callable[[_PlannedTensor], None],
    ) -> list[Task]:
        out_dtype = TORCH_DTYPES[item.out_dtype]
        compute = torch.promote_types(torch.float32, out_dtype)
        W = base.reshape(base.shape[0], -1)
        rows, columns = W.shape
        offset = writer.claim(item.name, item.out_nbytes)
        if W.numel() == 0:
            written(item)
            return []
        factors = [_delta_factors(c) for c in item.contributions]
        Bs = [f[0] for f in factors]
        As, scales = fold_scales([f[1].to(compute) for f in factors], [f[2] for f in factors])  # once, not per block
        row_block = default_row_block(int(columns), STREAM_BLOCK_BYTES)
        row_bytes = columns * DTYPE_ITEMSIZE[item.out_dtype]
        if W.dtype == out_dtype and out_dtype in merge_cpu.FORMATS and W.is_contiguous() \
                and merge_cpu.available(out_dtype):
            # bf16 or float16 in and out (the common case): the fused C kernel merges and writes a whole piece
            # (about CHUNK_BYTES of output) per task, block by block, with the GIL released: the
            # torch path's bits at under half its compute, and no Python between blocks.
            B_cat, A_cat, bounds, scale_tensor = merge_cpu.concat_factors(Bs, As, scales)
            piece_rows = max(row_block, CHUNK_BYTES // row_bytes // row_block * row_block)

            def piece(start: int) -> None:
                stop = min(start + piece_rows, rows)
                buffers = self.buffers.get()
                try:
                    merge_cpu.merge_rows_to_file(
                        W[start:stop], B_cat[start:stop], A_cat, bounds, scale_tensor,
                        buffers.out(min(row_block, stop - start), columns, out_dtype),
                        writer.fileno(), offset + start * row_bytes,
                    )
                    writer.wrote(offset + start * row_bytes, (stop - start) * row_bytes)
                finally:
                    self.buffers.put(buffers)

            task, step = piece, piece_rows
        else:
            def block(start: int) -> None:
                stop = min(start + row_block, rows)
                buffers = self.buffers.get()
                try:
                    acc, tmp = buffers.views(stop - start, columns, compute)
                    weight = W[start:stop]
                    if weight.dtype != out_dtype:  # cast first, as from_pretrained(torch_dtype=…) would
                        weight = weight.to(out_dtype)
                    merge_rows_into(acc, weight, [B[start:stop] for B in Bs], As, scales, tmp)
                    merged = acc if out_dtype == compute else buffers.out(stop - start, columns, out_dtype).copy_(acc)
                    data = memoryview(merged.reshape(-1).view(torch.uint8).numpy())
                    writer.write_at(offset + start * row_bytes, data)
                finally:
                    self.buffers.put(buffers)

            task, step = block, row_block
        starts = range(0, rows, step)
        return [Task(partial(task, start), (min(start + step, rows) - start) * row_bytes,
                     (lambda: written(item)) if start == starts[-1] else None) for start in starts]

    def copy_tasks(
        self, writer: SafetensorsStreamWriter, item: _PlannedTensor, source_fd: int,
        written: Callable[[_PlannedTensor], None],
    ) -> list[Task]:
        """An untouched tensor, copied in the kernel in CHUNK_BYTES pieces by the same
        threads, so the copies overlap the merges instead of holding them up."""
        offset, nbytes = writer.claim(item.name, item.out_nbytes), item.out_nbytes

        def chunk(start: int) -> None:
            writer.copy_at(offset + start, source_fd, item.data_start + start, min(CHUNK_BYTES, nbytes - start))

        starts = range(0, nbytes, CHUNK_BYTES)
        if not starts:
            written(item)
        return [Task(partial(chunk, start), min(CHUNK_BYTES, nbytes - start),
                     (lambda: written(item)) if start == starts[-1] else None) for start in starts]

    def submit(self, task: Task) -> None:
        while self.in_flight and self.in_flight[0][0].done():
            self.retire()
        if len(self.in_flight) < self.limit:
            self.in_flight.append((self.pool.submit(task.run), task.then))
            return
        # Queue full: this thread runs the task itself rather than wait idle (on a
        # machine whose cores are shared, that is also one more thread's share of them).
        future: Future = Future()
        try:
            task.run()
            future.set_result(None)
        except Exception as error:  # raised by retire(), in order, like a pool task's
            future.set_exception(error)
        self.in_flight.append((future, task.then))  # retired in order, like the others

    def after(self, then: Callable[[], None]) -> None:
        """Run `then` (from retire) once every task submitted so far has finished."""
        done: Future = Future()
        done.set_result(None)
        self.in_flight.append((done, then))

    def retire(self) -> None:
        """Wait for the oldest task (raising its error) and run what follows it."""
        future, then = self.in_flight.popleft()
        future.result()
        if then is not None:
            then()

    def drain(self) -> None:
        while self.in_flight:
            self.retire()

    def cancel(self) -> None:
        """After a failure: drop queued tasks and wait for running ones, so nothing
        writes to a file after it is closed."""
        for future, _ in self.in_flight:
            future.cancel()
        for future, _ in self.in_flight:
            if not future.cancelled():
                future.exception()
        self.in_flight.clear()


class _BlockBuffers:
    """One worker's reused block buffers (grown to the largest block seen)."""

    def __init__(self) -> None:
        self._flat: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def _get(self, role: str, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
        flat = self._flat.get((role, dtype))
        if flat is None or flat.numel() < rows * columns:
            flat = self._flat[(role, dtype)] = torch.empty(rows * columns, dtype=dtype)
        return flat[: rows * columns].view(rows, columns)

    def views(self, rows: int, columns: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self._get("acc", rows, columns, dtype), self._get("tmp", rows, columns, dtype)

    def out(self, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
        return self._get("out", rows, columns, dtype)
