"""JSONL prompts that ask for a BOS the tokenizer does not add, and refusals said before the model loads.

The refusals are checked on checkpoint directories that hold a config.json and nothing else: a
job that tried to load the weights would fail with another message, so the message asserted
proves the check came first.
"""

import json

import pytest

from catalog.errors import CatalogError
from catalog.jobs.ingest import ingest
from catalog.prompts import Prompt, answer_tokens, end_positions, prompts_digest, read_jsonl, tokenize_prompts
from catalog.testing import gpt2_tokenizer

TEXT = "When Mary and John went to the store, John gave a drink to Mary"


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def test_prepend_bos_puts_the_bos_first_and_roles_count_it(tokenizer, tmp_path):
    own = tokenizer(TEXT)["input_ids"]
    assert own[0] != tokenizer.bos_token_id  # GPT-2's tokenizer adds none
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"text": TEXT, "roles": {"IO": 2, "S1": 4}, "prepend_bos": True,
                                "tokens": ["<|endoftext|>"] + [tokenizer.decode([t]) for t in own]}) + "\n"
                    + json.dumps({"text": TEXT, "roles": {"IO": 1, "S1": 3}}) + "\n")
    with_bos, without = read_jsonl(path)
    assert with_bos.prepend_bos and not without.prepend_bos
    ids = tokenize_prompts([with_bos, without], tokenizer)
    assert ids[0] == [tokenizer.bos_token_id] + own and ids[1] == own
    answers, wrongs = answer_tokens([with_bos, without], ids, tokenizer)
    assert answers[0] == answers[1] == own[1] and wrongs[0] == wrongs[1] == own[3]  # " Mary", " John"
    assert end_positions([with_bos, without], ids, tokenizer) == [len(own), len(own) - 1]
    # The same text with and without a BOS is another prompt set.
    assert prompts_digest([with_bos]) != prompts_digest([without])


def test_prepend_bos_must_be_a_boolean(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"text": TEXT, "prepend_bos": "yes"}) + "\n")
    with pytest.raises(CatalogError, match="prepend_bos.*true or false"):
        read_jsonl(path)


def test_prepend_bos_needs_a_bos_token(tokenizer):
    class NoBos:
        bos_token_id = None

        def __call__(self, text, add_special_tokens=True):
            return tokenizer(text, add_special_tokens=add_special_tokens)

    with pytest.raises(CatalogError, match="has no BOS token"):
        tokenize_prompts([Prompt(text=TEXT, roles={}, prepend_bos=True)], NoBos())


def _config_only(tmp_path, **config):
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_unread_family_is_refused_before_loading(tmp_path):
    checkpoint = _config_only(tmp_path, model_type="mamba")
    with pytest.raises(CatalogError, match="model of type 'mamba'; the catalog reads"):
        ingest(tmp_path / "c.duckdb", model_path=checkpoint, method="accpp", n_prompts=2)


def test_accpp_heads_outside_the_checkpoint_are_refused_before_loading(tmp_path):
    checkpoint = _config_only(tmp_path, model_type="llama", num_hidden_layers=4, num_attention_heads=4)
    with pytest.raises(CatalogError, match="no head 9.9: the model has layers 0..3"):
        ingest(tmp_path / "c.duckdb", model_path=checkpoint, method="accpp", seeding="none", heads="9.9",
               n_prompts=2)


def test_unread_gpt2_variant_is_refused_before_loading(tmp_path):
    checkpoint = _config_only(tmp_path, model_type="gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(CatalogError, match="scales attention scores per layer"):
        ingest(tmp_path / "c.duckdb", model_path=checkpoint, method="accpp", n_prompts=2)


def test_cli_refusal_before_loading_is_one_error_line(tmp_path):
    from click.testing import CliRunner

    from catalog.cli import main

    checkpoint = _config_only(tmp_path, model_type="qwen2", num_hidden_layers=2, num_attention_heads=4)
    result = CliRunner().invoke(main, ["ingest", "--db", str(tmp_path / "c.duckdb"), "--model-path", str(checkpoint),
                                       "--method", "accpp", "--seeding", "none", "--heads", "1.7"])
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines() == ["error: no head 1.7: the model has heads 0..3 in each layer"]


def test_a_cached_hub_models_family_is_checked_before_loading(tmp_path, monkeypatch):
    """A hub name whose config.json is in the local cache is checked from it, without the network."""
    import huggingface_hub

    config = _config_only(tmp_path, model_type="mamba") / "config.json"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda name, filename: str(config) if name == "someone/mamba-tiny" else None)
    with pytest.raises(CatalogError, match="someone/mamba-tiny is a model of type 'mamba'"):
        ingest(tmp_path / "c.duckdb", model="someone/mamba-tiny", method="accpp", n_prompts=2)
