//! Subcommands, one module each.
use clap::{Parser, Subcommand};

mod bench;
mod info;
mod parity;

/// Diff-II synthetic data augmentation with Stable Diffusion 1.x.
#[derive(Parser, Debug)]
#[command(name = "diffii", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Compare every stage of a Diff-II run with a diffusers reference directory.
    Parity(parity::Args),
    /// Describe a diffusers SD-1.x model folder: components, sizes, vocabulary, scheduler.
    Info(info::Args),
    /// Measure UNet speed on the given model and on an SD-1.5-shaped UNet.
    Bench(bench::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Parity(a) => parity::run(a),
        Command::Info(a) => info::run(a),
        Command::Bench(a) => bench::run(a),
    }
}
