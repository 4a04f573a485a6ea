//! `openlora serve`: load the model and adapters, start the engine, answer HTTP until told
//! to stop, then drain in-flight requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;

use crate::adapters::store::AdapterStore;
use tokio::sync::Semaphore;

use crate::api::{AppState, router};
use crate::config::ServerConfig;
use crate::device::DeviceSpec;
use crate::embedded;
use crate::engine::EngineHandle;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::LoadedModel;
use crate::pager::AdapterPager;
use crate::policy::PolicyHost;
use crate::request::{RequestLimits, Validator};
use crate::settlement::SettlementService;

/// A loaded, ready-to-serve application and the address it will listen on.
pub struct Server {
    /// The state handlers share.
    pub state: Arc<AppState>,
    /// The address from the configuration.
    pub listen: std::net::SocketAddr,
}

/// Registers the uploaded adapters the store holds (after the config file's: an upload of the
/// same name wins, as it did when it was made).
fn restore_uploads(store: &AdapterStore, pager: &AdapterPager) {
    for (name, dir) in store.current() {
        if let Err(e) = pager.register(&name, &dir) {
            tracing::warn!(adapter = %name, error = %e, "skipping stored adapter");
        }
    }
}

impl Server {
    /// Loads everything the configuration names, to serve on `device`.
    pub fn load(config: ServerConfig, device: DeviceSpec) -> Result<Self> {
        let (folder, demo) = match &config.model {
            Some(dir) => (dir.clone(), false),
            None => (embedded::default_model_dir()?, true),
        };
        let model = Arc::new(match device {
            DeviceSpec::Cpu => LoadedModel::load_as(&folder, config.dtype)?,
            // The GPU backend uploads the weights itself (in bf16); no copy is kept on the host.
            DeviceSpec::Cuda(_) => {
                crate::model::dense::check_gpu_dtype(config.dtype)?;
                LoadedModel::load_without_weights(&folder)?
            }
        });
        let model_name = config.model_name.clone().unwrap_or_else(|| {
            if demo {
                embedded::DEFAULT_MODEL_NAME.to_string()
            } else {
                folder.file_name().and_then(|f| f.to_str()).unwrap_or("base").to_string()
            }
        });
        let metrics = Metrics::new();
        let mut pager_config = config.pager();
        // On a GPU the active pool is mirrored on the device in bf16 (its budget is device
        // bytes); on the CPU it is bf16 when serving in bf16.
        pager_config.pool = crate::pager::PoolPlace::for_backend(device != DeviceSpec::Cpu, model.serves_bf16());
        let pager = AdapterPager::new(model.config(), pager_config, metrics.pager.clone());
        if demo {
            for name in embedded::DEMO_ADAPTERS {
                pager.register(name, &folder.join("adapters").join(name))?;
            }
        }
        for (name, dir) in &config.adapters {
            pager.register(name, dir)?;
        }
        let data_dir = config.data_dir.clone().unwrap_or_else(embedded::data_dir);
        let adapter_store = Arc::new(AdapterStore::open(&data_dir.join("adapters"))?);
        restore_uploads(&adapter_store, &pager);
        let policy = Arc::new(PolicyHost::new(&config.policy, Some(data_dir.join("plugins")), metrics.policy.clone())?);
        let drop_dir = config.policy.dir.clone().unwrap_or_else(|| data_dir.join("plugins").join("drop"));
        let key_path = config.ledger.signing_key_path(&data_dir);
        let signer = crate::ledger::Signer {
            key: crate::ledger::checkpoint::read_or_create_key(&key_path)?,
            key_path,
            every: config.ledger.checkpoint_every,
        };
        let location = config.ledger.location(&data_dir)?;
        let audit_signer = crate::accounts::AuditSigner {
            key: signer.key.clone(),
            path: crate::ledger::checkpoint::audit_latest_path(&signer.key_path),
        };
        let accounts = crate::accounts::Accounts::open(&location, config.owners, Some(audit_signer))?;
        let replication = match &location {
            crate::ledger::Location::Postgres(url) => Some(Arc::new(crate::api::replicas::Replication::open(url)?)),
            crate::ledger::Location::Sqlite(_) => None,
        };
        let ledger = crate::ledger::Ledger::open_signed(location, metrics.ledger.clone(), Some(signer))?;
        let engine = match device {
            DeviceSpec::Cpu => EngineHandle::start(model, pager, config.engine(), metrics.clone())?,
            DeviceSpec::Cuda(ordinal) => start_on_gpu(ordinal, model, pager, &config, &metrics)?,
        };
        let limits = RequestLimits {
            max_prompt_tokens: config.limits.max_prompt_tokens,
            default_max_tokens: config.limits.default_max_tokens,
        };
        let checker = engine.checker().clone();
        let validator = Arc::new(Validator::new(engine.model().clone(), model_name.clone(), limits, checker)?);
        let settlement = SettlementService::new(
            engine.clone(),
            policy.clone(),
            ledger.clone(),
            model_name.clone(),
            config.ledger.currency.clone(),
        );
        let state = Arc::new(AppState {
            engine,
            in_flight: Arc::new(Semaphore::new(config.limits.max_concurrent_requests)),
            model_name,
            metrics,
            ready: AtomicBool::new(false),
            adapter_store,
            started: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            validator,
            settlement,
            policy,
            drop_dir,
            ledger,
            accounts,
            replayer: std::sync::Mutex::new(None),
            reports: Arc::new(Semaphore::new(crate::api::MAX_REPORTS)),
            owner_locks: Default::default(),
            replication,
            config: config.clone(),
        });
        let pager = state.engine.pager().clone();
        state.policy.bind_adapters(move |name| pager.manifest(name).is_some());
        if let Some(replication) = &state.replication {
            // The other replicas' adapters and plugins first: a replica is ready with all of them.
            let applied = replication.catch_up(&state)?;
            tracing::info!(changes = applied, "caught up with the other replicas");
            replication.follow_in_background(Arc::downgrade(&state));
        }
        let accounts = state.accounts.clone();
        let audit: crate::policy::dropdir::Installed = Box::new(move |slot, v| {
            let (slot, detail) = (slot.to_string(), format!("version={} source={}", v.version, v.source));
            if let Err(e) =
                accounts.record(&crate::accounts::Caller::Cli, "plugin.install", &slot, Some(&v.sha256), &detail)
            {
                tracing::error!(error = %e, slot = %slot, "recording a dropped-in plugin in the audit trail failed");
            }
        });
        crate::policy::dropdir::watch(state.policy.clone(), state.drop_dir.clone(), audit);
        Ok(Server { state, listen: config.listen })
    }

    /// Serves until SIGTERM or ctrl-c, then stops accepting and drains in-flight requests.
    pub async fn run(self, listener: TcpListener) -> Result<()> {
        let state = self.state.clone();
        state.ready.store(true, Ordering::Relaxed);
        let app = router(self.state.clone());
        let shutdown = async move {
            wait_for_signal().await;
            tracing::info!("shutting down: no new connections, draining in-flight requests");
            state.ready.store(false, Ordering::Relaxed);
        };
        crate::api::listen::serve(listener, app, &self.state.config.limits, shutdown)
            .await
            .map_err(|e| Error::io("http server", e))?;
        // The head, signed: nothing written before shutdown can be cut or rewritten unseen.
        let ledger = self.state.ledger.clone();
        match tokio::task::spawn_blocking(move || ledger.checkpoint()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "signing the ledger's head at shutdown failed"),
            Err(e) => tracing::error!(error = %e, "signing the ledger's head at shutdown failed"),
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The engine on `cuda:ordinal`: the adapter pool's mirror and the KV cache share
/// `memory.device_bytes`; one step mixes up to `limits.max_running` adapters.
#[cfg(feature = "cuda")]
fn start_on_gpu(
    ordinal: usize,
    model: Arc<LoadedModel>,
    pager: AdapterPager,
    config: &ServerConfig,
    metrics: &Metrics,
) -> Result<EngineHandle> {
    let backend = crate::gpu::backend::GpuBackend::open(
        ordinal,
        &model,
        &pager,
        config.memory.device_bytes,
        config.limits.max_running,
    )?;
    EngineHandle::start_on(Box::new(backend), model, pager, config.engine(), metrics.clone())
}

/// Without the `cuda` feature there is no GPU backend: says why.
#[cfg(not(feature = "cuda"))]
fn start_on_gpu(
    ordinal: usize,
    _model: Arc<LoadedModel>,
    _pager: AdapterPager,
    _config: &ServerConfig,
    _metrics: &Metrics,
) -> Result<EngineHandle> {
    crate::device::probe_cuda(ordinal)?;
    Err(crate::error::DeviceError::Unavailable(format!(
        "cuda:{ordinal}: this build has no CUDA backend (feature `cuda`)"
    ))
    .into())
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
