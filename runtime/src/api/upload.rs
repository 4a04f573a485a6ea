//! An adapter upload streamed to its staging folder: the body (a tar archive, or a multipart
//! form's parts) goes to disk chunk by chunk within the upload limit and the body deadlines, so
//! memory stays bounded however large the upload; the archive is unpacked on a blocking thread.

use std::io::Write;
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::Multipart;
use tokio::io::AsyncWriteExt;

use super::listen::{BodyRead, Chunks, timed_out, too_large};
use super::{ApiError, blocking, multipart_error};

/// The files of an upload that matter: the PEFT config and weights, the owner file (others
/// are ignored).
pub fn wanted(file: &str) -> bool {
    use crate::adapters::{CONFIG_FILE, OWNER_FILE, WEIGHTS_FILE};
    file == CONFIG_FILE || file == WEIGHTS_FILE || file == OWNER_FILE || file == "adapter_model.bin"
}

/// A refused upload (400, `invalid_adapter`).
pub fn bad_upload(m: String) -> ApiError {
    ApiError { code: "invalid_adapter", ..ApiError::invalid(Some("body".into()), m) }
}

fn disk(e: std::io::Error) -> ApiError {
    ApiError::internal(format!("writing an upload: {e}"))
}

/// Writes a chunked stream to `path`, counting against `total` and the limit.
struct Sink {
    file: tokio::fs::File,
    path: PathBuf,
}

impl Sink {
    async fn create(path: PathBuf) -> Result<Self, ApiError> {
        let file = tokio::fs::File::create(&path).await.map_err(disk)?;
        Ok(Sink { file, path })
    }

    async fn write(&mut self, chunk: &[u8], total: &mut usize, read: BodyRead) -> Result<(), ApiError> {
        *total += chunk.len();
        if *total > read.limit {
            return Err(too_large(read.limit));
        }
        self.file.write_all(chunk).await.map_err(disk)
    }

    async fn finish(mut self) -> Result<PathBuf, ApiError> {
        self.file.flush().await.map_err(disk)?;
        self.file.sync_all().await.map_err(disk)?;
        Ok(self.path)
    }
}

/// Streams a tar archive body into `stage` and unpacks its wanted files there.
pub async fn stage_tar(body: Body, stage: &Path, read: BodyRead) -> Result<(), ApiError> {
    let mut sink = Sink::create(stage.join(".archive.tar")).await?;
    let mut chunks = Chunks::new(body, read);
    while let Some(data) = chunks.next().await? {
        sink.file.write_all(&data).await.map_err(disk)?;
    }
    let archive = sink.finish().await?;
    let stage = stage.to_path_buf();
    blocking("untar", move || {
        let unpacked = untar(&archive, &stage);
        let _ = std::fs::remove_file(&archive);
        unpacked
    })
    .await
}

/// Unpacks the wanted files of a tar archive (optionally inside one folder) into `dir`.
fn untar(archive: &Path, dir: &Path) -> Result<(), ApiError> {
    let file = std::fs::File::open(archive).map_err(disk)?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let entries = tar.entries().map_err(|e| bad_upload(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad_upload(format!("corrupt tar archive: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(|e| bad_upload(format!("bad path in archive: {e}")))?.into_owned();
        let Some(name) = path.file_name().and_then(|f| f.to_str()).map(str::to_string) else { continue };
        if !wanted(&name) {
            continue; // READMEs and the like
        }
        let target = dir.join(&name);
        if target.exists() {
            return Err(bad_upload(format!("the upload holds `{name}` twice")));
        }
        let mut out = std::fs::File::create(&target).map_err(disk)?;
        std::io::copy(&mut entry, &mut out)
            .map_err(|e| bad_upload(format!("reading `{name}` from the archive: {e}")))?;
        out.flush().and_then(|()| out.sync_all()).map_err(disk)?;
    }
    Ok(())
}

/// Streams a multipart form's wanted parts (each named by its file name, or its field name)
/// into `stage`.
pub async fn stage_form(mut form: Multipart, stage: &Path, read: BodyRead) -> Result<(), ApiError> {
    let whole = async {
        let mut total = 0;
        loop {
            let field = tokio::time::timeout(read.pause, form.next_field()).await.map_err(|_| timed_out())?;
            let Some(mut field) = field.map_err(|e| multipart_error("bad multipart body", e))? else { return Ok(()) };
            let name = field.file_name().or(field.name()).map(|n| n.rsplit('/').next().unwrap_or(n).to_string());
            let Some(name) = name.filter(|n| wanted(n)) else { continue };
            let target = stage.join(&name);
            if target.exists() {
                return Err(bad_upload(format!("the upload holds `{name}` twice")));
            }
            let mut sink = Sink::create(target).await?;
            loop {
                let chunk = tokio::time::timeout(read.pause, field.chunk()).await.map_err(|_| timed_out())?;
                match chunk.map_err(|e| multipart_error(&format!("reading `{name}`"), e))? {
                    Some(data) => sink.write(&data, &mut total, read).await?,
                    None => break,
                }
            }
            sink.finish().await?;
        }
    };
    tokio::time::timeout(read.pause * 2, whole).await.map_err(|_| timed_out())?
}
