"""How the ``swarm`` command writes its log: text for people, JSON for collectors.

``--log-format json`` (on every long-running command: ``node``, ``serve``,
``mount``, ``site-job gather``, ``pilot``) writes one JSON object per line on
stderr: ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``,
``message`` (the formatted message), and, where the log call passed them with
``extra=``, the fields of :data:`FIELDS` (the repository, object, peer or job
it is about).  An exception's traceback is the ``exception`` field, so a
record stays one line whatever it carries.  The text format is unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The record attributes a log call may set with ``extra=`` to name what it is
# about; a collector can index on them without parsing the message.
FIELDS = ("repository", "revision", "object", "peer", "job", "range", "mountpoint")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(*, debug: bool, log_format: str = "text") -> None:
    """Send the root logger's records to stderr in ``log_format``
    (one of :data:`LOG_FORMATS`); DEBUG with ``debug``, else INFO."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def add_log_format_option(parser: argparse.ArgumentParser) -> None:
    """``--log-format text|json`` on a long-running command."""
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="log lines as text (default) or one JSON object per line (time, level, logger,"
        " message, and the repository, object, peer or job where known)",
    )


def subcommand(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    """The parser of the subcommand ``path`` (``"site-job", "gather"``) below ``parser``.

    Raises:
        KeyError: no such subcommand (a programming error).
    """
    for name in path:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            raise KeyError(name)
        parser = actions[0].choices[name]
    return parser
