//! The library's layout rules, checked on the source: no import cycles between modules (files),
//! no SD model code calling a compute kernel directly, and the low layers (`kernels`, `nn`)
//! knowing nothing of the models or methods above them.
//!
//! Edges are read from the source text: every `crate::a::b` path (also inside `use` groups),
//! every `super::` path, and `use child::…` re-exports of a `mod.rs`. A path resolves to the
//! longest module prefix that exists, so `crate::nn::Mode` is an edge to `nn` (its `mod.rs`,
//! which re-exports `nn::mode`). Unit-test modules and comments are ignored.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Module path (`a::b`) of every library file except the crate root and the binary's CLI.
fn modules() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().with_extension("");
        let rel = rel.to_string_lossy().replace('\\', "/");
        if rel == "lib" || rel == "main" || rel.starts_with("cli") {
            continue;
        }
        let module = rel.strip_suffix("/mod").unwrap_or(&rel).replace('/', "::");
        let text = std::fs::read_to_string(&f).unwrap();
        out.insert(module, code_only(&text));
    }
    out
}

/// The text without line comments and without a trailing `#[cfg(test)] mod tests`.
fn code_only(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Paths following each occurrence of `prefix` (e.g. `crate::`), with `{a, b::c}` groups
/// expanded into one path per item.
fn paths_after(text: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(prefix) {
        let start = from + i;
        from = start + prefix.len();
        let before = text[..start].chars().next_back();
        if before.is_some_and(|c| is_ident(c) || c == '$' || c == ':') {
            continue;
        }
        let rest = &text[from..];
        let len = rest.find(|c: char| !(is_ident(c) || c == ':')).unwrap_or(rest.len());
        let path = rest[..len].trim_end_matches(':').to_string();
        if rest[len..].starts_with('{') && rest[..len].ends_with("::") {
            let group = &rest[len + 1..];
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += (c == '{') as i32 - (c == '}') as i32;
                    depth == 0
                })
                .map(|(i, _)| i)
                .unwrap_or(group.len());
            for item in group[..end].split(',') {
                let item: String = item.trim().chars().take_while(|&c| is_ident(c) || c == ':').collect();
                out.push(if item == "self" || item.is_empty() { path.clone() } else { format!("{path}::{item}") });
            }
        } else {
            out.push(path);
        }
    }
    out
}

fn resolve(mods: &BTreeMap<String, String>, path: &str) -> Option<String> {
    let mut parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    while !parts.is_empty() {
        let p = parts.join("::");
        if mods.contains_key(&p) {
            return Some(p);
        }
        parts.pop();
    }
    None
}

fn edges(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, text) in mods {
        let parent = m.rsplit_once("::").map(|(p, _)| p.to_string()).unwrap_or_default();
        let mut targets = Vec::new();
        targets.extend(paths_after(text, "crate::"));
        // `super::` inside an inline `mod x { … }` refers to this file's own module.
        let mut offset = 0;
        let mut outer = text.as_str();
        for line in text.lines() {
            let l = line.trim().trim_start_matches("pub(crate) ").trim_start_matches("pub ");
            if l.starts_with("mod ") && l.ends_with('{') {
                outer = &text[..offset];
                break;
            }
            offset += line.len() + 1;
        }
        for p in paths_after(outer, "super::") {
            targets.push(if parent.is_empty() { p } else { format!("{parent}::{p}") });
        }
        for line in text.lines() {
            let l = line.trim_start().trim_start_matches("pub(crate) ").trim_start_matches("pub ");
            if let Some(rest) = l.strip_prefix("use ") {
                let child: String = rest.chars().take_while(|&c| is_ident(c)).collect();
                if rest[child.len()..].starts_with("::") && mods.contains_key(&format!("{m}::{child}")) {
                    targets.push(format!("{m}::{child}"));
                }
            }
        }
        let set = g.entry(m.clone()).or_default();
        for t in targets {
            if let Some(r) = resolve(mods, &t) {
                if &r != m {
                    set.insert(r);
                }
            }
        }
    }
    g
}

/// One cycle, as a path of modules, if the graph has any.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        v: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(v.to_string(), 1);
        stack.push(v.to_string());
        for w in g.get(v).into_iter().flatten() {
            match state.get(w.as_str()).copied().unwrap_or(0) {
                1 => {
                    let i = stack.iter().position(|s| s == w).unwrap();
                    let mut c = stack[i..].to_vec();
                    c.push(w.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(w, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(v.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for v in g.keys() {
        if state.get(v.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(v, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_module_graph_has_no_cycles() {
    let mods = modules();
    assert!(mods.len() > 40, "found only {} modules: is the source tree there?", mods.len());
    let g = edges(&mods);
    let n_edges: usize = g.values().map(|s| s.len()).sum();
    assert!(n_edges > 100, "found only {n_edges} import edges: the scanner is broken");
    if let Some(c) = find_cycle(&g) {
        panic!("import cycle: {}", c.join(" -> "));
    }
}

#[test]
fn the_scanner_finds_a_cycle_when_there_is_one() {
    let mods: BTreeMap<String, String> = [
        ("a".to_string(), "pub mod b;\npub use b::f;\nfn g() {}".to_string()),
        ("a::b".to_string(), "use super::{g, h};\npub fn f() {}".to_string()),
        ("c".to_string(), "use crate::a::{self, b::f};".to_string()),
    ]
    .into();
    let g = edges(&mods);
    assert_eq!(g["c"], BTreeSet::from(["a".to_string(), "a::b".to_string()]));
    let c = find_cycle(&g).expect("a <-> a::b is a cycle");
    assert!(c.contains(&"a".to_string()) && c.contains(&"a::b".to_string()), "{c:?}");
}

#[test]
fn layers_below_the_models_do_not_import_them() {
    let mods = modules();
    let g = edges(&mods);
    let above_nn = ["sd", "synth", "train", "measure", "schedule", "data", "formats"];
    for (m, targets) in &g {
        let top = m.split("::").next().unwrap();
        let forbidden: &[&str] = match top {
            "kernels" => &["nn", "sd", "synth", "train", "measure", "schedule", "data", "formats"],
            "nn" => &above_nn[..5],
            "sd" => &["kernels", "synth", "train", "measure", "classify"],
            // A classifier is built from `nn/` alone, never from the SD models.
            "classify" => &["sd", "kernels", "measure"],
            _ => &[],
        };
        for t in targets {
            let ttop = t.split("::").next().unwrap();
            assert!(!forbidden.contains(&ttop), "{m} imports {t}: {top} must not depend on {ttop}");
        }
    }
}
