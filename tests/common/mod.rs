//! Helpers shared by the end-to-end tests: fixture discovery and reference files.
#![allow(dead_code)]

pub mod policy;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// The repository root: `OPENLORA_REPO` when set (a test binary carried to another machine),
/// else the checkout it was built from.
pub fn repo_root() -> PathBuf {
    match std::env::var_os("OPENLORA_REPO") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("runtime/ has a parent").to_path_buf(),
    }
}

/// Every fixture model folder under tests/fixtures/models, sorted by name.
pub fn fixture_models() -> Vec<PathBuf> {
    let dir = repo_root().join("tests/fixtures/models");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run tests/fixtures/make_fixtures.py)", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("reference.safetensors").exists())
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no fixtures in {}", dir.display());
    out
}

/// The reference outputs written by make_fixtures.py for one fixture.
pub struct Reference {
    tensors: HashMap<String, Tensor>,
    /// The prompts, in order.
    pub prompts: Vec<String>,
    /// The dtype the fixture's weights are stored in (`float32`, `float16`, `bfloat16`).
    pub stored_dtype: String,
}

impl Reference {
    /// Reads reference.safetensors and reference.json of a fixture folder.
    pub fn load(dir: &Path) -> Self {
        let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
            .expect("reference.safetensors");
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"))
                .expect("reference.json parses");
        let prompts =
            meta["prompts"].as_array().expect("prompts").iter().map(|p| p.as_str().expect("str").to_string()).collect();
        let stored_dtype = meta["stored_dtype"].as_str().expect("stored_dtype").to_string();
        Reference { tensors, prompts, stored_dtype }
    }

    /// Token ids of prompt `i`.
    pub fn ids(&self, key: &str, i: usize) -> Vec<u32> {
        let t = &self.tensors[&format!("{key}.{i}")];
        t.to_vec1::<i64>().expect("i64 ids").into_iter().map(|x| u32::try_from(x).expect("id fits u32")).collect()
    }

    /// A logits table `[tokens, vocab]` for prompt `i`, if present.
    pub fn logits(&self, key: &str, i: usize) -> Option<Tensor> {
        self.tensors.get(&format!("{key}.{i}")).cloned()
    }
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}

/// Builds a workspace plugin crate from source for `wasm32-wasip2` (profile `plugin`, its own
/// target folder so it never waits on the outer cargo) and returns the component's bytes.
/// Each package is built by its own cargo call so the SDK gets only that plugin's world feature.
pub fn plugin_wasm(package: &str) -> Vec<u8> {
    use std::sync::Mutex;
    static BUILDING: Mutex<()> = Mutex::new(());
    let _guard = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
    let root = repo_root();
    let target_dir = root.join("target").join("plugin-wasm");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--locked", "--quiet", "--target", "wasm32-wasip2", "--profile", "plugin", "-p", package])
        .arg("--target-dir")
        .arg(&target_dir)
        .output()
        .expect("run cargo to build a plugin");
    assert!(
        out.status.success(),
        "building {package} for wasm32-wasip2 failed (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = target_dir.join("wasm32-wasip2/plugin").join(format!("{}.wasm", package.replace('-', "_")));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fresh, empty folder under the system temp folder.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("openlora-{tag}-{}-{:x}", std::process::id(), rand_suffix()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    t ^ N.fetch_add(1, Ordering::Relaxed)
}
