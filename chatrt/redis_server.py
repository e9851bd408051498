"""A private redis-server on a free loopback port in a temporary folder, for tests and the bench: started, killed,
paused and restarted as a real Redis is. Not used by the runtime itself."""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from chatrt.errors import StoreUnavailable


class RedisServer:
    """A private redis-server on a free loopback port in a temporary folder (tests, bench). It can be killed
    and started again on the same port, empty, as a real Redis restart after a crash would be."""

    def __init__(self, *args: str, binary: str = "redis-server") -> None:
        path = shutil.which(binary)
        if path is None:
            raise StoreUnavailable("redis-server is not installed; install the redis-server package (see the README)")
        self.folder = Path(tempfile.mkdtemp(prefix="chatrt-redis-"))
        self.port = _free_port(cluster="--cluster-enabled" in args)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = [path, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                     "--save", "", "--appendonly", "no", *args]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        logfile = self.folder / "log"
        with logfile.open("a") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url)
        try:
            for _ in range(400):
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self.proc.poll() is not None:
                        raise StoreUnavailable(f"redis-server exited: {logfile.read_text()}") from None
                    time.sleep(0.025)
            raise StoreUnavailable(f"redis-server did not answer within 10 s: {logfile.read_text()}")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, nothing saved."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server stops answering but keeps its connections and data, as a stalled Redis does."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server would never act on SIGTERM
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.folder, ignore_errors=True)


def _free_port(*, cluster: bool) -> int:
    """A free loopback port; for a cluster node one whose bus port (10,000 higher) is free too."""
    if not cluster:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise StoreUnavailable("no free pair of loopback ports for a Redis Cluster node")


@contextlib.contextmanager
def redis_server(*args: str) -> Iterator[str]:
    """A private redis-server for the duration of the block; yields its URL."""
    server = RedisServer(*args).start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def redis_cluster(masters: int = 3) -> Iterator[str]:
    """A private Redis Cluster of `masters` redis-servers on loopback ports, joined by `redis-cli --cluster
    create` (no replicas); yields the URL of its first node (a cluster client finds the others from it)."""
    servers = [RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                           "--cluster-node-timeout", "2000") for _ in range(masters)]  # fmt: skip
    try:
        for server in servers:
            server.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise StoreUnavailable("redis-cli is not installed; install the redis-tools package (see the README)")
        nodes = [f"127.0.0.1:{s.port}" for s in servers]
        subprocess.run([cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        client = redis.Redis(port=servers[0].port)
        try:
            deadline = time.monotonic() + 30
            while client.cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise StoreUnavailable("the Redis Cluster did not become ready within 30 s")
                time.sleep(0.1)
        finally:
            client.close()
        yield f"redis://127.0.0.1:{servers[0].port}/0"
    finally:
        for server in servers:
            server.stop()
