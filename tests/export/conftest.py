"""The export tests share the tracking tests' tiny runs (made once per session)."""

from tests.tracking.conftest import dino_run, tiny_data  # noqa: F401
