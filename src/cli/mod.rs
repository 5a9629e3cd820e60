//! Subcommands, one module each.
use clap::{Parser, Subcommand};

mod augment;
mod bench;
mod common;
mod compare;
mod concepts;
mod demo;
mod eval;
mod filter;
mod generate;
mod info;
mod invert;
mod merge;
mod parity;
mod pretrain;
mod train;

/// Diff-II synthetic data augmentation with Stable Diffusion 1.x.
#[derive(Parser, Debug)]
#[command(name = "diffii", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The whole method on the shipped real images and mini SD model: concepts, inversion, Diff-II
    /// and baselines, classifiers, a report (demo-out/report.html). No arguments needed.
    Demo(demo::Args),
    /// Learn one concept token per class (textual inversion; optional LoRA) from an image folder.
    Concepts(concepts::Args),
    /// DDIM-invert every image of a dataset into the inversion cache.
    Invert(invert::Args),
    /// Make Diff-II synthetic images for a dataset (ImageFolder output + manifest.jsonl).
    Generate(generate::Args),
    /// Invert and generate in one go: the whole augmentation of a dataset.
    Augment(augment::Args),
    /// Merge the shard manifests of a sharded `generate` run.
    Merge(merge::Args),
    /// Train a classifier on real (+ synthetic) images per seed; report validation-selected test accuracy.
    Train(train::Args),
    /// Accuracy of a classifier trained by `diffii train` on a labelled image set.
    Eval(eval::Args),
    /// Drop synthetic images a real-data classifier does not recognise (manifest records why).
    Filter(filter::Args),
    /// Compare synthesis methods by the test accuracy of classifiers trained with their images.
    Compare(compare::Args),
    /// Train a small SD-1.x model from scratch on an image folder (captions from pixels).
    Pretrain(pretrain::Args),
    /// Compare every stage of a Diff-II run with a diffusers reference directory.
    Parity(parity::Args),
    /// Describe a diffusers SD-1.x model folder: components, sizes, vocabulary, scheduler.
    Info(info::Args),
    /// Measure UNet speed on the given model and on an SD-1.5-shaped UNet.
    Bench(bench::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(a) => demo::run_demo(a),
        Command::Concepts(a) => concepts::run(a),
        Command::Invert(a) => invert::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Augment(a) => augment::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Filter(a) => filter::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Pretrain(a) => pretrain::run(a),
        Command::Parity(a) => parity::run(a),
        Command::Info(a) => info::run(a),
        Command::Bench(a) => bench::run(a),
    }
}
