"""A container whose root is a writable copy of the host's, for installing packages in it.

:class:`OverlayRootContainer` boots the host's own root file system (``/``, with /usr, /etc and
/var/lib/dpkg) as the lower layer of an overlayfs whose upper layer is a tmpfs, so that ``dpkg
-i``, ``dpkg --purge`` and everything a package's maintainer scripts do can write anywhere in
the container while the host stays untouched. ``systemd-nspawn --volatile=overlay`` would be the
obvious way, but nspawn refuses it for the host's root; ``--volatile=yes`` keeps /usr read-only
and /var/lib/dpkg empty, so no package could be installed.

The overlay is mounted by the process that becomes ``systemd-nspawn``, in a mount namespace of
its own (``unshare --mount --propagation private``): the host never sees it, and it disappears
with the container however the test ends (no unmounting, nothing to clean up after a SIGKILL).
Booting takes a few seconds instead of half a second, because it is a whole system.

Before the boot, in the overlay only, the copy is made neutral, whatever the host has:

- The host's enabled units (``/etc/systemd/system/*.wants``, ``*.requires``: sshd, databases,
  apt's timers, gettys, ...) are disabled, so that only what the test enables runs.
- ``/usr/sbin/policy-rc.d`` is removed: Debian's maintainer scripts ask it before starting or
  restarting anything (``deb-systemd-invoke``), and build and CI machines often have one that
  denies everything (exit 101, as in Docker images), which would hide what the package does.

It can be rebooted (:meth:`OverlayRootContainer.reboot`, ``systemctl reboot`` inside): the
same root comes up again, with what was written to it, as after a real reboot; /run, /tmp and
the network namespace are new (a veth pair has to be made again).

Everything else is :class:`~.nspawn.Container` (readiness, cgroups, diagnostics, exec, netns).
Pass ``presets=None`` to keep the distribution's presets: on Debian, enabling a unit on first
installation goes through ``systemctl preset``, which the harness's default ``disable *`` would
turn down.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time

from .nspawn import Container, ContainerError

__all__ = ["OverlayRootContainer", "link_veth", "veth_unavailable_reason"]

#: Runs as the process that then execs nspawn: $1 the layer directory, $2 the merged root.
_PREPARE = r"""
set -eu
layers=$1 root=$2
shift 3
mount -t tmpfs -o mode=0755 tcpmuxd-e2e-upper "$layers"
mkdir "$layers/upper" "$layers/work"
mount -t overlay -o "lowerdir=/,upperdir=$layers/upper,workdir=$layers/work" \
    tcpmuxd-e2e-root "$root"
# An overlay sees one file system: directories the host mounts separately get their own.
for d in usr var etc opt srv; do
    if mountpoint -q "/$d"; then
        mkdir "$layers/$d.upper" "$layers/$d.work"
        mount -t overlay -o "lowerdir=/$d,upperdir=$layers/$d.upper,workdir=$layers/$d.work" \
            "tcpmuxd-e2e-$d" "$root/$d"
    fi
done
# The host's enabled units stay the host's.
find "$root/etc/systemd/system" -mindepth 2 -maxdepth 2 -type l \
    \( -path '*.wants/*' -o -path '*.requires/*' \) -delete
rm -f "$root/usr/sbin/policy-rc.d"
# nspawn exits with status 133 when the container reboots, leaving the new boot to its caller
# (as systemd-nspawn@.service does, RestartForceExitStatus=133): boot it again, on the same
# overlay, which lasts as long as this shell's mount namespace. A SIGTERM for this shell (the
# harness's stop, the parent-death signal) is passed on to nspawn, which powers off.
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
while :; do
    "$@" &
    child=$!
    while :; do
        wait "$child" && rc=0 || rc=$?
        kill -0 "$child" 2>/dev/null || break  # else wait was cut short by the trap
    done
    [ "$rc" -eq 133 ] || exit "$rc"
done
"""


class OverlayRootContainer(Container):
    """A :class:`Container` booting a private, writable overlay of the host's root."""

    def __init__(self, **kwargs):
        if "directory" in kwargs or "volatile" in kwargs:
            raise TypeError("OverlayRootContainer makes its own root: no directory=/volatile=")
        super().__init__(directory="/", volatile=None, **kwargs)
        self._layers: str | None = None

    def _start(self, t0: float) -> None:
        # Called by start() once the temporary directory exists: the mount points go there.
        self._layers, self.directory = f"{self._tmp}/layers", f"{self._tmp}/root"
        os.mkdir(self._layers)
        os.mkdir(self.directory)
        super()._start(t0)

    def reboot(self) -> float:
        """``systemctl reboot`` in the container, then wait until the new boot is up, as after
        :meth:`start`. Returns the seconds it took."""
        t0 = time.monotonic()
        self._require_running()
        old = os.pidfd_open(self.leader_pid)
        self._drop_notifications()  # the next READY=1 is the new boot's
        try:
            self.exec(["systemctl", "reboot"])  # the manager may go before it answers
            if not select.select([old], [], [], self.stop_timeout)[0]:
                raise ContainerError(f"still up {self.stop_timeout} s after systemctl reboot; "
                                     f"what it was doing then:\n{self._shutdown_state()}")
        finally:
            os.close(old)
        for fd in (self._leader_pidfd, self._netns_fd):
            if fd is not None:
                os.close(fd)
        self._leader_pidfd = self._netns_fd = self.leader_pid = None
        self._wait_ready(t0)
        self._wait_system_running(t0)
        return time.monotonic() - t0

    def _shutdown_state(self) -> str:
        """The manager's pending jobs and the processes left, for a shutdown that hangs."""
        parts = []
        for cmd in (["systemctl", "list-jobs", "--no-pager"],
                    ["ps", "-eo", "pid,stat,etime,args"]):
            try:
                r = self.exec(cmd, timeout=5)
                parts.append(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
            except (OSError, subprocess.SubprocessError, ContainerError) as exc:
                parts.append(f"$ {' '.join(cmd)}: {exc}")
        return "\n".join(parts)

    def command_line(self) -> list[str]:
        argv = super().command_line()
        if self._layers is None:
            return argv
        return ["unshare", "--mount", "--propagation", "private", "--",
                "/bin/sh", "-c", _PREPARE, "prepare-root", self._layers, self.directory, "--",
                *argv]


def veth_unavailable_reason() -> str | None:
    """Why :func:`link_veth` cannot work here (a message for ``pytest.skip``), or None.

    A veth pair is made, and goes away, in a network namespace of its own: some machines (in
    containers, mostly) may not create veth devices at all.
    """
    if shutil.which("ip") is None:
        return "the ip command is not installed (apt-get install iproute2)"
    r = subprocess.run(["unshare", "--net", "--", "ip", "link", "add", "probe0", "type", "veth",
                        "peer", "name", "probe1"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"cannot create a veth pair here: {(r.stderr or r.stdout).strip()}"
    return None


def link_veth(a: Container, b: Container, *, name: str, address_a: str, address_b: str,
              prefix: int = 24) -> None:
    """Join two running containers with a veth pair, both ends called ``name``.

    The pair is created with each end directly in a container's network namespace, so the
    host's never holds it, and it goes away with the containers. ``address_a``/``address_b``
    are IPv4 addresses given to the two ends.
    """
    subprocess.run(
        ["ip", "link", "add", "name", name, "netns", str(a.leader_pid), "type", "veth",
         "peer", "name", name, "netns", str(b.leader_pid)],
        check=True, capture_output=True, text=True,
    )
    for c, address in ((a, address_a), (b, address_b)):
        c.exec(["ip", "address", "add", f"{address}/{prefix}", "dev", name], check=True)
        c.exec(["ip", "link", "set", name, "up"], check=True)
