"""ZeroQuant (Yao et al. 2022, "ZeroQuant: Efficient and Affordable Post-Training Quantization for
Large-Scale Transformers", §4.1–4.2): min–max group-wise weight quantization with token-wise
dynamic activation quantization (the recipe must quantize activations per token). Its
layer-by-layer distillation is the separate method ``lkd`` (``zeroquant,lkd``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from blockquant.capture import BlockContext, LayerResult
from blockquant.methods import rtn
from blockquant.spec import QuantSpec


@dataclass(frozen=True)
class ZeroQuantOptions:
    pass  # min–max group-wise weights; the group size and symmetry are the recipe's


def apply(block: nn.Module, ctx: BlockContext, spec: QuantSpec, opts: ZeroQuantOptions) -> dict[str, LayerResult]:
    return rtn.apply(block, ctx, spec, rtn.RTNOptions(clip_search=False))
