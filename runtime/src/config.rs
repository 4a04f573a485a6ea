//! `openlora serve --config FILE`: the server's TOML configuration, with safe defaults for
//! every field so that an empty file (or none) serves the embedded model.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::EngineConfig;
use crate::error::{Error, Result};
use crate::pager::PagerConfig;
use crate::policy::PolicyConfig;

/// Everything `openlora serve` can be told.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Hugging Face model folder; absent: the embedded default model and its demo adapters.
    pub model: Option<PathBuf>,
    /// Name the base model is served under (`model` in requests); default: the folder's name.
    pub model_name: Option<String>,
    /// The dtype the CPU backend keeps and multiplies the dense weights in (`auto`: as
    /// stored; `bf16`, `f16`, `f32`), as vLLM's `--dtype`. The CUDA backend computes in bf16.
    pub dtype: crate::model::dense::ServeDType,
    /// Where uploaded adapters (and later the ledger) are kept; default: `$OPENLORA_HOME`.
    pub data_dir: Option<PathBuf>,
    /// Adapters to register at start: name → PEFT folder.
    pub adapters: BTreeMap<String, PathBuf>,
    /// Folders under which `POST /v1/load_lora_adapter` (vLLM's protocol) may read a
    /// `lora_path`; empty: that endpoint refuses every path.
    pub lora_path_roots: Vec<PathBuf>,
    /// Memory budgets, in bytes.
    pub memory: MemoryConfig,
    /// Request limits.
    pub limits: LimitsConfig,
    /// API keys → tenant names. Empty: no key needed (every caller is tenant `anonymous`).
    pub api_keys: BTreeMap<String, String>,
    /// Bearer token for `/admin`; absent: the admin API is disabled.
    pub admin_token: Option<String>,
    /// Bearer token `/metrics` asks for (none: open, as Prometheus scrapes it by default).
    pub metrics_token: Option<String>,
    /// Policy plugins: sandbox limits and slot behaviour.
    pub policy: PolicyConfig,
    /// Where the ledger is kept.
    pub ledger: LedgerConfig,
    /// `[owners]`: the quotas of adapter owners who have none of their own.
    pub owners: crate::accounts::Quotas,
}

/// `[ledger]`: where entries are written.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerConfig {
    /// `sqlite:<path>`, a file path, or `postgres://...`; default: `ledger.sqlite3` in the data directory.
    pub url: Option<String>,
    /// Currency of the zero charge recorded for requests that failed after compute.
    pub currency: String,
    /// The Ed25519 key that signs checkpoints of the ledger's head (64 hex digits, mode 0600);
    /// default: `ledger-signing.key` in the data directory, created on first start. Keep it
    /// where the database's writers cannot reach it.
    pub signing_key: Option<PathBuf>,
    /// Sign a checkpoint every this many entries (and at shutdown); 0: only at shutdown.
    pub checkpoint_every: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig { url: None, currency: "USD".into(), signing_key: None, checkpoint_every: 1000 }
    }
}

impl LedgerConfig {
    /// Where the checkpoint signing key is (the default one under `data_dir` unless set).
    pub fn signing_key_path(&self, data_dir: &Path) -> PathBuf {
        self.signing_key.clone().unwrap_or_else(|| data_dir.join("ledger-signing.key"))
    }

    /// What `ledger verify` trusts: the signing key's public half, when its file can be read,
    /// and the latest checkpoint kept beside it.
    pub fn trust(&self, data_dir: &Path) -> crate::ledger::Trust {
        use crate::ledger::checkpoint::{latest_path, read_key, read_latest};
        let path = self.signing_key_path(data_dir);
        crate::ledger::Trust {
            key: read_key(&path).ok().map(|k| k.verifying_key()),
            outside: read_latest(&latest_path(&path)).ok().flatten().into_iter().collect(),
        }
    }

    /// What checking the audit trail trusts: the signing key's public half and the latest
    /// checkpoint of the trail kept beside it.
    pub fn audit_trust(&self, data_dir: &Path) -> crate::accounts::AuditTrust {
        use crate::ledger::checkpoint::{audit_latest_path, read_key, read_latest};
        let path = self.signing_key_path(data_dir);
        crate::accounts::AuditTrust {
            key: read_key(&path).ok().map(|k| k.verifying_key()),
            latest: read_latest(&audit_latest_path(&path)).ok().flatten(),
        }
    }

    /// The signer of the audit trail's head: the signing key, when it can be read.
    pub fn audit_signer(&self, data_dir: &Path) -> Option<crate::accounts::AuditSigner> {
        use crate::ledger::checkpoint::{audit_latest_path, read_key};
        let path = self.signing_key_path(data_dir);
        read_key(&path).ok().map(|key| crate::accounts::AuditSigner { key, path: audit_latest_path(&path) })
    }

    /// The ledger's location, the default one under `data_dir` unless `url` says otherwise.
    pub fn location(&self, data_dir: &Path) -> Result<crate::ledger::Location> {
        match &self.url {
            Some(url) => crate::ledger::Location::parse(url),
            None => Ok(crate::ledger::Location::Sqlite(data_dir.join("ledger.sqlite3"))),
        }
    }
}

/// Memory budgets, in bytes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// KV cache pool.
    pub kv_cache_bytes: usize,
    /// What the CPU backend's KV cache keeps keys and values in: `"f32"` (default) or
    /// `"bf16"` (half the bytes per token, as vLLM's `--kv-cache-dtype`; the GPU backend
    /// always keeps bf16).
    pub kv_cache_dtype: crate::model::KvDType,
    /// Host RAM cache of loaded adapters.
    pub adapter_host_cache_bytes: usize,
    /// Active adapter page pool (on a GPU: device memory, bf16).
    pub adapter_pool_bytes: usize,
    /// On a GPU, the device memory for the adapter pool and the KV cache together: the KV cache
    /// gets what the pool leaves. Default: 90% of what is free once the weights are loaded.
    pub device_bytes: Option<usize>,
}

/// Limits on what one request, and all of them together, may ask for.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body, in bytes (larger: 413).
    pub max_body_bytes: usize,
    /// Largest admin upload (an adapter archive), in bytes.
    pub max_upload_bytes: usize,
    /// Most prompt tokens (more: 400).
    pub max_prompt_tokens: usize,
    /// Most requests in flight at once (more: 429).
    pub max_concurrent_requests: usize,
    /// Most requests waiting in the engine's queue (more: 429).
    pub max_waiting: usize,
    /// Most tokens in one engine step.
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Default `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Seconds a connection may take to send a request's headers, and may stay idle between
    /// requests, before it is closed.
    pub header_timeout_secs: usize,
    /// Seconds a request's body may pause between two chunks (longer: 408); the whole body
    /// may take twice this.
    pub body_timeout_secs: usize,
    /// Most open connections; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            model: None,
            model_name: None,
            dtype: crate::model::dense::ServeDType::Auto,
            data_dir: None,
            adapters: BTreeMap::new(),
            lora_path_roots: Vec::new(),
            memory: MemoryConfig::default(),
            limits: LimitsConfig::default(),
            api_keys: BTreeMap::new(),
            admin_token: None,
            metrics_token: None,
            policy: PolicyConfig::default(),
            ledger: LedgerConfig::default(),
            owners: crate::accounts::Quotas::default(),
        }
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        let pager = PagerConfig::default();
        MemoryConfig {
            kv_cache_bytes: EngineConfig::default().kv_cache_bytes,
            kv_cache_dtype: EngineConfig::default().kv_cache_dtype,
            adapter_host_cache_bytes: pager.host_cache_bytes,
            adapter_pool_bytes: pager.active_pool_bytes,
            device_bytes: None,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let e = EngineConfig::default();
        LimitsConfig {
            max_body_bytes: 1 << 20,
            max_upload_bytes: 512 << 20,
            max_prompt_tokens: 8192,
            max_concurrent_requests: 512,
            max_waiting: e.max_waiting,
            max_batch_tokens: e.max_batch_tokens,
            max_running: e.max_running,
            default_max_tokens: 128,
            header_timeout_secs: 30,
            body_timeout_secs: 30,
            max_connections: 4096,
        }
    }
}

impl ServerConfig {
    /// The configuration `openlora` runs with: the file (else the defaults), then the secrets
    /// the environment gives over the file's — `OPENLORA_ADMIN_TOKEN`, `OPENLORA_METRICS_TOKEN`,
    /// `OPENLORA_LEDGER_URL` — so that a Kubernetes Secret need not be written into a ConfigMap.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let mut cfg = match path {
            Some(p) => Self::from_file(p)?,
            None => Self::default(),
        };
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let mut changed = false;
        if let Some(v) = var("OPENLORA_ADMIN_TOKEN") {
            cfg.admin_token = Some(v);
            changed = true;
        }
        if let Some(v) = var("OPENLORA_METRICS_TOKEN") {
            cfg.metrics_token = Some(v);
            changed = true;
        }
        if let Some(v) = var("OPENLORA_LEDGER_URL") {
            cfg.ledger.url = Some(v);
            changed = true;
        }
        if changed {
            cfg.validate(path.unwrap_or(Path::new("the environment")))?;
        }
        Ok(cfg)
    }

    /// Reads a TOML file; errors name the file and the field.
    /// Relative paths in it (`model`, `data_dir`, `adapters`, `lora_path_roots`, `[ledger] url` and `signing_key`,
    /// `[policy] dir`) are taken from the file's folder, not the working directory.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut cfg = Self::from_toml(path, &text)?;
        if let Some(folder) = path.parent() {
            cfg.resolve_paths(folder);
        }
        Ok(cfg)
    }

    /// Makes every relative path of the configuration relative to `folder`.
    fn resolve_paths(&mut self, folder: &Path) {
        let paths = (self.model.iter_mut())
            .chain(self.data_dir.iter_mut())
            .chain(self.adapters.values_mut())
            .chain(self.lora_path_roots.iter_mut())
            .chain(self.ledger.signing_key.iter_mut())
            .chain(self.policy.dir.iter_mut());
        for p in paths {
            if p.is_relative() {
                *p = folder.join(&*p);
            }
        }
        if let Some(url) = &mut self.ledger.url
            && let Ok(crate::ledger::Location::Sqlite(file)) = crate::ledger::Location::parse(url)
            && file.is_relative()
            && !file.as_os_str().is_empty()
            && file.as_os_str() != ":memory:"
            && !file.to_string_lossy().contains('=')
        {
            *url = format!("sqlite:{}", folder.join(file).display());
        }
    }

    /// Parses TOML text (`path` only names the source in errors).
    pub fn from_toml(path: &Path, text: &str) -> Result<Self> {
        let cfg: ServerConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            let field = msg.split('`').nth(1).map(str::to_string).unwrap_or_else(|| "-".to_string());
            let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
            Error::config_because(path, field, format!("{msg}{at}"), e)
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let positive = [
            ("limits.max_body_bytes", self.limits.max_body_bytes),
            ("limits.max_prompt_tokens", self.limits.max_prompt_tokens),
            ("limits.max_concurrent_requests", self.limits.max_concurrent_requests),
            ("limits.max_batch_tokens", self.limits.max_batch_tokens),
            ("limits.max_running", self.limits.max_running),
            ("limits.default_max_tokens", self.limits.default_max_tokens),
            ("limits.header_timeout_secs", self.limits.header_timeout_secs),
            ("limits.body_timeout_secs", self.limits.body_timeout_secs),
            ("limits.max_connections", self.limits.max_connections),
            ("memory.kv_cache_bytes", self.memory.kv_cache_bytes),
            ("memory.adapter_pool_bytes", self.memory.adapter_pool_bytes),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(path, field, "must be greater than zero"));
            }
        }
        if let Some(d) = self.memory.device_bytes
            && d <= self.memory.adapter_pool_bytes
        {
            return Err(Error::config(
                path,
                "memory.device_bytes",
                "must be larger than memory.adapter_pool_bytes (the KV cache gets the rest)",
            ));
        }
        self.policy.validate().map_err(|(field, message)| Error::config(path, field, message))?;
        openlora_sdk::money::validate_currency(&self.ledger.currency)
            .map_err(|m| Error::config(path, "ledger.currency", m))?;
        if let Some(url) = &self.ledger.url {
            crate::ledger::Location::parse(url).map_err(|e| Error::config(path, "ledger.url", e.to_string()))?;
        }
        crate::policy::builtin::Builtins::new(&self.policy).map_err(|e| match e {
            Error::Config { field, message, .. } => Error::config(path, field, message),
            other => other,
        })?;
        for (field, token) in [("admin_token", &self.admin_token), ("metrics_token", &self.metrics_token)] {
            if token.as_ref().is_some_and(|t| t.len() < 16) {
                return Err(Error::config(path, field, "must be at least 16 characters"));
            }
        }
        for (key, tenant) in &self.api_keys {
            if key.is_empty() {
                return Err(Error::config(path, "api_keys", "keys must be non-empty"));
            }
            if !valid_tenant(tenant) {
                return Err(Error::config(
                    path,
                    "api_keys",
                    format!("tenant {tenant:?}: tenant names are 1-64 characters of A-Z a-z 0-9 . _ - (no separators)"),
                ));
            }
        }
        Ok(())
    }

    /// The engine settings this configuration implies.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            kv_cache_bytes: self.memory.kv_cache_bytes,
            kv_cache_dtype: self.memory.kv_cache_dtype,
            max_batch_tokens: self.limits.max_batch_tokens,
            max_running: self.limits.max_running,
            max_waiting: self.limits.max_waiting,
            ..EngineConfig::default()
        }
    }

    /// The pager settings this configuration implies.
    pub fn pager(&self) -> PagerConfig {
        PagerConfig {
            host_cache_bytes: self.memory.adapter_host_cache_bytes,
            active_pool_bytes: self.memory.adapter_pool_bytes,
            ..PagerConfig::default()
        }
    }
}

/// Whether `name` is a valid tenant name (see [`crate::accounts::valid_account`]).
pub fn valid_tenant(name: &str) -> bool {
    crate::accounts::valid_account(name, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = ServerConfig::from_toml(Path::new("c.toml"), "").expect("empty config");
        assert_eq!(c.listen.port(), 8080);
        assert!(c.api_keys.is_empty());
    }

    #[test]
    fn relative_paths_are_taken_from_the_files_folder() {
        let dir = std::env::temp_dir().join(format!("openlora-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("openlora.toml");
        let text = "model = \"m\"\ndata_dir = \"data\"\n[adapters]\na = \"ad/a\"\nabs = \"/x/abs\"\n\
                    [ledger]\nurl = \"sqlite:books.db\"\nsigning_key = \"keys/k\"\n[policy]\ndir = \"drop\"\n";
        std::fs::write(&file, text).unwrap();
        let c = ServerConfig::from_file(&file).unwrap();
        assert_eq!(c.model.as_deref(), Some(dir.join("m").as_path()));
        assert_eq!(c.data_dir.as_deref(), Some(dir.join("data").as_path()));
        assert_eq!(c.adapters["a"], dir.join("ad/a"));
        assert_eq!(c.adapters["abs"], Path::new("/x/abs"), "absolute paths stay");
        assert_eq!(c.ledger.url.as_deref(), Some(format!("sqlite:{}", dir.join("books.db").display()).as_str()));
        assert_eq!(c.ledger.signing_key.as_deref(), Some(dir.join("keys/k").as_path()));
        assert_eq!(c.policy.dir.as_deref(), Some(dir.join("drop").as_path()));
        let pg = "[ledger]\nurl = \"postgres://u@h/db\"\n";
        std::fs::write(&file, pg).unwrap();
        let c = ServerConfig::from_file(&file).unwrap();
        assert_eq!(c.ledger.url.as_deref(), Some("postgres://u@h/db"), "URLs are not paths");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn full_file_parses() {
        let c = ServerConfig::from_toml(
            Path::new("c.toml"),
            r#"
            listen = "127.0.0.1:9000"
            model = "/models/llama"
            admin_token = "0123456789abcdef0"
            [adapters]
            sql = "/adapters/sql"
            [memory]
            kv_cache_bytes = 1048576
            kv_cache_dtype = "bf16"
            [limits]
            max_body_bytes = 4096
            [api_keys]
            "sk-abc" = "acme"
            "#,
        )
        .expect("config");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.adapters["sql"], PathBuf::from("/adapters/sql"));
        assert_eq!(c.api_keys["sk-abc"], "acme");
        assert_eq!(c.limits.max_body_bytes, 4096);
        assert_eq!(c.memory.kv_cache_bytes, 1 << 20);
        assert_eq!(c.engine().kv_cache_dtype, crate::model::KvDType::Bf16);
        assert_eq!(ServerConfig::default().engine().kv_cache_dtype, crate::model::KvDType::F32);
    }

    #[test]
    fn errors_name_file_and_field() {
        for (text, field) in [
            ("listen = 5", "-"),
            ("[limits]\nmax_body_bytes = 0", "limits.max_body_bytes"),
            ("[limits]\nmax_bodybytes = 1", "max_bodybytes"),
            ("admin_token = \"short\"", "admin_token"),
            ("[memory]\nadapter_pool_bytes = 1024\ndevice_bytes = 1024", "memory.device_bytes"),
            ("[api_keys]\n\"sk-1\" = \"alice:eu\"", "api_keys"),
            ("[api_keys]\n\"sk-1\" = \"\"", "api_keys"),
            ("[memory]\nkv_cache_dtype = \"fp8\"", "-"),
        ] {
            match ServerConfig::from_toml(Path::new("c.toml"), text) {
                Err(Error::Config { field: f, file, .. }) => {
                    assert_eq!(file, PathBuf::from("c.toml"));
                    if field != "-" {
                        assert_eq!(f, field, "{text}");
                    }
                }
                other => panic!("{text}: expected a config error, got {other:?}"),
            }
        }
    }
}
