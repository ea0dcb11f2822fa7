#!/usr/bin/env python3
"""gitproc: a Git-backed process supervisor in one file.

Service definitions are systemd-style unit files committed to a Git repository.
The daemon runs them, restarts them when they crash, stops them cleanly, keeps
their logs and remembers its state across restarts.

    python3 gitproc.py daemon            # start (creates ~/.gitproc on first run)
    python3 gitproc.py status            # what runs
    python3 gitproc.py check unit.service

Sections (grep for "# ==== N."), in the order data flows: a unit file is
parsed, comes from git, runs in a process, is supervised, deployed, activated,
and asked about over the control socket and HTTP:
     0. header
     1. constants and defaults
     2. errors
     3. small utilities: time spans, sizes, wait statuses, atomic writes, /proc
     4. unit files: UnitSpec, the directive table, the parser, templates,
        calendar times, timer and socket units
     5. configuration and paths
     6. state store: batched, atomic saves
     7. git source: git commands, RefWatcher, trusted deploys (CommitVerifier),
        SourceWatcher
     8. execution environment: RunAs, ProcessSetup, the sandbox, system call
        filters (seccomp), cgroups, Spawner, ExitWatcher, the notify socket
     9. supervision: the restart policy, the state table, ServiceHost, Service
        and its parts (ServiceRun, StopSequence, UnitTimers, MainProcess,
        ControlProcess), Launcher, Dependencies
    10. health checks: HealthProbe
    11. logs: the daemon's log, service log rotation, the syslog and journal
        sockets (SyslogChannel)
    12. deploying: Snapshots, the pure deploy plan, History, Recovery, Deployer
    13. timers and sockets: TimerSchedule, SocketSet
    14. control protocol: framing, ControlServer, the client
    15. HTTP: HttpListener, HttpRoutes, metrics, webhooks, the status page
    16. alerts: Alerter
    17. daemon: RequestHandlers, DaemonHost, Daemon
    18. command line
    19. main

Imports: the module-level ones are what every command needs. The others are
imported inside the functions that use them (hashlib, html, ctypes, shlex,
urllib, ...), so that `status` and the other short commands, which start a
Python each time, pay only for what they use.
"""

__version__ = "0.1.0"

import errno
import heapq
import json
import math
import os
import re
import signal
import socket
import stat
import struct
import sys
import time

# ==== 1. constants and defaults ==============================================
# Everything a user could look up: names, limits, defaults. Nothing here does
# any work; the numbers are the contract of SPEC.md.

UNIT_SUFFIX = ".service"
UNIT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")
RESERVED_UNIT_NAMES = {"daemon": "the name 'daemon' is reserved for the daemon's own log"}
MAX_UNIT_FILE_BYTES = 1 << 20
DEFAULT_SNAPSHOT_MAX_BYTES = 100 * 2 ** 20   # of a unit's folder, materialised at each deploy (SPEC §13)
SNAPSHOT_COLLECT_DELAY = 1.0        # unused snapshots are removed this long after a deploy

DEFAULT_BRANCH = "main"
DEFAULT_RESTART_SEC = 0.1
UPHOLD_START_LIMIT = (10.0, 16)        # Upholds= starts a unit at most 16 times in 10 s (systemd's ratelimit)
EXIT_WAIT_POLL = 0.2                    # ExitType=cgroup: how often an emptying cgroup is looked at
MAX_RESTART_DELAY = 30.0
BACKOFF_RESET_UPTIME = 10.0
DEFAULT_TIMEOUT_STOP_SEC = 10.0
DEFAULT_TIMEOUT_START_SEC = 90.0     # systemd's DefaultTimeoutStartSec=
DEFAULT_START_LIMIT_INTERVAL = 10.0
DEFAULT_START_LIMIT_BURST = 5

STATE_SAVE_CHECK_INTERVAL = 5.0     # the batched saver looks this often ...
STATE_MIN_SAVE_INTERVAL = 2.0       # ... and writes at most this often
STATE_VERSION = 1
EVENTS_SAVE_INTERVAL = 10.0         # events.json is written at most this often (and at shutdown)
HISTORY_LIMIT = 100
LOG_CHECK_INTERVAL = 5.0            # how often service log sizes are checked
POLL_FALLBACK_INTERVAL = 0.2        # exit polling where pidfds and SIGCHLD fail
RUN_AS_CACHE_SECONDS = 5.0
CGROUP_LINGER = 10.0                # a stopped service's cgroups are removed after this
PID_FILE_POLL_INTERVAL = 0.02       # how often a forking unit's PIDFile= is looked for
MAX_STATUS_TEXT = 512               # of an sd_notify STATUS=, kept for status

MAX_REQUEST_BYTES = 64 * 1024
MAX_PENDING_REPLY = 256 * 1024      # replies a client has not read before it is read from again
MAX_CONNECTIONS = 512               # clients served at once (each holds one descriptor)
MAX_SOCKET_PATH = 107               # sun_path is 108 bytes with the terminating NUL
REQUEST_IDLE_TIMEOUT = 10.0
CLIENT_TIMEOUT = 30.0
DEFAULT_WAIT_TIMEOUT = 30.0
MAX_WAIT_TIMEOUT = 86400
EVENT_LIMIT = 1000                  # events the daemon keeps in memory (`events`)
DEFAULT_LOG_RATE_INTERVAL, DEFAULT_LOG_RATE_BURST = 30.0, 10000   # per unit, as journald's defaults
PRIORITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
              "ftp", "ntp", "security", "console", "solaris-cron", "local0", "local1", "local2", "local3",
              "local4", "local5", "local6", "local7")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
# selectors' event bits, without importing selectors on a command's path
EVENT_READ, EVENT_WRITE = 1, 2

HELLO_UNIT = """\
# An example service: prints a line every few seconds.
# See its output with:  python3 gitproc.py logs hello
[Unit]
Description=Example service that says hello every 5 seconds

[Service]
ExecStart=/bin/sh -c 'while :; do echo "hello from gitproc at $$(date)"; sleep 5; done'
Restart=always
"""

# ==== 2. errors ==============================================================
# One root. Every error a user can cause is a GitprocError whose str() is a
# one-line message fit for stderr; the CLI prints it and exits 1.


class GitprocError(Exception):
    """Root of gitproc's errors: a message fit for one line of stderr."""
    code = "error"


class ConfigError(GitprocError):
    code = "config"


class UsageError(GitprocError):
    code = "usage"


class GitError(GitprocError):
    code = "git"


class SpawnError(GitprocError):
    code = "spawn"


class SnapshotError(GitprocError):
    code = "snapshot"                 # a unit's folder cannot be materialised: that unit is not deployed


class DaemonNotRunning(GitprocError):
    code = "no-daemon"


class ProtocolError(GitprocError):
    code = "protocol"


# ==== 3. small utilities =====================================================
# Pure helpers and thin wrappers over /proc and the file system. No state.

_TIMESPAN_UNITS = {
    "": 1.0, "us": 1e-6, "usec": 1e-6, "\u00b5s": 1e-6,
    "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
    "M": 2629800.0, "month": 2629800.0, "months": 2629800.0,
    "y": 31557600.0, "year": 31557600.0, "years": 31557600.0,
}
_TIMESPAN_PART_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z\u00b5]*)")
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGTPE]?)(?:i?B)?\Z", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
                 "P": 1 << 50, "E": 1 << 60}


def parse_timespan(text):
    """'1min 30s' -> 90.0 seconds, as systemd reads time spans; 'infinity' -> inf."""
    text = text.strip()
    if text == "infinity":
        return float("inf")
    if not text:
        raise ValueError("empty time span")
    total, pos = 0.0, 0
    while pos < len(text):
        match = _TIMESPAN_PART_RE.match(text, pos)
        if not match or match.group(2) not in _TIMESPAN_UNITS:
            raise ValueError("invalid time span %r (try 5, 5s, 500ms or 1min 30s)" % text)
        total += float(match.group(1)) * _TIMESPAN_UNITS[match.group(2)]
        pos = match.end()
    if not math.isfinite(total) or total > 1e10:
        raise ValueError("time span %r is too long (use infinity)" % text)
    return total


def parse_size(text, allow_percent=False):
    """'512M' -> bytes (1024-based, as systemd); 'infinity' -> None; 'N%' of RAM if allowed."""
    text = text.strip()
    if text == "infinity":
        return None
    if allow_percent and text.endswith("%"):
        percent = float(_parse_percent(text))
        return int(_physical_memory() * percent / 100)
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError("invalid size %r (try 512M, 1G or infinity)" % text)
    size = float(match.group(1)) * _SIZE_FACTORS[match.group(2).upper()]
    if not math.isfinite(size) or size >= 2 ** 63:
        raise ValueError("size %r is too large" % text)
    return int(size)


def _parse_percent(text):
    try:
        value = float(text.strip()[:-1]) if text.strip().endswith("%") else None
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0 or value > 1e6:
        raise ValueError("invalid percentage %r (try 50%%)" % text)
    return value


def _physical_memory():
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _log_stamp(wall):
    """The time of a unit's syslog line: 2026-12-07 00:31:38.094 (local)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall)) + ".%03d" % (int(wall * 1000) % 1000)


def parse_priority(text):
    """'err', 'warning' or '3' -> 3 (LOG_ERR); ValueError otherwise."""
    text = text.strip().lower()
    if text.isdigit() and int(text) < 8:
        return int(text)
    if text in PRIORITIES:
        return PRIORITIES.index(text)
    aliases = {"error": 3, "warn": 4, "panic": 0, "info": 6}
    if text in aliases:
        return aliases[text]
    raise ValueError("unknown priority %r (use %s or 0-7)" % (text, ", ".join(PRIORITIES)))


def parse_bool(text):
    value = text.strip().lower()
    if value in ("1", "yes", "true", "on", "y", "t"):
        return True
    if value in ("0", "no", "false", "off", "n", "f"):
        return False
    raise ValueError("invalid boolean %r (use yes or no)" % text)


def parse_signal(text):
    """'SIGTERM', 'TERM' or '15' -> 15."""
    value = text.strip()
    if value.isdigit():
        number = int(value)
        if 1 <= number < signal.NSIG:
            return number
        raise ValueError("invalid signal number %s" % value)
    name = value.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    number = getattr(signal.Signals, name, None) if name in signal.Signals.__members__ else None
    if number is None:
        raise ValueError("unknown signal %r" % text)
    return int(number)


def signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return "SIG%d" % number


def describe_exit(last_exit):
    """{'code': 1} -> 'exit code 1'; {'signal': 9} -> 'signal SIGKILL'."""
    if not last_exit:
        return "-"
    if "signal" in last_exit:
        return "signal " + signal_name(last_exit["signal"])
    name = EXIT_CODE_NAMES.get(last_exit["code"])      # systemd's names of 200-243
    return "exit code %d%s" % (last_exit["code"], " (%s)" % name if name else "")


def decode_wait_status(status):
    """A waitpid() status -> {'code': N} or {'signal': N}."""
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    if os.WIFEXITED(status):
        return {"code": os.WEXITSTATUS(status)}
    return {"code": 255}


def format_duration(seconds):
    """90061 -> '1d 1h'; 75 -> '1m 15s'; shows the two largest units."""
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append("%d%s" % (seconds // size, unit))
            seconds %= size
    return " ".join(parts[:2])


def format_bytes(count):
    if count is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if count < 1024 or unit == "G":
            return ("%d%s" if unit == "B" else "%.1f%s") % (count, unit)
        count /= 1024.0
    return "-"


def sentence(text):
    """`text` with its first letter made upper case (str.capitalize() would
    lower the rest, the key names in it too)."""
    return text[:1].upper() + text[1:]


def format_timespan(seconds):
    if seconds == float("inf"):
        return "infinity"
    if seconds < 1 and seconds:
        return "%gms" % round(seconds * 1000, 3)
    return "%gs" % seconds


def format_time(wall):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall)) if wall else "-"


def unregister_quietly(selector, fileobj):
    """Take `fileobj` out of the loop's selector, if it is there (a close
    after a failed registration, or a second close)."""
    try:
        selector.unregister(fileobj)
    except (KeyError, ValueError):
        pass


def read_until_eof(fd):
    """All that a pipe gives until its writers close it."""
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def new_digest(name):
    """A sha1 or sha256 hash object from CPython's own modules: hashlib would
    load OpenSSL, some 3.5 MB of the daemon's memory for good."""
    for module in {"sha1": ("_sha1",), "sha256": ("_sha256", "_sha2")}[name]:   # _sha2 from Python 3.12
        try:
            return getattr(__import__(module), name)()
        except (ImportError, AttributeError):
            continue
    import hashlib
    return hashlib.new(name)


def shorten(text, width):
    """`text`, cut to `width` characters with "..." when it is longer."""
    return text if len(text) <= width else text[:width - 3] + "..."


def some_paths(paths, shown=5):
    """Paths for one line: the first few, and how many more."""
    return ", ".join(paths[:shown]) + (" and %d more" % (len(paths) - shown) if len(paths) > shown else "")


def describe_os_error(exc):
    """'Permission denied: /etc/gitproc' rather than a traceback."""
    if exc.filename:
        return "%s: %s" % (exc.strerror or exc, exc.filename)
    return str(exc.strerror or exc)


def atomic_write(path, data, durable=True):
    """Write bytes so that readers see the old or the new file, never half of one:
    a temporary file beside it, fsync, rename over, fsync of the folder
    (without `durable`, no fsync: a crash may lose the write, never half it)."""
    folder = os.path.dirname(path) or "."
    tmp_path = "%s.tmp.%d" % (path, os.getpid())
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp_path)
        raise
    os.close(fd)
    try:
        os.rename(tmp_path, path)
    except BaseException:
        _unlink_quietly(tmp_path)
        raise
    if not durable:
        return
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_tree(path):
    """Remove a folder and what it holds, quietly (it may be gone already)."""
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def makedirs(path, mode=0o755):
    os.makedirs(path, mode=mode, exist_ok=True)


def read_proc_stat(pid):
    """Fields of /proc/PID/stat after the command name (field 3 is index 0), or None."""
    try:
        fd = os.open("/proc/%d/stat" % pid, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)           # one line, well under a page; no buffered file object
    except OSError:
        return None
    finally:
        os.close(fd)
    return raw[raw.rfind(b")") + 2:].split() or None


def read_pid_file(path):
    """The live process a PID file names, or None: missing, empty (nginx makes
    it so first), or naming a process gone. ValueError for other content."""
    try:
        text = _read_text(path).strip()
    except FileNotFoundError:
        return None
    if not text:
        return None
    if not text.isdigit() or int(text) <= 1:
        raise ValueError("does not hold a process id: %r" % text[:40])
    fields = read_proc_stat(int(text))
    return int(text) if fields is not None and fields[0] != b"Z" else None


def pid_start_time(pid):
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since
    boot. A pid and this number together name one process, even after pid reuse."""
    fields = read_proc_stat(pid)
    return int(fields[19]) if fields else None


def boot_time():
    """When the system booted (wall clock), from /proc/stat's btime."""
    with open("/proc/stat") as stat_file:
        for line in stat_file:
            if line.startswith("btime "):
                return int(line.split()[1])
    return 0


def process_rss(pid):
    try:
        with open("/proc/%d/statm" % pid, "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def process_cpu_seconds(pid):
    return process_usage(pid)[1]


def process_usage(pid):
    """(resident bytes, CPU seconds) of a process from one read of
    /proc/PID/stat; (None, None) once it is gone."""
    fields = read_proc_stat(pid)
    if not fields:
        return None, None
    return (int(fields[21]) * os.sysconf("SC_PAGE_SIZE"),
            (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))


def tail_lines(path, count, end=None):
    """The last `count` lines of a file (before offset `end`, by default its
    end), read from there backwards (cheap on big logs)."""
    if count <= 0:
        return []
    try:
        with open(path, "rb") as log_file:
            size = log_file.seek(0, os.SEEK_END)
            end = position = size if end is None else min(end, size)
            chunk = b""
            while position > 0 and chunk.count(b"\n") <= count:
                step = min(65536, position)
                position -= step
                log_file.seek(position)
                chunk = log_file.read(end - position)
    except OSError:
        return []
    lines = chunk.decode("utf-8", "replace").splitlines()
    return lines[-count:]


def find_program(program, path_env):
    """A relative program looked up on PATH, as execvp would; None if not found."""
    if "/" in program:
        return program
    for folder in (path_env or os.defpath).split(":"):
        candidate = os.path.join(folder or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def receive_datagrams(sock, max_size, per_turn, keep_fds=0):
    """(data, sender pid, uid, fds, truncated) for each datagram waiting on a
    non-blocking socket with SO_PASSCRED, at most `per_turn` (a flood waits
    for the next loop turn). Descriptors sent along are closed, but for the
    first `keep_fds` of each, which the caller must close."""
    ancillary = socket.CMSG_SPACE(struct.calcsize("3i")) + socket.CMSG_SPACE(64 * 4)
    for _ in range(per_turn):
        try:
            data, cmsgs, flags, _ = sock.recvmsg(max_size, ancillary)
        except (BlockingIOError, InterruptedError):
            return
        pid = uid = None
        fds = []
        for level, kind, payload in cmsgs:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= 12:
                pid, uid, _ = struct.unpack("3i", payload[:12])
            elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack_from("i", payload, index * 4)[0] for index in range(len(payload) // 4))
        for fd in fds[keep_fds:]:
            os.close(fd)
        yield data, pid, uid, fds[:keep_fds], bool(flags & socket.MSG_TRUNC)


def default_working_directory(home=None):
    """Where a service without WorkingDirectory= works, as systemd's managers
    do: "/" under a root daemon (system services, whatever their User=), the
    user's home (`home`, else the daemon user's) under a user's daemon."""
    if os.geteuid() == 0:
        return "/"
    home = home or os.path.expanduser("~")
    return home if os.path.isdir(home) else "/"


# ==== 4. unit files ==========================================================
# A pure parser: bytes in, a UnitSpec and a list of Diagnostics out. It never
# raises on user input and never touches the file system or the environment;
# `$VAR` references stay in the commands and are expanded at spawn time.


class Diagnostic:
    """One problem in user input, reported as data: 'file:line: severity: message'."""
    __slots__ = ("path", "line", "severity", "message", "unit", "code")

    def __init__(self, path, line, severity, message, unit=None, code=None):
        self.path, self.line, self.severity, self.message = path, line, severity, message
        self.unit = unit                  # the unit it concerns, where the file is not its own (drop-ins, templates)
        self.code = code                  # "key": an unknown or misplaced key (shown wherever the unit is)

    @property
    def unit_name(self):
        """The unit it concerns: its own, or that of the file it is in."""
        name = os.path.basename(self.path)
        return self.unit or (name[:-len(UNIT_SUFFIX)] if name.endswith(UNIT_SUFFIX) else name)

    def __str__(self):
        return "%s:%d: %s: %s" % (self.path, self.line, self.severity, self.message)

    def to_json(self):
        return {"path": self.path, "line": self.line, "severity": self.severity,
                "message": self.message, "unit": self.unit_name, "code": self.code}


class ExecCommand:
    """One Exec*= line: the program, argv (with $VAR still unexpanded) and its
    prefixes (systemd.service(5)): '-' a failure is ignored, '+' runs with
    full privileges (no User=, no sandbox), '!' runs without the user change
    only, ':' no variable expansion ('@' only moves argv[0], seen in argv)."""
    __slots__ = ("argv", "ignore_failure", "program", "privileged", "expand")

    def __init__(self, program, argv, ignore_failure, privileged=None, expand=True):
        self.program, self.argv, self.ignore_failure = program, tuple(argv), ignore_failure
        self.privileged = privileged      # None, "+" or "!"
        self.expand = expand

    def key(self):
        """What the command means, for comparing two versions of a unit."""
        return (self.program, self.argv, self.ignore_failure, self.privileged, self.expand)

    def __str__(self):
        return (("-" if self.ignore_failure else "") + (self.privileged or "") + ("" if self.expand else ":")
                + " ".join(self.argv))


class UnitSpec:
    """What one unit file says, parsed and validated. Read-only by convention:
    a new commit makes a new UnitSpec; `blob` (the Git object id of the file)
    tells whether two versions are the same."""

    FIELDS = {
        "description": "", "after": (), "requires": (), "before": (), "wants": (), "condition_host": (),
        "part_of": (), "conflicts": (), "on_failure": (), "binds_to": (),
        "on_success": (), "requisite": (), "upholds": (), "stop_when_unneeded": False,
        "requires_mounts_for": (),      # paths whose /etc/fstab mounts must be mounted
        "joins_namespace_of": (),       # units whose /tmp, network and IPC namespaces it shares
        "propagates_reload_to": (), "reload_propagated_from": (),
        "conditions": (),               # (key, negated, value, triggering) of Condition*=/Assert*= at each start
        "start_limit_interval": DEFAULT_START_LIMIT_INTERVAL,
        "start_limit_burst": DEFAULT_START_LIMIT_BURST,
        "type": "simple", "exec_start": (), "exec_start_pre": (), "exec_start_post": (),
        "exec_condition": (), "exec_reload": (), "exec_stop": (), "exec_stop_post": (),
        "pid_file": None, "notify_access": None, "watchdog_sec": 0.0, "reload_signal": int(signal.SIGHUP),
        "remain_after_exit": False, "timeout_start_sec": None,
        "success_exit_status": (), "restart_prevent_exit_status": (), "restart_force_exit_status": (),
        "working_directory": None, "user": None, "group": None,
        "environment": (), "environment_files": (),
        "restart": "no", "restart_sec": DEFAULT_RESTART_SEC,
        "timeout_stop_sec": DEFAULT_TIMEOUT_STOP_SEC,
        "kill_signal": int(signal.SIGTERM), "kill_mode": "control-group",
        "restart_kill_signal": None,    # RestartKillSignal=: KillSignal= of a stop that restarts
        "send_sighup": False,           # SendSIGHUP=: SIGHUP right after KillSignal=
        "send_sigkill": True,           # SendSIGKILL=no: what outlives TimeoutStopSec= is left running
        "final_kill_signal": int(signal.SIGKILL), "watchdog_signal": int(signal.SIGABRT),
        "timeout_abort_sec": None,      # TimeoutAbortSec=: after WatchdogSignal= (TimeoutStopSec= if unset)
        "runtime_max_sec": None,        # RuntimeMaxSec=: active for longer, it is stopped as failed (timeout)
        "restart_steps": 0, "restart_max_delay": None,     # RestartSteps=, RestartMaxDelaySec=: systemd's curve
        "exit_type": "main",            # ExitType=cgroup: the run ends when the last process of its cgroup does
        "oom_policy": "stop",           # OOMPolicy=: what an OOM kill of one of its processes does (systemd's default)
        "memory_max": None, "cpu_quota": None, "memory_high": None, "memory_swap_max": None, "tasks_max": None,
        "cpu_weight": None, "io_weight": None, "allowed_cpus": None,
        "memory_low": None, "memory_min": None, "cpu_quota_period": None,
        "startup_cpu_weight": None, "startup_io_weight": None,   # while the daemon starts up
        "io_limits": (),                # (IOReadBandwidthMax or its kin, path, value)
        "health_check_url": None, "health_check_interval": 30.0,
        "health_check_timeout": 5.0, "health_check_retries": 3,
        "health_check_start_period": 0.0,
        "private_pids": False, "auto_rollback": False, "reload_on_file_change": False,
        "rlimits": (), "umask": None, "nice": None, "oom_score_adjust": None,
        "cpu_scheduling_policy": None, "cpu_scheduling_priority": None, "cpu_scheduling_reset_on_fork": False,
        "cpu_affinity": (), "io_scheduling_class": None, "io_scheduling_priority": None,
        "ignore_sigpipe": True,         # systemd's default: SIGPIPE ignored in the service
        "permissions_start_only": False,    # control commands run as '+' (no User=, no sandbox)
        "root_directory_start_only": False,  # RootDirectory= for ExecStart= only (RootDirectory= is not applied)
        "syslog_identifier": None,      # what `logs` puts before each line of the unit's log
        "syslog_level": 6,              # the priority of its stdout lines (SyslogLevel=; info)
        "syslog_facility": "daemon",    # SyslogFacility=: kept (a unit's log file has no facility)
        "log_level_max": None,          # LogLevelMax=: syslog messages less urgent are not written
        "log_rate_interval": DEFAULT_LOG_RATE_INTERVAL, "log_rate_burst": DEFAULT_LOG_RATE_BURST,
        # the sandbox (systemd.exec(5) "Security", "Sandboxing"):
        "no_new_privileges": False, "private_tmp": False, "private_devices": False, "private_network": False,
        "private_ipc": False, "private_mounts": False, "protect_system": "no", "protect_home": "no",
        "protect_kernel_tunables": False, "protect_kernel_modules": False, "protect_kernel_logs": False,
        "protect_control_groups": False, "protect_hostname": False, "protect_clock": False,
        "restrict_suid_sgid": False, "lock_personality": False,
        "system_call_filter": (),       # (invert, ((name or @group, errno action), ...)) assignments, in order
        "system_call_error_number": None, "system_call_architectures": (), "system_call_log": (),
        "restrict_address_families": (),    # (invert or None for "none", family numbers) assignments
        "restrict_namespaces": (),      # ("set", "or" or "and", namespace flags) assignments
        "restrict_realtime": False, "memory_deny_write_execute": False,
        "protect_proc": "default", "proc_subset": "all",     # a /proc of its own, with hidepid=, subset=pid
        "remove_ipc": False,            # RemoveIPC=: the user's IPC objects go when its last process does
        "private_users": False,         # PrivateUsers=: a user namespace mapping root and its user only
        "dynamic_user": False,          # DynamicUser=: a uid of its own while it runs (and what systemd implies)
        "credentials": (),              # (LoadCredential or SetCredential, id, path or bytes), in order
        "secure_bits": (),              # SecureBits= masks, ORed
        "personality": None, "timer_slack_nsec": None, "coredump_filter": (),    # coredump_filter masks, ORed
        "numa_policy": None, "numa_mask": (),
        "device_allow": (),             # (/dev/PATH, char-NAME or block-NAME, access) of DeviceAllow=
        "device_policy": "auto",
        "paths": (),                    # (mode, path, optional) of ReadWritePaths= and its kin, in order
        "temporary_file_systems": (),   # (path, options)
        "bind_paths": (),               # (source, destination, read only, optional, recursive)
        "capability_bounding_set": (),  # (invert, capability numbers) assignments, in order
        "ambient_capabilities": (),
        "sockets": (),                  # Sockets=: socket units whose listening sockets it gets too
        "standard_input": ("null", None), "standard_input_data": (),   # StandardInputText=/Data= bytes
        "pass_environment": (), "unset_environment": (),
        "standard_output": ("log", None), "standard_error": ("inherit", None),
        "supplementary_groups": (),
        "directories": (),              # (kind, relative path) of RuntimeDirectory= and the like
        "directory_modes": (),          # (kind, mode) of RuntimeDirectoryMode= and the like
        "runtime_directory_preserve": "no",
        "not_applied": (),              # (Key, value) of systemd keys gitproc does not apply
    }
    __slots__ = ("name", "path", "blob", "sources", "owned", "_meaning") + tuple(FIELDS)

    def __init__(self, name, path, blob="", **values):
        self.name, self.path, self.blob = name, path, blob
        self.sources = (path,)            # the files it was read from: its own (or template's), drop-ins
        self.owned = None                 # OwnedFolder of the commit it was read from (None at the root)
        self._meaning = None              # meaning(), once asked (each state save asks)
        for field, default in self.FIELDS.items():
            setattr(self, field, values.pop(field, default))
        if values:
            raise TypeError("unknown UnitSpec fields: %s" % ", ".join(values))

    def fingerprint(self):
        """{field: comparable value}: what the unit means, whatever its comments,
        layout or place in the tree."""
        values = {}
        for field in self.FIELDS:
            value = getattr(self, field)
            if field in EXEC_FIELDS:
                value = tuple(c.key() for c in value)
            values[field] = value
        return values

    def with_owned(self, owned):
        """This spec, or a copy of it, whose owned folder is `owned`: a parsed
        unit is shared by the commits that hold the same file, its folder
        is not."""
        if owned == self.owned:
            return self
        copy = UnitSpec.__new__(UnitSpec)
        for slot in UnitSpec.__slots__:
            setattr(copy, slot, getattr(self, slot))
        copy.owned = owned
        return copy

    @property
    def tree(self):
        """The tree id of its owned folder (its snapshot's key), or None."""
        return self.owned.tree if self.owned else None

    def meaning(self):
        """A digest of what it means (see fingerprint), for state.json."""
        if self._meaning is None:
            digest = new_digest("sha1")
            digest.update(repr(sorted(self.fingerprint().items())).encode())
            self._meaning = digest.hexdigest()
        return self._meaning

    def identity(self):
        """What tells two versions apart, what it means and its folder, as a
        digest that state.json can keep."""
        digest = new_digest("sha1")
        digest.update(repr((self.meaning(), self.tree)).encode())
        return digest.hexdigest()

    def start_timeout(self):
        """TimeoutStartSec=: seconds, or None for no limit (0 and infinity;
        by default a oneshot has none, as in systemd)."""
        timeout = self.timeout_start_sec
        if timeout is None:
            timeout = float("inf") if self.type == "oneshot" else DEFAULT_TIMEOUT_START_SEC
        return None if timeout in (0, float("inf")) else timeout

    def notify_accepted_from(self):
        """NotifyAccess=, with systemd's default: main for notify units, else none."""
        return self.notify_access or ("main" if self.type in NOTIFY_TYPES else "none")


EXEC_FIELDS = ("exec_condition", "exec_start_pre", "exec_start", "exec_start_post", "exec_reload",
               "exec_stop", "exec_stop_post")
RESTART_POLICIES = ("no", "always", "on-success", "on-failure", "on-abnormal", "on-abort", "on-watchdog")
SERVICE_TYPES = ("simple", "exec", "oneshot", "notify", "notify-reload", "forking")
NOTIFY_TYPES = ("notify", "notify-reload")
TYPES_RUN_AS_SIMPLE = ("idle", "dbus")
NOTIFY_ACCESS = ("none", "main", "exec", "all")
KILL_MODES = ("control-group", "mixed", "process")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
            "v": "\v", "\\": "\\", '"': '"', "'": "'", "s": " "}


def split_words(text):
    """Split a value into words as systemd does: whitespace separates, single and
    double quotes group, C escapes (\\n, \\x41, ...) are decoded. Raises ValueError
    on an unterminated quote."""
    words, pos, end = [], 0, len(text)
    while True:
        while pos < end and text[pos].isspace():
            pos += 1
        if pos >= end:
            return words
        word = []
        while pos < end and not text[pos].isspace():
            char = text[pos]
            if char in "\"'":
                closing = text.find(char, pos + 1)
                while closing != -1 and char == '"' and _escaped(text, closing):
                    closing = text.find(char, closing + 1)
                if closing == -1:
                    raise ValueError("unterminated %s quote" % ("double" if char == '"' else "single"))
                word.append(_unescape(text[pos + 1:closing]))
                pos = closing + 1
            elif char == "\\" and pos + 1 < end:
                decoded, pos = _unescape_one(text, pos)
                word.append(decoded)
            else:
                word.append(char)
                pos += 1
        words.append("".join(word))


def _escaped(text, index):
    backslashes = 0
    while index > 0 and text[index - 1] == "\\":
        backslashes += 1
        index -= 1
    return backslashes % 2 == 1


def _unescape(text):
    out, pos = [], 0
    while pos < len(text):
        if text[pos] == "\\" and pos + 1 < len(text):
            decoded, pos = _unescape_one(text, pos)
            out.append(decoded)
        else:
            out.append(text[pos])
            pos += 1
    return "".join(out)


def _unescape_one(text, pos):
    """Decode the escape starting at text[pos] == '\\'; returns (text, next pos).
    An unknown escape keeps the character without the backslash."""
    char = text[pos + 1]
    if char in _ESCAPES:
        return _ESCAPES[char], pos + 2
    for prefix, digits, base in (("x", 2, 16), ("u", 4, 16), ("U", 8, 16)):
        if char == prefix:
            code = text[pos + 2:pos + 2 + digits]
            try:
                if len(code) == digits:
                    return chr(int(code, base)), pos + 2 + digits
            except ValueError:
                pass
            return char, pos + 2
    if char in "01234567" and re.match(r"[0-7]{3}", text[pos + 1:pos + 4]):
        return chr(int(text[pos + 1:pos + 4], 8)), pos + 4
    return char, pos + 2


def expand_specifiers(value, unit_name, context):
    """systemd's %-specifiers (systemd.unit(5)); `context` brings those of
    the machine and the daemon's user (specifier_context()). Returns (text,
    unknown) where unknown lists specifiers left as they were."""
    if "%" not in value:
        return value, []
    prefix, at, instance = unit_name.partition("@")
    dash_prefix = prefix.rsplit("-", 1)[-1]     # %j: after the last '-' of the prefix
    table = {"n": unit_name + UNIT_SUFFIX, "N": unit_name, "p": prefix, "P": unescape_unit_name(prefix),
             "i": instance, "I": unescape_unit_name(instance), "j": dash_prefix, "J": unescape_unit_name(dash_prefix),
             "f": "/" + unescape_unit_name(instance if at else prefix).lstrip("/"), "%": "%"}
    table.update(context)
    unknown = []

    def replace(match):
        letter = match.group(1)
        if letter in table:
            return table[letter]
        unknown.append("%" + letter)
        return match.group(0)
    return re.sub(r"%(.)", replace, value), unknown


def expand_command(argv, environment):
    """Expand $VAR (a whole word: split on whitespace into words) and ${VAR}
    (substituted inside a word) as systemd does; $$ is a literal $."""
    result = []
    for word in argv:
        if word.startswith("$") and _ENV_NAME_RE.match(word[1:]):
            result.extend(environment.get(word[1:], "").split())
            continue
        result.append(re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                             lambda m: "$" if m.group(0) == "$$" else environment.get(m.group(1), ""),
                             word))
    return result


def _parse_exec(value):
    words = split_words(value)
    if not words:
        raise ValueError("empty command")
    program, ignore_failure, privileged, expand = words[0], False, None, True
    argv0_separate = False
    while program and program[0] in "-@:+!":
        if program[0] == "-":
            ignore_failure = True
        elif program[0] == "@":
            argv0_separate = True
        elif program[0] == ":":
            expand = False
        elif program[0] == "+":
            privileged = "+"
        elif privileged is None:          # '!' (and '!!'): only the user change is skipped
            privileged = "!"
        program = program[1:]
    if not program:
        raise ValueError("no program in %r" % value)
    argv = words[1:] if argv0_separate else [program] + words[1:]
    if not argv:
        raise ValueError("'@' needs the program and argv[0]")
    return ExecCommand(program, argv, ignore_failure, privileged, expand)


# The exit status names systemd accepts in SuccessExitStatus= (sysexits.h, as systemd 252 names them).
EXIT_STATUS_NAMES = dict(zip(("USAGE DATAERR NOINPUT NOUSER NOHOST UNAVAILABLE SOFTWARE OSERR OSFILE CANTCREAT "
                              "IOERR TEMPFAIL PROTOCOL NOPERM CONFIG").split(), range(64, 79)))


def _parse_exit_statuses(value):
    """SuccessExitStatus= and the like: exit codes (0-255) and signal names,
    as ("code", N) / ("signal", N)."""
    statuses = []
    for word in value.split():
        if word.isdigit():
            if int(word) > 255:
                raise ValueError("exit code %s is above 255" % word)
            statuses.append(("code", int(word)))
        elif word.upper() in EXIT_STATUS_NAMES:
            statuses.append(("code", EXIT_STATUS_NAMES[word.upper()]))
        else:
            statuses.append(("signal", parse_signal(word)))
    return tuple(statuses)


def _parse_pid_file(value):
    if not value.startswith("/"):
        raise ValueError("PIDFile= needs an absolute path, not %r" % value)
    return os.path.normpath(value)


def _parse_environment(value):
    pairs = []
    for word in split_words(value):
        name, equals, content = word.partition("=")
        if not equals or not _ENV_NAME_RE.match(name):
            raise ValueError("invalid environment assignment %r (use NAME=value)" % word)
        pairs.append((name, content))
    return tuple(pairs)


_CREDENTIAL_ID_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,255}$")


def _parse_credential(value, key):
    """LoadCredential=ID[:PATH] or SetCredential=ID:VALUE: ((key, id, path or bytes),)."""
    name, colon, rest = value.partition(":")
    if not _CREDENTIAL_ID_RE.match(name) or name in (".", ".."):
        raise ValueError("%r is not a credential name" % name)
    if key == "SetCredential":
        if not colon:
            raise ValueError("SetCredential= needs ID:VALUE")
        return ((key, name, _unescape(rest).encode()),)
    return ((key, name, rest or name),)


def _parse_env_file_ref(value):
    optional = value.startswith("-")
    path = value[1:] if optional else value
    if not path.startswith("/"):
        raise ValueError("EnvironmentFile= needs an absolute path, not %r" % path)
    return ((path, optional),)


def _parse_working_directory(value):
    path = value[1:] if value.startswith("-") else value
    if not (path.startswith("/") or path == "~" or path.startswith("~/")):
        raise ValueError("WorkingDirectory= needs an absolute path or ~, not %r" % value)
    return value


def _parse_choice(choices):
    def parse(value):
        if value not in choices:
            raise ValueError("%r is not one of %s" % (value, ", ".join(choices)))
        return value
    return parse


def _parse_type(value):
    if value in SERVICE_TYPES:
        return value
    if value in TYPES_RUN_AS_SIMPLE:
        return "simple"
    raise ValueError("Type=%s is not supported (use %s)" % (value, ", ".join(SERVICE_TYPES)))


def _parse_count(value):
    if not value.strip().isdigit():
        raise ValueError("%r is not a whole number" % value)
    return int(value)


def _parse_user(value):
    if not re.match(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?\Z", value):
        raise ValueError("invalid user or group name %r" % value)
    return value


def _parse_health_url(value):
    if not re.match(r"(http://[^/\s:]+(:\d+)?(/\S*)?|tcp://[^/\s:]+:\d+)\Z", value):
        raise ValueError("HealthCheckURL= takes http://host[:port]/path or tcp://host:port, not %r" % value)
    return value


# Other kinds of systemd units a dependency list may name: gitproc has only
# services, so these are accepted and left out (check says so).
OTHER_UNIT_SUFFIXES = (".target", ".socket", ".mount", ".automount", ".path", ".timer", ".device",
                       ".slice", ".scope", ".swap")


def _parse_unit_names(value):
    """Service names of a dependency list (".service" optional); names of other
    unit types are dropped (see other_unit_names)."""
    return tuple(name[:-len(UNIT_SUFFIX)] if name.endswith(UNIT_SUFFIX) else name
                 for name in value.split() if not name.endswith(OTHER_UNIT_SUFFIXES))


def other_unit_names(value):
    return [name for name in value.split() if name.endswith(OTHER_UNIT_SUFFIXES)]


# Limit*= keys: the rlimit each sets and how its values read (systemd.exec(5)).
RLIMIT_KEYS = {"LimitCPU": ("CPU", "seconds"), "LimitFSIZE": ("FSIZE", "bytes"), "LimitDATA": ("DATA", "bytes"),
               "LimitSTACK": ("STACK", "bytes"), "LimitCORE": ("CORE", "bytes"), "LimitRSS": ("RSS", "bytes"),
               "LimitNOFILE": ("NOFILE", "count"), "LimitAS": ("AS", "bytes"), "LimitNPROC": ("NPROC", "count"),
               "LimitMEMLOCK": ("MEMLOCK", "bytes"), "LimitLOCKS": ("LOCKS", "count"),
               "LimitSIGPENDING": ("SIGPENDING", "count"), "LimitMSGQUEUE": ("MSGQUEUE", "bytes"),
               "LimitNICE": ("NICE", "nice"), "LimitRTPRIO": ("RTPRIO", "count"), "LimitRTTIME": ("RTTIME", "usec")}


def _parse_rlimit(key):
    """Limit*=: 'soft:hard' or one value for both; 'infinity' (None)."""
    resource_name, kind = RLIMIT_KEYS[key]

    def one(text):
        text = text.strip()
        if text == "infinity":
            return None
        if kind == "bytes":
            return parse_size(text)
        if kind == "seconds":
            return int(parse_timespan(text))
        if kind == "usec":
            return int(parse_timespan(text) * 1000000)
        if kind == "nice" and text[:1] in "+-":
            nice = int(text) if re.match(r"[+-][0-9]{1,2}\Z", text) else 99
            if not -20 <= nice <= 19:
                raise ValueError("a nice value is -20 to 19, not %r" % text)
            return 20 - nice
        if not text.isdigit():
            raise ValueError("%r is not a number (or infinity)" % text)
        return int(text)

    def parse(value):
        soft, colon, hard = value.partition(":")
        soft, hard = one(soft), one(hard) if colon else one(soft)
        if hard is not None and (soft is None or soft > hard):
            raise ValueError("the soft limit %s is above the hard limit %s" % (soft if soft is not None else "infinity", hard))
        return ((resource_name, soft, hard),)
    return parse


# RuntimeDirectory= and its kin: the specifier of the folder each lives in
# (/run, /var/lib, ... for a root daemon; the XDG folders otherwise), and the
# variable that tells the service where it is (systemd.exec(5)).
DIRECTORY_KEYS = {"Runtime": "t", "State": "S", "Cache": "C", "Logs": "L", "Configuration": "E"}
DIRECTORY_VARIABLES = {"t": "RUNTIME_DIRECTORY", "S": "STATE_DIRECTORY", "C": "CACHE_DIRECTORY",
                       "L": "LOGS_DIRECTORY", "E": "CONFIGURATION_DIRECTORY"}


def _parse_directories(kind):
    def parse(value):
        found = []
        for word in split_words(value):
            path = word.split(":", 1)[0]          # "path:symlink" makes a symlink too; the folder is what matters
            if path.startswith("/") or ".." in path.split("/") or not path:
                raise ValueError("%r must be a relative path below its folder, without '..'" % word)
            found.append((kind, os.path.normpath(path)))
        return tuple(found)
    return parse


def _parse_directory_mode(kind):
    return lambda value: ((kind, _parse_umask(value)),)


# CPUSchedulingPolicy= and IOSchedulingClass= names (sched(7), ioprio_set(2)).
CPU_POLICIES = {"other": "SCHED_OTHER", "batch": "SCHED_BATCH", "idle": "SCHED_IDLE", "fifo": "SCHED_FIFO",
                "rr": "SCHED_RR"}
IO_CLASSES = {"none": 0, "realtime": 1, "best-effort": 2, "idle": 3}


def _parse_io_class(value):
    if value.isdigit() and int(value) <= 3:
        return int(value)
    if value not in IO_CLASSES:
        raise ValueError("%r is not one of %s (or 0-3)" % (value, ", ".join(IO_CLASSES)))
    return IO_CLASSES[value]


def _parse_cpu_set(value):
    """CPUAffinity=: CPU numbers and ranges, '0 2-3' or '0,2-3'."""
    cpus = []
    for word in value.replace(",", " ").split():
        low, dash, high = word.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()) or (dash and int(high) < int(low)):
            raise ValueError("%r is not a CPU number or range" % word)
        cpus.extend(range(int(low), int(high if dash else low) + 1))
    return tuple(cpus)


# StandardOutput=/StandardError= values that mean "the unit's log" here (the
# journal, syslog and the kernel log are where systemd would put it).
STDIO_TO_LOG = ("journal", "syslog", "kmsg", "journal+console", "syslog+console", "kmsg+console", "log")


def _parse_input_data(value, key):
    """StandardInputText= (a line) or StandardInputData= (base64): bytes."""
    if key == "StandardInputText":
        return ((value + "\n").encode(),)
    import base64
    import binascii
    try:
        return (base64.b64decode("".join(value.split()), validate=True),)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 data")


def _parse_stdio(value, key):
    """(kind, path): ("null"|"log"|"inherit", None) or ("file"|"append"|"truncate", path);
    StandardInput= takes null and file:PATH. Others are errors naming what works."""
    kind, colon, path = value.partition(":")
    if key == "StandardInput":
        if value in ("null", "socket", "data") or (kind == "file" and colon):
            return (kind, path or None)
        raise ValueError("%r is not supported: use null, socket, data or file:PATH" % value)
    if kind in ("file", "append", "truncate") and colon:
        if not path.startswith("/"):
            raise ValueError("%s needs an absolute path, not %r" % (kind, path))
        return (kind, path)
    if value in STDIO_TO_LOG:
        return ("log", None)
    if value in ("null", "inherit", "socket"):
        return (value, None)
    raise ValueError("%r is not supported: use inherit, null, journal (the unit's log), socket, file:PATH, "
                     "append:PATH or truncate:PATH" % value)


# ReadWritePaths= and its kin: what each does to the paths it names.
PATH_KEYS = {"ReadWritePaths": "rw", "ReadOnlyPaths": "ro", "InaccessiblePaths": "inaccessible",
             "ExecPaths": "exec", "NoExecPaths": "noexec", "ReadWriteDirectories": "rw",
             "ReadOnlyDirectories": "ro", "InaccessibleDirectories": "inaccessible"}
# capabilities(7), numbered as the kernel numbers them
CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
                "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
                "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
                "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
                "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
                "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
                "CAP_CHECKPOINT_RESTORE")


def _parse_protect(words):
    """ProtectSystem=/ProtectHome=: a boolean (yes is "yes") or one of `words`."""
    def parse(value):
        if value in words:
            return value
        try:
            return "yes" if parse_bool(value) else "no"
        except ValueError:
            raise ValueError("%r is not yes, no, %s" % (value, " or ".join(words)))
    return parse


def _parse_sandbox_paths(mode):
    def parse(value):
        found = []
        for word in split_words(value):
            optional = word.startswith("-")
            path = word.lstrip("-+")          # '+' (relative to RootDirectory=): there is none here
            if not path.startswith("/"):
                raise ValueError("%r is not an absolute path" % word)
            found.append((mode, os.path.normpath(path), optional))
        return tuple(found)
    return parse


def _parse_temporary_fs(value):
    found = []
    for word in split_words(value):
        path, _, options = word.partition(":")
        if not path.startswith("/"):
            raise ValueError("%r is not an absolute path" % word)
        found.append((os.path.normpath(path), options))
    return tuple(found)


def _parse_bind_paths(value, read_only):
    """BindPaths=: "[-]SOURCE[:DESTINATION[:rbind|norbind]]" words."""
    found = []
    for word in split_words(value):
        optional = word.startswith("-")
        parts = word.lstrip("-").split(":")
        source, destination = parts[0], parts[1] if len(parts) > 1 else parts[0]
        recursive = not (len(parts) > 2 and parts[2] == "norbind")
        if not source.startswith("/") or not destination.startswith("/"):
            raise ValueError("%r: both paths must be absolute" % word)
        found.append((os.path.normpath(source), os.path.normpath(destination), read_only, optional, recursive))
    return tuple(found)


def _parse_device_allow(value):
    """DeviceAllow=: "/dev/PATH [rwm]", "char-NAME [rwm]" or "block-NAME [rwm]"
    (a name of /proc/devices, globs allowed): ((device, access),)."""
    device, _, access = value.strip().partition(" ")
    access = access.strip() or "rwm"
    if not device.startswith(("/dev/", "char-", "block-")):
        raise ValueError("%r: a device is /dev/PATH, char-NAME or block-NAME" % device)
    if not access or set(access) - set("rwm"):
        raise ValueError("%r: the access is some of r, w and m" % access)
    return ((device, access),)


# CoredumpFilter= names (core(5)'s bits), SecureBits= names (capabilities(7)),
# NUMAPolicy= modes (set_mempolicy(2)), Personality= on this machine.
COREDUMP_BITS = {"private-anonymous": 0, "shared-anonymous": 1, "private-file-backed": 2, "shared-file-backed": 3,
                 "elf-headers": 4, "private-huge": 5, "shared-huge": 6, "private-dax": 7, "shared-dax": 8}
SECURE_BITS = {"noroot": 0, "noroot-locked": 1, "no-setuid-fixup": 2, "no-setuid-fixup-locked": 3, "keep-caps": 4,
               "keep-caps-locked": 5}
NUMA_POLICIES = {"default": 0, "preferred": 1, "bind": 2, "interleave": 3, "local": 4}
PERSONALITIES = {"x86-64": 0x0000, "x86": 0x0008}     # PER_LINUX, PER_LINUX32
PERSONALITY_NAMES = ("arm64 arm64-be arm arm-be alpha arc arc-be cris ia64 loongarch64 m68k mips64-le mips64 mips-le "
                     "mips nios2 parisc64 parisc ppc64-le ppc64 ppc ppc-le riscv32 riscv64 s390x s390 sh64 sh sparc64 "
                     "sparc tilegx").split()      # systemd knows them; not this machine's


def _parse_coredump_filter(value):
    mask = 0
    for word in value.split():
        if word in ("default", "all"):
            mask |= 0x33 if word == "default" else 0x1ff
        elif word in COREDUMP_BITS:
            mask |= 1 << COREDUMP_BITS[word]
        else:
            try:
                mask |= int(word, 16)
            except ValueError:
                raise ValueError("%r: a coredump_filter name (%s, default, all) or a hex mask" % (
                    word, ", ".join(COREDUMP_BITS)))
    return (mask,)


def _parse_secure_bits(value):
    bits = 0
    for word in value.split():
        if word not in SECURE_BITS:
            raise ValueError("%r: one of %s" % (word, ", ".join(SECURE_BITS)))
        bits |= 1 << SECURE_BITS[word]
    return (bits,)


def _parse_timer_slack(value):
    """TimerSlackNSec=: nanoseconds, or a time span (50us)."""
    value = value.strip()
    return int(value) if value.isdigit() else int(round(parse_timespan(value) * 1e9))


def _parse_personality(value):
    if value not in PERSONALITIES and value not in PERSONALITY_NAMES:
        raise ValueError("unknown personality %r (x86-64, x86, arm64, ...)" % value)
    return value


# IOReadBandwidthMax= and its kin: their io.max field (v2) and blkio file (v1).
IO_LIMIT_FILES = {"IOReadBandwidthMax": ("rbps", "blkio.throttle.read_bps_device"),
                  "IOWriteBandwidthMax": ("wbps", "blkio.throttle.write_bps_device"),
                  "IOReadIOPSMax": ("riops", "blkio.throttle.read_iops_device"),
                  "IOWriteIOPSMax": ("wiops", "blkio.throttle.write_iops_device")}


def _parse_io_limit(key):
    def parse(value):
        path, _, amount = value.strip().rpartition(" ")
        if not path.startswith("/"):
            raise ValueError("%r: a device or file path, then the limit" % value)
        limit = "max" if amount == "infinity" else (parse_size(amount) if "Bandwidth" in key else _parse_count(amount))
        return ((key, path.strip(), limit),)
    return parse


def _parse_capabilities(value):
    """CapabilityBoundingSet=/AmbientCapabilities=: names ('~' inverts), one
    assignment as (invert, capability numbers)."""
    invert = value.startswith("~")
    numbers = []
    for name in value.lstrip("~").split():
        name = name.upper() if name.upper().startswith("CAP_") else "CAP_" + name.upper()
        if name not in CAPABILITIES:
            raise ValueError("unknown capability %s" % name)
        numbers.append(CAPABILITIES.index(name))
    return ((invert, tuple(numbers)),)


def capability_set(assignments):
    """The capabilities the assignments of CapabilityBoundingSet= (or
    AmbientCapabilities=) leave, as systemd.exec(5) merges them: None when
    the key is not set; the first assignment sets (a '~' one: all but its
    names); later ones merge by OR, '~' ones by AND; an empty one empties it
    (invert None)."""
    chosen = None
    for invert, numbers in assignments:
        if invert is None:
            chosen = set()
            continue
        found = set(range(len(CAPABILITIES))) - set(numbers) if invert else set(numbers)
        chosen = found if chosen is None else (chosen & found if invert else chosen | found)
    return chosen


def _parse_tasks_max(value):
    """TasksMax=: a count, a percentage of the kernel's pid_max, or "infinity"."""
    if value == "infinity":
        return value
    if value.endswith("%"):
        try:
            pid_max = int(_read_text("/proc/sys/kernel/pid_max"))
        except (OSError, ValueError):
            pid_max = 4194304
        return max(1, int(pid_max * _parse_percent(value) / 100))
    return _parse_count(value)


def _parse_preserve(value):
    """RuntimeDirectoryPreserve=: yes, no (booleans too) or restart."""
    return "restart" if value == "restart" else ("yes" if parse_bool(value) else "no")


def _parse_umask(value):
    if not re.match(r"[0-7]{1,4}\Z", value):
        raise ValueError("takes an octal mode such as 0027, not %r" % value)
    return int(value, 8)


def _parse_int_range(low, high):
    def parse(value):
        if not re.match(r"[+-]?[0-9]+\Z", value.strip()) or not low <= int(value) <= high:
            raise ValueError("%r is not a whole number from %d to %d" % (value, low, high))
        return int(value)
    return parse


# The Condition*= (and Assert*=) checks made at each start (systemd.unit(5)).
START_CONDITIONS = ("PathExists", "PathExistsGlob", "PathIsDirectory", "PathIsSymbolicLink", "PathIsMountPoint",
                    "PathIsReadWrite", "DirectoryNotEmpty", "FileNotEmpty", "FileIsExecutable", "User", "Group",
                    "Virtualization", "Capability", "Architecture", "Environment", "KernelCommandLine", "Memory",
                    "CPUs", "KernelVersion", "OSRelease", "FirstBoot", "NeedsUpdate", "ACPower", "CPUFeature",
                    "ControlGroupController", "Security", "PathIsEncrypted", "Credential", "CPUPressure",
                    "MemoryPressure", "IOPressure", "Firmware")
PATH_CONDITIONS = ("PathExists", "PathExistsGlob", "PathIsDirectory", "PathIsSymbolicLink", "PathIsMountPoint",
                   "PathIsReadWrite", "DirectoryNotEmpty", "FileNotEmpty", "FileIsExecutable", "NeedsUpdate",
                   "PathIsEncrypted")
# systemd's names of the machine's architecture (uname -m), for ConditionArchitecture=.
ARCHITECTURES = {"x86_64": "x86-64", "i386": "x86", "i486": "x86", "i586": "x86", "i686": "x86",
                 "aarch64": "arm64", "aarch64_be": "arm64-be", "armv7l": "arm", "armv6l": "arm",
                 "ppc64le": "ppc64-le", "ppc64": "ppc64", "s390x": "s390x", "riscv64": "riscv64",
                 "mips64": "mips64", "loongarch64": "loongarch64"}
# Files systemd does not count in ConditionDirectoryNotEmpty= (hidden and backup files).
_BACKUP_SUFFIXES = ("~", ".rpmnew", ".rpmsave", ".rpmorig", ".dpkg-old", ".dpkg-new", ".dpkg-tmp", ".dpkg-dist",
                    ".dpkg-bak", ".dpkg-backup", ".dpkg-remove", ".ucf-new", ".ucf-old", ".ucf-dist", ".swp",
                    ".bak", ".old", ".new")
_COMPARISON_RE = re.compile(r"\s*(<=|>=|!=|=|<|>)?\s*(.*?)\s*\Z")


class IgnoredValue(ValueError):
    """A value systemd ignores with a warning (the line, not the unit, is bad)."""


def _parse_condition(key):
    check = key[len("Condition"):] if key.startswith("Condition") else key[len("Assert"):]

    def parse(value):
        triggering = value.startswith("|")      # one of the '|' conditions must hold (systemd.unit(5))
        value = value[1:] if triggering else value
        negated = value.startswith("!")
        value = value[1:] if negated else value
        if check in PATH_CONDITIONS:
            # As systemd: no space is skipped after | and !, and a path that is
            # not absolute makes the line ignored (with a warning), not the unit.
            if not value.startswith("/"):
                raise IgnoredValue("%r is not an absolute path: the line is ignored, as systemd does" % value)
            value = value.rstrip("/") or "/"
        else:
            value = value.strip()
        return ((key, negated, value, triggering),)
    return parse


def condition_holds(key, value, virtualization):
    """One Condition*=/Assert*= check on this machine (`virtualization`: the
    container's name or "none"), as systemd 252 evaluates it."""
    check = key[len("Condition"):] if key.startswith("Condition") else key[len("Assert"):]
    if check == "PathExists":
        return os.path.lexists(value) and os.path.exists(value)
    if check == "PathExistsGlob":
        return glob_matches(value)
    if check == "PathIsDirectory":
        return os.path.isdir(value)
    if check == "PathIsSymbolicLink":
        return os.path.islink(value)
    if check == "PathIsMountPoint":
        return os.path.realpath(value) in _mount_points()
    if check == "PathIsReadWrite":
        return os.path.exists(value) and not os.statvfs(value).f_flag & os.ST_RDONLY
    if check == "DirectoryNotEmpty":
        return os.path.isdir(value) and any(not (entry.startswith(".") or entry.endswith(_BACKUP_SUFFIXES))
                                            for entry in os.listdir(value))
    if check == "FileNotEmpty":
        return os.path.isfile(value) and os.path.getsize(value) > 0
    if check == "FileIsExecutable":           # the mode bits, as systemd: not access(2)
        try:
            info = os.stat(value)
        except OSError:
            return False
        return stat.S_ISREG(info.st_mode) and bool(info.st_mode & 0o111)
    if check in ("User", "Group"):
        import grp
        import pwd
        try:
            if check == "User" and value == "@system":
                return os.geteuid() < 1000
            if check == "User":
                return os.geteuid() == (int(value) if value.isdigit() else pwd.getpwnam(value).pw_uid)
            gid = int(value) if value.isdigit() else grp.getgrnam(value).gr_gid
            return gid == os.getegid() or gid in os.getgroups()
        except KeyError:
            return False
    if check == "Virtualization":
        if value in ("container", "vm"):
            return value == "container" and virtualization != "none"
        try:
            return parse_bool(value) == (virtualization != "none")
        except ValueError:
            return value == virtualization
    if check == "Capability":
        number = int(value) if value.isdigit() else (
            CAPABILITIES.index(value.upper()) if value.upper() in CAPABILITIES else None)
        if number is None:
            raise ValueError("unknown capability %s" % value)     # as systemd: never holds
        try:                              # in the daemon's bounding set, as in systemd's
            bounding = int(dict(line.split(":", 1) for line in _read_text("/proc/self/status").splitlines()
                                if ":" in line)["CapBnd"], 16)
        except (OSError, KeyError, ValueError):
            return False
        return bool(bounding >> number & 1)
    if check == "Architecture":
        machine = os.uname().machine
        return value in ("native", ARCHITECTURES.get(machine, machine))
    if check == "Environment":
        name, equals, wanted = value.partition("=")
        return name in os.environ and (not equals or os.environ[name] == wanted)
    if check == "KernelCommandLine":          # in a container, as systemd: the command line of its pid 1
        words = _read_text("/proc/cmdline").split() if virtualization == "none" else \
            _read_bytes("/proc/1/cmdline").decode("utf-8", "replace").split("\0")
        return value in words or ("=" not in value and any(word.startswith(value + "=") for word in words))
    if check == "Memory":
        return _compare(_physical_memory(), value, parse_size)
    if check == "CPUs":
        return _compare(len(os.sched_getaffinity(0)), value, int)
    if check == "KernelVersion":              # several expressions, space-separated: all must hold
        import fnmatch
        release = os.uname().release
        for expression in value.split():
            operator, wanted = _COMPARISON_RE.match(expression).groups()
            if not (fnmatch.fnmatchcase(release, wanted) if operator is None
                    else _compare(release, expression, str, version_compare)):
                return False
        return bool(value.split())
    if check == "OSRelease":
        fields = {}
        for line in _read_text("/etc/os-release" if os.path.exists("/etc/os-release") else "/usr/lib/os-release").splitlines():
            name, _, text = line.partition("=")
            fields[name.strip()] = text.strip().strip("\"'")
        match = re.match(r"\s*([A-Za-z0-9_]+)\s*(<=|>=|!=|=|<|>)\s*(.*?)\s*\Z", value)
        if not match:
            raise ValueError("%r is not NAME=VALUE" % value)
        name, operator, wanted = match.groups()
        return _compare(fields.get(name, ""), operator + wanted, str, version_compare if operator != "=" and
                        operator != "!=" else None)
    if check == "FirstBoot":
        return os.path.exists("/run/systemd/first-boot") == parse_bool(value)
    if check == "NeedsUpdate":                # /usr newer than the folder's last update
        try:
            updated = os.stat(os.path.join(value, ".updated")).st_mtime_ns
        except OSError:
            return True
        return os.stat("/usr").st_mtime_ns > updated
    if check == "ACPower":
        return _on_ac_power() == parse_bool(value)
    if check == "CPUFeature":
        flags = set()
        for line in _read_text("/proc/cpuinfo").splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.partition(":")[2].split())
        return value.lower() in flags
    if check == "Host":                       # AssertHost= (ConditionHost= is decided at deploy)
        return host_matches([value], socket.gethostname())
    if check == "Security":
        return _security_feature(value)
    if check == "PathIsEncrypted":
        try:
            found = os.stat(value).st_dev
        except OSError:
            return False
        return _encrypted("/sys/dev/block/%d:%d" % (os.major(found), os.minor(found)), 0)
    if check == "Credential":
        folders = [os.environ.get("CREDENTIALS_DIRECTORY"), "/run/credentials/@system"]
        return bool(re.match(r"^[A-Za-z0-9_.@-]+$", value)) and value not in (".", "..") and any(
            folder and os.path.exists(os.path.join(folder, value)) for folder in folders)
    if check in ("CPUPressure", "MemoryPressure", "IOPressure"):
        return _pressure_below(check[:-len("Pressure")].lower(), value)
    if check == "Firmware":
        return _firmware_matches(value)
    if check == "ControlGroupController":
        available = set(_read_text("/proc/cgroups").split()) if os.path.exists("/proc/cgroups") else set()
        try:
            available.update(_read_text("/sys/fs/cgroup/cgroup.controllers").split())
            available.add("v2")
        except OSError:
            available.add("v1")
        known = {"cpu", "cpuacct", "cpuset", "io", "blkio", "memory", "devices", "pids", "v1", "v2"}
        return all(word in available for word in value.split() if word in known)   # others: ignored, as systemd
    return True


def _security_feature(name):
    """ConditionSecurity=: what systemd 252 looks at for each name."""
    if name == "audit":                   # the kernel takes audit netlink sockets
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 9).close()
            return True
        except OSError:
            return False
    if name == "apparmor":
        try:
            return _read_text("/sys/module/apparmor/parameters/enabled").strip().upper().startswith("Y")
        except OSError:
            return False
    if name == "uefi-secureboot":
        try:
            return _read_bytes("/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c")[-1:] == b"\1"
        except OSError:
            return False
    if name == "tpm2":
        return os.path.isdir("/sys/class/tpmrm") and bool(os.listdir("/sys/class/tpmrm"))
    paths = {"selinux": "/sys/fs/selinux/enforce", "smack": "/sys/fs/smackfs", "tomoyo": "/sys/kernel/security/tomoyo",
             "ima": "/sys/kernel/security/ima"}
    return name in paths and os.path.exists(paths[name])      # cvm and unknown names: false, as systemd


def _read_bytes(path):
    with open(path, "rb") as handle:
        return handle.read()


def _encrypted(sysfs, depth):
    """ConditionPathIsEncrypted=: a dm-crypt device, or one below it (a
    partition on it, LVM on it)."""
    try:
        if _read_text(os.path.join(sysfs, "dm", "uuid")).startswith("CRYPT-"):
            return True
    except OSError:
        pass
    slaves = os.path.join(sysfs, "slaves")
    return depth < 8 and os.path.isdir(slaves) and any(_encrypted(os.path.join(slaves, entry), depth + 1)
                                                       for entry in os.listdir(slaves))


def _pressure_below(kind, value):
    """Condition*Pressure=: "[SLICE:]N%[/10sec|/1min|/5min]" holds while the
    "some" average of that window is at most N%; without PSI it holds."""
    match = re.match(r"^(?:([^:]+):)?\s*([\d.]+)%\s*(?:/\s*(10sec|1min|5min))?\s*$", value)
    if not match:
        raise ValueError("%r is not N%%[/10sec|/1min|/5min]" % value)
    where, threshold, window = match.groups()
    if where is not None:             # foo-bar.slice is foo.slice/foo-bar.slice, as systemd nests slices
        parts = _strip_suffix(where.strip(), ".slice").split("-")
        where = "/".join("-".join(parts[:i + 1]) + ".slice" for i in range(len(parts)))
    path = "/proc/pressure/" + kind if where is None else os.path.join("/sys/fs/cgroup", where, kind + ".pressure")
    try:
        text = _read_text(path)
    except OSError:
        return True
    fields = dict(word.split("=") for word in text.splitlines()[0].split()[1:])
    return float(fields[{"10sec": "avg10", "1min": "avg60", None: "avg300", "5min": "avg300"}[window]]) <= float(threshold)


def _firmware_matches(value):
    """ConditionFirmware=: uefi, device-tree, device-tree-compatible(V) or
    smbios-field(NAME OP VALUE)."""
    if value == "uefi":
        return os.path.isdir("/sys/firmware/efi")
    if value == "device-tree":
        return os.path.isdir("/sys/firmware/devicetree")
    match = re.match(r"^device-tree-compatible\((.+)\)$", value)
    if match:
        try:
            return match.group(1) in _read_bytes("/proc/device-tree/compatible").decode("utf-8", "replace").split("\0")
        except OSError:
            return False
    match = re.match(r"^smbios-field\(\s*(\w+)\s*(!\$=|\$=|<=|>=|!=|=|<|>)\s*(.*?)\s*\)$", value)
    if match:
        import fnmatch
        name, operator, wanted = match.groups()
        try:
            actual = _read_text("/sys/class/dmi/id/" + name).strip()
        except OSError:
            return False
        if operator in ("$=", "!$="):
            return fnmatch.fnmatchcase(actual, wanted) == (operator == "$=")
        return _compare(actual, operator + wanted, str, version_compare)
    raise ValueError("%r is not uefi, device-tree, device-tree-compatible(...) or smbios-field(...)" % value)


def _compare(actual, expression, convert, compare=None):
    """`actual` against "OP VALUE" (OP one of < <= = != >= >; = without one)."""
    operator, wanted = _COMPARISON_RE.match(expression).groups()
    operator = operator or "="
    wanted = convert(wanted)
    order = compare(actual, wanted) if compare else (actual > wanted) - (actual < wanted)
    return {"<": order < 0, "<=": order <= 0, "=": order == 0, "!=": order != 0, ">=": order >= 0,
            ">": order > 0}[operator]


def version_compare(left, right):
    """strverscmp-like: runs of digits compare as numbers, the rest as text."""
    def parts(text):
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.findall(r"\d+|\D+", text)]
    a, b = parts(left), parts(right)
    return (a > b) - (a < b)


def _on_ac_power():
    """As systemd: True if a mains supply is online, or there is none at all."""
    import glob as glob_module
    mains = False
    for folder in glob_module.glob("/sys/class/power_supply/*"):
        try:
            if _read_text(os.path.join(folder, "type")).strip() != "Mains":
                continue
            mains = True
            if _read_text(os.path.join(folder, "online")).strip() == "1":
                return True
        except OSError:
            continue
    return not mains


def _absolute_paths(value):
    paths = split_words(value)
    for path in paths:
        if not path.startswith("/"):
            raise ValueError("%r is not an absolute path" % path)
    return [os.path.normpath(path) for path in paths]


FSTAB = "/etc/fstab"


def unmounted_for(paths, fstab=None, mounted=None):
    """RequiresMountsFor=: the /etc/fstab mount points above (or at) these
    paths that are not mounted now (gitproc mounts nothing: the start fails,
    as systemd's would when the mount unit it pulls in fails). noauto and
    swap entries are not required."""
    try:
        lines = _read_text(fstab or FSTAB).splitlines()
    except OSError:
        return []
    mounted = _mount_points() if mounted is None else mounted
    missing = []
    for line in lines:
        fields = line.split()
        if len(fields) < 3 or fields[0].startswith("#") or fields[2] == "swap" or \
                "noauto" in (fields[3].split(",") if len(fields) > 3 else ()):
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]).rstrip("/") or "/"
        if point.startswith("/") and point not in mounted and point not in missing and any(
                path == point or path.startswith(point.rstrip("/") + "/") for path in paths):
            missing.append(point)
    return missing


def _mount_points():
    """The mount points of this mount namespace (/proc/self/mountinfo)."""
    points = set()
    for line in _read_text("/proc/self/mountinfo").splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


MAX_GLOB_ALTERNATIVES = 256            # of a glob's {a,b} braces; more: the glob matches nothing


def glob_matches(pattern):
    """True if something matches a glob as glibc's glob(3) with GLOB_BRACE
    reads it (systemd's ConditionPathExistsGlob=): {a,b} alternatives,
    [!...] and [^...], backslash escapes; * never matches a leading dot.
    A glob with more than MAX_GLOB_ALTERNATIVES alternatives, or one that
    cannot be read, matches nothing (a condition on it fails)."""
    try:
        alternatives = _expand_braces(pattern, [MAX_GLOB_ALTERNATIVES])
    except (ValueError, RecursionError):
        return False
    return any(_glob_walk("/", [part for part in alternative.split("/") if part]) for alternative in alternatives)


def _expand_braces(pattern, budget):
    """'a{b,c{d,e}}f' -> ['abf', 'acdf', 'acef']; a brace without a comma
    stands for its content ({x} is x), an unmatched one for itself.
    ValueError past budget[0] alternatives."""
    depth, start, index = 0, None, 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            if depth == 0:
                start = index
            depth += 1
            if depth > 16:
                raise ValueError("braces nested too deep")
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                inner, choices, level, piece, position = pattern[start + 1:index], [], 0, "", 0
                while position < len(inner):
                    c = inner[position]
                    if c == "\\":
                        piece += inner[position:position + 2]
                        position += 2
                        continue
                    level += c == "{"
                    level -= c == "}"
                    if c == "," and level == 0:
                        choices.append(piece)
                        piece = ""
                    else:
                        piece += c
                    position += 1
                choices.append(piece)
                head, tail = pattern[:start], _expand_braces(pattern[index + 1:], budget)
                result = []
                for choice in choices:
                    for one in _expand_braces(choice, budget):
                        for rest in tail:
                            result.append(head + one + rest)
                            if len(result) > budget[0]:
                                raise ValueError("more than %d alternatives" % budget[0])
                return result
        index += 1
    return [pattern]


def _glob_walk(folder, parts):
    if not parts:
        return os.path.lexists(folder)
    part, rest = parts[0], parts[1:]
    if not any(c in part for c in "*?[\\"):
        path = os.path.join(folder, part)
        return (os.path.isdir(path) if rest else os.path.lexists(path)) and _glob_walk(path, rest)
    matcher = _glob_matcher(part)
    if matcher is None:
        return False
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(matcher(name) and (not name.startswith(".") or part.startswith(".")) and
               _glob_walk(os.path.join(folder, name), rest) for name in names)


def _glob_matcher(part):
    """A name matcher for one path component of a glob, or None if it cannot
    be read. fnmatch makes the regex (it copes with '**********x' without
    backtracking for ever); a backslash escape and [^...] become its forms."""
    import fnmatch
    out, index = [], 0
    while index < len(part):
        char = part[index]
        if char == "\\" and index + 1 < len(part):
            escaped = part[index + 1]
            out.append("[%s]" % escaped if escaped in "*?[" else escaped)    # the rest is literal to fnmatch
            index += 2
            continue
        if char == "[" and part[index + 1:index + 2] == "^":
            out.append("[!")
            index += 2
            continue
        out.append(char)
        index += 1
    try:
        return re.compile(fnmatch.translate("".join(out))).match
    except (re.error, ValueError):
        return None


def container_name():
    """The container this runs in ("docker", "podman", "lxc", ...), or "none",
    as systemd-detect-virt tells it from the usual marks."""
    try:
        environ = _read_text("/proc/1/environ")
        for entry in environ.split("\0"):
            if entry.startswith("container="):
                return entry.split("=", 1)[1] or "container"
    except OSError:
        pass
    if os.path.exists("/.dockerenv"):
        return "docker"
    if os.path.exists("/run/.containerenv"):
        return "podman"
    return "none"


def _parse_host_condition(value):
    return (value.strip(),)           # '|host': one of the '|' ones must match (host_matches)


# The directive table: (section, key) -> (field, parse, kind). kind "list"
# accumulates repeated assignments and an empty value resets the list; "one"
# is a single value (the last assignment wins, an empty one restores the default).
DIRECTIVES = {
    ("Unit", "Description"): ("description", str, "one"),
    ("Unit", "After"): ("after", _parse_unit_names, "list"),
    ("Unit", "Requires"): ("requires", _parse_unit_names, "list"),
    ("Unit", "Before"): ("before", _parse_unit_names, "list"),
    ("Unit", "Wants"): ("wants", _parse_unit_names, "list"),
    ("Unit", "BindsTo"): ("binds_to", _parse_unit_names, "list"),
    ("Unit", "PartOf"): ("part_of", _parse_unit_names, "list"),
    ("Unit", "Conflicts"): ("conflicts", _parse_unit_names, "list"),
    ("Unit", "OnFailure"): ("on_failure", _parse_unit_names, "list"),
    ("Unit", "OnSuccess"): ("on_success", _parse_unit_names, "list"),
    ("Unit", "Requisite"): ("requisite", _parse_unit_names, "list"),
    ("Unit", "Upholds"): ("upholds", _parse_unit_names, "list"),
    ("Unit", "StopWhenUnneeded"): ("stop_when_unneeded", parse_bool, "one"),
    ("Unit", "RequiresMountsFor"): ("requires_mounts_for", lambda v: tuple(_absolute_paths(v)), "list"),
    ("Unit", "JoinsNamespaceOf"): ("joins_namespace_of", _parse_unit_names, "list"),
    ("Unit", "PropagatesReloadTo"): ("propagates_reload_to", _parse_unit_names, "list"),
    ("Unit", "ReloadPropagatedFrom"): ("reload_propagated_from", _parse_unit_names, "list"),
    ("Unit", "ConditionHost"): ("condition_host", _parse_host_condition, "list"),
    ("Unit", "StartLimitIntervalSec"): ("start_limit_interval", parse_timespan, "one"),
    ("Unit", "StartLimitBurst"): ("start_limit_burst", _parse_count, "one"),
    ("Service", "StartLimitInterval"): ("start_limit_interval", parse_timespan, "one"),
    ("Service", "StartLimitBurst"): ("start_limit_burst", _parse_count, "one"),
    ("Service", "Type"): ("type", _parse_type, "one"),
    ("Service", "ExecStart"): ("exec_start", lambda v: (_parse_exec(v),), "list"),
    ("Service", "ExecStartPre"): ("exec_start_pre", lambda v: (_parse_exec(v),), "list"),
    ("Service", "ExecStartPost"): ("exec_start_post", lambda v: (_parse_exec(v),), "list"),
    ("Service", "ExecCondition"): ("exec_condition", lambda v: (_parse_exec(v),), "list"),
    ("Service", "ExecReload"): ("exec_reload", lambda v: (_parse_exec(v),), "list"),
    ("Service", "ExecStop"): ("exec_stop", lambda v: (_parse_exec(v),), "list"),
    ("Service", "ExecStopPost"): ("exec_stop_post", lambda v: (_parse_exec(v),), "list"),
    ("Service", "PIDFile"): ("pid_file", _parse_pid_file, "one"),
    ("Service", "NotifyAccess"): ("notify_access", _parse_choice(NOTIFY_ACCESS), "one"),
    ("Service", "WatchdogSec"): ("watchdog_sec", parse_timespan, "one"),
    ("Service", "ReloadSignal"): ("reload_signal", parse_signal, "one"),
    ("Service", "RemainAfterExit"): ("remain_after_exit", parse_bool, "one"),
    ("Service", "TimeoutStartSec"): ("timeout_start_sec", parse_timespan, "one"),
    ("Service", "TimeoutSec"): (("timeout_start_sec", "timeout_stop_sec"), parse_timespan, "one"),
    ("Service", "SuccessExitStatus"): ("success_exit_status", _parse_exit_statuses, "list"),
    ("Service", "RestartPreventExitStatus"): ("restart_prevent_exit_status", _parse_exit_statuses, "list"),
    ("Service", "RestartForceExitStatus"): ("restart_force_exit_status", _parse_exit_statuses, "list"),
    ("Service", "WorkingDirectory"): ("working_directory", _parse_working_directory, "one"),
    ("Service", "User"): ("user", _parse_user, "one"),
    ("Service", "Group"): ("group", _parse_user, "one"),
    ("Service", "Environment"): ("environment", _parse_environment, "list"),
    ("Service", "EnvironmentFile"): ("environment_files", _parse_env_file_ref, "list"),
    ("Service", "Restart"): ("restart", _parse_choice(RESTART_POLICIES), "one"),
    ("Service", "RestartSec"): ("restart_sec", parse_timespan, "one"),
    ("Service", "TimeoutStopSec"): ("timeout_stop_sec", parse_timespan, "one"),
    ("Service", "KillSignal"): ("kill_signal", parse_signal, "one"),
    ("Service", "RestartKillSignal"): ("restart_kill_signal", parse_signal, "one"),
    ("Service", "FinalKillSignal"): ("final_kill_signal", parse_signal, "one"),
    ("Service", "WatchdogSignal"): ("watchdog_signal", parse_signal, "one"),
    ("Service", "SendSIGHUP"): ("send_sighup", parse_bool, "one"),
    ("Service", "SendSIGKILL"): ("send_sigkill", parse_bool, "one"),
    ("Service", "TimeoutAbortSec"): ("timeout_abort_sec", parse_timespan, "one"),
    ("Service", "RuntimeMaxSec"): ("runtime_max_sec", parse_timespan, "one"),
    ("Service", "RestartSteps"): ("restart_steps", _parse_int_range(0, 3000), "one"),
    ("Service", "ExitType"): ("exit_type", _parse_choice(("main", "cgroup")), "one"),
    ("Service", "OOMPolicy"): ("oom_policy", _parse_choice(("continue", "stop", "kill")), "one"),
    ("Service", "RestartMaxDelaySec"): ("restart_max_delay", parse_timespan, "one"),
    ("Service", "KillMode"): ("kill_mode", _parse_choice(KILL_MODES + ("none",)), "one"),
    ("Service", "MemoryMax"): ("memory_max", lambda v: parse_size(v, allow_percent=True), "one"),
    ("Service", "MemoryLimit"): ("memory_max", lambda v: parse_size(v, allow_percent=True), "one"),
    ("Service", "CPUQuota"): ("cpu_quota", _parse_percent, "one"),
    ("Service", "MemoryHigh"): ("memory_high", lambda v: parse_size(v, allow_percent=True), "one"),
    ("Service", "MemorySwapMax"): ("memory_swap_max", lambda v: parse_size(v, allow_percent=True), "one"),
    ("Service", "TasksMax"): ("tasks_max", _parse_tasks_max, "one"),
    ("Service", "CPUWeight"): ("cpu_weight", _parse_int_range(1, 10000), "one"),
    ("Service", "IOWeight"): ("io_weight", _parse_int_range(1, 10000), "one"),
    ("Service", "AllowedCPUs"): ("allowed_cpus", lambda v: tuple(sorted(set(_parse_cpu_set(v)))), "one"),
    ("Service", "MemoryLow"): ("memory_low", lambda v: parse_size(v, allow_percent=True), "one"),
    ("Service", "MemoryMin"): ("memory_min", lambda v: parse_size(v, allow_percent=True), "one"),
    ("Service", "StartupCPUWeight"): ("startup_cpu_weight", _parse_int_range(1, 10000), "one"),
    ("Service", "StartupIOWeight"): ("startup_io_weight", _parse_int_range(1, 10000), "one"),
    ("Service", "CPUQuotaPeriodSec"): ("cpu_quota_period", lambda v: min(1.0, max(0.001, parse_timespan(v))), "one"),
    ("Service", "HealthCheckURL"): ("health_check_url", _parse_health_url, "one"),
    ("Service", "HealthCheckInterval"): ("health_check_interval", parse_timespan, "one"),
    ("Service", "HealthCheckTimeout"): ("health_check_timeout", parse_timespan, "one"),
    ("Service", "HealthCheckRetries"): ("health_check_retries", _parse_count, "one"),
    ("Service", "HealthCheckStartPeriod"): ("health_check_start_period", parse_timespan, "one"),
    ("Service", "PrivatePIDs"): ("private_pids", parse_bool, "one"),
    ("Service", "AutoRollback"): ("auto_rollback", parse_bool, "one"),
    ("Service", "ReloadOnFileChange"): ("reload_on_file_change", parse_bool, "one"),
    ("Service", "UMask"): ("umask", _parse_umask, "one"),
    ("Service", "RuntimeDirectoryPreserve"): ("runtime_directory_preserve", _parse_preserve, "one"),
    ("Service", "CPUSchedulingPolicy"): ("cpu_scheduling_policy", _parse_choice(tuple(CPU_POLICIES)), "one"),
    ("Service", "CPUSchedulingPriority"): ("cpu_scheduling_priority", _parse_int_range(0, 99), "one"),
    ("Service", "CPUSchedulingResetOnFork"): ("cpu_scheduling_reset_on_fork", parse_bool, "one"),
    ("Service", "CPUAffinity"): ("cpu_affinity", _parse_cpu_set, "list"),
    ("Service", "IOSchedulingClass"): ("io_scheduling_class", _parse_io_class, "one"),
    ("Service", "IOSchedulingPriority"): ("io_scheduling_priority", _parse_int_range(0, 7), "one"),
    ("Service", "IgnoreSIGPIPE"): ("ignore_sigpipe", parse_bool, "one"),
    ("Service", "PermissionsStartOnly"): ("permissions_start_only", parse_bool, "one"),
    ("Service", "RootDirectoryStartOnly"): ("root_directory_start_only", parse_bool, "one"),
    ("Service", "SyslogIdentifier"): ("syslog_identifier", str, "one"),
    ("Service", "SyslogLevel"): ("syslog_level", lambda v: parse_priority(v), "one"),
    ("Service", "SyslogFacility"): ("syslog_facility", _parse_choice(FACILITIES), "one"),
    ("Service", "LogLevelMax"): ("log_level_max", lambda v: parse_priority(v), "one"),
    ("Service", "LogRateLimitIntervalSec"): ("log_rate_interval", parse_timespan, "one"),
    ("Service", "LogRateLimitBurst"): ("log_rate_burst", lambda v: _parse_int_range(0, 1 << 31)(v), "one"),
    ("Service", "NoNewPrivileges"): ("no_new_privileges", parse_bool, "one"),
    ("Service", "PrivateTmp"): ("private_tmp", parse_bool, "one"),
    ("Service", "PrivateDevices"): ("private_devices", parse_bool, "one"),
    ("Service", "PrivateNetwork"): ("private_network", parse_bool, "one"),
    ("Service", "PrivateIPC"): ("private_ipc", parse_bool, "one"),
    ("Service", "PrivateMounts"): ("private_mounts", parse_bool, "one"),
    ("Service", "ProtectSystem"): ("protect_system", _parse_protect(("full", "strict")), "one"),
    ("Service", "ProtectHome"): ("protect_home", _parse_protect(("read-only", "tmpfs")), "one"),
    ("Service", "ProtectKernelTunables"): ("protect_kernel_tunables", parse_bool, "one"),
    ("Service", "ProtectKernelModules"): ("protect_kernel_modules", parse_bool, "one"),
    ("Service", "ProtectKernelLogs"): ("protect_kernel_logs", parse_bool, "one"),
    ("Service", "ProtectControlGroups"): ("protect_control_groups", parse_bool, "one"),
    ("Service", "ProtectHostname"): ("protect_hostname", parse_bool, "one"),
    ("Service", "ProtectClock"): ("protect_clock", parse_bool, "one"),
    ("Service", "RestrictSUIDSGID"): ("restrict_suid_sgid", parse_bool, "one"),
    ("Service", "LockPersonality"): ("lock_personality", parse_bool, "one"),
    ("Service", "SystemCallFilter"): ("system_call_filter", lambda v: _parse_syscall_list(v, "SystemCallFilter"), "list"),
    ("Service", "SystemCallErrorNumber"): ("system_call_error_number", lambda v: _parse_errno_action(v), "one"),
    ("Service", "SystemCallArchitectures"): ("system_call_architectures", lambda v: _parse_architectures(v), "list"),
    ("Service", "SystemCallLog"): ("system_call_log", lambda v: _parse_syscall_list(v, "SystemCallLog"), "list"),
    ("Service", "RestrictAddressFamilies"): ("restrict_address_families", lambda v: _parse_address_families(v), "list"),
    ("Service", "RestrictNamespaces"): ("restrict_namespaces", lambda v: _parse_namespaces(v), "list"),
    ("Service", "RestrictRealtime"): ("restrict_realtime", parse_bool, "one"),
    ("Service", "MemoryDenyWriteExecute"): ("memory_deny_write_execute", parse_bool, "one"),
    ("Service", "DeviceAllow"): ("device_allow", _parse_device_allow, "list"),
    ("Service", "ProtectProc"): ("protect_proc", _parse_choice(("default", "noaccess", "invisible", "ptraceable")), "one"),
    ("Service", "ProcSubset"): ("proc_subset", _parse_choice(("all", "pid")), "one"),
    ("Service", "RemoveIPC"): ("remove_ipc", parse_bool, "one"),
    ("Service", "PrivateUsers"): ("private_users", parse_bool, "one"),
    ("Service", "DynamicUser"): ("dynamic_user", parse_bool, "one"),
    ("Service", "LoadCredential"): ("credentials", lambda v: _parse_credential(v, "LoadCredential"), "list"),
    ("Service", "SetCredential"): ("credentials", lambda v: _parse_credential(v, "SetCredential"), "list"),
    ("Service", "SecureBits"): ("secure_bits", _parse_secure_bits, "list"),
    ("Service", "Personality"): ("personality", _parse_personality, "one"),
    ("Service", "TimerSlackNSec"): ("timer_slack_nsec", _parse_timer_slack, "one"),
    ("Service", "CoredumpFilter"): ("coredump_filter", _parse_coredump_filter, "list"),
    ("Service", "NUMAPolicy"): ("numa_policy", _parse_choice(tuple(NUMA_POLICIES)), "one"),
    ("Service", "NUMAMask"): ("numa_mask", _parse_cpu_set, "list"),
    ("Service", "DevicePolicy"): ("device_policy", _parse_choice(("auto", "closed", "strict")), "one"),
    ("Service", "TemporaryFileSystem"): ("temporary_file_systems", _parse_temporary_fs, "list"),
    ("Service", "BindPaths"): ("bind_paths", lambda v: _parse_bind_paths(v, False), "list"),
    ("Service", "BindReadOnlyPaths"): ("bind_paths", lambda v: _parse_bind_paths(v, True), "list"),
    ("Service", "CapabilityBoundingSet"): ("capability_bounding_set", _parse_capabilities, "list"),
    ("Service", "AmbientCapabilities"): ("ambient_capabilities", _parse_capabilities, "list"),
    ("Service", "Sockets"): ("sockets", lambda v: tuple(n if n.endswith(".socket") else n + ".socket"
                                                        for n in v.split()), "list"),
    ("Service", "StandardInput"): ("standard_input", lambda v: _parse_stdio(v, "StandardInput"), "one"),
    ("Service", "StandardInputText"): ("standard_input_data", lambda v: _parse_input_data(v, "StandardInputText"), "list"),
    ("Service", "StandardInputData"): ("standard_input_data", lambda v: _parse_input_data(v, "StandardInputData"), "list"),
    ("Service", "PassEnvironment"): ("pass_environment", lambda v: tuple(v.split()), "list"),
    ("Service", "UnsetEnvironment"): ("unset_environment", lambda v: tuple(split_words(v)), "list"),
    ("Service", "StandardOutput"): ("standard_output", lambda v: _parse_stdio(v, "StandardOutput"), "one"),
    ("Service", "StandardError"): ("standard_error", lambda v: _parse_stdio(v, "StandardError"), "one"),
    ("Service", "SupplementaryGroups"): ("supplementary_groups", lambda v: tuple(_parse_user(w) for w in v.split()), "list"),
    ("Service", "Nice"): ("nice", _parse_int_range(-20, 19), "one"),
    ("Service", "OOMScoreAdjust"): ("oom_score_adjust", _parse_int_range(-1000, 1000), "one"),
}
DIRECTIVES.update({("Service", key): ("rlimits", _parse_rlimit(key), "list") for key in RLIMIT_KEYS})
DIRECTIVES.update({("Service", key): ("io_limits", _parse_io_limit(key), "list") for key in IO_LIMIT_FILES})
DIRECTIVES.update({("Service", key): ("paths", _parse_sandbox_paths(mode), "list") for key, mode in PATH_KEYS.items()})
DIRECTIVES[("Unit", "AssertHost")] = ("conditions", _parse_condition("AssertHost"), "list")
DIRECTIVES.update({("Unit", prefix + check): ("conditions", _parse_condition(prefix + check), "list")
                   for check in START_CONDITIONS for prefix in ("Condition", "Assert")})
DIRECTIVES.update({("Service", key + "Directory"): ("directories", _parse_directories(kind), "list")
                   for key, kind in DIRECTORY_KEYS.items()})
DIRECTIVES.update({("Service", key + "DirectoryMode"): ("directory_modes", _parse_directory_mode(kind), "list")
                   for key, kind in DIRECTORY_KEYS.items()})
KNOWN_SECTIONS = ("Unit", "Service", "Install")
# The key that names each field, for `diff` (the first one of the table wins).
FIELD_KEYS = {field: key + "=" for (_, key), (field, _, _) in reversed(list(DIRECTIVES.items()))
              if isinstance(field, str)}
FIELD_KEYS["not_applied"] = "keys not applied"
FIELD_KEYS["rlimits"] = "Limit*="
# Values run through %-specifier expansion (the others are names, numbers, paths).
# As systemd 252's parsers (load-fragment-gperf.gperf: the *_printf ones): the
# dependency names, paths, users and commands; never numbers, booleans,
# signals or capabilities (nor gitproc's HealthCheckURL=: a URL's %-escapes stay).
_SPECIFIER_FIELDS = {"description", "environment", "environment_files", "working_directory", "user", "group",
                     "supplementary_groups", "pid_file", "syslog_identifier", "conditions", "condition_host", "paths",
                     "bind_paths", "temporary_file_systems", "directories", "standard_input", "standard_output",
                     "standard_error", "after", "before", "requires", "wants", "binds_to", "part_of", "conflicts",
                     "on_failure", "on_success", "requisite", "upholds", "propagates_reload_to", "requires_mounts_for",
                     "joins_namespace_of",
                     "reload_propagated_from"} | set(EXEC_FIELDS)
# Keys accepted without a word: they only document the unit.
SILENT_KEYS = {("Unit", key) for key in (
    "Documentation", "DefaultDependencies", "IgnoreOnIsolate", "AllowIsolate", "CollectMode", "SourcePath",
    "RefuseManualStart", "RefuseManualStop")} | {("Service", key) for key in (
    "CPUAccounting", "MemoryAccounting", "TasksAccounting", "IOAccounting", "IPAccounting", "BlockIOAccounting",
    "GuessMainPID", "NonBlocking")}


def unknown_key_message(section, key):
    """What check says of a key gitproc does not know in `section`: where it
    belongs if it is known in another section (systemd ignores it there too),
    else the nearest known key ("did you mean Restart=?")."""
    import difflib
    homes = sorted(KNOWN_KEY_SECTIONS.get(key, set()) - {section})
    if homes:
        return "%s= belongs in [%s], not [%s]: ignored, as systemd does" % (key, homes[0], section)
    close = difflib.get_close_matches(key, list(KNOWN_KEY_SECTIONS), n=1, cutoff=0.75)
    hint = ""
    if close:
        where = sorted(KNOWN_KEY_SECTIONS[close[0]])
        hint = " (did you mean %s=%s?)" % (close[0], "" if not where or section in where else " in [%s]" % where[0])
    return "unknown key %s= in [%s], ignored%s" % (key, section, hint)



def _keys(why, *names):
    return {name: why for name in names}


# Keys of systemd.exec(5), .kill(5), .resource-control(5), .service(5) and
# .unit(5) that gitproc knows but does not apply (yet). They are never dropped
# silently: check reports each, and status NAME lists them under "Not applied".
NOT_APPLIED_KEYS = dict(
    **_keys("sandboxing: gitproc does not build this sandbox",
            "RootDirectory", "RootImage", "MountAPIVFS", "MountFlags",
            "KeyringMode", "NetworkNamespacePath", "IPCNamespacePath"),
    **_keys("an LSM label (SELinux, AppArmor, Smack), which gitproc does not set", "SELinuxContext",
            "AppArmorProfile", "SmackProcessLabel"),
    **_keys("needs BPF programs or an LSM, which gitproc does not load", "RestrictFileSystems",
            "IPAddressAllow", "IPAddressDeny", "SocketBindAllow", "SocketBindDeny", "RestrictNetworkInterfaces"),
    **_keys("output: the unit's log is used", "SyslogLevelPrefix", "LogExtraFields", "TTYPath", "TTYReset",
            "TTYVHangup"),
    **_keys("gitproc makes each unit's cgroup under its own folder: no slices", "Slice"),
    **_keys("cgroup resource control: not applied", "CPUShares", "IODeviceWeight", "AllowedMemoryNodes", "Delegate",
            "ManagedOOMSwap", "ManagedOOMMemoryPressure", "ManagedOOMPreference", "BlockIOWeight"),
    **_keys("service behaviour gitproc does not have yet", "BusName",
            "RestartMode", "FileDescriptorStoreMax",
            "LoadCredentialEncrypted", "SetCredentialEncrypted", "PAMName",
            "UtmpIdentifier", "UtmpMode"),
    **_keys("unit relations gitproc does not have yet", "FailureAction", "SuccessAction", "StartLimitAction",
            "JobTimeoutSec", "JobRunningTimeoutSec", "JobTimeoutAction"),
)
# Every key gitproc knows -> the sections it is known in (none: not applied), for
# the "belongs in [Unit]" and "did you mean" of an unknown key.
KNOWN_KEY_SECTIONS = {name: set() for name in NOT_APPLIED_KEYS}
for _where, _name in list(DIRECTIVES) + list(SILENT_KEYS):
    KNOWN_KEY_SECTIONS.setdefault(_name, set()).add(_where)
del _where, _name
# The value of a not-applied key that asks for nothing, where it is not "no":
# such a value is not reported (SyslogLevelPrefix=yes is what gitproc does anyway).
# A Condition is never "off": ConditionACPower=false asks for something.
NOT_APPLIED_DEFAULTS = {"SyslogLevelPrefix": "yes", "Slice": "system.slice", "KeyringMode": "private",
                        "UtmpMode": "init", "RestartMode": "normal"}
# Values systemd accepts that gitproc does not apply (the key itself is applied).
NOT_APPLIED_VALUES = {
    "StandardInput": (("tty", "tty-force", "tty-fail", "fd:"),
                      "a terminal or another unit's descriptor: the service's stdin is /dev/null"),
    "StandardOutput": (("tty", "fd:"), "a terminal or another unit's descriptor: the output goes to the unit's log"),
    "StandardError": (("tty", "fd:"), "a terminal or another unit's descriptor: the output goes to the unit's log"),
}


def not_applied_reason(key, value):
    """Why a key (or this value of it) is not applied."""
    if key in NOT_APPLIED_KEYS:
        return NOT_APPLIED_KEYS[key]
    return NOT_APPLIED_VALUES[key][1] if key in NOT_APPLIED_VALUES else "not applied"


def _asks_for_nothing(key, value):
    """A not-applied key set to its default: nothing to report."""
    if key.startswith(("Condition", "Assert")):
        return False
    default = NOT_APPLIED_DEFAULTS.get(key)
    if default is None:
        return _is_off(value)
    if default in ("yes", "no"):
        return _is_off(value) == (default == "no")
    return value.strip().lower() == default


def _value_not_applied(key, value):
    """True for a value systemd accepts for `key` that gitproc does not apply."""
    values = NOT_APPLIED_VALUES.get(key, ((), ""))[0]
    return value in values or any(value.startswith(v) for v in values if v.endswith(":"))


def unit_name_problem(name):
    """Why `name` cannot be a unit name, or None."""
    if not UNIT_NAME_RE.match(name):
        return "invalid unit name %r: use letters, digits and _ . @ - (at most 64, starting with a letter or digit)" % name
    return RESERVED_UNIT_NAMES.get(name)


def _logical_lines(text):
    """(line number, text) for each logical line: comments dropped, a trailing
    backslash joining the next line (comment lines inside a continuation skipped)."""
    pending, start = None, 0           # pending: the parts of a continued line
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if pending is not None and line[:1] in ("#", ";"):
            continue
        if pending is None:
            if not line or line[0] in "#;":
                continue
            start, pending = number, []
        if line.endswith("\\") and not _escaped(line, len(line) - 1):
            pending.append(line[:-1])
            continue
        pending.append(line)
        yield start, " ".join(pending)
        pending = None
    if pending:
        yield start, " ".join(pending)


def parse_unit(name, path, data, blob="", context=None):
    """Parse a unit: the bytes of its file, or [(path, bytes)] of its file
    (or template) and its drop-ins, read in that order. Returns (UnitSpec or
    None, [Diagnostic]); the spec is None when any error was found. Never
    raises on bad input. `context`: the machine's specifiers (by default
    this machine's, see specifier_context)."""
    diagnostics = []
    parts = [(path, data)] if isinstance(data, bytes) else list(data)
    where = [parts[0][0]]                 # the file being read

    def report(location, severity, message, code=None):
        source, line = location if isinstance(location, tuple) else (where[0], location)
        diagnostics.append(Diagnostic(source, line, severity, message, code=code))

    problem = unit_name_problem(name)
    if problem:
        report((path, 1), "error", problem)
        return None, diagnostics
    if context is None:
        context = specifier_context()
    texts = []
    for part_path, part_data in parts:
        where[0] = part_path
        text = _unit_text(part_data, report)
        if text is None:
            return None, diagnostics
        texts.append((part_path, text))
    return _parse_texts(name, path, blob, texts, context, report, where, diagnostics)


def _unit_text(data, report):
    """The text of one unit file, or None (with the error reported)."""
    if len(data) > MAX_UNIT_FILE_BYTES:
        report(1, "error", "file is %d bytes; unit files are limited to %d" % (len(data), MAX_UNIT_FILE_BYTES))
        return None
    if b"\0" in data:
        report(data.count(b"\n", 0, data.index(b"\0")) + 1, "error", "file contains NUL bytes: not a text unit file")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        report(data.count(b"\n", 0, exc.start) + 1, "error", "not UTF-8 text (byte %d)" % exc.start)
        return None
    return text[1:] if text.startswith("\ufeff") else text


def _parse_texts(name, path, blob, texts, context, report, where, diagnostics):
    values, warned_sections, not_applied = {}, set(), []
    lines_of = {"exec_start": (texts[0][0], 1)}     # where a whole-unit problem is reported
    for part_path, text in texts:
        where[0] = part_path
        _read_lines_into(values, lines_of, not_applied, warned_sections, name, text, context, report, part_path)
    _validate_unit(values, lines_of, report)
    if any(d.severity == "error" for d in diagnostics):
        return None, diagnostics
    if not_applied:
        values["not_applied"] = tuple(not_applied)
    if values.get("permissions_start_only"):
        # As systemd: User= and the sandbox are for ExecStart= alone; the
        # other commands run with the daemon's privileges, as with '+'.
        for field in EXEC_FIELDS:
            if field != "exec_start" and values.get(field):
                values[field] = tuple(ExecCommand(c.program, c.argv, c.ignore_failure, "+", c.expand)
                                      for c in values[field])
    spec = UnitSpec(name, path, blob, **values)
    spec.sources = tuple(part for part, _ in texts)
    return spec, diagnostics


def _read_lines_into(values, lines_of, not_applied, warned_sections, name, text, context, report, part_path):
    """One file's assignments, on top of what earlier files set (a drop-in
    starts with no section, as in systemd)."""
    section = None
    for line_number, line in _logical_lines(text):
        if line.startswith("["):
            if not line.endswith("]"):
                report(line_number, "error", "section header %r lacks its closing ']'" % line)
                section = None
                continue
            section = line[1:-1].strip()
            if section == "Service" and "exec_start" not in values:
                lines_of["exec_start"] = (part_path, line_number)
            if section not in KNOWN_SECTIONS and not section.startswith("X-") and section not in warned_sections:
                warned_sections.add(section)
                report(line_number, "warning", "unknown section [%s], ignored" % section)
            continue
        key, equals, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not equals:
            report(line_number, "warning", "line has no '=', ignored")
            continue
        if section is None:
            report(line_number, "warning", "%s= outside any section, ignored" % key)
            continue
        if section not in ("Unit", "Service"):
            continue     # [Install], X- and unknown sections: accepted and ignored
        directive = DIRECTIVES.get((section, key))
        if directive is not None and _value_not_applied(key, value):
            directive = None              # reported below, as a key not applied
        if directive is None and not value and key.startswith(("Condition", "Assert")) and key in NOT_APPLIED_KEYS:
            _reset_conditions(values, key)
            continue
        if directive is None:
            if (key in NOT_APPLIED_KEYS or key in NOT_APPLIED_VALUES) and value and not _asks_for_nothing(key, value):
                not_applied.append((key, value))
                report(line_number, "warning", "not applied: %s=%s (%s)" % (key, value, not_applied_reason(key, value)))
            elif section == "Service" and key == "ConditionHost":
                # ignored by systemd, but a fleet's unit would then run on every host
                report(line_number, "error", "ConditionHost= belongs in [Unit]: in [Service] it would be ignored, "
                       "and the unit would run on every host")
            elif not key.startswith("X-") and (section, key) not in SILENT_KEYS and key not in NOT_APPLIED_KEYS:
                report(line_number, "warning", unknown_key_message(section, key), code="key")
            continue
        field, parse, kind = directive
        if field in _SPECIFIER_FIELDS:
            value, unknown = expand_specifiers(value, name, context)
            for specifier in unknown:
                if specifier in ("%Y", "%y"):
                    report(line_number, "error", "%s=: %s names the unit's folder, and a unit at the repository's "
                           "root owns none: put it in a folder of its own (web/web.service)" % (key, specifier))
                else:
                    report(line_number, "warning", "%s=: specifier %s is not supported, kept as written" % (key, specifier))
        fields = field if isinstance(field, tuple) else (field,)     # TimeoutSec= sets two
        if not value and field in ("capability_bounding_set", "ambient_capabilities"):
            values[field] = ((None, ()),)  # as systemd: the empty assignment is the empty set
            lines_of[field] = (part_path, line_number)
            continue
        if not value and field in ("conditions", "condition_host"):
            _reset_conditions(values, key)
            continue
        if not value:
            for one in fields:
                values.pop(one, None)
                lines_of[one] = (part_path, line_number)
            continue
        try:
            parsed = parse(value)
        except IgnoredValue as exc:
            report(line_number, "warning", "%s=: %s" % (key, exc))
            continue
        except ValueError as exc:
            report(line_number, "error", "%s=: %s" % (key, exc))
            continue
        if field == "type" and value in TYPES_RUN_AS_SIMPLE:
            report(line_number, "warning", "Type=%s runs as Type=simple%s" % (
                value, ": BusName= is not waited for" if value == "dbus" else ""))
        ignored = [name for name in other_unit_names(value) if not name.endswith((SOCKET_SUFFIX, TIMER_SUFFIX))]
        if parse is _parse_unit_names and ignored:    # (sockets listen, and timers are armed, before units start)
            report(line_number, "warning", "%s=: %s not a service; other unit types are accepted and ignored" % (
                key, ", ".join(ignored) + (" is" if len(ignored) == 1 else " are")))
        for one in fields:
            values[one] = values.get(one, ()) + parsed if kind == "list" else parsed
            lines_of[one] = (part_path, line_number)


def _reset_conditions(values, key):
    """An empty Condition*= resets every Condition (ConditionHost= too), an
    empty Assert*= every Assert, as in systemd."""
    kind = "Assert" if key.startswith("Assert") else "Condition"
    values["conditions"] = tuple(c for c in values.get("conditions", ()) if not c[0].startswith(kind))
    if kind == "Condition":
        values.pop("condition_host", None)


def _is_off(value):
    """A boolean that says no: the key then asks for nothing (PrivateTmp=false)."""
    return value.strip().lower() in ("0", "no", "false", "off", "n", "f")


def _validate_unit(values, lines_of, report):
    """Checks across keys, once the whole file is read."""
    commands = values.get("exec_start", ())
    if not commands:
        report(lines_of["exec_start"], "error", "missing ExecStart=: a service needs a command to run")
    elif len(commands) > 1 and values.get("type", "simple") != "oneshot":
        report(lines_of["exec_start"], "error",
               "%d ExecStart= commands: only Type=oneshot may have more than one" % len(commands))
    if values.get("type") == "oneshot" and values.get("restart") in ("always", "on-success"):
        report(lines_of["restart"], "error", "Restart=%s is not allowed with Type=oneshot (use on-failure)" % values["restart"])
    if values.get("pid_file") and values.get("type", "simple") != "forking":
        report(lines_of["pid_file"], "warning", "PIDFile= is read for Type=forking only: the main process "
               "of this unit is the one gitproc starts (the file is removed once it stopped, as systemd does)")
    if values.get("reload_on_file_change") and not values.get("exec_reload") and values.get("type") != "notify-reload":
        report(lines_of["reload_on_file_change"], "warning", "ReloadOnFileChange=yes without ExecReload=: "
               "a change of the unit's files restarts it")
    if values.get("start_limit_burst", 1) < 1:
        report(lines_of["start_limit_burst"], "error", "StartLimitBurst= must be at least 1")
    if values.get("dynamic_user"):   # what systemd.exec(5) says DynamicUser= implies
        values.update(private_tmp=True, remove_ipc=True, no_new_privileges=True, restrict_suid_sgid=True)
        values["protect_system"] = "strict"
        if values.get("protect_home", "no") == "no":
            values["protect_home"] = "read-only"
    if values.get("standard_input_data") and "standard_input" not in values:
        values["standard_input"] = ("data", None)         # as systemd: the data is the input
    if values.get("standard_input", ("null",))[0] == "data" and not values.get("standard_input_data"):
        report(lines_of["standard_input"], "error", "StandardInput=data needs StandardInputText= or StandardInputData=")
    if values.get("standard_input", ("null",))[0] == "socket" and "standard_output" not in values:
        values["standard_output"] = ("inherit", None)     # as systemd: the output goes to the connection too
    for field, key in (("restart_sec", "RestartSec"), ("health_check_interval", "HealthCheckInterval"),
                       ("health_check_timeout", "HealthCheckTimeout")):
        if values.get(field) == float("inf"):
            report(lines_of[field], "error", "%s= cannot be infinity" % key)


def check_unit_tree(entries, cache=None, problems=(), context=None, folders=None, files_dir=None):
    """Parse many units: entries are (name, path, data, blob), data the bytes
    of the file or [(path, bytes)] of its sources (see compose_units).
    Returns ({name: UnitSpec}, [Diagnostic]); duplicate names are all
    rejected; `problems` (of composing the tree) come first. With a `cache`
    ({(path, blob): parse result}), a unit already parsed is not parsed
    again (its data may then be None), and new results are added to it.
    `folders` ({folder: OwnedFolder}) gives units their owned folder: %Y is
    then files_dir/NAME, the link to its snapshot (or, without files_dir,
    the folder itself), and %y the unit file in it."""
    paths_of = {}
    for name, path, _, _ in entries:
        paths_of.setdefault(name, []).append(path)
    specs, diagnostics = {}, list(problems)
    if context is None:
        context = specifier_context()
    for name, path, data, blob in entries:
        if name.endswith((TIMER_SUFFIX, SOCKET_SUFFIX, TEMPLATE_SUFFIX)):
            continue                      # read by check_activators, or a template
        if len(paths_of[name]) > 1:
            others = ", ".join(p for p in paths_of[name] if p != path)
            diagnostics.append(Diagnostic(path, 1, "error", "unit name %r is also defined in %s: both are rejected" % (name, others)))
            continue
        owned = (folders or {}).get(os.path.dirname(path))
        parsed = cache.get((path, blob)) if cache is not None and blob else None
        if parsed is None:
            unit_context = context
            if owned is not None:
                place = os.path.join(files_dir, name) if files_dir else owned.path
                unit_context = dict(context, Y=place, y=os.path.join(place, os.path.basename(path)))
            parsed = parse_unit(name, path, data, blob, unit_context)
        if parsed[0] is not None:
            parsed = (parsed[0].with_owned(owned), parsed[1])
        if cache is not None and blob:
            cache[(path, blob)] = parsed
        spec, found = parsed
        for diagnostic in found:
            diagnostic.unit = name
        diagnostics.extend(found)
        if spec is not None:
            specs[name] = spec
    for cycle in dependency_cycles(specs):
        for name in cycle:
            diagnostics.append(Diagnostic(specs[name].path, 1, "error", "ordering cycle: %s (After=/Requires=/Before=); "
                                          "none of these units is deployed" % " -> ".join(cycle + [cycle[0]])))
        for name in cycle:
            del specs[name]
    return specs, diagnostics


def ordering_edges(specs):
    """{name: the names among `specs` it starts after}: its After= and
    Requires=, and every unit that names it in Before=."""
    edges = {name: {d for d in spec.after + spec.requires if d in specs} for name, spec in specs.items()}
    for name, spec in specs.items():
        for later in spec.before:
            if later in edges:
                edges[later].add(name)
    return edges


def dependency_cycles(specs):
    """The groups of units that wait for each other through After=/Requires=
    /Before= (strongly connected components of more than one unit, or a unit
    naming itself), each in name order. Iterative Tarjan: no recursion limit."""
    edges = {name: sorted(deps) for name, deps in ordering_edges(specs).items()}
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, position = work.pop()
            if position == 0:
                index[node] = low[node] = counter[0]
                counter[0] += 1
                stack.append(node)
                on_stack.add(node)
            if position < len(edges[node]):
                work.append((node, position + 1))
                target = edges[node][position]
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    cycles.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return cycles


def load_environment_file(path):
    """KEY=VALUE lines of an EnvironmentFile=, comments and quotes as systemd reads them."""
    pairs = []
    with open(path, encoding="utf-8", errors="replace") as env_file:
        for line in env_file.read().replace("\\\n", "").splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("export "):
                line = line[7:].lstrip()
            name, equals, value = line.partition("=")
            name, value = name.strip(), value.strip()
            if not equals or not _ENV_NAME_RE.match(name):
                continue
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
                if line.partition("=")[2].strip()[0] == '"':
                    value = _unescape(value)
            pairs.append((name, value))
    return pairs


# ---- templates, drop-ins and specifiers ------------------------------------------
# A tree's unit files become units (systemd.unit(5)): NAME.service is one;
# NAME@.service is a template, and NAME@INSTANCE.service an instance of it
# when it is a symlink to the template (as `systemctl enable` makes) or empty;
# NAME.service.d/*.conf (and NAME@.service.d/*.conf for every instance) are
# read after the unit in file-name order, a drop-in of the same name in the
# instance's own folder replacing the template's. A unit's sources are its
# file (or its template) and those drop-ins; `blob` joins their object ids,
# so a change to any of them is a change of the unit.

UNIT_SUFFIXES = (UNIT_SUFFIX, ".timer", ".socket")       # the unit types gitproc runs
DROP_IN_SUFFIXES = tuple(suffix + ".d" for suffix in UNIT_SUFFIXES)
TEMPLATE_SUFFIX = "@" + UNIT_SUFFIX   # a service template's entry (see compose_units)


# Unit types gitproc does not run. Each is named wherever the repository's
# units are (check, sync, status), and the service it would activate is not
# started by a deploy (SPEC §16): it starts with `start`, or when a started
# unit pulls it in.
OTHER_UNIT_TYPES = {".path": ("Path", "Unit", "path units"), ".mount": None, ".automount": None, ".swap": None,
                    ".slice": None, ".scope": None, ".target": None, ".device": None}


def other_unit_problems(path, text):
    """The notes of a unit file of a type gitproc does not run: a warning
    naming it, and (code "activated", unit the service's name) the service
    it activates, which a deploy leaves stopped."""
    name = os.path.basename(path)
    stem, suffix = os.path.splitext(name)
    kind = OTHER_UNIT_TYPES.get(suffix)
    if kind is None:
        return [Diagnostic(path, 1, "warning", "%s is not run by gitproc (%s units are not supported)" % (
            name, suffix[1:]), code="other-unit")]
    section_name, key, what = kind
    target, section, accept = stem + UNIT_SUFFIX, None, False
    for _, line in _logical_lines(text):
        if line.startswith("["):
            section = line.strip("[]").strip()
        elif section == section_name:
            field, _, value = line.partition("=")
            if field.strip() == key and value.strip():
                target = value.strip()
            elif field.strip() == "Accept":
                try:
                    accept = parse_bool(value)
                except ValueError:
                    accept = False
    if section_name == "Socket" and accept:
        target = stem + "@" + UNIT_SUFFIX
    service = _strip_suffix(target, UNIT_SUFFIX)
    message = "%s is not run by gitproc (%s are not supported yet)" % (name, what)
    if "@" in stem and stem.endswith("@") or not target.endswith(UNIT_SUFFIX) or service.endswith("@"):
        return [Diagnostic(path, 1, "warning", message, code="other-unit")]
    return [Diagnostic(path, 1, "warning", "%s: %s, which it activates, is not started at deploy (start it with "
                       "`start %s`)" % (message, target, service), unit=service, code="activated")]


def is_other_unit(path):
    return os.path.splitext(path)[1] in OTHER_UNIT_TYPES


def is_unit_source(path):
    """Whether a file of the tree is read as a unit: NAME.service, or a
    drop-in NAME.service.d/*.conf."""
    return path.endswith(UNIT_SUFFIXES) or (path.endswith(".conf") and os.path.dirname(path).endswith(DROP_IN_SUFFIXES))


class OwnedFolder:
    """The folder a unit owns in one commit (SPEC §13): the folder of its
    unit file, everything below it included; a unit at the repository's
    root owns none. `tree`, the folder's Git tree id, names its snapshot;
    `size` and `count` are of the files in it, once measured."""
    __slots__ = ("path", "tree", "size", "count")

    def __init__(self, path, tree):
        self.path, self.tree, self.size, self.count = path, tree, None, None

    def __eq__(self, other):
        return isinstance(other, OwnedFolder) and (self.path, self.tree) == (other.path, other.tree)

    def __hash__(self):
        return hash((self.path, self.tree))


def compose_units(files, link_target, lone_templates=False):
    """files: (path, is_symlink, size, object id) of the unit files
    (*.service, *.timer, *.socket) and their drop-ins of a tree;
    link_target(object id) -> a symlink's target. Returns ([(name, path,
    [(source path, object id)], blob)], [Diagnostic]), a service named
    without its suffix, the others with it (web, web.timer, web.socket), and
    every service template also with it (web@.service: what a socket with
    Accept=yes makes its instances of). Pure apart from link_target.
    `lone_templates` (for check): a template without an instance is also
    read as one whose instance name is empty."""
    units, templates, instances, drop_ins, problems = [], {}, [], {}, []
    for path, is_link, size, object_id in files:
        base, folder = os.path.basename(path), os.path.basename(os.path.dirname(path))
        if folder.endswith(DROP_IN_SUFFIXES) and base.endswith(".conf"):
            if not is_link:
                drop_ins.setdefault(folder[:-len(".d")], {})[base] = (path, object_id)
            continue
        stem, suffix = os.path.splitext(base)
        if suffix not in UNIT_SUFFIXES:
            continue
        name = stem if suffix == UNIT_SUFFIX else base
        template = stem.partition("@")[0] + "@" + suffix
        if "@" in stem and not stem.endswith("@") and (size == 0 or (
                is_link and os.path.basename(link_target(object_id)) == template)):
            instances.append((name, path, template))
        elif is_link:                     # an alias, or a link to a unit elsewhere: not read
            problems.append(Diagnostic(path, 1, "warning", "a symlink: not read (only an instance may be a link to "
                                                           "its template; commit the unit file itself)"))
        elif stem.endswith("@"):
            templates.setdefault(base, (name, path, object_id))
        else:
            units.append((name, path, [(path, object_id)]))
    for name, path, template in instances:
        if template not in templates:
            problems.append(Diagnostic(path, 1, "error", "%s is an instance of %s, which is not in the repository" % (
                os.path.basename(path), template)))
            continue
        units.append((name, path, [templates[template][1:]]))
    units += [(base, path, [(path, object_id)]) for base, (_, path, object_id) in sorted(templates.items())
              if base.endswith(UNIT_SUFFIX)]
    if lone_templates:
        instantiated = {template for _, _, template in instances}
        units += [(name, path, [(path, object_id)]) for base, (name, path, object_id) in sorted(templates.items())
                  if base not in instantiated]
    composed = []
    for name, path, sources in units:
        base = os.path.basename(path)
        stem, suffix = os.path.splitext(base)
        found = dict(drop_ins.get(stem.partition("@")[0] + "@" + suffix, {})) if "@" in stem else {}
        found.update(drop_ins.get(base, {}))
        sources = sources + [found[conf] for conf in sorted(found)]
        composed.append((name, path, sources, "+".join(object_id for _, object_id in sources)))
    return composed, problems


def specifier_context(config=None):
    """The values of the specifiers that come from the machine and the
    daemon's user (systemd.unit(5) "Specifiers"): root's paths for a root
    daemon, the XDG ones otherwise."""
    import pwd
    uid = os.geteuid()
    try:
        entry = pwd.getpwuid(uid)
        user, home, shell, gid = entry.pw_name, entry.pw_dir, entry.pw_shell, entry.pw_gid
    except KeyError:
        user, home, shell, gid = str(uid), "/", "/bin/sh", os.getegid()
    home = os.environ.get("HOME") or home  # as systemd's manager: $HOME first, then the user database
    try:
        import grp
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    host = socket.gethostname()
    if uid == 0:
        paths = {"t": "/run", "S": "/var/lib", "C": "/var/cache", "L": "/var/log", "E": "/etc"}
    else:
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
        paths = {"t": os.environ.get("XDG_RUNTIME_DIR") or "/run/user/%d" % uid, "S": state,
                 "C": os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"),
                 "L": os.path.join(state, "log"), "E": os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")}
    paths.update({"H": host, "l": host.split(".")[0], "u": user, "U": str(uid), "g": group, "G": str(gid),
                  "h": home, "s": shell, "T": os.environ.get("TMPDIR") or "/tmp", "V": "/var/tmp"})
    return paths


def unescape_unit_name(text):
    """systemd's unescaping of a name part (%I, %J, %f): '-' is '/', \\xNN a byte."""
    text = text.replace("-", "/")
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


# ---- calendar times (SPEC §17) ---------------------------------------------------
# OnCalendar= as systemd.time(7) writes it, read and stepped as systemd 252
# does (calendarspec.c): a spec is six fields (year, month, day, hour,
# minute, and second in microseconds), each a list of (start, stop, step)
# ranges or None for '*', plus the weekdays and a time zone. The next elapse
# moves a broken-down time forward field by field, from the year down, and
# normalises it at each step as mktime(3) does: a day 31 that a month lacks
# rolls over, and a local time that a DST change skips is read with the
# offset before the change (zoneinfo's fold=0, glibc's choice too). Pure:
# the clock is passed in, and no TZ variable is ever set.

CALENDAR_MIN_YEAR, CALENDAR_MAX_YEAR = 1970, 2199
CALENDAR_MAX_COMPONENTS = 240
_WEEKDAY_NAMES = (("monday", 0), ("mon", 0), ("tuesday", 1), ("tue", 1), ("wednesday", 2), ("wed", 2),
                  ("thursday", 3), ("thu", 3), ("friday", 4), ("fri", 4), ("saturday", 5), ("sat", 5),
                  ("sunday", 6), ("sun", 6))
_ALL_WEEKDAYS = 127
_USEC = 1000000
# The shorthands: field -> its one value (or values); the others are '*'.
_MIDNIGHT = {"hour": (0,), "minute": (0,), "second": (0,)}
CALENDAR_SHORTHANDS = {
    "minutely": {"second": (0,)}, "hourly": {"minute": (0,), "second": (0,)}, "daily": _MIDNIGHT,
    "weekly": dict(_MIDNIGHT, weekdays=1), "monthly": dict(_MIDNIGHT, day=(1,)),
    "yearly": dict(_MIDNIGHT, month=(1,), day=(1,)), "annually": dict(_MIDNIGHT, month=(1,), day=(1,)),
    "anually": dict(_MIDNIGHT, month=(1,), day=(1,)),
    "quarterly": dict(_MIDNIGHT, month=(1, 4, 7, 10), day=(1,)),
    "semiannually": dict(_MIDNIGHT, month=(1, 7), day=(1,)), "semi-annually": dict(_MIDNIGHT, month=(1, 7), day=(1,)),
    "biannually": dict(_MIDNIGHT, month=(1, 7), day=(1,)), "bi-annually": dict(_MIDNIGHT, month=(1, 7), day=(1,)),
}
_CALENDAR_FIELDS = ("year", "month", "day", "hour", "minute", "second")
_FIELD_RANGES = {"year": (CALENDAR_MIN_YEAR, CALENDAR_MAX_YEAR), "month": (1, 12), "day": (1, 31),
                 "hour": (0, 23), "minute": (0, 59), "second": (0, 60 * _USEC - 1)}


class CalendarSpec:
    """One OnCalendar= expression, parsed: `fields` maps year ... second to a
    sorted tuple of (start, stop, step) (stop -1: none; the second in
    microseconds) or None for any; `weekdays` a bit mask (Monday = 1) or
    None; `end_of_month` for '~' days; `zone` None (local time), "UTC" or an
    IANA name. Built by parse_calendar."""
    __slots__ = ("text", "fields", "weekdays", "end_of_month", "zone")

    def __init__(self, text, fields, weekdays, end_of_month, zone):
        self.text, self.fields, self.weekdays = text, fields, weekdays
        self.end_of_month, self.zone = end_of_month, zone

    def __eq__(self, other):
        return isinstance(other, CalendarSpec) and self.normalized() == other.normalized()

    def __hash__(self):
        return hash(self.normalized())

    def __repr__(self):
        return "CalendarSpec(%r)" % self.normalized()

    def normalized(self):
        """The expression as systemd-analyze calendar prints it ("Normalized form")."""
        parts = []
        if self.weekdays is not None:
            parts.append(_format_weekdays(self.weekdays) + " ")
        for field, width, after in (("year", 4, "-"), ("month", 2, "~" if self.end_of_month else "-"),
                                    ("day", 2, " "), ("hour", 2, ":"), ("minute", 2, ":"), ("second", 2, "")):
            parts.append(_format_chain(self.fields[field], width, field == "second") + after)
        if self.zone:
            parts.append(" " + self.zone)
        return "".join(parts)


def _format_weekdays(bits):
    names = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
    runs, day = [], 0
    while day < 7:
        if bits & (1 << day):
            end = day
            while end + 1 < 7 and bits & (1 << (end + 1)):
                end += 1
            runs.append(names[day] if end == day else names[day] + ("," if end == day + 1 else "..") + names[end])
            day = end + 1
        else:
            day += 1
    return ",".join(runs)


def _format_chain(chain, width, usec):
    unit = _USEC if usec else 1
    if chain is None or (usec and chain == ((0, -1, _USEC),)):
        return "*"

    def number(value):
        text = "%0*d" % (width, value // unit)
        return text + (".%06d" % (value % unit) if value % unit else "")
    words = []
    for start, stop, step in chain:
        word = number(start)
        if stop > 0:
            word += ".." + number(stop)
        if step > 0 and not (stop > 0 and step == unit):
            word += "/%d" % (step // unit) + (".%06d" % (step % unit) if step % unit else "")
        words.append(word)
    return ",".join(words)


def parse_calendar(text):
    """OnCalendar= text -> CalendarSpec; ValueError (saying what is wrong) for
    what systemd 252 rejects."""
    original, rest, zone = text, text.strip(), None
    if rest.lower().endswith(" utc"):
        rest, zone = rest[:-4], "UTC"
    elif " " in rest:
        head, _, last = rest.rpartition(" ")
        if _zone(last) is not None:
            rest, zone = head, "UTC" if last == "UTC" else last
    if not rest:
        raise ValueError("%r: no date or time before the time zone" % original)
    shorthand = CALENDAR_SHORTHANDS.get(rest.lower())
    if shorthand is not None:
        fields = {field: None for field in _CALENDAR_FIELDS}
        fields.update({field: tuple((value if field != "second" else value * _USEC, -1, 0) for value in values)
                       for field, values in shorthand.items() if field != "weekdays"})
        weekdays, end_of_month = shorthand.get("weekdays"), False
    else:
        reader = _CalendarReader(rest)
        try:
            weekdays, fields, end_of_month = reader.read()
            zone = "UTC" if reader.utc else zone
        except (ValueError, IndexError) as exc:
            raise ValueError("%r is not a calendar time: %s (e.g. daily, Mon *-*-* 06:00, *:0/15)" % (
                original, exc if isinstance(exc, ValueError) and str(exc) else "unexpected end"))
    if weekdays is not None and (weekdays <= 0 or weekdays >= _ALL_WEEKDAYS):
        weekdays = None
    if end_of_month and fields["day"] is None:
        end_of_month = False
    if fields["year"] is not None:          # two-digit years: 12 is 2012, 89 is 1989
        fields["year"] = tuple((_full_year(start), _full_year(stop), step) for start, stop, step in fields["year"])
    for field in _CALENDAR_FIELDS:
        if fields[field] is not None:
            fields[field] = _normalize_chain(fields[field])
            low, high = _FIELD_RANGES[field]
            problem = _chain_problem(fields[field], low, high, field == "day" and end_of_month)
            if problem:
                raise ValueError("%r: the %s %s" % (original, field, problem))
    return CalendarSpec(original.strip(), fields, weekdays, end_of_month, zone)


def _full_year(year):
    return year + 2000 if 0 <= year < 70 else year + 1900 if 70 <= year < 100 else year


def _normalize_chain(chain):
    """Sorted, without duplicates, each range's end cut to a whole number of
    steps (a range left with one value is that value)."""
    cut = set()
    for start, stop, step in chain:
        if stop > start and step > 0:
            stop -= (stop - start) % step
        cut.add((start, -1, 0) if stop == start else (start, stop, step))
    return tuple(sorted(cut))


def _chain_problem(chain, low, high, end_of_month):
    """Why a field's ranges are out of bounds (systemd's checks), or None."""
    for start, stop, step in chain:
        if end_of_month:
            high -= 3               # no more than 28 days back; as systemd 252, 3 fewer at each later value
        if not low <= start <= high:
            return "%d is out of range (%d..%d)" % (start, low, high)
        if step > high - low:
            return "step %d is too large" % step
        if stop >= 0:
            if not low <= stop <= high:
                return "%d is out of range (%d..%d)" % (stop, low, high)
            if start + step > stop:
                return "range %d..%d/%d never repeats" % (start, stop, step)
        elif (start - step < low) if end_of_month else (start + step > high):
            return "%d/%d never repeats" % (start, step)
    return None


class _CalendarReader:
    """The weekday, date and time parts of an expression (systemd.time(7)
    "Calendar Events"), read left to right as systemd reads them."""

    def __init__(self, text):
        self.text, self.pos = text, 0
        self.utc = False                  # an @TIMESTAMP is a time in UTC

    def peek(self, offset=0):
        at = self.pos + offset
        return self.text[at] if at < len(self.text) else ""

    def read(self):
        weekdays = self._weekdays()
        fields = {field: None for field in _CALENDAR_FIELDS}
        end_of_month = False
        if self.peek() == "@":
            stamp = self._number()[0] if self._skip("@") else 0
            moment = time.gmtime(stamp)
            fields.update(year=((moment.tm_year, -1, 0),), month=((moment.tm_mon, -1, 0),),
                          day=((moment.tm_mday, -1, 0),), hour=((moment.tm_hour, -1, 0),),
                          minute=((moment.tm_min, -1, 0),), second=((moment.tm_sec * _USEC, -1, 0),))
            if self.pos != len(self.text):
                raise ValueError("text after the @timestamp")
            self.utc = True
            return weekdays, fields, False
        end_of_month = self._date(fields)
        self._time(fields)
        if self.pos != len(self.text):
            raise ValueError("unexpected %r" % self.text[self.pos:])
        return weekdays, fields, end_of_month

    def _skip(self, char):
        if self.peek() == char:
            self.pos += 1
            return True
        return False

    def _skip_spaces(self):
        while self.peek() == " ":
            self.pos += 1

    def _weekdays(self):
        bits, range_from, first = 0, -1, True
        while True:
            lower = self.text[self.pos:].lower()
            for name, number in _WEEKDAY_NAMES:
                if lower.startswith(name):
                    break
            else:
                if first:
                    return None
                raise ValueError("a weekday list must end in a weekday")
            self.pos += len(name)
            if self.peek() not in ("", "-", ".", ",", " "):
                raise ValueError("unknown weekday %r" % self.text[self.pos - len(name):].split(" ")[0])
            bits |= 1 << number
            if range_from >= 0:
                if range_from > number:
                    raise ValueError("weekday range backwards")
                for day in range(range_from + 1, number):
                    bits |= 1 << day
            if self.peek() == "":
                return bits
            if self.peek() == " ":
                self._skip_spaces()
                return bits
            if self.peek() == ".":
                if range_from >= 0 or self.peek(1) != ".":
                    raise ValueError("bad weekday range")
                range_from = number
                self.pos += 2
            elif self.peek() == "-":
                if range_from >= 0:
                    raise ValueError("bad weekday range")
                range_from = number
                self.pos += 1
            elif self.peek() == ",":
                range_from = -1
                self.pos += 1
            if self.peek() in ("", " "):
                self._skip_spaces()
                if range_from >= 0:
                    raise ValueError("open weekday range")
                return bits
            first = False

    def _number(self, usec=False):
        start = self.pos
        while self.peek().isdigit():
            self.pos += 1
        if self.pos == start:
            raise ValueError("a number was expected at %r" % self.text[start:] if start < len(self.text) else "")
        value = int(self.text[start:self.pos])
        if usec:
            value *= _USEC
            if self.peek() == "." and self.peek(1) != ".":
                self.pos += 1
                digits = ""
                while self.peek().isdigit():
                    digits += self.peek()
                    self.pos += 1
                value += int((digits + "000000")[:6])
        if value > 2 ** 31 - 1:
            raise ValueError("number too large")
        return value, start

    def _chain(self, usec=False):
        """'*' (None; for seconds, every whole second) or a list of ranges."""
        if self._skip("*"):
            return ((0, -1, _USEC),) if usec else None
        chain = []
        while True:
            if len(chain) > CALENDAR_MAX_COMPONENTS:
                raise ValueError("too many values")
            start, _ = self._number(usec)
            stop, step = -1, 0
            if self.peek() == "." and self.peek(1) == ".":
                self.pos += 2
                stop = self._number(usec)[0]
                step = _USEC if usec else 1
            if self._skip("/"):
                step = self._number(usec)[0]
                if step == 0:
                    raise ValueError("a repetition of 0")
            if self.peek() not in ("", " ", ",", "-", "~", ":"):
                raise ValueError("unexpected %r" % self.peek())
            chain.append((start, stop, step))
            if not self._skip(","):
                return tuple(chain)

    def _date(self, fields):
        """[[YEAR-]MONTH-]DAY, or nothing (a time alone). True for '~'."""
        if self.pos == len(self.text):
            return False
        begin = self.pos
        first = self._chain()
        if self.peek() in ("", ":"):
            self.pos = begin                # a time, not a date
            return False
        end_of_month = self.peek() == "~"
        if not end_of_month and self.peek() != "-":
            raise ValueError("unexpected %r" % self.peek())
        self.pos += 1
        second = self._chain()
        if self.peek() in ("", " "):
            self._skip_spaces()
            fields["month"], fields["day"] = first, second
            return end_of_month
        if end_of_month:
            raise ValueError("'~' must come before the day")
        end_of_month = self.peek() == "~"
        if not end_of_month and self.peek() != "-":
            raise ValueError("unexpected %r" % self.peek())
        self.pos += 1
        third = self._chain()
        if self.peek() not in ("", " "):
            raise ValueError("unexpected %r" % self.peek())
        self._skip_spaces()
        fields["year"], fields["month"], fields["day"] = first, second, third
        return end_of_month

    def _time(self, fields):
        """HOUR:MINUTE[:SECOND], or nothing (midnight)."""
        if self.pos == len(self.text):
            fields["hour"] = fields["minute"] = fields["second"] = ((0, -1, 0),)
            return
        fields["hour"] = self._chain()
        if not self._skip(":"):
            raise ValueError("a time is HH:MM or HH:MM:SS")
        fields["minute"] = self._chain()
        if self.pos == len(self.text):
            fields["second"] = ((0, -1, 0),)
            return
        if not self._skip(":"):
            raise ValueError("a time is HH:MM or HH:MM:SS")
        fields["second"] = self._chain(usec=True)


_ZONES = {}                            # name -> ZoneInfo or None (not a zone)


def _zone(name):
    """The zoneinfo of an IANA name (cached), or None if there is no such zone."""
    if name not in _ZONES:
        try:
            import zoneinfo
            _ZONES[name] = zoneinfo.ZoneInfo(name) if name and not name.startswith(("/", ".")) else None
        except (ImportError, ValueError, OSError):
            _ZONES[name] = None
        except Exception:               # zoneinfo.ZoneInfoNotFoundError is a KeyError
            _ZONES[name] = None
    return _ZONES[name]


def local_zone():
    """The machine's time zone, as zoneinfo: $TZ, else /etc/localtime, else UTC."""
    import zoneinfo
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        found = _zone(name)
        if found is not None:
            return found
    try:
        with open("/etc/localtime", "rb") as data:
            return zoneinfo.ZoneInfo.from_file(data, key="localtime")
    except (OSError, ValueError):
        return _zone("UTC")


class _BrokenDownTime:
    """struct tm of one instant in one zone, and mktime(3) of it: fields may
    be out of range, normalize() carries them over as mktime does."""
    __slots__ = ("fields", "zone")

    def __init__(self, fields, zone):
        self.fields, self.zone = fields, zone      # [year, month (1-12), day, hour, minute, second]

    def stamp(self):
        """mktime: the epoch second of the (possibly out of range) fields; a
        local time a DST change skips is read with the offset before it."""
        import datetime
        year, month, day, hour, minute, second = self.fields
        year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
        if not 1 <= year <= 9998:
            raise OverflowError("year %d" % year)
        naive = datetime.datetime(year, month, 1) + datetime.timedelta(days=day - 1, hours=hour, minutes=minute,
                                                                        seconds=second)
        if self.zone is None:
            return int((naive - datetime.datetime(1970, 1, 1)).total_seconds())
        return int(naive.replace(tzinfo=self.zone, fold=0).timestamp())

    def normalized(self):
        """The fields mktime leaves: those of the instant the fields name."""
        return _fields_at(self.stamp(), self.zone)


def _fields_at(stamp, zone):
    import datetime
    if zone is None:
        moment = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=stamp)
    else:
        moment = datetime.datetime.fromtimestamp(stamp, zone)
    return [moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second]


def _weekday_of(fields, zone):
    import datetime
    normal = _BrokenDownTime(list(fields), zone).normalized()
    return datetime.date(normal[0], normal[1], normal[2]).weekday()     # Monday = 0


def next_elapse(spec, after, local=None):
    """The first time (epoch seconds, a float) strictly after `after` that
    `spec` names, or None if there is none before 2200. `local`: the
    zoneinfo for specs in local time (default: this machine's)."""
    zone = None if spec.zone == "UTC" else _zone(spec.zone) if spec.zone else (local or local_zone())
    try:
        stamp, micro = divmod(int(round(after * _USEC)) + 1, _USEC)
        found = _find_next(spec, _fields_at(stamp, zone), micro, zone)
        if found is None:
            return None
        fields, micro = found
        return _BrokenDownTime(fields, zone).stamp() + micro / _USEC
    except (OverflowError, ValueError, OSError):      # a time before 1970 or past 9999: none
        return None


def _match(chain, value, spec=None, fields=None, zone=None):
    """The first value >= `value` a field's ranges allow: (moved, value), or
    None when none is left in this field's range. For '~' days, the ranges
    count back from the end of the month of `fields`."""
    if chain is None:
        return False, value
    best = None
    for start, stop, step in chain:
        if spec is not None:                 # end of month: the Nth last day of this month
            start, stop = _day_from_end(fields, zone, start), _day_from_end(fields, zone, stop)
            if stop > 0:
                start, stop = stop, start
        if start >= value:
            candidate = start
        elif step > 0:
            candidate = start + step * -(-(value - start) // step)
            if stop >= 0 and candidate > stop:
                continue
        else:
            continue
        if best is None or candidate < best:
            best = candidate
    if best is None:
        return None
    return best != value, best


def _day_from_end(fields, zone, back):
    """The day of the month of `fields` that is `back` - 1 days before its
    last (1: the last day), or -1 if that falls in another month."""
    probe = _BrokenDownTime([fields[0], fields[1] + 1, 1 - back, fields[3], fields[4], fields[5]], zone).normalized()
    return probe[2] if probe[1] == (fields[1] - 1) % 12 + 1 else -1


_FIRST_VALUES = (None, 1, 1, 0, 0, 0)     # what a field starts at: month and day 1, the rest 0
CALENDAR_MAX_STEPS = 1000                  # systemd gives up after as many (and says so)


def _within_bounds(tm):
    """True if the fields name a real time; False, with tm moved on to the
    time mktime makes of them (the field below the first one that moved
    back at its start: 03-33 is 04-01, not 04-02), or None if that would
    go back in time or past the last year."""
    if tm.fields[0] > CALENDAR_MAX_YEAR:
        return None
    normal = tm.normalized()
    for index in range(6):
        if normal[index] != tm.fields[index]:
            if normal[index] < tm.fields[index]:
                return None
            if index < 5:
                normal[index + 1] = _FIRST_VALUES[index + 1]
            tm.fields = normal
            return False
    return True


def _find_next(spec, start_fields, micro, zone):
    """systemd 252's find_next: ([year, month, day, hour, minute, second],
    usec) of the first time at or after the given one that `spec` names, or
    None. Field by field from the year down, each set to its first allowed
    value at or after the current one (the fields below it then start over);
    a field with none left, or a value the time does not have, moves the
    field above it on."""
    tm = _BrokenDownTime(list(start_fields), zone)
    for _ in range(CALENDAR_MAX_STEPS):
        tm.fields = tm.normalized()
        for index, field in enumerate(_CALENDAR_FIELDS):
            if index == 3 and spec.weekdays is not None and not spec.weekdays & (1 << _weekday_of(tm.fields, zone)):
                tm.fields[2:] = [tm.fields[2] + 1, 0, 0, 0]
                micro = 0
                break
            value = tm.fields[index] * _USEC + micro if index == 5 else tm.fields[index]
            found = _match(spec.fields[field], value, spec if index == 2 and spec.end_of_month else None,
                           tm.fields, zone)
            if found is not None and found[0]:
                if index == 5:
                    tm.fields[5], micro = divmod(found[1], _USEC)
                else:
                    tm.fields[index:] = [found[1]] + list(_FIRST_VALUES[index + 1:])
                    micro = 0
            bounded = None if found is None else _within_bounds(tm)
            if index == 0 and not bounded:
                return None
            if bounded is None:
                tm.fields[index - 1:] = [tm.fields[index - 1] + 1] + list(_FIRST_VALUES[index:])
                micro = 0
                break
            if not bounded:
                if index == 5:
                    micro = 0
                break
        else:
            return tm.fields, micro
    return None


# ---- timer units (SPEC §17) ------------------------------------------------------
# NAME.timer files (templates and drop-ins as for services) read into a
# frozen TimerSpec: what schedules the service it activates. The [Unit]
# section gives its Description= and conditions; [Install] is ignored.

TIMER_SUFFIX = ".timer"
DEFAULT_ACCURACY_SEC = 60.0
# [Timer] key -> (TimerSpec field, parser, "list" or "one")
TIMER_DIRECTIVES = {
    "OnCalendar": ("calendars", lambda v: (parse_calendar(v),), "list"),
    "OnActiveSec": ("on_active", lambda v: (parse_timespan(v),), "list"),
    "OnBootSec": ("on_boot", lambda v: (parse_timespan(v),), "list"),
    "OnStartupSec": ("on_startup", lambda v: (parse_timespan(v),), "list"),
    "OnUnitActiveSec": ("on_unit_active", lambda v: (parse_timespan(v),), "list"),
    "OnUnitInactiveSec": ("on_unit_inactive", lambda v: (parse_timespan(v),), "list"),
    "Persistent": ("persistent", parse_bool, "one"),
    "RandomizedDelaySec": ("randomized_delay", parse_timespan, "one"),
    "FixedRandomDelay": ("fixed_random_delay", parse_bool, "one"),
    "AccuracySec": ("accuracy", parse_timespan, "one"),
    "RemainAfterElapse": ("remain_after_elapse", parse_bool, "one"),
    "OnClockChange": ("on_clock_change", parse_bool, "one"),
    "OnTimezoneChange": ("on_timezone_change", parse_bool, "one"),
    "Unit": ("unit", str, "one"),
}
TIMER_TRIGGER_FIELDS = ("calendars", "on_active", "on_boot", "on_startup", "on_unit_active", "on_unit_inactive")
TIMER_NOT_APPLIED = {"WakeSystem": "gitproc does not wake a suspended machine"}


class ActivatorSpec:
    """A timer or socket unit as its files say it (immutable once parsed).
    `unit`: the name of the service it starts; `identity()` is what it
    means, so a moved file or a new comment changes nothing. A subclass
    names its FIELDS, their DEFAULTS and its section's DIRECTIVES."""
    FIELDS, DEFAULTS, DIRECTIVES, KEY_NAMES = (), {}, {}, {}
    __slots__ = ("name", "path", "blob", "sources", "not_applied")

    def __init__(self, name, path, blob="", **values):
        self.name, self.path, self.blob = name, path, blob
        self.sources, self.not_applied = (path,), ()
        for field in self.FIELDS:
            setattr(self, field, values.get(field, self.DEFAULTS[field]))

    def identity(self):
        return tuple(getattr(self, field) for field in self.FIELDS)

    def changed_keys(self, other):
        """The keys whose meaning differs from `other`'s (an earlier version)."""
        keys = {field: key for key, (field, _, _) in self.DIRECTIVES.items()}
        keys.update(description="Description", conditions="Condition*", condition_host="ConditionHost",
                    **self.KEY_NAMES)
        return [keys[field] + "=" for field in self.FIELDS if getattr(self, field) != getattr(other, field)]


class TimerSpec(ActivatorSpec):
    """One timer unit: what schedules the service it starts."""
    FIELDS = ("description", "conditions", "condition_host", "unit") + TIMER_TRIGGER_FIELDS + (
        "persistent", "randomized_delay", "fixed_random_delay", "accuracy", "remain_after_elapse",
        "on_clock_change", "on_timezone_change")
    DEFAULTS = {"description": "", "conditions": (), "condition_host": (), "unit": "", "calendars": (), "on_active": (), "on_boot": (),
                "on_startup": (), "on_unit_active": (), "on_unit_inactive": (), "persistent": False,
                "randomized_delay": 0.0, "fixed_random_delay": False, "accuracy": DEFAULT_ACCURACY_SEC,
                "remain_after_elapse": True, "on_clock_change": False, "on_timezone_change": False}
    DIRECTIVES = TIMER_DIRECTIVES
    __slots__ = FIELDS

    @property
    def monotonic(self):
        return any(getattr(self, field) for field in TIMER_TRIGGER_FIELDS[1:])


def _read_activator(name, suffix, section_name, path, data, context, directives, not_applied_keys, resets, report):
    """The [Unit] and [`section_name`] of a timer or socket file and its
    drop-ins (`data`: bytes or [(path, bytes)]): ({field: value}, [(key,
    value)] not applied), or None if a file cannot be read. `resets`: field
    -> the fields an empty value of its key resets (itself by default)."""
    parts = [(path, data)] if isinstance(data, bytes) else list(data)
    stem = name[:-len(suffix)]
    problem = unit_name_problem(stem)
    if problem:
        report(path, 1, "error", problem)
        return None
    values, not_applied = {}, []
    for part_path, part_data in parts:
        text = _unit_text(part_data, lambda line, severity, message: report(part_path, line if isinstance(
            line, int) else 1, severity, message))
        if text is None:
            return None
        section = None
        for number, line in _logical_lines(text):
            if line.startswith("["):
                section = line.strip("[]").strip()
                if section not in ("Unit", section_name, "Install") and not section.startswith("X-"):
                    report(part_path, number, "warning", "unknown section [%s], ignored" % section)
                continue
            key, equals, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if not equals or section is None:
                report(part_path, number, "warning", "line has no '=', ignored" if not equals
                       else "%s= outside any section, ignored" % key)
                continue
            if section == "Unit":
                directive = DIRECTIVES.get(("Unit", key))
                if key == "Description":
                    values["description"] = expand_specifiers(value, stem, context)[0]
                elif directive is not None and directive[0] in ("conditions", "condition_host"):
                    field = directive[0]
                    if not value:
                        _reset_conditions(values, key)
                        continue
                    try:
                        values[field] = values.get(field, ()) + directive[1](expand_specifiers(value, stem, context)[0])
                    except ValueError as exc:
                        report(part_path, number, "error", "%s=: %s" % (key, exc))
                elif directive is None and key not in NOT_APPLIED_KEYS and not key.startswith("X-") and \
                        ("Unit", key) not in SILENT_KEYS:
                    report(part_path, number, "warning", unknown_key_message("Unit", key), code="key")
                continue                  # ordering and documentation keys: nothing to order
            if section != section_name:
                continue
            if key in not_applied_keys:
                if value and not _is_off(value):
                    not_applied.append((key, value))
                    report(part_path, number, "warning", "not applied: %s=%s (%s)" % (key, value, not_applied_keys[key]))
                continue
            directive = directives.get(key)
            if directive is None:
                report(part_path, number, "warning", "unknown key %s= in [%s], ignored" % (key, section_name), code="key")
                continue
            field, parse, kind = directive
            if not value:
                for reset in resets.get(field, (field,)):
                    values.pop(reset, None)
                continue
            try:
                parsed = parse(expand_specifiers(value, stem, context)[0])
            except ValueError as exc:
                report(part_path, number, "error", "%s=: %s" % (key, exc))
                continue
            values[field] = values.get(field, ()) + parsed if kind == "list" else parsed
    return values, not_applied


def _activator_diagnostics(name):
    """([Diagnostic], report): the list a timer's or socket's parse fills."""
    diagnostics = []

    def report(source, line, severity, message, code=None):
        diagnostics.append(Diagnostic(source, line, severity, message, unit=name, code=code))
    return diagnostics, report


def parse_timer(name, path, data, blob="", context=None):
    """Parse a timer unit (`name`: NAME.timer) from its file and drop-ins,
    as parse_unit does a service: (TimerSpec or None, [Diagnostic])."""
    diagnostics, report = _activator_diagnostics(name)
    context = specifier_context() if context is None else context
    read = _read_activator(name, TIMER_SUFFIX, "Timer", path, data, context, TIMER_DIRECTIVES, TIMER_NOT_APPLIED,
                           {field: TIMER_TRIGGER_FIELDS for field in TIMER_TRIGGER_FIELDS}, report)
    if read is None:
        return None, diagnostics
    values, not_applied = read
    target = values.get("unit") or name[:-len(TIMER_SUFFIX)] + UNIT_SUFFIX
    if not target.endswith(UNIT_SUFFIX):
        report(path, 1, "error", "Unit=%s: gitproc runs services only (NAME.service)" % target)
    values["unit"] = _strip_suffix(target, UNIT_SUFFIX)
    if not any(values.get(field) for field in TIMER_TRIGGER_FIELDS):
        report(path, 1, "error", "no OnCalendar=, OnActiveSec=, OnBootSec=, OnStartupSec=, OnUnitActiveSec= or "
               "OnUnitInactiveSec=: the timer would never elapse")
    if any(d.severity == "error" for d in diagnostics):
        return None, diagnostics
    spec = TimerSpec(name, path, blob, **values)
    spec.sources = tuple(part for part, _ in ([(path, data)] if isinstance(data, bytes) else data))
    spec.not_applied = tuple(not_applied)
    return spec, diagnostics


def check_activators(entries, suffix, services, context=None, cache=None):
    """The timer or socket units (by `suffix`) among `entries` (see
    check_unit_tree): ({name: spec}, [Diagnostic], {name: the service each
    file names, valid or not}); a unit whose service is not among
    `services` (names; a template as NAME@) is an error of that unit."""
    parse, section, key = ACTIVATOR_TYPES[suffix]
    found, problems, targets = {}, [], {}
    paths_of = {}
    for name, path, _, _ in entries:
        if name.endswith(suffix):
            paths_of.setdefault(name, []).append(path)
    for name, path, data, blob in entries:
        if not name.endswith(suffix):
            continue
        if len(paths_of[name]) > 1:
            problems.append(Diagnostic(path, 1, "error", "unit name %r is also defined in %s: both are rejected" % (
                name, ", ".join(p for p in paths_of[name] if p != path)), unit=name))
            continue
        parsed = cache.get((path, blob)) if cache is not None and blob else None
        if parsed is None:
            spec, diagnostics = parse(name, path, data, blob, context)
            parsed = (spec, diagnostics, spec.unit if spec else _named_target(name, data, context, suffix, section, key))
            if cache is not None and blob:
                cache[(path, blob)] = parsed
        spec, diagnostics, targets[name] = parsed
        problems.extend(diagnostics)
        if spec is None:
            continue
        if spec.unit not in services:
            template = spec.unit.partition("@")[0] + "@" if "@" in spec.unit else None
            hint = " (an instance is a file of its own: add %s, empty or a link to %s)" % (
                spec.unit + UNIT_SUFFIX, template + UNIT_SUFFIX) if template and template in services \
                and template != spec.unit else ""
            problems.append(Diagnostic(path, 1, "error", "%s activates %s, which is not in the repository%s" % (
                name, spec.unit + UNIT_SUFFIX, hint), unit=name))
            continue
        found[name] = spec
    return found, problems, targets


def _named_target(name, data, context, suffix, section_name, key):
    """The service a timer or socket file with errors names: its last
    Unit=/Service= (drop-ins read in order), else NAME.service."""
    stem, target = name[:-len(suffix)], None
    for _, part in ([(None, data)] if isinstance(data, bytes) else data or ()):
        section = None
        for _, line in _logical_lines(part.decode("utf-8", "replace")):
            if line.startswith("["):
                section = line.strip("[]").strip()
            elif section == section_name and line.partition("=")[0].strip() == key:
                target = expand_specifiers(line.partition("=")[2].strip(), stem, context or {})[0] or None
    return _strip_suffix(target or stem + UNIT_SUFFIX, UNIT_SUFFIX)


# ---- socket units (SPEC §18) -----------------------------------------------------
# NAME.socket files (templates and drop-ins as for services) read into a
# frozen SocketSpec: the addresses the daemon listens on for a service, and
# how it hands them over (Accept=no: the listening sockets; Accept=yes: each
# connection to an instance of NAME@.service).

SOCKET_SUFFIX = ".socket"
LISTEN_KINDS = {"ListenStream": "stream", "ListenDatagram": "datagram", "ListenSequentialPacket": "seqpacket"}
SOCKET_TYPES = {"stream": socket.SOCK_STREAM, "datagram": socket.SOCK_DGRAM, "seqpacket": socket.SOCK_SEQPACKET}
SOCKET_MAX_FDS = 253                  # SCM_MAX_FD: what one message (to the keeper) can carry


def socket_address(text):
    """(family, address) to bind for a Listen*= value: a port (None: IPv6
    with IPv4 where the host has IPv6, else IPv4), addr:port, [addr]:port,
    a path, or @abstract. ValueError names what is wrong."""
    if text.startswith("/"):
        if len(os.fsencode(text)) > 107:
            raise ValueError("%s is longer than 107 bytes, the limit of a Unix socket's path" % text)
        return socket.AF_UNIX, os.path.normpath(text)
    if text.startswith("@") and len(text) > 1:
        return socket.AF_UNIX, "\0" + text[1:]
    if text.isdigit():
        return None, ("", _port(text))
    host, colon, port = text.rpartition(":")
    family = socket.AF_INET6 if host.startswith("[") and host.endswith("]") else socket.AF_INET
    host = host[1:-1] if family == socket.AF_INET6 else host
    try:
        socket.inet_pton(family, host)
    except (OSError, ValueError):
        raise ValueError("%r is not a port, an address with a port (1.2.3.4:80, [::1]:80), an absolute path or an "
                         "@abstract name" % text) from None
    return family, (host, _port(port) if colon else None)


def _port(text):
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("port %r is not a number from 1 to 65535" % text)
    return int(text)


def _listen(kind):
    def parse(value):
        socket_address(value)
        return ((kind, value),)
    return parse


def _parse_fd_name(value):
    if len(value) > 255 or ":" in value or not value.isprintable():
        raise ValueError("%r is not a descriptor name (printable, no ':', at most 255 characters)" % value)
    return value


def _parse_symlinks(value):
    paths = tuple(split_words(value))
    for path in paths:
        if not path.startswith("/"):
            raise ValueError("%r is not an absolute path" % path)
    return paths


# [Socket] key -> (SocketSpec field, parser, "list" or "one")
SOCKET_DIRECTIVES = dict(
    {key: ("listen", _listen(kind), "list") for key, kind in LISTEN_KINDS.items()},
    Accept=("accept", parse_bool, "one"), Service=("unit", str, "one"),
    SocketUser=("socket_user", _parse_user, "one"), SocketGroup=("socket_group", _parse_user, "one"),
    SocketMode=("socket_mode", _parse_umask, "one"), DirectoryMode=("directory_mode", _parse_umask, "one"),
    Backlog=("backlog", _parse_count, "one"), ReusePort=("reuse_port", parse_bool, "one"),
    FreeBind=("free_bind", parse_bool, "one"),
    BindIPv6Only=("bind_ipv6_only", _parse_choice(("default", "both", "ipv6-only")), "one"),
    NoDelay=("no_delay", parse_bool, "one"), KeepAlive=("keep_alive", parse_bool, "one"),
    PassCredentials=("pass_credentials", parse_bool, "one"), FileDescriptorName=("fd_name", _parse_fd_name, "one"),
    RemoveOnStop=("remove_on_stop", parse_bool, "one"), Symlinks=("symlinks", _parse_symlinks, "list"),
    MaxConnections=("max_connections", _parse_count, "one"),
    MaxConnectionsPerSource=("max_per_source", _parse_count, "one"),
    TriggerLimitIntervalSec=("trigger_interval", parse_timespan, "one"),
    TriggerLimitBurst=("trigger_burst", _parse_count, "one"),
)
SOCKET_NOT_APPLIED = dict(
    **_keys("gitproc listens on streams, datagrams and sequential packets only", "ListenFIFO", "ListenSpecial",
            "ListenNetlink", "ListenMessageQueue", "ListenUSBFunction", "MessageQueueMaxMessages",
            "MessageQueueMessageSize", "PipeSize", "Writable"),
    **_keys("a socket option gitproc does not set", "SocketProtocol", "BindToDevice", "IPTOS", "IPTTL", "Priority",
            "ReceiveBuffer", "SendBuffer", "Mark", "Timestamping", "Broadcast", "PassSecurity", "PassPacketInfo",
            "Transparent", "KeepAliveTimeSec", "KeepAliveIntervalSec", "KeepAliveProbes", "DeferAcceptSec",
            "TCPCongestion", "FlushPending", "PollLimitIntervalSec", "PollLimitBurst", "SELinuxContextFromNet",
            "SmackLabel", "SmackLabelIPIn", "SmackLabelIPOut"),
    **_keys("a socket unit's own commands are not run", "ExecStartPre", "ExecStartPost", "ExecStopPre",
            "ExecStopPost", "TimeoutSec"),
)


class SocketSpec(ActivatorSpec):
    """One socket unit: `unit` is the service it activates (NAME@ with
    Accept=yes: the template); `bind_key()` is what its sockets are bound
    for: only a change of it binds them again."""
    BIND_FIELDS = ("listen", "socket_user", "socket_group", "socket_mode", "directory_mode", "backlog", "reuse_port",
                   "free_bind", "bind_ipv6_only", "no_delay", "keep_alive", "pass_credentials", "symlinks")
    FIELDS = ("description", "conditions", "condition_host", "unit", "accept", "fd_name", "remove_on_stop",
              "max_connections", "max_per_source", "trigger_interval", "trigger_burst") + BIND_FIELDS
    DEFAULTS = {"description": "", "conditions": (), "condition_host": (), "unit": "", "accept": False,
                "fd_name": "", "remove_on_stop": False, "max_connections": 64, "max_per_source": 0,
                "trigger_interval": 2.0, "trigger_burst": 0, "listen": (), "socket_user": None, "socket_group": None,
                "socket_mode": 0o666, "directory_mode": 0o755, "backlog": 4096, "reuse_port": False,
                "free_bind": False, "bind_ipv6_only": "default", "no_delay": False, "keep_alive": False,
                "pass_credentials": False, "symlinks": ()}
    DIRECTIVES, KEY_NAMES = SOCKET_DIRECTIVES, {"listen": "Listen*"}
    __slots__ = FIELDS

    def bind_key(self):
        return json.dumps([getattr(self, field) for field in self.BIND_FIELDS])

    @property
    def burst(self):
        """TriggerLimitBurst=, or systemd's default: 20, 200 with Accept=yes."""
        return self.trigger_burst or (200 if self.accept else 20)


def parse_socket(name, path, data, blob="", context=None):
    """Parse a socket unit (`name`: NAME.socket) from its file and drop-ins,
    as parse_unit does a service: (SocketSpec or None, [Diagnostic])."""
    diagnostics, report = _activator_diagnostics(name)
    context = specifier_context() if context is None else context
    read = _read_activator(name, SOCKET_SUFFIX, "Socket", path, data, context, SOCKET_DIRECTIVES,
                           SOCKET_NOT_APPLIED, {}, report)
    if read is None:
        return None, diagnostics
    values, not_applied = read
    stem = name[:-len(SOCKET_SUFFIX)]
    target = values.get("unit") or stem + ("@" if values.get("accept") else "") + UNIT_SUFFIX
    if not target.endswith(UNIT_SUFFIX):
        report(path, 1, "error", "Service=%s: gitproc runs services only (NAME.service)" % target)
    elif values.get("accept") and values.get("unit"):
        report(path, 1, "error", "Service= cannot be used with Accept=yes: each connection gets an instance of %s@%s"
               % (stem, UNIT_SUFFIX))
    values["unit"] = _strip_suffix(target, UNIT_SUFFIX)
    listen = values.get("listen", ())
    if not listen:
        report(path, 1, "error", "no ListenStream=, ListenDatagram= or ListenSequentialPacket=: nothing to listen on")
    elif values.get("accept") and any(kind == "datagram" for kind, _ in listen):
        report(path, 1, "error", "Accept=yes takes stream and sequential-packet sockets only, not ListenDatagram=")
    if len(listen) > SOCKET_MAX_FDS:
        report(path, 1, "error", "%d Listen*= lines: at most %d" % (len(listen), SOCKET_MAX_FDS))
    if any(d.severity == "error" for d in diagnostics):
        return None, diagnostics
    values.setdefault("fd_name", name)   # as systemd: the unit's name, NAME.socket
    spec = SocketSpec(name, path, blob, **values)
    spec.sources = tuple(part for part, _ in ([(path, data)] if isinstance(data, bytes) else data))
    spec.not_applied = tuple(not_applied)
    return spec, diagnostics


# suffix -> (parser, section, the key that names its service)
ACTIVATOR_TYPES = {TIMER_SUFFIX: (parse_timer, "Timer", "Unit"), SOCKET_SUFFIX: (parse_socket, "Socket", "Service")}


# ==== 5. configuration and paths =============================================
# Where things live and the settings that shape the daemon, resolved once from
# flag > environment (GITPROC_*) > config file > default. Errors name the key.

CONFIG_TYPES = {
    "repo_path": str, "branch": str, "remote": str, "socket_path": str,
    "socket_group": str, "state_file": str, "log_dir": str, "cgroup_root": str,
    "hostname": str, "poll_interval": (int, float), "max_poll_interval": (int, float),
    "log_max_bytes": int, "log_backups": int, "http_listen": str, "webhook_secret": str,
    "snapshot_max_bytes": int, "verify": dict, "allow_rewind": bool, "signing_key": str, "syslog_socket": str,
    "notify": list, "notify_log_lines": int, "notify_repeat": (int, float), "http_show_logs": bool,
}
ROOT_PATHS = {
    "repo_path": "/etc/gitproc/services", "socket_path": "/run/gitproc/gitproc.sock",
    "state_file": "/var/lib/gitproc/state.json", "log_dir": "/var/log/gitproc",
    "pid_file": "/run/gitproc/gitproc.pid", "config": "/etc/gitproc/config.json",
}
HOME_PATHS = {
    "repo_path": "services", "socket_path": "gitproc.sock", "state_file": "state.json",
    "log_dir": "logs", "pid_file": "gitproc.pid", "config": "config.json",
}
CONFIG_DEFAULTS = {
    "branch": DEFAULT_BRANCH, "remote": None, "socket_group": None,
    "cgroup_root": "/sys/fs/cgroup", "hostname": None, "poll_interval": 10,
    "max_poll_interval": 30, "log_max_bytes": 10 * 1024 * 1024, "log_backups": 3,
    "http_listen": None, "webhook_secret": None, "snapshot_max_bytes": DEFAULT_SNAPSHOT_MAX_BYTES,
    "verify": None, "allow_rewind": False, "signing_key": None, "syslog_socket": "auto",
    "notify": [], "notify_log_lines": 10, "notify_repeat": 3600, "http_show_logs": False,
}
SIZE_KEYS = ("log_max_bytes", "snapshot_max_bytes")   # a number of bytes, or a size: "10M", "10 MiB"
TIMESPAN_KEYS = ("notify_repeat",)                    # seconds, or a time span: "1h", "30min"
# What `daemon-reload` (and SIGHUP) change in a running daemon; the other
# keys name where things live or what is watched, and need a restart.
LIVE_CONFIG_KEYS = ("poll_interval", "max_poll_interval", "http_listen", "webhook_secret", "log_max_bytes",
                    "log_backups", "snapshot_max_bytes", "verify", "allow_rewind", "signing_key", "syslog_socket",
                    "notify", "notify_log_lines", "notify_repeat", "http_show_logs")
# Command-line flags that override a config key: argparse dest -> key.
FLAG_KEYS = {"repo": "repo_path", "branch": "branch", "remote": "remote",
             "hostname": "hostname", "socket": "socket_path"}


class Config:
    """The resolved settings. Attributes are the CONFIG_TYPES keys plus `home`,
    `pid_file` and `config_path`."""

    def __init__(self, settings):
        self.__dict__.update(settings)

    @property
    def daemon_log(self):
        return os.path.join(self.log_dir, "daemon.log")

    def service_log(self, name):
        return os.path.join(self.log_dir, name + ".log")

    @property
    def snapshot_dir(self):
        """Where units' folders are materialised, one folder per tree id."""
        return os.path.join(os.path.dirname(self.state_file), "snapshots")

    @property
    def files_dir(self):
        """Where each unit's %Y is: files/NAME, a link to its snapshot."""
        return os.path.join(os.path.dirname(self.state_file), "files")


def load_config(flags=None, environ=None, lenient=False):
    """Resolve the settings; `flags` is a dict of command-line values (None = unset).
    With `lenient` (client commands, which need only the socket), a bad
    config file does not stop the command: its paths are taken where they
    are valid, the defaults for the rest, and `warning` says why."""
    try:
        return _load_config(flags, environ, None)
    except ConfigError as exc:
        named = (flags or {}).get("config") or (os.environ if environ is None else environ).get("GITPROC_CONFIG")
        if not lenient or (named and not os.path.isfile(named)):     # a file named but not there: a typo
            raise
        config = _load_config(flags, environ, ("repo_path", "socket_path", "state_file", "log_dir"))
        config.warning = "%s (this command uses only the paths it sets)" % exc
        return config


def _load_config(flags, environ, only_keys):
    flags = dict(flags or {})
    for key in ("home", "config", "socket", "repo"):       # kept for daemon-reload, which runs from another folder
        if flags.get(key):
            flags[key] = os.path.abspath(os.path.expanduser(flags[key]))
    environ = os.environ if environ is None else environ
    home = flags.get("home") or environ.get("GITPROC_HOME")
    if home:
        home = os.path.abspath(os.path.expanduser(home))
        defaults = {key: os.path.join(home, rel) for key, rel in HOME_PATHS.items()}
    elif os.geteuid() == 0:
        defaults = dict(ROOT_PATHS)
    else:
        home = os.path.join(os.path.expanduser("~"), ".gitproc")
        defaults = {key: os.path.join(home, rel) for key, rel in HOME_PATHS.items()}
    config_path = flags.get("config") or environ.get("GITPROC_CONFIG")
    from_file = {}
    if config_path or os.path.exists(defaults["config"]):
        config_path = os.path.abspath(config_path or defaults["config"])
        if only_keys is None:
            from_file = _read_config_file(config_path)
        else:
            from_file = {key: value for key, value in _read_config_file_leniently(config_path).items()
                         if key in only_keys and isinstance(value, str)}
    settings = dict(CONFIG_DEFAULTS)
    settings.update({key: defaults[key] for key in ("repo_path", "socket_path", "state_file", "log_dir")})
    settings.update(from_file)
    for key, kind in CONFIG_TYPES.items():
        raw = environ.get("GITPROC_" + key.upper())
        if raw is not None and raw != "":
            settings[key] = _convert_env(key, raw, kind)
    for dest, key in FLAG_KEYS.items():
        if flags.get(dest) is not None:
            settings[key] = flags[dest]
    for key in ("repo_path", "socket_path", "state_file", "log_dir", "cgroup_root"):
        settings[key] = os.path.abspath(os.path.expanduser(settings[key]))
    if settings["hostname"] is None:
        settings["hostname"] = socket.gethostname()
    if settings["poll_interval"] <= 0 or settings["max_poll_interval"] < settings["poll_interval"]:
        raise ConfigError("poll_interval must be > 0 and max_poll_interval at least poll_interval")
    if settings["log_max_bytes"] < 1024 or settings["log_backups"] < 0:
        raise ConfigError("log_max_bytes must be at least 1024 and log_backups at least 0")
    if settings["snapshot_max_bytes"] < 0:
        raise ConfigError("snapshot_max_bytes must be at least 0")
    if settings["http_listen"]:
        parse_listen_address(settings["http_listen"])
    if settings["verify"] is not None:
        settings["verify"] = _check_verify_setting(settings["verify"])
    settings["notify"] = _check_notify_setting(settings["notify"])
    if settings["notify_log_lines"] < 0 or settings["notify_repeat"] < 0:
        raise ConfigError("notify_log_lines and notify_repeat must be at least 0")
    if settings["signing_key"]:
        settings["signing_key"] = os.path.expanduser(settings["signing_key"])
    if settings["syslog_socket"] not in ("auto", "off") and (
            not os.path.isabs(settings["syslog_socket"]) or
            len(os.path.join(settings["syslog_socket"], "journal-socket").encode()) > MAX_SOCKET_PATH):
        raise ConfigError('syslog_socket must be "auto", "off" or an absolute path of a folder short enough for '
                          'its sockets (%d bytes with "/journal-socket"), not %r' % (MAX_SOCKET_PATH, settings["syslog_socket"]))
    settings.update(home=home, pid_file=defaults["pid_file"], config_path=config_path, flags=flags, warning=None)
    return Config(settings)


def _read_config_file_leniently(path):
    try:
        with open(path, "rb") as config_file:
            data = json.loads(config_file.read().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_config_file(path):
    try:
        with open(path, "rb") as config_file:
            data = json.loads(config_file.read().decode("utf-8"))
    except OSError as exc:
        raise ConfigError("cannot read config %s: %s" % (path, exc.strerror or exc))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError("config %s is not valid JSON: %s" % (path, exc))
    if not isinstance(data, dict):
        raise ConfigError("config %s must hold a JSON object of settings" % path)
    for key, value in data.items():
        kind = CONFIG_TYPES.get(key)
        if key in SIZE_KEYS and isinstance(value, str):
            data[key] = value = _config_size("config %s: %r" % (path, key), value)
        if key in TIMESPAN_KEYS and isinstance(value, str):
            data[key] = value = _config_timespan("config %s: %r" % (path, key), value)
        if kind is None:
            raise ConfigError("config %s: unknown key %r (known: %s)" % (path, key, ", ".join(sorted(CONFIG_TYPES))))
        if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
            raise ConfigError("config %s: %r must be %s, not %s" % (
                path, key, _type_words(kind), type(value).__name__))
    return {key: value for key, value in data.items() if value is not None}


def _type_words(kind):
    return "a number" if isinstance(kind, tuple) else {
        "str": "a string", "int": "a whole number", "bool": "true or false", "dict": "a JSON object",
        "list": "a JSON list"}[kind.__name__]


def _config_timespan(what, text):
    try:
        return parse_timespan(text)
    except ValueError:
        raise ConfigError("%s must be a number of seconds or a time span (\"1h\", \"30min\"), not %r" % (what, text))


def _config_size(what, text):
    try:
        size = parse_size(text)
    except ValueError:
        size = None
    if size is None:
        raise ConfigError("%s must be a size in bytes (10485760, \"10M\" or \"10 MiB\"), not %r" % (what, text))
    return size


def _convert_env(key, raw, kind):
    if kind is str:
        return raw
    if key in SIZE_KEYS:
        return _config_size("GITPROC_%s" % key.upper(), raw)
    if key in TIMESPAN_KEYS:
        return _config_timespan("GITPROC_%s" % key.upper(), raw)
    if kind is bool:
        if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError("GITPROC_%s=%r must be true or false" % (key.upper(), raw))
        return raw.lower() in ("1", "true", "yes", "on")
    try:
        if kind in (dict, list):
            value = json.loads(raw)
            if isinstance(value, kind):
                return value
            raise ValueError("not a JSON %s" % ("object" if kind is dict else "list"))
        return int(raw) if kind is int else float(raw)
    except ValueError:
        raise ConfigError("GITPROC_%s=%r must be %s" % (key.upper(), raw, _type_words(kind)))


def _check_verify_setting(verify):
    """`verify`: {"signers": PATH} (SSH allowed_signers) or {"keyring": PATH}
    (OpenPGP public keys), and "scope": "head" or "all". Returns it with
    the path made absolute."""
    unknown = sorted(set(verify) - {"signers", "keyring", "scope"})
    if unknown:
        raise ConfigError("verify: unknown key %r (known: signers, keyring, scope)" % unknown[0])
    kinds = [key for key in ("signers", "keyring") if verify.get(key) is not None]
    if len(kinds) != 1 or not isinstance(verify[kinds[0]], str) or not verify[kinds[0]]:
        raise ConfigError('verify: give one of "signers" (an SSH allowed_signers file) or "keyring" '
                          '(an OpenPGP public keyring), as a path')
    scope = verify.get("scope", "head")
    if scope not in ("head", "all"):
        raise ConfigError('verify: "scope" must be "head" (the commit deployed) or "all" (every commit since '
                          'the deployed one), not %r' % (scope,))
    return {kinds[0]: os.path.abspath(os.path.expanduser(verify[kinds[0]])), "scope": scope}


def _check_notify_setting(targets):
    """`notify`: a list of targets, each {"url": "http(s)://...", "format":
    "json"|"slack"} or {"command": [argv...]}, with an optional "name"
    (default: the URL, or the command). Returns them with their names."""
    checked, names = [], set()
    for number, target in enumerate(targets, 1):
        where = "notify: target %d" % number
        if not isinstance(target, dict):
            raise ConfigError("%s must be a JSON object ({\"url\": ...} or {\"command\": [...]})" % where)
        unknown = sorted(set(target) - {"url", "command", "format", "name"})
        if unknown:
            raise ConfigError("%s: unknown key %r (known: url, command, format, name)" % (where, unknown[0]))
        if ("url" in target) == ("command" in target):
            raise ConfigError('%s: give one of "url" (a JSON POST) or "command" (run with the alert on stdin)' % where)
        url, command = target.get("url"), target.get("command")
        if url is not None and not (isinstance(url, str) and re.match(r"https?://[^/\s]+", url)):
            raise ConfigError("%s: url must be an http:// or https:// address, not %r" % (where, url))
        if command is not None and not (isinstance(command, list) and command and
                                        all(isinstance(word, str) and word for word in command)):
            raise ConfigError("%s: command must be a list of words, the program first, not %r" % (where, command))
        form = target.get("format", "json")
        if form not in ("json", "slack") or (command is not None and "format" in target):
            raise ConfigError('%s: format is "json" or "slack", for a url only' % where)
        name = target.get("name") or url or " ".join(command)
        if not isinstance(name, str) or name in names:
            raise ConfigError("%s: name %r is not a string, or another target's" % (where, name))
        names.add(name)
        checked.append(dict(target, name=name, format=form) if url else dict(target, name=name))
    return checked


# ==== 6. state store =========================================================
# state.json: what must outlive the daemon. The store loads, tracks the dirty
# flag, batches saves on the loop's timers (forced on user intents) and writes
# atomically; the daemon gives it the snapshot to write.


class StateStore:
    """Batched, atomic persistence of one JSON document."""

    def __init__(self, path, log, call_later=None, snapshot=None, min_interval=STATE_MIN_SAVE_INTERVAL, durable=True):
        self.path = path
        self.log = log
        self.call_later = call_later  # the loop's timers, for batched saves
        self.snapshot = snapshot      # () -> the document to save
        self.min_interval = min_interval  # the least time between two writes
        self.durable = durable        # fsync each write (the state), or not (the events: a history, not intents)
        self.dirty = False            # something changed since the last write
        self.last_save = 0.0          # monotonic time of the last successful write
        self.save_timer = None

    def mark_dirty(self):
        """Batched save: at most one write per STATE_MIN_SAVE_INTERVAL, within
        STATE_SAVE_CHECK_INTERVAL of the change; no timer at all while idle."""
        self.dirty = True
        if self.save_timer is None:
            self.save_timer = self.call_later(STATE_SAVE_CHECK_INTERVAL, self._save_due)

    def _save_due(self):
        self.save_timer = None
        if not self.dirty:
            return
        wait = self.last_save + self.min_interval - time.monotonic()
        if wait > 0:
            self.save_timer = self.call_later(wait, self._save_due)
            return
        if not self.save(self.snapshot()):
            self.mark_dirty()        # retry later (disk full, ...)

    def save_now(self):
        """Forced save, for user intents, deploys and shutdown."""
        if not self.save(self.snapshot()):
            self.mark_dirty()

    def load(self):
        """The saved state, or a fresh one. A corrupt file is moved aside with a
        warning; it never stops the daemon. Temporary files of saves that a
        crash interrupted are removed."""
        fresh = {"version": STATE_VERSION, "services": {}, "history": [], "deployed": None}
        folder, base = os.path.split(self.path)
        try:
            for leftover in os.listdir(folder or "."):
                if leftover.startswith(base + ".tmp."):
                    _unlink_quietly(os.path.join(folder, leftover))
        except OSError:
            pass
        try:
            with open(self.path, "rb") as state_file:
                raw = state_file.read()
        except FileNotFoundError:
            return fresh
        except OSError as exc:
            self.log.warning("daemon", "Cannot read state %s (%s); starting fresh" % (self.path, exc.strerror))
            return fresh
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("services", {}), dict):
                raise ValueError("not a gitproc state object")
        except ValueError as exc:
            aside = "%s.corrupt-%d" % (self.path, int(time.time()))
            try:
                os.rename(self.path, aside)
                where = "moved aside to %s" % aside
            except OSError as rename_exc:
                where = "could not be moved aside (%s)" % rename_exc.strerror
            self.log.warning("daemon", "State file %s is corrupt (%s); %s; starting fresh" % (self.path, exc, where))
            return fresh
        for key, value in fresh.items():
            if not isinstance(data.get(key), type(value)) and value is not None:
                data[key] = value
        return data

    def save(self, snapshot):
        """Write now. Returns True on success; on failure (disk full, ...) the old
        file stays as it was, the state stays dirty and the error is logged."""
        started = time.monotonic()
        data = json.dumps(snapshot, separators=(",", ":"), sort_keys=True).encode()
        try:
            makedirs(os.path.dirname(self.path))
            atomic_write(self.path, data, self.durable)
        except OSError as exc:
            self.log.error("daemon", "Saving state to %s failed: %s; the previous state file is kept" % (self.path, exc.strerror or exc))
            self.dirty = True
            return False
        self.dirty = False
        self.last_save = time.monotonic()
        self.log.debug("daemon", "Saving %s: %d bytes in %.2f ms" % (
            "state" if self.durable else os.path.basename(self.path), len(data), (self.last_save - started) * 1000))
        return True


# ==== 7. git source ==========================================================
# The services repository, read through `git` subprocesses. Units come from the
# objects of a commit (ls-tree + cat-file --batch), never from a working tree.
# Git runs through posix_spawn with its own pipes, and only its pid is waited
# for: the daemon never reaps a child it did not start for a service. Here too:
# the pure deploy plan (plan_deploy, DeployPlan, History) and SourceWatcher,
# which notices new commits; applying a plan is the daemon's Deployer (§12).

GIT_TIMEOUT = 60.0
FETCH_TIMEOUT = 120
REMOTE_REF = "refs/gitproc/remote/%s"   # where remote mode fetches the branch to


def run_git(repo, args, input_data=None, timeout=GIT_TIMEOUT, check=True, env=None, sink=None):
    """Run `git -C repo ARGS`; returns stdout bytes (or, with `sink`, gives
    sink() each piece of it as it comes). Raises GitError with git's own
    first line of complaint when it fails (check=True)."""
    argv = ["git", "-C", repo] + list(args)
    code, out, err = _run_captured(argv, input_data, timeout, env, sink)
    if check and code != 0:
        message = err.decode("utf-8", "replace").strip().splitlines()
        raise GitError("git %s failed: %s" % (args[0], message[0] if message else "exit code %d" % code))
    return out if check else (code, out, err)


def git_environment(extra=None):
    """The environment git runs in: messages in English (they are parsed), never
    a prompt for credentials (the daemon has no terminal)."""
    env = dict(os.environ, LC_ALL="C", GIT_TERMINAL_PROMPT="0", GIT_SSH_COMMAND=os.environ.get(
        "GIT_SSH_COMMAND", "ssh -o BatchMode=yes"))
    env.update(extra or {})
    return env


def _run_captured(argv, input_data, timeout, extra_env=None, sink=None):
    """posix_spawn a program with stdin/stdout/stderr pipes; returns (code, out,
    err). The child is always reaped, also on a timeout or an error here."""
    program = find_program(argv[0], os.environ.get("PATH"))
    if program is None:
        raise GitError("%s not found on PATH: install it (gitproc needs git 2.20 or newer)" % argv[0])
    open_fds = []
    pid = None
    finished = False
    try:
        for _ in range(3):
            open_fds.extend(os.pipe())
        in_r, in_w, out_r, out_w, err_r, err_w = open_fds
        try:
            pid = os.posix_spawn(program, argv, git_environment(extra_env), file_actions=[
                (os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2)], setsigdef=(signal.SIGPIPE,))
        except OSError as exc:
            raise GitError("cannot run %s: %s" % (argv[0], exc.strerror))
        for fd in (in_r, out_w, err_w):
            os.close(fd)
            open_fds.remove(fd)
        out, err = _exchange(in_w, out_r, err_r, input_data or b"", time.monotonic() + timeout, open_fds, sink)
        if out is None:
            raise GitError("%s %s timed out after %ds" % (argv[0], " ".join(argv[3:4]), timeout))
        finished = True
    finally:
        for fd in open_fds:
            os.close(fd)
        if pid is not None:
            status = _reap(pid, kill=not finished)
    exit_info = decode_wait_status(status)
    return exit_info.get("code", 128 + exit_info.get("signal", 0)), out, err


def _exchange(in_w, out_r, err_r, input_data, deadline, open_fds, sink=None):
    """Feed stdin and collect stdout and stderr until both close; (None, None) at
    the deadline. Closes stdin when all is written (and drops it from open_fds).
    With `sink`, stdout goes to sink(bytes) as it comes instead."""
    chunks = {out_r: [], err_r: []}
    pending = memoryview(input_data)
    import selectors
    with selectors.DefaultSelector() as selector:
        selector.register(out_r, EVENT_READ)
        selector.register(err_r, EVENT_READ)
        if pending:
            os.set_blocking(in_w, False)
            selector.register(in_w, EVENT_WRITE)
        else:
            os.close(in_w)
            open_fds.remove(in_w)
        while len(selector.get_map()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, None
            for key, _ in selector.select(remaining):
                if key.fd == in_w:
                    try:
                        pending = pending[os.write(in_w, pending[:65536]):]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(in_w)
                        os.close(in_w)
                        open_fds.remove(in_w)
                    continue
                data = os.read(key.fd, 1 << 20)
                if data and sink is not None and key.fd == out_r:
                    sink(data)
                elif data:
                    chunks[key.fd].append(data)
                else:
                    selector.unregister(key.fd)
    return b"".join(chunks[out_r]), b"".join(chunks[err_r])


def _reap(pid, kill=False):
    """Wait for our own child `pid`, SIGKILLing it first if `kill`."""
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return os.waitpid(pid, 0)[1]


class Commit:
    """A commit of the services repository: id, subject, commit time, and
    its parents' ids (where it was read from git)."""
    __slots__ = ("sha", "subject", "time", "parents")

    def __init__(self, sha, subject, commit_time, parents=()):
        self.sha, self.subject, self.time, self.parents = sha, subject, commit_time, tuple(parents)

    def to_json(self):
        return {"sha": self.sha, "subject": self.subject, "time": self.time}


def require_git():
    if find_program("git", os.environ.get("PATH")) is None:
        raise GitError("git not found on PATH: install git (2.20 or newer)")


def git_commit_at(repo, rev, what):
    """The commit `rev` names (a ref or a commit id); GitError naming `what` if
    the repository or the revision cannot be read."""
    if not os.path.isdir(repo):
        raise GitError("repository %s does not exist (create it with: gitproc.py init)" % repo)
    code, out, err = run_git(repo, ["log", "-1", "--no-show-signature", "--format=%H%x00%ct%x00%P%x00%s", rev, "--"],
                             check=False)
    if code != 0 or not out.strip():
        message = err.decode("utf-8", "replace").strip().splitlines()
        detail = message[0] if message else "no commits"
        if "unknown revision" in detail or "ambiguous argument" in detail or "bad revision" in detail:
            detail = "%s does not exist or has no commits" % what
        raise GitError("cannot read %s in %s: %s" % (what, repo, detail))
    sha, commit_time, parents, subject = out.decode("utf-8", "replace").rstrip("\n").split("\0", 3)
    return Commit(sha, subject, int(commit_time), parents.split())


def git_common_dir(repo):
    """The folder holding refs and packed-refs (the .git folder, the bare
    repository itself, or a worktree's common folder)."""
    path = run_git(repo, ["rev-parse", "--git-common-dir"]).decode().strip()
    return os.path.normpath(os.path.join(repo, path))


def read_ref_file(git_dir, ref):
    """A ref's value read from the files git keeps (loose ref, else packed-refs),
    without running git: the commit id, "" if the ref does not exist, or None
    when the files cannot tell (a symbolic ref, reftable, a read error)."""
    try:
        with open(os.path.join(git_dir, ref), "rb") as ref_file:
            value = ref_file.read().strip().decode("ascii", "replace")
        return value if _SHA_RE.match(value) else None
    except FileNotFoundError:
        pass
    except OSError:
        return None
    if os.path.exists(os.path.join(git_dir, "reftable")):
        return None
    try:
        with open(os.path.join(git_dir, "packed-refs"), "rb") as packed:
            suffix = b" " + ref.encode()
            for line in packed:
                line = line.rstrip(b"\n")
                if line.endswith(suffix) and not line.startswith((b"#", b"^")):
                    return line.split(b" ", 1)[0].decode("ascii", "replace")
    except FileNotFoundError:
        return ""
    except OSError:
        return None
    return ""


def _strip_suffix(text, suffix):
    return text[:-len(suffix)] if text.endswith(suffix) else text


def _strip_prefix(text, prefix):
    return text[len(prefix):] if text.startswith(prefix) else text


def as_unit_name(name, known):
    """A unit named as systemctl users type it: `web.service` is `web`
    (unless a unit is named `web.service` itself). `known`: a container of
    names, or a predicate."""
    exists = known if callable(known) else known.__contains__
    return name[:-len(UNIT_SUFFIX)] if name.endswith(UNIT_SUFFIX) and not exists(name) else name


_SHA_RE = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?\Z")


class FolderWatcher:
    """inotify on some folders: on_change() when one of the names that
    matter in a folder is made, written, moved or removed (a NAME.lock
    counts as NAME: git writes one, then renames it), or a watched folder
    itself goes. Folders that do not exist yet are watched once they do
    (arm() again after a change). start() raises OSError (or
    AttributeError off glibc) where inotify cannot be had."""

    IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x8, 0x40, 0x80
    IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
    IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000

    def __init__(self, folders, selector, on_change):
        self.folders = folders            # folder -> the names in it that matter
        self.selector, self.on_change = selector, on_change
        self.fd = None
        self.watched = {}                 # watch descriptor -> folder

    def start(self):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        self._add_watch = libc.inotify_add_watch
        fd = libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd = fd
        try:
            self.arm()
            self.selector.register(fd, EVENT_READ, (self._on_events, None))
        except (OSError, ValueError):
            os.close(fd)
            self.fd = None
            raise OSError(errno.EIO, "inotify could not be watched")

    def arm(self):
        mask = (self.IN_MODIFY | self.IN_CLOSE_WRITE | self.IN_MOVED_FROM | self.IN_MOVED_TO |
                self.IN_CREATE | self.IN_DELETE | self.IN_DELETE_SELF | self.IN_MOVE_SELF)
        for folder in self.folders:
            if folder not in self.watched.values() and os.path.isdir(folder):
                wd = self._add_watch(self.fd, folder.encode(), mask)
                if wd >= 0:
                    self.watched[wd] = folder

    def _on_events(self, _arg, _mask):
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        relevant, pos = False, 0
        while pos + 16 <= len(data):
            wd, mask, _cookie, length = struct.unpack_from("iIII", data, pos)
            name = data[pos + 16:pos + 16 + length].rstrip(b"\0").decode("utf-8", "replace")
            pos += 16 + length
            folder = self.watched.get(wd)
            if mask & (self.IN_DELETE_SELF | self.IN_MOVE_SELF):
                self.watched.pop(wd, None)
                relevant = True
            elif folder is not None and _strip_suffix(name, ".lock") in self.folders.get(folder, ()):
                relevant = True
        if relevant:
            self.arm()
            self.on_change()

    def close(self):
        if self.fd is not None:
            unregister_quietly(self.selector, self.fd)
            os.close(self.fd)
            self.fd = None


class RefWatcher:
    """Tells the daemon that a branch moved, without spawning git while nothing
    changes: inotify on the folders of the ref file and packed-refs (mode
    "inotify", a FolderWatcher), else a stat of those files every 0.5 s (mode
    "stat"). The daemon's adaptive poll calls check() too, as a safety net."""

    STAT_INTERVAL = 0.5

    def __init__(self, git_dir, ref, selector, call_later, on_change):
        self.git_dir, self.ref = git_dir, ref
        self.selector, self.call_later, self.on_change = selector, call_later, on_change
        self.last = read_ref_file(git_dir, ref)     # the value last reported
        self.mode = None
        self.stat_timer = None
        self.stamps = None
        parts = ref.split("/")
        # The folders whose entries matter, and the names in them that do.
        folders = {git_dir: {"packed-refs", parts[0]}}
        for depth in range(1, len(parts)):
            folders[os.path.join(git_dir, *parts[:depth])] = {parts[depth]}
        self.inotify = FolderWatcher(folders, selector, self.check)

    def start(self):
        try:
            self.inotify.start()
            self.mode = "inotify"
        except (OSError, AttributeError):
            self.inotify.close()
            self.mode = "stat"
            self.stamps = self._stamps()
            self.stat_timer = self.call_later(self.STAT_INTERVAL, self._stat_tick)
        return self.mode

    def _stamps(self):
        stamps = []
        for path in (os.path.join(self.git_dir, self.ref), os.path.join(self.git_dir, "packed-refs")):
            try:
                info = os.stat(path)
                stamps.append((info.st_ino, info.st_mtime_ns, info.st_size))
            except OSError:
                stamps.append(None)
        return stamps

    def _stat_tick(self):
        self.stat_timer = self.call_later(self.STAT_INTERVAL, self._stat_tick)
        stamps = self._stamps()
        if stamps != self.stamps:
            self.stamps = stamps
            self.check()

    def check(self):
        """Report a change if the ref's value differs from the last one reported
        (None, "cannot tell", is always reported: the daemon then asks git)."""
        value = read_ref_file(self.git_dir, self.ref)
        if value != self.last or value is None:
            self.last = value
            self.on_change()

    def close(self):
        self.inotify.close()
        if self.stat_timer is not None:
            self.stat_timer.cancel()


def git_read_units(repo, commit, known=()):
    """The units of the tree of `commit` (see compose_units): ([(name, path,
    data, blob)], [Diagnostic], {folder: OwnedFolder}), data the [(path,
    bytes)] of its sources, or None for the (path, blob) pairs in `known`
    (already parsed); the folders are those units own (SPEC §13)."""
    listing = run_git(repo, ["ls-tree", "-r", "-t", "-z", "--full-tree", commit])
    files, trees, others = [], {}, []
    for entry in listing.split(b"\0"):
        if not entry:
            continue
        meta, _, path = entry.partition(b"\t")
        mode, kind, blob = meta.split()
        path = path.decode("utf-8", "replace")
        if kind == b"tree":
            trees[path] = blob.decode()
        elif kind == b"blob" and is_unit_source(path):
            # sizes are not listed (that costs git a look at every object): an
            # empty file is the empty blob
            files.append((path, mode == b"120000", 0 if blob.decode() in EMPTY_BLOBS else 1, blob.decode()))
        elif kind == b"blob" and is_other_unit(path) and mode != b"120000":
            others.append((path, blob.decode()))
    links = _git_blobs(repo, [blob for path, is_link, _, blob in files if is_link and path.endswith(UNIT_SUFFIXES)]
                       + [blob for _, blob in others])
    composed, problems = compose_units(files, lambda blob: links.get(blob, b"").decode("utf-8", "replace"))
    for path, blob in others:
        problems.extend(other_unit_problems(path, links.get(blob, b"").decode("utf-8", "replace")))
    wanted = [unit for unit in composed if (unit[1], unit[3]) not in known]
    contents = _git_blobs(repo, sorted({blob for _, _, sources, _ in wanted for _, blob in sources}))
    entries = [(name, path, None if (path, blob) in known else [(source, contents[object_id]) for source, object_id in sources],
                blob) for name, path, sources, blob in composed]
    folders = {os.path.dirname(path) for _, path, _, _ in composed}
    return entries, problems, {folder: OwnedFolder(folder, trees[folder]) for folder in folders if folder in trees}


# The object id of an empty file, in SHA-1 and SHA-256 repositories.
EMPTY_BLOBS = ("e69de29bb2d1d6434b8b29ae775ad8c2e48c5391",
               "473a0f4c3be8a93681a267e3b1e9a7dcda1185436fe141f7749120a303721813")


def _git_blobs(repo, blobs):
    """{object id: bytes} of blobs, read with one git cat-file."""
    if not blobs:
        return {}
    output = run_git(repo, ["cat-file", "--batch"], input_data="".join(b + "\n" for b in blobs).encode())
    found, pos = {}, 0
    for blob in blobs:
        header_end = output.index(b"\n", pos)
        header = output[pos:header_end].split()
        if len(header) < 3:
            raise GitError("git cat-file: object %s is missing" % blob)
        size = int(header[2])
        found[blob] = output[header_end + 1:header_end + 1 + size]
        pos = header_end + 1 + size + 1
    return found


def git_init_repo(repo, branch, example=True):
    """Create the services repository: with one committed example unit, or (for
    remote mode, where commits are fetched) bare and empty."""
    try:
        makedirs(repo)
    except OSError as exc:
        raise GitprocError("cannot create the repository %s: %s" % (repo, describe_os_error(exc)))
    run_git(repo, ["init", "-q"] + ([] if example else ["--bare"]))
    if not example:
        # HEAD names the fetched branch, so that `rollback HEAD~1` and `git log`
        # in this mirror speak of what the remote sent.
        run_git(repo, ["symbolic-ref", "HEAD", REMOTE_REF % branch])
        return
    run_git(repo, ["symbolic-ref", "HEAD", "refs/heads/%s" % branch])
    with open(os.path.join(repo, "hello.service"), "w") as unit_file:
        unit_file.write(HELLO_UNIT)
    run_git(repo, ["add", "hello.service"])
    run_git(repo, _git_identity(repo) + ["commit", "-q", "-m", "Add hello.service, an example unit"])


def _git_identity(repo):
    """-c options naming gitproc as the author, where git has no identity set."""
    if run_git(repo, ["config", "user.email"], check=False)[0] == 0:
        return []
    return ["-c", "user.name=gitproc", "-c", "user.email=gitproc@%s" % socket.gethostname()]


def git_worktree_of(repo, branch):
    """The working tree that has `branch` checked out, or None (bare, or another
    branch checked out)."""
    listing = run_git(repo, ["worktree", "list", "--porcelain"]).decode("utf-8", "replace")
    for block in listing.split("\n\n"):
        fields = dict(line.partition(" ")[::2] for line in block.splitlines())
        if fields.get("branch") == "refs/heads/" + branch and "worktree" in fields:
            return fields["worktree"]
    return None


def owning_folder(path, folders):
    """The nearest folder above `path` that is in `folders`, or ""."""
    folder = os.path.dirname(path)
    while folder and folder not in folders:
        folder = os.path.dirname(folder)
    return folder


def _restored_entries(listing, owned):
    """The ls-tree entries a rollback takes from a commit: unit files and
    drop-ins, and what is below the folders in `owned`."""
    found = []
    for entry in listing.split(b"\0"):
        path = entry.partition(b"\t")[2].decode("utf-8", "surrogateescape")
        if entry and (is_unit_source(path) or owning_folder(path, owned)):
            found.append(entry)
    return found


def _unit_folders(listing):
    """The folders units own in an ls-tree -r listing (SPEC §13)."""
    paths = (entry.partition(b"\t")[2].decode("utf-8", "surrogateescape") for entry in listing.split(b"\0"))
    return {os.path.dirname(path) for path in paths if path.endswith(UNIT_SUFFIX)} - {""}


def git_restore_units(repo, branch, head, target, sign=None):
    """Add a commit on `branch` (at `head`) whose units are those of `target`:
    their unit files and drop-ins, and the folders units own in either commit
    (SPEC §13); other files are untouched. Returns its id, or None if they
    already match. History is only added to. A working tree with the branch
    checked out is fast-forwarded too, and must have no uncommitted changes:
    else GitError, nothing changed."""
    worktree = git_worktree_of(repo, branch)
    if worktree and run_git(worktree, ["status", "--porcelain", "--untracked-files=no"]).strip():
        raise GitError("rollback refused: the working tree %s has uncommitted changes; commit or stash them first" % worktree)
    head_listing = run_git(repo, ["ls-tree", "-r", "-z", head.sha])
    target_listing = run_git(repo, ["ls-tree", "-r", "-z", target.sha])
    owned = _unit_folders(head_listing) | _unit_folders(target_listing)
    index = os.path.join(git_common_dir(repo), "gitproc-rollback.index")
    env = {"GIT_INDEX_FILE": index}
    try:
        run_git(repo, ["read-tree", head.sha], env=env)
        current = [entry.partition(b"\t")[2] for entry in _restored_entries(head_listing, owned)]
        if current:
            run_git(repo, ["update-index", "-z", "--force-remove", "--stdin"], b"\0".join(current) + b"\0", env=env)
        wanted = _restored_entries(target_listing, owned)
        if wanted:
            run_git(repo, ["update-index", "-z", "--index-info"], b"\0".join(wanted) + b"\0", env=env)
        tree = run_git(repo, ["write-tree"], env=env).decode().strip()
    finally:
        _unlink_quietly(index)
    if tree == run_git(repo, ["rev-parse", head.sha + "^{tree}"]).decode().strip():
        return None
    message = "Roll back units to %s\n\nRestores the unit files and the units' folders of %s (%s)." % (
        target.sha[:7], target.sha, target.subject)
    new = run_git(repo, _git_identity(repo) + list(sign or ()) + ["commit-tree", tree, "-p", head.sha, "-m", message]
                  + (["-S"] if sign else [])).decode().strip()
    if worktree:
        run_git(worktree, ["merge", "--ff-only", "-q", new])
    else:
        run_git(repo, ["update-ref", "refs/heads/" + branch, new, head.sha])
    return new


def git_changed_paths(repo, old, new):
    """The paths that differ between two trees (or commits), relative to
    them; every path of `new` when `old` is None."""
    if old is None:
        listing = run_git(repo, ["ls-tree", "-r", "-z", "--name-only", new])
    else:
        listing = run_git(repo, ["diff-tree", "-r", "-z", "--name-only", "--no-renames", old, new])
    return [path.decode("utf-8", "replace") for path in listing.split(b"\0") if path]


# ---- trusted deploys (SPEC §20) ---------------------------------------------------
# Before anything of a new commit is read into a unit, the commit must descend
# from the deployed one (no force-push, no rewind) and, with `verify` set, be
# signed by an allowed key: `git log --format=%G?` with the allowed signers
# (SSH) or a keyring gitproc imports into a folder of its own (OpenPGP), never
# root's own keys. Only %G? = G is trusted: git prints "Good signature" for an
# SSH key that is not in allowed_signers too (%G? = U, "No principal matched").

SSH_SIGNING_GIT = (2, 34)           # the first git that signs and verifies with SSH keys
MAX_VERIFIED_COMMITS = 100          # scope "all": commits verified in one deploy (some 20 ms each)
REFUSAL_REASONS = {                 # reason -> what `status`, `sync` and the metric say
    "not_descendant": "not a descendant of the deployed commit",
    "unsigned": "not signed",
    "key_not_allowed": "signed by a key not allowed",
    "bad_signature": "bad signature",
    "cannot_verify": "cannot verify",
}
SIGNATURE_STATES = {                # git's %G? -> (reason, detail)
    "N": ("unsigned", "is not signed"),
    "B": ("bad_signature", "has a bad signature"),
    "U": ("key_not_allowed", "is signed by a key that is not allowed"),
    "E": ("key_not_allowed", "is signed by a key that is not allowed (unknown to the keyring)"),
    "X": ("key_not_allowed", "has an expired signature"),
    "Y": ("key_not_allowed", "is signed by an expired key"),
    "R": ("key_not_allowed", "is signed by a revoked key"),
}


class Refusal(GitprocError):
    """A commit the daemon will not deploy: `reason` is a REFUSAL_REASONS key."""
    code = "refused"

    def __init__(self, reason, message, sha=None):
        GitprocError.__init__(self, message)
        self.reason, self.sha = reason, sha


class CommitVerifier:
    """Decides whether a commit may be deployed (SPEC §20): descent from the
    deployed commit, then signatures. One `git merge-base` and one `git log`
    per deploy; nothing while no commit arrives."""

    def __init__(self, repo, verify, allow_rewind, gnupg_home):
        self.repo = repo
        self.verify = verify or {}            # {"signers"|"keyring": path, "scope": ...} or {}
        self.allow_rewind = bool(allow_rewind)
        self.gnupg_home = gnupg_home          # the keyring gitproc verifies OpenPGP signatures with
        self.keyring_stamp = None             # (inode, size, mtime) of the keyring imported there

    @property
    def kind(self):
        return "ssh" if "signers" in self.verify else "openpgp" if "keyring" in self.verify else None

    def describe(self):
        """For `status`: what is checked."""
        return {"kind": self.kind, "scope": self.verify.get("scope"), "allow_rewind": self.allow_rewind,
                "file": self.verify.get("signers") or self.verify.get("keyring")}

    def check_ready(self):
        """At daemon start: what verification needs is there (ConfigError if not)."""
        if self.kind is None:
            return
        path = self.verify.get("signers") or self.verify["keyring"]
        if not os.path.isfile(path):
            raise ConfigError("verify: %s %s does not exist (a daemon with verification on deploys nothing "
                              "it cannot verify)" % ("allowed signers file" if self.kind == "ssh" else "keyring", path))
        program = "ssh-keygen" if self.kind == "ssh" else "gpg"
        if find_program(program, os.environ.get("PATH")) is None:
            raise ConfigError("verify: %s not found on PATH: it is needed to check %s signatures" % (
                program, "SSH" if self.kind == "ssh" else "OpenPGP"))
        if self.kind == "ssh" and git_version() < SSH_SIGNING_GIT:
            raise ConfigError("verify: git %s cannot verify SSH signatures (2.34 or newer is needed)" % (
                ".".join(map(str, git_version()))))

    def check(self, commit, deployed_sha, allow_rewind=False, scope=None, signatures=True):
        """Raise Refusal if `commit` (a Commit) may not be deployed over
        `deployed_sha` (None: nothing deployed, or a commit chosen by hand
        such as a pin, checked for its signature alone). With signatures
        False, only its descent is checked."""
        commit_sha = commit.sha
        short = commit_sha[:7]
        if deployed_sha and deployed_sha != commit_sha and deployed_sha not in commit.parents:
            code, _, _ = run_git(self.repo, ["merge-base", "--is-ancestor", deployed_sha, commit_sha], check=False)
            if code != 0 and not (allow_rewind or self.allow_rewind):
                raise Refusal("not_descendant", "commit %s is not a descendant of the deployed commit %s (a force-push "
                              "or a rewound branch; `sync --allow-rewind` accepts it once)" % (
                                  short, deployed_sha[:7]), commit_sha)
        if self.kind is None or not signatures:
            return
        revisions = ["--no-walk", commit_sha]
        if (scope or self.verify.get("scope", "head")) == "all" and deployed_sha and deployed_sha != commit_sha:
            # Every commit the deployed one lacks, a rewound history's included.
            revisions = [commit_sha, "^" + deployed_sha]
            code, out, err = run_git(self.repo, ["rev-list", "--count"] + revisions + ["--"], check=False)
            count = int(out) if code == 0 and out.strip().isdigit() else None
            if count is None:
                raise Refusal("cannot_verify", "cannot verify the commits between the deployed %s and %s: %s" % (
                    deployed_sha[:7], short, (err.decode("utf-8", "replace").strip().splitlines() or ["?"])[0]),
                    commit_sha)
            if count > MAX_VERIFIED_COMMITS:
                raise Refusal("cannot_verify", "%d commits since the deployed %s: scope all verifies at most %d in "
                              "one deploy (supervision waits while it does); verify them by hand, then deploy with "
                              "scope head once" % (count, deployed_sha[:7], MAX_VERIFIED_COMMITS), commit_sha)
        signers = self.verify.get("signers", os.devnull)
        if self.kind == "ssh" and not _nonempty_file(signers):
            raise Refusal("cannot_verify", "cannot verify commit %s: the allowed signers file %s is missing or empty" % (
                short, signers), commit_sha)
        try:
            # The programs git runs are pinned: a repository's or a user's git
            # config naming another gpg.ssh.program must not decide what is trusted.
            pinned = ["-c", "gpg.ssh.allowedSignersFile=" + signers, "-c", "gpg.x509.program=false"]
            for key, program in (("gpg.ssh.program", "ssh-keygen"), ("gpg.program", "gpg"),
                                 ("gpg.openpgp.program", "gpg")):
                pinned += ["-c", "%s=%s" % (key, find_program(program, os.environ.get("PATH")) or "false")]
            code, out, err = run_git(self.repo, pinned + ["log", "--no-show-signature", "--format=%H %G? %GK"]
                                     + revisions + ["--"], check=False, env={"GNUPGHOME": self._gnupg_home()})
        except (GitError, OSError) as exc:
            raise Refusal("cannot_verify", "cannot verify commit %s: %s" % (short, exc), commit_sha)
        if code != 0:
            complaint = (err.decode("utf-8", "replace").strip().splitlines() or ["exit code %d" % code])[0]
            raise Refusal("cannot_verify", "cannot verify commit %s: %s" % (short, complaint), commit_sha)
        for line in out.decode("utf-8", "replace").splitlines():
            sha, state, key = (line.split(" ", 2) + ["", ""])[:3]
            if state == "G":
                continue
            reason, detail = SIGNATURE_STATES.get(state, ("cannot_verify", "has a signature git cannot check (%s)" % state))
            which = "commit %s" % sha[:7] if sha == commit_sha else "commit %s (between the deployed %s and %s)" % (
                sha[:7], deployed_sha[:7], short)
            raise Refusal(reason, "%s %s%s" % (which, detail, " (key %s)" % key if key.strip() else ""), commit_sha)

    def _gnupg_home(self):
        """The folder git's gpg reads keys from: gitproc's own, holding the
        configured keyring (imported again when that file changes) and
        trusting every key in it; empty in SSH mode, so that no key of
        root's own counts."""
        home = self.gnupg_home
        if self.kind != "openpgp":
            makedirs(home, 0o700)
            return home
        keyring = self.verify["keyring"]
        info = os.stat(keyring)
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
        if stamp == self.keyring_stamp and os.path.isdir(home):
            return home
        fresh = "%s.new-%d" % (home, os.getpid())
        remove_tree(fresh)
        os.makedirs(fresh, 0o700)
        with open(os.path.join(fresh, "gpg.conf"), "w") as conf:
            conf.write("trust-model always\n")       # the keyring is the list of allowed keys
        code, _, err = _run_captured(["gpg", "--batch", "--quiet", "--no-autostart", "--homedir", fresh,
                                      "--import", keyring], b"", GIT_TIMEOUT)
        if code != 0:
            remove_tree(fresh)
            raise GitError("gpg --import %s failed: %s" % (keyring, (err.decode("utf-8", "replace").strip().splitlines()
                                                                     or ["exit code %d" % code])[-1]))
        remove_tree(home)
        os.rename(fresh, home)
        self.keyring_stamp = stamp
        return home


def _nonempty_file(path):
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False


def git_version():
    """git's version as a tuple of ints, (0,) if it cannot be told."""
    try:
        text = run_git("/", ["--version"]).decode("ascii", "replace")
    except GitError:
        return (0,)
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(part) for part in match.groups() if part is not None) if match else (0,)


class SourceWatcher:
    """Notices new commits. Local mode: a RefWatcher on the branch (inotify,
    else stat; no git while nothing changes). Remote mode: `git fetch` as a
    watched child of the loop, never waited for. Both: the adaptive safety
    poll of PERFORMANCE-GUIDE.md. What it finds goes to deployer.deploy_head."""

    def __init__(self, config, log, selector, call_later, exit_watcher, deployer):
        self.config, self.log = config, log
        self.selector, self.call_later = selector, call_later
        self.exit_watcher = exit_watcher
        self.deployer = deployer
        self.ref_watcher = None           # RefWatcher of the branch (local mode)
        self.git_dir = None               # where the branch's ref files are
        self.poll_timer = None
        self.poll_delay = config.poll_interval
        self.quiet_polls = 0              # polls in a row that found nothing new
        self.polled_count = 0             # deployer.deploy_count when the poll last adapted
        self.fetch_pid = None             # git fetch running (remote mode)
        self.fetch_output = None          # memfd with its output
        self.fetch_timer = None
        self.fetch_waiters = []           # finish(error) callbacks for the running fetch
        self.next_fetch_waiters = []      # ... for the fetch after it
        self.fetch_deploys = False        # the running fetch deploys what it fetched
        self.next_fetch_deploys = False
        self.last_fetch = None

    @property
    def mode(self):
        return self.ref_watcher.mode if self.ref_watcher else None

    def start(self):
        """Local mode: watch the branch. Remote mode: a fetch now. Both: the poll."""
        if self.config.remote:
            self.start_fetch()
        else:
            try:
                self.git_dir = git_common_dir(self.config.repo_path)
            except GitError as exc:
                self.log.warning("daemon", "Cannot watch the repository (%s); polling it with git" % exc)
            else:
                self.ref_watcher = RefWatcher(self.git_dir, "refs/heads/" + self.config.branch, self.selector,
                                              self.call_later, lambda: self.check_branch("commit"))
                self.log.info("daemon", "Watching %s for new commits (%s)" % (
                    os.path.join(self.git_dir, "refs/heads", self.config.branch), self.ref_watcher.start()))
                self.check_branch("commit")  # a commit that landed before the watch began
        self.poll_timer = self.call_later(self.poll_delay, self._poll_due)

    def close(self):
        self.kill_fetch()
        if self.ref_watcher is not None:
            self.ref_watcher.close()

    def replan_poll(self):
        """The poll intervals changed (daemon-reload): the next poll is due
        one new interval from now."""
        self.quiet_polls, self.poll_delay = 0, self.config.poll_interval
        if self.poll_timer is not None:
            self.poll_timer.cancel()
            self.poll_timer = self.call_later(self.poll_delay, self._poll_due)

    def _poll_due(self):
        """The performance guide's adaptive poll: every poll_interval, stretched to
        max_poll_interval after 3 quiet checks, back at once on a change."""
        try:
            if self.config.remote:
                self.start_fetch()            # _fetch_finished adapts the delay
            else:
                self.check_branch("poll")
                self._adapt_poll(self.deployer.deploy_count > self.polled_count)
        finally:                              # whatever happened, the safety net stays
            self.poll_timer = self.call_later(self.poll_delay, self._poll_due)

    def check_branch(self, trigger):
        """Deploy if the branch's ref differs from the deployed commit, or the last
        deploy failed (retried at each poll). Reads ref files only: no git while
        nothing changed and nothing is broken."""
        deployer = self.deployer
        value = read_ref_file(self.git_dir, "refs/heads/" + self.config.branch) if self.git_dir else None
        if value and deployer.refused and value == deployer.refused["sha"]:
            deployer.looked()                 # refused already: tried again when the branch moves
            return
        failed = bool(deployer.last_sync and deployer.last_sync.get("error"))
        if value is None or failed or value != (deployer.deployed.sha if deployer.deployed else ""):
            deployer.deploy_head(trigger)
        else:
            deployer.looked(on_deployed=True)

    def _adapt_poll(self, changed):
        self.polled_count = self.deployer.deploy_count
        if changed:
            self.quiet_polls, self.poll_delay = 0, self.config.poll_interval
        else:
            self.quiet_polls += 1
            if self.quiet_polls >= 3:
                self.poll_delay = self.config.max_poll_interval

    def fetched_yet(self):
        try:
            return bool(read_ref_file(git_common_dir(self.config.repo_path), REMOTE_REF % self.config.branch))
        except GitError:
            return False

    def start_fetch(self, deploy=True):
        """`git fetch` of remote/branch into a private ref, as a child of the loop:
        its exit is watched like a service's, so supervision never waits for it.
        With deploy=False (for `diff`) the fetched commit waits for the next
        poll or `sync` to be deployed."""
        self.fetch_deploys = self.fetch_deploys or deploy
        if self.fetch_pid is not None:
            return
        git = find_program("git", os.environ.get("PATH"))
        argv = ["git", "-C", self.config.repo_path, "fetch", "--quiet", "--no-tags", self.config.remote,
                "+refs/heads/%s:%s" % (self.config.branch, REMOTE_REF % self.config.branch)]
        output = os.memfd_create("gitproc-fetch", os.MFD_CLOEXEC)
        try:
            if git is None:
                raise OSError(errno.ENOENT, "git not found on PATH")
            # In a process group of its own, so that a timeout or a shutdown
            # also ends what git started (ssh, credential helpers).
            pid = os.posix_spawn(git, argv, git_environment(), file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, output, 1), (os.POSIX_SPAWN_DUP2, output, 2)],
                setpgroup=0, setsigdef=(signal.SIGPIPE,))
        except OSError as exc:
            os.close(output)
            self._fetch_finished("cannot run git fetch: %s" % (exc.strerror or exc))
            return
        self.fetch_pid, self.fetch_output = pid, output
        self.fetch_timer = self.call_later(FETCH_TIMEOUT, self.kill_fetch)
        self.exit_watcher.watch(pid, self._on_fetch_exit)

    def kill_fetch(self):
        if self.fetch_pid is not None:
            try:
                os.killpg(self.fetch_pid, signal.SIGKILL)   # still our unreaped child: safe
            except OSError:
                pass

    def _on_fetch_exit(self, exit_info):
        self.fetch_timer.cancel()
        text = os.pread(self.fetch_output, 4096, 0).decode("utf-8", "replace").strip()
        os.close(self.fetch_output)
        self.fetch_pid = self.fetch_output = None
        error = None
        if exit_info != {"code": 0}:
            lines = text.splitlines()
            complaints = [line for line in lines if line.startswith(("fatal:", "error:"))]
            detail = (complaints or lines or [describe_exit(exit_info)])[0]
            if exit_info == {"signal": signal.SIGKILL}:
                detail = "timed out after %ds" % FETCH_TIMEOUT
            error = "git fetch %s %s failed: %s" % (self.config.remote, self.config.branch, detail)
        self._fetch_finished(error)

    def _fetch_finished(self, error):
        """Deploy what was fetched (or report why not), then answer sync/diff
        requests that waited for this fetch."""
        self.last_fetch = {"time": time.time(), "result": "error" if error else "ok", "error": error}
        before = self.deployer.deploy_count
        if error:
            self.deployer.record_error("fetch", error)
        elif self.fetch_deploys:
            self.deployer.target.release_outdated_pin()
            self.deployer.deploy_head("fetch")
        self.fetch_deploys = False
        if error:
            self.deployer.sync_asked = None       # that sync failed: its --allow-rewind goes with it
        self._adapt_poll(self.deployer.deploy_count > before)
        waiting, self.fetch_waiters = self.fetch_waiters, []
        for finish in waiting:
            finish(error)
        if self.next_fetch_waiters:
            self.fetch_waiters, self.next_fetch_waiters = self.next_fetch_waiters, []
            deploy, self.next_fetch_deploys = self.next_fetch_deploys, False
            self.start_fetch(deploy)

    def after_fetch(self, finish, deploy):
        """Run finish(error) once a fetch that starts from now on has completed."""
        if self.fetch_pid is None:
            self.fetch_waiters.append(finish)
            self.start_fetch(deploy)
        else:
            self.next_fetch_waiters.append(finish)
            self.next_fetch_deploys = self.next_fetch_deploys or deploy


# ==== 8. execution environment ===============================================
# How one process of a unit is made: its user (RunAs), its limits and
# scheduling (ProcessSetup), the sandbox and its system call filters, its
# cgroups, the Spawner (fork/exec, posix_spawn or clone3 of one command), the
# ExitWatcher (learns of exits through pidfds, SIGCHLD or, as a last resort,
# polling) and the notify socket. Nothing here knows of phases or policy.

STARTING, RUNNING, STOPPING, BACKOFF = "starting", "running", "stopping", "backoff"
STOPPED, EXITED, FAILED = "stopped", "exited", "failed"
RELOADING = "reloading"
ACTIVE_STATES = (STARTING, RUNNING, RELOADING, STOPPING)      # a process of the service may exist
SETTLED_STATES = (RUNNING, RELOADING, STOPPED, EXITED, FAILED, BACKOFF)
CLEAN_EXIT_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RunAs:
    """The credentials and home a service's processes get (resolved in the daemon,
    applied in the child between fork and exec)."""
    __slots__ = ("uid", "gid", "groups", "user", "home", "shell")

    def __init__(self, uid=None, gid=None, groups=None, user=None, home=None, shell=None):
        self.uid, self.gid, self.groups = uid, gid, groups
        self.user, self.home, self.shell = user, home, shell


def resolve_run_as(user, group):
    """User=/Group= (names or numbers) -> RunAs; SpawnError with the reason if
    they do not exist or the daemon may not switch to them."""
    import grp
    import pwd
    if user is None and group is None:
        try:
            entry = pwd.getpwuid(os.geteuid())
            return RunAs(user=entry.pw_name, home=entry.pw_dir, shell=entry.pw_shell)
        except KeyError:
            return RunAs(home="/")
    run_as = RunAs()
    if user is not None:
        try:
            entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        except KeyError:
            raise SpawnError("User=%s: no such user" % user)
        run_as.uid, run_as.gid, run_as.user = entry.pw_uid, entry.pw_gid, entry.pw_name
        run_as.home, run_as.shell = entry.pw_dir, entry.pw_shell
        run_as.groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    if group is not None:
        try:
            run_as.gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError:
            raise SpawnError("Group=%s: no such group" % group)
    wanted = (run_as.uid, run_as.gid)
    if os.geteuid() != 0 and wanted != (None, None) and wanted not in ((os.geteuid(), os.getegid()), (None, os.getegid()), (os.geteuid(), None)):
        raise SpawnError("User=/Group= need the daemon to run as root (it runs as uid %d)" % os.geteuid())
    if os.geteuid() != 0:
        run_as.groups = None
    return run_as


# DynamicUser=: systemd's range of dynamic uids, and where the ones in use are
# recorded (a file per uid holding the user's name, while a unit runs as it).
DYNAMIC_UIDS = (61184, 65519)
DYNAMIC_USERS = "/run/gitproc/dynamic-uid"


def dynamic_run_as(name, group):
    """RunAs of DynamicUser=: the static user `name` if the machine has one
    (as systemd uses it); else a uid from 61184-65519 chosen by a hash of
    the name, so the same one each time while it is free, with the group of
    that number, or the static Group=. HOME=/ and no shell, as systemd."""
    import grp
    import pwd
    import zlib
    try:
        pwd.getpwnam(name)
        return resolve_run_as(name, group)
    except KeyError:
        pass
    low, high = DYNAMIC_UIDS
    size = high - low + 1
    makedirs(DYNAMIC_USERS)
    start = zlib.crc32(name.encode()) % size
    for step in range(size):
        uid = low + (start + step) % size
        record = os.path.join(DYNAMIC_USERS, str(uid))
        try:
            if _read_text(record) == name:
                break
            continue                      # another unit's
        except FileNotFoundError:
            pass
        try:
            pwd.getpwuid(uid)
            continue                      # a static user has it
        except KeyError:
            pass
        try:
            fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue
        try:
            os.write(fd, name.encode())
        finally:
            os.close(fd)
        break
    else:
        raise SpawnError("DynamicUser=: no free uid in %d-%d" % DYNAMIC_UIDS)
    gid = uid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError:
            pass                          # a dynamic group of the same number
    return RunAs(uid=uid, gid=gid, groups=[gid], user=name, home="/", shell="/usr/sbin/nologin")


def dynamic_uid_of(name):
    """The dynamic uid recorded for `name`, or None."""
    for entry in os.listdir(DYNAMIC_USERS) if os.path.isdir(DYNAMIC_USERS) else ():
        try:
            if _read_text(os.path.join(DYNAMIC_USERS, entry)) == name:
                return int(entry)
        except (OSError, ValueError):
            pass
    return None


def release_dynamic_user(name):
    """The record of `name`'s dynamic uid goes once no process runs as it."""
    for entry in os.listdir(DYNAMIC_USERS) if os.path.isdir(DYNAMIC_USERS) else ():
        record = os.path.join(DYNAMIC_USERS, entry)
        try:
            if _read_text(record) == name and not processes_of_uid(int(entry)):
                os.unlink(record)
        except (OSError, ValueError):
            pass


def processes_of_uid(uid):
    """Whether a process (not a zombie) runs as `uid`."""
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat("/proc/" + entry).st_uid == uid and \
                    _read_text("/proc/%s/stat" % entry).rpartition(")")[2].split()[0] != "Z":
                return True
        except (OSError, IndexError):
            pass
    return False


# LoadCredential=/SetCredential=: where a relative path is looked up, and the
# most a credential may hold, as systemd.
CREDENTIAL_STORES = ("/etc/credstore", "/run/credstore", "/usr/lib/credstore")
MAX_CREDENTIAL_BYTES = 1 << 20


def read_credentials(credentials):
    """{id: bytes} of a unit's LoadCredential=/SetCredential=: a file, each
    file of a folder (as ID_NAME), what an AF_UNIX socket sends, the file
    of that id in a credential store (a relative path) or in the daemon's
    own $CREDENTIALS_DIRECTORY (no path); SetCredential= is the value of an
    id nothing was loaded for. SpawnError naming what could not be read."""
    loaded, fallback = {}, {}
    for key, name, source in credentials:
        if key == "SetCredential":
            fallback[name] = source
            continue
        candidates = [source] if source.startswith("/") else \
            [os.path.join(store, source) for store in CREDENTIAL_STORES] + (
                [os.path.join(os.environ["CREDENTIALS_DIRECTORY"], source)] if os.environ.get("CREDENTIALS_DIRECTORY")
                else [])
        path = next((c for c in candidates if os.path.exists(c)), None)
        try:
            if path is None:
                raise FileNotFoundError(errno.ENOENT, "not found in %s" % ", ".join(candidates))
            if os.path.isdir(path):
                for entry in sorted(os.listdir(path)):
                    if os.path.isfile(os.path.join(path, entry)):
                        loaded["%s_%s" % (name, entry)] = _read_credential(os.path.join(path, entry))
            elif stat.S_ISSOCK(os.stat(path).st_mode):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                    connection.settimeout(5)
                    connection.connect(path)
                    connection.shutdown(socket.SHUT_WR)
                    chunks = []
                    while sum(map(len, chunks)) <= MAX_CREDENTIAL_BYTES:
                        chunks.append(connection.recv(65536))
                        if not chunks[-1]:
                            break
                    loaded[name] = b"".join(chunks)
            else:
                loaded[name] = _read_credential(path)
        except OSError as exc:
            if not any(k == "SetCredential" and n == name for k, n, _ in credentials):   # else its value
                raise SpawnError("LoadCredential=%s:%s: %s" % (name, source, describe_os_error(exc)))
        if len(loaded.get(name, b"")) > MAX_CREDENTIAL_BYTES:
            raise SpawnError("LoadCredential=%s: more than %d bytes" % (name, MAX_CREDENTIAL_BYTES))
    return dict(fallback, **loaded)


def _read_credential(path):
    with open(path, "rb") as handle:
        data = handle.read(MAX_CREDENTIAL_BYTES + 1)
    if len(data) > MAX_CREDENTIAL_BYTES:
        raise OSError(errno.EFBIG, "more than %d bytes" % MAX_CREDENTIAL_BYTES)
    return data


class ProcessSetup:
    """What a service's process sets on itself between fork and exec, before
    it drops privileges, in systemd's order: rlimits (resource number, soft,
    hard), umask, nice, oom_score_adj, coredump_filter, CPU scheduling and
    affinity, NUMA policy, I/O priority, timer slack, personality. Empty
    (falsy) when there is nothing to set: then it may be started with
    posix_spawn. SpawnError for what cannot be set here."""
    __slots__ = ("rlimits", "umask", "nice", "oom_score_adjust", "lowered", "cpu_scheduling", "cpu_affinity",
                 "io_priority", "syscall", "coredump_filter", "numa", "timer_slack", "personality", "libc")

    def __init__(self, spec):
        import resource
        limits = {}
        for name, soft, hard in spec.rlimits:         # the last Limit*= of a resource wins
            limits[name] = (soft, hard)
        self.rlimits, self.lowered = [], []
        for name, (soft, hard) in sorted(limits.items()):
            soft, hard = (resource.RLIM_INFINITY if v is None else v for v in (soft, hard))
            if name == "NOFILE":                       # as systemd: no more than the kernel allows
                soft, hard = (min(v if v != resource.RLIM_INFINITY else 1 << 62, _nr_open()) for v in (soft, hard))
            number = getattr(resource, "RLIMIT_" + name)
            ceiling = _hard_limit_ceiling(number, hard)
            if ceiling is not None:                    # a container's hard limit this daemon may not raise
                self.lowered.append("Limit%s=%s lowered to the hard limit %d: the daemon may not raise it" % (
                    name, "infinity" if hard == resource.RLIM_INFINITY else hard, ceiling))
                soft, hard = (ceiling if soft == resource.RLIM_INFINITY else min(soft, ceiling)), ceiling
            self.rlimits.append((name, number, soft, hard))
        self.umask, self.nice, self.oom_score_adjust = spec.umask, spec.nice, spec.oom_score_adjust
        self.cpu_scheduling = None        # (policy with its flags, priority)
        if spec.cpu_scheduling_policy is not None or spec.cpu_scheduling_priority is not None:
            policy = getattr(os, CPU_POLICIES[spec.cpu_scheduling_policy or "other"])
            priority = spec.cpu_scheduling_priority or 0
            low, high = os.sched_get_priority_min(policy), os.sched_get_priority_max(policy)
            if not low <= priority <= high:
                raise SpawnError("CPUSchedulingPriority=%d is outside %d-%d of CPUSchedulingPolicy=%s" % (
                    priority, low, high, spec.cpu_scheduling_policy or "other"))
            if spec.cpu_scheduling_reset_on_fork:
                policy |= os.SCHED_RESET_ON_FORK
            self.cpu_scheduling = (policy, priority)
        self.cpu_affinity = set(spec.cpu_affinity) or None
        self.io_priority = self.syscall = None
        if spec.io_scheduling_class is not None or spec.io_scheduling_priority is not None:
            klass = spec.io_scheduling_class if spec.io_scheduling_class is not None else 2   # best-effort
            level = 0 if klass in (0, 3) else (spec.io_scheduling_priority if spec.io_scheduling_priority is not None
                                               else 4)
            self.io_priority = (klass << 13) | level        # IOPRIO_PRIO_VALUE(class, data)
            self.syscall = _ioprio_set_syscall()
        self.coredump_filter = None
        for mask in spec.coredump_filter:
            self.coredump_filter = (self.coredump_filter or 0) | mask
        self.timer_slack, self.numa, self.personality, self.libc = spec.timer_slack_nsec, None, None, None
        if spec.personality is not None:
            if spec.personality not in PERSONALITIES or os.uname().machine != "x86_64":
                raise SpawnError("Personality=%s: not a personality of this machine (%s)" % (
                    spec.personality, os.uname().machine))
            self.personality = PERSONALITIES[spec.personality]
        if spec.numa_policy not in (None, "default") or spec.numa_mask:
            mode = NUMA_POLICIES[spec.numa_policy or "default"]
            nodes = set(spec.numa_mask)
            if mode in (1, 2, 3) and not nodes:
                raise SpawnError("NUMAPolicy=%s needs NUMAMask=" % spec.numa_policy)
            mask = sum(1 << node for node in nodes) if mode in (1, 2, 3) else 0
            self.numa = (mode, mask, _set_mempolicy_syscall())
        if any(v is not None for v in (self.timer_slack, self.personality, self.numa)):
            import ctypes
            self.libc = ctypes.CDLL(None, use_errno=True)

    def __bool__(self):
        return bool(self.rlimits) or any(v is not None for v in (
            self.umask, self.nice, self.oom_score_adjust, self.cpu_scheduling, self.cpu_affinity, self.io_priority,
            self.coredump_filter, self.numa, self.timer_slack, self.personality))

    def apply_late(self):
        """In the child, after the I/O priority: NUMA policy, timer slack,
        personality (each raising OSError with its key)."""
        if self.libc is None:
            return                        # none of them: nothing imported in the child
        ctypes = __import__("ctypes")
        for what, result in (("NUMAPolicy=", lambda: self.numa[2](self.numa[0], self.numa[1]) if self.numa else 0),
                             ("TimerSlackNSec=", lambda: self.libc.prctl(29, ctypes.c_ulong(self.timer_slack), 0, 0, 0)
                              if self.timer_slack is not None else 0),      # PR_SET_TIMERSLACK
                             ("Personality=", lambda: 0 if self.personality is None or
                              self.libc.personality(self.personality) != -1 else -1)):
            if result() != 0:
                number = ctypes.get_errno()
                raise OSError(number, "%s %s" % (what, os.strerror(number)))


IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "riscv64": 30, "i686": 289, "i386": 289, "armv7l": 314,
              "ppc64le": 273, "s390x": 282}


SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237, "i686": 276, "i386": 276}


def _set_mempolicy_syscall():
    """set_mempolicy(2) as a callable (mode, node mask) made in the daemon."""
    import ctypes
    number = SET_MEMPOLICY.get(os.uname().machine)
    if number is None:
        raise SpawnError("NUMAPolicy=: set_mempolicy's number is not known for %s" % os.uname().machine)
    libc = ctypes.CDLL(None, use_errno=True)
    return lambda mode, mask: libc.syscall(number, mode, ctypes.byref(ctypes.c_ulong(mask)) if mask else None,
                                           ctypes.c_ulong(64 if mask else 0))


def _ioprio_set_syscall():
    """ioprio_set(2) (no libc wrapper): a callable (which, who, value) made
    in the daemon, so the child only calls it. SpawnError on an unknown
    machine."""
    import ctypes
    number = IOPRIO_SET.get(os.uname().machine)
    if number is None:
        raise SpawnError("IOSchedulingClass=: ioprio_set is not known on %s" % os.uname().machine)
    libc = ctypes.CDLL(None, use_errno=True)

    def ioprio_set(value):
        if libc.syscall(number, 1, 0, value) != 0:    # IOPRIO_WHO_PROCESS, this process
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return ioprio_set


def _hard_limit_ceiling(number, wanted):
    """The daemon's hard limit of resource `number` when `wanted` is above it
    and it may not be raised (no CAP_SYS_RESOURCE, as in many containers),
    else None. Tried on the daemon itself, and put back."""
    import resource
    soft, hard = resource.getrlimit(number)
    if hard == resource.RLIM_INFINITY or (wanted != resource.RLIM_INFINITY and wanted <= hard):
        return None
    try:
        resource.setrlimit(number, (soft, wanted))
    except (ValueError, OSError):
        return hard
    resource.setrlimit(number, (soft, hard))
    return None


def _nr_open():
    try:
        return int(_read_text("/proc/sys/fs/nr_open"))
    except (OSError, ValueError):
        return 1 << 20


# ---- the sandbox -----------------------------------------------------------------
# systemd.exec(5)'s sandbox, built as systemd builds it: in the forked child,
# a mount namespace (slave of the host's, so nothing leaks back) in which
# paths are bound onto themselves and made read-only, read-write, noexec or
# inaccessible, from the least to the most specific path; a private /tmp, a
# private /dev, a network namespace with only loopback, a hostname of its
# own; then the capability bounding set, and after the user change the
# ambient capabilities and no_new_privs. All of it goes through ctypes
# (mount, mount_setattr, unshare, prctl, capset). Any step that fails ends
# the child before exec with the step named: never a half-built sandbox.

CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWNET = 0x04000000, 0x08000000, 0x40000000
MS_RDONLY, MS_BIND, MS_MOVE, MS_SLAVE = 1, 4096, 8192, 1 << 19
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOEXEC, AT_RECURSIVE, AT_FDCWD = 0x1, 0x8, 0x8000, -100
MOUNT_SETATTR = 442                   # the same number on every architecture (Linux 5.12+)
PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 8, 24, 38, 47, 2
SANDBOX_KEYS = ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "PrivateNetwork", "PrivateIPC", "PrivateMounts",
                "ProtectSystem", "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectControlGroups", "ProtectHostname", "ProtectClock", "ReadWritePaths", "ReadOnlyPaths",
                "InaccessiblePaths", "ExecPaths", "NoExecPaths", "TemporaryFileSystem", "BindPaths",
                "BindReadOnlyPaths", "CapabilityBoundingSet", "AmbientCapabilities", "RestrictSUIDSGID",
                "LockPersonality", "SystemCallFilter", "SystemCallErrorNumber", "SystemCallArchitectures",
                "SystemCallLog", "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime",
                "MemoryDenyWriteExecute", "ProtectProc", "ProcSubset", "PrivateUsers", "SecureBits", "DynamicUser")
# The keys that are system call filters only: a daemon that is not root
# applies them too (with no_new_privs, as systemd does for such a process).
SECCOMP_ONLY_KEYS = ("RestrictSUIDSGID", "LockPersonality", "SystemCallFilter", "SystemCallErrorNumber",
                     "SystemCallArchitectures", "SystemCallLog", "RestrictAddressFamilies", "RestrictNamespaces",
                     "RestrictRealtime", "MemoryDenyWriteExecute")
# Keys that are mounts, namespaces or capabilities and a system call filter.
SECCOMP_HALF_KEYS = ("ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectClock",
                     "PrivateDevices", "ProtectHostname")
# What each Protect*= makes read-only (ro) or inaccessible, where it exists.
PROTECTED_PATHS = {
    "system-yes": [("ro", "/usr"), ("ro", "/boot"), ("ro", "/efi")],
    "system-full": [("ro", "/usr"), ("ro", "/boot"), ("ro", "/efi"), ("ro", "/etc")],
    "system-strict": [("ro-all", "/")],
    "home-yes": [("inaccessible", "/home"), ("inaccessible", "/root"), ("inaccessible", "/run/user")],
    "home-read-only": [("ro", "/home"), ("ro", "/root"), ("ro", "/run/user")],
    "home-tmpfs": [("tmpfs-ro", "/home"), ("tmpfs-ro", "/root"), ("tmpfs-ro", "/run/user")],
    "kernel-tunables": [("ro", "/proc/sys"), ("ro", "/proc/sysrq-trigger"), ("ro", "/proc/bus"), ("ro", "/proc/fs"),
                        ("ro", "/proc/irq"), ("ro", "/sys"), ("inaccessible", "/proc/kallsyms"),
                        ("inaccessible", "/proc/kcore")],
    "kernel-modules": [("inaccessible", "/usr/lib/modules"), ("inaccessible", "/lib/modules")],
    "kernel-logs": [("inaccessible", "/proc/kmsg"), ("inaccessible", "/dev/kmsg")],
    "control-groups": [("ro", "/sys/fs/cgroup")],
}
DEVICE_NODES = ("null", "zero", "full", "random", "urandom", "tty")


# The UnitSpec fields of the sandbox keys, as the directive table names them.
SANDBOX_FIELDS = tuple(sorted({DIRECTIVES[("Service", key)][0] for key in SANDBOX_KEYS}))
UNSET = (None, False, "no", (), "default", "all")     # what a sandbox field holds when its key asks for nothing


def sandbox_wanted(spec):
    """Whether a unit asks for any of the sandbox."""
    return any(getattr(spec, field) not in UNSET for field in SANDBOX_FIELDS)


def sandbox_not_applied(spec):
    """The sandbox keys a daemon that is not root cannot apply (all but
    NoNewPrivileges= and the system call filters): [(key, why)] for status."""
    if not sandbox_wanted(spec):
        return []
    if os.geteuid() == 0:
        return [(key, "its system call filter: no system call table for %s here" % os.uname().machine)
                for key in SECCOMP_HALF_KEYS if os.uname().machine not in SECCOMP_MACHINES and _sandbox_key_set(spec, key)]
    return [(key, "needs a root daemon (namespaces, mounts, capabilities)%s"
             % ("; its system call filter is applied" if key in SECCOMP_HALF_KEYS else ""))
            for key in SANDBOX_KEYS if key != "NoNewPrivileges" and key not in SECCOMP_ONLY_KEYS
            and _sandbox_key_set(spec, key)]


def _sandbox_key_set(spec, key):
    """Whether the unit sets sandbox key `key` (some share a field: the
    paths keys, BindPaths= and BindReadOnlyPaths=)."""
    value = getattr(spec, DIRECTIVES[("Service", key)][0])
    if key in PATH_KEYS:
        return any(mode == PATH_KEYS[key] for mode, _, _ in value)
    if key in ("BindPaths", "BindReadOnlyPaths"):
        return any(read_only == (key == "BindReadOnlyPaths") for _, _, read_only, _, _ in value)
    return value not in UNSET


# RemoveIPC=: /proc/sysvipc's tables, the columns of an object's id, owner uid
# and gid, and the call that removes it (IPC_RMID is 0).
SYSV_IPC = (("shm", 1, 7, 8, "shmctl"), ("sem", 1, 4, 5, "semctl"), ("msg", 1, 7, 8, "msgctl"))


def remove_ipc(uid, gid):
    """RemoveIPC=: the System V semaphores, shared memory and message queues,
    and the POSIX shared memory and message queues (/dev/shm, /dev/mqueue)
    owned by uid or gid go, as systemd removes them; not while a process of
    that user still runs (another unit's), never root's. The names of what
    went."""
    uid = uid if uid else None            # root's are never removed
    gid = gid if gid else None
    if (uid is None and gid is None) or (uid is not None and processes_of_uid(uid)):
        return []                         # (its last process is not gone yet)
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    removed = []
    for table, id_column, uid_column, gid_column, call in SYSV_IPC:
        try:
            rows = [line.split() for line in _read_text("/proc/sysvipc/" + table).splitlines()[1:]]
        except OSError:
            continue
        for row in rows:
            if int(row[uid_column]) == uid or int(row[gid_column]) == gid:
                arguments = (int(row[id_column]), 0, 0) if call == "semctl" else (int(row[id_column]), 0, None)
                if getattr(libc, call)(*arguments) == 0:
                    removed.append("System V %s %s" % (table, row[id_column]))
    for folder in ("/dev/shm", "/dev/mqueue"):
        for top, _, names in os.walk(folder) if os.path.isdir(folder) else ():
            for name in names:
                path = os.path.join(top, name)
                try:
                    found = os.lstat(path)
                    if found.st_uid == uid or found.st_gid == gid:
                        os.unlink(path)
                        removed.append(path)
                except OSError:
                    pass
    return removed


class Sandbox:
    """The plan of one process's sandbox, made in the daemon (paths checked,
    PrivateTmp= folders made, ctypes looked up), carried out in the child by
    enter() (before the user change) and finish() (after it)."""

    def __init__(self, spec, private_tmp=None, helpers=None, dropping_user=False, extra_writable=(), full=True,
                 private_folders=None, joined=None):
        """`full`: False for a daemon that is not root, which can only set
        no_new_privs and load system call filters. Raises SpawnError where
        the filters cannot be had (no system call table for this machine)."""
        import ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.ctypes = ctypes
        self.unshare = 0
        self.steps = []                   # (what, path, argument, optional), least specific path first
        self.no_new_privs = spec.no_new_privileges
        self.loopback = False
        self.drop_caps, self.ambient = [], []
        self.user_namespace = False       # PrivateUsers=: made between the group and the user change
        self.secure_bits = 0              # SecureBits=, set before the user change
        self.joined = dict(joined or {})  # JoinsNamespaceOf=: namespace flag -> /proc/PID/ns/... to enter instead
        persona = self.libc.personality(0xffffffff) & 0xffffffff if spec.lock_personality else None
        self.filters = seccomp_filters(spec, persona)   # [(keys, program, packed)], loaded by seal()
        if full:
            self._plan(spec, private_tmp, helpers, dropping_user, extra_writable, private_folders or {})

    def _plan(self, spec, private_tmp, helpers, dropping_user, extra_writable, private_folders):
        self.user_namespace = spec.private_users
        for bits in spec.secure_bits:
            self.secure_bits |= bits
        bounding = capability_set(spec.capability_bounding_set)
        drops = set()
        if spec.private_devices:
            drops |= {CAPABILITIES.index("CAP_MKNOD"), CAPABILITIES.index("CAP_SYS_RAWIO")}
        if spec.protect_kernel_modules:
            drops.add(CAPABILITIES.index("CAP_SYS_MODULE"))
        if spec.protect_kernel_logs:
            drops.add(CAPABILITIES.index("CAP_SYSLOG"))
        if spec.protect_clock:
            drops |= {CAPABILITIES.index("CAP_SYS_TIME"), CAPABILITIES.index("CAP_WAKE_ALARM")}
        last = _cap_last_cap()
        keep = set(range(last + 1)) if bounding is None else bounding
        self.drop_caps = sorted(c for c in range(last + 1) if c not in keep or c in drops)
        ambient = capability_set(spec.ambient_capabilities) or set()
        self.ambient = sorted(c for c in ambient if c <= last) if dropping_user else []
        if spec.private_network and CLONE_NEWNET not in self.joined:
            self.unshare |= CLONE_NEWNET
        if spec.protect_hostname:
            self.unshare |= CLONE_NEWUTS
        if spec.private_ipc and CLONE_NEWIPC not in self.joined:
            self.unshare |= CLONE_NEWIPC
        self.loopback = spec.private_network and CLONE_NEWNET not in self.joined
        entries = []
        for key, wanted in (("system-" + spec.protect_system, spec.protect_system != "no"),
                            ("home-" + spec.protect_home, spec.protect_home != "no"),
                            ("kernel-tunables", spec.protect_kernel_tunables),
                            ("kernel-modules", spec.protect_kernel_modules),
                            ("kernel-logs", spec.protect_kernel_logs),
                            ("control-groups", spec.protect_control_groups)):
            if wanted:
                entries += [(mode, path, None, True) for mode, path in PROTECTED_PATHS[key]]
        if spec.protect_system == "strict":   # as systemd, what the unit must write stays writable
            entries += [("rw", path, None, True) for path in extra_writable]
        if spec.protect_proc != "default" or spec.proc_subset != "all":
            options = ",".join((["hidepid=" + spec.protect_proc] if spec.protect_proc != "default" else []) +
                               (["subset=pid"] if spec.proc_subset == "pid" else []))
            entries.append(("proc", "/proc", options, False))
        entries += [(mode, path, None, optional) for mode, path, optional in spec.paths]
        entries += [("tmpfs", path, options, False) for path, options in spec.temporary_file_systems]
        entries += [("bind-ro" if ro else "bind", destination, (source, recursive), optional)
                    for source, destination, ro, optional, recursive in spec.bind_paths]
        if private_tmp:
            entries += [("bind", "/tmp", (private_tmp[0], True), False), ("bind", "/var/tmp", (private_tmp[1], True), False)]
        for parent, folders in private_folders.items():   # DynamicUser=: a tmpfs, its own folders bound in
            entries.append(("tmpfs", parent, "mode=0755", False))
            entries += [("bind", folder, (folder, True), False) for folder in folders]
        if spec.private_devices:
            entries.append(("devices", "/dev", helpers["dev"], False))
        order = {"ro-all": 0, "proc": 0, "ro": 0, "rw": 0, "tmpfs-ro": 0, "exec": 1, "noexec": 1, "tmpfs": 2, "bind": 2, "bind-ro": 2,
                 "inaccessible": 3}
        # The private /dev first (it is built from the host's /dev), then from
        # the least to the most specific path.
        entries.sort(key=lambda e: (e[0] != "devices", e[1].rstrip("/").count("/") if e[1] != "/" else 0,
                                    order.get(e[0], 0)))
        self.steps = entries
        self.inaccessible_file = helpers["file"]
        if self.steps or spec.private_mounts:
            self.unshare |= CLONE_NEWNS

    # -- in the child -------------------------------------------------------------

    def _check(self, result, what):
        if result != 0:
            number = self.ctypes.get_errno()
            raise OSError(number, "%s: %s" % (what, os.strerror(number)))

    def _mount(self, source, target, fstype, flags, data=None):
        enc = lambda text: text.encode() if text is not None else None
        self._check(self.libc.mount(enc(source), enc(target), enc(fstype), self.ctypes.c_ulong(flags), enc(data)),
                    "mount %s" % target)

    def _setattr(self, path, set_flags, clear_flags):
        """mount_setattr(2) on a mount and all below it."""
        attr = (self.ctypes.c_uint64 * 4)(set_flags, clear_flags, 0, 0)
        self._check(self.libc.syscall(MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE, attr,
                                      self.ctypes.sizeof(attr)), "mount_setattr %s" % path)

    def _bind_self(self, path):
        self._mount(path, path, None, MS_BIND | 16384)     # MS_REC: what is mounted below comes along

    def enter(self):
        """Before the user change: namespaces, mounts, the bounding set.
        Returns the stage name of what it does (for an error report)."""
        for flag, path in self.joined.items():       # JoinsNamespaceOf=: the other unit's
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._check(self.libc.setns(fd, flag), "JoinsNamespaceOf= %s" % path)
            finally:
                os.close(fd)
        if self.unshare:
            self._check(self.libc.unshare(self.unshare), "unshare")
        if self.unshare & CLONE_NEWNS:
            self._mount(None, "/", None, 16384 | MS_SLAVE)     # MS_REC|MS_SLAVE: nothing goes back to the host
        sources = self._bind_sources()    # taken while the host's view is whole: later steps may hide them
        for what, path, argument, optional in self.steps:
            exists = os.path.lexists(path)
            if not exists and what not in ("tmpfs", "bind", "bind-ro"):
                if optional:
                    continue
                raise OSError(errno.ENOENT, "%s: no such file or folder" % path)
            if what == "ro-all":
                self._all_read_only()
            elif what in ("ro", "rw", "exec", "noexec"):
                if path != "/":           # "/" is a mount already: a bind over it would leave the
                    self._bind_self(path)     # process's root below it (a user namespace then refuses it)
                if what in ("ro", "rw"):
                    self._setattr(path, MOUNT_ATTR_RDONLY if what == "ro" else 0, MOUNT_ATTR_RDONLY if what == "rw" else 0)
                else:
                    self._setattr(path, MOUNT_ATTR_NOEXEC if what == "noexec" else 0, MOUNT_ATTR_NOEXEC if what == "exec" else 0)
            elif what == "inaccessible":
                if os.path.isdir(path):
                    self._mount("tmpfs", path, "tmpfs", MS_RDONLY | 2 | 4 | 8, "mode=000")
                else:
                    self._mount(self.inaccessible_file, path, None, MS_BIND)
                    self._mount(None, path, None, MS_BIND | 32 | MS_RDONLY)   # MS_REMOUNT read-only
            elif what in ("tmpfs", "tmpfs-ro"):
                if not exists:
                    os.makedirs(path, 0o755)
                options = argument or "mode=0755"
                read_only = what == "tmpfs-ro" or "ro" in options.split(",")
                options = ",".join(o for o in options.split(",") if o not in ("ro", "rw")) or "mode=0755"
                self._mount("tmpfs", path, "tmpfs", 2 | 4 | (MS_RDONLY if read_only else 0), options)
            elif what in ("bind", "bind-ro"):
                source, recursive = argument
                if source not in sources:
                    if optional:
                        continue
                    raise OSError(errno.ENOENT, "%s: no such file or folder" % source)
                if not os.path.lexists(path):   # in a private /dev or tmpfs, made just before
                    _make_mount_point(path, source, stat.S_ISDIR(os.fstat(sources[source]).st_mode))
                self._mount("/proc/self/fd/%d" % sources[source], path, None, MS_BIND | (16384 if recursive else 0))
                # A bind copies the flags of where it is made: under ProtectSystem=strict
                # it would be read-only too.
                self._setattr(path, MOUNT_ATTR_RDONLY if what == "bind-ro" else 0,
                              0 if what == "bind-ro" else MOUNT_ATTR_RDONLY)
            elif what == "devices":
                self._private_devices(argument)
            elif what == "proc":
                self._own_proc(argument)
        if self.loopback:
            self._loopback_up()
        for cap in self.drop_caps:
            self._check(self.libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "CapabilityBoundingSet=")
        if self.ambient:
            self._check(self.libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "AmbientCapabilities=")

    def _bind_sources(self):
        """{source path: O_PATH descriptor} of the binds (BindPaths=, PrivateTmp=),
        and their mount points made where missing (as systemd makes them),
        before any step could hide a source or make the file system read-only."""
        sources = {}
        private_dev = any(what == "devices" for what, _, _, _ in self.steps)
        for what, path, argument, _ in self.steps:
            if what not in ("bind", "bind-ro") or argument[0] in sources:
                continue
            try:
                sources[argument[0]] = os.open(argument[0], os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            if not (private_dev and path.startswith("/dev/")):   # there: made in the unit's own /dev
                _make_mount_point(path, argument[0])
        return sources

    def _all_read_only(self):
        """ProtectSystem=strict: every mount read-only but /dev, /proc and
        /sys (systemd.exec(5)), each on its own: a container's locked mounts
        there are left as they are."""
        fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = read_until_eof(fd).decode("utf-8", "replace")
        finally:
            os.close(fd)
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 5:
                continue
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point in ("/dev", "/proc", "/sys") or point.startswith(("/dev/", "/proc/", "/sys/")):
                continue
            attr = (self.ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)
            self._check(self.libc.syscall(MOUNT_SETATTR, AT_FDCWD, point.encode(), 0, attr, self.ctypes.sizeof(attr)),
                        "mount_setattr %s" % point)

    def _own_proc(self, options):
        """ProtectProc=/ProcSubset=: a /proc of its own with hidepid= and
        subset=pid (per mount since Linux 5.8), so that the process sees only
        what it may ptrace. Where /proc may not be mounted (EPERM), the
        host's stays, as systemd does, and the unit's log says so."""
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        if self.libc.mount(b"proc", b"/proc", b"proc", self.ctypes.c_ulong(flags), options.encode()) == 0:
            return
        number = self.ctypes.get_errno()
        if number != errno.EPERM:
            raise OSError(number, "mount /proc (%s): %s" % (options, os.strerror(number)))
        os.write(2, ("gitproc: ProtectProc=/ProcSubset= not applied: /proc may not be mounted here (%s); the "
                     "host's /proc stays, as systemd does\n" % os.strerror(number)).encode())

    def _private_devices(self, staging):
        """A /dev of its own: a tmpfs at `staging` (an empty folder the
        daemon made), the harmless nodes bound from the host's /dev, then
        moved onto /dev."""
        self._mount("tmpfs", staging, "tmpfs", 2 | 8, "mode=0755")     # nosuid, noexec
        for node in DEVICE_NODES:
            target = os.path.join(staging, node)
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o666))
            self._mount("/dev/" + node, target, None, MS_BIND)
        # As systemd: syslog(3) still reaches the system's log. A link (systemd's
        # layout, and gitproc's) is copied, so that it follows a new socket.
        if os.path.islink("/dev/log"):
            os.symlink(os.readlink("/dev/log"), os.path.join(staging, "log"))
        elif stat.S_ISSOCK(os.stat("/dev/log").st_mode if os.path.exists("/dev/log") else 0):
            os.close(os.open(os.path.join(staging, "log"), os.O_CREAT | os.O_WRONLY, 0o666))
            self._mount("/dev/log", os.path.join(staging, "log"), None, MS_BIND)
        for folder in ("pts", "shm"):
            os.mkdir(os.path.join(staging, folder), 0o755)
        if os.path.isdir("/dev/pts"):
            self._mount("/dev/pts", os.path.join(staging, "pts"), None, MS_BIND)
        self._mount("tmpfs", os.path.join(staging, "shm"), "tmpfs", 2 | 4, "mode=1777")
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                             ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")):
            os.symlink(target, os.path.join(staging, name))
        self._mount(staging, "/dev", None, MS_MOVE)

    @staticmethod
    def _loopback_up():
        import fcntl
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sh14x", b"lo", 0)
            flags = struct.unpack("16sh14x", fcntl.ioctl(sock, 0x8913, request))[1]     # SIOCGIFFLAGS
            fcntl.ioctl(sock, 0x8914, struct.pack("16sh14x", b"lo", flags | 0x1 | 0x40))  # SIOCSIFFLAGS: UP, RUNNING

    def set_secure_bits(self):
        """SecureBits=, before the user change (CAP_SETPCAP is needed): what
        they change takes effect at exec all the same (keep-caps with
        AmbientCapabilities=, as systemd adds it)."""
        bits = self.secure_bits | ((1 << SECURE_BITS["keep-caps"]) if self.ambient else 0)
        self._check(self.libc.prctl(28, bits, 0, 0, 0), "SecureBits=")          # PR_SET_SECUREBITS

    def enter_user_namespace(self, uid, gid):
        """PrivateUsers=: a new user namespace where root and the unit's user
        and group map to themselves and everything else to nobody, as systemd
        makes it. The maps are written from outside by a helper forked
        first; the new namespace gives the bounding set back in full, so it
        is narrowed again (and keep-caps set again for the ambient set)."""
        ready_r, ready_w = os.pipe()
        helper = os.fork()
        if helper == 0:                   # in the parent namespace: writes the maps once asked
            status = 1
            try:
                os.close(ready_w)
                if os.read(ready_r, 1) == b"1":
                    parent = os.getppid()
                    for name, own in (("uid_map", uid), ("gid_map", gid)):
                        lines = "0 0 1\n" + ("%d %d 1\n" % (own, own) if own else "")
                        fd = os.open("/proc/%d/%s" % (parent, name), os.O_WRONLY)
                        try:
                            os.write(fd, lines.encode())
                        finally:
                            os.close(fd)
                    status = 0
            finally:
                os._exit(status)
        os.close(ready_r)
        try:
            self._check(self.libc.unshare(0x10000000), "unshare")          # CLONE_NEWUSER
            os.write(ready_w, b"1")
        finally:
            os.close(ready_w)
            _, status = os.waitpid(helper, 0)
        if status != 0:
            raise OSError(errno.EPERM, "cannot write its uid and gid maps")
        for cap in self.drop_caps:
            self._check(self.libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "CapabilityBoundingSet=")
        if self.ambient:
            self._check(self.libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "AmbientCapabilities=")

    def finish(self):
        """After the user change: the ambient capabilities, then no_new_privs."""
        if self.ambient:
            mask = 0
            for cap in self.ambient:
                mask |= 1 << cap
            header = (self.ctypes.c_uint32 * 2)(0x20080522, 0)          # _LINUX_CAPABILITY_VERSION_3, this process
            data = (self.ctypes.c_uint32 * 6)(mask & 0xffffffff, mask & 0xffffffff, mask & 0xffffffff,
                                              mask >> 32, mask >> 32, mask >> 32)   # effective, permitted, inheritable
            self._check(self.libc.capset(header, data), "AmbientCapabilities=")
            for cap in self.ambient:
                self._check(self.libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), "AmbientCapabilities=")
        if self.no_new_privs:
            self._check(self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "NoNewPrivileges=")

    def seal(self):
        """The very last step before exec: the system call filters, in
        systemd's order. A process without CAP_SYS_ADMIN may load one only
        under no_new_privs: set then, as systemd implies NoNewPrivileges=."""
        ctypes = self.ctypes
        for keys, _, (_, _, program) in self.filters:
            what = "/".join(key + "=" for key in keys)
            result = self.libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, program, 0, 0)
            if result != 0 and ctypes.get_errno() == errno.EACCES:
                self._check(self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "seccomp %s (no_new_privs)" % what)
                result = self.libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, program, 0, 0)
            self._check(result, "seccomp %s" % what)


def _cap_last_cap():
    try:
        return int(_read_text("/proc/sys/kernel/cap_last_cap"))
    except (OSError, ValueError):
        return len(CAPABILITIES) - 1


# ---- system call filters (seccomp) ------------------------------------------------
# The seccomp half of the sandbox, built as systemd 252 builds it with
# libseccomp: one filter per key, each a classic-BPF program. The programs of a
# unit version are compiled once in the daemon (seccomp_filters, cached) and
# loaded in the child as its very last step before exec, after the user change
# (Sandbox.seal), with no_new_privs set first where the process lacks
# CAP_SYS_ADMIN (as systemd implies NoNewPrivileges= then). The kernel runs
# every filter and keeps the most severe answer, so the keys add up as they
# do under systemd. Each program first asks which ABI made the call: an x86_64
# kernel also takes i386 calls (int 0x80) and x32 ones (bit 30 set), and
# systemd filters all three unless SystemCallArchitectures= removes some.
# On a machine with no table here, a unit with any of these keys does not
# start (it never runs unfiltered).
#
# The facts. System call numbers from Linux 6.1's headers (Debian 12's
# linux-libc-dev 6.1, asm/unistd_64.h, unistd_32.h, unistd_x32.h): names in
# number order, "=N" goes on at number N; x32 takes the x86_64 numbers (with
# bit 30 set) and has its own from 512. The groups are systemd 252's
# (`systemd-analyze syscall-filter`), "@name" nesting a group; @known is every
# name of the tables and the groups. Address families from glibc 2.36's
# bits/socket.h, by number.
SYSCALL_NUMBERS = {
    "x86_64": """read write open close stat fstat lstat poll lseek mmap mprotect munmap brk rt_sigaction rt_sigprocmask
rt_sigreturn ioctl pread64 pwrite64 readv writev access pipe select sched_yield mremap msync mincore
madvise shmget shmat shmctl dup dup2 pause nanosleep getitimer alarm setitimer getpid sendfile socket
connect accept sendto recvfrom sendmsg recvmsg shutdown bind listen getsockname getpeername socketpair
setsockopt getsockopt clone fork vfork execve exit wait4 kill uname semget semop semctl shmdt msgget
msgsnd msgrcv msgctl fcntl flock fsync fdatasync truncate ftruncate getdents getcwd chdir fchdir rename
mkdir rmdir creat link unlink symlink readlink chmod fchmod chown fchown lchown umask gettimeofday
getrlimit getrusage sysinfo times ptrace getuid syslog getgid setuid setgid geteuid getegid setpgid
getppid getpgrp setsid setreuid setregid getgroups setgroups setresuid getresuid setresgid getresgid
getpgid setfsuid setfsgid getsid capget capset rt_sigpending rt_sigtimedwait rt_sigqueueinfo
rt_sigsuspend sigaltstack utime mknod uselib personality ustat statfs fstatfs sysfs getpriority
setpriority sched_setparam sched_getparam sched_setscheduler sched_getscheduler sched_get_priority_max
sched_get_priority_min sched_rr_get_interval mlock munlock mlockall munlockall vhangup modify_ldt
pivot_root _sysctl prctl arch_prctl adjtimex setrlimit chroot sync acct settimeofday mount umount2
swapon swapoff reboot sethostname setdomainname iopl ioperm create_module init_module delete_module
get_kernel_syms query_module quotactl nfsservctl getpmsg putpmsg afs_syscall tuxcall security gettid
readahead setxattr lsetxattr fsetxattr getxattr lgetxattr fgetxattr listxattr llistxattr flistxattr
removexattr lremovexattr fremovexattr tkill time futex sched_setaffinity sched_getaffinity
set_thread_area io_setup io_destroy io_getevents io_submit io_cancel get_thread_area lookup_dcookie
epoll_create epoll_ctl_old epoll_wait_old remap_file_pages getdents64 set_tid_address restart_syscall
semtimedop fadvise64 timer_create timer_settime timer_gettime timer_getoverrun timer_delete
clock_settime clock_gettime clock_getres clock_nanosleep exit_group epoll_wait epoll_ctl tgkill utimes
vserver mbind set_mempolicy get_mempolicy mq_open mq_unlink mq_timedsend mq_timedreceive mq_notify
mq_getsetattr kexec_load waitid add_key request_key keyctl ioprio_set ioprio_get inotify_init
inotify_add_watch inotify_rm_watch migrate_pages openat mkdirat mknodat fchownat futimesat newfstatat
unlinkat renameat linkat symlinkat readlinkat fchmodat faccessat pselect6 ppoll unshare set_robust_list
get_robust_list splice tee sync_file_range vmsplice move_pages utimensat epoll_pwait signalfd
timerfd_create eventfd fallocate timerfd_settime timerfd_gettime accept4 signalfd4 eventfd2
epoll_create1 dup3 pipe2 inotify_init1 preadv pwritev rt_tgsigqueueinfo perf_event_open recvmmsg
fanotify_init fanotify_mark prlimit64 name_to_handle_at open_by_handle_at clock_adjtime syncfs sendmmsg
setns getcpu process_vm_readv process_vm_writev kcmp finit_module sched_setattr sched_getattr renameat2
seccomp getrandom memfd_create kexec_file_load bpf execveat userfaultfd membarrier mlock2
copy_file_range preadv2 pwritev2 pkey_mprotect pkey_alloc pkey_free statx io_pgetevents rseq =424
pidfd_send_signal io_uring_setup io_uring_enter io_uring_register open_tree move_mount fsopen fsconfig
fsmount fspick pidfd_open clone3 close_range openat2 pidfd_getfd faccessat2 process_madvise epoll_pwait2
mount_setattr quotactl_fd landlock_create_ruleset landlock_add_rule landlock_restrict_self memfd_secret
process_mrelease futex_waitv set_mempolicy_home_node""",
    "i386": """restart_syscall exit fork read write open close waitpid creat link unlink execve chdir time mknod chmod
lchown break oldstat lseek getpid mount umount setuid getuid stime ptrace alarm oldfstat pause utime
stty gtty access nice ftime sync kill rename mkdir rmdir dup pipe times prof brk setgid getgid signal
geteuid getegid acct umount2 lock ioctl fcntl mpx setpgid ulimit oldolduname umask chroot ustat dup2
getppid getpgrp setsid sigaction sgetmask ssetmask setreuid setregid sigsuspend sigpending sethostname
setrlimit getrlimit getrusage gettimeofday settimeofday getgroups setgroups select symlink oldlstat
readlink uselib swapon reboot readdir mmap munmap truncate ftruncate fchmod fchown getpriority
setpriority profil statfs fstatfs ioperm socketcall syslog setitimer getitimer stat lstat fstat olduname
iopl vhangup idle vm86old wait4 swapoff sysinfo ipc fsync sigreturn clone setdomainname uname modify_ldt
adjtimex mprotect sigprocmask create_module init_module delete_module get_kernel_syms quotactl getpgid
fchdir bdflush sysfs personality afs_syscall setfsuid setfsgid _llseek getdents _newselect flock msync
readv writev getsid fdatasync _sysctl mlock munlock mlockall munlockall sched_setparam sched_getparam
sched_setscheduler sched_getscheduler sched_yield sched_get_priority_max sched_get_priority_min
sched_rr_get_interval nanosleep mremap setresuid getresuid vm86 query_module poll nfsservctl setresgid
getresgid prctl rt_sigreturn rt_sigaction rt_sigprocmask rt_sigpending rt_sigtimedwait rt_sigqueueinfo
rt_sigsuspend pread64 pwrite64 chown getcwd capget capset sigaltstack sendfile getpmsg putpmsg vfork
ugetrlimit mmap2 truncate64 ftruncate64 stat64 lstat64 fstat64 lchown32 getuid32 getgid32 geteuid32
getegid32 setreuid32 setregid32 getgroups32 setgroups32 fchown32 setresuid32 getresuid32 setresgid32
getresgid32 chown32 setuid32 setgid32 setfsuid32 setfsgid32 pivot_root mincore madvise getdents64
fcntl64 =224 gettid readahead setxattr lsetxattr fsetxattr getxattr lgetxattr fgetxattr listxattr
llistxattr flistxattr removexattr lremovexattr fremovexattr tkill sendfile64 futex sched_setaffinity
sched_getaffinity set_thread_area get_thread_area io_setup io_destroy io_getevents io_submit io_cancel
fadvise64 =252 exit_group lookup_dcookie epoll_create epoll_ctl epoll_wait remap_file_pages
set_tid_address timer_create timer_settime timer_gettime timer_getoverrun timer_delete clock_settime
clock_gettime clock_getres clock_nanosleep statfs64 fstatfs64 tgkill utimes fadvise64_64 vserver mbind
get_mempolicy set_mempolicy mq_open mq_unlink mq_timedsend mq_timedreceive mq_notify mq_getsetattr
kexec_load waitid =286 add_key request_key keyctl ioprio_set ioprio_get inotify_init inotify_add_watch
inotify_rm_watch migrate_pages openat mkdirat mknodat fchownat futimesat fstatat64 unlinkat renameat
linkat symlinkat readlinkat fchmodat faccessat pselect6 ppoll unshare set_robust_list get_robust_list
splice sync_file_range tee vmsplice move_pages getcpu epoll_pwait utimensat signalfd timerfd_create
eventfd fallocate timerfd_settime timerfd_gettime signalfd4 eventfd2 epoll_create1 dup3 pipe2
inotify_init1 preadv pwritev rt_tgsigqueueinfo perf_event_open recvmmsg fanotify_init fanotify_mark
prlimit64 name_to_handle_at open_by_handle_at clock_adjtime syncfs sendmmsg setns process_vm_readv
process_vm_writev kcmp finit_module sched_setattr sched_getattr renameat2 seccomp getrandom memfd_create
bpf execveat socket socketpair bind connect listen accept4 getsockopt setsockopt getsockname getpeername
sendto sendmsg recvfrom recvmsg shutdown userfaultfd membarrier mlock2 copy_file_range preadv2 pwritev2
pkey_mprotect pkey_alloc pkey_free statx arch_prctl io_pgetevents rseq =393 semget semctl shmget shmctl
shmat shmdt msgget msgsnd msgrcv msgctl clock_gettime64 clock_settime64 clock_adjtime64
clock_getres_time64 clock_nanosleep_time64 timer_gettime64 timer_settime64 timerfd_gettime64
timerfd_settime64 utimensat_time64 pselect6_time64 ppoll_time64 =416 io_pgetevents_time64
recvmmsg_time64 mq_timedsend_time64 mq_timedreceive_time64 semtimedop_time64 rt_sigtimedwait_time64
futex_time64 sched_rr_get_interval_time64 pidfd_send_signal io_uring_setup io_uring_enter
io_uring_register open_tree move_mount fsopen fsconfig fsmount fspick pidfd_open clone3 close_range
openat2 pidfd_getfd faccessat2 process_madvise epoll_pwait2 mount_setattr quotactl_fd
landlock_create_ruleset landlock_add_rule landlock_restrict_self memfd_secret process_mrelease
futex_waitv set_mempolicy_home_node""",
    "x32": """rt_sigaction rt_sigreturn ioctl readv writev recvfrom sendmsg recvmsg execve ptrace rt_sigpending
rt_sigtimedwait rt_sigqueueinfo sigaltstack timer_create mq_notify kexec_load waitid set_robust_list
get_robust_list vmsplice move_pages preadv pwritev rt_tgsigqueueinfo recvmmsg sendmmsg process_vm_readv
process_vm_writev setsockopt getsockopt io_setup io_submit execveat preadv2 pwritev2""",
}
SYSCALL_GROUPS = {
    "default": """arch_prctl brk cacheflush clock_getres clock_getres_time64 clock_gettime clock_gettime64 clock_nanosleep
clock_nanosleep_time64 execve exit exit_group futex futex_time64 futex_waitv get_robust_list
get_thread_area getegid getegid32 geteuid geteuid32 getgid getgid32 getgroups getgroups32 getpgid
getpgrp getpid getppid getrandom getresgid getresgid32 getresuid getresuid32 getrlimit getsid gettid
gettimeofday getuid getuid32 membarrier mmap mmap2 mprotect munmap nanosleep pause prlimit64
restart_syscall riscv_flush_icache riscv_hwprobe rseq rt_sigreturn sched_getaffinity sched_yield
set_robust_list set_thread_area set_tid_address set_tls sigreturn time ugetrlimit uretprobe""",
    "aio": """io_cancel io_destroy io_getevents io_pgetevents io_pgetevents_time64 io_setup io_submit io_uring_enter
io_uring_register io_uring_setup""",
    "basic-io": """_llseek close close_range dup dup2 dup3 lseek pread64 preadv preadv2 pwrite64 pwritev pwritev2 read
readv write writev""",
    "chown": """chown chown32 fchown fchown32 fchownat lchown lchown32""",
    "clock": """adjtimex clock_adjtime clock_adjtime64 clock_settime clock_settime64 settimeofday""",
    "cpu-emulation": """modify_ldt subpage_prot switch_endian vm86 vm86old""",
    "debug": """lookup_dcookie perf_event_open pidfd_getfd ptrace rtas s390_runtime_instr sys_debug_setcontext""",
    "file-system": """access chdir chmod close creat faccessat faccessat2 fallocate fchdir fchmod fchmodat fchmodat2 fcntl
fcntl64 fgetxattr flistxattr fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 ftruncate
ftruncate64 futimesat getcwd getdents getdents64 getxattr inotify_add_watch inotify_init inotify_init1
inotify_rm_watch lgetxattr link linkat listxattr llistxattr lremovexattr lsetxattr lstat lstat64 mkdir
mkdirat mknod mknodat newfstatat oldfstat oldlstat oldstat open openat openat2 readlink readlinkat
removexattr rename renameat renameat2 rmdir setxattr stat stat64 statfs statfs64 statx symlink symlinkat
truncate truncate64 unlink unlinkat utime utimensat utimensat_time64 utimes""",
    "io-event": """_newselect epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait
epoll_wait_old eventfd eventfd2 poll ppoll ppoll_time64 pselect6 pselect6_time64 select""",
    "ipc": """ipc memfd_create mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedreceive_time64 mq_timedsend
mq_timedsend_time64 mq_unlink msgctl msgget msgrcv msgsnd pipe pipe2 process_madvise process_vm_readv
process_vm_writev semctl semget semop semtimedop semtimedop_time64 shmat shmctl shmdt shmget""",
    "keyring": """add_key keyctl request_key""",
    "memlock": """mlock mlock2 mlockall munlock munlockall""",
    "module": """delete_module finit_module init_module""",
    "mount": """chroot fsconfig fsmount fsopen fspick mount mount_setattr move_mount open_tree pivot_root umount umount2""",
    "network-io": """accept accept4 bind connect getpeername getsockname getsockopt listen recv recvfrom recvmmsg
recvmmsg_time64 recvmsg send sendmmsg sendmsg sendto setsockopt shutdown socket socketcall socketpair""",
    "obsolete": """_sysctl afs_syscall bdflush break create_module ftime get_kernel_syms getpmsg gtty idle lock mpx prof
profil putpmsg query_module security sgetmask ssetmask stime stty sysfs tuxcall ulimit uselib ustat
vserver""",
    "pkey": """pkey_alloc pkey_free pkey_mprotect""",
    "privileged": """@chown @clock @module @raw-io @reboot @swap _sysctl acct bpf capset chroot fanotify_init fanotify_mark
nfsservctl open_by_handle_at pivot_root quotactl quotactl_fd setdomainname setfsuid setfsuid32 setgroups
setgroups32 sethostname setresuid setresuid32 setreuid setreuid32 setuid setuid32 vhangup""",
    "process": """capget clone clone3 execveat fork getrusage kill pidfd_open pidfd_send_signal prctl rt_sigqueueinfo
rt_tgsigqueueinfo setns swapcontext tgkill times tkill unshare vfork wait4 waitid waitpid""",
    "raw-io": """ioperm iopl pciconfig_iobase pciconfig_read pciconfig_write s390_pci_mmio_read s390_pci_mmio_write""",
    "reboot": """kexec_file_load kexec_load reboot""",
    "resources": """ioprio_set mbind migrate_pages move_pages nice sched_setaffinity sched_setattr sched_setparam
sched_setscheduler set_mempolicy set_mempolicy_home_node setpriority setrlimit""",
    "setuid": """setgid setgid32 setgroups setgroups32 setregid setregid32 setresgid setresgid32 setresuid setresuid32
setreuid setreuid32 setuid setuid32""",
    "signal": """rt_sigaction rt_sigpending rt_sigprocmask rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64 sigaction
sigaltstack signal signalfd signalfd4 sigpending sigprocmask sigsuspend""",
    "swap": """swapoff swapon""",
    "sync": """fdatasync fsync msync sync sync_file_range sync_file_range2 syncfs""",
    "system-service": """@aio @basic-io @chown @default @file-system @io-event @ipc @keyring @memlock @network-io @process
@resources @setuid @signal @sync @timer arm_fadvise64_64 capget capset copy_file_range fadvise64
fadvise64_64 flock get_mempolicy getcpu getpriority ioctl ioprio_get kcmp madvise mremap
name_to_handle_at oldolduname olduname personality readahead readdir remap_file_pages
sched_get_priority_max sched_get_priority_min sched_getattr sched_getparam sched_getscheduler
sched_rr_get_interval sched_rr_get_interval_time64 sched_yield sendfile sendfile64 setfsgid setfsgid32
setfsuid setfsuid32 setpgid setsid splice sysinfo tee umask uname userfaultfd vmsplice""",
    "timer": """alarm getitimer setitimer timer_create timer_delete timer_getoverrun timer_gettime timer_gettime64
timer_settime timer_settime64 timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime
timerfd_settime64 times""",
}
SYSCALLS_AFTER_6_1 = {abi: {"fchmodat2": 452} for abi in ("x86_64", "x32", "i386")}   # Linux 6.6: RestrictSUIDSGID= needs it
# i386's multiplexed calls: socketcall(N, ...) and ipc(N, ...) reach the calls
# named here, which a filter then also answers through the first argument
# (as libseccomp does for systemd).
I386_MULTIPLEXED = {
    "socketcall": ("socket bind connect listen accept getsockname getpeername socketpair send recv sendto recvfrom "
                   "shutdown setsockopt getsockopt sendmsg recvmsg accept4 recvmmsg sendmmsg").split(),
    "ipc": dict(zip((1, 2, 3, 4, 11, 12, 13, 14, 21, 22, 23, 24),
                    "semop semget semctl semtimedop msgsnd msgrcv msgget msgctl shmat shmdt shmget shmctl".split())),
}
SECCOMP_MACHINES = {"x86_64": ("x86_64", "x32", "i386")}     # machine -> the ABIs its kernel runs, native first
ARCHITECTURE_NAMES = {"x86-64": "x86_64", "x86": "i386", "x32": "x32"}     # SystemCallArchitectures= words
OTHER_ARCHITECTURES = ("arm arm64 mips mips64 mips64-n32 mips-le mips64-le mips64-le-n32 parisc parisc64 ppc ppc64 "
                       "ppc64-le riscv64 s390 s390x loongarch64").split()     # accepted, never the machine's here
AUDIT_ARCH = {"x86_64": 0xc000003e, "x32": 0xc000003e, "i386": 0x40000003}
X32_BIT = 0x40000000
ADDRESS_FAMILIES = ("UNSPEC UNIX INET AX25 IPX APPLETALK NETROM BRIDGE ATMPVC X25 INET6 ROSE DECnet NETBEUI SECURITY KEY "
                    "NETLINK PACKET ASH ECONET ATMSVC RDS SNA IRDA PPPOX WANPIPE LLC IB MPLS CAN TIPC BLUETOOTH IUCV "
                    "RXRPC ISDN PHONET IEEE802154 CAIF ALG NFC VSOCK KCM QIPCRTR SMC XDP MCTP").split()
ADDRESS_FAMILY_ALIASES = {"LOCAL": "UNIX", "FILE": "UNIX", "ROUTE": "NETLINK"}
NAMESPACE_FLAGS = {"cgroup": 0x02000000, "ipc": 0x08000000, "net": 0x40000000, "mnt": 0x00020000,
                   "pid": 0x20000000, "user": 0x10000000, "uts": 0x04000000}
# What the filters answer (SECCOMP_RET_*): SystemCallFilter='s default is to
# kill the whole process with SIGSYS, as systemd does where the kernel can.
SECCOMP_ALLOW, SECCOMP_LOG, SECCOMP_KILL = 0x7fff0000, 0x7ffc0000, 0x80000000
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


def seccomp_errno(number):
    return 0x00050000 | number


def syscall_numbers(abi, _cache={}):
    """{call name: number} of one ABI (x32's with bit 30 set)."""
    if abi not in _cache:
        numbers = {}
        for table, bit in ((("x86_64", 0), ("x32", 512)) if abi == "x32" else ((abi, 0),)):
            number = bit
            for word in SYSCALL_NUMBERS[table].split():
                if word.startswith("="):
                    number = int(word[1:])
                    continue
                numbers[word] = number
                number += 1
        numbers.update(SYSCALLS_AFTER_6_1.get(abi, {}))
        _cache[abi] = {name: number | X32_BIT for name, number in numbers.items()} if abi == "x32" else numbers
    return _cache[abi]


def expand_syscalls(name, _cache={}):
    """The call names a word of SystemCallFilter= stands for: itself, or a
    group's members, nested groups expanded. ValueError if unknown."""
    if name not in _cache:
        if name.startswith("@"):
            group = name[1:]
            if group == "known":
                found = set(_known_syscalls())
            elif group in SYSCALL_GROUPS:
                found = set()
                for member in SYSCALL_GROUPS[group].split():
                    found |= expand_syscalls(member)
            else:
                raise ValueError("unknown system call group %s (systemd-analyze syscall-filter lists them)" % name)
        elif name in _known_syscalls():
            found = {name}
        else:
            raise ValueError("unknown system call %s" % name)
        _cache[name] = frozenset(found)
    return _cache[name]


def _known_syscalls(_cache=[]):
    if not _cache:
        names = {word for table in SYSCALL_NUMBERS.values() for word in table.split() if not word.startswith("=")}
        names |= {word for members in SYSCALL_GROUPS.values() for word in members.split() if not word.startswith("@")}
        _cache.append(frozenset(names | {"fchmodat2"}))
    return _cache[0]


def _parse_errno_action(text, lowest=1):
    """SystemCallErrorNumber= or a call's ":errno" (where 0 is taken too): "kill",
    an errno name (EPERM) or a number 1-4095."""
    text = text.strip()
    if text == "kill":
        return "kill"
    number = int(text) if text.isdigit() else getattr(errno, text, None) if text.startswith("E") else None
    if not isinstance(number, int) or not lowest <= number <= 4095:
        raise ValueError("%r is not an error number (EPERM, EACCES, ... or %d-4095) nor kill" % (text, lowest))
    return number


def _parse_syscall_list(value, key):
    """SystemCallFilter=/SystemCallLog=: one assignment as (invert, ((word,
    errno action or None), ...)), each name and group checked."""
    invert = value.startswith("~")
    words = []
    for word in value.lstrip("~").split():
        name, colon, action = word.partition(":")
        expand_syscalls(name)
        if colon and (key != "SystemCallFilter" or not invert):
            raise ValueError("%s: only a denied system call (after ~) takes an error number" % word)
        words.append((name, _parse_errno_action(action, lowest=0) if colon else None))
    return ((invert, tuple(words)),)


def syscall_set(assignments, with_default=False):
    """(allow list?, {call: errno action or None}) as systemd merges the
    lines of SystemCallFilter= (or SystemCallLog=): the first line says
    whether the list allows (an allow list also allows @default) or denies
    (~); later lines of the other kind take their calls out, but for a
    "~call:errno" in an allow list, which stays with that answer. None: unset."""
    allow, chosen = None, {}
    for invert, words in assignments:
        if allow is None:
            allow = not invert
            if allow and with_default:
                chosen = dict.fromkeys(expand_syscalls("@default"))
        for name, action in words:
            for call in expand_syscalls(name):
                if invert != allow or (allow and action is not None):
                    chosen[call] = action
                else:
                    chosen.pop(call, None)
    return None if allow is None else (allow, chosen)


def _parse_architectures(value):
    found = []
    for word in value.split():
        if word != "native" and word not in ARCHITECTURE_NAMES and word not in OTHER_ARCHITECTURES:
            raise ValueError("unknown architecture %s (native, x86-64, x86, x32, arm64, ...)" % word)
        found.append(word)
    return tuple(found)


def _parse_address_families(value):
    """RestrictAddressFamilies=: "none", or [~]AF_ names: (invert, numbers),
    invert None for none."""
    if value.strip() == "none":
        return ((None, ()),)
    invert = value.startswith("~")
    numbers = []
    for word in value.lstrip("~").split():
        name = ADDRESS_FAMILY_ALIASES.get(word[3:], word[3:]) if word.startswith("AF_") else None
        if name not in ADDRESS_FAMILIES:
            raise ValueError("unknown address family %s" % word)
        numbers.append(ADDRESS_FAMILIES.index(name))
    return ((invert, tuple(numbers)),)


def address_families(assignments):
    """(allow list?, family numbers) as systemd merges RestrictAddressFamilies=
    lines (the first says which kind; none: allow nothing). None: unset."""
    allow, chosen, fresh = None, set(), True
    for invert, numbers in assignments:
        if invert is None:            # none: an empty allow list, and the next line says the kind again
            allow, chosen, fresh = True, set(), True
            continue
        if fresh:
            allow, fresh = not invert, False
        chosen = chosen | set(numbers) if invert != allow else chosen - set(numbers)
    return None if allow is None else (allow, chosen)


def _parse_namespaces(value):
    """RestrictNamespaces=: yes (none allowed), no (all), or [~]type names:
    one assignment as (how, flags), how "set", "or" or "and"."""
    try:
        return (("set", 0 if parse_bool(value) else sum(NAMESPACE_FLAGS.values())),)
    except ValueError:
        pass
    invert = value.startswith("~")
    flags = 0
    for word in value.lstrip("~").split():
        if word not in NAMESPACE_FLAGS:
            raise ValueError("unknown namespace type %s (%s)" % (word, ", ".join(NAMESPACE_FLAGS)))
        flags |= NAMESPACE_FLAGS[word]
    return (("and", sum(NAMESPACE_FLAGS.values()) & ~flags) if invert else ("or", flags),)


def allowed_namespaces(assignments):
    """The namespace flags RestrictNamespaces= leaves (None: unset): a boolean
    sets them, the first list sets them, later lists OR (~: AND) into them."""
    allowed = None
    for how, flags in assignments:
        if how == "set" or allowed is None:
            allowed = flags
        else:
            allowed = allowed | flags if how == "or" else allowed & flags
    return allowed


# A filter is (the keys it applies, default answer, {ABI: rules}, answer for
# other ABIs); a rule is (call, alternatives, otherwise): the first
# alternative (conditions, answer) whose conditions all hold on the call's
# arguments answers, else `otherwise`. A condition is (argument, test,
# value), test "eq", "set" (any of the bits) or "masked" (value (mask, want)).
def _errno_rules(calls, number=errno.EPERM):
    return [(call, (), seccomp_errno(number)) for call in sorted(calls)]


def seccomp_filters(spec, personality=None):
    """[(keys, BPF program, (its bytes, their buffer, the sock_fprog to
    load))] of a unit, in systemd's order, or [] when it asks for none;
    compiled once per unit version (the child only loads). Raises
    SpawnError on a machine with no system call table."""
    key = seccomp_settings(spec) + (personality,)
    if key[:-1] == SECCOMP_UNSET:
        return []
    if key not in _COMPILED_FILTERS:
        abis = SECCOMP_MACHINES.get(os.uname().machine)
        if abis is None and not any(_sandbox_key_set(spec, name) for name in SECCOMP_ONLY_KEYS):
            return []                 # ProtectClock= and its kin: their other half applies (see sandbox_not_applied)
        if abis is None:
            raise SpawnError("seccomp: no system call table for %s here (%s only): %s not applied, the unit is not "
                             "started" % (os.uname().machine, ", ".join(SECCOMP_MACHINES),
                                          " ".join(name + "=" for name in SECCOMP_ONLY_KEYS + SECCOMP_HALF_KEYS
                                                   if _sandbox_key_set(spec, name))))
        if len(_COMPILED_FILTERS) > 256:      # (a child forked before holds its own copy of the buffers)
            _COMPILED_FILTERS.clear()
        import ctypes
        compiled = []
        for keys, default, rules, other in seccomp_plan(spec, personality, abis):
            program = bpf_program(default, rules, other, abis)
            packed = b"".join(struct.pack("HBBI", *i) for i in program)
            buffer = ctypes.create_string_buffer(packed, len(packed))      # kept alive by the cache
            fprog = struct.pack("HP", len(program), ctypes.addressof(buffer))      # struct sock_fprog
            compiled.append((keys, program, (packed, buffer, fprog)))
        _COMPILED_FILTERS[key] = compiled
    return _COMPILED_FILTERS[key]


_COMPILED_FILTERS = {}
SECCOMP_FIELDS = ("restrict_address_families", "memory_deny_write_execute", "restrict_realtime", "restrict_suid_sgid",
                  "restrict_namespaces", "protect_kernel_tunables", "protect_kernel_modules", "protect_kernel_logs",
                  "protect_clock", "private_devices", "protect_hostname", "system_call_architectures",
                  "lock_personality", "system_call_log", "system_call_filter", "system_call_error_number")


def seccomp_settings(spec):
    return tuple(getattr(spec, field) for field in SECCOMP_FIELDS)


SECCOMP_UNSET = seccomp_settings(type("Unset", (), {field: UnitSpec.FIELDS[field] for field in SECCOMP_FIELDS}))


def seccomp_plan(spec, personality, abis):
    """The filters of a unit, in systemd 252's order (exec_child): [(keys,
    default answer, {ABI: rules}, answer for ABIs not in the dict)]. Pure."""
    plan = []
    eperm, allow = seccomp_errno(errno.EPERM), SECCOMP_ALLOW
    kept = set(abis)                  # SystemCallArchitectures= kills the calls of other ABIs: the
    if spec.system_call_architectures:    # other filters need no rules for them (each filter costs the kernel)
        kept = {ARCHITECTURE_NAMES.get(word, abis[0] if abis else None) for word in spec.system_call_architectures}
        kept |= set(abis[:1])         # the native one always, as systemd keeps it

    def every(rules, but=()):
        return {abi: rules for abi in abis if abi not in but and abi in kept}

    families = address_families(spec.restrict_address_families)
    if families is not None:
        allow_list, numbers = families
        refuse = seccomp_errno(errno.EAFNOSUPPORT)
        if allow_list:
            rule = ("socket", tuple((((0, "eq", n),), allow) for n in sorted(numbers)), refuse)
        else:
            rule = ("socket", tuple((((0, "eq", n),), refuse) for n in sorted(numbers)), allow)
        # As systemd: i386 reaches socket() through socketcall(), whose
        # arguments a filter cannot read, so its calls are not filtered.
        plan.append((("RestrictAddressFamilies",), allow, every([rule], but=("i386",)), allow))
    if spec.memory_deny_write_execute:
        write_exec, executable = ((2, "masked", (0x6, 0x6)),), ((2, "set", 0x4),)     # PROT_WRITE|PROT_EXEC, PROT_EXEC
        common = [("mprotect", ((executable, eperm),), allow), ("pkey_mprotect", ((executable, eperm),), allow)]
        rules = {abi: common + [("mmap", ((write_exec, eperm),), allow), ("shmat", ((((2, "set", 0o100000),), eperm),),
                                                                                     allow)]     # SHM_EXEC
                 for abi in abis if abi != "i386" and abi in kept}
        if "i386" in abis and "i386" in kept:            # mmap2 there; the old mmap takes a struct: refused, as systemd does
            rules["i386"] = common + [("mmap2", ((write_exec, eperm),), allow), ("mmap", (), eperm)]
        plan.append((("MemoryDenyWriteExecute",), allow, rules, allow))
    if spec.restrict_realtime:        # SCHED_OTHER, SCHED_BATCH and SCHED_IDLE only
        plan.append((("RestrictRealtime",), allow,
                     every([("sched_setscheduler", tuple((((1, "eq", p),), allow) for p in (0, 3, 5)), eperm)]), allow))
    if spec.restrict_suid_sgid:
        rules = [(call, ((((mode, "set", 0o6000),), eperm),), allow)
                 for call, mode in (("chmod", 1), ("fchmod", 1), ("fchmodat", 2), ("fchmodat2", 2), ("creat", 1),
                                    ("mkdir", 1), ("mkdirat", 2), ("mknod", 1), ("mknodat", 2))]
        rules += [(call, ((((flags, "set", os.O_CREAT), (flags + 1, "set", 0o6000)), eperm),), allow)
                  for call, flags in (("open", 1), ("openat", 2))]
        rules.append(("openat2", (), seccomp_errno(errno.ENOSYS)))      # its mode is in a struct
        plan.append((("RestrictSUIDSGID",), allow, every(rules), allow))
    allowed = allowed_namespaces(spec.restrict_namespaces)
    if allowed is not None and allowed != sum(NAMESPACE_FLAGS.values()):
        blocked = [flag for flag in sorted(NAMESPACE_FLAGS.values()) if not allowed & flag]
        refused = tuple((((0, "set", flag),), eperm) for flag in blocked)
        setns = ("setns", (), eperm) if not allowed else \
            ("setns", ((((1, "eq", 0),), eperm),) + tuple((((1, "set", f),), eperm) for f in blocked), allow)
        rules = [("unshare", refused, allow), ("clone", refused, allow), setns,
                 ("clone3", (), seccomp_errno(errno.ENOSYS))]    # its flags are in a struct: the C library falls back
        plan.append((("RestrictNamespaces",), allow, every(rules), allow))
    for wanted, key, calls in ((spec.protect_kernel_tunables, "ProtectKernelTunables", ("_sysctl",)),
                               (spec.protect_kernel_modules, "ProtectKernelModules", expand_syscalls("@module")),
                               (spec.protect_kernel_logs, "ProtectKernelLogs", ("syslog",)),
                               (spec.protect_clock, "ProtectClock", expand_syscalls("@clock")),
                               (spec.private_devices, "PrivateDevices", expand_syscalls("@raw-io")),
                               (spec.protect_hostname, "ProtectHostname", ("sethostname", "setdomainname"))):
        if wanted:
            plan.append(((key,), allow, every(_errno_rules(calls)), allow))
    if spec.system_call_architectures:
        if set(abis) - kept:
            plan.append((("SystemCallArchitectures",), allow, {abi: [] for abi in abis if abi in kept}, SECCOMP_KILL))
    if spec.lock_personality:         # personality() only to set the one it has, as systemd: PER_LINUX
        persona = 0x0008 if personality is not None and personality & 0xff == 0x0008 else 0    # or PER_LINUX32
        plan.append((("LockPersonality",), allow, every([("personality", ((((0, "eq", persona),), allow),), eperm)]),
                     allow))
    logged = syscall_set(spec.system_call_log)
    if logged is not None:
        listed, calls = logged
        plan.append((("SystemCallLog",), SECCOMP_LOG if not listed else allow,
                     every([(call, (), allow if not listed else SECCOMP_LOG) for call in sorted(calls)]), allow))
    chosen = syscall_set(spec.system_call_filter, with_default=True)
    if chosen is not None:
        listed, calls = chosen
        number = spec.system_call_error_number
        refuse = SECCOMP_KILL if number in (None, "kill") else seccomp_errno(number)
        if listed:                    # allowed, but a "~call:errno" among them
            rules = [(call, (), allow if action is None else SECCOMP_KILL if action == "kill"
                      else seccomp_errno(action)) for call, action in sorted(calls.items())]
        else:
            rules = [(call, (), refuse if action is None else SECCOMP_KILL if action == "kill"
                      else seccomp_errno(action)) for call, action in sorted(calls.items())]
        plan.append((("SystemCallFilter", "SystemCallErrorNumber"), refuse if listed else allow, every(rules), allow))
    return plan


def seccomp_summary(spec):
    """What a unit's filters refuse, one line per filter, for status NAME
    (as `systemd-analyze security` sums a unit up). Pure."""
    eperm = "refused with EPERM"
    lines = []
    for keys, _, _, _ in seccomp_plan(spec, None, SECCOMP_MACHINES.get(os.uname().machine, ("x86_64",))):
        key = keys[0]
        if key == "SystemCallFilter":
            listed, calls = syscall_set(spec.system_call_filter, with_default=True)
            words = " ".join(("~" if invert else "") + " ".join(name + (":%s" % errno.errorcode.get(action, action)
                                                                          if action else "") for name, action in names)
                             for invert, names in spec.system_call_filter)
            number = spec.system_call_error_number
            answer = "killed by SIGSYS" if number in (None, "kill") else "refused with %s" % errno.errorcode.get(
                number, number)
            lines.append("SystemCallFilter=%s (%s of %d calls; %s %s)"
                         % (words, "an allow list, with @default," if listed else "a deny list", len(calls),
                            "any other call" if listed else "those", answer))
        elif key == "SystemCallArchitectures":
            lines.append("SystemCallArchitectures=%s (calls of other ABIs killed by SIGSYS)"
                         % " ".join(spec.system_call_architectures))
        elif key == "RestrictAddressFamilies":
            listed, numbers = address_families(spec.restrict_address_families)
            names = " ".join("AF_" + ADDRESS_FAMILIES[n] for n in sorted(numbers)) or "none"
            lines.append("RestrictAddressFamilies=%s%s (%s: EAFNOSUPPORT)" % (
                "" if listed else "~", names, "socket() of any other family" if listed else "socket() of these"))
        elif key == "RestrictNamespaces":
            allowed = allowed_namespaces(spec.restrict_namespaces)
            kept = [name for name, flag in NAMESPACE_FLAGS.items() if allowed & flag]
            lines.append("RestrictNamespaces=%s (making or joining %s namespace %s)"
                         % (" ".join(kept) if kept else "yes", "any other" if kept else "any", eperm))
        elif key == "SystemCallLog":
            listed, calls = syscall_set(spec.system_call_log)
            lines.append("SystemCallLog=%d calls logged%s" % (len(calls), "" if listed else ": all but these"))
        else:
            what = {"MemoryDenyWriteExecute": "memory both writable and executable",
                    "RestrictRealtime": "SCHED_FIFO, SCHED_RR and SCHED_DEADLINE",
                    "RestrictSUIDSGID": "setting a setuid or setgid bit", "LockPersonality": "changing personality()",
                    "ProtectKernelTunables": "_sysctl", "ProtectKernelModules": "@module",
                    "ProtectKernelLogs": "syslog", "ProtectClock": "@clock", "PrivateDevices": "@raw-io",
                    "ProtectHostname": "sethostname, setdomainname"}[key]
            lines.append("%s=yes (%s %s)" % (key, what, eperm))
    return lines


def bpf_program(default, rules_by_abi, other, abis):
    """The classic-BPF instructions (code, jt, jf, k) of one filter: the ABI
    first (those not in rules_by_abi answer `other`), then each rule; calls
    no rule names answer `default`. Plain rules are folded into ranges of
    numbers with the same answer. Pure."""
    load, jeq, jgt, jge, jset, ret, jump, and_ = 0x20, 0x15, 0x25, 0x35, 0x45, 0x06, 0x05, 0x54
    code, labels = [], {}

    def emit(op, k, jt=0, jf=0):
        code.append([op, jt, jf, k])

    def block(abi):
        numbers = syscall_numbers(abi)
        plain, guarded = {}, []
        for call, alternatives, otherwise in rules_by_abi[abi]:
            if call not in numbers:
                continue              # a call this ABI does not have
            if alternatives:
                guarded.append((numbers[call], alternatives, otherwise))
            elif otherwise != default:
                plain[numbers[call]] = otherwise
        if abi == "i386":             # socketcall(N)/ipc(N) answer as the call N stands for
            answers = {call: otherwise for call, alternatives, otherwise in rules_by_abi[abi] if not alternatives}
            for mux, table in I386_MULTIPLEXED.items():
                calls = table.items() if isinstance(table, dict) else enumerate(table, 1)
                own = plain.get(numbers[mux], default)
                alternatives = tuple((((0, "eq", n),), answers.get(call, default)) for n, call in calls
                                     if answers.get(call, default) != own)
                if alternatives and not any(number == numbers[mux] for number, _, _ in guarded):
                    plain.pop(numbers[mux], None)
                    guarded.append((numbers[mux], alternatives, own))
        for number, alternatives, otherwise in guarded:
            body = []
            for conditions, answer in alternatives:
                size = sum(3 if test == "masked" else 2 for _, test, _ in conditions) + 1
                for index, (argument, test, value) in enumerate(conditions):
                    left = size - 1 - sum(3 if t == "masked" else 2 for _, t, _ in conditions[:index + 1])
                    body.append([load, 0, 0, 16 + 8 * argument])      # the low 32 bits of the argument
                    if test == "masked":
                        body.append([and_, 0, 0, value[0]])
                        body.append([jeq, 0, left + 1, value[1]])
                    else:
                        body.append([jeq if test == "eq" else jset, 0, left + 1, value])
                body.append([ret, 0, 0, answer])
            body.append([ret, 0, 0, otherwise])
            emit(jeq, number, 0, len(body))
            code.extend(body)
        ranges = []
        for number in sorted(plain):
            if ranges and ranges[-1][1] == number - 1 and ranges[-1][2] == plain[number]:
                ranges[-1][1] = number
            else:
                ranges.append([number, number, plain[number]])
        for low, high, answer in ranges:
            if low == high:
                emit(jeq, low, 0, 1)
            else:
                emit(jge, low, 0, 2)
                emit(jgt, high, 1, 0)
            emit(ret, answer)
        emit(ret, default)

    emit(load, 4)                     # seccomp_data.arch
    if "x86_64" in abis:
        emit(jeq, AUDIT_ARCH["x86_64"], 0, 1)
        emit(jump, "amd64")
    if "i386" in abis:
        emit(jeq, AUDIT_ARCH["i386"], 0, 1)
        emit(jump, "i386")
    emit(ret, other)
    labels["amd64"] = len(code)
    emit(load, 0)                     # seccomp_data.nr
    emit(jge, X32_BIT, 0, 1)
    emit(jump, "x32")
    for abi in ("x86_64", "x32", "i386"):
        labels[abi] = len(code)
        if abi == "i386":
            emit(load, 0)
        if abi in rules_by_abi:
            block(abi)
        else:
            emit(ret, other)
    if len(code) > 4096:
        raise SpawnError("seccomp: a filter of %d instructions is more than the kernel takes (4096)" % len(code))
    return [(op, jt, jf, labels[k] - index - 1 if op == jump else k) for index, (op, jt, jf, k) in enumerate(code)]


# ---- cgroups, the spawner, the exit watcher, the notify socket ---------------------

# The cgroup keys: the controller each needs, and those cgroup v1 can do too.
RESOURCE_KEYS = (("MemoryMax", "memory_max", "memory"), ("CPUQuota", "cpu_quota", "cpu"),
                 ("MemoryHigh", "memory_high", "memory"), ("MemorySwapMax", "memory_swap_max", "memory"),
                 ("TasksMax", "tasks_max", "pids"), ("CPUWeight", "cpu_weight", "cpu"),
                 ("IOWeight", "io_weight", "io"), ("AllowedCPUs", "allowed_cpus", "cpuset"),
                 ("MemoryLow", "memory_low", "memory"), ("MemoryMin", "memory_min", "memory"))
V1_FILES = ("MemoryMax", "CPUQuota", "TasksMax", "CPUWeight", "IOWeight", "AllowedCPUs", "StartupCPUWeight",
            "StartupIOWeight") + tuple(IO_LIMIT_FILES)


def resource_limits(spec, startup=False):
    """(controller, key, value) of the cgroup keys a unit sets. While the
    daemon starts up (`startup`), StartupCPUWeight=/StartupIOWeight= stand
    for CPUWeight=/IOWeight=, as systemd uses them while the system boots."""
    found = [(controller, key, getattr(spec, field)) for key, field, controller in RESOURCE_KEYS
             if getattr(spec, field) is not None]
    for key, field, controller in (("CPUWeight", "startup_cpu_weight", "cpu"), ("IOWeight", "startup_io_weight", "io")):
        if startup and getattr(spec, field) is not None:
            found = [entry for entry in found if entry[1] != key] + [(controller, "Startup" + key, getattr(spec, field))]
    return found + [("io", key, "%s %s" % (path, value)) for key, path, value in spec.io_limits]


def block_device(path):
    """"MAJ:MIN" of the whole disk a device node, or the file system of a
    path, is on (the I/O limits are set for disks, as systemd sets them)."""
    found = os.stat(path)
    number = found.st_rdev if stat.S_ISBLK(found.st_mode) else found.st_dev
    device = "%d:%d" % (os.major(number), os.minor(number))
    sysfs = "/sys/dev/block/" + device
    if os.path.exists(os.path.join(sysfs, "partition")):
        device = _read_text(os.path.join(os.path.dirname(os.path.realpath(sysfs)), "dev")).strip()
    elif not os.path.exists(sysfs):
        raise OSError(errno.ENODEV, "%s is on no block device (%s)" % (path, device))
    return device


# DevicePolicy=closed: the pseudo devices systemd.resource-control(5) lists.
STANDARD_DEVICES = (("/dev/null", "rwm"), ("/dev/zero", "rwm"), ("/dev/full", "rwm"), ("/dev/random", "rwm"),
                    ("/dev/urandom", "rwm"), ("/dev/tty", "rwm"), ("/dev/ptmx", "rwm"), ("char-pts", "rw"))


def device_rules(spec, proc_devices=None):
    """The cgroup v1 devices.allow lines of a unit ("c 1:3 rwm"), after "a"
    was denied; None when it asks for no device control. As systemd:
    PrivateDevices= makes the policy closed, ProtectClock= adds the clock;
    DevicePolicy=auto with no DeviceAllow= controls nothing. ([lines],
    [warnings]) otherwise: a device that is not there is left out."""
    policy = spec.device_policy
    allowed = list(spec.device_allow)
    if spec.private_devices and policy == "auto":
        policy = "closed"
    if spec.protect_clock:
        allowed.append(("char-rtc", "r"))
    if policy == "auto" and not spec.device_allow:
        return None
    if policy in ("auto", "closed"):
        allowed = list(STANDARD_DEVICES) + allowed
    lines, warnings = [], []
    for device, access in allowed:
        if device.startswith("/dev/"):
            try:
                found = os.stat(device)
            except OSError:
                warnings.append("DeviceAllow=%s: no such device here, left out" % device)
                continue
            kind = "c" if stat.S_ISCHR(found.st_mode) else "b" if stat.S_ISBLK(found.st_mode) else None
            if kind is None:
                warnings.append("DeviceAllow=%s: not a device node, left out" % device)
                continue
            lines.append("%s %d:%d %s" % (kind, os.major(found.st_rdev), os.minor(found.st_rdev), access))
        else:
            import fnmatch
            kind, _, pattern = device.partition("-")
            if proc_devices is None:
                proc_devices = _proc_devices()
            majors = sorted({major for section, major, name in proc_devices
                             if section == kind and fnmatch.fnmatchcase(name, pattern)})
            if not majors and device != "char-rtc":
                warnings.append("DeviceAllow=%s: no such driver in /proc/devices, left out" % device)
            lines += ["%s %d:* %s" % (kind[0], major, access) for major in majors]
    return lines, warnings


def _proc_devices():
    """[(char or block, major, driver name)] of /proc/devices."""
    found, section = [], None
    for line in _read_text("/proc/devices").splitlines():
        if line.endswith("devices:"):
            section = {"Character": "char", "Block": "block"}.get(line.split()[0], line.split()[0].lower())
        elif line.strip():
            major, _, name = line.strip().partition(" ")
            found.append((section, int(major), name.strip()))
    return found


class CgroupSet:
    """The cgroups of one service: where its processes are listed (and joined),
    and what became of its limits."""
    __slots__ = ("folders", "tracking", "v2", "clone_into", "limits", "oom_base", "oom_seen")

    def __init__(self):
        self.folders = []       # every cgroup folder made for the service
        self.tracking = None    # the folder whose cgroup.procs lists all its processes
        self.v2 = None          # its v2 folder
        self.clone_into = None  # the v2 folder a process can be born in (clone3), if it can
        self.limits = []        # {"key", "value", "applied", "why"} for status
        self.oom_base = 0       # OOM kills counted in its groups before this start
        self.oom_seen = 0       # ... and when OOMPolicy='s watch last looked

    def procs_files(self, born_in_v2=False):
        """The cgroup.procs files a new process writes itself into (all but the
        v2 group when it is born there)."""
        return [os.path.join(folder, "cgroup.procs") for folder in self.folders
                if not (born_in_v2 and folder == self.v2)]


def _mount_checked(source, target, fstype, flags, data):
    """mount(2) through ctypes, OSError with the target if it fails."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    encode = lambda text: text.encode() if text is not None else None
    if libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)) != 0:
        number = ctypes.get_errno()
        raise OSError(number, "mount %s: %s" % (target, os.strerror(number)))


def _make_mount_point(path, source, folder=None):
    """Where a bind of `source` goes, made if missing (as systemd makes it);
    `folder`: whether the source is one, where it may be hidden already."""
    if os.path.lexists(path):
        return
    if folder if folder is not None else os.path.isdir(source):
        os.makedirs(path, 0o755)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


class Cgroups:
    """Per-service cgroups under `cgroup_root`: v2 (memory.max, cpu.max) where a
    v2 hierarchy with those controllers can be written, else v1
    (memory.limit_in_bytes, cpu.cfs_quota_us). Each service gets its own group,
    which also tracks every process of it (for KillMode=control-group) and is
    removed when the service stops. Where nothing can be written, services run
    and status shows each limit as not applied, with why."""

    CPU_PERIOD = 100000                 # microseconds, as systemd uses

    def __init__(self, root, instance, log):
        self.root, self.log = root, log
        self.instance = instance        # this daemon's folder: daemons of other homes have theirs
        self.v2 = None                  # the v2 folder gitproc makes its groups in
        self.v2_controllers = set()     # controllers enabled for those groups
        self.v1 = {}                    # v1 controller -> folder gitproc makes its groups in
        self.problem = None             # why no cgroup can be made, if so
        self.startup = True             # the daemon starts up: Startup*Weight= apply (end_startup)
        self.prepared = set()           # v2 groups this daemon made or renewed (see _renew)
        self.spent = set()              # ... and those it wrote cgroup.kill to since
        self._detect()

    def _detect(self):
        problems = []
        for candidate in (self.root, os.path.join(self.root, "unified")):
            if os.path.exists(os.path.join(candidate, "cgroup.controllers")):
                try:
                    folder = os.path.join(candidate, "gitproc", self.instance)
                    makedirs(folder)
                    available = set(_read_text(os.path.join(candidate, "cgroup.controllers")).split())
                    wanted = available & {"memory", "cpu", "pids", "io", "cpuset"}
                    for parent in (candidate, os.path.dirname(folder), folder):
                        for controller in wanted:
                            try:
                                _write_text(os.path.join(parent, "cgroup.subtree_control"), "+" + controller)
                            except OSError:
                                pass
                    self.v2 = folder
                    self.v2_controllers = set(_read_text(os.path.join(folder, "cgroup.subtree_control")).split())
                except OSError as exc:
                    problems.append("%s: %s" % (candidate, exc.strerror or exc))
                break
        for controller, names in (("memory", ("memory",)), ("cpu", ("cpu", "cpu,cpuacct")), ("pids", ("pids",)),
                                  ("io", ("blkio",)), ("cpuset", ("cpuset",)), ("devices", ("devices",))):
            if controller in self.v2_controllers:
                continue
            for name in names:
                mount = os.path.join(self.root, name)
                if os.path.exists(os.path.join(mount, "cgroup.procs")) and not os.path.exists(
                        os.path.join(mount, "cgroup.controllers")):
                    try:
                        makedirs(os.path.join(mount, "gitproc", self.instance))
                        if controller == "cpuset":    # v1 cpuset groups start empty: give each level its parent's
                            for level in (os.path.join(mount, "gitproc"), os.path.join(mount, "gitproc", self.instance)):
                                for name_ in ("cpuset.cpus", "cpuset.mems"):
                                    if not _read_text(os.path.join(level, name_)).strip():
                                        _write_text(os.path.join(level, name_),
                                                    _read_text(os.path.join(os.path.dirname(level), name_)).strip())
                        self.v1[controller] = os.path.join(mount, "gitproc", self.instance)
                    except OSError as exc:
                        problems.append("%s: %s" % (mount, exc.strerror or exc))
                    break
        if self.v2 is None and not self.v1:
            self.problem = "; ".join(problems) or "no writable cgroup hierarchy under %s" % self.root
        for folder in [self.v2] + list(self.v1.values()):
            for name in os.listdir(folder) if folder else ():
                if os.path.isdir(os.path.join(folder, name)):
                    try:
                        os.rmdir(os.path.join(folder, name))   # only an empty group goes
                    except OSError:
                        pass                                    # a live service's: kept

    def describe(self):
        if self.problem:
            return "cgroups not usable: %s" % self.problem
        parts = ["v2 %s (%s)" % (self.v2, ", ".join(sorted(self.v2_controllers)) or "no controllers")] if self.v2 else []
        parts += ["v1 %s %s" % (controller, folder) for controller, folder in sorted(self.v1.items())]
        return "cgroups: " + "; ".join(parts)

    def prepare(self, name, spec, suspect=False):
        """Make (or reuse) the service's groups and write its limits.
        `suspect`: its last process died of SIGKILL, maybe by a cgroup.kill
        from outside (see _renew)."""
        group = CgroupSet()
        wanted = resource_limits(spec, self.startup)
        if self.v2:
            existed = os.path.isdir(os.path.join(self.v2, name))
            folder = self._make(group, os.path.join(self.v2, name))
            if folder:
                group.tracking = group.v2 = folder
                killed = folder not in self.prepared or folder in self.spent or suspect
                if not existed or not killed or self._renew(folder):
                    group.clone_into = folder
                    self.prepared.add(folder)
                    self.spent.discard(folder)
        for controller, key, value in wanted:
            entry = {"key": key, "value": value, "applied": False, "why": None}
            try:
                if controller in self.v2_controllers and group.tracking:
                    self._write_v2(group.tracking, key, value, spec.cpu_quota_period)
                    entry.update(applied=True, why="cgroup v2 %s" % group.tracking)
                elif controller in self.v1 and key in V1_FILES:
                    folder = self._make(group, os.path.join(self.v1[controller], name))
                    if folder is None:
                        raise OSError(errno.EACCES, "cannot create its cgroup")
                    try:
                        self._write_v1(folder, key, value, spec.cpu_quota_period)
                    except OSError:
                        if group.tracking != folder:      # a group whose limit failed is not joined
                            group.folders.remove(folder)
                        raise
                    entry.update(applied=True, why="cgroup v1 %s" % folder)
                    if group.tracking is None:
                        group.tracking = folder
                elif controller in self.v1:
                    entry["why"] = "cgroup v1 has nothing for %s= (v2 only)" % key
                else:
                    entry["why"] = self.problem or "no writable cgroup with the %s controller" % controller
            except OSError as exc:
                entry["why"] = "cannot write the limit: %s" % (exc.strerror or exc)
            group.limits.append(entry)
        devices = device_rules(spec)
        if devices is not None:
            group.limits.append(self._limit_devices(group, name, spec, *devices))
        if spec.memory_max is not None:       # an OOM kill is told apart only under a memory limit
            group.oom_base = self.oom_count(group)
        if spec.oom_policy == "kill" and group.v2 and "memory" in self.v2_controllers:
            _write_text_quietly(os.path.join(group.v2, "memory.oom.group"), "1")   # the kernel kills them all
        return group

    def _limit_devices(self, group, name, spec, lines, warnings):
        """DeviceAllow=/DevicePolicy= through the cgroup v1 devices controller:
        everything denied, then each rule allowed. On a v2-only host this
        needs a BPF program, which gitproc does not load."""
        value = "; ".join([spec.device_policy] + ["DeviceAllow=%s %s" % entry for entry in spec.device_allow] + warnings)
        entry = {"key": "DevicePolicy", "value": value, "applied": False, "why": None}
        if "devices" not in self.v1:
            entry["why"] = ("on this cgroup v2 host device access needs a BPF program, which gitproc does not load"
                            if self.v2 else self.problem or "no writable cgroup v1 devices controller")
            return entry
        folder = self._make(group, os.path.join(self.v1["devices"], name))
        try:
            if folder is None:
                raise OSError(errno.EACCES, "cannot create its cgroup")
            _write_text(os.path.join(folder, "devices.deny"), "a")
            for line in lines:
                _write_text(os.path.join(folder, "devices.allow"), line)
        except OSError as exc:
            if folder in group.folders and group.tracking != folder:
                group.folders.remove(folder)      # a group whose rules failed is not joined
            entry["why"] = "cannot write the device rules: %s" % (exc.strerror or exc)
            return entry
        if group.tracking is None:
            group.tracking = folder
        entry.update(applied=True, why="cgroup v1 %s: %d rule%s" % (folder, len(lines), "" if len(lines) == 1 else "s"))
        return entry

    def end_startup(self, services):
        """The daemon started up: CPUWeight=/IOWeight= (or the default, 100)
        replace the Startup*Weight= of the units that run."""
        self.startup = False
        for service in services:
            spec, group = service.spec, service.resources.cgroup
            if group is None:
                continue
            for entry in group.limits:
                if entry["key"] not in ("StartupCPUWeight", "StartupIOWeight") or not entry["applied"]:
                    continue
                key = entry["key"][len("Startup"):]
                value = getattr(spec, "cpu_weight" if key == "CPUWeight" else "io_weight") or 100
                folder = entry["why"].split()[2]
                try:
                    (self._write_v2 if entry["why"].startswith("cgroup v2") else self._write_v1)(folder, key, value)
                    entry.update(key=key, value=value)
                except OSError as exc:
                    entry.update(applied=False, why="cannot write %s= after start-up: %s" % (key, exc.strerror or exc))

    @staticmethod
    def _renew(folder):
        """Make the existing, empty v2 group `folder` anew, so that a process can be
        born in it: once cgroup.kill was written to a group, this kernel kills
        every process later cloned into it (CLONE_INTO_CGROUP), though not
        one that moves in. Done where that may have happened: a group this
        daemon did not make, one it killed, one whose last process died of
        SIGKILL (an administrator's cgroup.kill). About 0.6 ms with the first
        clone into the new group, so not at every start. False if the group
        still holds a process (a dying one, an adopted one): the next process
        then forks and joins it."""
        try:
            os.rmdir(folder)
            os.mkdir(folder)
        except OSError:
            return False
        return True

    def _make(self, group, folder):
        try:
            makedirs(folder)
        except OSError as exc:
            self.log.warning("daemon", "Cannot create cgroup %s: %s" % (folder, exc.strerror or exc))
            return None
        group.folders.append(folder)
        return folder

    def _write_v2(self, folder, key, value, period=None):
        write = lambda name, text: _write_text(os.path.join(folder, name), text)
        key = _strip_prefix(key, "Startup")
        period = int((period or self.CPU_PERIOD / 1e6) * 1e6)
        if key in IO_LIMIT_FILES:
            path, _, amount = value.rpartition(" ")
            write("io.max", "%s %s=%s" % (block_device(path), IO_LIMIT_FILES[key][0], amount))
        elif key in ("MemoryLow", "MemoryMin"):
            write(key.lower().replace("memory", "memory."), str(value))
        elif key == "MemoryMax":
            write("memory.max", "max" if value is None else str(value))
            _write_text_quietly(os.path.join(folder, "memory.swap.max"), "0")
        elif key == "CPUQuota":
            write("cpu.max", "%d %d" % (int(period * value / 100), period))
        elif key in ("MemoryHigh", "MemorySwapMax", "TasksMax"):
            write({"MemoryHigh": "memory.high", "MemorySwapMax": "memory.swap.max", "TasksMax": "pids.max"}[key],
                  "max" if value in (None, "infinity") else str(value))
        elif key == "CPUWeight":
            write("cpu.weight", str(value))
        elif key == "IOWeight":
            write("io.weight", "default %d" % value)
        elif key == "AllowedCPUs":
            write("cpuset.cpus", ",".join(map(str, value)))

    def _write_v1(self, folder, key, value, period=None):
        write = lambda name, text: _write_text(os.path.join(folder, name), text)
        key = _strip_prefix(key, "Startup")
        period = int((period or self.CPU_PERIOD / 1e6) * 1e6)
        if key in IO_LIMIT_FILES:
            path, _, amount = value.rpartition(" ")
            write(IO_LIMIT_FILES[key][1], "%s %s" % (block_device(path), "0" if amount == "max" else amount))
        elif key == "MemoryMax":
            # memsw (memory+swap) may never be below the memory limit: raise it
            # first when the limit grows, set it again after when it shrinks.
            text = "-1" if value is None else str(value)
            _write_text_quietly(os.path.join(folder, "memory.memsw.limit_in_bytes"), text)
            write("memory.limit_in_bytes", text)
            _write_text_quietly(os.path.join(folder, "memory.memsw.limit_in_bytes"), text)
        elif key == "CPUQuota":
            write("cpu.cfs_period_us", str(period))
            write("cpu.cfs_quota_us", str(int(period * value / 100)))
        elif key == "TasksMax":
            write("pids.max", "max" if value == "infinity" else str(value))
        elif key == "CPUWeight":              # as systemd maps it: weight 100 is 1024 shares
            write("cpu.shares", str(max(2, value * 1024 // 100)))
        elif key == "IOWeight":               # and 1-10000 onto blkio's 10-1000 (100 is 500)
            write("blkio.weight", str(min(1000, max(10, value * 500 // 100))))
        elif key == "AllowedCPUs":
            # a v1 cpuset group takes no process before it has memory nodes
            write("cpuset.mems", _read_text(os.path.join(os.path.dirname(folder), "cpuset.mems")).strip())
            write("cpuset.cpus", ",".join(map(str, value)))

    @staticmethod
    def pids(group):
        if group is None or group.tracking is None:
            return []
        try:
            return [int(pid) for pid in _read_text(os.path.join(group.tracking, "cgroup.procs")).split()]
        except OSError:
            return []

    def kill(self, group, number):
        """Signal every process of the service, also those that left its
        process group (setsid)."""
        if group is None or group.tracking is None:
            return
        if number == signal.SIGKILL and os.path.exists(os.path.join(group.tracking, "cgroup.kill")):
            if not self.pids(group):
                return                    # nothing left (the common case): the group stays usable
            _write_text_quietly(os.path.join(group.tracking, "cgroup.kill"), "1")
            self.spent.add(group.tracking)
            return
        for pid in self.pids(group):
            try:
                os.kill(pid, number)
            except OSError:
                pass

    @staticmethod
    def oom_count(group):
        """OOM kills the kernel counted in the service's memory groups."""
        total = 0
        for folder in (group.folders if group else []):
            for name in ("memory.events", "memory.oom_control"):
                try:
                    text = _read_text(os.path.join(folder, name))
                except OSError:
                    continue
                for line in text.splitlines():
                    key, _, count = line.partition(" ")
                    if key == "oom_kill" and count.strip().isdigit():
                        total += int(count)
        return total

    def oom_killed(self, group):
        return group is not None and self.oom_count(group) > group.oom_base

    def remove_all(self, groups, patience=1.0):
        """At shutdown: remove the services' groups and this daemon's folders,
        waiting briefly for killed processes to leave (cgroup.kill is async)."""
        deadline = time.monotonic() + patience
        for group in groups:
            while group is not None and self.pids(group) and time.monotonic() < deadline:
                time.sleep(0.01)
            Cgroups.remove(group)
        for folder in [self.v2] + list(self.v1.values()):
            if folder:
                try:
                    os.rmdir(folder)
                except OSError:
                    pass                  # a service of ours still there (keep-services, ...)

    @staticmethod
    def remove(group):
        for folder in reversed(group.folders if group else []):
            try:
                os.rmdir(folder)
            except OSError:
                pass              # still populated (a process is dying): made again and reused


def boot_id():
    """This boot's id (None where the kernel does not say): a state file of
    another boot describes processes that are gone."""
    try:
        return _read_text("/proc/sys/kernel/random/boot_id").strip() or None
    except OSError:
        return None


def _read_text(path):
    with open(path) as handle:
        return handle.read()


def _write_text(path, text):
    with open(path, "w") as handle:
        handle.write(text)


def _write_text_quietly(path, text):
    try:
        _write_text(path, text)
    except OSError:
        pass


class OomWatch:
    """OOMPolicy=: learns at once that the kernel's OOM killer killed a
    process of a unit, whichever: an inotify watch on a v2 group's
    memory.events, or an eventfd a v1 memory group signals on OOM
    (cgroup.event_control with memory.oom_control). on_kill(service) when
    the group's oom_kill count grew."""

    IN_MODIFY, IN_NONBLOCK, IN_CLOEXEC = 0x2, 0o4000, 0o2000000

    def __init__(self, selector, call_later, on_kill):
        self.selector, self.call_later, self.on_kill = selector, call_later, on_kill
        self.watched = {}                 # service name -> (service, fd or inotify watch, what it is)
        self.inotify = None               # the one inotify descriptor of the v2 watches
        self.libc = None

    def watch(self, service):
        """Watch the memory group of service.resources.cgroup (again, if it changed)."""
        self.forget(service.name)
        group = service.resources.cgroup
        folder = next((f for f in (group.folders if group else ()) if os.path.exists(os.path.join(f, "memory.events"))
                       or os.path.exists(os.path.join(f, "memory.oom_control"))), None)
        if folder is None:
            return
        import ctypes
        self.libc = self.libc or ctypes.CDLL(None, use_errno=True)
        group.oom_base = group.oom_seen = Cgroups.oom_count(group)
        try:
            if os.path.exists(os.path.join(folder, "memory.events")):
                if self.inotify is None:
                    fd = self.libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
                    if fd < 0:
                        return
                    self.inotify = fd
                    self.selector.register(fd, EVENT_READ, (self._on_inotify, None))
                wd = self.libc.inotify_add_watch(self.inotify, os.path.join(folder, "memory.events").encode(),
                                                 self.IN_MODIFY)
                if wd >= 0:
                    self.watched[service.name] = (service, wd, "v2")
                return
            efd = self.libc.eventfd(0, os.O_NONBLOCK | os.O_CLOEXEC)      # EFD_NONBLOCK | EFD_CLOEXEC
            if efd < 0:
                return
            control = os.open(os.path.join(folder, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _write_text(os.path.join(folder, "cgroup.event_control"), "%d %d" % (efd, control))
            except OSError:
                os.close(efd)
                return
            finally:
                os.close(control)
            self.selector.register(efd, EVENT_READ, (self._on_eventfd, service.name))
            self.watched[service.name] = (service, efd, "v1")
        except (OSError, ValueError):
            pass                          # no watch: an OOM kill is then seen only when it ends the main process

    def forget(self, name, service=None):
        """Stop watching `name` (only if it is `service`'s watch, when given)."""
        if service is not None and self.watched.get(name, (None,))[0] is not service:
            return
        entry = self.watched.pop(name, None)
        if entry is None:
            return
        _, handle, kind = entry
        if kind == "v2":
            self.libc.inotify_rm_watch(self.inotify, handle)
        else:
            unregister_quietly(self.selector, handle)
            os.close(handle)

    def _on_eventfd(self, name, _mask):
        entry = self.watched.get(name)
        if entry is not None:
            try:
                os.read(entry[1], 8)
            except OSError:
                pass
            self._check(entry[0])

    def _on_inotify(self, _arg, _mask):
        try:
            data = os.read(self.inotify, 65536)
        except BlockingIOError:
            return
        watches = {entry[1]: entry[0] for entry in self.watched.values() if entry[2] == "v2"}
        pos = 0
        while pos + 16 <= len(data):
            wd, _, _, length = struct.unpack_from("iIII", data, pos)
            pos += 16 + length
            if wd in watches:
                self._check(watches[wd], tries=0)     # v2 writes memory.events once it counted

    def _check(self, service, tries=10):
        """v1 signals when the group runs out of memory, before the killer
        chose: the count is looked at again for a while."""
        group = service.resources.cgroup
        if group is None or service.name not in self.watched:
            return
        count = Cgroups.oom_count(group)
        if count > group.oom_seen:
            group.oom_seen = count
            self.on_kill(service)
        elif tries:
            self.call_later(0.05, lambda: self._check(service, tries - 1))


class Clone3:
    """clone3(2) with CLONE_INTO_CGROUP (Linux 5.7+), through ctypes. The call
    goes through PyDLL, so the GIL stays held across it: the child goes on as
    the one thread of a copy of the daemon, as after fork, and execs soon
    after. No Python at-fork handlers run; the daemon has no threads that
    would need them, and the child only makes os calls until exec."""

    SYSCALL = 435                        # clone3: one number on every architecture
    CLONE_INTO_CGROUP = 0x200000000
    FIELDS = ("flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
              "tls", "set_tid", "set_tid_size", "cgroup")

    def __init__(self, ctypes, syscall, args_type):
        self.ctypes, self.syscall, self.args_type = ctypes, syscall, args_type

    @classmethod
    def load(cls):
        """The wrapper, or None where ctypes or libc's syscall() is missing."""
        try:
            import ctypes
            syscall = ctypes.PyDLL(None, use_errno=True).syscall
        except (ImportError, OSError, AttributeError):
            return None
        syscall.restype = ctypes.c_long
        syscall.argtypes = (ctypes.c_long, ctypes.c_void_p, ctypes.c_size_t)
        args_type = type("clone_args", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_uint64) for f in cls.FIELDS]})
        return cls(ctypes, syscall, args_type)

    def into_cgroup(self, cgroup_fd):
        """Like os.fork(), the child born in the cgroup of `cgroup_fd`."""
        args = self.args_type(flags=self.CLONE_INTO_CGROUP, exit_signal=signal.SIGCHLD, cgroup=cgroup_fd)
        pid = self.syscall(self.SYSCALL, self.ctypes.byref(args), self.ctypes.sizeof(args))
        if pid < 0:
            number = self.ctypes.get_errno()
            raise OSError(number, os.strerror(number))
        return pid


class Spawner:
    """Starts one command of a service in a new session (so in its own process
    group), stdin from /dev/null, stdout and stderr appended to its log file.

    Three paths, the cheapest that keeps every promise:
    - posix_spawn (vfork: no copy of the daemon's page tables, exec errors come
      back as its result) where the daemon's own working directory and
      credentials will do and there is no cgroup to join;
    - clone3(CLONE_INTO_CGROUP), where the service has a v2 cgroup: the child
      is born in it, before its first instruction, without the migration that
      makes the kernel wait for an RCU grace period (some 6-8 ms after a quiet
      moment, per hierarchy);
    - fork, then setup (cgroups first, before the child can fork), then exec.
    In the last two, exec failures come back through a close-on-exec pipe: the
    parent's read returns nothing once exec succeeded, or the child's message
    if it failed. Either way a start is known to have worked before the daemon
    calls it running."""

    def __init__(self):
        self.cwd = os.getcwd()            # the daemon's, for the posix_spawn path
        self.last_path = None             # how the last process was made: posix_spawn, clone3 or fork
        self.clone3 = None                # clone3 through ctypes, while the kernel takes it

    def spawn(self, argv, program, env, cwd, log_path, run_as, cgroup=None, private_pids=False, wait=True, setup=None,
              stdio=None, ignore_sigpipe=True, sandbox=None, listen=None):
        """Returns (pid, report): the pid, and None once exec is known to have
        worked, or (wait=False, a forked child) the read end of its exec-error
        pipe, which the caller reads: EOF when exec worked, a message if it
        failed. Raises SpawnError with a one-line reason. The child is in
        every group of `cgroup` (a CgroupSet) before exec. `stdio`: the
        StandardInput=, StandardOutput=, StandardError= of the unit (by
        default /dev/null in, the log out). `ignore_sigpipe`: IgnoreSIGPIPE=
        (systemd's default: yes). `listen`: (fds, connection or None) of
        socket activation (SPEC §18): the fds become 3 and up, $LISTEN_PID
        the child's own pid, which only a child that runs code before exec
        can know, so never on the posix_spawn path; StandardInput=socket
        is the connection."""
        fds = []                          # every fd opened here, closed in the finally
        try:
            connection = listen[1] if listen else None
            stdin_fd, stdout_fd, stderr_fd = self._open_stdio(log_path, stdio, fds, connection)
            if cwd == self.cwd and run_as.uid is None and run_as.gid is None and run_as.groups is None \
                    and cgroup is None and not private_pids and not setup and sandbox is None and not listen:
                self.last_path = "posix_spawn"
                try:
                    return os.posix_spawn(program, argv, env, file_actions=[
                        (os.POSIX_SPAWN_DUP2, stdin_fd, 0), (os.POSIX_SPAWN_DUP2, stdout_fd, 1),
                        (os.POSIX_SPAWN_DUP2, stderr_fd, 2)],
                        setsid=True, setsigmask=(),    # the daemon (Python) ignores both: the child gets them back
                        setsigdef=(signal.SIGXFSZ,) if ignore_sigpipe else (signal.SIGXFSZ, signal.SIGPIPE)), None
                except OSError as exc:
                    raise SpawnError("exec %s: %s" % (program, exc.strerror or exc))
            err_r, err_w = os.pipe()      # exec-failure pipe, both ends close-on-exec (PEP 446)
            fds.extend((err_r, err_w))
            if listen:
                import fcntl              # (the parent's import: the child makes only os calls)
                listen = (listen[0], fcntl.fcntl)
            pid = self._clone_into(cgroup.clone_into) if cgroup is not None and cgroup.clone_into else None
            if pid is None:
                self.last_path = "fork"
                pid = os.fork()
            if pid == 0:                  # child: only os calls from here to exec
                try:                      # and whatever happens, never back into the daemon's code
                    join_files = cgroup.procs_files(born_in_v2=self.last_path == "clone3") if cgroup else ()
                    self._exec_child(argv, program, env, cwd, (stdin_fd, stdout_fd, stderr_fd), err_w, run_as,
                                     join_files, private_pids, setup, ignore_sigpipe, sandbox, listen)
                finally:
                    os._exit(127)
            os.close(err_w)
            fds.remove(err_w)
            if not wait:
                fds.remove(err_r)         # the caller's now
                return pid, err_r
            report = read_until_eof(err_r)
        except OSError as exc:            # fork EAGAIN, EMFILE, ...: the system said no
            raise SpawnError("cannot start a process: %s" % (exc.strerror or exc))
        finally:
            for fd in fds:
                os.close(fd)
        if report:
            os.waitpid(pid, 0)            # the child exits at once after reporting
            raise SpawnError(report.decode("utf-8", "replace"))
        return pid, None

    def _open_stdio(self, log_path, stdio, fds, connection=None):
        """The three descriptors the child gets as 0, 1, 2 (each opened once,
        added to `fds`): /dev/null or StandardInput=file:; the log, /dev/null
        or a file for StandardOutput=; the same or its own for StandardError=;
        the `connection` of an Accept=yes socket for "socket" (/dev/null
        without one, as systemd's inherited socket would be missing)."""
        stdin, stdout, stderr = stdio or (("null", None), ("log", None), ("inherit", None))

        def target(choice, key):
            kind, path = choice
            if kind == "socket" and connection is not None:
                return connection         # the caller's: not closed here
            if kind == "log":
                fd = self._open_log(log_path)
            elif kind in ("null", "socket"):
                fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            elif kind == "data":          # StandardInputText=/Data=: a memory file holding them
                fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
                os.write(fd, path)
                os.lseek(fd, 0, os.SEEK_SET)
            else:
                flags = {"file": os.O_RDONLY if key == "StandardInput" else os.O_WRONLY | os.O_CREAT,
                         "append": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                         "truncate": os.O_WRONLY | os.O_CREAT | os.O_TRUNC}[kind]
                try:
                    fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
                except OSError as exc:
                    raise SpawnError("%s=%s:%s: %s" % (key, kind, path, exc.strerror))
            fds.append(fd)
            return fd
        stdin_fd = target(stdin, "StandardInput")
        stdout_fd = stdin_fd if stdout[0] == "inherit" else target(stdout, "StandardOutput")   # as systemd
        stderr_fd = stdout_fd if stderr[0] == "inherit" else target(stderr, "StandardError")
        return stdin_fd, stdout_fd, stderr_fd

    @staticmethod
    def _open_log(log_path):
        """The service's log, opened for appending; its folder is made if it
        went missing (not checked at every start: a start is one open)."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            return os.open(log_path, flags, 0o640)
        except FileNotFoundError:
            try:
                makedirs(os.path.dirname(log_path))
                return os.open(log_path, flags, 0o640)
            except OSError as exc:
                raise SpawnError("cannot create the log folder %s: %s" % (os.path.dirname(log_path), exc.strerror))
        except OSError as exc:
            raise SpawnError("cannot open log %s: %s" % (log_path, exc.strerror))

    def _clone_into(self, folder):
        """clone3 with CLONE_INTO_CGROUP: like fork (0 in the child, its pid in
        the parent), but the child starts in the v2 cgroup `folder`. None where
        it cannot be had (kernel before 5.7, no v2 group, not Linux/glibc):
        fork is then used, and the child joins its groups itself."""
        if self.clone3 is None:
            self.clone3 = Clone3.load() or False
        if not self.clone3:
            return None
        try:
            cgroup_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            pid = self.clone3.into_cgroup(cgroup_fd)
        except OSError as exc:
            os.close(cgroup_fd)
            if exc.errno in (errno.ENOSYS, errno.E2BIG, errno.EINVAL, errno.EPERM):
                self.clone3 = False       # this kernel (or sandbox) will not: fork from now on
            return None
        if pid:
            os.close(cgroup_fd)           # (the child's copy is close-on-exec)
        self.last_path = "clone3"
        return pid

    @staticmethod
    def _exec_child(argv, program, env, cwd, stdio_fds, err_w, run_as, join_files, private_pids, setup, ignore_sigpipe,
                    sandbox, listen):
        stage = "setsid"
        try:
            os.setsid()                   # own session and process group: pgid == pid
            for path in join_files:       # into its cgroups before it can fork or allocate
                stage = "cgroup %s" % path
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, str(os.getpid()).encode())
                finally:
                    os.close(fd)
            if private_pids:
                stage = "PrivatePIDs="
                enter_pid_namespace(err_w)    # returns in the service's process, pid 2 there
            stage = "signals"
            for number in (signal.SIGPIPE, signal.SIGXFSZ):   # Python ignores these; exec keeps SIG_IGN
                if number != signal.SIGPIPE or not ignore_sigpipe:
                    signal.signal(number, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            stage = "stdio"
            for number, fd in enumerate(stdio_fds):
                os.dup2(fd, number)       # a dup2 clears close-on-exec: these three stay
            if listen:                    # sockets as 3, 4, ...: moved above that range first
                stage = "LISTEN_FDS"
                listen_fds, fcntl_call = listen
                top = 3 + len(listen_fds)
                if err_w < top:
                    err_w = fcntl_call(err_w, 1030, top)      # F_DUPFD_CLOEXEC
                moved = [fcntl_call(fd, 1030, top) for fd in listen_fds]
                for number, fd in enumerate(moved):
                    os.dup2(fd, 3 + number)
                env = dict(env, LISTEN_PID=str(os.getpid()))   # in a PID namespace: its pid there
            if setup:                     # before dropping privileges: raising a limit needs them
                import resource           # (imported in the daemon already: no import work here)
                for name, number, soft, hard in setup.rlimits:
                    stage = "Limit%s=" % name
                    resource.setrlimit(number, (soft, hard))
                if setup.umask is not None:
                    os.umask(setup.umask)
                if setup.nice is not None:
                    stage = "Nice=%d" % setup.nice
                    os.setpriority(os.PRIO_PROCESS, 0, setup.nice)
                if setup.oom_score_adjust is not None:
                    stage = "OOMScoreAdjust=%d" % setup.oom_score_adjust
                    fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
                    try:
                        os.write(fd, b"%d" % setup.oom_score_adjust)
                    except PermissionError:
                        pass              # a container may forbid a lower score: systemd goes on too
                    finally:
                        os.close(fd)
                if setup.cpu_scheduling is not None:
                    stage = "CPUSchedulingPolicy="
                    os.sched_setscheduler(0, setup.cpu_scheduling[0], os.sched_param(setup.cpu_scheduling[1]))
                if setup.cpu_affinity is not None:
                    stage = "CPUAffinity="
                    os.sched_setaffinity(0, setup.cpu_affinity)
                if setup.io_priority is not None:
                    stage = "IOSchedulingClass="
                    setup.syscall(setup.io_priority)
                if setup.coredump_filter is not None:
                    stage = "CoredumpFilter="
                    fd = os.open("/proc/self/coredump_filter", os.O_WRONLY)
                    try:
                        os.write(fd, b"0x%x" % setup.coredump_filter)
                    finally:
                        os.close(fd)
                stage = "process setup"
                setup.apply_late()
            if sandbox is not None:
                stage = "sandbox"
                sandbox.enter()
            if run_as.groups is not None:
                stage = "SupplementaryGroups="
                os.setgroups(run_as.groups)
            if run_as.gid is not None:
                stage = "Group="
                os.setgid(run_as.gid)
            if sandbox is not None and sandbox.user_namespace:
                stage = "PrivateUsers="
                sandbox.enter_user_namespace(run_as.uid, run_as.gid)
            if sandbox is not None and sandbox.secure_bits:    # a new user namespace resets them
                stage = "SecureBits="
                sandbox.set_secure_bits()
            if run_as.uid is not None:
                stage = "User="
                os.setuid(run_as.uid)
            if sandbox is not None:
                stage = "capabilities"
                sandbox.finish()
            stage = "WorkingDirectory=%s" % cwd
            os.chdir(cwd)
            if sandbox is not None and sandbox.filters:
                stage = "seccomp"
                sandbox.seal()
            stage = "exec %s" % program
            os.execve(program, argv, env)
        except BaseException as exc:      # report, never return into the daemon's code
            try:
                reason = getattr(exc, "strerror", None) or str(exc)
                os.write(err_w, ("%s: %s" % (stage, reason)).encode("utf-8", "replace"))
            finally:
                os._exit(127)


# PrivatePIDs=: the service runs in a new PID namespace with its own /proc. The
# daemon's child unshares, forks the namespace's pid 1 (a tiny init that
# mounts /proc, forwards signals to the service and reaps orphans) and stays as
# its relay, mirroring its exit; pid 1 forks the service. The chain keeps the
# daemon's contract: its own child exits with the service's status, and the
# whole chain shares one process group (and cgroup).
CLONE_NEWNS, CLONE_NEWPID = 0x00020000, 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                     signal.SIGUSR2, signal.SIGCONT, signal.SIGWINCH)


def enter_pid_namespace(err_w):
    """In the daemon's forked child: make the namespace, its init and the
    service's process; returns only in the latter. Raises OSError (EPERM when
    not root) before anything was made."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    signal.set_wakeup_fd(-1)              # the daemon's wakeup pipe is not ours to write
    if libc.unshare(CLONE_NEWPID) != 0:
        number = ctypes.get_errno()
        raise OSError(number, "unshare: %s" % os.strerror(number))
    init = os.fork()
    if init:
        # The relay keeps nothing of the daemon's (its pid-file lock, sockets,
        # pidfds), and only the service's exec may close the exec-error pipe.
        # It stays in the daemon's mount namespace, where /proc/self is its own
        # (in the namespace's /proc it is nobody), and whatever happens it
        # only mirrors: an error raised here would orphan the namespace.
        try:
            close_inherited_fds(keep=(0, 1, 2))
        finally:
            _mirror_exit(init)
    # pid 1 of the new namespace, in a mount namespace of its own for its /proc
    if libc.unshare(CLONE_NEWNS) != 0 or libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0 or \
            libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
        number = ctypes.get_errno()
        raise OSError(number, "mount /proc: %s" % os.strerror(number))
    service = os.fork()
    if service:
        close_inherited_fds(keep=(0, 1, 2))
        _mirror_exit(service, reap_all=True)


def _mirror_exit(child, reap_all=False):
    """Forward signals to `child`, then exit as it did (never returns). As a
    namespace's pid 1 (reap_all) also reap every orphan that comes to it."""
    for number in FORWARDED_SIGNALS:
        signal.signal(number, lambda received, _frame: _forward(child, received))
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        try:
            pid, status = os.waitpid(-1 if reap_all else child, 0)
        except ChildProcessError:
            os._exit(255)
        if pid == child:
            break
    number = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    if not reap_all and not number and 128 < os.WEXITSTATUS(status) < 128 + signal.NSIG:
        number = os.WEXITSTATUS(status) - 128   # the init's way of saying "killed by N"
    if number:
        signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [number])
        os.kill(os.getpid(), number)      # die of the same signal (pid 1 cannot: it exits below)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _forward(child, number):
    try:
        os.kill(child, number)
    except OSError:
        pass


class ExitWatcher:
    """Tells the daemon when a watched pid exits, and reaps only those pids.

    mode "pidfd": a pidfd per process in the loop's selector (no polling, works
    for adopted processes that are not our children). "sigchld": SIGCHLD wakes
    the loop and each watched child is checked with waitpid(pid, WNOHANG).
    "poll": every 0.2 s, /proc is checked for each watched pid (zombie or gone)."""

    def __init__(self, selector, call_later, mode=None):
        self.selector = selector
        self.call_later = call_later
        if mode is None:
            mode = "pidfd" if hasattr(os, "pidfd_open") else "sigchld"
        self.mode = mode
        self.callbacks = {}           # pid -> callback(exit_info or None)
        self.children = set()         # watched pids that are our children (waitable)
        self.pidfds = {}              # pid -> pidfd
        self.unsignalled = set()      # pids without a pidfd, checked on SIGCHLD or by polling
        self.poll_timer = None

    def watch(self, pid, callback, child=True):
        self.callbacks[pid] = callback
        if child:
            self.children.add(pid)
        if self.mode == "pidfd":
            try:
                pidfd = os.pidfd_open(pid)
            except OSError as exc:
                if exc.errno == errno.ESRCH:       # already gone (and not our child)
                    self.call_later(0, lambda: self._finish(pid, None))
                    return
            else:
                self.pidfds[pid] = pidfd
                self.selector.register(pidfd, EVENT_READ, (self._on_pidfd, pid))
                return
        self.unsignalled.add(pid)
        if self.mode == "poll" or not child:
            self._schedule_poll()

    def unwatch(self, pid):
        self.callbacks.pop(pid, None)
        self.children.discard(pid)
        self.unsignalled.discard(pid)
        pidfd = self.pidfds.pop(pid, None)
        if pidfd is not None:
            self.selector.unregister(pidfd)
            os.close(pidfd)

    def _on_pidfd(self, pid, _mask):
        self._check(pid)

    def on_sigchld(self):
        for pid in [pid for pid in self.unsignalled if pid in self.children]:
            self._check(pid)

    def _schedule_poll(self):
        if self.poll_timer is None:
            self.poll_timer = self.call_later(POLL_FALLBACK_INTERVAL, self._poll)

    def _poll(self):
        self.poll_timer = None
        for pid in list(self.unsignalled):
            fields = read_proc_stat(pid)
            if fields is None or fields[0] == b"Z":
                self._check(pid)
        if self.unsignalled:
            self._schedule_poll()

    def _check(self, pid):
        if pid in self.children:
            # Peek with WNOWAIT: the zombie keeps its pid and process group id
            # reserved while the callback signals what is left of the group;
            # only then is it reaped.
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info, exited = None, True
            else:
                exited = info is not None
            if not exited:
                return
            exit_info = None
            if info is not None:
                exit_info = {"code": info.si_status} if info.si_code == os.CLD_EXITED else {"signal": info.si_status}
            try:
                self._finish(pid, exit_info)
            finally:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            return
        if pid not in self.pidfds:
            fields = read_proc_stat(pid)
            if fields is not None and fields[0] != b"Z":
                return
        self._finish(pid, None)           # not our child: its exit status is not ours to know

    def _finish(self, pid, exit_info):
        callback = self.callbacks.get(pid)
        self.unwatch(pid)
        if callback is not None:
            callback(exit_info)


class NotifySocket:
    """The NOTIFY_SOCKET of sd_notify(3): one datagram socket for all
    services, read in the daemon's loop (never a thread), kept open for the
    daemon's life so that STATUS=, RELOADING=, WATCHDOG= sent long after the
    start still arrive. Named after the home, so that services adopted by the
    next daemon of the home reach it too. Under root it is a file in a
    root-owned folder, /run/gitproc/notify/ (mode 0666, so a service of any
    User= may write to it; no other user can take its name first, and a
    service in its own network namespace still reaches it, as systemd's
    /run/systemd/notify); otherwise an abstract socket. The kernel adds
    each sender's credentials (SO_PASSCRED), which NotifyAccess= is checked
    against."""

    MAX_MESSAGE = 4096                    # systemd reads at most this much of a datagram
    PER_TURN = 256                        # datagrams read in one loop turn

    FOLDER = "/run/gitproc/notify"

    def __init__(self, home_key):
        import zlib                       # not hashlib: that loads OpenSSL, some 4 MB of the daemon's memory
        name = "%08x" % zlib.crc32(home_key.encode())
        self.address = os.path.join(self.FOLDER, name) if os.geteuid() == 0 else "@gitproc/%s/notify" % name
        self.sock = None

    def open(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            if self.address.startswith("@"):
                sock.bind("\0" + self.address[1:])
            else:
                os.makedirs(self.FOLDER, mode=0o755, exist_ok=True)
                _unlink_quietly(self.address)     # an earlier daemon's: this home's lock is ours
                sock.bind(self.address)
                os.chmod(self.address, 0o666)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        return sock

    def receive(self):
        """(sender pid, uid, {KEY: value}) for each datagram waiting. Descriptors
        sent along (FDSTORE=) are closed: gitproc keeps no file descriptor store."""
        for data, pid, uid, _, truncated in receive_datagrams(self.sock, self.MAX_MESSAGE, self.PER_TURN):
            if pid and not truncated:     # a cut message could say half of what was meant
                yield pid, uid, parse_notify_message(data)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if not self.address.startswith("@"):
                _unlink_quietly(self.address)


def parse_notify_message(data):
    """'READY=1\\nSTATUS=...' -> {"READY": "1", "STATUS": "..."}; lines that
    are not KEY=VALUE are skipped, as systemd does."""
    fields = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, equals, value = line.partition("=")
        if equals and key:
            fields[key] = value
    return fields


# ==== 9. supervision =========================================================
# What happens to a unit: the restart policy's pure guards, the state table,
# the host interface a unit asks things of (ServiceHost), Service (one unit,
# driven by the table) with its parts: its run (ServiceRun: the starting and
# running phases' cells), the stop under way (StopSequence: the stopping
# phases'), its timers, its main and control process. Then Launcher (the
# process half of the host) and Dependencies. All of it runs on the daemon's
# one loop thread; nothing here sleeps.


# ---- the restart policy: pure guards -----------------------------------------------
def exit_status_listed(last_exit, statuses):
    """Whether an exit is one of SuccessExitStatus=-like ("code"|"signal", N) pairs."""
    if not last_exit or not statuses:
        return False
    kind = "signal" if "signal" in last_exit else "code"
    return (kind, last_exit[kind]) in statuses


def exit_is_clean(last_exit, success=()):
    """systemd's "clean": exit code 0 or SIGHUP/SIGINT/SIGTERM/SIGPIPE, or
    one SuccessExitStatus= lists. An unknown exit (None: a process adopted
    from an earlier daemon, or a forking unit's) is not clean."""
    if last_exit is None:
        return False
    if exit_status_listed(last_exit, success):
        return True
    if "signal" in last_exit:
        return last_exit["signal"] in CLEAN_EXIT_SIGNALS
    return last_exit["code"] == 0


def should_restart(policy, last_exit, timed_out=False, result=None, statuses=None):
    """The Restart= table of systemd.service(5), for one end of a run:
    `result` "timeout" or "watchdog" when that is how it ended; `statuses`
    (a UnitSpec) brings Success/RestartPrevent/RestartForceExitStatus=,
    checked first as systemd does."""
    if timed_out:
        result = "timeout"
    if statuses is not None:
        if exit_status_listed(last_exit, statuses.restart_prevent_exit_status):
            return False
        if exit_status_listed(last_exit, statuses.restart_force_exit_status):
            return True
    if policy == "always":
        return True
    if result in ("timeout", "watchdog", "oom-kill"):     # that is the result, however the process then ended
        return policy in ("on-failure", "on-abnormal") or (policy == "on-watchdog" and result == "watchdog")
    if result in ("exit-code", "signal", "core-dump", "protocol", "resources"):
        clean, unclean_signal = False, result in ("signal", "core-dump")   # a failed start, whatever ran last
    else:
        clean = exit_is_clean(last_exit, statuses.success_exit_status if statuses is not None else ())
        unclean_signal = last_exit is not None and "signal" in last_exit and not clean
    return {
        "no": False,
        "on-success": clean,
        "on-failure": not clean,
        "on-abnormal": unclean_signal,
        "on-abort": unclean_signal,
        "on-watchdog": False,
    }[policy]


def restart_delay(restart_sec, crash_streak, steps=0, max_delay=None):
    """RestartSec= doubled for each run in a row that died young, up to 30 s
    (or RestartSec= itself, when that is longer). Any streak length: the
    doubling is a float capped well before it could overflow. With
    RestartSteps= and RestartMaxDelaySec=, systemd's curve instead: from
    RestartSec= to the maximum in that many exponential steps."""
    if crash_streak <= 1:
        return restart_sec
    if steps and max_delay:       # as systemd: no curve from 0 s, to infinity or down to the maximum
        if restart_sec <= 0 or max_delay == float("inf") or restart_sec >= max_delay:
            return restart_sec
        return min(max_delay, restart_sec * (max_delay / restart_sec) ** (min(crash_streak - 1, steps) / steps))
    doubled = restart_sec * 2.0 ** min(crash_streak - 1, 1000)
    return max(restart_sec, min(doubled, MAX_RESTART_DELAY))


def start_limit_hit(start_times, now, interval, burst):
    """StartLimitIntervalSec=/StartLimitBurst=: (the starts still inside the
    interval, whether one more start now would be one too many). interval 0
    turns the limit off."""
    if interval <= 0:
        return [], False
    recent = [t for t in start_times if now - t < interval]
    return recent, len(recent) >= burst


def run_succeeded(unit_type, exit_info, success_statuses=(), ignore_failure=False):
    """Did the main process's run end well? A oneshot's command by its exit
    code (0, or SuccessExitStatus=), any other by a clean exit (also
    SIGHUP/SIGINT/SIGTERM/SIGPIPE); a '-' command always."""
    if ignore_failure:
        return True
    if unit_type == "oneshot":
        return exit_info == {"code": 0} or exit_status_listed(exit_info, success_statuses)
    return exit_is_clean(exit_info, success_statuses)


def condition_skips(exit_info):
    """ExecCondition=: an exit code 1-254 skips the start (no failure); 0
    goes on; 255 or a signal fails it (systemd.service(5)). A command that
    cannot be started exits 203/EXEC, as in systemd: a skip too."""
    return exit_info is not None and "code" in exit_info and 0 < exit_info["code"] < 255


def exec_stop_runs(phase):
    """ExecStop= runs only for a unit that had started: its start-post,
    running, reloading or remaining phases (systemd.service(5))."""
    return phase in (START_POST, RUNNING, RELOAD, REMAIN)


# systemd's exit codes for a process that failed before or at exec
# (systemd.exec(5) "Process Exit Codes"), by the step that failed: what a
# spawn failure's message starts with.
SPAWN_EXIT_CODES = (("WorkingDirectory=", 200, "CHDIR"), ("Nice=", 201, "NICE"), ("Limit", 205, "LIMITS"),
                    ("OOMScoreAdjust=", 206, "OOM_ADJUST"), ("stdio", 208, "STDIN"), ("cannot open log", 209, "STDOUT"),
                    ("cannot create the log folder", 209, "STDOUT"), ("IOScheduling", 211, "IOPRIO"),
                    ("CPUScheduling", 214, "SETSCHEDULER"), ("CPUAffinity=", 215, "CPUAFFINITY"),
                    ("Group=", 216, "GROUP"), ("SupplementaryGroups=", 216, "GROUP"), ("User=", 217, "USER"),
                    ("cgroup", 219, "CGROUP"), ("setsid", 220, "SETSID"), ("PrivatePIDs=", 226, "NAMESPACE"),
                    ("sandbox", 226, "NAMESPACE"), ("seccomp", 228, "SECCOMP"), ("PrivateUsers=", 217, "USER"),
                    ("process setup: NUMAPolicy=", 242, "NUMA_POLICY"),
                    ("process setup: TimerSlackNSec=", 212, "TIMERSLACK"),
                    ("process setup: Personality=", 230, "PERSONALITY"), ("Personality=", 230, "PERSONALITY"),
                    ("CoredumpFilter=", 205, "LIMITS"), ("SecureBits=", 213, "SECUREBITS"),
                    ("LoadCredential=", 243, "CREDENTIALS"), ("capabilities", 218, "CAPABILITIES"),
                    ("RuntimeDirectory=", 233, "RUNTIME_DIRECTORY"), ("StateDirectory=", 238, "STATE_DIRECTORY"),
                    ("CacheDirectory=", 239, "CACHE_DIRECTORY"), ("LogsDirectory=", 240, "LOGS_DIRECTORY"),
                    ("ConfigurationDirectory=", 241, "CONFIGURATION_DIRECTORY"))
EXIT_CODE_NAMES = {203: "EXEC"}
EXIT_CODE_NAMES.update({code: name for _, code, name in SPAWN_EXIT_CODES})


def spawn_exit_code(message):
    """The exit code systemd gives a process that failed to start as
    `message` says (203/EXEC when no step is named)."""
    for prefix, code, _ in SPAWN_EXIT_CODES:
        if message.startswith(prefix):
            return code
    return 203


# ---- the state table ----------------------------------------------------------
# A service is always in one phase; `status` shows the phase's SPEC §4 state
# (PUBLIC_STATE) and names the phase in its detail. Events come from the
# user and deploys (START, STOP, RESTART, RELOAD), from its processes (EXIT of
# the main process, CONTROL_EXIT of an ExecCondition=/Pre/Post/Reload/Stop/
# StopPost= command or a forking ExecStart=, EXEC), from sd_notify (READY,
# RELOADING, STOPPING), the health check (HEALTHY, UNHEALTHY) and timers
# (RESTART_DUE, START_TIMEOUT, STOP_TIMEOUT, WATCHDOG, PID_FILE).
# TRANSITIONS maps (phase, event) to (the one to three phases its action can
# lead to, the action): every pair is written out, "nothing happens" (IGNORE)
# included, so the table is the documentation. A pair that is not in it is a
# bug: handle() logs and refuses it. An action that ends one step of a start
# or a stop goes on at once with an event in the phase it chose (EV_CHECK,
# EV_NEXT, EV_DONE, EV_FINISHED, or a start): its cell says so, then(phase,
# event), and handle() runs that cell next. So an event is read cell by cell,
# where it can end follows from the table alone, and users see only where it
# ends.
#
# A service has at most one main process (MainProcess) and one control
# process (ControlProcess), as in systemd. A stop runs ExecStop=, then
# KillSignal= to what is left, then ExecStopPost=, in three phases; what
# follows it makes three families of them (STOP_STEPS): a stop (then
# stopped), a restart (then it starts again) and the end of a run (then
# Restart= decides: after the process ended on its own, a start failed or
# timed out, the watchdog fired). The stop under way is an object of its own
# (StopSequence): the stopping phases' cells are its actions, "stop.ACTION",
# and what it must remember is its own (the version it stops, whether a
# timeout already sent SIGKILL, why the run ended).
#
# Two facts are kept beside a phase, not as phases of their own: the run's
# `reload_from` (RUNNING or REMAIN: where a reload goes back to) and the
# main process's `reap_pending` (it ended while a control process ran, or a
# stop signalled what is left: what is left goes once no process of the
# unit is waited for). The guards that choose between a cell's outcomes are
# named pure functions (should_restart, start_limit_hit,
# restart_delay, run_succeeded, condition_skips, exec_stop_runs).

WAITING = "waiting"              # starting: held until its After=/Requires= units are ready
CONDITION = "condition"          # starting: an ExecCondition= command runs
START_PRE = "start-pre"          # starting: an ExecStartPre= command runs
NOTIFY_WAIT = "start-notify"     # starting: a notify unit's main process runs, READY=1 not yet sent
FORKING = "start-forking"        # starting: a forking unit's ExecStart= runs, or its PIDFile= is awaited
ONESHOT = "start-oneshot"        # starting: a oneshot's ExecStart= commands run, one after another
HEALTH_WAIT = "start-health"     # starting: the main process is ready, its first health check not passed yet
SPAWNED = "spawned"              # starting: the main process is made, its exec not yet confirmed
START_POST = "start-post"        # starting: the main process is ready, an ExecStartPost= command runs
RELOAD = "reload"                # reloading: ExecReload= runs, or a notify unit said RELOADING=1
REMAIN = "remain"                # running: RemainAfterExit=yes, its process exited successfully
STOP_COMMAND = "stop-command"    # stopping: an ExecStop= command runs
# STOPPING, "stopping" (the state's name too): KillSignal= sent, SIGKILL after TimeoutStopSec=
STOP_POST = "stop-post"          # stopping: an ExecStopPost= command runs
RESTART_COMMAND = "restart-command"     # stopping to start again: an ExecStop= command runs
RESTART_STOPPING = "restart-stopping"   # stopping to start again: KillSignal= (RestartKillSignal=) sent
RESTART_POST = "restart-post"           # stopping to start again: an ExecStopPost= command runs
END_COMMAND = "end-command"      # the run ends (Restart= decides next): an ExecStop= command runs
ENDING = "ending"                # the run ends: KillSignal= (or WatchdogSignal=) sent to what is left
END_POST = "end-post"            # the run ends: an ExecStopPost= command runs
# (ExecStop=, KillSignal=, ExecStopPost=) of each family, by what follows.
STOP_STEPS = {"stop": (STOP_COMMAND, STOPPING, STOP_POST), "restart": (RESTART_COMMAND, RESTART_STOPPING, RESTART_POST),
              "policy": (END_COMMAND, ENDING, END_POST)}
STOP_FAMILY = {phase: after for after, phases in STOP_STEPS.items() for phase in phases}
PUBLIC_STATE = {STOPPED: STOPPED, EXITED: EXITED, FAILED: FAILED, BACKOFF: BACKOFF,
                WAITING: STARTING, CONDITION: STARTING, START_PRE: STARTING, NOTIFY_WAIT: STARTING,
                FORKING: STARTING, ONESHOT: STARTING, HEALTH_WAIT: STARTING,
                SPAWNED: STARTING, START_POST: STARTING, RUNNING: RUNNING, REMAIN: RUNNING,
                RELOAD: RELOADING, **{phase: STOPPING for phase in STOP_FAMILY}}
PHASE_TEXT = {WAITING: "waiting for dependencies", CONDITION: "running ExecCondition=",
              START_PRE: "running ExecStartPre=", NOTIFY_WAIT: "waiting for READY=1",
              FORKING: "waiting for its forking ExecStart= and its main pid", ONESHOT: "running ExecStart=",
              HEALTH_WAIT: "waiting for the health check",
              SPAWNED: "starting its process", START_POST: "running ExecStartPost=",
              RELOAD: "reloading", REMAIN: "exited (RemainAfterExit=yes)",
              STOP_COMMAND: "running ExecStop=", STOP_POST: "running ExecStopPost=",
              RESTART_COMMAND: "running ExecStop= to restart", RESTART_STOPPING: "stopping to restart",
              RESTART_POST: "running ExecStopPost= to restart", END_COMMAND: "running ExecStop= (the run ended)",
              ENDING: "stopping what is left (the run ended)", END_POST: "running ExecStopPost= (the run ended)"}

EV_START, EV_STOP, EV_RESTART, EV_RELOAD = "start", "stop", "restart", "reload"
EV_DEPENDENCIES = "dependencies"  # what a WAITING service waits for changed
EV_EXIT = "exit"                  # the main process ended (exit_info: None if unknown)
EV_CONTROL_EXIT = "control-exit"  # the control process ended (exit_info)
EV_EXEC = "exec"                  # a SPAWNED process exec'd (error: None), or could not (error: why)
EV_READY = "ready"                # sd_notify READY=1
EV_RELOADING = "reloading"        # sd_notify RELOADING=1
EV_STOPPING = "stopping"          # sd_notify STOPPING=1
EV_HEALTHY, EV_UNHEALTHY = "healthy", "unhealthy"   # the probe's verdict changed
EV_RESTART_DUE = "restart-due"    # the RestartSec= timer of BACKOFF
EV_START_TIMEOUT = "start-timeout"  # TimeoutStartSec= passed while starting or reloading
EV_STOP_TIMEOUT = "stop-timeout"  # TimeoutStopSec= passed while stopping
EV_WATCHDOG = "watchdog"          # WatchdogSec= passed without a WATCHDOG=1
EV_PID_FILE = "pid-file"          # time to look for a forking unit's PIDFile= (again)
EV_ADOPT = "adopt"                # a daemon start found its live main process, an earlier daemon's
EV_RUNTIME_MAX = "runtime-max"    # RuntimeMaxSec= passed since it became active
EV_OOM = "oom"                    # the kernel's OOM killer killed a process of its cgroup
# A daemon start found it in the state file without a process (SPEC §6):
EV_RESTORE = "restore"            # ... its run ended: failed, exited, or remaining (RemainAfterExit=yes)
EV_RESTORE_BACKOFF = "restore-backoff"   # ... backing off: the delay that remained
EV_REATTACH = "reattach"          # ... ExitType=cgroup: its main process gone, its cgroup perhaps not
FOUND_EVENTS = (EV_ADOPT, EV_RESTORE, EV_RESTORE_BACKOFF, EV_REATTACH)   # only for a Service just made
# The steps of one event: an action that ends one step of a start or a stop
# names the event that goes on at once in the phase it chose (handle() runs
# them in turn; users see only where the last one ends).
EV_CHECK = "check"                # a start's Condition*=, Assert*= and start limit
EV_NEXT = "next"                  # the step's next command (with none left: EV_DONE)
EV_DONE = "done"                  # the step's commands all ran: the next step
EV_FINISHED = "finished"          # a oneshot's start is complete: it remains, or its run ends
INTERNAL_EVENTS = (EV_CHECK, EV_NEXT, EV_DONE, EV_FINISHED)
EVENTS = (EV_START, EV_STOP, EV_RESTART, EV_RELOAD, EV_DEPENDENCIES, EV_EXIT, EV_CONTROL_EXIT, EV_EXEC,
          EV_READY, EV_RELOADING, EV_STOPPING, EV_HEALTHY, EV_UNHEALTHY, EV_RESTART_DUE, EV_START_TIMEOUT,
          EV_STOP_TIMEOUT, EV_WATCHDOG, EV_PID_FILE, EV_RUNTIME_MAX, EV_OOM) + FOUND_EVENTS + INTERNAL_EVENTS
IGNORE = "ignore"
# The command step each phase runs: a UnitSpec field, whose commands EV_NEXT
# spawns one by one (a oneshot's and a simple unit's main commands are not
# control processes: ONESHOT and SPAWNED spawn them themselves).
STEP_OF = {CONDITION: "exec_condition", START_PRE: "exec_start_pre", FORKING: "exec_start",
           START_POST: "exec_start_post", RELOAD: "exec_reload",
           **{phase: "exec_stop" for phase in (STOP_COMMAND, RESTART_COMMAND, END_COMMAND)},
           **{phase: "exec_stop_post" for phase in (STOP_POST, RESTART_POST, END_POST)}}


def then(phase, event):
    """An outcome of a cell that goes on at once: `phase`, then `event` in it."""
    return phase, event


def phases_of(outcomes):
    """The phases a cell's outcomes name (then(phase, event) names its phase)."""
    return tuple(dict.fromkeys(outcome if isinstance(outcome, str) else outcome[0] for outcome in outcomes))


def _ignored(phase, *events):
    return {(phase, event): ((phase,), IGNORE) for event in events}


def _ignoring_the_rest(phase, cells):
    """`cells`, and every other outside event of `phase` ignored (internal
    events are never ignored: one the table does not name is refused)."""
    return {**cells, **_ignored(phase, *[event for event in EVENTS if (phase, event) not in cells
                                         and event not in INTERNAL_EVENTS + FOUND_EVENTS])}


def _stopping(after, step):
    """The cells of one stopping phase: `step` 0 (ExecStop=), 1 (KillSignal=
    sent) or 2 (ExecStopPost=) of the family `after`, and the switch between
    a stop and a restart at the same step. Their own actions are the stop
    under way's (StopSequence): "stop.ACTION"."""
    command, signalled, post = STOP_STEPS[after]
    phase = STOP_STEPS[after][step]
    end = {"stop": ((STOPPED,), "stop.end"),                              # -> stopped
           "restart": ((STOPPED, then(STOPPED, EV_START)), "stop.end"),   # started again (want up, not shutting down)
           "policy": ((BACKOFF, FAILED, EXITED), "stop.end")}[after]      # should_restart(): backoff, else failed/exited
    post_next = then(post, EV_NEXT)                            # nothing left: ExecStopPost=
    cells = [
        {EV_NEXT: ((command, then(command, EV_DONE)), "next_command"),   # a command runs; none left: the next step
         EV_DONE: ((signalled, post_next), "stop.signal_leftovers"),     # KillSignal= to what is left
         EV_CONTROL_EXIT: ((command, then(command, EV_NEXT), then(command, EV_DONE)), "control_exited"),  # failed: done
         EV_STOP_TIMEOUT: ((then(command, EV_DONE),), "stop.command_timed_out"),   # KillSignal= to it too
         EV_EXIT: ((command,), "stop.main_gone")},             # ExecStop= may wait for it: it goes on
        {EV_EXIT: ((signalled, post_next), "stop.main_gone"),
         EV_CONTROL_EXIT: ((signalled, post_next), "stop.control_gone"),
         EV_STOP_TIMEOUT: ((signalled, post_next), "stop.kill_hard")},   # SIGKILL; after one more timeout, given up on
        {EV_NEXT: ((post, then(post, EV_DONE)), "next_command"),
         EV_DONE: end,
         EV_CONTROL_EXIT: ((post, then(post, EV_NEXT), then(post, EV_DONE)), "control_exited"),
         EV_STOP_TIMEOUT: ((post, then(post, EV_DONE)), "stop.post_timed_out")},   # SIGKILL; then given up on
    ][step]
    if after == "restart":
        cells[EV_STOP] = ((STOP_STEPS["stop"][step],), "stop.to_stop")
    else:
        cells.update({event: ((STOP_STEPS["restart"][step],), "stop.to_restart") for event in (EV_START, EV_RESTART)})
    return _ignoring_the_rest(phase, {(phase, event): entry for event, entry in cells.items()})


# Where a start begins, and where its steps lead: the first step's phase,
# entered with EV_CHECK; the end of the run (END_COMMAND, entered with
# EV_NEXT) when a start fails.
_BEGIN = ((STOPPED, WAITING, then(CONDITION, EV_CHECK)), "begin_start")   # stopped: shutting down, a dependency failed
_TO_STOP = ((then(STOP_COMMAND, EV_NEXT),), "begin_stop")       # then its ExecStop=, KillSignal=, ExecStopPost=
_TO_RESTART = ((then(RESTART_COMMAND, EV_NEXT),), "begin_restart")
_FAILS = (then(END_COMMAND, EV_NEXT),)                    # a start that fails, or a run that ends

TRANSITIONS = {
    # stopped: no process; by the user, a failed dependency, or never started
    **_ignoring_the_rest(STOPPED, {
        (STOPPED, EV_START): _BEGIN,
        (STOPPED, EV_STOP): ((STOPPED,), "settle_stopped"),
        (STOPPED, EV_RESTART): _BEGIN,
        # a daemon start found it (SPEC §6): its live process is adopted (a
        # oneshot's last command, awaited); a run that ended stays as it
        # was; a backoff goes on with the delay that remained; an
        # ExitType=cgroup unit runs while its cgroup does. Anything else a
        # daemon start finds starts anew (stopped, then EV_START).
        (STOPPED, EV_ADOPT): ((RUNNING, ONESHOT, HEALTH_WAIT), "adopt"),       # health check of a oneshot: start-health
        (STOPPED, EV_RESTORE): ((FAILED, EXITED, REMAIN), "restore"),         # as it was
        (STOPPED, EV_RESTORE_BACKOFF): ((BACKOFF, then(STOPPED, EV_START)), "restore_backoff"),   # the delay unknown
        (STOPPED, EV_REATTACH): ((RUNNING, then(STOPPED, EV_START)), "reattach")}),   # its cgroup empty
    # exited: finished and not restarting; failed: the start limit, a failed
    # start, a failed run; backoff: waiting RestartSec= before the next start
    **_ignoring_the_rest(EXITED, {(EXITED, EV_START): _BEGIN, (EXITED, EV_RESTART): _BEGIN,
                                  (EXITED, EV_STOP): ((STOPPED,), "settle_stopped")}),
    **_ignoring_the_rest(FAILED, {(FAILED, EV_START): _BEGIN, (FAILED, EV_RESTART): _BEGIN,
                                  (FAILED, EV_STOP): ((STOPPED,), "settle_stopped")}),
    **_ignoring_the_rest(BACKOFF, {(BACKOFF, EV_START): _BEGIN, (BACKOFF, EV_RESTART): _BEGIN,
                                   (BACKOFF, EV_RESTART_DUE): _BEGIN,
                                   (BACKOFF, EV_STOP): ((STOPPED,), "settle_stopped")}),
    # waiting: no process yet; starts once its dependencies are ready
    **_ignoring_the_rest(WAITING, {(WAITING, EV_STOP): ((STOPPED,), "settle_stopped"),
                                   (WAITING, EV_DEPENDENCIES): _BEGIN}),
    # condition: the checks (a Condition*= skips: stopped; an Assert*= or the
    # start limit fails: failed; AutoRollback= may start the old version),
    # then its ExecCondition= commands (exit 1-254 skips the start)
    **_ignoring_the_rest(CONDITION, {
        (CONDITION, EV_CHECK): ((STOPPED, FAILED, then(CONDITION, EV_NEXT), then(STOPPED, EV_START)),
                                "check_start"),          # start_limit_hit(); started again: the old version
        (CONDITION, EV_NEXT): ((CONDITION, then(CONDITION, EV_DONE), STOPPED) + _FAILS,
                               "next_command"),          # could not start: exit 203, a skip
        (CONDITION, EV_DONE): ((then(START_PRE, EV_NEXT),), "run.pre_step"),
        (CONDITION, EV_CONTROL_EXIT): ((CONDITION, then(CONDITION, EV_NEXT), STOPPED) + _FAILS,
                                      "control_exited"),   # condition_skips(); another's exit: stays
        (CONDITION, EV_STOP): _TO_STOP, (CONDITION, EV_RESTART): _TO_RESTART,
        (CONDITION, EV_START_TIMEOUT): (_FAILS, "run.start_timed_out")}),
    # start-pre: its ExecStartPre= commands run
    **_ignoring_the_rest(START_PRE, {
        (START_PRE, EV_NEXT): ((START_PRE, then(START_PRE, EV_DONE)) + _FAILS, "next_command"),
        (START_PRE, EV_DONE): ((then(FORKING, EV_NEXT), then(ONESHOT, EV_NEXT), then(SPAWNED, EV_NEXT)),
                               "run.start_main"),            # by Type=
        (START_PRE, EV_CONTROL_EXIT): ((START_PRE, then(START_PRE, EV_NEXT)) + _FAILS, "control_exited"),
        (START_PRE, EV_STOP): _TO_STOP, (START_PRE, EV_RESTART): _TO_RESTART,
        (START_PRE, EV_START_TIMEOUT): (_FAILS, "run.start_timed_out")}),
    # spawned: the main process of a simple, exec or notify unit is made
    # (EV_NEXT); a simple one runs once its exec is confirmed
    **_ignoring_the_rest(SPAWNED, {
        (SPAWNED, EV_NEXT): ((SPAWNED, then(SPAWNED, EV_EXEC), NOTIFY_WAIT) + _FAILS, "run.spawn_main"),   # confirmed at once
        (SPAWNED, EV_EXEC): ((SPAWNED, then(START_POST, EV_NEXT)), "run.exec_done"),   # exec failed: its exit follows
        (SPAWNED, EV_EXIT): ((SPAWNED, then(SPAWNED, EV_EXEC)) + _FAILS, "run.main_exited"),   # ExitType=cgroup: its cgroup runs
        (SPAWNED, EV_STOP): _TO_STOP, (SPAWNED, EV_RESTART): _TO_RESTART}),
    # start-notify: a notify unit's main process runs; READY=1 makes it ready
    **_ignoring_the_rest(NOTIFY_WAIT, {
        (NOTIFY_WAIT, EV_READY): ((then(START_POST, EV_NEXT), NOTIFY_WAIT), "run.notified_ready"),   # from the main pid
        (NOTIFY_WAIT, EV_EXIT): (_FAILS, "run.main_exited"),                        # before READY=1: the start failed
        (NOTIFY_WAIT, EV_STOP): _TO_STOP, (NOTIFY_WAIT, EV_RESTART): _TO_RESTART,
        (NOTIFY_WAIT, EV_START_TIMEOUT): (_FAILS, "run.start_timed_out"),
        (NOTIFY_WAIT, EV_WATCHDOG): ((ENDING,), "run.watchdog_expired"),           # a WATCHDOG=1 armed it already
        (NOTIFY_WAIT, EV_OOM): ((NOTIFY_WAIT,) + _FAILS, "run.oom_killed")}),
    # start-forking: its ExecStart= runs (a control process) until it exits 0
    # and the main pid is known (PIDFile=, looked at again until written)
    **_ignoring_the_rest(FORKING, {
        (FORKING, EV_NEXT): ((FORKING, then(FORKING, EV_DONE)) + _FAILS, "next_command"),
        (FORKING, EV_DONE): ((FORKING, then(START_POST, EV_NEXT)) + _FAILS, "run.find_main_pid"),   # it could not start ('-')
        (FORKING, EV_CONTROL_EXIT): ((FORKING, then(FORKING, EV_PID_FILE)) + _FAILS, "run.forked"),   # exit 0: its main pid
        (FORKING, EV_PID_FILE): ((FORKING, then(START_POST, EV_NEXT)) + _FAILS, "run.find_main_pid"),   # not written: again
        (FORKING, EV_EXIT): (_FAILS, "run.main_exited"),                            # a MAINPID= named it, and it ended
        (FORKING, EV_STOP): _TO_STOP, (FORKING, EV_RESTART): _TO_RESTART,
        (FORKING, EV_START_TIMEOUT): (_FAILS, "run.start_timed_out"),
        (FORKING, EV_WATCHDOG): ((ENDING,), "run.watchdog_expired"),
        (FORKING, EV_OOM): ((FORKING,) + _FAILS, "run.oom_killed")}),
    # start-oneshot: a oneshot's ExecStart= commands run in turn (EV_NEXT);
    # the last one's exit 0 ends the step
    **_ignoring_the_rest(ONESHOT, {
        (ONESHOT, EV_NEXT): ((ONESHOT, then(ONESHOT, EV_DONE)) + _FAILS, "run.spawn_main"),   # none left: done
        (ONESHOT, EV_DONE): ((then(START_POST, EV_NEXT),), "run.main_running"),
        (ONESHOT, EV_EXIT): ((then(ONESHOT, EV_NEXT),) + _FAILS, "run.oneshot_exited"),   # run_succeeded()
        (ONESHOT, EV_STOP): _TO_STOP, (ONESHOT, EV_RESTART): _TO_RESTART,
        (ONESHOT, EV_START_TIMEOUT): (_FAILS, "run.start_timed_out"),
        (ONESHOT, EV_WATCHDOG): ((ENDING,), "run.watchdog_expired"),
        (ONESHOT, EV_OOM): ((ONESHOT,) + _FAILS, "run.oom_killed")}),
    # start-post: the main process runs (or a oneshot's all ran); its
    # ExecStartPost= commands run, then it is ready
    **_ignoring_the_rest(START_POST, {
        (START_POST, EV_NEXT): ((START_POST, then(START_POST, EV_DONE)) + _FAILS, "next_command"),
        (START_POST, EV_DONE): ((HEALTH_WAIT, RUNNING, then(START_POST, EV_FINISHED)), "run.started"),   # a oneshot
        (START_POST, EV_FINISHED): ((REMAIN, then(END_POST, EV_DONE)), "run.oneshot_finished"),   # or its run ends
        (START_POST, EV_CONTROL_EXIT): ((START_POST, then(START_POST, EV_NEXT)) + _FAILS, "control_exited"),
        (START_POST, EV_EXIT): ((START_POST,) + _FAILS, "run.main_exited"),        # (ExitType=cgroup: it goes on)
        (START_POST, EV_STOP): _TO_STOP, (START_POST, EV_RESTART): _TO_RESTART,
        (START_POST, EV_START_TIMEOUT): (_FAILS, "run.start_timed_out"),
        (START_POST, EV_WATCHDOG): ((ENDING,), "run.watchdog_expired"),
        (START_POST, EV_OOM): ((START_POST,) + _FAILS, "run.oom_killed")}),
    # start-health: ready, its first health check not passed yet
    **_ignoring_the_rest(HEALTH_WAIT, {
        (HEALTH_WAIT, EV_HEALTHY): ((RUNNING,), "run.ready"),
        (HEALTH_WAIT, EV_UNHEALTHY): ((then(RESTART_COMMAND, EV_NEXT),), "run.restart_unhealthy"),   # or AutoRollback=
        (HEALTH_WAIT, EV_EXIT): (_FAILS, "run.main_exited"),
        (HEALTH_WAIT, EV_STOP): _TO_STOP, (HEALTH_WAIT, EV_RESTART): _TO_RESTART,
        (HEALTH_WAIT, EV_WATCHDOG): ((ENDING,), "run.watchdog_expired"),           # armed once ready: this wait too
        (HEALTH_WAIT, EV_OOM): ((HEALTH_WAIT,) + _FAILS, "run.oom_killed")}),
    # running: the main process runs and is ready
    **_ignoring_the_rest(RUNNING, {
        (RUNNING, EV_EXIT): ((RUNNING, REMAIN) + _FAILS, "run.main_exited"),      # ExitType=cgroup / RemainAfterExit=
        (RUNNING, EV_RELOAD): ((then(RELOAD, EV_NEXT), RELOAD, RUNNING), "run.begin_reload"),   # signal; none: said so
        (RUNNING, EV_RELOADING): ((RELOAD,), "run.reloading_notified"),
        (RUNNING, EV_STOPPING): ((ENDING,), "run.stopping_notified"),
        (RUNNING, EV_HEALTHY): ((RUNNING,), "run.note_healthy"),
        (RUNNING, EV_UNHEALTHY): ((then(RESTART_COMMAND, EV_NEXT),), "run.restart_unhealthy"),
        (RUNNING, EV_STOP): _TO_STOP, (RUNNING, EV_RESTART): _TO_RESTART,
        (RUNNING, EV_WATCHDOG): ((ENDING,), "run.watchdog_expired"),
        (RUNNING, EV_RUNTIME_MAX): (_FAILS, "run.runtime_max_passed"),
        (RUNNING, EV_OOM): ((RUNNING,) + _FAILS, "run.oom_killed")}),
    # remain: RemainAfterExit=yes, its process exited successfully
    **_ignoring_the_rest(REMAIN, {
        (REMAIN, EV_RELOAD): ((then(RELOAD, EV_NEXT), RELOAD, REMAIN), "run.begin_reload"),
        (REMAIN, EV_STOP): _TO_STOP, (REMAIN, EV_RESTART): _TO_RESTART,
        (REMAIN, EV_RUNTIME_MAX): (_FAILS, "run.runtime_max_passed")}),
    # reload: ExecReload= runs (or ReloadSignal= was sent), or RELOADING=1
    # until READY=1; then back where it was (reload_from)
    **_ignoring_the_rest(RELOAD, {
        (RELOAD, EV_NEXT): ((RELOAD, then(RELOAD, EV_DONE), RUNNING, REMAIN), "next_command"),   # could not start: back
        (RELOAD, EV_DONE): ((RUNNING, REMAIN), "run.reload_done"),
        (RELOAD, EV_CONTROL_EXIT): ((RELOAD, then(RELOAD, EV_NEXT), RUNNING, REMAIN), "control_exited"),
        (RELOAD, EV_READY): ((RELOAD, RUNNING, REMAIN), "run.reload_ready"),       # ExecReload= still runs: stays
        (RELOAD, EV_START_TIMEOUT): ((RUNNING, REMAIN), "run.reload_timed_out"),
        (RELOAD, EV_EXIT): ((RELOAD, REMAIN) + _FAILS, "run.main_exited"),
        (RELOAD, EV_STOPPING): ((ENDING,), "run.stopping_notified"),
        (RELOAD, EV_STOP): _TO_STOP, (RELOAD, EV_RESTART): _TO_RESTART,
        (RELOAD, EV_WATCHDOG): ((ENDING,), "run.watchdog_expired"),
        (RELOAD, EV_RUNTIME_MAX): (_FAILS, "run.runtime_max_passed"),
        (RELOAD, EV_OOM): ((RELOAD,) + _FAILS, "run.oom_killed")}),
    # the stopping phases, three steps of three families (STOP_STEPS): a
    # start or restart turns a stop (or the end of a run) into a restart, a
    # stop turns a restart back into a stop, at the same step
    **{cell: entry for after in STOP_STEPS for step in range(3) for cell, entry in _stopping(after, step).items()},
}
# What a daemon start found (FOUND_EVENTS) is given only to a Service it just
# made (STOPPED): in any other phase it is a bug, refused by handle() like
# any pair not in the table, and so is an internal event the table does not
# name.


class ServiceHost:
    """What a Service may ask of its host, and nothing else: the real one is
    DaemonHost (a Launcher: processes, signals, cgroups), the pure tests'
    is a fake with a clock run by hand. Besides these methods a host has
    three attributes: `log` (a DaemonLog), `shutting_down` (bool) and
    `call_later(delay, callback)` -> a cancellable Timer."""

    ATTRIBUTES = ("log", "shutting_down", "call_later")

    # -- time ---------------------------------------------------------------------------

    def now(self):
        """The monotonic clock every Service time is measured on."""
        raise NotImplementedError

    # -- processes -----------------------------------------------------------------------

    def spawn(self, service, command, on_exit, on_exec=None, control=None, extra_env=None):
        """Start one ExecCommand of the service (control: its UnitSpec field, None for
        the main process): (pid, ...); SpawnError if it cannot start."""
        raise NotImplementedError

    def exec_report(self, name):
        """Whether the pending start of `name` exec'd: None (it did), a message, or False (not known yet)."""
        raise NotImplementedError

    def watch(self, service, pid, on_exit, adopted=True):
        """Watch a main process that is not the daemon's child (adopted, forking, MAINPID=)."""
        raise NotImplementedError

    def main_pid_of(self, service):
        """Type=forking: the main pid (PIDFile= or the cgroup), None while unknown."""
        raise NotImplementedError

    def belongs_to(self, service, pid):
        """Whether `pid` is a process of the service (for MAINPID= and NotifyAccess=)."""
        raise NotImplementedError

    def signal(self, service, number, first=False):
        """A stop signal, as KillMode= says (first: the first of this stop)."""
        raise NotImplementedError

    def signal_main(self, service, number):
        """A signal to the main process only (ReloadSignal=, WatchdogSignal=)."""
        raise NotImplementedError

    def kill_control(self, service, number):
        """A signal to the control process and its process group."""
        raise NotImplementedError

    def reap_leftovers(self, service, pid, own_child, everything=False):
        """End what is left of the service once its main process is gone."""
        raise NotImplementedError

    def cgroup_pids(self, service, excluding=None):
        """The processes of the service's cgroup (but `excluding`); [] without one."""
        raise NotImplementedError

    def reattach_cgroup(self, service):
        """Make again the groups an earlier daemon made for the service."""
        raise NotImplementedError

    def oom_killed(self, service):
        """Whether the kernel's OOM killer killed a process of the service's cgroup."""
        raise NotImplementedError

    def describe_exit(self, service, exit_info):
        """How a process ended, in words (exit code, signal, OOM kill, ...)."""
        raise NotImplementedError

    def open_probe(self, service, on_verdict):
        """A health probe of the running service, calling on_verdict(verdict, error)."""
        raise NotImplementedError

    def released(self, service):
        """No process of the service is left (its cgroups may go, later)."""
        raise NotImplementedError

    def stopped(self, service):
        """The unit stopped for good this run (PIDFile=, RuntimeDirectory=, dynamic users, IPC go)."""
        raise NotImplementedError

    # -- the daemon around it ------------------------------------------------------------------

    def failed_condition(self, service):
        """The first Condition*=/Assert*= that does not hold, or None."""
        raise NotImplementedError

    def dependency_state(self, service):
        """("ready" | "waiting" | "failed", why) of what the service needs before it starts."""
        raise NotImplementedError

    def auto_rollback(self, service, why):
        """AutoRollback=: put the previous version on the service; False if there is none."""
        raise NotImplementedError

    def deploy_note(self, service):
        """', commit SHA' when the running version is the deployed commit's, for log lines."""
        raise NotImplementedError

    def changed(self, service, before):
        """The service's state changed from `before` (state file, events, waiters, dependents)."""
        raise NotImplementedError


KEEP = object()                       # an argument left as it is


class Service:
    """One unit: its spec, the user's intent (`want`) and what is observed of
    its processes. Events go through handle(), which looks up TRANSITIONS,
    runs the action and sets the phase: nothing else assigns it. `want` is
    written only by start()/stop()/restart() (user requests, deploys) and by
    state restore; supervision reads it. The cells of the starting and
    running phases are its run's (ServiceRun), those of the stopping phases
    the stop's under way (StopSequence); the rest, and what lasts from run
    to run, are its own."""
    __slots__ = ("host", "name", "spec", "commit", "want", "phase", "since", "reason", "main", "control", "run",
                 "stopping", "timers", "restarts", "restarts_total", "last_exit", "start_times", "crash_streak",
                 "reload_serial", "reload_error", "monitor", "generation", "succeeded", "health_note", "probe",
                 "connection", "log_name", "resources", "versions")
    # (__slots__: no dict per unit; a thousand units hold some 1 MB less)

    def __init__(self, host, spec, commit, connection=None, log_name=None):
        self.host = host
        self.name = spec.name
        self.spec = spec                # the UnitSpec being run (or to run)
        self.commit = commit            # sha of the commit the spec came from
        self.want = "up"                # the user's intent: "up" or "down" (persisted)
        self.phase = STOPPED            # the table's state (see PUBLIC_STATE)
        self.since = time.time()        # wall time of the last state change (display only)
        self.reason = None              # why it is stopped/failed/exited, for status
        self.main = MainProcess()       # its main process: pid, how it started, how it ended
        self.control = ControlProcess()   # its control process, and the commands of its step left to run
        self.run = ServiceRun(self)     # this run's facts, and its starting and running phases' actions
        self.stopping = None            # the StopSequence under way (kept until the next start)
        self.timers = UnitTimers(self)  # its timeouts, the restart, the looks again
        self.restarts = 0               # automatic restarts since the last manual start
        self.restarts_total = 0         # automatic restarts ever (a counter for metrics; persisted)
        self.last_exit = None           # {"code": N} or {"signal": N} of the last main exit
        self.start_times = []           # monotonic times of recent starts (start limit)
        self.crash_streak = 0           # runs in a row that died young (backoff)
        self.reload_serial = 0          # counts finished reloads, for `reload` waiters
        self.reload_error = None        # why the last reload failed, or None
        self.monitor = None             # $MONITOR_* for the processes of a start OnFailure= asked for
        self.generation = 0             # counts starts, so a restart waiter sees a new run
        self.succeeded = False          # the last run ended well (a '-' failure counts as success)
        self.health_note = None         # (verdict, error) of the probe closed last
        self.probe = None               # health probe of the running main process
        self.connection = connection    # Accept=yes: (its connection, $REMOTE_ADDR...) until its process has it
        self.log_name = log_name or spec.name   # whose log it writes: an Accept=yes instance writes its template's
        self.resources = ProcessResources()   # cgroup, private /tmp, trees: the Launcher's
        self.versions = VersionRecord()       # replaced, rejected, removed versions: the Deployer's

    # -- queries ---------------------------------------------------------------

    @property
    def state(self):
        """The SPEC §4 state users see."""
        return PUBLIC_STATE[self.phase]

    def is_ready(self):
        """Running (ready: READY=1, its forking parent exited, its health check
        passed once, or ExecStartPost= done), or a oneshot that finished
        successfully. What dependents wait for."""
        return self.phase in (RUNNING, REMAIN, RELOAD) or (
            self.phase == EXITED and self.spec.type == "oneshot" and self.succeeded)

    def has_process(self):
        return self.main.pid is not None or self.control.pid is not None

    def accepts_notification(self, pid, in_service):
        """NotifyAccess=: whether a message from `pid` counts (in_service():
        whether pid is some process of this service)."""
        access = self.spec.notify_accepted_from()
        if access == "main":
            return pid == self.main.pid
        if access == "exec":
            return pid in (self.main.pid, self.control.pid)
        return access == "all" and (pid in (self.main.pid, self.control.pid) or in_service())

    def health(self):
        """(verdict, last error) of the health check: the probe's, or while the
        service is down or restarting, the one it ended with."""
        if not self.spec.health_check_url:
            return None, None
        if self.probe:
            return self.probe.status, self.probe.last_error
        return self.health_note if self.health_note and self.phase != RUNNING else (None, None)

    # -- requests: the writers of `want` ------------------------------------------

    def start(self, manual=False, monitor=None):
        """want=up and start unless a process already runs. A manual start clears
        the start limit and the backoff (systemctl reset-failed + start).
        `monitor`: the $MONITOR_* of the unit whose OnFailure= starts this one."""
        self.want = "up"
        self.monitor = monitor
        if manual:
            self._reset_limits()
            self.restarts = 0
        self.handle(EV_START)

    def stop(self, reason="stopped by user"):
        """want=down: end the process and never restart until start()."""
        self.want = "down"
        self.handle(EV_STOP, reason=reason)

    def restart(self, reason="restarting"):
        """Stop (if running) then start, as one request; clears the start limit."""
        self.want = "up"
        self._reset_limits()
        if self.state not in (STARTING, RUNNING, RELOADING):
            self.restarts = 0             # not running: a manual start
        self.handle(EV_RESTART, reason=reason)

    def take_version(self, spec, commit=KEEP):
        """The unit version to run from now on (a deploy, a rollback, a unit
        back after its removal; without `commit`: the same commit's, a file
        moved). What runs is not touched: the caller restarts or reloads."""
        self.spec = spec
        if commit is not KEEP:
            self.commit = commit

    def take_saved(self, saved, same_boot):
        """What an earlier daemon saved of this Service (persistent()): the
        user's intent and the counters. The start-limit window and the crash
        streak count only on the boot they were measured on (SPEC §6)."""
        self.want = "down" if saved.get("want") == "down" else "up"
        if isinstance(saved.get("restarts"), int):
            self.restarts = saved["restarts"]
        if isinstance(saved.get("restarts_total"), int):
            self.restarts_total = saved["restarts_total"]
        self.last_exit = saved.get("last_exit") if isinstance(saved.get("last_exit"), dict) else None
        to_monotonic = self.host.now() - time.time()
        if isinstance(saved.get("crash_streak"), int) and same_boot:
            self.crash_streak = saved["crash_streak"]
        if isinstance(saved.get("start_times"), list) and same_boot:
            self.start_times = [t + to_monotonic for t in saved["start_times"]
                                if isinstance(t, (int, float)) and t <= time.time()]    # none from the future

    def reload(self):
        """ExecReload= (or ReloadSignal= for notify-reload); `want` is untouched."""
        self.handle(EV_RELOAD)

    def halt(self, reason):
        """Stop without it being the user's intent (shutdown, Requires=, a
        removed unit): `want` stays as it was."""
        self.handle(EV_STOP, reason=reason)

    def adopt(self, pid, pid_start, started_wall):
        """Watch a process an earlier daemon started (same pid and start time)."""
        self.handle(EV_ADOPT, pid=pid, pid_start=pid_start, started_wall=started_wall)

    def restore(self, phase, reason, restart_in=None):
        """A daemon start found this unit in the state file in `phase`, with
        no process: ended (failed, exited, remain), backing off (`restart_in`
        the delay that remained) or "exit-wait" (ExitType=cgroup)."""
        event = {BACKOFF: EV_RESTORE_BACKOFF, "exit-wait": EV_REATTACH}.get(phase, EV_RESTORE)
        self.handle(event, **({"phase": phase} if event == EV_RESTORE else {}), reason=reason,
                    **({"restart_in": restart_in} if event == EV_RESTORE_BACKOFF else {}))

    def notified(self, fields, trusted=False):
        """An sd_notify message the daemon accepted for this service (its run's)."""
        self.run.notified(fields, trusted)

    # -- the one place phases change -------------------------------------------------

    def handle(self, event, **facts):
        """Apply one event: look up (phase, event), run its action, enter the
        phase it chose. A pair missing from the table is refused and logged.
        An exception inside an action leaves no half-changed service: it is
        logged with its traceback, what is left of the process is killed and
        the service is FAILED, so supervision never disagrees with reality."""
        if (self.phase, event) not in TRANSITIONS:
            self.host.log.error(self.name, "Refused event %r in phase %r: not in the state table" % (event, self.phase))
            return False
        start, action, cause = (self.phase, self.reason), None, event
        try:
            while True:                   # the event, then the events its actions name (EV_NEXT, ...)
                entry = TRANSITIONS.get((self.phase, event))
                if entry is None:
                    raise RuntimeError("%s named %r, which phase %r does not take" % (action, event, self.phase))
                allowed, action = entry
                if action == IGNORE:
                    break
                outcome = self._action(action)(**facts)
                step = outcome[0] if len(outcome) < 3 else then(outcome[0], outcome[2])
                if step not in allowed:
                    raise RuntimeError("%s led to %r, which the table does not allow (%r)" % (action, step, allowed))
                self.phase, self.reason = outcome[0], outcome[1]
                if len(outcome) < 3:
                    break
                event, facts = outcome[2], {}
        except Exception as exc:
            import traceback
            self.host.log.error(self.name, "Internal error in %s on %s%s: %s" % (
                action, event, "" if event == cause else " (a step of %s in %s)" % (cause, start[0]),
                traceback.format_exc().strip().replace("\n", " | ")))
            self.phase, self.reason = start
            self._fail_safe("internal error in %s: %s" % (action, exc))
            return False
        end, (self.phase, self.reason) = (self.phase, self.reason), start
        self._enter(*end)                 # users see where the event ended
        return True

    def _action(self, name):
        """The method a cell names: "run.ACTION" is the run's, "stop.ACTION"
        the stop's under way, any other the service's own."""
        owner, _, action = name.rpartition(".")
        return getattr({"run": self.run, "stop": self.stopping}[owner], action) if owner else getattr(self, "_" + name)

    def _enter(self, phase, reason):
        if phase != self.phase or reason != self.reason:
            before = self.state
            if PUBLIC_STATE[phase] != before and {PUBLIC_STATE[phase], before} != {RUNNING, RELOADING}:
                self.since = time.time()          # a reload does not reset "running since", as in systemd
            self.phase, self.reason = phase, reason
            self._arm_runtime_max()
            self.host.changed(self, before)

    def _arm_runtime_max(self):
        """RuntimeMaxSec=: armed when the unit becomes active, for the time
        from then; gone once it is not."""
        seconds = self.spec.runtime_max_sec
        if self.phase not in (RUNNING, RELOAD, REMAIN) or seconds in (None, 0, float("inf")):
            self.timers.cancel("runtime")
        elif not self.timers.armed("runtime"):
            self.timers.arm("runtime", seconds, EV_RUNTIME_MAX)

    def _fail_safe(self, why):
        """After an internal error: nothing of the service runs, nothing is
        pending, and it says FAILED with why. The pids stay watched, so their
        exits are reaped (and ignored)."""
        for step in (self.timers.cancel_all, self.close_probe):
            try:
                step()
            except Exception:
                pass
        for pid in (self.main.pid, self.control.pid):
            if pid:
                try:
                    self.host.reap_leftovers(self, pid, own_child=not self.main.adopted or pid == self.control.pid,
                                             everything=True)
                except Exception:
                    pass
        self.forget_processes()         # their exits, when they come, are reaped and ignored
        for step in (self.host.released, self.host.stopped):
            try:
                step(self)
            except Exception:
                pass
        self._enter(FAILED, why)

    # -- actions: starting; each returns (phase, reason[, the event that follows at once]) --

    def _begin_start(self, reason=None):
        """Dependencies, then the start limit (AutoRollback= may step in), then
        the first step. (`reason` is a restart's: a new start has its own.)"""
        self.timers.cancel_all()
        if self.host.shutting_down:
            return STOPPED, "daemon shut down"                  # -> stopped: no start while shutting down
        verdict, why = self.host.dependency_state(self)
        if verdict == "waiting":
            return WAITING, why                  # -> waiting: After=/Requires= units not ready yet
        if verdict == "failed":
            self.host.log.warning(self.name, "Not started: %s" % why)
            return STOPPED, why            # -> stopped: a dependency failed (want stays up)
        return CONDITION, self.reason, EV_CHECK    # -> condition: its checks first (the last reason kept for them)

    def _check_start(self):
        """Condition*= and Assert*=, then the start limit (AutoRollback= may
        step in), then the ExecCondition= commands."""
        spec = self.spec
        failed = self.host.failed_condition(self) if spec.conditions else None
        if failed is not None:            # skipped, not failed: as systemd (an Assert*= fails it)
            key = failed[0]
            why = "%s %s=%s%s" % ("assertion failed:" if key.startswith("Assert") else "condition failed:", key,
                                  "!" if failed[1] else "", failed[2])
            self.host.log.info(self.name, "Not started: %s" % why)
            return (FAILED if key.startswith("Assert") else STOPPED), why   # -> failed (Assert*=) / stopped (skipped)
        now = self.host.now()
        self.start_times, hit = start_limit_hit(self.start_times, now, spec.start_limit_interval, spec.start_limit_burst)
        if hit:
            last = self.reason.partition("; last: ")[2] if (self.reason or "").startswith("start limit hit") \
                else self.reason
            why = "start limit hit (%d starts within %s)%s" % (
                len(self.start_times), format_timespan(spec.start_limit_interval), "; last: %s" % last if last else "")
            if not self.roll_back(why):
                self.host.log.warning(self.name, "Start limit hit: %s; giving up until 'start %s'" % (
                    why[len("start limit hit "):], self.name))
                return FAILED, why               # -> failed: start limit hit, no older version to roll back to
            return STOPPED, self.reason, EV_START    # -> stopped, started at once: the old version (limits reset)
        if spec.start_limit_interval > 0:
            self.start_times.append(now)
        self.generation += 1
        self.run, self.stopping = ServiceRun(self), None    # a new run
        self.main.forked_group = self.main.exit = None
        self.control.queue = list(spec.exec_condition)
        return CONDITION, None, EV_NEXT      # (stays: its ExecCondition= commands)

    def roll_back(self, why):
        """AutoRollback=: the host puts the previous version back, if there is one."""
        if not self.host.auto_rollback(self, why):
            return False
        self._reset_limits()
        return True

    def stop_settings(self):
        """The UnitSpec whose KillSignal=, KillMode=, TimeoutStopSec= and the
        like apply now: while it stops, the version being stopped's (a
        rollback may have put another version on it meanwhile)."""
        return self.stopping.settings if self.stopping is not None and self.phase in STOP_FAMILY else self.spec

    def _next_command(self):
        """The next command of the step this phase runs (STEP_OF); with none
        left, EV_DONE. A '-' command that cannot even start is skipped
        (systemd); any other spawn failure is that command's failure (exit
        203/EXEC)."""
        kind = STEP_OF[self.phase]
        while self.control.queue:
            command = self.control.queue.pop(0)
            try:
                pid = self.host.spawn(self, command, self.control.exit_callback(self.handle), control=kind,
                                      extra_env=self._control_environment(kind))[0]
            except SpawnError as exc:
                if command.ignore_failure:
                    self.host.log.warning(self.name, "Ignoring failed %s: %s" % (CONTROL_KEYS[kind], exc))
                    continue
                self.control.runs(None, command, kind)
                return self.control_ended(kind, {"code": spawn_exit_code(str(exc))}, "spawn failed: %s" % exc)
            self.control.runs(pid, command, kind)
            self.host.log.debug(self.name, "Running %s (pid %d): %s" % (CONTROL_KEYS[kind], pid, command))
            if kind in ("exec_stop", "exec_stop_post"):
                self.arm_stop_timer()
            else:
                self.arm_start_timer()
            return self.phase, self.reason                  # (stays: its exit is awaited)
        return self.phase, self.reason, EV_DONE             # (the step is done: the next one)

    def _control_environment(self, kind):
        env = {}
        if self.main.pid:
            env["MAINPID"] = str(self.main.pid)
        if kind == "exec_stop_post":
            env["SERVICE_RESULT"] = self.run.result
            exit_info = self.main.exit
            if exit_info is not None:
                if "signal" in exit_info:
                    env["EXIT_CODE"], env["EXIT_STATUS"] = "killed", signal_name(exit_info["signal"])[3:]
                else:
                    env["EXIT_CODE"], env["EXIT_STATUS"] = "exited", str(exit_info["code"])
        return env

    def control_ended(self, kind, exit_info, described):
        """The control process of `kind` is over (or could not start): the
        next command (EV_NEXT), or what its failure means."""
        command = self.control.command
        self.control.clear()
        if kind != "exec_stop":
            self.timers.cancel("start")
        ok = exit_info == {"code": 0} or (command is not None and command.ignore_failure)
        key = CONTROL_KEYS[kind]
        if ok:
            if command is not None and exit_info != {"code": 0}:
                self.host.log.info(self.name, "%s failed (%s), ignored ('-')" % (key, described))
            return self.phase, self.reason, EV_NEXT
        if kind == "exec_condition" and condition_skips(exit_info):
            self.host.log.info(self.name, "Not started: condition failed (%s %s)" % (key, described))
            self.host.released(self)
            self.host.stopped(self)
            return STOPPED, "condition failed (%s %s)" % (key, described)   # -> stopped: skipped, not failed
        if kind in ("exec_condition", "exec_start_pre", "exec_start"):
            return self.start_failed("%s failed (%s)" % (key, described), result=_result_of(exit_info))
        if kind == "exec_start_post":
            self.run.result = _result_of(exit_info)
            return self.begin_stop_sequence("policy", "%s failed (%s)" % (key, described), failed=True)
        if kind == "exec_reload":
            return self.run.reload_finished("%s failed (%s)" % (key, described))
        self.host.log.warning(self.name, "%s failed (%s)" % (key, described))
        self.control.queue = []                   # systemd runs no more commands of a step after a failure
        return self.phase, self.reason, EV_DONE

    def _control_exited(self, exit_info):
        kind = self.control.kind
        if kind is None:                  # not one of ours (a stale callback): nothing to do
            return self.phase, self.reason
        return self.control_ended(kind, exit_info, self.host.describe_exit(self, exit_info))

    def start_failed(self, why, result="exit-code", exit_info=None):
        """The start did not come through: what is left is stopped (with
        ExecStopPost=), then Restart= decides, the run counted as failed."""
        self.run.result = result
        self.host.log.warning(self.name, "Start failed: %s" % why)
        if exit_info is not None:
            self.last_exit = exit_info
        return self.begin_stop_sequence("policy", why, failed=True, run_exec_stop=False)

    # -- actions: what a daemon start found (SPEC §6) ------------------------------

    def _adopt(self, pid, pid_start, started_wall):
        self.main.runs(pid, pid_start, True, self.host.now(), started_wall)
        self.main.command = self.spec.exec_start[-1] if self.spec.exec_start else None
        self.host.watch(self, pid, self.main.exit_callback(self.handle))
        self.host.log.info(self.name, "Adopted running process (pid %d)" % pid)
        if self.spec.health_check_url:
            self.watch_health()
        self.run.arm_watchdog()
        if self.spec.type != "oneshot":
            return RUNNING, None                        # (its health check, if any, watches it running)
        return (HEALTH_WAIT if self.probe else ONESHOT), None     # a oneshot's last command: its exit is awaited

    def _restore(self, phase, reason):
        """An earlier daemon left this unit's run ended: it stays as it was."""
        if phase == REMAIN:               # RemainAfterExit=yes: it had run, nothing is left
            self.host.log.info(self.name, "Remains active (RemainAfterExit=yes), as before the daemon restarted")
            return REMAIN, None                         # stopped -> remain: as the earlier daemon left it
        self.succeeded = phase == EXITED and exit_is_clean(self.last_exit, self.spec.success_exit_status)
        return phase, reason                            # stopped -> failed/exited: as it was

    def _restore_backoff(self, reason, restart_in=None):
        """An earlier daemon left it backing off: the delay that remained (not
        known: it starts anew)."""
        if restart_in is None:
            return STOPPED, reason, EV_START            # (stays stopped, and starts anew at once)
        self.host.log.info(self.name, "Restarting in %s (backing off when the daemon stopped)" % format_timespan(
            restart_in))
        self.timers.arm("restart", restart_in, EV_RESTART_DUE)
        return BACKOFF, reason                          # stopped -> backoff: with the delay that remained

    def _reattach(self, reason):
        """ExitType=cgroup: its main process had ended; it runs while its
        cgroup's processes do, else it starts anew."""
        self.host.reattach_cgroup(self)
        if not self.host.cgroup_pids(self):
            return STOPPED, reason, EV_START            # (stays stopped, and starts anew at once)
        self.run.exit_wait = (self.last_exit,)
        self.run.wait_cgroup_empty()
        return RUNNING, reason                          # stopped -> running: until its cgroup empties

    # -- the main process's end (the run's and the stop's actions start with it) --

    def main_gone(self, exit_info):
        """What every exit of the main process does first: forget the pid and
        describe how it ended. What is left of the service is ended too (as
        KillMode= says), unless a control process still runs: an ExecStop=
        that waits for the main process to go must not be killed with it."""
        pid = self.main.pid
        if self.control.pid is None:
            self.host.reap_leftovers(self, pid, own_child=pid is not None and exit_info is not None
                                     and not self.adopted_elsewhere())
        else:
            self.main.reap_pending = True   # after the control process (an ExecStop= waiting for it)
        self.note_main_exit(exit_info)
        self.close_probe()
        if not self.has_process():
            self.host.released(self)
        return self.host.describe_exit(self, exit_info)

    def note_main_exit(self, exit_info):
        self.main.gone(exit_info)
        if exit_info is not None:
            self.last_exit = exit_info

    def adopted_elsewhere(self):
        """The main process is not the daemon's child (forking, MAINPID=, adopted)."""
        return self.main.adopted or self.spec.type == "forking"

    # -- actions: stopping ----------------------------------------------------------

    def _settle_stopped(self, reason="stopped by user"):
        self.timers.cancel_all()
        return STOPPED, reason                          # -> stopped: nothing ran, nothing is pending

    def _begin_stop(self, reason="stopped by user"):
        self.run.result = "success"
        return self.begin_stop_sequence("stop", reason)

    def _begin_restart(self, reason="restarting"):
        self.run.result = "success"
        return self.begin_stop_sequence("restart", reason)

    def begin_stop_sequence(self, after, why, failed=False, run_exec_stop=None):
        """ExecStop= (for a unit that started), KillSignal= to what is left,
        ExecStopPost=; then `after`: "stop", "restart", or "policy" (Restart=
        decides on the run that ended, why and failed telling how)."""
        self.timers.cancel_all()
        self.close_probe()
        self.stop_as(why, failed)
        self.reason = why                 # (what a state save during this step already shows)
        if run_exec_stop is None:
            run_exec_stop = exec_stop_runs(self.phase)
        if self.control.pid is not None:          # a start-pre/post, reload: it ends with the rest
            run_exec_stop = False
        self.control.queue = list(self.spec.exec_stop) if run_exec_stop else []
        return STOP_STEPS[after][0], why, EV_NEXT       # -> its family's ExecStop= step (perhaps empty)

    def stop_as(self, why, failed):
        """A stop begins: why the run ends and whether it failed (why None: its reason stands)."""
        self.stopping = StopSequence(self, why, failed)

    def forget_processes(self):
        """Stop waiting for the main and control process: their exits, should
        they come, are reaped and ignored."""
        self.main.forget()
        self.control.forget()
        self.run.exit_wait = None         # nor for an ExitType=cgroup unit's cgroup

    # -- the end of a run ------------------------------------------------------------

    def finish_run(self, last_exit, outcome, why, failed):
        """No process of the service is left: restart as Restart= says for
        `outcome` (None: unknown, counted as a failure), else settle in FAILED
        (failed=True) or EXITED."""
        spec = self.spec
        self.main.started_wall = None
        self.control.queue = []
        self.last_exit = last_exit
        self.host.stopped(self)
        self.succeeded = not failed and exit_is_clean(outcome, spec.success_exit_status)
        result = None if self.run.result == "success" else self.run.result
        if self.want == "up" and not self.host.shutting_down and should_restart(
                spec.restart, outcome, result=result, statuses=spec):
            self.crash_streak += 1
            delay = restart_delay(spec.restart_sec, self.crash_streak, spec.restart_steps, spec.restart_max_delay)
            self.count_restart()
            self.host.log.info(self.name, "Restarting in %s (%s; restart %d)%s" % (
                format_timespan(delay), why, self.restarts, self.host.deploy_note(self)))
            self.timers.arm("restart", delay, EV_RESTART_DUE)
            return BACKOFF, why                         # -> backoff: Restart= says again, after RestartSec=
        if failed:
            self.host.log.error(self.name, "Failed: %s" % why)
            return FAILED, why                          # -> failed: no restart, and the run failed
        self.host.log.info(self.name, "Exited (%s)" % why)
        return EXITED, why                              # -> exited: no restart, the run ended well enough

    def reload_begins(self):
        self.reload_error = None

    def reload_ends(self, error):
        """A reload is over (error: why it failed): `reload` waiters see it."""
        self.reload_error = error
        self.reload_serial += 1

    def count_restart(self):
        self.restarts += 1
        self.restarts_total += 1

    def count_run(self, ran_for):
        """A run that lasted BACKOFF_RESET_UPTIME ends the crash streak."""
        if ran_for >= BACKOFF_RESET_UPTIME:
            self.crash_streak = 0

    # -- callbacks -----------------------------------------------------------------

    def watch_health(self):
        """Its health check, from now on: its verdicts are events of the table."""
        self.probe = self.host.open_probe(self, self._on_verdict)

    def _on_verdict(self):
        self.handle(EV_HEALTHY if self.probe.status == "healthy" else EV_UNHEALTHY)

    # -- timers and small helpers ------------------------------------------------------

    def arm_start_timer(self):
        self.timers.cancel("start")
        timeout = self.spec.start_timeout()
        if timeout is not None:
            self.timers.arm("start", timeout, EV_START_TIMEOUT)

    def arm_stop_timer(self, seconds=None):
        """TimeoutStopSec= (or `seconds`: TimeoutAbortSec= after the watchdog's signal)."""
        self.timers.cancel("stop")
        seconds = self.stop_settings().timeout_stop_sec if seconds is None else seconds
        if seconds not in (0, float("inf")):          # 0: wait for ever, as systemd
            self.timers.arm("stop", seconds, EV_STOP_TIMEOUT)

    def _reset_limits(self):
        self.start_times.clear()
        self.crash_streak = 0

    def close_probe(self):
        if self.probe is not None:
            self.health_note = (self.probe.status, self.probe.last_error)
            self.probe.close()
            self.probe = None

    def discard(self):
        """Forget timers (the unit was removed and its process is gone)."""
        self.timers.cancel_all()
        self.resources.cancel_removal()   # a unit of that name deployed again owns the group now
        self.give_connection()

    def give_connection(self):
        """The daemon's copy of an Accept=yes connection is closed: the
        process has its own, or will never get it."""
        if self.connection is not None:
            self.connection[0].close()
            self.connection = None


# The key users know each control step by.
CONTROL_KEYS = {"exec_condition": "ExecCondition", "exec_start_pre": "ExecStartPre", "exec_start": "ExecStart",
                "exec_start_post": "ExecStartPost", "exec_reload": "ExecReload", "exec_stop": "ExecStop",
                "exec_stop_post": "ExecStopPost"}


def _result_of(exit_info):
    """systemd's $SERVICE_RESULT for a failed process."""
    if exit_info is None:
        return "exit-code"
    return "signal" if "signal" in exit_info else "exit-code"


# ---- rendering a Service: for status, for the state file -----------------------------

def service_status(service, detail=False):
    """What `status` shows of a Service (with `detail`: of one unit asked for by name)."""
    now = time.time()
    running = service.state in ACTIVE_STATES and service.main.pid
    data = {
        "name": service.name, "state": service.state, "pid": service.main.pid if running else None,
        "since": service.since, "uptime": (now - service.main.started_wall) if running and service.main.started_wall else None,
        "restarts": service.restarts, "last_exit": service.last_exit, "health": service.health()[0],
        "health_error": service.health()[1],
        "memory": process_rss(service.main.pid) if running else None,
        "commit": service.commit, "reason": service.reason, "want": service.want,
        "rolled_back": service.versions.rolled_back, "status_text": service.run.status_text,
    }
    if detail:
        data.update(description=service.spec.description, path=service.spec.path,
                    cpu_seconds=process_cpu_seconds(service.main.pid) if running else None,
                    type=service.spec.type, restart=service.spec.restart, adopted=service.main.adopted,
                    limits=_service_limits(service), phase=PHASE_TEXT.get(service.phase), spawn=service.resources.spawn_path,
                    control_pid=service.control.pid, sources=list(service.spec.sources),
                    control=str(service.control.command) if service.control.command else None,
                    folder={"path": service.spec.owned.path, "tree": service.spec.tree, "files": service.spec.owned.count,
                            "bytes": service.spec.owned.size} if service.spec.owned else None,
                    warnings=list(service.resources.warnings), seccomp=seccomp_summary(service.spec),
                    not_applied=[{"key": key, "value": value, "why": not_applied_reason(key, value)}
                                 for key, value in service.spec.not_applied] +
                    [{"key": key, "value": "", "why": why} for key, why in sandbox_not_applied(service.spec)])
    return data


def _service_limits(service):
    if service.resources.cgroup is not None and service.has_process():
        return service.resources.cgroup.limits
    return [{"key": key, "value": value, "applied": False, "why": "applied when it runs"}
            for _, key, value in resource_limits(service.spec)]


def service_record(service):
    """What state.json keeps of a Service (Service.take_saved reads it back)."""
    active = service.state in ACTIVE_STATES
    to_wall = time.time() - service.host.now()
    return {"want": service.want, "pid": service.main.pid if active else None,
            "pid_start": service.main.pid_start if active else None,
            "restarts": service.restarts, "restarts_total": service.restarts_total, "last_exit": service.last_exit,
            "state": service.state, "phase": service.phase, "reason": service.reason, "commit": service.commit,
            "blob": service.spec.blob, "meaning": service.spec.meaning(), "started_wall": service.main.started_wall,
            "tree": service.resources.linked_tree if active else None,
            "started_tree": service.resources.running_tree if active else None,
            "previous_tree": service.versions.previous_tree, "rejected": service.versions.rejected,
            "rolled_back": service.versions.rolled_back,
            # monotonic times as wall-clock ones, for the next daemon (SPEC §6)
            "crash_streak": service.crash_streak, "start_times": [round(t + to_wall, 3) for t in service.start_times],
            "restart_due": round(service.timers.due("restart") + to_wall, 3)
            if service.phase == BACKOFF and service.timers.due("restart") else None,
            "exit_wait": active and service.run.exit_wait is not None}


class ServiceRun:
    """One run of a Service, from a start that passed its checks to what
    follows its end, and the cells of its starting and running phases (the
    table names them "run.ACTION"). What it keeps is the run's: systemd's
    $SERVICE_RESULT, the last STATUS= and whether READY=1 came, the
    WATCHDOG_USEC= it asked for, the wait for an ExitType=cgroup unit's
    cgroup, and where a reload goes back to. A new start makes a new run."""
    __slots__ = ("service", "result", "status_text", "said_ready", "watchdog_usec", "exit_wait", "reload_from")

    def __init__(self, service):
        self.service = service
        self.result = "success"         # systemd's $SERVICE_RESULT of this run
        self.status_text = None         # the last STATUS= of sd_notify
        self.said_ready = False         # READY=1 came in this run (since RELOADING=1)
        self.watchdog_usec = None       # WATCHDOG_USEC= the service asked for instead of WatchdogSec=
        self.exit_wait = None           # ExitType=cgroup: (the main process's exit_info,) while its cgroup runs
        self.reload_from = RUNNING      # the phase a reload goes back to

    def note_result(self, result):
        """Its first failure is what it ended with."""
        if self.result == "success":
            self.result = result

    def notified(self, fields, trusted=False):
        """An sd_notify message the daemon accepted for this service: what it
        says of the service is kept here; READY=1, RELOADING=1 and STOPPING=1
        are events of the table. MAINPID= names a process of the service
        (or comes from root: `trusted`), as systemd requires."""
        service = self.service
        if fields.get("MAINPID", "").isdigit() and service.main.pid is not None and service.phase in (
                NOTIFY_WAIT, FORKING, ONESHOT, HEALTH_WAIT, START_POST, RUNNING, RELOAD):
            pid = int(fields["MAINPID"])
            if pid != os.getpid() and (trusted or service.host.belongs_to(service, pid)):
                self.set_main_pid(pid)
            else:
                service.host.log.warning(service.name, "MAINPID=%d refused: not a process of this service" % pid)
        if "STATUS" in fields:
            self.status_text = fields["STATUS"][:MAX_STATUS_TEXT] or None
        if fields.get("WATCHDOG_USEC", "").isdigit():
            self.watchdog_usec = int(fields["WATCHDOG_USEC"])
            self.arm_watchdog()
        if fields.get("WATCHDOG") == "1":
            self.arm_watchdog()
        if fields.get("EXTEND_TIMEOUT_USEC", "").isdigit():
            service.timers.extend("start", int(fields["EXTEND_TIMEOUT_USEC"]) / 1e6)
        if fields.get("STOPPING") == "1":
            service.handle(EV_STOPPING)
        if fields.get("RELOADING") == "1":
            service.handle(EV_RELOADING)
        if fields.get("READY") == "1":
            service.handle(EV_READY)
        if fields.get("WATCHDOG") == "trigger":
            service.handle(EV_WATCHDOG)

    def oom_killed(self):
        """The OOM killer killed a process of the unit: OOMPolicy=continue
        only says so; stop ends the run as failed (result oom-kill, Restart=
        decides); kill also kills every other process of it at once."""
        service = self.service
        policy = service.spec.oom_policy
        why = "a process was killed by the OOM killer"
        service.host.log.warning(service.name, "%s (OOMPolicy=%s)" % (sentence(why), policy))
        if policy == "continue":
            return service.phase, service.reason
        if policy == "kill":
            service.host.signal(service, signal.SIGKILL)
        self.result = "oom-kill"
        return service.begin_stop_sequence("policy", why, failed=True)

    def runtime_max_passed(self):
        """Active for longer than RuntimeMaxSec=: stopped, as failed with the
        result "timeout" (Restart= then decides, as systemd)."""
        service = self.service
        why = "active for longer than RuntimeMaxSec=%s" % format_timespan(service.spec.runtime_max_sec or 0)
        service.host.log.warning(service.name, sentence(why) + "; stopping")
        self.result = "timeout"
        return service.begin_stop_sequence("policy", why, failed=True)

    def pre_step(self):
        service = self.service
        service.control.queue = list(service.spec.exec_start_pre)
        return START_PRE, None, EV_NEXT                 # condition -> start-pre: its ExecStartPre= commands

    def start_main(self):
        """ExecStart=: for forking the process that forks the main one (a
        control process), for a oneshot each command in turn, else the main
        process (simple, exec, notify)."""
        service = self.service
        service.control.queue = list(service.spec.exec_start)
        if service.spec.type == "forking":
            return FORKING, None, EV_NEXT               # start-pre -> start-forking
        if service.spec.type == "oneshot":
            return ONESHOT, None, EV_NEXT               # start-pre -> start-oneshot
        return SPAWNED, None, EV_NEXT                   # start-pre -> spawned: the main process is made

    def spawn_main(self):
        # A simple/exec main process is not waited for in the loop: ready
        # comes with its exec (EV_EXEC), so many starts overlap their
        # children's work. Notify, forking and oneshot wait for more anyway.
        service = self.service
        spec = service.spec
        while True:
            if not service.control.queue:
                return service.phase, service.reason, EV_DONE     # a oneshot's commands all ran
            command = service.control.queue.pop(0)
            service.main.command = command
            overlapped = spec.type in ("simple", "exec")
            try:
                on_exit = service.main.exit_callback(service.handle)
                on_exec = service.main.exec_callback(service.handle) if overlapped else None
                pid, pid_start, confirmed = service.host.spawn(service, command, on_exit, on_exec)
            except SpawnError as exc:
                if command.ignore_failure and service.control.queue:
                    service.host.log.warning(service.name, "Ignoring failed main command: %s" % exc)
                    continue
                service.main.command = None
                return service.start_failed("spawn failed: %s" % exc, exit_info={"code": spawn_exit_code(str(exc))},
                                            result="exit-code")
            break
        service.main.runs(pid, pid_start, False, service.host.now())
        if spec.type in ("oneshot",) + NOTIFY_TYPES:
            service.arm_start_timer()
            service.host.log.debug(service.name, "Running main command (pid %d): %s" % (pid, command))
            if spec.type == "oneshot":
                return ONESHOT, None                    # (its next command, or the start is done, at its exit)
            return NOTIFY_WAIT, "waiting for READY=1"   # (READY=1, or the start failed)
        service.main.exec_error = None
        if not confirmed:
            return SPAWNED, None                        # (stays: running once its exec is confirmed)
        return SPAWNED, None, EV_EXEC                   # (its exec is known to have worked)

    def exec_done(self, error=None):
        service = self.service
        if error:
            service.main.exec_error = error       # the exit follows: a spawn failure (203)
            return SPAWNED, service.reason   # (stays spawned until that exit)
        return self.main_running()

    def main_running(self):
        """The main process runs (exec'd, READY=1, or forked and found), or a
        oneshot's commands all ran: its ExecStartPost= commands, then ready."""
        service = self.service
        service.control.queue = list(service.spec.exec_start_post)
        return START_POST, None, EV_NEXT                # -> start-post

    def started(self):
        """Everything of the start ran: ready, or (a health check) waiting for
        it; a oneshot is done (EV_FINISHED)."""
        service = self.service
        service.timers.cancel("start")
        self.arm_watchdog()
        if service.spec.type == "oneshot":
            return START_POST, service.reason, EV_FINISHED
        if service.spec.health_check_url and service.probe is None:
            service.host.log.info(service.name, "Started (%s), waiting for its health check" % (
                "pid %d" % service.main.pid if service.main.pid else "its cgroup runs"))
            service.watch_health()
            return HEALTH_WAIT, "waiting for the health check"     # -> start-health: ready, not yet healthy
        service.host.log.info(service.name, "Started (%s)" % (
            "pid %d" % service.main.pid if service.main.pid else "its cgroup runs"))
        return RUNNING, None                            # -> running: its start is complete

    def oneshot_finished(self):
        """A oneshot's start is complete: it remains active (RemainAfterExit=),
        or its run ends here, as a success (Restart= decides)."""
        service = self.service
        if service.spec.remain_after_exit:
            service.host.log.info(service.name, "Finished; remains active (RemainAfterExit=yes)")
            return REMAIN, None                         # start-post -> remain
        service.stop_as("oneshot %s" % describe_exit(service.last_exit or {"code": 0}), False)
        service.main.exit = {"code": 0}      # its run counts as a success, a '-' command's failure too
        return END_POST, service.reason, EV_DONE           # start-post -> end-post: no ExecStopPost=, the end

    def notified_ready(self):
        service = self.service
        self.said_ready = True
        if service.spec.type not in NOTIFY_TYPES or service.main.pid is None:
            return service.phase, service.reason     # a oneshot's, or a forking unit's early word: not its readiness
        return self.main_running()

    def forked(self, exit_info):
        """Type=forking: its ExecStart= process ended; once it exited 0 the
        main pid is read from PIDFile= (or guessed)."""
        service = self.service
        kind = service.control.kind
        if kind != "exec_start":
            return service.phase, service.reason
        if exit_info != {"code": 0} and not (service.control.command and service.control.command.ignore_failure):
            return service.control_ended(kind, exit_info, service.host.describe_exit(service, exit_info))
        service.main.forked_group = service.control.pid   # what its children left in its process group
        service.control.clear()
        return FORKING, service.reason, EV_PID_FILE       # (stays: its main pid is looked for now)

    def find_main_pid(self):
        service = self.service
        if service.spec.type != "forking" or service.main.pid is not None:
            return service.phase, service.reason
        try:
            pid = service.host.main_pid_of(service)
        except SpawnError as exc:
            return service.start_failed(str(exc), result="protocol")
        if pid is None:                  # the PIDFile= is not written yet: look again soon
            service.timers.arm("pid_file", PID_FILE_POLL_INTERVAL, EV_PID_FILE)
            return FORKING, "waiting for %s" % service.spec.pid_file   # (stays: looked at again soon)
        self.set_main_pid(pid)
        return self.main_running()

    def set_main_pid(self, pid):
        """A main process the daemon did not start itself (forking, MAINPID=):
        watched through a pidfd; its exit status is not ours to know."""
        service = self.service
        if pid == service.main.pid or pid <= 1:
            return
        service.main.runs(pid, pid_start_time(pid), False, service.host.now())
        service.host.watch(service, pid, service.main.exit_callback(service.handle), adopted=False)
        service.host.log.info(service.name, "Main process is pid %d" % pid)

    def ready(self):
        service = self.service
        service.host.log.info(service.name, "Healthy")
        return RUNNING, None                            # start-health -> running: its first check passed

    def note_healthy(self):
        service = self.service
        service.host.log.info(service.name, "Healthy")
        service.host.changed(service, service.state)   # the health column changed, the state did not
        return RUNNING, service.reason                     # (stays running)

    def start_timed_out(self):
        service = self.service
        why = "start timed out after %s" % format_timespan(service.spec.start_timeout())
        service.host.log.warning(service.name, sentence(why))
        self.result = "timeout"
        return service.begin_stop_sequence("policy", why, failed=True, run_exec_stop=service.phase == START_POST)

    def main_exited(self, exit_info, cgroup_empty=False):
        """The main process ended on its own: a oneshot's next command, a
        failed start, or the end of the run (ExecStop= and ExecStopPost= then
        run as for a stop, and Restart= decides). With ExitType=cgroup the
        run goes on while other processes of its cgroup live (`cgroup_empty`:
        the last one is gone now)."""
        service = self.service
        ran_for = service.main.ran_for(service.host.now())
        phase, command = service.phase, service.main.command
        if phase == SPAWNED:              # ended before its exec was confirmed: did exec fail?
            error = service.main.exec_error or service.host.exec_report(service.name) or None
            service.main.exec_error = None
            if error:
                service.main_gone(exit_info)
                service.main.command = None
                return service.start_failed("spawn failed: %s" % error, exit_info={"code": spawn_exit_code(error)})
        if cgroup_empty:
            self.exit_wait = None
        elif service.spec.exit_type == "cgroup" and phase in (SPAWNED, START_POST, RUNNING, RELOAD) and \
                service.host.cgroup_pids(service, excluding=service.main.pid):
            service.host.log.info(service.name, "Main process ended (%s); running while its cgroup has processes "
                               "(ExitType=cgroup)" % service.host.describe_exit(service, exit_info))
            service.note_main_exit(exit_info)
            service.timers.cancel("watchdog")
            self.exit_wait = (exit_info,)
            self.wait_cgroup_empty()
            if phase == SPAWNED:
                return SPAWNED, service.reason, EV_EXEC    # (it exec'd, and its exit came first: its start goes on)
            return phase, service.reason
        described = service.main_gone(exit_info)
        service.main.command = None
        service.count_run(ran_for)
        succeeded = run_succeeded(service.spec.type, exit_info, service.spec.success_exit_status,
                                  command is not None and command.ignore_failure)
        if phase == NOTIFY_WAIT and not self.said_ready:
            self.result = "protocol" if succeeded else _result_of(exit_info)
            return service.begin_stop_sequence("policy", "exited before READY=1 (%s)" % described, failed=True,
                                               run_exec_stop=False)
        if succeeded and service.spec.remain_after_exit and phase in (RUNNING, RELOAD):
            service.host.log.info(service.name, "Exited (%s); remains active (RemainAfterExit=yes)" % described)
            service.timers.cancel("watchdog")
            if phase == RELOAD and service.control.pid is not None:
                self.reload_from = REMAIN      # the reload finishes first, then it remains
                return RELOAD, service.reason     # (stays reloading: then remain)
            service.timers.cancel_all()
            return REMAIN, None                         # running -> remain: exited well, RemainAfterExit=yes
        self.result = "success" if succeeded else _result_of(exit_info)
        oom = not succeeded and service.spec.oom_policy != "continue" and service.host.oom_killed(service)
        if oom:                           # the OOM killer ended it: failed, as systemd (result oom-kill)
            self.result = "oom-kill"
        failed = oom or (service.spec.type == "oneshot" and not succeeded)
        return service.begin_stop_sequence("policy", described, failed=failed, run_exec_stop=exec_stop_runs(phase))

    def oneshot_exited(self, exit_info):
        """A oneshot's command ended: the next one (EV_NEXT), or a failed start."""
        service = self.service
        ran_for = service.main.ran_for(service.host.now())
        command = service.main.command
        described = service.main_gone(exit_info)
        service.main.command = None
        service.count_run(ran_for)
        if not run_succeeded("oneshot", exit_info, service.spec.success_exit_status,
                             command is not None and command.ignore_failure):
            return service.start_failed("oneshot " + described, result=_result_of(exit_info))
        return ONESHOT, service.reason, EV_NEXT            # (stays: its next command)

    def wait_cgroup_empty(self):
        """ExitType=cgroup: look again shortly whether the cgroup emptied (also
        while it stops: its end is then the main process's)."""
        service = self.service
        def look():
            if self.exit_wait is None or service.run is not self:     # (a new run waits for nothing of this one)
                return
            if service.host.cgroup_pids(service):
                service.timers.arm("exit_wait", EXIT_WAIT_POLL, look)
            elif service.phase in (START_POST, RUNNING, RELOAD):
                service.handle(EV_EXIT, exit_info=self.exit_wait[0], cgroup_empty=True)
            else:
                exit_info, self.exit_wait = self.exit_wait[0], None
                service.handle(EV_EXIT, exit_info=exit_info)
        service.timers.arm("exit_wait", EXIT_WAIT_POLL, look)

    # -- reloading: ExecReload=, ReloadSignal=, RELOADING=1 ---------------------------

    def begin_reload(self):
        service = self.service
        service.reload_begins()
        self.reload_from = service.phase
        if service.spec.exec_reload:
            service.control.queue = list(service.spec.exec_reload)
            return RELOAD, service.reason, EV_NEXT         # -> reload: its ExecReload= commands
        if service.spec.type == "notify-reload" and service.main.pid:
            service.host.log.info(service.name, "Reloading (%s)" % signal_name(service.spec.reload_signal))
            self.said_ready = False
            service.host.signal_main(service, service.spec.reload_signal)
            service.arm_start_timer()
            return RELOAD, None                         # running -> reload: until READY=1
        return self.reload_finished("it has no ExecReload=")

    def reloading_notified(self):
        service = self.service
        self.reload_from = RUNNING
        self.said_ready = False
        service.arm_start_timer()
        return RELOAD, None                             # running -> reload: RELOADING=1, until READY=1

    def reload_ready(self):
        service = self.service
        self.said_ready = True
        if service.control.pid is not None:
            return RELOAD, None           # ExecReload= still runs: done when it exits
        return self.reload_finished(None)

    def reload_timed_out(self):
        service = self.service
        if service.control.pid is not None:
            service.host.kill_control(service, signal.SIGKILL)
            service.control.serial += 1      # its exit is reaped and ignored
            service.control.clear()
        return self.reload_finished("timed out after %s" % format_timespan(service.spec.start_timeout()))

    def reload_done(self):
        return self.reload_finished(None)

    def reload_finished(self, error):
        service = self.service
        service.timers.cancel("start")
        service.reload_ends(error)
        if error:
            service.host.log.warning(service.name, "Reload failed: %s" % error)
        else:
            service.host.log.info(service.name, "Reloaded")
        return self.reload_from, None

    def stopping_notified(self):
        """STOPPING=1: the service is going down by itself; its exit is
        awaited (SIGKILL after TimeoutStopSec=), then Restart= decides."""
        service = self.service
        service.timers.cancel_all()
        service.stop_as(None, False)
        service.host.log.info(service.name, "Stopping (STOPPING=1)")
        service.arm_stop_timer()
        return ENDING, "stopping (STOPPING=1)"          # running -> ending: its exit is awaited

    def restart_unhealthy(self):
        """Retries used up: restart as Restart= would after a failure (or, for
        a new version that never became healthy, roll back)."""
        service = self.service
        probe = service.probe
        why = "health check failed %d times: %s" % (probe.failures, probe.last_error) if probe \
            else "health check failed"
        never_healthy = service.phase == HEALTH_WAIT
        phase, _, follow = service.begin_stop_sequence("restart", why)   # with the failing version's KillSignal= etc.
        if never_healthy and service.roll_back("never became healthy: " + why):
            return phase, "rolling back: never became healthy: " + why, follow
        service.count_restart()
        service.host.log.warning(service.name, "Restarting: %s" % why)
        return phase, why, follow

    def watchdog_expired(self):
        service = self.service
        interval = self.watchdog_interval()
        why = "watchdog timeout (no WATCHDOG=1 within %s)" % format_timespan(interval or 0)
        service.host.log.warning(service.name, "%s; sending %s" % (
            sentence(why), signal_name(service.spec.watchdog_signal)))
        self.result = "watchdog"
        service.timers.cancel_all()
        service.close_probe()
        service.stop_as(why, True)
        service.host.signal(service, service.spec.watchdog_signal, first=True)
        service.arm_stop_timer(service.spec.timeout_abort_sec)
        return ENDING, why                              # -> ending: WatchdogSignal= sent, TimeoutAbortSec= runs

    def watchdog_interval(self):
        service = self.service
        if self.watchdog_usec:
            return self.watchdog_usec / 1e6
        return service.spec.watchdog_sec if 0 < service.spec.watchdog_sec < float("inf") else None

    def arm_watchdog(self):
        """WatchdogSec=: armed once the service is ready, again at each WATCHDOG=1."""
        service = self.service
        service.timers.cancel("watchdog")
        interval = self.watchdog_interval()
        if interval and service.main.pid and service.phase not in STOP_FAMILY:
            service.timers.arm("watchdog", interval, EV_WATCHDOG)


class StopSequence:
    """One stop of a Service under way, from its ExecStop= to what follows
    its ExecStopPost=, and the cells of the stopping phases (the table names
    them "stop.ACTION"). It keeps what the stop needs: why the run ended
    and whether it failed (what Restart= decides on, for the end of a run),
    the version being stopped (its KillSignal=, KillMode=, TimeoutStopSec=,
    ...: a rollback may put another on the service meanwhile) and whether a
    timeout already sent SIGKILL (then the next one gives the processes up).
    Which family it is (stop, restart, the end of a run) its phase says: a
    start or a stop during it moves the service to the other family."""
    __slots__ = ("service", "why", "failed", "settings", "timed_out")

    def __init__(self, service, why, failed):
        self.service = service
        self.why, self.failed = why, failed   # why None: STOPPING=1, the service's own reason stands
        self.settings = service.spec
        self.timed_out = False

    @property
    def family(self):
        """What follows it: "stop", "restart" or "policy" (STOP_STEPS)."""
        return STOP_FAMILY[self.service.phase]

    def signal_leftovers(self):
        """KillSignal= to the main and control process (and, as KillMode=
        says, the rest; SIGKILL after TimeoutStopSec=), then ExecStopPost=.
        With ExitType=cgroup the processes left in the cgroup count."""
        service = self.service
        after = self.family
        if not service.has_process() and service.run.exit_wait is None:
            return self.run_stop_post()
        if service.run.exit_wait is not None:
            service.run.wait_cgroup_empty()     # its end ends the stop
        stopped = self.settings
        number = stopped.kill_signal
        if after == "restart" and stopped.restart_kill_signal is not None:
            number = stopped.restart_kill_signal          # RestartKillSignal=, as systemd for a restart job
        service.host.log.info(service.name, "Stopping (%s, %s)" % (
            "pid %d" % service.main.pid if service.main.pid else "what is left", signal_name(number)))
        service.main.reap_pending = True
        service.host.signal(service, number, first=True)
        if stopped.send_sighup and number != signal.SIGHUP:
            service.host.signal(service, signal.SIGHUP)
        service.arm_stop_timer()
        return STOP_STEPS[after][1], service.reason        # -> stopping (of its family)

    def run_stop_post(self):
        """Main and control process are gone: the rest of the service goes
        (as KillMode= says), then ExecStopPost= runs."""
        service = self.service
        service.timers.cancel("stop")
        if service.main.reap_pending:             # else the main process's exit already ended the rest
            service.main.reap_pending = False
            service.host.reap_leftovers(service, None, own_child=False)
        service.control.queue = list(service.spec.exec_stop_post)
        return STOP_STEPS[self.family][2], service.reason, EV_NEXT    # -> its ExecStopPost= step

    def end(self):
        """Nothing of the service is left: what follows a stop of its family."""
        service = self.service
        after = self.family
        service.timers.cancel_all()
        service.control.queue = []
        service.host.released(service)
        why, failed = (self.why, self.failed) if self.why is not None else (service.reason, False)
        if after == "policy":
            return service.finish_run(service.last_exit, service.main.exit, why, failed)
        service.host.stopped(service)
        service.host.log.info(service.name, "Stopped (%s%s)" % (
            describe_exit(service.last_exit) if service.last_exit else "no process",
            ", after SIGKILL" if self.timed_out else ""))
        if after == "restart" and service.want == "up" and not service.host.shutting_down:
            service.host.log.info(service.name, "Restarting (requested)")
            return STOPPED, service.reason, EV_START        # restart-post -> stopped, and started at once
        return STOPPED, service.reason or "stopped by user"   # stop-post -> stopped (or a restart that may not start)

    def main_gone(self, exit_info):
        service = self.service
        described = service.main_gone(exit_info)
        service.host.log.debug(service.name, "Main process ended while stopping (%s)" % described)
        if service.phase == STOP_STEPS[self.family][1] and service.control.pid is None:
            return self.run_stop_post()
        return service.phase, service.reason

    def control_gone(self, exit_info):
        service = self.service
        service.control.clear()
        if service.main.pid is None:
            return self.run_stop_post()
        return service.phase, service.reason

    def command_timed_out(self):
        service = self.service
        service.host.log.warning(service.name, "ExecStop= did not finish within %s" % format_timespan(
            self.settings.timeout_stop_sec))
        service.control.queue = []
        return service.phase, service.reason, EV_DONE         # (KillSignal= to it too, then)

    def post_timed_out(self):
        service = self.service
        service.control.queue = []
        if self.timed_out:
            service.host.log.error(service.name, "ExecStopPost= still there after SIGKILL: given up on")
            service.forget_processes()
            return service.phase, service.reason, EV_DONE
        return self.send_sigkill("ExecStopPost=", "ExecStopPost= did not finish within %s")

    def leave_running(self, what):
        """SendSIGKILL=no: what outlived TimeoutStopSec= is left running and
        no longer waited for (as systemd leaves it); the stop goes on."""
        service = self.service
        service.host.log.warning(service.name, "%s still there after %s; SendSIGKILL=no: left running" % (
            what, format_timespan(self.settings.timeout_stop_sec)))
        service.run.note_result("timeout")
        service.main.reap_pending = False
        service.forget_processes()
        return self.run_stop_post() if what != "ExecStopPost=" else (service.phase, service.reason, EV_DONE)

    def to_restart(self, reason=None):
        """A start or restart while it stops (or its run ends): it starts again after, at the same step."""
        return STOP_STEPS["restart"][STOP_STEPS[self.family].index(self.service.phase)], reason or "restarting"

    def to_stop(self, reason="stopped by user"):
        """A stop while it stops to restart: it stays stopped after, at the same step."""
        return STOP_STEPS["stop"][STOP_STEPS["restart"].index(self.service.phase)], reason

    def kill_hard(self):
        """TimeoutStopSec= passed: SIGKILL, and one more TimeoutStopSec= for
        it to work; after that the processes are given up on (as systemd:
        "still around after SIGKILL, ignoring") so that no stop hangs."""
        service = self.service
        if self.timed_out:
            service.host.log.error(service.name, "Processes still there %s after SIGKILL: given up on" % (
                format_timespan(self.settings.timeout_stop_sec)))
            service.forget_processes()
            return self.run_stop_post()
        service.run.note_result("timeout")
        return self.send_sigkill("Processes", "Did not stop within %s")

    def send_sigkill(self, what, message):
        """TimeoutStopSec= passed: FinalKillSignal= to what is left, and one
        more TimeoutStopSec= for it to work (SendSIGKILL=no: left running)."""
        service, settings = self.service, self.settings
        if not settings.send_sigkill:
            return self.leave_running(what)
        service.host.log.warning(service.name, (message + "; sending %s") % (
            format_timespan(settings.timeout_stop_sec), signal_name(settings.final_kill_signal)))
        self.timed_out = True
        service.host.signal(service, settings.final_kill_signal, first=False)
        service.arm_stop_timer()
        return service.phase, service.reason


class UnitTimers:
    """A Service's timers, by what they time: "start" (TimeoutStartSec=),
    "stop" (TimeoutStopSec=, TimeoutAbortSec=), "watchdog", "runtime"
    (RuntimeMaxSec=), "restart" (RestartSec=), "pid_file" and "exit_wait"
    (looks again). One fires its event into the service's table (or calls
    its function) and is gone; arming one again replaces it."""
    __slots__ = ("service", "pending")

    def __init__(self, service):
        self.service = service
        self.pending = {}               # name -> (the host's Timer, monotonic time it fires, its event)

    def arm(self, name, seconds, event):
        self.cancel(name)

        def fired():
            if self.pending.get(name, (None,))[0] is not timer:
                return                    # cancelled, or armed again since (a host that fires it all the same)
            del self.pending[name]
            event() if callable(event) else self.service.handle(event)
        timer = self.service.host.call_later(seconds, fired)
        self.pending[name] = (timer, self.service.host.now() + seconds, event)

    def extend(self, name, seconds):
        """`name`, if armed, fires no sooner than `seconds` from now (EXTEND_TIMEOUT_USEC=)."""
        if name in self.pending and self.service.host.now() + seconds > self.pending[name][1]:
            self.arm(name, seconds, self.pending[name][2])

    def armed(self, name):
        return name in self.pending

    def due(self, name):
        """The monotonic time `name` fires, None if it is not armed."""
        return self.pending[name][1] if name in self.pending else None

    def cancel(self, *names):
        for name in names:
            if name in self.pending:
                self.pending.pop(name)[0].cancel()

    def cancel_all(self):
        self.cancel(*list(self.pending))


class MainProcess:
    """A Service's main process: its pid (with its /proc start time, against
    pid reuse), how it came to run, and how it ended. Its exit and exec
    callbacks are bound to the process they were made for: the exit of one
    the service gave up (after an internal error, or a MAINPID= that moved
    on) is reaped and ignored, never taken for the one that runs now."""
    __slots__ = ("pid", "pid_start", "adopted", "command", "serial", "started_at", "started_wall", "exec_error",
                 "exit", "forked_group", "reap_pending")

    def __init__(self):
        self.pid = None
        self.pid_start = None
        self.adopted = False            # started by an earlier daemon
        self.command = None             # the ExecStart= command it runs
        self.serial = 0                 # counts main processes: an exit callback knows its own
        self.started_at = None          # monotonic time it started
        self.started_wall = None        # wall time it started (uptime)
        self.exec_error = None          # why a SPAWNED process could not exec (its exit follows)
        self.exit = None                # how this run's main process ended ($EXIT_CODE of ExecStopPost=)
        self.forked_group = None        # process group of a forking unit's ExecStart= (its session too)
        self.reap_pending = False       # what is left of the unit is still to be ended (its exit came
        #                                 while a control process ran, or a stop signalled it)

    def runs(self, pid, pid_start, adopted, now, started_wall=None):
        self.pid, self.pid_start, self.adopted, self.started_at = pid, pid_start, adopted, now
        self.started_wall = started_wall or self.started_wall or time.time()

    def gone(self, exit_info):
        self.pid = self.pid_start = self.started_wall = None
        if exit_info is not None:
            self.exit = exit_info

    def forget(self):
        self.serial += 1
        self.pid = self.pid_start = self.command = None

    def ran_for(self, now):
        return now - (self.started_at or now)

    def exit_callback(self, handle):
        """on_exit of the main process about to be watched: EV_EXIT."""
        self.serial += 1
        return _bound_to_serial(self, handle, EV_EXIT, "exit_info")

    def exec_callback(self, handle):
        """on_exec of the process just given an exit callback: EV_EXEC."""
        return _bound_to_serial(self, handle, EV_EXEC, "error")


class ControlProcess:
    """A Service's control process (the ExecCondition=, ExecStartPre=, ...
    command that runs now, or a forking unit's ExecStart=), and the commands
    of its step still to run. Its exit callback is bound to it, as the main
    process's is."""
    __slots__ = ("pid", "command", "kind", "serial", "queue")

    def __init__(self):
        self.pid = self.command = self.kind = None   # kind: its UnitSpec field ("exec_start_pre", ...)
        self.serial = 0
        self.queue = []                 # commands left in the step (control, or a oneshot's mains)

    def runs(self, pid, command, kind):
        self.pid, self.command, self.kind = pid, command, kind

    def clear(self):
        self.pid = self.command = self.kind = None

    def forget(self):
        self.serial += 1
        self.clear()
        self.queue = []

    def exit_callback(self, handle):
        """on_exit of the control process about to start: EV_CONTROL_EXIT."""
        self.serial += 1
        return _bound_to_serial(self, handle, EV_CONTROL_EXIT, "exit_info")


def _bound_to_serial(process, handle, event, fact):
    """A callback that hands its argument to `handle` as `event` only while
    `process` (a MainProcess or ControlProcess) is still the one it was made
    for: the same serial."""
    serial = process.serial

    def callback(value):
        if process.serial == serial:
            handle(event, **{fact: value})
    return callback


class ProcessResources:
    """What the Launcher keeps of one unit's processes, in a record of its own
    (Service reads it, never writes it). The trees are also moved by the
    Deployer and Recovery, when a running process is pointed at another
    snapshot of its folder."""
    __slots__ = ("cgroup", "cgroup_timer", "private_tmp", "spawn_path", "warnings", "running_tree", "linked_tree")

    def __init__(self):
        self.cgroup = None              # CgroupSet of its processes
        self.cgroup_timer = None        # removal of the cgroups of a stopped service
        self.private_tmp = None         # PrivateTmp= folders of this run
        self.spawn_path = None          # how its last process was made: posix_spawn, clone3, fork
        self.warnings = []              # what of the unit its last process could not have (a lowered limit, ...)
        self.running_tree = None        # the snapshot its main process was started from (its cwd may be there)
        self.linked_tree = None         # the snapshot that process reads through %Y now (a reload moves it)

    def cancel_removal(self):
        if self.cgroup_timer is not None:
            self.cgroup_timer.cancel()
            self.cgroup_timer = None


class Launcher(ServiceHost):
    """The process half of ServiceHost: what a service's processes get
    (environment, credentials, working directory, log, cgroups), starting
    them, signalling them as KillMode= says, and learning of their exit.
    DaemonHost adds the daemon's half (dependencies, deploys, changes)."""

    def __init__(self, config, log, selector, call_later, exit_watch_mode=None):
        self.config, self.log = config, log
        self.selector, self.call_later = selector, call_later
        self.exit_watcher = ExitWatcher(selector, call_later, exit_watch_mode)
        self.spawner = Spawner()
        self.cgroups = None               # Cgroups, found at start-up
        self.oom_watch = OomWatch(selector, call_later, lambda service: service.handle(EV_OOM))
        self.run_as_cache = {}            # (User=, Group=) -> (expiry, RunAs or SpawnError)
        self.exec_reports = {}            # service name -> exec-error pipe of a start not confirmed yet
        self.exec_received = {}           # service name -> what that pipe said so far
        self.notify_address = None        # NOTIFY_SOCKET for the services, once the daemon listens
        self.folders = specifier_context()   # where RuntimeDirectory= and the like go (%t %S %C %L %E)
        self.snapshots = None             # Snapshots of units' folders (the deployer's)
        self.virtualization = None        # the container this runs in, for ConditionVirtualization=
        self.shutting_down = False

    @staticmethod
    def now():
        return time.monotonic()

    def spawn(self, service, command, on_exit, on_exec=None, control=None, extra_env=None):
        """Resolve everything a process of `service` needs, start `command`
        and watch it. Returns (pid, start time, exec confirmed). With
        `on_exec`, a forked child's exec is not waited for: on_exec(None) is
        called once it exec'd, on_exec(message) if exec failed (its exit
        follows), so that many starts overlap their children's exec.
        `control`: the step of a control process (it joins the service's
        cgroup beside the main process); `extra_env`: $MAINPID and the like."""
        if self.shutting_down and control not in ("exec_stop", "exec_stop_post"):
            raise SpawnError("the daemon is shutting down")
        spec = service.spec
        run_as = self._unit_run_as(service)
        env = self._service_environment(spec, run_as)
        if self.notify_address and spec.notify_accepted_from() != "none":
            env["NOTIFY_SOCKET"] = self.notify_address
        if control is None and spec.watchdog_sec and spec.watchdog_sec != float("inf"):
            env["WATCHDOG_USEC"] = str(int(spec.watchdog_sec * 1e6))
        env.update(service.monitor or {})
        env.update(extra_env or {})
        if command.expand:
            argv = expand_command(command.argv, env)
            program = expand_command([command.program], env)
        else:
            argv, program = list(command.argv), [command.program]
        if not argv or not program:
            raise SpawnError("the command is empty after expanding variables: %s" % command)
        path = find_program(program[0], env.get("PATH"))
        if path is None:
            raise SpawnError("%s: command not found on PATH (%s)" % (program[0], env.get("PATH")))
        if spec.directories:
            env.update(self._make_directories(spec, run_as))
        if spec.credentials:
            env["CREDENTIALS_DIRECTORY"] = self._credentials(service, run_as)
        if spec.owned is not None and self.snapshots is not None:
            self.snapshots.check(service.name, spec)
        cwd = self._working_directory(spec, run_as)
        if command.privileged:            # '+' and '!': the daemon's own credentials
            run_as = RunAs(user=run_as.user, home=run_as.home, shell=run_as.shell)
        elif spec.supplementary_groups:
            run_as = self._with_groups(run_as, spec.supplementary_groups)
        if service.has_process() and service.resources.cgroup is not None:
            group = service.resources.cgroup        # a control process beside the main one: the same groups
        else:
            group = self.cgroups.prepare(service.name, spec, suspect=service.last_exit == {"signal": signal.SIGKILL}) \
                if self.cgroups else None
            service.resources.cgroup = group
            if group is not None:
                self.oom_watch.watch(service)
        if service.resources.cgroup_timer is not None:
            service.resources.cgroup_timer.cancel()
            service.resources.cgroup_timer = None
        # With a cgroup the child joins it before exec (fork path): joined from
        # here after posix_spawn, a shell could fork an escapee first.
        self._note_identifier(service)
        setup = ProcessSetup(spec)
        if control in (None, "exec_start"):       # said once a start, of the main process
            service.resources.warnings = list(setup.lowered)
            for why in setup.lowered:
                self.unit_warning(service.name, why)
            for entry in (group.limits if group else ()):
                if not entry["applied"]:
                    self.unit_warning(service.name, "%s=%s not applied: %s" % (entry["key"], entry["value"], entry["why"]))
        sandbox = self._sandbox(service, run_as) if command.privileged != "+" and sandbox_wanted(spec) else None
        listen = self.listening_for(service) if control in (None, "exec_start") else None
        if listen:                        # socket activation (SPEC §18)
            env.update(listen[3], LISTEN_FDS=str(len(listen[0])), LISTEN_FDNAMES=":".join(listen[1]))
        for word in spec.unset_environment:   # last, over what gitproc set too: NAME, or only NAME=VALUE
            name, equals, value = word.partition("=")
            if name in env and (not equals or env[name] == value):
                del env[name]
        pid, report = self.spawner.spawn(argv, path, env, cwd, self.config.service_log(service.log_name), run_as,
                                         group if group and group.folders else None,
                                         spec.private_pids and control is None,
                                         wait=on_exec is None, setup=setup,
                                         stdio=(("data", b"".join(spec.standard_input_data))
                                                if spec.standard_input[0] == "data" else spec.standard_input,
                                                spec.standard_output, spec.standard_error),
                                         ignore_sigpipe=spec.ignore_sigpipe, sandbox=sandbox,
                                         listen=(listen[0], listen[2]) if listen else None)
        if listen and listen[2] is not None:
            service.give_connection()
        service.resources.spawn_path = self.spawner.last_path
        if control in (None, "exec_start"):   # the main process, or a forking unit's parent of it
            service.resources.running_tree = service.resources.linked_tree = spec.tree
        self.exit_watcher.watch(pid, on_exit)
        if report is not None:
            os.set_blocking(report, False)
            self.exec_reports[service.name] = report
            self.selector.register(report, EVENT_READ, (self._on_exec_report, (service.name, on_exec)))
        return pid, pid_start_time(pid), report is None

    @staticmethod
    def listening_for(_service):
        """(fds, names, connection, environment) of socket activation for a
        main process of the service, or None (see SocketSet)."""
        return None

    def unit_warning(self, name, message):
        """A warning about a unit's own process: in the daemon log and, where
        the unit's user looks, in its log (`logs NAME`) as a line of gitproc's."""
        self.log.warning(name, message)
        try:
            with open(self.config.service_log(name), "a") as unit_log:
                unit_log.write("gitproc: warning: %s\n" % message)
        except OSError:
            pass

    def _on_exec_report(self, pending, _mask):
        name, on_exec = pending
        message = self.exec_report(name)
        if message is not False:
            on_exec(message)

    def exec_report(self, name):
        """What the exec-error pipe of `name`'s pending start says, read to its
        end and closed: None (exec worked), the message (exec failed), or
        False if there is no pending report (or it is not complete yet)."""
        fd = self.exec_reports.get(name)
        if fd is None:
            return False
        received = self.exec_received.setdefault(name, bytearray())
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return False              # the child is between its message and its exit
            if not chunk:
                break
            received += chunk
        self._drop_report(name)
        return received.decode("utf-8", "replace") or None

    def _drop_report(self, name):
        self.exec_received.pop(name, None)
        fd = self.exec_reports.pop(name, None)
        if fd is not None:
            self.selector.unregister(fd)
            os.close(fd)

    def watch(self, service, pid, on_exit, adopted=True):
        """A main process that is not our child: adopted from an earlier
        daemon (its groups made again), or a forking unit's or MAINPID='s."""
        self.exit_watcher.watch(pid, on_exit, child=False)
        if adopted:
            self.reattach_cgroup(service)

    def reattach_cgroup(self, service):
        """The groups an earlier daemon made for the service, made again (and
        its OOM kills watched)."""
        if self.cgroups is not None:
            service.resources.cgroup = self.cgroups.prepare(service.name, service.spec)
            self.oom_watch.watch(service)

    def main_pid_of(self, service):
        """Type=forking: the main pid, from PIDFile= (None while it is not
        written yet: nginx makes it empty first) or guessed: the one process
        of the service's cgroup whose parent is not in it. SpawnError when it
        cannot be told."""
        spec = service.spec
        if spec.pid_file:
            try:
                pid = read_pid_file(spec.pid_file)
            except (OSError, ValueError) as exc:
                raise SpawnError("PIDFile=%s: %s" % (spec.pid_file, getattr(exc, "strerror", None) or exc))
            if pid is None:
                return None                # not written yet, or an earlier run's
            if not self.belongs_to(service, pid) and os.stat(spec.pid_file).st_uid != 0:
                # as systemd: a process outside the service only on root's word
                raise SpawnError("PIDFile=%s names pid %d, which is not a process of this service, and the file "
                                 "is not root's" % (spec.pid_file, pid))
            return pid
        if self.cgroups is None or service.resources.cgroup is None or service.resources.cgroup.tracking is None:
            raise SpawnError("Type=forking without PIDFile= needs cgroups to find the main process (%s)" % (
                self.cgroups.problem if self.cgroups else "cgroups are not used"))
        pids = set(Cgroups.pids(service.resources.cgroup))
        tops = []
        for pid in pids:
            fields = read_proc_stat(pid)
            if fields is not None and int(fields[1]) not in pids:
                tops.append(pid)
        if len(tops) != 1:
            raise SpawnError("cannot tell the main process: %s (set PIDFile=)" % (
                "no process is left" if not tops else "%d processes: %s" % (len(tops), ", ".join(map(str, sorted(tops))))))
        return tops[0]

    def _note_identifier(self, service):
        """SyslogIdentifier=: kept beside the unit's log (NAME.log.ident), where
        `logs` (which needs no daemon) finds it and puts it before each line;
        SyslogLevel= likewise (NAME.log.level), the priority of its output."""
        level = self.config.service_log(service.name) + LEVEL_SUFFIX
        try:
            if service.spec.syslog_level == 6:
                _unlink_quietly(level)
            elif not os.path.exists(level) or _read_text(level) != PRIORITIES[service.spec.syslog_level]:
                atomic_write(level, PRIORITIES[service.spec.syslog_level].encode())
        except OSError as exc:
            self.log.warning(service.name, "Cannot note SyslogLevel= in %s: %s" % (level, exc.strerror))
        path = self.config.service_log(service.name) + IDENT_SUFFIX
        wanted = service.spec.syslog_identifier
        if wanted is None:
            if os.path.exists(path):
                _unlink_quietly(path)
            return
        try:
            if _read_text(path) == wanted:
                return
        except OSError:
            pass
        try:
            atomic_write(path, wanted.encode())
        except OSError as exc:
            self.log.warning(service.name, "Cannot note SyslogIdentifier= in %s: %s" % (path, exc.strerror))

    def belongs_to(self, service, pid):
        """Whether `pid` is a process of `service`: in its cgroup, else in the
        session of its main or control process or of its forking ExecStart=."""
        if service.resources.cgroup is not None and service.resources.cgroup.tracking is not None:
            return pid in Cgroups.pids(service.resources.cgroup)
        fields = read_proc_stat(pid)
        return fields is not None and int(fields[3]) in (service.main.pid, service.control.pid, service.main.forked_group)

    def failed_condition(self, service):
        """The first Condition*=, then Assert*=, of `service` that does not
        hold, or None. As systemd: the Conditions are checked first, each kind
        with its own '|' group; a check that cannot be made fails, negated or not."""
        if self.virtualization is None:
            self.virtualization = container_name()
        for kind in ("Condition", "Assert"):
            triggering = []
            for key, negated, value, trigger in service.spec.conditions:
                if not key.startswith(kind):
                    continue
                try:
                    holds = condition_holds(key, value, self.virtualization) != negated
                except (OSError, ValueError):
                    holds = False
                if trigger:
                    triggering.append((holds, (key, negated, value)))
                elif not holds:
                    return key, negated, value
            if triggering and not any(holds for holds, _ in triggering):
                return triggering[0][1]
        return None

    def signal_main(self, service, number):
        """ReloadSignal= and the like: to the main process only."""
        if service.main.pid is None:
            return
        try:
            os.kill(service.main.pid, number)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            self.log.error(service.name, "Cannot signal pid %d: %s" % (service.main.pid, exc.strerror))

    def kill_control(self, service, number):
        """The control process and its process group (a shell's children
        too), and what a forking unit's ExecStart= left in its group."""
        groups = [service.control.pid]
        # The forking ExecStart= has exited: its group is still the service's
        # only while no process took its number (a new leader would have it).
        if service.main.forked_group and read_proc_stat(service.main.forked_group) is None:
            groups.append(service.main.forked_group)
        for group in groups:
            if group:
                try:
                    os.killpg(group, number)
                except OSError:
                    pass

    def signal(self, service, number, first=False):
        """Deliver a stop signal as KillMode= says: to the main process (and
        its group, or the whole cgroup) and to the control process."""
        mode = service.stop_settings().kill_mode
        # With PrivatePIDs= the main pid is the relay: a SIGKILL must reach the
        # namespace behind it, whatever KillMode= says.
        targets_group = mode == "control-group" or (number == signal.SIGKILL and (
            mode == "mixed" or service.spec.private_pids))
        if targets_group and self.cgroups is not None:
            self.cgroups.kill(service.resources.cgroup, number)     # also what left the process group
        if mode != "none" or number == signal.SIGKILL:
            self.kill_control(service, number)
        if service.main.pid is None:
            return
        try:
            if targets_group:
                _kill_group_or_process(service.main.pid, number)
                if first and number not in (signal.SIGKILL, signal.SIGCONT):
                    _kill_group_or_process(service.main.pid, signal.SIGCONT)   # a stopped process must wake to die
            elif mode != "none" or number == signal.SIGKILL:
                os.kill(service.main.pid, number)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            self.log.error(service.name, "Cannot signal pid %d: %s" % (service.main.pid, exc.strerror))

    def reap_leftovers(self, service, pid, own_child, everything=False):
        """Nothing of a service outlives its main process (KillMode=
        control-group/mixed, PrivatePIDs=, or `everything`). Our own child is
        still an unreaped zombie here (ExitWatcher peeks with WNOWAIT), so its
        process group id cannot have been reused; an adopted process is long
        reaped, so only its cgroup is used for it."""
        self._drop_report(service.name)   # an exec report nobody waits for any more
        if not (everything or service.spec.kill_mode in ("control-group", "mixed") or service.spec.private_pids):
            return
        if service.main.forked_group:
            self.kill_control(service, signal.SIGKILL)     # the forking ExecStart='s group, without cgroups too
        if own_child:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        elif everything and service.main.pid_start is not None:
            _signal_group_if_same(pid, service.main.pid_start, signal.SIGKILL)   # still the process adopted?
        if self.cgroups is not None:
            self.cgroups.kill(service.resources.cgroup, signal.SIGKILL)

    def oom_killed(self, service):
        """Whether the OOM killer killed a process of the service since it started."""
        return self.cgroups is not None and self.cgroups.oom_killed(service.resources.cgroup)

    def cgroup_pids(self, service, excluding=None):
        """The processes of the service's cgroup (but `excluding`), [] without one."""
        if self.cgroups is None or service.resources.cgroup is None:
            return []
        return [pid for pid in Cgroups.pids(service.resources.cgroup) if pid != excluding]

    def describe_exit(self, service, exit_info):
        if exit_info is None:
            return "exit status unknown (%s)" % ("adopted" if service.main.adopted else "not gitproc's child")
        if exit_info == {"signal": signal.SIGKILL} and service.spec.memory_max is not None and \
                self.cgroups is not None and self.cgroups.oom_killed(service.resources.cgroup):
            return "killed by the OOM killer (MemoryMax=%s)" % format_bytes(service.spec.memory_max)
        return describe_exit(exit_info)

    def released(self, service):
        """No process of the service is left: its cgroups go once it has
        stayed down a while (making a fresh cgroup and moving the first
        process in costs the kernel some 10 ms, which a restart, or a stop
        soon followed by a start, need not pay)."""
        if service.resources.cgroup is None or service.resources.cgroup_timer is not None:
            return

        def remove():
            service.resources.cgroup_timer = None
            if service.main.pid is None and service.state not in ACTIVE_STATES:
                self.oom_watch.forget(service.name, service)
                Cgroups.remove(service.resources.cgroup)
                service.resources.cgroup = None
        service.resources.cgroup_timer = self.call_later(CGROUP_LINGER, remove)

    def open_probe(self, service, on_verdict):
        return HealthProbe(service.spec, service.name, self.selector, self.call_later, self.log, on_verdict)

    def _run_as(self, user, group):
        """resolve_run_as, remembered for a few seconds: a deploy of a thousand
        units reads the user database once, and a changed one is seen soon."""
        now = time.monotonic()
        cached = self.run_as_cache.get((user, group))
        if cached is None or cached[0] < now:
            try:
                cached = (now + RUN_AS_CACHE_SECONDS, resolve_run_as(user, group))
            except SpawnError as exc:
                cached = (now + RUN_AS_CACHE_SECONDS, exc)
            self.run_as_cache[(user, group)] = cached
        if isinstance(cached[1], SpawnError):
            raise cached[1]
        return cached[1]

    def _unit_run_as(self, service):
        """User=/Group=, or with DynamicUser= (root daemon) a uid of its own."""
        spec = service.spec
        if self._dynamic(spec):
            return dynamic_run_as(self._dynamic_name(service), spec.group)
        return self._run_as(spec.user, spec.group)

    @staticmethod
    def _dynamic_name(service):
        """DynamicUser='s name: User=, else the unit's name (a template's prefix), as systemd."""
        return service.spec.user or _strip_suffix(service.name.partition("@")[0], UNIT_SUFFIX)

    def _sandbox(self, service, run_as):
        """The Sandbox of a process of `service`: a root daemon builds it
        all; another applies NoNewPrivileges= only (status lists the rest
        as not applied)."""
        spec = service.spec
        if os.geteuid() != 0:
            return Sandbox(spec, full=False) if spec.no_new_privileges or seccomp_settings(spec) != SECCOMP_UNSET \
                else None
        helpers = self._sandbox_helpers()
        peer = self.namespace_peer(service)
        if service.resources.private_tmp is not None and not all(os.path.isdir(path) for path in service.resources.private_tmp):
            service.resources.private_tmp = None    # a peer's, removed since: one of its own
        if spec.private_tmp and service.resources.private_tmp is None:
            shared = peer.resources.private_tmp if peer is not None and peer.spec.private_tmp and peer.resources.private_tmp and all(
                os.path.isdir(path) for path in peer.resources.private_tmp) else None
            service.resources.private_tmp = shared or self._private_tmp(self._private_tmp_prefix(service.name))
        writable = [os.path.join(self.folders[kind], relative) for kind, relative in spec.directories
                    if not (self._dynamic(spec) and kind in "SCL")]
        private = {}                      # DynamicUser=: /var/lib/private, with its own folders only
        for kind, relative in spec.directories:
            if self._dynamic(spec) and kind in "SCL":
                private.setdefault(os.path.join(self.folders[kind], "private"), []).append(
                    os.path.join(self.folders[kind], "private", relative))
        joined = {flag: "/proc/%d/ns/%s" % (peer.main.pid, kind) for flag, kind, wanted in (
            (CLONE_NEWNET, "net", spec.private_network and peer and peer.spec.private_network),
            (CLONE_NEWIPC, "ipc", spec.private_ipc and peer and peer.spec.private_ipc)) if wanted and peer.main.pid}
        return Sandbox(spec, service.resources.private_tmp if spec.private_tmp else None, helpers, run_as.uid is not None, writable,
                       private_folders=private, joined=joined)

    def namespace_peer(self, service):
        """JoinsNamespaceOf=: a running unit whose namespaces this one shares
        (the DaemonHost knows the others); None: it makes its own."""
        return None

    def private_tmp_in_use(self, service):
        """The private /tmp folders of `service` another unit that runs uses too."""
        return ()

    SANDBOX_HELPERS = "/run/gitproc/sandbox"

    def _sandbox_helpers(self):
        """An empty folder a private /dev is built in, and a file no one may
        read (InaccessiblePaths= of a file is that file bound over it): in
        root's /run, which no sandbox step hides (a PrivateTmp= /tmp would)."""
        folder = self.SANDBOX_HELPERS
        helpers = {"dev": os.path.join(folder, "dev"), "file": os.path.join(folder, "inaccessible")}
        if not os.path.isdir(helpers["dev"]):
            try:
                os.makedirs(helpers["dev"], 0o700, exist_ok=True)
                os.close(os.open(helpers["file"], os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0))
            except OSError as exc:
                raise SpawnError("sandbox: cannot make %s: %s" % (folder, exc.strerror))
        return helpers

    def _private_tmp_prefix(self, name):
        return "gitproc-private-%s-%s-" % (self.cgroups.instance if self.cgroups else "", name)

    @staticmethod
    def _private_tmp(prefix):
        """PrivateTmp=: a /tmp and a /var/tmp shared by the processes of this
        run of the unit (as systemd's /tmp/systemd-private-*), removed at stop."""
        import tempfile
        made = []
        try:
            for base in ("/tmp", "/var/tmp"):
                outer = tempfile.mkdtemp(prefix=prefix, dir=base)   # 0700, root's
                inner = os.path.join(outer, "tmp")
                os.mkdir(inner)
                os.chmod(inner, 0o1777)
                made.append(inner)
        except OSError as exc:
            for inner in made:
                remove_tree(os.path.dirname(inner))
            raise SpawnError("sandbox: PrivateTmp=: %s" % exc.strerror)
        return tuple(made)

    @staticmethod
    def _with_groups(run_as, names):
        """SupplementaryGroups=: added to the groups User= brings (or the daemon's)."""
        import grp
        extra = []
        for name in names:
            try:
                extra.append(int(name) if name.isdigit() else grp.getgrnam(name).gr_gid)
            except KeyError:
                raise SpawnError("SupplementaryGroups=%s: no such group" % name)
        groups = list(run_as.groups if run_as.groups is not None else os.getgroups())
        return RunAs(run_as.uid, run_as.gid, groups + [g for g in extra if g not in groups],
                     run_as.user, run_as.home, run_as.shell)

    def _make_directories(self, spec, run_as):
        """RuntimeDirectory=, StateDirectory=, ...: made (parents 0755, as
        systemd), given *DirectoryMode= (default 0755) and, under a root
        daemon, to User=/Group=. Returns $RUNTIME_DIRECTORY and the like."""
        modes = dict(spec.directory_modes)
        found = {}
        for kind, relative in spec.directories:
            path = os.path.join(self.folders[kind], relative)
            shown = path
            try:
                if self._dynamic(spec) and kind in "SCL":
                    path = self._private_directory(kind, relative)
                os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                try:
                    os.mkdir(path)
                except FileExistsError:
                    pass
                # Opened without following a symlink: the service owns the folder
                # and may have swapped a part of it for a link to elsewhere.
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    if os.geteuid() == 0 and kind != "E" and (run_as.uid is not None or run_as.gid is not None):
                        os.fchown(fd, -1 if run_as.uid is None else run_as.uid, -1 if run_as.gid is None else run_as.gid)
                    os.fchmod(fd, modes.get(kind, 0o755))      # after chown, which may drop a setgid bit
                finally:
                    os.close(fd)
            except OSError as exc:
                raise SpawnError("%sDirectory=%s: %s" % ({v: k for k, v in DIRECTORY_KEYS.items()}[kind], path,
                                                          describe_os_error(exc)))
            found.setdefault(DIRECTORY_VARIABLES[kind], []).append(shown)
        return {variable: ":".join(paths) for variable, paths in found.items()}

    CREDENTIALS = "/run/credentials"

    def _credentials(self, service, run_as):
        """$CREDENTIALS_DIRECTORY of a run, made at its first process: under a
        root daemon /run/credentials/NAME.service, a ramfs (never swapped
        out) of its own, read-only, the folder 0500 and each file 0400 of
        the unit's user, as systemd makes it; otherwise a 0500 folder in the
        daemon's home."""
        root = os.geteuid() == 0
        folder = self._credentials_folder(service)
        if service.has_process() and os.path.isdir(folder) and (not root or os.path.ismount(folder)):
            return folder                 # made for this run already
        self._remove_credentials(folder)  # read again at each start, as systemd reads them
        values = read_credentials(service.spec.credentials)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            if root:
                _mount_checked("ramfs", folder, "ramfs", MS_NODEV | MS_NOSUID | MS_NOEXEC, "mode=0700")
            for name, data in values.items():
                fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                             os.O_CLOEXEC, 0o400)
                try:
                    os.write(fd, data)
                    if root and run_as.uid is not None:
                        os.fchown(fd, run_as.uid, -1)
                finally:
                    os.close(fd)
            if root and run_as.uid is not None:
                os.chown(folder, run_as.uid, -1)
            os.chmod(folder, 0o500)
            if root:                      # MS_REMOUNT | MS_BIND | MS_RDONLY: read-only from now on
                _mount_checked(None, folder, None, 32 | MS_BIND | MS_RDONLY | MS_NODEV | MS_NOSUID | MS_NOEXEC, None)
        except OSError as exc:
            self._remove_credentials(folder)
            raise SpawnError("LoadCredential=: %s: %s" % (folder, describe_os_error(exc)))
        return folder

    def _credentials_folder(self, service):
        return os.path.join(self.CREDENTIALS if os.geteuid() == 0 else os.path.join(self.config.home, "credentials"),
                            service.name + UNIT_SUFFIX)

    @staticmethod
    def _remove_credentials(folder):
        if os.path.ismount(folder):
            import ctypes
            ctypes.CDLL(None, use_errno=True).umount2(folder.encode(), 2)     # MNT_DETACH
        elif os.path.isdir(folder):
            os.chmod(folder, 0o700)       # 0500: its files could not be removed by a daemon that is not root
        remove_tree(folder)

    @staticmethod
    def _dynamic(spec):
        return spec.dynamic_user and os.geteuid() == 0

    def _private_directory(self, kind, relative):
        """DynamicUser='s StateDirectory=, CacheDirectory=, LogsDirectory=, as
        systemd lays them out: the folder in /var/lib/private (0700, so that
        a later owner of a recycled uid cannot reach it), and /var/lib/NAME a
        link to it (an existing folder there is moved in first)."""
        private = os.path.join(self.folders[kind], "private")
        real, link = os.path.join(private, relative), os.path.join(self.folders[kind], relative)
        os.makedirs(private, mode=0o700, exist_ok=True)
        os.chmod(private, 0o700)
        os.makedirs(os.path.dirname(real), mode=0o755, exist_ok=True)
        if os.path.isdir(link) and not os.path.islink(link) and not os.path.exists(real):
            os.rename(link, real)
        if not os.path.islink(link):
            os.makedirs(os.path.dirname(link), mode=0o755, exist_ok=True)
            os.symlink(os.path.relpath(real, os.path.dirname(link)), link)
        return real

    def stopped(self, service):
        """The unit stopped (nothing of it runs, no start of this run follows):
        its PIDFile= goes, as systemd removes it, its RuntimeDirectory=
        (RuntimeDirectoryPreserve=no; restart: unless a start follows), its
        credentials, IPC objects (RemoveIPC=) and dynamic user."""
        spec = service.spec
        if spec.pid_file:
            _unlink_quietly(spec.pid_file)
        if spec.private_tmp or service.resources.private_tmp is not None:
            import glob as glob_module    # those of a run an earlier daemon started, too
            prefix = self._private_tmp_prefix(service.name)
            shared = {os.path.dirname(path) for path in self.private_tmp_in_use(service)}
            for outer in glob_module.glob("/tmp/%s*" % prefix) + glob_module.glob("/var/tmp/%s*" % prefix):
                if outer not in shared:   # JoinsNamespaceOf=: a running unit still uses it (its stop, later)
                    remove_tree(outer)
            service.resources.private_tmp = None
        preserved = spec.runtime_directory_preserve == "yes" or (
            spec.runtime_directory_preserve == "restart" and service.want == "up")
        for kind, relative in spec.directories if not preserved else ():
            if kind == "t":
                remove_tree(os.path.join(self.folders["t"], relative))
        if spec.credentials:
            self._remove_credentials(self._credentials_folder(service))
        dynamic = dynamic_uid_of(self._dynamic_name(service)) if self._dynamic(spec) else None
        if spec.remove_ipc and (spec.user or spec.group or dynamic):
            uid = gid = dynamic
            if not dynamic:
                try:
                    run_as = self._run_as(spec.user, spec.group)
                    uid, gid = run_as.uid, run_as.gid
                except SpawnError:
                    pass
            removed = remove_ipc(uid, gid)
            if removed:
                self.log.info(service.name, "RemoveIPC=: removed %s" % ", ".join(removed))
        if dynamic:
            release_dynamic_user(self._dynamic_name(service))

    @staticmethod
    def _service_environment(spec, run_as):
        """A clean environment, as systemd gives: PATH and locale from the daemon,
        the user's HOME/USER/LOGNAME/SHELL, PassEnvironment= from the daemon's
        own, then Environment=, then EnvironmentFile= (which overrides, as in
        systemd). UnsetEnvironment= is applied last, at the spawn."""
        env = {"PATH": os.environ.get("PATH") or DEFAULT_PATH}
        for key in ("LANG", "LC_ALL", "TZ"):
            if key in os.environ:
                env[key] = os.environ[key]
        if run_as.home:
            env["HOME"] = run_as.home
        if run_as.user:
            env["USER"] = env["LOGNAME"] = run_as.user
        if run_as.shell:
            env["SHELL"] = run_as.shell
        env["GITPROC_UNIT"] = spec.name
        env.update((name, os.environ[name]) for name in spec.pass_environment if name in os.environ)
        env.update(spec.environment)
        for path, optional in spec.environment_files:
            try:
                env.update(load_environment_file(path))
            except OSError as exc:
                if not optional:
                    raise SpawnError("EnvironmentFile=%s: %s" % (path, exc.strerror))
        return env

    @staticmethod
    def _working_directory(spec, run_as):
        """WorkingDirectory=, else as systemd's managers do: "/" under a root
        daemon (system services, whatever their User=), the daemon user's home
        under a user's daemon."""
        default = default_working_directory(run_as.home)
        wanted = spec.working_directory
        if wanted is None:
            return default
        optional = wanted.startswith("-")
        wanted = wanted.lstrip("-")
        if wanted == "~" or wanted.startswith("~/"):
            wanted = (run_as.home or "/") + wanted[1:]
        if optional and not os.path.isdir(wanted):
            return default
        return wanted


def _kill_group_or_process(pid, number):
    """Signal the process group `pid` leads; a main process that leads none
    (MAINPID= named it) alone."""
    try:
        os.killpg(pid, number)
    except ProcessLookupError:
        os.kill(pid, number)


class Dependencies:
    """After=/Requires= among the deployed services: whether a unit may start
    now, what stops with a unit it requires, starting what waited, and the
    order of shutdown. Reads the registry (name -> Service); writes no `want`."""

    def __init__(self, services, log, before_of=lambda name: (), in_deploy=lambda name: False,
                 activated=lambda name: False):
        self.services = services
        self.log = log
        self.before_of = before_of        # name -> the units that say Before=name (the deployer's)
        self.in_deploy = in_deploy        # name -> whether the deployed commit has it (made, or about to be)
        self.activated = activated        # name -> whether something else starts it (SPEC §16)

    def state_of(self, service):
        """("ready"|"waiting"|"failed", why) for the units `service` comes after
        (After=, Requires=). Ready: running (healthy, if checked) or a oneshot
        that exited 0. An After= unit that is stopped on purpose does not hold
        the start back; a Requires= one does."""
        for name in service.spec.binds_to:
            other = self.services.get(name)
            if (other is None and not self.in_deploy(name)) or (other is not None and other.versions.removed):
                return "failed", "binds to %s, which is not deployed here" % name
            if other is None:
                continue                  # made later in this deploy: BindsTo= does not order
            if other.want == "down" and other.state not in ACTIVE_STATES:
                return "failed", "binds to %s, which is stopped" % name
            if other.state == FAILED:
                return "failed", "binds to %s, which failed (%s)" % (name, other.reason)
        missing = unmounted_for(service.spec.requires_mounts_for) if service.spec.requires_mounts_for else []
        if missing:
            return "failed", "RequiresMountsFor=: %s (in %s) is not mounted" % (", ".join(missing), FSTAB)
        for name in service.spec.requisite:      # never started for it: active, or the start fails
            other = self.services.get(name)
            if other is None or other.versions.removed:
                return "failed", "requisite %s is not deployed here (Requisite=)" % name
            if other.state == STARTING:
                return "waiting", "waiting for %s" % name
            if other.state not in (RUNNING, RELOADING):
                return "failed", "requisite %s is %s, not active (Requisite=)" % (name, other.state)
        for name in service.spec.after + service.spec.requires + self._named_before(service.name):
            required = name in service.spec.requires
            other = self.services.get(name)
            if other is None or other.versions.removed or name == service.name:
                if required:
                    return "failed", "requires %s, which is not deployed here" % name
                continue
            if other.is_ready():
                continue
            if PUBLIC_STATE[other.phase] == STARTING or other.phase == BACKOFF or (
                    STOP_FAMILY.get(other.phase) == "restart"):
                return "waiting", "waiting for %s" % name
            # The dependency is down, and nothing is bringing it up.
            if other.want == "down" or (self.activated(name) and other.state == STOPPED):
                if required:
                    return "failed", "requires %s, which is stopped" % name
                continue                      # stopped by the user: After= only orders
            return "failed", "dependency %s %s (%s)" % (
                name, "failed" if other.state == FAILED else "is " + other.state, other.reason or describe_exit(other.last_exit))
        return "ready", None

    def part_of(self, names):
        """PartOf=: the units a stop or restart of `names` carries to, and
        those's in turn (deployed, not removed)."""
        found, todo = [], list(names)
        while todo:
            name = todo.pop()
            for other in self.services.values():
                if name in other.spec.part_of and other.name not in names and other not in found and not other.versions.removed:
                    found.append(other)
                    todo.append(other.name)
        return found

    def conflicting(self, names):
        """Conflicts= (either side names the other): the units a start of
        `names` stops."""
        wanted = set(names)
        return [other for other in self.services.values() if other.name not in wanted and not other.versions.removed and (
            wanted & set(other.spec.conflicts) or any(other.name in self.services[n].spec.conflicts
                                                      for n in wanted if n in self.services))]

    def pulled_in(self, names):
        """The units a start of `names` starts too, as systemctl does for
        Wants=: their wanted units, and those's in turn, that are down; in
        dependency order. A Requires= unit is pulled in only where a deploy
        left it stopped because something else starts it (SPEC §16); one the
        user stopped holds the start back."""
        seen, found, todo = set(names), [], list(names)
        while todo:
            service = self.services.get(todo.pop())
            if service is None:
                continue
            required = [name for name in service.spec.requires if self.activated(name)]
            for other in service.spec.wants + service.spec.binds_to + tuple(required):
                if other not in seen and other in self.services and not self.services[other].versions.removed:
                    seen.add(other)
                    todo.append(other)
                    if self.services[other].state not in ACTIVE_STATES:
                        found.append(other)
        order = dependency_order({name: self.services[name].spec for name in found})
        return [self.services[name] for name in order]

    def _named_before(self, name):
        """The units that say Before=NAME (that is, NAME starts after them)."""
        return self.before_of(name)

    def reload_propagated(self, names):
        """PropagatesReloadTo=/ReloadPropagatedFrom=: the running units a
        reload of `names` reloads too (those that can)."""
        found = []
        for other in self.services.values():
            if other.name in names or other.versions.removed or other.state != RUNNING or not (
                    other.spec.exec_reload or other.spec.type == "notify-reload"):
                continue
            if set(names) & set(other.spec.reload_propagated_from) or any(
                    other.name in self.services[n].spec.propagates_reload_to for n in names if n in self.services):
                found.append(other)
        return found

    def unneeded(self, stopped):
        """StopWhenUnneeded=: the running units that `stopped` needed (Requires=,
        Wants=, BindsTo=, Requisite=, Upholds=) and that no active unit needs
        any more."""
        found = []
        for name in stopped.spec.requires + stopped.spec.wants + stopped.spec.binds_to + stopped.spec.requisite + \
                stopped.spec.upholds:
            other = self.services.get(name)
            if other is None or other.versions.removed or not other.spec.stop_when_unneeded or other.state not in ACTIVE_STATES:
                continue
            if not any(name in user.spec.requires + user.spec.wants + user.spec.binds_to + user.spec.requisite +
                       user.spec.upholds for user in self.services.values()
                       if user.state in ACTIVE_STATES and not user.versions.removed and user is not other):
                found.append(other)
        return found

    def upheld(self):
        """Upholds=: the units an active unit upholds that are down (each
        started again, as systemd restarts them while the upholder is up)."""
        found = []
        for service in self.services.values():
            if service.state not in (RUNNING, RELOADING) or service.versions.removed:
                continue
            for name in service.spec.upholds:
                other = self.services.get(name)
                if other is not None and not other.versions.removed and other.state in (STOPPED, FAILED, EXITED) and \
                        not (other.reason or "").startswith("start limit hit") and other not in found:
                    found.append((service, other))
        return found

    def stop_requiring(self, service):
        """Requires=: what requires a unit stops when it stops or fails."""
        if service.state not in (STOPPED, FAILED, EXITED):
            return
        for other in self.services.values():
            if service.name in other.spec.requires + other.spec.binds_to and other.state in (
                    STARTING, RUNNING, RELOADING) and not other.versions.removed:
                why = "%s unit %s %s" % ("bound" if service.name in other.spec.binds_to else "required", service.name,
                                         {FAILED: "failed", EXITED: "exited"}.get(service.state, "stopped"))
                self.log.info(other.name, "Stopping: %s" % why)
                other.halt(why)

    def release_waiting(self):
        """Start what waited for dependencies that are now ready (or failed)."""
        for service in list(self.services.values()):
            if service.phase == WAITING:
                service.handle(EV_DEPENDENCIES)

    def shutdown_step(self):
        """Stop services whose dependents are all stopped (reverse dependency
        order). Returns True while a process of some service is left."""
        services = self.services
        active = {name for name, s in services.items() if s.state in ACTIVE_STATES}
        for name, service in services.items():
            if service.phase in (BACKOFF, WAITING):
                service.halt("daemon shut down")
            if service.state not in (STARTING, RUNNING):
                continue
            dependents = [other for other in active if other != name and
                          (name in services[other].spec.after + services[other].spec.requires or other in service.spec.before)]
            if not dependents:
                service.halt("daemon shut down")
        if not any(s.state == STOPPING for s in services.values()):
            # Nothing could be stopped in order (a dependency cycle): stop the rest.
            for service in services.values():
                if service.state in (STARTING, RUNNING):
                    service.halt("daemon shut down")
        return any(s.state in ACTIVE_STATES for s in services.values())


# ==== 10. health checks ======================================================
# HealthProbe checks one service over a non-blocking socket in the daemon's own
# selector: no thread per check, and a slow or silent service never blocks the
# loop (each check has its own timeout timer). HTTP connections are kept alive
# and reused between checks.


class HealthProbe:
    """The health check of one running service: `tcp://host:port` (the connect
    succeeds) or `http://host[:port]/path` (a 2xx or 3xx answer). After
    HealthCheckRetries failures in a row (outside HealthCheckStartPeriod), the
    service is restarted."""

    def __init__(self, spec, name, selector, call_later, log, on_verdict):
        from urllib.parse import urlsplit
        url = urlsplit(spec.health_check_url)
        self.spec, self.name = spec, name
        self.selector, self.call_later, self.log = selector, call_later, log
        self.on_verdict = on_verdict      # called when `status` changes
        self.scheme, self.host = url.scheme, url.hostname
        self.port = url.port or (80 if url.scheme == "http" else 0)
        self.path = (url.path or "/") + ("?" + url.query if url.query else "")
        self.status = "starting"          # "starting", "healthy" or "unhealthy"
        self.failures = 0                 # failed checks in a row (start period excluded)
        self.last_error = None
        self.started = time.monotonic()
        self.passed_once = False          # a success ends the start period (as Docker's --start-period)
        self.address = None               # resolved once: (family, sockaddr)
        self.sock = None                  # the connection (kept between HTTP checks)
        self.connected = False
        self.reused = False               # this check reuses a kept-alive connection
        self.inbuf = bytearray()
        self.timer = self.call_later(min(0.2, spec.health_check_interval), self._run)
        self.deadline_timer = None
        self.closed = False

    def close(self):
        self.closed = True
        for timer in (self.timer, self.deadline_timer):
            if timer is not None:
                timer.cancel()
        self._drop_connection()

    def _drop_connection(self):
        if self.sock is not None:
            unregister_quietly(self.selector, self.sock)
            self.sock.close()
        self.sock, self.connected = None, False
        self.inbuf.clear()

    def _run(self):
        """One check: connect (or reuse the connection), then ask."""
        self.timer = None
        if self.closed:
            return
        self.deadline_timer = self.call_later(self.spec.health_check_timeout, self._timed_out)
        if self.sock is not None and self.connected:
            self.reused = True
            self._send_request()
        else:
            self._connect()

    def _connect(self):
        self.reused = False
        try:
            if self.address is None:
                family, _, _, _, sockaddr = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
                self.address = (family, sockaddr)
            self._drop_connection()
            self.sock = socket.socket(self.address[0], socket.SOCK_STREAM)
            self.sock.setblocking(False)
            code = self.sock.connect_ex(self.address[1])
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, os.strerror(code))
            self.selector.register(self.sock, EVENT_WRITE, (self._on_connected, None))
        except OSError as exc:
            self._finish(False, "cannot connect to %s:%s: %s" % (self.host, self.port, exc.strerror or exc))

    def _on_connected(self, _arg, _mask):
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.selector.unregister(self.sock)
        if error:
            self._finish(False, "cannot connect to %s:%s: %s" % (self.host, self.port, os.strerror(error)))
            return
        self.connected = True
        if self.scheme == "tcp":
            self._drop_connection()       # a TCP check is the connect: each check makes its own
            self._finish(True, None)
            return
        self._send_request()

    def _send_request(self):
        request_text = "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: gitproc/%s\r\nConnection: keep-alive\r\n\r\n" % (
            self.path, self.host, __version__)
        try:
            self.sock.send(request_text.encode())    # small: fits the socket buffer
        except OSError as exc:
            if self.reused:
                self._connect()                   # the server closed the kept-alive connection
            else:
                self._drop_connection()
                self._finish(False, "HTTP request failed: %s" % (exc.strerror or exc))
            return
        self.inbuf.clear()
        self.selector.register(self.sock, EVENT_READ, (self._on_response, None))

    def _on_response(self, _arg, _mask):
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data, error = b"", exc.strerror
        else:
            error = "connection closed before an answer"
        if not data:
            if self.reused and not self.inbuf:
                self._connect()                   # closed while idle (keep-alive timeout): not a failure
                return
            self._drop_connection()
            self._finish(False, "HTTP: %s" % error)
            return
        self.inbuf += data
        head, separator, body = bytes(self.inbuf).partition(b"\r\n\r\n")
        if not separator:
            if len(self.inbuf) > 65536:
                self._drop_connection()
                self._finish(False, "HTTP: answer headers too large")
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
        length = headers.get("content-length", "")
        if length.isdigit() and len(body) < int(length):
            return                            # the rest of the body is on its way
        self.selector.unregister(self.sock)
        keep_alive = headers.get("connection", "").lower()
        reusable = (length.isdigit() and len(body) == int(length) and keep_alive != "close" and
                    (parts[0] == "HTTP/1.1" or keep_alive == "keep-alive"))   # HTTP/1.0 closes by default
        if not reusable:
            self._drop_connection()
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        self.inbuf.clear()
        if 200 <= status < 400:
            self._finish(True, None)
        else:
            self._finish(False, "HTTP %s" % (" ".join(parts[1:]) or "answer unreadable"))

    def _timed_out(self):
        self.deadline_timer = None
        self._drop_connection()
        self._finish(False, "no answer within %s" % format_timespan(self.spec.health_check_timeout))

    def _finish(self, healthy, error):
        """One check's result: count it, tell the service, plan the next one."""
        if self.closed:
            return
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None
        spec = self.spec
        if healthy:
            self.failures, self.last_error, self.passed_once = 0, None, True
            if self.status != "healthy":
                self.status = "healthy"
                self.on_verdict()
        elif self.passed_once or time.monotonic() - self.started >= spec.health_check_start_period:
            self.failures += 1
            self.last_error = error
            self.log.warning(self.name, "Health check failed (%d of %d): %s" % (
                self.failures, spec.health_check_retries, error))
            if self.failures >= spec.health_check_retries:
                self.status = "unhealthy"
                self.on_verdict()
                return                        # the service restarts: a new probe comes with it
        else:
            self.last_error = error
        # Until a first success, check often: the service is not ready before it.
        interval = spec.health_check_interval if self.status == "healthy" else min(spec.health_check_interval, 0.5)
        self.timer = self.call_later(interval, self._run)


# ==== 11. logs ===============================================================
# The daemon's own log (one line per event, service name first), the size
# rotation of service logs, and the syslog and journal sockets whose messages
# go to the units' logs. Services write their files directly; the daemon
# only rotates them, by copy-and-truncate, since it cannot reopen a running
# service's stdout (O_APPEND writers carry on at the new end).

LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class DaemonLog:
    """`TIME LEVEL NAME: message` lines to LOG_DIR/daemon.log (rotated by rename)
    and, in the foreground, to stderr."""

    def __init__(self, path, level="info", stream=None, max_bytes=10 << 20, backups=3):
        self.path, self.threshold, self.stream = path, LOG_LEVELS[level], stream
        self.max_bytes, self.backups = max_bytes, backups
        self.fd = None
        self.size = 0
        if path:
            try:
                makedirs(os.path.dirname(path))
                self._open()
            except OSError as exc:
                self.fd = None
                if stream is None:
                    raise GitprocError("cannot write the daemon log %s: %s" % (path, exc.strerror))

    def _open(self):
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.size = os.fstat(self.fd).st_size

    def log(self, level, name, message):
        if LOG_LEVELS[level] < self.threshold:
            return
        now = time.time()
        line = "%s.%03d %-7s %s: %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                                         int(now * 1000) % 1000, level.upper(), name, message)
        data = line.encode("utf-8", "replace")
        if self.stream is not None:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):
                pass
        if self.fd is None:
            return
        try:
            if self.size + len(data) > self.max_bytes:
                self._rotate()
            os.write(self.fd, data)
            self.size += len(data)
        except OSError:
            pass          # a full disk, a vanished folder: must not stop supervision

    def _rotate(self):
        """Rename daemon.log to daemon.log.1 (shifting older ones) and reopen. A
        file that vanished meanwhile (logrotate, rm) is simply created anew."""
        os.close(self.fd)
        self.fd = None                # never write to, or close, a number we gave back
        try:
            for index in range(self.backups - 1, 0, -1):
                if os.path.exists("%s.%d" % (self.path, index)):
                    os.replace("%s.%d" % (self.path, index), "%s.%d" % (self.path, index + 1))
            if self.backups:
                os.replace(self.path, self.path + ".1")
            else:
                os.truncate(self.path, 0)
        except OSError:
            pass
        self._open()

    def debug(self, name, message):
        self.log("debug", name, message)

    def info(self, name, message):
        self.log("info", name, message)

    def warning(self, name, message):
        self.log("warning", name, message)

    def error(self, name, message):
        self.log("error", name, message)


def rotate_service_log(path, backups):
    """Copy LOG to LOG.1 (shifting older ones), then truncate LOG. Bytes written
    between the copy and the truncate are lost, so the copy takes two passes:
    what was there at the start, then what came meanwhile (bounded, so that a
    writer faster than the copy cannot keep the daemon here)."""
    if backups > 0:
        for index in range(backups - 1, 0, -1):
            older = "%s.%d" % (path, index)
            if os.path.exists(older):
                os.replace(older, "%s.%d" % (path, index + 1))
        with open(path, "rb") as source, open(path + ".1", "wb") as target:
            for _ in range(2):
                remaining = os.fstat(source.fileno()).st_size - source.tell()
                while remaining > 0:
                    chunk = source.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    target.write(chunk)
                    remaining -= len(chunk)
    os.truncate(path, 0)


# ---- syslog and the journal (SPEC §19) ---------------------------------------------
# Where journald is not (a container, a host without it), a daemon that calls
# syslog(3) or sd_journal_send() talks to nobody. As root, gitproc offers the
# two sockets journald offers: /dev/log (syslog datagrams, RFC 3164 as glibc
# writes them, and RFC 5424) and /run/systemd/journal/socket (the native
# journal protocol, a sealed memfd for large messages). Each message goes to
# the log of the unit its sender belongs to, one line each:
#     <PRIORITY>TIME IDENTIFIER[PID]: MESSAGE
# `logs` strips the <PRIORITY> (and -p filters by it). Work per loop turn is
# bounded; a flood past LogRateLimitBurst= is counted, not written.

SYSLOG_PATH, JOURNAL_PATH = "/dev/log", "/run/systemd/journal/socket"
DEV_LOG_SOCKET = "/run/systemd/journal/dev-log"   # where /dev/log links to, as systemd lays it out
MAX_LOG_DATAGRAM = 256 * 1024         # larger native messages come in a memfd
MAX_LOG_MEMFD = 1024 * 1024           # what of a memfd is read
MAX_LOG_FIELDS = 1024                 # of a native message (journald's limit)
LOG_DATAGRAMS_PER_TURN = 128
LOG_BYTES_PER_TURN = 2 * 1024 * 1024  # and at most this much read a loop turn
MAX_LOG_LINE = 16 * 1024              # longer messages are cut, saying so
MAX_LOG_LINES = 100                   # lines of one message; more are cut, saying so
NO_UNIT_LOG_BURST = 200               # messages from no unit's process per LogRateLimitIntervalSec
_RFC3164_RE = re.compile(r"(?:[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d )?(?:([^\s\[:]+)(?:\[(\d+)\])?: )?(.*)\Z", re.S)
_RFC5424_RE = re.compile(r"1 \S+ \S+ (\S+) (\S+) \S+ (?:-|(?:\[.*?\])+) ?(.*)\Z", re.S)
_PRIORITY_PREFIX_RE = re.compile(r"<([0-7])>")
_SYSLOG_LINE_RE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \S+\[\d+\]: ")


def parse_syslog_datagram(data):
    """(priority, identifier, pid, message) of a /dev/log datagram: RFC 3164
    as glibc writes it ('<PRI>Mmm dd hh:mm:ss IDENT[PID]: MSG'), RFC 5424
    ('<PRI>1 TIME HOST APP PROCID MSGID SD MSG'), or a bare '<PRI>MSG'."""
    text = data.decode("utf-8", "replace").rstrip("\n\0")
    priority = 6
    match = re.match(r"<(\d{1,3})>", text)
    if match and int(match.group(1)) < 192:
        priority, text = int(match.group(1)) & 7, text[match.end():]
    modern = _RFC5424_RE.match(text)
    if modern:
        app, procid, message = modern.groups()
        return priority, None if app == "-" else app, int(procid) if procid.isdigit() else None, message
    identifier, pid, message = _RFC3164_RE.match(text).groups()
    return priority, identifier, int(pid) if pid else None, message


def parse_journal_datagram(data):
    """{FIELD: value} of a native journal message: 'KEY=VALUE\n' fields, or
    'KEY\n' + a 64-bit little-endian length + the value + '\n'. ValueError
    for a message that breaks the form (a length past its end, ...)."""
    fields, position, end = {}, 0, len(data)
    while position < end:
        newline = data.find(b"\n", position)
        if newline < 0:
            raise ValueError("a field without its end")
        line = data[position:newline]
        equals = line.find(b"=")
        if equals >= 0:
            key, value, position = line[:equals], line[equals + 1:], newline + 1
        else:
            if newline + 9 > end:
                raise ValueError("a binary field without its length")
            size = struct.unpack_from("<Q", data, newline + 1)[0]
            start = newline + 9
            if size > end - start - 1 or data[start + size:start + size + 1] != b"\n":
                raise ValueError("a binary field whose length (%d) is not its size" % size)
            key, value, position = line, data[start:start + size], start + size + 1
        if key and not key.startswith(b"_"):      # trusted fields are the receiver's to add
            fields[key.decode("ascii", "replace")] = value
            if len(fields) > MAX_LOG_FIELDS:
                raise ValueError("more than %d fields" % MAX_LOG_FIELDS)
    return fields


class LogRate:
    """LogRateLimitIntervalSec=/LogRateLimitBurst= of one unit: how many of
    its messages may still be written in this interval, and how many were not."""
    __slots__ = ("start", "count", "suppressed")

    def __init__(self, now):
        self.start, self.count, self.suppressed = now, 0, 0

    def allow(self, now, interval, burst):
        """(whether to write this message, messages suppressed in the interval
        that just ended, to say so first)."""
        ended = 0
        if interval and now - self.start >= interval:
            ended, self.start, self.count, self.suppressed = self.suppressed, now, 0, 0
        self.count += 1
        if interval and burst and self.count > burst:
            self.suppressed += 1
            return False, ended
        return True, ended


class SyslogChannel:
    """The /dev/log and journal sockets (`syslog_socket`: "auto", "off", or a
    folder holding both, named dev-log and journal-socket), read in the
    daemon's loop. `where(pid)` names the unit of a sender (None: no unit's);
    `spec_of(name)` gives its UnitSpec; lines go to `write(name, lines)`."""

    def __init__(self, setting, log, selector, where, spec_of, write):
        self.setting, self.log, self.selector = setting, log, selector
        self.where, self.spec_of, self.write = where, spec_of, write
        self.sockets = {}                 # path -> socket we listen on
        self.owned = []                   # paths we made, removed at close
        self.notes = {}                   # path -> why it is not ours ("another daemon's", ...)
        self.rates = {}                   # unit name -> LogRate
        self.pid_units = {}               # pid -> (unit name or None, monotonic time): a sender's unit, briefly
        self.received = self.dropped = 0  # messages read; messages not written (rate limit, LogLevelMax=)

    def paths(self):
        if self.setting == "off":
            return {}
        if self.setting == "auto":
            return {"syslog": SYSLOG_PATH, "journal": JOURNAL_PATH} if os.geteuid() == 0 else {}
        return {"syslog": os.path.join(self.setting, "dev-log"), "journal": os.path.join(self.setting, "journal-socket")}

    def describe(self):
        """For `status`: where messages are read, and what was left alone."""
        if self.setting == "off":
            return {"state": "off", "sockets": [], "notes": {}}
        if not self.paths():
            return {"state": "off", "sockets": [], "notes": {SYSLOG_PATH: "a daemon that is not root cannot own "
                                                               "/dev/log: units' syslog messages go where they went"}}
        return {"state": "on" if self.sockets else "off", "sockets": sorted(self.sockets), "notes": dict(self.notes),
                "received": self.received, "dropped": self.dropped}

    def open(self):
        for kind, path in self.paths().items():
            try:
                sock = self._bind_dev_log() if path == SYSLOG_PATH else self._bind(path)
            except OSError as exc:
                self.notes[path] = "cannot listen: %s" % describe_os_error(exc)
                self.log.warning("daemon", "Syslog: cannot listen on %s: %s" % (path, describe_os_error(exc)))
                continue
            if sock is None:
                continue
            self.sockets[path] = sock
            self.selector.register(sock, EVENT_READ, (self._on_readable, (kind, sock)))
        if self.sockets:
            self.log.info("daemon", "Syslog: reading %s" % ", ".join(sorted(self.sockets)))

    def _bind_dev_log(self):
        """/dev/log as systemd lays it out: a link to DEV_LOG_SOCKET, where
        the socket is. A unit's private /dev copies the link, so it reaches
        the socket a next daemon makes (a bind of the socket itself would
        keep the old one)."""
        if os.path.islink(SYSLOG_PATH):
            return self._bind(os.path.normpath(os.path.join("/dev", os.readlink(SYSLOG_PATH))))
        if os.path.lexists(SYSLOG_PATH):
            if self._bind(SYSLOG_PATH, take_over=False) is None and SYSLOG_PATH in self.notes:
                return None                   # another daemon's, or not a socket: left alone
            _unlink_quietly(SYSLOG_PATH)      # a socket nobody reads: the layout below replaces it
        sock = self._bind(DEV_LOG_SOCKET)
        if sock is not None:
            os.symlink(DEV_LOG_SOCKET, SYSLOG_PATH)
            self.owned.append(SYSLOG_PATH)
        return sock

    def _bind(self, path, take_over=True):
        """Our socket at `path`. None where another daemon listens there
        (journald, rsyslog) or the path is no socket: left alone, and said
        so. A socket nobody reads is taken over (with take_over)."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None:
            if not stat.S_ISSOCK(mode):
                self.notes[path] = "not a socket: left alone"
                self.log.warning("daemon", "Syslog: %s is not a socket; left alone" % path)
                return None
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(path)
                self.notes[path] = "another daemon listens there: left alone"
                self.log.info("daemon", "Syslog: %s is another daemon's; left alone" % path)
                return None
            except ConnectionRefusedError:
                if not take_over:
                    return None
                os.unlink(path)               # a socket nobody reads: taken over
            finally:
                probe.close()
        folder = os.path.dirname(path)
        if not os.path.isdir(folder):
            makedirs(folder)
            self.owned.append(folder)         # removed at close, if empty
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        umask = os.umask(0o111)               # made 0666: every process may log, as with journald's
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(umask)
        self.owned.append(path)
        return sock

    def close(self):
        for path, sock in self.sockets.items():
            unregister_quietly(self.selector, sock)
            sock.close()
        for path in reversed(self.owned):
            if os.path.isdir(path) and not os.path.islink(path):
                try:
                    os.rmdir(path)            # a folder we made, unless something else lives there now
                except OSError:
                    pass
            else:
                _unlink_quietly(path)
        self.sockets, self.owned = {}, []

    def _on_readable(self, source, _mask):
        kind, sock = source
        batches = {}
        now, wall = time.monotonic(), time.time()
        budget = LOG_BYTES_PER_TURN
        for data, pid, uid, fds, truncated in receive_datagrams(sock, MAX_LOG_DATAGRAM, LOG_DATAGRAMS_PER_TURN,
                                                                keep_fds=1 if kind == "journal" else 0):
            self.received += 1
            try:
                name = self._unit_of(pid, now) if pid else None
                spec = self.spec_of(name) if name else None
                if not self._admit(name, spec, now, wall, batches):
                    continue                  # over its rate: not even read further
                if fds:
                    data = self._read_memfd(fds[0])
                budget -= len(data)
                message = self._message(kind, data, truncated)
            except (ValueError, OSError) as exc:
                message = (3, "gitproc", pid, "a %s message that could not be read: %s" % (kind, exc))
            finally:
                for fd in fds:
                    os.close(fd)
            if message is not None:
                self._route(message, pid, spec, wall, batches)
            if budget <= 0:
                break                         # the rest waits for the next loop turn
        for name, lines in batches.items():
            if name is None:
                for line in lines:
                    self.log.info("daemon", line.rstrip("\n"))
            else:
                self.write(name, lines)

    @staticmethod
    def _read_memfd(fd):
        """A large native message: the contents of the sealed memfd it came
        in. Any other descriptor (a pipe, a device, a file on NFS) could
        block the loop: refused unread, as journald refuses it."""
        import fcntl
        info = os.fstat(fd)
        try:
            seals = fcntl.fcntl(fd, 1034)     # F_GET_SEALS: only a memfd has them
        except OSError:
            seals = 0
        if not stat.S_ISREG(info.st_mode) or seals & 0xe != 0xe:    # shrink, grow and write sealed
            raise ValueError("a descriptor that is not a sealed memfd")
        data = os.pread(fd, MAX_LOG_MEMFD, 0)
        if not data:
            raise ValueError("an empty memfd")
        return data

    @staticmethod
    def _message(kind, data, truncated):
        """(priority, identifier, pid, text) of one datagram, or None."""
        if kind == "syslog":
            priority, identifier, pid, text = parse_syslog_datagram(data)
        else:
            fields = parse_journal_datagram(data)
            if "MESSAGE" not in fields:
                return None
            try:
                priority = parse_priority(fields.get("PRIORITY", b"6").decode("ascii", "replace"))
            except ValueError:
                priority = 6
            pid_text = fields.get("SYSLOG_PID", b"").decode("ascii", "replace")
            identifier = fields.get("SYSLOG_IDENTIFIER", b"").decode("utf-8", "replace") or None
            text = fields["MESSAGE"].decode("utf-8", "replace")
            pid = int(pid_text) if pid_text.isdigit() else None
        if truncated:
            text += " [cut: longer than %d bytes]" % MAX_LOG_DATAGRAM
        return priority, identifier, pid, text

    def _admit(self, name, spec, now, wall, batches):
        """The rate limit of the sender's unit (LogRateLimitIntervalSec=/
        LogRateLimitBurst=; for processes of no unit, a burst of
        NO_UNIT_LOG_BURST): True to read the message. When an interval
        ends with messages suppressed, a line says how many."""
        key = name if spec is not None else None
        interval = spec.log_rate_interval if spec is not None else DEFAULT_LOG_RATE_INTERVAL
        burst = spec.log_rate_burst if spec is not None else NO_UNIT_LOG_BURST
        rate = self.rates.get(key) or self.rates.setdefault(key, LogRate(now))
        allowed, ended = rate.allow(now, interval, burst)
        if ended:
            batches.setdefault(key, []).append("%sSuppressed %d messages from %s (%d in %gs)\n" % (
                "<5>%s gitproc: " % _log_stamp(wall) if key else "syslog: ", ended,
                name or "processes of no unit", burst, interval))
        if not allowed:
            self.dropped += 1
        return allowed

    def _route(self, message, sender, spec, wall, batches):
        """The unit's line(s), or the daemon log's for a sender that is no
        unit's. The sender is the kernel's pid (SCM_CREDENTIALS), never the
        pid the message claims."""
        priority, identifier, claimed_pid, text = message
        if spec is None:
            batches.setdefault(None, []).append("syslog from pid %s (no unit's): %s%s\n" % (
                sender, "%s: " % identifier if identifier else "", text[:MAX_LOG_LINE].replace("\n", " ")))
            return
        if spec.log_level_max is not None and priority > spec.log_level_max:
            self.dropped += 1
            return
        # SyslogIdentifier= names the unit's own output, not what it sends to syslog (as systemd)
        header = "<%d>%s %s[%d]: " % (priority, _log_stamp(wall), identifier or spec.syslog_identifier or spec.name,
                                      sender)
        if len(text) > MAX_LOG_LINE:
            text = text[:MAX_LOG_LINE] + " [cut]"
        parts = text.split("\n") if text else [""]
        if len(parts) > MAX_LOG_LINES:
            parts = parts[:MAX_LOG_LINES] + ["[cut: %d more lines]" % (len(parts) - MAX_LOG_LINES)]
        batches.setdefault(spec.name, []).extend(header + line + "\n" for line in parts)

    def _unit_of(self, pid, now):
        """The unit of a sender pid, remembered a second (a flood from one
        process reads /proc once)."""
        known = self.pid_units.get(pid)
        if known is not None and now - known[1] < 1.0:
            return known[0]
        if len(self.pid_units) > 4096:
            self.pid_units.clear()
        service = self.where(pid)
        name = service.name if service is not None else None
        self.pid_units[pid] = (name, now)
        return name


# ==== 12. deploying ==========================================================
# From a commit to what runs: snapshots of units' folders, the pure deploy
# plan, the history of deploys, Recovery (what an earlier daemon left) and
# the Deployer (target revision, parse cache, applying, rollbacks).


# ---- snapshots of units' folders (SPEC §13) ---------------------------------------
# A unit's folder runs from Git objects, never from a working tree. Its tree,
# read with ls-tree and cat-file (so no .gitattributes filter applies: these
# are the bytes of the objects), is written to snapshots/.new-TREE-PID and
# renamed to snapshots/TREE, which nothing writes again; identical folders
# share it. files/NAME, the unit's %Y, is a link to the snapshot of the
# version it runs, switched by an atomic rename: a reload finds the new files
# where the old ones were. A snapshot is checked against Git the first time
# a daemon uses it, and written again if it differs; one that no unit runs
# or keeps for rollback is removed.

class Snapshots:
    """The snapshots folder and the units' links into it."""

    def __init__(self, repo, root, links, limit, log):
        self.repo, self.root, self.links, self.limit, self.log = repo, root, links, limit, log
        self.ready = set()                # trees written or checked by this daemon
        self.listings = {}                # tree -> its listing (see listing), for the trees in use
        self.stamps = {}                  # tree -> {path: (inode, size, mtime)} of its files as written or checked

    def path(self, tree):
        return os.path.join(self.root, tree)

    def link(self, name):
        return os.path.join(self.links, name)

    def measure(self, owned, base=None):
        """Fill in the size and file count of an OwnedFolder (see listing);
        SnapshotError if it is over the limit or its tree cannot be read."""
        listing = self.listing(owned.tree, owned.path, base)
        owned.size, owned.count = sum(size for _, _, _, size in listing), len(listing)

    def ensure(self, tree, folder, base=None):
        """The snapshot of `tree` (of the repository's `folder`, for messages):
        written from Git if missing, written again if it is not what Git
        holds. Files the snapshot of `base` (the version it replaces) has
        alike are hard links to that one's: a changed folder costs the files
        that changed. SnapshotError if it cannot be written."""
        target = self.path(tree)
        if tree in self.ready:
            return target
        listing = self.listing(tree, folder)
        if os.path.isdir(target):
            problem = self._mismatch(target, listing)
            if problem is None:
                self._stamp(tree, listing)
                self.ready.add(tree)
                return target
            self.log.warning("daemon", "Snapshot %s of %s/ %s: writing it again from Git" % (tree[:7], folder, problem))
        self._write(tree, folder, listing, base if base in self.ready and base in self.stamps else None)
        self.ready.add(tree)
        return target

    def _stamp(self, tree, listing, known=None):
        """Note each file of a snapshot as it is now (`known`: those noted
        already, links to the earlier snapshot's): a file changed since, even
        in place keeping its size, is then not linked into the next one."""
        stamps = dict(known or {})
        for path, mode, _, _ in listing:
            if mode not in ("120000", "160000") and path not in stamps:
                info = os.lstat(os.path.join(self.path(tree), path))
                stamps[path] = (info.st_ino, info.st_size, info.st_mtime_ns)
        self.stamps[tree] = stamps

    def listing(self, tree, folder, base=None):
        """[(path, mode, object id, size)] of the tree's files, checked: no
        more than the size limit, no path that leaves the folder. Sizes are
        asked of git only for objects the listing of `base` lacks (asking
        for each costs git a look at every object)."""
        if tree in self.listings:
            return self.listings[tree]
        try:
            output = run_git(self.repo, ["ls-tree", "-r", "-z", tree])
            entries = []
            for entry in output.split(b"\0"):
                if not entry:
                    continue
                meta, _, path = entry.partition(b"\t")
                mode, _, object_id = meta.decode().split()
                path = path.decode("utf-8", "surrogateescape")
                if any(part in ("", ".", "..") for part in path.split("/")):
                    raise SnapshotError("%s/: the tree holds the path %r, which would leave the folder" % (folder, path))
                if mode.startswith("100") and mode != "100755":
                    mode = "100644"       # old trees may say 100664: a plain file all the same
                entries.append((path, mode, object_id))
            sizes = {object_id: size for _, _, object_id, size in self.listings.get(base, ())}
            unknown = sorted({object_id for _, mode, object_id in entries if mode != "160000" and object_id not in sizes})
            if unknown:
                checked = run_git(self.repo, ["cat-file", "--batch-check"], "".join(o + "\n" for o in unknown).encode())
                for line in checked.decode().splitlines():
                    fields = line.split()
                    if len(fields) == 3 and fields[2].isdigit():
                        sizes[fields[0]] = int(fields[2])
        except GitError as exc:
            raise SnapshotError("%s/: cannot read its tree %s: %s" % (folder, tree[:7], exc))
        listing = [(path, mode, object_id, sizes.get(object_id, 0)) for path, mode, object_id in entries]
        total = sum(size for _, _, _, size in listing)
        if self.limit and total > self.limit:
            raise SnapshotError("%s/ holds %s in %d files, more than snapshot_max_bytes (%s): the unit is not "
                                "deployed" % (folder, format_bytes(total), len(listing), format_bytes(self.limit)))
        self.listings[tree] = listing
        return listing

    def _write(self, tree, folder, listing, base):
        makedirs(self.root)
        temporary = os.path.join(self.root, ".new-%s-%d" % (tree, os.getpid()))
        remove_tree(temporary)
        mask = os.umask(0o022)            # the modes of a checkout, whatever the daemon's umask
        alike = set(self.listings[base]) if base else set()
        stamps, known = self.stamps.get(base, {}), {}
        linked = {entry for entry in listing if entry in alike and entry[1] not in ("120000", "160000")}
        writer = _SnapshotWriter(temporary, [entry[:3] for entry in listing if entry[1] != "160000" and entry not in linked])
        try:
            os.mkdir(temporary, 0o755)
            for path, mode, object_id, size in listing:
                if mode == "160000":      # a submodule: an empty folder, as a checkout has it
                    os.makedirs(os.path.join(temporary, path), 0o755)
                elif (path, mode, object_id, size) in linked:
                    writer.current = path
                    full = _with_folder(os.path.join(temporary, path))
                    source = os.path.join(self.path(base), path)
                    try:
                        info = os.lstat(source)
                        if stamps.get(path) != (info.st_ino, info.st_size, info.st_mtime_ns):
                            raise FileNotFoundError(errno.ENOENT, "changed since it was written")
                        os.link(source, full, follow_symlinks=False)
                        known[path] = stamps[path]
                    except FileNotFoundError:   # gone or changed in the earlier snapshot: from Git then
                        writer.entries.append((path, mode, object_id))
                        self.ready.discard(base)
            writer.current = None
            if writer.entries:
                run_git(self.repo, ["cat-file", "--batch"], "".join(
                    object_id + "\n" for _, _, object_id in writer.entries).encode(), sink=writer.feed)
            writer.finish()
            if os.path.lexists(self.path(tree)):
                # An adopted process may work in the folder it replaces: kept
                # aside until that process is gone (see collect).
                old = os.path.join(self.root, ".old-%s-%d" % (tree, os.getpid()))
                remove_tree(old)
                os.rename(self.path(tree), old)
            os.rename(temporary, self.path(tree))
            self._stamp(tree, listing, known)
        except (OSError, GitError, ValueError) as exc:   # ValueError: a NUL in a link's target
            writer.close()
            remove_tree(temporary)
            detail = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
            raise SnapshotError("%s/: cannot write its snapshot in %s: %s%s" % (
                folder, self.root, detail, " (%s)" % writer.current if writer.current else ""))
        finally:
            os.umask(mask)

    def _mismatch(self, target, listing):
        """What differs between a snapshot on disk and the tree's listing (the
        first difference found), or None: every file's kind, mode and
        content, read and hashed as Git hashes a blob."""
        expected = {}
        for path, mode, object_id, _ in listing:
            expected[path] = (mode, object_id)
            folder = os.path.dirname(path)
            while folder and folder not in expected:
                expected[folder] = ("040000", None)
                folder = os.path.dirname(folder)
        seen = 0
        for folder, subfolders, names in os.walk(target):
            for name in subfolders + names:
                full = os.path.join(folder, name)
                path = os.path.relpath(full, target)
                if path not in expected:
                    return "has %s, which the tree has not" % path
                mode, object_id = expected[path]
                seen += 1
                info = os.lstat(full)
                kind = "120000" if stat.S_ISLNK(info.st_mode) else "040000" if stat.S_ISDIR(info.st_mode) else (
                    "100755" if stat.S_ISREG(info.st_mode) and info.st_mode & 0o100 else
                    "100644" if stat.S_ISREG(info.st_mode) else "other")
                if kind != (mode if mode != "160000" else "040000"):
                    return "has %s as %s, not %s" % (path, kind, mode)
                if object_id is None or mode == "160000":
                    continue
                digest = new_digest("sha1" if len(object_id) == 40 else "sha256")
                if kind == "120000":
                    data = os.readlink(full).encode("utf-8", "surrogateescape")
                    digest.update(b"blob %d\0" % len(data) + data)
                else:
                    digest.update(b"blob %d\0" % info.st_size)
                    with open(full, "rb") as content:
                        for chunk in iter(lambda: content.read(1 << 20), b""):
                            digest.update(chunk)
                if digest.hexdigest() != object_id:
                    return "has %s changed" % path
        if seen != len(expected):
            return "lacks %d of its files" % (len(expected) - seen)
        return None

    def point(self, name, tree):
        """Make files/NAME a link to the snapshot of `tree` (None: no link), by
        an atomic rename. False (logged) if it cannot be written."""
        link = self.link(name)
        try:
            if tree is None:
                _unlink_quietly(link)
                return True
            target = self._target(tree)
            try:
                if os.readlink(link) == target:
                    return True
            except OSError:
                pass
            makedirs(self.links)
            temporary = os.path.join(self.links, ".%s.new-%d" % (name, os.getpid()))
            remove_tree(temporary)
            os.symlink(target, temporary)
            os.replace(temporary, link)
            return True
        except OSError as exc:
            self.log.error(name, "Cannot link %s to its snapshot %s: %s" % (link, tree[:7], describe_os_error(exc)))
            return False

    def _target(self, tree):
        return os.path.join(os.pardir, os.path.basename(self.root), tree)

    def check(self, name, spec):
        """Before a process of a unit with a folder starts: its %Y links to
        the snapshot of its version, which is there (one removed by hand is
        written again). SpawnError if not: never the files of another."""
        try:
            if os.readlink(self.link(name)) == self._target(spec.tree) and os.path.isdir(self.path(spec.tree)):
                return
        except OSError:
            pass
        if not os.path.isdir(self.path(spec.tree)):
            self.ready.discard(spec.tree)
        try:
            self.ensure(spec.tree, spec.owned.path)
        except SnapshotError as exc:
            raise SpawnError(str(exc))
        if not self.point(name, spec.tree):
            raise SpawnError("cannot link %s to its snapshot" % self.link(name))

    def collect_unused(self, services):
        """Remove the snapshots no Service of `services` ({name: Service})
        runs, or keeps for AutoRollback= or rollback (the version before its
        current one), and the links of units gone."""
        keep = set()
        for service in services.values():
            keep.update((service.spec.tree, service.versions.previous_tree,
                         service.versions.previous[0].tree if service.versions.previous else None,
                         service.resources.running_tree if service.has_process() else None))
        keep.discard(None)
        adopted = {s.resources.running_tree for s in services.values() if s.main.adopted and s.has_process()}
        return self.collect(keep, set(services), adopted)

    def collect(self, keep, names, adopted=()):
        """Remove the snapshots whose tree is not in `keep`, what a daemon that
        died while writing left, snapshots written again whose tree no
        `adopted` process started from, and the links of units not in `names`."""
        removed = []
        for tree in [tree for tree in self.listings if tree not in keep]:
            del self.listings[tree]
            self.stamps.pop(tree, None)
        mine = "-%d" % os.getpid()
        for entry in self._listdir(self.root):
            if entry in keep or (entry.endswith(mine) and not (
                    entry.startswith(".old-") and entry[len(".old-"):-len(mine)] not in adopted)):
                continue
            remove_tree(os.path.join(self.root, entry))
            self.ready.discard(entry)
            if not entry.startswith("."):
                removed.append(entry[:7])
        for entry in self._listdir(self.links):
            if entry not in names and not entry.startswith("."):
                _unlink_quietly(os.path.join(self.links, entry))
        if removed:
            self.log.info("daemon", "Removed snapshot%s %s: no unit runs it or keeps it for rollback" % (
                "s" if len(removed) > 1 else "", ", ".join(removed)))
        return removed

    def _listdir(self, folder):
        try:
            return os.listdir(folder)
        except FileNotFoundError:
            return []
        except OSError as exc:
            self.log.warning("daemon", "Cannot list %s: %s" % (folder, describe_os_error(exc)))
            return []


def _with_folder(path):
    """`path`, once the folder it goes in exists."""
    if not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path), 0o755)
    return path


class _SnapshotWriter:
    """Writes the files of a snapshot from `git cat-file --batch` output as it
    comes, one file after the other; links are made last, so that no file
    is written through one."""

    def __init__(self, root, entries):
        self.root, self.entries = root, entries   # (path, mode, object id), in cat-file's order
        self.index = 0
        self.pending = b""                # the start of a header not complete yet
        self.left = None                  # bytes of the current object still to come (None: a header is next)
        self.fd = None
        self.link_target = None           # the bytes of a link being read
        self.links = []                   # (path, target) to make at the end
        self.current = None               # the path being written, for an error message

    def feed(self, data):
        data = memoryview(self.pending + data) if self.pending else memoryview(data)
        self.pending = b""
        pos = 0
        while pos < len(data):
            if self.left is None:
                end = bytes(data[pos:pos + 200]).find(b"\n")
                if end < 0 and len(data) - pos < 200:
                    self.pending = bytes(data[pos:])
                    return
                header = bytes(data[pos:pos + end]).split()
                pos += end + 1
                if end < 0 or self.index >= len(self.entries) or len(header) < 3 or header[1] != b"blob":
                    raise GitError("git cat-file: object %s is missing" % (header[0].decode() if header else "?"))
                if not header[2].isdigit():
                    raise GitError("git cat-file: a header without a size")
                self._open(int(header[2]))
            elif self.left == 0:          # the newline after the object
                pos += 1
                self._close()
            else:
                piece = data[pos:pos + self.left]
                pos += len(piece)
                self.left -= len(piece)
                if self.fd is None:
                    self.link_target += bytes(piece)
                else:
                    while piece:
                        piece = piece[os.write(self.fd, piece):]

    def _open(self, size):
        path, mode, _ = self.entries[self.index]
        self.current, self.left = path, size
        full = _with_folder(os.path.join(self.root, path))
        if mode == "120000":
            self.link_target = b""
        else:
            self.fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                              0o555 if mode == "100755" else 0o444)    # read-only: a snapshot is not written again

    def _close(self):
        if self.fd is None:
            self.links.append((self.current, self.link_target))
        else:
            os.close(self.fd)
            self.fd = None
        self.index += 1
        self.left = None

    def finish(self):
        if self.index != len(self.entries) or self.left is not None:
            raise GitError("git cat-file stopped before the end of the tree")
        for path, target in self.links:
            self.current = path
            os.symlink(os.fsdecode(target), os.path.join(self.root, path))
        self.current = None

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def plan_deploy(old_specs, new_specs, files=None):
    """What a deploy changes: {'added', 'changed', 'removed', 'unchanged'} lists of
    unit names, sorted, and 'changes': {name: [Key=, ...]} for the changed ones.
    Pure. Two versions of a unit are the same when they mean the same: a new
    comment or a moved file restarts nothing. `files` ({name: [path, ...]})
    names the files of a unit's folder that changed: a change of the unit."""
    plan = {"added": [], "changed": [], "removed": [], "unchanged": [], "changes": {}}
    for name, spec in new_specs.items():
        old = old_specs.get(name)
        if old is None:
            plan["added"].append(name)
            continue
        keys = unit_changes(old, spec)
        if keys or (files or {}).get(name):
            plan["changed"].append(name)
            plan["changes"][name] = keys
        else:
            plan["unchanged"].append(name)
    plan["removed"] = [name for name in old_specs if name not in new_specs]
    for key in ("added", "changed", "removed", "unchanged"):
        plan[key].sort()
    return plan


def plan_units(deployed, found, files=None, rejected=None):
    """The pure deploy planner for services: plan_deploy(), then what
    AutoRollback= decided. `rejected` ({name: (identity, note)}) names the
    versions it took back: a unit whose new version is one of them stays on
    the version it runs, unchanged, with the note as its drift, until a
    commit changes it again. plan_deploy()'s dict, with 'drift': {name: note}."""
    plan = plan_deploy(deployed, found, files)
    plan["drift"] = {}
    for name in list(plan["changed"]):
        back = (rejected or {}).get(name)
        if back is not None and found[name].identity() == back[0]:
            plan["changed"].remove(name)
            del plan["changes"][name]
            plan["unchanged"].append(name)
            plan["drift"][name] = back[1]
    plan["unchanged"].sort()
    return plan


def plan_activators(deployed, found):
    """The pure deploy planner for timers and sockets ({name: spec} deployed
    and found): plan_deploy()'s lists, a unit changed when its identity did."""
    plan = {"added": [], "changed": [], "removed": [], "unchanged": [], "changes": {}}
    for name, spec in sorted(found.items()):
        old = deployed.get(name)
        if old is None:
            plan["added"].append(name)
        elif old.identity() != spec.identity():
            plan["changed"].append(name)
            plan["changes"][name] = spec.changed_keys(old)
        else:
            plan["unchanged"].append(name)
    plan["removed"] = sorted(name for name in deployed if name not in found)
    return plan


def unit_changes(old, new):
    """The unit keys whose meaning differs between two versions of a unit."""
    before, after = old.fingerprint(), new.fingerprint()
    return [FIELD_KEYS[field] for field in UnitSpec.FIELDS if before[field] != after[field]]


def dependency_order(specs):
    """Unit names ordered so that every unit comes after what it is ordered
    After=/Requires= (dependencies outside `specs` are ignored). Units in a cycle
    come last, in name order."""
    remaining = {name: deps - {name} for name, deps in ordering_edges(specs).items()}
    order = []
    while remaining:
        ready = sorted(name for name, deps in remaining.items() if not deps)
        if not ready:
            order.extend(sorted(remaining))
            break
        for name in ready:
            del remaining[name]
        for deps in remaining.values():
            deps.difference_update(ready)
        order.extend(ready)
    return order


class DeployPlan:
    """What deploying a commit changes, or changed: the one shape of every
    deploy, `sync`, `diff` and `rollback`. Unit names in sorted lists;
    `changes` names the changed keys of each changed unit; `drift` the units
    AutoRollback= keeps at an earlier version; `specs` what is to run, with
    `origin` naming the commit of a unit kept at an earlier version. A plan
    that could not be made has only `error`; `notes` are added to the reply."""

    LISTS = ("added", "changed", "removed", "unchanged")

    def __init__(self, commit=None, previous=None, noop=False, error=None):
        self.commit = commit              # Commit planned for
        self.previous = previous          # sha deployed before it, or None
        self.noop = noop                  # already deployed: nothing to do
        self.error = error                # why no plan could be made
        self.added, self.changed, self.removed, self.unchanged = [], [], [], []
        self.changes = {}                 # name -> ["Key=", ...]
        self.files = {}                   # name -> changed files of its folder (paths in the folder)
        self.reload = []                  # changed units that reload rather than restart (ReloadOnFileChange=)
        self.outside = []                 # files changed outside every unit's folder, when no unit changed
        self.drift = {}                   # name -> why it runs an earlier version
        self.invalid = []                 # "file:line: error: message" of units not deployed
        self.skipped = {}                 # name -> why it does not run on this host
        self.specs = {}                   # name -> UnitSpec to run
        self.problems = []                # every Diagnostic of the commit
        self.origin = {}                  # name -> commit of an earlier version kept
        self.in_tree = set()              # names of every unit file in the commit
        self.notes = {}                   # extra reply fields (rollback, pin)
        self.activated = {}               # name -> why a deploy leaves it stopped (SPEC §16)
        self.timers = {}                  # name (NAME.timer) -> TimerSpec to run
        self.sockets = {}                 # name (NAME.socket) -> SocketSpec to run
        self.templates = {}               # NAME@ -> (path, sources, blob): what Accept=yes sockets instantiate

    @classmethod
    def failed(cls, message):
        return cls(error=message)

    def key_warnings(self):
        """Unknown and misplaced keys of the units this plan starts or restarts."""
        touched = set(self.added) | set(self.changed)
        return [d for d in self.problems if d.code == "key" and d.unit_name in touched]

    def to_json(self):
        if self.error:
            return {"error": self.error}
        reply = {"commit": self.commit.to_json(), "previous": self.previous, "noop": self.noop,
                 "changes": self.changes, "files": self.files, "reload": self.reload, "outside": self.outside,
                 "drift": self.drift, "invalid": self.invalid, "skipped": self.skipped,
                 "warnings": [str(d) for d in self.key_warnings()], "activated": self.activated,
                 "not_run": [str(d) for d in self.problems if d.code in ("other-unit", "activated")]}
        reply.update({key: getattr(self, key) for key in self.LISTS})
        reply.update(self.notes)
        return reply


class History:
    """The deployments, newest last, at most HISTORY_LIMIT: the one writer of
    history entries (deploys, errors, rollbacks)."""

    def __init__(self, entries=()):
        self.entries = [entry for entry in entries if isinstance(entry, dict)][-HISTORY_LIMIT:]

    def record(self, trigger, outcome, commit=None, subject=None, added=(), changed=(), removed=(),
               invalid=(), **extra):
        entry = {"time": time.time(), "commit": commit, "subject": subject, "trigger": trigger,
                 "outcome": outcome, "added": list(added), "changed": list(changed),
                 "removed": list(removed), "invalid": list(invalid)}
        entry.update(extra)
        self.entries.append(entry)
        del self.entries[:-HISTORY_LIMIT]

    def last(self, count):
        return self.entries[-count:] if count else []


# ---- recovery: what an earlier daemon left ---------------------------------------


class Recovery:
    """What an earlier daemon left behind: the saved state of each service
    (its intent, counters, pid), live processes adopted by pid and start time
    (or found by the log file they write to when the state file lost them),
    and processes of units no longer deployed, which are stopped."""

    def __init__(self, config, log, call_later):
        self.config, self.log, self.call_later = config, log, call_later
        self.saved_services = {}          # name -> what state.json said of it at start
        self.same_boot = False            # the state file is of this boot: units go on where they were

    def restore(self, state):
        """Take the services of a loaded state; a pid the state file does not
        know (pids are saved in batches, so after a crash it may name one a
        restart already replaced) is found by the log file it writes to."""
        self.saved_services = state.get("services", {})
        current = boot_id()
        self.same_boot = current is not None and state.get("boot_id") == current
        for name, found in self._find_running_services().items():
            saved = self.saved_services.get(name)
            if isinstance(saved, dict) and self.live_pid(saved) is not None:
                continue
            self.log.warning(name, "Found its process %d by its log file (the state file %s)" % (
                found["pid"], "had an older pid" if isinstance(saved, dict) else "did not know it"))
            if isinstance(saved, dict):
                saved.update({key: found[key] for key in ("pid", "pid_start", "started_wall")})
                for key in ("tree", "started_tree"):   # of the older process: this one's are not known
                    saved.pop(key, None)
            else:
                self.saved_services[name] = found

    def _find_running_services(self):
        """The services an earlier daemon left running, found without the state
        file: session leaders whose stdout is this home's log file of a unit.
        That proves whose they are; anything else is left alone."""
        found = {}
        log_dir = self.config.log_dir + os.sep
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            pid = int(entry)
            try:
                stdout = os.readlink("/proc/%d/fd/1" % pid)
                if not (stdout.startswith(log_dir) and stdout.endswith(".log")) or os.getsid(pid) != pid:
                    continue
            except OSError:
                continue
            name = stdout[len(log_dir):-len(".log")]
            if unit_name_problem(name) is None and name not in found:
                start = pid_start_time(pid)
                found[name] = {"want": "up", "pid": pid, "pid_start": start,
                               "started_wall": boot_time() + start / os.sysconf("SC_CLK_TCK") if start else None}
        return found

    @staticmethod
    def live_pid(saved):
        """(pid, start time) from a state entry if that process still runs, else None.
        The start time proves it is the same process: a reused pid is never touched."""
        pid, pid_start = saved.get("pid"), saved.get("pid_start")
        if not isinstance(pid, int) or not isinstance(pid_start, int) or pid <= 0:
            return None
        return (pid, pid_start) if pid_start_time(pid) == pid_start else None

    def saved_commit(self, name):
        saved = self.saved_services.get(name)
        return saved.get("commit") if isinstance(saved, dict) and isinstance(saved.get("commit"), str) else None

    def restore_service(self, service, reloads=lambda spec: False):
        """A new Service takes what was saved of it; its process, if an earlier
        daemon left it running, is adopted (then stopped if the user wants it
        down, restarted if its unit or its files changed while no daemon ran,
        or reloaded if only its files did and reloads(spec) says it reloads
        for them). True if a process was adopted."""
        saved = self.saved_services.get(service.name)
        if not isinstance(saved, dict):
            return False
        service.take_saved(saved, self.same_boot)
        if isinstance(saved.get("previous_tree"), str):
            service.versions.previous_tree = saved["previous_tree"]
        back = saved.get("rolled_back")
        if isinstance(back, dict) and isinstance(saved.get("rejected"), str) and service.commit == back.get("to"):
            service.versions.rejected, service.versions.rolled_back = saved["rejected"], back   # kept back (Deployer._kept_back)
        live = self.live_pid(saved) or self._pid_file_process(service.spec)
        if live is None and saved.get("phase") == REMAIN and service.spec.remain_after_exit:
            live = (None, None)           # it ran and remains: nothing to run again, only to remember
        same = saved.get("meaning") == service.spec.meaning()
        phase = "exit-wait" if saved.get("exit_wait") is True else saved.get("phase")
        if live is None and service.want == "up" and same and self.same_boot and phase in (
                BACKOFF, FAILED, EXITED, "exit-wait"):
            due = saved.get("restart_due")
            longest = restart_delay(service.spec.restart_sec, service.crash_streak, service.spec.restart_steps,
                                    service.spec.restart_max_delay)   # a clock set back never stretches it
            service.restore(phase, saved["reason"] if isinstance(saved.get("reason"), str) else None,
                            restart_in=min(longest, max(0.0, due - time.time())) if isinstance(due, (int, float))
                            else None)
            return True
        if live is None:
            return False
        if live[0] is None:
            service.restore(REMAIN, None)
        else:
            service.adopt(live[0], live[1], saved.get("started_wall"))
        # The snapshot it reads through %Y: what the state file says (null for a
        # unit that had no folder), else (a state file of an older gitproc, or
        # an older process) the deployed one.
        service.resources.linked_tree = saved["tree"] if "tree" in saved and isinstance(saved["tree"], (str, type(None))) \
            else service.spec.tree
        started = saved.get("started_tree")
        service.resources.running_tree = started if isinstance(started, str) else self._tree_of_cwd(live[0], service.resources.linked_tree)
        meaning = saved.get("meaning")          # (a state file of an older gitproc has only the blob)
        unit_changed = meaning != service.spec.meaning() if isinstance(meaning, str) else \
            saved.get("blob") not in (None, service.spec.blob)
        if service.want == "down":
            service.stop()
            return True
        if unit_changed:
            self.log.info(service.name, "Restarting: unit changed while no daemon ran")
            service.restart()
            return True
        files = self._files_changed(service.resources.linked_tree, service.spec.tree)
        if files and reloads(service.spec) and service.phase in (RUNNING, REMAIN):
            self.log.info(service.name, "Reloading: %s changed while no daemon ran" % some_paths(files))
            service.resources.linked_tree = service.spec.tree
            service.reload()
        elif files:
            self.log.info(service.name, "Restarting: %s changed while no daemon ran" % some_paths(files))
            service.restart()
        else:
            service.resources.linked_tree = service.spec.tree
        return True

    def _files_changed(self, old, new):
        """The files (not unit files) that differ between two trees of a unit's
        folder, as Deployer._changed_files finds them (a unit that now owns no
        folder has none); ["(its folder)"] when git cannot tell."""
        if old == new or new is None:
            return []
        try:
            return [path for path in git_changed_paths(self.config.repo_path, old, new) if not is_unit_source(path)]
        except GitError:
            return ["(its folder)"]

    def _tree_of_cwd(self, pid, default):
        """The snapshot an adopted process works in (for a state file that does
        not say which it started from), else `default`."""
        try:
            cwd = os.readlink("/proc/%d/cwd" % pid) if pid else ""
        except OSError:
            return default
        prefix = self.config.snapshot_dir + os.sep
        return cwd[len(prefix):].split(os.sep)[0] if cwd.startswith(prefix) else default

    @staticmethod
    def _pid_file_process(spec):
        """A forking unit's main process named by its PIDFile= (pids are saved
        in batches: a daemon killed just after the start may not have saved
        it), as (pid, start time); None if there is none alive."""
        if spec.type != "forking" or not spec.pid_file:
            return None
        try:
            pid = read_pid_file(spec.pid_file)
        except (OSError, ValueError):
            return None
        start = pid_start_time(pid) if pid is not None else None
        return (pid, start) if start is not None else None

    def forget_units_not_in(self, names):
        """Units removed while no daemon ran: forget them (a live process of
        one is stopped by stop_orphans)."""
        for name in [n for n, saved in self.saved_services.items() if n not in names and
                     not (isinstance(saved, dict) and self.live_pid(saved))]:
            del self.saved_services[name]

    def stop_orphans(self, deployed_names):
        """Processes that an earlier daemon left running for units that are no
        longer deployed: SIGTERM their group, SIGKILL it if still there later."""
        for name, saved in list(self.saved_services.items()):
            live = self.live_pid(saved) if isinstance(saved, dict) and name not in deployed_names else None
            if live is None:
                continue
            pid, pid_start = live
            self.log.info(name, "Stopping pid %d: its unit is no longer deployed" % pid)
            _signal_group_if_same(pid, pid_start, signal.SIGTERM)
            self.call_later(DEFAULT_TIMEOUT_STOP_SEC, lambda p=pid, s=pid_start: _signal_group_if_same(p, s, signal.SIGKILL))
            del self.saved_services[name]


def drift_note(rolled_back):
    """What `diff` says of a unit AutoRollback= keeps at an earlier version."""
    return "runs the version of %s: %s was rolled back (%s)" % (
        str(rolled_back.get("to"))[:7], str(rolled_back.get("from"))[:7], rolled_back.get("why"))


def skipped_by_condition(service):
    """A start a Condition*= skipped: not a failure, as systemctl says (exit 0)."""
    return service.state == STOPPED and (service.reason or "").startswith("condition failed")


# ---- the deployer ----------------------------------------------------------------


def activated_units(specs, problems, activators=None, held=None):
    """{name: why} of the units a deploy does not start (SPEC §16): those a
    timer or a socket activates (`activators`: {name: spec}), those a unit
    of another type would (a path unit: see other_unit_problems) and those
    an OnFailure= names, unless a unit that does start pulls them in
    (Wants=, Requires=, BindsTo=)."""
    activated = {d.unit: d.message.split(": ", 1)[0] + ": not started at deploy" for d in problems
                 if d.code == "activated" and d.unit in specs}
    for name, activator in sorted((activators or {}).items()):
        activated.setdefault(activator.unit, "started by %s, not at deploy" % name)
    for name, why in sorted((held or {}).items()):          # timers not armed (errors, another host)
        if name in specs:
            activated.setdefault(name, why)
    targets = {target for spec in specs.values() for target in spec.on_failure + spec.on_success}
    for name, spec in sorted(specs.items()):
        if name in targets:
            continue                      # units that name each other in OnFailure= run, as they would anyway
        for key, names in (("OnFailure", spec.on_failure), ("OnSuccess", spec.on_success)):
            for target in names:
                if target in specs and target != name:
                    activated.setdefault(target, "started when %s %s (%s=), not at deploy" % (
                        name, "fails" if key == "OnFailure" else "succeeds", key))
    pulled = [name for name in specs if name not in activated]
    while pulled:
        spec = specs[pulled.pop()]
        for other in spec.requires + spec.wants + spec.binds_to:
            if activated.pop(other, None) is not None:
                pulled.append(other)
    return activated


def host_matches(conditions, hostname):
    """ConditionHost= globs or a machine id (a leading '!' negates), matched
    without regard to case, as systemd: all must hold, but of those with a
    leading '|' one is enough."""
    import fnmatch
    machine = machine_id() if conditions else ""
    triggering = []
    for condition in conditions:
        trigger = condition.startswith("|")
        condition = condition[1:].strip() if trigger else condition
        negate = condition.startswith("!")
        pattern = condition[1:].strip() if negate else condition
        matches = fnmatch.fnmatchcase(hostname.lower(), pattern.lower()) or (
            bool(machine) and pattern.lower().replace("-", "") == machine)
        if trigger:
            triggering.append(matches != negate)
        elif matches == negate:
            return False
    return not triggering or any(triggering)


def machine_id():
    """/etc/machine-id (read once), or "" where there is none."""
    if "machine_id" not in _MACHINE:
        try:
            _MACHINE["machine_id"] = _read_text("/etc/machine-id").strip()
        except OSError:
            _MACHINE["machine_id"] = ""
    return _MACHINE["machine_id"]


_MACHINE = {}                         # what was read of this machine (its machine id)


class VersionRecord:
    """What the Deployer keeps of one unit's versions, in a record of its own
    (Service reads it, never writes it; Recovery fills it from the state
    file)."""
    __slots__ = ("previous", "previous_tree", "rejected", "rolled_back", "removed")

    def __init__(self):
        self.previous = None            # (spec, commit) a deploy replaced, kept for AutoRollback=
        self.previous_tree = None       # the snapshot of its folder before the last change (kept for rollback)
        self.rejected = None            # identity of a version AutoRollback= took back
        self.rolled_back = None         # {"from", "to", "why", "time"} of that rollback
        self.removed = False            # gone from the deployed commit; dropped once stopped


class DeployTarget:
    """What to deploy: the branch (local mode), the branch fetched from the
    remote (remote mode), or a commit a remote-mode rollback pinned until the
    remote branch moves on. It keeps the pin and, once a pin is released,
    the remote head the next deploy must descend from (rewind_base)."""

    def __init__(self, config, log):
        self.config, self.log = config, log
        self.pin = None                   # remote-mode rollback: {"sha", "subject", "remote_at"}
        self.rewind_base = None           # after a rollback pin: the remote head the next one must descend from

    @property
    def remote_mode(self):
        return bool(self.config.remote)

    def restore(self, pin):
        if self.remote_mode and isinstance(pin, dict) and isinstance(pin.get("sha"), str):
            self.pin = {"sha": pin["sha"], "subject": str(pin.get("subject", "")),
                        "remote_at": pin.get("remote_at") if isinstance(pin.get("remote_at"), str) else None}

    def rev(self):
        """(the revision to deploy, how to name it)."""
        if self.pin and not self._pin_outdated():
            return self.pin["sha"], "pinned commit %s" % self.pin["sha"][:7]
        if self.remote_mode:
            return REMOTE_REF % self.config.branch, "%s/%s (fetched)" % (self.config.remote, self.config.branch)
        return "refs/heads/" + self.config.branch, "branch %r" % self.config.branch

    def pinned(self, commit):
        """Whether `commit` is the one a rollback pinned (chosen by hand)."""
        return bool(self.pin and self.pin["sha"] == commit.sha)

    def pin_to(self, target):
        """Remote mode: deploy `target` until the remote branch moves on."""
        fetched = read_ref_file(git_common_dir(self.config.repo_path), REMOTE_REF % self.config.branch)
        self.pin = {"sha": target.sha, "subject": target.subject, "remote_at": fetched}
        self.log.info("daemon", "Rollback: pinned to %s until %s/%s moves on" % (
            target.sha[:7], self.config.remote, self.config.branch))

    def release(self, why=None):
        """Drop the pin; the next deploy must descend from the remote head it had."""
        if why:
            self.log.info("daemon", why)
        self.rewind_base, self.pin = self.pin.get("remote_at"), None

    def release_outdated_pin(self):
        if self._pin_outdated():
            self.release("%s/%s moved on: releasing the rollback pin on %s" % (
                self.config.remote, self.config.branch, self.pin["sha"][:7]))

    def _pin_outdated(self):
        """True when the remote branch moved on since the rollback pin was set."""
        if not self.pin:
            return False
        fetched = read_ref_file(git_common_dir(self.config.repo_path), REMOTE_REF % self.config.branch)
        return bool(fetched) and fetched != self.pin.get("remote_at")


class Deployer:
    """Deploys: which revision is the target (the branch, the fetched branch,
    or a rollback pin), the plan for it (parse cache, invalid units kept at
    their good version, ConditionHost=, AutoRollback= drift), applying that
    plan to the registry of services, the history, and AutoRollback='s
    decision. Owns what is deployed: specs, their problems, skipped units."""

    def __init__(self, config, log, services, recovery, host, store, events):
        self.config, self.log = config, log
        self.events = events
        self.services = services          # the registry: name -> Service (shared with the daemon)
        self.recovery = recovery
        self.host = host                  # what new Services are given
        self.store = store
        self.specs = {}                   # name -> UnitSpec deployed (last good version)
        self.timer_specs = {}             # name (NAME.timer) -> TimerSpec deployed
        self.schedule = None              # the TimerSchedule the deployed timers are given to
        self.socket_specs = {}            # name (NAME.socket) -> SocketSpec deployed
        self.listeners = None             # the SocketSet the deployed sockets are given to
        self.unit_problems = []           # Diagnostics of the deployed commit
        self.skipped = {}                 # name -> why the unit does not run on this host
        self.deployed = None              # Commit deployed
        self.last_sync = None             # {"time", "result", "error"?, "trigger"}
        self.history = History()
        self.applied = False              # a commit was applied by this daemon
        self.target = DeployTarget(config, log)   # the branch, the remote's, or a pinned commit
        self.deploy_count = 0             # deploys applied (the poll adapts to them)
        self.deploys_total = {}           # outcome -> deploys ever (a counter for metrics; persisted)
        self.parse_cache = {}             # (path, blob) -> parse_unit result
        self.context = specifier_context()   # the specifiers of this machine and user (%H, %t, ...)
        self.before_of = {}               # name -> the deployed units that say Before=name
        self._last_plan = None            # the plan of the last deploy (see last_plan)
        self.snapshots = Snapshots(config.repo_path, config.snapshot_dir, config.files_dir,
                                   config.snapshot_max_bytes, log)
        self.changed_files_cache = {}     # (old tree, new tree) -> files changed, of units' folders
        self.collect_timer = None         # removal of unused snapshots, due after a deploy
        self.verifier = CommitVerifier(config.repo_path, config.verify, config.allow_rewind,
                                       os.path.join(os.path.dirname(config.state_file), "gnupg"))
        self.refused = None               # the commit last refused: {"sha", "subject", "reason", "error", "time"}
        self.activated = {}               # name -> why a deploy leaves it stopped: something else starts it
        self.refusals_total = {}          # reason -> refusals ever (a counter for metrics; persisted)
        self.sync_asked = None            # `sync` asked for the next deploy: {"allow_rewind": bool}
        self.fallback_tried = False       # a refused head at start: the last verified commit was tried

    @property
    def remote_mode(self):
        return self.target.remote_mode

    def restore(self, state):
        self.history = History(state.get("history", []))
        deployed = state.get("deployed")
        if isinstance(deployed, dict) and isinstance(deployed.get("sha"), str):
            self.deployed = Commit(deployed["sha"], deployed.get("subject", ""), deployed.get("time", 0))
        for key in ("deploys_total", "refusals_total"):
            totals = state.get(key)
            if isinstance(totals, dict):
                setattr(self, key, {k: v for k, v in totals.items() if isinstance(v, int) and not isinstance(v, bool)})
        self.target.restore(state.get("pin"))

    def persistent(self):
        return {"deployed": self.deployed.to_json() if self.deployed else None,
                "history": self.history.entries, "pin": self.target.pin, "deploys_total": self.deploys_total,
                "refusals_total": self.refusals_total}

    def _count(self, outcome):
        self.deploys_total[outcome] = self.deploys_total.get(outcome, 0) + 1

    def _read_units(self, sha):
        """The units of a commit (entries, problems); files parsed before are not read again."""
        return git_read_units(self.config.repo_path, sha, known=self.parse_cache)

    # -- planning ----------------------------------------------------------------------

    def deploy_head(self, trigger, force=False):
        """Reconcile the services with the target commit and return the plan
        carried out. Nothing happens when that commit is already deployed
        (unless `force`). A repository that cannot be read changes nothing:
        the error goes to the log, `status` and history."""
        now = time.time()
        if self.host.shutting_down:
            return DeployPlan.failed("the daemon is shutting down")
        asked, self.sync_asked = self.sync_asked, None
        commit = None
        try:
            rev, what = self.target.rev()
            commit = git_commit_at(self.config.repo_path, rev, what)
            if self.applied and not force and self.deployed and commit.sha == self.deployed.sha:
                self.last_sync = {"time": now, "result": "partial" if self.invalid_lines() else "ok",
                                  "trigger": trigger}
                self.refused = None               # the branch is back on the deployed commit
                self._last_plan = self._noop_plan(commit)
                return self._last_plan
            self._verify(commit, trigger, asked)          # before anything of the commit is read
            plan = self.plan(commit, self._read_units(commit.sha), materialise=True)
        except Refusal as refusal:
            return self._refuse(trigger, commit, refusal)
        except (GitError, OSError) as exc:
            message = str(exc) if isinstance(exc, GitError) else "cannot run git: %s" % describe_os_error(exc)
            self.record_error(trigger, message)
            return DeployPlan.failed(message)
        plan = self.apply(plan, trigger)
        self.refused = self.target.rewind_base = None
        self.last_sync = {"time": now, "result": "ok" if not plan.invalid else "partial", "trigger": trigger}
        return plan

    # -- trusted deploys (SPEC §20) ----------------------------------------------------

    def _verify(self, commit, trigger, asked=None):
        """Raise Refusal unless `commit` may be deployed. A commit refused
        before is checked again only when `sync` asked (`asked`), by a
        rollback or a daemon start: a poll or a webhook that finds the same
        head says nothing new. After a rollback pin the branch must descend
        from the remote head the pin was set at, not from the pinned commit."""
        refused = self.refused
        if refused and refused["sha"] == commit.sha and asked is None and trigger not in ("rollback", "daemon start"):
            raise Refusal(refused["reason"], refused["error"], commit.sha)
        pinned = self.target.pinned(commit)     # chosen by hand: its signature alone
        base = None if pinned or not self.deployed else (self.target.rewind_base or self.deployed.sha)
        self.verifier.check(commit, base, bool(asked and asked.get("allow_rewind")))

    def _refuse(self, trigger, commit, refusal):
        """A commit that may not run: nothing changes, and it is said once per
        commit and reason (log, history, event, metric); `status`, `sync` and
        /healthz show it while it is the branch's head."""
        message = str(refusal)
        self.last_sync = {"time": time.time(), "result": "refused", "error": message, "trigger": trigger,
                          "reason": refusal.reason}
        if not (self.refused and self.refused["sha"] == commit.sha and self.refused["error"] == message):
            self.refused = {"sha": commit.sha, "subject": commit.subject, "reason": refusal.reason,
                            "error": message, "time": time.time()}
            self.log.error("daemon", "Deploy refused: %s" % message)
            self.history.record(trigger, "refused", commit.sha, commit.subject, reason=refusal.reason, error=message)
            self.refusals_total[refusal.reason] = self.refusals_total.get(refusal.reason, 0) + 1
            self.events.record("deploy", before=self.deployed.sha if self.deployed else None, after=None,
                               commit=commit.sha, reason="refused (%s): %s" % (trigger, message))
            self.store.mark_dirty()
        if not self.applied and not self.fallback_tried and self.deployed and self.deployed.sha != commit.sha:
            self.fallback_tried = True            # once per daemon start: no log at every poll
            self._deploy_last_verified(trigger)
        return DeployPlan.failed("deploy refused: " + message)

    def _deploy_last_verified(self, trigger):
        """At daemon start with the head refused: the commit deployed before
        (the state file's) runs on, once it verifies by itself (the state
        file is not trusted to name a verified commit)."""
        refusal_sync = self.last_sync
        try:
            commit = git_commit_at(self.config.repo_path, self.deployed.sha, "the deployed commit")
            self.verifier.check(commit, None)
            plan = self.plan(commit, self._read_units(commit.sha), materialise=True)
        except (GitprocError, OSError) as exc:
            self.log.error("daemon", "The commit deployed before, %s, cannot run either (%s): nothing is deployed" % (
                self.deployed.sha[:7], exc))
            return
        self.log.warning("daemon", "Running the last verified commit %s until the branch has one that verifies" % (
            commit.sha[:7]))
        self.apply(plan, trigger + ", last verified commit")
        self.last_sync = refusal_sync

    def _signing_options(self):
        """git -c options that sign a rollback commit with signing_key, in
        the signature format verification expects."""
        key = self.config.signing_key
        if not key:
            return None
        ssh = self.verifier.kind == "ssh" or (self.verifier.kind is None and os.path.isfile(key))
        return ["-c", "gpg.format=%s" % ("ssh" if ssh else "openpgp"), "-c", "user.signingkey=" + key]

    @property
    def last_plan(self):
        """What the last deploy did (for a remote-mode sync answered after its fetch)."""
        if self.last_sync and self.last_sync.get("error"):
            return DeployPlan.failed(self.last_sync["error"])
        if self._last_plan is None and self.deployed is None:
            return DeployPlan.failed("nothing is deployed yet")
        return self._last_plan or self._noop_plan(self.deployed)

    def diff(self):
        """What deploying the target now would do, changing nothing."""
        try:
            rev, what = self.target.rev()
            commit = git_commit_at(self.config.repo_path, rev, what)
            noop = bool(self.deployed and commit.sha == self.deployed.sha and self.applied)
            if not noop:
                self.verifier.check(commit, None if not self.deployed or self.target.pinned(commit)
                                    else self.deployed.sha)
            plan = self.plan(commit, self._read_units(commit.sha))
        except GitprocError as exc:
            return DeployPlan.failed(str(exc))
        plan.noop = noop
        return plan

    def _drift(self):
        return {name: drift_note(s.versions.rolled_back) for name, s in self.services.items()
                if s.versions.rolled_back and s.versions.rejected is not None}

    def _noop_plan(self, commit):
        plan = DeployPlan(commit, commit.sha, noop=True)
        plan.unchanged = sorted(list(self.specs) + list(self.timer_specs) + list(self.socket_specs))
        plan.drift, plan.timers, plan.sockets = self._drift(), self.timer_specs, self.socket_specs
        plan.templates = self.listeners.templates if self.listeners else {}
        plan.invalid, plan.skipped = self.invalid_lines(), dict(self.skipped)
        if self._last_plan is not None and self._last_plan.commit is not None and self._last_plan.commit.sha == commit.sha:
            plan.outside = self._last_plan.outside
        return plan

    def looked(self, on_deployed=False):
        """The branch was looked at and nothing new found: "last sync" is the
        last look for a new commit, in every mode (status, metric, /healthz).
        `on_deployed`: the branch is on the deployed commit (a refused head
        it had moved to is gone)."""
        if on_deployed and self.refused:
            self.refused = None
            self.last_sync = {"time": time.time(), "result": "partial" if self.invalid_lines() else "ok",
                              "trigger": "commit"}
        if self.last_sync:
            self.last_sync = dict(self.last_sync, time=time.time())

    def invalid_lines(self):
        return [str(d) for d in self.unit_problems if d.severity == "error"]

    def record_error(self, trigger, message):
        """A deploy or fetch that failed: logged and shown once per distinct error."""
        previous = (self.last_sync or {}).get("error")
        self.last_sync = {"time": time.time(), "result": "error", "error": message, "trigger": trigger}
        if message != previous:
            self.log.error("daemon", "Deploy skipped: %s" % message)
            self.history.record(trigger, "error", error=message)
            self._count("error")
            self.events.record("deploy", before=self.deployed.sha if self.deployed else None, after=None,
                               reason="error (%s): %s" % (trigger, message))
            self.store.mark_dirty()

    def plan(self, commit, units, materialise=False):
        """What deploying `commit` would do, changing nothing but, with
        `materialise`, writing the snapshots of the folders it runs from."""
        entries, composing, folders = units
        specs, problems = check_unit_tree(entries, self.parse_cache, composing, self.context, folders,
                                          self.config.files_dir)
        if len(self.parse_cache) > 2 * len(entries) + 100:
            keep = {(path, blob) for _, path, _, blob in entries}
            self.parse_cache = {key: value for key, value in self.parse_cache.items() if key in keep}
        for name, spec in list(specs.items()):
            try:
                if spec.owned is not None:
                    self.snapshots.measure(spec.owned, self.specs[name].tree if name in self.specs else None)
            except SnapshotError as exc:
                problems.append(Diagnostic(spec.path, 1, "error", str(exc), unit=name))
                del specs[name]
        bad_names = {d.unit_name for d in problems if d.severity == "error"}
        earlier = self.specs or self._specs_of_saved_commit(bad_names)
        origin = {}                                   # name -> commit its kept spec came from
        for name in sorted(bad_names):
            if name not in specs and name in earlier:
                specs[name] = earlier[name]           # the earlier good version keeps running
                service = self.services.get(name)
                origin[name] = service.commit if service else self.recovery.saved_commit(name)
        kept_back = {} if self.specs else self._kept_back(specs, origin)
        skipped = {}
        for name, spec in list(specs.items()):
            if not host_matches(spec.condition_host, self.config.hostname):
                skipped[name] = "ConditionHost=%s does not match %s" % (" ".join(spec.condition_host), self.config.hostname)
                del specs[name]
        files = self._changed_files(specs)
        rejected = {name: (service.versions.rejected, drift_note(service.versions.rolled_back))
                    for name, service in self.services.items() if service.versions.rejected is not None}
        changes = plan_units(self.specs, specs, files, rejected)
        plan = DeployPlan(commit, self.deployed.sha if self.deployed else None)
        for key in DeployPlan.LISTS:
            setattr(plan, key, changes[key])
        plan.changes = changes["changes"]
        plan.files = {name: files[name] for name in plan.changed if files.get(name)}
        plan.drift.update(kept_back)
        plan.drift.update(changes["drift"])
        for name in changes["drift"]:     # it stays on the version it runs
            specs[name], origin[name] = self.specs[name], self.services[name].commit
        templates = {name[:-len(UNIT_SUFFIX)]: (path, data, blob) for name, path, data, blob in entries
                     if name.endswith(TEMPLATE_SUFFIX)}
        timers, held = self._plan_activators(TIMER_SUFFIX, entries, specs, skipped, bad_names, problems, origin)
        sockets, socket_held = self._plan_activators(SOCKET_SUFFIX, entries, specs, skipped, bad_names, problems,
                                                     origin, templates)
        for name, why in socket_held.items():
            held.setdefault(name, why)
        for name, spec in sorted(sockets.items()):       # a template each connection would fail to make
            if spec.accept and name not in self.socket_specs:
                path, data, blob = templates[spec.unit]
                if parse_unit(spec.unit + "0", path, data, blob, self.context)[0] is None:
                    problems.append(Diagnostic(spec.path, 1, "error", "%s%s, which it makes an instance of for "
                                               "each connection, has errors" % (spec.unit, UNIT_SUFFIX), unit=name))
                    del sockets[name]
        plan.invalid = [str(d) for d in problems if d.severity == "error"]
        plan.skipped, plan.specs, plan.problems, plan.origin = skipped, specs, problems, origin
        plan.activated = activated_units(specs, problems, dict(timers, **{
            name: spec for name, spec in sockets.items() if not spec.accept}), held)
        plan.templates = {spec.unit: templates[spec.unit] for spec in sockets.values() if spec.accept}
        plan.in_tree = {name for name, _, _, _ in entries}
        if materialise:
            self._materialise(plan)
        plan.reload = [name for name in plan.changed if not plan.changes[name] and self._reloads(specs[name])]
        if plan.previous and plan.previous != commit.sha and not (plan.added or plan.changed or plan.removed):
            owned = set(folders) | {spec.owned.path for spec in self.specs.values() if spec.owned}
            plan.outside = self._files_outside(plan.previous, commit.sha, owned)
        plan.timers, plan.sockets = timers, sockets
        for found, deployed in ((timers, self.timer_specs), (sockets, self.socket_specs)):
            changes = plan_activators(deployed, found)   # named in the plan's lists with their suffix
            for key in DeployPlan.LISTS:
                getattr(plan, key).extend(changes[key])
            plan.changes.update(changes["changes"])
        for key in DeployPlan.LISTS:
            getattr(plan, key).sort()
        return plan

    def _runner_of(self, suffix):
        """(the deployed specs, what runs them) of timers or sockets."""
        return (self.timer_specs, self.schedule) if suffix == TIMER_SUFFIX else (self.socket_specs, self.listeners)

    def _saved_commit_of(self, suffix, name):
        runner = self._runner_of(suffix)[1]
        saved = runner.saved.get(name) if runner else None
        sha = saved.get("commit") if isinstance(saved, dict) else None
        return sha if isinstance(sha, str) and _SHA_RE.match(sha) else None

    def _activators_of_saved_commits(self, suffix, names):
        """At start-up, for timers or sockets with errors: the version each
        last ran, read from the commit the state file names (verified again)."""
        commits = {}
        for name in names:
            sha = self._saved_commit_of(suffix, name)
            if sha:
                commits.setdefault(sha, []).append(name)
        found = {}
        for sha, wanted in commits.items():
            try:
                self.verifier.check(Commit(sha, "", 0), None)
                entries, _, _ = git_read_units(self.config.repo_path, sha)
                services = {_strip_suffix(name, UNIT_SUFFIX) for name, _, _, _ in entries
                            if not name.endswith((TIMER_SUFFIX, SOCKET_SUFFIX))}
                activators, _, _ = check_activators(entries, suffix, services, self.context)
            except (GitError, Refusal) as exc:
                self.log.warning("daemon", "Cannot read commit %s for the earlier version of %s: %s" % (
                    sha[:7], ", ".join(wanted), exc))
                continue
            found.update({name: activators[name] for name in wanted if name in activators})
        return found

    def _plan_activators(self, suffix, entries, specs, skipped, bad_names, problems, origin, templates=()):
        """The timers or sockets of a commit ({name: spec}), their problems
        added to `problems`: one with an error keeps its deployed version;
        one whose service does not run on this host is skipped with it.
        Returns (specs, {service: why it is held back by one not run})."""
        deployed, runner = self._runner_of(suffix)
        known = set(specs) | set(skipped) | bad_names | set(templates)
        activators, found, targets = check_activators(entries, suffix, known, self.context, self.parse_cache)
        problems.extend(found)
        bad = {d.unit for d in found if d.severity == "error" and d.unit not in activators}
        earlier = deployed or self._activators_of_saved_commits(suffix, bad)
        for name in sorted(bad & set(earlier)):
            activators[name] = earlier[name]              # the earlier good version keeps running
            running = runner.units.get(name) if runner else None
            origin[name] = running.commit if running else self._saved_commit_of(suffix, name)
        for name, activator in list(activators.items()):
            if not host_matches(activator.condition_host, self.config.hostname):
                skipped[name] = "ConditionHost=%s does not match %s" % (" ".join(activator.condition_host),
                                                                        self.config.hostname)
                del activators[name]
            elif activator.unit in skipped:
                skipped[name] = "its service %s does not run here: %s" % (activator.unit, skipped[activator.unit])
                del activators[name]
            elif activator.unit not in specs and activator.unit not in templates:
                del activators[name]
        held = {}                         # one not run still holds its service back (SPEC §16)
        for name, target in sorted(targets.items()):
            if name not in activators and not target.endswith("@"):
                held.setdefault(target, "started by %s (%s), not at deploy" % (
                    name, "skipped here: " + skipped[name] if name in skipped else "which has errors"))
        return activators, held

    def _reloads(self, spec):
        """ReloadOnFileChange=: a change of its files only reloads the unit, if
        it can reload and does not bind them into its sandbox (a bind is
        made at the start: only a restart would show the new files)."""
        link = self.snapshots.link(spec.name)
        bound = any(source == link or source.startswith(link + "/") for source, *_ in spec.bind_paths)
        return spec.reload_on_file_change and (spec.exec_reload or spec.type == "notify-reload") and not bound

    def _kept_back(self, specs, origin):
        """At start-up: a unit whose deployed version AutoRollback= took back
        (the state file says so) runs the version it was rolled back to, as
        it did before the daemon stopped. Returns {name: why}."""
        kept = {}
        for name in list(specs):
            saved = self.recovery.saved_services.get(name)
            if not (isinstance(saved, dict) and isinstance(saved.get("rolled_back"), dict)
                    and saved.get("rejected") == specs[name].identity()):
                continue
            earlier = self._specs_of_saved_commit([name]).get(name)
            if earlier is not None:
                specs[name], origin[name] = earlier, self.recovery.saved_commit(name)
                kept[name] = drift_note(saved["rolled_back"])
        return kept

    def _changed_files(self, specs):
        """{name: [path, ...]}: the files of each unit's folder (paths in it)
        that differ from the deployed version's, unit files and drop-ins
        left out (they are compared by what they mean)."""
        files = {}
        for name, spec in specs.items():
            old = self.specs.get(name)
            if old is None or spec.tree is None or old.tree == spec.tree:
                continue
            key = (old.tree, spec.tree)
            if key not in self.changed_files_cache:
                if len(self.changed_files_cache) > 200:
                    self.changed_files_cache.clear()
                self.changed_files_cache[key] = [path for path in git_changed_paths(self.config.repo_path, old.tree, spec.tree)
                                                 if not is_unit_source(path)]
            files[name] = self.changed_files_cache[key]
        return files

    def _files_outside(self, previous, sha, folders):
        """The files a commit changed outside every unit's folder (`folders`:
        those of both versions; none of them a unit file): what a commit that
        touches no unit changed."""
        try:
            paths = git_changed_paths(self.config.repo_path, previous, sha)
        except GitError:
            return []
        return [path for path in paths if not is_unit_source(path) and not owning_folder(path, folders)]

    def _materialise(self, plan):
        """Write the snapshots the plan runs from. A unit whose folder cannot be
        written is a deploy error of that unit alone: its earlier version
        keeps running (an unchanged one keeps its earlier snapshot)."""
        for name in plan.added + plan.changed + plan.unchanged:
            spec = plan.specs[name]
            if spec.owned is None:
                continue
            earlier = self.specs.get(name)
            try:
                self.snapshots.ensure(spec.tree, spec.owned.path, earlier.tree if earlier else None)
                continue
            except SnapshotError as exc:
                problem = Diagnostic(spec.path, 1, "error", str(exc), unit=name)
            if name in plan.unchanged and earlier is not None:
                self.log.warning(name, "Keeps its earlier snapshot: %s" % problem.message)
                plan.specs[name] = earlier
                continue
            plan.problems.append(problem)
            plan.invalid.append(str(problem))
            if name in plan.added:
                earlier = None if self.specs else self._specs_of_saved_commit([name]).get(name)
                if earlier is None:
                    plan.added.remove(name)
                    del plan.specs[name]
                else:                     # at start-up: the version an earlier daemon ran goes on
                    plan.specs[name] = earlier
                    plan.origin[name] = self.recovery.saved_commit(name)
                continue
            plan.changed.remove(name)
            plan.changes.pop(name)
            plan.files.pop(name, None)
            plan.specs[name] = earlier
            plan.origin[name] = self.services[name].commit if name in self.services else plan.origin.get(name)
            plan.unchanged.append(name)
            plan.unchanged.sort()

    def _specs_of_saved_commit(self, names):
        """At start-up, for invalid units whose earlier good version must keep
        running: that version, read from the commit each one last ran from."""
        commits = {}
        for name in names:
            sha = self.recovery.saved_commit(name)
            if sha:
                commits.setdefault(sha, []).append(name)
        specs = {}
        for sha, wanted in commits.items():
            try:
                self.verifier.check(Commit(sha, "", 0), None)   # the state file is not trusted to name a verified commit
                entries, problems, folders = git_read_units(self.config.repo_path, sha)
                found, _ = check_unit_tree(entries, problems=problems, context=self.context, folders=folders,
                                           files_dir=self.config.files_dir)
                for name in wanted:
                    if name in found and found[name].owned is not None:
                        self.snapshots.measure(found[name].owned)
                        self.snapshots.ensure(found[name].tree, found[name].owned.path)
            except (GitError, SnapshotError, Refusal) as exc:
                self.log.warning("daemon", "Cannot read commit %s for the earlier version of %s: %s" % (
                    sha[:7], ", ".join(wanted), exc))
                continue
            specs.update({name: found[name] for name in wanted if name in found})
        return specs

    # -- applying ------------------------------------------------------------------------

    def apply(self, plan, trigger):
        """Reconcile the running services with the plan: new units start,
        changed ones restart, removed ones stop, the others are untouched.
        Manual stops are kept."""
        commit = plan.commit
        previous = self.deployed.sha if self.deployed else None
        if not self.applied:
            self.recovery.forget_units_not_in(plan.in_tree)
        for line in plan.invalid:
            self.log.error("daemon", "Invalid unit: %s" % line)
        for problem in plan.key_warnings():
            self.log.warning(problem.unit_name, "%s:%d: %s" % (problem.path, problem.line, problem.message))
        for name in plan.removed:
            if name not in self.services:
                continue                  # a timer or a socket: below
            service = self.services[name]
            if service.state in ACTIVE_STATES:
                service.halt("removed from the repository")
            service.versions.removed = True
            self.recovery.saved_services.pop(name, None)
        self.specs, self.unit_problems, self.skipped = plan.specs, plan.problems, plan.skipped
        released = [name for name in self.activated if name not in plan.activated and name in plan.unchanged]
        self.activated = plan.activated
        self._index_before()
        self.deployed = commit
        self.applied = True
        self.socket_specs = plan.sockets
        if self.listeners is not None:    # bound before any unit starts (SPEC §18)
            self.listeners.deploy(plan.sockets, commit.sha, plan.origin, plan.templates)
        for name in dependency_order(plan.specs):
            spec = plan.specs[name]
            sha = plan.origin.get(name, commit.sha)
            self.snapshots.point(name, spec.tree)     # before a process of the new version starts
            if name in plan.added:
                self._add_service(spec, sha, plan.activated.get(name))
                continue
            service = self.services[name]
            if name in plan.changed:
                service.versions.previous = (service.spec, service.commit) if spec.auto_rollback else None
                if service.spec.tree != spec.tree:
                    service.versions.previous_tree = service.spec.tree
                service.versions.rejected = service.versions.rolled_back = None
                service.take_version(spec, sha)
                if service.want != "up" or (name in plan.activated and not service.has_process()):
                    continue              # stopped stays stopped: only what runs restarts
                what = ", ".join(plan.changes[name] + plan.files.get(name, []))
                if name in plan.reload and service.phase in (RUNNING, REMAIN):
                    self.log.info(name, "Reloading: %s changed in commit %s" % (what, commit.sha[:7]))
                    service.resources.linked_tree = spec.tree       # it reads its new files through %Y
                    service.reload()
                else:
                    self.log.info(name, "Restarting: %s changed in commit %s" % (what, commit.sha[:7]))
                    service.restart()
            else:
                service.take_version(spec)    # same meaning; the file may have moved
                if service.versions.rolled_back and name not in plan.drift:
                    service.versions.rejected = service.versions.rolled_back = None   # a commit brought back the version it runs
                if service.has_process():
                    service.resources.linked_tree = spec.tree   # its files are alike: only unit files differ
        self.timer_specs = plan.timers
        if self.schedule is not None:
            self.schedule.deploy(plan.timers, commit.sha, plan.origin)
        for name in plan.changed:         # a changed socket restarts its running service
            socket_spec = plan.sockets.get(name)
            service = self.services.get(socket_spec.unit) if socket_spec is not None else None
            if service is not None and service.has_process() and service.name not in plan.changed:
                self.log.info(service.name, "Restarting: %s changed in commit %s" % (name, commit.sha[:7]))
                service.restart()
        for name in released:           # what activated it is gone: it runs as any unit does
            service = self.services.get(name)
            if service is not None and service.want == "up" and service.state == STOPPED and not service.has_process():
                service.start()
        self.forget_removed()
        if plan.outside:
            self.log.info("daemon", "Commit %s touches no unit: it changes %s, outside every unit's folder" % (
                commit.sha[:7], some_paths(plan.outside)))
        self._collect_later()
        outcome = "partial" if plan.invalid else "ok"
        self.history.record(trigger, outcome, commit.sha, commit.subject,
                            plan.added, plan.changed, plan.removed, plan.invalid, files=plan.files,
                            outside=plan.outside[:20])
        self._count(outcome)
        self.events.record("deploy", before=previous, after=commit.sha, commit=commit.sha,
                           reason="%s (%s): %d added, %d changed, %d removed%s" % (
                               outcome, trigger, len(plan.added), len(plan.changed), len(plan.removed),
                               ", %d invalid" % len(plan.invalid) if plan.invalid else ""))
        self.log.info("daemon", "Deployed %s %r (%s): %d added, %d changed, %d removed, %d unchanged, %d invalid" % (
            commit.sha[:7], commit.subject, trigger, len(plan.added), len(plan.changed),
            len(plan.removed), len(plan.unchanged), len(plan.invalid)))
        self.deploy_count += 1
        self._last_plan = plan
        self.store.save_now()
        return plan

    def _add_service(self, spec, sha, activated=None):
        """A unit new to this daemon: started, unless the user stopped it or
        something else activates it (`activated`: why it stays stopped)."""
        service = self.services.get(spec.name)
        if service is not None:
            # Removed, still stopping, and back again: one Service, never two copies.
            service.versions.removed = False
            service.take_version(spec, sha)
            if service.want == "up" and not activated:
                service.start()           # STOPPING -> (stopped) -> STARTING
            return
        service = Service(self.host, spec, sha)
        self.services[spec.name] = service
        if self.recovery.restore_service(service, self._reloads):
            return
        if service.want == "up" and not activated:
            service.start()
        else:
            service.halt(activated or "stopped by user")

    def _index_before(self):
        before_of = {}
        for name, spec in self.specs.items():
            for later in spec.before:
                before_of.setdefault(later, []).append(name)
        self.before_of = {name: tuple(sorted(names)) for name, names in before_of.items()}

    def forget_removed(self):
        for name in [name for name, s in self.services.items() if s.versions.removed and s.state not in ACTIVE_STATES]:
            self.services.pop(name).discard()
            self.snapshots.point(name, None)
            self._collect_later()

    def _collect_later(self):
        """Collect snapshots soon: after a deploy, its restarts come first."""
        if self.collect_timer is None:
            self.collect_timer = self.host.call_later(SNAPSHOT_COLLECT_DELAY, self.collect_snapshots)

    def collect_snapshots(self):
        """Remove the snapshots no unit runs, or keeps for AutoRollback= or
        rollback (the version before the current one, per unit)."""
        self.collect_timer = None
        return self.snapshots.collect_unused(self.services)

    # -- AutoRollback= and rollback ---------------------------------------------------------

    def auto_rollback(self, service, why):
        """AutoRollback=yes: the version a deploy brought failed (start limit, or
        never healthy). The unit's previous version (spec and commit) is put
        back on the service to run instead: True, or False if there is none.
        The repository is not touched; `diff` shows the drift, `status` and
        history say why."""
        if not service.versions.previous or not service.spec.auto_rollback or self.host.shutting_down:
            return False
        old_spec, old_commit = service.versions.previous
        bad_commit = service.commit
        service.versions.previous = None
        service.versions.rejected = service.spec.identity()
        service.versions.rolled_back = {"from": bad_commit, "to": old_commit, "why": why, "time": time.time()}
        self.specs[service.name] = old_spec
        self.log.warning(service.name, "Rolling back to the version of %s: the one of %s failed (%s)" % (
            old_commit[:7], bad_commit[:7], why))
        self.history.record("auto-rollback", "rolled back", bad_commit, "AutoRollback of %s" % service.name,
                            changed=[service.name], why=why)
        self._count("rolled back")
        self.events.record("rollback", service.name, bad_commit, old_commit, why, service.main.pid, old_commit)
        service.take_version(old_spec, old_commit)
        self.snapshots.point(service.name, old_spec.tree)
        self._index_before()
        self.store.save_now()
        return True

    def deploy_note(self, service):
        """', commit COMMIT' when the service's running version came from the
        deployed commit (for grep "Restarting" in daemon.log)."""
        if self.deployed and service.commit == self.deployed.sha:
            return ", commit %s" % service.commit[:7]
        return ""

    def rollback(self, rev):
        """Local mode: a new commit restoring the units of `rev`, deployed.
        Remote mode: pin the daemon to `rev` until the remote branch moves on."""
        repo, branch = self.config.repo_path, self.config.branch
        target = git_commit_at(repo, rev, "commit %r" % rev)
        if self.remote_mode:
            try:
                self.verifier.check(target, None)     # a pin writes nothing: it must verify as it is
            except Refusal as exc:
                raise GitprocError("rollback: %s" % exc)
            self.target.pin_to(target)
            plan = self.deploy_head("rollback")
            plan.notes["pinned"] = self.target.pin
        else:
            try:
                self.verifier.check(target, None)     # a signed rollback must not vouch for what was never verified
            except Refusal as exc:
                raise GitprocError("rollback: %s" % exc)
            sign = self._signing_options()
            if self.verifier.kind and not sign:
                raise GitprocError("rollback refused: verification is on and no signing_key is set, so the rollback "
                                   "commit would be refused; set signing_key in the config, or commit the old units "
                                   "yourself, signed")
            head = git_commit_at(repo, "refs/heads/" + branch, "branch %r" % branch)
            if self.deployed and head.sha != self.deployed.sha:
                # The rollback commit goes on top of the branch: what the branch
                # holds since the deployed commit must pass too (a rewind, or
                # with scope all a commit that does not verify), or it would
                # add a commit that is refused.
                try:
                    self.verifier.check(head, self.deployed.sha, signatures=self.verifier.verify.get("scope") == "all")
                except Refusal as exc:
                    raise GitprocError("rollback refused, nothing committed: %s; put the branch back on the deployed "
                                       "commit first (in the repository: git reset --hard %s)" % (
                                           exc, self.deployed.sha[:7]))
            new = git_restore_units(repo, branch, head, target, sign)
            if new is not None:
                self.log.info("daemon", "Rollback: commit %s restores the units of %s" % (new[:7], target.sha[:7]))
            plan = self.deploy_head("rollback")
            plan.notes["rollback_commit"] = new
        plan.notes["target"] = target.to_json()
        return plan

    def release_pin(self):
        if not self.target.pin:
            raise GitprocError("nothing to release: no rollback pin is set")
        self.target.release("Rollback pin on %s released" % self.target.pin["sha"][:7])
        return self.deploy_head("rollback release", force=True)


# ==== 13. timers and sockets =================================================
# The two activation sources besides the user and deploys: timer units
# (one TimerSchedule, one entry in the daemon's timer heap) and socket
# units (one SocketSet, the listening sockets the daemon owns).


# ---- timers: services started on a schedule (SPEC §17) ---------------------------
# One TimerUnit per deployed .timer, and one TimerSchedule that owns them
# all: it keeps a single entry in the daemon's timer heap (the earliest
# elapse, several coalesced within their AccuracySec=), so a thousand armed
# timers cost the loop nothing until one is due. Calendar times are planned
# on the wall clock and re-planned when it jumps (a timerfd that the kernel
# cancels on every clock set); the monotonic keys are planned on the
# monotonic clock, whose zero is the machine's boot.

CLOCK_REALTIME, TFD_NONBLOCK, TFD_CLOEXEC = 0, os.O_NONBLOCK, os.O_CLOEXEC
TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET = 1, 2


LOCALTIME = "/etc/localtime"


def _zone_file():
    """What /etc/localtime is now (its target and bytes), or None."""
    try:
        with open(LOCALTIME, "rb") as zone_file:
            return os.path.realpath(LOCALTIME), zone_file.read(1 << 20)
    except OSError:
        return None


def random_delay(spec, elapse, seed):
    """RandomizedDelaySec= of one elapse: drawn from the host (`seed`), the
    timer's name and, unless FixedRandomDelay=, the calendar time it delays.
    The same elapse always gets the same delay, so re-planning it (a deploy,
    daemon-reload, a daemon restart) never moves it again (systemd draws
    anew at each reload: systemd/systemd#17569)."""
    if not spec.randomized_delay:
        return 0.0
    import hashlib
    text = "%s\0%s\0%s" % (seed, spec.name, "" if spec.fixed_random_delay else "%.6f" % (elapse or 0))
    fraction = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0 ** 64
    return fraction * spec.randomized_delay


class TimerUnit:
    """One timer: its spec, what the user wants of it, and its clock: when it
    last triggered (kept in the state file) and when it elapses next."""

    def __init__(self, spec):
        self.spec = spec
        self.want = "up"                  # "down": stopped by the user, remembered as for a service
        self.armed = False                # waiting for an elapse (or elapsed, see `elapsed`)
        self.elapsed = False              # every single-shot value fired: nothing left (RemainAfterElapse=)
        self.reason = None                # why it is not armed: stopped by user, a condition
        self.last_trigger = None          # wall time of the last trigger (persisted)
        self.last_trigger_mono = None     # the same on the monotonic clock, in this daemon's run
        self.triggers_total = 0           # triggers ever (persisted; a metric)
        self.armed_wall = self.armed_mono = None    # when it was armed (OnActiveSec=, the calendar's base)
        self.fired = set()                # single-shot values (field, seconds) fired since it was armed
        self.next_wall = self.next_mono = None      # the next elapse, random delay included
        self.next_calendar = None         # the calendar time of that elapse, if it is one
        self.next_cause = None            # the key of that elapse ("OnCalendar=daily", "OnBootSec=15min")
        self.stale = True                 # the plan must be made again (armed, triggered, changed)
        self.commit = None                # sha of the commit its spec came from

    @property
    def name(self):
        return self.spec.name

    def state(self, services):
        """systemctl's words: waiting, running (its service is active),
        elapsed, or stopped (`reason` says why: by the user, a condition)."""
        if not self.armed:
            return "stopped"
        service = services.get(self.spec.unit)
        if service is not None and service_busy(service):
            return "running"
        return "elapsed" if self.elapsed else "waiting"

    def persistent(self):
        return {"want": self.want, "last_trigger": self.last_trigger, "triggers_total": self.triggers_total,
                "commit": self.commit}

    def restore(self, saved):
        if not isinstance(saved, dict):
            return
        if saved.get("want") in ("up", "down"):
            self.want = saved["want"]
        stamp = saved.get("last_trigger")
        if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) and 0 < stamp <= time.time() + 60:
            self.last_trigger = float(stamp)  # a future one (a clock set back since) is forgotten, as systemd does
        if isinstance(saved.get("triggers_total"), int) and not isinstance(saved["triggers_total"], bool):
            self.triggers_total = saved["triggers_total"]

    def plan(self, now_wall, now_mono, started_mono, unit_times, seed, local, busy=False):
        """Set the next elapse from the spec, as systemd.timer(5) says;
        None when nothing is left to elapse. While its service is `busy`,
        OnUnitActiveSec=/OnUnitInactiveSec= wait for it to stop (as
        systemd's timer does in its "running" state)."""
        spec = self.spec
        candidates = []                   # (monotonic time, wall time, cause, calendar time or None)
        if spec.calendars:
            base = self.last_trigger if self.last_trigger is not None and (
                spec.persistent or self.last_trigger_mono is not None) else self.armed_wall
            for calendar in spec.calendars:
                elapse = next_elapse(calendar, base, local)
                if elapse is None:
                    continue
                at = elapse + random_delay(spec, elapse, seed)
                candidates.append((now_mono + max(0.0, at - now_wall), at, "OnCalendar=" + calendar.text, elapse))
        singles = [("on_active", "OnActiveSec", self.armed_mono), ("on_boot", "OnBootSec", 0.0),
                   ("on_startup", "OnStartupSec", started_mono)]
        booted_wall = now_wall - now_mono - (time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic())  # and suspends
        for field, key, base in singles:
            for value in getattr(spec, field):
                if field == "on_boot" and self.last_trigger is not None and self.last_trigger >= booted_wall + value - 1:
                    continue              # it fired since this boot (before a daemon restart): once per boot
                if (field, value) not in self.fired:
                    candidates.append((base + value, None, "%s=%s" % (key, format_timespan(value)), None))
        active, inactive = unit_times.get(spec.unit, (None, None))
        for field, key, unit_base in (("on_unit_active", "OnUnitActiveSec", active),
                                      ("on_unit_inactive", "OnUnitInactiveSec", inactive)):
            bases = [b for b in (unit_base, self.last_trigger_mono) if b is not None]
            for value in getattr(spec, field) if bases and not busy else ():
                candidates.append((max(bases) + value, None, "%s=%s" % (key, format_timespan(value)), None))
        if not candidates:
            self.next_wall = self.next_mono = self.next_calendar = self.next_cause = None
            return None
        self.next_mono, wall, self.next_cause, self.next_calendar = min(candidates, key=lambda c: c[0])
        self.next_wall = wall if wall is not None else now_wall + (self.next_mono - now_mono)
        return self.next_mono

    def triggered(self, now_wall, now_mono, started_mono):
        """The elapse happened: single-shot values that were due are done."""
        self.last_trigger, self.last_trigger_mono = now_wall, now_mono
        self.triggers_total += 1
        for field, base in (("on_active", self.armed_mono), ("on_boot", 0.0), ("on_startup", started_mono)):
            for value in getattr(self.spec, field):
                if base + value <= now_mono + 0.001:
                    self.fired.add((field, value))

    def to_json(self, services):
        service = services.get(self.spec.unit)
        return {"name": self.name, "unit": self.spec.unit + UNIT_SUFFIX, "state": self.state(services),
                "want": self.want, "reason": self.reason, "next": self.next_wall if self.armed else None,
                "next_cause": self.next_cause if self.armed else None, "last_trigger": self.last_trigger,
                "triggers_total": self.triggers_total, "description": self.spec.description,
                "path": self.spec.path, "persistent": self.spec.persistent,
                "accuracy": self.spec.accuracy, "randomized_delay": self.spec.randomized_delay,
                "calendars": [c.normalized() for c in self.spec.calendars],
                "service": {"state": service.state, "result": service.run.result, "last_exit": service.last_exit}
                if service is not None else None,
                "not_applied": [{"key": key, "value": value, "why": TIMER_NOT_APPLIED[key]}
                                for key, value in self.spec.not_applied]}


def service_busy(service):
    """Whether a service is active for its timer: running, starting,
    stopping or waiting to restart (an elapse then starts no second run)."""
    return service.state in ACTIVE_STATES or service.state == BACKOFF or service.has_process()


class TimerSchedule:
    """Every timer of the deployment, and the one entry in the daemon's timer
    heap that wakes the loop for the earliest of them."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.timers = self.units = {}     # name (NAME.timer) -> TimerUnit
        self.saved = {}                   # name -> what the state file kept of timers not deployed (yet)
        self.wake = None                  # the daemon's Timer for the next elapse
        self.clock_fd = None              # timerfd told of wall-clock jumps
        self.zone_watch = None            # FolderWatcher of /etc/localtime (False: none can be had)
        self.zone_seen = None             # what /etc/localtime held when last read
        self.started_mono = time.monotonic()
        self.unit_times = {}              # service name -> (last became active, last became inactive), monotonic
        self.timers_of = {}               # service name -> the TimerUnits that start it
        self.local = None                 # this machine's time zone (zoneinfo), read when a timer needs it
        self.seed = None                  # what random delays are drawn from: this host

    # -- the state file ----------------------------------------------------------

    def restore(self, state):
        saved = state.get("timers")
        if isinstance(saved, dict):
            self.saved = {name: entry for name, entry in saved.items() if isinstance(entry, dict)}

    def persistent(self):
        kept = dict(self.saved)
        kept.update({name: timer.persistent() for name, timer in self.timers.items()})
        return kept

    # -- deploys -----------------------------------------------------------------

    def deploy(self, specs, commit, origin=None):
        """The timers of deployed commit `commit` (a sha; `origin` names
        another for a timer kept at an earlier version): new ones are armed
        (unless the user stopped them before), changed ones re-planned
        (their service is not touched), removed ones disarmed."""
        for name in [n for n in self.timers if n not in specs]:
            timer = self.timers.pop(name)
            self.saved.pop(name, None)
            self.daemon.log.info(name, "Removed from the repository: disarmed")
        for name, spec in sorted(specs.items()):
            timer = self.timers.get(name)
            if timer is None:
                timer = self.timers[name] = TimerUnit(spec)
                timer.restore(self.saved.pop(name, None))
                if timer.want == "up":
                    self._arm(timer)
                else:
                    timer.reason = "stopped by user"
            elif timer.spec.identity() != spec.identity():
                self.daemon.log.info(name, "Re-planned: %s changed" % ", ".join(spec.changed_keys(timer.spec)))
                conditions_changed = timer.spec.conditions != spec.conditions
                timer.spec, timer.stale = spec, True
                if timer.armed:
                    timer.elapsed = False
                if timer.want == "up" and not timer.armed and (timer.reason or "").startswith("condition failed"):
                    self._arm(timer)      # its conditions are checked again
                elif timer.armed and conditions_changed:
                    self._disarm_if_condition_fails(timer)
            else:
                timer.spec = spec
        self.timers_of = {}
        for name, timer in self.timers.items():
            timer.commit = (origin or {}).get(name, commit)
            self.timers_of.setdefault(timer.spec.unit, []).append(timer)
        self.replan()

    # -- start and stop --------------------------------------------------------------

    def start(self, name):
        timer = self.timers[name]
        timer.want = "up"
        if not timer.armed or (timer.elapsed and not timer.spec.remain_after_elapse):
            self._arm(timer)
        elif timer.elapsed:
            self.daemon.log.info(name, "Elapsed already (RemainAfterElapse=yes): stop it first to arm it again")
        self.replan()
        self.daemon.store.mark_dirty()

    def stop(self, name):
        timer = self.timers[name]
        timer.want, timer.armed, timer.reason = "down", False, "stopped by user"
        self.daemon.log.info(name, "Stopped: disarmed")
        self.replan()
        self.daemon.store.mark_dirty()

    def _disarm_if_condition_fails(self, timer, what="Disarmed"):
        """True (and the timer disarmed, saying why) if one of its
        conditions does not hold."""
        failed = self.daemon.host.failed_condition(timer)
        if failed is None:
            return False
        key, negated, value = failed
        timer.armed, timer.reason = False, "condition failed: %s=%s%s" % (key, "!" if negated else "", value)
        self.daemon.log.info(timer.name, "%s: %s" % (what, timer.reason))
        return True

    def _arm(self, timer):
        if self._disarm_if_condition_fails(timer, "Not armed"):
            return
        timer.armed, timer.elapsed, timer.reason, timer.fired, timer.stale = True, False, None, set(), True
        timer.armed_wall, timer.armed_mono = time.time(), time.monotonic()
        timer.last_trigger_mono = None    # as systemd: a calendar counts from here, or (Persistent=) the last trigger

    # -- the schedule ----------------------------------------------------------------

    def replan(self, everything=False):
        """Plan the armed timers whose plan is stale (all of them with
        `everything`: the clock or the zone changed), and keep one heap
        entry, at the earliest elapse; elapses within each other's
        AccuracySec= share that wakeup (the latest of them that every one's
        accuracy allows). A plan is kept until something it depends on
        changes, so an elapse costs one timer's planning, not a thousand."""
        now_wall, now_mono = time.time(), time.monotonic()
        if self.daemon.host.shutting_down:
            if self.wake is not None:
                self.wake.cancel()
                self.wake = None
            return                        # nothing elapses any more: no wakeup for it
        if self.local is None and any(t.spec.calendars for t in self.timers.values()):
            self.local = local_zone()
        if self.seed is None:
            self.seed = "%s\0%s" % (self.daemon.config.hostname, machine_id())
        due, services = [], self.daemon.services
        for timer in self.timers.values():
            if not timer.armed:
                continue
            if not (timer.stale or everything):
                if timer.next_mono is not None:
                    due.append((timer.next_mono, timer.next_mono + timer.spec.accuracy))
                continue
            timer.stale = False
            service = services.get(timer.spec.unit)
            busy = service is not None and service_busy(service)
            if timer.plan(now_wall, now_mono, self.started_mono, self.unit_times, self.seed, self.local, busy) is None:
                if not timer.elapsed and not (timer.spec.on_unit_active or timer.spec.on_unit_inactive):
                    timer.elapsed = True  # nothing left (one that counts from its service waits for it)
                    if not timer.spec.remain_after_elapse:
                        timer.armed, timer.reason = False, None
                continue
            timer.elapsed = False
            due.append((timer.next_mono, timer.next_mono + timer.spec.accuracy))
        self._open_clock_watch(any(t.armed and (t.spec.calendars or t.spec.on_clock_change)
                                   for t in self.timers.values()))
        self._open_zone_watch(any(t.armed and (t.spec.calendars or t.spec.on_timezone_change)
                                  for t in self.timers.values()))
        if self.wake is not None:
            self.wake.cancel()
            self.wake = None
        if not due:
            return
        due.sort()
        wake, deadline = due[0]
        for elapse, latest in due[1:]:
            if elapse > deadline:
                break
            wake, deadline = elapse, min(deadline, latest)
        self.wake = self.daemon.call_later(max(0.0, wake - now_mono), self._elapse)

    def _elapse(self):
        self.wake = None
        now_wall, now_mono = time.time(), time.monotonic()
        due = [t for t in self.timers.values() if t.armed and t.next_mono is not None and t.next_mono <= now_mono + 0.001]
        for timer in sorted(due, key=lambda t: t.name):
            self.trigger(timer, now_wall, now_mono)
        self.replan()

    def trigger(self, timer, now_wall=None, now_mono=None):
        """An elapse: the service starts, unless it is active already."""
        now_wall, now_mono = now_wall or time.time(), now_mono or time.monotonic()
        cause = timer.next_cause or "start"
        if self.daemon.host.shutting_down:
            return                        # not a run missed: a Persistent= timer catches it up next time
        timer.triggered(now_wall, now_mono, self.started_mono)
        timer.stale = True
        self.daemon.store.mark_dirty()
        service = self.daemon.services.get(timer.spec.unit)
        late = (now_wall - timer.next_wall) if timer.next_wall is not None else 0.0
        if service is None or service.versions.removed:
            why = "%s is not deployed" % (timer.spec.unit + UNIT_SUFFIX)
        elif service_busy(service):
            why = "%s is still %s: no second run" % (timer.spec.unit + UNIT_SUFFIX, service.state)
        else:
            why = None
        self.daemon.events.record("elapsed", timer.name, reason="%s%s" % (cause, "; " + why if why else ""),
                                  after=timer.spec.unit + UNIT_SUFFIX)
        if why:
            self.daemon.log.info(timer.name, "Elapsed (%s): %s" % (cause, why))
            return
        self.daemon.log.info(timer.name, "Elapsed (%s, %.3fs after its time): starting %s" % (
            cause, max(0.0, late), timer.spec.unit + UNIT_SUFFIX))
        for pulled in self.daemon.dependencies.pulled_in([service.name]):
            pulled.start()
        service.start()

    def service_changed(self, service, before):
        """OnUnitActiveSec=/OnUnitInactiveSec= count from the service's last
        activation and deactivation."""
        was, now = before in ACTIVE_STATES, service.state in ACTIVE_STATES
        if was != now:
            active, inactive = self.unit_times.get(service.name, (None, None))
            if now:
                active = time.monotonic()
            else:
                inactive = time.monotonic()
            self.unit_times[service.name] = (active, inactive)
        counting = [t for t in self.timers_of.get(service.name, ()) if t.armed and
                    (t.spec.on_unit_active or t.spec.on_unit_inactive)]
        for timer in counting:
            timer.stale = True
        if counting:
            self.replan()             # OnUnit*Sec= count from here, or wait while it runs

    # -- wall-clock jumps --------------------------------------------------------------

    def _open_clock_watch(self, wanted):
        """A timerfd set far in the future with TFD_TIMER_CANCEL_ON_SET: the
        kernel makes it readable (read fails with ECANCELED) whenever the
        wall clock is set, so calendar timers are re-planned at once, and
        nothing wakes the loop otherwise."""
        if not wanted or self.clock_fd is not None:
            return
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK | TFD_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "timerfd_create")
            self.clock_fd = fd
            self._set_clock_watch()
            self.daemon.selector.register(fd, EVENT_READ, (self._clock_set, None))
        except (OSError, AttributeError) as exc:
            self.daemon.log.warning("daemon", "Wall-clock jumps are not watched (%s): calendar timers are "
                                    "re-planned at their next elapse" % exc)
            if self.clock_fd:
                os.close(self.clock_fd)
            self.clock_fd = False

    def _set_clock_watch(self):
        import ctypes
        spec = (ctypes.c_long * 4)(0, 0, int(time.time()) + 10 * 365 * 86400, 0)   # interval, value
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.timerfd_settime(self.clock_fd, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, spec, None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime")

    def _clock_set(self, _argument, _mask):
        try:
            os.read(self.clock_fd, 8)
        except OSError:
            pass                          # ECANCELED: the clock was set, which is what we came for
        try:
            self._set_clock_watch()
        except OSError as exc:
            self.daemon.log.warning("daemon", "Wall-clock jumps are no longer watched: %s" % exc)
            unregister_quietly(self.daemon.selector, self.clock_fd)
            os.close(self.clock_fd)
            self.clock_fd = False
        self.local = None                 # a new time zone is read with it
        now = time.time()
        for timer in self.timers.values():
            if timer.last_trigger is not None and timer.last_trigger > now:
                timer.last_trigger = now  # set back: a trigger "in the future" would hold calendars back
        self.daemon.log.info("daemon", "The wall clock was set: re-planning calendar timers")
        for timer in self.timers.values():
            if timer.armed and timer.spec.on_clock_change:
                self.trigger(timer)
        self.replan(everything=True)

    # -- time zone changes -------------------------------------------------------------

    def _open_zone_watch(self, wanted):
        """inotify on /etc for `localtime` (timedatectl, dpkg-reconfigure tzdata
        and `ln -sf` all replace it there): a new zone re-plans calendar timers
        and triggers OnTimezoneChange= ones."""
        if not wanted or self.zone_watch is not None:
            return
        self.zone_seen, self.local = _zone_file(), None     # read from here on, as the watch sees it
        watch = FolderWatcher({os.path.dirname(LOCALTIME): {os.path.basename(LOCALTIME)}}, self.daemon.selector,
                              self._zone_maybe_changed)
        try:
            watch.start()
            self.zone_watch = watch
        except (OSError, AttributeError) as exc:
            watch.close()
            self.daemon.log.warning("daemon", "Time zone changes are not watched (%s): OnTimezoneChange= does "
                                    "not trigger, and a new zone is read when the clock is set" % exc)
            self.zone_watch = False

    def _zone_maybe_changed(self):
        seen = _zone_file()
        if seen == self.zone_seen:
            return                        # touched, not changed
        self.zone_seen, self.local = seen, None
        time.tzset()                      # the daemon's own clock readings (its log, status) follow too
        self.daemon.log.info("daemon", "The time zone changed (%s): re-planning calendar timers" % (
            os.path.realpath(LOCALTIME) if seen else "no %s" % LOCALTIME))
        for timer in self.timers.values():
            if timer.armed and timer.spec.on_timezone_change:
                self.trigger(timer)
        self.replan(everything=True)

    def close(self):
        if self.zone_watch:
            self.zone_watch.close()
        if self.clock_fd:
            unregister_quietly(self.daemon.selector, self.clock_fd)
            os.close(self.clock_fd)
        self.clock_fd = None


# ---- sockets: services started at the first connection (SPEC §18) ----------------
# The daemon binds every socket of a deploy before any unit starts, and owns
# them: a service gets copies (fds 3 and up), so its crash, restart or
# redeploy closes none, and a client that connects meanwhile waits in the
# backlog for the next process. Across the daemon's own restart (shutdown
# --keep-services then daemon, an install, kill -9) a keeper holds them: a
# small process, started at the first bind, that keeps a copy of every
# listening socket and hands them to the next daemon over a Unix socket
# (SCM_RIGHTS). An exec of the new daemon would not cover a stop and a later
# start, nor kill -9; taking them back from the service (pidfd_getfd) finds
# nothing while the service is not running, and Yama may forbid it.

KEEPER_PROGRAM = r"""
import json, os, socket, sys
if os.fork():
    os._exit(0)
link, listener, held = socket.socket(fileno=3), socket.socket(fileno=4), {}
while True:
    if link is None:
        if not held:
            break
        link = listener.accept()[0]
        for name, (key, fds) in held.items():
            socket.send_fds(link, [json.dumps({"name": name, "key": key}).encode()], fds)
        link.send(b'{"end": true}')
    try:
        data, fds, _, _ = socket.recv_fds(link, 65536, 253)
        message = json.loads(data) if data else {}
    except (OSError, ValueError):
        data, fds, message = b"", [], {}
    if not data:
        link.close()
        link = None
        continue
    if message.get("op") == "quit":
        break
    for fd in held.pop(message.get("name"), (None, []))[1]:
        os.close(fd)
    if message.get("op") == "put":
        held[message["name"]] = (message.get("key"), fds)
try:
    os.unlink(sys.argv[1])
except OSError:
    pass
"""


class SocketKeeper:
    """The daemon's end of the keeper (KEEPER_PROGRAM): what it holds is
    told to it as it changes; at start-up, what an earlier daemon's keeper
    holds is taken over. Without one (a path too long, a failed start)
    sockets still work, but a daemon restart closes them: it says so."""

    def __init__(self, path, log):
        self.path, self.log = path, log
        self.link = None                  # SOCK_SEQPACKET to the keeper
        self.inherited = {}               # name -> (bind key, [fd]) an earlier daemon's keeper handed over
        self.told = {}                    # name -> (bind key, [socket]) the keeper holds for this daemon
        self.broken = None                # why there is no keeper

    def take_over(self):
        """At start-up: the sockets a keeper holds for an earlier daemon."""
        link = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            link.settimeout(5.0)
            link.connect(self.path)
            while True:
                data, fds, _, _ = socket.recv_fds(link, 65536, SOCKET_MAX_FDS, socket.MSG_CMSG_CLOEXEC)
                message = json.loads(data) if data else {"end": True}
                if message.get("end"):
                    break
                self.inherited[message["name"]] = (message.get("key"), fds)
            link.settimeout(None)
            self.link = link
            if self.inherited:
                self.log.info("daemon", "Sockets: took over %s from the keeper" % ", ".join(sorted(self.inherited)))
        except ConnectionRefusedError:
            link.close()
            _unlink_quietly(self.path)    # a keeper that is gone
        except (OSError, ValueError) as exc:
            link.close()
            if not isinstance(exc, FileNotFoundError):
                self.log.warning("daemon", "Sockets: cannot take over from the keeper at %s: %s" % (
                    self.path, describe_os_error(exc) if isinstance(exc, OSError) else exc))

    def adopt(self, name, key):
        """The sockets the keeper kept for `name`, if bound for `key`."""
        found = self.inherited.pop(name, None)
        if found is None:
            return None
        if found[0] != key:
            for fd in found[1]:
                os.close(fd)
            return None
        return [socket.socket(fileno=fd) for fd in found[1]]

    def put(self, name, key, sockets):
        self.told[name] = (key, list(sockets))
        self._send({"op": "put", "name": name, "key": key}, [s.fileno() for s in sockets])

    def drop(self, name):
        if self.told.pop(name, None) is not None and self.link is not None:
            self._send({"op": "drop", "name": name}, [])

    def _send(self, message, fds):
        """To the keeper, started (and told everything again) if it is not
        running: a keeper that died holds nothing of what it was told."""
        for attempt in range(2):
            if self.link is None:
                if not self._start():
                    return
                for name, (key, sockets) in self.told.items():
                    if name != message.get("name"):
                        self._send({"op": "put", "name": name, "key": key}, [s.fileno() for s in sockets])
                    if self.link is None:
                        return
            try:
                socket.send_fds(self.link, [json.dumps(message).encode()], fds)
                return
            except OSError as exc:
                self.log.warning("daemon", "Sockets: the keeper is gone (%s)%s" % (describe_os_error(exc), (
                    ": starting another" if attempt == 0 else ": a daemon restart would close the sockets")))
                self.link.close()
                self.link = None

    def _start(self):
        if self.broken:
            return False
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            _unlink_quietly(self.path)
            listener.bind(self.path)
            listener.listen(4)
            import fcntl
            high = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 5) for sock in (theirs, listener)]
            try:                          # (above 4: neither is the other's target)
                pid = os.posix_spawn(sys.executable, [sys.executable, "-I", "-S", "-c", KEEPER_PROGRAM, self.path],
                                     {"PATH": "/usr/bin:/bin"}, setsid=True,
                                     file_actions=[(os.POSIX_SPAWN_DUP2, high[0], 3),
                                                   (os.POSIX_SPAWN_DUP2, high[1], 4),
                                                   (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDWR, 0),
                                                   (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)])
            finally:
                for fd in high:
                    os.close(fd)
            os.waitpid(pid, 0)            # it forks the keeper and exits: the keeper is nobody's child
        except OSError as exc:
            ours.close()
            self.broken = "cannot start the socket keeper at %s: %s" % (self.path, describe_os_error(exc))
            self.log.warning("daemon", "Sockets: %s; a daemon restart will close the sockets" % self.broken)
            return False
        finally:
            listener.close()
            theirs.close()
        self.link = ours
        return True

    def close(self, keep):
        """The daemon stops: the keeper keeps the sockets for the next one
        (`keep`), or lets them go."""
        if self.link is not None and not keep:
            try:
                socket.send_fds(self.link, [b'{"op": "quit"}'], [])
            except OSError:
                pass                      # gone already: it holds nothing then
        if self.link is not None:
            self.link.close()
            self.link = None
        for _, fds in self.inherited.values():
            for fd in fds:
                os.close(fd)
        self.inherited = {}


def open_listener(spec, kind, text):
    """Bind and listen on one Listen*= address of `spec` (its options set):
    a socket, or OSError/SpawnError saying why not."""
    family, address = socket_address(text)
    sock_type = SOCKET_TYPES[kind]
    if family is None:                    # a bare port: IPv6 with IPv4 where the host has IPv6
        family, address = (socket.AF_INET6, ("::", address[1])) if socket.has_ipv6 and _has_ipv6() else \
            (socket.AF_INET, ("0.0.0.0", address[1]))
    sock = socket.socket(family, sock_type)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if spec.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if spec.free_bind:
                sock.setsockopt(socket.SOL_IP, 15, 1)                 # IP_FREEBIND
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(spec.bind_ipv6_only == "ipv6-only"))
            if spec.no_delay and sock_type == socket.SOCK_STREAM:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if spec.keep_alive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if spec.pass_credentials:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if family == socket.AF_UNIX and not address.startswith("\0"):
            _make_socket_path(spec, address)
            old_umask = os.umask(0o777 & ~spec.socket_mode)
            try:
                sock.bind(address)
            finally:
                os.umask(old_umask)
            os.chmod(address, spec.socket_mode)
            if spec.socket_user or spec.socket_group:     # the other stays root's, as systemd's
                import grp
                import pwd
                try:
                    os.chown(address, pwd.getpwnam(spec.socket_user).pw_uid if spec.socket_user else -1,
                             grp.getgrnam(spec.socket_group).gr_gid if spec.socket_group else -1)
                except KeyError as exc:
                    raise SpawnError("SocketUser=/SocketGroup=: %s" % exc.args[0]) from None
            for link in spec.symlinks:
                _unlink_quietly(link)
                os.symlink(address, link)
        else:
            sock.bind(address)
        if sock_type != socket.SOCK_DGRAM:
            sock.listen(min(spec.backlog, 2 ** 31 - 1))
        sock.setblocking(not spec.accept)     # Accept=yes: the daemon accepts; else the service's copy
        return sock
    except BaseException:
        sock.close()
        raise


def _has_ipv6():
    if "ipv6" not in _MACHINE:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
                probe.bind(("::1", 0))
            _MACHINE["ipv6"] = True
        except OSError:
            _MACHINE["ipv6"] = False
    return _MACHINE["ipv6"]


def _make_socket_path(spec, path):
    """The folder of a socket path (DirectoryMode=), and no stale socket in
    the way: one nobody listens on is removed, one in use is an error."""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        os.makedirs(folder, spec.directory_mode)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, "%s exists and is not a socket" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        _unlink_quietly(path)             # stale: nobody listens there
        return
    except OSError:
        _unlink_quietly(path)             # (a datagram socket, or a wrong type: bind says more)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "%s is in use by another process" % path)


class SocketUnit:
    """One deployed socket unit: its listening sockets, and what it counted."""

    def __init__(self, spec):
        self.spec, self.name = spec, spec.name
        self.sockets = []                 # bound, in Listen*= order ([]: not listening)
        self.key = None                   # the bind_key() they were bound for
        self.want = "up"                  # the user's intent (persisted): "down" after `stop NAME.socket`
        self.reason = None                # why it does not listen
        self.watching = False             # in the loop's selector: waiting for a connection
        self.rebind = False               # changed while its service held the old sockets: bind when it is gone
        self.commit = None                # sha of the commit its spec came from
        self.accepted_total = 0           # connections accepted (Accept=yes)
        self.triggers_total = 0           # activations of its service
        self.refused_total = 0            # connections closed at MaxConnections=/MaxConnectionsPerSource=
        self.trigger_times = []           # monotonic times of recent activations (TriggerLimit*=)
        self.last_trigger = None          # wall time of the last
        self.instances = {}               # Accept=yes: instance name -> the peer's address
        self.serial = 0                   # Accept=yes: numbers instances, as systemd's

    def state(self, services):
        if self.want != "up":
            return "stopped"
        if not self.sockets:
            return "inactive" if (self.reason or "").startswith("condition failed") else "failed"
        service = services.get(self.spec.unit)
        return "running" if not self.spec.accept and service is not None and service_busy(service) else "listening"

    def addresses(self):
        return ["%s %s" % (text, kind) for kind, text in self.spec.listen]

    def to_json(self, services):
        service = services.get(self.spec.unit)
        return {"name": self.name, "unit": self.spec.unit + UNIT_SUFFIX, "state": self.state(services),
                "want": self.want, "reason": self.reason, "listen": self.addresses(), "accept": self.spec.accept,
                "accepted_total": self.accepted_total, "connected": len(self.instances),
                "triggers_total": self.triggers_total, "refused_total": self.refused_total,
                "last_trigger": self.last_trigger, "description": self.spec.description, "path": self.spec.path,
                "fds": [s.fileno() for s in self.sockets], "fd_name": self.spec.fd_name,
                "max_connections": self.spec.max_connections,
                "service": {"state": service.state, "result": service.run.result, "pid": service.main.pid}
                if service is not None else None,
                "not_applied": [{"key": key, "value": value, "why": SOCKET_NOT_APPLIED[key]}
                                for key, value in self.spec.not_applied]}

    def persistent(self):
        return {"want": self.want, "commit": self.commit, "accepted_total": self.accepted_total,
                "triggers_total": self.triggers_total, "refused_total": self.refused_total, "serial": self.serial,
                "last_trigger": self.last_trigger}

    def restore(self, saved):
        if not isinstance(saved, dict):
            return
        if saved.get("want") in ("up", "down"):
            self.want = saved["want"]
        for field in ("accepted_total", "triggers_total", "refused_total", "serial"):
            if isinstance(saved.get(field), int) and saved[field] >= 0:
                setattr(self, field, saved[field])
        if isinstance(saved.get("last_trigger"), (int, float)):
            self.last_trigger = float(saved["last_trigger"])


class SocketSet:
    """Every socket unit of the deployment: bound at deploy, watched in the
    loop while their service is not running (Accept=no) or always
    (Accept=yes), and kept by the keeper across daemon restarts."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.units = {}                   # name (NAME.socket) -> SocketUnit
        self.saved = {}                   # name -> what the state file kept of sockets not deployed (yet)
        self.templates = {}               # NAME@ -> (path, sources, blob) Accept=yes instantiates
        self.given_to = {}                # service name -> [SocketUnit] whose sockets it gets
        self.keeper = SocketKeeper(os.path.join(daemon.config.home, "sockets.keep"), daemon.log)

    def restore(self, state):
        saved = state.get("sockets")
        if isinstance(saved, dict):
            self.saved = {name: entry for name, entry in saved.items() if isinstance(entry, dict)}
        if len(os.fsencode(self.keeper.path)) < 108:
            self.keeper.take_over()
        else:
            self.keeper.broken = "%s is longer than a Unix socket's path may be" % self.keeper.path

    def persistent(self):
        kept = dict(self.saved)
        kept.update({name: unit.persistent() for name, unit in self.units.items()})
        return kept

    # -- deploys -----------------------------------------------------------------

    def deploy(self, specs, commit, origin=None, templates=None):
        """The sockets of deployed commit `commit`: new ones are bound (or
        taken from the keeper), changed ones bound again if an address or a
        socket option changed, removed ones closed. Before any unit starts."""
        for name in [n for n in self.units if n not in specs]:
            self._close(self.units.pop(name), "Removed from the repository")
            self.saved.pop(name, None)
        for name, spec in sorted(specs.items()):
            unit = self.units.get(name)
            if unit is None:
                unit = self.units[name] = SocketUnit(spec)
                unit.restore(self.saved.pop(name, None))
            elif unit.spec.identity() != spec.identity():
                self.daemon.log.info(name, "Changed: %s" % ", ".join(spec.changed_keys(unit.spec)))
            unit.spec, unit.commit = spec, (origin or {}).get(name, commit)
            if unit.want == "up" and (not unit.sockets or unit.key != spec.bind_key()):
                self._bind(unit)
            elif unit.sockets:
                for sock in unit.sockets:
                    sock.setblocking(not spec.accept)
        self.templates = dict(templates or {})
        self.given_to = {}
        for unit in self.units.values():
            if not unit.spec.accept:
                self.given_to.setdefault(unit.spec.unit, []).append(unit)
        for service_name, service_spec in self.daemon.deployer.specs.items():    # Sockets=
            for name in service_spec.sockets:
                if name in self.units and not self.units[name].spec.accept and \
                        self.units[name] not in self.given_to.get(service_name, ()):
                    self.given_to.setdefault(service_name, []).append(self.units[name])
        for _, fds in self.keeper.inherited.values():   # what the last daemon had that this commit has not
            for fd in fds:
                os.close(fd)
        for name in list(self.keeper.inherited):
            self.keeper.drop(name)
        self.keeper.inherited = {}
        for unit in self.units.values():
            self._watch_if_idle(unit)

    def _held_by_service(self, unit):
        service = self.daemon.services.get(unit.spec.unit)
        return not unit.spec.accept and service is not None and service.has_process()

    def _bind(self, unit):
        """Listen (or take the keeper's sockets). An address the service
        still holds (a changed socket of a running service: its old
        sockets) is bound again once that process is gone."""
        spec = unit.spec
        held = bool(unit.sockets) and unit.key != spec.bind_key() and self._held_by_service(unit)
        unit.rebind = False
        self._close(unit, "Changed" if unit.sockets and unit.key != spec.bind_key() else None)
        failed = self.daemon.host.failed_condition(unit)
        if failed is not None:            # as systemd: the socket is not started, nothing failed
            key, negated, value = failed
            unit.reason = "condition failed: %s=%s%s" % (key, "!" if negated else "", value)
            self.daemon.log.info(unit.name, "Not listening: %s" % unit.reason)
            return False
        adopted = self.keeper.adopt(unit.name, spec.bind_key())
        if adopted is not None:
            unit.sockets, unit.key, unit.reason = adopted, spec.bind_key(), None
            for sock in adopted:
                sock.setblocking(not spec.accept)
            return True
        bound = []
        try:
            for kind, text in spec.listen:
                bound.append(open_listener(spec, kind, text))
        except (OSError, SpawnError) as exc:
            for sock in bound:
                sock.close()
            if held and getattr(exc, "errno", None) == errno.EADDRINUSE:
                unit.rebind, unit.reason = True, "bound again once %s has stopped" % (spec.unit + UNIT_SUFFIX)
                self.daemon.log.info(unit.name, "%s still holds %s: bound again once it has stopped" % (
                    spec.unit + UNIT_SUFFIX, text))
                return False
            unit.reason = "cannot listen on %s: %s" % (text, describe_os_error(exc) if isinstance(exc, OSError)
                                                     else exc)
            self.daemon.log.error(unit.name, sentence(unit.reason))
            self.daemon.events.record("state", unit.name, None, "failed", unit.reason, None, unit.commit)
            return False
        unit.sockets, unit.key, unit.reason = bound, spec.bind_key(), None
        self.daemon.log.info(unit.name, "Listening on %s" % ", ".join(unit.addresses()))
        self.keeper.put(unit.name, unit.key, bound)
        return True

    def _close(self, unit, why):
        """Stop listening: the sockets are closed (paths removed with
        RemoveOnStop=, or when the unit is gone from the repository)."""
        self._unwatch(unit)
        if unit.sockets:
            for sock in unit.sockets:
                sock.close()
            if why is not None:
                self.keeper.drop(unit.name)
                if (unit.spec.remove_on_stop and why != "Changed") or why.startswith("Removed"):
                    for kind, text in unit.spec.listen:
                        if text.startswith("/"):
                            _unlink_quietly(text)
                    for link in unit.spec.symlinks:
                        _unlink_quietly(link)
                self.daemon.log.info(unit.name, "%s: closed %s" % (why, ", ".join(unit.addresses())))
        unit.sockets, unit.key = [], None

    # -- start and stop ----------------------------------------------------------

    def start(self, name):
        unit = self.units[name]
        unit.want, unit.trigger_times = "up", []
        if not unit.sockets:
            self._bind(unit)
        self._watch_if_idle(unit)
        self.daemon.store.mark_dirty()

    def stop(self, name):
        unit = self.units[name]
        unit.want, unit.reason = "down", "stopped by user"
        self._close(unit, "Stopped")
        self.daemon.store.mark_dirty()

    # -- the loop ----------------------------------------------------------------

    def _watch_if_idle(self, unit):
        """Wait for a connection, unless its service is running (Accept=no:
        the service has the sockets then)."""
        if unit.watching or not unit.sockets or unit.want != "up" or self.daemon.host.shutting_down:
            return
        service = self.daemon.services.get(unit.spec.unit)
        if not unit.spec.accept and service is not None and service_busy(service):
            return
        for sock in unit.sockets:
            self.daemon.selector.register(sock, EVENT_READ, (self._ready, unit))
        unit.watching = True

    def _unwatch(self, unit):
        if unit.watching:
            for sock in unit.sockets:
                unregister_quietly(self.daemon.selector, sock)
            unit.watching = False

    def _ready(self, unit, _mask):
        if self.daemon.host.shutting_down:
            self._unwatch(unit)           # clients wait in the backlog for the next daemon
            return
        if unit.spec.accept:
            return self._accept(unit)
        self._unwatch(unit)
        if self._trigger_limit_hit(unit):
            return
        service = self.daemon.services.get(unit.spec.unit)
        if service is None or service.versions.removed:
            return
        self.daemon.log.info(unit.name, "Incoming traffic: starting %s" % (unit.spec.unit + UNIT_SUFFIX))
        self.daemon.events.record("triggered", unit.name, reason="incoming traffic", after=unit.spec.unit + UNIT_SUFFIX)
        for pulled in self.daemon.dependencies.pulled_in([service.name]):
            pulled.start()
        service.start()
        if not service_busy(service):     # it would not start (a start limit, a condition): look again later
            self.daemon.log.warning(unit.name, "%s did not start (%s): listening again in 1s" % (
                unit.spec.unit + UNIT_SUFFIX, service.reason or service.state))
            self.daemon.call_later(1.0, lambda: self._watch_if_idle(unit))

    def _trigger_limit_hit(self, unit):
        """TriggerLimitIntervalSec=/TriggerLimitBurst=: a service that keeps
        being started and stopping at once puts its socket in failure, as
        systemd does, rather than spinning."""
        now = time.monotonic()
        unit.trigger_times = [t for t in unit.trigger_times if now - t < unit.spec.trigger_interval] + [now]
        unit.triggers_total += 1
        unit.last_trigger = time.time()
        self.daemon.store.mark_dirty()
        if unit.spec.trigger_interval and len(unit.trigger_times) > unit.spec.burst:
            self._close(unit, "Trigger limit hit")
            unit.reason = "trigger limit hit: %d activations within %s (TriggerLimitBurst=, " \
                          "TriggerLimitIntervalSec=); `start %s` listens again" % (
                              len(unit.trigger_times), format_timespan(unit.spec.trigger_interval), unit.name)
            self.daemon.log.error(unit.name, unit.reason)
            self.daemon.events.record("state", unit.name, "listening", "failed", unit.reason, None, unit.commit)
            return True
        return False

    def _accept(self, unit):
        for sock in list(unit.sockets):
            for _ in range(64):           # a turn's worth; the rest on the next
                try:
                    connection, peer = sock.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    break
                except OSError as exc:    # EMFILE, ENOBUFS: no more now; the socket stays readable
                    self.daemon.log.warning(unit.name, "Cannot accept a connection (%s): again in 1s" % (
                        describe_os_error(exc)))
                    self._unwatch(unit)
                    self.daemon.call_later(1.0, lambda: self._watch_if_idle(unit))
                    return
                self._connection(unit, connection, peer)
                if not unit.sockets:
                    return                # the trigger limit closed them

    def _connection(self, unit, connection, peer):
        spec = unit.spec
        source = peer[0] if isinstance(peer, tuple) else None
        per_source = spec.max_per_source or spec.max_connections
        if len(unit.instances) >= spec.max_connections or (source is not None and sum(
                1 for other in unit.instances.values() if other[0] == source) >= per_source):
            unit.refused_total += 1
            connection.close()
            self.daemon.log.warning(unit.name, "Too many connections (MaxConnections=%d, MaxConnectionsPerSource=%d): "
                                    "closed one from %s" % (spec.max_connections, per_source, source or "a local peer"))
            return
        if self._trigger_limit_hit(unit):
            connection.close()
            return
        name = "%s%d" % (spec.unit, unit.serial)
        unit.serial += 1
        path, sources, blob = self.templates[spec.unit]
        instance, problems = parse_unit(name, path, sources, blob, self.daemon.deployer.context)
        if instance is None:
            connection.close()
            self.daemon.log.error(unit.name, "Cannot make %s: %s" % (name, "; ".join(
                str(d) for d in problems if d.severity == "error")))
            return
        unit.accepted_total += 1
        env = {"REMOTE_ADDR": peer[0], "REMOTE_PORT": str(peer[1])} if isinstance(peer, tuple) else {}
        service = Service(self.daemon.host, instance, unit.commit, connection=(connection, env), log_name=spec.unit)
        unit.instances[name] = (source, peer)
        self.daemon.services[name] = service
        self.daemon.events.record("accepted", unit.name, reason="from %s" % (
            "%s:%s" % peer[:2] if isinstance(peer, tuple) else "a local peer"), after=name + UNIT_SUFFIX)
        service.start()
        if not service_busy(service):     # it would not start (a condition, a dependency): the client is told
            self.daemon.log.warning(name, "Did not start (%s): connection closed" % (service.reason or service.state))
            service.give_connection()
            unit.instances.pop(name, None)
            self._forget(service)

    def listening_for(self, service):
        """(fds, names, connection, environment) a main process of
        `service` gets (SPEC §18), or None."""
        if service.log_name != service.name:            # an Accept=yes instance
            if service.connection is None:
                return None               # restarted: its connection went with its first process
            connection, env = service.connection
            return [connection.fileno()], ["connection"], connection.fileno(), env
        for unit in self.given_to.get(service.name, ()):
            if unit.rebind and unit.want == "up":
                self._bind(unit)          # the process that held the old sockets is gone
        units = [u for u in self.given_to.get(service.name, ()) if u.sockets]
        if not units:
            return None
        fds, names = [], []
        for unit in units:
            fds += [s.fileno() for s in unit.sockets]
            names += [unit.spec.fd_name] * len(unit.sockets)
        return fds, names, None, {}

    def service_changed(self, service, before):
        """A service that stopped gives its sockets back to the loop; an
        Accept=yes instance that is done is forgotten."""
        if service_busy(service):         # its own sockets are its to read now
            for unit in self.given_to.get(service.name, ()):
                if unit.spec.unit == service.name:
                    self._unwatch(unit)
            return
        for unit in self.given_to.get(service.name, ()):
            if unit.rebind and unit.want == "up":
                self._bind(unit)
            self._watch_if_idle(unit)
        if service.log_name != service.name:            # an Accept=yes instance
            service.give_connection()
            for unit in self.units.values():
                if unit.instances.pop(service.name, None) is not None:
                    break
            self.daemon.call_later(0, lambda: self._forget(service))

    def _forget(self, service):
        if self.daemon.services.get(service.name) is service and not service_busy(service):
            del self.daemon.services[service.name]
            service.discard()

    def close(self, keep):
        """The daemon stops: with `keep` (services keep running) the keeper
        keeps every socket for the next daemon; otherwise they are closed."""
        for unit in self.units.values():
            self._unwatch(unit)
            if not keep:
                self._close(unit, "The daemon stops")
            for sock in unit.sockets:
                sock.close()
            unit.sockets = []
        self.keeper.close(keep)


# ==== 14. control protocol ===================================================
# One JSON object per line each way over a Unix stream socket. The server side
# lives in the daemon's loop (non-blocking sockets, no thread per client); the
# client side is one blocking round trip.


def encode_message(payload):
    return json.dumps(payload, separators=(",", ":")).encode() + b"\n"


class Connection:
    """One client of a server in the daemon's loop, the control socket's or
    the HTTP listener's: its socket, its two buffers, what the selector
    watches for, and what each protocol keeps of it."""
    __slots__ = ("sock", "fd", "inbuf", "outbuf", "last_active", "events", "reading", "closing",
                 "waiting", "following", "started", "continued")

    def __init__(self, sock):
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()          # bytes received, not yet a whole request
        self.outbuf = bytearray()         # reply bytes the socket has not taken yet
        self.last_active = time.monotonic()
        self.events = EVENT_READ          # what the selector watches for it (0: nothing)
        self.reading = True               # False after EOF or a refusal: answer, then close
        self.closing = False              # close once the reply is sent
        self.waiting = None               # control: the Waiter holding this client's reply
        self.following = False            # control: `events -f`, events pushed to it as they come
        self.started = None               # HTTP: monotonic time the request being read began
        self.continued = False            # HTTP: "100 Continue" sent for the request being read


class StreamServer:
    """A non-blocking stream server in the daemon's loop: it accepts up to
    MAX_CLIENTS, keeps its Connections, reads and sends for them, watches
    each for what it waits for, sweeps every SWEEP_EVERY seconds, and closes.
    A protocol (ControlServer, HttpListener) adds accepted(conn),
    received(conn, data) (data b"" at EOF), writable(conn), sweep(conn, now)
    and, optionally, closed(conn)."""
    MAX_CLIENTS = 64
    SWEEP_EVERY = 1.0
    WHAT = "a client"                     # for the log
    LOG_REFUSALS = True                   # a client refused for MAX_CLIENTS is logged

    def __init__(self, log, selector, call_later):
        self.log, self.selector, self.call_later = log, selector, call_later
        self.listener = None
        self.connections = {}             # socket fd -> Connection
        self.sweep_timer = None

    def listen(self, listener):
        listener.setblocking(False)
        self.listener = listener
        self.selector.register(listener, EVENT_READ, (self._accept, None))

    def close(self):
        for conn in list(self.connections.values()):
            self._close(conn)
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None

    def _accept(self, _arg, _mask):
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.log.warning("daemon", "Accepting %s failed: %s" % (self.WHAT, exc.strerror))
            return
        if len(self.connections) >= self.MAX_CLIENTS:
            if self.LOG_REFUSALS:
                self.log.warning("daemon", "Refused %s: %d connections already" % (self.WHAT, self.MAX_CLIENTS))
            sock.close()
            return
        sock.setblocking(False)
        conn = Connection(sock)
        self.connections[conn.fd] = conn
        self.selector.register(sock, conn.events, (self._on_event, conn))
        if self.sweep_timer is None:
            self.sweep_timer = self.call_later(self.SWEEP_EVERY, self._sweep)
        self.accepted(conn)

    def _sweep(self):
        self.sweep_timer = None
        now = time.monotonic()
        for conn in list(self.connections.values()):
            self.sweep(conn, now)
        if self.connections:
            self.sweep_timer = self.call_later(self.SWEEP_EVERY, self._sweep)

    def _on_event(self, conn, mask):
        try:
            if mask & EVENT_WRITE:
                self.writable(conn)
            if not mask & EVENT_READ or not self._alive(conn) or not conn.reading:
                return
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if data:
                conn.last_active = time.monotonic()
            self.received(conn, data)
        except Exception:
            self._close(conn)             # never leave a client waiting on a broken exchange
            raise

    def _send(self, conn):
        """Send what the socket takes of conn.outbuf: False if that closed it."""
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return False
            if sent:
                del conn.outbuf[:sent]
                conn.last_active = time.monotonic()
        return True

    def _watch(self, conn, reading):
        """Watch for reads when `reading`, for writes while a reply waits."""
        events = (EVENT_READ if reading else 0) | (EVENT_WRITE if conn.outbuf else 0)
        if events != conn.events:
            if not conn.events:
                self.selector.register(conn.sock, events, (self._on_event, conn))
            elif not events:
                self.selector.unregister(conn.sock)
            else:
                self.selector.modify(conn.sock, events, (self._on_event, conn))
            conn.events = events

    def _alive(self, conn):
        """`conn` is still served (its fd number may since belong to another)."""
        return self.connections.get(conn.fd) is conn

    def _close(self, conn):
        if not self._alive(conn):
            return                        # closed already: its fd number may be another client's now
        del self.connections[conn.fd]
        if conn.events:
            self.selector.unregister(conn.sock)
        conn.events = 0
        self.closed(conn)
        conn.sock.close()

    def accepted(self, conn):
        """A protocol's look at a new connection (the peer's credentials)."""

    def closed(self, conn):
        """A protocol's own cleanup of a connection being closed."""


class Waiter:
    """A reply that waits for services to reach a state: `check()` returns the
    reply once it can be given, else None; `expire()` gives the reply at the deadline."""
    __slots__ = ("conn", "check", "expire", "timer")

    def __init__(self, conn, check, expire):
        self.conn, self.check, self.expire, self.timer = conn, check, expire, None


class ControlServer(StreamServer):
    """The daemon's end of the control socket: listening (0600, or 0660 for
    socket_group), peer credentials, framing, the bounds (request size,
    clients silent too long, replies left unread, the number of clients) and
    replies parked until services reach a state (waiters). Each request goes
    to dispatch(conn, message), which returns the reply, or None when it
    parked it with park()."""
    MAX_CLIENTS = MAX_CONNECTIONS
    SWEEP_EVERY = REQUEST_IDLE_TIMEOUT / 2

    def __init__(self, config, log, selector, call_later, dispatch):
        super().__init__(log, selector, call_later)
        self.config = config
        self.dispatch = dispatch
        self.socket_gid = None
        self.waiters = []                 # parked replies
        self.on_close = None              # on_close(conn) for a closed follower (EventLog.unfollow)

    # -- listening ---------------------------------------------------------------------

    def open(self):
        path = self.config.socket_path
        if len(path.encode()) > MAX_SOCKET_PATH:
            raise ConfigError("socket path %s is %d bytes; Unix sockets allow %d: choose a shorter --home or socket_path" % (
                path, len(path.encode()), MAX_SOCKET_PATH))
        makedirs(os.path.dirname(path))
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise GitprocError("%s exists and is not a socket; move it away or choose another socket_path" % path)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)            # stale: nothing listens there any more
                self.log.info("daemon", "Removed stale socket %s" % path)
            except OSError as exc:
                raise GitprocError("cannot tell whether %s is in use (%s); remove it if no daemon runs" % (
                    path, exc.strerror or exc))
            else:
                raise GitprocError("another gitproc daemon answers on %s" % path)
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)       # the socket is born 0600: no window where others may connect
        try:
            listener.bind(path)
        except OSError as exc:
            listener.close()
            raise GitprocError("cannot listen on %s: %s" % (path, exc.strerror))
        finally:
            os.umask(old_umask)
        if self.config.socket_group:
            import grp
            try:
                self.socket_gid = grp.getgrnam(self.config.socket_group).gr_gid
                os.chown(path, -1, self.socket_gid)
                os.chmod(path, 0o660)
            except KeyError:
                listener.close()
                raise ConfigError("socket_group %r: no such group" % self.config.socket_group)
            except OSError as exc:
                listener.close()
                raise ConfigError("socket_group %r: cannot give the socket to it: %s" % (self.config.socket_group, exc.strerror))
        listener.listen(128)
        self.listen(listener)

    def close(self):
        had = self.listener is not None
        super().close()
        if had:
            _unlink_quietly(self.config.socket_path)

    def accepted(self, conn):
        credentials = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer_pid, peer_uid, peer_gid = struct.unpack("3i", credentials)
        if not self._peer_allowed(peer_pid, peer_uid, peer_gid):
            self.log.warning("daemon", "Refused a client with uid %d (pid %d)" % (peer_uid, peer_pid))
            self._refuse(conn, "permission denied: uid %d may not control this daemon" % peer_uid)

    def _peer_allowed(self, pid, uid, gid):
        if uid in (0, os.geteuid()):
            return True
        if self.socket_gid is None:
            return False
        if gid == self.socket_gid:
            return True
        try:
            with open("/proc/%d/status" % pid) as status:
                for line in status:
                    if line.startswith("Groups:"):
                        return str(self.socket_gid) in line.split()[1:]
        except OSError:
            pass
        return False

    def sweep(self, conn, now):
        """Close a client that sent half a request and went quiet."""
        if conn.waiting is None and not conn.following and now - conn.last_active > REQUEST_IDLE_TIMEOUT:
            self._close(conn)

    # -- framing -----------------------------------------------------------------------

    def writable(self, conn):
        self._flush(conn)
        if self._alive(conn) and len(conn.outbuf) < MAX_PENDING_REPLY:
            self._process_input(conn)     # requests held back while replies piled up

    def received(self, conn, data):
        if not data:
            # EOF: the client sent all it will (maybe with shutdown(SHUT_WR));
            # the requests it sent are still answered, then the socket closes.
            conn.reading = False
            self._process_input(conn)
            return
        conn.inbuf += data
        if conn.waiting is not None and len(conn.inbuf) > MAX_REQUEST_BYTES:
            self._close(conn)             # flooding while its answer waits
            return
        self._process_input(conn)

    def _process_input(self, conn):
        """Answer the complete requests received, one at a time (a parked reply
        holds the next ones back), then settle what to watch for."""
        while conn.waiting is None and self._alive(conn) and len(conn.outbuf) < MAX_PENDING_REPLY:
            newline = conn.inbuf.find(b"\n")
            if newline < 0 and conn.reading and len(conn.inbuf) > MAX_REQUEST_BYTES:
                self._refuse(conn, "request larger than %d bytes" % MAX_REQUEST_BYTES)
                return
            if newline < 0:
                break
            line = bytes(conn.inbuf[:newline])
            del conn.inbuf[:newline + 1]
            if len(line) > MAX_REQUEST_BYTES:
                self._refuse(conn, "request larger than %d bytes" % MAX_REQUEST_BYTES)
                return
            if line.strip():
                reply = self._handle_line(conn, line)
                if reply is not None:
                    conn.outbuf += encode_message(reply)
        self._flush(conn)

    def _handle_line(self, conn, line):
        """One request -> a reply dict, or None when the reply was parked. The
        catch-all boundary of a request: a bug answers with an error."""
        try:
            message = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return {"ok": False, "error": "malformed request (one JSON object per line): %s" % exc}
        if not isinstance(message, dict) or not isinstance(message.get("cmd"), str):
            return {"ok": False, "error": "malformed request: expected {\"cmd\": \"...\", ...}"}
        try:
            return self.dispatch(conn, message)
        except GitprocError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception:
            import traceback
            self.log.error("daemon", "Request %r failed: %s" % (message["cmd"][:64], traceback.format_exc().strip().replace("\n", " | ")))
            return {"ok": False, "error": "internal error handling %r (see the daemon log)" % message["cmd"][:64]}

    def _refuse(self, conn, error):
        """Answer with an error, read nothing more, close once it is sent."""
        conn.reading = False
        conn.inbuf.clear()
        conn.outbuf += encode_message({"ok": False, "error": error})
        self._flush(conn)

    def _flush(self, conn):
        """Write what the socket takes; watch for writability while some is left;
        close when nothing more will be read or written."""
        if not self._alive(conn) or not self._send(conn):
            return
        if not conn.reading and not conn.outbuf and conn.waiting is None and b"\n" not in conn.inbuf:
            self._close(conn)
            return
        # A client that does not read its replies is not read from either, so
        # neither buffer grows without bound (its socket fills and it blocks).
        self._watch(conn, conn.reading and len(conn.outbuf) < MAX_PENDING_REPLY)

    def closed(self, conn):
        if conn.following and self.on_close is not None:
            self.on_close(conn)
        if conn.waiting is not None and conn.waiting in self.waiters:
            self.waiters.remove(conn.waiting)
            conn.waiting.timer.cancel()
        conn.waiting = None

    def push(self, conn, line, on_drop):
        """Send a line the client did not ask for (a followed event). A client
        that lets MAX_PENDING_REPLY of them pile up unread is dropped, so a
        follower that stopped reading never grows the daemon."""
        if not self._alive(conn):
            on_drop(conn)
            return
        conn.outbuf += line
        if len(conn.outbuf) > MAX_PENDING_REPLY:
            self.log.warning("daemon", "Dropped an events follower: %d bytes unread" % len(conn.outbuf))
            on_drop(conn)
            self._close(conn)
            return
        self._flush(conn)

    # -- parked replies ----------------------------------------------------------------

    def park(self, conn, check, expire, timeout):
        """The reply check() gives now, or None: then check() is asked again
        after each change (check_waiters) and expire() answers at the deadline."""
        reply = check()
        if reply is not None:
            return reply
        waiter = Waiter(conn, check, expire)
        waiter.timer = self.call_later(timeout, lambda: self._finish_waiter(waiter, waiter.expire()))
        conn.waiting = waiter
        self.waiters.append(waiter)
        return None

    def check_waiters(self):
        for waiter in list(self.waiters):
            reply = waiter.check()
            if reply is not None:
                self._finish_waiter(waiter, reply)

    def _finish_waiter(self, waiter, reply):
        if waiter in self.waiters:
            self.waiters.remove(waiter)
        if waiter.timer:
            waiter.timer.cancel()
        waiter.conn.waiting = None
        if self._alive(waiter.conn):
            waiter.conn.outbuf += encode_message(reply)
            self._process_input(waiter.conn)


class EventLog:
    """The last EVENT_LIMIT events of the daemon, and the clients following
    them (`events -f`). An event is one dict with a fixed schema:
    time, unit, event (state, health, deploy, rollback), from, to, reason,
    pid, commit; fields that do not apply are None."""

    FIELDS = ("time", "unit", "event", "from", "to", "reason", "pid", "commit")

    def __init__(self, server, store=None):
        import collections
        self.ring = collections.deque(maxlen=EVENT_LIMIT)
        self.server = server              # ControlServer: where followers are
        server.on_close = self.unfollow
        self.followers = {}               # Connection -> set of unit names (empty: all)
        self.store = store                # StateStore of events.json: the ring outlives the daemon
        self.listener = None              # told of each event as it happens (the Alerter)

    def restore(self):
        """The events an earlier daemon kept (a missing or corrupt file: none)."""
        saved = self.store.load().get("events")
        if isinstance(saved, list):
            self.ring.extend(entry for entry in saved
                             if isinstance(entry, dict) and set(entry) == set(self.FIELDS))

    def persistent(self):
        return {"version": STATE_VERSION, "events": list(self.ring)}

    def record(self, event, unit=None, before=None, after=None, reason=None, pid=None, commit=None):
        entry = {"time": time.time(), "unit": unit, "event": event, "from": before, "to": after,
                 "reason": reason, "pid": pid, "commit": commit}
        self.ring.append(entry)
        if self.listener is not None:
            self.listener(entry)
        if self.store is not None:
            self.store.mark_dirty()       # written in the loop's batches, like the state
        if self.followers:
            line = encode_message({"event": entry})
            for conn, names in list(self.followers.items()):
                if not names or unit in names:
                    self.server.push(conn, line, self.unfollow)

    def recent(self, names=()):
        return [entry for entry in self.ring if not names or entry["unit"] in names]

    def follow(self, conn, names):
        self.followers[conn] = set(names)
        conn.following = True

    def unfollow(self, conn):
        self.followers.pop(conn, None)


def _connect(config, timeout):
    """A client socket connected to the daemon; GitprocError saying why not."""
    path = config.socket_path
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ConfigError("socket path %s is %d bytes; Unix sockets allow %d: choose a shorter --home or socket_path" % (
            path, len(path.encode()), MAX_SOCKET_PATH))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        client.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        client.close()
        raise DaemonNotRunning("no gitproc daemon answers on %s; start one with: %s daemon%s" % (
            path, command_name(), " --home %s" % config.home if config.home and not _home_from_env(config) else ""))
    except PermissionError:
        client.close()
        try:
            os.stat(path)
        except PermissionError:           # not the socket: a folder on its way is closed to this user
            raise GitprocError("permission denied on the folder of %s: this user cannot reach a daemon there, nor "
                               "run one (choose a --home of your own)" % path)
        except OSError:
            pass
        raise GitprocError("permission denied on %s: run as the daemon's user, root, or a member of its socket_group" % path)
    except socket.timeout:
        client.close()
        raise GitprocError("the daemon did not answer within %ds" % timeout)
    except OSError as exc:
        client.close()
        raise GitprocError("cannot connect to %s: %s" % (path, exc.strerror or exc))
    return client


def command_name():
    """How the user runs gitproc, for the commands messages suggest: the
    installed `gitproc`, else the script."""
    return "gitproc" if os.path.basename(sys.argv[0] or "") == "gitproc" else "python3 gitproc.py"


def _result(message):
    if not message.get("ok"):
        raise GitprocError(message.get("error", "the daemon refused the request"))
    return message.get("result")


def request(config, payload, timeout=CLIENT_TIMEOUT):
    """Send one request to the daemon and return its result; GitprocError with
    the daemon's message when it answers with an error."""
    client = _connect(config, timeout)
    try:
        client.sendall(encode_message(payload))
        reply = bytearray()
        while not reply.endswith(b"\n"):
            chunk = client.recv(1 << 20)
            if not chunk:
                raise ProtocolError("the daemon closed the connection without answering")
            reply += chunk
    except socket.timeout:
        raise GitprocError("the daemon did not answer within %ds" % timeout)
    except (ConnectionResetError, BrokenPipeError):
        raise ProtocolError("the daemon closed the connection without answering")
    finally:
        client.close()
    return _result(json.loads(reply.decode("utf-8")))


def request_stream(config, payload):
    """Send one request, yield its result, then each message the daemon pushes
    after it (`events -f`), until the daemon closes the connection."""
    client = _connect(config, CLIENT_TIMEOUT)
    try:
        client.sendall(encode_message(payload))
        reader = client.makefile("rb")
        first = reader.readline()
        if not first:
            raise ProtocolError("the daemon closed the connection without answering")
        yield _result(json.loads(first.decode("utf-8")))
        client.settimeout(None)
        for line in reader:
            yield json.loads(line.decode("utf-8"))
    except socket.timeout:
        raise GitprocError("the daemon did not answer within %ds" % CLIENT_TIMEOUT)
    except (ConnectionResetError, BrokenPipeError):
        raise ProtocolError("the daemon closed the connection")
    finally:
        client.close()


def _home_from_env(config):
    return os.environ.get("GITPROC_HOME") and os.path.abspath(os.environ["GITPROC_HOME"]) == config.home


# ==== 15. HTTP ===============================================================
# Optional (http_listen): /metrics, /status, /healthz, the status page and
# signed push webhooks, served from the daemon's loop.


# ---- the HTTP listener: /metrics, /status, /healthz, signed push webhooks ----------
# Optional (http_listen). A small HTTP/1.1 server in the daemon's loop, with
# bounds like the control socket's: header and body sizes, a deadline for a
# whole request (slowloris), idle keep-alive connections closed, a cap on
# clients. It only parses and frames; HttpRoutes answers.

MAX_HTTP_HEADER_BYTES = 16 * 1024
MAX_HTTP_BODY_BYTES = 1024 * 1024          # a forge's push payload fits
MAX_HTTP_CONNECTIONS = 64
HTTP_REQUEST_TIMEOUT = 5.0                 # to send one whole request (slowloris), or to idle between
HTTP_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
                404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
                413: "Payload Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
                501: "Not Implemented",
                503: "Service Unavailable", 505: "HTTP Version Not Supported"}


class HttpRequest:
    __slots__ = ("method", "path", "version", "headers", "body")

    def __init__(self, method, path, version, headers, body):
        self.method, self.path, self.version, self.headers, self.body = method, path, version, headers, body


def parse_listen_address(text):
    """'127.0.0.1:9180', '[::1]:9180', ':9180' -> (family, (host, port)); ConfigError if not."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("http_listen %r: use HOST:PORT, e.g. 127.0.0.1:9180" % text)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), int(port))


def is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


class HttpListener(StreamServer):
    """The daemon's HTTP server: accept, read one request at a time per
    connection (keep-alive), answer with reply(request) -> (status, content
    type, body bytes, extra headers), and hold every bound."""
    MAX_CLIENTS = MAX_HTTP_CONNECTIONS
    WHAT = "an HTTP client"
    LOG_REFUSALS = False                  # reachable from the network: refusals must not flood daemon.log

    def __init__(self, address, log, selector, call_later, reply):
        super().__init__(log, selector, call_later)
        self.family, self.address = address
        self.reply = reply

    @property
    def exposed(self):
        """Reachable from the network (not only from this machine)."""
        return not is_loopback(self.address[0])

    def open(self):
        listener = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(self.address)
            listener.listen(64)
        except OSError as exc:
            listener.close()
            raise GitprocError("http_listen %s:%d: cannot listen: %s" % (self.address[0], self.address[1], exc.strerror or exc))
        self.listen(listener)
        if self.exposed:
            self.log.warning("daemon", "HTTP listener on %s:%d is reachable from the network: /metrics and /status "
                             "tell anyone who can connect what runs here" % self.address)
        else:
            self.log.info("daemon", "HTTP listener on %s:%d" % self.address)

    def sweep(self, conn, now):
        """Close a connection too slow to send one request, idle too long, or
        whose answer is not read: no client holds a slot for ever."""
        if conn.outbuf or conn.closing:
            if now - conn.last_active > HTTP_REQUEST_TIMEOUT:
                self._close(conn)         # the answer is not read
        elif conn.started is not None and now - conn.started > HTTP_REQUEST_TIMEOUT:
            self._answer(conn, 408, "text/plain", b"request not received in time\n", close=True)
        elif now - conn.last_active > HTTP_REQUEST_TIMEOUT:
            self._close(conn)

    def writable(self, conn):
        self._flush(conn)

    def received(self, conn, data):
        if conn.closing:
            return
        if not data:
            self._close(conn)
            return
        if conn.started is None:
            conn.started = conn.last_active
        conn.inbuf += data
        self._serve(conn)

    def _serve(self, conn):
        """Answer one request, if a whole one is in: a client that pipelines
        many gets the next one answered on the next turn of the loop, so it
        never holds the daemon for longer than one answer."""
        if conn.closing or conn.outbuf or not self._alive(conn):
            self._watch_http(conn)
            return
        request, error = self._parse(conn)
        if error:
            self._answer(conn, error[0], "text/plain", (error[1] + "\n").encode(), close=True)
            return
        if request is None:
            self._watch_http(conn)        # wait for more bytes
            return
        conn.started = time.monotonic() if conn.inbuf else None
        try:
            status, content_type, body, extra = self.reply(request)
        except Exception:
            import traceback
            self.log.error("daemon", "HTTP %s %s failed: %s" % (request.method, request.path[:100],
                           traceback.format_exc().strip().replace("\n", " | ")))
            status, content_type, body, extra = 500, "text/plain", b"internal error (see the daemon log)\n", {}
        tokens = {token.strip().lower() for token in request.headers.get("connection", "").split(",")}
        close = "close" in tokens or (request.version == "HTTP/1.0" and "keep-alive" not in tokens)
        self._answer(conn, status, content_type, body, close=close, head=request.method == "HEAD", extra=extra)

    @staticmethod
    def _parse(conn):
        """(HttpRequest, None) once a whole request is in, (None, None) while
        it is not, (None, (status, why)) for one that is refused."""
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbuf) > MAX_HTTP_HEADER_BYTES:
                return None, (431, "request headers larger than %d bytes" % MAX_HTTP_HEADER_BYTES)
            return None, None
        if end > MAX_HTTP_HEADER_BYTES:
            return None, (431, "request headers larger than %d bytes" % MAX_HTTP_HEADER_BYTES)
        lines = bytes(conn.inbuf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not re.match(r"[A-Z]+\Z", parts[0]) or not parts[1].startswith("/"):
            return None, (400, "malformed request line")
        method, target, version = parts
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            return None, (505, "HTTP/1.0 or HTTP/1.1 only")
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                return None, (400, "malformed header line")
            name = name.lower()
            if name == "content-length" and name in headers and headers[name] != value.strip():
                return None, (400, "conflicting Content-Length headers")
            headers[name] = value.strip()
        if "transfer-encoding" in headers:
            return None, (501, "Transfer-Encoding is not supported: send a Content-Length")
        length = headers.get("content-length", "0")
        if not re.match(r"[0-9]{1,9}\Z", length):
            return None, (400, "bad Content-Length")
        length = int(length)
        if length > MAX_HTTP_BODY_BYTES:
            return None, (413, "request body larger than %d bytes" % MAX_HTTP_BODY_BYTES)
        if len(conn.inbuf) < end + 4 + length:
            if headers.get("expect", "").lower() == "100-continue" and not conn.continued:
                conn.continued = True
                conn.outbuf += b"HTTP/1.1 100 Continue\r\n\r\n"
            return None, None
        body = bytes(conn.inbuf[end + 4:end + 4 + length])
        del conn.inbuf[:end + 4 + length]
        conn.continued = False
        return HttpRequest(method, target.split("?", 1)[0], version, headers, body), None

    def _answer(self, conn, status, content_type, body, close=False, head=False, extra=None):
        if conn.closing:
            return
        head_lines = ["HTTP/1.1 %d %s" % (status, HTTP_REASONS.get(status, "Status")),
                      "Content-Type: %s" % content_type, "Content-Length: %d" % len(body),
                      "Connection: %s" % ("close" if close else "keep-alive")]
        head_lines += ["%s: %s" % item for item in sorted((extra or {}).items())]
        conn.outbuf += ("\r\n".join(head_lines) + "\r\n\r\n").encode() + (b"" if head else body)
        if close:
            conn.closing = True
            conn.inbuf.clear()
            conn.started = None
        self._flush(conn)

    def _flush(self, conn):
        if not self._alive(conn) or not self._send(conn):
            return
        if not conn.outbuf and conn.closing:
            try:
                conn.sock.shutdown(socket.SHUT_WR)   # the answer first, then the close:
            except OSError:                          # no reset while the client still sends
                pass
            self._close(conn)
            return
        if not conn.outbuf and conn.inbuf:
            self.call_later(0, lambda: self._serve(conn))   # a pipelined request: next turn of the loop
        self._watch_http(conn)

    def _watch_http(self, conn):
        """Read while no answer waits and the pipeline is short; write while
        an answer waits (a client that does not read is not read from)."""
        if self._alive(conn):
            self._watch(conn, not conn.outbuf and not conn.closing and
                        len(conn.inbuf) <= MAX_HTTP_HEADER_BYTES + MAX_HTTP_BODY_BYTES)


class HttpRoutes:
    """What the HTTP listener answers: the routes, each a method that returns
    (status, content type, body, extra headers). They read what the control
    socket's `status` reads; nothing here changes a service but a signed
    /hooks/sync."""

    def __init__(self, daemon):
        self.daemon = daemon

    def http_reply(self, request):
        """(status, content type, body, extra headers) for one HTTP request.
        Nothing here changes a service but a signed /hooks/sync."""
        route = self.HTTP_ROUTES.get(request.path)
        if route is None and request.path.startswith("/units/"):
            route = (("GET", "HEAD"), HttpRoutes._http_unit_page)
        if route is None:
            return 404, "text/plain", b"not found: try /, /metrics, /status, /healthz or POST /hooks/sync\n", {}
        allowed, handler = route
        if request.method not in allowed:
            return 405, "text/plain", b"method not allowed\n", {"Allow": ", ".join(allowed)}
        return handler(self, request)

    def _http_metrics(self, request):
        return 200, "text/plain; version=0.0.4; charset=utf-8", prometheus_text(self.daemon).encode(), {}

    def _http_status(self, request):
        result = self.daemon.handlers.status_result()
        return 200, "application/json", (json.dumps(result, indent=2, sort_keys=True) + "\n").encode(), {}

    def _page_data(self):
        daemon = self.daemon
        result = self.daemon.handlers.status_result()
        result["services"] = [service_status(daemon.services[n], True) for n in sorted(daemon.services)]
        return result

    def _http_page(self, request):
        return 200, "text/html; charset=utf-8", status_page(self._page_data()), page_headers()

    def _http_unit_page(self, request):
        from urllib.parse import unquote
        name = unquote(request.path[len("/units/"):])
        service = self.daemon.services.get(name)
        if service is None:
            return 404, "text/html; charset=utf-8", _page("not found", "<main><h1>No unit %s</h1><p><a href=\"/\">"
                                                          "all units</a></p></main>" % __import__("html").escape(name),
                                                          refresh=False), page_headers()
        snapshot = service_status(service, True)
        if self.daemon.config.http_show_logs:
            snapshot["log_tail"] = tail_lines(self.daemon.config.service_log(service.log_name), 30)
        return 200, "text/html; charset=utf-8", unit_page(snapshot, self.daemon.info(), self.daemon.config.http_show_logs), \
            page_headers()

    def _http_healthz(self, request):
        sync = self.daemon.deployer.last_sync
        if self.daemon.host.shutting_down:
            return 503, "text/plain", b"shutting down\n", {}
        if not sync or sync.get("result") in ("error", "refused"):
            why = sync.get("error") if sync else "no sync yet"
            return 503, "text/plain", ("last sync %s: %s\n" % (
                "refused" if sync and sync["result"] == "refused" else "failed", why)).encode(), {}
        return 200, "text/plain", b"ok\n", {}

    def _http_hook(self, request):
        daemon = self.daemon
        secret = daemon.config.webhook_secret
        if not secret:
            daemon.log.warning("daemon", "Webhook refused: no webhook_secret is set")
            return 403, "text/plain", b"webhooks are off: set webhook_secret in the daemon's config\n", {}
        forge, why = webhook_sender(secret, request.headers, request.body)
        if forge is None:
            daemon.log.warning("daemon", "Webhook refused: %s" % why)
            return 401, "text/plain", ("refused: %s\n" % why).encode(), {}
        if daemon.host.shutting_down:
            return 503, "text/plain", b"shutting down\n", {}
        daemon.log.info("daemon", "Webhook from %s: syncing" % forge)
        if daemon.deployer.remote_mode:
            daemon.source.after_fetch(lambda error: None, deploy=True)
            return 202, "application/json", b'{"ok": true, "fetching": true}\n', {}
        plan = daemon.deployer.deploy_head("webhook")
        reply = plan_reply(plan)
        return (200 if reply["ok"] else 503), "application/json", (json.dumps(reply, sort_keys=True) + "\n").encode(), {}

    HTTP_ROUTES = {"/": (("GET", "HEAD"), _http_page),
                   "/metrics": (("GET", "HEAD"), _http_metrics), "/status": (("GET", "HEAD"), _http_status),
                   "/healthz": (("GET", "HEAD"), _http_healthz), "/hooks/sync": (("POST",), _http_hook)}


# ---- metrics (Prometheus text) ---------------------------------------------------


def prometheus_label(value):
    """A label value as the text format 0.0.4 wants it: \\ " and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(daemon):
    """The metrics of the daemon and its units, Prometheus text format 0.0.4.
    Each unit's process is read once (/proc/PID/stat) and its label made once:
    with 1000 units this is what the scrape costs."""
    out = []

    def family(name, kind, help_text, samples):
        out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, help_text, name, kind))
        out.extend("%s%s %s\n" % (name, labels, _prometheus_number(value)) for labels, value in samples)

    services = [daemon.services[name] for name in sorted(daemon.services)]
    unit_labels = {s.name: 'unit="%s"' % prometheus_label(s.name) for s in services}
    usage = {s.name: process_usage(s.main.pid) for s in services if s.main.pid and s.state in ACTIVE_STATES}
    family("gitproc_unit_state", "gauge", "1 for the state the unit is in (one series per unit: its state).",
           (('{%s,state="%s"}' % (unit_labels[s.name], s.state), 1) for s in services))
    family("gitproc_unit_restarts_total", "counter", "Automatic restarts of the unit (kept across daemon restarts).",
           (("{%s}" % unit_labels[s.name], s.restarts_total) for s in services))
    family("gitproc_unit_memory_bytes", "gauge", "Resident memory of the unit's main process.",
           (("{%s}" % unit_labels[name], rss) for name, (rss, _) in usage.items() if rss is not None))
    family("gitproc_unit_cpu_seconds_total", "counter", "CPU time (user and system) of the unit's main process.",
           (("{%s}" % unit_labels[name], cpu) for name, (_, cpu) in usage.items() if cpu is not None))
    family("gitproc_unit_healthy", "gauge", "1 while the unit's health check passes, 0 otherwise (units with a check).",
           (("{%s}" % unit_labels[s.name], int(s.health()[0] == "healthy")) for s in services if s.spec.health_check_url))
    family("gitproc_unit_start_time_seconds", "gauge", "When the unit's main process started (Unix time).",
           (("{%s}" % unit_labels[s.name], s.main.started_wall) for s in services if s.name in usage and s.main.started_wall))
    timers = [daemon.schedule.timers[name] for name in sorted(daemon.schedule.timers)]
    timer_labels = {t.name: 'timer="%s"' % prometheus_label(t.name) for t in timers}
    family("gitproc_timer_next_elapse_timestamp_seconds", "gauge", "When the timer elapses next (Unix time; armed timers).",
           (("{%s}" % timer_labels[t.name], t.next_wall) for t in timers if t.armed and t.next_wall is not None))
    family("gitproc_timer_last_trigger_timestamp_seconds", "gauge", "When the timer last triggered (Unix time).",
           (("{%s}" % timer_labels[t.name], t.last_trigger) for t in timers if t.last_trigger is not None))
    family("gitproc_timer_triggers_total", "counter", "Elapses of the timer (kept across daemon restarts).",
           (("{%s}" % timer_labels[t.name], t.triggers_total) for t in timers))
    alerts = daemon.alerts
    family("gitproc_alerts_sent_total", "counter", "Alerts delivered, by target and event.",
           (('{target="%s",event="%s"}' % (prometheus_label(target), event), count)
            for (target, event), count in sorted(alerts.sent_total.items())))
    family("gitproc_alerts_failed_total", "counter", "Alerts a target did not take after every attempt.",
           (('{target="%s"}' % prometheus_label(target), count) for target, count in sorted(alerts.failed_total.items())))
    family("gitproc_alerts_suppressed_total", "counter", "Repeats of an alert within notify_repeat, counted "
           "and said in the next one instead.", [("", alerts.suppressed_total)])
    sockets = [daemon.listeners.units[name] for name in sorted(daemon.listeners.units)]
    socket_labels = {s.name: 'socket="%s"' % prometheus_label(s.name) for s in sockets}
    family("gitproc_socket_listening", "gauge", "1 while the socket's addresses are bound and open.",
           (("{%s}" % socket_labels[s.name], 1 if s.sockets else 0) for s in sockets))
    family("gitproc_socket_accepted_total", "counter", "Connections accepted for per-connection instances "
           "(Accept=yes; kept across daemon restarts).", (("{%s}" % socket_labels[s.name], s.accepted_total)
                                                           for s in sockets if s.spec.accept))
    family("gitproc_socket_refused_total", "counter", "Connections closed at MaxConnections= or "
           "MaxConnectionsPerSource= (Accept=yes).", (("{%s}" % socket_labels[s.name], s.refused_total)
                                                      for s in sockets if s.spec.accept))
    family("gitproc_socket_triggers_total", "counter", "Activations of the socket's service by incoming traffic "
           "(kept across daemon restarts).", (("{%s}" % socket_labels[s.name], s.triggers_total) for s in sockets))
    deployer = daemon.deployer
    commit = deployer.deployed
    family("gitproc_deploy_commit_info", "gauge", "The deployed commit.",
           [('{commit="%s",subject="%s"}' % (commit.sha, prometheus_label(commit.subject)), 1)] if commit else [])
    family("gitproc_deploys_total", "counter", "Deploys by outcome (ok, partial, error, rolled back; kept across daemon restarts).",
           [('{outcome="%s"}' % prometheus_label(outcome), count) for outcome, count in sorted(deployer.deploys_total.items())])
    last_sync = deployer.last_sync or {}
    family("gitproc_last_sync_timestamp_seconds", "gauge", "When the daemon last looked for a new commit (Unix time).",
           [("", last_sync["time"])] if last_sync.get("time") else [])
    family("gitproc_last_sync_success", "gauge", "1 if the last sync succeeded.",
           [("", int(bool(last_sync) and last_sync.get("result") not in ("error", "refused")))])
    family("gitproc_deploy_refused_total", "counter", "Commits refused, by reason (kept across daemon restarts).",
           [('{reason="%s"}' % reason, deployer.refusals_total.get(reason, 0)) for reason in REFUSAL_REASONS])
    rss, cpu = process_usage(os.getpid())
    family("gitproc_daemon_resident_memory_bytes", "gauge", "Resident memory of the daemon.", [("", rss)])
    family("gitproc_daemon_cpu_seconds_total", "counter", "CPU time (user and system) of the daemon.", [("", cpu)])
    family("gitproc_daemon_start_time_seconds", "gauge", "When the daemon started (Unix time).", [("", daemon.started_wall)])
    return "".join(out)


def _prometheus_number(value):
    if value is None:
        return "NaN"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("+Inf" if value > 0 else "-Inf" if value < 0 else "NaN")
    return str(value)


# ---- webhooks --------------------------------------------------------------------


def webhook_sender(secret, headers, body):
    """(forge, None) for a push webhook signed with `secret`, else (None, why).
    GitHub: X-Hub-Signature-256 = sha256=HMAC-SHA256(body); Gitea:
    X-Gitea-Signature = HMAC-SHA256(body) in hex; GitLab: X-Gitlab-Token = the
    secret itself. Compared in constant time."""
    import hashlib
    import hmac
    key = secret.encode()
    digest = hmac.new(key, body, hashlib.sha256).hexdigest()
    checks = (("x-hub-signature-256", "GitHub", ("sha256=" + digest).encode()),
              ("x-gitea-signature", "Gitea", digest.encode()),
              ("x-gitlab-token", "GitLab", key))
    for header, forge, expected in checks:
        if header in headers:
            given = headers[header].strip().encode("latin-1")
            if hmac.compare_digest(given.lower() if forge != "GitLab" else given, expected):
                return forge, None
            return None, "%s signature (%s) does not match webhook_secret" % (forge, header)
    return None, "no X-Hub-Signature-256, X-Gitea-Signature or X-Gitlab-Token header"


# ---- the status page (SPEC §21) ---------------------------------------------------------
# GET / and GET /units/NAME on the HTTP listener: what `status --json` says,
# as a page a person reads (a phone included). Server-rendered from the same
# data, every string escaped, no script, no form, no action: it only reads.

PAGE_STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#1d2329;background:#f6f7f9}
header,main,footer{max-width:1100px;margin:0 auto;padding:12px 16px}
header{background:#1d2329;color:#fff;max-width:none}header div{max-width:1100px;margin:0 auto}
h1{font-size:20px;margin:4px 0}h2{font-size:16px;margin:22px 0 8px}header p{margin:4px 0;color:#c9d1d9}
a{color:#0b5cad}header a{color:#fff}code{font:13px ui-monospace,monospace}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d8dde3}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #e6e9ed;vertical-align:top}
th{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#57606a;background:#eef1f4}
.state{font-weight:600}.failed,.refused{color:#b42318}.running,.listening,.waiting,.ok{color:#1a7f37}
.starting,.backoff,.stopping,.reloading,.partial{color:#9a6700}.stopped,.exited,.inactive{color:#57606a}
.alert{background:#fff4f2;border:1px solid #f3b7ae;padding:8px 12px;margin:6px 0}.muted{color:#57606a}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;background:#fff;border:1px solid #d8dde3;padding:12px}
dt{color:#57606a}dd{margin:0;overflow-wrap:anywhere}pre{background:#fff;border:1px solid #d8dde3;padding:8px;overflow-x:auto}
@media (max-width:640px){table,tbody,tr,td{display:block;width:auto}thead{display:none}
tr{border-bottom:2px solid #d8dde3;padding:4px 0}td{border:0;padding:2px 8px}td.empty{display:none}
td::before{content:attr(data-label);display:inline-block;min-width:6.5em;color:#57606a;font-size:12px}}
"""
PAGE_REFRESH = 10                     # seconds between the page's reloads (meta refresh: no script)
_PAGE_HEADERS = {}


def page_headers():
    """The status page's headers: its one stylesheet allowed by its hash,
    nothing else (hashed with CPython's own sha256: no OpenSSL in the daemon)."""
    if not _PAGE_HEADERS:
        import binascii
        digest = new_digest("sha256")
        digest.update(PAGE_STYLE.encode())
        _PAGE_HEADERS.update({
            "Content-Security-Policy": "default-src 'none'; style-src 'sha256-%s'; base-uri 'none'; "
                                       "form-action 'none'; frame-ancestors 'none'" % binascii.b2a_base64(
                                           digest.digest(), newline=False).decode(),
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
            "X-Frame-Options": "DENY"})
    return dict(_PAGE_HEADERS)


def _page(title, body, refresh=True):
    from html import escape
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">%s<title>%s</title>'
            '<style>%s</style></head><body>%s<footer class="muted">gitproc %s &middot; read-only%s</footer>'
            '</body></html>\n' % ('<meta http-equiv="refresh" content="%d">' % PAGE_REFRESH if refresh else "",
                                  escape(title), PAGE_STYLE, body, escape(__version__),
                                  " &middot; refreshed every %d s" % PAGE_REFRESH if refresh else "")).encode()


def _html_cells(row):
    """<td>s of (label, html) pairs; the label shows on a phone, where rows
    stack, and there an empty cell ("-") is left out."""
    from html import escape
    return "".join('<td data-label="%s"%s>%s</td>' % (escape(label), ' class="empty"' if cell in ("-", "") else "", cell)
                   for label, cell in row)


def _html_table(headers, rows):
    from html import escape
    if not rows:
        return '<p class="muted">none</p>'
    return "<table><thead><tr>%s</tr></thead><tbody>%s</tbody></table>" % (
        "".join("<th>%s</th>" % escape(h) for h in headers),
        "".join("<tr>%s</tr>" % _html_cells(zip(headers, row)) for row in rows))


def _html_state(state):
    from html import escape
    return '<span class="state %s">%s</span>' % (escape(state), escape(state))


def _html_time(wall):
    """A time of today as HH:MM:SS, another day's with its date."""
    if not wall:
        return "-"
    same_day = time.localtime(wall)[:3] == time.localtime()[:3]
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M", time.localtime(wall))


def status_page(data):
    """The host at a glance: `data` is what `status --json` holds, every
    service with its detail."""
    from html import escape
    from urllib.parse import quote
    info = data["daemon"]
    commit, sync, verify = info.get("commit"), info.get("last_sync") or {}, info.get("verify") or {}
    head = "<header><div><h1>%s</h1><p>branch <b>%s</b> &middot; %s</p><p>last sync %s %s%s &middot; %s</p>%s</div></header>" % (
        escape(info["hostname"]), escape(info["branch"]),
        "commit <code>%s</code> %s" % (escape(commit["sha"][:7]), escape(commit["subject"])) if commit else "nothing deployed",
        escape(_html_time(sync.get("time"))), _html_state(sync.get("result") or "never"),
        ": " + escape(sync["error"]) if sync.get("error") else "",
        "verify: %s signatures, scope %s" % ("SSH" if verify.get("kind") == "ssh" else "OpenPGP", escape(verify["scope"]))
        if verify.get("kind") else "verify: off",
        '<p class="failed">REFUSED %s: %s</p>' % (escape(info["refused"]["sha"][:7]), escape(info["refused"]["error"]))
        if info.get("refused") else "")
    services = sorted(data["services"], key=lambda s: (s["state"] != FAILED, s["name"]))
    link = lambda name: '<a href="/units/%s">%s</a>' % (quote(name, safe=""), escape(name))
    failed = [s for s in services if s["state"] == FAILED]
    body = [head, "<main>"]
    if failed:
        body.append("<h2>Failed (%d)</h2>" % len(failed))
        body += ['<div class="alert">%s %s since %s: %s</div>' % (
            link(s["name"]), _html_state(s["state"]), escape(_html_time(s["since"])),
            escape(s["reason"] or describe_exit(s["last_exit"]))) for s in failed]
    invalid = [p for p in data["problems"] if p["severity"] == "error"]
    if invalid:
        body.append("<h2>Invalid unit files (%d)</h2>" % len(invalid))
        body += ['<div class="alert"><code>%s:%d</code> %s</div>' % (escape(p["path"]), p["line"], escape(p["message"]))
                 for p in invalid]
    body.append("<h2>Units (%d)</h2>" % len(services))
    body.append(_html_table(("unit", "state", "since", "restarts", "health", "memory", "cpu", "commit", "note"), [(
        link(s["name"]) + ('<br><span class="muted">%s</span>' % escape(s["description"]) if s.get("description") else ""),
        _html_state(s["state"]), escape(_html_time(s["since"])), str(s["restarts"]), escape(s["health"] or "-"),
        escape(format_bytes(s["memory"])) if s["memory"] else "-",
        "%.1fs" % s["cpu_seconds"] if s.get("cpu_seconds") is not None else "-",
        "<code>%s</code>" % escape((s["commit"] or "")[:7]),
        escape(("rolled back: " + drift_note(s["rolled_back"])) if s["rolled_back"] else
               s.get("status_text") or (s["reason"] if s["state"] != RUNNING else "") or ""))
        for s in services]))
    if data.get("timers"):
        body.append("<h2>Timers (%d)</h2>" % len(data["timers"]))
        body.append(_html_table(("timer", "state", "next", "last", "activates"), [(
            escape(t["name"]), _html_state(t["state"]), escape(_html_time(t["next"])), escape(_html_time(t["last_trigger"])),
            escape(t["unit"])) for t in data["timers"]]))
    if data.get("sockets"):
        body.append("<h2>Sockets (%d)</h2>" % len(data["sockets"]))
        body.append(_html_table(("socket", "state", "listen", "accepted", "activates"), [(
            escape(s["name"]), _html_state(s["state"]), "<br>".join(escape(a) for a in s["listen"]),
            str(s["accepted_total"]), escape(s["unit"])) for s in data["sockets"]]))
    body.append("</main>")
    return _page("gitproc on %s" % info["hostname"], "".join(body))


def unit_page(service, info, show_logs):
    """One unit's detail, as `status NAME` shows it; its log lines only with
    http_show_logs (a log may hold what the network must not see)."""
    from html import escape
    rows = [("description", service.get("description") or "-"), ("unit file", service.get("path")),
            ("state", None), ("since", _html_time(service["since"])), ("reason", service["reason"] or "-"),
            ("main pid", service["pid"] or "-"), ("restarts", service["restarts"]),
            ("last exit", describe_exit(service["last_exit"])), ("health", service["health"] or "no health check"),
            ("memory", format_bytes(service["memory"]) if service["memory"] else "-"),
            ("cpu", "%.2fs" % service["cpu_seconds"] if service.get("cpu_seconds") is not None else "-"),
            ("commit", (service["commit"] or "-")[:12]), ("type", service.get("type")),
            ("status", service.get("status_text") or "-"),
            ("rolled back", drift_note(service["rolled_back"]) if service["rolled_back"] else "no")]
    rows += [("not applied", "%s=%s (%s)" % (n["key"], n["value"], n["why"])) for n in service.get("not_applied", [])]
    rows += [("warning", w) for w in service.get("warnings", [])]
    listing = "".join("<dt>%s</dt><dd>%s</dd>" % (escape(label), _html_state(service["state"]) if value is None else
                                                   escape(str(value))) for label, value in rows)
    logs = '<h2>Last log lines</h2><pre>%s</pre>' % escape("\n".join(service.get("log_tail") or [])) if show_logs \
        else '<p class="muted">Log lines are not shown here (set http_show_logs in the config).</p>'
    body = '<header><div><h1>%s</h1><p><a href="/">%s</a></p></div></header><main><dl>%s</dl>%s</main>' % (
        escape(service["name"]), escape(info["hostname"]), listing, logs)
    return _page("%s on %s" % (service["name"], info["hostname"]), body)


# ==== 16. alerts =============================================================
# What the event log records is watched for what someone must hear of: a unit
# failed, restarted after an exit, turned unhealthy, its watchdog fired; a
# deploy failed, was refused, or rolled back; and then its recovery. The first
# alert of a (unit, kind) goes at once; repeats within notify_repeat are
# counted and said in the next one. Each delivery is a child process (the
# stdlib's urllib for a URL, or the target's command), so a slow or dead
# target costs the loop one spawn and a pipe to read: never a wait.

ALERT_QUEUE_LIMIT = 100               # deliveries waiting; past it the oldest is dropped, and said
ALERT_CHILDREN = 4                    # deliveries under way at once
ALERT_TIMEOUT = 15.0                  # a delivery still running then is killed, and failed
ALERT_RETRIES = (2.0, 10.0, 60.0)     # waits before the second, third and fourth (last) attempt
ALERT_ANSWER_BYTES = 300              # of a target's answer, kept for `status` and `notify test`
ALERT_LOG_BYTES = 48 * 1024           # of log lines in an alert: it is written whole into a 64 KiB pipe
RECOVERY_AFTER = 10.0                 # a unit that was alerted on runs (healthy) this long: recovered
ALERT_WORDS = {"failed": "failed", "restarted": "exited and is restarted", "unhealthy": "is unhealthy",
               "watchdog": "missed its watchdog", "deploy-failed": "deploy failed",
               "deploy-refused": "deploy refused", "rolled-back": "rolled back", "recovered": "recovered",
               "test": "test alert"}

# The child that posts an alert (JSON on its stdin) to a URL: urllib, with the
# ssl module's default context (certificates verified), 10 s to answer.
ALERT_SENDER = r"""
import json, sys, urllib.error, urllib.request
url, form = sys.argv[1], sys.argv[2]
alert = json.load(sys.stdin)
body = json.dumps({"text": alert["text"]} if form == "slack" else alert).encode()
request = urllib.request.Request(url, body, {"Content-Type": "application/json", "User-Agent": "gitproc"})
try:
    with urllib.request.urlopen(request, timeout=10) as answer:
        print(answer.status, answer.read(300).decode("utf-8", "replace").strip())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read(300).decode("utf-8", "replace").strip())
    sys.exit(1)
except Exception as exc:
    print("error:", getattr(exc, "reason", None) or exc)
    sys.exit(1)
"""


def _last_lines_within(lines, limit):
    """The last of `lines` that together hold at most `limit` bytes."""
    kept, size = [], 0
    for line in reversed(lines):
        size += len(line.encode("utf-8", "replace")) + 1
        if size > limit:
            break
        kept.append(line)
    return kept[::-1]


class Delivery:
    """One alert to one target: its attempts, and what the target answered."""
    __slots__ = ("target", "alert", "attempt", "pid", "out", "answer", "exit", "timer", "test", "outcome")

    def __init__(self, target, alert, test=None):
        self.target, self.alert, self.attempt, self.test = target, alert, 0, test
        self.pid = self.out = self.exit = self.timer = self.outcome = None
        self.answer = b""


class Alerter:
    """The alerts of SPEC §21: raised from the daemon's events, de-duplicated,
    delivered by child processes (bounded queue, retries with backoff)."""

    def __init__(self, daemon):
        import collections
        self.daemon = daemon
        self.repeats = {}                 # (unit, kind) -> {"sent": wall time, "suppressed": count since}
        self.alerted = set()              # units alerted on and not recovered yet
        self.recovering = {}              # unit -> Timer of its recovery check
        self.queue = collections.deque()  # Deliveries waiting for a child
        self.running = {}                 # pid -> Delivery under way
        self.last = {}                    # target name -> the last delivery's outcome (status)
        self.sent_total, self.failed_total = {}, {}    # (target, event) -> n; target -> n
        self.suppressed_total = 0
        self.tests = []                   # Deliveries of `notify test` under way or just done

    @property
    def targets(self):
        return self.daemon.config.notify or []

    # -- what raises an alert --------------------------------------------------------

    def observe(self, entry):
        """Every event of the daemon (EventLog): the ones someone must hear of."""
        kind, unit, to = entry["event"], entry["unit"], entry["to"]
        if not self.targets:
            return
        service = self.daemon.services.get(unit) if unit else None
        if kind == "state" and service is not None:
            if to in (FAILED, BACKOFF):
                self.raise_alert("watchdog" if service.run.result == "watchdog" else "failed" if to == FAILED
                                 else "restarted", service.log_name, entry["reason"], service)
            elif to == RUNNING:
                self._recovery_later(service)
        elif kind == "health" and service is not None:
            if to == "unhealthy":
                self.raise_alert("unhealthy", service.log_name, entry["reason"], service)
            elif to == "healthy":
                self._recovery_later(service)
        elif kind == "deploy" and (entry["to"] is None or (entry["reason"] or "").startswith("partial")):
            refused = (entry["reason"] or "").startswith("refused")
            self.raise_alert("deploy-refused" if refused else "deploy-failed", None, entry["reason"],
                             commit=entry["commit"])
        elif kind == "rollback":
            self.raise_alert("rolled-back", unit, entry["reason"], service, commit=entry["to"])

    def raise_alert(self, kind, unit, reason, service=None, commit=None):
        now = time.time()
        seen = self.repeats.get((unit, kind))
        if seen is not None and now - seen["sent"] < self.daemon.config.notify_repeat:
            seen["suppressed"] += 1       # said in the next one
            self.suppressed_total += 1
            return
        self.repeats[(unit, kind)] = {"sent": now, "suppressed": 0}
        if unit is not None:
            self.alerted.add(unit)
            timer = self.recovering.pop(unit, None)
            if timer is not None:
                timer.cancel()
        suppressed = seen["suppressed"] if seen else 0
        self.send(self.alert(kind, unit, reason, service, commit, suppressed, seen["sent"] if seen else None))

    def _recovery_later(self, service):
        unit = service.log_name
        if unit in self.alerted and unit not in self.recovering:
            self.recovering[unit] = self.daemon.call_later(RECOVERY_AFTER, lambda: self._recovered(unit))

    def _recovered(self, unit):
        self.recovering.pop(unit, None)
        service = self.daemon.services.get(unit)
        if unit not in self.alerted or service is None or service.state != RUNNING or \
                service.health()[0] not in (None, "healthy"):
            return
        self.alerted.discard(unit)
        kinds = [key for key in self.repeats if key[0] == unit]
        suppressed = sum(self.repeats.pop(key)["suppressed"] for key in kinds)
        self.send(self.alert("recovered", unit, "running%s for %ds" % (
            " and healthy" if service.health()[0] else "", RECOVERY_AFTER), service, None, suppressed, None))

    def alert(self, kind, unit, reason, service=None, commit=None, suppressed=0, since=None):
        """The payload every target gets (a JSON object; Slack's text is `text`)."""
        config, deployed = self.daemon.config, self.daemon.deployer.deployed
        exit_info = service.last_exit if service is not None and kind != "recovered" else None
        lines = tail_lines(config.service_log(unit), config.notify_log_lines) if unit and service is not None else []
        text = "[%s] %s %s%s" % (config.hostname, unit or "deploy", ALERT_WORDS[kind], ": %s" % reason if reason else "")
        if suppressed and kind == "recovered":
            text += "; %d repeat%s of its alerts held back meanwhile" % (suppressed, "" if suppressed == 1 else "s")
        elif suppressed:
            text += " (and %d more like it since %s, not sent one by one)" % (
                suppressed, time.strftime("%H:%M:%S", time.localtime(since)))
        return {"host": config.hostname, "unit": unit, "event": kind, "reason": reason,
                "exit": describe_exit(exit_info) if exit_info else None,
                "commit": commit or (service.commit if service is not None else None) or (
                    deployed.sha if deployed else None),
                "time": time.time(), "suppressed": suppressed, "log": _last_lines_within([line[:500] for line in lines],
                                                                                     ALERT_LOG_BYTES), "text": text}

    # -- delivery --------------------------------------------------------------------------

    def send(self, alert, targets=None, test=None):
        for target in targets if targets is not None else self.targets:
            delivery = Delivery(target, alert, test)
            if test is not None:
                self.tests.append(delivery)
            self.queue.append(delivery)
            if len(self.queue) > ALERT_QUEUE_LIMIT:
                dropped = self.queue.popleft()
                dropped.outcome = (False, "dropped: more than %d alerts waiting" % ALERT_QUEUE_LIMIT)
                self._gave_up(dropped, dropped.outcome[1])
        self._pump()

    def _pump(self):
        while self.queue and len(self.running) < ALERT_CHILDREN and not self.daemon.host.shutting_down:
            self._start(self.queue.popleft())

    def _start(self, delivery):
        target = delivery.target
        delivery.attempt += 1
        delivery.answer, delivery.exit, delivery.out = b"", None, None
        argv = [sys.executable, "-I", "-S", "-c", ALERT_SENDER, target["url"], target["format"]] \
            if "url" in target else list(target["command"])
        program = find_program(argv[0], os.environ.get("PATH", os.defpath))
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            if program is None:
                raise OSError(errno.ENOENT, "%s: command not found" % argv[0])
            delivery.pid = os.posix_spawn(program, argv, dict(os.environ), setsid=True, file_actions=[
                (os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, out_w, 2)])
        except OSError as exc:
            for fd in (in_r, in_w, out_r, out_w):
                os.close(fd)
            return self._done(delivery, False, "cannot run %s: %s" % (argv[0], describe_os_error(exc)))
        os.close(in_r)
        os.close(out_w)
        try:                              # (a pipe holds 64 KiB: the alert, its log lines cut, fits)
            os.set_blocking(in_w, False)
            os.write(in_w, json.dumps(delivery.alert).encode())
        except OSError:
            pass                          # it did not read: its exit says what went wrong
        finally:
            os.close(in_w)
        os.set_blocking(out_r, False)
        delivery.out = out_r
        self.running[delivery.pid] = delivery
        self.daemon.selector.register(out_r, EVENT_READ, (self._read, delivery))
        self.daemon.host.exit_watcher.watch(delivery.pid, lambda exit_info: self._exited(delivery, exit_info))
        delivery.timer = self.daemon.call_later(ALERT_TIMEOUT, lambda: self._timed_out(delivery))

    def _read(self, delivery, _mask):
        try:
            chunk = os.read(delivery.out, 4096)
        except BlockingIOError:
            return
        if chunk:
            delivery.answer = (delivery.answer + chunk)[:ALERT_ANSWER_BYTES]
            return
        unregister_quietly(self.daemon.selector, delivery.out)
        os.close(delivery.out)
        delivery.out = None
        self._settle(delivery)

    def _exited(self, delivery, exit_info):
        delivery.exit = exit_info or {"code": None}
        self._settle(delivery)

    def _timed_out(self, delivery):
        delivery.timer = None
        if delivery.exit is None and delivery.pid:
            delivery.answer += b" (no answer within %ds)" % ALERT_TIMEOUT
            try:
                os.killpg(delivery.pid, signal.SIGKILL)
            except OSError:
                pass

    def _settle(self, delivery):
        if delivery.exit is None or delivery.out is not None:
            return                        # its output or its exit is still to come
        self.running.pop(delivery.pid, None)
        if delivery.timer is not None:
            delivery.timer.cancel()
        answer = delivery.answer.decode("utf-8", "replace").strip() or describe_exit(delivery.exit)
        self._done(delivery, delivery.exit == {"code": 0}, answer)

    def _done(self, delivery, ok, answer):
        name, kind = delivery.target["name"], delivery.alert["event"]
        self.last[name] = {"time": time.time(), "event": kind, "unit": delivery.alert["unit"], "ok": ok,
                           "answer": answer, "attempt": delivery.attempt}
        delivery.outcome = (ok, answer)
        if ok:
            self.sent_total[(name, kind)] = self.sent_total.get((name, kind), 0) + 1
        elif delivery.test is None and delivery.attempt <= len(ALERT_RETRIES):
            wait = ALERT_RETRIES[delivery.attempt - 1]
            self.daemon.log.warning("daemon", "Alert %s of %s to %s failed (%s): again in %gs" % (
                kind, delivery.alert["unit"] or "the deploy", name, answer, wait))
            self.daemon.call_later(wait, lambda: (self.queue.append(delivery), self._pump()))
        else:
            self._gave_up(delivery, answer)
        self.daemon.changed = True        # a `notify test` waiting for it
        self._pump()

    def _gave_up(self, delivery, why):
        name = delivery.target["name"]
        self.failed_total[name] = self.failed_total.get(name, 0) + 1
        if delivery.test is None:
            self.daemon.log.error("daemon", "Alert %s of %s to %s not delivered after %d attempt%s: %s" % (
                delivery.alert["event"], delivery.alert["unit"] or "the deploy", name, delivery.attempt,
                "" if delivery.attempt == 1 else "s", why))
        self.last[name] = dict(self.last.get(name, {}), ok=False, answer=why, time=time.time(),
                               event=delivery.alert["event"])

    # -- `notify test`, status and metrics -------------------------------------------------

    def test(self, name=None):
        """A test alert to every target (or the one named): the Deliveries."""
        targets = [t for t in self.targets if name is None or t["name"] == name]
        if not targets:
            raise GitprocError("no notify target %s: %s" % ("named %r" % name if name else "is set in the config",
                               ", ".join(t["name"] for t in self.targets) or 'add "notify" to config.json'))
        test = object()
        self.send(self.alert("test", None, "sent by `notify test`: the wiring works"), targets, test)
        return [d for d in self.tests if d.test is test]

    def describe(self):
        return {"targets": [{"name": t["name"], "last": self.last.get(t["name"])} for t in self.targets],
                "waiting": len(self.queue), "under_way": len(self.running), "suppressed": self.suppressed_total}


# ==== 17. daemon =============================================================
# The one thread that owns everything: a selector over the signal wakeup pipe,
# pidfds, the control socket and its clients, plus a heap of timers. Services,
# the state store and deploys are only touched from here. The parts, each a
# class: RequestHandlers (the socket's commands), DaemonHost (the real
# ServiceHost) and Daemon, the loop and the wiring.


class Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when, callback):
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self):
        self.cancelled = True


def _signal_group_if_same(pid, pid_start, number):
    """Signal the process group led by `pid` only while `pid` is still the process
    that started at `pid_start`."""
    if pid_start_time(pid) == pid_start:
        try:
            os.killpg(pid, number)
        except OSError:
            pass


def plan_reply(plan):
    """The reply to a request that deployed, planned or rolled back."""
    if plan.error:
        return {"ok": False, "error": plan.error}
    return {"ok": True, "result": plan.to_json()}


class RequestHandlers:
    """The control socket's commands, one method each, found through
    COMMANDS. They read and act on the daemon's parts; a GitprocError they
    raise becomes the error reply."""

    def __init__(self, daemon):
        self.daemon = daemon

    def dispatch(self, conn, message):
        handler = self.COMMANDS.get(message["cmd"])
        if handler is None:
            return {"ok": False, "error": "unknown command %r" % message["cmd"][:64]}
        return handler(self, conn, message)

    # -- arguments -------------------------------------------------------------------

    def _names(self, message, allow_empty=False):
        services, skipped = self.daemon.services, self.daemon.deployer.skipped
        names = message.get("names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise GitprocError("malformed request: 'names' must be a list of unit names")
        if not names and not allow_empty:
            raise GitprocError("name at least one unit")
        names = [as_unit_name(n, services) for n in names]
        unknown = [n for n in names if n not in services or services[n].versions.removed]
        if unknown:
            hint = ""
            known_skipped = [n for n in unknown if n in skipped]
            if known_skipped:
                hint = " (%s)" % skipped[known_skipped[0]]
            raise GitprocError("unknown unit%s: %s%s" % ("s" if len(unknown) > 1 else "", ", ".join(unknown), hint))
        return names

    def _activator_names(self, message):
        """(timers, sockets): the NAME.timer and NAME.socket names of a
        request, taken out of its 'names' (which then names services only);
        an unknown one is an error."""
        names = message.get("names", [])
        if not isinstance(names, list):
            return [], []
        found = []
        for suffix, runner in ((TIMER_SUFFIX, self.daemon.schedule), (SOCKET_SUFFIX, self.daemon.listeners)):
            these = [n for n in names if isinstance(n, str) and n.endswith(suffix)]
            unknown = [n for n in these if n not in runner.units]
            if unknown:
                skipped = [self.daemon.deployer.skipped[n] for n in unknown if n in self.daemon.deployer.skipped]
                raise GitprocError("unknown %s%s: %s%s" % (suffix[1:], "s" if len(unknown) > 1 else "",
                                                          ", ".join(unknown), " (%s)" % skipped[0] if skipped else ""))
            found.append(these)
        message["names"] = [n for n in names if n not in found[0] and n not in found[1]]
        return found[0], found[1]

    def _timers_json(self, names=None):
        schedule, services = self.daemon.schedule, self.daemon.services
        return [schedule.timers[n].to_json(services) for n in (sorted(schedule.timers) if names is None else names)]

    def _sockets_json(self, names=None):
        listeners, services = self.daemon.listeners, self.daemon.services
        return [listeners.units[n].to_json(services) for n in (sorted(listeners.units) if names is None else names)]

    @staticmethod
    def _timeout(message, default):
        timeout = message.get("timeout", default)
        if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                or not math.isfinite(timeout) or not 0 <= timeout <= MAX_WAIT_TIMEOUT):
            raise GitprocError("malformed request: 'timeout' must be seconds from 0 to %d" % MAX_WAIT_TIMEOUT)
        return timeout

    def _refuse_while_shutting_down(self):
        if self.daemon.host.shutting_down:
            raise GitprocError("the daemon is shutting down")

    def status_result(self):
        """What `status` answers of the daemon and every unit (the HTTP
        listener's /status and page read it too)."""
        return self._cmd_status(None, {})["result"]

    # -- what runs ---------------------------------------------------------------------

    def _cmd_ping(self, conn, message):
        return {"ok": True, "result": {"pid": os.getpid(), "version": __version__,
                                       "module": os.path.realpath(__file__)}}

    def _cmd_status(self, conn, message):
        daemon = self.daemon
        timers, sockets = self._activator_names(message)
        names = self._names(message, allow_empty=True)
        detail = bool(names) or bool(timers) or bool(sockets)
        services = [service_status(daemon.services[n], detail) for n in (names or (
            [] if timers or sockets else sorted(daemon.services)))]
        if detail:
            for entry in services:
                entry["log_tail"] = tail_lines(daemon.config.service_log(entry["name"]), 10)
                entry["warnings"] = entry.get("warnings", []) + [str(d) for d in daemon.deployer.unit_problems
                                     if d.code == "key" and d.unit_name == entry["name"]]
                if entry.get("folder"):
                    entry["folder"]["link"] = daemon.deployer.snapshots.link(entry["name"])
        return {"ok": True, "result": {"daemon": daemon.info(), "services": services,
                                       "timers": self._timers_json(timers if detail else None),
                                       "sockets": self._sockets_json(sockets if detail else None),
                                       "problems": [d.to_json() for d in daemon.deployer.unit_problems]}}

    def _cmd_list_timers(self, conn, message):
        """list-timers: every timer, the stopped ones with `all`."""
        timers = [t for t in self._timers_json() if message.get("all") or t["state"] != "stopped"]
        return {"ok": True, "result": {"timers": timers, "now": time.time()}}

    def _cmd_list_sockets(self, conn, message):
        """list-sockets: every socket, the stopped ones with `all`."""
        sockets = [s for s in self._sockets_json() if message.get("all") or s["state"] != "stopped"]
        return {"ok": True, "result": {"sockets": sockets}}

    def _cmd_list(self, conn, message):
        services, deployer = self.daemon.services, self.daemon.deployer
        warned = {}
        for problem in deployer.unit_problems:
            if problem.code == "key":
                warned[problem.unit_name] = warned.get(problem.unit_name, 0) + 1
        units = [{"name": name, "path": spec.path, "state": services[name].state,
                  "commit": services[name].commit, "description": spec.description, "warnings": warned.get(name, 0)}
                 for name, spec in sorted(deployer.specs.items()) if name in services]
        units += [{"name": t["name"], "path": t["path"], "state": t["state"], "commit": deployer.deployed.sha
                   if deployer.deployed else None, "description": t["description"], "warnings": 0}
                  for t in self._timers_json() + self._sockets_json()]
        units += [{"name": name, "path": None, "state": "skipped", "commit": None, "description": why}
                  for name, why in sorted(deployer.skipped.items())]
        units += [{"name": os.path.basename(d.path), "path": d.path, "state": "not run", "commit": None,
                   "description": d.message} for d in deployer.unit_problems if d.code in ("other-unit", "activated")]
        invalid = [d.to_json() for d in deployer.unit_problems if d.severity == "error"]
        return {"ok": True, "result": {"commit": deployer.deployed.to_json() if deployer.deployed else None,
                                       "units": units, "invalid": invalid}}

    def _cmd_history(self, conn, message):
        count = message.get("count", 20)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise GitprocError("malformed request: 'count' must be a whole number")
        return {"ok": True, "result": {"history": self.daemon.deployer.history.last(count)}}

    # -- start, stop, restart, wait ------------------------------------------------------

    def _cmd_start(self, conn, message):
        return self._act(conn, message, "start")

    def _cmd_stop(self, conn, message):
        return self._act(conn, message, "stop")

    def _cmd_restart(self, conn, message):
        return self._act(conn, message, "restart")

    def _act(self, conn, message, action):
        services = self.daemon.services
        timers, sockets = self._activator_names(message)
        names = self._names(message, allow_empty=bool(timers) or bool(sockets))
        self._refuse_while_shutting_down()
        for runner, these in ((self.daemon.schedule, timers), (self.daemon.listeners, sockets)):
            for name in these:            # armed or disarmed, listening or closed at once: nothing to wait for
                if action != "start":
                    runner.stop(name)
                if action != "stop":
                    runner.start(name)
        if not names:
            self.daemon.store.save_now()
            return {"ok": True, "result": {"services": [], "timers": self._timers_json(timers),
                                           "sockets": self._sockets_json(sockets)}}
        generations = {}
        dependencies = self.daemon.dependencies
        if action != "stop":
            for service in dependencies.conflicting(names):
                if service.state in ACTIVE_STATES:
                    self.daemon.log.info(service.name, "Stopping: conflicts with %s" % ", ".join(names))
                service.stop("conflicts with %s" % ", ".join(names))
            for service in dependencies.pulled_in(names):
                self.daemon.log.info(service.name, "Starting: wanted by %s" % ", ".join(names))
                service.start()
        if action != "start":
            for service in dependencies.part_of(names):
                why = "%s with %s (PartOf=)" % ("stopped" if action == "stop" else "restarted", ", ".join(names))
                self.daemon.log.info(service.name, sentence(why))
                if action == "stop":
                    service.stop(why)
                else:
                    service.restart(why)
        for name in names:
            service = services[name]
            generations[name] = service.generation
            if action == "start":
                service.start(manual=True)
            elif action == "stop":
                service.stop()
            else:
                service.restart()
        self.daemon.store.save_now()      # a user's intent is never left to the batch
        if message.get("block") is False:
            return {"ok": True, "result": {"services": [service_status(services[n]) for n in names]}}

        def settled(name):
            service = services.get(name)
            if service is None:
                return True
            if action == "stop":
                return service.state != STOPPING
            if action == "restart" and service.generation == generations[name] and service.state != FAILED:
                return False
            return service.state in SETTLED_STATES

        def check():
            if not all(settled(n) for n in names):
                return None
            return self._action_reply(names, action)

        def expire():
            late = [n for n in names if not settled(n)]
            return {"ok": False, "error": "timed out waiting for %s to %s" % (", ".join(late), action)}
        return self.daemon.server.park(conn, check, expire, self._timeout(message, DEFAULT_WAIT_TIMEOUT))

    def _cmd_reload(self, conn, message):
        """ExecReload= (or ReloadSignal=) of running units; the reply comes
        once each reload is over (`block`: false, at once), an error naming
        each unit that cannot reload or whose reload failed."""
        services = self.daemon.services
        names = self._names(message)
        self._refuse_while_shutting_down()
        cannot = []
        for name in names:
            service = services[name]
            if not service.spec.exec_reload and service.spec.type != "notify-reload":
                cannot.append("%s has no ExecReload=" % name)
            elif service.state not in (RUNNING, RELOADING):
                cannot.append("%s is %s, not running" % (name, service.state))
        if cannot:
            raise GitprocError("cannot reload: %s" % "; ".join(cannot))
        serials = {}
        for name in names:
            serials[name] = services[name].reload_serial + (1 if services[name].phase != RELOAD else 0)
            services[name].reload()
        for service in self.daemon.dependencies.reload_propagated(names):
            self.daemon.log.info(service.name, "Reloading: with %s (PropagatesReloadTo=)" % ", ".join(names))
            service.reload()
        if message.get("block") is False:
            return {"ok": True, "result": {"services": [service_status(services[n]) for n in names]}}

        def done(name):
            service = services.get(name)
            return service is None or service.reload_serial >= serials[name] or service.state not in (RUNNING, RELOADING)

        def check():
            if not all(done(n) for n in names):
                return None
            failed = ["%s: %s" % (n, services[n].reload_error) for n in names if n in services and services[n].reload_error]
            failed += ["%s is %s" % (n, services[n].state) for n in names
                       if n in services and services[n].state not in (RUNNING, RELOADING)]
            snapshot = [service_status(services[n]) for n in names if n in services]
            if failed:
                return {"ok": False, "error": "reload failed: %s" % "; ".join(failed), "result": {"services": snapshot}}
            return {"ok": True, "result": {"services": snapshot}}

        def expire():
            return {"ok": False, "error": "timed out waiting for %s to reload" % ", ".join(n for n in names if not done(n))}
        return self.daemon.server.park(conn, check, expire, self._timeout(message, DEFAULT_WAIT_TIMEOUT))

    def _action_reply(self, names, action):
        services = self.daemon.services
        problems = []
        for name in names:
            service = services.get(name)
            if service is None:
                continue
            if action == "stop" and service.state in ACTIVE_STATES:
                problems.append("%s is %s" % (name, service.state))
            elif action != "stop" and not service.is_ready() and not skipped_by_condition(service):
                problems.append("%s is %s (%s)" % (name, service.state, service.reason or describe_exit(service.last_exit)))
        snapshot = [service_status(services[n]) for n in names if n in services]
        if problems:
            return {"ok": False, "error": "%s failed: %s" % (action, "; ".join(problems)), "result": {"services": snapshot}}
        return {"ok": True, "result": {"services": snapshot}}

    def _cmd_wait(self, conn, message):
        services = self.daemon.services
        names = self._names(message)
        target = message.get("state", "running")
        if not isinstance(target, str):
            raise GitprocError("malformed request: 'state' must be a string")
        predicates = {
            "running": lambda s: s.is_ready(),
            "healthy": lambda s: s.is_ready() and s.health()[0] in (None, "healthy"),
            "stopped": lambda s: s.state in (STOPPED, EXITED, FAILED),
        }
        if target not in predicates:
            raise GitprocError("wait: state must be running, healthy or stopped, not %r" % target)
        reached = predicates[target]
        timeout = self._timeout(message, DEFAULT_WAIT_TIMEOUT)

        def check():
            if all(n in services and reached(services[n]) for n in names):
                return {"ok": True, "result": {"services": [service_status(services[n]) for n in names]}}
            lost = [(n, why) for n, why in ((n, self._cannot_come(services.get(n), target)) for n in names) if why]
            if lost:                      # no need to wait out the timeout for what cannot come
                return {"ok": False, "error": "%s will not be %s: %s" % (
                    ", ".join(n for n, _ in lost), target, "; ".join(why for _, why in lost))}
            return None

        def expire():
            late = ["%s is %s" % (n, services[n].state if n in services else "gone")
                    for n in names if not (n in services and reached(services[n]))]
            return {"ok": False, "error": "timed out after %gs waiting for %s: %s" % (timeout, target, ", ".join(late))}
        return self.daemon.server.park(conn, check, expire, timeout)

    @staticmethod
    def _cannot_come(service, target):
        """Why `service` can no longer reach `target` (running or healthy)
        unless someone acts, or None: it failed, it exited and will not
        restart, a condition kept it from starting, or a stop is wanted."""
        if service is None or target == "stopped" or service.versions.removed:
            return None if service is not None or target == "stopped" else "it is gone"
        state = service.state
        if state == FAILED:
            return "%s is failed (%s)" % (service.name, service.reason or "see its status")
        if state == EXITED:
            return "%s exited and will not restart (%s)" % (service.name, service.reason or "see its status")
        if state == STOPPED and service.want == "down":
            return "%s is stopped by the user (start it)" % service.name
        if skipped_by_condition(service):
            return "%s did not start: %s" % (service.name, service.reason)
        return None

    def _cmd_daemon_reload(self, conn, message):
        result = self.daemon.reload_config()
        deployer = self.daemon.deployer
        if deployer.remote_mode:
            self.daemon.source.after_fetch(lambda error: None, deploy=True)
        else:
            deployer.deploy_head("daemon-reload")
        return {"ok": True, "result": result}

    def _cmd_shutdown(self, conn, message):
        keep = bool(message.get("keep_services"))
        self.daemon.call_later(0, lambda: self.daemon.begin_shutdown("shutdown command", keep_services=keep))
        return {"ok": True, "result": {"pid": os.getpid(), "keep_services": keep}}

    # -- deploys -------------------------------------------------------------------------

    def _cmd_sync(self, conn, message):
        deployer = self.daemon.deployer
        deployer.sync_asked = {"allow_rewind": bool(message.get("allow_rewind"))}
        if not deployer.remote_mode:
            return plan_reply(deployer.deploy_head("sync"))
        return self._after_fresh_fetch(conn, message, lambda: deployer.last_plan, deploy=True)

    def _cmd_diff(self, conn, message):
        deployer = self.daemon.deployer
        if not deployer.remote_mode:
            return plan_reply(deployer.diff())
        return self._after_fresh_fetch(conn, message, deployer.diff, deploy=False)

    def _after_fresh_fetch(self, conn, message, make_plan, deploy):
        """Park the reply until a new fetch completed, then answer make_plan()."""
        box = {}

        def finish(error):
            box["reply"] = {"ok": False, "error": error} if error else plan_reply(make_plan())
            self.daemon.changed = True
        self.daemon.source.after_fetch(finish, deploy)
        return self.daemon.server.park(conn, lambda: box.get("reply"),
                                       lambda: {"ok": False, "error": "git fetch did not finish in time"},
                                       self._timeout(message, FETCH_TIMEOUT + 10))

    def _cmd_rollback(self, conn, message):
        self._refuse_while_shutting_down()
        if message.get("release"):
            return plan_reply(self.daemon.deployer.release_pin())
        rev = message.get("commit")
        if not isinstance(rev, str) or not rev or rev.startswith("-"):
            raise GitprocError("rollback: name a commit (an id, a tag, HEAD~2, ...)")
        return plan_reply(self.daemon.deployer.rollback(rev))

    # -- what gitproc did: events and metrics -----------------------------------------

    def _cmd_events(self, conn, message):
        names = message.get("names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise GitprocError("malformed request: 'names' must be a list of unit names")
        names = [as_unit_name(n, self.daemon.services) for n in names]
        count = message.get("count", EVENT_LIMIT)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise GitprocError("malformed request: 'count' must be a whole number")
        events = self.daemon.events.recent(names)
        if message.get("follow"):
            self.daemon.events.follow(conn, names)
        return {"ok": True, "result": {"events": events[-count:] if count else [], "follow": bool(message.get("follow"))}}

    def _cmd_metrics(self, conn, message):
        return {"ok": True, "result": {"text": prometheus_text(self.daemon)}}

    def _cmd_notify_test(self, conn, message):
        """notify test [TARGET]: a test alert; the reply once every target answered."""
        target = message.get("target")
        if target is not None and not isinstance(target, str):
            raise GitprocError("malformed request: 'target' must be a string")
        alerts = self.daemon.alerts
        deliveries = alerts.test(target)

        def forget():
            for delivery in deliveries:
                if delivery in alerts.tests:
                    alerts.tests.remove(delivery)

        def check():
            if any(d.outcome is None for d in deliveries):
                return None
            forget()
            results = [{"target": d.target["name"], "ok": d.outcome[0], "answer": d.outcome[1]} for d in deliveries]
            return {"ok": True, "result": {"targets": results}}
        def expire():
            forget()
            return {"ok": False, "error": "no answer within %gs" % (ALERT_TIMEOUT + 5)}
        return self.daemon.server.park(conn, check, expire, ALERT_TIMEOUT + 5)

    COMMANDS = {"ping": _cmd_ping, "status": _cmd_status, "list": _cmd_list, "list-timers": _cmd_list_timers,
                "list-sockets": _cmd_list_sockets,
                "start": _cmd_start,
                "stop": _cmd_stop, "restart": _cmd_restart, "reload": _cmd_reload, "wait": _cmd_wait, "shutdown": _cmd_shutdown,
                "daemon-reload": _cmd_daemon_reload,
                "sync": _cmd_sync, "diff": _cmd_diff, "rollback": _cmd_rollback, "history": _cmd_history,
                "events": _cmd_events, "metrics": _cmd_metrics, "notify-test": _cmd_notify_test}



class DaemonHost(Launcher):
    """The real ServiceHost: the Launcher's processes, plus the daemon's half
    (dependencies, AutoRollback=, changes, the deploy note)."""

    def __init__(self, daemon, exit_watch_mode=None):
        Launcher.__init__(self, daemon.config, daemon.log, daemon.selector, daemon.call_later, exit_watch_mode)
        self.daemon = daemon

    def dependency_state(self, service):
        return self.daemon.dependencies.state_of(service)

    def auto_rollback(self, service, why):
        return self.daemon.deployer.auto_rollback(service, why)

    def changed(self, service, before):
        self.daemon.service_changed(service, before)

    def deploy_note(self, service):
        return self.daemon.deployer.deploy_note(service)

    def listening_for(self, service):
        return self.daemon.listeners.listening_for(service)

    def private_tmp_in_use(self, service):
        return [path for other in self.daemon.services.values() if other is not service and other.has_process()
                for path in other.resources.private_tmp or ()]

    def namespace_peer(self, service):
        names = set(service.spec.joins_namespace_of) | {other.name for other in self.daemon.services.values()
                                                        if service.name in other.spec.joins_namespace_of}
        for name in sorted(names):
            other = self.daemon.services.get(name)
            if other is not None and other is not service and other.main.pid and other.state in (RUNNING, RELOADING):
                return other
        return None


class Daemon:
    """The loop that owns everything, the registry of services and the wiring
    of the parts: Launcher/DaemonHost (processes), Deployer (what runs),
    SourceWatcher (new commits), Dependencies, Recovery, ControlServer with
    RequestHandlers, StateStore. run() blocks until shutdown and returns an
    exit code."""

    def __init__(self, config, log, exit_watch_mode=None):
        self.config = config
        self.log = log
        import selectors
        self.selector = selectors.DefaultSelector()
        self.timers = []                  # heap of (when, sequence, Timer)
        self.timer_sequence = 0
        self.services = {}                # name -> Service, every unit of the deployment
        self.host = DaemonHost(self, exit_watch_mode)
        self.store = StateStore(config.state_file, log, self.call_later, self._snapshot)
        self.recovery = Recovery(config, log, self.call_later)
        self.dependencies = Dependencies(self.services, log, lambda name: self.deployer.before_of.get(name, ()),
                                         lambda name: name in self.deployer.specs,
                                         lambda name: name in self.deployer.activated)
        self.handlers = RequestHandlers(self)
        self.server = ControlServer(config, log, self.selector, self.call_later, self.handlers.dispatch)
        self.events = EventLog(self.server)
        self.events.store = StateStore(os.path.join(os.path.dirname(config.state_file), "events.json"), log,
                                       self.call_later, self.events.persistent, EVENTS_SAVE_INTERVAL, durable=False)
        self.deployer = Deployer(config, log, self.services, self.recovery, self.host, self.store, self.events)
        self.schedule = TimerSchedule(self)   # the timers (SPEC §17)
        self.deployer.schedule = self.schedule
        self.listeners = SocketSet(self)      # the sockets (SPEC §18)
        self.deployer.listeners = self.listeners
        self.alerts = Alerter(self)           # alerts to people (SPEC §21), raised from the events
        self.events.listener = self.alerts.observe
        self.host.snapshots = self.deployer.snapshots
        self.source = SourceWatcher(config, log, self.selector, self.call_later, self.host.exit_watcher, self.deployer)
        self.http = None                  # HttpListener, with http_listen set
        self.notify = NotifySocket(config.state_file)
        self.syslog = self._syslog_channel(config.syslog_socket)
        self.health_seen = {}             # name -> the health verdict last recorded as an event
        self.changed = False              # a service changed state since waiters were checked
        self.stopped_services = []        # services that came down since: Requires= propagates
        self.failed_services = []         # ... (and OnFailure= or OnSuccess=) of those that failed or succeeded
        self.uphold_starts = {}           # unit name -> monotonic times Upholds= started it (UPHOLD_START_LIMIT)
        self.running = False
        self.keep_services = False        # the shutdown leaves services running
        self.pid = os.getpid()            # a forked child that unwound into this code must not act as us
        self.started_wall = time.time()
        self.log_timer = None
        self.pid_fd = None
        self.wakeup_fds = None

    # -- the loop ------------------------------------------------------------------

    def call_later(self, delay, callback):
        timer = Timer(time.monotonic() + delay, callback)
        self.timer_sequence += 1
        heapq.heappush(self.timers, (timer.when, self.timer_sequence, timer))
        return timer

    def run(self, ready_fd=None):
        """Start, serve until shutdown, clean up. Errors before the daemon is ready
        go to ready_fd (for `daemon` to print) and give exit code 1."""
        try:
            require_git()
            # Every path is absolute. The daemon works where services do by
            # default ("/" for root, the user's home for a user's daemon), so
            # that they start by posix_spawn, which cannot change folders.
            os.chdir(default_working_directory())
            self.host.spawner = Spawner()
            self._acquire_pid_file()          # first: a second daemon must touch nothing
            import zlib
            instance = "%08x" % zlib.crc32(self.config.state_file.encode())
            self.host.cgroups = Cgroups(self.config.cgroup_root, instance, self.log)
            self.log.info("daemon", self.host.cgroups.describe())
            self._open_notify_socket()
            self.syslog.open()
            self.server.open()
            self.http = self._open_http(self.config.http_listen)
            self._install_signal_handlers()
            self._raise_fd_limit()
            self.deployer.verifier.check_ready()
            state = self.store.load()
            self.events.restore()
            self.recovery.restore(state)
            self.deployer.restore(state)
            self.schedule.restore(state)
            self.listeners.restore(state)
            self.log.info("daemon", "Started gitproc %s (pid %d, repo %s@%s, exit watch: %s)" % (
                __version__, os.getpid(), self.config.repo_path, self.config.branch, self.host.exit_watcher.mode))
            if self.deployer.remote_mode and not self.source.fetched_yet():
                self.log.info("daemon", "Nothing fetched from %s yet: the first fetch will deploy" % self.config.remote)
            elif not self.deployer.deploy_head("daemon start").error or self.deployer.applied:
                self.recovery.stop_orphans(self.services)
            self.source.start()
        except (GitprocError, OSError) as exc:
            message = str(exc) if isinstance(exc, GitprocError) else describe_os_error(exc)
            self.log.error("daemon", message)
            _notify(ready_fd, "error " + message)
            self._cleanup()
            return EXIT_FAILURE
        release_memory()
        _notify(ready_fd, "ok %d" % os.getpid())
        self.running = True
        self.log_timer = self.call_later(LOG_CHECK_INTERVAL, self._check_logs)
        try:
            self._loop()
        finally:
            if os.getpid() != self.pid:
                os._exit(127)             # (as in _guarded) the daemon's files are the daemon's
            self.store.save_now()
            if self.events.store.dirty:
                self.events.store.save_now()
            self.log.info("daemon", "Shutdown complete")
            self._cleanup()
        return EXIT_OK

    def _loop(self):
        while self.running:
            timeout = None
            while self.timers and self.timers[0][2].cancelled:
                heapq.heappop(self.timers)
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            events = self.selector.select(timeout)
            if len(events) > 1:
                # sd_notify first: a READY=1 or MAINPID= sent just before the
                # sender exited must count before that exit does (as in systemd).
                events.sort(key=self._notify_first)
            for key, mask in events:
                callback, argument = key.data
                self._guarded(callback, argument, mask)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, timer = heapq.heappop(self.timers)
                if not timer.cancelled:
                    timer.cancelled = True
                    self._guarded(timer.callback)
            for _ in range(100):          # a change may release another; bounded all the same
                if not self.changed:
                    break
                self.changed = False
                self._guarded(self._settle)

    def _start_on_failure(self, service, key="OnFailure"):
        """OnFailure= (or OnSuccess=): start the units it names, telling them
        which unit failed (or succeeded) and how ($MONITOR_*, as systemd sets them)."""
        monitor = {"MONITOR_UNIT": service.name + UNIT_SUFFIX, "MONITOR_SERVICE_RESULT": service.run.result}
        exit_info = service.last_exit
        if exit_info is not None:
            monitor["MONITOR_EXIT_CODE"] = "killed" if "signal" in exit_info else "exited"
            monitor["MONITOR_EXIT_STATUS"] = signal_name(exit_info["signal"])[3:] if "signal" in exit_info \
                else str(exit_info["code"])
        for name in service.spec.on_failure if key == "OnFailure" else service.spec.on_success:
            other = self.services.get(name)
            if other is None or other.versions.removed:
                self.log.warning(service.name, "%s=%s: no such unit is deployed" % (key, name))
                continue
            self.log.info(name, "Starting: %s %s (%s=)" % (service.name, "failed" if key == "OnFailure" else "succeeded",
                                                           key))
            for pulled in self.dependencies.pulled_in([name]):   # what it wants or requires, as a start does
                pulled.start()
            other.start(monitor=monitor)

    def _notify_first(self, event):
        return event[0].data[0] != self._on_notify

    def _settle(self):
        """After changes: Requires= propagates, waiting units start, parked
        replies are answered, shutdown goes on."""
        stopped, self.stopped_services = self.stopped_services, []
        for service in stopped:
            self.dependencies.stop_requiring(service)
            for other in self.dependencies.unneeded(service):
                self.log.info(other.name, "Stopping: no longer needed (StopWhenUnneeded=)")
                other.halt("no longer needed (StopWhenUnneeded=)")
        failed, self.failed_services = self.failed_services, []
        for service, key in failed:
            self._start_on_failure(service, key)
        if not self.host.shutting_down:
            for upholder, service in self.dependencies.upheld():
                starts, _ = start_limit_hit(self.uphold_starts.get(service.name, []), time.monotonic(),
                                            *UPHOLD_START_LIMIT)
                if len(starts) >= UPHOLD_START_LIMIT[1]:
                    if len(starts) == UPHOLD_START_LIMIT[1]:      # said once
                        self.log.warning(service.name, "Not started again: upheld by %s, but started %d times "
                                         "within %s (as systemd limits it)" % (upholder.name, len(starts),
                                                                               format_timespan(UPHOLD_START_LIMIT[0])))
                        starts.append(time.monotonic())
                    self.uphold_starts[service.name] = starts
                    continue
                self.uphold_starts[service.name] = starts + [time.monotonic()]
                self.log.info(service.name, "Starting: upheld by %s (Upholds=)" % upholder.name)
                service.start()
        self.dependencies.release_waiting()
        cgroups = self.host.cgroups
        if cgroups is not None and cgroups.startup and self.deployer.applied and not any(
                service.state == STARTING for service in self.services.values()):
            cgroups.end_startup(self.services.values())   # Startup*Weight= give way to *Weight=
        self.deployer.forget_removed()
        self.server.check_waiters()
        if self.host.shutting_down and not self.keep_services:
            self.running = self.dependencies.shutdown_step()

    def _guarded(self, callback, *args):
        """The catch-all boundary around each loop event: log the traceback and
        carry on. KeyboardInterrupt/SystemExit are not caught."""
        try:
            callback(*args)
        except Exception:
            if os.getpid() != self.pid:
                os._exit(127)             # a child between fork and exec: never a second daemon
            import traceback
            self.log.error("daemon", "Internal error (the daemon carries on): %s" % (
                traceback.format_exc().strip().replace("\n", " | ")))

    def service_changed(self, service, before):
        """The host's notice: a service's state or reason changed."""
        self.changed = True
        self.store.mark_dirty()
        if service.state != before:
            self.events.record("state", service.name, before, service.state, service.reason, service.main.pid, service.commit)
            self.schedule.service_changed(service, before)
            self.listeners.service_changed(service, before)
        health = service.health()[0]
        if health != self.health_seen.get(service.name) and health is not None:
            if health != "starting":
                self.events.record("health", service.name, self.health_seen.get(service.name), health,
                                   service.health()[1], service.main.pid, service.commit)
            self.health_seen[service.name] = health
        if service.state in (STOPPED, FAILED, EXITED) and not self.host.shutting_down:
            self.stopped_services.append(service)
            failed = service.state == FAILED or (service.state == EXITED and not service.succeeded)
            if failed and before not in (FAILED, EXITED) and service.spec.on_failure:
                self.failed_services.append((service, "OnFailure"))
            elif not failed and before in ACTIVE_STATES and service.spec.on_success:
                self.failed_services.append((service, "OnSuccess"))

    def info(self):
        """The daemon line of `status`."""
        deployer, source = self.deployer, self.source
        return {"pid": os.getpid(), "version": __version__, "started": self.started_wall,
                "uptime": time.time() - self.started_wall, "repo": self.config.repo_path,
                "branch": self.config.branch, "hostname": self.config.hostname,
                "commit": deployer.deployed.to_json() if deployer.deployed else None,
                "last_sync": deployer.last_sync, "exit_watch": self.host.exit_watcher.mode,
                "log_dir": self.config.log_dir, "remote": self.config.remote, "pin": deployer.target.pin,
                "last_fetch": source.last_fetch, "watch": source.mode, "poll_interval": source.poll_delay,
                "verify": deployer.verifier.describe(), "refused": deployer.refused,
                "syslog": self.syslog.describe(), "notify": self.alerts.describe() if self.alerts.targets else None,
                "cgroups": self.host.cgroups.describe() if self.host.cgroups else None,
                "http": {"listen": "%s:%d" % self.http.address, "exposed": self.http.exposed} if self.http else None}

    def _snapshot(self):
        """What state.json holds: units not deployed now keep their memory."""
        services = dict(self.recovery.saved_services)
        services.update({name: service_record(service) for name, service in self.services.items()
                         if service.log_name == name})       # Accept=yes instances are not kept
        snapshot = {"version": STATE_VERSION, "boot_id": boot_id(), "services": services,
                    "timers": self.schedule.persistent(), "sockets": self.listeners.persistent()}
        snapshot.update(self.deployer.persistent())
        return snapshot

    # -- start-up and clean-up -----------------------------------------------------

    def _acquire_pid_file(self):
        import fcntl
        path = self.config.pid_file
        makedirs(os.path.dirname(path))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise GitprocError("a gitproc daemon is already running (pid %s, pid file %s)" % (other, path))
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self.pid_fd = fd

    def _open_notify_socket(self):
        """NOTIFY_SOCKET for Type=notify units. Without it (an abstract socket
        of that name is taken) the daemon still runs, and says so: notify
        units then time out waiting for READY=1."""
        try:
            sock = self.notify.open()
        except OSError as exc:
            self.log.error("daemon", "Cannot listen for sd_notify on %s: %s; Type=notify units will not become ready" % (
                self.notify.address, describe_os_error(exc)))
            return
        self.selector.register(sock, EVENT_READ, (self._on_notify, None))
        self.host.notify_address = self.notify.address

    def _open_http(self, listen):
        """The HTTP listener on `listen` (None: none), open."""
        if not listen:
            return None
        listener = HttpListener(parse_listen_address(listen), self.log, self.selector, self.call_later,
                                HttpRoutes(self).http_reply)
        listener.open()
        return listener

    def _syslog_channel(self, setting):
        return SyslogChannel(setting, self.log, self.selector, self._service_of_pid,
                             lambda name: self.deployer.specs.get(name) if name in self.services else None,
                             self._append_to_unit_log)

    def _append_to_unit_log(self, name, lines):
        """Lines the syslog channel has for a unit: appended to its log, one
        write per loop turn and unit."""
        try:
            fd = os.open(self.config.service_log(name), os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                size = os.fstat(fd).st_size
                # after a partial line of the unit's own output, on a line of its own
                newline = "\n" if size and os.pread(fd, 1, size - 1) != b"\n" else ""
                os.write(fd, (newline + "".join(lines)).encode("utf-8", "replace"))
            finally:
                os.close(fd)
        except OSError as exc:
            self.log.warning(name, "Cannot write its syslog messages to %s: %s" % (
                self.config.service_log(name), describe_os_error(exc)))

    def _on_notify(self, _key, _mask):
        for pid, uid, fields in self.notify.receive():
            service = self._service_of_pid(pid)
            if service is None:
                self.log.debug("daemon", "sd_notify from pid %d, which is no service's: ignored" % pid)
            elif not service.accepts_notification(pid, lambda: True):
                self.log.warning(service.name, "sd_notify from pid %d ignored (NotifyAccess=%s)" % (
                    pid, service.spec.notify_accepted_from()))
            else:
                service.notified(fields, trusted=uid == 0)

    def _service_of_pid(self, pid):
        """The service a process belongs to: its main or control process, else
        the one whose cgroup (or, without cgroups, session) holds it."""
        for service in self.services.values():
            if pid in (service.main.pid, service.control.pid):
                return service
        try:
            groups = _read_text("/proc/%d/cgroup" % pid)
        except OSError:
            return None
        marker = "/gitproc/%s/" % self.host.cgroups.instance if self.host.cgroups else None
        for line in groups.splitlines():
            path = line.split(":", 2)[-1]
            if marker and marker in path:
                service = self.services.get(path.split(marker, 1)[1].split("/", 1)[0])
                if service is not None:
                    return service
        fields = read_proc_stat(pid)
        session = int(fields[3]) if fields else None
        for service in self.services.values():
            if session and session in (service.main.pid, service.control.pid):
                return service
        return None

    def _install_signal_handlers(self):
        """Handlers do nothing; set_wakeup_fd writes the signal number into a pipe
        the loop reads, so signals are handled between events, never inside one."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self.wakeup_fds = (read_fd, write_fd)
        signal.set_wakeup_fd(write_fd)
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(number, _ignore_signal)
        self.selector.register(read_fd, EVENT_READ, (self._on_signals, None))

    @staticmethod
    def _raise_fd_limit():
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def _cleanup(self):
        self.server.close()
        self.notify.close()
        self.syslog.close()
        self.schedule.close()
        self.listeners.close(self.keep_services)
        if self.http is not None:
            self.http.close()
        if not self.keep_services and self.host.cgroups is not None:
            self.host.cgroups.remove_all([service.resources.cgroup for service in self.services.values()])
        if self.wakeup_fds:
            signal.set_wakeup_fd(-1)
            for fd in self.wakeup_fds:
                os.close(fd)
        if self.pid_fd is not None:
            _unlink_quietly(self.config.pid_file)
            os.close(self.pid_fd)

    def _on_signals(self, _key, _mask):
        try:
            received = os.read(self.wakeup_fds[0], 512)
        except BlockingIOError:
            return
        for number in set(received):
            if number == signal.SIGCHLD:
                self.host.exit_watcher.on_sigchld()
            elif number in (signal.SIGTERM, signal.SIGINT):
                self.begin_shutdown("signal %s" % signal_name(number))
            elif number == signal.SIGHUP:
                self.log.info("daemon", "SIGHUP: reloading the configuration and syncing now")
                try:
                    self.reload_config()
                except GitprocError:
                    pass                  # logged; the running configuration stays
                if self.deployer.remote_mode:
                    self.source.after_fetch(lambda error: None, deploy=True)
                else:
                    self.deployer.deploy_head("SIGHUP")

    # -- configuration ---------------------------------------------------------------

    def reload_config(self):
        """daemon-reload and SIGHUP: read config.json again. What can change
        live changes; what cannot is kept and said; a bad file keeps the
        running configuration (GitprocError saying why). Returns
        {"changed": [...], "restart_needed": [...]}."""
        config = self.config
        try:
            if config.config_path and not os.path.exists(config.config_path):
                raise ConfigError("%s, read at start, is gone" % config.config_path)
            new = load_config(config.flags)
            verifier = CommitVerifier(config.repo_path, new.verify, new.allow_rewind, self.deployer.verifier.gnupg_home)
            verifier.check_ready()
        except GitprocError as exc:
            message = "config not reloaded: %s; the running configuration stays" % exc
            self.log.error("daemon", message)
            raise GitprocError(message)
        differ = [key for key in sorted(CONFIG_TYPES) if getattr(new, key) != getattr(config, key)]
        changed = [key for key in differ if key in LIVE_CONFIG_KEYS]
        restart_needed = [key for key in differ if key not in LIVE_CONFIG_KEYS]
        if "http_listen" in changed:
            old = self.http                   # closed first: the new address may use its port
            if old is not None:
                old.close()
            try:
                self.http = self._open_http(new.http_listen)
            except GitprocError as exc:
                self.http = self._open_http(config.http_listen) if old is not None else None
                message = "config not reloaded: %s; the running configuration stays" % exc
                self.log.error("daemon", message)
                raise GitprocError(message)
        for key in changed:
            setattr(config, key, getattr(new, key))
        config.config_path = new.config_path
        if "poll_interval" in changed or "max_poll_interval" in changed:
            self.source.replan_poll()
        self.log.max_bytes, self.log.backups = config.log_max_bytes, config.log_backups
        self.deployer.snapshots.limit = config.snapshot_max_bytes
        if "syslog_socket" in changed:
            self.syslog.close()
            self.syslog = self._syslog_channel(config.syslog_socket)
            self.syslog.open()
        if {"verify", "allow_rewind"} & set(changed):
            self.deployer.verifier = verifier
            self.deployer.refused = None        # the head is judged again by the new rules
        self.log.info("daemon", "Reloaded %s: %s%s" % (
            config.config_path or "the configuration", "changed " + ", ".join(changed) if changed else "nothing changed",
            "; kept until the daemon restarts: %s" % ", ".join(restart_needed) if restart_needed else ""))
        for key in restart_needed:
            self.log.warning("daemon", "%s changed in the config: it takes effect when the daemon restarts "
                                       "(shutdown --keep-services, then daemon)" % key)
        return {"changed": changed, "restart_needed": restart_needed, "config": config.config_path}

    # -- shutdown --------------------------------------------------------------------

    def begin_shutdown(self, why, keep_services=False):
        if self.host.shutting_down:
            return
        self.host.shutting_down = True
        self.keep_services = keep_services
        self.log.info("daemon", "Shutting down (%s)%s" % (why, "; services keep running" if keep_services else ""))
        self.source.kill_fetch()
        if keep_services:
            self.running = False
            return
        self.running = self.dependencies.shutdown_step()

    # -- log rotation --------------------------------------------------------------

    def _check_logs(self):
        self.log_timer = self.call_later(LOG_CHECK_INTERVAL, self._check_logs)
        for name in {service.log_name for service in self.services.values()}:   # (instances share one)
            path = self.config.service_log(name)
            try:
                if os.stat(path).st_size >= self.config.log_max_bytes:
                    rotate_service_log(path, self.config.log_backups)
                    self.log.info(name, "Rotated log %s" % path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.log.warning(name, "Cannot rotate log %s: %s" % (path, exc.strerror))


def release_memory():
    """Give the heap's free pages back to the system. Compiling gitproc.py (a
    script is compiled at every start) leaves some 8 MB of freed memory that
    glibc keeps; malloc_trim returns it, so the daemon's RSS is what it uses."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass                          # not glibc: nothing to trim, nothing lost


def _ignore_signal(_number, _frame):
    """The handler of the signals the loop reads from the wakeup pipe."""


def _notify(fd, message):
    if fd is None:
        return
    try:
        os.write(fd, message.encode("utf-8", "replace") + b"\n")
        os.close(fd)
    except OSError:
        pass


# ==== 18. command line =======================================================
# argparse subcommands; each cmd_* turns a request's result into text (or JSON
# with --json) and returns an exit code. Errors are GitprocErrors, printed by
# main() as one line.

EXAMPLES = {
    "init": ["gitproc.py init", "gitproc.py init --repo /srv/units"],
    "daemon": ["gitproc.py daemon", "gitproc.py daemon --foreground --log-level debug",
               "gitproc.py --home /tmp/gp daemon --branch production"],
    "shutdown": ["gitproc.py shutdown"],
    "daemon-reload": ["gitproc.py daemon-reload   # after editing config.json"],
    "status": ["gitproc.py status", "gitproc.py status hello", "gitproc.py status --json"],
    "list": ["gitproc.py list", "gitproc.py list --json"],
    "list-timers": ["gitproc.py list-timers", "gitproc.py list-timers --all --json"],
    "list-sockets": ["gitproc.py list-sockets", "gitproc.py list-sockets --all --json"],
    "start": ["gitproc.py start hello", "gitproc.py start web worker --no-block"],
    "stop": ["gitproc.py stop hello"],
    "restart": ["gitproc.py restart hello"],
    "reload": ["gitproc.py reload nginx", "gitproc.py reload nginx redis-server --no-block"],
    "wait": ["gitproc.py wait web --timeout 10", "gitproc.py wait web db --state stopped"],
    "logs": ["gitproc.py logs hello", "gitproc.py logs hello -n 200 -f", "gitproc.py logs --daemon"],
    "sync": ["gitproc.py sync", "gitproc.py sync --json", "gitproc.py sync --allow-rewind   # accept a force-push once"],
    "diff": ["gitproc.py diff"],
    "rollback": ["gitproc.py rollback HEAD~1", "gitproc.py rollback 4613c49", "gitproc.py rollback --release"],
    "history": ["gitproc.py history", "gitproc.py history -n 5 --json"],
    "check": ["gitproc.py check", "gitproc.py check web.service units/",
              "printf '#!/bin/sh\\nexec python3 gitproc.py check .\\n' > .git/hooks/pre-commit"],
    "events": ["gitproc.py events", "gitproc.py events -f web", "gitproc.py events --json -n 100"],
    "metrics": ["gitproc.py metrics", "curl -s http://127.0.0.1:9180/metrics   (with http_listen set)"],
    "notify": ["gitproc.py notify test", "gitproc.py notify test ops-slack"],
    "install": ["gitproc.py install", "gitproc.py install --prefix /opt/gitproc --no-service"],
    "uninstall": ["gitproc.py uninstall", "gitproc.py uninstall --prefix /opt/gitproc"],
    "completion": ["gitproc.py completion bash > /etc/bash_completion.d/gitproc", "gitproc.py completion units"],
}
STATE_COLOURS = {RUNNING: "32", RELOADING: "32", EXITED: "36", STARTING: "33", BACKOFF: "33", STOPPING: "33",
                 STOPPED: "2", FAILED: "31", "listening": "32", "waiting": "32"}


def _colour_enabled():
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _paint(text, state, enabled):
    code = STATE_COLOURS.get(state)
    return "\033[%sm%s\033[0m" % (code, text) if enabled and code else text


def _print_json(data):
    print(json.dumps(data, indent=2, sort_keys=True))


def _table(rows, colour_column=None, colour=False):
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            text = str(cell).ljust(widths[i]) if i < len(row) - 1 else str(cell)
            if i == colour_column and index > 0:
                text = _paint(text, cell, colour)
            cells.append(text)
        print("  ".join(cells).rstrip())


def _daemon_line(info):
    commit = info.get("commit")
    sync = info.get("last_sync") or {}
    sync_text = "never synced"
    if sync:
        sync_text = "synced %s %s" % (time.strftime("%H:%M:%S", time.localtime(sync["time"])), sync["result"])
        if sync.get("error") and not (sync["result"] == "refused" and info.get("refused")):
            sync_text += ": " + sync["error"]
    line = "gitproc %s  pid %d  up %s  %s@%s  %s  %s" % (
        info["version"], info["pid"], format_duration(info["uptime"]), info["repo"], info["branch"],
        "%s %s" % (commit["sha"][:7], commit["subject"]) if commit else "(nothing deployed)", sync_text)
    verify = info.get("verify") or {}
    if verify.get("kind"):
        line += "\n  verify %s signatures (%s, scope %s)%s" % (
            "SSH" if verify["kind"] == "ssh" else "OpenPGP", verify["file"], verify["scope"],
            "; rewinds allowed" if verify.get("allow_rewind") else "")
    syslog = info.get("syslog") or {}
    if syslog.get("sockets") or syslog.get("notes"):
        line += "\n  syslog %s%s" % (", ".join(syslog.get("sockets") or []) or "off", "".join(
            "; %s: %s" % item for item in sorted((syslog.get("notes") or {}).items())))
    for target in (info.get("notify") or {}).get("targets", []):
        last = target["last"]
        line += "\n  notify %s: %s" % (target["name"], "nothing sent yet" if not last else "%s %s at %s: %s" % (
            last["event"], "delivered" if last["ok"] else "NOT DELIVERED", time.strftime(
                "%H:%M:%S", time.localtime(last["time"])), last["answer"]))
    if info.get("refused"):
        line += "\n  REFUSED %s (%s): %s" % (info["refused"]["sha"][:7], info["refused"]["subject"], info["refused"]["error"])
    if info.get("http"):
        line += "\n  http %s%s" % (info["http"]["listen"], "  REACHABLE FROM THE NETWORK (http_listen is not a loopback address)"
                                   if info["http"]["exposed"] else "")
    if info.get("remote"):
        line += "\n  remote %s" % info["remote"]
        if info.get("pin"):
            line += "  PINNED to %s by rollback (until the remote branch moves on, or rollback --release)" % info["pin"]["sha"][:7]
    return line


def cmd_init(config, args):
    require_git()
    repo = config.repo_path
    if os.path.exists(os.path.join(repo, ".git")) or os.path.exists(os.path.join(repo, "HEAD")):
        raise GitprocError("%s is already a git repository; nothing to do" % repo)
    git_init_repo(repo, config.branch)
    print("Created repository %s (branch %s) with hello.service" % (repo, config.branch))
    return EXIT_OK


def cmd_daemon(config, args):
    mode = os.environ.get("GITPROC_EXIT_WATCH") or None
    if mode not in (None, "pidfd", "sigchld", "poll"):
        raise ConfigError("GITPROC_EXIT_WATCH must be pidfd, sigchld or poll")
    ready = os.environ.pop(DAEMON_READY_ENV, None)
    if ready is not None and ready.isdigit():     # the detached daemon, re-executed
        os.set_inheritable(int(ready), False)
        return _run_daemon_here(config, args, mode, int(ready))
    try:
        info = request(config, {"cmd": "ping"}, timeout=5)
    except (DaemonNotRunning, ProtocolError):
        info = None
    if info:
        raise GitprocError("a gitproc daemon is already running (pid %d, socket %s)" % (info["pid"], config.socket_path))
    require_git()
    CommitVerifier(config.repo_path, config.verify, config.allow_rewind, None).check_ready()   # before writing anything
    created = False
    if not os.path.exists(config.repo_path):
        git_init_repo(config.repo_path, config.branch, example=not config.remote)
        created = True
    created_text = "Created repository %s (branch %s) %s" % (
        config.repo_path, config.branch, "to fetch %s into" % config.remote if config.remote else "with hello.service")
    if args.foreground:
        if created:
            print(created_text, file=sys.stderr)
        close_inherited_fds(keep=(0, 1, 2))
        return _run_daemon_here(config, args, mode, None)
    outcome = _spawn_detached_daemon(config, args, mode)
    if not outcome.startswith("ok"):
        raise GitprocError(outcome[len("error "):] if outcome.startswith("error ") else outcome)
    status = request(config, {"cmd": "status"})
    info = status["daemon"]
    if created:
        print(created_text)
    commit = info.get("commit")
    print("gitproc daemon started: pid %d" % info["pid"])
    print("  repo    %s@%s%s" % (info["repo"], info["branch"], "  (fetching from %s)" % info["remote"] if info["remote"] else ""))
    if commit:
        print("  commit  %s %s" % (commit["sha"][:7], commit["subject"]))
    elif info["remote"]:
        print("  commit  none yet: fetching from %s (see: %s status)" % (info["remote"], command_name()))
    else:
        print("  commit  none (%s)" % (info.get("last_sync") or {}).get("error", "nothing deployed"))
    if info.get("refused"):
        print("  REFUSED %s (%s): %s" % (info["refused"]["sha"][:7], info["refused"]["subject"], info["refused"]["error"]))
    print("  units   %d (see: %s status)" % (len(status["services"]), command_name()))
    return EXIT_OK


def close_inherited_fds(keep):
    """Close whatever the caller left open (a shell's pipes, ...): services
    inherit only what the daemon gives them, and no caller waits on a pipe the
    daemon holds."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


# Internal: the descriptor a re-executed detached daemon reports readiness on.
DAEMON_READY_ENV = "GITPROC_READY_FD"
# Internal: where the re-executed daemon finds the bytecode compiled for it
# when the script's own __pycache__ cannot be used.
DAEMON_PYCACHE_ENV = "GITPROC_PYCACHE"
_BOOTSTRAP = ("import sys,os,importlib.util as u;p=os.environ.pop('GITPROC_PYCACHE','');o=sys.pycache_prefix;"
              "s=u.spec_from_file_location('gitproc',sys.argv[1]);g=sys.modules['gitproc']=u.module_from_spec(s);"
              "sys.pycache_prefix=p or o;c=s.loader.get_code('gitproc');sys.pycache_prefix=o;exec(c,g.__dict__);"
              "sys.exit(g.main(sys.argv[2:]))")


def _bytecode_fresh(source, cached):
    """Does the .pyc `cached` hold the current `source` (its header's magic,
    mtime and size, as the import system checks)?"""
    import importlib.util
    try:
        with open(cached, "rb") as cached_file:
            head = cached_file.read(16)
        info = os.stat(source)
    except OSError:
        return False
    return len(head) == 16 and head[:4] == importlib.util.MAGIC_NUMBER and \
        struct.unpack("<III", head[4:]) == (0, int(info.st_mtime) & 0xFFFFFFFF, info.st_size & 0xFFFFFFFF)


def _daemon_bytecode(config):
    """Compile the module for the daemon before it re-executes itself, so it
    runs from bytecode on its first start too: compiling in the daemon leaves
    its heap some 8 MB larger for good. The bytecode goes where the import
    system looks (the script's __pycache__, or PYTHONPYCACHEPREFIX); where it
    may not be written there (a read-only folder, PYTHONDONTWRITEBYTECODE) it
    goes under the state folder, and the returned prefix says so. None: use
    the usual place. Failing to compile is not an error: the daemon then
    compiles the source itself, as before."""
    umask = os.umask(0o022)           # the cache's folders as gitproc makes any: 0755, whatever the shell's umask
    try:
        return _compile_for_daemon(config, os.path.abspath(__file__))
    finally:
        os.umask(umask)


def _compile_for_daemon(config, source):
    import importlib.util
    import py_compile
    usual = importlib.util.cache_from_source(source)
    if _bytecode_fresh(source, usual):
        return None
    if not sys.dont_write_bytecode:
        try:
            py_compile.compile(source, cfile=usual, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
            return None
        except (OSError, py_compile.PyCompileError):
            pass
    prefix, sys.pycache_prefix = sys.pycache_prefix, os.path.join(os.path.dirname(config.state_file), "pycache")
    try:
        cached = importlib.util.cache_from_source(source)
        if not _bytecode_fresh(source, cached):
            py_compile.compile(source, cfile=cached, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
        return sys.pycache_prefix
    except (OSError, py_compile.PyCompileError):
        return None
    finally:
        sys.pycache_prefix = prefix


def _run_daemon_here(config, args, mode, ready_fd):
    """Run the daemon in this process. A script run as __main__ keeps the parse
    tree of the whole file (some 8 MB here) alive until it returns, so the
    process first re-executes itself as `python3 -c` importing gitproc as a
    module: same pid, descriptors and environment, a smaller daemon."""
    if __name__ == "__main__" and sys.executable:
        if ready_fd is not None:
            os.set_inheritable(ready_fd, True)
            os.environ[DAEMON_READY_ENV] = str(ready_fd)
        prefix = _daemon_bytecode(config)
        if prefix:
            os.environ[DAEMON_PYCACHE_ENV] = prefix
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-c", _BOOTSTRAP, os.path.abspath(__file__)] + args.argv)
    log = DaemonLog(config.daemon_log, args.log_level, sys.stderr if ready_fd is None else None,
                    config.log_max_bytes, config.log_backups)
    return Daemon(config, log, mode).run(ready_fd=ready_fd)


def _spawn_detached_daemon(config, args, mode):
    """Double fork: the daemon is re-parented to init, in a session of its own,
    with no terminal. A pipe reports 'ok PID' or 'error MESSAGE' once the daemon
    is listening (or failed); EOF without a word means it died at start."""
    makedirs(config.log_dir)
    ready_r, ready_w = os.pipe()
    first = os.fork()
    if first == 0:
        os.close(ready_r)
        code = EXIT_FAILURE
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            os.umask(0o022)               # (the daemon changes to "/" itself, after the re-exec
                                          # that reads relative paths of the command line again)
            null_fd = os.open(os.devnull, os.O_RDWR)
            log_fd = os.open(config.daemon_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            os.dup2(null_fd, 0)
            os.dup2(null_fd, 1)
            os.dup2(log_fd, 2)            # stray tracebacks land in daemon.log
            close_inherited_fds(keep=(0, 1, 2, ready_w))
            code = _run_daemon_here(config, args, mode, ready_w)
        except BaseException as exc:
            _notify(ready_w, "error daemon failed to start: %s" % exc)
        finally:
            os._exit(code)
    os.close(ready_w)
    os.waitpid(first, 0)
    message = read_until_eof(ready_r).decode("utf-8", "replace").strip()
    os.close(ready_r)
    return message or "error the daemon exited while starting; see %s" % config.daemon_log


# What a deploy does to each kind of unit: (done, not done yet) per step.
PLAN_VERBS = {"service": {"added": ("started", "would start"), "changed": ("restarted", "would restart"),
                          "removed": ("stopped", "would stop")},
              TIMER_SUFFIX: {"added": ("armed", "would arm"), "changed": ("re-planned", "would re-plan"),
                             "removed": ("disarmed", "would disarm")},
              SOCKET_SUFFIX: {"added": ("listening", "would listen"),
                              "changed": ("changed, its service restarted", "would change, its service restart"),
                              "removed": ("closed", "would close")}}


def _print_plan(plan, done):
    """The plan of a deploy: carried out (done=True, `sync`) or not (`diff`)."""
    commit = plan["commit"]
    label = "%s %s" % (commit["sha"][:7], commit["subject"])
    if plan["noop"]:
        print("%s: already deployed, nothing to do" % label)
    else:
        previous = " (deployed before: %s)" % plan["previous"][:7] if plan.get("previous") else ""
        print("%s %s%s" % ("deployed" if done else "would deploy", label, previous))
    if plan.get("rollback_commit"):
        print("  rollback commit %s restores the units of %s" % (plan["rollback_commit"][:7], plan["target"]["sha"][:7]))
    def verb(name, step):                 # a timer or socket has no process of its own
        kind = os.path.splitext(name)[1] if name.endswith((TIMER_SUFFIX, SOCKET_SUFFIX)) else "service"
        verbs = PLAN_VERBS[kind][step] if step != "changed" or name not in plan.get("reload", ()) else \
            ("reloaded", "would reload")
        return verbs[0] if done else verbs[1]
    rows = [("+", name, verb(name, "added")) for name in plan["added"]]
    for name in plan["changed"]:
        what = list(plan["changes"][name])
        if plan.get("files", {}).get(name):
            what.append("files: " + some_paths(plan["files"][name]))
        rows.append(("~", name, "%s (%s)" % (verb(name, "changed"), ", ".join(what))))
    rows += [("-", name, verb(name, "removed")) for name in plan["removed"]]
    rows += [(".", name, "skipped: " + why) for name, why in sorted(plan["skipped"].items())]
    for mark, name, what in rows:
        print("  %s %-24s %s" % (mark, name, what))
    if plan["unchanged"]:
        print("  = %d unchanged" % len(plan["unchanged"]))
    for name, what in sorted(plan.get("drift", {}).items()):
        print("  ^ %-24s %s" % (name, what))
    for line in plan["invalid"]:
        print("  ! invalid, not deployed: %s" % line)
    for line in plan.get("warnings", []):
        print("  ? %s" % line)
    if not plan["noop"]:
        for line in plan.get("not_run", []):
            print("  . %s" % line)
    if plan.get("outside"):
        print("  no unit touched: the commit changes %s, outside every unit's folder" % some_paths(plan["outside"]))


def _cmd_plan(action):
    """`sync` (carries out the plan) and `diff` (only shows it)."""
    def run(config, args):
        payload = {"cmd": action}
        if getattr(args, "allow_rewind", False):
            payload["allow_rewind"] = True
        result = request(config, payload, timeout=FETCH_TIMEOUT + 15)
        if args.json:
            _print_json(result)
        else:
            _print_plan(result, done=action == "sync")
        return EXIT_OK
    return run


def cmd_rollback(config, args):
    if bool(args.commit) == bool(args.release):
        raise UsageError("rollback: name a COMMIT, or use --release (remote mode)")
    result = request(config, {"cmd": "rollback", "commit": args.commit, "release": args.release})
    if args.json:
        _print_json(result)
        return EXIT_OK
    if args.release:
        print("rollback pin released")
    elif result.get("pinned"):
        print("pinned to %s until the remote branch moves on (rollback --release follows it again)" % result["target"]["sha"][:7])
    elif result.get("rollback_commit") is None and "rollback_commit" in result:
        print("the unit files already match %s; no rollback commit needed" % result["target"]["sha"][:7])
    _print_plan(result, done=True)
    return EXIT_OK


def cmd_daemon_reload(config, args):
    result = request(config, {"cmd": "daemon-reload"})
    if args.json:
        _print_json(result)
        return EXIT_OK
    print("reloaded %s: %s" % (result["config"] or "the configuration (no config file)",
                               "changed " + ", ".join(result["changed"]) if result["changed"] else "nothing changed"))
    if result["restart_needed"]:
        print("kept until the daemon restarts (shutdown --keep-services, then daemon): %s" % ", ".join(
            result["restart_needed"]))
    return EXIT_OK


def cmd_history(config, args):
    result = request(config, {"cmd": "history", "count": args.count})
    if args.json:
        _print_json(result)
        return EXIT_OK
    entries = list(reversed(result["history"]))
    if not entries:
        print("no deployments yet")
        return EXIT_OK
    rows = [("TIME", "COMMIT", "OUTCOME", "TRIGGER", "UNITS", "SUBJECT")]
    for entry in entries:
        files = entry.get("files") or {}
        touched = ["+" + n for n in entry["added"]] + ["~" + n + (" (%s)" % some_paths(files[n], 3) if files.get(n) else "")
                                                        for n in entry["changed"]] + ["-" + n for n in entry["removed"]]
        if entry["invalid"]:
            touched.append("!%d invalid" % len(entry["invalid"]))
        if not touched and entry.get("outside"):
            touched.append("no unit (%s)" % some_paths(entry["outside"], 3))
        rows.append((format_time(entry["time"]), (entry["commit"] or "-")[:7], entry["outcome"], entry.get("trigger", "-"),
                     " ".join(touched) or "-", entry.get("error") or entry["subject"] or ""))
    _table(rows)
    return EXIT_OK


def cmd_shutdown(config, args):
    result = request(config, {"cmd": "shutdown", "keep_services": args.keep_services})
    pid = result["pid"]
    deadline = time.monotonic() + args.timeout
    while os.path.exists("/proc/%d" % pid) and (read_proc_stat(pid) or [b"Z"])[0] != b"Z":
        if time.monotonic() > deadline:
            raise GitprocError("the daemon (pid %d) is still stopping after %ds; see %s" % (pid, args.timeout, config.daemon_log))
        time.sleep(0.02)
    if args.json:
        _print_json(result)
    else:
        print("gitproc daemon (pid %d) stopped%s" % (pid, "; services keep running" if args.keep_services else ""))
    return EXIT_OK


def cmd_status(config, args):
    result = request(config, {"cmd": "status", "names": args.names})
    services, timers, sockets = result["services"], result.get("timers", []), result.get("sockets", [])
    not_running = [s["name"] for s in services if s["state"] != RUNNING] + [
        t["name"] for t in timers + sockets if t["state"] in ("stopped", "failed")]
    if args.json:
        _print_json(result)
        return EXIT_NOT_RUNNING if args.names and not_running else EXIT_OK
    colour = _colour_enabled()
    if args.names:
        for index, service in enumerate(services):
            if index:
                print()
            _print_service_block(service, result["daemon"], colour)
        for index, timer in enumerate(timers):
            if index or services:
                print()
            _print_timer_block(timer, colour)
        for index, listener in enumerate(sockets):
            if index or services or timers:
                print()
            _print_socket_block(listener, colour)
        return EXIT_NOT_RUNNING if not_running else EXIT_OK
    print(_daemon_line(result["daemon"]))
    rows = [("NAME", "STATE", "PID", "UPTIME", "RESTARTS", "HEALTH", "MEMORY")]
    for s in services:
        rows.append((s["name"], s["state"], s["pid"] or "-", format_duration(s["uptime"]) if s["uptime"] is not None else "-",
                     s["restarts"], s["health"] or "-", format_bytes(s["memory"])))
    if services:
        print()
        _table(rows, colour_column=1, colour=colour)
    else:
        print("\nno units deployed")
    if timers:
        print()
        _table([("TIMER", "STATE", "NEXT", "LAST", "ACTIVATES")] + [
            (t["name"], t["state"], _when(t["next"]), _when(t["last_trigger"]), t["unit"]) for t in timers],
            colour_column=1, colour=colour)
    if sockets:
        print()
        _table([("SOCKET", "STATE", "LISTEN", "ACCEPTED", "ACTIVATES")] + [
            (s["name"], s["state"], ", ".join(s["listen"]), s["accepted_total"] if s["accept"] else "-", s["unit"])
            for s in sockets], colour_column=1, colour=colour)
    not_run = sorted(os.path.basename(p["path"]) for p in result["problems"] if p.get("code") in ("other-unit", "activated"))
    if not_run:
        print("\nnot run by gitproc: %s (see: list)" % ", ".join(not_run))
    errors = [p for p in result["problems"] if p["severity"] == "error"]
    if errors:
        running = {s["name"] for s in services} | {t["name"] for t in timers + sockets}
        print("\ninvalid units (not deployed):")
        for problem in errors:
            print("  %s (%s)" % (Diagnostic(**problem), "its earlier good version keeps running"
                                 if problem.get("unit") in running else "nothing runs for it: it has no earlier good version"))
    return EXIT_OK


def _when(wall, now=None):
    """A time as systemctl list-timers shows it: weekday, date, time, zone."""
    return time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(wall)) if wall else "-"


def _print_timer_block(t, colour):
    print("%s %s%s" % (_paint("\u25cf", t["state"], colour), t["name"], " - " + t["description"] if t["description"] else ""))
    now = time.time()
    lines = [("Unit", t["path"]),
             ("State", "%s%s" % (_paint(t["state"], t["state"], colour), "; " + t["reason"] if t["reason"] else ""))]
    if t["next"]:
        lines.append(("Trigger", "%s; %s left (%s)" % (_when(t["next"]), format_duration(t["next"] - now), t["next_cause"])))
    lines += [("Schedule", calendar) for calendar in t["calendars"]]
    lines.append(("Last", "%s; %s ago" % (_when(t["last_trigger"]), format_duration(now - t["last_trigger"]))
                  if t["last_trigger"] else "never"))
    service = t["service"] or {}
    lines.append(("Activates", "%s (%s%s)" % (t["unit"], service.get("state", "not deployed"), ", last run: " + (
        "success" if service.get("last_exit") == {"code": 0} else describe_exit(service["last_exit"]))
        if service.get("last_exit") else "")))
    lines.append(("Triggers", t["triggers_total"]))
    for entry in t.get("not_applied", []):
        lines.append(("Not applied", "%s=%s (%s)" % (entry["key"], entry["value"], entry["why"])))
    for label, value in lines:
        print("%10s: %s" % (label, value))


def _print_socket_block(s, colour):
    print("%s %s%s" % (_paint("\u25cf", s["state"], colour), s["name"], " - " + s["description"] if s["description"] else ""))
    lines = [("Unit", s["path"]),
             ("State", "%s%s" % (_paint(s["state"], s["state"], colour), "; " + s["reason"] if s["reason"] else ""))]
    lines += [("Listen", address) for address in s["listen"]]
    service = s["service"] or {}
    lines.append(("Activates", "%s (%s)" % (s["unit"], "one instance per connection" if s["accept"]
                                            else service.get("state", "not deployed"))))
    lines += [("Accepted", s["accepted_total"]),
              ("Connected", "%d (MaxConnections=%d)" % (s["connected"], s["max_connections"]))]
    if s["accept"]:
        lines.append(("Refused", s["refused_total"]))
    lines.append(("Triggers", "%d%s" % (s["triggers_total"], "; last %s" % _when(s["last_trigger"])
                                         if s["last_trigger"] else "")))
    for entry in s.get("not_applied", []):
        lines.append(("Not applied", "%s=%s (%s)" % (entry["key"], entry["value"], entry["why"])))
    for label, value in lines:
        print("%10s: %s" % (label, value))


def cmd_list_sockets(config, args):
    result = request(config, {"cmd": "list-sockets", "all": args.all})
    if args.json:
        _print_json(result)
        return EXIT_OK
    rows = [("LISTEN", "UNIT", "STATE", "ACTIVATES")]
    for s in result["sockets"]:
        for address in s["listen"]:
            rows.append((address, s["name"], s["state"], s["unit"] if not s["accept"] else s["unit"] + " (per connection)"))
    return _print_listed(rows, len(result["sockets"]), "socket", args.all)


def cmd_list_timers(config, args):
    result = request(config, {"cmd": "list-timers", "all": args.all})
    if args.json:
        _print_json(result)
        return EXIT_OK
    now = time.time()
    timers = sorted(result["timers"], key=lambda t: (t["next"] is None, t["next"] or 0, t["name"]))
    rows = [("NEXT", "LEFT", "LAST", "PASSED", "UNIT", "ACTIVATES")]
    for t in timers:
        rows.append((_when(t["next"]), format_duration(t["next"] - now) + " left" if t["next"] else "-",
                     _when(t["last_trigger"]), format_duration(now - t["last_trigger"]) + " ago" if t["last_trigger"] else "-",
                     t["name"], t["unit"]))
    return _print_listed(rows, len(timers), "timer", args.all)


def _print_listed(rows, count, what, everything):
    """The table of list-timers or list-sockets, and its count, as systemctl's."""
    _table(rows)
    print("\n%d %s%s listed." % (count, what, "" if count == 1 else "s"))
    if not everything:
        print("Pass --all to see stopped %ss, too." % what)
    return EXIT_OK


def _print_service_block(s, daemon_info, colour):
    print("%s %s%s" % (_paint("\u25cf", s["state"], colour), s["name"], " - " + s["description"] if s["description"] else ""))
    lines = [
        ("Unit", "%s in %s (commit %s)" % (s["path"], daemon_info["repo"], (s["commit"] or "?")[:7])),
    ]
    sources = s.get("sources") or [s["path"]]
    if sources[0] != s["path"]:
        lines.append(("Template", sources[0]))
    lines += [("Drop-In", source) for source in sources[1:]]
    if s.get("folder"):
        folder = s["folder"]
        count = "%d file%s, %s; " % (folder["files"], "" if folder["files"] == 1 else "s", format_bytes(folder["bytes"])) \
            if folder["files"] is not None else ""
        lines.append(("Files", "%s/ (%stree %s) at %s" % (folder["path"], count, folder["tree"][:7], folder.get("link", "?"))))
    lines += [
        ("State", "%s%s since %s (%s ago)%s" % (_paint(s["state"], s["state"], colour),
                                                 " (%s)" % s["phase"] if s.get("phase") else "", format_time(s["since"]),
                                               format_duration(time.time() - s["since"]),
                                               "; " + s["reason"] if s["reason"] else "")),
        ("Type", s["type"]),
        ("Main PID", s["pid"] or "-"),
    ]
    if s.get("control_pid"):
        lines.append(("Control", "%d: %s" % (s["control_pid"], s["control"])))
    if s.get("status_text"):
        lines.append(("Status", '"%s"' % s["status_text"]))
    lines += [
        ("Memory", format_bytes(s["memory"])),
        ("CPU", "%.2fs" % s["cpu_seconds"] if s["cpu_seconds"] is not None else "-"),
        ("Last exit", describe_exit(s["last_exit"])),
        ("Restarts", s["restarts"]),
        ("Health", s["health"] or "no health check"),
    ]
    if s.get("rolled_back"):
        back = s["rolled_back"]
        lines.append(("Rollback", "the version of %s failed (%s); running the version of %s" % (
            back["from"][:7], back["why"], back["to"][:7])))
    for entry in s.get("not_applied", []):
        lines.append(("Not applied", "%s=%s (%s)" % (entry["key"], entry["value"], entry["why"])))
    if s.get("seccomp"):
        lines.append(("Seccomp", "%d filter%s, loaded last before exec" % (len(s["seccomp"]),
                                                                          "" if len(s["seccomp"]) == 1 else "s")))
        lines += [("", line) for line in s["seccomp"]]
    for warning in s.get("warnings", []):
        lines.append(("Warning", warning))
    for limit in s["limits"]:
        value = limit["value"]
        if limit["key"].startswith("Memory") and isinstance(value, int):
            value = format_bytes(value)
        elif limit["key"] == "CPUQuota":
            value = "%g%%" % value
        elif limit["key"] == "AllowedCPUs":
            value = " ".join(map(str, value))
        lines.append(("Limit", "%s=%s %s" % (limit["key"], value, "applied" if limit["applied"] else "not applied: " + limit["why"])))
    for label, value in lines:
        print("%10s: %s" % (label, value) if label else "%10s  %s" % ("", value))
    if s.get("log_tail"):
        print()
        for line in s["log_tail"]:
            print("  " + line)


def cmd_list(config, args):
    result = request(config, {"cmd": "list"})
    if args.json:
        _print_json(result)
        return EXIT_OK
    rows = [("NAME", "STATE", "FILE")] + [(u["name"], u["state"], (u["path"] or u["description"]) + (
        "  (%d key%s ignored: see status %s)" % (u["warnings"], "s" if u["warnings"] > 1 else "", u["name"])
        if u.get("warnings") else ""))
        for u in result["units"]]
    if result["units"]:
        _table(rows, colour_column=1, colour=_colour_enabled())
    else:
        print("no units deployed")
    if result["invalid"]:
        print("\nfailed to load:")
        for problem in result["invalid"]:
            print("  " + str(Diagnostic(**problem)))
    return EXIT_OK


def _cmd_action(action):
    def run(config, args):
        payload = {"cmd": action, "names": args.names, "block": not args.no_block, "timeout": args.timeout}
        result = request(config, payload, timeout=args.timeout + 5)
        if args.json:
            _print_json(result)
            return EXIT_OK
        for s in result["services"]:
            print("%s: %s%s" % (s["name"], s["state"], " (pid %d)" % s["pid"] if s["pid"] else
                                " (%s)" % s["reason"] if s["state"] == STOPPED and s.get("reason") else ""))
        for t in result.get("timers", []):
            print("%s: %s%s" % (t["name"], t["state"], " (next: %s)" % _when(t["next"]) if t["next"] else
                                " (%s)" % t["reason"] if t["reason"] else ""))
        return EXIT_OK
    return run


def cmd_wait(config, args):
    result = request(config, {"cmd": "wait", "names": args.names, "state": args.state, "timeout": args.timeout},
                     timeout=args.timeout + 5)
    if args.json:
        _print_json(result)
    else:
        for s in result["services"]:
            print("%s: %s" % (s["name"], s["state"]))
    return EXIT_OK


IDENT_SUFFIX = ".ident"             # beside a unit's log: its SyslogIdentifier=
LEVEL_SUFFIX = ".level"             # ... and its SyslogLevel=, where not info


class _LogView:
    """A stream of a unit's log lines as `logs` shows them: a syslog line's
    <PRIORITY> taken off (and lines less urgent than `most` left out, with a
    line of the unit's own output counting as `default`, info unless
    SyslogLevel= says otherwise); `prefix` (SyslogIdentifier=) before the
    unit's own lines."""

    def __init__(self, out, prefix="", most=7, default=6):
        self.out, self.prefix, self.most, self.default = out, prefix, most, default
        self.pending = ""

    def write(self, text):
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            self._line(line + "\n")

    def _line(self, line):
        match = _PRIORITY_PREFIX_RE.match(line)
        if match:
            priority, line = int(match.group(1)), line[match.end():]
            if self.prefix and not _SYSLOG_LINE_RE.match(line):     # a unit's own <N> line (sd-daemon's prefix)
                line = self.prefix + line
        else:
            priority, line = self.default, self.prefix + line
        if priority <= self.most:
            self.out.write(line)

    def flush(self):
        self.out.flush()


def cmd_logs(config, args):
    if args.daemon:
        path = config.daemon_log
    elif args.name:
        args.name = as_unit_name(args.name, lambda name: os.path.exists(config.service_log(name)))
        problem = unit_name_problem(args.name)
        if problem:
            raise UsageError(problem)
        path = config.service_log(args.name)
    else:
        raise UsageError("logs: name a unit, or use --daemon")
    if args.json and args.follow:
        raise UsageError("logs: --json and -f do not go together")
    if not os.path.exists(path):
        raise GitprocError("no log yet for %s (%s does not exist)" % (args.name or "the daemon", path))
    import io
    try:
        most = parse_priority(args.priority) if args.priority else 7
    except ValueError as exc:
        raise UsageError("logs -p: %s" % exc)
    shown_up_to = os.path.getsize(path)  # -f goes on from here: nothing written meanwhile is lost
    identifier, level = None, 6
    if args.name:
        try:
            identifier = _read_text(path + IDENT_SUFFIX)
        except OSError:
            pass
        try:
            level = parse_priority(_read_text(path + LEVEL_SUFFIX))
        except (OSError, ValueError):
            pass
    view = io.StringIO()
    lines = tail_lines(path, args.lines if most == 7 else max(args.lines * 20, 2000), end=shown_up_to)
    _LogView(view, identifier + ": " if identifier else "", most, level).write("".join(line + "\n" for line in lines))
    lines = view.getvalue().splitlines()[-args.lines:] if args.lines else []
    if args.json:
        _print_json({"path": path, "lines": lines, "syslog_identifier": identifier})
        return EXIT_OK
    out = _LogView(sys.stdout, identifier + ": " if identifier else "", most, level)
    for line in lines:
        sys.stdout.write(line + "\n")
    if args.follow:
        out.flush()
        try:
            follow_file(path, out, start=shown_up_to)
        except KeyboardInterrupt:
            pass
    return EXIT_OK


def follow_file(path, out, stop=None, interval=0.2, start=None):
    """Print what is appended to `path` (from offset `start`, by default its
    end), across rotation: a rename (daemon.log) or a copy-and-truncate
    (service logs). Both are seen by PATH.1 changing (a new file there),
    checked before each read; what was missed in the old file is then read
    from PATH.1."""
    def identity(name):
        try:
            info = os.stat(name)
            return (info.st_dev, info.st_ino)
        except OSError:
            return None
    log_file = open(path, "rb")
    end = log_file.seek(0, os.SEEK_END)
    if start is not None and start <= end:
        log_file.seek(start)              # what came after the lines already shown
    rotated = identity(path + ".1")
    try:
        while stop is None or not stop():
            now_rotated = identity(path + ".1")
            if now_rotated != rotated and now_rotated is not None:
                rotated = now_rotated
                if now_rotated == identity("/proc/self/fd/%d" % log_file.fileno()):
                    out.write(log_file.read().decode("utf-8", "replace"))     # renamed: finish it
                else:
                    try:                      # copied then truncated: the rest is in PATH.1
                        with open(path + ".1", "rb") as copy:
                            copy.seek(log_file.tell())
                            out.write(copy.read().decode("utf-8", "replace"))
                    except OSError:
                        pass
                log_file.close()
                log_file = _open_once_there(path, interval, stop)   # a renamed log's successor may come later
                if log_file is None:
                    return
                continue
            data = log_file.read()
            if data:
                out.write(data.decode("utf-8", "replace"))
                out.flush()
                continue
            try:
                shrunk = os.stat(path).st_size < log_file.tell()
            except OSError:
                shrunk = False                # renamed away just now: seen at the next turn
            if shrunk:
                log_file.seek(0)              # truncated with no copy kept (log_backups=0)
                continue
            time.sleep(interval)
    finally:
        if log_file is not None:
            log_file.close()


def _open_once_there(path, interval, stop):
    """`path` opened as soon as it exists again, or None once `stop()`."""
    while stop is None or not stop():
        try:
            return open(path, "rb")
        except FileNotFoundError:
            time.sleep(interval)
    return None


def format_event(event):
    """One line of `events`: time, unit, what happened."""
    what = {"state": "%(from)s -> %(to)s", "health": "health %(from)s -> %(to)s",
            "deploy": "deploy %(from).7s -> %(to).7s", "rollback": "rolled back %(from).7s -> %(to).7s"}.get(event["event"], "%(event)s")
    text = what % {key: event.get(key) or "-" for key in ("from", "to", "event")}
    details = [event["reason"]] if event.get("reason") else []
    if event.get("pid"):
        details.append("pid %d" % event["pid"])
    if event.get("commit"):
        details.append("commit %s" % event["commit"][:7])
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"])) + ".%03d" % (int(event["time"] * 1000) % 1000)
    return "%s %-16s %s%s" % (stamp, event.get("unit") or "(daemon)", text, " (%s)" % "; ".join(details) if details else "")


def cmd_events(config, args):
    payload = {"cmd": "events", "names": args.names, "count": args.lines, "follow": args.follow}
    stream = request_stream(config, payload)
    show = (lambda event: print(json.dumps(event, sort_keys=True))) if args.json else (lambda event: print(format_event(event)))
    try:
        for event in next(stream)["events"]:
            show(event)
        sys.stdout.flush()
        for message in stream if args.follow else ():
            if "event" in message:
                show(message["event"])
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()
    return EXIT_OK


def cmd_metrics(config, args):
    sys.stdout.write(request(config, {"cmd": "metrics"})["text"])
    return EXIT_OK


def cmd_notify(config, args):
    """notify test [TARGET]: a test alert, and what each target answered."""
    result = request(config, {"cmd": "notify-test", "target": args.target}, timeout=ALERT_TIMEOUT + 10)
    if args.json:
        _print_json(result)
    else:
        for entry in result["targets"]:
            print("%s: %s (%s)" % (entry["target"], "delivered" if entry["ok"] else "NOT DELIVERED", entry["answer"]))
    return EXIT_OK if all(entry["ok"] for entry in result["targets"]) else EXIT_FAILURE


def cmd_check(config, args):
    paths = args.paths or [config.repo_path]
    named = set()
    if args.security:                 # check --security web: the unit web.service of the repository
        named = {p if p.endswith(UNIT_SUFFIXES) else p + UNIT_SUFFIX for p in paths
                 if "/" not in p and not os.path.exists(p)}
        paths = [p for p in paths if p not in named and p + UNIT_SUFFIX not in named] or [config.repo_path]
    files, problems, others = [], [], []
    for path in paths:
        if os.path.isdir(path):
            for folder, subfolders, names in os.walk(path):
                subfolders[:] = sorted(d for d in subfolders if d != ".git")
                files.extend(_disk_unit_file(os.path.join(folder, name)) for name in sorted(names))
                others.extend(os.path.join(folder, name) for name in sorted(names) if is_other_unit(name))
        elif os.path.exists(path):
            if is_other_unit(path):
                others.append(path)
                continue
            if not path.endswith(UNIT_SUFFIXES):
                problems.append(Diagnostic(path, 1, "error", "not a unit file: the name must end in .service, "
                                           ".timer or .socket (or be a unit of another type: %s)" % " ".join(sorted(OTHER_UNIT_TYPES))))
                continue
            files.append(_disk_unit_file(path))
            stem, suffix = os.path.splitext(os.path.basename(path))
            prefix, at, _ = stem.partition("@")
            beside = [path] + ([os.path.join(os.path.dirname(path), prefix + "@" + suffix)] if at else [])
            if suffix in (TIMER_SUFFIX, SOCKET_SUFFIX):   # the service it starts, when it sits beside it
                beside += [os.path.join(os.path.dirname(path), stem + name) for name in (UNIT_SUFFIX, "@" + UNIT_SUFFIX)]
            for unit_path in beside:      # an instance's template, and the drop-ins of both, are read with it
                if unit_path != path and os.path.exists(unit_path):
                    files.append(_disk_unit_file(unit_path))
                drop_ins = unit_path + ".d"
                if os.path.isdir(drop_ins):
                    files.extend(_disk_unit_file(os.path.join(drop_ins, name)) for name in sorted(os.listdir(drop_ins)))
        else:
            problems.append(Diagnostic(path, 1, "error", "no such file or folder"))
    composed, found = compose_units([f for f in files if f is not None], os.readlink, lone_templates=True)
    problems.extend(found)
    entries = []
    for name, path, sources, _ in composed:
        data = []
        for source, _ in sources:
            try:
                with open(source, "rb") as unit_file:
                    data.append((source, unit_file.read(MAX_UNIT_FILE_BYTES + 1)))
            except OSError as exc:
                problems.append(Diagnostic(source, 1, "error", "cannot read: %s" % exc.strerror))
                break
        else:
            entries.append((name, path, data, ""))
    # A unit owns its folder, unless that is a repository's root (SPEC §13).
    folders = {os.path.dirname(path): OwnedFolder(os.path.abspath(os.path.dirname(path)), None)
               for _, path, _, _ in entries if not os.path.exists(os.path.join(os.path.dirname(path), ".git"))}
    for path in others:
        try:
            with open(path, "rb") as unit_file:
                problems.extend(other_unit_problems(path, unit_file.read(MAX_UNIT_FILE_BYTES).decode("utf-8", "replace")))
        except OSError as exc:
            problems.append(Diagnostic(path, 1, "error", "cannot read: %s" % exc.strerror))
    specs, found = check_unit_tree(entries, folders=folders)
    problems.extend(found)
    templates = {_strip_suffix(name, UNIT_SUFFIX) for name, _, _, _ in entries if name.endswith(TEMPLATE_SUFFIX)}
    for suffix in (TIMER_SUFFIX, SOCKET_SUFFIX):
        problems.extend(check_activators(entries, suffix, set(specs) | templates)[1])
    problems.extend(_missing_accounts(specs))
    entries = [entry for entry in entries if not entry[0].endswith(TEMPLATE_SUFFIX)]
    errors = sum(1 for p in problems if p.severity == "error")
    exposures = {name: security_exposure(spec) for name, spec in sorted(specs.items())
                 if args.security and (not named or name + UNIT_SUFFIX in named or name in named)}
    for name in sorted(named - {n + UNIT_SUFFIX for n in exposures} - set(exposures)):
        problems.append(Diagnostic(name, 1, "error", "no such service in %s" % " ".join(paths)))
        errors += 1
    if args.json:
        _print_json(dict({"units": len(entries), "errors": errors, "problems": [p.to_json() for p in problems]},
                         **({"security": exposures} if args.security else {})))
    else:
        for problem in problems:
            print(problem)
        for name, rows in exposures.items():
            print("\n%s: %d of %d protections in force" % (name, sum(1 for row in rows if row["state"] == "applied"),
                                                             len(rows)))
            _table([("KEY", "SETTING", "STATE", "PROTECTS FROM")] +
                   [(row["key"] + "=", shorten(row["value"] or "-", 44), row["state"], row["protects"]) for row in rows])
        sys.stdout.flush()
        print("%d unit%s checked: %d error%s, %d warning%s" % (
            len(entries), "" if len(entries) == 1 else "s", errors, "" if errors == 1 else "s",
            len(problems) - errors, "" if len(problems) - errors == 1 else "s"), file=sys.stderr)
    return EXIT_FAILURE if errors else EXIT_OK


def _missing_accounts(specs):
    """Warnings for a User= or Group= this machine does not have: the unit
    would fail at each start (systemd's exit code 217/USER)."""
    import grp
    import pwd
    problems = []
    for name, spec in sorted(specs.items()):
        for key, account, lookup in (("User", spec.user, pwd.getpwnam), ("Group", spec.group, grp.getgrnam)):
            if not account or account.isdigit() or "%" in account:
                continue
            try:
                lookup(account)
            except KeyError:
                if spec.dynamic_user:     # DynamicUser= makes them
                    continue
                path, line = _key_line(spec.sources or (spec.path,), key)
                problems.append(Diagnostic(path, line, "warning", "%s=%s: no such %s on this machine: the unit will "
                                           "fail to start here" % (key, account, key.lower()), unit=name))
    return problems


# The keys `check --security` sums a service up by, with what each protects
# from (systemd-analyze security's list, in its spirit): a key unset is an
# exposure, as there.
SECURITY_KEYS = (
    ("User", "running as root"), ("DynamicUser", "a user shared with other services"),
    ("NoNewPrivileges", "gaining privileges through setuid programs"),
    ("CapabilityBoundingSet", "capabilities it does not need"),
    ("PrivateTmp", "other services' files in /tmp"), ("PrivateDevices", "hardware devices"),
    ("PrivateNetwork", "the network"), ("PrivateIPC", "other services' SysV IPC"),
    ("PrivateUsers", "other users' identities"), ("PrivateMounts", "mounts reaching the host"),
    ("ProtectSystem", "writing /usr, /boot, /etc"), ("ProtectHome", "home folders"),
    ("ProtectKernelTunables", "writing /proc/sys and /sys"), ("ProtectKernelModules", "loading kernel modules"),
    ("ProtectKernelLogs", "the kernel log"), ("ProtectControlGroups", "changing cgroups"),
    ("ProtectHostname", "changing the hostname"), ("ProtectClock", "changing the clock"),
    ("ProtectProc", "seeing other processes"), ("ProcSubset", "kernel data in /proc"),
    ("RestrictSUIDSGID", "making setuid or setgid files"), ("LockPersonality", "changing its execution domain"),
    ("RestrictNamespaces", "making or joining namespaces"), ("RestrictRealtime", "realtime scheduling"),
    ("MemoryDenyWriteExecute", "code written into memory and run"),
    ("RestrictAddressFamilies", "unusual sockets (AF_PACKET, AF_NETLINK, ...)"),
    ("SystemCallArchitectures", "32-bit system calls past the filters"),
    ("SystemCallFilter", "system calls it does not need"), ("DevicePolicy", "device nodes"),
    ("IPAddressDeny", "network peers"), ("RestrictFileSystems", "file systems"),
    ("RemoveIPC", "IPC objects left behind"), ("UMask", "files others can read"),
)


def security_exposure(spec):
    """[{key, value, state, protects}] of a service: each security key's
    setting as written, and "applied", "not applied: why" or "unset", as a
    daemon of the user who asks would apply them."""
    withheld = {key: not_applied_reason(key, value) for key, value in spec.not_applied}
    withheld.update(sandbox_not_applied(spec))
    rows = []
    for key, protects in SECURITY_KEYS:
        value = {"User": spec.user, "Group": spec.group}.get(key) or _key_value(spec.sources or (spec.path,), key)
        if not _security_key_set(spec, key):
            value, state = None, "unset"
        elif key in withheld:
            state = "not applied: " + withheld[key]
        else:
            state = "applied"
        if value == "" and key == "CapabilityBoundingSet":
            value = "(empty: none)"
        elif value is None and state != "unset":          # set by another key
            value = "closed (PrivateDevices=)" if key == "DevicePolicy" else "(implied by DynamicUser=)"
        rows.append({"key": key, "value": value, "state": state, "protects": protects})
    return rows


def _security_key_set(spec, key):
    """Whether the parsed unit asks for what `key` protects (NoNewPrivileges=no
    does not)."""
    if key in SANDBOX_KEYS:
        return _sandbox_key_set(spec, key)
    if key == "DevicePolicy":
        return device_rules(spec, proc_devices=[]) is not None
    if ("Service", key) in DIRECTIVES:
        field = DIRECTIVES[("Service", key)][0]
        return getattr(spec, field) != UnitSpec.FIELDS[field]
    return any(name == key for name, _ in spec.not_applied)


def _key_value(paths, key):
    """The value of `key` as the files on disk set it (the assignments after
    its last reset, joined), or None."""
    found = None
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as unit_file:
                for line in unit_file:
                    name, equals, value = line.partition("=")
                    if equals and name.strip() == key:
                        value = value.strip()
                        found = value if not found or not value else found + " " + value
        except OSError:
            pass
    return found


def _key_line(paths, key):
    """(file, line) of the last assignment of `key` in files on disk, read in
    order (a drop-in's wins); (first file, 1) if none is found."""
    found = (paths[0], 1)
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as unit_file:
                for number, line in enumerate(unit_file, 1):
                    if line.split("=", 1)[0].strip() == key:
                        found = (path, number)
        except OSError:
            pass
    return found


def _disk_unit_file(path):
    """(path, is_symlink, size, path) of a unit file or drop-in on disk, as
    compose_units takes them; None for other files."""
    if not is_unit_source(path):
        return None
    try:
        size = os.path.getsize(path)
    except OSError:
        size = -1                         # a dangling symlink: left to compose_units
    return (path, os.path.islink(path), size, path)


# ---- install, uninstall, shell completion ------------------------------------------
# `install` copies this very file under PREFIX/lib/gitproc/ with its bytecode
# compiled, writes PREFIX/bin/gitproc (an entry point that imports it: no
# compile at each command) and the systemd unit; a manifest lists what it
# wrote, so that `uninstall` removes exactly that.

INSTALL_MANIFEST = "installed.json"
ENTRY_POINT = """\
#!{python} -S
# gitproc {version}, written by `gitproc.py install`. It imports the installed
# module (its bytecode is compiled), so no command pays for compiling it.
import sys
sys.path.insert(0, {lib!r})
import gitproc
sys.exit(gitproc.main())
"""
SYSTEMD_UNIT = """\
[Unit]
Description=gitproc process supervisor
After=network.target

[Service]
ExecStart={command} daemon --foreground
ExecStop={command} shutdown
KillMode=process
TimeoutStopSec=120
Restart=on-failure

[Install]
WantedBy={wanted_by}
"""


def _install_layout(prefix):
    """(prefix, lib folder, command path, unit path, systemctl argv) for this user."""
    root = os.geteuid() == 0
    prefix = os.path.abspath(os.path.expanduser(prefix or ("/usr/local" if root else "~/.local")))
    if root:
        unit = "/etc/systemd/system/gitproc.service"
        systemctl = ["systemctl"]
    else:
        unit = os.path.expanduser("~/.config/systemd/user/gitproc.service")
        systemctl = ["systemctl", "--user"]
    return prefix, os.path.join(prefix, "lib", "gitproc"), os.path.join(prefix, "bin", "gitproc"), unit, systemctl


def _systemd_runs():
    return os.path.isdir("/run/systemd/system")


def _systemctl(argv):
    """Run systemctl; GitprocError with its complaint if it fails."""
    if find_program(argv[0], os.environ.get("PATH")) is None:
        raise GitprocError("systemd runs but %s is not on PATH" % argv[0])
    code, _, err = _run_captured(argv, b"", 60)
    if code != 0:
        raise GitprocError("%s failed: %s" % (" ".join(argv), err.decode("utf-8", "replace").strip() or "exit code %d" % code))


def _make_folders(folder, made):
    """Make `folder` and its missing parents, noting each made in `made`."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for folder in reversed(missing):
        os.mkdir(folder, 0o755)
        made.append(folder)


def _write_file(path, data, mode, made):
    """Write atomically with `mode`, making missing folders (noted in `made`)."""
    _make_folders(os.path.dirname(path), made)
    atomic_write(path, data)
    os.chmod(path, mode)


def _installable(lib, command, unit, manifest_path):
    """Is `path` a file install writes (so one uninstall may remove)?"""
    cache = os.path.join(lib, "__pycache__")
    fixed = {os.path.join(lib, "gitproc.py"), command, unit, manifest_path}

    def allowed(path):
        return path in fixed or (os.path.dirname(path) == cache and os.path.basename(path).startswith("gitproc.")
                                 and path.endswith(".pyc"))
    return allowed


def _read_manifest(manifest_path):
    """The manifest's (files, folders): lists of absolute paths; {} if none;
    GitprocError if it is not one install wrote."""
    try:
        with open(manifest_path) as manifest_file:
            manifest = json.load(manifest_file)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise GitprocError("cannot read %s: %s" % (manifest_path, exc))
    lists = [manifest.get(key) if isinstance(manifest, dict) else None for key in ("files", "folders")]
    if not all(isinstance(items, list) and all(isinstance(p, str) and os.path.isabs(p) for p in items) for items in lists):
        raise GitprocError("%s is not a manifest gitproc install wrote; nothing removed" % manifest_path)
    return lists[0], lists[1]


def cmd_install(config, args):
    import importlib.util
    import py_compile
    prefix, lib, command, unit, systemctl = _install_layout(args.prefix)
    module = os.path.join(lib, "gitproc.py")
    manifest_path = os.path.join(lib, INSTALL_MANIFEST)
    # Beside the module, whatever PYTHONPYCACHEPREFIX says here: the command
    # is also run where it is not set (the systemd unit), and finds it there.
    bytecode = os.path.join(lib, "__pycache__", os.path.basename(importlib.util.cache_from_source(module)))
    allowed = _installable(lib, command, unit, manifest_path)
    previous = _read_manifest(manifest_path)
    # What this install writes, and what earlier ones wrote (an upgrade
    # without --no-service keeps the unit of the first install listed).
    files = [module, bytecode, command] + ([] if args.no_service else [unit])
    if previous:
        files += [path for path in previous[0] if allowed(path) and path not in files and path != manifest_path]
    files.append(manifest_path)
    made = [folder for folder in (previous[1] if previous else []) if os.path.isabs(folder)]
    try:
        with open(os.path.realpath(__file__), "rb") as source_file:
            code = source_file.read()
        for path in (module, bytecode, command) + (() if args.no_service else (unit,)):
            _make_folders(os.path.dirname(path), made)
        # The manifest first: an install that fails half-way can be uninstalled.
        manifest = json.dumps({"version": __version__, "files": files, "folders": made,
                               "unit": None if args.no_service else unit}, indent=1).encode()
        _write_file(manifest_path, manifest, 0o644, made)
        _write_file(module, code, 0o644, made)
        py_compile.compile(module, cfile=bytecode, doraise=True)
        os.chmod(bytecode, 0o644)
        python = sys.executable           # not resolved: /usr/bin/python3 follows system upgrades
        _write_file(command, ENTRY_POINT.format(python=python, version=__version__, lib=lib).encode(), 0o755, made)
        if not args.no_service:
            wanted_by = "multi-user.target" if os.geteuid() == 0 else "default.target"
            _write_file(unit, SYSTEMD_UNIT.format(command=command, wanted_by=wanted_by).encode(), 0o644, made)
    except (OSError, py_compile.PyCompileError) as exc:
        raise GitprocError("install into %s failed: %s (what was written is removed by: uninstall%s)" % (
            prefix, describe_os_error(exc) if isinstance(exc, OSError) else exc,
            " --prefix %s" % prefix if args.prefix else ""))
    print("%s gitproc %s: %s (module %s)" % ("upgraded to" if previous else "installed", __version__, command, module))
    _restart_installed(config, args, command, unit, systemctl)
    _say_path_hint(os.path.dirname(command))
    return EXIT_OK


def _say_path_hint(bin_dir):
    """A command in a folder that is not on PATH cannot be found by the shell
    (Debian adds ~/.local/bin to PATH only at login, and only if it existed
    then): say exactly what to add, and where."""
    folders = [os.path.realpath(folder) for folder in os.environ.get("PATH", "").split(":") if folder]
    if os.path.realpath(bin_dir) in folders:
        return
    home = os.path.expanduser("~")
    shown = "$HOME" + bin_dir[len(home):] if bin_dir.startswith(home + os.sep) else bin_dir
    print("%s is not on your PATH, so the shell will not find `gitproc`. Add it for this shell and every login:\n"
          "    export PATH=\"%s:$PATH\"\n"
          "    echo 'export PATH=\"%s:$PATH\"' >> ~/.profile\n"
          "(or run it as %s)" % (bin_dir, shown, shown, os.path.join(bin_dir, "gitproc")))


def _restart_installed(config, args, command, unit, systemctl):
    """An upgrade keeps services running: the running daemon hands them over
    (shutdown --keep-services) to the new one, which adopts them."""
    try:
        running = request(config, {"cmd": "ping"}, timeout=5)
    except (DaemonNotRunning, ProtocolError):
        running = None
    module = os.path.join(os.path.dirname(os.path.dirname(command)), "lib", "gitproc", "gitproc.py")
    foreign = running if running and running.get("module") != os.path.realpath(module) else None
    if foreign:
        # A trial install into another prefix must not take the live daemon along.
        print("a daemon (pid %d) runs from %s, not from this installation: it was left alone" % (
            foreign["pid"], foreign.get("module") or "an older gitproc"))
        running = None
    if running:
        request(config, {"cmd": "shutdown", "keep_services": True})
        deadline = time.monotonic() + 120
        while os.path.exists("/proc/%d" % running["pid"]) and (read_proc_stat(running["pid"]) or [b"Z"])[0] != b"Z":
            if time.monotonic() > deadline:
                raise GitprocError("the running daemon (pid %d) did not stop; see %s" % (running["pid"], config.daemon_log))
            time.sleep(0.02)
        print("stopped the old daemon (pid %d); its services keep running" % running["pid"])
    if not args.no_service and _systemd_runs():
        _systemctl(systemctl + ["daemon-reload"])
        if foreign:
            _systemctl(systemctl + ["enable", "gitproc"])
            print("systemd unit %s enabled; to run the daemon under it, keeping the services: %s shutdown "
                  "--keep-services && %s start gitproc" % (unit, command, " ".join(systemctl)))
            return
        _systemctl(systemctl + (["restart", "gitproc"] if running else ["enable", "--now", "gitproc"]))
        print("systemd unit %s enabled and started (%s status gitproc)" % (unit, " ".join(systemctl)))
        return
    home = ["--home", config.home] if config.home and not _home_from_env(config) else []
    if foreign:
        print("to run the daemon from this installation, keeping the services: %s%s shutdown --keep-services && %s%s daemon" % (
            command, " " + " ".join(home) if home else "", command, " " + " ".join(home) if home else ""))
        return
    if running:
        import subprocess
        proc = subprocess.run([command] + home + ["daemon"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=120)
        if proc.returncode != 0:
            raise GitprocError("the new daemon did not start: %s" % proc.stderr.decode("utf-8", "replace").strip())
        print("started the new daemon (%s); it adopted the services" % proc.stdout.decode().splitlines()[0])
    elif not args.no_service:
        print("systemd is not running here: the unit %s is written; start the daemon with: %s%s daemon" % (
            unit, command, " " + " ".join(home) if home else ""))
    else:
        print("start the daemon with: %s%s daemon" % (command, " " + " ".join(home) if home else ""))


def cmd_uninstall(config, args):
    prefix, lib, command, unit, systemctl = _install_layout(args.prefix)
    manifest_path = os.path.join(lib, INSTALL_MANIFEST)
    listed = _read_manifest(manifest_path)
    if listed is None:
        raise GitprocError("nothing to uninstall: no gitproc install under %s (%s is missing)" % (prefix, manifest_path))
    allowed = _installable(lib, command, unit, manifest_path)
    files = [path for path in listed[0] if allowed(path)]
    foreign = [path for path in listed[0] if not allowed(path)]
    # A folder goes only if install made it, it holds one of its files, and it is empty.
    folders = [folder for folder in listed[1] if any(path.startswith(folder.rstrip("/") + "/") for path in files)]
    if unit in files and _systemd_runs():
        _systemctl(systemctl + ["disable", "gitproc"])
    removed = 0
    for path in files:
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise GitprocError("cannot remove %s: %s" % (path, exc.strerror))
    caches = {os.path.dirname(path) for path in files if os.path.basename(os.path.dirname(path)) == "__pycache__"}
    for folder in sorted(caches) + sorted(folders, key=len, reverse=True):
        try:
            os.rmdir(folder)
        except OSError:
            pass                          # not empty: something else lives there now
    if unit in files and _systemd_runs():
        _systemctl(systemctl + ["daemon-reload"])
    print("uninstalled gitproc from %s: %d files removed" % (prefix, removed))
    for path in foreign:
        print("not removed: %s (install never writes there; the manifest was changed)" % path)
    try:
        running = request(config, {"cmd": "ping"}, timeout=5)
    except (GitprocError, OSError):
        running = None
    if running:
        print("the daemon (pid %d, started from %s) still runs; stop it with `python3 gitproc.py shutdown` "
              "(any copy of gitproc.py can)" % (running["pid"], running.get("module") or "an older gitproc"))
    return EXIT_OK


COMPLETION_BASH = r"""# bash completion for gitproc: source it, or put it in /etc/bash_completion.d/gitproc
#   gitproc completion bash > /etc/bash_completion.d/gitproc
_gitproc() {
    local cur=${COMP_WORDS[COMP_CWORD]} command="" options="" i globals=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            --home|--config|--socket) globals+=("${COMP_WORDS[i]}" "${COMP_WORDS[i+1]}"); ((i++)) ;;
            -*) ;;
            *) command=${COMP_WORDS[i]}; break ;;
        esac
    done
    case ${COMP_WORDS[COMP_CWORD-1]} in
        --home|--config|--socket|--prefix|--repo) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    esac
    if [[ -z $command ]]; then
        COMPREPLY=($(compgen -W "%(commands)s %(globals)s" -- "$cur"))
        return
    fi
    case $cur in
        -*) case $command in
%(options)s
            esac
            COMPREPLY=($(compgen -W "$options %(globals)s" -- "$cur"))
            return ;;
    esac
    case $command in
        %(unit_commands)s)
            COMPREPLY=($(compgen -W "$("${COMP_WORDS[0]}" "${globals[@]}" completion units 2>/dev/null)" -- "$cur")) ;;
        completion) COMPREPLY=($(compgen -W "bash units" -- "$cur")) ;;
        check) COMPREPLY=($(compgen -f -- "$cur")) ;;
    esac
}
complete -F _gitproc gitproc gitproc.py
"""
UNIT_COMMANDS = ("status", "start", "stop", "restart", "reload", "wait", "logs", "events")


def completion_script():
    """The bash completion script, its command and option lists read from the
    parser, so they never drift from it."""
    parser = build_parser()
    import argparse
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = []
    for name, sub in subparsers.choices.items():
        flags = sorted({flag for action in sub._actions for flag in action.option_strings
                        if flag.startswith("--") and flag not in ("--home", "--config", "--socket")})
        options.append('                %s) options="%s" ;;' % (name, " ".join(flags)))
    return COMPLETION_BASH % {"commands": " ".join(subparsers.choices), "globals": "--home --config --socket",
                              "options": "\n".join(options), "unit_commands": "|".join(UNIT_COMMANDS)}


def completion_units(config):
    """Unit names: the daemon's, else the branch's in the repository."""
    try:
        result = request(config, {"cmd": "status"}, timeout=2)
        return [s["name"] for s in result["services"]] + [t["name"] for t in result.get("timers", [])]
    except (GitprocError, OSError):
        pass
    try:
        listing = run_git(config.repo_path, ["ls-tree", "-r", "--name-only", "-z", "refs/heads/" + config.branch])
    except (GitprocError, OSError):
        return []
    return sorted({_strip_suffix(os.path.basename(path), UNIT_SUFFIX) for path in listing.decode("utf-8", "replace")
                   .split("\0") if path.endswith(UNIT_SUFFIXES) and "@." not in os.path.basename(path)})


def cmd_completion(config, args):
    if args.what == "bash":
        sys.stdout.write(completion_script())
    else:
        for name in completion_units(config):
            print(name)
    return EXIT_OK


def _count(text):
    """argparse type: a whole number, 0 or more."""
    import argparse
    if not text.isdigit():
        raise argparse.ArgumentTypeError("%r is not a whole number (0 or more)" % text)
    return int(text)


def _seconds(text):
    """argparse type: a finite number of seconds, 0 to a day."""
    import argparse
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and 0 <= value <= MAX_WAIT_TIMEOUT):
        raise argparse.ArgumentTypeError("%r is not a number of seconds from 0 to %d" % (text, MAX_WAIT_TIMEOUT))
    return value


class _SkippedParser:
    """Stands in for the subcommands a command line does not name: building all
    of argparse's subparsers costs several ms of every command's start."""

    def add_argument(self, *args, **kwargs):
        return None


def _command_named(argv):
    """The subcommand an argv names (skipping global options), or None."""
    tokens = iter(argv)
    for token in tokens:
        if token in ("--home", "--config", "--socket"):
            next(tokens, None)
        elif not token.startswith("-"):
            return token
    return None


def build_parser(only=None):
    """The argparse parser; with `only`, just that subcommand is built."""
    import argparse
    class Formatter(argparse.RawDescriptionHelpFormatter):
        """Sized as argparse's own, from $COLUMNS or the terminal, but without
        importing shutil (and with it bz2 and lzma): some 2 ms of each command."""

        def __init__(self, prog, **options):
            if "width" not in options:
                try:
                    columns = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size(sys.__stdout__.fileno()).columns
                except (ValueError, OSError, AttributeError):
                    columns = 80
                options["width"] = columns - 2
            super().__init__(prog, **options)

    common = argparse.ArgumentParser(add_help=False, formatter_class=Formatter)
    group = common.add_argument_group("global options")
    group.add_argument("--home", default=argparse.SUPPRESS, metavar="DIR",
                       help="keep everything under DIR (default: $GITPROC_HOME, ~/.gitproc, or system paths for root)")
    group.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH", help="JSON config file (default: HOME/config.json)")
    group.add_argument("--socket", default=argparse.SUPPRESS, metavar="PATH", help="control socket path")
    parser = argparse.ArgumentParser(
        prog="gitproc.py", parents=[common], formatter_class=Formatter,
        description="gitproc %s: a Git-backed process supervisor." % __version__,
        epilog="examples:\n  python3 gitproc.py daemon\n  python3 gitproc.py status\n"
               "  python3 gitproc.py COMMAND --help")
    parser.add_argument("--version", action="version", version="gitproc " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def add(name, handler, help_text):
        if only is not None and name != only:
            return _SkippedParser()
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text,
                                  formatter_class=Formatter,
                                  epilog="examples:\n" + "\n".join("  python3 " + e for e in EXAMPLES[name]))
        sub.set_defaults(handler=handler)
        return sub

    def with_json(sub):
        sub.add_argument("--json", action="store_true", help="print one JSON document")
        return sub

    sub = add("init", cmd_init, "create the services repository with an example unit")
    sub.add_argument("--repo", metavar="PATH", help="where (default: HOME/services)")
    sub.add_argument("--branch", help="branch to create (default: main)")
    sub = add("daemon", cmd_daemon, "start the daemon (detached unless --foreground)")
    sub.add_argument("--foreground", action="store_true", help="stay attached and log to stderr (for systemd, containers)")
    sub.add_argument("--repo", metavar="PATH", help="services repository")
    sub.add_argument("--branch", help="branch to deploy (default: main)")
    sub.add_argument("--remote", help="remote to fetch from")
    sub.add_argument("--hostname", help="host name matched by ConditionHost=")
    sub.add_argument("--log-level", choices=tuple(LOG_LEVELS)[:3], default="info", help="daemon log level (default: info)")
    sub = with_json(add("shutdown", cmd_shutdown, "stop the daemon and (unless --keep-services) every service"))
    sub.add_argument("--keep-services", action="store_true", help="leave services running for the next daemon to adopt")
    sub.add_argument("--timeout", type=_seconds, default=120, help="seconds to wait for the daemon to exit (default: 120)")
    with_json(add("daemon-reload", cmd_daemon_reload,
                  "read config.json again: what can change live changes, the rest is kept until a restart"))
    sub = with_json(add("status", cmd_status, "show the daemon and its services (exit 3 if a named one is not running)"))
    sub.add_argument("names", nargs="*", metavar="NAME")
    with_json(add("list", cmd_list, "list the units of the deployed commit, and those that failed to load"))
    sub = with_json(add("list-timers", cmd_list_timers, "list the timers: next elapse, last trigger, what each starts"))
    sub.add_argument("--all", action="store_true", help="the stopped timers too")
    sub = with_json(add("list-sockets", cmd_list_sockets, "list the sockets: where each listens, what it starts"))
    sub.add_argument("--all", action="store_true", help="the stopped sockets too")
    for action, text in (("start", "start units and wait until they run"),
                         ("stop", "stop units (remembered until start) and wait until they are gone"),
                         ("restart", "stop then start units, and wait until they run"),
                         ("reload", "run units' ExecReload= (their main process stays), and wait until it is done")):
        sub = with_json(add(action, _cmd_action(action), text))
        sub.add_argument("names", nargs="+", metavar="NAME")
        sub.add_argument("--no-block", action="store_true", help="return at once")
        sub.add_argument("--timeout", type=_seconds, default=DEFAULT_WAIT_TIMEOUT, help="seconds to wait (default: 30)")
    sub = with_json(add("wait", cmd_wait, "wait until units reach a state"))
    sub.add_argument("names", nargs="+", metavar="NAME")
    sub.add_argument("--state", choices=("running", "healthy", "stopped"), default="running")
    sub.add_argument("--timeout", type=_seconds, default=DEFAULT_WAIT_TIMEOUT, help="seconds (default: 30)")
    sub = with_json(add("logs", cmd_logs, "show a unit's output (works without a daemon)"))
    sub.add_argument("name", nargs="?", metavar="NAME")
    sub.add_argument("-n", "--lines", type=_count, default=50, help="how many lines (default: 50)")
    sub.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    sub.add_argument("--daemon", action="store_true", help="the daemon's own log")
    sub.add_argument("-p", "--priority", metavar="PRIORITY",
                     help="only messages this urgent or more (err, warning, ... or 0-7; the unit's own output is info)")
    sub = with_json(add("sync", _cmd_plan("sync"), "deploy the newest commit now (fetching first in remote mode)"))
    sub.add_argument("--allow-rewind", action="store_true",
                     help="deploy it even if it does not descend from the deployed commit (once)")
    with_json(add("diff", _cmd_plan("diff"), "show what sync would do, changing nothing"))
    sub = with_json(add("rollback", cmd_rollback, "bring back the unit files of an earlier commit"))
    sub.add_argument("commit", nargs="?", metavar="COMMIT")
    sub.add_argument("--release", action="store_true", help="remote mode: follow the remote branch again")
    sub = with_json(add("history", cmd_history, "list the deployments, newest first"))
    sub.add_argument("-n", dest="count", type=_count, default=20, help="how many (default: 20)")
    sub = with_json(add("check", cmd_check, "validate unit files without a daemon (exit 1 on any error)"))
    sub.add_argument("paths", nargs="*", metavar="PATH", help="files or folders (default: the repository's working tree)")
    sub.add_argument("--security", action="store_true",
                     help="also print each service's exposure: every security key, applied, not applied or unset "
                          "(a PATH may then be a unit's name in the repository)")
    sub = add("events", cmd_events, "what the daemon did: state changes, health, deploys, rollbacks (JSON lines with --json)")
    sub.add_argument("names", nargs="*", metavar="NAME", help="only these units")
    sub.add_argument("-n", "--lines", type=_count, default=50, help="how many past events (default: 50; the daemon keeps %d)" % EVENT_LIMIT)
    sub.add_argument("-f", "--follow", action="store_true", help="keep printing events as they come")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")
    add("metrics", cmd_metrics, "print the metrics in Prometheus text format")
    sub = with_json(add("notify", cmd_notify, "send a test alert to the notify targets and print their answers"))
    sub.add_argument("action", choices=["test"])
    sub.add_argument("target", nargs="?", metavar="TARGET", help="the one target to try (its name, url or command)")
    sub = add("install", cmd_install, "install gitproc as a command (PREFIX/bin/gitproc) and a systemd service")
    sub.add_argument("--prefix", metavar="DIR", help="where (default: /usr/local for root, ~/.local otherwise)")
    sub.add_argument("--no-service", action="store_true", help="no systemd unit")
    sub = add("uninstall", cmd_uninstall, "remove what install wrote, and nothing else")
    sub.add_argument("--prefix", metavar="DIR", help="where it was installed (default as for install)")
    sub = add("completion", cmd_completion, "print the bash completion script (bash), or the unit names (units)")
    sub.add_argument("what", choices=("bash", "units"))
    return parser


# ==== 19. main ===============================================================


def main(argv=None):
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = _command_named(arguments)
    parser = build_parser(only=command if command in EXAMPLES else None)
    args = parser.parse_args(arguments)
    args.argv = arguments
    flags = {name: getattr(args, name, None) for name in ("home", "config", "socket", "repo", "branch", "remote", "hostname")}
    try:
        # A daemon never starts on a bad config; the other commands still reach
        # a running daemon (to stop it, say), with a warning.
        config = load_config(flags, lenient=command not in ("daemon", "check", "init", "install"))
        if config.warning and command != "daemon-reload":       # the daemon says why, and better
            print("gitproc: warning: %s" % config.warning, file=sys.stderr)
        return args.handler(config, args)
    except GitprocError as exc:
        print("gitproc: %s" % exc, file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAILURE
    except OSError as exc:            # the system said no (permissions, full disk, ...)
        print("gitproc: %s" % describe_os_error(exc), file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
