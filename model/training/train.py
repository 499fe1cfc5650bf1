"""Train BiSeNetV1 with mmsegmentation's Cityscapes recipe (docs/model.md, "Training recipe").

    bisenet train --preset bisenetv1_r18_cityscapes --data data/cityscapes
    torchrun --nproc-per-node 4 --no-python bisenet train --preset bisenetv1_r18_cityscapes --data data/cityscapes
    bisenet train --help      # every setting, and the presets

The step (losses, normalisation, SyncBN placement) is in step.py, the logs in logs.py.

Checkpoints (mmseg layout, `iter_N.pth` + `latest.pth`), `train.log`, `scalars.jsonl` and, when
TensorBoard is installed, `tensorboard/` land in the work dir. `--resume` continues a run exactly:
the data order, augmentation and dropout draws are functions of (seed, iteration), and the
checkpoint holds the optimizer, loss-scale and schedule state.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..bisenet import build_model
from ..checkpoint import CheckpointError
from .augment import PhotoMetricDistortion, TrainTransform
from .config import TrainConfig, build_parser, config_from_args, validate_config
from .data import DatasetError, DatasetInfo, IterationSampler, TrainDataset, check_dataset, open_dataset
from .distributed import (
    DistEnv,
    broadcast_buffers,
    cleanup_distributed,
    gather_objects,
    init_distributed,
    share_from_main,
    state_digest,
)
from .evaluate import evaluate
from .iou import format_table
from .logs import Recorder, log, setup_logging
from .schedule import PolyWarmupSchedule
from .snapshots import (
    build_meta,
    check_same_model,
    clean_state_dict,
    find_latest,
    load_backbone_weights,
    load_pretrained,
    load_training_checkpoint,
    save_training_checkpoint,
)
from .step import LOSS_NAMES, apply_sync_bn, iteration_seed, normalise_batch, segmentation_losses


class StopTraining(Exception):
    """Raised by an `on_iteration` callback to end a run early (tests simulate interruptions)."""


# -- the run -----------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv):
        validate_config(cfg)
        self.cfg, self.env, self.device = cfg, env, env.device
        self.work_dir = Path(cfg.resolved_work_dir())
        if env.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        if env.distributed:
            torch.distributed.barrier()
        setup_logging(self.work_dir, env.is_main)
        self.train_info, self.val_info = share_from_main(self._open_data, env)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.net = build_model(cfg.arch, num_classes=self.train_info.num_classes, aux_heads=True)
        self.start_iter, resume = self._initial_weights()
        self._configure_backends()
        if env.distributed and self._use_sync_bn():
            apply_sync_bn(self.net)
        self.net.to(self.device)
        if cfg.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(
            self.net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.schedule = PolyWarmupSchedule(
            cfg.lr, cfg.iters, cfg.power, cfg.min_lr, cfg.warmup_iters, cfg.warmup_ratio, cfg.schedule
        )
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        if self.amp_dtype is torch.float16 and self.device.type != "cuda":
            raise ValueError("--amp fp16 needs CUDA; use --amp bf16 on the CPU")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        if resume is not None:
            self.optimizer.load_state_dict(resume["optimizer"])
            if "scaler" in resume:
                self.scaler.load_state_dict(resume["scaler"])
        self.model = self.net
        if env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.recorder = Recorder(self.work_dir, env.is_main, cfg.tensorboard)

    # -- set-up ------------------------------------------------------------------------------
    def _open_data(self) -> tuple[DatasetInfo, DatasetInfo | None]:
        cfg = self.cfg
        train = open_dataset(cfg.data, cfg.train_split, cfg.classes)
        val = open_dataset(cfg.data, cfg.val_split, cfg.classes) if cfg.val_interval else None
        per_step = cfg.batch_size * self.env.world_size
        if per_step > len(train.samples):
            raise DatasetError(
                f"batch size {cfg.batch_size} x {self.env.world_size} process(es) = {per_step} images "
                f"per step, but {train.root} ({train.split}) holds only {len(train.samples)}"
            )
        for info in (train, val):
            if info is not None and (info is train or info.samples != train.samples):
                log.info(
                    "checking %d %s samples of %s (%s layout)", len(info.samples), info.split, info.root, info.layout
                )
                check_dataset(info, values=cfg.check_labels, show_progress=sys.stderr.isatty())
        return train, val

    def _initial_weights(self) -> tuple[int, dict | None]:
        cfg = self.cfg
        # Rank 0 picks the file so that every process resumes from the same one (the work dir must
        # be on storage that all nodes see, as checkpoints are written by rank 0 only).
        resume_path = share_from_main(self._resume_path, self.env)
        if resume_path is not None:
            ckpt = load_training_checkpoint(resume_path)
            check_same_model(resume_path, ckpt["state_dict"], self.net, cfg.arch, ckpt.get("meta"))
            self.net.load_state_dict(ckpt["state_dict"])
            state = ckpt["train_state"]
            self._warn_if_changed(state)
            log.info("resumed from %s at iteration %d", resume_path, state["iter"])
            return int(state["iter"]), ckpt
        if cfg.load_from:  # a whole model's weights make the ImageNet backbone init moot
            log.info("%s", load_pretrained(self.net, cfg.load_from))
        elif cfg.backbone_weights:
            log.info("%s", load_backbone_weights(self.net, cfg.backbone_weights))
        return 0, None

    def _resume_path(self) -> Path | None:
        if self.cfg.resume == "auto":
            path = find_latest(self.work_dir)
            if path is None:
                log.info("--resume: no checkpoint in %s yet, starting from the beginning", self.work_dir)
            return path
        return Path(self.cfg.resume) if self.cfg.resume else None

    def _warn_if_changed(self, state: dict) -> None:
        now = {
            "iters": self.cfg.iters,
            "batch_size": self.cfg.batch_size,
            "world_size": self.env.world_size,
            "seed": self.cfg.seed,
            "schedule": self.cfg.schedule,
        }
        changed = [
            f"{k} {state.get(k)} -> {v}" for k, v in now.items() if state.get(k) is not None and state.get(k) != v
        ]
        if changed:
            log.warning(
                "resuming with changed settings (%s): the run will not match an uninterrupted one", ", ".join(changed)
            )

    def _use_sync_bn(self) -> bool:
        if self.cfg.sync_bn == "off":
            return False
        if self.device.type != "cuda":
            if self.cfg.sync_bn == "on":
                log.warning("--sync-bn on: PyTorch's SyncBatchNorm runs on GPUs only; plain BN on the CPU")
            return False
        return True

    def _configure_backends(self) -> None:
        cv2.setNumThreads(0)  # as mmseg's opencv_num_threads=0: the DataLoader workers are the parallelism
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.cfg.cudnn_benchmark and not self.cfg.deterministic
        if self.cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

    def _loader(self) -> torch.utils.data.DataLoader:
        cfg = self.cfg
        transform = TrainTransform(
            crop=tuple(cfg.crop),
            scale=tuple(cfg.scale),
            ratio_range=tuple(cfg.ratio_range),
            cat_max_ratio=cfg.cat_max_ratio,
            flip_prob=cfg.flip_prob,
            photometric=PhotoMetricDistortion() if cfg.photometric else None,
        )
        dataset = TrainDataset(self.train_info, transform, cfg.seed)
        sampler = IterationSampler(
            len(dataset), cfg.batch_size, self.env.world_size, self.env.rank, cfg.seed, self.start_iter
        )
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.workers > 0,
        )

    # -- the loop ----------------------------------------------------------------------------
    def step(self, iteration: int, images, labels, valid) -> dict[str, torch.Tensor]:
        lr = self.schedule(iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = normalise_batch(images.to(self.device, non_blocking=True), valid)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True).long()
        torch.manual_seed(iteration_seed(self.cfg.seed, iteration, self.env.rank))  # dropout draws
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        )
        with autocast:
            outputs = self.model(x)
        losses = segmentation_losses(outputs, labels, self.cfg.aux_weight)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}

    def run(self, on_iteration: Callable[[int], None] | None = None) -> Path | None:
        cfg, env = self.cfg, self.env
        self.model.train()
        if self.start_iter >= cfg.iters:
            log.info("nothing to do: the run already reached %d iterations", cfg.iters)
            return find_latest(self.work_dir)
        log.info(
            "training %s (%s) on %s: %d images, %d classes, %d process(es) x batch %d, iterations %d-%d, "
            "device %s, amp %s",
            cfg.preset,
            cfg.arch,
            self.train_info.root,
            len(self.train_info.samples),
            self.train_info.num_classes,
            env.world_size,
            cfg.batch_size,
            self.start_iter,
            cfg.iters,
            self.device,
            cfg.amp,
        )
        images_per_step = cfg.batch_size * env.world_size
        bar = tqdm(
            total=cfg.iters,
            initial=self.start_iter,
            desc="train",
            disable=not (env.is_main and sys.stderr.isatty()),
            dynamic_ncols=True,
        )
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        window_start, window_iters, data_time = time.perf_counter(), 0, 0.0
        run_start, last_path = time.perf_counter(), None
        batches = iter(self._loader())
        try:
            for iteration in range(self.start_iter, cfg.iters):
                t0 = time.perf_counter()
                images, labels, valid = next(batches)
                data_time += time.perf_counter() - t0
                for key, value in self.step(iteration, images, labels, valid).items():
                    sums[key] += value
                done, window_iters = iteration + 1, window_iters + 1
                bar.update()
                if done % cfg.log_interval == 0 or done == cfg.iters:
                    elapsed = time.perf_counter() - window_start
                    self._log_train(
                        done,
                        sums,
                        window_iters,
                        elapsed,
                        data_time,
                        images_per_step,
                        bar,
                        (time.perf_counter() - run_start) / (done - self.start_iter),
                    )
                    sums.clear()
                    window_start, window_iters, data_time = time.perf_counter(), 0, 0.0
                paused = time.perf_counter()
                if done % cfg.ckpt_interval == 0 or done == cfg.iters:
                    last_path = self.save(done)
                if self.val_info is not None and (done % cfg.val_interval == 0 or done == cfg.iters):
                    self.validate(done)
                paused = time.perf_counter() - paused  # saving and validating are not training speed
                window_start, run_start = window_start + paused, run_start + paused
                if on_iteration is not None:
                    on_iteration(done)
        finally:
            bar.close()
            self.recorder.close()
        return last_path

    def _log_train(self, done, sums, n, elapsed, data_time, images_per_step, bar, sec_per_iter) -> None:
        keys = sorted(sums)
        values = torch.stack([sums[k] for k in keys]) / n
        if self.env.distributed:
            torch.distributed.all_reduce(values)
            values /= self.env.world_size
        means = dict(zip(keys, values.tolist()))
        if not np.isfinite(means["loss"]):
            raise FloatingPointError(
                f"the loss became {means['loss']} at iteration {done}; lower --lr or check the data"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        scalars = {
            "lr": lr,
            **means,
            "time": elapsed / n,
            "data_time": data_time / n,
            "img_per_s": images_per_step * n / elapsed,
        }
        memory = ""
        if self.device.type == "cuda":
            scalars["memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            memory = f"  memory: {scalars['memory_mb']:.0f}MB"
        eta = tqdm.format_interval(sec_per_iter * (self.cfg.iters - done))
        losses = "  ".join(f"{k}: {means[k]:.4f}" for k in ("loss", *LOSS_NAMES) if k in means)
        log.info(
            "Iter(train) [%d/%d]  lr: %.4e  eta: %s  time: %.3f  data_time: %.3f  img/s: %.1f%s  %s",
            done,
            self.cfg.iters,
            lr,
            eta,
            scalars["time"],
            scalars["data_time"],
            scalars["img_per_s"],
            memory,
            losses,
        )
        bar.set_postfix_str(f"loss {means['loss']:.3f} lr {lr:.2e} {scalars['img_per_s']:.1f} img/s eta {eta}")
        self.recorder.write("train", done, scalars)

    def save(self, done: int) -> Path | None:
        """Checkpoint from rank 0; every rank's weights are compared first (they must agree)."""
        broadcast_buffers(self.net)
        state = clean_state_dict(self.net)
        digests = gather_objects(state_digest(state), self.env)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks hold different weights at iteration {done}: {digests}")
        path = None
        if self.env.is_main:
            cfg, info = self.cfg, self.train_info
            checkpoint = {
                "meta": build_meta(
                    classes=info.classes,
                    palette=info.palette,
                    arch=cfg.arch,
                    iteration=done,
                    config_json=cfg.to_json(),
                    seed=cfg.seed,
                    preset=cfg.preset,
                ),
                "state_dict": state,
                "optimizer": self.optimizer.state_dict(),
                "train_state": {
                    "iter": done,
                    "iters": cfg.iters,
                    "batch_size": cfg.batch_size,
                    "world_size": self.env.world_size,
                    "seed": cfg.seed,
                    "schedule": cfg.schedule,
                    "rank_digests": digests,
                },
            }
            if self.scaler.is_enabled():
                checkpoint["scaler"] = self.scaler.state_dict()
            path = save_training_checkpoint(self.work_dir, done, checkpoint, self.cfg.max_keep_ckpts)
            log.info("saved %s", path)
        if self.env.distributed:
            torch.distributed.barrier()
        return path

    def validate(self, done: int) -> dict:
        broadcast_buffers(self.net)
        start = time.perf_counter()
        metrics = evaluate(
            self.net,
            self.val_info,
            self.device,
            scale=tuple(self.cfg.test_scale),
            env=self.env,
            workers=min(self.cfg.workers, 2),
            show_progress=sys.stderr.isatty(),
        )
        self.model.train()
        log.info(
            "Iter(val) [%d]  aAcc: %.2f  mIoU: %.2f  mAcc: %.2f  (%.1fs)\n%s",
            done,
            metrics["aAcc"],
            metrics["mIoU"],
            metrics["mAcc"],
            time.perf_counter() - start,
            format_table(self.val_info.classes, metrics),
        )
        self.recorder.write("val", done, {k: metrics[k] for k in ("aAcc", "mIoU", "mAcc")})
        return metrics


def train(cfg: TrainConfig, on_iteration: Callable[[int], None] | None = None) -> Path | None:
    """Run (or resume) training; returns the last checkpoint written. Joins torchrun's group."""
    env = init_distributed(cfg.device)
    try:
        return Trainer(cfg, env).run(on_iteration)
    finally:
        cleanup_distributed()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.print_config:
        print(cfg.to_json())
        return 0
    try:
        path = train(cfg)
    except (DatasetError, CheckpointError, ValueError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if path is not None:
        print(f"final checkpoint: {path}")
    return 0
