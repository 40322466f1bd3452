"""Seeds: `harness run SPEC --seed N` runs the same experiment with another seed into its own folder, and
`harness report --across-seeds DIR...` summarises such runs per cell as mean ± sd, refusing runs that are not
seeds of one experiment."""

from __future__ import annotations

import json
import statistics

import pytest

from conftest import fast_spec, invoke


@pytest.fixture
def spec():
    return fast_spec()


def test_seed_runs_summarise_as_mean_and_sd_of_each_cell(spec, write_spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_spec(spec)
    for seed in (1, 2):
        result = invoke("run", path, "--seed", seed)  # default folder: reports/<name>-seed<N>
        assert result.exit_code == 0, result.output
    runs = [json.loads((tmp_path / "reports" / f"tiny-seed{seed}" / "report.json").read_text()) for seed in (1, 2)]
    assert [r["spec"]["seed"] for r in runs] == [1, 2]
    # different seeds, different models: a summary of identical numbers would prove nothing
    assert runs[0]["cells"][1]["metrics"]["train_loss"] != runs[1]["cells"][1]["metrics"]["train_loss"]

    result = invoke("report", "--across-seeds", "reports/tiny-seed1", "reports/tiny-seed2")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps the title to the terminal's width
    assert "mean ± sd over seeds 1, 2" in text
    summary = json.loads((tmp_path / "reports" / "tiny-seeds" / "seeds.json").read_text())
    assert summary["seeds"] == [1, 2] and "seed" not in summary["spec"]
    assert [(c["model"], c["strength"], c["n"]) for c in summary["cells"]] == [("lenet", 0, 2), ("lenet", 32, 2)]
    for i, cell in enumerate(summary["cells"]):
        for key in ("clean_acc", "ge", "pgd_acc"):
            values = [r["cells"][i]["metrics"][key] for r in runs]
            stats = cell["metrics"][key]
            assert stats["values"] == values
            assert stats["mean"] == pytest.approx(statistics.fmean(values))
            assert stats["sd"] == pytest.approx(statistics.stdev(values))
    ge = summary["cells"][1]["metrics"]["ge"]
    assert f"{ge['mean']:.4f}±{ge['sd']:.4f}" in text

    # Figures 2 and 4 with error bars (Fig. 3 needs the analysis, disabled here)
    folder = tmp_path / "reports" / "tiny-seeds"
    assert sorted(p.name for p in folder.glob("*.png")) == ["fig2_ge_seeds.png", "fig4_pgd_seeds.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in folder.glob("*.png"))
    from harness.figures import make_seed_figures

    (bars,) = make_seed_figures(summary)["fig2_ge_seeds.png"].axes[0].containers  # one model: one errorbar
    means = [c["metrics"]["ge"]["mean"] for c in summary["cells"]]
    sds = [c["metrics"]["ge"]["sd"] for c in summary["cells"]]
    assert list(bars.lines[0].get_ydata()) == pytest.approx(means)
    segments = bars.lines[2][0].get_segments()  # the vertical bars: mean - sd to mean + sd
    assert [seg[1][1] - seg[0][1] for seg in segments] == pytest.approx([2 * sd for sd in sds])


def test_runs_that_are_not_seeds_of_one_experiment_are_refused(spec, write_spec, tmp_path):
    path = write_spec(spec)
    other = write_spec(dict(spec, training=dict(spec["training"], lr=0.05)), "other.json")
    for args in (("--seed", 1, "--out", tmp_path / "a"), ("--seed", 1, "--out", tmp_path / "b")):
        assert invoke("run", path, *args).exit_code == 0
    assert invoke("run", other, "--seed", 2, "--out", tmp_path / "c").exit_code == 0

    same_seed = invoke("report", "--across-seeds", tmp_path / "a", tmp_path / "b")
    assert same_seed.exit_code == 2 and "both ran seed 1" in same_seed.output
    other_lr = invoke("report", "--across-seeds", tmp_path / "a", tmp_path / "c")
    assert other_lr.exit_code == 2 and "differs from" in other_lr.output and "training" in other_lr.output
    alone = invoke("report", "--across-seeds", tmp_path / "a")
    assert alone.exit_code == 2 and "at least two seeds" in alone.output
    # and a plain merge of two seeds is refused too: their cells cannot share one table
    merged = invoke("report", tmp_path / "a", tmp_path / "c")
    assert merged.exit_code == 2


def test_an_interrupted_seed_run_resumes_with_its_seed(spec, write_spec, tmp_path, monkeypatch):
    """The resume command printed after a signal must keep --seed, or it would resume another experiment."""
    import signal

    from harness import checkpoint

    spec["training"].update(epochs=2)
    path = write_spec(spec)
    real_save = checkpoint.save

    def save_then_signal(ckpt_path, state):  # a real SIGTERM right after the first checkpoint is on disk
        real_save(ckpt_path, state)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(checkpoint, "save", save_then_signal)
    result = invoke("run", path, "--seed", 3, "--out", tmp_path / "out")
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert result.exit_code == 143
    assert f"--out {tmp_path / 'out'} --seed 3" in result.output
    resumed = invoke("run", path, "--seed", 3, "--out", tmp_path / "out")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((tmp_path / "out" / "report.json").read_text())["spec"]["seed"] == 3


def test_a_cell_that_failed_for_one_seed_is_left_out_of_its_statistics_and_named(spec, write_spec, tmp_path):
    path = write_spec(spec)
    for seed in (1, 2, 3):
        assert invoke("run", path, "--seed", seed, "--out", tmp_path / f"s{seed}").exit_code == 0
    report_path = tmp_path / "s3" / "report.json"
    report = json.loads(report_path.read_text())  # as if seed 3's strength-32 cell had diverged
    report["cells"][1] = {k: report["cells"][1][k] for k in ("id", "model", "defense", "strength")}
    report["cells"][1].update(status="failed", error="training loss became nan at epoch 1, step 1")
    report_path.write_text(json.dumps(report))
    (tmp_path / "s3" / "cells" / "lenet__s32.json").write_text(json.dumps(report["cells"][1]))

    result = invoke("report", "--across-seeds", *(tmp_path / f"s{seed}" for seed in (1, 2, 3)), "--out", tmp_path / "agg")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "agg" / "seeds.json").read_text())
    s0, s32 = summary["cells"]
    assert (s0["n"], s0["seeds"], s0["failed_seeds"]) == (3, [1, 2, 3], [])
    assert (s32["n"], s32["seeds"], s32["failed_seeds"]) == (2, [1, 2], [3])
    assert len(s32["metrics"]["ge"]["values"]) == 2
    assert "failed for seed(s) 3, left out of its statistics" in " ".join(result.output.split())
