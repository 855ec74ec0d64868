"""How the long-running roles log: lines with times for people, or ``--log-json`` for log shippers.

One JSON object a line: ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``, ``message``,
and ``exception`` (the traceback) when there is one; a Celery task's lines add ``task_id`` and
``task_name``. The same formatter serves Python's logging (``lipfarm reconcile``), Celery's
(``lipfarm worker``, through its logging signals) and uvicorn's (``lipfarm api``).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

TIMED = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON (``fmt`` and friends are accepted and ignored, for dictConfig)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key in ("task_id", "task_name"):
            if getattr(record, key, None) not in (None, "???"):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def json_line(message: str, **fields) -> str:
    """A line the CLI prints itself (``reconcile``'s reports), in the same shape as the log lines."""
    return json.dumps({"time": utc_now(), "level": "INFO", "logger": "lipfarm", "message": message, **fields})


def configure(*, verbose: bool, as_json: bool, timed: bool) -> None:
    """Python's logging for a command: JSON, timed lines, or plain lines (short-lived commands)."""
    level = logging.INFO if verbose else logging.WARNING
    if as_json:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format=TIMED if timed else "%(levelname)s %(name)s: %(message)s")


def json_for_celery() -> None:
    """Every handler Celery sets up (the worker's and its tasks' loggers) writes JSON lines."""
    from celery import signals

    @signals.after_setup_logger.connect(weak=False)
    @signals.after_setup_task_logger.connect(weak=False)
    def _json(logger=None, **_kwargs) -> None:
        for handler in logger.handlers:
            handler.setFormatter(JsonFormatter())
