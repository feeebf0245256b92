"""Reading a linear probe's direction for --seeding probe (torch only for a .pt file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from catalog.errors import CatalogError


def read_probe(path: Path) -> np.ndarray:
    """The probe's direction as a 1-D float64 numpy array, from a .npy (numpy.save) or .pt
    (torch.save of a tensor) file; one CatalogError line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"--probe: no file {path}")
    try:
        if path.suffix == ".npy":
            vector = np.load(path, allow_pickle=False)
        elif path.suffix == ".pt":
            import torch

            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, torch.Tensor):
                raise CatalogError(f"--probe: {path} holds a {type(loaded).__name__}, not a tensor")
            vector = loaded.detach().double().numpy()
        else:
            raise CatalogError(f"--probe: {path} is neither a .npy nor a .pt file")
    except CatalogError:
        raise
    except Exception as error:  # numpy's and torch's own errors for a damaged file
        raise CatalogError(f"--probe: cannot read {path}: {type(error).__name__}") from None
    vector = np.asarray(vector, dtype=np.float64).squeeze()
    if vector.ndim != 1 or not np.isfinite(vector).all():
        raise CatalogError(f"--probe: {path} must hold one finite d_model vector, got shape {tuple(vector.shape)}")
    return vector
