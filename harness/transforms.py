"""Batched image augmentations for dataset plugins (paper, appendix A.1), run on whole batches on the device.

`DataSplits.augment` / `eval_transform` receive a float batch (N, C, H, W) in [0, 1] and the run's CPU generator
(None at evaluation). Every random draw is made on the CPU with that generator (so runs are seeded identically
on CPU and GPU) and only the small per-sample parameters are moved to the batch's device.

torchvision.transforms.v2 is used where it is right for a batch: its functional `pad` and `center_crop` treat
the leading dimension as a batch. Its *random* transforms, however, draw one set of parameters per call, i.e.
the same crop and the same flip for every image of a batch; per-sample randomness is what training needs, so
the random crop, flip and resized crop below draw per-sample parameters and apply them in one vectorized op
(advanced indexing, torch.where, torchvision.ops.roi_align).
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.ops import roi_align


def _uniform(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability p, independently."""
    flip = (_uniform(len(x), generator) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def pad_and_random_crop(x: torch.Tensor, generator: torch.Generator | None, padding: int) -> torch.Tensor:
    """Zero-pad every side by `padding`, then cut an HxW window at an independent random offset per image."""
    n, c, h, w = x.shape
    padded = TF.pad(x, [padding], fill=0.0)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (n, 1, 1, w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_resized_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float],
                              ratio: tuple[float, float], generator: torch.Generator | None,
                              tries: int = 10) -> torch.Tensor:
    """Per-image crop boxes (x1, y1, x2, y2) drawn as torchvision's RandomResizedCrop.get_params draws one:
    area fraction uniform in `scale`, log aspect ratio uniform in `ratio`, up to `tries` draws until the box fits,
    else the whole image clamped to the ratio range (centered)."""
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=generator))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, tries, generator=generator))
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    # fallback (no draw fitted): the largest centered box whose aspect lies in the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    idx = first.clamp(min=0)
    bw = torch.where(first >= 0, w.gather(1, idx[:, None]).squeeze(1), torch.tensor(float(fw)))
    bh = torch.where(first >= 0, h.gather(1, idx[:, None]).squeeze(1), torch.tensor(float(fh)))
    # the offset: uniform integer in [0, size - box] (torchvision's randint), centered for the fallback
    x1 = torch.floor(torch.rand(n, generator=generator) * (width - bw + 1))
    y1 = torch.floor(torch.rand(n, generator=generator) * (height - bh + 1))
    x1 = torch.where(first >= 0, x1, torch.tensor(float((width - fw) // 2)))
    y1 = torch.where(first >= 0, y1, torch.tensor(float((height - fh) // 2)))
    return torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator | None, size: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """An independent random-resized crop per image, resized to size x size in one batched op.

    roi_align (aligned=True) samples each output pixel bilinearly and averages the samples inside it, which for
    a box larger than the output acts as the antialiasing torchvision's resize applies."""
    n, _, h, w = x.shape
    boxes = random_resized_crop_boxes(n, h, w, scale, ratio, generator).to(x.device, x.dtype)
    rois = torch.cat([torch.arange(n, device=x.device, dtype=x.dtype)[:, None], boxes], dim=1)
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True).clamp_(0.0, 1.0)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    return TF.center_crop(x, [size, size])


class CifarAugment:
    """CIFAR training augmentation (A.1, after Lee et al. 2015): 4-pixel zero padding, a random 32x32 crop,
    a horizontal flip with probability 1/2."""

    def __init__(self, padding: int = 4, hflip: bool = True):
        self.padding, self.hflip = padding, hflip

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = pad_and_random_crop(x, generator, self.padding)
        return random_hflip(x, generator) if self.hflip else x


class RandomResizedCropAugment:
    """Tiny ImageNet training augmentation (A.1): a random-resized size x size crop with scale and aspect-ratio
    jitter, optionally a horizontal flip."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float], hflip: bool = False):
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = random_resized_crop(x, generator, self.size, self.scale, self.ratio)
        return random_hflip(x, generator) if self.hflip else x


class CenterCrop:
    """The evaluation view of Tiny ImageNet (A.1): one size x size center crop."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return center_crop(x, self.size)
