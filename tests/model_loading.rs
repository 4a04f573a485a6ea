//! A broken model folder is refused with an error naming the file and the tensor or field.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::fixture_models;
use openlora::Error;
use openlora::error::LoadError;
use openlora::model::LoadedModel;

/// A fresh copy of the first fixture in a temporary folder.
fn copy_fixture(tag: &str) -> PathBuf {
    let src = &fixture_models()[0];
    let dst = std::env::temp_dir().join(format!("openlora-broken-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).expect("temp dir");
    for e in std::fs::read_dir(src).expect("fixture dir") {
        let p = e.expect("entry").path();
        std::fs::copy(&p, dst.join(p.file_name().expect("name"))).expect("copy");
    }
    dst
}

fn weights_path(dir: &Path) -> PathBuf {
    dir.join("model.safetensors")
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = weights_path(dir);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("load weights");
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).expect("save weights");
}

fn load_err(dir: &Path) -> Error {
    match LoadedModel::load(dir) {
        Ok(_) => panic!("{} loaded but is broken", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_tokenizer_names_the_file() {
    let dir = copy_fixture("tok");
    std::fs::remove_file(dir.join("tokenizer.json")).expect("rm");
    let e = load_err(&dir);
    assert!(matches!(&e, Error::Load(LoadError::MissingFile { path, .. }) if path.ends_with("tokenizer.json")), "{e}");
    assert!(e.to_string().contains("tokenizer.json"));
}

#[test]
fn missing_config_names_the_file() {
    let dir = copy_fixture("cfg");
    std::fs::remove_file(dir.join("config.json")).expect("rm");
    assert!(load_err(&dir).to_string().contains("config.json"));
}

#[test]
fn missing_weights_say_what_is_missing() {
    let dir = copy_fixture("weights");
    std::fs::remove_file(weights_path(&dir)).expect("rm");
    std::fs::write(dir.join("pytorch_model.bin"), b"pickle").expect("write");
    let msg = load_err(&dir).to_string();
    assert!(msg.contains("safetensors") && msg.contains("pytorch_model.bin"), "{msg}");
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let dir = copy_fixture("tensor");
    rewrite_weights(&dir, |t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    let e = load_err(&dir);
    let msg = e.to_string();
    assert!(matches!(e, Error::Load(LoadError::MissingTensor { .. })), "{msg}");
    assert!(msg.contains("model.layers.1.mlp.up_proj.weight") && msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn wrong_shape_names_file_tensor_and_shapes() {
    let dir = copy_fixture("shape");
    rewrite_weights(&dir, |t| {
        let bad = Tensor::zeros((3, 5), DType::F32, &Device::Cpu).expect("zeros");
        t.insert("model.layers.0.self_attn.k_proj.weight".into(), bad);
    });
    let e = load_err(&dir);
    let msg = e.to_string();
    assert!(matches!(e, Error::Load(LoadError::TensorShape { .. })), "{msg}");
    assert!(msg.contains("model.layers.0.self_attn.k_proj.weight") && msg.contains("[3, 5]"), "{msg}");
}

#[test]
fn corrupt_safetensors_names_the_file() {
    let dir = copy_fixture("corrupt");
    std::fs::write(weights_path(&dir), b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage").expect("write");
    let msg = load_err(&dir).to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("safetensors"), "{msg}");
}

#[test]
fn bad_config_field_is_named() {
    let dir = copy_fixture("field");
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
    v["hidden_size"] = serde_json::json!("wide");
    std::fs::write(&p, v.to_string()).expect("write");
    let msg = load_err(&dir).to_string();
    assert!(msg.contains("config.json") && msg.contains("`hidden_size`"), "{msg}");
}
