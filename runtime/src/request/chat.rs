//! Chat messages and the model's chat template (Jinja, from `tokenizer_config.json`).

use minijinja::{Environment, ErrorKind, context};
use serde::Deserialize;

use crate::error::{Error, Result, SubmitError};

/// Used when a model ships no chat template: one line per message, then `assistant:`.
const FALLBACK_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
{% if add_generation_prompt %}assistant:{% endif %}";

/// One chat message as templates see it (content flattened to text).
#[derive(Debug, Clone)]
pub struct TemplateMessage {
    /// `system`, `user`, `assistant`, or another role the template knows.
    pub role: String,
    /// The message's text.
    pub content: String,
}

impl TemplateMessage {
    fn to_value(&self) -> minijinja::Value {
        let map: std::collections::BTreeMap<&str, minijinja::Value> =
            [("role", self.role.as_str().into()), ("content", self.content.as_str().into())].into_iter().collect();
        minijinja::Value::from(map)
    }
}

/// Message content: a string, or a list of parts of which only text parts are supported.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// OpenAI content parts.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// Part type; only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// A chat message as the OpenAI API sends it.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// The author's role.
    pub role: String,
    /// The content (may be null for some assistant messages).
    #[serde(default)]
    pub content: Option<MessageContent>,
}

impl ChatMessage {
    /// The message with its content as plain text, or an error naming the offending part.
    pub fn to_template(&self, index: usize) -> Result<TemplateMessage> {
        let content = match &self.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut out = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        _ => {
                            return Err(invalid(
                                format!("messages[{index}].content[{j}]"),
                                format!("content part of type `{}` is not supported (text only)", p.kind),
                            ));
                        }
                    }
                }
                out
            }
        };
        Ok(TemplateMessage { role: self.role.clone(), content })
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compiles the model's template (or the fallback); `bos`/`eos` are the special tokens' text.
    pub fn new(template: Option<&str>, bos: Option<&str>, eos: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", template.unwrap_or(FALLBACK_TEMPLATE).to_string()).map_err(|e| {
            let message = format!("does not compile: {e}");
            Error::config_because("tokenizer_config.json", "chat_template", message, e)
        })?;
        Ok(ChatTemplate { env, bos: bos.unwrap_or_default().to_string(), eos: eos.unwrap_or_default().to_string() })
    }

    /// Renders a conversation, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[TemplateMessage]) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| invalid("messages".into(), e.to_string()))?;
        tmpl.render(context! {
            messages => messages.iter().map(TemplateMessage::to_value).collect::<Vec<_>>(),
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
            add_generation_prompt => true,
        })
        .map_err(|e| invalid("messages".into(), format!("the chat template refused the messages: {e}")))
    }
}

/// A request field at fault.
fn invalid(param: String, message: String) -> Error {
    SubmitError::InvalidField { param: Some(param), message }.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<TemplateMessage> {
        pairs.iter().map(|(r, c)| TemplateMessage { role: r.to_string(), content: c.to_string() }).collect()
    }

    #[test]
    fn renders_a_hub_style_template() {
        let t = ChatTemplate::new(
            Some("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content.strip() }} [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"),
            Some("<s>"),
            Some("</s>"),
        )
        .expect("compiles");
        let out = t.render(&msgs(&[("user", "  hi "), ("assistant", "hello"), ("user", "bye")])).expect("renders");
        assert_eq!(out, "<s>[INST] hi [/INST]hello</s>[INST] bye [/INST]");
    }

    #[test]
    fn raise_exception_is_a_400() {
        let t = ChatTemplate::new(Some("{{ raise_exception('roles must alternate') }}"), None, None).expect("compiles");
        let e = t.render(&msgs(&[("user", "x")])).expect_err("refused");
        assert!(matches!(&e, Error::Submit(SubmitError::InvalidField { param: Some(p), .. }) if p == "messages"));
        assert!(e.to_string().contains("roles must alternate"));
    }

    #[test]
    fn fallback_without_a_template() {
        let t = ChatTemplate::new(None, Some("<s>"), None).expect("compiles");
        assert_eq!(t.render(&msgs(&[("user", "hi")])).expect("renders"), "<s>user: hi\nassistant:");
    }

    /// The templates the families ship (tests/fixtures/chat_templates, as published) render a
    /// system message and a multi-turn conversation, ending with the assistant's turn opened.
    #[test]
    fn the_families_own_templates_render() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chat_templates");
        let turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Again")];
        let cases = [
            ("qwen2.5-instruct.jinja", "<|im_start|>assistant\n", "<|im_start|>system\nBe brief."),
            ("qwen3.jinja", "<|im_start|>assistant\n", "<|im_start|>user\nAgain<|im_end|>"),
            ("mistral-instruct-v0.3.jinja", "[/INST]", "[INST] Be brief.\n\nAgain[/INST]"),
            ("gemma3-it.jinja", "<start_of_turn>model\n", "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>"),
        ];
        for (file, ends, holds) in cases {
            let text = std::fs::read_to_string(dir.join(file)).expect("template");
            let t = ChatTemplate::new(Some(&text), Some("<bos>"), Some("<eos>")).expect("compiles");
            let out = t.render(&msgs(&turns)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(out.ends_with(ends), "{file}: {out:?}");
            assert!(out.contains(holds), "{file}: {out:?}");
        }
    }
}
