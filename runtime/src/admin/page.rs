//! `GET /`: one server-rendered, read-only HTML page (no script): each
//! rule with its counters and an inline SVG sparkline of its message rate,
//! and the last decisions of the audit log when it is enabled. Every text
//! from a rule, a plugin or a message is HTML-escaped.

use super::{PageResponse, Shared, rules_json};
use axum::extract::State;
use axum::response::Html;
use std::fmt::Write as _;
use std::sync::Arc;

/// Decisions shown from the audit log's tail, newest first.
const DECISIONS_SHOWN: usize = 20;

/// Text made safe for HTML element content and quoted attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An SVG polyline of `rates`, scaled to its own maximum.
fn sparkline(rates: &[f64]) -> String {
    const W: f64 = 120.0;
    const H: f64 = 24.0;
    let max = rates.iter().copied().fold(0.0_f64, f64::max).max(1e-9);
    let step = if rates.len() > 1 {
        W / (rates.len() - 1) as f64
    } else {
        0.0
    };
    let points: Vec<String> = rates
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{:.1},{:.1}", i as f64 * step, H - r / max * H))
        .collect();
    format!(
        "<svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\"><polyline fill=\"none\" stroke=\"#36c\" stroke-width=\"1.5\" points=\"{}\"/></svg>",
        points.join(" ")
    )
}

/// The last whole lines within the file's last `bytes` bytes.
fn tail_lines(path: &std::path::Path, bytes: usize) -> std::io::Result<Vec<String>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(bytes as u64);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity(bytes.min(len as usize));
    f.take(bytes as u64).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    // A read that starts inside the file starts inside a line.
    if start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    Ok(lines)
}

fn decisions(shared: &Shared) -> String {
    let Some(path) = &shared.sources.audit else {
        return "<p>The audit log is off ([audit] enabled = false).</p>".into();
    };
    let lines = match tail_lines(path, shared.config.audit_tail_bytes) {
        Ok(l) => l,
        Err(e) => return format!("<p>Audit log not read: {}</p>", escape_html(&e.to_string())),
    };
    let mut out = String::from(
        "<table><tr><th>time (ms)</th><th>rule</th><th>device</th><th>actions</th><th>error</th></tr>",
    );
    let mut shown = 0;
    for line in lines.iter().rev() {
        let Ok(d) = serde_json::from_str::<crate::audit::DecisionRecord>(line) else {
            continue;
        };
        let actions: Vec<String> = d
            .actions
            .iter()
            .map(|a| match (&a.topic, &a.reason) {
                (Some(t), _) if a.allowed => format!("→ {t}"),
                (_, Some(r)) => format!("refused: {r}"),
                _ => "refused".into(),
            })
            .collect();
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            d.timestamp,
            escape_html(&d.rule),
            escape_html(&d.device),
            escape_html(&actions.join("; ")),
            escape_html(d.error.as_deref().unwrap_or("")),
        );
        shown += 1;
        if shown == DECISIONS_SHOWN {
            break;
        }
    }
    out.push_str("</table>");
    if shown == 0 {
        return "<p>No decision in the audit log's tail yet.</p>".into();
    }
    out
}

pub(super) async fn page(State(shared): State<Arc<Shared>>) -> PageResponse {
    let rules = rules_json(&shared.sources.gateway);
    let samples = shared
        .samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut body = String::new();
    let _ = write!(
        body,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Ganglion</title><style>body{{font:14px sans-serif;margin:1.5em}}table{{border-collapse:collapse}}td,th{{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left}}.off{{color:#a00}}</style></head><body><h1>Ganglion</h1><p>Model: {}. <a href=\"metrics\">metrics</a> · <a href=\"rules\">rules (JSON)</a></p><h2>Rules</h2><table><tr><th>rule</th><th>topics</th><th>state</th><th>plugins</th><th>messages</th><th>published</th><th>dead letters</th><th>rate (msg/s, last {} s)</th><th>last error</th></tr>",
        escape_html(&match shared.sources.llm.model_id() {
            id if id.is_empty() => "none".to_owned(),
            id => id,
        }),
        shared.config.sparkline_samples as u64 * shared.config.sample_ms / 1000,
    );
    for r in &rules {
        let name = r["name"].as_str().unwrap_or_default();
        let plugins: Vec<String> = r["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{} {}",
                    p["name"].as_str().unwrap_or_default(),
                    p["version"].as_str().unwrap_or_default()
                )
            })
            .collect();
        let rates: Vec<f64> = samples
            .get(name)
            .map(|(_, ring)| ring.iter().copied().collect())
            .unwrap_or_default();
        let topics: Vec<&str> = r["topics"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str())
            .collect();
        let enabled = r["enabled"].as_bool().unwrap_or(true);
        let c = &r["counters"];
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td{}>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} {:.1}</td><td>{}</td></tr>",
            escape_html(name),
            escape_html(&topics.join(" ")),
            if enabled { "" } else { " class=\"off\"" },
            if enabled { "enabled" } else { "disabled" },
            escape_html(&plugins.join(", ")),
            c["messages"],
            c["published"],
            c["dead_letters"],
            sparkline(&rates),
            rates.last().copied().unwrap_or(0.0),
            escape_html(r["last_error"].as_str().unwrap_or("")),
        );
    }
    body.push_str("</table><h2>Recent decisions</h2>");
    let recent = {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || decisions(&shared))
            .await
            .unwrap_or_else(|e| format!("<p>{}</p>", escape_html(&e.to_string())))
    };
    body.push_str(&recent);
    body.push_str("</body></html>\n");
    Html(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_escaped() {
        assert_eq!(
            escape_html("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn a_sparkline_spans_the_box() {
        let svg = sparkline(&[0.0, 2.0, 1.0]);
        assert!(
            svg.contains("points=\"0.0,24.0 60.0,0.0 120.0,12.0\""),
            "{svg}"
        );
        assert!(sparkline(&[]).contains("points=\"\""));
    }

    #[test]
    fn the_tail_drops_the_cut_line() {
        let dir = std::env::temp_dir().join(format!("ganglion-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("audit.jsonl");
        std::fs::write(&f, "first line\nsecond\nthird\n").unwrap();
        assert_eq!(tail_lines(&f, 13).unwrap(), vec!["third"]);
        assert_eq!(tail_lines(&f, 1000).unwrap().len(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
