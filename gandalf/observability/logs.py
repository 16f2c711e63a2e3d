"""Gandalf's own log lines (the ``logging`` module) as one JSON object per line.

``log.format: json`` puts :class:`JsonFormatter` on the ``gandalf`` logger's
handler: a line is ``{"ts":…,"level":…,"logger":…,"message":…}`` with
``"exc"`` (the traceback as one string) when the record carries an exception,
nothing before the ``{``, the same ``ts`` and ``level`` as the access log's
lines so one collector parses both. orjson escapes every control character,
so a message (which may quote a client's input) is always one line.
"""

from __future__ import annotations

import logging

import orjson

__all__ = ["LEVELS", "JsonFormatter"]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}


class JsonFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose every record is one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": _NAMES.get(record.levelno) or record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line).decode()
