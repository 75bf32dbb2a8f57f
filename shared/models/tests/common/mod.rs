//! Helpers shared by the integration tests of the model crate.

use rand::{Rng, SeedableRng};
use wbc_models::compact::mobilenet::mobilenet_v2_spec;
use wbc_models::compact::weights::{NamedTensor, Weights};

/// MobileNetV2 backbone weights (BatchNorm folded), drawn at random with a fan-in scale.
pub fn random_backbone(seed: u64) -> Weights {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut w = Weights::default();
    for b in mobilenet_v2_spec() {
        for u in b.units {
            let fan_in = u.c_in / u.groups * u.kernel * u.kernel;
            let bound = (3.0 / fan_in as f32).sqrt();
            let n = u.c_out * fan_in;
            let values = (0..n).map(|_| rng.gen_range(-bound..bound)).collect();
            w.insert(
                format!("{}.weight", u.conv),
                NamedTensor {
                    shape: vec![u.c_out, u.c_in / u.groups, u.kernel, u.kernel],
                    values,
                },
            );
            w.insert(
                format!("{}.bias", u.conv),
                NamedTensor {
                    shape: vec![u.c_out],
                    values: (0..u.c_out).map(|_| rng.gen_range(-0.1..0.1)).collect(),
                },
            );
        }
    }
    w
}
