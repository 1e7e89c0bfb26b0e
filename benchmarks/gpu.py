"""Trainer speed on a CUDA GPU: images per second and the fraction of the GPU's matrix rate.

    python benchmarks/gpu.py [--rounds 5] [--num-images 2000]

Not part of CI: it needs a CUDA GPU and exits with status 2 and a message when there is
none. It measures, side by side in one run:

- the default configuration's training images per second, against the images per second
  that the GPU's float32 matrix-product rate (an 8192 x 8192 product, TF32 off as in
  torch's default) allows at the model's FLOPs per training image;
- the same trainer with the generator's nn.Sequential path (upsampling, then
  ConvTranspose2d through cuDNN) in place of the fused kernels that were tuned on CPUs
  (on a GPU the trainer runs them through autograd, not by its CPU hand-written step);
- one evaluate() against one train_epoch().
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import median, reference_forward
from speed import training_flops

from glo_search import classifier as digit_classifier
from glo_search.config import TrainConfig
from glo_search.data import load_dataset
from glo_search.model import GloGenerator
from glo_search.trainer import Trainer


def cuda_seconds(function) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def matmul_rate(size: int = 8192) -> float:
    """Return the float32 FLOP/s of one (size x size) matrix product on the GPU."""
    a = torch.randn(size, size, device="cuda")
    b = torch.randn(size, size, device="cuda")
    a @ b  # warm-up
    return median([2 * size**3 / cuda_seconds(lambda: a @ b) for _ in range(5)])


def epoch_seconds(trainer: Trainer, rounds: int) -> float:
    trainer.train_epoch()  # warm-up: kernel selection, allocator
    return median([cuda_seconds(trainer.train_epoch) for _ in range(rounds)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs (default: 5)")
    parser.add_argument("--num-images", type=int, default=2000, help="(default: 2000)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU is available: this benchmark measures a GPU, so nothing was run")
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    config = TrainConfig(num_images=args.num_images)
    dataset = load_dataset(config)
    trainer = Trainer(config, dataset, digit_classifier.load_state(), device="cuda")

    flops = training_flops(trainer, lambda c, z: reference_forward(trainer.generator, c, z))
    rate = matmul_rate()
    fused_s = epoch_seconds(trainer, args.rounds)
    eval_s = median([cuda_seconds(trainer.evaluate) for _ in range(args.rounds)])

    # The same trainer with the generator's module path: patch the class for this run only.
    fused_forward = GloGenerator.forward
    GloGenerator.forward = reference_forward
    try:
        module_s = epoch_seconds(Trainer(config, dataset, device="cuda"), args.rounds)
    finally:
        GloGenerator.forward = fused_forward

    images_per_s = len(dataset) / fused_s
    limit = rate / flops
    print(f"model FLOPs per training image (forward + backward): {flops / 1e6:.2f} M")
    print(f"float32 matrix product: {rate / 1e12:.1f} TFLOP/s")
    print(
        f"trainer: {fused_s:.3f} s per epoch = {images_per_s:.0f} images/s; the arithmetic "
        f"limit is {limit:.0f} images/s; fraction {images_per_s / limit:.4f}"
    )
    print(
        f"nn.Sequential generator path: {module_s:.3f} s per epoch "
        f"({module_s / fused_s:.2f}x the fused kernels' time)"
    )
    print(f"evaluate: {eval_s:.3f} s, {eval_s / fused_s:.2f}x a training epoch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
