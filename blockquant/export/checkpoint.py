"""Write a quantized model as a real low-bit checkpoint and load one back (DESIGN.md §4 "Export").

``save_packed`` turns the fake-quantized model plus the grids ``quantize()`` recorded into a
compressed-tensors or GPTQ directory — written to a temporary sibling and renamed at the end,
with a sha256 manifest. ``load`` builds the model with :class:`QuantLinear` layers from either
format (verifying the manifest when there is one), so that the weights stay packed in memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers.initialization import no_init_weights
from transformers.pytorch_utils import Conv1D

from blockquant import activations
from blockquant.activations import has_input_smoothing
from blockquant.arch import arch_for, block_linears, get_blocks, is_linear
from blockquant.capture import LayerResult
from blockquant.export import compressed_tensors, gptq
from blockquant.export.qlinear import ScaleRounding, pack_linear, triton_available
from blockquant.export.shards import MANIFEST_FILE, read_tensors, verify_manifest, write_manifest, write_safetensors
from blockquant.files import RECORD_FILE, atomic_dir, check_output_dir, load_model, model_class_name, save_quantized
from blockquant.recipe import QuantSpec
from blockquant.report import QuantResult

log = logging.getLogger(__name__)

FORMATS = {compressed_tensors.NAME: compressed_tensors, gptq.NAME: gptq}
DEQUANTIZED = "dequantized"
FORMAT_CHOICES = (*FORMATS, DEQUANTIZED)
DEFAULT_SHARD_BYTES = 2 * 2**30
QUANTIZER_FOLD_PACKED = (
    "smoothquant fold: quantizer divides the inputs of some linears by a per-channel s in front of their activation "
    f"quantizer, which packed formats have no place for; write --format {DEQUANTIZED} (the weights with s folded back out "
    f"of their columns, s in {activations.SMOOTHING_FILE}) or use fold: exact (the default)"
)


def _shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a Linear or a (transposed) GPT-2 Conv1D."""
    out, cols = module.weight.shape
    return (cols, out) if isinstance(module, Conv1D) else (out, cols)


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The linears ``quantize()`` quantizes: every linear of every block (arch table)."""
    arch = arch_for(model)
    blocks = get_blocks(model, arch)
    return {f"{arch.blocks}.{i}.{n}": m for i, block in enumerate(blocks) for n, m in block_linears(block, arch).items()}


def export_problem(fmt: str, model: nn.Module, spec: QuantSpec, layers: dict[str, LayerResult] | None = None) -> str | None:
    """Why ``fmt`` cannot hold this model quantized with ``spec`` (None when it can).

    Before quantization (``layers`` None) shapes and the spec decide; afterwards the act-order
    groups (``g_idx``) the methods produced count too.
    """
    if fmt == DEQUANTIZED:
        return None
    if fmt not in FORMATS:
        return f"unknown format {fmt!r}; choose one of {', '.join(FORMAT_CHOICES)}"
    problem = _layer_problem(fmt, model, spec, layers)
    if problem is None:
        return None
    # name only the formats that do hold it: a fixed hint may point at a format that fails too (GPT-2's Conv1D)
    fits = [f for f in FORMATS if f != fmt and _layer_problem(f, model, spec, layers) is None] + [DEQUANTIZED]
    return f"{problem} (formats that hold this model: {', '.join(fits)})"


def _layer_problem(fmt: str, model: nn.Module, spec: QuantSpec, layers: dict[str, LayerResult] | None) -> str | None:
    group_size = -1 if spec.per_tensor else spec.group_size
    names = layers if layers is not None else _quantized_layers(model)
    for name in names:
        module = model.get_submodule(name)
        has_g_idx = layers is not None and layers[name].g_idx is not None
        problem = FORMATS[fmt].problem(name, *_shape(module), group_size, isinstance(module, Conv1D), has_g_idx)
        if problem:
            return problem
    return None


def resolve_format(requested: str | None, model: nn.Module, spec: QuantSpec, layers: dict[str, LayerResult] | None = None) -> str:
    """The format to write: ``requested`` (refused with the reason if it cannot hold the
    scheme), or by default compressed-tensors, else dequantized weights with a warning why."""
    if requested is not None:
        problem = export_problem(requested, model, spec, layers)
        if problem is None and requested != DEQUANTIZED and has_input_smoothing(model):
            problem = QUANTIZER_FOLD_PACKED
        if problem:
            raise ValueError(f"cannot write --format {requested}: {problem}")
        return requested
    problem = export_problem(compressed_tensors.NAME, model, spec, layers)
    if problem is None and has_input_smoothing(model):
        problem = "smoothquant fold: quantizer smooths some activations in front of their quantizer, which packed formats cannot hold"
    if problem:
        log.warning("writing dequantized weights, not a compressed-tensors checkpoint: %s", problem)
        return DEQUANTIZED
    return compressed_tensors.NAME


def save_checkpoint(
    fmt: str,
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    record: dict[str, Any],
    result: QuantResult,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``fmt`` (a packed format, or ``dequantized`` for a plain HF checkpoint).

    ``dtype`` (default: the model's) is the checkpoint's dtype in every format: pass the source
    checkpoint's (``stored_dtype``), so that a bf16 model stays a bf16 file also when it was
    quantized in fp32 compute. Dequantized weights ``s·(q − z)`` are rounded to it;
    ``blockquant.json`` (``export.weight_rounding``) records how many that moved.

    Smoothed activations (SmoothQuant ``fold: quantizer``) only go to ``dequantized``: the weights
    with s divided back out of their columns, so that plain transformers computes the quantized
    weights' function, and s in ``activations.SMOOTHING_FILE`` for ``activations.restore``.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (the checkpoint's), e.g. torch.bfloat16, got {dtype!r}")
    if fmt == DEQUANTIZED:
        dtype = dtype or _model_dtype(model)
        smoothing = activations.smoothing_vectors(model)
        with activations.unsmoothed(model), _stored_as(model, dtype, list(result.layers)) as rounding:
            record = dict(record)
            record["export"] = {"format": DEQUANTIZED, "dtype": str(dtype).removeprefix("torch."), "weight_rounding": vars(rounding)}
            extra = {activations.SMOOTHING_FILE: smoothing} if smoothing else None
            return save_quantized(model, tokenizer, out_dir, record, overwrite, extra)
    if has_input_smoothing(model):
        raise ValueError(QUANTIZER_FOLD_PACKED)
    return save_packed(model, result, out_dir, fmt, tokenizer=tokenizer, record=record, overwrite=overwrite, dtype=dtype)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


@contextmanager
def _stored_as(model: nn.Module, dtype: torch.dtype, layers: list[str]) -> Iterator[ScaleRounding]:
    """Inside, every floating tensor of ``model``'s state dict is in ``dtype`` (what
    ``save_pretrained`` writes); yields how many weights of the quantized ``layers`` the cast
    moved. On exit the original tensors (and ``config.dtype``) are put back, untouched."""
    saved: dict[int, tuple[Tensor, Tensor]] = {}
    config_dtype = getattr(model.config, "dtype", None)
    rounding = ScaleRounding()
    try:
        for t in model.state_dict(keep_vars=True).values():
            if t.is_floating_point() and t.dtype != dtype and id(t) not in saved:
                saved[id(t)] = (t, t.data)
                t.data = t.data.to(dtype)
        for name in layers:
            weight = model.get_submodule(name).weight
            old = saved[id(weight)][1] if id(weight) in saved else weight.data
            moved = weight.data.float() != old.float()
            rounding.weights_total += weight.numel()
            rounding.weights_changed += int(moved.sum())
            if moved.any():
                rel = (weight.data.float() - old.float()).abs() / old.float().abs().clamp(min=1e-30)
                rounding.max_relative_change = max(rounding.max_relative_change, float(rel[moved].max()))
        if rounding.weights_changed:
            log.info(
                "dequantized weights stored in %s move %d of %d quantized weights, by at most %.2g relative "
                "(blockquant.json: export.weight_rounding)",
                dtype,
                rounding.weights_changed,
                rounding.weights_total,
                rounding.max_relative_change,
            )
        yield rounding
    finally:
        for t, data in saved.values():
            t.data = data
        model.config.dtype = config_dtype  # save_pretrained sets it to what it wrote


def save_packed(
    model: nn.Module,
    result: QuantResult,
    out_dir: str | Path,
    fmt: str = compressed_tensors.NAME,
    *,
    tokenizer: Any = None,
    record: dict[str, Any] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write ``model`` (as ``quantize()`` left it, with its ``result``) as a ``fmt`` checkpoint.

    ``dtype`` (default: the model's) is the dtype of the scales and of every unquantized tensor;
    scales narrower than fp32 round, which ``blockquant.json`` records under ``export``.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (scales and unquantized tensors), e.g. torch.bfloat16, got {dtype!r}")
    check_output_dir(out_dir, overwrite)  # before the packing work
    spec = result.recipe.spec
    problem = export_problem(fmt, model, spec, result.layers)
    if problem or fmt == DEQUANTIZED:
        raise ValueError(f"cannot write --format {fmt}: {problem or 'use save_quantized for dequantized weights'}")
    if not result.layers:
        raise ValueError("the QuantResult records no quantized layers; nothing to pack")
    writer = FORMATS[fmt]
    dtype = dtype or _model_dtype(model)
    packed, rounding = {}, ScaleRounding()
    for name, layer in result.layers.items():
        module = model.get_submodule(name)
        weight = module.weight.detach().t() if isinstance(module, Conv1D) else module.weight.detach()
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        q, r = pack_linear(name, weight, layer.scale, layer.zero, layer.g_idx, spec, bias, dtype)
        packed[name] = writer.layer_tensors(q)
        rounding.weights_changed += r.weights_changed
        rounding.weights_total += r.weights_total
        rounding.max_relative_change = max(rounding.max_relative_change, r.max_relative_change)
    if rounding.weights_changed:
        log.warning(
            "scales stored in %s move %d of %d weights, by at most %.2g relative, so the checkpoint differs from the "
            "evaluated model; quantize with QuantSpec(scale_dtype=%r) (the CLI does: the subject's dtype) to make it exact",
            dtype,
            rounding.weights_changed,
            rounding.weights_total,
            rounding.max_relative_change,
            str(dtype).removeprefix("torch."),
        )

    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in result.layers)
    desc_act = any(r.g_idx is not None for r in result.layers.values())
    qcfg = writer.quantization_config(spec.bits, -1 if spec.per_tensor else spec.group_size, spec.sym, ignore, desc_act, result.recipe.name)
    config = json.loads(model.config.to_json_string(use_diff=True))
    config.update(architectures=[type(model).__name__], dtype=str(dtype).removeprefix("torch."), quantization_config=qcfg)
    record = dict(record or result.record())
    record["export"] = {"format": fmt, "dtype": str(dtype).removeprefix("torch."), "scale_rounding": vars(rounding)}
    tensors = _checkpoint_tensors(model, packed, dtype)

    with atomic_dir(out_dir, overwrite) as tmp:
        write_safetensors(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for file, text in writer.extra_files(qcfg).items():
            (tmp / file).write_text(text)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))
        write_manifest(tmp)
    return Path(out_dir)


def _checkpoint_tensors(model: nn.Module, packed: dict[str, dict[str, Tensor]], dtype: torch.dtype) -> dict[str, Tensor]:
    """The model's state dict with packed layers in place of their weights, ties written once."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    tensors, storages = {}, set()
    for key, t in model.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        if layer in packed:
            if leaf == "weight":
                tensors.update({f"{layer}.{k}": v for k, v in packed[layer].items()})
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in tied or (t.numel() and ptr in storages):
            continue
        storages.add(ptr)
        tensors[key] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
    return tensors


# ---------------------------------------------------------------------------------------------
# Reading


def _quant_config(path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    qcfg = config.get("quantization_config")
    if qcfg is None and (path / gptq.CONFIG_FILE).is_file():
        try:
            qcfg = json.loads((path / gptq.CONFIG_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path / gptq.CONFIG_FILE} is not valid JSON: {e}") from None
    return qcfg


def _read_config(path: Path) -> dict[str, Any]:
    model_class_name(path)  # the directory, config.json and its architecture, with clear errors
    return json.loads((path / "config.json").read_text())


def is_packed(model_dir: str | Path) -> bool:
    """Whether a directory declares quantized weights (``quantization_config``) for ``load``."""
    path = Path(model_dir)
    return (path / "config.json").is_file() and _quant_config(path, _read_config(path)) is not None


def stored_dtype(model_dir: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint's ``config.json`` declares (None when it names none)."""
    config = _read_config(Path(model_dir))
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def load(model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """The model of a compressed-tensors (pack-quantized) or GPTQ directory, with packed layers.

    ``dtype`` (default: the checkpoint's) is the compute dtype of activations and unquantized
    weights; scales keep their stored dtype. With ``verify``, a ``blockquant.sha256.json``
    manifest is checked first and any difference names the file and tensor.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, e.g. torch.bfloat16, got {dtype!r}")
    from blockquant.device import check_device

    device = check_device(device)
    path = Path(model_dir)
    config = _read_config(path)
    qcfg = _quant_config(path, config)
    if not isinstance(qcfg, dict):
        raise ValueError(f"{path} declares no quantization_config: it is not a packed checkpoint")
    if verify and not verify_manifest(path):  # before the config is trusted: a corrupt file is named first
        log.warning("%s has no %s manifest; its integrity is not verified", path, MANIFEST_FILE)
    method = str(qcfg.get("quant_method", "")).lower()
    if method not in FORMATS:
        raise ValueError(
            f"unsupported quantization format {method or 'None'!r} in {path / 'config.json'}; "
            f"blockquant reads {' and '.join(FORMATS)} checkpoints"
        )
    reader = FORMATS[method]
    scheme = reader.parse_config(qcfg)
    tensors = read_tensors(path)
    dtype = dtype or stored_dtype(path) or torch.float32

    cls = getattr(transformers, config["architectures"][0])
    hf_config = cls.config_class.from_dict({k: v for k, v in config.items() if k != "quantization_config"})
    with no_init_weights():  # every weight comes from the checkpoint
        model = cls._from_config(hf_config, dtype=dtype)
    names = reader.quantized_layers(tensors)
    for name in names:
        old = model.get_submodule(name) if _has_module(model, name) else None
        if old is None or not is_linear(old):
            raise ValueError(f"checkpoint holds packed layer {name}, which {cls.__name__} has no linear for")
        q = reader.read_layer(tensors, name, scheme, *_shape(old))
        if (q.bias is None) != (old.bias is None):
            raise ValueError(
                f"layer {name}: the checkpoint {'lacks' if q.bias is None else 'holds'} a bias the model {'has' if q.bias is None else 'lacks'}"
            )
        if q.bias is not None:
            q.bias = q.bias.to(dtype)
        model.set_submodule(name, q)

    rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    loaded = model.load_state_dict(rest, strict=False, assign=True)
    if loaded.unexpected_keys:
        raise ValueError(f"checkpoint holds tensor {loaded.unexpected_keys[0]}, which {cls.__name__} has no place for")
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in loaded.missing_keys if k not in tied and k.rpartition(".")[0] not in names]
    if missing:
        raise ValueError(f"checkpoint lacks tensor {missing[0]} ({len(missing)} missing); copy the complete checkpoint")
    model.tie_weights()
    device = torch.device(device)
    if device.type == "cuda" and not triton_available():
        log.warning(
            "triton is not installed: packed layers run torch unpack + dequantize + matmul on CUDA, without the fused "
            "W4A16 kernel; pip install 'blockquant[gpu]' for it"
        )
    return model.eval().to(device)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def load_model_any(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Model and tokenizer of a plain or a packed directory (for ``blockquant eval``), with the
    activation quantization its ``blockquant.json`` records put back on (``activations.restore``)."""
    if not is_packed(model_dir):
        model, tokenizer = load_model(model_dir, dtype)
    else:
        model = load(model_dir, dtype)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as e:  # tokenizers raise many types for a broken directory
            raise ValueError(f"cannot load a tokenizer from {model_dir}: {type(e).__name__}: {e}".splitlines()[0]) from None
    record_file = Path(model_dir) / RECORD_FILE
    act = json.loads(record_file.read_text()).get("activations") if record_file.is_file() else None
    if act:
        n = activations.restore(model, act, model_dir)
        log.info("activations quantized as recorded (%s bits, per %s) on %d linears", act["bits"], act["granularity"], n)
    return model, tokenizer
