"""The Grafana dashboards of gvtbench, built as code with Grafana's foundation SDK.

`python -m bench.dashboards` writes them to dashboards/*.json (the files Grafana's provisioning
loads, see docker-compose.yml); `--check` only compares and fails when a file differs from what this
module builds, so a hand edit of the JSON cannot drift from the code.

Every dashboard follows the rules of Grafana's dashboard linter:
- a `datasource` variable (type prometheus) that every panel uses;
- `job`, `instance` and `vgpu` query variables (multi-select, "All" = `.+`, refreshed on a time
  range change), and every selector of every query filters on all three;
- `$__rate_interval` as the range of every rate();
- a title, a description and a unit on every panel, and a fixed uid per dashboard.

Node-level series (links, frames, process_*) have no vgpu label. Their selectors carry
`vgpu=~"$vgpu|"`: Grafana expands `$vgpu` to `.+`, `1` or `(1|2)`, and the empty alternative
matches the missing label, so those series stay whatever vGPU is selected, while the variable is
still part of every query.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import heatmap, statetimeline, timeseries
from grafana_foundation_sdk.builders.common import VizLegendOptions, VizTooltipOptions
from grafana_foundation_sdk.builders.dashboard import (AnnotationQuery, Dashboard, DashboardLink, DatasourceVariable,
                                                        QueryVariable, Row, ThresholdsConfig)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (LegendDisplayMode, LegendPlacement, SortOrder,
                                                  TooltipDisplayMode)
from grafana_foundation_sdk.models.dashboard import (DashboardCursorSync, DashboardLinkType, DataSourceRef,
                                                     Threshold, ThresholdsMode, ValueMap, ValueMappingResult,
                                                     VariableRefresh, VariableSort)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT_DIR = Path(__file__).resolve().parent.parent / "dashboards"
TAG = "gvtbench"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")

# The matchers every selector carries: series of one vGPU, and series of a node (no vgpu label).
VGPU = 'job=~"$job", instance=~"$instance", vgpu=~"$vgpu"'
NODE = 'job=~"$job", instance=~"$instance", vgpu=~"$vgpu|"'

QUANTILES = (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))
GUEST = 'stage="guest"'
FAILSAFE = 'state="failsafe"'


def sel(metric: str, matchers: str = VGPU, extra: str = "") -> str:
    """A selector with the dashboard's filters, plus `extra` matchers such as 'stage="guest"'."""
    return f"{metric}{{{matchers}{', ' + extra if extra else ''}}}"


def rate(metric: str, matchers: str = VGPU, extra: str = "") -> str:
    return f"rate({sel(metric, matchers, extra)}[$__rate_interval])"


def quantile(q: float, histogram: str, by: str, extra: str = "") -> str:
    """histogram_quantile over the buckets' rates, grouped by `by` (le is added)."""
    return f"histogram_quantile({q}, sum by (le, {by}) ({rate(histogram + '_bucket', VGPU, extra)}))"


def events(metric: str, by: str, matchers: str = NODE) -> str:
    """Rate of a counter whose label sets appear only once the event happened (a bad frame, a
    failsafe entry): `or on() vector(0)` gives 0 while none happened instead of no data."""
    return f"sum by ({by}) ({rate(metric, matchers)}) or on() vector(0)"


@dataclass
class Target:
    expr: str
    legend: str
    fmt: PromQueryFormat = PromQueryFormat.TIME_SERIES


@dataclass
class Spec:
    """One panel: what it shows, how it is drawn, and its place (grid width and height)."""
    kind: str                  # timeseries, heatmap, state-timeline
    title: str
    description: str
    unit: str
    targets: list[Target]
    width: int = 12
    height: int = 8
    extra: dict = field(default_factory=dict)


def ts(title: str, description: str, unit: str, targets: list[tuple[str, str]], width: int = 12,
       height: int = 8) -> Spec:
    return Spec("timeseries", title, description, unit, [Target(e, l) for e, l in targets], width, height)


def latency_heatmap(title: str, description: str, histogram: str, extra: str) -> Spec:
    """Cells are observations per second in each bucket; the y axis is the bucket bound (s)."""
    expr = f"sum by (le) ({rate(histogram + '_bucket', VGPU, extra)})"
    return Spec("heatmap", title, description, "ops", [Target(expr, "{{le}}", PromQueryFormat.HEATMAP)],
                24, 9)


def _panel(spec: Spec, panel_id: int) -> Builder:
    if spec.kind == "timeseries":
        p = (timeseries.Panel()
             .legend(VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM)
                     .show_legend(True))
             .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING))
             .fill_opacity(0).line_width(1))
    elif spec.kind == "heatmap":
        # buckets come ready from Prometheus (format heatmap): no calculation in Grafana
        p = (heatmap.Panel().calculate(False)
             .y_axis(heatmap.YAxisConfig().unit("s"))
             .cell_values(heatmap.CellValues().unit(spec.unit))
             .show_tooltip().show_y_histogram().show_legend())
    elif spec.kind == "state-timeline":
        p = (statetimeline.Panel()
             .mappings(spec.extra["mappings"])
             .thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
                         .steps([Threshold(value=None, color="green")]))
             .legend(VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM)
                     .show_legend(False))
             .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.SINGLE).sort(SortOrder.NONE)))
    else:
        raise ValueError(f"panel {spec.title!r}: unknown panel kind {spec.kind!r}")
    p = (p.id(panel_id).title(spec.title).description(spec.description).unit(spec.unit)
         .datasource(DATASOURCE).span(spec.width).height(spec.height))
    for i, t in enumerate(spec.targets):
        q = Dataquery().expr(t.expr).legend_format(t.legend).ref_id(chr(ord("A") + i)).range()
        if t.fmt != PromQueryFormat.TIME_SERIES:
            q = q.format(t.fmt)
        p = p.with_target(q)
    return p


def _variables() -> list[Builder]:
    """datasource, then job, instance and vgpu as the linter wants them (label_values queries on
    the templated datasource, multi-select, All = `.+`, refreshed on a time range change)."""
    def query_var(name: str, label: str, query: str, sort: VariableSort) -> QueryVariable:
        return (QueryVariable(name).label(label).datasource(DATASOURCE).query(query)
                .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(sort)
                .multi(True).include_all(True).all_value(".+"))

    return [
        DatasourceVariable("datasource").label("Data source").type("prometheus"),
        # gvtbench_build_info: one series per gvtbench node, whatever the node does
        query_var("job", "Job", "label_values(gvtbench_build_info, job)", VariableSort.ALPHABETICAL_ASC),
        query_var("instance", "Instance", 'label_values(gvtbench_build_info{job=~"$job"}, instance)',
                  VariableSort.ALPHABETICAL_ASC),
        # every guest, hypervisor and mediator counts traps per vGPU
        query_var("vgpu", "vGPU", 'label_values(gvtbench_traps_total{job=~"$job", instance=~"$instance"}, vgpu)',
                  VariableSort.NUMERICAL_ASC),
    ]


@dataclass
class Board:
    uid: str
    title: str
    description: str
    rows: list[tuple[str, list[Spec]]]


def build(board: Board) -> Dashboard:
    d = (Dashboard(board.title).uid(board.uid).description(board.description).tags([TAG])
         .readonly().time("now-15m", "now").refresh("5s").timezone("browser")
         .tooltip(DashboardCursorSync.CROSSHAIR)
         .link(DashboardLink("gvtbench").type(DashboardLinkType.DASHBOARDS).tags([TAG]).as_dropdown(True)
               .include_vars(True).keep_time(True)))
    for v in _variables():
        d = d.with_variable(v)
    for a in _fault_annotations():
        d = d.annotation(a)
    panel_id = 1
    for title, specs in board.rows:
        d = d.with_row(Row(title).id(panel_id))
        panel_id += 1
        for spec in specs:
            d = d.with_panel(_panel(spec, panel_id))
            panel_id += 1
    return d


# Faults on every dashboard's time axis, from what the nodes saw: a peer that restarted (a kill
# and a new process), a peer that went silent (a pause, a kill, a partition past the liveness
# timeout), and the mediator's restores of a gpu that came back
FAULT_ANNOTATIONS = (
    ("Peer restarted", "red", "sum by (node, link) (increase(gvtbench_link_restarts_total{%s}[1m])) > 0"),
    ("Peer went silent", "orange", "sum by (node, link) (increase(gvtbench_link_deaths_total{%s}[1m])) > 0"),
    ("gpu restored", "purple", "sum by (node) (increase(gvtbench_gpu_restores_total{%s}[1m])) > 0"),
)


def _fault_annotations() -> list[AnnotationQuery]:
    return [AnnotationQuery().name(name).datasource(DATASOURCE).enable(True).icon_color(color)
            .expr(expr % NODE) for name, color, expr in FAULT_ANNOTATIONS]


def traps() -> Board:
    lat = []
    for name, q in QUANTILES:
        lat.append(ts(f"Trap latency {name} by vGPU, kind and stage",
                      f"{name} of trapped accesses (mmio_read, mmio_write, gtt_write) per vGPU, as each stage "
                      "measures it: guest from the intended issue time to completion, hypervisor and mediator "
                      "their own handling, gpu the physical access. From gvtbench_trap_latency_seconds over "
                      "$__rate_interval; gaps are windows without traps of that kind.", "s",
                      [(quantile(q, "gvtbench_trap_latency_seconds", "vgpu, kind, stage"),
                        "vGPU {{vgpu}} {{kind}} @{{stage}}")], width=8, height=9))
    rate_panels = [
        ts("Traps per second by vGPU and kind",
           "Trapped accesses the guests issued (stage guest of gvtbench_traps_total), per vGPU and kind.", "ops",
           [(f"sum by (vgpu, kind) ({rate('gvtbench_traps_total', VGPU, GUEST)})",
             "vGPU {{vgpu}} {{kind}}")]),
        ts("Posted writes by outcome",
           "MMIO writes the hypervisor posted to the mediator, per vGPU and outcome (ok, failed, unknown).",
           "ops", [(f"sum by (vgpu, status) ({rate('gvtbench_posted_writes_total')})", "vGPU {{vgpu}} {{status}}")]),
        ts("Guest load operations by kind and outcome",
           "The guests' load operations (the config's mix: mmio-read, mmio-write, gtt-burst, submit, "
           "ppgtt-churn) per vGPU and outcome.", "ops",
           [(f"sum by (vgpu, mix, status) ({rate('gvtbench_guest_ops_total')})", "vGPU {{vgpu}} {{mix}} {{status}}")],
           width=24),
    ]
    return Board("gvtbench-traps", "gvtbench / traps",
                 "Trapped MMIO and GGTT accesses: latency per vGPU, kind and stage, its distribution, and rates. "
                 "Filters: job, instance, vGPU.",
                 [("Trap latency", lat + [latency_heatmap(
                     "Trap latency distribution (guest)",
                     "Distribution of trap latency as the guests see it, all kinds and the selected vGPUs: each "
                     "cell is traps per second that ended in that latency bucket (1 us .. 1 s, quarter decades).",
                     "gvtbench_trap_latency_seconds", GUEST)]),
                  ("Trap rate", rate_panels)])


def workloads() -> Board:
    lat = [
        ts("Workload latency by engine (guest)",
           "p50, p99 and p99.9 of GPU workloads per engine, from the guest's ELSP submission (intended time) to "
           "retirement, over the selected vGPUs.", "s",
           [(quantile(q, "gvtbench_workload_latency_seconds", "engine", GUEST), f"{name} {{{{engine}}}}")
            for name, q in QUANTILES]),
        ts("Workload latency p99 by vGPU, engine and stage",
           "p99 per vGPU and engine, at the guest (submission to retirement) and at the mediator (workload "
           "creation to completion); the difference is time on the links and in the guest.", "s",
           [(quantile(0.99, "gvtbench_workload_latency_seconds", "vgpu, engine, stage"),
             "vGPU {{vgpu}} {{engine}} @{{stage}}")]),
        latency_heatmap("Workload latency distribution (guest)",
                        "Distribution of workload latency as the guests see it, all engines and the selected "
                        "vGPUs: each cell is workloads per second that retired in that latency bucket.",
                        "gvtbench_workload_latency_seconds", GUEST),
    ]
    thr = [
        ts("Workloads per second by engine and outcome",
           "Workloads the guests retired per second (completed or failed), per engine, over the selected vGPUs.",
           "ops", [(f"sum by (engine, status) ({rate('gvtbench_workloads_total', VGPU, GUEST)})",
                    "{{engine}} {{status}}")]),
        ts("Workloads per second by vGPU",
           "Workloads retired per second per vGPU and engine at the guest, and completed at the mediator.",
           "ops", [(f"sum by (vgpu, engine, stage, status) ({rate('gvtbench_workloads_total')})",
                    "vGPU {{vgpu}} {{engine}} {{status}} @{{stage}}")]),
        ts("Context switches, interrupts and MSIs",
           "Virtual context switches and virtual interrupts the mediator raised, MSIs the hypervisor injected "
           "and merged (one still undelivered), and interrupts the guests took, per vGPU.", "ops",
           [(f"sum by (vgpu) ({rate('gvtbench_context_switches_total')})", "vGPU {{vgpu}} context switches"),
            (f"sum by (vgpu) ({rate('gvtbench_virtual_irqs_total')})", "vGPU {{vgpu}} virtual irqs"),
            (f"sum by (vgpu) ({rate('gvtbench_msi_injected_total')})", "vGPU {{vgpu}} MSIs injected"),
            (f"sum by (vgpu) ({rate('gvtbench_msi_merged_total')})", "vGPU {{vgpu}} MSIs merged"),
            (f"sum by (vgpu) ({rate('gvtbench_guest_irqs_total')})", "vGPU {{vgpu}} guest irqs")], width=24),
    ]
    sched = [
        ts("GPU share against weight share",
           "The time-slice scheduler: each vGPU's share of the time its GPU was owned (what the policy "
           "charges), against its weight over its GPU's vGPUs' weights, the share it aims at when every vGPU "
           "has work. A vGPU with less work than its share owns less.", "percentunit",
           [(f"max by (vgpu) ({sel('gvtbench_gpu_share')})", "vGPU {{vgpu}} GPU share"),
            (f"max by (vgpu) ({sel('gvtbench_weight_share')})", "vGPU {{vgpu}} weight share")]),
        ts("Engine busy time and scheduler latency",
           "Each vGPU's workloads' engine time per second (dispatch to interrupt, all engines), and the p99 "
           "of its workloads' wait from queued to dispatched.", "s",
           [(f"sum by (vgpu) ({rate('gvtbench_gpu_busy_seconds_total')})", "vGPU {{vgpu}} engine s/s"),
            (quantile(0.99, "gvtbench_sched_latency_seconds", "vgpu"), "vGPU {{vgpu}} scheduler p99")]),
    ]
    return Board("gvtbench-workloads", "gvtbench / workloads",
                 "GPU workloads: latency by engine, vGPU and stage, its distribution, throughput, the context "
                 "switches and interrupts they cause, and how the scheduler shares the GPU. Filters: job, "
                 "instance, vGPU.",
                 [("Workload latency", lat), ("Throughput", thr), ("Scheduler", sched)])


def memory() -> Board:
    tr = [
        ts("GGTT entries translated by result",
           "GGTT entries the mediator emulated per vGPU: ok, scratch (bad gfn or failed pin), not_present, "
           "dropped (outside the vGPU's partition).", "ops",
           [(f"sum by (vgpu, result) ({rate('gvtbench_ggtt_entries_translated_total')})", "vGPU {{vgpu}} {{result}}")]),
        ts("PPGTT entries translated by result",
           "Guest page-table entries shadowed per vGPU: ok, invalid (to scratch), huge_2m (shadowed as 2 MiB), "
           "split_2m (2 MiB entries split into a 4 KiB table), split_64k (64 KiB entries split into 16 4 KiB ones).", "ops",
           [(f"sum by (vgpu, result) ({rate('gvtbench_ppgtt_entries_translated_total')})",
             "vGPU {{vgpu}} {{result}}")]),
    ]
    track = [
        ts("Tracked page-table writes",
           "Guest writes to write-protected page tables: faults the hypervisor caught, and writes the mediator "
           "emulated on its shadows, per vGPU. The two should match.", "ops",
           [(f"sum by (vgpu) ({rate('gvtbench_hv_tracked_writes_total')})", "vGPU {{vgpu}} hypervisor"),
            (f"sum by (vgpu) ({rate('gvtbench_ppgtt_tracked_writes_total')})", "vGPU {{vgpu}} mediator")]),
        ts("Shadow, pinned and tracked pages",
           "Pages held per vGPU: shadow page-table pages and pinned guest pages (mediator), write-protected and "
           "pinned pages (hypervisor).", "short",
           [(f"max by (vgpu) ({sel('gvtbench_shadow_pages')})", "vGPU {{vgpu}} shadow pages"),
            (f"max by (vgpu) ({sel('gvtbench_pinned_pages')})", "vGPU {{vgpu}} pinned (mediator)"),
            (f"max by (vgpu) ({sel('gvtbench_hv_tracked_pages')})", "vGPU {{vgpu}} tracked (hypervisor)"),
            (f"max by (vgpu) ({sel('gvtbench_hv_pinned_pages')})", "vGPU {{vgpu}} pinned (hypervisor)")]),
    ]
    pool = [
        ts("Host pool pages per vGPU",
           "Host pool pages each vGPU holds for its shadows (page tables, rings, contexts, batches), against "
           "its quota (mediator.shadow_quota_pages): a vGPU at its quota fails its own work, never another's.",
           "short",
           [(f"max by (vgpu, state) ({sel('gvtbench_pool_pages')})", "vGPU {{vgpu}} {{state}}")]),
        ts("Commands scanned, refusals and PPGTT reclaims",
           "Commands the command parser scanned per vGPU, workloads the mediator refused while creating or "
           "shadowing them (by errno: EBADRQC and EFAULT send the vGPU to failsafe), and PPGTT shadows "
           "reclaimed to stay under the quota; 0 while none happened.", "ops",
           [(f"sum by (vgpu) ({rate('gvtbench_cmd_scanned_total')})", "vGPU {{vgpu}} commands scanned"),
            (events("gvtbench_cmd_refused_total", "vgpu, code", VGPU), "vGPU {{vgpu}} refused {{code}}"),
            (f"sum by (vgpu) ({rate('gvtbench_ppgtt_reclaimed_total')})", "vGPU {{vgpu}} PPGTTs reclaimed")]),
    ]
    return Board("gvtbench-memory", "gvtbench / memory (GGTT/PPGTT)",
                 "Graphics memory translation: GGTT and PPGTT entries by result, tracked page-table writes, the "
                 "pages shadowed, pinned and write-protected, and the host pool and command parser. Filters: "
                 "job, instance, vGPU.",
                 [("Translation", tr), ("Page tracking", track), ("Host pool and command parser", pool)])


def nodes() -> Board:
    state = Spec("state-timeline", "vGPU state",
                 "Each vGPU's state over time, from gvtbench_vgpu_state: active, or failsafe (the mediator "
                 "stopped emulating its GPU work after a guest error).", "none",
                 [Target(f"max by (vgpu) ({sel('gvtbench_vgpu_state', VGPU, FAILSAFE)})",
                         "vGPU {{vgpu}}")], 12, 8,
                 {"mappings": [ValueMap({"0": ValueMappingResult(text="active", color="green", index=0),
                                         "1": ValueMappingResult(text="failsafe", color="red", index=1)})]})
    vgpus = [state, ts(
        "Failsafe entries and resets",
        "Failsafe entries by reason and vGPU resets by kind, per vGPU; 0 while none happened (their series "
        "appear with the first event).", "cps",
        [(events("gvtbench_vgpu_failsafe_entered_total", "vgpu, reason", VGPU), "vGPU {{vgpu}} failsafe {{reason}}"),
         (events("gvtbench_vgpu_resets_total", "vgpu, kind", VGPU), "vGPU {{vgpu}} reset {{kind}}")])]
    node_note = " Node-level series: the vGPU filter does not apply."
    links = [
        ts("Messages per second by link",
           "Messages each node sent (tx) to and received (rx) from each peer, by the peer's node name." + node_note,
           "ops", [(f"sum by (node, link, direction) ({rate('gvtbench_link_messages_total', NODE)})",
                    "{{node}} {{direction}} {{link}}")]),
        ts("Lost messages and send failures",
           "Sequence numbers a peer sent that never arrived, and frames the transport refused to send, per node "
           "and link." + node_note, "cps",
           [(f"sum by (node, link) ({rate('gvtbench_link_lost_messages_total', NODE)})", "{{node}} lost from {{link}}"),
            (f"sum by (node, link) ({rate('gvtbench_link_send_failures_total', NODE)})",
             "{{node}} send failures to {{link}}")]),
        ts("Bad and refused input",
           "Frames a node could not decode (bad frames), messages it refused (permissions, limits) and failed "
           "handshakes, by reason; 0 while none happened." + node_note, "cps",
           [(events("gvtbench_bad_frames_total", "node, reason"), "{{node}} bad frame {{reason}}"),
            (events("gvtbench_refused_messages_total", "node, peer_role, kind, code"),
             "{{node}} refused {{kind}} from {{peer_role}} {{code}}"),
            (events("gvtbench_handshake_failures_total", "node, reason"), "{{node}} handshake {{reason}}")]),
        ts("Dropped frames, handler errors, internal errors and dropped links",
           "Frames a node could not send (peer gone or not reading), requests its handlers answered with an "
           "error, internal errors (a node's own bugs: any fails the verdict), and links it dropped, by code "
           "or reason; 0 while none happened." + node_note, "cps",
           [(events("gvtbench_dropped_frames_total", "node, code"), "{{node}} dropped {{code}}"),
            (events("gvtbench_handler_errors_total", "node, code"), "{{node}} handler error {{code}}"),
            (events("gvtbench_internal_errors_total", "node"), "{{node}} internal errors"),
            (events("gvtbench_links_dropped_total", "node, reason"), "{{node}} link dropped {{reason}}")]),
    ]
    proto = [
        ts("Link protocol: resends, repeats and corrupt frames",
           "Frames the link protocol sent again (not acked in time), frames that arrived again and were "
           "suppressed, and frames the checksum refused, per node and link." + node_note, "cps",
           [(f"sum by (node, link) ({rate('gvtbench_link_retransmits_total', NODE)})", "{{node}} resent to {{link}}"),
            (f"sum by (node, link) ({rate('gvtbench_link_duplicates_total', NODE)})",
             "{{node}} repeats from {{link}}"),
            (f"sum by (node, link) ({rate('gvtbench_link_corrupt_frames_total', NODE)})",
             "{{node}} corrupt from {{link}}")]),
        ts("Link protocol: acks and heartbeats",
           "Frames with no message (acks, heartbeats) per second, per node and link."
           + node_note, "cps",
           [(f"sum by (node, link) ({rate('gvtbench_link_acks_total', NODE)})", "{{node}} acks to {{link}}")]),
        ts("Round-trip time by link", "The link protocol's smoothed round trip (Jacobson/Karels), per node "
           "and link." + node_note, "s",
           [(f"max by (node, link) ({sel('gvtbench_link_rtt_seconds', NODE)})", "{{node}} to {{link}}")]),
        ts("Faults injected by kind",
           "What the run's fault plan did to the frames each node sent, by kind (drop, dup, reorder, corrupt, "
           "delay, partition); 0 without a plan." + node_note, "cps",
           [(f"sum by (node, kind) ({rate('gvtbench_link_faults_injected_total', NODE)})", "{{node}} {{kind}}")]),
        ts("Peers restarted, dead, and messages given up",
           "Times a peer came back with a new epoch (restarted) or went silent past the liveness timeout "
           "(dead), and the messages given up unacked with them, per node and link; 0 while none happened."
           + node_note, "cps",
           [(events("gvtbench_link_restarts_total", "node, link"), "{{node}}: {{link}} restarted"),
            (events("gvtbench_link_deaths_total", "node, link"), "{{node}}: {{link}} dead"),
            (events("gvtbench_link_given_up_total", "node, link"), "{{node}}: given up to {{link}}")]),
    ]
    procs = [
        ts("CPU per node",
           "CPU time each process used per second (1 = one core), by role and node." + node_note, "percentunit",
           [(f"sum by (role, node) ({rate('process_cpu_seconds_total', NODE)})", "{{role}} {{node}}")]),
        ts("Resident memory per node", "Resident set size of each process, by role and node." + node_note,
           "bytes", [(f"max by (role, node) ({sel('process_resident_memory_bytes', NODE)})", "{{role}} {{node}}")]),
        ts("Virtual memory per node",
           "Virtual memory size of each process (guest RAM and the host pool are shared mappings)." + node_note,
           "bytes", [(f"max by (role, node) ({sel('process_virtual_memory_bytes', NODE)})", "{{role}} {{node}}")]),
        ts("Open file descriptors and pending calls",
           "File descriptors each process holds (sockets, shm), and the requests it awaits a reply to."
           + node_note, "short",
           [(f"max by (role, node) ({sel('process_open_fds', NODE)})", "{{node}} open fds"),
            (f"max by (role, node) ({sel('gvtbench_pending_calls', NODE)})", "{{node}} pending calls")]),
    ]
    return Board("gvtbench-nodes", "gvtbench / nodes",
                 "The run's processes: vGPU states, failsafe entries and resets, links and the frames that went "
                 "wrong on them, and CPU, memory and descriptors per process. Filters: job, instance, vGPU "
                 "(the vGPU filter applies to the vGPU row only: node-level series have no vgpu label, and their "
                 'queries match it with vgpu=~"$vgpu|").',
                 [("vGPUs", vgpus), ("Links and frames", links), ("Link protocol and faults", proto),
                  ("Processes", procs)])


BOARDS = {"gvtbench-traps": traps, "gvtbench-workloads": workloads, "gvtbench-memory": memory,
          "gvtbench-nodes": nodes}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard, as written to dashboards/."""
    enc = JSONEncoder(sort_keys=True, indent=2)
    return {f"{uid}.json": enc.encode(build(make()).build()) + "\n" for uid, make in BOARDS.items()}


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render().items():
        (out / name).write_text(text)
        paths.append(out / name)
    return paths


def stale(out: Path) -> list[str]:
    """Names of dashboard files in `out` that are missing or differ from what the code builds."""
    return [name for name, text in render().items()
            if not (out / name).is_file() or (out / name).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dashboards",
                                 description="build gvtbench's Grafana dashboards (JSON) from code")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help=f"folder to write (default: {OUT_DIR.name}/)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs from the code")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale(args.out)
        for name in bad:
            print(f"{args.out / name}: differs from what bench/dashboards.py builds; "
                  f"regenerate with python -m bench.dashboards", file=sys.stderr)
        return 1 if bad else 0
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
