"""Tiny random models for fast tests.

Two tokenizers are trained in a fraction of a second on WikiSplit text: ``byte_bpe``
(byte-level BPE, adds no BOS, like SmolLM2) and ``meta_bpe`` (SentencePiece-style
Metaspace BPE that adds a BOS, like Gemma). Models have distinct, non-square sizes so
that a transposed matrix cannot pass a test by accident.
"""

from pathlib import Path

import jaxtyping
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from contrans_tl.data import wikisplit_sentences
from contrans_tl.models import boot_bridge

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def _train_tokenizer(kind: str, folder: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    lines = (
        wikisplit_sentences(600)
        + [
            "Scenario: The emotion of the above scenario is happiness sadness anger fear "
            "disgust surprise."
        ]
        * 20
    )
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "byte_bpe":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.post_processor = processors.ByteLevel(trim_offsets=True)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tk.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet
    )
    tk.train_from_iterator(lines, trainer)
    if kind == "meta_bpe":
        bos = tk.token_to_id("<bos>")
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return _train_tokenizer("byte_bpe", tmp_path_factory.mktemp("byte_tok"), 700)


@pytest.fixture(scope="session")
def meta_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return _train_tokenizer("meta_bpe", tmp_path_factory.mktemp("meta_tok"), 900)


def tiny_llama_hf(
    tokenizer, *, d_model: int = 48, n_layers: int = 3, seed: int = 0, n_ctx: int = 2048
):
    """An un-booted Hugging Face tiny Llama (booting wraps the HF model in place)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model + 8,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=n_ctx,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    return model


def tiny_llama(
    tokenizer,
    *,
    d_model: int = 48,
    n_layers: int = 3,
    seed: int = 0,
    name: str,
    n_ctx: int = 2048,
):
    model = tiny_llama_hf(tokenizer, d_model=d_model, n_layers=n_layers, seed=seed, n_ctx=n_ctx)
    return boot_bridge(model, tokenizer, model_id=name)


def tiny_gemma3_hf(tokenizer, *, d_model: int = 40, n_layers: int = 5, seed: int = 1):
    """An un-booted Hugging Face tiny Gemma 3."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=72,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        sliding_window=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Gemma3ForCausalLM(cfg).eval()
    model.config.architectures = ["Gemma3ForCausalLM"]
    return model


def tiny_gemma3(tokenizer, *, d_model: int = 40, n_layers: int = 5, seed: int = 1, name: str):
    model = tiny_gemma3_hf(tokenizer, d_model=d_model, n_layers=n_layers, seed=seed)
    return boot_bridge(model, tokenizer, model_id=name)


@pytest.fixture(scope="session")
def small_llama(byte_tokenizer):
    """Source-like model: 3 layers x 48, byte-level tokenizer without BOS."""
    return tiny_llama(byte_tokenizer, d_model=48, n_layers=3, seed=0, name="tiny-llama-48")


@pytest.fixture(scope="session")
def wide_llama(byte_tokenizer):
    """Same tokenizer as small_llama, 4 layers x 80."""
    return tiny_llama(byte_tokenizer, d_model=80, n_layers=4, seed=2, name="tiny-llama-80")


@pytest.fixture(scope="session")
def small_gemma(meta_tokenizer):
    """Target-like model: 5 layers x 40, Metaspace tokenizer that adds BOS."""
    return tiny_gemma3(meta_tokenizer, name="tiny-gemma3-40")


@pytest.fixture(scope="session")
def folders(tmp_path_factory, byte_tokenizer, meta_tokenizer):
    """[source, target] as Hugging Face folders (tiny Llama, tiny Gemma 3), for the
    commands and scripts that load models by path; read only."""
    base = tmp_path_factory.mktemp("tiny_model_folders")
    out = []
    for name, model, tok in (
        ("src", tiny_llama_hf(byte_tokenizer), byte_tokenizer),
        ("tgt", tiny_gemma3_hf(meta_tokenizer), meta_tokenizer),
    ):
        model.save_pretrained(base / name)
        tok.save_pretrained(base / name)
        out.append(str(base / name))
    return out


@pytest.fixture
def as_users_run_it():
    """The test suite runs contrans_tl under a runtime type checker (beartype through
    jaxtyping's import hook), which would answer many of these inputs before our own
    checks do. Users run without it: switch it off, so the messages tested are theirs."""
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)
