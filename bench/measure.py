"""What the benchmarks measure, each in one function: time, saved bytes, peak memory, launches.

* :func:`saved_for_backward` is device independent: it sees every tensor autograd packs during a
  forward, through ``torch.autograd.graph.saved_tensors_hooks``.
* :func:`peak_step_bytes` needs CUDA's caching allocator statistics (None elsewhere).
* :func:`count_triton_launches` counts ``kernel[grid](...)`` calls (compiled or interpreted);
  :func:`count_cuda_kernels` counts every CUDA kernel, cuBLAS included, with ``torch.profiler``.
"""

import contextlib
import random
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Saved:
    """Bytes autograd keeps for backward: ``total`` (each storage once), of which ``input`` is ``x``'s."""

    total: int
    input: int
    tensors: int


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def saved_storages(forward: Callable[[], object]) -> tuple[dict[tuple[str, int], int], int]:
    """The storages autograd keeps for backward from ``forward()`` (its result held meanwhile), as
    {(device, address): bytes}, and how many tensors it packed.

    Each packed tensor is followed by weak reference and counts if it is still alive when
    ``forward()`` has returned: a tensor saved by a side computation whose graph was dropped
    before the end (say a norm computed and then detached) is not kept for backward, and its
    memory may have been reused by a later one meanwhile.
    """
    refs = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    alive = [t for t in (ref() for ref in refs) if t is not None]
    storages = {_storage_key(t): t.untyped_storage().nbytes() for t in alive if t.untyped_storage().data_ptr() != 0}
    del out
    return storages, len(refs)


def saved_for_backward(module: nn.Module, x: torch.Tensor) -> Saved:
    """Bytes saved for backward by one ``module(x)``, parameters and buffers excluded.

    A tensor autograd packs counts with its whole storage (a view keeps its base alive), each
    storage once however many ops save it (:func:`saved_storages`); storages of the module's
    parameters and buffers (the frozen weights, VeRA's shared projections) are left out, since
    they exist anyway. ``x`` counts when kept: a layer inside a network would keep its input alive
    through it.
    """
    owned = {_storage_key(t) for t in (*module.parameters(), *module.buffers())}
    with torch.enable_grad():
        storages, packed = saved_storages(lambda: module(x))
    seen = {key: n for key, n in storages.items() if key not in owned}
    return Saved(total=sum(seen.values()), input=seen.get(_storage_key(x), 0), tensors=packed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak CUDA memory allocated during ``step()`` above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@contextlib.contextmanager
def count_triton_launches() -> Iterator[list[int]]:
    """Counts ``kernel[grid](...)`` launches of any Triton kernel inside the block (``counter[0]``).

    Patches ``__getitem__`` of Triton's kernel classes, the entry of every launch: an autotuned
    kernel counts once per launch, not once per config it benchmarks.
    """
    from triton.runtime import jit

    classes = [jit.KernelInterface]
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    counter = [0]
    originals = {cls: cls.__dict__["__getitem__"] for cls in classes if "__getitem__" in cls.__dict__}

    def wrap(original):
        def __getitem__(self, grid):
            launch = original(self, grid)

            def counted(*args, **kwargs):
                counter[0] += 1
                return launch(*args, **kwargs)

            return counted

        return __getitem__

    for cls, original in originals.items():
        setattr(cls, "__getitem__", wrap(original))
    try:
        yield counter
    finally:
        for cls, original in originals.items():
            setattr(cls, "__getitem__", original)


def count_cuda_kernels(step: Callable[[], None], device: torch.device) -> int | None:
    """CUDA kernels (cuBLAS, Triton, elementwise) one ``step()`` launches; None off CUDA or on failure."""
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            synchronize(device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # noqa: BLE001 - a profiler problem must not stop the benchmark; reported as n/a
        return None


def time_interleaved(
    fns: dict[str, Callable[[], None]],
    device: torch.device,
    rounds: int,
    min_seconds: float,
    on_round: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``rounds`` samples each, taken round-robin.

    Round-robin order means slow drift of the machine (clock, other load) hits every function
    alike, so ratios between them stay fair; the order within a round is shuffled (seeded), so no
    function always runs right after the same neighbour (whose caches and allocations it would
    inherit). Each sample runs a function enough times in a row to last ``min_seconds``
    (calibrated on one call; the first call of each is a warm-up), so the CUDA synchronisation
    and timer overheads stay small.
    """
    loops = {}
    for name, fn in fns.items():
        fn()  # warm-up: autotuning, allocator, lazy init
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        once = time.perf_counter() - start
        loops[name] = max(1, int(min_seconds / max(once, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / loops[name])
        if on_round is not None:
            on_round()
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``values`` (all three equal for one value)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def per_round(a: list[float], b: list[float], op: Callable[[float, float], float]) -> list[float]:
    """``op(a[i], b[i])`` for each round ``i`` of two interleaved timings of
    :func:`time_interleaved` (sample ``i`` of each was taken in round ``i``, so the drift of the
    machine hits both alike)."""
    if len(a) != len(b):
        raise ValueError(f"timings of different rounds: {len(a)} and {len(b)} samples")
    return [op(x, y) for x, y in zip(a, b)]


def round_ratios(a: list[float], b: list[float]) -> dict:
    """``a / b`` per round: median, first and third quartiles and ``spread`` (half the
    interquartile range). Every ratio of positive times is positive, so is every quartile."""
    q1, med, q3 = quartiles(per_round(a, b, lambda x, y: x / y))
    return {"median": med, "q1": q1, "q3": q3, "spread": (q3 - q1) / 2}


def relative_spread(values: list[float]) -> float:
    """Half the interquartile range over the median: the noise of a timing, as a fraction."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / 2 / statistics.median(values)


def step_functions(module: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward, step): inference forward under ``no_grad``, and forward + backward of one step.

    ``step`` drops the gradients it made (``x.grad`` and the trainable parameters'), so every call
    does the same work and memory does not accumulate.
    """
    params = [p for p in module.parameters() if p.requires_grad]

    def forward() -> None:
        with torch.no_grad():
            module(x)

    def step() -> None:
        module(x).backward(grad_y)
        x.grad = None
        for p in params:
            p.grad = None

    return forward, step
