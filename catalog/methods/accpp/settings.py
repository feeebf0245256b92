"""ACC++'s settings (ACCPP.md): every setting of a run that changes its results, recorded as JSON
in runs.settings."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from catalog.errors import CatalogError
from catalog.settings import Rule, at_least, in_unit_interval, option

SEEDINGS = ("linear", "prob", "probe", "none")
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
                  "log-probability of a token (prob), a linear probe's direction at --probe-layer (probe), "
                  "or decompose only --heads (none).", choices=SEEDINGS)
    prob_target: str = option("answer", "--seeding prob: the token whose probability is explained.",
                              choices=PROB_TARGETS)
    tau: float = option(0.8, "--seeding prob: share of the objective the seeds must remove.",
                        rules=(in_unit_interval(),))
    probe: Path | None = option(None, "--seeding probe: a .npy or .pt file holding the probe's direction "
                                      "(a d_model vector).", metavar="FILE", kind=Path)
    probe_layer: int | None = option(None, "--seeding probe: the layer whose residual output the probe reads "
                                           "(blocks.L.hook_resid_post).", metavar="L", kind=int,
                                     rules=(at_least(0),))
    heads: tuple[tuple[int, int], ...] = option(
        (), "Also decompose every firing of these heads (e.g. 9.9,9.6,10.0).", metavar="L.H,...", kind=str)
    dest_roles: tuple[str, ...] = option(
        (), "With --heads: only their firings whose destination token has one of these roles.",
        metavar="ROLE,...", kind=str)
    # The probe file's sha256, set by parsed(): a run is the same run only with the same direction.
    probe_digest: str | None = field(default=None, compare=False)

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
        if made.seeding == "probe":
            if made.probe is None or made.probe_layer is None:
                raise CatalogError("--seeding probe needs --probe FILE (.npy or .pt) and --probe-layer L")
            probe = Path(made.probe)
            load_probe(probe)  # a bad file fails here, before the model is loaded
            made = replace(made, probe=probe, probe_layer=int(made.probe_layer),
                           probe_digest=hashlib.sha256(probe.read_bytes()).hexdigest())
        elif made.probe is not None or made.probe_layer is not None:
            raise CatalogError("--probe and --probe-layer apply to --seeding probe")
        return made

    def columns(self) -> dict:
        """ACC++ runs leave the 2024 method's runs columns empty (its thresholds and sink rule)."""
        return {"attn_threshold": None, "sv_threshold": None, "edge_threshold": None, "append_constant": None,
                "sink_attention": None, "sink_head_share": None, "sink_min_heads": None, "keep_sinks": None}

    def record(self) -> dict:
        return {"threshold": self.threshold, "ig_steps": self.ig_steps, "seeding": self.seeding,
                "prob_target": self.prob_target if self.seeding == "prob" else None,
                "tau": self.tau if self.seeding == "prob" else None,
                "heads": [f"{l}.{h}" for l, h in self.heads], "dest_roles": list(self.dest_roles),
                **({"probe": str(self.probe), "probe_layer": self.probe_layer, "probe_digest": self.probe_digest}
                   if self.seeding == "probe" else {})}


def load_probe(path: Path):
    """The probe's direction as a 1-D float64 numpy array (catalog.methods.accpp.probe). Imported
    by name when called, as the registry loads a method's analysis: reading a .pt file needs torch,
    which the modules the read path imports (this one among them) must not import."""
    import importlib

    return importlib.import_module("catalog.methods.accpp.probe").read_probe(path)


def _split(value) -> list:
    """"9.9,9.6" or ["9.9", "9.6"] or ((9, 9),) -> items (a tuple item is kept whole)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        out.extend([p.strip() for p in item.split(",") if p.strip()] if isinstance(item, str) else [item])
    return out
