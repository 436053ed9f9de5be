"""Where a sweep's tasks run: a local process pool (default) or a Ray cluster. Both take a batch of
(function, args, resources) and return the results in order; scheduling is theirs (the pool's queue,
Ray's scheduler with the declared num_cpus and custom resources), not ours."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable

from edgekit.errors import InputError, MissingDependencyError


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def device_resource(device: str) -> str:
    """Ray custom resource that serializes measurements on one device (one unit exists per device)."""
    return "edgekit_device_" + "".join(c if c.isalnum() else "_" for c in device)


class LocalExecutor:
    name = "local"

    def __init__(self, workers: int):
        self.workers = max(1, workers)

    def map(self, calls: list[tuple[Callable, tuple, dict]], on_done=lambda i, r: None) -> list[Any]:
        """Run ``calls`` (fn, args, resources); resources with ``exclusive`` run one at a time in this process's
        pool of one (device measurements: nothing else may share the device while it is timed)."""
        out: list[Any] = [None] * len(calls)
        exclusive = any(res.get("exclusive") for _, _, res in calls)
        import multiprocessing as mp

        # spawn: torch and llama.cpp hold threads that a fork would copy in an unknown state
        with ProcessPoolExecutor(1 if exclusive else self.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(fn, *args): i for i, (fn, args, _) in enumerate(calls)}
            for f in as_completed(futures):
                i = futures[f]
                out[i] = f.result()
                on_done(i, out[i])
        return out

    def close(self) -> None:
        pass


class RayExecutor:
    name = "ray"

    def __init__(self, address: str, devices: list[str], workers: int):
        try:
            import ray
        except ImportError:
            raise MissingDependencyError("--ray needs Ray", "pip install 'edgekit-ml[sweep]'") from None
        self.ray = ray
        self.started = False
        if address == "auto-local" or (address == "auto" and not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")):
            # a cluster of this machine, started here: one unit of each device's resource
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                     resources={device_resource(d): 1 for d in devices})
            self.started = True
        else:
            try:
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise InputError(f"cannot connect to the Ray cluster at {address} ({exc})",
                                 "start one with `ray start --head`, or pass --ray auto for a local one") from None
            have = ray.cluster_resources()
            missing = [device_resource(d) for d in devices if device_resource(d) not in have]
            if missing:
                raise InputError(f"the Ray cluster declares no {', '.join(missing)} resource",
                                 "start the node that may measure each device with `ray start --resources "
                                 f"'{{\"{missing[0]}\": 1}}'`")

    def map(self, calls: list[tuple[Callable, tuple, dict]], on_done=lambda i, r: None) -> list[Any]:
        ray = self.ray
        refs = []
        for fn, args, res in calls:
            opts: dict[str, Any] = {"num_cpus": res.get("num_cpus", 1), "num_gpus": res.get("num_gpus", 0),
                                    "max_retries": 0}
            if res.get("device"):
                opts["resources"] = {device_resource(res["device"]): 1}
            refs.append(ray.remote(fn).options(**opts).remote(*args))
        index = {r: i for i, r in enumerate(refs)}
        out: list[Any] = [None] * len(calls)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for r in done:
                out[index[r]] = ray.get(r)
                on_done(index[r], out[index[r]])
        return out

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
