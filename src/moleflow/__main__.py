"""``python -m moleflow``: the command line."""

from moleflow.cli import main

raise SystemExit(main())
