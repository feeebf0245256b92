"""The jobs' own settings (what is not a method's): one frozen dataclass per job, whose fields
give the command line's options, the service's job model and the library's keyword arguments
their names, defaults, help and rules. Importing this module imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from catalog.methods import DEFAULT, NAMES, REGISTRY
from catalog.models.loading import DEVICES, DTYPES
from catalog.settings import at_least, option


def _method_help() -> str:
    """The default method's options stand above --method on the command line, the others below."""
    described = [f"{m.name} ({m.title.split('; ')[0]}; the options {'above' if m.name == DEFAULT else 'below'})"
                 for m in REGISTRY.values()]
    return f"Tracing method: {' or '.join(described)}."


@dataclass(frozen=True)
class IngestSettings:
    """`circuit-catalog ingest` / `catalog.ingest`: the model, the prompts, the method and the batches.
    The method's own settings are its registry entry's class (catalog.methods)."""

    model: str = option("gpt2", "Model name on the Hugging Face hub (or in its local cache), e.g. gpt2-medium, "
                                "EleutherAI/pythia-160m, Qwen/Qwen2.5-0.5B.")
    model_path: Path | None = option(None, "A local Hugging Face checkpoint directory (GPT-2, GPT-NeoX/Pythia, "
                                           "Llama, Qwen2; no network access).", kind=Path)
    device: str = option("cpu", "Where the model runs (auto: cuda when a GPU is usable).", choices=DEVICES)
    dtype: str = option("float32", "The model's weights and activations (bfloat16: see the README's numbers).",
                        choices=DTYPES)
    dataset: str = option("ioi", "Built-in prompt set: ioi, greater-than, pronouns or factual "
                                 "(docs/datasets.md).")
    n_prompts: int = option(256, "Prompts to generate.", rules=(at_least(1),))
    seed: int = option(0, "Seed of the prompt generator.")
    prompts_file: Path | None = option(None, 'A JSONL file: {"text": ..., "roles": {"IO": 2, ..., "end": 18}} '
                                             'per line.', flag="--prompts", kind=Path)
    method: str = option(DEFAULT, _method_help(), choices=NAMES)
    batch_size: int = option(16, "Prompts per committed batch.", rules=(at_least(1),))
    add_model: bool = option(False, "Allow a second model in a catalog that already holds one.")
    new_run: bool = option(False, "Ingest again even if the same run has already finished.")


ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EngineSettings:
    """Where an ingest's batches are analysed: how the job runs, never what it computes, so none
    of these is part of a run's identity (a run started on Ray resumes locally and back)."""

    engine: str = option("local", "Where batches are analysed: local (this process) or ray (workers of a Ray "
                                  "cluster, each loading the model once; pip install circuit-catalog[ray]).",
                         choices=ENGINES)
    ray_address: str | None = option(None, "With --engine ray: the cluster to join (HOST:6379, ray://HOST:10001, "
                                           "auto). Default: a local cluster started for this command.",
                                     metavar="ADDR", kind=str)
    workers: int = option(2, "With --engine ray: Ray workers (actors), each holding one copy of the model.",
                          metavar="N", rules=(at_least(1),))
    gpus_per_worker: float = option(0.0, "With --engine ray: GPUs each worker reserves (with --device cuda; "
                                         "fractions share a GPU).", metavar="G", rules=(at_least(0),))


# The fields shared by every command that loads a model by name (decompose, ingest).
MODEL_FIELDS = ("model", "model_path", "device", "dtype")
# Where the method's options stand among ingest's (the command line's order).
METHOD_OPTIONS_AFTER = "prompts_file"

MODES = ("local", "global")


@dataclass(frozen=True)
class InterveneSettings:
    """`circuit-catalog intervene` / `catalog.intervene`: which edges of which run, how, on what."""

    run_id: int | None = option(None, "Run id. Default: the latest finished run.", flag="--run", kind=int)
    mode: str = option("local", "local: only the downstream head's query/key input; global: the upstream "
                                "component's output.", choices=MODES)
    boost: bool = option(False, "Add the signal once more instead of removing it (ablate).")
    top_edges: int | None = option(None, "The N heaviest edges of each prompt.", metavar="N", kind=int,
                                   rules=(at_least(1),))
    min_weight: float | None = option(None, "Edges of weight >= W.", metavar="W", kind=float)
    prompt_id: int | None = option(None, "Only prompt P.", flag="--prompt", metavar="P", kind=int)
    heads: str | None = option(None, "Only edges into these downstream heads.", metavar="L.H,...", kind=str)
    model_path: Path | None = option(None, "The run's checkpoint directory, if not where the run recorded it.",
                                     kind=Path)
    model: str | None = option(None, "The run's model on the Hugging Face hub (default: the run's).", kind=str)
    device: str = option("cpu", "Where the model runs (auto: cuda when a GPU is usable).", choices=DEVICES)
    batch_size: int = option(16, "Prompts per clean pass and commit.", rules=(at_least(1),))
