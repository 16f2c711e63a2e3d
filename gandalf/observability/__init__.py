"""Observability: Prometheus metrics (metrics.py), the JSON log formatter
(logs.py) and the facts a request's accounting leaves for the server core
(facts.py). Imports only ``domain`` (never provider/ or storage/)."""
