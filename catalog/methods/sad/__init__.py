"""The 2024 method (Franco & Crovella, SPEC.md): per-head (or per-offset) SVD forms, firings,
sparse signals and head-to-head edges."""

from catalog.methods.sad.settings import SadSettings

METHOD_FIELDS = dict(
    name="sad", title="2024, SPEC.md; the default", settings=SadSettings,
    analysis="catalog.methods.sad.batch:batch_analysis",
    tables=("firings", "firing_svs", "edges", "edge_svs"),
    weight_unit="score", form="augmented", trace="heads", per_firing="signal",
    label="2024 method", upstream_kinds=("head",), partial_firings=None, run_settings="thresholds",
    notes=("edge weights are parts of the attention score (score)",),
)
