"""Token positions defined by the chat template: where the instruction ends and the template resumes.

Methods in the field read the residual stream at the *post-instruction* template tokens
(Arditi et al.: every position after the instruction, e.g. `<|im_end|>\\n<|im_start|>assistant\\n`),
at the *last instruction token* (Zhao et al.'s harmfulness direction) or averaged over the
instruction. We find these positions per prompt from the tokenizer's character offsets of the
formatted prompt, so a token that merges the end of the instruction with the start of the template
is counted as an instruction token and never shifts the template positions.

Position names used everywhere (capture, directions, CLI):
- negative ints `-k … -1`: the k-th token from the end of the prompt (−1 = the last template token);
- `"last_instruction"`: the last token that overlaps the instruction text;
- `"mean_instruction"`: the mean over every token that overlaps the instruction text.
`"eoi"` expands to the template's post-instruction positions (`-k … -1`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.models import LoadedModel

LAST_INSTRUCTION = "last_instruction"
MEAN_INSTRUCTION = "mean_instruction"
NAMED_POSITIONS = (LAST_INSTRUCTION, MEAN_INSTRUCTION)
POST_INSTRUCTION_ALIAS = "eoi"
# A sentinel the template will not alter (no spaces to trim, no markup).
_SENTINEL = "QzxSENTINELxzQ"

Position = int | str


@dataclass(frozen=True)
class PromptTokens:
    """One formatted prompt: its token ids and the instruction's token span [start, end)."""

    input_ids: list[int]
    instruction_start: int
    instruction_end: int

    @property
    def n_post(self) -> int:
        """Number of template tokens after the instruction."""
        return len(self.input_ids) - self.instruction_end


def canonical_position(p: Position) -> Position:
    """Normalise a position given as text (CLI) or int; raise AtlasError for unknown names."""
    if isinstance(p, bool):
        raise AtlasError(f"position {p!r}: expected a negative int or one of {NAMED_POSITIONS}")
    if isinstance(p, int):
        if p >= 0:
            raise AtlasError(f"position {p}: token positions count from the end of the prompt (-1 = last)")
        return p
    text = str(p).strip()
    if text in NAMED_POSITIONS or text == POST_INSTRUCTION_ALIAS:
        return text
    try:
        return canonical_position(int(text))
    except ValueError:
        raise AtlasError(
            f"position {p!r}: use negative ints (-5,...,-1), {', '.join(NAMED_POSITIONS)} or 'eoi'"
        ) from None


def position_label(p: Position) -> str:
    """The string used for a position in file keys and metadata ("-1", "last_instruction")."""
    return str(p)


def parse_position_label(label: str) -> Position:
    return canonical_position(label)


def instruction_char_span(text: str, instruction: str) -> tuple[int, int]:
    """Character span of the instruction inside the formatted prompt, by search (templates may trim it).

    Only the fallback for templates whose text around the instruction depends on the instruction:
    a search can land in the template itself (instruction "a" inside "assistant").
    """
    for candidate in (instruction, instruction.strip()):
        if candidate:
            idx = text.rfind(candidate)
            if idx >= 0:
                return idx, idx + len(candidate)
    raise AtlasError(
        f"the chat template changed the instruction {instruction[:60]!r} beyond trimming; "
        "positions relative to the instruction cannot be located"
    )


def template_around(lm: LoadedModel, system: str | None = None) -> tuple[str, str]:
    """The template's text before and after the instruction (rendered around a sentinel)."""
    text = lm.chat_prompt(_SENTINEL, system=system)
    head, found, tail = text.partition(_SENTINEL)
    if not found:
        raise AtlasError(f"{lm.spec}: the chat template does not contain the instruction it is given")
    return head, tail


def instruction_char_spans(
    texts: Sequence[str], instructions: Sequence[str], head: str, tail: str
) -> list[tuple[int, int]]:
    """Character span of each instruction in its formatted prompt.

    The span is what lies between the template's head and tail, so text inside the template can
    never be taken for the instruction; a template that renders differently around this
    instruction falls back to a search.
    """
    spans = []
    for text, instruction in zip(texts, instructions, strict=True):
        c0, c1 = len(head), len(text) - len(tail)
        framed = c0 <= c1 and text.startswith(head) and text.endswith(tail)
        if framed and text[c0:c1] in (instruction, instruction.strip()):
            spans.append((c0, c1))
        else:
            spans.append(instruction_char_span(text, instruction))
    return spans


def tokenize_prompts(lm: LoadedModel, instructions: Sequence[str], system: str | None = None) -> list[PromptTokens]:
    """Format each instruction with the chat template and locate the instruction's tokens."""
    tok = lm.tokenizer
    texts = [lm.chat_prompt(x, system=system) for x in instructions]
    spans = instruction_char_spans(texts, instructions, *template_around(lm, system))
    if getattr(tok, "is_fast", False):
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for text, ids, offsets, (c0, c1) in zip(texts, enc["input_ids"], enc["offset_mapping"], spans, strict=True):
            inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < c1 and b > c0]
            if not inside:
                raise AtlasError(f"prompt {text[:60]!r}: no token overlaps the instruction (empty instruction?)")
            out.append(PromptTokens(list(ids), inside[0], inside[-1] + 1))
        return out
    # Slow tokenizers have no offsets: tokenize the prefix up to each span edge and take the
    # longest common token prefix with the full prompt (a merge across an edge counts inside).
    out = []
    for text, (c0, c1) in zip(texts, spans, strict=True):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        start = _common_prefix(ids, tok(text[:c0], add_special_tokens=False)["input_ids"])
        head = tok(text[:c1], add_special_tokens=False)["input_ids"]
        end = _common_prefix(ids, head)
        end = end + 1 if end < len(head) else end  # a token merged across the boundary is the instruction's
        out.append(PromptTokens(list(ids), min(start, end - 1), max(end, start + 1)))
    return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def post_instruction_tokens(lm: LoadedModel, system: str | None = None) -> list[int]:
    """The template's token ids after the instruction (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`)."""
    (pt,) = tokenize_prompts(lm, [_SENTINEL], system=system)
    return pt.input_ids[pt.instruction_end :]


def post_instruction_positions(lm: LoadedModel, system: str | None = None) -> tuple[int, ...]:
    """`(-k, …, -1)` for the k template tokens after the instruction."""
    k = len(post_instruction_tokens(lm, system=system))
    if k == 0:
        raise AtlasError(f"{lm.spec}: the chat template adds no tokens after the instruction")
    return tuple(range(-k, 0))


def expand_positions(lm: LoadedModel, positions: Iterable[Position], system: str | None = None) -> list[Position]:
    """Canonical positions with `"eoi"` expanded, duplicates removed, order kept."""
    out: list[Position] = []
    for p in positions:
        c = canonical_position(p)
        items = post_instruction_positions(lm, system) if c == POST_INSTRUCTION_ALIAS else (c,)
        for item in items:
            if item not in out:
                out.append(item)
    if not out:
        raise AtlasError("no positions requested")
    return out


def default_positions(lm: LoadedModel, system: str | None = None, max_post: int = 5) -> list[Position]:
    """The last `max_post` post-instruction template tokens plus the two instruction positions."""
    post = post_instruction_positions(lm, system)[-max_post:]
    return [*post, LAST_INSTRUCTION, MEAN_INSTRUCTION]


def gather_plan(
    prompts: Sequence[PromptTokens], width: int, positions: Sequence[Position]
) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """Index tensors for one left-padded batch of `width` tokens.

    Returns `(index [B, n_point], mean_weights [B, width] or None, order)`: point positions
    (ints and last_instruction) are gathered with `index`; `mean_instruction` is a weighted sum.
    `order[j]` maps output slot j to the column of `index` (or -1 for the mean).
    """
    point = [p for p in positions if p != MEAN_INSTRUCTION]
    index = torch.empty((len(prompts), len(point)), dtype=torch.long)
    weights = None
    if MEAN_INSTRUCTION in positions:
        weights = torch.zeros((len(prompts), width), dtype=torch.float32)
    for row, pt in enumerate(prompts):
        n = len(pt.input_ids)
        offset = width - n
        for col, p in enumerate(point):
            if isinstance(p, int):
                if -p > n:
                    raise AtlasError(f"position {p} is before the start of a {n}-token prompt")
                index[row, col] = width + p
            else:  # LAST_INSTRUCTION, the only named point position
                index[row, col] = offset + pt.instruction_end - 1
        if weights is not None:
            span = pt.instruction_end - pt.instruction_start
            weights[row, offset + pt.instruction_start : offset + pt.instruction_end] = 1.0 / span
    order = [point.index(p) if p != MEAN_INSTRUCTION else -1 for p in positions]
    return index, weights, order
