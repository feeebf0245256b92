"""ACC++ (Franco, Tassis, Rohr & Crovella 2026), as ../shared/ACCPP.md states it.

Stages, one module each: weights (per-head SVD of the plain QK form and the bias offsets) ->
components (every residual component's output, from one forward pass) -> firing (a firing's
atoms ranked by integrated gradients and selected greedily, batched over firings) -> seeds
(the output's decomposition into seed components) -> circuit (the recursive circuit of a
batch of prompts, layer by layer, as catalog rows).
"""
