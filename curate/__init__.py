"""curate: make uncurated image data worth training on, in three resumable stages over a curation folder DEST.

1. embed (embed.py): every sample of the data, read shard by shard as the pipeline reads it, through a frozen
   backbone with a centre-crop evaluation transform -> L2-normalised fp16 vectors, one parquet file per data
   shard (DEST/embeddings/), shards split over the ranks of a torchrun job.
2. cluster (cluster.py, kmeans.py): hierarchical spherical k-means (faiss) fitted on a bounded sample, levels
   sized from the data by a stated rule (levels.py); every vector assigned to its finest cluster, shard by shard.
3. select (select.py, dedup.py, balance.py, kept.py): semantic near-duplicates dropped within each finest
   cluster, then balanced sampling from the top of the tree down to the asked size; DEST/selection.parquet
   (a row per sample), DEST/report.json and the selection manifest that `train --data DEST` reads
   (pipeline/selection.py), and report.html (report*.py), the page a person looks at. `--materialise`
   (materialise.py) also writes the kept samples as a shard set.

The package reads data through pipeline/ and writes shards through shards/; the command line, the weights
loaders and the metrics endpoint are in ops/ (ops/cli_curate.py), which hands the stages what they need.
"""
