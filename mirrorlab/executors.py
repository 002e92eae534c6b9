"""Executors: run candidate evaluations in process, in worker processes, or as Ray actors.

All three share one interface, `Executor.map(jobs, on_result=None) -> list[Outcome]`, so the
search never knows which one runs it. An *evaluator* is a picklable object with `setup()` (heavy,
once per worker: load the base model) and `evaluate(job) -> dict` (one candidate); `run_job`
wraps a call with the failure policy (exception, NaN, timeout -> FAILED with the error).

Timeouts: `process` and `ray` really stop the work (the worker is killed and a fresh one started,
which reloads the model). `local` cannot kill its own thread: it passes a deadline that the
evaluator checks between inner steps (`check_deadline`), so a timeout stops the candidate at the
next step boundary, and a result that arrives late is still marked FAILED.
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing as mp
import os
import pickle
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from mirrorlab.records import FAILED, FINISHED, CandidateTimeout, Job, Outcome
from mirrorlab.registry import Registry
from mirrorlab.values import is_finite


class Evaluator(Protocol):
    """What executors run: `setup()` once per worker, then `evaluate(job)` per candidate."""

    def setup(self) -> None: ...

    def evaluate(self, job: Job) -> dict[str, Any]: ...


def run_job(evaluator: Evaluator, job: Job, worker: str = "local") -> Outcome:
    """Evaluate one job under the failure policy: exceptions, non-finite fitness and overruns fail."""
    start, started_at = time.monotonic(), time.time()
    if job.timeout_s is not None and job.deadline is None:
        job.deadline = start + job.timeout_s
    out = Outcome(job.generation, job.index, FAILED, worker=worker, label=job.role)
    try:
        res = evaluator.evaluate(job)
    except CandidateTimeout as e:
        out.error = f"timeout: {e}"
    except Exception as e:  # noqa: BLE001 - the failure policy records any error
        out.error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
    else:
        for k in ("fitness", "stderr", "metric", "mean_length", "n_eval", "reward_errors"):
            if k in res and res[k] is not None:
                setattr(out, k, int(res[k]) if k in ("n_eval", "reward_errors") else float(res[k]))
        out.curves = list(res.get("curves", []))
        out.scores = [float(x) for x in res.get("scores", [])]
        out.samples = dict(res.get("samples") or {})  # completion samples, for the candidate's run
        out.extra = dict(res.get("extra") or {})  # the probe's extra measurements
        out.timings = {k: float(v) for k, v in res.get("timings", {}).items()}
        elapsed = time.monotonic() - start
        if not is_finite(out.fitness):
            out.error = f"non-finite fitness: {out.fitness}"
        elif job.timeout_s is not None and elapsed > job.timeout_s:
            out.error = f"timeout: finished after {elapsed:.1f} s, limit {job.timeout_s} s"
        else:
            out.status = FINISHED
    out.timings["total_s"] = time.monotonic() - start
    out.started_at, out.ended_at = started_at, time.time()
    return out


def _timeout_outcome(job: Job, worker: str, elapsed: float) -> Outcome:
    return Outcome(
        job.generation, job.index, FAILED, label=job.role, worker=worker,
        error=f"timeout: killed worker after {elapsed:.1f} s (limit {job.timeout_s} s)",
        timings={"total_s": elapsed},
    )


ResultCallback = Callable[[Job, Outcome], None]


class Executor:
    """Runs jobs through an evaluator; subclasses decide where. Use as a context manager."""

    kind = "base"

    def __init__(self, evaluator: Evaluator, workers: int = 1) -> None:
        self.evaluator = evaluator
        self.workers = workers
        self.setup_s = 0.0  # wall time spent starting workers / loading models (overhead)

    def launch(self) -> None:
        """Begin starting workers without waiting (so model loading overlaps other set-up)."""

    def start(self) -> None:
        """Start workers and wait until they are ready (idempotent); `map` calls it when needed."""

    def map(self, jobs: Sequence[Job], on_result: ResultCallback | None = None) -> list[Outcome]:
        """Evaluate `jobs`, calling `on_result(job, outcome)` as each finishes; results in job order."""
        raise NotImplementedError

    def request_stop(self) -> None:
        """Tell idle workers to exit without waiting (so their teardown overlaps the caller's
        remaining work); `close` then only joins them. No more jobs may be mapped afterwards."""

    def close(self) -> None:
        """Stop workers and release resources (idempotent)."""

    def __enter__(self) -> Executor:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalExecutor(Executor):
    """In-process, one job at a time; timeouts are cooperative (see module docstring)."""

    kind = "local"

    def __init__(self, evaluator: Evaluator, workers: int = 1) -> None:
        super().__init__(evaluator, 1)
        self._ready = False

    def start(self) -> None:
        if not self._ready:
            t = time.monotonic()
            self.evaluator.setup()
            self.setup_s += time.monotonic() - t
            self._ready = True

    def map(self, jobs: Sequence[Job], on_result: ResultCallback | None = None) -> list[Outcome]:
        self.start()
        outs = []
        for job in jobs:
            out = run_job(self.evaluator, job, worker="local")
            if on_result is not None:
                on_result(job, out)
            outs.append(out)
        return outs


# --------------------------------------------------------------------------- one scheduler
@dataclass(frozen=True)
class _Finished:
    """A job's end as a worker pool reports it: its outcome, or the worker's death (`error`)."""

    slot: int
    outcome: Outcome | None
    error: str = ""
    worker: str = ""


class PoolExecutor(Executor):
    """Executors whose workers live apart (processes, Ray actors) share one scheduling loop:
    a pending queue, each worker taking a job as soon as its own set-up is done (no barrier on
    the slowest start-up), deadlines, and a dead or timed-out worker replaced while the others
    go on. A subclass supplies the worker side: which slots are idle, submitting a job to one,
    waiting for the next finished job (handling set-up completions itself), and replacing one."""

    slack_s = 0.05  # a job is declared timed out this long after its limit (clock and wake-up jitter)

    def _idle_slots(self) -> list[int]:
        """Slots whose worker is ready and has no job, in the order they should take work."""
        raise NotImplementedError

    def _submit(self, slot: int, job: Job, started: float) -> None:
        """Hand `job` to the worker in `slot` (started at monotonic time `started`)."""
        raise NotImplementedError

    def _wait_any(self, timeout: float | None) -> list[_Finished]:
        """Block until something happens or `timeout` passes; the jobs that finished meanwhile."""
        raise NotImplementedError

    def _replace(self, slot: int) -> None:
        """Stop the worker in `slot` for real and start its successor without waiting."""
        raise NotImplementedError

    def _worker_name(self, slot: int) -> str:
        """The worker's name in an outcome it could not report itself (a timeout)."""
        raise NotImplementedError

    def _map_start(self) -> None:
        """Called once at the start of `map`, after `launch`."""

    def map(self, jobs: Sequence[Job], on_result: ResultCallback | None = None) -> list[Outcome]:
        """Jobs go to each worker as soon as it is ready; a crashed or timed-out worker is
        replaced while the others go on."""
        self.launch()
        self._map_start()
        pending = deque(range(len(jobs)))
        results: dict[int, Outcome] = {}
        running: dict[int, tuple[int, float]] = {}  # slot -> (job index, start)

        def finish(i: int, out: Outcome) -> None:
            results[i] = out
            if on_result is not None:
                on_result(jobs[i], out)

        while len(results) < len(jobs):
            for slot in self._idle_slots():
                if not pending:
                    break
                i, t0 = pending.popleft(), time.monotonic()
                self._submit(slot, jobs[i], t0)
                running[slot] = (i, t0)
            deadlines = [t0 + jobs[i].timeout_s for i, t0 in running.values()
                         if jobs[i].timeout_s is not None]
            now = time.monotonic()
            wait_s = max(0.0, min(deadlines) - now) + self.slack_s if deadlines else None
            finished = self._wait_any(wait_s)
            if not running:  # nothing ran meanwhile: pure start-up wait (overhead)
                self.setup_s += time.monotonic() - now
            for f in finished:
                i, t0 = running.pop(f.slot)
                out = f.outcome
                if out is None:  # the worker died (segfault, OOM kill, ...)
                    job = jobs[i]
                    out = Outcome(job.generation, job.index, FAILED, label=job.role, worker=f.worker,
                                  error=f.error, timings={"total_s": time.monotonic() - t0})
                    self._replace(f.slot)
                finish(i, out)
            now = time.monotonic()
            for slot, (i, t0) in list(running.items()):
                job = jobs[i]
                if job.timeout_s is not None and now - t0 > job.timeout_s + self.slack_s:
                    running.pop(slot)
                    name = self._worker_name(slot)
                    self._replace(slot)  # really stops the work; the successor reloads the model
                    finish(i, _timeout_outcome(job, name, now - t0))
        return [results[i] for i in range(len(jobs))]


# --------------------------------------------------------------------------- process
def _pin_threads(threads: int) -> None:
    """One worker's torch intra- and inter-op threads (workers x threads <= cores: no oversubscription)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already fixed in this process (parallel work ran before)
        pass


def _exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Exit this worker as soon as the process that spawned it is gone (it was re-parented), not
    after its current job: a killed search or compare leaves no orphan training on for minutes."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="mirrorlab-parent-watch", daemon=True).start()


def _process_worker(conn: Connection, payload: bytes, env: dict[str, str], threads: int,
                    parent_pid: int) -> None:
    """Worker main: pin env, build the evaluator once, then evaluate jobs until told to stop (or
    until the parent dies, `_exit_with_parent`)."""
    _exit_with_parent(parent_pid)
    os.environ.update(env)
    _pin_threads(threads)
    name = f"process-{os.getpid()}"
    try:
        evaluator = pickle.loads(payload)
        t = time.monotonic()
        evaluator.setup()
        conn.send(("ready", time.monotonic() - t))
    except BaseException as e:  # noqa: BLE001 - report setup failure to the parent
        conn.send(("setup_error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"))
        return
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # parent gone (e.g. killed): exit quietly
            return
        if job is None:
            return
        out = run_job(evaluator, job, worker=name)
        try:
            conn.send(("result", out))
        except (BrokenPipeError, OSError):
            return


@dataclass
class _Worker:
    slot: int
    proc: Any
    conn: Connection
    ready: bool = False
    job: Job | None = None
    started: float = 0.0
    stopping: bool = False


def _visible_gpus() -> list[str]:
    """GPU ids this process may use (CUDA_VISIBLE_DEVICES or all), without initialising CUDA here."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        return []


class ProcessExecutor(PoolExecutor):
    """One long-lived spawned worker per slot (per GPU on GPU machines); kills and restarts on timeout."""

    kind = "process"

    def __init__(self, evaluator: Evaluator, workers: int = 1, threads_per_worker: int = 1) -> None:
        super().__init__(evaluator, workers)
        self.threads = max(1, int(threads_per_worker))
        self._ctx = mp.get_context("spawn")
        self._payload = pickle.dumps(evaluator)
        self._workers: dict[int, _Worker] = {}
        self._gpus = _visible_gpus()
        self.restarts = 0

    def _env(self, slot: int) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if self._gpus:
            env["CUDA_VISIBLE_DEVICES"] = self._gpus[slot % len(self._gpus)]
        return env

    def _spawn(self, slot: int) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        env = self._env(slot)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # spawned children inherit it before anything imports torch
        try:
            proc = self._ctx.Process(
                target=_process_worker, args=(child, self._payload, env, self.threads, os.getpid()),
                name=f"mirrorlab-worker-{slot}", daemon=True,
            )
            proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        w = _Worker(slot, proc, parent)
        self._workers[slot] = w
        return w

    def _take_ready(self, w: _Worker) -> None:
        """Read a starting worker's first message: `ready`, or a set-up failure (raised)."""
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            w.proc.join(5)
            code = w.proc.exitcode
            self._kill(w)
            raise RuntimeError(f"worker {w.slot} died during setup (exit code {code})") from None
        if msg[0] == "setup_error":
            self._kill(w)
            raise RuntimeError(f"worker {w.slot} failed to set up the evaluator:\n{msg[1]}")
        w.ready = True

    def launch(self) -> None:
        t = time.monotonic()
        for s in range(self.workers):
            if s not in self._workers:
                self._spawn(s)
        self.setup_s += time.monotonic() - t

    def start(self) -> None:
        self.launch()
        for w in list(self._workers.values()):
            if not w.ready:
                t = time.monotonic()
                self._take_ready(w)
                self.setup_s += time.monotonic() - t

    def _kill(self, w: _Worker) -> None:
        try:
            if w.proc.is_alive():
                w.proc.kill()
            w.proc.join(10)
        finally:
            w.conn.close()
            self._workers.pop(w.slot, None)

    def _replace(self, slot: int) -> None:
        """Kill the worker in `slot` and spawn its successor without waiting: the others keep
        working meanwhile."""
        self._kill(self._workers[slot])
        self.restarts += 1
        self._spawn(slot)

    def _idle_slots(self) -> list[int]:
        return [w.slot for w in list(self._workers.values()) if w.ready and w.job is None]

    def _submit(self, slot: int, job: Job, started: float) -> None:
        w = self._workers[slot]
        w.started = started
        job.deadline = None if job.timeout_s is None else started + job.timeout_s
        w.job = job
        w.conn.send(job)

    def _worker_name(self, slot: int) -> str:
        return f"process-{self._workers[slot].proc.pid}"

    def _wait_any(self, timeout: float | None) -> list[_Finished]:
        busy = [w for w in self._workers.values() if w.job is not None]
        starting = [w for w in self._workers.values() if not w.ready]
        by_conn = {w.conn: w for w in busy + starting}
        finished = []
        for c in wait(list(by_conn), timeout=timeout):
            w = by_conn[c]
            if not w.ready:
                self._take_ready(w)
                continue
            try:
                _kind, out = c.recv()
            except (EOFError, OSError):  # the worker crashed
                w.proc.join(5)
                finished.append(_Finished(w.slot, None, f"worker died (exit code {w.proc.exitcode})",
                                          f"process-{w.proc.pid}"))
            else:
                w.job = None
                finished.append(_Finished(w.slot, out))
        return finished

    def request_stop(self) -> None:
        for w in self._workers.values():
            if w.job is None and not w.stopping:
                try:
                    w.conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
                w.stopping = True

    def close(self) -> None:
        self.request_stop()  # all workers exit in parallel, then each is joined
        for w in list(self._workers.values()):
            try:
                if w.stopping:
                    w.proc.join(10)
            except (BrokenPipeError, OSError):
                pass
            self._kill(w)


# --------------------------------------------------------------------------- ray
class _RayWorkerImpl:
    """Body of the Ray actor: holds one evaluator, set up once."""

    def __init__(self, payload: bytes, threads: int) -> None:
        _pin_threads(threads)
        self.evaluator = pickle.loads(payload)
        self.name = f"ray-{os.getpid()}"

    def setup(self) -> float:
        t = time.monotonic()
        self.evaluator.setup()
        return time.monotonic() - t

    def evaluate(self, job: Job) -> Outcome:
        return run_job(self.evaluator, job, worker=self.name)


def _token_auth_if_available() -> None:
    """Turn on Ray's token authentication when a token is at hand and RAY_AUTH_MODE is unset.

    Ray >= 2.52 starts clusters with token auth on, but a driver enables it by itself only for
    `address="auto"`; an explicit `HOST:PORT` then fails with InvalidAuthToken. Presenting a token
    to a cluster without auth is harmless (checked against Ray 2.60), so do what `auto` does.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token auth
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


class RayExecutor(PoolExecutor):
    """Ray actors with CPU/GPU resources; joins `address` or starts a local Ray instance.

    Like the process executor, each actor takes candidates as soon as its own set-up is done
    (nodes of a cluster come up at different times), and a replaced actor sets up while the
    others go on."""

    kind = "ray"

    def __init__(
        self, evaluator: Evaluator, workers: int = 1, address: str | None = None,
        cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, num_cpus: int | None = None,
    ) -> None:
        super().__init__(evaluator, workers)
        self.address = address
        self.cpus = cpus_per_worker
        self.gpus = gpus_per_worker
        self.num_cpus = num_cpus
        self._payload = pickle.dumps(evaluator)
        self._actors: list[Any] = []
        self._setting_up: dict[Any, int] = {}  # setup() ref -> slot, for actors not ready yet
        self._ready: set[int] = set()
        self._running: dict[Any, int] = {}  # evaluate() ref -> slot
        self._free: deque[int] = deque()  # ready slots without a job, in the order they freed up
        self._ray_connected = False
        self._cls: Any = None
        self.restarts = 0

    def _new_actor(self, slot: int) -> Any:
        actor = self._cls.remote(self._payload, max(1, int(self.cpus)))
        self._setting_up[actor.setup.remote()] = slot
        return actor

    def launch(self) -> None:
        if self._actors:
            return
        import ray

        t = time.monotonic()
        if not ray.is_initialized():
            if self.address:  # join a running cluster; close() disconnects and leaves it up
                _token_auth_if_available()
                ray.init(address=self.address, log_to_driver=False)
            else:
                # local instance: workers import mirrorlab (and user evaluators) from our sys.path
                saved = os.environ.get("PYTHONPATH")
                os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
                try:
                    ray.init(
                        num_cpus=self.num_cpus or max(1, int(math.ceil(self.workers * self.cpus))),
                        num_gpus=None if self.gpus > 0 else 0,
                        include_dashboard=False, log_to_driver=False,
                    )
                finally:
                    if saved is None:
                        os.environ.pop("PYTHONPATH", None)
                    else:
                        os.environ["PYTHONPATH"] = saved
            self._ray_connected = True  # we connected this driver, so close() disconnects it
        self._cls = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus)(_RayWorkerImpl)
        self._actors = [self._new_actor(s) for s in range(self.workers)]
        self.setup_s += time.monotonic() - t

    def _take_ready(self, ref: Any) -> int:
        """The slot whose set-up `ref` finished; a set-up failure is raised (it would fail every job)."""
        import ray

        slot = self._setting_up.pop(ref)
        try:
            ray.get(ref)
        except Exception as e:  # noqa: BLE001 - evaluator.setup raised, or the actor died
            cause = getattr(e, "cause", None) or e  # RayTaskError wraps the evaluator's exception
            raise RuntimeError(
                f"ray worker {slot} failed to set up the evaluator: {type(cause).__name__}: {cause}"
            ) from e
        self._ready.add(slot)
        return slot

    def start(self) -> None:
        self.launch()
        t = time.monotonic()
        for ref in list(self._setting_up):
            self._take_ready(ref)
        self.setup_s += time.monotonic() - t

    slack_s = 0.1

    def _replace(self, slot: int) -> None:
        import ray

        ray.kill(self._actors[slot], no_restart=True)
        self._ready.discard(slot)
        self._running = {ref: s for ref, s in self._running.items() if s != slot}
        self.restarts += 1
        self._actors[slot] = self._new_actor(slot)

    def _map_start(self) -> None:
        self._free = deque(sorted(self._ready))

    def _idle_slots(self) -> list[int]:
        return list(self._free)

    def _submit(self, slot: int, job: Job, started: float) -> None:
        self._free.remove(slot)
        job.deadline = None  # the actor sets its own from timeout_s (clocks differ)
        self._running[self._actors[slot].evaluate.remote(job)] = slot

    def _worker_name(self, slot: int) -> str:
        return "ray"

    def _wait_any(self, timeout: float | None) -> list[_Finished]:
        import ray

        done, _ = ray.wait(list(self._running) + list(self._setting_up), num_returns=1, timeout=timeout)
        finished = []
        for ref in done:
            if ref in self._setting_up:
                self._free.append(self._take_ready(ref))
                continue
            slot = self._running.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the actor died
                finished.append(_Finished(slot, None, f"ray worker failed: {type(e).__name__}: {e}", "ray"))
            else:
                self._free.append(slot)
                finished.append(_Finished(slot, out))
        return finished

    def close(self) -> None:
        if not self._actors and not self._ray_connected:
            return
        import ray

        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self._actors, self._setting_up, self._ready, self._running = [], {}, set(), {}
        if self._ray_connected:  # stops a local instance; only disconnects from a joined cluster
            ray.shutdown()
            self._ray_connected = False


executors: Registry[Executor] = Registry("executor")


@executors.register("local")
def _local(evaluator: Evaluator, workers: int = 1, **settings: Any) -> Executor:
    """In the search process, one job at a time (`workers` is ignored)."""
    return LocalExecutor(evaluator)


@executors.register("process")
def _process(evaluator: Evaluator, workers: int = 1, cpus_per_worker: float = 1.0,
             **settings: Any) -> Executor:
    """`workers` spawned worker processes with `cpus_per_worker` threads each."""
    return ProcessExecutor(evaluator, workers, threads_per_worker=int(cpus_per_worker))


@executors.register("ray")
def _ray(evaluator: Evaluator, workers: int = 1, ray_address: str | None = None, cpus_per_worker: float = 1.0,
         gpus_per_worker: float = 0.0, num_cpus: int | None = None, **settings: Any) -> Executor:
    """`workers` Ray actors (a local instance, or the cluster at `ray_address`)."""
    if importlib.util.find_spec("ray") is None:
        raise ModuleNotFoundError("search.executor.kind=ray needs the ray extra: pip install -e '.[ray]' "
                                  "(or pip install 'ray[default]==2.60.0')")
    return RayExecutor(evaluator, workers, address=ray_address, cpus_per_worker=cpus_per_worker,
                       gpus_per_worker=gpus_per_worker, num_cpus=num_cpus)


def make_executor(kind: str, evaluator: Evaluator, workers: int = 1, **settings: Any) -> Executor:
    """Build the executor registered as `kind`. A factory takes `(evaluator, workers=, **settings)`
    with the `search.executor` fields as settings (`ray_address`, `cpus_per_worker`, ...); it
    ignores the ones it does not use."""
    return executors.factory(kind)(evaluator, workers=workers, **settings)
