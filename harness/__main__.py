"""``python -m harness``: the same command as the ``harness`` console script."""

from harness.matrix.cli import main

raise SystemExit(main())
