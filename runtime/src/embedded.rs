//! The default model shipped inside the binary, unpacked to a folder on first use.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

macro_rules! asset {
    ($name:literal) => {
        ($name, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/default-model/", $name)) as &[u8])
    };
}

/// Files of the embedded default model (a tiny Llama trained on Debian's `fortunes`).
const DEFAULT_MODEL: &[(&str, &[u8])] = &[
    asset!("config.json"),
    asset!("generation_config.json"),
    asset!("model.safetensors"),
    asset!("tokenizer.json"),
    asset!("tokenizer_config.json"),
    asset!("TRAINING.md"),
    asset!("adapters/startrek/adapter_config.json"),
    asset!("adapters/startrek/adapter_model.safetensors"),
    asset!("adapters/startrek/openlora.json"),
    asset!("adapters/computers/adapter_config.json"),
    asset!("adapters/computers/adapter_model.safetensors"),
    asset!("adapters/computers/openlora.json"),
    asset!("adapters/love/adapter_config.json"),
    asset!("adapters/love/adapter_model.safetensors"),
    asset!("adapters/love/openlora.json"),
];

/// Demo LoRA adapters shipped with the default model (PEFT folders under `adapters/`),
/// each fine-tuned by `runtime/assets/train_demo_adapters.py` on one slice of the corpus.
pub const DEMO_ADAPTERS: &[&str] = &["startrek", "computers", "love"];

/// Name under which the embedded model is served.
pub const DEFAULT_MODEL_NAME: &str = "openlora-tiny-fortunes";

/// The directory openlora keeps its data in: `$OPENLORA_HOME`, else `$XDG_DATA_HOME/openlora`,
/// else `~/.local/share/openlora`, else a folder under the system temp directory.
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OPENLORA_HOME") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("openlora");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/openlora");
    }
    std::env::temp_dir().join("openlora")
}

fn content_hash(files: &[(&str, &[u8])]) -> String {
    let mut h = Sha256::new();
    for (name, bytes) in files {
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Unpacks the embedded default model under `root` (once per content hash) and returns its folder.
pub fn default_model_dir_in(root: &Path) -> Result<PathBuf> {
    let dir = root.join("models").join(format!("{DEFAULT_MODEL_NAME}-{}", content_hash(DEFAULT_MODEL)));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    // Write into a private temporary folder, then rename: readers never see a half-written model.
    let tmp = root.join("models").join(format!(".tmp-{}-{}", DEFAULT_MODEL_NAME, std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    for (name, bytes) in DEFAULT_MODEL {
        let p = tmp.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
    }
    let marker = tmp.join(".complete");
    std::fs::write(&marker, b"").map_err(|e| Error::io(&marker, e))?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process unpacked it first: use theirs.
        Err(_) if dir.join(".complete").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(Error::io(&dir, e)),
    }
}

/// The embedded default model's folder under [`data_dir`].
pub fn default_model_dir() -> Result<PathBuf> {
    default_model_dir_in(&data_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacks_once_and_loads() {
        let root = std::env::temp_dir().join(format!("openlora-embedded-{}", std::process::id()));
        let a = default_model_dir_in(&root).expect("unpack");
        let b = default_model_dir_in(&root).expect("second call reuses");
        assert_eq!(a, b);
        let model = crate::model::LoadedModel::load(&a).expect("embedded model loads");
        for name in DEMO_ADAPTERS {
            crate::adapters::AdapterManifest::inspect(&a.join("adapters").join(name), model.config())
                .expect("demo adapter is valid for the default model");
        }
        let _ = std::fs::remove_dir_all(root);
    }
}
