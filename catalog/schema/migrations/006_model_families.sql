-- Version 6: model families beyond GPT-2 (issue 12). A model records its family and how its
-- attention sees positions; rotary models have one QK form per offset between destination and
-- source, so their singular vectors carry that offset; a run records whether its prompts start
-- with a BOS token. Older catalogs hold GPT-2 only: their models become family 'gpt2' with
-- learned positions, their singular vectors position-free (pos_offset NULL), their runs BOS-free.

CREATE TABLE model_families (
    model_id           INTEGER PRIMARY KEY REFERENCES models (model_id),
    family             VARCHAR NOT NULL,   -- 'gpt2' | 'gpt_neox' | 'llama' | 'qwen2'
    pos_encoding       VARCHAR NOT NULL,   -- 'learned' (added to the residual) | 'rotary' (rotates q and k)
    rotary_dim         SMALLINT,           -- leading dims of each head that rotate (NULL: learned)
    rotary_base        DOUBLE,             -- theta of the rotation frequencies (NULL: learned)
    n_kv_heads         SMALLINT NOT NULL,  -- key/value heads; < n_heads: grouped-query attention
    norm               VARCHAR NOT NULL,   -- 'LayerNorm' | 'RMSNorm' (folded into W_Q, W_K at load)
    parallel_attn_mlp  BOOLEAN NOT NULL,   -- attention and MLP read the same residual (GPT-NeoX)
    score_scale        DOUBLE NOT NULL     -- hook_attn_scores = score / score_scale
);
INSERT INTO model_families
SELECT model_id, 'gpt2', 'learned', NULL, NULL, n_heads, 'LayerNorm', false, sqrt(d_head) FROM models;

-- Singular vectors gain the offset i - j their form belongs to (rotary models; NULL where the
-- form does not depend on positions). `offset` is a reserved word in SQL, hence pos_offset.
-- Uniqueness over (model_id, form, layer, head, pos_offset, sv) is kept by the writer for the
-- NULL rows (SQL's UNIQUE treats NULLs as distinct) and by the constraint for the others.
CREATE TEMPORARY TABLE singular_vectors_v5 AS SELECT * FROM singular_vectors;
DROP TABLE singular_vectors;
CREATE TABLE singular_vectors (
    model_id    INTEGER NOT NULL REFERENCES models (model_id),
    form        VARCHAR NOT NULL,     -- 'augmented' (method sad) | 'plain' (method accpp)
    layer       SMALLINT NOT NULL,
    head        SMALLINT NOT NULL,
    pos_offset  SMALLINT,             -- dest_pos - src_pos of the firings it explains; NULL: any
    sv          SMALLINT NOT NULL,    -- 0 .. d_head-1, by descending sigma
    sigma       DOUBLE NOT NULL,
    u           FLOAT[] NOT NULL,     -- query-side (destination) vector
    v           FLOAT[] NOT NULL,     -- key-side (source) vector
    UNIQUE (model_id, form, layer, head, pos_offset, sv)
);
INSERT INTO singular_vectors
SELECT model_id, form, layer, head, NULL, sv, sigma, u, v FROM singular_vectors_v5;
DROP TABLE singular_vectors_v5;

-- Runs gain has_bos. DuckDB cannot alter a table that foreign keys point at: the two tables
-- that reference runs are set aside and rebuilt unchanged, as in version 4.
CREATE TEMPORARY TABLE run_batches_v5 AS SELECT * FROM run_batches;
CREATE TEMPORARY TABLE prompts_v5 AS SELECT * FROM prompts;
DROP TABLE run_batches;
DROP TABLE prompts;

ALTER TABLE runs ADD COLUMN has_bos BOOLEAN DEFAULT false;  -- token 0 of every prompt is the tokenizer's BOS
UPDATE runs SET has_bos = false;

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
INSERT INTO run_batches SELECT * FROM run_batches_v5;

CREATE TABLE prompts (
    run_id           INTEGER NOT NULL REFERENCES runs (run_id),
    prompt_id        INTEGER NOT NULL,   -- 0-based, in input order
    text             VARCHAR NOT NULL,
    n_tokens         SMALLINT NOT NULL,  -- tokens fed to the model (a BOS included where runs.has_bos)
    end_pos          SMALLINT NOT NULL,  -- last destination analysed (the 'end' role, else n_tokens - 1)
    template         VARCHAR,            -- IOI template id, NULL for JSONL prompts
    name_order       VARCHAR,            -- 'ABBA' | 'BABA' for IOI, else NULL
    answer_token_id  INTEGER,            -- the correct next token (IOI: the IO name)
    wrong_token_id   INTEGER,            -- the contrast token (IOI: the S name)
    logit_diff       FLOAT,              -- logit(answer) - logit(wrong)
    answer_prob      FLOAT,              -- softmax probability of the answer
    top_token_id     INTEGER,            -- the model's most likely next token
    top_token        VARCHAR,            -- its decoded text
    PRIMARY KEY (run_id, prompt_id)
);
INSERT INTO prompts SELECT * FROM prompts_v5;
DROP TABLE run_batches_v5;
DROP TABLE prompts_v5;

-- A firing names the form its directions come from: pos_offset = dest_pos - src_pos on rotary
-- models, NULL elsewhere, so `s.pos_offset IS NOT DISTINCT FROM f.pos_offset` joins both kinds.
ALTER TABLE firings ADD COLUMN pos_offset SMALLINT;
