"""Metrics: token-level perplexity and accuracies, batched and without gradients.

Every function takes any `nn.Module` that behaves like a transformers model (has `.config`,
returns `.logits`), so the same code scores dense, pruned, quantized and side-tuned models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from eval.errors import UserInputError, require_positive


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def model_context_length(model) -> int | None:
    """The longest sequence the model's positions allow, if its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def perplexity(model, tokenizer, texts: Sequence[str], block_size: int = 256, batch_size: int = 8,
               max_blocks: int | None = None) -> float:
    """Token-level perplexity of `texts`: exp of the mean NLL over every predicted token.

    The texts are packed (joined with EOS) into non-overlapping blocks of `block_size` tokens by
    `eval.data.pack_token_blocks`; within a block, each token after the first is predicted from
    the ones before it.
    """
    from eval.data import pack_token_blocks

    context = model_context_length(model)
    if context is not None and block_size > context:
        raise UserInputError(f"block_size={block_size} is longer than the model's context of {context} "
                             f"tokens; expected block_size <= {context}")
    blocks = pack_token_blocks(texts, tokenizer, block_size, max_blocks=max_blocks)
    return perplexity_of_blocks(model, blocks, batch_size=batch_size)


def perplexity_of_blocks(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Perplexity over already-packed token blocks `[n_blocks, block_size]`."""
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise UserInputError(f"expected token blocks of shape [n_blocks >= 1, block_size >= 2], got {tuple(blocks.shape)}")
    require_positive("batch_size", batch_size)
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)  # [B, T]
            logits = model(input_ids=batch).logits[:, :-1].float()  # [B, T-1, V]: predicts tokens 1..T-1
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for: LongTensor [len(tokenizer)]; special tokens stand
    for none. Byte-level BPE tokens are strings over a 256-symbol alphabet, one symbol per byte;
    other tokenizers are measured by decoding each token on its own."""
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
    lengths = [0 if i in special else len(t) if byte_level else len(tokenizer.convert_tokens_to_string([t]).encode())
               for i, t in enumerate(tokens)]
    return torch.tensor(lengths, dtype=torch.long)


def bits_per_byte_of_blocks(model, blocks: torch.Tensor, tokenizer, batch_size: int = 8) -> float:
    """Bits per UTF-8 byte over packed token blocks `[n_blocks, block_size]`: the summed negative
    log-likelihood of the predicted tokens (positions 1..T-1, as `perplexity_of_blocks`), in bits,
    over the bytes those tokens stand for. Unlike perplexity it does not depend on the tokenizer,
    so models with different vocabularies compare. The EOS between documents is predicted and
    counted in the numerator but stands for no byte: a slight, conservative overestimate."""
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise UserInputError(f"expected token blocks of shape [n_blocks >= 1, block_size >= 2], got {tuple(blocks.shape)}")
    token_bytes = token_byte_lengths(tokenizer)
    targets = blocks[:, 1:]
    n_bytes = int(token_bytes[targets].sum())
    if n_bytes == 0:
        raise UserInputError("the blocks stand for no text bytes; expected token blocks of real text")
    mean_nll = math.log(perplexity_of_blocks(model, blocks, batch_size))  # nats per predicted token
    return mean_nll * targets.numel() / (n_bytes * math.log(2))


def accuracy(predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Fraction of predictions equal to their labels."""
    predictions = torch.as_tensor(predictions).flatten()
    labels = torch.as_tensor(labels).flatten()
    if predictions.numel() != labels.numel():
        raise UserInputError(f"got {predictions.numel()} predictions for {labels.numel()} labels; expected equal counts")
    if labels.numel() == 0:
        raise UserInputError("accuracy of zero examples is undefined; expected at least one label")
    return float((predictions == labels).double().mean())


def continuation_log_likelihoods(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8,
                                 max_length: int | None = None) -> list[float]:
    """Sum of log P(continuation | context) for each (context, continuation) pair.

    The continuation's tokens are the tokens of `context + continuation` after those of
    `context` (so a tokenizer that merges across the boundary is handled). Sequences longer
    than `max_length` (default: the model's context) lose tokens from the left of the context.
    """
    max_length = max_length or model_context_length(model) or 2048
    sequences = [context_continuation_ids(tokenizer, ctx, cont, max_length) for ctx, cont in pairs]
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            target_mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, (ids, n_cont) in enumerate(chunk):  # right-padded
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
                target_mask[row, len(ids) - n_cont : len(ids)] = True
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, W-1, V] predicts 1..W-1
            targets = input_ids[:, 1:].to(device)
            token_lp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, W-1]
            scores.extend((token_lp * target_mask[:, 1:].to(device)).sum(dim=1).tolist())
    return scores


def context_continuation_ids(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    context_ids = tokenizer(context)["input_ids"]
    full_ids = tokenizer(context + continuation)["input_ids"]
    return split_continuation(context_ids, full_ids, max_length)


def split_continuation(context_ids: list[int], full_ids: list[int], max_length: int) -> tuple[list[int], int]:
    """(ids, n_continuation) from the tokens of the context and of context + continuation: the
    continuation is what follows their common prefix; long inputs lose tokens from the left."""
    common = 0
    if full_ids[: len(context_ids)] == context_ids:  # the usual case, compared in C
        common = min(len(context_ids), len(full_ids))
    while common < min(len(context_ids), len(full_ids)) and context_ids[common] == full_ids[common]:
        common += 1
    # At least one context token must remain to predict the first continuation token.
    common = max(1, min(common, len(full_ids) - 1))
    n_continuation = len(full_ids) - common
    if len(full_ids) > max_length:
        full_ids = full_ids[len(full_ids) - max_length :]
        n_continuation = min(n_continuation, max_length - 1)
    return full_ids, n_continuation


def multiple_choice_accuracy(model, tokenizer, examples: Sequence, batch_size: int = 8) -> float:
    """Accuracy of picking, per question, the choice with the highest summed log-likelihood."""
    if not examples:
        raise UserInputError("no multiple-choice examples to score; expected at least one")
    pairs = [(ex.question, _as_continuation(choice)) for ex in examples for choice in ex.choices]
    scores = continuation_log_likelihoods(model, tokenizer, pairs, batch_size=batch_size)
    predictions, start = [], 0
    for ex in examples:
        chunk = scores[start : start + len(ex.choices)]
        predictions.append(max(range(len(chunk)), key=chunk.__getitem__))
        start += len(ex.choices)
    return accuracy(predictions, [ex.answer for ex in examples])


def _as_continuation(choice: str) -> str:
    # The question ends where the answer starts: a separating space, as lm-eval does.
    return choice if choice[:1].isspace() else " " + choice


def classification_accuracy(model, tokenizer, examples: Sequence, batch_size: int = 8,
                            max_length: int = 256) -> float:
    """Accuracy of a sequence-classification model (`.logits` of shape [batch, num_labels])."""
    if not examples:
        raise UserInputError("no classification examples to score; expected at least one")
    device = model_device(model)
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            enc = tokenizer([ex.text for ex in chunk], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
            predictions.extend(logits.argmax(dim=-1).tolist())
    return accuracy(predictions, [ex.label for ex in examples])
