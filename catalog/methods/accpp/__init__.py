"""ACC++ (Franco, Tassis, Rohr & Crovella 2026), as ../shared/ACCPP.md states it.

Stages, one module each: weights (per-head SVD of the plain QK form and the bias offsets) ->
components (every residual component's output, from one forward pass) -> firing (a firing's
atoms ranked by integrated gradients and selected greedily, batched over firings) -> seeds
(the output's decomposition into seed components) -> circuit (the recursive circuit of a
batch of prompts, layer by layer, as catalog rows). settings and inputs hold what a job checks
before it starts; they, like this module, import no torch.
"""

from catalog.methods.accpp.inputs import check_config, check_inputs
from catalog.methods.accpp.settings import AccppSettings


def summary_detail(summary: dict) -> str:
    """The counts an ingest's last line gives for an ACC++ run."""
    return f"{summary['firings']} firings decomposed, {summary['seeds']} seeds, {summary['edges']} edges"


METHOD_FIELDS = dict(
    name="accpp", title="ACC++, ACCPP.md", settings=AccppSettings,
    analysis="catalog.methods.accpp.circuit:batch_analysis",
    tables=("firings", "firing_sides", "edges", "edge_svs", "roots", "seeds"),
    weight_unit="attn_prob", form="plain", trace="seeded", per_firing="sides",
    label="ACC++", upstream_kinds=("head", "mlp", "attn_bias", "embed", "offset"),
    partial_firings="ACC++ decomposes only the firings its circuits reach", run_settings="settings",
    check_inputs=check_inputs, check_config=check_config, summary_detail=summary_detail,
    notes=("edge weights are shares of the downstream attention probability (attn_prob)",),
)
