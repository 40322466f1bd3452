"""harness: reproduce and extend "Sample-wise Adversarial Robustness Regularizes Neural Networks".

The flow is one-way: spec (harness.spec) -> plan of cells (harness.runner) -> train (harness.train)
-> evaluate (harness.evaluate) -> report (harness.report). Plugins are found through entry points
(harness.registry) and implement the small protocols of harness.plugin.
"""

__version__ = "0.1.0"
