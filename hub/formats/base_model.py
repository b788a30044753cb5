"""Base models: config.json + model.safetensors, or sharded safetensors with
model.safetensors.index.json.

Base models can be many GB, so only headers are read: shapes and dtypes
come from the validated safetensors headers, never from tensor data (and
values are not scanned for NaN here).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FormatError
from .safetensors_header import (
    BASE_MODEL_DTYPES,
    SafetensorsHeader,
    normalise_upload_names,
    read_json_object,
    read_safetensors_header,
)

CONFIG_NAME = "config.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Optional: unlabelled inputs typical of the base model's domain, {"texts": [...]}. Generators
# of a base model the hub can run train in function space on them (generation/functional.py).
PROBE_TEXTS_NAME = "probe_texts.json"
MAX_PROBE_TEXTS = 20_000
MAX_PROBE_TEXT_CHARS = 2_000
SHARD_NAME = re.compile(r"^model-(?P<index>\d+)-of-(?P<total>\d+)\.safetensors$")


@dataclass
class BaseModelInfo:
    """What the hub records about an uploaded base model."""

    architecture: str  # config["architectures"][0], else model_type
    model_type: str
    config: dict
    shapes: dict[str, list[int]]  # state-dict name → shape
    dtype: str  # torch name of the dtype holding most parameters, e.g. "float32"
    parameter_count: int  # total elements over all stored tensors
    weight_files: list[str] = field(default_factory=list)  # safetensors files, shard order


def validate_model_config(config: dict, filename: str = CONFIG_NAME) -> None:
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise FormatError("invalid_config", f"{filename}: model_type must be a non-empty string.", filename)
    architectures = config.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list) or not architectures or not all(isinstance(a, str) for a in architectures)
    ):
        raise FormatError("invalid_config", f"{filename}: architectures must be a non-empty list of strings.", filename)


def _shard_files(names: list[str]) -> list[str]:
    """Shard names in order, checking the numbering is complete (1..N of N)."""
    shards = {name: SHARD_NAME.match(name) for name in names if SHARD_NAME.match(name)}
    totals = {int(match["total"]) for match in shards.values()}
    if len(totals) > 1:
        raise FormatError(
            "invalid_index", f"shards disagree on the shard count ({', '.join(sorted(shards))}).", None
        )
    total = totals.pop()
    present = {int(match["index"]) for match in shards.values()}
    missing = sorted(set(range(1, total + 1)) - present)
    if missing:
        raise FormatError(
            "missing_file", f"shard(s) {', '.join(str(i) for i in missing)} of {total} were not uploaded.", None
        )
    if len(present) != len(shards) or max(present) > total:
        raise FormatError("invalid_index", f"shard names do not number 1..{total} exactly once.", None)
    return sorted(shards, key=lambda name: int(shards[name]["index"]))


def _check_index(index: dict, headers: list[SafetensorsHeader]) -> None:
    """The index must describe the uploaded shards exactly: every tensor in
    exactly one shard, the one weight_map names, and every shard used."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise FormatError("invalid_index", f"{INDEX_NAME}: weight_map must map tensor names to shard files.", INDEX_NAME)
    shard_names = {header.filename for header in headers}
    referenced = set(weight_map.values())
    if referenced - shard_names:
        raise FormatError(
            "missing_file",
            f"{INDEX_NAME} references {', '.join(sorted(referenced - shard_names))}, which was not uploaded.",
            INDEX_NAME,
        )
    if shard_names - referenced:
        raise FormatError(
            "invalid_index",
            f"{INDEX_NAME} does not reference the uploaded shard(s) {', '.join(sorted(shard_names - referenced))}.",
            INDEX_NAME,
        )
    location: dict[str, str] = {}
    for header in headers:
        for tensor in header.tensors:
            if tensor in location:
                raise FormatError(
                    "invalid_index",
                    f"tensor '{tensor}' is stored in both {location[tensor]} and {header.filename}.",
                    header.filename,
                )
            location[tensor] = header.filename
            if weight_map.get(tensor) != header.filename:
                where = weight_map.get(tensor)
                raise FormatError(
                    "invalid_index",
                    f"{header.filename} holds tensor '{tensor}' but {INDEX_NAME} "
                    + (f"places it in {where}." if where else "does not list it."),
                    header.filename,
                )
    unlisted = sorted(set(weight_map) - set(location))
    if unlisted:
        raise FormatError(
            "invalid_index",
            f"{INDEX_NAME} lists tensor '{unlisted[0]}' in {weight_map[unlisted[0]]}, which does not contain it.",
            INDEX_NAME,
        )


def parse_base_model(files: dict[str, Path]) -> BaseModelInfo:
    """Validate an uploaded base model and describe it, reading headers only."""
    files = normalise_upload_names(files)
    if CONFIG_NAME not in files:
        raise FormatError("missing_file", f"a base model needs a {CONFIG_NAME}.", CONFIG_NAME)
    config = read_json_object(files[CONFIG_NAME], CONFIG_NAME)
    validate_model_config(config)

    shard_names = [name for name in files if SHARD_NAME.match(name)]
    if shard_names and SINGLE_WEIGHTS_NAME in files:
        raise FormatError(
            "unknown_format", f"upload either {SINGLE_WEIGHTS_NAME} or sharded model-*-of-*.safetensors, not both.", None
        )
    if shard_names:
        if INDEX_NAME not in files:
            raise FormatError("missing_file", f"sharded weights need their {INDEX_NAME}.", INDEX_NAME)
        weight_files = _shard_files(shard_names)
    elif SINGLE_WEIGHTS_NAME in files:
        weight_files = [SINGLE_WEIGHTS_NAME]
    else:
        raise FormatError(
            "missing_file", f"no weights found: upload {SINGLE_WEIGHTS_NAME} or model-0000N-of-0000M.safetensors.", None
        )

    headers = [
        read_safetensors_header(files[name], allowed_dtypes=BASE_MODEL_DTYPES, filename=name) for name in weight_files
    ]
    if shard_names:
        _check_index(read_json_object(files[INDEX_NAME], INDEX_NAME, code="invalid_index"), headers)

    entries = [entry for header in headers for entry in header.tensors.values()]
    if not entries:
        raise FormatError("missing_tensor", f"{weight_files[0]} contains no tensors.", weight_files[0])
    elements_by_dtype: dict[str, int] = {}
    for entry in entries:
        elements_by_dtype[entry.torch_dtype] = elements_by_dtype.get(entry.torch_dtype, 0) + entry.numel
    if PROBE_TEXTS_NAME in files:
        read_probe_texts(files[PROBE_TEXTS_NAME])
    architectures = config.get("architectures") or [config["model_type"]]
    return BaseModelInfo(
        architecture=architectures[0],
        model_type=config["model_type"],
        config=config,
        shapes={entry.name: list(entry.shape) for entry in entries},
        dtype=max(elements_by_dtype, key=elements_by_dtype.get),
        parameter_count=sum(entry.numel for entry in entries),
        weight_files=weight_files,
    )


def read_probe_texts(path: Path) -> list[str]:
    """The texts of a probe_texts.json, refused unless it is {"texts": [1 to 20 000 non-empty strings]}."""
    value = read_json_object(path, PROBE_TEXTS_NAME, max_bytes=64 * 1024 * 1024)
    texts = value.get("texts")
    if (not isinstance(texts, list) or not 1 <= len(texts) <= MAX_PROBE_TEXTS
            or not all(isinstance(t, str) and 0 < len(t.strip()) and len(t) <= MAX_PROBE_TEXT_CHARS for t in texts)):
        raise FormatError("invalid_config", f'{PROBE_TEXTS_NAME} must be {{"texts": [...]}} with 1 to {MAX_PROBE_TEXTS} '
                                            f"non-empty strings of at most {MAX_PROBE_TEXT_CHARS} characters.",
                          PROBE_TEXTS_NAME)
    return texts
