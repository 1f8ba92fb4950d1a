//! One self-contained HTML page (no scripts, no network): the address space over time as an
//! SVG of VMA bands (x: time, y: address ranges, each range given height by its size on a log
//! scale; colour by kind, shade by touched fraction; details on hover), a counter chart, and
//! the findings. Every string from the traced process is escaped.

use std::{collections::BTreeMap, fmt::Write as _};

use super::timeline_view::{Band, Sample, time_span};
use crate::{
    analysis::{Finding, Severity},
    flags::size,
};

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push_str(&format!("&#{};", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn colour(kind: &str) -> &'static str {
    match kind {
        "heap" => "#d9534f",
        "stack" => "#5cb85c",
        "file" => "#5bc0de",
        "shm" => "#f0ad4e",
        "special" => "#999999",
        _ => "#337ab7",
    }
}

const MAX_BANDS: usize = 20_000;
const WIDTH: f64 = 1200.0;
const PLOT_HEIGHT: f64 = 700.0;

/// Renders the page.
pub fn page(
    names: &BTreeMap<u32, String>,
    bands: &[Band],
    samples: &[Sample],
    findings: &[Finding],
) -> String {
    let bands = &bands[..bands.len().min(MAX_BANDS)];
    let (t0, t1) = time_span(bands, samples);
    let x = |ns: u64| 60.0 + (ns.saturating_sub(t0)) as f64 / (t1 - t0) as f64 * (WIDTH - 80.0);
    // Address axis: every boundary of every band, each gap between two boundaries a row whose
    // height grows with the log of its size.
    let mut cuts: Vec<u64> = bands
        .iter()
        .flat_map(|b| [b.vma.start, b.vma.end])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let weights: Vec<f64> = cuts
        .windows(2)
        .map(|w| ((w[1] - w[0]) as f64).log2().max(1.0))
        .collect();
    let total: f64 = weights.iter().sum::<f64>().max(1.0);
    let mut ys = Vec::with_capacity(cuts.len());
    let mut acc = 0.0;
    ys.push(PLOT_HEIGHT + 20.0);
    for w in &weights {
        acc += w;
        ys.push(PLOT_HEIGHT + 20.0 - acc / total * PLOT_HEIGHT);
    }
    let y = |addr: u64| {
        ys[cuts
            .binary_search(&addr)
            .unwrap_or_else(|i| i.min(ys.len() - 1))]
    };

    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{}\" id=\"bands\">",
        PLOT_HEIGHT + 60.0
    );
    let _ = write!(
        svg,
        "<text x=\"60\" y=\"{}\" class=\"axis\">0 s</text><text x=\"{}\" y=\"{}\" class=\"axis\" text-anchor=\"end\">{:.3} s</text>",
        PLOT_HEIGHT + 40.0,
        WIDTH - 20.0,
        PLOT_HEIGHT + 40.0,
        (t1 - t0) as f64 / 1e9
    );
    for b in bands {
        let (x0, x1) = (x(b.from_ns), x(b.to_ns.unwrap_or(t1)));
        let (y_top, y_bottom) = (y(b.vma.end), y(b.vma.start));
        let opacity = b
            .touched_permille
            .map_or(0.35, |p| 0.15 + 0.85 * f64::from(p) / 1000.0);
        let path = b
            .vma
            .backing
            .path(b.vma.perms.shared)
            .unwrap_or_else(|| "anonymous".into());
        let title = format!(
            "{:#x}-{:#x} {} {} ({})\nkind: {}\ncreated by {} at {:.6} s{}\ntouched: {}",
            b.vma.start,
            b.vma.end,
            b.vma.perms,
            path,
            size(b.vma.len()),
            b.vma.backing.kind(),
            b.created_by.name(),
            b.from_ns.saturating_sub(t0) as f64 / 1e9,
            b.removed_by
                .zip(b.to_ns)
                .map(|(c, t)| format!(
                    "\nremoved by {} at {:.6} s",
                    c.name(),
                    t.saturating_sub(t0) as f64 / 1e9
                ))
                .unwrap_or_default(),
            b.touched_permille
                .map_or("unknown (unmapped)".to_string(), |p| format!(
                    "{:.1} %",
                    f64::from(p) / 10.0
                )),
        );
        let _ = write!(
            svg,
            "<rect class=\"vma\" x=\"{x0:.1}\" y=\"{y_top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\" fill-opacity=\"{opacity:.2}\" stroke=\"{}\" stroke-width=\"0.3\"><title>{}</title></rect>",
            (x1 - x0).max(1.0),
            (y_bottom - y_top).max(0.5),
            colour(b.vma.backing.kind()),
            colour(b.vma.backing.kind()),
            escape(&title)
        );
    }
    svg.push_str("</svg>");

    // Counters: reserved and touched bytes of each process over time.
    let mut chart = String::new();
    let max = samples
        .iter()
        .map(|s| s.reserved_bytes.max(s.touched_bytes))
        .max()
        .unwrap_or(1)
        .max(1);
    let cy = |v: u64| 170.0 - v as f64 / max as f64 * 150.0;
    let _ = write!(
        chart,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"190\" id=\"counters\">"
    );
    for pid in names.keys() {
        for (field, col) in [("reserved", "#337ab7"), ("touched", "#d9534f")] {
            let points: Vec<String> = samples
                .iter()
                .filter(|s| s.pid == *pid)
                .map(|s| {
                    let v = if field == "reserved" {
                        s.reserved_bytes
                    } else {
                        s.touched_bytes
                    };
                    format!("{:.1},{:.1}", x(s.ts_ns), cy(v))
                })
                .collect();
            let _ = write!(
                chart,
                "<polyline fill=\"none\" stroke=\"{col}\" stroke-width=\"1.5\" points=\"{}\"><title>{field} bytes of {pid}</title></polyline>",
                points.join(" ")
            );
        }
    }
    let _ = write!(
        chart,
        "<text x=\"62\" y=\"16\" class=\"axis\">{} max; blue: reserved, red: touched</text></svg>",
        size(max)
    );

    let mut list = String::new();
    for f in findings {
        let _ = write!(
            list,
            "<li class=\"{}\"><b>[{}] {}</b><br>{}{}</li>",
            if f.severity == Severity::Warning {
                "warning"
            } else {
                "info"
            },
            f.pid,
            escape(&f.title),
            escape(&f.explanation),
            f.suggestion
                .as_deref()
                .map(|s| format!("<br><i>try: {}</i>", escape(s)))
                .unwrap_or_default()
        );
    }
    let procs: Vec<String> = names
        .iter()
        .map(|(pid, n)| format!("{} ({pid})", escape(n)))
        .collect();
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>vmatrace report</title>\
<style>body{{font-family:sans-serif;margin:20px}} .axis{{font-size:11px;fill:#555}} \
li.warning{{color:#8a4b00}} li{{margin-bottom:8px}} rect.vma:hover{{stroke:#000;stroke-width:1.5}}</style>\
</head><body><h1>vmatrace report</h1><p>Processes: {}. {} VMA pieces{}. Hover a band for its details; \
colour: heap red, stack green, file cyan, shm orange, anonymous blue; darker: more of it touched.</p>\
<h2>Address space over time</h2>{svg}<h2>Reserved and touched bytes</h2>{chart}<h2>Findings</h2><ul>{list}</ul></body></html>\n",
        procs.join(", "),
        bands.len(),
        if bands.len() == MAX_BANDS {
            " (the first ones only)"
        } else {
            ""
        },
    )
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escapes_what_the_traced_process_controls() {
        assert_eq!(
            escape("<script>\"x\" & 'y'</script>"),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(escape("a\nb"), "a&#10;b");
    }
}
