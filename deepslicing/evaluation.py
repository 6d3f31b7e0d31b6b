"""``deepslicing evaluate``: allocation policies against traffic scenarios, with common random numbers.

For every scenario and policy, one :class:`~deepslicing.simulator.SlicingSimulator` runs
``episodes`` cells side by side (one batched env per episode), reset with the same ``seed`` for
every policy of a scenario, so all policies face identical traffic and channels and their
differences are the policies' alone. Each episode lasts ``env.episode_length`` decision intervals.

What is measured, per policy x scenario (shares are fractions of the cell's PRB budget; utility is
the model's per-interval cell utility, at most 1, see :mod:`deepslicing.model`):

| column                 | definition                                                                       |
|------------------------|----------------------------------------------------------------------------------|
| `utility_mean`         | mean over episodes of the episode utility = mean over intervals of the sum of the slices' rewards |
| `utility_ci95`         | half-width of the 95 % normal CI of that mean: 1.96 x sample std / sqrt(episodes); 0 for one episode |
| `utility_pct_oracle`   | 100 x `utility_mean` / the oracle's `utility_mean` on the same scenario (same traffic); 100 for the oracle; empty when `oracle` was not evaluated (or its utility is <= 0) |
| `violation_rate`       | share of (interval, episode, slice) triples whose SLA was violated (cost 1), in [0, 1] |
| `violation_rate_<kind>`| the same over the slices of one kind (`embb`, `urllc`, `mmtc`); empty when no slice has it |
| `resource_usage`       | mean over intervals and episodes of the sum of allocated shares, in [0, 1]      |
| `overprovisioning`     | mean over intervals and episodes of sum over slices of max(0, share - needed share) |
| `capacity_violations`  | number of (interval, episode) pairs whose allocation broke sum <= 1 or share >= 0; a check, must be 0 |

The first column group is ``policy, scenario, episodes``. Scenario ``all`` means the five synthetic
scenarios, plus ``trace`` when ``env.trace_path`` is set. Policies are resolved by
:func:`resolve_policy`: the baselines of :mod:`deepslicing.baselines`, or a MADDPG checkpoint
directory (its deterministic actors for the evaluated cell's slice kinds, see
:func:`policies.maddpg.policy.load_actor_policy`).

The scorecard says whether a trained policy earns its place (the design's rule: it must
beat every comparator an operator would run instead on every scenario, in utility, without more SLA
violations than `proportional`). The comparators are :data:`deepslicing.baselines.COMPARATORS`
(`equal`, `proportional`, `priority`, `static`, `forecast`, `mpc`), those of them evaluated in the
same run; the oracle is the upper bound, never a comparator. A *trained* policy is any policy that
is not a baseline (a checkpoint directory). One scorecard row per trained policy x scenario:

| column                        | definition                                                                |
|-------------------------------|---------------------------------------------------------------------------|
| `policy`, `scenario`          | as in the summary                                                         |
| `utility`                     | the trained policy's `utility_mean`                                       |
| `best_comparator`             | the evaluated comparator with the highest `utility_mean` on the scenario; empty when none was evaluated |
| `best_comparator_utility`     | its `utility_mean`                                                        |
| `margin`                      | `utility` - `best_comparator_utility` (> 0 beats every comparator)        |
| `mpc_utility`                 | `mpc`'s `utility_mean` (the strongest deployable comparator by design); empty when not evaluated |
| `violation_rate`              | the trained policy's overall SLA violation rate                           |
| `proportional_violation_rate` | `proportional`'s violation rate; empty when not evaluated                 |
| `verdict`                     | `pass` when margin > 0 and violation_rate <= proportional_violation_rate; else `fail: utility`, `fail: violations` or `fail: utility, violations`; `incomplete: no comparator` / `incomplete: no proportional` when a check could not be made and none failed |

Outputs, all in ``out``:

- ``summary.csv``: one row per policy x scenario, the columns above in that order;
- ``scorecard.csv``: the scorecard rows, columns in the order above (only the header when no
  trained policy was evaluated);
- ``config.yaml``: the resolved config (``deepslicing evaluate --config out/config.yaml`` repeats the run);
- ``robustness_utility.png``, ``robustness_violations.png``: policies x scenarios heatmaps of the mean
  utility (with its CI) and of the overall SLA violation rate;
- ``timeseries_<scenario>.png``: the first episode of each scenario, one panel per slice (at most
  six): each policy's allocated share per interval and the true needed share (dashed black).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deepslicing.baselines import BASELINES, COMPARATORS, Policy, make_policy
from deepslicing.config import check_int, option, to_dict
from deepslicing.coordinator import capacity_violations
from deepslicing.scenarios import SCENARIOS, SYNTHETIC_SCENARIOS
from deepslicing.simulator import SlicingConfig, SlicingSimulator
from deepslicing.slices import KINDS

KNOWN_POLICIES = BASELINES
COLUMNS = (
    "policy",
    "scenario",
    "episodes",
    "utility_mean",
    "utility_ci95",
    "utility_pct_oracle",
    "violation_rate",
    *(f"violation_rate_{kind}" for kind in KINDS),
    "resource_usage",
    "overprovisioning",
    "capacity_violations",
)
SCORECARD_COLUMNS = (
    "policy",
    "scenario",
    "utility",
    "best_comparator",
    "best_comparator_utility",
    "margin",
    "mpc_utility",
    "violation_rate",
    "proportional_violation_rate",
    "verdict",
)
SUMMARY_FILE = "summary.csv"
SCORECARD_FILE = "scorecard.csv"
CONFIG_FILE = "config.yaml"
UTILITY_HEATMAP = "robustness_utility.png"
VIOLATION_HEATMAP = "robustness_violations.png"


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluate allocation policies over traffic scenarios with common random numbers (every policy
    of a scenario sees the same traffic). Writes OUT/summary.csv (utility mean and 95 % CI, % of the
    oracle's utility, SLA violation rates per slice kind, resource usage, over-provisioning,
    capacity violations), OUT/scorecard.csv (does each checkpoint policy beat every comparator, with
    no more SLA violations than proportional?), robustness heatmaps, allocation-vs-demand time
    series and the resolved config.yaml, and prints the scorecard. Set the cell, slices and
    coordinator with --set env.KEY=VALUE (see --print-config for the keys)."""

    policy: tuple[str, ...] = option(
        BASELINES, f"policies to evaluate, comma-separated: {', '.join(KNOWN_POLICIES)}"
    )
    scenario: tuple[str, ...] = option(
        ("all",),
        "scenarios, comma-separated: all (the synthetic ones, plus trace when env.trace_path is "
        f"set) or any of {', '.join(SCENARIOS)}",
    )
    episodes: int = option(5, "episodes per policy and scenario (run side by side), >= 1")
    seed: int = option(0, "seed of the traffic; the same for every policy of a scenario, >= 0")
    out: str = option("eval_out", "output directory (created if needed)")
    plots: bool = option(True, "write the heatmap and time-series PNGs")
    env: SlicingConfig = dataclasses.field(
        default_factory=SlicingConfig,
        metadata={
            "help": "cell, slices and coordinator (set with --set env.KEY=VALUE); "
            "env.scenario is replaced by each evaluated scenario"
        },
    )

    def __post_init__(self) -> None:
        _check_names("policy", self.policy)
        for name in self.policy:
            check_policy(name)
        _check_names("scenario", self.scenario)
        for name in self.scenario:
            if name != "all" and name not in SCENARIOS:
                raise ValueError(
                    f"scenario: unknown scenario {name!r}; must be 'all' or one of {SCENARIOS}"
                )
        if "all" in self.scenario and len(self.scenario) > 1:
            raise ValueError("scenario: 'all' already names every scenario; give it alone")
        if not isinstance(self.env, SlicingConfig):
            raise ValueError(f"env: must be a SlicingConfig, got {type(self.env).__name__}")
        if "trace" in self.scenario and not self.env.trace_path:
            raise ValueError("scenario: 'trace' needs env.trace_path (a demand CSV)")
        for name, low in (("episodes", 1), ("seed", 0)):
            check_int(name, getattr(self, name), low)
        if not isinstance(self.out, str) or not self.out.strip():
            raise ValueError(f"out: must be a non-empty directory path, got {self.out!r}")
        if not isinstance(self.plots, bool):
            raise ValueError(f"plots: must be true or false, got {self.plots!r}")

    def resolved_scenarios(self) -> tuple[str, ...]:
        if self.scenario == ("all",):
            return SYNTHETIC_SCENARIOS + (("trace",) if self.env.trace_path else ())
        return self.scenario


def _check_names(field: str, names: Any) -> None:
    if isinstance(names, str) or not isinstance(names, tuple | list):
        raise ValueError(f"{field}: must be a list of names, got {names!r}")
    if not names:
        raise ValueError(f"{field}: must name at least one {field}")
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"{field}: names must be strings, got {name!r}")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ValueError(f"{field}: each name may appear once; {repeated} repeat")


def check_policy(name: str) -> None:
    """Raise ValueError naming the field unless ``name`` is a policy :func:`resolve_policy` knows:
    a baseline, or the directory of a MADDPG checkpoint."""
    if name in KNOWN_POLICIES:
        return
    from policies.maddpg.policy import is_checkpoint  # torch and RLlib only when needed

    if not is_checkpoint(name):
        raise ValueError(
            f"policy: unknown policy {name!r}; must be one of {KNOWN_POLICIES} "
            "or the directory of a MADDPG checkpoint"
        )


def resolve_policy(name: str, sim: SlicingSimulator) -> Policy:
    """The policy called ``name`` for the cells of ``sim``: observation -> requested shares."""
    check_policy(name)
    if name in KNOWN_POLICIES:
        return make_policy(name, sim)
    from policies.maddpg.policy import load_actor_policy

    # the actors are shared by kind: one checkpoint drives any slice mix of the kinds it trained
    return load_actor_policy(name, kinds=tuple(sim.slices.kind))


@dataclass(frozen=True)
class PairResult:
    """One policy on one scenario: the summary row and the first episode's time series."""

    row: dict[str, Any]
    slice_names: tuple[str, ...]
    slice_kinds: tuple[str, ...]
    shares: np.ndarray  # (episode_length, num_slices) allocated shares of episode 0
    needed_share: np.ndarray  # (episode_length, num_slices) true needed shares of episode 0


def evaluate_pair(
    env: SlicingConfig, policy_name: str, episodes: int, seed: int, policy: Policy | None = None
) -> PairResult:
    """Run ``episodes`` episodes of one policy in the scenario ``env.scenario``, seeded by ``seed``.
    ``policy``, when given, is the callable to run (``policy_name`` then only labels the row), for
    example an exported ONNX actor from :func:`deepslicing.export.load_exported`."""
    sim = SlicingSimulator(env, num_envs=episodes)
    policy = resolve_policy(policy_name, sim) if policy is None else policy
    observation = sim.reset(seed)
    utility = np.zeros(episodes)
    cost = np.zeros((episodes, sim.num_slices))
    usage = overprovisioning = 0.0
    broken = intervals = 0
    shares, needed = [], []
    done = False
    while not done:
        step = sim.step(policy(observation))
        observation, done = step.observation, step.done
        intervals += 1
        utility += step.reward.sum(axis=-1)
        cost += step.cost
        usage += step.shares.sum(axis=-1).mean()
        overprovisioning += np.maximum(0.0, step.shares - step.needed_share).sum(axis=-1).mean()
        broken += int(capacity_violations(step.shares).sum())
        shares.append(step.shares[0])
        needed.append(step.needed_share[0])
    utility /= intervals
    rate = cost / intervals  # (episodes, num_slices)
    kinds = np.array(sim.slices.kind)
    row: dict[str, Any] = {
        "policy": policy_name,
        "scenario": env.scenario,
        "episodes": episodes,
        "utility_mean": float(utility.mean()),
        "utility_ci95": ci95(utility),
        "utility_pct_oracle": None,  # filled by add_pct_oracle once the oracle's row exists
        "violation_rate": float(rate.mean()),
    }
    for kind in KINDS:
        mask = kinds == kind
        row[f"violation_rate_{kind}"] = float(rate[:, mask].mean()) if mask.any() else None
    row["resource_usage"] = usage / intervals
    row["overprovisioning"] = overprovisioning / intervals
    row["capacity_violations"] = broken
    return PairResult(
        row={c: row[c] for c in COLUMNS},
        slice_names=tuple(s.name for s in sim.specs),
        slice_kinds=sim.slices.kind,
        shares=np.array(shares),
        needed_share=np.array(needed),
    )


def ci95(values: np.ndarray) -> float:
    """Half-width of the normal 95 % confidence interval of the mean; 0 for a single value."""
    n = len(values)
    return 0.0 if n < 2 else float(1.96 * np.std(values, ddof=1) / math.sqrt(n))


def evaluate_pairs(config: EvaluateConfig) -> list[PairResult]:
    """Every policy on every scenario (scenario-major order), with a progress bar on stderr."""
    from tqdm import tqdm

    pairs = [(s, p) for s in config.resolved_scenarios() for p in config.policy]
    results = []
    with tqdm(total=len(pairs), file=sys.stderr, unit="run", desc="evaluate") as bar:
        for scenario, policy_name in pairs:
            bar.set_description(f"{scenario} / {policy_name}")
            env = dataclasses.replace(config.env, scenario=scenario)
            results.append(evaluate_pair(env, policy_name, config.episodes, config.seed))
            bar.update()
    add_pct_oracle([r.row for r in results])
    return results


def add_pct_oracle(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``utility_pct_oracle`` from the oracle's row of its scenario, in place
    (None where the scenario has no oracle row or the oracle's utility is <= 0)."""
    oracle = {r["scenario"]: r["utility_mean"] for r in rows if r["policy"] == "oracle"}
    for r in rows:
        bound = oracle.get(r["scenario"])
        r["utility_pct_oracle"] = (
            100.0 * r["utility_mean"] / bound if bound is not None and bound > 0 else None
        )


def is_trained(policy_name: str) -> bool:
    """A policy the scorecard judges: anything that is not a baseline (a checkpoint directory)."""
    return policy_name not in KNOWN_POLICIES


def scorecard(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row (keys :data:`SCORECARD_COLUMNS`) per trained policy x scenario of the summary rows:
    the trained policy against the best evaluated comparator and `proportional`'s violation rate
    (see the module docstring)."""
    by_pair = {(r["policy"], r["scenario"]): r for r in rows}
    card = []
    for r in rows:
        if not is_trained(r["policy"]):
            continue
        scenario = r["scenario"]
        comparators = [by_pair[c, scenario] for c in COMPARATORS if (c, scenario) in by_pair]
        best = max(comparators, key=lambda c: c["utility_mean"], default=None)
        mpc = by_pair.get(("mpc", scenario))
        proportional = by_pair.get(("proportional", scenario))
        failed, missing = [], []
        if best is None:
            missing.append("comparator")
        elif not r["utility_mean"] > best["utility_mean"]:
            failed.append("utility")
        if proportional is None:
            missing.append("proportional")
        elif not r["violation_rate"] <= proportional["violation_rate"]:
            failed.append("violations")
        if failed:
            verdict = "fail: " + ", ".join(failed)
        elif missing:
            verdict = "incomplete: no " + ", no ".join(missing)
        else:
            verdict = "pass"
        card.append(
            {
                "policy": r["policy"],
                "scenario": scenario,
                "utility": r["utility_mean"],
                "best_comparator": None if best is None else best["policy"],
                "best_comparator_utility": None if best is None else best["utility_mean"],
                "margin": None if best is None else r["utility_mean"] - best["utility_mean"],
                "mpc_utility": None if mpc is None else mpc["utility_mean"],
                "violation_rate": r["violation_rate"],
                "proportional_violation_rate": (
                    None if proportional is None else proportional["violation_rate"]
                ),
                "verdict": verdict,
            }
        )
    return card


def evaluate(config: EvaluateConfig) -> list[dict[str, Any]]:
    """The summary rows (keys :data:`COLUMNS`), one per policy x scenario."""
    return [r.row for r in evaluate_pairs(config)]


def run(config: EvaluateConfig) -> int:
    """Evaluate, write the outputs, print the table and the paths. Exit code 1 on a capacity
    violation (the coordinator must never allow one), else 0."""
    results = evaluate_pairs(config)
    rows = [r.row for r in results]
    out = Path(config.out)
    paths = write_outputs(config, results, out)
    print(format_table(rows))
    print()
    print(format_scorecard(rows, scorecard(rows)))
    print()
    for path in paths:
        print(f"wrote {path}")
    broken = [r for r in rows if r["capacity_violations"]]
    if broken:
        for r in broken:
            print(
                f"error: {r['policy']} on {r['scenario']}: {r['capacity_violations']} "
                "allocations broke the capacity constraint",
                file=sys.stderr,
            )
        return 1
    return 0


def write_outputs(config: EvaluateConfig, results: list[PairResult], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.row for r in results]
    add_pct_oracle(rows)  # again: results may have been put together from several runs
    summary = out / SUMMARY_FILE
    write_summary(rows, summary)
    card = out / SCORECARD_FILE
    write_csv(scorecard(rows), card, SCORECARD_COLUMNS)
    config_path = out / CONFIG_FILE
    config_path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    paths = [summary, card, config_path]
    if config.plots:
        from deepslicing.evaluation_plots import plot_all

        paths += plot_all(results, out)
    return paths


def write_summary(rows: list[dict[str, Any]], path: Path) -> None:
    write_csv(rows, path, COLUMNS)


def write_csv(rows: list[dict[str, Any]], path: Path, columns: tuple[str, ...]) -> None:
    """``columns`` of ``rows`` as CSV with a header; None is written as an empty field."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the summary rows (rates in percent)."""
    header = (
        "policy",
        "scenario",
        "utility (±95% CI)",
        "SLA viol %",
        *(f"{k} %" for k in KINDS),
        "usage",
        "overprov",
        "cap viol",
    )

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    lines = [header]
    for r in rows:
        lines.append(
            (
                r["policy"],
                r["scenario"],
                f"{r['utility_mean']:.4f} ± {r['utility_ci95']:.4f}",
                pct(r["violation_rate"]),
                *(pct(r[f"violation_rate_{k}"]) for k in KINDS),
                f"{r['resource_usage']:.3f}",
                f"{r['overprovisioning']:.3f}",
                str(r["capacity_violations"]),
            )
        )
    return _fixed_width(lines, left=2)


def _fixed_width(lines: list[tuple[str, ...]], left: int) -> str:
    """Columns padded to their widest cell (the first ``left`` left-aligned), a rule under the
    header line."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def format_scorecard(rows: list[dict[str, Any]], card: list[dict[str, Any]]) -> str:
    """What a person reads at the end of a run: per scenario each policy's utility, % of the
    oracle and violation rate; the mean % of the oracle over scenarios per policy; then the
    verdict per trained policy and scenario (``card`` from :func:`scorecard`)."""

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [("scenario", "policy", "utility", "% of oracle", "SLA viol %")]
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        for r in rows:
            if r["scenario"] == scenario:
                lines.append(
                    (
                        scenario,
                        r["policy"],
                        f"{r['utility_mean']:.4f}",
                        num(r["utility_pct_oracle"], ".1f"),
                        f"{100 * r['violation_rate']:.1f}",
                    )
                )
    text = ["Scorecard (utility per interval, at most 1; the oracle is the upper bound)"]
    text.append(_fixed_width(lines, left=2))
    means = []
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pct = [r["utility_pct_oracle"] for r in rows if r["policy"] == policy]
        if pct and all(p is not None for p in pct):
            means.append(f"{policy} {np.mean(pct):.1f}")
    text.append(
        "mean % of oracle over scenarios: " + (", ".join(means) if means else "- (no oracle)")
    )
    if not card:
        text.append("no trained (checkpoint) policy evaluated: no verdicts")
        return "\n".join(text)
    lines = [
        (
            "policy",
            "scenario",
            "utility",
            "best comparator",
            "margin",
            "mpc",
            "SLA viol %",
            "proportional %",
            "verdict",
        )
    ]
    for c in card:
        best = (
            "-"
            if c["best_comparator"] is None
            else f"{c['best_comparator']} {c['best_comparator_utility']:.4f}"
        )
        lines.append(
            (
                c["policy"],
                c["scenario"],
                f"{c['utility']:.4f}",
                best,
                num(c["margin"], "+.4f"),
                num(c["mpc_utility"], ".4f"),
                f"{100 * c['violation_rate']:.1f}",
                num(
                    None
                    if c["proportional_violation_rate"] is None
                    else 100 * c["proportional_violation_rate"],
                    ".1f",
                ),
                c["verdict"],
            )
        )
    text.append("")
    text.append(
        "Verdicts: beats the best comparator in utility, with no more SLA violations than proportional?"
    )
    text.append(_fixed_width(lines, left=2))
    for policy in dict.fromkeys(c["policy"] for c in card):
        verdicts = [c["verdict"] for c in card if c["policy"] == policy]
        passed = sum(v == "pass" for v in verdicts)
        earns = "yes" if passed == len(verdicts) else "no"
        text.append(
            f"{policy}: passes {passed} of {len(verdicts)} scenarios; earns its place: {earns}"
        )
    return "\n".join(text)
