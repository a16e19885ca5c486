"""Evaluation (DESIGN.md §5): perplexity of causal LMs on held-out text, embedding fidelity of
encoders to their full-precision reference, Dice of segmentation networks. ``METRICS`` says which
a model kind is judged by; ``text_metric`` computes it for a transformer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from blockquant import dist
from blockquant.files import split_paragraphs, tokenize_stream, windows

METRICS = {"causal-lm": "perplexity", "encoder": "cosine", "network": "dice"}  # what each kind of model is judged by


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: Tensor,
    seqlen: int = 512,
    max_windows: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """``exp`` of the mean next-token NLL over non-overlapping windows (shared/README.md).

    Under several processes each takes its share of the windows; the NLL sums and token counts
    are added up over the processes, and every process returns the same perplexity.
    """
    chunks = windows(ids, seqlen, max_windows)
    if chunks.shape[0] == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    model.eval().to(device)
    total, count = 0.0, 0
    for batch in tqdm(dist.shard(chunks).split(batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    if dist.world_size() > 1:
        total, count = dist.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
    return math.exp(total / count)


@torch.no_grad()
def mean_pooled_embeddings(model: nn.Module, batches: list[dict[str, Tensor]], device: str | torch.device = "cpu") -> Tensor:
    """Sentence embeddings as sentence-transformers computes them: mask-weighted token mean."""
    model.eval().to(device)
    out = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = model(**batch).last_hidden_state.float()  # (B, T, C)
        mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
    return torch.cat(out)


def embedding_cosine(quantized: Tensor, reference: Tensor) -> float:
    """Mean cosine between matching rows of two embedding matrices."""
    return float(F.cosine_similarity(quantized, reference, dim=-1).mean())


def paragraph_batches(tokenizer, paragraphs: list[str], max_length: int = 128, batch_size: int = 32) -> list[dict[str, Tensor]]:
    """Tokenized, padded batches of paragraphs for an encoder."""
    batches = []
    for i in range(0, len(paragraphs), batch_size):
        enc = tokenizer(paragraphs[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


@torch.no_grad()
def segment(model: nn.Module, x: Tensor, roi: tuple[int, ...] | None = None, overlap: float = 0.25) -> Tensor:
    """Predicted labels ``(B, *S)`` of volumes ``(B, C, *S)``; MONAI's sliding window when ``roi`` is given
    (volumes larger than memory allows, or sizes the network cannot take whole)."""
    model.eval()
    if roi is None:
        return model(x).argmax(1)
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(x, roi, 1, model, overlap=overlap).argmax(1)


def dice_per_class(pred: Tensor, labels: Tensor, classes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Dice of each named region (a set of labels, e.g. liver = labels 1 and 2) with MONAI's ``DiceMetric``."""
    from monai.metrics import DiceMetric

    def regions(t: Tensor) -> Tensor:  # (B, n_classes, *S) binary masks
        return torch.stack([torch.isin(t, torch.tensor(v, device=t.device)) for v in classes.values()], dim=1).float()

    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    scores = metric(regions(pred), regions(labels)).mean(0)  # (n_classes,)
    return {name: float(s) for name, s in zip(classes, scores)}


def text_metric(
    model: nn.Module,
    tokenizer,
    text: str,
    kind: str,
    *,
    reference: nn.Module | Tensor | None = None,
    seqlen: int = 512,
    max_length: int = 512,
    max_windows: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[float, int]:
    """A transformer's metric on ``text`` and how many units it covered: for a causal LM the
    perplexity over ``seqlen``-token windows; for an encoder the mean cosine of its mean-pooled
    embeddings of the text's paragraphs (each at most ``max_length`` tokens) to ``reference``'s
    (a model, or its embeddings of the same paragraphs)."""
    if METRICS.get(kind) == "cosine":
        if reference is None:
            raise ValueError("an encoder has no perplexity: its metric is the embedding cosine to a full-precision reference")
        paragraphs = split_paragraphs(text)[:max_windows]
        batches = paragraph_batches(tokenizer, paragraphs, max_length=max_length)
        ref = reference if isinstance(reference, Tensor) else mean_pooled_embeddings(reference, batches, device)
        return embedding_cosine(mean_pooled_embeddings(model, batches, device), ref), len(paragraphs)
    if METRICS.get(kind) != "perplexity":
        raise ValueError(f"no text metric for a {kind} model; known kinds: causal-lm, encoder")
    ids = tokenize_stream(tokenizer, text)
    ppl = perplexity(model, ids, seqlen=seqlen, max_windows=max_windows, device=device, batch_size=batch_size, progress=progress)
    return ppl, min(ids.numel() // seqlen, max_windows or 10**12)
