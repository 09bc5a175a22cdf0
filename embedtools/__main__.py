"""``python -m embedtools``."""

from embedtools.cli import main

raise SystemExit(main())
