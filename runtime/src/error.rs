//! The runtime's one error type.

use std::path::PathBuf;

/// Everything that can go wrong inside the openlora runtime.
///
/// Variants carry the file and the field or tensor they concern, so a message
/// reaching an operator says exactly what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A file the model folder must contain is not there.
    #[error("{}: missing file ({what})", path.display())]
    MissingFile {
        /// The path that was expected.
        path: PathBuf,
        /// What the file is for.
        what: &'static str,
    },

    /// A JSON or TOML file is malformed, or one of its fields is wrong.
    #[error("{}: field `{field}`: {message}", file.display())]
    Config {
        /// The file concerned.
        file: PathBuf,
        /// The field at fault (`-` when the file as a whole does not parse).
        field: String,
        /// What is wrong with it.
        message: String,
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

    /// The tokenizer could not be loaded or failed on some input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A request parameter is out of range.
    #[error("invalid `{param}`: {message}")]
    InvalidParam {
        /// The parameter's name as the user spells it.
        param: &'static str,
        /// Why it is refused.
        message: String,
    },

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
    #[error("adapter `{name}` failed to load: {message}")]
    AdapterLoad {
        /// The adapter's name.
        name: String,
        /// Why.
        message: String,
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

    /// The KV cache has no room for a sequence's next tokens.
    #[error("KV cache: no room for {needed_tokens} tokens ({status:?})")]
    KvExhausted {
        /// Tokens the sequence would hold.
        needed_tokens: usize,
        /// What the allocator answered.
        status: crate::model::AllocStatus,
    },

    /// The engine's queue is full; try again later.
    #[error("the request queue is full")]
    QueueFull,

    /// The engine has stopped.
    #[error("the engine has stopped")]
    EngineStopped,

    /// A policy plugin was refused (at upload or load): not a component, wrong world, a
    /// forbidden import, too large, or a configuration it rejects.
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

    /// The router refused the request.
    #[error("request refused by policy: {0}")]
    PolicyRejected(String),

    /// A policy failed and its slot is fail-closed, so the request is refused.
    #[error("policy `{slot}` failed and is fail-closed: {message}")]
    PolicyFailed {
        /// The slot whose plugin failed.
        slot: String,
        /// What went wrong.
        message: String,
    },

    /// The device asked for cannot be used.
    #[error("{0}")]
    Device(String),

    /// The ledger could not be opened, read or written.
    #[error("ledger: {0}")]
    Ledger(String),

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
        Error::Config { file: file.into(), field: field.into(), message: message.into() }
    }
}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
