"""Former home of the main job, kept while callers move to :mod:`bench.cli`."""

from bench.cli import main  # noqa: F401
from bench.run import device_name  # noqa: F401
