from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from serving.web.api import snapshots, views

router = SimpleRouter(trailing_slash=True)
router.register("services", views.ServiceViewSet, basename="service")

urlpatterns = [
    path("services/<uuid:service_id>/tokens/", views.TokenListView.as_view(), name="service-tokens"),
    path(
        "services/<uuid:service_id>/tokens/<uuid:token_id>/",
        views.TokenDetailView.as_view(),
        name="service-token-detail",
    ),
    path("services/<uuid:service_id>/rules/", views.RuleListView.as_view(), name="service-rules"),
    path(
        "services/<uuid:service_id>/rules/<int:rule_id>/",
        views.RuleDetailView.as_view(),
        name="service-rule-detail",
    ),
    path(
        "services/<uuid:service_id>/routes/<uuid:route_id>/logs/",
        views.RouteLogsView.as_view(),
        name="service-route-logs",
    ),
    path("services/<uuid:service_id>/revisions/", views.RevisionListView.as_view(), name="service-revisions"),
    path(
        "services/<uuid:service_id>/revisions/rollback/",
        views.RevisionRollbackView.as_view(),
        name="service-revisions-rollback",
    ),
    path(
        "services/<uuid:service_id>/revisions/traffic/",
        views.RevisionTrafficView.as_view(),
        name="service-revisions-traffic",
    ),
    path(
        "services/<uuid:service_id>/revisions/<int:number>/",
        views.RevisionDetailView.as_view(),
        name="service-revision-detail",
    ),
    path(
        "services/<uuid:service_id>/revisions/<int:number>/promote/",
        views.RevisionPromoteView.as_view(),
        name="service-revision-promote",
    ),
    path("services/<uuid:service_id>/usage/", views.ServiceUsageView.as_view(), name="service-usage"),
    path("gateway-keys/", views.GatewayKeyListView.as_view(), name="gateway-keys"),
    path("gateway-keys/<uuid:gateway_key_id>/", views.GatewayKeyDetailView.as_view(), name="gateway-key-detail"),
    path("gateway-keys/<uuid:gateway_key_id>/usage/", views.GatewayKeyUsageView.as_view(), name="gateway-key-usage"),
    # A node's snapshot of a model folder (node key, not a user's): its manifest and its files.
    path("node/folders/<uuid:folder_id>/manifest/", snapshots.NodeManifestView.as_view(), name="node-folder-manifest"),
    path("node/folders/<uuid:folder_id>/files/<path:path>", snapshots.NodeFileView.as_view(), name="node-folder-file"),
    path("model-aliases/", views.ModelAliasListView.as_view(), name="model-aliases"),
    path("model-aliases/<uuid:alias_id>/", views.ModelAliasDetailView.as_view(), name="model-alias-detail"),
    path("runtimes/", views.RuntimeListView.as_view(), name="runtimes"),
    path("schemas/<str:schema>", views.DefinitionSchemaView.as_view(), name="definition-schema"),
    path("nodes/", views.NodeListView.as_view(), name="nodes"),
    path("presets/", views.PresetListView.as_view(), name="presets"),
    *router.urls,
]
