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


def parse_priority(value: Any) -> dict:
    """Triton's `priority` (1 runs first; 0: the default); the request path checks the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ServiceError("bad_request", f"parameter priority must be an integer, not {value!r}")
    return {"priority": value}


def parse_tta(value: Any) -> dict:
    """Test-time augmentation (none, flip, ms_flip, auto); the request path checks the name."""
    if not isinstance(value, str):
        raise ServiceError("bad_request", f"parameter tta must be a string, not {value!r}")
    return {"tta": value}


# name -> parser(value) -> keyword arguments for the request
PARAMETERS: dict[str, Callable[[Any], dict]] = {
    "deadline_ms": parse_deadline,
    "tta": parse_tta,
    "priority": parse_priority,
}
# Sent by tritonclient / perf_analyzer (output format, scheduling hints the service does not use).
IGNORED = {"binary_data_output", "timeout", "sequence_id", "sequence_start", "sequence_end", "headers"}
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


def ran_parameters(served: list) -> dict[str, str]:
    """Response parameters naming what ran: `model` and `tta` (the choice when the request said
    auto); comma-separated per batch item when the items of one request were served differently."""

    def joined(values: list[str]) -> str:
        return values[0] if len(set(values)) == 1 else ",".join(values)

    return {"model": joined([s.model for s in served]), "tta": joined([s.tta for s in served])}
