"""The 2024 method's settings (SPEC.md): the thresholds of a firing, its sparse signal and its edges.

Recorded in the runs columns attn_threshold, sv_threshold, edge_threshold and append_constant
(the columns the first catalogs had) and, since migration 009, sink_attention, sink_head_share,
sink_min_heads and keep_sinks (the attention-sink rule, docs/schema.md "Attention sinks"; NULL in
older runs, which applied no rule), so `record()` gives no JSON `settings`."""

from __future__ import annotations

from dataclasses import dataclass

from catalog.settings import at_least, in_unit_interval, option, positive


@dataclass(frozen=True)
class SadSettings:
    attn_threshold: float = option(0.5, "Pattern weight of a firing.", rules=(in_unit_interval(),))
    sv_threshold: float = option(1.0, "Share of the score the sparse signal must exceed.", rules=(positive(),))
    edge_threshold: float = option(0.7, "Share of a side's total the edges must carry.", rules=(in_unit_interval(),))
    append_constant: bool = option(True, "Augment upstream outputs with a constant 1, as the reference "
                                         "implementation does.", negatable=True)
    # The sink rule's defaults are calibrated on SmolLM2-135M (README, "Attention sinks"): they
    # find its first " the" and flag nothing on GPT-2 attn-real or the tiny random test models.
    sink_attention: float = option(0.3, "Mean attention (over the destinations after it) a head must give "
                                        "a token for the token to count towards a sink.",
                                   rules=(in_unit_interval(),))
    sink_head_share: float = option(0.15, "Share of all heads (layers x heads) that must give a token "
                                          "sink_attention for it to be a sink of its prompt; 1 flags "
                                          "almost nothing.", rules=(in_unit_interval(),))
    sink_min_heads: int = option(8, "Fewest heads that must give a token sink_attention for it to be a sink "
                                    "(keeps a small model's few heads from making sinks).", rules=(at_least(1),))
    keep_sinks: bool = option(False, "Trace edges of firings to sink tokens too (they are flagged "
                                     "firings.to_sink either way).")

    def columns(self) -> dict:
        """The runs columns these settings are recorded in (and a run is found by)."""
        return {"attn_threshold": self.attn_threshold, "sv_threshold": self.sv_threshold,
                "edge_threshold": self.edge_threshold, "append_constant": self.append_constant,
                "sink_attention": self.sink_attention, "sink_head_share": self.sink_head_share,
                "sink_min_heads": self.sink_min_heads, "keep_sinks": self.keep_sinks}

    def record(self) -> None:
        return None
