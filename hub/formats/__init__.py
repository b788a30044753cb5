"""Parse and validate adapter and base-model uploads without executing them.

Nothing in this package imports Django: the web side calls

    parse_adapter(files, base_shapes=...)  -> CanonicalAdapter
    summarize_adapter(adapter)             -> dict (JSON-able)
    parse_base_model(files)                -> BaseModelInfo
    write_peft_adapter(adapter, out_dir)   -> [config path, weights path]

and catches FormatError (code, message, filename) for refusals.
"""
from .base_model import BaseModelInfo, parse_base_model
from .canonical import CanonicalAdapter, LoraModule, summarize_adapter
from .detect import detect_adapter_format, parse_adapter
from .errors import ERROR_CODES, FormatError
from .export import peft_config_for, write_peft_adapter
from .safetensors_header import (
    ADAPTER_DTYPES,
    BASE_MODEL_DTYPES,
    SafetensorsHeader,
    TensorEntry,
    read_safetensors_header,
    refuse_pickle,
)

__all__ = [
    "ADAPTER_DTYPES",
    "BASE_MODEL_DTYPES",
    "BaseModelInfo",
    "CanonicalAdapter",
    "ERROR_CODES",
    "FormatError",
    "LoraModule",
    "SafetensorsHeader",
    "TensorEntry",
    "detect_adapter_format",
    "parse_adapter",
    "parse_base_model",
    "peft_config_for",
    "read_safetensors_header",
    "refuse_pickle",
    "summarize_adapter",
    "write_peft_adapter",
]
