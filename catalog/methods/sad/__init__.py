"""The 2024 method (Franco & Crovella, SPEC.md): per-head (or per-offset) SVD forms, firings,
sparse signals and head-to-head edges."""

from catalog.methods.sad.settings import SadSettings


def summary_detail(summary: dict) -> str:
    """The counts an ingest's last line gives for a run of the 2024 method."""
    return (f"{summary['firings']} firings, mean signal size {summary['mean_signal_size']:.2f} "
            f"singular vectors, {summary['edges']} edges")


METHOD_FIELDS = dict(
    name="sad", title="2024, SPEC.md; the default", settings=SadSettings,
    analysis="catalog.methods.sad.batch:batch_analysis",
    tables=("firings", "firing_svs", "side_shares", "edges", "edge_svs"),
    weight_unit="score", form="augmented", trace="heads", per_firing="signal",
    label="2024 method", upstream_kinds=("head",), partial_firings=None, run_settings="thresholds",
    summary_detail=summary_detail,
    notes=("edge weights are parts of the attention score (score)",),
)
