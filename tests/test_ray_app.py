"""The Ray application's settings and builder, without a cluster (tests/test_ray_cluster.py has one)."""

from __future__ import annotations

import os

import pytest

from service.config import ConfigError

try:
    from ray.serve.deployment import Application
except ImportError:
    if os.environ.get("BISENET_REQUIRE_RAY") == "1":
        raise
    pytest.skip("ray is not installed (pip install -e '.[ray]')", allow_module_level=True)

from service.errors import ServiceError
from service.ray.app import args_to_argv, build_app
from service.ray.backend import RayBackedService
from service.ray.settings import load


def test_config_file_args_become_the_same_flags():
    args = {"model": ["fast=random", "accurate=random"], "device": "cpu", "min_replicas": 2, "max-replicas": 3}
    argv = args_to_argv(args)
    assert argv == [
        "--model", "fast=random", "--model", "accurate=random", "--device", "cpu",
        "--min-replicas", "2", "--max-replicas", "3",
    ]  # fmt: skip
    settings, ray_settings, from_cluster = load(argv)
    assert settings.model_names() == ["bisenetv1_r18", "bisenetv1_r50"]
    assert (ray_settings.min_replicas, ray_settings.max_replicas, ray_settings.num_gpus) == (2, 3, 0.0)
    assert not from_cluster


def test_builder_gives_an_ingress_and_a_deployment_per_model():
    args = {"model": ["fast=random", "accurate=random"], "device": "cpu", "replica-resources": "slot=1"}
    app = build_app({**args, "max-replicas": 3})
    assert isinstance(app, Application)
    ingress = app._bound_deployment
    assert ingress.name == "ingress"
    handles = ingress.init_kwargs
    assert sorted(h._bound_deployment.name for h in handles.values()) == [
        "segment_bisenetv1_r18",
        "segment_bisenetv1_r50",
    ]
    segment = handles["bisenetv1_r18"]._bound_deployment
    assert segment.ray_actor_options["resources"] == {"slot": 1.0}
    assert "runtime_env" not in segment.ray_actor_options  # threads: Ray's default (the replica's num_cpus)
    threaded = build_app({**args, "cpu-threads": 3})._bound_deployment.init_kwargs["bisenetv1_r18"]
    env = threaded._bound_deployment.ray_actor_options["runtime_env"]["env_vars"]
    assert env == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    assert segment._deployment_config.max_queued_requests == 64
    scaling = segment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 2.0)
    assert ingress.init_args[1] == 8  # each replica's --max-ongoing, which the ingress's bound needs
    assert ingress._deployment_config.max_ongoing_requests >= 2 * (3 * 8 + 64)  # room for what it admits


def test_ingress_admits_running_replicas_times_max_ongoing_plus_the_queue():
    settings, _, _ = load(["--model", "fast=random", "--max-queue", "3"])
    service = RayBackedService(settings, {"bisenetv1_r18": None}, replica_max_ongoing=2)
    service.replica_counts = {"bisenetv1_r18": 2}
    for _ in range(2 * 2 + 3):
        service._admit("bisenetv1_r18")
    with pytest.raises(ServiceError) as refused:
        service._admit("bisenetv1_r18")
    assert refused.value.code == "queue_full" and refused.value.retry_after == 1.0
    service.replica_counts = {"bisenetv1_r18": 3}  # a replica more (autoscaling): room for two more
    service._admit("bisenetv1_r18")
    service._admit("bisenetv1_r18")
    with pytest.raises(ServiceError):
        service._admit("bisenetv1_r18")
    service.pool.shutdown()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "cuda:0,cuda:1"], "Ray assigns each replica its GPU"),
        (["--min-replicas", "3", "--max-replicas", "2"], "at least --min-replicas"),
        (["--replica-resources", "slot"], "NAME=AMOUNT"),
        (["--num-gpus", "-1"], "at least 0"),
        (["--model", "nope"], "unknown model"),
    ],
)
def test_bad_settings_are_refused_with_a_message(argv, message):
    with pytest.raises(ConfigError, match=message):
        load(["--model", "fast=random", *argv] if "--model" not in argv else argv)


def test_device_decides_gpus_per_replica():
    assert load(["--device", "cuda"])[1].num_gpus == 1.0
    assert load(["--device", "cuda", "--num-gpus", "0.5"])[1].num_gpus == 0.5
    assert load(["--device", "auto"])[2]  # auto: decided from the cluster's resources at launch


def test_no_scaling_to_zero():
    with pytest.raises(ConfigError, match="at least 1"):
        load(["--model", "fast=random", "--min-replicas", "0"])
