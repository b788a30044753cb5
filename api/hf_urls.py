"""Routes of the Hugging Face Hub-compatible API, at the root paths Hub clients use (see api/hf_compat.py)."""
from django.urls import re_path

from api import hf_compat

REPO = r"(?P<repo_id>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"
REVISION = r"(?P<revision>[^/]+)"

urlpatterns = [
    re_path(rf"^api/models/{REPO}/?$", hf_compat.ModelInfoView.as_view(), name="hf-model-info"),
    re_path(rf"^api/models/{REPO}/revision/{REVISION}/?$", hf_compat.ModelInfoView.as_view(),
            name="hf-model-info-revision"),
    re_path(rf"^api/models/{REPO}/tree/{REVISION}(?:/(?P<path>.*))?$", hf_compat.TreeView.as_view(), name="hf-tree"),
    re_path(rf"^{REPO}/resolve/{REVISION}/(?P<filename>.+)$", hf_compat.ResolveView.as_view(), name="hf-resolve"),
    re_path(r"^api/whoami-v2/?$", hf_compat.WhoAmIView.as_view(), name="hf-whoami"),
    # Uploads through the Hub protocol: refused with a clear 501 (README, "Hugging Face clients").
    re_path(r"^api/repos/create/?$", hf_compat.UploadNotSupportedView.as_view(), name="hf-create-repo"),
    re_path(rf"^api/models/{REPO}/(?:preupload|commit)/{REVISION}/?$", hf_compat.UploadNotSupportedView.as_view(),
            name="hf-commit"),
    re_path(rf"^{REPO}\.git/info/lfs/objects/batch$", hf_compat.UploadNotSupportedView.as_view(), name="hf-lfs-batch"),
]
