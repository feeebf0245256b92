-- Version 11: a smaller catalog (issue 20, point 5): edge_svs stored as one row per edge, and
-- firing_svs and side_shares without primary-key indexes (below). A row per (edge, singular
-- direction) with its own primary-key index took most of a large catalog (on 64 SmolLM2 prompts,
-- 2.3 million rows: about 64 MiB, 51 of them the index); the lists below hold the same values in
-- about a sixth of that. `edge_svs` stays, as a view with the same columns and rows, so queries,
-- joins on (run_id, prompt_id, edge_id) and SQL written for it give the same answers.

CREATE TABLE edge_sv_lists (
    run_id     INTEGER NOT NULL,
    prompt_id  INTEGER NOT NULL,
    edge_id    INTEGER NOT NULL,     -- -> edges (run_id, prompt_id, edge_id); one row per edge that has directions
    svs        SMALLINT[] NOT NULL,  -- the edge's singular directions, in rank order
    weights    FLOAT[] NOT NULL,     -- each direction's part of the edge weight, same order
    ranks      SMALLINT[]            -- their ranks where not 0, 1, ..., n - 1 (ACC++'s greedy order); else NULL
);

INSERT INTO edge_sv_lists
SELECT run_id, prompt_id, edge_id, list(sv ORDER BY rank), list(weight ORDER BY rank),
       CASE WHEN min(rank) = 0 AND max(rank) = count(*) - 1 THEN NULL ELSE list(rank ORDER BY rank) END
FROM edge_svs
GROUP BY run_id, prompt_id, edge_id
ORDER BY run_id, prompt_id, edge_id;

DROP TABLE edge_svs;

CREATE VIEW edge_svs AS
SELECT run_id, prompt_id, edge_id, CAST(rank AS SMALLINT) AS rank, sv, weight
FROM (SELECT run_id, prompt_id, edge_id,
             unnest(coalesce(ranks, CAST(range(len(svs)) AS SMALLINT[]))) AS rank,
             unnest(svs) AS sv, unnest(weights) AS weight
      FROM edge_sv_lists);

-- firing_svs and side_shares without their primary-key indexes, the same columns and rows: the
-- indexes took two thirds of these tables' room (on 64 SmolLM2 prompts 57 of firing_svs' 86
-- blocks, 31 of side_shares' 37), and no question looks a row up by its key (DuckDB scans these
-- tables). Their keys stay unique by construction: a batch is written whole, in one transaction,
-- once (run_batches), and each firing once within it.
CREATE TABLE firing_svs_011 (
    run_id        INTEGER NOT NULL,
    prompt_id     INTEGER NOT NULL,
    layer         SMALLINT NOT NULL,
    head          SMALLINT NOT NULL,
    dest_pos      SMALLINT NOT NULL,
    src_pos       SMALLINT NOT NULL,
    rank          SMALLINT NOT NULL,     -- 0-based position in the selection order (largest contribution first)
    sv            SMALLINT NOT NULL,     -- singular_vectors.sv
    contribution  FLOAT NOT NULL,        -- c_k = sigma_k (x~_i . u_k)(v_k . x~_j)
    dest_proj     FLOAT NOT NULL,        -- x~_i . u_k  (sign follows the stored u_k)
    src_proj      FLOAT NOT NULL         -- v_k . x~_j  (sign follows the stored v_k)
);
INSERT INTO firing_svs_011 SELECT * FROM firing_svs;
DROP TABLE firing_svs;
ALTER TABLE firing_svs_011 RENAME TO firing_svs;

CREATE TABLE side_shares_011 (
    run_id            INTEGER NOT NULL,
    prompt_id         INTEGER NOT NULL,
    layer             SMALLINT NOT NULL,
    head              SMALLINT NOT NULL,
    dest_pos          SMALLINT NOT NULL,
    src_pos           SMALLINT NOT NULL,
    side              VARCHAR NOT NULL,     -- 'query' | 'key'
    projection        FLOAT NOT NULL,       -- P, in the side's own unit (sqrt of the score's)
    head_share        FLOAT,
    mlp_share         FLOAT,
    attn_bias_share   FLOAT,
    embed_share       FLOAT,
    offset_share      FLOAT
);
INSERT INTO side_shares_011 SELECT * FROM side_shares;
DROP TABLE side_shares;
ALTER TABLE side_shares_011 RENAME TO side_shares;
