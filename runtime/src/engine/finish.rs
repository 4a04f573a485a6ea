//! How a request ends: its finish reason, and the stop-string scanner that finds one.

/// Why a request finished: the one answer the engine gives, which the API and the ledger read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the model's context was reached.
    Length,
    /// The caller cancelled or went away.
    Cancelled,
    /// The request's deadline passed.
    Deadline,
}

impl FinishReason {
    /// The reason as the ledger records it (every reason distinct).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Deadline => "deadline",
        }
    }

    /// The reason in OpenAI's `finish_reason` vocabulary, which has only `stop` and `length`:
    /// a deadline cut the output short (`length`); a cancelled request stopped (`stop`).
    pub fn openai(self) -> &'static str {
        match self {
            FinishReason::Length | FinishReason::Deadline => "length",
            FinishReason::Stop | FinishReason::Cancelled => "stop",
        }
    }
}

/// How a request that was served ended: finished for a reason, or failed.
#[derive(Debug, Clone)]
pub enum Ended {
    /// The engine finished it (or it was cancelled) for this reason.
    Finished(FinishReason),
    /// It failed with this message.
    Failed(String),
}

/// Holds back streamed text that might be the start of a stop string, and cuts at one.
#[derive(Debug, Default)]
pub struct StopScanner {
    stop: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopScanner {
    /// A scanner for the given stop strings (none is fine).
    pub fn new(stop: Vec<String>) -> Self {
        StopScanner { stop, text: String::new(), emitted: 0 }
    }

    /// Adds newly decoded text; returns the text now safe to emit and whether a stop string
    /// was found (in which case generation must end and the stop string is dropped).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        let from = self.emitted;
        self.text.push_str(delta);
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let mut search = from.saturating_sub(longest);
        while !self.text.is_char_boundary(search) {
            search -= 1;
        }
        let hit = self.stop.iter().filter_map(|s| self.text[search..].find(s.as_str()).map(|i| search + i)).min();
        if let Some(at) = hit {
            let at = at.max(from);
            let out = self.text[from..at].to_string();
            self.text.truncate(at);
            self.emitted = at;
            return (out, true);
        }
        let mut hold = 0;
        for s in &self.stop {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && self.text.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        let safe = (self.text.len() - hold).max(from);
        self.emitted = safe;
        (self.text[from..safe].to_string(), false)
    }

    /// Releases whatever was held back once generation has ended without a stop string.
    pub fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// All text accepted so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(stop: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut s = StopScanner::new(stop.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let (o, stopped) = s.push(p);
            out.push(o);
            if stopped {
                return (out, true, s.text().to_string());
            }
        }
        out.push(s.finish());
        (out, false, s.text().to_string())
    }

    #[test]
    fn stop_string_split_across_tokens_is_cut() {
        let (out, stopped, text) = stream(&["END"], &["hello E", "N", "D more"]);
        assert!(stopped);
        assert_eq!(text, "hello ");
        assert_eq!(out.concat(), "hello ");
        assert_eq!(out[0], "hello ", "the partial `E` is held back");
    }

    #[test]
    fn held_back_text_is_released_when_no_stop_follows() {
        let (out, stopped, text) = stream(&["END"], &["a E", "x", "yz"]);
        assert!(!stopped);
        assert_eq!(text, "a Exyz");
        assert_eq!(out.concat(), "a Exyz");
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_is_safe() {
        let (out, stopped, text) = stream(&["é!", "zz"], &["café", "!zz"]);
        assert!(stopped);
        assert_eq!(text, "caf");
        assert_eq!(out.concat(), "caf");
    }

    #[test]
    fn no_stop_strings_streams_everything() {
        let (out, stopped, _) = stream(&[], &["a", "b"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a", "b", ""]);
    }
}
