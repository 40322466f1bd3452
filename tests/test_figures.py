"""Figures 2-4 for papers: --format png,pdf,svg on `run` and `report`, x ticks at the trained strengths, one
strength without a negative axis, titles that describe the experiment. Drawn from one real tiny run."""

import copy
import json

import pytest

from harness.figures import make_figures, write_figures

from conftest import TINY_SPEC, invoke

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-"}
STEMS = ("fig2_ge", "fig3_loss_variation", "fig4_pgd")


def is_svg(data: bytes) -> bool:
    return data.startswith(b"<?xml") and b"<svg" in data[:1000]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fig")
    spec = copy.deepcopy(TINY_SPEC)
    spec["name"] = "internal_spec_name_x7"
    spec["models"][0]["label"] = "LeNet-SN"
    spec["dataset"].update(max_train=128, max_test=64)
    spec["defense"]["strengths"] = [0, 8, 32]  # matplotlib's own ticks would be 0, 5, 10, ..., 30
    spec["analysis"] = {"max_train": 32, "steps": 2}
    (root / "spec.json").write_text(json.dumps(spec))
    result = invoke("run", root / "spec.json", "--out", root / "out", "--format", "svg")
    assert result.exit_code == 0, result.output
    return root / "out"


def report_of(run_dir) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def test_run_writes_the_formats_asked_for(run_dir):
    assert sorted(p.name for p in run_dir.glob("fig*")) == sorted(f"{s}.svg" for s in STEMS)
    for stem in STEMS:
        assert is_svg((run_dir / f"{stem}.svg").read_bytes())


def test_report_writes_png_pdf_and_svg(run_dir, tmp_path):
    result = invoke("report", run_dir, "--out", tmp_path, "--format", "png, PDF,svg,png")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("fig*")) == sorted(f"{s}.{f}" for s in STEMS for f in
                                                                    ("png", "pdf", "svg"))
    for stem in STEMS:
        for fmt, magic in MAGIC.items():
            assert (tmp_path / f"{stem}.{fmt}").read_bytes().startswith(magic), (stem, fmt)
        assert is_svg((tmp_path / f"{stem}.svg").read_bytes())
    default = tmp_path / "default"
    assert invoke("report", run_dir, "--out", default).exit_code == 0
    assert sorted(p.name for p in default.glob("fig*")) == sorted(f"{s}.png" for s in STEMS)


def test_vector_files_are_reproducible(run_dir, tmp_path):
    """No creation date in PDF/SVG: drawing the same report twice gives the same bytes."""
    first = write_figures(report_of(run_dir), tmp_path / "a", formats=("pdf", "svg"))
    second = write_figures(report_of(run_dir), tmp_path / "b", formats=("pdf", "svg"))
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


@pytest.mark.parametrize("command", ["run", "report"])
def test_unknown_format_is_exit_2_before_anything_runs(run_dir, tmp_path, command):
    target = run_dir.parent / "spec.json" if command == "run" else run_dir
    result = invoke(command, target, "--out", tmp_path / "o", "--format", "png,jpg")
    assert result.exit_code == 2
    assert "'jpg' is not a figure format" in result.output and "png, pdf, svg" in result.output
    assert not (tmp_path / "o").exists()
    assert "did you mean 'pdf'?" in invoke(command, target, "--out", tmp_path / "o", "--format", "pfd").output


def test_ticks_are_the_trained_strengths(run_dir):
    for name, fig in make_figures(report_of(run_dir)).items():
        ax = fig.axes[0]
        assert list(ax.get_xticks()) == [0, 8, 32], name
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "8", "32"], name


@pytest.mark.parametrize("strength", [0, 8])
def test_one_cell_has_no_negative_axis(run_dir, strength):
    report = report_of(run_dir)
    report["cells"] = [c for c in report["cells"] if c["strength"] == strength]
    for name, fig in make_figures(report).items():
        ax = fig.axes[0]
        left, right = ax.get_xlim()
        assert 0 <= left <= strength < right, (name, left, right)
        assert list(ax.get_xticks()) == [strength], name
        fig.canvas.draw() if fig.canvas else None


def test_titles_describe_the_experiment_not_the_spec_name(run_dir):
    for name, fig in make_figures(report_of(run_dir)).items():
        title = fig.axes[0].get_title()
        assert "internal_spec_name_x7" not in title, title
        for words in ("digits (8×8)", "LeNet-SN", "PGD adversarial training"):
            assert words in title, (name, title)
