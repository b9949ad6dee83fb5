"""AdapT: adaptive temperature sampling for code (Zhu et al., AAAI 2024; ANCHORS.md §5).

The hard tokens of generated code sit at the start of code blocks. So the first token of a
line that opens a block body is sampled at a high ("hard") temperature, to explore, and every
other token at a low ("easy") one, to stay precise.

Where exactly "the first token of a line" is. The decision is made from the text generated so
far (the prompt counts as context), decoded from the token ids, never from token boundaries:
byte-level BPE merges a newline with the indentation after it ("\\n   " is one token), and may
or may not split the indentation further. The next token is a *line start* when everything
after the last newline is whitespace (possibly nothing): the newline and its indentation have
been emitted, the line's content has not begun. A line start *opens a block body* when the
nearest non-blank line before it ends with ':' (a trailing `# comment` ignored), or when the
indentation emitted so far is deeper than that line's. So for `def f(x):` followed by the
token "\\n   " the next token (" return") is hard; the "\\n   " token itself, sampled while the
line `def f(x):` was still current, is easy. If a line's indentation arrives in several
whitespace tokens, each of them is decided by the same rule on the text at that point.

Use with `generate(..., do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
logits_processor=LogitsProcessorList([processor]))`, so that nothing else rescales the logits.
"""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor

from eval.errors import UserInputError


def opens_block_body(text: str) -> bool:
    """True when the next token after `text` is the first token of a line that opens a block body."""
    lines = text.split("\n")
    if len(lines) < 2 or lines[-1].strip():
        return False  # no line has ended yet, or the current line already has content
    previous = next((line for line in reversed(lines[:-1]) if line.strip()), None)
    if previous is None:
        return False
    if _strip_comment(previous).rstrip().endswith(":"):
        return True
    return _indent_width(lines[-1]) > _indent_width(previous)


def _indent_width(line: str) -> int:
    stripped = line.lstrip(" \t")
    return len(line[: len(line) - len(stripped)].expandtabs(8))


def _strip_comment(line: str) -> str:
    """`line` without a trailing `# comment`; a '#' inside a one-line string literal is kept."""
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#":
            return line[:i]
        i += 1
    return line


class AdaptiveTemperatureLogitsProcessor(LogitsProcessor):
    """Divide each row's logits by the hard temperature at block-body line starts, else by the easy one.

    tokenizer: decodes the ids generated so far (special tokens skipped).
    context_tokens: how many trailing tokens are decoded first; the window grows until it holds
    the whole previous non-blank line (or the whole sequence), so the decision never depends on it.
    After a `generate` call, `hard_steps` / `total_steps` count the row-steps sampled hard / in all.
    """

    def __init__(self, tokenizer, hard_temperature: float, easy_temperature: float, context_tokens: int = 64):
        for name, value in (("hard_temperature", hard_temperature), ("easy_temperature", easy_temperature)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise UserInputError(f"{name} must be a finite number > 0, got {value!r}")
        if context_tokens < 1:
            raise UserInputError(f"context_tokens must be >= 1, got {context_tokens}")
        self.tokenizer = tokenizer
        self.hard_temperature = float(hard_temperature)
        self.easy_temperature = float(easy_temperature)
        self.context_tokens = int(context_tokens)
        self.hard_steps = 0
        self.total_steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: [batch, seq_len] (prompt + generated so far); scores: [batch, vocab].
        hard = [self.is_hard_position(row.tolist()) for row in input_ids]
        self.hard_steps += sum(hard)
        self.total_steps += len(hard)
        temperatures = torch.tensor(
            [self.hard_temperature if h else self.easy_temperature for h in hard], dtype=scores.dtype, device=scores.device
        )
        return scores / temperatures[:, None]

    def is_hard_position(self, token_ids: list[int]) -> bool:
        """Whether the token that follows `token_ids` is sampled at the hard temperature."""
        window = self.context_tokens
        while True:
            tail = token_ids[-window:]
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            if window >= len(token_ids) or _previous_line_is_complete(text):
                return opens_block_body(text)
            window *= 2


def _previous_line_is_complete(text: str) -> bool:
    """True when `text` (a decoded tail) decides `opens_block_body` as the whole sequence would.

    The tail's first line may be cut; the decision only looks at the current line and the nearest
    non-blank line before it, so that line must be preceded by a newline within the tail.
    """
    lines = text.split("\n")
    if lines[-1].strip():
        return True  # mid-line: the answer (easy) does not depend on earlier text
    for i in range(len(lines) - 2, 0, -1):
        if lines[i].strip():
            return True  # lines[i] is whole: a newline precedes it within the tail
    return False
