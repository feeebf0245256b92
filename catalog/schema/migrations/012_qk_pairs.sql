-- Version 16: a firing's score split into query/key transcoder feature pairs (issue 24;
-- docs/features.md, "QK transcoders"). For each firing of a head with transcoders (a
-- `dictionaries` row of kind 'qk_transcoder'): its largest pairs, one row for the rest of the
-- pairs, one for the transcoders' error, adding up to firings.score; and each pair read through
-- the head's singular directions. Joins to firings on the firing key.

CREATE TABLE firing_feature_pairs (
    run_id            INTEGER NOT NULL,
    prompt_id         INTEGER NOT NULL,
    layer             SMALLINT NOT NULL,
    head              SMALLINT NOT NULL,
    dest_pos          SMALLINT NOT NULL,
    src_pos           SMALLINT NOT NULL,    -- the firing key -> firings
    dictionary_id     INTEGER NOT NULL,     -- -> dictionaries (kind 'qk_transcoder')
    part              VARCHAR NOT NULL,     -- 'pair', 'rest' (every pair not listed) or 'error'
    query_feature     INTEGER,              -- pair: the query feature; NULL: the query transcoder's decoder bias
    key_feature       INTEGER,              -- pair: the key feature; NULL: the key transcoder's decoder bias
    query_activation  FLOAT,                -- its activation at dest_pos (NULL for the bias)
    key_activation    FLOAT,                -- its activation at src_pos (NULL for the bias)
    weight            DOUBLE NOT NULL,      -- this part of the raw score q . k
    sv_parts          DOUBLE[]              -- pair: its part through each singular direction of the head
                                            -- (sv 0, 1, ... of the run's form), summing to weight; NULL otherwise
);
