//! Compiles the CUDA kernels, only with the `cuda` feature (ahead of time, so a missing kernel
//! is a build failure; `docs/architecture.md`, "CUDA").
//!
//! The sm90 FP8 GEMM instantiations are generated first, from the one list of them
//! (`SM90_KERNELS` in `src/cuda/sm90_gemm/catalog.rs`, included below): one `.cu` per (N, K)
//! and the wgmma wrappers for their tile widths, under `OUT_DIR/cuda-gen`.
//!
//! Every `cuda/**/*.cu` and generated `.cu` becomes one `sm_90a` cubin in `OUT_DIR`, compiled
//! with `-Xptxas -v`.
//! ptxas' report gives registers, stack and spills per function: any spill fails the build,
//! and one line per kernel is printed as a cargo warning and kept in `kernel-report.txt`.
//! Entry points (`extern "C" __global__ void dsv3_*`) are parsed from the sources, checked to
//! be function symbols of their cubin (a missing one fails the build), and written to
//! `kernels.rs` as the `Kernel` enum that `src/cuda/` includes (with `Kernel::from_symbol`, how
//! the host finds a catalog entry's kernel).
//!
//! nvcc: `$DSV3_NVCC`, else the workspace's `.venv-cuda` (`scripts/install-cuda-toolchain.sh`).
//! Without the feature this script does nothing and needs no CUDA.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The sm90 kernel list and its generators, shared with the crate.
#[allow(dead_code)] // the crate uses more of it than the build does
mod catalog {
    include!("src/cuda/sm90_gemm/catalog.rs");
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cuda/sm90_gemm/catalog.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(e) = build() {
        eprintln!("error: {e}");
        panic!("dsv3-kernels (feature `cuda`): {e}");
    }
}

/// One `.cu` file and what came of it.
struct Unit {
    /// The path relative to `cuda/` (generated units: as if they were there).
    rel: String,
    generated: bool,
    cubin: PathBuf,
    kernels: Vec<String>,
    report: Vec<Func>,
}

/// ptxas' figures for one function.
#[derive(Default, Clone)]
struct Func {
    name: String,
    regs: u32,
    stack: u32,
    spill_st: u32,
    spill_ld: u32,
    smem: u32,
}

fn build() -> Result<(), String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let root = manifest.join("../..").canonicalize().map_err(|e| format!("workspace root: {e}"))?;
    let cuda = root.join("cuda");
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    println!("cargo:rerun-if-env-changed=DSV3_NVCC");
    println!("cargo:rerun-if-changed={}", cuda.display());
    let nvcc = find_nvcc(&root)?;

    let mut sources = Vec::new();
    walk(&cuda, &mut sources)?;
    sources.sort();
    if sources.is_empty() {
        return Err(format!("no .cu files under {}", cuda.display()));
    }
    let generated = generate_sm90(&out.join("cuda-gen"))?;
    let mut units: Vec<(PathBuf, String, bool)> = Vec::new();
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let rel = src.strip_prefix(&cuda).unwrap_or(&src).to_string_lossy().replace('\\', "/");
        units.push((src, rel, false));
    }
    units.extend(generated.into_iter().map(|(src, rel)| (src, rel, true)));
    // Compile all units at once (nvcc is single-threaded; there are few units).
    let mut jobs = Vec::new();
    for (src, rel, generated) in units {
        let cubin = out.join(format!("{}.cubin", rel.trim_end_matches(".cu").replace('/', "_")));
        let child = Command::new(&nvcc)
            .args(["-cubin", "-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "-lineinfo"])
            .args(["-Werror", "all-warnings", "-Xptxas", "-v"])
            .arg("-I")
            .arg(cuda.join("include"))
            .arg("-I")
            .arg(out.join("cuda-gen/include"))
            .arg("-o")
            .arg(&cubin)
            .arg(&src)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
        jobs.push((src, rel, generated, cubin, child));
    }
    let mut units = Vec::new();
    for (src, rel, generated, cubin, child) in jobs {
        let o = child.wait_with_output().map_err(|e| e.to_string())?;
        let log = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        if !o.status.success() {
            return Err(format!("nvcc failed on {rel}:\n{log}"));
        }
        let text = fs::read_to_string(&src).map_err(|e| format!("{rel}: {e}"))?;
        units.push(Unit { kernels: entry_points(&text), report: parse_ptxas(&log), rel, generated, cubin });
    }

    let mut report = String::from("kernel                          unit                      regs  stack  spill st/ld  smem\n");
    let mut spills = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for u in &units {
        let bin = fs::read(&u.cubin).map_err(|e| format!("{}: {e}", u.cubin.display()))?;
        let syms = elf_func_symbols(&bin).map_err(|e| format!("{}: {e}", u.rel))?;
        for k in &u.kernels {
            if !k.starts_with("dsv3_") {
                return Err(format!("{}: kernel `{k}` must be named dsv3_*", u.rel));
            }
            if !seen.insert(k.clone()) {
                return Err(format!("{}: kernel `{k}` is defined twice", u.rel));
            }
            if !syms.iter().any(|s| s == k) {
                return Err(format!("{}: entry point `{k}` is not a function symbol of {}", u.rel, u.cubin.display()));
            }
        }
        for f in &u.report {
            let line =
                format!("{:<31} {:<25} {:>4}  {:>5}  {:>5}/{:<5}  {:>5}", f.name, u.rel, f.regs, f.stack, f.spill_st, f.spill_ld, f.smem);
            println!("cargo:warning=sm_90a {line}");
            let _ = writeln!(report, "{line}");
            if f.spill_st > 0 || f.spill_ld > 0 {
                spills.push(line);
            }
        }
    }
    fs::write(out.join("kernel-report.txt"), &report).map_err(|e| e.to_string())?;
    if !spills.is_empty() {
        return Err(format!("register spills (not allowed):\n{}", spills.join("\n")));
    }
    fs::write(out.join("kernels.rs"), generate(&units)).map_err(|e| e.to_string())
}

/// Writes the sm90 GEMM instantiations of the catalog (one `.cu` per (N, K)) and the wgmma
/// header for their tile widths under `dir`; returns the sources with their names relative to
/// `cuda/` as if they were there (`gemm/sm90_fp8_gemm_n{N}_k{K}.cu`).
fn generate_sm90(dir: &Path) -> Result<Vec<(PathBuf, String)>, String> {
    let write = |p: &Path, text: String| -> Result<(), String> {
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        // Unchanged files keep their time stamps, so nothing is rebuilt for nothing.
        if fs::read_to_string(p).ok().as_deref() != Some(text.as_str()) {
            fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        Ok(())
    };
    write(&dir.join("include/dsv3/sm90_wgmma_fp8.cuh"), catalog::wgmma_header())?;
    let mut out = Vec::new();
    for (n, k) in catalog::sm90_shapes() {
        let rel = format!("gemm/{}", catalog::source_name(n, k));
        let path = dir.join(&rel);
        write(&path, catalog::cuda_source(n, k))?;
        out.push((path, rel));
    }
    Ok(out)
}

/// `$DSV3_NVCC`, or nvcc in the workspace's `.venv-cuda`.
fn find_nvcc(root: &Path) -> Result<PathBuf, String> {
    if let Some(p) = env::var_os("DSV3_NVCC") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(format!("DSV3_NVCC={} is not a file", p.display())) };
    }
    let lib = root.join(".venv-cuda/lib");
    if let Ok(dirs) = fs::read_dir(&lib) {
        for d in dirs.flatten() {
            let nvcc = d.path().join("site-packages/nvidia/cu13/bin/nvcc");
            if nvcc.is_file() {
                return Ok(nvcc);
            }
        }
    }
    Err(format!(
        "nvcc not found: run scripts/install-cuda-toolchain.sh (installs it under {}) or set DSV3_NVCC",
        root.join(".venv-cuda").display()
    ))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    for e in fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let p = e.map_err(|e| e.to_string())?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "cu") {
            out.push(p);
        }
    }
    Ok(())
}

/// Names of the `extern "C" __global__ ... void NAME(` definitions of a source, comments
/// stripped.
fn entry_points(src: &str) -> Vec<String> {
    let code: String = src.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut names = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("extern \"C\"") {
        rest = &rest[i + 10..];
        let head = rest.trim_start();
        // The signature: up to the body or the end of a declaration.
        let sig = &head[..head.find(['{', ';']).unwrap_or(head.len())];
        if !sig.starts_with("__global__") {
            continue;
        }
        // The name stands right before the parameter list, the last `(` of the signature
        // (`__launch_bounds__(...)` may come earlier; parameters have no parentheses).
        if let Some(paren) = sig.rfind('(') {
            let before = sig[..paren].trim_end();
            let start = before.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |i| i + 1);
            if sig.contains(" void ") && start < before.len() {
                names.push(before[start..].to_string());
            }
        }
    }
    names
}

/// Per-function figures from `ptxas -v` output.
fn parse_ptxas(log: &str) -> Vec<Func> {
    let num = |s: &str, key: &str| -> u32 {
        s.find(key).and_then(|i| s[..i].trim_end().rsplit([' ', ',']).next().and_then(|n| n.parse().ok())).unwrap_or(0)
    };
    let mut funcs: Vec<Func> = Vec::new();
    for line in log.lines() {
        if let Some(i) = line.find("Function properties for ") {
            funcs.push(Func { name: line[i + 24..].trim().to_string(), ..Func::default() });
        } else if let Some(f) = funcs.last_mut().filter(|_| line.contains("bytes stack frame")) {
            f.stack = num(line, "bytes stack frame");
            f.spill_st = num(line, "bytes spill stores");
            f.spill_ld = num(line, "bytes spill loads");
        } else if let Some(f) = funcs.last_mut().filter(|_| line.contains("Used ") && line.contains(" registers")) {
            f.regs = num(line, "registers");
            f.smem = num(line, "bytes smem");
        }
    }
    funcs
}

/// Names of the function symbols (STT_FUNC) of an ELF64 little-endian file.
fn elf_func_symbols(b: &[u8]) -> Result<Vec<String>, String> {
    let rd = |o: usize, n: usize| -> Result<u64, String> {
        let s = b.get(o..o + n).ok_or("truncated ELF")?;
        Ok(s.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64))
    };
    if b.get(..4) != Some(b"\x7fELF") || b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return Err("not an ELF64 little-endian cubin".into());
    }
    let (shoff, shentsize, shnum) = (rd(0x28, 8)? as usize, rd(0x3A, 2)? as usize, rd(0x3C, 2)? as usize);
    let sec = |i: usize| -> Result<(u32, usize, usize, usize, usize), String> {
        let h = shoff + i * shentsize;
        Ok((
            rd(h + 4, 4)? as u32,
            rd(h + 0x18, 8)? as usize,
            rd(h + 0x20, 8)? as usize,
            rd(h + 0x28, 4)? as usize,
            rd(h + 0x38, 8)? as usize,
        ))
    };
    let mut names = Vec::new();
    for i in 0..shnum {
        let (ty, off, size, link, entsize) = sec(i)?;
        if ty != 2 || entsize < 24 {
            continue; // not SHT_SYMTAB
        }
        let (_, stroff, strsize, _, _) = sec(link)?;
        let strtab = b.get(stroff..stroff + strsize).ok_or("truncated string table")?;
        for s in (off..off + size).step_by(entsize) {
            let (name, info) = (rd(s, 4)? as usize, rd(s + 4, 1)? as u8);
            if info & 0xF == 2 {
                let tail = strtab.get(name..).ok_or("bad symbol name")?;
                let end = tail.iter().position(|&c| c == 0).unwrap_or(tail.len());
                names.push(String::from_utf8_lossy(&tail[..end]).into_owned());
            }
        }
    }
    Ok(names)
}

/// `dsv3_act_quant_1x128` -> `ActQuant1x128`; `quant/act_quant.cu` -> `QuantActQuant`.
fn variant(name: &str) -> String {
    let name = name.trim_start_matches("dsv3_").trim_end_matches(".cu");
    name.split(['_', '/']).filter(|w| !w.is_empty()).map(|w| w[..1].to_uppercase() + &w[1..]).collect()
}

fn generate(units: &[Unit]) -> String {
    let mut s = String::from("// Generated by build.rs from cuda/**/*.cu. Do not edit.\n\n");
    let _ = writeln!(s, "/// A compiled `sm_90a` cubin, one per `.cu` file of `cuda/`.");
    let _ = writeln!(s, "#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]\npub enum Module {{");
    for u in units {
        let doc = if u.generated { format!("`{}`, generated from `SM90_KERNELS`", u.rel) } else { format!("`cuda/{}`", u.rel) };
        let _ = writeln!(s, "    /// {doc}\n    {},", variant(&u.rel));
    }
    let _ = writeln!(s, "}}\n\nimpl Module {{\n    /// Every module.\n    pub const ALL: &'static [Module] = &[");
    for u in units {
        let _ = writeln!(s, "        Module::{},", variant(&u.rel));
    }
    let _ = writeln!(
        s,
        "    ];\n    /// The source file, relative to `cuda/` (a generated one as if it were there).\n    pub const fn source(self) -> &'static str {{\n        match self {{"
    );
    for u in units {
        let _ = writeln!(s, "            Module::{} => {:?},", variant(&u.rel), u.rel);
    }
    let _ =
        writeln!(s, "        }}\n    }}\n    /// The cubin, embedded.\n    pub fn cubin(self) -> &'static [u8] {{\n        match self {{");
    for u in units {
        let f = u.cubin.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let _ = writeln!(s, "            Module::{} => include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{f}\")),", variant(&u.rel));
    }
    let _ = writeln!(s, "        }}\n    }}\n}}\n");
    let _ = writeln!(s, "/// Every kernel entry point of `cuda/`, one variant per `extern \"C\" __global__` function.");
    let _ = writeln!(s, "#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]\npub enum Kernel {{");
    for u in units {
        for k in &u.kernels {
            let f = u.report.iter().find(|f| &f.name == k).cloned().unwrap_or_default();
            let _ = writeln!(s, "    /// `{k}` in `cuda/{}`: {} registers, {} bytes smem.\n    {},", u.rel, f.regs, f.smem, variant(k));
        }
    }
    let _ = writeln!(s, "}}\n\nimpl Kernel {{\n    /// Every kernel.\n    pub const ALL: &'static [Kernel] = &[");
    for u in units {
        for k in &u.kernels {
            let _ = writeln!(s, "        Kernel::{},", variant(k));
        }
    }
    let _ = writeln!(
        s,
        "    ];\n    /// The symbol name in the cubin.\n    pub const fn symbol(self) -> &'static str {{\n        match self {{"
    );
    for u in units {
        for k in &u.kernels {
            let _ = writeln!(s, "            Kernel::{} => {k:?},", variant(k));
        }
    }
    let _ = writeln!(
        s,
        "        }}\n    }}\n    /// The kernel with this symbol, if any.\n    pub fn from_symbol(symbol: &str) -> Option<Kernel> {{"
    );
    let _ = writeln!(s, "        Some(match symbol {{");
    for u in units {
        for k in &u.kernels {
            let _ = writeln!(s, "            {k:?} => Kernel::{},", variant(k));
        }
    }
    let _ = writeln!(s, "            _ => return None,\n        }})");
    let _ = writeln!(s, "    }}\n    /// The module that holds it.\n    pub const fn module(self) -> Module {{\n        match self {{");
    for u in units {
        for k in &u.kernels {
            let _ = writeln!(s, "            Kernel::{} => Module::{},", variant(k), variant(&u.rel));
        }
    }
    let _ = writeln!(s, "        }}\n    }}\n}}\n");
    let _ = writeln!(s, "/// ptxas' report (registers, stack, spills, shared memory per function) of this build.");
    let _ = writeln!(s, "pub const KERNEL_REPORT: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/kernel-report.txt\"));");
    s
}
