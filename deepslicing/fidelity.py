"""``deepslicing fidelity``: the fast model's predictions against ns-3 packets, per slice kind.

Every policy of every scenario runs once on each backend with the same seed, so both see the same
traffic; the ns-3 backend's observations equal the fast backend's (only costs come from packets),
so both get the same requests and the same allocations (checked every interval). Per slice and
interval the fast model predicts (:func:`deepslicing.model.qos`, :func:`deepslicing.model.sla_cost`)
and ns-3 measures (:mod:`ns3_gym.simulator`):

| column (per scenario, policy, slice kind) | meaning                                                   |
|-------------------------------------------|-----------------------------------------------------------|
| `throughput_error_pct`                    | mean of abs(measured - predicted) / predicted throughput (%) |
| `p95_delay_ratio`                         | median measured / predicted p95 delay (intervals where both are finite) |
| `loss_pct`                                | mean measured loss (%)                                    |
| `sla_agreement_pct`                       | slice-intervals where both backends give the same SLA verdict (%) |
| `met_fast_pct`, `met_ns3_pct`             | slice-intervals whose SLA holds, per backend (%)          |
| `sla_agreement_calibrated_pct`            | agreement with the fast verdict calibrated for the backlog an interval inherits (:func:`calibrate`) |

Outputs in ``--out`` (default ``fidelity_out``): ``fidelity.csv`` (the table above),
``intervals.csv`` (every slice-interval: predicted and measured KPIs and verdicts), and
``fidelity_<scenario>.png`` (predicted vs measured throughput and p95 delay, one colour per kind).
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepslicing.config import check_int, option
from deepslicing.evaluation import check_policy, resolve_policy
from deepslicing.scenarios import SCENARIOS, SYNTHETIC_SCENARIOS
from deepslicing.simulator import SlicingConfig, SlicingSimulator
from deepslicing.slices import BASE_DELAY_MS, KINDS

SUMMARY_COLUMNS = (
    "scenario",
    "policy",
    "kind",
    "slice_intervals",
    "throughput_error_pct",
    "p95_delay_ratio",
    "loss_pct",
    "sla_agreement_pct",
    "met_fast_pct",
    "met_ns3_pct",
    "sla_agreement_calibrated_pct",
)
INTERVAL_COLUMNS = (
    "scenario",
    "policy",
    "episode",
    "interval",
    "slice",
    "kind",
    "share",
    "needed_share",
    "throughput_fast_mbps",
    "throughput_ns3_mbps",
    "p95_fast_ms",
    "p95_ns3_ms",
    "loss_ns3_pct",
    "served_fast",
    "served_ns3",
    "met_fast",
    "met_ns3",
    "backlog_bits",
    "met_calibrated",
)


@dataclass(frozen=True)
class FidelityConfig:
    """Run the same policies on the same traffic on the fast model and on ns-3 packets; write
    per-kind throughput error, p95-delay ratio, loss and SLA-verdict agreement (OUT/fidelity.csv),
    every slice-interval (OUT/intervals.csv) and predicted-vs-measured plots."""

    policy: tuple[str, ...] = option(
        ("proportional",), "policies, comma-separated: baselines or MADDPG checkpoint directories"
    )
    scenario: tuple[str, ...] = option(
        ("steady",), f"scenarios, comma-separated: all (the synthetic ones) or any of {SCENARIOS}"
    )
    episodes: int = option(1, "episodes per policy and scenario (cells run side by side), >= 1")
    seed: int = option(0, "seed of the traffic and the packets, >= 0")
    out: str = option("fidelity_out", "output directory (created if needed)")
    plots: bool = option(True, "write the predicted-vs-measured PNGs")
    env: SlicingConfig = dataclasses.field(
        default_factory=lambda: SlicingConfig(episode_length=100),
        metadata={
            "help": "cell and slices (set with --set env.KEY=VALUE); env.scenario and env.backend "
            "are set by the command; episodes are 100 intervals unless env.episode_length says"
        },
    )

    def __post_init__(self) -> None:
        for name in self.policy:
            check_policy(name)
        if not self.policy:
            raise ValueError("policy: name at least one policy")
        for name in self.scenario:
            if name != "all" and name not in SCENARIOS:
                raise ValueError(f"scenario: unknown {name!r}; must be 'all' or one of {SCENARIOS}")
        if "all" in self.scenario and len(self.scenario) > 1:
            raise ValueError("scenario: 'all' already names every scenario; give it alone")
        for name, low in (("episodes", 1), ("seed", 0)):
            check_int(name, getattr(self, name), low)

    def resolved_scenarios(self) -> tuple[str, ...]:
        return SYNTHETIC_SCENARIOS if self.scenario == ("all",) else self.scenario


def compare_pair(config: FidelityConfig, scenario: str, policy_name: str) -> list[dict[str, Any]]:
    """One policy on one scenario on both backends: one row per slice-interval."""
    env = dataclasses.replace(config.env, scenario=scenario)
    fast = SlicingSimulator(dataclasses.replace(env, backend="fast"), num_envs=config.episodes)
    ns3 = SlicingSimulator(dataclasses.replace(env, backend="ns3"), num_envs=config.episodes)
    policy = resolve_policy(policy_name, ns3)
    obs_fast, obs_ns3 = fast.reset(config.seed), ns3.reset(config.seed)
    np.testing.assert_array_equal(obs_fast, obs_ns3)
    names = [s.name for s in ns3.specs]
    rows: list[dict[str, Any]] = []
    done = False
    try:
        while not done:
            requests = policy(obs_ns3)
            a, b = fast.step(requests), ns3.step(requests)
            np.testing.assert_array_equal(a.shares, b.shares)
            predicted, measured = fast.kpis(), ns3.kpis()
            for e in range(config.episodes):
                for i, name in enumerate(names):
                    rows.append(
                        {
                            "scenario": scenario,
                            "policy": policy_name,
                            "episode": e,
                            "interval": ns3.t,
                            "slice": name,
                            "kind": ns3.slices.kind[i],
                            "share": b.shares[e, i],
                            "needed_share": b.needed_share[e, i],
                            "throughput_fast_mbps": predicted["throughput_mbps"][e, i],
                            "throughput_ns3_mbps": measured["throughput_mbps"][e, i],
                            "p95_fast_ms": predicted["delay_p95_ms"][e, i],
                            "p95_ns3_ms": measured["delay_p95_ms"][e, i],
                            "loss_ns3_pct": measured["loss_pct"][e, i],
                            "served_fast": predicted["served_fraction"][e, i],
                            "served_ns3": measured["served_fraction"][e, i],
                            "met_fast": int(a.cost[e, i] == 0),
                            "met_ns3": int(b.cost[e, i] == 0),
                            "offered_fast_mbps": predicted["offered_mbps"][e, i],
                            "capacity_fast_mbps": predicted["capacity_mbps"][e, i],
                            "packet_bits": ns3.slices.packet_bits[i],
                            "latency_ms_p95": ns3.slices.latency_ms_p95[i],
                        }
                    )
            obs_ns3, done = b.observation, b.done
    finally:
        ns3.close()
    calibrate(rows, config.env.interval_s)
    return rows


def calibrate(rows: list[dict[str, Any]], interval_s: float) -> None:
    """Add the calibrated fast verdict to ``rows`` (one policy on one scenario), in place.

    The fast model scores every interval as if its queue started empty. On packets a slice's
    backlog carries over: a fluid queue ``B_t = clip(B_{t-1} + (offered - capacity) x interval, 0,
    QUEUE_PACKETS x packet bits)`` (the fast model's own offered load and capacity) is waiting when
    interval t starts. With a p95 latency target L, the packets that wait longer than L are the
    backlog packets that waited beyond L (all of them when ``B / capacity > L``) plus those arriving
    while it drains faster than L would allow, ``lambda x (B - L x C) / (C - lambda)``; when they
    are more than 5 % of the interval's packets the calibrated verdict is "violated" (``met_calibrated``
    otherwise equals the fast verdict).
    """
    from ns3_gym.engine import QUEUE_PACKETS

    backlog: dict[tuple, float] = {}
    for r in rows:
        key = (r["episode"], r["slice"])
        b = backlog.get(key, 0.0)
        r["backlog_bits"] = b
        met = r["met_fast"]
        target = r["latency_ms_p95"]
        capacity = r["capacity_fast_mbps"] * 1e6  # bit/s
        offered = r["offered_fast_mbps"] * 1e6
        if met and b > r["packet_bits"] and np.isfinite(target) and capacity > 0:
            wait_s = b / capacity
            late_s = (target - BASE_DELAY_MS) / 1000.0
            backlog_packets = b / r["packet_bits"] if wait_s > late_s else 0.0
            rate = offered / r["packet_bits"]  # packets/s
            drain = capacity - offered
            arriving_late = (
                rate * max(0.0, (b - late_s * capacity) / drain) if drain > 0 else np.inf
            )
            late = backlog_packets + min(arriving_late, rate * interval_s)
            if late > 0.05 * (rate * interval_s + b / r["packet_bits"]):
                met = 0
        r["met_calibrated"] = met
        limit = QUEUE_PACKETS * r["packet_bits"]
        backlog[key] = min(limit, max(0.0, b + (offered - capacity) * interval_s))


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per (scenario, policy, kind) table of the module docstring."""
    out = []
    keys = sorted({(r["scenario"], r["policy"]) for r in rows}, key=str)
    for scenario, policy in keys:
        for kind in KINDS:
            sel = [
                r
                for r in rows
                if r["scenario"] == scenario and r["policy"] == policy and r["kind"] == kind
            ]
            if not sel:
                continue

            def col(name, sel=sel):
                return np.array([r[name] for r in sel], dtype=np.float64)

            tp_fast, tp_ns3 = col("throughput_fast_mbps"), col("throughput_ns3_mbps")
            p_fast, p_ns3 = col("p95_fast_ms"), col("p95_ns3_ms")
            ok = tp_fast > 0
            finite = np.isfinite(p_fast) & np.isfinite(p_ns3)
            met_fast, met_ns3 = col("met_fast"), col("met_ns3")
            met_calibrated = col("met_calibrated")
            out.append(
                {
                    "scenario": scenario,
                    "policy": policy,
                    "kind": kind,
                    "slice_intervals": len(sel),
                    "throughput_error_pct": float(
                        100 * np.mean(np.abs(tp_ns3[ok] - tp_fast[ok]) / tp_fast[ok])
                    ),
                    "p95_delay_ratio": (
                        float(np.median(p_ns3[finite] / p_fast[finite])) if finite.any() else None
                    ),
                    "loss_pct": float(np.mean(col("loss_ns3_pct"))),
                    "sla_agreement_pct": float(100 * np.mean(met_fast == met_ns3)),
                    "met_fast_pct": float(100 * met_fast.mean()),
                    "met_ns3_pct": float(100 * met_ns3.mean()),
                    "sla_agreement_calibrated_pct": float(100 * np.mean(met_calibrated == met_ns3)),
                }
            )
    return out


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r[c] for c in columns})


def plot(rows: list[dict[str, Any]], scenario: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for kind, colour in zip(KINDS, ("tab:blue", "tab:red", "tab:green"), strict=True):
        sel = [r for r in rows if r["scenario"] == scenario and r["kind"] == kind]
        if not sel:
            continue
        x = np.array([r["throughput_fast_mbps"] for r in sel], dtype=float)
        y = np.array([r["throughput_ns3_mbps"] for r in sel], dtype=float)
        axes[0].scatter(x, y, s=8, alpha=0.5, color=colour, label=kind)
        px = np.array([r["p95_fast_ms"] for r in sel], dtype=float)
        py = np.array([r["p95_ns3_ms"] for r in sel], dtype=float)
        keep = np.isfinite(px) & np.isfinite(py)
        axes[1].scatter(px[keep], py[keep], s=8, alpha=0.5, color=colour, label=kind)
    for ax, title, unit in ((axes[0], "throughput", "Mbps"), (axes[1], "p95 delay", "ms")):
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
        ax.set_xlabel(f"fast model ({unit})")
        ax.set_ylabel(f"ns-3 packets ({unit})")
        ax.set_title(f"{scenario}: {title}")
        ax.legend()
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(summary: list[dict[str, Any]]) -> str:
    head = f"{'scenario':<12} {'policy':<28} {'kind':<6} {'tput err %':>10} {'p95 ratio':>9} "
    head += f"{'loss %':>7} {'agree %':>8} {'met fast %':>10} {'met ns3 %':>9} {'agree cal %':>11}"
    lines = [head, "-" * len(head)]
    for r in summary:
        ratio = "-" if r["p95_delay_ratio"] is None else f"{r['p95_delay_ratio']:.2f}"
        lines.append(
            f"{r['scenario']:<12} {r['policy'][-28:]:<28} {r['kind']:<6} "
            f"{r['throughput_error_pct']:>10.2f} {ratio:>9} {r['loss_pct']:>7.2f} "
            f"{r['sla_agreement_pct']:>8.1f} {r['met_fast_pct']:>10.1f} {r['met_ns3_pct']:>9.1f} "
            f"{r['sla_agreement_calibrated_pct']:>11.1f}"
        )
    return "\n".join(lines)


def run(config: FidelityConfig) -> int:
    from ns3_gym.engine import require_ns3

    require_ns3()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for scenario in config.resolved_scenarios():
        for policy in config.policy:
            print(f"fidelity: {scenario} / {policy}", file=sys.stderr, flush=True)
            rows.extend(compare_pair(config, scenario, policy))
        if config.plots:
            plot(rows, scenario, out / f"fidelity_{scenario}.png")
    summary = summarize(rows)
    write_csv(out / "intervals.csv", INTERVAL_COLUMNS, rows)
    write_csv(out / "fidelity.csv", SUMMARY_COLUMNS, summary)
    print(format_table(summary))
    print(f"wrote {out / 'fidelity.csv'} and {out / 'intervals.csv'}")
    return 0


if __name__ == "__main__":
    from deepslicing.cli import main

    raise SystemExit(main(["fidelity", *sys.argv[1:]]))
