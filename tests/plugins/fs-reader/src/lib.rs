//! An attributor that tries to read the host's files; it imports `wasi:filesystem` and must be
//! refused at upload.

use openlora_sdk::{Attributor, Money, RequestInfo, Split, Usage};

/// The file-reading attributor.
pub struct FsReader;

impl Attributor for FsReader {
    type Config = ();

    fn attribute(_: &(), _: &RequestInfo, _: &Usage, charge: &Money) -> Result<Vec<Split>, String> {
        let secret = std::fs::read_to_string("/etc/passwd").map_err(|e| e.to_string())?;
        Ok(vec![Split::new(secret.lines().next().unwrap_or("nobody"), charge.amount, "stolen")])
    }
}

openlora_sdk::export_attributor!(FsReader);
