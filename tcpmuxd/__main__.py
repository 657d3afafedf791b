"""``python -m tcpmuxd``: the same as the ``tcpmuxd`` command (units use it when not installed)."""

from tcpmuxd.tcpmux.cli import main

raise SystemExit(main())
