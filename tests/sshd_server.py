"""A real OpenSSH server on this machine's loopback addresses, for tests.

`start(addresses, root)` writes, under `root`, a host key, a fresh client
key (made with `ssh-keygen`), an `authorized_keys` file and an
`sshd_config` that listens only on the given 127.0.0.x addresses (one free
port shared by all of them), then runs Debian's `/usr/sbin/sshd -D -e -f
CONFIG` in its own session. `SshServer.ssh_command` is the client command
line (`-F /dev/null`, the key, `StrictHostKeyChecking=no`,
`UserKnownHostsFile=/dev/null`) for `SshStarter`. `stop()` ends the
server by PID and the per-connection sshd processes it started (each in
its own session), whose end closes the connections, so the wrappers kill
the workers they started; it runs even when a test fails.

Root logins with a key are allowed (CI runs as root); passwords are not.
No `ClientAliveInterval` (sshd's default): after a network cut, only
SshStarter's own keepalive can end a remote worker, which the tests check.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time

from kerasdist.launch import supervisor

SSHD = "/usr/sbin/sshd"
REQUIRED = ("ssh", "ssh-keygen")
# sshd, started as root, insists on its privilege separation directory;
# Debian's service creates it at boot, not the package.
PRIVSEP_DIR = "/run/sshd"


def missing() -> str | None:
    """Why a test sshd cannot run here, or None when it can."""
    absent = [p for p in REQUIRED if shutil.which(p) is None]
    if not os.access(SSHD, os.X_OK):
        absent.insert(0, SSHD)
    if absent:
        return (
            f"{', '.join(absent)} not installed (apt-get install "
            "openssh-server openssh-client; `make engines` does it)"
        )
    if os.geteuid() == 0 and not os.path.isdir(PRIVSEP_DIR):
        try:
            os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
        except OSError as e:
            return f"cannot create sshd's {PRIVSEP_DIR} ({e.strerror})"
    return None


def port_free_on_all(addresses) -> int:
    """A TCP port free on every one of `addresses` right now."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((addresses[0], 0))
            port = first.getsockname()[1]
            ok = True
            for address in addresses[1:]:
                with socket.socket() as other:
                    try:
                        other.bind((address, port))
                    except OSError:
                        ok = False
                        break
            if ok:
                return port
    raise OSError(f"no port free on all of {addresses}")


def children(pid: int) -> list[int]:
    """PIDs of the processes whose parent is `pid` (from /proc)."""
    return [p.pid for p in supervisor.processes() if p.ppid == pid]


@dataclasses.dataclass
class SshServer:
    """A running sshd: its addresses, port, client key and process."""

    addresses: tuple
    port: int
    root: str
    client_key: str
    process: subprocess.Popen | None = None

    @property
    def ssh_command(self) -> str:
        """Client command line (program and options) for this server."""
        return " ".join(shlex.quote(w) for w in [
            "ssh", "-F", "/dev/null", "-p", str(self.port),
            "-i", self.client_key, "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
        ])

    def log(self) -> str:
        """What sshd printed so far (`-e`: to its log file)."""
        try:
            with open(os.path.join(self.root, "sshd.log")) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        """Stops sshd and its connection processes, by PID."""
        if self.process is None or self.process.returncode is not None:
            return
        sessions = children(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def keygen(path: str) -> None:
    """Makes an ed25519 key pair without passphrase: `path`, `path.pub`."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kerasdist-test",
         "-f", path], check=True, timeout=60, stdin=subprocess.DEVNULL,
    )


def start(addresses, root: str, client_key: str | None = None
          ) -> SshServer:
    """Starts sshd on `addresses` (127.0.0.x) with keys under `root`.

    Args:
        addresses: list of str. Loopback addresses to listen on.
        root: str. An empty directory for keys, config, PID file and log.
        client_key: str or None. An existing private key to authorize;
            None makes a fresh one.

    Returns:
        `SshServer`, accepting connections on every address.
    """
    addresses = tuple(addresses)
    os.makedirs(root, exist_ok=True)
    host_key = os.path.join(root, "host_key")
    keygen(host_key)
    if client_key is None:
        client_key = os.path.join(root, "client_key")
        keygen(client_key)
    with open(client_key + ".pub") as f:
        public = f.read()
    authorized = os.path.join(root, "authorized_keys")
    with open(authorized, "w") as f:
        f.write(public)
    os.chmod(authorized, 0o600)
    port = port_free_on_all(addresses)
    config = os.path.join(root, "sshd_config")
    with open(config, "w") as f:
        f.write("".join(f"ListenAddress {a}:{port}\n" for a in addresses))
        f.write(
            f"HostKey {host_key}\n"
            f"PidFile {os.path.join(root, 'sshd.pid')}\n"
            f"AuthorizedKeysFile {authorized}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "MaxStartups 50\n"
        )
    server = SshServer(addresses, port, root, client_key)
    with open(os.path.join(root, "sshd.log"), "ab") as log:
        server.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", config], stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_listening(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_listening(server: SshServer, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    pending = list(server.addresses)
    while pending:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"sshd exited with status {server.process.returncode}:\n"
                f"{server.log()}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"sshd not listening on {pending} after {seconds}s:\n"
                f"{server.log()}"
            )
        try:
            socket.create_connection((pending[0], server.port), 1).close()
            pending.pop(0)
        except OSError:
            time.sleep(0.1)
