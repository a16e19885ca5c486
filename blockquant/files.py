"""Reading models and calibration text, and writing outputs atomically.

Every user mistake becomes a ``ValueError`` whose message says what is wrong and how to fix
it; the CLI prints it as one line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from blockquant.arch import ARCHITECTURES

log = logging.getLogger(__name__)

RECORD_FILE = "blockquant.json"


def model_class_name(model_dir: str | Path) -> str:
    """The architecture named in ``config.json``, checked against the supported tables."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"model directory {path} {'is a file, not a directory' if path.exists() else 'does not exist'}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory: it has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    names = config.get("architectures") if isinstance(config, dict) else None
    if not names or not isinstance(names, list):
        raise ValueError(f"{config_file} names no 'architectures'; cannot tell which model class to load")
    if names[0] not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {names[0]}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return names[0]


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Model (in ``dtype``, on CPU, eval mode) and tokenizer from a local directory."""
    cls = getattr(transformers, model_class_name(model_dir))
    try:
        model = cls.from_pretrained(str(model_dir), dtype=dtype)
    except Exception as e:  # transformers raises many types for a broken checkpoint
        raise ValueError(f"cannot load the model in {model_dir}: {type(e).__name__}: {e}".splitlines()[0]) from None
    return model.eval(), load_tokenizer(model_dir)


def load_tokenizer(model_dir: str | Path) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {model_dir}: {type(e).__name__}: {e}".splitlines()[0]) from None


def windows(ids: Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:
    """Non-overlapping ``seqlen`` windows of a 1-D token stream (remainder dropped): (W, seqlen)."""
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)


def read_text(path: str | Path, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} file {p} {'is a directory, not a file' if p.is_dir() else 'does not exist'}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} file {p} is not UTF-8 text") from None
    if not text.strip():
        raise ValueError(f"{what} file {p} is empty")
    control = sum(1 for c in text if ord(c) < 32 and c not in "\t\n\r\f\v")
    if control > 0.01 * len(text):  # NUL bytes and the like: a binary file read as text, not text to learn from
        raise ValueError(f"{what} file {p} is not text: {control} of its {len(text)} characters are control characters (e.g. NUL bytes)")
    return text


def tokenize_stream(tokenizer: Any, text: str) -> Tensor:
    """The whole text as one 1-D token stream (no length limit, no warning about it)."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def load_calibration(
    path: str | Path, tokenizer: Any, nsamples: int, seqlen: int, seed: int = 0, encoder: bool = False, paragraphs: bool = False
) -> Tensor | list[Tensor]:
    """``nsamples`` random non-overlapping ``seqlen``-token samples of a text file: (N, seqlen)
    (see ``calibration_samples``); with ``paragraphs``, whole paragraphs of at most ``seqlen``
    tokens holding ``nsamples × seqlen`` tokens in all (see ``calibration_paragraphs``)."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"--nsamples must be >= 1 and --seqlen >= 2, got {nsamples} and {seqlen}")
    text, source = read_text(path, "calibration"), f"calibration file {path}"
    if paragraphs:
        return calibration_paragraphs(tokenizer, text, nsamples * seqlen, seqlen, seed, source)
    return calibration_samples(tokenizer, text, nsamples, seqlen, seed, encoder, source)


GENERATION_TEMPERATURE = 1.0  # self-generated calibration samples the model's own distribution, unsharpened


@torch.no_grad()
def generate_calibration(
    model: nn.Module,
    samples: Tensor,
    prompt_tokens: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    progress: bool = False,
    continuations: int = 1,
) -> Tensor:
    """Self-generated calibration (LLM-QAT's data-free idea): keep the first ``prompt_tokens`` of
    each row of ``samples`` (N, seqlen) and sample the rest from the full-precision ``model`` at
    temperature 1, with a KV cache. Same shape, same token budget; with ``continuations`` R > 1,
    each prompt is continued R times: (R·N, seqlen), the rows of one prompt adjacent, so that the
    held-out batches at the end hold prompts that no training window starts with.

    Why: a calibration file is often training text, where the full-precision model's outputs carry
    what it memorised; its own samples are what it actually predicts (docs/results.md measures
    both). With R > 1 there can be more windows than the file holds, so fine-tuning reads each
    window once or twice, not over ten times.
    Tokens are drawn on the CPU from one generator seeded with ``seed``, batch after batch, so the
    result depends on ``seed`` and ``batch_size`` but not on ``device``. The whole model sits on
    ``device`` while it generates (it goes back where it was afterwards).
    """
    if samples.dim() != 2:
        raise ValueError("generated calibration needs fixed-length windows, not paragraphs")
    length = samples.shape[1]
    if not 1 <= prompt_tokens < length:
        raise ValueError(f"--calib-generate must be in [1, {length - 1}] (real tokens kept per {length}-token window), got {prompt_tokens}")
    if continuations < 1:
        raise ValueError(f"--calib-continuations must be >= 1 (generated windows per prompt), got {continuations}")
    gen = torch.Generator().manual_seed(seed)
    home = next(model.parameters()).device
    model.eval().to(device)
    out = samples.repeat_interleave(continuations, dim=0)  # a copy; the prompts stay, every later column is overwritten by a draw
    bar = tqdm(total=out.shape[0] * (length - prompt_tokens), desc="generating calibration", unit="tok", disable=not progress)
    try:
        for ids in out.split(batch_size):  # views: writing a column fills ``out``
            step = model(ids[:, :prompt_tokens].to(device), use_cache=True)
            for t in range(prompt_tokens, length):
                probs = torch.softmax(step.logits[:, -1].float() / GENERATION_TEMPERATURE, dim=-1).cpu()
                ids[:, t] = torch.multinomial(probs, 1, generator=gen)[:, 0]
                bar.update(ids.shape[0])
                if t + 1 < length:
                    step = model(ids[:, t : t + 1].to(device), past_key_values=step.past_key_values, use_cache=True)
    finally:
        bar.close()
        model.to(home)
    return out


def split_paragraphs(text: str) -> list[str]:
    """The text's paragraphs: blocks separated by a blank line, stripped, empty ones dropped."""
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def calibration_paragraphs(
    tokenizer: Any, text: str, ntokens: int, max_len: int, seed: int = 0, source: str = "calibration text"
) -> list[Tensor]:
    """Whole paragraphs of ``text`` in random order, each tokenized as the model is called on it
    (the tokenizer's special tokens included: ``[CLS] … [SEP]`` for BERT) and truncated by the
    tokenizer to ``max_len`` tokens (keeping ``[SEP]``), until they hold ``ntokens`` tokens: a list
    of 1-D id tensors of varying length.

    A sentence encoder is called on sentences and paragraphs, not on fixed-length cuts of a
    token stream: in a short input ``[CLS]``/``[SEP]`` weigh more in the mean-pooled embedding
    and attention spreads over few positions. Calibrating on the same shape of input is what
    the quantizer should see (docs/results.md measures both on all-MiniLM-L6-v2).
    """
    if ntokens < 1 or max_len < 2:
        raise ValueError(f"need a token budget >= 1 and a paragraph length >= 2, got {ntokens} and {max_len}")
    found = split_paragraphs(text)
    if not found:
        raise ValueError(f"{source} has no paragraphs (blocks of text separated by blank lines)")
    order = torch.randperm(len(found), generator=torch.Generator().manual_seed(seed)).tolist()
    samples, total = [], 0
    for i in order:
        # The tokenizer's own truncation keeps the closing special token ([SEP]), as the model is called.
        ids = torch.tensor(tokenizer(found[i], truncation=True, max_length=max_len, verbose=False)["input_ids"], dtype=torch.long)
        if ids.numel() < 2:  # a paragraph of a lone special token says nothing
            continue
        samples.append(ids)
        total += ids.numel()
        if total >= ntokens:
            break
    if total < ntokens:
        log.warning(
            "%s holds only %d tokens in %d paragraphs (%d requested; paragraphs are separated by blank lines and each is "
            "truncated at %d tokens); proceeding with them",
            source,
            total,
            len(samples),
            ntokens,
            max_len,
        )
    if not samples:
        raise ValueError(f"{source} has no paragraph of 2 tokens or more")
    return samples


def calibration_samples(
    tokenizer: Any, text: str, nsamples: int, seqlen: int, seed: int = 0, encoder: bool = False, source: str = "calibration text"
) -> Tensor:
    """``nsamples`` random non-overlapping ``seqlen``-token windows of ``text``: (N, seqlen).

    ``encoder``: where the tokenizer has CLS and SEP tokens (BERT-style), each sample is
    ``[CLS] + (seqlen − 2) tokens + [SEP]``, the shape of one input the encoder is called on,
    rather than a cut through the middle of the token stream.
    A text too short for ``nsamples`` windows gives fewer, with a warning; one too short for
    a single window is an error.
    """
    frame = encoder and tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None
    if seqlen < 2 + 2 * frame:
        raise ValueError(f"--seqlen must be >= {2 + 2 * frame}, got {seqlen}")
    head = tail = torch.zeros(0, dtype=torch.long)
    if frame:
        head, tail = torch.tensor([tokenizer.cls_token_id]), torch.tensor([tokenizer.sep_token_id])
        ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    else:
        ids = tokenize_stream(tokenizer, text)
    chunks = windows(ids, seqlen - head.numel() - tail.numel())
    if chunks.shape[0] == 0:
        raise ValueError(f"{source} has {ids.numel()} tokens, fewer than one sample of {seqlen}; use a longer file or a smaller --seqlen")
    if chunks.shape[0] < nsamples:
        log.warning(
            "%s yields only %d samples of %d tokens (%d requested); proceeding with %d",
            source,
            chunks.shape[0],
            seqlen,
            nsamples,
            chunks.shape[0],
        )
    order = torch.randperm(chunks.shape[0], generator=torch.Generator().manual_seed(seed))
    chosen = chunks[order[:nsamples]]
    n = chosen.shape[0]
    return torch.cat([head.expand(n, -1), chosen, tail.expand(n, -1)], dim=1)


def trained_length(model_dir: str | Path) -> int | None:
    """The longest input a sentence-transformers model runs on (``max_seq_length`` of its
    ``sentence_bert_config.json``), or None: calibrating on longer samples shows the quantizer
    positions and statistics the model never produces in use."""
    path = Path(model_dir) / "sentence_bert_config.json"
    try:
        value = json.loads(path.read_text()).get("max_seq_length") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


def warn_calibration_length(model_dir: str | Path, seqlen: int) -> None:
    limit = trained_length(model_dir)
    if limit is not None and seqlen > limit:
        log.warning(
            "--seqlen %d is longer than the %d tokens this sentence-transformers model runs on (sentence_bert_config.json): "
            "calibration samples that long look unlike its inputs; use --seqlen %d or less (and more samples for the same tokens)",
            seqlen,
            limit,
            limit,
        )


def check_output_dir(out_dir: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse, before any work is done, an output that exists (without ``overwrite``), that would
    replace one of the run's ``inputs`` or the working directory, or whose parent cannot be written."""
    out = Path(out_dir)
    target, cwd = out.resolve(), Path.cwd().resolve()
    for path in inputs:
        if target == Path(path).resolve() or target in Path(path).resolve().parents:
            raise ValueError(f"--output {out} would replace {path}, an input of this run; choose another --output")
    if target == cwd or target in cwd.parents:
        raise ValueError(f"--output {out} is the working directory or holds it; name a new directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} exists and is a file, not a directory")
    if out.exists() and not overwrite:
        raise ValueError(f"output directory {out} exists; choose another --output or pass --overwrite")
    if not target.parent.is_dir():
        raise ValueError(f"the parent directory of --output {out} does not exist")
    try:  # the output is written as a sibling temporary directory, then renamed: that must be possible
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=target.parent))
    except OSError as e:
        raise ValueError(f"cannot write --output {out}: {target.parent} does not accept a new directory ({e.strerror})") from None


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory and rename it to ``out_dir`` only on success.

    An error or interrupt removes the temporary directory: nothing half-written is left.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_quantized(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    record: dict[str, Any],
    overwrite: bool = False,
    extra_tensors: dict[str, dict[str, Tensor]] | None = None,
) -> Path:
    """A plain Hugging Face directory (dequantized weights) plus ``blockquant.json``.

    The record is kept out of ``config.json`` on purpose: a ``quantization_config`` there
    would tell runtimes to expect packed integer weights, which this layout does not hold.
    ``extra_tensors`` are further safetensors files (file name → tensors) written beside it.
    """
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, tensors in (extra_tensors or {}).items():
            save_file(tensors, str(tmp / name))
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))
    return Path(out_dir)
