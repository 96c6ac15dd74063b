"""``python -m bench`` (or ``python -m pefttriton.bench`` once installed): the main job (:mod:`bench.cli`)."""

from .cli import main

raise SystemExit(main())
