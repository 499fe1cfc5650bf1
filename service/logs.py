"""One log format for every line the service writes (its own, uvicorn's, the workers'): plain text
for people, or one JSON object per line (`--log-format json`) for log collectors."""

from __future__ import annotations

import json
import logging
import time

from opentelemetry import trace

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
# uvicorn names its loggers itself; they carry no handlers so their lines reach ours through the root.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
# Libraries whose debug lines are noise here: urllib3 logs every trace export's HTTP connection.
QUIET_LOGGERS = ("urllib3",)


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "pid", "message"[, "trace_id", "span_id"][, "exception"]} on one
    line; a line written while a traced request is handled names its trace and span, so a log
    collector can join the request's lines to its trace."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid and span.trace_flags.sampled:
            entry["trace_id"], entry["span_id"] = f"{span.trace_id:032x}", f"{span.span_id:016x}"
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send every logger's lines through one stderr handler in `fmt` (text or json)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use text or json")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class Step:
    """Logs one start-up step and how long it took: `with Step(log, "load", "model %s", name): ...`."""

    def __init__(self, logger: logging.Logger, step: str, what: str, *args):
        self.logger, self.step, self.what, self.args = logger, step, what, args

    def __enter__(self) -> Step:
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            seconds = time.perf_counter() - self.start
            self.logger.info("%s: " + self.what + " in %.1fs", self.step, *self.args, seconds)
