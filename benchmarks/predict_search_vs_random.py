"""The prediction, written down before `search_vs_random.py` runs: from a probe's components, can
any search beat random search at this budget with 80% power?

For each probe.json given, `variance.search_vs_random_prediction` grants the search the space's
optimum (the noise-free best of 64 draws) and random the expected best of `--budget` single-seed
draws, and bounds the power of a paired t test over `--search-seeds` searches whose answers are
scored on `--test-seeds` fresh training seeds. Prints a table; writes
benchmarks/results/prediction_search_vs_random.json with the time it was made.

    python benchmarks/predict_search_vs_random.py runs/probe-neural/probe/probe.json \
        runs/probe-coef/probe/probe.json --budget 8 --search-seeds 5 --test-seeds 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from mirrorlab import variance

RESULTS = Path(__file__).resolve().parent / "results" / "prediction_search_vs_random.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("probes", nargs="+", help="probe.json files")
    ap.add_argument("--budget", type=int, default=8, help="candidates per search (1 seed each)")
    ap.add_argument("--search-seeds", type=int, default=5)
    ap.add_argument("--test-seeds", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    rows = []
    for f in args.probes:
        res = json.loads(Path(f).read_text())
        c = res["components"]["fitness"]
        comp = variance.Components(**{k: c[k] for k in variance.Components.__dataclass_fields__})
        p = variance.search_vs_random_prediction(comp, args.budget, args.search_seeds, args.test_seeds)
        rows.append({"probe": f, "space": res.get("space"), "signal_sd": comp.signal_sd,
                     "noise_sd": comp.noise_sd, "icc": comp.icc, **p})
    print(f"{'space':<12} {'signal sd':>9} {'noise sd':>8} {'random gain':>11} {'optimum':>8} "
          f"{'max effect':>10} {'power <=':>8} {'seeds for 80%':>13}  prediction")
    for r in rows:
        print(f"{r['space']:<12} {r['signal_sd']:>9.4f} {r['noise_sd']:>8.4f} "
              f"{r['random_expected_gain']:>11.4f} {r['optimum_gain']:>8.4f} {r['max_effect']:>10.4f} "
              f"{r['power_upper_bound']:>8.2f} "
              f"{str(r['search_seeds_for_80pct']):>13}  "
              f"{'search can beat random' if r['predicted_positive'] else 'no detectable difference'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"made_at": dt.datetime.now(dt.UTC).isoformat(), "budget": args.budget,
                               "search_seeds": args.search_seeds, "test_seeds": args.test_seeds,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
