"""Curation of an uncurated shard set: embed every image with a frozen backbone, cluster the embeddings with
hierarchical k-means, drop semantic near-duplicates and sample the clusters to a balanced selection; the
selection, its counts and a report a person can look at are written to one destination folder."""
