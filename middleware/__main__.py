"""``python -m middleware``: the operator command line (see :mod:`middleware.cli`)."""

from .cli import main

raise SystemExit(main())
