"""Shared pytest configuration."""

import os

# JAX tests use a CPU mesh of 2 devices; the flag must be set before jax is first imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """The demo corpus prepared once per test session in a private cache (WF_DATA_CACHE)."""
    from wf_data.data.prepare.demo_corpus import ensure_demo_data

    cache = tmp_path_factory.mktemp("wf-data-cache")
    previous = os.environ.get("WF_DATA_CACHE")
    os.environ["WF_DATA_CACHE"] = str(cache)
    ensure_demo_data(progress=False)
    yield cache
    if previous is None:
        os.environ.pop("WF_DATA_CACHE", None)
    else:
        os.environ["WF_DATA_CACHE"] = previous
