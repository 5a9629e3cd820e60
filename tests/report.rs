//! The HTML report: self-contained (no external URLs, no scripts, images embedded byte for
//! byte), one bar per method, the table's numbers as `results.md` formats them, the best mean
//! in bold, user strings escaped. `sample_report` (ignored) writes /tmp/report-sample.html to
//! look at in a browser.
use base64::Engine as _;

use diffii::classify::stats::mean_std;
use diffii::classify::train::{ClassifierSettings, SeedResult};
use diffii::data::atomic::encode_png;
use diffii::experiment::compare::{markdown, CompareResults, MethodResult, RowText};
use diffii::classify::groups::GroupSummary;
use diffii::experiment::quality::Quality;
use diffii::experiment::report::{escape, render, write, Grid, ReportInput, Stage, BAR_FILL};

fn seed(seed: u64, acc: f64, last: f64) -> SeedResult {
    SeedResult {
        seed,
        train_images: 50,
        val_images: 50,
        synthetic_images: 0,
        selected_epoch: 7,
        test_acc_selected: Some(acc),
        test_acc_last: Some(last),
        val_acc_selected: Some(acc),
        groups_selected: None,
        groups_last: None,
        seconds: 10.0,
        history: Vec::new(),
    }
}

fn method(name: &str, accs: &[f64], images: usize, quality: Option<Quality>) -> MethodResult {
    let seeds: Vec<SeedResult> = accs.iter().enumerate().map(|(i, &a)| seed(i as u64, a, a - 0.01)).collect();
    let last: Vec<f64> = seeds.iter().filter_map(|s| s.test_acc_last).collect();
    MethodResult {
        method: name.to_string(),
        synthetic_images: images,
        seconds_generation: if images > 0 { 123.4 } else { 0.0 },
        seconds_training: 56.78,
        synthetic_dropped: None,
        test_acc_selected: mean_std(accs),
        test_acc_last: mean_std(&last),
        seeds,
        quality,
        groups: None,
    }
}

fn results(names: [&str; 3]) -> CompareResults {
    let q = Quality { faithfulness: 0.9134, diversity: 0.8765, novelty: 1.234 };
    CompareResults {
        classifier: ClassifierSettings::default(),
        selected: vec![],
        seeds: vec![0, 1],
        methods: vec![
            method(names[0], &[0.71, 0.735], 0, None),
            method(names[1], &[0.844, 0.861], 200, Some(q)),
            method(names[2], &[0.79, 0.80], 200, Some(Quality { faithfulness: 0.5, ..q })),
        ],
    }
}

/// A `w`x`h` tile grid with a different colour per tile.
fn grid_png(cols: usize, rows: usize, tile: usize) -> Vec<u8> {
    let (w, h) = (cols * tile, rows * tile);
    let mut rgb = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let (tx, ty) = (x / tile, y / tile);
            let (u, v) = ((x % tile) as f64 / tile as f64 - 0.5, (y % tile) as f64 / tile as f64 - 0.5);
            let inside = u * u + v * v < 0.1 + 0.02 * ((tx + ty) % 4) as f64;
            let base = [(40 + 50 * tx) % 256, (90 + 70 * ty) % 256, (200 + 30 * (tx + ty)) % 256];
            let p = &mut rgb[(y * w + x) * 3..][..3];
            for c in 0..3 {
                p[c] = if inside { base[c] as u8 } else { 235 - (base[c] / 8) as u8 };
            }
        }
    }
    encode_png(&rgb, w, h).unwrap()
}

fn grids() -> Vec<Grid> {
    vec![
        Grid { title: "real shots".into(), png: grid_png(10, 3, 32) },
        Grid { title: "diffii".into(), png: grid_png(10, 4, 28) },
    ]
}

fn stages() -> Vec<Stage> {
    vec![Stage { name: "generation".into(), seconds: 246.8 }, Stage { name: "training".into(), seconds: 340.7 }]
}

fn input<'a>(r: &'a CompareResults, g: &'a [Grid], s: &'a [Stage]) -> ReportInput<'a> {
    ReportInput {
        title: "diffii on tiny shapes",
        intro: "Dataset: shapes, 10 classes, 5 shots.\n\nCommand: diffii compare --out runs/x",
        results: r,
        grids: g,
        stages: s,
        chance: Some(0.1),
    }
}

/// The values of every `name="..."` attribute.
fn attributes<'a>(html: &'a str, name: &str) -> Vec<&'a str> {
    let key = format!(" {name}=\"");
    html.match_indices(&key).map(|(i, _)| {
        let rest = &html[i + key.len()..];
        &rest[..rest.find('"').expect("unterminated attribute")]
    }).collect()
}

/// The `<svg ...>...</svg>` part of the page.
fn chart(html: &str) -> &str {
    let start = html.find("<svg").expect("no <svg");
    let end = html[start..].find("</svg>").expect("no </svg>") + start;
    &html[start..end]
}

/// The chart's bars: its `<rect>`s filled with the bar colour.
fn bars(svg: &str) -> usize {
    let fill = format!("fill=\"{BAR_FILL}\"");
    svg.split("<rect").skip(1).filter(|r| r[..r.find('>').unwrap()].contains(&fill)).count()
}

#[test]
fn names_and_formatted_means_appear() {
    let r = results(["none", "diffii", "img2img"]);
    let (g, s) = (grids(), stages());
    let html = render(&input(&r, &g, &s)).unwrap();
    for m in &r.methods {
        let t = RowText::new(m);
        assert!(html.contains(&format!("<td>{}</td>", m.method)), "{} has no row", m.method);
        assert!(html.contains(&t.acc_selected.0), "{}: mean {} missing", m.method, t.acc_selected.0);
        assert!(html.contains(&format!("{} ± {}", t.acc_last.0, t.acc_last.1)), "{}: last-epoch accuracy missing", m.method);
        assert!(html.contains(&t.per_seed.join(" / ")), "{}: per-seed values missing", m.method);
        // The value above the bar, in the chart.
        assert!(chart(&html).contains(&format!(">\n{}\n</text>", t.acc_selected.0)), "{}: no value above the bar", m.method);
    }
    assert!(html.contains("85.25"), "diffii's mean (84.4, 86.1) should read 85.25");
    assert!(html.contains("<td class=\"num\">91.3</td>"), "faithfulness in %");
    // Stage times in seconds and minutes, and their total.
    assert!(html.contains("<td>generation</td><td>246.8</td><td>4.1</td>"));
    assert!(html.contains("<td>total</td><td>587.5</td><td>9.8</td>"));
    assert!(html.contains("&quot;epochs&quot;: 30,\n"), "classifier settings block");
}

#[test]
fn best_mean_is_bold_and_only_it() {
    let r = results(["none", "diffii", "img2img"]);
    let html = render(&input(&r, &[], &[])).unwrap();
    assert!(html.contains("<strong>85.25</strong> ± 1.20"), "best mean not bold");
    assert_eq!(html.matches("<strong>").count(), 1, "only the best mean is bold");
}

#[test]
fn chart_has_one_bar_per_method_and_text_without_fonts() {
    let r = results(["none", "diffii", "img2img"]);
    let html = render(&input(&r, &[], &[])).unwrap();
    let svg = chart(&html);
    assert_eq!(bars(svg), r.methods.len(), "one bar per method");
    // Text is laid out by the browser: <text> elements, no embedded glyph outlines.
    assert!(svg.matches("<text").count() >= 3 + 3 + 2, "method names, values, axis label");
    for m in &r.methods {
        assert!(svg.contains(&m.method), "{} not under its bar", m.method);
    }
    assert!(svg.contains("test accuracy (%)"), "y axis label");
    assert!(svg.contains("chance 10.0%"), "chance line label");
    // A method without test accuracy gets no bar but stays on the chart.
    let mut r2 = r.clone();
    r2.methods[2].test_acc_selected = (f64::NAN, f64::NAN);
    for s in &mut r2.methods[2].seeds {
        s.test_acc_selected = None;
    }
    let html = render(&input(&r2, &[], &[])).unwrap();
    assert_eq!(bars(chart(&html)), 2);
    assert!(chart(&html).contains("n/a"));
}

#[test]
fn page_is_self_contained() {
    let r = results(["none", "diffii", "img2img"]);
    let (g, s) = (grids(), stages());
    let html = render(&input(&r, &g, &s)).unwrap();
    assert!(!html.contains("<script"), "no scripts");
    let links: Vec<&str> = attributes(&html, "src").into_iter().chain(attributes(&html, "href")).collect();
    assert_eq!(links.len(), g.len(), "only the grids' images are linked");
    for l in links {
        assert!(!l.contains("://") && !l.starts_with("//"), "external link {l:.60}");
    }
    assert!(!html.contains("url("), "no CSS resources");
    assert!(!html.contains("@import"));
}

#[test]
fn images_are_embedded_byte_for_byte() {
    let r = results(["none", "diffii", "img2img"]);
    let g = grids();
    let html = render(&input(&r, &g, &[])).unwrap();
    let srcs = attributes(&html, "src");
    assert_eq!(srcs.len(), g.len());
    for (src, grid) in srcs.iter().zip(&g) {
        let b64 = src.strip_prefix("data:image/png;base64,").expect("a PNG data URL");
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(bytes, grid.png, "{}: bytes differ", grid.title);
        assert!(html.contains(&format!("<figcaption>{}</figcaption>", grid.title)));
    }
    // Pixel art is scaled by whole multiples: 320 px of tiles show at 640, 280 px at 560.
    assert!(html.contains("<img width=\"640\""));
    assert!(html.contains("<img width=\"560\""));
    assert!(html.contains("image-rendering: pixelated"));
}

#[test]
fn user_strings_are_escaped() {
    let r = results(["none", "<b>x&y</b>", "img2img"]);
    let g = vec![Grid { title: "<i>grid</i>".into(), png: grid_png(2, 2, 8) }];
    let s = vec![Stage { name: "<u>stage</u>".into(), seconds: 1.0 }];
    let inp = ReportInput {
        title: "<em>T</em>",
        intro: "<script>alert(1)</script> & more",
        results: &r,
        grids: &g,
        stages: &s,
        chance: None,
    };
    let html = render(&inp).unwrap();
    for raw in ["<b>", "<i>", "<u>", "<em>", "<script", "x&y"] {
        assert!(!html.contains(raw), "{raw} not escaped");
    }
    assert!(html.contains("<title>&lt;em&gt;T&lt;/em&gt;</title>"));
    assert!(html.contains("<h1>&lt;em&gt;T&lt;/em&gt;</h1>"));
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; more"));
    assert!(html.contains("<td>&lt;b&gt;x&amp;y&lt;/b&gt;</td>"));
    assert!(chart(&html).contains("&lt;b&gt;x&amp;y&lt;/b&gt;"), "escaped in the chart too");
    assert!(html.contains("<figcaption>&lt;i&gt;grid&lt;/i&gt;</figcaption>"));
    assert!(html.contains("alt=\"&lt;i&gt;grid&lt;/i&gt;\""));
    assert_eq!(escape("a\"b'c"), "a&quot;b&#39;c");
}

#[test]
fn empty_results_and_bad_inputs_are_refused() {
    let mut r = results(["none", "diffii", "img2img"]);
    r.methods.clear();
    let e = render(&input(&r, &[], &[])).unwrap_err().to_string();
    assert!(e.contains("at least one method"), "{e}");

    let r = results(["none", "diffii", "img2img"]);
    let g = vec![Grid { title: "jpeg".into(), png: vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 0, 0, 0] }];
    let e = render(&input(&r, &g, &[])).unwrap_err().to_string();
    assert!(e.contains("`jpeg` is not a PNG"), "{e}");

    let e = render(&ReportInput { chance: Some(10.0), ..input(&r, &[], &[]) }).unwrap_err().to_string();
    assert!(e.contains("[0, 1]"), "{e}");
}

#[test]
fn write_is_render_on_disk() {
    let r = results(["none", "diffii", "img2img"]);
    let (g, s) = (grids(), stages());
    let dir = std::env::temp_dir().join(format!("diffii-report-test-{}", std::process::id()));
    let path = dir.join("sub/report.html");
    write(&path, &input(&r, &g, &s)).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), render(&input(&r, &g, &s)).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `results.md` keeps its exact format: the HTML table and it share one formatter.
#[test]
fn markdown_format_is_unchanged() {
    let r = results(["none", "diffii", "img2img"]);
    let md = markdown(&r);
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(
        lines[0],
        "| method | test acc, val-selected epoch (%) | test acc, last epoch (%) | per seed (val-selected) | synthetic images | dropped by filter | faithfulness (%) | diversity | novelty | generation s | training s |"
    );
    assert_eq!(lines[1], "|---|---|---|---|---|---|---|---|---|---|---|");
    assert_eq!(lines[3], "| diffii | 85.25 +- 1.20 | 84.25 +- 1.20 | 84.4 / 86.1 | 200 | - | 91.3 | 0.88 | 1.23 | 123.4 | 56.8 |");
    assert_eq!(lines[2], "| none | 72.25 +- 1.77 | 71.25 +- 1.77 | 71.0 / 73.5 | 0 | - | - | - | - | 0.0 | 56.8 |");
    assert!(md.ends_with("|\n"));
}

/// Writes a sample report to /tmp/report-sample.html (for a screenshot):
/// `cargo test --test report -- --ignored sample_report`.
#[test]
#[ignore]
fn sample_report() {
    let q = |f: f64, d: f64, n: f64| Some(Quality { faithfulness: f, diversity: d, novelty: n });
    let r = CompareResults {
        classifier: ClassifierSettings::default(),
        selected: vec![],
        seeds: vec![0, 1, 2],
        methods: vec![
            method("none", &[0.612, 0.634, 0.598], 0, None),
            method("classic", &[0.655, 0.641, 0.668], 0, None),
            method("img2img", &[0.671, 0.689, 0.660], 500, q(0.82, 0.74, 0.91)),
            method("real-guidance", &[0.684, 0.672, 0.701], 500, q(0.88, 0.69, 0.85)),
            method("diffii", &[0.724, 0.711, 0.739], 500, q(0.91, 0.93, 1.12)),
        ],
    };
    let g = vec![
        Grid { title: "real shots (5 per class)".into(), png: grid_png(10, 5, 32) },
        Grid { title: "diffii".into(), png: grid_png(10, 4, 32) },
        Grid { title: "img2img".into(), png: grid_png(10, 4, 28) },
    ];
    let s = vec![
        Stage { name: "load model".into(), seconds: 4.2 },
        Stage { name: "concept learning".into(), seconds: 812.5 },
        Stage { name: "generation".into(), seconds: 1430.9 },
        Stage { name: "classifier training".into(), seconds: 377.0 },
    ];
    let inp = ReportInput {
        title: "Diff-II on CIFAR-10, 5 shots per class",
        intro: "Dataset: CIFAR-10 (10 classes), 5 training images per class, 5 validation images per class; the full test set.\n\
                Model: Stable Diffusion 1.5 (fp16), 25 DDIM steps.\n\n\
                Command: diffii compare --data cifar10 --shots 5 --methods none,classic,img2img,real-guidance,diffii --seeds 0,1,2 --out runs/cifar5",
        results: &r,
        grids: &g,
        stages: &s,
        chance: Some(0.1),
    };
    write(std::path::Path::new("/tmp/report-sample.html"), &inp).unwrap();
}

#[test]
fn a_sweep_shows_its_choices_and_none_shows_no_table() {
    let mut r = results(["none", "diffii@guidance=1", "diffii@guidance=3"]);
    let plain = render(&input(&r, &[], &[])).unwrap();
    assert!(!plain.contains("chosen setting"));
    r.selected = diffii::experiment::compare::select(&r.methods);
    assert_eq!(r.selected.len(), 1);
    assert_eq!(r.selected[0].method, "diffii@guidance=1", "higher mean validation accuracy");
    let page = render(&input(&r, &[], &[])).unwrap();
    assert!(page.contains("<td>diffii</td><td>diffii@guidance=1</td><td class=\"num\">2</td>"), "the choice is in the page");
    assert!(markdown(&r).contains("| diffii | diffii@guidance=1 | 2 |"));
}

#[test]
fn group_table_appears_with_groups_and_marks_the_best_worst_group() {
    let mut r = results(["none", "diffii", "da-fusion"]);
    let plain = render(&input(&r, &[], &[])).unwrap();
    assert!(!plain.contains("worst group") && !plain.contains("Worst-group"), "no group table or chart without groups");
    assert_eq!(plain.matches("<svg").count(), 1);
    for (m, worst) in r.methods.iter_mut().zip([0.20, 0.45, 0.30]) {
        m.groups = Some(GroupSummary {
            worst_selected: (worst, 0.01),
            mean_selected: (worst + 0.2, 0.02),
            worst_last: (worst - 0.05, 0.03),
            per_group_selected: vec![("blue footwear".into(), (worst, 0.01)), ("red <tops>".into(), (worst + 0.4, 0.0))],
        });
    }
    let html = render(&input(&r, &[], &[])).unwrap();
    for header in ["worst group (%)", "group mean (%)", "blue footwear (%)", "red &lt;tops&gt; (%)"] {
        assert!(html.contains(header), "{header}");
    }
    assert!(html.contains("<strong>45.00 ± 1.00</strong>"), "the best worst-group mean is bold");
    // A second chart: the worst group per method, its means printed above the bars.
    assert_eq!(html.matches("<svg").count(), 2);
    let worst_chart = &html[html.find("<h2>Worst-group accuracy</h2>").expect("worst-group chart")..];
    let svg = chart(worst_chart);
    assert_eq!(bars(svg), 3);
    for v in ["20.00", "45.00", "30.00"] {
        assert!(svg.contains(&format!(">\n{v}\n</text>")), "{v} above its bar");
    }
    assert_eq!(html.matches("<strong>").count(), 2, "one bold cell per table");
    let md = diffii::experiment::compare::markdown(&r);
    assert!(md.contains("| diffii | 85.25 +- 1.20 | 65.00 +- 2.00 | 45.00 +- 1.00 | 40.00 +- 3.00 | 45.00 +- 1.00 | 85.00 +- 0.00 |"), "{md}");
}
