"""Input pipelines: image discovery, decoding and evaluation preprocessing."""
