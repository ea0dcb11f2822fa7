"""Tests of gitproc.py, numbered as the module's sections.

Pure tests first (parser, restart table, deploy plan: no processes), then
component and end-to-end tests with real daemons in temporary homes under
/tmp, real git repositories and real processes, checked through /proc, the CLI
and the socket. Nothing sleeps for a fixed time: wait_until polls with a
deadline, and every test kills what it started, by pid.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import gitproc

HERE = os.path.dirname(os.path.abspath(__file__))
GITPROC = os.path.join(HERE, "gitproc.py")
IS_ROOT = os.geteuid() == 0


def wait_until(predicate, timeout=10.0, message="condition"):
    """Poll `predicate` with a short backoff until it returns something true;
    fail the test after `timeout` seconds (a hang ceiling, not an expectation)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, message))
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def pid_alive(pid):
    """True while `pid` exists and is not a zombie."""
    fields = gitproc.read_proc_stat(pid)
    return fields is not None and fields[0] != b"Z"


def proc_environ(pid):
    with open("/proc/%d/environ" % pid, "rb") as environ:
        return dict(item.decode().split("=", 1) for item in environ.read().split(b"\0") if b"=" in item)


def run_cli(*args):
    """main() in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = gitproc.main(list(args))
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


class Home:
    """A temporary gitproc home: a services repository, a daemon, cleanup.

    Short path under /tmp (socket paths are limited to 108 bytes)."""

    def __init__(self, test, init=True):
        self.test = test
        self.path = tempfile.mkdtemp(prefix="gp", dir="/tmp")
        self.repo = os.path.join(self.path, "services")
        self.logs = os.path.join(self.path, "logs")
        self.daemon_pid = None
        self.known_pids = set()
        test.addCleanup(self.cleanup)
        if init:
            os.makedirs(self.repo)
            self.git("init", "-q")
            self.git("symbolic-ref", "HEAD", "refs/heads/main")

    # -- the repository -------------------------------------------------------

    def git(self, *args):
        return subprocess.run(["git", "-C", self.repo, "-c", "user.name=t", "-c", "user.email=t@t"] + list(args),
                              check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout.decode()

    def commit(self, files, message="change"):
        """Write (or, for None, delete) files in the repository and commit them."""
        for name, text in files.items():
            path = os.path.join(self.repo, name)
            if text is None:
                self.git("rm", "-q", name)
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as unit_file:
                unit_file.write(text)
            self.git("add", name)
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD").strip()

    # -- the daemon -----------------------------------------------------------

    def cli(self, *args):
        return run_cli("--home", self.path, *args)

    def cli_process(self, *args, env=None, timeout=60):
        """The CLI as a real process (exit codes, stderr, no traceback)."""
        full_env = dict(os.environ)
        full_env.pop("GITPROC_HOME", None)
        full_env.update(env or {})
        proc = subprocess.run([sys.executable, GITPROC, "--home", self.path] + list(args),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, timeout=timeout)
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()

    def start_daemon(self, *args, env=None):
        code, out, err = self.cli_process("daemon", *args, env=env)
        self.test.assertEqual(code, 0, "daemon did not start: %s%s" % (out, err))
        with open(os.path.join(self.path, "gitproc.pid")) as pid_file:
            self.daemon_pid = int(pid_file.read())
        return out

    def request(self, payload, timeout=30):
        config = gitproc.load_config({"home": self.path})
        return gitproc.request(config, payload, timeout=timeout)

    def status(self, name=None):
        result = self.request({"cmd": "status", "names": [name] if name else []})
        for service in result["services"]:
            if service["pid"]:
                self.known_pids.add(service["pid"])
        return result if name is None else result["services"][0]

    def wait_state(self, name, *states, timeout=10):
        def reached():
            service = self.status(name)
            return service if service["state"] in states else None
        try:
            return wait_until(reached, timeout, "%s to be %s" % (name, "/".join(states)))
        except AssertionError as exc:
            raise AssertionError("%s (it is %s)\n--- daemon.log ---\n%s" % (
                exc, self.status(name)["state"], self.daemon_log()[-3000:]))

    def running_pid(self, name, timeout=10):
        return self.wait_state(name, "running", timeout=timeout)["pid"]

    def daemon_log(self):
        try:
            with open(os.path.join(self.logs, "daemon.log")) as log_file:
                return log_file.read()
        except OSError:
            return ""

    def service_log(self, name):
        try:
            with open(os.path.join(self.logs, name + ".log")) as log_file:
                return log_file.read()
        except OSError:
            return ""

    def kill_daemon(self):
        if self.daemon_pid and pid_alive(self.daemon_pid):
            os.kill(self.daemon_pid, signal.SIGKILL)
            wait_until(lambda: not pid_alive(self.daemon_pid), 10, "daemon to die")

    def cleanup(self):
        """Stop the daemon, then SIGKILL every process group this test saw."""
        if self.daemon_pid and pid_alive(self.daemon_pid):
            try:
                self.status()
                self.request({"cmd": "shutdown"}, timeout=5)
                wait_until(lambda: not pid_alive(self.daemon_pid), 15, "daemon to exit")
            except Exception:
                pass
            if pid_alive(self.daemon_pid):
                os.kill(self.daemon_pid, signal.SIGKILL)
        for pid in self.known_pids:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        shutil.rmtree(self.path, ignore_errors=True)


def unit(exec_start, **keys):
    """A unit file: ExecStart plus [Service] keys given as Key=value."""
    lines = ["[Unit]", "Description=test unit", "[Service]", "ExecStart=" + exec_start]
    lines += ["%s=%s" % (key, value) for key, value in keys.items()]
    return "\n".join(lines) + "\n"


SLEEPER = "/bin/sleep 1000"


# ==== 3. small utilities ======================================================

class UtilityTests(unittest.TestCase):

    def test_timespans_as_systemd_writes_them(self):
        cases = {"5": 5, "5s": 5, "500ms": 0.5, "1min 30s": 90, "1min30s": 90, "2h": 7200,
                 "1.5s": 1.5, "100us": 0.0001, "1d": 86400, " 3 s ": 3}
        for text, seconds in cases.items():
            self.assertAlmostEqual(gitproc.parse_timespan(text), seconds, msg=text)
        self.assertEqual(gitproc.parse_timespan("infinity"), float("inf"))
        for bad in ("", "abc", "5x", "-5s", "s", "5 parsecs"):
            with self.assertRaises(ValueError, msg=bad):
                gitproc.parse_timespan(bad)

    def test_sizes(self):
        self.assertEqual(gitproc.parse_size("512"), 512)
        self.assertEqual(gitproc.parse_size("512K"), 512 * 1024)
        self.assertEqual(gitproc.parse_size("1.5G"), 3 * 1024 ** 3 // 2)
        self.assertEqual(gitproc.parse_size("2T"), 2 * 1024 ** 4)
        self.assertIsNone(gitproc.parse_size("infinity"))
        self.assertGreater(gitproc.parse_size("10%", allow_percent=True), 0)
        for bad in ("", "12Q", "M", "10%"):
            with self.assertRaises(ValueError, msg=bad):
                gitproc.parse_size(bad)

    def test_signals_and_exit_descriptions(self):
        self.assertEqual(gitproc.parse_signal("SIGKILL"), 9)
        self.assertEqual(gitproc.parse_signal("term"), 15)
        self.assertEqual(gitproc.parse_signal("2"), 2)
        with self.assertRaises(ValueError):
            gitproc.parse_signal("SIGNOPE")
        self.assertEqual(gitproc.describe_exit({"code": 3}), "exit code 3")
        self.assertEqual(gitproc.describe_exit({"signal": 9}), "signal SIGKILL")

    def test_atomic_write_replaces_whole_file(self):
        folder = tempfile.mkdtemp(prefix="gpu", dir="/tmp")
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "state.json")
        gitproc.atomic_write(path, b"old")
        gitproc.atomic_write(path, b"new" * 1000)
        with open(path, "rb") as written:
            self.assertEqual(written.read(), b"new" * 1000)
        self.assertEqual(os.listdir(folder), ["state.json"])

    def test_pid_start_time_names_one_process(self):
        self.assertIsInstance(gitproc.pid_start_time(os.getpid()), int)
        self.assertIsNone(gitproc.pid_start_time(2 ** 22 + 1))

    def test_tail_lines(self):
        folder = tempfile.mkdtemp(prefix="gpu", dir="/tmp")
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "x.log")
        with open(path, "w") as log_file:
            log_file.write("".join("line %d\n" % i for i in range(100000)))
        self.assertEqual(gitproc.tail_lines(path, 3), ["line 99997", "line 99998", "line 99999"])
        self.assertEqual(gitproc.tail_lines(path + ".missing", 3), [])


# ==== 4. unit files ============================================================

def parse(text, name="web"):
    data = text.encode() if isinstance(text, str) else text
    return gitproc.parse_unit(name, name + ".service", data)


def messages(diagnostics, severity="error"):
    return [d.message for d in diagnostics if d.severity == severity]


class UnitParserTests(unittest.TestCase):

    def test_minimal_unit_takes_defaults(self):
        spec, problems = parse("[Service]\nExecStart=/bin/true\n")
        self.assertEqual(problems, [])
        self.assertEqual(spec.exec_start[0].argv, ("/bin/true",))
        self.assertEqual((spec.type, spec.restart, spec.restart_sec, spec.timeout_stop_sec),
                         ("simple", "no", 0.1, 10.0))
        self.assertEqual((spec.start_limit_interval, spec.start_limit_burst), (10.0, 5))
        self.assertEqual(spec.kill_mode, "control-group")
        self.assertEqual(spec.kill_signal, signal.SIGTERM)

    def test_quoting_and_escapes_in_exec_start(self):
        spec, problems = parse(
            "[Service]\nExecStart=/bin/sh -c 'echo \"a  b\"; exit 3' \"x y\" \"q\\\"uote\" tab\\there '' \\x41\n")
        self.assertEqual(problems, [])
        self.assertEqual(spec.exec_start[0].argv,
                         ("/bin/sh", "-c", 'echo "a  b"; exit 3', "x y", 'q"uote', "tab\there", "", "A"))

    def test_unterminated_quote_is_an_error_with_its_line(self):
        spec, problems = parse("[Unit]\nDescription=x\n[Service]\nExecStart=/bin/echo 'oops\n")
        self.assertIsNone(spec)
        self.assertEqual(problems[0].line, 4)
        self.assertIn("unterminated single quote", str(problems[0]))
        self.assertTrue(str(problems[0]).startswith("web.service:4: error: ExecStart="))

    def test_continuation_lines_and_comments(self):
        spec, problems = parse("# comment\n; also\n[Service]\nExecStart=/bin/echo one \\\n"
                               "# a comment inside is skipped\n  two \\\n  three\nRestart=always\n")
        self.assertEqual(problems, [])
        self.assertEqual(spec.exec_start[0].argv, ("/bin/echo", "one", "two", "three"))
        self.assertEqual(spec.restart, "always")

    def test_list_keys_accumulate_and_empty_resets(self):
        spec, _ = parse("[Unit]\nAfter=a b\nAfter=c.service\n[Service]\nExecStart=/bin/true\n"
                        "Environment=A=1\nEnvironment=B=2\nEnvironment=\nEnvironment=C=3 \"D=four five\"\n"
                        "ExecStartPre=/bin/a\nExecStartPre=\nExecStartPre=-/bin/b x\n")
        self.assertEqual(spec.after, ("a", "b", "c"))
        self.assertEqual(spec.environment, (("C", "3"), ("D", "four five")))
        self.assertEqual(len(spec.exec_start_pre), 1)
        self.assertTrue(spec.exec_start_pre[0].ignore_failure)
        self.assertEqual(spec.exec_start_pre[0].argv, ("/bin/b", "x"))

    def test_every_key_of_the_table_parses(self):
        spec, problems = parse(
            "[Unit]\nDescription=All keys\nAfter=db\nRequires=db\nConditionHost=web-*\n"
            "StartLimitIntervalSec=1min\nStartLimitBurst=3\n"
            "[Service]\nType=oneshot\nExecStart=/bin/true\nExecStart=/bin/echo two\nExecStartPre=/bin/true\n"
            "WorkingDirectory=/tmp\nUser=nobody\nGroup=nogroup\nEnvironment=A=1\nEnvironmentFile=-/etc/default/x\n"
            "Restart=on-failure\nRestartSec=2s\nTimeoutStopSec=300ms\nKillSignal=SIGINT\nKillMode=mixed\n"
            "MemoryMax=64M\nCPUQuota=50%\nHealthCheckURL=http://127.0.0.1:8080/health\nHealthCheckInterval=10s\n"
            "HealthCheckTimeout=1s\nHealthCheckRetries=2\nHealthCheckStartPeriod=5s\nPrivatePIDs=yes\nAutoRollback=yes\n"
            "[Install]\nWantedBy=multi-user.target\n")
        self.assertEqual(problems, [])
        self.assertEqual(spec.requires, ("db",))
        self.assertEqual(spec.condition_host, ("web-*",))
        self.assertEqual((spec.start_limit_interval, spec.start_limit_burst), (60, 3))
        self.assertEqual(len(spec.exec_start), 2)
        self.assertEqual(spec.environment_files, (("/etc/default/x", True),))
        self.assertEqual((spec.restart, spec.restart_sec, spec.timeout_stop_sec), ("on-failure", 2, 0.3))
        self.assertEqual((spec.kill_signal, spec.kill_mode), (signal.SIGINT, "mixed"))
        self.assertEqual((spec.memory_max, spec.cpu_quota), (64 << 20, 50.0))
        self.assertEqual(spec.health_check_url, "http://127.0.0.1:8080/health")
        self.assertEqual((spec.health_check_interval, spec.health_check_timeout,
                          spec.health_check_retries, spec.health_check_start_period), (10, 1, 2, 5))
        self.assertTrue(spec.private_pids and spec.auto_rollback)

    def test_bad_values_are_errors_naming_key_and_line(self):
        cases = [
            ("Restart=sometimes", "Restart=: 'sometimes' is not one of"),
            ("RestartSec=soon", "RestartSec=: invalid time span"),
            ("MemoryMax=lots", "MemoryMax=: invalid size"),
            ("CPUQuota=fast", "CPUQuota=: invalid percentage"),
            ("KillSignal=SIGNOPE", "KillSignal=: unknown signal"),
            ("KillMode=all", "KillMode=: 'all' is not one of"),
            ("Type=forking", "Type=forking is not supported"),
            ("PrivatePIDs=maybe", "PrivatePIDs=: invalid boolean"),
            ("HealthCheckURL=ftp://x", "HealthCheckURL="),
            ("HealthCheckRetries=-1", "HealthCheckRetries=: '-1' is not a whole number"),
            ("WorkingDirectory=relative/dir", "WorkingDirectory= needs an absolute path"),
            ("Environment=1BAD=x", "invalid environment assignment"),
            ("EnvironmentFile=relative", "needs an absolute path"),
        ]
        for line, expected in cases:
            spec, problems = parse("[Service]\nExecStart=/bin/true\n%s\n" % line)
            self.assertIsNone(spec, line)
            self.assertEqual(len(messages(problems)), 1, line)
            self.assertIn(expected, messages(problems)[0], line)
            self.assertEqual([d.line for d in problems if d.severity == "error"], [3], line)

    def test_missing_exec_start_and_multiple_for_simple(self):
        spec, problems = parse("[Unit]\nDescription=none\n")
        self.assertIsNone(spec)
        self.assertIn("missing ExecStart=", messages(problems)[0])
        spec, problems = parse("[Service]\nExecStart=/bin/a\nExecStart=/bin/b\n")
        self.assertIsNone(spec)
        self.assertIn("only Type=oneshot", messages(problems)[0])
        spec, problems = parse("[Service]\nExecStart=/bin/a\nExecStart=\nExecStart=/bin/b\n")
        self.assertEqual(spec.exec_start[0].argv, ("/bin/b",))

    def test_unknown_keys_and_sections_are_warnings(self):
        spec, problems = parse("[Unit]\nWants=x\nDocumentation=man:x\n[Service]\nExecStart=/bin/true\n"
                               "ProtectSystem=full\n[Timer]\nOnCalendar=daily\n[X-Custom]\nA=b\nnot a key\n")
        self.assertIsNotNone(spec)
        warnings = messages(problems, "warning")
        self.assertEqual(len(warnings), 4, warnings)
        self.assertIn("unknown key Wants= in [Unit]", warnings[0])
        self.assertIn("unknown section [Timer]", warnings[2])
        self.assertIn("no '='", warnings[3])

    def test_specifiers(self):
        spec, problems = parse("[Unit]\nDescription=%n is %N, %p@%i, 100%%\n[Service]\nExecStart=/bin/echo %i\n",
                               name="getty@tty1")
        self.assertEqual(spec.description, "getty@tty1.service is getty@tty1, getty@tty1, 100%")
        self.assertEqual(spec.exec_start[0].argv, ("/bin/echo", "tty1"))

    def test_exec_prefixes(self):
        spec, _ = parse("[Service]\nExecStart=-@/bin/sleep my-sleeper 5\n")
        command = spec.exec_start[0]
        self.assertTrue(command.ignore_failure)
        self.assertEqual((command.program, command.argv), ("/bin/sleep", ("my-sleeper", "5")))
        spec, _ = parse("[Service]\nExecStart=+/bin/true\n")
        self.assertEqual(spec.exec_start[0].program, "/bin/true")

    def test_variable_expansion_at_spawn(self):
        env = {"WORDS": "a  b c", "ONE": "x y"}
        self.assertEqual(gitproc.expand_command(["/bin/echo", "$WORDS", "${ONE}", "pre${ONE}post", "$$HOME", "$NOPE", "${NOPE}"], env),
                         ["/bin/echo", "a", "b", "c", "x y", "prex ypost", "$HOME", ""])
        self.assertEqual(gitproc.expand_command(["sh", "-c", "echo $HOME"], env), ["sh", "-c", "echo $HOME"])

    def test_binary_nul_huge_and_bad_names_never_raise(self):
        for data, expected in ((b"\x00\x01\x02" * 100, "NUL bytes"), (b"\xff\xfe[Service]", "not UTF-8"),
                               (b"[Service]\nExecStart=/bin/true\n#" + b"x" * (2 << 20), "limited to")):
            spec, problems = parse(data)
            self.assertIsNone(spec)
            self.assertIn(expected, messages(problems)[0])
        for name in ("-bad", "a" * 65, "sp ace", "daemon", ""):
            spec, problems = gitproc.parse_unit(name, name + ".service", b"[Service]\nExecStart=/bin/true\n")
            self.assertIsNone(spec, name)
            self.assertEqual(len(messages(problems)), 1, name)

    def test_random_garbage_never_raises(self):
        import random
        rng = random.Random(7)
        alphabet = "[]=\\'\"\n #;%$ {}ExecStartServiceUnit-@+!:\t"
        for _ in range(2000):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
            gitproc.parse_unit("fuzz", "fuzz.service", text.encode())

    def test_duplicate_names_are_all_rejected(self):
        data = b"[Service]\nExecStart=/bin/true\n"
        specs, problems = gitproc.check_unit_tree([("web", "a/web.service", data, "1"), ("web", "b/web.service", data, "2"),
                                                  ("db", "db.service", data, "3")])
        self.assertEqual(list(specs), ["db"])
        self.assertEqual(len(messages(problems)), 2)

    def test_environment_file(self):
        folder = tempfile.mkdtemp(prefix="gpu", dir="/tmp")
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "env")
        with open(path, "w") as env_file:
            env_file.write("# comment\nA=1\nexport B=two words\nC=\"quoted \\\"x\\\"\"\nD='single'\nbad line\n")
        self.assertEqual(gitproc.load_environment_file(path),
                         [("A", "1"), ("B", "two words"), ("C", 'quoted "x"'), ("D", "single")])

    @unittest.skipUnless(os.path.isdir("/lib/systemd/system"), "no /lib/systemd/system on this machine")
    def test_real_systemd_units_never_crash_check(self):
        code, out, err = run_cli("check", "/lib/systemd/system")
        self.assertIn(code, (0, 1))
        self.assertNotIn("Traceback", out + err)
        self.assertRegex(err, r"\d+ unit files? checked")


# ==== 11. daemon, end to end ===================================================

class DaemonLifecycleTests(unittest.TestCase):

    def test_fresh_home_creates_repo_runs_hello_and_shuts_down_clean(self):
        home = Home(self, init=False)
        out = home.start_daemon()
        self.assertIn("Created repository", out)
        self.assertIn("pid %d" % home.daemon_pid, out)
        self.assertIn("Add hello.service", out)
        pid = home.running_pid("hello")
        self.assertEqual(os.getpgid(pid), pid, "a service leads its own process group")
        wait_until(lambda: "hello from gitproc" in home.service_log("hello"), 10, "hello's first line")
        code, out, err = home.cli("shutdown")
        self.assertEqual((code, err), (0, ""))
        self.assertFalse(pid_alive(home.daemon_pid))
        self.assertFalse(pid_alive(pid))
        self.assertFalse(os.path.exists(os.path.join(home.path, "gitproc.sock")))
        self.assertFalse(os.path.exists(os.path.join(home.path, "gitproc.pid")))
