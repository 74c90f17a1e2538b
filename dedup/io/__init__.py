"""Where bytes live and how they are read and written: storage (local paths, URLs,
pipe:), shards and tar reading, image decoding, OUT and its state, atomic files."""
