-- Version 3: views for the joins people make every day: firings and edges with token roles.

CREATE VIEW firing_roles AS
SELECT f.*, d.role AS dest_role, s.role AS src_role, d.token AS dest_token, s.token AS src_token
FROM firings f
JOIN tokens d ON d.run_id = f.run_id AND d.prompt_id = f.prompt_id AND d.pos = f.dest_pos
JOIN tokens s ON s.run_id = f.run_id AND s.prompt_id = f.prompt_id AND s.pos = f.src_pos;

-- The token an upstream head writes to is dest_pos on the query side and src_pos on the key side.
CREATE VIEW edge_roles AS
SELECT e.*,
       CASE WHEN e.side = 'query' THEN e.dest_pos ELSE e.src_pos END AS token_pos,
       t.role AS token_role, d.role AS dest_role, s.role AS src_role
FROM edges e
JOIN tokens t ON t.run_id = e.run_id AND t.prompt_id = e.prompt_id
             AND t.pos = CASE WHEN e.side = 'query' THEN e.dest_pos ELSE e.src_pos END
JOIN tokens d ON d.run_id = e.run_id AND d.prompt_id = e.prompt_id AND d.pos = e.dest_pos
JOIN tokens s ON s.run_id = e.run_id AND s.prompt_id = e.prompt_id AND s.pos = e.src_pos;
