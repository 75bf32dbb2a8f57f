//! The backbone's adaptation to a site (AdaBN through every unit), on random MobileNetV2
//! weights: a site that sees the training cells through another contrast and brightness is
//! brought back to the features the training cells have; the training cells themselves are
//! left alone; the bundle part round-trips and refuses what does not fit.

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use wbc_models::adapt::start_mix;
use wbc_models::compact::mobilenet::{Backbone, pool};
use wbc_models::compact::site_norm::{SiteNorm, UnitReference};
use wbc_models::compact::weights::{NamedTensor, Storage, Weights};

mod common;
use common::random_backbone;

/// Runs of four random "cells" (uniform values, fixed by the seed).
fn cells(seed: u64, runs: usize) -> Vec<Tensor<4>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..runs)
        .map(|_| {
            let v: Vec<f32> = (0..4 * 3 * 48 * 48).map(|_| rng.gen_range(-1.7..1.7)).collect();
            Tensor::from_data(TensorData::new(v, [4, 3, 48, 48]), &Device::flex())
        })
        .collect()
}

/// Blocks the tests run and adapt: random weights past them barely pass a signal on.
const BLOCKS: usize = 8;

/// Pooled output of the first [`BLOCKS`] blocks.
fn features(b: &Backbone, runs: &[Tensor<4>]) -> Vec<f32> {
    runs.iter()
        .flat_map(|x| {
            pool(b.forward_blocks(x.clone(), 0, BLOCKS, None))
                .into_data()
                .try_into_vec_as::<f32>()
                .unwrap()
        })
        .collect()
}

/// Mean absolute difference, relative to the mean magnitude of `b`.
fn gap(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum();
    d / b.iter().map(|v| v.abs()).sum::<f32>().max(1e-12)
}

fn reference(backbone: &Backbone, runs: &[Tensor<4>]) -> UnitReference {
    // One class (neutrophils) measured: the mixture is that class's moments.
    let mut classes = vec![None; 6];
    classes[4] = Some(backbone.unit_moments(runs.to_vec()));
    UnitReference::new(classes)
}

#[test]
fn a_site_with_another_contrast_is_brought_back_to_the_training_features() {
    let backbone = Backbone::new(&random_backbone(5), &Device::flex()).unwrap();
    let train = cells(1, 12);
    let reference = reference(&backbone, &train).mixture(&start_mix());
    // Other cells of the same kind, seen darker and with less contrast at the site.
    let own = cells(2, 12);
    let site: Vec<Tensor<4>> = own.iter().map(|x| x.clone() * 0.5 + 0.3).collect();
    let truth = features(&backbone, &own);
    let before = gap(&features(&backbone, &site), &truth);

    let norm = backbone.fit_site_norm(site.clone(), &reference, BLOCKS);
    assert!(norm.fits(&backbone));
    assert_eq!(norm.scale.len(), backbone.units_of(BLOCKS).count());
    let adapted = backbone.with_site_norm(&norm);
    let after = gap(&features(&adapted, &site), &truth);
    assert!(
        before > 0.1,
        "the contrast change must move the features ({before} of their size)"
    );
    assert!(
        after < 0.25 * before,
        "adapted features are {after} from the truth, unadapted {before}"
    );

    // The folded copy is what was fitted: the site's first unit now has the training moments.
    let first = &adapted.unit_moments(site)[0];
    for (c, (m, v)) in reference[0].0.iter().zip(&reference[0].1).enumerate() {
        let var = first.square[c] - first.mean[c] * first.mean[c];
        assert!(
            (first.mean[c] - m).abs() < 0.02 + 0.02 * m.abs(),
            "channel {c}: mean {} vs {m}",
            first.mean[c]
        );
        assert!((var - v).abs() < 0.05 * v + 1e-3, "channel {c}: variance {var} vs {v}");
    }
    // The signed backbone itself is untouched.
    assert_eq!(features(&backbone, &own), truth);
}

#[test]
fn the_training_cells_themselves_are_left_as_they_are() {
    let backbone = Backbone::new(&random_backbone(6), &Device::flex()).unwrap();
    let train = cells(3, 10);
    let reference = reference(&backbone, &train).mixture(&start_mix());
    let norm = backbone.fit_site_norm(train.clone(), &reference, backbone.num_blocks());
    assert_eq!(norm.scale.len(), backbone.units().count());
    for (s, t) in norm.scale.iter().flatten().zip(norm.shift.iter().flatten()) {
        assert!((s - 1.0).abs() < 1e-2 && t.abs() < 1e-2, "scale {s}, shift {t}");
    }
    let moved = gap(
        &features(&backbone.with_site_norm(&norm), &train),
        &features(&backbone, &train),
    );
    assert!(moved < 1e-3, "features moved by {moved}");
}

#[test]
fn only_the_first_blocks_are_adapted_when_asked() {
    let backbone = Backbone::new(&random_backbone(7), &Device::flex()).unwrap();
    let train = cells(4, 6);
    let reference = reference(&backbone, &train).mixture(&start_mix());
    let site: Vec<Tensor<4>> = train.iter().map(|x| x.clone() * 2.0).collect();
    let norm = backbone.fit_site_norm(site.clone(), &reference, 3);
    assert_eq!(norm.blocks, 3);
    assert_eq!(norm.scale.len(), backbone.units_of(3).count());
    assert!(norm.fits(&backbone));
    // The first three blocks changed, the later ones did not.
    let adapted = backbone.with_site_norm(&norm);
    let x = site[0].clone();
    let v = |t: Tensor<4>| t.into_data().try_into_vec_as::<f32>().unwrap();
    assert_ne!(
        v(adapted.forward_blocks(x.clone(), 0, 3, None)),
        v(backbone.forward_blocks(x.clone(), 0, 3, None))
    );
    let entering = backbone.forward_blocks(x, 0, 3, None);
    assert_eq!(
        v(adapted.forward_blocks(entering.clone(), 3, BLOCKS, None)),
        v(backbone.forward_blocks(entering, 3, BLOCKS, None))
    );
}

#[test]
fn the_unit_moments_part_round_trips_and_refuses_what_does_not_fit() {
    let backbone = Backbone::new(&random_backbone(8), &Device::flex()).unwrap();
    let r = reference(&backbone, &cells(5, 2));
    let bytes = r.to_safetensors().unwrap();
    let back = UnitReference::from_safetensors(&bytes, &backbone).unwrap();
    let (a, b) = (r.mixture(&start_mix()), back.mixture(&start_mix()));
    assert_eq!(a.len(), b.len());
    for ((ma, va), (mb, vb)) in a.iter().zip(&b) {
        assert!(ma.iter().zip(mb).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + x.abs())));
        assert!(va.iter().zip(vb).all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + x.abs())));
    }
    // Truncated, garbage, and a part with no class in it.
    assert!(UnitReference::from_safetensors(&bytes[..bytes.len() / 2], &backbone).is_err());
    assert!(UnitReference::from_safetensors(b"not safetensors", &backbone).is_err());
    let empty = UnitReference::new(vec![None; 6]).to_safetensors().unwrap();
    assert!(UnitReference::from_safetensors(&empty, &backbone).is_err());

    // A norm of the wrong width for this backbone is refused.
    let mut norm = SiteNorm {
        dark_nucleus: false,
        blocks: 1,
        scale: vec![vec![1.0; 32]],
        shift: vec![vec![0.0; 32]],
    };
    assert!(norm.fits(&backbone));
    norm.shift[0].pop();
    assert!(!norm.fits(&backbone));
    norm.shift[0].push(f32::NAN);
    assert!(!norm.fits(&backbone));
    // Scales no fit gives (zero, negative, huge) are refused too.
    for bad in [0.0, -1.0, 1e6] {
        let mut n = SiteNorm {
            dark_nucleus: false,
            blocks: 1,
            scale: vec![vec![1.0; 32]],
            shift: vec![vec![0.0; 32]],
        };
        n.scale[0][5] = bad;
        assert!(!n.fits(&backbone), "scale {bad}");
    }
    // A class whose cell count is not one number is a damaged part, not an absent class.
    let mut w = Weights::from_safetensors(&bytes).unwrap();
    w.insert(
        "class4.cells".into(),
        NamedTensor {
            shape: vec![2],
            values: vec![1.0, 2.0],
        },
    );
    let damaged = w.to_safetensors_by(0, |_, _| Storage::F32).unwrap();
    assert!(UnitReference::from_safetensors(&damaged, &backbone).is_err());
}
