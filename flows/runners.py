"""The flow's task runner, chosen by configuration (environment, deployment job variables).

``TRYON_TASK_RUNNER``: ``default`` (chunks run on the flow's event loop, sharing its HTTP
pools and limiter: the fast path) or ``dask`` (chunks are submitted to prefect-dask's
``DaskTaskRunner``). For Dask, ``TRYON_DASK_ADDRESS`` names a running scheduler
(``tcp://host:8786``); without it a ``distributed.LocalCluster`` is started for the run with
``TRYON_DASK_WORKERS`` worker processes (default 2) of one thread each.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

TASK_RUNNER_ENV = "TRYON_TASK_RUNNER"
DASK_ADDRESS_ENV = "TRYON_DASK_ADDRESS"
DASK_WORKERS_ENV = "TRYON_DASK_WORKERS"


def dask_task_runner(*, address: str | None = None, workers: int = 2) -> TaskRunner[Any]:
    """A ``DaskTaskRunner`` on ``address``, or on a local cluster of ``workers`` processes."""
    from prefect_dask import DaskTaskRunner  # imported here: dask is slow to import

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,  # no web UI port to collide with
        }
    )


def task_runner_from_env(environ: Mapping[str, str] | None = None) -> TaskRunner[Any]:
    env = os.environ if environ is None else environ
    kind = env.get(TASK_RUNNER_ENV, "default").strip().lower() or "default"
    if kind == "default":
        return ThreadPoolTaskRunner()
    if kind == "dask":
        raw_workers = env.get(DASK_WORKERS_ENV, "2")
        try:
            workers = int(raw_workers)
        except ValueError:
            raise ValueError(f"{DASK_WORKERS_ENV}={raw_workers!r}: expected a number") from None
        if workers < 1:
            raise ValueError(f"{DASK_WORKERS_ENV}={raw_workers!r}: expected at least 1")
        return dask_task_runner(address=env.get(DASK_ADDRESS_ENV) or None, workers=workers)
    raise ValueError(f"{TASK_RUNNER_ENV}={kind!r}: expected 'default' or 'dask'")


def dask_worker_threads(runner: object) -> int | None:
    """Worker threads of the flow's Dask cluster; ``None`` when the runner is not Dask."""
    import sys

    module = sys.modules.get("prefect_dask.task_runners")
    if module is None or not isinstance(runner, module.DaskTaskRunner):
        return None
    return max(1, sum(runner.client.nthreads().values()))
