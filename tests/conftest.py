"""Shared fixtures: tiny random models built from configs (no hub), a saved model + tokenizer.

Every model is built with ``torch.manual_seed(0)``: hidden 64, 2 layers, 4 heads, vocab 256.
Llama and GPT-2 use an MLP width of 172, which no group size of 32 or 128 divides, so the
ragged last group is exercised end to end.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
import transformers
from torch import Tensor

from blockquant.primitives import group_width
from blockquant.recipe import QuantSpec

# Tiny ops are dominated by thread start-up on a 2-core box; one thread is also deterministic.
torch.set_num_threads(1)

VOCAB = 256
HIDDEN = 64
RAGGED_FFN = 172  # 172 = 5·32 + 12 = 128 + 44: ragged last group for g32 and g128

# Mistral and Qwen2 share one grouped-query-attention shape.
GQA_KWARGS = dict(
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)

# Every architecture blockquant supports, built tiny: (config class, model class, config kwargs).
TINY = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            hidden_size=HIDDEN,
            intermediate_size=RAGGED_FFN,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
        ),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        GQA_KWARGS,
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        GQA_KWARGS,
    ),
    "opt": (
        transformers.OPTConfig,
        transformers.OPTForCausalLM,
        dict(
            hidden_size=HIDDEN,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            word_embed_proj_dim=HIDDEN,
        ),
    ),
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        dict(
            n_embd=HIDDEN,
            n_inner=RAGGED_FFN,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=128,
            bos_token_id=VOCAB - 1,
            eos_token_id=VOCAB - 1,
        ),
    ),
    "bert": (
        transformers.BertConfig,
        transformers.BertModel,
        dict(
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=128,
        ),
    ),
}
ARCH_NAMES = list(TINY)


def build_tiny(name: str) -> torch.nn.Module:
    """A fresh tiny random model of family ``name`` (seeded: the same weights every call)."""
    config_cls, model_cls, kwargs = TINY[name]
    torch.manual_seed(0)
    return model_cls(config_cls(**kwargs)).eval()


@pytest.fixture
def make_tiny():
    """Factory fixture: ``make_tiny("llama")`` builds a fresh tiny model."""
    return build_tiny


@pytest.fixture(params=ARCH_NAMES)
def tiny_model(request) -> tuple[str, torch.nn.Module]:
    """(family name, fresh tiny model), once per supported architecture."""
    return request.param, build_tiny(request.param)


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return build_tiny("llama")


@pytest.fixture
def calib_ids() -> Tensor:
    """Calibration token ids (8 samples × 32 tokens), independent of the model seed."""
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def eval_ids() -> Tensor:
    """Held-out token ids, different from the calibration ones."""
    return torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))


# --------------------------------------------------------------------------------------------
# A saved model directory + tokenizer for the CLI (built without the hub)

WORDS = [f"w{i}" for i in range(60)] + ["the", "a", "of", "and", "to", "in", "is", "it"]


def make_text(n_words: int, seed: int = 0) -> str:
    """Deterministic text of exactly ``n_words`` whitespace-separated vocabulary words."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return "\n".join(" ".join(words[i : i + 12]) for i in range(0, n_words, 12)) + "\n"


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer trained on text of the vocabulary: one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    lines = [" ".join(WORDS)] + make_text(600, seed=123).splitlines()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]", "[PAD]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    assert len(fast) <= VOCAB
    return fast


def save_tiny(name: str, path: Path, mutate=None) -> Path:
    """Save a tiny model of family ``name`` (optionally ``mutate(model)`` first) + tokenizer."""
    model = build_tiny(name)
    if mutate is not None:
        with torch.no_grad():
            mutate(model)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer. Shared by the CLI tests: never write into it."""
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def calib_file(tmp_path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(make_text(600, seed=1))
    return p


def subprocess_env() -> dict[str, str]:
    """Environment for child Pythons: one thread, no colour / progress noise."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


# --------------------------------------------------------------------------------------------
# Grid checks shared by the primitive, GPTQ and model tests


def column_groups(spec: QuantSpec, in_features: int, g_idx: Tensor | None) -> Tensor:
    """The group index of each input column: ``g_idx`` if given, else contiguous groups."""
    if g_idx is not None:
        return g_idx.long()
    if spec.per_tensor:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // group_width(spec, in_features)


def assert_on_grid(w_hat: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec, g_idx: Tensor | None = None) -> None:
    """Every ``ŵ[r, c]`` is exactly ``s·(q − z)`` for an integer code q in [qmin, qmax] of its group."""
    w_hat = w_hat.float()
    out, cols = w_hat.shape
    groups = column_groups(spec, cols, g_idx)
    assert groups.shape == (cols,)
    assert int(groups.min()) >= 0 and int(groups.max()) < scale.shape[1]
    s = scale.float()[:, groups].expand(out, cols)
    z = zero.float()[:, groups].expand(out, cols)
    assert torch.equal(z, torch.round(z)), "zero points must be integers"
    q_real = w_hat / s + z
    q = torch.round(q_real)
    assert (q_real - q).abs().max() < 1e-3, "a weight lies between two grid points"
    assert q.min() >= spec.qmin and q.max() <= spec.qmax, f"codes outside [{spec.qmin}, {spec.qmax}]"
    assert torch.equal(s * (q - z), w_hat), "weight is not exactly s·(q − z)"


def packable_llama(tie: bool = False, dtype: torch.dtype = torch.float32) -> transformers.LlamaForCausalLM:
    """Every width a multiple of 32 and of 64, so that both formats can hold g32 / g64 / -1.

    Built in ``dtype`` as ``from_pretrained`` would (``.to(bf16)`` would also round the rotary
    buffers, which a loaded model keeps in fp32)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    if dtype != torch.float32:
        return transformers.LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    return transformers.LlamaForCausalLM(config).eval()
