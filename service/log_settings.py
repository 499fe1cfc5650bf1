"""Triton's logging extension: the log level read and changed while the service runs (GET/POST
/v2/logging, gRPC LogSettings), so debug lines can be turned on for a while without a restart
(which would mean loading and warming the models again).

Triton's settings are switches (log_info, log_warning, log_error) and a verbosity; here they map
onto one Python log level, shared by the front end and its workers:

    log_verbose_level > 0 -> debug;  else log_info -> info;  else log_warning -> warning;
    else log_error -> error;  else critical (nearly silent)

The root logger's level is the only state: what GET reports is read back from it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .errors import ServiceError
from .logs import UVICORN_LOGGERS

SWITCHES = ("log_info", "log_warning", "log_error")


def settings_of(level: int) -> dict:
    """Triton's switches for a Python log level."""
    return {
        "log_info": level <= logging.INFO,
        "log_warning": level <= logging.WARNING,
        "log_error": level <= logging.ERROR,
        "log_verbose_level": 1 if level <= logging.DEBUG else 0,
    }


def level_of(switches: dict) -> str:
    if switches["log_verbose_level"] > 0:
        return "debug"
    for key, level in zip(SWITCHES, ("info", "warning", "error")):
        if switches[key]:
            return level
    return "critical"


class LogSettings:
    """The service's log settings. `tell_workers(level)` passes a new level on to the worker
    processes (None where the front end has none, as the Ray ingress)."""

    def __init__(self, log_format: str, tell_workers: Callable[[str], None] | None = None):
        self.log_format = log_format
        self.tell_workers = tell_workers

    def current(self) -> dict:
        return {
            "log_file": "",  # standard error, always
            **settings_of(logging.getLogger().getEffectiveLevel()),
            "log_format": self.log_format,
        }

    def update(self, changes: dict) -> dict:
        """Apply Triton's settings (any subset); returns them all. ServiceError bad_request for an
        unknown setting, a wrong type, or one that is fixed at start (the log file and format)."""
        switches = settings_of(logging.getLogger().getEffectiveLevel())
        for key, value in changes.items():
            if key in SWITCHES:
                if not isinstance(value, bool):
                    raise ServiceError("bad_request", f"{key} must be true or false, not {value!r}")
                switches[key] = value
            elif key == "log_verbose_level":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ServiceError("bad_request", f"log_verbose_level must be an integer >= 0, not {value!r}")
                switches[key] = value
            elif key == "log_file":
                if value not in ("", None):
                    raise ServiceError("bad_request", "log_file cannot be set: the service logs to standard error")
            elif key == "log_format":
                if value not in (self.log_format, None):
                    raise ServiceError(
                        "bad_request", f"log_format is set at start (--log-format text|json); it is {self.log_format}"
                    )
            else:
                raise ServiceError(
                    "bad_request",
                    f"unknown log setting {key!r}; known: {', '.join((*SWITCHES, 'log_verbose_level', 'log_file', 'log_format'))}",
                )
        self.apply(level_of(switches))
        return self.current()

    def apply(self, level: str) -> None:
        before = logging.getLogger().getEffectiveLevel()
        for name in ("", *UVICORN_LOGGERS):
            logging.getLogger(name or None).setLevel(level.upper())
        if self.tell_workers is not None:
            self.tell_workers(level)
        if logging.getLevelName(before) != level.upper():
            logging.getLogger("service").warning(
                "log level changed from %s to %s", logging.getLevelName(before).lower(), level
            )
