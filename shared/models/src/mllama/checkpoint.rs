//! A Hugging Face checkpoint directory: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Tensors are read by name as f32 (F32, BF16 and F16 are
//! converted). Names are accepted both as the published checkpoints write them
//! (`language_model.model.…`, `language_model.lm_head.weight`, `vision_model.…`,
//! `multi_modal_projector.…`) and as transformers 5 names its modules (`model.language_model.…`,
//! `lm_head.weight`, `model.vision_model.…`, `model.multi_modal_projector.…`).

use safetensors::{Dtype, SafeTensors};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Why a checkpoint cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading a file.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A damaged file or index.
    #[error("{0}")]
    Format(String),
    /// A tensor the model needs is not in the checkpoint.
    #[error("checkpoint has no tensor {0:?}")]
    Missing(String),
    /// A tensor has another shape than the configuration implies.
    #[error("tensor {name:?} has shape {found:?}, the configuration implies {expected:?}")]
    Shape {
        /// Tensor.
        name: String,
        /// Expected.
        expected: Vec<usize>,
        /// Found.
        found: Vec<usize>,
    },
    /// A tensor of a type that is not a float.
    #[error("tensor {name:?} is {dtype}, expected F32, BF16 or F16")]
    Dtype {
        /// Tensor.
        name: String,
        /// Its type.
        dtype: String,
    },
    /// Tensors in the checkpoint that the model does not have.
    #[error("checkpoint has tensors the configuration does not explain: {0}")]
    Unused(String),
}

/// The published checkpoints' name for a tensor named either way.
pub fn canonical_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.language_model.") {
        format!("language_model.model.{rest}")
    } else if name == "lm_head.weight" {
        "language_model.lm_head.weight".into()
    } else if let Some(rest) = name.strip_prefix("model.") {
        rest.to_string()
    } else {
        name.to_string()
    }
}

/// An open checkpoint.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<String>,
    /// Canonical name to (file index, name as stored).
    index: BTreeMap<String, (usize, String)>,
    loaded: RefCell<HashMap<usize, Vec<u8>>>,
    used: RefCell<BTreeSet<String>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Checkpoint {
    /// Opens `dir`: reads the index (or the single file's header).
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(io(&index_path))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| CheckpointError::Format(format!("{}: {e}", index_path.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| CheckpointError::Format(format!("{}: no weight_map", index_path.display())))?;
            for (name, file) in map {
                let file = file
                    .as_str()
                    .filter(|f| !f.contains('/') && !f.contains(".."))
                    .ok_or_else(|| CheckpointError::Format(format!("weight_map entry {name:?} is not a file name")))?;
                let i = match files.iter().position(|f| f == file) {
                    Some(i) => i,
                    None => {
                        files.push(file.to_string());
                        files.len() - 1
                    }
                };
                index.insert(canonical_name(name), (i, name.clone()));
            }
        } else {
            let p = dir.join("model.safetensors");
            let bytes = std::fs::read(&p).map_err(io(&p))?;
            let st = SafeTensors::deserialize(&bytes)
                .map_err(|e| CheckpointError::Format(format!("{}: {e}", p.display())))?;
            for name in st.names() {
                index.insert(canonical_name(name), (0, name.to_string()));
            }
            files.push("model.safetensors".into());
            let cp = Checkpoint {
                dir: dir.to_path_buf(),
                files,
                index,
                loaded: RefCell::default(),
                used: RefCell::default(),
            };
            cp.loaded.borrow_mut().insert(0, bytes);
            return Ok(cp);
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            index,
            loaded: RefCell::default(),
            used: RefCell::default(),
        })
    }

    /// The tensor `name` (canonical) as f32, which must have `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        Ok(self.read(name, Some(shape))?.1)
    }

    /// The tensor `name` (canonical) with its shape, which must be `shape` when given.
    fn read(&self, name: &str, shape: Option<&[usize]>) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
        let (file, stored) = self
            .index
            .get(name)
            .ok_or_else(|| CheckpointError::Missing(name.to_string()))?
            .clone();
        let mut loaded = self.loaded.borrow_mut();
        if let std::collections::hash_map::Entry::Vacant(e) = loaded.entry(file) {
            let p = self.dir.join(&self.files[file]);
            e.insert(std::fs::read(&p).map_err(io(&p))?);
        }
        let bytes = &loaded[&file];
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| CheckpointError::Format(format!("{}: {e}", self.files[file])))?;
        let view = st.tensor(&stored).map_err(|_| {
            CheckpointError::Format(format!(
                "{}: the index names {stored:?}, which it lacks",
                self.files[file]
            ))
        })?;
        if shape.is_some_and(|s| view.shape() != s) {
            return Err(CheckpointError::Shape {
                name: name.to_string(),
                expected: shape.unwrap_or_default().to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let data = view.data();
        let values = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(CheckpointError::Dtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        self.used.borrow_mut().insert(name.to_string());
        Ok((view.shape().to_vec(), values))
    }

    /// Every tensor, by its published name, as f32.
    pub fn all(&self) -> Result<crate::compact::weights::Weights, CheckpointError> {
        let mut out = crate::compact::weights::Weights::default();
        for name in self.index.keys() {
            let (shape, values) = self.read(name, None)?;
            out.insert(name.clone(), crate::compact::weights::NamedTensor { shape, values });
        }
        Ok(out)
    }

    /// Fails when the checkpoint holds tensors nobody read.
    pub fn check_all_used(&self) -> Result<(), CheckpointError> {
        let used = self.used.borrow();
        let unused: Vec<&str> = self
            .index
            .keys()
            .filter(|k| !used.contains(*k))
            .map(String::as_str)
            .collect();
        if unused.is_empty() {
            Ok(())
        } else {
            let shown: Vec<&str> = unused.iter().take(10).copied().collect();
            Err(CheckpointError::Unused(format!(
                "{}{}",
                shown.join(", "),
                if unused.len() > 10 {
                    format!(" and {} more", unused.len() - 10)
                } else {
                    String::new()
                }
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_naming_schemes_map_to_the_published_one() {
        for (given, canon) in [
            (
                "model.language_model.layers.0.mlp.up_proj.weight",
                "language_model.model.layers.0.mlp.up_proj.weight",
            ),
            ("language_model.model.norm.weight", "language_model.model.norm.weight"),
            ("lm_head.weight", "language_model.lm_head.weight"),
            ("language_model.lm_head.weight", "language_model.lm_head.weight"),
            ("model.vision_model.class_embedding", "vision_model.class_embedding"),
            ("model.multi_modal_projector.bias", "multi_modal_projector.bias"),
        ] {
            assert_eq!(canonical_name(given), canon);
        }
    }
}
