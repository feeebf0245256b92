"""IOI prompts: the generator's roles checked against the tokenizer, the JSONL reader, the checks."""

import json
from pathlib import Path

import pytest

from catalog import prompts as prompts_module
from catalog.errors import CatalogError
from catalog.prompts import (
    EXTRA_NAMES,
    NAMES,
    OBJECTS,
    PLACES,
    TEMPLATES,
    Prompt,
    end_positions,
    ioi_prompts,
    ioi_words,
    prompts_digest,
    read_jsonl,
    tokenize_prompts,
)
from catalog.testing import gpt2_tokenizer

REFERENCE_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "ioi16-attn-real" / "prompts.jsonl"


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def generated(tok):
    # Enough prompts that every template appears in both name orders.
    return ioi_prompts(240, seed=7, tokenizer=tok)


def _write(tmp_path, lines, name="prompts.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- the generator ---------------------------------------------------------------------------


def test_same_seed_same_prompts_and_different_seed_different(tok):
    a = ioi_prompts(30, seed=3, tokenizer=tok)
    assert a == ioi_prompts(30, seed=3, tokenizer=tok)
    assert [p.text for p in a] != [p.text for p in ioi_prompts(30, seed=4, tokenizer=tok)]
    assert prompts_digest(a) == prompts_digest(ioi_prompts(30, seed=3, tokenizer=tok))


@pytest.mark.parametrize("n", [0, 1, 2, 31, 40])
def test_mixed_has_equal_halves(tok, n):
    got = ioi_prompts(n, seed=0, tokenizer=tok, order="mixed")
    abba = sum(p.name_order == "ABBA" for p in got)
    baba = sum(p.name_order == "BABA" for p in got)
    assert len(got) == n and abba + baba == n
    assert abba - baba == n % 2  # equal, the odd one out going to ABBA


@pytest.mark.parametrize("order", ["ABBA", "BABA"])
def test_single_order(tok, order):
    assert {p.name_order for p in ioi_prompts(20, seed=1, tokenizer=tok, order=order)} == {order}


def test_unknown_order_is_a_catalog_error(tok):
    with pytest.raises(CatalogError, match="ACBD"):
        ioi_prompts(4, seed=0, tokenizer=tok, order="ACBD")


def test_every_template_and_order_is_used(generated):
    used = {(p.template, p.name_order) for p in generated}
    assert used == {(t, o) for t in TEMPLATES for o in ("ABBA", "BABA")}


def test_roles_match_the_tokenization(tok, generated):
    for p in generated:
        ids = tok(p.text)["input_ids"]

        def word(role, ids=ids, p=p):
            return tok.decode([ids[p.roles[role]]])

        answer = tok.decode(ids[-1:])
        # The text ends with the IO name, one token, right after `end`.
        assert p.text.endswith(answer) and answer in NAMES
        assert p.roles["end"] == len(ids) - 2
        assert tok.decode(ids[: p.roles["end"] + 1]) + answer == p.text
        # IO's first mention is the answer; S1 and S2 are one other name.
        assert word("IO") == answer
        assert word("S1") == word("S2") != answer
        assert p.roles["S1"] < p.roles["S2"] and p.roles["IO"] < p.roles["S2"]
        if p.name_order == "ABBA":
            assert p.roles["IO"] < p.roles["S1"]
        else:
            assert p.roles["S1"] < p.roles["IO"]
        if "place" in p.roles:
            assert word("place") in PLACES
        if "object" in p.roles:
            assert word("object") in OBJECTS
        assert ("place" in p.roles) == ("{PLACE}" in TEMPLATES[p.template])
        assert ("object" in p.roles) == ("{OBJECT}" in TEMPLATES[p.template])
        assert all(0 <= pos <= p.roles["end"] for pos in p.roles.values())


def test_generated_prompts_pass_the_checks(tok, generated):
    ids = tokenize_prompts(generated, tok)
    assert [len(x) for x in ids] == [len(tok(p.text)["input_ids"]) for p in generated]


def test_word_lists_are_single_tokens(tok):
    assert len(NAMES) >= 30 and len(PLACES) >= 10 and len(OBJECTS) >= 10
    for word in NAMES + PLACES + OBJECTS:
        assert word.startswith(" ") and len(tok(word)["input_ids"]) == 1, word
    assert len(set(NAMES)) == len(NAMES)


def test_a_multi_token_word_is_left_out_and_the_list_topped_up(tok, monkeypatch):
    assert len(tok(" Xyzzyplughia")["input_ids"]) > 1
    monkeypatch.setattr(prompts_module, "NAMES", (" Xyzzyplughia",) + NAMES)
    # The word drops out; the list keeps its length with the extension pool's first name.
    assert ioi_words(tok).names == NAMES + (EXTRA_NAMES[0],)
    texts = " ".join(p.text for p in ioi_prompts(200, seed=0, tokenizer=tok))
    assert "Xyzzyplughia" not in texts and EXTRA_NAMES[0] + " " in texts


def test_too_few_single_token_words_is_one_error_naming_the_list(tok, monkeypatch):
    monkeypatch.setattr(prompts_module, "NAMES", (" Mary", " Xyzzyplughia", " John"))
    monkeypatch.setattr(prompts_module, "EXTRA_NAMES", (" Sam", " Qwxzzyton"))
    with pytest.raises(CatalogError) as info:
        ioi_prompts(2, seed=0, tokenizer=tok)
    message = str(info.value)
    assert "\n" not in message
    assert "names" in message and "3 of 5" in message and "at least 4" in message
    assert type(tok).__name__ in message and "Xyzzyplughia" in message


# --- reading prompts -------------------------------------------------------------------------


def test_reference_prompts_read_and_pass(tok):
    if not REFERENCE_PROMPTS.exists():
        pytest.skip(f"{REFERENCE_PROMPTS} is absent (the shared reference data is not checked out)")
    got = read_jsonl(REFERENCE_PROMPTS)
    assert len(got) == 16
    ids = tokenize_prompts(got, tok)
    for p, x in zip(got, ids):
        # The reference follows the same convention: the IO name is the token after `end`.
        assert p.roles["end"] == len(x) - 2
        assert tok.decode([x[p.roles["IO"]]]) == tok.decode([x[-1]])
        assert tok.decode([x[p.roles["S1"]]]) == tok.decode([x[p.roles["S2"]]])


def test_round_trip_with_tokens(tok, tmp_path, generated):
    lines = []
    for p in generated[:10]:
        tokens = [tok.decode([i]) for i in tok(p.text)["input_ids"]]
        lines.append(json.dumps({"text": p.text, "roles": p.roles, "tokens": tokens}))
    path = _write(tmp_path, lines[:5] + [""] + lines[5:])  # a blank line is skipped
    got = read_jsonl(path)
    assert [(p.text, p.roles) for p in got] == [(p.text, p.roles) for p in generated[:10]]
    assert prompts_digest(got) == prompts_digest(generated[:10])
    assert tokenize_prompts(got, tok) == tokenize_prompts(generated[:10], tok)


def test_roles_are_optional(tok, tmp_path):
    (p,) = read_jsonl(_write(tmp_path, [json.dumps({"text": "Hello world"})]))
    assert p.roles == {}
    (ids,) = tokenize_prompts([p], tok)
    assert end_positions([p], [ids], tok) == [len(ids) - 1]


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"roles": {"IO": 1}}', "text"),
        ('{"text": 5}', "text"),
        ('{"text": "a b", "roles": [1]}', "roles"),
        ('{"text": "a b", "roles": {"IO": -1}}', "role IO"),
        ('{"text": "a b", "roles": {"IO": 1.5}}', "role IO"),
        ('{"text": "a b", "roles": {"IO": "2"}}', "role IO"),
        ('{"text": "a b", "roles": {"IO": true}}', "role IO"),
        ('{"text": "a b", "tokens": "a b"}', "tokens"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, bad, expected):
    good = json.dumps({"text": "When Mary and John went", "roles": {"IO": 1}})
    path = _write(tmp_path, [good, "", bad])  # the blank line still counts: the bad one is line 3
    with pytest.raises(CatalogError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "line 3" in message and expected in message


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(CatalogError, match="nowhere.jsonl"):
        read_jsonl(tmp_path / "nowhere.jsonl")
    with pytest.raises(CatalogError, match="no prompts"):
        read_jsonl(_write(tmp_path, ["", "  "]))


# --- checks against the tokenization ---------------------------------------------------------


def test_role_outside_the_prompt(tok):
    text = "When Mary and John went to the store"
    n = len(tok(text)["input_ids"])
    ok = Prompt(text, {"IO": 1})
    bad = Prompt(text, {"IO": 1, "S2": n})
    with pytest.raises(CatalogError) as info:
        tokenize_prompts([ok, ok, bad], tok)
    assert str(info.value) == f"prompt 2: role S2 at position {n} is outside the prompt's {n} tokens"
    assert tokenize_prompts([Prompt(text, {"S2": n - 1})], tok)  # the last token is inside


def test_mismatching_tokens(tok):
    text = "When Mary and John went"
    tokens = [tok.decode([i]) for i in tok(text)["input_ids"]]
    assert tokenize_prompts([Prompt(text, {}, tokens=tuple(tokens))], tok)
    wrong = tokens[:2] + [" Jane"] + tokens[3:]
    with pytest.raises(CatalogError, match=r"^prompt 1: .*position 2.*' Jane'"):
        tokenize_prompts([Prompt(text, {}), Prompt(text, {}, tokens=tuple(wrong))], tok)
    with pytest.raises(CatalogError, match=r"^prompt 0: .*tokens"):
        tokenize_prompts([Prompt(text, {}, tokens=tuple(tokens[:-1]))], tok)


def test_mismatching_tokens_from_a_file(tok, tmp_path):
    path = _write(tmp_path, [json.dumps({"text": "Hello world", "tokens": ["Hello", "world"]})])
    with pytest.raises(CatalogError, match="^prompt 0: .*' world'"):
        tokenize_prompts(read_jsonl(path), tok)


def test_empty_text_and_too_many_tokens(tok):
    with pytest.raises(CatalogError, match="^prompt 1: .*empty"):
        tokenize_prompts([Prompt("Hi", {}), Prompt("", {})], tok)
    text = "When Mary and John went to the store"
    n = len(tok(text)["input_ids"])
    assert tokenize_prompts([Prompt(text, {})], tok, max_tokens=n)
    with pytest.raises(CatalogError, match=f"^prompt 0: {n} tokens.*{n - 1}"):
        tokenize_prompts([Prompt(text, {})], tok, max_tokens=n - 1)


# --- end position and digest -----------------------------------------------------------------


def test_end_positions(tok):
    assert end_positions([Prompt("x", {"end": 4}), Prompt("x", {"IO": 1})], [[0] * 9, [0] * 9], tok) == [4, 8]


def test_digest_depends_on_texts_and_roles_only():
    a = [Prompt("When Mary and John", {"IO": 1, "S1": 3}, template="ioi-01")]
    same = [Prompt("When Mary and John", {"S1": 3, "IO": 1})]  # key order and labels do not matter
    assert prompts_digest(a) == prompts_digest(same)
    assert len(prompts_digest(a)) == 64 and int(prompts_digest(a), 16) >= 0
    assert prompts_digest(a) != prompts_digest([Prompt("When Mary and John", {"IO": 1, "S1": 2})])
    assert prompts_digest(a) != prompts_digest([Prompt("When Mary and Jane", {"IO": 1, "S1": 3})])
