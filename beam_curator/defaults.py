"""The defaults and choices of the curation steps, defined once.

The command line (options.py), the public transforms and the pure algorithms all read them
from here, so a default never differs between the CLI and the Python API. No imports.
"""

DEFAULT_AESTHETIC_THRESHOLD = 5.0   # LAION 1–10 scale; LAION-Aesthetics subsets used 4.5 … 6.5
DEFAULT_NSFW_THRESHOLD = 0.5        # 0–1; a sample with nsfw_score >= this is filtered
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit
# One tar member (image or sidecar) larger than this is a sample error, skipped unread. 64 MiB
# is over 10x a high-quality JPEG at the pixel limit above and ~100x a LAION-scale image, so
# no usable sample is lost, while a 500 KB .tar.gz can no longer blow up to GBs in memory.
DEFAULT_MAX_MEMBER_BYTES = 64 << 20
DEFAULT_INFERENCE_BATCH_SIZE = 64
DEFAULT_EPS = 0.01                  # NeMo Curator's eps_to_extract

DEVICES = ("auto", "cpu", "cuda")   # where inference and dedup math run
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
WHICH_TO_KEEP = ("hard", "easy", "random")
STAGED, SHUFFLE = "staged", "shuffle"   # how dedup's vectors reach the pairwise step
