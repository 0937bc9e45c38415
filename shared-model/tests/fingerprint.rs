//! The model fingerprint: what it tells apart, what it does not, and how little it reads.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use shared_model::ModelConfig;
use shared_model::bundle::BundleWeights;
use shared_model::fingerprint::{CHUNK_BYTES, CHUNKS, fingerprint, sample};
use shared_model::gguf::{GgufFile, GgufModel};
use shared_model::loader::ModelFiles;
use shared_model::quant::{QuantKind, QuantMatrix};
use shared_model::synthetic::QuantizeOnLoad;
use shared_model::weights::{HostTensor, SafetensorsSource, StoredTensor, WeightError, WeightSource};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// A fresh folder of this process's own.
fn scratch(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("corolla-fingerprint-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("fixture folder") {
        let entry = entry.expect("fixture entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

fn fingerprint_of(dir: &Path) -> String {
    let files = ModelFiles::open(dir).expect("checkpoint opens");
    fingerprint(&files.config, files.weights.as_ref()).expect("fingerprint")
}

/// Counts what a fingerprint asks of a source: dense or quantized reads (there must be none)
/// and stored bytes.
struct Counting<'a> {
    inner: &'a dyn WeightSource,
    dense_reads: AtomicU64,
    stored_bytes: AtomicU64,
}

impl<'a> Counting<'a> {
    fn new(inner: &'a dyn WeightSource) -> Self {
        Self {
            inner,
            dense_reads: AtomicU64::new(0),
            stored_bytes: AtomicU64::new(0),
        }
    }
}

impl WeightSource for Counting<'_> {
    fn names(&self) -> BTreeSet<String> {
        self.inner.names()
    }

    fn read(&self, name: &str) -> Result<HostTensor, WeightError> {
        self.dense_reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read(name)
    }

    fn read_quant(&self, name: &str) -> Result<Option<QuantMatrix>, WeightError> {
        self.dense_reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_quant(name)
    }

    fn stored(&self, name: &str) -> Result<StoredTensor, WeightError> {
        self.inner.stored(name)
    }

    fn read_stored(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), WeightError> {
        self.stored_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_stored(name, offset, buf)
    }
}

/// Fingerprints through the counter and checks that it read no tensor whole: nothing dense,
/// at most `CHUNKS * CHUNK_BYTES` stored bytes a tensor. Returns (fingerprint, bytes asked
/// for, bytes the tensors hold).
fn counted(config: &ModelConfig, source: &dyn WeightSource) -> (String, u64, u64) {
    let counting = Counting::new(source);
    let fp = fingerprint(config, &counting).expect("fingerprint");
    assert_eq!(
        counting.dense_reads.load(Ordering::Relaxed),
        0,
        "a tensor was read whole"
    );
    let names = source.names();
    let total: u64 = names.iter().map(|n| source.stored(n).expect("stored").byte_len).sum();
    let asked = counting.stored_bytes.load(Ordering::Relaxed);
    assert!(
        asked <= names.len() as u64 * CHUNKS * CHUNK_BYTES,
        "{asked} bytes asked for"
    );
    (fp, asked, total)
}

/// One safetensors file holding every tensor of `shards` as stored (what `save_file` of the
/// same state dict writes unsharded).
fn write_single_file(dir: &Path, shards: &[PathBuf]) {
    let bytes: Vec<Vec<u8>> = shards.iter().map(|p| std::fs::read(p).expect("shard")).collect();
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    for b in &bytes {
        let tensors = SafeTensors::deserialize(b).expect("shard parses");
        for (name, view) in tensors.tensors() {
            let view = TensorView::new(view.dtype(), view.shape().to_vec(), view.data()).expect("view");
            views.push((name, view));
        }
    }
    let file = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(dir.join("model.safetensors"), file).expect("write");
}

fn shards_of(dir: &Path) -> Vec<PathBuf> {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors") && !p.ends_with("golden.safetensors"))
        .collect();
    shards.sort();
    shards
}

/// Offsets count from each tensor's start, so where the tensors lie does not matter: a
/// sharded checkpoint and the same tensors in one file (as it was with version 1, which hashed
/// values), and the same shards held in memory (as in a browser), share a fingerprint.
#[test]
fn sharded_single_file_and_in_memory_agree() {
    let sharded = fixture("llama");
    let single = scratch("single");
    std::fs::copy(sharded.join("config.json"), single.join("config.json")).expect("config");
    let shards = shards_of(&sharded);
    assert!(shards.len() > 1, "the llama fixture is sharded");
    write_single_file(&single, &shards);
    let fp = fingerprint_of(&sharded);
    assert_eq!(fp.len(), 32);
    assert!(fp.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(fingerprint_of(&single), fp);

    let files = ModelFiles::open(&sharded).expect("fixture");
    let memory = BundleWeights::from_safetensors(shards.iter().map(|p| std::fs::read(p).expect("shard")).collect())
        .expect("in memory");
    assert_eq!(fingerprint(&files.config, &memory).expect("fingerprint"), fp);
    // `--quant` serves other bytes of the same checkpoint.
    let quantized = QuantizeOnLoad::new(files.weights.clone(), QuantKind::Q4_0);
    assert_eq!(fingerprint(&files.config, &quantized).expect("fingerprint"), fp);
    let _ = std::fs::remove_dir_all(&single);
}

/// A byte offset of `name` that no sample covers, if any.
fn unsampled_offset(source: &dyn WeightSource, name: &str) -> Option<u64> {
    let len = source.stored(name).expect("stored").byte_len;
    let chunks = sample(len);
    (0..len)
        .step_by(4)
        .find(|&o| chunks.iter().all(|&(s, l)| o + 4 <= s || o >= s + l))
}

/// Rewrites the f32 at byte `offset` of tensor `name` in its shard with its lowest mantissa
/// bit flipped: the smallest change a weight can take.
fn nudge(dir: &Path, name: &str, offset: u64) {
    let index = dir.join("model.safetensors.index.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index).expect("index")).expect("json");
    let shard = dir.join(json["weight_map"][name].as_str().expect("shard name"));
    let mut bytes = std::fs::read(&shard).expect("shard");
    let (header_len, metadata) = SafeTensors::read_metadata(&bytes).expect("header");
    let start = metadata.info(name).expect("tensor in shard").data_offsets.0;
    let at = 8 + header_len + start + offset as usize;
    bytes[at] ^= 1;
    std::fs::write(&shard, bytes).expect("write shard");
}

/// One weight changed where the sample looks (every tensor's first bytes are sampled) gives
/// another fingerprint; one changed where it does not look gives the same: the fingerprint
/// separates checkpoints, it does not authenticate them.
#[test]
fn a_changed_sampled_weight_changes_it() {
    let original = fingerprint_of(&fixture("llama"));
    let name = "model.layers.2.mlp.down_proj.weight";

    let sampled = scratch("sampled");
    copy_dir(&fixture("llama"), &sampled);
    nudge(&sampled, name, 0);
    assert_ne!(fingerprint_of(&sampled), original, "a change at a sampled byte");

    let unsampled = scratch("unsampled");
    copy_dir(&fixture("llama"), &unsampled);
    let files = ModelFiles::open(&unsampled).expect("copy opens");
    let offset = unsampled_offset(files.weights.as_ref(), name).expect("a tensor larger than its sample");
    drop(files);
    nudge(&unsampled, name, offset);
    assert_eq!(fingerprint_of(&unsampled), original, "a change between the samples");

    // Another config (same tensors) is another model.
    let context = scratch("context");
    copy_dir(&fixture("llama"), &context);
    let path = context.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
    config["max_position_embeddings"] = serde_json::json!(512);
    std::fs::write(&path, config.to_string()).expect("write config");
    assert_ne!(fingerprint_of(&context), original);
    for dir in [sampled, unsampled, context] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Fingerprinting reads no tensor whole and maps no shard: each shard's header and a few
/// hundred bytes a tensor, with positioned reads.
#[test]
fn fingerprint_reads_only_its_samples() {
    let index = fixture("llama").join("model.safetensors.index.json");
    let files = ModelFiles::open(&fixture("llama")).expect("fixture");
    let source = SafetensorsSource::open_index(&index).expect("index");
    let (fp, asked, total) = counted(&files.config, &source);
    assert_eq!(fp, fingerprint_of(&fixture("llama")));
    assert!(asked < total / 2, "{asked} of {total} bytes");
    assert!(
        source.opened_files().is_empty(),
        "fingerprinting mapped {:?}",
        source.opened_files()
    );

    // A checkpoint with big tensors: 16 x 4 MiB, of which 16 x 4 KiB are asked for.
    let (dir, _) = big_checkpoint("counted");
    let big = SafetensorsSource::open_file(&dir.join("model.safetensors")).expect("opens");
    let (_, asked, total) = counted(&files.config, &big);
    assert_eq!(total, 16 << 22);
    assert_eq!(asked, 16 * CHUNKS * CHUNK_BYTES);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A single-file checkpoint of 16 f32 tensors of 4 MiB each (64 MiB), written and synced to
/// disk. Returns its folder and the file.
fn big_checkpoint(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    let data: Vec<Vec<u8>> = (0..16u32)
        .map(|t| {
            (0..1u32 << 20)
                .flat_map(|i| (((i ^ t.wrapping_mul(2654435761)) % 1000) as f32 * 1e-3).to_le_bytes())
                .collect()
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .enumerate()
        .map(|(t, d)| {
            let view = TensorView::new(safetensors::Dtype::F32, vec![1024, 1024], d).expect("view");
            (format!("t{t:02}"), view)
        })
        .collect();
    let path = dir.join("model.safetensors");
    let bytes = safetensors::serialize(views, None).expect("serialize");
    let file = std::fs::File::create(&path).expect("create");
    std::io::Write::write_all(&mut &file, &bytes).expect("write");
    // Dirty pages cannot be dropped from the cache: on disk first.
    file.sync_all().expect("sync");
    (dir, path)
}

/// What the kernel reads, not only what the fingerprint asks for: the file is dropped from the
/// page cache (`POSIX_FADV_DONTNEED`), then this thread's `read_bytes` (`/proc/thread-self/io`,
/// bytes this thread made the kernel fetch from storage) is read before and after. The control
/// reads one byte from the middle of each tensor through a memory map, as a loader does: each
/// fault reads up to `read_ahead_kb` around its page (8 MiB on this project's CI VM, 128 KiB by
/// default). The positioned reads without readahead stay within two pages a chunk. Where the
/// kernel accounts no reads (tmpfs, some containers), the control shows it and the check is
/// skipped.
#[cfg(target_os = "linux")]
#[test]
fn the_kernel_reads_little() {
    use std::os::fd::AsRawFd;

    fn read_bytes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        io.lines()
            .find_map(|l| l.strip_prefix("read_bytes: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("read_bytes")
    }
    fn evict(path: &Path) {
        let file = std::fs::File::open(path).expect("open");
        // SAFETY: the descriptor is open for the call; the advice only drops clean cached
        // pages of this file.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "posix_fadvise(DONTNEED)");
    }

    let (dir, path) = big_checkpoint("kernel");
    let config = ModelFiles::open(&fixture("llama")).expect("fixture").config;
    evict(&path);
    let before = read_bytes();
    {
        let file = std::fs::File::open(&path).expect("open");
        // SAFETY: read-only map of a file this test wrote and nobody else changes.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.expect("map");
        let touched: u32 = (0..16).map(|t| u32::from(map[t * (4 << 20) + (2 << 20)])).sum();
        std::hint::black_box(touched);
    }
    let control = read_bytes() - before;

    evict(&path);
    let before = read_bytes();
    let source = SafetensorsSource::open_file(&path).expect("opens");
    fingerprint(&config, &source).expect("fingerprint");
    let read = read_bytes() - before;
    let _ = std::fs::remove_dir_all(&dir);
    if control == 0 {
        eprintln!("the kernel accounts no reads of {} here: check skipped", dir.display());
        return;
    }
    eprintln!("fingerprinting read {read} bytes from storage; touching 16 bytes of the map, {control}");
    // 16 tensors x 8 chunks x at most 2 pages, and the header's page.
    let bound = (16 * CHUNKS * 2 + 1) * 4096;
    assert!(
        read <= bound,
        "fingerprinting read {read} bytes, more than {bound} (control: {control})"
    );
}

/// GGUF tensors are sampled as stored (quantized blocks, q/k rows permuted), from the mapped
/// file and from an image in memory alike.
#[test]
fn smollm2_gguf_is_sampled_not_dequantized() {
    let Some(path) = std::env::var_os("COROLLA_SMOLLM2_GGUF") else {
        panic!("set COROLLA_SMOLLM2_GGUF (scripts/test.sh fetches the model and sets it)");
    };
    let files = ModelFiles::open(Path::new(&path)).expect("GGUF opens");
    let (fp, asked, total) = counted(&files.config, files.weights.as_ref());
    assert!(asked * 20 < total, "{asked} of {total} bytes");
    let stored = files
        .weights
        .stored("model.layers.0.self_attn.q_proj.weight")
        .expect("stored");
    assert_eq!(stored.dtype, "Q4_1");
    let image = std::fs::read(&path).expect("read the file");
    let model = GgufModel::new(GgufFile::from_bytes("in memory", image).expect("parses")).expect("maps");
    assert_eq!(fingerprint(&files.config, &model).expect("fingerprint"), fp);
}
