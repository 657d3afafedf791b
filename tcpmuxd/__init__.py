"""tcpmuxd: a systemd-native TCPMUX (RFC 1078) superserver, and sockmuxd, a SockMux tunnel."""

__version__ = "0.1.0"
