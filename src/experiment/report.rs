//! A comparison as one self-contained HTML page (`diffii compare`, `diffii demo`): the intro,
//! an accuracy chart, the results table, image grids, the time per stage and the classifier
//! settings.
//!
//! The page must open offline, years later, from an e-mail or an archive: one file, no external
//! URLs, no JavaScript; images are embedded as `data:` URLs and the chart is inline SVG drawn by
//! `plotters` with no font files (the browser lays the text out with its own sans-serif, so the
//! build needs no fontconfig or freetype). Table numbers come from
//! [`crate::experiment::compare::RowText`], so the page and `results.md` cannot disagree.
use std::fmt::Write as _;
use std::path::Path;

use base64::Engine as _;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::data::atomic::write_atomic;
use crate::error::{Error, Result};
use crate::experiment::compare::{group_cells, group_columns, CompareResults, MethodResult, RowText, COLUMNS};

/// An image grid (e.g. real shots, or one generating method's images), as PNG bytes.
#[derive(Clone, Debug)]
pub struct Grid {
    pub title: String,
    pub png: Vec<u8>,
}

/// A timed stage of the run.
#[derive(Clone, Debug)]
pub struct Stage {
    pub name: String,
    pub seconds: f64,
}

/// Everything the page shows.
pub struct ReportInput<'a> {
    pub title: &'a str,
    /// Plain text (dataset, protocol, model, command); blank lines separate paragraphs.
    pub intro: &'a str,
    pub results: &'a CompareResults,
    pub grids: &'a [Grid],
    pub stages: &'a [Stage],
    /// Chance accuracy in [0, 1], drawn as a dashed line on the chart.
    pub chance: Option<f64>,
}

/// Fill colour of the chart's bars (also how a reader of the SVG tells bars from other shapes).
pub const BAR_FILL: &str = "#4C72B0";
const BAR: RGBColor = RGBColor(0x4C, 0x72, 0xB0);
const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
const CHANCE: RGBColor = RGBColor(0xC4, 0x4E, 0x52);
const FONT: &str = "sans-serif";
/// plotters writes `font-size` as the requested size / 1.24, so this asks for CSS pixels.
fn px(css: f64) -> f64 {
    css * 1.24
}
/// The widest an image grid is shown, in CSS pixels.
const GRID_MAX_WIDTH: u32 = 720;

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
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

/// The page. Fails on an empty results list (a report of nothing is a caller's mistake) and on
/// a grid that is not a PNG.
pub fn render(input: &ReportInput) -> Result<String> {
    let r = input.results;
    if r.methods.is_empty() {
        return Err(Error::invalid("the report needs the results of at least one method"));
    }
    if let Some(c) = input.chance.filter(|c| !(0.0..=1.0).contains(c)) {
        return Err(Error::invalid(format!("chance accuracy {c} must lie in [0, 1]")));
    }
    let mut h = String::new();
    let title = escape(input.title);
    // `write!` into a String cannot fail; the results are ignored through `let _`.
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n<h1>{title}</h1>\n"
    );
    for para in input.intro.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        let _ = writeln!(h, "<p class=\"intro\">{}</p>", escape(para).replace('\n', "<br>\n"));
    }

    let seeds: Vec<String> = r.seeds.iter().map(u64::to_string).collect();
    let _ = write!(
        h,
        "<h2>Test accuracy</h2>\n<figure class=\"chart\">\n{}\n<figcaption>Test accuracy at the epoch chosen on the \
         validation split, mean over {} seed{} ({}). Whiskers: &plusmn;1 standard deviation; dots: single seeds{}.</figcaption>\n</figure>\n",
        chart_svg(&r.methods.iter().map(Bar::accuracy).collect::<Vec<_>>(), "test accuracy (%)", input.chance)?,
        r.seeds.len(),
        if r.seeds.len() == 1 { "" } else { "s" },
        escape(&seeds.join(", ")),
        input.chance.map_or(String::new(), |c| format!("; dashed line: chance ({:.1}%)", 100.0 * c)),
    );
    if r.methods.iter().any(|m| m.groups.is_some()) {
        let _ = write!(
            h,
            "<h2>Worst-group accuracy</h2>\n<figure class=\"chart\">\n{}\n<figcaption>Accuracy on the test group each classifier \
             does worst on, at the validation-selected epoch, mean over seeds (the groups are in the table below). Whiskers: \
             &plusmn;1 standard deviation; dots: single seeds.</figcaption>\n</figure>\n",
            chart_svg(&r.methods.iter().map(Bar::worst_group).collect::<Vec<_>>(), "worst-group accuracy (%)", input.chance)?,
        );
    }

    h.push_str("<h2>Results</h2>\n");
    results_table(&mut h, &r.methods);
    group_table(&mut h, &r.methods);
    selection_table(&mut h, &r.selected);

    if !input.grids.is_empty() {
        h.push_str("<h2>Images</h2>\n");
        for g in input.grids {
            let (w, _) = png_size(&g.png).ok_or_else(|| Error::invalid(format!("image grid `{}` is not a PNG", g.title)))?;
            // Whole multiples of the PNG's width keep every pixel of the tiny tiles the same size.
            let shown = w * (GRID_MAX_WIDTH / w).max(1);
            let b64 = base64::engine::general_purpose::STANDARD.encode(&g.png);
            let t = escape(&g.title);
            let _ = write!(
                h,
                "<figure class=\"grid\">\n<figcaption>{t}</figcaption>\n<img width=\"{shown}\" alt=\"{t}\" src=\"data:image/png;base64,{b64}\">\n</figure>\n"
            );
        }
    }

    if !input.stages.is_empty() {
        h.push_str("<h2>Time per stage</h2>\n<table class=\"stages\">\n<thead><tr><th>stage</th><th>seconds</th><th>minutes</th></tr></thead>\n<tbody>\n");
        let row = |h: &mut String, name: &str, s: f64| {
            let _ = writeln!(h, "<tr><td>{}</td><td>{s:.1}</td><td>{:.1}</td></tr>", escape(name), s / 60.0);
        };
        for s in input.stages {
            row(&mut h, &s.name, s.seconds);
        }
        h.push_str("</tbody>\n<tfoot>");
        row(&mut h, "total", input.stages.iter().map(|s| s.seconds).sum());
        h.push_str("</tfoot>\n</table>\n");
    }

    let _ = write!(
        h,
        "<h2>Classifier settings</h2>\n<pre>{}</pre>\n<footer>diffii {}</footer>\n</main>\n</body>\n</html>\n",
        escape(&compact_json(&r.classifier)?),
        env!("CARGO_PKG_VERSION")
    );
    Ok(h)
}

/// Renders the page and writes it atomically to `path`.
pub fn write(path: &Path, input: &ReportInput) -> Result<()> {
    write_atomic(path, render(input)?.as_bytes())
}

/// The results table; the best validation-selected mean (every one of equals) in bold.
fn results_table(h: &mut String, methods: &[MethodResult]) {
    let best = methods.iter().map(|m| m.test_acc_selected.0).filter(|v| v.is_finite()).fold(f64::NEG_INFINITY, f64::max);
    h.push_str("<div class=\"scroll\">\n<table class=\"results\">\n<thead><tr>");
    for c in COLUMNS {
        let _ = write!(h, "<th>{}</th>", escape(c));
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    for m in methods {
        let row = RowText::new(m);
        let mut cells = row.cells("±").map(|c| escape(&c));
        if m.test_acc_selected.0 == best {
            cells[1] = format!("<strong>{}</strong> ± {}", escape(&row.acc_selected.0), escape(&row.acc_selected.1));
        }
        push_row(h, &cells);
    }
    h.push_str("</tbody>\n</table>\n</div>\n");
}

/// Accuracy by test group, when the test set has groups; the best worst-group mean in bold.
fn group_table(h: &mut String, methods: &[MethodResult]) {
    let cols = group_columns(methods);
    if cols.is_empty() {
        return;
    }
    let best = methods.iter().filter_map(|m| m.groups.as_ref().map(|g| g.worst_selected.0)).filter(|v| v.is_finite()).fold(f64::NEG_INFINITY, f64::max);
    h.push_str("<p>By test group, at the validation-selected epoch unless marked (group mean: each group counts once; worst group: the lowest):</p>\n");
    h.push_str("<div class=\"scroll\">\n<table class=\"results\">\n<thead><tr>");
    for c in &cols {
        let _ = write!(h, "<th>{}</th>", escape(c));
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    for m in methods {
        let mut cells: Vec<String> = group_cells(m, cols.len() - 5, "±").iter().map(|c| escape(c)).collect();
        if m.groups.as_ref().is_some_and(|g| g.worst_selected.0 == best) {
            cells[3] = format!("<strong>{}</strong>", cells[3]);
        }
        push_row(h, &cells);
    }
    h.push_str("</tbody>\n</table>\n</div>\n");
}

/// One table row of escaped cells; every column after the first holds a number.
fn push_row(h: &mut String, cells: &[String]) {
    h.push_str("<tr>");
    for (i, c) in cells.iter().enumerate() {
        let class = if i == 0 { "" } else { " class=\"num\"" };
        let _ = write!(h, "<td{class}>{c}</td>");
    }
    h.push_str("</tr>\n");
}

/// The sweep's choices, when there was a sweep.
fn selection_table(h: &mut String, selected: &[crate::experiment::sweep::Selection]) {
    if selected.is_empty() {
        return;
    }
    h.push_str("<p>Settings chosen on validation accuracy (mean over seeds; the test set never chooses):</p>\n");
    h.push_str("<div class=\"scroll\">\n<table class=\"results\">\n<thead><tr><th>method</th><th>chosen setting</th><th>of</th><th>val acc (%)</th><th>test acc, val-selected epoch (%)</th></tr></thead>\n<tbody>\n");
    for s in selected {
        let (m, sd) = s.test_acc_selected;
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{:.2}</td><td class=\"num\">{:.2} ± {:.2}</td></tr>",
            escape(&s.family),
            escape(&s.method),
            s.variants,
            100.0 * s.val_acc,
            100.0 * m,
            100.0 * sd
        );
    }
    h.push_str("</tbody>\n</table>\n</div>\n");
}

/// Width and height of a PNG, from its signature and IHDR chunk; `None` if it is not one.
fn png_size(b: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    if b.len() < 24 || b[..8] != SIGNATURE || &b[12..16] != b"IHDR" {
        return None;
    }
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let (w, h) = (be(16), be(20));
    (w > 0 && h > 0).then_some((w, h))
}

/// JSON with one top-level field a line, nested values on the same line: short enough to read
/// at a glance, unlike serde's pretty form that gives every nested field its own line.
fn compact_json<T: serde::Serialize>(v: &T) -> Result<String> {
    let err = |e: serde_json::Error| Error::invalid(format!("cannot serialise the settings: {e}"));
    let value = serde_json::to_value(v).map_err(err)?;
    let Some(obj) = value.as_object() else { return serde_json::to_string(&value).map_err(err) };
    let lines: Vec<String> = obj.iter().map(|(k, v)| format!("  {}: {v}", serde_json::Value::from(k.as_str()))).collect();
    Ok(format!("{{\n{}\n}}", lines.join(",\n")))
}

fn chart_err(e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("cannot draw the accuracy chart: {e}"))
}

/// One method's bar of a chart: (mean, std) over seeds and the seeds' values (fractions), and
/// the text printed above it.
struct Bar {
    method: String,
    mean_std: (f64, f64),
    seeds: Vec<f64>,
    label: String,
}

impl Bar {
    /// Test accuracy at the validation-selected epoch.
    fn accuracy(m: &MethodResult) -> Self {
        let label = RowText::new(m).acc_selected.0;
        Bar { method: m.method.clone(), mean_std: m.test_acc_selected, seeds: m.seeds.iter().filter_map(|s| s.test_acc_selected).collect(), label }
    }

    /// Worst-group test accuracy at the validation-selected epoch (NaN without groups).
    fn worst_group(m: &MethodResult) -> Self {
        let mean_std = m.groups.as_ref().map_or((f64::NAN, f64::NAN), |g| g.worst_selected);
        let seeds = m.seeds.iter().filter_map(|s| s.groups_selected.as_ref().map(|g| g.worst)).collect();
        Bar { method: m.method.clone(), mean_std, seeds, label: format!("{:.2}", 100.0 * mean_std.0) }
    }
}

/// A chart as an SVG element: per method a bar (mean over seeds, in %), a ±1 std whisker, the
/// seeds as dots and the mean printed above; the chance level dashed.
fn chart_svg(methods: &[Bar], y_desc: &str, chance: Option<f64>) -> Result<String> {
    let (width, height) = (900u32, 420u32);
    let n = methods.len();
    let pct = |v: f64| 100.0 * v;
    let seeds = |m: &Bar| -> Vec<f64> { m.seeds.iter().copied().map(pct).filter(|v| v.is_finite()).collect() };
    let (mut top, mut any) = (chance.map_or(0.0, pct), false);
    for m in methods {
        let (mean, std) = m.mean_std;
        if mean.is_finite() {
            any = true;
            top = top.max(pct(mean) + pct(if std.is_finite() { std } else { 0.0 }));
        }
        top = seeds(m).into_iter().fold(top, f64::max);
    }
    // Tens of percent up to 100; the printed values may rise into the top margin.
    let y_max = ((top + 5.0) / 10.0).ceil().clamp(1.0, 10.0) * 10.0;

    // Names that would not fit side by side under their bars alternate between two rows.
    let (plot_left, plot_right) = (72.0, 96.0);
    let slot = (width as f64 - plot_left - plot_right) / n as f64;
    let name_px = |s: &str| 7.5 * s.chars().count() as f64;
    let rows = if methods.iter().any(|m| name_px(&m.method) > 0.92 * slot) { 2 } else { 1 };

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin_top(30)
            .margin_right(plot_right as u32)
            .margin_left(8)
            .x_label_area_size(14 + 20 * rows)
            .y_label_area_size(plot_left as u32 - 8)
            .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..y_max)
            .map_err(chart_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_labels(11)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_desc(y_desc)
            .label_style((FONT, px(13.0)).into_font().color(&INK))
            .axis_desc_style((FONT, px(14.0)).into_font().color(&INK))
            .bold_line_style(RGBColor(0xDD, 0xDD, 0xDD))
            .light_line_style(TRANSPARENT)
            .axis_style(RGBColor(0x88, 0x88, 0x88))
            .draw()
            .map_err(chart_err)?;

        let half = 0.32;
        let bars = methods.iter().enumerate().filter(|(_, m)| m.mean_std.0.is_finite());
        chart
            .draw_series(bars.map(|(i, m)| Rectangle::new([(i as f64 - half, 0.0), (i as f64 + half, pct(m.mean_std.0))], BAR.filled())))
            .map_err(chart_err)?;

        let whisker = INK.stroke_width(2);
        let dot_edge = WHITE.filled();
        let dot = INK.mix(0.85).filled();
        let value_style = TextStyle::from((FONT, px(15.0)).into_font()).color(&INK).pos(Pos::new(HPos::Center, VPos::Bottom));
        let name_style = TextStyle::from((FONT, px(15.0)).into_font()).color(&INK).pos(Pos::new(HPos::Center, VPos::Top));
        for (i, m) in methods.iter().enumerate() {
            let x = i as f64;
            let (mean, std) = (pct(m.mean_std.0), pct(m.mean_std.1));
            let mut label_at = 0.0;
            if mean.is_finite() {
                label_at = mean;
                if std.is_finite() && std > 0.0 {
                    let (lo, hi) = ((mean - std).max(0.0), (mean + std).min(100.0));
                    let cap = 0.08;
                    for pts in [vec![(x, lo), (x, hi)], vec![(x - cap, lo), (x + cap, lo)], vec![(x - cap, hi), (x + cap, hi)]] {
                        chart.draw_series(std::iter::once(PathElement::new(pts, whisker))).map_err(chart_err)?;
                    }
                    label_at = hi;
                }
            }
            // Seeds spread sideways so equal values stay visible as separate dots.
            let vals = seeds(m);
            let k = vals.len();
            for (j, v) in vals.iter().enumerate() {
                let dx = if k > 1 { (j as f64 / (k - 1) as f64 - 0.5) * 0.3 } else { 0.0 };
                chart.draw_series([Circle::new((x + dx, *v), 5, dot_edge), Circle::new((x + dx, *v), 4, dot)]).map_err(chart_err)?;
                label_at = label_at.max(*v);
            }
            let (bx, by) = chart.backend_coord(&(x, label_at));
            let text = if mean.is_finite() { m.label.clone() } else { "n/a".into() };
            root.draw(&Text::new(text, (bx, by - 6), value_style.clone())).map_err(chart_err)?;
            let (nx, ny) = chart.backend_coord(&(x, 0.0));
            let row_offset = if rows == 2 && i % 2 == 1 { 20 } else { 0 };
            root.draw(&Text::new(m.method.clone(), (nx, ny + 8 + row_offset), name_style.clone())).map_err(chart_err)?;
        }
        if let Some(c) = chance.map(pct) {
            let style = CHANCE.stroke_width(2);
            chart.draw_series(DashedLineSeries::new([(-0.5, c), (n as f64 - 0.5, c)], 8, 5, style)).map_err(chart_err)?;
            let (rx, ry) = chart.backend_coord(&(n as f64 - 0.5, c));
            let label = TextStyle::from((FONT, px(14.0)).into_font()).color(&CHANCE).pos(Pos::new(HPos::Left, VPos::Center));
            root.draw(&Text::new(format!("chance {c:.1}%"), (rx + 6, ry), label)).map_err(chart_err)?;
        }
        if !any {
            let (cx, cy) = chart.backend_coord(&((n as f64 - 1.0) / 2.0, y_max / 2.0));
            let style = TextStyle::from((FONT, px(15.0)).into_font()).color(&INK).pos(Pos::new(HPos::Center, VPos::Center));
            root.draw(&Text::new("no test accuracy was measured", (cx, cy), style)).map_err(chart_err)?;
        }
        root.present().map_err(chart_err)?;
    }
    Ok(svg)
}

const STYLE: &str = "
:root { color-scheme: light; }
body { margin: 0; background: #f6f7f9; color: #222; font: 15px/1.5 system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif; }
main { max-width: 1000px; margin: 0 auto; padding: 24px 28px 40px; background: #fff; min-height: 100vh; box-sizing: border-box; }
h1 { font-size: 26px; margin: 8px 0 12px; }
h2 { font-size: 19px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #e3e5e8; }
p.intro { margin: 6px 0; color: #333; }
figure { margin: 0; }
figure.chart svg { display: block; width: 100%; height: auto; }
figcaption { font-size: 13px; color: #555; margin: 4px 0; }
figure.grid { margin: 14px 0 22px; }
figure.grid figcaption { font-size: 15px; font-weight: 600; color: #222; margin-bottom: 6px; }
figure.grid img { display: block; max-width: 100%; height: auto; image-rendering: pixelated; border: 1px solid #ddd; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 5px 7px; border-bottom: 1px solid #e3e5e8; text-align: left; vertical-align: top; }
th { background: #eef0f3; font-weight: 600; }
tbody tr:nth-child(even) { background: #f7f8fa; }
td.num { font-variant-numeric: tabular-nums; }
table.results td { white-space: nowrap; }
table.stages td:nth-child(n+2), table.stages th:nth-child(n+2) { text-align: right; }
table.stages tfoot td { font-weight: 600; border-top: 2px solid #ccc; }
pre { background: #f3f4f6; padding: 10px 12px; font-size: 12.5px; overflow-x: auto; border-radius: 4px; }
footer { margin-top: 32px; font-size: 12px; color: #888; }
";
