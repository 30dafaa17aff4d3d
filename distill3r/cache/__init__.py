"""Teacher cache: RLE masks, the shard sample format, the shard writer and the reader."""
