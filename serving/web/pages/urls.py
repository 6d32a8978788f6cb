"""Pages of the serving app, mounted at /services/ (namespace ``serving``)."""

from __future__ import annotations

from serving.web.pages import chat, detail, gateway, services

app_name = "serving"
urlpatterns = [*services.urlpatterns, *gateway.urlpatterns, *detail.urlpatterns, *chat.urlpatterns]
