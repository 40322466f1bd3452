"""harness: reproduce and extend "Sample-wise Adversarial Robustness Regularizes Neural Networks".

The flow is one-way: spec (harness.spec) -> plan of cells (harness.runner) -> train (harness.train)
-> evaluate (harness.evaluate) -> report (harness.report). Plugins are found through entry points
(harness.registry) and implement the small protocols of harness.plugin.

For notebooks and scripts (harness.api): `harness.run(spec_or_path, out=...)`, `harness.evaluate(model,
"digits", attacks=[...], eps=8)` and `harness.validate(spec_or_path)`, each returning a document and raising
harness.errors' exceptions. They are imported on first use, so `import harness` stays light.
"""

__version__ = "0.1.0"
__all__ = ["__version__", "evaluate", "run", "validate"]


def __getattr__(name: str):
    # `harness.evaluate` is also the submodule of the metrics (harness/evaluate.py), which the import system sets as
    # this attribute once it is imported; that module is callable and forwards to harness.api.evaluate.
    if name in ("run", "validate"):
        from harness import api

        return getattr(api, name)
    if name == "evaluate":
        import importlib

        return importlib.import_module("harness.evaluate")
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
