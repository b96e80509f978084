//! Embeds the server in a program: a tiny random model in the real checkpoint format, the
//! engine on its own thread, the OpenAI-compatible routes on an ephemeral port of 127.0.0.1,
//! one chat-less completion request through the bundled client, then a graceful shutdown.
//!
//! `cargo run --release -p dsv3-server --example serve_tiny`

use dsv3_kernels::Cpu;
use dsv3_kernels::gemm::GemmPath;
use dsv3_runtime::engine::{EngineConfig, spawn};
use dsv3_runtime::model::Model;
use dsv3_runtime::{Checkpoint, InitOptions, ModelConfig, Preset, Progress, init_random_preset};
use dsv3_server::{AppState, ServeOptions, client};
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("dsv3-serve-tiny-{}", std::process::id()));
    init_random_preset(Preset::Tiny, &dir, &InitOptions { progress: Progress::Never, ..Default::default() })?;
    let model_dir = dir.clone();
    // The engine thread loads the model itself (on a GPU, the context lives where it is used).
    let (engine, engine_thread) = spawn(EngineConfig { max_context: 1024, cache_tokens: 8192, ..Default::default() }, move || {
        let cfg = ModelConfig::from_file(&model_dir.join("config.json"))?;
        let ck = Checkpoint::open(&model_dir)?;
        ck.validate(&cfg)?;
        let model = Model::load(&Cpu, &ck, &cfg, GemmPath::Reference)?;
        Ok((Cpu, model, None))
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let state = AppState::new(engine, ServeOptions { model_name: "tiny".into(), ..Default::default() });
    let server = rt.spawn(dsv3_server::serve(listener, state, async move {
        let _ = stopped.await;
    }));

    let body = serde_json::json!({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0});
    let r = client::post(addr, "/v1/completions", &body, Duration::from_secs(60))?;
    println!("{} {}", r.status, r.text());

    let _ = stop.send(());
    rt.block_on(server)??;
    let _ = engine_thread.join();
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
