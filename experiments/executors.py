"""Executors: run a graph's nodes in dependency order, skipping those the cache already holds.

- ``LocalExecutor(jobs=1)`` runs inline in this process (progress bars); ``jobs > 1`` spawns worker processes
  with one torch thread each. On the 2-core CPU machine two 1-thread workers measured no faster than one
  2-thread process (README, Performance), so 1 is the default.
- ``SubmititExecutor`` submits each wave of ready nodes as one SLURM job array through submitit. A job is a
  ``submitit.helpers.Checkpointable``: on a time-out or preemption signal submitit requeues it, and the
  requeued job finds its training's last Lightning checkpoint in the cache's work folder and resumes there.

An interrupted run (SIGKILL, scancel, a crash) is resumed by running the same command again: finished nodes
are in the cache and are not redone.
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import submitit

from experiments.cache import ArtifactCache
from experiments.graph import Node, RunOptions
from experiments.nodes import run_node


def _worker_init() -> None:
    import torch

    os.environ["BADMERGING_JOB_WORKER"] = "1"
    torch.set_num_threads(1)


def _ready(pending: dict[str, Node], finished: set[str]) -> list[Node]:
    return [n for n in pending.values() if all(d in finished for d in n.deps)]


def release_memory() -> None:
    """Give a finished node's memory back: collect cycles (models held by Trainers and closures), then ask glibc to
    return freed heap pages to the OS, so nodes run one after another in one process do not pile up resident memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def _run_and_release(node: Node, nodes: dict[str, Node], options: RunOptions) -> str:
    try:
        return run_node(node, nodes, options)
    finally:
        release_memory()


class LocalExecutor:
    """Nodes in this process (``jobs=1``) or in ``jobs`` spawned workers, as soon as their inputs are done."""

    def __init__(self, jobs: int = 1):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"--jobs={jobs!r} must be a positive integer (1: in this process)")
        self.jobs = jobs

    def run(self, nodes: dict[str, Node], options: RunOptions) -> dict[str, str]:
        cache = ArtifactCache(options.artifacts)
        results = {nid: str(cache.path(n.key)) for nid, n in nodes.items() if cache.done(n.key)}
        for nid in results:
            print(f"[engine] {nid}: cached ({nodes[nid].key})", flush=True)
        pending = {nid: n for nid, n in nodes.items() if nid not in results}
        if self.jobs == 1:
            for node in list(pending.values()):  # nodes are in dependency order
                results[node.id] = _run_and_release(node, nodes, options)
            return results
        import multiprocessing

        pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
        running = {}
        try:
            while pending or running:
                for node in _ready(pending, set(results)):
                    if node.id not in running:
                        running[node.id] = pool.submit(_run_and_release, node, nodes, options)
                        del pending[node.id]
                done, _ = wait(list(running.values()), return_when=FIRST_COMPLETED)
                for nid in [nid for nid, f in running.items() if f in done]:
                    results[nid] = running.pop(nid).result()
        finally:
            pool.shutdown(cancel_futures=True)
        return results


class NodeJob(submitit.helpers.Checkpointable):
    """The callable a SLURM job runs. Checkpointable: on a time-out or preemption signal submitit resubmits it
    with the same arguments; the training's own Lightning checkpoints in the cache are the state it resumes from."""

    def __call__(self, node: Node, nodes: dict[str, Node], options: RunOptions) -> str:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            return run_node(node, nodes, options)
        except SIGTERMException:  # preemption sends SIGTERM first, then submitit's signal: wait to be requeued
            import time

            time.sleep(600)
            raise


class SubmititExecutor:
    """Waves of ready nodes, each one SLURM job array through submitit (``folder``: its logs and pickles)."""

    def __init__(self, folder: str | os.PathLike, partition: str | None = None, timeout_min: int = 240,
                 cpus_per_task: int = 2, gpus_per_node: int = 0, max_num_timeout: int = 3, slurm_args: dict | None = None,
                 on_submit=None):
        self.folder = Path(folder)
        self.params = {"timeout_min": timeout_min, "cpus_per_task": cpus_per_task, "nodes": 1, "tasks_per_node": 1}
        if gpus_per_node:
            self.params["gpus_per_node"] = gpus_per_node
        if partition:
            self.params["slurm_partition"] = partition
        self.slurm_args = dict(slurm_args or {})
        self.max_num_timeout = max_num_timeout
        self.on_submit = on_submit  # called with (wave, jobs): tests interrupt a job through it

    def run(self, nodes: dict[str, Node], options: RunOptions) -> dict[str, str]:
        cache = ArtifactCache(options.artifacts)
        executor = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster="slurm",
                                         slurm_max_num_timeout=self.max_num_timeout)
        executor.update_parameters(name="badmerging", slurm_additional_parameters=self.slurm_args, **self.params)
        results = {nid: str(cache.path(n.key)) for nid, n in nodes.items() if cache.done(n.key)}
        pending = {nid: n for nid, n in nodes.items() if nid not in results}
        wave = 0
        while pending:
            ready = _ready(pending, set(results))
            quiet = RunOptions(**{**options.__dict__, "progress": False})
            jobs = executor.map_array(NodeJob(), ready, [nodes] * len(ready), [quiet] * len(ready))
            print(f"[engine] wave {wave}: {len(jobs)} SLURM job(s) {jobs[0].job_id.split('_')[0]} "
                  f"({', '.join(n.id for n in ready)})", flush=True)
            if self.on_submit:
                self.on_submit(wave, jobs)
            for node, job in zip(ready, jobs):
                results[node.id] = job.result()  # raises the job's error, with its log path
                del pending[node.id]
            wave += 1
        return results
