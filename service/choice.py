"""`model=auto` / `tta=auto`: the most accurate served mode whose predicted completion fits the deadline.

A mode is a (model, tta) pair. The menu ranks them, most accurate first: by the published mIoU of
each model's weights (plain, and multi-scale + flip for `ms_flip`), or in the order of
`--auto-order`. `flip` has no published mIoU, so it is on the menu only when `--auto-order` puts it
there; models without a published mIoU follow the published ones, plain, in configuration order.

A request's options narrow the menu (a fixed model keeps its own modes, a fixed tta keeps each
model with that tta). The choice is the first candidate whose predicted time, plus the work queued
ahead of it on the worker, fits the time left: the explicit `deadline_ms`, else the frame budget.
When none fits, an explicit deadline is answered 504 before any compute (with the numbers), and
without one the fastest candidate runs. An estimate no measurement has confirmed for a while
(estimates.PROBE_AFTER) does not refuse: that request runs, and its time corrects the estimate. Streams keep a `StreamState`: they step down at once when
their mode no longer fits, and up one step only after `upgrade_frames` frames in a row in which
the better mode fits with headroom, so video does not flicker between models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from model.tta import TTA_MODES
from model.zoo import ZOO, ZooEntry, default_entry

from .errors import ServiceError

AUTO = "auto"
MAX_DEADLINE_MS = 3_600_000
HEADROOM = 0.8  # stepping up needs the better mode to fit in this share of the time left


@dataclass(frozen=True)
class Mode:
    model: str
    tta: str = "none"

    def __str__(self) -> str:
        return f"{self.model}:{self.tta}"


DEFAULT_PRIORITY = 1  # what a request that names none gets: the first level


@dataclass(frozen=True)
class RequestOptions:
    """What a client asked for: a served model name or 'auto', a tta mode or 'auto', a deadline,
    a priority (1 runs first)."""

    model: str
    tta: str = "none"
    deadline_ms: int | None = None
    priority: int = DEFAULT_PRIORITY

    @property
    def requested(self) -> str:
        return f"{self.model}:{self.tta}"


def as_options(model: str | RequestOptions, deadline_ms: int | None = None) -> RequestOptions:
    """A request path's `model` argument as RequestOptions (a plain name runs tta none); an explicit
    `deadline_ms` overrides the options' own."""
    options = model if isinstance(model, RequestOptions) else RequestOptions(model)
    return options if deadline_ms is None else replace(options, deadline_ms=deadline_ms)


@dataclass(frozen=True)
class Choice:
    mode: Mode
    predicted: float  # seconds of worker time for this request (0 when unknown)


@dataclass
class StreamState:
    """Per-stream memory of the choice: the mode in use and the run of frames with headroom."""

    mode: Mode | None = None
    headroom_run: int = 0


def parse_options(
    model: str | None,
    tta: str | None,
    deadline_ms,
    resolve_model: Callable[[str | None], str],
    priority=None,
    levels: int = 1,
) -> RequestOptions:
    """One parser for every front door: (model, tta, deadline_ms, priority) as received -> RequestOptions.

    Raises ServiceError: 404 for an unknown model, 422 for an unknown tta, a bad deadline or a
    priority outside 0..levels (0, as in Triton's protocol, and None mean the default)."""
    model = (model or "").strip() or None
    name = AUTO if model is not None and model.lower() == AUTO else resolve_model(model)
    mode = (tta or "").strip().lower() or "none"
    if mode not in (*TTA_MODES, AUTO):
        raise ServiceError("bad_request", f"unknown tta {tta!r}; choose {', '.join((*TTA_MODES, AUTO))}")
    if deadline_ms is not None:
        if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, int):
            raise ServiceError("bad_request", f"deadline_ms must be an integer, not {deadline_ms!r}")
        if not 1 <= deadline_ms <= MAX_DEADLINE_MS:
            raise ServiceError("bad_request", f"deadline_ms must be 1..{MAX_DEADLINE_MS}, not {deadline_ms}")
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= levels
    ):
        raise ServiceError(
            "bad_request",
            f"priority must be an integer 1..{levels} (--priority-levels; 1 runs first, 0 means the default "
            f"{DEFAULT_PRIORITY}), not {priority!r}",
        )
    return RequestOptions(name, mode, deadline_ms, priority or DEFAULT_PRIORITY)


def published_entry(name: str, weights: str | None) -> ZooEntry | None:
    """The zoo entry whose published mIoU describes a served model, if any."""
    if weights in ZOO:
        return ZOO[weights]
    if weights is None:
        try:
            return default_entry(name)
        except KeyError:
            return None
    return None


def build_menu(models: list[tuple[str, str | None]], order: tuple[tuple[str, str], ...] = ()) -> list[Mode]:
    """Modes, most accurate first: `order` when given, else by published mIoU (see the module doc)."""
    if order:
        return [Mode(model, tta) for model, tta in order]
    ranked: list[tuple[float, Mode]] = []
    unpublished = []
    for name, weights in models:
        entry = published_entry(name, weights)
        if entry is None:
            unpublished.append(Mode(name))
        else:
            ranked += [(entry.miou_ms_flip, Mode(name, "ms_flip")), (entry.miou, Mode(name))]
    ranked.sort(key=lambda item: -item[0])
    return [mode for _, mode in ranked] + unpublished


class Chooser:
    def __init__(
        self,
        menu: list[Mode],
        predict: Callable[[Mode, int, int], float | None],
        upgrade_frames: int = 10,
        probe: Callable[[Mode, int, int], bool] = lambda mode, height, width: False,
    ):
        self.menu = menu
        self.predict = predict  # (mode, height, width) -> seconds, or None when unknown
        self.probe = probe  # (mode, height, width) -> run it although refused, to measure again
        self.upgrade_frames = upgrade_frames
        self.models = list(dict.fromkeys(mode.model for mode in menu))

    def candidates(self, options: RequestOptions) -> list[Mode]:
        """The modes a request may run in, most accurate first."""
        if options.model != AUTO and options.tta != AUTO:
            return [Mode(options.model, options.tta)]
        if options.model == AUTO and options.tta == AUTO:
            return list(self.menu)
        if options.model == AUTO:
            return [Mode(model, options.tta) for model in self.models]
        own = [mode for mode in self.menu if mode.model == options.model]
        return own or [Mode(options.model)]

    def placeholder(self, options: RequestOptions) -> str:
        """The model a request is admitted under before its image is decoded and the choice made."""
        return options.model if options.model != AUTO else self.menu[-1].model

    def choose(
        self,
        options: RequestOptions,
        height: int,
        width: int,
        time_left: float,
        queued: float,
        stream: StreamState | None = None,
    ) -> Choice:
        """The mode to run; raises 504 `deadline_exceeded` when an explicit deadline cannot be met."""
        modes = self.candidates(options)
        predicted = [self.predict(mode, height, width) for mode in modes]
        fits = [i for i, p in enumerate(predicted) if p is not None and queued + p <= time_left]
        if len(modes) == 1 and predicted[0] is None:
            fits = [0]  # nothing measured yet: nothing to refuse on
        if not fits and options.deadline_ms is not None:
            fastest = self._fastest(predicted)
            if not self.probe(modes[fastest], height, width):
                raise ServiceError("deadline_exceeded", self._refusal(options, modes, predicted, queued, time_left))
            fits = [fastest]  # an estimate nothing has confirmed for a while: run, and measure again
        if stream is not None and stream.mode in modes:
            index = self._stream_step(stream, modes.index(stream.mode), fits, predicted, queued, time_left)
        else:
            index = fits[0] if fits else self._fastest(predicted)
        if stream is not None:
            if stream.mode != modes[index]:
                stream.headroom_run = 0
            stream.mode = modes[index]
        return Choice(modes[index], predicted[index] or 0.0)

    def _stream_step(self, stream: StreamState, current: int, fits, predicted, queued: float, time_left: float) -> int:
        if current not in fits:  # at risk: down at once, to the best mode that fits (or the fastest)
            stream.headroom_run = 0
            return fits[0] if fits else self._fastest(predicted)
        better = current - 1
        if better >= 0 and predicted[better] is not None and queued + predicted[better] <= HEADROOM * time_left:
            stream.headroom_run += 1
            if stream.headroom_run >= self.upgrade_frames:
                return better
        else:
            stream.headroom_run = 0
        return current

    @staticmethod
    def _fastest(predicted: list[float | None]) -> int:
        known = [(p, i) for i, p in enumerate(predicted) if p is not None]
        return min(known)[1] if known else len(predicted) - 1

    def _refusal(self, options, modes, predicted, queued: float, time_left: float) -> str:
        index = self._fastest(predicted)
        need = (predicted[index] or 0.0) + queued
        what = f"{modes[index]}" if len(modes) == 1 else f"no served mode can meet it: the fastest, {modes[index]},"
        return (
            f"deadline_ms={options.deadline_ms} leaves {time_left * 1000:.0f} ms; {what} needs about "
            f"{need * 1000:.0f} ms ({queued * 1000:.0f} ms of it queued ahead), so it was not computed"
        )
