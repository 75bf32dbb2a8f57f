//! Text generation: the prompt once (prefill, filling the preallocated cache and computing the
//! images' cross-attention keys and values once), then one token at a time; greedy, or
//! temperature and top-p sampling with a seeded generator; stops at a stop token or the limit.

use super::model::{Cache, Inputs, Mllama};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// Sampled from the tokens that make up `top_p` of the probability at `temperature`.
    TopP {
        /// Temperature (> 0).
        temperature: f32,
        /// Nucleus mass, in (0, 1].
        top_p: f32,
        /// Seed of the generator.
        seed: u64,
    },
}

/// The index of the largest value (the first of equals, as `argmax` does).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Samples from the nucleus of `logits / temperature`.
fn sample_top_p(logits: &[f32], temperature: f32, top_p: f32, rng: &mut impl Rng) -> usize {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
    let mut p: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i, f64::from((l - max) / temperature).exp()))
        .collect();
    let total: f64 = p.iter().map(|x| x.1).sum();
    p.iter_mut().for_each(|x| x.1 /= total);
    p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.0;
    for (_, q) in &p {
        kept += 1;
        mass += q;
        if mass >= f64::from(top_p) {
            break;
        }
    }
    let mut r = rng.r#gen::<f64>() * mass;
    for (i, q) in &p[..kept] {
        if r < *q {
            return *i;
        }
        r -= q;
    }
    p[kept - 1].0
}

/// A prompt that has run once: its last position's logits and the cache, with room for `room`
/// more tokens. Scoring and generation both continue from it (each from a copy of the cache).
#[derive(Clone)]
pub struct Prompted {
    last: Vec<f32>,
    cache: Cache,
    device: Device,
}

impl Prompted {
    /// Runs the prompt of `inputs` (one sequence).
    pub fn new(model: &Mllama, inputs: Inputs, room: usize) -> Self {
        let [b, s] = inputs.input_ids.dims();
        assert_eq!(b, 1, "one sequence");
        let device = inputs.input_ids.device();
        let (logits, cache) = model.prefill(inputs, s + room);
        Prompted {
            last: last_row(logits),
            cache,
            device,
        }
    }

    fn ids(&self, tokens: &[u32]) -> Tensor<2, Int> {
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let n = ids.len();
        Tensor::from_data(TensorData::new(ids, [1, n]), &self.device)
    }

    /// Generates up to `max_new` tokens (at most the room left); stops after a token of `stop`
    /// (which is returned).
    pub fn generate(&self, model: &Mllama, max_new: usize, stop: &[u32], sampling: Sampling) -> Vec<u32> {
        let mut cache = self.cache.clone();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(match sampling {
            Sampling::TopP { seed, .. } => seed,
            Sampling::Greedy => 0,
        });
        let mut next = self.last.clone();
        let mut out = Vec::with_capacity(max_new);
        for _ in 0..max_new {
            let token = match sampling {
                Sampling::Greedy => argmax(&next),
                Sampling::TopP { temperature, top_p, .. } => sample_top_p(&next, temperature, top_p, &mut rng),
            } as u32;
            out.push(token);
            if stop.contains(&token) || out.len() == max_new {
                break;
            }
            next = last_row(model.step(self.ids(&[token]), &mut cache));
        }
        out
    }

    /// The log-likelihood of each candidate continuation (token ids, not empty).
    pub fn score(&self, model: &Mllama, candidates: &[Vec<u32>]) -> Vec<f32> {
        assert!(candidates.iter().all(|c| !c.is_empty()), "empty candidate");
        let first = log_softmax(&self.last);
        let v = self.last.len();
        candidates
            .iter()
            .map(|c| {
                let mut total = first[c[0] as usize];
                if c.len() > 1 {
                    let mut cache = self.cache.clone();
                    let out = model
                        .step(self.ids(&c[..c.len() - 1]), &mut cache)
                        .into_data()
                        .try_to_vec::<f32>()
                        .expect("f32 logits");
                    for (k, t) in c[1..].iter().enumerate() {
                        total += log_softmax(&out[k * v..(k + 1) * v])[*t as usize];
                    }
                }
                total
            })
            .collect()
    }
}

/// The logits of the last position of `[1, n, vocab]`.
fn last_row(l: Tensor<3>) -> Vec<f32> {
    let [_, n, v] = l.dims();
    l.slice([0..1, n - 1..n, 0..v])
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 logits")
}

/// Generates up to `max_new` tokens after the prompt of `inputs` (one sequence); stops after a
/// token of `stop` (which is returned). Returns the new tokens.
pub fn generate(model: &Mllama, inputs: Inputs, max_new: usize, stop: &[u32], sampling: Sampling) -> Vec<u32> {
    Prompted::new(model, inputs, max_new).generate(model, max_new, stop, sampling)
}

/// `log_softmax` of one row.
fn log_softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
    let lse = v.iter().map(|x| f64::from(x - max).exp()).sum::<f64>().ln() as f32 + max;
    v.iter().map(|x| x - lse).collect()
}

/// The log-likelihood of each candidate continuation (token ids, not empty) of the prompt of
/// `inputs` (one sequence): the prompt runs once, each candidate from a copy of its cache.
/// Classes are scored this way, by the likelihood of their names after the question.
pub fn score(model: &Mllama, inputs: Inputs, candidates: &[Vec<u32>]) -> Vec<f32> {
    let longest = candidates.iter().map(Vec::len).max().unwrap_or(0);
    Prompted::new(model, inputs, longest).score(model, candidates)
}

/// Probabilities from log-likelihoods (a softmax over the candidates).
pub fn probabilities(scores: &[f32]) -> Vec<f32> {
    let lp = log_softmax(scores);
    lp.iter().map(|x| x.exp()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_the_nucleus_and_is_reproducible() {
        let logits = [0.0, 5.0, 4.9, -3.0];
        let mut a = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        // A tiny nucleus is the most likely token alone.
        for _ in 0..20 {
            assert_eq!(sample_top_p(&logits, 1.0, 1e-6, &mut a), 1);
        }
        // The two likely tokens share almost all the mass; the others never come.
        let picks: Vec<usize> = (0..200).map(|_| sample_top_p(&logits, 1.0, 0.9, &mut a)).collect();
        assert!(picks.iter().all(|&p| p == 1 || p == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
        let mut b1 = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut b2 = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let x: Vec<usize> = (0..50).map(|_| sample_top_p(&logits, 2.0, 1.0, &mut b1)).collect();
        let y: Vec<usize> = (0..50).map(|_| sample_top_p(&logits, 2.0, 1.0, &mut b2)).collect();
        assert_eq!(x, y);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
