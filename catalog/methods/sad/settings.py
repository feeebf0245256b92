"""The 2024 method's settings (SPEC.md): the thresholds of a firing, its sparse signal and its edges.

Recorded in the runs columns attn_threshold, sv_threshold, edge_threshold and append_constant
(the columns the first catalogs had), so `record()` gives no JSON `settings`."""

from __future__ import annotations

from dataclasses import dataclass

from catalog.settings import in_unit_interval, option, positive


@dataclass(frozen=True)
class SadSettings:
    attn_threshold: float = option(0.5, "Pattern weight of a firing.", rules=(in_unit_interval(),))
    sv_threshold: float = option(1.0, "Share of the score the sparse signal must exceed.", rules=(positive(),))
    edge_threshold: float = option(0.7, "Share of a side's total the edges must carry.", rules=(in_unit_interval(),))
    append_constant: bool = option(True, "Augment upstream outputs with a constant 1, as the reference "
                                         "implementation does.", negatable=True)

    def columns(self) -> dict:
        """The runs columns these settings are recorded in (and a run is found by)."""
        return {"attn_threshold": self.attn_threshold, "sv_threshold": self.sv_threshold,
                "edge_threshold": self.edge_threshold, "append_constant": self.append_constant}

    def record(self) -> None:
        return None
