"""Inference speed of OpenVINO models: throughput with the THROUGHPUT hint and an asynchronous queue, latency
of batch-1 requests with the LATENCY hint. Shared by tools/benchmark_deploy.py and compress.py's report."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import openvino as ov

from .errors import UserError

LATENCY_WARMUP = 5


def timed_calls(step: Callable[[], object], seconds: float, warmup: int = LATENCY_WARMUP) -> list[float]:
    """Durations (s) of back-to-back calls of `step` for `seconds`, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    durations: list[float] = []
    end = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        step()
        stop = time.perf_counter()
        durations.append(stop - start)
        if stop >= end:
            return durations


def latency_ms(durations: list[float]) -> tuple[float, float]:
    """Median and 90th percentile in milliseconds."""
    median, p90 = np.percentile(np.asarray(durations) * 1000.0, [50, 90])
    return float(median), float(p90)


def random_images(shape: tuple[int, ...]) -> np.ndarray:
    """Random 0..255 float images: deployment input range, content irrelevant to speed."""
    return np.random.default_rng(0).uniform(0.0, 255.0, size=shape).astype(np.float32)


def ov_compile(core: ov.Core, path: Path, device: str, hint: str) -> ov.CompiledModel:
    """Compile with a performance hint; an OpenVINO failure becomes one readable error."""
    try:
        return core.compile_model(core.read_model(str(path)), device, {"PERFORMANCE_HINT": hint})
    except RuntimeError as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UserError(f"OpenVINO cannot compile {path} for {device}: {first}") from None


def ov_input(compiled: ov.CompiledModel, size: tuple[int, int]) -> ov.Tensor:
    """A batch-1 input of the compiled model's shape; dynamic dimensions become (1, 3, H, W)."""
    fallback = (1, 3, *size)
    shape = compiled.input(0).get_partial_shape()
    dims = tuple(d.get_length() if d.is_static else fallback[i] for i, d in enumerate(shape))
    return ov.Tensor(random_images(dims))


def ov_throughput(core: ov.Core, path: Path, device: str, size: tuple[int, int],
                  seconds: float) -> tuple[float, str]:
    """Images/s with the throughput hint: the queue of optimal size kept full for `seconds`."""
    compiled = ov_compile(core, path, device, "THROUGHPUT")
    jobs = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    queue = ov.AsyncInferQueue(compiled, jobs)
    for request in queue:
        request.set_input_tensor(ov_input(compiled, size))
    for _ in range(jobs):  # warm-up: every request once
        queue.start_async()
    queue.wait_all()
    images = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        queue.start_async()  # blocks until a request is idle, so the queue stays full
        images += 1
    queue.wait_all()
    return images / (time.perf_counter() - start), f"{jobs} async requests x batch 1"


def ov_latency(core: ov.Core, path: Path, device: str, size: tuple[int, int], seconds: float) -> tuple[float, float]:
    """Median and p90 ms of synchronous batch-1 requests with the latency hint."""
    compiled = ov_compile(core, path, device, "LATENCY")
    request = compiled.create_infer_request()
    request.set_input_tensor(ov_input(compiled, size))
    return latency_ms(timed_calls(request.infer, seconds))
