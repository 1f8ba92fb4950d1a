//! Reading the binary format back, as JSON values, with bounded memory.

use std::io::BufRead;

use serde_json::{Map, Number, Value};

use super::{FORMAT_VERSION, MAGIC, MAX_DEPTH, MAX_SHAPES, VALUE_COST, tag};

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
