"""ASGI entry point: HTTP through Django, websockets through Channels (authenticated by session)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs the app registry loaded)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from config.asgi_guards import TrustedProxyHeaders, WebOriginValidator  # noqa: E402
from serving.core import logs  # noqa: E402
from serving.web.consumers import websocket_urlpatterns  # noqa: E402
from storage.asgi import streaming_uploads  # noqa: E402

logs.set_process("web")  # LOG_FORMAT=json lines say which process wrote them

# The client address comes from X-Forwarded-For of WEB_TRUSTED_PROXIES only (daphne runs without
# --proxy-headers, which believed any client's claim); the rate limits count per that address.
application = TrustedProxyHeaders(
    ProtocolTypeRouter(
        {
            # File uploads are streamed to disk by storage/asgi.py before Django would hold them in memory.
            "http": streaming_uploads(django_asgi_app),  # type: ignore[arg-type]  # Django types scope as a dict
            # Every websocket route: only pages of the web app's own origins (WEB_ORIGINS, port included).
            "websocket": WebOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
        }
    )
)
