-- Version 8: what each kind of component carries of a firing side's sparse signal (issue 20).
-- One row per firing and side (2024 method): the side's signal projection P (query side:
-- sum over the signal's directions k of s_k sqrt(sigma_k) (x~_i . u_k); key side: the same with
-- v_k . x~_j) and the share of P that each kind of component writes. The five shares of a row
-- sum to one (NULL where P is 0); a kind writing against the signal has a negative share. Joins to firings on
-- (run_id, prompt_id, layer, head, dest_pos, src_pos). docs/schema.md says how P splits.

CREATE TABLE side_shares (
    run_id            INTEGER NOT NULL,
    prompt_id         INTEGER NOT NULL,
    layer             SMALLINT NOT NULL,
    head              SMALLINT NOT NULL,
    dest_pos          SMALLINT NOT NULL,
    src_pos           SMALLINT NOT NULL,
    side              VARCHAR NOT NULL,     -- 'query' | 'key'
    projection        FLOAT NOT NULL,       -- P, in the side's own unit (sqrt of the score's)
    head_share        FLOAT,                -- every upstream head's z W_O (what the edges split)
    mlp_share         FLOAT,                -- every upstream MLP's output
    attn_bias_share   FLOAT,                -- every upstream attention-output bias b_O
    embed_share       FLOAT,                -- the embedding (token, and position where learned)
    offset_share      FLOAT,                -- the bias row of Omega~ (the constant 1 of x~)
    PRIMARY KEY (run_id, prompt_id, layer, head, dest_pos, src_pos, side)
);
