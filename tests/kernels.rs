//! The fused f32 CPU kernels of `diffii::kernels`, and the `diffii::nn` layers that call them,
//! against the same maths composed of plain candle ops, on odd shapes.
//!
//! Why: the kernels fold layouts into gemm strides, split work into (batch, group, head, block)
//! tasks, process 16-lane vector bodies with 1-lane tails, pad / resize / stride-phase their
//! inputs and fuse bias, per-sample bias, residual and output scale into one pass. Each of those
//! has an edge (a tail of 1, a single pixel, one head, a group of one element, a stride that
//! drops a row, a query block boundary) that round shapes never reach. Every case here uses
//! channel / token / spatial sizes like 1, 3, 5, 7, 13, 33, 77 and batches of 1 and 3.
//!
//! Each kernel result is compared with a reference composed of candle ops written out here
//! (`matmul`, `conv2d`, `pad_with_zeros`, `upsample_nearest2d`, `broadcast_add`, group norm
//! from mean / variance, `gelu_erf`, `silu`, `candle_nn::ops::softmax_last_dim`), evaluated
//! twice: in f32 (what the layers' own fallback paths compute) and in f64 (close to exact, so
//! the check measures the kernel's own rounding). Layers are also compared with their own
//! composed paths, reached with a weight that tracks gradients (f32) or with f64 inputs.
//!
//! Tolerances: for products, norms, attention, softmax and GEGLU the error measure is
//! `max |got - want| / max |want|` over the whole result (GEGLU: over max(max |want|, 1)), at
//! most [`TOL`] = 1e-5; measured errors are below 1.3e-6. The one exception is GroupNorm of
//! inputs with mean 1000 and spread 2, at 1e-4 (the f32 mean's own rounding; see that test).
//! Elementwise maps are checked element by element against f64: exp within 2 ulp, erf within
//! 1e-6 absolute (both as documented), SiLU and GEGLU within 1e-6 relative. Thread-count and
//! batch-size independence, which the kernels document, are checked bit for bit. The optimiser
//! updates (AdamW, the weights' moving average) are compared bit for bit with the candle ops
//! they replace.
//!
//! A known defect is kept at the end as an `#[ignore]`d test that fails today (run it with
//! `cargo test --test kernels -- --ignored`): GELU that does not vanish for very negative
//! gates.
//!
//! Not reachable from the public API and so covered only through the entry points above: the
//! portable `A16` instantiation of the SIMD helpers (this file runs whichever of AVX-512 / A16
//! the CPU selects; the 1-lane tail is compared with the vector body bit for bit), and
//! `Linear::forward_residual` (pub(crate); its fused residual is tested through
//! `kernels::linear`). The bf16 products are `tests/bf16.rs`'s subject (`packed: None` here).
use candle_core::{DType, Device, Tensor, Var, D};
use diffii::kernels::{self, ConvInput};
use diffii::nn::{self, Activation, Conv2d, GroupNorm, Linear, Mode, Precision};

/// Relative max error allowed between a kernel and a composed reference (see the file doc).
const TOL: f64 = 1e-5;

// ---------------------------------------------------------------------------------------------
// Deterministic inputs.
// ---------------------------------------------------------------------------------------------

/// SplitMix64: a small seeded generator (candle's CPU `randn` takes no seed).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ 0x2545_F491_4F6C_DD1D)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        (-2.0 * self.unit().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.unit()).cos()
    }
}

/// `scale` times standard normal values, f32, seeded.
fn randn(seed: u64, shape: &[usize], scale: f64) -> Tensor {
    let mut r = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (r.normal() * scale) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn from_vec(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn cast(t: &Tensor, dt: DType) -> Tensor {
    t.to_dtype(dt).unwrap()
}

fn cast_opt(t: Option<&Tensor>, dt: DType) -> Option<Tensor> {
    t.map(|t| cast(t, dt))
}

/// The same tensor as a gradient-tracking variable: layers then take their composed path.
fn tracked(t: &Tensor) -> Tensor {
    Var::from_tensor(t).unwrap().as_tensor().clone()
}

// ---------------------------------------------------------------------------------------------
// Comparisons.
// ---------------------------------------------------------------------------------------------

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    f32s(t).iter().map(|v| v.to_bits()).collect()
}

/// Asserts `max |got - want| / max |want| <= tol` (both finite, same shape); returns the error.
#[track_caller]
fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> f64 {
    assert_close_floor(what, got, want, tol, 0.0)
}

/// [`assert_close`] with the scale `max(max |want|, floor)`: for kernels whose error is
/// absolute (GEGLU's erf), a result that happens to be tiny is compared at the inputs' scale.
#[track_caller]
fn assert_close_floor(what: &str, got: &Tensor, want: &Tensor, tol: f64, floor: f64) -> f64 {
    assert_eq!(got.dims(), want.dims(), "{what}: result shape {:?}, reference shape {:?}", got.dims(), want.dims());
    let (g, w) = (values(got), values(want));
    if let Some(i) = g.iter().position(|v| !v.is_finite()) {
        panic!("{what}: shape {:?}: result is {} at flat index {i} (reference {})", got.dims(), g[i], w[i]);
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        panic!("{what}: shape {:?}: reference is {} at flat index {i}", got.dims(), w[i]);
    }
    let scale = w.iter().fold(floor, |m, v| m.max(v.abs()));
    let (mut at, mut diff) = (0, 0f64);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        if (a - b).abs() > diff {
            (at, diff) = (i, (a - b).abs());
        }
    }
    let rel = if diff == 0.0 { 0.0 } else { diff / scale.max(f64::MIN_POSITIVE) };
    assert!(
        rel <= tol,
        "{what}: shape {:?}: max |got - want| = {diff:.3e} at flat index {at} (got {}, want {}), scale (max |want|) = {scale:.3e}: \
         relative error {rel:.2e} > tolerance {tol:.0e}",
        got.dims(),
        g.get(at).copied().unwrap_or(0.0),
        w.get(at).copied().unwrap_or(0.0),
    );
    rel
}

/// Compares `got` with `reference` evaluated in f32 and in f64 (tolerance [`TOL`] for both);
/// returns the larger error.
#[track_caller]
fn check(what: &str, got: &Tensor, reference: impl Fn(DType) -> Tensor) -> f64 {
    check_floor(what, got, reference, 0.0)
}

/// [`check`] with a floor on the error scale (see [`assert_close_floor`]).
#[track_caller]
fn check_floor(what: &str, got: &Tensor, reference: impl Fn(DType) -> Tensor, floor: f64) -> f64 {
    assert_eq!(got.dtype(), DType::F32, "{what}: kernels return f32");
    let e32 = assert_close_floor(&format!("{what} [vs composed f32]"), got, &reference(DType::F32), TOL, floor);
    let e64 = assert_close_floor(&format!("{what} [vs composed f64]"), got, &reference(DType::F64), TOL, floor);
    e32.max(e64)
}

#[track_caller]
fn assert_same_bits(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let (x, y) = (bits(a), bits(b));
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{what}: shape {:?}: results differ at flat index {i}: {} vs {} ({} elements differ)",
            a.dims(),
            f32::from_bits(x[i]),
            f32::from_bits(y[i]),
            x.iter().zip(&y).filter(|(p, q)| p != q).count()
        );
    }
}

fn with_threads<T: Send>(n: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap().install(f)
}

// ---------------------------------------------------------------------------------------------
// Composed references: plain candle ops, in whatever dtype the inputs have.
// ---------------------------------------------------------------------------------------------

/// x [..., in] W^T + b, then + residual.
fn ref_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Tensor {
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().unwrap();
    let rows = x.elem_count() / in_dim;
    let mut y = x.reshape((rows, in_dim)).unwrap().matmul(&w.t().unwrap()).unwrap();
    if let Some(b) = bias {
        y = y.broadcast_add(b).unwrap();
    }
    let mut out_shape = dims;
    *out_shape.last_mut().unwrap() = w.dim(0).unwrap();
    let mut y = y.reshape(out_shape).unwrap();
    if let Some(r) = residual {
        y = (y + r).unwrap();
    }
    y
}

/// x [b, c, h, w] -> tokens [b, h*w, c] (permute + reshape) times W^T [c, cout], + b.
fn ref_to_tokens(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let (b, c, h, wd) = x.dims4().unwrap();
    let cout = w.dim(0).unwrap();
    let tokens = x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap().reshape((b, h * wd, c)).unwrap();
    let y = tokens.broadcast_matmul(&w.reshape((cout, c)).unwrap().t().unwrap()).unwrap();
    match bias {
        Some(bv) => y.broadcast_add(bv).unwrap(),
        None => y,
    }
}

/// tokens [b, h*w, c] times W^T, + b, permuted back to [b, cout, h, w], + residual.
fn ref_from_tokens(t: &Tensor, w: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>, h: usize, wd: usize) -> Tensor {
    let (b, _, c) = t.dims3().unwrap();
    let cout = w.dim(0).unwrap();
    let mut y = t.broadcast_matmul(&w.reshape((cout, c)).unwrap().t().unwrap()).unwrap();
    if let Some(bv) = bias {
        y = y.broadcast_add(bv).unwrap();
    }
    let mut y = y.reshape((b, h, wd, cout)).unwrap().permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
    if let Some(r) = residual {
        y = (y + r).unwrap();
    }
    y
}

/// The conv kernel's documented maths: nearest resize, zero pad (top, left, bottom, right),
/// convolution, then `(conv + bias + extra_bias[b] + residual) / out_scale`.
#[allow(clippy::too_many_arguments)]
fn ref_conv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    extra: Option<&Tensor>,
    stride: usize,
    input: ConvInput,
    residual: Option<&Tensor>,
    out_scale: f64,
) -> Tensor {
    let mut x = x.clone();
    if let Some((h, wd)) = input.upsample {
        x = x.upsample_nearest2d(h, wd).unwrap();
    }
    let (pt, pl, pb, pr) = input.pad;
    let x = x.pad_with_zeros(2, pt, pb).unwrap().pad_with_zeros(3, pl, pr).unwrap();
    let mut y = x.conv2d(w, 0, stride, 1, 1).unwrap();
    let cout = w.dim(0).unwrap();
    if let Some(bv) = bias {
        y = y.broadcast_add(&bv.reshape((1, cout, 1, 1)).unwrap()).unwrap();
    }
    if let Some(e) = extra {
        y = y.broadcast_add(&e.unsqueeze(2).unwrap().unsqueeze(3).unwrap()).unwrap();
    }
    if let Some(r) = residual {
        y = (y + r).unwrap();
    }
    if out_scale != 1.0 {
        y = (y / out_scale).unwrap();
    }
    y
}

/// GroupNorm written out: per (sample, group) mean and biased variance, normalise, affine,
/// then SiLU if asked.
fn ref_group_norm(x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64, silu: bool) -> Tensor {
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let n = x.elem_count() / (b * groups);
    let xg = x.reshape((b, groups, n)).unwrap();
    let mean = xg.mean_keepdim(2).unwrap();
    let xc = xg.broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(2).unwrap();
    let xn = xc.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap().reshape(dims.as_slice()).unwrap();
    let mut shape = vec![1; dims.len()];
    shape[1] = c;
    let y = xn
        .broadcast_mul(&gamma.reshape(shape.as_slice()).unwrap())
        .unwrap()
        .broadcast_add(&beta.reshape(shape.as_slice()).unwrap())
        .unwrap();
    if silu {
        y.silu().unwrap()
    } else {
        y
    }
}

/// value * gelu_erf(gate), value / gate the first / second half of the last dim.
fn ref_geglu(h: &Tensor) -> Tensor {
    let half = h.dim(D::Minus1).unwrap() / 2;
    let value = h.narrow(D::Minus1, 0, half).unwrap();
    let gate = h.narrow(D::Minus1, half, half).unwrap();
    (value * gate.gelu_erf().unwrap()).unwrap()
}

/// Head by head: softmax(Q_h K_h^T / sqrt(d) + mask) V_h, heads concatenated on the last dim.
fn ref_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Tensor {
    let inner = q.dim(2).unwrap();
    let d = inner / heads;
    let outs: Vec<Tensor> = (0..heads)
        .map(|hi| {
            let head = |t: &Tensor| t.narrow(2, hi * d, d).unwrap().contiguous().unwrap();
            let (qh, kh, vh) = (head(q), head(k), head(v));
            let mut s = (qh.matmul(&kh.t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt())).unwrap();
            if let Some(m) = mask {
                s = s.broadcast_add(m).unwrap();
            }
            candle_nn::ops::softmax_last_dim(&s).unwrap().matmul(&vh).unwrap()
        })
        .collect();
    Tensor::cat(&outs, 2).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Linear layers and pointwise projections.
// ---------------------------------------------------------------------------------------------

/// (input shape, out_dim): rank 2 with one row and with many (each row its own item), rank 3
/// with one item, several items, and one row per item, rank 4.
const LINEAR_CASES: [(&[usize], usize); 7] =
    [(&[1, 5], 7), (&[7, 13], 5), (&[1, 77, 33], 13), (&[3, 7, 5], 3), (&[3, 1, 33], 7), (&[3, 5, 7, 13], 5), (&[1, 1, 1], 1)];

/// (x, weight [out, in], bias, residual) for a linear case, seeded.
fn linear_data(seed: u64, shape: &[usize], out_dim: usize) -> (Tensor, Tensor, Tensor, Tensor) {
    let in_dim = *shape.last().unwrap();
    let mut out_shape = shape.to_vec();
    *out_shape.last_mut().unwrap() = out_dim;
    (
        randn(seed + 1, shape, 1.0),
        randn(seed + 2, &[out_dim, in_dim], 1.0 / (in_dim as f64).sqrt()),
        randn(seed + 3, &[out_dim], 0.5),
        randn(seed + 4, &out_shape, 1.0),
    )
}

#[test]
fn linear_kernel_matches_matmul_plus_bias_plus_residual() {
    let mut worst = 0f64;
    for (i, &(shape, out_dim)) in LINEAR_CASES.iter().enumerate() {
        let (x, w, bias, res) = linear_data(100 * i as u64, shape, out_dim);
        for (use_bias, use_res) in [(false, false), (true, false), (false, true), (true, true)] {
            let (b, r) = (use_bias.then_some(&bias), use_res.then_some(&res));
            let got = kernels::linear(&x, &w, b, r, None).unwrap();
            let what = format!("linear x {shape:?} -> {out_dim}, bias {use_bias}, residual {use_res}");
            worst = worst
                .max(check(&what, &got, |dt| ref_linear(&cast(&x, dt), &cast(&w, dt), cast_opt(b, dt).as_ref(), cast_opt(r, dt).as_ref())));
        }
    }
    eprintln!("linear kernel: max relative error {worst:.2e} (tolerance {TOL:.0e})");
}

#[test]
fn linear_layer_matches_its_composed_paths() {
    let mut worst = 0f64;
    for (i, &(shape, out_dim)) in LINEAR_CASES.iter().enumerate() {
        let s = 200 + 100 * i as u64;
        let in_dim = *shape.last().unwrap();
        let x = randn(s + 1, shape, 1.0);
        let w = randn(s + 2, &[out_dim, in_dim], 1.0 / (in_dim as f64).sqrt());
        let bias = randn(s + 3, &[out_dim], 0.5);
        for use_bias in [false, true] {
            let b = use_bias.then(|| bias.clone());
            let what = format!("nn::Linear x {shape:?} -> {out_dim}, bias {use_bias}");
            let layer = Linear::new(w.clone(), b.clone(), Precision::F32);
            let got = layer.forward(&x).unwrap();
            assert!(!got.track_op(), "{what}: expected the fused path");
            worst = worst.max(check(&what, &got, |dt| ref_linear(&cast(&x, dt), &cast(&w, dt), cast_opt(b.as_ref(), dt).as_ref(), None)));
            // The layer's own composed path: in f32 (a weight that tracks gradients) and f64.
            let composed = Linear::new(tracked(&w), b.clone(), Precision::F32).forward(&x).unwrap();
            assert!(composed.track_op(), "{what}: expected the composed path");
            worst = worst.max(assert_close(&format!("{what} [vs the layer's composed f32 path]"), &got, &composed, TOL));
            let layer64 = Linear::new(cast(&w, DType::F64), cast_opt(b.as_ref(), DType::F64), Precision::F32);
            let composed64 = layer64.forward(&cast(&x, DType::F64)).unwrap();
            worst = worst.max(assert_close(&format!("{what} [vs the layer's composed f64 path]"), &got, &composed64, TOL));
        }
    }
    eprintln!("nn::Linear: max relative error {worst:.2e} (tolerance {TOL:.0e})");
}

/// The f32 weight packed into panels once ([`kernels::linear::pack_panels`]) gives every
/// output the bits of `gemm`'s product in [`kernels::linear`]: depths of one block, of blocks
/// of 512 (at most 64 x 64 outputs per item) and of the blocks `gemm` sizes from the L1 cache
/// (600, 768 and 3 072 deep, as the text encoder's layers), output counts off the panels'
/// width, several items run as one product, both weight layouts, 1 and 2 threads, and through
/// a layer ([`Linear::with_panels`]) whose weight changes; and it refuses the shapes it does
/// not reproduce.
#[test]
fn linear_panels_give_gemms_bits() {
    if !kernels::linear::panels_pay(&[1, 77, 64], 64, 64) {
        eprintln!("linear panels: SKIPPED, this CPU has neither AVX-512 nor AVX2 with FMA");
        return;
    }
    let cases: [(&[usize], usize); 9] = [
        (&[2, 77, 96], 80),
        (&[1, 77, 600], 40),
        (&[2, 77, 768], 200),
        (&[2, 20, 3072], 100),
        (&[3, 40, 1100], 50),
        (&[3, 7, 33], 70),
        (&[1, 256, 64], 13),
        (&[2, 4, 4, 17], 64),
        (&[1, 9, 5], 300),
    ];
    for (i, &(shape, out_dim)) in cases.iter().enumerate() {
        let (x, w, bias, res) = linear_data(7000 + 100 * i as u64, shape, out_dim);
        let in_dim = *shape.last().unwrap();
        assert!(kernels::linear::panels_pay(shape, in_dim, out_dim), "{shape:?} -> {out_dim} should take the panels");
        for w in [w.clone(), kernels::linear::in_major(&w).unwrap()] {
            let panels = kernels::linear::pack_panels(&w).unwrap();
            for (use_bias, use_res) in [(false, false), (true, true), (true, false)] {
                let (b, r) = (use_bias.then_some(&bias), use_res.then_some(&res));
                let want = kernels::linear(&x, &w, b, r, None).unwrap();
                for threads in [1, 2] {
                    let got = with_threads(threads, || kernels::linear::linear_panels(&x, &panels, b, r).unwrap());
                    let what = format!("panels x {shape:?} -> {out_dim}, bias {use_bias}, residual {use_res}, {threads} threads");
                    assert_same_bits(&what, &got, &want);
                }
            }
        }
    }
    // A layer reading panels: the bits of one that does not, also after its weight changes (a
    // merged LoRA update), when the panels are packed again.
    let (x, w, bias, _) = linear_data(7900, &[2, 77, 96], 80);
    let mut plain = Linear::new(w.clone(), Some(bias.clone()), Precision::F32).in_major().unwrap();
    let mut paneled = plain.clone().with_panels();
    assert_same_bits("nn::Linear with panels", &paneled.forward(&x).unwrap(), &plain.forward(&x).unwrap());
    let delta = randn(7901, &[80, 96], 0.05);
    plain.add_to_weight(&delta).unwrap();
    paneled.add_to_weight(&delta).unwrap();
    assert_same_bits("nn::Linear with panels, merged update", &paneled.forward(&x).unwrap(), &plain.forward(&x).unwrap());
    // Shapes whose bits `gemm` sums otherwise, or where the panels do not pay.
    let w = randn(1, &[32, 40], 0.1);
    let panels = kernels::linear::pack_panels(&w).unwrap();
    for shape in [&[5, 40][..], &[1, 1, 40], &[3, 1, 40], &[1, 300, 40], &[2, 200, 40], &[1, 4, 40]] {
        assert!(!kernels::linear::panels_pay(shape, 40, 32), "{shape:?} should not take the panels");
        assert!(kernels::linear::linear_panels(&randn(2, shape, 1.0), &panels, None, None).is_err(), "{shape:?} accepted");
    }
    assert!(kernels::linear::linear_panels(&randn(3, &[1, 77, 41], 1.0), &panels, None, None).is_err(), "wrong depth accepted");
}

/// A weight stored input-major is read in place: the same bits as the usual layout on the fast
/// path (items of several rows, one-row items, one item split across threads) and on the
/// composed training path (forward and the input's gradient through a frozen weight). The
/// shapes add the text encoder's 77 rows, a depth above gemm's 512-deep blocks and output
/// sizes off the 16-lane grid.
#[test]
fn linear_in_major_weight_gives_the_same_bits() {
    let cases: [(&[usize], usize); 6] = [(&[2, 77, 96], 80), (&[1, 77, 600], 40), (&[3, 5, 33], 13), (&[4, 37], 48), (&[2, 16, 64], 256), (&[1, 1, 1], 1)];
    for (i, &(shape, out_dim)) in LINEAR_CASES.iter().chain(&cases).enumerate() {
        let (x, w, bias, res) = linear_data(5000 + 100 * i as u64, shape, out_dim);
        let wt = kernels::linear::in_major(&w).unwrap();
        assert_eq!(wt.dims(), w.dims());
        assert_same_bits("in_major keeps the values", &wt.contiguous().unwrap(), &w);
        let what = format!("linear x {shape:?} -> {out_dim}, input-major weight");
        for threads in [1, 2] {
            let want = with_threads(threads, || kernels::linear(&x, &w, Some(&bias), Some(&res), None).unwrap());
            let got = with_threads(threads, || kernels::linear(&x, &wt, Some(&bias), Some(&res), None).unwrap());
            assert_same_bits(&format!("{what}, {threads} threads"), &got, &want);
        }
        let layer = Linear::new(w.clone(), Some(bias.clone()), Precision::F32);
        let layer_t = Linear::new(w.clone(), Some(bias.clone()), Precision::F32).in_major().unwrap();
        assert_same_bits(&format!("{what}, nn::Linear"), &layer_t.forward(&x).unwrap(), &layer.forward(&x).unwrap());
        let run = |l: &Linear| {
            let xv = Var::from_tensor(&x).unwrap();
            let y = l.forward(xv.as_tensor()).unwrap();
            assert!(y.track_op(), "{what}: expected the composed path");
            let g = (y.clone() * &res).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(xv.as_tensor()).unwrap().clone())
        };
        let ((y, gx), (y_t, gx_t)) = (run(&layer), run(&layer_t));
        assert_same_bits(&format!("{what}, composed forward"), &y_t, &y);
        assert_same_bits(&format!("{what}, gradient of the input"), &gx_t, &gx);
    }
}

/// (batch, c, h, w, cout)
const POINTWISE_CASES: [(usize, usize, usize, usize, usize); 5] =
    [(1, 3, 1, 1, 5), (3, 5, 3, 5, 7), (1, 13, 7, 9, 33), (3, 33, 11, 6, 13), (3, 7, 1, 17, 1)];

#[test]
fn pointwise_token_projections_match_permute_and_matmul() {
    let mut worst = 0f64;
    for (i, &(b, c, h, wd, cout)) in POINTWISE_CASES.iter().enumerate() {
        let s = 1000 + 100 * i as u64;
        let x = randn(s + 1, &[b, c, h, wd], 1.0);
        let t = randn(s + 2, &[b, h * wd, c], 1.0);
        let w = randn(s + 3, &[cout, c], 1.0 / (c as f64).sqrt());
        let bias = randn(s + 4, &[cout], 0.5);
        let res = randn(s + 5, &[b, cout, h, wd], 1.0);
        // The weight as a linear layer's [cout, c] and as a 1x1 convolution's [cout, c, 1, 1].
        for w in [w.clone(), w.reshape((cout, c, 1, 1)).unwrap()] {
            for use_bias in [false, true] {
                let bo = use_bias.then_some(&bias);
                let what = format!("pointwise_to_tokens x [{b}, {c}, {h}, {wd}], weight {:?}, bias {use_bias}", w.dims());
                let got = kernels::pointwise_to_tokens(&x, &w, bo, None).unwrap();
                worst = worst.max(check(&what, &got, |dt| ref_to_tokens(&cast(&x, dt), &cast(&w, dt), cast_opt(bo, dt).as_ref())));
                for use_res in [false, true] {
                    let ro = use_res.then_some(&res);
                    let what = format!(
                        "pointwise_from_tokens t [{b}, {}, {c}], weight {:?}, bias {use_bias}, residual {use_res}",
                        h * wd,
                        w.dims()
                    );
                    let got = kernels::pointwise_from_tokens(&t, &w, bo, ro, h, wd, None).unwrap();
                    worst = worst.max(check(&what, &got, |dt| {
                        ref_from_tokens(&cast(&t, dt), &cast(&w, dt), cast_opt(bo, dt).as_ref(), cast_opt(ro, dt).as_ref(), h, wd)
                    }));
                }
            }
        }
        // The layers' entry points: Linear::pointwise and a 1x1 Conv2d::pointwise.
        let lin = Linear::new(w.clone(), Some(bias.clone()), Precision::F32);
        let conv = Conv2d::new(w.reshape((cout, c, 1, 1)).unwrap(), Some(bias.clone()), 1, 0);
        for (name, p) in [("Linear", lin.pointwise()), ("Conv2d", conv.pointwise())] {
            let what = format!("nn::{name}::pointwise().to_tokens x [{b}, {c}, {h}, {wd}] -> {cout}");
            let got = p.to_tokens(&x).unwrap();
            worst = worst.max(check(&what, &got, |dt| ref_to_tokens(&cast(&x, dt), &cast(&w, dt), Some(&cast(&bias, dt)))));
            let what = format!("nn::{name}::pointwise().from_tokens t [{b}, {}, {c}] -> {cout}, residual", h * wd);
            let got = p.from_tokens(&t, h, wd, Some(&res)).unwrap();
            worst = worst.max(check(&what, &got, |dt| {
                ref_from_tokens(&cast(&t, dt), &cast(&w, dt), Some(&cast(&bias, dt)), Some(&cast(&res, dt)), h, wd)
            }));
        }
    }
    eprintln!("pointwise projections: max relative error {worst:.2e} (tolerance {TOL:.0e})");
}

// ---------------------------------------------------------------------------------------------
// Convolution.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct ConvCase {
    b: usize,
    cin: usize,
    cout: usize,
    hw: (usize, usize),
    k: usize,
    stride: usize,
    input: ConvInput,
}

const fn pad(p: usize) -> (usize, usize, usize, usize) {
    (p, p, p, p)
}

const fn plain(p: usize) -> ConvInput {
    ConvInput { upsample: None, pad: pad(p) }
}

const fn up(h: usize, w: usize, p: usize) -> ConvInput {
    ConvInput { upsample: Some((h, w)), pad: pad(p) }
}

#[rustfmt::skip]
const CONV_CASES: [ConvCase; 20] = [
    // 1x1, stride 1, no padding: the direct (single gemm) path.
    ConvCase { b: 3, cin: 5, cout: 7, hw: (3, 5), k: 1, stride: 1, input: plain(0) },
    ConvCase { b: 1, cin: 33, cout: 3, hw: (1, 1), k: 1, stride: 1, input: plain(0) },
    // 1x1 through the padded path: stride 2, padding 1, an upsampled input.
    ConvCase { b: 1, cin: 7, cout: 13, hw: (7, 9), k: 1, stride: 2, input: plain(0) },
    ConvCase { b: 3, cin: 3, cout: 5, hw: (3, 5), k: 1, stride: 1, input: plain(1) },
    ConvCase { b: 1, cin: 5, cout: 3, hw: (3, 5), k: 1, stride: 1, input: up(6, 10, 0) },
    // 3x3, stride 1, padding 1 and 0.
    ConvCase { b: 3, cin: 7, cout: 5, hw: (7, 9), k: 3, stride: 1, input: plain(1) },
    ConvCase { b: 1, cin: 3, cout: 13, hw: (1, 1), k: 3, stride: 1, input: plain(1) },
    ConvCase { b: 1, cin: 13, cout: 33, hw: (11, 6), k: 3, stride: 1, input: plain(0) },
    ConvCase { b: 3, cin: 5, cout: 7, hw: (3, 5), k: 3, stride: 1, input: plain(0) },
    // 3x3, stride 2 (odd sizes drop a row / column), padding 1 and 0, VAE-style (0, 0, 1, 1).
    ConvCase { b: 3, cin: 5, cout: 7, hw: (7, 9), k: 3, stride: 2, input: plain(1) },
    ConvCase { b: 1, cin: 33, cout: 5, hw: (11, 6), k: 3, stride: 2, input: plain(1) },
    ConvCase { b: 1, cin: 7, cout: 3, hw: (7, 9), k: 3, stride: 2, input: plain(0) },
    ConvCase { b: 3, cin: 3, cout: 7, hw: (11, 6), k: 3, stride: 2, input: ConvInput { upsample: None, pad: (0, 0, 1, 1) } },
    ConvCase { b: 1, cin: 3, cout: 5, hw: (1, 1), k: 3, stride: 2, input: plain(1) },
    // Nearest upsampling: 2x (as the UNet / VAE upsamplers), 1x1 -> 2x2, non-integer factors,
    // one axis only, a shrink, and upsampling followed by a stride-2 convolution.
    ConvCase { b: 3, cin: 5, cout: 7, hw: (3, 5), k: 3, stride: 1, input: up(6, 10, 1) },
    ConvCase { b: 1, cin: 7, cout: 3, hw: (1, 1), k: 3, stride: 1, input: up(2, 2, 1) },
    ConvCase { b: 1, cin: 3, cout: 13, hw: (7, 9), k: 3, stride: 1, input: up(11, 13, 1) },
    ConvCase { b: 3, cin: 5, cout: 3, hw: (3, 5), k: 3, stride: 1, input: up(6, 5, 1) },
    ConvCase { b: 1, cin: 5, cout: 7, hw: (11, 6), k: 3, stride: 1, input: up(7, 5, 0) },
    ConvCase { b: 1, cin: 13, cout: 5, hw: (3, 5), k: 3, stride: 2, input: up(6, 10, 1) },
];

/// (bias, extra bias, residual, out_scale) combinations of the conv epilogue.
const EPILOGUES: [(bool, bool, bool, f64); 7] = [
    (false, false, false, 1.0),
    (true, false, false, 1.0),
    (true, true, false, 1.0),
    (true, false, true, 1.0),
    (false, false, false, 1.5),
    (false, true, true, 0.7),
    (true, true, true, 1.0 / 0.18215),
];

fn conv_output_hw(c: &ConvCase) -> (usize, usize) {
    let (h, w) = c.input.upsample.unwrap_or(c.hw);
    let (pt, pl, pb, pr) = c.input.pad;
    ((h + pt + pb - c.k) / c.stride + 1, (w + pl + pr - c.k) / c.stride + 1)
}

struct ConvData {
    x: Tensor,
    w: Tensor,
    bias: Tensor,
    extra: Tensor,
    res: Tensor,
}

fn conv_data(seed: u64, c: &ConvCase) -> ConvData {
    let (ho, wo) = conv_output_hw(c);
    ConvData {
        x: randn(seed + 1, &[c.b, c.cin, c.hw.0, c.hw.1], 1.0),
        w: randn(seed + 2, &[c.cout, c.cin, c.k, c.k], 1.0 / ((c.cin * c.k * c.k) as f64).sqrt()),
        bias: randn(seed + 3, &[c.cout], 0.5),
        extra: randn(seed + 4, &[c.b, c.cout], 0.5),
        res: randn(seed + 5, &[c.b, c.cout, ho, wo], 1.0),
    }
}

#[test]
fn conv2d_kernel_matches_candle_conv_for_every_input_and_epilogue() {
    let mut worst = 0f64;
    for (i, c) in CONV_CASES.iter().enumerate() {
        let d = conv_data(2000 + 100 * i as u64, c);
        for &(use_bias, use_extra, use_res, scale) in &EPILOGUES {
            let (b, e, r) = (use_bias.then_some(&d.bias), use_extra.then_some(&d.extra), use_res.then_some(&d.res));
            let what = format!("conv2d {c:?}, bias {use_bias}, extra bias {use_extra}, residual {use_res}, out_scale {scale}");
            let got = kernels::conv2d(&d.x, &d.w, b, e, c.stride, c.input, r, scale, None).unwrap();
            worst = worst.max(check(&what, &got, |dt| {
                ref_conv(
                    &cast(&d.x, dt),
                    &cast(&d.w, dt),
                    cast_opt(b, dt).as_ref(),
                    cast_opt(e, dt).as_ref(),
                    c.stride,
                    c.input,
                    cast_opt(r, dt).as_ref(),
                    scale,
                )
            }));
        }
    }
    // A 5x5 kernel with stride 3 (more stride phases than taps per axis).
    let c = ConvCase { b: 3, cin: 5, cout: 7, hw: (11, 13), k: 5, stride: 3, input: plain(2) };
    let d = conv_data(2999, &c);
    let got = kernels::conv2d(&d.x, &d.w, Some(&d.bias), None, 3, c.input, Some(&d.res), 2.0, None).unwrap();
    worst = worst.max(check(&format!("conv2d {c:?}"), &got, |dt| {
        ref_conv(&cast(&d.x, dt), &cast(&d.w, dt), Some(&cast(&d.bias, dt)), None, 3, c.input, Some(&cast(&d.res, dt)), 2.0)
    }));
    // Maps of 8x8 and below with enough output channels for the direct kernel's channels-last
    // tile on every instruction set, which then computes only the map's pixels (stride 1 and
    // 2, an upsampled input).
    for (i, c) in [
        ConvCase { b: 2, cin: 20, cout: 70, hw: (4, 4), k: 3, stride: 1, input: plain(1) },
        ConvCase { b: 1, cin: 24, cout: 64, hw: (8, 7), k: 3, stride: 2, input: plain(1) },
        ConvCase { b: 1, cin: 16, cout: 66, hw: (3, 4), k: 3, stride: 1, input: up(6, 8, 1) },
    ]
    .iter()
    .enumerate()
    {
        let d = conv_data(3900 + 10 * i as u64, c);
        let got = kernels::conv2d(&d.x, &d.w, Some(&d.bias), None, c.stride, c.input, Some(&d.res), 1.0, None).unwrap();
        worst = worst.max(check(&format!("conv2d {c:?}"), &got, |dt| {
            ref_conv(&cast(&d.x, dt), &cast(&d.w, dt), Some(&cast(&d.bias, dt)), None, c.stride, c.input, Some(&cast(&d.res, dt)), 1.0)
        }));
    }
    // Maps over 512 grid pixels with more than 32 input channels: on AVX2 one `gemm` per tap,
    // elsewhere the planar tiles (stride 1 and 2, an upsampled input).
    for (i, c) in DEEP_LARGE_MAPS.iter().enumerate() {
        let d = conv_data(3950 + 10 * i as u64, c);
        let got = kernels::conv2d(&d.x, &d.w, Some(&d.bias), None, c.stride, c.input, Some(&d.res), 1.0, None).unwrap();
        worst = worst.max(check(&format!("conv2d {c:?}"), &got, |dt| {
            ref_conv(&cast(&d.x, dt), &cast(&d.w, dt), Some(&cast(&d.bias, dt)), None, c.stride, c.input, Some(&cast(&d.res, dt)), 1.0)
        }));
    }
    // Many channels on maps of 32x32 and more: Winograd's F(2x2, 3x3).
    for (i, c) in WINOGRAD_MAPS.iter().enumerate() {
        let d = conv_data(3970 + 10 * i as u64, c);
        let scale = 1.0 / 0.18215;
        let got = kernels::conv2d(&d.x, &d.w, Some(&d.bias), Some(&d.extra), c.stride, c.input, Some(&d.res), scale, None).unwrap();
        worst = worst.max(check(&format!("conv2d {c:?}"), &got, |dt| {
            let (b, e, r) = (cast(&d.bias, dt), cast(&d.extra, dt), cast(&d.res, dt));
            ref_conv(&cast(&d.x, dt), &cast(&d.w, dt), Some(&b), Some(&e), c.stride, c.input, Some(&r), scale)
        }));
    }
    eprintln!("conv2d kernel: max relative error {worst:.2e} (tolerance {TOL:.0e})");
}

/// 3x3 stride-1 convolutions of at least 128 channels with at least 32x32 outputs, which take
/// Winograd's F(2x2, 3x3) (`kernels::winograd`): odd output sizes (a last block half used), an
/// upsampled input, no padding.
const WINOGRAD_MAPS: [ConvCase; 3] = [
    ConvCase { b: 2, cin: 128, cout: 130, hw: (33, 35), k: 3, stride: 1, input: plain(1) },
    ConvCase { b: 1, cin: 129, cout: 128, hw: (16, 17), k: 3, stride: 1, input: up(32, 34, 1) },
    ConvCase { b: 1, cin: 128, cout: 128, hw: (34, 35), k: 3, stride: 1, input: plain(0) },
];

/// Large maps of more than 32 input channels (see `conv_taps::gemm_beats_planar`).
const DEEP_LARGE_MAPS: [ConvCase; 3] = [
    ConvCase { b: 2, cin: 40, cout: 24, hw: (24, 26), k: 3, stride: 1, input: plain(1) },
    ConvCase { b: 1, cin: 48, cout: 20, hw: (64, 60), k: 3, stride: 2, input: ConvInput { upsample: None, pad: (0, 0, 1, 1) } },
    ConvCase { b: 1, cin: 36, cout: 16, hw: (12, 14), k: 3, stride: 1, input: up(24, 28, 1) },
];

/// A weight stored tap-major is read in its own order, with the output channels along the
/// vector lanes (or, on large maps, as the pixel-major product's strided operand): same maths,
/// same summation order per element, so the same bits. The extra cases reach several 16-channel
/// blocks with a tail (cout 40), a depth above gemm's 512-deep blocks (cin 600), a 2x2 image
/// (the deepest UNet level at a 16x16 latent) and maps large enough for the pixel-major path.
#[test]
fn conv2d_tap_major_weight_gives_the_same_bits() {
    let extra = [
        ConvCase { b: 1, cin: 600, cout: 40, hw: (2, 2), k: 3, stride: 1, input: plain(1) },
        ConvCase { b: 3, cin: 48, cout: 64, hw: (9, 8), k: 3, stride: 2, input: plain(1) },
        ConvCase { b: 1, cin: 32, cout: 17, hw: (4, 4), k: 3, stride: 1, input: up(8, 8, 1) },
        // Over 512 output pixels: the pixel-major product reads the tap-major weight.
        ConvCase { b: 2, cin: 20, cout: 24, hw: (24, 26), k: 3, stride: 1, input: plain(1) },
        ConvCase { b: 1, cin: 9, cout: 5, hw: (56, 48), k: 3, stride: 2, input: ConvInput { upsample: None, pad: (0, 0, 1, 1) } },
    ];
    let mut n = 0;
    for (i, c) in CONV_CASES.iter().chain(&extra).chain(&DEEP_LARGE_MAPS).chain(&WINOGRAD_MAPS[..1]).enumerate().filter(|(_, c)| c.k > 1) {
        let d = conv_data(4000 + 100 * i as u64, c);
        let wt = kernels::conv::tap_major(&d.w).unwrap();
        assert_eq!(wt.dims(), d.w.dims());
        assert_same_bits("tap_major keeps the values", &wt.contiguous().unwrap(), &d.w);
        for &(use_bias, use_extra, use_res, scale) in &EPILOGUES {
            let (b, e, r) = (use_bias.then_some(&d.bias), use_extra.then_some(&d.extra), use_res.then_some(&d.res));
            let what = format!("conv2d {c:?}, bias {use_bias}, extra bias {use_extra}, residual {use_res}, out_scale {scale}");
            let want = kernels::conv2d(&d.x, &d.w, b, e, c.stride, c.input, r, scale, None).unwrap();
            for threads in [1, 2] {
                let got = with_threads(threads, || kernels::conv2d(&d.x, &wt, b, e, c.stride, c.input, r, scale, None).unwrap());
                assert_same_bits(&format!("{what}, tap-major weight, {threads} threads"), &got, &want);
            }
            n += 1;
        }
    }
    eprintln!("conv2d with a tap-major weight: {n} cases bit-identical to the usual layout");
}

#[test]
fn conv2d_layer_matches_its_composed_paths() {
    let mut worst = 0f64;
    for (i, c) in CONV_CASES.iter().enumerate() {
        let d = conv_data(3000 + 100 * i as u64, c);
        // `forward` takes symmetric padding from the layer; use it where the case has one.
        let (pt, pl, pb, pr) = c.input.pad;
        if c.input.upsample.is_none() && pt == pl && pt == pb && pt == pr {
            let layer = Conv2d::new(d.w.clone(), Some(d.bias.clone()), c.stride, pt);
            let what = format!("nn::Conv2d::forward {c:?}");
            let got = layer.forward(&d.x).unwrap();
            assert!(!got.track_op(), "{what}: expected the fused path");
            worst = worst.max(check(&what, &got, |dt| {
                ref_conv(&cast(&d.x, dt), &cast(&d.w, dt), Some(&cast(&d.bias, dt)), None, c.stride, c.input, None, 1.0)
            }));
            let composed = Conv2d::new(tracked(&d.w), Some(d.bias.clone()), c.stride, pt).forward(&d.x).unwrap();
            assert!(composed.track_op(), "{what}: expected the composed path");
            worst = worst.max(assert_close(&format!("{what} [vs the layer's composed f32 path]"), &got, &composed, TOL));
        }
        for &(use_bias, use_extra, use_res, scale) in &EPILOGUES {
            let (b, e, r) = (use_bias.then(|| d.bias.clone()), use_extra.then_some(&d.extra), use_res.then_some(&d.res));
            let what =
                format!("nn::Conv2d::forward_ext {c:?}, bias {use_bias}, extra bias {use_extra}, residual {use_res}, out_scale {scale}");
            // The layer's own padding (2) is replaced by `input`'s.
            let layer = Conv2d::new(d.w.clone(), b.clone(), c.stride, 2);
            let got = layer.forward_ext(&d.x, c.input, e, r, scale).unwrap();
            assert!(!got.track_op(), "{what}: expected the fused path");
            worst = worst.max(check(&what, &got, |dt| {
                ref_conv(
                    &cast(&d.x, dt),
                    &cast(&d.w, dt),
                    cast_opt(b.as_ref(), dt).as_ref(),
                    cast_opt(e, dt).as_ref(),
                    c.stride,
                    c.input,
                    cast_opt(r, dt).as_ref(),
                    scale,
                )
            }));
            let composed = Conv2d::new(tracked(&d.w), b.clone(), c.stride, 2).forward_ext(&d.x, c.input, e, r, scale).unwrap();
            assert!(composed.track_op(), "{what}: expected the composed path");
            worst = worst.max(assert_close(&format!("{what} [vs the layer's composed f32 path]"), &got, &composed, TOL));
            let layer64 = Conv2d::new(cast(&d.w, DType::F64), cast_opt(b.as_ref(), DType::F64), c.stride, 2);
            let composed64 = layer64
                .forward_ext(&cast(&d.x, DType::F64), c.input, cast_opt(e, DType::F64).as_ref(), cast_opt(r, DType::F64).as_ref(), scale)
                .unwrap();
            worst = worst.max(assert_close(&format!("{what} [vs the layer's composed f64 path]"), &got, &composed64, TOL));
        }
    }
    eprintln!("nn::Conv2d: max relative error {worst:.2e} (tolerance {TOL:.0e})");
}

// ---------------------------------------------------------------------------------------------
// Group norm.
// ---------------------------------------------------------------------------------------------

/// (input shape, groups, eps): groups of several channels (3 groups of 5, 5 of 3, 3 of 11), one
/// channel per group, one element per group (variance 0), rank 2 / 3 inputs, and a group of
/// 3 x 41 x 53 = 6519 elements (statistics over more than one 4096-element block).
const GROUP_NORM_CASES: [(&[usize], usize, f64); 8] = [
    (&[1, 15, 3, 5], 3, 1e-5),
    (&[3, 15, 7, 9], 5, 1e-6),
    (&[3, 33, 11, 6], 3, 1e-5),
    (&[1, 7, 1, 1], 7, 1e-6),
    (&[3, 13, 77], 13, 1e-5),
    (&[3, 15], 5, 1e-5),
    (&[1, 5, 1, 77], 1, 1e-6),
    (&[1, 6, 41, 53], 2, 1e-5),
];

fn group_norm_data(seed: u64, shape: &[usize], offset: f64) -> (Tensor, Tensor, Tensor) {
    let x = (randn(seed + 1, shape, 2.0) + offset).unwrap();
    let gamma = (randn(seed + 2, &[shape[1]], 0.3) + 1.0).unwrap();
    let beta = randn(seed + 3, &[shape[1]], 0.5);
    (x, gamma, beta)
}

#[test]
fn group_norm_kernel_matches_composed_group_norm_and_silu() {
    let mut worst = 0f64;
    for (i, &(shape, groups, eps)) in GROUP_NORM_CASES.iter().enumerate() {
        let (x, gamma, beta) = group_norm_data(4000 + 100 * i as u64, shape, 0.0);
        for silu in [false, true] {
            let what = format!("group_norm x {shape:?}, {groups} groups, eps {eps:.0e}, silu {silu}");
            let got = kernels::group_norm(&x, groups, &gamma, &beta, eps, silu).unwrap();
            worst =
                worst.max(check(&what, &got, |dt| ref_group_norm(&cast(&x, dt), groups, &cast(&gamma, dt), &cast(&beta, dt), eps, silu)));
        }
    }
    eprintln!("group_norm kernel: max relative error {worst:.2e} (tolerance {TOL:.0e})");
}

#[test]
fn group_norm_statistics_stay_accurate_with_a_large_mean() {
    // Values 1000 + N(0, 2^2): a one-pass E[x^2] - E[x]^2 variance in f32 would be off by
    // percents. The reference is f64 only. Tolerance 1e-4, not TOL: the mean is kept in f32 (as
    // in any f32 GroupNorm, the f32 composition included), and its rounding alone, half an ulp
    // of 1000 = 3e-5 times rstd * gamma (up to ~2 for groups of 3 elements), measures up to
    // 4.3e-5 of the outputs' scale here (the f32 composition: 5.4e-5).
    const TOL_OFFSET: f64 = 1e-4;
    let mut worst = 0f64;
    for (i, &(shape, groups, eps)) in GROUP_NORM_CASES.iter().enumerate() {
        let (x, gamma, beta) = group_norm_data(4500 + 100 * i as u64, shape, 1000.0);
        for silu in [false, true] {
            let what = format!("group_norm x {shape:?} + 1000, {groups} groups, silu {silu} [vs composed f64]");
            let got = kernels::group_norm(&x, groups, &gamma, &beta, eps, silu).unwrap();
            let x64 = cast(&x, DType::F64);
            let want = ref_group_norm(&x64, groups, &cast(&gamma, DType::F64), &cast(&beta, DType::F64), eps, silu);
            worst = worst.max(assert_close(&what, &got, &want, TOL_OFFSET));
        }
    }
    eprintln!("group_norm kernel, mean 1000: max relative error {worst:.2e} (tolerance {TOL_OFFSET:.0e})");
}

#[test]
fn group_norm_layer_matches_its_composed_paths() {
    let mut worst = 0f64;
    for (i, &(shape, groups, eps)) in GROUP_NORM_CASES.iter().enumerate() {
        let (x, gamma, beta) = group_norm_data(5000 + 100 * i as u64, shape, 0.0);
        let layer = GroupNorm { weight: gamma.clone(), bias: beta.clone(), groups, eps };
        let composed = GroupNorm { weight: tracked(&gamma), ..layer.clone() };
        let layer64 = GroupNorm { weight: cast(&gamma, DType::F64), bias: cast(&beta, DType::F64), groups, eps };
        let x64 = cast(&x, DType::F64);
        for silu in [false, true] {
            let what = format!("nn::GroupNorm x {shape:?}, {groups} groups, silu {silu}");
            let run = |l: &GroupNorm, x: &Tensor| if silu { l.forward_act(x, Activation::Silu) } else { l.forward(x) }.unwrap();
            let got = run(&layer, &x);
            assert!(!got.track_op(), "{what}: expected the fused path");
            worst =
                worst.max(check(&what, &got, |dt| ref_group_norm(&cast(&x, dt), groups, &cast(&gamma, dt), &cast(&beta, dt), eps, silu)));
            let c = run(&composed, &x);
            assert!(c.track_op(), "{what}: expected the composed path");
            worst = worst.max(assert_close(&format!("{what} [vs the layer's composed f32 path]"), &got, &c, TOL));
            worst = worst.max(assert_close(&format!("{what} [vs the layer's composed f64 path]"), &got, &run(&layer64, &x64), TOL));
        }
    }
    eprintln!("nn::GroupNorm: max relative error {worst:.2e} (tolerance {TOL:.0e})");
}

// ---------------------------------------------------------------------------------------------
// Activations and the SIMD maths under them.
// ---------------------------------------------------------------------------------------------

/// Values the elementwise checks include: signed zeros, tiny and subnormal values, moderate and
/// large magnitudes. Infinities and the edges of exp's range are added by the tests that take
/// them.
const SPECIAL: [f32; 22] = [
    0.0, -0.0, 1e-30, -1e-30, 1e-10, -1e-10, 1e-40, -1e-40, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 5.0, -5.0, 10.0, -10.0, 20.0, -20.0, 87.0,
    -87.0,
];

#[test]
fn geglu_kernel_matches_value_times_gelu_erf_of_gate() {
    // The erf inside has an absolute error bound (1e-6), so errors are measured against
    // max(max |want|, 1): a result that is tiny because its gate is very negative (gate -5.3
    // and value ~1 give ~3e-7) is not compared with itself. Tolerance TOL.
    let mut worst = 0f64;
    // Last dims 2*inner with inner 1, 5, 16 (exactly one vector), 33 (two and a tail); 77 and
    // 130 rows cross the kernel's 64-row task chunks.
    let shapes: [&[usize]; 7] = [&[2], &[3, 7, 10], &[1, 77, 66], &[13, 2], &[3, 5, 7, 26], &[130, 32], &[1, 1, 2]];
    for (i, shape) in shapes.iter().enumerate() {
        let h = randn(6000 + i as u64, shape, 2.5);
        let what = format!("geglu h {shape:?}");
        let got = kernels::geglu(&h).unwrap();
        worst = worst.max(check_floor(&what, &got, |dt| ref_geglu(&cast(&h, dt)), 1.0));
        // nn::geglu: fused when nothing tracks gradients, composed otherwise; and the named
        // composed function.
        let fused = nn::geglu(&h).unwrap();
        assert!(!fused.track_op(), "{what}: expected the fused path");
        assert_same_bits(&format!("nn::geglu vs kernels::geglu, h {shape:?}"), &fused, &got);
        let composed = nn::geglu(&tracked(&h)).unwrap();
        assert!(composed.track_op(), "{what}: expected the composed path");
        worst = worst.max(assert_close_floor(&format!("{what} [vs nn::geglu composed f32]"), &got, &composed, TOL, 1.0));
        let composed64 = nn::activation::geglu_composed(&cast(&h, DType::F64)).unwrap();
        worst = worst.max(assert_close_floor(&format!("{what} [vs nn::geglu_composed f64]"), &got, &composed64, TOL, 1.0));
    }
    // Gates over [-15, 15] (erf saturates past |gate| ~ 5.7) with values of magnitude 1 and 1.5,
    // each element compared on its own: |got - want| <= 1e-6 * |value| + 1e-6 * |want|. Beyond
    // |gate| ~ 15 the kernel's error keeps growing (see `geglu_vanishes_for_very_negative_gates`).
    let gates: Vec<f32> = SPECIAL.iter().copied().filter(|g| g.abs() <= 15.0).chain((0..301).map(|i| -15.0 + 0.1 * i as f32)).collect();
    let n = gates.len();
    let vals: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { 1.0 } else { -1.5 }).collect();
    let h = from_vec(vals.iter().chain(&gates).copied().collect(), &[2 * n]);
    let got = values(&kernels::geglu(&h).unwrap());
    for i in 0..n {
        let g = gates[i] as f64;
        let want = vals[i] as f64 * 0.5 * g * (1.0 + candle_core::cpu::erf::erf_f64(g / std::f64::consts::SQRT_2));
        let err = (got[i] - want).abs();
        assert!(
            err <= 1e-6 * (vals[i] as f64).abs() + 1e-6 * want.abs(),
            "geglu: value {} gate {g:e}: got {:e}, want {want:e} (|diff| {err:.2e})",
            vals[i],
            got[i]
        );
    }
    assert!(kernels::geglu(&randn(1, &[3, 7], 1.0)).is_err(), "geglu must reject an odd last dim");
    eprintln!("geglu: max relative error {worst:.2e} (tolerance {TOL:.0e})");
}

/// Applies `f` to a 33-element slice (two 16-lane vectors and a 1-lane tail) of `x` and to each
/// element alone (the tail path): the results must be identical.
fn assert_body_matches_tail(name: &str, xs: &[f32], f: impl Fn(&mut [f32])) {
    for chunk in xs.chunks(33) {
        let mut body = chunk.to_vec();
        f(&mut body);
        for (i, &x) in chunk.iter().enumerate() {
            let mut one = [x];
            f(&mut one);
            assert_eq!(one[0].to_bits(), body[i].to_bits(), "{name}({x:e}): {} in a vector lane, {} on the 1-lane path", body[i], one[0]);
        }
    }
}

#[test]
fn quick_gelu_kernel_and_layer_give_candle_composition_bytes() {
    // The text encoder's activation: the fused pass must give exactly the bytes of candle's
    // `x * sigmoid(x * 1.702)`, over a sweep that crosses the task chunks and reaches exp's
    // overflow (large negative x) and the special values; and the layer picks it when inferring.
    let mut xs: Vec<f32> = SPECIAL.iter().copied().chain([-100.0, 100.0, -88.5, 88.5, -200.0]).collect();
    xs.extend((0..18513 - xs.len()).map(|i| -100.0 + 200.0 * i as f32 / 18000.0));
    let x = from_vec(xs, &[3, 33, 11, 17]);
    let composed = (&x * candle_nn::ops::sigmoid(&(&x * 1.702).unwrap()).unwrap()).unwrap();
    assert_same_bits("quick_gelu kernel vs candle's composition", &kernels::activation::quick_gelu(&x).unwrap(), &composed);
    assert_same_bits("quick_gelu layer vs candle's composition", &Activation::QuickGelu.forward(&x).unwrap(), &composed);
    let y = randn(7100, &[2, 77, 300], 3.0);
    let composed = (&y * candle_nn::ops::sigmoid(&(&y * 1.702).unwrap()).unwrap()).unwrap();
    assert_same_bits("quick_gelu on a text-encoder-shaped input", &kernels::activation::quick_gelu(&y).unwrap(), &composed);
}

#[test]
fn silu_kernel_matches_candle_silu_elementwise() {
    // A sweep over [-100, 100] plus special values; 18513 elements cross the 16384-element
    // task chunks. Bound per element against f64: |got - want| <= 1e-6 |want| + 1e-30.
    let mut xs: Vec<f32> = SPECIAL.iter().copied().chain([-100.0, 100.0, -88.5, 88.5, -200.0]).collect();
    xs.extend((0..18513 - xs.len()).map(|i| -100.0 + 200.0 * i as f32 / 18000.0));
    let x = from_vec(xs.clone(), &[3, 33, 11, 17]);
    let got = kernels::silu(&x).unwrap();
    let g = values(&got);
    let mut worst = 0f64;
    for (i, &v) in xs.iter().enumerate() {
        let v = v as f64;
        let want = v / (1.0 + (-v).exp());
        let err = (g[i] - want).abs();
        if want.abs() > 1e-30 {
            worst = worst.max(err / want.abs());
        }
        assert!(err <= 1e-6 * want.abs() + 1e-30, "silu({v:e}): got {:e}, want {want:e} (|diff| {err:.2e})", g[i]);
    }
    // Against candle's f32 SiLU over the bulk of the range (relative to the largest value).
    assert_close("silu [vs candle silu f32]", &got, &x.silu().unwrap(), TOL);
    for shape in [&[1usize][..], &[7], &[3, 5, 7, 9]] {
        let x = randn(7000 + shape.len() as u64, shape, 4.0);
        check(&format!("silu x {shape:?}"), &kernels::silu(&x).unwrap(), |dt| cast(&x, dt).silu().unwrap());
    }
    let silu_slice = |s: &mut [f32]| {
        let n = s.len();
        let out = kernels::silu(&from_vec(s.to_vec(), &[n])).unwrap().to_vec1::<f32>().unwrap();
        s.copy_from_slice(&out);
    };
    assert_body_matches_tail("silu", &xs[..33 * 20], silu_slice);
    eprintln!("silu: max elementwise relative error {worst:.2e} where |silu(x)| > 1e-30 (bound 1e-6)");
}

/// f32 spacing at |x| (one unit in the last place), for normal numbers.
fn ulp(x: f64) -> f64 {
    let e = (x.abs() as f32).max(f32::MIN_POSITIVE);
    (f32::from_bits(e.to_bits() + 1) - e) as f64
}

#[test]
fn exp_slice_matches_f64_exp() {
    // Documented: max relative error ~2 ulp; exactly 0 below -87.33654 and for -inf (the
    // smallest normal f32 is e^-87.33654, so no subnormal results); saturates at e^88.37626
    // above 88.37626.
    const LO: f32 = -87.336_54;
    const HI: f32 = 88.376_26;
    let mut xs: Vec<f32> = SPECIAL.to_vec();
    xs.extend([LO, LO + 1e-4, -87.3, 88.3, HI, -1e-7, 1e-7, std::f32::consts::LN_2, -std::f32::consts::LN_2]);
    xs.extend((0..200_001).map(|i| -87.3 + 175.6 * i as f32 / 200_000.0));
    let mut got = xs.clone();
    kernels::exp_slice(&mut got);
    let mut worst_ulp = 0f64;
    for (&x, &e) in xs.iter().zip(&got) {
        let want = (x as f64).exp();
        let ulps = (e as f64 - want).abs() / ulp(want);
        worst_ulp = worst_ulp.max(ulps);
        assert!(ulps <= 2.0, "exp({x:e}): got {e:e}, want {want:e}: {ulps:.2} ulp > 2 ulp");
    }
    let mut one = [0.0f32, -0.0];
    kernels::exp_slice(&mut one);
    assert_eq!(one, [1.0, 1.0], "exp(0)");
    // Below the range: exactly 0, as documented.
    let mut low = [LO - 1e-3, -88.0, -100.0, -1e30, f32::MIN, f32::NEG_INFINITY];
    let low_in = low;
    kernels::exp_slice(&mut low);
    for (x, e) in low_in.iter().zip(low) {
        assert_eq!(e.to_bits(), 0, "exp({x:e}) = {e:e}: expected exactly +0 below {LO}");
    }
    // Above the range: saturated at e^88.37626 (finite), never inf.
    let mut sat = [HI];
    kernels::exp_slice(&mut sat);
    let mut high = [88.38, 88.72, 88.8, 100.0, 1e30, f32::MAX, f32::INFINITY];
    let high_in = high;
    kernels::exp_slice(&mut high);
    for (x, e) in high_in.iter().zip(high) {
        assert!(e.is_finite() && e == sat[0], "exp({x:e}) = {e:e}: expected the saturated value {:e}", sat[0]);
    }
    assert_body_matches_tail("exp", &xs[..33 * 100], kernels::exp_slice);
    assert_body_matches_tail("exp", &xs[xs.len() - 33 * 100..], kernels::exp_slice);
    eprintln!("exp_slice: max error {worst_ulp:.2} ulp (bound 2 ulp)");
}

#[test]
fn erf_slice_matches_reference_erf() {
    // Documented: |error| < 1e-6 (the rational approximation clamps |x| to 4, where
    // 1 - erf(4) = 1.5e-8). Reference: candle's f64 erf, itself checked at known values.
    let erf = candle_core::cpu::erf::erf_f64;
    for (x, want) in
        [(0.5, 0.520_499_877_813_046_5), (1.0, 0.842_700_792_949_714_9), (2.0, 0.995_322_265_018_952_7), (3.5, 0.999_999_256_901_627_7)]
    {
        assert!((erf(x) - want).abs() < 1e-15, "reference erf({x}) = {} != {want}", erf(x));
    }
    let mut xs: Vec<f32> = SPECIAL.to_vec();
    xs.extend([4.0, -4.0, 3.99, 4.01, 1e30, -1e30, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN]);
    xs.extend((0..120_001).map(|i| -6.0 + 12.0 * i as f32 / 120_000.0));
    let mut got = xs.clone();
    kernels::erf_slice(&mut got);
    let mut worst = 0f64;
    for (&x, &e) in xs.iter().zip(&got) {
        let want = if x.is_infinite() { x.signum() as f64 } else { erf(x as f64) };
        let err = (e as f64 - want).abs();
        worst = worst.max(err);
        assert!(err < 1e-6, "erf({x:e}): got {e:e}, want {want:e} (|diff| {err:.2e} >= 1e-6)");
        // Odd, exactly.
        let mut neg = [-x];
        kernels::erf_slice(&mut neg);
        assert_eq!(neg[0].to_bits(), (-e).to_bits(), "erf(-{x:e}) = {} but -erf({x:e}) = {}", neg[0], -e);
    }
    // Near 0, erf(x) ~ 2x/sqrt(pi): relative accuracy for tiny normal inputs.
    for x in [1e-30f32, 1e-20, 1e-10, 1e-5, -1e-30, -1e-10] {
        let mut v = [x];
        kernels::erf_slice(&mut v);
        let want = erf(x as f64);
        let rel = (v[0] as f64 - want).abs() / want.abs();
        assert!(rel < 1e-6, "erf({x:e}): got {:e}, want {want:e}, relative error {rel:.2e} >= 1e-6", v[0]);
    }
    let mut zero = [0.0f32];
    kernels::erf_slice(&mut zero);
    assert_eq!(zero[0].to_bits(), 0, "erf(0) must be +0");
    assert_body_matches_tail("erf", &xs[..33 * 100], kernels::erf_slice);
    eprintln!("erf_slice: max absolute error {worst:.2e} (bound 1e-6)");
}

// ---------------------------------------------------------------------------------------------
// Attention and softmax.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum MaskKind {
    None,
    /// Random additive values.
    Random,
    /// 0 on and below the diagonal, -inf above (self attention).
    Causal,
    /// As `Causal` with f32::MIN for -inf (CLIP's causal mask).
    CausalMin,
}

/// (batch, queries n, keys m, heads, head dim d, mask).
#[rustfmt::skip]
const ATTENTION_CASES: [(usize, usize, usize, usize, usize, MaskKind); 11] = [
    (1, 1, 1, 1, 1, MaskKind::None),
    (1, 1, 1, 1, 1, MaskKind::Random),
    (1, 7, 7, 3, 5, MaskKind::Causal),
    (3, 7, 77, 3, 13, MaskKind::None),
    (3, 7, 77, 3, 13, MaskKind::Random),
    (3, 77, 77, 1, 33, MaskKind::CausalMin),
    (1, 77, 1, 3, 7, MaskKind::None),
    // Query blocks: 133 queries over 9 keys -> blocks of 128 and 5.
    (1, 133, 9, 3, 7, MaskKind::Random),
    (3, 133, 133, 1, 5, MaskKind::Causal),
    // Many keys: 9001 keys -> query blocks of 16 (37 = 16 + 16 + 5).
    (1, 37, 9001, 1, 5, MaskKind::None),
    (1, 37, 9001, 3, 3, MaskKind::Random),
];

fn attention_mask(seed: u64, kind: MaskKind, n: usize, m: usize) -> Option<Tensor> {
    let causal = |neg: f32| from_vec((0..n).flat_map(|i| (0..m).map(move |j| if j > i { neg } else { 0.0 })).collect(), &[n, m]);
    match kind {
        MaskKind::None => None,
        MaskKind::Random => Some(randn(seed, &[n, m], 2.0)),
        MaskKind::Causal => Some(causal(f32::NEG_INFINITY)),
        MaskKind::CausalMin => Some(causal(f32::MIN)),
    }
}

#[test]
fn attention_kernel_matches_per_head_softmax_of_scaled_scores_times_v() {
    let mut worst = 0f64;
    for (i, &(b, n, m, heads, d, kind)) in ATTENTION_CASES.iter().enumerate() {
        let s = 8000 + 100 * i as u64;
        let inner = heads * d;
        let q = randn(s + 1, &[b, n, inner], 1.0);
        let k = randn(s + 2, &[b, m, inner], 1.0);
        let v = randn(s + 3, &[b, m, inner], 1.0);
        let mask = attention_mask(s + 4, kind, n, m);
        let mo = mask.as_ref();
        let what = format!("attention b {b}, n {n}, m {m}, {heads} heads of {d}, mask {kind:?}");
        let got = kernels::attention(&q, &k, &v, heads, mo, None).unwrap();
        // f64 -inf masks stay -inf; f32::MIN stays finite in both.
        worst = worst
            .max(check(&what, &got, |dt| ref_attention(&cast(&q, dt), &cast(&k, dt), &cast(&v, dt), heads, cast_opt(mo, dt).as_ref())));
        // nn::attention: the kernel in both modes for f32 inputs; its composed path for f64.
        for mode in [Mode::Infer, Mode::Train] {
            let layer = nn::attention(&q, &k, &v, heads, mo, mode, Precision::F32).unwrap();
            assert_same_bits(&format!("{what}: nn::attention {mode:?} vs the kernel"), &layer, &got);
        }
        let c64 = nn::attention(
            &cast(&q, DType::F64),
            &cast(&k, DType::F64),
            &cast(&v, DType::F64),
            heads,
            cast_opt(mo, DType::F64).as_ref(),
            Mode::Infer,
            Precision::F32,
        )
        .unwrap();
        worst = worst.max(assert_close(&format!("{what} [vs nn::attention composed f64]"), &got, &c64, TOL));
    }
    eprintln!("attention kernel: max relative error {worst:.2e} (tolerance {TOL:.0e})");
}

#[test]
fn softmax_kernel_matches_candle_softmax_last_dim() {
    let mut worst = 0f64;
    // Rows of 1, 7, 16 (one vector), 33 (two and a tail), 77 and 1000; scales up to 30 (large
    // spreads: most probabilities underflow).
    let cases: [(&[usize], f64); 7] =
        [(&[1], 1.0), (&[7], 3.0), (&[3, 77], 1.0), (&[3, 5, 33], 10.0), (&[2, 16], 1.0), (&[1, 1000], 30.0), (&[13, 1], 5.0)];
    for (i, &(shape, scale)) in cases.iter().enumerate() {
        let x = randn(9000 + i as u64, shape, scale);
        let what = format!("softmax_last_dim x {shape:?}, scale {scale}");
        let got = kernels::softmax_last_dim(&x).unwrap();
        worst = worst.max(check(&what, &got, |dt| candle_nn::ops::softmax_last_dim(&cast(&x, dt)).unwrap()));
    }
    // Rows with -inf entries, equal entries, a huge shift, and f32::MIN / MAX-scale values.
    let rows: [[f32; 5]; 5] = [
        [0.0, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY, -1.0],
        [2.0; 5],
        [1e4, 1e4 + 1.0, 1e4 - 2.0, 1e4 + 0.5, 1e4],
        [f32::MIN, 0.0, f32::MIN, 1.0, 0.0],
        [-1e30, -1e30, -1e30, -1e30, -1e30 + 1e24],
    ];
    for row in rows {
        let x = from_vec(row.to_vec(), &[1, 5]);
        worst = worst.max(check(&format!("softmax_last_dim {row:?}"), &kernels::softmax_last_dim(&x).unwrap(), |dt| {
            candle_nn::ops::softmax_last_dim(&cast(&x, dt)).unwrap()
        }));
    }
    eprintln!("softmax kernel: max relative error {worst:.2e} (tolerance {TOL:.0e})");
}

// ---------------------------------------------------------------------------------------------
// Determinism: thread count and batch size.
// ---------------------------------------------------------------------------------------------

/// Each kernel on shapes large enough for gemm and rayon to split the work, run in pools of
/// 1, 2 and 3 threads: the results must be identical (the kernels' documented determinism).
#[test]
fn kernels_give_the_same_bits_for_any_thread_count() {
    let x3 = randn(1, &[2, 150, 201], 1.0);
    let wl = randn(2, &[303, 201], 0.07);
    let bl = randn(3, &[303], 0.5);
    let rl = randn(4, &[2, 150, 303], 1.0);
    let x2 = randn(5, &[33, 201], 1.0);
    let rl2 = randn(6, &[33, 303], 1.0);
    let xc = randn(7, &[2, 65, 31, 29], 1.0);
    let wc = randn(8, &[67, 65, 3, 3], 0.04);
    let wp = randn(9, &[67, 65], 0.12);
    let bc = randn(10, &[67], 0.5);
    let ec = randn(11, &[2, 67], 0.5);
    let rc = randn(12, &[2, 67, 31, 29], 1.0);
    let rc2 = randn(13, &[2, 67, 15, 14], 1.0);
    let rup = randn(14, &[2, 67, 62, 58], 1.0);
    let tok = randn(15, &[2, 31 * 29, 65], 1.0);
    let gn = randn(16, &[3, 65, 31, 29], 2.0);
    let (gg, gb) = ((randn(17, &[65], 0.3) + 1.0).unwrap(), randn(18, &[65], 0.5));
    let h = randn(19, &[3, 257, 2 * 77], 2.0);
    let q = randn(20, &[2, 133, 3 * 13], 1.0);
    let k = randn(21, &[2, 77, 3 * 13], 1.0);
    let v = randn(22, &[2, 77, 3 * 13], 1.0);
    let mask = randn(23, &[133, 77], 1.0);
    let sm = randn(24, &[3, 133, 77], 3.0);
    let s2 = ConvInput { upsample: None, pad: (0, 0, 1, 1) };
    // One image of 128 channels, 33x32: Winograd's blocks, in bands run in parallel.
    let xw = randn(25, &[1, 128, 33, 32], 1.0);
    let ww = randn(26, &[128, 128, 3, 3], 0.03);
    let rw = randn(27, &[1, 128, 33, 32], 1.0);
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Box<dyn Fn() -> Tensor + Sync>)> = vec![
        ("linear rank 3", Box::new(|| kernels::linear(&x3, &wl, Some(&bl), Some(&rl), None).unwrap())),
        ("linear rank 2", Box::new(|| kernels::linear(&x2, &wl, Some(&bl), Some(&rl2), None).unwrap())),
        ("pointwise_to_tokens", Box::new(|| kernels::pointwise_to_tokens(&xc, &wp, Some(&bc), None).unwrap())),
        ("pointwise_from_tokens", Box::new(|| kernels::pointwise_from_tokens(&tok, &wp, Some(&bc), Some(&rc), 31, 29, None).unwrap())),
        (
            "conv2d 1x1 direct",
            Box::new(|| {
                kernels::conv2d(&xc, &wp.reshape((67, 65, 1, 1)).unwrap(), Some(&bc), Some(&ec), 1, plain(0), Some(&rc), 1.5, None).unwrap()
            }),
        ),
        ("conv2d 3x3", Box::new(|| kernels::conv2d(&xc, &wc, Some(&bc), Some(&ec), 1, plain(1), Some(&rc), 1.5, None).unwrap())),
        ("conv2d 3x3 stride 2", Box::new(|| kernels::conv2d(&xc, &wc, Some(&bc), None, 2, s2, Some(&rc2), 1.0, None).unwrap())),
        ("conv2d 3x3 upsampled", Box::new(|| kernels::conv2d(&xc, &wc, Some(&bc), None, 1, up(62, 58, 1), Some(&rup), 1.0, None).unwrap())),
        ("conv2d 3x3 Winograd", Box::new(|| kernels::conv2d(&xw, &ww, None, None, 1, plain(1), Some(&rw), 1.0, None).unwrap())),
        ("group_norm", Box::new(|| kernels::group_norm(&gn, 13, &gg, &gb, 1e-5, false).unwrap())),
        ("group_norm + silu", Box::new(|| kernels::group_norm(&gn, 5, &gg, &gb, 1e-6, true).unwrap())),
        ("geglu", Box::new(|| kernels::geglu(&h).unwrap())),
        ("silu", Box::new(|| kernels::silu(&gn).unwrap())),
        ("attention", Box::new(|| kernels::attention(&q, &k, &v, 3, None, None).unwrap())),
        ("attention + mask", Box::new(|| kernels::attention(&q, &k, &v, 3, Some(&mask), None).unwrap())),
        ("softmax_last_dim", Box::new(|| kernels::softmax_last_dim(&sm).unwrap())),
    ];
    for (name, f) in &cases {
        let one = with_threads(1, f);
        for n in [2, 3] {
            assert_same_bits(&format!("{name}: 1 thread vs {n} threads"), &one, &with_threads(n, f));
        }
    }
}

/// Sample `i` of a batch gives the same bits as the same sample alone (documented: an output
/// element's computation depends only on the shapes per batch element).
#[test]
fn kernels_give_the_same_bits_for_any_batch_size() {
    let item = |t: &Tensor, i: usize| t.narrow(0, i, 1).unwrap().contiguous().unwrap();
    let each = |name: &str, whole: &Tensor, b: usize, f: &dyn Fn(usize) -> Tensor| {
        for i in 0..b {
            assert_same_bits(&format!("{name}: sample {i} of {b} vs alone"), &item(whole, i), &f(i));
        }
    };
    // linear, rank 3 (items = dim 0) and rank 2 (every row its own item).
    let x = randn(1, &[3, 77, 33], 1.0);
    let w = randn(2, &[13, 33], 0.2);
    let bias = randn(3, &[13], 0.5);
    let r = randn(4, &[3, 77, 13], 1.0);
    let whole = kernels::linear(&x, &w, Some(&bias), Some(&r), None).unwrap();
    each("linear rank 3", &whole, 3, &|i| kernels::linear(&item(&x, i), &w, Some(&bias), Some(&item(&r, i)), None).unwrap());
    let x2 = randn(5, &[7, 33], 1.0);
    let r2 = randn(6, &[7, 13], 1.0);
    let whole = kernels::linear(&x2, &w, Some(&bias), Some(&r2), None).unwrap();
    each("linear rank 2", &whole, 7, &|i| kernels::linear(&item(&x2, i), &w, Some(&bias), Some(&item(&r2, i)), None).unwrap());
    // Pointwise projections.
    let xc = randn(7, &[3, 13, 7, 9], 1.0);
    let wp = randn(8, &[33, 13], 0.3);
    let bp = randn(9, &[33], 0.5);
    let whole = kernels::pointwise_to_tokens(&xc, &wp, Some(&bp), None).unwrap();
    each("pointwise_to_tokens", &whole, 3, &|i| kernels::pointwise_to_tokens(&item(&xc, i), &wp, Some(&bp), None).unwrap());
    let t = randn(10, &[3, 63, 33], 1.0);
    let wq = randn(11, &[13, 33], 0.2);
    let bq = randn(12, &[13], 0.5);
    let rq = randn(13, &[3, 13, 7, 9], 1.0);
    let whole = kernels::pointwise_from_tokens(&t, &wq, Some(&bq), Some(&rq), 7, 9, None).unwrap();
    each("pointwise_from_tokens", &whole, 3, &|i| {
        kernels::pointwise_from_tokens(&item(&t, i), &wq, Some(&bq), Some(&item(&rq, i)), 7, 9, None).unwrap()
    });
    // Convolutions, with a per-sample bias.
    for (ci, c) in [CONV_CASES[0], CONV_CASES[5], CONV_CASES[9], CONV_CASES[12], CONV_CASES[14], CONV_CASES[17], WINOGRAD_MAPS[0]].iter().enumerate() {
        let d = conv_data(20 + 10 * ci as u64, c);
        let whole = kernels::conv2d(&d.x, &d.w, Some(&d.bias), Some(&d.extra), c.stride, c.input, Some(&d.res), 1.5, None).unwrap();
        each(&format!("conv2d {c:?}"), &whole, c.b, &|i| {
            kernels::conv2d(
                &item(&d.x, i),
                &d.w,
                Some(&d.bias),
                Some(&item(&d.extra, i)),
                c.stride,
                c.input,
                Some(&item(&d.res, i)),
                1.5,
                None,
            )
            .unwrap()
        });
    }
    // Group norm, attention.
    let (gx, gg, gb) = group_norm_data(30, &[3, 15, 7, 9], 0.0);
    let whole = kernels::group_norm(&gx, 5, &gg, &gb, 1e-5, true).unwrap();
    each("group_norm", &whole, 3, &|i| kernels::group_norm(&item(&gx, i), 5, &gg, &gb, 1e-5, true).unwrap());
    let q = randn(40, &[3, 133, 3 * 5], 1.0);
    let k = randn(41, &[3, 77, 3 * 5], 1.0);
    let v = randn(42, &[3, 77, 3 * 5], 1.0);
    let mask = randn(43, &[133, 77], 1.0);
    let whole = kernels::attention(&q, &k, &v, 3, Some(&mask), None).unwrap();
    each("attention", &whole, 3, &|i| kernels::attention(&item(&q, i), &item(&k, i), &item(&v, i), 3, Some(&mask), None).unwrap());
    // Row-wise kernels: a row of a 77-row batch vs the row alone.
    let h = randn(50, &[77, 2 * 33], 2.0);
    let whole = kernels::geglu(&h).unwrap();
    each("geglu", &whole, 77, &|i| kernels::geglu(&item(&h, i)).unwrap());
    let s = randn(51, &[77, 33], 3.0);
    let whole = kernels::softmax_last_dim(&s).unwrap();
    each("softmax_last_dim", &whole, 77, &|i| kernels::softmax_last_dim(&item(&s, i)).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Shape validation.
// ---------------------------------------------------------------------------------------------

#[test]
fn kernels_reject_mismatched_shapes() {
    let x = randn(1, &[3, 7, 5], 1.0);
    let w = randn(2, &[13, 5], 1.0);
    let expect_err = |what: &str, r: diffii::error::Result<Tensor>| {
        assert!(r.is_err(), "{what}: expected an error, got a result of shape {:?}", r.unwrap().dims());
    };
    expect_err("linear: input dim 5 vs weight [13, 7]", kernels::linear(&x, &randn(3, &[13, 7], 1.0), None, None, None));
    expect_err("linear: residual [3, 7, 5] for output [3, 7, 13]", kernels::linear(&x, &w, None, Some(&x), None));
    let xc = randn(4, &[3, 5, 7, 9], 1.0);
    let wc = randn(5, &[7, 5, 3, 3], 1.0);
    expect_err(
        "conv2d: input channels 5 vs weight [7, 3, 3, 3]",
        kernels::conv2d(&xc, &randn(6, &[7, 3, 3, 3], 1.0), None, None, 1, plain(1), None, 1.0, None),
    );
    expect_err("conv2d: stride 0", kernels::conv2d(&xc, &wc, None, None, 0, plain(1), None, 1.0, None));
    expect_err(
        "conv2d: 1x1 input, 3x3 kernel, no padding",
        kernels::conv2d(&randn(7, &[1, 5, 1, 1], 1.0), &wc, None, None, 1, plain(0), None, 1.0, None),
    );
    expect_err(
        "conv2d: residual of the input's size",
        kernels::conv2d(&xc, &wc, None, None, 2, plain(1), Some(&randn(8, &[3, 7, 7, 9], 1.0)), 1.0, None),
    );
    expect_err("conv2d: extra bias [7]", kernels::conv2d(&xc, &wc, None, Some(&randn(9, &[7], 1.0)), 1, plain(1), None, 1.0, None));
    expect_err(
        "group_norm: 4 groups of 5 channels",
        kernels::group_norm(&xc, 4, &randn(10, &[5], 1.0), &randn(11, &[5], 1.0), 1e-5, false),
    );
    expect_err(
        "group_norm: rank 1",
        kernels::group_norm(&randn(12, &[15], 1.0), 3, &randn(13, &[15], 1.0), &randn(14, &[15], 1.0), 1e-5, false),
    );
    let q = randn(15, &[3, 7, 15], 1.0);
    let k = randn(16, &[3, 11, 15], 1.0);
    expect_err("attention: 4 heads of 15", kernels::attention(&q, &k, &k, 4, None, None));
    expect_err("attention: mask [11, 7] for 7 queries x 11 keys", kernels::attention(&q, &k, &k, 3, Some(&randn(17, &[11, 7], 1.0)), None));
    expect_err("attention: k / v of different lengths", kernels::attention(&q, &k, &q, 3, None, None));
    expect_err("pointwise_to_tokens: weight [7, 4]", kernels::pointwise_to_tokens(&xc, &randn(18, &[7, 4], 1.0), None, None));
    expect_err(
        "pointwise_from_tokens: 63 tokens as 7x8",
        kernels::pointwise_from_tokens(&randn(19, &[3, 63, 5], 1.0), &randn(20, &[7, 5], 1.0), None, None, 7, 8, None),
    );
    // The entry points on raw data (custom ops' storage) check the data against the shapes
    // they are given: an error, not a read past the end.
    let (xv, wv) = (vec![0.5f32; 3 * 5 * 7 * 9], vec![0.25f32; 7 * 5 * 3 * 3]);
    let data = |x: &'static str| {
        let (xs, ws): (&[f32], &[f32]) = match x {
            "short input" => (&xv[1..], &wv),
            "short weight" => (&xv, &wv[1..]),
            _ => (&xv, &wv),
        };
        let d = kernels::conv::ConvData {
            x: xs,
            x_dims: [3, 5, 7, 9],
            weight: ws,
            w_dims: [7, 5, 3, 3],
            tap_major: false,
            bias: (x == "short bias").then_some(&wv[..6]),
            extra_bias: None,
            residual: (x == "short residual").then_some(&xv[..10]),
        };
        kernels::conv::conv2d_data(&d, 1, plain(1), 1.0, None).map(|(v, _)| v.len())
    };
    for what in ["short input", "short weight", "short bias", "short residual"] {
        assert!(data(what).is_err(), "conv2d_data with a {what}: expected an error");
    }
    assert_eq!(data("whole").ok(), Some(3 * 7 * 7 * 9), "conv2d_data: the output of well-formed data");
    let qv = vec![0.1f32; 3 * 7 * 15];
    let on = |q: &[f32]| kernels::attention::attention_on([q, &qv, &qv], [[3, 7, 15]; 3], 3, None, None);
    assert!(on(&qv[1..]).is_err(), "attention_on with short queries: expected an error");
    assert_eq!(on(&qv).map(|v| v.len()).ok(), Some(3 * 7 * 15), "attention_on: the output of well-formed data");
}

/// A NaN input gives NaN, as candle's ops and std do, in the vector body and the tail alike,
/// and leaves the other values as they are without it. A clamp that picked its bound for a NaN
/// lane would turn exp(NaN) into 1.2e-38 and erf(NaN) into -1, and softmax would give a NaN
/// score a probability of ~0 and normalise the rest of its row as if it were absent: a
/// blown-up attention score would then pass the synthesis driver's check for non-finite images.
#[test]
fn nan_inputs_give_nan() {
    // 37 values: two 16-lane vectors and a 5-value tail; NaN in the body and in the tail.
    let clean: Vec<f32> = f32s(&randn(21, &[37], 2.0));
    let nans = [3usize, 34];
    let dirty: Vec<f32> = clean.iter().enumerate().map(|(i, &v)| if nans.contains(&i) { f32::NAN } else { v }).collect();
    type SliceFn = fn(&mut [f32]);
    for (name, f) in [("exp", kernels::exp_slice as SliceFn), ("erf", kernels::erf_slice as SliceFn)] {
        let (mut a, mut b) = (clean.clone(), dirty.clone());
        f(&mut a);
        f(&mut b);
        for i in 0..a.len() {
            if nans.contains(&i) {
                assert!(b[i].is_nan(), "{name}(NaN) at {i} = {:e}", b[i]);
            } else {
                assert_eq!(a[i].to_bits(), b[i].to_bits(), "{name} at {i} changed by a NaN elsewhere");
            }
        }
    }
    let geglu = f32s(&kernels::geglu(&from_vec(vec![1.0, 2.0, 1.0, f32::NAN], &[2, 2])).unwrap());
    assert!(geglu[1].is_nan() && !geglu[0].is_nan(), "geglu with a NaN gate = {geglu:?}");

    // Softmax: rows of 37 with a NaN in the body of row 1 and in the tail of row 2 become NaN;
    // row 0 keeps its bits.
    let mut rows = clean.repeat(3);
    rows[37 + 3] = f32::NAN;
    rows[2 * 37 + 34] = f32::NAN;
    let st = kernels::softmax_last_dim(&from_vec(rows, &[3, 37])).unwrap();
    let s0 = kernels::softmax_last_dim(&from_vec(clean.clone(), &[1, 37])).unwrap();
    assert_same_bits("softmax row 0 beside rows with a NaN", &st.narrow(0, 0, 1).unwrap(), &s0);
    let s = f32s(&st);
    for r in 1..3 {
        assert!(s[r * 37..(r + 1) * 37].iter().all(|v| v.is_nan()), "softmax of row {r} with a NaN = {:?}", &s[r * 37..(r + 1) * 37]);
    }

    // Attention over 37 keys, 2 heads of 4: a NaN in one query row makes that row's output NaN
    // (both heads: the NaN sits in head 0's part, so head 1 stays a number) and no other row's.
    let q = randn(22, &[1, 5, 8], 1.0);
    let kv = randn(23, &[1, 37, 8], 1.0);
    let mut qv = f32s(&q);
    qv[2 * 8 + 1] = f32::NAN;
    let a = f32s(&kernels::attention(&from_vec(qv, &[1, 5, 8]), &kv, &kv, 2, None, None).unwrap());
    let a0 = f32s(&kernels::attention(&q, &kv, &kv, 2, None, None).unwrap());
    for (i, (&x, &y)) in a.iter().zip(&a0).enumerate() {
        let (row, col) = (i / 8, i % 8);
        if row == 2 && col < 4 {
            assert!(x.is_nan(), "attention output [{row}, {col}] with a NaN query = {x:e}");
        } else {
            assert_eq!(x.to_bits(), y.to_bits(), "attention output [{row}, {col}] changed by a NaN query elsewhere");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Known kernel defects, kept as ignored tests so they run (`cargo test -- --ignored`) once the
// kernels are fixed.
// ---------------------------------------------------------------------------------------------

/// gelu_erf(g) -> 0 as g -> -inf, but the kernel's erf clamps its argument to [-4, 4] and
/// erf_v(-4) = -0.99999988 (not -1), so 1 + erf stays 2^-23 and the kernel's GELU is
/// ~ -6e-8 |g| instead: geglu(1, -100) = -6e-6, geglu(1, -1e4) = -6e-4, geglu(1, -1e6) = -0.06
/// (candle: -0). Within the documented erf bound for |g| up to ~15, unbounded beyond.
#[test]
#[ignore = "known defect: the kernel GELU does not vanish for very negative gates (error ~6e-8 |gate|)"]
fn geglu_vanishes_for_very_negative_gates() {
    for g in [-20.0f32, -100.0, -1e3, -1e4, -1e6] {
        let got = kernels::geglu(&from_vec(vec![1.0, g], &[2])).unwrap().to_vec1::<f32>().unwrap()[0];
        let want = candle_core::cpu::erf::erf_f64(g as f64 / std::f64::consts::SQRT_2).mul_add(0.5 * g as f64, 0.5 * g as f64);
        assert!((got as f64 - want).abs() <= 1e-6, "geglu(value 1, gate {g:e}) = {got:e}, want {want:e}");
    }
}

/// Per-channel parameters (bias, gamma, beta) of the wrong length are errors: unchecked, a
/// short bias would make `linear` / `pointwise_to_tokens` panic inside a rayon task and leave
/// `conv2d` / `pointwise_from_tokens` channels holding whatever the output buffer held, and a
/// long gamma / beta would be silently truncated by `group_norm`.
#[test]
fn kernels_reject_mis_sized_per_channel_parameters() {
    let short = randn(1, &[2], 1.0);
    let long = randn(2, &[9], 1.0);
    let xc = randn(3, &[2, 3, 4, 4], 1.0);
    let mut failures = Vec::new();
    let mut expect_err =
        |what: &str, f: &dyn Fn() -> diffii::error::Result<Tensor>| match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(Err(_)) => {}
            Ok(Ok(t)) => failures.push(format!("{what}: accepted (result of shape {:?})", t.dims())),
            Err(_) => failures.push(format!("{what}: panicked instead of returning an error")),
        };
    let w = randn(4, &[5, 3], 1.0);
    expect_err("linear, rank 2, bias [2] for 5 outputs", &|| kernels::linear(&randn(5, &[3, 3], 1.0), &w, Some(&short), None, None));
    expect_err("linear, rank 3, bias [9] for 5 outputs", &|| kernels::linear(&randn(6, &[2, 4, 3], 1.0), &w, Some(&long), None, None));
    expect_err("pointwise_to_tokens, bias [2] for 5 outputs", &|| kernels::pointwise_to_tokens(&xc, &w, Some(&short), None));
    expect_err("pointwise_from_tokens, bias [2] for 5 outputs", &|| {
        kernels::pointwise_from_tokens(&randn(7, &[2, 16, 3], 1.0), &w, Some(&short), None, 4, 4, None)
    });
    let w3 = randn(8, &[5, 3, 3, 3], 1.0);
    expect_err("conv2d 3x3, bias [2] for 5 outputs", &|| kernels::conv2d(&xc, &w3, Some(&short), None, 1, plain(1), None, 1.0, None));
    let w1 = randn(9, &[5, 3, 1, 1], 1.0);
    expect_err("conv2d 1x1, bias [2] for 5 outputs", &|| kernels::conv2d(&xc, &w1, Some(&short), None, 1, plain(0), None, 1.0, None));
    let g = randn(10, &[2, 6, 3], 1.0);
    expect_err("group_norm, gamma / beta [9] for 6 channels", &|| kernels::group_norm(&g, 3, &long, &long, 1e-5, false));
    expect_err("group_norm, gamma / beta [2] for 6 channels", &|| kernels::group_norm(&g, 3, &short, &short, 1e-5, false));
    assert!(failures.is_empty(), "mis-sized parameters not rejected:\n{}", failures.join("\n"));
}

#[test]
fn flipped_transposed_kernel_matches_transpose_and_reversal() {
    for &(cout, cin, k) in &[(5, 3, 3), (4, 7, 1), (2, 2, 5), (1, 6, 7)] {
        let w = randn(11, &[cout, cin, k, k], 1.0);
        let rev = Tensor::new((0..k as u32).rev().collect::<Vec<_>>(), &Device::Cpu).unwrap();
        let want = w.transpose(0, 1).unwrap().contiguous().unwrap().index_select(&rev, 2).unwrap().index_select(&rev, 3).unwrap();
        let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = from_vec(kernels::conv::flipped_transposed(&v, cout, cin, k), &[cin, cout, k, k]);
        assert_eq!(bits(&got), bits(&want), "[{cout}, {cin}, {k}, {k}]");
    }
}

// ---------------------------------------------------------------------------------------------
// Optimiser updates: one pass per variable, with the bits of the candle op sequences.
// ---------------------------------------------------------------------------------------------

/// `n` values of `scale` times standard normal, with signed zeros, subnormals, huge and tiny
/// values planted at the same positions whatever the seed. Aligned, two operands' -0 meet in
/// one sum, the case where the `+ 0.0` of candle's multiplication by a scalar shows: it turns
/// each -0 product into +0, so candle's sum is +0, not -0.
fn planted(seed: u64, n: usize, scale: f64) -> Vec<f32> {
    let mut v = randn(seed, &[n], scale).to_vec1::<f32>().unwrap();
    let special = [-0.0, 0.0, f32::MIN_POSITIVE / 8.0, -f32::MIN_POSITIVE / 8.0, 1e30, -1e30, 1e-30, 3.0e-39];
    for (i, x) in v.iter_mut().enumerate().step_by(7) {
        *x = special[(i / 7) % special.len()];
    }
    v
}

#[test]
fn adamw_step_gives_the_bits_of_its_candle_ops() {
    use diffii::train::optim::{AdamW, AdamWParams};
    // Three and a bit of the kernel's 16 Ki-element tasks, and a variable of 5 elements.
    for (n, shape) in [(49_153usize, vec![13, 3781]), (5, vec![5])] {
        let theta0 = from_vec(planted(1, n, 1.0), &shape);
        let params = AdamWParams { weight_decay: 0.03, ..AdamWParams::with_lr(3e-3) };
        let var = Var::from_tensor(&theta0).unwrap();
        let mut opt = AdamW::new(vec![var.clone()], params).unwrap();
        // Moments start from planted values too, as after a restored checkpoint.
        let (mut m, mut v) = (from_vec(planted(2, n, 0.1), &shape), from_vec(planted(3, n, 0.01).iter().map(|x| x.abs()).collect(), &shape));
        opt.restore(vec![m.clone()], vec![v.clone()], 4).unwrap();
        let mut theta = theta0.clone();
        for step in 0..4 {
            // The third step has no gradient (weight decay and the moments' decay only).
            let g = (step != 2).then(|| from_vec(planted(10 + step as u64, n, 0.5), &shape));
            with_threads(1 + step % 2, || opt.step(std::slice::from_ref(&g)).unwrap());
            let t = opt.t;
            (theta, m, v) = AdamW::step_ops(&params, t, &theta, g.as_ref(), &m, &v).unwrap();
            let what = format!("{n} elements, step {t}");
            assert_same_bits(&format!("{what}: θ"), var.as_tensor(), &theta);
            assert_same_bits(&format!("{what}: m"), &opt.moments().0[0], &m);
            assert_same_bits(&format!("{what}: v"), &opt.moments().1[0], &v);
        }
        assert!(bits(var.as_tensor()) != bits(&theta0), "{n} elements: the variable did not move");
    }
}

#[test]
fn ema_gives_the_bits_of_its_candle_ops() {
    for n in [49_153usize, 3] {
        let (avg, x) = (planted(4, n, 1.0), planted(5, n, 2.0));
        for decay in [0.9999, 0.5, 1.0 / 11.0] {
            let got = from_vec(kernels::optim::ema(&avg, &x, decay), &[n]);
            let (a, t) = (from_vec(avg.clone(), &[n]), from_vec(x.clone(), &[n]));
            let want = ((&a * decay).unwrap() + (&t * (1.0 - decay)).unwrap()).unwrap();
            assert_same_bits(&format!("ema of {n} elements, decay {decay}"), &got, &want);
        }
    }
}
