//! `vmatrace convert`: a recording from one format to the other (NDJSON or binary, plain or
//! zstd), record for record, streamed. Each record is checked as replay reads it, so what
//! comes out is a recording replay accepts line for line.

use std::io::{BufRead, Write};

use crate::{
    output::records::{Encoding, Format},
    recording::Records,
    replay::{self, ReplayError},
};

/// Writes the records of the recording read from `input` (see [`replay::open`]; `name` in
/// errors) to `out` as `format`; the number of records.
pub fn convert(
    input: impl BufRead,
    name: &str,
    out: &mut dyn Write,
    format: Format,
) -> Result<u64, ReplayError> {
    let name = name.to_string();
    let mut records = Records::new(input).map_err(|source| ReplayError::Open {
        path: name.clone(),
        source,
    })?;
    let bad = |records: &Records, what: String| ReplayError::Bad {
        path: name.clone(),
        at: records.position(),
        what,
    };
    let mut encoding = Encoding::new(format);
    let mut buf = Vec::with_capacity(1024);
    let mut n = 0u64;
    loop {
        let v = match records.next_record() {
            Ok(Some(v)) => v,
            Ok(None) => break,
            Err(what) => return Err(bad(&records, what)),
        };
        replay::parse_record(v.clone()).map_err(|what| bad(&records, what))?;
        buf.clear();
        encoding
            .record(&mut buf, &v)
            .and_then(|()| out.write_all(&buf))
            .map_err(ReplayError::Write)?;
        n += 1;
    }
    if n == 0 {
        return Err(ReplayError::Empty { path: name });
    }
    out.flush().map_err(ReplayError::Write)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORDING: &str = concat!(
        r#"{"type":"meta","ts_ns":1,"version":2,"cpus":2,"max_map_count":65530}"#,
        "\n",
        r#"{"type":"snapshot","ts_ns":2,"pid":7,"reason":"seed","exe":null,"vmas":[]}"#,
        "\n",
        r#"{"type":"mmap","ts_ns":10,"pid":7,"tid":7,"args":[0,8192,3,34,18446744073709551615,0],"ret":139637976727552,"path":null}"#,
        "\n\n",
        r#"{"type":"touches","ts_ns":11,"end_ns":12,"pid":7,"tid":7,"address":139637976727552,"pages":2,"offsets_ns":[0,1],"page_kind":"anon","write":true,"error_code":6,"ip":4096,"vma_start":139637976727552,"changed":false,"first_touch":true}"#,
        "\n",
        r#"{"type":"exit","ts_ns":20,"pid":7,"tid":7,"note":"é \u0000 \"quoted\"","n":-5,"f":1.5}"#,
        "\n",
    );

    fn converted(input: &[u8], format: Format) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        convert(input, "t", &mut out, format).map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[test]
    fn ndjson_to_binary_and_back_keeps_every_record() {
        let binary = converted(RECORDING.as_bytes(), Format::Binary).expect("to binary");
        assert!(binary.starts_with(&crate::output::binary::MAGIC));
        assert!(binary.len() < RECORDING.len());
        let back = converted(&binary, Format::Ndjson).expect("back to NDJSON");
        let lines = |text: &[u8]| -> Vec<serde_json::Value> {
            String::from_utf8_lossy(text)
                .lines()
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_str(l).expect("JSON"))
                .collect()
        };
        assert_eq!(lines(&back), lines(RECORDING.as_bytes()));
        // And the two replay alike.
        let replayed = |input: &[u8]| {
            let mut sink = crate::output::records::RecordSink::new(
                Vec::new(),
                crate::output::FaultFilter::All,
            );
            replay::replay_from(input, "t", &mut sink, true).expect("replays");
            // Without the meta line: it has the time of the replay.
            let text = String::from_utf8_lossy(sink.get_mut()).into_owned();
            text.split_once('\n')
                .map(|(_, rest)| rest.to_string())
                .unwrap_or_default()
        };
        let (a, b) = (replayed(RECORDING.as_bytes()), replayed(&binary));
        assert!(a.contains("\"type\":\"fault\""), "{a}");
        assert_eq!(a, b);
    }

    #[test]
    fn what_replay_refuses_convert_refuses_naming_the_record() {
        let bad = format!("{RECORDING}{{\"type\":\"mmap\",\"ts_ns\":30}}\n");
        let err = converted(bad.as_bytes(), Format::Binary).expect_err("refused");
        assert!(err.starts_with("t:7: "), "{err}");
        let binary = converted(RECORDING.as_bytes(), Format::Binary).expect("to binary");
        let err = converted(&binary[..binary.len() - 2], Format::Ndjson).expect_err("cut");
        assert_eq!(err, "t: record 5: the recording ends inside a record");
        let err = converted(b"", Format::Ndjson).expect_err("empty");
        assert!(err.contains("empty"), "{err}");
    }
}
