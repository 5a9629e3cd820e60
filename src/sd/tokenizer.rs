//! CLIP's byte-level BPE tokenizer, as Stable Diffusion 1.x's text encoder expects it.
//!
//! CLIP's rules: NFC-normalise, collapse whitespace runs to one space and lowercase; split into
//! words, contractions, single digits and punctuation runs (whitespace is dropped); map bytes to
//! the GPT-2 byte alphabet; BPE-merge with `</w>` marking the end of each word. A prompt becomes
//! `<|startoftext|> tokens… <|endoftext|>`, truncated to `model_max_length` (77) with the
//! end token kept, then padded to that length with the pad token (`<|endoftext|>` for SD).
//!
//! A diffusers `tokenizer/` folder may carry a `tokenizer.json`, which we load as is. Real SD-1.5
//! downloads ship only `vocab.json` + `merges.txt`, so for those we rebuild the pipeline that HF
//! tokenizers' CLIP fast tokenizer would build from them; both paths give the same ids.
//!
//! Textual-inversion concepts are added as extra tokens the way transformers'
//! `tokenizer.add_tokens` does it (non-special, normalised), so their ids follow the vocabulary.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{read_json, Error, Result};

/// CLIP's word-splitting pattern (from OpenAI's `SimpleTokenizer`, as in HF's tokenizer.json).
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    base_vocab_size: usize,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

/// The fields of `tokenizer_config.json` we use; everything else is ignored.
#[derive(Deserialize, Default)]
struct TokenizerConfig {
    model_max_length: Option<usize>,
    bos_token: Option<TokenName>,
    eos_token: Option<TokenName>,
    pad_token: Option<TokenName>,
    unk_token: Option<TokenName>,
}

/// transformers writes special tokens either as plain strings or as serialised `AddedToken`s.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenName {
    Plain(String),
    Added { content: String },
}

impl TokenName {
    fn into_string(self) -> String {
        match self {
            TokenName::Plain(s) | TokenName::Added { content: s } => s,
        }
    }
}

fn or_default(t: Option<TokenName>, default: &str) -> String {
    t.map_or_else(|| default.to_string(), TokenName::into_string)
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json` if present, else
    /// `vocab.json` + `merges.txt`; `tokenizer_config.json` (optional) sets the length and the
    /// bos / eos / pad tokens.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: TokenizerConfig = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            TokenizerConfig::default()
        };
        let max_length = config.model_max_length.unwrap_or(77);
        if max_length < 2 {
            return Err(Error::bad_file(
                &config_path,
                format!(
                    "model_max_length {max_length} leaves no room for the start and end tokens"
                ),
            ));
        }
        let bos = or_default(config.bos_token, "<|startoftext|>");
        let eos = or_default(config.eos_token, "<|endoftext|>");
        let pad = config
            .pad_token
            .map_or_else(|| eos.clone(), TokenName::into_string);
        let unk = or_default(config.unk_token, "<|endoftext|>");

        let json_path = dir.join("tokenizer.json");
        let vocab_path = dir.join("vocab.json");
        let (mut tokenizer, source) = if json_path.is_file() {
            let t = Tokenizer::from_file(&json_path)
                .map_err(|e| Error::bad_file(&json_path, format!("cannot load tokenizer: {e}")))?;
            (t, json_path)
        } else if vocab_path.is_file() {
            (
                build_from_vocab_merges(dir, &bos, &eos, &unk, &pad)?,
                vocab_path,
            )
        } else {
            return Err(Error::bad_file(
                dir,
                "no tokenizer.json and no vocab.json + merges.txt in this tokenizer folder",
            ));
        };
        // Truncation and padding are done in `encode`, so a tokenizer.json's own settings
        // (which may disagree with tokenizer_config.json) must not interfere.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::bad_file(&source, e.to_string()))?;
        tokenizer.with_padding(None);

        let id_of = |name: &str, what: &str| {
            tokenizer.token_to_id(name).ok_or_else(|| {
                Error::bad_file(
                    &source,
                    format!("{what} token `{name}` is not in the vocabulary"),
                )
            })
        };
        Ok(Self {
            bos_id: id_of(&bos, "bos")?,
            eos_id: id_of(&eos, "eos")?,
            pad_id: id_of(&pad, "pad")?,
            base_vocab_size: tokenizer.get_vocab_size(false),
            max_length,
            tokenizer,
        })
    }

    /// Adds placeholder tokens (e.g. `<cls0>`) as single ids `len()`, `len()+1`, … in the order
    /// given, as transformers' `add_tokens` does. Nothing is added if any token is blank or known.
    pub fn add_concept_tokens(&mut self, tokens: &[String]) -> Result<Vec<u32>> {
        for (i, t) in tokens.iter().enumerate() {
            if t.trim().is_empty() {
                return Err(Error::invalid(format!("concept token {t:?} is blank")));
            }
            // transformers would silently reuse the existing id, making the concept's learned
            // embedding overwrite (or be overwritten by) another token's.
            if self.tokenizer.token_to_id(t).is_some() {
                return Err(Error::invalid(format!(
                    "concept token `{t}` already exists in the tokenizer; choose another placeholder"
                )));
            }
            if tokens[..i].contains(t) {
                return Err(Error::invalid(format!(
                    "concept token `{t}` is given twice"
                )));
            }
        }
        let first = self.len() as u32;
        let mut ids = Vec::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            // Non-special and normalised: transformers' defaults for `add_tokens`.
            self.tokenizer
                .add_tokens(&[AddedToken::from(t.clone(), false).normalized(true)]);
            let id = self.tokenizer.token_to_id(t);
            let expected = first + i as u32;
            if id != Some(expected) {
                return Err(Error::invalid(format!(
                    "concept token `{t}` got id {id:?} instead of {expected} (vocabulary ids are not contiguous?)"
                )));
            }
            ids.push(expected);
        }
        Ok(ids)
    }

    /// An error unless `prompt` fits the text encoder whole: [`encode`](Self::encode) keeps
    /// only the first `max_length - 2` tokens (as transformers does), which for a too-long
    /// template can cut off the concept token and silently generate the wrong thing.
    pub fn check_fits(&self, prompt: &str) -> Result<()> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| Error::invalid(format!("cannot tokenize prompt {prompt:?}: {e}")))?;
        let (n, room) = (encoding.get_ids().len(), self.max_length.saturating_sub(2));
        if n > room {
            return Err(Error::invalid(format!(
                "prompt {prompt:?} is {n} tokens; the text encoder reads {room} ({} with its start and end tokens): \
                 shorten the template, superclass or suffix",
                self.max_length
            )));
        }
        Ok(())
    }

    /// Token ids of `prompt`: start token, at most `max_length - 2` tokens, end token, then
    /// padding up to exactly `max_length` ids.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| Error::invalid(format!("cannot tokenize prompt {prompt:?}: {e}")))?;
        let body = encoding.get_ids();
        let body = &body[..body.len().min(self.max_length - 2)];
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(body);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// Size of the base vocabulary, without concept tokens.
    pub fn vocab_size(&self) -> usize {
        self.base_vocab_size
    }

    /// Number of ids including added concept tokens.
    pub fn len(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Length of every encoded prompt (`model_max_length`).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

/// The pipeline HF tokenizers' `CLIPTokenizerFast` builds from `vocab.json` + `merges.txt`.
fn build_from_vocab_merges(
    dir: &Path,
    bos: &str,
    eos: &str,
    unk: &str,
    pad: &str,
) -> Result<Tokenizer> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let vocab: HashMap<String, u32> = read_json(&vocab_path)?;
    let merges = read_merges(&merges_path)?;
    let id = |name: &str, what: &str| {
        vocab.get(name).copied().ok_or_else(|| {
            Error::bad_file(
                &vocab_path,
                format!("{what} token `{name}` is not in the vocabulary"),
            )
        })
    };
    let (bos_id, eos_id) = (id(bos, "bos")?, id(eos, "eos")?);

    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
        .unk_token(unk.to_string())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_string())
        .fuse_unk(false)
        .build()
        .map_err(|e| Error::bad_file(&merges_path, format!("cannot build the BPE model: {e}")))?;

    // These are constant patterns, so failing to compile them is a bug, not bad input.
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
        .map_err(|e| Error::invalid(format!("internal: whitespace regex: {e}")))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_REGEX.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| Error::invalid(format!("internal: CLIP split regex: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .with_pre_tokenizer(Some(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])))
        .with_post_processor(Some(
            RobertaProcessing::new((eos.to_string(), eos_id), (bos.to_string(), bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ))
        .with_decoder(Some(ByteLevel::default()));
    // Special tokens match before normalisation, so `<|endoftext|>` in a prompt stays one id.
    let mut specials: Vec<AddedToken> = Vec::new();
    for name in [bos, eos, unk, pad] {
        if !specials.iter().any(|t| t.content == name) {
            specials.push(AddedToken::from(name, true));
        }
    }
    tokenizer.add_special_tokens(&specials);
    Ok(tokenizer)
}

/// Reads `merges.txt`: one `left right` pair per line, after an optional `#version` header.
fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if (n == 0 && line.starts_with("#version")) || line.is_empty() {
            continue;
        }
        match line.split(' ').collect::<Vec<_>>()[..] {
            [a, b] if !a.is_empty() && !b.is_empty() => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "line {}: expected two space-separated symbols, got {line:?}",
                        n + 1
                    ),
                ))
            }
        }
    }
    Ok(merges)
}
