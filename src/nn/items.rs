//! Products that run one batch item at a time on a GPU, so that a sample's bytes do not depend
//! on what else is in its batch there either.
//!
//! On the CPU every product of a sampling path already has a shape per item (the fused kernels,
//! or [`super::linear`]'s per-item rows). On a GPU the layers fall back to candle's ops, whose
//! convolution is one cuBLAS product over the rows of the whole batch (im2col) and whose batched
//! matmul is one strided-batched call: cuBLAS picks its algorithm (tiles, split depth) from the
//! whole shape, so the same sample could be summed in another order at another batch size, and
//! a sharded run would differ from a single one.
use candle_core::Tensor;

use crate::error::Result;

/// `f(inputs)`, or where the inputs sit on a GPU and share a batch of more than one item,
/// `f` on each item (dim 0 narrowed to 1) concatenated along dim 0. `f` must treat batch items
/// independently, as every layer does; on the CPU it always gets the whole batch.
pub(crate) fn per_item_on_gpu(inputs: &[&Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> Result<Tensor> {
    let on_gpu = inputs.first().is_some_and(|t| !t.device().is_cpu());
    per_item(inputs, on_gpu, f)
}

/// [`per_item_on_gpu`] with the choice given: `split` runs `f` item by item where the inputs
/// share a batch of more than one.
fn per_item(inputs: &[&Tensor], split: bool, f: impl Fn(&[Tensor]) -> Result<Tensor>) -> Result<Tensor> {
    let b = inputs.first().and_then(|t| t.dims().first().copied()).unwrap_or(0);
    let same_batch = inputs.iter().all(|t| t.dims().first() == Some(&b));
    if !split || b <= 1 || !same_batch {
        return f(&inputs.iter().map(|&t| t.clone()).collect::<Vec<_>>());
    }
    let parts = (0..b)
        .map(|i| f(&inputs.iter().map(|t| t.narrow(0, i, 1)).collect::<candle_core::Result<Vec<_>>>()?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn input(dims: &[usize], seed: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.37 + seed).sin() * 3.0).round() / 4.0).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    #[test]
    fn cpu_gets_the_whole_batch_once() {
        let x = input(&[3, 4], 0.0);
        let calls = std::cell::Cell::new(0);
        let y = per_item_on_gpu(&[&x], |t| {
            calls.set(calls.get() + 1);
            assert_eq!(t[0].dims(), &[3, 4]);
            Ok((&t[0] * 2.0)?)
        })
        .unwrap();
        assert_eq!(calls.get(), 1);
        assert_eq!(y.to_vec2::<f32>().unwrap(), (&x * 2.0).unwrap().to_vec2::<f32>().unwrap());
    }

    #[test]
    fn split_items_give_the_whole_batch_result() {
        // Values that are multiples of 1/4 and small: every product is exact, so the split and
        // the whole batch must agree to the bit, whatever order each sums in.
        let (x, w) = (input(&[3, 2, 5, 5], 0.5), input(&[4, 2, 3, 3], 1.5));
        let conv = |t: &[Tensor]| Ok(t[0].conv2d(&w, 1, 1, 1, 1)?);
        let calls = std::cell::Cell::new(0);
        let split = per_item(&[&x], true, |t| {
            calls.set(calls.get() + 1);
            assert_eq!(t[0].dim(0)?, 1);
            conv(t)
        })
        .unwrap();
        assert_eq!(calls.get(), 3);
        let whole = conv(&[x.clone()]).unwrap();
        assert_eq!(split.dims(), whole.dims());
        assert_eq!(split.flatten_all().unwrap().to_vec1::<f32>().unwrap(), whole.flatten_all().unwrap().to_vec1::<f32>().unwrap());

        // Several inputs narrowed together (attention's q, k, v).
        let (q, k) = (input(&[2, 3, 4, 6], 2.0), input(&[2, 3, 5, 6], 3.0));
        let scores = |t: &[Tensor]| Ok(t[0].matmul(&t[1].t()?)?);
        let split = per_item(&[&q, &k], true, scores).unwrap();
        let whole = scores(&[q.clone(), k.clone()]).unwrap();
        assert_eq!(split.flatten_all().unwrap().to_vec1::<f32>().unwrap(), whole.flatten_all().unwrap().to_vec1::<f32>().unwrap());

        // Inputs of different batch sizes are not split.
        let calls = std::cell::Cell::new(0);
        per_item(&[&q, &input(&[1, 3, 5, 6], 0.0)], true, |t| {
            calls.set(calls.get() + 1);
            Ok(t[0].clone())
        })
        .unwrap();
        assert_eq!(calls.get(), 1);
    }
}
