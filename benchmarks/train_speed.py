"""Detector training/inference speed: images/s, s per four-view exam, peak RSS.

Measured, not asserted. Configurations in one run (same machine, same size):

* ``tiny``       tiny backbone, 64-ch FPN, 2 head convs (the test model)
* ``resnet18``   ResNet-18, 64-ch FPN, 2 head convs (the project default)
* ``resnet18-tv-default-head``  ResNet-18, 256-ch FPN, 4 head convs: the
  torchvision default head, as the baseline
* ``small-04`` / ``medium-04``  the recommended 0.4 mm recipe's model and
  the ``medium`` body (stop 52), at the recipe's 256 px patches:
  ``--models small-04,medium-04 --size 256x256 --batch 8``
* ``small-lesion-recipe``  the CPU lesion recipe's model (``small``, speck
  channel, 0.2 mm), against ``small`` without the speck channel:
  ``--models small,small-lesion-recipe --size 1024x640`` (a mini-MIAS image at
  its native pitch) for inference, ``--size 384x384`` for the patch training

Each figure is one JSON line (``benchmarks.common.emit``) appended to
``benchmarks/results/train_speed.jsonl``. On CUDA the model runs bf16 autocast
+ channels_last and the fraction of the card's dense bf16 peak is reported
(FLOPs of one training step counted with ``torch.utils.flop_counter``).

Examples::

    python -m benchmarks.train_speed                       # CPU, 512x512, short
    python -m benchmarks.train_speed --device cuda --size 1024x832 --batch 16
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from common.detector.engine import prepare_model, seed_everything  # noqa: E402
from common.detector.model import ModelConfig, build_detector  # noqa: E402

BENCH = "train_speed"

CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(arch="tiny", fpn_channels=64, head_convs=2),
    "resnet18": ModelConfig(arch="resnet18", fpn_channels=64, head_convs=2),
    "resnet18-tv-default-head": ModelConfig(
        arch="resnet18", fpn_channels=256, head_convs=4
    ),
    # the CPU lesion recipe (docs/detector.md) and its baseline without the
    # speck channel, at mini-MIAS's native 0.2 mm
    "small": ModelConfig(arch="small", fpn_channels=64, working_spacing_mm=0.2),
    "small-lesion-recipe": ModelConfig(
        arch="small", fpn_channels=64, working_spacing_mm=0.2, speck_channel=True
    ),
    # the recommended 0.4 mm recipe's model and its deeper, wider body
    # (stop 52): ``--models small-04,medium-04 --size 256x256 --batch 8``
    "small-04": ModelConfig(
        arch="small", fpn_channels=64, working_spacing_mm=0.4, speck_channel=True
    ),
    "medium-04": ModelConfig(
        arch="medium", fpn_channels=64, working_spacing_mm=0.4, speck_channel=True
    ),
}

#: Dense bf16 peak (FLOP/s) by GPU name fragment.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


_RESULTS_DIR: str | None = None


def out(figure: str, value: float, unit: str, **ctx: object) -> None:
    """Emit one figure to the results file (``--results-dir`` if given)."""
    emit(BENCH, figure, value, unit, results_dir=_RESULTS_DIR, **ctx)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB, Linux ru_maxrss)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_batch(batch: int, h: int, w: int, device: torch.device):
    """Synthetic batch: noise images with one 'mass' box each (model space)."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, h, w, generator=g).to(device) for _ in range(batch)]
    bw, bh = max(8, w // 8), max(8, h // 8)
    targets = [
        {
            "boxes": torch.tensor([[w / 3, h / 3, w / 3 + bw, h / 3 + bh]]).to(device),
            "labels": torch.tensor([i % 2]).to(device),
        }
        for i in range(batch)
    ]
    return images, targets


def train_step(model, opt, images, targets, device, amp):
    opt.zero_grad(set_to_none=True)
    ctx = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if amp and device.type == "cuda"
        else torch.autocast(device.type, enabled=False)
    )
    with ctx:
        loss = sum(model(images, targets).values())
    loss.backward()
    opt.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_one(name, cfg, args, device, h, w):
    seed_everything(0)
    model = prepare_model(build_detector(cfg), device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, targets = make_batch(args.batch, h, w, device)
    amp = device.type == "cuda"
    ctx = dict(
        model=name,
        arch=cfg.arch,
        fpn_channels=cfg.fpn_channels,
        head_convs=cfg.head_convs,
        size=f"{h}x{w}",
        batch=args.batch,
        steps=args.steps,
        device=str(device),
        amp_bf16=amp,
        channels_last=device.type == "cuda",
        threads=torch.get_num_threads(),
        params=sum(p.numel() for p in model.parameters()),
        loadavg_1min=os.getloadavg()[0],
    )
    model.train()
    for _ in range(args.warmup):
        train_step(model, opt, images, targets, device, amp)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, opt, images, targets, device, amp)
    sync(device)
    dt = time.perf_counter() - t0
    ips = args.batch * args.steps / dt
    out("train_images_per_s", ips, "img/s", **ctx)
    out("train_s_per_image", 1.0 / ips, "s", **ctx)

    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            train_step(model, opt, images, targets, device, amp)
        flops_step = float(fc.get_total_flops())
        achieved = flops_step * args.steps / dt
        gpu = torch.cuda.get_device_name(0)
        peak = next((v for k, v in BF16_PEAK.items() if k in gpu), None)
        out(
            "train_tflops",
            achieved / 1e12,
            "TFLOP/s",
            **ctx,
            flops_per_step=flops_step,
        )
        if peak is not None:
            out(
                "bf16_peak_fraction",
                achieved / peak,
                "fraction",
                **ctx,
                gpu=gpu,
                peak_tflops=peak / 1e12,
            )
        out(
            "cuda_peak_memory",
            torch.cuda.max_memory_allocated() / 2**20,
            "MiB",
            **ctx,
        )

    # inference: one four-view exam (4 images) per forward pass, batched
    model.eval()
    exam = [im for im in make_batch(4, h, w, device)[0]]
    with torch.no_grad():
        for _ in range(max(1, args.warmup)):
            model(exam)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.infer_reps):
            with (
                torch.autocast("cuda", dtype=torch.bfloat16)
                if amp
                else torch.autocast(device.type, enabled=False)
            ):
                model(exam)
        sync(device)
    s_exam = (time.perf_counter() - t0) / args.infer_reps
    out(
        "infer_s_per_four_view_exam",
        s_exam,
        "s",
        **ctx,
        reps=args.infer_reps,
        note="model forward only, images already decoded",
    )
    out("infer_s_per_image", s_exam / 4, "s", **ctx, reps=args.infer_reps)
    out("peak_rss_process_so_far", peak_rss_mib(), "MiB", **ctx)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--size", default="512x512", help="HxW in model pixels")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--infer-reps", type=int, default=2)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared 2-core box, 2 threads spin against "
        "other load and ran up to 10x slower)",
    )
    ap.add_argument("--results-dir", default=None, help="default benchmarks/results")
    ap.add_argument(
        "--models", default=",".join(CONFIGS), help=f"subset of {list(CONFIGS)}"
    )
    args = ap.parse_args(argv)
    global _RESULTS_DIR
    _RESULTS_DIR = args.results_dir
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    h, w = (int(v) for v in args.size.lower().split("x"))
    for name in args.models.split(","):
        if name not in CONFIGS:
            ap.error(f"unknown model {name!r} (valid: {', '.join(CONFIGS)})")
        bench_one(name, CONFIGS[name], args, device, h, w)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
