"""Dataset `digits`: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), shipped with scikit-learn,
so it needs no download. A fixed seeded stratified train/test split; images scaled from 0..16 to [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.plugin import DataSplits, DatasetPlugin, Split


class Digits(DatasetPlugin):
    """scikit-learn's 8x8 digits: a real, offline dataset for smoke runs and the default spec."""

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            # the stratified split needs at least one sample of each of the 10 classes on both sides (1797 images)
            "test_fraction": {"type": "number", "minimum": 0.01, "maximum": 0.99, "default": 0.2},
            "split_seed": {"type": "integer", "minimum": 0, "maximum": 4294967295, "default": 0},
            "resize": {"description": "Side length to resize the 8x8 images to (bilinear); null keeps 8.",
                       "type": ["integer", "null"], "minimum": 4, "maximum": 256, "default": None},
        },
    }

    def __init__(self, test_fraction: float = 0.2, split_seed: int = 0, resize: int | None = None):
        self.test_fraction, self.split_seed, self.resize = test_fraction, split_seed, resize

    def load(self, root: str | None, download: bool) -> DataSplits:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        images = torch.tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
        labels = torch.tensor(bunch.target, dtype=torch.int64)
        if self.resize:
            images = F.interpolate(images, size=(self.resize, self.resize), mode="bilinear",
                                   align_corners=False).clamp_(0, 1)
        train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=self.test_fraction,
                                               random_state=self.split_seed, stratify=labels.numpy())
        side = images.shape[-1]
        return DataSplits(
            train=Split(images[train_idx], labels[train_idx]),
            test=Split(images[test_idx], labels[test_idx]),
            num_classes=10,
            input_shape=(1, side, side),
            source=f"scikit-learn load_digits (8x8{f', resized to {side}x{side}' if self.resize else ''})",
        )
