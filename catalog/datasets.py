"""The built-in prompt sets besides IOI (catalog.prompts): greater-than, gendered pronouns and
factual recall, for any tokenizer, each prompt with its roles and its answer and wrong token ids.

In the spirit of the tasks the ACC++ reference library ships (docs/datasets.md), with words and
templates of our own. Texts stop at the `end` token: the answer is the next token, given as an id
(`Prompt.answer`, `Prompt.wrong`), so linear seeding follows the logit difference answer - wrong.
A template fill whose role words are not single tokens for the tokenizer (or whose answer does
not add exactly one token after the text) is dropped and the draw goes on; `BuiltPrompts.dropped`
says how many were. Every draw comes from `random.Random(seed)`: the same seed and tokenizer give
the same prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from catalog.errors import CatalogError
from catalog.prompts import Prompt, _describe, _own_ids, _special_ids_around, _token_after, ioi_prompts
from catalog.stopping import check_stop

DATASETS = ("ioi", "greater-than", "pronouns", "factual")


@dataclass(frozen=True)
class BuiltPrompts:
    prompts: list[Prompt]
    dropped: int  # template fills left out: a role word or the answer is not one token for this tokenizer


# Greater-than (Hanna et al.'s task): "The war lasted from the year 1732 to the year 17" -> a
# two-digit year above 32. Roles: YY (the start year's last two digits), end (the second
# century, " 17"). Years 02..98 so that a greater and a smaller-or-equal year always exist.
GT_NOUNS = ("war", "siege", "drought", "expedition", "voyage", "famine", "rebellion", "treaty", "dynasty", "festival")
GT_CENTURIES = tuple(range(11, 18))
GT_TEMPLATES = {
    "gt-01": "The {NOUN} lasted from the year {C}{YY} to the year {C}",
    "gt-02": "The {NOUN} began in the year {C}{YY} and ended in the year {C}",
    "gt-03": "The {NOUN} went on from the year {C}{YY} until the year {C}",
}

# Gendered pronouns (the "So {name} is ..., isn't" task): the answer is the pronoun of the name.
# Roles: name, end (the last token, "'t" for GPT-2's tokenizer).
FEMALE_NAMES = (" Mary", " Sarah", " Emily", " Laura", " Anna", " Lisa", " Rachel", " Alice", " Jessica", " Emma",
                " Grace", " Kate", " Ruby", " Victoria", " Lucy", " Jane")
MALE_NAMES = (" John", " Arthur", " Jacob", " Adam", " Kevin", " Andrew", " Charles", " Frank", " Robert", " Paul",
              " Brian", " James", " David", " Michael", " Thomas", " Peter")
PRONOUN_TEMPLATES = {
    "pronoun-01": "So {NAME} is a really good neighbour, isn't",
    "pronoun-02": "So {NAME} is such a talented singer, isn't",
    "pronoun-03": "So {NAME} is a very patient teacher, isn't",
    "pronoun-04": "So {NAME} is an excellent driver, isn't",
    "pronoun-05": "So {NAME} is a truly kind person, isn't",
}
PRONOUNS = {"female": " she", "male": " he"}

# Factual recall: (subject, object) pairs per relation. A relation's template marks its keyword
# in brackets (the `relation` role) and its subject as {S}; the answer is the object's first
# token after the text, the wrong token another object's of the same relation.
FACT_TEMPLATES = {
    "located-in": "{S} is located in the [city] of",
    "capital-of": "The [capital] of {S} is the city of",
    "language-of": "The official [language] of {S} is",
}
FACTS = {
    "located-in": (("The Eiffel Tower", " Paris"), ("Big Ben", " London"), ("The Colosseum", " Rome"),
                   ("The Brandenburg Gate", " Berlin"), ("The Statue of Liberty", " New York"),
                   ("The Acropolis", " Athens"), ("The Kremlin", " Moscow"), ("The Sagrada Familia", " Barcelona")),
    "capital-of": (("France", " Paris"), ("Germany", " Berlin"), ("Italy", " Rome"), ("Spain", " Madrid"),
                   ("Japan", " Tokyo"), ("Russia", " Moscow"), ("Egypt", " Cairo"), ("Greece", " Athens")),
    "language-of": (("France", " French"), ("Germany", " German"), ("Italy", " Italian"), ("Spain", " Spanish"),
                    ("Japan", " Japanese"), ("Russia", " Russian"), ("Brazil", " Portuguese"), ("China", " Chinese")),
}


def built_in_prompts(dataset: str, n: int, seed: int, tokenizer) -> BuiltPrompts:
    """n prompts of a built-in dataset (DATASETS), deterministic in seed, for this tokenizer."""
    if n < 0:
        raise CatalogError(f"the number of prompts must be >= 0, got {n}")
    builders = {"greater-than": _greater_than, "pronouns": _pronouns, "factual": _factual}
    if dataset == "ioi":
        return BuiltPrompts(ioi_prompts(n, seed, tokenizer), 0)
    if dataset not in builders:
        raise CatalogError(f"unknown dataset '{dataset}': use --dataset {', '.join(DATASETS)} or --prompts FILE.jsonl")
    return builders[dataset](n, seed, tokenizer)


def _draw(n: int, seed: int, fill, dataset: str, tokenizer) -> BuiltPrompts:
    """Call fill(rng) until n prompts are made (None is a dropped fill); an error line when nearly
    every fill is dropped, as when the tokenizer lacks the words altogether."""
    rng, prompts, dropped = random.Random(seed), [], 0
    while len(prompts) < n:
        check_stop()
        prompt = fill(rng)
        if prompt is None:
            dropped += 1
            if dropped > 20 * n + 100:
                raise CatalogError(f"--dataset {dataset}: {dropped} template fills dropped and only {len(prompts)} "
                                   f"of {n} prompts made: too few of its words are single tokens for the "
                                   f"{_describe(tokenizer)}")
        else:
            prompts.append(prompt)
    return BuiltPrompts(prompts, dropped)


def _positions(tokenizer, pieces) -> tuple[str, dict[str, int], list[int]] | None:
    """Join text pieces, each (text, role or None, whether the role's word must be one token). A
    role names its piece's last token: the text before the piece keeps its tokens, the piece adds
    one (or, not single, at least one), and the whole text's tokenization starts the same. None
    where a piece merges with its neighbours. Positions count a BOS."""
    n_before = len(_special_ids_around(tokenizer)[0])
    text, marks = "", []
    for piece, role, single in pieces:
        own_before = _own_ids(tokenizer, text)
        text += piece
        if role is not None:
            prefix = _own_ids(tokenizer, text)
            added = len(prefix) - len(own_before)
            if prefix[:len(own_before)] != own_before or added < 1 or (single and added != 1):
                return None
            marks.append((role, prefix))
    own = _own_ids(tokenizer, text)
    roles = {}
    for role, prefix in marks:
        if own[:len(prefix)] != prefix:
            return None
        roles[role] = n_before + len(prefix) - 1
    roles["end"] = n_before + len(own) - 1
    return text, roles, own


def _single_token(tokenizer, before: str, word: str) -> int | None:
    """The token id `word` is after `before` when it adds exactly one token there, else None."""
    return _token_after(tokenizer, before, word)


def _greater_than(n: int, seed: int, tokenizer) -> BuiltPrompts:
    _require_two_digit_tokens(tokenizer)
    template_ids = sorted(GT_TEMPLATES)

    def fill(rng):
        template_id, noun = rng.choice(template_ids), rng.choice(GT_NOUNS)
        century, yy = rng.choice(GT_CENTURIES), rng.randint(2, 98)
        start, rest = GT_TEMPLATES[template_id].split("{C}{YY}")
        start = start.format(NOUN=noun)
        # The start year must read " 17", "32": its last two digits one token.
        made = _positions(tokenizer, [(f"{start}{century}", None, False), (f"{yy:02d}", "YY", True),
                                      (rest.format(C=century), None, False)])
        if made is None:
            return None
        text, roles, _ = made
        # Answer: a year drawn uniformly above YY; wrong: one drawn uniformly from 00..YY.
        answer, wrong = rng.randint(yy + 1, 99), rng.randint(0, yy)
        answer_id, wrong_id = (_single_token(tokenizer, text, f"{y:02d}") for y in (answer, wrong))
        if answer_id is None or wrong_id is None or answer_id == wrong_id:
            return None
        return Prompt(text=text, roles=roles, template=template_id, answer=answer_id, wrong=wrong_id)

    return _draw(n, seed, fill, "greater-than", tokenizer)


def _require_two_digit_tokens(tokenizer) -> None:
    """Greater-than reads a year's last two digits as one token: a tokenizer that splits numbers
    into digits (Llama's, Qwen2's) cannot pose it."""
    probe = "The war lasted from the year 17"
    singles = sum(_single_token(tokenizer, probe, f"{y:02d}") is not None for y in range(100))
    if singles < 50:
        raise CatalogError(f"--dataset greater-than needs single tokens for two-digit numbers (\"32\" after "
                           f"\"the year 17\"); the {_describe(tokenizer)} has them for {singles} of 100")


def _pronouns(n: int, seed: int, tokenizer) -> BuiltPrompts:
    template_ids = sorted(PRONOUN_TEMPLATES)
    names = [(name, "female") for name in FEMALE_NAMES] + [(name, "male") for name in MALE_NAMES]

    def fill(rng):
        template_id = rng.choice(template_ids)
        name, gender = rng.choice(names)
        before, after = PRONOUN_TEMPLATES[template_id].split(" {NAME}")
        made = _positions(tokenizer, [(before, None, False), (name, "name", True), (after, None, False)])
        if made is None:
            return None  # the name is not one token here
        text, roles, _ = made
        other = "male" if gender == "female" else "female"
        answer, wrong = (_single_token(tokenizer, text, PRONOUNS[g]) for g in (gender, other))
        if answer is None or wrong is None:
            return None
        return Prompt(text=text, roles=roles, template=template_id, answer=answer, wrong=wrong)

    return _draw(n, seed, fill, "pronouns", tokenizer)


def _factual(n: int, seed: int, tokenizer) -> BuiltPrompts:
    relations = sorted(FACT_TEMPLATES)

    def fill(rng):
        relation = rng.choice(relations)
        facts = FACTS[relation]
        subject, obj = rng.choice(facts)
        # "{S} is located in the [city] of" -> pieces, the keyword with the space before it.
        pieces = []
        for chunk in re.split(r"(\{S\}| \[\w+\])", FACT_TEMPLATES[relation]):
            if chunk == "{S}":
                spaced = bool(pieces) and pieces[-1][0].endswith(" ")
                if spaced:  # the space goes with the subject, as words carry theirs
                    pieces[-1] = (pieces[-1][0][:-1], None, False)
                pieces.append(((" " if spaced else "") + subject, "subject", False))  # its last token
            elif chunk.startswith(" ["):
                pieces.append((" " + chunk[2:-1], "relation", True))
            elif chunk:
                pieces.append((chunk, None, False))
        made = _positions(tokenizer, pieces)
        if made is None:
            return None
        text, roles, _ = made
        answer = _first_token(tokenizer, text, obj)
        others = [_first_token(tokenizer, text, other) for _, other in facts if other != obj]
        others = [token for token in others if token is not None and token != answer]
        if answer is None or not others:
            return None
        return Prompt(text=text, roles=roles, template=relation, answer=answer, wrong=rng.choice(others))

    return _draw(n, seed, fill, "factual", tokenizer)


def _first_token(tokenizer, text: str, word: str) -> int | None:
    """The first token `word` adds after `text`, where the text's own tokens stay as they are."""
    own, with_word = _own_ids(tokenizer, text), _own_ids(tokenizer, text + word)
    if len(with_word) <= len(own) or with_word[:len(own)] != own:
        return None
    return with_word[len(own)]
