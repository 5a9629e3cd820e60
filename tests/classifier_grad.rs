//! The classifier's training pieces against references: gradients of convolution, batch norm,
//! linear layer and label-smoothed cross-entropy (alone and chained) against central finite
//! differences in f64, batch-norm running statistics against PyTorch's update formula, SGD
//! against PyTorch's update rule, the cosine schedule and the loss against hand-computed
//! values.
//!
//! Gradient checks perturb every element of every parameter (h = 1e-6). In f64 the central
//! difference is accurate to ~h² · f''' + ε_mach · |f| / h ≈ 1e-10 of the gradient's scale, so
//! the analytic gradient must agree to 1e-6 of its largest entry: a dropped or wrong backward
//! (candle ops without backward silently yield zero) misses by orders of magnitude.
mod common;

use candle_core::{DType, Device, Tensor, Var};
use diffii::classify::loss::{accuracy, cross_entropy, one_hot};
use diffii::nn::weights::{save_safetensors, Weights};
use diffii::nn::{BatchNorm2d, Conv2d, Linear, Precision};
use diffii::rng::seeded_randn;
use diffii::train::lr::cosine_with_warmup;
use diffii::train::sgd::{Sgd, SgdParams};

const H: f64 = 1e-6;
const TOL: f64 = 1e-6;

fn cpu() -> Device {
    Device::Cpu
}

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    seeded_randn(seed, shape, &cpu()).unwrap().to_dtype(DType::F64).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn t64(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &cpu()).unwrap()
}

/// `Σ y ⊙ r`: a scalar whose gradient with respect to `y` is the random `r`, so every output
/// element matters (a plain sum would be blind to, e.g., batch norm's input gradient).
fn project(y: &Tensor, r: &Tensor) -> Tensor {
    (y * r).unwrap().sum_all().unwrap()
}

/// Central differences of `f` for every element of `var`.
fn numeric_grad(var: &Var, f: &dyn Fn() -> f64) -> Vec<f64> {
    let base = values(var.as_tensor());
    let dims = var.dims().to_vec();
    let mut out = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let mut v = base.clone();
        v[i] = base[i] + H;
        var.set(&t64(&v, &dims)).unwrap();
        let fp = f();
        v[i] = base[i] - H;
        var.set(&t64(&v, &dims)).unwrap();
        let fm = f();
        out.push((fp - fm) / (2.0 * H));
    }
    var.set(&t64(&base, &dims)).unwrap();
    out
}

/// Max |analytic - numeric| relative to the largest numeric entry.
fn rel_error(analytic: &[f64], numeric: &[f64]) -> (f64, f64) {
    assert_eq!(analytic.len(), numeric.len());
    let scale = numeric.iter().fold(0f64, |m, v| m.max(v.abs()));
    let err = analytic.iter().zip(numeric).fold(0f64, |m, (a, n)| m.max((a - n).abs()));
    (err / scale.max(1e-300), scale)
}

/// Backward of `f`'s graph, then every variable's gradient against finite differences.
fn check_grads(what: &str, vars: &[(&str, &Var)], f: &dyn Fn() -> Tensor) {
    let loss = f();
    let grads = loss.backward().unwrap();
    let fv = || scalar(&f());
    for (name, var) in vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{what}: no gradient reaches {name}"));
        assert_eq!(g.dims(), var.dims(), "{what}: gradient shape of {name}");
        let numeric = numeric_grad(var, &fv);
        let (rel, scale) = rel_error(&values(g), &numeric);
        eprintln!("{what} / {name}: max relative error {rel:.2e} (gradient scale {scale:.3e})");
        assert!(scale > 1e-3, "{what}: the loss barely depends on {name} (scale {scale}): the check proves nothing");
        assert!(rel < TOL, "{what}: gradient of {name} off by {rel:.3e} of its scale");
    }
}

/// A safetensors file with one batch norm `bn` of `c` channels (plus `num_batches_tracked`,
/// which torchvision checkpoints carry and the loader must ignore), opened in f64 with
/// `bn.weight` and `bn.bias` trainable.
fn bn_weights(name: &str, weight: &[f64], bias: &[f64], mean: &[f64], var: &[f64]) -> Weights {
    let c = weight.len();
    let dir = common::empty_temp_dir(&format!("classifier-grad-{name}"));
    let path = dir.join("bn.safetensors");
    let tensors = vec![
        ("bn.weight".to_string(), t64(weight, &[c])),
        ("bn.bias".to_string(), t64(bias, &[c])),
        ("bn.running_mean".to_string(), t64(mean, &[c])),
        ("bn.running_var".to_string(), t64(var, &[c])),
        ("bn.num_batches_tracked".to_string(), t64(&[7.0], &[])),
    ];
    save_safetensors(&path, &tensors, None).unwrap();
    Weights::from_file(&path, DType::F64, &cpu()).unwrap().with_trainable(&["bn.weight", "bn.bias"])
}

/// The trainable variable handed out for `key`.
fn var_of(w: &Weights, key: &str) -> Var {
    w.vars().into_iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("{key} is not a variable")).1
}

/// Values exactly representable in f32 (the file stores f32), so hand computations match.
fn bn_random(name: &str, c: usize, seed: u64) -> (BatchNorm2d, Var, Var) {
    let r = |s: u64| values(&randn(s, &[c]));
    let weight: Vec<f64> = r(seed).iter().map(|v| 1.0 + 0.3 * v).collect();
    let bias = r(seed + 1);
    let mean = r(seed + 2);
    let var: Vec<f64> = r(seed + 3).iter().map(|v| 0.5 + v * v).collect();
    let w = bn_weights(name, &weight, &bias, &mean, &var);
    let bn = BatchNorm2d::load(&w.pp("bn"), c).unwrap();
    (bn, var_of(&w, "bn.weight"), var_of(&w, "bn.bias"))
}

// ---------------------------------------------------------------------------------------------
// Gradients against finite differences.

#[test]
fn conv2d_gradients_match_finite_differences() {
    for (stride, padding) in [(1, 1), (2, 1), (2, 0)] {
        let x = Var::from_tensor(&randn(1, &[2, 3, 6, 6])).unwrap();
        let w = Var::from_tensor(&(randn(2, &[4, 3, 3, 3]) * 0.3).unwrap()).unwrap();
        let b = Var::from_tensor(&randn(3, &[4])).unwrap();
        let conv = Conv2d::new(w.as_tensor().clone(), Some(b.as_tensor().clone()), stride, padding);
        let ho = (6 + 2 * padding - 3) / stride + 1;
        let r = randn(4, &[2, 4, ho, ho]);
        let f = || project(&conv.forward(x.as_tensor()).unwrap(), &r);
        assert_eq!(conv.forward(x.as_tensor()).unwrap().dims(), &[2, 4, ho, ho]);
        check_grads(&format!("conv stride {stride} padding {padding}"), &[("input", &x), ("weight", &w), ("bias", &b)], &f);
    }
}

#[test]
fn batchnorm_train_gradients_match_finite_differences() {
    let (bn, weight, bias) = bn_random("grad-train", 3, 10);
    let x = Var::from_tensor(&randn(14, &[4, 3, 3, 2]).affine(2.0, 0.5).unwrap()).unwrap();
    let r = randn(15, &[4, 3, 3, 2]);
    let f = || project(&bn.forward(x.as_tensor(), true).unwrap(), &r);
    check_grads("batch norm (train)", &[("input", &x), ("weight", &weight), ("bias", &bias)], &f);
}

#[test]
fn batchnorm_eval_gradients_match_finite_differences() {
    let (bn, weight, bias) = bn_random("grad-eval", 3, 20);
    let x = Var::from_tensor(&randn(24, &[2, 3, 2, 2])).unwrap();
    let r = randn(25, &[2, 3, 2, 2]);
    let f = || project(&bn.forward(x.as_tensor(), false).unwrap(), &r);
    check_grads("batch norm (eval)", &[("input", &x), ("weight", &weight), ("bias", &bias)], &f);
}

#[test]
fn linear_gradients_match_finite_differences() {
    let x = Var::from_tensor(&randn(30, &[3, 5])).unwrap();
    let w = Var::from_tensor(&randn(31, &[4, 5])).unwrap();
    let b = Var::from_tensor(&randn(32, &[4])).unwrap();
    let lin = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()), Precision::F32);
    let r = randn(33, &[3, 4]);
    let f = || project(&lin.forward(x.as_tensor()).unwrap(), &r);
    check_grads("linear", &[("input", &x), ("weight", &w), ("bias", &b)], &f);
}

/// Random class-probability rows (positive, summing to 1).
fn soft_targets(seed: u64, b: usize, k: usize) -> Tensor {
    let e = randn(seed, &[b, k]).exp().unwrap();
    e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap()
}

#[test]
fn cross_entropy_gradients_match_finite_differences() {
    let logits = Var::from_tensor(&(randn(40, &[4, 5]) * 3.0).unwrap()).unwrap();
    let soft = soft_targets(41, 4, 5);
    let hard = one_hot(&[0, 3, 4, 1], 5, &cpu()).unwrap().to_dtype(DType::F64).unwrap();
    for (name, targets) in [("soft", &soft), ("one-hot", &hard)] {
        for eps in [0.0, 0.1] {
            let f = || cross_entropy(logits.as_tensor(), targets, eps).unwrap();
            check_grads(&format!("cross-entropy ({name}, ε = {eps})"), &[("logits", &logits)], &f);
            // Closed form: ∂L/∂z = (softmax(z) - t') / b.
            let g = f().backward().unwrap().get(logits.as_tensor()).unwrap().clone();
            let z = logits.as_tensor();
            let e = z.exp().unwrap();
            let sm = e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap();
            let t = ((targets * (1.0 - eps)).unwrap() + eps / 5.0).unwrap();
            let want = ((sm - t).unwrap() / 4.0).unwrap();
            assert!(common::max_abs_diff(&g, &want) < 1e-12, "cross-entropy gradient differs from (softmax - t') / b");
        }
    }
}

#[test]
fn classifier_chain_gradients_match_finite_differences() {
    // conv → batch norm (train) → ReLU → global average pool → linear → label-smoothed CE.
    let (b, cin, c, k, hw) = (3, 2, 4, 3, 5);
    let x = randn(50, &[b, cin, hw, hw]);
    let cw = Var::from_tensor(&(randn(51, &[c, cin, 3, 3]) * 0.4).unwrap()).unwrap();
    let cb = Var::from_tensor(&randn(52, &[c])).unwrap();
    let conv = Conv2d::new(cw.as_tensor().clone(), Some(cb.as_tensor().clone()), 1, 1);
    let (bn, bw, bb) = bn_random("chain", c, 53);
    let lw = Var::from_tensor(&randn(57, &[k, c])).unwrap();
    let lb = Var::from_tensor(&randn(58, &[k])).unwrap();
    let lin = Linear::new(lw.as_tensor().clone(), Some(lb.as_tensor().clone()), Precision::F32);
    let targets = one_hot(&[2, 0, 1], k, &cpu()).unwrap();
    let f = || {
        let h = conv.forward(&x).unwrap();
        let h = bn.forward(&h, true).unwrap().relu().unwrap();
        let pooled = h.mean((2, 3)).unwrap();
        cross_entropy(&lin.forward(&pooled).unwrap(), &targets, 0.1).unwrap()
    };
    check_grads(
        "chain",
        &[("conv weight", &cw), ("bn weight", &bw), ("bn bias", &bb), ("linear weight", &lw), ("linear bias", &lb)],
        &f,
    );
    // A bias before a training-mode batch norm shifts each channel by a constant that the
    // batch mean removes: its true gradient is zero, and so must both estimates be.
    let g = f().backward().unwrap().get(cb.as_tensor()).expect("a gradient reaches the conv bias").clone();
    let numeric = numeric_grad(&cb, &|| scalar(&f()));
    let an = values(&g).iter().fold(0f64, |m, v| m.max(v.abs()));
    let fd = numeric.iter().fold(0f64, |m, v| m.max(v.abs()));
    eprintln!("chain / conv bias: max |analytic| {an:.2e}, max |numeric| {fd:.2e} (both should be ~0)");
    assert!(an < 1e-10 && fd < 1e-8, "conv bias before batch norm: analytic {an}, numeric {fd}");
}

// ---------------------------------------------------------------------------------------------
// Batch norm statistics.

#[test]
fn batchnorm_running_stats_follow_pytorch() {
    let w = bn_weights("running", &[2.0, 0.5], &[1.0, -1.0], &[0.5, -1.0], &[2.0, 1.0]);
    let bn = BatchNorm2d::load(&w.pp("bn"), 2).unwrap();
    assert_eq!(bn.channels(), 2);
    // x [2, 2, 1, 2]: channel 0 holds {1, 2, 3, 6}, channel 1 holds {0, 0, 1, -1}.
    let x = t64(&[1.0, 2.0, 0.0, 0.0, 3.0, 6.0, 1.0, -1.0], &[2, 2, 1, 2]);
    // Channel 0: mean 3, Σ(x-mean)² = 14, biased var 3.5, unbiased 14/3.
    // Channel 1: mean 0, Σ(x-mean)² = 2, biased var 0.5, unbiased 2/3.
    let y = bn.forward(&x, true).unwrap();
    let eps = 1e-5;
    let y0 = |v: f64| (v - 3.0) / (3.5f64 + eps).sqrt() * 2.0 + 1.0;
    let y1 = |v: f64| v / (0.5f64 + eps).sqrt() * 0.5 - 1.0;
    let want = [y0(1.0), y0(2.0), y1(0.0), y1(0.0), y0(3.0), y0(6.0), y1(1.0), y1(-1.0)];
    for (a, b) in values(&y).iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "train output {a} vs {b}");
    }
    // running ← 0.9 running + 0.1 stat (unbiased variance).
    let (m, v) = bn.running_stats().unwrap();
    let (m1, v1) = ([0.9 * 0.5 + 0.1 * 3.0, -0.9], [0.9 * 2.0 + 0.1 * 14.0 / 3.0, 0.9 * 1.0 + 0.1 * 2.0 / 3.0]);
    assert_close(&values(&m), &m1, "running mean after one step");
    assert_close(&values(&v), &v1, "running var after one step");
    assert_close(&m1, &[0.75, -0.9], "hand arithmetic");
    assert!(!m.track_op() && !v.track_op(), "running statistics must not carry a graph");

    // A second step compounds from the updated values.
    bn.forward(&x, true).unwrap();
    let (m, v) = bn.running_stats().unwrap();
    let m2 = [0.9 * m1[0] + 0.1 * 3.0, 0.9 * m1[1]];
    let v2 = [0.9 * v1[0] + 0.1 * 14.0 / 3.0, 0.9 * v1[1] + 0.1 * 2.0 / 3.0];
    assert_close(&values(&m), &m2, "running mean after two steps");
    assert_close(&values(&v), &v2, "running var after two steps");

    // Evaluation reads the running statistics and leaves them alone.
    let y = bn.forward(&x, false).unwrap();
    let ye = |v: f64, c: usize| (v - m2[c]) / (v2[c] + eps).sqrt() * [2.0, 0.5][c] + [1.0, -1.0][c];
    let want = [ye(1.0, 0), ye(2.0, 0), ye(0.0, 1), ye(0.0, 1), ye(3.0, 0), ye(6.0, 0), ye(1.0, 1), ye(-1.0, 1)];
    assert_close(&values(&y), &want, "eval output");
    let (m3, v3) = bn.running_stats().unwrap();
    assert_close(&values(&m3), &m2, "eval must not update the running mean");
    assert_close(&values(&v3), &v2, "eval must not update the running var");
}

fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-12 * (1.0 + y.abs()), "{what}: {a:?} vs {b:?}");
    }
}

#[test]
fn batchnorm_training_forward_from_a_graph_updates_detached_stats() {
    let (bn, weight, _) = bn_random("detached", 2, 60);
    let x = Var::from_tensor(&randn(61, &[3, 2, 2, 2])).unwrap();
    let y = bn.forward(&(x.as_tensor() * 2.0).unwrap(), true).unwrap();
    let (m, v) = bn.running_stats().unwrap();
    assert!(!m.track_op() && !v.track_op(), "running statistics must not carry a graph");
    // The backward still works and reaches the input and weight.
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_some() && grads.get(weight.as_tensor()).is_some());
}

#[test]
fn batchnorm_set_running_stats_and_errors() {
    let (bn, _, _) = bn_random("errors", 3, 70);
    bn.set_running_stats(t64(&[1.0, 2.0, 3.0], &[3]), t64(&[4.0, 5.0, 6.0], &[3])).unwrap();
    let (m, v) = bn.running_stats().unwrap();
    assert_eq!(values(&m), vec![1.0, 2.0, 3.0]);
    assert_eq!(values(&v), vec![4.0, 5.0, 6.0]);
    // f32 statistics are stored in the layer's dtype.
    bn.set_running_stats(Tensor::new(&[0f32, 0., 0.], &cpu()).unwrap(), Tensor::new(&[1f32, 1., 1.], &cpu()).unwrap()).unwrap();
    assert_eq!(bn.running_stats().unwrap().0.dtype(), DType::F64);
    assert!(bn.set_running_stats(t64(&[1.0, 2.0], &[2]), t64(&[1.0, 2.0, 3.0], &[3])).is_err());
    assert!(bn.set_running_stats(t64(&[1.0, 2.0, 3.0], &[3]), t64(&[1.0; 6], &[3, 2])).is_err());

    // Wrong channel count or rank.
    assert!(bn.forward(&randn(1, &[2, 4, 2, 2]), true).is_err());
    assert!(bn.forward(&randn(1, &[2, 4, 2, 2]), false).is_err());
    assert!(bn.forward(&randn(1, &[3, 2, 2]), true).is_err());
    assert!(bn.forward(&randn(1, &[2, 3]), false).is_err());
    // One value per channel: PyTorch refuses to train on it, evaluation is fine.
    let one = randn(1, &[1, 3, 1, 1]);
    let e = bn.forward(&one, true).unwrap_err().to_string();
    assert!(e.contains("more than 1 value per channel"), "{e}");
    assert!(bn.forward(&one, false).is_ok());
    // The failed forward left the statistics as they were.
    assert_eq!(values(&bn.running_stats().unwrap().1), vec![1.0, 1.0, 1.0]);
    assert!(bn.forward(&randn(1, &[2, 3, 1, 1]), true).is_ok());

    // Loading: the wrong channel count is a typed error naming the key; so is a missing key.
    let w = bn_weights("load-errors", &[1.0, 1.0], &[0.0, 0.0], &[0.0, 0.0], &[1.0, 1.0]);
    let e = BatchNorm2d::load(&w.pp("bn"), 3).unwrap_err().to_string();
    assert!(e.contains("bn.weight"), "{e}");
    let e = BatchNorm2d::load(&w.pp("bn2"), 2).unwrap_err().to_string();
    assert!(e.contains("bn2.weight") && e.contains("missing"), "{e}");
    assert!(BatchNorm2d::load(&w.pp("bn"), 0).is_err());
}

// ---------------------------------------------------------------------------------------------
// SGD.

/// PyTorch's `torch.optim.SGD` step on plain scalars (the reference for [`Sgd`]).
fn sgd_reference(p: &mut [f64], grads: &[f64], buf: &mut Option<Vec<f64>>, q: SgdParams) {
    let mut d: Vec<f64> = grads.iter().zip(p.iter()).map(|(g, p)| g + q.weight_decay * p).collect();
    if q.momentum != 0.0 {
        let b = match buf.take() {
            None => d.clone(),
            Some(b) => b.iter().zip(&d).map(|(b, d)| q.momentum * b + (1.0 - q.dampening) * d).collect(),
        };
        d = if q.nesterov { d.iter().zip(&b).map(|(d, b)| d + q.momentum * b).collect() } else { b.clone() };
        *buf = Some(b);
    }
    for (p, d) in p.iter_mut().zip(d) {
        *p -= q.lr * d;
    }
}

#[test]
fn sgd_matches_pytorch_updates_over_three_steps() {
    let a = [1.0, 2.0, 0.5];
    let p0 = [1.0, -2.0, 3.0];
    let cases = [
        SgdParams { lr: 0.1, momentum: 0.9, ..SgdParams::with_lr(0.1) },
        SgdParams { lr: 0.1, momentum: 0.9, nesterov: true, ..SgdParams::with_lr(0.1) },
        SgdParams { lr: 0.05, momentum: 0.9, weight_decay: 0.01, ..SgdParams::with_lr(0.05) },
        SgdParams { lr: 0.05, momentum: 0.8, weight_decay: 0.1, nesterov: true, ..SgdParams::with_lr(0.05) },
        SgdParams { lr: 0.05, momentum: 0.9, dampening: 0.5, weight_decay: 0.01, ..SgdParams::with_lr(0.05) },
        SgdParams { weight_decay: 0.1, ..SgdParams::with_lr(0.2) },
    ];
    for q in cases {
        // Loss ½ Σ a p², so the gradient a ⊙ p depends on where the previous steps went.
        let var = Var::from_tensor(&t64(&p0, &[3])).unwrap();
        let at = t64(&a, &[3]);
        let mut opt = Sgd::new(vec![var.clone()], q).unwrap();
        let mut p = p0.to_vec();
        let mut buf = None;
        for step in 0..3 {
            let loss = (var.as_tensor().sqr().unwrap() * &at).unwrap().sum_all().unwrap() * 0.5;
            let g = loss.unwrap().backward().unwrap().get(var.as_tensor()).unwrap().clone();
            let grads: Vec<f64> = a.iter().zip(&p).map(|(a, p)| a * p).collect();
            assert_close(&values(&g), &grads, "gradient of ½ a p²");
            opt.step(&[Some(g)]).unwrap();
            sgd_reference(&mut p, &grads, &mut buf, q);
            assert_close(&values(var.as_tensor()), &p, &format!("{q:?} step {}", step + 1));
            let have = opt.buffers()[0].as_ref().map(values);
            assert_eq!(have.is_some(), q.momentum != 0.0, "a buffer exists exactly when momentum is on");
            if let (Some(h), Some(b)) = (have, &buf) {
                assert_close(&h, b, "momentum buffer");
            }
        }
    }
}

#[test]
fn sgd_hand_computed_values() {
    // p = 1, gradient 1 every step, lr 0.1, momentum 0.9 (written out by hand):
    // heavy ball: buf 1, 1.9, 2.71 → p 0.9, 0.71, 0.439;
    // Nesterov:  buf 1, 1.9, 2.71, g = 1 + 0.9 buf = 1.9, 2.71, 3.439 → p 0.81, 0.539, 0.1951.
    for (nesterov, want) in [(false, [0.9, 0.71, 0.439]), (true, [0.81, 0.539, 0.1951])] {
        let var = Var::from_tensor(&t64(&[1.0], &[1])).unwrap();
        let q = SgdParams { momentum: 0.9, nesterov, ..SgdParams::with_lr(0.1) };
        let mut opt = Sgd::new(vec![var.clone()], q).unwrap();
        for w in want {
            opt.step(&[Some(t64(&[1.0], &[1]))]).unwrap();
            let p = values(var.as_tensor())[0];
            assert!((p - w).abs() < 1e-12, "nesterov {nesterov}: {p} vs {w}");
        }
    }
    // Weight decay alone: g = 1 + 0.5 · p; p = 2 → 2 - 0.1 · 2 = 1.8 → 1.8 - 0.1 · 1.9 = 1.61.
    let var = Var::from_tensor(&t64(&[2.0], &[1])).unwrap();
    let mut opt = Sgd::new(vec![var.clone()], SgdParams { weight_decay: 0.5, ..SgdParams::with_lr(0.1) }).unwrap();
    for w in [1.8, 1.61] {
        opt.step(&[Some(t64(&[1.0], &[1]))]).unwrap();
        assert!((values(var.as_tensor())[0] - w).abs() < 1e-12);
    }
}

#[test]
fn sgd_skips_missing_gradients_and_checks_its_input() {
    let q = SgdParams { momentum: 0.9, weight_decay: 0.1, ..SgdParams::with_lr(0.1) };
    let a = Var::from_tensor(&t64(&[1.0, 2.0], &[2])).unwrap();
    let b = Var::from_tensor(&t64(&[3.0], &[1])).unwrap();
    let mut opt = Sgd::new(vec![a.clone(), b.clone()], q).unwrap();
    opt.step(&[Some(t64(&[1.0, 1.0], &[2])), None]).unwrap();
    // No gradient: no weight decay, no buffer — the parameter is untouched.
    assert_eq!(values(b.as_tensor()), vec![3.0]);
    assert!(opt.buffers()[0].is_some() && opt.buffers()[1].is_none());
    // Its first real gradient then starts its buffer as a first step would.
    opt.step(&[None, Some(t64(&[1.0], &[1]))]).unwrap();
    let mut p = vec![3.0];
    sgd_reference(&mut p, &[1.0], &mut None, q);
    assert_close(&values(b.as_tensor()), &p, "first step of b");

    assert!(opt.step(&[None]).is_err(), "too few gradients");
    assert!(opt.step(&[None, None, None]).is_err(), "too many gradients");
    let before = values(a.as_tensor());
    assert!(opt.step(&[Some(t64(&[1.0, 1.0], &[2])), Some(t64(&[1.0, 1.0], &[2]))]).is_err(), "wrong shape");
    assert_eq!(values(a.as_tensor()), before, "a rejected step must change nothing");
    opt.set_lr(f64::NAN);
    assert!(opt.step(&[None, None]).is_err(), "invalid learning rate");
    opt.set_lr(0.05);
    assert_eq!(opt.lr(), 0.05);

    assert!(Sgd::new(vec![], SgdParams { nesterov: true, ..SgdParams::with_lr(0.1) }).is_err(), "Nesterov without momentum");
    assert!(Sgd::new(vec![], SgdParams { nesterov: true, momentum: 0.9, dampening: 0.1, ..SgdParams::with_lr(0.1) }).is_err());
    assert!(Sgd::new(vec![], SgdParams::with_lr(-1.0)).is_err());
    assert!(Sgd::new(vec![], SgdParams { weight_decay: -0.1, ..SgdParams::with_lr(0.1) }).is_err());
}

#[test]
fn sgd_restored_buffers_continue_the_run() {
    let q = SgdParams { momentum: 0.9, nesterov: true, weight_decay: 0.01, ..SgdParams::with_lr(0.1) };
    let grads = [t64(&[0.3, -0.2], &[2]), t64(&[0.1, 0.5], &[2]), t64(&[-0.4, 0.2], &[2])];
    let full = Var::from_tensor(&t64(&[1.0, -1.0], &[2])).unwrap();
    let mut opt = Sgd::new(vec![full.clone()], q).unwrap();
    for g in &grads[..2] {
        opt.step(&[Some(g.clone())]).unwrap();
    }
    let saved_p = full.as_tensor().copy().unwrap();
    let saved = opt.buffers().to_vec();
    opt.step(&[Some(grads[2].clone())]).unwrap();

    let resumed = Var::from_tensor(&saved_p).unwrap();
    let mut opt2 = Sgd::new(vec![resumed.clone()], q).unwrap();
    assert!(opt2.restore(vec![]).is_err());
    assert!(opt2.restore(vec![Some(t64(&[1.0; 3], &[3]))]).is_err());
    opt2.restore(saved).unwrap();
    opt2.step(&[Some(grads[2].clone())]).unwrap();
    assert_eq!(values(resumed.as_tensor()), values(full.as_tensor()), "resumed run must continue bit for bit");
}

// ---------------------------------------------------------------------------------------------
// Learning-rate schedule.

#[test]
fn cosine_schedule_values() {
    let (base, min) = (1.0, 0.1);
    let lr = |s: usize| cosine_with_warmup(s, 100, 10, base, min);
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    // Warm-up: (step + 1) / warmup of the base rate.
    assert!(close(lr(0), 0.1));
    assert!(close(lr(4), 0.5));
    assert!(close(lr(9), 1.0));
    // Cosine: starts at the base, halfway down at the midpoint of the decay, near min at the end.
    assert!(close(lr(10), 1.0));
    assert!(close(lr(55), min + (base - min) * 0.5), "midpoint {}", lr(55));
    let end = min + (base - min) * 0.5 * (1.0 + (std::f64::consts::PI * 89.0 / 90.0).cos());
    assert!(close(lr(99), end) && lr(99) > min && lr(99) - min < 1e-3, "last step {}", lr(99));
    assert!(close(lr(100), min) && close(lr(1000), min), "past the end: min_lr");
    for s in 10..99 {
        assert!(lr(s + 1) < lr(s), "the decay must fall monotonically (step {s})");
    }
    // Edge cases.
    assert!(close(cosine_with_warmup(0, 100, 0, base, min), base), "no warm-up starts at the base rate");
    assert!(close(cosine_with_warmup(50, 100, 0, base, min), 0.55));
    assert!(close(cosine_with_warmup(0, 0, 0, base, min), min), "an empty run");
    assert!(close(cosine_with_warmup(5, 10, 20, base, min), 0.3), "warm-up longer than the run");
    assert!(close(cosine_with_warmup(3, 10, 5, 0.5, 0.0), 0.4));
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy, one-hot, accuracy.

#[test]
fn cross_entropy_hand_computed_values() {
    // logits [1, 2, 3]: log Σ exp = 3 + log(1 + e⁻¹ + e⁻²) = 3.40760596444438.
    // class 2: 0.40760596444438; ε = 0.1 (t' = [1/30, 1/30, 28/30], Σ t' z = 2.9): 0.50760596444438;
    // soft [0.25, 0.25, 0.5] (Σ t z = 2.25): 1.15760596444438.
    let logits = t64(&[1.0, 2.0, 3.0], &[1, 3]);
    let hard = t64(&[0.0, 0.0, 1.0], &[1, 3]);
    let soft = t64(&[0.25, 0.25, 0.5], &[1, 3]);
    let ce = |l: &Tensor, t: &Tensor, e: f64| scalar(&cross_entropy(l, t, e).unwrap());
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(close(ce(&logits, &hard, 0.0), 0.40760596444438013));
    assert!(close(ce(&logits, &hard, 0.1), 0.5076059644443802));
    assert!(close(ce(&logits, &soft, 0.0), 1.1576059644443801));
    // Soft targets with smoothing: t' = 0.9 [0.25, 0.25, 0.5] + 0.1/3, Σ t' z = 0.9·2.25 + 0.2.
    assert!(close(ce(&logits, &soft, 0.1), 3.40760596444438 - (0.9 * 2.25 + 0.2)));
    // A batch averages its rows: row 2 = logits [0.5, -1, 0], class 0: log(e^.5 + e^-1 + 1) - 0.5.
    let batch = t64(&[1.0, 2.0, 3.0, 0.5, -1.0, 0.0], &[2, 3]);
    let t = one_hot(&[2, 0], 3, &cpu()).unwrap();
    assert!(close(ce(&batch, &t, 0.0), (0.40760596444438013 + 0.6041306053367284) / 2.0));
    // Shift invariance with large logits (the max subtraction keeps exp finite).
    let big = (&logits + 1000.0).unwrap();
    assert!(close(ce(&big, &hard, 0.0), 0.40760596444438013));
    // f32 logits give an f32 loss of the same value.
    let l32 = cross_entropy(&logits.to_dtype(DType::F32).unwrap(), &hard, 0.0).unwrap();
    assert_eq!(l32.dtype(), DType::F32);
    assert!((scalar(&l32) - 0.40760596444438013).abs() < 1e-6);

    assert!(cross_entropy(&logits, &t64(&[0.0, 1.0], &[1, 2]), 0.0).is_err(), "shape mismatch");
    assert!(cross_entropy(&t64(&[1.0, 2.0, 3.0], &[3]), &t64(&[0.0, 0.0, 1.0], &[3]), 0.0).is_err(), "rank 1");
    assert!(cross_entropy(&logits, &hard, 1.5).is_err(), "smoothing above 1");
    assert!(cross_entropy(&logits, &hard, -0.1).is_err(), "negative smoothing");
    let empty = Tensor::zeros((0, 3), DType::F64, &cpu()).unwrap();
    assert!(cross_entropy(&empty, &empty, 0.0).is_err(), "empty batch");
}

#[test]
fn one_hot_and_accuracy() {
    let t = one_hot(&[1, 0, 2], 3, &cpu()).unwrap();
    assert_eq!(t.dims(), &[3, 3]);
    assert_eq!(t.to_vec2::<f32>().unwrap(), vec![vec![0., 1., 0.], vec![1., 0., 0.], vec![0., 0., 1.]]);
    assert!(one_hot(&[3], 3, &cpu()).is_err());
    assert!(one_hot(&[0], 0, &cpu()).is_err());
    assert_eq!(one_hot(&[], 4, &cpu()).unwrap().dims(), &[0, 4]);

    let logits = Tensor::new(&[[0.1f32, 0.9, 0.0], [2.0, 1.0, 3.0], [0.5, 0.5, 0.1], [-1.0, -1.0, -1.0]], &cpu()).unwrap();
    assert_eq!(accuracy(&logits, &[1, 2, 0, 0]).unwrap(), 4);
    assert_eq!(accuracy(&logits, &[1, 0, 0, 0]).unwrap(), 3);
    // Ties go to the lowest index: row 2 predicts 0, not 1; row 3 predicts 0.
    assert_eq!(accuracy(&logits, &[1, 2, 1, 2]).unwrap(), 2);
    assert!(accuracy(&logits, &[1, 2, 0]).is_err(), "label count");
    assert!(accuracy(&logits, &[1, 2, 0, 3]).is_err(), "label out of range");
    assert!(accuracy(&t64(&[1.0, 2.0], &[2]), &[0, 1]).is_err(), "rank 1");
    let nan = Tensor::new(&[[0.0f32, f32::NAN]], &cpu()).unwrap();
    assert!(accuracy(&nan, &[0]).is_err(), "NaN logits");
}
