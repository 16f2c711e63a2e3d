"""State shared by several gateway instances: the Redis adapters.

Each module implements a Protocol that ``app/`` declares (the Governor, the
ResponseCache, the Watcher's wake-up), so the request pipeline never names
Redis; ``wiring.py`` imports this package only when ``redis:`` is configured
(redis-py is then imported, never otherwise).
"""
