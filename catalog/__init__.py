"""circuit-catalog: a DuckDB catalog of how the attention heads of a transformer talk to each other.

Stages, one module each, in the order the data flows:
model (with families/, one adapter per model family) -> decompose (per head) or rotary (per head
and offset) -> forms -> prompts -> signals -> edges -> store -> ingest (the job) -> query -> cli.
Only model, decompose, rotary, forms, signals, edges and ingest need torch; query and cli never
import it.
"""

__version__ = "0.1.0"
