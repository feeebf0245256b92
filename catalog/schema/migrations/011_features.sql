-- Version 15: features on the edges (issue 24; docs/features.md). `dictionaries`: one row per
-- sparse dictionary the catalog has read (an attention-output SAE of one layer; later query/key
-- transcoders), identified by its weights. `edge_features`: a 2024-method `head` edge's weight
-- split by the features of its upstream layer's SAE, plus the decoder bias, the reconstruction
-- error and the appended constant, so that the parts of an edge add up to its weight. Joins to
-- edges on (run_id, prompt_id, edge_id).

CREATE TABLE dictionaries (
    dictionary_id   INTEGER PRIMARY KEY,  -- assigned by the catalog: 1, 2, ...
    model_id        INTEGER NOT NULL,     -- -> models: the model whose activations it reads
    kind            VARCHAR NOT NULL,     -- 'attn_sae': an SAE over a layer's concatenated hook_z;
                                          -- 'qk_transcoder': a head's query and key transcoders
    layer           SMALLINT NOT NULL,    -- the layer it reads
    head            SMALLINT,             -- 'qk_transcoder': the head; NULL for an SAE of the whole layer
    hook_name       VARCHAR NOT NULL,     -- what it reads: blocks.5.attn.hook_z, blocks.5.ln1.hook_normalized
    architecture    VARCHAR NOT NULL,     -- 'topk', 'jumprelu' or 'standard' (ReLU)
    d_in            INTEGER NOT NULL,     -- n_heads * d_head (attn_sae); d_model (qk_transcoder)
    d_sae           INTEGER NOT NULL,     -- features (qk_transcoder: per side)
    source          VARCHAR NOT NULL,     -- the directory it was read from (absolute path)
    weights_digest  VARCHAR NOT NULL,     -- sha256 of sae_weights.safetensors: its identity
    figures         JSON,                 -- fraction_variance_explained, l0, loss_change, ... (NULL: unknown)
    config          JSON NOT NULL,        -- its cfg.json as read
    created_at      TIMESTAMP NOT NULL,
    UNIQUE (model_id, weights_digest)
);

CREATE TABLE edge_features (
    run_id          INTEGER NOT NULL,
    prompt_id       INTEGER NOT NULL,
    edge_id         INTEGER NOT NULL,     -- -> edges (run_id, prompt_id, edge_id)
    dictionary_id   INTEGER NOT NULL,     -- -> dictionaries
    part            VARCHAR NOT NULL,     -- 'feature', 'decoder_bias', 'error' or 'constant'
    feature         INTEGER,              -- the feature's index in its dictionary; NULL unless part = 'feature'
    activation      FLOAT,                -- the feature's activation at the edge's token; NULL unless a feature
    weight          DOUBLE NOT NULL,      -- this part of edges.weight
    sv_weights      DOUBLE[] NOT NULL     -- its part of each edge_svs.weight, in rank order
);
