"""The model=auto policy on its own (service/choice.py, service/estimates.py): parsing, the menu,
the choice against a deadline, the 504 before compute, and a stream's hysteresis."""

from __future__ import annotations

import pytest

from service.choice import Chooser, Mode, RequestOptions, StreamState, build_menu, parse_options
from service.config import ConfigError, load_settings
from service.errors import ServiceError
from service.estimates import PROBE_AFTER, Estimates

R18, R50 = "bisenetv1_r18", "bisenetv1_r50"


def resolve(name):
    name = name or R18
    if name not in (R18, R50):
        raise ServiceError("not_found", f"unknown model {name!r}")
    return name


def test_parse_options_names_the_choices():
    assert parse_options(None, None, None, resolve) == RequestOptions(R18, "none", None)
    assert parse_options("AUTO", "Auto", 50, resolve) == RequestOptions("auto", "auto", 50)
    assert parse_options(R50, "ms_flip", None, resolve).requested == f"{R50}:ms_flip"
    with pytest.raises(ServiceError, match="none, flip, ms_flip, auto") as bad:
        parse_options(None, "multiscale", None, resolve)
    assert bad.value.http_status == 422
    with pytest.raises(ServiceError) as unknown:
        parse_options("r101", None, None, resolve)
    assert unknown.value.http_status == 404
    for deadline in (0, -5, 3_600_001, "10", True):
        with pytest.raises(ServiceError, match="deadline_ms"):
            parse_options(None, None, deadline, resolve)


def test_parse_options_takes_a_priority_within_the_levels():
    assert parse_options(None, None, None, resolve).priority == 1  # none given: the first level
    assert parse_options(None, None, None, resolve, 0, levels=3).priority == 1  # 0 is Triton's "default"
    assert parse_options(None, None, None, resolve, 3, levels=3).priority == 3
    for priority in (-1, 4, "2", True, 1.0):
        with pytest.raises(ServiceError, match=r"priority must be an integer 1\.\.3") as bad:
            parse_options(None, None, None, resolve, priority, levels=3)
        assert bad.value.http_status == 422


def test_menu_by_published_miou_and_by_order():
    menu = build_menu([(R18, None), (R50, None), ("mine", "/w/mine.pth")])
    assert [str(m) for m in menu] == [f"{R50}:ms_flip", f"{R50}:none", f"{R18}:ms_flip", f"{R18}:none", "mine:none"]
    assert build_menu([(R18, "random")]) == [Mode(R18)]  # random weights publish nothing
    order = ((R50, "flip"), (R18, "none"))
    assert build_menu([(R18, None), (R50, None)], order) == [Mode(R50, "flip"), Mode(R18)]


def test_auto_order_flag_is_checked():
    settings = load_settings(["--model", "fast", "--model", "accurate", "--auto-order", "accurate:ms_flip,fast"])
    assert settings.auto_order == ((R50, "ms_flip"), (R18, "none"))
    for bad in ("r101", "fast:multi", "fast,fast"):
        with pytest.raises(ConfigError, match="--auto-order"):
            load_settings(["--model", "fast", "--auto-order", bad])
    with pytest.raises(ConfigError, match="reserved"):
        load_settings(["--model", "auto=/w/x.pth"])


COSTS = {Mode(R50, "ms_flip"): 2.0, Mode(R50): 0.12, Mode(R18, "ms_flip"): 0.5, Mode(R18): 0.03}
MENU = [Mode(R50, "ms_flip"), Mode(R50), Mode(R18, "ms_flip"), Mode(R18)]


def chooser(upgrade_frames: int = 3) -> Chooser:
    return Chooser(MENU, lambda mode, h, w: COSTS[mode], upgrade_frames)


def test_the_most_accurate_mode_that_fits():
    c = chooser()
    both = RequestOptions("auto", "auto", 5000)
    assert c.choose(both, 1024, 2048, time_left=5.0, queued=0.0).mode == Mode(R50, "ms_flip")
    assert c.choose(both, 1024, 2048, time_left=1.0, queued=0.0).mode == Mode(R50)
    assert c.choose(both, 1024, 2048, time_left=1.0, queued=0.9).mode == Mode(R18)  # work queued ahead counts
    assert c.choose(RequestOptions(R18, "auto", 900), 1, 1, time_left=0.9, queued=0.0).mode == Mode(R18, "ms_flip")
    plain = RequestOptions("auto", "none", 100)
    assert c.choose(plain, 1024, 2048, time_left=0.1, queued=0.0).mode == Mode(R18)
    assert c.choose(RequestOptions(R50, "auto", 600), 1, 1, time_left=0.6, queued=0.0).mode == Mode(R50)
    # without an explicit deadline (the frame budget), nothing fitting runs the fastest
    assert c.choose(RequestOptions("auto", "auto"), 1, 1, time_left=0.01, queued=0.0).mode == Mode(R18)


def test_an_explicit_deadline_no_mode_meets_is_refused_with_the_reason():
    c = chooser()
    with pytest.raises(ServiceError) as refused:
        c.choose(RequestOptions("auto", "auto", 20), 1, 1, time_left=0.02, queued=0.0)
    assert refused.value.code == "deadline_exceeded"
    assert f"the fastest, {R18}:none, needs about 30 ms" in refused.value.message
    with pytest.raises(ServiceError, match=f"{R50}:none needs about 170 ms .50 ms of it queued ahead."):
        c.choose(RequestOptions(R50, "none", 150), 1, 1, time_left=0.15, queued=0.05)


def test_a_stream_steps_down_at_once_and_up_only_after_a_run_with_headroom():
    c = chooser(upgrade_frames=3)
    state = StreamState()
    options = RequestOptions("auto", "none")
    budgets = [1.0] * 3 + [0.05] * 2 + [1.0] * 7 + [0.14, 1.0, 0.05, 1.0, 1.0, 1.0]
    chosen = [c.choose(options, 1, 1, time_left=b, queued=0.0, stream=state).mode.model for b in budgets]
    expected = [R50] * 3 + [R18] * 2 + [R18] * 2 + [R50] * 5 + [R50, R50, R18, R18, R18, R50]
    assert chosen == expected
    # 0.14 s still fits R50 (0.12): no step down, although it leaves no headroom


def test_estimates_scale_from_the_nearest_measurement_and_follow_new_ones():
    est = Estimates((2048, 1024))
    assert est.predict(R18, "none", 1024, 2048) is None
    est.observe(R18, "none", 1024, 2048, 1, 0.1)
    assert est.predict(R18, "none", 1024, 2048, batch=2) == pytest.approx(0.2)
    assert est.predict(R18, "flip", 1024, 2048) == pytest.approx(0.2)  # twice the network work
    assert est.predict(R18, "ms_flip", 1024, 2048) == pytest.approx(0.1 * 2 * 8.6875, rel=1e-3)
    assert est.predict(R50, "none", 1024, 2048) is None
    est.observe(R18, "none", 1024, 2048, 2, 0.4)  # 0.2 per image, weighted in
    assert est.predict(R18, "none", 1024, 2048) == pytest.approx(0.1 + 0.3 * 0.1)
    row = {"tta": "none", "height": 1024, "width": 2048, "ms": 130.0, "measurements": 2, "warm_up_only": False}
    assert est.measured(R18) == [row]


def test_a_warm_up_seed_gives_way_to_the_first_real_measurement_and_stale_estimates_are_probed():
    est = Estimates((2048, 1024))
    est.observe(R50, "none", 64, 64, 1, 5.0, seed=True)  # a stalled warm-up on a busy machine
    assert est.predict(R50, "none", 64, 64) == pytest.approx(5.0)
    assert est.probe(R50, "none", 64, 64) is False  # just measured: trusted
    est._samples[(R50, "none", 64, 64)].updated -= PROBE_AFTER + 1
    assert est.probe(R50, "ms_flip", 64, 64) is True  # derived from the stale key: run one to measure
    assert est.probe(R50, "none", 64, 64) is False  # one probe per interval
    est.observe(R50, "none", 64, 64, 1, 0.05)
    assert est.predict(R50, "none", 64, 64) == pytest.approx(0.05)  # replaced, not averaged
    est.observe(R50, "none", 64, 64, 1, 0.15)
    assert est.predict(R50, "none", 64, 64) == pytest.approx(0.08)


def test_a_refusal_on_a_stale_estimate_runs_the_fastest_mode_instead():
    c = Chooser(MENU, lambda mode, h, w: COSTS[mode], 3, probe=lambda mode, h, w: mode == Mode(R18))
    assert c.choose(RequestOptions("auto", "auto", 20), 1, 1, time_left=0.02, queued=0.0).mode == Mode(R18)
