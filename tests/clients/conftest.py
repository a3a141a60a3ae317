"""Fixture of the real-client tests: the demo config with small rows and batches."""

import pytest

from tests.clients.streams import OVERRIDES


@pytest.fixture
def demo_config(demo_cache):
    """The demo config with OVERRIDES, resolved (absolute source paths)."""
    from wf_data.config import load_data_config

    return load_data_config("demo", OVERRIDES)
