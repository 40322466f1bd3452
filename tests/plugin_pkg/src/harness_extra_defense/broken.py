"""A plugin module that fails at import time, as a third party's broken release would."""

raise ImportError("harness-extra-defense was built against an incompatible CUDA toolkit")
