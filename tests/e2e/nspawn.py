"""Boot a real systemd as PID 1 in a throw-away container, for end-to-end tests.

``Container`` wraps ``systemd-nspawn --boot`` so that a test can install units, start them with
``systemctl`` and talk to them over TCP, on a machine whose PID 1 is not systemd (CI VMs,
developer laptops under another init, ...). It needs root and ``systemd-nspawn``
(``apt-get install --no-install-recommends systemd-container``); :func:`unavailable_reason`
tells a test why it has to skip.

By default the container is the host's own /usr, read-only, under a tmpfs root
(``--directory=/ --volatile=yes``): no image to build, it boots in about half a second. Pass
``directory=`` (and ``volatile=None``) for a prepared rootfs instead.

What it takes care of, so that tests do not have to:

- **Readiness without polling**: ``--notify-ready=yes`` and a NOTIFY_SOCKET of our own. nspawn
  reports the container's leader PID, then READY=1 once the container's systemd has finished
  booting. A container that dies during boot is noticed at once (a pidfd on nspawn).
- **No leftovers**: nspawn runs in a cgroup of its own (on the cgroup v2 hierarchy and on the v1
  ``name=systemd`` one, whichever exist), removed afterwards. It gets SIGTERM as parent-death
  signal, so a test run that is killed still powers the container off cleanly. Stopping sends
  SIGTERM to nspawn (a clean poweroff, well under a second), SIGKILL after ``stop_timeout``,
  then kills the container's init through a pidfd if it outlived nspawn (it does when nspawn
  gets SIGKILL: it is reparented, not killed) and whatever is left in the cgroup. Empty cgroups
  and temporary directories left behind by killed runs are swept.
- **No surprises from the host's units**: the first boot of an empty /etc would run preset-all
  and enable every installed service; a preset directory saying ``disable *`` is bound over
  ``/etc/systemd/system-preset``. ``systemd-firstboot`` (it would wait for input) and the
  console getty are masked. Pure cgroup v2 inside (``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``), and
  ``--system-call-filter=bpf`` so that ``IPAddressAllow=``/``IPAddressDeny=`` are enforced.
- **Failures explain themselves**: the console goes to a log (``--console=read-only``, which
  keeps systemd's status lines; ``--console=pipe`` loses them for want of a /dev/console). Boot
  failures carry its tail; a failing ``exec(..., check=True)`` carries the command's output and
  the tail of the container's journal; an exception leaving the ``with`` block gets both
  attached as a note (:meth:`diagnostics` gives the same text to a pytest hook).

Usage::

    with Container(bind_ro=[(project, "/opt/proj")]) as c:
        c.write_file("/etc/systemd/system/echo.socket", "...")
        c.systemctl("daemon-reload")
        c.systemctl("start", "echo.socket")
        with c.connect(("127.0.0.1", 7)) as s:
            ...

Processes started with :meth:`exec` enter all of the container's namespaces and its root
(``nsenter --all --root --wd``) with a clean environment; they stay in the test's cgroup, which does not matter for
``systemctl``/``journalctl``. Sockets from :meth:`connect`/:meth:`socket` are created by a helper
thread that joined the container's network namespace (a socket stays in the namespace it was
created in), so they can be used from any thread afterwards.

The parent-death signal fires when the *thread* that started the container ends: start it from
the thread that will stop it (pytest fixtures and tests run in the main thread).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import json
import os
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Iterable, Mapping, Sequence

__all__ = [
    "Container",
    "ContainerError",
    "ContainerCommandError",
    "unavailable_reason",
]

NSPAWN = "systemd-nspawn"
NSENTER = "nsenter"
CLONE_NEWNET = 0x40000000

#: The environment of commands run inside: nothing of the test process leaks in.
EXEC_ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "cat",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_LOG_COLOR": "0",
}

DEFAULT_KERNEL_ARGS = (
    "systemd.mask=systemd-firstboot.service",
    "systemd.mask=console-getty.service",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_counter = itertools.count(1)


def unavailable_reason() -> str | None:
    """Why containers cannot be booted here (a message for ``pytest.skip``), or None.

    First what can be seen up front: not root; no CAP_SYS_ADMIN or CAP_NET_ADMIN (nested in a
    container that dropped them: the containers' mounts or network); no systemd-nspawn; a root
    directory that is not a mount point (a chroot: nspawn's first step, making / a slave mount,
    fails); no user namespaces for this process (the kernel refuses them in a chroot, and the
    containers' processes would inherit that: sockmuxd@.service's PrivateUsers= fails); an
    empty /etc/machine-id (a system that never booted: nspawn needs the host's machine ID).
    Then, once per process, a bare container (the host's /usr, nothing of this project) is
    booted and its loopback used: where that fails (nested in another container, no cgroups or
    namespaces to spare, ...), the reason is its first error, and the tests that need
    containers are skipped, not failed.
    """
    if os.geteuid() != 0:
        return "booting systemd with systemd-nspawn needs root (euid is %d)" % os.geteuid()
    missing = _missing_capabilities()
    if missing:
        return (f"this process lacks {' and '.join(missing)} (nested in a container that "
                "dropped them?), without which the containers' mounts or network cannot be set "
                "up; run the tests on the host, or give the outer container these capabilities")
    for tool in (NSPAWN, NSENTER):
        if shutil.which(tool) is None:
            return (
                f"{tool} is not installed (apt-get install --no-install-recommends "
                "systemd-container util-linux)"
            )
    in_a_root = ("run the tests on a booted system, or enter the root with pivot_root in a "
                 "mount namespace of its own instead of chroot (as script/fresh-debian-check "
                 "does)")
    if not _root_is_a_mount_point():
        return ("/ is not a mount point here (a chroot?), so systemd-nspawn cannot boot the "
                f"host's root; {in_a_root}")
    problem = _user_namespace_problem()
    if problem:
        return (f"this process cannot create user namespaces ({problem}; the kernel refuses "
                "them in a chroot), and services with PrivateUsers= in the containers would "
                f"fail; {in_a_root}")
    try:
        machine_id = open("/etc/machine-id").read().strip()
    except OSError:
        machine_id = ""
    if not machine_id:
        return ("/etc/machine-id is missing or empty (a system that never booted, e.g. a fresh "
                "chroot), and systemd-nspawn needs the host's machine ID: systemd-machine-id-setup "
                "makes one, as the first boot would")
    return _boot_problem()


def _root_is_a_mount_point() -> bool:
    """Whether / is a mount point of this process's mount namespace. In a chroot into a plain
    directory it is not: /proc/self/mountinfo leaves out mounts above the process's root."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == "/" for line in f if len(line.split()) > 4)


#: Capabilities booting and wiring containers takes, by bit number (linux/capability.h).
_NEEDED_CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}


def _missing_capabilities() -> list[str]:
    """The capabilities of _NEEDED_CAPABILITIES this process does not have in effect."""
    with open("/proc/self/status") as f:
        effective = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
    return [name for name, bit in _NEEDED_CAPABILITIES.items() if not effective >> bit & 1]


def _user_namespace_problem() -> str | None:
    """Why ``unshare --user`` fails here (its error), or None when it works."""
    r = subprocess.run(["unshare", "--user", "--", "true"], capture_output=True, text=True,
                       timeout=30)
    return (r.stderr.strip() or f"unshare --user exited with {r.returncode}") \
        if r.returncode else None


@functools.cache
def _boot_problem() -> str | None:
    """Boot a bare container once; None if it came up, else why not (its first error)."""
    try:
        with Container(name_prefix="nspawn-probe", log=lambda line: None) as c:
            try:
                c.in_netns(_loopback_works)
            except OSError as e:
                return f"a bare container boots here, but its loopback does not work: {e}"
            return None
    except ContainerError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        console = lines[lines.index("--- console (tail) ---") + 1:] \
            if "--- console (tail) ---" in lines else []
        errors = [line for line in console if re.search(
            r"fail|error|denied|not permitted|invalid|cannot|unable", line, re.I)]
        detail = "; ".join(errors[-3:]) or (console[-1] if console else "")
        where = _container_name()
        return (f"a bare container cannot boot here{f' (inside a {where} container)' if where else ''}: "
                f"{lines[0] if lines else e!r}" + (f": {detail}" if detail else ""))


def _loopback_works() -> None:
    """Connect to a socket listening on 127.0.0.1 (in the caller's network namespace)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        socket.create_connection(server.getsockname(), timeout=5).close()


def _container_name() -> str | None:
    """The kind of container this runs in (systemd-detect-virt --container), or None."""
    try:
        r = subprocess.run(["systemd-detect-virt", "--container"], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    name = r.stdout.strip()
    return name if r.returncode == 0 and name and name != "none" else None


class ContainerError(RuntimeError):
    """The container could not be booted, or misbehaved."""


class ContainerCommandError(subprocess.CalledProcessError):
    """A command run inside the container failed; str() shows its output and the journal."""

    def __init__(self, returncode, cmd, output, stderr, journal_tail: str):
        super().__init__(returncode, cmd, output, stderr)
        self.journal_tail = journal_tail

    def __str__(self):
        return (
            f"{' '.join(map(str, self.cmd))!s} exited with status {self.returncode}\n"
            f"--- stdout ---\n{_text(self.output)}\n--- stderr ---\n{_text(self.stderr)}\n"
            f"--- journal (tail) ---\n{self.journal_tail}"
        )


def _text(data) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data


# --- namespaces -----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, nstype: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, nstype)
        return
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# --- cgroups --------------------------------------------------------------------------------


def _cgroup_hierarchies() -> list[tuple[str, str]]:
    """(mount point, our cgroup path) of the hierarchies nspawn creates cgroups in.

    That is the cgroup v2 hierarchy (at /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid
    host) and the v1 ``name=systemd`` one, whichever are mounted.
    """
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, sfields = pre.split(), post.split()
            if len(fields) < 5 or len(sfields) < 3:
                continue
            mountpoint = fields[4].replace("\\040", " ")
            if sfields[0] == "cgroup2":
                mounts.setdefault("", mountpoint)
            elif sfields[0] == "cgroup" and "name=systemd" in sfields[2].split(","):
                mounts.setdefault("name=systemd", mountpoint)
    found = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            key = "" if hid == "0" else controllers
            if key in mounts:
                found.append((mounts[key], path))
    return found


def _rmdir_tree(path: str) -> None:
    """Remove an (empty of processes) cgroup and its children, bottom-up."""
    for dirpath, _dirnames, _files in os.walk(path, topdown=False):
        os.rmdir(dirpath)


def _cgroup_populated(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            return "populated 1" in f.read()
    except FileNotFoundError:  # v1: look for processes anywhere below
        for dirpath, _dirnames, _files in os.walk(path):
            try:
                with open(os.path.join(dirpath, "cgroup.procs")) as f:
                    if f.read().strip():
                        return True
            except FileNotFoundError:
                pass
        return False


# --- the container --------------------------------------------------------------------------


def _pair(spec) -> str:
    if isinstance(spec, str):
        return spec
    src, dst = spec
    return f"{src}:{dst}"


class Container:
    """A booted systemd in a ``systemd-nspawn`` container; use as a context manager.

    Parameters (all keyword-only):

    - ``directory``/``volatile``: the root (default: the host's, ``--volatile=yes``).
    - ``bind``/``bind_ro``: ``(source, destination)`` pairs or nspawn's ``SRC:DST[:OPTS]``.
    - ``private_network``: own network namespace with only loopback (default True).
    - ``presets``: text of a preset file bound over /etc/systemd/system-preset (default
      ``disable *``); None keeps the distribution's presets.
    - ``kernel_args``: arguments for the container's systemd (default masks firstboot and the
      console getty).
    - ``console``: nspawn's ``--console=``; ``read-only`` (default) copies the container's
      console, systemd's status lines included, to the log that :meth:`diagnostics` shows
      (``pipe`` would lose them: there is no /dev/console then).
    - ``extra_args``: more nspawn options, e.g. ``["--setenv=X=1", "--capability=..."]``.
    - ``boot_timeout``/``stop_timeout``: seconds.
    - ``log``: where progress lines go (default: stderr); ``name_prefix``: for machine and
      cgroup names.
    """

    def __init__(
        self,
        *,
        directory: str = "/",
        volatile: str | None = "yes",
        bind: Iterable = (),
        bind_ro: Iterable = (),
        private_network: bool = True,
        presets: str | None = "disable *\n",
        kernel_args: Sequence[str] = DEFAULT_KERNEL_ARGS,
        console: str = "read-only",
        extra_args: Sequence[str] = (),
        unified_hierarchy: bool = True,
        system_call_filter: str | None = "bpf",
        boot_timeout: float = 60.0,
        stop_timeout: float = 15.0,
        name_prefix: str = "nspawn-e2e",
        log: Callable[[str], None] | None = None,
    ):
        self.directory = directory
        self.volatile = volatile
        self.bind = [_pair(b) for b in bind]
        self.bind_ro = [_pair(b) for b in bind_ro]
        self.private_network = private_network
        self.presets = presets
        self.kernel_args = list(kernel_args)
        self.console = console
        self.extra_args = list(extra_args)
        self.unified_hierarchy = unified_hierarchy
        self.system_call_filter = system_call_filter
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.name_prefix = name_prefix
        self.machine = f"{name_prefix}-{os.getpid()}-{next(_counter)}"[:64]
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))

        self.leader_pid: int | None = None
        self.timings: dict[str, float] = {}
        self.system_state: str | None = None
        self.console_text: str = ""  # the whole console, once stopped
        self._proc: subprocess.Popen | None = None
        self._tmp: str | None = None
        self._cgroups: list[str] = []
        self._netns_fd: int | None = None
        self._leader_pidfd: int | None = None
        self._notify: socket.socket | None = None
        #: What nspawn sent to our NOTIFY_SOCKET, read by _notify_reader as it comes.
        self._notify_messages: queue.Queue[str] = queue.Queue()
        self._notify_reader: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "Container":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and hasattr(exc, "add_note"):
            try:
                if isinstance(exc, ContainerCommandError):  # carries the journal already
                    exc.add_note(f"--- console of {self.machine} (tail) ---\n"
                                 f"{self._console_tail(40)}")
                else:
                    exc.add_note(self.diagnostics())
            except Exception as e:  # never hide the original failure
                exc.add_note(f"(collecting container diagnostics failed: {e!r})")
        self.stop()
        return False

    def log(self, line: str) -> None:
        self._log(f"[{self.machine}] {line}")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command_line(self) -> list[str]:
        """The nspawn command line (without the cgroup/parent-death wrapper)."""
        argv = [
            NSPAWN,
            f"--directory={self.directory}",
            f"--machine={self.machine}",
            "--register=no",
            "--keep-unit",
            f"--console={self.console}",
            "--notify-ready=yes",
        ]
        if self.volatile:
            argv.append(f"--volatile={self.volatile}")
        if self.private_network:
            argv.append("--private-network")
        if self.system_call_filter:
            argv.append(f"--system-call-filter={self.system_call_filter}")
        if self.presets is not None:
            argv.append(f"--bind-ro={self._tmp}/preset:/etc/systemd/system-preset")
        argv += [f"--bind={b}" for b in self.bind]
        argv += [f"--bind-ro={b}" for b in self.bind_ro]
        argv += self.extra_args
        argv += ["--boot", "--", *self.kernel_args]
        return argv

    def start(self) -> None:
        if self._proc is not None:
            raise ContainerError("already started")
        t0 = time.monotonic()
        self._sweep_stale_tmp()
        self._tmp = tempfile.mkdtemp(prefix=f"{self.machine}.")
        try:
            self._start(t0)
        except BaseException as e:
            console = self._console_tail(60)
            self.stop()
            if isinstance(e, ContainerError):
                raise ContainerError(f"{e}\n--- console (tail) ---\n{console}") from None
            if hasattr(e, "add_note"):
                e.add_note(f"--- console (tail) ---\n{console}")
            raise

    def _start(self, t0: float) -> None:
        if self.presets is not None:
            os.mkdir(f"{self._tmp}/preset")
            with open(f"{self._tmp}/preset/00-{self.name_prefix}.preset", "w") as f:
                f.write(self.presets)
        notify_path = f"{self._tmp}/notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Kept open until stop(): a reboot (OverlayRootContainer.reboot) sends READY=1 again.
        # And read all the while: nspawn passes the container's notifications on (Debian 13's
        # for every unit that starts), a datagram queue holds 10 (net.unix.max_dgram_qlen), and
        # nspawn blocks on a full one: the container then never finished a reboot.
        self._notify = notify
        notify.bind(notify_path)
        notify.settimeout(0.2)
        self._notify_reader = threading.Thread(target=self._read_notify, args=(notify,),
                                               daemon=True, name=f"{self.machine}-notify")
        self._notify_reader.start()
        self._cgroups = self._make_cgroups()

        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LISTEN_", "WATCHDOG_")) and k != "NOTIFY_SOCKET"}
        env["NOTIFY_SOCKET"] = notify_path
        env["TERM"] = "dumb"  # nspawn hands it to the container's systemd: no colours
        if self.unified_hierarchy:
            env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
        # Join our cgroups, then become nspawn with SIGTERM as parent-death signal; a shell
        # does the first part so that no preexec_fn runs in a possibly threaded process.
        wrapper = [
            "/bin/sh", "-c",
            'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"',
            "sh", *[f"{cg}/cgroup.procs" for cg in self._cgroups], "--",
            "setpriv", "--pdeathsig", "TERM", "--", *self.command_line(),
        ]
        console_log = open(f"{self._tmp}/console.log", "wb")
        try:
            self._proc = subprocess.Popen(
                wrapper, env=env, stdin=subprocess.DEVNULL, stdout=console_log,
                stderr=subprocess.STDOUT, close_fds=True,
            )
        finally:
            console_log.close()
        self._wait_ready(t0)
        self._wait_system_running(t0)

    def _read_notify(self, notify: socket.socket) -> None:
        """The notify socket's reader thread, until stop() closes it."""
        while self._notify is notify:
            try:
                message = notify.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # closed by stop()
                return
            self._notify_messages.put(message.decode("utf-8", "replace"))

    def _drop_notifications(self) -> None:
        """Forget what nspawn said so far (before a reboot, whose READY=1 is awaited)."""
        while True:
            try:
                self._notify_messages.get_nowait()
            except queue.Empty:
                return

    def _wait_system_running(self, t0: float) -> None:
        """After nspawn's READY=1: until the container's systemd has finished its start-up."""
        self.timings["boot"] = time.monotonic() - t0
        # READY=1 means the manager finished starting up; its private socket (what systemctl
        # talks to) is there by then. Check, briefly, rather than assume.
        private = f"/proc/{self.leader_pid}/root/run/systemd/private"
        deadline = time.monotonic() + 5
        while not os.path.exists(private):
            if time.monotonic() > deadline:
                raise ContainerError("the container's /run/systemd/private never appeared")
            time.sleep(0.02)
        r = self.exec(["systemctl", "is-system-running", "--wait"], timeout=self.boot_timeout)
        self.system_state = r.stdout.strip()
        self.timings["system-running"] = time.monotonic() - t0
        self.log(f"booted in {self.timings['boot']:.2f} s, system {self.system_state} "
                 f"after {self.timings['system-running']:.2f} s (leader pid {self.leader_pid})")
        if self.system_state == "degraded":
            failed = self.systemctl("list-units", "--failed", "--plain", "--no-legend",
                                    check=False).stdout
            self.log(f"failed units:\n{failed}")
        elif self.system_state != "running":
            raise ContainerError(f"system state after boot: {self.system_state!r}\n"
                                 f"{self.journal(lines=60)}")

    def _wait_ready(self, t0: float) -> None:
        pidfd = os.pidfd_open(self._proc.pid)
        try:
            deadline = t0 + self.boot_timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ContainerError(f"no READY=1 from nspawn within {self.boot_timeout} s")
                if select.select([pidfd], [], [], 0)[0]:
                    rc = self._proc.wait()
                    raise ContainerError(f"systemd-nspawn exited with status {rc} "
                                         "before the container was ready")
                try:
                    message = self._notify_messages.get(timeout=min(remaining, 0.05))
                except queue.Empty:
                    continue
                for field in message.split("\n"):
                    if field.startswith("X_NSPAWN_LEADER_PID="):
                        self.leader_pid = int(field.partition("=")[2])
                        self._leader_pidfd = os.pidfd_open(self.leader_pid)
                        self._netns_fd = os.open(f"/proc/{self.leader_pid}/ns/net",
                                                 os.O_RDONLY | os.O_CLOEXEC)
                    elif field == "READY=1":
                        if self.leader_pid is None:
                            raise ContainerError("READY=1 without X_NSPAWN_LEADER_PID")
                        return
        finally:
            os.close(pidfd)

    def stop(self) -> None:
        """Power the container off (SIGTERM to nspawn) and clean up; idempotent."""
        t0 = time.monotonic()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.log(f"nspawn did not stop within {self.stop_timeout} s: SIGKILL")
                proc.kill()
                proc.wait()
        if proc is not None:
            self.timings["stop"] = time.monotonic() - t0
            if proc.returncode not in (0, None):
                self.log(f"systemd-nspawn exited with status {proc.returncode}")
        if self._leader_pidfd is not None:
            # nspawn normally takes its container with it; if it was killed, we do it here.
            try:
                signal.pidfd_send_signal(self._leader_pidfd, signal.SIGKILL)
                self.log("container leader survived nspawn: killed")
            except ProcessLookupError:
                pass
            os.close(self._leader_pidfd)
            self._leader_pidfd = None
        if self._netns_fd is not None:
            os.close(self._netns_fd)
            self._netns_fd = None
        if self._notify is not None:
            notify, self._notify = self._notify, None  # the reader sees it gone and ends
            if self._notify_reader is not None:
                self._notify_reader.join(5)
                self._notify_reader = None
            notify.close()
        self._remove_cgroups()
        if self._tmp is not None:
            try:
                with open(f"{self._tmp}/console.log", "rb") as f:
                    self.console_text = f.read().decode("utf-8", "replace")
            except FileNotFoundError:
                pass
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        propagate = f"/run/systemd/nspawn/propagate/{self.machine}"
        if os.path.isdir(propagate):
            shutil.rmtree(propagate, ignore_errors=True)

    # -- cgroups -----------------------------------------------------------------------------

    def _make_cgroups(self) -> list[str]:
        made = []
        for mountpoint, path in _cgroup_hierarchies():
            parent = os.path.join(mountpoint, path.lstrip("/"))
            self._sweep_stale(parent)
            cg = os.path.join(parent, self.machine)
            try:
                os.mkdir(cg)
            except OSError as e:
                self.log(f"cannot create cgroup {cg} ({e.strerror}): nspawn shares ours")
                continue
            made.append(cg)
        return made

    def _sweep_stale(self, parent: str) -> None:
        """Remove empty cgroups that runs of this harness killed with SIGKILL left behind."""
        pattern = re.compile(re.escape(self.name_prefix) + r"-(\d+)-\d+$")
        try:
            names = os.listdir(parent)
        except OSError:
            return
        for name in names:
            m = pattern.match(name)
            if not m or os.path.exists(f"/proc/{m.group(1)}"):
                continue
            path = os.path.join(parent, name)
            if not _cgroup_populated(path):
                try:
                    _rmdir_tree(path)
                except OSError:
                    pass

    def _sweep_stale_tmp(self) -> None:
        """Remove temporary directories (notify socket, console log) of killed runs."""
        pattern = re.compile(re.escape(self.name_prefix) + r"-(\d+)-\d+\.\w+$")
        tmp = tempfile.gettempdir()
        for name in os.listdir(tmp):
            m = pattern.match(name)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)

    def _remove_cgroups(self) -> None:
        for cg in self._cgroups:
            if _cgroup_populated(cg) and os.path.exists(f"{cg}/cgroup.kill"):
                self.log(f"processes left in {cg}: killing them")
                with open(f"{cg}/cgroup.kill", "w") as f:
                    f.write("1")
            deadline = time.monotonic() + 5
            while True:
                try:
                    _rmdir_tree(cg)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        self.log(f"cannot remove cgroup {cg}: {e}")
                        break
                    time.sleep(0.05)
        self._cgroups = []

    # -- running things inside ---------------------------------------------------------------

    def _require_running(self) -> None:
        if self.leader_pid is None or not self.running:
            raise ContainerError("the container is not running")

    def exec(
        self,
        cmd: Sequence[str] | str,
        *,
        input: str | bytes | None = None,
        check: bool = False,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` (argv, or a string for ``/bin/sh -c``) in all the container's namespaces."""
        self._require_running()
        if isinstance(cmd, str):
            cmd = ["/bin/sh", "-c", cmd]
        environment = dict(EXEC_ENVIRONMENT)
        if env:
            environment.update(env)
        # --root and --wd: the container's init's root and directory. Entering its mount
        # namespace alone puts us at that namespace's root, which is the container's only where
        # nspawn could make it so (not when the tests run in a chroot: then it is the host's).
        argv = [NSENTER, f"--target={self.leader_pid}", "--all", "--root", "--wd", "--", *cmd]
        if text and isinstance(input, bytes):
            input = input.decode()
        r = subprocess.run(
            argv, input=input, capture_output=True, text=text, timeout=timeout,
            env=environment, stdin=None if input is not None else subprocess.DEVNULL,
        )
        r.args = list(cmd)
        if check and r.returncode != 0:
            raise ContainerCommandError(r.returncode, list(cmd), r.stdout, r.stderr,
                                        self._journal_tail_safe())
        return r

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60.0):
        """``systemctl ARGS`` inside; a failure raises :class:`ContainerCommandError`
        unless ``check=False``."""
        return self.exec(["systemctl", "--no-pager", "--no-ask-password", *args],
                         check=check, timeout=timeout)

    def journal(self, *args: str, lines: int = 50) -> str:
        """The tail of the container's journal (``journalctl ARGS``), as text."""
        r = self.exec(["journalctl", "--no-pager", "--no-hostname", "-o", "short-monotonic",
                       "-n", str(lines), *args])
        return r.stdout + r.stderr

    def journal_cursor(self) -> str:
        """The cursor of the newest journal entry, for :meth:`journal_since`."""
        out = self.exec(["journalctl", "-n", "1", "-o", "export"], check=True).stdout
        for line in out.splitlines():
            if line.startswith("__CURSOR="):
                return line.partition("=")[2]
        raise ContainerError(f"no __CURSOR in journalctl output: {out[:200]!r}")

    def journal_since(self, cursor: str, *matches: str) -> list[dict]:
        """Journal entries after ``cursor`` that satisfy ``matches`` (``FIELD=VALUE``), as dicts.

        Not ``--after-cursor``: with matches, journalctl 252 skips the first matching entry
        after the cursor. ``--cursor`` includes the cursor's own entry, which is dropped here.
        """
        out = self.exec(["journalctl", "--no-pager", "-o", "json", f"--cursor={cursor}",
                         *matches], check=True).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [e for e in entries if e.get("__CURSOR") != cursor]

    def _journal_tail_safe(self, lines: int = 40) -> str:
        try:
            return self.journal(lines=lines)
        except Exception as e:
            return f"(journal unavailable: {e!r})"

    def write_file(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        """Write a file inside the container (atomically: temporary file, then rename).

        The container's /usr is usually the host's, read-only: write to /etc, /run, /srv, ...
        """
        if isinstance(data, str):
            data = data.encode()
        script = ('set -e; d=$(dirname "$1"); mkdir -p "$d"; t=$(mktemp "$1.XXXXXX"); '
                  'cat > "$t"; chmod "$2" "$t"; mv -f "$t" "$1"')
        self.exec(["/bin/sh", "-c", script, "sh", path, "%o" % mode], input=data,
                  text=False, check=True)

    def read_file(self, path: str) -> bytes:
        return self.exec(["cat", "--", path], text=False, check=True).stdout

    def remove_file(self, path: str) -> None:
        self.exec(["rm", "-f", "--", path], check=True)

    # -- network -----------------------------------------------------------------------------

    def in_netns(self, fn: Callable, *args, **kwargs):
        """Call ``fn`` in a helper thread that has joined the container's network namespace."""
        self._require_running()
        outcome: dict = {}

        def run():
            try:
                _setns(self._netns_fd, CLONE_NEWNET)
                outcome["value"] = fn(*args, **kwargs)
            except BaseException as e:  # re-raised in the caller's thread
                outcome["error"] = e

        t = threading.Thread(target=run, name=f"netns-{self.machine}", daemon=True)
        t.start()
        t.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def socket(self, family=socket.AF_INET, type=socket.SOCK_STREAM, proto=0) -> socket.socket:
        """A new socket in the container's network namespace."""
        return self.in_netns(socket.socket, family, type, proto)

    def connect(self, address: tuple, timeout: float | None = 10.0) -> socket.socket:
        """A TCP connection to ``(host, port)`` as seen from inside the container."""
        return self.in_netns(socket.create_connection, address, timeout)

    def talk(self, address: tuple, data: bytes = b"", *, timeout: float = 10.0,
             shut_wr: bool = False, limit: int = 1 << 20) -> bytes:
        """Connect, send ``data``, return everything received until the peer closes."""
        with self.connect(address, timeout=timeout) as s:
            if data:
                s.sendall(data)
            if shut_wr:
                s.shutdown(socket.SHUT_WR)
            chunks, size = [], 0
            while size < limit:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)

    # -- waiting and diagnostics -------------------------------------------------------------

    def wait_until(self, predicate: Callable[[], object], *, timeout: float = 10.0,
                   interval: float = 0.05, what: str = "condition"):
        """Poll ``predicate`` (bounded) for state that systemd offers no way to wait for."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not reached within {timeout} s")
            time.sleep(interval)

    def _console_tail(self, lines: int) -> str:
        text = self.console_text
        if self._tmp is not None:
            try:
                with open(f"{self._tmp}/console.log", "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            except FileNotFoundError:
                pass
        text = _ANSI.sub("", text).replace("\r", "")
        return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])

    def diagnostics(self, lines: int = 40) -> str:
        """The tail of the journal (while running) and of the console, for failure reports."""
        parts = []
        if self.running and self.leader_pid is not None:
            parts.append(f"--- journal of {self.machine} (tail) ---\n"
                         f"{self._journal_tail_safe(lines)}")
        parts.append(f"--- console of {self.machine} (tail) ---\n{self._console_tail(lines)}")
        return "\n".join(parts)
