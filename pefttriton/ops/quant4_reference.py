"""bitsandbytes' 4-bit weight format written out without bitsandbytes: the published code books, a
quantizer and a float64 dequantizer.

Tests check the fused 4-bit op against :func:`dequantize_4bit_reference` and it against
bitsandbytes itself (bit for bit); the GPU check, whose image has no bitsandbytes, quantizes with
:func:`quantize_4bit_reference`. Nothing here is fast.

The layout (``bitsandbytes.functional.quantize_4bit``, 0.50): the weight (out, in) is flattened row
by row; element ``e`` is the 4-bit code in byte ``e // 2``, high nibble for even ``e``, low nibble
for odd ``e`` (an odd element count pads the last low nibble with the code of 0). Each run of
``blocksize`` consecutive elements has one float32 ``absmax`` (the last run may be short), and
``W[e] = code[nibble] * absmax[e // blocksize]``. With double quantization the absmaxes, minus
their mean ``offset``, are quantized blockwise again (256 per block) to uint8 indices into
bitsandbytes' 8-bit dynamic code book, with a float32 absmax per 256 blocks:
``absmax[i] = code2[q[i]] * absmax2[i // 256] + offset``, each product and sum rounded to float32
as bitsandbytes stores it.
"""

import torch
from torch import Tensor

from pefttriton.ops.quant4 import Quant4Weight

# NF4 (QLoRA, Dettmers et al. 2023, appendix E; bitsandbytes ``get_4bit_type("nf4")``): the
# quantiles of a standard normal, scaled to [-1, 1], with an exact zero. Index = code.
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (bitsandbytes ``get_4bit_type("fp4")``): 1 sign, 2 exponent, 1 mantissa bit, exponent bias
# 2, in bit-pattern order, divided by the largest magnitude (12). Index = code.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4 = tuple(v / 12.0 for v in _FP4_RAW)


def code_book(quant_type: str) -> Tensor:
    """The 16 float32 values of ``quant_type`` ("nf4" or "fp4"), as bitsandbytes holds them."""
    if quant_type == "nf4":
        return torch.tensor(NF4, dtype=torch.float64).to(torch.float32)
    if quant_type == "fp4":
        # v / 12 in float64 rounded once: the correctly rounded float32 quotient bitsandbytes' divide gives
        return torch.tensor(FP4, dtype=torch.float64).to(torch.float32)
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def dynamic_code_book() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic code book (``create_dynamic_map()``: Dettmers 2015), the
    code of the nested absmaxes: for each decade 10^-6 .. 10^0, 2^i midpoints of an even split of
    [0.1, 1] (both signs), plus 0 and 1, sorted; (256,) float32, computed as bitsandbytes does."""
    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def _blockwise_absmax(flat: Tensor, blocksize: int) -> Tensor:
    """max |flat| over each run of ``blocksize`` elements (the last run may be short)."""
    pad = -flat.numel() % blocksize
    return torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, blocksize).amax(1)


def _nearest(scaled: Tensor, code: Tensor) -> Tensor:
    """Index of the code nearest to each value (ties to the lower code value), as uint8."""
    order = torch.argsort(code)
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return order[torch.bucketize(scaled, midpoints)].to(torch.uint8)


def quantize_4bit_reference(
    weight: Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False
) -> Quant4Weight:
    """``weight`` (m, n) in bitsandbytes' 4-bit layout, as ``bitsandbytes.functional.quantize_4bit``
    (``compress_statistics=double_quant``) makes it.

    The 4-bit codes and float32 absmaxes are bitsandbytes' own (its float32 arithmetic: values
    times ``1 / absmax``, clamped to [-1, 1], the nearest code with ties to the lower one). With
    ``double_quant`` the absmax indices take the exact nearest dynamic code, where bitsandbytes'
    CPU build (0.50) reads a 65536-entry lookup table: the two differ, by one code step, for
    absmaxes within about 2^-16 of a midpoint between two codes.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be an even int >= 2, got {blocksize!r}")
    code = code_book(quant_type).to(weight.device)
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    absmax = _blockwise_absmax(flat, blocksize)
    inverse = 1.0 / absmax.clamp(min=1e-38)
    scaled = (flat * torch.repeat_interleave(inverse, blocksize)[:n]).clamp(-1, 1)
    # an odd count pads the value 0 (NF4's code 7, FP4's code 0), as bitsandbytes does
    codes = _nearest(torch.nn.functional.pad(scaled, (0, n % 2)), code)
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return Quant4Weight(packed, absmax, code, tuple(weight.shape), blocksize, quant_type)
    offset = absmax.mean()
    centred = absmax - offset
    code2 = dynamic_code_book().to(weight.device)
    absmax2 = _blockwise_absmax(centred, 256)
    inverse2 = torch.where(absmax2 > 0, 1.0 / absmax2, torch.zeros_like(absmax2))
    scaled2 = (centred * torch.repeat_interleave(inverse2, 256)[: centred.numel()]).clamp(-1, 1)
    return Quant4Weight(packed, _nearest(scaled2, code2), code, tuple(weight.shape), blocksize, quant_type,
                        absmax2=absmax2, code2=code2, offset=offset, nested_blocksize=256)


def absmax_reference(weight: Quant4Weight) -> Tensor:
    """The float32 absmax of every block, as float64: stored, or (nested) ``code2[q] * absmax2``
    rounded to float32, plus ``offset`` rounded to float32 (bitsandbytes' two float32 operations;
    float64 products and sums of float32 values are exact before the rounding)."""
    if not weight.nested:
        return weight.absmax.double()
    code2 = dynamic_code_book().double().to(weight.absmax.device)
    blocks = weight.absmax.numel()
    absmax2 = torch.repeat_interleave(weight.absmax2.double(), weight.nested_blocksize)[:blocks]
    scaled = (code2[weight.absmax.long()] * absmax2).float().double()
    return (scaled + weight.offset.double()).float().double()


def dequantize_4bit_reference(weight: Quant4Weight) -> Tensor:
    """``weight`` as a float64 (m, n) tensor: ``code[nibble] * absmax`` exactly (both factors are
    float32 values, so the float64 product is exact), from the published code book of its
    ``quant_type`` (not the tensor the weight carries). bitsandbytes' ``dequantize_4bit`` to
    ``dtype`` equals this rounded to float32 and then to ``dtype``."""
    m, n = weight.shape
    numel = m * n
    packed = weight.packed.long()
    codes = torch.stack((packed >> 4, packed & 15), 1).reshape(-1)[:numel]
    values = code_book(weight.quant_type).double().to(packed.device)[codes]
    absmax = torch.repeat_interleave(absmax_reference(weight), weight.blocksize)[:numel]
    return (values * absmax).view(m, n)
