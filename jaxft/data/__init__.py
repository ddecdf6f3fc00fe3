"""Data: TFDS builders over local files -> grain pipelines that follow the batch contract."""
