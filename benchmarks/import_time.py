"""Wall time of `import optimum_fair` and of the CLI's --help / --version, against importing transformers'
AutoModel, each in a fresh process.

    python benchmarks/import_time.py                     # 7 rounds, the table printed
    python benchmarks/import_time.py --repeats 15 --out benchmarks/results/import_time.json

`import optimum_fair` registers the quantizer and the native model types with transformers, so it cannot
cost less than the transformers modules that registration needs; the baseline is what a user of any
transformers model pays, `import transformers; from transformers import AutoModel` (it resolves the lazy
auto class). The third case is what registering anything needs: transformers' quantizer registry (it
imports every transformers quantizer) and `PreTrainedModel` (the native models' base class). Every round
runs each case once, in turn, so a busy machine slows all of them alike; the table gives the median and
the fastest run of each, and the median over rounds of each case's time divided by the baseline's (and
the registration API's) in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import machine

BASELINE = "transformers AutoModel"
FLOOR = "transformers' registration API"
# name -> the code a fresh `python -c` runs
CASES = {
    "python (empty)": "pass",
    BASELINE: "import transformers; from transformers import AutoModel",
    FLOOR: ("from transformers.quantizers.auto import register_quantizer; "
                                       "from transformers import AutoModel, PreTrainedModel"),
    "import optimum_fair": "import optimum_fair",
    "optimum-fair --help": "from optimum_fair_cli import main; main(['--help'])",
    "optimum-fair --version": "from optimum_fair_cli import main; main(['--version'])",
}


def wall_time(code: str) -> float:
    """Seconds a fresh interpreter takes to run `code` (start-up included), output discarded."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(cases: dict[str, str], repeats: int) -> dict[str, list[float]]:
    """{case: [seconds per round]}, the cases interleaved round by round (after one unrecorded warm-up
    round, which fills the OS file cache)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(repeats + 1):
        for name, code in cases.items():
            seconds = wall_time(code)
            if round_:
                times[name].append(seconds)
    return times


def median_ratio(seconds: list[float], baseline: list[float]) -> float:
    """The median over rounds of one case's time divided by the baseline's in the same round."""
    return statistics.median(t / b for t, b in zip(seconds, baseline, strict=True))


def summarize(times: dict[str, list[float]]) -> list[dict]:
    """One row per case: median and fastest seconds, and its median ratio to `BASELINE` and to `FLOOR`."""
    return [{"case": name, "median_s": statistics.median(seconds), "min_s": min(seconds),
             "ratio": median_ratio(seconds, times[BASELINE]), "ratio_floor": median_ratio(seconds, times[FLOOR]),
             "runs": len(seconds)} for name, seconds in times.items()]


def table(rows: list[dict]) -> str:
    lines = ["| case | median (s) | fastest (s) | / AutoModel | / registration API |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['ratio']:.2f} | {r['ratio_floor']:.2f} |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="recorded rounds (default: 7)")
    p.add_argument("--out", default=None, help="also write the rows and the machine to this JSON file")
    args = p.parse_args()
    times = measure(CASES, args.repeats)
    rows = summarize(times)
    print(table(rows))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\n{machine()['cpu']}, {machine()['cores']} cores, load average {load:.1f} at the end")
    if args.out:
        report = {**machine(), "load_average": load, "repeats": args.repeats, "rows": rows, "times": times}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
