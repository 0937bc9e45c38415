//! Structure-aware JSON: objects built from the keys a type reads, with values at the edges of
//! every numeric range. Byte-level mutation of JSON text rarely turns `64` into
//! `18446744073709551615` and keeps the document valid; this reaches such values at once.

use arbitrary::{Result, Unstructured};
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde_json::{Map, Value, json};

/// The field names `T`'s derived `Deserialize` accepts, read from what it hands the
/// deserializer: so new fields are fuzzed as soon as they exist.
pub fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Fields(&'static [&'static str]);

    #[derive(Debug)]
    struct Stop;

    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("stop")
        }
    }

    impl std::error::Error for Stop {}

    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }

    struct Spy<'a>(&'a mut Fields);

    impl<'de> Deserializer<'de> for Spy<'_> {
        type Error = Stop;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0.0 = fields;
            Err(Stop)
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    let mut fields = Fields(&[]);
    let _ = T::deserialize(Spy(&mut fields));
    fields.0
}

/// Quoted entries of a libFuzzer dictionary: `"\"key\":"` lines give keys, `"\"word\""` lines
/// string values.
pub fn dict_words(dict: &str) -> (Vec<String>, Vec<String>) {
    let (mut keys, mut strings) = (Vec::new(), Vec::new());
    for line in dict.lines() {
        let Some(inner) = line.strip_prefix("\"\\\"").and_then(|l| l.strip_suffix('"')) else {
            continue;
        };
        if let Some(key) = inner.strip_suffix("\\\":") {
            keys.push(key.to_string());
        } else if let Some(word) = inner.strip_suffix("\\\"") {
            strings.push(word.to_string());
        }
    }
    (keys, strings)
}

/// Integers at the edges of the u8..u64 and i64 ranges.
const EDGES: [u64; 14] = [
    0,
    1,
    2,
    3,
    4,
    32,
    u8::MAX as u64,
    u16::MAX as u64,
    u32::MAX as u64,
    1 << 32,
    1 << 53,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
];

const FLOATS: [f64; 11] = [
    0.0,
    -0.0,
    0.5,
    1.0,
    -1.0,
    1e-5,
    1e5,
    1e300,
    -1e300,
    f64::MIN_POSITIVE,
    8.0,
];

fn unsigned(u: &mut Unstructured) -> Result<Value> {
    Ok(match u.int_in_range(0..=3)? {
        0 => json!(*u.choose(&EDGES)?),
        1 => json!(u.choose(&EDGES)?.wrapping_sub(u.int_in_range(1..=3)?)),
        2 => json!(u.int_in_range(0..=4096u64)?),
        _ => json!(u.arbitrary::<u64>()?),
    })
}

/// Which JSON kinds a field accepts, found by trying one of each: a document with a field of
/// the wrong kind fails as a whole, so generating only accepted kinds keeps documents valid.
#[derive(Debug, Clone, Copy, Default)]
struct Kinds {
    unsigned: bool,
    negative: bool,
    float: bool,
    string: bool,
    bool: bool,
    array: bool,
    object: bool,
    null: bool,
}

/// A generator of JSON objects shaped like what `T` deserializes.
#[derive(Debug, Clone)]
pub struct Shape {
    fields: Vec<(String, Kinds)>,
    /// Keys for nested objects (fields holding free-form JSON, like `rope_scaling`).
    keys: Vec<String>,
    strings: Vec<String>,
}

impl Shape {
    /// `T`'s fields and their kinds, plus the keys and strings of a libFuzzer dictionary.
    pub fn of<T: DeserializeOwned>(dict: &str) -> Self {
        let (mut keys, strings) = dict_words(dict);
        let probe = |key: &str, v: Value| {
            let mut m = Map::new();
            m.insert(key.to_string(), v);
            serde_json::from_value::<T>(Value::Object(m)).is_ok()
        };
        let fields: Vec<(String, Kinds)> = struct_fields::<T>()
            .iter()
            .map(|&f| {
                let kinds = Kinds {
                    unsigned: probe(f, json!(7)),
                    negative: probe(f, json!(-7)),
                    float: probe(f, json!(0.5)),
                    string: probe(f, json!("s")),
                    bool: probe(f, json!(true)),
                    array: probe(f, json!([])),
                    object: probe(f, json!({})),
                    null: probe(f, Value::Null),
                };
                (f.to_string(), kinds)
            })
            .collect();
        keys.extend(strings.iter().cloned());
        keys.sort();
        keys.dedup();
        Self { fields, keys, strings }
    }

    /// An object holding some of the fields, each with a value of a kind it accepts.
    pub fn object(&self, u: &mut Unstructured) -> Result<Value> {
        let mut map = Map::new();
        for (name, kinds) in &self.fields {
            if u.ratio(1, 3)? {
                continue;
            }
            let mut options: Vec<u8> = Vec::new();
            for (ok, tag) in [
                (kinds.unsigned, 0),
                (kinds.negative, 1),
                (kinds.float, 2),
                (kinds.string, 3),
                (kinds.bool, 4),
                (kinds.array, 5),
                (kinds.object, 6),
                (kinds.null, 7),
            ] {
                if ok {
                    options.push(tag);
                }
            }
            let Ok(&tag) = u.choose(&options) else {
                continue;
            };
            map.insert(name.clone(), self.value_of(u, tag, 2)?);
        }
        Ok(Value::Object(map))
    }

    fn value_of(&self, u: &mut Unstructured, tag: u8, depth: usize) -> Result<Value> {
        Ok(match tag {
            0 => unsigned(u)?,
            1 => json!(-(u.int_in_range(1..=i64::MAX)?)),
            2 => json!(*u.choose(&FLOATS)?),
            3 if self.strings.is_empty() => json!(""),
            3 => json!(u.choose(&self.strings)?),
            4 => json!(u.arbitrary::<bool>()?),
            5 if depth > 0 => {
                let n = u.int_in_range(0..=3)?;
                let item = *u.choose(&[0u8, 3])?;
                Value::Array((0..n).map(|_| self.value_of(u, item, 0)).collect::<Result<_>>()?)
            }
            6 if depth > 0 => {
                let mut map = Map::new();
                let n = u.int_in_range(0..=6)?;
                for _ in 0..n {
                    let key = u.choose(&self.keys)?.clone();
                    let tag = u.int_in_range(0..=7)?;
                    map.insert(key, self.value_of(u, tag, depth - 1)?);
                }
                Value::Object(map)
            }
            _ => Value::Null,
        })
    }
}
