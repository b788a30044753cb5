from django.urls import path, re_path

from api import views

NAME = r"(?P<namespace>[A-Za-z0-9][A-Za-z0-9._-]*)/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)"

urlpatterns = [
    path("adapters/", views.AdapterListCreateView.as_view(), name="adapter-list"),
    # Before the detail route, which "by-hash/<sha256>/" would also match.
    re_path(r"^adapters/by-hash/(?P<sha256>[^/]+)/?$", views.AdapterByHashView.as_view(), name="adapter-by-hash"),
    re_path(r"^adapters/updates/?$", views.AdapterUpdatesView.as_view(), name="adapter-updates"),
    re_path(rf"^adapters/{NAME}/$", views.AdapterDetailView.as_view(), name="adapter-detail"),
    re_path(rf"^adapters/{NAME}/manifest$", views.AdapterManifestView.as_view(), name="adapter-manifest"),
    re_path(rf"^adapters/{NAME}/similar$", views.AdapterSimilarView.as_view(), name="adapter-similar"),
    path("search", views.SearchView.as_view(), name="search"),
    re_path(rf"^adapters/{NAME}/revisions/$", views.AdapterRevisionListView.as_view(), name="adapter-revisions"),
    re_path(rf"^adapters/{NAME}/files/(?P<filename>[^/]+)$", views.AdapterFileView.as_view(), name="adapter-file"),
    path("base-models/", views.BaseModelListCreateView.as_view(), name="base-model-list"),
    re_path(rf"^base-models/{NAME}/$", views.BaseModelDetailView.as_view(), name="base-model-detail"),
    re_path(rf"^base-models/{NAME}/files/(?P<filename>[^/]+)$", views.BaseModelFileView.as_view(), name="base-model-file"),
    path("compose-methods/", views.ComposeMethodListView.as_view(), name="compose-methods"),
    path("compositions/", views.CompositionCreateView.as_view(), name="composition-create"),
    path("merges/", views.MergeListCreateView.as_view(), name="merge-list"),
    re_path(r"^merges/(?P<merge_id>[0-9a-f]{64})/$", views.MergeDetailView.as_view(), name="merge-detail"),
    re_path(r"^merges/(?P<merge_id>[0-9a-f]{64})/files/(?P<filename>[^/]+)$", views.MergeFileView.as_view(),
            name="merge-file"),
    path("generations/", views.GenerationCreateView.as_view(), name="generation-create"),
    path("generators/", views.GeneratorListCreateView.as_view(), name="generator-list"),
    path("jobs/", views.JobListView.as_view(), name="job-list"),
    path("jobs/<uuid:job_id>/", views.JobDetailView.as_view(), name="job-detail"),
    path("jobs/<uuid:job_id>/cancel/", views.JobCancelView.as_view(), name="job-cancel"),
    path("health", views.HealthView.as_view(), name="health"),
]
