"""Start and stop real services on 127.0.0.1 for tests: an MLflow tracking server and an sshd.

Both are context managers that own a process group: on exit the group gets SIGTERM, a bounded
wait, then SIGKILL, so no server outlives the test that started it. Nothing starts at import.

- :func:`mlflow_server` runs ``mlflow server`` from the same virtual environment as
  ``sys.executable`` with a SQLite backend and proxied artifacts in a temporary folder, and
  yields its URI once ``/health`` answers.
- :func:`sshd` runs ``/usr/sbin/sshd -D`` with its own generated host key and a config that
  accepts only one generated client key (no PAM, no passwords), and yields an :class:`SSHServer`.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SSHD_BINARY = "/usr/sbin/sshd"
LOOPBACK = "127.0.0.1"


class ServiceError(RuntimeError):
    """A test service could not be started (the message includes the tail of its log)."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group of ``proc``, wait up to ``timeout`` s, then SIGKILL it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # Children (server workers, per-connection sshd) may outlive the leader: kill the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


def _wait_until(ready, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    """Poll ``ready()`` until true; raise :class:`ServiceError` on exit of ``proc`` or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(
                f"{what} exited with code {proc.returncode} before it was ready; log {log}:\n"
                f"{_log_tail(log)}"
            )
        if ready():
            return
        time.sleep(0.2)
    raise ServiceError(f"{what} not ready after {timeout:.0f} s; log {log}:\n{_log_tail(log)}")


# ----------------------------------------------------------------------------------------------
# MLflow
# ----------------------------------------------------------------------------------------------
def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@contextlib.contextmanager
def mlflow_server(tmp_dir: str | Path, startup_timeout: float = 90.0) -> Iterator[str]:
    """Run an MLflow tracking server on 127.0.0.1; yield ``http://127.0.0.1:PORT``.

    Backend: ``sqlite:///<tmp_dir>/mlflow.db``; artifacts are proxied by the server and stored in
    ``<tmp_dir>/artifacts``; the server log is ``<tmp_dir>/mlflow-server.log``. One worker and no
    job runner, so the server is two processes that stop with one signal.
    """
    tmp_dir = Path(tmp_dir).resolve()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    mlflow_exe = Path(sys.executable).parent / "mlflow"
    if not mlflow_exe.is_file():
        raise ServiceError(f"{mlflow_exe}: mlflow executable not found next to {sys.executable}")
    port = free_port()
    log = tmp_dir / "mlflow-server.log"
    cmd = [
        str(mlflow_exe), "server",
        "--host", LOOPBACK, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_dir / 'mlflow.db'}",
        "--artifacts-destination", str(tmp_dir / "artifacts"),
    ]  # fmt: skip
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=tmp_dir, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    uri = f"http://{LOOPBACK}:{port}"
    try:
        _wait_until(lambda: _http_ok(f"{uri}/health"), proc, startup_timeout, "mlflow server", log)
        yield uri
    finally:
        _stop(proc)


# ----------------------------------------------------------------------------------------------
# sshd
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SSHServer:
    """Where a test sshd listens and how to log in (key-only)."""

    host: str
    port: int
    user: str
    key_path: Path  # the client's private key (no passphrase)


def sshd_available() -> bool:
    """Whether the OpenSSH server binary is installed (Debian: ``openssh-server``)."""
    return os.access(SSHD_BINARY, os.X_OK)


def _ssh_keygen(path: Path) -> None:
    keygen = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
    subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "distill3r-test", "-f", str(path)],
        check=True, stdin=subprocess.DEVNULL, capture_output=True,
    )  # fmt: skip


def _ssh_banner(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _sshd_config(tmp_dir: Path, port: int, user: str) -> str:
    return "\n".join([
        f"Port {port}",
        f"ListenAddress {LOOPBACK}",
        f"HostKey {tmp_dir / 'ssh_host_ed25519_key'}",
        f"PidFile {tmp_dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {tmp_dir / 'authorized_keys'}",
        f"AllowUsers {user}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "PermitRootLogin prohibit-password",
        "StrictModes no",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "PrintMotd no",
        "LogLevel INFO",
        "Subsystem sftp internal-sftp",
        "",
    ])  # fmt: skip


@contextlib.contextmanager
def sshd(tmp_dir: str | Path, startup_timeout: float = 30.0) -> Iterator[SSHServer]:
    """Run ``sshd -D`` on 127.0.0.1 with a generated host key; yield an :class:`SSHServer`.

    Only the generated client key ``<tmp_dir>/id_ed25519`` may log in, as the current user. The
    server log is ``<tmp_dir>/sshd.log``. Raises :class:`ServiceError` when the binary is missing
    (see :func:`sshd_available`) or the server does not come up.
    """
    if not sshd_available():
        raise ServiceError(f"{SSHD_BINARY} not found: install openssh-server")
    tmp_dir = Path(tmp_dir).resolve()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    user = getpass.getuser()
    _ssh_keygen(tmp_dir / "ssh_host_ed25519_key")
    _ssh_keygen(tmp_dir / "id_ed25519")
    shutil.copyfile(tmp_dir / "id_ed25519.pub", tmp_dir / "authorized_keys")
    if os.geteuid() == 0:
        # sshd running as root refuses to start without its privilege-separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    config = tmp_dir / "sshd_config"
    config.write_text(_sshd_config(tmp_dir, port, user))
    log = tmp_dir / "sshd.log"
    cmd = [SSHD_BINARY, "-D", "-e", "-f", str(config)]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=tmp_dir, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_until(lambda: _ssh_banner(LOOPBACK, port), proc, startup_timeout, "sshd", log)
        yield SSHServer(LOOPBACK, port, user, tmp_dir / "id_ed25519")
    finally:
        _stop(proc)
