//! Named f32 weights and their on-disk form: safetensors, with 4-bit convolution weights.
//!
//! A 1×1 convolution weight (`[out, in, 1, 1]`, 97% of MobileNetV2's convolution weights) is
//! stored in 4 bits as two tensors, `{name}.q4` (U8, packed nibbles) and `{name}.q4scale` (F16,
//! one per group), with the logical shape and group size in the safetensors metadata under
//! `q4:{name}` (e.g. `"96,16,1,1;32"`). Spatial convolution weights (the stem and the depthwise
//! 3×3s) are F16: in 4 bits they cost the most accuracy for the least memory. Everything else
//! (biases, heads) is F32.
//!
//! A linear weight of the mllama family may instead be stored in the grid its model holds on
//! the device ([`crate::quant::Q4Blocks`]): `{name}.q4out` (U8) and `{name}.q4outscale` (F16),
//! its checkpoint shape and block under `q4out:{name}` (e.g. `"4096,4096;32"`).

use crate::quant::{Q4Blocks, Q4Tensor, QuantError};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::{BTreeMap, HashMap};

/// A tensor of f32 values with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<f32>,
}

/// Why weights could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// A tensor the model needs is absent.
    #[error("weights: tensor {0:?} is missing")]
    Missing(String),
    /// A tensor has the wrong shape.
    #[error("weights: tensor {name:?} has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Found shape.
        found: Vec<usize>,
    },
    /// The file is not valid.
    #[error("weights: {0}")]
    Format(String),
    /// 4-bit data is inconsistent.
    #[error("weights: tensor {name:?}: {source}")]
    Quant {
        /// Tensor name.
        name: String,
        /// Cause.
        source: QuantError,
    },
}

/// How a tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// f32.
    F32,
    /// f16.
    F16,
    /// 4 bits, a f16 scale per group.
    Q4,
    /// A `[out, in]` linear weight in 4 bits in the grid the model holds on the device: one f16
    /// scale per input and this many outputs ([`Q4Blocks`]).
    Q4Out(usize),
}

/// A set of named tensors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Weights(pub BTreeMap<String, NamedTensor>);

impl Weights {
    /// Adds or replaces a tensor.
    pub fn insert(&mut self, name: String, t: NamedTensor) {
        self.0.insert(name, t);
    }

    /// A tensor by name.
    pub fn get(&self, name: &str) -> Result<&NamedTensor, WeightError> {
        self.0.get(name).ok_or_else(|| WeightError::Missing(name.to_string()))
    }

    /// A tensor by name, checking its shape.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<&NamedTensor, WeightError> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(WeightError::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        Ok(t)
    }

    /// Serializes to safetensors, 1×1 convolution weights in 4 bits with the given group size,
    /// spatial kernels in f16 (the stem and the depthwise 3x3s, about 3% of the weights, are what
    /// 4 bits damages most), the rest in f32.
    pub fn to_safetensors(&self, group: usize) -> Result<Vec<u8>, WeightError> {
        self.to_safetensors_by(group, |name, shape| {
            let conv = shape.len() == 4 && name.ends_with(".weight");
            match conv {
                true if (shape[2], shape[3]) != (1, 1) => Storage::F16,
                true => Storage::Q4,
                false => Storage::F32,
            }
        })
    }

    /// Serializes to safetensors, each tensor stored as `storage(name, shape)` says (4-bit
    /// tensors in groups of `group` along their rows).
    pub fn to_safetensors_by(
        &self,
        group: usize,
        storage: impl Fn(&str, &[usize]) -> Storage,
    ) -> Result<Vec<u8>, WeightError> {
        let mut w = SafetensorsWriter::new(group);
        for (name, t) in &self.0 {
            w.push(name, t, storage(name, &t.shape));
        }
        w.finish()
    }

    /// `bytes` (safetensors) with the f32 tensors named in `replace` put in their place (same
    /// shape), every other tensor and the metadata kept byte for byte: a new head on a backbone
    /// that must stay exactly as it was signed (`trainer adapt`).
    pub fn replace_f32(bytes: &[u8], replace: &Weights) -> Result<Vec<u8>, WeightError> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| WeightError::Format(e.to_string()))?;
        let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| WeightError::Format(e.to_string()))?;
        let mut owned: Vec<Owned> = Vec::new();
        for (name, view) in st.tensors() {
            let Some(t) = replace.0.get(&name) else {
                owned.push((name, view.dtype(), view.shape().to_vec(), view.data().to_vec()));
                continue;
            };
            if view.dtype() != Dtype::F32 {
                return Err(WeightError::Format(format!(
                    "tensor {name:?} is stored as {:?}; only f32 tensors can be replaced",
                    view.dtype()
                )));
            }
            if view.shape() != t.shape.as_slice() {
                return Err(WeightError::Shape {
                    name,
                    expected: view.shape().to_vec(),
                    found: t.shape.clone(),
                });
            }
            owned.push((
                name,
                Dtype::F32,
                t.shape.clone(),
                t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
        }
        if let Some(missing) = replace.0.keys().find(|n| !owned.iter().any(|(o, ..)| o == *n)) {
            return Err(WeightError::Missing(missing.clone()));
        }
        serialize(&owned, metadata.metadata().clone())
    }

    /// Reads safetensors written by [`Weights::to_safetensors`], dequantizing 4-bit tensors.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Weights, WeightError> {
        let view = WeightsView::new(bytes)?;
        let mut out = Weights::default();
        for name in view.names() {
            out.insert(name.to_string(), view.get(name)?);
        }
        Ok(out)
    }
}

/// Safetensors in the form [`Weights::to_safetensors_by`] writes, filled one tensor at a time:
/// what it holds is the encoded tensors (4 bits where asked), never the f32 set.
pub struct SafetensorsWriter {
    group: usize,
    owned: Vec<Owned>,
    meta: HashMap<String, String>,
}

impl SafetensorsWriter {
    /// 4-bit tensors in groups of `group` along their rows.
    pub fn new(group: usize) -> Self {
        SafetensorsWriter {
            group,
            owned: Vec::new(),
            meta: HashMap::new(),
        }
    }

    /// Encodes `t` as `kind` under `name`.
    pub fn push(&mut self, name: &str, t: &NamedTensor, kind: Storage) {
        let name = name.to_string();
        match kind {
            Storage::F16 => {
                let bytes = t
                    .values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect();
                self.owned.push((name, Dtype::F16, t.shape.clone(), bytes));
            }
            Storage::Q4 => {
                let q = Q4Tensor::quantize(&t.values, &t.shape, self.group);
                let shape_s: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
                self.meta
                    .insert(format!("q4:{name}"), format!("{};{}", shape_s.join(","), self.group));
                self.owned
                    .push((format!("{name}.q4"), Dtype::U8, vec![q.packed.len()], q.packed));
                let scales: Vec<u8> = q.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                self.owned
                    .push((format!("{name}.q4scale"), Dtype::F16, vec![q.scales.len()], scales));
            }
            Storage::Q4Out(block) => {
                let [d_out, d_in] = t.shape[..] else {
                    panic!(
                        "{name}: a 4-bit grid of blocks is for [out, in] weights, not {:?}",
                        t.shape
                    );
                };
                let q = Q4Blocks::quantize(&t.values, d_out, d_in, block);
                self.meta
                    .insert(format!("q4out:{name}"), format!("{d_out},{d_in};{block}"));
                self.owned
                    .push((format!("{name}.q4out"), Dtype::U8, vec![q.packed.len()], q.packed));
                let scales: Vec<u8> = q.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                self.owned
                    .push((format!("{name}.q4outscale"), Dtype::F16, vec![q.scales.len()], scales));
            }
            Storage::F32 => {
                let bytes = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.owned.push((name, Dtype::F32, t.shape.clone(), bytes));
            }
        }
    }

    /// The safetensors bytes.
    pub fn finish(self) -> Result<Vec<u8>, WeightError> {
        serialize(&self.owned, Some(self.meta))
    }
}

/// Weights in safetensors written by [`Weights::to_safetensors`], read one tensor at a time:
/// a 4-bit tensor is dequantized only when asked for, so a model can be built from them while
/// holding no more f32 values than one tensor's.
pub struct WeightsView<'a> {
    st: SafeTensors<'a>,
    /// Logical name of each 4-bit tensor: its shape and group.
    q4: BTreeMap<String, (Vec<usize>, usize)>,
    /// Logical name of each weight in the device's grid: `(out, in, block)`.
    q4out: BTreeMap<String, (usize, usize, usize)>,
}

impl<'a> WeightsView<'a> {
    /// Parses the header and the 4-bit layouts (no tensor is converted).
    pub fn new(bytes: &'a [u8]) -> Result<Self, WeightError> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| WeightError::Format(e.to_string()))?;
        let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| WeightError::Format(e.to_string()))?;
        let meta = metadata.metadata().clone().unwrap_or_default();
        let mut q4 = BTreeMap::new();
        for (key, layout) in meta.iter().filter(|(k, _)| k.starts_with("q4:")) {
            let name = &key[3..];
            let bad = || WeightError::Format(format!("bad 4-bit layout {layout:?} for {name:?}"));
            let (shape_s, group_s) = layout.split_once(';').ok_or_else(bad)?;
            let shape: Vec<usize> = shape_s
                .split(',')
                .map(|d| d.parse().map_err(|_| bad()))
                .collect::<Result<_, _>>()?;
            let group: usize = group_s.parse().map_err(|_| bad())?;
            q4.insert(name.to_string(), (shape, group));
        }
        let mut q4out = BTreeMap::new();
        for (key, layout) in meta.iter().filter(|(k, _)| k.starts_with("q4out:")) {
            let name = &key["q4out:".len()..];
            let bad = || WeightError::Format(format!("bad 4-bit grid {layout:?} for {name:?}"));
            let parse = |v: &str| v.parse::<usize>().map_err(|_| bad());
            let (shape, block) = layout.split_once(';').ok_or_else(bad)?;
            let (d_out, d_in) = shape.split_once(',').ok_or_else(bad)?;
            q4out.insert(name.to_string(), (parse(d_out)?, parse(d_in)?, parse(block)?));
        }
        Ok(WeightsView { st, q4, q4out })
    }

    /// Every logical tensor name (4-bit tensors under their own name, not their parts).
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .st
            .names()
            .into_iter()
            .filter(|n| !(n.ends_with(".q4") || n.ends_with(".q4scale")))
            .filter(|n| !(n.ends_with(".q4out") || n.ends_with(".q4outscale")))
            .collect();
        names.extend(self.q4.keys().map(String::as_str));
        names.extend(self.q4out.keys().map(String::as_str));
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The shape of `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, WeightError> {
        if let Some((shape, _)) = self.q4.get(name) {
            return Ok(shape.clone());
        }
        if let Some(&(d_out, d_in, _)) = self.q4out.get(name) {
            return Ok(vec![d_out, d_in]);
        }
        let view = self
            .st
            .tensor(name)
            .map_err(|_| WeightError::Missing(name.to_string()))?;
        Ok(view.shape().to_vec())
    }

    /// The tensor `name` in f32, a band of about `rows_per_piece` rows (of its first dimension)
    /// at a time: `f` gets each band's values. A 4-bit tensor is unpacked band by band.
    pub fn rows(&self, name: &str, rows_per_piece: usize, f: &mut dyn FnMut(&[f32])) -> Result<(), WeightError> {
        if let Some(&layout) = self.q4out.get(name) {
            let (packed, scales) = self.grid_parts(name)?;
            let mut band = Vec::new();
            for r0 in (0..layout.0).step_by(rows_per_piece.max(1)) {
                band.clear();
                let r1 = (r0 + rows_per_piece.max(1)).min(layout.0);
                Q4Blocks::dequantize_rows(layout, packed, scales, r0..r1, &mut band).map_err(|source| {
                    WeightError::Quant {
                        name: name.to_string(),
                        source,
                    }
                })?;
                f(&band);
            }
            return Ok(());
        }
        let Some((shape, group)) = self.q4.get(name) else {
            f(&self.get(name)?.values);
            return Ok(());
        };
        let (packed, scales) = (
            self.stored_part(name, ".q4", Dtype::U8)?,
            self.stored_part(name, ".q4scale", Dtype::F16)?,
        );
        let quant = |source| WeightError::Quant {
            name: name.to_string(),
            source,
        };
        let n = shape.first().copied().unwrap_or(0);
        let mut band = Vec::new();
        for r0 in (0..n).step_by(rows_per_piece.max(1)) {
            band.clear();
            let r1 = (r0 + rows_per_piece.max(1)).min(n);
            crate::quant::dequantize_rows(shape, *group, packed, scales, r0..r1, &mut band).map_err(quant)?;
            f(&band);
        }
        Ok(())
    }

    /// The bytes of the stored part `{name}{suffix}` of a 4-bit tensor, which must be `dtype`.
    fn stored_part(&self, name: &str, suffix: &str, dtype: Dtype) -> Result<&'a [u8], WeightError> {
        let v = self
            .st
            .tensor(&format!("{name}{suffix}"))
            .map_err(|_| WeightError::Missing(format!("{name}{suffix}")))?;
        if v.dtype() != dtype {
            return Err(WeightError::Format(format!(
                "4-bit tensor {name:?}: {suffix} is {:?}",
                v.dtype()
            )));
        }
        Ok(v.data())
    }

    /// The stored parts of a weight in the device's grid: packed values and f16 scale bytes.
    fn grid_parts(&self, name: &str) -> Result<(&'a [u8], &'a [u8]), WeightError> {
        Ok((
            self.stored_part(name, ".q4out", Dtype::U8)?,
            self.stored_part(name, ".q4outscale", Dtype::F16)?,
        ))
    }

    /// A `[out, in]` weight (`shape`) stored in the device's grid with `block` outputs per
    /// scale: its values (`[in, out]`, one a byte, in room for `capacity`) and f32 scales as
    /// stored. `None` for a tensor stored any other way or with other blocks; an error for one
    /// of another shape.
    pub fn grid(
        &self,
        name: &str,
        shape: [usize; 2],
        block: usize,
        capacity: usize,
    ) -> Result<Option<crate::quant::GridParts>, WeightError> {
        let Some(&layout) = self.q4out.get(name).filter(|l| l.2 == block) else {
            return Ok(None);
        };
        if [layout.0, layout.1] != shape {
            return Err(WeightError::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: vec![layout.0, layout.1],
            });
        }
        let (packed, scales) = self.grid_parts(name)?;
        Q4Blocks::values_and_scales(layout, packed, scales, capacity)
            .map(Some)
            .map_err(|source| WeightError::Quant {
                name: name.to_string(),
                source,
            })
    }

    /// The tensor `name` in f32.
    pub fn get(&self, name: &str) -> Result<NamedTensor, WeightError> {
        if self.q4.contains_key(name) || self.q4out.contains_key(name) {
            // A 4-bit tensor, in either form: unpacked as its rows are.
            let mut values = Vec::new();
            self.rows(name, usize::MAX, &mut |v| values.extend_from_slice(v))?;
            return Ok(NamedTensor {
                shape: self.shape(name)?,
                values,
            });
        }
        let view = self
            .st
            .tensor(name)
            .map_err(|_| WeightError::Missing(name.to_string()))?;
        let values = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => view
                .data()
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(WeightError::Format(format!(
                    "tensor {name:?} is {other:?}, expected F32 or F16"
                )));
            }
        };
        Ok(NamedTensor {
            shape: view.shape().to_vec(),
            values,
        })
    }
}

/// A tensor about to be written: name, dtype, shape, bytes.
type Owned = (String, Dtype, Vec<usize>, Vec<u8>);

/// Writes tensors and metadata as safetensors.
fn serialize(owned: &[Owned], meta: Option<HashMap<String, String>>) -> Result<Vec<u8>, WeightError> {
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            Ok((
                n.clone(),
                TensorView::new(*d, s.clone(), b).map_err(|e| WeightError::Format(e.to_string()))?,
            ))
        })
        .collect::<Result<_, WeightError>>()?;
    safetensors::serialize(views, meta).map_err(|e| WeightError::Format(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Weights {
        let mut w = Weights::default();
        let conv: Vec<f32> = (0..2 * 3 * 3 * 3).map(|i| (i as f32 - 27.0) / 10.0).collect();
        w.insert(
            "a.weight".into(),
            NamedTensor {
                shape: vec![2, 27, 1, 1],
                values: conv.clone(),
            },
        );
        w.insert(
            "dw.weight".into(),
            NamedTensor {
                shape: vec![2, 1, 3, 3],
                values: conv[..18].to_vec(),
            },
        );
        w.insert(
            "a.bias".into(),
            NamedTensor {
                shape: vec![2],
                values: vec![0.5, -0.25],
            },
        );
        w.insert(
            "head.weight".into(),
            NamedTensor {
                shape: vec![2, 2],
                values: vec![1.0, 2.0, 3.0, 4.0],
            },
        );
        w
    }

    #[test]
    fn replacing_a_head_keeps_every_other_tensor_byte_for_byte() {
        let w = sample();
        let bytes = w.to_safetensors(32).unwrap();
        let mut head = Weights::default();
        head.insert(
            "head.weight".into(),
            NamedTensor {
                shape: vec![2, 2],
                values: vec![-1.0, 0.5, 0.25, 8.0],
            },
        );
        let new = Weights::replace_f32(&bytes, &head).unwrap();
        let (old_st, new_st) = (
            SafeTensors::deserialize(&bytes).unwrap(),
            SafeTensors::deserialize(&new).unwrap(),
        );
        for name in ["a.weight.q4", "a.weight.q4scale", "dw.weight", "a.bias"] {
            assert_eq!(
                old_st.tensor(name).unwrap().data(),
                new_st.tensor(name).unwrap().data(),
                "{name}"
            );
        }
        let back = Weights::from_safetensors(&new).unwrap();
        assert_eq!(back.get("head.weight").unwrap(), head.get("head.weight").unwrap());
        assert_eq!(
            back.get("a.weight").unwrap(),
            Weights::from_safetensors(&bytes).unwrap().get("a.weight").unwrap()
        );
        // A tensor of another shape, an absent one, or a 4-bit one cannot be put in.
        let bad = |name: &str, shape: Vec<usize>| {
            let mut r = Weights::default();
            let n = shape.iter().product();
            r.insert(
                name.into(),
                NamedTensor {
                    shape,
                    values: vec![0.0; n],
                },
            );
            Weights::replace_f32(&bytes, &r).unwrap_err()
        };
        assert!(matches!(bad("head.weight", vec![4]), WeightError::Shape { .. }));
        assert!(matches!(bad("head.other", vec![2]), WeightError::Missing(_)));
        assert!(matches!(bad("dw.weight", vec![2, 1, 3, 3]), WeightError::Format(_)));
    }

    #[test]
    fn pointwise_weights_go_4_bit_spatial_f16_the_rest_exact() {
        let w = sample();
        let bytes = w.to_safetensors(32).unwrap();
        let back = Weights::from_safetensors(&bytes).unwrap();
        assert_eq!(back.get("a.bias").unwrap(), w.get("a.bias").unwrap());
        assert_eq!(back.get("head.weight").unwrap(), w.get("head.weight").unwrap());
        let (a, b) = (
            &w.get("a.weight").unwrap().values,
            &back.get("a.weight").unwrap().values,
        );
        // One group per row of 27 values with max |w| 2.7: step 2.7/7.
        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 2.7 / 7.0 / 2.0 + 1e-3));
        assert_eq!(back.get("a.weight").unwrap().shape, vec![2, 27, 1, 1]);
        let (d, db) = (
            &w.get("dw.weight").unwrap().values,
            &back.get("dw.weight").unwrap().values,
        );
        assert!(
            d.iter().zip(db).all(|(x, y)| (x - y).abs() <= 2e-3),
            "3x3 weights keep f16 precision"
        );
    }

    #[test]
    fn damaged_file_and_wrong_shape_are_errors() {
        let bytes = sample().to_safetensors(8).unwrap();
        assert!(Weights::from_safetensors(&bytes[..bytes.len() / 2]).is_err());
        assert!(Weights::from_safetensors(b"garbage").is_err());
        let back = Weights::from_safetensors(&bytes).unwrap();
        assert!(matches!(
            back.get_shaped("a.bias", &[3]),
            Err(WeightError::Shape { .. })
        ));
        assert!(matches!(back.get("nope"), Err(WeightError::Missing(_))));
    }
}
