from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from api.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("metrics", metrics_view, name="metrics"),  # Prometheus
    # Hugging Face Hub-compatible reads (/api/models/..., /{repo_id}/resolve/...) for HF_ENDPOINT clients.
    path("", include("api.hf_urls")),
    path("", include("frontend.urls")),  # the web pages, last: everything above keeps its prefix
]
