"""What the benchmark scripts share: their command line's common part, the GPT-2-small-sized
checkpoint they time, and a check that the machine is idle (timings on 2 cores mean little
while something else runs)."""

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
ATTN_WEIGHTS = SHARED / "gpt2-small-attention" / "gpt2-small-attention.safetensors"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "circuit-catalog-bench"


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A script's argument parser, described by the first paragraph of its docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Every script's --workdir (created if missing) added to its own options, then parsed."""
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"where checkpoints are cached and catalogs written (default {DEFAULT_WORKDIR})")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def checkpoint(workdir: Path) -> tuple[Path, str]:
    """A GPT-2-small-sized checkpoint directory in workdir (built once) and a line saying which."""
    from catalog.testing import save_attn_real_gpt2, save_random_gpt2

    if ATTN_WEIGHTS.exists():
        target = workdir / "attn-real"
        what = f"attn-real GPT-2 small (real attention weights of {ATTN_WEIGHTS}; real attention patterns)"
        build = partial(save_attn_real_gpt2, safetensors_path=ATTN_WEIGHTS)
    else:
        target = workdir / "random-gpt2-small"
        what = (f"random GPT-2-small-sized model ({ATTN_WEIGHTS} is absent): 12 layers x 12 heads, d_model 768; "
                "its attention patterns are not GPT-2's")
        build = partial(save_random_gpt2, n_layer=12, n_head=12, n_embd=768, n_positions=1024)
    if not (target / "model.safetensors").exists():
        print(f"building the checkpoint in {target} (once; cached for reruns) ...", flush=True)
        building = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=workdir))
        build(building)
        building.rename(target)  # complete or absent, never half-written
    return target, what


def warn_if_busy(seconds: float = 1.0) -> None:
    """Timings on a 2-core machine mean little while something else runs: sample /proc/stat for a
    second before starting and say so when the CPUs are busy."""

    def idle_total():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    try:
        idle0, total0 = idle_total()
        time.sleep(seconds)
        idle1, total1 = idle_total()
    except (OSError, ValueError, IndexError):
        return
    busy = 1 - (idle1 - idle0) / max(1, total1 - total0)
    if busy > 0.25:
        print(f"warning: the CPUs were {busy:.0%} busy with other work before the benchmark started; "
              "timings will be slower than on an idle machine")


def load_bench_model(workdir: Path, device: str = "cpu", dtype: str = "float32", model_path=None, model=None):
    """Build (once) and load the benchmark model, saying which model and machine; returns
    (model, load seconds). model_path or model (a hub name) replaces the default checkpoint."""
    import torch

    from catalog.models.loading import load_model

    if model_path is not None or model is not None:
        path, what = model_path, f"{model_path or model} (given)"
    else:
        path, what = checkpoint(workdir)
    print(f"model: {what}")
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads"
          + (f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "; no GPU"))
    warn_if_busy()
    started = time.perf_counter()
    lm = load_model(model or "gpt2", path, device=device, dtype=dtype)
    if lm.device == "cuda":
        torch.cuda.synchronize()
    return lm, time.perf_counter() - started
