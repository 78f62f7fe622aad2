"""Write matches.csv for new postings with a trained run.

    python product-matching/infer.py --run-dir logs/product-matching/dolg/runs/<time> \\
        --csv new_postings.csv --image-dir new_images/ --out matches.csv

The threshold defaults to the one chosen on the validation fold and stored in the checkpoint.
"""

import argparse
import logging

from matching.infer import match_postings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a product-matching run directory")
    p.add_argument("--csv", required=True, help="postings CSV with posting_id and image")
    p.add_argument("--image-dir", default=None, help="folder of the images (default: CSV's)")
    p.add_argument("--out", default="matches.csv")
    p.add_argument("--threshold", type=float, default=None, help="override the run's threshold")
    p.add_argument(
        "--min2",
        type=float,
        default=None,
        help="keep the nearest other posting when its similarity is at least this",
    )
    p.add_argument("--which", choices=["best", "last"], default="best")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    path = match_postings(
        args.run_dir,
        args.csv,
        args.out,
        args.image_dir,
        args.threshold,
        args.min2,
        which=args.which,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
