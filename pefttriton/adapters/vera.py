"""VeRA as a drop-in module: ``h = W0 x + lambda_b * (B (lambda_d * (A x)))``.

``A`` (r, n) and ``B`` (m, r) are frozen random projections shared by every adapted layer and
regenerable from an integer seed, drawn exactly as PEFT's VeRA draws them; only the vectors
``lambda_d`` (r,) and ``lambda_b`` (m,) train.
"""

import math

import torch
from torch import nn

from pefttriton.adapters.adapter_layer import AdapterLayer, LowRank, check_finite


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    # PEFT's ``_kaiming_init``: fp32 on the CPU, bound sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1].
    # A zero-sized shape draws nothing (PEFT's init is a no-op there too).
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(max(shape[1], 1))
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen random projections shared by VeRA layers.

    ``vera_A`` (r, max_in_features) and ``vera_B`` (max_out_features, r) are drawn from
    ``torch.Generator("cpu").manual_seed(seed)``, ``vera_A`` first, so they are bit-identical to
    PEFT's ``vera_A`` / ``vera_B`` for ``projection_prng_key=seed``. They are non-persistent
    buffers: a checkpoint needs only the seed. A layer of shape (m, n) uses
    ``vera_A[:r, :n]`` and ``vera_B[:m, :r]``.

    Args:
        r: rank of the projections (>= every layer's rank).
        max_in_features: width of ``vera_A``, >= every layer's in_features.
        max_out_features: height of ``vera_B``, >= every layer's out_features.
        seed: the PRNG seed (PEFT's ``projection_prng_key``).
        dtype, device: where the buffers live (drawn in fp32 on the CPU first, then cast).
    """

    def __init__(
        self,
        r: int,
        max_in_features: int,
        max_out_features: int,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        for name, value in (("max_in_features", max_in_features), ("max_out_features", max_out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int (PEFT's projection_prng_key), got {seed!r}")
        self.r, self.seed = r, seed
        generator = torch.Generator(device="cpu").manual_seed(seed)
        vera_A = _kaiming_uniform((r, max_in_features), generator)
        vera_B = _kaiming_uniform((max_out_features, r), generator)
        self.register_buffer("vera_A", vera_A.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("vera_B", vera_B.to(device=device, dtype=dtype), persistent=False)

    @property
    def max_in_features(self) -> int:
        return self.vera_A.shape[1]

    @property
    def max_out_features(self) -> int:
        return self.vera_B.shape[0]

    def slices(self, r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(A, B)`` of shapes (r, in_features) and (out_features, r); no copy."""
        if r > self.r or in_features > self.max_in_features or out_features > self.max_out_features:
            raise ValueError(
                f"projections of rank {self.r}, max_in_features {self.max_in_features}, max_out_features "
                f"{self.max_out_features} are smaller than a layer with r={r}, in_features={in_features}, "
                f"out_features={out_features}"
            )
        return self.vera_A[:r, :in_features], self.vera_B[:out_features, :r]

    def extra_repr(self) -> str:
        return f"r={self.r}, max_in_features={self.max_in_features}, max_out_features={self.max_out_features}, seed={self.seed}"


def layer_projections(base_layer: nn.Linear, r: int, projection_seed: int,
                      projections: VeRAProjections | None) -> VeRAProjections:
    """The shared projections a VeRA layer over ``base_layer`` uses: ``projections`` when given
    (checked to be :class:`VeRAProjections` large enough for the layer), else a pair of its own
    drawn from ``projection_seed`` in the base weight's dtype and device."""
    weight = base_layer.weight
    if projections is None:
        projections = VeRAProjections(
            r, base_layer.in_features, base_layer.out_features, projection_seed, weight.dtype, weight.device
        )
    elif not isinstance(projections, VeRAProjections):
        raise TypeError(f"projections must be a VeRAProjections, got {type(projections).__name__}")
    projections.slices(r, base_layer.in_features, base_layer.out_features)  # raises if too small
    return projections


class FusedVeRALinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus a VeRA adapter, computed by the fused engine.

    Args:
        base_layer: the ``nn.Linear`` to adapt; its weight and bias are frozen.
        r: VeRA rank (the paper uses 256 to 1024).
        projection_seed: seed of the shared projections when this layer makes its own.
        d_initial: initial value of every entry of ``lambda_d`` (``lambda_b`` starts at 0, so the
            layer starts exactly at the base layer).
        projections: a :class:`VeRAProjections` shared with other layers; made from
            ``projection_seed`` and this layer's shape when None.
        fan_in_fan_out: see :class:`~pefttriton.adapters.adapter_layer.AdapterLayer`.

    Trainable parameters: ``lambda_d`` (r,) and ``lambda_b`` (out_features,), float32 (float64
    for a float64 base layer). Engine: ``A``, ``B`` the projection slices, ``d = lambda_d``,
    ``b = lambda_b``, ``scale = 1``.
    """

    adapter_type = "vera"
    adapter_layer_names = ("lambda_d", "lambda_b")
    settings = ("d_initial",)

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        *,
        projection_seed: int = 0,
        d_initial: float = 0.1,
        projections: VeRAProjections | None = None,
        fan_in_fan_out: bool = False,
    ) -> None:
        super().__init__(base_layer, r, fan_in_fan_out=fan_in_fan_out)
        self.d_initial = check_finite("d_initial", d_initial)
        weight = base_layer.weight
        projections = layer_projections(base_layer, r, projection_seed, projections)
        if projections.vera_A.dtype != weight.dtype or projections.vera_A.device != weight.device:
            raise ValueError(
                f"projections are {projections.vera_A.dtype} on {projections.vera_A.device} but the base layer is "
                f"{weight.dtype} on {weight.device}; build them with the base layer's dtype and device"
            )
        self.projections = projections
        self.lambda_d = nn.Parameter(torch.full((r,), self.d_initial, **self._new_param_kwargs()))
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, **self._new_param_kwargs()))

    def projection_slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's ``A`` (r, in_features) and ``B`` (out_features, r), in the base weight's dtype.

        The projections are shared, so ``.half()`` or ``.to()`` on one layer converts them for every
        layer: like PEFT, each layer casts its slices to its own dtype (an (r, n) and an (m, r) copy
        only when they differ). A device mismatch is an error, since a copy per call across devices
        would be silently slow.
        """
        return self._slices(self.base_layer.weight.dtype)

    def _slices(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.projections.slices(self.r, self.in_features, self.out_features)
        device = self.base_layer.weight.device
        if A.device != device:
            raise ValueError(
                f"the shared VeRA projections are on {A.device} but this layer's base weight is on {device}; "
                "move the whole model (every layer sharing the projections) to one device"
            )
        return A.to(dtype), B.to(dtype)

    def engine_inputs(self, dtype: torch.dtype) -> LowRank:
        A, B = self._slices(dtype)
        return LowRank(A, B, self.lambda_d, self.lambda_b)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.projections.seed}"
