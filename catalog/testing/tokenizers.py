"""Small tokenizers of other families than GPT-2's, built offline for tests.

No tokenizer can be downloaded here, so the tests train their own with the tokenizers package:
a Llama-style one (SentencePiece conventions: "▁" marks a word start, every text gets a BOS
"<s>") on sentences made from the IOI templates and words, so that the IOI words are single
tokens, except those a test keeps out of the training sentences. Training is deterministic: the
same arguments give the same vocabulary, in any process.
"""

from __future__ import annotations

import string
from pathlib import Path

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
WORD_START = "▁"  # SentencePiece's mark for the space before a word


def ioi_sentences(left_out=()) -> list[str]:
    """Every IOI template filled with every word of the word lists and their extension pools,
    words in `left_out` excepted, each sentence followed by its answer as the generator does."""
    from catalog import prompts

    def kept(*lists):
        return [word for words in lists for word in words if word not in set(left_out)]

    names = kept(prompts.NAMES, prompts.EXTRA_NAMES)
    places = kept(prompts.PLACES, prompts.EXTRA_PLACES)
    objects = kept(prompts.OBJECTS, prompts.EXTRA_OBJECTS)
    if len(names) < 2 or not places or not objects:
        raise ValueError("the training sentences need two names, a place and an object")
    sentences = []
    for template_id in sorted(prompts.TEMPLATES):
        # Each slot follows a space, which the slot word brings itself.
        template = prompts.TEMPLATES[template_id].replace(" {", "{")
        for i, name in enumerate(names):
            other = names[(i + 1) % len(names)]
            text = template.format(N1=name, N2=other, S2=other, PLACE=places[i % len(places)],
                                   OBJECT=objects[i % len(objects)])
            sentences.append(text + name)
    return sentences


def llama_style_tokenizer(vocab_size: int = 4096, left_out=(), isolate_punctuation: bool = True,
                          append_eos: bool = False, extra_sentences=()):
    """A Llama-style BPE tokenizer as a transformers PreTrainedTokenizerFast (`len()` is its
    vocabulary size, `save_pretrained` and `AutoTokenizer.from_pretrained` round-trip offline).

    Trained on `ioi_sentences(left_out)` up to vocab_size tokens: with the default every IOI
    word is one token ("▁Mary") and the vocabulary stops well short of the limit (a few hundred
    tokens); words in `left_out`, or a small vocab_size, give words of several tokens.
    Like SentencePiece (and Llama's tokenizer.json) it puts "▁" before the text, so " Mary" on
    its own is "▁", "▁Mary" but inside "When Mary" just "▁Mary"; it keeps punctuation apart
    from words (unless isolate_punctuation is False: then it learns tokens such as "▁store,"
    and words merge with the comma after them), and prepends the BOS "<s>" to every text (and
    appends the EOS "</s>" with append_eos, as some tokenizers do). `extra_sentences` are trained
    on too (the other built-in datasets' texts, catalog.datasets); none by default, so the
    vocabulary is the IOI one.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.normalizer = normalizers.Prepend(WORD_START)
    # The BOS comes from the post-processor; "▁" from the normalizer, as SentencePiece's dummy prefix.
    split_words = pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="never", split=True)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([split_words, pre_tokenizers.Punctuation(behavior="isolated")])
        if isolate_punctuation else split_words
    )
    backend.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS],
        # Every printable character, so that a word kept out of training is spelled, not unknown.
        initial_alphabet=sorted(set(string.printable.strip()) | {WORD_START}),
        show_progress=False,
    )
    backend.train_from_iterator(ioi_sentences(left_out) + list(extra_sentences), trainer)
    end = f" {EOS}" if append_eos else ""
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A{end}", pair=f"{BOS} $A{end} {BOS} $B{end}",
        special_tokens=[(BOS, backend.token_to_id(BOS)), (EOS, backend.token_to_id(EOS))],
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK)


def save_llama_style_tokenizer(out_dir: str | Path, **options) -> Path:
    """Write `llama_style_tokenizer(**options)` to out_dir (tokenizer.json and tokenizer_config.json)."""
    out_dir = Path(out_dir)
    llama_style_tokenizer(**options).save_pretrained(out_dir)
    return out_dir
