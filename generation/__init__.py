"""Learned models over adapters.

- the weight encoder (`generation.weight_encoder`): maps a LoRA adapter's
  parameters (adapter → text space) into the sentence-embedding space of
  `generation.text_encoder`, so adapters with thin metadata are still found by
  a text query (the AutoLoRA idea);
- later, generators (text → adapter).

Pure torch (plus sentence-transformers for the text side): nothing in this
package imports Django.
"""
