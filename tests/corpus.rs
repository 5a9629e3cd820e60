//! The bad-input corpus: every command fed broken, hostile or merely unusual input, each case
//! with its expected outcome. A failing case must exit non-zero with a message that names the
//! problem (and the file at fault); a documented fallback must succeed. Whatever the outcome,
//! no case may panic, abort or be killed by a signal: [`run_case`] checks that for every case.
//!
//! All inputs are made here, at run time, in temporary folders. Cases are grouped by category
//! (the `cat` field; one builder function per category) so that the report can count them.
//! Most cases fail before any model is loaded; those that load the tiny model cost about a
//! second each in a debug build.
mod common;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::TempDir;

/// What a case must do.
enum Expect {
    /// Non-zero exit; stderr holds every part.
    Fails(Vec<String>),
    /// Exit 0; stdout + stderr hold every part (a documented fallback).
    Works(Vec<String>),
}

struct Case {
    cat: &'static str,
    name: String,
    args: Vec<OsString>,
    /// Wraps the command in `sh -c 'ulimit -f N; exec ...'` (a file-size limit).
    fsize_limit_blocks: Option<u64>,
    expect: Expect,
}

fn fails(cat: &'static str, name: &str, args: Vec<OsString>, parts: &[&str]) -> Case {
    Case { cat, name: name.into(), args, fsize_limit_blocks: None, expect: Expect::Fails(parts.iter().map(|s| s.to_string()).collect()) }
}

fn works(cat: &'static str, name: &str, args: Vec<OsString>, parts: &[&str]) -> Case {
    Case { cat, name: name.into(), args, fsize_limit_blocks: None, expect: Expect::Works(parts.iter().map(|s| s.to_string()).collect()) }
}

/// Builds an argument list from strings and paths.
macro_rules! args {
    ($($a:expr),* $(,)?) => {{
        let mut v: Vec<OsString> = Vec::new();
        $( v.push(OsString::from($a)); )*
        v
    }};
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Runs one case; returns a description of how it went wrong, if it did.
fn run_case(c: &Case) -> Option<String> {
    let bin = env!("CARGO_BIN_EXE_diffii");
    let mut cmd = match c.fsize_limit_blocks {
        None => {
            let mut cmd = Command::new(bin);
            cmd.args(&c.args);
            cmd
        }
        Some(blocks) => {
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(format!("ulimit -f {blocks}; exec \"$0\" \"$@\"")).arg(bin).args(&c.args);
            cmd
        }
    };
    // Keep every case on one thread: two cores are shared by the whole test run.
    cmd.env("RAYON_NUM_THREADS", "1");
    let t0 = std::time::Instant::now();
    let o = cmd.output().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let (out, err) = (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string());
    let shown = format!("args: {:?}\n  exit: {:?} ({secs:.1} s)\n  stderr: {}", c.args, o.status, err.trim());
    if std::env::var_os("CORPUS_VERBOSE").is_some() {
        eprintln!("[{}] {} ({secs:.1} s): {}", c.cat, c.name, err.trim().lines().last().unwrap_or(""));
    }
    // The invariants of every case: no panic, no abort, no death by signal.
    if err.contains("panicked at") || o.status.code() == Some(101) {
        return Some(format!("PANIC\n  {shown}"));
    }
    if o.status.code().is_none() {
        return Some(format!("KILLED BY A SIGNAL\n  {shown}"));
    }
    match &c.expect {
        Expect::Fails(parts) => {
            if o.status.success() {
                return Some(format!("should fail but succeeded\n  {shown}\n  stdout: {}", out.trim()));
            }
            let missing: Vec<&String> = parts.iter().filter(|p| !err.contains(p.as_str())).collect();
            if !missing.is_empty() {
                return Some(format!("stderr lacks {missing:?}\n  {shown}"));
            }
        }
        Expect::Works(parts) => {
            if !o.status.success() {
                return Some(format!("should succeed\n  {shown}"));
            }
            let both = format!("{out}\n{err}");
            let missing: Vec<&String> = parts.iter().filter(|p| !both.contains(p.as_str())).collect();
            if !missing.is_empty() {
                return Some(format!("output lacks {missing:?}\n  {shown}\n  stdout: {}", out.trim()));
            }
        }
    }
    None
}

// ------------------------------------------------------------------------------------------
// input makers
// ------------------------------------------------------------------------------------------

fn rgb(w: u32, h: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let v = (x * 7 + y * 13 + seed * 31) % 256;
        image::Rgb([v as u8, ((v + 80 * seed) % 256) as u8, (255 - v) as u8])
    })
}

fn png_bytes(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let mut v = Vec::new();
    image::DynamicImage::ImageRgb8(rgb(w, h, seed)).write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png).unwrap();
    v
}

fn write(p: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

/// An ImageFolder with `n` 16 px images in each named class.
fn folder(root: &Path, classes: &[(&str, usize)]) -> PathBuf {
    for (i, (c, n)) in classes.iter().enumerate() {
        for k in 0..*n {
            write(&root.join(c).join(format!("img{k}.png")), &png_bytes(16, 16, (i * 10 + k) as u32));
        }
    }
    root.to_path_buf()
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend(data);
    out.extend(&body);
    out.extend(crc32(&body).to_be_bytes());
}

/// zlib stream of stored (uncompressed) blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(65535).collect() };
    for (i, c) in chunks.iter().enumerate() {
        out.push(u8::from(i + 1 == chunks.len()));
        out.extend((c.len() as u16).to_le_bytes());
        out.extend((!(c.len() as u16)).to_le_bytes());
        out.extend(*c);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    out.extend(((b << 16) | a).to_be_bytes());
    out
}

/// A PNG from raw parts: IHDR fields, extra chunks before IDAT, and the raw scanlines.
fn raw_png(w: u32, h: u32, depth: u8, color: u8, extra: &[(&[u8; 4], Vec<u8>)], scanlines: &[u8]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([depth, color, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    for (k, d) in extra {
        png_chunk(&mut out, k, d);
    }
    png_chunk(&mut out, b"IDAT", &zlib_stored(scanlines));
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// An 8x8 palette PNG with a tRNS chunk (two colours, one fully transparent).
fn palette_png() -> Vec<u8> {
    let mut lines = Vec::new();
    for y in 0..8u8 {
        lines.push(0); // filter: none
        lines.extend((0..8u8).map(|x| (x + y) % 2));
    }
    raw_png(8, 8, 8, 3, &[(b"PLTE", vec![255, 0, 0, 0, 0, 255]), (b"tRNS", vec![0])], &lines)
}

/// A PNG whose header declares 100000 x 100000 RGB pixels (30 GB decoded) over a few bytes.
fn bomb_png() -> Vec<u8> {
    raw_png(100_000, 100_000, 8, 2, &[], &[0, 1, 2, 3])
}

/// A baseline 8x8 Adobe CMYK JPEG (4 components, every sample 128: only DC codes of category 0).
fn cmyk_jpeg() -> Vec<u8> {
    let mut j = vec![0xff, 0xd8];
    let seg = |j: &mut Vec<u8>, marker: u8, body: &[u8]| {
        j.extend([0xff, marker]);
        j.extend(((body.len() + 2) as u16).to_be_bytes());
        j.extend(body);
    };
    // APP14 "Adobe", version 100, flags, transform 0 (CMYK, no colour transform).
    seg(&mut j, 0xee, &[b'A', b'd', b'o', b'b', b'e', 0, 100, 0, 0, 0, 0, 0]);
    let mut dqt = vec![0u8];
    dqt.extend([1u8; 64]);
    seg(&mut j, 0xdb, &dqt);
    let mut sof = vec![8, 0, 8, 0, 8, 4];
    for id in 1..=4u8 {
        sof.extend([id, 0x11, 0]);
    }
    seg(&mut j, 0xc0, &sof);
    // One code of length 1 per table: DC category 0 and AC end-of-block.
    for class in [0x00u8, 0x10] {
        let mut dht = vec![class, 1];
        dht.extend([0u8; 15]);
        dht.push(0);
        seg(&mut j, 0xc4, &dht);
    }
    let mut sos = vec![4];
    for id in 1..=4u8 {
        sos.extend([id, 0x00]);
    }
    sos.extend([0, 63, 0]);
    seg(&mut j, 0xda, &sos);
    j.push(0x00); // 4 blocks x (DC "0" + EOB "0") = 8 bits
    j.extend([0xff, 0xd9]);
    j
}

/// A two-frame looping GIF89a.
fn animated_gif() -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend([1, 0, 1, 0, 0x80, 0, 0, 0, 0, 0, 255, 255, 255]);
    g.extend([0x21, 0xff, 0x0b]);
    g.extend(b"NETSCAPE2.0");
    g.extend([3, 1, 0, 0, 0]);
    for _ in 0..2 {
        g.extend([0x21, 0xf9, 4, 0, 10, 0, 0, 0]);
        g.extend([0x2c, 0, 0, 0, 0, 1, 0, 1, 0, 0, 2, 2, 0x44, 0x01, 0]);
    }
    g.push(0x3b);
    g
}


/// A copy of the tiny model named `name` under `root`, changed by `edit`.
fn model_copy(root: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let m = root.join("models").join(name);
    common::copy_dir(&common::tiny_sd(), &m);
    edit(&m);
    m
}

const UNET: &str = "unet/diffusion_pytorch_model.safetensors";

/// Rewrites a safetensors file with one tensor replaced.
fn replace_tensor(file: &Path, key: &str, f: impl FnOnce(&candle_core::Tensor) -> candle_core::Tensor) {
    let mut t = candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap();
    let new = f(t.get(key).unwrap_or_else(|| panic!("no {key} in {}", file.display())));
    t.insert(key.into(), new);
    candle_core::safetensors::save(&t, file).unwrap();
}

/// A safetensors file from a raw JSON header and data bytes.
fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend(header.as_bytes());
    v.extend(data);
    v
}

// ------------------------------------------------------------------------------------------
// the command lines under test
// ------------------------------------------------------------------------------------------

/// `head`, then the `defaults` pairs whose flag `extra` does not set, then `extra`.
fn command(head: Vec<OsString>, defaults: &[(&str, &str)], extra: &[&str]) -> Vec<OsString> {
    let mut v = head;
    for (k, val) in defaults {
        if !extra.iter().any(|e| e == k || e.starts_with(&format!("{k}="))) {
            v.extend([OsString::from(k), OsString::from(val)]);
        }
    }
    v.extend(extra.iter().map(OsString::from));
    v.push("--quiet".into());
    v
}

/// A classifier run small enough to finish in well under a second.
fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<OsString> {
    command(args!["train", "--data", data, "--out", out], &[("--epochs", "1"), ("--size", "8"), ("--batch", "2"), ("--val-per-class", "0")], extra)
}

fn invert_args(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<OsString> {
    command(args!["invert", "--model", model, "--data", data, "--out", out], &[("--size", "16"), ("--inversion-steps", "1"), ("--superclass", "bird")], extra)
}

fn generate_args(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<OsString> {
    let defaults = [("--size", "16"), ("--inversion-steps", "2"), ("--steps", "2"), ("--per-class", "1"), ("--superclass", "bird")];
    command(args!["generate", "--model", model, "--data", data, "--out", out], &defaults, extra)
}

fn augment_args(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<OsString> {
    let defaults = [("--size", "16"), ("--inversion-steps", "2"), ("--steps", "2"), ("--per-class", "1"), ("--superclass", "bird")];
    command(args!["augment", "--model", model, "--data", data, "--out", out], &defaults, extra)
}

fn concepts_args(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<OsString> {
    command(args!["concepts", "--model", model, "--data", data, "--out", out], &[("--superclass", "bird"), ("--steps", "1"), ("--resolution", "16")], extra)
}

fn pretrain_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<OsString> {
    command(args!["pretrain", "--data", data, "--out", out], &[("--arch", "tiny"), ("--vae-steps", "1"), ("--unet-steps", "1")], extra)
}

fn compare_args(model: &Path, data: &Path, test: &Path, out: &Path, extra: &[&str]) -> Vec<OsString> {
    let defaults = [("--methods", "none"), ("--epochs", "1"), ("--size", "8"), ("--val-per-class", "0")];
    command(args!["compare", "--model", model, "--data", data, "--test", test, "--out", out], &defaults, extra)
}

// ------------------------------------------------------------------------------------------
// the cases, by category
// ------------------------------------------------------------------------------------------

/// Image files that are broken, hostile or unusual (decoded by `train` and `invert`).
fn images(t: &Path) -> Vec<Case> {
    let mut v = Vec::new();
    let mut one = |name: &str, file: &str, bytes: Vec<u8>, ok: bool, parts: &[&str]| {
        let d = t.join("img").join(name);
        folder(&d, &[("gull", 2), ("sparrow", 2)]);
        write(&d.join("sparrow").join(file), &bytes);
        let a = train_args(&d, &t.join("img-out").join(name), &[]);
        v.push(if ok { works("images", name, a, parts) } else { fails("images", name, a, parts) });
    };
    let good = png_bytes(16, 16, 5);
    one("truncated-png", "half.png", good[..good.len() / 2].to_vec(), false, &["half.png", "cannot decode image"]);
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    for b in &mut corrupt[mid..mid + 8] {
        *b ^= 0x5a;
    }
    one("corrupt-png", "bitrot.png", corrupt, false, &["bitrot.png", "cannot decode image"]);
    one("zero-byte", "empty.png", Vec::new(), false, &["empty.png", "not a recognised image"]);
    one("text-as-jpeg", "notes.jpg", b"this is not a picture\n".to_vec(), false, &["notes.jpg", "not a recognised image"]);
    one("decompression-bomb", "bomb.png", bomb_png(), false, &["bomb.png", "100000x100000", "limit"]);
    one("cmyk-jpeg", "cmyk.jpg", cmyk_jpeg(), true, &["seed 0"]);
    let mut png16 = Vec::new();
    let img16 = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(16, 16, |x, y| image::Rgb([(x * 4000) as u16, (y * 4000) as u16, 999]));
    image::DynamicImage::ImageRgb16(img16).write_to(&mut std::io::Cursor::new(&mut png16), image::ImageFormat::Png).unwrap();
    one("16-bit-png", "deep.png", png16, true, &["seed 0"]);
    one("palette-trns-png", "palette.png", palette_png(), true, &["seed 0"]);
    one("animated-gif-as-png", "anim.png", animated_gif(), false, &["anim.png", "Gif"]);
    // A .gif is not an image extension: ignored, so this class has only its two PNGs.
    one("animated-gif-ignored", "anim.gif", animated_gif(), true, &["seed 0"]);
    // The same bytes through the model path (inversion decodes them on its own).
    let d = t.join("img").join("bomb-invert");
    folder(&d, &[("gull", 1), ("sparrow", 1)]);
    write(&d.join("sparrow/bomb.png"), &bomb_png());
    v.push(fails("images", "decompression-bomb-invert", invert_args(&common::tiny_sd(), &d, &t.join("img-out/bomb-invert"), &[]), &["bomb.png", "100000x100000"]));
    // Every command that decodes images names the broken one.
    let d = t.join("img").join("truncated-other");
    folder(&d, &[("gull", 2), ("sparrow", 2)]);
    let good = png_bytes(16, 16, 5);
    write(&d.join("gull/cut.png"), &good[..good.len() / 3]);
    let out = |n: &str| t.join("img-out").join(n);
    v.push(fails("images", "truncated-png-concepts", concepts_args(&common::tiny_sd(), &d, &out("cut-c"), &[]), &["gull/cut.png", "cannot decode image"]));
    v.push(fails("images", "truncated-png-pretrain", pretrain_args(&d, &out("cut-p"), &[]), &["gull/cut.png", "cannot decode image"]));
    v.push(fails("images", "truncated-png-augment", augment_args(&common::tiny_sd(), &d, &out("cut-a"), &[]), &["gull/cut.png", "cannot decode image"]));
    v
}

/// Dataset folders of the wrong shape.
fn datasets(t: &Path) -> Vec<Case> {
    let root = t.join("ds");
    let mut v = Vec::new();
    let out = |n: &str| t.join("ds-out").join(n);

    let d = root.join("empty-class");
    folder(&d, &[("gull", 2), ("sparrow", 2)]);
    std::fs::create_dir_all(d.join("owl")).unwrap();
    v.push(fails("datasets", "empty-class-folder", train_args(&d, &out("a"), &[]), &["`owl`", "contain no images"]));

    let d = folder(&root.join("one-class"), &[("gull", 4)]);
    v.push(fails("datasets", "one-class", train_args(&d, &out("b"), &[]), &["one class", "gull", "at least two"]));

    let d = folder(&root.join("one-image"), &[("gull", 1), ("sparrow", 3)]);
    v.push(fails("datasets", "class-with-one-image-val", train_args(&d, &out("c"), &["--val-per-class", "1"]), &["gull"]));
    v.push(works("datasets", "class-with-one-image", train_args(&d, &out("c2"), &[]), &["seed 0"]));
    v.push(works("datasets", "class-with-one-image-generate", generate_args(&common::tiny_sd(), &d, &out("c3"), &[]), &["class `gull` has one image", "written 2"]));

    let d = root.join("no-classes");
    write(&d.join("a.png"), &png_bytes(8, 8, 1));
    v.push(fails("datasets", "images-without-class-folders", train_args(&d, &out("d"), &[]), &["no-classes", "no class folders"]));

    v.push(fails("datasets", "missing-dataset", train_args(&root.join("nope"), &out("e"), &[]), &["nope", "not found"]));

    let d = folder(&root.join("unicode"), &[("gull", 2), ("sparrow", 2)]);
    std::fs::create_dir_all(d.join("möwe 🐦")).unwrap();
    write(&d.join("möwe 🐦/bild ä.png"), &png_bytes(16, 16, 9));
    write(&d.join("möwe 🐦/2.png"), &png_bytes(16, 16, 8));
    v.push(works("datasets", "unicode-names", train_args(&d, &out("f"), &[]), &["seed 0"]));

    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let d = folder(&root.join("non-utf8"), &[("gull", 2), ("sparrow", 2)]);
        let bad = std::ffi::OsStr::from_bytes(b"caf\xe9.png");
        write(&d.join("gull").join(bad), &png_bytes(16, 16, 3));
        v.push(fails("datasets", "non-utf8-file-name", train_args(&d, &out("g"), &[]), &["caf", "not valid UTF-8", "rename it"]));

        let d = folder(&root.join("loop"), &[("gull", 2), ("sparrow", 2)]);
        std::os::unix::fs::symlink(d.join("gull"), d.join("gull/again")).unwrap();
        std::os::unix::fs::symlink(d.join("sparrow/x"), d.join("sparrow/y")).unwrap();
        std::os::unix::fs::symlink(d.join("sparrow/y"), d.join("sparrow/x")).unwrap();
        // A folder that links to itself is read once; a dangling link pair is skipped.
        v.push(works("datasets", "symlink-loops", train_args(&d, &out("h"), &[]), &["4 real"]));
    }

    let d = folder(&root.join("names"), &[("gull", 2), ("sparrow", 2)]);
    let names = root.join("names.txt");
    write(&names, b"gull\nsparrow\ngull\n");
    v.push(fails("datasets", "duplicate-class-name", train_args(&d, &out("i"), &["--class-names", &s(&names)]), &["names.txt", "line 3", "duplicate class name"]));
    let names2 = root.join("names2.txt");
    write(&names2, b"gull\n");
    v.push(fails("datasets", "unlisted-class-folder", train_args(&d, &out("j"), &["--class-names", &s(&names2)]), &["names2.txt", "`sparrow`", "not listed"]));

    // Test set with other classes than the training set.
    let test = folder(&root.join("test-other"), &[("gull", 2), ("owl", 2)]);
    v.push(fails("datasets", "test-classes-differ", train_args(&d, &out("k"), &["--test", &s(&test)]), &["differ", "owl"]));
    v
}

/// List files (`<path> <label>` lines).
fn list_files(t: &Path) -> Vec<Case> {
    let root = t.join("lists");
    folder(&root, &[("gull", 2), ("sparrow", 2)]);
    let mut v = Vec::new();
    let out = |n: &str| t.join("list-out").join(n);
    let mut list = |name: &str, text: &[u8], ok: bool, parts: &[&str]| {
        let p = root.join(format!("{name}.txt"));
        write(&p, text);
        let a = train_args(&p, &out(name), &[]);
        v.push(if ok { works("list files", name, a, parts) } else { fails("list files", name, a, parts) });
    };
    let good = "gull/img0.png gull\ngull/img1.png gull\nsparrow/img0.png sparrow\nsparrow/img1.png sparrow\n";
    list("missing-path", format!("{good}sparrow/nope.png sparrow\n").as_bytes(), false, &["missing-path.txt", "line 5", "nope.png", "not found"]);
    list("no-label", b"gull/img0.png\n", false, &["no-label.txt", "line 1", "no label"]);
    list("bad-label", format!("{good}gull/img0.png ../x\n").as_bytes(), false, &["bad-label.txt", "line 5", "cannot be used"]);
    list("duplicate", format!("{good}gull/img1.png gull\n").as_bytes(), false, &["duplicate.txt", "line 5", "already listed on line 2"]);
    list("crlf", good.replace('\n', "\r\n").as_bytes(), true, &["4 real"]);
    list("bom-and-comments", format!("\u{feff}# header\n\n{good}").as_bytes(), true, &["4 real"]);
    list("empty", b"\n# nothing\n", false, &["empty.txt", "no entries"]);
    list("not-utf8", b"gull/img0.png gu\xffll\n", false, &["not-utf8.txt", "not UTF-8"]);
    list("directory-as-image", format!("{good}gull sparrow\n").as_bytes(), false, &["directory-as-image.txt", "line 5", "not a file"]);
    // Index labels need a class-names file; an out-of-range index is named.
    let names = root.join("classes.txt");
    write(&names, b"gull\nsparrow\n");
    let p = root.join("index.txt");
    write(&p, b"gull/img0.png 0\ngull/img1.png 0\nsparrow/img0.png 7\n");
    v.push(fails("list files", "label-index-out-of-range", train_args(&p, &out("idx"), &["--class-names", &s(&names)]), &["index.txt", "line 3", "out of range"]));
    v
}

/// Model folders with missing, mismatched or corrupt components.
fn models(t: &Path) -> Vec<Case> {
    let root = t.join("model-cases");
    let data = folder(&root.join("data"), &[("gull", 1), ("sparrow", 1)]);
    let out = |n: &str| t.join("model-out").join(n);
    let mut v = Vec::new();
    let info = |m: &Path| args!["info", "--model", m];

    v.push(fails("models", "model-folder-missing", info(&root.join("nope")), &["nope"]));
    let m = model_copy(&root, "no-unet-config", |m| std::fs::remove_file(m.join("unet/config.json")).unwrap());
    v.push(fails("models", "missing-unet-config", info(&m), &["unet/config.json"]));
    let m = model_copy(&root, "bad-vae-config", |m| write(&m.join("vae/config.json"), b"{\"latent_channels\": \"four\""));
    v.push(fails("models", "malformed-vae-config", invert_args(&m, &data, &out("a"), &[]), &["vae/config.json", "JSON"]));
    let m = model_copy(&root, "no-unet-weights", |m| std::fs::remove_file(m.join(UNET)).unwrap());
    v.push(fails("models", "missing-unet-weights", invert_args(&m, &data, &out("b"), &[]), &["unet"]));

    let m = model_copy(&root, "wrong-shape", |m| {
        replace_tensor(&m.join(UNET), "conv_in.weight", |w| w.narrow(0, 0, 16).unwrap().contiguous().unwrap())
    });
    v.push(fails("models", "wrong-tensor-shape", invert_args(&m, &data, &out("c"), &[]), &["diffusion_pytorch_model.safetensors", "conv_in.weight", "shape"]));
    let m = model_copy(&root, "wrong-dtype", |m| {
        replace_tensor(&m.join(UNET), "conv_in.weight", |w| w.to_dtype(candle_core::DType::U8).unwrap())
    });
    v.push(fails("models", "integer-dtype", invert_args(&m, &data, &out("d"), &[]), &["conv_in.weight", "dtype U8"]));
    let m = model_copy(&root, "nan-text", |m| {
        let f = m.join("text_encoder/model.safetensors");
        let key = candle_core::safetensors::load(&f, &candle_core::Device::Cpu)
            .unwrap()
            .into_keys()
            .find(|k| k.contains("final_layer_norm.bias"))
            .unwrap();
        replace_tensor(&f, &key, |w| (w.ones_like().unwrap() * f64::NAN).unwrap())
    });
    v.push(fails("models", "nan-weights", invert_args(&m, &data, &out("e"), &[]), &["NaN or infinite"]));
    let m = model_copy(&root, "inf-vae", |m| {
        replace_tensor(&m.join("vae/diffusion_pytorch_model.safetensors"), "encoder.conv_in.bias", |w| (w.ones_like().unwrap() * f64::INFINITY).unwrap())
    });
    v.push(fails("models", "inf-weights", invert_args(&m, &data, &out("f"), &[]), &["NaN or infinite"]));

    let m = model_copy(&root, "truncated", |m| {
        let f = m.join(UNET);
        let b = std::fs::read(&f).unwrap();
        std::fs::write(&f, &b[..b.len() / 2]).unwrap();
    });
    v.push(fails("models", "truncated-safetensors", info(&m), &["diffusion_pytorch_model.safetensors"]));
    v.push(fails("models", "truncated-safetensors-load", invert_args(&m, &data, &out("g"), &[]), &["diffusion_pytorch_model.safetensors", "safetensors"]));
    let m = model_copy(&root, "lying-offsets", |m| {
        write(&m.join(UNET), &raw_safetensors(r#"{"conv_in.weight":{"dtype":"F32","shape":[32,4,3,3],"data_offsets":[0,4608]}}"#, &[0u8; 64]))
    });
    v.push(fails("models", "header-lies-about-offsets", invert_args(&m, &data, &out("h"), &[]), &["diffusion_pytorch_model.safetensors"]));
    let m = model_copy(&root, "overlap", |m| {
        write(
            &m.join(UNET),
            &raw_safetensors(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#, &[0u8; 24]),
        )
    });
    v.push(fails("models", "overlapping-ranges", invert_args(&m, &data, &out("i"), &[]), &["diffusion_pytorch_model.safetensors"]));
    let m = model_copy(&root, "huge-header", |m| {
        let mut b = (1u64 << 60).to_le_bytes().to_vec();
        b.extend(b"{}");
        write(&m.join(UNET), &b);
    });
    v.push(fails("models", "huge-header-length", info(&m), &["diffusion_pytorch_model.safetensors"]));
    v.push(fails("models", "huge-header-length-load", invert_args(&m, &data, &out("j"), &[]), &["diffusion_pytorch_model.safetensors"]));

    let m = model_copy(&root, "no-vocab", |m| {
        std::fs::remove_file(m.join("tokenizer/vocab.json")).unwrap();
        let _ = std::fs::remove_file(m.join("tokenizer/tokenizer.json"));
    });
    v.push(fails("models", "tokenizer-missing", invert_args(&m, &data, &out("k"), &[]), &["tokenizer"]));
    let m = model_copy(&root, "bad-merges", |m| {
        write(&m.join("tokenizer/merges.txt"), b"#version: 0.2\nthis line has three\n\xff\xfe\n");
        let _ = std::fs::remove_file(m.join("tokenizer/tokenizer.json"));
    });
    v.push(fails("models", "tokenizer-malformed", invert_args(&m, &data, &out("l"), &[]), &["merges.txt"]));
    let m = model_copy(&root, "bad-vocab", |m| {
        write(&m.join("tokenizer/vocab.json"), b"[1, 2, 3]");
        let _ = std::fs::remove_file(m.join("tokenizer/tokenizer.json"));
    });
    v.push(fails("models", "tokenizer-vocab-not-a-map", invert_args(&m, &data, &out("m"), &[]), &["vocab.json"]));
    v
}

/// Concept files (textual-inversion rows, class maps, official pickles).
fn concepts(t: &Path) -> Vec<Case> {
    use candle_core::{Device, Tensor};
    let root = t.join("concept-cases");
    let data = folder(&root.join("data"), &[("gull", 1), ("sparrow", 1)]);
    let out = |n: &str| t.join("concept-out").join(n);
    let tiny = common::tiny_sd();
    let mut v = Vec::new();
    let save = |p: &Path, rows: &[(&str, Tensor)]| {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let m: std::collections::HashMap<String, Tensor> = rows.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
        candle_core::safetensors::save(&m, p).unwrap();
    };
    let row = |w: usize| Tensor::ones(w, candle_core::DType::F32, &Device::Cpu).unwrap();

    let p = root.join("unknown/learned_embeds.safetensors");
    save(&p, &[("<foo>", row(32)), ("<bar>", row(32))]);
    v.push(fails("concepts", "tokens-for-no-class", generate_args(&tiny, &data, &out("a"), &["--concepts", &s(&p)]), &["gull"]));
    let p = root.join("narrow/learned_embeds.safetensors");
    save(&p, &[("<cls0>", row(16)), ("<cls1>", row(16))]);
    v.push(fails("concepts", "row-of-wrong-width", generate_args(&tiny, &data, &out("b"), &["--concepts", &s(&p)]), &["narrow/learned_embeds.safetensors", "<cls"]));
    let p = root.join("nan/learned_embeds.safetensors");
    save(&p, &[("<cls0>", (row(32) * f64::NAN).unwrap()), ("<cls1>", row(32))]);
    v.push(fails("concepts", "nan-row", generate_args(&tiny, &data, &out("c"), &["--concepts", &s(&p)]), &["nan/learned_embeds.safetensors", "<cls0>"]));
    let p = root.join("map/learned_embeds.safetensors");
    save(&p, &[("<cls0>", row(32)), ("<cls1>", row(32))]);
    let cm = root.join("map/bad-map.json");
    write(&cm, br#"{"gull": "<cls9>", "sparrow": "<cls0>"}"#);
    v.push(fails("concepts", "class-map-unknown-token", generate_args(&tiny, &data, &out("d"), &["--concepts", &s(&p), "--class-map", &s(&cm)]), &["bad-map.json", "<cls9>"]));
    let cm2 = root.join("map/not-json.json");
    write(&cm2, b"gull: <cls0>\n");
    v.push(fails("concepts", "class-map-not-json", generate_args(&tiny, &data, &out("e"), &["--concepts", &s(&p), "--class-map", &s(&cm2)]), &["not-json.json"]));
    let p = root.join("garbage/learned_embeds.safetensors");
    write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!");
    v.push(fails("concepts", "garbage-safetensors", generate_args(&tiny, &data, &out("f"), &["--concepts", &s(&p)]), &["garbage/learned_embeds.safetensors"]));

    // A pickle that would run `os.system` if it were unpickled by Python.
    let marker = root.join("pwned");
    let cmd = format!("touch {}", marker.display());
    let mut pk = b"\x80\x02cposix\nsystem\nq\x00X".to_vec();
    pk.extend((cmd.len() as u32).to_le_bytes());
    pk.extend(cmd.as_bytes());
    pk.extend(b"\x85q\x01Rq\x02.");
    let raw = root.join("evil/learned_embeds-steps-1.bin");
    write(&raw, &pk);
    v.push(fails("concepts", "malicious-pickle-raw", generate_args(&tiny, &data, &out("g"), &["--concepts", &s(&raw)]), &["learned_embeds-steps-1.bin", "not a torch.save archive"]));
    let zipped = root.join("evil-zip/learned_embeds-steps-2.bin");
    std::fs::create_dir_all(zipped.parent().unwrap()).unwrap();
    {
        let f = std::fs::File::create(&zipped).unwrap();
        let mut z = zip::ZipWriter::new(f);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opts).unwrap();
        z.write_all(&pk).unwrap();
        z.finish().unwrap();
    }
    v.push(fails("concepts", "malicious-pickle-zip", generate_args(&tiny, &data, &out("h"), &["--concepts", &s(&zipped)]), &["learned_embeds-steps-2.bin", "posix"]));
    let trunc = root.join("trunc/learned_embeds-steps-3.bin");
    write(&trunc, &pk[..pk.len() / 2]);
    v.push(fails("concepts", "truncated-pickle", generate_args(&tiny, &data, &out("i"), &["--concepts", &s(&trunc)]), &["learned_embeds-steps-3.bin"]));
    v
}

/// Prompts and suffix files.
fn prompts(t: &Path) -> Vec<Case> {
    let root = t.join("prompt-cases");
    let data = folder(&root.join("data"), &[("gull", 1), ("sparrow", 1)]);
    let out = |n: &str| t.join("prompt-out").join(n);
    let tiny = common::tiny_sd();
    let mut v = Vec::new();
    let long = vec!["very"; 90].join(" ");
    v.push(fails("prompts", "superclass-over-77-tokens", generate_args(&tiny, &data, &out("a"), &["--superclass", &long]), &["77", "tokens"]));
    let template = format!("{long} {{concept}} {{superclass}}");
    v.push(fails("prompts", "concept-token-cut-off", generate_args(&tiny, &data, &out("b"), &["--prompt-template", &template]), &["77", "tokens"]));
    let suffixes = root.join("long-suffix.txt");
    write(&suffixes, format!("in the snow\n{long}\n").as_bytes());
    v.push(fails("prompts", "suffix-over-77-tokens", generate_args(&tiny, &data, &out("c"), &["--suffixes", &s(&suffixes)]), &["77", "tokens", "very very"]));
    let empty = root.join("empty.txt");
    write(&empty, b"");
    v.push(works("prompts", "empty-suffix-file", generate_args(&tiny, &data, &out("d"), &["--suffixes", &s(&empty)]), &["no suffix lines", "written 2"]));
    let bad = root.join("bad-suffix.txt");
    write(&bad, b"in the \xff snow\n");
    v.push(fails("prompts", "suffix-file-not-utf8", generate_args(&tiny, &data, &out("e"), &["--suffixes", &s(&bad)]), &["bad-suffix.txt"]));
    v.push(fails("prompts", "suffix-file-missing", generate_args(&tiny, &data, &out("f"), &["--suffixes", &s(&root.join("nope.txt"))]), &["nope.txt"]));
    v.push(fails("prompts", "template-without-concept", generate_args(&tiny, &data, &out("g"), &["--prompt-template", "a photo"]), &["{concept}"]));
    v
}

/// Every numeric flag at a value that cannot work.
fn numbers(t: &Path) -> Vec<Case> {
    let root = t.join("num-cases");
    let data = folder(&root.join("data"), &[("gull", 2), ("sparrow", 2)]);
    let fresh = std::cell::Cell::new(0);
    // Each case its own folder: a folder keeps the settings of its first run.
    let out = |_: &str| {
        fresh.set(fresh.get() + 1);
        t.join("num-out").join(fresh.get().to_string())
    };
    let tiny = common::tiny_sd();
    let mut v = Vec::new();
    for (flags, parts) in [
        (vec!["--guidance", "NaN"], vec!["--guidance NaN", "finite"]),
        (vec!["--guidance", "inf"], vec!["--guidance inf", "finite"]),
        (vec!["--steps", "0"], vec!["--steps must be at least 1"]),
        (vec!["--strength", "1.5"], vec!["--strength"]),
        (vec!["--strength=-0.1"], vec!["--strength"]),
        (vec!["--shard", "3/2"], vec!["shard"]),
        (vec!["--shard", "0/0"], vec!["shard"]),
        (vec!["--per-class", "0"], vec!["at least 1"]),
        (vec!["--size", "15"], vec!["15", "VAE factor"]),
        (vec!["--lora-scale", "inf"], vec!["--lora-scale inf"]),
    ] {
        v.push(fails("numeric flags", &format!("generate {}", flags.join(" ")), generate_args(&tiny, &data, &out("g"), &flags), &parts));
    }
    v.push(fails("numeric flags", "augment --strength 2", augment_args(&tiny, &data, &out("a"), &["--strength", "2"]), &["--strength 2 must lie in [0, 1]"]));
    v.push(fails("numeric flags", "augment --shard 2/2", augment_args(&tiny, &data, &out("a"), &["--shard", "2/2"]), &["2/2"]));
    // Documented fallback: a batch of 0 samples per UNet call is taken as 1.
    v.push(fails("numeric flags", "generate --batch 0", generate_args(&tiny, &data, &out("g"), &["--batch", "0"]), &["--batch 0", "at least 1"]));
    // Values clap itself refuses: negative counts, words for numbers.
    v.push(fails("numeric flags", "generate --steps=-1", generate_args(&tiny, &data, &out("g"), &["--steps=-1"]), &["--steps", "-1"]));
    v.push(fails("numeric flags", "invert --inversion-steps 0", invert_args(&tiny, &data, &out("i"), &["--inversion-steps", "0"]), &["--inversion-steps"]));
    for (flags, parts) in [
        (vec!["--epochs", "0"], vec!["--epochs >= 1"]),
        (vec!["--lr", "NaN"], vec!["--lr"]),
        (vec!["--lr=-1"], vec!["--lr"]),
        (vec!["--batch", "1"], vec!["--batch >= 2"]),
        (vec!["--label-smoothing", "1"], vec!["--label-smoothing 1"]),
        (vec!["--crop-scale", "0"], vec!["--crop-scale 0 must lie in (0, 1]"]),
        (vec!["--syn-p", "1.5"], vec!["--syn-p"]),
        (vec!["--imbalance", "0"], vec!["--imbalance"]),
        (vec!["--shots", "0"], vec!["--shots"]),
        (vec!["--seeds", ""], vec!["seed"]),
    ] {
        v.push(fails("numeric flags", &format!("train {}", flags.join(" ")), train_args(&data, &out("t"), &flags), &parts));
    }
    for (flags, parts) in [
        (vec!["--lr", "NaN"], vec!["--lr NaN must be a finite number"]),
        (vec!["--steps", "0"], vec!["--steps"]),
        (vec!["--batch", "0"], vec!["--batch"]),
        (vec!["--lora-rank", "2", "--lora-alpha", "inf"], vec!["--lora-alpha"]),
        (vec!["--resolution", "15"], vec!["--resolution"]),
    ] {
        v.push(fails("numeric flags", &format!("concepts {}", flags.join(" ")), concepts_args(&tiny, &data, &out("c"), &flags), &parts));
    }
    for (flags, parts) in [
        (vec!["--vae-steps", "0"], vec!["--vae-steps"]),
        (vec!["--unet-lr", "NaN"], vec!["--unet-lr"]),
        (vec!["--ema-decay", "1.5"], vec!["--ema-decay"]),
        (vec!["--vae-batch", "0"], vec!["--vae-batch"]),
        (vec!["--arch", "huge"], vec!["huge"]),
    ] {
        v.push(fails("numeric flags", &format!("pretrain {}", flags.join(" ")), pretrain_args(&data, &out("p"), &flags), &parts));
    }
    let test = folder(&root.join("test"), &[("gull", 1), ("sparrow", 1)]);
    v.push(fails("numeric flags", "compare --epochs 0", compare_args(&tiny, &data, &test, &out("cmp"), &["--epochs", "0"]), &["--epochs >= 1"]));
    v.push(fails("numeric flags", "compare --guidance NaN", compare_args(&tiny, &data, &test, &out("cmp2"), &["--methods", "diffii", "--guidance", "NaN"]), &["--guidance NaN"]));
    v.push(fails("numeric flags", "compare --filter-min 2", compare_args(&tiny, &data, &test, &out("cmp3"), &["--methods", "none,diffii", "--filter-min", "2"]), &["--filter-min 2 must lie in [0, 1]"]));
    v.push(fails("numeric flags", "compare --filter-min without none", compare_args(&tiny, &data, &test, &out("cmp4"), &["--methods", "diffii", "--filter-min", "0.5"]), &["add none to the methods"]));
    v.push(fails("numeric flags", "compare --sweep foo=1", compare_args(&tiny, &data, &test, &out("cmp5"), &["--sweep", "foo=1"]), &["sweep key `foo`"]));
    v.push(fails("numeric flags", "compare --sweep steps=0", compare_args(&tiny, &data, &test, &out("cmp6"), &["--sweep", "steps=0"]), &["whole numbers >= 1"]));
    v.push(fails("numeric flags", "compare --methods foo", compare_args(&tiny, &data, &test, &out("cmp7"), &["--methods", "foo"]), &["unknown method `foo`"]));
    v.push(fails("numeric flags", "compare diff-mix --mix-gamma NaN", compare_args(&tiny, &data, &test, &out("cmp8"), &["--methods", "diff-mix", "--mix-gamma", "NaN"]), &["--mix-gamma must be finite"]));
    v.push(fails("numeric flags", "compare diff-mix --mix-gamma -1", compare_args(&tiny, &data, &test, &out("cmp9"), &["--methods", "diff-mix", "--mix-gamma=-1"]), &["--mix-gamma must be finite and > 0"]));
    v.push(fails("numeric flags", "train --pretrained without resnet50", train_args(&data, &out("t2"), &["--pretrained", "x.safetensors"]), &["--pretrained needs --arch resnet50"]));
    v.push(fails("models", "train resnet50 --pretrained missing file", train_args(&data, &out("t3"), &["--arch", "resnet50", "--pretrained", "/nonexistent/r50.safetensors"]), &["/nonexistent/r50.safetensors", "not found"]));
    v.push(fails("other runs' files", "filter with a missing judge", args!["filter", "--synthetic", out("g"), "--judge", out("nojudge"), "--min", "0.5"], &["model.json"]));
    v.push(fails("numeric flags", "demo --strength 2", args!["demo", "--out", out("demo"), "--strength", "2", "--quick", "--quiet"], &["--strength"]));
    v.push(fails("numeric flags", "demo --guidance NaN", args!["demo", "--out", out("demo2"), "--guidance", "NaN", "--quick", "--quiet"], &["--guidance"]));
    v
}

/// Other commands' own inputs: merge manifests, eval models.
fn outputs_of_other_runs(t: &Path) -> Vec<Case> {
    let root = t.join("run-cases");
    let mut v = Vec::new();
    let m = root.join("merge-empty");
    std::fs::create_dir_all(&m).unwrap();
    v.push(fails("other runs' files", "merge-without-shards", args!["merge", "--out", &m], &["merge-empty", "shard"]));
    let m = root.join("merge-bad");
    write(&m.join("manifest.shard-0-of-2.jsonl"), b"{\"not\": \"a record\"}\n");
    write(&m.join("manifest.shard-1-of-2.jsonl"), b"");
    v.push(fails("other runs' files", "merge-bad-record", args!["merge", "--out", &m], &["manifest.shard-0-of-2.jsonl", "line 1"]));
    let m = root.join("merge-trunc");
    write(&m.join("manifest.shard-0-of-1.jsonl"), b"{\"file\": \"gull/a.png\", \"cla");
    v.push(fails("other runs' files", "merge-truncated-line", args!["merge", "--out", &m], &["manifest.shard-0-of-1.jsonl", "line 1"]));
    let data = folder(&root.join("data"), &[("gull", 1), ("sparrow", 1)]);
    v.push(fails("other runs' files", "eval-missing-model", args!["eval", "--model", root.join("no-seed"), "--data", &data], &["no-seed"]));
    let e = root.join("eval-garbage");
    write(&e.join("model.json"), b"{\"classes\": 3}");
    write(&e.join("model.safetensors"), b"");
    v.push(fails("other runs' files", "eval-garbage-model", args!["eval", "--model", &e, "--data", &data], &["eval-garbage", "model.json"]));
    // A model trained here on gull / sparrow, evaluated on other classes.
    let seed_dir = root.join("trained");
    let o = Command::new(env!("CARGO_BIN_EXE_diffii")).args(train_args(&folder(&root.join("train-data"), &[("gull", 2), ("sparrow", 2)]), &seed_dir, &[])).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let other = folder(&root.join("other-classes"), &[("gull", 1), ("owl", 1)]);
    v.push(fails("other runs' files", "eval-other-classes", args!["eval", "--model", seed_dir.join("seed-0"), "--data", &other], &["other-classes", "owl", "differ"]));
    let syn = root.join("synthetic");
    write(&syn.join("manifest.jsonl"), b"garbage\n");
    v.push(fails("other runs' files", "train-synthetic-bad-manifest", train_args(&data, &root.join("t-out"), &["--synthetic", &s(&syn)]), &["manifest.jsonl", "line 1"]));
    let cfg = root.join("reuse");
    write(&cfg.join("train_config.json"), b"{ this is not json");
    v.push(fails("other runs' files", "train-corrupt-config-in-out", train_args(&data, &cfg, &[]), &["train_config.json", "JSON"]));
    v
}

/// Output folders that cannot be written.
fn output_folders(t: &Path) -> Vec<Case> {
    let root = t.join("out-cases");
    let data = folder(&root.join("data"), &[("gull", 2), ("sparrow", 2)]);
    let mut v = Vec::new();
    let file = root.join("a-file");
    write(&file, b"x");
    v.push(fails("output folders", "out-is-a-file", train_args(&data, &file, &[]), &["a-file", "not a folder"]));
    v.push(fails("output folders", "out-under-a-file", train_args(&data, &file.join("sub"), &[]), &["a-file"]));
    v.push(fails("output folders", "invert-out-is-a-file", invert_args(&common::tiny_sd(), &data, &file, &[]), &["a-file", "not a folder"]));

    // Permissions do not bind root: find out by trying, and skip with a note if so.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = root.join("read-only");
        std::fs::create_dir_all(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::write(ro.join("probe"), b"x").is_ok() {
            eprintln!("note: permissions do not bind this user (root?): the read-only output case is skipped");
        } else {
            v.push(fails("output folders", "out-not-writable", train_args(&data, &ro.join("out"), &[]), &["read-only", "ermission denied"]));
        }
    }
    // A full disk, simulated by a file-size limit: writes fail with EFBIG (the signal that
    // would otherwise kill the process is ignored by the binary).
    let mut c = fails("output folders", "file-size-limit-hit", train_args(&data, &root.join("full"), &[]), &["full/seed-0/model.safetensors", "File too large"]);
    c.fsize_limit_blocks = Some(8);
    v.push(c);
    v
}

#[test]
fn every_bad_input_gives_a_clear_outcome() {
    let t = TempDir::new("corpus");
    let mut cases = Vec::new();
    cases.extend(images(t.path()));
    cases.extend(datasets(t.path()));
    cases.extend(list_files(t.path()));
    cases.extend(models(t.path()));
    cases.extend(concepts(t.path()));
    cases.extend(prompts(t.path()));
    cases.extend(numbers(t.path()));
    cases.extend(outputs_of_other_runs(t.path()));
    cases.extend(output_folders(t.path()));

    let filter = std::env::var("CORPUS_FILTER").unwrap_or_default();
    let t0 = std::time::Instant::now();
    let mut failures = Vec::new();
    let mut ran = 0;
    for c in cases.iter().filter(|c| c.name.contains(&filter) || c.cat.contains(&filter)) {
        ran += 1;
        if let Some(why) = run_case(c) {
            failures.push(format!("[{}] {}: {why}", c.cat, c.name));
        }
    }
    let mut by_cat: Vec<(&str, usize)> = Vec::new();
    for c in &cases {
        match by_cat.iter_mut().find(|(k, _)| *k == c.cat) {
            Some((_, n)) => *n += 1,
            None => by_cat.push((c.cat, 1)),
        }
    }
    eprintln!("corpus: {ran} of {} cases in {:.0} s; by category: {by_cat:?}", cases.len(), t0.elapsed().as_secs_f64());
    // The pickle case's Python payload would have created this file.
    assert!(!t.join("concept-cases/pwned").exists(), "a pickle was executed");
    assert!(failures.is_empty(), "{} of {ran} cases went wrong:\n\n{}", failures.len(), failures.join("\n\n"));
    assert!(filter.is_empty() || ran > 0, "CORPUS_FILTER={filter} matches no case");
    assert!(cases.len() >= 60, "the corpus shrank to {} cases", cases.len());
}
