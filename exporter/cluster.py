"""Ray (the only module importing it, lazily): join or start a cluster, score search candidates on actors, run
sweep items as tasks. Nothing here runs without `--ray`; local search and sweeps never import ray.

Workers import the driver's own exporter package: it travels with the job as a `py_modules` runtime
environment (uploaded once per content hash), and every actor and task reports a fingerprint of the package's
sources that the driver checks against its own, so a cluster image with another export-skip installed cannot
answer in its place. Files are not moved through Ray: sweep items write under a folder every node must see
(a shared filesystem), and the driver re-hashes them (exporter/commands/sweep.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import UserError
from exporter.files import files_digest

PACKAGE = Path(__file__).resolve().parent
ENV_PREFIXES = ("EXPORT_SKIP_",)  # driver settings forwarded to workers (caches, data folder)
TASK_RETRIES = 2  # a worker lost mid-item (killed, node gone) reruns the item up to this many times
ACTOR_RESTARTS = 2  # a search actor lost mid-step is restarted (reloads the model) and its share rerun


def package_fingerprint() -> str:
    """sha256 (16 hex) of every exporter/*.py source, by relative path: the same code hashes the same anywhere."""
    sources = {path.relative_to(PACKAGE).as_posix(): path for path in PACKAGE.rglob("*.py")}
    return files_digest(dict(sorted(sources.items())), length=16)


def where_am_i() -> dict:
    """What a worker reports about itself: the exporter it imported, its code fingerprint, host, pid and Ray node."""
    import socket
    import sys

    ray = sys.modules.get("ray")  # only where ray is already loaded (a Ray worker); never imported here
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    return {"exporter": str(PACKAGE), "code": package_fingerprint(), "host": socket.gethostname(), "pid": os.getpid(),
            "node": node}


def check_code(reported: dict) -> None:
    """Refuse a worker whose exporter sources differ from the driver's."""
    if reported.get("code") != package_fingerprint():
        raise UserError(f"a Ray worker on {reported.get('host')} imported exporter from {reported.get('exporter')} "
                        f"(code {reported.get('code')}), not the driver's (code {package_fingerprint()}); "
                        "the job's py_modules runtime environment did not take effect")


def runtime_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    return {"py_modules": [str(PACKAGE)], "env_vars": env}


def connect(address: str) -> str:
    """Join the cluster at `address` ("host:port", "ray://host:10001"), or `auto`: the cluster this machine
    runs (RAY_ADDRESS or the latest `ray start`), else a new local instance; `local`: always a new local
    instance. Returns a one-line description of the cluster."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install -e '.[ray]'") from None
    if ray.is_initialized():
        return describe_cluster()
    target = None if address in ("", "auto") else address
    if target not in (None, "local") and "://" not in target:
        _check_reachable(target)
    kwargs = {"include_dashboard": False} if target in (None, "local") else {}
    try:
        ray.init(address=target, runtime_env=runtime_env(), log_to_driver=False, configure_logging=False,
                 **kwargs)
    except ConnectionError as exc:  # the cause says why (no GCS there, or "Authentication token is missing")
        why = _one_line(exc.__cause__) if exc.__cause__ is not None else _one_line(exc)
        raise UserError(f"--ray {address}: cannot join the cluster: {why}") from None
    return describe_cluster()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A GCS address nobody listens at fails in seconds, not after Ray's minutes of retries."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray {address}: expected HOST:PORT (the head's GCS port), ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host, int(port)), timeout).close()
    except OSError as exc:
        raise UserError(f"--ray {address}: nothing answers there ({exc.strerror or exc}); is the head started "
                        "(`ray start --head --port PORT`)?") from None


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def describe_cluster() -> str:
    nodes = alive_nodes()
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    return f"{len(nodes)} node(s), {cpus:g} CPU(s)" + (f", {gpus:g} GPU(s)" if gpus else "")


def alive_nodes() -> list[dict]:
    """Each alive node's total resources ({"CPU": 1.0, "memory": bytes, ...})."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


@dataclass(frozen=True)
class Resources:
    """What one actor or task declares, so that a node never takes more than it can hold."""

    num_cpus: float = 1
    memory: int = 0  # bytes
    num_gpus: float = 0

    def options(self) -> dict:
        out = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory:
            out["memory"] = int(self.memory)
        return out

    def unfit(self) -> str | None:
        """Why no alive node can ever run this (a task that fits nowhere would wait forever), or None."""
        nodes = alive_nodes()
        for key, need in (("CPU", self.num_cpus), ("memory", self.memory), ("GPU", self.num_gpus)):
            best = max((n.get(key, 0) for n in nodes), default=0)
            if need and need > best:
                unit = (lambda v: f"{v / 2**30:.1f} GiB") if key == "memory" else (lambda v: f"{v:g}")
                return f"needs {unit(need)} {key} on one node; the largest node offers {unit(best)}"
        return None


def memory_estimate(parameters: int, bytes_per_parameter: int) -> int:
    """A job's memory: the weights it keeps, three times over (the loaded model, the exported graph's
    tensors while torch.onnx writes them, an ONNX Runtime session), plus 512 MiB for the interpreter,
    torch and activations. A rough bound, not a measurement."""
    return 3 * parameters * bytes_per_parameter + (512 << 20)


# ---------------------------------------------------------------- search: candidates scored on actors

def _balanced_shares(pool: list, parts: int, num_layers: int) -> list[list]:
    """Split candidates so that each share costs about the same: scoring a candidate at layer i reruns the
    layers from i up, so low layers cost more (longest first, each to the lightest share)."""
    shares: list[list] = [[] for _ in range(parts)]
    load = [0] * parts
    for cand in sorted(pool, key=lambda c: (c[1], c[0])):
        k = min(range(parts), key=lambda j: (load[j], j))
        shares[k].append(cand)
        load[k] += num_layers - cand[1] + 1
    return [s for s in shares if s]


class RayCalibrator:
    """The calibrator interface (`trials`, `measure`, `check`, `importance`, `evaluations`) over `count` Ray actors
    of `worker_cls` (exporter.quality.calibration.CalibrationWorker): each loads the model once and keeps its calibrator (and
    the base mask's residual stream, or the branched LAMBADA pass) for its share of each step's candidates.
    The driver only merges the metrics; the pick stays in exporter.quality.search.greedy."""

    def __init__(self, worker_cls, args: tuple, count: int, resources: Resources, num_layers: int):
        import ray

        self.num_layers = num_layers
        why = resources.unfit()
        if why:
            raise UserError(f"a search worker {why}")
        actor = ray.remote(worker_cls).options(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS,
                                               **resources.options())
        self.actors = [actor.remote(*args) for _ in range(count)]
        reports = _get([a.where.remote() for a in self.actors], "starting the search workers")
        for report in reports:
            check_code(report)
        self.nodes = len({r["node"] for r in reports})
        self.counts = [0] * count
        self.running = 0

    @property
    def evaluations(self) -> int:
        return sum(self.counts)

    def status(self) -> str:
        return f"{self.running} running on {len(self.actors)} Ray worker(s), {self.nodes} node(s)"

    def trials(self, chosen: list, pool: list, advance=None) -> dict:
        import ray

        shares = _balanced_shares(pool, len(self.actors), self.num_layers)
        pending = {self.actors[k].trials.remote(chosen, share): (k, share) for k, share in enumerate(shares)}
        self.running = len(pool)
        if advance:
            advance(0)
        out: dict = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            k, share = pending.pop(done[0])
            metrics, self.counts[k] = _get(done, f"scoring {len(share)} candidates")[0]
            out.update(metrics)
            self.running -= len(share)
            if advance:
                advance(len(share))
        return out

    def measure(self, mask) -> dict:
        metrics, self.counts[0] = _get([self.actors[0].measure.remote(mask)], "measuring a mask")[0]
        return metrics

    def check(self, mask) -> dict:
        """The lazy constraint checks (LAMBADA, chat answers) of one mask, on the first worker."""
        metrics, self.counts[0] = _get([self.actors[0].check.remote(mask)], "checking a mask")[0]
        return metrics

    def importance(self):
        return _get([self.actors[0].importance.remote()], "measuring importance")[0]

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def _get(refs: list, what: str) -> list:
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:  # the worker's own exception: raise it as the driver's
        cause = exc.as_instanceof_cause()
        if isinstance(cause, UserError):
            raise UserError(str(cause).splitlines()[0]) from None
        raise
    except ray.exceptions.RayError as exc:
        raise UserError(f"Ray lost a worker while {what}: {_one_line(exc)}") from None


# ---------------------------------------------------------------- sweep: items as tasks

@dataclass
class Job:
    name: str
    args: tuple
    resources: Resources


def run_tasks(fn, jobs: list[Job], on_done, on_submit=None) -> None:
    """Run `fn(*job.args)` for every job as a Ray task with its declared resources; a worker lost mid-task
    is retried (TASK_RETRIES), an exception inside `fn` is not (fn returns its own error records). Calls
    `on_done(job, result)` as each finishes, in completion order; a job that can never be placed, or whose
    retries ran out, finishes with {"error": one line}."""
    import ray

    remote = ray.remote(fn)
    pending = {}
    for job in jobs:
        why = job.resources.unfit()
        if why:
            on_done(job, {"error": f"not run: the item {why}"})
            continue
        ref = remote.options(max_retries=TASK_RETRIES, retry_exceptions=False, name=f"export-skip {job.name}",
                             **job.resources.options()).remote(*job.args)
        pending[ref] = job
        if on_submit:
            on_submit(job)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayError as exc:
            result = {"error": f"lost on Ray after {TASK_RETRIES} retries: {_one_line(exc)}"}
        on_done(job, result)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
