//! The Avro object container file, written by hand for capture's two fixed schemas: the
//! header (magic, metadata with the schema and codec, sync marker), then blocks of records,
//! each `count, size, data, sync`, the data deflated (raw RFC 1951, as the Avro specification's
//! `deflate` codec says) or not. Also the binary encoding of the primitives a record is made
//! of. Pure: bytes in memory; `format` says which fields a record has.
//!
//! Why not apache-avro's `Writer`: capture encodes every accepted message on the hub's busy
//! path, and the library's writer builds each record through its schema (a tree of values,
//! or its schema-aware serde serializer), which `examples/capture_cost` measured at about
//! 3 µs a record, as much as the rest of the hub spends on the message. These schemas never
//! change, so a record is a few length-prefixed copies. apache-avro still reads every file
//! back in the tests (and in `simdevice archive`), and the interop tests read them with
//! fastavro and avro.

use super::format::Codec;

/// Avro's magic bytes: `Obj` and version 1.
const MAGIC: &[u8; 4] = b"Obj\x01";
/// A block is compressed and written out past this many bytes of records.
pub const BLOCK_BYTES: usize = 64 * 1024;

/// Appends `value` as Avro's `long`: zig-zag, then a base-128 varint.
pub fn put_long(out: &mut Vec<u8>, value: i64) {
    let mut n = ((value << 1) ^ (value >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Appends `bytes` as Avro's `bytes` (or `string`, for UTF-8): length, then the bytes.
pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_long(out, bytes.len() as i64);
    out.extend_from_slice(bytes);
}

/// A container file being written: whole blocks in `file`, the open block's records in
/// `block`.
pub struct ContainerWriter {
    codec: Codec,
    sync: [u8; 16],
    file: Vec<u8>,
    block: Vec<u8>,
    records: i64,
}

impl ContainerWriter {
    /// A file of `schema` (its JSON text) with `codec`; the header is written at once.
    pub fn new(schema: &str, codec: Codec) -> ContainerWriter {
        let sync: [u8; 16] = rand::random();
        let mut file = Vec::with_capacity(BLOCK_BYTES);
        file.extend_from_slice(MAGIC);
        // The metadata: a map of bytes values, in one block of two entries.
        put_long(&mut file, 2);
        put_bytes(&mut file, b"avro.schema");
        put_bytes(&mut file, schema.as_bytes());
        put_bytes(&mut file, b"avro.codec");
        put_bytes(&mut file, codec.as_str().as_bytes());
        put_long(&mut file, 0);
        file.extend_from_slice(&sync);
        ContainerWriter {
            codec,
            sync,
            file,
            block: Vec::with_capacity(BLOCK_BYTES + 4096),
            records: 0,
        }
    }

    /// The open block, for the caller to encode one record into; then [`Self::record_done`].
    pub fn block(&mut self) -> &mut Vec<u8> {
        &mut self.block
    }

    /// One record was encoded into [`Self::block`]: counts it, and writes the block out
    /// when it is full.
    pub fn record_done(&mut self) {
        self.records += 1;
        if self.block.len() >= BLOCK_BYTES {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.records == 0 {
            return;
        }
        put_long(&mut self.file, self.records);
        match self.codec {
            Codec::Null => {
                put_bytes(&mut self.file, &self.block);
            }
            Codec::Deflate => {
                // The fastest level: every accepted message is compressed, and a deflate
                // reader reads every level alike.
                let compressed = miniz_oxide::deflate::compress_to_vec(&self.block, 1);
                put_bytes(&mut self.file, &compressed);
            }
        }
        self.file.extend_from_slice(&self.sync);
        self.block.clear();
        self.records = 0;
    }

    /// The whole file: the header alone when no record was written (an "empty archive").
    pub fn finish(mut self) -> Vec<u8> {
        self.flush();
        self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longs_are_zigzag_varints_as_the_specification_shows() {
        // The specification's table: 0 -> 00, -1 -> 01, 1 -> 02, -2 -> 03, 2 -> 04,
        // -64 -> 7f, 64 -> 80 01.
        for (value, want) in [
            (0i64, vec![0x00u8]),
            (-1, vec![0x01]),
            (1, vec![0x02]),
            (-2, vec![0x03]),
            (2, vec![0x04]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            put_long(&mut out, value);
            assert_eq!(out, want, "{value}");
        }
        let mut out = Vec::new();
        put_long(&mut out, i64::MIN);
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn a_file_of_longs_reads_back_with_apache_avro_in_both_codecs_across_blocks() {
        for codec in [Codec::Null, Codec::Deflate] {
            let mut writer = ContainerWriter::new(r#""long""#, codec);
            // Enough records for several blocks.
            let count = 3 * BLOCK_BYTES as i64;
            for n in 0..count {
                put_long(writer.block(), n);
                writer.record_done();
            }
            let file = writer.finish();
            let read: Vec<i64> = apache_avro::Reader::new(&file[..])
                .unwrap()
                .map(|v| match v.unwrap() {
                    apache_avro::types::Value::Long(n) => n,
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(read.len() as i64, count, "{codec:?}");
            assert!(read.iter().enumerate().all(|(i, &n)| n == i as i64));
        }
        let empty = ContainerWriter::new(r#""long""#, Codec::Deflate).finish();
        assert!(apache_avro::Reader::new(&empty[..])
            .unwrap()
            .next()
            .is_none());
    }
}
