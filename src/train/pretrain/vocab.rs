//! A small CLIP-style BPE tokenizer for a pretrained-from-scratch text encoder, written in the
//! diffusers `tokenizer/` layout (`vocab.json`, `merges.txt`, `tokenizer_config.json`) that
//! transformers' `CLIPTokenizer` and our [`ClipTokenizer`](crate::sd::tokenizer::ClipTokenizer)
//! both read.
//!
//! The vocabulary is laid out as CLIP's is: the 256 byte symbols of GPT-2's byte alphabet, the
//! same with the end-of-word mark `</w>`, one entry per merge, then `<|startoftext|>` and
//! `<|endoftext|>`. The merges spell out each given word left to right, so every caption word
//! is one token, while any other text still tokenizes (into smaller pieces, down to bytes) —
//! concept placeholders are added later as extra tokens, exactly as for real SD weights.
use std::collections::BTreeMap;
use std::path::Path;

use crate::data::atomic::write_atomic;
use crate::error::Result;

pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";

/// GPT-2's reversible byte -> printable character map (as CLIP's `bytes_to_unicode`).
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("valid code point")
            }
        })
        .collect()
}

/// The vocabulary (token -> id, in id order) and the merges for `words`.
pub struct Vocab {
    pub tokens: Vec<String>,
    pub merges: Vec<(String, String)>,
}

impl Vocab {
    /// A vocabulary in which every word of `words` (lowercase) is one token.
    pub fn for_words(words: &[&str]) -> Self {
        let symbols = byte_symbols();
        // CLIP orders its byte symbols by code point within the printable ranges first.
        let mut base: Vec<char> = symbols.clone();
        base.sort_by_key(|&c| (!(c as u32 <= 0xff && symbols[c as usize] == c), c as u32));
        let mut tokens: Vec<String> = base.iter().map(|c| c.to_string()).collect();
        tokens.extend(base.iter().map(|c| format!("{c}</w>")));
        let mut merges: Vec<(String, String)> = Vec::new();
        for w in words {
            let chars: Vec<String> = w.bytes().map(|b| symbols[b as usize].to_string()).collect();
            if chars.len() < 2 {
                continue;
            }
            let n = chars.len();
            let mut left = chars[0].clone();
            for (i, c) in chars.iter().enumerate().skip(1) {
                let right = if i == n - 1 { format!("{c}</w>") } else { c.clone() };
                let pair = (left.clone(), right.clone());
                let joined = format!("{left}{right}");
                if !merges.contains(&pair) {
                    merges.push(pair);
                    if !tokens.contains(&joined) {
                        tokens.push(joined.clone());
                    }
                }
                left = joined;
            }
        }
        tokens.push(BOS.into());
        tokens.push(EOS.into());
        Vocab { tokens, merges }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn id(&self, token: &str) -> Option<usize> {
        self.tokens.iter().position(|t| t == token)
    }

    /// Writes `dir/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}`;
    /// prompts are padded or truncated to `max_length` tokens.
    pub fn write(&self, dir: &Path, max_length: usize) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
        let map: BTreeMap<&str, usize> = self.tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        write_atomic(&dir.join("vocab.json"), serde_json::to_string_pretty(&map).expect("json").as_bytes())?;
        let mut merges = String::from("#version: 0.2\n");
        for (a, b) in &self.merges {
            merges.push_str(&format!("{a} {b}\n"));
        }
        write_atomic(&dir.join("merges.txt"), merges.as_bytes())?;
        let config = serde_json::json!({
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": max_length,
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": EOS,
            "unk_token": EOS,
            "do_lower_case": true,
        });
        write_atomic(&dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config).expect("json").as_bytes())?;
        let special = serde_json::json!({ "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS });
        write_atomic(&dir.join("special_tokens_map.json"), serde_json::to_string_pretty(&special).expect("json").as_bytes())
    }
}
