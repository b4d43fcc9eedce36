"""The benchmark report: one versioned JSON document, a Markdown table and a latency/throughput plot.

Schema (version 1, checked by the pydantic models of benchmarks.schema), documented field by field in
docs/benchmarks.md:

    schema_version, created, device{}, host{}, versions{}, model{}, settings{},
    backends[] {name, precision, device, batch_size, p50_ms, p90_ms, p99_ms, mean_ms, images_per_s,
                includes_transfer, timer, calls, notes},
    stages[]   {input_size, stage, p50_ms, p90_ms, p99_ms, detail},
    http[]     {mode, concurrency, rate, arrivals, duration_s, requests, ok, errors{}, p50_ms, p95_ms,
                p99_ms, mean_ms, max_ms, throughput_rps, mean_batch_size, batches, max_send_lag_ms, ...},
    derived{}  {http_c32_over_c1, server_overhead_ms, server_backend, ...},
    notes[],
    training_speed{} {device, rows[] {stage, device, precision, image_size, crop, batch_size, median_s,
                      p90_s, steps_per_s, images_per_s, steps, warmup, notes}, notes[]}
                     (optional: reports written before it existed lack it; rows [] when skipped)
    server_overhead{} {what, client, server_workers, max_batch_size, max_batch_delay_ms, duration_s,
                       warmup_s, rows[] {target, image, heatmap, concurrency, requests, errors{}, p50_ms,
                       p99_ms, mean_ms, throughput_rps, stages_p50_ms{}, live_ratio}, targets[]}
                     (optional: absent when not run; see benchmarks.server_overhead)
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.schema import SCHEMA_VERSION, report_problems
from benchmarks.tables import markdown_table


def validate_report(report: Any) -> list[str]:
    """Every way `report` departs from schema version 1 ([] when it conforms): benchmarks.schema."""
    return report_problems(report)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def derive(
    backends: Sequence[dict[str, Any]],
    http: Sequence[dict[str, Any]],
    server_backend: str | None,
    reference_b1_ms: float | None = None,
) -> dict:
    """Headline numbers: batching gain over HTTP (c32 / c1 throughput) and the server's own overhead.

    `server_overhead_ms` = HTTP p50 at concurrency 1 minus the server's backend p50 at batch 1 (copies
    included): `reference_b1_ms` when given (that backend re-timed just before the HTTP runs, so a machine
    whose speed drifts compares like with like), else its row in `backends`. A negative difference (a
    slow model on a drifting CPU: the two timings differ by more than the server's cost) is reported as
    None with `server_overhead_note` saying why.
    `server_overhead_same_requests_ms` = HTTP p50 at concurrency 1 minus the inference time the server
    itself reported in those same answers (immune to drift).
    """
    closed = {row["concurrency"]: row for row in http if row["mode"] == "closed"}
    c1, c32 = closed.get(1), closed.get(32)
    baseline, baseline_source = reference_b1_ms, "re-timed just before the HTTP runs"
    if baseline is None and server_backend is not None:
        same = [
            row
            for row in backends
            if row["name"] == server_backend
            and row["batch_size"] == 1
            and row["includes_transfer"] is not False
        ]
        baseline, baseline_source = (same[0]["p50_ms"], "backends table") if same else (None, None)
    overhead, overhead_note = None, None
    if c1 is not None and c1.get("p50_ms") is not None and baseline is not None:
        overhead = c1["p50_ms"] - baseline
        if overhead < 0:  # two separate measurements: the backend's own drift exceeded the server's cost
            overhead_note = (
                f"not meaningful here: HTTP p50 at c1 ({c1['p50_ms']:.2f} ms) came out below the backend "
                f"timed separately ({baseline:.2f} ms), i.e. the machine's speed moved by more than the "
                "server's own cost between the two; use the same-requests figure"
            )
            overhead = None
    best: dict[str, float] = {}
    for row in backends:
        label = backend_label(row)
        best[label] = max(best.get(label, 0.0), row["images_per_s"])
    measured = None
    if c1 is not None and c1.get("p50_ms") is not None and "inference" in (c1.get("server_p50_ms") or {}):
        measured = c1["p50_ms"] - c1["server_p50_ms"]["inference"]
    return {
        "http_c32_over_c1": _ratio(c32 and c32["throughput_rps"], c1 and c1["throughput_rps"]),
        "server_overhead_ms": overhead,
        "server_overhead_note": overhead_note,
        "server_overhead_same_requests_ms": measured,
        "backend_b1_p50_ms": baseline,
        "backend_b1_source": baseline_source,
        "server_backend": server_backend,
        "best_images_per_s": best,
        "http_best_throughput_rps": max((row["throughput_rps"] for row in http), default=None),
    }


def build_report(
    *,
    device: dict[str, Any],
    host: dict[str, Any],
    versions: dict[str, Any],
    model: dict[str, Any],
    settings: dict[str, Any],
    backends: list[dict[str, Any]],
    stages: list[dict[str, Any]],
    http: list[dict[str, Any]],
    server_backend: str | None,
    notes: list[str],
    reference_b1_ms: float | None = None,
    training_speed: dict[str, Any] | None = None,
    server_overhead: dict[str, Any] | None = None,
    created: datetime.datetime | None = None,
) -> dict[str, Any]:
    """The report document; `training_speed` is `benchmarks.training_speed.TrainingSpeed.as_dict()`
    (None: the section was not run, an empty one is written); `server_overhead` is
    `benchmarks.server_overhead.bench_server_overhead`'s section (None: not run, left out)."""
    created = created or datetime.datetime.now(datetime.UTC)
    report = {
        "schema_version": SCHEMA_VERSION,
        "created": created.isoformat(timespec="seconds"),
        "device": device,
        "host": host,
        "versions": versions,
        "model": model,
        "settings": settings,
        "backends": backends,
        "stages": stages,
        "http": http,
        "derived": derive(backends, http, server_backend, reference_b1_ms),
        "notes": notes,
        "training_speed": training_speed or {"device": device["name"], "rows": [], "notes": []},
    }
    if server_overhead is not None:
        report["server_overhead"] = server_overhead
    return report


# ---------------------------------------------------------------- Markdown


def backend_label(row: dict[str, Any]) -> str:
    suffix = " +copies" if row.get("includes_transfer") else ""
    return f"{row['name']} {row['precision']}{suffix}"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _copies(value: bool | None) -> str:
    return {True: "included", False: "no (input on device)", None: "n/a (CPU)"}[value]


BACKEND_HEADER = ["backend", "precision", "device", "host<->device copies", "batch"]
BACKEND_HEADER += ["p50 ms", "p90 ms", "p99 ms", "images/s"]
STAGE_HEADER = ["JPEG input", "stage", "p50 ms", "p90 ms", "p99 ms", "detail"]
HTTP_HEADER = ["mode", "concurrency / rate", "p50 ms", "p95 ms", "p99 ms", "req/s", "mean batch"]
HTTP_HEADER += ["server queue p50 ms", "server inference p50 ms", "ok", "errors"]
TRAINING_HEADER = ["stage", "precision", "image", "crop", "batch", "median s/step", "p90 s/step"]
TRAINING_HEADER += ["steps/s", "images/s", "GFLOP/step", "GFLOP/s"]


def _backend_cells(row: dict[str, Any]) -> list[str]:
    return [
        row["name"],
        row["precision"],
        row["device"],
        _copies(row["includes_transfer"]),
        str(row["batch_size"]),
        _fmt(row["p50_ms"]),
        _fmt(row["p90_ms"]),
        _fmt(row["p99_ms"]),
        _fmt(row["images_per_s"], 1),
    ]


def _stage_cells(row: dict[str, Any]) -> list[str]:
    cells = [row["input_size"], row["stage"], _fmt(row["p50_ms"]), _fmt(row["p90_ms"]), _fmt(row["p99_ms"])]
    return [*cells, row.get("detail", "")]


def _http_cells(row: dict[str, Any]) -> list[str]:
    load = (
        str(row["concurrency"]) if row["mode"] == "closed" else f"{_fmt(row['rate'], 1)}/s {row['arrivals']}"
    )
    errors = ", ".join(f"{kind}: {count}" for kind, count in row["errors"].items()) or "0"
    return [
        row["mode"],
        load,
        _fmt(row["p50_ms"]),
        _fmt(row["p95_ms"]),
        _fmt(row["p99_ms"]),
        _fmt(row["throughput_rps"], 1),
        _fmt(row["mean_batch_size"]),
        _fmt((row.get("server_p50_ms") or {}).get("queue")),
        _fmt((row.get("server_p50_ms") or {}).get("inference")),
        str(row.get("ok", "-")),
        errors,
    ]


def _training_cells(row: dict[str, Any]) -> list[str]:
    return [
        row["stage"],
        row["precision"],
        str(row["image_size"]),
        "-" if row["crop"] is None else str(row["crop"]),
        str(row["batch_size"]),
        _fmt(row["median_s"], 4),
        _fmt(row["p90_s"], 4),
        _fmt(row["steps_per_s"], 2),
        _fmt(row["images_per_s"], 1),
        _fmt(row.get("gflop_per_step"), 1),
        _fmt(row.get("gflop_per_s"), 1),
    ]


def training_speed_markdown(section: dict[str, Any]) -> list[str]:
    """The "Training speed" table (a row per stage x precision x size), the rows' notes, then the
    section's notes; [] when the section has neither rows nor notes."""
    rows, notes = section.get("rows") or [], section.get("notes") or []
    if not rows and not notes:
        return []
    lines = [f"### Training speed ({section.get('device', '?')}; seconds per optimiser step)", ""]
    if rows:
        lines += markdown_table(TRAINING_HEADER, [_training_cells(row) for row in rows])
        lines.append("")
    row_notes = list(dict.fromkeys(row["notes"] for row in rows if row.get("notes")))
    lines += [f"- {note}" for note in [*row_notes, *notes]]
    return lines


def markdown_report(report: dict[str, Any]) -> str:
    """The report as Markdown: backends (a row per backend x batch size), stages, HTTP, training speed,
    derived."""
    model, device, versions = report["model"], report["device"], report["versions"]
    shown_versions = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k in _SHOWN_VERSIONS)
    weights = f"{model['weights']} weights"
    if model["weights"] == "random":
        weights += " (timing only: scores are meaningless)"
    lines = [
        f"## EfficientAD benchmark: {device['name']}",
        "",
        f"- created {report['created']}; device kind {device['kind']}; {shown_versions}",
        f"- model: PDN-{model['size'][0].upper()} ({model['size']}), input "
        f"{model['input_width']}x{model['input_height']}, {weights}",
        "",
        "### Backends (latency per batch; images/s = batch / mean latency)",
        "",
        *markdown_table(BACKEND_HEADER, [_backend_cells(row) for row in report["backends"]]),
    ]
    if report["stages"]:
        lines += ["", "### Pipeline stages (one image; ms)", ""]
        lines += markdown_table(STAGE_HEADER, [_stage_cells(row) for row in report["stages"]])
    if report["http"]:
        first = report["http"][0]
        lines += [
            "",
            f"### HTTP (`efficientad serve`, backend {first.get('server_backend', '?')}, max batch "
            f"{first.get('max_batch_size', '?')}, max delay {first.get('max_batch_delay_ms', '?')} ms; "
            f"{first.get('image', '')})",
            "",
            *markdown_table(HTTP_HEADER, [_http_cells(row) for row in report["http"]]),
        ]
    training = training_speed_markdown(report.get("training_speed") or {})
    if training:
        lines += ["", *training]
    if report.get("server_overhead"):
        from benchmarks.server_overhead import overhead_markdown

        lines += ["", *overhead_markdown(report["server_overhead"])]
    derived = report["derived"]
    lines += [
        "",
        "### Derived",
        "",
        f"- HTTP throughput at concurrency 32 / concurrency 1: {_fmt(derived['http_c32_over_c1'])}x",
        f"- server overhead per request (HTTP p50 at c1 - {derived.get('server_backend') or '?'} p50 at "
        f"batch 1, {derived.get('backend_b1_source') or '-'}): "
        f"{derived.get('server_overhead_note') or _fmt(derived['server_overhead_ms']) + ' ms'}",
        "- server overhead within the same requests (HTTP p50 at c1 - the server's own inference p50 at c1): "
        f"{_fmt(derived.get('server_overhead_same_requests_ms'))} ms",
    ]
    lines += [f"- note: {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


_SHOWN_VERSIONS = ("torch", "cuda", "onnxruntime", "tensorrt", "python")


# ---------------------------------------------------------------- plot


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Latency (p50, ms) against throughput (images/s) per backend, points labelled by batch size;
    the HTTP closed-loop runs as a dashed line labelled by concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(figsize=(9, 6), dpi=110)
    series: dict[str, list[dict[str, Any]]] = {}
    for row in report["backends"]:
        series.setdefault(backend_label(row), []).append(row)
    for label, rows in series.items():
        rows = sorted(rows, key=lambda row: row["batch_size"])
        xs, ys = [row["images_per_s"] for row in rows], [row["p50_ms"] for row in rows]
        (line,) = axes.plot(xs, ys, marker="o", label=label)
        for row, x, y in zip(rows, xs, ys, strict=True):
            axes.annotate(
                f"b{row['batch_size']}",
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=line.get_color(),
            )
    closed = [row for row in report["http"] if row["mode"] == "closed" and row["p50_ms"]]
    closed.sort(key=lambda row: row["concurrency"])
    if closed:
        xs, ys = [row["throughput_rps"] for row in closed], [row["p50_ms"] for row in closed]
        (line,) = axes.plot(
            xs, ys, marker="s", linestyle="--", color="black", label="HTTP server (closed loop)"
        )
        for row, x, y in zip(closed, xs, ys, strict=True):
            axes.annotate(
                f"c{row['concurrency']}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7
            )
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    for axis, values, set_scale in (
        (axes.xaxis, [x for line in axes.get_lines() for x in line.get_xdata()], axes.set_xscale),
        (axes.yaxis, [y for line in axes.get_lines() for y in line.get_ydata()], axes.set_yscale),
    ):
        positive = [value for value in values if value > 0]
        if positive and max(positive) / min(positive) > 10:  # log only where the values span decades
            set_scale("log")
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_major_formatter(plain)
    axes.set_xlabel("throughput (images/s)")
    axes.set_ylabel("p50 latency per call (ms)")
    model = report["model"]
    axes.set_title(
        f"EfficientAD PDN-{model['size'][0].upper()} {model['input_width']}x{model['input_height']} on "
        f"{report['device']['name']}",
        fontsize=10,
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


# ---------------------------------------------------------------- files


def report_stem(report: dict[str, Any]) -> str:
    """`<device-slug>-<YYYY-MM-DD>`, e.g. `nvidia-h100-80gb-hbm3-2025-11-26`."""
    from benchmarks.environment import device_slug

    return f"{device_slug(report['device']['name'])}-{report['created'][:10]}"


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """`out_dir/<stem>.json`, `.md` and `.png`; returns the three paths (the JSON is validated first)."""
    problems = validate_report(report)
    if problems:
        raise ValueError("benchmark report does not match its schema: " + "; ".join(problems))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report_stem(report)
    paths = {
        "json": out_dir / f"{stem}.json",
        "markdown": out_dir / f"{stem}.md",
        "plot": out_dir / f"{stem}.png",
    }
    paths["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown_report(report))
    plot_report(report, paths["plot"])
    return paths
