//! Stop strings over streamed text: text is released only when it can no
//! longer turn out to be the start of a stop string, and generation ends at
//! the first match, with the stop string itself left out (OpenAI semantics).

/// Matches stop strings in a stream of text pieces.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    released: usize,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for these (non-empty) stop strings.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            ..Self::default()
        }
    }

    /// Whether a stop string matched.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a piece; returns the text that is safe to release.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.text.push_str(piece);
        if self.stops.is_empty() {
            return self.release(self.text.len());
        }
        // A match may start in text already scanned but not released.
        let from = self.released;
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = first {
            self.stopped = true;
            self.text.truncate(at);
            return self.release(at);
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let mut keep_from = self.text.len();
        for s in &self.stops {
            for k in (1..s.len()).rev() {
                if k <= self.text.len() - from
                    && s.is_char_boundary(k)
                    && self.text.ends_with(&s[..k])
                {
                    keep_from = keep_from.min(self.text.len() - k);
                    break;
                }
            }
        }
        self.release(keep_from)
    }

    /// Everything not yet released (at the end of the stream).
    pub fn flush(&mut self) -> String {
        self.release(self.text.len())
    }

    fn release(&mut self, upto: usize) -> String {
        let upto = upto.max(self.released);
        let out = self.text[self.released..upto].to_string();
        self.released = upto;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            out.push_str(&m.push(p));
            if m.stopped() {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn no_stops_passes_through() {
        assert_eq!(run(&[], &["ab", "c"]), ("abc".into(), false));
    }

    #[test]
    fn stop_across_pieces_is_cut() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn partial_match_is_released_when_it_fails() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("xx ST"), "xx ");
        assert_eq!(m.push("AY"), "STAY");
        assert!(!m.stopped());
    }

    #[test]
    fn earliest_of_several_wins() {
        assert_eq!(run(&["b", "a"], &["xyab"]), ("xy".into(), true));
        assert_eq!(run(&["é"], &["caf", "é!"]), ("caf".into(), true));
    }
}
