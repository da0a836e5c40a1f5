"""Relevance engine accuracy on the labeled scenario set (tests/lookup/scenarios.toml).

    .venv/bin/python bench/lookup_relevance.py [--holdout] [--misses]

Prints precision and recall of `relevant`, agreement of `in_window` and of the deciding rule, the
confusion per rule (the rule the engine named: TP/FP/TN/FN of its relevant verdicts), the split by
children and adults, and the time per verdict. --holdout scores tests/lookup/holdout.toml instead,
a set labeled after the engine was frozen (see docs/lookup.md). Runs in about a second.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.lookup import vocabulary  # noqa: E402
from tests.lookup.scenarios import SCENARIOS, Case, load_cases, score  # noqa: E402


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def report(cases: list[Case], title: str, show_misses: bool) -> None:
    started = time.perf_counter()
    s = score(cases)
    elapsed = time.perf_counter() - started
    scenarios = len({c.scenario for c in cases})
    print(f"## {title}: {scenarios} scenarios, {s.total} (planned exam, prior) pairs")
    print(f"data files: {vocabulary.load().versions}")
    print()
    print(f"relevant   precision {s.precision:.3f}  recall {s.recall:.3f}", end="  ")
    print(f"(TP {s.tp}, FP {s.fp}, TN {s.tn}, FN {s.fn})")
    print(f"in_window  agreement {_pct(s.window_right / s.total)}")
    print(f"rule       agreement {_pct(s.rule_right / s.total)}")
    print(f"time       {1e3 * elapsed / s.total:.2f} ms per verdict (interpretation of both exams included)")
    print()
    print("| rule (as named by the engine) | TP | FP | TN | FN |")
    print("|---|---:|---:|---:|---:|")
    for rule, counts in sorted(s.per_rule.items(), key=lambda kv: -sum(kv[1].values())):
        print(f"| {rule} | {counts['tp']} | {counts['fp']} | {counts['tn']} | {counts['fn']} |")
    print()
    for who in ("child", "adult"):
        sub = score([c for c in cases if c.who == who])
        print(f"{who:5s}: {sub.total} pairs, precision {sub.precision:.3f}, recall {sub.recall:.3f}")
    labels = Counter(c.rule for c in cases)
    print(f"labeled rules: {dict(labels.most_common())}")
    if show_misses and s.misses:
        print()
        print("disagreements (scenario | prior | expected -> engine):")
        for c, v in s.misses:
            print(
                f"  {c.scenario} | {c.prior.study_description!r} | relevant {c.relevant} {c.rule} "
                f"in_window {c.in_window} -> relevant {v.relevant} {v.rule} in_window {v.in_window}"
                f" | {v.reasons[1]}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--holdout", action="store_true", help="score tests/lookup/holdout.toml")
    parser.add_argument("--misses", action="store_true", help="list every disagreement")
    args = parser.parse_args()
    path = SCENARIOS.with_name("holdout.toml") if args.holdout else SCENARIOS
    _, cases = load_cases(path)
    report(cases, "holdout set" if args.holdout else "labeled set", args.misses)


if __name__ == "__main__":
    main()
