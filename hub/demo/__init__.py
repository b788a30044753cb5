"""Demo and test material built offline with PEFT / transformers from fixed
seeds: tiny base models, real adapters in every supported format, and the
catalog the demo registry is seeded from. No Django (see builders.py)."""
from .builders import (
    DEMO_ADAPTERS,
    DEMO_BASE_MODELS,
    DEMO_CATALOG,
    DEMO_NAMESPACE,
    build_demo_files,
    build_diffusers_lora,
    build_kohya_lora,
    build_minilm_base,
    build_peft_adapter,
    build_tiny_clip_text,
    build_tiny_llama,
    upload_files,
)

__all__ = [
    "DEMO_ADAPTERS",
    "DEMO_BASE_MODELS",
    "DEMO_CATALOG",
    "DEMO_NAMESPACE",
    "build_demo_files",
    "build_diffusers_lora",
    "build_kohya_lora",
    "build_minilm_base",
    "build_peft_adapter",
    "build_tiny_clip_text",
    "build_tiny_llama",
    "upload_files",
]
