"""The w-conditioned known-answer rows on several seeds: guided progressive (student DDIM-2 vs the guided teacher's
DDIM-4, paired RMS) and 1-step w-conditioned consistency (energy distance to the guided teacher's DDIM-50), at
w = 1.5 / 2 / 2.5, with the measurement code of ``tests/test_trajectory_known_answer.py`` (which holds seed 0).

    python bench/w_conditioned.py [--seeds 0 1 2] [--out runs/bench_w_conditioned]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import trainer_for  # noqa: E402
from test_trajectory_known_answer import (  # noqa: E402
    W_CONDITIONED,
    W_LCM,
    w_conditioned_gaps,
    w_conditioned_lcm_distances,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/bench_w_conditioned")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        gaps = w_conditioned_gaps(trainer_for(out / f"progressive_{seed}", "progressive", None, *W_CONDITIONED,
                                              f"train.seed={seed}"))
        rows.append({"model": "guided progressive, DDIM-2 vs guided DDIM-4 (RMS)", "seed": seed,
                     "student": [round(g[0], 3) for g in gaps], "teacher DDIM-2": [round(g[1], 3) for g in gaps]})
        print(json.dumps(rows[-1]), flush=True)
        dist = w_conditioned_lcm_distances(trainer_for(out / f"lcm_{seed}", "consistency", None, *W_LCM,
                                                       f"train.seed={seed}"))
        rows.append({"model": "1-step w-conditioned consistency, ED to guided DDIM-50", "seed": seed,
                     "student": [round(d, 4) for d in dist]})
        print(json.dumps(rows[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "w_conditioned.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
