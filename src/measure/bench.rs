//! Speed measurements: UNet steps on a real model folder and on a full-size SD-1.5-shaped UNet
//! built in memory with synthetic weights (no checkpoint needed). FLOPs are counted from the
//! matmuls and convolutions actually executed (see [`crate::instrument::flops`]), the same
//! convention as PyTorch's `FlopCounterMode` used for the reference figures.
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::error::Result;
use crate::rng::seeded_randn;
use crate::sd::config::UNetConfig;
use crate::instrument::{flops, peak_rss_mib, reset_peak_rss};
use crate::nn::{Mode, Precision};
use crate::sd::unet::UNet;
use crate::nn::weights::Weights;

/// How long [`CpuInfo::detect`] times the FMA peak.
const PEAK_BUDGET: std::time::Duration = std::time::Duration::from_millis(300);

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub name: String,
    pub batch: usize,
    pub latent: usize,
    /// Median wall time of one call.
    pub seconds: f64,
    pub min_seconds: f64,
    pub gflop: f64,
    pub gflops: f64,
    /// `gflops` as a percentage of the CPU's measured f32 FMA peak ([`fill_percent_of_peak`]).
    pub percent_of_peak: f64,
    /// Process peak resident memory after the case (MiB).
    pub peak_rss_mib: f64,
    /// PyTorch's median time for the same case, measured in this run (`--compare-python`).
    pub torch_seconds: Option<f64>,
    /// The dtype PyTorch ran in for `torch_seconds` ("f32" or "bf16"), when it ran in this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// Each round's medians when the case was measured over several rounds (`bench --rounds`,
    /// [`merge_rounds`]); empty for one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<Round>,
}

/// One round of a case measured over several: our median time, then PyTorch's of the same case
/// (measured after all of ours in that round).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Round {
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_seconds: Option<f64>,
}

impl BenchResult {
    /// A case's result before any PyTorch figure or %peak is filled in.
    pub fn new(name: &str, batch: usize, latent: usize, seconds: f64, min_seconds: f64, gflop: f64) -> BenchResult {
        BenchResult {
            name: name.to_string(),
            batch,
            latent,
            seconds,
            min_seconds,
            gflop,
            gflops: rate(gflop, seconds),
            percent_of_peak: 0.0,
            peak_rss_mib: peak_rss_mib(),
            torch_seconds: None,
            torch_dtype: None,
            rounds: Vec::new(),
        }
    }

    /// The rounds' ours / PyTorch ratios, in round order (empty unless measured over several
    /// rounds with PyTorch).
    fn round_ratios(&self) -> Vec<f64> {
        self.rounds.iter().filter_map(|r| r.torch_seconds.map(|t| r.seconds / t)).collect()
    }

    /// Ours / PyTorch's time: over several rounds the median of the rounds' ratios (the two
    /// times of a round are minutes apart, so a drift of a shared machine's speed between
    /// rounds cancels out of each ratio), else the ratio of the two medians.
    pub fn ratio(&self) -> Option<f64> {
        let mut ratios = self.round_ratios();
        if ratios.is_empty() {
            return self.torch_seconds.map(|t| self.seconds / t);
        }
        ratios.sort_by(f64::total_cmp);
        Some(median(&ratios))
    }

    /// The lowest and the highest of the rounds' ratios, when there are two or more.
    pub fn ratio_range(&self) -> Option<(f64, f64)> {
        let ratios = self.round_ratios();
        (ratios.len() > 1).then(|| ratios.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &r| (lo.min(r), hi.max(r))))
    }
}

/// GFLOP/s of `gflop` done in `seconds` (0 for no time measured).
fn rate(gflop: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        gflop / seconds
    } else {
        0.0
    }
}

/// The results of several rounds of the same cases (`bench --rounds`, each round all of ours
/// and then PyTorch's) as one result per case: the median of the rounds' medians for each side,
/// the fastest call, the largest peak memory, and every round kept in [`BenchResult::rounds`].
/// One round is returned as it is.
pub fn merge_rounds(mut rounds: Vec<Vec<BenchResult>>) -> Result<Vec<BenchResult>> {
    if rounds.len() <= 1 {
        return Ok(rounds.pop().unwrap_or_default());
    }
    let key = |r: &BenchResult| (r.name.clone(), r.batch, r.latent);
    let first: Vec<_> = rounds[0].iter().map(key).collect();
    if let Some(i) = rounds.iter().position(|round| round.iter().map(key).collect::<Vec<_>>() != first) {
        return Err(crate::error::Error::invalid(format!("bench round {} measured other cases than round 1", i + 1)));
    }
    let merged = (0..first.len())
        .map(|c| {
            let cases: Vec<&BenchResult> = rounds.iter().map(|round| &round[c]).collect();
            let sorted = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v
            };
            let seconds = median(&sorted(cases.iter().map(|r| r.seconds).collect()));
            let torch = sorted(cases.iter().filter_map(|r| r.torch_seconds).collect());
            let min_seconds = cases.iter().map(|r| r.min_seconds).fold(f64::INFINITY, f64::min);
            BenchResult {
                seconds,
                min_seconds,
                gflops: rate(cases[0].gflop, seconds),
                percent_of_peak: 0.0,
                peak_rss_mib: cases.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max),
                torch_seconds: (!torch.is_empty()).then(|| median(&torch)),
                torch_dtype: cases.iter().find_map(|r| r.torch_dtype.clone()),
                rounds: cases.iter().map(|r| Round { seconds: r.seconds, torch_seconds: r.torch_seconds }).collect(),
                ..cases[0].clone()
            }
        })
        .collect();
    Ok(merged)
}

/// The CPU a benchmark ran on: its model name and the run-time detected features our kernels
/// care about, plus the worker thread count.
#[derive(Debug, Clone, Serialize)]
pub struct CpuInfo {
    /// `model name` from /proc/cpuinfo, or "unknown".
    pub model: String,
    /// `cpu family`, `model` and `stepping` from /proc/cpuinfo ("family 25 model 17 stepping
    /// 1"), or empty: cloud VMs sell different CPUs under one model name (e.g. "AMD EPYC"), and
    /// these numbers tell them apart.
    pub id: String,
    /// Rayon worker threads (our kernels' parallelism; PyTorch is given the same count).
    pub threads: usize,
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    pub avx512bf16: bool,
    /// From the `flags` line of /proc/cpuinfo (std's detection macro has no stable AMX names).
    pub amx_bf16: bool,
    pub amx_tile: bool,
    /// The f32 FMA throughput of `threads` threads, timed when the CPU was detected
    /// ([`crate::kernels::peak`]): the reference for the %peak column.
    pub fma_peak_gflops: f64,
}

impl CpuInfo {
    /// Reads /proc/cpuinfo and times the FMA peak on the current pool (about 0.3 s, every
    /// thread busy: call it while nothing else runs).
    pub fn detect() -> Self {
        let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let peak = crate::kernels::peak::fma_peak_gflops(PEAK_BUDGET);
        Self::from_cpuinfo(&text, rayon::current_num_threads(), peak)
    }

    /// From the text of /proc/cpuinfo (the first `model name` and `flags` lines) and a measured
    /// FMA peak; the x86 features other than AMX come from std's run-time detection, not from
    /// the text.
    pub fn from_cpuinfo(text: &str, threads: usize, fma_peak_gflops: f64) -> Self {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_string()))
        };
        let model = field("model name").filter(|m| !m.is_empty()).unwrap_or_else(|| "unknown".to_string());
        let id = [("cpu family", "family"), ("model", "model"), ("stepping", "stepping")]
            .iter()
            .filter_map(|(key, label)| field(key).filter(|v| !v.is_empty()).map(|v| format!("{label} {v}")))
            .collect::<Vec<_>>()
            .join(" ");
        let flags = field("flags").unwrap_or_default();
        let flag = |f: &str| flags.split_whitespace().any(|x| x == f);
        #[cfg(target_arch = "x86_64")]
        let (avx2, fma, avx512f, avx512bf16) = (
            std::arch::is_x86_feature_detected!("avx2"),
            std::arch::is_x86_feature_detected!("fma"),
            std::arch::is_x86_feature_detected!("avx512f"),
            std::arch::is_x86_feature_detected!("avx512bf16"),
        );
        #[cfg(not(target_arch = "x86_64"))]
        let (avx2, fma, avx512f, avx512bf16) = (false, false, false, false);
        let x86 = cfg!(target_arch = "x86_64");
        let (amx_bf16, amx_tile) = (x86 && flag("amx_bf16"), x86 && flag("amx_tile"));
        CpuInfo { model, id, threads, avx2, fma, avx512f, avx512bf16, amx_bf16, amx_tile, fma_peak_gflops }
    }

    /// One line for the top of the table.
    pub fn line(&self) -> String {
        let mut feats: Vec<&str> = Vec::new();
        for (on, name) in [
            (self.avx2, "avx2"),
            (self.fma, "fma"),
            (self.avx512f, "avx512f"),
            (self.avx512bf16, "avx512bf16"),
            (self.amx_bf16, "amx-bf16"),
            (self.amx_tile, "amx-tile"),
        ] {
            if on {
                feats.push(name);
            }
        }
        let feats = if feats.is_empty() { "none".to_string() } else { feats.join(" ") };
        let id = if self.id.is_empty() { String::new() } else { format!(" ({})", self.id) };
        format!(
            "cpu: {}{} | features: {} | threads: {} | f32 FMA peak (measured): {:.0} GFLOP/s\n",
            self.model, id, feats, self.threads, self.fma_peak_gflops
        )
    }
}

/// Sets every result's %peak against `peak_gflops` (0 where no FLOPs were counted or the
/// peak is unknown).
pub fn fill_percent_of_peak(results: &mut [BenchResult], peak_gflops: f64) {
    for r in results {
        r.percent_of_peak = if peak_gflops > 0.0 { 100.0 * r.gflops / peak_gflops } else { 0.0 };
    }
}

/// What `bench --json` writes: the CPU and every measured case.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport<'a> {
    pub cpu: CpuInfo,
    /// Where the SD-1.5 and `--model` cases ran: `cpu`, or `cuda:N` and the GPU's name.
    pub device: String,
    pub results: &'a [BenchResult],
    /// `--profile`'s per-op-class profiles (with PyTorch's, under `--compare-python`).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub profiles: &'a [Profile],
}

/// Builds an SD-1.5-shaped UNet with deterministic synthetic weights.
pub fn synthetic_sd15_unet(dtype: DType, precision: Precision, device: &Device) -> Result<UNet> {
    synthetic_sd15_unet_mode(dtype, precision, device, Mode::Infer, true)
}

/// [`synthetic_sd15_unet`] in a given mode ([`Mode::Train`] for training benchmarks).
pub fn synthetic_sd15_unet_mode(dtype: DType, precision: Precision, device: &Device, mode: Mode, frozen_ops: bool) -> Result<UNet> {
    let w = Weights::synthetic(0, dtype, device).with_precision(precision).with_frozen_ops(frozen_ops);
    UNet::load(&w, &UNetConfig::sd15(), mode)
}

/// Times `reps` UNet calls (after `warmup` untimed ones) on a batch of `batch` latents of
/// `latent` x `latent` with a 77-token context.
pub fn unet_step(name: &str, unet: &UNet, batch: usize, latent: usize, warmup: usize, reps: usize) -> Result<BenchResult> {
    let (x, ctx) = unet_inputs(unet, batch, latent)?;
    timed(name, batch, latent, warmup, reps, || unet.forward_t(&x, 500, &ctx))
}

/// Random latents [batch, c, latent, latent] and a 77-token context for `unet`, on its device
/// and in its dtype.
fn unet_inputs(unet: &UNet, batch: usize, latent: usize) -> Result<(Tensor, Tensor)> {
    let (c, dev, dtype) = (&unet.config, unet.device(), unet.dtype());
    let x = seeded_randn(1, &[batch, c.in_channels, latent, latent], dev)?.to_dtype(dtype)?;
    let ctx = seeded_randn(2, &[batch, 77, c.down[0].cross_attention_dim], dev)?.to_dtype(dtype)?;
    Ok((x, ctx))
}

/// Times one textual-inversion step — text encoder forward from concept rows that require
/// gradients, UNet forward at one timestep, MSE loss and backward — on random latents and
/// prompts with one concept token. The optimiser update (a few vectors) is not included; the
/// counted FLOPs are those of the forward pass. `frozen` switches the frozen-operand products
/// (no weight gradients computed or kept, [`crate::nn::frozen`]) on or off.
#[allow(clippy::too_many_arguments)]
pub fn ti_step(
    name: &str,
    clip: &crate::sd::clip::ClipTextEncoder,
    unet: &UNet,
    batch: usize,
    latent: usize,
    warmup: usize,
    reps: usize,
) -> Result<BenchResult> {
    use crate::train::diffusion::{noise_prediction_loss, Batch};
    let dev = unet.device().clone();
    let dtype = unet.dtype();
    let c = &unet.config;
    let hidden = clip.config.hidden_size;
    let vocab = clip.config.vocab_size as u32;
    let rows = candle_core::Var::from_tensor(&(seeded_randn(4, &[1, hidden], &dev)?.to_dtype(dtype)? * 0.01)?)?;
    // <start> a photo of a <concept> bird <end> <pad>...: ids below the vocabulary are arbitrary.
    let w = |i: u32| i % (vocab - 2);
    let mut ids: Vec<u32> = vec![vocab - 2, w(320), w(1125), w(539), w(320), vocab, w(3329), vocab - 1];
    ids.resize(clip.config.max_position_embeddings, vocab - 1);
    let ids = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?.repeat((batch, 1))?;
    let latents = seeded_randn(5, &[batch, c.in_channels, latent, latent], &dev)?.to_dtype(dtype)?;
    let noise = seeded_randn(6, latents.dims(), &dev)?.to_dtype(dtype)?;
    let b = Batch { latents, noise, timesteps: vec![500; batch], ids };
    let alphas = crate::schedule::ddim::alphas_cumprod(&crate::schedule::ddim::DdimConfig::sd15())?;
    timed(name, batch, latent, warmup, reps, || {
        let loss = noise_prediction_loss(clip, unet, &alphas, crate::schedule::ddim::PredictionType::Epsilon, &b, Some(rows.as_tensor()))?;
        let grads = loss.backward()?;
        grads.get(rows.as_tensor()).cloned().ok_or_else(|| crate::error::Error::invalid("no gradient reached the concept row"))
    })
}

/// Builds an SD-1.5-shaped VAE with deterministic synthetic weights.
pub fn synthetic_sd15_vae(dtype: DType, precision: Precision, device: &Device) -> Result<crate::sd::vae::Vae> {
    crate::sd::vae::Vae::load(&Weights::synthetic(2, dtype, device).with_precision(precision), &crate::sd::config::VaeConfig::sd15(), Mode::Infer)
}

/// PyTorch timings of the same SD-1.5 shapes, from `scripts/reference/bench_sd15_cpu.py --json`:
/// (case, batch, latent) -> median seconds. Cases: "unet", "text encoder", "vae encode",
/// "vae decode".
pub fn read_torch_json(path: &std::path::Path) -> Result<Vec<(String, usize, usize, f64)>> {
    let v: serde_json::Value = crate::error::read_json(path)?;
    Ok(torch_cases(&v).into_iter().filter_map(|(case, b, l, d)| Some((case, b, l, d.get("median_s")?.as_f64()?))).collect())
}

/// The per-op-class profiles in the JSON of `scripts/reference/bench_sd15_cpu.py --profile`, as
/// (case, batch, latent, profile) like [`read_torch_json`].
pub fn read_torch_profiles(path: &std::path::Path) -> Result<Vec<(String, usize, usize, TorchProfile)>> {
    let v: serde_json::Value = crate::error::read_json(path)?;
    let mut out = Vec::new();
    for (case, b, l, d) in torch_cases(&v) {
        let Some(p) = d.get("profile") else { continue };
        let bad = || crate::error::Error::invalid(format!("{}: a profile without total_s and classes", path.display()));
        let total_seconds = p.get("total_s").and_then(|t| t.as_f64()).ok_or_else(bad)?;
        let classes = p.get("classes").and_then(|c| c.as_object()).ok_or_else(bad)?;
        let classes = classes.iter().filter_map(|(k, s)| Some((k.clone(), s.as_f64()?))).collect();
        out.push((case, b, l, TorchProfile { total_seconds, classes }));
    }
    Ok(out)
}

/// The cases of the PyTorch benchmark's JSON: (our case name, batch, latent, its object).
fn torch_cases(v: &serde_json::Value) -> Vec<(String, usize, usize, &serde_json::Value)> {
    let mut out = Vec::new();
    for (key, case, batch, latent) in [
        ("unet64", "unet", 2, 64),
        ("unet32", "unet", 2, 32),
        ("unet64b1", "unet", 1, 64),
        ("clip_text_b2", "text encoder", 2, 0),
        ("vae_encode_512", "vae encode", 1, 64),
        ("vae_decode_512", "vae decode", 1, 64),
        ("diffii_flow_sd15", "diffii flow", 1, 64),
    ] {
        if let Some(d) = v.get(key) {
            out.push((case.to_string(), batch, latent, d));
        }
    }
    // Any other UNet case: unet_b<B>_l<L>.
    for (key, d) in v.as_object().into_iter().flatten() {
        let Some((b, l)) = key.strip_prefix("unet_b").and_then(|r| r.split_once("_l")) else { continue };
        let (Ok(b), Ok(l)) = (b.parse::<usize>(), l.parse::<usize>()) else { continue };
        out.push(("unet".to_string(), b, l, d));
    }
    out
}

/// Builds an SD-1.5-shaped CLIP text encoder with deterministic synthetic weights.
pub fn synthetic_sd15_text_encoder(
    dtype: DType,
    precision: Precision,
    device: &Device,
    mode: Mode,
    frozen_ops: bool,
) -> Result<crate::sd::clip::ClipTextEncoder> {
    let w = Weights::synthetic(1, dtype, device).with_precision(precision).with_frozen_ops(frozen_ops);
    crate::sd::clip::ClipTextEncoder::load(&w, &crate::sd::config::ClipConfig::sd15(), mode)
}

/// A fixed-width table of results.
pub fn table(results: &[BenchResult]) -> String {
    // Measured over several rounds: each ratio's range beside it.
    let ranged = results.iter().any(|r| r.ratio_range().is_some());
    let mut s = format!(
        "{:<32} {:>5} {:>6} {:>10} {:>10} {:>9} {:>7} {:>10} {:>12} {:>8}",
        "case", "batch", "latent", "seconds", "GFLOP", "GFLOP/s", "%peak", "peak MiB", "torch s", "ratio"
    );
    if ranged {
        s.push_str(&format!(" {:>13}", "rounds' range"));
    }
    s.push('\n');
    for r in results {
        let (ts, ratio) = match (r.torch_seconds, r.ratio()) {
            // Decimals that keep sub-0.1 s PyTorch figures readable; bf16 PyTorch runs are marked.
            (Some(t), Some(ratio)) => {
                let mark = match r.torch_dtype.as_deref() {
                    Some(d) if d != "f32" => format!(" {d}"),
                    _ => String::new(),
                };
                (format!("{t:.3}{mark}"), format!("{ratio:.2}x"))
            }
            _ => ("-".into(), "-".into()),
        };
        // No FLOPs counted (the demo's stages) or no peak to compare with (a GPU).
        let percent = if r.percent_of_peak > 0.0 { format!("{:.1}%", r.percent_of_peak) } else { "-".into() };
        s.push_str(&format!(
            "{:<32} {:>5} {:>6} {:>10.4} {:>10.2} {:>9.1} {:>7} {:>10.0} {:>12} {:>8}",
            r.name, r.batch, r.latent, r.seconds, r.gflop, r.gflops, percent, r.peak_rss_mib, ts, ratio
        ));
        if ranged {
            let range = r.ratio_range().map_or("-".to_string(), |(lo, hi)| format!("{lo:.2}-{hi:.2}x"));
            s.push_str(&format!(" {range:>13}"));
        }
        s.push('\n');
    }
    s
}

/// Convenience for callers that want a tensor-free smoke value.
pub fn describe(t: &Tensor) -> String {
    format!("{:?} {:?}", t.dims(), t.dtype())
}

/// Times `reps` VAE decodes (after `warmup` untimed ones) of a batch of `batch` latents of
/// `latent` x `latent`. FLOPs are counted like the UNet's.
pub fn vae_decode_step(name: &str, vae: &crate::sd::vae::Vae, batch: usize, latent: usize, warmup: usize, reps: usize) -> Result<BenchResult> {
    let z = decode_input(vae, batch, latent)?;
    timed(name, batch, latent, warmup, reps, || vae.decode(&z))
}

/// Random latents [batch, c, latent, latent] for `vae`'s decoder, on its device.
fn decode_input(vae: &crate::sd::vae::Vae, batch: usize, latent: usize) -> Result<Tensor> {
    seeded_randn(3, &[batch, vae.config.latent_channels, latent, latent], vae.device())
}

/// Times VAE encodes (posterior moments) of `batch` random images of `side` x `side` pixels.
pub fn vae_encode_step(name: &str, vae: &crate::sd::vae::Vae, batch: usize, side: usize, warmup: usize, reps: usize) -> Result<BenchResult> {
    let x = (seeded_randn(7, &[batch, 3, side, side], vae.device())?.tanh())?;
    let latent = side / vae.config.spatial_factor();
    timed(name, batch, latent, warmup, reps, || Ok(vae.encode(&x)?.0))
}

/// `batch` prompts of the full context length, as token ids.
fn prompt_ids(clip: &crate::sd::clip::ClipTextEncoder, batch: usize) -> Result<Tensor> {
    let n = clip.config.max_position_embeddings;
    let vocab = clip.config.vocab_size as u32;
    let ids: Vec<u32> = (0..batch * n).map(|i| (i as u32 * 7919) % vocab).collect();
    Ok(Tensor::from_vec(ids, (batch, n), clip.device())?)
}

/// Times text-encoder calls on `batch` prompts of the full context length.
pub fn text_encoder_step(name: &str, clip: &crate::sd::clip::ClipTextEncoder, batch: usize, warmup: usize, reps: usize) -> Result<BenchResult> {
    let ids = prompt_ids(clip, batch)?;
    timed(name, batch, 0, warmup, reps, || clip.forward(&ids, None))
}

/// [`profile_call`] of the text encoder on `batch` prompts of the full context length.
pub fn text_encoder_profile(name: &str, clip: &crate::sd::clip::ClipTextEncoder, batch: usize, reps: usize) -> Result<Profile> {
    let ids = prompt_ids(clip, batch)?;
    profile_call(name, clip.device(), batch, 0, reps, || clip.forward(&ids, None))
}

/// Times one whole Diff-II generation at SD-1.5 shapes (synthetic weights, two random 512 px
/// images): text encoding of the three prompts, VAE encoding of both images, `inv_steps` DDIM
/// inversion steps of each (conditional branch, batch 1), slerp at t = 0.5, `steps` two-stage
/// guided DDIM steps (guidance 7.5, batch 2 per call; stage 1 by Diff-II's strength 0.3),
/// decoding.
/// The UNet runs at its own dtype; the text encoder and VAE at theirs.
#[allow(clippy::too_many_arguments)]
pub fn sd15_flow(
    name: &str,
    clip: &crate::sd::clip::ClipTextEncoder,
    vae: &crate::sd::vae::Vae,
    unet: &UNet,
    inv_steps: usize,
    steps: usize,
    warmup: usize,
    reps: usize,
) -> Result<BenchResult> {
    use crate::schedule::ddim::{Ddim, DdimConfig};
    use crate::schedule::sampling::ddim_invert;
    use crate::synth::diffii::{sample_two_stage, stage1_steps_for_strength, TwoStage};
    let sched = Ddim::new(DdimConfig::sd15())?;
    let stage1_steps = stage1_steps_for_strength(&sched.set_timesteps(steps)?.timesteps, sched.num_train_timesteps(), 0.3);
    let ids = prompt_ids(clip, 3)?;
    let images = (seeded_randn(8, &[2, 3, 512, 512], vae.device())?.tanh())?;
    let dtype = unet.dtype();
    timed(name, 1, 64, warmup, reps, || {
        let emb = clip.forward(&ids, None)?.to_device(unet.device())?.to_dtype(dtype)?;
        let (uncond, stage1, stage2) = (emb.narrow(0, 0, 1)?, emb.narrow(0, 1, 1)?, emb.narrow(0, 2, 1)?);
        let mut inverted = Vec::new();
        for i in 0..2 {
            let z0 = vae.encode_latent(&images.narrow(0, i, 1)?)?.to_device(unet.device())?.to_dtype(dtype)?;
            inverted.push(ddim_invert(&sched, &z0, inv_steps, |x, _, t| unet.forward_t(x, t, &stage2), |_| {})?);
        }
        let (z, _) = crate::synth::interpolate::slerp(&inverted[0], &inverted[1], 0.5, 0.9995)?;
        let cond = TwoStage { uncond: &uncond, stage1: &stage1, stage2: &stage2, stage1_steps, guidance: 7.5 };
        let z = sample_two_stage(unet, &sched, &z, &cond, steps, |_| {})?;
        vae.decode_latent(&z.to_device(vae.device())?.to_dtype(DType::F32)?)
    })
}

/// Times the whole Diff-II flow of a reference run (`diffii parity --skip-teacher-forced`:
/// model load, text encoding, VAE encoding, both inversions, interpolation, two-stage guided
/// sampling, decoding, plus the cheap comparisons), and fails if any tensor is off.
pub fn flow(name: &str, model: &std::path::Path, reference: &std::path::Path, precision: Precision, reps: usize) -> Result<BenchResult> {
    let opts = crate::measure::parity::Options { skip_teacher_forced: true, precision, device: Device::Cpu, dtype: candle_core::DType::F32 };
    timed(name, 1, 0, 0, reps, || {
        let report = crate::measure::parity::run(model, reference, &opts, |_| {})?;
        if !report.all_ok() {
            return Err(crate::error::Error::invalid("the benchmarked flow does not match its reference (run `diffii parity`)"));
        }
        Ok(Tensor::new(0f32, &Device::Cpu)?)
    })
}

/// The median of sorted `times`: for an even count the mean of the middle two, as Python's
/// `statistics.median` gives the PyTorch side.
pub fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 0 => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        n => sorted[n / 2],
    }
}

/// Reads a value of `out` back: on a GPU this waits for the queued work that makes it, so that
/// none of it lands in the next timed call.
fn finish(out: Tensor) -> Result<()> {
    out.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    Ok(())
}

fn timed(name: &str, batch: usize, latent: usize, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<BenchResult> {
    reset_peak_rss();
    for _ in 0..warmup {
        finish(f()?)?;
    }
    let mut times = Vec::with_capacity(reps);
    let mut flops = 0;
    for i in 0..reps.max(1) {
        if i == 0 {
            flops::start();
        }
        let t0 = Instant::now();
        finish(f()?)?;
        times.push(t0.elapsed().as_secs_f64());
        if i == 0 {
            flops = flops::stop();
        }
    }
    times.sort_by(f64::total_cmp);
    let seconds = median(&times);
    let gflop = flops as f64 / 1e9;
    Ok(BenchResult::new(name, batch, latent, seconds, times[0], gflop))
}

/// Wall time of one call split by op class (see [`crate::instrument::profile`]).
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub name: String,
    pub batch: usize,
    pub latent: usize,
    pub total_seconds: f64,
    /// (class, seconds, calls); "other" is the total minus the classes.
    pub classes: Vec<(String, f64, u64)>,
    /// PyTorch's profile of the same case in the same run (`--compare-python`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch: Option<TorchProfile>,
}

/// One call of a case in PyTorch under `torch.profiler`, its ops' self times summed into our op
/// classes (`scripts/reference/bench_sd15_cpu.py --profile`).
#[derive(Debug, Clone, Serialize)]
pub struct TorchProfile {
    pub total_seconds: f64,
    /// (class, seconds); "other" is the total minus the classified ops.
    pub classes: Vec<(String, f64)>,
}

/// Profiles the fastest of `reps` calls of `f` (one untimed warm-up first).
pub fn profile_call(name: &str, device: &Device, batch: usize, latent: usize, reps: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<Profile> {
    use crate::instrument::profile;
    finish(f()?)?;
    let mut best: Option<Profile> = None;
    for _ in 0..reps.max(1) {
        profile::start(device);
        let t0 = Instant::now();
        finish(f()?)?;
        let total = t0.elapsed().as_secs_f64();
        let rows = profile::stop();
        let mut classes: Vec<(String, f64, u64)> = rows.iter().map(|(c, s, n)| (c.name().to_string(), *s, *n)).collect();
        let accounted: f64 = rows.iter().map(|r| r.1).sum();
        classes.push(("other".to_string(), (total - accounted).max(0.0), 0));
        if best.as_ref().is_none_or(|b| total < b.total_seconds) {
            best = Some(Profile { name: name.to_string(), batch, latent, total_seconds: total, classes, torch: None });
        }
    }
    Ok(best.unwrap())
}

/// Profiles a UNet step like [`unet_step`].
pub fn unet_profile(name: &str, unet: &UNet, batch: usize, latent: usize, reps: usize) -> Result<Profile> {
    let (x, ctx) = unet_inputs(unet, batch, latent)?;
    profile_call(name, unet.device(), batch, latent, reps, || unet.forward_t(&x, 500, &ctx))
}

/// Profiles a VAE decode like [`vae_decode_step`].
pub fn vae_decode_profile(name: &str, vae: &crate::sd::vae::Vae, batch: usize, latent: usize, reps: usize) -> Result<Profile> {
    let z = decode_input(vae, batch, latent)?;
    profile_call(name, vae.device(), batch, latent, reps, || vae.decode(&z))
}

/// Profiles as a table: seconds and share of the total per op class, and PyTorch's seconds per
/// class where it was profiled too.
pub fn profile_table(profiles: &[Profile]) -> String {
    let mut s = String::new();
    for p in profiles {
        let torch_total = p.torch.as_ref().map(|t| format!(" (PyTorch: {:.4} s)", t.total_seconds)).unwrap_or_default();
        s.push_str(&format!("profile: {} batch {} latent {}: {:.4} s{torch_total}\n", p.name, p.batch, p.latent, p.total_seconds));
        if p.torch.is_some() {
            s.push_str(&format!("  {:<16} {:>9}   {:>6}   {:>6}       {:>10}   {:>6}\n", "op class", "ours", "share", "calls", "PyTorch", "share"));
        }
        for (name, secs, calls) in &p.classes {
            s.push_str(&format!("  {:<16} {:>9.4} s {:>6.1}%  {:>6} calls", name, secs, 100.0 * secs / p.total_seconds, calls));
            if let Some(t) = &p.torch {
                let ts = t.classes.iter().find(|(c, _)| c == name).map_or(0.0, |c| c.1);
                s.push_str(&format!(" {:>10.4} s {:>6.1}%", ts, 100.0 * ts / t.total_seconds));
            }
            s.push('\n');
        }
    }
    s
}

/// Times one training step of the small ResNet (forward in training mode, label-smoothed
/// cross-entropy, backward, SGD update) and one evaluation forward, at `batch` images of
/// `size` px, with fresh weights and fixed synthetic images.
pub fn classifier_steps(depth: usize, classes: usize, batch: usize, size: usize, warmup: usize, reps: usize) -> Result<Vec<BenchResult>> {
    let config = crate::classify::resnet::ResNetConfig::small(classes, depth);
    resnet_steps(&format!("classifier (depth {depth})"), &config, batch, size, warmup, reps)
}

/// [`classifier_steps`] for torchvision's ResNet-50 (`--arch resnet50`, with its ImageNet input
/// normalisation).
pub fn resnet50_steps(classes: usize, batch: usize, size: usize, warmup: usize, reps: usize) -> Result<Vec<BenchResult>> {
    let config = crate::classify::resnet::ResNetConfig::resnet50(classes);
    resnet_steps("resnet50", &config, batch, size, warmup, reps)
}

/// A ResNet with fresh weights, its SGD optimiser and a fixed batch: the state of the
/// classifier benchmark. The step is that of `scripts/reference/bench_classifier.py`: fresh
/// gradients, cross-entropy with label smoothing 0.1 on one-hot targets (labels i % classes),
/// backward, SGD (lr 0.01, momentum 0.9, weight decay 5e-4 on every parameter, Nesterov).
struct ResNetBench {
    model: crate::classify::resnet::ResNet,
    weights: crate::nn::Weights,
    vars: Vec<candle_core::Var>,
    opt: crate::train::sgd::Sgd,
    x: Tensor,
    target: Tensor,
}

impl ResNetBench {
    fn new(config: &crate::classify::resnet::ResNetConfig, batch: usize, size: usize) -> Result<Self> {
        use crate::classify::resnet::{init_weights, trainable};
        use crate::train::sgd::{Sgd, SgdParams};
        let dev = Device::Cpu;
        let classes = config.classes;
        let (model, weights) = trainable(init_weights(config, 0)?, config, &dev)?;
        let vars: Vec<_> = weights.vars().into_iter().map(|(_, v)| v).collect();
        let opt = Sgd::new(vars.clone(), SgdParams { lr: 0.01, momentum: 0.9, dampening: 0.0, weight_decay: 5e-4, nesterov: true })?;
        let x = seeded_randn(7, &[batch, 3, size, size], &dev)?;
        let labels: Vec<usize> = (0..batch).map(|i| i % classes).collect();
        let target = crate::classify::loss::one_hot(&labels, classes, &dev)?;
        Ok(ResNetBench { model, weights, vars, opt, x, target })
    }

    /// One training step; returns the loss.
    fn train_step(&mut self) -> Result<Tensor> {
        let loss = crate::classify::loss::cross_entropy(&self.model.forward(&self.x, true)?, &self.target, 0.1)?;
        let grads = loss.backward()?;
        self.opt.step(&self.vars.iter().map(|v| grads.get(v.as_tensor()).cloned()).collect::<Vec<_>>())?;
        Ok(loss)
    }
}

/// The training step and evaluation forward of any ResNet (see `ResNetBench`): cases
/// "`label` train step" and "`label` eval".
pub fn resnet_steps(label: &str, config: &crate::classify::resnet::ResNetConfig, batch: usize, size: usize, warmup: usize, reps: usize) -> Result<Vec<BenchResult>> {
    let mut b = ResNetBench::new(config, batch, size)?;
    let train = timed(&format!("{label} train step"), batch, size, warmup, reps, || b.train_step())?;
    // Evaluation as training evaluates (PyTorch: `eval()` under `no_grad`): the parameters as
    // plain tensors, taken once.
    let model = crate::classify::resnet::inference_copy(&b.model, &b.weights)?;
    let eval = timed(&format!("{label} eval"), batch, size, warmup, reps, || model.forward(&b.x, false))?;
    Ok(vec![train, eval])
}

/// Wall time by op class of the fastest of `reps` training steps of [`resnet_steps`].
pub fn resnet_train_profile(label: &str, config: &crate::classify::resnet::ResNetConfig, batch: usize, size: usize, reps: usize) -> Result<Profile> {
    let mut b = ResNetBench::new(config, batch, size)?;
    profile_call(&format!("{label} train step"), &Device::Cpu, batch, size, reps, || b.train_step())
}

/// PyTorch timings from `scripts/reference/bench_classifier.py --json`: (case suffix, median
/// seconds) for "small_train", "small_eval", "resnet50_train", "resnet50_eval" where present.
pub fn read_torch_classifier_json(path: &std::path::Path) -> Result<Vec<(String, f64)>> {
    let v: serde_json::Value = crate::error::read_json(path)?;
    let mut out = Vec::new();
    for key in ["small_train", "small_eval", "resnet50_train", "resnet50_eval"] {
        if let Some(s) = v.get(key).and_then(|d| d.get("median_s")).and_then(|s| s.as_f64()) {
            out.push((key.to_string(), s));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_info_reads_model_and_amx_flags() {
        let text = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: Test CPU @ 2.0GHz\nstepping\t: 1\n\
                    flags\t\t: fpu avx2 amx_bf16 amx_tile avx512f\n\nprocessor\t: 1\nmodel name\t: Other\nmodel\t\t: 1\n";
        let c = CpuInfo::from_cpuinfo(text, 3, 229.4);
        assert_eq!(c.model, "Test CPU @ 2.0GHz");
        assert_eq!(c.id, "family 25 model 17 stepping 1");
        assert_eq!(c.threads, 3);
        assert_eq!((c.amx_bf16, c.amx_tile), (cfg!(target_arch = "x86_64"), cfg!(target_arch = "x86_64")));
        let line = c.line();
        assert!(line.starts_with("cpu: Test CPU @ 2.0GHz (family 25 model 17 stepping 1) | features: "), "{line}");
        assert!(line.ends_with("| threads: 3 | f32 FMA peak (measured): 229 GFLOP/s\n"), "{line}");
        let none = CpuInfo::from_cpuinfo("", 1, 0.0);
        assert_eq!(none.model, "unknown");
        assert!(none.line().starts_with("cpu: unknown | features: "), "{}", none.line());
        assert!(!none.amx_bf16 && !none.amx_tile);
    }

    #[test]
    fn percent_of_peak_is_against_the_given_peak() {
        let r = |gflops: f64| BenchResult {
            name: "x".into(),
            batch: 1,
            latent: 1,
            seconds: 1.0,
            min_seconds: 1.0,
            gflop: gflops,
            gflops,
            percent_of_peak: -1.0,
            peak_rss_mib: 0.0,
            torch_seconds: None,
            torch_dtype: None,
            rounds: Vec::new(),
        };
        let mut rs = vec![r(50.0), r(0.0)];
        fill_percent_of_peak(&mut rs, 200.0);
        assert_eq!((rs[0].percent_of_peak, rs[1].percent_of_peak), (25.0, 0.0));
        // The table shows the percentage where there is one, a dash where not (no FLOPs
        // counted, or a GPU's case, which is never filled).
        let rows: Vec<String> = table(&rs).lines().skip(1).map(|l| l.split_whitespace().nth(6).unwrap_or_default().to_string()).collect();
        assert_eq!(rows, ["25.0%", "-"]);
        fill_percent_of_peak(&mut rs, 0.0);
        assert_eq!(rs[0].percent_of_peak, 0.0);
    }

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0]), 1.5);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn rounds_merge_into_medians_and_the_median_ratio() {
        let case = |name: &str, seconds: f64, torch: Option<f64>, rss: f64| BenchResult {
            torch_seconds: torch,
            torch_dtype: torch.map(|_| "f32".to_string()),
            peak_rss_mib: rss,
            ..BenchResult::new(name, 2, 8, seconds, seconds * 0.9, 4.0)
        };
        // The machine's speed drifts between rounds, for both sides.
        let rounds = vec![
            vec![case("a", 1.0, Some(4.0), 10.0), case("b", 3.0, None, 5.0)],
            vec![case("a", 2.0, Some(2.5), 30.0), case("b", 4.0, None, 5.0)],
            vec![case("a", 3.0, Some(3.0), 20.0), case("b", 2.0, None, 5.0)],
        ];
        let merged = merge_rounds(rounds.clone()).unwrap();
        let a = &merged[0];
        assert_eq!((a.seconds, a.torch_seconds, a.min_seconds, a.peak_rss_mib), (2.0, Some(3.0), 0.9, 30.0));
        assert_eq!(a.gflops, 2.0);
        // Ratios per round 0.25, 0.8, 1.0: their median, not 2.0 / 3.0 of the medians.
        assert_eq!(a.ratio(), Some(0.8));
        assert_eq!(a.ratio_range(), Some((0.25, 1.0)));
        assert_eq!(a.rounds.len(), 3);
        let b = &merged[1];
        assert_eq!((b.seconds, b.torch_seconds, b.ratio(), b.ratio_range()), (3.0, None, None, None));
        let text = table(&merged);
        assert!(text.lines().next().unwrap().ends_with("rounds' range"), "{text}");
        assert!(text.lines().nth(1).unwrap().ends_with(" 0.80x    0.25-1.00x"), "{text}");
        // One round passes through unchanged, with no range column.
        let one = merge_rounds(rounds[..1].to_vec()).unwrap();
        assert!(one[0].rounds.is_empty() && one[0].ratio() == Some(0.25) && one[0].ratio_range().is_none());
        assert!(!table(&one).contains("range"));
        // Rounds that measured different cases are refused, not paired wrongly.
        let mut other = rounds.clone();
        other[2][1].batch = 4;
        let err = merge_rounds(other).unwrap_err().to_string();
        assert!(err.contains("round 3"), "{err}");
    }

    #[test]
    fn torch_json_cases_map_to_our_rows() {
        let dir = std::env::temp_dir().join(format!("diffii-torch-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("torch.json");
        let json = r#"{"threads": 2, "unet64b1": {"median_s": 1.5}, "unet_b8_l32": {"median_s": 2.5},
            "clip_text_b2": {"median_s": 0.25}, "diffii_flow_sd15": {"steps": 50, "median_s": 9.5},
            "unet_build": {"params": 1}}"#;
        std::fs::write(&path, json).unwrap();
        let mut got = read_torch_json(&path).unwrap();
        got.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        let want = [("diffii flow", 1, 64, 9.5), ("text encoder", 2, 0, 0.25), ("unet", 1, 64, 1.5), ("unet", 8, 32, 2.5)];
        let want: Vec<(String, usize, usize, f64)> = want.iter().map(|&(c, b, l, s)| (c.to_string(), b, l, s)).collect();
        assert_eq!(got, want);
        // PyTorch's profiles (--profile) go to the same cases and print beside ours.
        let json = r#"{"unet_b1_l16": {"median_s": 0.6, "profile": {"total_s": 0.5,
            "classes": {"conv": 0.25, "attention": 0.125, "other": 0.125}, "top_ops": []}},
            "clip_text_b2": {"median_s": 0.25}}"#;
        std::fs::write(&path, json).unwrap();
        let profiles = read_torch_profiles(&path).unwrap();
        assert_eq!(profiles.len(), 1);
        let (case, b, l, tp) = &profiles[0];
        assert_eq!((case.as_str(), *b, *l, tp.total_seconds), ("unet", 1, 16, 0.5));
        let ours = Profile {
            name: "unet sd15 (synthetic)".into(),
            batch: 1,
            latent: 16,
            total_seconds: 0.2,
            classes: vec![("conv".into(), 0.1, 66), ("layer norm".into(), 0.05, 48), ("other".into(), 0.05, 0)],
            torch: Some(tp.clone()),
        };
        let table = profile_table(&[ours]);
        assert!(table.contains("(PyTorch: 0.5000 s)"), "{table}");
        let line = |class: &str| table.lines().find(|l| l.trim_start().starts_with(class)).unwrap().to_string();
        assert!(line("conv").ends_with("0.2500 s   50.0%"), "{table}");
        assert!(line("layer norm").ends_with("0.0000 s    0.0%"), "{table}");
        std::fs::write(&path, r#"{"unet64": {"median_s": 1.0, "profile": {"classes": {}}}}"#).unwrap();
        assert!(read_torch_profiles(&path).is_err(), "a profile without its total");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
