"""The reference study's PyTorch training loop (docs/study.md), as the yardstick for `normtf bench`.

Same model, data, augmentation and optimizer as the study, on the same MNIST arrays normtf reads.
One liberty: the rotation is done for the whole batch with affine_grid + grid_sample (nearest,
black fill) instead of torchvision's per-image PIL rotation, which would make the yardstick
slower than the reference really is (torchvision cannot be installed beside this torch anyway).
"""

from __future__ import annotations

import math
import time

import numpy as np

from normtf.config import TrainConfig
from normtf.data import load
from normtf.errors import NormtfError
from normtf.norms import get_norm

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:
    raise NormtfError("PyTorch is not installed: pip install 'normtf[bench]' (torch==2.13.0)") from None

NORMS = {
    "batch-l1": lambda channels, size: nn.BatchNorm2d(channels),
    "batch": lambda channels, size: nn.BatchNorm2d(channels),
    "layer": lambda channels, size: nn.LayerNorm([channels, size, size]),
    "group": lambda channels, size: nn.GroupNorm(2, channels),
    "layer-c": lambda channels, size: nn.GroupNorm(1, channels),
}  # PyTorch's side of normtf.norms.NORMS
PARAMS = {"batch-l1": 9_910, "batch": 9_910, "layer": 66_974, "group": 9_910, "layer-c": 9_910}


def build(norm: str, dropout: float = 0.1) -> nn.Module:
    """The network table of docs/study.md, channels-first; `size` is each block's output height and width."""
    def block(cin, cout, size, padding=0):
        return [nn.Conv2d(cin, cout, 3, padding=padding, bias=False), nn.ReLU(),
                NORMS[norm](cout, size), nn.Dropout(dropout)]

    model = nn.Sequential(
        *block(1, 14, 26), *block(14, 28, 24),
        nn.Conv2d(28, 12, 1, bias=False), nn.MaxPool2d(2),
        *block(12, 14, 10), *block(14, 12, 8), *block(12, 12, 6), *block(12, 12, 6, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Conv2d(12, 10, 1, bias=False), nn.Flatten(), nn.LogSoftmax(dim=1),
    )
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMS[norm], f"{norm}: {count} parameters, the reference has {PARAMS[norm]}"
    return model


def rotate(images: torch.Tensor, max_degrees: float) -> torch.Tensor:
    """Each image by its own angle, uniform in +-max_degrees, about its centre; corners black."""
    angle = (torch.rand(len(images)) * 2 - 1) * math.radians(max_degrees)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def measure(norm: str, steps: int, warmup: int, repeats: int, gate=lambda: None, done=lambda: None) -> list[float]:
    """Training images per second over `repeats` windows of `steps` steps, after `warmup` steps;
    gate() is called before each window and done() after it."""
    config = TrainConfig(norm=norm)
    torch.manual_seed(config.seed)
    data = load("mnist")
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train.astype(np.int64))
    model = build(norm, config.dropout).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    l1 = config.l1 if get_norm(norm).l1 else 0.0  # over all parameters, as the study did

    def batches():
        while True:  # a fresh shuffle each epoch, last batch smaller, as DataLoader(shuffle=True)
            yield from torch.randperm(len(x)).split(config.batch_size)

    def step(idx) -> int:
        images = rotate(x[idx].unsqueeze(1).float() / 255, config.rotation)
        loss = F.nll_loss(model((images - data.mean) / data.std), y[idx])
        if l1:
            loss = loss + l1 * sum(p.abs().sum() for p in model.parameters())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return len(idx)

    stream = batches()
    for _ in range(warmup):
        step(next(stream))
    rates = []
    for _ in range(repeats):
        gate()
        start = time.perf_counter()
        images = sum(step(next(stream)) for _ in range(steps))
        rates.append(images / (time.perf_counter() - start))
        done()
    return rates
