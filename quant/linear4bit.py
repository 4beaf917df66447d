"""bitsandbytes' 4-bit linear layer as rawqlora uses it: one layout on every CPU and GPU.

Every module of rawqlora gets bitsandbytes from here, so that two things hold everywhere:

1. **The standard layout, always.** bitsandbytes 0.50, on a CPU with AVX512-BF16 (AMD Zen 4+,
   Intel Sapphire Rapids+), repacks a `Linear4bit`'s weight *in place* the first time it runs
   in eval mode without gradients (`_convert_weight_packed_for_cpu`): the codes are reordered
   for a fused kernel, the double-quantized block scales are expanded and rounded to bf16,
   and from then on the layer computes in bf16. Everything that reads `weight.data` and
   `quant_state` (our LoRA training path, merging, saving) would read another layout, and
   results would depend on whether inference had happened to run first and on the CPU. The
   way back (`..._inverse`) re-quantizes the scales, so it does not give the original back.
   We switch the repacking off on every layer we create or wrap (`keep_standard_layout`),
   so a 4-bit model computes the same function on every CPU, before and after generation.
2. **No noise the user did not cause.** On those CPUs, importing bitsandbytes logs a warning
   that an optional hub kernel package (`kernels`) is missing. We never use that kernel, so
   that one message is filtered; every other bitsandbytes warning still shows.
"""

import logging

import torch
from torch import nn

from rawqlora.errors import BadInput


class _DropHubKernelNotice(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# Installed before bitsandbytes is imported, since the message is logged at import time.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHubKernelNotice())

import bitsandbytes as bnb  # noqa: E402  (after the filter above)

Linear4bit = bnb.nn.Linear4bit


def keep_standard_layout(layer):
    """Switch bitsandbytes' CPU repacking off for `layer` (see the module docstring).

    A layer that was already repacked (a model that ran inference before we got it) has lost
    its original scales; it is refused rather than silently computed with other weights.
    """
    if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        raise BadInput(
            "this Linear4bit was repacked by bitsandbytes' CPU inference path (AVX512-BF16), which "
            "rounds its scales to bf16: load the model with quant.load_model, or wrap it before running it"
        )
    layer.support_avx512bf16_for_cpu = False
    return layer


def dequantize(module, dtype=torch.float32):
    """The dense weight [out, in] of an `nn.Linear` or a `Linear4bit`, in `dtype`, as a new tensor."""
    if isinstance(module, Linear4bit):
        weight = module.weight
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    if isinstance(module, nn.Linear):
        return module.weight.detach().to(dtype, copy=True)
    raise TypeError(f"dequantize takes nn.Linear or Linear4bit, not {type(module).__name__}")
