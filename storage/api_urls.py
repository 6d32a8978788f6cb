"""``/api/v1/`` routes of the folders and files API (docs/architecture.md); included by config/urls.py."""

from __future__ import annotations

from django.urls import path, register_converter

from storage import api


class AnyPathConverter:
    """Like ``<path:>`` but also matches a newline, so a bad name is refused by storage.fs with a sentence
    (a JSON 400), not by the URL resolver with an HTML 404."""

    regex = r"[\s\S]+"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(AnyPathConverter, "storagepath")

urlpatterns = [
    path("folders/", api.FolderListView.as_view(), name="folders"),
    path("folders/<uuid:folder_id>/", api.FolderDetailView.as_view(), name="folder-detail"),
    path("folders/<uuid:folder_id>/files/", api.FileListView.as_view(), name="folder-files"),
    # The raw-body PUT of this route is answered by storage.asgi before Django when wired in.
    path("folders/<uuid:folder_id>/files/<storagepath:path>", api.FileView.as_view(), name="folder-file"),
    path("folders/<uuid:folder_id>/mkdir/", api.MkdirView.as_view(), name="folder-mkdir"),
    path("folders/<uuid:folder_id>/move/", api.MoveView.as_view(), name="folder-move"),
    path("folders/<uuid:folder_id>/preview/", api.PreviewView.as_view(), name="folder-preview"),
    path("folders/<uuid:folder_id>/upload/", api.UploadView.as_view(), name="folder-upload"),
    path("folders/<uuid:folder_id>/launcher/", api.LauncherView.as_view(), name="folder-launcher"),
]
