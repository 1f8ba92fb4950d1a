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

use std::{
    collections::HashMap,
    fmt,
    io::{self, BufRead},
};

use serde::{
    Serialize,
    ser::{self, SerializeMap, SerializeSeq, SerializeStruct},
};
use serde_json::{Map, Number, Value};

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
mod tag {
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
const MAX_SHAPES: usize = 1 << 16;

/// The most a record may cost to read, and the shapes of a stream in all (see
/// [`Decoder`]): what an NDJSON line may hold.
pub const MAX_RECORD_COST: usize = 64 << 20;

/// Once a stream has this many shapes, or shapes costing this much, the next record starts a
/// new stream.
const RENEW_SHAPES_AT: usize = 1 << 15;
const RENEW_SHAPE_COST_AT: usize = MAX_RECORD_COST / 4;

/// Each value costs at least this much to read (as short as a value can be in NDJSON, `0,`),
/// so a record of tiny values cannot build more `Value`s than an NDJSON line of the same
/// budget could.
const VALUE_COST: usize = 2;

/// How deep values may nest (serde_json's own limit when it reads NDJSON).
const MAX_DEPTH: usize = 128;

/// Why a value cannot be written.
#[derive(Debug)]
pub struct EncodeError(String);

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EncodeError {}

impl ser::Error for EncodeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

impl From<EncodeError> for io::Error {
    fn from(e: EncodeError) -> Self {
        io::Error::other(e)
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Writes records as one binary stream.
#[derive(Default)]
pub struct Encoder {
    /// Each defined shape's keys (as written in its definition) and its number.
    shapes: HashMap<Box<[u8]>, u16>,
    /// The keys of the objects being written, innermost last, as a shape defines them.
    keys: Vec<u8>,
    /// The shape definitions the record being written needs.
    defs: Vec<u8>,
    /// The record being written.
    val: Vec<u8>,
    /// What the record being written costs to read (as the decoder counts it).
    cost: usize,
    /// What the stream's shapes cost to read.
    shape_cost: usize,
    /// Whether the stream has its header.
    started: bool,
}

impl Encoder {
    /// An encoder whose first record starts a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next record start a new stream (a new file): the header again, and every
    /// shape defined again.
    pub fn restart(&mut self) {
        self.started = false;
        self.shapes.clear();
        self.shape_cost = 0;
    }

    /// Appends `record` to `out` (with the stream's header first, and the shapes it needs).
    pub fn record<T: Serialize + ?Sized>(
        &mut self,
        out: &mut Vec<u8>,
        record: &T,
    ) -> Result<(), EncodeError> {
        if self.shapes.len() >= RENEW_SHAPES_AT || self.shape_cost >= RENEW_SHAPE_COST_AT {
            self.restart();
        }
        if !self.started {
            out.extend_from_slice(&MAGIC);
            varint(out, FORMAT_VERSION);
            self.started = true;
        }
        self.keys.clear();
        self.defs.clear();
        self.val.clear();
        self.cost = 0;
        let mut done = record.serialize(&mut Writer {
            enc: self,
            depth: 0,
        });
        if done.is_ok() && self.cost > MAX_RECORD_COST {
            // Its reader would refuse it.
            done = Err(EncodeError(format!(
                "a record larger than {} MiB",
                MAX_RECORD_COST >> 20
            )));
        }
        if let Err(e) = done {
            // Shapes defined for a record that is not written are not in the stream: the
            // next record starts a new one.
            self.restart();
            return Err(e);
        }
        out.extend_from_slice(&self.defs);
        out.extend_from_slice(&self.val);
        Ok(())
    }

    /// The number of the shape whose keys are `self.keys[from..]` (`count` of them), defined
    /// now if it is new.
    fn shape(&mut self, from: usize, count: u64) -> Result<u16, EncodeError> {
        let keys = &self.keys[from..];
        if let Some(&id) = self.shapes.get(keys) {
            return Ok(id);
        }
        if self.shapes.len() >= MAX_SHAPES {
            return Err(EncodeError(format!(
                "a record with objects of more than {MAX_SHAPES} different sets of keys"
            )));
        }
        let id = self.shapes.len() as u16;
        self.defs.push(tag::SHAPE);
        varint(&mut self.defs, count);
        self.defs.extend_from_slice(keys);
        self.shape_cost += keys.len() + count as usize * VALUE_COST;
        self.shapes.insert(keys.into(), id);
        Ok(id)
    }

    /// Starts a value: its tag, and what it costs to read.
    fn tag(&mut self, t: u8) {
        self.cost += VALUE_COST;
        self.val.push(t);
    }

    fn key(&mut self, key: &str) {
        varint(&mut self.keys, key.len() as u64);
        self.keys.extend_from_slice(key.as_bytes());
    }

    fn str(&mut self, s: &str) {
        self.cost += s.len();
        self.tag(tag::STR);
        varint(&mut self.val, s.len() as u64);
        self.val.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, v: i128) -> Result<(), EncodeError> {
        if v >= 0 {
            let v = u64::try_from(v).map_err(|_| EncodeError(format!("{v} is too large")))?;
            self.tag(tag::UINT);
            varint(&mut self.val, v);
        } else {
            let v = u64::try_from(-1 - v).map_err(|_| EncodeError(format!("{v} is too small")))?;
            self.tag(tag::NINT);
            varint(&mut self.val, v);
        }
        Ok(())
    }
}

/// The serializer of one value into an [`Encoder`].
struct Writer<'a> {
    enc: &'a mut Encoder,
    depth: usize,
}

/// An object or array being written.
struct Compound<'a, 'b> {
    w: &'b mut Writer<'a>,
    /// Where the object's keys start in `Encoder::keys`, and how many it has so far.
    keys_from: usize,
    count: u64,
    /// Where the object's shape number goes in `Encoder::val`.
    patch: usize,
    /// A single-key object around the value (enum variants), closed at the end.
    wrapped: Option<Wrap>,
}

/// A variant's `{"name": value}` around a compound value.
struct Wrap {
    keys_from: usize,
    patch: usize,
}

impl<'a> Writer<'a> {
    fn nested(&mut self) -> Result<Writer<'_>, EncodeError> {
        if self.depth >= MAX_DEPTH {
            return Err(EncodeError(format!("values nested over {MAX_DEPTH} deep")));
        }
        Ok(Writer {
            enc: &mut *self.enc,
            depth: self.depth + 1,
        })
    }

    /// Starts an object: its tag and room for its shape number.
    fn open_object(&mut self) -> (usize, usize) {
        self.enc.tag(tag::OBJECT);
        let patch = self.enc.val.len();
        self.enc.val.extend_from_slice(&[0, 0]);
        (self.enc.keys.len(), patch)
    }

    fn close_object(
        &mut self,
        keys_from: usize,
        count: u64,
        patch: usize,
    ) -> Result<(), EncodeError> {
        // Reading an object copies its keys.
        self.enc.cost += self.enc.keys.len() - keys_from;
        let id = self.enc.shape(keys_from, count)?;
        self.enc.val[patch..patch + 2].copy_from_slice(&id.to_le_bytes());
        self.enc.keys.truncate(keys_from);
        Ok(())
    }

    /// Starts `{"variant": ...}`.
    fn open_variant(&mut self, variant: &str) -> Wrap {
        let (keys_from, patch) = self.open_object();
        self.enc.key(variant);
        Wrap { keys_from, patch }
    }

    fn compound(&mut self, object: bool, wrapped: Option<Wrap>) -> Compound<'a, '_> {
        let (keys_from, patch) = if object {
            self.open_object()
        } else {
            self.enc.tag(tag::ARRAY);
            (self.enc.keys.len(), 0)
        };
        Compound {
            w: self,
            keys_from,
            count: 0,
            patch,
            wrapped,
        }
    }
}

impl<'a, 'b> Compound<'a, 'b> {
    fn value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), EncodeError> {
        v.serialize(&mut self.w.nested()?)
    }

    fn field<T: Serialize + ?Sized>(&mut self, key: &str, v: &T) -> Result<(), EncodeError> {
        self.w.enc.key(key);
        self.count += 1;
        self.value(v)
    }

    fn end_object(self) -> Result<(), EncodeError> {
        self.w
            .close_object(self.keys_from, self.count, self.patch)?;
        if let Some(w) = self.wrapped {
            self.w.close_object(w.keys_from, 1, w.patch)?;
        }
        Ok(())
    }

    fn end_array(self) -> Result<(), EncodeError> {
        self.w.enc.val.push(tag::END);
        if let Some(w) = self.wrapped {
            self.w.close_object(w.keys_from, 1, w.patch)?;
        }
        Ok(())
    }
}

impl<'a, 'b> ser::Serializer for &'b mut Writer<'a> {
    type Ok = ();
    type Error = EncodeError;
    type SerializeSeq = Compound<'a, 'b>;
    type SerializeTuple = Compound<'a, 'b>;
    type SerializeTupleStruct = Compound<'a, 'b>;
    type SerializeTupleVariant = Compound<'a, 'b>;
    type SerializeMap = Compound<'a, 'b>;
    type SerializeStruct = Compound<'a, 'b>;
    type SerializeStructVariant = Compound<'a, 'b>;

    fn serialize_bool(self, v: bool) -> Result<(), EncodeError> {
        self.enc.tag(if v { tag::TRUE } else { tag::FALSE });
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), EncodeError> {
        self.enc.int(v.into())
    }
    fn serialize_i16(self, v: i16) -> Result<(), EncodeError> {
        self.enc.int(v.into())
    }
    fn serialize_i32(self, v: i32) -> Result<(), EncodeError> {
        self.enc.int(v.into())
    }
    fn serialize_i64(self, v: i64) -> Result<(), EncodeError> {
        self.enc.int(v.into())
    }
    fn serialize_i128(self, v: i128) -> Result<(), EncodeError> {
        self.enc.int(v)
    }
    fn serialize_u8(self, v: u8) -> Result<(), EncodeError> {
        self.enc.int(v.into())
    }
    fn serialize_u16(self, v: u16) -> Result<(), EncodeError> {
        self.enc.int(v.into())
    }
    fn serialize_u32(self, v: u32) -> Result<(), EncodeError> {
        self.enc.int(v.into())
    }
    fn serialize_u64(self, v: u64) -> Result<(), EncodeError> {
        self.enc.tag(tag::UINT);
        varint(&mut self.enc.val, v);
        Ok(())
    }
    fn serialize_u128(self, v: u128) -> Result<(), EncodeError> {
        let v = u64::try_from(v).map_err(|_| EncodeError(format!("{v} is too large")))?;
        self.serialize_u64(v)
    }
    fn serialize_f32(self, v: f32) -> Result<(), EncodeError> {
        self.serialize_f64(v.into())
    }
    fn serialize_f64(self, v: f64) -> Result<(), EncodeError> {
        // As serde_json writes them: a number that is not finite is null.
        if v.is_finite() {
            self.enc.tag(tag::FLOAT);
            self.enc.val.extend_from_slice(&v.to_le_bytes());
        } else {
            self.enc.tag(tag::NULL);
        }
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<(), EncodeError> {
        self.enc.str(v.encode_utf8(&mut [0; 4]));
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<(), EncodeError> {
        self.enc.str(v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), EncodeError> {
        // As serde_json writes them: an array of numbers.
        let mut seq = self.serialize_seq(Some(v.len()))?;
        for b in v {
            seq.serialize_element(b)?;
        }
        SerializeSeq::end(seq)
    }
    fn serialize_none(self) -> Result<(), EncodeError> {
        self.enc.tag(tag::NULL);
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<(), EncodeError> {
        v.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), EncodeError> {
        self.serialize_none()
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), EncodeError> {
        self.serialize_none()
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), EncodeError> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        v: &T,
    ) -> Result<(), EncodeError> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<(), EncodeError> {
        let mut c = self.compound(true, None);
        c.field(variant, v)?;
        c.end_object()
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Compound<'a, 'b>, EncodeError> {
        Ok(self.compound(false, None))
    }
    fn serialize_tuple(self, _len: usize) -> Result<Compound<'a, 'b>, EncodeError> {
        Ok(self.compound(false, None))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Compound<'a, 'b>, EncodeError> {
        Ok(self.compound(false, None))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a, 'b>, EncodeError> {
        let wrap = self.open_variant(variant);
        Ok(self.compound(false, Some(wrap)))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Compound<'a, 'b>, EncodeError> {
        Ok(self.compound(true, None))
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Compound<'a, 'b>, EncodeError> {
        Ok(self.compound(true, None))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a, 'b>, EncodeError> {
        let wrap = self.open_variant(variant);
        Ok(self.compound(true, Some(wrap)))
    }
}

/// The serde traits of arrays (sequences, tuples): each element a value, an end marker.
macro_rules! array_like {
    ($($trait:path: $method:ident),*) => {
        $(impl $trait for Compound<'_, '_> {
            type Ok = ();
            type Error = EncodeError;
            fn $method<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), EncodeError> {
                self.value(v)
            }
            fn end(self) -> Result<(), EncodeError> {
                self.end_array()
            }
        })*
    };
}

array_like!(
    SerializeSeq: serialize_element,
    ser::SerializeTuple: serialize_element,
    ser::SerializeTupleStruct: serialize_field,
    ser::SerializeTupleVariant: serialize_field
);

impl SerializeMap for Compound<'_, '_> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), EncodeError> {
        let key = key.serialize(KeyName)?;
        self.w.enc.key(&key);
        self.count += 1;
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), EncodeError> {
        self.value(v)
    }
    fn end(self) -> Result<(), EncodeError> {
        self.end_object()
    }
}

impl SerializeStruct for Compound<'_, '_> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), EncodeError> {
        self.field(key, v)
    }
    fn end(self) -> Result<(), EncodeError> {
        self.end_object()
    }
}

impl ser::SerializeStructVariant for Compound<'_, '_> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), EncodeError> {
        self.field(key, v)
    }
    fn end(self) -> Result<(), EncodeError> {
        self.end_object()
    }
}

/// A map key as text, as serde_json accepts them: strings, and numbers written as text.
struct KeyName;

/// `KeyName`'s methods for values written as their text.
macro_rules! as_text {
    ($($method:ident: $ty:ty),*) => {
        $(fn $method(self, v: $ty) -> Result<String, EncodeError> {
            Ok(v.to_string())
        })*
    };
}

/// `KeyName`'s methods for values that cannot be keys.
macro_rules! not_a_key {
    ($($method:ident: $ty:ty),*) => {
        $(fn $method(self, _v: $ty) -> Result<String, EncodeError> {
            Err(not_a_key())
        })*
    };
}

impl ser::Serializer for KeyName {
    type Ok = String;
    type Error = EncodeError;
    type SerializeSeq = ser::Impossible<String, EncodeError>;
    type SerializeTuple = ser::Impossible<String, EncodeError>;
    type SerializeTupleStruct = ser::Impossible<String, EncodeError>;
    type SerializeTupleVariant = ser::Impossible<String, EncodeError>;
    type SerializeMap = ser::Impossible<String, EncodeError>;
    type SerializeStruct = ser::Impossible<String, EncodeError>;
    type SerializeStructVariant = ser::Impossible<String, EncodeError>;

    as_text!(
        serialize_str: &str,
        serialize_char: char,
        serialize_bool: bool,
        serialize_i8: i8,
        serialize_i16: i16,
        serialize_i32: i32,
        serialize_i64: i64,
        serialize_u8: u8,
        serialize_u16: u16,
        serialize_u32: u32,
        serialize_u64: u64
    );
    not_a_key!(serialize_f32: f32, serialize_f64: f64, serialize_bytes: &[u8]);
    fn serialize_none(self) -> Result<String, EncodeError> {
        Err(not_a_key())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<String, EncodeError> {
        v.serialize(self)
    }
    fn serialize_unit(self) -> Result<String, EncodeError> {
        Err(not_a_key())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<String, EncodeError> {
        Err(not_a_key())
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<String, EncodeError> {
        Ok(variant.to_string())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        v: &T,
    ) -> Result<String, EncodeError> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _v: &T,
    ) -> Result<String, EncodeError> {
        Err(not_a_key())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, EncodeError> {
        Err(not_a_key())
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, EncodeError> {
        Err(not_a_key())
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, EncodeError> {
        Err(not_a_key())
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, EncodeError> {
        Err(not_a_key())
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, EncodeError> {
        Err(not_a_key())
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, EncodeError> {
        Err(not_a_key())
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, EncodeError> {
        Err(not_a_key())
    }
}

fn not_a_key() -> EncodeError {
    EncodeError("a map key that is not a string or a number".into())
}

/// Why a binary stream cannot be read: what is wrong, in a phrase.
pub type DecodeError = String;

/// Reads the records of a binary stream as JSON values, with bounded memory: a record may
/// cost at most `budget` bytes to read, counting each value as at least [`VALUE_COST`] bytes,
/// each string's bytes and, for each object, its keys' bytes (they are copied into it), so
/// that a record builds no more than an NDJSON line of the same length would; the shapes of
/// a stream may cost the same again.
pub struct Decoder<R> {
    input: R,
    shapes: Vec<Box<[String]>>,
    /// Each shape's keys' bytes, taken from the budget for each object of the shape.
    key_bytes: Vec<usize>,
    shape_bytes: usize,
    budget: usize,
    /// What the record being read may still take.
    left: usize,
}

impl<R: BufRead> Decoder<R> {
    /// A decoder of `input`, which starts with [`MAGIC`].
    pub fn new(input: R, budget: usize) -> Self {
        Self {
            input,
            shapes: Vec::new(),
            key_bytes: Vec::new(),
            shape_bytes: 0,
            budget,
            left: budget,
        }
    }

    /// The next record, or None at the end of the input. A stream may be followed by another
    /// (a restarted encoder, concatenated files): its header starts a new shape table.
    pub fn next_record(&mut self) -> Result<Option<Value>, DecodeError> {
        loop {
            let Some(t) = self.peek()? else {
                return Ok(None);
            };
            self.left = self.budget;
            match t {
                0x89 => self.header()?,
                tag::SHAPE => {
                    self.input.consume(1);
                    self.define()?;
                }
                _ => return self.value(0).map(Some),
            }
        }
    }

    fn peek(&mut self) -> Result<Option<u8>, DecodeError> {
        let buf = self
            .input
            .fill_buf()
            .map_err(|e| format!("cannot read: {e}"))?;
        Ok(buf.first().copied())
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = self.peek()?.ok_or("the recording ends inside a record")?;
        self.input.consume(1);
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<(), DecodeError> {
        self.left = self.left.checked_sub(n).ok_or_else(|| {
            format!(
                "a record larger than {} MiB: not a recording",
                self.budget >> 20
            )
        })?;
        Ok(())
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                break;
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a number longer than 64 bits".into())
    }

    fn header(&mut self) -> Result<(), DecodeError> {
        let mut magic = [0u8; MAGIC.len()];
        for m in &mut magic {
            *m = self.byte().map_err(|_| "a truncated header".to_string())?;
        }
        if magic != MAGIC {
            return Err("not a vmatrace binary recording (bad header)".into());
        }
        let version = self.varint()?;
        if version != FORMAT_VERSION {
            return Err(format!(
                "binary format version {version}; this vmatrace reads version {FORMAT_VERSION}"
            ));
        }
        self.shapes.clear();
        self.key_bytes.clear();
        self.shape_bytes = 0;
        Ok(())
    }

    fn text(&mut self) -> Result<String, DecodeError> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| "a string too long".to_string())?;
        self.take(len)?;
        let mut bytes = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let buf = self
                .input
                .fill_buf()
                .map_err(|e| format!("cannot read: {e}"))?;
            if buf.is_empty() {
                return Err("the recording ends inside a record".into());
            }
            let n = buf.len().min(len - got);
            bytes[got..got + n].copy_from_slice(&buf[..n]);
            self.input.consume(n);
            got += n;
        }
        String::from_utf8(bytes).map_err(|_| "a string that is not UTF-8".to_string())
    }

    fn define(&mut self) -> Result<(), DecodeError> {
        if self.shapes.len() >= MAX_SHAPES {
            return Err(format!("more than {MAX_SHAPES} shapes in one stream"));
        }
        let count = self.varint()?;
        let count = usize::try_from(count).map_err(|_| "a shape too large".to_string())?;
        let mut keys = Vec::new();
        for _ in 0..count {
            self.take(VALUE_COST)?;
            keys.push(self.text()?);
        }
        // Shapes stay for the whole stream: their total is bounded like one record.
        self.shape_bytes += self.budget - self.left;
        if self.shape_bytes > self.budget {
            return Err(format!(
                "shapes larger than {} MiB in all: not a recording",
                self.budget >> 20
            ));
        }
        self.key_bytes.push(keys.iter().map(String::len).sum());
        self.shapes.push(keys.into_boxed_slice());
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(format!("values nested over {MAX_DEPTH} deep"));
        }
        self.take(VALUE_COST)?;
        Ok(match self.byte()? {
            tag::NULL => Value::Null,
            tag::FALSE => Value::Bool(false),
            tag::TRUE => Value::Bool(true),
            tag::UINT => Value::Number(self.varint()?.into()),
            tag::NINT => {
                let n = self.varint()?;
                let n = i64::try_from(n)
                    .map(|n| -1 - n)
                    .map_err(|_| "a negative number below i64".to_string())?;
                Value::Number(n.into())
            }
            tag::FLOAT => {
                let mut b = [0u8; 8];
                for x in &mut b {
                    *x = self.byte()?;
                }
                Number::from_f64(f64::from_le_bytes(b)).map_or(Value::Null, Value::Number)
            }
            tag::STR => Value::String(self.text()?),
            tag::ARRAY => {
                let mut items = Vec::new();
                loop {
                    if self.peek()? == Some(tag::END) {
                        self.input.consume(1);
                        break;
                    }
                    items.push(self.value(depth + 1)?);
                }
                Value::Array(items)
            }
            tag::OBJECT => {
                let id = u16::from_le_bytes([self.byte()?, self.byte()?]);
                let n = self
                    .shapes
                    .get(usize::from(id))
                    .map(|keys| keys.len())
                    .ok_or_else(|| format!("an object of shape {id}, which is not defined"))?;
                // The keys are copied into the object.
                self.take(self.key_bytes[usize::from(id)])?;
                let mut map = Map::new();
                for i in 0..n {
                    let v = self.value(depth + 1)?;
                    let key = self.shapes[usize::from(id)][i].clone();
                    map.insert(key, v);
                }
                Value::Object(map)
            }
            other => return Err(format!("a value of unknown type {other}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
