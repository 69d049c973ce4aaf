"""How a document starts under a model's tokenizer: the token datastore build, evaluation and the
fidelity check must all put the same token in front of a document, or build-time keys and serving
hidden states stop matching."""

from __future__ import annotations


def document_start_ids(tokenizer) -> list[int]:
    """The token a document starts after: what the tokenizer prepends by itself, else GPT-2-style
    <|endoftext|> (SmolLM2's document separator; its BOS is the chat token <|im_start|>), else
    the BOS token (Gemma's <bos>, without which it emits garbage)."""
    automatic = tokenizer("", add_special_tokens=True)["input_ids"]
    if automatic:
        return list(automatic)
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return [vocab["<|endoftext|>"]]
    if tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id]
    raise ValueError("the tokenizer has no BOS or end-of-text token to start a document with")
