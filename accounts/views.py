from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from serving.models import Endpoint, Route


class LoginView(auth_views.LoginView):
    template_name = "accounts/login.html"
    redirect_authenticated_user = True


class LogoutView(auth_views.LogoutView):
    pass


@login_required
def home(request: HttpRequest) -> HttpResponse:
    services = (
        Endpoint.objects.visible_to(request.user)
        .live()
        .select_related("owner", "model_folder")
        .prefetch_related("routes")
    )
    rows = []
    for endpoint in services:
        routes = list(endpoint.routes.all())
        rows.append(
            {
                "endpoint": endpoint,
                "status": endpoint.compute_status(routes),
                "healthy": sum(1 for r in routes if r.status == Route.Status.HEALTHY),
            }
        )
    return render(request, "home.html", {"rows": rows})


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness of the web process and its database (for load balancers and `make run`)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})
