//! One self-contained HTML page (no scripts, no network): the address space over time as an
//! SVG of VMA bands (x: time, y: address ranges, each range given height by its size on a log
//! scale; colour by kind, shade by touched fraction; details on hover), a counter chart, the
//! findings, and with stacks the top call sites and a flame graph of touched bytes. Every
//! string from the traced process is escaped.

use std::{collections::BTreeMap, fmt::Write as _};

use super::timeline_view::{Band, Sample, time_span};
use crate::{
    analysis::{Finding, Severity},
    flags::size,
    stacks::sites::SiteRow,
};

/// What the page shows of the code (recorded with stacks; empty otherwise).
#[derive(Clone, Debug, Default)]
pub struct Code {
    /// Each process's top call sites.
    pub sites: Vec<(u32, Vec<SiteRow>)>,
    /// Touched bytes by the stack of function names (root first) that mapped them
    /// (`profile::by_names`).
    pub touched: BTreeMap<Vec<String>, u64>,
}

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

/// Call sites shown per process.
const PAGE_SITES: usize = 20;

/// The call-site tables, one per process.
fn sites_html(names: &BTreeMap<u32, String>, code: &Code) -> String {
    let mut out = String::new();
    for (pid, rows) in code.sites.iter().filter(|(_, rows)| !rows.is_empty()) {
        let _ = write!(
            out,
            "<h3>{} ({pid})</h3><table><tr><th>call site</th><th>reserved</th><th>touched</th>\
<th>still mapped</th><th>released</th><th>calls</th></tr>",
            escape(names.get(pid).map_or("?", String::as_str))
        );
        for r in rows.iter().take(PAGE_SITES) {
            let _ = write!(
                out,
                "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&r.site),
                if r.through_malloc {
                    " <i>(through malloc)</i>"
                } else {
                    ""
                },
                size(r.stats.reserved_bytes),
                size(r.stats.touched_bytes + r.stats.first_touch_bytes),
                size(r.still_mapped_bytes),
                size(r.stats.released_bytes),
                r.stats.calls
            );
        }
        out.push_str("</table>");
    }
    out
}

/// A frame of the flame graph and the frames called from it.
#[derive(Default)]
struct FlameNode {
    value: u64,
    children: BTreeMap<String, FlameNode>,
}

impl FlameNode {
    fn depth(&self) -> usize {
        self.children
            .values()
            .map(|c| 1 + c.depth())
            .max()
            .unwrap_or(0)
    }
}

const FLAME_ROW: f64 = 17.0;

/// Frames narrower than this many pixels are left out (as flame graph tools do).
const FLAME_MIN_WIDTH: f64 = 0.3;

/// A flame graph of `stacks` (root first): each frame as wide as the bytes touched under it,
/// its callers below it.
fn flame_svg(stacks: &BTreeMap<Vec<String>, u64>) -> String {
    let mut root = FlameNode::default();
    for (names, &v) in stacks.iter().filter(|(_, v)| **v > 0) {
        root.value += v;
        let mut node = &mut root;
        for n in names {
            node = node.children.entry(n.clone()).or_default();
            node.value += v;
        }
    }
    if root.value == 0 {
        return String::new();
    }
    let depth = root.depth();
    let height = (depth + 1) as f64 * FLAME_ROW + 10.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" id=\"flame\">"
    );
    let scale = (WIDTH - 20.0) / root.value as f64;
    let total = root.value;
    let frame = |name: &str, value: u64, x: f64, level: usize, svg: &mut String| {
        let w = value as f64 * scale;
        let y = height - (level + 1) as f64 * FLAME_ROW;
        // Warm colours, the same for the same name.
        let h = name
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let fill = format!(
            "rgb({},{},{})",
            205 + h % 50,
            60 + (h >> 8) % 150,
            (h >> 16) % 55
        );
        let label = if w > 30.0 {
            let fits = ((w - 6.0) / 7.0) as usize;
            let shown: String = name.chars().take(fits).collect();
            format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" class=\"fl\">{}</text>",
                x + 3.0,
                y + 12.0,
                escape(&shown)
            )
        } else {
            String::new()
        };
        let _ = write!(
            svg,
            "<g><title>{} ({}, {:.1} %)</title><rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{fill}\" rx=\"2\"/>{label}</g>",
            escape(name),
            size(value),
            value as f64 * 100.0 / total as f64,
            FLAME_ROW - 1.0
        );
    };
    frame("all", total, 10.0, 0, &mut svg);
    // Depth first, an explicit stack: (node, x, level).
    let mut todo: Vec<(&String, &FlameNode, f64, usize)> = Vec::new();
    let mut x = 10.0;
    for (name, child) in &root.children {
        todo.push((name, child, x, 1));
        x += child.value as f64 * scale;
    }
    while let Some((name, node, x, level)) = todo.pop() {
        if node.value as f64 * scale < FLAME_MIN_WIDTH {
            continue;
        }
        frame(name, node.value, x, level, &mut svg);
        let mut cx = x;
        for (n, c) in &node.children {
            todo.push((n, c, cx, level + 1));
            cx += c.value as f64 * scale;
        }
    }
    svg.push_str("</svg>");
    svg
}

/// Renders the page.
pub fn page(
    names: &BTreeMap<u32, String>,
    bands: &[Band],
    samples: &[Sample],
    findings: &[Finding],
    code: &Code,
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
            "<li class=\"{}\"><b>[{}] {}</b><br>{}{}{}</li>",
            if f.severity == Severity::Warning {
                "warning"
            } else {
                "info"
            },
            f.pid,
            escape(&f.title),
            escape(&f.explanation),
            if f.call_sites.is_empty() {
                String::new()
            } else {
                format!("<br>call sites: {}", escape(&f.call_sites.join("; ")))
            },
            f.suggestion
                .as_deref()
                .map(|s| format!("<br><i>try: {}</i>", escape(s)))
                .unwrap_or_default()
        );
    }
    let sites = sites_html(names, code);
    let flame = flame_svg(&code.touched);
    let mut code_html = String::new();
    if !sites.is_empty() {
        let _ = write!(
            code_html,
            "<h2>Top call sites</h2><p>The first frame outside libc, the loader, the allocator \
and Rust's standard library; touched: bytes of what the site mapped that were touched, and \
bytes it touched itself (<code>--fault-stacks</code>).</p>{sites}"
        );
    }
    if !flame.is_empty() {
        let _ = write!(
            code_html,
            "<h2>Touched bytes by call stack</h2><p>A flame graph of the memory touched, charged to \
the stacks that mapped it: each frame as wide as the bytes under it, callers below. Hover a \
frame for its bytes.</p>{flame}"
        );
    }
    let procs: Vec<String> = names
        .iter()
        .map(|(pid, n)| format!("{} ({pid})", escape(n)))
        .collect();
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>vmatrace report</title>\
<style>body{{font-family:sans-serif;margin:20px}} .axis{{font-size:11px;fill:#555}} \
li.warning{{color:#8a4b00}} li{{margin-bottom:8px}} rect.vma:hover{{stroke:#000;stroke-width:1.5}} \
.fl{{font-size:11px;font-family:monospace;pointer-events:none}} #flame g:hover rect{{stroke:#000}} \
td,th{{padding:2px 10px;text-align:right}} td:first-child,th:first-child{{text-align:left}}</style>\
</head><body><h1>vmatrace report</h1><p>Processes: {}. {} VMA pieces{}. Hover a band for its details; \
colour: heap red, stack green, file cyan, shm orange, anonymous blue; darker: more of it touched.</p>\
<h2>Address space over time</h2>{svg}<h2>Reserved and touched bytes</h2>{chart}<h2>Findings</h2><ul>{list}</ul>{code_html}</body></html>\n",
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
    use super::*;

    #[test]
    fn the_flame_graph_is_as_wide_as_the_bytes_under_each_frame() {
        let mut stacks = BTreeMap::new();
        let names = |s: &str| s.split(';').map(str::to_string).collect::<Vec<_>>();
        stacks.insert(names("main;fill;<memset>"), 3 << 20);
        stacks.insert(names("main;load"), 1 << 20);
        stacks.insert(names("main;idle"), 0);
        let svg = flame_svg(&stacks);
        // all, main, fill, <memset>, load: five frames; `idle` touched nothing.
        assert_eq!(svg.matches("<rect").count(), 5, "{svg}");
        assert!(!svg.contains("idle"));
        let width_of = |name: &str| -> f64 {
            let at = svg.find(&format!("<title>{name} (")).expect(name);
            let rest = &svg[at..];
            let w = &rest[rest.find("width=\"").expect("width") + 7..];
            w[..w.find('"').expect("quote")].parse().expect("a number")
        };
        assert_eq!(width_of("main"), WIDTH - 20.0);
        assert!((width_of("fill") - 3.0 * width_of("load")).abs() < 0.2);
        // Names from the traced process are escaped.
        assert!(svg.contains("&lt;memset&gt; (3 MiB, 75.0 %)"), "{svg}");
        assert!(flame_svg(&BTreeMap::new()).is_empty());
    }

    #[test]
    fn escapes_what_the_traced_process_controls() {
        assert_eq!(
            escape("<script>\"x\" & 'y'</script>"),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(escape("a\nb"), "a&#10;b");
    }
}
