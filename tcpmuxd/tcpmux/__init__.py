"""tcpmuxd, the TCPMUX superserver (RFC 1078), and tcpmux, its client: the protocol, the
service files, the dispatcher and what a service does with a connection."""
