"""dinotron.pipeline: WebDataset shards, the DALI multi-crop graph and the torchvision baseline loader."""
