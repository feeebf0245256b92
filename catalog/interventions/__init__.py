"""Causal checks of traced edges (issue 9): intervene on an edge's signal, measure what changes.

forward: GPT-2's forward pass, clean and incremental (many perturbed prompt copies at once).
core: edge signals (ACCPP.md section 5) and the batched interventions.
run: the catalog side: select a run's edges, intervene, store the `interventions` rows.
"""
