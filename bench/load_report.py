"""bench.load's report: the verdicts against the targets and the Markdown page written beside the JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGETS = {"postgres": 500.0, "embedded": 1000.0}


def verdicts(res: dict[str, Any]) -> list[str]:
    lines = []
    for name, m in res["modes"].items():
        p = m["phases"].get("poll", {}).get("all", {})
        ps = m["phases"].get("poll+submit", {}).get("all", {})
        target = TARGETS[name]
        ok = p.get("errors") == 0 and p.get("p99_ms", 1e9) < target
        lines.append(
            f"- {name}, {m['pollers']} pollers: errors {p.get('errors')}, p99 {p.get('p99_ms')} ms "
            f"(target 0 errors, p99 < {target:g} ms): **{'met' if ok else 'missed'}**"
        )
        lines.append(
            f"- {name}, with {res['settings']['submit_rate']:g} submits/s and {res['settings']['cancel_rate']:g} "
            f"cancels/s: errors {ps.get('errors')} (target 0): **{'met' if ps.get('errors') == 0 else 'missed'}**"
            f"; p99 {ps.get('p99_ms')} ms"
        )
        for key, label in (("stop_api", "API"), ("stop_serve", "hipp serve + worker + beat")):
            st = m.get(key)
            if st:
                ok = st["exit_s"] < 10 and not st["processes_left"] and st["exit_code"] == 0
                lines.append(
                    f"- {name}, SIGTERM to {label} under load: exit in {st['exit_s']} s (code {st['exit_code']}), "
                    f"processes left {len(st['processes_left'])} (target < 10 s, none): **{'met' if ok else 'missed'}**"
                )
    return lines


def write_md(res: dict[str, Any], path: Path) -> None:
    s = res["settings"]
    lines = [
        "# bench/load",
        "",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, {res['machine']['memory_gib']} GiB, "
        f"{res['machine']['os']}, Python {res['machine']['python']}. The API (`hipp serve --no-worker "
        f"--api-processes {s['api_processes']}`: uvicorn, {s['api_processes']} process(es)), the database and "
        "the load generator (one asyncio process, one keep-alive "
        f"connection per client) share these cores; load average at the start {res['load_average_start']}, "
        f"at the end {res['load_average_end']}.",
        "",
        f"Clients: each poller `GET /jobs/{{id}}`, then waits {s['interval']:g} s (every {s['events_every']}th poll "
        f"also reads the job's events); {s['jobs']} jobs polled; `poll+submit` adds {s['submit_rate']:g} "
        f"`POST /jobs`/s and {s['cancel_rate']:g} cancels/s; `longpoll`: {s['long_pollers']} clients in "
        f"`?wait={s['long_wait']:g}` loops beside 20 plain pollers (whose figures the row shows). "
        f"Phases of {s['duration']:g} s, measured after {s['warmup']:g} s of the same load (connections opened, "
        "keys cached). Errors: anything but the expected 2xx/304, transport errors included.",
        "",
        "| mode | phase | pollers | req/s | p50 ms | p99 ms | max ms | errors | server CPU s | load avg after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in res["modes"].items():
        for phase, ph in m["phases"].items():
            a = ph["all"]
            lines.append(
                f"| {name} | {phase} | {ph['pollers']} | {a.get('rps')} | {a.get('p50_ms')} | {a.get('p99_ms')} | "
                f"{a.get('max_ms')} | {a['errors']} | {ph['server_cpu_s']} | {ph['load_average_after'][0]} |"
            )
    lines += ["", "Per request kind:", "", "| mode | phase | kind | requests | p50 ms | p99 ms | errors | codes |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in res["modes"].items():
        for phase, ph in m["phases"].items():
            for kind, k in ph["kinds"].items():
                lines.append(
                    f"| {name} | {phase} | {kind} | {k.get('requests')} | {k.get('p50_ms')} | {k.get('p99_ms')} | "
                    f"{k['errors']} | {k['codes']} |"
                )
    lines += ["", "SIGTERM under the `poll+submit` load (after "
              f"{s['stop_after']:g} s of it):", "",
              "| mode | server | exit after SIGTERM s | exit code | processes left | errors before the signal | "
              "what clients saw from the signal on |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in res["modes"].items():
        for key in ("stop_api", "stop_serve"):
            st = m.get(key)
            if st:
                lines.append(
                    f"| {name} | `{st['command']}` ({st['processes_started']} processes) | {st['exit_s']} | "
                    f"{st['exit_code']} | {len(st['processes_left'])} | {st['errors_before_signal']} | "
                    f"{st['clients_during_shutdown']} |"
                )
    lines += ["", "Targets (issue 21):", "", *verdicts(res), "", "Where the time went (CPU):", ""]
    for name, m in res["modes"].items():
        for phase in ("poll", "poll+submit"):
            ph = m["phases"].get(phase)
            if not ph:
                continue
            wall = ph["seconds"] + s.get("warmup", 0)
            n = ph["all"].get("requests", 0) * wall / max(ph["seconds"], 1e-9)
            lines.append(
                f"- {name} {phase}: the API processes used {ph['server_cpu_s'] / wall:.2f} of the "
                f"{res['machine']['cores']} cores ({1000 * ph['server_cpu_s'] / max(n, 1):.1f} ms of CPU per request), "
                f"the load generator {ph['client_cpu_s'] / wall:.2f}; load average {ph['load_average_before'][0]} -> "
                f"{ph['load_average_after'][0]} (the rest: the database, and whatever else ran on the machine)"
            )
    if res.get("notes"):
        lines += ["", *res["notes"]]
    lines += ["", f"Reproduce: `{res['command']}`", ""]
    path.write_text("\n".join(lines))
