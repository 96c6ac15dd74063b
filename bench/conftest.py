"""Benchmarks run only under ``pytest --benchmark-only``; plain ``pytest`` does not collect them."""


def pytest_ignore_collect(collection_path, config):
    if collection_path.name == "conftest.py":
        return None
    return not config.getoption("benchmark_only", default=False)
