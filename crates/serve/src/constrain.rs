//! Constrained decoding: `response_format` (`json_object`, `json_schema`) and forced tool calls
//! through llguidance. A request's grammar becomes a matcher; before each token is sampled the
//! matcher's mask sends every token the grammar cannot continue with to −∞, and the sampled
//! token is fed back to it. When the grammar is complete only end-of-sequence remains, so the
//! output always parses (unless `max_tokens` cuts it short: `finish_reason: "length"`).

use anyhow::Result;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use nuwa_hf::InferenceModel;
use serde_json::Value;
use std::sync::Arc;

/// What a request's output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON value valid against this JSON schema (`{"type": "object"}` for `json_object`).
    JsonSchema(Value),
}

/// The model's vocabulary as llguidance sees it, built once per server.
pub struct Grammars {
    factory: ParserFactory,
    /// The token a finished grammar allows.
    pub eos: u32,
}

impl Grammars {
    pub fn new(model: &InferenceModel) -> Result<Self> {
        let vocab = model.config.vocab_size;
        let mut tokens = token_bytes(model)?;
        tokens.resize(vocab, Vec::new());
        // A model without an end-of-sequence token ends constrained answers at a special
        // token's id (or 0): the grammar treats that id as the end, never as text.
        let eos = model
            .eos
            .first()
            .copied()
            .or_else(|| {
                model
                    .tokenizer
                    .special_token_id(&["<|endoftext|>", "</s>", "<eos>", "<|im_end|>"])
            })
            .unwrap_or(0);
        let info = TokRxInfo {
            vocab_size: vocab as u32,
            tok_eos: eos,
            tok_bos: None,
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let trie = TokTrie::from(&info, &tokens);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(Self { factory, eos })
    }

    /// A matcher at the start of `constraint`; `Err` names what is wrong with it.
    pub fn matcher(&self, constraint: &Constraint) -> Result<Matcher, String> {
        let grammar = match constraint {
            Constraint::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema)),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(e),
            None => Ok(matcher),
        }
    }
}

/// The schema with JSON written compactly (no free whitespace between tokens) unless it says
/// otherwise: a model can otherwise pad forever with spaces the grammar allows.
fn compact(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Value::Object(m) = &mut schema {
        m.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    }
    schema
}

/// Each token's bytes, special tokens marked so no grammar produces them: from the
/// `tokenizer.json` for byte-level and byte-fallback tokenizers, else token by token.
fn token_bytes(model: &InferenceModel) -> Result<Vec<Vec<u8>>> {
    let json: Option<Value> = model
        .tokenizer
        .hf_json()
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    if let Some(bytes) = json
        .as_ref()
        .and_then(|j| llguidance::token_bytes_from_tokenizer_json(j).ok())
    {
        return Ok(bytes);
    }
    let specials: Vec<u32> = json
        .as_ref()
        .and_then(|j| j["added_tokens"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|t| t["special"].as_bool() == Some(true))
        .filter_map(|t| t["id"].as_u64().map(|id| id as u32))
        .collect();
    Ok((0..model.config.vocab_size as u32)
        .map(|id| {
            let mut b = model.tokenizer.token_bytes(id);
            if specials.contains(&id) {
                b.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
            }
            b
        })
        .collect())
}

/// `logits` with every token the matcher does not allow now at −∞ (only end-of-sequence once
/// the grammar is complete).
pub fn masked(matcher: &mut Matcher, logits: &[f32]) -> Result<Vec<f32>, String> {
    let mask = matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
    Ok(logits
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            if mask.is_allowed(i as u32) {
                l
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect())
}
