-- Version 1: models and their per-head QK decomposition (SPEC.md, "Per-head decomposition").

CREATE TABLE models (
    model_id        INTEGER PRIMARY KEY,       -- assigned by the catalog, 1, 2, ...
    name            VARCHAR NOT NULL,          -- "gpt2" or the checkpoint directory it was loaded from
    n_layers        INTEGER NOT NULL,
    n_heads         INTEGER NOT NULL,
    d_model         INTEGER NOT NULL,
    d_head          INTEGER NOT NULL,
    weights_digest  VARCHAR NOT NULL UNIQUE,   -- sha256 of the processed attention weights
    processing      VARCHAR NOT NULL,          -- weight processing applied at load time
    created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE singular_vectors (
    model_id  INTEGER NOT NULL REFERENCES models (model_id),
    layer     SMALLINT NOT NULL,
    head      SMALLINT NOT NULL,
    sv        SMALLINT NOT NULL,    -- 0 .. d_head-1, by descending sigma
    sigma     DOUBLE NOT NULL,      -- singular value of the bias-augmented Omega~
    u         FLOAT[] NOT NULL,     -- query-side (destination) vector, length d_model + 1
    v         FLOAT[] NOT NULL,     -- key-side (source) vector, length d_model + 1
    PRIMARY KEY (model_id, layer, head, sv)
);
