"""What the fused ops share before dispatch: input checks whose errors name the argument and the
expected shape or dtype, autocast, the scale, and flattening the token dimensions."""

import contextlib
import math

import torch
from torch import Tensor, nn

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_x_and_weight(x, weight) -> tuple[int, int]:
    """Validate ``x`` (..., n) against the base ``weight`` (m, n); returns ``(m, n)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have shape (..., in_features), got a scalar")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (out_features, in_features) tensor, got shape {tuple(weight.shape)}")
    m, n = weight.shape
    if x.shape[-1] != n:
        raise ValueError(f"x must have shape (..., {n}) to match weight (out_features={m}, in_features={n}), got {tuple(x.shape)}")
    return m, n


def check_tensor(name: str, t, shape: tuple, like: Tensor, dtypes: tuple, what: str = "") -> None:
    """``t`` is a tensor of ``shape``, one of ``dtypes``, on ``like``'s device; else a clear error."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}{' ' + what if what else ''}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = " or ".join(dict.fromkeys(str(dt) for dt in dtypes))
        raise TypeError(f"{name} must have dtype {names} (like x), got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but x is on {like.device}; put all inputs on one device")


def check_rank(A, n: int, like: Tensor) -> int:
    """``A`` is the (r, n) down projection, r >= 1, of ``like``'s dtype and device; returns r."""
    if not isinstance(A, Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() != 2 or A.shape[0] < 1:
        raise ValueError(f"A must be a 2-D (r, in_features) tensor with rank r >= 1, got shape {tuple(A.shape)}")
    check_tensor("A", A, (A.shape[0], n), like, (like.dtype,))
    return A.shape[0]


def check_adapter(x: Tensor, m: int, n: int, A, B, bias, d=None, b=None) -> int:
    """The engine's adapter tensors against ``x`` (..., n) and a base of ``m`` outputs: ``A``
    (r, n), ``B`` (m, r) and ``bias`` (m,) of ``x``'s dtype, ``d`` (r,) and ``b`` (m,) of ``x``'s
    dtype or float32 (each optional but A and B); all on ``x``'s device. Returns r."""
    r = check_rank(A, n, x)
    same, with_fp32 = (x.dtype,), (x.dtype, torch.float32)
    check_tensor("B", B, (m, r), x, same)
    if bias is not None:
        check_tensor("bias", bias, (m,), x, same)
    if d is not None:
        check_tensor("d", d, (r,), x, with_fp32)
    if b is not None:
        check_tensor("b", b, (m,), x, with_fp32)
    return r


def check_scale(scale) -> float:
    """A finite real ``scale``. Under ``torch.compile(dynamic=True)`` a module's float attribute
    arrives symbolic; its finiteness was checked when it was set, so it is taken as it is."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not torch.compiler.is_compiling() and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


def _probability(p, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
    return float(p)


def check_dropout(dropout, rank_segments, r: int) -> tuple[list[float], list[int]]:
    """``(probabilities, ranks)``, one per rank segment: ``dropout`` a probability in [0, 1) or one
    per segment, ``rank_segments`` positive ints summing to ``r`` (None: one segment of rank r)."""
    if rank_segments is None:
        ranks = [r]
    else:
        ranks = list(rank_segments) if isinstance(rank_segments, (list, tuple)) else None
        if not ranks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ranks) or sum(ranks) != r:
            raise ValueError(f"rank_segments must be positive ints summing to the rank {r}, got {rank_segments!r}")
    if isinstance(dropout, (list, tuple)):
        if len(dropout) != len(ranks):
            raise ValueError(f"dropout must give one probability per rank segment ({len(ranks)}), got {len(dropout)}")
        return [_probability(p, "dropout") for p in dropout], ranks
    return [_probability(dropout, "dropout")] * len(ranks), ranks


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype ``F.linear`` would compute in for ``x`` under ``torch.autocast`` now, else None.

    None when autocast is off for ``x``'s device or ``x`` is float64 (autocast leaves float64
    alone, as it does for ``F.linear``).
    """
    device_type = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(t, dtype: torch.dtype):
    """``t`` cast to ``dtype`` when autocast would cast it (a floating tensor other than float64)."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype not in (dtype, torch.float64):
        return t.to(dtype)
    return t


def no_autocast(t: Tensor):
    """Inside an op's implementation: autocast off, so fp32 accumulators stay fp32 (a backward
    called under ``torch.autocast`` would otherwise see its fp32 matmuls cast to 16 bits)."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def flatten_tokens(x: Tensor, n: int) -> Tensor:
    """``x`` (..., n) as (N, n); also for ``n == 0``, where ``reshape(-1, 0)`` is ambiguous."""
    return x.reshape(-1, n) if n > 0 else x.reshape(x.shape[:-1].numel(), 0)


def check_base_and_rank(base_layer, r) -> None:
    """What every adapter layer's constructor checks: an ``nn.Linear`` base and a positive int rank."""
    if not isinstance(base_layer, nn.Linear):
        raise TypeError(f"base_layer must be a torch.nn.Linear, got {type(base_layer).__name__}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
