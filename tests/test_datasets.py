"""The built-in datasets besides IOI (catalog.datasets): built for GPT-2's tokenizer and a
Llama-style one, roles on the tokens they name, answer and wrong tokens as each task defines
them (read back from the texts and the word lists, not from the generator), deterministic in
the seed, fills with words that are not single tokens dropped and counted; and an ingest of each."""

import re

import duckdb
import pytest
from click.testing import CliRunner

from catalog.cli import main
from catalog.datasets import (
    FACT_TEMPLATES,
    FACTS,
    FEMALE_NAMES,
    MALE_NAMES,
    PRONOUN_TEMPLATES,
    built_in_prompts,
)
from catalog.errors import CatalogError
from catalog.prompts import tokenize_prompts
from catalog.testing import gpt2_tokenizer
from catalog.testing.tokenizers import llama_style_tokenizer

N = 24


def _dataset_sentences(left_out=()):
    """Every pronoun and factual fill with its answer, for the Llama-style tokenizer to learn."""
    sentences = []
    for template in PRONOUN_TEMPLATES.values():
        for name in FEMALE_NAMES + MALE_NAMES:
            if name not in left_out:
                sentences += [template.replace(" {NAME}", name) + pronoun for pronoun in (" she", " he")]
    for relation, template in FACT_TEMPLATES.items():
        for subject, obj in FACTS[relation]:
            text = template.replace("[", "").replace("]", "").replace("{S}", subject)
            sentences += [text + obj] * 3
    return sentences


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return llama_style_tokenizer(extra_sentences=_dataset_sentences())


@pytest.fixture(scope="module")
def llama_without_mary():
    return llama_style_tokenizer(left_out=(" Mary",), extra_sentences=_dataset_sentences(left_out=(" Mary",)))


def _token(tokenizer, ids, position):
    return tokenizer.decode([ids[position]]).replace("▁", " ")


def _check_pronouns(tokenizer, built):
    gender_of = {**{name: " she" for name in FEMALE_NAMES}, **{name: " he" for name in MALE_NAMES}}
    ids_list = tokenize_prompts(built.prompts, tokenizer)
    for prompt, ids in zip(built.prompts, ids_list):
        name = " " + re.match(r"So (\w+) is", prompt.text).group(1)
        assert _token(tokenizer, ids, prompt.roles["name"]).strip() == name.strip()
        assert prompt.roles["end"] == len(ids) - 1 and prompt.text.endswith("isn't")
        assert tokenizer.decode([prompt.answer]).replace("▁", " ").strip() == gender_of[name].strip()
        other = " he" if gender_of[name] == " she" else " she"
        assert tokenizer.decode([prompt.wrong]).replace("▁", " ").strip() == other.strip()


def _check_factual(tokenizer, built):
    object_of = {(relation, subject): obj for relation, facts in FACTS.items() for subject, obj in facts}
    ids_list = tokenize_prompts(built.prompts, tokenizer)
    for prompt, ids in zip(built.prompts, ids_list):
        relation = prompt.template
        keyword = re.search(r"\[(\w+)\]", FACT_TEMPLATES[relation]).group(1)
        pattern = re.escape(FACT_TEMPLATES[relation]).replace(r"\{S\}", "(.+)").replace(r"\[", "").replace(r"\]", "")
        subject = re.fullmatch(pattern, prompt.text).group(1)
        assert _token(tokenizer, ids, prompt.roles["relation"]).strip() == keyword
        # The subject role is the subject's last token: the text up to it ends with the subject.
        assert tokenizer.decode(ids[:prompt.roles["subject"] + 1]).endswith(subject)
        assert not tokenizer.decode(ids[:prompt.roles["subject"]]).endswith(subject)
        assert prompt.roles["end"] == len(ids) - 1
        answer = tokenizer.decode([prompt.answer]).replace("▁", " ").strip()
        wrong = tokenizer.decode([prompt.wrong]).replace("▁", " ").strip()
        assert answer and object_of[(relation, subject)].strip().startswith(answer)
        others = [obj.strip() for s, obj in FACTS[relation] if s != subject]
        assert prompt.answer != prompt.wrong and any(obj.startswith(wrong) for obj in others)


def test_greater_than_with_gpt2(gpt2):
    built = built_in_prompts("greater-than", N, 7, gpt2)
    assert len(built.prompts) == N
    for prompt, ids in zip(built.prompts, tokenize_prompts(built.prompts, gpt2)):
        century, yy, end_century = re.search(r"year (\d\d)(\d\d) .* year (\d\d)$", prompt.text).groups()
        assert century == end_century
        assert _token(gpt2, ids, prompt.roles["YY"]) == yy
        assert prompt.roles["end"] == len(ids) - 1 and _token(gpt2, ids, prompt.roles["end"]) == f" {century}"
        answer, wrong = int(gpt2.decode([prompt.answer])), int(gpt2.decode([prompt.wrong]))
        assert answer > int(yy) >= wrong
        # The answer continues the text as one token: the text plus it is the four-digit year.
        assert gpt2(prompt.text + gpt2.decode([prompt.answer]))["input_ids"] == ids + [prompt.answer]


def test_greater_than_needs_two_digit_tokens(llama):
    with pytest.raises(CatalogError, match="single tokens for two-digit numbers"):
        built_in_prompts("greater-than", 4, 0, llama)


def test_pronouns_and_factual_with_gpt2(gpt2):
    pronouns, factual = built_in_prompts("pronouns", N, 1, gpt2), built_in_prompts("factual", N, 1, gpt2)
    assert len(pronouns.prompts) == len(factual.prompts) == N
    _check_pronouns(gpt2, pronouns)
    _check_factual(gpt2, factual)
    assert {p.template for p in factual.prompts} == set(FACT_TEMPLATES)


def test_pronouns_and_factual_with_a_llama_style_tokenizer(llama):
    pronouns, factual = built_in_prompts("pronouns", N, 2, llama), built_in_prompts("factual", N, 2, llama)
    assert len(pronouns.prompts) == len(factual.prompts) == N
    assert all(p.roles["name"] >= 1 for p in pronouns.prompts)  # position 0 is the BOS
    assert llama(pronouns.prompts[0].text)["input_ids"][0] == llama.bos_token_id
    _check_pronouns(llama, pronouns)
    _check_factual(llama, factual)


def test_names_that_are_not_single_tokens_are_dropped_and_counted(llama, llama_without_mary):
    assert len(llama_without_mary(" Mary", add_special_tokens=False)["input_ids"]) > 1
    built = built_in_prompts("pronouns", 60, 3, llama_without_mary)
    assert len(built.prompts) == 60 and "Mary" not in " ".join(p.text for p in built.prompts)
    # The same draws with Mary a single token: the dropped fills are exactly those that drew her.
    with_mary = built_in_prompts("pronouns", 60, 3, llama)
    assert with_mary.dropped == 0 and built.dropped == sum("Mary" in p.text for p in
                                                           built_in_prompts("pronouns", 60 + built.dropped, 3,
                                                                            llama).prompts)
    _check_pronouns(llama_without_mary, built)


@pytest.mark.parametrize("dataset", ["greater-than", "pronouns", "factual"])
def test_deterministic_in_the_seed(gpt2, dataset):
    texts = lambda seed: [(p.text, p.roles, p.answer, p.wrong) for p in built_in_prompts(dataset, 12, seed, gpt2).prompts]
    assert texts(5) == texts(5) and texts(5) != texts(6)


@pytest.mark.parametrize("dataset", ["greater-than", "pronouns", "factual"])
def test_ingest_each_dataset_with_sad(tmp_path, tiny_checkpoint, gpt2, dataset):
    db = tmp_path / "c.duckdb"
    result = CliRunner().invoke(main, ["ingest", "--db", str(db), "--model-path", str(tiny_checkpoint),
                                       "--dataset", dataset, "--n-prompts", "4", "--seed", "4", "--method", "sad"])
    assert result.exit_code == 0, result.output
    built = built_in_prompts(dataset, 4, 4, gpt2)
    expected = built.prompts
    if built.dropped:  # greater-than, seed 4: GPT-2 has single tokens for some four-digit years
        assert f"--dataset {dataset}: {built.dropped} template fills dropped" in result.output
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT dataset, seed FROM runs").fetchall() == [(dataset, 4)]
    stored = con.execute("SELECT text, answer_token_id, wrong_token_id, end_pos FROM prompts ORDER BY prompt_id").fetchall()
    assert stored == [(p.text, p.answer, p.wrong, p.roles["end"]) for p in expected]
    roles = con.execute("SELECT prompt_id, role, pos FROM tokens WHERE role IS NOT NULL").fetchall()
    assert sorted(roles) == sorted((i, r, pos) for i, p in enumerate(expected) for r, pos in p.roles.items())
    assert con.execute("SELECT status FROM runs").fetchall() == [("finished",)]
    con.close()


def test_an_unknown_dataset_is_one_error_line(tmp_path, tiny_checkpoint):
    result = CliRunner().invoke(main, ["ingest", "--db", str(tmp_path / "c.duckdb"), "--model-path",
                                       str(tiny_checkpoint), "--dataset", "arithmetic", "--n-prompts", "2"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: unknown dataset 'arithmetic'")


def test_the_service_checks_the_dataset_as_ingest_does():
    from catalog.service.jobs import IngestSettings as JobModel
    from catalog.service.validation import check_job

    for dataset in ("ioi", "greater-than", "pronouns", "factual"):
        check_job(JobModel(dataset=dataset, n_prompts=4), allowed_dirs=[])
    with pytest.raises(CatalogError, match="unknown dataset 'arithmetic'"):
        check_job(JobModel(dataset="arithmetic", n_prompts=4), allowed_dirs=[])
