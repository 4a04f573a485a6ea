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
/// Finds stop strings in generated text as it streams: an Aho-Corasick automaton over the stop
/// strings' bytes, fed only each token's new bytes, so a token costs the same however long the
/// stop strings are. Text that could still begin a stop string is held back until it cannot.
pub struct StopScanner {
    automaton: Option<StopAutomaton>,
    state: usize,
    text: String,
    emitted: usize,
}

impl StopScanner {
    /// A scanner for the given stop strings (none is fine).
    pub fn new(stop: Vec<String>) -> Self {
        let automaton = (!stop.is_empty()).then(|| StopAutomaton::new(&stop));
        StopScanner { automaton, state: 0, text: String::new(), emitted: 0 }
    }

    /// Adds newly decoded text; returns the text now safe to emit and whether a stop string
    /// was found (in which case generation must end and the stop string is dropped).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        let from = self.emitted;
        let base = self.text.len();
        self.text.push_str(delta);
        let Some(automaton) = &self.automaton else {
            self.emitted = self.text.len();
            return (self.text[from..].to_string(), false);
        };
        for (i, &b) in delta.as_bytes().iter().enumerate() {
            self.state = automaton.step(self.state, b);
            let found = automaton.found[self.state];
            if found > 0 {
                // A stop string ends at this byte; valid UTF-8 matched in valid UTF-8 starts on
                // a character boundary.
                let at = (base + i + 1 - found).max(from);
                let out = self.text[from..at].to_string();
                self.text.truncate(at);
                self.emitted = at;
                return (out, true);
            }
        }
        // The longest end of the text that begins a stop string (a prefix of UTF-8 starts on a
        // character boundary too) waits for the next token.
        let safe = (self.text.len() - automaton.depth[self.state]).max(from);
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

/// The trie of the stop strings with failure links (state 0 is the root).
#[derive(Debug)]
struct StopAutomaton {
    /// Each state's children, by byte.
    children: Vec<Vec<(u8, usize)>>,
    /// Each state's failure link: the longest proper suffix of its path that is also a path.
    fail: Vec<usize>,
    /// Each state's depth: the length of its path.
    depth: Vec<usize>,
    /// The length of the longest stop string ending at each state (0: none).
    found: Vec<usize>,
}

impl StopAutomaton {
    fn new(stop: &[String]) -> Self {
        let mut a = StopAutomaton { children: vec![Vec::new()], fail: vec![0], depth: vec![0], found: vec![0] };
        for s in stop {
            let mut node = 0;
            for &b in s.as_bytes() {
                node = match a.child(node, b) {
                    Some(next) => next,
                    None => {
                        let next = a.children.len();
                        a.children.push(Vec::new());
                        a.fail.push(0);
                        a.depth.push(a.depth[node] + 1);
                        a.found.push(0);
                        a.children[node].push((b, next));
                        next
                    }
                };
            }
            a.found[node] = a.found[node].max(s.len());
        }
        // Breadth first: a state's failure link is set before its children's.
        let mut queue: std::collections::VecDeque<usize> = a.children[0].iter().map(|&(_, c)| c).collect();
        while let Some(node) = queue.pop_front() {
            for (b, child) in a.children[node].clone() {
                let mut f = a.fail[node];
                let link = loop {
                    if let Some(next) = a.child(f, b) {
                        break next;
                    }
                    if f == 0 {
                        break 0;
                    }
                    f = a.fail[f];
                };
                a.fail[child] = link;
                a.found[child] = a.found[child].max(a.found[link]);
                queue.push_back(child);
            }
        }
        a
    }

    fn child(&self, node: usize, b: u8) -> Option<usize> {
        self.children[node].iter().find(|&&(c, _)| c == b).map(|&(_, n)| n)
    }

    /// The state after reading `b` in `state` (amortised constant time).
    fn step(&self, mut state: usize, b: u8) -> usize {
        loop {
            if let Some(next) = self.child(state, b) {
                return next;
            }
            if state == 0 {
                return 0;
            }
            state = self.fail[state];
        }
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
    fn overlapping_stop_strings_are_found_across_tokens() {
        let (out, stopped, text) = stream(&["abcx", "bcd"], &["xab", "c", "d!"]);
        assert!(stopped);
        assert_eq!(text, "xa", "`bcd` ends first, though `abcx` began earlier and was held");
        assert_eq!(out.concat(), "xa");
        let (_, stopped, text) = stream(&["aab"], &["aaa", "ab"]);
        assert!(stopped, "after a failed partial match the automaton falls back, not to the start");
        assert_eq!(text, "aa");
    }

    #[test]
    fn no_stop_strings_streams_everything() {
        let (out, stopped, _) = stream(&[], &["a", "b"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a", "b", ""]);
    }
}
