"""The formats `mocostream export` writes. Their own module: export.py imports torch, which the command line
(`shards create` above all) must not pay for at start-up."""
FORMATS = ("torchvision", "timm", "safetensors", "detectron2")
