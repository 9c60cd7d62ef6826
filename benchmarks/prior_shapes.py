"""How far a saved Stage I prior is from uniform weighting: one row per prior directory.

    python benchmarks/prior_shapes.py runs/priors/*/prior-* --out benchmarks/results/study_prior_shapes

Per prior: the window's smallest and largest weight (the window's mean is 1), the share of the total
weight that falls in the window, and the effective number of tokens per calibration sequence,
(Σ w)² / Σ w² (N for uniform weights; fewer tokens carry the loss as the weights concentrate), which is
what a weighted GPTQ Hessian or a weighted MSE is estimated from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from optimum_fair.scoring.prior import PositionPrior


def shape(prior: PositionPrior) -> dict[str, float]:
    w = prior.weights.double()  # (N,)
    end = prior.seq_len - int(prior.settings.get("logit_shift", 0))  # as placed by place_in_sequence
    window = w[end - prior.window:end]  # (K,)
    return {"seq_len": prior.seq_len, "window": prior.window, "floor": prior.floor,
            "window_min": float(window.min()), "window_max": float(window.max()),
            "window_share": float(window.sum() / w.sum()),
            "effective_tokens": float(w.sum() ** 2 / (w ** 2).sum())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("priors", nargs="+", help="directories written by PositionPrior.save")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = p.parse_args(argv)
    rows = {Path(d).name: shape(PositionPrior.load(d)) for d in args.priors}
    lines = ["| prior | window / N | floor | window min | window max | window share | effective tokens |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['window']} / {r['seq_len']} | {r['floor']:g} | {r['window_min']:.2f} | "
                     f"{r['window_max']:.2f} | {r['window_share']:.3f} | {r['effective_tokens']:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
