"""A real Ray cluster of separate raylets on this machine, for tests/test_cluster.py and scripts/search_scaling.py.

`ray start --head` and `ray start --address` for each further node: each with `--num-cpus`, the cluster's own temp
dir, GCS and dashboard-agent ports and auth token (RAY_AUTH_TOKEN_PATH, so nothing is read from or written to
~/.ray), each in its own process session. `stop()` ends those sessions, then every process that was below them
(Ray's workers run in sessions of their own) or still names the temp dir, by PID. Ray registers every node under the host's address (it
resolves 127.0.0.1 to it); drivers join through 127.0.0.1:PORT with `env` (the token) in their environment.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process, None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else (fields[0], int(fields[1]))


def processes_naming(text: str) -> list[int]:
    """Live PIDs whose command line contains `text` (a cluster's temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace") and _stat(int(entry.name)):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def descendants(roots: list[int]) -> list[int]:
    """Live PIDs below `roots` (Ray's workers and agents rename themselves and leave the session, not the tree)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))):
            children.setdefault(st[1], []).append(int(entry.name))
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class LocalCluster:
    def __init__(self, nodes: int = 2, cpus: int = 1):
        self.nodes, self.cpus = nodes, cpus
        self.temp = tempfile.mkdtemp(prefix="es-ray-", dir="/tmp")  # short: Ray's unix sockets live under it
        token = Path(self.temp) / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def _start(self, name: str, args: list[str]) -> None:
        ray_cli = Path(sys.executable).with_name("ray")
        common = ["--block", "--temp-dir", self.temp, "--num-cpus", str(self.cpus),
                  "--object-store-memory", str(128 << 20), "--disable-usage-stats",
                  "--dashboard-agent-listen-port", str(free_port())]
        with open(Path(self.temp) / f"{name}.log", "w") as log:
            self.procs.append(subprocess.Popen([str(ray_cli), "start", *args, *common], env=self.env,
                                               start_new_session=True, stdout=log, stderr=subprocess.STDOUT))

    def start(self) -> LocalCluster:
        try:
            self._start("head", ["--head", "--port", str(self.port), "--include-dashboard=false"])
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError((Path(self.temp) / "head.log").read_text()[-2000:]) from None
                    time.sleep(0.5)
            for k in range(1, self.nodes):
                self._start(f"node{k}", ["--address", self.address])
            wait = ("import ray, time, sys; ray.init(address=sys.argv[1], log_to_driver=False); t = time.monotonic()\n"
                    "alive = lambda: sum(n['Alive'] for n in ray.nodes())\n"
                    "while alive() < int(sys.argv[2]) and time.monotonic() - t < 60: time.sleep(0.5)\n"
                    "print(alive())")
            out = subprocess.run([sys.executable, "-c", wait, self.address, str(self.nodes)], env=self.env,
                                 capture_output=True, text=True, timeout=120)
            if out.stdout.strip() != str(self.nodes):
                raise RuntimeError(f"{out.stdout.strip() or 0} of {self.nodes} nodes came up: {out.stderr[-2000:]}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        tree = descendants([p.pid for p in self.procs])  # before the raylets die and their children are orphaned
        for proc in self.procs:  # each `ray start --block` leads its own session: its daemons share its group
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3  # a graceful stop takes Ray longer than a test should wait
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        deadline = time.monotonic() + 20
        while (left := self._alive(tree)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        self.leftover = self._alive(tree)
        shutil.rmtree(self.temp, ignore_errors=True)

    def _alive(self, tree: list[int]) -> list[int]:
        return sorted({pid for pid in tree if _stat(pid)} | set(processes_naming(self.temp)))

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
