//! A model folder's chat template, rendered as transformers' `apply_chat_template` renders it:
//! the Jinja source from `chat_template.jinja` (transformers 5) or `tokenizer_config.json`'s
//! `chat_template`, trim_blocks and lstrip_blocks on, with `messages`, `add_generation_prompt`
//! and the special tokens `bos_token` / `eos_token` in scope and `raise_exception` defined.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use serde_json::Value;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    /// The file the template came from, for error messages.
    path: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl ChatTemplate {
    /// The template of the model folder `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| anyhow!("{}: malformed JSON: {e}", config_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(e) => bail!("{}: cannot read: {e}", config_path.display()),
        };
        let jinja = dir.join("chat_template.jinja");
        let (source, path) = if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja).map_err(|e| anyhow!("{}: cannot read: {e}", jinja.display()))?;
            (source, jinja)
        } else {
            let source = match config.get("chat_template") {
                Some(Value::String(s)) => s.clone(),
                // Several named templates: transformers uses the one called "default".
                Some(Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str())
                    .ok_or_else(|| anyhow!("{}: chat_template lists no template named \"default\"", config_path.display()))?
                    .to_owned(),
                Some(other) => bail!("{}: chat_template must be a string, found {other}", config_path.display()),
                None => {
                    bail!("{}: the model has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json)", dir.display())
                }
            };
            (source, config_path)
        };
        Ok(Self { source, path, bos_token: special_token(&config, "bos_token"), eos_token: special_token(&config, "eos_token") })
    }

    /// A template given as source; `path` names it in errors.
    pub fn from_source(source: &str, path: &Path) -> Self {
        Self { source: source.into(), path: path.into(), bos_token: None, eos_token: None }
    }

    /// The prompt text for `messages`; `add_generation_prompt` appends the opening of the
    /// assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        // transformers renders with these two on (and keeps no trailing newline).
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        let where_ = self.path.display();
        let template = env.template_from_str(&self.source).map_err(|e| anyhow!("{where_}: invalid chat template: {e}"))?;
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        template.render(context).map_err(|e| anyhow!("{where_}: cannot render the chat template: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_template_and_exceptions_are_one_line_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", ChatTemplate::load(dir.path()).unwrap_err());
        assert!(err.contains("has no chat template"), "{err}");
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": 3}"#).unwrap();
        let err = format!("{:#}", ChatTemplate::load(dir.path()).unwrap_err());
        assert!(err.contains("tokenizer_config.json: chat_template must be a string"), "{err}");

        let template = ChatTemplate::from_source("{{ raise_exception('roles must alternate') }}", Path::new("t.jinja"));
        let err = format!("{:#}", template.render(&[ChatMessage::new("user", "x")], true).unwrap_err());
        assert!(err.starts_with("t.jinja: cannot render the chat template") && err.contains("roles must alternate"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[test]
    fn chat_template_jinja_wins_and_special_tokens_are_in_scope() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": "unused", "bos_token": {"content": "<s>"}, "eos_token": "</s>"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{{ bos_token }}{% for m in messages %}\n  {{ m.role }}: {{ m.content }}{{ eos_token }}\n{% endfor %}\n",
        )
        .unwrap();
        let text =
            ChatTemplate::load(dir.path()).unwrap().render(&[ChatMessage::new("user", "hi"), ChatMessage::new("assistant", "yes")], false).unwrap();
        // trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before one.
        assert_eq!(text, "<s>  user: hi</s>\n  assistant: yes</s>\n");
    }
}
