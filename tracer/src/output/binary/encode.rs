//! Writing the binary format: a serde serializer that defines each object's keys once.

use std::{collections::HashMap, fmt, io};

use serde::{
    Serialize,
    ser::{self, SerializeMap, SerializeSeq, SerializeStruct},
};

use super::{
    FORMAT_VERSION, MAGIC, MAX_DEPTH, MAX_RECORD_COST, MAX_SHAPES, RENEW_SHAPE_COST_AT,
    RENEW_SHAPES_AT, VALUE_COST, tag,
};

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

pub(super) fn varint(out: &mut Vec<u8>, mut v: u64) {
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
