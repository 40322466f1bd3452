"""The real dataset loaders on tiny fakes written in each dataset's own on-disk format, and the batched
augmentations of appendix A.1."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from harness import registry
from harness.errors import BadInput, DatasetNotFound
from harness.transforms import (CenterCrop, CifarAugment, pad_and_random_crop, random_hflip, random_resized_crop,
                                random_resized_crop_boxes)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """A test that reaches torchvision's downloader fails instead of touching the network."""
    import torchvision.datasets.utils as tvu

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for name in ("download_url", "download_and_extract_archive"):
        monkeypatch.setattr(tvu, name, refuse)
    import torchvision.datasets.mnist as tvm
    import torchvision.datasets.cifar as tvc
    monkeypatch.setattr(tvm, "download_and_extract_archive", refuse)
    monkeypatch.setattr(tvc, "download_and_extract_archive", refuse)


def dataset(name, **options):
    return registry.load("dataset", name)(**options)


# ------------------------------------------------------------------------------------------------ MNIST


def write_idx(path, array: np.ndarray):
    magic = 2051 if array.ndim == 3 else 2049
    with open(path, "wb") as fh:
        fh.write(struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape))
        fh.write(array.astype(np.uint8).tobytes())


def fake_mnist(root, n_train=12, n_test=6):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {"train": (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)),
            "t10k": (rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test))}
    for prefix, (images, labels) in data.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return data


def test_mnist_reads_idx_files(tmp_path):
    data = fake_mnist(tmp_path)
    splits = dataset("mnist").load(str(tmp_path), False)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape == (12, 1, 28, 28)
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(data["train"][0].astype(np.uint8)))
    assert splits.test.labels.tolist() == data["t10k"][1].tolist()
    assert splits.augment is None and splits.eval_transform is None  # A.1: raw images
    assert not splits.stand_in


def test_missing_dataset_names_layout_and_never_downloads(tmp_path):
    with pytest.raises(DatasetNotFound) as info:
        dataset("mnist").load(str(tmp_path), False)
    assert "MNIST/raw/train-images-idx3-ubyte" in info.value.message
    assert '"download": true' in info.value.fix and "--data-root" in info.value.fix
    with pytest.raises(DatasetNotFound) as info:
        dataset("cifar10").load(str(tmp_path), False)
    assert "cifar-10-batches-py/data_batch_1" in info.value.message
    with pytest.raises(DatasetNotFound) as info:
        dataset("tiny-imagenet").load(str(tmp_path), False)
    assert "val_annotations.txt" in info.value.message and "tiny-imagenet-200.zip" in info.value.fix


# ------------------------------------------------------------------------------------------------ CIFAR


def fake_cifar(root, hundred=False, per_batch=4):
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    key = "fine_labels" if hundred else "labels"
    batches = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for name in batches:
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 key: rng.integers(0, 100 if hundred else 10, per_batch).tolist()}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
        written[name] = entry
    meta = {"fine_label_names": [f"c{i}" for i in range(100)]} if hundred else {"label_names": [f"c{i}" for i in range(10)]}
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as fh:
        pickle.dump(meta, fh)
    return written


def test_cifar10_reads_pickled_batches(tmp_path):
    written = fake_cifar(tmp_path)
    splits = dataset("cifar10", check_md5=False).load(str(tmp_path), False)
    assert splits.train.images.shape == (20, 3, 32, 32) and splits.test.images.shape == (4, 3, 32, 32)
    first = written["data_batch_1"]
    # CIFAR's rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    assert torch.equal(splits.train.images[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))
    assert splits.train.labels[:4].tolist() == first["labels"]
    assert splits.test.labels.tolist() == written["test_batch"]["labels"]
    assert splits.input_shape == (3, 32, 32) and isinstance(splits.augment, CifarAugment)


def test_cifar_md5_check_is_on_by_default(tmp_path):
    fake_cifar(tmp_path)
    with pytest.raises(BadInput) as info:
        dataset("cifar10").load(str(tmp_path), False)
    assert not isinstance(info.value, DatasetNotFound)  # present but wrong: never replaced by a stand-in
    assert "check_md5" in info.value.fix


def test_cifar100_fine_labels(tmp_path):
    written = fake_cifar(tmp_path, hundred=True)
    splits = dataset("cifar100", check_md5=False).load(str(tmp_path), False)
    assert splits.num_classes == 100
    assert splits.train.labels.tolist() == written["train"]["fine_labels"]


# ------------------------------------------------------------------------------------------------ Tiny ImageNet


def fake_tiny_imagenet(root, wnids=("n02", "n01", "n03"), per_class=2):
    from torchvision.io import write_jpeg, write_png

    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    colors = {}
    for k, w in enumerate(wnids):
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            value = 40 * k + 10 * i + 20
            img = torch.full((3, 64, 64), value, dtype=torch.uint8)
            if i == 0:
                write_jpeg(img, str(folder / f"{w}_{i}.JPEG"), quality=100)
            else:  # a grayscale PNG must come out as RGB
                write_png(img[:1], str(folder / f"{w}_{i}.png"))
            colors[(w, i)] = value
    lines = []
    for j, w in enumerate(wnids):
        write_jpeg(torch.full((3, 64, 64), 200 - 30 * j, dtype=torch.uint8), str(base / "val" / "images" / f"val_{j}.JPEG"),
                   quality=100)
        lines.append(f"val_{j}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return colors


def test_tiny_imagenet_reads_the_folder_layout(tmp_path):
    colors = fake_tiny_imagenet(tmp_path)
    splits = dataset("tiny-imagenet").load(str(tmp_path), False)
    assert splits.num_classes == 3 and splits.input_shape == (3, 56, 56)
    assert splits.train.images.shape == (6, 3, 64, 64)
    # classes are indexed in sorted wnid order: n01 -> 0, n02 -> 1, n03 -> 2
    assert splits.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert int(splits.train.images[0].float().mean().round()) == colors[("n01", 0)]
    assert int(splits.train.images[1, 2, 5, 5]) == colors[("n01", 1)]  # grayscale PNG, replicated to RGB
    assert splits.test.labels.tolist() == [1, 0, 2]
    assert splits.eval_transform(torch.rand(2, 3, 64, 64), None).shape == (2, 3, 56, 56)
    aug = splits.augment(torch.rand(4, 3, 64, 64), torch.Generator().manual_seed(0))
    assert aug.shape == (4, 3, 56, 56) and 0 <= float(aug.min()) and float(aug.max()) <= 1
    # the folder itself works as root too
    assert len(dataset("tiny-imagenet").load(str(tmp_path / "tiny-imagenet-200"), False).test) == 3


def test_tiny_imagenet_bad_annotation_is_bad_input(tmp_path):
    fake_tiny_imagenet(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\n")
    with pytest.raises(BadInput, match="line 1"):
        dataset("tiny-imagenet").load(str(tmp_path), False)


# ------------------------------------------------------------------------------------------------ augmentations


def test_pad_and_random_crop_is_a_window_of_the_padded_image_per_sample():
    x = torch.rand(64, 3, 32, 32)
    out = pad_and_random_crop(x, torch.Generator().manual_seed(0), padding=4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    offsets = set()
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert found, f"image {i} is not a 32x32 window of its padded image"
        offsets.add(found[0])
    assert len(offsets) > 20, "offsets must be drawn per image, not once per batch"
    again = pad_and_random_crop(x, torch.Generator().manual_seed(0), padding=4)
    assert torch.equal(out, again), "seeded by the generator"


def test_hflip_flips_about_half_independently():
    x = torch.rand(200, 1, 4, 4)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped | kept).all()) and 70 < int(flipped.sum()) < 130


def test_random_resized_crop_boxes_follow_scale_and_ratio():
    boxes = random_resized_crop_boxes(2000, 64, 64, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert bool((boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 64).all() and (boxes[:, 3] <= 64).all())
    area = w * h / 64 ** 2
    assert float(area.min()) >= 0.07 and float(area.max()) <= 1.0
    assert float(area.std()) > 0.15, "scale jitter: areas spread over the range"
    ratio = w / h
    assert float(ratio.min()) >= 0.7 and float(ratio.max()) <= 1.4
    assert len(set(map(tuple, boxes.tolist()))) > 1500, "per-image boxes"


def test_random_resized_crop_of_the_whole_image_keeps_it_and_crops_differ():
    x = torch.rand(8, 3, 56, 56)
    same = random_resized_crop(x, torch.Generator().manual_seed(0), 56, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    ramp = torch.linspace(0, 1, 64).expand(2, 3, 64, 64).contiguous()  # brightness grows to the right
    crops = random_resized_crop(ramp.repeat(16, 1, 1, 1), torch.Generator().manual_seed(1), 56, scale=(0.1, 0.3))
    means = crops.mean(dim=(1, 2, 3))
    assert crops.shape == (32, 3, 56, 56) and float(means.std()) > 0.05
    assert torch.equal(CenterCrop(56)(ramp, None), ramp[..., 4:60, 4:60])
