-- Version 11: edge_svs stored as one row per edge (issue 20, point 5). A row per (edge, singular
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
