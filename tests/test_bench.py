"""`harness bench`: real timings and FLOP counts on a tiny configuration; the numbers' relations, not their speed."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from harness import registry
from harness.bench import hand_pgd
from harness.cli import cli
from harness.evaluate import check_adversary
from harness.plugin import to_unit


@pytest.fixture
def bench_spec(tiny_spec):
    tiny_spec["dataset"].update(max_train=64, max_test=32)
    tiny_spec["defense"]["options"].update(steps=3, step_size=8)
    tiny_spec["evaluation"]["attacks"][0]["options"].update(steps=2)
    return tiny_spec


@pytest.mark.parametrize("performance", [{"precision": "fp32", "channels_last": False},
                                         {"precision": "bf16", "channels_last": True}])
def test_bench_writes_rates_flops_and_baseline_ratios(bench_spec, write_spec, tmp_path, performance):
    bench_spec["performance"] = performance
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", str(write_spec(bench_spec)), "--out", str(out), "--batch-size", "32",
                                      "--eval-batch-size", "16", "--warmup", "0", "--repeats", "1"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "xplain" in result.output and "lenet__s32" in result.output
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["peak_tflops"] is None
    assert doc["performance"]["precision"] == performance["precision"]
    s0, s32 = doc["cells"]
    assert (s0["id"], s32["id"]) == ("lenet__s0", "lenet__s32")
    for cell in (s0, s32):
        assert cell["batch_size"] == 32 and cell["eval_batch_size"] == 16
        for part in ("train", "eval"):
            assert cell[part]["images_per_s"] > 0 and cell[part]["flops_per_image"] > 0
            assert cell[part]["peak_fraction"] is None  # CPU: no peak table entry
    # strength 0 trains on clean images (one forward + backward); PGD-3 adds 3 forwards and 3 input backwards
    ratio = s32["train"]["flops_per_image"] / s0["train"]["flops_per_image"]
    assert 2.0 < ratio < 6.0, ratio
    assert s0["baselines"] is None  # no attack to compare at strength 0
    b = s32["baselines"]
    # the plain call as written (fp32, NCHW) always; under the harness's settings only when those differ
    isolated = performance["precision"] != "fp32"
    names = ("plain", "plain_same", "hand") if isolated else ("plain", "hand")
    assert {k for k in b if not k.startswith("vs_")} == set(names)
    for name in names:
        assert b[name]["images_per_s"] > 0
    assert b["vs_plain"] == pytest.approx(b["plain"]["seconds_per_step"] / s32["train"]["seconds_per_step"])
    same = b["plain_same" if isolated else "plain"]["seconds_per_step"]
    assert b["vs_plain_same"] == pytest.approx(same / s32["train"]["seconds_per_step"])
    assert b["vs_hand"] == pytest.approx(b["hand"]["seconds_per_step"] / s32["train"]["seconds_per_step"])


def test_bench_unknown_cell_is_bad_input(bench_spec, write_spec, tmp_path):
    result = CliRunner().invoke(cli, ["bench", str(write_spec(bench_spec)), "--cell", "nope"])
    assert result.exit_code == 2 and "lenet__s0, lenet__s32" in result.output


def test_hand_pgd_baseline_is_a_real_attack(tiny_spec):
    """The hand-written loop must do what the library does, or the ratio compares unequal work."""
    from harness.runner import load_data, seed_everything
    from harness import spec as spec_mod

    data = load_data(spec_mod.validate(tiny_spec))
    seed_everything(0)
    model = registry.load("model", "lenet")(spectral_norm=True).build(data.num_classes, data.input_shape)
    x, y = data.train.images[:64].float(), data.train.labels[:64]
    eps = to_unit(32)
    model.train()
    x_hand = hand_pgd(model, x, y, eps, to_unit(8), 5, random_start=False)
    assert model.training  # mode restored
    check_adversary("hand", x, x_hand, eps)
    library = registry.load("defense", "pgd-at")(eps=eps, steps=5, step_size=8.0, random_start=False)
    x_lib = library.adversary(model, x, y)
    model.eval()
    with torch.no_grad():
        clean, hand, lib = (F.cross_entropy(model(v), y) for v in (x, x_hand, x_lib))
    assert hand > clean
    torch.testing.assert_close(x_hand, x_lib, atol=1e-5, rtol=0)  # same algorithm, same iterates
