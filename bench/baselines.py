"""The unfused layers the fused ones are measured against.

* ``TorchLoRALinear``, ``TorchDeepLoRALinear``, ``TorchLoRMAPlusLinear``: each adapter written the
  plain way, one eager PyTorch op per term, adapter weights in the layer's dtype. This is what a
  user writes by hand, and autograd keeps whatever each op saves.
* :class:`LeanLoRALinear`, :class:`LeanVeRALinear`: every product in cuBLAS with a hand-written
  save-little backward (the unsloth pattern): the best path a careful engineer writes without Triton.
* :func:`peft_lora_layer` and :func:`peft_vera_layer`: the installed PEFT layers, built by
  ``peft.get_peft_model`` exactly as users build them (so with PEFT's own defaults, e.g. fp32
  adapter weights in a 16-bit model) and then taken out of the wrapper model.

Every constructor takes the frozen base ``nn.Linear`` first, like the fused modules.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _frozen(base_layer: nn.Linear) -> nn.Linear:
    if not isinstance(base_layer, nn.Linear):
        raise TypeError(f"base_layer must be a torch.nn.Linear, got {type(base_layer).__name__}")
    return base_layer.requires_grad_(False)


def _param(shape: tuple[int, ...], like: torch.Tensor, std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape, device=like.device, dtype=like.dtype) * std)


class TorchLoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) * (x A^T) B^T`` in eager PyTorch; A (r, in), B (out, r) train.

    B starts non-zero (unlike LoRA's init) so that a benchmark's backward does real work in every term.
    """

    def __init__(self, base_layer: nn.Linear, r: int, *, alpha: float = 8.0) -> None:
        super().__init__()
        self.base_layer = _frozen(base_layer)
        w = base_layer.weight
        self.r, self.scale = r, alpha / r
        self.lora_A = _param((r, base_layer.in_features), w, 1 / math.sqrt(base_layer.in_features))
        self.lora_B = _param((base_layer.out_features, r), w, 1 / math.sqrt(r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


class TorchDeepLoRALinear(nn.Module):
    """``y = base(x) + ((x W1^T) W2^T) W3^T`` in eager PyTorch; W1 (r, in), W2 (r, r), W3 (out, r) train."""

    def __init__(self, base_layer: nn.Linear, r: int) -> None:
        super().__init__()
        self.base_layer = _frozen(base_layer)
        w = base_layer.weight
        self.r = r
        self.W1 = _param((r, base_layer.in_features), w, 1 / math.sqrt(base_layer.in_features))
        self.W2 = _param((r, r), w, 1 / math.sqrt(r))
        self.W3 = _param((base_layer.out_features, r), w, 1 / math.sqrt(r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + F.linear(F.linear(F.linear(x, self.W1), self.W2), self.W3)


class TorchLoRMAPlusLinear(nn.Module):
    """LoRMA+ in eager PyTorch: ``W = (I + s B A) W0``, so ``y = z + s (z A^T) B^T + bias`` with ``z = x W0^T``.

    The cheapest unfused order (no (out, out) or (out, in) matrix is formed); A (r, out) and B
    (out, r) train, ``s = alpha / r``. The (tokens, out) product ``z`` is kept for A's gradient.
    """

    def __init__(self, base_layer: nn.Linear, r: int, *, alpha: float = 8.0) -> None:
        super().__init__()
        self.base_layer = _frozen(base_layer)
        w = base_layer.weight
        m = base_layer.out_features
        self.r, self.scale = r, alpha / r
        self.lorma_A = _param((r, m), w, 1 / math.sqrt(m))
        self.lorma_B = _param((m, r), w, 1 / math.sqrt(r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.base_layer.weight)
        y = z + self.scale * F.linear(F.linear(z, self.lorma_A), self.lorma_B)
        return y + self.base_layer.bias if self.base_layer.bias is not None else y


class _Holder(nn.Module):
    """A one-layer model, so that ``peft.get_peft_model`` can inject into ``layer``."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _inject(base_layer: nn.Linear, config) -> nn.Module:
    import peft  # imported here: only the baselines need PEFT

    weight = _frozen(base_layer).weight
    model = peft.get_peft_model(_Holder(base_layer), config)
    # PEFT may create shared buffers on the CPU; move the whole layer next to its base weight.
    return model.base_model.model.layer.to(weight.device)


def peft_lora_layer(base_layer: nn.Linear, r: int, *, alpha: float = 8.0) -> nn.Module:
    """The installed PEFT LoRA ``Linear`` around ``base_layer`` (dropout 0, B set non-zero)."""
    import peft

    layer = _inject(base_layer, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["layer"]))
    with torch.no_grad():  # LoRA's B starts at zero; any values time the same, non-zero is realistic
        layer.lora_B["default"].weight.normal_(0.0, 1 / math.sqrt(r))
    return layer


def peft_vera_layer(base_layer: nn.Linear, r: int, *, projection_seed: int = 0) -> nn.Module:
    """The installed PEFT VeRA ``Linear`` around ``base_layer`` (dropout 0, d_initial 0.1)."""
    import peft

    config = peft.VeraConfig(
        r=r, target_modules=["layer"], projection_prng_key=projection_seed, vera_dropout=0.0, d_initial=0.1
    )
    layer = _inject(base_layer, config)
    with torch.no_grad():  # lambda_b starts at zero; non-zero like a trained layer
        layer.vera_lambda_b["default"].fill_(0.5)
    return layer


# ------------------------------------------------------------------------- lean cuBLAS baseline


class _LeanLowRank(torch.autograd.Function):
    """``y = x W^T + bias + (s * d * (x A^T)) (b * B)^T``, every product a cuBLAS GEMM, with a
    save-little backward written by hand (the pattern unsloth's LoRA kernels use).

    Saves ``x`` (only when ``A`` trains) and ``x A^T`` (tokens, r): no (tokens, out) tensor. The
    small vectors ``d``, ``b`` and the (out, r), (r,) reductions stay in their own (fp32) dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, d, b, scale):
        xa = x @ A.T
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        dscale = d.to(acc) * scale if d is not None else torch.full((A.shape[0],), scale, device=x.device, dtype=acc)
        up = B * b[:, None] if b is not None else B
        y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
        y.addmm_((xa * dscale).to(y.dtype), up.to(y.dtype).T)
        ctx.save_for_backward(x if A.requires_grad else None, xa, weight, A, B, d, b, dscale)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        x, xa, weight, A, B, d, b, dscale = ctx.saved_tensors
        up = (B * b[:, None] if b is not None else B).to(g.dtype)
        g_rank = g @ up  # (b * g) B, (tokens, r)
        gh = (g_rank * dscale).to(g.dtype)
        grad_x = torch.addmm(g @ weight, gh, A) if ctx.needs_input_grad[0] else None
        grad_A = gh.T @ x if ctx.needs_input_grad[3] else None
        grads_dbB = [None, None, None]
        if any(ctx.needs_input_grad[4:7]):
            P = (g.T @ xa).to(dscale.dtype)  # (out, r): one product gives grad_B, grad_d and grad_b
            if ctx.needs_input_grad[4]:
                grads_dbB[0] = (P * dscale * (b[:, None] if b is not None else 1.0)).to(B.dtype)
            if ctx.needs_input_grad[5]:
                grads_dbB[1] = ctx.scale * ((b[:, None] if b is not None else 1.0) * B.to(P.dtype) * P).sum(0)
            if ctx.needs_input_grad[6]:
                grads_dbB[2] = (B.to(P.dtype) * P * dscale).sum(1)
        grad_B, grad_d, grad_b = grads_dbB
        return grad_x, None, None, grad_A, grad_B, grad_d, grad_b, None


class LeanLoRALinear(nn.Module):
    """LoRA on cuBLAS with a hand-written save-little backward (:class:`_LeanLowRank`)."""

    def __init__(self, base_layer: nn.Linear, r: int, *, alpha: float = 8.0) -> None:
        super().__init__()
        self.base_layer = _frozen(base_layer)
        w = base_layer.weight
        self.scale = alpha / r
        self.lora_A = _param((r, base_layer.in_features), w, 1 / math.sqrt(base_layer.in_features))
        self.lora_B = _param((base_layer.out_features, r), w, 1 / math.sqrt(r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return _LeanLowRank.apply(x, base.weight, base.bias, self.lora_A, self.lora_B, None, None, self.scale)


class LeanVeRALinear(nn.Module):
    """VeRA on cuBLAS with a hand-written save-little backward; frozen 16-bit projections, fp32 vectors."""

    def __init__(self, base_layer: nn.Linear, r: int) -> None:
        super().__init__()
        self.base_layer = _frozen(base_layer)
        w = base_layer.weight
        self.register_buffer("vera_A", torch.randn(r, base_layer.in_features, device=w.device, dtype=w.dtype)
                             / math.sqrt(base_layer.in_features))
        self.register_buffer("vera_B", torch.randn(base_layer.out_features, r, device=w.device, dtype=w.dtype)
                             / math.sqrt(r))
        self.lambda_d = nn.Parameter(torch.full((r,), 0.1, device=w.device))
        self.lambda_b = nn.Parameter(torch.full((base_layer.out_features,), 0.5, device=w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return _LeanLowRank.apply(x, base.weight, base.bias, self.vera_A, self.vera_B, self.lambda_d, self.lambda_b, 1.0)
