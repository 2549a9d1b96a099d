"""``python -m moleflow``: the same command line as ``moleflow``."""

from moleflow.cli import main

raise SystemExit(main())
