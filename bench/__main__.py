"""``python -m bench``: the main job (see :mod:`bench.runner`)."""

from bench.runner import main

raise SystemExit(main())
