//! Prompts to text embeddings, as `WanPipeline._get_t5_prompt_embeds`: clean, tokenize with EOS,
//! pad or truncate to `max_sequence_length`, encode with the attention mask, then zero the padded rows.

use crate::error::input_error;
use crate::models::umt5::{zero_padding, Umt5EncoderModel};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// Unescapes HTML entities twice, collapses whitespace and trims. (diffusers also runs ftfy's
/// mojibake repair first; that changes only mis-decoded text, which vidit leaves as it is.)
pub fn clean_prompt(text: &str) -> String {
    let once = html_escape::decode_html_entities(text.trim());
    let twice = html_escape::decode_html_entities(&once);
    twice.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Cleans and tokenizes prompts as diffusers does (EOS appended, truncated to `max_len` keeping
/// the EOS, right-padded): token ids and attention mask, each `(B, max_len)`.
pub fn tokenize_padded(
    tokenizer: &Tokenizer,
    prompts: &[String],
    max_len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut tokenizer = tokenizer.clone();
    let pad_id = tokenizer.token_to_id("<pad>").unwrap_or(0);
    tokenizer
        .with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
        .map_err(|e| anyhow::anyhow!("tokenizer truncation: {e}"))?;
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(max_len),
        direction: PaddingDirection::Right,
        pad_id,
        pad_token: "<pad>".into(),
        ..Default::default()
    }));
    let mut ids = Vec::with_capacity(prompts.len() * max_len);
    let mut mask = Vec::with_capacity(prompts.len() * max_len);
    for prompt in prompts {
        let encoding = tokenizer
            .encode(clean_prompt(prompt), true)
            .map_err(|e| anyhow::anyhow!("tokenizing {prompt:?}: {e}"))?;
        ids.extend_from_slice(encoding.get_ids());
        mask.extend_from_slice(encoding.get_attention_mask());
    }
    let shape = (prompts.len(), max_len);
    Ok((Tensor::from_vec(ids, shape, device)?, Tensor::from_vec(mask, shape, device)?))
}

pub struct PromptEncoder {
    tokenizer: Tokenizer,
    model: Umt5EncoderModel,
}

/// A `tokenizer.json`, with an error that names it.
pub fn load_tokenizer(tokenizer_json: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(tokenizer_json)
        .map_err(|e| input_error(format!("{}: cannot load tokenizer: {e}", tokenizer_json.display())))
}

/// Words of `prompt` that `tokenizer` maps to its unknown token `<unk>` (none when it has no such
/// token).
pub fn unknown_words(tokenizer: &Tokenizer, prompt: &str) -> Vec<String> {
    let Some(unk) = tokenizer.token_to_id("<unk>") else {
        return vec![];
    };
    clean_prompt(prompt)
        .split(' ')
        .filter(|word| tokenizer.encode(*word, false).map(|e| e.get_ids().contains(&unk)).unwrap_or(false))
        .map(String::from)
        .collect()
}

impl PromptEncoder {
    pub fn new(tokenizer_json: &Path, model: Umt5EncoderModel) -> Result<Self> {
        Ok(Self { tokenizer: load_tokenizer(tokenizer_json)?, model })
    }

    /// Token ids and attention mask, each `(B, max_len)`.
    pub fn tokenize(&self, prompts: &[String], max_len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        tokenize_padded(&self.tokenizer, prompts, max_len, device)
    }

    /// Zero-padded prompt embeddings `(B, max_len, d_model)`.
    pub fn encode(&self, prompts: &[String], max_len: usize, device: &Device) -> Result<Tensor> {
        let (ids, mask) = self.tokenize(prompts, max_len, device)?;
        let hidden = self.model.forward(&ids, &mask).context("text encoder")?;
        zero_padding(&hidden, &mask)
    }

    /// Words of `prompt` that the tokenizer maps to its unknown token.
    pub fn unknown_words(&self, prompt: &str) -> Vec<String> {
        unknown_words(&self.tokenizer, prompt)
    }

    pub fn hidden_size(&self) -> usize {
        self.model.hidden_size()
    }
}

#[cfg(test)]
mod tests {
    use super::clean_prompt;

    #[test]
    fn cleans_like_diffusers() {
        assert_eq!(clean_prompt("  a  cat\n\tdancing &amp;amp; more  "), "a cat dancing & more");
    }
}
