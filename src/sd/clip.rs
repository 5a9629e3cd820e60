//! CLIP text encoder (transformers' `CLIPTextModel`), returning `last_hidden_state` — the
//! per-token features after the final LayerNorm that SD-1.x cross-attends to.
//!
//! Concept tokens added after the base vocabulary (`<cls0>` = vocab_size, ...) are looked up
//! in a separate table of extra rows, passed per call, so a textual-inversion trainer can pass
//! rows that require gradients while the base table stays frozen.
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::sd::config::ClipConfig;
use crate::nn::{attention, LayerNorm, Linear, Mode};
use crate::nn::weights::Weights;

#[derive(Clone, Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

#[derive(Clone, Debug)]
pub struct ClipTextEncoder {
    pub config: ClipConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    mode: Mode,
}

impl ClipTextEncoder {
    /// `w` is the text encoder's file; keys are read under `text_model.` (the loader registers
    /// the alias for checkpoints saved without that prefix). Its linear layers see 77 rows per
    /// prompt, keep frozen weights input-major ([`Linear::in_major`]) and read them from panels
    /// on the f32 CPU path ([`Linear::with_panels`]).
    pub fn load(w: &Weights, config: &ClipConfig, mode: Mode) -> Result<Self> {
        let c = config;
        let h = c.hidden_size;
        let w = w.pp("text_model");
        let we = w.pp("embeddings");
        let eps = c.layer_norm_eps;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let wl = w.pp("encoder").pp("layers").pp(i);
                let wa = wl.pp("self_attn");
                Ok(EncoderLayer {
                    layer_norm1: LayerNorm::load(&wl.pp("layer_norm1"), h, eps, mode)?,
                    q_proj: Linear::load(&wa.pp("q_proj"), h, h, true)?.in_major()?.with_panels(),
                    k_proj: Linear::load(&wa.pp("k_proj"), h, h, true)?.in_major()?.with_panels(),
                    v_proj: Linear::load(&wa.pp("v_proj"), h, h, true)?.in_major()?.with_panels(),
                    out_proj: Linear::load(&wa.pp("out_proj"), h, h, true)?.in_major()?.with_panels(),
                    layer_norm2: LayerNorm::load(&wl.pp("layer_norm2"), h, eps, mode)?,
                    fc1: Linear::load(&wl.pp("mlp").pp("fc1"), h, c.intermediate_size, true)?.in_major()?.with_panels(),
                    fc2: Linear::load(&wl.pp("mlp").pp("fc2"), c.intermediate_size, h, true)?.in_major()?.with_panels(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipTextEncoder {
            config: c.clone(),
            token_embedding: we.pp("token_embedding").get(&[c.vocab_size, h], "weight")?,
            position_embedding: we.pp("position_embedding").get(&[c.max_position_embeddings, h], "weight")?,
            layers,
            final_layer_norm: LayerNorm::load(&w.pp("final_layer_norm"), h, eps, mode)?,
            mode,
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.token_embedding.device()
    }

    /// The frozen base token-embedding table [vocab, hidden].
    pub fn token_embedding(&self) -> &Tensor {
        &self.token_embedding
    }

    /// Token embeddings of `ids` [b, n]; ids >= vocab_size index `extra_rows` [k, hidden].
    pub fn embed_tokens(&self, ids: &Tensor, extra_rows: Option<&Tensor>) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let vocab = self.config.vocab_size as u32;
        let flat: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
        let n_extra = extra_rows.map(|r| r.dim(0)).transpose()?.unwrap_or(0) as u32;
        if let Some(&bad) = flat.iter().find(|&&i| i >= vocab + n_extra) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary ({vocab} base tokens + {n_extra} concept rows); \
                 was a concept token added to the tokenizer without its embedding row?"
            )));
        }
        let dev = ids.device();
        let base_ids: Vec<u32> = flat.iter().map(|&i| if i < vocab { i } else { 0 }).collect();
        let base = self.token_embedding.index_select(&Tensor::new(base_ids, dev)?, 0)?;
        let emb = match extra_rows {
            Some(rows) if flat.iter().any(|&i| i >= vocab) => {
                let extra_ids: Vec<u32> = flat.iter().map(|&i| i.saturating_sub(vocab).min(n_extra - 1)).collect();
                let extra = rows.to_dtype(base.dtype())?.index_select(&Tensor::new(extra_ids, dev)?, 0)?;
                let is_extra: Vec<u8> = flat.iter().map(|&i| (i >= vocab) as u8).collect();
                let mask = Tensor::new(is_extra, dev)?.unsqueeze(1)?.broadcast_as(base.shape())?;
                // where_cond keeps the graph: gradients reach only the rows actually used.
                mask.where_cond(&extra, &base)?
            }
            _ => base,
        };
        Ok(emb.reshape((b, n, self.config.hidden_size))?)
    }

    /// `last_hidden_state` for token embeddings [b, n, hidden] (positions added here).
    pub fn forward_embeds(&self, embeds: &Tensor) -> Result<Tensor> {
        let (_, n, _) = embeds.dims3()?;
        if n > self.config.max_position_embeddings {
            return Err(Error::invalid(format!("{n} tokens exceed max_position_embeddings {}", self.config.max_position_embeddings)));
        }
        let mut x = embeds.broadcast_add(&self.position_embedding.narrow(0, 0, n)?)?;
        let mask = causal_mask(n, x.dtype(), x.device())?;
        let heads = self.config.num_attention_heads;
        for l in &self.layers {
            let h = l.layer_norm1.forward(&x)?;
            let a = attention(&l.q_proj.forward(&h)?, &l.k_proj.forward(&h)?, &l.v_proj.forward(&h)?, heads, Some(&mask), self.mode, l.q_proj.precision)?;
            x = (x + l.out_proj.forward(&a)?)?;
            let h = l.layer_norm2.forward(&x)?;
            let h = l.fc2.forward(&self.config.act.forward(&l.fc1.forward(&h)?)?)?;
            x = (x + h)?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// `last_hidden_state` for token ids [b, n].
    pub fn forward(&self, ids: &Tensor, extra_rows: Option<&Tensor>) -> Result<Tensor> {
        self.forward_embeds(&self.embed_tokens(ids, extra_rows)?)
    }
}

/// Additive causal mask [n, n]: 0 on and below the diagonal, the dtype's lowest value above
/// (as transformers does; -inf would turn 0 * inf into NaN in some backward paths).
fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n).flat_map(|i| (0..n).map(move |j| if j > i { f32::MIN } else { 0.0 })).collect();
    Ok(Tensor::from_vec(data, (n, n), device)?.to_dtype(dtype)?)
}
