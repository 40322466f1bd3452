"""Datasets `mnist`, `cifar10`, `cifar100` (through torchvision) and `tiny-imagenet` (its standard folder layout),
with the augmentations of the paper's appendix A.1 as batched on-device transforms (harness.transforms).

Images are kept as uint8 tensors (N, C, H, W) and scaled to [0, 1] per batch; normalization, if any, is inside the
models. Nothing is downloaded unless the spec says `"download": true` (torchvision's own download then runs). A
missing dataset is a DatasetNotFound (exit 2) naming the files expected and how to get them; a smoke run
(`harness run --smoke`) replaces it by synthetic stand-in data of the same shape and class count (`stand_in`).

The root is the spec's `dataset.root` or `harness run --data-root`; without either, `./data`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from harness.errors import BadInput, DatasetNotFound
from harness.plugin import DataSplits, DatasetPlugin, Split, Transform, empty_schema
from harness.transforms import CenterCrop, CifarAugment, RandomResizedCropAugment

DEFAULT_ROOT = "data"


class VisionDataset(DatasetPlugin):
    """Common part: the root, the transforms, the stand-in. Subclasses read the two splits."""

    name = ""
    num_classes = 0
    image_shape: tuple[int, int, int] = (0, 0, 0)  # as stored (before the evaluation transform)
    layout = ""  # the expected files, for the error message
    obtain = ""  # how to get them

    def read(self, root: Path, download: bool) -> tuple[Split, Split, int]:  # pragma: no cover - per dataset
        raise NotImplementedError

    def transforms(self) -> tuple[Transform | None, Transform | None, tuple[int, int, int]]:
        """(augment, eval_transform, input_shape of the model)."""
        return None, None, self.image_shape

    def missing(self, root: Path, detail: str = "") -> DatasetNotFound:
        where = self.layout.format(root=root)
        return DatasetNotFound(
            f"{self.name} not found under {root}{f' ({detail})' if detail else ''}. Expected:\n    {where}",
            fix=f"{self.obtain}; or point --data-root / \"dataset.root\" at the folder holding it; "
                "`harness run SPEC --smoke` runs without it on stand-in data")

    def _splits(self, train: Split, test: Split, num_classes: int, source: str, stand_in: bool = False) -> DataSplits:
        augment, eval_transform, input_shape = self.transforms()
        return DataSplits(train=train, test=test, num_classes=num_classes, input_shape=input_shape,
                          augment=augment, eval_transform=eval_transform, source=source, stand_in=stand_in)

    def load(self, root: str | None, download: bool) -> DataSplits:
        path = Path(root if root else DEFAULT_ROOT).expanduser()
        train, test, num_classes = self.read(path, download)
        return self._splits(train, test, num_classes, f"{self.name} from {path}")

    def stand_in(self, train_size: int, test_size: int, seed: int) -> DataSplits:
        """Synthetic images of this dataset's stored shape and class count (the `synthetic` plugin's generator),
        through this dataset's own transforms. For smoke runs only: the result says `stand_in=True`."""
        from harness_plugins.synthetic import make_synthetic

        shape = self.image_shape
        return self._splits(make_synthetic(self.num_classes, shape, train_size, 0.3, seed),
                            make_synthetic(self.num_classes, shape, test_size, 0.3, seed + 1), self.num_classes,
                            f"STAND-IN for {self.name}: synthetic {self.num_classes}-class images of shape "
                            f"{list(shape)}", stand_in=True)


def _torchvision_split(cls, root: Path, train: bool, download: bool) -> Split:
    ds = cls(str(root), train=train, download=download)
    data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(np.asarray(ds.data))
    if data.ndim == 3:  # MNIST: (N, H, W)
        data = data.unsqueeze(1)
    else:  # CIFAR: (N, H, W, C)
        data = data.permute(0, 3, 1, 2)
    targets = ds.targets if isinstance(ds.targets, torch.Tensor) else torch.tensor(ds.targets)
    return Split(data.contiguous().to(torch.uint8), targets.to(torch.int64))


class _TorchvisionDataset(VisionDataset):
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "check_md5": {"description": "Check the files against torchvision's MD5 sums (turn off only for "
                                         "re-packed copies).", "type": "boolean", "default": True},
        },
    }

    def __init__(self, check_md5: bool = True):
        self.check_md5 = check_md5

    def torchvision_class(self):  # pragma: no cover - per dataset
        raise NotImplementedError

    def expected_files(self, root: Path) -> list[Path]:  # pragma: no cover - per dataset
        raise NotImplementedError

    def read(self, root: Path, download: bool) -> tuple[Split, Split, int]:
        cls = self.torchvision_class()
        if not self.check_md5:
            # torchvision checks existence only where a file's md5 is None; these are its own file lists
            attrs = {key: [(name, None) for name, _ in getattr(cls, key)]
                     for key in ("train_list", "test_list") if hasattr(cls, key)}
            if hasattr(cls, "meta"):
                attrs["meta"] = {**cls.meta, "md5": None}
            cls = type(cls.__name__, (cls,), attrs)
        absent = [p for p in self.expected_files(root) if not p.exists()]
        if absent and not download:
            raise self.missing(root, f"missing {', '.join(str(p.relative_to(root)) for p in absent[:4])}")
        try:
            train = _torchvision_split(cls, root, True, download)
            test = _torchvision_split(cls, root, False, False)
        except RuntimeError as exc:
            if absent:  # a download was asked for and did not produce the files
                raise self.missing(root, f"download failed: {exc}") from exc
            raise BadInput(f"{self.name} under {root} is unreadable: {exc}",
                           fix="re-download it (delete the folder, set \"download\": true), or set "
                               "\"options\": {\"check_md5\": false} for a re-packed copy") from exc
        except Exception as exc:  # network errors of a download, malformed files
            raise BadInput(f"{self.name} under {root} could not be read or downloaded: {type(exc).__name__}: {exc}",
                           fix=self.obtain) from exc
        return train, test, self.num_classes


class MNIST(_TorchvisionDataset):
    """MNIST through torchvision: 60,000 / 10,000 raw 28x28 digits, no augmentation (A.1)."""

    name, num_classes, image_shape = "mnist", 10, (1, 28, 28)
    layout = ("{root}/MNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
              "t10k-labels-idx1-ubyte (gunzipped)")
    obtain = "set \"download\": true in the spec's dataset to let torchvision fetch it"
    FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    def torchvision_class(self):
        from torchvision.datasets import MNIST as TV

        return TV

    def expected_files(self, root: Path) -> list[Path]:
        return [root / "MNIST" / "raw" / f for f in self.FILES]

    options_schema = empty_schema()  # torchvision keeps no MD5 sums of MNIST's raw files

    def __init__(self):
        super().__init__(check_md5=True)


class CIFAR10(_TorchvisionDataset):
    """CIFAR-10 through torchvision: 4-px zero padding, random 32x32 crop, horizontal flip for training (A.1)."""

    name, num_classes, image_shape = "cifar10", 10, (3, 32, 32)
    folder = "cifar-10-batches-py"
    files = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
             "batches.meta")
    obtain = ("set \"download\": true in the spec's dataset to let torchvision fetch it, or unpack "
              "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into the root")

    @property
    def layout(self) -> str:  # type: ignore[override]
        return "{root}/" + self.folder + "/" + ", ".join(self.files)

    def torchvision_class(self):
        from torchvision.datasets import CIFAR10 as TV

        return TV

    def expected_files(self, root: Path) -> list[Path]:
        return [root / self.folder / f for f in self.files]

    def transforms(self):
        return CifarAugment(padding=4, hflip=True), None, self.image_shape


class CIFAR100(CIFAR10):
    """CIFAR-100 through torchvision: the same augmentation as CIFAR-10 (A.1)."""

    name, num_classes = "cifar100", 100
    folder = "cifar-100-python"
    files = ("train", "test", "meta")
    obtain = ("set \"download\": true in the spec's dataset to let torchvision fetch it, or unpack "
              "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into the root")

    def torchvision_class(self):
        from torchvision.datasets import CIFAR100 as TV

        return TV


class TinyImageNet(VisionDataset):
    """Tiny ImageNet (200 classes, 64x64) from its folder layout; random-resized 56x56 crops for training, one
    56x56 center crop for evaluation (A.1). The labelled validation set is the test split."""

    name, num_classes, image_shape = "tiny-imagenet", 200, (3, 64, 64)
    layout = ("{root}/tiny-imagenet-200/wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
              "val/val_annotations.txt (or those directly under {root})")
    obtain = ("download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into the root "
              "(this plugin never downloads)")

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "crop": {"description": "Side of the training and evaluation crops.", "type": "integer",
                     "minimum": 8, "maximum": 64, "default": 56},
            "scale": {"description": "Range of the crop's area as a fraction of the image (scale jitter).",
                      "type": "array", "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                      "minItems": 2, "maxItems": 2, "default": [0.08, 1.0]},
            "ratio": {"description": "Range of the crop's aspect ratio (aspect jitter).", "type": "array",
                      "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 2, "maxItems": 2,
                      "default": [0.75, 1.3333333333333333]},
            "hflip": {"description": "Also flip training crops horizontally (A.1 does not mention it).",
                      "type": "boolean", "default": False},
        },
    }

    def __init__(self, crop: int = 56, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = False):
        self.crop, self.scale, self.ratio, self.hflip = crop, tuple(scale), tuple(ratio), hflip

    def transforms(self):
        return (RandomResizedCropAugment(self.crop, self.scale, self.ratio, self.hflip), CenterCrop(self.crop),
                (self.image_shape[0], self.crop, self.crop))

    @staticmethod
    def base(root: Path) -> Path:
        return root if (root / "wnids.txt").exists() else root / "tiny-imagenet-200"

    def read(self, root: Path, download: bool) -> tuple[Split, Split, int]:
        base = self.base(root)
        needed = [base / "wnids.txt", base / "train", base / "val" / "images", base / "val" / "val_annotations.txt"]
        absent = [p for p in needed if not p.exists()]
        if absent:
            raise self.missing(root, f"missing {', '.join(str(p.relative_to(root)) for p in absent)}")
        wnids = sorted(w for w in (base / "wnids.txt").read_text().split() if w)
        index = {w: i for i, w in enumerate(wnids)}
        train_files = []
        for w in wnids:
            folder = base / "train" / w / "images"
            if not folder.is_dir():
                raise BadInput(f"tiny-imagenet: class {w} of wnids.txt has no folder {folder}",
                               fix="re-extract tiny-imagenet-200.zip; the layout must be complete")
            train_files += [(p, index[w]) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        test_files = []
        for line_no, line in enumerate((base / "val" / "val_annotations.txt").read_text().splitlines(), 1):
            fields = line.split("\t")
            if not line.strip():
                continue
            if len(fields) < 2 or fields[1] not in index:
                raise BadInput(f"tiny-imagenet: val/val_annotations.txt line {line_no} is not "
                               "'<file>\\t<wnid>\\t...' with a wnid of wnids.txt", fix="re-extract the archive")
            test_files.append((base / "val" / "images" / fields[0], index[fields[1]]))
        if not train_files or not test_files:
            raise self.missing(root, "no images found")
        return _read_images(train_files, self.image_shape), _read_images(test_files, self.image_shape), len(wnids)


IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _read_images(files: list[tuple[Path, int]], shape: tuple[int, int, int]) -> Split:
    """Decode every image with torchvision.io (no PIL, no per-item dataset object) into one uint8 tensor."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    images = torch.empty((len(files), *shape), dtype=torch.uint8)
    for i, (path, _) in enumerate(files):
        try:
            image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except (RuntimeError, OSError) as exc:
            raise BadInput(f"cannot decode image {path}: {exc}", fix="replace or remove the file") from exc
        if tuple(image.shape) != shape:
            raise BadInput(f"image {path} has shape {tuple(image.shape)}, expected {shape}",
                           fix="Tiny ImageNet images are 64x64 RGB; re-extract the archive")
        images[i] = image
    return Split(images, torch.tensor([label for _, label in files], dtype=torch.int64))
