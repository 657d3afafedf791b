"""What both daemons use: addresses and their rules, drop-in files, the systemd adapter, child
processes. Nothing here imports :mod:`tcpmuxd.tcpmux` or :mod:`tcpmuxd.sockmux`."""
