"""IOI prompts for tokenizers other than GPT-2's: a Llama-style one (BOS, "▁" word starts),
GPT-2's prompts kept exactly, words that are not single tokens left out, BOS-counted roles."""

import hashlib
import json
import re

import pytest

from catalog.models.checkpoint import file_tokenizer
from catalog.errors import CatalogError
from catalog.prompts import (
    EXTRA_NAMES,
    EXTRA_OBJECTS,
    EXTRA_PLACES,
    NAMES,
    OBJECTS,
    PLACES,
    TEMPLATES,
    Prompt,
    adds_bos,
    answer_tokens,
    end_positions,
    ioi_prompts,
    ioi_words,
    prompts_digest,
    read_jsonl,
    tokenize_prompts,
)
from catalog.testing import gpt2_tokenizer
from catalog.testing.tokenizers import WORD_START, llama_style_tokenizer, save_llama_style_tokenizer

# Kept out of the Llama-style tokenizer's training sentences: several tokens each there.
LEFT_OUT_NAMES = (" Mary", " Jonathan", " Graham")
LEFT_OUT_PLACES = (" hospital",)
LEFT_OUT_OBJECTS = (" basketball", " computer")
LEFT_OUT = LEFT_OUT_NAMES + LEFT_OUT_PLACES + LEFT_OUT_OBJECTS


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return llama_style_tokenizer()


@pytest.fixture(scope="module")
def llama_without():
    return llama_style_tokenizer(left_out=LEFT_OUT)


def _pieces(tokenizer, text):
    """The text's tokens as strings, the word-start mark dropped: '▁Mary' -> 'Mary'."""
    return [piece.removeprefix(WORD_START) for piece in tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])]


def _extra_tokens(tokenizer, before, word):
    """How many tokens `word` adds after `before` (no special tokens)."""
    count = len(tokenizer(before + word, add_special_tokens=False)["input_ids"])
    return count - len(tokenizer(before, add_special_tokens=False)["input_ids"])


def _write_jsonl(tmp_path, records):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# --- GPT-2: the prompts of existing runs ------------------------------------------------------

# Recorded from the generator before it learned other tokenizers: sha256 of [text, roles, template,
# name_order] per prompt (json, sorted keys), and prompts_digest.
GPT2_RECORDED = [
    (1, 0, "mixed", "8748e2b8fed1f5cdbcf95167b0b780e29564c25c70f38d60d9bc3f4f666be267",
     "4011ea9e43e10c0037b12e5b29b0426025beae77ae6773e0a7e01b8e0af7d483"),
    (16, 0, "mixed", "7d3e42868e98141276483ab7cd69cf71df0a1528f96f20750e7691e68b7fe449",
     "eb645544118eadd4e6bfee4a9cbb2c11a2d2e1b2795a9e4b67f94582baadb954"),
    (40, 7, "mixed", "82132d31b9ca7c1895fb30f899cf4109be207e2e6a70e7057e875e8395021988",
     "982804f00bf0230083d4081918b29603ae823fdc5abe398868bfc1af404b81ca"),
    (240, 7, "mixed", "02631c3835477323f85f7dbf3220d5c8f6cb6d19ff76b0fca6dfaa7e22bd57b2",
     "ae68f0904c1539f9090c07ba66de40c665a55ae5a5f7ecacc279db4be5c8b4d5"),
    (100, 123, "mixed", "49277fa4e2ab052fb8a2916ad016c7b778107214080a3d5c1091c1012a0b5f6c",
     "96255d70a0997c42089e8b7a0db218c6b58412fd88d2b88590de8d8338d8782c"),
    (25, 3, "ABBA", "9ad0c972334eac4fd6a5bcc44fd2bcdfb3d20b78a5bdc98592e2cc284b2c554c",
     "f54d4777dedfcd3154f5a184e263ae27497e5b91b0d8231779c7ef0e360bc3a4"),
    (25, 3, "BABA", "dc4ad9e60a7a9cadcdffe6b47eb6ddac1118efc562ab75d8da0c047b83871341",
     "545da22819192ab93fe67492d61aee9c8159a8ac6942afb5ef206b17ae931919"),
    (500, 2024, "mixed", "b11e1570406285d55aa5f47b631db162030261183dd6af7d285ceeb6c3df2e8e",
     "38ff6a362ecb2a169e28f1391fe6173329982f1fd9be1b58776ecee0999d9152"),
]


@pytest.mark.parametrize("n, seed, order, full_digest, digest", GPT2_RECORDED)
def test_gpt2_prompts_are_unchanged(gpt2, n, seed, order, full_digest, digest):
    got = ioi_prompts(n, seed, gpt2, order=order)
    payload = [[p.text, p.roles, p.template, p.name_order] for p in got]
    assert hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest() == full_digest
    assert prompts_digest(got) == digest


def test_gpt2_first_prompts_as_recorded(gpt2):
    got = [(p.text, p.roles, p.template, p.name_order) for p in ioi_prompts(3, 0, gpt2)]
    assert got == [
        ("The office was quiet when Michael met Sarah there. Later, Sarah offered a letter to Michael",
         {"place": 1, "IO": 5, "S1": 7, "S2": 12, "object": 15, "end": 16}, "ioi-07", "ABBA"),
        ("At the beach, Emily and David were thinking about lunch. Emily wanted to give a computer to David",
         {"place": 2, "S1": 4, "IO": 6, "S2": 12, "object": 17, "end": 18}, "ioi-08", "BABA"),
        ("After a long day at the school, Charles sat down with Alice, and Alice showed the basketball to Charles",
         {"place": 6, "IO": 8, "S1": 12, "S2": 15, "object": 18, "end": 19}, "ioi-10", "ABBA"),
    ]


def test_gpt2_uses_the_lists_as_they_are(gpt2):
    words = ioi_words(gpt2)
    assert (words.names, words.places, words.objects) == (NAMES, PLACES, OBJECTS)


def test_extension_pools_are_new_words_of_the_same_form():
    for listed, extra in ((NAMES, EXTRA_NAMES), (PLACES, EXTRA_PLACES), (OBJECTS, EXTRA_OBJECTS)):
        assert len(set(extra)) == len(extra) and not set(extra) & set(listed)
        assert all(word.startswith(" ") and word.strip().isalpha() for word in extra)
    assert all(word[1] not in "aeiou" for word in EXTRA_OBJECTS)  # "a [OBJECT]" stays grammatical


# --- the Llama-style tokenizer ---------------------------------------------------------------


def test_llama_style_tokenizer_is_small_deterministic_and_sentencepiece_like(llama):
    assert len(llama) <= 4096
    assert llama.get_vocab() == llama_style_tokenizer().get_vocab()
    assert llama.convert_ids_to_tokens([llama.bos_token_id, llama.eos_token_id, llama.unk_token_id]) == [
        "<s>", "</s>", "<unk>"]
    # " Mary" on its own is not what it is inside a sentence: the reason words are checked in context.
    assert llama.convert_ids_to_tokens(llama(" Mary")["input_ids"]) == ["<s>", "▁", "▁Mary"]
    assert llama.convert_ids_to_tokens(llama("When Mary")["input_ids"]) == ["<s>", "▁When", "▁Mary"]


def test_llama_style_tokenizer_round_trips_offline(llama, tmp_path):
    from transformers import AutoTokenizer

    save_llama_style_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "When Mary and John went to the store, John gave a drink to Mary"
    assert loaded(text)["input_ids"] == llama(text)["input_ids"]
    assert len(loaded) == len(llama) and loaded.bos_token == "<s>"


def test_left_out_words_are_several_tokens(llama_without):
    for word in LEFT_OUT:
        assert _extra_tokens(llama_without, "When", word) > 1, word


# --- adds_bos --------------------------------------------------------------------------------


def test_adds_bos(gpt2, llama):
    assert adds_bos(gpt2) is False
    assert adds_bos(llama) is True
    assert llama("When")["input_ids"][0] == llama.bos_token_id != gpt2("When")["input_ids"][0]


def test_adds_bos_of_a_checkpoint_directory(gpt2, tmp_path):
    (tmp_path / "gpt2").mkdir()
    gpt2.save_pretrained(tmp_path / "gpt2")
    save_llama_style_tokenizer(tmp_path / "llama")
    for name in ("gpt2", "llama"):
        (tmp_path / name / "config.json").write_text("{}")
    assert adds_bos(file_tokenizer(model_path=tmp_path / "gpt2")) is False
    assert adds_bos(file_tokenizer(model_path=tmp_path / "llama")) is True


# --- generated prompts with a BOS tokenizer ---------------------------------------------------


def _check_roles(tokenizer, prompts):
    """Each role at the token of its word (found in the token strings, not from the generator),
    the BOS first, `end` the template's last word and the answer one token after it."""
    for p in prompts:
        ids = tokenizer(p.text)["input_ids"]
        pieces = _pieces(tokenizer, p.text)
        answer = p.text.rsplit(" ", 1)[1]
        assert ids[0] == tokenizer.bos_token_id and pieces[0] == "<s>"
        # The answer adds exactly one token: the text without it is the tokens before it.
        assert tokenizer(p.text[: -len(" " + answer)])["input_ids"] == ids[:-1]
        assert pieces[-1] == answer and p.roles["end"] == len(ids) - 2
        assert pieces[p.roles["end"]] == TEMPLATES[p.template].split()[-1]
        io_at = [i for i, piece in enumerate(pieces) if piece == answer]
        subject = pieces[p.roles["S2"]]
        assert subject != answer
        assert io_at[0] == p.roles["IO"] and len(io_at) == 2
        assert [i for i, piece in enumerate(pieces) if piece == subject] == [p.roles["S1"], p.roles["S2"]]
        if "place" in p.roles:
            assert " " + pieces[p.roles["place"]] in PLACES + EXTRA_PLACES
            assert p.text.count(" " + pieces[p.roles["place"]]) == 1
        if "object" in p.roles:
            assert " " + pieces[p.roles["object"]] in OBJECTS + EXTRA_OBJECTS
        assert min(p.roles.values()) >= 1  # nothing is the BOS


def test_llama_roles_count_the_bos_and_point_at_their_words(llama):
    generated = ioi_prompts(240, seed=7, tokenizer=llama)
    assert {(p.template, p.name_order) for p in generated} == {(t, o) for t in TEMPLATES for o in ("ABBA", "BABA")}
    _check_roles(llama, generated)


def test_llama_prompts_are_gpt2_texts_with_roles_one_later(gpt2, llama):
    # Every word is one token for both: the same draws, the same texts, each role shifted by the BOS.
    for a, b in zip(ioi_prompts(60, 5, gpt2), ioi_prompts(60, 5, llama)):
        assert a.text == b.text
        assert {role: position + 1 for role, position in a.roles.items()} == b.roles


def test_words_that_are_not_single_tokens_are_never_used(llama_without):
    words = ioi_words(llama_without)
    # Each list keeps its own single-token words, in order, then takes as many from its pool.
    assert words.names == tuple(w for w in NAMES if w not in LEFT_OUT) + EXTRA_NAMES[:3]
    assert words.places == tuple(w for w in PLACES if w not in LEFT_OUT) + EXTRA_PLACES[:1]
    assert words.objects == tuple(w for w in OBJECTS if w not in LEFT_OUT) + EXTRA_OBJECTS[:2]
    generated = ioi_prompts(400, seed=1, tokenizer=llama_without)
    text = "\n".join(p.text for p in generated)
    for word in LEFT_OUT:
        assert not re.search(rf"\b{word.strip()}\b", text), word
    for word in EXTRA_NAMES[:3] + EXTRA_PLACES[:1] + EXTRA_OBJECTS[:2]:
        assert re.search(rf"\b{word.strip()}\b", text), word
    _check_roles(llama_without, generated)


def _one_line_error(tokenizer) -> str:
    with pytest.raises(CatalogError) as info:
        ioi_prompts(4, seed=0, tokenizer=tokenizer)
    message = str(info.value)
    assert "\n" not in message and "TokenizersBackend" in message
    return message


def test_too_few_single_token_names_is_one_error():
    candidates = NAMES + EXTRA_NAMES
    message = _one_line_error(llama_style_tokenizer(left_out=candidates[3:]))
    assert "too few IOI names" in message and f"3 of {len(candidates)}" in message and "at least 4" in message


def test_too_few_single_token_places_is_one_error():
    candidates = PLACES + EXTRA_PLACES
    message = _one_line_error(llama_style_tokenizer(left_out=candidates[1:]))
    assert "too few IOI places" in message and f"1 of {len(candidates)}" in message and "at least 2" in message


def test_a_tiny_vocabulary_falls_short():
    assert "too few IOI names" in _one_line_error(llama_style_tokenizer(vocab_size=300))


def test_words_that_merge_with_the_text_after_them_are_left_out():
    merging = llama_style_tokenizer(isolate_punctuation=False)
    # "▁Mary" alone is one token after "with", but "with Mary," merges into "▁Mary,": the role would
    # not be one token, so no name is usable where templates put a comma or full stop after names.
    assert _extra_tokens(merging, " with", " Mary") == 1
    assert merging.convert_ids_to_tokens(merging(" with Mary,", add_special_tokens=False)["input_ids"])[-1] == "▁Mary,"
    assert "too few IOI names" in _one_line_error(merging)


def test_a_tokenizer_that_also_appends_eos(llama):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(llama.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", llama.bos_token_id), ("</s>", llama.eos_token_id)])
    with_eos = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert adds_bos(with_eos)
    for a, b in zip(ioi_prompts(30, 2, llama), ioi_prompts(30, 2, with_eos)):
        assert a == b  # the EOS after the text moves no role
        assert with_eos(b.text)["input_ids"] == llama(b.text)["input_ids"] + [llama.eos_token_id]


# --- JSONL prompts and answers with a BOS tokenizer -------------------------------------------

TEXT = "When Mary and John went to the store, John gave a drink to Mary"
LLAMA_TOKENS = ["<s>", "When", "Mary", "and", "John", "went", "to", "the", "store", ",", "John", "gave", "a",
                "drink", "to", "Mary"]


def test_jsonl_roles_and_tokens_count_the_bos(llama, tmp_path):
    roles = {"IO": 2, "S1": 4, "S2": 10, "end": 14}
    path = _write_jsonl(tmp_path, [{"text": TEXT, "roles": roles, "tokens": LLAMA_TOKENS}])
    (ids,) = tokenize_prompts(read_jsonl(path), llama)
    assert ids[0] == llama.bos_token_id and len(ids) == 16
    assert llama.convert_ids_to_tokens([ids[2], ids[4], ids[10], ids[14]]) == ["▁Mary", "▁John", "▁John", "▁to"]


def test_jsonl_tokens_without_the_bos_say_so(llama, tmp_path):
    path = _write_jsonl(tmp_path, [{"text": TEXT, "tokens": LLAMA_TOKENS[1:]}])
    with pytest.raises(CatalogError) as info:
        tokenize_prompts(read_jsonl(path), llama)
    message = str(info.value)
    assert message.startswith("prompt 0: ") and "position 0" in message and "'<s>'" in message
    assert "BOS" in message and "\n" not in message


def test_a_role_past_the_end_mentions_the_bos_only_where_there_is_one(gpt2, llama):
    with pytest.raises(CatalogError, match=r"position 16 is outside the prompt's 16 tokens \(.*BOS"):
        tokenize_prompts([Prompt(TEXT, {"end": 16})], llama)
    with pytest.raises(CatalogError) as info:
        tokenize_prompts([Prompt(TEXT, {"end": 15})], gpt2)
    assert str(info.value) == "prompt 0: role end at position 15 is outside the prompt's 15 tokens"


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_text_answers_are_the_token_after_the_text(request, name):
    tokenizer = request.getfixturevalue(name)
    mark = "Ġ" if name == "gpt2" else "▁"  # how each vocabulary spells a word's leading space
    given = Prompt(TEXT, {"IO": 1}, answer=" Mary", wrong=" John")
    ids = tokenize_prompts([given], tokenizer)
    assert answer_tokens([given], ids, tokenizer) == (
        [tokenizer.convert_tokens_to_ids(mark + "Mary")], [tokenizer.convert_tokens_to_ids(mark + "John")])


def test_llama_answer_on_its_own_would_be_three_tokens(llama):
    assert len(llama(" Mary")["input_ids"]) == 3  # BOS, "▁", "▁Mary": the in-context token is "▁Mary"
    given = Prompt(TEXT, {}, answer=" Mary", wrong=7)
    answers, wrongs = answer_tokens([given], tokenize_prompts([given], llama), llama)
    assert llama.convert_ids_to_tokens(answers) == ["▁Mary"] and wrongs == [7]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_multi_token_answer_is_an_error(request, name):
    tokenizer = request.getfixturevalue(name)
    given = Prompt(TEXT, {}, answer=" Mary", wrong=" Xyzzyplughia")
    with pytest.raises(CatalogError, match=r"^prompt 0: wrong ' Xyzzyplughia' does not add exactly one token"):
        answer_tokens([given], tokenize_prompts([given], tokenizer), tokenizer)


def test_ioi_answers_are_the_role_tokens(llama):
    generated = ioi_prompts(12, 0, llama)
    ids = tokenize_prompts(generated, llama)
    answers, wrongs = answer_tokens(generated, ids, llama)
    for p, x, answer, wrong in zip(generated, ids, answers, wrongs):
        assert answer == x[-1] == x[p.roles["IO"]] and wrong == x[p.roles["S1"]] != answer


# --- the finished-run check reads the tokenizer from the checkpoint's files -------------------


@pytest.mark.parametrize("left_out", [(), LEFT_OUT])
def test_file_tokenizer_gives_the_same_prompts(tmp_path, left_out):
    from transformers import AutoTokenizer

    save_llama_style_tokenizer(tmp_path, left_out=left_out)
    (tmp_path / "config.json").write_text("{}")  # what makes the directory a checkpoint
    from_files = file_tokenizer(model_path=tmp_path)
    assert from_files is not None
    expected = ioi_prompts(80, 11, llama_style_tokenizer(left_out=left_out))
    assert ioi_prompts(80, 11, from_files) == expected
    assert ioi_prompts(80, 11, AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)) == expected
    assert expected[0].roles["end"] == len(from_files(expected[0].text)["input_ids"]) - 2


def test_without_an_end_role_the_last_destination_is_the_texts_last_token(llama):
    """A tokenizer that appends an EOS to every text: the EOS is fed to the model (and stored), but
    the default last destination is the text's last token, as for tokenizers that append none."""
    with_eos = llama_style_tokenizer(append_eos=True)
    prompt = Prompt(TEXT, {"IO": 2}, answer=" Mary")
    (ids,) = tokenize_prompts([prompt], with_eos)
    (plain,) = tokenize_prompts([prompt], llama)
    assert ids == plain + [with_eos.eos_token_id]
    assert end_positions([prompt], [ids], with_eos) == end_positions([prompt], [plain], llama) == [len(plain) - 1]
    assert with_eos.convert_ids_to_tokens(ids[len(plain) - 1]) == "▁Mary"
    assert answer_tokens([prompt], [ids], with_eos)[0] == answer_tokens([prompt], [plain], llama)[0]
    assert end_positions([Prompt(TEXT, {"end": 3})], [ids], with_eos) == [3]  # a given end wins
