"""blockquant: post-training quantization of PyTorch models."""

from blockquant.api import QuantResult, quantize
from blockquant.export import QuantLinear, load, save_packed
from blockquant.recipe import QuantSpec, Recipe, make_step, parse_recipe

__all__ = ["QuantLinear", "QuantResult", "QuantSpec", "Recipe", "load", "make_step", "parse_recipe", "quantize", "save_packed"]
