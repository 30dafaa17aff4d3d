"""Teacher cache: RLE masks, the sample format, bounded npz and tar readers, the shard writer,
the atomic swap of a complete build, and the one reader of training and evaluation."""
