import atexit
import gc
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hub.settings")
# One query at a time per process: the tokenizer's thread pool would only be a hazard after
# gunicorn forks its workers from this process (gunicorn.conf.py preloads the app).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
application = get_wsgi_application()

# One torch thread per web worker: query embedding is one short sentence, and on a few cores
# several workers each spawning a thread pool contend (21 ms vs 74 ms per query measured here).
# Set before any torch op, so no OpenMP pool exists when gunicorn forks.
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("QUIVER_WEB_TORCH_THREADS", 1)))

from hub.services.embeddings import warm_query_encoder  # noqa: E402

# Loads the encoder (and its bfloat16 copy) and builds its kernels for every query length now,
# not in the first searches of each worker.
warm_query_encoder()
# Everything loaded so far lives as long as the process: the collector need not walk it again,
# and (preloaded) its pages stay shared with the workers instead of being touched by every collection.
gc.freeze()
# Until exit: the interpreter's last collection must see them again, or native bindings still
# holding objects (Triton's nanobind, imported by torch._dynamo) print a ~30-line leak report from
# every process on each shutdown.
atexit.register(gc.unfreeze)
