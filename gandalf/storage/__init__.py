"""Persistence: the SQLite store (``gandalf.storage.sqlite``)."""
