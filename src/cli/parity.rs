//! `diffii parity`: recompute a reference run and print one line per tensor.
use std::path::PathBuf;

use anyhow::{bail, Context};
use diffii::measure::parity;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// diffusers SD-1.x model folder the reference was made with.
    #[arg(long)]
    pub model: PathBuf,
    /// Reference directory holding ref_diffii.json and ref_diffii.safetensors.
    #[arg(long)]
    pub reference: PathBuf,
    /// Skip the teacher-forced trajectory checks (faster).
    #[arg(long)]
    pub skip_teacher_forced: bool,
    /// Product precision of the kernels (bf16 shows how far bf16 products move each tensor;
    /// the tolerances are those of a float32 port, so expect FAIL lines).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: super::common::PrecisionArg,
    /// Where the model runs: cpu, cuda or cuda:N (a `--features cuda` build). The tolerances
    /// are the same on every device.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight and activation type: f32, or f64, which on the CPU runs every layer through
    /// candle's own ops instead of the fused f32 kernels, the code a GPU runs (same tolerances).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum DtypeArg {
    F32,
    F64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let device = diffii::sd::loader::parse_device(&a.device)?;
    let dtype = match a.dtype {
        DtypeArg::F32 => candle_core::DType::F32,
        DtypeArg::F64 => candle_core::DType::F64,
    };
    let opts = parity::Options { skip_teacher_forced: a.skip_teacher_forced, precision: a.precision.into(), device, dtype };
    let start = std::time::Instant::now();
    let report = parity::run(&a.model, &a.reference, &opts, |stage| eprintln!("[parity] {stage}"))
        .with_context(|| format!("parity of {} against {}", a.model.display(), a.reference.display()))?;
    print!("{}", report.table());
    let failed = report.lines.iter().filter(|l| !l.ok).count();
    println!("{} tensors compared, {} ok, {} FAIL, {:.1} s", report.lines.len(), report.lines.len() - failed, failed, start.elapsed().as_secs_f64());
    if failed > 0 {
        bail!("{failed} tensor(s) outside tolerance");
    }
    Ok(())
}
