"""Parity and speed of bisenet-serve against a real mmsegmentation 1.x installed beside it.

Run in a venv that has mmsegmentation==1.2.2, mmengine, mmcv-lite<2.2 and this project
(`make parity` builds one, .venv-parity/, and runs this in it; `make test` runs the same checks as
tests/test_mmseg_parity.py there):

    python tools/parity_mmseg.py [--archs r18 r50] [--speed-iters 5] [--no-speed] [--json out.json]

What it does, with random (seeded) weights in the mmsegmentation checkpoint layout and non-trivial
BatchNorm statistics, since the official files cannot be fetched everywhere:
  1. saves `{'meta', 'state_dict'}` checkpoints made by our `build_model`;
  2. builds mmsegmentation's own model from the config files its wheel ships and loads them with
     `mmseg.apis.init_model` (mmengine's loader, not ours);
  3. compares decode-head logits on the same normalised input (our network as built must equal
     mmseg's bit for bit; the BN-folded engine within a relative error = max |diff| / max |mmseg|),
     and labels of `mmseg.apis.inference_model` against `Segmenter.predict` on a
     2048x1024 frame and on photos of other sizes (which both sides resize);
  4. times `Segmenter.predict` against `inference_model` with R18 on the 2048x1024 frame,
     interleaved in one process.
Exits non-zero when a check misses its threshold (THRESHOLDS below).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

# What is required, from what was measured (BENCHMARKS.md, "Parity with mmsegmentation 1.2.2"):
# - logits_abs: our network as built against mmseg's, on the same input: bit-identical (measured 0);
# - folded_logits_rel: the BN-folded engine that Segmenter runs, max |diff| / max |mmseg| (measured
#   9.1e-06 R18, 8.6e-05 R50: fp32 rounding of the folded weights, not a model difference);
# - frame_agree / photo_agree: share of equal labels, Segmenter.predict against inference_model
#   (measured >= 99.9973 % on the 2048x1024 frame, >= 99.9950 % on the photos);
# - speedup: Segmenter.predict against inference_model on the CPU (measured 1.43-1.48x).
THRESHOLDS = {
    "logits_abs": 0.0,
    "folded_logits_rel": {"r18": 2e-5, "r50": 1e-4},
    "frame_agree": 0.99995,
    "photo_agree": 0.9999,
    "speedup": 1.10,
}
CONFIGS = {
    "r18": "bisenetv1/bisenetv1_r18-d32_4xb4-160k_cityscapes-1024x1024.py",
    "r50": "bisenetv1/bisenetv1_r50-d32_4xb4-160k_cityscapes-1024x1024.py",
}


def stub_mmcv_ops() -> None:
    """mmcv-lite has no compiled ops; mmseg imports a few names from `mmcv.ops` at import time
    (for heads BiSeNetV1 never uses), so a placeholder module satisfies those imports."""
    if "mmcv.ops" in sys.modules:
        return
    module = types.ModuleType("mmcv.ops")

    def missing(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def fail(*args, **kwargs):
            raise RuntimeError(f"mmcv.ops.{name} is stubbed out (mmcv-lite)")

        return type(name, (), {"__init__": fail, "__call__": fail})

    module.__getattr__ = missing  # type: ignore[attr-defined]
    sys.modules["mmcv.ops"] = module
    import mmcv

    mmcv.ops = module  # type: ignore[attr-defined]


def mmseg_config_path(arch: str) -> Path:
    import mmseg

    path = Path(mmseg.__file__).parent / ".mim" / "configs" / CONFIGS[arch]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the mmsegmentation wheel should ship its configs")
    return path


def calibrate_bn(net: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics that keep activations in a trained network's range: running
    statistics measured on real photos (as training would leave them), random affine parameters."""
    from model.transforms import normalise

    g = torch.Generator().manual_seed(seed)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
        m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    net.train()
    with torch.no_grad():
        # One batch: the GAP branch's BN needs more than one value per channel in train mode.
        batch = torch.cat([normalise(torch.from_numpy(im)[None], (256, 512)) for im in photos(calibration=True)])
        net(batch)
    for m in bns:
        m.momentum = 0.1
    net.eval()


def make_checkpoint(arch: str, path: Path, seed: int = 0) -> Path:
    """An mmsegmentation-layout checkpoint (with aux heads) of our network with random weights."""
    from model import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, build_model

    torch.manual_seed(seed)
    net = build_model(f"bisenetv1_{arch}")
    calibrate_bn(net, seed + 1)
    # A larger classifier spread than the std-0.01 init keeps the classes apart, like a trained net.
    for head in [net.decode_head, *net.auxiliary_head]:
        torch.nn.init.normal_(head.conv_seg.weight, std=0.5)
        torch.nn.init.normal_(head.conv_seg.bias, std=0.5)
    meta = {"CLASSES": CITYSCAPES_CLASSES, "PALETTE": [list(c) for c in CITYSCAPES_PALETTE]}
    torch.save({"meta": meta, "state_dict": net.state_dict()}, path)
    return path


def load_mmseg(arch: str, checkpoint: Path):
    stub_mmcv_ops()
    from mmengine.model.utils import revert_sync_batchnorm
    from mmseg.apis import init_model

    # As mmseg's demo does on the CPU: the configs use SyncBN, which needs a process group in training.
    model = init_model(str(mmseg_config_path(arch)), str(checkpoint), device="cpu")
    return revert_sync_batchnorm(model).eval()


def photos(calibration: bool = False):
    """Real RGB photos of several sizes, and a 2048x1024 frame made from one of them
    (or, for BN calibration, other photos than those compared)."""
    from PIL import Image
    from skimage import data

    if calibration:
        return [np.ascontiguousarray(im[::-1]) for im in (data.astronaut(), data.coffee(), data.rocket())]

    shots = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}
    frame = np.asarray(Image.fromarray(data.rocket()).resize((2048, 1024), Image.BICUBIC))
    return {"frame_2048x1024": frame, **shots}


def logits_error(arch: str, mm_model, net, engine, image: np.ndarray) -> dict:
    """Decode logits on one normalised input (no resize involved): mmseg's network against ours
    as built, and against the BN-folded engine that Segmenter runs."""
    from model.transforms import normalise

    batch = torch.from_numpy(image)[None]
    x = normalise(batch, image.shape[:2])
    with torch.no_grad():
        ref = mm_model.decode_head(mm_model.extract_feat(x))
        ours = net(x)
        folded = engine.net(x).float()  # the engine's own logits() would resize to the test size
    scale = float(ref.abs().max())
    return {
        "arch": arch,
        "input": list(image.shape[:2]),
        "shape": list(ref.shape),
        "max_abs_ref": scale,
        "max_abs_diff": float((ours - ref).abs().max()),
        "rel_err": float((ours - ref).abs().max()) / scale,
        "folded_rel_err": float((folded - ref).abs().max()) / scale,
    }


def logits_ok(row: dict) -> bool:
    return (
        row["max_abs_diff"] <= THRESHOLDS["logits_abs"]
        and row["folded_rel_err"] <= THRESHOLDS["folded_logits_rel"][row["arch"]]
    )


def agreement_needed(image_name: str) -> float:
    return THRESHOLDS["frame_agree" if image_name.startswith("frame") else "photo_agree"]


def mmseg_labels(mm_model, image_rgb: np.ndarray) -> np.ndarray:
    from mmseg.apis import inference_model

    # inference_model takes OpenCV-style BGR arrays; the data preprocessor flips them to RGB.
    result = inference_model(mm_model, np.ascontiguousarray(image_rgb[:, :, ::-1]))
    return result.pred_sem_seg.data[0].cpu().numpy().astype(np.uint8)


def label_agreement(mm_model, segmenter, images: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for name, image in images.items():
        ref = mmseg_labels(mm_model, image)
        ours = segmenter.predict(image)
        assert ours.shape == ref.shape, (ours.shape, ref.shape)
        counts = np.bincount(ref.ravel(), minlength=19)
        rows.append(
            {
                "image": name,
                "size": f"{image.shape[1]}x{image.shape[0]}",
                "agreement": float((ours == ref).mean()),
                "classes_present": int((counts > 0).sum()),
                "largest_class_share": float(counts.max() / counts.sum()),
            }
        )
    return rows


def time_side_by_side(mm_model, segmenter, image: np.ndarray, iters: int) -> dict:
    """Median wall time per call, the two alternating so load from elsewhere hits both alike."""
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    from mmseg.apis import inference_model

    inference_model(mm_model, bgr)
    segmenter.predict(image)
    ours, theirs = [], []
    for _ in range(iters):
        t = time.perf_counter()
        inference_model(mm_model, bgr)
        theirs.append(time.perf_counter() - t)
        t = time.perf_counter()
        segmenter.predict(image)
        ours.append(time.perf_counter() - t)
    mm_s, our_s = statistics.median(theirs), statistics.median(ours)
    # Under load from other processes, the fastest call and each back-to-back pair are steadier.
    return {
        "mmseg_inference_model_s": mm_s,
        "segmenter_predict_s": our_s,
        "speedup": mm_s / our_s,
        "speedup_best": min(theirs) / min(ours),
        "speedup_pairwise_median": statistics.median(t / o for t, o in zip(theirs, ours)),
        "iters": iters,
        "mmseg_all_s": theirs,
        "segmenter_all_s": ours,
    }


def run(archs: list[str], speed_iters: int, workdir: Path, speed_only: bool = False) -> dict:
    import mmengine
    import mmseg

    from model import Segmenter, build_model, load_checkpoint
    from model.bench import cpu_name

    report: dict = {
        "versions": {"mmsegmentation": mmseg.__version__, "mmengine": mmengine.__version__, "torch": torch.__version__},
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "logits": [],
        "labels": {},
        "ok": True,
    }
    images = photos()
    for arch in archs:
        ckpt = make_checkpoint(arch, workdir / f"bisenetv1_{arch}_random.pth")
        mm_model = load_mmseg(arch, ckpt)
        net = build_model(f"bisenetv1_{arch}").eval()
        load_checkpoint(net, ckpt)
        segmenter = Segmenter(f"bisenetv1_{arch}", weights=str(ckpt))
        for image in () if speed_only else (images["coffee"], images["chelsea"][:95, :27]):  # 400x600 and an odd 95x27
            row = logits_error(arch, mm_model, net, segmenter.engine, image)
            row["ok"] = logits_ok(row)
            report["logits"].append(row)
            print(
                f"[logits] {arch} input {row['input']} -> {row['shape']}: max|ref| {row['max_abs_ref']:.3g}, "
                f"max|diff| {row['max_abs_diff']:.3g} (need 0), BN-folded engine relative error "
                f"{row['folded_rel_err']:.2e} (need <= {THRESHOLDS['folded_logits_rel'][arch]:.0e}) "
                f"{'ok' if row['ok'] else 'FAIL'}"
            )
        rows = [] if speed_only else label_agreement(mm_model, segmenter, images)
        for row in rows:
            need = agreement_needed(row["image"])
            row["ok"] = row["agreement"] >= need
            print(
                f"[labels] {arch} {row['image']} {row['size']}: {100 * row['agreement']:.4f}% equal "
                f"(need {100 * need:.3f}%), {row['classes_present']} classes, largest "
                f"{100 * row['largest_class_share']:.1f}% {'ok' if row['ok'] else 'FAIL'}"
            )
        report["labels"][arch] = rows
        if arch == "r18" and speed_iters > 0:
            speed = time_side_by_side(mm_model, segmenter, images["frame_2048x1024"], speed_iters)
            speed["ok"] = speed["speedup"] >= THRESHOLDS["speedup"]
            report["speed_r18_2048x1024"] = speed
            print(
                f"[speed] R18 2048x1024 on {report['cpu']} ({report['torch_threads']} threads): "
                f"inference_model {1000 * speed['mmseg_inference_model_s']:.0f} ms, Segmenter.predict "
                f"{1000 * speed['segmenter_predict_s']:.0f} ms (median of {speed_iters}): "
                f"{speed['speedup']:.2f}x (best call {speed['speedup_best']:.2f}x, median of pairs "
                f"{speed['speedup_pairwise_median']:.2f}x) {'ok' if speed['ok'] else 'FAIL'}"
            )
        del mm_model, net, segmenter
    checks = [r["ok"] for r in report["logits"]] + [r["ok"] for rows in report["labels"].values() for r in rows]
    checks += [report["speed_r18_2048x1024"]["ok"]] if "speed_r18_2048x1024" in report else []
    report["ok"] = all(checks)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", choices=sorted(CONFIGS), default=["r18", "r50"])
    parser.add_argument("--speed-iters", type=int, default=5, help="timed calls per side (0: no speed test)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed comparison")
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="only time inference_model against Segmenter.predict (R18, 2048x1024 frame)",
    )
    parser.add_argument("--json", type=Path, help="also write the full report here")
    parser.add_argument("--threads", type=int, help="torch CPU threads for both sides (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bisenet-parity-") as tmp:
        archs = ["r18"] if args.speed_only else args.archs
        report = run(archs, 0 if args.no_speed else args.speed_iters, Path(tmp), args.speed_only)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print("PARITY OK" if report["ok"] else "PARITY FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
