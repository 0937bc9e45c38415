//! Helpers shared by the CLI tests: run the real `corolla` binary, read fixtures.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::{Dtype, SafeTensors};

pub fn corolla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corolla"))
        .args(args)
        .output()
        .expect("corolla runs")
}

pub fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(family)
}

pub fn stdout_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "corolla failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

pub fn ids_of(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect()
}

/// f32 tensor `name` of a safetensors file's bytes: (shape, data).
pub fn f32_tensor(bytes: &[u8], name: &str) -> (Vec<usize>, Vec<f32>) {
    let st = SafeTensors::deserialize(bytes).expect("valid safetensors");
    let t = st.tensor(name).unwrap_or_else(|_| panic!("no tensor {name}"));
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    let data = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), data)
}

/// i64 rows of a 2-D tensor, as token ids.
pub fn id_rows(bytes: &[u8], name: &str) -> Vec<Vec<u32>> {
    let st = SafeTensors::deserialize(bytes).expect("valid safetensors");
    let t = st.tensor(name).unwrap_or_else(|_| panic!("no tensor {name}"));
    assert_eq!(t.dtype(), Dtype::I64, "{name}");
    let cols = t.shape()[1];
    let flat: Vec<u32> = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32)
        .collect();
    flat.chunks(cols).map(<[u32]>::to_vec).collect()
}

/// The SmolLM2 GGUF: `$COROLLA_SMOLLM2_GGUF`, else where `corolla fetch` puts it.
pub fn smollm2() -> PathBuf {
    if let Some(p) = std::env::var_os("COROLLA_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let out = corolla(&["fetch"]);
    assert!(
        out.status.success(),
        "SmolLM2 is needed: set COROLLA_SMOLLM2_GGUF or let `corolla fetch` download it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
}

pub fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}
