//! Synthetic checkpoints of any mllama configuration, the published 11B one included: random
//! weights (seeded) under the real tensor names, in bf16 safetensors shards with
//! `model.safetensors.index.json`, as the published checkpoints are laid out. Written as they
//! are drawn, one tensor at a time, so a 21 GB checkpoint needs no more memory than its largest
//! tensor and the 4-bit model that enumerating the tensors builds on the way.

use super::checkpoint::{CheckpointError, io};
use super::config::MllamaConfig;
use super::loading::{RandomInit, Source};
use super::model::Mllama;
use burn::tensor::Device;
use std::cell::RefCell;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// What [`write_synthetic_checkpoint`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    /// Shard files, in order.
    pub shards: Vec<String>,
    /// Tensors.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

/// A tensor written to the open shard: name, shape, data start and end in it.
type Placed = (String, Vec<usize>, u64, u64);

/// The shard being filled: its data go to a side file until the shard is closed.
struct Open {
    data: BufWriter<std::fs::File>,
    path: PathBuf,
    placed: Vec<Placed>,
    len: u64,
}

struct ShardWriter {
    dir: PathBuf,
    shard_bytes: u64,
    random: RandomInit,
    open: RefCell<Option<Open>>,
    /// Closed shards (temporary names) and the tensor names in each.
    closed: RefCell<Vec<(PathBuf, Vec<String>)>>,
    total: RefCell<u64>,
}

impl ShardWriter {
    fn append(&self, name: &str, shape: &[usize], values: &[f32]) -> Result<(), CheckpointError> {
        let mut open = self.open.borrow_mut();
        if open.is_none() {
            let i = self.closed.borrow().len();
            let path = self.dir.join(format!(".shard-{i}.data"));
            let f = std::fs::File::create(&path).map_err(io(&path))?;
            *open = Some(Open {
                data: BufWriter::with_capacity(1 << 20, f),
                path,
                placed: Vec::new(),
                len: 0,
            });
        }
        let o = open.as_mut().expect("opened above");
        let mut bytes = Vec::with_capacity(values.len() * 2);
        for v in values {
            bytes.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
        }
        o.data.write_all(&bytes).map_err(io(&o.path))?;
        let start = o.len;
        o.len += bytes.len() as u64;
        o.placed.push((name.to_string(), shape.to_vec(), start, o.len));
        *self.total.borrow_mut() += bytes.len() as u64;
        if o.len >= self.shard_bytes {
            let o = open.take().expect("open");
            drop(open);
            self.close(o)?;
        }
        Ok(())
    }

    /// Writes the shard: header, then its data copied from the side file.
    fn close(&self, o: Open) -> Result<(), CheckpointError> {
        let Open { data, path, placed, .. } = o;
        let data = data.into_inner().map_err(|e| io(&path)(e.into_error()))?;
        drop(data);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        for (name, shape, a, b) in &placed {
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [a, b]}),
            );
        }
        let mut h = serde_json::to_vec(&header).map_err(|e| CheckpointError::Format(e.to_string()))?;
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let i = self.closed.borrow().len();
        let shard = self.dir.join(format!(".shard-{i}.safetensors"));
        let mut out = BufWriter::new(std::fs::File::create(&shard).map_err(io(&shard))?);
        out.write_all(&(h.len() as u64).to_le_bytes()).map_err(io(&shard))?;
        out.write_all(&h).map_err(io(&shard))?;
        let mut src = std::fs::File::open(&path).map_err(io(&path))?;
        std::io::copy(&mut src, &mut out).map_err(io(&shard))?;
        out.flush().map_err(io(&shard))?;
        std::fs::remove_file(&path).map_err(io(&path))?;
        self.closed
            .borrow_mut()
            .push((shard, placed.into_iter().map(|p| p.0).collect()));
        Ok(())
    }
}

impl Source for ShardWriter {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        let v = self.random.tensor(name, shape)?;
        self.append(name, shape, &v)?;
        Ok(v)
    }
}

/// Writes a random checkpoint of `cfg` into `dir` (created): `config.json`, bf16 shards of
/// about `shard_bytes` each named as the published ones (`model-00001-of-00005.safetensors`)
/// and `model.safetensors.index.json`. Seeded: the same seed writes the same values.
pub fn write_synthetic_checkpoint(
    cfg: &MllamaConfig,
    dir: &Path,
    seed: u64,
    shard_bytes: u64,
) -> Result<Written, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config = dir.join("config.json");
    let text = serde_json::to_vec_pretty(&cfg.to_hf_json()).map_err(|e| CheckpointError::Format(e.to_string()))?;
    std::fs::write(&config, text).map_err(io(&config))?;
    let w = ShardWriter {
        dir: dir.to_path_buf(),
        shard_bytes: shard_bytes.max(1),
        random: RandomInit::new(seed),
        open: RefCell::new(None),
        closed: RefCell::new(Vec::new()),
        total: RefCell::new(0),
    };
    // Building the model asks for every tensor under its name, in a fixed order; built in 4 bits
    // so that what it keeps on the way is small, and dropped at once.
    drop(Mllama::build(cfg, &w, &Device::flex(), Some(32))?);
    if let Some(o) = w.open.borrow_mut().take() {
        w.close(o)?;
    }
    let closed = w.closed.into_inner();
    let n = closed.len();
    let mut weight_map = serde_json::Map::new();
    let mut shards = Vec::new();
    let mut tensors = 0;
    for (i, (tmp, names)) in closed.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let to = dir.join(&file);
        std::fs::rename(&tmp, &to).map_err(io(&to))?;
        tensors += names.len();
        for name in names {
            weight_map.insert(name, file.clone().into());
        }
        shards.push(file);
    }
    let bytes = w.total.into_inner();
    let index = serde_json::json!({"metadata": {"total_size": bytes}, "weight_map": weight_map});
    let index_path = dir.join("model.safetensors.index.json");
    std::fs::write(
        &index_path,
        serde_json::to_vec_pretty(&index).map_err(|e| CheckpointError::Format(e.to_string()))?,
    )
    .map_err(io(&index_path))?;
    Ok(Written { shards, tensors, bytes })
}
