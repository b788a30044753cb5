"""Web pages, mounted at / (the API lives under /api/)."""
from django.contrib.auth import views as auth_views
from django.urls import path

from frontend import views

app_name = "frontend"

ADAPTER = "adapters/<str:namespace>/<str:name>/"

urlpatterns = [
    path("", views.adapter_list, name="adapters"),
    path(ADAPTER, views.adapter_detail, name="adapter"),
    path(ADAPTER + "plots/<slug:kind>.svg", views.adapter_plot, name="adapter-plot"),
    path("upload/", views.upload, name="upload"),
    path("compose/", views.compose, name="compose"),
    path("merge/", views.merge, name="merge"),
    path("merges/<str:merge_id>/delete/", views.merge_delete, name="merge-delete"),
    path("generate/", views.generate, name="generate"),
    path("jobs/", views.job_list, name="jobs"),
    path("jobs/<uuid:job_id>/", views.job_detail, name="job"),
    path("account/tokens/", views.api_tokens, name="tokens"),
    path("account/sign-in/", auth_views.LoginView.as_view(template_name="frontend/sign_in.html"), name="sign-in"),
    path("account/sign-out/", auth_views.LogoutView.as_view(), name="sign-out"),
]
