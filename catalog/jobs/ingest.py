"""The catalog's main job: decompose the model, run a prompt set, store firings, signals and edges.

Work proceeds in batches of prompts; each batch's rows and its `run_batches` record are
committed in one transaction. Running the same command again after an interruption (Ctrl-C,
kill -9) finds the unfinished run with the same model, prompts and settings and does only the
batches that are missing, so the finished catalog equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import time

import catalog
from catalog.errors import CatalogError
from catalog.jobs.settings import IngestSettings
from catalog.stopping import check_stop
from catalog.methods import REGISTRY, method
from catalog.settings import build, fields_of, flag_of
from catalog.store import Catalog, check_catalog_file


class Interrupted(CatalogError):
    """Ctrl-C during an ingest: what is committed stays, the same command resumes."""


def decompose_model(cat: Catalog, model, add_model: bool = False, say=None) -> tuple[int, bool]:
    """The model's id in the catalog, decomposing and storing it first if it is new there.

    Returns (model_id, stored_now). A catalog holds one model unless add_model is given, so that
    results of another model never mix into it by accident.
    """
    from catalog.methods.shared.svd import to_arrow

    digest = model.weights_digest()
    known = cat.model_by_digest(digest)
    if known:
        return known["model_id"], False
    others = cat.con.execute("SELECT name FROM models ORDER BY model_id").fetchall()
    if others and not add_model:
        raise CatalogError(
            f"{cat.path} was built from model '{others[0][0]}', not from {model.name} (other weights); "
            "use another --db file, or --add-model to keep several models in one catalog"
        )
    row = {"name": model.name, "n_layers": model.n_layers, "n_heads": model.n_heads, "d_model": model.d_model,
           "d_head": model.d_head, "weights_digest": digest, "processing": model.processing}
    if model.adapter.rotary is not None:
        # A rotary model's forms depend on the offset i - j: they are computed and stored as the
        # firings of a run need them (catalog.methods.sad.rotary), not here.
        return cat.add_model(row, None, model.adapter.record()), True
    if say is not None:
        say(f"decomposing the {model.n_layers * model.n_heads} heads of {model.name} ...")
    W_Q, b_Q, W_K, b_K, _ = model.attention_weights()
    return cat.add_model(row, to_arrow(_decompose_by_layer(W_Q, b_Q, W_K, b_K)), model.adapter.record()), True


def _decompose_by_layer(W_Q, b_Q, W_K, b_K):
    """The decomposition one layer at a time (each layer's heads batched, as one call would do
    them), with a stop check between layers: a service's stop or cancel comes within one layer's
    time, not after the whole model's (a large model takes a while)."""
    import torch

    from catalog.methods.shared.svd import Decomposition, decompose

    layers = []
    for layer in range(W_Q.shape[0]):
        check_stop()
        layers.append(decompose(W_Q[layer:layer + 1], b_Q[layer:layer + 1], W_K[layer:layer + 1],
                                b_K[layer:layer + 1]))
    check_stop()
    return Decomposition(*(torch.cat([getattr(d, name) for d in layers]) for name in ("sigma", "U", "V")))


def load_prompts(dataset: str, n_prompts: int, seed: int, items, lm, say=lambda text: None):
    """The prompt set (items read from a JSONL file, or a built-in dataset, catalog.datasets) and its
    tokenization for the model `lm`, validated (CatalogError on any mismatch)."""
    from catalog import prompts as prompt_sets
    from catalog.datasets import built_in_prompts
    from catalog.models.families.base import token_limit

    if items is None:
        built = built_in_prompts(dataset, n_prompts, seed, lm.tokenizer)
        items = built.prompts
        if built.dropped:
            say(f"--dataset {dataset}: {built.dropped} template fills dropped (words not single tokens "
                "for this tokenizer)")
    max_tokens, limit = token_limit(lm.n_ctx, lm.adapter.rotary)
    return items, prompt_sets.tokenize_prompts(items, lm.tokenizer, max_tokens=max_tokens, limit=limit)


def _prompt_tables(items, token_lists, answers, wrongs, tokenizer):
    import pyarrow as pa

    from catalog.prompts import end_positions

    prompts = pa.table({
        "prompt_id": pa.array(range(len(items)), pa.int32()),
        "text": [p.text for p in items],
        "n_tokens": pa.array([len(t) for t in token_lists], pa.int16()),
        "end_pos": pa.array(end_positions(items, token_lists, tokenizer), pa.int16()),
        "template": [p.template for p in items],
        "name_order": [p.name_order for p in items],
        "answer_token_id": pa.array(answers, pa.int32()),
        "wrong_token_id": pa.array(wrongs, pa.int32()),
    })
    columns = {"prompt_id": [], "pos": [], "token_id": [], "token": [], "role": []}
    for prompt_id, (item, ids) in enumerate(zip(items, token_lists)):
        role_at = {pos: role for role, pos in item.roles.items()}
        for pos, token_id in enumerate(ids):
            columns["prompt_id"].append(prompt_id)
            columns["pos"].append(pos)
            columns["token_id"].append(token_id)
            columns["token"].append(tokenizer.decode([token_id]))
            columns["role"].append(role_at.get(pos))
    tokens = pa.table({
        "prompt_id": pa.array(columns["prompt_id"], pa.int32()), "pos": pa.array(columns["pos"], pa.int16()),
        "token_id": pa.array(columns["token_id"], pa.int32()), "token": columns["token"],
        "role": pa.array(columns["role"], pa.string()),
    })
    return prompts, tokens


def resolve_settings(settings: IngestSettings | None = None, method_settings=None, **keywords):
    """(the job's settings, its method, the method's settings) from a settings object and/or the
    command line's option names as keywords (keywords win); each checked, one CatalogError line."""
    job_names = {f.name for f in dataclasses.fields(IngestSettings)}
    job_values = dict(dataclasses.asdict(settings) if settings is not None else {},
                      **{k: v for k, v in keywords.items() if k in job_names})
    chosen = method(job_values.get("method"))
    job = build(IngestSettings, job_values)
    if method_settings is not None and not isinstance(method_settings, chosen.settings):
        raise CatalogError(f"method_settings is a {type(method_settings).__name__}, not the "
                           f"{chosen.settings.__name__} of --method {chosen.name}")
    own = {f.name for f in dataclasses.fields(chosen.settings)}
    values = dataclasses.asdict(method_settings) if method_settings is not None else {}
    for name, value in keywords.items():
        if name in own:
            values[name] = value
        elif name not in job_names:
            owner = next((m for m in REGISTRY.values() if name in {f.name for f in fields_of(m.settings)}), None)
            if owner is None:
                raise CatalogError(f"unknown setting {name} (known: {', '.join(sorted(job_names | own))})")
            flag = flag_of(next(f for f in fields_of(owner.settings) if f.name == name))
            raise CatalogError(f"{flag} applies to --method {owner.name}, not to --method {chosen.name}")
    return job, chosen, build(chosen.settings, values)


def file_prompts(job: IngestSettings) -> list | None:
    """The job's prompts read from its JSONL file (checked), or None for the built-in prompt set;
    one CatalogError line for a bad file or an unknown dataset. The service checks a submitted job
    with it too."""
    from catalog.datasets import DATASETS
    from catalog.prompts import read_jsonl

    if job.prompts_file is not None:
        return read_jsonl(job.prompts_file)
    if job.dataset not in DATASETS:
        raise CatalogError(f"unknown dataset '{job.dataset}': use --dataset {', '.join(DATASETS)} "
                           "or --prompts FILE.jsonl")
    return None


def ingest(db_path, *, settings: IngestSettings | None = None, method_settings=None, show_progress: bool = False,
           on_batch=None, on_run=None, loaded_model=None, engine=None, **keywords) -> dict:
    """Run (or resume) an ingest into the catalog at db_path; return a summary dict.

    The twin of `circuit-catalog ingest`: `settings` (catalog.jobs.settings.IngestSettings) and/or
    keywords named as its options (model, model_path, dataset, n_prompts=256, seed, prompts_file,
    method="sad", batch_size, add_model, new_run, device, dtype) with the same defaults, and the
    method's settings (catalog.methods: SadSettings, AccppSettings) as `method_settings` and/or
    keywords (attn_threshold, ..., or threshold, ig_steps, seeding, ...). An option of another
    method is refused, as on the command line. A finished run with the same model, prompts and
    settings is not repeated (its summary is returned, with "already_finished") unless new_run.

    device ('cpu', 'cuda', 'auto') and dtype ('float32', 'bfloat16') are where and in what the model
    runs; a bfloat16 model has other weights (its digest differs), so its runs are another model's.
    on_batch(batch_index) is called after each committed batch (tests use it to interrupt).
    on_run(run_id) is called once the run's row exists (created or found to resume), before its
    first batch: a service's job knows its run even if it is stopped before a batch commits.
    loaded_model lets a caller reuse a model it has already loaded.
    engine (catalog.jobs.ray_engine.RayEngine) analyses the batches elsewhere; this process stays
    their only writer. None: they are analysed here.
    """
    job, chosen, method_settings = resolve_settings(settings, method_settings, **keywords)
    model, model_path, dataset, n_prompts, seed = job.model, job.model_path, job.dataset, job.n_prompts, job.seed
    prompts_file, batch_size, device, dtype = job.prompts_file, job.batch_size, job.device, job.dtype
    from catalog.prompts import answer_tokens, prompts_digest

    say = _status if show_progress else (lambda text: None)
    items = file_prompts(job)  # a bad file fails before the slow model load
    if items is not None:
        dataset = str(prompts_file)
    started = time.perf_counter()
    check_catalog_file(db_path)  # so does a file that is not a DuckDB database
    from catalog.models.loading import check_family, resolve_device

    # So do a missing GPU and a family the catalog does not read.
    resolve_device(device)
    config = check_family(model, model_path, chosen.name)
    if config is not None and chosen.check_config is not None:
        chosen.check_config(method_settings, config)  # a setting this checkpoint cannot take
    # What identifies a run besides the model and the prompts: runs' columns and the JSON settings.
    identity = {"dataset": dataset, "n_prompts": len(items) if items is not None else n_prompts,
                "batch_size": batch_size, "method": chosen.name, **method_settings.columns()}
    recorded = method_settings.record()
    from catalog.models.checkpoint import checkpoint_digest

    # The digest of the files the model is loaded from (a caller's loaded model has no known files).
    files_digest = checkpoint_digest(model, model_path, dtype) if loaded_model is None else None
    if not job.new_run and files_digest is not None:
        # A finished run is recognised from the checkpoint's files, the prompts and the settings,
        # without loading the model (catalogs written before checkpoint digests were recorded
        # fall through to the load below, which recognises the run by the weights themselves).
        found = _finished_run(db_path, files_digest, model, model_path, dataset, n_prompts, seed, items,
                              identity, recorded)
        if found is not None:
            return found
    lm = loaded_model
    if lm is None:
        from catalog.models.loading import load_model

        check_stop()  # the slow phases begin: a service's stop or cancel is honoured between them
        say(f"loading model {model_path or model} ...")
        lm = load_model(model, model_path, device=device, dtype=dtype)
    # Prompts are tokenized and checked before the catalog is touched: bad prompts store nothing.
    check_stop()
    items, token_lists = load_prompts(dataset, n_prompts, seed, items, lm, say)
    answers, wrongs = answer_tokens(items, token_lists, lm.tokenizer)
    if chosen.check_inputs is not None:
        chosen.check_inputs(method_settings, lm, items, answers, wrongs)
    digest = prompts_digest(items)
    with Catalog(db_path) as cat:
        model_id, _ = decompose_model(cat, lm, add_model=job.add_model, say=say)
        run = cat.find_run(model_id, digest, identity, recorded)
        if run is not None and run["status"] == "finished" and not job.new_run:
            return dict(summarize(cat.con, cat.path, run["run_id"], _run_seconds(run)), already_finished=True)
        if run is None or run["status"] == "finished":
            prompts, tokens = _prompt_tables(items, token_lists, answers, wrongs, lm.tokenizer)
            params = dict(identity, model=None if model_path else model,
                          model_path=str(model_path) if model_path else None,
                          seed=seed if prompts_file is None else None,
                          prompts_file=str(prompts_file) if prompts_file else None, settings=recorded,
                          checkpoint_digest=files_digest, device=device, dtype=dtype,
                          prepend_bos=[index for index, item in enumerate(items) if item.prepend_bos])
            row = dict(identity, model_id=model_id, seed=params["seed"], prompts_digest=digest,
                       params=params, package_version=catalog.__version__, settings=recorded,
                       weight_unit=chosen.weight_unit, has_bos=_every_prompt_has_bos(items, lm.tokenizer))
            run_id, resumed = cat.create_run(row, prompts, tokens), False
        else:
            run_id, resumed = run["run_id"], True
        if on_run is not None:
            on_run(run_id)
        check_stop()  # after the decomposition, before the batches (on_batch checks between them)
        done = cat.committed_batches(run_id)
        context = _analysis_context(cat, lm, model_id, method_settings, items, token_lists, answers, wrongs, say)
        analyse = chosen.load_analysis()(context)  # also stores the forms the method keeps (once per model)
        check_stop()  # storing those forms takes a while for a large model
        analysed = (lambda pending: ((b, ids, analyse(ids)) for b, ids in pending)) if engine is None \
            else engine.analysed(job, chosen, context)
        return _run_batches(cat, run_id, resumed, len(items), batch_size, analysed, done, show_progress,
                            on_batch, started)


def _every_prompt_has_bos(items, tokenizer) -> bool:
    """runs.has_bos: position 0 of every prompt is a BOS, the tokenizer's own or asked for (prepend_bos)."""
    from catalog.prompts import adds_bos

    return adds_bos(tokenizer) or (bool(items) and all(item.prepend_bos for item in items))


def _status(text: str) -> None:
    """A status line on stderr for the slow steps before the progress bar (model load, decomposition)."""
    import sys

    print(text, file=sys.stderr, flush=True)


def _run_seconds(run: dict) -> float:
    """A finished run's own duration, finished_at - started_at (a resumed run: from its first start)."""
    started, finished = run.get("started_at"), run.get("finished_at")
    return (finished - started).total_seconds() if started and finished else float("nan")


def _finished_run(db_path, files_digest, model, model_path, dataset, n_prompts, seed, items, identity,
                  recorded) -> dict | None:
    """The summary of the finished run with these checkpoint files, prompts and settings, found
    without loading the model; None when there is none or it cannot be told without the model."""
    from pathlib import Path

    from catalog.prompts import prompts_digest

    if not Path(db_path).exists():
        return None
    if items is None:  # the built-in prompts depend on the tokenizer: read it from the checkpoint's files
        from catalog.datasets import built_in_prompts
        from catalog.models.checkpoint import file_tokenizer

        tokenizer = file_tokenizer(model, model_path)
        if tokenizer is None:
            return None
        items = built_in_prompts(dataset, n_prompts, seed, tokenizer).prompts
    digest = prompts_digest(items)
    with Catalog(db_path) as cat:
        model_ids = [r[0] for r in cat.con.execute(
            "SELECT DISTINCT model_id FROM runs WHERE status = 'finished' "
            "AND json_extract_string(params, '$.checkpoint_digest') = ? ORDER BY model_id", [files_digest]).fetchall()]
        for model_id in model_ids:
            run = cat.find_run(model_id, digest, identity, recorded)
            if run is not None and run["status"] == "finished":
                return dict(summarize(cat.con, cat.path, run["run_id"], _run_seconds(run)), already_finished=True)
    return None


def _analysis_context(cat, lm, model_id, method_settings, items, token_lists, answers, wrongs, say):
    """What the method's batch analysis gets: the prompts, and the model's stored forms through
    two callbacks (methods never open the store)."""
    from catalog.methods.context import AnalysisContext
    from catalog.prompts import end_positions

    def stored_form(form: str):
        return cat.con.sql(
            "SELECT layer, head, sv, sigma, u, v FROM singular_vectors WHERE model_id = ? AND form = ? "
            "AND pos_offset IS NULL", params=[model_id, form]).to_arrow_table()

    def store_form(form: str, make_table) -> None:
        if not cat.has_singular_vectors(model_id, form):
            cat.add_singular_vectors(model_id, make_table())

    return AnalysisContext(model=lm, settings=method_settings, items=items, token_lists=token_lists,
                           end_pos=end_positions(items, token_lists, lm.tokenizer), answers=answers,
                           wrongs=wrongs, stored_form=stored_form, store_form=store_form, say=say)


def progress_postfix(firings: int, edges: int) -> str:
    """The progress bar's counts, as plain integers (tqdm's own formatting turns 100000 into 1e+05)."""
    return f"firings={int(firings)}, edges={int(edges)}"


def _run_batches(cat, run_id, resumed, n, batch_size, analysed, done, show_progress, on_batch, started) -> dict:
    """Analyse and commit the batches not in `done`. The bar and its counts are the whole run's
    (a resumed run starts at what earlier sessions committed); the summary says both.

    analysed([(batch, prompt ids), ...]) yields (batch, prompt ids, tables) for each of them, in
    any order (an engine's workers finish batches out of order); it is closed when this ends."""
    from tqdm import tqdm

    batches = [(b, range(start, min(start + batch_size, n))) for b, start in enumerate(range(0, n, batch_size))]
    firings, edges = cat.con.execute(
        "SELECT coalesce(sum(n_firings), 0), coalesce(sum(n_edges), 0) FROM run_batches WHERE run_id = ?",
        [run_id]).fetchall()[0]
    counts = {"firings": int(firings), "edges": int(edges)}
    prompts_before = sum(len(ids) for b, ids in batches if b in done)
    bar = tqdm(total=n, initial=prompts_before, unit="prompt", disable=not show_progress, dynamic_ncols=True,
               desc=f"run {run_id}" + (" (resumed), counts of the whole run" if resumed else ""),
               postfix=progress_postfix(counts["firings"], counts["edges"]))
    results = analysed([(b, ids) for b, ids in batches if b not in done])
    try:
        for b, ids, rows in results:
            cat.write_batch(run_id, b, ids[0], ids[-1], rows)
            counts["firings"] += rows["firings"].num_rows
            counts["edges"] += rows["edges"].num_rows
            # The counts first, then the prompts, then one repaint: what is shown is never a batch late.
            bar.set_postfix_str(progress_postfix(counts["firings"], counts["edges"]), refresh=False)
            if not bar.update(len(ids)):  # tqdm skips repaints closer than mininterval apart
                bar.refresh()
            if on_batch:
                on_batch(b)
    except KeyboardInterrupt:
        bar.close()
        results.close()  # an engine stops its workers' batches
        # Count from the catalog: a Ctrl-C inside COMMIT may or may not have let the batch land.
        saved = sum(len(ids) for b, ids in batches if b in cat.committed_batches(run_id))
        raise Interrupted(
            f"interrupted: {saved} of {n} prompts of run {run_id} are saved in {cat.path}; "
            "run the same command again to resume"
        ) from None
    finally:
        bar.close()  # before an error line, which would otherwise follow the bar on its line
        results.close()
    cat.finish_run(run_id)
    summary = summarize(cat.con, cat.path, run_id, time.perf_counter() - started, resumed)
    summary["prompts_this_session"] = n - prompts_before
    return summary


def summarize(con, db_path, run_id: int, wall_s: float, resumed: bool = False) -> dict:
    """Totals of a run, read back from the catalog (always the whole run, over every session).

    wall_s is the time of this session (load, decomposition and batches), or for a run found
    already finished, the run's own finished_at - started_at. prompts_this_session is how many
    prompts this session analysed (0 for a finished run; after a resume, fewer than prompts).
    """
    prompts, firings, mean_svs = con.execute(
        "SELECT (SELECT count(*) FROM prompts WHERE run_id = $1), count(*), avg(n_svs) FROM firings WHERE run_id = $1",
        [run_id],
    ).fetchall()[0]
    edges = con.execute("SELECT count(*) FROM edges WHERE run_id = ?", [run_id]).fetchall()[0][0]
    method, seeds = con.execute("SELECT method, (SELECT count(*) FROM seeds WHERE run_id = $1) FROM runs "
                                "WHERE run_id = $1", [run_id]).fetchall()[0]
    return {"run_id": run_id, "method": method, "prompts": prompts, "firings": firings,
            "mean_signal_size": mean_svs or 0.0, "edges": edges, "seeds": seeds, "wall_s": wall_s,
            "resumed": resumed, "already_finished": False, "prompts_this_session": 0, "db": str(db_path)}
