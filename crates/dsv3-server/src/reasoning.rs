//! Splitting an R1-style answer into `reasoning_content` (inside `<think>…</think>`) and
//! `content` (after it), as DeepSeek's own API and vLLM's `deepseek_r1` parser do.
//!
//! R1's chat template ends the generation prompt with `<think>\n`, so the model's output
//! starts inside the reasoning; other models may open with `<think>` themselves. Text arrives
//! in pieces: a piece that could be the start of a tag is held back until the next decides.

use dsv3_runtime::engine::partial_suffix;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Whether answers are split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReasoningMode {
    /// Split when the chat template opens a `<think>` block for the answer, or the answer
    /// opens one itself.
    #[default]
    Auto,
    /// Never split: everything is `content`.
    Off,
}

impl std::str::FromStr for ReasoningMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" | "deepseek-r1" => Ok(ReasoningMode::Auto),
            "off" | "none" => Ok(ReasoningMode::Off),
            _ => Err(format!("unknown reasoning mode `{s}` (auto, off)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before any text: a leading `<think>` opens the reasoning.
    Start,
    Reasoning,
    Content,
}

/// The split state of one answer.
#[derive(Debug, Clone)]
pub struct Splitter {
    state: State,
    held: String,
}

/// Text of one piece, by destination.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

impl Splitter {
    /// A splitter for an answer whose prompt ends as `prompt_tail` (the rendered chat prompt).
    pub fn new(mode: ReasoningMode, prompt_tail: &str) -> Self {
        let state = match mode {
            ReasoningMode::Off => State::Content,
            ReasoningMode::Auto if prompt_tail.trim_end().ends_with(OPEN) => State::Reasoning,
            ReasoningMode::Auto => State::Start,
        };
        Splitter { state, held: String::new() }
    }

    /// Whether any reasoning can appear (so `reasoning_content` belongs in the message).
    pub fn may_reason(&self) -> bool {
        self.state != State::Content || !self.held.is_empty()
    }

    /// Routes `piece`; text that may be the start of a tag is held back.
    pub fn push(&mut self, piece: &str) -> Split {
        self.held.push_str(piece);
        let mut out = Split::default();
        loop {
            match self.state {
                State::Start => {
                    let t = self.held.trim_start();
                    if let Some(rest) = t.strip_prefix(OPEN) {
                        self.held = rest.trim_start_matches('\n').to_string();
                        self.state = State::Reasoning;
                    } else if OPEN.starts_with(t) {
                        return out; // undecided (empty, or a prefix of the tag)
                    } else {
                        self.state = State::Content;
                    }
                }
                State::Reasoning => match self.held.find(CLOSE) {
                    Some(at) => {
                        out.reasoning.push_str(&self.held[..at]);
                        self.held = self.held[at + CLOSE.len()..].trim_start_matches('\n').to_string();
                        self.state = State::Content;
                    }
                    None => {
                        let keep = partial_suffix(&self.held, CLOSE);
                        let cut = self.held.len() - keep;
                        out.reasoning.push_str(&self.held[..cut]);
                        self.held.drain(..cut);
                        return out;
                    }
                },
                State::Content => {
                    out.content.push_str(&std::mem::take(&mut self.held));
                    return out;
                }
            }
        }
    }

    /// The end of the answer: whatever is held goes where it stands.
    pub fn finish(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Reasoning => Split { reasoning: held, content: String::new() },
            State::Start | State::Content => Split { reasoning: String::new(), content: held },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(mode: ReasoningMode, tail: &str, pieces: &[&str]) -> Split {
        let mut s = Splitter::new(mode, tail);
        let mut all = Split::default();
        let mut parts: Vec<Split> = pieces.iter().map(|p| s.push(p)).collect();
        parts.push(s.finish());
        for p in parts {
            all.reasoning.push_str(&p.reasoning);
            all.content.push_str(&p.content);
        }
        all
    }

    #[test]
    fn think_blocks_split_across_pieces() {
        let r1 = split_all(ReasoningMode::Auto, "<｜Assistant｜><think>\n", &["Let me ", "think.</th", "ink>\n\nThe answer", " is 4."]);
        assert_eq!(r1, Split { reasoning: "Let me think.".into(), content: "The answer is 4.".into() });
        let opened = split_all(ReasoningMode::Auto, "<｜Assistant｜>", &["<th", "ink>\nhm</think>ok"]);
        assert_eq!(opened, Split { reasoning: "hm".into(), content: "ok".into() });
        let plain = split_all(ReasoningMode::Auto, "<｜Assistant｜>", &["<b>bold</b>", " <think>x</think>"]);
        assert_eq!(plain, Split { reasoning: "".into(), content: "<b>bold</b> <think>x</think>".into() });
        let off = split_all(ReasoningMode::Off, "<think>\n", &["a</think>b"]);
        assert_eq!(off, Split { reasoning: "".into(), content: "a</think>b".into() });
        let unfinished = split_all(ReasoningMode::Auto, "<think>", &["still </thi"]);
        assert_eq!(unfinished, Split { reasoning: "still </thi".into(), content: "".into() });
        assert_eq!(split_all(ReasoningMode::Auto, "", &["<"]), Split { reasoning: "".into(), content: "<".into() });
    }
}
