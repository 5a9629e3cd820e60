//! The training path's fused ops with hand-written backward passes (attention, convolutions,
//! batch norm) against the same functions composed of candle ops, whose backward candle
//! derives itself: values and gradients must agree to f32 precision.
use candle_core::{DType, Device, Tensor, Var};
use diffii::rng::seeded_randn;
use diffii::nn::Conv2d;
use diffii::nn::{attention_grad, frozen};

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    seeded_randn(seed, shape, &Device::Cpu).unwrap()
}

/// Max |a - b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let m = b.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    d / m.max(1e-30)
}

fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Tensor {
    let (b, n, inner) = q.dims3().unwrap();
    let m = k.dim(1).unwrap();
    let d = inner / heads;
    let split = |t: &Tensor, len: usize| t.reshape((b, len, heads, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let mut s = (split(q, n).matmul(&split(k, m).t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    if let Some(mask) = mask {
        s = s.broadcast_add(mask).unwrap();
    }
    let p = candle_nn::ops::softmax(&s, candle_core::D::Minus1).unwrap();
    p.matmul(&split(v, m)).unwrap().transpose(1, 2).unwrap().reshape((b, n, inner)).unwrap()
}

#[test]
fn fused_attention_gradients_match_composed_attention() {
    let (b, n, m, heads, d) = (2, 37, 19, 4, 8);
    let causal: Vec<f32> = (0..n).flat_map(|i| (0..n).map(move |j| if j > i { f32::MIN } else { 0.0 })).collect();
    let causal = Tensor::from_vec(causal, (n, n), &Device::Cpu).unwrap();
    for (case, self_attn) in [("cross", false), ("causal self", true)] {
        let kv_len = if self_attn { n } else { m };
        let mask = self_attn.then_some(&causal);
        let q = Var::from_tensor(&randn(1, &[b, n, heads * d])).unwrap();
        let k = Var::from_tensor(&randn(2, &[b, kv_len, heads * d])).unwrap();
        let v = Var::from_tensor(&randn(3, &[b, kv_len, heads * d])).unwrap();
        let r = randn(4, &[b, n, heads * d]);
        let fused = attention_grad::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, mask).unwrap();
        let reference = composed_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, mask);
        let e = rel(&fused, &reference);
        assert!(e < 1e-5, "{case}: values differ by {e}");
        let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let e = rel(gf.get(var.as_tensor()).unwrap(), gr.get(var.as_tensor()).unwrap());
            eprintln!("{case} attention d{name}: relative error {e:.2e}");
            assert!(e < 1e-4, "{case} d{name}: {e}");
        }
    }
}

/// The fused attention's backward formulas (see `nn::attention_grad`) as candle's ops over the
/// whole batch at once.
fn attention_grads_whole_batch(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, heads: usize, mask: Option<&Tensor>) -> [Tensor; 3] {
    let (b, n, inner) = q.dims3().unwrap();
    let m = k.dim(1).unwrap();
    let d = inner / heads;
    let scale = 1.0 / (d as f64).sqrt();
    let split = |t: &Tensor, len: usize| t.reshape((b, len, heads, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let merge = |t: Tensor, len: usize| t.transpose(1, 2).unwrap().contiguous().unwrap().reshape((b, len, inner)).unwrap();
    let (qh, kh, vh, gh) = (split(q, n), split(k, m), split(v, m), split(g, n));
    let mut s = (qh.matmul(&kh.t().unwrap()).unwrap() * scale).unwrap();
    if let Some(mask) = mask {
        s = s.broadcast_add(mask).unwrap();
    }
    let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
    let dv = p.t().unwrap().matmul(&gh).unwrap();
    let dp = gh.matmul(&vh.t().unwrap()).unwrap();
    let row = (&dp * &p).unwrap().sum_keepdim(candle_core::D::Minus1).unwrap();
    let ds = (p * dp.broadcast_sub(&row).unwrap()).unwrap();
    let dq = (ds.matmul(&kh).unwrap() * scale).unwrap();
    let dk = (ds.t().unwrap().matmul(&qh).unwrap() * scale).unwrap();
    [merge(dq, n), merge(dk, m), merge(dv, m)]
}

#[test]
fn fused_attention_backward_per_item_has_the_bits_of_the_whole_batch() {
    // The backward runs one batch item per task and one product per head through gemm; every
    // op treats items apart, so the gradients must be those of candle's ops over the whole
    // batch, to the bit. (b, n, cross-attention keys, heads, d): the demo UNet's attention at
    // both levels (8 heads of 8 and of 16 channels over 64 and 16 tokens, 16 text tokens),
    // SD-like heads over 77 text tokens, odd sizes, and one head of one item (fewer tasks than
    // threads: gemm splits the products).
    for (i, &(b, n, m, heads, d)) in [(5, 21, 16, 4, 8), (3, 64, 16, 8, 8), (2, 16, 16, 8, 16), (2, 300, 77, 2, 40), (1, 37, 23, 3, 5), (1, 200, 77, 1, 40)].iter().enumerate() {
        let causal: Vec<f32> = (0..n).flat_map(|i| (0..n).map(move |j| if j > i { f32::MIN } else { 0.0 })).collect();
        let causal = Tensor::from_vec(causal, (n, n), &Device::Cpu).unwrap();
        for self_attn in [false, true] {
            let kv_len = if self_attn { n } else { m };
            let mask = (self_attn && i % 2 == 0).then_some(&causal);
            let seed = 60 + 10 * i as u64;
            let q = Var::from_tensor(&randn(seed, &[b, n, heads * d])).unwrap();
            let k = Var::from_tensor(&randn(seed + 1, &[b, kv_len, heads * d])).unwrap();
            let v = Var::from_tensor(&randn(seed + 2, &[b, kv_len, heads * d])).unwrap();
            let r = (randn(seed + 3, &[b, n, heads * d]).exp().unwrap() * 100.0).unwrap();
            let fused = attention_grad::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, mask).unwrap();
            let grads = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let want = attention_grads_whole_batch(q.as_tensor(), k.as_tensor(), v.as_tensor(), &r, heads, mask);
            for ((name, var), want) in [("q", &q), ("k", &k), ("v", &v)].into_iter().zip(&want) {
                assert_same_bits(grads.get(var.as_tensor()).unwrap(), want, &format!("case {i}, self {self_attn}, mask {}: d{name}", mask.is_some()));
            }
        }
    }
}

#[test]
fn frozen_conv_input_gradient_matches_candle_conv() {
    // (k, stride, padding) as in the UNet / VAE: 3x3 same, 3x3 stride-2 downsample, 1x1
    // shortcut, and a stride-2 conv without padding on odd sizes (dropped rows).
    for (i, (k, s, p)) in [(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 2, 0)].into_iter().enumerate() {
        let (cin, cout) = (6, 5);
        let conv = Conv2d::new((randn(10 + i as u64, &[cout, cin, k, k]) * 0.3).unwrap(), Some(randn(20 + i as u64, &[cout])), s, p);
        let x = Var::from_tensor(&randn(30 + i as u64, &[2, cin, 9, 11])).unwrap();
        let (w, b) = (&conv.weight, conv.bias.as_ref());
        assert!(frozen::use_frozen_conv(x.as_tensor(), w, b, s, p), "case {i} should take the frozen path");
        let parts = frozen::ConvParts { weight: w.clone(), bias: b.cloned(), stride: s, padding: p, packed: None, grad_kernel: Default::default() };
        let y = frozen::conv2d_frozen(x.as_tensor(), parts).unwrap();
        let reference = x
            .as_tensor()
            .conv2d(&conv.weight, p, s, 1, 1)
            .unwrap()
            .broadcast_add(&conv.bias.as_ref().unwrap().reshape((1, cout, 1, 1)).unwrap())
            .unwrap();
        let e = rel(&y, &reference);
        assert!(e < 1e-5, "k{k} s{s} p{p}: values differ by {e}");
        let r = randn(40 + i as u64, reference.dims());
        let gf = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let e = rel(gf.get(x.as_tensor()).unwrap(), gr.get(x.as_tensor()).unwrap());
        eprintln!("conv k{k} s{s} p{p}: dx relative error {e:.2e}");
        assert!(e < 1e-5, "k{k} s{s} p{p}: dx {e}");
    }
}

#[test]
fn trainable_conv_matches_candle_conv_values_and_both_gradients() {
    // Both forwards (per-tap products and the unfolded input), with stride-1 same-width cases
    // (k = 3, p = 1; k = 5, p = 2) that take the unfolding's row-shift path.
    let cases = [
        (2, 3, 5, 7, 9, 3, 1, 1),
        (1, 4, 3, 8, 8, 3, 2, 1),
        (3, 2, 4, 5, 6, 1, 1, 0),
        (2, 3, 2, 9, 7, 3, 2, 0),
        (1, 5, 6, 6, 6, 1, 2, 0),
        (2, 3, 4, 6, 11, 5, 1, 2),
        (1, 2, 3, 2, 3, 3, 1, 1),
        (2, 16, 8, 8, 8, 3, 1, 1),
    ];
    for (i, (&(b, cin, cout, h, w, k, stride, pad), unfold)) in cases.iter().flat_map(|c| [(c, false), (c, true)]).enumerate() {
        let x = Var::from_tensor(&randn(40 + i as u64, &[b, cin, h, w])).unwrap();
        let wt = Var::from_tensor(&(randn(50 + i as u64, &[cout, cin, k, k]) * 0.3).unwrap()).unwrap();
        assert!(frozen::use_trainable_conv(x.as_tensor(), wt.as_tensor(), stride, pad));
        let ours = frozen::conv2d_trainable(x.as_tensor(), wt.as_tensor(), None, stride, pad, unfold).unwrap();
        let theirs = x.as_tensor().conv2d(wt.as_tensor(), pad, stride, 1, 1).unwrap();
        assert!(rel(&ours, &theirs) < 1e-5, "case {i}: forward {}", rel(&ours, &theirs));
        if unfold {
            // The inference op and the trainable op's forward are the same product.
            let inference = frozen::conv2d_unfolded(&x.as_tensor().detach(), &wt.as_tensor().detach(), stride, pad).unwrap();
            assert_eq!(inference.flatten_all().unwrap().to_vec1::<f32>().unwrap(), ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "case {i}");
        }
        // A loss that weights every output differently, so every gradient entry is tested.
        let weights = randn(60 + i as u64, ours.dims());
        let g_ours = (&ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (&theirs * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        for (what, v) in [("input", &x), ("weight", &wt)] {
            let (a, e) = (g_ours.get(v.as_tensor()).unwrap(), g_theirs.get(v.as_tensor()).unwrap());
            assert!(rel(a, e) < 1e-4, "case {i}: {what} gradient {}", rel(a, e));
        }
    }
}

#[test]
fn a_trainable_convs_bias_has_the_bits_of_a_separate_per_channel_add() {
    for (i, (stride, unfold)) in [(1, false), (1, true), (2, false)].into_iter().enumerate() {
        let x = Var::from_tensor(&randn(70 + i as u64, &[2, 5, 9, 7])).unwrap();
        let wt = Var::from_tensor(&(randn(71 + i as u64, &[6, 5, 3, 3]) * 0.3).unwrap()).unwrap();
        let b = Var::from_tensor(&randn(72 + i as u64, &[6])).unwrap();
        let ours = frozen::conv2d_trainable(x.as_tensor(), wt.as_tensor(), Some(b.as_tensor()), stride, 1, unfold).unwrap();
        let conv = frozen::conv2d_trainable(x.as_tensor(), wt.as_tensor(), None, stride, 1, unfold).unwrap();
        let theirs = diffii::nn::channel::add(&conv, b.as_tensor(), 1).unwrap();
        let r = randn(73 + i as u64, ours.dims());
        assert_same_bits_forward_and_backward(&ours, &theirs, &r, &[("x", &x), ("weight", &wt), ("bias", &b)], &format!("case {i}"));
    }
}

#[test]
fn trainable_nearest_upsampling_has_the_bits_of_candles_forward_and_backward() {
    // Maps past candle's 512-pixel tiles of its backward convolution, odd sizes, scale 4.
    for (i, (dims, s)) in [([2, 3, 5, 7], 2), ([1, 4, 3, 3], 4), ([2, 16, 24, 20], 2)].into_iter().enumerate() {
        let x = Var::from_tensor(&randn(80 + i as u64, &dims)).unwrap();
        let (th, tw) = (dims[2] * s, dims[3] * s);
        let ours = diffii::nn::conv::upsample_nearest(x.as_tensor(), th, tw).unwrap();
        let theirs = x.as_tensor().upsample_nearest2d(th, tw).unwrap();
        let r = (randn(90 + i as u64, ours.dims()) * 1e3).unwrap();
        assert_same_bits_forward_and_backward(&ours, &theirs, &r, &[("x", &x)], &format!("case {i}"));
    }
}

#[test]
fn fused_batch_norm_training_matches_the_composed_path() {
    use diffii::nn::BatchNorm2d;
    let (n, c, h, w) = (3, 5, 4, 3);
    let x32 = randn(70, &[n, c, h, w]).affine(2.0, 0.5).unwrap();
    let gamma32 = randn(71, &[c]).affine(0.5, 1.0).unwrap();
    let beta32 = randn(72, &[c]);
    let make = |dt: DType| {
        let (x, g, b) = (Var::from_tensor(&x32.to_dtype(dt).unwrap()).unwrap(), Var::from_tensor(&gamma32.to_dtype(dt).unwrap()).unwrap(), Var::from_tensor(&beta32.to_dtype(dt).unwrap()).unwrap());
        let bn = BatchNorm2d::new(g.as_tensor().clone(), b.as_tensor().clone(), Tensor::zeros(c, dt, &Device::Cpu).unwrap(), Tensor::ones(c, dt, &Device::Cpu).unwrap()).unwrap();
        (x, g, b, bn)
    };
    // f32 takes the fused op; f64 the composed candle ops (the reference); with and without
    // the ReLU fused into the norm (about half the outputs are cut by it).
    for relu in [false, true] {
    let (x, g, b, bn) = make(DType::F32);
    let (xr, gr, br, bnr) = make(DType::F64);
    let weights = randn(73, &[n, c, h, w]);
    let (y, yr) = if relu {
        (bn.forward_relu(x.as_tensor(), true).unwrap(), bnr.forward_relu(xr.as_tensor(), true).unwrap())
    } else {
        (bn.forward(x.as_tensor(), true).unwrap(), bnr.forward(xr.as_tensor(), true).unwrap())
    };
    assert!(rel(&y, &yr.to_dtype(DType::F32).unwrap()) < 1e-5, "forward {}", rel(&y, &yr.to_dtype(DType::F32).unwrap()));
    let grads = (&y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    let grads_r = (&yr * &weights.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    for (what, v, vr) in [("input", &x, &xr), ("gamma", &g, &gr), ("beta", &b, &br)] {
        let (a, e) = (grads.get(v.as_tensor()).unwrap(), grads_r.get(vr.as_tensor()).unwrap().to_dtype(DType::F32).unwrap());
        assert!(rel(a, &e) < 1e-5, "{what} gradient {}", rel(a, &e));
    }
    let ((m, v), (mr, vr)) = (bn.running_stats().unwrap(), bnr.running_stats().unwrap());
    assert!(rel(&m, &mr.to_dtype(DType::F32).unwrap()) < 1e-6 && rel(&v, &vr.to_dtype(DType::F32).unwrap()) < 1e-6, "running statistics");
    // Evaluation mode: the fused scale-shift(-ReLU) pass against the f64 broadcast ops.
    let (e, er) = if relu {
        (bn.forward_relu(&x.as_tensor().detach(), false).unwrap(), bnr.forward_relu(&xr.as_tensor().detach(), false).unwrap())
    } else {
        (bn.forward(&x.as_tensor().detach(), false).unwrap(), bnr.forward(&xr.as_tensor().detach(), false).unwrap())
    };
    assert!(rel(&e, &er.to_dtype(DType::F32).unwrap()) < 1e-6, "relu {relu}: evaluation {}", rel(&e, &er.to_dtype(DType::F32).unwrap()));
    }
}

#[test]
fn fused_add_relu_matches_candle_ops_values_and_gradients() {
    let a = Var::from_tensor(&randn(80, &[2, 3, 5, 7])).unwrap();
    let b = Var::from_tensor(&randn(81, &[2, 3, 5, 7])).unwrap();
    let weights = randn(82, &[2, 3, 5, 7]);
    let ours = diffii::nn::activation::add_relu(a.as_tensor(), b.as_tensor()).unwrap();
    let theirs = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
    assert_eq!(ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(), theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let g = (&ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    // The reference gradient: the weights where a + b > 0 (no sum is exactly 0 here).
    let mask = (a.as_tensor() + b.as_tensor()).unwrap().gt(0.0).unwrap().to_dtype(DType::F32).unwrap();
    let expected = (&weights * &mask).unwrap();
    for v in [&a, &b] {
        assert_eq!(g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
}

#[test]
fn trainable_geglu_has_the_bits_of_candles_composition_forward_and_backward() {
    // Random rows (odd inner, a row count that crosses the op's task chunks) and a row of
    // special gates and values: zeros of both signs, saturating and tiny gates, huge values.
    let special: Vec<f32> = vec![0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0, 6.0, -6.0, 12.0, -12.0, 40.0, -40.0, 1e20, -1e20];
    let n = special.len();
    let values: Vec<f32> = (0..n).map(|i| [1.0f32, -0.0, 2.5e30, -1.5][i % 4]).collect();
    let cases = [
        randn(90, &[3, 1030, 2 * 37]),
        Tensor::from_vec(values.into_iter().chain(special.iter().copied()).collect::<Vec<_>>(), (1, 2 * n), &Device::Cpu).unwrap(),
    ];
    for (i, h) in cases.iter().enumerate() {
        let h = Var::from_tensor(h).unwrap();
        let out_dims = {
            let mut d = h.dims().to_vec();
            *d.last_mut().unwrap() /= 2;
            d
        };
        // The special row's output gradient alternates -1, +1, so a gate of +0.0 (first) and of
        // -0.0 (second) each make a -0.0 product: the stored gradient must still match.
        let weights = if i == 0 {
            randn(91, &out_dims)
        } else {
            Tensor::from_vec((0..n).map(|j| if j % 2 == 0 { -1f32 } else { 1.0 }).collect::<Vec<_>>(), out_dims.as_slice(), &Device::Cpu).unwrap()
        };
        let ours = diffii::nn::activation::geglu_trainable(h.as_tensor()).unwrap();
        let theirs = diffii::nn::activation::geglu_composed(h.as_tensor()).unwrap();
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&ours), bits(&theirs), "case {i}: forward bits differ");
        let go = (&ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = (&theirs * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (bits(go.get(h.as_tensor()).unwrap()), bits(gt.get(h.as_tensor()).unwrap()));
        if let Some(j) = a.iter().zip(&b).position(|(p, q)| p != q) {
            panic!("case {i}: gradient bits differ at {j}: {} vs {}", f32::from_bits(a[j]), f32::from_bits(b[j]));
        }
    }
}

/// Panics at the first element where `ours` and `theirs` differ in bits.
fn assert_same_bits(ours: &Tensor, theirs: &Tensor, what: &str) {
    assert_eq!(ours.dims(), theirs.dims(), "{what}: shapes differ");
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<u32>>();
    let (a, b) = (bits(ours), bits(theirs));
    if let Some(j) = a.iter().zip(&b).position(|(p, q)| p != q) {
        panic!("{what}: bits differ at {j}: {} vs {}", f32::from_bits(a[j]), f32::from_bits(b[j]));
    }
}

/// `ours` and `theirs` (the same function of `vars`) agree to the bit, and so do the gradients
/// of `sum(out * weights)` with respect to every variable.
fn assert_same_bits_forward_and_backward(ours: &Tensor, theirs: &Tensor, weights: &Tensor, vars: &[(&str, &Var)], case: &str) {
    assert_same_bits(ours, theirs, &format!("{case}: forward"));
    let go = (ours * weights).unwrap().sum_all().unwrap().backward().unwrap();
    let gt = (theirs * weights).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in vars {
        assert_same_bits(go.get(v.as_tensor()).unwrap(), gt.get(v.as_tensor()).unwrap(), &format!("{case}: d{name}"));
    }
}

#[test]
fn per_channel_bias_and_scale_have_the_bits_of_candles_broadcasts_forward_and_backward() {
    // NCHW with the parameter on the channel dim (a conv bias, a group norm's scale and shift),
    // and token matrices with it on the last dim (a linear bias, a layer norm's): candle's
    // backward sums these with its strided reduction; the custom ops must give its bits.
    for (i, (dims, axis)) in [(vec![3, 37, 5, 7], 1), (vec![2, 17, 300], 2), (vec![40, 33], 1), (vec![2, 16, 1, 1], 1)].into_iter().enumerate() {
        let seed = 100 + 10 * i as u64;
        let x = Var::from_tensor(&randn(seed, &dims)).unwrap();
        let w = Var::from_tensor(&randn(seed + 1, &[dims[axis]])).unwrap();
        let b = Var::from_tensor(&randn(seed + 2, &[dims[axis]])).unwrap();
        // Gradients over many magnitudes, so a changed summation order changes the bits.
        let r = (randn(seed + 3, &dims).exp().unwrap() * 1000.0).unwrap();
        let ours = diffii::nn::channel::add(&diffii::nn::channel::mul(x.as_tensor(), w.as_tensor(), axis).unwrap(), b.as_tensor(), axis).unwrap();
        let mut shape = vec![1; dims.len()];
        shape[axis] = dims[axis];
        let (ws, bs) = (w.as_tensor().reshape(shape.as_slice()).unwrap(), b.as_tensor().reshape(shape.as_slice()).unwrap());
        let theirs = x.as_tensor().broadcast_mul(&ws).unwrap().broadcast_add(&bs).unwrap();
        let vars = [("x", &x), ("scale", &w), ("bias", &b)];
        assert_same_bits_forward_and_backward(&ours, &theirs, &r, &vars, &format!("case {i}"));
        // Scale and shift as one op (a norm's affine).
        let affine = diffii::nn::channel::affine(x.as_tensor(), w.as_tensor(), b.as_tensor(), axis).unwrap();
        assert_same_bits_forward_and_backward(&affine, &theirs, &r, &vars, &format!("case {i}, affine"));
    }
}

#[test]
fn a_trainable_linear_layer_has_the_bits_of_candles_per_item_products_forward_and_backward() {
    // Batches of token rows (one product per item; enough items that the order in which the
    // weight's per-item gradients are added shows in the bits) and a 2-D batch (every row an
    // item), with and without a bias. The later cases sit on the edges of the shapes where the
    // items' products may run as one (`merged_rows_keep_bits`): 256 outputs per item, a depth
    // of 512 and of 513 (gemm's small products split that depth in two blocks, its large ones
    // do not), a depth of 2, two rows per item, items longer than 512 rows, and a weight
    // gradient of at most 256 entries (summed by the direct kernel, item by item).
    let cases = [
        (vec![9, 13, 24], 20, true),
        (vec![5, 64, 32], 48, false),
        (vec![7, 40], 24, true),
        (vec![4, 16, 512], 16, false),
        (vec![3, 20, 513], 600, true),
        (vec![4, 20, 513], 24, false),
        (vec![6, 2, 30], 200, true),
        (vec![5, 7, 2], 64, false),
        (vec![3, 600, 8], 9, false),
        (vec![5, 10, 12], 16, true),
    ];
    for (i, (dims, out, bias)) in cases.into_iter().enumerate() {
        let seed = 200 + 10 * i as u64;
        let in_dim = *dims.last().unwrap();
        let x = Var::from_tensor(&randn(seed, &dims)).unwrap();
        let w = Var::from_tensor(&(randn(seed + 1, &[out, in_dim]) * 0.2).unwrap()).unwrap();
        let b = Var::from_tensor(&randn(seed + 2, &[out])).unwrap();
        let layer = diffii::nn::Linear::new(w.as_tensor().clone(), bias.then(|| b.as_tensor().clone()), diffii::nn::Precision::F32);
        let ours = layer.forward(x.as_tensor()).unwrap();
        // The composition the layer used before: per item, a narrow and candle's matmul.
        let rows = x.elem_count() / in_dim;
        let items = if dims.len() >= 3 { dims[0] } else { rows };
        let x2 = x.as_tensor().reshape((rows, in_dim)).unwrap();
        let wt = w.as_tensor().t().unwrap();
        let parts: Vec<Tensor> = (0..items).map(|j| x2.narrow(0, j * (rows / items), rows / items).unwrap().matmul(&wt).unwrap()).collect();
        let mut out_dims = dims.clone();
        *out_dims.last_mut().unwrap() = out;
        let mut theirs = Tensor::cat(&parts, 0).unwrap().reshape(out_dims.as_slice()).unwrap();
        let mut vars = vec![("x", &x), ("weight", &w)];
        if bias {
            theirs = theirs.broadcast_add(b.as_tensor()).unwrap();
            vars.push(("bias", &b));
        }
        let r = (randn(seed + 3, &out_dims).exp().unwrap() * 100.0).unwrap();
        assert_same_bits_forward_and_backward(&ours, &theirs, &r, &vars, &format!("case {i}"));
    }
}

#[test]
fn a_frozen_linear_layer_under_a_tracked_input_has_the_bits_of_candles_per_item_products() {
    // Textual inversion's case: the weight is a plain tensor, only the input's gradient exists.
    let (items, per, in_dim, out) = (6, 11, 40, 24);
    let x = Var::from_tensor(&randn(250, &[items, per, in_dim])).unwrap();
    let w = (randn(251, &[out, in_dim]) * 0.2).unwrap();
    let b = randn(252, &[out]);
    let layer = diffii::nn::Linear::new(w.clone(), Some(b.clone()), diffii::nn::Precision::F32);
    let ours = layer.forward(x.as_tensor()).unwrap();
    let x2 = x.as_tensor().reshape((items * per, in_dim)).unwrap();
    let parts: Vec<Tensor> = (0..items).map(|j| x2.narrow(0, j * per, per).unwrap().matmul(&w.t().unwrap()).unwrap()).collect();
    let theirs = Tensor::cat(&parts, 0).unwrap().reshape((items, per, out)).unwrap().broadcast_add(&b).unwrap();
    let r = (randn(253, &[items, per, out]).exp().unwrap() * 100.0).unwrap();
    assert_same_bits_forward_and_backward(&ours, &theirs, &r, &[("x", &x)], "frozen");
}

#[test]
fn a_trained_lora_adapter_has_the_bits_of_candles_per_item_products_forward_and_backward() {
    let (items, per, in_dim, out, rank) = (7, 13, 24, 20, 4);
    let x = Var::from_tensor(&randn(300, &[items, per, in_dim])).unwrap();
    let down = Var::from_tensor(&randn(301, &[rank, in_dim])).unwrap();
    let up = Var::from_tensor(&randn(302, &[out, rank])).unwrap();
    let adapter = diffii::nn::Adapter { down: down.as_tensor().clone(), up: up.as_tensor().clone(), scale: 0.5 };
    let ours = adapter.forward(x.as_tensor()).unwrap();
    let x2 = x.as_tensor().reshape((items * per, in_dim)).unwrap();
    let (dt, ut) = (down.as_tensor().t().unwrap(), up.as_tensor().t().unwrap());
    let parts: Vec<Tensor> = (0..items).map(|j| x2.narrow(0, j * per, per).unwrap().matmul(&dt).unwrap().matmul(&ut).unwrap()).collect();
    let theirs = (Tensor::cat(&parts, 0).unwrap().reshape((items, per, out)).unwrap() * 0.5).unwrap();
    let r = (randn(303, &[items, per, out]).exp().unwrap() * 100.0).unwrap();
    assert_same_bits_forward_and_backward(&ours, &theirs, &r, &[("x", &x), ("down", &down), ("up", &up)], "adapter");
}

#[test]
fn trainable_silu_has_the_bits_of_candles_silu_forward_and_backward() {
    let special: Vec<f32> = vec![0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 20.0, -20.0, 90.0, -90.0, 110.0, -110.0, 1e20, -1e20, 3.3, -7.1];
    let cases = [randn(400, &[3, 17, 33, 5]), (randn(401, &[2, 1000]) * 30.0).unwrap(), Tensor::from_vec(special.clone(), special.len(), &Device::Cpu).unwrap()];
    for (i, x) in cases.iter().enumerate() {
        let x = Var::from_tensor(x).unwrap();
        let ours = diffii::nn::Activation::Silu.forward(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().silu().unwrap();
        assert_same_bits_forward_and_backward(&ours, &theirs, &randn(402 + i as u64, x.dims()), &[("x", &x)], &format!("case {i}"));
    }
}

#[test]
fn trainable_group_norm_has_the_bits_of_its_candle_composition_forward_and_backward() {
    // Rows long enough for candle's vectorised row sums, odd lengths for their tails, a constant
    // group (zero variance), offsets that make the centring lossy.
    let constant = Tensor::ones((1, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let cases = [(randn(500, &[3, 32, 9, 11]) + 3.0).unwrap(), (randn(501, &[2, 6, 5, 7]) * 100.0).unwrap(), constant];
    for (i, x) in cases.iter().enumerate() {
        let c = x.dim(1).unwrap();
        let groups = if c % 8 == 0 { 8 } else { 2 };
        let x = Var::from_tensor(x).unwrap();
        let w = Var::from_tensor(&randn(510 + i as u64, &[c])).unwrap();
        let b = Var::from_tensor(&randn(520 + i as u64, &[c])).unwrap();
        let gn = diffii::nn::GroupNorm { weight: w.as_tensor().clone(), bias: b.as_tensor().clone(), groups, eps: 1e-5 };
        let r = (randn(530 + i as u64, x.dims()).exp().unwrap() * 10.0).unwrap();
        let ours = gn.forward(x.as_tensor()).unwrap();
        let theirs = gn.forward_composed(x.as_tensor()).unwrap();
        assert_same_bits_forward_and_backward(&ours, &theirs, &r, &[("x", &x), ("weight", &w), ("bias", &b)], &format!("case {i}"));
        // With SiLU fused in: the composition followed by candle's own SiLU.
        let ours = gn.forward_act(x.as_tensor(), diffii::nn::Activation::Silu).unwrap();
        let theirs = gn.forward_composed(x.as_tensor()).unwrap().silu().unwrap();
        assert_same_bits_forward_and_backward(&ours, &theirs, &r, &[("x", &x), ("weight", &w), ("bias", &b)], &format!("case {i} + SiLU"));
        // A frozen layer under a tracked input (concept learning): only the input's gradient.
        let frozen = diffii::nn::GroupNorm { weight: w.as_tensor().detach(), bias: b.as_tensor().detach(), groups, eps: 1e-5 };
        for silu in [false, true] {
            let act = |y: Tensor| if silu { y.silu().unwrap() } else { y };
            let ours = if silu { frozen.forward_act(x.as_tensor(), diffii::nn::Activation::Silu) } else { frozen.forward(x.as_tensor()) }.unwrap();
            let theirs = act(frozen.forward_composed(x.as_tensor()).unwrap());
            assert_same_bits_forward_and_backward(&ours, &theirs, &r, &[("x", &x)], &format!("case {i}, frozen, SiLU {silu}"));
        }
    }
}
