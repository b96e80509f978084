//! The text side of one generated sequence: streaming detokenisation and stop strings.
//!
//! Stop strings are matched on the detokenised text, never emitted, and never split across
//! what has been emitted: text that could still be the start of a stop string is held back
//! until the next token decides it. So the concatenation of every emitted piece is exactly the
//! text up to (not including) the first stop string.

use crate::error::Result;
use crate::tokenizer::StreamDecoder;

/// What one token did to the text.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Text that is final and may be sent.
    pub text: String,
    /// A stop string was found: generation ends, nothing after it is emitted.
    pub stopped: bool,
}

/// Detokeniser plus stop-string matcher of one sequence.
#[derive(Debug)]
pub(crate) struct TextState {
    dec: Option<StreamDecoder<'static>>,
    stops: Vec<String>,
    /// Decoded text not yet emitted (it may be the start of a stop string).
    held: String,
}

impl TextState {
    /// `dec` is `None` for a model without a tokenizer (then no text, and no stop strings:
    /// the engine refuses those at submission).
    pub fn new(dec: Option<StreamDecoder<'static>>, stops: Vec<String>) -> Self {
        TextState { dec, stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    /// Adds token `id` (not an end-of-sequence token: those have no text here).
    pub fn push(&mut self, id: u32) -> Result<Piece> {
        let Some(dec) = self.dec.as_mut() else { return Ok(Piece::default()) };
        let piece = dec.push(id)?;
        self.held.push_str(&piece);
        Ok(self.release())
    }

    /// Ends the text (EOS, length, cancel): everything held back, plus what the decoder held
    /// (an incomplete UTF-8 sequence, as U+FFFD), up to a stop string if that completes one.
    pub fn finish(&mut self) -> Result<Piece> {
        if let Some(dec) = self.dec.as_mut() {
            let rest = dec.finish()?;
            self.held.push_str(&rest);
        }
        let mut p = self.release();
        if !p.stopped {
            p.text.push_str(&std::mem::take(&mut self.held));
        }
        Ok(p)
    }

    /// Emits the part of `held` that cannot be the start of a stop string, or everything
    /// before the first stop string found.
    fn release(&mut self) -> Piece {
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first {
            let text = self.held[..at].to_string();
            self.held.clear();
            return Piece { text, stopped: true };
        }
        let keep = self.stops.iter().map(|s| partial_suffix(&self.held, s)).max().unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Piece { text, stopped: false }
    }
}

/// The length in bytes of the longest suffix of `text` that is a proper prefix of `stop`
/// (always on a character boundary of `text`): what a streaming matcher must hold back.
pub fn partial_suffix(text: &str, stop: &str) -> usize {
    let max = (stop.len() - 1).min(text.len());
    (1..=max).rev().find(|&n| text.is_char_boundary(text.len() - n) && stop.starts_with(&text[text.len() - n..])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A text state fed already-decoded pieces (the decoder itself is tested with the tokenizer).
    fn run(pieces: &[&str], stops: &[&str]) -> (String, bool) {
        let mut t = TextState::new(None, stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            t.held.push_str(p);
            let r = t.release();
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        let r = t.finish().unwrap();
        out.push_str(&r.text);
        (out, r.stopped)
    }

    #[test]
    fn stop_strings_are_cut_and_never_emitted_in_part() {
        assert_eq!(run(&["Hello", " wor", "ld"], &["world"]), ("Hello ".into(), true));
        assert_eq!(run(&["ab", "c##", "d"], &["##"]), ("abc".into(), true));
        // A partial match that does not complete is released at the end.
        assert_eq!(run(&["ab", "c#"], &["##"]), ("abc#".into(), false));
        // Held back while undecided, released once it cannot match.
        let mut t = TextState::new(None, vec!["END".into()]);
        t.held.push_str("xxEN");
        assert_eq!(t.release().text, "xx");
        t.held.push('x');
        assert_eq!(t.release().text, "ENx");
        // The earliest of several stops wins; multi-byte text stays on char boundaries.
        assert_eq!(run(&["日本語", "です。", "終"], &["。", "本語で"]), ("日".into(), true));
        assert_eq!(run(&["no stops"], &[]), ("no stops".into(), false));
        assert_eq!(run(&["x"], &[""]), ("x".into(), false));
    }

    #[test]
    fn partial_suffix_is_the_longest_proper_prefix() {
        assert_eq!(partial_suffix("abcab", "abc"), 2);
        assert_eq!(partial_suffix("abc", "abc"), 0, "a whole match is not partial");
        assert_eq!(partial_suffix("aaa", "aab"), 2);
        assert_eq!(partial_suffix("é", "éa"), 2);
        assert_eq!(partial_suffix("", "x"), 0);
    }
}
