"""REST API v1. Views are thin: parse input, call a service or selector, shape output."""
from __future__ import annotations

from django.db import connection
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from api import serializers as s
from api.downloads import blob_download_response
from hub import search, selectors
from hub.services import compositions, generations
from kernels.compose import METHODS
from hub.services import adapters as adapter_services
from hub.services import base_models as base_model_services
from hub.services import jobs as job_services
from hub.services.files import incoming_uploads
from workers import app as celery_app

ADAPTER_FILTERS = ["base_model", "format", "tag", "license", "owner", "q"]


# A public list that signed-in users add to by a multipart upload (files + metadata). A comment, not a
# docstring: drf-spectacular would take a docstring for every subclass's operation description.
class UploadListCreateView(generics.GenericAPIView):
    parser_classes = [MultiPartParser]

    def get_permissions(self):
        return [IsAuthenticated()] if self.request.method == "POST" else [AllowAny()]

    @staticmethod
    def validated_upload(request, form_class) -> tuple[dict, list]:
        """The upload form's validated metadata (without its files) and the uploaded files, for a service."""
        form = form_class(data=request.data)
        form.is_valid(raise_exception=True)
        fields = {key: value for key, value in form.validated_data.items() if key != "files"}
        return fields, incoming_uploads(request.FILES.getlist("files"))


class AdapterListCreateView(UploadListCreateView):
    serializer_class = s.AdapterListSerializer

    @extend_schema(
        parameters=[OpenApiParameter(name, str, description=f"filter by {name}") for name in ADAPTER_FILTERS],
        responses=s.AdapterListSerializer(many=True),
    )
    def get(self, request):
        filters = {name: request.query_params.get(name) or None for name in ADAPTER_FILTERS}
        page = self.paginate_queryset(selectors.adapter_list(request.user, **filters).values_list("id", flat=True))
        listings = selectors.adapter_listings(request.user, page)
        # An adapter deleted since the page was read is left out.
        return self.get_paginated_response([s.listing_data(listings[i], request) for i in page if i in listings])

    @extend_schema(request=s.AdapterUploadSerializer, responses={201: s.AdapterSerializer})
    def post(self, request):
        fields, files = self.validated_upload(request, s.AdapterUploadSerializer)
        revision = adapter_services.upload_adapter(user=request.user, files=files, **fields)
        return Response(s.AdapterSerializer(revision.adapter, context={"request": request}).data, status=status.HTTP_201_CREATED)


class AdapterDetailView(APIView):
    serializer_class = s.AdapterSerializer

    @extend_schema(responses=s.AdapterSerializer)
    def get(self, request, namespace, name):
        adapter = selectors.get_adapter(request.user, namespace, name)
        return Response(s.AdapterSerializer(adapter, context={"request": request}).data)

    @extend_schema(request=s.AdapterUpdateSerializer, responses=s.AdapterSerializer)
    def patch(self, request, namespace, name):
        adapter = selectors.get_adapter(request.user, namespace, name)
        form = s.AdapterUpdateSerializer(data=request.data, partial=True)
        form.is_valid(raise_exception=True)
        adapter = adapter_services.update_adapter(user=request.user, adapter=adapter, **form.validated_data)
        return Response(s.AdapterSerializer(adapter, context={"request": request}).data)

    @extend_schema(responses={204: None})
    def delete(self, request, namespace, name):
        adapter = selectors.get_adapter(request.user, namespace, name)
        adapter_services.delete_adapter(user=request.user, adapter=adapter)
        return Response(status=status.HTTP_204_NO_CONTENT)


class AdapterRevisionListView(APIView):
    @extend_schema(responses=s.RevisionSerializer(many=True))
    def get(self, request, namespace, name):
        adapter = selectors.get_adapter(request.user, namespace, name)
        revisions = adapter.revisions.select_related("adapter").all()
        return Response(s.RevisionSerializer(revisions, many=True, context={"request": request}).data)


class AdapterSimilarView(APIView):
    @extend_schema(parameters=[s.SimilarQuerySerializer], responses=s.SearchResponseSerializer)
    def get(self, request, namespace, name):
        adapter = selectors.get_adapter(request.user, namespace, name)
        form = s.SimilarQuerySerializer(data=request.query_params)
        form.is_valid(raise_exception=True)
        matches = search.similar_matches(request.user, adapter, k=form.validated_data["k"])
        return Response({"query": adapter.full_name, "results": listed_matches(request, matches)})


class SearchView(APIView):
    """Adapters for a task described in words, best first (see hub/search.py for the fusion rule)."""

    @extend_schema(parameters=[s.SearchQuerySerializer], responses=s.SearchResponseSerializer)
    def get(self, request):
        form = s.SearchQuerySerializer(data=request.query_params)
        form.is_valid(raise_exception=True)
        params = dict(form.validated_data)
        query = params.pop("q")
        matches = search.search_matches(request.user, query, **params)
        return Response({"query": query, "results": listed_matches(request, matches)})


def listed_matches(request, matches: list) -> list[dict]:
    """Search or "more like this" matches with their adapters' listings, as SearchHitSerializer writes them."""
    listings = selectors.adapter_listings(request.user, [adapter_id for adapter_id, _, _ in matches])
    return s.search_results(matches, listings, request)


class AdapterFileView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("revision", str, description="revision number or commit id; default: latest")],
        responses={(200, "application/octet-stream"): OpenApiTypes.BINARY, (206, "application/octet-stream"): OpenApiTypes.BINARY},
    )
    def get(self, request, namespace, name, filename):
        adapter = selectors.get_adapter(request.user, namespace, name)
        revision = selectors.get_revision(adapter, request.query_params.get("revision"))
        stored = selectors.get_stored_file(revision.files, filename, f"Revision {revision.number}")
        return blob_download_response(
            request, sha256=stored.sha256, size=stored.size, filename=filename,
            extra_headers={"X-Quiver-Revision": str(revision.number), "X-Quiver-Commit": revision.commit},
        )


class AdapterManifestView(APIView):
    """What a download of one revision is pinned to: adapter revision, base model revision, file hashes."""

    @extend_schema(parameters=[OpenApiParameter("revision", str, description="revision number or commit id; default: latest")],
                   responses=s.ManifestSerializer)
    def get(self, request, namespace, name):
        adapter = selectors.get_adapter(request.user, namespace, name)
        revision = selectors.get_revision(adapter, request.query_params.get("revision"))
        context = {"request": request, "file_url": s.adapter_file_url(adapter, revision)}
        return Response(s.ManifestSerializer(selectors.download_manifest(adapter, revision), context=context).data)


class AdapterByHashView(APIView):
    """Which adapters (and revisions) hold a file with these bytes: find an adapter from a file you have."""

    @extend_schema(responses=s.ByHashResponseSerializer)
    def get(self, request, sha256):
        holders = selectors.revisions_holding_file(request.user, sha256)
        return Response({"sha256": sha256.lower(), "matches": s.FileHolderSerializer(holders, many=True).data})


class AdapterUpdatesView(APIView):
    """Bulk check for updates: many namespace/name@revision in, newer revisions out."""

    permission_classes = [AllowAny]  # a read, sent as POST because the list can be long

    @extend_schema(request=s.UpdateCheckRequestSerializer, responses=s.UpdateCheckResponseSerializer)
    def post(self, request):
        form = s.UpdateCheckRequestSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        return Response({"results": selectors.adapter_updates(request.user, form.validated_data["adapters"])})


class ComposeMethodListView(APIView):
    """Every composition method, and whether its result is exact or approximate."""

    @extend_schema(responses=s.ComposeMethodSerializer(many=True))
    def get(self, request):
        return Response(s.ComposeMethodSerializer(METHODS.values(), many=True).data)


class JobRequestView(APIView):
    """POST a request body → the service starts a job → 202 with the job (200 when a stored
    result is reused, e.g. an identical merge)."""

    permission_classes = [IsAuthenticated]
    request_serializer: type
    service = None

    def post(self, request):
        form = self.request_serializer(data=request.data)
        form.is_valid(raise_exception=True)
        job = type(self).service(user=request.user, **form.validated_data)
        reused = job.state == job.State.SUCCEEDED
        return Response(s.JobSerializer(job).data, status=status.HTTP_200_OK if reused else status.HTTP_202_ACCEPTED)


@extend_schema(request=s.CompositionRequestSerializer, responses={202: s.JobSerializer})
class CompositionCreateView(JobRequestView):
    request_serializer = s.CompositionRequestSerializer
    service = compositions.request_composition


class MergeListCreateView(JobRequestView):
    request_serializer = s.MergeRequestSerializer
    service = compositions.request_merge

    @extend_schema(request=s.MergeRequestSerializer, responses={202: s.JobSerializer, 200: s.JobSerializer})
    def post(self, request):
        return super().post(request)

    @extend_schema(responses=s.MergeSummarySerializer(many=True), description=(
        "The stored merges you made (staff: all), most recently used first, with their size and expiry; "
        "`limit`/`offset` pages."))
    def get(self, request):
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(selectors.merge_list(request.user), request, view=self)
        return paginator.get_paginated_response([selectors.merge_summary(checkpoint) for checkpoint in page])


@extend_schema(request=s.GenerationRequestSerializer, responses={202: s.JobSerializer})
class GenerationCreateView(JobRequestView):
    request_serializer = s.GenerationRequestSerializer
    service = generations.request_generation


class GeneratorListCreateView(APIView):
    """Trained generators (GET, filter ?base_model=), and training requests (POST, base owner or staff)."""

    def get_permissions(self):
        return [IsAuthenticated()] if self.request.method == "POST" else [AllowAny()]

    @extend_schema(parameters=[OpenApiParameter("base_model", str)], responses=s.GeneratorArtifactSerializer(many=True))
    def get(self, request):
        artifacts = selectors.generator_list(base_model=request.query_params.get("base_model"))
        return Response(s.GeneratorArtifactSerializer(artifacts, many=True, context={"request": request}).data)

    @extend_schema(request=s.GeneratorTrainingRequestSerializer, responses={202: s.JobSerializer(many=True)})
    def post(self, request):
        form = s.GeneratorTrainingRequestSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        jobs = generations.request_generator_training(user=request.user, **form.validated_data)
        return Response(s.JobSerializer(jobs, many=True).data, status=status.HTTP_202_ACCEPTED)


class MergeDetailView(APIView):
    def get_permissions(self):
        return [IsAuthenticated()] if self.request.method == "DELETE" else [AllowAny()]

    @extend_schema(responses=s.MergedCheckpointSerializer)
    def get(self, request, merge_id):
        checkpoint = selectors.get_merged_checkpoint(request.user, merge_id)
        return Response({**compositions.merged_files_result(checkpoint), **selectors.merge_retention(checkpoint)})

    @extend_schema(responses={204: None}, description=(
        "Remove a stored merge now (whoever made it, or staff); its bytes go with the orphan sweep. "
        "Requesting the same merge again makes it again."))
    def delete(self, request, merge_id):
        compositions.delete_merge(user=request.user, checkpoint=selectors.get_merged_checkpoint(request.user, merge_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class MergeFileView(APIView):
    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY})
    def get(self, request, merge_id, filename):
        checkpoint = selectors.get_merged_checkpoint(request.user, merge_id)
        stored = selectors.get_stored_file(checkpoint.files, filename, f"Merge {merge_id}")
        compositions.mark_merge_downloaded(merge_id)
        return blob_download_response(request, sha256=stored.sha256, size=stored.size, filename=filename)


class BaseModelListCreateView(UploadListCreateView):
    serializer_class = s.BaseModelListSerializer

    @extend_schema(responses=s.BaseModelListSerializer(many=True))
    def get(self, request):
        page = self.paginate_queryset(selectors.base_model_list())
        return self.get_paginated_response(s.BaseModelListSerializer(page, many=True, context={"request": request}).data)

    @extend_schema(request=s.BaseModelUploadSerializer, responses={201: s.BaseModelSerializer})
    def post(self, request):
        fields, files = self.validated_upload(request, s.BaseModelUploadSerializer)
        base = base_model_services.register_base_model(user=request.user, files=files, **fields)
        return Response(s.BaseModelSerializer(base, context={"request": request}).data, status=status.HTTP_201_CREATED)


class BaseModelDetailView(APIView):
    @extend_schema(responses=s.BaseModelSerializer)
    def get(self, request, namespace, name):
        base = selectors.get_base_model(f"{namespace}/{name}")
        return Response(s.BaseModelSerializer(base, context={"request": request}).data)


class BaseModelFileView(APIView):
    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY})
    def get(self, request, namespace, name, filename):
        base = selectors.get_base_model(f"{namespace}/{name}")
        stored = selectors.get_stored_file(base.files, filename, base.full_name)
        return blob_download_response(request, sha256=stored.sha256, size=stored.size, filename=filename)


class JobListView(generics.GenericAPIView):
    permission_classes = [IsAuthenticated]
    serializer_class = s.JobSerializer

    @extend_schema(parameters=[s.JobFilterSerializer], responses=s.JobSerializer(many=True), description=(
        "The jobs you started, newest first; filters `state` and `kind`; `limit`/`offset` pages."))
    def get(self, request):
        filters = s.JobFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        page = self.paginate_queryset(selectors.job_list(request.user, **filters.validated_data))
        return self.get_paginated_response(s.JobSerializer(page, many=True).data)


class JobDetailView(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(responses=s.JobSerializer)
    def get(self, request, job_id):
        return Response(s.JobSerializer(selectors.get_job(request.user, job_id)).data)


class JobCancelView(APIView):
    """Cancel a queued or running job (its owner, or staff): 200 with the job, now `cancelled`;
    409 `job_finished` once it has ended."""

    permission_classes = [IsAuthenticated]

    @extend_schema(request=None, responses={200: s.JobSerializer})
    def post(self, request, job_id):
        return Response(s.JobSerializer(job_services.cancel_job(user=request.user, job_id=job_id)).data)


class HealthView(APIView):
    """Liveness of the two things every request depends on."""

    permission_classes = [AllowAny]
    authentication_classes = []
    throttle_classes = []  # probes (load balancers, orchestrators) must never be refused for their rate

    @extend_schema(responses={200: s.HealthSerializer, 503: s.HealthSerializer})
    def get(self, request):
        checks = {"database": _check(_database_ok), "broker": _check(_broker_ok)}
        healthy = all(value == "ok" for value in checks.values())
        return Response({"status": "ok" if healthy else "unavailable", **checks},
                        status=status.HTTP_200_OK if healthy else status.HTTP_503_SERVICE_UNAVAILABLE)


def _database_ok() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _broker_ok() -> None:
    with celery_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _check(probe) -> str:
    try:
        probe()
    except Exception as error:  # reported, not raised: this endpoint exists to say what is down
        return f"error: {type(error).__name__}"
    return "ok"
