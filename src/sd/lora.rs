//! LoRA adapters for the UNet's attention projections, read from and written to the safetensors
//! layouts diffusers uses, and merged into the weights (W += s · up · down) so inference costs
//! nothing extra.
//!
//! Key layouts read (each optionally prefixed `unet.`; checked against diffusers'
//! `utils/state_dict_utils.py` and `loaders/peft.py`):
//! 1. PEFT (`save_lora_weights`, train scripts' checkpoints): `<module>.lora_A.weight` [r, in]
//!    and `<module>.lora_B.weight` [out, r];
//! 2. old `save_attn_procs` (Diff-Mix): `<attention>.processor.to_q_lora.down.weight` /
//!    `.up.weight`, likewise `to_k_lora`, `to_v_lora`, and `to_out_lora` for `to_out.0`;
//! 3. `<module>.lora.down.weight` / `.lora.up.weight` (also `lora_linear_layer`), which
//!    `convert_state_dict_to_diffusers` produces.
//!
//! The scale of a module is alpha / r, or 1 without alpha (diffusers' convention: an absent
//! alpha means alpha = r). Alpha comes from a `<module>.alpha` tensor or from the PEFT config
//! diffusers stores in the file's `lora_adapter_metadata` (`lora_alpha`, `alpha_pattern`,
//! `use_rslora`).
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::sd::unet::UNet;

/// The metadata key under which diffusers stores the adapter's PEFT `LoraConfig` as JSON.
pub const LORA_ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

/// A set of low-rank updates, one per UNet module.
#[derive(Clone, Debug, Default)]
pub struct Lora {
    pub entries: Vec<LoraEntry>,
}

/// The update of one linear layer: ΔW = (alpha / r) · up · down.
#[derive(Clone, Debug)]
pub struct LoraEntry {
    /// Module path in diffusers' UNet, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub module: String,
    /// [r, in]
    pub down: Tensor,
    /// [out, r]
    pub up: Tensor,
    pub alpha: Option<f64>,
}

impl LoraEntry {
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// alpha / r, or 1 when alpha is absent.
    pub fn scale(&self) -> f64 {
        match self.alpha {
            Some(a) if self.rank() > 0 => a / self.rank() as f64,
            _ => 1.0,
        }
    }

    /// `scale · (alpha / r) · up · down` as an f32 [out, in] tensor.
    pub fn delta(&self, scale: f64) -> Result<Tensor> {
        let up = self.up.to_dtype(DType::F32)?;
        let down = self.down.to_dtype(DType::F32)?.to_device(up.device())?;
        Ok((up.matmul(&down)? * (scale * self.scale()))?)
    }
}

/// Which half of a LoRA pair (or its alpha) a checkpoint key holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// `<attn>.processor.to_q_lora` → `<attn>.to_q`; `to_out_lora` → `to_out.0`.
fn processor_module(path: &str) -> Option<String> {
    let (attn, proj) = path.rsplit_once(".processor.")?;
    let proj = match proj {
        "to_q_lora" => "to_q",
        "to_k_lora" => "to_k",
        "to_v_lora" => "to_v",
        "to_out_lora" => "to_out.0",
        _ => return None,
    };
    Some(format!("{attn}.{proj}"))
}

/// The module and part of a UNet LoRA key (already without the `unet.` prefix).
fn parse_key(key: &str) -> Option<(String, Part)> {
    const SUFFIXES: [(&str, Part); 8] = [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        (".down.weight", Part::Down),
        (".up.weight", Part::Up),
    ];
    if let Some(base) = key.strip_suffix(".alpha") {
        // Alphas are keyed by module, or (old layout) by the down weight.
        let base = base.strip_suffix(".down.weight").unwrap_or(base);
        return Some((processor_module(base).unwrap_or_else(|| base.to_string()), Part::Alpha));
    }
    for (suffix, part) in SUFFIXES {
        if let Some(base) = key.strip_suffix(suffix) {
            if suffix.starts_with(".lora") {
                return Some((base.to_string(), part));
            }
            // Bare `.down.weight` is only the old processor layout (`…processor.to_q_lora.down.weight`).
            return processor_module(base).map(|m| (m, part));
        }
    }
    None
}

/// The parts of diffusers' PEFT config that set the scale.
struct PeftConfig {
    lora_alpha: f64,
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
}

impl PeftConfig {
    fn from_metadata(path: &Path, md: &HashMap<String, String>) -> Result<Option<Self>> {
        let Some(raw) = md.get(LORA_ADAPTER_METADATA_KEY) else { return Ok(None) };
        let bad = |msg: String| Error::bad_file(path, format!("metadata `{LORA_ADAPTER_METADATA_KEY}`: {msg}"));
        let v: Value = serde_json::from_str(raw).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = v else { return Err(bad("not a JSON object".into())) };
        // diffusers prefixes each component's config keys (`unet.lora_alpha`).
        let prefixed = obj.keys().any(|k| k.starts_with("unet."));
        let get = |name: &str| if prefixed { obj.get(&format!("unet.{name}")) } else { obj.get(name) };
        if prefixed || obj.contains_key("r") || obj.contains_key("lora_alpha") {
            if get("use_dora").and_then(Value::as_bool) == Some(true) {
                return Err(bad("DoRA adapters (use_dora) are not supported".into()));
            }
            // PEFT's LoraConfig default when the key is absent.
            let lora_alpha = match get("lora_alpha") {
                None => 8.0,
                Some(a) => a.as_f64().ok_or_else(|| bad(format!("lora_alpha is {a}, not a number")))?,
            };
            let mut alpha_pattern = Vec::new();
            if let Some(Value::Object(p)) = get("alpha_pattern") {
                for (k, a) in p {
                    let a = a.as_f64().ok_or_else(|| bad(format!("alpha_pattern[{k}] is {a}, not a number")))?;
                    alpha_pattern.push((k.trim_start_matches('^').trim_end_matches('$').to_string(), a));
                }
            }
            let use_rslora = get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
            return Ok(Some(PeftConfig { lora_alpha, alpha_pattern, use_rslora }));
        }
        Ok(None)
    }

    /// PEFT matches pattern keys as module-path suffixes.
    fn alpha_for(&self, module: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|(p, _)| module == p || module.ends_with(&format!(".{p}")))
            .map_or(self.lora_alpha, |(_, a)| *a)
    }
}

#[derive(Default)]
struct Pending {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<(String, f64)>,
}

impl Lora {
    /// Reads a UNet LoRA from safetensors in any of the layouts above. Keys this cannot use
    /// (text-encoder LoRA, kohya names, other tensors) are errors, never skipped.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::bad_file(path, "file not found"));
        }
        let buf = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let not_st = |e: String| Error::bad_file(path, format!("not a readable safetensors file: {e}"));
        let (_, meta) = safetensors::SafeTensors::read_metadata(&buf).map_err(|e| not_st(e.to_string()))?;
        let tensors = candle_core::safetensors::load_buffer(&buf, &Device::Cpu).map_err(|e| not_st(e.to_string()))?;
        let md = meta.metadata().clone().unwrap_or_default();
        let peft = PeftConfig::from_metadata(path, &md)?;

        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        let te: Vec<&&String> = keys
            .iter()
            .filter(|k| k.starts_with("text_encoder") || k.starts_with("lora_te") || k.contains(".self_attn."))
            .collect();
        if let Some(first) = te.first() {
            return Err(Error::bad_file(
                path,
                format!(
                    "holds {} text-encoder LoRA tensors (e.g. `{first}`); text-encoder LoRA is not supported yet: \
                     save the UNet part alone (keys starting with `unet.`)",
                    te.len()
                ),
            ));
        }
        if let Some(k) = keys.iter().find(|k| k.starts_with("lora_unet_")) {
            return Err(Error::bad_file(
                path,
                format!(
                    "uses kohya / A1111 key names (e.g. `{k}`), which are not supported; convert it with diffusers \
                     (`pipe.load_lora_weights(...)` then `pipe.save_lora_weights(...)`)"
                ),
            ));
        }

        let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
        for key in keys {
            let t = &tensors[key];
            let bare = key.strip_prefix("unet.").unwrap_or(key);
            let unsupported = |what: &str| {
                Error::Tensor { path: path.to_path_buf(), key: key.clone(), msg: format!("{what} is not supported") }
            };
            if bare.contains("lora_magnitude_vector") || bare.contains("dora_scale") {
                return Err(unsupported("DoRA"));
            }
            if bare.ends_with(".lora_B.bias") {
                return Err(unsupported("a LoRA bias (lora_bias=True)"));
            }
            let Some((module, part)) = parse_key(bare) else {
                return Err(Error::Tensor {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    msg: "is not a UNet LoRA key: expected `unet.<module>.lora_A.weight` / `.lora_B.weight`, \
                          `<attention>.processor.to_q_lora.down.weight`, or `<module>.lora.down.weight`"
                        .into(),
                });
            };
            let slot = pending.entry(module.clone()).or_default();
            let twice = |other: &str| Error::Tensor {
                path: path.to_path_buf(),
                key: key.clone(),
                msg: format!("defines the same part of module `{module}` as `{other}`"),
            };
            match part {
                Part::Down | Part::Up => {
                    let cell = if part == Part::Down { &mut slot.down } else { &mut slot.up };
                    if let Some((other, _)) = cell {
                        return Err(twice(other));
                    }
                    *cell = Some((key.clone(), t.to_dtype(DType::F32)?));
                }
                Part::Alpha => {
                    if let Some((other, _)) = &slot.alpha {
                        return Err(twice(other));
                    }
                    if t.elem_count() != 1 {
                        return Err(Error::Tensor {
                            path: path.to_path_buf(),
                            key: key.clone(),
                            msg: format!("an alpha must be a single number, this has shape {:?}", t.dims()),
                        });
                    }
                    let a = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
                    slot.alpha = Some((key.clone(), a));
                }
            }
        }

        let mut entries = Vec::with_capacity(pending.len());
        for (module, p) in pending {
            let (Some((dk, down)), Some((uk, up))) = (p.down, p.up) else {
                return Err(Error::bad_file(
                    path,
                    format!("module `{module}` lacks its LoRA down (A) or up (B) weight; the pair must be complete"),
                ));
            };
            let (r, r2) = match (down.dims(), up.dims()) {
                ([r, _], [_, r2]) => (*r, *r2),
                (d, u) => {
                    return Err(Error::Tensor {
                        path: path.to_path_buf(),
                        key: dk,
                        msg: format!("down {d:?} / up {u:?} (`{uk}`) must both be 2-D: [r, in] and [out, r]"),
                    })
                }
            };
            if r != r2 || r == 0 {
                return Err(Error::Tensor {
                    path: path.to_path_buf(),
                    key: dk,
                    msg: format!("down {:?} and up {:?} (`{uk}`) disagree on the rank", down.dims(), up.dims()),
                });
            }
            let alpha = match (p.alpha, &peft) {
                (Some((_, a)), _) => Some(a),
                (None, Some(cfg)) => Some(cfg.alpha_for(&module)),
                (None, None) => None,
            };
            // rsLoRA scales by alpha / sqrt(r); the equivalent alpha for alpha / r is alpha * sqrt(r).
            let alpha = match &peft {
                Some(cfg) if cfg.use_rslora => alpha.map(|a| a * (r as f64).sqrt()),
                _ => alpha,
            };
            entries.push(LoraEntry { module, down, up, alpha });
        }
        if entries.is_empty() {
            return Err(Error::bad_file(path, "holds no LoRA tensors"));
        }
        Ok(Lora { entries })
    }

    /// Writes layout 1 (`unet.<module>.lora_A.weight` / `.lora_B.weight`, f32), which
    /// diffusers' `load_lora_weights` reads. Alphas go into `lora_adapter_metadata` as a PEFT
    /// config, the only place diffusers reads them from in this layout.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.entries.len());
        for e in &self.entries {
            if !seen.insert(e.module.as_str()) {
                return Err(Error::invalid(format!("LoRA module `{}` appears twice; merge the entries first", e.module)));
            }
            tensors.push((format!("unet.{}.lora_A.weight", e.module), e.down.clone()));
            tensors.push((format!("unet.{}.lora_B.weight", e.module), e.up.clone()));
        }
        let mut md = HashMap::from([("format".to_string(), "pt".to_string())]);
        if self.entries.iter().any(|e| e.alpha.is_some()) {
            md.insert(LORA_ADAPTER_METADATA_KEY.to_string(), self.peft_config_json().to_string());
        }
        crate::nn::weights::save_safetensors(path, &tensors, Some(md))
    }

    /// diffusers' prefixed PEFT `LoraConfig`: the most common rank and alpha, with patterns for
    /// the modules that differ (absent alphas are written as alpha = r, i.e. scale 1).
    fn peft_config_json(&self) -> Value {
        fn most_common<T: PartialEq + Copy>(xs: &[T]) -> T {
            let counts = xs.iter().map(|x| xs.iter().filter(|y| *y == x).count());
            let best = counts.enumerate().max_by_key(|&(i, c)| (c, usize::MAX - i)).map_or(0, |(i, _)| i);
            xs[best]
        }
        let ranks: Vec<usize> = self.entries.iter().map(LoraEntry::rank).collect();
        let alphas: Vec<f64> = self.entries.iter().map(|e| e.alpha.unwrap_or(e.rank() as f64)).collect();
        let (r, a) = (most_common(&ranks), most_common(&alphas));
        let mut rank_pattern = serde_json::Map::new();
        let mut alpha_pattern = serde_json::Map::new();
        for (e, (&er, &ea)) in self.entries.iter().zip(ranks.iter().zip(&alphas)) {
            if er != r {
                rank_pattern.insert(e.module.clone(), er.into());
            }
            if ea != a {
                alpha_pattern.insert(e.module.clone(), ea.into());
            }
        }
        let targets: Vec<&str> = self.entries.iter().map(|e| e.module.as_str()).collect();
        serde_json::json!({
            "unet.r": r,
            "unet.lora_alpha": a,
            "unet.rank_pattern": rank_pattern,
            "unet.alpha_pattern": alpha_pattern,
            "unet.target_modules": targets,
        })
    }

    /// SHA-256 (hex) over modules in name order with their alphas and f32 little-endian
    /// weights: identifies the adapter in manifests whatever layout it was read from.
    pub fn sha256(&self) -> String {
        let mut h = Sha256::new();
        let mut entries: Vec<&LoraEntry> = self.entries.iter().collect();
        entries.sort_by(|a, b| a.module.cmp(&b.module));
        let put_tensor = |h: &mut Sha256, t: &Tensor| {
            h.update((t.rank() as u64).to_le_bytes());
            for d in t.dims() {
                h.update((*d as u64).to_le_bytes());
            }
            let v = t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>());
            for x in v.unwrap_or_default() {
                h.update(x.to_le_bytes());
            }
        };
        for e in entries {
            h.update((e.module.len() as u64).to_le_bytes());
            h.update(e.module.as_bytes());
            match e.alpha {
                Some(a) => {
                    h.update([1u8]);
                    h.update(a.to_le_bytes());
                }
                None => h.update([0u8]),
            }
            put_tensor(&mut h, &e.down);
            put_tensor(&mut h, &e.up);
        }
        format!("{:x}", h.finalize())
    }
}

/// Merges `lora` into the UNet's attention projections: W += scale · (alpha / r) · up · down.
/// Every entry is checked before any weight changes, so an error leaves the UNet as it was.
/// Returns the number of merged modules.
pub fn apply_lora(unet: &mut UNet, lora: &Lora, scale: f64) -> Result<usize> {
    let mut projs = unet.attention_projections_mut();
    let index: HashMap<String, usize> = projs.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
    let mut plan = Vec::with_capacity(lora.entries.len());
    for e in &lora.entries {
        let Some(&i) = index.get(&e.module) else {
            let example = projs.first().map_or(String::new(), |(n, _)| format!(" (e.g. `{n}`)"));
            return Err(Error::invalid(format!(
                "LoRA module `{}` is not an attention projection of this UNet{example}; LoRA can only be \
                 merged into to_q / to_k / to_v / to_out.0 of the UNet's attention layers",
                e.module
            )));
        };
        let (out_dim, in_dim) = projs[i].1.weight.dims2()?;
        let fits = matches!((e.down.dims(), e.up.dims()), ([r, i], [o, r2]) if r == r2 && *i == in_dim && *o == out_dim);
        if !fits {
            return Err(Error::invalid(format!(
                "LoRA module `{}`: down {:?} and up {:?} do not fit the layer's weight [out, in] = [{out_dim}, {in_dim}] \
                 (expected down [r, {in_dim}] and up [{out_dim}, r]); was the LoRA trained for another model?",
                e.module,
                e.down.dims(),
                e.up.dims()
            )));
        }
        plan.push(i);
    }
    for (e, &i) in lora.entries.iter().zip(&plan) {
        let lin = &mut projs[i].1;
        let delta = e.delta(scale)?.to_device(lin.weight.device())?;
        lin.add_to_weight(&delta)?;
    }
    Ok(plan.len())
}

/// A trainable adapter attached to one attention projection: `down` [r, in] and `up` [out, r].
pub struct TrainableAdapter {
    pub module: String,
    pub down: candle_core::Var,
    pub up: candle_core::Var,
}

/// Attaches a fresh unmerged adapter of rank `rank` (scale alpha / r) to every attention
/// projection (`to_q`, `to_k`, `to_v`, `to_out.0`), initialised as diffusers' LoRA training
/// scripts do (`init_lora_weights="gaussian"`): down ~ N(0, 1/r²) (std 1/r), up = 0, so the
/// adapted UNet starts equal to the base one. Draws are seeded per module name.
pub fn attach_trainable(unet: &mut UNet, rank: usize, alpha: f64, seed: u64) -> Result<Vec<TrainableAdapter>> {
    if rank == 0 {
        return Err(Error::invalid("LoRA rank must be at least 1"));
    }
    let mut out = Vec::new();
    for (module, lin) in unet.attention_projections_mut() {
        let (out_dim, in_dim) = lin.weight.dims2()?;
        let (dtype, device) = (lin.weight.dtype(), lin.weight.device().clone());
        let s = crate::rng::derive_u64(&[&seed.to_le_bytes(), module.as_bytes()]);
        let down = (crate::rng::seeded_randn(s, &[rank, in_dim], &device)? / rank as f64)?.to_dtype(dtype)?;
        let down = candle_core::Var::from_tensor(&down)?;
        let up = candle_core::Var::zeros((out_dim, rank), dtype, &device)?;
        lin.adapter = Some(crate::nn::Adapter {
            down: down.as_tensor().clone(),
            up: up.as_tensor().clone(),
            scale: alpha / rank as f64,
        });
        out.push(TrainableAdapter { module, down, up });
    }
    if out.is_empty() {
        return Err(Error::invalid("this UNet has no attention projections to attach LoRA adapters to"));
    }
    Ok(out)
}

/// Removes every unmerged adapter (the base weights were never touched).
pub fn detach_adapters(unet: &mut UNet) {
    for (_, lin) in unet.attention_projections_mut() {
        lin.adapter = None;
    }
}

/// The current values of trained adapters as a [`Lora`] (alpha recorded, so scale = alpha / r).
pub fn to_lora(adapters: &[TrainableAdapter], alpha: f64) -> Result<Lora> {
    let entries = adapters
        .iter()
        .map(|a| {
            Ok(LoraEntry {
                module: a.module.clone(),
                down: a.down.as_tensor().copy()?,
                up: a.up.as_tensor().copy()?,
                alpha: Some(alpha),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Lora { entries })
}
