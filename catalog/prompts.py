"""IOI prompts: a built-in generator, a JSONL reader, and tokenization with role checks.

A prompt is a text plus roles: role name -> 0-based token position in the model's tokenization
of the text, exactly the ids its tokenizer returns for the text (SPEC.md, "IOI prompts", where
GPT-2's tokenizer adds no BOS). The catalog feeds the model those ids, so where a tokenizer puts a BOS token in front of every text
(Llama's does; GPT-2's does not, see `adds_bos`) position 0 is the BOS and every role counts it:
in a JSONL file, roles are positions in that tokenization and a "tokens" list starts with the
BOS string (e.g. "<s>"). A JSONL prompt can ask for a BOS the tokenizer does not add
(`"prepend_bos": true`, as TransformerLens prepends one for Llama whatever the tokenizer): the
tokenizer's BOS token is then put first, and roles and tokens count it the same way.

Generated texts end with the answer (the IO name) after the `end` token, as ../shared/reference
prompts do, so positions after `end` are never analysed. The generator draws its words from the
lists below, keeping those that are one token, in the form they take inside the templates, for
the tokenizer at hand (`ioi_words`); for GPT-2's tokenizer every listed word is, so its prompts
are the same as they have always been.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from catalog.errors import CatalogError
from catalog.stopping import check_stop


@dataclass(frozen=True)
class Prompt:
    text: str
    roles: dict[str, int]
    template: str | None = None  # generator template id, e.g. "ioi-03"
    name_order: str | None = None  # "ABBA" (IO first) or "BABA" (subject first)
    tokens: tuple[str, ...] | None = None  # expected token strings, checked by tokenize_prompts
    answer: str | int | None = None  # the correct next token after `end` (text or id); IOI: the IO name
    wrong: str | int | None = None  # the contrast token; IOI: the subject's name
    prepend_bos: bool = False  # JSONL "prepend_bos": feed the tokenizer's BOS first even where it adds none


# Every word carries its leading space: that is the form it takes inside a sentence, and
# the form that must be one token for a role to name one position. These lists come first, in
# this order: the generator draws from them exactly as it always has wherever all their words
# are single tokens (GPT-2's tokenizer), so existing runs keep their prompts.
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

# Extension pools: drawn on, in order, only to top a list up to its own length when some of its
# words are not single tokens for a tokenizer (never for GPT-2's).
EXTRA_NAMES = (
    " Sam", " Ben", " Tom", " Max", " Anne", " Jack", " Lucy", " Mark", " Jane", " Joe",
    " Amy", " Nick", " Mike", " Rose", " Dan", " Tim", " Bob", " Eric", " Alex", " Leo",
)
EXTRA_PLACES = (" shop", " farm", " bank", " lake", " zoo", " gym", " mall", " pool", " club", " kitchen")
EXTRA_OBJECTS = (" pen", " cup", " hat", " toy", " box", " coin", " card", " map", " note", " shirt")  # consonant-initial

# The fewest single-token words of each kind that still give varied prompts: two names per
# prompt out of at least four (twelve ordered pairs), and a choice of place and object.
MIN_NAMES, MIN_PLACES, MIN_OBJECTS = 4, 2, 2

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


# The word list each template slot takes its word from.
SLOT_KINDS = {"N1": "names", "N2": "names", "S2": "names", "PLACE": "places", "OBJECT": "objects"}


def _ids(tokenizer, text: str) -> list[int]:
    """The ids the tokenizer returns for a text, its special tokens (a BOS) included: what the model is fed."""
    return list(tokenizer(text)["input_ids"])


def _own_ids(tokenizer, text: str) -> list[int]:
    """The text's own token ids, without the special tokens the tokenizer adds around them."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _describe(tokenizer) -> str:
    """The tokenizer as errors name it: its class, and where it was loaded from when known."""
    source = getattr(tokenizer, "name_or_path", "")
    return f"tokenizer {type(tokenizer).__name__}" + (f" ({source})" if source else "")


def _special_ids_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after every text's own tokens:
    ([BOS], []) for Llama's, ([], []) for GPT-2's. Found by encoding a text with and without them,
    so it holds for any tokenizer called like a Hugging Face one, whatever its BOS is called."""
    probe = "When Mary and John went to the store"
    ids, own = _ids(tokenizer, probe), _own_ids(tokenizer, probe)
    for start in range(len(ids) - len(own) + 1):
        if ids[start : start + len(own)] == own:
            return ids[:start], ids[start + len(own) :]
    raise CatalogError(f"the {_describe(tokenizer)} returns ids for a text that do not contain the text's own tokens")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front of every text it encodes (Llama's does,
    GPT-2's does not). Prompt positions count it: position 0 is then the BOS."""
    return bool(_special_ids_around(tokenizer)[0])


@dataclass(frozen=True)
class IoiWords:
    """The words the IOI generator draws from for one tokenizer, and each word's token id."""

    names: tuple[str, ...]
    places: tuple[str, ...]
    objects: tuple[str, ...]
    token_of: dict[str, int]


def _slot_contexts(kind: str) -> list[tuple[str, str]]:
    """The template text before and after each slot of this kind, cut at the neighbouring slots and
    without the space before a slot (the slot word brings its own): where a word must stay one token."""
    contexts = set()
    for template in TEMPLATES.values():
        pieces = re.split(r"\{(\w+)\}", template)  # text, slot, text, slot, ..., text
        for i in range(1, len(pieces), 2):
            if SLOT_KINDS[pieces[i]] == kind:
                contexts.add((pieces[i - 1].removesuffix(" "), pieces[i + 1].removesuffix(" ")))
    return sorted(contexts)


def _token_in_contexts(tokenizer, word: str, contexts) -> int | None:
    """The one token `word` adds in every context, or None where it does not.

    Checked in context because a word alone can tokenize differently than inside a sentence
    (SentencePiece-style tokenizers give " Mary" alone as "▁", "▁Mary"): the text before the
    word must keep its tokens and gain exactly one, the same one everywhere, which the text after
    the word must not merge into. The token must decode back to the word, so that an
    unknown-word token never stands for a name.
    """
    token = None
    for before, after in contexts:
        own_before = _own_ids(tokenizer, before)
        with_word = _own_ids(tokenizer, before + word)
        n = len(own_before)
        if len(with_word) != n + 1 or with_word[:n] != own_before:
            return None
        if token is not None and with_word[n] != token:
            return None
        if _own_ids(tokenizer, before + word + after)[: n + 1] != with_word:
            return None
        token = with_word[n]
    if token is None or tokenizer.decode([token]).replace("▁", " ").strip() != word.strip():
        return None
    return token


def ioi_words(tokenizer) -> IoiWords:
    """The names, places and objects that are single tokens in their template contexts for this
    tokenizer: each list's own words first, in order, topped up from its extension pool to the
    list's length when some drop out. CatalogError when fewer than MIN_NAMES, MIN_PLACES or
    MIN_OBJECTS remain."""
    kinds = {"names": (NAMES, EXTRA_NAMES, MIN_NAMES), "places": (PLACES, EXTRA_PLACES, MIN_PLACES),
             "objects": (OBJECTS, EXTRA_OBJECTS, MIN_OBJECTS)}
    chosen, token_of = {}, {}
    for kind, (listed, extra, minimum) in kinds.items():
        contexts = _slot_contexts(kind)
        candidates = listed + tuple(word for word in extra if word not in listed)
        words, dropped = [], []
        for word in candidates:
            if len(words) == len(listed):
                break
            token = _token_in_contexts(tokenizer, word, contexts)
            if token is None:
                dropped.append(word)
            else:
                words.append(word)
                token_of[word] = token
        if len(words) < minimum:
            raise CatalogError(
                f"too few IOI {kind} are single tokens in context for the {_describe(tokenizer)}: "
                f"{len(words)} of {len(candidates)}, at least {minimum} needed{_examples(dropped)}"
            )
        chosen[kind] = tuple(words)
    return IoiWords(**chosen, token_of=token_of)


def _examples(dropped: list[str]) -> str:
    """The first few words left out, for an error message."""
    if not dropped:
        return ""
    more = ", ..." if len(dropped) > 3 else ""
    return f" (not single tokens: {', '.join(repr(word) for word in dropped[:3])}{more})"


def _fill(template_id: str, slots: dict[str, str], roles_of: dict[str, str], tokenizer, words: IoiWords,
          n_before: int) -> tuple[str, dict[str, int], list[int]]:
    """Fill a template and find each role's token position from the tokenization itself.

    A slot's position is the token count of the text before it, plus the n_before special tokens
    (a BOS) the tokenizer puts first: the slot word starts with a space, so the text before it
    ends at a pre-tokenizer boundary and tokenizes the same on its own. The token found there is
    then checked to be the slot word's, so a template whose words merge across a slot fails
    loudly instead of mislabelling a position. Returns the text, the roles and the text's own ids.
    """
    text, roles, filled, pending = "", {}, [], TEMPLATES[template_id]
    while "{" in pending:
        before, rest = pending.split("{", 1)
        slot, pending = rest.split("}", 1)
        text += before.removesuffix(" ")  # the slot word brings its own space
        roles[roles_of[slot]] = n_before + len(_own_ids(tokenizer, text))
        text += slots[slot]
        filled.append((roles_of[slot], slots[slot]))
    text += pending
    own = _own_ids(tokenizer, text)
    roles["end"] = n_before + len(own) - 1
    for role, word in filled:
        if own[roles[role] - n_before] != words.token_of[word]:
            raise CatalogError(f"template {template_id}: {word!r} is not the token at role {role} "
                               f"for the {_describe(tokenizer)} (it merges with the text around it)")
    return text, roles, own


def ioi_prompts(n: int, seed: int, tokenizer, order: str = "mixed") -> list[Prompt]:
    """n IOI prompts, deterministic in seed; `order` is "ABBA", "BABA" or "mixed" (equal halves).

    Mixed alternates ABBA, BABA, ... so any prefix is balanced; an odd n gives ABBA the extra one.
    Words are those of `ioi_words(tokenizer)`; roles count the tokenizer's BOS where it adds one.
    """
    if order not in ORDERS:
        raise CatalogError(f"unknown name order '{order}': use one of {', '.join(ORDERS)}")
    if n < 0:
        raise CatalogError(f"the number of prompts must be >= 0, got {n}")
    words = ioi_words(tokenizer)
    n_before = len(_special_ids_around(tokenizer)[0])
    rng = random.Random(seed)
    template_ids = sorted(TEMPLATES)
    prompts = []
    for i in range(n):
        check_stop()  # a large n takes a while: a service's stop or cancel must not wait for it
        name_order = order if order != "mixed" else ("ABBA", "BABA")[i % 2]
        template_id = rng.choice(template_ids)
        io, s = rng.sample(words.names, 2)  # two distinct names
        first, second = (io, s) if name_order == "ABBA" else (s, io)
        slots = {"N1": first, "N2": second, "S2": s, "PLACE": rng.choice(words.places),
                 "OBJECT": rng.choice(words.objects)}
        n1_role, n2_role = ("IO", "S1") if name_order == "ABBA" else ("S1", "IO")
        roles_of = {"N1": n1_role, "N2": n2_role, "S2": "S2", "PLACE": "place", "OBJECT": "object"}
        text, roles, own = _fill(template_id, slots, roles_of, tokenizer, words, n_before)
        # The answer must add exactly one token, or `end` would not be the last token before it.
        if _own_ids(tokenizer, text + io) != own + [words.token_of[io]]:
            raise CatalogError(f"template {template_id}: the answer {io!r} merges with the text before it "
                               f"for the {_describe(tokenizer)}")
        prompts.append(Prompt(text=text + io, roles=roles, template=template_id, name_order=name_order))
    return prompts


def read_jsonl(path) -> list[Prompt]:
    """Prompts from a JSONL file: {"text": ..., "roles": {...}, "tokens": [...]} per line, roles/tokens optional.

    Roles are positions in the ids the model's tokenizer returns for the text, and tokens those
    ids decoded one by one: both count the BOS where the tokenizer adds one (`tokenize_prompts`
    checks them)."""
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
    prepend_bos = record.get("prepend_bos", False)
    if not isinstance(prepend_bos, bool):
        raise CatalogError(f"{where}: \"prepend_bos\" must be true or false")
    if prepend_bos:
        optional["prepend_bos"] = True
    for key in ("template", "name_order"):
        if record.get(key) is not None:
            if not isinstance(record[key], str):
                raise CatalogError(f"{where}: \"{key}\" must be a string")
            optional[key] = record[key]
    return Prompt(text=text, roles=dict(roles), tokens=tokens, **optional)


def tokenize_prompts(prompts, tokenizer, max_tokens: int | None = None, limit: str = "allowed") -> list[list[int]]:
    """Each prompt's token ids as the tokenizer returns them (with its BOS where it adds one: what
    the model is fed), after checking the prompt's roles and tokens against them. `limit` says
    what sets max_tokens, for the error."""
    all_ids = []
    for index, prompt in enumerate(prompts):
        check_stop()
        if not prompt.text:
            raise CatalogError(f"prompt {index}: the text is empty")
        ids = prompt_ids(tokenizer, prompt, index)
        if max_tokens is not None and len(ids) > max_tokens:
            raise CatalogError(f"prompt {index}: {len(ids)} tokens, more than the {max_tokens} {limit}")
        for role, position in prompt.roles.items():
            if position >= len(ids):
                raise CatalogError(f"prompt {index}: role {role} at position {position} is outside the prompt's "
                                   f"{len(ids)} tokens{_bos_note(tokenizer)}")
        if prompt.tokens is not None:
            actual = [tokenizer.decode([token_id]) for token_id in ids]
            if list(prompt.tokens) != actual:
                raise CatalogError(f"prompt {index}: {_first_difference(list(prompt.tokens), actual)}"
                                   f"{_bos_note(tokenizer)}")
        all_ids.append(ids)
    return all_ids


def prompt_ids(tokenizer, prompt: Prompt, index: int = 0) -> list[int]:
    """The ids the model is fed for a prompt: the tokenizer's own, with its BOS token put first where
    the prompt asks for one (prepend_bos) and the tokenizer has not already put it there."""
    ids = _ids(tokenizer, prompt.text)
    if not prompt.prepend_bos:
        return ids
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise CatalogError(f"prompt {index}: \"prepend_bos\" is true but the {_describe(tokenizer)} has no BOS token")
    return ids if ids[:1] == [bos] else [bos] + ids


def _bos_note(tokenizer) -> str:
    """For errors about positions: where the tokenizer adds a BOS, that positions count it."""
    before, _ = _special_ids_around(tokenizer)
    if not before:
        return ""
    return (f" (the {_describe(tokenizer)} puts {tokenizer.decode(before)!r} first: position 0 is that BOS, "
            "roles count it and a tokens list starts with it)")


def _first_difference(given: list[str], actual: list[str]) -> str:
    for position, (a, b) in enumerate(zip(given, actual)):
        if a != b:
            return f"its tokens differ from the text's tokenization at position {position}: {a!r} given, {b!r} there"
    return f"its tokens list has {len(given)} tokens but the text tokenizes to {len(actual)}"


def end_positions(prompts, token_lists, tokenizer) -> list[int]:
    """Each prompt's last destination analysed: roles["end"], else its text's last token, before
    any special token the tokenizer puts after every text (an EOS, where one is appended; none of
    GPT-2's, Pythia's, Llama's or Qwen2's own tokenizers appends one)."""
    appended = len(_special_ids_around(tokenizer)[1])
    return [prompt.roles.get("end", len(ids) - 1 - appended) for prompt, ids in zip(prompts, token_lists)]


def answer_tokens(prompts, token_lists, tokenizer) -> tuple[list[int | None], list[int | None]]:
    """Each prompt's answer and wrong token ids: given in the prompt (a text that must add one token
    after the prompt's text, or an id), else the tokens at the IOI roles IO and S1, else None."""
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
                token = _token_after(tokenizer, prompt.text, given)
                if token is None:
                    raise CatalogError(f"prompt {index}: {field} {given!r} does not add exactly one token after "
                                       "the prompt's text (give the token as it follows the text, e.g. with its "
                                       "leading space)")
                pair.append(token)
            else:
                pair.append(ids[prompt.roles[role]] if role in prompt.roles else None)
        answers.append(pair[0])
        wrongs.append(pair[1])
    return answers, wrongs


def _token_after(tokenizer, text: str, word: str) -> int | None:
    """The one token `word` adds after `text`, or None. In context, and without the special tokens
    the tokenizer puts around a text (a BOS): a SentencePiece-style tokenizer encodes " Mary" on
    its own as BOS, "▁", "▁Mary", but after a text it adds only "▁Mary"."""
    own_text, own_with_word = _own_ids(tokenizer, text), _own_ids(tokenizer, text + word)
    n = len(own_text)
    if len(own_with_word) != n + 1 or own_with_word[:n] != own_text:
        return None
    return own_with_word[n]


def prompts_digest(prompts) -> str:
    """sha256 over texts and roles (and answer/wrong where given), in order; identifies a prompt set."""
    payload = [{"text": p.text, "roles": p.roles, **{k: getattr(p, k) for k in ("answer", "wrong")
                                                     if getattr(p, k) is not None},
                **({"prepend_bos": True} if p.prepend_bos else {})} for p in prompts]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
