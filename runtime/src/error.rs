//! The runtime's errors, one enum per layer, and [`Error`], which holds any of them.
//!
//! This module is a leaf: it names no other module of the crate, so every layer can use it.
//! Each variant carries the file, field, tensor or request value it concerns, and wraps the
//! underlying error as its `source` rather than flattening it into a string.

use std::path::PathBuf;

/// Something the error came from, kept as its `source`.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Reading a model or an adapter from its files.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file the folder must contain is not there.
    #[error("{}: missing file ({what})", path.display())]
    MissingFile {
        /// The path that was expected.
        path: PathBuf,
        /// What the file is for.
        what: &'static str,
    },

    /// A tensor the model needs is absent from every weight file.
    #[error("{}: missing tensor `{tensor}`", file.display())]
    MissingTensor {
        /// The folder or file searched.
        file: PathBuf,
        /// The tensor's name.
        tensor: String,
    },

    /// A tensor has a shape other than the configuration implies.
    #[error("{}: tensor `{tensor}` has shape {got:?}, expected {expected:?}", file.display())]
    TensorShape {
        /// The weight file holding it.
        file: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape found in the file.
        got: Vec<usize>,
    },

    /// A weight file is not valid safetensors, or holds an unsupported dtype.
    #[error("{}: {message}", file.display())]
    WeightFile {
        /// The weight file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A request the engine refuses, or could not serve.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A request parameter is out of range.
    #[error("invalid `{param}`: {message}")]
    InvalidParam {
        /// The parameter's name as the user spells it.
        param: &'static str,
        /// Why it is refused.
        message: String,
    },

    /// A field of the request as the API spells it (`messages[2].content[0]`) is wrong.
    #[error("{message}")]
    InvalidField {
        /// The field's path (none when the request as a whole is wrong).
        param: Option<String>,
        /// Why it is refused.
        message: String,
    },

    /// The prompt is longer than the server accepts.
    #[error("the prompt has {size} {unit}; the limit is {limit}")]
    PromptTooLong {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
        /// What is counted (`tokens`, `bytes`, `messages`).
        unit: &'static str,
    },

    /// The text could not be tokenised.
    #[error("tokenizer: {0}")]
    Tokenize(#[source] Source),

    /// A prompt (plus the tokens asked for) does not fit in the model's context.
    #[error("prompt has {prompt_tokens} tokens; the model's context is {context} tokens")]
    ContextOverflow {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The model's maximum sequence length.
        context: usize,
    },

    /// No adapter of this name is registered.
    #[error("unknown adapter `{0}`")]
    UnknownAdapter(String),

    /// An adapter could not be loaded from disk (corrupt, vanished or invalid files).
    #[error("adapter `{name}` failed to load: {source}")]
    AdapterLoad {
        /// The adapter's name.
        name: String,
        /// Why.
        #[source]
        source: std::sync::Arc<Error>,
    },

    /// An adapter needs more pages than the whole active pool holds.
    #[error("adapter `{name}` needs {need_bytes} bytes; the active pool holds {pool_bytes}")]
    AdapterTooLarge {
        /// The adapter's name.
        name: String,
        /// Bytes it needs in the pool.
        need_bytes: usize,
        /// The pool's capacity.
        pool_bytes: usize,
    },

    /// Waited too long for room in the active adapter pool.
    #[error("timed out waiting for room in the adapter pool for `{0}`")]
    PoolTimeout(String),

    /// The KV cache has no room for a sequence's tokens.
    #[error("KV cache: no room for {needed_tokens} tokens ({})", if *.ever { "Later" } else { "Impossible" })]
    KvExhausted {
        /// Tokens the sequence would hold.
        needed_tokens: usize,
        /// Whether they would fit once other sequences finish.
        ever: bool,
    },

    /// The engine's queue is full; try again later.
    #[error("the request queue is full")]
    QueueFull,

    /// The engine has stopped.
    #[error("the engine has stopped")]
    EngineStopped,
}

/// Policy plugins: installing them, and the decisions they make.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A plugin was refused (at upload or load): not a component, wrong world, a forbidden
    /// import, too large, or a configuration it rejects.
    #[error("plugin {what}: {message}")]
    PluginInvalid {
        /// The file or slot concerned.
        what: String,
        /// Why it was refused.
        message: String,
    },

    /// No plugin slot, or no version in a slot, of this name.
    #[error("no plugin {0}")]
    UnknownPlugin(String),

    /// The plugin version is in use (active) and cannot be removed.
    #[error("{0}")]
    InUse(String),

    /// The router refused the request.
    #[error("request refused by policy: {0}")]
    Rejected(String),

    /// A policy failed and its slot is fail-closed, so the request is refused.
    #[error("policy `{slot}` failed and is fail-closed: {message}")]
    Failed {
        /// The slot whose plugin failed.
        slot: String,
        /// What went wrong.
        message: String,
    },

    /// The WebAssembly engine could not be set up or a plugin's store could not be written.
    #[error("plugin runtime: {what}")]
    Runtime {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: Source,
    },
}

/// The ledger: opening, reading and writing its store.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store (SQLite or PostgreSQL) failed.
    #[error("ledger {what}: {source}")]
    Store {
        /// Which store and what was being done.
        what: String,
        /// The database's error.
        #[source]
        source: Source,
    },

    /// The ledger's location or contents are not what they must be.
    #[error("ledger: {0}")]
    Invalid(String),

    /// An entry was refused as malformed or inexact (a bug in the server, not the store).
    #[error("ledger entry refused: {0}")]
    Refused(String),

    /// The ledger's writer thread is gone.
    #[error("ledger: the writer has stopped")]
    WriterStopped,

    /// Writing an export failed.
    #[error("ledger export: {0}")]
    Export(#[source] std::io::Error),
}

/// Accounts, keys, quotas and the audit trail.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The database (SQLite or PostgreSQL) failed.
    #[error("accounts {what}: {source}")]
    Store {
        /// Which store and what was being done.
        what: String,
        /// The database's error.
        #[source]
        source: Source,
    },

    /// A field of an account or key request is wrong.
    #[error("{message}")]
    Invalid {
        /// The field at fault.
        param: &'static str,
        /// Why.
        message: String,
    },

    /// No such key, owner or record (or not one the caller may see).
    #[error("{0}")]
    NotFound(String),

    /// The caller's scope does not allow this.
    #[error("{0}")]
    Forbidden(String),

    /// The name is taken by someone else.
    #[error("{0}")]
    Conflict(String),

    /// What the change was made against changed meanwhile; nothing was done.
    #[error("{0}")]
    Changed(String),

    /// An owner's quota would be exceeded.
    #[error("{message}")]
    Quota {
        /// What, and the limit.
        message: String,
        /// A size quota (413) rather than a count (429).
        size: bool,
        /// Seconds until it frees up, for rate quotas.
        retry_after: Option<u64>,
    },

    /// The audit trail is not what it must be (a record was changed, removed or reordered).
    #[error("audit trail: {0}")]
    Tampered(String),
}

/// The device (a GPU) the engine runs on.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device asked for cannot be used (absent, unsupported, or not built in).
    #[error("{0}")]
    Unavailable(String),

    /// A driver, NVRTC or cuBLAS call failed.
    #[error("{what}: {source}")]
    Driver {
        /// What was being done.
        what: String,
        /// The library's error.
        #[source]
        source: Source,
    },

    /// The device's state is not what the backend needs (a bug, or a step over its limits).
    #[error("{0}")]
    State(String),
}

/// Any of the runtime's errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file (the server's TOML, a model's or an adapter's JSON) is malformed,
    /// or one of its fields is wrong.
    #[error("{}: field `{field}`: {message}", file.display())]
    Config {
        /// The file concerned.
        file: PathBuf,
        /// The field at fault (`-` when the file as a whole does not parse).
        field: String,
        /// What is wrong with it.
        message: String,
        /// The parser's own error, when there is one.
        #[source]
        source: Option<Source>,
    },

    /// A file, folder, thread or socket could not be used (in any layer).
    #[error("{}: {source}", path.display())]
    Io {
        /// What it concerns (a path, or what the thread or socket is for).
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// Reading a model or an adapter failed.
    #[error(transparent)]
    Load(#[from] LoadError),

    /// A request was refused or could not be served.
    #[error(transparent)]
    Submit(#[from] SubmitError),

    /// A policy plugin or decision failed.
    #[error(transparent)]
    Policy(#[from] PolicyError),

    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),

    /// Accounts, keys, quotas or the audit trail.
    #[error(transparent)]
    Account(#[from] AccountError),

    /// The device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),

    /// A tensor operation failed (a bug, not bad input).
    #[error("tensor op: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// A configuration error naming the file and field.
    pub fn config(file: impl Into<PathBuf>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config { file: file.into(), field: field.into(), message: message.into(), source: None }
    }

    /// A configuration error naming the file and field, keeping the parser's error as its source.
    pub fn config_because(
        file: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
        source: impl Into<Source>,
    ) -> Self {
        Error::Config { file: file.into(), field: field.into(), message: message.into(), source: Some(source.into()) }
    }

    /// A request parameter that is out of range.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        SubmitError::InvalidParam { param, message: message.into() }.into()
    }

    /// A device in a state the backend cannot work with.
    pub fn device(message: impl Into<String>) -> Self {
        DeviceError::State(message.into()).into()
    }
}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
