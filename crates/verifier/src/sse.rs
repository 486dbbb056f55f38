//! A Server-Sent Events reader: bytes in, events out (the parts of the format keyplane's
//! revocation stream uses: `event`, `id`, `data`, comments).

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
    buffer: Vec<u8>,
}

/// A block larger than this is not keyplane's: the stream is dropped rather than buffered.
const MAX_BLOCK: usize = 64 * 1024;

impl SseReader {
    /// Adds `bytes` and returns the blocks they complete; `Err` if a block grows too large.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Result<Vec<Block>, ()> {
        self.buffer.extend_from_slice(bytes);
        let mut blocks = Vec::new();
        while let Some(end) = find_blank_line(&self.buffer) {
            let block: Vec<u8> = self.buffer.drain(..end.1).collect();
            blocks.push(parse(&String::from_utf8_lossy(&block[..end.0])));
        }
        if self.buffer.len() > MAX_BLOCK {
            return Err(());
        }
        Ok(blocks)
    }
}

/// Where the first block ends: (its length, its length with the blank line).
fn find_blank_line(buffer: &[u8]) -> Option<(usize, usize)> {
    let text = buffer;
    for i in 0..text.len() {
        if text[i..].starts_with(b"\n\n") {
            return Some((i, i + 2));
        }
        if text[i..].starts_with(b"\r\n\r\n") {
            return Some((i, i + 4));
        }
    }
    None
}

fn parse(block: &str) -> Block {
    let mut event = SseEvent {
        event: "message".into(),
        ..SseEvent::default()
    };
    let mut any_field = false;
    for line in block.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        any_field = true;
        match field {
            "event" => event.event = value.to_string(),
            "id" => event.id = Some(value.to_string()),
            "data" => {
                if !event.data.is_empty() {
                    event.data.push('\n');
                }
                event.data.push_str(value);
            }
            _ => {}
        }
    }
    if any_field {
        Block::Event(event)
    } else {
        Block::Comment
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_events_and_comments_across_chunk_boundaries() {
        let mut reader = SseReader::default();
        let stream = b": heartbeat\n\nevent: revocation\nid: 7\ndata: {\"a\":1}\n\nretry: 1000\r\nevent: ready\r\nid: 3\r\ndata: x\r\n\r\n";
        let mut blocks = Vec::new();
        for chunk in stream.chunks(5) {
            blocks.extend(reader.push(chunk).unwrap());
        }
        assert_eq!(
            blocks,
            vec![
                Block::Comment,
                Block::Event(SseEvent {
                    event: "revocation".into(),
                    id: Some("7".into()),
                    data: "{\"a\":1}".into()
                }),
                Block::Event(SseEvent {
                    event: "ready".into(),
                    id: Some("3".into()),
                    data: "x".into()
                }),
            ]
        );
    }

    #[test]
    fn an_endless_block_is_refused() {
        let mut reader = SseReader::default();
        assert!(reader.push(&vec![b'a'; MAX_BLOCK + 1]).is_err());
    }
}
