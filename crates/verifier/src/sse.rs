//! A Server-Sent Events reader: bytes in, events out (the parts of the format keyplane's
//! revocation stream uses: `event`, `id`, `data`, comments). Lines may end in LF, CRLF or CR, as
//! the format allows, and each byte is looked at once however the stream is cut into chunks.

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// `message` when the block named none.
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// What one block of the stream was.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Block {
    Event(SseEvent),
    /// A comment only (a heartbeat).
    Comment,
}

#[derive(Default)]
pub(crate) struct SseReader {
    /// The line being read, not yet ended.
    line: Vec<u8>,
    /// The last chunk ended in CR: an LF opening the next one ends no second line.
    after_cr: bool,
    /// The block being read: its fields so far, whether it has had a line (comments count) or
    /// a field, and its size in bytes.
    block: SseEvent,
    block_started: bool,
    block_has_field: bool,
    block_bytes: usize,
}

/// A block larger than this is not keyplane's: the stream is dropped rather than buffered.
const MAX_BLOCK: usize = 64 * 1024;

impl SseReader {
    /// Adds `bytes` and returns the blocks they complete; `Err` if a block grows too large.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Result<Vec<Block>, ()> {
        let mut blocks = Vec::new();
        let mut rest = bytes;
        if std::mem::take(&mut self.after_cr) {
            rest = rest.strip_prefix(b"\n").unwrap_or(rest);
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&rest[..end]);
            rest = match &rest[end..] {
                [b'\r', b'\n', after @ ..] => after,
                [b'\r'] => {
                    self.after_cr = true;
                    &[]
                }
                [_, after @ ..] => after,
                [] => unreachable!("`end` is the index of a line ending"),
            };
            let line = std::mem::take(&mut self.line);
            self.block_bytes += line.len() + 1;
            if let Some(block) = self.end_line(&line) {
                blocks.push(block);
            }
            if self.block_bytes > MAX_BLOCK {
                return Err(());
            }
        }
        self.line.extend_from_slice(rest);
        if self.block_bytes + self.line.len() > MAX_BLOCK {
            return Err(());
        }
        Ok(blocks)
    }

    /// Takes one complete line; a blank one ends the block, if it had any line.
    fn end_line(&mut self, line: &[u8]) -> Option<Block> {
        if line.is_empty() {
            let started = std::mem::take(&mut self.block_started);
            let has_field = std::mem::take(&mut self.block_has_field);
            let mut event = std::mem::take(&mut self.block);
            self.block_bytes = 0;
            return match (started, has_field) {
                (false, _) => None,
                (true, false) => Some(Block::Comment),
                (true, true) => {
                    if event.event.is_empty() {
                        event.event = "message".into();
                    }
                    // Each data line added its value and a LF; the last LF is not part of it.
                    if event.data.ends_with('\n') {
                        event.data.pop();
                    }
                    Some(Block::Event(event))
                }
            };
        }
        self.block_started = true;
        if line.starts_with(b":") {
            return None;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = line.split_once(':').unwrap_or((line.as_ref(), ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        self.block_has_field = true;
        match field {
            "event" => self.block.event = value.to_string(),
            "id" => self.block.id = Some(value.to_string()),
            "data" => {
                self.block.data.push_str(value);
                self.block.data.push('\n');
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event: &str, id: Option<&str>, data: &str) -> Block {
        Block::Event(SseEvent {
            event: event.into(),
            id: id.map(str::to_string),
            data: data.into(),
        })
    }

    fn read_in_chunks(stream: &[u8], size: usize) -> Vec<Block> {
        let mut reader = SseReader::default();
        let mut blocks = Vec::new();
        for chunk in stream.chunks(size) {
            blocks.extend(reader.push(chunk).unwrap());
        }
        blocks
    }

    /// LF, CRLF and CR line endings, mixed, as the format allows.
    const STREAM: &[u8] = b": heartbeat\n\nevent: revocation\nid: 7\ndata: {\"a\":1}\n\nretry: 1000\r\nevent: ready\r\nid: 3\r\ndata: x\r\n\r\ndata: cr\rid: 9\r\r\n\n\n:only a comment\r\n\n";

    fn expected() -> Vec<Block> {
        vec![
            Block::Comment,
            event("revocation", Some("7"), "{\"a\":1}"),
            event("ready", Some("3"), "x"),
            event("message", Some("9"), "cr"),
            Block::Comment,
        ]
    }

    #[test]
    fn reads_the_same_blocks_however_the_stream_is_cut() {
        for size in 1..=STREAM.len() {
            assert_eq!(read_in_chunks(STREAM, size), expected(), "chunks of {size}");
        }
        // Two chunks, cut at every byte: a CRLF cut in two is one line ending, not two.
        for cut in 0..=STREAM.len() {
            let mut reader = SseReader::default();
            let mut blocks = reader.push(&STREAM[..cut]).unwrap();
            blocks.extend(reader.push(&STREAM[cut..]).unwrap());
            assert_eq!(blocks, expected(), "cut at {cut}");
        }
    }

    #[test]
    fn data_lines_join_with_line_feeds() {
        let blocks = read_in_chunks(b"data: a\ndata:\ndata:  b\nevent\n\ndata\n\n", 64);
        assert_eq!(
            blocks,
            vec![
                event("message", None, "a\n\n b"),
                event("message", None, "")
            ]
        );
    }

    #[test]
    fn an_endless_block_is_refused_however_it_arrives() {
        let mut reader = SseReader::default();
        assert!(reader.push(&vec![b'a'; MAX_BLOCK + 1]).is_err());
        // One byte at a time, and as many short lines with no blank line between them.
        for unit in [&b"a"[..], b"data: x\n"] {
            let mut reader = SseReader::default();
            let refused = (0..=MAX_BLOCK / unit.len()).any(|_| reader.push(unit).is_err());
            assert!(refused, "{:?}", String::from_utf8_lossy(unit));
        }
    }

    #[test]
    fn a_long_stream_of_small_blocks_is_not_a_large_block() {
        let mut reader = SseReader::default();
        let block = b"event: revocation\nid: 1\ndata: {}\n\n";
        let mut read = 0;
        for _ in 0..(4 * MAX_BLOCK / block.len()) {
            read += reader.push(block).unwrap().len();
        }
        assert_eq!(read, 4 * MAX_BLOCK / block.len());
    }
}
