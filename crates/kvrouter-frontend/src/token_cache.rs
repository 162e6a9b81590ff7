//! Tokenizing repeated text once. A prompt is cut where the tokenizer itself
//! cuts it — at its added tokens, which is where a chat template's role
//! markers sit — and every piece is looked up by content
//! in a bounded cache before it is encoded. System prompts and the earlier
//! turns of a conversation, the text a KV router sees again and again, are
//! then encoded once instead of on every request.
//!
//! Encoding the pieces one by one gives the tokenizer's own answer only when a
//! piece is encoded the same alone as in its place: the normalizer must be
//! idempotent (none, NFC, NFKC) and the pre-tokenizer must treat every piece
//! alike (byte-level BPE as in Llama 3, Qwen or GPT-style tokenizers; not
//! SentencePiece's "prepend to the first piece"), with no truncation and no
//! single-word added tokens. Other tokenizers encode whole, uncached. The cache
//! also checks itself: the first encodings it serves from cache, and one in
//! [`CHECK_EVERY`] after that, are compared with a plain encoding, and any
//! difference turns it off for good (logged once).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use aho_corasick::{AhoCorasick, MatchKind};
use tokenizers::{
    NormalizerWrapper, OffsetReferential, OffsetType, PreTokenizerWrapper, Tokenizer,
};

/// Texts shorter than this (bytes) are encoded whole: cutting saves nothing.
const SHORT_TEXT: usize = 128;
/// Encodings checked against a plain encoding before sampling starts.
const CHECK_FIRST: u64 = 16;
/// After the first checks, one encoding served from cache in this many is checked.
pub const CHECK_EVERY: u64 = 64;

/// Tokens held at most (4 bytes each), across all pieces.
const CAPACITY_TOKENS: u64 = 4 << 20;

#[derive(Clone)]
struct ByTokens;

impl quick_cache::Weighter<u128, Arc<[u32]>> for ByTokens {
    fn weight(&self, _: &u128, v: &Arc<[u32]>) -> u64 {
        v.len().max(1) as u64
    }
}

/// Encoded pieces by content (see the module docs).
pub(crate) struct TokenCache {
    pieces: quick_cache::sync::Cache<u128, Arc<[u32]>, ByTokens>,
    /// The added tokens and their ids, when the tokenizer finds them by a plain
    /// leftmost-longest search of the raw text (see [`direct_split`]).
    added: Option<(AhoCorasick, Vec<u32>)>,
    on: AtomicBool,
    served: AtomicU64,
    /// `kvrouter_frontend_prompt_cache_hits_total`: pieces served from the cache.
    hits: prometheus::IntCounter,
}

/// Whether `tok` encodes a piece alone exactly as within a longer text.
pub(crate) fn piecewise_exact(tok: &Tokenizer) -> bool {
    fn pre_ok(p: &PreTokenizerWrapper) -> bool {
        match p {
            PreTokenizerWrapper::Sequence(s) => s.as_ref().iter().all(pre_ok),
            // The first piece is treated differently from the rest.
            PreTokenizerWrapper::Metaspace(_) => false,
            _ => true,
        }
    }
    let normalizer_ok = match tok.get_normalizer() {
        None => true,
        Some(NormalizerWrapper::NFC(_) | NormalizerWrapper::NFKC(_)) => true,
        Some(_) => false,
    };
    let pre_tokenizer_ok = tok.get_pre_tokenizer().is_none_or(pre_ok);
    let added_ok = tok
        .get_added_tokens_decoder()
        .values()
        .all(|t| !t.single_word);
    normalizer_ok
        && pre_tokenizer_ok
        && added_ok
        && tok.get_truncation().is_none()
        && tok.get_padding().is_none()
}

/// A searcher that cuts text at added tokens exactly as `tok` does, when that
/// is a plain leftmost-longest search of the raw text: no normalizer, and no
/// added token that is normalized, strips spaces or must be a single word.
/// It spares the tokenizer's own split, which maps every byte of the prompt.
fn direct_split(tok: &Tokenizer) -> Option<(AhoCorasick, Vec<u32>)> {
    let added = tok.get_added_tokens_decoder();
    let plain_search = tok.get_normalizer().is_none()
        && !tok.get_encode_special_tokens()
        && added
            .values()
            .all(|t| !t.normalized && !t.lstrip && !t.rstrip && !t.single_word);
    if !plain_search || added.is_empty() {
        return None;
    }
    let (ids, contents): (Vec<u32>, Vec<&str>) = added
        .iter()
        .map(|(id, t)| (*id, t.content.as_str()))
        .unzip();
    let searcher = AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .build(contents)
        .ok()?;
    Some((searcher, ids))
}

/// A piece of a prompt: an added token, or the text between two of them.
enum Piece<'a> {
    Added(u32),
    Text(&'a str),
}

fn plain(tok: &Tokenizer, text: &str) -> tokenizers::Result<Vec<u32>> {
    // `encode_fast` skips the character offsets, which routing never reads.
    Ok(tok.encode_fast(text, false)?.get_ids().to_vec())
}

impl TokenCache {
    /// A cache for `tok`, off when pieces of its text cannot be encoded alone.
    pub(crate) fn new(tok: &Tokenizer) -> Self {
        let on = piecewise_exact(tok);
        if !on {
            tracing::debug!(
                "this tokenizer encodes pieces differently in context; prompt cache off"
            );
        }
        Self {
            pieces: quick_cache::sync::Cache::with_weighter(16_384, CAPACITY_TOKENS, ByTokens),
            added: direct_split(tok),
            on: AtomicBool::new(on),
            served: AtomicU64::new(0),
            hits: prometheus::IntCounter::new(
                "kvrouter_frontend_prompt_cache_hits_total",
                "Prompt pieces (system prompts, earlier turns) whose tokens came from the cache",
            )
            .expect("a valid metric name"),
        }
    }

    /// Whether encodings go through the cache.
    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Pieces served from the cache, as a counter to register.
    pub(crate) fn hits(&self) -> &prometheus::IntCounter {
        &self.hits
    }

    /// The tokens of `text`, as `tok.encode_fast(text, false)` gives them.
    pub(crate) fn encode(&self, tok: &Tokenizer, text: &str) -> tokenizers::Result<Vec<u32>> {
        if !self.is_on() || text.len() < SHORT_TEXT {
            return plain(tok, text);
        }
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut hits = 0;
        let mut take = |piece: Piece<'_>| -> tokenizers::Result<()> {
            match piece {
                Piece::Added(id) => ids.push(id),
                Piece::Text("") => {}
                Piece::Text(t) => {
                    let key = xxhash_rust::xxh3::xxh3_128(t.as_bytes());
                    if let Some(found) = self.pieces.get(&key) {
                        hits += 1;
                        ids.extend_from_slice(&found);
                    } else {
                        let fresh: Arc<[u32]> = plain(tok, t)?.into();
                        ids.extend_from_slice(&fresh);
                        self.pieces.insert(key, fresh);
                    }
                }
            }
            Ok(())
        };
        if let Some((searcher, added)) = &self.added {
            let mut at = 0;
            for m in searcher.find_iter(text) {
                take(Piece::Text(&text[at..m.start()]))?;
                take(Piece::Added(added[m.pattern().as_usize()]))?;
                at = m.end();
            }
            take(Piece::Text(&text[at..]))?;
        } else {
            let split = tok
                .get_added_vocabulary()
                .extract_and_normalize(tok.get_normalizer(), text);
            for (piece, _, added) in
                split.get_splits(OffsetReferential::Normalized, OffsetType::None)
            {
                match added {
                    Some(tokens) => tokens.iter().try_for_each(|t| take(Piece::Added(t.id)))?,
                    None => take(Piece::Text(piece))?,
                }
            }
        }
        if hits > 0 {
            self.hits.inc_by(hits);
            let n = self.served.fetch_add(1, Ordering::Relaxed);
            if n < CHECK_FIRST || n % CHECK_EVERY == 0 {
                let whole = plain(tok, text)?;
                if whole != ids {
                    self.on.store(false, Ordering::Relaxed);
                    self.pieces.clear();
                    tracing::error!(
                        "prompt cache: a cached encoding differed from the tokenizer's own \
                         ({} vs {} tokens); the cache is off from now on",
                        ids.len(),
                        whole.len()
                    );
                    return Ok(whole);
                }
            }
        }
        Ok(ids)
    }

    /// Replaces the cached tokens of `piece` (a test's way to corrupt the cache).
    #[cfg(test)]
    fn poison(&self, piece: &str, ids: Vec<u32>) {
        let key = xxhash_rust::xxh3::xxh3_128(piece.as_bytes());
        self.pieces.insert(key, ids.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn builtin() -> Tokenizer {
        Tokenizer::from_bytes(include_bytes!("../assets/tokenizer.json")).unwrap()
    }

    const WORDS: &[&str] = &[
        "routing",
        " cache",
        "  ",
        "\n",
        "prefix",
        "ünïcödé",
        "✓",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "block",
        "'s",
        " 1234",
        "\t",
        "KV-aware",
        "!",
        " the",
        "<|im_",
        "|>",
    ];

    fn text(rng: &mut rand::rngs::StdRng, words: usize) -> String {
        (0..words)
            .map(|_| WORDS[rng.random_range(0..WORDS.len())])
            .collect()
    }

    #[test]
    fn cached_encodings_equal_the_tokenizers_own() {
        // The direct cut at added tokens, and the tokenizer's own (NFC normalizer).
        let mut nfc = builtin();
        nfc.with_normalizer(Some(NormalizerWrapper::NFC(tokenizers::normalizers::NFC)))
            .unwrap();
        for (tok, direct) in [(builtin(), true), (nfc, false)] {
            encodings_match(&tok, direct);
        }
    }

    fn encodings_match(tok: &Tokenizer, direct: bool) {
        let tok = tok.clone();
        let cache = TokenCache::new(&tok);
        assert!(cache.is_on());
        assert_eq!(cache.added.is_some(), direct);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let shared: Vec<String> = (0..5).map(|_| text(&mut rng, 120)).collect();
        for i in 0..150 {
            let system = &shared[i % shared.len()];
            let prompt = format!(
                "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                text(&mut rng, 1 + i % 40)
            );
            assert_eq!(
                cache.encode(&tok, &prompt).unwrap(),
                plain(&tok, &prompt).unwrap(),
                "{prompt:?}"
            );
            // Arbitrary text too, special tokens anywhere.
            let odd = text(&mut rng, 200);
            assert_eq!(
                cache.encode(&tok, &odd).unwrap(),
                plain(&tok, &odd).unwrap()
            );
        }
        assert!(cache.is_on());
        assert!(cache.hits().get() > 200, "{}", cache.hits().get());
    }

    #[test]
    fn a_wrong_entry_is_caught_and_turns_the_cache_off() {
        let tok = builtin();
        let cache = TokenCache::new(&tok);
        let system = "Answer as the router's design document would, briefly. ".repeat(4);
        let prompt = format!("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nhi");
        let right = plain(&tok, &prompt).unwrap();
        cache.poison(&format!("system\n{system}"), vec![1, 2, 3]);
        assert_eq!(cache.encode(&tok, &prompt).unwrap(), right);
        assert!(!cache.is_on());
        assert_eq!(cache.encode(&tok, &prompt).unwrap(), right);
    }

    #[test]
    fn sentencepiece_style_tokenizers_are_not_cut() {
        let mut tok = builtin();
        tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(
            tokenizers::pre_tokenizers::metaspace::Metaspace::default(),
        )));
        assert!(!piecewise_exact(&tok));
        let mut tok = builtin();
        tok.with_normalizer(Some(NormalizerWrapper::Lowercase(
            tokenizers::normalizers::Lowercase,
        )))
        .unwrap();
        assert!(!piecewise_exact(&tok));
        assert!(piecewise_exact(&builtin()));
    }
}
