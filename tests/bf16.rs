//! bf16 products (`--precision bf16`): on a CPU with AVX-512 BF16, convolutions, linear layers
//! and the UNet stay within bf16 rounding of the f32 results and do not depend on the thread
//! count, and a bf16 model and an f32 model live side by side in one process; elsewhere,
//! asking for bf16 is a clear error (each test then says that it checked only that).
mod common;

use candle_core::{DType, Device, Tensor};
use diffii::kernels::{self, bf16, ConvInput};
use diffii::nn::Precision;
use diffii::rng::seeded_randn;
use diffii::sd::loader::{LoadOptions, StableDiffusion};

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    seeded_randn(seed, shape, &Device::Cpu).unwrap()
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let m = b.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    d / m
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn one_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(f)
}

/// True when the CPU runs bf16; otherwise checks that asking for it is a clear error, and says
/// so on stderr.
fn supported(test: &str) -> bool {
    if bf16::supported() {
        return true;
    }
    let e = Precision::Bf16.check().err().expect("must refuse without AVX-512 BF16").to_string();
    assert!(e.contains("AVX-512 BF16") && e.contains("f32"), "{e}");
    let e = StableDiffusion::load(&common::tiny_sd(), &LoadOptions { precision: Precision::Bf16, ..LoadOptions::default() })
        .err()
        .expect("loading at bf16 must fail without AVX-512 BF16")
        .to_string();
    assert!(e.contains("AVX-512 BF16"), "{e}");
    eprintln!("{test}: this CPU lacks AVX-512 BF16; checked only that bf16 is refused with a clear error");
    false
}

#[test]
fn bf16_convolutions_stay_close_to_f32_and_are_thread_independent() {
    if !supported("conv") {
        return;
    }
    // 3x3 same, stride-2 downsample on odd sizes, 1x1, nearest upsample + pad, odd channel
    // counts, with bias, per-sample bias, residual and output scale.
    let cases = [(3, 1, (1, 1, 1, 1), None), (3, 2, (0, 0, 1, 1), None), (1, 1, (0, 0, 0, 0), None), (3, 1, (1, 1, 1, 1), Some((18, 22)))];
    for (i, (k, stride, pad, up)) in cases.into_iter().enumerate() {
        let (cin, cout) = (7, 37);
        let x = randn(1 + i as u64, &[2, cin, 9, 11]);
        let w = (randn(10 + i as u64, &[cout, cin, k, k]) * 0.2).unwrap();
        let bias = randn(20, &[cout]);
        let extra = randn(21, &[2, cout]);
        let (ho, wo) = {
            let (h, w) = up.unwrap_or((9, 11));
            ((h + pad.0 + pad.2 - k) / stride + 1, (w + pad.1 + pad.3 - k) / stride + 1)
        };
        let res = randn(22, &[2, cout, ho, wo]);
        let packed = kernels::conv::pack_weight(&w).unwrap();
        let run = |p: Option<&bf16::PackedA>| {
            kernels::conv2d(&x, &w, Some(&bias), Some(&extra), stride, ConvInput { upsample: up, pad }, Some(&res), 2.0, p).unwrap()
        };
        let (f, b) = (run(None), run(Some(&packed)));
        let e = rel(&b, &f);
        eprintln!("conv case {i}: bf16 vs f32 relative error {e:.2e}");
        assert!(e > 0.0 && e < 2e-2, "conv case {i}: {e}");
        let one = one_thread(|| run(Some(&packed)));
        assert_eq!(bits(&one), bits(&b), "conv case {i}: result depends on the thread count");
    }
}

#[test]
fn bf16_linear_stays_close_to_f32_and_is_thread_independent() {
    if !supported("linear") {
        return;
    }
    let x = randn(30, &[3, 45, 67]);
    let w = (randn(31, &[53, 67]) * 0.1).unwrap();
    let (bias, res) = (randn(32, &[53]), randn(33, &[3, 45, 53]));
    let packed = kernels::linear::pack_weight(&w).unwrap();
    let run = |p: Option<&bf16::PairPlanes>| kernels::linear(&x, &w, Some(&bias), Some(&res), p).unwrap();
    let (f, b) = (run(None), run(Some(&packed)));
    let e = rel(&b, &f);
    eprintln!("linear: bf16 vs f32 relative error {e:.2e}");
    assert!(e > 0.0 && e < 2e-2, "linear: {e}");
    assert_eq!(bits(&one_thread(|| run(Some(&packed)))), bits(&b), "linear: result depends on the thread count");
    // A packed weight of another shape is refused, not misread.
    let other = kernels::linear::pack_weight(&randn(34, &[52, 67])).unwrap();
    assert!(kernels::linear(&x, &w, None, None, Some(&other)).is_err());
}

#[test]
fn an_f32_and_a_bf16_model_live_in_one_process() {
    if !supported("two models") {
        return;
    }
    let load = |precision| StableDiffusion::load(&common::tiny_sd(), &LoadOptions { precision, ..LoadOptions::default() }).unwrap();
    let r = common::ref_tensors();
    let ctx = Tensor::cat(&[&r["text_emb_uncond"], &r["text_emb_b"]], 0).unwrap();
    let x = &r["probe_unet_x"];
    // The f32 model alone, then both models interleaved: each gives its own result, the f32
    // one bit for bit what it gives alone.
    let alone = load(Precision::F32).unet.forward_t(x, 500, &ctx).unwrap();
    let (f32_model, bf16_model) = (load(Precision::F32), load(Precision::Bf16));
    let b1 = bf16_model.unet.forward_t(x, 500, &ctx).unwrap();
    let f = f32_model.unet.forward_t(x, 500, &ctx).unwrap();
    let b2 = bf16_model.unet.forward_t(x, 500, &ctx).unwrap();
    assert_eq!(bits(&f), bits(&alone), "the f32 model is affected by the bf16 model next to it");
    assert_eq!(bits(&b1), bits(&b2), "the bf16 model is affected by the f32 model next to it");
    let e = rel(&b1, &f);
    eprintln!("tiny UNet: bf16 vs f32 relative error {e:.2e}");
    assert!(e > 0.0 && e < 3e-2, "unet: {e}");
    assert_eq!(bf16_model.precision, Precision::Bf16);
    // The text encoder and VAE carry the precision too.
    let side = f32_model.vae.config.spatial_factor() * f32_model.unet.config.sample_size;
    let img = (randn(40, &[1, 3, side, side]) * 0.5).unwrap();
    let (zf, zb) = (f32_model.vae.encode_latent(&img).unwrap(), bf16_model.vae.encode_latent(&img).unwrap());
    let e = rel(&zb, &zf);
    assert!(e > 0.0 && e < 5e-2, "vae: {e}");
}
