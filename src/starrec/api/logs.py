"""JSON log lines for the service: one object per line, so a log collector can filter
by request id, status or latency without parsing prose.

A record's `extra` fields (the access log's method, path, status, ms, request_id)
become keys of its line. Tracebacks go to the log (`exception`), never into a response.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

# attributes every LogRecord has; anything else on a record came from `extra`
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                          "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


def log_config(level: str = "info") -> dict[str, Any]:
    """A `logging.config.dictConfig` (uvicorn's `log_config`) writing JSON lines to
    stderr for uvicorn's loggers and the project's. uvicorn's own access log is off: the
    service writes one access line per request itself, with its request id."""
    level = level.upper()
    handler = {"class": "logging.StreamHandler", "formatter": "json",
               "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"json": handler},
        "loggers": {
            "uvicorn": {"handlers": ["json"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "starrec": {"handlers": ["json"], "level": level, "propagate": False},
        },
    }
