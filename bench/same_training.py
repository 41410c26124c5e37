"""Does this checkout train exactly what another commit trained? For refactors that must change no arithmetic.

    python bench/same_training.py --ref 78e2c76 [--out /tmp/same_training]

Checks out ``--ref`` into a git worktree, lays its top-level ``methods/``, ``pipelines/`` and ``eval/`` into its
package as the editable install maps them, then trains each config below once with that code and once with this
checkout (one thread each, in fresh processes, each with its own ``configs/`` file, so renamed keys do not matter),
and compares the final student weights bit for bit. Prints one line per config; exit status 1 if any differs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["train.steps=6", "train.batch_size=8", "train.checkpoint_every=5"]
RUNS = {  # name: (config, overrides): every method, GAN head, LoRA critic, frozen-teacher critic, EMA, rounds
    "dmd2": ("gmm_dmd2.yaml", ["train.steps=60", "train.batch_size=64"]),
    "dmd2_1to1_ema": ("gmm_dmd2.yaml", ["train.steps=60", "train.batch_size=64", "dmd2.critic_updates=1",
                                        "train.ema_decay=0.9"]),
    "sid": ("gmm_sid.yaml", ["train.steps=60"]),
    "vsd": ("gmm_vsd.yaml", ["train.steps=60"]),
    "consistency": ("gmm_consistency.yaml", ["train.steps=60"]),
    "progressive": ("gmm_progressive.yaml", ["train.steps=60", "progressive.steps_per_round=20"]),
    "ladd": ("gmm_ladd.yaml", ["train.steps=60"]),
    "digits_dmd2": ("digits_dmd2.yaml", ["train.steps=9", "train.batch_size=8", "train.checkpoint_every=5"]),
    "digits_sida": ("digits_sida.yaml", SHORT),
    "digits_vsd": ("digits_vsd.yaml", SHORT),
    "digits_consistency": ("digits_consistency.yaml", SHORT),
    "digits_progressive": ("digits_progressive.yaml", SHORT),
    "digits_add": ("digits_add.yaml", SHORT),
}
TRAIN = ("import sys; from distill_diffusion.config import load_config; "
         "from distill_diffusion.trainer import Trainer; "
         "cfg = load_config(sys.argv[1], ['train.progress=false', 'train.eval_samples=200', *sys.argv[3:]]); "
         "Trainer(cfg, sys.argv[2]).train()")


def reference_tree(ref: str, where: Path) -> Path:
    """A worktree of ``ref`` and a directory whose ``distill_diffusion`` is that commit's package, laid out as the
    editable install lays it out (methods, pipelines and eval inside it); put it first on PYTHONPATH."""
    tree = where / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)
    for sub in ("methods", "pipelines", "eval"):
        (tree / "distill_diffusion" / sub).symlink_to(tree / sub)
    path = where / "path"
    path.mkdir()
    (path / "distill_diffusion").symlink_to(tree / "distill_diffusion")
    return tree


def train(code_root: Path, config: str, out: Path, overrides: list[str], pythonpath: str | None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    subprocess.run([sys.executable, "-c", TRAIN, str(code_root / "configs" / config), str(out), *overrides],
                   cwd=tempfile.gettempdir(), env=env, check=True, capture_output=True)


def compare(a: Path, b: Path) -> str:
    out = []
    for name in sorted(p.name for p in (a / "final").glob("*.safetensors")):
        x, y = load_file(str(a / "final" / name)), load_file(str(b / "final" / name))
        same = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        out.append(f"{name} {'bit-identical' if same else 'DIFFERS'}")
    return ", ".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", required=True, help="the commit to compare against")
    ap.add_argument("--out", default=None, help="scratch directory (default: a new temporary one)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(RUNS)}")
    args = ap.parse_args()
    runs = {k: v for k, v in RUNS.items() if args.only is None or k in args.only.split(",")}
    out = Path(args.out or tempfile.mkdtemp(prefix="same_training_"))
    out.mkdir(parents=True, exist_ok=True)
    tree = reference_tree(args.ref, out)
    failed = False
    try:
        for name, (config, overrides) in runs.items():
            train(tree, config, out / f"ref_{name}", overrides, str(out / "path"))
            train(ROOT, config, out / f"new_{name}", overrides, None)
            line = compare(out / f"ref_{name}", out / f"new_{name}")
            failed |= "DIFFERS" in line or not line
            print(f"{name}: {line or 'no final weights'}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
