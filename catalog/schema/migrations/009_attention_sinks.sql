-- Version 9: attention sinks (issue 20), 2024 method. A source token j >= 1 of a prompt is a sink
-- when at least sink_head_share of all heads (layers x heads), and at least sink_min_heads
-- heads, give it, on average over the destinations after it (j < i <= end_pos), at least sink_attention of their attention
-- (docs/schema.md, "Attention sinks"). Firings to a sink are stored and flagged; unless the run
-- kept sinks, no edges are traced for them.
-- Runs written before this version, and ACC++ runs, applied no sink rule: their four runs
-- columns, tokens.is_sink and firings.to_sink are NULL.

ALTER TABLE runs ADD COLUMN sink_attention DOUBLE;     -- the rule's mean attention a head must give
ALTER TABLE runs ADD COLUMN sink_head_share DOUBLE;    -- the share of all heads that must give it
ALTER TABLE runs ADD COLUMN sink_min_heads INTEGER;    -- and the fewest heads that must give it
ALTER TABLE runs ADD COLUMN keep_sinks BOOLEAN;        -- true: firings to sinks are traced as any other

ALTER TABLE tokens ADD COLUMN is_sink BOOLEAN;         -- the token is a sink of its prompt (NULL: no rule)
ALTER TABLE firings ADD COLUMN to_sink BOOLEAN;        -- src_pos is a sink of the prompt (NULL: no rule)

-- firing_roles selects f.*: recreated so that it carries the new column.
DROP VIEW firing_roles;
CREATE VIEW firing_roles AS
SELECT f.*, d.role AS dest_role, s.role AS src_role, d.token AS dest_token, s.token AS src_token
FROM firings f
JOIN tokens d ON d.run_id = f.run_id AND d.prompt_id = f.prompt_id AND d.pos = f.dest_pos
JOIN tokens s ON s.run_id = f.run_id AND s.prompt_id = f.prompt_id AND s.pos = f.src_pos;
