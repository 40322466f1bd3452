"""Batches from a dataset plugin's tensors: shuffled with a seeded generator, moved to the device, scaled to [0, 1],
then transformed (augmentation for training, the evaluation view otherwise).

Datasets are held as tensors rather than served through a DataLoader: every dataset of the paper fits in memory as
uint8 (Tiny ImageNet's training set is 1.2 GB), and batched on-device transforms keep the GPU fed without
worker processes.
"""

from __future__ import annotations

from typing import Iterator

import torch

from harness.plugin import Split, Transform


def to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def num_batches(n: int, batch_size: int, max_batches: int | None = None) -> int:
    count = (n + batch_size - 1) // batch_size
    return count if max_batches is None else min(count, max_batches)


def batches(
    split: Split,
    batch_size: int,
    device: torch.device,
    *,
    transform: Transform | None = None,
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) on `device`. With a generator the order is shuffled (and seeded by it), else fixed."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for b in range(num_batches(n, batch_size, max_batches)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        x = to_float(split.images[idx].to(device, non_blocking=True))
        y = split.labels[idx].to(device, non_blocking=True)
        if transform is not None:
            x = transform(x, generator)
        yield x, y
