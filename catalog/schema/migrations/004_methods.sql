-- Version 4: two tracing methods in one catalog, the 2024 method ('sad', SPEC.md) and ACC++
-- ('accpp', ACCPP.md). Edges name their upstream component by kind, carry their own identity
-- (run_id, prompt_id, edge_id) and keep their singular directions in selection order; prompts
-- carry the model's output; ACC++ circuits keep their roots and seeds. Rows of older runs keep
-- their numbers: they become method 'sad', every edge an up_kind 'head' edge.

-- DuckDB cannot alter a table that foreign keys point at, so the two tables that reference runs
-- are set aside, runs is altered, and they are rebuilt (prompts with its new columns).
CREATE TEMPORARY TABLE run_batches_v3 AS SELECT * FROM run_batches;
CREATE TEMPORARY TABLE prompts_v3 AS SELECT * FROM prompts;
DROP TABLE run_batches;
DROP TABLE prompts;

-- Runs: which method, in which unit its edge weights are, and its result-changing settings.
ALTER TABLE runs ADD COLUMN method VARCHAR DEFAULT 'sad';        -- 'sad' | 'accpp'
ALTER TABLE runs ADD COLUMN weight_unit VARCHAR DEFAULT 'score'; -- 'score' (sad) | 'attn_prob' (accpp)
ALTER TABLE runs ADD COLUMN settings JSON;                       -- method settings that change results (accpp)
UPDATE runs SET method = 'sad', weight_unit = 'score';
-- The 2024 method's thresholds do not apply to ACC++ runs (NULL there).
ALTER TABLE runs ALTER COLUMN attn_threshold DROP NOT NULL;
ALTER TABLE runs ALTER COLUMN sv_threshold DROP NOT NULL;
ALTER TABLE runs ALTER COLUMN edge_threshold DROP NOT NULL;
ALTER TABLE runs ALTER COLUMN append_constant DROP NOT NULL;

CREATE TABLE run_batches (
    run_id        INTEGER NOT NULL REFERENCES runs (run_id),
    batch         INTEGER NOT NULL,
    first_prompt  INTEGER NOT NULL,
    last_prompt   INTEGER NOT NULL,       -- inclusive
    n_firings     INTEGER NOT NULL,
    n_edges       INTEGER NOT NULL,
    committed_at  TIMESTAMP NOT NULL,
    PRIMARY KEY (run_id, batch)
);
INSERT INTO run_batches SELECT * FROM run_batches_v3;

CREATE TABLE prompts (
    run_id           INTEGER NOT NULL REFERENCES runs (run_id),
    prompt_id        INTEGER NOT NULL,   -- 0-based, in input order
    text             VARCHAR NOT NULL,
    n_tokens         SMALLINT NOT NULL,  -- tokens, no BOS
    end_pos          SMALLINT NOT NULL,  -- last destination analysed (the 'end' role, else n_tokens - 1)
    template         VARCHAR,            -- IOI template id, NULL for JSONL prompts
    name_order       VARCHAR,            -- 'ABBA' | 'BABA' for IOI, else NULL
    -- What the objective needs and what the model answered, at end_pos (NULL where unknown).
    answer_token_id  INTEGER,            -- the correct next token (IOI: the IO name)
    wrong_token_id   INTEGER,            -- the contrast token (IOI: the S name)
    logit_diff       FLOAT,              -- logit(answer) - logit(wrong)
    answer_prob      FLOAT,              -- softmax probability of the answer
    top_token_id     INTEGER,            -- the model's most likely next token
    top_token        VARCHAR,            -- its decoded text
    PRIMARY KEY (run_id, prompt_id)
);
INSERT INTO prompts (run_id, prompt_id, text, n_tokens, end_pos, template, name_order)
SELECT run_id, prompt_id, text, n_tokens, end_pos, template, name_order FROM prompts_v3;
DROP TABLE run_batches_v3;
DROP TABLE prompts_v3;

-- Singular vectors of both methods' QK forms: 'augmented' (the 2024 method's bias-augmented
-- Omega~, vectors of length d_model + 1) and 'plain' (ACC++'s W_Q W_K^T, length d_model). An
-- edge's or firing's sv refers to the form of its run's method.
-- (Tables are rebuilt through temporary copies, not renamed: a renamed table dropped in the same
-- write-ahead log cannot be replayed by DuckDB 2 after a crash.)
CREATE TEMPORARY TABLE singular_vectors_v3 AS SELECT * FROM singular_vectors;
DROP TABLE singular_vectors;
CREATE TABLE singular_vectors (
    model_id  INTEGER NOT NULL REFERENCES models (model_id),
    form      VARCHAR NOT NULL,     -- 'augmented' (method sad) | 'plain' (method accpp)
    layer     SMALLINT NOT NULL,
    head      SMALLINT NOT NULL,
    sv        SMALLINT NOT NULL,    -- 0 .. d_head-1, by descending sigma
    sigma     DOUBLE NOT NULL,
    u         FLOAT[] NOT NULL,     -- query-side (destination) vector
    v         FLOAT[] NOT NULL,     -- key-side (source) vector
    PRIMARY KEY (model_id, form, layer, head, sv)
);
INSERT INTO singular_vectors SELECT model_id, 'augmented', layer, head, sv, sigma, u, v FROM singular_vectors_v3;
DROP TABLE singular_vectors_v3;

-- ACC++ has no per-firing sparse signal: n_svs is NULL for its firings.
ALTER TABLE firings ALTER COLUMN n_svs DROP NOT NULL;

-- Edges, rebuilt with an identity of their own and the upstream component's kind.
DROP VIEW IF EXISTS edge_roles;
CREATE TEMPORARY TABLE edges_v3 AS SELECT * FROM edges;
CREATE TEMPORARY TABLE edge_svs_v3 AS SELECT * FROM edge_svs;
DROP TABLE edge_svs;
DROP TABLE edges;

CREATE TABLE edges (
    run_id      INTEGER NOT NULL,
    prompt_id   INTEGER NOT NULL,
    edge_id     INTEGER NOT NULL,     -- 0-based within (run_id, prompt_id)
    layer       SMALLINT NOT NULL,    -- downstream head (the firing's)
    head        SMALLINT NOT NULL,
    dest_pos    SMALLINT NOT NULL,
    src_pos     SMALLINT NOT NULL,
    side        VARCHAR NOT NULL,     -- 'query' (writes to dest_pos) | 'key' (writes to src_pos)
    up_kind     VARCHAR NOT NULL,     -- 'head' | 'mlp' | 'attn_bias' | 'embed' | 'offset'
    up_layer    SMALLINT,             -- layer of a head, MLP or attention-output bias; NULL for embed, offset
    up_head     SMALLINT,             -- upstream head; NULL unless up_kind = 'head'
    up_src_pos  SMALLINT,             -- accpp head slice: the token the upstream head read; else NULL
    up_attn     FLOAT,                -- accpp head slice: that head's attention from the token it writes to to up_src_pos
    weight      FLOAT NOT NULL,       -- in the run's weight_unit; = sum of the edge_svs weights
    PRIMARY KEY (run_id, prompt_id, edge_id)
);

CREATE TABLE edge_svs (
    run_id     INTEGER NOT NULL,
    prompt_id  INTEGER NOT NULL,
    edge_id    INTEGER NOT NULL,
    rank       SMALLINT NOT NULL,    -- 0-based selection order (sad: the firing's signal order)
    sv         SMALLINT NOT NULL,    -- singular direction of the downstream head
    weight     FLOAT NOT NULL,       -- that direction's part of the edge weight
    PRIMARY KEY (run_id, prompt_id, edge_id, rank)
);

INSERT INTO edges
SELECT run_id, prompt_id,
       (row_number() OVER (PARTITION BY run_id, prompt_id
                           ORDER BY layer, head, dest_pos, src_pos, side, up_layer, up_head) - 1)::INTEGER,
       layer, head, dest_pos, src_pos, side, 'head', up_layer, up_head, NULL, NULL, weight
FROM edges_v3;

INSERT INTO edge_svs
SELECT e.run_id, e.prompt_id, e.edge_id, f.rank, s.sv, s.weight
FROM edge_svs_v3 s
JOIN edges e ON e.run_id = s.run_id AND e.prompt_id = s.prompt_id AND e.layer = s.layer AND e.head = s.head
            AND e.dest_pos = s.dest_pos AND e.src_pos = s.src_pos AND e.side = s.side
            AND e.up_layer = s.up_layer AND e.up_head = s.up_head
JOIN firing_svs f ON f.run_id = s.run_id AND f.prompt_id = s.prompt_id AND f.layer = s.layer AND f.head = s.head
                 AND f.dest_pos = s.dest_pos AND f.src_pos = s.src_pos AND f.sv = s.sv;

DROP TABLE edge_svs_v3;
DROP TABLE edges_v3;

-- ACC++: per firing and side, how the greedy selection ended.
CREATE TABLE firing_sides (
    run_id      INTEGER NOT NULL,
    prompt_id   INTEGER NOT NULL,
    layer       SMALLINT NOT NULL,
    head        SMALLINT NOT NULL,
    dest_pos    SMALLINT NOT NULL,
    src_pos     SMALLINT NOT NULL,
    side        VARCHAR NOT NULL,
    threshold   FLOAT NOT NULL,       -- attention the greedy had to fall below
    n_atoms     INTEGER NOT NULL,     -- atoms (component, sv) zeroed
    attn_after  FLOAT NOT NULL,       -- attention left after zeroing them
    capped      BOOLEAN NOT NULL,     -- the atom cap was hit: no edge of this side is stored
    PRIMARY KEY (run_id, prompt_id, layer, head, dest_pos, src_pos, side)
);

-- ACC++: the objective each prompt's circuit is rooted at, and the components seeded into it.
CREATE TABLE roots (
    run_id     INTEGER NOT NULL,
    prompt_id  INTEGER NOT NULL,
    root_id    SMALLINT NOT NULL,    -- 0-based within the prompt
    seeding    VARCHAR NOT NULL,     -- 'linear' | 'prob'
    objective  VARCHAR NOT NULL,     -- what is explained, e.g. "logit(' Mary') - logit(' John')"
    pos        SMALLINT NOT NULL,    -- the output position (end_pos)
    total      DOUBLE NOT NULL,      -- linear: sum of all contributions (logits); prob: completeness C (nats)
    n_seeds    INTEGER NOT NULL,
    PRIMARY KEY (run_id, prompt_id, root_id)
);

CREATE TABLE seeds (
    run_id      INTEGER NOT NULL,
    prompt_id   INTEGER NOT NULL,
    root_id     SMALLINT NOT NULL,
    seed_rank   SMALLINT NOT NULL,   -- 0-based, by descending weight
    up_kind     VARCHAR NOT NULL,    -- as edges.up_kind (never 'offset')
    up_layer    SMALLINT,
    up_head     SMALLINT,
    up_src_pos  SMALLINT,
    pos         SMALLINT NOT NULL,   -- the token the component writes to (the root's pos)
    weight      DOUBLE NOT NULL,     -- linear: logit contribution; prob: IG attribution (nats)
    PRIMARY KEY (run_id, prompt_id, root_id, seed_rank)
);

-- The token an upstream component writes to is dest_pos on the query side and src_pos on the key side.
CREATE VIEW edge_roles AS
SELECT e.*,
       CASE WHEN e.side = 'query' THEN e.dest_pos ELSE e.src_pos END AS token_pos,
       t.role AS token_role, d.role AS dest_role, s.role AS src_role
FROM edges e
JOIN tokens t ON t.run_id = e.run_id AND t.prompt_id = e.prompt_id
             AND t.pos = CASE WHEN e.side = 'query' THEN e.dest_pos ELSE e.src_pos END
JOIN tokens d ON d.run_id = e.run_id AND d.prompt_id = e.prompt_id AND d.pos = e.dest_pos
JOIN tokens s ON s.run_id = e.run_id AND s.prompt_id = e.prompt_id AND s.pos = e.src_pos;
