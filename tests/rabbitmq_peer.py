"""A real RabbitMQ broker for tests (Debian ``rabbitmq-server``), private to the test.

Started on loopback on free ports (AMQP, Erlang distribution, its own ``epmd``),
with its database, logs, node name, cookie and plugins file under a tmp
folder, so it never meets a system broker or another test's.  Readiness is an
AMQP connection that opens, never a sleep.  ``restart()`` stops it (SIGTERM:
the broker's own orderly shutdown) and starts it again on the same ports and
database: durable queues and persistent messages survive.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.peers import free_port, port_open, wait_until

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def rabbitmq_available() -> bool:
    return RABBITMQ_SERVER.is_file()


@dataclass
class RabbitMQ:
    work: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    epmd_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    epmd: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def env(self) -> dict[str, str]:
        plugins = self.work / "enabled_plugins"
        plugins.write_text("[].\n")
        return {**os.environ, "HOME": str(self.work), "RABBITMQ_MNESIA_BASE": str(self.work / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.work / "log"), "RABBITMQ_NODENAME": f"segnode{self.port}@localhost",
                "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1", "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
                "RABBITMQ_PID_FILE": str(self.work / "rabbitmq.pid"),
                "RABBITMQ_CONFIG_FILES": str(self.work / "conf.d"), "RABBITMQ_ALLOW_INPUT": ""}

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        env = self.env()
        if self.epmd is None or self.epmd.poll() is not None:  # our own epmd, in the foreground: we hold its pid
            self.epmd = subprocess.Popen(["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"], env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            wait_until(lambda: port_open(self.epmd_port), 10, "epmd")
        with open(self.work / "rabbitmq.out", "ab") as log:
            self.proc = subprocess.Popen([str(RABBITMQ_SERVER)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_until(self._ready, 90, f"RabbitMQ on {self.port}", interval=0.2)

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"rabbitmq-server exited; see {self.work / 'rabbitmq.out'}")
        if not port_open(self.port):
            return False
        from kombu import Connection

        try:
            with Connection(self.url, connect_timeout=2) as conn:
                conn.connect()
                return True
        except Exception:  # noqa: BLE001 - not accepting AMQP yet
            return False

    def stop(self) -> None:
        """Orderly shutdown (SIGTERM to the broker's process group), then wait for it."""
        if self.proc is None:
            return
        _signal_group(self.proc, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc, signal.SIGKILL)
            self.proc.wait()
        wait_until(lambda: not port_open(self.port), 30, "RabbitMQ to close its port")
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        if self.proc is not None:
            _signal_group(self.proc, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        if self.epmd is not None:
            _signal_group(self.epmd, signal.SIGKILL)
            self.epmd.wait()


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # the process group we started (beam and its helpers), by its id
    except ProcessLookupError:
        pass


@contextmanager
def rabbitmq(work: Path) -> Iterator[RabbitMQ]:
    broker = RabbitMQ(work)
    try:
        broker.start()
        yield broker
    finally:
        broker.close()
