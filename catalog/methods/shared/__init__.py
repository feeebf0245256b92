"""What both methods use: the per-head SVD plumbing (`svd`) and a batch's tensors (`tensors`)."""
