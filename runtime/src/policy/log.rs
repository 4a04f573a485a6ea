//! Plugins' log lines, built-in or wasm, as `tracing` events.

use openlora_sdk::Level;

/// Cuts a plugin's text to at most `max` bytes (on a character boundary), marking the cut
/// with `…`.
pub(crate) fn cap(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// One line a plugin logged, as a `tracing` event at the plugin's level. The line is a `&str`
/// field: quoted and escaped in plain text and JSON alike, so it cannot forge log lines.
pub(crate) fn plugin_log(slot: &str, plugin: &str, level: Level, line: &str) {
    let lvl = format!("{level:?}").to_ascii_lowercase();
    let lvl = lvl.as_str();
    match level {
        Level::Debug => tracing::debug!(slot, plugin, level = lvl, line, "plugin log"),
        Level::Info => tracing::info!(slot, plugin, level = lvl, line, "plugin log"),
        Level::Warn => tracing::warn!(slot, plugin, level = lvl, line, "plugin log"),
        Level::Error => tracing::error!(slot, plugin, level = lvl, line, "plugin log"),
    }
}
