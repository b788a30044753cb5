"""Per-module spectra of an uploaded revision: singular values and the norm of
each ΔW, computed from the factors (kernels.lowrank) by a worker and cached on
the revision for the adapter page and for weight-based search features; and the
adapter page's pictures of them (hub.plots), rendered here once per revision so
a page view never runs matplotlib."""
from __future__ import annotations

from django.db import transaction

from hub import plots
from hub.models import Job, Revision, RevisionPlot
from hub.selectors import load_revision_adapter
from hub.services.jobs import JobReporter, enqueue_job
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
        reporter.progress(0.8 * (index + 1) / len(parsed.modules), f"analysed {index + 1}/{len(parsed.modules)} modules")
    reporter.progress(0.85, "drawing plots")
    rendered = {kind: render(modules) for kind, render in plots.RENDERERS.items()}
    with transaction.atomic():  # a rerun replaces the plots: the same analysis, the same pictures
        revision.analysis = {"modules": modules}
        revision.save(update_fields=["analysis"])
        for kind, svg in rendered.items():
            RevisionPlot.objects.update_or_create(revision=revision, kind=kind, defaults={"svg": svg})
    return {"revision_id": revision.id, "modules": len(modules), "plots": sorted(rendered)}


def request_missing_analyses() -> int:
    """Queue the analysis of every revision that has no plots yet (e.g. analysed before the
    plots existed, or whose job failed); returns how many were queued."""
    missing = list(Revision.objects.filter(plots__isnull=True).select_related("created_by"))
    with transaction.atomic():  # the tasks are sent once every job row is committed
        for revision in missing:
            enqueue_job(kind=Job.Kind.ANALYZE, owner=revision.created_by, params={"revision_id": revision.id})
    return len(missing)
