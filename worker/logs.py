"""Structured logs of the workers, the reaper and `digin serve`: one JSON object per line.

Log calls pass their fields as `extra={"job_id": ..., "event": ...}`; every field that is not a
standard `logging.LogRecord` attribute ends up in the JSON object. While a worker process runs a
job, every line also carries that job's `job_id` and `batch_id` (`set_job_context`).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# Fields of the job this process is running (a prefork child runs one at a time): added to
# every line it logs meanwhile, Celery's and the core's included, from any thread.
_job_context: dict[str, Any] = {}


def set_job_context(**fields: Any) -> None:
    """Tag every following log line of this process with `fields` (e.g. job_id, batch_id;
    None values are left out) until `clear_job_context()`."""
    _job_context.clear()
    _job_context.update({k: str(v) for k, v in fields.items() if v is not None})


def clear_job_context() -> None:
    _job_context.clear()


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", **extra fields, "exc"?} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
            **_job_context,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str | int | None = "INFO") -> None:
    """JSON lines on stderr for the whole process (Celery's loggers included)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if level is not None else "INFO")
