//! MixStyle (Zhou et al., "Domain generalization with MixStyle", ICLR 2021) on the cached
//! activations that enter the first trained block.
//!
//! Each feature map's per-channel mean and standard deviation carry much of an image's "style"
//! (stain, contrast, optics); its normalised map carries the content. MixStyle gives each cell
//! of a batch a style interpolated between its own and that of a partner cell, with a weight
//! drawn from Beta(α, α). Partners are taken from another source where the batch has one, so
//! that a blast from one scanner is shown, now and then, with the statistics of another's
//! cells: "looks like that scanner" stops predicting the class.

use rand::Rng;

/// MixStyle's settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MixStyle {
    /// Probability that a batch is mixed at all.
    pub p: f64,
    /// Beta(α, α) parameter of the mixing weight (small: mostly near 0 or 1).
    pub alpha: f64,
}

impl Default for MixStyle {
    fn default() -> Self {
        MixStyle { p: 0.5, alpha: 0.1 }
    }
}

/// A draw from Beta(a, a) by Jöhnk's method, in logarithms so that small `a` does not
/// underflow to 0 / 0.
pub fn beta_symmetric(rng: &mut impl Rng, a: f64) -> f64 {
    loop {
        let lx = rng.gen_range(f64::MIN_POSITIVE..1.0).ln() / a;
        let ly = rng.gen_range(f64::MIN_POSITIVE..1.0).ln() / a;
        let m = lx.max(ly);
        let lsum = m + ((lx - m).exp() + (ly - m).exp()).ln();
        if lsum <= 0.0 {
            return (lx - lsum).exp();
        }
    }
}

/// Per-channel mean and standard deviation of `n` feature maps `[n, c, hw]`.
fn stats(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<(f32, f32)> {
    (0..n * c)
        .map(|k| {
            let v = &x[k * hw..(k + 1) * hw];
            let mean = v.iter().sum::<f32>() / hw as f32;
            let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f32>() / hw as f32;
            (mean, (var + 1e-6).sqrt())
        })
        .collect()
}

/// A partner for every item: a random item of another source where there is one, else any
/// other item (itself in a batch of one).
pub fn partners(sources: &[&str], rng: &mut impl Rng) -> Vec<usize> {
    let n = sources.len();
    (0..n)
        .map(|i| {
            let other: Vec<usize> = (0..n).filter(|&j| sources[j] != sources[i]).collect();
            if !other.is_empty() {
                other[rng.gen_range(0..other.len())]
            } else if n > 1 {
                let j = rng.gen_range(0..n - 1);
                if j >= i { j + 1 } else { j }
            } else {
                i
            }
        })
        .collect()
}

impl MixStyle {
    /// Mixes the styles of a batch of feature maps `x` (`[n, c, h, w]` flattened, `hw = h·w`)
    /// in place, with the batch items' `sources`. Does nothing with probability `1 - p`.
    pub fn apply(&self, x: &mut [f32], c: usize, hw: usize, sources: &[&str], rng: &mut impl Rng) {
        let n = sources.len();
        assert_eq!(x.len(), n * c * hw, "feature maps and sources disagree");
        if n < 2 || !rng.gen_bool(self.p.clamp(0.0, 1.0)) {
            return;
        }
        let st = stats(x, n, c, hw);
        let with = partners(sources, rng);
        for (i, &j) in with.iter().enumerate() {
            let lambda = beta_symmetric(rng, self.alpha) as f32;
            for ch in 0..c {
                let (mi, si) = st[i * c + ch];
                let (mj, sj) = st[j * c + ch];
                let (m, s) = (lambda * mi + (1.0 - lambda) * mj, lambda * si + (1.0 - lambda) * sj);
                let k = i * c + ch;
                for v in &mut x[k * hw..(k + 1) * hw] {
                    *v = (*v - mi) / si * s + m;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn beta_draws_lie_in_the_unit_interval_centred_on_a_half_and_pile_at_the_ends_for_small_alpha() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let draws: Vec<f64> = (0..20_000).map(|_| beta_symmetric(&mut rng, 0.1)).collect();
        assert!(draws.iter().all(|d| (0.0..=1.0).contains(d) && d.is_finite()));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
        // Beta(0.1, 0.1) puts about 76 % of its mass below 0.1 or above 0.9.
        let ends = draws.iter().filter(|&&d| !(0.1..=0.9).contains(&d)).count() as f64 / draws.len() as f64;
        assert!((0.70..0.82).contains(&ends), "ends {ends}");
        // Beta(1, 1) is uniform.
        let uni: Vec<f64> = (0..20_000).map(|_| beta_symmetric(&mut rng, 1.0)).collect();
        let low = uni.iter().filter(|&&d| d < 0.25).count() as f64 / uni.len() as f64;
        assert!((low - 0.25).abs() < 0.02, "uniform below 0.25: {low}");
    }

    #[test]
    fn partners_come_from_another_source_when_the_batch_has_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let s = ["pbc", "pbc", "munich", "pbc", "munich"];
        for _ in 0..50 {
            let p = partners(&s, &mut rng);
            for (i, &j) in p.iter().enumerate() {
                assert_ne!(s[i], s[j], "item {i} paired with {j}");
            }
        }
        let p = partners(&["pbc", "pbc", "pbc"], &mut rng);
        assert!(p.iter().enumerate().all(|(i, &j)| i != j && j < 3));
        assert_eq!(partners(&["pbc"], &mut rng), vec![0]);
    }

    #[test]
    fn mixing_moves_each_channel_between_the_two_styles_and_keeps_its_content() {
        let (c, hw) = (3, 16);
        // Item 0: small values around 0; item 1: the same pattern scaled ×4 and shifted by +10.
        let pattern: Vec<f32> = (0..c * hw).map(|k| ((k * 7 % 11) as f32 - 5.0) / 5.0).collect();
        let mut x: Vec<f32> = pattern.clone();
        x.extend(pattern.iter().map(|v| v * 4.0 + 10.0));
        let before = x.clone();
        let ms = MixStyle { p: 1.0, alpha: 0.1 };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        ms.apply(&mut x, c, hw, &["a", "b"], &mut rng);
        let st0 = stats(&before, 2, c, hw);
        let st = stats(&x, 2, c, hw);
        for k in 0..2 * c {
            let (lo_m, hi_m) = (st0[k % c].0.min(st0[c + k % c].0), st0[k % c].0.max(st0[c + k % c].0));
            assert!(
                st[k].0 >= lo_m - 1e-3 && st[k].0 <= hi_m + 1e-3,
                "mean of {k} outside the two styles"
            );
            // The content (the normalised map) is unchanged: correlation with the original is 1.
            let (a, b) = (&before[k * hw..(k + 1) * hw], &x[k * hw..(k + 1) * hw]);
            let (ma, mb) = (st0[k].0, st[k].0);
            let cov: f32 = a.iter().zip(b).map(|(p, q)| (p - ma) * (q - mb)).sum::<f32>() / hw as f32;
            let r = cov / (st0[k].1 * st[k].1);
            assert!((r - 1.0).abs() < 1e-3, "content of {k} changed: r = {r}");
        }
        // p = 0 leaves the batch alone.
        let mut y = before.clone();
        MixStyle { p: 0.0, alpha: 0.1 }.apply(&mut y, c, hw, &["a", "b"], &mut rng);
        assert_eq!(y, before);
    }
}
