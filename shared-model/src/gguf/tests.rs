use super::*;
use crate::weights::WeightSource;
use half::{bf16, f16};

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

// ---- dequantization -------------------------------------------------------------------------

#[test]
fn dequant_f32_f16_bf16() {
    let bytes: Vec<u8> = [1.5f32, -2.25].iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(dequantize(GgmlType::F32, &bytes, 2), Ok(vec![1.5, -2.25]));
    let bytes: Vec<u8> = [h(0.5), h(-3.0)].concat();
    assert_eq!(dequantize(GgmlType::F16, &bytes, 2), Ok(vec![0.5, -3.0]));
    let bytes: Vec<u8> = [bf16::from_f32(1.0), bf16::from_f32(-0.375)]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    assert_eq!(dequantize(GgmlType::BF16, &bytes, 2), Ok(vec![1.0, -0.375]));
}

#[test]
fn dequant_q8_0() {
    let mut block = h(0.5).to_vec();
    block.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let want: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect();
    assert_eq!(dequantize(GgmlType::Q8_0, &block, 32), Ok(want));
    // Extremes of i8.
    let mut block = h(2.0).to_vec();
    block.extend([0x80u8, 0x7f].repeat(16));
    let got = dequantize(GgmlType::Q8_0, &block, 32).expect("valid block");
    assert_eq!((got[0], got[1]), (-256.0, 254.0));
}

#[test]
fn dequant_q4_0() {
    // Byte j holds element j in its low nibble and element j + 16 in its high nibble.
    let mut block = h(0.25).to_vec();
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut want: Vec<f32> = (0..16).map(|j| (j as f32 - 8.0) * 0.25).collect();
    want.extend((0..16).map(|j| ((15 - j) as f32 - 8.0) * 0.25));
    assert_eq!(dequantize(GgmlType::Q4_0, &block, 32), Ok(want));
}

#[test]
fn dequant_q4_1() {
    let mut block = [h(0.5), h(-1.0)].concat();
    block.extend((0..16u8).map(|j| j | (3 << 4)));
    let mut want: Vec<f32> = (0..16).map(|j| j as f32 * 0.5 - 1.0).collect();
    want.extend([3.0 * 0.5 - 1.0; 16]);
    // Two blocks: the second repeats the first.
    let two = [block.clone(), block].concat();
    let want2 = [want.clone(), want].concat();
    assert_eq!(dequantize(GgmlType::Q4_1, &two, 64), Ok(want2));
}

#[test]
fn dequant_rejects_bad_input() {
    assert_eq!(
        dequantize(GgmlType(12), &[0; 144], 256),
        Err(DequantError::Unsupported(GgmlType(12)))
    );
    assert_eq!(GgmlType(12).to_string(), "Q4_K");
    assert!(matches!(
        dequantize(GgmlType::Q8_0, &[0; 33], 32),
        Err(DequantError::Length {
            expected: 34,
            actual: 33,
            ..
        })
    ));
    assert!(matches!(
        dequantize(GgmlType::Q4_0, &[0; 18], 16),
        Err(DequantError::PartialBlock { .. })
    ));
}

// ---- a tiny GGUF writer ---------------------------------------------------------------------

#[derive(Default)]
struct Builder {
    version: u32,
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    alignment: u64,
}

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend(s.as_bytes());
    v
}

impl Builder {
    fn new() -> Self {
        Builder {
            version: 3,
            alignment: 32,
            ..Default::default()
        }
    }
    fn kv(mut self, key: &str, ty: u32, value: Vec<u8>) -> Self {
        self.kv.push((key.to_string(), ty, value));
        self
    }
    fn u32(self, key: &str, v: u32) -> Self {
        self.kv(key, 4, v.to_le_bytes().to_vec())
    }
    fn f32(self, key: &str, v: f32) -> Self {
        self.kv(key, 6, v.to_le_bytes().to_vec())
    }
    fn str(self, key: &str, v: &str) -> Self {
        self.kv(key, 8, gstr(v))
    }
    fn str_array(self, key: &str, items: &[&str]) -> Self {
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend((items.len() as u64).to_le_bytes());
        for s in items {
            v.extend(gstr(s));
        }
        self.kv(key, 9, v)
    }
    fn tensor_f32(mut self, name: &str, dims: &[u64], data: &[f32]) -> Self {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensors.push((name.to_string(), dims.to_vec(), 0, bytes));
        self
    }
    fn tensor_raw(mut self, name: &str, dims: &[u64], ty: u32, bytes: Vec<u8>) -> Self {
        self.tensors.push((name.to_string(), dims.to_vec(), ty, bytes));
        self
    }
    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kv {
            out.extend(gstr(k));
            out.extend(ty.to_le_bytes());
            out.extend(v);
        }
        let align = |x: u64| x.div_ceil(self.alignment) * self.alignment;
        // No padding after the last tensor, so that every shorter prefix is truncated.
        let mut data = Vec::new();
        for (name, dims, ty, bytes) in &self.tensors {
            let offset = align(data.len() as u64);
            data.resize(offset as usize, 0);
            out.extend(gstr(name));
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            data.extend(bytes);
        }
        out.resize(align(out.len() as u64) as usize, 0);
        out.extend(data);
        out
    }
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes("test.gguf", bytes)
}

fn format_err(bytes: Vec<u8>) -> FormatError {
    match parse(bytes) {
        Err(GgufError::Format { reason, .. }) => reason,
        other => panic!("expected a format error, got {other:?}"),
    }
}

fn sample() -> Builder {
    let mut all_types = Vec::new();
    Builder::new()
        .kv("u8", 0, vec![7])
        .kv("i8", 1, vec![0xff])
        .kv("u16", 2, 513u16.to_le_bytes().to_vec())
        .kv("i16", 3, (-2i16).to_le_bytes().to_vec())
        .u32("u32", 70000)
        .kv("i32", 5, (-5i32).to_le_bytes().to_vec())
        .f32("f32", 0.5)
        .kv("bool", 7, vec![1])
        .str("str", "héllo")
        .kv("u64", 10, (1u64 << 40).to_le_bytes().to_vec())
        .kv("i64", 11, (-9i64).to_le_bytes().to_vec())
        .kv("f64", 12, 0.25f64.to_le_bytes().to_vec())
        .str_array("strs", &["a", "b c"])
        .kv("i32s", 9, {
            all_types.extend(5u32.to_le_bytes());
            all_types.extend(3u64.to_le_bytes());
            for x in [1i32, -1, 3] {
                all_types.extend(x.to_le_bytes());
            }
            all_types
        })
        .tensor_f32("a", &[3, 2], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
        .tensor_raw("q", &[32], 8, {
            let mut b = h(1.0).to_vec();
            b.extend(1..=32u8);
            b
        })
}

// ---- header parsing -------------------------------------------------------------------------

#[test]
fn parses_metadata_and_tensors() {
    let f = parse(sample().build()).expect("valid file");
    assert_eq!(f.version(), 3);
    assert_eq!(f.get_u32("u8").ok(), Some(7));
    assert_eq!(f.metadata("i8"), Some(&GgufValue::I8(-1)));
    assert_eq!(f.get_u32("u16").ok(), Some(513));
    assert_eq!(f.get_i64("i16").ok(), Some(-2));
    assert_eq!(f.get_u32("u32").ok(), Some(70000));
    assert_eq!(f.get_i64("i32").ok(), Some(-5));
    assert_eq!(f.get_f32("f32").ok(), Some(0.5));
    assert_eq!(f.get_bool("bool").ok(), Some(true));
    assert_eq!(f.get_str("str").ok(), Some("héllo"));
    assert_eq!(f.get_u64("u64").ok(), Some(1 << 40));
    assert_eq!(f.get_i64("i64").ok(), Some(-9));
    assert_eq!(f.get_f32("f64").ok(), Some(0.25));
    assert_eq!(
        f.get_str_array("strs").ok(),
        Some(&["a".to_string(), "b c".to_string()][..])
    );
    assert_eq!(f.get_i32_array("i32s").ok(), Some(vec![1, -1, 3]));

    let a = f.read_tensor("a").expect("f32 tensor");
    assert_eq!(a.shape, vec![2, 3]);
    assert_eq!(a.data, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let q = f.read_tensor("q").expect("q8_0 tensor");
    assert_eq!(q.data, (1..=32).map(|x| x as f32).collect::<Vec<_>>());
    assert_eq!(f.tensor_info("q").map(|t| t.offset), Some(32));
    assert!(matches!(f.read_tensor("nope"), Err(GgufError::MissingTensor(n)) if n == "nope"));
}

#[test]
fn getters_name_the_key() {
    let f = parse(sample().build()).expect("valid file");
    let err = f.get_u32("missing").expect_err("missing key");
    assert!(matches!(&err, GgufError::MissingKey { key } if key == "missing"));
    assert!(err.to_string().contains("missing"));
    let err = f.get_u32("str").expect_err("wrong type");
    assert!(matches!(&err, GgufError::WrongType { key, found: "string", .. } if key == "str"));
    assert!(
        matches!(f.get_u32("i8"), Err(GgufError::WrongType { .. })),
        "negative is not u32"
    );
    assert!(matches!(f.get_str_array("i32s"), Err(GgufError::WrongType { .. })));
    assert_eq!(f.opt_u32("missing").ok(), Some(None));
    assert!(f.opt_u32("str").is_err());
}

#[test]
fn version_2_and_alignment() {
    let mut b = sample();
    b.version = 2;
    b.alignment = 64;
    let b = b.u32("general.alignment", 64);
    let f = parse(b.build()).expect("v2 with alignment 64");
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.tensor_info("q").map(|t| t.offset), Some(64));
    assert_eq!(f.read_tensor("a").map(|t| t.data.len()).ok(), Some(6));
}

#[test]
fn every_truncation_is_an_error() {
    let full = sample().build();
    for len in 0..full.len() {
        let prefix = full[..len].to_vec();
        assert!(parse(prefix).is_err(), "prefix of {len} bytes parsed");
    }
}

#[test]
fn garbage_is_an_error() {
    assert_eq!(format_err(b"GGML\x03\0\0\0".to_vec()), FormatError::BadMagic(*b"GGML"));
    let mut b = sample();
    b.version = 1;
    assert_eq!(format_err(b.build()), FormatError::UnsupportedVersion(1));
    // Pseudo-random bytes behind a valid magic and version.
    let mut state = 0x1234_5678u32;
    for _ in 0..200 {
        let mut bytes = b"GGUF\x03\0\0\0".to_vec();
        bytes.extend((0..256).map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        }));
        let _ = parse(bytes);
    }
}

fn header(tensors: u64, kvs: u64) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend(3u32.to_le_bytes());
    v.extend(tensors.to_le_bytes());
    v.extend(kvs.to_le_bytes());
    v
}

#[test]
fn huge_counts_are_rejected_before_allocating() {
    assert!(matches!(
        format_err(header(0, u64::MAX)),
        FormatError::CountTooLarge { .. }
    ));
    assert!(matches!(
        format_err(header(u64::MAX, 0)),
        FormatError::CountTooLarge { .. }
    ));
    assert!(matches!(
        format_err(header(1 << 40, 0)),
        FormatError::CountTooLarge { .. }
    ));

    // A key whose length is 2^63.
    let mut v = header(0, 1);
    v.extend((1u64 << 63).to_le_bytes());
    v.extend([0; 16]);
    assert!(matches!(format_err(v), FormatError::Truncated { .. }));

    // An array of u64::MAX strings.
    let mut v = header(0, 1);
    v.extend(gstr("k"));
    v.extend(9u32.to_le_bytes());
    v.extend(8u32.to_le_bytes());
    v.extend(u64::MAX.to_le_bytes());
    assert!(matches!(format_err(v), FormatError::CountTooLarge { .. }));

    // An array whose element count times element size overflows u64.
    let mut v = header(0, 1);
    v.extend(gstr("k"));
    v.extend(9u32.to_le_bytes());
    v.extend(10u32.to_le_bytes());
    v.extend((u64::MAX / 4).to_le_bytes());
    assert!(matches!(format_err(v), FormatError::CountTooLarge { .. }));
}

#[test]
fn bad_structure_is_rejected() {
    // Unknown value type.
    assert!(matches!(
        format_err(Builder::new().kv("k", 99, vec![0; 8]).build()),
        FormatError::BadValueType { value_type: 99, .. }
    ));
    // Arrays nested too deep.
    let mut nested = Vec::new();
    for _ in 0..10 {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    nested.extend(0u32.to_le_bytes());
    nested.extend(0u64.to_le_bytes());
    assert!(matches!(
        format_err(Builder::new().kv("deep", 9, nested).build()),
        FormatError::NestingTooDeep { .. }
    ));
    // Duplicate key.
    assert!(matches!(
        format_err(Builder::new().u32("k", 1).u32("k", 2).build()),
        FormatError::DuplicateKey(_)
    ));
    // Alignment that is not a power of two.
    assert_eq!(
        format_err(Builder::new().u32("general.alignment", 24).build()),
        FormatError::BadAlignment(24)
    );
    assert_eq!(
        format_err(Builder::new().u32("general.alignment", 0).build()),
        FormatError::BadAlignment(0)
    );
    // Five dims.
    assert!(matches!(
        format_err(Builder::new().tensor_f32("t", &[1, 1, 1, 1, 1], &[0.0]).build()),
        FormatError::BadDimCount { n_dims: 5, .. }
    ));
    // Element count overflow.
    assert!(matches!(
        format_err(Builder::new().tensor_f32("t", &[1 << 32, 1 << 32, 2], &[0.0]).build()),
        FormatError::ElementOverflow { .. }
    ));
    // No elements, yet the other dims overflow when multiplied in reverse (found by fuzzing).
    assert!(matches!(
        format_err(Builder::new().tensor_f32("t", &[0, 1 << 63, 4], &[]).build()),
        FormatError::ElementOverflow { .. }
    ));
    // Data past the end of the file.
    assert!(matches!(
        format_err(Builder::new().tensor_f32("t", &[1000], &[0.0]).build()),
        FormatError::OutOfBounds { .. }
    ));
    // Row length not a whole number of blocks.
    assert!(matches!(
        format_err(Builder::new().tensor_raw("t", &[16, 2], 8, vec![0; 34]).build()),
        FormatError::PartialBlock { .. }
    ));
    // Duplicate tensor.
    assert!(matches!(
        format_err(
            Builder::new()
                .tensor_f32("t", &[1], &[0.0])
                .tensor_f32("t", &[1], &[0.0])
                .build()
        ),
        FormatError::DuplicateTensor(_)
    ));
}

#[test]
fn misaligned_and_unsupported_tensors() {
    let mut bytes = Builder::new()
        .tensor_f32("t", &[1], &[0.0])
        .tensor_f32("u", &[1], &[0.0])
        .build();
    // Patch the second tensor's offset (the 8 bytes after its type) from 32 to 4.
    let needle: Vec<u8> = [
        gstr("u"),
        1u32.to_le_bytes().to_vec(),
        1u64.to_le_bytes().to_vec(),
        0u32.to_le_bytes().to_vec(),
    ]
    .concat();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .expect("tensor info present")
        + needle.len();
    bytes[at..at + 8].copy_from_slice(&4u64.to_le_bytes());
    assert!(matches!(format_err(bytes), FormatError::Misaligned { offset: 4, .. }));

    // A Q4_K tensor parses (its extent is unknown) but cannot be read.
    let f = parse(Builder::new().tensor_raw("k", &[256], 12, vec![0; 144]).build()).expect("parses");
    let err = f.read_tensor("k").expect_err("Q4_K unsupported");
    assert!(
        matches!(&err, GgufError::UnsupportedType { tensor, ggml_type } if tensor == "k" && ggml_type == "Q4_K"),
        "{err}"
    );
}

// ---- llama model view -----------------------------------------------------------------------

fn llama(arch: &str) -> Builder {
    // hidden 4, 2 heads (head_dim 2), 1 kv head, 1 layer, vocab 3.
    let seq = |n: usize| (0..n).map(|x| x as f32).collect::<Vec<_>>();
    Builder::new()
        .str("general.architecture", arch)
        .u32("llama.block_count", 1)
        .u32("llama.embedding_length", 4)
        .u32("llama.feed_forward_length", 8)
        .u32("llama.attention.head_count", 2)
        .u32("llama.attention.head_count_kv", 1)
        .u32("llama.context_length", 128)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .str_array("tokenizer.ggml.tokens", &["a", "b", "c"])
        .u32("tokenizer.ggml.eos_token_id", 2)
        .tensor_f32("token_embd.weight", &[4, 3], &seq(12))
        .tensor_f32("output_norm.weight", &[4], &seq(4))
        .tensor_f32("blk.0.attn_norm.weight", &[4], &seq(4))
        .tensor_f32("blk.0.ffn_norm.weight", &[4], &seq(4))
        .tensor_f32("blk.0.attn_q.weight", &[4, 4], &seq(16))
        .tensor_f32("blk.0.attn_k.weight", &[4, 2], &seq(8))
        .tensor_f32("blk.0.attn_v.weight", &[4, 2], &seq(8))
        .tensor_f32("blk.0.attn_output.weight", &[4, 4], &seq(16))
        .tensor_f32("blk.0.ffn_gate.weight", &[4, 8], &seq(32))
        .tensor_f32("blk.0.ffn_up.weight", &[4, 8], &seq(32))
        .tensor_f32("blk.0.ffn_down.weight", &[8, 4], &seq(32))
}

#[test]
fn llama_names_config_and_unpermute() {
    let m = GgufModel::new(parse(llama("llama").build()).expect("valid")).expect("llama");
    let names: Vec<String> = m.names().into_iter().collect();
    assert_eq!(
        names,
        vec![
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
            "model.norm.weight",
        ]
    );
    let emb = m.read("model.embed_tokens.weight").expect("embedding");
    assert_eq!(emb.shape, vec![3, 4]);
    // q: 2 heads of head_dim 2, so each head's pair (rows 2h, 2h+1) is already in order:
    // with head_dim 2 the permutation is the identity.
    let q = m.read("model.layers.0.self_attn.q_proj.weight").expect("q");
    assert_eq!(q.shape, vec![4, 4]);
    assert_eq!(q.data, (0..16).map(|x| x as f32).collect::<Vec<_>>());
    assert!(matches!(
        m.read("lm_head.weight"),
        Err(crate::weights::WeightError::Missing { .. })
    ));

    let cfg = m.hf_config().expect("config");
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["hidden_size"], 4);
    assert_eq!(cfg["num_key_value_heads"], 1);
    assert_eq!(cfg["head_dim"], 2);
    assert_eq!(cfg["vocab_size"], 3);
    assert_eq!(cfg["rope_theta"], 10000.0);
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["eos_token_id"], 2);
    assert!(cfg["rope_scaling"].is_null());
}

/// Found by the `gguf` fuzz target: empty tensors' other dims are not bounded by the file's
/// size, and reads loop over them: an empty q projection with `head_count` 2^32 - 1 looped over
/// the heads for minutes, and empty q/k or quantized tensors with 2^32 declared rows looped and
/// allocated per row (past 2 GiB). No weight is empty: the model refuses them at open.
#[test]
fn empty_tensors_are_refused_at_open() {
    let llama = |heads: u32| {
        Builder::new()
            .str("general.architecture", "llama")
            .u32("llama.block_count", 1)
            .u32("llama.attention.head_count", heads)
    };
    let cases = [
        llama(u32::MAX).tensor_f32("blk.0.attn_q.weight", &[4, 0], &[]),
        llama(2).tensor_f32("blk.0.attn_k.weight", &[0, 1 << 32], &[]),
        llama(2).tensor_raw("blk.0.ffn_up.weight", &[0, 1 << 32], 8, Vec::new()),
    ];
    for b in cases {
        let err = GgufModel::new(parse(b.build()).expect("a valid file")).expect_err("empty tensor");
        assert!(matches!(err, GgufError::TensorShape { .. }), "{err}");
    }
}

#[test]
fn llama_rejects_unknown_and_foreign() {
    let err = GgufModel::new(parse(llama("gpt2").build()).expect("valid")).expect_err("gpt2");
    assert!(matches!(err, GgufError::UnsupportedArchitecture(a) if a == "gpt2"));
    let b = llama("llama").tensor_f32("blk.0.mystery.weight", &[1], &[0.0]);
    let err = GgufModel::new(parse(b.build()).expect("valid")).expect_err("unknown tensor");
    assert!(matches!(err, GgufError::UnknownTensorName(n) if n == "blk.0.mystery.weight"));
    let b = llama("llama").tensor_f32("blk.1.attn_q.weight", &[4, 4], &[0.0; 16]);
    assert!(matches!(
        GgufModel::new(parse(b.build()).expect("valid")),
        Err(GgufError::UnknownTensorName(_))
    ));
}

#[test]
fn mixtral_experts_split_and_linear_rope() {
    // Replace the dense FFN with 2 experts: gate_exps ggml dims [4, 8, 2].
    let mut b = llama("llama")
        .u32("llama.expert_count", 2)
        .u32("llama.expert_used_count", 1)
        .str("llama.rope.scaling.type", "linear")
        .f32("llama.rope.scaling.factor", 2.0);
    b.tensors.retain(|t| !t.0.contains("ffn_") || t.0.contains("ffn_norm"));
    let seq = |n: usize| (0..n).map(|x| x as f32).collect::<Vec<_>>();
    let b = b
        .tensor_f32("blk.0.ffn_gate_inp.weight", &[4, 2], &seq(8))
        .tensor_f32("blk.0.ffn_gate_exps.weight", &[4, 8, 2], &seq(64))
        .tensor_f32("blk.0.ffn_up_exps.weight", &[4, 8, 2], &seq(64))
        .tensor_f32("blk.0.ffn_down_exps.weight", &[8, 4, 2], &seq(64));
    let m = GgufModel::new(parse(b.build()).expect("valid")).expect("mixtral");
    let names = m.names();
    assert!(names.contains("model.layers.0.block_sparse_moe.gate.weight"));
    for e in 0..2 {
        for w in ["w1", "w2", "w3"] {
            assert!(names.contains(&format!("model.layers.0.block_sparse_moe.experts.{e}.{w}.weight")));
        }
    }
    let w1 = m
        .read("model.layers.0.block_sparse_moe.experts.1.w1.weight")
        .expect("expert 1");
    assert_eq!(w1.shape, vec![8, 4]);
    assert_eq!(w1.data, (32..64).map(|x| x as f32).collect::<Vec<_>>());
    let w2 = m
        .read("model.layers.0.block_sparse_moe.experts.0.w2.weight")
        .expect("expert 0");
    assert_eq!(w2.shape, vec![4, 8]);
    let cfg = m.hf_config().expect("config");
    assert_eq!(cfg["architectures"][0], "MixtralForCausalLM");
    assert_eq!(cfg["num_local_experts"], 2);
    assert_eq!(cfg["num_experts_per_tok"], 1);
    assert_eq!(cfg["rope_scaling"]["type"], "linear");
    assert_eq!(cfg["rope_scaling"]["factor"], 2.0);
}

#[test]
fn llama_unpermutes_q_and_k() {
    // 1 head of head_dim 4, one column: stored rows [0, 2, 1, 3] become [0, 1, 2, 3].
    let b = Builder::new()
        .str("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.attention.head_count", 1)
        .tensor_f32("blk.0.attn_q.weight", &[1, 4], &[0.0, 2.0, 1.0, 3.0])
        .tensor_f32("blk.0.attn_k.bias", &[4], &[0.0, 2.0, 1.0, 3.0]);
    let m = GgufModel::new(parse(b.build()).expect("valid")).expect("model");
    let q = m.read("model.layers.0.self_attn.q_proj.weight").expect("q");
    assert_eq!((q.shape, q.data), (vec![4, 1], vec![0.0, 1.0, 2.0, 3.0]));
    let k = m.read("model.layers.0.self_attn.k_proj.bias").expect("k bias");
    assert_eq!((k.shape, k.data), (vec![4], vec![0.0, 1.0, 2.0, 3.0]));
}
