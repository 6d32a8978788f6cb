from __future__ import annotations

from django.urls import path

from accounts import api

urlpatterns = [
    path("me/", api.MeView.as_view(), name="me"),
    path("me/api-keys/", api.ApiKeyListView.as_view(), name="api-keys"),
    path("me/api-keys/<int:key_id>/", api.ApiKeyDetailView.as_view(), name="api-key-detail"),
]
