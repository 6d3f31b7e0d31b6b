"""``deepslicing dashboard``: the Grafana dashboard of the allocation service and its training,
generated from code with Grafana's own builder library (``grafana-foundation-sdk``).

The panels read the recording rules of ``cluster/prometheus/rules/deepslicing-recording.yml``
(load them into the Prometheus Grafana reads) and, for saturation and training, Ray's own series.
Two variables: ``datasource`` (a Prometheus data source) and ``application`` (the Serve
applications running deepslicing; several, or All).

| row        | panels                                                                          |
|------------|---------------------------------------------------------------------------------|
| Traffic    | requests/s by endpoint and status; slice allocations answered/s                 |
| Errors     | server-error ratio by endpoint; each status's share; rejections/s by reason     |
| Latency    | p50/p95/p99 inside the replica by endpoint (ms); guardrail ADMM residual p99    |
| Saturation | healthy, target and maximum replicas; replica and node CPU (%); requests in flight |
| Slices     | share vs need; SLA risk; predicted throughput vs target (Mbps) and its deviation |
| Model      | served model version and its age (days)                                         |
| Training   | iterations/s, env steps/s, utility, SLA violation rate, Lagrange multipliers    |

Every query's legend names the labels its series carry (``{{slice}}``); the live test
(``tests/test_observability.py``) runs every query against a real Prometheus scraping a real
service and training run, and checks each series has those labels. ``docs/observability.md``
lists every query with a value from that test. The JSON is committed as
``cluster/grafana/deepslicing.json``; a test checks it equals what this command writes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deepslicing import metrics
from deepslicing.config import option

UID = "deepslicing"
DEFAULT_OUT = "cluster/grafana/deepslicing.json"
PANEL_HEIGHT = 8
GRID_WIDTH = 24  # Grafana's grid columns
APP = '{application=~"$application"}'  # the application variable, as a selector
LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass(frozen=True)
class Query:
    """One PromQL query of a panel; ``legend`` is Grafana's legend format, and the labels it names
    (``{{slice}}``) are the labels every series of the query carries."""

    expr: str
    legend: str

    def labels(self) -> set[str]:
        return set(LEGEND_LABEL.findall(self.legend))


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str  # a Grafana unit id: reqps, percentunit, ms, percent, short, d, ...
    queries: tuple[Query, ...]
    kind: Literal["timeseries", "stat"] = "timeseries"


def _ray(name: str) -> str:
    """A Ray-exported series name: Ray prefixes ``ray_``, counters also end in ``_total``."""
    return f"ray_{name}"


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    (
        "Traffic",
        (
            Panel(
                "Requests by endpoint and status",
                "HTTP requests per second answered by the replicas, by endpoint and status code.",
                "reqps",
                (
                    Query(
                        f"application_endpoint_status:deepslicing_requests:rate5m{APP}",
                        "{{endpoint}} {{status}}",
                    ),
                ),
            ),
            Panel(
                "Slice allocations answered",
                "Slice allocations per second (a request of 3 slices counts 3).",
                "short",
                (
                    Query(
                        f"application:deepslicing_slice_allocations:rate5m{APP}", "{{application}}"
                    ),
                ),
            ),
        ),
    ),
    (
        "Errors",
        (
            Panel(
                "Server error ratio by endpoint",
                "5xx answers per request, by endpoint (alert DeepslicingErrorRatioHigh at 5 %).",
                "percentunit",
                (
                    Query(
                        f"application_endpoint:deepslicing_request_errors:ratio_rate5m{APP}",
                        "{{endpoint}}",
                    ),
                ),
            ),
            Panel(
                "Status share by endpoint",
                "Each status code's share of an endpoint's requests (4xx: the client's mistakes).",
                "percentunit",
                (
                    Query(
                        f"application_endpoint_status:deepslicing_requests:ratio_rate5m{APP}",
                        "{{endpoint}} {{status}}",
                    ),
                ),
            ),
            Panel(
                "Rejections by reason",
                "Requests refused per second: unauthorized, rate_limited, invalid, too_large, "
                "infeasible.",
                "reqps",
                (Query(f"application_reason:deepslicing_rejections:rate5m{APP}", "{{reason}}"),),
            ),
        ),
    ),
    (
        "Latency",
        (
            Panel(
                "Latency inside the replica (answered requests)",
                "p50, p95 and p99 of 2xx requests in milliseconds, by endpoint (alert "
                "DeepslicingAllocationLatencyHigh: /allocate p95 over 10 ms for 5 m).",
                "ms",
                (
                    Query(
                        f"application_endpoint:deepslicing_request_latency_ms:quantile_rate5m{APP}",
                        "{{endpoint}} q{{quantile}}",
                    ),
                ),
            ),
            Panel(
                "Guardrail ADMM primal residual, p99",
                "The worst cell's primal residual ||x - z|| per request (0 with the exact "
                "projection; small with ADMM).",
                "sci",
                (
                    Query(
                        "histogram_quantile(0.99, sum by (application, le) (rate("
                        f"{_ray(metrics.SERVE_ADMM_RESIDUAL)}_bucket{APP}[$__rate_interval])))",
                        "{{application}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Saturation",
        (
            Panel(
                "Replicas: healthy, autoscaler target, maximum",
                "Healthy replicas against the autoscaler's target and max_replicas (alert "
                "DeepslicingReplicasAtMax when healthy = max for 15 m).",
                "short",
                (
                    Query(
                        f"application_deployment:deepslicing_replicas:healthy{APP}",
                        "healthy {{deployment}}",
                    ),
                    Query(
                        "max by (application, deployment) (ray_serve_autoscaling_target_replicas"
                        f"{APP} and on (application, deployment) "
                        f"{_ray(metrics.SERVE_MAX_REPLICAS)})",
                        "target {{deployment}}",
                    ),
                    Query(
                        f"application_deployment:deepslicing_replicas:max{APP}",
                        "max {{deployment}}",
                    ),
                ),
            ),
            Panel(
                "Replica CPU",
                "CPU of each node's replica processes, percent of one core.",
                "percent",
                (
                    Query(
                        "sum by (ip, Component) (ray_component_cpu_percentage"
                        '{Component=~"ray::ServeReplica:($application):.*"})',
                        "{{ip}} {{Component}}",
                    ),
                ),
            ),
            Panel(
                "Node CPU",
                "CPU utilisation of each Ray node, percent of all its cores.",
                "percent",
                (Query("ray_node_cpu_utilization", "{{ip}}"),),
            ),
            Panel(
                "Requests in flight at the replicas",
                "Requests the routers have sent and not yet had answered (the autoscaler's "
                "input; compare with target_ongoing_requests x replicas).",
                "short",
                (
                    Query(
                        "sum by (application, deployment) "
                        f"(ray_serve_num_ongoing_requests_at_replicas{APP} "
                        f"and on (application, deployment) {_ray(metrics.SERVE_MAX_REPLICAS)})",
                        "{{deployment}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Slices",
        (
            Panel(
                "Share vs need by slice",
                "The last share given and the last share needed per slice (fractions of the "
                "cell's PRBs).",
                "percentunit",
                (
                    Query(
                        f"application_slice:deepslicing_allocation_share:avg{APP}",
                        "share {{slice}}",
                    ),
                    Query(f"application_slice:deepslicing_slice_need:avg{APP}", "need {{slice}}"),
                ),
            ),
            Panel(
                "SLA risk by slice",
                "1 - min(1, share / need), the worst replica's last value (alert "
                "DeepslicingSliceSlaRiskHigh above 0.2 for 15 m).",
                "percentunit",
                (Query(f"application_slice:deepslicing_sla_risk:max{APP}", "{{slice}}"),),
            ),
            Panel(
                "Predicted throughput vs target",
                "Slices with a bandwidth target whose requests carry readings: predicted "
                "throughput and min(demand, target), in Mbps.",
                "Mbits",
                (
                    Query(
                        f"sum by (application, slice) ({_ray(metrics.SERVE_THROUGHPUT_MBPS)}{APP})",
                        "predicted {{slice}}",
                    ),
                    Query(
                        f"sum by (application, slice) ({_ray(metrics.SERVE_TARGET_MBPS)}{APP})",
                        "target {{slice}}",
                    ),
                ),
            ),
            Panel(
                "Throughput deviation from target",
                "(predicted - target) / target per slice (alert DeepslicingThroughputOffTarget "
                "beyond 10 % for 10 m).",
                "percentunit",
                (
                    Query(
                        f"application_slice:deepslicing_throughput_deviation:ratio{APP}",
                        "{{slice}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Model",
        (
            Panel(
                "Served model version and age",
                "Days since each served model version was exported (alert DeepslicingModelStale "
                "over 30 days).",
                "d",
                (
                    Query(
                        f"application_model_version:deepslicing_model_age:days{APP}",
                        "{{application}} {{model_version}}",
                    ),
                ),
                kind="stat",
            ),
        ),
    ),
    (
        "Training",
        (
            Panel(
                "Training iterations per second",
                "Per run: a `deepslicing train` run directory or a Tune trial.",
                "short",
                (Query("run:deepslicing_train_iterations:rate5m", "{{run}}"),),
            ),
            Panel(
                "Env steps per second",
                "Env steps (one cell, one interval) per second, sampling and learning together.",
                "short",
                (Query(f"max by (run) ({_ray(metrics.TRAIN_ENV_STEPS_PER_S)})", "{{run}}"),),
            ),
            Panel(
                "Utility",
                "Mean per-interval cell utility over recent episodes (at most 1).",
                "short",
                (Query(f"max by (run) ({_ray(metrics.TRAIN_UTILITY)})", "{{run}}"),),
            ),
            Panel(
                "SLA violation rate",
                "Share of recent (interval, slice) pairs in SLA violation.",
                "percentunit",
                (Query(f"max by (run) ({_ray(metrics.TRAIN_SLA_VIOLATION_RATE)})", "{{run}}"),),
            ),
            Panel(
                "Lagrange multipliers",
                "Each slice's SLA multiplier after the iteration's dual update (utility per "
                "unit of cost).",
                "short",
                (
                    Query(
                        f"max by (run, slice) ({_ray(metrics.TRAIN_MULTIPLIER)})",
                        "{{run}} {{slice}}",
                    ),
                ),
            ),
        ),
    ),
)


def queries() -> list[tuple[str, str, Query]]:
    """Every query of the dashboard as (row, panel title, query), in dashboard order."""
    return [(row, p.title, q) for row, panels in ROWS for p in panels for q in p.queries]


def build() -> dict:
    """The dashboard as Grafana's JSON model (a dict)."""
    from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    source = DataSourceRef(type_val="prometheus", uid="${datasource}")
    board = (
        dashboard.Dashboard("deepslicing: allocation service and training")
        .uid(UID)
        .description(
            "Traffic, errors, latency and saturation of the deepslicing allocation service, "
            "per-slice allocation against need, the served model, and training progress. "
            "Generated by `deepslicing dashboard`; needs cluster/prometheus/rules loaded."
        )
        .tags(["deepslicing", "ray", "5g"])
        .refresh("30s")
        .time("now-1h", "now")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            dashboard.QueryVariable("application")
            .label("Application")
            .datasource(source)
            .query(f"label_values({_ray(metrics.SERVE_REQUESTS)}_total, application)")
            .include_all(True)
            .all_value(".*")
            .multi(True)
        )
    )
    panel_id = 0
    for row, panels in ROWS:
        panel_id += 1
        board = board.with_row(dashboard.Row(row).id(panel_id))
        width = max(GRID_WIDTH // len(panels), GRID_WIDTH // 4)
        for p in panels:
            panel_id += 1
            builder = stat.Panel() if p.kind == "stat" else timeseries.Panel()
            builder = (
                builder.id(panel_id)
                .title(p.title)
                .description(p.description)
                .unit(p.unit)
                .datasource(source)
                .span(width)
                .height(PANEL_HEIGHT)
            )
            for i, q in enumerate(p.queries):
                target = prometheus.Dataquery().expr(q.expr).legend_format(q.legend)
                builder = builder.with_target(target.ref_id(chr(ord("A") + i)))
            board = board.with_panel(builder)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render() -> str:
    """The dashboard's JSON text, as committed (sorted keys, two-space indent, final newline)."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class DashboardConfig:
    """Write the Grafana dashboard of the allocation service and training (JSON, import it in
    Grafana next to a Prometheus loaded with cluster/prometheus/rules)."""

    out: str = option(DEFAULT_OUT, "the dashboard JSON file to write")


def run(config: DashboardConfig) -> int:
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    print(f"wrote {out} ({sum(len(p) for _, p in ROWS)} panels, {len(queries())} queries)")
    return 0
