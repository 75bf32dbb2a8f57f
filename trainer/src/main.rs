//! `trainer`: fine-tune, evaluate and export WBC model bundles. `main` parses the command line
//! ([`cli`]) and hands each subcommand to its function ([`commands`]).

mod cli;
mod commands;

use anyhow::Result;
use clap::Parser;
use cli::{Cli, Cmd, ModelFamily};

/// The compact model trains and exports on the CPU (its cached-prefix training runs there).
fn cpu_only(what: &str, device: trainer::device::DeviceChoice) -> Result<()> {
    if device != trainer::device::DeviceChoice::Cpu {
        anyhow::bail!("`trainer {what}` of the compact model runs on the CPU; --device is for --model mllama");
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().cmd {
        Cmd::Train(a) => match a.model {
            ModelFamily::Compact => cpu_only("train", a.device).and_then(|()| commands::train_compact(a)),
            ModelFamily::Mllama => commands::train_mllama(a),
        },
        Cmd::Export(a) => match a.model {
            ModelFamily::Compact => cpu_only("export", a.device).and_then(|()| commands::export_compact(a)),
            ModelFamily::Mllama => commands::export_mllama(a),
        },
        Cmd::Eval(a) => commands::eval(a),
        Cmd::Recalibrate(a) => commands::recalibrate(a),
        Cmd::Adapt(a) => commands::adapt(a),
        Cmd::CropFields(a) => commands::crop_fields(a),
        Cmd::Normalise(a) => commands::normalise(a),
        Cmd::SignKeys(a) => commands::sign_keys(a),
        Cmd::SignRollback(a) => commands::sign_rollback(a),
        Cmd::Resign(a) => commands::resign(a),
        Cmd::CheckHf(a) => commands::check_hf(a),
        Cmd::SynthMllama(a) => commands::synth_mllama(a),
        Cmd::Keygen(a) => commands::keygen(a),
    }
}
