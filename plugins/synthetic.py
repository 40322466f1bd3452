"""Dataset `synthetic`: random images of any shape and class count, for tests, smoke runs and benchmarks.

Each class has a random prototype image; a sample is its class prototype plus Gaussian noise, clipped to
[0, 1], so the task is learnable (a training run's loss must fall) while needing no data on disk."""

from __future__ import annotations

import torch

from harness.plugin import DataSplits, DatasetPlugin, Split

MEMORY_CAP = 8 * 2**30  # bytes: what validate lets the two splits take (harness.plugin.Plugin.check_options)


def memory_estimate(num_classes: int, shape, train_size: int, test_size: int) -> int:
    """Bytes the two splits take at least: the uint8 images of both, kept; a float32 copy of both, as training
    and evaluation convert them; the float32 prototypes; and while the larger split is made, its float32
    noise and prototype-per-sample tensors."""
    pixels = shape[0] * shape[1] * shape[2]
    total = train_size + test_size
    return pixels * (total * (1 + 4) + 4 * num_classes + 2 * 4 * max(train_size, test_size))


def make_synthetic(num_classes: int, shape: tuple[int, int, int], n: int, noise: float, seed: int) -> Split:
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.rand((num_classes, *shape), generator=torch.Generator().manual_seed(12345 + num_classes))
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    images = (prototypes[labels] + noise * torch.randn((n, *shape), generator=gen)).clamp_(0, 1)
    return Split((images * 255).round_().to(torch.uint8), labels)


class Synthetic(DatasetPlugin):
    """Class prototypes plus noise, as uint8 images of any shape and class count."""

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "num_classes": {"type": "integer", "minimum": 2, "maximum": 100000, "default": 10},
            "shape": {"description": "[channels, height, width]", "type": "array", "items": {"type": "integer", "minimum": 1},
                      "minItems": 3, "maxItems": 3, "default": [3, 32, 32]},
            "train_size": {"type": "integer", "minimum": 1, "default": 512},
            "test_size": {"type": "integer", "minimum": 1, "default": 256},
            "noise": {"description": "Standard deviation of the noise around each class prototype.",
                      "type": "number", "minimum": 0, "default": 0.3},
            "seed": {"type": "integer", "minimum": 0, "maximum": 4294967295, "default": 0},
        },
    }

    @staticmethod
    def check_options(options: dict) -> list[str]:
        """Any shape and size the schema allows is refused at validate time when the data would not fit in
        MEMORY_CAP (a run would otherwise fail allocating, or swap, after the spec was accepted)."""
        need = memory_estimate(options["num_classes"], options["shape"], options["train_size"], options["test_size"])
        if need <= MEMORY_CAP:
            return []
        return [f"synthetic data of shape {list(options['shape'])}, {options['train_size']} train + "
                f"{options['test_size']} test images and {options['num_classes']} classes needs about "
                f"{need / 2**30:.1f} GiB of memory, over the {MEMORY_CAP / 2**30:.0f} GiB this dataset allows; "
                "use a smaller shape, train_size or test_size"]

    def __init__(self, num_classes=10, shape=(3, 32, 32), train_size=512, test_size=256, noise=0.3, seed=0):
        self.num_classes, self.shape = num_classes, tuple(shape)
        self.train_size, self.test_size, self.noise, self.seed = train_size, test_size, noise, seed

    def load(self, root: str | None, download: bool) -> DataSplits:
        return DataSplits(
            train=make_synthetic(self.num_classes, self.shape, self.train_size, self.noise, self.seed),
            test=make_synthetic(self.num_classes, self.shape, self.test_size, self.noise, self.seed + 1),
            num_classes=self.num_classes,
            input_shape=self.shape,  # type: ignore[arg-type]
            source=f"synthetic: {self.num_classes} class prototypes + N(0, {self.noise}^2) noise",
        )
