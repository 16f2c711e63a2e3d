"""Persistence: the ``Store`` Protocol (``protocol``) and its engines, SQLite
(``sqlite``, the default) and PostgreSQL (``postgres``); ``wiring.make_store``
picks one from ``database.dsn``."""
