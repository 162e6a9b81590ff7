//! Reasoning parsing (`--dyn-reasoning-parser`): a model's answer split into
//! its reasoning (`reasoning_content`) and the content, as the text streams.
//!
//! All the supported formats wrap the reasoning in `<think>…</think>`; they
//! differ in where it starts. `deepseek_r1` models get the opening tag from
//! the chat template, so the answer starts inside the reasoning (an opening
//! tag the model writes anyway is dropped) and an answer without `</think>`
//! is all reasoning. `qwen3` and `basic` reason only after an explicit
//! `<think>`; an answer without one is all content. Markers may arrive split
//! over several chunks: the few characters that could begin a marker are held
//! back until the next chunk says what they are.

/// A reasoning format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningFormat {
    /// DeepSeek-R1: implicit opening tag.
    DeepseekR1,
    /// Qwen3 thinking mode: explicit `<think>`.
    Qwen3,
    /// Any `<think>…</think>` model.
    Basic,
}

const START: &str = "<think>";
const END: &str = "</think>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before anything decided: R1 may still open with an explicit tag.
    Opening,
    /// Content, an opening tag still possible.
    BeforeReasoning,
    Reasoning,
    /// Reasoning is over: everything is content.
    Content,
}

/// One answer's splitter.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    state: State,
    held: String,
}

/// A piece of the answer, split.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    /// Reasoning text.
    pub reasoning: String,
    /// Content text.
    pub content: String,
}

impl ReasoningSplitter {
    /// A splitter for one answer in `format`.
    pub fn new(format: ReasoningFormat) -> Self {
        Self {
            state: match format {
                ReasoningFormat::DeepseekR1 => State::Opening,
                ReasoningFormat::Qwen3 | ReasoningFormat::Basic => State::BeforeReasoning,
            },
            held: String::new(),
        }
    }

    /// Splits the next piece of text.
    pub fn push(&mut self, text: &str) -> Split {
        let mut out = Split::default();
        self.held.push_str(text);
        loop {
            match self.state {
                State::Opening => {
                    let trimmed = self.held.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(START) {
                        self.held = rest.to_string();
                        self.state = State::Reasoning;
                    } else if START.starts_with(trimmed) {
                        return out; // maybe the tag, not complete yet
                    } else {
                        self.state = State::Reasoning;
                    }
                }
                State::BeforeReasoning => match self.held.find(START) {
                    Some(at) => {
                        out.content.push_str(&self.held[..at]);
                        self.held.drain(..at + START.len());
                        self.state = State::Reasoning;
                    }
                    None => {
                        let keep = partial_marker(&self.held, START);
                        let emit = self.held.len() - keep;
                        out.content.push_str(&self.held[..emit]);
                        self.held.drain(..emit);
                        return out;
                    }
                },
                State::Reasoning => match self.held.find(END) {
                    Some(at) => {
                        out.reasoning.push_str(&self.held[..at]);
                        self.held.drain(..at + END.len());
                        self.state = State::Content;
                    }
                    None => {
                        let keep = partial_marker(&self.held, END);
                        let emit = self.held.len() - keep;
                        out.reasoning.push_str(&self.held[..emit]);
                        self.held.drain(..emit);
                        return out;
                    }
                },
                State::Content => {
                    out.content.push_str(&self.held);
                    self.held.clear();
                    return out;
                }
            }
        }
    }

    /// The answer ended: what was held back, where it belongs.
    pub fn finish(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Opening | State::Reasoning => Split {
                reasoning: held,
                content: String::new(),
            },
            State::BeforeReasoning | State::Content => Split {
                reasoning: String::new(),
                content: held,
            },
        }
    }
}

/// Bytes at the end of `text` that could begin `marker` (held for the next chunk).
fn partial_marker(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(format: ReasoningFormat, pieces: &[&str]) -> Split {
        let mut s = ReasoningSplitter::new(format);
        let mut out = Split::default();
        let mut parts: Vec<Split> = pieces.iter().map(|p| s.push(p)).collect();
        parts.push(s.finish());
        for p in parts {
            out.reasoning.push_str(&p.reasoning);
            out.content.push_str(&p.content);
        }
        out
    }

    fn split(reasoning: &str, content: &str) -> Split {
        Split {
            reasoning: reasoning.into(),
            content: content.into(),
        }
    }

    #[test]
    fn each_format_finds_its_reasoning() {
        use ReasoningFormat::*;
        let text = "<think>two and two</think>It is 4.";
        for f in [DeepseekR1, Qwen3, Basic] {
            assert_eq!(whole(f, &[text]), split("two and two", "It is 4."), "{f:?}");
        }
        // R1's template opened the reasoning: no tag in the answer.
        assert_eq!(
            whole(DeepseekR1, &["two and two</think>It is 4."]),
            split("two and two", "It is 4.")
        );
        // Without an end, R1's answer is all reasoning; without a start, Qwen3's is all content.
        assert_eq!(
            whole(DeepseekR1, &["still thinking"]),
            split("still thinking", "")
        );
        assert_eq!(
            whole(Qwen3, &["no thinking here"]),
            split("", "no thinking here")
        );
        assert_eq!(
            whole(Basic, &["Sure. <think>why</think> Done."]),
            split("why", "Sure.  Done.")
        );
    }

    #[test]
    fn markers_split_over_chunks_are_found_at_every_cut() {
        use ReasoningFormat::*;
        let text = "<think>a < b</think>so <b> it is";
        for f in [DeepseekR1, Qwen3, Basic] {
            for cut in 0..=text.len() {
                for cut2 in cut..=text.len() {
                    let got = whole(f, &[&text[..cut], &text[cut..cut2], &text[cut2..]]);
                    assert_eq!(got, split("a < b", "so <b> it is"), "{f:?} at {cut}/{cut2}");
                }
            }
        }
    }

    #[test]
    fn text_is_never_lost_or_doubled() {
        let text = "x <thin y </thi z é <think>q</thinkk> r";
        let mut s = ReasoningSplitter::new(ReasoningFormat::Basic);
        let mut all = String::new();
        for c in text.chars() {
            let p = s.push(&c.to_string());
            all.push_str(&p.content);
            all.push_str(&p.reasoning);
        }
        let p = s.finish();
        all.push_str(&p.content);
        all.push_str(&p.reasoning);
        assert_eq!(all, text.replace("<think>", ""));
    }
}
