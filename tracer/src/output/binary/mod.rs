//! The binary recording format (`record -o FILE.vmat`, `--format binary`): the records of an
//! NDJSON recording, value for value, in about a quarter of the bytes and without formatting
//! numbers as text. Written and read here; `docs/json-schema.md` ("Binary recordings")
//! describes the bytes.
//!
//! A stream is [`MAGIC`], a format version (a varint), then items. An item is a shape
//! definition or a record. A shape is the list of an object's keys, in order; it is defined
//! once, before the first record that uses it, and objects then name it by its number and
//! give only their values. So the format is self-describing (a reader needs no schema, and
//! `vmatrace convert` gives back the NDJSON) and streamable (a record is complete when read).
//! A rotated or restarted stream starts again with the magic, and defines its shapes again.
//!
//! Values are written through serde, so a record type serializes the same way to NDJSON and
//! here, and they are read back as `serde_json::Value`, which is what the replay reader takes
//! from an NDJSON line.

mod decode;
mod encode;

pub use decode::{DecodeError, Decoder};
pub use encode::{EncodeError, Encoder};

/// The first bytes of a binary recording. Like PNG's: a byte with the high bit set (a
/// 7-bit channel breaks it), CR LF and LF (line-end conversion breaks it), and it is neither
/// JSON nor zstd.
pub const MAGIC: [u8; 8] = *b"\x89VMAT\r\n\n";

/// The version of the binary encoding (not of the records: `meta.version` is that).
pub const FORMAT_VERSION: u64 = 1;

/// Whether an output named `path` is written in the binary format by default: its name ends
/// in `.vmat`, or `.vmat.zst` when compressed.
pub fn by_name(path: &std::path::Path) -> bool {
    let name = path.as_os_str().as_encoded_bytes();
    let name = name.strip_suffix(b".zst").unwrap_or(name);
    name.ends_with(b".vmat")
}

/// Item and value tags.
pub(crate) mod tag {
    pub const NULL: u8 = 0;
    pub const FALSE: u8 = 1;
    pub const TRUE: u8 = 2;
    /// An unsigned varint.
    pub const UINT: u8 = 3;
    /// A negative integer n, as the varint of `-1 - n`.
    pub const NINT: u8 = 4;
    /// An `f64`, 8 bytes little-endian.
    pub const FLOAT: u8 = 5;
    /// A varint length, then UTF-8.
    pub const STR: u8 = 6;
    /// Values up to [`END`].
    pub const ARRAY: u8 = 7;
    /// A shape number (2 bytes, little-endian), then one value per key of the shape.
    pub const OBJECT: u8 = 8;
    /// Closes an array.
    pub const END: u8 = 9;
    /// An item that defines the next shape: a varint count of keys, each a varint length and
    /// UTF-8.
    pub const SHAPE: u8 = 16;
}

/// Shapes a stream may define; a writer starts a new table (with [`tag::SHAPE`] numbers
/// from 0 again, after a fresh header) long before this.
pub(crate) const MAX_SHAPES: usize = 1 << 16;

/// The most a record may cost to read, and the shapes of a stream in all (see
/// [`Decoder`]): what an NDJSON line may hold.
pub const MAX_RECORD_COST: usize = 64 << 20;

/// Once a stream has this many shapes, or shapes costing this much, the next record starts a
/// new stream.
pub(crate) const RENEW_SHAPES_AT: usize = 1 << 15;
pub(crate) const RENEW_SHAPE_COST_AT: usize = MAX_RECORD_COST / 4;

/// Each value costs at least this much to read (as short as a value can be in NDJSON, `0,`),
/// so a record of tiny values cannot build more `Value`s than an NDJSON line of the same
/// budget could.
pub(crate) const VALUE_COST: usize = 2;

/// How deep values may nest (serde_json's own limit when it reads NDJSON).
pub(crate) const MAX_DEPTH: usize = 128;

#[cfg(test)]
mod tests {
    use serde::Serialize;
    use serde_json::{Number, Value};

    use super::{encode::varint, *};
    use proptest::prelude::*;
    use serde_json::json;

    fn encode_all(records: &[Value]) -> Vec<u8> {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        for r in records {
            enc.record(&mut out, r).expect("encodes");
        }
        out
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Value>, DecodeError> {
        let mut dec = Decoder::new(bytes, 64 << 20);
        let mut records = Vec::new();
        while let Some(r) = dec.next_record()? {
            records.push(r);
        }
        Ok(records)
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<u64>().prop_map(|n| json!(n)),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-c\u{0}é]{0,3}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Any JSON value is read back as itself, in a stream of many (shapes shared).
        #[test]
        fn values_come_back_as_they_were(records in prop::collection::vec(json_value(), 1..8)) {
            prop_assert_eq!(decode_all(&encode_all(&records)).expect("decodes"), records);
        }

        /// A stream cut anywhere, or with any byte changed, is read or refused, never a panic.
        #[test]
        fn damaged_streams_are_refused_without_panic(
            records in prop::collection::vec(json_value(), 1..4),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let bytes = encode_all(&records);
            let _ = decode_all(&bytes[..cut.index(bytes.len())]);
            let mut changed = bytes.clone();
            let i = flip.index(changed.len());
            changed[i] = byte;
            let _ = decode_all(&changed);
        }
    }

    #[test]
    fn a_struct_and_the_same_value_are_the_same_bytes_and_shapes_are_written_once() {
        #[derive(Serialize)]
        struct R {
            a: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            b: Option<&'static str>,
            c: [i32; 2],
        }
        let as_struct = {
            let mut enc = Encoder::new();
            let mut out = Vec::new();
            for b in [Some("x"), None, Some("y")] {
                enc.record(
                    &mut out,
                    &R {
                        a: 1,
                        b,
                        c: [-1, 2],
                    },
                )
                .expect("encodes");
            }
            out
        };
        let as_values = encode_all(&[
            json!({"a": 1, "b": "x", "c": [-1, 2]}),
            json!({"a": 1, "c": [-1, 2]}),
            json!({"a": 1, "b": "y", "c": [-1, 2]}),
        ]);
        assert_eq!(as_struct, as_values);
        let shapes = as_struct.iter().filter(|&&b| b == tag::SHAPE).count();
        assert_eq!(shapes, 2, "two key sets, each defined once");
    }

    #[test]
    fn a_restarted_stream_reads_on_as_one() {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        enc.record(&mut out, &json!({"k": 1})).expect("encodes");
        enc.restart();
        enc.record(&mut out, &json!({"other": [true]}))
            .expect("encodes");
        enc.record(&mut out, &json!({"k": 2})).expect("encodes");
        assert_eq!(
            decode_all(&out).expect("decodes"),
            [json!({"k": 1}), json!({"other": [true]}), json!({"k": 2})]
        );
    }

    #[test]
    fn hostile_streams_are_refused_with_a_reason() {
        let header = || {
            let mut h = MAGIC.to_vec();
            varint(&mut h, FORMAT_VERSION);
            h
        };
        let with = |body: &[u8]| {
            let mut b = header();
            b.extend_from_slice(body);
            b
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (MAGIC[..5].to_vec(), "truncated header"),
            (b"\x89VMAT\r\n\r\x01".to_vec(), "bad header"),
            (
                {
                    let mut h = MAGIC.to_vec();
                    h.push(9);
                    h
                },
                "version 9",
            ),
            (with(&[tag::OBJECT, 3, 0]), "not defined"),
            (
                with(&[tag::STR, 0xff, 0xff, 0xff, 0xff, 0x0f]),
                "larger than",
            ),
            (
                with(&[
                    tag::UINT,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0x7f,
                ]),
                "64 bits",
            ),
            (with(&[tag::STR, 2, 0xff, 0xfe]), "not UTF-8"),
            (with(&[77]), "unknown type"),
            (with(&[tag::ARRAY; 200]), "nested"),
            (with(&[tag::ARRAY, tag::NULL]), "ends inside"),
        ];
        for (bytes, why) in cases {
            let err = decode_all(&bytes).expect_err(why);
            assert!(err.contains(why), "{why}: {err}");
        }
        // Objects copy their shape's keys: a long key repeated is charged each time.
        let mut bomb = header();
        bomb.extend_from_slice(&[tag::SHAPE, 1]);
        varint(&mut bomb, 1000);
        bomb.extend(std::iter::repeat_n(b'k', 1000));
        bomb.push(tag::ARRAY);
        for _ in 0..100 {
            bomb.extend_from_slice(&[tag::OBJECT, 0, 0, tag::NULL]);
        }
        bomb.push(tag::END);
        let mut dec = Decoder::new(bomb.as_slice(), 20_000);
        let err = dec.next_record().expect_err("keys charged per object");
        assert!(err.contains("larger than"), "{err}");
        let mut dec = Decoder::new(bomb.as_slice(), 200_000);
        assert!(dec.next_record().is_ok(), "within the budget");
        // Endless tiny values stop at the budget instead of filling memory.
        let mut endless = header();
        endless.push(tag::ARRAY);
        endless.resize(endless.len() + 4096, tag::NULL);
        let mut dec = Decoder::new(endless.as_slice(), 1024);
        let err = dec.next_record().expect_err("over budget");
        assert!(err.contains("larger than"), "{err}");
    }

    #[test]
    fn names_tell_the_binary_format() {
        use std::path::Path;
        assert!(by_name(Path::new("trace.vmat")));
        assert!(by_name(Path::new("/tmp/x.vmat.zst")));
        assert!(!by_name(Path::new("trace.ndjson")));
        assert!(!by_name(Path::new("trace.vmat.ndjson")));
        assert!(!by_name(Path::new("vmat")));
    }
}
