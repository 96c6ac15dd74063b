"""``python -m bench``: the main job (see :mod:`bench.cli`)."""

from bench.cli import main

raise SystemExit(main())
