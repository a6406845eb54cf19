"""tests/flax039 runs in its own venv (the `flax039` extra, `.ci/run`); the main suite does not collect it
(`norecursedirs` in pyproject.toml). Two host devices, so that the pipeline's `jit=True` path (a pmap) maps over
more than one; set before jax starts its backend."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
