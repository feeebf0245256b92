"""SQLAlchemy Core descriptions of the catalog's metadata tables (models, runs).

The DDL lives in migrations/; these mirror it for typed selects and updates of single rows
(tests check that the two agree). Reflection is not used: duckdb-engine cannot reflect
through DuckDB 2's pg_catalog. Integer keys say autoincrement=False because duckdb-engine
would otherwise emit SERIAL, which DuckDB lacks; the catalog assigns ids itself.
"""

import sqlalchemy as sa

metadata = sa.MetaData()

models = sa.Table(
    "models", metadata,
    sa.Column("model_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("n_layers", sa.Integer, nullable=False),
    sa.Column("n_heads", sa.Integer, nullable=False),
    sa.Column("d_model", sa.Integer, nullable=False),
    sa.Column("d_head", sa.Integer, nullable=False),
    sa.Column("weights_digest", sa.String, nullable=False, unique=True),
    sa.Column("processing", sa.String, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False, server_default=sa.func.current_timestamp()),
)

runs = sa.Table(
    "runs", metadata,
    sa.Column("run_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.model_id"), nullable=False),
    sa.Column("dataset", sa.String, nullable=False),
    sa.Column("n_prompts", sa.Integer, nullable=False),
    sa.Column("seed", sa.Integer),
    sa.Column("prompts_digest", sa.String, nullable=False),
    # The 2024 method's settings (NULL for ACC++ runs, whose settings are in `settings`).
    sa.Column("attn_threshold", sa.Float),
    sa.Column("sv_threshold", sa.Float),
    sa.Column("edge_threshold", sa.Float),
    sa.Column("append_constant", sa.Boolean),
    sa.Column("batch_size", sa.Integer, nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("package_version", sa.String, nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("method", sa.String, server_default="sad"),        # 'sad' | 'accpp'
    sa.Column("weight_unit", sa.String, server_default="score"),  # 'score' | 'attn_prob'
    sa.Column("settings", sa.JSON),
    sa.Column("has_bos", sa.Boolean, server_default=sa.false()),  # token 0 of every prompt is BOS
    # The 2024 method's attention-sink rule (migration 009; NULL: the run applied none).
    sa.Column("sink_attention", sa.Float),
    sa.Column("sink_head_share", sa.Float),
    sa.Column("sink_min_heads", sa.Integer),
    sa.Column("keep_sinks", sa.Boolean),
)
