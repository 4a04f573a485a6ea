//! The codebase's shape, checked: no source file over 800 lines, and no import cycles between
//! the runtime's modules (each file is a module; `a` depends on `b` when `a` names an item of
//! `b` through `crate::`, `super::` or `self::` paths, re-exports followed to where the item is
//! defined, test modules left out).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::repo_root;

/// The longest a source file may be.
const MAX_LINES: usize = 800;

type Module = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if !matches!(name.as_str(), "target" | ".git" | "node_modules" | "fixtures") {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs" || x == "cpp" || x == "h" || x == "cu" || x == "py") {
            out.push(p);
        }
    }
}

#[test]
fn no_source_file_is_over_800_lines() {
    let root = repo_root();
    let mut files = Vec::new();
    for dir in ["runtime", "kernels", "sdk", "plugins", "examples", "tests", "scripts"] {
        rust_files(&root.join(dir), &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).ok()?.lines().count();
            (n > MAX_LINES).then(|| format!("{} ({n} lines)", f.strip_prefix(&root).unwrap_or(f).display()))
        })
        .collect();
    assert!(!files.is_empty());
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}

/// The source without comments and without its test module (conventionally last).
fn product_code(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        let code = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    let mut cut = out.len();
    let mut from = 0;
    while let Some(i) = out[from..].find("#[cfg(test)]") {
        let at = from + i;
        let rest = out[at + "#[cfg(test)]".len()..].trim_start();
        let rest = rest.strip_prefix("pub(crate) ").or_else(|| rest.strip_prefix("pub ")).unwrap_or(rest);
        // An inline test module (`mod tests { … }`, conventionally last) ends the product
        // code; a declaration (`mod kernel_tests;`) is just skipped.
        let inline = rest.find('{').is_some_and(|b| rest.find(';').is_none_or(|c| b < c));
        if rest.starts_with("mod ") && inline {
            cut = at;
            break;
        }
        from = at + 1;
    }
    out.truncate(cut);
    out
}

/// Every path a `use` declaration names, its braces expanded.
fn expand(tree: &str) -> Vec<Vec<String>> {
    // `a as b` becomes `a@b`: the path's last part, then the name it is known by.
    let tree: String = tree.replace(" as ", "@").chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree.split("::").filter(|s| !s.is_empty()).map(str::to_string).collect()];
    };
    let prefix: Vec<String> = tree[..open].split("::").filter(|s| !s.is_empty()).map(str::to_string).collect();
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut items, mut depth, mut cur) = (Vec::new(), 0, String::new());
    for ch in inner.chars() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    items.push(cur);
    let mut out = Vec::new();
    for item in items.iter().filter(|i| !i.is_empty()) {
        for p in expand(item) {
            out.push(prefix.iter().cloned().chain(p).collect());
        }
    }
    out
}

/// `use` trees (after `use`/`pub use`) in a source: re-exports (`pub use`) if `reexports`, else
/// imports. A re-export is followed to where the item lives; it is no dependency of its own.
fn use_trees(src: &str, reexports: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = src[from..].find("use ") {
        let at = from + i;
        from = at + 4;
        let line_start = src[..at].rfind('\n').map_or(0, |n| n + 1);
        let lead = src[line_start..at].trim();
        let is_pub = match lead {
            "" => false,
            "pub" | "pub(crate)" | "pub(super)" => true,
            _ => continue,
        };
        let Some(end) = src[from..].find(';') else { break };
        if is_pub == reexports {
            out.push(src[from..from + end].to_string());
        }
    }
    out
}

/// `crate::a::b` / `super::x` paths written inline in code.
fn inline_paths(src: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = src[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if at > 0 && src[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let path: String =
                src[at..].chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
            out.push(path.split("::").filter(|s| !s.is_empty()).map(str::to_string).collect());
        }
    }
    out
}

struct Crate {
    modules: BTreeMap<Module, String>,
}

impl Crate {
    fn load(src_dir: &Path) -> Self {
        let mut files = Vec::new();
        rust_files(src_dir, &mut files);
        let mut modules = BTreeMap::new();
        for f in files.iter().filter(|f| f.extension().is_some_and(|x| x == "rs")) {
            let rel = f.strip_prefix(src_dir).expect("under src").with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if parts == ["main"] {
                continue;
            }
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            let src = std::fs::read_to_string(f).expect("read source");
            modules.insert(parts, product_code(&src));
        }
        Crate { modules }
    }

    /// The module a path from `from` lands in, and the item it names there.
    fn resolve(&self, from: &Module, path: &[String]) -> Option<(Module, Option<String>)> {
        let first = path.first()?;
        let abs: Vec<String> = match first.as_str() {
            "crate" => path[1..].to_vec(),
            "self" => from.iter().cloned().chain(path[1..].iter().cloned()).collect(),
            "super" => {
                let mut base = from.clone();
                let mut rest = path;
                while rest.first().is_some_and(|p| p == "super") {
                    base.pop();
                    rest = &rest[1..];
                }
                base.into_iter().chain(rest.iter().cloned()).collect()
            }
            _ => {
                let child: Module = from.iter().cloned().chain([first.clone()]).collect();
                if !self.modules.contains_key(&child) {
                    return None;
                }
                from.iter().cloned().chain(path.iter().cloned()).collect()
            }
        };
        let abs: Vec<String> = abs.into_iter().map(|p| p.split('@').next().unwrap_or(&p).to_string()).collect();
        (0..=abs.len()).rev().find_map(|k| {
            let m: Module = abs[..k].to_vec();
            self.modules.contains_key(&m).then(|| (m, abs.get(k).cloned()))
        })
    }

    fn edges(&self) -> BTreeMap<Module, BTreeSet<Module>> {
        let mut reexports: BTreeMap<(Module, String), Module> = BTreeMap::new();
        for (m, src) in &self.modules {
            for tree in use_trees(src, true) {
                for p in expand(&tree) {
                    let name = p.last().cloned().unwrap_or_default();
                    let name = name.rsplit('@').next().unwrap_or(&name).to_string();
                    if let Some((target, _)) = self.resolve(m, &p) {
                        reexports.insert((m.clone(), name), target);
                    }
                }
            }
        }
        let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
        for (m, src) in &self.modules {
            let mut paths: Vec<Vec<String>> = use_trees(src, false).iter().flat_map(|t| expand(t)).collect();
            paths.extend(inline_paths(src));
            for p in paths {
                let Some((mut target, item)) = self.resolve(m, &p) else { continue };
                for _ in 0..8 {
                    match item.as_ref().and_then(|i| reexports.get(&(target.clone(), i.clone()))) {
                        Some(t) if *t != target => target = t.clone(),
                        _ => break,
                    }
                }
                if &target != m {
                    edges.entry(m.clone()).or_default().insert(target);
                }
            }
        }
        edges
    }
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(edges: &BTreeMap<Module, BTreeSet<Module>>, nodes: &[Module]) -> Vec<Vec<Module>> {
    struct T<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<Module, usize>,
        low: BTreeMap<Module, usize>,
        stack: Vec<Module>,
        on: BTreeSet<Module>,
        next: usize,
        out: Vec<Vec<Module>>,
    }
    fn visit(t: &mut T<'_>, v: &Module) {
        t.index.insert(v.clone(), t.next);
        t.low.insert(v.clone(), t.next);
        t.next += 1;
        t.stack.push(v.clone());
        t.on.insert(v.clone());
        for w in t.edges.get(v).into_iter().flatten() {
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(&w);
                let done = &w == v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in nodes {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn names(ms: &[Module]) -> Vec<String> {
    ms.iter().map(|m| if m.is_empty() { "crate".to_string() } else { m.join("::") }).collect()
}

#[test]
fn the_runtime_has_no_import_cycles_between_modules() {
    let krate = Crate::load(&repo_root().join("runtime/src"));
    let edges = krate.edges();
    let nodes: Vec<Module> = krate.modules.keys().cloned().collect();
    assert!(nodes.len() > 20, "found only {} modules", nodes.len());
    let found: Vec<Vec<String>> = cycles(&edges, &nodes).iter().map(|c| names(c)).collect();
    assert!(found.is_empty(), "modules that import each other: {found:?}");
    // The same between top-level modules: the layers form a DAG.
    let mut top: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (a, bs) in &edges {
        for b in bs {
            let (ta, tb) = (a.first().cloned().into_iter().collect(), b.first().cloned().into_iter().collect());
            if ta != tb {
                top.entry(ta).or_default().insert(tb);
            }
        }
    }
    let tops: Vec<Module> = nodes.iter().map(|m| m.first().cloned().into_iter().collect()).collect();
    let found: Vec<Vec<String>> = cycles(&top, &tops).iter().map(|c| names(c)).collect();
    assert!(found.is_empty(), "top-level modules that import each other: {found:?}");
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    let (a, b, c) = (vec!["a".to_string()], vec!["b".to_string()], vec!["c".to_string()]);
    edges.entry(a.clone()).or_default().insert(b.clone());
    edges.entry(b.clone()).or_default().insert(a.clone());
    edges.entry(b.clone()).or_default().insert(c.clone());
    assert_eq!(cycles(&edges, &[a, b, c]).len(), 1);
    assert_eq!(expand("a::{b, c::{d, e}}").len(), 3);
    assert_eq!(product_code("use a;\n#[cfg(test)]\nmod tests {\nuse b;\n}\n").trim(), "use a;");
    assert!(product_code("#[cfg(test)]\nmod kernel_tests;\nuse a;\n").contains("use a;"));
}
