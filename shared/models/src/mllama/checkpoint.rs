//! A Hugging Face checkpoint directory: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Tensors are read by name as f32 (F32, BF16 and F16 are
//! converted). Names are accepted both as the published checkpoints write them
//! (`language_model.model.…`, `language_model.lm_head.weight`, `vision_model.…`,
//! `multi_modal_projector.…`) and as transformers 5 names its modules (`model.language_model.…`,
//! `lm_head.weight`, `model.vision_model.…`, `model.multi_modal_projector.…`).

use safetensors::Dtype;
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

/// Where a tensor's values lie in a shard.
#[derive(Debug, Clone)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte offset in the file (after the header) and length.
    start: u64,
    len: u64,
}

/// A shard's header, read when one of its tensors is first asked for.
struct Shard {
    file: std::fs::File,
    tensors: HashMap<String, Entry>,
}

/// Largest header accepted (as the safetensors crate).
const MAX_HEADER: u64 = 100 << 20;

/// Values converted per read: a tensor is read in pieces of about this many bytes, so that
/// reading holds one piece of the file beside what it is converted into.
pub const READ_CHUNK: usize = 16 << 20;

impl Shard {
    /// Reads `path`'s header and checks that every tensor lies inside the file.
    fn open(path: &Path) -> Result<Self, CheckpointError> {
        use std::io::Read;
        let bad = |m: String| CheckpointError::Format(format!("{}: {m}", path.display()));
        let mut file = std::fs::File::open(path).map_err(io(path))?;
        let size = file.metadata().map_err(io(path))?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| bad("shorter than a safetensors header".into()))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER || 8 + n > size {
            return Err(bad(format!("header of {n} bytes in a file of {size}")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(io(path))?;
        let header: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        let data = size - 8 - n;
        let mut tensors = HashMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                continue;
            }
            let info: RawInfo = serde_json::from_value(v).map_err(|e| bad(format!("tensor {name:?}: {e}")))?;
            let dtype = info.dtype;
            let [begin, end] = info.data_offsets;
            let count = info
                .shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .and_then(|c| c.checked_mul(dtype.bitsize() as u64))
                .map(|bits| bits.div_ceil(8));
            if begin > end || end > data || count != Some(end - begin) {
                return Err(bad(format!(
                    "tensor {name:?} (shape {:?}, {:?}) at bytes {begin}..{end} of {data}",
                    info.shape, dtype
                )));
            }
            tensors.insert(
                name,
                Entry {
                    dtype,
                    shape: info.shape.iter().map(|&d| d as usize).collect(),
                    start: 8 + n + begin,
                    len: end - begin,
                },
            );
        }
        Ok(Shard { file, tensors })
    }
}

#[derive(serde::Deserialize)]
struct RawInfo {
    dtype: Dtype,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// An open checkpoint. Shards are opened when first used and tensors read from them piece by
/// piece: nothing holds a whole file, and a tensor's raw bytes live only while converted.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<String>,
    /// Canonical name to (file index, name as stored).
    index: BTreeMap<String, (usize, String)>,
    shards: Vec<std::cell::OnceCell<Shard>>,
    used: RefCell<BTreeSet<String>>,
}

/// An I/O error on `path`.
pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
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
        let mut first = None;
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
            let shard = Shard::open(&p)?;
            for name in shard.tensors.keys() {
                index.insert(canonical_name(name), (0, name.clone()));
            }
            files.push("model.safetensors".into());
            first = Some(shard);
        }
        let shards: Vec<std::cell::OnceCell<Shard>> = files.iter().map(|_| std::cell::OnceCell::new()).collect();
        if let Some(s) = first {
            let _ = shards[0].set(s);
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            index,
            shards,
            used: RefCell::default(),
        })
    }

    /// The canonical names of every tensor.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Where `name` (canonical) lies, its shard opened if it was not yet.
    fn entry(&self, name: &str) -> Result<(&Shard, &Entry, usize), CheckpointError> {
        let (file, stored) = self
            .index
            .get(name)
            .ok_or_else(|| CheckpointError::Missing(name.to_string()))?;
        let shard = match self.shards[*file].get() {
            Some(s) => s,
            None => {
                let s = Shard::open(&self.dir.join(&self.files[*file]))?;
                self.shards[*file].get_or_init(|| s)
            }
        };
        let e = shard.tensors.get(stored).ok_or_else(|| {
            CheckpointError::Format(format!(
                "{}: the index names {stored:?}, which it lacks",
                self.files[*file]
            ))
        })?;
        Ok((shard, e, *file))
    }

    /// The shape of `name` (canonical) as stored.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, CheckpointError> {
        Ok(self.entry(name)?.1.shape.clone())
    }

    /// Reads the float tensor `name` (canonical), which must have `shape` when given, in pieces
    /// of whole rows (`rows_per_piece` rows of the last dimension, at least one): `f` gets each
    /// piece's first row and its values as f32.
    pub fn read_rows(
        &self,
        name: &str,
        shape: Option<&[usize]>,
        rows_per_piece: usize,
        f: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Vec<usize>, CheckpointError> {
        use std::os::unix::fs::FileExt;
        let (shard, e, file) = self.entry(name)?;
        if shape.is_some_and(|s| e.shape != s) {
            return Err(CheckpointError::Shape {
                name: name.to_string(),
                expected: shape.unwrap_or_default().to_vec(),
                found: e.shape.clone(),
            });
        }
        if !matches!(e.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(CheckpointError::Dtype {
                name: name.to_string(),
                dtype: format!("{:?}", e.dtype),
            });
        }
        let width = e.dtype.bitsize() / 8;
        let row = e.shape.last().copied().unwrap_or(1).max(1);
        let rows = (e.len as usize / width).div_ceil(row);
        let per = rows_per_piece.max(1);
        let mut raw = Vec::new();
        let mut values = Vec::new();
        for r0 in (0..rows).step_by(per) {
            let n = per.min(rows - r0) * row;
            raw.resize(n * width, 0u8);
            shard
                .file
                .read_exact_at(&mut raw, e.start + (r0 * row * width) as u64)
                .map_err(io(&self.dir.join(&self.files[file])))?;
            values.clear();
            match e.dtype {
                Dtype::F32 => values.extend(
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                ),
                Dtype::BF16 => values.extend(
                    raw.chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
                ),
                _ => values.extend(
                    raw.chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                ),
            }
            f(r0, &values);
        }
        self.used.borrow_mut().insert(name.to_string());
        Ok(e.shape.clone())
    }

    /// Rows of `name` that fit in about [`READ_CHUNK`] bytes.
    pub fn rows_per_piece(&self, name: &str) -> Result<usize, CheckpointError> {
        let e = self.entry(name)?.1;
        let row = e.shape.last().copied().unwrap_or(1).max(1) * (e.dtype.bitsize() / 8).max(1);
        Ok((READ_CHUNK / row).max(1))
    }

    /// The tensor `name` (canonical) as f32, which must have `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        Ok(self.read(name, Some(shape))?.1)
    }

    /// The tensor `name` (canonical) with its shape, which must be `shape` when given.
    fn read(&self, name: &str, shape: Option<&[usize]>) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
        let mut out = Vec::new();
        let per = self.rows_per_piece(name)?;
        let shape = self.read_rows(name, shape, per, &mut |_, v| out.extend_from_slice(v))?;
        Ok((shape, out))
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
