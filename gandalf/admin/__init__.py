"""The admin HTTP API (``/admin/v1``): a Starlette app off the hot path.

``app.py`` builds it, ``schemas.py`` holds its request and response Structs,
``resources.py`` the operations, ``openapi.py`` the OpenAPI 3.1 document
generated from both; ``webui.py`` serves the web UI at ``/ui/`` (the pages in
``static/``, login and logout; its session cookie also authenticates this API,
see ``auth/session.py``). It sits beside ``server``: it imports app/, auth/, domain
and errors, and reaches storage only through the Protocol in ``resources.py``.
"""
