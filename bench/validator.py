"""How often the answer validator refuses a grounded answer or accepts a bad one.

Runs :func:`activities.rag.guardrails.validate_answer` (as ``finalize_answer`` calls it) on
every case of ``bench/validator_set.py``: grounded paraphrases must be accepted; partly
grounded answers, answers with invented facts and answers that follow a prompt injection
must be refused. Reports

- false refusals: grounded answers refused, over all grounded answers;
- false accepts: partial / invented / injected answers accepted, over all of them (and per
  label);
- the validator's time per answer (mean and max, in-process),

and lists every misjudged case with the validator's reason. Goal (issue 15): both rates
at most 5 %. No servers needed.

    .venv/bin/python bench/validator.py [--min-grounding 0.6] [--quiet]

The last line of output is one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# The repository root instead of bench/ on the path: bench/http.py must not shadow the
# standard library's http when this file runs as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activities.rag.guardrails import DEFAULT_MIN_GROUNDING, validate_answer  # noqa: E402
from bench.validator_set import GROUNDED, HELD_OUT, LABELS, cases  # noqa: E402

GOAL = 0.05


def measure(
    min_grounding: float = DEFAULT_MIN_GROUNDING, verbose: bool = True
) -> dict[str, object]:
    """Judge every case; return the figures (and print the misjudged cases when ``verbose``)."""
    all_cases = cases()
    per_label = {label: {"n": 0, "wrong": 0} for label in LABELS}
    times: list[float] = []
    wrong: list[str] = []
    verdicts: list[bool] = []
    for case in all_cases:
        started = time.perf_counter()
        result = validate_answer(
            case.answer, case.source_ids, case.context, min_grounding=min_grounding
        )
        times.append(time.perf_counter() - started)
        verdicts.append(result.ok)
        per_label[case.label]["n"] += 1
        if result.ok != case.should_accept:
            per_label[case.label]["wrong"] += 1
            verdict = "refused" if not result.ok else "accepted"
            wrong.append(
                f"  {case.label:8} {verdict:8} [{case.scenario}] {case.answer!r}"
                + (f"\n{'':20}reason: {result.reason}" if result.reason else "")
            )
    held = {sc.name for sc in HELD_OUT}
    split = {"written_first": [0, 0, 0, 0], "held_out": [0, 0, 0, 0]}  # FR, grounded, FA, bad
    for case, ok in zip(all_cases, verdicts, strict=True):
        row = split["held_out" if case.scenario in held else "written_first"]
        if case.should_accept:
            row[0] += not ok
            row[1] += 1
        else:
            row[2] += ok
            row[3] += 1
    grounded = per_label[GROUNDED]
    bad_n = sum(v["n"] for k, v in per_label.items() if k != GROUNDED)
    bad_wrong = sum(v["wrong"] for k, v in per_label.items() if k != GROUNDED)
    figures: dict[str, object] = {
        "bench": "validator",
        "cases": len(all_cases),
        "min_grounding": min_grounding,
        "false_refusal_rate": round(grounded["wrong"] / grounded["n"], 4),
        "false_refusals": grounded["wrong"],
        "grounded": grounded["n"],
        "false_accept_rate": round(bad_wrong / bad_n, 4),
        "false_accepts": bad_wrong,
        "should_refuse": bad_n,
        "false_accepts_by_label": {
            k: f"{v['wrong']}/{v['n']}" for k, v in per_label.items() if k != GROUNDED
        },
        "by_set": {
            name: {"false_refusals": f"{r[0]}/{r[1]}", "false_accepts": f"{r[2]}/{r[3]}"}
            for name, r in split.items()
        },
        "ms_per_answer_mean": round(1000 * sum(times) / len(times), 3),
        "ms_per_answer_max": round(1000 * max(times), 3),
    }
    figures["goal_met"] = (
        figures["false_refusal_rate"] <= GOAL and figures["false_accept_rate"] <= GOAL  # type: ignore[operator]
    )
    if verbose:
        print(f"{len(all_cases)} labelled answers ({grounded['n']} grounded, {bad_n} to refuse)")
        print(
            f"false refusals: {grounded['wrong']}/{grounded['n']} "
            f"({figures['false_refusal_rate']:.1%})"
        )
        print(f"false accepts:  {bad_wrong}/{bad_n} ({figures['false_accept_rate']:.1%})")
        for label, counts in per_label.items():
            print(f"  {label:8} misjudged {counts['wrong']}/{counts['n']}")
        for name, r in split.items():
            print(f"  {name:13} false refusals {r[0]}/{r[1]}, false accepts {r[2]}/{r[3]}")
        print(
            f"validator time per answer: mean {figures['ms_per_answer_mean']} ms, "
            f"max {figures['ms_per_answer_max']} ms"
        )
        if wrong:
            print("misjudged:")
            print("\n".join(wrong))
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--min-grounding", type=float, default=DEFAULT_MIN_GROUNDING)
    parser.add_argument("--quiet", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    figures = measure(args.min_grounding, verbose=not args.quiet)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
