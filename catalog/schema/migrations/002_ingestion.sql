-- Version 2: runs of prompts through a model, their firings, sparse signals and traced edges
-- (SPEC.md, "Sparse signals of one firing" and "Upstream contributions").

CREATE TABLE runs (
    run_id           INTEGER PRIMARY KEY,
    model_id         INTEGER NOT NULL REFERENCES models (model_id),
    dataset          VARCHAR NOT NULL,     -- 'ioi' or the path of a JSONL prompt file
    n_prompts        INTEGER NOT NULL,
    seed             INTEGER,              -- IOI generator seed (NULL for a JSONL file)
    prompts_digest   VARCHAR NOT NULL,     -- sha256 of the prompt texts and roles
    attn_threshold   DOUBLE NOT NULL,
    sv_threshold     DOUBLE NOT NULL,
    edge_threshold   DOUBLE NOT NULL,
    append_constant  BOOLEAN NOT NULL,     -- upstream outputs augmented with a constant 1 (reference behaviour)
    batch_size       INTEGER NOT NULL,     -- prompts per committed batch
    params           JSON NOT NULL,        -- every parameter of the command, as given
    status           VARCHAR NOT NULL,     -- 'running' | 'finished'
    package_version  VARCHAR NOT NULL,
    started_at       TIMESTAMP NOT NULL,
    finished_at      TIMESTAMP
);

-- One row per committed batch of prompts: what makes an interrupted ingest resumable.
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

CREATE TABLE prompts (
    run_id      INTEGER NOT NULL REFERENCES runs (run_id),
    prompt_id   INTEGER NOT NULL,        -- 0-based, in input order
    text        VARCHAR NOT NULL,
    n_tokens    SMALLINT NOT NULL,       -- GPT-2 tokens, no BOS
    end_pos     SMALLINT NOT NULL,       -- last destination analysed (the 'end' role, else n_tokens - 1)
    template    VARCHAR,                 -- IOI template id, NULL for JSONL prompts
    name_order  VARCHAR,                 -- 'ABBA' | 'BABA' for IOI, else NULL
    PRIMARY KEY (run_id, prompt_id)
);

CREATE TABLE tokens (
    run_id     INTEGER NOT NULL,
    prompt_id  INTEGER NOT NULL,
    pos        SMALLINT NOT NULL,        -- 0-based token position (no BOS)
    token_id   INTEGER NOT NULL,
    token      VARCHAR NOT NULL,         -- decoded text of the token (leading space kept)
    role       VARCHAR,                  -- 'IO', 'S1', 'S2', 'end', ... or NULL
    PRIMARY KEY (run_id, prompt_id, pos)
);

CREATE TABLE firings (
    run_id       INTEGER NOT NULL,
    prompt_id    INTEGER NOT NULL,
    layer        SMALLINT NOT NULL,
    head         SMALLINT NOT NULL,
    dest_pos     SMALLINT NOT NULL,      -- destination (query) token i
    src_pos      SMALLINT NOT NULL,      -- source (key) token j, 1 <= j <= i
    attn_weight  FLOAT NOT NULL,         -- hook_pattern(i, j)
    score        FLOAT NOT NULL,         -- raw score s(i, j) = q_i . k_j (not divided by sqrt(d_head))
    n_svs        SMALLINT NOT NULL,      -- size of the sparse signal
    PRIMARY KEY (run_id, prompt_id, layer, head, dest_pos, src_pos)
);

CREATE TABLE firing_svs (
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
    src_proj      FLOAT NOT NULL,        -- v_k . x~_j  (sign follows the stored v_k)
    PRIMARY KEY (run_id, prompt_id, layer, head, dest_pos, src_pos, rank)
);

CREATE TABLE edges (
    run_id     INTEGER NOT NULL,
    prompt_id  INTEGER NOT NULL,
    layer      SMALLINT NOT NULL,        -- downstream head (the firing's)
    head       SMALLINT NOT NULL,
    dest_pos   SMALLINT NOT NULL,
    src_pos    SMALLINT NOT NULL,
    side       VARCHAR NOT NULL,         -- 'query' (writes to dest_pos) | 'key' (writes to src_pos)
    up_layer   SMALLINT NOT NULL,        -- upstream head, up_layer < layer
    up_head    SMALLINT NOT NULL,
    weight     FLOAT NOT NULL,           -- sum of the edge_svs weights
    PRIMARY KEY (run_id, prompt_id, layer, head, dest_pos, src_pos, side, up_layer, up_head)
);

CREATE TABLE edge_svs (
    run_id     INTEGER NOT NULL,
    prompt_id  INTEGER NOT NULL,
    layer      SMALLINT NOT NULL,
    head       SMALLINT NOT NULL,
    dest_pos   SMALLINT NOT NULL,
    src_pos    SMALLINT NOT NULL,
    side       VARCHAR NOT NULL,
    up_layer   SMALLINT NOT NULL,
    up_head    SMALLINT NOT NULL,
    sv         SMALLINT NOT NULL,        -- one singular vector of the firing's sparse signal
    weight     FLOAT NOT NULL,           -- that direction's term of the edge weight
    PRIMARY KEY (run_id, prompt_id, layer, head, dest_pos, src_pos, side, up_layer, up_head, sv)
);
