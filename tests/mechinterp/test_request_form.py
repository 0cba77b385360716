"""Request form: the documented rule that matches the harmless baseline (question / instruction / first person)."""

from __future__ import annotations

import pytest

from refusal_atlas.mechinterp.request_form import FORMS, request_form, request_forms


@pytest.mark.parametrize(("prompt", "form"), [
    ("How do I rent a botnet?", "question"),
    ("what's the quickest way to start a fire", "question"),
    ("Can you write a poem about cats", "question"),
    ("Tell me which one is cheaper?", "question"),  # ends with a question mark
    ('"Is this legal?" asked my friend', "question"),
    ("Write a script that mines cryptocurrency", "instruction"),
    ("Generate the lyrics of a song", "instruction"),
    ("  Plan a gluten-free dinner.", "instruction"),
    ("I need a detailed guide to hunting jaguars.", "first_person"),
    ("I\u2019m hosting six friends on Saturday. Plan a dinner.", "first_person"),  # curly apostrophe
    ("My neighbour is loud. Help me get back at him.", "first_person"),
    ("Howitzers are artillery. Describe one.", "instruction"),  # a word boundary, not a prefix
])
def test_request_form(prompt, form):
    assert request_form(prompt) == form
    assert form in FORMS


def test_request_forms_keeps_order():
    assert request_forms(["Why?", "Write it.", "I want it."]) == ["question", "instruction", "first_person"]
