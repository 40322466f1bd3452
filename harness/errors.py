"""The two kinds of failure the CLI distinguishes.

BadInput (exit 2): something the user gave us is wrong; the message names the problem and the fix.
RunFailure (exit 1): the input was fine but running it failed (a non-finite loss, an attack that broke
its contract). Neither is ever shown with a traceback.
"""

from __future__ import annotations


class HarnessError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"


class BadInput(HarnessError):
    """The spec, a path, a plugin name or a plugin's options are wrong. Exit code 2."""

    exit_code = 2


class RunFailure(HarnessError):
    """A cell failed while running. Exit code 1."""

    exit_code = 1


class PluginFailure(RunFailure):
    """A plugin's own code raised (an exception that is not a HarnessError) while the harness called it: building,
    loading, a defense's loss, an attack's perturb. Exit code 1; the message names the plugin, the distribution
    that provides it and the cause (harness.registry.plugin_boundary)."""


class DatasetNotFound(BadInput):
    """A dataset plugin found no data where it looked (exit 2). Smoke runs replace such data by a stand-in when
    the plugin offers one (`stand_in(train_size, test_size, seed)`)."""
