"""Features on the catalog's edges: sparse dictionaries over a layer's attention output.

`sae`: an attention-output SAE (Kissane et al. 2024: one dictionary over a layer's concatenated
`hook_z`, all heads) read and written in SAELens's on-disk format; `train`: training one on a
corpus of activations, with its figures; `attribution`: splitting a `head` edge's weight into
the parts of the upstream layer's features, the decoder bias and the reconstruction error.
Functions over tensors, at the methods layer: they never open the store (catalog.jobs.features
does), and the read side never imports them (docs/features.md).
"""
