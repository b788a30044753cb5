"""Per-module spectra of an uploaded revision: singular values and the norm of
each ΔW, computed from the factors (kernels.lowrank) by a worker and cached on
the revision for the adapter page and for weight-based search features."""
from __future__ import annotations

from hub.models import Job, Revision
from hub.selectors import load_revision_adapter
from hub.services.jobs import JobReporter
from kernels.lowrank import singular_values


def analyze_revision_job(job: Job, reporter: JobReporter) -> dict:
    revision = Revision.objects.get(id=job.params["revision_id"])
    reporter.progress(0.0, "reading tensors")
    parsed = load_revision_adapter(revision)
    modules = {}
    for index, (module_path, module) in enumerate(sorted(parsed.modules.items())):
        spectrum = singular_values(module.B, module.A, module.scale)
        modules[module_path] = {
            "singular_values": [round(float(value), 6) for value in spectrum],
            "norm": float(spectrum.norm()),
            "rank": module.rank,
        }
        reporter.progress((index + 1) / len(parsed.modules), f"analysed {index + 1}/{len(parsed.modules)} modules")
    revision.analysis = {"modules": modules}
    revision.save(update_fields=["analysis"])
    return {"revision_id": revision.id, "modules": len(modules)}
