//! `diffii bench`: UNet step timings on the given model and on a full-size SD-1.5-shaped UNet,
//! printed as a table next to PyTorch's figures for this CPU class, and written as JSON.
use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;
use diffii::measure::bench::{self, BenchResult};
use diffii::nn::{Mode, Precision};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// diffusers SD-1.x folder whose UNet to time (e.g. the tiny fixture model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Time the demo world stage by stage, through the commands' own code with the demo's
    /// settings: a pretraining step of each phase, a concept-learning step, DDIM inversion and
    /// Diff-II generation per image, a classifier training step (the shipped model and data;
    /// --model overrides the model)
    #[arg(long)]
    pub demo: bool,
    /// Batch sizes for the model's UNet at its native latent size (comma-separated; 32 = a
    /// classifier-free-guided generation batch of 16, the demo's)
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    pub model_batches: Vec<usize>,
    /// Also time a full-size SD-1.5-shaped UNet (synthetic weights, ~3.4 GB of memory).
    #[arg(long)]
    pub sd15: bool,
    /// Latent sizes for the SD-1.5 UNet (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    pub sd15_latents: Vec<usize>,
    /// Batch sizes for the SD-1.5 UNet (comma-separated; 2 = one classifier-free-guided step).
    #[arg(long, value_delimiter = ',', default_value = "2")]
    pub sd15_batches: Vec<usize>,
    /// Timed repetitions per case (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Untimed warm-up calls per case.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Also print wall time per op class (conv, linear, attention, norms, elementwise, layout); on
    /// a GPU each op class waits for the GPU at its start and end, so the profiled call is slower
    /// than the timed one but each class gets its own GPU time. With --compare-python on the CPU,
    /// PyTorch's SD-1.5 cases are profiled too (torch.profiler, ops' self times in the same
    /// classes) and printed beside ours.
    #[arg(long)]
    pub profile: bool,
    /// Also time the model's VAE decode (batch 1, latent = the UNet's sample size).
    #[arg(long)]
    pub vae: bool,
    /// Also time one textual-inversion step (forward + backward to the concept row), with and
    /// without the frozen-operand products: on the model at its native size, and with --sd15 on
    /// an SD-1.5-shaped text encoder + UNet at --ti-latent.
    #[arg(long)]
    pub ti: bool,
    /// Latent size of the SD-1.5 textual-inversion step (32 = 256 px).
    #[arg(long, default_value_t = 32)]
    pub ti_latent: usize,
    /// Also time a training step and an evaluation forward of the classifier (small ResNet,
    /// 10 classes) at --classifier-batch images of --classifier-size px.
    #[arg(long)]
    pub classifier: bool,
    #[arg(long, default_value_t = 64)]
    pub classifier_batch: usize,
    #[arg(long, default_value_t = 32)]
    pub classifier_size: usize,
    /// Basic blocks per stage of the benchmarked classifier.
    #[arg(long, default_value_t = 1)]
    pub classifier_depth: usize,
    /// Also time a training step and an evaluation forward of torchvision's ResNet-50
    /// (`--arch resnet50`, 10 classes, fresh weights) at --resnet50-batch images of
    /// --resnet50-size px.
    #[arg(long)]
    pub resnet50: bool,
    #[arg(long, default_value_t = 8)]
    pub resnet50_batch: usize,
    #[arg(long, default_value_t = 224)]
    pub resnet50_size: usize,
    /// Also time the text encoder (batch 2) and the VAE encoder (batch 1) of the model, and with
    /// --sd15 an SD-1.5-shaped text encoder.
    #[arg(long)]
    pub text_vae: bool,
    /// Also time the whole Diff-II flow of this reference run (made by scripts/reference/ref_diffii.py
    /// for --model): model load to decoded image.
    #[arg(long)]
    pub flow: Option<PathBuf>,
    /// Also time an SD-1.5-shaped VAE (encode 512 px, decode a 64x64 latent) with --sd15.
    #[arg(long)]
    pub sd15_vae: bool,
    /// Python interpreter of an environment with torch + diffusers (e.g. one made from
    /// scripts/reference/requirements-ref.txt): runs scripts/reference/bench_sd15_cpu.py on the same shapes in
    /// the same run (in bf16 for the cases we run in bf16), and bench_classifier.py (torch +
    /// torchvision) beside it for --classifier / --resnet50, and prints the ratio ours / theirs.
    #[arg(long)]
    pub compare_python: Option<PathBuf>,
    /// The PyTorch benchmark script for --compare-python (default: the one in this source tree).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/reference/bench_sd15_cpu.py"))]
    pub python_script: PathBuf,
    /// Weight and activation type of the SD-1.5-shaped UNet: f32 (the fused kernels), f16 or
    /// bf16 (candle's own ops).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Product precision of the fused kernels: f32, or bf16 (inputs rounded to bf16, f32
    /// accumulation; needs AVX-512 BF16).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: super::common::PrecisionArg,
    /// Also time one whole Diff-II generation at SD-1.5 shapes with --sd15 (synthetic weights,
    /// two random 512 px images): encoding, --sd15-flow-steps inversion steps of each image,
    /// slerp, as many guided two-stage sampling steps, decoding.
    #[arg(long)]
    pub sd15_flow: bool,
    /// DDIM steps of the --sd15-flow inversions and of its sampling.
    #[arg(long, default_value_t = 50)]
    pub sd15_flow_steps: usize,
    /// Where the SD-1.5-shaped cases run: cpu, cuda or cuda:N (a `--features cuda` build; the
    /// other cases always run on the CPU). With --compare-python, PyTorch runs there too.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Measure everything this many times, each round ours and then PyTorch's (with
    /// --compare-python), and report per case the medians of the rounds and the median of
    /// their ratios with its range: a shared VM's speed can drift by tens of percent within
    /// minutes, which one round's ratio cannot tell from a real difference. --profile profiles
    /// the first round only.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub rounds: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let dev = diffii::sd::loader::parse_device(&a.device)?;
    let prec: diffii::nn::Precision = a.precision.into();
    prec.check(&dev)?;
    // First, while nothing else runs: it times the FMA peak on every thread.
    let cpu = bench::CpuInfo::detect();
    let mut rounds = Vec::new();
    let mut profiles = Vec::new();
    for round in 0..a.rounds {
        if a.rounds > 1 {
            eprintln!("[bench] round {} of {}", round + 1, a.rounds);
        }
        let a = Args { profile: a.profile && round == 0, ..a.clone() };
        let (mut results, mut round_profiles) = measure(&a, &dev, prec)?;
        if let Some(python) = &a.compare_python {
            compare_with_python(&a, python, &mut results, &mut round_profiles)?;
        }
        profiles.extend(round_profiles);
        rounds.push(results);
    }
    let mut results = bench::merge_rounds(rounds)?;
    let device = diffii::sd::loader::device_name(&dev);
    if dev.is_cpu() {
        bench::fill_percent_of_peak(&mut results, cpu.fma_peak_gflops);
    }
    print!("{}", cpu.line());
    if !dev.is_cpu() {
        println!("device: {device} (the SD-1.5 and --model cases; %peak is left empty, peak MiB is this process's host memory)");
    }
    print!("{}", bench::table(&results));
    if !profiles.is_empty() {
        print!("{}", bench::profile_table(&profiles));
    }
    println!(
        "%peak: of {:.0} GFLOP/s, the f32 FMA throughput of these {} threads timed at the start of this run \
         (GFLOP counts a convolution's direct multiply-adds, so bf16 products and the f32 Winograd convolutions, \
         2.25x fewer multiply-adds, can exceed it); the PyTorch column is filled only by --compare-python, in this run",
        cpu.fma_peak_gflops, cpu.threads
    );
    if a.rounds > 1 {
        println!(
            "{} rounds, each ours then PyTorch's: seconds are the medians of the rounds' medians, the ratio the median of the rounds' ratios",
            a.rounds
        );
    }
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&bench::BenchReport { cpu, device, results: &results, profiles: &profiles })?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One round of every case `a` asks for, with the profiles it asks for.
fn measure(a: &Args, dev: &candle_core::Device, prec: Precision) -> anyhow::Result<(Vec<BenchResult>, Vec<bench::Profile>)> {
    let mut results: Vec<BenchResult> = Vec::new();
    let mut profiles: Vec<bench::Profile> = Vec::new();
    if let Some(model) = &a.model {
        let opts = diffii::sd::loader::LoadOptions { concepts: false, precision: prec, device: dev.clone(), ..Default::default() };
        let sd = diffii::sd::loader::StableDiffusion::load(model, &opts)?;
        let s = sd.unet.config.sample_size;
        let cases = a.model_batches.iter().map(|&b| (b, s)).chain([(2, s / 2)]);
        for (b, l) in cases {
            eprintln!("[bench] {} UNet batch {b} latent {l}", model.display());
            results.push(bench::unet_step("unet (model)", &sd.unet, b, l, a.warmup, a.reps.max(5))?);
            if a.profile {
                profiles.push(bench::unet_profile("unet (model)", &sd.unet, b, l, a.reps.max(5))?);
            }
        }
        if a.vae {
            eprintln!("[bench] {} VAE decode batch 1 latent {s}", model.display());
            results.push(bench::vae_decode_step("vae decode (model)", &sd.vae, 1, s, a.warmup, a.reps.max(5))?);
            if a.profile {
                profiles.push(bench::vae_decode_profile("vae decode (model)", &sd.vae, 1, s, a.reps.max(5))?);
            }
        }
        if a.text_vae {
            eprintln!("[bench] {} text encoder, VAE encode", model.display());
            results.push(bench::text_encoder_step("text encoder (model)", &sd.text_encoder, 2, a.warmup, a.reps.max(5))?);
            let side = s * sd.vae.config.spatial_factor();
            results.push(bench::vae_encode_step("vae encode (model)", &sd.vae, 1, side, a.warmup, a.reps.max(5))?);
        }
        if let Some(reference) = &a.flow {
            eprintln!("[bench] whole Diff-II flow of {}", reference.display());
            results.push(bench::flow("diffii flow (reference run)", model, reference, prec, a.reps.max(3))?);
        }
        if a.ti {
            for frozen_ops in [true, false] {
                let opts = diffii::sd::loader::LoadOptions { mode: Mode::Train, frozen_ops, ..opts.clone() };
                let sd = diffii::sd::loader::StableDiffusion::load(model, &opts)?;
                let name = if frozen_ops { "ti step (model)" } else { "ti step (model), no frozen" };
                eprintln!("[bench] {name}");
                results.push(bench::ti_step(name, &sd.text_encoder, &sd.unet, 1, s, a.warmup, a.reps.max(5))?);
            }
        }
    }
    if a.sd15 && a.text_vae {
        let clip = bench::synthetic_sd15_text_encoder(DType::F32, prec, dev, Mode::Infer, true)?;
        eprintln!("[bench] SD-1.5 text encoder");
        results.push(bench::text_encoder_step("text encoder sd15", &clip, 2, a.warmup, a.reps)?);
        if a.profile {
            profiles.push(bench::text_encoder_profile("text encoder sd15", &clip, 2, a.reps.max(5))?);
        }
    }
    if a.sd15 && a.sd15_vae {
        let vae = bench::synthetic_sd15_vae(DType::F32, prec, dev)?;
        eprintln!("[bench] SD-1.5 VAE encode 512 px, decode 64x64");
        results.push(bench::vae_encode_step("vae encode sd15", &vae, 1, 512, a.warmup, a.reps)?);
        results.push(bench::vae_decode_step("vae decode sd15", &vae, 1, 64, a.warmup, a.reps)?);
        if a.profile {
            profiles.push(bench::vae_decode_profile("vae decode sd15", &vae, 1, 64, 1)?);
        }
    }
    if a.sd15 && a.ti {
        for frozen_ops in [true, false] {
            eprintln!("[bench] building SD-1.5-shaped text encoder + UNet (training mode)");
            let clip = bench::synthetic_sd15_text_encoder(DType::F32, prec, dev, Mode::Train, frozen_ops)?;
            let unet = bench::synthetic_sd15_unet_mode(DType::F32, prec, dev, Mode::Train, frozen_ops)?;
            let name = if frozen_ops { "ti step sd15" } else { "ti step sd15, no frozen" };
            eprintln!("[bench] {name} latent {}", a.ti_latent);
            results.push(bench::ti_step(name, &clip, &unet, 1, a.ti_latent, 0, a.reps)?);
        }
    }
    if a.classifier {
        eprintln!("[bench] classifier step, batch {} at {} px", a.classifier_batch, a.classifier_size);
        results.extend(bench::classifier_steps(a.classifier_depth, 10, a.classifier_batch, a.classifier_size, a.warmup, a.reps.max(3))?);
        if a.profile {
            let config = diffii::classify::resnet::ResNetConfig::small(10, a.classifier_depth);
            let label = format!("classifier (depth {})", a.classifier_depth);
            profiles.push(bench::resnet_train_profile(&label, &config, a.classifier_batch, a.classifier_size, a.reps.max(3))?);
        }
    }
    if a.resnet50 {
        eprintln!("[bench] ResNet-50 step, batch {} at {} px", a.resnet50_batch, a.resnet50_size);
        results.extend(bench::resnet50_steps(10, a.resnet50_batch, a.resnet50_size, a.warmup, a.reps)?);
        if a.profile {
            let config = diffii::classify::resnet::ResNetConfig::resnet50(10);
            profiles.push(bench::resnet_train_profile("resnet50", &config, a.resnet50_batch, a.resnet50_size, 1)?);
        }
    }
    if a.demo {
        eprintln!("[bench] the demo world, stage by stage");
        let model = demo_model(a);
        let work = std::env::temp_dir().join(format!("diffii-bench-demo-{}", std::process::id()));
        let b = diffii::measure::demo_world::DemoBench {
            model: &model,
            data: std::path::Path::new(diffii::data::bundle::FASHION_MNIST_SUBSET),
            work: &work,
            warmup: a.warmup,
            reps: a.reps,
            steps: 25,
            guidance: 1.5,
            strength: 0.3,
            gen_batch: 16,
        };
        let r = diffii::measure::demo_world::run(&b);
        let _ = std::fs::remove_dir_all(&work);
        results.extend(r?);
    }
    if a.sd15 {
        eprintln!("[bench] building SD-1.5-shaped UNet with synthetic weights");
        let t0 = std::time::Instant::now();
        let dtype = match a.dtype.as_str() {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            other => anyhow::bail!("--dtype {other}: use f32, f16 or bf16"),
        };
        let unet = bench::synthetic_sd15_unet(dtype, prec, dev)?;
        eprintln!("[bench] built in {:.1} s", t0.elapsed().as_secs_f64());
        if a.sd15_flow {
            let clip = bench::synthetic_sd15_text_encoder(DType::F32, prec, dev, Mode::Infer, true)?;
            let vae = bench::synthetic_sd15_vae(DType::F32, prec, dev)?;
            let n = a.sd15_flow_steps;
            eprintln!("[bench] whole SD-1.5 Diff-II generation, {n} + {n} inversion steps, {n} guided steps, 512 px");
            results.push(bench::sd15_flow("diffii flow sd15 (synthetic)", &clip, &vae, &unet, n, n, a.warmup, a.reps)?);
        }
        for &l in &a.sd15_latents {
            for &b in &a.sd15_batches {
                eprintln!("[bench] SD-1.5 UNet batch {b} latent {l}");
                results.push(bench::unet_step("unet sd15 (synthetic)", &unet, b, l, a.warmup, a.reps)?);
                if a.profile {
                    profiles.push(bench::unet_profile("unet sd15 (synthetic)", &unet, b, l, 1)?);
                }
            }
        }
    }
    if results.is_empty() {
        anyhow::bail!("nothing to measure: pass --demo, --model DIR, --sd15, --classifier and/or --resnet50");
    }
    Ok((results, profiles))
}

/// Fills the PyTorch column: SD-1.5 shapes from `scripts/reference/bench_sd15_cpu.py`, the whole flow
/// from `scripts/reference/ref_diffii.py` (its own `flow_total_s`: encode, inversions, sampling, decode).
fn compare_with_python(a: &Args, python: &std::path::Path, results: &mut [BenchResult], profiles: &mut [bench::Profile]) -> anyhow::Result<()> {
    let run = |script: &std::path::Path, args: &[String]| -> anyhow::Result<String> {
        eprintln!("[bench] PyTorch: {} {}", python.display(), script.display());
        let out = std::process::Command::new(python)
            .arg(script)
            .args(args)
            .output()
            .with_context(|| format!("running {}", python.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "{} {} failed ({}): {}",
            python.display(),
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        );
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    };
    let threads = rayon::current_num_threads().to_string();
    // The SD-1.5 cases we run in bf16 (--precision bf16: every fused product; --dtype bf16: the
    // UNet's weights and activations) are timed in PyTorch in bf16 as well, a UNet in f16 in
    // f16, the rest in f32.
    let torch_dtype = |r: &BenchResult| {
        if Precision::from(a.precision) != Precision::F32 {
            "bf16"
        } else if (r.name.starts_with("unet") || r.name.starts_with("diffii flow")) && a.dtype != "f32" {
            a.dtype.as_str()
        } else {
            "f32"
        }
    };
    for dtype in ["f32", "bf16", "f16"] {
        let mut only = Vec::new();
        for r in results.iter().filter(|r| r.name.contains("sd15") && torch_dtype(r) == dtype) {
            let key = match (r.name.split(" sd15").next().unwrap_or(""), r.batch, r.latent) {
                ("unet", b, l) => format!("unet_b{b}_l{l}"),
                ("text encoder", 2, _) => "text".into(),
                ("vae encode", ..) => "vae_enc".into(),
                ("vae decode", ..) => "vae_dec".into(),
                ("diffii flow", 1, 64) => "flow".into(),
                _ => continue,
            };
            only.push(key);
        }
        if only.is_empty() {
            continue;
        }
        let json = std::env::temp_dir().join(format!("diffii-torch-bench-{}.json", std::process::id()));
        // The same warm-up as ours: on a GPU the first calls load kernels and choose algorithms.
        let args = ["--threads", &threads, "--warmup", &a.warmup.to_string(), "--reps", &a.reps.to_string(), "--no-flops", "--dtype", dtype, "--device", &a.device, "--only", &only.join(",")];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.extend(["--flow-steps".to_string(), a.sd15_flow_steps.to_string()]);
        if Precision::from(a.precision) != Precision::F32 {
            // Our --precision bf16 runs the flow's text encoder and VAE in bf16 too.
            args.push("--flow-all-dtype".to_string());
        }
        // PyTorch's own profile of each profiled case (its profiler times CPU ops).
        let profiled = a.profile && a.device == "cpu";
        if profiled {
            args.push("--profile".to_string());
        }
        args.extend(["--json".to_string(), json.display().to_string()]);
        run(&a.python_script, &args)?;
        let torch = bench::read_torch_json(&json)?;
        let torch_profiles = if profiled { bench::read_torch_profiles(&json)? } else { Vec::new() };
        let _ = std::fs::remove_file(&json);
        for p in profiles.iter_mut().filter(|p| p.name.contains("sd15")) {
            let case = torch_case(&p.name);
            if let Some((.., tp)) = torch_profiles.iter().find(|(c, b, l, _)| Some(c.as_str()) == case && *b == p.batch && *l == p.latent) {
                p.torch = Some(tp.clone());
            }
        }
        for r in results.iter_mut().filter(|r| r.name.contains("sd15") && torch_dtype(r) == dtype) {
            let case = torch_case(&r.name);
            if let Some(&(_, _, _, secs)) = torch.iter().find(|(c, b, l, _)| Some(c.as_str()) == case && *b == r.batch && *l == r.latent) {
                r.torch_seconds = Some(secs);
                r.torch_dtype = Some(dtype.to_string());
            }
        }
    }
    if a.demo {
        let script = a.python_script.with_file_name("bench_demo.py");
        let json = std::env::temp_dir().join(format!("diffii-torch-demo-{}.json", std::process::id()));
        let model = demo_model(a);
        let args: Vec<String> = vec![
            "--model".into(),
            model.display().to_string(),
            "--threads".into(),
            threads.clone(),
            "--reps".into(),
            a.reps.to_string(),
            "--warmup".into(),
            a.warmup.max(1).to_string(),
            "--json".into(),
            json.display().to_string(),
        ];
        run(&script, &args)?;
        let torch = diffii::measure::demo_world::read_torch_json(&json)?;
        let _ = std::fs::remove_file(&json);
        for r in results.iter_mut() {
            if let Some(secs) = diffii::measure::demo_world::torch_seconds(&torch, &r.name) {
                r.torch_seconds = Some(secs);
                r.torch_dtype = Some("f32".into());
            }
        }
        // The classifier step of the demo world is bench_classifier.py's small network.
        let args = ["--threads", &threads, "--warmup", &a.warmup.to_string(), "--reps", &a.reps.max(3).to_string(), "--classes", "10", "--depth", "1", "--batch", "64", "--size", "32"];
        torch_classifier(&run, a, args.iter().map(|s| s.to_string()).collect(), results, |key| match key {
            "small_train" => Some("demo: classifier train step".to_string()),
            "small_eval" => Some("demo: classifier eval".to_string()),
            _ => None,
        })?;
    }
    if a.classifier || a.resnet50 {
        let mut args: Vec<String> = vec!["--threads".into(), threads.clone(), "--warmup".into(), a.warmup.to_string(), "--classes".into(), "10".into()];
        if a.classifier {
            let (d, b, s) = (a.classifier_depth, a.classifier_batch, a.classifier_size);
            args.extend(["--reps".into(), a.reps.max(3).to_string(), "--depth".into(), d.to_string(), "--batch".into(), b.to_string(), "--size".into(), s.to_string()]);
        } else {
            args.extend(["--reps".into(), a.reps.to_string(), "--no-small".into()]);
        }
        if a.resnet50 {
            let (b, s, reps) = (a.resnet50_batch, a.resnet50_size, a.reps);
            args.extend(["--resnet50".into(), "--resnet50-batch".into(), b.to_string(), "--resnet50-size".into(), s.to_string(), "--resnet50-reps".into(), reps.to_string()]);
        }
        torch_classifier(&run, a, args, results, |key| match key {
            "small_train" => Some(format!("classifier (depth {}) train step", a.classifier_depth)),
            "small_eval" => Some(format!("classifier (depth {}) eval", a.classifier_depth)),
            "resnet50_train" => Some("resnet50 train step".to_string()),
            "resnet50_eval" => Some("resnet50 eval".to_string()),
            _ => None,
        })?;
    }
    if let (Some(model), Some(_)) = (&a.model, &a.flow) {
        let script = a.python_script.with_file_name("ref_diffii.py");
        let out_dir = std::env::temp_dir().join(format!("diffii-torch-flow-{}", std::process::id()));
        let mut times = Vec::new();
        for _ in 0..a.reps.max(1) {
            let args = ["--model".to_string(), model.display().to_string(), "--out-dir".into(), out_dir.display().to_string(), "--no-check".into(), "--threads".into(), threads.clone()];
            let stdout = run(&script, &args)?;
            let v: serde_json::Value = serde_json::from_str(stdout.trim()).with_context(|| format!("reading the output of {}", script.display()))?;
            let t = v.pointer("/timings_s/flow_total_s").and_then(|t| t.as_f64()).context("no timings_s.flow_total_s in its output")?;
            times.push(t);
        }
        let _ = std::fs::remove_dir_all(&out_dir);
        times.sort_by(|x, y| x.total_cmp(y));
        if let Some(r) = results.iter_mut().find(|r| r.name.starts_with("diffii flow")) {
            r.torch_seconds = Some(bench::median(&times));
        }
    }
    Ok(())
}

/// The case of `bench::read_torch_json` that our SD-1.5 result or profile `name` is.
fn torch_case(name: &str) -> Option<&'static str> {
    ["unet", "text encoder", "vae encode", "vae decode", "diffii flow"].into_iter().find(|c| name.starts_with(c))
}

/// Runs `scripts/reference/bench_classifier.py` with `args` and fills the PyTorch column of the
/// result each of its cases names (`name_of`: its JSON key to our case name).
fn torch_classifier(
    run: &dyn Fn(&std::path::Path, &[String]) -> anyhow::Result<String>,
    a: &Args,
    mut args: Vec<String>,
    results: &mut [BenchResult],
    name_of: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    let script = a.python_script.with_file_name("bench_classifier.py");
    let json = std::env::temp_dir().join(format!("diffii-torch-classifier-{}.json", std::process::id()));
    args.extend(["--json".to_string(), json.display().to_string()]);
    run(&script, &args)?;
    let torch = bench::read_torch_classifier_json(&json)?;
    let _ = std::fs::remove_file(&json);
    for (key, secs) in torch {
        if let Some(r) = name_of(&key).and_then(|name| results.iter_mut().find(|r| r.name == name)) {
            r.torch_seconds = Some(secs);
            r.torch_dtype = Some("f32".to_string());
        }
    }
    Ok(())
}

/// The model `--demo` times: `--model`, or the shipped mini SD.
fn demo_model(a: &Args) -> PathBuf {
    a.model.clone().unwrap_or_else(|| PathBuf::from(super::demo::DEMO_MODEL))
}
