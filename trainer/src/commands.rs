//! What each of the trainer's subcommands does: one small function per command (and per model
//! family where the families differ), called by `main`.

use crate::cli::*;
use anyhow::{Context, Result};
use std::path::PathBuf;
use trainer::compact::export::{ExportOptions, export};
use trainer::compact::train::{TrainSettings, train};
use trainer::eval::{EvalOptions, evaluate_classifier};
use wbc_models::classify::Classifier;
use wbc_protocol::bundle::{Bundle, keys};

/// Default location of the pretrained weights fetched by `scripts/fetch-weights.sh`.
fn default_weights_dir() -> PathBuf {
    std::env::var_os("WBC_WEIGHTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".cache/weights/unpacked"))
}

fn trusted(paths: &[PathBuf]) -> Result<Vec<ed25519_dalek::VerifyingKey>> {
    keys::trusted(paths, include_str!("../../appliance/keys/default.pub")).context("loading trusted keys")
}

/// `trainer train` (`--model mllama`).
pub fn train_mllama(a: TrainArgs) -> Result<()> {
    let TrainArgs {
        data,
        base,
        alpha,
        lora_dropout,
        lora_targets,
        accumulate,
        base_block,
        out,
        epochs,
        lr,
        rank,
        max_per_class,
        seed,
        device,
        warmup_steps,
        resume,
        checkpoint_every,
        stop_after,
        ..
    } = a;
    let (train, val) = if data.join("train.csv").is_file() {
        (data.join("train.csv"), data.join("val.csv"))
    } else {
        (data.join("train"), data.join("val"))
    };
    let settings = trainer::mllama::MllamaSettings {
        base: base.context("--base is needed with --model mllama")?,
        epochs,
        lr,
        warmup_steps,
        accumulate,
        lora: wbc_models::mllama::LoraConfig {
            rank,
            alpha,
            dropout: lora_dropout,
            targets: parse_targets(&lora_targets)?,
            seed,
        },
        max_per_class: (max_per_class > 0).then_some(max_per_class),
        seed,
        base_block,
        device,
    };
    let control = trainer::mllama::Control {
        resume,
        checkpoint_every,
        stop_after,
    };
    let r = trainer::mllama::train_with(&settings, &train, &val, &out, &control)?;
    if r.stopped {
        println!(
            "stopped as asked, {} of {} epochs finished; `--resume` with the same settings goes on from {}",
            r.train_loss.len(),
            settings.epochs,
            trainer::mllama::resume_dir(&out).display()
        );
        return Ok(());
    }
    println!(
        "best epoch {}: val answer loss {:.4}, val class accuracy {:.3} ({})",
        r.best_epoch,
        r.val_loss[r.best_epoch - 1],
        r.val_accuracy[r.best_epoch - 1],
        trainer::mllama::adapters_path(&out).display()
    );
    Ok(())
}

/// `trainer train` (`--model compact`).
pub fn train_compact(a: TrainArgs) -> Result<()> {
    let TrainArgs {
        data,
        out,
        backbone,
        epochs,
        batch,
        lr,
        views,
        tune_from,
        rank,
        max_per_class,
        seed,
        no_cell_norm,
        mild_augment,
        view_microns,
        nucleus_fraction,
        detail_side,
        mask_background,
        colour,
        equalise,
        source_adversary,
        mixstyle,
        amplitude_mix,
        stain_density,
        ..
    } = a;
    let mut s = TrainSettings {
        epochs,
        batch,
        lr,
        views,
        seed,
        max_per_class,
        strong_augment: !mild_augment,
        stain_density: stain_density.clamp(0.0, 1.0),
        ..Default::default()
    };
    if let Some(a) = source_adversary {
        s.source_adversary = a;
    }
    if let Some(p) = mixstyle.filter(|&p| p > 0.0) {
        s.mixstyle = Some(trainer::compact::mixstyle::MixStyle {
            p,
            ..Default::default()
        });
    }
    if let Some(p) = amplitude_mix.filter(|&p| p > 0.0) {
        s.amplitude_mix = Some(trainer::compact::amplitude::AmplitudeMix {
            p,
            ..Default::default()
        });
    }
    if no_cell_norm {
        s.cell = None;
    }
    if let Some(c) = s.cell.as_mut() {
        c.view_microns = view_microns;
        c.mask_background = mask_background;
        c.grey = !colour || equalise;
        c.equalise = equalise;
        if let Some(f) = nucleus_fraction {
            c.nucleus_fraction = f;
        }
        if let Some(d) = detail_side {
            c.detail_side = d;
        }
    }
    s.model.tune_from = tune_from;
    s.model.lora_rank = rank;
    s.model.lora_alpha = 2.0 * rank as f64;
    let pth = backbone.unwrap_or_else(|| default_weights_dir().join("mobilenet_v2-b0353104.pth"));
    let r = train(&data, &out, &pth, s)?;
    println!(
        "best val macro F1 {:.4} at epoch {} ({:.0} s on {})",
        r.best_val_macro_f1, r.best_epoch, r.seconds, r.hardware
    );
    Ok(())
}

/// `trainer eval`.
pub fn eval(a: EvalArgs) -> Result<()> {
    let EvalArgs {
        bundle,
        csv,
        json,
        trust,
        minilm,
        resamples,
        cells,
        predict,
        device,
        ..
    } = a;
    let b = Bundle::open_mapped(&bundle, &trusted(&trust)?, &Default::default())
        .with_context(|| format!("opening {}", bundle.display()))?;
    let classifier = Classifier::from_bundle(&b, &device.device()?)?;
    let minilm = minilm.or_else(|| {
        Some(default_weights_dir().join("all-MiniLM-L6-v2")).filter(|p| p.join("model.safetensors").is_file())
    });
    let report = evaluate_classifier(
        &classifier,
        &csv,
        &EvalOptions {
            resamples,
            minilm,
            predict,
        },
    )?;
    print!("{}", report.text());
    if let Some(cells) = cells {
        report.write_cells(&cells)?;
    }
    if let Some(json) = json {
        std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", json.display()))?;
        if let Some(cm) = &report.confusion_matrix {
            let mut names: Vec<&str> = wbc_protocol::CellClass::ALL.iter().map(|c| c.name()).collect();
            if cm.len() > names.len() {
                names.push(trainer::eval::NO_CLASS_NAMED);
            }
            trainer::plot::confusion(&names, cm, &json.with_extension("png"))?;
        }
    }
    Ok(())
}

/// `trainer export` (`--model mllama`).
pub fn export_mllama(a: ExportArgs) -> Result<()> {
    let ExportArgs {
        run,
        base,
        q4_group,
        cal,
        device,
        ..
    } = a;
    let key = keys::read_private(&cal.key)?;
    let base = base.context("--base is needed with --model mllama")?;
    let version = cal.model_version;
    let to = trainer::mllama::ExportTo {
        key: &key,
        model_version: version,
        group: q4_group,
        out: &cal.out,
    };
    let r = trainer::mllama::export(&base, &run, &cal.val, &to, &device.device()?)?;
    println!(
        "wrote {} ({} bytes, model version {version}): {} self-test cases; class probabilities within {:.4} of the trained model on {} val cells",
        cal.out.display(),
        r.bytes,
        r.selftest_cases,
        r.max_probability_difference,
        r.compared
    );
    Ok(())
}

/// `trainer export` (`--model compact`).
pub fn export_compact(a: ExportArgs) -> Result<()> {
    let ExportArgs { run, backbone, cal, .. } = a;
    let key = keys::read_private(&cal.key)?;
    let pth = backbone.unwrap_or_else(|| default_weights_dir().join("mobilenet_v2-b0353104.pth"));
    let m = export(&cal.apply(ExportOptions::new(&run, &pth, &key, &cal.out, cal.model_version)))?;
    println!(
        "wrote {} (model version {}, val {})",
        cal.out.display(),
        m.model_version,
        m.metrics
    );
    Ok(())
}

/// `trainer recalibrate`.
pub fn recalibrate(a: RecalibrateArgs) -> Result<()> {
    let RecalibrateArgs { bundle, trust, cal, .. } = a;
    let key = keys::read_private(&cal.key)?;
    // Mapped, not read onto the heap: the input bundle is a file given on the command line.
    let b = Bundle::open_mapped(&bundle, &trusted(&trust)?, &Default::default())
        .with_context(|| format!("opening {}", bundle.display()))?;
    let m = export(&cal.apply(ExportOptions::recalibrate(&b, &key, &cal.out, cal.model_version)))?;
    println!(
        "wrote {} (model version {}, recalibrated from {}, val {})",
        cal.out.display(),
        m.model_version,
        b.manifest.model_version,
        m.metrics
    );
    Ok(())
}

/// `trainer adapt`.
pub fn adapt(a: AdaptArgs) -> Result<()> {
    let key = keys::read_private(&a.key)?;
    let b = Bundle::open_mapped(&a.bundle, &trusted(&a.trust)?, &Default::default())
        .with_context(|| format!("opening {}", a.bundle.display()))?;
    let o = trainer::compact::site::SiteOptions {
        clinic: a.clinic,
        val: a.val.as_deref(),
        max_val_drop: a.max_val_drop,
        steps: a.steps,
        lr: a.lr,
        site_share: a.site_share,
        anchor: a.anchor,
        views: a.views,
        dark_nucleus: a.dark_nucleus,
        bank_views: a.bank_views,
        blast_replay_weight: a.blast_replay_weight,
        min_blasts_flagged: a.min_blasts_flagged,
        blast_guard: !a.no_blast_guard,
        site_familiarity: !a.no_site_familiarity,
        replay: a.replay.as_deref(),
        replay_per_class: a.replay_per_class,
        tune: trainer::compact::site_tune::TuneSettings {
            tune_from: a.tune_from,
            epochs: a.tune_epochs,
            lr: a.tune_lr,
            site_views: a.tune_views,
            ..Default::default()
        },
        ..trainer::compact::site::SiteOptions::new(&b, &a.csv, &key, &a.out, a.model_version)
    };
    let r = trainer::compact::site::adapt(&o)?;
    let m = r.manifest.as_ref().context("written")?;
    let total: usize = r.reviewed.iter().sum();
    println!(
        "wrote {} (model version {}, from {}, for {}): {total} reviewed cells; reported as reviewed before {}, after {}; training cells replayed {} (head right before {}, after {})",
        a.out.display(),
        m.model_version,
        b.manifest.model_version,
        m.clinic
            .as_deref()
            .map_or("every clinic".to_string(), |c| format!("clinic {c}")),
        r.reviewed_right_before,
        r.reviewed_right_after,
        r.replayed,
        r.replay_right_before,
        r.replay_right_after,
    );
    if let Some((before, after)) = r.val_macro_f1 {
        println!("in-domain val macro F1 (reported answers): {before:.4} before, {after:.4} after");
    }
    if let Some((before, after, blasts)) = r.val_blasts_flagged {
        println!("val blasts flagged: {before} of {blasts} before, {after} after");
    }
    if let Some((val, site)) = r.familiarity {
        println!(
            "familiarity threshold: {:.4} ({val:.4} from val, {site:.4} from the reviewed cells; --no-site-familiarity keeps val's)",
            val.max(site)
        );
    }
    if let Some(g) = &r.guard {
        println!(
            "blast guard (the signed model beside the taught one): holds a cell back when the taught model gives Blast at least {:.4}; \
             without it {} val blasts flagged ({} that the signed model calls Blast lost); it holds back {} of the {total} reviewed cells \
             as possible blasts (more of the clinic's other cells: --no-blast-guard turns it off)",
            g.min_taught_blast, g.val_blasts_flagged_without, g.val_blasts_lost, g.reviewed_held
        );
    }
    if m.clinic.is_none() {
        eprintln!("warning: the bundle names no clinic; every clinic's appliance would install it");
    }
    Ok(())
}

/// `trainer crop-fields`.
pub fn crop_fields(a: CropFieldsArgs) -> Result<()> {
    let CropFieldsArgs {
        fields, out, source, ..
    } = a;
    let n = trainer::dataset::crop_fields(&fields, &out, &source)?;
    println!("{n} white cells written to {}", out.join("cells.csv").display());
    Ok(())
}

/// `trainer normalise`.
pub fn normalise(a: NormaliseArgs) -> Result<()> {
    let NormaliseArgs {
        csv,
        out,
        mask_background,
        view_microns,
        dark_nucleus,
    } = a;
    let norm = wbc_cells::cellnorm::CellNorm {
        mask_background,
        dark_nucleus,
        ..trainer::compact::train::physical_cell_norm(view_microns)
    };
    let (found, total) = trainer::dataset::write_normalised(&csv, &out, &norm)?;
    println!("{found} of {total} cells found; views in {}", out.display());
    Ok(())
}

/// `trainer sign-keys`.
pub fn sign_keys(a: SignKeysArgs) -> Result<()> {
    let SignKeysArgs {
        key,
        sequence,
        out,
        public_keys,
        ..
    } = a;
    let doc = trainer::sign::key_list(&keys::read_private(&key)?, sequence, &public_keys)?;
    trainer::sign::write_doc(&doc, &out, ".keys.json")?;
    println!(
        "key list {sequence} ({} keys) signed by {}: {}",
        public_keys.len(),
        doc.key_id,
        out.display()
    );
    Ok(())
}

/// `trainer sign-rollback`.
pub fn sign_rollback(a: SignRollbackArgs) -> Result<()> {
    let SignRollbackArgs {
        key,
        to,
        from_version,
        clinic,
        device,
        reason,
        out,
        ..
    } = a;
    let audience = trainer::sign::Audience { clinic, device };
    let doc = trainer::sign::rollback(&keys::read_private(&key)?, &to, from_version, audience, &reason)?;
    trainer::sign::write_doc(&doc, &out, ".rollback.json")?;
    println!(
        "rollback from version {from_version} to {} signed by {}: {}",
        to.display(),
        doc.key_id,
        out.display()
    );
    Ok(())
}

/// `trainer resign`.
pub fn resign(a: ResignArgs) -> Result<()> {
    let ResignArgs {
        bundle,
        trust,
        key,
        out,
        ..
    } = a;
    let bytes = trainer::sign::resign(&bundle, &trusted(&trust)?, &keys::read_private(&key)?)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&out)
        .with_context(|| format!("creating {}", out.display()))?;
    std::io::Write::write_all(&mut f, &bytes)?;
    println!("{} signed again: {}", bundle.display(), out.display());
    Ok(())
}

/// `trainer check-hf`.
pub fn synth_mllama(a: SynthMllamaArgs) -> Result<()> {
    use wbc_models::mllama::MllamaConfig;
    let cfg = match a.shape.as_str() {
        "11b" => MllamaConfig::llama_3_2_11b_vision(),
        "reduced" => MllamaConfig::llama_3_2_11b_reduced(a.text_layers, a.vision_layers),
        other => anyhow::bail!("--shape {other:?}: expected 11b or reduced"),
    };
    let start = std::time::Instant::now();
    let w = wbc_models::mllama::write_synthetic_checkpoint(&cfg, &a.out, a.seed, (a.shard_gb * 1e9) as u64)?;
    if let Some(t) = &a.tokenizer {
        std::fs::copy(t, a.out.join("tokenizer.json")).with_context(|| format!("copying {}", t.display()))?;
    }
    println!(
        "{}: {} parameters, {} tensors, {:.2} GB in {} shards, {:.1} s",
        a.out.display(),
        cfg.parameter_count().total,
        w.tensors,
        w.bytes as f64 / 1e9,
        w.shards.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn check_hf(a: CheckHfArgs) -> Result<()> {
    let CheckHfArgs { model, io, device } = a;
    let p = wbc_models::mllama::check_parity(&model, &io, &device.device()?)?;
    let show = |what: &str, d: &wbc_models::mllama::Difference| {
        println!("{what}: max abs error {:.3e}, relative {:.3e}", d.max_abs, d.relative)
    };
    println!("{} parameters", p.parameters);
    if let Some(v) = &p.vision {
        show("vision encoder", v);
    }
    show("logits", &p.logits);
    let worst = p
        .vision
        .iter()
        .chain([&p.logits])
        .map(|d| d.relative)
        .fold(0f32, f32::max);
    if worst.is_nan() || worst > 1e-4 {
        anyhow::bail!("relative error {worst:.3e} is over 1e-4");
    }
    println!("parity: ok (relative error at most 1e-4)");
    Ok(())
}

/// `trainer keygen`.
pub fn keygen(a: KeygenArgs) -> Result<()> {
    let KeygenArgs { out, .. } = a;
    let k = keys::generate();
    keys::write_private(&out, &k)?;
    let pubp = PathBuf::from(format!("{}.pub", out.display()));
    keys::write_public(&pubp, &k.verifying_key())?;
    println!(
        "private key {} (mode 0600), public key {} (id {})",
        out.display(),
        pubp.display(),
        wbc_protocol::bundle::key_id(&k.verifying_key())
    );
    Ok(())
}
