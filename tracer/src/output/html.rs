//! One self-contained HTML page (no scripts, no network) that holds at any scale: the whole
//! run on one time axis, drawn from the lanes of [`super::timeline_view`] (a row per region a
//! person recognises, never one per VMA piece), so its size depends on the rows and columns,
//! not on the length of the run:
//!
//! - touched (resident) memory per process, on its own scale;
//! - reserved address space per process, the part without access (`PROT_NONE` reservations,
//!   which are not memory) drawn apart, dashed;
//! - one row per region (heap, stack, arena or block of anonymous memory, file), each on its own
//!   scale: touched memory solid, reserved memory with access light, reservations without
//!   access as a hatched strip, and marks where mappings were created or removed (churn);
//! - the findings, and with stacks the top call sites and a flame graph of touched bytes.
//!
//! Every axis is labelled. Every string from the traced process is escaped.

use std::{collections::BTreeMap, fmt::Write as _};

use super::timeline_view::{LanePicture, Picture, Series};
use crate::{
    analysis::{Finding, Severity},
    flags::size,
    stacks::sites::SiteRow,
};

/// What the page shows of the code (recorded with stacks; empty otherwise).
#[derive(Clone, Debug, Default)]
pub struct Code {
    /// Each process's name, for the call-site tables.
    pub names: BTreeMap<u32, String>,
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
        "file" => "#31a5c9",
        "shm" => "#f0ad4e",
        "special" => "#999999",
        "arena" => "#8e44ad",
        "other" => "#777777",
        _ => "#337ab7",
    }
}

const PROCESS_COLOURS: [&str; 7] = [
    "#d9534f", "#337ab7", "#5cb85c", "#8e44ad", "#f0ad4e", "#31a5c9", "#777777",
];

/// The page's width, the labels' column and the plots' width, in pixels.
const WIDTH: f64 = 1200.0;
const LEFT: f64 = 270.0;
const PLOT: f64 = WIDTH - LEFT - 30.0;
/// Columns of the pictures: two pixels each.
pub const COLUMNS: usize = 465;
const ROW: f64 = 34.0;

/// A round step for about `n` ticks up to `max` (1, 2 or 5 times a power of ten).
fn nice_step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(f64::MIN_POSITIVE);
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

/// A round step in bytes for about `n` ticks up to `max`: 1, 2 or 5 times a power of ten of
/// the binary unit (KiB, MiB, GiB) `max` is counted in.
fn byte_step(max: u64, n: f64) -> u64 {
    let unit = [1u64 << 40, 1 << 30, 1 << 20, 1 << 10, 1]
        .into_iter()
        .find(|u| max >= *u)
        .unwrap_or(1);
    ((nice_step(max as f64 / unit as f64, n) * unit as f64) as u64).max(1)
}

struct Axes {
    /// Seconds from the start to pixels.
    span_s: f64,
}

impl Axes {
    fn x(&self, s: f64) -> f64 {
        LEFT + s / self.span_s * PLOT
    }

    fn column_x(&self, pic: &Picture, c: usize) -> f64 {
        // The middle of column c.
        LEFT + (c as f64 + 0.5) / pic.columns as f64 * PLOT
    }

    /// Ticks and the title of the time axis at `y`.
    fn time(&self, svg: &mut String, y: f64) {
        let step = nice_step(self.span_s, 8.0);
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" class=\"ax\"/>",
            LEFT + PLOT
        );
        let mut t = 0.0;
        while t <= self.span_s * 1.0001 {
            let x = self.x(t);
            let digits = if step >= 1.0 {
                0
            } else {
                (-step.log10().floor()) as usize
            };
            let _ = write!(
                svg,
                "<line x1=\"{x:.1}\" y1=\"{y}\" x2=\"{x:.1}\" y2=\"{}\" class=\"ax\"/><text x=\"{x:.1}\" y=\"{}\" class=\"tick\" text-anchor=\"middle\">{t:.digits$}</text>",
                y + 4.0,
                y + 15.0
            );
            t += step;
        }
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" class=\"axis\" text-anchor=\"middle\">time since the first event (s)</text>",
            LEFT + PLOT / 2.0,
            y + 30.0
        );
    }
}

/// A value axis from `top` to `top + height` for 0..=`max` bytes, titled `title`.
fn byte_axis(svg: &mut String, top: f64, height: f64, max: u64, title: &str) {
    let step = byte_step(max, 4.0);
    let _ = write!(
        svg,
        "<line x1=\"{LEFT}\" y1=\"{top}\" x2=\"{LEFT}\" y2=\"{}\" class=\"ax\"/>",
        top + height
    );
    let mut v = 0u64;
    while v <= max {
        let y = top + height - v as f64 / max as f64 * height;
        let _ = write!(
            svg,
            "<line x1=\"{}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" class=\"grid\"/><text x=\"{}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"end\">{}</text>",
            LEFT - 4.0,
            LEFT + PLOT,
            LEFT - 6.0,
            y + 4.0,
            size(v)
        );
        v += step;
    }
    let _ = write!(
        svg,
        "<text transform=\"translate({},{}) rotate(-90)\" class=\"axis\" text-anchor=\"middle\">{}</text>",
        LEFT - 70.0,
        top + height / 2.0,
        escape(title)
    );
}

/// A polyline path through the columns of `values`, scaled to `max` in a band of `height`
/// pixels whose bottom is at `bottom`; closed to the bottom when `area`.
fn path(
    axes: &Axes,
    pic: &Picture,
    values: &[u64],
    max: u64,
    bottom: f64,
    height: f64,
    area: bool,
) -> String {
    let mut d = String::with_capacity(values.len() * 12);
    let max = max.max(1) as f64;
    let y = |v: u64| bottom - (v as f64 / max).min(1.0) * height;
    if area {
        let _ = write!(d, "M{:.1} {bottom:.1}", axes.column_x(pic, 0));
    }
    for (c, v) in values.iter().enumerate() {
        let cmd = if c == 0 && !area { 'M' } else { 'L' };
        let _ = write!(d, "{cmd}{:.1} {:.1}", axes.column_x(pic, c), y(*v));
    }
    if area {
        let _ = write!(
            d,
            "L{:.1} {bottom:.1}Z",
            axes.column_x(pic, values.len().saturating_sub(1))
        );
    }
    d
}

/// The touched and reserved charts: one line per process.
fn process_charts(svg: &mut String, axes: &Axes, pic: &Picture, top: f64) -> f64 {
    let height = 170.0;
    // Touched memory, on its own scale.
    let max_t = pic
        .processes
        .iter()
        .map(|p| p.total.max_touched())
        .max()
        .unwrap_or(0)
        .max(4096);
    let _ = write!(
        svg,
        "<text x=\"{LEFT}\" y=\"{}\" class=\"title\">Touched memory (resident after a first touch), per process</text>",
        top + 14.0
    );
    let t_top = top + 24.0;
    byte_axis(svg, t_top, height, max_t, "touched bytes");
    for (i, p) in pic.processes.iter().enumerate() {
        let col = PROCESS_COLOURS[i % PROCESS_COLOURS.len()];
        let _ = write!(
            svg,
            "<path d=\"{}\" fill=\"none\" stroke=\"{col}\" stroke-width=\"1.8\"><title>{}: touched bytes, at most {}</title></path>",
            path(
                axes,
                pic,
                &p.total.peak_touched,
                max_t,
                t_top + height,
                height,
                false
            ),
            escape(&p.name),
            size(p.total.max_touched())
        );
    }
    axes.time(svg, t_top + height);
    // Reserved address space, with and without access.
    let r_top = t_top + height + 60.0;
    let max_r = pic
        .processes
        .iter()
        .map(|p| {
            p.total
                .access
                .iter()
                .zip(&p.total.none)
                .map(|(a, n)| a + n)
                .max()
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
        .max(4096);
    let _ = write!(
        svg,
        "<text x=\"{LEFT}\" y=\"{}\" class=\"title\">Reserved address space, per process: with access (solid), in all with PROT_NONE reservations (dashed)</text>",
        r_top - 10.0
    );
    byte_axis(svg, r_top, height, max_r, "reserved bytes");
    for (i, p) in pic.processes.iter().enumerate() {
        let col = PROCESS_COLOURS[i % PROCESS_COLOURS.len()];
        let all: Vec<u64> = p
            .total
            .access
            .iter()
            .zip(&p.total.none)
            .map(|(a, n)| a + n)
            .collect();
        let _ = write!(
            svg,
            "<path d=\"{}\" fill=\"{col}\" fill-opacity=\"0.18\" stroke=\"{col}\" stroke-width=\"1.5\"><title>{}: reserved with access, at most {}</title></path><path d=\"{}\" fill=\"none\" stroke=\"{col}\" stroke-width=\"1.2\" stroke-dasharray=\"5 3\"><title>{}: reserved in all, at most {}</title></path>",
            path(
                axes,
                pic,
                &p.total.access,
                max_r,
                r_top + height,
                height,
                true
            ),
            escape(&p.name),
            size(p.total.max_access()),
            path(axes, pic, &all, max_r, r_top + height, height, false),
            escape(&p.name),
            size(all.iter().copied().max().unwrap_or(0)),
        );
    }
    axes.time(svg, r_top + height);
    r_top + height + 50.0
}

/// One row per region, grouped by process.
fn region_rows(svg: &mut String, axes: &Axes, pic: &Picture, top: f64) -> f64 {
    let mut y = top;
    let _ = write!(
        svg,
        "<text x=\"{LEFT}\" y=\"{}\" class=\"title\">Regions over time, each on its own scale</text><text x=\"{LEFT}\" y=\"{}\" class=\"axis\">touched (solid), reserved with access (light), reserved without access: not memory (hatched strip on top), mappings created or removed (marks below)</text>",
        y + 14.0,
        y + 28.0
    );
    y += 40.0;
    for (i, p) in pic.processes.iter().enumerate() {
        let col = PROCESS_COLOURS[i % PROCESS_COLOURS.len()];
        let who = if p.processes > 1 {
            escape(&p.name)
        } else {
            format!("{} ({})", escape(&p.name), p.pid)
        };
        let _ = write!(
            svg,
            "<text x=\"4\" y=\"{:.1}\" class=\"proc\" fill=\"{col}\">{who}</text>",
            y + 14.0
        );
        y += 20.0;
        for lane in &p.lanes {
            lane_row(svg, axes, pic, lane, y);
            y += ROW;
        }
    }
    axes.time(svg, y + 4.0);
    y + 40.0
}

fn lane_row(svg: &mut String, axes: &Axes, pic: &Picture, lane: &LanePicture, top: f64) {
    let s: &Series = &lane.series;
    let col = colour(lane.kind);
    let bottom = top + ROW - 8.0;
    let height = ROW - 14.0;
    let scale = s.max_access().max(s.max_touched()).max(4096);
    let created = s.total_created();
    let mut numbers = format!(
        "touched up to {} of {} reserved with access",
        size(s.max_touched()),
        size(s.max_access())
    );
    if s.max_none() > 0 {
        numbers.push_str(&format!(", {} without access", size(s.max_none())));
    }
    if created > 0 {
        numbers.push_str(&format!(", {created} mappings"));
    }
    let _ = write!(
        svg,
        "<g class=\"lane\"><title>{}\n{numbers}</title><text x=\"4\" y=\"{:.1}\" class=\"label\">{}</text><text x=\"4\" y=\"{:.1}\" class=\"small\">{}</text><line x1=\"{LEFT}\" y1=\"{bottom:.1}\" x2=\"{}\" y2=\"{bottom:.1}\" class=\"grid\"/>",
        escape(&lane.label),
        top + 11.0,
        escape(&truncate(&lane.label, 40)),
        top + 22.0,
        escape(&truncate(&numbers, 52)),
        LEFT + PLOT
    );
    let _ = write!(
        svg,
        "<path d=\"{}\" fill=\"{col}\" fill-opacity=\"0.22\"/><path d=\"{}\" fill=\"{col}\" fill-opacity=\"0.9\"/>",
        path(axes, pic, &s.access, scale, bottom, height, true),
        path(axes, pic, &s.peak_touched, scale, bottom, height, true)
    );
    // Reservations without access: a hatched strip over the columns that have one.
    let mut strip = String::new();
    let w = PLOT / pic.columns as f64;
    for (c, n) in s.none.iter().enumerate() {
        if *n > 0 {
            let _ = write!(
                strip,
                "M{:.1} {:.1}h{w:.1}v4h-{w:.1}Z",
                LEFT + c as f64 * w,
                top + 1.0
            );
        }
    }
    if !strip.is_empty() {
        let _ = write!(svg, "<path d=\"{strip}\" fill=\"url(#hatch)\"/>");
    }
    // Churn: a mark under each column where mappings came or went.
    let mut marks = String::new();
    for (c, (a, r)) in s.created.iter().zip(&s.removed).enumerate() {
        let n = a + r;
        if n > 0 {
            let h = (1.0 + f64::from(n).log2()).min(6.0);
            let _ = write!(
                marks,
                "M{:.1} {:.1}v{h:.1}",
                axes.column_x(pic, c),
                bottom + 1.0
            );
        }
    }
    if !marks.is_empty() {
        let _ = write!(
            svg,
            "<path d=\"{marks}\" stroke=\"#333\" stroke-width=\"1\"/>"
        );
    }
    svg.push_str("</g>");
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// Call sites shown per process.
const PAGE_SITES: usize = 20;

/// The call-site tables, one per process.
fn sites_html(code: &Code) -> String {
    let mut out = String::new();
    for (pid, rows) in code.sites.iter().filter(|(_, rows)| !rows.is_empty()) {
        let _ = write!(
            out,
            "<h3>{} ({pid})</h3><table><tr><th>call site</th><th>reserved</th><th>touched</th>\
<th>still mapped</th><th>released</th><th>calls</th></tr>",
            escape(code.names.get(pid).map_or("?", String::as_str))
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
pub fn page(pic: &Picture, findings: &[Finding], code: &Code) -> String {
    let span_s = ((pic.t1_ns - pic.t0_ns) as f64 / 1e9).max(1e-9);
    let axes = Axes { span_s };
    let mut body = String::new();
    let charts_end = process_charts(&mut body, &axes, pic, 0.0);
    let end = region_rows(&mut body, &axes, pic, charts_end);
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{end:.0}\" id=\"timeline\"><defs><pattern id=\"hatch\" width=\"4\" height=\"4\" patternUnits=\"userSpaceOnUse\" patternTransform=\"rotate(45)\"><rect width=\"2\" height=\"4\" fill=\"#888\"/></pattern></defs>{body}</svg>"
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
    let sites = sites_html(code);
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
    let procs: Vec<String> = pic
        .processes
        .iter()
        .map(|p| {
            if p.processes > 1 {
                escape(&p.name)
            } else {
                format!("{} ({})", escape(&p.name), p.pid)
            }
        })
        .collect();
    let rows: usize = pic.processes.iter().map(|p| p.lanes.len()).sum();
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>vmatrace report</title>\
<style>body{{font-family:sans-serif;margin:20px}} .tick{{font-size:10px;fill:#555}} .axis{{font-size:11px;fill:#333}} \
.title{{font-size:13px;font-weight:bold;fill:#222}} .proc{{font-size:13px;font-weight:bold}} .label{{font-size:11px;fill:#222}} \
.small{{font-size:9px;fill:#666}} .ax{{stroke:#555;stroke-width:1}} .grid{{stroke:#ddd;stroke-width:1}} \
g.lane:hover .label{{font-weight:bold}} li.warning{{color:#8a4b00}} li{{margin-bottom:8px}} \
.fl{{font-size:11px;font-family:monospace;pointer-events:none}} #flame g:hover rect{{stroke:#000}} \
td,th{{padding:2px 10px;text-align:right}} td:first-child,th:first-child{{text-align:left}}</style>\
</head><body><h1>vmatrace report</h1><p id=\"about\">Processes: {}. {} VMA pieces created over {:.3} s, \
drawn as {rows} rows for {} regions (the heap, the stack, each file, each 64 MiB block of anonymous memory or glibc arena; \
the least active folded by kind). Hover a row for its numbers.</p>{svg}<h2>Findings</h2><ul>{list}</ul>{code_html}</body></html>\n",
        procs.join(", "),
        pic.pieces_created,
        span_s,
        pic.regions,
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

    #[test]
    fn axis_steps_are_round() {
        assert_eq!(nice_step(0.44, 8.0), 0.1);
        assert_eq!(nice_step(600.0, 8.0), 100.0);
        assert_eq!(byte_step(445 << 20, 4.0), 200 << 20);
        assert_eq!(byte_step(3 << 20, 4.0), 1 << 20);
    }
}
