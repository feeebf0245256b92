-- Version 5: causal checks of traced edges (issue 9; ACCPP.md section 5). One row per edge,
-- mode and direction: the edge's signal removed (ablate) or added once more (boost), locally
-- (only the downstream head's query or key input) or globally (the upstream component's own
-- output, seen by everything downstream), and what that changed. Joins to edges on
-- (run_id, prompt_id, edge_id).

CREATE TABLE interventions (
    run_id              INTEGER NOT NULL,
    prompt_id           INTEGER NOT NULL,
    edge_id             INTEGER NOT NULL,     -- -> edges (run_id, prompt_id, edge_id)
    mode                VARCHAR NOT NULL,     -- 'local' | 'global'
    boost               BOOLEAN NOT NULL,     -- false: ablate (signal subtracted), true: boost (added)
    pos                 SMALLINT NOT NULL,    -- token the signal is patched at: dest_pos (query side) or src_pos (key side)
    signal_norm         FLOAT NOT NULL,       -- |signal| at pos (local: divided by the downstream ln1 scale)
    norm_ratio          FLOAT NOT NULL,       -- |patched| / |clean| of the patched tensor at pos
    cos_sim             FLOAT NOT NULL,       -- cosine of the patched and the clean tensor at pos
    attn_before         FLOAT NOT NULL,       -- downstream head's attention dest_pos -> src_pos, clean
    attn_after          FLOAT NOT NULL,       -- the same, intervened
    logit_diff_before   FLOAT,                -- logit(answer) - logit(wrong) at end_pos, clean (NULL: no answer/wrong)
    logit_diff_after    FLOAT,                -- the same, intervened
    kl_div              FLOAT NOT NULL,       -- KL(clean || intervened) of the next-token distribution at end_pos, nats
    other_logit_change  FLOAT NOT NULL,       -- largest |logit change| of the batch's un-intervened prompts (0)
    created_at          TIMESTAMP NOT NULL,
    PRIMARY KEY (run_id, prompt_id, edge_id, mode, boost)
);
