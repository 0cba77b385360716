"""The grammatical form of a request, a confound of difference-of-means directions.

Why: harmful and harmless prompt sets differ in more than harm (HarmBench's prompts are mostly
instructions, the harmless ones often questions), so a plain difference of means also encodes
"instruction rather than question", and ablating it can leave refusal on questions (measurements:
docs/decisions.md, "Causal protocol"). `directions.Groups` matches the harmless baseline to each
node's mix of forms.

The rule is deliberately simple and documented rather than learnt: a prompt is a `question` when it
opens with an interrogative or auxiliary word or ends with "?", `first_person` when it opens with
I / my / we (a stated situation or want: "I need a guide to …"), and an `instruction` otherwise.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

FORMS = ("first_person", "instruction", "question")

_QUESTION = re.compile(
    r"^(how|what|what's|whats|why|where|when|who|whom|whose|which|can|could|would|should|shall|may|might"
    r"|is|are|was|were|do|does|did|will|have|has|am)\b")
_FIRST_PERSON = re.compile(r"^(i|i'm|im|i've|i'd|i'll|my|we|we're|we've|our|me)\b")


def request_form(prompt: str) -> str:
    """`question`, `first_person` or `instruction` (see the module docstring)."""
    text = unicodedata.normalize("NFKC", prompt).replace("\u2019", "'").strip().lower()
    text = text.lstrip("\"'([{*-–— ")
    if _QUESTION.match(text) or text.rstrip("\"') ").endswith("?"):
        return "question"
    if _FIRST_PERSON.match(text):
        return "first_person"
    return "instruction"


def request_forms(prompts: Iterable[str]) -> list[str]:
    return [request_form(p) for p in prompts]
