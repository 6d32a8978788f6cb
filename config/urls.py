from __future__ import annotations

from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.utils.translation import gettext_lazy
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from accounts import views as account_views
from serving.web import metrics

urlpatterns = [
    path("", account_views.home, name="home"),
    path("accounts/login/", account_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", account_views.LogoutView.as_view(), name="logout"),
    path("i18n/", include("django.conf.urls.i18n")),
    path("admin/", admin.site.urls),
    path("folders/", include("storage.urls")),
    path("services/", include("serving.web.pages.urls")),
    path("healthz", account_views.healthz, name="healthz"),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("metrics/sd", metrics.service_discovery, name="metrics-sd"),
    path("readyz", account_views.readyz, name="readyz"),
    # Browsers ask for it on every page, the admin's included (a 404 in their console otherwise).
    path("favicon.ico", RedirectView.as_view(url=static("img/favicon.svg"), permanent=True), name="favicon"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/v1/", include("accounts.api_urls")),
    path("api/v1/", include("serving.web.api.urls")),
    path("api/v1/", include("storage.api_urls")),
]

handler404 = "config.api.not_found"

admin.site.site_header = gettext_lazy("modelserve operations")
admin.site.site_title = "modelserve"
