//! `dsv3 serve`: the OpenAI-compatible server (crate `dsv3-server`) over the serving engine.

use crate::args::{GraphsArg, ModelArgs, OnDevice, WithMtp, load_dir};

use dsv3_kernels::Backend;
use dsv3_runtime::engine::{EngineConfig, spawn};
use dsv3_runtime::{Result, RuntimeError};
use dsv3_server::{ReasoningMode, ServeOptions};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0: any free port; the address is printed to stderr).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name clients send (default: the model directory's name, or the preset's).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Sequences decoding at once.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Tokens per engine step (decodes + prompt chunks); at least --max-running.
    #[arg(long, default_value_t = 2048)]
    pub max_step_tokens: usize,
    /// Most prompt tokens of one request per step (0: the step budget).
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Most tokens (prompt + completion) of one request (capped by the model's positions).
    #[arg(long, default_value_t = 4096)]
    pub max_context: usize,
    /// Tokens the paged latent cache holds in all (64 per page).
    #[arg(long, default_value_t = 65536)]
    pub cache_tokens: usize,
    /// Requests that may wait for a slot; more get 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Seconds a request may take before it ends with a timeout.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Largest request body, in bytes (413 beyond).
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// `<think>` blocks into `reasoning_content`: `auto` (when the chat template or the answer
    /// opens one) or `off`.
    #[arg(long, default_value = "auto")]
    pub reasoning: ReasoningMode,
    /// Seconds running requests may finish after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Steps of decodes alone as CUDA graphs per batch-size bucket (`auto`: where the device
    /// can), or eagerly (`off`).
    #[arg(long, default_value = "auto")]
    pub graphs: GraphsArg,
    /// Refused: speculative decoding is not batched in the server yet (use `generate --mtp`).
    #[arg(long, hide = true)]
    pub mtp: bool,
}

impl OnDevice for ServeArgs {
    fn run<B: Backend + 'static>(self, b: B) -> Result<()> {
        let a = self;
        if a.mtp {
            return Err(RuntimeError::Request(
                "serve --mtp: MTP speculative decoding is not batched in the server yet; serve without it (generate --mtp runs it for one prompt)".into(),
            ));
        }
        let (dir, tmp) = a.model.dir()?;
        let name = a.served_model_name.clone().unwrap_or_else(|| match &a.model.preset {
            Some(p) => p.clone(),
            None => dir.file_name().map_or_else(|| "dsv3".into(), |n| n.to_string_lossy().into_owned()),
        });
        let cfg = EngineConfig {
            max_running: a.max_running,
            max_step_tokens: a.max_step_tokens,
            prefill_chunk: a.prefill_chunk,
            max_context: a.max_context,
            cache_tokens: a.cache_tokens,
            max_waiting: a.max_waiting,
            decode_graphs: a.graphs.into(),
        };
        let (path, lm_head) = (a.model.gemm, a.model.lm_head);
        let (handle, engine) = spawn(cfg, move || {
            let (model, _, tok) = load_dir(&b, &dir, path, lm_head, WithMtp::No)?;
            Ok((b, model, tok))
        })?;
        let opts = ServeOptions {
            model_name: name,
            request_timeout: Duration::from_secs(a.request_timeout),
            max_body_bytes: a.max_body_bytes,
            reasoning: a.reasoning,
            shutdown_timeout: Duration::from_secs(a.shutdown_timeout),
        };
        let limits = handle.limits();
        eprintln!(
            "dsv3 serve: model `{}` on {}, context {} tokens, {} running at most, cache {} tokens",
            opts.model_name, a.model.device, limits.max_context, a.max_running, a.cache_tokens
        );
        let served = dsv3_server::run(handle, SocketAddr::new(a.host, a.port), opts);
        // The engine ends once it is shut down and idle (the server shut it down on SIGTERM).
        let _ = engine.join();
        drop(tmp);
        served.map_err(|e| RuntimeError::Request(e.to_string()))
    }
}
