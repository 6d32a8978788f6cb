from __future__ import annotations

from django.urls import path

from storage import api

urlpatterns = [
    path("folders/", api.FolderListView.as_view(), name="folders"),
    path("folders/<uuid:folder_id>/", api.FolderDetailView.as_view(), name="folder-detail"),
]
