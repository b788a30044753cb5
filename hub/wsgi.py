import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hub.settings")
application = get_wsgi_application()

# One torch thread per web worker: query embedding is one short sentence, and on a few cores
# several workers each spawning a thread pool contend (21 ms vs 74 ms per query measured here).
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("QUIVER_WEB_TORCH_THREADS", 1)))
