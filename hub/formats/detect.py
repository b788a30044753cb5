"""Which adapter format an upload is, and the one entry point that parses it.

Detection looks only at file names and, for a lone .safetensors file, at
its validated header's tensor names; no tensor data is read before the
format is known.
"""
from __future__ import annotations

from pathlib import Path

from .canonical import CanonicalAdapter
from .errors import FormatError
from .peft import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, parse_peft_adapter
from .safetensors_header import ADAPTER_DTYPES, normalise_upload_names, read_safetensors_header
from .single_file import classify_single_file, parse_single_file_adapter


def _single_safetensors(files: dict[str, Path]) -> str:
    candidates = sorted(name for name in files if name.lower().endswith(".safetensors"))
    if not candidates:
        raise FormatError(
            "unknown_format",
            "no adapter weights found: upload a PEFT adapter (adapter_config.json + adapter_model.safetensors) "
            "or a single LoRA .safetensors file.",
            None,
        )
    if len(candidates) > 1:
        raise FormatError(
            "unknown_format",
            f"several .safetensors files ({', '.join(candidates)}) without an adapter_config.json; "
            "a single-file LoRA is exactly one file.",
            None,
        )
    return candidates[0]


def detect_adapter_format(files: dict[str, Path]) -> str:
    """Return "peft", "kohya" or "diffusers"; FormatError for anything else."""
    files = normalise_upload_names(files)
    if ADAPTER_CONFIG_NAME in files:
        if ADAPTER_WEIGHTS_NAME not in files:
            raise FormatError(
                "missing_file",
                f"{ADAPTER_CONFIG_NAME} was uploaded without {ADAPTER_WEIGHTS_NAME}.",
                ADAPTER_WEIGHTS_NAME,
            )
        return "peft"
    if ADAPTER_WEIGHTS_NAME in files:
        raise FormatError(
            "missing_file", f"{ADAPTER_WEIGHTS_NAME} needs its {ADAPTER_CONFIG_NAME}.", ADAPTER_CONFIG_NAME
        )
    name = _single_safetensors(files)
    return classify_single_file(read_safetensors_header(files[name], allowed_dtypes=ADAPTER_DTYPES, filename=name))


def parse_adapter(
    files: dict[str, Path], *, base_shapes: dict[str, list[int]] | None = None
) -> CanonicalAdapter:
    """Parse and validate an uploaded adapter.

    files: uploaded file name → path on disk (other files such as README.md
        are allowed and ignored).
    base_shapes: the target base model's state-dict shapes; when given,
        module paths are renamed to the base's names and every module must
        fit its base weight.
    """
    files = normalise_upload_names(files)
    if detect_adapter_format(files) == "peft":
        return parse_peft_adapter(files[ADAPTER_CONFIG_NAME], files[ADAPTER_WEIGHTS_NAME], base_shapes=base_shapes)
    name = _single_safetensors(files)
    return parse_single_file_adapter(files[name], base_shapes=base_shapes, filename=name)
