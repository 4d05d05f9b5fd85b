"""The status page: one server-rendered HTML page for operators (no JavaScript, no build chain).

Sections: queue per state, per-stage latency (median, 95th percentile and
maximum over the latest jobs), failures with their reasons, recent jobs.
The page refreshes itself every 15 seconds.  Every value from the index is
escaped; the page shows UIDs, AE titles and hosts, never patient data
(the index holds none).
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Callable
from typing import Any

from segnode.node.ops.roles import Principal
from segnode.node.ops.viewer import viewer_url
from segnode.node.ops.views import (
    FAILURE_STATES,
    STAGES,
    OpsDB,
    percentile,
    stage_spans,
    stage_totals,
)
from segnode.storage.index import DeliveryState, JobState

#: how many of the latest jobs the latency table is computed over.
LATENCY_WINDOW = 500

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}
th,td{padding:.3em .7em;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}.uid{font-family:ui-monospace,monospace;font-size:12px}
.state{padding:.05em .45em;border-radius:.6em;font-size:12px;background:#e8e8e8}
.s-done{background:#cdeccd}.s-failed,.s-dead_letter{background:#f6c9c9}.s-not_routed{background:#f3e1b5}
.s-segmenting,.s-sending{background:#cfe0f7}.s-held{background:#f7e08a}.s-rejected{background:#e0c0e8}
.o-pass{color:#176417}.o-warn{color:#8a5a00;font-weight:bold}.o-fail{color:#a11;font-weight:bold}
figure{display:inline-block;margin:.3em}figure img{width:384px;height:384px;border:1px solid #ccc;image-rendering:auto}
.warning{background:#fff3c4;border:1px solid #d9a400;padding:.4em .7em;margin:.6em 0;display:inline-block}
#user{float:right}#user form{display:inline}.ready{color:#176417}.notready{color:#a11}
td.t{white-space:nowrap}
.grid{display:flex;gap:2em;flex-wrap:wrap}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    for limit, unit, size in ((60, "s", 1), (3600, "min", 60), (86400, "h", 3600)):
        if value < limit:
            return f"{value / size:.1f} {unit}"
    return f"{value / 86400:.1f} d"


def _state(state: str) -> str:
    return f'<span class="state s-{_e(state)}">{_e(state)}</span>'


def _uid(uid: str | None) -> str:
    text = _e(uid)
    short = text if len(text) <= 28 else f"…{text[-26:]}"
    return f'<span class="uid" title="{text}">{short}</span>'


def _job_link(job_id: int) -> str:
    return f'<a href="/jobs/{int(job_id)}/review">{int(job_id)}</a>'


_QC_WARNING = re.compile(r"QC (?:warn|fail)\b.*")


def qc_warning(events: list[Any]) -> str | None:
    """The QC warning a job was sent (or held) with, from its history; ``None`` when it passed."""
    for event in reversed(events):
        found = _QC_WARNING.search(event.reason or "")
        if found:
            return found.group(0)
    return None


def user_bar(user: Principal | None, csrf: str | None) -> str:
    """Who is logged in, and a logout button (a form carrying the CSRF token)."""
    if user is None:
        return ""
    out = f'<div id=user>{_e(user.name)} <span class=muted>({_e(", ".join(sorted(user.roles)))})</span>'
    if csrf is not None:
        out += (' <form method=post action="/logout"><input type=hidden name=csrf value="'
                f'{_e(csrf)}"><button id=logout>log out</button></form>')
    return out + "</div>"


def render_status(db: OpsDB, *, node: str, readiness: Callable[[], dict[str, tuple[bool, str]]] | None = None,
                  clock: Callable[[], float] = time.time, recent: int = 50) -> str:
    """The whole page as a string."""
    now = clock()
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta http-equiv="refresh" content="15">',
        f"<title>segnode {_e(node)} status</title><style>{_CSS}</style></head><body>",
        f"<h1>segnode <span class=uid>{_e(node)}</span></h1>",
        f'<div class=muted>as of {_when(now)} UTC · <a href="/metrics">metrics</a> · '
        '<a href="/api/v1/jobs">jobs (JSON)</a> · <a href="/api/v1/openapi.json">API</a></div>',
    ]
    if readiness is not None:
        parts.append(_readiness(readiness()))
    parts.append('<div class=grid><div>')
    parts.append(_queue(db.counts()))
    parts.append(_deliveries(db))
    parts.append("</div><div>")
    parts.append(_latency(db))
    parts.append("</div></div>")
    parts.append(_held(db.jobs(states=(JobState.HELD.value,), limit=recent)))
    parts.append(_failures(db.jobs(states=FAILURE_STATES, limit=recent)))
    jobs = db.jobs(limit=recent)
    parts.append(_recent(jobs, db.events_of([j["job_id"] for j in jobs]), now))
    parts.append("</body></html>\n")
    return "".join(parts)


def _readiness(checks: dict[str, tuple[bool, str]]) -> str:
    ok = all(c[0] for c in checks.values())
    items = " · ".join(f'<span class="{"ready" if good else "notready"}" title="{_e(detail)}">{_e(name)}'
                       f'{"" if good else " ✗"}</span>' for name, (good, detail) in checks.items())
    head = '<b class=ready>ready</b>' if ok else '<b class=notready>NOT READY</b>'
    problems = "".join(f"<li>{_e(name)}: {_e(detail)}</li>" for name, (good, detail) in checks.items() if not good)
    return f"<p id=readiness>{head}: {items}</p>" + (f"<ul class=notready>{problems}</ul>" if problems else "")


def _queue(counts: dict[str, int]) -> str:
    rows = "".join(f"<tr><td>{_state(s.value)}</td><td class=n>{counts.get(s.value, 0)}</td></tr>"
                   for s in JobState)
    return f"<h2>Queue</h2><table id=queue><tr><th>state</th><th>jobs</th></tr>{rows}</table>"


def _deliveries(db: OpsDB) -> str:
    """Deliveries per state: ``stored`` awaits the destination's Storage Commitment; ``done`` is committed there."""
    counts = {r[0]: r[1] for r in db.query("SELECT state, COUNT(*) FROM deliveries GROUP BY state")}
    rows = "".join(f"<tr><td>{s.value}</td><td class=n>{counts.get(s.value, 0)}</td></tr>" for s in DeliveryState)
    return f"<h2>Deliveries</h2><table id=deliveries><tr><th>state</th><th>deliveries</th></tr>{rows}</table>"


def _latency(db: OpsDB) -> str:
    jobs = db.jobs(limit=LATENCY_WINDOW)
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    for events in db.events_of([j["job_id"] for j in jobs]).values():
        for span in stage_spans(events):
            per_stage[span.stage].append(span.seconds)
    rows = "".join(
        f"<tr><td>{stage}</td><td class=n>{len(v)}</td><td class=n>{_secs(percentile(v, 0.5))}</td>"
        f"<td class=n>{_secs(percentile(v, 0.95))}</td><td class=n>{_secs(max(v) if v else None)}</td></tr>"
        for stage, v in per_stage.items())
    return ("<h2>Per-stage latency</h2><table id=latency><tr><th>stage</th><th>n</th><th>median</th>"
            f"<th>p95</th><th>max</th></tr>{rows}</table>"
            f"<div class=muted>over the latest {LATENCY_WINDOW} jobs</div>")


def _failures(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return "<h2>Failures</h2><p id=failures class=muted>none</p>"
    rows = "".join(
        f"<tr><td class=n>{_job_link(j['job_id'])}</td><td>{_state(j['state'])}</td><td class=t>{_when(j['updated_at'])}</td>"
        f"<td>{_uid(j['series_uid'])}</td><td>{_e(j['rule'] or '-')}</td><td>{_e(j['reason'])}</td></tr>"
        for j in jobs)
    return ("<h2>Failures</h2><table id=failures><tr><th>job</th><th>state</th><th>when (UTC)</th>"
            f"<th>series</th><th>rule</th><th>reason</th></tr>{rows}</table>")


def _recent(jobs: list[dict[str, Any]], events: dict[int, list], now: float) -> str:
    if not jobs:
        return "<h2>Recent jobs</h2><p id=recent class=muted>no job yet</p>"
    rows = []
    for j in jobs:
        t = stage_totals(events.get(j["job_id"], []), now)
        cells = "".join(f"<td class=n>{_secs(t.get(s))}</td>" for s in STAGES)
        warning = qc_warning(events.get(j["job_id"], []))
        badge = f' <span class=o-warn title="{_e(warning)}">QC warning</span>' if warning else ""
        rows.append(f"<tr><td class=n>{_job_link(j['job_id'])}</td><td>{_state(j['state'])}{badge}</td>"
                    f"<td class=t>{_when(j['created_at'])}</td><td>{_uid(j['study_uid'])}</td><td>{_uid(j['series_uid'])}</td>"
                    f"<td>{_e(j['rule'] or '-')}</td><td>{_e(j['profile'] or '-')}</td>"
                    f"<td>{_e(j['backend'] or '-')}</td>{cells}</tr>")
    head = "".join(f"<th>{s}</th>" for s in STAGES)
    return ("<h2>Recent jobs</h2><table id=recent><tr><th>job</th><th>state</th><th>created (UTC)</th>"
            f"<th>study</th><th>series</th><th>rule</th><th>profile</th><th>backend</th>{head}</tr>"
            + "".join(rows) + "</table>")


def _held(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return "<h2>Held for review</h2><p id=held class=muted>none</p>"
    rows = "".join(
        f'<tr><td class=n><a href="/jobs/{j["job_id"]}/review">{j["job_id"]}</a></td>'
        f"<td class=t>{_when(j['updated_at'])}</td><td>{_e(j['profile'] or '-')}</td><td>{_e(j['reason'])}</td></tr>"
        for j in jobs)
    return ("<h2>Held for review</h2><table id=held><tr><th>job</th><th>held since (UTC)</th>"
            f"<th>profile</th><th>QC</th></tr>{rows}</table>")


def render_review(job: dict[str, Any], summary: dict[str, Any], *, node: str, events: list | None = None,
                  user: Principal | None = None, csrf: str | None = None) -> str:
    """The job page of one result: QC figures, the pictures, and approve / reject for a held job.

    The decision form carries the session's CSRF token; the reviewer is the logged-in user.
    """
    job_id = int(job["job_id"])
    warning = qc_warning(events or [])
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>segnode {_e(node)} job {job_id}</title><style>{_CSS}</style></head><body>",
        user_bar(user, csrf),
        f'<h1>Job {job_id} {_state(job["state"])}</h1>',
        f'<div class=muted><a href="/status">status</a> · profile {_e(job["profile"])} · '
        f'series {_uid(job["series_uid"])} · {_e(job["reason"])}</div>',
        f'<div class=muted id=completion>completed: {_e(job.get("completion") or "-")}</div>',
        f'<div id=viewer><a href="{_e(viewer_url(job["study_uid"], job.get("seg_series_uid")))}">Open in viewer</a></div>',
        f'<div class=warning id=qc-warning>{_e(warning)}</div>' if warning else "",
        _qc_table(summary.get("qc") or []),
        _pictures(job_id, summary.get("pictures") or []),
    ]
    if job["state"] == JobState.HELD.value:
        parts.append(_decision_form(job_id, user, csrf))
    if events:
        rows = "".join(f"<tr><td class=t>{_when(e.at)}</td><td>{_state(e.state)}</td><td>{_e(e.reason)}</td></tr>"
                       for e in events)
        parts.append(f"<h2>History</h2><table id=history><tr><th>when (UTC)</th><th>state</th><th>reason</th></tr>"
                     f"{rows}</table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _qc_table(findings: list[dict[str, Any]]) -> str:
    if not findings:
        return "<h2>Quality checks</h2><p id=qc class=muted>no QC recorded</p>"
    rows = "".join(
        f"<tr><td>{_e(f['tissue'])}</td><td>{_e(f['check'])}</td>"
        f"<td class=o-{_e(f['outcome'])}>{_e(f['outcome'])}</td><td class=n>{_e(f['figure'])}</td>"
        f"<td>{_e(f['expected'])}</td></tr>" for f in findings)
    return ("<h2>Quality checks</h2><table id=qc><tr><th>tissue</th><th>check</th><th>outcome</th>"
            f"<th>figure</th><th>expected</th></tr>{rows}</table>")


def _pictures(job_id: int, pictures: list[dict[str, str]]) -> str:
    if not pictures:
        return "<h2>Pictures</h2><p id=pictures class=muted>none</p>"
    figures = "".join(
        f'<figure><img src="/jobs/{job_id}/review/{_e(p["file"].rsplit("/", 1)[-1])}" '
        f'alt="{_e(p["tissue"])} {_e(p["plane"])}"><figcaption>{_e(p["tissue"])} · {_e(p["plane"])}</figcaption></figure>'
        for p in pictures)
    return f"<h2>Pictures</h2><div id=pictures>{figures}</div>"


def _decision_form(job_id: int, user: Principal | None, csrf: str | None) -> str:
    if user is None or csrf is None:
        return '<h2>Review</h2><p id=review-login class=muted><a href="/login">Log in</a> to approve or reject.</p>'
    fields = (f'<input type=hidden name=csrf value="{_e(csrf)}">'
              f'<span class=muted>as {_e(user.name)}</span> '
              '<label>comment <input name=comment id=comment maxlength=500 size=40></label> ')
    return (f'<h2>Review</h2><form id=review method=post action="/jobs/{job_id}/decision">{fields}'
            '<button name=decision value=approve id=approve>Approve and send</button> '
            '<button name=decision value=reject id=reject>Reject</button></form>')
