"""The catalog's main job: decompose the model, run a prompt set, store firings, signals and edges.

Work proceeds in batches of prompts; each batch's rows and its `run_batches` record are
committed in one transaction. Running the same command again after an interruption (Ctrl-C,
kill -9) finds the unfinished run with the same model, prompts and settings and does only the
batches that are missing, so the finished catalog equals an uninterrupted one.
"""

from __future__ import annotations

import time

import catalog
from catalog.errors import CatalogError
from catalog.store import Catalog, check_catalog_file


class Interrupted(CatalogError):
    """Ctrl-C during an ingest: what is committed stays, the same command resumes."""


def decompose_model(cat: Catalog, model, add_model: bool = False, say=None) -> tuple[int, bool]:
    """The model's id in the catalog, decomposing and storing it first if it is new there.

    Returns (model_id, stored_now). A catalog holds one model unless add_model is given, so that
    results of another model never mix into it by accident.
    """
    from catalog.methods.shared.svd import decompose, to_arrow

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
    return cat.add_model(row, to_arrow(decompose(W_Q, b_Q, W_K, b_K)), model.adapter.record()), True


def store_plain_form(cat: Catalog, model_id: int, weights) -> None:
    """ACC++'s singular vectors (form 'plain') beside the 2024 method's, once per model."""
    from catalog.methods.shared.svd import Decomposition, to_arrow

    if not cat.has_singular_vectors(model_id, "plain"):
        cat.add_singular_vectors(model_id, to_arrow(Decomposition(sigma=weights.S, U=weights.U, V=weights.V), form="plain"))


def load_prompts(dataset: str, n_prompts: int, seed: int, items, lm):
    """The prompt set (items read from a JSONL file, or the built-in IOI set) and its tokenization
    for the model `lm`, validated (CatalogError on any mismatch)."""
    from catalog import prompts as prompt_sets
    from catalog.models.families.base import token_limit

    if items is None:
        items = prompt_sets.ioi_prompts(n_prompts, seed, lm.tokenizer)
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


METHODS = ("sad", "accpp")


def _check_settings(method, attn_threshold, sv_threshold, edge_threshold, batch_size, n_prompts, accpp):
    if method not in METHODS:
        raise CatalogError(f"unknown method '{method}': use sad (2024, the default) or accpp (ACC++)")
    if batch_size < 1 or n_prompts < 1:
        raise CatalogError("--batch-size and --n-prompts must be at least 1")
    if method == "sad":
        if not 0 < attn_threshold <= 1:
            raise CatalogError(f"--attn-threshold must be in (0, 1], got {attn_threshold}")
        if sv_threshold <= 0:
            raise CatalogError(f"--sv-threshold must be positive, got {sv_threshold}")
        if not 0 < edge_threshold <= 1:
            raise CatalogError(f"--edge-threshold must be in (0, 1], got {edge_threshold}")
        return
    from catalog.methods.accpp.circuit import PROB_TARGETS, SEEDINGS

    if accpp.threshold != "dynamic" and not 0 < float(accpp.threshold) <= 1:
        raise CatalogError(f"--threshold must be 'dynamic' or a number in (0, 1], got {accpp.threshold}")
    if accpp.ig_steps < 1:
        raise CatalogError(f"--ig-steps must be at least 1, got {accpp.ig_steps}")
    if accpp.seeding not in SEEDINGS:
        raise CatalogError(f"--seeding must be one of {', '.join(SEEDINGS)}, not '{accpp.seeding}'")
    if accpp.prob_target not in PROB_TARGETS:
        raise CatalogError(f"--prob-target must be one of {', '.join(PROB_TARGETS)}, not '{accpp.prob_target}'")
    if not 0 < accpp.tau <= 1:
        raise CatalogError(f"--tau must be in (0, 1], got {accpp.tau}")
    if accpp.seeding == "none" and not accpp.heads:
        raise CatalogError("--seeding none decomposes nothing without --heads L.H,...")
    if accpp.dest_roles and not accpp.heads:
        raise CatalogError("--dest-roles applies to the firings of --heads; give --heads too")


def accpp_settings(threshold="dynamic", ig_steps=64, seeding="linear", prob_target="answer", tau=0.8,
                   heads=None, dest_roles=None):
    """AccppSettings from user values: a threshold 'dynamic' or a number, heads "9.9,9.6" or a list."""
    from catalog.methods.accpp.circuit import AccppSettings
    from catalog.heads import parse_head

    if isinstance(threshold, str) and threshold != "dynamic":
        try:
            threshold = float(threshold)
        except ValueError:
            raise CatalogError(f"--threshold must be 'dynamic' or a number, got '{threshold}'") from None
    split = lambda value: [p.strip() for text in ([value] if isinstance(value, str) else value or [])
                           for p in str(text).split(",") if p.strip()]
    return AccppSettings(threshold=threshold, ig_steps=int(ig_steps), seeding=seeding, prob_target=prob_target,
                         tau=float(tau), heads=tuple(parse_head(h) for h in split(heads)),
                         dest_roles=tuple(split(dest_roles)))


def _check_accpp_prompts(accpp, items, answers, wrongs, lm) -> None:
    """What ACC++ needs of the prompts and the model, checked before anything is stored."""
    from catalog.heads import parse_head

    for layer, head in accpp.heads:
        parse_head(f"{layer}.{head}", lm.n_layers, lm.n_heads)
    for role in accpp.dest_roles:
        if not any(role in p.roles for p in items):
            raise CatalogError(f"--dest-roles: no prompt has a token with role '{role}'")
    needs_wrong = accpp.seeding == "linear"
    needs_answer = needs_wrong or (accpp.seeding == "prob" and accpp.prob_target == "answer")
    for index, (answer, wrong) in enumerate(zip(answers, wrongs)):
        if (needs_answer and answer is None) or (needs_wrong and wrong is None):
            raise CatalogError(
                f"prompt {index} has no {'answer' if answer is None else 'wrong'} token, which --seeding "
                f"{accpp.seeding} needs: give \"answer\" and \"wrong\" in the JSONL (or IO and S1 roles)"
            )


def ingest(db_path, *, model: str = "gpt2", model_path=None, dataset: str = "ioi", n_prompts: int = 64,
           seed: int = 0, prompts_file=None, method: str = "sad", attn_threshold: float = 0.5,
           sv_threshold: float = 1.0, edge_threshold: float = 0.7, append_constant: bool = True,
           threshold="dynamic", ig_steps: int = 64, seeding: str = "linear", prob_target: str = "answer",
           tau: float = 0.8, heads=None, dest_roles=None, batch_size: int = 16,
           add_model: bool = False, new_run: bool = False, device: str = "cpu", dtype: str = "float32",
           show_progress: bool = False, on_batch=None, loaded_model=None) -> dict:
    """Run (or resume) an ingest into the catalog at db_path; return a summary dict.

    method 'sad' (the 2024 method, SPEC.md) uses attn/sv/edge_threshold and append_constant;
    method 'accpp' (ACC++, ACCPP.md) uses threshold, ig_steps, seeding, prob_target, tau, heads
    and dest_roles. A finished run with the same model, prompts and settings is not repeated (its
    summary is returned, with "already_finished") unless new_run is given.

    device ('cpu', 'cuda', 'auto') and dtype ('float32', 'bfloat16') are where and in what the model
    runs; a bfloat16 model has other weights (its digest differs), so its runs are another model's.
    on_batch(batch_index) is called after each committed batch (tests use it to interrupt).
    loaded_model lets a caller reuse a model it has already loaded.
    """
    from catalog.prompts import adds_bos, answer_tokens, prompts_digest, read_jsonl

    say = _status if show_progress else (lambda text: None)
    accpp = accpp_settings(threshold, ig_steps, seeding, prob_target, tau, heads, dest_roles) if method == "accpp" else None
    _check_settings(method, attn_threshold, sv_threshold, edge_threshold, batch_size, n_prompts, accpp)
    items = None
    if prompts_file is not None:
        items = read_jsonl(prompts_file)  # a bad file fails before the slow model load
        dataset = str(prompts_file)
    elif dataset != "ioi":
        raise CatalogError(f"unknown dataset '{dataset}': use --dataset ioi or --prompts FILE.jsonl")
    started = time.perf_counter()
    check_catalog_file(db_path)  # so does a file that is not a DuckDB database
    from catalog.models.loading import DTYPES, check_family, resolve_device

    # So do a missing GPU and a family the catalog does not read.
    resolve_device(device)
    check_family(model, model_path)
    if dtype not in DTYPES:
        raise CatalogError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    # What identifies a run besides the model and the prompts: runs' columns and ACC++'s settings.
    identity = {"dataset": dataset, "n_prompts": len(items) if items is not None else n_prompts,
                "batch_size": batch_size, "method": method}
    if accpp is None:
        identity.update(attn_threshold=attn_threshold, sv_threshold=sv_threshold,
                        edge_threshold=edge_threshold, append_constant=append_constant)
        recorded = None
    else:
        recorded = accpp.record()
        identity.update(attn_threshold=None, sv_threshold=None, edge_threshold=None, append_constant=None)
    from catalog.models.checkpoint import checkpoint_digest

    # The digest of the files the model is loaded from (a caller's loaded model has no known files).
    files_digest = checkpoint_digest(model, model_path, dtype) if loaded_model is None else None
    if not new_run and files_digest is not None:
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

        say(f"loading model {model_path or model} ...")
        lm = load_model(model, model_path, device=device, dtype=dtype)
    # Prompts are tokenized and checked before the catalog is touched: bad prompts store nothing.
    items, token_lists = load_prompts(dataset, n_prompts, seed, items, lm)
    answers, wrongs = answer_tokens(items, token_lists, lm.tokenizer)
    if accpp is not None:
        if lm.adapter.family != "gpt2":
            raise CatalogError(f"--method accpp reads GPT-2 models only so far; {lm.name} is a "
                               f"{lm.adapter.family} model: use --method sad (the default)")
        _check_accpp_prompts(accpp, items, answers, wrongs, lm)
    digest = prompts_digest(items)
    with Catalog(db_path) as cat:
        model_id, _ = decompose_model(cat, lm, add_model=add_model, say=say)
        if accpp is None:
            from catalog.methods.sad.batch import Settings

            settings = Settings(attn_threshold, sv_threshold, edge_threshold, append_constant)
        else:
            settings = accpp
        run = cat.find_run(model_id, digest, identity, recorded)
        if run is not None and run["status"] == "finished" and not new_run:
            return dict(summarize(cat.con, cat.path, run["run_id"], _run_seconds(run)), already_finished=True)
        if run is None or run["status"] == "finished":
            prompts, tokens = _prompt_tables(items, token_lists, answers, wrongs, lm.tokenizer)
            params = dict(identity, model=None if model_path else model,
                          model_path=str(model_path) if model_path else None,
                          seed=seed if prompts_file is None else None,
                          prompts_file=str(prompts_file) if prompts_file else None, settings=recorded,
                          checkpoint_digest=files_digest, device=device, dtype=dtype)
            row = dict(identity, model_id=model_id, seed=params["seed"], prompts_digest=digest,
                       params=params, package_version=catalog.__version__, settings=recorded,
                       weight_unit="score" if accpp is None else "attn_prob", has_bos=adds_bos(lm.tokenizer))
            run_id, resumed = cat.create_run(row, prompts, tokens), False
        else:
            run_id, resumed = run["run_id"], True
        done = cat.committed_batches(run_id)
        if accpp is not None:
            say("preparing the ACC++ decomposition ...")
        analyse = _analysis(cat, lm, model_id, settings, items, token_lists, answers, wrongs)
        return _run_batches(cat, run_id, resumed, len(items), batch_size, analyse, done, show_progress,
                            on_batch, started)


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
    if items is None:  # the IOI prompts depend on the tokenizer: read it from the checkpoint's files
        from catalog.models.checkpoint import file_tokenizer
        from catalog.prompts import ioi_prompts

        tokenizer = file_tokenizer(model, model_path)
        if tokenizer is None:
            return None
        items = ioi_prompts(n_prompts, seed, tokenizer)
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


def _analysis(cat, lm, model_id, settings, items, token_lists, answers, wrongs):
    """The method's batch function: prompt ids -> the batch's tables."""
    from catalog.methods.sad.batch import Settings, analyse_batch
    from catalog.prompts import end_positions

    end_pos = end_positions(items, token_lists, lm.tokenizer)
    if isinstance(settings, Settings):
        qk = qk_forms(cat, lm, model_id)
        W_O = lm.attention_weights()[4]
        return lambda ids: analyse_batch(lm, qk, W_O, [token_lists[i] for i in ids],
                                         [end_pos[i] for i in ids], list(ids), settings,
                                         [answers[i] for i in ids], [wrongs[i] for i in ids])
    from catalog.methods.accpp import circuit
    from catalog.methods.accpp.weights import accpp_weights

    weights = accpp_weights(*lm.attention_weights()[:4])
    store_plain_form(cat, model_id, weights)

    def analyse(ids):
        prompts = circuit.BatchPrompts([token_lists[i] for i in ids], [end_pos[i] for i in ids], list(ids),
                                       [answers[i] for i in ids], [wrongs[i] for i in ids],
                                       [items[i].roles for i in ids])
        return circuit.analyse_batch(lm, weights, prompts, settings)

    return analyse


def qk_forms(cat, lm, model_id: int):
    """The QK forms the 2024 method reads: per head from the stored decomposition (learned
    positions), or per (head, offset) computed from the factors as firings need them (rotary)."""
    if lm.adapter.rotary is not None:
        from catalog.methods.sad.rotary import RotaryForms

        return RotaryForms(*lm.adapter.qk_factors(), lm.adapter.rotary, device=lm.device)
    from catalog.methods.shared.svd import from_arrow
    from catalog.methods.sad.forms import HeadForms

    table = cat.con.sql(
        "SELECT layer, head, sv, sigma, u, v FROM singular_vectors WHERE model_id = ? AND form = 'augmented' "
        "AND pos_offset IS NULL", params=[model_id],
    ).to_arrow_table()
    return HeadForms(from_arrow(table, lm.n_layers, lm.n_heads), device=lm.device)


def progress_postfix(firings: int, edges: int) -> str:
    """The progress bar's counts, as plain integers (tqdm's own formatting turns 100000 into 1e+05)."""
    return f"firings={int(firings)}, edges={int(edges)}"


def _run_batches(cat, run_id, resumed, n, batch_size, analyse, done, show_progress, on_batch, started) -> dict:
    """Analyse and commit the batches not in `done`. The bar and its counts are the whole run's
    (a resumed run starts at what earlier sessions committed); the summary says both."""
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
    try:
        for b, ids in batches:
            if b in done:
                continue
            rows = analyse(ids)
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
        # Count from the catalog: a Ctrl-C inside COMMIT may or may not have let the batch land.
        saved = sum(len(ids) for b, ids in batches if b in cat.committed_batches(run_id))
        raise Interrupted(
            f"interrupted: {saved} of {n} prompts of run {run_id} are saved in {cat.path}; "
            "run the same command again to resume"
        ) from None
    bar.close()
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
