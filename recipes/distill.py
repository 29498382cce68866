"""Distill an image-caption dataset with MDM.

    accelerate launch recipes/distill.py --config recipes/configs/flickr30k_clip_mdm_100.yaml [--field value ...]

Thin wrapper: the YAML + CLI become an ``MDMConfig`` and the library does the rest (``mdm_hf.distill``).
"""

import sys

from mdm_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
