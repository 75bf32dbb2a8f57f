//! `trainer`: fine-tune, evaluate and export WBC model bundles.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use trainer::eval::{EvalOptions, evaluate_classifier};
use trainer::export::{ExportOptions, export};
use trainer::train::{TrainSettings, train};
use wbc_shared::bundle::{Bundle, keys};
use wbc_shared::classify::Classifier;

/// Default location of the pretrained weights fetched by `scripts/fetch-weights.sh`.
fn default_weights_dir() -> PathBuf {
    std::env::var_os("WBC_WEIGHTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".cache/weights/unpacked"))
}

#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "Fine-tune, evaluate and export WBC classifier bundles"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune a model: the compact one (4-bit frozen MobileNetV2 + LoRA + class/attribute
    /// heads), or with `--model mllama --base <HF checkpoint dir>` Llama 3.2 Vision with LoRA
    /// on conversations (image + question → class name and description).
    Train {
        /// Folder with train.csv and val.csv (or train/ and val/ with one folder per class).
        #[arg(long)]
        data: PathBuf,
        /// Model family.
        #[arg(long, value_enum, default_value_t = ModelFamily::Compact)]
        model: ModelFamily,
        /// mllama: the base checkpoint directory (config.json, safetensors, tokenizer.json).
        #[arg(long, required_if_eq("model", "mllama"))]
        base: Option<PathBuf>,
        /// mllama: LoRA alpha (the adapters are scaled by alpha / rank).
        #[arg(long, default_value_t = 16.0)]
        alpha: f64,
        /// mllama: dropout on the adapters' input.
        #[arg(long, default_value_t = 0.05)]
        lora_dropout: f64,
        /// mllama: where adapters go (comma-separated: text-attention, text-mlp, cross-attention, vision).
        #[arg(long, default_value = "text-attention,text-mlp")]
        lora_targets: String,
        /// mllama: samples per optimiser step (gradient accumulation).
        #[arg(long, default_value_t = 8)]
        accumulate: usize,
        /// mllama: the frozen base is held in 4 bits, one scale per this many values (0: f32).
        #[arg(long, default_value_t = 32)]
        base_block: u8,
        /// Run directory to write (checkpoint, curves, run.json).
        #[arg(long)]
        out: PathBuf,
        /// torchvision MobileNetV2 ImageNet checkpoint (default: $WBC_WEIGHTS_DIR/mobilenet_v2-b0353104.pth).
        #[arg(long)]
        backbone: Option<PathBuf>,
        /// Epochs.
        #[arg(long, default_value_t = 6)]
        epochs: usize,
        /// Batch size.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Peak learning rate.
        #[arg(long, default_value_t = 2e-3)]
        lr: f64,
        /// Augmented views of each training image cached per run.
        #[arg(long, default_value_t = 2)]
        views: usize,
        /// First backbone block (0-18) that gets LoRA adapters; earlier blocks are cached.
        /// Default 10 (model version 3; version 2 trained blocks 14-18).
        #[arg(long, default_value_t = 10)]
        tune_from: usize,
        /// LoRA rank.
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Use at most N training images per class (0 = all), for quick runs.
        #[arg(long, default_value_t = 0)]
        max_per_class: usize,
        /// Random seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Train on plain centre crops instead of normalised cells (model version 1's recipe).
        #[arg(long)]
        no_cell_norm: bool,
        /// Mild colour augmentation only (no blur, resolution loss, noise or JPEG).
        #[arg(long)]
        mild_augment: bool,
        /// Micrometres of smear in the model's view: the physical scale, which keeps the cell's
        /// size (e.g. 24; needs each image's pixel size). Default 0: the relative scale, set by
        /// the nucleus.
        #[arg(long, default_value_t = 0.0)]
        view_microns: f32,
        /// Fraction of the model input that the nucleus spans (relative scale).
        #[arg(long)]
        nucleus_fraction: Option<f32>,
        /// Resolution normalisation: side of the low-resolution view (0 = full resolution).
        #[arg(long)]
        detail_side: Option<u32>,
        /// Replace what lies outside the cell with a constant background.
        #[arg(long)]
        mask_background: bool,
        /// Show the model the stain-normalised colour view instead of the grey one.
        #[arg(long)]
        colour: bool,
        /// Equalise the grey view's histogram.
        #[arg(long)]
        equalise: bool,
        /// Train against a source critic on the classes several sources share, with this
        /// weight of its confusion loss once ramped up (0 = none).
        #[arg(long)]
        source_adversary: Option<f64>,
        /// MixStyle: mix the feature statistics of cells from different sources, in this
        /// share of the batches (0 = none).
        #[arg(long)]
        mixstyle: Option<f64>,
        /// Amplitude mixing: give this share of the training views the Fourier amplitude
        /// (sharpness, texture, contrast) partly of a view from another source (0 = none).
        #[arg(long)]
        amplitude_mix: Option<f64>,
    },
    /// Cut the annotated white cells out of smear fields (Pascal VOC boxes) into a folder of
    /// cell images and an unlabelled `cells.csv` for `eval`.
    CropFields {
        /// Folder with `images/` and `annotations/` (VOC XML).
        #[arg(long)]
        fields: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Source name written to the CSV.
        #[arg(long, default_value = "fields")]
        source: String,
    },
    /// Write what the model sees: the normalised view of every image of a CSV, with the
    /// measured cell sizes in `normalised.csv`.
    Normalise {
        /// CSV (or class folder) of cell images.
        #[arg(long)]
        csv: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Replace what lies outside the cell with a constant background.
        #[arg(long)]
        mask_background: bool,
        /// Micrometres of smear in view (0 = relative scale, the default).
        #[arg(long, default_value_t = 0.0)]
        view_microns: f32,
    },
    /// Evaluate a bundle on a CSV: the reference study's tables, JSON and a confusion-matrix PNG.
    Eval {
        /// Bundle file.
        #[arg(long)]
        bundle: PathBuf,
        /// CSV with `path` (relative to the CSV) and optionally `label`, `source`, attributes.
        #[arg(long)]
        csv: PathBuf,
        /// Write the JSON report here (the confusion matrix PNG goes beside it).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Trusted public key (PEM); may repeat. Default: the project's default-bundle key.
        #[arg(long)]
        trust: Vec<PathBuf>,
        /// all-MiniLM-L6-v2 folder for description similarity (default: $WBC_WEIGHTS_DIR/all-MiniLM-L6-v2 if present).
        #[arg(long)]
        minilm: Option<PathBuf>,
        /// Bootstrap resamples for the Mean ± SD table.
        #[arg(long, default_value_t = 1000)]
        resamples: usize,
        /// Write one CSV row per cell here: probabilities, familiarity, neighbours' vote, what
        /// was reported and why, measured size.
        #[arg(long)]
        cells: Option<PathBuf>,
    },
    /// Merge LoRA into the base, quantize, add self-test images and val figures, and sign.
    Export {
        /// Run directory from `trainer train`.
        #[arg(long)]
        run: PathBuf,
        /// Model family of the run.
        #[arg(long, value_enum, default_value_t = ModelFamily::Compact)]
        model: ModelFamily,
        /// mllama: the base checkpoint the run was trained on.
        #[arg(long, required_if_eq("model", "mllama"))]
        base: Option<PathBuf>,
        /// mllama: 4-bit group size of the exported projections.
        #[arg(long, default_value_t = 32)]
        q4_group: usize,
        /// Backbone checkpoint used by the run.
        #[arg(long)]
        backbone: Option<PathBuf>,
        #[command(flatten)]
        cal: CalibrationArgs,
    },
    /// Make a new version of a compact bundle with the same weights and a new calibration:
    /// temperature, familiarity bank, review rules (blast probability and size), val and
    /// other-site figures, self-test. For when the review rules change and the model does not;
    /// no training and no backbone checkpoint needed.
    Recalibrate {
        /// Bundle to recalibrate (verified against the trusted keys first).
        #[arg(long)]
        bundle: PathBuf,
        /// Trusted public key (PEM); may repeat. Default: the project's default-bundle key ring.
        #[arg(long)]
        trust: Vec<PathBuf>,
        #[command(flatten)]
        cal: CalibrationArgs,
    },
    /// Sign a trusted key list (key rotation or revocation) with a key the devices trust now.
    /// The devices then trust exactly the listed keys. Put the file on a USB stick or send it
    /// with `central announce --keys`.
    SignKeys {
        /// Signing key (private, PEM) the devices trust now.
        #[arg(long)]
        key: PathBuf,
        /// Higher than every list issued before.
        #[arg(long)]
        sequence: u64,
        /// Output file, ending in `.keys.json`.
        #[arg(long)]
        out: PathBuf,
        /// Public keys (PEM) to trust from now on.
        #[arg(required = true)]
        public_keys: Vec<PathBuf>,
    },
    /// Sign an instruction to go back from `--from-version` to the older bundle `--to` (the
    /// devices refuse older bundles without one). It applies only while `--from-version` is
    /// active.
    SignRollback {
        /// Signing key (private, PEM).
        #[arg(long)]
        key: PathBuf,
        /// The bundle file to return to.
        #[arg(long)]
        to: PathBuf,
        /// The version being left.
        #[arg(long)]
        from_version: u64,
        /// Only for this clinic.
        #[arg(long)]
        clinic: Option<String>,
        /// Only for this device of the clinic.
        #[arg(long, requires = "clinic")]
        device: Option<String>,
        /// Why (shown on the devices and at central).
        #[arg(long)]
        reason: String,
        /// Output file, ending in `.rollback.json`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a verified bundle again with another key (when keys are rotated).
    Resign {
        /// The bundle.
        #[arg(long)]
        bundle: PathBuf,
        /// Public key (PEM) that verifies it now; may repeat. Default: the release key.
        #[arg(long)]
        trust: Vec<PathBuf>,
        /// The new signing key (private, PEM).
        #[arg(long)]
        key: PathBuf,
        /// Output bundle file (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a Hugging Face mllama checkpoint against transformers' outputs: loads `--model`
    /// (config.json and safetensors, sharded or not), runs the forward pass on the inputs in
    /// `--io` (input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask,
    /// cross_attention_mask) and compares with its `logits` (and `vision_output` if present).
    /// Exits 0 only when the relative error is at most 1e-4.
    CheckHf {
        /// Checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Reference inputs and outputs (safetensors).
        #[arg(long)]
        io: PathBuf,
    },
    /// Create an ed25519 signing key pair (private key written with mode 0600).
    Keygen {
        /// Private key file to create (never overwritten); the public key goes to <file>.pub.
        #[arg(long)]
        out: PathBuf,
    },
}

/// The model families `train` can fine-tune.
/// What a bundle's calibration and figures are made from, for `export` and `recalibrate`.
#[derive(clap::Args)]
struct CalibrationArgs {
    /// Private signing key (PKCS#8 PEM, from `trainer keygen`).
    #[arg(long)]
    key: PathBuf,
    /// Bundle file to write.
    #[arg(long)]
    out: PathBuf,
    /// Labelled val CSV: figures for the manifest and the golden self-test images.
    #[arg(long)]
    val: PathBuf,
    /// Model version (must increase with every release).
    #[arg(long)]
    model_version: u64,
    /// Training sample list: a stratified subset becomes the familiarity (out-of-distribution)
    /// bank. Without it the bundle has no familiarity score.
    #[arg(long)]
    train: Option<PathBuf>,
    /// Training cells per class in the familiarity bank.
    #[arg(long, default_value_t = 200)]
    bank_per_class: usize,
    /// Val quantile of the familiarity score beyond which a cell is Unidentified.
    #[arg(long, default_value_t = 0.99)]
    ood_quantile: f64,
    /// Share of the correctly called val blasts whose probability a Blast call must reach
    /// (1 = no blast threshold).
    #[arg(long, default_value_t = 0.98)]
    blast_keep: f64,
    /// Share of the correctly called val blasts whose nucleus size (µm, where the pixel size is
    /// known) a Blast call must reach (1 = no size check).
    #[arg(long, default_value_t = 0.99)]
    blast_size_keep: f64,
    /// Do not send cells whose class differs from their nearest training cells' vote to review.
    #[arg(long)]
    no_agreement: bool,
    /// Unlabelled other-site cells, NAME=CSV (may repeat): their Blast and Unidentified
    /// fractions go into the manifest.
    #[arg(long, value_parser = parse_named)]
    other_site: Vec<(String, PathBuf)>,
}

impl CalibrationArgs {
    /// Applies these settings to export options.
    fn apply<'a>(&'a self, o: ExportOptions<'a>) -> ExportOptions<'a> {
        ExportOptions {
            val: Some(&self.val),
            train: self.train.as_deref(),
            bank_per_class: self.bank_per_class,
            ood_quantile: self.ood_quantile,
            require_agreement: !self.no_agreement,
            blast_keep: self.blast_keep,
            blast_size_keep: self.blast_size_keep,
            other_sites: self.other_site.iter().map(|(n, p)| (n.clone(), p.as_path())).collect(),
            ..o
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ModelFamily {
    /// The compact CNN.
    Compact,
    /// Llama 3.2 Vision.
    Mllama,
}

fn parse_targets(s: &str) -> Result<wbc_shared::mllama::LoraTargets> {
    let mut t = wbc_shared::mllama::LoraTargets {
        text_attention: false,
        text_mlp: false,
        cross_attention: false,
        vision: false,
    };
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "text-attention" => t.text_attention = true,
            "text-mlp" => t.text_mlp = true,
            "cross-attention" => t.cross_attention = true,
            "vision" => t.vision = true,
            other => anyhow::bail!(
                "--lora-targets: unknown target {other:?} (text-attention, text-mlp, cross-attention, vision)"
            ),
        }
    }
    if t == (wbc_shared::mllama::LoraTargets {
        text_attention: false,
        text_mlp: false,
        cross_attention: false,
        vision: false,
    }) {
        anyhow::bail!("--lora-targets names no target");
    }
    Ok(t)
}

fn parse_named(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=CSV, got {s:?}"))?;
    if name.is_empty() || path.is_empty() {
        return Err(format!("expected NAME=CSV, got {s:?}"));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

fn trusted(paths: &[PathBuf]) -> Result<Vec<ed25519_dalek::VerifyingKey>> {
    keys::trusted(paths, include_str!("../../appliance/keys/default.pub")).context("loading trusted keys")
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().cmd {
        Cmd::Train {
            data,
            model: ModelFamily::Mllama,
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
            ..
        } => {
            let (train, val) = if data.join("train.csv").is_file() {
                (data.join("train.csv"), data.join("val.csv"))
            } else {
                (data.join("train"), data.join("val"))
            };
            let settings = trainer::mllama::MllamaSettings {
                base: base.context("--base is needed with --model mllama")?,
                epochs,
                lr,
                accumulate,
                lora: wbc_shared::mllama::LoraConfig {
                    rank,
                    alpha,
                    dropout: lora_dropout,
                    targets: parse_targets(&lora_targets)?,
                    seed,
                },
                max_per_class: (max_per_class > 0).then_some(max_per_class),
                seed,
                base_block,
            };
            let r = trainer::mllama::train(&settings, &train, &val, &out)?;
            println!(
                "best epoch {}: val answer loss {:.4}, val class accuracy {:.3} ({})",
                r.best_epoch,
                r.val_loss[r.best_epoch - 1],
                r.val_accuracy[r.best_epoch - 1],
                trainer::mllama::adapters_path(&out).display()
            );
        }
        Cmd::Train {
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
            ..
        } => {
            let mut s = TrainSettings {
                epochs,
                batch,
                lr,
                views,
                seed,
                max_per_class,
                strong_augment: !mild_augment,
                ..Default::default()
            };
            if let Some(a) = source_adversary {
                s.source_adversary = a;
            }
            if let Some(p) = mixstyle.filter(|&p| p > 0.0) {
                s.mixstyle = Some(trainer::mixstyle::MixStyle {
                    p,
                    ..Default::default()
                });
            }
            if let Some(p) = amplitude_mix.filter(|&p| p > 0.0) {
                s.amplitude_mix = Some(trainer::amplitude::AmplitudeMix {
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
        }
        Cmd::Eval {
            bundle,
            csv,
            json,
            trust,
            minilm,
            resamples,
            cells,
        } => {
            let b =
                Bundle::open(&bundle, &trusted(&trust)?).with_context(|| format!("opening {}", bundle.display()))?;
            let classifier = Classifier::from_bundle(&b, &burn::tensor::Device::flex())?;
            let minilm = minilm.or_else(|| {
                Some(default_weights_dir().join("all-MiniLM-L6-v2")).filter(|p| p.join("model.safetensors").is_file())
            });
            let report = evaluate_classifier(&classifier, &csv, &EvalOptions { resamples, minilm })?;
            print!("{}", report.text());
            if let Some(cells) = cells {
                report.write_cells(&cells)?;
            }
            if let Some(json) = json {
                std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("writing {}", json.display()))?;
                if let Some(cm) = &report.confusion_matrix {
                    let names: Vec<&str> = wbc_shared::CellClass::ALL.iter().map(|c| c.name()).collect();
                    trainer::plot::confusion(&names, cm, &json.with_extension("png"))?;
                }
            }
        }
        Cmd::Export {
            run,
            model: ModelFamily::Mllama,
            base,
            q4_group,
            cal,
            ..
        } => {
            let key = keys::read_private(&cal.key)?;
            let base = base.context("--base is needed with --model mllama")?;
            let version = cal.model_version;
            let r = trainer::mllama::export(&base, &run, &cal.val, &key, version, q4_group, &cal.out)?;
            println!(
                "wrote {} ({} bytes, model version {version}): {} self-test cases; class probabilities within {:.4} of the trained model on {} val cells",
                cal.out.display(),
                r.bytes,
                r.selftest_cases,
                r.max_probability_difference,
                r.compared
            );
        }
        Cmd::Export { run, backbone, cal, .. } => {
            let key = keys::read_private(&cal.key)?;
            let pth = backbone.unwrap_or_else(|| default_weights_dir().join("mobilenet_v2-b0353104.pth"));
            let m = export(&cal.apply(ExportOptions::new(&run, &pth, &key, &cal.out, cal.model_version)))?;
            println!(
                "wrote {} (model version {}, val {})",
                cal.out.display(),
                m.model_version,
                m.metrics
            );
        }
        Cmd::Recalibrate { bundle, trust, cal } => {
            let key = keys::read_private(&cal.key)?;
            let b =
                Bundle::open(&bundle, &trusted(&trust)?).with_context(|| format!("opening {}", bundle.display()))?;
            let m = export(&cal.apply(ExportOptions::recalibrate(&b, &key, &cal.out, cal.model_version)))?;
            println!(
                "wrote {} (model version {}, recalibrated from {}, val {})",
                cal.out.display(),
                m.model_version,
                b.manifest.model_version,
                m.metrics
            );
        }
        Cmd::CropFields { fields, out, source } => {
            let n = trainer::dataset::crop_fields(&fields, &out, &source)?;
            println!("{n} white cells written to {}", out.join("cells.csv").display());
        }
        Cmd::Normalise {
            csv,
            out,
            mask_background,
            view_microns,
        } => {
            let norm = wbc_shared::cellnorm::CellNorm {
                mask_background,
                ..trainer::train::physical_cell_norm(view_microns)
            };
            let (found, total) = trainer::dataset::write_normalised(&csv, &out, &norm)?;
            println!("{found} of {total} cells found; views in {}", out.display());
        }
        Cmd::SignKeys {
            key,
            sequence,
            out,
            public_keys,
        } => {
            let doc = trainer::sign::key_list(&keys::read_private(&key)?, sequence, &public_keys)?;
            trainer::sign::write_doc(&doc, &out, ".keys.json")?;
            println!(
                "key list {sequence} ({} keys) signed by {}: {}",
                public_keys.len(),
                doc.key_id,
                out.display()
            );
        }
        Cmd::SignRollback {
            key,
            to,
            from_version,
            clinic,
            device,
            reason,
            out,
        } => {
            let audience = trainer::sign::Audience { clinic, device };
            let doc = trainer::sign::rollback(&keys::read_private(&key)?, &to, from_version, audience, &reason)?;
            trainer::sign::write_doc(&doc, &out, ".rollback.json")?;
            println!(
                "rollback from version {from_version} to {} signed by {}: {}",
                to.display(),
                doc.key_id,
                out.display()
            );
        }
        Cmd::Resign {
            bundle,
            trust,
            key,
            out,
        } => {
            let bytes = trainer::sign::resign(&bundle, &trusted(&trust)?, &keys::read_private(&key)?)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            std::io::Write::write_all(&mut f, &bytes)?;
            println!("{} signed again: {}", bundle.display(), out.display());
        }
        Cmd::CheckHf { model, io } => {
            let p = wbc_shared::mllama::check_parity(&model, &io, &burn::tensor::Device::flex())?;
            let show = |what: &str, d: &wbc_shared::mllama::Difference| {
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
        }
        Cmd::Keygen { out } => {
            let k = keys::generate();
            keys::write_private(&out, &k)?;
            let pubp = PathBuf::from(format!("{}.pub", out.display()));
            keys::write_public(&pubp, &k.verifying_key())?;
            println!(
                "private key {} (mode 0600), public key {} (id {})",
                out.display(),
                pubp.display(),
                wbc_shared::bundle::key_id(&k.verifying_key())
            );
        }
    }
    Ok(())
}
