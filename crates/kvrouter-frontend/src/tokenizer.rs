//! Preprocessing: text to tokens (a Hugging Face `tokenizer.json`), chat
//! messages to a prompt (the model's Jinja chat template), and tokens back to
//! text, incrementally, for streaming.
//!
//! `--model-path DIR` reads `DIR/tokenizer.json` and, when present,
//! `DIR/tokenizer_config.json` (chat template, special tokens, context
//! length); `--custom-jinja-template FILE` replaces the template. Without a
//! model path the built-in tokenizer is used: a 4,096-token byte-level BPE
//! trained by `tools/make_tokenizer.py` on this repository's own text
//! (Apache-2.0, like the project), with a ChatML template.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::token_cache::TokenCache;

const BUILTIN_TOKENIZER: &[u8] = include_bytes!("../assets/tokenizer.json");
const BUILTIN_CONFIG: &str = include_str!("../assets/tokenizer_config.json");
/// Context length when the model declares none.
pub const DEFAULT_CONTEXT_LENGTH: u32 = 32_768;
/// The chat template's name in its environment.
const TEMPLATE: &str = "chat";

/// Why a tokenizer or template could not be loaded or applied.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tokenizer is not valid.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template is not valid or failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// `tokenizer_config.json` is not valid.
    #[error("tokenizer_config.json: {0}")]
    Config(String),
}

#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<Value>,
    #[serde(default)]
    bos_token: Option<Value>,
    #[serde(default)]
    eos_token: Option<Value>,
    #[serde(default)]
    model_max_length: Option<f64>,
}

/// A special token given as a string or as `{"content": ...}`.
fn token_text(v: &Option<Value>) -> Option<String> {
    match v.as_ref()? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// An environment holding `source` as [`TEMPLATE`], with what Hugging Face
/// templates expect of Jinja (Python string methods, `raise_exception`).
fn chat_environment(source: String) -> Result<minijinja::Environment<'static>, PreprocessError> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template_owned(TEMPLATE, source)
        .map_err(|e| PreprocessError::Template(e.to_string()))?;
    Ok(env)
}

/// A model's tokenizer and chat template.
pub struct Preprocessor {
    tokenizer: tokenizers::Tokenizer,
    /// Encoded pieces of recurring text (system prompts, earlier turns).
    cache: TokenCache,
    /// The chat template, compiled once, as [`TEMPLATE`] in its environment.
    template: Option<minijinja::Environment<'static>>,
    bos: Option<String>,
    eos: Option<String>,
    eos_token_ids: Vec<u32>,
    context_length: u32,
    /// Ids of ordinary (non-special) tokens, for mock generation.
    ordinary: std::ops::Range<u32>,
    /// Token ids run from 0 to this (added tokens included).
    vocab_size: u32,
    /// No token covers more bytes of text than this.
    max_token_bytes: usize,
}

impl std::fmt::Debug for Preprocessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preprocessor")
            .field("context_length", &self.context_length)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, PreprocessError> {
    std::fs::read_to_string(path).map_err(|source| PreprocessError::Io {
        path: path.display().to_string(),
        source,
    })
}

impl Preprocessor {
    /// The built-in tokenizer (see the module docs).
    pub fn builtin() -> Self {
        let tokenizer = tokenizers::Tokenizer::from_bytes(BUILTIN_TOKENIZER)
            .expect("the built-in tokenizer is valid");
        let config: TokenizerConfig =
            serde_json::from_str(BUILTIN_CONFIG).expect("the built-in config is valid");
        Self::assemble(tokenizer, config, None).expect("the built-in template is valid")
    }

    /// Loads `dir/tokenizer.json` (and `tokenizer_config.json` if present).
    pub fn load(dir: &Path, custom_template: Option<&Path>) -> Result<Self, PreprocessError> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| PreprocessError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let config = if cfg_path.exists() {
            serde_json::from_str(&read(&cfg_path)?)
                .map_err(|e| PreprocessError::Config(e.to_string()))?
        } else {
            TokenizerConfig::default()
        };
        let custom = custom_template.map(read).transpose()?;
        Self::assemble(tokenizer, config, custom)
    }

    /// The built-in tokenizer with another template.
    pub fn builtin_with_template(path: &Path) -> Result<Self, PreprocessError> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(BUILTIN_TOKENIZER)
            .expect("the built-in tokenizer is valid");
        let config: TokenizerConfig =
            serde_json::from_str(BUILTIN_CONFIG).expect("the built-in config is valid");
        Self::assemble(tokenizer, config, Some(read(path)?))
    }

    fn assemble(
        tokenizer: tokenizers::Tokenizer,
        config: TokenizerConfig,
        custom: Option<String>,
    ) -> Result<Self, PreprocessError> {
        let template = match custom {
            Some(t) => Some(t),
            None => match &config.chat_template {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: use "default", else the first.
                Some(Value::Array(items)) => items
                    .iter()
                    .find(|i| i.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| items.first())
                    .and_then(|i| i.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            },
        };
        // Compiled once, so a broken template fails at start-up, not per request.
        let template = template.map(chat_environment).transpose()?;
        let bos = token_text(&config.bos_token);
        let eos = token_text(&config.eos_token);
        let eos_token_ids = eos
            .as_deref()
            .and_then(|e| tokenizer.token_to_id(e))
            .into_iter()
            .collect();
        let vocab = tokenizer.get_vocab_size(true) as u32;
        let specials = tokenizer
            .get_added_tokens_decoder()
            .keys()
            .copied()
            .filter(|&id| id < vocab)
            .max()
            .map_or(0, |m| m + 1);
        let ordinary = if specials < vocab {
            specials..vocab
        } else {
            0..vocab.max(1)
        };
        // A vocabulary entry of n characters stands for at most 4n bytes of
        // UTF-8 text (byte-level BPE spells each byte as one character).
        let max_token_bytes = tokenizer
            .get_vocab(true)
            .keys()
            .map(|k| k.chars().count() * 4)
            .max()
            .unwrap_or(1)
            .max(1);
        let context_length = config
            .model_max_length
            .filter(|v| v.is_finite() && *v >= 1.0 && *v < 1e9)
            .map_or(DEFAULT_CONTEXT_LENGTH, |v| v as u32);
        Ok(Self {
            vocab_size: vocab,
            max_token_bytes,
            cache: TokenCache::new(&tokenizer),
            tokenizer,
            template,
            bos,
            eos,
            eos_token_ids,
            context_length,
            ordinary,
        })
    }

    /// `kvrouter_frontend_prompt_cache_hits_total`, for the frontend's registry.
    pub fn prompt_cache_hits(&self) -> prometheus::IntCounter {
        self.cache.hits().clone()
    }

    /// The same, with a context length set by the operator (`--context-length`).
    pub fn with_context_length(mut self, tokens: u32) -> Self {
        self.context_length = tokens;
        self
    }

    /// The model's context length in tokens.
    pub fn context_length(&self) -> u32 {
        self.context_length
    }

    /// End-of-sequence token ids.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Token ids are below this.
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// The fewest tokens `text` can encode to, known without encoding it: an
    /// oversized prompt is refused before the (costly) tokenizer runs.
    pub fn min_tokens(&self, text: &str) -> usize {
        text.len().div_ceil(self.max_token_bytes)
    }

    /// Ordinary token ids (specials excluded).
    pub fn ordinary_tokens(&self) -> std::ops::Range<u32> {
        self.ordinary.clone()
    }

    /// Tokens of `text` (special tokens in the text are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PreprocessError> {
        self.cache
            .encode(&self.tokenizer, text)
            .map_err(|e| PreprocessError::Tokenizer(e.to_string()))
    }

    /// The prompt for chat `messages` (`[{"role","content"}]`), generation prompt added.
    pub fn render_chat(
        &self,
        messages: &Value,
        tools: Option<&Value>,
    ) -> Result<String, PreprocessError> {
        let Some(template) = &self.template else {
            // No template: the messages' contents, one per line.
            let mut out = String::new();
            for m in messages.as_array().into_iter().flatten() {
                if let Some(c) = m.get("content").and_then(Value::as_str) {
                    out.push_str(c);
                    out.push('\n');
                }
            }
            return Ok(out);
        };
        let t = template
            .get_template(TEMPLATE)
            .map_err(|e| PreprocessError::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => true,
            bos_token => self.bos.clone().unwrap_or_default(),
            eos_token => self.eos.clone().unwrap_or_default(),
        };
        t.render(ctx)
            .map_err(|e| PreprocessError::Template(e.to_string()))
    }

    /// An incremental decoder for one stream of tokens.
    pub fn decoder(self: &std::sync::Arc<Self>) -> Detokenizer {
        Detokenizer {
            pre: self.clone(),
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }
}

/// Turns a stream of token ids into text pieces, never splitting a UTF-8
/// character or a multi-token glyph (a piece is released only once the
/// decoded text no longer ends in a replacement character).
pub struct Detokenizer {
    pre: std::sync::Arc<Preprocessor>,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let decode = |ids: &[u32]| self.pre.tokenizer.decode(ids, true).unwrap_or_default();
        let before = decode(&self.ids[self.prefix..self.read]);
        let now = decode(&self.ids[self.prefix..]);
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let piece = now.get(before.len()..).unwrap_or_default().to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            piece
        } else {
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_round_trips_text() {
        let p = std::sync::Arc::new(Preprocessor::builtin());
        let text = "KV-aware routing: the longest cached prefix wins — ünïcödé ✓";
        let ids = p.encode(text).unwrap();
        assert!(ids.len() > 5);
        let mut d = p.decoder();
        let streamed: String = ids.iter().map(|&i| d.push(i)).collect();
        assert_eq!(streamed, text);
        assert_eq!(p.context_length(), 32_768);
        assert_eq!(p.eos_token_ids().len(), 1);
        assert!(p.ordinary_tokens().start >= 3);
    }

    #[test]
    fn chat_template_renders_chatml() {
        let p = Preprocessor::builtin();
        let msgs = serde_json::json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"}
        ]);
        let prompt = p.render_chat(&msgs, None).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        // Special tokens in the rendered prompt are single tokens.
        let ids = p.encode(&prompt).unwrap();
        let start = p.tokenizer.token_to_id("<|im_start|>").unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == start).count(), 3);
    }

    #[test]
    fn model_dir_and_custom_template() {
        let dir = std::env::temp_dir().join(format!("kvr-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), BUILTIN_TOKENIZER).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template":"{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}","eos_token":{"content":"<|endoftext|>"},"model_max_length":4096}"#,
        )
        .unwrap();
        let p = Preprocessor::load(&dir, None).unwrap();
        assert_eq!(p.context_length(), 4096);
        let msgs = serde_json::json!([{"role": "user", "content": "x"}]);
        assert_eq!(p.render_chat(&msgs, None).unwrap(), "[user] x\n");
        let custom = dir.join("custom.jinja");
        std::fs::write(&custom, "{{ messages | length }} message(s)").unwrap();
        let p = Preprocessor::load(&dir, Some(&custom)).unwrap();
        assert_eq!(p.render_chat(&msgs, None).unwrap(), "1 message(s)");
        std::fs::write(&custom, "{% for %}").unwrap();
        assert!(matches!(
            Preprocessor::load(&dir, Some(&custom)),
            Err(PreprocessError::Template(_))
        ));
        assert!(matches!(
            Preprocessor::load(&dir.join("missing"), None),
            Err(PreprocessError::Tokenizer(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
