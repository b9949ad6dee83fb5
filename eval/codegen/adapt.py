"""AdapT: adaptive temperature sampling for code (Zhu et al., AAAI 2024; docs/METHODS.md §5).

The hard tokens of generated code sit at the start of code blocks. So the first token of a
line that opens a block body is sampled at a high ("hard") temperature, to explore, and every
other token at a low ("easy") one, to stay precise.

Where exactly "the first token of a line" is. The decision is made from the text generated so
far (the prompt counts as context), decoded from the token ids, never from token boundaries:
byte-level BPE merges a newline with the indentation after it ("\\n   " is one token), and may
or may not split the indentation further. The next token is a *line start* when everything
after the last newline is whitespace (possibly nothing): the newline and its indentation have
been emitted, the line's content has not begun. A line start *opens a block body* when the
nearest code line before it ends with ':' (a trailing `# comment` ignored), or when the
indentation emitted so far is deeper than that line's. "Code line" skips blank lines, comment
lines and docstrings (string-literal statements, one- or multi-line): a docstring is not code,
so the first statement of a function body after its docstring, which is where a HumanEval-style
prompt hands over to the model, still counts as the start of the block `def ...:` opened. So for
`def f(x):` followed by the token "\\n   " the next token (" return") is hard; the "\\n   " token
itself, sampled while the line `def f(x):` was still current, is easy. If a line's indentation
arrives in several whitespace tokens, each of them is decided by the same rule on the text at
that point.

Use with `generate(..., do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
logits_processor=LogitsProcessorList([processor]))`, so that nothing else rescales the logits.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from eval.errors import require_positive, require_positive_number


def opens_block_body(text: str) -> bool:
    """True when the next token after `text` is the first token of a line that opens a block body."""
    return _block_body_decision(text, whole=True)[0]


class _Undecided(Exception):
    """The decoded tail is too short: the line the decision depends on starts before it."""


def _block_body_decision(text: str, whole: bool) -> tuple[bool, bool]:
    """(opens a block body, decided). With `whole=False`, `text` is a cut tail whose first line
    may be partial; `decided` is False when the answer could depend on what was cut."""
    lines = text.split("\n")
    if lines[-1].strip():
        return False, True  # mid-line: easy, whatever came before
    try:
        previous = _previous_code_line(lines, len(lines) - 2, first=0 if whole else 1)
    except _Undecided:
        return False, False
    if previous is None:
        return False, True  # no code line before this one
    line = lines[previous]
    if _strip_comment(line).rstrip().endswith(":"):
        return True, True
    return _indent_width(lines[-1]) > _indent_width(line), True


def _previous_code_line(lines: list[str], i: int, first: int) -> int | None:
    """Index of the nearest code line at or before `i`: blank lines, comment lines and docstrings
    (statements that are only a string literal, one- or multi-line) are skipped. Lines before
    `first` are unknown (a cut tail's partial first line): needing them raises `_Undecided`."""
    while i >= 0:
        if i < first:
            raise _Undecided
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            i -= 1
            continue
        opening = _docstring_start(lines, i, first)
        if opening is None:
            return i
        i = opening - 1
    if first > 0:
        raise _Undecided  # the tail began with a newline: what preceded it is unknown
    return None


def _docstring_start(lines: list[str], i: int, first: int) -> int | None:
    """If lines[i] ends a string-literal statement (a docstring), the index of its first line."""
    stripped = lines[i].strip()
    for quote in ('"""', "'''"):
        if not stripped.endswith(quote):
            continue
        body = stripped[: -len(quote)]
        if _starts_with_string(body, quote) and body.lstrip("rRuUbBfF").count(quote) == 1:
            return i  # a one-line docstring
        for j in range(i - 1, -1, -1):
            if j < first:
                raise _Undecided
            if quote in lines[j]:
                return j if _starts_with_string(lines[j].strip(), quote) else None
        return None
    return None


def _starts_with_string(stripped: str, quote: str) -> bool:
    prefix = len(stripped) - len(stripped.lstrip("rRuUbBfF"))
    return prefix <= 2 and stripped[prefix:].startswith(quote)


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
            require_positive_number(name, value)
        require_positive("context_tokens", context_tokens)
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
            text = self.tokenizer.decode(token_ids[-window:], skip_special_tokens=True)
            whole = window >= len(token_ids)
            hard, decided = _block_body_decision(text, whole)
            if decided or whole:
                return hard
            window *= 2
