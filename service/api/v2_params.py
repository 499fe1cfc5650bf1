"""Request parameters of the v2 infer call, shared by REST (JSON values) and gRPC (InferParameter).

Each known parameter has a parser that checks its value and returns keyword arguments for the
request path; a new option (a test-time augmentation mode, say) is one more entry in PARAMETERS.
Parameters that Triton clients send on their own are accepted and ignored; anything else is a
`bad_request`, so a misspelt option never passes silently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ServiceError

MAX_DEADLINE_MS = 3_600_000


def parse_deadline(value: Any) -> dict:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DEADLINE_MS:
        raise ServiceError(
            "bad_request", f"parameter deadline_ms must be an integer 1..{MAX_DEADLINE_MS}, not {value!r}"
        )
    return {"deadline_ms": value}


# name -> parser(value) -> keyword arguments for the request
PARAMETERS: dict[str, Callable[[Any], dict]] = {"deadline_ms": parse_deadline}
# Sent by tritonclient / perf_analyzer (output format, scheduling hints the service does not use).
IGNORED = {"binary_data_output", "priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "headers"}
IGNORED_PREFIX = "triton_"


def request_options(parameters: dict[str, Any]) -> dict:
    """Keyword arguments for the request path from the request-level parameters."""
    options: dict = {}
    for name, value in parameters.items():
        parser = PARAMETERS.get(name)
        if parser is not None:
            options.update(parser(value))
        elif name not in IGNORED and not name.startswith(IGNORED_PREFIX):
            known = ", ".join(sorted(PARAMETERS))
            raise ServiceError("bad_request", f"unknown parameter {name!r}; this service takes {known}")
    return options
