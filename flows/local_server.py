"""The local Prefect server of the ``tryon`` commands: started once, reused, stopped on demand.

Without ``PREFECT_API_URL`` a command uses one local Prefect server per Prefect home
(``PREFECT_HOME``, default ``~/.prefect``), with its UI, and starts it in the background if it
is not running yet. The first command pays for the start (database migrations, the UI's
files); later ones find it at once, and a run's page in the UI is still there after the
command has ended. ``tryon server start|stop|status`` manage it.

- **State**: ``<home>/tryon-server.json`` (URL, port, pid and the pid's start time, prefect
  version). It is believed only while the server answers ``/api/health`` *and* the pid is
  still the process that was started: a dead server's file, a reused pid, or another server
  on the port after ours died make it stale, and the next start replaces it.
- **Lock**: starting and stopping hold an exclusive ``flock`` on ``<home>/tryon-server.lock``,
  so two commands launched at once start one server (the second waits, then finds it). The
  kernel drops the lock with its holder, ``kill -9`` included.
- **Port**: ``PREFECT_SERVER_API_PORT`` (Prefect's setting, 4200 by default) on 127.0.0.1, or
  a free port when anything else holds that one: a program that is not a Prefect server, and
  also a Prefect server this home did not start (it is not ours to stop, and its lease storage
  is unknown). The command binds the socket and hands it to the server, so the port is settled
  before the server starts and no other start can take it meanwhile.
- **Detached**: the server is the grandchild of the command (its parent exits at once), in a
  session of its own: Ctrl-C at the terminal and the terminal's hang-up do not reach it, no
  command waits for it, and it becomes no command's zombie. Its stdin is /dev/null and its
  stdout and stderr go to ``<home>/tryon-server.log``: it holds none of the command's pipes,
  so a CI job reading ``make demo``'s output ends with the command.
- **Environment**: the Prefect settings (``PREFECT_*``, the profile's) and what a process
  needs to run; not the rest of the command's environment (provider keys, cloud credentials),
  which would otherwise live on in a long-lived process.
- **Leases in files** (Prefect's filesystem lease storage under ``PREFECT_HOME``), as on the
  temporary server of issue 13: a ``kill -9``'d run's lease survives a server restart, and
  the next run on this machine hands its slots back (``tasks.concurrency``).

Whoever sets ``PREFECT_API_URL`` keeps full control: then nothing is started.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import httpx
import psutil

__all__ = [
    "FILESYSTEM_LEASES",
    "LocalServerError",
    "PrefectApi",
    "ServerState",
    "TemporaryServerError",
    "ensure_server",
    "lock_is_held",
    "prefect_api",
    "prefect_home",
    "read_state",
    "running_server",
    "stop_server",
]

FILESYSTEM_LEASES: Final = "prefect.server.concurrency.lease_storage.filesystem"
HOST: Final = "127.0.0.1"
STATE_NAME: Final = "tryon-server.json"
LOCK_NAME: Final = "tryon-server.lock"
LOG_NAME: Final = "tryon-server.log"
DEFAULT_START_TIMEOUT_S: Final = 180.0
# A running server busy with a large run may answer its health check late.
_BUSY_WAIT_S: Final = 30.0
_STOP_GRACE_S: Final = 20.0
# A start given up (timeout, Ctrl-C): its server has nothing to finish.
_ABORT_GRACE_S: Final = 3.0
_SPAWN_TIMEOUT_S: Final = 60.0
# The folder holding this package: the server imports this module from the same tree.
_CODE_ROOT: Final = Path(__file__).resolve().parents[1]
# Besides PREFECT_*: what a Python process needs to run, find certificates and reach proxies.
_PASSED_ON: Final = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "VIRTUAL_ENV",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "DO_NOT_TRACK",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    }
)
# Settings the server is started with, whatever the command's environment says (each name
# with the aliases Prefect also reads, which would otherwise compete with it).
_UI_ENABLED: Final = ("PREFECT_SERVER_UI_ENABLED", "PREFECT_UI_ENABLED")
_UI_API_URL: Final = ("PREFECT_SERVER_UI_API_URL", "PREFECT_UI_API_URL")


class LocalServerError(RuntimeError):
    """The local Prefect server could not be started, reached or stopped."""


# The name the temporary server's error had (issue 13).
TemporaryServerError = LocalServerError


Say = Callable[[str], None]


def _quiet(line: str) -> None:
    del line


@dataclass(frozen=True, slots=True)
class ServerState:
    """What ``<home>/tryon-server.json`` records of the running server."""

    url: str
    port: int
    pid: int
    # The process's start time (Unix seconds) tells a reused pid from the server.
    pid_started: float
    prefect_version: str
    log: str

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def uptime_s(self) -> float:
        return max(0.0, time.time() - self.pid_started)

    def is_alive(self) -> bool:
        """The recorded process still exists and is the one that was started."""
        try:
            process = psutil.Process(self.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
            return abs(process.create_time() - self.pid_started) <= 1.0
        except psutil.Error:
            return False


@dataclass(frozen=True, slots=True)
class PrefectApi:
    """The Prefect API a command talks to, and its UI."""

    api_url: str
    ui_url: str | None
    # The local server, when it is the one in use (None under the user's PREFECT_API_URL).
    server: ServerState | None

    def flow_run_url(self, flow_run_id: str) -> str | None:
        """The page of a flow run in the UI (None when no UI address is known)."""
        if not self.ui_url:
            return None
        return f"{self.ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"


# ------------------------------------------------------------------------------------- state


def prefect_home() -> Path:
    """The Prefect home of this process's settings (``PREFECT_HOME``, profile, default)."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def secret_blocks_absent(names: Sequence[str]) -> bool:
    """True when no Prefect API is configured and the local server's SQLite database holds no
    Secret block of these ``names`` (or does not exist yet): then asking needs no server.
    False whenever that cannot be told for sure (another database, an unreadable one)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return False
    url = settings.server.database.connection_url
    database = url.get_secret_value() if url is not None else ""
    prefix = "sqlite+aiosqlite:///"
    if not database.startswith(prefix):
        return False  # another database (Postgres...): only its server can tell
    path = Path(database.removeprefix(prefix)).expanduser()
    if not path.exists():
        return True
    query = (
        "SELECT count(*) FROM block_document d JOIN block_type t ON d.block_type_id = t.id "
        f"WHERE t.slug = 'secret' AND d.name IN ({', '.join('?' * len(names))})"
    )
    try:
        # Read-only, and Prefect's own tables: any surprise means "ask the server".
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            (found,) = db.execute(query, list(names)).fetchone()
    except sqlite3.Error:
        return False
    return found == 0


def _prefect_version() -> str:
    return metadata.version("prefect")


def read_state(home: Path) -> ServerState | None:
    """The recorded server, alive or not (None without a readable state file)."""
    try:
        data: dict[str, Any] = json.loads((home / STATE_NAME).read_text())
        return ServerState(**data)
    except (OSError, ValueError, TypeError):
        return None


def _write_state(home: Path, state: ServerState) -> None:
    path = home / STATE_NAME
    staged = path.with_suffix(".tmp")
    staged.write_text(json.dumps(asdict(state), indent=2) + "\n")
    staged.replace(path)


def _forget_state(home: Path) -> None:
    (home / STATE_NAME).unlink(missing_ok=True)


def _answers(api_url: str, timeout_s: float = 5.0) -> bool:
    try:
        with httpx.Client(timeout=timeout_s, trust_env=False) as client:
            return client.get(f"{api_url}/health").status_code == 200
    except httpx.HTTPError:
        return False


def running_server(home: Path) -> ServerState | None:
    """The recorded server if it is alive and answers; else None (nothing is changed)."""
    state = read_state(home)
    if state is None or not state.is_alive() or not _answers(state.api_url):
        return None
    return state


# -------------------------------------------------------------------------------------- lock


@contextlib.contextmanager
def _locked(home: Path, timeout_s: float) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LocalServerError(
                        f"another command has been starting or stopping the local Prefect "
                        f"server for over {timeout_s:.0f} s (lock: {home / LOCK_NAME})"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def lock_is_held(home: Path) -> bool:
    """Whether a command is starting or stopping the server right now."""
    path = home / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# ------------------------------------------------------------------------------------- start


def _start_timeout_s() -> float:
    raw = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    try:
        return float(raw) if raw else DEFAULT_START_TIMEOUT_S
    except ValueError:
        return DEFAULT_START_TIMEOUT_S


def _preferred_port() -> int:
    from prefect.settings import get_current_settings

    return int(get_current_settings().server.api.port)


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def _listening_socket(preferred: int, say: Say) -> socket.socket:
    try:
        return _bind(preferred)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise LocalServerError(f"cannot listen on {HOST}:{preferred}: {exc}") from None
    holder = (
        "a Prefect server this Prefect home did not start"
        if _answers(f"http://{HOST}:{preferred}/api", timeout_s=2.0)
        else "another program"
    )
    sock = _bind(0)
    say(f"Port {preferred} is taken by {holder}: the local server uses {sock.getsockname()[1]}")
    return sock


def _server_environment(home: Path, url: str, port: int) -> dict[str, str]:
    from prefect.settings import get_current_settings

    env = {
        name: value
        for name, value in os.environ.items()
        if name.startswith("PREFECT_") or name.startswith("LC_") or name in _PASSED_ON
    }
    # The profile's settings (database, logging...) as Prefect passes them to its own server.
    env.update(get_current_settings().to_environment_variables(exclude_unset=True))
    for name in (*_UI_ENABLED, *_UI_API_URL, "PREFECT_API_URL"):
        env.pop(name, None)
    inherited = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    python_path = [str(_CODE_ROOT), *(entry for entry in inherited if entry != str(_CODE_ROOT))]
    env.update(
        {
            # This module from this tree, whatever the server's working folder holds.
            "PYTHONPATH": os.pathsep.join(python_path),
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_API_HOST": HOST,
            "PREFECT_SERVER_API_PORT": str(port),
            _UI_ENABLED[0]: "true",
            _UI_API_URL[0]: f"{url}/api",
            "PREFECT_UI_URL": url,
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": FILESYSTEM_LEASES,
            "PREFECT__SERVER_FINAL": "1",
        }
    )
    return env


def _spawn(home: Path, sock: socket.socket, url: str, port: int) -> int:
    """Start the server detached; return its pid (the grandchild's)."""
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", "flows.local_server", str(sock.fileno()), str(write_end)]
    try:
        with open(home / LOG_NAME, "wb") as log, open(os.devnull, "rb") as devnull:
            child = subprocess.Popen(
                argv,
                env=_server_environment(home, url, port),
                cwd=home,
                stdin=devnull,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=(sock.fileno(), write_end),
            )
        os.close(write_end)
        write_end = -1
        try:
            code = child.wait(timeout=_SPAWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise LocalServerError(
                f"the local Prefect server did not start (see {home / LOG_NAME})"
            ) from None
        ready, _, _ = select.select([read_end], [], [], 5.0)
        answer = os.read(read_end, 64) if ready else b""
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if code != 0 or not answer.strip().isdigit():
        raise LocalServerError(
            f"the local Prefect server did not start, status {code} (see {home / LOG_NAME})"
        )
    return int(answer)


def _wait_healthy(home: Path, state: ServerState, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{state.api_url}/health").status_code == 200:
                    return
            if not state.is_alive():
                raise LocalServerError(
                    f"the local Prefect server exited while starting (see {home / LOG_NAME})"
                )
            if time.monotonic() > deadline:
                raise LocalServerError(
                    f"the local Prefect server did not answer within {timeout_s:.0f} s "
                    f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS; see {home / LOG_NAME})"
                )
            time.sleep(0.1)


def _start(home: Path, port: int, say: Say, timeout_s: float) -> ServerState:
    sock = _listening_socket(port, say)
    try:
        actual = int(sock.getsockname()[1])
        url = f"http://{HOST}:{actual}"
        say(
            f"Starting the local Prefect server on {url} (it keeps running for later "
            "commands; `tryon server stop` stops it)"
        )
        pid = _spawn(home, sock, url, actual)
    finally:
        sock.close()  # the server has its own copy
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        raise LocalServerError(
            f"the local Prefect server exited while starting (see {home / LOG_NAME})"
        ) from None
    state = ServerState(
        url=url,
        port=actual,
        pid=pid,
        pid_started=started,
        prefect_version=_prefect_version(),
        log=str(home / LOG_NAME),
    )
    try:
        _wait_healthy(home, state, timeout_s)
    except BaseException:  # Ctrl-C included: a server no state file knows must not stay
        _terminate(state, grace_s=_ABORT_GRACE_S)
        raise
    _write_state(home, state)
    return state


def ensure_server(
    *,
    home: Path | None = None,
    port: int | None = None,
    say: Say = _quiet,
    timeout_s: float | None = None,
) -> tuple[ServerState, bool]:
    """The running local server of ``home`` (this process's Prefect home by default),
    started if needed; and whether this call started it."""
    home = prefect_home() if home is None else home
    timeout_s = _start_timeout_s() if timeout_s is None else timeout_s
    try:
        # Waiting for the lock covers another command's whole start.
        with _locked(home, timeout_s=timeout_s + _BUSY_WAIT_S + 30.0):
            state = read_state(home)
            if state is not None and state.is_alive():
                if not _answers(state.api_url):
                    _wait_busy(home, state)
                if state.prefect_version != _prefect_version():
                    say(
                        f"The local Prefect server runs prefect {state.prefect_version}, this "
                        f"command {_prefect_version()}: `tryon server stop` to restart it"
                    )
                return state, False
            _forget_state(home)  # stale, if there was one
            chosen = _preferred_port() if port is None else port
            return _start(home, chosen, say, timeout_s), True
    except OSError as exc:  # the Prefect home: not writable, full...
        raise LocalServerError(f"cannot use the Prefect home {home}: {exc}") from None


def _wait_busy(home: Path, state: ServerState) -> None:
    deadline = time.monotonic() + _BUSY_WAIT_S
    while time.monotonic() < deadline:
        if _answers(state.api_url) or not state.is_alive():
            break
        time.sleep(0.5)
    if not state.is_alive():
        raise LocalServerError(
            f"the local Prefect server (pid {state.pid}) exited (see {home / LOG_NAME})"
        )
    if not _answers(state.api_url):
        raise LocalServerError(
            f"the local Prefect server (pid {state.pid}) does not answer at {state.url} "
            f"(see {home / LOG_NAME}; `tryon server stop` stops it)"
        )


# -------------------------------------------------------------------------------------- stop


def _terminate(state: ServerState, grace_s: float = _STOP_GRACE_S) -> bool:
    """Stop the server's process group: SIGTERM, then SIGKILL after ``grace_s``. True if it
    ended on SIGTERM."""
    if not state.is_alive():
        return True
    # The server leads its own session: its group is its own and holds nothing else.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not state.is_alive():
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(state.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while state.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    return False


def stop_server(home: Path | None = None) -> tuple[ServerState | None, bool]:
    """Stop ``home``'s local server. Returns the state it had (None if none was recorded or
    it was not running) and whether it stopped cleanly (on SIGTERM)."""
    home = prefect_home() if home is None else home
    if not home.is_dir():
        return None, True
    with _locked(home, timeout_s=_start_timeout_s() + _BUSY_WAIT_S + 30.0):
        state = read_state(home)
        _forget_state(home)
        if state is None or not state.is_alive():
            return None, True
        return state, _terminate(state)


# ---------------------------------------------------------------------------- the command side


def _drain_prefect_workers(timeout_s: float) -> None:
    """Deliver the logs and events still queued before the command exits."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout_s)


@contextlib.contextmanager
def prefect_api(say: Say = print) -> Iterator[PrefectApi]:
    """The Prefect API for a command's block: ``PREFECT_API_URL`` if set (nothing started);
    else the local server, started if needed, with Prefect pointed at it for the block."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_UI_URL,
        get_current_settings,
        temporary_settings,
    )

    settings = get_current_settings()
    if settings.api.url:
        yield PrefectApi(api_url=settings.api.url, ui_url=settings.ui_url, server=None)
        return

    server, _ = ensure_server(say=say)
    saved = {name: os.environ.get(name) for name in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    # The environment too: processes this run starts (a local Dask cluster) use it.
    os.environ["PREFECT_API_URL"] = server.api_url
    os.environ["PREFECT_UI_URL"] = server.url
    try:
        updates = {PREFECT_API_URL: server.api_url, PREFECT_UI_URL: server.url}
        with temporary_settings(updates=updates):
            try:
                yield PrefectApi(api_url=server.api_url, ui_url=server.url, server=server)
            finally:
                _drain_prefect_workers(timeout_s=5.0)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ----------------------------------------------------------------------------- the server side


def _serve(listening_fd: int) -> None:
    sock = socket.socket(fileno=listening_fd)
    import uvicorn
    from prefect.server.api.server import create_app

    config = uvicorn.Config(
        create_app(final=True),
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])


def _daemonize(pid_fd: int) -> None:
    """Leave the command: fork, report the child's pid and exit; the child leads a session."""
    child = os.fork()
    if child:
        os.write(pid_fd, f"{child}\n".encode())
        os._exit(0)
    os.close(pid_fd)
    os.setsid()


if __name__ == "__main__":
    _daemonize(int(sys.argv[2]))
    _serve(int(sys.argv[1]))
