"""The LoRA zoo: a family of related text-classification tasks built from texts
that `faker` generates, one PEFT LoRA per task on a MiniLM classifier. It is the
hub's demo population for generation and the benchmark data for retrieval and
generation. No Django, no downloads.

    tasks.py  the task family, its paraphrases and its held-out splits
    data.py   labelled texts per task (faker, seeded)
    model.py  the base: MiniLM + mean pooling + a frozen seeded head
    build.py  train, evaluate and save the adapters (resumable)
"""
