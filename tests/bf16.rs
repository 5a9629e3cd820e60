//! bf16 products (`--precision bf16`), on each bf16 kernel this CPU has (AVX-512 BF16, AMX
//! tiles): convolutions and linear layers equal the exact products of the bf16-rounded inputs
//! up to f32 summation, stay within bf16 rounding of the f32 results and do not depend on the
//! thread count, and a bf16 model and an f32 model live side by side in one process. A kernel
//! this CPU lacks must be refused with a clear error; each test says on stderr which kernels it
//! ran and which it skipped for lack of the hardware.
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

/// The bf16 kernels this CPU runs. For each one it lacks, checks that asking for it is a
/// clear error, and says on stderr that the test skips it.
fn kernels_here(test: &str) -> Vec<bf16::Kernel> {
    let mut here = Vec::new();
    for kernel in [bf16::Kernel::Avx512, bf16::Kernel::Amx] {
        if kernel.available() {
            eprintln!("{test}: running the {} kernel", kernel.name());
            here.push(kernel);
            continue;
        }
        let precision = Precision::Bf16(kernel);
        let e = precision.check(&Device::Cpu).err().expect("a kernel the CPU lacks must be refused").to_string();
        assert!(e.contains("needs a CPU") && e.contains("f32"), "{e}");
        let e = StableDiffusion::load(&common::tiny_sd(), &LoadOptions { precision, ..LoadOptions::default() })
            .err()
            .expect("loading at a bf16 kernel the CPU lacks must fail")
            .to_string();
        assert!(e.contains("needs a CPU"), "{e}");
        eprintln!("{test}: SKIPPED the {} kernel: this CPU lacks it (checked only that it is refused with a clear error)", kernel.name());
    }
    here
}

/// `t` rounded to bf16 (nearest even) and back, in f64.
fn bf16_rounded(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F64).unwrap()
}

#[test]
fn bf16_convolutions_stay_close_to_f32_and_are_thread_independent() {
    for kernel in kernels_here("conv") {
        convolutions_on(kernel);
    }
}

fn convolutions_on(kernel: bf16::Kernel) {
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
        let packed = kernels::conv::pack_weight(&w, kernel).unwrap();
        let run = |p: Option<&bf16::PackedA>| {
            kernels::conv2d(&x, &w, Some(&bias), Some(&extra), stride, ConvInput { upsample: up, pad }, Some(&res), 2.0, p).unwrap()
        };
        let (f, b) = (run(None), run(Some(&packed)));
        let e = rel(&b, &f);
        eprintln!("conv case {i} ({}): bf16 vs f32 relative error {e:.2e}", kernel.name());
        assert!(e > 0.0 && e < 2e-2, "conv case {i}: {e}");
        let one = one_thread(|| run(Some(&packed)));
        assert_eq!(bits(&one), bits(&b), "conv case {i}: result depends on the thread count");
        // A frozen model's weight is stored tap-major and packed from that storage: same bits.
        if k > 1 {
            let tm = kernels::conv::tap_major(&w).unwrap();
            let tm_packed = kernels::conv::pack_weight(&tm, kernel).unwrap();
            let y = kernels::conv2d(&x, &tm, Some(&bias), Some(&extra), stride, ConvInput { upsample: up, pad }, Some(&res), 2.0, Some(&tm_packed)).unwrap();
            assert_eq!(bits(&y), bits(&b), "conv case {i}: packed from the tap-major weight");
        }
        // The exact products of the rounded inputs (bias, residual and scale in f64 as well):
        // only f32 summation separates the kernel from them.
        if up.is_none() {
            let (x64, w64) = (bf16_rounded(&x), bf16_rounded(&w));
            let x64 = x64.pad_with_zeros(2, pad.0, pad.2).unwrap().pad_with_zeros(3, pad.1, pad.3).unwrap();
            let conv = x64.conv2d(&w64, 0, stride, 1, 1).unwrap();
            let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let sum = conv
                .broadcast_add(&f64_of(&bias).reshape((1, cout, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&f64_of(&extra).reshape((2, cout, 1, 1)).unwrap())
                .unwrap();
            let exact = ((sum + f64_of(&res)).unwrap() / 2.0).unwrap();
            let e = rel(&b.to_dtype(DType::F64).unwrap(), &exact);
            assert!(e < 1e-5, "conv case {i} ({}): {e:.2e} from the exact product of the rounded inputs", kernel.name());
        }
    }
}

#[test]
fn bf16_linear_stays_close_to_f32_and_is_thread_independent() {
    for kernel in kernels_here("linear") {
        // Odd sizes: partial row and column blocks, an odd k and k pairs short of a k block;
        // a product of several k blocks; and one of more k blocks than the AMX kernel takes in
        // one pass (it splits them, which must not change the result).
        for (items, rows, k, out) in [(3, 45, 67, 53), (2, 77, 96, 40), (1, 64, 600, 70), (1, 300, 40, 70)] {
            let x = randn(30, &[items, rows, k]);
            let w = (randn(31, &[out, k]) * 0.1).unwrap();
            let (bias, res) = (randn(32, &[out]), randn(33, &[items, rows, out]));
            let packed = kernels::linear::pack_weight(&w, kernel).unwrap();
            let run = |p: Option<&kernels::linear::PackedLinear>| kernels::linear(&x, &w, Some(&bias), Some(&res), p).unwrap();
            let (f, b) = (run(None), run(Some(&packed)));
            let e = rel(&b, &f);
            eprintln!("linear {k}x{out} ({}): bf16 vs f32 relative error {e:.2e}", kernel.name());
            assert!(e > 0.0 && e < 2e-2, "linear: {e}");
            assert_eq!(bits(&one_thread(|| run(Some(&packed)))), bits(&b), "linear: result depends on the thread count");
            // The items run as one product; each alone gives its bits in the batch.
            for i in 0..items {
                let one = |t: &Tensor| t.narrow(0, i, 1).unwrap();
                let alone = kernels::linear(&one(&x), &w, Some(&bias), Some(&one(&res)), Some(&packed)).unwrap();
                assert_eq!(bits(&alone), bits(&one(&b)), "linear: item {i} depends on the batch");
            }
            // A frozen model's weight is stored input-major and packed from that storage: same bits.
            let im = kernels::linear::in_major(&w).unwrap();
            let im_packed = kernels::linear::pack_weight(&im, kernel).unwrap();
            let y = kernels::linear(&x, &im, Some(&bias), Some(&res), Some(&im_packed)).unwrap();
            assert_eq!(bits(&y), bits(&b), "linear: packed from the input-major weight");
            // Whole pair rows (the AMX layout) and column panels (the AVX-512 one): same bits.
            let ws: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let planes = bf16::PairPlanes::from_fn(k, out, |i, o| ws[o * k + i]);
            let planes = if packed.planes.panels { planes } else { planes.into_panels() };
            let other = kernels::linear::PackedLinear { planes, kernel };
            assert_eq!(bits(&run(Some(&other))), bits(&b), "linear: pair rows against column panels");
            let exact = bf16_rounded(&x)
                .broadcast_matmul(&bf16_rounded(&w).t().unwrap())
                .unwrap()
                .broadcast_add(&bias.to_dtype(DType::F64).unwrap())
                .unwrap();
            let exact = (exact + res.to_dtype(DType::F64).unwrap()).unwrap();
            let e = rel(&b.to_dtype(DType::F64).unwrap(), &exact);
            assert!(e < 1e-5, "linear ({}): {e:.2e} from the exact product of the rounded inputs", kernel.name());
        }
        // A packed weight of another shape is refused, not misread.
        let (x, w) = (randn(30, &[3, 45, 67]), randn(31, &[53, 67]));
        let other = kernels::linear::pack_weight(&randn(34, &[52, 67]), kernel).unwrap();
        assert!(kernels::linear(&x, &w, None, None, Some(&other)).is_err());
    }
}

#[test]
fn bf16_pointwise_projections_stay_close_to_f32_and_are_thread_independent() {
    for kernel in kernels_here("pointwise") {
        // Odd channel counts and a map whose pixels fill no whole block; one image (its product
        // split across the threads) and several (one per thread).
        for (b, c, cout, h, w) in [(1, 37, 53, 9, 11), (3, 67, 40, 5, 7), (1, 320, 96, 16, 16)] {
            let x = randn(40, &[b, c, h, w]);
            let wt = (randn(41, &[cout, c, 1, 1]) * 0.1).unwrap();
            let bias = randn(42, &[cout]);
            let rows = kernels::linear::pack_weight(&wt.reshape((cout, c)).unwrap(), kernel).unwrap();
            let conv = kernels::conv::pack_weight(&wt, kernel).unwrap();
            let to = |p: Option<&kernels::linear::PackedLinear>| kernels::pointwise_to_tokens(&x, &wt, Some(&bias), p).unwrap();
            let (f, t) = (to(None), to(Some(&rows)));
            let e = rel(&t, &f);
            eprintln!("pointwise to tokens {c}->{cout} ({}): bf16 vs f32 relative error {e:.2e}", kernel.name());
            assert!(e > 0.0 && e < 2e-2, "to tokens: {e}");
            assert_eq!(bits(&one_thread(|| to(Some(&rows)))), bits(&t), "to tokens: result depends on the thread count");
            // The exact product of the rounded inputs: tokens [b, hw, cout].
            let xt = bf16_rounded(&x).reshape((b, c, h * w)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
            let w64 = bf16_rounded(&wt.reshape((cout, c)).unwrap());
            let exact = xt.broadcast_matmul(&w64.t().unwrap()).unwrap().broadcast_add(&bias.to_dtype(DType::F64).unwrap()).unwrap();
            let e = rel(&t.to_dtype(DType::F64).unwrap(), &exact);
            assert!(e < 1e-5, "to tokens ({}): {e:.2e} from the exact product of the rounded inputs", kernel.name());

            // Back: tokens [b, hw, c] -> [b, cout, h, w] plus a residual; the packed weight is
            // the 1x1 convolution's, and the result that of that convolution on the map.
            let tokens = randn(43, &[b, h * w, c]);
            let res = randn(44, &[b, cout, h, w]);
            let from = |p: Option<&bf16::PackedA>| kernels::pointwise_from_tokens(&tokens, &wt, Some(&bias), Some(&res), h, w, p).unwrap();
            let (f, y) = (from(None), from(Some(&conv)));
            let e = rel(&y, &f);
            eprintln!("pointwise from tokens {c}->{cout} ({}): bf16 vs f32 relative error {e:.2e}", kernel.name());
            assert!(e > 0.0 && e < 2e-2, "from tokens: {e}");
            assert_eq!(bits(&one_thread(|| from(Some(&conv)))), bits(&y), "from tokens: result depends on the thread count");
            let map = tokens.transpose(1, 2).unwrap().reshape((b, c, h, w)).unwrap().contiguous().unwrap();
            let as_conv = kernels::conv2d(&map, &wt, Some(&bias), None, 1, ConvInput { upsample: None, pad: (0, 0, 0, 0) }, Some(&res), 1.0, Some(&conv)).unwrap();
            assert_eq!(bits(&as_conv), bits(&y), "from tokens: not the 1x1 convolution's bits");
            let tt = bf16_rounded(&tokens);
            let exact = w64.broadcast_matmul(&tt.transpose(1, 2).unwrap()).unwrap().reshape((b, cout, h, w)).unwrap();
            let exact = exact.broadcast_add(&bias.to_dtype(DType::F64).unwrap().reshape((1, cout, 1, 1)).unwrap()).unwrap();
            let exact = (exact + res.to_dtype(DType::F64).unwrap()).unwrap();
            let e = rel(&y.to_dtype(DType::F64).unwrap(), &exact);
            assert!(e < 1e-5, "from tokens ({}): {e:.2e} from the exact product of the rounded inputs", kernel.name());
            // Each image alone gives its bits in the batch.
            for i in 0..b {
                let one = |t: &Tensor| t.narrow(0, i, 1).unwrap();
                let alone = kernels::pointwise_from_tokens(&one(&tokens), &wt, Some(&bias), Some(&one(&res)), h, w, Some(&conv)).unwrap();
                assert_eq!(bits(&alone), bits(&one(&y)), "from tokens: image {i} depends on the batch");
                let alone = kernels::pointwise_to_tokens(&one(&x), &wt, Some(&bias), Some(&rows)).unwrap();
                assert_eq!(bits(&alone), bits(&one(&t)), "to tokens: image {i} depends on the batch");
            }
        }
        // A packed weight of another shape is refused, not misread.
        let (x, wt) = (randn(45, &[1, 8, 4, 4]), randn(46, &[6, 8, 1, 1]));
        let wrong = kernels::linear::pack_weight(&randn(47, &[6, 9]), kernel).unwrap();
        assert!(kernels::pointwise_to_tokens(&x, &wt, None, Some(&wrong)).is_err());
        let wrong = kernels::conv::pack_weight(&randn(48, &[5, 8, 1, 1]), kernel).unwrap();
        assert!(kernels::pointwise_from_tokens(&randn(49, &[1, 16, 8]), &wt, None, None, 4, 4, Some(&wrong)).is_err());
    }
}

#[test]
fn an_f32_and_a_bf16_model_live_in_one_process() {
    for kernel in kernels_here("two models") {
        two_models(Precision::Bf16(kernel));
    }
}

fn two_models(bf16_precision: Precision) {
    let load = |precision| StableDiffusion::load(&common::tiny_sd(), &LoadOptions { precision, ..LoadOptions::default() }).unwrap();
    let r = common::ref_tensors();
    let ctx = Tensor::cat(&[&r["text_emb_uncond"], &r["text_emb_b"]], 0).unwrap();
    let x = &r["probe_unet_x"];
    // The f32 model alone, then both models interleaved: each gives its own result, the f32
    // one bit for bit what it gives alone.
    let alone = load(Precision::F32).unet.forward_t(x, 500, &ctx).unwrap();
    let (f32_model, bf16_model) = (load(Precision::F32), load(bf16_precision));
    let b1 = bf16_model.unet.forward_t(x, 500, &ctx).unwrap();
    let f = f32_model.unet.forward_t(x, 500, &ctx).unwrap();
    let b2 = bf16_model.unet.forward_t(x, 500, &ctx).unwrap();
    assert_eq!(bits(&f), bits(&alone), "the f32 model is affected by the bf16 model next to it");
    assert_eq!(bits(&b1), bits(&b2), "the bf16 model is affected by the f32 model next to it");
    let e = rel(&b1, &f);
    eprintln!("tiny UNet ({}): bf16 vs f32 relative error {e:.2e}", bf16_precision.name());
    assert!(e > 0.0 && e < 3e-2, "unet: {e}");
    assert_eq!(bf16_model.precision, bf16_precision);
    // The text encoder and VAE carry the precision too.
    let side = f32_model.vae.config.spatial_factor() * f32_model.unet.config.sample_size;
    let img = (randn(40, &[1, 3, side, side]) * 0.5).unwrap();
    let (zf, zb) = (f32_model.vae.encode_latent(&img).unwrap(), bf16_model.vae.encode_latent(&img).unwrap());
    let e = rel(&zb, &zf);
    assert!(e > 0.0 && e < 5e-2, "vae: {e}");
}

#[test]
fn bf16_attention_stays_close_to_f32_and_is_thread_independent() {
    for kernel in kernels_here("attention") {
        // Odd head size and key count (partial k blocks and column blocks), with and without a
        // mask; cross-attention shaped (77 keys) and self-attention shaped.
        for (n, m, heads, d, masked) in [(45, 77, 3, 13, true), (70, 70, 2, 40, false)] {
            let q = randn(50, &[2, n, heads * d]);
            let k = randn(51, &[2, m, heads * d]);
            let v = randn(52, &[2, m, heads * d]);
            let mask = masked.then(|| (randn(53, &[n, m]) * 2.0).unwrap());
            let run = |kr| kernels::attention(&q, &k, &v, heads, mask.as_ref(), kr).unwrap();
            let (f, b) = (run(None), run(Some(kernel)));
            let e = rel(&b, &f);
            eprintln!("attention {n}x{m}, {heads} heads of {d} ({}): bf16 vs f32 relative error {e:.2e}", kernel.name());
            assert!(e > 0.0 && e < 3e-2, "attention: {e}");
            assert_eq!(bits(&one_thread(|| run(Some(kernel)))), bits(&b), "attention: result depends on the thread count");
        }
    }
}
