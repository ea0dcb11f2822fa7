#!/usr/bin/env python3
"""Profile a running gitproc daemon, or benchmark gitproc in a temporary home.

    python3 profile_daemon.py                      # sample the daemon of ~/.gitproc for 60 s
    python3 profile_daemon.py --pid 1234 --duration 120 --interval 0.5
    python3 profile_daemon.py --home /srv/gp --json
    python3 profile_daemon.py --bench              # the benchmarks, 10 services
    python3 profile_daemon.py --bench --services 1000 --json

Sampling reads /proc only: CPU % (user+system), RSS, threads, open fds, I/O
bytes, voluntary and involuntary context switches per second, with min/avg/max,
then the optimization checklist of the performance guide, each PASS or FAIL
with the measured value.

The benchmark builds a temporary home with a real repository and real
services, measures each figure (median and p95 for latencies) with a progress
line per step, and removes everything it started, also when interrupted.
Respawn is measured twice: after the bench's SIGKILL (from the kill) and after
a service failed by itself 200 ms into its run (from its exit, seen on a pidfd).
Commit to running is measured for a unit file changed, and for one file
changed in a unit's folder of 1,000 files (its snapshot made again, SPEC §13).
Redeploys under load: a client connects in a loop to a socket-activated
service while 20 commits each restart it; it counts the connections made,
served, refused and reset, and the latency added (p50, p99 against the same
client with no redeploy).
The respawn and `start NAME` figures say which way the daemon made the
process (posix_spawn, clone3 or fork: the `spawn` of `status NAME --json`).
`status` and `start NAME` are timed both as the script (python3 gitproc.py)
and as the installed command (`gitproc.py install --prefix DIR --no-service`
into the temporary home, uninstalled at the end), or reported unavailable
from a gitproc.py without install.
Standard library only, like gitproc itself.
"""

import argparse
import json
import math
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gitproc  # noqa: E402  (the module beside this script)

GITPROC = os.path.join(HERE, "gitproc.py")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# ==== sampling /proc ===========================================================

def read_sample(pid):
    """One reading of a process from /proc: cumulative counters and gauges."""
    fields = gitproc.read_proc_stat(pid)
    if fields is None:
        raise ProcessLookupError(pid)
    try:
        status = _proc_fields("/proc/%d/status" % pid)
        fds = len(os.listdir("/proc/%d/fd" % pid))
    except FileNotFoundError:
        raise ProcessLookupError(pid)
    try:
        io = {key: int(value) for key, value in _proc_fields("/proc/%d/io" % pid).items()}
    except OSError:
        io = {}                   # /proc/PID/io needs the same user (or root)
    return {
        "time": time.monotonic(),
        "cpu_seconds": (int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
        "rss": int(status.get("VmRSS", "0 kB").split()[0]) * 1024,
        "threads": int(status.get("Threads", "0")),
        "fds": fds,
        "read_bytes": io.get("read_bytes", 0),        # storage I/O, as the guide means it
        "write_bytes": io.get("write_bytes", 0),
        "voluntary": int(status.get("voluntary_ctxt_switches", "0")),
        "involuntary": int(status.get("nonvoluntary_ctxt_switches", "0")),
    }


def _proc_fields(path):
    """The `key: value` lines of a /proc file, as a dict of strings."""
    fields = {}
    with open(path) as proc_file:
        for line in proc_file:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def sample(pid, duration, interval, progress=None):
    """Readings every `interval` for `duration`; returns per-interval rates and
    gauges as {metric: [values]}."""
    series = {"cpu_percent": [], "rss": [], "threads": [], "fds": [], "read_bytes_per_s": [],
              "write_bytes_per_s": [], "voluntary_per_s": [], "involuntary_per_s": [],
              "wakeups_per_s": []}
    previous = read_sample(pid)
    deadline = previous["time"] + duration
    while time.monotonic() < deadline:
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        current = read_sample(pid)
        elapsed = current["time"] - previous["time"]
        if elapsed <= 0:
            continue
        series["cpu_percent"].append(100.0 * (current["cpu_seconds"] - previous["cpu_seconds"]) / elapsed)
        for gauge in ("rss", "threads", "fds"):
            series[gauge].append(current[gauge])
        for counter, rate in (("read_bytes", "read_bytes_per_s"), ("write_bytes", "write_bytes_per_s"),
                              ("voluntary", "voluntary_per_s"), ("involuntary", "involuntary_per_s")):
            series[rate].append((current[counter] - previous[counter]) / elapsed)
        series["wakeups_per_s"].append(series["voluntary_per_s"][-1] + series["involuntary_per_s"][-1])
        previous = current
        if progress:
            progress("  %5.1fs  cpu %5.2f%%  rss %s  ctx/s %.1f" % (
                duration - max(0.0, deadline - time.monotonic()), series["cpu_percent"][-1],
                gitproc.format_bytes(current["rss"]), series["wakeups_per_s"][-1]))
    return series


def summarize(series):
    return {name: {"min": min(values), "avg": sum(values) / len(values), "max": max(values)}
            for name, values in series.items() if values}


def find_daemon_pid(home):
    config = gitproc.load_config({"home": home})
    try:
        with open(config.pid_file) as pid_file:
            pid = int(pid_file.read().split()[0])
    except (OSError, ValueError, IndexError):
        raise SystemExit("profile_daemon: no daemon pid in %s; give --pid or --home" % config.pid_file)
    if gitproc.read_proc_stat(pid) is None:
        raise SystemExit("profile_daemon: pid %d from %s is not running" % (pid, config.pid_file))
    return pid, config


def checklist(summary, daemon_info, config):
    """The performance guide's optimization checklist against what was measured.
    Each item: (text, passed, measured)."""
    services = daemon_info.get("services") if daemon_info else None
    items = []
    cpu = summary.get("cpu_percent", {}).get("avg")
    items.append(("Daemon CPU usage < 5% during normal operation", cpu is not None and cpu < 5,
                  "avg %.2f%%" % cpu if cpu is not None else "no sample"))
    rss = summary.get("rss", {}).get("max")
    items.append(("Daemon memory usage < 100 MB with 10+ services", rss is not None and rss < 100 * 2 ** 20,
                  "max %s with %s services" % (gitproc.format_bytes(rss), services if services is not None else "?")))
    info = (daemon_info or {}).get("daemon", {})
    watch = info.get("watch")
    poll = info.get("poll_interval")
    detected = watch in ("inotify", "stat") or (poll is not None and poll <= 30)
    items.append(("Git changes detected within 30 seconds", detected,
                  "watch %s, safety poll %ss" % (watch or "none", poll) if info else "daemon not reachable"))
    save_gaps = daemon_info.get("save_gaps") if daemon_info else None
    items.append(("State saves occur at most once per 2 seconds (batched)",
                  not save_gaps or min(save_gaps) >= 1.9,
                  "%d saves seen, shortest gap %s" % (len(save_gaps) + 1 if save_gaps else daemon_info.get("saves", 0),
                                                     "%.1fs" % min(save_gaps) if save_gaps else "-")))
    mode = info.get("exit_watch")
    items.append(("Process termination detected within 1 second", mode in ("pidfd", "sigchld", "poll"),
                  "exit watch: %s (%s)" % (mode, "event-driven" if mode in ("pidfd", "sigchld") else "0.2 s poll")
                  if mode else "daemon not reachable"))
    items.append(("Service start time < 1 second", None, "measured by --bench"))
    biggest = _largest_log(config.log_dir)
    limit = config.log_max_bytes
    items.append(("No excessive log file growth", biggest is None or biggest[1] <= limit * 1.5,
                  "largest log %s: %s (rotates at %s)" % (biggest[0], gitproc.format_bytes(biggest[1]),
                                                          gitproc.format_bytes(limit)) if biggest else "no logs"))
    if "rss" in summary:
        growth = summary["rss"]["max"] - summary["rss"]["min"]
        items.append(("No memory leaks (RSS steady over the sample)", growth < 2 * 2 ** 20,
                      "RSS varied by %s" % gitproc.format_bytes(growth)))
    return items


def _largest_log(log_dir):
    try:
        sizes = [(name, os.path.getsize(os.path.join(log_dir, name))) for name in os.listdir(log_dir)
                 if name.endswith(".log")]
    except OSError:
        return None
    return max(sizes, key=lambda item: item[1]) if sizes else None


def run_sampling(args):
    if args.pid:
        pid = args.pid
        config = gitproc.load_config({"home": args.home})
    else:
        pid, config = find_daemon_pid(args.home)
    progress = None if args.json else (lambda line: print(line, flush=True))
    if progress:
        progress("sampling gitproc daemon pid %d for %gs every %gs" % (pid, args.duration, args.interval))
    mtimes = []

    def note_save(line):
        try:
            mtime = os.stat(config.state_file).st_mtime
        except OSError:
            mtime = None
        if mtime and (not mtimes or mtimes[-1] != mtime):
            mtimes.append(mtime)
        if progress:
            progress(line)
    try:
        series = sample(pid, args.duration, args.interval, note_save)
    except ProcessLookupError:
        raise SystemExit("profile_daemon: the daemon (pid %d) exited while being sampled" % pid)
    summary = summarize(series)
    try:
        status = gitproc.request(config, {"cmd": "status"}, timeout=5)
        daemon_info = {"daemon": status["daemon"], "services": len(status["services"])}
        if status["daemon"]["pid"] != pid:
            daemon_info = {}          # another daemon answers on that home's socket: give --home
    except gitproc.GitprocError:
        daemon_info = {}
    # The first mtime is the file as it was before sampling began: gaps start after it.
    daemon_info["save_gaps"] = [b - a for a, b in zip(mtimes[1:], mtimes[2:])]
    daemon_info["saves"] = max(0, len(mtimes) - 1)
    items = checklist(summary, daemon_info, config)
    if args.json:
        print(json.dumps({"pid": pid, "duration": args.duration, "interval": args.interval, "summary": summary,
                          "checklist": [{"item": text, "pass": passed, "measured": measured}
                                        for text, passed, measured in items]}, indent=2))
        return 0 if all(passed is not False for _, passed, _ in items) else 1
    print()
    print("%-20s %12s %12s %12s" % ("metric", "min", "avg", "max"))
    for name, values in summary.items():
        show = gitproc.format_bytes if name == "rss" else (lambda v: "%.2f" % v)
        print("%-20s %12s %12s %12s" % (name, show(values["min"]), show(values["avg"]), show(values["max"])))
    print()
    print("optimization checklist (PERFORMANCE-GUIDE.md)")
    for text, passed, measured in items:
        mark = "----" if passed is None else ("PASS" if passed else "FAIL")
        print("  [%s] %s: %s" % (mark, text, measured))
    return 0 if all(passed is not False for _, passed, _ in items) else 1


# ==== the benchmark =============================================================

def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def stats_ms(values):
    return {"median_ms": round(statistics.median(values) * 1000, 3),
            "p95_ms": round(percentile(values, 0.95) * 1000, 3), "runs": len(values)}


WAY_LABELS = {"start_command": "script", "start_command_installed": "installed",
              "status_command": "script", "status_command_installed": "installed"}


def unavailable(reason):
    """A figure that could not be measured, and why."""
    return {"unavailable": reason}


def describe_figure(figure, digits=2):
    if "unavailable" in figure:
        return "unavailable: %s" % figure["unavailable"]
    if "failed" in figure:
        return "FAILED: %s" % figure["failed"]
    return "median %.*f ms  p95 %.*f ms%s" % (digits, figure["median_ms"], digits, figure["p95_ms"],
                                              "  (spawn: %s)" % figure["spawn"] if "spawn" in figure else "")


class Bench:
    """A temporary home with a repository, a daemon and N services; cleans up
    everything it started (close(), also on SIGINT/SIGTERM)."""

    def __init__(self, python, progress):
        self.python = python
        self.progress = progress
        self.path = tempfile.mkdtemp(prefix="gpbench", dir="/tmp")
        os.environ.pop("GITPROC_SYSLOG_SOCKET", None)     # the bench's config.json says where its socket is
        self.repo = os.path.join(self.path, "services")
        self.config = gitproc.load_config({"home": self.path})
        self.daemon_pid = None
        self.prefix = None                # where gitproc is installed, until uninstalled
        self.entry_point = None           # PREFIX/bin/gitproc
        os.makedirs(self.repo)
        self.git("init", "-q")
        self.git("symbolic-ref", "HEAD", "refs/heads/main")

    def git(self, *args):
        return subprocess.run(["git", "-C", self.repo, "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
                              + list(args), check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout

    def commit(self, files, message):
        """Write and commit files; returns perf_counter() from just before `git
        commit` ran (the daemon may react while git is still running)."""
        for name, text in files.items():
            path = os.path.join(self.repo, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as unit_file:
                unit_file.write(text)
        self.git("add", "-A")
        started = time.perf_counter()
        self.git("commit", "-q", "-m", message)
        return started

    def cli(self, *args, command=None):
        """Run a gitproc command on the home: the script (python3 gitproc.py),
        or `command` (the installed entry point). Returns the seconds it took."""
        started = time.perf_counter()
        proc = subprocess.run((command or [self.python, GITPROC]) + ["--home", self.path] + list(args),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError("gitproc %s failed: %s" % (" ".join(args), proc.stderr.decode().strip()))
        return elapsed

    def install(self):
        """`gitproc.py install --prefix DIR --no-service` with the bench's
        interpreter, DIR inside the home. Returns None when PREFIX/bin/gitproc
        is there; else (figure, why): "unavailable" from a gitproc.py without
        install, "failed" if install did not work."""
        prefix = os.path.join(self.path, "prefix")
        proc = subprocess.run([self.python, GITPROC, "--home", self.path, "install", "--prefix", prefix, "--no-service"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = proc.stderr.decode("utf-8", "replace").strip()
        if proc.returncode == 2 and "invalid choice" in err and "install" in err:
            return "unavailable", "this gitproc.py has no install command"
        self.prefix = prefix              # it may have written something: uninstalled at close
        if proc.returncode != 0:
            return "failed", "install exited %d: %s" % (proc.returncode, err.splitlines()[-1] if err else "no message")
        entry = os.path.join(prefix, "bin", "gitproc")
        if not os.access(entry, os.X_OK):
            return "failed", "install wrote no executable %s" % entry
        self.entry_point = entry
        return None

    def uninstall(self):
        """`gitproc.py uninstall --prefix DIR`; returns (None or why it failed,
        what is left in DIR)."""
        prefix, self.prefix, self.entry_point = self.prefix, None, None
        proc = subprocess.run([self.python, GITPROC, "--home", self.path, "uninstall", "--prefix", prefix],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = proc.stderr.decode("utf-8", "replace").strip()
        left = sorted(os.path.relpath(os.path.join(folder, name), prefix)
                      for folder, dirs, files in os.walk(prefix) for name in dirs + files)
        return (None if proc.returncode == 0 else "uninstall exited %d: %s" % (proc.returncode, err)), left

    def request(self, payload, timeout=60):
        return gitproc.request(self.config, payload, timeout=timeout)

    def start_daemon(self, *extra):
        self.cli("daemon", *extra)
        with open(self.config.pid_file) as pid_file:
            self.daemon_pid = int(pid_file.read())

    def services(self):
        return self.request({"cmd": "status"})["services"]

    def service(self, name):
        return self.request({"cmd": "status", "names": [name]})["services"][0]

    def wait_for_child(self, name, argv, known, timeout):
        """The pid of service `name`'s process once it has exec'd `argv` (see
        _child_running); if it does not within `timeout`, RuntimeError with what
        the daemon says of the service."""
        try:
            return wait_for(lambda: _child_running(self, argv, known), timeout)
        except RuntimeError:
            pass
        raise RuntimeError("no process of %s ran %s within %gs (%s)" % (name, " ".join(argv), timeout, self.said(name)))

    def said(self, name):
        """What the daemon says of a service, for a message."""
        try:
            service = self.service(name)
            return "the daemon says: %s, %d restarts, last exit: %s, spawn: %s" % (
                service["state"], service["restarts"], gitproc.describe_exit(service["last_exit"]), spawn_path(service))
        except (gitproc.GitprocError, IndexError, KeyError) as exc:
            return "no status: %s" % exc

    def wait_all_running(self, count, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = sum(1 for s in self.services() if s["state"] == "running")
            if running >= count:
                return True
            time.sleep(0.01)
        return False

    def children(self):
        try:
            with open("/proc/%d/task/%d/children" % (self.daemon_pid, self.daemon_pid)) as children:
                return [int(pid) for pid in children.read().split()]
        except OSError:
            return []

    def close(self):
        """Shut the daemon down (it stops its services); if that fails, kill it and
        what it ran, by pid and only while each pid still names the same process.
        A daemon that no longer answers leaves the end of its log on stderr."""
        if self.daemon_pid:
            try:
                self.request({"cmd": "ping"}, timeout=5)
            except Exception as exc:
                try:
                    with open(self.config.daemon_log, errors="replace") as log_file:
                        tail = log_file.readlines()[-40:]
                except OSError:
                    tail = []
                sys.stderr.write("profile_daemon: the daemon (pid %d, %s) does not answer (%s); its log ends:\n%s" % (
                    self.daemon_pid, "alive" if gitproc.read_proc_stat(self.daemon_pid) else "gone", exc, "".join(tail)))
        if self.daemon_pid and gitproc.read_proc_stat(self.daemon_pid):
            left = {pid: gitproc.pid_start_time(pid) for pid in self.children()}
            try:
                self.request({"cmd": "shutdown"}, timeout=10)
                deadline = time.monotonic() + 60
                while gitproc.read_proc_stat(self.daemon_pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
            except Exception:
                pass
            if gitproc.read_proc_stat(self.daemon_pid):
                os.kill(self.daemon_pid, signal.SIGKILL)
            for pid, start in left.items():
                if start is not None and gitproc.pid_start_time(pid) == start:
                    for kill in (os.killpg, os.kill):
                        try:
                            kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
        keep = os.path.join(self.path, "sockets.keep").encode()
        for entry in os.listdir("/proc"):     # a daemon killed leaves its socket keeper
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as cmdline:
                    if entry.isdigit() and keep in cmdline.read().split(b"\0"):
                        os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass
        if self.prefix:                   # interrupted before the last step
            try:
                self.uninstall()
            except Exception:
                pass
        shutil.rmtree(self.path, ignore_errors=True)


def spawn_path(service):
    """How the service's last start made its process, as `status NAME --json`
    says (posix_spawn, clone3 or fork); "unknown" from a gitproc that does not say."""
    return service.get("spawn") or "unknown"


CRASHER = ("/bin/sleep", "9999999")                   # killed at once by the bench
FLAPPER = ("/bin/sh", "-c", "sleep 0.2; exit 1")      # fails by itself after 200 ms up
BOXED = ("/bin/sleep", "9999998")                      # as CRASHER, inside a full sandbox
BOXED_UNIT = ("[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=%s\nRestart=always\nRestartSec=0\n"
              "NoNewPrivileges=yes\nPrivateTmp=yes\nPrivateDevices=yes\nPrivateNetwork=yes\nProtectSystem=strict\n"
              "ProtectHome=yes\nProtectKernelTunables=yes\nProtectControlGroups=yes\nProtectHostname=yes\n"
              "CapabilityBoundingSet=\nReadWritePaths=-/var/lib\n"
              # redis-server.service's system call filters (14 of them)
              "SystemCallFilter=@system-service\nSystemCallFilter=~@privileged @resources\n"
              "SystemCallArchitectures=native\nMemoryDenyWriteExecute=yes\nRestrictNamespaces=yes\n"
              "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX\nRestrictRealtime=yes\nRestrictSUIDSGID=yes\n"
              "LockPersonality=yes\nProtectClock=yes\nProtectKernelLogs=yes\nProtectKernelModules=yes\n" % " ".join(BOXED))
FLAPPER_UNIT = ("[Unit]\nDescription=fails after 200 ms\nStartLimitIntervalSec=0\n[Service]\n"
                "ExecStart=/bin/sh -c 'sleep 0.2; exit 1'\nRestart=always\nRestartSec=0\n")


def sleeper_unit(index, extra=""):
    return "[Unit]\nDescription=bench service %d\n[Service]\nExecStart=/bin/sleep 100000%d\n%s" % (index, index, extra)


def wait_for(predicate, timeout, poll=0.0002):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise RuntimeError("timed out after %gs" % timeout)


def exe_of(pid):
    try:
        return os.readlink("/proc/%d/exe" % pid)
    except OSError:
        return None


def run_bench(args):
    python = args.python or ("/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable)
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else (lambda line: print(line, flush=True))
    results = {"machine": {"cores": os.cpu_count(), "python": subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"], stdout=subprocess.PIPE).stdout.decode().strip(),
        "interpreter": python, "kernel": os.uname().release}, "services": args.services, "repeat": args.repeat}
    bench = Bench(python, say)
    previous_handlers = {number: signal.signal(number, _raise_interrupt) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        _bench_steps(bench, args, results, say)
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        return 130
    finally:
        bench.close()
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_results(results)
    return 1 if results.get("failed") else 0


def _raise_interrupt(_number, _frame):
    raise KeyboardInterrupt


BENCH_STEPS = 17
SYSLOG_MESSAGES = 100000
# A unit that sends SYSLOG_MESSAGES datagrams to the daemon's syslog socket as
# fast as it can (a full queue blocks it), then says so in a file.
SYSLOG_FLOOD = """import os, socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    sock.sendto(b"<6>Dec  7 00:00:00 flood[1]: message number %d" % i, sys.argv[1])
os.close(os.open(sys.argv[3], os.O_CREAT | os.O_WRONLY))
time.sleep(100000)
"""
FOLDER_FILES = 1000                   # files in the folder of the unit of the files figure
FOLDER_UNIT = "[Service]\nWorkingDirectory=%Y\nExecStart=/bin/sleep 2000001\n"


def _bench_steps(bench, args, results, say):
    count = args.services
    numbers = iter(range(1, BENCH_STEPS + 1))

    def step(text):
        say("[%d/%d] %s" % (next(numbers), BENCH_STEPS, text))

    def figures(keys, measure, digits=2, note=lambda: ""):
        """results[key] for each of `keys` from measure() (a dict by key), each
        said with `note()`. Figures that cannot be had (a command failed, a
        process never ran) are reported as failed, with why, and the other
        figures are still measured."""
        try:
            measured = measure()
        except RuntimeError as exc:
            measured = {key: {"failed": str(exc)} for key in keys}
        for key in keys:
            results[key] = measured[key]
            if "failed" in measured[key]:
                results.setdefault("failed", []).append(key)
            say("      %s%s%s" % ("%s: " % WAY_LABELS[key] if key in WAY_LABELS else "",
                                  describe_figure(results[key], digits), "" if "failed" in results[key] else note()))

    def figure(key, measure, digits=2, note=lambda: ""):
        figures([key], lambda: {key: measure()}, digits, note)

    def both_ways(key, run_once, digits):
        """Figure `key` for the script and key_installed for the installed
        command, their runs alternating so that both meet the same machine.
        run_once(command) returns (seconds, more fields of the figure)."""
        ways = [(key, None)]
        if installed is None:
            ways.append((key + "_installed", [bench.entry_point]))
        else:
            results[key + "_installed"] = {installed[0]: installed[1]}
            if installed[0] == "failed":
                results.setdefault("failed", []).append(key + "_installed")

        def measure():
            timings, more = {way: [] for way, _ in ways}, {}
            for _ in range(args.repeat):
                for way, command in ways:
                    seconds, more[way] = run_once(command)
                    timings[way].append(seconds)
            return {way: dict(stats_ms(timings[way]), **more[way]) for way, _ in ways}
        figures([way for way, _ in ways], measure, digits)
        if installed is not None:
            say("      %s: %s" % (WAY_LABELS[key + "_installed"], describe_figure(results[key + "_installed"])))

    step("install into a temporary prefix (before the daemon runs: install would hand a running one over)")
    installed = bench.install()
    if installed is None:
        with open(bench.entry_point) as entry_file:
            first = entry_file.readline().strip()
        results["install"] = {"available": True, "entry_point": bench.entry_point,
                              "interpreter": first[2:] if first.startswith("#!") else None}
        say("      %s (runs %s)" % (bench.entry_point, results["install"]["interpreter"]))
    else:
        results["install"] = {"available": False, installed[0]: installed[1]}
        if installed[0] == "failed":
            results.setdefault("failed", []).append("install")
        say("      %s: %s" % (installed[0], installed[1]))
    units = {"svc%04d.service" % i: sleeper_unit(i) for i in range(count)}
    units["crasher.service"] = ("[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=%s\n"
                                "Restart=always\nRestartSec=0\n" % " ".join(CRASHER))
    units["probe.service"] = "[Service]\nExecStart=/bin/sleep 2000000\n"
    bench.commit(units, "bench units")
    http_port = None
    if not args.no_http:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
        probe.close()
    settings = {"syslog_socket": os.path.join(bench.path, "syslog")}
    if http_port:
        settings["http_listen"] = "127.0.0.1:%d" % http_port
    with open(os.path.join(bench.path, "config.json"), "w") as config_file:
        json.dump(settings, config_file)
    results["http_listen"] = "127.0.0.1:%d" % http_port if http_port else None

    step("cold start of %d services" % (count + 2))
    started = time.perf_counter()
    bench.start_daemon("--log-level", "debug")
    if not bench.wait_all_running(count + 2, timeout=120):
        raise RuntimeError("not all services ran within 120 s")
    results["cold_start_s"] = round(time.perf_counter() - started, 3)
    say("      all %d running after %.3f s (daemon command included)" % (count + 2, results["cold_start_s"]))

    step("idle daemon for %gs" % args.idle)
    time.sleep(1.0)                   # let start-up work settle before measuring idleness
    summary = summarize(sample(bench.daemon_pid, args.idle, min(1.0, args.idle)))
    results["idle"] = {"cpu_percent": round(summary["cpu_percent"]["avg"], 4),
                       "rss_bytes": summary["rss"]["max"], "rss_mb": round(summary["rss"]["max"] / 2 ** 20, 2),
                       "threads": summary["threads"]["max"], "fds": summary["fds"]["max"],
                       "wakeups_per_s": round(summary["wakeups_per_s"]["avg"], 3)}
    say("      cpu %.3f%%  rss %.1f MB  %.2f wakeups/s  %d threads" % (
        results["idle"]["cpu_percent"], results["idle"]["rss_mb"], results["idle"]["wakeups_per_s"],
        results["idle"]["threads"]))

    step("crash detection and respawn (SIGKILL to new process exec'd), %d runs" % args.repeat)
    figure("respawn", lambda: dict(stats_ms(_respawn_latencies(bench, "crasher", CRASHER, args.repeat, _kill_now)),
                                   spawn=spawn_path(bench.service("crasher"))))

    step("respawn of a service that failed after 200 ms up (its exit to new process exec'd), %d runs" % args.repeat)
    if hasattr(os, "pidfd_open"):
        bench.commit({"flapper.service": FLAPPER_UNIT}, "bench: a service that fails after 200 ms")
        try:
            figure("respawn_after_run", lambda: dict(stats_ms(_respawn_latencies(
                bench, "flapper", FLAPPER, args.repeat, _exit_seen(FLAPPER))), spawn=spawn_path(bench.service("flapper"))))
        finally:
            bench.cli("stop", "flapper")  # its restarts would weigh on every later figure
    else:
        figure("respawn_after_run", lambda: unavailable("no os.pidfd_open to see the exit (Python 3.9+, Linux 5.3+)"))

    step("the same respawn inside a full sandbox (root), %d runs" % args.repeat)
    if os.geteuid() == 0:
        bench.commit({"boxed.service": BOXED_UNIT}, "bench: a crasher in a full sandbox")
        try:
            figure("respawn_sandboxed", lambda: dict(stats_ms(_respawn_latencies(
                bench, "boxed", BOXED, args.repeat, _kill_now)), spawn=spawn_path(bench.service("boxed"))))
        finally:
            bench.cli("stop", "boxed")
    else:
        figure("respawn_sandboxed", lambda: unavailable("the sandbox needs a root daemon"))

    step("`start NAME` command to process running, script and installed, %d runs each" % args.repeat)

    def start_once(command):
        bench.cli("stop", "probe")
        seconds = bench.cli("start", "probe", command=command)
        probe = bench.service("probe")
        if not probe["pid"] or gitproc.read_proc_stat(probe["pid"]) is None:
            raise RuntimeError("start returned, but no process of probe runs (%s)" % bench.said("probe"))
        return seconds, {"spawn": spawn_path(probe)}
    both_ways("start_command", start_once, 1)
    results["cli_floor"] = stats_ms([bench_floor(bench.python) for _ in range(min(args.repeat, 5))])
    say("      interpreter + compile of gitproc.py alone (the script's floor): %s" % describe_figure(results["cli_floor"], 1))

    step("`status` command (the table of all services), script and installed, %d runs each" % args.repeat)
    both_ways("status_command", lambda command: (bench.cli("status", command=command), {}), 1)

    step("commit to changed service running, %d runs" % args.repeat)

    def commit_to_running():
        timings = []
        for index in range(args.repeat):
            marker = "3%06d" % index
            known = set(bench.children())
            committed = bench.commit({"probe.service": "[Service]\nExecStart=/bin/sleep %s\n" % marker},
                                     "bench change %d" % index)
            bench.wait_for_child("probe", ("/bin/sleep", marker), known, 30)
            timings.append(time.perf_counter() - committed)
        return stats_ms(timings)
    figure("commit_to_running", commit_to_running, 1)

    step("commit of one file of a %d-file folder to its unit running again, %d runs" % (args.folder_files, args.repeat))

    def files_to_running():
        files = {"big/data/%04d.txt" % i: "file %d of the folder\n" % i for i in range(args.folder_files - 1)}
        files["big/big.service"] = FOLDER_UNIT
        known = set(bench.children())
        committed = bench.commit(files, "bench: a unit with %d files in its folder" % args.folder_files)
        bench.wait_for_child("big", ("/bin/sleep", "2000001"), known, 30)
        first = time.perf_counter() - committed
        timings = []
        for index in range(args.repeat):
            known = set(bench.children())
            committed = bench.commit({"big/data/0000.txt": "changed %d\n" % index}, "bench folder change %d" % index)
            bench.wait_for_child("big", ("/bin/sleep", "2000001"), known, 30)
            timings.append(time.perf_counter() - committed)
        bench.cli("stop", "big")
        return dict(stats_ms(timings), first_deploy_ms=round(first * 1000, 1))
    figure("commit_to_running_files", files_to_running, 1,
           note=lambda: "  (first deploy of the folder: %.1f ms)" % results["commit_to_running_files"]["first_deploy_ms"])

    step("`status` round trip over the socket, %d runs" % (args.repeat * 5))
    timings = []
    for _ in range(args.repeat * 5):
        started = time.perf_counter()
        bench.request({"cmd": "status"})
        timings.append(time.perf_counter() - started)
    results["status_round_trip"] = stats_ms(timings)
    say("      median %.2f ms  p95 %.2f ms" % (results["status_round_trip"]["median_ms"], results["status_round_trip"]["p95_ms"]))

    step("GET /metrics over HTTP (a new connection each), %d runs" % args.repeat)
    if http_port:
        def metrics_over_http():
            import http.client
            timings, size = [], 0
            for _ in range(args.repeat):
                started = time.perf_counter()
                conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                body = response.read()
                conn.close()
                timings.append(time.perf_counter() - started)
                if response.status != 200:
                    raise RuntimeError("GET /metrics answered %d" % response.status)
                size = len(body)
            return dict(stats_ms(timings), bytes=size)
        figure("metrics_http", metrics_over_http, 2, note=lambda: "  (%d bytes)" % results["metrics_http"]["bytes"])
    else:
        figure("metrics_http", lambda: unavailable("--no-http: the daemon ran without its HTTP listener"))

    step("state save time with %d services" % (count + 2))
    for _ in range(max(3, args.repeat // 2)):
        bench.cli("stop", "probe", "--no-block")
        bench.cli("start", "probe", "--no-block")
    saves = []
    with open(bench.config.daemon_log) as log_file:
        for line in log_file:
            if "Saving state:" in line:
                saves.append(float(line.rsplit(" in ", 1)[1].split()[0]) / 1000)
    size = os.path.getsize(bench.config.state_file)
    results["state_save"] = dict(stats_ms(saves), bytes=size)
    say("      median %.2f ms  p95 %.2f ms  (%d bytes)" % (results["state_save"]["median_ms"], results["state_save"]["p95_ms"], size))

    step("%d syslog messages from a unit, through the daemon into its log" % args.syslog_messages)
    figure("syslog", lambda: _syslog_flood(bench, args.syslog_messages), 1,
           note=lambda: "" if "per_second" not in results["syslog"] else
           "  (%d messages a second; `status` at worst %.1f ms meanwhile; RSS %.1f -> %.1f MB)" % (
               results["syslog"]["per_second"], results["syslog"]["status_worst_ms"],
               results["syslog"]["rss_before_mb"], results["syslog"]["rss_after_mb"]))

    step("%d armed timers: idle cost against none, and the accuracy of an elapse, %d runs" % (args.timers, args.repeat))
    try:
        results["timers_idle"] = _armed_timers(bench, args)
        say("      idle with %d timers: cpu %.3f%%  rss %.1f MB  %.2f wakeups/s  (with none: %.1f MB, %.2f wakeups/s)" % (
            args.timers, results["timers_idle"]["cpu_percent"], results["timers_idle"]["rss_mb"],
            results["timers_idle"]["wakeups_per_s"], results["idle"]["rss_mb"], results["idle"]["wakeups_per_s"]))
    except RuntimeError as exc:
        results["timers_idle"] = {"failed": str(exc)}
        results.setdefault("failed", []).append("timers_idle")
        say("      failed: %s" % exc)
    figure("timer_elapse", lambda: _elapse_accuracy(bench, args.repeat), 2,
           note=lambda: "  (from the planned time to the service's start)")

    step("%d redeploys of a socket-activated service under a client connecting in a loop" % args.redeploys)
    figure("redeploys_under_load", lambda: _redeploys_under_load(bench, args.redeploys), 2,
           note=lambda: "  (%d connections: %d served, %d refused, %d reset; p99 %.2f ms, %.2f ms without redeploys)" % (
               results["redeploys_under_load"]["made"], results["redeploys_under_load"]["served"],
               results["redeploys_under_load"]["refused"], results["redeploys_under_load"]["reset"],
               results["redeploys_under_load"]["p99_ms"], results["redeploys_under_load"]["quiet"]["p99_ms"]))

    step("uninstall from the temporary prefix")
    if bench.prefix:
        problem, left = bench.uninstall()
        results["install"].update(uninstall=problem or "ok", left_after_uninstall=left)
        if problem or left:
            results.setdefault("failed", []).append("uninstall")
        say("      %s; %s" % (problem or "uninstalled", "left in the prefix: " + ", ".join(left) if left else "nothing left"))
    else:
        say("      nothing installed")


def _syslog_flood(bench, messages):
    """`messages` through the syslog socket: messages a second (from the
    unit's start to its last line in its log), and `status` round trips
    meanwhile (median, p95, worst)."""
    script, done = os.path.join(bench.path, "flood.py"), os.path.join(bench.path, "flooded")
    log = bench.config.service_log("flood")
    if not (bench.request({"cmd": "status"})["daemon"].get("syslog") or {}).get("sockets"):
        return unavailable("the daemon reads no syslog socket")
    with open(script, "w") as script_file:
        script_file.write(SYSLOG_FLOOD)
    rss_before = read_sample(bench.daemon_pid)["rss"]
    started = time.perf_counter()
    bench.commit({"flood.service": "[Service]\nExecStart=%s %s %s %d %s\nLogRateLimitBurst=0\n" % (
        sys.executable, script, os.path.join(bench.path, "syslog", "dev-log"), messages, done)},
        "bench: a unit that floods its syslog")
    timings = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        before = time.perf_counter()
        bench.request({"cmd": "status"})
        timings.append(time.perf_counter() - before)
        if os.path.exists(done) and _count_lines(log, b"flood[") >= messages:
            break
        time.sleep(0.005)
    else:
        raise RuntimeError("the flood's %d lines did not all reach the log within 120 s" % messages)
    elapsed = time.perf_counter() - started
    rss_after = read_sample(bench.daemon_pid)["rss"]
    bench.cli("stop", "flood")
    return dict(stats_ms(timings), per_second=round(messages / elapsed), status_worst_ms=max(timings) * 1000,
                rss_before_mb=rss_before / 2 ** 20, rss_after_mb=rss_after / 2 ** 20)


TIMER_JOB = "[Service]\nType=oneshot\nExecStart=/bin/true\n"


def _armed_timers(bench, args):
    """The idle daemon with `args.timers` armed timers (each with its
    oneshot, elapsing next New Year), sampled as the idle figure is: the
    loop sleeps until the earliest elapse, so wakeups must not grow."""
    files = {}
    for index in range(args.timers):
        files["timers/t%04d.service" % index] = TIMER_JOB
        files["timers/t%04d.timer" % index] = "[Timer]\nOnCalendar=yearly\n"
    bench.commit(files, "bench: %d timers" % args.timers)
    deadline = time.monotonic() + 120
    while len(bench.request({"cmd": "list-timers"})["timers"]) < args.timers:
        if time.monotonic() > deadline:
            raise RuntimeError("the %d timers were not all armed within 120 s" % args.timers)
        time.sleep(0.2)
    time.sleep(1.0)
    summary = summarize(sample(bench.daemon_pid, args.idle, min(1.0, args.idle)))
    return {"wakeups_per_s": round(summary["wakeups_per_s"]["avg"], 3), "rss_mb": round(summary["rss"]["max"] / 2 ** 20, 2),
            "cpu_percent": round(summary["cpu_percent"]["avg"], 4), "timers": args.timers}


TICK = 0.25                           # the timer of the accuracy figure elapses every quarter second


def _elapse_accuracy(bench, runs):
    """A timer on every quarter of a second (AccuracySec=1us) starting a
    oneshot: from the planned time to the service's start (its "starting"
    event), `runs` times."""
    bench.commit({"tick.service": TIMER_JOB.replace("[Service]", "[Unit]\nStartLimitIntervalSec=0\n[Service]"),
                  "tick.timer": "[Timer]\nOnCalendar=*:*:0/%g\nAccuracySec=1us\n" % TICK}, "bench: a quick timer")
    deadline = time.monotonic() + runs * TICK * 4 + 30
    while True:
        starts = [event["time"] for event in bench.request({"cmd": "events", "names": ["tick"], "count": 1000})["events"]
                  if event["event"] == "state" and event["to"] == "starting"]
        if len(starts) >= runs + 1:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the timer started its service %d times, not %d" % (len(starts), runs + 1))
        time.sleep(0.2)
    bench.commit({"tick.timer": "[Timer]\nOnCalendar=yearly\n"}, "bench: the timer slows down")
    late = [start - math.floor(start / TICK) * TICK for start in starts[1:runs + 1]]   # the first may be an arming's
    return stats_ms(late)


# A service that takes its listening socket from the daemon (LISTEN_FDS) and
# answers each connection with its VERSION; a SIGTERM ends it between two.
LISTEN_SERVER = """import os, select, signal, socket
listener = socket.socket(fileno=3)
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
while not stopping:
    if select.select([listener], [], [], 0.05)[0]:
        connection, _ = listener.accept()
        connection.sendall(os.environ["VERSION"].encode() + b"\\n")
        connection.close()
"""


class _Connector(threading.Thread):
    """Connects in a loop and sorts what became of each connection; the
    latency (connect to answer) of those served, with the version that
    answered."""

    def __init__(self, address):
        threading.Thread.__init__(self, daemon=True)
        self.address, self.running = address, True
        self.counts = {"made": 0, "served": 0, "refused": 0, "reset": 0, "timeout": 0}
        self.served = []                  # (latency, version)

    def run(self):
        while self.running:
            self.counts["made"] += 1
            started = time.perf_counter()
            try:
                with socket.create_connection(self.address, timeout=10) as client:
                    answer = client.makefile("rb").readline()
                if answer.endswith(b"\n"):
                    self.counts["served"] += 1
                    self.served.append((time.perf_counter() - started, answer.strip().decode()))
                else:
                    self.counts["reset"] += 1
            except ConnectionRefusedError:
                self.counts["refused"] += 1
            except socket.timeout:
                self.counts["timeout"] += 1
            except OSError:
                self.counts["reset"] += 1
            time.sleep(0.002)


def _redeploys_under_load(bench, redeploys):
    """A socket-activated service (SPEC §18) and a client connecting in a
    loop: the latency for 2 s with no redeploy, then during `redeploys`
    commits that each restart the service (each waited for until the new
    version answers). Connections made, served, refused and reset; p50 and
    p99 of the latency in each period."""
    script = os.path.join(bench.path, "listen_server.py")
    with open(script, "w") as script_file:
        script_file.write(LISTEN_SERVER)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    unit = lambda version: "[Service]\nEnvironment=VERSION=%d\nExecStart=%s %s\n" % (version, sys.executable, script)
    bench.commit({"listen/listen.service": unit(0), "listen/listen.socket": "[Socket]\nListenStream=127.0.0.1:%d\n" % port},
                 "bench: a socket-activated service")
    deadline = time.monotonic() + 30
    while not any(s["name"] == "listen.socket" for s in bench.request({"cmd": "list-sockets"}).get("sockets", [])):
        if time.monotonic() > deadline:
            raise RuntimeError("listen.socket was not deployed within 30 s")
        time.sleep(0.05)
    client = _Connector(("127.0.0.1", port))
    client.start()
    try:
        time.sleep(2.0)
        quiet = [latency for latency, _ in client.served]
        first = len(client.served)
        for version in range(1, redeploys + 1):
            bench.commit({"listen/listen.service": unit(version)}, "bench: redeploy %d" % version)
            bench.request({"cmd": "sync"})
            deadline = time.monotonic() + 30
            while not (client.served and client.served[-1][1] == str(version)):
                if time.monotonic() > deadline:
                    raise RuntimeError("version %d did not answer within 30 s (%s)" % (version, client.counts))
                time.sleep(0.005)
        during = [latency for latency, _ in client.served[first:]]
    finally:
        client.running = False
        client.join(30)
    bench.cli("stop", "listen", "listen.socket")
    if not quiet or not during:
        raise RuntimeError("no connection was served (%s)" % client.counts)
    return dict(stats_ms(during), p99_ms=round(percentile(during, 0.99) * 1000, 3), redeploys=redeploys,
                quiet=dict(stats_ms(quiet), p99_ms=round(percentile(quiet, 0.99) * 1000, 3)), **client.counts)


def _count_lines(path, needle):
    try:
        with open(path, "rb") as handle:
            return handle.read().count(needle)
    except OSError:
        return 0


def _child_running(bench, argv, known=()):
    """A child of the daemon, not in `known`, that has exec'd `argv`: its
    /proc cmdline is argv and its exe is argv[0]'s program. Only children not in
    `known` are read, so that the measurement costs little next to what it
    measures, even with a thousand services."""
    want = [arg.encode() for arg in argv] + [b""]       # cmdline ends in a NUL
    program = os.path.realpath(argv[0])
    for pid in bench.children():
        if pid in known:
            continue
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as cmdline:
                found = cmdline.read().split(b"\0")
        except OSError:
            continue
        if found == want and exe_of(pid) == program:
            return pid
    return None


def _respawn_latencies(bench, name, argv, repeat, end_of):
    """`repeat` times: find the process of service `name` (a child of the
    daemon that exec'd `argv`), let `end_of(pid)` end it or wait for its end and
    return perf_counter() at that end (None: missed, try again), then wait for
    the new process to exec. Returns the latencies in seconds."""
    latencies = []
    misses = 0
    while len(latencies) < repeat:
        old = bench.wait_for_child(name, argv, (), 10)
        known = set(bench.children())
        ended = end_of(old)
        if ended is None:
            misses += 1
            if misses > repeat * 5:
                raise RuntimeError("missed the exit of %s %d times" % (" ".join(argv), misses))
            continue
        bench.wait_for_child(name, argv, known, 10)
        latencies.append(time.perf_counter() - ended)
    return latencies


def _kill_now(pid):
    os.kill(pid, signal.SIGKILL)
    return time.perf_counter()


def _exit_seen(argv):
    """An end_of for _respawn_latencies: waits on a pidfd of the process, which
    becomes readable when it exits (before the daemon can reap it). None when
    the process had exited (or was not `argv`) before the pidfd was open."""
    def end_of(pid):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        try:
            try:                          # a pidfd pins the pid: is it still the running service?
                with open("/proc/%d/cmdline" % pid, "rb") as cmdline:
                    if cmdline.read().split(b"\0")[:-1] != [arg.encode() for arg in argv]:
                        return None       # a zombie's cmdline is empty: its exit is already past
            except OSError:
                return None
            if not select.select([pidfd], [], [], 10)[0]:
                raise RuntimeError("%s did not exit within 10 s" % " ".join(argv))
            return time.perf_counter()
        finally:
            os.close(pidfd)
    return end_of


def bench_floor(python):
    """What any gitproc command costs before it does anything: the interpreter's
    start and the compilation of gitproc.py (as a script is compiled at every run)."""
    started = time.perf_counter()
    subprocess.run([python, "-c", "import sys; compile(open(sys.argv[1]).read(), sys.argv[1], 'exec')", GITPROC],
                   stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def _print_results(results):
    machine = results["machine"]
    print()
    print("gitproc benchmark: %d cores, Python %s (%s), Linux %s, %d services" % (
        machine["cores"], machine["python"], machine["interpreter"], machine["kernel"], results["services"]))
    rows = [
        ("exit of a service to its new process running", results["respawn"]),
        ("  the same, service failed after 200 ms up", results["respawn_after_run"]),
        ("  the same, in a full sandbox", results["respawn_sandboxed"]),
        ("commit to changed service running", results["commit_to_running"]),
        ("  the same, one file of a unit's big folder", results["commit_to_running_files"]),
        ("`start NAME` command to process running", results["start_command"]),
        ("  the same, installed command", results["start_command_installed"]),
        ("  script's floor: interpreter + compile", results["cli_floor"]),
        ("`status` command (script)", results["status_command"]),
        ("  the same, installed command", results["status_command_installed"]),
        ("`status` round trip (socket)", results["status_round_trip"]),
        ("GET /metrics over HTTP", results["metrics_http"]),
        ("state save", results["state_save"]),
        ("`status` during a syslog flood", results["syslog"]),
        ("timer elapse: planned time to service start", results["timer_elapse"]),
        ("a connection, during redeploys of its service", results["redeploys_under_load"]),
    ]
    for label, figure in rows:
        if "unavailable" in figure or "failed" in figure:
            print("  %-48s %s" % (label, describe_figure(figure)))
        else:
            print("  %-48s median %9.2f ms   p95 %9.2f ms%s" % (label, figure["median_ms"], figure["p95_ms"],
                                                              "   spawn: %s" % figure["spawn"] if "spawn" in figure else ""))
    idle = results["idle"]
    print("  %-48s %.1f MB, %.3f %% CPU, %.2f wakeups/s, %d thread(s)" % (
        "idle daemon", idle["rss_mb"], idle["cpu_percent"], idle["wakeups_per_s"], idle["threads"]))
    print("  %-48s %.3f s" % ("cold start until all run", results["cold_start_s"]))
    armed = results["timers_idle"]
    if "failed" in armed:
        print("  %-48s %s" % ("idle daemon with armed timers", describe_figure(armed)))
    else:
        print("  %-48s %.1f MB, %.3f %% CPU, %.2f wakeups/s" % (
            "idle daemon with %d armed timers" % armed["timers"], armed["rss_mb"], armed["cpu_percent"],
            armed["wakeups_per_s"]))
    if "per_second" in results["syslog"]:
        print("  %-48s %d a second; RSS %.1f MB before, %.1f MB after" % (
            "syslog messages into a unit's log", results["syslog"]["per_second"], results["syslog"]["rss_before_mb"],
            results["syslog"]["rss_after_mb"]))
    load = results["redeploys_under_load"]
    if "made" in load:
        print("  %-48s %d made, %d served, %d refused, %d reset, %d timed out; p99 %.2f ms (%.2f ms without)" % (
            "connections during %d redeploys" % load["redeploys"], load["made"], load["served"], load["refused"],
            load["reset"], load["timeout"], load["p99_ms"], load["quiet"]["p99_ms"]))
    install = results["install"]
    if install["available"]:
        print("  %-48s %s (runs %s); uninstall: %s, %s" % (
            "installed command", install["entry_point"], install["interpreter"], install.get("uninstall"),
            "left " + ", ".join(install["left_after_uninstall"]) if install.get("left_after_uninstall") else "nothing left"))
    else:
        print("  %-48s %s" % ("installed command", describe_figure(install)))


# ==== command line ==================================================================

def main(argv=None):
    parser = argparse.ArgumentParser(prog="profile_daemon.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:2]))
    parser.add_argument("--pid", type=int, help="the daemon's pid (default: from the pid file)")
    parser.add_argument("--home", help="the daemon's home (default: $GITPROC_HOME or ~/.gitproc)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to sample (default: 60)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default: 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--bench", action="store_true", help="run the benchmarks in a temporary home")
    parser.add_argument("--services", type=int, default=10, help="--bench: how many services (default: 10)")
    parser.add_argument("--repeat", type=int, default=20, help="--bench: runs per latency (default: 20)")
    parser.add_argument("--idle", type=float, default=10.0, help="--bench: seconds of idle sampling (default: 10)")
    parser.add_argument("--python", help="--bench: interpreter for gitproc (default: /usr/bin/python3)")
    parser.add_argument("--no-http", action="store_true", help="--bench: run the daemon without its HTTP listener")
    parser.add_argument("--timers", type=int, default=1000, help="--bench: how many armed timers (default: 1000)")
    parser.add_argument("--redeploys", type=int, default=20,
                        help="--bench: commits that restart a socket-activated service under load (default: 20)")
    parser.add_argument("--folder-files", type=int, default=FOLDER_FILES,
                        help="--bench: files in the big folder of a unit (default: %d)" % FOLDER_FILES)
    parser.add_argument("--syslog-messages", type=int, default=SYSLOG_MESSAGES,
                        help="--bench: messages of the syslog flood (default: %d)" % SYSLOG_MESSAGES)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.interval <= 0 or args.repeat < 1 or args.services < 0 or args.idle <= 0 or \
            args.timers < 1 or args.syslog_messages < 1 or args.folder_files < 2 or args.redeploys < 1:
        parser.error("durations must be positive, --repeat, --timers, --redeploys and --syslog-messages at least 1, "
                     "--folder-files at least 2, --services at least 0")
    try:
        return run_bench(args) if args.bench else run_sampling(args)
    except gitproc.GitprocError as exc:
        print("profile_daemon: %s" % exc, file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print("profile_daemon: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
