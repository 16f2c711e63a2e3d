"""The admin HTTP API (``/admin/v1``): a Starlette app off the hot path.

``app.py`` builds it, ``schemas.py`` holds its request and response Structs,
``resources.py`` the operations, ``openapi.py`` the OpenAPI 3.1 document
generated from both. It sits beside ``server``: it imports app/, auth/, domain
and errors, and reaches storage only through the Protocol in ``resources.py``.
"""
