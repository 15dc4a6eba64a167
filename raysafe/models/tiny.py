"""Tiny random causal LMs and a byte-level tokenizer that covers every script, built in-process for tests.

Nothing here touches a hub: the tokenizer is a byte-level BPE with no merges (256 byte symbols + specials), so any
UTF-8 text in any script round-trips, and the models are randomly initialised from small configs of real
architectures (Llama, Gemma 3), so the code paths are the ones used on real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

# A minimal chat template in the style of Gemma's, so chat-template code paths are exercised in tests.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(padding_side: str = "right", chat_template: bool = False):
    """A byte-level ``PreTrainedTokenizerFast``: vocabulary = 3 specials + 256 bytes, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for sym in sorted(byte_symbols):
        vocab[sym] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side=padding_side,
    )
    if chat_template:
        fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_model(arch: str = "llama", *, num_layers: int = 4, hidden: int = 64, seed: int = 0, vocab_size: int = 259):
    """A randomly initialised causal LM of a real architecture (``llama`` or ``gemma3``) in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, num_layers=num_layers, hidden=hidden, vocab_size=vocab_size)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def tiny_config(arch: str = "llama", *, num_layers: int = 4, hidden: int = 64, vocab_size: int = 259):
    """The config behind :func:`tiny_model`."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(head_dim=hidden // 4, sliding_window=16, query_pre_attn_scalar=hidden // 4, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; use 'llama' or 'gemma3'")


def save_tiny(path: str | Path, arch: str = "llama", **kwargs) -> Path:
    """Write a tiny model and its tokenizer as a Hugging Face directory (safetensors) and return the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_model(arch, **kwargs).save_pretrained(path)
    tiny_tokenizer(chat_template=True).save_pretrained(path)
    return path


def save_tiny_mt(
    path: str | Path,
    arch: str = "m2m100",
    codes: list[str] = (),
    *,
    d_model: int = 32,
    layers: int = 1,
    seed: int = 0,
    never_stop: bool = False,
) -> Path:
    """Write a tiny random encoder-decoder MT model (``m2m100`` or ``marian`` config) with the byte-level tokenizer
    plus ``codes`` as special tokens (``__en__``, ``eng_Latn`` or ``>>zho<<``: the language tokens the real models
    use), as a Hugging Face directory; returns the path. ``never_stop`` (Marian only): a -1e4 logit bias on the
    special tokens, so greedy decoding never ends early and always writes text (fixed work for benchmarks)."""
    from transformers import AutoModelForSeq2SeqLM, M2M100Config, MarianConfig

    path = Path(path)
    tok = tiny_tokenizer()
    if codes:
        tok.add_special_tokens({"additional_special_tokens": list(codes)})
    common = dict(
        vocab_size=len(tok),
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "m2m100":
        config = M2M100Config(decoder_start_token_id=2, **common)
    elif arch == "marian":
        config = MarianConfig(decoder_start_token_id=0, decoder_vocab_size=len(tok), **common)
    else:
        raise ValueError(f"unknown tiny MT architecture {arch!r}; use 'm2m100' or 'marian'")
    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    if never_stop:
        if arch != "marian":
            raise ValueError("never_stop needs the marian architecture (its final_logits_bias)")
        with torch.no_grad():
            model.final_logits_bias[:, tok.all_special_ids] = -1e4
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


if __name__ == "__main__":  # python -m raysafe.models.tiny DIR [llama|gemma3]
    import sys

    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m raysafe.models.tiny DIR [llama|gemma3]  — write a tiny random model + tokenizer to DIR")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    print(save_tiny(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "llama"))
