"""Metrics: token-level perplexity and accuracies, batched and without gradients.

Every function takes any `nn.Module` that behaves like a transformers model (has `.config`,
returns `.logits`), so the same code scores dense, pruned, quantized and side-tuned models.
"""

from __future__ import annotations

import dataclasses
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

    Consecutive pairs with the same context (a question's candidates) share one forward pass of
    it: the context runs once with the model's key/value cache, and only each candidate's own
    tokens run after it, so scoring k candidates costs about one pass, not k. `batch_size`
    counts contexts. A model that keeps no cache has every pair run whole.
    """
    require_positive("batch_size", batch_size)
    max_length = max_length or model_context_length(model) or 2048
    sequences = _tokenized_pairs(tokenizer, pairs, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        groups = shared_prefix_groups(pairs, sequences)
        scores: list[float] = [0.0] * len(sequences)
        for start in range(0, len(groups), batch_size):
            chunk = groups[start : start + batch_size]
            chunk_scores = _score_after_shared_prefixes(model, chunk, pad)
            if chunk_scores is None:  # no cache came back: run every pair whole
                return _score_whole_sequences(model, sequences, pad, batch_size)
            for group, group_scores in zip(chunk, chunk_scores):
                for (index, _, _), score in zip(group.tails, group_scores):
                    scores[index] = score
    return scores


def _tokenized_pairs(tokenizer, pairs, max_length: int) -> list[tuple[list[int], int]]:
    """`context_continuation_ids` of every pair, tokenizing each distinct context once."""
    context_ids: dict[str, list[int]] = {}
    sequences = []
    for context, continuation in pairs:
        if context not in context_ids:
            context_ids[context] = tokenizer(context)["input_ids"]
        full_ids = tokenizer(context + continuation)["input_ids"]
        sequences.append(split_continuation(context_ids[context], full_ids, max_length))
    return sequences


@dataclasses.dataclass
class PrefixGroup:
    """Pairs that share their first tokens: `prefix` (token ids) runs once; each of `tails`,
    (pair index, the ids after the prefix, how many of their last ids are scored), runs after it."""

    prefix: list[int]
    tails: list[tuple[int, list[int], int]]


def shared_prefix_groups(pairs, sequences: list[tuple[list[int], int]]) -> list[PrefixGroup]:
    """Group consecutive pairs with the same context by the longest token prefix they share that
    ends before any scored token. Pairs whose tokens share no prefix (a left truncation that cut
    them differently) each get their own group."""
    groups: list[PrefixGroup] = []
    start = 0
    while start < len(pairs):
        end = start + 1
        while end < len(pairs) and pairs[end][0] == pairs[start][0]:
            end += 1
        members = list(range(start, end))
        shared = min(len(sequences[i][0]) - sequences[i][1] for i in members)  # >= 1: split_continuation
        first = sequences[start][0]
        for i in members[1:]:
            ids = sequences[i][0]
            common = 0
            while common < shared and ids[common] == first[common]:
                common += 1
            shared = common
        if shared == 0:
            groups.extend(_own_group(i, *sequences[i]) for i in members)
        else:
            groups.append(PrefixGroup(first[:shared], [(i, sequences[i][0][shared:], sequences[i][1]) for i in members]))
        start = end
    return groups


def _own_group(index: int, ids: list[int], n_scored: int) -> PrefixGroup:
    cut = len(ids) - n_scored
    return PrefixGroup(ids[:cut], [(index, ids[cut:], n_scored)])


def _score_after_shared_prefixes(model, groups: list[PrefixGroup], pad: int) -> list[list[float]] | None:
    """Scores of each group's tails: the prefixes run as one left-padded batch with the cache on,
    the cache is copied once per tail, and the tails run as one right-padded batch after it.
    None when the model returns no cache."""
    device = model_device(model)
    width = max(len(g.prefix) for g in groups)
    prefix_ids = torch.full((len(groups), width), pad, dtype=torch.long)
    prefix_mask = torch.zeros((len(groups), width), dtype=torch.long)
    for row, group in enumerate(groups):  # left-padded: every prefix ends at the last column
        prefix_ids[row, width - len(group.prefix) :] = torch.tensor(group.prefix)
        prefix_mask[row, width - len(group.prefix) :] = 1
    positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
    cache_name = _cache_keyword(model)
    out = model(input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device),
                position_ids=positions.to(device), use_cache=True, **_last_logits_only(model))
    cache = out.get("cache", None)
    if cache is None:
        cache = out.get("past_key_values", None)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    last_logits = out.logits[:, -1]  # [G, V]: predicts each tail's first token

    tails = [(row, tail, n_scored) for row, group in enumerate(groups) for _, tail, n_scored in group.tails]
    owner = torch.tensor([row for row, _, _ in tails])  # [T]: the prefix row of each tail
    cache.batch_select_indices(owner.to(device))
    tail_width = max(len(tail) for _, tail, _ in tails)
    tail_ids = torch.full((len(tails), tail_width), pad, dtype=torch.long)
    tail_mask = torch.zeros((len(tails), tail_width), dtype=torch.long)
    scored = torch.zeros((len(tails), tail_width), dtype=torch.bool)
    for row, (_, tail, n_scored) in enumerate(tails):  # right-padded after the prefix
        tail_ids[row, : len(tail)] = torch.tensor(tail)
        tail_mask[row, : len(tail)] = 1
        scored[row, len(tail) - n_scored : len(tail)] = True
    tail_positions = prefix_mask.sum(-1)[owner, None] + torch.arange(tail_width)  # [T, W]
    attention = torch.cat([prefix_mask[owner], tail_mask], dim=1)  # [T, P + W]
    tail_logits = model(input_ids=tail_ids.to(device), attention_mask=attention.to(device),
                        position_ids=tail_positions.to(device), use_cache=True, **{cache_name: cache}).logits
    # Tail token j is predicted by tail position j - 1, and token 0 by the prefix's last position.
    predictors = torch.cat([last_logits[owner.to(device)].unsqueeze(1), tail_logits[:, :-1]], dim=1)  # [T, W, V]
    where = scored.to(device)
    token_lp = torch.log_softmax(predictors[where].float(), dim=-1)  # [n scored, V]: only where needed
    token_lp = token_lp.gather(-1, tail_ids.to(device)[where].unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(len(tails), dtype=torch.float32, device=device).index_add_(0, where.nonzero()[:, 0], token_lp)
    sums = sums.tolist()
    result, next_tail = [], 0
    for group in groups:
        result.append(sums[next_tail : next_tail + len(group.tails)])
        next_tail += len(group.tails)
    return result


def _score_whole_sequences(model, sequences: list[tuple[list[int], int]], pad: int, batch_size: int) -> list[float]:
    """Scores with every (context + continuation) run as its own right-padded row."""
    device = model_device(model)
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        target_mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, (ids, n_cont) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            target_mask[row, len(ids) - n_cont : len(ids)] = True
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        where = target_mask[:, 1:].to(device)  # position s predicts token s + 1
        token_lp = torch.log_softmax(logits[:, :-1][where].float(), dim=-1)
        token_lp = token_lp.gather(-1, input_ids[:, 1:].to(device)[where].unsqueeze(-1)).squeeze(-1)
        sums = torch.zeros(len(chunk), dtype=torch.float32, device=device).index_add_(0, where.nonzero()[:, 0], token_lp)
        scores.extend(sums.tolist())
    return scores


def _forward_parameters(model) -> set[str]:
    """The keyword names the model's (or, for a PEFT wrapper, its base model's) forward takes."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _cache_keyword(model) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` in later releases; take the model's name.
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _last_logits_only(model) -> dict:
    """`logits_to_keep=1` where the model takes it (the vocabulary projection of one position)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}


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
