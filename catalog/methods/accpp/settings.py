"""ACC++'s settings (ACCPP.md): every setting of a run that changes its results, recorded as JSON
in runs.settings."""

from __future__ import annotations

from dataclasses import dataclass, replace

from catalog.errors import CatalogError
from catalog.settings import Rule, at_least, in_unit_interval, option

SEEDINGS = ("linear", "prob", "none")
PROB_TARGETS = ("answer", "top1")


def _threshold_rule() -> Rule:
    return Rule(lambda v: v == "dynamic" or 0 < float(v) <= 1, "be 'dynamic' or a number in (0, 1]")


@dataclass(frozen=True)
class AccppSettings:
    threshold: str | float = option(
        "dynamic", "Firing and greedy threshold, 'dynamic' = min(1, 2.5/(i+1)) at destination i, or a number.",
        rules=(_threshold_rule(),), kind=str)
    ig_steps: int = option(64, "Trapezoid intervals of the integrated gradients.", rules=(at_least(1),))
    seeding: str = option(
        "linear", "Root each prompt's circuit at the logit difference answer - wrong (linear), the "
                  "log-probability of a token (prob), or decompose only --heads (none).", choices=SEEDINGS)
    prob_target: str = option("answer", "--seeding prob: the token whose probability is explained.",
                              choices=PROB_TARGETS)
    tau: float = option(0.8, "--seeding prob: share of the objective the seeds must remove.",
                        rules=(in_unit_interval(),))
    heads: tuple[tuple[int, int], ...] = option(
        (), "Also decompose every firing of these heads (e.g. 9.9,9.6,10.0).", metavar="L.H,...", kind=str)
    dest_roles: tuple[str, ...] = option(
        (), "With --heads: only their firings whose destination token has one of these roles.",
        metavar="ROLE,...", kind=str)

    def parsed(self) -> "AccppSettings":
        """User values made typed: a threshold 'dynamic' or a number, heads "9.9,9.6" or a list."""
        from catalog.heads import parse_head

        threshold = self.threshold
        if isinstance(threshold, str) and threshold != "dynamic":
            try:
                threshold = float(threshold)
            except ValueError:
                raise CatalogError(f"--threshold must be 'dynamic' or a number, got '{threshold}'") from None
        heads = tuple(h if isinstance(h, tuple) else parse_head(h) for h in _split(self.heads))
        made = replace(self, threshold=threshold, ig_steps=int(self.ig_steps), tau=float(self.tau), heads=heads,
                       dest_roles=tuple(_split(self.dest_roles)))
        if made.seeding == "none" and not made.heads:
            raise CatalogError("--seeding none decomposes nothing without --heads L.H,...")
        if made.dest_roles and not made.heads:
            raise CatalogError("--dest-roles applies to the firings of --heads; give --heads too")
        return made

    def columns(self) -> dict:
        """ACC++ runs leave the 2024 method's runs columns empty (its thresholds and sink rule)."""
        return {"attn_threshold": None, "sv_threshold": None, "edge_threshold": None, "append_constant": None,
                "sink_attention": None, "sink_head_share": None, "sink_min_heads": None, "keep_sinks": None}

    def record(self) -> dict:
        return {"threshold": self.threshold, "ig_steps": self.ig_steps, "seeding": self.seeding,
                "prob_target": self.prob_target if self.seeding == "prob" else None,
                "tau": self.tau if self.seeding == "prob" else None,
                "heads": [f"{l}.{h}" for l, h in self.heads], "dest_roles": list(self.dest_roles)}


def _split(value) -> list:
    """"9.9,9.6" or ["9.9", "9.6"] or ((9, 9),) -> items (a tuple item is kept whole)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        out.extend([p.strip() for p in item.split(",") if p.strip()] if isinstance(item, str) else [item])
    return out
