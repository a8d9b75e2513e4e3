"""Workers on other machines, started over ssh (`starter="ssh"`).

`SshStarter` is the `Starter` for a plain list of machines with no
scheduler, as horovodrun and the DeepSpeed launcher do it: each worker is
one `ssh HOST 'sh -c WRAPPER ...'` process on the launcher's machine.

What travels, and how:

- **Environment**: only the variables the launcher passes (`TF_CONFIG`,
  `KERASDIST_*`, `--env` ones) are added to the host's own login
  environment; the launcher's other variables stay local.
- **Working directory**: the worker starts in the launcher's working
  directory (`cwd`), which must exist on every host (a shared file system,
  the documented assumption; also for `backup_dir`).
- **Output**: no terminal is allocated (`ssh -T`), so lines arrive as the
  worker wrote them (no `\\r`); the worker's stderr is merged into its
  stdout on the host, keeping their order.
- **Signals**: ssh's standard input is a pipe to a small POSIX `sh`
  wrapper on the host. The wrapper starts the worker in its own session
  (`setsid`, signal dispositions reset to default), and forwards each
  signal name it reads (`TERM`, `USR1`, `INT`, `STOP`, `CONT`, `KILL`) to
  the worker's process group, so a SIGTERM reaches the worker while the
  connection stays up and the worker can save and exit 75.
- **Exit status**: the wrapper exits with the worker's status (0, 75, 78,
  128+N for a worker killed by signal N) and reports it on a side channel,
  so ssh's own failure (status 255: refused, lost connection) is told apart
  from a worker that exits 255: `SshProcess.ssh_failure` holds the reason,
  and a `kerasdist-ssh:` line says it in the output.
- **Lost launcher or connection**: when ssh's input closes (ssh died, the
  launcher died, `signal(SIGKILL)`), the wrapper kills the worker's whole
  process group. Behind a network cut the input does not close, but the
  launcher's keepalive lines stop: after `alive_timeout` seconds (30)
  without one, the wrapper kills the group too.
- **Heartbeat**: the worker's `KERASDIST_HEARTBEAT_FILE` is a private file
  on the host; the wrapper relays each change of it (its JSON object, e.g.
  the goodput facts, as written; else a touch) to the launcher's own
  heartbeat file, so `--timeout` sees a quiet remote worker's progress,
  and the launcher its goodput facts, without a shared heartbeat
  directory.

The hosts need a POSIX `sh`, `setsid` (util-linux), and GNU `env` (with
`--default-signal`, coreutils >= 8.31), `stat` and `mktemp`: any current
Linux distribution.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kerasdist.launch import hosts, protocol, supervisor

__all__ = ["SshProcess", "SshStarter"]

_STATUS = "kerasdist-ssh-status "
_BEAT = "kerasdist-ssh-beat"
_STATE = "kerasdist-ssh-state "
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# The wrapper run on each host (`sh -c WRAPPER kerasdist-ssh DIR N ALIVE
# K=V... CMD`): ssh_wrapper.sh, a shell script of this package checked by
# shellcheck, whose comments say how it works (sent without them). Its
# status lines and exit codes are this module's constants (a test checks).
_WRAPPER_FILE = "ssh_wrapper.sh"


@functools.cache
def wrapper_script() -> str:
    """The shell script each ssh host runs around its worker, without its
    comments (ssh_wrapper.sh, a file of this package).

    Returns:
        str.

    Raises:
        FileNotFoundError: naming the file when the installed package
            lacks it (a packaging error).

    Example:

    >>> "kerasdist-ssh-status" in wrapper_script()
    True
    """
    resource = importlib.resources.files(__package__).joinpath(
        _WRAPPER_FILE)
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{_WRAPPER_FILE} is missing from the installed kerasdist.launch "
            f"({resource}); ssh hosts need it. Reinstall kerasdist (its "
            "package data must include kerasdist/launch/*.sh)."
        ) from None
    return "".join(
        line for line in text.splitlines(True) if not line.startswith("#")
    )


# Picks free TCP ports on the host (all interfaces), like
# `kerasdist.cluster.free_ports` does on this machine.
_FREE_PORTS = """\
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
"""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class SshProcess(supervisor.Process):
    """A worker running on another host, through one local `ssh` process.

    Behaves like the local `supervisor.Process` it extends, so the
    launcher and `supervisor.stop_all` handle it unchanged:

    - `returncode` is the remote worker's exit status (0, 75, 78, 128+N
      when a signal N killed it), or ssh's own (255) when ssh failed, which
      `ssh_failure` then explains.
    - `signal(sig)` forwards the signal to the remote worker's process
      group through ssh's input (the connection stays up). `SIGKILL` also
      closes that input (the wrapper then kills the group even if the line
      is lost) and gives ssh `kill_timeout` seconds to end with the
      worker's status before the local ssh is killed too.
    - `reap()` waits for that, so after `stop_all` the remote worker is
      gone, not only the local ssh.

    Built by `SshStarter.start`; not meant to be built directly.

    Args:
        command: list of str. The whole ssh command line.
        host: `Host`. Where the worker runs (for messages).
        kill_timeout: float. Seconds between `signal(SIGKILL)` and killing
            the local ssh if it has not ended. Defaults to 5.
        heartbeat: str or None. The launcher's heartbeat file for this
            worker: touched whenever the worker touches its own (a private
            file on the host), and given its JSON object when it writes
            one. Defaults to None.
        alive_interval: float. Seconds between keepalive lines to the
            wrapper. Defaults to 5.
        **process: passed to `supervisor.Process` (`log_path`,
            `log_header`, `sink`, `prefix`, `capture`, `die_with_parent`).

    Raises:
        OSError: if ssh cannot be started.

    Example:

    ```python
    p = SshStarter().start(Host("10.0.0.2", 1), ["python", "train.py"], {})
    stop_all([p], grace=30.0)
    print(p.returncode, p.ssh_failure)
    ```
    """

    def __init__(self, command: Sequence[str], *, host: hosts.Host,
                 kill_timeout: float = 5.0, heartbeat: str | None = None,
                 alive_interval: float = 5.0, **process: Any):
        self.host = host
        self.kill_timeout = kill_timeout
        self.remote_status: int | None = None
        self._heartbeat = heartbeat
        self._remote_state: str | None = None
        self._ssh_lines: list[str] = []
        self._failure: str | None = None
        self._kill_deadline: float | None = None
        self._stdin_lock = threading.Lock()
        self._err_log = process.get("log_path")
        super().__init__(command, stdin_pipe=True, separate_stderr=True,
                         **process)
        os.set_blocking(self.stdin.fileno(), False)
        self._err_reader = threading.Thread(
            target=self._pump_stderr,
            name=f"kerasdist-ssh-stderr-{self.pid}",
            daemon=True,
        )
        self._err_reader.start()
        self._alive = threading.Thread(
            target=self._keep_alive, args=(alive_interval,),
            name=f"kerasdist-ssh-alive-{self.pid}", daemon=True,
        )
        self._alive.start()

    def _keep_alive(self, interval: float) -> None:
        # Tells the wrapper the launcher is still there (see ssh_wrapper.sh).
        while self._send("ALIVE\n"):
            time.sleep(interval)

    # ssh's stderr: the wrapper's status and heartbeat lines (kept out of
    # the output), the wrapper's messages and ssh's own diagnostics.
    def _pump_stderr(self) -> None:
        log = open(self._err_log, "ab") if self._err_log else None  # noqa: SIM115
        status, beat = _STATUS.encode(), _BEAT.encode()
        state = _STATE.encode()
        try:
            for line in iter(self.stderr.readline, b""):
                if line.startswith(beat):
                    self._beat(line[len(beat):].strip().decode(
                        "utf-8", "replace"))
                    continue
                if line.startswith(state):
                    self._remote_state = line[len(state):].strip().decode(
                        "ascii", "replace") or None
                    continue
                if line.startswith(status):
                    try:
                        self.remote_status = int(line[len(status):])
                        continue
                    except ValueError:
                        pass
                self._ssh_lines.append(line.decode("utf-8", "replace"))
                self._emit(line, log)
            if self.remote_status is None:
                self._explain_failure(log)
        finally:
            self.stderr.close()
            if log:
                log.close()

    def _beat(self, record: str) -> None:
        # The worker's heartbeat changed: `record` is its JSON object (the
        # goodput facts, or {"finished": true}) as written, or "" when it
        # was only touched. The launcher owns the file; once it removed it
        # (stopping), the beat has nowhere to go.
        if not self._heartbeat:
            return
        try:
            if protocol.read_heartbeat(record) is not None:
                with open(self._heartbeat, "w") as f:
                    f.write(f"{record}\n")
            else:
                os.utime(self._heartbeat)
        except OSError:
            pass

    def _emit(self, line: bytes, log) -> None:
        # ssh ends its own messages with "\r\n". A whole line: nothing is
        # left pending.
        self._route(line.rstrip(b"\r\n") + b"\n", log)

    def _explain_failure(self, log) -> None:
        # stderr closed without the wrapper's status: ssh itself ended
        # (refused, lost connection, killed). Wait for its exit status.
        deadline = time.monotonic() + 10.0
        code = None
        while code is None and time.monotonic() < deadline:
            code = supervisor.Process.returncode.fget(self)
            if code is None:
                time.sleep(0.05)
        reason = _last_line("".join(self._ssh_lines))
        if code is not None and code < 0:
            reason = f"ssh was killed by signal {-code}" + (
                f" ({reason})" if reason else ""
            )
        elif code == 255 and not reason:
            # E.g. ServerAlive timing out under LogLevel=ERROR or -q, which
            # hide ssh's "Timeout, server ... not responding".
            reason = (
                "ssh printed nothing; status 255 without a message usually "
                "means the connection was lost (a network cut, or the host "
                "went down)"
            )
        self._failure = (
            f"ssh to {self.host.address} ended with status {code} before "
            f"the worker reported its exit: {reason or 'no message'}"
        )
        self._emit(f"kerasdist-ssh: {self._failure}".encode(), log)

    @property
    def ssh_failure(self) -> str | None:
        """Why ssh itself failed, or None.

        None while running and when the status is the remote worker's;
        else a sentence such as "ssh to 10.0.0.2 ended with status 255
        before the worker reported its exit: ssh: connect to host 10.0.0.2
        port 22: Connection refused".
        """
        if self.returncode is None:
            return None
        self._err_reader.join(timeout=10.0)
        return self._failure

    @property
    def returncode(self) -> int | None:
        """Exit status (see the class docstring); None while running.
        Only looks: the kill after `kill_timeout` is `reap`'s."""
        return supervisor.Process.returncode.fget(self)

    def _kill_if_overdue(self) -> None:
        """After `signal(SIGKILL)`, once `kill_timeout` passed and ssh still
        runs (the remote side did not confirm, e.g. the network is cut):
        kills the local ssh; sshd ends the remote worker once it notices
        the lost connection."""
        if (self._kill_deadline is not None
                and time.monotonic() >= self._kill_deadline
                and self.returncode is None):
            supervisor.Leader.signal(self, signal.SIGKILL)
            self._kill_deadline = None

    def state(self) -> str | None:
        """The remote worker's `/proc` state letter (`"T"`: stopped), as
        the host last reported it (checked every second); None once ssh
        has ended. See `supervisor.process_state`."""
        if self._reaped or self.returncode is not None:
            return None
        return self._remote_state

    def _send(self, line: str) -> bool:
        """Writes one line to the wrapper; False once that is impossible.

        The pipe is non-blocking: when ssh stopped reading (its 64 KiB
        are full), the line is dropped rather than blocking the launcher.
        """
        with self._stdin_lock:
            if self.stdin is None or self.stdin.closed:
                return False
            try:
                os.write(self.stdin.fileno(), line.encode())
                return True
            except BlockingIOError:
                return True
            except (OSError, ValueError):  # EPIPE: ssh has ended.
                return False

    def _close_stdin(self) -> None:
        with self._stdin_lock:
            if self.stdin is not None and not self.stdin.closed:
                try:
                    self.stdin.close()
                except OSError:  # BrokenPipe while flushing.
                    pass

    def signal(self, sig: int) -> None:
        """Sends `sig` to the remote worker's process group.

        Args:
            sig: int. The signal, e.g. `signal.SIGTERM`. `SIGKILL` also
                ends the local ssh (see the class docstring).
        """
        if self._reaped:
            return
        if supervisor.Process.returncode.fget(self) is not None:
            self._close_stdin()
            return
        name = signal.Signals(sig).name.removeprefix("SIG")
        self._send(f"{name}\n")
        if sig == signal.SIGKILL:
            self._close_stdin()
            if self._kill_deadline is None:
                self._kill_deadline = time.monotonic() + self.kill_timeout

    def reap(self, output_timeout: float = 5.0) -> int:
        """Waits for ssh (after `SIGKILL`: at most `kill_timeout`), collects
        it, and for its output to end.

        Args:
            output_timeout: float. Seconds to wait for the output to close.
                Defaults to 5.

        Returns:
            int. The exit status (see the class docstring).
        """
        # Like Leader.reap, this waits for the end (killing the local ssh
        # once the kill deadline passed); then stdin is closed under the
        # lock the keepalive thread writes under, never while ssh runs.
        while not self._reaped and self.returncode is None:
            self._kill_if_overdue()
            time.sleep(0.05)
        self._close_stdin()
        code = super().reap(output_timeout)
        self._err_reader.join(timeout=output_timeout)
        return code


class SshStarter(hosts.Starter):
    """Starts workers on other machines over ssh (`starter="ssh"`).

    Requirements on every host: passwordless ssh from the launcher's
    machine (a key; `BatchMode=yes` is always set, so nothing prompts), the
    same working directory and the same Python environment at the same path
    as the launcher (a shared file system is assumed, also for
    `backup_dir`), and a POSIX `sh` with `setsid` (util-linux) and GNU
    `env`, `stat` and `mktemp` (coreutils).

    Args:
        ssh_command: str or list of str. The ssh program and the user's
            options, e.g. `"ssh -p 2222 -i ~/.ssh/id_ed25519"` (a string is
            split like a shell does). The user's options come before
            kerasdist's defaults (`ServerAliveInterval=5`,
            `ServerAliveCountMax=6`), so they win. Defaults to `"ssh"`.
        cwd: str or None. Working directory of the workers on every host.
            Defaults to None (this process's working directory, at
            construction).
        python: str or None. The Python interpreter on the hosts, used by
            `free_ports`. Defaults to None (`sys.executable`: the same path
            on every host).
        kill_timeout: float. Seconds a worker's ssh gets after `SIGKILL`
            to report the remote worker's end before it is killed locally.
            Defaults to 5.
        alive_timeout: float. The host kills a worker that heard nothing
            from the launcher for this long (a keepalive line goes every
            `alive_timeout / 6` seconds), so a launcher cut off by the
            network does not leave workers behind; 0 turns it off. Defaults
            to 30.

    Raises:
        ValueError: if `ssh_command` is empty or cannot be split, or
            `kill_timeout` is not positive, or `alive_timeout` negative.

    Example:

    ```python
    starter = SshStarter("ssh -p 2222 -o StrictHostKeyChecking=no")
    host = Host("10.0.0.2", 1)
    if starter.reachable(host, timeout=10.0) is None:
        worker = starter.start(host, ["python", "train.py"],
                               {"TF_CONFIG": "{...}"}, prefix="[w0] ")
    ```
    """

    name = "ssh"
    # ssh's own ConnectTimeout: a TCP and key exchange over a real network.
    probe_timeout = 10.0

    def __init__(self, ssh_command: str | Sequence[str] = "ssh",
                 cwd: str | None = None, python: str | None = None,
                 kill_timeout: float = 5.0, alive_timeout: float = 30.0):
        try:
            argv = (shlex.split(ssh_command) if isinstance(ssh_command, str)
                    else [str(a) for a in ssh_command])
        except ValueError as e:
            argv, why = [], f" ({e})"
        else:
            why = ""
        if not argv:
            raise ValueError(
                f"Invalid value for argument `ssh_command`. Received: "
                f"ssh_command={ssh_command!r}{why}. Expected the ssh program "
                "and its options, e.g. 'ssh -p 2222 -i ~/.ssh/id_ed25519'."
            )
        for name, value, least in (("kill_timeout", kill_timeout, 0),
                                   ("alive_timeout", alive_timeout, None)):
            if not (isinstance(value, (int, float))
                    and not isinstance(value, bool) and math.isfinite(value)
                    and (value > 0 if least == 0 else value >= 0)):
                raise ValueError(
                    f"Invalid value for argument `{name}`. Received: "
                    f"{name}={value!r}. Expected a "
                    f"{'positive' if least == 0 else 'non-negative'} number "
                    "of seconds."
                )
        self.ssh_argv = argv
        self.cwd = os.getcwd() if cwd is None else cwd
        self.python = sys.executable if python is None else python
        self.kill_timeout = float(kill_timeout)
        self.alive_timeout = float(alive_timeout)

    def _ssh(self, host: hosts.Host, remote: str,
             first: Sequence[str] = (), last: Sequence[str] = ()
             ) -> list[str]:
        return [self.ssh_argv[0], *first, *self.ssh_argv[1:], *last,
                "--", host.address, remote]

    def remote_command(self, command: Sequence[str],
                       env: Mapping[str, str]) -> str:
        """The command line the host's login shell runs for a worker.

        Args:
            command: list of str. The worker command.
            env: mapping. Variables to set for it.

        Returns:
            str. `sh -c WRAPPER kerasdist-ssh CWD N ALIVE K=V... COMMAND...`,
            every word quoted with `shlex.quote`.

        Raises:
            ValueError: for an empty command or a variable name that is not
                a shell name.

        Example:

        >>> SshStarter(cwd="/work").remote_command(["true"], {})[:6]
        'sh -c '
        """
        command = [str(c) for c in command]
        if not command:
            raise ValueError(
                "Invalid value for argument `command`. Received: "
                "command=[]. Expected the worker program and its arguments."
            )
        for key in env:
            if not _ENV_NAME.fullmatch(str(key)):
                raise ValueError(
                    f"Invalid environment variable name {key!r} for a worker "
                    "started over ssh. Expected letters, digits and '_', "
                    "not starting with a digit."
                )
        words = ["sh", "-c", wrapper_script(), "kerasdist-ssh", self.cwd,
                 str(len(env)), str(math.ceil(self.alive_timeout)),
                 *(f"{k}={v}" for k, v in env.items()), *command]
        return " ".join(shlex.quote(w) for w in words)

    def reachable(self, host: hosts.Host, timeout: float) -> str | None:
        """None when `ssh HOST true` succeeds, else ssh's reason.

        Runs `ssh -o BatchMode=yes -o ConnectTimeout=T [options] HOST true`
        and gives it `timeout` + 10 seconds in all (connecting takes at most
        `timeout`; logging in may take a little longer).

        Args:
            host: `Host`.
            timeout: float. Seconds to wait for the connection.

        Returns:
            None, or the reason: ssh's last line of error output, e.g.
            `"ssh: connect to host 10.0.0.2 port 22: Connection refused"`.

        Example:

        ```python
        why = SshStarter().reachable(Host("10.0.0.2", 1), timeout=5.0)
        ```
        """
        argv = self._ssh(host, "true", first=[
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, math.ceil(timeout))}",
        ])
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True,
            )
        except OSError as e:
            return f"cannot run {argv[0]!r} ({e.strerror or e})"
        try:
            _, err = proc.communicate(timeout=timeout + 10.0)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # Not reaped yet: ours.
            proc.communicate()
            return f"no answer from ssh within {timeout + 10.0:g}s"
        if proc.returncode == 0:
            return None
        return _last_line(err.decode("utf-8", "replace")) or (
            f"ssh exited with status {proc.returncode}"
        )

    def start(self, host: hosts.Host, command: Sequence[str],
              env: Mapping[str, str], **process: Any) -> SshProcess:
        """Starts one worker on `host` over ssh.

        Args:
            host: `Host`.
            command: list of str. The worker command, run on the host in
                `cwd` with the host's login environment plus `env`.
            env: mapping. TF_CONFIG, KERASDIST_*, `--env` variables.
            **process: passed to `supervisor.Process` (`log_path`,
                `log_header`, `sink`, `prefix`, `capture`).

        Returns:
            `SshProcess`.

        Raises:
            ValueError: for an empty command or a bad variable name.
            OSError: if ssh cannot be started here.

        Example:

        ```python
        worker = SshStarter().start(Host("10.0.0.2", 1), ["python", "t.py"],
                                    {"TF_CONFIG": "{...}"})
        ```
        """
        remote = self.remote_command(command, env)
        argv = self._ssh(host, remote, first=[
            "-T", "-o", "BatchMode=yes",
        ], last=[
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6",
        ])
        return SshProcess(
            argv, host=host, kill_timeout=self.kill_timeout,
            heartbeat=env.get(protocol.ENV_HEARTBEAT_FILE),
            alive_interval=(self.alive_timeout or 60.0) / 6, **process,
        )

    def pick_ports(self, hosts_: Sequence[hosts.Host]) -> list[int]:
        """Free ports on each host, picked there (see `free_ports`)."""
        return [p for h in hosts_ for p in self.free_ports(h, h.slots)]

    def failure_reason(self, process: supervisor.Process) -> str | None:
        """`SshProcess.ssh_failure`: why ssh itself failed, or None."""
        return (
            process.ssh_failure if isinstance(process, SshProcess) else None
        )

    def free_ports(self, host: hosts.Host, count: int,
                   timeout: float = 60.0) -> list[int]:
        """Finds `count` TCP ports free on `host` right now (over ssh).

        For the workers' `TF_CONFIG` addresses: ports are picked on the
        host itself (by `python`), since this machine cannot tell which of
        another machine's ports are free. As with the local
        `kerasdist.cluster.free_ports`, a port may be taken before it is
        used; the launcher then restarts the group.

        Args:
            host: `Host`.
            count: int. How many distinct ports.
            timeout: float. Seconds for the whole ssh call. Defaults to 60.

        Returns:
            list of int.

        Raises:
            OSError: naming the host and ssh's reason when it fails.

        Example:

        ```python
        port, = SshStarter().free_ports(Host("10.0.0.2", 1), 1)
        ```
        """
        remote = " ".join(shlex.quote(w) for w in [
            self.python, "-c", _FREE_PORTS, str(int(count))
        ])
        argv = self._ssh(host, remote, first=["-T", "-o", "BatchMode=yes"])
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True,
                timeout=timeout, start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            raise OSError(
                f"ssh to {host.address} to pick free ports gave no answer "
                f"within {timeout:g}s"
            ) from None
        words = done.stdout.decode().split()
        if done.returncode != 0 or len(words) != count:
            raise OSError(
                f"Could not pick free ports on {host.address} with "
                f"{self.python!r} over ssh (status {done.returncode}): "
                f"{_last_line(done.stderr.decode('utf-8', 'replace'))}"
            )
        return [int(w) for w in words]
