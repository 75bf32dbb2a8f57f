//! A 4-bit weight format for convolutional backbones.
//!
//! burn's Q4 block quantization runs blocks along the last dimension, which does not fit
//! convolution weights (`[out, in, k, k]`, last dimension 1 or 3) and destroys depthwise layers
//! when scaled per tensor. This format instead treats a weight as rows (`shape[0]`, the output
//! channels) of `fan_in = in·k·k` values and quantizes each row in groups of `group` values
//! (the last group of a row may be shorter): symmetric, `q = round(w / s)` in `-8..=7` with
//! the scale `s` (stored as f16) chosen per group to minimise the squared error, searching
//! clipping ratios of `max|w| / 7` from 0.5 to 1, two values packed per byte (low nibble first).
//! Depthwise rows (`fan_in` 9) therefore get one scale per channel.

use half::f16;

/// A 4-bit quantized weight tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Q4Tensor {
    /// Logical shape; `shape[0]` rows of `product(shape[1..])` values.
    pub shape: Vec<usize>,
    /// Group size along each row.
    pub group: usize,
    /// Packed 4-bit values (offset by 8), row-major, two per byte, low nibble first.
    pub packed: Vec<u8>,
    /// One scale per group, row-major.
    pub scales: Vec<f16>,
}

/// Why 4-bit data could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    /// Sizes of packed data or scales do not match the shape.
    #[error(
        "4-bit tensor of shape {shape:?} (group {group}) expects {expected_packed} packed bytes and {expected_scales} scales, found {packed} and {scales}"
    )]
    SizeMismatch {
        /// Shape.
        shape: Vec<usize>,
        /// Group size.
        group: usize,
        /// Expected packed length.
        expected_packed: usize,
        /// Expected scale count.
        expected_scales: usize,
        /// Found packed length.
        packed: usize,
        /// Found scale count.
        scales: usize,
    },
    /// Group size 0 or shape empty.
    #[error("invalid 4-bit layout: shape {0:?}, group {1}")]
    BadLayout(Vec<usize>, usize),
}

fn layout(shape: &[usize], group: usize) -> Result<(usize, usize, usize), QuantError> {
    if group == 0 || shape.is_empty() || shape.contains(&0) {
        return Err(QuantError::BadLayout(shape.to_vec(), group));
    }
    let rows = shape[0];
    let cols: usize = shape[1..].iter().product();
    let groups_per_row = cols.div_ceil(group);
    Ok((rows, cols, groups_per_row))
}

/// The f16 scale that minimises the group's squared quantization error, searched over clipping
/// the range at 50–100 % of `max|w|` (clipping a few outliers buys resolution for the rest).
fn best_scale(g: &[f32]) -> f16 {
    let max = g.iter().fold(0f32, |m, v| m.max(v.abs()));
    if max == 0.0 {
        return f16::from_f32(1.0);
    }
    let mut best = (f32::INFINITY, f16::from_f32(max / 7.0));
    for step in 0..=20 {
        let clip = 1.0 - 0.025 * step as f32;
        // Round the scale to f16 first so that the error is measured with the stored scale.
        let s = f16::from_f32(max * clip / 7.0);
        let sf = s.to_f32();
        if sf <= 0.0 {
            continue;
        }
        let err: f32 = g
            .iter()
            .map(|v| (v - (v / sf).round().clamp(-8.0, 7.0) * sf).powi(2))
            .sum();
        if err < best.0 {
            best = (err, s);
        }
    }
    best.1
}

impl Q4Tensor {
    /// Quantizes f32 values of the given shape.
    ///
    /// # Panics
    /// If `values.len()` differs from the shape's element count or the layout is invalid.
    pub fn quantize(values: &[f32], shape: &[usize], group: usize) -> Q4Tensor {
        let (rows, cols, gpr) = layout(shape, group).expect("valid 4-bit layout");
        assert_eq!(values.len(), rows * cols, "values do not match shape {shape:?}");
        let mut scales = Vec::with_capacity(rows * gpr);
        let mut q = Vec::with_capacity(values.len());
        for row in values.chunks(cols) {
            for g in row.chunks(group) {
                let s = best_scale(g);
                let sf = s.to_f32();
                scales.push(s);
                q.extend(g.iter().map(|v| ((v / sf).round().clamp(-8.0, 7.0) as i8 + 8) as u8));
            }
        }
        let packed = q
            .chunks(2)
            .map(|p| p[0] | (p.get(1).copied().unwrap_or(8) << 4))
            .collect();
        Q4Tensor {
            shape: shape.to_vec(),
            group,
            packed,
            scales,
        }
    }

    /// Checks that packed data and scales fit the shape (for data read from a file).
    pub fn validate(&self) -> Result<(), QuantError> {
        let (rows, cols, gpr) = layout(&self.shape, self.group)?;
        let expected_packed = (rows * cols).div_ceil(2);
        let expected_scales = rows * gpr;
        if self.packed.len() != expected_packed || self.scales.len() != expected_scales {
            return Err(QuantError::SizeMismatch {
                shape: self.shape.clone(),
                group: self.group,
                expected_packed,
                expected_scales,
                packed: self.packed.len(),
                scales: self.scales.len(),
            });
        }
        Ok(())
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for an empty tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Dequantizes to f32 values in row-major order.
    pub fn dequantize(&self) -> Result<Vec<f32>, QuantError> {
        self.validate()?;
        let (rows, cols, gpr) = layout(&self.shape, self.group)?;
        let mut out = Vec::with_capacity(rows * cols);
        dequantize_into(
            &self.packed,
            |k| self.scales[k].to_f32(),
            cols,
            gpr,
            self.group,
            0..rows,
            &mut out,
        );
        Ok(out)
    }
}

/// Rows `rows` of a 4-bit tensor of `shape` (groups of `group` along its rows) straight from
/// its stored parts: `packed` nibbles and `scales` as little-endian f16 bytes. Nothing else of
/// the tensor is unpacked, so a large weight can be read a band of rows at a time.
pub fn dequantize_rows(
    shape: &[usize],
    group: usize,
    packed: &[u8],
    scales: &[u8],
    rows: std::ops::Range<usize>,
    out: &mut Vec<f32>,
) -> Result<(), QuantError> {
    let (n_rows, cols, gpr) = layout(shape, group)?;
    let (expected_packed, expected_scales) = ((n_rows * cols).div_ceil(2), n_rows * gpr);
    if packed.len() != expected_packed || scales.len() != 2 * expected_scales || rows.end > n_rows {
        return Err(QuantError::SizeMismatch {
            shape: shape.to_vec(),
            group,
            expected_packed,
            expected_scales,
            packed: packed.len(),
            scales: scales.len() / 2,
        });
    }
    let scale = |k: usize| f16::from_le_bytes([scales[2 * k], scales[2 * k + 1]]).to_f32();
    dequantize_into(packed, scale, cols, gpr, group, rows, out);
    Ok(())
}

/// Appends rows `rows` (sizes already checked) to `out`.
fn dequantize_into(
    packed: &[u8],
    scale: impl Fn(usize) -> f32,
    cols: usize,
    gpr: usize,
    group: usize,
    rows: std::ops::Range<usize>,
    out: &mut Vec<f32>,
) {
    out.reserve(rows.len() * cols);
    for row in rows {
        for col in 0..cols {
            let i = row * cols + col;
            let byte = packed[i / 2];
            let nib = if i.is_multiple_of(2) { byte & 0x0f } else { byte >> 4 };
            out.push((nib as i32 - 8) as f32 * scale(row * gpr + col / group));
        }
    }
}

/// A linear weight in the 4-bit grid the model holds on its device: burn's `Q4S` scheme with one
/// scale per `block` output values ([`crate::mllama::frozen::q4_scheme`]). Stored in that grid,
/// a bundle's projections are built on the device from their values and scales as they are,
/// where a grid of its own (groups along the input, [`Q4Tensor`]) had to be unpacked and
/// quantized again, rounding every weight twice.
///
/// Layout: the weight as the model holds it, `[in, out]` (the checkpoint's `[out, in]`
/// transposed), values offset by 8 and packed two a byte (low nibble first), and one f16 scale
/// per input and block of outputs, `[in, out / block]`. The scale is burn's rule,
/// `2·max|x| / (b − a)` for the scheme's range `[a, b]`, rounded to f16 before the values are.
#[derive(Debug, Clone, PartialEq)]
pub struct Q4Blocks {
    /// Output values (the checkpoint's rows).
    pub d_out: usize,
    /// Input values.
    pub d_in: usize,
    /// Output values per scale.
    pub block: usize,
    /// `[in, out]` values, two a byte.
    pub packed: Vec<u8>,
    /// `[in, out / block]`.
    pub scales: Vec<f16>,
}

/// A weight in the device's grid as the model is built from it: its values (`[in, out]`, one a
/// byte) and f32 scales (`[in, out / block]`).
pub type GridParts = (Vec<i8>, Vec<f32>);

/// The scheme's range of values, `[a, b]`.
fn q4s_range() -> (f32, f32) {
    burn::tensor::quantization::QuantValue::Q4S.range()
}

/// burn's symmetric 4-bit rule (`Q4S`), the one every 4-bit weight the model holds is made
/// with: the scale of a block whose largest magnitude is `max_abs`, `2·max_abs / (b − a)`
/// (the smallest positive f32 for a block of zeros).
pub fn q4s_scale(max_abs: f32) -> f32 {
    let (a, b) = q4s_range();
    let s = max_abs * 2.0 / (b - a);
    if s > 0.0 && s.is_finite() { s } else { f32::MIN_POSITIVE }
}

/// The same rule's value of `x` at a scale whose inverse is `inv_scale`.
pub fn q4s_value(x: f32, inv_scale: f32) -> i8 {
    let (a, b) = q4s_range();
    (x * inv_scale).round().clamp(a, b) as i8
}

impl Q4Blocks {
    /// Quantizes a weight given in the checkpoint's form, `d_out` rows of `d_in` values.
    ///
    /// # Panics
    /// If `block` is 0 or does not divide `d_out`, or `values` is not `d_out × d_in` long.
    pub fn quantize(values: &[f32], d_out: usize, d_in: usize, block: usize) -> Q4Blocks {
        assert!(
            block > 0 && d_out.is_multiple_of(block),
            "{d_out} outputs in blocks of {block}"
        );
        assert_eq!(values.len(), d_out * d_in, "a [{d_out}, {d_in}] weight");
        let nb = d_out / block;
        let mut scales = vec![f16::ZERO; d_in * nb];
        let mut q = vec![0u8; d_in * d_out];
        for i in 0..d_in {
            for j in 0..nb {
                let rows = j * block..(j + 1) * block;
                let m = rows.clone().fold(0f32, |m, o| m.max(values[o * d_in + i].abs()));
                // The device's rule with the scale as stored (f16; its largest finite value
                // bounds it, weights never come near). A block of zeros, or of values f16
                // cannot tell from zero, gets 1 and zeros.
                let s = match f16::from_f32(q4s_scale(m).min(f16::MAX.to_f32())) {
                    s if s.to_f32() > 0.0 => s,
                    _ => f16::ONE,
                };
                scales[i * nb + j] = s;
                let inv = 1.0 / s.to_f32();
                for o in rows {
                    q[i * d_out + o] = (q4s_value(values[o * d_in + i], inv) + 8) as u8;
                }
            }
        }
        let packed = q
            .chunks(2)
            .map(|p| p[0] | (p.get(1).copied().unwrap_or(8) << 4))
            .collect();
        Q4Blocks {
            d_out,
            d_in,
            block,
            packed,
            scales,
        }
    }

    /// Checks the stored parts' sizes against the layout (for data read from a file).
    fn check(d_out: usize, d_in: usize, block: usize, packed: &[u8], scales: &[u8]) -> Result<(), QuantError> {
        if block == 0 || d_out == 0 || d_in == 0 || !d_out.is_multiple_of(block) {
            return Err(QuantError::BadLayout(vec![d_out, d_in], block));
        }
        let (expected_packed, expected_scales) = ((d_in * d_out).div_ceil(2), d_in * d_out / block);
        if packed.len() != expected_packed || scales.len() != 2 * expected_scales {
            return Err(QuantError::SizeMismatch {
                shape: vec![d_out, d_in],
                group: block,
                expected_packed,
                expected_scales,
                packed: packed.len(),
                scales: scales.len() / 2,
            });
        }
        Ok(())
    }

    /// The values (`[in, out]`, one a byte, in `capacity`-sized room) and f32 scales straight
    /// from the stored parts (`scales` as little-endian f16 bytes): what the model's
    /// quantized weight is made of, with nothing rounded again.
    pub fn values_and_scales(
        (d_out, d_in, block): (usize, usize, usize),
        packed: &[u8],
        scales: &[u8],
        capacity: usize,
    ) -> Result<GridParts, QuantError> {
        Self::check(d_out, d_in, block, packed, scales)?;
        let n = d_in * d_out;
        let mut q = Vec::with_capacity(capacity.max(n));
        q.extend(
            packed
                .iter()
                .flat_map(|&b| [(b & 0x0f) as i8 - 8, (b >> 4) as i8 - 8])
                .take(n),
        );
        let s = scales
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        Ok((q, s))
    }

    /// Rows `rows` of the checkpoint's form (`[out, in]`) in f32, appended to `out`.
    pub fn dequantize_rows(
        (d_out, d_in, block): (usize, usize, usize),
        packed: &[u8],
        scales: &[u8],
        rows: std::ops::Range<usize>,
        out: &mut Vec<f32>,
    ) -> Result<(), QuantError> {
        Self::check(d_out, d_in, block, packed, scales)?;
        if rows.end > d_out {
            return Err(QuantError::BadLayout(vec![d_out, d_in], block));
        }
        let nb = d_out / block;
        out.reserve(rows.len() * d_in);
        for o in rows {
            for i in 0..d_in {
                let at = i * d_out + o;
                let byte = packed[at / 2];
                let nib = if at.is_multiple_of(2) { byte & 0x0f } else { byte >> 4 };
                let k = 2 * (i * nb + o / block);
                let s = f16::from_le_bytes([scales[k], scales[k + 1]]).to_f32();
                out.push((nib as i32 - 8) as f32 * s);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn exact_grid_values_survive_and_odd_sizes_pack() {
        // Values already on the grid of max/7 come back exactly (zero error wins the search).
        let v = [-7.0, 0.0, 3.0, 7.0, 1.0, -2.0, 0.5];
        let q = Q4Tensor::quantize(&v, &[1, 7], 4);
        assert_eq!(q.packed.len(), 4);
        assert_eq!(q.scales.len(), 2);
        let d = q.dequantize().unwrap();
        assert_eq!(&d[..4], &v[..4]);
        assert_eq!(d.len(), 7);
    }

    #[test]
    fn depthwise_rows_get_their_own_scale() {
        // Two channels with very different ranges: per-row scales keep both accurate.
        let mut v = vec![0.001f32; 9];
        v.extend([100.0f32; 9]);
        let d = Q4Tensor::quantize(&v, &[2, 1, 3, 3], 32).dequantize().unwrap();
        assert!((d[0] - 0.001).abs() < 2e-4);
        assert!((d[9] - 100.0).abs() < 0.1);
    }

    #[test]
    fn rows_read_from_the_stored_parts_equal_the_whole_tensor_dequantized() {
        // An odd row length: rows share bytes.
        let shape = [5, 7];
        let values: Vec<f32> = (0..35).map(|i| (i as f32 * 0.37).sin()).collect();
        let q = Q4Tensor::quantize(&values, &shape, 4);
        let whole = q.dequantize().unwrap();
        let scales: Vec<u8> = q.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut got = Vec::new();
        for r in [0..2, 2..3, 3..5] {
            dequantize_rows(&shape, 4, &q.packed, &scales, r, &mut got).unwrap();
        }
        assert_eq!(got, whole);
        assert!(dequantize_rows(&shape, 4, &q.packed[1..], &scales, 0..1, &mut got).is_err());
        assert!(dequantize_rows(&shape, 4, &q.packed, &scales, 4..6, &mut got).is_err());
    }

    #[test]
    fn corrupt_sizes_are_an_error_not_a_panic() {
        let mut q = Q4Tensor::quantize(&[1.0; 64], &[4, 16], 8);
        q.packed.pop();
        assert!(matches!(q.dequantize(), Err(QuantError::SizeMismatch { .. })));
        q.shape = vec![0];
        assert!(matches!(q.validate(), Err(QuantError::BadLayout(..))));
    }

    fn plain_error(g: &[f32]) -> f32 {
        let max = g.iter().fold(0f32, |m, v| m.max(v.abs()));
        if max == 0.0 {
            return 0.0;
        }
        let s = f16::from_f32(max / 7.0).to_f32();
        g.iter()
            .map(|v| (v - (v / s).round().clamp(-8.0, 7.0) * s).powi(2))
            .sum()
    }

    proptest! {
        #[test]
        fn searched_scales_never_lose_to_max_scaling(values in prop::collection::vec(-10f32..10.0, 1..200), group in 1usize..40) {
            let n = values.len();
            let q = Q4Tensor::quantize(&values, &[1, n], group);
            let d = q.dequantize().unwrap();
            for (gi, (g, dg)) in values.chunks(group).zip(d.chunks(group)).enumerate() {
                let ours: f32 = g.iter().zip(dg).map(|(a, b)| (a - b).powi(2)).sum();
                let plain = plain_error(g);
                prop_assert!(ours <= plain * (1.0 + 1e-4) + 1e-6, "group {gi}: {ours} > {plain}");
                // No value moves by more than half the group's range.
                let max = g.iter().fold(0f32, |m, v| m.max(v.abs()));
                prop_assert!(g.iter().zip(dg).all(|(a, b)| (a - b).abs() <= 0.5 * max + 1e-3));
            }
        }
    }

    #[test]
    fn a_weight_in_the_device_grid_comes_back_as_stored_and_as_its_rows() {
        let (d_out, d_in, block) = (64, 5, 32);
        let values: Vec<f32> = (0..d_out * d_in)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let q = Q4Blocks::quantize(&values, d_out, d_in, block);
        let scales: Vec<u8> = q.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        let (vals, s) = Q4Blocks::values_and_scales((d_out, d_in, block), &q.packed, &scales, 0).unwrap();
        assert_eq!((vals.len(), s.len()), (d_out * d_in, d_in * 2));
        let mut rows = Vec::new();
        Q4Blocks::dequantize_rows((d_out, d_in, block), &q.packed, &scales, 0..d_out, &mut rows).unwrap();
        let (a, b) = q4s_range();
        for o in 0..d_out {
            for i in 0..d_in {
                let (v, sc) = (vals[i * d_out + o], s[i * 2 + o / block]);
                assert!(f32::from(v) >= a && f32::from(v) <= b);
                // The rows are the stored values times their scales, within half a step of
                // the weight (or clipped at the range's top).
                assert_eq!(rows[o * d_in + i], f32::from(v) * sc);
                assert!((rows[o * d_in + i] - values[o * d_in + i]).abs() <= sc * 0.5 + 1e-6 || v == 7);
            }
        }
        // A band of rows is the same rows.
        let mut band = Vec::new();
        Q4Blocks::dequantize_rows((d_out, d_in, block), &q.packed, &scales, 10..20, &mut band).unwrap();
        assert_eq!(band, rows[10 * d_in..20 * d_in]);
        // Damaged parts are refused, not read.
        assert!(Q4Blocks::values_and_scales((d_out, d_in, block), &q.packed[1..], &scales, 0).is_err());
        assert!(Q4Blocks::dequantize_rows((d_out, d_in, 48), &q.packed, &scales, 0..1, &mut band).is_err());
        assert!(Q4Blocks::dequantize_rows((d_out, d_in, block), &q.packed, &scales, 0..65, &mut band).is_err());
    }
}
