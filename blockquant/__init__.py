"""blockquant: post-training quantization of PyTorch models."""
from blockquant.api import QuantResult, quantize
from blockquant.recipe import QuantSpec, Recipe, make_step, parse_recipe

__all__ = ["QuantResult", "QuantSpec", "Recipe", "make_step", "parse_recipe", "quantize"]
