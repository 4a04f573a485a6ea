//! Memory-mapped `*.safetensors` weight files, one or many shards, with lookups by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Metadata, TensorView};

use crate::error::{Error, LoadError, Result};

struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    meta: Metadata,
}

/// The weight files of one model or adapter folder, mapped into memory.
pub struct WeightFiles {
    folder: PathBuf,
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

impl WeightFiles {
    /// Maps the given safetensors files and indexes every tensor they hold.
    pub fn open(folder: &Path, files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for path in files {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the file is opened read-only and treated as immutable for the mapping's
            // lifetime, as every safetensors loader does; truncating it underneath us is outside
            // the contract of a model folder.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap[..]).map_err(|e| {
                Error::from(LoadError::WeightFile {
                    file: path.clone(),
                    message: format!("not a valid safetensors file: {e}"),
                })
            })?;
            let shard_idx = shards.len();
            for name in meta.tensors().keys() {
                if let Some(prev) = index.insert(name.clone(), shard_idx) {
                    let prev: &Shard = &shards[prev];
                    return Err(Error::from(LoadError::WeightFile {
                        file: path.clone(),
                        message: format!("tensor `{name}` is also in {}", prev.path.display()),
                    }));
                }
            }
            shards.push(Shard { path: path.clone(), mmap, data_start: 8 + header_len, meta });
        }
        Ok(WeightFiles { folder: folder.to_path_buf(), shards, index })
    }

    /// Finds a model folder's weight files as transformers does: the shards named by
    /// `model.safetensors.index.json` if present, else `model.safetensors`.
    pub fn discover(folder: &Path) -> Result<Vec<PathBuf>> {
        let index = folder.join("model.safetensors.index.json");
        if index.exists() {
            let v: serde_json::Value = crate::shape::read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index, "weight_map", "missing or not an object"))?;
            let mut files: Vec<PathBuf> = Vec::new();
            for (tensor, file) in map {
                let name = file
                    .as_str()
                    .ok_or_else(|| Error::config(&index, format!("weight_map.{tensor}"), "not a file name"))?;
                let p = folder.join(name);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
            for p in &files {
                if !p.exists() {
                    return Err(Error::from(LoadError::MissingFile {
                        path: p.clone(),
                        what: "weight shard named in model.safetensors.index.json",
                    }));
                }
            }
            files.sort();
            return Ok(files);
        }
        let single = folder.join("model.safetensors");
        if single.exists() {
            return Ok(vec![single]);
        }
        let bin = folder.join("pytorch_model.bin");
        let hint = if bin.exists() {
            "; pytorch_model.bin is a pickle, which openlora does not load: convert it with \
             `model.save_pretrained(dir, safe_serialization=True)`"
        } else {
            ""
        };
        Err(Error::from(LoadError::WeightFile {
            file: single,
            message: format!("missing file (model weights, or model.safetensors.index.json for shards){hint}"),
        }))
    }

    /// Whether a tensor of this name exists in any shard.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Names of every tensor in every shard.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The shape of a tensor, or an error naming it if absent.
    pub fn shape(&self, name: &str) -> Result<(&Path, Vec<usize>)> {
        let shard = self.shard_of(name)?;
        let info = shard.meta.info(name).ok_or_else(|| self.missing(name))?;
        Ok((&shard.path, info.shape.clone()))
    }

    /// A tensor's dtype as the file declares it.
    pub fn dtype(&self, name: &str) -> Result<safetensors::Dtype> {
        let shard = self.shard_of(name)?;
        Ok(shard.meta.info(name).ok_or_else(|| self.missing(name))?.dtype)
    }

    fn shard_of(&self, name: &str) -> Result<&Shard> {
        let idx = *self.index.get(name).ok_or_else(|| self.missing(name))?;
        Ok(&self.shards[idx])
    }

    fn missing(&self, name: &str) -> Error {
        let file = match self.shards.as_slice() {
            [one] => one.path.clone(),
            _ => self.folder.clone(),
        };
        Error::from(LoadError::MissingTensor { file, tensor: name.to_string() })
    }

    /// Loads a tensor after checking its shape, converted to `dtype` on `device`.
    pub fn load(&self, name: &str, expected: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let shard = self.shard_of(name)?;
        let info = shard.meta.info(name).ok_or_else(|| self.missing(name))?;
        if info.shape != expected {
            return Err(Error::from(LoadError::TensorShape {
                file: shard.path.clone(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                got: info.shape.clone(),
            }));
        }
        let (start, end) = info.data_offsets;
        let bytes = shard.mmap.get(shard.data_start + start..shard.data_start + end).ok_or_else(|| {
            Error::from(LoadError::WeightFile {
                file: shard.path.clone(),
                message: format!("tensor `{name}` points past the end of the file"),
            })
        })?;
        let view = TensorView::new(info.dtype, info.shape.clone(), bytes).map_err(|e| {
            Error::from(LoadError::WeightFile { file: shard.path.clone(), message: format!("tensor `{name}`: {e}") })
        })?;
        let t = view.load(device).map_err(|e| {
            Error::from(LoadError::WeightFile { file: shard.path.clone(), message: format!("tensor `{name}`: {e}") })
        })?;
        if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::from(LoadError::WeightFile {
                file: shard.path.clone(),
                message: format!("tensor `{name}` has dtype {:?}; expected a float dtype", t.dtype()),
            }));
        }
        Ok(t.to_dtype(dtype)?)
    }
}
