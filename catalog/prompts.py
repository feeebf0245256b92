"""IOI prompts: a built-in generator, a JSONL reader, and tokenization with role checks.

A prompt is a text plus roles: role name -> 0-based token position in the GPT-2
tokenization of the text, no BOS token (SPEC.md, "IOI prompts"). Generated texts end with
the answer (the IO name) after the `end` token, as ../shared/reference prompts do, so
positions after `end` are never analysed.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from catalog.errors import CatalogError


@dataclass(frozen=True)
class Prompt:
    text: str
    roles: dict[str, int]
    template: str | None = None  # generator template id, e.g. "ioi-03"
    name_order: str | None = None  # "ABBA" (IO first) or "BABA" (subject first)
    tokens: tuple[str, ...] | None = None  # expected token strings, checked by tokenize_prompts
    answer: str | int | None = None  # the correct next token after `end` (text or id); IOI: the IO name
    wrong: str | int | None = None  # the contrast token; IOI: the subject's name


# Every word carries its leading space: that is the form it takes inside a sentence, and
# the form that must be one GPT-2 token for a role to name one position.
NAMES = (
    " Mary", " John", " Sarah", " Arthur", " Ruby", " Jacob", " Kate", " Jonathan", " Adam", " Luke",
    " Tyler", " Kevin", " Andrew", " Charles", " Graham", " Laura", " Frank", " Robert", " Martin", " Emily",
    " Paul", " Brian", " Victoria", " Louis", " James", " David", " Michael", " Daniel", " Thomas", " Anna",
    " Lisa", " Rachel", " Alice", " Jessica", " Peter", " George", " Richard", " Emma", " Grace", " Henry",
)
PLACES = (
    " store", " park", " school", " hospital", " office", " station", " restaurant", " beach",
    " garden", " house", " library", " market", " church", " museum", " hotel",
)
# Consonant-initial only, so that "a [OBJECT]" is always grammatical.
OBJECTS = (
    " drink", " ring", " book", " bone", " basketball", " computer", " snack", " gift",
    " letter", " key", " flower", " ball", " phone", " bag", " cake",
)

# Slots: {N1} {N2} the first mentions of the two names, in text order; {S2} the subject's
# second mention; {PLACE} {OBJECT}. Each slot follows a space, which the slot word (" Mary")
# brings itself. The text stops at the `end` token; the answer (the IO name) is appended.
TEMPLATES = {
    "ioi-01": "When {N1} and {N2} went to the {PLACE}, {S2} gave a {OBJECT} to",
    "ioi-02": "Then, {N1} and {N2} had a lot of fun at the {PLACE}. {S2} gave a {OBJECT} to",
    "ioi-03": "After {N1} and {N2} went to the {PLACE}, {S2} handed a {OBJECT} to",
    "ioi-04": "While {N1} and {N2} were working at the {PLACE}, {S2} passed a {OBJECT} to",
    "ioi-05": "Then, {N1} and {N2} had a long argument, and afterwards {S2} said to",
    "ioi-06": "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {S2} decided to give it to",
    "ioi-07": "The {PLACE} was quiet when {N1} met {N2} there. Later, {S2} offered a {OBJECT} to",
    "ioi-08": "At the {PLACE}, {N1} and {N2} were thinking about lunch. {S2} wanted to give a {OBJECT} to",
    "ioi-09": "Since {N1} and {N2} both liked the {PLACE}, {S2} bought a {OBJECT} for",
    "ioi-10": "After a long day at the {PLACE}, {N1} sat down with {N2}, and {S2} showed the {OBJECT} to",
    "ioi-11": "When {N1} and {N2} arrived at the {PLACE}, {S2} threw the {OBJECT} to",
    "ioi-12": "Yesterday {N1} and {N2} cleaned the {PLACE}. Afterwards {S2} lent a {OBJECT} to",
}
ORDERS = ("ABBA", "BABA", "mixed")


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _check_single_tokens(tokenizer) -> None:
    for word in NAMES + PLACES + OBJECTS:
        if len(_ids(tokenizer, word)) != 1:
            raise CatalogError(f"the IOI word '{word}' is not a single token for this tokenizer")


def _fill(template_id: str, slots: dict[str, str], roles_of: dict[str, str], tokenizer) -> tuple[str, dict[str, int]]:
    """Fill a template and find each role's token position from the tokenization itself.

    A slot's position is the token count of the text before it: the slot word starts with a
    space, so the text before it ends at a pre-tokenizer boundary and tokenizes the same on
    its own. The token found there is then checked to be the slot word, so a template whose
    words merge across a slot fails loudly instead of mislabelling a position.
    """
    text, roles, filled, pending = "", {}, [], TEMPLATES[template_id]
    while "{" in pending:
        before, rest = pending.split("{", 1)
        slot, pending = rest.split("}", 1)
        text += before.removesuffix(" ")  # the slot word brings its own space
        roles[roles_of[slot]] = len(_ids(tokenizer, text))
        text += slots[slot]
        filled.append((roles_of[slot], slots[slot]))
    text += pending
    ids = _ids(tokenizer, text)
    roles["end"] = len(ids) - 1
    for role, word in filled:
        if ids[roles[role]] != _ids(tokenizer, word)[0]:
            raise ValueError(f"template {template_id}: {word!r} is not the token at role {role}")
    return text, roles


def ioi_prompts(n: int, seed: int, tokenizer, order: str = "mixed") -> list[Prompt]:
    """n IOI prompts, deterministic in seed; `order` is "ABBA", "BABA" or "mixed" (equal halves).

    Mixed alternates ABBA, BABA, ... so any prefix is balanced; an odd n gives ABBA the extra one.
    """
    if order not in ORDERS:
        raise CatalogError(f"unknown name order '{order}': use one of {', '.join(ORDERS)}")
    if n < 0:
        raise CatalogError(f"the number of prompts must be >= 0, got {n}")
    _check_single_tokens(tokenizer)
    rng = random.Random(seed)
    template_ids = sorted(TEMPLATES)
    prompts = []
    for i in range(n):
        name_order = order if order != "mixed" else ("ABBA", "BABA")[i % 2]
        template_id = rng.choice(template_ids)
        io, s = rng.sample(NAMES, 2)  # two distinct names
        first, second = (io, s) if name_order == "ABBA" else (s, io)
        slots = {"N1": first, "N2": second, "S2": s, "PLACE": rng.choice(PLACES), "OBJECT": rng.choice(OBJECTS)}
        n1_role, n2_role = ("IO", "S1") if name_order == "ABBA" else ("S1", "IO")
        roles_of = {"N1": n1_role, "N2": n2_role, "S2": "S2", "PLACE": "place", "OBJECT": "object"}
        text, roles = _fill(template_id, slots, roles_of, tokenizer)
        text += io  # the answer, after `end`
        # The answer must add exactly one token, or `end` would not be the last token before it.
        if len(_ids(tokenizer, text)) != roles["end"] + 2:
            raise ValueError(f"template {template_id}: the answer{io!r} merges with the text before it")
        prompts.append(Prompt(text=text, roles=roles, template=template_id, name_order=name_order))
    return prompts


def read_jsonl(path) -> list[Prompt]:
    """Prompts from a JSONL file: {"text": ..., "roles": {...}, "tokens": [...]} per line, roles/tokens optional."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CatalogError(f"no prompts file {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CatalogError(f"cannot read prompts file {path}: {error}") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            prompts.append(_parse_line(line, f"{path}, line {number}"))
    if not prompts:
        raise CatalogError(f"{path} holds no prompts (one JSON object per line expected)")
    return prompts


def _parse_line(line: str, where: str) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise CatalogError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise CatalogError(f"{where}: expected a JSON object with a \"text\" field")
    text = record.get("text")
    if not isinstance(text, str):
        raise CatalogError(f"{where}: \"text\" must be a string")
    roles = record.get("roles", {})
    if not isinstance(roles, dict):
        raise CatalogError(f"{where}: \"roles\" must be an object mapping role names to token positions")
    for role, position in roles.items():
        # bool is an int in Python; a JSON true is not a position.
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise CatalogError(f"{where}: role {role} must be a non-negative integer token position, got {position!r}")
    tokens = record.get("tokens")
    if tokens is not None:
        if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
            raise CatalogError(f"{where}: \"tokens\" must be a list of strings")
        tokens = tuple(tokens)
    optional = {}
    for key in ("answer", "wrong"):
        value = record.get(key)
        if value is not None:
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise CatalogError(f"{where}: \"{key}\" must be a token string or a token id")
            optional[key] = value
    for key in ("template", "name_order"):
        if record.get(key) is not None:
            if not isinstance(record[key], str):
                raise CatalogError(f"{where}: \"{key}\" must be a string")
            optional[key] = record[key]
    return Prompt(text=text, roles=dict(roles), tokens=tokens, **optional)


def tokenize_prompts(prompts, tokenizer, max_tokens: int | None = None) -> list[list[int]]:
    """GPT-2 token ids of each prompt (no BOS), after checking its roles and tokens against them."""
    all_ids = []
    for index, prompt in enumerate(prompts):
        if not prompt.text:
            raise CatalogError(f"prompt {index}: the text is empty")
        ids = _ids(tokenizer, prompt.text)
        if max_tokens is not None and len(ids) > max_tokens:
            raise CatalogError(f"prompt {index}: {len(ids)} tokens, more than the {max_tokens} allowed")
        for role, position in prompt.roles.items():
            if position >= len(ids):
                raise CatalogError(
                    f"prompt {index}: role {role} at position {position} is outside the prompt's {len(ids)} tokens"
                )
        if prompt.tokens is not None:
            actual = [tokenizer.decode([token_id]) for token_id in ids]
            if list(prompt.tokens) != actual:
                raise CatalogError(f"prompt {index}: {_first_difference(list(prompt.tokens), actual)}")
        all_ids.append(ids)
    return all_ids


def _first_difference(given: list[str], actual: list[str]) -> str:
    for position, (a, b) in enumerate(zip(given, actual)):
        if a != b:
            return f"its tokens differ from the text's tokenization at position {position}: {a!r} given, {b!r} there"
    return f"its tokens list has {len(given)} tokens but the text tokenizes to {len(actual)}"


def end_position(prompt: Prompt, n_tokens: int) -> int:
    """The last destination analysed: roles["end"], else the last token."""
    return prompt.roles.get("end", n_tokens - 1)


def answer_tokens(prompts, token_lists, tokenizer) -> tuple[list[int | None], list[int | None]]:
    """Each prompt's answer and wrong token ids: given in the prompt (a text that must be one token,
    or an id), else the tokens at the IOI roles IO and S1, else None."""
    answers, wrongs = [], []
    for index, (prompt, ids) in enumerate(zip(prompts, token_lists)):
        pair = []
        for field, role in (("answer", "IO"), ("wrong", "S1")):
            given = getattr(prompt, field)
            if isinstance(given, int):
                if not 0 <= given < len(tokenizer):
                    raise CatalogError(f"prompt {index}: {field} token id {given} is not in the vocabulary")
                pair.append(given)
            elif isinstance(given, str):
                found = _ids(tokenizer, given)
                if len(found) != 1:
                    raise CatalogError(f"prompt {index}: {field} {given!r} is {len(found)} tokens, not one "
                                       "(give the token as it follows the text, e.g. with its leading space)")
                pair.append(found[0])
            else:
                pair.append(ids[prompt.roles[role]] if role in prompt.roles else None)
        answers.append(pair[0])
        wrongs.append(pair[1])
    return answers, wrongs


def prompts_digest(prompts) -> str:
    """sha256 over texts and roles (and answer/wrong where given), in order; identifies a prompt set."""
    payload = [{"text": p.text, "roles": p.roles, **{k: getattr(p, k) for k in ("answer", "wrong")
                                                     if getattr(p, k) is not None}} for p in prompts]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
