//! Chat templates (the Jinja template in `tokenizer_config.json` or `chat_template.jinja`) and
//! the end-of-sequence tokens that stop generation.

use anyhow::{anyhow, bail, Context, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display())),
        Err(_) => Ok(None),
    }
}

/// A special token written either as a string or as `{"content": ...}`.
fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The chat template of a checkpoint folder, if it has one.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let tc = read_json(&dir.join("tokenizer_config.json"))?;
        let from_config = tc.as_ref().and_then(|c| match c.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: the one called "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        });
        let jinja = dir.join("chat_template.jinja");
        let source = match from_config {
            Some(s) => s,
            None if jinja.exists() => std::fs::read_to_string(&jinja)
                .with_context(|| format!("{}: cannot read", jinja.display()))?,
            None => return Ok(None),
        };
        let template = Self {
            source,
            bos_token: token_text(tc.as_ref().and_then(|c| c.get("bos_token"))),
            eos_token: token_text(tc.as_ref().and_then(|c| c.get("eos_token"))),
        };
        // Fail on a template that does not parse now, not at the first request.
        template.render(&[], true)?;
        Ok(Some(template))
    }

    /// The prompt text for `messages`, ending with the assistant's turn when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", &self.source)
            .map_err(|e| anyhow!("chat template does not parse: {e}"))?;
        let template = env
            .get_template("chat")
            .map_err(|e| anyhow!("chat template: {e}"))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| anyhow!("chat template: {e}"))
    }
}

/// End-of-sequence token ids of a checkpoint folder: `generation_config.json`, else
/// `config.json` (`eos_token_id`, a number or a list).
pub fn eos_token_ids(dir: &Path) -> Result<Vec<u32>> {
    special_token_ids(dir, "eos_token_id")
}

/// The beginning-of-sequence token (`bos_token_id`), where the checkpoint names one: what
/// generation starts from when a prompt is empty, as transformers' `generate` does.
pub fn bos_token_id(dir: &Path) -> Result<Option<u32>> {
    Ok(special_token_ids(dir, "bos_token_id")?.first().copied())
}

/// The ids under `key` in generation_config.json, else config.json (a number or a list).
fn special_token_ids(dir: &Path, key: &str) -> Result<Vec<u32>> {
    for file in ["generation_config.json", "config.json"] {
        if let Some(json) = read_json(&dir.join(file))? {
            let ids: Vec<u32> = match json.get(key) {
                Some(Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|n| n as u32)
                    .collect(),
                Some(Value::Null) | None => continue,
                Some(other) => bail!("{}: {key} {other} is not a token id", file),
            };
            return Ok(ids);
        }
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_chatml_template_with_python_methods() {
        let t = ChatTemplate {
            source: "{% for m in messages %}<|{{ m.role }}|>{{ m.content.strip() }}\n{% endfor %}\
                     {% if add_generation_prompt %}<|assistant|>{% endif %}"
                .into(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
        };
        let msgs = [Message {
            role: "user".into(),
            content: "  hi  ".into(),
        }];
        assert_eq!(t.render(&msgs, true).unwrap(), "<|user|>hi\n<|assistant|>");
        assert_eq!(t.render(&msgs, false).unwrap(), "<|user|>hi\n");
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = ChatTemplate {
            source: "{{ raise_exception('roles must alternate') }}".into(),
            bos_token: String::new(),
            eos_token: String::new(),
        };
        let err = t.render(&[], true).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }
}
