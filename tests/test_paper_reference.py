"""The published numbers and the paper specs against the paper's own text (appendix A).

Every number of harness/reference/paper_tables.json is compared with Tables 1-2 as parsed from the paper's text,
and every paper spec (a spec whose model names a `paper_block`) is validated and compared with the values of
appendix A.1-A.4, each written below next to the sentence of the paper it comes from.

The paper's text: tests/paper/appendix_a.txt is appendix A verbatim (from "A. Appendices" to the end of the
file), so that CI needs nothing outside the repository. Where the whole paper is available (HARNESS_PAPER_TEXT, or
../shared/paper/ beside the repository), the test also checks that the copy is exactly the paper's appendix and
parses the paper itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO
from harness import paper, registry, spec as spec_mod
from harness.plugin import DataSplits, Split
from harness.train import train
from harness.transforms import CenterCrop, CifarAugment, RandomResizedCropAugment

PAPER_FILE = "sample_wise_adversarial_robustness.txt"
APPENDIX_COPY = REPO / "tests" / "paper" / "appendix_a.txt"


def full_paper() -> Path | None:
    for candidate in (os.environ.get("HARNESS_PAPER_TEXT"), REPO.parent / "shared" / "paper" / PAPER_FILE):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def appendix_text() -> str:
    """Appendix A of the paper: from the paper itself when it is here, else the verbatim copy."""
    path = full_paper()
    text = path.read_text(encoding="utf-8") if path else APPENDIX_COPY.read_text(encoding="utf-8")
    return text[text.index("A. Appendices"):]


def squash(text: str) -> str:
    return " ".join(text.split())


def test_the_appendix_copy_is_the_papers_text():
    path = full_paper()
    if path is None:
        pytest.skip("the paper's full text is not here (set HARNESS_PAPER_TEXT); the tests use the verbatim copy")
    text = path.read_text(encoding="utf-8")
    copy = APPENDIX_COPY.read_text(encoding="utf-8")
    assert text[text.index("A. Appendices"):] == copy, "tests/paper/appendix_a.txt is not the paper's appendix A"


# ------------------------------------------------------------------------------------------- Tables 1-2


TABLE_DATASETS = {"MNIST": "mnist", "CIFAR10": "cifar10", "CIFAR100": "cifar100", "TINYIMAGENET": "tiny-imagenet"}
TABLE_MODELS = {"LENET": "lenet", "VGG16": "vgg16", "VGG19": "vgg19", "WIDERESNET": "wrn50"}


def parse_tables(text: str) -> dict[str, dict]:
    """Tables 1-2 of appendix A.5 as {block id: {table, dataset, strengths, acc, ge, pgd}}.

    The text is the PDF's extraction: a table starts with '<DATASET>\\t\\tDEFENSIVE STRENGTH', the next line holds
    the strengths after an (OCR-mangled) label, then each row is '<model or continuation>\\t<metric(s)>\\t<values>'.
    A row labelled with two metrics ('ACC. GE') gives both values per column, in that order."""
    blocks: dict[str, dict] = {}
    table = dataset = strengths = block = None
    for line in text[text.index("A.5. Results"):].splitlines():
        caption = re.match(r"Table (\d)\.", line)
        if caption:
            table = int(caption.group(1))
            continue
        fields = [f.strip() for f in line.split("\t")]
        if "DEFENSIVE STRENGTH" in line:
            dataset, strengths, block = TABLE_DATASETS[re.sub(r"\s", "", fields[0]).upper()], None, None
            continue
        if dataset is None or len(fields) < 3:
            continue
        if strengths is None:
            strengths = [float(f) for f in fields[1:] if f]
            continue
        model = re.match(r"(LENET|VGG\d+|WIDERESNET)\b", fields[0].upper())
        if model:
            key = dataset.replace("-", "") + "_" + TABLE_MODELS[model.group(1)]
            block = blocks.setdefault(key, {"table": table, "dataset": dataset, "strengths": strengths})
        metrics = re.findall(r"ACC|GE|PGD", fields[1].upper())
        values = [float(v) for f in fields[2:] for v in f.split()]
        assert block is not None and metrics and len(values) == len(metrics) * len(strengths), line
        for j, metric in enumerate(metrics):
            assert metric.lower() not in block, f"{metric} given twice for {block}"
            block[metric.lower()] = values[j::len(metrics)]
    return blocks


def test_reference_json_equals_every_number_of_tables_1_and_2():
    parsed = parse_tables(appendix_text())
    reference = paper.tables()["blocks"]
    assert sorted(parsed) == sorted(reference) == ["cifar100_vgg16", "cifar100_vgg19", "cifar10_vgg16",
                                                    "cifar10_vgg19", "mnist_lenet", "tinyimagenet_wrn50"]
    compared = 0
    for block, published in parsed.items():
        ours = reference[block]
        assert ours["dataset"] == published["dataset"], block
        assert ours["table"].startswith(f"Table {published['table']} "), block
        assert [float(s) for s in ours["strengths"]] == published["strengths"], block
        for metric in ("acc", "ge", "pgd"):
            assert len(published[metric]) == 4, (block, metric)
            assert [float(v) for v in ours[metric]] == published[metric], (block, metric)
            compared += len(published[metric])
    assert compared == 6 * 3 * 4  # every cell of both tables


def test_reference_json_attack_is_the_papers_evaluation_attack():
    """The attack each block names: A.4's PGD (10 steps of 2.55/255 or 2/255) at the tables' eps (captions: 76.5
    for MNIST, 8 for CIFAR and Tiny ImageNet)."""
    for block, entry in paper.tables()["blocks"].items():
        steps, step, eps = re.fullmatch(r"PGD, (\d+) steps of ([\d.]+)/255, eps ([\d.]+)/255", entry["attack"]).groups()
        expected = APPENDIX[entry["dataset"]]["evaluation"]
        assert (int(steps), float(step), float(eps)) == (expected["steps"], expected["step_size"], expected["eps"])


# ------------------------------------------------------------------------------------------- appendix A values

# Each value below is read off the sentence of appendix A quoted beside it; test_quotes_are_the_papers_words checks
# that every quote is in the paper's text.
QUOTES = {
    "mnist_data": "MNIST. The MNIST dataset consists of $70,000\\ 28\\times28$ images of handwritten digits, where "
                  "60,000 are training data and 10,000 are test data. We use raw images without pre-processing.",
    "cifar_data": "We do data augmentation as in (Lee et al., 2015): during training, we zero-pad 4 pixels along each "
                  "image side, and sample a 32×32 region cropping from the padded image or its horizontal flip; "
                  "during testing, we use the original non-padded image.",
    "tiny_data": "An input image is 56×56 randomly cropped from a resized image using the scale and aspect ratio "
                 "augmentation as well as scale jittering. We adopt a single 56×56 cropped image for testing.",
    "mnist_model": "For MNIST dataset, we use the LeNet model as mentioned in (Madry et al., 2018).",
    "cifar_model": "For the CIFAR dataset, we use two different models, i.e., VGG-16 and VGG-19",
    "tiny_model": "For Tiny ImageNet dataset, we used 50-layered wide residual networks",
    "mnist_train": "Experiments on MNIST dataset uses a mini-batch size of 256 and is trained for 160 epochs. The "
                   "learning rate starts at 0.1 while being multiplied by 0.01 at epochs 80 and 120 respectively.",
    "cifar_train": "Experiments on CIFAR dataset uses a mini-batch size of 512 and is trained for 160 epochs. The "
                   "learning rate starts at 0.05, decay every 30 epoches by 2.",
    "tiny_train": "The experiments on Tiny ImageNet dataset uses a mini-batch size of 256 and is trained 90 epochs. "
                  "The initial learning rate is set to be 0.1 and decays by 10 at 30 and 60 epochs respectively.",
    "sgd": "All experiments are trained on training set with stochastic gradient descent uses the momentum value of "
           "0.9 without using additional regularizer such as weight decay.",
    "spectral": "We constrain the spectral norm of the convolutional layers and linear layers of neural network",
    "pgd_start": "the adversary is created by performing projected gradient descent starting from a random "
                 "perturbation around the natural example",
    "mnist_pgd": "For MNIST dataset, we use total adversarial perturbation of $\\epsilon = [51.0/255.0, 76.5/255, "
                 "102.0/255]$, perturbation per step of 2.55/255, and 40 total attack steps with 1 random restart.",
    "other_pgd": "For all the other datasets, we use 10 steps of size 2/255 and maximum of $\\epsilon = [4/255, 8/255, "
                 "16/255]$ respectively for different defensive strengths.",
    "replace": "We replace all the natural training images with adversarial examples every iteration during training.",
    "eval_pgd": "we only use the moderate adversaries that generated by 10 iterations with steps of size "
                "$||\\gamma||_{\\infty}=2/255$ or $||\\gamma||_{\\infty}=2.55/255$ and maximum of "
                "$||\\gamma||_{\\infty}=8/255$ or $||\\gamma||_{\\infty}=76.5/255$.",
    "table1_eps": "The adversarial samples to attack are generated with the max perturbation norm of 76.5 for MNIST "
                  "and 8for CIFAR dataset.",
    "table2_eps": "We evaluate on clean images and adversarial images with the perturbation of "
                  "$\\|\\gamma\\|_{\\infty} = 8$ from PGD attack.",
    "strength_0": "MINISI\t\t0\t51.0\t76.5\t102.0",  # the tables' first column: strength 0, no adversarial training
}

CIFAR_TRAINING = {"batch_size": 512, "epochs": 160, "lr": 0.05,  # cifar_train
                  "schedule": {"type": "step", "step_size": 30, "gamma": 0.5}}  # "decay every 30 epoches by 2"
CIFAR_PGD = {"steps": 10, "step_size": 2, "random_start": True}  # other_pgd, pgd_start
CIFAR_EVAL = {"eps": 8, "steps": 10, "step_size": 2, "random_start": True}  # eval_pgd, table1_eps, pgd_start

APPENDIX = {
    "mnist": {
        "blocks": {"mnist_lenet": "lenet"},  # mnist_model
        "augment": None,  # mnist_data: raw images
        "training": {"batch_size": 256, "epochs": 160, "lr": 0.1,  # mnist_train
                     "schedule": {"type": "multistep", "milestones": [80, 120], "gamma": 0.01}},
        "strengths": [0, 51, 76.5, 102],  # mnist_pgd, strength_0
        "pgd": {"steps": 40, "step_size": 2.55, "random_start": True},  # mnist_pgd ("1 random restart"), pgd_start
        # A.4 does not repeat the start; its PGD is Madry et al.'s, which A.3 describes as starting at random
        "evaluation": {"eps": 76.5, "steps": 10, "step_size": 2.55, "random_start": True},  # eval_pgd, table1_eps
    },
    "cifar10": {"blocks": {"cifar10_vgg16": "vgg16", "cifar10_vgg19": "vgg19"}, "augment": "cifar",
                "training": CIFAR_TRAINING, "strengths": [0, 4, 8, 16], "pgd": CIFAR_PGD, "evaluation": CIFAR_EVAL},
    "cifar100": {"blocks": {"cifar100_vgg16": "vgg16", "cifar100_vgg19": "vgg19"}, "augment": "cifar",
                 "training": CIFAR_TRAINING, "strengths": [0, 4, 8, 16], "pgd": CIFAR_PGD, "evaluation": CIFAR_EVAL},
    "tiny-imagenet": {
        "blocks": {"tinyimagenet_wrn50": "wrn50-2"},  # tiny_model (k = 2)
        "augment": "random-resized-crop",  # tiny_data
        "training": {"batch_size": 256, "epochs": 90, "lr": 0.1,  # tiny_train
                     "schedule": {"type": "multistep", "milestones": [30, 60], "gamma": 0.1}},
        "strengths": [0, 4, 8, 16], "pgd": CIFAR_PGD,  # other_pgd
        "evaluation": CIFAR_EVAL,  # eval_pgd, table2_eps
    },
}
SGD = {"momentum": 0.9, "weight_decay": 0, "nesterov": False}  # sgd
PGD_ATTACKS = ("foolbox-pgd", "advertorch-pgd")

PAPER_SPECS = ["cifar100_vgg16", "cifar100_vgg19", "cifar10_vgg16", "cifar10_vgg19", "mnist_lenet", "table1_cifar10",
               "table1_cifar100", "tinyimagenet_wrn50"]


def test_quotes_are_the_papers_words():
    text = squash(appendix_text())
    for name, quote in QUOTES.items():
        assert squash(quote) in text, name


def test_the_paper_specs_are_these_eight_and_cover_every_block():
    found = sorted(p.stem for p in (REPO / "specs").glob("*.json")
                   if any(m.get("paper_block") for m in spec_mod.read_json(p)["models"]))
    assert found == PAPER_SPECS
    covered = {m["paper_block"] for name in found
               for m in spec_mod.read_json(REPO / "specs" / f"{name}.json")["models"]}
    assert covered == set(paper.block_ids())


@pytest.mark.parametrize("name", PAPER_SPECS)
def test_paper_spec_validates_and_carries_appendix_a(name):
    spec = spec_mod.load(REPO / "specs" / f"{name}.json")  # validated against every schema, defaults filled
    dataset = spec["dataset"]
    expected = APPENDIX[dataset["name"]]
    assert dataset["max_train"] is None and dataset["max_test"] is None, "the whole training and test sets"

    for model in spec["models"]:
        assert model["name"] == expected["blocks"][model["paper_block"]]
        assert model["options"]["spectral_norm"] is True  # spectral

    defense = spec["defense"]
    assert defense["name"] == "pgd-at"
    assert defense["strengths"] == expected["strengths"]
    assert {k: defense["options"][k] for k in expected["pgd"]} == expected["pgd"]

    training = spec["training"]
    assert {k: training[k] for k in expected["training"]} == expected["training"]
    assert {k: training[k] for k in SGD} == SGD
    assert training["max_batches"] is None

    first = spec["evaluation"]["attacks"][0]  # the report's pgd_acc, compared with the tables' PGD row
    assert first["name"] in PGD_ATTACKS
    assert {"eps": first["eps"], **{k: first["options"][k] for k in ("steps", "step_size", "random_start")}} == \
        expected["evaluation"]

    augment, eval_transform, input_shape = registry.load("dataset", dataset["name"])(**dataset["options"]).transforms()
    if expected["augment"] is None:
        assert augment is None and eval_transform is None
    elif expected["augment"] == "cifar":
        assert isinstance(augment, CifarAugment) and (augment.padding, augment.hflip) == (4, True)
        assert eval_transform is None and input_shape == (3, 32, 32)
    else:
        assert isinstance(augment, RandomResizedCropAugment) and augment.size == 56
        assert augment.scale[0] < augment.scale[1] == 1.0 and augment.ratio[0] < 1 < augment.ratio[1]  # jitter
        assert not augment.hflip  # A.1 names no flip for Tiny ImageNet
        assert isinstance(eval_transform, CenterCrop) and eval_transform.size == 56 and input_shape == (3, 56, 56)


def appendix_lr(dataset: str, epoch: int) -> float:
    """The learning rate of (1-based) epoch `epoch` as A.2 states it, decays applied after the named epoch."""
    if dataset == "mnist":  # 0.1, multiplied by 0.01 at epochs 80 and 120
        return 0.1 * 0.01 ** ((epoch > 80) + (epoch > 120))
    if dataset.startswith("cifar"):  # 0.05, halved every 30 epochs
        return 0.05 * 0.5 ** ((epoch - 1) // 30)
    return 0.1 * 0.1 ** ((epoch > 30) + (epoch > 60))  # tiny-imagenet: 0.1, divided by 10 at 30 and 60


@pytest.mark.parametrize("name", ["mnist_lenet", "cifar10_vgg16", "tinyimagenet_wrn50"])
def test_learning_rate_of_every_epoch_follows_appendix_a2(name):
    """The spec's schedule run through the training loop: the rate each epoch trains with (two steps per epoch of a
    tiny linear model, so that a schedule stepped per batch would show; the other paper specs share these three
    schedules, checked above)."""
    spec = spec_mod.load(REPO / "specs" / f"{name}.json")
    x = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    data = DataSplits(train=Split(x, torch.arange(16) % 2), test=Split(x, torch.arange(16) % 2), num_classes=2,
                      input_shape=(1, 4, 4))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    cfg = dict(spec["training"], batch_size=8)
    history = train(model, registry.load("defense", "none")(eps=0.0), data, cfg, torch.device("cpu"), seed=0)
    epochs = spec["training"]["epochs"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    for h in history:
        assert h["lr"] == pytest.approx(appendix_lr(spec["dataset"]["name"], h["epoch"]), rel=1e-9), h["epoch"]
