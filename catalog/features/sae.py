"""An attention-output SAE in SAELens's on-disk format (read and written without sae-lens).

A directory holds `cfg.json` and `sae_weights.safetensors`. The weights are `W_enc` [d_in,
d_sae], `W_dec` [d_sae, d_in], `b_enc` [d_sae], `b_dec` [d_in], and `threshold` [d_sae] for
JumpReLU. The config names the `architecture` (`standard`: ReLU; `topk`: the `k` largest
pre-activations, ReLU'd; `jumprelu`: a pre-activation kept where it exceeds its threshold),
`d_in`, `d_sae`, `apply_b_dec_to_input` (subtract `b_dec` before encoding),
`normalize_activations` (only `none` is read: the catalog's split of an edge by feature needs a
decoder that is affine in the activations), `reshape_activations` (`hook_z`: the input is a
layer's `[n_heads, d_head]` z flattened head-major, so head h owns columns h*d_head ..
(h+1)*d_head of every decoder row), and `hook_name`, `hook_head_index`, `model_name` — at the
top level (SAELens before version 6 and the hub's attention-output SAEs; `hook_point` and
`hook_point_head_index` in the oldest) or under `meta` (SAELens 6). The catalog writes both places, so either SAELens reads what it writes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from catalog.errors import CatalogError

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu")
_HOOK_Z = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")


@dataclass
class AttentionSae:
    architecture: str
    W_enc: torch.Tensor  # [d_in, d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_enc: torch.Tensor  # [d_sae]
    b_dec: torch.Tensor  # [d_in]
    layer: int
    model_name: str
    k: int | None = None  # topk
    threshold: torch.Tensor | None = None  # jumprelu [d_sae]
    apply_b_dec_to_input: bool = True
    figures: dict = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.attn.hook_z"

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] (a flattened hook_z) -> pre-activations [..., d_sae]."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.architecture == "topk":
            top = torch.topk(pre, k=self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        return torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec

    def to(self, device: str, dtype=torch.float32) -> "AttentionSae":
        moved = {name: getattr(self, name).to(device, dtype) for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
        threshold = None if self.threshold is None else self.threshold.to(device, dtype)
        return AttentionSae(self.architecture, **moved, layer=self.layer, model_name=self.model_name, k=self.k,
                            threshold=threshold, apply_b_dec_to_input=self.apply_b_dec_to_input,
                            figures=self.figures)

    def config(self) -> dict:
        """cfg.json: the fields SAELens reads, at the top level and under `meta`."""
        meta = {"model_name": self.model_name, "hook_name": self.hook_name, "hook_layer": self.layer,
                "hook_head_index": None, "prepend_bos": False}
        cfg = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": "float32",
               "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": "none",
               "reshape_activations": "hook_z", **meta, "meta": meta}
        if self.k is not None:
            cfg["k"] = self.k
        if self.figures:
            cfg["catalog_figures"] = self.figures  # ignored by SAELens; read back by the catalog
        return cfg


def save_sae(sae: AttentionSae, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(sae, name).detach().float().cpu().contiguous()
               for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold.detach().float().cpu().contiguous()
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / CFG_FILE).write_text(json.dumps(sae.config(), indent=2) + "\n")
    return out_dir


def weights_digest(sae_dir: str | Path) -> str:
    """sha256 of the weights file: a dictionary's identity in the catalog."""
    digest = hashlib.sha256()
    with open(Path(sae_dir) / WEIGHTS_FILE, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_sae(sae_dir: str | Path, n_heads: int | None = None, d_head: int | None = None) -> AttentionSae:
    """Read an attention-output SAE directory; every problem is one CatalogError line."""
    sae_dir = Path(sae_dir)
    where = f"--sae {sae_dir}"
    if not (sae_dir / CFG_FILE).is_file() or not (sae_dir / WEIGHTS_FILE).is_file():
        raise CatalogError(f"{where} is not an SAE directory in SAELens's format ({CFG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads((sae_dir / CFG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CatalogError(f"{where}: {CFG_FILE} is not JSON ({err})") from None
    meta = {**cfg, **(cfg.get("meta") or {})} if isinstance(cfg, dict) else {}
    for old_name, name in (("hook_point", "hook_name"), ("hook_point_head_index", "hook_head_index")):
        if meta.get(name) is None and old_name in meta:  # the names of SAELens before version 3
            meta[name] = meta[old_name]
    architecture = meta.get("architecture", "standard")
    if architecture not in ARCHITECTURES:
        raise CatalogError(f"{where}: architecture '{architecture}' is not read (one of {', '.join(ARCHITECTURES)})")
    hook = _HOOK_Z.match(str(meta.get("hook_name") or ""))
    if hook is None:
        raise CatalogError(f"{where}: hook_name '{meta.get('hook_name')}' is not an attention output "
                           "(blocks.L.attn.hook_z)")
    if meta.get("hook_head_index") is not None:
        raise CatalogError(f"{where}: an SAE of one head (hook_head_index {meta['hook_head_index']}) is not read; "
                           "the catalog reads SAEs over all heads of a layer")
    if (meta.get("normalize_activations") or "none") != "none":
        raise CatalogError(f"{where}: normalize_activations '{meta['normalize_activations']}' is not read "
                           "(fold the scaling into the weights: only 'none' keeps the decoder affine)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(sae_dir / WEIGHTS_FILE))
    except (SafetensorError, OSError) as err:
        raise CatalogError(f"{where}: {WEIGHTS_FILE} cannot be read ({err})") from None
    missing = [n for n in ("W_enc", "W_dec", "b_enc", "b_dec") + (("threshold",) if architecture == "jumprelu" else ())
               if n not in weights]
    if missing:
        raise CatalogError(f"{where}: {WEIGHTS_FILE} lacks {', '.join(missing)}")
    W_enc, W_dec = weights["W_enc"].float(), weights["W_dec"].float()
    d_in, d_sae = int(meta.get("d_in", W_enc.shape[0])), int(meta.get("d_sae", W_enc.shape[-1]))
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
              "threshold": (d_sae,)}
    for name, tensor in weights.items():
        if name in shapes and tuple(tensor.shape) != shapes[name]:
            raise CatalogError(f"{where}: {name} has shape {tuple(tensor.shape)}, not {shapes[name]} "
                               f"(d_in {d_in}, d_sae {d_sae})")
    if n_heads is not None and d_head is not None and d_in != n_heads * d_head:
        raise CatalogError(f"{where}: d_in {d_in} is not n_heads x d_head = {n_heads} x {d_head} of the catalog's "
                           "model: an attention-output SAE reads all heads' z")
    k = meta.get("k")
    if architecture == "topk" and not isinstance(k, int):
        raise CatalogError(f"{where}: a topk SAE needs an integer k in {CFG_FILE}")
    return AttentionSae(
        architecture, W_enc, W_dec, weights["b_enc"].float(), weights["b_dec"].float(), layer=int(hook.group(1)),
        model_name=str(meta.get("model_name") or ""), k=k if architecture == "topk" else None,
        threshold=weights["threshold"].float() if architecture == "jumprelu" else None,
        apply_b_dec_to_input=bool(meta.get("apply_b_dec_to_input", True)),
        figures=cfg.get("catalog_figures") or {},
    )
