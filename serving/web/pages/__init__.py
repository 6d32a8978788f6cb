"""Server-rendered pages of the serving app (docs/architecture.md): one module per page family, each with its
own ``urlpatterns``, gathered by ``urls.py`` here. Views only parse, authorize and call one action."""
