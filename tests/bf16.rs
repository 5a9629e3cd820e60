//! bf16 products (`--precision bf16`): on a CPU with AVX-512 BF16, convolutions, linear
//! layers and the UNet stay within bf16 rounding of the f32 results and do not depend on the
//! thread count; elsewhere, asking for them is a clear error. One test function, because the
//! precision switch is process-wide.
mod common;

use candle_core::{DType, Device, Tensor};
use diffii::schedule::ddim::seeded_randn;
use diffii::sd::bf16;
use diffii::sd::kernels::{self, ConvInput};
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

/// Runs `f` with the kernels at f32 and at bf16; returns (f32 result, bf16 result).
fn both(f: &dyn Fn() -> Tensor) -> (Tensor, Tensor) {
    bf16::set_enabled(false).unwrap();
    let a = f();
    bf16::set_enabled(true).unwrap();
    let b = f();
    bf16::set_enabled(false).unwrap();
    (a, b)
}

#[test]
fn bf16_products_stay_close_to_f32_and_are_deterministic() {
    if !bf16::supported() {
        let e = bf16::set_enabled(true).err().expect("must refuse without AVX-512 BF16").to_string();
        assert!(e.contains("AVX-512 BF16") && e.contains("f32"), "{e}");
        return;
    }
    // Convolutions: 3x3 same, stride-2 downsample on odd sizes, 1x1, nearest upsample + pad,
    // odd channel counts, with bias, per-sample bias, residual and output scale.
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
        let run = || {
            kernels::conv2d(&x, &w, Some(&bias), Some(&extra), stride, ConvInput { upsample: up, pad }, Some(&res), 2.0).unwrap()
        };
        let (f, b) = both(&run);
        let e = rel(&b, &f);
        eprintln!("conv case {i}: bf16 vs f32 relative error {e:.2e}");
        assert!(e > 0.0 && e < 2e-2, "conv case {i}: {e}");
        // Same bits with one thread.
        bf16::set_enabled(true).unwrap();
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(run);
        bf16::set_enabled(false).unwrap();
        assert_eq!(bits(&one), bits(&b), "conv case {i}: result depends on the thread count");
    }
    // Linear layer with bias and residual, several items.
    let x = randn(30, &[3, 45, 67]);
    let w = (randn(31, &[53, 67]) * 0.1).unwrap();
    let (bias, res) = (randn(32, &[53]), randn(33, &[3, 45, 53]));
    let (f, b) = both(&|| kernels::linear(&x, &w, Some(&bias), Some(&res)).unwrap());
    let e = rel(&b, &f);
    eprintln!("linear: bf16 vs f32 relative error {e:.2e}");
    assert!(e > 0.0 && e < 2e-2, "linear: {e}");
    // The whole UNet of the fixture.
    let sd = StableDiffusion::load(&common::tiny_sd(), &LoadOptions::default()).unwrap();
    let r = common::ref_tensors();
    let ctx = Tensor::cat(&[&r["text_emb_uncond"], &r["text_emb_b"]], 0).unwrap();
    let (f, b) = both(&|| sd.unet.forward_t(&r["probe_unet_x"], 500, &ctx).unwrap());
    let e = rel(&b, &f);
    eprintln!("tiny UNet: bf16 vs f32 relative error {e:.2e}");
    assert!(e < 3e-2, "unet: {e}");
}
