//! The records of one corpus file, read a line at a time: fortunes, JSONL lines, and the UTF-8
//! check that comes before them; plus the whole-text splitting they must agree with.

use std::io::BufRead;

use super::parquet_text::ParquetRecords;
use super::redacted_io_error;
use crate::error::{Error, Result};

/// Reads `reader` to its end, failing as `std::str::from_utf8` would on the whole file (the
/// same message, with the index counted from the start of the file).
pub(super) fn check_utf8(mut reader: Box<dyn BufRead + Send>) -> Result<(), FileError> {
    let mut offset = 0usize;
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let buf = reader.fill_buf().map_err(|e| FileError::Unreadable(redacted_io_error(&e)))?;
        if buf.is_empty() {
            break;
        }
        let n = buf.len();
        carry.extend_from_slice(buf);
        reader.consume(n);
        match std::str::from_utf8(&carry) {
            Ok(_) => {
                offset += carry.len();
                carry.clear();
            }
            Err(e) if e.error_len().is_none() => {
                // A character cut by the buffer's end: keep its first bytes for the next read.
                let valid = e.valid_up_to();
                offset += valid;
                carry.drain(..valid);
            }
            Err(e) => {
                let len = e.error_len().unwrap_or(0);
                return Err(FileError::Unreadable(format!(
                    "not UTF-8 (invalid utf-8 sequence of {len} bytes from index {})",
                    offset + e.valid_up_to()
                )));
            }
        }
    }
    if !carry.is_empty() {
        return Err(FileError::Unreadable(format!("not UTF-8 (incomplete utf-8 byte sequence from index {offset})")));
    }
    Ok(())
}

/// The records of one file, produced as they are read.
pub(super) enum FileRecords {
    Collected(std::vec::IntoIter<(u32, String)>),
    Fortunes(FortuneRecords),
    Jsonl(JsonlRecords),
    Parquet(Box<ParquetRecords>),
    TextPieces(TextPieces),
}

impl Iterator for FileRecords {
    type Item = Result<(u32, String), FileError>;

    /// The next non-blank record.
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let record = match self {
                FileRecords::Collected(records) => records.next().map(Ok),
                FileRecords::Fortunes(records) => records.next(),
                FileRecords::Jsonl(records) => records.next(),
                FileRecords::Parquet(records) => records.next(),
                FileRecords::TextPieces(records) => records.next(),
            }?;
            match record {
                Ok((_, text)) if text.trim().is_empty() => continue,
                other => return Some(other),
            }
        }
    }
}

/// One line of `lines` (with its `\n`, if any) appended to `line`; false at the end of the file.
fn read_line(lines: &mut dyn BufRead, line: &mut String) -> Result<bool, FileError> {
    line.clear();
    let n = lines.read_line(line).map_err(|e| FileError::Unreadable(redacted_io_error(&e)))?;
    Ok(n > 0)
}

/// [`split_fortunes`], a line at a time: every record, blank ones included (the caller drops
/// them), each trimmed as `split_fortunes` trims it.
pub(super) struct FortuneRecords {
    pub(super) lines: Box<dyn BufRead + Send>,
    pub(super) next_record: u32,
    pub(super) done: bool,
}

impl FortuneRecords {
    fn next(&mut self) -> Option<Result<(u32, String), FileError>> {
        let ends_record = |line: &str, record: &mut String| {
            let separator = line.trim_end_matches(['\n', '\r']) == "%";
            if !separator {
                record.push_str(line);
            }
            separator
        };
        let record = numbered_record(&mut *self.lines, &mut self.done, &mut self.next_record, ends_record)?;
        Some(record.map(|(index, r)| (index, r.trim_start_matches(['\n', '\r']).trim_end().to_string())))
    }
}

/// The next record of `lines` as [`read_record`] cuts it, with its index (`next_record`, then
/// counted on); `None` once `done`.
fn numbered_record(
    lines: &mut dyn BufRead,
    done: &mut bool,
    next_record: &mut u32,
    take: impl FnMut(&str, &mut String) -> bool,
) -> Option<Result<(u32, String), FileError>> {
    if *done {
        return None;
    }
    let record = read_record(lines, done, take);
    let index = *next_record;
    *next_record = next_record.wrapping_add(1);
    Some(record.map(|r| (index, r)))
}

/// Lines of `lines` handed to `take` (which appends what belongs to the record and says whether
/// the record ends there) until it ends or the file does; `done` is set at the file's end or an
/// error.
fn read_record(
    lines: &mut dyn BufRead,
    done: &mut bool,
    mut take: impl FnMut(&str, &mut String) -> bool,
) -> Result<String, FileError> {
    let mut record = String::new();
    let mut line = String::new();
    loop {
        match read_line(lines, &mut line) {
            Err(e) => {
                *done = true;
                return Err(e);
            }
            Ok(false) => {
                *done = true;
                return Ok(record);
            }
            Ok(true) if take(&line, &mut record) => return Ok(record),
            Ok(true) => {}
        }
    }
}

/// A `text` file too large to be one document, read a piece at a time: a piece ends at the first
/// blank line (a paragraph break) after it holds `piece_bytes`, or at the first line break after
/// it holds twice that, so memory holds a piece of at most about `2 · piece_bytes`, not the file.
/// The pieces, concatenated, are the file.
pub(super) struct TextPieces {
    pub(super) lines: Box<dyn BufRead + Send>,
    pub(super) piece_bytes: usize,
    pub(super) next_record: u32,
    pub(super) done: bool,
}

impl TextPieces {
    fn next(&mut self) -> Option<Result<(u32, String), FileError>> {
        let piece_bytes = self.piece_bytes;
        let ends_piece = |line: &str, piece: &mut String| {
            piece.push_str(line);
            let paragraph_break = line.trim().is_empty();
            (paragraph_break && piece.len() >= piece_bytes) || piece.len() >= 2 * piece_bytes
        };
        numbered_record(&mut *self.lines, &mut self.done, &mut self.next_record, ends_piece)
    }
}

/// [`jsonl_documents`], a line at a time.
pub(super) struct JsonlRecords {
    pub(super) lines: Box<dyn BufRead + Send>,
    pub(super) next_line: usize,
    pub(super) location: String,
    pub(super) field: String,
}

impl JsonlRecords {
    fn next(&mut self) -> Option<Result<(u32, String), FileError>> {
        let mut line = String::new();
        loop {
            match read_line(&mut *self.lines, &mut line) {
                Err(e) => return Some(Err(e)),
                Ok(false) => return None,
                Ok(true) => {}
            }
            let index = self.next_line;
            self.next_line += 1;
            // As `str::lines`: without its `\n`, and then without one `\r`.
            let text = line.strip_suffix('\n').map_or(line.as_str(), |l| l.strip_suffix('\r').unwrap_or(l));
            match jsonl_record(text, index, &self.location, &self.field) {
                Ok(Some(text)) => return Some(Ok((index as u32, text))),
                Ok(None) => continue,
                Err(e) => return Some(Err(FileError::Bad(e))),
            }
        }
    }
}

/// Why a file gave no documents: unreadable (skipped or an error, by [`CorpusFile::named`]) or
/// malformed (always an error).
pub(super) enum FileError {
    Unreadable(String),
    Bad(Error),
}

/// The fortunes of `text`, as (record index, text): records are separated by lines holding only
/// `%` (a trailing `\r` allowed); each loses its leading blank lines and trailing whitespace, and
/// blank records are dropped (their indexes are kept by the others).
pub fn split_fortunes(text: &str) -> impl Iterator<Item = (u32, &str)> {
    let mut records = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end_matches(['\n', '\r']) == "%" {
            records.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    records.push(&text[start..]);
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| (i as u32, r.trim_start_matches(['\n', '\r']).trim_end()))
        .filter(|(_, r)| !r.is_empty())
}

/// The text field of each JSONL line, as (line index, text). Blank lines and `null` texts give no
/// document; a line that is not a JSON object, lacks the field or holds a non-string is an error.
/// The records of a whole JSONL text: what [`JsonlRecords`] must produce a line at a time.
#[cfg(test)]
pub(super) fn jsonl_documents(text: &str, location: &str, field: &str) -> Result<Vec<(u32, String)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(text) = jsonl_record(line, i, location, field)? {
            out.push((i as u32, text));
        }
    }
    Ok(out)
}

/// The text field of line `index` of a JSONL file: `None` for a blank line or a `null` text.
fn jsonl_record(line: &str, index: usize, location: &str, field: &str) -> Result<Option<String>> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let (location, line_no) = (location.to_string(), index + 1);
    let value: serde_json::Value = match serde_json::from_str(line) {
        Ok(value) => value,
        Err(source) => return Err(Error::NotAJsonLine { location, line: line_no, source }),
    };
    let Some(object) = value.as_object() else {
        return Err(Error::NotAJsonObject { location, line: line_no });
    };
    match object.get(field) {
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Null) => Ok(None),
        Some(other) => {
            Err(Error::TextFieldNotAString { location, line: line_no, field: field.into(), kind: json_kind(other) })
        }
        None => {
            let fields = object.keys().cloned().collect();
            Err(Error::NoTextField { location, line: line_no, field: field.into(), fields })
        }
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufReader;

    use super::*;

    #[test]
    fn fortunes_split_on_percent_lines_only() {
        let text = "first\nline two\n%\n\n%\n  indented\n50% off\n%\r\nlast\n";
        let docs: Vec<_> = split_fortunes(text).collect();
        assert_eq!(docs, vec![(0, "first\nline two"), (2, "  indented\n50% off"), (3, "last")]);
    }

    /// A reader that returns at most 3 bytes at a time, so records and characters straddle reads.
    fn tiny_reads(text: &[u8]) -> Box<dyn BufRead + Send> {
        Box::new(BufReader::with_capacity(3, std::io::Cursor::new(text.to_vec())))
    }

    fn collect(records: FileRecords) -> Vec<(u32, String)> {
        records
            .map(|r| match r {
                Ok(record) => record,
                Err(FileError::Bad(e)) => panic!("{e:#}"),
                Err(FileError::Unreadable(e)) => panic!("{e}"),
            })
            .collect()
    }

    const TRICKY_FORTUNES: &[&str] = &[
        "",
        "%",
        "%\n",
        "one",
        "\n\none\n%\r\r\n\n%\n%%\n two \n\n%\nlast ∂ö 中\n\n",
        "a\r\n%\r\nb\r\n%",
        "  \n%\n  \n",
    ];

    #[test]
    fn streamed_fortunes_equal_the_whole_file_split() {
        for text in TRICKY_FORTUNES {
            let whole: Vec<(u32, String)> =
                split_fortunes(text).map(|(i, r)| (i, r.to_string())).filter(|(_, r)| !r.trim().is_empty()).collect();
            let streamed = collect(FileRecords::Fortunes(FortuneRecords {
                lines: tiny_reads(text.as_bytes()),
                next_record: 0,
                done: false,
            }));
            assert_eq!(streamed, whole, "{text:?}");
        }
    }

    #[test]
    fn streamed_jsonl_equals_the_whole_file_read() {
        let text = "{\"text\": \"a\"}\r\n\n  \n{\"text\": null}\n{\"text\": \"b ∂\", \"x\": 1}\n{\"text\": \" \"}\n{\"text\": \"c\"}\r";
        let whole: Vec<(u32, String)> = jsonl_documents(text, "f.jsonl", "text")
            .unwrap()
            .into_iter()
            .filter(|(_, t)| !t.trim().is_empty())
            .collect();
        let records = JsonlRecords {
            lines: tiny_reads(text.as_bytes()),
            next_line: 0,
            location: "f.jsonl".into(),
            field: "text".into(),
        };
        assert_eq!(collect(FileRecords::Jsonl(records)), whole);
        assert_eq!(whole.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 4, 6]);
    }

    #[test]
    fn utf8_is_checked_across_reads_with_the_whole_file_message() {
        assert!(check_utf8(tiny_reads("ab∂ö中€".as_bytes())).is_ok());
        for bad in [&b"abcd\xffef"[..], b"ab\xe2\x88", b"\xe2\x88xyz", b"abcdefg\xc3"] {
            let expected = format!("not UTF-8 ({})", std::str::from_utf8(bad).unwrap_err());
            match check_utf8(tiny_reads(bad)) {
                Err(FileError::Unreadable(message)) => assert_eq!(message, expected, "{bad:?}"),
                _ => panic!("{bad:?} passed"),
            }
        }
    }

    #[test]
    fn large_text_is_cut_into_pieces_at_paragraph_breaks_that_concatenate_to_the_file() {
        let text = "one two\nthree\n\nfour five six\n\n\nseven\neight nine ten eleven\ntwelve\n\nend";
        let pieces = |piece_bytes| {
            let lines = tiny_reads(text.as_bytes());
            let mut records = TextPieces { lines, piece_bytes, next_record: 0, done: false };
            std::iter::from_fn(|| records.next())
                .map(|r| match r {
                    Ok(record) => record,
                    Err(FileError::Bad(e)) => panic!("{e:#}"),
                    Err(FileError::Unreadable(e)) => panic!("{e}"),
                })
                .collect::<Vec<_>>()
        };
        for piece_bytes in [1, 5, 10, 20, 1000] {
            let got = pieces(piece_bytes);
            assert_eq!(got.iter().map(|(_, p)| p.as_str()).collect::<String>(), text, "{piece_bytes}");
            assert!(got.iter().enumerate().all(|(i, (index, _))| *index == i as u32));
            for (_, piece) in &got[..got.len() - 1] {
                let longest_line = piece.lines().map(|l| l.len() + 1).max().unwrap();
                assert!(piece.len() >= piece_bytes && piece.len() < 2 * piece_bytes + longest_line, "{piece:?}");
                let ends_at_a_blank_line = piece.lines().last().is_some_and(|l| l.trim().is_empty());
                assert!(ends_at_a_blank_line || piece.len() >= 2 * piece_bytes, "{piece:?}");
            }
        }
        assert_eq!(pieces(1000).len(), 1, "a text under the piece size stays one document");
        assert_eq!(pieces(10)[0].1, "one two\nthree\n\n");
    }
}
