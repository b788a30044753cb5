"""The single error type every parser in `hub.formats` raises.

Uploads are untrusted, so every refusal carries a stable machine code (the
API and the UI switch on it) and a sentence a person can act on that names
the file and, where there is one, the tensor.
"""
from __future__ import annotations

# Every code a parser may raise. Keeping the list closed catches typos in
# codes early (FormatError refuses unknown ones) and documents the contract
# with the Django side in one place.
ERROR_CODES: frozenset[str] = frozenset(
    {
        # file-level safety
        "pickle_refused",  # pickle / torch.save content or file name
        "empty_file",  # zero bytes
        "truncated_file",  # shorter than its header says
        "missing_file",  # a required companion file was not uploaded
        "duplicate_file",  # two uploads with the same base name
        # safetensors header
        "header_too_large",  # declared header length above the cap
        "header_out_of_bounds",  # declared header length past end of file
        "invalid_header",  # header is not the JSON object the spec requires
        "bad_offsets",  # data_offsets malformed, wrong size, gaps, trailing bytes
        "overlapping_offsets",  # two tensors share bytes
        "dtype_not_allowed",  # dtype outside the allow-list
        # tensor values / shapes
        "non_finite",  # NaN or ±Inf in a tensor
        "shape_mismatch",  # A/B or base-model shapes disagree, module not in base
        "rank_mismatch",  # A rows ≠ B columns, or ≠ configured rank
        "missing_tensor",  # lora_A without lora_B (or the reverse)
        "unexpected_tensor",  # a tensor the format does not define
        # configs / formats
        "unknown_format",  # not an adapter / base model we understand
        "invalid_config",  # adapter_config.json / config.json fails the schema
        "invalid_index",  # model.safetensors.index.json disagrees with shards
        "unsupported_peft_type",  # peft_type other than LORA, LyCORIS files
        "unsupported_feature",  # a LoRA option whose ΔW is not s·B@A
    }
)


class FormatError(Exception):
    """A refused upload.

    code: snake_case machine code from ERROR_CODES.
    message: a sentence for people, naming the file (and tensor).
    filename: the uploaded file's name the problem is in, if any.
    """

    def __init__(self, code: str, message: str, filename: str | None = None):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown FormatError code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.filename = filename

    def to_dict(self) -> dict:
        """JSON-able form for API error responses."""
        return {"code": self.code, "message": self.message, "filename": self.filename}

    def __repr__(self) -> str:
        return f"FormatError({self.code!r}, {self.message!r}, filename={self.filename!r})"
