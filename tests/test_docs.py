"""The documentation cannot drift from the code: every spec key is in docs/spec-reference.md, every relative link
and anchor in README.md and docs/ resolves, the README keeps the two commands that .ci/run and users run, and the
plugin authors' worked example (docs/plugin-authors.md) is built, installed and run exactly as printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

DOCS = REPO / "docs"
REFERENCE = DOCS / "spec-reference.md"
SCHEMA = REPO / "harness" / "schemas" / "spec.schema.json"


def schema_keys(node: dict, prefix: str = "") -> list[str]:
    """Every property path of the spec schema: `a.b`, `list[].key`, keys of tagged-union (oneOf) variants."""
    keys = []
    for key, sub in node.get("properties", {}).items():
        path = prefix + key
        keys.append(path)
        keys += schema_keys(sub, path + ".")
        if isinstance(sub.get("items"), dict):
            keys += schema_keys(sub["items"], path + "[].")
        for variant in sub.get("oneOf", []) + sub.get("anyOf", []):
            keys += schema_keys(variant, path + ".")
    return keys


def test_every_spec_key_is_in_the_reference():
    keys = sorted(set(schema_keys(json.loads(SCHEMA.read_text()))))
    assert "device" in keys and "training.schedule.milestones" in keys and "evaluation.attacks[].eps" in keys
    text = REFERENCE.read_text()
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, (f"spec keys missing from docs/spec-reference.md: {missing}; "
                         "run .venv/bin/python tools/spec_reference.py")


def test_reference_is_generated_from_the_current_schema():
    done = subprocess.run([sys.executable, str(REPO / "tools" / "spec_reference.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[|\]\([^)]*\)", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out, seen, fenced = set(), {}, False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#"))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def doc_files() -> list[Path]:
    return [REPO / "README.md", REPO / "DEVELOPERS.md", *sorted(DOCS.glob("*.md"))]


def test_relative_links_and_anchors_resolve():
    assert {"user-guide.md", "spec-reference.md", "plugin-authors.md", "performance.md", "cluster.md"} <= {
        p.name for p in DOCS.glob("*.md")}
    broken = []
    for doc in doc_files():
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_is_short_and_keeps_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 10 * 1024, "README.md over 10 KiB: move detail to docs/"
    for marker, tail in (("<!-- run-command -->", ".venv/bin/harness run specs/digits_lenet.json"),
                         ("<!-- test-command -->", ".venv/bin/python -m pytest -q")):
        after = readme.split(marker, 1)[1].lstrip("\n").splitlines()
        assert after[0] == "```bash" and after[1].startswith("python3 -m venv .venv && ") and after[1].endswith(tail)
        assert after[2] == "```"
    assert "source .venv/bin/activate" in readme
    for page in ("user-guide", "spec-reference", "plugin-authors", "performance", "cluster"):
        assert f"(docs/{page}.md" in readme


def example_files() -> dict[str, str]:
    """The files of the plugin authors' worked example: each code block after a `<!-- file: PATH -->` line."""
    text = (DOCS / "plugin-authors.md").read_text()
    return dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)\n```", text, flags=re.S))


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    files = example_files()
    assert set(files) == {"pyproject.toml", "src/my_harness_plugins/defense.py", "src/my_harness_plugins/dataset.py",
                          "spec.json"}
    pkg = tmp_path_factory.mktemp("my-harness-plugins")
    for rel, body in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(body + "\n")
    (pkg / "src" / "my_harness_plugins" / "__init__.py").write_text("")  # "(empty)" in the layout
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(pkg)], check=True)
    work = tmp_path_factory.mktemp("work")
    spec = json.loads(files["spec.json"])
    (work / "spec.json").write_text(files["spec.json"])
    env = dict(os.environ, PYTHONPATH=str(site), GIT_PYTHON_REFRESH="quiet", OMP_NUM_THREADS="1")
    return work, spec, env


def harness(env, cwd, *args):
    return subprocess.run([sys.executable, "-m", "harness", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def quick(spec: dict, work: Path, name: str, **changes) -> str:
    """The doc's spec with the analysis and the checks off and one strength, to keep the test fast."""
    spec = json.loads(json.dumps(spec))
    spec["analysis"] = {"enabled": False}
    spec["evaluation"]["checks"] = {"enabled": False}
    spec["defense"]["strengths"] = [16]
    for path, value in changes.items():
        node = spec
        *parents, last = path.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    (work / name).write_text(json.dumps(spec))
    return name


def test_plugin_example_is_listed_and_validates(example):
    work, spec, env = example
    listing = harness(env, work, "plugins")
    assert listing.returncode == 0
    assert "gaussian-noise" in listing.stdout and "npz-images" in listing.stdout
    assert "my-harness-plugins 0.1.0" in listing.stdout
    done = harness(env, work, "validate", "spec.json")
    assert done.returncode == 0, done.stdout + done.stderr


def test_plugin_example_signals_missing_data_and_bad_options(example):
    work, spec, env = example
    done = harness(env, work, "run", "spec.json")  # as printed: no data yet
    assert done.returncode == 2, done.stdout + done.stderr
    assert "npz-images: not found: data/npz-images/train.npz" in done.stderr and "Traceback" not in done.stderr
    bad = quick(spec, work, "bad.json", defense__options={"min_ratio": 0.9, "max_ratio": 0.5})
    done = harness(env, work, "run", bad, "--smoke", "--out", "bad")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "min_ratio 0.9 is larger than max_ratio 0.5" in done.stderr and "Traceback" not in done.stderr


def test_plugin_example_smoke_runs_on_stand_in_then_on_real_data(example):
    work, spec, env = example
    name = quick(spec, work, "quick.json")
    done = harness(env, work, "run", name, "--smoke", "--out", "smoke")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((work / "smoke" / "report.json").read_text())
    assert report["smoke"] is True and report["data"]["stand_in"] is True
    assert [c["defense"] for c in report["cells"]] == ["gaussian-noise"]
    provenance = {p["name"]: p["distribution"] for p in report["environment"]["plugins"]}
    assert provenance["gaussian-noise"] == provenance["npz-images"] == "my-harness-plugins"

    # Real data in the layout the page describes: <root>/npz-images/{train,test}.npz.
    rng = np.random.default_rng(0)
    folder = work / "datasets" / "npz-images"
    folder.mkdir(parents=True)
    for split, n in (("train", 128), ("test", 64)):
        np.savez(folder / f"{split}.npz", images=rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8),
                 labels=np.arange(n) % 10)
    done = harness(env, work, "run", name, "--data-root", "datasets", "--out", "real")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((work / "real" / "report.json").read_text())
    assert report["data"]["stand_in"] is False and "npz-images from datasets/npz-images" in report["data"]["source"]
    assert report["data"]["train_size"] == 128 and report["cells"][0]["status"] == "done"
