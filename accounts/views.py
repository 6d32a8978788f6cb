from __future__ import annotations

import unicodedata
from typing import Any

import redis
from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import AuthenticationForm
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.utils.translation import gettext
from django.views.decorators.http import require_GET

from accounts.ratelimit import FailureLimiter, client_address


def login_limiter() -> FailureLimiter:
    return FailureLimiter("login", settings.LOGIN_FAILURE_LIMIT, settings.LOGIN_FAILURE_WINDOW)


def username_limiter() -> FailureLimiter:
    return FailureLimiter("login-username", settings.LOGIN_USERNAME_FAILURE_LIMIT, settings.LOGIN_FAILURE_WINDOW)


class LoginView(auth_views.LoginView):
    """Django's login, with failed attempts limited per username and client address, and per username
    from every address together (HTTP 429).

    The per-username count is not reset by a successful login: it caps the guesses at one user's
    password per window however they are spread, and the owner logging in between two guesses must
    not hand the guesser a fresh allowance. Its price, that a guesser can keep the user locked out,
    is why its limit is higher than the per-address one (LOGIN_USERNAME_FAILURE_LIMIT)."""

    template_name = "accounts/login.html"
    redirect_authenticated_user = True

    def _username(self) -> str:
        """The name the limits count under: as Django's UsernameField sees it (NFKC, so a fullwidth
        or a mathematical double-struck "alice" logs in as ``alice``), and case-folded; else each
        variant got fresh guesses."""
        name = str(self.request.POST.get("username", ""))[:300].strip()
        return unicodedata.normalize("NFKC", name).casefold().strip()

    def _limit_key(self) -> tuple[str, str]:
        return self._username(), client_address(self.request.META)

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        limiter = login_limiter()
        if limiter.blocked(*self._limit_key()) or username_limiter().blocked(self._username()):
            # Checked before the password: while blocked, even the right one is not tried.
            minutes = max(1, round(limiter.window / 60))
            message = gettext("Too many failed login attempts for this username. Try again in %(minutes)d minutes.") % {
                "minutes": minutes
            }
            form = self.get_form()
            response = self.render_to_response(self.get_context_data(form=form, locked_out=message), status=429)
            response["Retry-After"] = str(limiter.window)
            return response
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form: AuthenticationForm) -> HttpResponse:
        login_limiter().record_failure(*self._limit_key())
        username_limiter().record_failure(self._username())
        return super().form_invalid(form)

    def form_valid(self, form: AuthenticationForm) -> HttpResponse:
        login_limiter().reset(*self._limit_key())
        return super().form_valid(form)


class LogoutView(auth_views.LogoutView):
    pass


@login_required
def home(request: HttpRequest) -> HttpResponse:
    """The services list is the home page: what a user runs is what they come back for."""
    return redirect("serving:list")


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness of the web process and its database (for load balancers and `make run`)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


READY_TIMEOUT = 1.0  # seconds per check: a load balancer's probe must not hang on a dead dependency


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: the database and Redis answer (503 naming what failed). /healthz stays the cheap liveness."""
    failed: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:
        failed["database"] = f"{exc.__class__.__name__}: {exc}"
    client = redis.Redis.from_url(
        settings.REDIS_URL, socket_connect_timeout=READY_TIMEOUT, socket_timeout=READY_TIMEOUT
    )
    try:
        client.ping()
    except Exception as exc:
        failed["redis"] = f"{exc.__class__.__name__}: {exc}"
    finally:
        client.close()
    if failed:
        return JsonResponse({"status": "unavailable", "failed": failed}, status=503)
    return JsonResponse({"status": "ok", "checks": ["database", "redis"]})
