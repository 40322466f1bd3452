"""harness's built-in plugins, each a thin adapter over a library. Imported as `harness_plugins`.

They register through the same entry-point groups a third-party package uses (see pyproject.toml).
"""
