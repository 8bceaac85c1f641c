"""structlog set-up: JSON lines (for journald and pipes) or a console renderer on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.typing import FilteringBoundLogger


def configure(json_lines: bool, stream: Any = None) -> None:
    out = stream or sys.stderr
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get(**bound: Any) -> FilteringBoundLogger:
    """A logger of the class `configure` chose (make_filtering_bound_logger)."""
    log: FilteringBoundLogger = structlog.get_logger().bind(**bound)
    return log
